"""The durable room over real sockets (SPEC 6): sequence numbers, the store, backlog, resume."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat_server import ChatServer, parse_args
from tests.conftest import ROOT, Peer, ServerProcess

Connect = Callable[..., Peer]
Start = Callable[..., ChatServer]


def member(connect: Connect, server: Any, name: str, **fields: Any) -> tuple[Peer, dict[str, Any]]:
    peer = connect(server)
    return peer, peer.register(name, **fields)


def test_seq_grows_across_messages_notices_and_direct_messages(server: ChatServer,
                                                               connect: Connect) -> None:
    """Every room event (joined, message, direct message, left, lost) gets a seq one above the
    last, and welcome carries the latest."""
    watcher, welcome = member(connect, server, "watcher")
    watcher.view()
    assert welcome["seq"] == 0
    alice, alice_welcome = member(connect, server, "alice")
    assert alice_welcome["seq"] == 1  # the watcher's joined; not yet her own
    alice.send({"type": "say", "text": "one"})
    alice.send({"type": "dm", "to": "watcher", "text": "two"})
    bob, bob_welcome = member(connect, server, "bob")
    assert bob_welcome["seq"] == 4
    bob.send({"type": "quit"})
    bob.wait_for("bye")
    alice.close()
    seen = [watcher.next_event() for _ in range(6)]
    assert [(e["type"], e.get("event"), e["seq"]) for e in seen] == [
        ("notice", "joined", 2), ("message", None, 3), ("message", None, 4),
        ("notice", "joined", 5), ("notice", "left", 6), ("notice", "lost", 7),
    ]


def test_restart_on_the_same_store_continues_above_every_seq(start_server: Start,
                                                             connect: Connect,
                                                             tmp_path: Path) -> None:
    """A server stopped and started again on the same store file numbers its events above every
    seq the first one handed out, and welcome says the latest."""
    path = str(tmp_path / "room.db")
    first = start_server(store=path, rate=0)
    watcher, _ = member(connect, first, "watcher")
    watcher.view()
    alice, _ = member(connect, first, "alice")
    for n in range(5):
        alice.send({"type": "say", "text": f"m{n}"})
    last = [watcher.next_event() for _ in range(6)][-1]["seq"]
    first.stop()
    second = start_server(store=path, rate=0)
    carol, welcome = member(connect, second, "carol")
    assert welcome["seq"] == last
    watcher2, _ = member(connect, second, "watcher2")
    watcher2.view()
    carol.send({"type": "say", "text": "after"})
    # carol's joined was last + 1, watcher2's last + 2
    assert watcher2.wait_for("message")["seq"] == last + 3


def test_sigkill_then_restart_never_repeats_a_seq(server_process: Callable[..., ServerProcess],
                                                  tmp_path: Path) -> None:
    """A server killed with SIGKILL in the middle of a broadcast stream and started again on its
    store hands out only seqs above every one a client saw."""
    path = str(tmp_path / "room.db")
    proc = server_process("--store", path, "--rate", "0")
    watcher = Peer(proc.address)
    watcher.register("watcher")
    watcher.view()
    alice = Peer(proc.address)
    alice.register("alice")
    for n in range(200):
        alice.send({"type": "say", "text": f"m{n}"})
    seen = [watcher.next_event()["seq"] for _ in range(150)]
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(5)
    watcher.close()
    alice.close()
    again = server_process("--store", path, "--rate", "0")
    peer = Peer(again.address)
    welcome = peer.register("carol")
    assert welcome["seq"] >= max(seen)
    viewer = Peer(again.address)
    viewer.register("dave")
    viewer.view()
    peer.send({"type": "say", "text": "after"})
    assert viewer.wait_for("message")["seq"] > max(seen)
    peer.close()
    viewer.close()


def test_store_options_parse_and_none_runs(start_server: Start, connect: Connect) -> None:
    """--store, --history-days, --history-limit and --resume-window parse (defaults per SPEC),
    and --store none serves a room numbered from 1."""
    defaults = parse_args([])
    assert (defaults.store, defaults.history_days, defaults.history_limit,
            defaults.resume_window) == ("chat-suite.db", 30.0, 100_000, 120.0)
    given = parse_args(["--store", "none", "--history-days", "2", "--history-limit", "10",
                        "--resume-window", "0"])
    assert (given.store, given.history_days, given.history_limit,
            given.resume_window) == ("none", 2.0, 10, 0.0)
    server = start_server(store="none", rate=0)
    watcher, _ = member(connect, server, "watcher")
    watcher.view()
    member(connect, server, "alice")
    assert watcher.next_event()["seq"] == 2  # the watcher's own joined was 1


def test_store_that_cannot_be_opened_exits_1_with_a_sentence(tmp_path: Path) -> None:
    """A --store path that cannot be a database (a directory) is a clear error and exit 1."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "chat_server.py"), "--host", "127.0.0.1", "--port", "0",
         "--store", str(tmp_path)], check=False, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr.startswith("chat-server: ") and str(tmp_path) in result.stderr


def test_default_store_is_printed_at_start(server_process: Callable[..., ServerProcess],
                                           tmp_path: Path) -> None:
    """The server prints which store it uses when it starts."""
    path = str(tmp_path / "x.db")
    proc = server_process("--store", path)
    assert path in proc.wait_for_line("store: ")


def rst(peer: Peer) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed peer's kernel would."""
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sock.close()
