"""The server log never slows the chat (SPEC 3, issue 11 item 1).

Pure tests drive ``chatsuite.server.log.Log`` with a stream whose ``write`` blocks until the
test lets it go; process tests run ``chat_server.py`` with a standard output that nobody reads.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import ROOT, Peer, free_port, wait_until

from chatsuite.server.log import Log, dropped_line, message_lines

EPOCH = 1_790_000_000.0
STAMP = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(EPOCH))


class StalledStream:
    """A text stream whose ``write`` blocks until ``release`` is set (a terminal after Ctrl-S)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()  # a write is waiting
        self.lock = threading.Lock()
        self.written: list[str] = []

    def write(self, data: str) -> int:
        self.entered.set()
        self.release.wait()
        with self.lock:
            self.written.append(data)
        return len(data)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        with self.lock:
            return "".join(self.written).splitlines()


@pytest.fixture
def stalled() -> Iterator[StalledStream]:
    """A stalled stream, let go after the test so the log thread can end."""
    stream = StalledStream()
    yield stream
    stream.release.set()


def call_within(seconds: float, action: Callable[[], Any]) -> None:
    """Run ``action`` in a thread; fail when it has not returned within ``seconds``."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the call waited for the stalled output"


def test_log_callers_never_wait_and_overflow_is_counted_once_the_output_moves(
        stalled: StalledStream) -> None:
    """With the output stalled, log calls return at once; lines past the bound are dropped, and
    once the output moves the kept lines are written, then one line with the dropped count."""
    log = Log(stream=stalled, max_lines=5, clock=lambda: EPOCH)
    log("first")
    assert stalled.entered.wait(5)  # the log thread is now blocked in write

    def flood() -> None:
        for index in range(1000):
            log(f"line {index}")
        log.messages("alice", "all", ["one", "two"])

    call_within(2.0, flood)
    assert stalled.lines() == []
    stalled.release.set()
    wait_until(lambda: len(stalled.lines()) == 7, what="the kept lines and the count")
    assert stalled.lines() == [f"{STAMP} first"] + [f"{STAMP} line {i}" for i in range(5)] + [
        f"{STAMP} (997 log lines dropped while the output was stalled)"]
    log("after")
    wait_until(lambda: stalled.lines()[-1:] == [f"{STAMP} after"], what="the next line")
    assert log.close()


def test_log_bounds_the_characters_held_while_stalled(stalled: StalledStream) -> None:
    """Message texts held for a stalled output count against a character bound: past it the
    messages are dropped, counted one per text."""
    log = Log(stream=stalled, max_chars=100, clock=lambda: EPOCH)
    log("first")
    assert stalled.entered.wait(5)

    def flood() -> None:
        for _ in range(5):
            log.messages("bob", "all", ["x" * 30, "y" * 30])

    call_within(2.0, flood)
    stalled.release.set()
    wait_until(lambda: len(stalled.lines()) == 4, what="the kept lines and the count")
    assert stalled.lines() == [
        f"{STAMP} first",
        f"{STAMP} message bob -> all: {'x' * 30}",
        f"{STAMP} message bob -> all: {'y' * 30}",
        f"{STAMP} (8 log lines dropped while the output was stalled)",
    ]
    assert log.close()


def test_close_gives_up_on_a_stalled_output_within_its_bound(stalled: StalledStream) -> None:
    """close() on a stalled output returns False after its timeout instead of waiting for it."""
    log = Log(stream=stalled)
    log("stuck")
    assert stalled.entered.wait(5)
    started = time.monotonic()
    assert log.close(0.2) is False
    assert time.monotonic() - started < 1.0


def test_sink_receives_the_same_texts_from_the_log_thread() -> None:
    """A sink (ServerConfig.log) gets each line and each batch of messages as one text, escaped,
    from the log thread; close() waits until all is delivered."""
    got: list[tuple[str, str]] = []
    log = Log(lambda text: got.append((threading.current_thread().name, text)))
    log("connected: 127.0.0.1:1 (0 online)")
    log.messages("alice", "all", ["hi\x1b[2J", "a\nb\u202e"])
    log.messages("alice", "bob", ["psst"])
    assert log.close()
    assert got == [
        ("log", "connected: 127.0.0.1:1 (0 online)"),
        ("log", "message alice -> all: hi\\x1b[2J\nmessage alice -> all: a\\x0ab\\u202e"),
        ("log", "message alice -> bob: psst"),
    ]


def test_quiet_log_has_lengths_and_no_text() -> None:
    """With quiet, a relayed message is logged with its length only."""
    got: list[str] = []
    log = Log(got.append, quiet=True)
    log.messages("alice", "bob", ["secret", "two words"])
    assert log.close()
    assert got == ["message alice -> bob (6 characters)\nmessage alice -> bob (9 characters)"]


def test_message_and_dropped_lines_are_formatted_exactly() -> None:
    """The message lines escape control characters; the dropped line names its count."""
    assert message_lines("a", "all", ["x\ty"], quiet=False) == "message a -> all: x\\x09y"
    assert message_lines("a", "all", ["x\ty"], quiet=True) == "message a -> all (3 characters)"
    assert dropped_line(3) == "(3 log lines dropped while the output was stalled)"


def test_stream_with_a_descriptor_is_written_stamped_to_it(tmp_path: Any) -> None:
    """A stream with a file descriptor gets stamped lines written straight to that descriptor."""
    path = tmp_path / "server.log"
    with open(path, "w", encoding="utf-8") as stream:
        log = Log(stream=stream, clock=lambda: EPOCH)
        log("chat server listening on 127.0.0.1:1")
        log.messages("alice", "all", ["h\u00e9llo", "two"])
        assert log.close()
    assert path.read_text(encoding="utf-8").splitlines() == [
        f"{STAMP} chat server listening on 127.0.0.1:1",
        f"{STAMP} message alice -> all: h\u00e9llo",
        f"{STAMP} message alice -> all: two",
    ]


# --------------------------------------------------------------------------------------------
# The real program, its standard output a pipe that nobody reads.


def pipe_pending(fd: int) -> int:
    """Bytes written into a pipe and not yet read."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def blocked_on_pipe(pid: int) -> bool:
    """True while a thread of process ``pid`` waits in a write to a full pipe (Linux)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/wchan", encoding="ascii") as wchan:
                if "pipe_write" in wchan.read():
                    return True
        except OSError:
            continue  # the thread ended
    return False


class StalledServer:
    """``python chat_server.py`` whose stdout is read up to its listening line, then never."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.address = ("127.0.0.1", self.port)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "chat_server.py"), "--host", "127.0.0.1",
             "--port", str(self.port), "--rate", "0", "--store", "none",
             "--resume-window", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        # One page: a little output fills it (a full pipe's byte count depends on its writes).
        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 4096)
        seen = b""
        deadline = time.monotonic() + 10
        while b"listening on" not in seen:  # byte by byte: nothing more is taken from the pipe
            assert time.monotonic() < deadline, seen
            chunk = os.read(self.fd, 1)
            assert chunk, f"the server exited: {seen!r}"
            seen += chunk
        while not seen.endswith(b"\n"):
            seen += os.read(self.fd, 1)

    def read_all(self, quiet: float = 0.05, most: float = 1.0) -> str:
        """What the server writes until its output pauses for ``quiet`` seconds (at most
        ``most`` seconds of it). Read as it comes, not once a poll: the pipe holds one page,
        so a poll that drained it would let a stalled log of megabytes out 4 KiB a poll."""
        data = b""
        deadline = time.monotonic() + most
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], quiet)
            if not ready:
                break
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def stalled_server() -> Iterator[Callable[..., StalledServer]]:
    """A factory for servers with an unread stdout, killed after the test."""
    servers: list[StalledServer] = []

    def start(*args: str) -> StalledServer:
        server = StalledServer(*args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def joined(address: tuple[str, int], name: str, *, view: bool = False) -> Peer:
    peer = Peer(address)
    peer.register(name)
    if view:
        peer.view()
    return peer


def stall_the_pipe(server: StalledServer, sender: Peer, viewer: Peer) -> None:
    """Broadcast 100 long messages (2 MB of log, far more than the pipe holds); the viewer gets
    all 100."""
    text = "x" * 20_000
    for index in range(100):
        sender.send({"type": "say", "text": f"{index:03d} {text}"})
    for index in range(100):
        assert viewer.wait_for("message")["text"][:3] == f"{index:03d}"
    for _ in range(100):
        sender.wait_for("ok")
    wait_until(lambda: blocked_on_pipe(server.proc.pid), what="the log to block on the pipe")


@pytest.mark.parametrize("quiet", [False, True])
def test_chat_joining_and_stop_go_on_while_the_log_output_is_stalled(
        stalled_server: Callable[..., StalledServer], quiet: bool) -> None:
    """With its stdout a full pipe nobody reads, the server relays all 100 of 100 broadcasts,
    answers a ping, welcomes a new client, and exits 0 within a second of SIGTERM."""
    server = stalled_server(*(["--quiet"] if quiet else []))
    viewer = joined(server.address, "viewer", view=True)
    sender = joined(server.address, "sender")
    viewer.sync()
    if quiet:  # quiet lines are short: connections (two lines each) fill the pipe instead

        def connect_some() -> bool:
            for _ in range(20):
                Peer(server.address).close()
            return blocked_on_pipe(server.proc.pid)

        wait_until(connect_some, 20, "the log to block on the pipe")
    stall_the_pipe(server, sender, viewer)
    sender.send({"type": "ping", "ref": "p1"})
    assert sender.wait_for("pong")["ref"] == "p1"
    newcomer = Peer(server.address)
    assert newcomer.register("newcomer")["name"] == "newcomer"
    assert viewer.wait_for("notice", event="joined")["user"]["name"] == "newcomer"
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: server.proc.poll() is not None, 2.0, "the server to exit")
    assert time.monotonic() - started < 1.5
    assert server.proc.returncode == 0
    assert viewer.wait_for("notice")["event"] == "shutdown"
    for peer in (viewer, sender, newcomer):
        peer.close()


def test_stalled_log_says_how_many_lines_it_dropped_once_the_output_moves(
        stalled_server: Callable[..., StalledServer]) -> None:
    """Log lines past the bound are dropped while stdout is stalled; once it is read again a
    line gives their count, and logging goes on."""
    server = stalled_server()
    viewer = joined(server.address, "viewer", view=True)
    sender = joined(server.address, "sender")
    viewer.sync()
    stall_the_pipe(server, sender, viewer)
    # Another 2 MB now that the log is blocked on the pipe: whatever its blocked write took,
    # its buffer (1 MiB of messages) cannot hold them, so lines are dropped at any speed.
    text = "x" * 20_000
    for index in range(100, 200):
        sender.send({"type": "say", "text": f"{index:03d} {text}"})
    for index in range(100, 200):
        assert viewer.wait_for("message")["text"][:3] == f"{index:03d}"
    output = ""

    def read_until(pattern: str) -> bool:
        nonlocal output
        output += server.read_all()
        return re.search(pattern, output) is not None

    wait_until(lambda: read_until("log lines dropped while the output was stalled"), 10,
               "the dropped count line")
    sender.close()  # its leaving, then the viewer's, come after every message record
    wait_until(lambda: read_until(r"sender \(id \d+\) lost"), 10, "sender's leaving logged")
    viewer.close()
    wait_until(lambda: read_until(r"viewer \(id \d+\) lost"), 10, "viewer's leaving logged")
    counts = re.findall(r"\((\d+) log lines dropped while the output was stalled\)", output)
    dropped = sum(int(count) for count in counts)
    kept = len(re.findall(r"message sender -> all: \d{3} x{20000}\n", output))
    assert dropped > 0 and kept + dropped == 200, (kept, counts)
