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

import pytest

from chat_server import ChatServer, parse_args
from tests.conftest import ROOT, Peer, ServerProcess, wait_until

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


def backlog(peer: Peer, **fields: Any) -> dict[str, Any]:
    peer.send({"type": "backlog", "ref": "b", **fields})
    return peer.wait_for("backlog", ref="b")


def texts(answer: dict[str, Any]) -> list[str]:
    return [e.get("text") if e["type"] == "message" else e["event"] for e in answer["events"]]


@pytest.mark.parametrize("store", ["none", "file"])
def test_backlog_latest_before_after_limit_and_more(start_server: Start, connect: Connect,
                                                    tmp_path: Path, store: str) -> None:
    """backlog gives the latest events oldest first, pages with before and after, stops at
    limit and says whether more exist that way (with --store none and with a store file)."""
    server = start_server(store="none" if store == "none" else str(tmp_path / "b.db"), rate=0)
    alice, _ = member(connect, server, "alice")
    for n in range(8):
        alice.send({"type": "say", "text": f"m{n}"})
    alice.sync()
    late, welcome = member(connect, server, "late")
    latest = backlog(late, limit=3)
    assert texts(latest) == ["m6", "m7", "joined"] and latest["more"] is True
    assert latest["ref"] == "b"
    seqs = [e["seq"] for e in latest["events"]]
    assert seqs == sorted(seqs) and seqs[-1] == welcome["seq"] + 1  # late's own joined
    older = backlog(late, before=seqs[0], limit=5)
    assert texts(older) == ["m1", "m2", "m3", "m4", "m5"] and older["more"] is True
    oldest = backlog(late, before=older["events"][0]["seq"])
    assert texts(oldest) == ["joined", "m0"] and oldest["more"] is False
    newer = backlog(late, after=seqs[0])
    assert texts(newer) == ["m7", "joined"] and newer["more"] is False
    assert all(e["queued"] is False for e in newer["events"])
    late.send({"type": "backlog", "limit": 501, "ref": 4})
    assert late.wait_for("error", ref=4)["code"] == "bad-request"


@pytest.mark.parametrize("store", ["none", "file"])
def test_backlog_direct_messages_only_to_their_two_sessions(start_server: Start,
                                                            connect: Connect, tmp_path: Path,
                                                            store: str) -> None:
    """A direct message is in the backlog of its sender and its recipient only: not of a third
    member, and not of a newcomer who takes the recipient's name after it left."""
    server = start_server(store="none" if store == "none" else str(tmp_path / "p.db"), rate=0)
    alice, _ = member(connect, server, "alice")
    bob, _ = member(connect, server, "bob")
    carol, _ = member(connect, server, "carol")
    alice.send({"type": "dm", "to": "bob", "text": "secret"})
    alice.send({"type": "say", "text": "public"})
    alice.sync()
    assert "secret" in texts(backlog(alice))
    assert "secret" in texts(backlog(bob))
    assert "secret" not in texts(backlog(carol)) and "public" in texts(backlog(carol))
    bob.send({"type": "quit"})
    bob.wait_for("bye")
    impostor = connect(server)
    impostor.register("bob")  # the name is free once bob has his bye
    answer = backlog(impostor, limit=500)
    assert "public" in texts(answer) and "secret" not in texts(answer)
    assert b"secret" not in b"".join(e.get("text", "").encode() for e in answer["events"])
