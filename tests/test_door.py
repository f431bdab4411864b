"""The door (SPEC 1.5): limits checked when a connection is accepted, failures to accept or to
start a thread, TCP keepalive on accepted sockets.

Several tests connect from other loopback addresses (127.0.0.2, ...): Linux routes all of
127.0.0.0/8 to the loopback interface, so binding the client socket first is enough.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import ROOT, Peer, ServerProcess, wait_until

import chat_server
from chat_server import ChatServer

StartServer = Callable[..., ChatServer]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.N source addresses")


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Client sockets opened by a test, all closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def silent(server: Any, opened: list[socket.socket], host: str = "127.0.0.1") -> socket.socket:
    """A connection from ``host`` that never sends a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    opened.append(sock)
    sock.bind((host, 0))
    sock.settimeout(5)
    sock.connect(server.address)
    return sock


def peer_from(server: Any, opened: list[socket.socket], host: str) -> Peer:
    """A native peer connecting from ``host``."""
    return Peer(server.address, sock=silent(server, opened, host))


def is_open(sock: socket.socket) -> bool:
    """True while the server has neither closed nor written to ``sock`` (never blocks)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionError:
        return False
    finally:
        sock.settimeout(timeout)


def accepted(server: ChatServer, count: int) -> None:
    """Wait until the server holds exactly ``count`` connections."""
    wait_until(lambda: len(server._connections) == count, what=f"{count} connections")


# ---------------------------------------------------------------------------------------------
# Unregistered connections.


@pytest.mark.parametrize("per_ip", [0, 8], ids=["one-address-fills-the-table",
                                                  "per-address-limit"])
def test_silent_sockets_cannot_keep_a_real_user_out(
    start_server: StartServer, sockets: list[socket.socket], per_ip: int
) -> None:
    """With a table of 50, 60 silent sockets from 127.0.0.1 leave a real user from that same
    address free to register within a second: the oldest are closed to make room."""
    server = start_server(rate=0, max_unregistered=50, max_unregistered_per_ip=per_ip)
    crowd = [silent(server, sockets) for _ in range(60)]
    wait_until(lambda: sum(not is_open(s) for s in crowd) == (10 if per_ip == 0 else 52),
               what="the door to close the crowd's surplus")
    started = time.monotonic()
    user = peer_from(server, sockets, "127.0.0.1")
    assert user.register("real")["name"] == "real"
    assert time.monotonic() - started < 1.0
    # Unlimited per address: the 11 oldest made room (10 for the crowd, 1 for the user).
    # Eight per address: only the address's newest 8 may wait, so the user's connection
    # closed the oldest of those.
    # (The writer closes an evicted socket on its own thread: waited for, not assumed.)
    expected = [False] * 11 + [True] * 49 if per_ip == 0 else [False] * 53 + [True] * 7
    wait_until(lambda: [is_open(s) for s in crowd] == expected, what="the crowd's surplus closed")


def test_the_oldest_unregistered_connection_makes_room(
    start_server: StartServer, sockets: list[socket.socket]
) -> None:
    """When the table is full, each new connection closes the oldest unregistered one, whatever its
    address; registered members are never counted or closed."""
    lines: list[str] = []
    server = start_server(rate=0, max_unregistered=50, log=lines.append)
    members = [peer_from(server, sockets, "127.0.0.1") for _ in range(3)]
    for index, peer in enumerate(members):
        peer.register(f"member{index}")
    crowd = []
    for index in range(56):  # 7 addresses, 8 each: within the per-address limit
        crowd.append(silent(server, sockets, f"127.0.0.{2 + index // 8}"))
        accepted(server, 3 + min(index + 1, 50))  # accepted in this order
    wait_until(lambda: sum(line.startswith("closed: ") for line in lines) == 6,
               what="six closed to make room")
    assert [is_open(s) for s in crowd] == [False] * 6 + [True] * 50
    assert [line for line in lines if line.startswith("closed: ")] == [
        f"closed: 127.0.0.2:{s.getsockname()[1]} (the oldest of 50 connections waiting to "
        "register, to make room)" for s in crowd[:6]
    ]
    for peer in members:
        peer.sync()  # still served
    members[0].send({"type": "users"})
    assert [u["name"] for u in members[0].expect("users")["users"]] == [
        "member0", "member1", "member2"]
    accepted(server, 53)


def test_the_ninth_waiting_connection_from_an_address_closes_that_addresss_oldest(
    start_server: StartServer, sockets: list[socket.socket]
) -> None:
    """Eight connections from one address may wait to register; a ninth closes the oldest of
    them (logged) and waits in its place; registered members from that address do not count,
    and other addresses are not affected."""
    lines: list[str] = []
    server = start_server(rate=0, log=lines.append)
    for index in range(3):
        peer_from(server, sockets, "127.0.0.3").register(f"member{index}")
    waiting = [silent(server, sockets, "127.0.0.3") for _ in range(8)]
    accepted(server, 11)
    ninth = peer_from(server, sockets, "127.0.0.3")
    assert waiting[0].recv(1) == b""  # closed, without a word
    closed = (f"closed: 127.0.0.3:{waiting[0].getsockname()[1]} (the oldest of 8 connections "
              "from its address waiting to register, to make room)")
    wait_until(lambda: closed in lines, what="the closing logged")
    assert ninth.register("late")["name"] == "late"
    assert all(is_open(s) for s in waiting[1:])
    other = silent(server, sockets, "127.0.0.4")  # another address is not affected
    accepted(server, 12)
    assert is_open(other) and all(is_open(s) for s in waiting[1:])


def test_max_per_ip_counts_registered_and_unregistered(
    start_server: StartServer, sockets: list[socket.socket]
) -> None:
    """--max-per-ip 3 counts every connection from an address: two members and one silent socket
    fill it, the next is closed at accept, and other addresses still get in."""
    server = start_server(rate=0, max_per_ip=3)
    alice = peer_from(server, sockets, "127.0.0.5")
    alice.register("alice")
    peer_from(server, sockets, "127.0.0.5").register("bob")
    quiet = silent(server, sockets, "127.0.0.5")
    accepted(server, 3)
    assert silent(server, sockets, "127.0.0.5").recv(1) == b""
    assert peer_from(server, sockets, "127.0.0.6").register("carol")["name"] == "carol"
    quiet.close()  # its place is free again once the server forgets it
    accepted(server, 3)
    assert peer_from(server, sockets, "127.0.0.5").register("dave")["name"] == "dave"


# ---------------------------------------------------------------------------------------------
# Failures to start a thread or to accept.


def test_failed_thread_start_costs_one_connection(
    start_server: StartServer, connect: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection whose thread cannot start is closed and logged; the acceptor goes on, later
    clients chat, and stop() returns cleanly."""
    lines: list[str] = []
    server = start_server(rate=0, log=lines.append)
    start_thread = server.start_thread
    failed: list[Any] = []

    def fail_once(thread: Any) -> None:
        if not failed:
            failed.append(thread)
            raise RuntimeError("can't start new thread")
        start_thread(thread)

    monkeypatch.setattr(server, "start_thread", fail_once)
    victim = connect(server)
    assert victim.read_until_closed() == b""
    port = victim.sock.getsockname()[1]
    wait_until(lambda: f"closed: 127.0.0.1:{port} (cannot start its thread: can't start new "
                       "thread)" in lines, what="the failure logged")
    alice, bob = connect(server), connect(server)
    alice.register("alice")
    bob.register("bob")
    bob.view()
    alice.send({"type": "say", "text": "still here"})
    assert bob.wait_for("message")["text"] == "still here"
    assert len(server._connections) == 2
    server.stop()
    assert lines[-1].endswith("chat server stopped")
    assert not any(thread.is_alive() for thread in server._threads)


class FailingListener:
    """A listening socket whose next ``failures`` accepts fail with EMFILE."""

    def __init__(self, real: socket.socket, failures: int) -> None:
        self.real = real
        self.failures = failures

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return self.real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_accept_failures_pause_and_go_on(
    start_server: StartServer, connect: Callable[..., Peer]
) -> None:
    """EMFILE from accept is logged once per attempt, the acceptor pauses 0.1 s instead of
    spinning, then accepts the waiting client; stop() returns cleanly."""
    lines: list[str] = []
    server = start_server(rate=0, log=lines.append)
    assert server._listener is not None
    server._listener = FailingListener(server._listener, 3)  # type: ignore[assignment]
    started = time.monotonic()
    alice = connect(server)
    assert alice.register("alice")["name"] == "alice"
    elapsed = time.monotonic() - started
    failures = [line for line in lines if line.startswith("accept failed")]
    assert failures == ["accept failed: [Errno 24] Too many open files"] * 3
    assert 3 * chat_server.ACCEPT_PAUSE <= elapsed < 3.0, elapsed
    assert connect(server).register("bob")["online"] == 2
    server.stop()
    assert lines[-1].endswith("chat server stopped")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(30)
def test_process_out_of_file_descriptors_survives(
    server_process: Callable[..., ServerProcess], sockets: list[socket.socket]
) -> None:
    """A server limited to a few more file descriptors than it uses logs the failed accepts,
    serves a new client once the others close, and still exits 0 on SIGTERM."""
    proc = server_process()
    pid = proc.proc.pid
    limit = open_fds(pid) + 10
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    crowd = []
    started = time.monotonic()
    for index in range(20):  # from 5 addresses, 4 each: the door lets them all in
        sock = silent(proc, sockets, f"127.0.0.{10 + index % 5}")
        sock.sendall(b'{"type":"hello","name":"u%d"}\0' % index)
        crowd.append(sock)
    proc.wait_for_line("accept failed: [Errno 24] Too many open files")
    assert proc.proc.poll() is None
    # The acceptor pauses after each failure instead of spinning on the waiting connection.
    failures = sum("accept failed" in line for line in proc.lines)
    assert failures <= (time.monotonic() - started) / chat_server.ACCEPT_PAUSE + 1, failures
    for sock in crowd:
        sock.close()
    # Once the crowd is gone (those still waiting in the backlog too), a newcomer chats.
    wait_until(lambda: open_fds(pid) < limit - 5, 10, "the crowd's sockets closed")
    alice = peer_from(proc, sockets, "127.0.0.20")
    assert alice.register("alice")["name"] == "alice"
    alice.view()
    alice.send({"type": "dm", "to": "alice", "text": "hi"})
    assert alice.wait_for("message")["text"] == "hi"  # after any notices about the crowd
    proc.proc.send_signal(signal.SIGTERM)
    alice.wait_for("notice", event="shutdown")
    assert proc.proc.wait(5) == 0


# ---------------------------------------------------------------------------------------------
# Thread stacks and keepalive.


def test_thread_stack_holds_the_deepest_recursion() -> None:
    """A thread with the server's stack size reaches Python's recursion limit through C code
    (the JSON decoder, repr) with a RecursionError, never a stack overflow."""
    code = (
        "import json, sys, threading\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from chat_server import THREAD_STACK\n"
        "threading.stack_size(THREAD_STACK)\n"
        "nested = []\n"
        "for _ in range(5000):\n"
        "    nested = [nested]\n"
        "def through_c(n):\n"
        "    return max(map(through_c, [n - 1])) if n else 0\n"
        "def run():\n"
        "    for work in (lambda: json.loads('[' * 50000 + ']' * 50000),\n"
        "                 lambda: json.dumps(nested), lambda: repr(nested),\n"
        "                 lambda: through_c(5000)):\n"
        "        try:\n"
        "            work()\n"
        "            print('returned')\n"
        "        except RecursionError:\n"
        "            print('RecursionError')\n"
        "thread = threading.Thread(target=run)\n"
        "thread.start()\n"
        "thread.join()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "RecursionError\n" * 4), result.stderr


def test_server_threads_use_the_small_stack(server: ChatServer) -> None:
    """Once a server has started, new threads reserve THREAD_STACK (512 KiB), not 8 MiB."""
    assert threading.stack_size() == chat_server.THREAD_STACK == 512 * 1024


def test_accepted_sockets_use_tcp_keepalive(
    server: ChatServer, connect: Callable[..., Peer]
) -> None:
    """The server side of a connection has keepalive on: idle 60 s, then 6 probes 10 s apart."""
    alice = connect(server)
    alice.register("alice")
    (conn,) = list(server._connections)
    sock = conn.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def blocked_signals(pid: int, tid: int) -> set[int]:
    """The signals thread ``tid`` of process ``pid`` blocks (Linux /proc)."""
    with open(f"/proc/{pid}/task/{tid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigBlk:"))
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}


def test_only_the_main_thread_takes_stop_signals(
    server_process: Callable[..., ServerProcess], sockets: list[socket.socket]
) -> None:
    """Every thread of the server but the main one blocks SIGINT, SIGTERM and SIGHUP, so the
    system hands a stop signal to the main thread, the one Python runs handlers in."""
    proc = server_process()
    alice = peer_from(proc, sockets, "127.0.0.1")
    alice.register("alice")
    pid = proc.proc.pid
    stop = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert len(others) >= 3  # the writer, the acceptor and alice's reader at least
    assert all(stop <= blocked_signals(pid, tid) for tid in others)
    assert not stop & blocked_signals(pid, pid)
    proc.proc.send_signal(signal.SIGTERM)
    alice.wait_for("notice", event="shutdown")
    assert proc.proc.wait(5) == 0
