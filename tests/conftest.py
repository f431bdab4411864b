"""Shared fixtures: a real server on a loopback port, and raw-socket peers that speak the wire."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chat_server import ChatServer, ServerConfig

if TYPE_CHECKING:
    import pexpect
    from client_helpers import ClientPrograms, ScriptedServer

DEFAULT_WAIT = 5.0


def wait_until(predicate: Callable[[], Any], timeout: float = DEFAULT_WAIT, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)


class RawConnection:
    """A TCP connection read up to a one-byte terminator, with a deadline on every read."""

    terminator = b"\0"  # NUL ends native and plain frames; line clients use b"\n"

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_WAIT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buffer = b""
        self.eof = False

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False once the server has closed the connection."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"nothing complete within the deadline; have {self.buffer[:200]!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"nothing complete within the deadline; have {self.buffer[:200]!r}"
            ) from None
        except (ConnectionResetError, ConnectionAbortedError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def read_unit(self, timeout: float | None = None) -> bytes:
        """The next terminated unit, without its terminator; fails on timeout or close."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.terminator not in self.buffer:
            if not self._fill(deadline):
                raise AssertionError(f"connection closed; pending {self.buffer[:200]!r}")
        unit, _, self.buffer = self.buffer.partition(self.terminator)
        return unit

    def read_until_closed(self, timeout: float | None = None) -> bytes:
        """Every byte still to come, once the server closes; fails if it does not close in time."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._fill(deadline):
            pass
        data, self.buffer = self.buffer, b""
        return data

    def closed(self, timeout: float | None = None) -> bool:
        """True when the server closes the connection within the timeout (data may come first)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            while True:
                if not self._fill(deadline):
                    return True
        except AssertionError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Peer(RawConnection):
    """A raw native-protocol client for tests: JSON objects out, decoded events in."""

    def __init__(self, address: tuple[str, int], timeout: float = DEFAULT_WAIT, *,
                 sock: socket.socket | None = None) -> None:
        # ``sock``: an already connected socket (a TLS-wrapped one) instead of dialing ``address``.
        super().__init__(sock or socket.create_connection(address, timeout=timeout), timeout)
        self.events: list[dict[str, Any]] = []
        # ``pending`` events (SPEC 1.3: counts for a typing client, sent on a timer) are skipped
        # unless a test is about them, so that other tests see the same events at any speed.
        self.keep_pending = False

    def send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
        self.sock.sendall(data + b"\0")

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event from the server (``pending`` only if kept); fails on timeout or close."""
        while True:
            event = json.loads(self.read_unit(timeout).decode("utf-8"))
            if self.keep_pending or event.get("type") != "pending":
                self.events.append(event)
                return event

    def expect(self, type_: str, **fields: Any) -> dict[str, Any]:
        """The next event must have this type and these field values."""
        event = self.next_event()
        assert event.get("type") == type_, f"expected {type_}, got {event}"
        for key, value in fields.items():
            assert event.get(key) == value, f"{key}: expected {value!r}, got {event}"
        return event

    def wait_for(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Skip events until one of this type with these field values arrives."""
        while True:
            event = self.next_event()
            if event.get("type") == type_ and all(event.get(k) == v for k, v in fields.items()):
                return event

    def sync(self) -> list[dict[str, Any]]:
        """Round-trip a ping; return the events that arrived before its pong, in order."""
        ref = f"sync-{time.monotonic_ns()}"
        self.send({"type": "ping", "ref": ref})
        before: list[dict[str, Any]] = []
        while True:
            event = self.next_event()
            if event.get("type") == "pong" and event.get("ref") == ref:
                return before
            before.append(event)

    def register(self, name: str | None = None, **fields: Any) -> dict[str, Any]:
        hello: dict[str, Any] = {"type": "hello", **fields}
        if name is not None:
            hello["name"] = name
        self.send(hello)
        return self.expect("welcome")

    def view(self) -> dict[str, Any]:
        self.send({"type": "mode", "mode": 2})
        return self.expect("mode", mode=2)



def reply(peer: Peer, request: dict[str, Any], ref: str) -> dict[str, Any]:
    """Send ``request`` with ``ref``; the reply carrying it (room events before it are kept)."""
    peer.send({**request, "ref": ref})
    while True:
        event = peer.next_event()
        if event.get("ref") == ref:
            return event


def notice_of(peer: Peer, kind: str) -> dict[str, Any]:
    """The first ``kind`` notice this peer has received (or receives next)."""
    for event in peer.events:
        if event.get("type") == "notice" and event.get("event") == kind:
            return event
    return peer.wait_for("notice", event=kind)

@pytest.fixture
def start_server() -> Iterator[Callable[..., ChatServer]]:
    """A factory for running servers on 127.0.0.1 and a free port; all stopped after the test."""
    servers: list[ChatServer] = []

    def start(**options: Any) -> ChatServer:
        options.setdefault("log", lambda line: None)
        options.setdefault("store", "none")  # isolated and fast; store tests pass a file
        # Seed behaviour (a lost member leaves at once); resume tests ask for a window.
        options.setdefault("resume_window", 0)
        server = ChatServer(ServerConfig(host="127.0.0.1", port=0, **options))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., ChatServer]) -> ChatServer:
    """A server with default options (rate limit off so tests run at full speed)."""
    return start_server(rate=0)


@pytest.fixture
def connect() -> Iterator[Callable[..., Peer]]:
    """A factory for ``Peer`` connections, all closed after the test."""
    peers: list[Peer] = []

    def make(server: ChatServer, timeout: float = DEFAULT_WAIT) -> Peer:
        peer = Peer(server.address, timeout)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for subprocess servers)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``python chat_server.py`` in a subprocess, on a free port; its output lines are kept."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "chat_server.py"), "--host", "127.0.0.1",
             "--port", str(self.port),
             # Isolated by default (a store file is locked by one server): tests of the
             # store pass --store themselves.
             *(() if "--store" in args else ("--store", "none")),
             *(() if "--resume-window" in args else ("--resume-window", "0")), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
            encoding="utf-8", errors="replace",
        )
        self.address = ("127.0.0.1", self.port)
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()
        wait_until(self._listening, 10, "the server to listen")

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _listening(self) -> bool:
        if self.proc.poll() is not None and not any("listening on" in x for x in self.lines):
            raise AssertionError("server exited: " + "\n".join(self.lines))
        return any("listening on" in line for line in self.lines)

    def wait_for_line(self, text: str, timeout: float = DEFAULT_WAIT) -> str:
        """The first output line containing ``text``, waiting for it to appear."""
        return wait_until(lambda: next((x for x in self.lines if text in x), None), timeout, text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    """A factory for server subprocesses, killed after the test if still running."""
    procs: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        proc = ServerProcess(*args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def leave(peer: Peer) -> None:
    """``peer`` quits: its bye, then the server closes the connection (its descriptor free)."""
    peer.send({"type": "quit"})
    peer.wait_for("bye")
    assert peer.closed()
    peer.close()


def take_over_id(connect: Callable[..., Peer], server: Any, wanted: int, name: str) -> Peer:
    """A peer registered as ``name`` on the id ``wanted`` of a server process, which reuses a
    freed descriptor at once (a try that comes before the old socket is closed quits and tries
    again). Ids are socket numbers: this is how a departed user's id reaches someone else."""
    for _ in range(50):
        peer = connect(server)
        if peer.register(name)["id"] == wanted:
            return peer
        leave(peer)
    raise AssertionError(f"id {wanted} was never reused")


# -- the client's tests: programs in pseudo-terminals, and a server they can be scripted against
# (client_helpers imports this module, so it is imported here when a fixture runs).


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[ClientPrograms]:
    """``chat_client.py`` programs in pseudo-terminals, each killed after the test."""
    from client_helpers import ClientPrograms

    started = ClientPrograms(tmp_path / "history")
    yield started
    started.close()


@pytest.fixture
def spawn(programs: ClientPrograms) -> Callable[..., pexpect.spawn]:
    """Start ``chat_client.py`` in a pseudo-terminal (its history folder is the test's)."""
    return programs.start


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    """A native server the test drives step by step, closed after it."""
    from client_helpers import ScriptedServer

    server = ScriptedServer()
    yield server
    server.close()
