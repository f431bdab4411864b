"""The durable room over real sockets (SPEC 6): sequence numbers, the store, backlog, resume."""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Peer, ServerProcess, reply, wait_until

from chat_server import ChatServer, parse_args

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
    alice.sync()
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


@pytest.mark.parametrize("option", [
    ["--history-limit", "0"], ["--history-days", "0"], ["--history-days", "nan"],
    ["--resume-window", "-1"], ["--port", "70000"], ["--max-frame", "10"], ["--rate", "x"],
])
def test_numbers_out_of_range_are_a_usage_error(option: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An option's number that cannot work (a history of no events, a negative window, NaN)
    is refused at start with a sentence naming it (exit 2), never a crash later."""
    with pytest.raises(SystemExit) as exited:
        parse_args(option)
    assert exited.value.code == 2
    assert f"argument {option[0]}: " in capsys.readouterr().err


@pytest.mark.parametrize("stored", [False, True], ids=["store-none", "store-file"])
def test_history_limit_bounds_backlog_and_replay_while_running(
        start_server: Start, connect: Connect, tmp_path: Path, stored: bool) -> None:
    """--history-limit 10 holds while the server runs, not only after a restart: backlog gives
    the last 10 events, and a resume asking from before them (what was sent to it is replayed
    from the log) gets a gap, then what the log still has."""
    store = str(tmp_path / "room.db") if stored else "none"
    server = start_server(rate=0, store=store, history_limit=10, resume_window=30)
    alice, welcome = member(connect, server, "alice")  # seq 1: alice joined
    alice.view()
    bob, _ = member(connect, server, "bob")  # 2
    for n in range(30):  # 3 to 32, sent to alice at once
        assert reply(bob, {"type": "say", "text": f"n{n}"}, f"s{n}")["type"] == "ok"
    assert alice.wait_for("message", text="n29")["seq"] == 32
    alice.close()  # 33: alice lost
    wait_until(lambda: [(u.name, u.connected) for u in server.room.users()] == [
        ("alice", False), ("bob", True)], what="alice's session to wait for her")

    def latest() -> list[int] | None:
        page = reply(bob, {"type": "backlog", "limit": 500}, f"b{time.monotonic_ns()}")
        seqs = [e["seq"] for e in page["events"]]
        return seqs if seqs == list(range(24, 34)) and page["more"] is False else None

    wait_until(latest, what="the backlog to hold the last 10 events only")
    peer = Peer(server.address)  # as if alice had read nothing since her welcome
    peer.send({"type": "hello", "session": welcome["session"], "last_seq": welcome["seq"]})
    assert peer.expect("welcome")["resumed"] is True
    gap = peer.expect("notice", event="gap")
    assert (gap["from_seq"], gap["to_seq"], gap["text"]) == (
        1, 23, "Messages 1 to 23 are no longer available.")
    assert [(e["seq"], e["text"]) for e in (peer.next_event() for _ in range(9))] == [
        (seq, f"n{seq - 3}") for seq in range(24, 33)]
    assert peer.sync() == []
    peer.close()


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


def committed_sessions(path: str) -> int:
    """How many sessions the store file holds, read as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT count(*) FROM sessions").fetchone()[0])


def committed_events(path: str) -> int:
    """How many events the store file holds, read as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


def drop(peer: Peer, how: str) -> None:
    """End a connection without quit: a plain close, or a TCP reset."""
    if how == "rst":
        rst(peer)
    else:
        peer.close()


def numbered(peer: Peer, last: int) -> list[dict[str, Any]]:
    """Events up to the message ``m{last}``, skipping pings and pending counts."""
    got: list[dict[str, Any]] = []
    while True:
        event = peer.next_event()
        if event["type"] in ("ping", "pending"):
            continue
        got.append(event)
        if event.get("text") == f"m{last}":
            return got


def alice_dropped(server: Any, connect: Connect) -> tuple[dict[str, Any], Peer]:
    """alice registers, then her connection drops without quit; bob, viewing, has heard her
    lost. Her welcome, and bob."""
    alice, welcome = member(connect, server, "alice")
    bob, _ = member(connect, server, "bob")
    bob.view()
    alice.close()
    bob.wait_for("notice", event="lost")
    return welcome, bob


def resume(server: Any, connect: Connect, session: str, last_seq: int | None,
           **fields: Any) -> tuple[Peer, dict[str, Any]]:
    peer = connect(server)
    hello: dict[str, Any] = {"type": "hello", "session": session, "ref": "r", **fields}
    if last_seq is not None:
        hello["last_seq"] = last_seq
    peer.send(hello)
    return peer, peer.expect("welcome", ref="r")


@pytest.mark.parametrize("how", ["close", "rst"])
@pytest.mark.parametrize("mode", [1, 2])
def test_resume_gets_every_message_exactly_once_in_order(start_server: Start, connect: Connect,
                                                         how: str, mode: int) -> None:
    """A member dropped (closed or reset) while another broadcasts numbered messages resumes with
    its session and last_seq and gets every message after it exactly once, in order: at once in
    mode 2, held until mode 2 in mode 1; the others see lost then back."""
    server = start_server(rate=0, resume_window=30)
    watcher, _ = member(connect, server, "watcher")
    watcher.view()
    alice, welcome = member(connect, server, "alice", title="T", company="C")
    last_seq = welcome["seq"]
    if mode == 2:
        alice.view()
    bob, _ = member(connect, server, "bob")
    for n in range(300):
        bob.send({"type": "say", "text": f"m{n}"})
        if n == 150:
            if mode == 2:  # what alice saw before the drop
                seen = numbered(alice, 100)
                last_seq = seen[-1]["seq"]
            drop(alice, how)
    bob.sync()
    lost = watcher.wait_for("notice", event="lost")
    assert lost["user"]["name"] == "alice"
    users = {u.name: u for u in server.room.users()}
    assert users["alice"].connected is False
    peer, again = resume(server, connect, welcome["session"], last_seq)
    assert again["resumed"] is True and again["session"] == welcome["session"]
    assert (again["name"], again["title"], again["company"], again["mode"]) == (
        "alice", "T", "C", mode)
    assert watcher.wait_for("notice", event="back")["user"]["name"] == "alice"
    first = 101 if mode == 2 else 0
    if mode == 1:
        assert peer.sync() == []  # held while typing
        peer.view()
    got = numbered(peer, 299)
    joined = ["bob joined the chat."] if mode == 1 else []  # held too, while typing
    assert [e["text"] for e in got] == joined + [f"m{n}" for n in range(first, 300)]
    assert all(e["queued"] is True for e in got)
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs)) and seqs[0] > last_seq
    bob.send({"type": "say", "text": "live"})
    live = peer.wait_for("message")
    assert (live["text"], live["queued"]) == ("live", False)


def test_users_lists_a_member_in_its_window_as_not_connected(start_server: Start,
                                                             connect: Connect) -> None:
    """During its resume window a dropped member stays in users with connected false (and in a
    line client's LIST-OK), and its name cannot be taken."""
    server = start_server(rate=0, resume_window=30)
    _, bob = alice_dropped(server, connect)
    bob.send({"type": "users", "ref": "u"})
    listed = bob.wait_for("users", ref="u")["users"]
    assert [(u["name"], u.get("connected", True)) for u in listed] == [
        ("alice", False), ("bob", True)]
    other = connect(server)
    other.send({"type": "hello", "name": "alice"})
    assert other.expect("error")["code"] == "name-taken"
    liner = socket.create_connection(server.address, timeout=5)
    with liner:
        liner.sendall(b"HELLO-FROM carol\nLIST\n")
        data = b""
        while b"LIST-OK" not in data or not data.endswith(b"\n"):
            data += liner.recv(4096)
    assert data.splitlines()[-1] == b"LIST-OK alice,bob,carol"


def test_window_end_removes_the_member_silently(start_server: Start,
                                                connect: Connect) -> None:
    """When the resume window ends the member is removed without a notice, and its session is
    then a plain registration (resumed false)."""
    server = start_server(rate=0, resume_window=0.3)
    welcome, bob = alice_dropped(server, connect)
    wait_until(lambda: [u.name for u in server.room.users()] == ["bob"], what="expiry")
    assert bob.sync() == []  # no notice for the expiry
    _, again = resume(server, connect, welcome["session"], welcome["seq"], name="alice")
    assert again["resumed"] is False and again["name"] == "alice"
    assert again["session"] != welcome["session"]


def test_resume_takes_over_a_half_open_connection(start_server: Start,
                                                  connect: Connect) -> None:
    """A resume for a session whose old connection is still open closes that one without a lost
    notice and carries on, on the new connection, with nothing lost."""
    server = start_server(rate=0, resume_window=30)
    watcher, _ = member(connect, server, "watcher")
    watcher.view()
    alice, welcome = member(connect, server, "alice")
    alice.view()
    watcher.send({"type": "say", "text": "m0"})
    assert alice.wait_for("message")["text"] == "m0"
    watcher.send({"type": "say", "text": "m1"})
    peer, again = resume(server, connect, welcome["session"], welcome["seq"])
    assert again["resumed"] is True and again["id"] != welcome["id"]
    assert alice.closed()
    assert [e["text"] for e in numbered(peer, 1)] == ["m0", "m1"]
    back = watcher.wait_for("notice", event="back")
    assert back["user"]["name"] == "alice"
    assert not any(e.get("event") == "lost" for e in watcher.events)


def test_id_of_a_member_in_its_window_is_not_given_to_another(start_server: Start,
                                                              connect: Connect) -> None:
    """A new connection whose descriptor equals a reserved id gets another id."""
    server = start_server(rate=0, resume_window=30)
    welcome, _ = alice_dropped(server, connect)
    ids = set()
    for n in range(5):  # the freed descriptor is reused at once by one of these
        _, joined = member(connect, server, f"n{n}")
        ids.add(joined["id"])
    assert welcome["id"] not in ids
    assert len({u.id for u in server.room.users()}) == 7


@pytest.mark.parametrize("mode", [1, 2])
def test_sigkill_mid_stream_then_resume_on_the_new_process(
        server_process: Callable[..., ServerProcess], tmp_path: Path, mode: int) -> None:
    """A server killed (SIGKILL) in the middle of a numbered broadcast stream and started again
    on its store lets a member resume: what the log kept comes once and in order after a gap
    notice for what it may not have kept, with no duplicates and nothing before last_seq."""
    path = str(tmp_path / "room.db")
    proc = server_process("--store", path, "--rate", "0", "--resume-window", "30")
    alice = Peer(proc.address)
    welcome = alice.register("alice")
    if mode == 2:
        alice.view()
    bob = Peer(proc.address)
    bob.register("bob")
    # A SIGKILL may cost the last 50 ms: the sessions are committed before the stream starts.
    wait_until(lambda: committed_sessions(path) == 2, what="the sessions committed")
    stop = threading.Event()

    def stream() -> None:
        n = 0
        with contextlib.suppress(OSError):
            while not stop.is_set():
                bob.send({"type": "say", "text": f"m{n}"})
                n += 1
                if n % 50 == 0:
                    time.sleep(0.001)

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    last_seq, first = welcome["seq"], 0
    if mode == 2:
        seen = numbered(alice, 120)
        last_seq, first = seen[-1]["seq"], 121
    # Killed in the middle of the stream, once some of it is committed.
    wait_until(lambda: committed_events(path) > 300, what="events committed")
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(5)
    stop.set()
    sender.join(5)
    alice.close()
    bob.close()
    again = server_process("--store", path, "--rate", "0", "--resume-window", "30")
    peer = Peer(again.address)
    peer.send({"type": "hello", "session": welcome["session"], "last_seq": last_seq})
    resumed = peer.expect("welcome")
    assert resumed["resumed"] is True and resumed["name"] == "alice"
    if mode == 1:
        peer.view()
    events = []
    peer.send({"type": "ping", "ref": "end"})
    while (event := peer.next_event())["type"] != "pong":
        events.append(event)
    (at,) = [i for i, e in enumerate(events) if e.get("event") == "gap"]
    gap = events[at]
    assert gap["from_seq"] > last_seq and "seq" not in gap
    assert gap["text"] == (f"Messages after {gap['from_seq'] - 1} sent in the moment before the "
                           "server was killed may have been lost.")
    rest = [e for e in events if e["type"] == "message"]
    numbers = [int(e["text"][1:]) for e in rest]
    assert numbers == list(range(first, first + len(numbers)))  # in order, no duplicates
    assert len(numbers) > 0 and all(e["seq"] > last_seq for e in rest)
    # In seq order: what the log kept, then the gap above it, then the new run's events.
    assert all(e["seq"] < gap["from_seq"] for e in events[:at])
    assert all(e["seq"] > gap["to_seq"] for e in events[at + 1:])
    peer.close()


def test_sessions_survive_a_clean_restart(start_server: Start, connect: Connect,
                                          tmp_path: Path) -> None:
    """With a store, a member of a server that stopped resumes on the next one, window counted
    from the restart, and gets what it had not seen, without a gap after a clean stop."""
    path = str(tmp_path / "room.db")
    first = start_server(store=path, rate=0, resume_window=30)
    alice, welcome = member(connect, first, "alice")
    alice.view()
    bob, _ = member(connect, first, "bob")
    bob.send({"type": "say", "text": "m0"})
    bob.send({"type": "say", "text": "m1"})
    bob.sync()
    first.stop()
    second = start_server(store=path, rate=0, resume_window=30)
    assert sorted((u.name, u.connected) for u in second.room.users()) == [
        ("alice", False), ("bob", False)]
    peer, again = resume(second, connect, welcome["session"], welcome["seq"])
    assert again["resumed"] is True and again["mode"] == 2
    got = numbered(peer, 1)
    assert [e.get("text") for e in got] == ["bob joined the chat.", "m0", "m1"]


def test_a_restart_keeps_the_members_in_registration_order(
        server_process: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """Sessions saved again (a drop, a mode or status change) keep their place: after a SIGKILL
    and a restart the restored members are listed in the order they registered (SPEC 1.2)."""
    path = str(tmp_path / "room.db")
    first = server_process("--store", path, "--rate", "0", "--resume-window", "30")
    peers = {name: Peer(first.address) for name in ("alice", "bob", "carol", "dave")}
    for name, peer in peers.items():
        peer.register(name)
    peers["alice"].close()
    peers["carol"].view()
    assert reply(peers["bob"], {"type": "status", "status": "unavailable"}, "s")["type"] == (
        "status")

    def saved_again() -> bool:
        with contextlib.closing(sqlite3.connect(path)) as db:
            rows = dict(db.execute("SELECT name, expires_at FROM sessions").fetchall())
            modes = dict(db.execute("SELECT name, mode FROM sessions").fetchall())
        return (len(rows) == 4 and rows["alice"] < time.time() + 3600 and modes["carol"] == 2)

    wait_until(saved_again, what="the drop and the mode change to be committed")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    second = server_process("--store", path, "--rate", "0", "--resume-window", "30")
    peer = Peer(second.address)
    peer.register("eve")
    listed = reply(peer, {"type": "users"}, "u")["users"]
    assert [(u["name"], u.get("connected", True)) for u in listed] == [
        ("alice", False), ("bob", False), ("carol", False), ("dave", False), ("eve", True)]
    for each in (*peers.values(), peer):
        each.close()


def test_a_restored_session_keeps_its_id_reserved(start_server: Start, connect: Connect,
                                                   tmp_path: Path) -> None:
    """After a restart the members waiting to resume keep their ids, and no new connection is
    given one of them (SPEC 6.4): a dm to alice's id is held for alice, whoever comes."""
    path = str(tmp_path / "room.db")
    first = start_server(store=path, rate=0, resume_window=30)
    _, welcome = member(connect, first, "alice")
    alice_id = welcome["id"]
    first.stop()
    second = start_server(store=path, rate=0, resume_window=30)
    assert [(u.name, u.id) for u in second.room.users()] == [("alice", alice_id)]
    newcomers = [member(connect, second, f"new{n}") for n in range(12)]
    assert alice_id not in {welcome["id"] for _, welcome in newcomers}
    sender = newcomers[0][0]
    sent = reply(sender, {"type": "dm", "to": alice_id, "text": "for alice"}, "d")
    assert (sent["type"], sent["delivered"], sent["queued"]) == ("ok", 0, 1)
    peer, again = resume(second, connect, welcome["session"], welcome["seq"])
    assert again["resumed"] is True
    peer.view()
    assert peer.wait_for("message")["text"] == "for alice"
    assert all(e.get("text") != "for alice" for p, _ in newcomers for e in p.sync())


def test_a_member_cut_off_for_its_output_resumes_with_nothing_lost(start_server: Start,
                                                                   connect: Connect) -> None:
    """A viewing member that stops reading and is cut off at the output limit keeps its session:
    resumed, it gets every message after its last_seq once and in order, the unsent ones too."""
    server = start_server(rate=0, resume_window=30, output_limit=64 * 1024)
    watcher, _ = member(connect, server, "watcher")
    watcher.view()
    alice, welcome = member(connect, server, "alice")
    alice.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    alice.view()
    bob, _ = member(connect, server, "bob")
    text = "y" * 1000
    sent = 0
    while not any(e.get("event") == "lost" for e in watcher.sync()):
        for _ in range(50):
            bob.send({"type": "say", "text": f"m{sent}{text}"})
            sent += 1
        bob.sync()
        assert sent < 20_000, "never cut off"
    assert [e["user"]["name"] for e in watcher.events if e.get("event") == "lost"] == ["alice"]
    alice.close()
    peer, again = resume(server, connect, welcome["session"], welcome["seq"])
    assert again["resumed"] is True
    names = []
    while len(names) < sent:
        event = peer.next_event()
        if event["type"] == "message":
            names.append(event["text"][: -len(text)])
    assert names == [f"m{n}" for n in range(sent)]
