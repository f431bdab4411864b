"""The durable room with accounts, moderation, pending and cut-off clients (SPEC 1.4, 1.5, 6, 7):
the behaviours where the two meet, over real sockets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Peer, notice_of, reply, wait_until

from chat_server import ChatServer

Start = Callable[..., ChatServer]
Connect = Callable[..., Peer]
GOOD = "correct horse battery"


def resume(server: ChatServer, session: str, last_seq: int | None = None) -> tuple[Peer,
                                                                                   dict[str, Any]]:
    """A new connection sending ``hello`` with ``session`` (no name, no password): its welcome."""
    peer = Peer(server.address)
    hello: dict[str, Any] = {"type": "hello", "session": session, "ref": "r"}
    if last_seq is not None:
        hello["last_seq"] = last_seq
    peer.send(hello)
    return peer, peer.expect("welcome", ref="r")


def teacher_account(server: ChatServer, **hello: Any) -> dict[str, Any]:
    """Make ``teacher`` an account, leave, and log in again with its password: the welcome."""
    first = Peer(server.address)
    first.register("teacher", **hello)
    assert reply(first, {"type": "register", "password": GOOD}, "reg")["type"] == "ok"
    first.send({"type": "quit"})
    first.wait_for("bye")
    first.close()
    wait_until(lambda: server.room.online == 0, what="teacher to leave")
    return {}


def test_a_resume_needs_no_password_and_keeps_account_and_admin(start_server: Start) -> None:
    """A hello that resumes a session needs neither the server password nor the account's, and
    the resumed member is still logged in to its account and still an admin (it may kick)."""
    server = start_server(rate=0, resume_window=30, server_password="class key",
                          admins=("teacher",))
    teacher_account(server, server_password="class key")
    teacher = Peer(server.address)
    welcome = teacher.register("teacher", server_password="class key", password=GOOD)
    assert (welcome["admin"], welcome["account"]) == (True, True)
    teacher.close()
    wait_until(lambda: [u.connected for u in server.room.users()] == [False],
               what="the teacher's session to wait for it")
    peer, again = resume(server, welcome["session"], welcome["seq"])
    assert (again["resumed"], again["name"], again["admin"], again["account"]) == (
        True, "teacher", True, True)
    student = Peer(server.address)
    student.register("sam", server_password="class key")
    assert reply(peer, {"type": "kick", "to": "sam"}, "k")["type"] == "ok"
    assert student.closed()
    student.close()
    peer.close()


def test_a_restored_session_keeps_its_account_and_admin(start_server: Start,
                                                        tmp_path: Path) -> None:
    """With a store, a session restored by the next server resumes logged in to its account
    and, for an --admin account, as an admin."""
    path = str(tmp_path / "room.db")
    first = start_server(rate=0, store=path, resume_window=30, admins=("teacher",))
    teacher_account(first)
    teacher = Peer(first.address)
    welcome = teacher.register("teacher", password=GOOD)
    assert welcome["admin"] is True
    first.stop()
    teacher.close()
    second = start_server(rate=0, store=path, resume_window=30, admins=("teacher",))
    peer, again = resume(second, welcome["session"])
    assert (again["resumed"], again["admin"], again["account"]) == (True, True, True)
    peer.close()


def test_kick_and_ban_end_the_session(start_server: Start) -> None:
    """A kicked or banned member's session ends (SPEC 7.3): it is not listed in a resume window,
    nobody gets lost for it, and its token resumes nothing."""
    server = start_server(rate=0, resume_window=30, admins=("teacher",))
    teacher_account(server)
    teacher = Peer(server.address)
    teacher.register("teacher", password=GOOD)
    teacher.view()
    for kind in ("kick", "ban"):
        student = Peer(server.address)
        welcome = student.register(f"sam_{kind}")
        teacher.wait_for("notice", event="joined")
        assert reply(teacher, {"type": kind, "to": f"sam_{kind}"}, kind)["type"] == "ok"
        assert student.closed()
        student.close()
        wait_until(lambda: [u.name for u in server.room.users()] == ["teacher"],
                   what=f"the student to be gone: {server.room.users()}")
        if kind == "kick":
            peer, again = resume(server, welcome["session"], welcome["seq"])
            assert again["resumed"] is False and again["name"] != "sam_kick"
            peer.send({"type": "quit"})
            peer.wait_for("bye")
            peer.close()
            teacher.wait_for("notice", event="left")
    teacher.sync()
    assert [e for e in teacher.events if e.get("event") == "lost"] == []
    teacher.close()


def test_moderation_notices_are_numbered_room_events_in_the_backlog(start_server: Start) -> None:
    """A muted notice carries the next seq (SPEC 6.1) and is logged: backlog returns it."""
    server = start_server(rate=0, admins=("teacher",))
    teacher_account(server)
    teacher = Peer(server.address)
    teacher.register("teacher", password=GOOD)
    teacher.view()
    student = Peer(server.address)
    student.register("sam")
    joined = teacher.wait_for("notice", event="joined")
    assert reply(teacher, {"type": "mute", "to": "sam"}, "m")["type"] == "ok"
    muted = notice_of(teacher, "muted")
    assert muted["seq"] == joined["seq"] + 1
    page = reply(teacher, {"type": "backlog", "limit": 1}, "b")
    assert [(e["event"], e["seq"], e["by"]) for e in page["events"]] == [
        ("muted", muted["seq"], "teacher")]
    student.close()
    teacher.close()


def test_a_typist_resumed_with_held_events_is_told_their_count(start_server: Start) -> None:
    """A typing member that resumes with events held for it gets a pending count of exactly
    what it holds (the replay), and its flush brings that many."""
    server = start_server(rate=0, resume_window=30, pending_interval=0.05)
    alice = Peer(server.address)
    welcome = alice.register("alice")
    alice.close()
    wait_until(lambda: [u.connected for u in server.room.users()] == [False],
               what="alice's session to wait for her")
    bob = Peer(server.address)
    bob.register("bob")
    for n in range(5):
        bob.send({"type": "say", "text": f"m{n}"})
    bob.sync()
    peer, again = resume(server, welcome["session"], welcome["seq"])
    assert again["resumed"] is True and again["mode"] == 1
    peer.keep_pending = True
    assert peer.wait_for("pending") == {"type": "pending", "count": 6}  # bob joined, m0-m4
    peer.send({"type": "mode", "mode": 2})
    got = [peer.next_event() for _ in range(7)]
    assert [e["type"] for e in got] == ["mode", "notice"] + ["message"] * 5
    peer.close()
    bob.close()


@pytest.mark.parametrize("window", [30.0, 0.0])
def test_a_cut_off_native_member_stays_reserved_for_its_window(start_server: Start,
                                                               window: float) -> None:
    """A native member cut off (Writer.abort) with a resume window stays listed, not connected,
    its name reserved (SPEC 1.5, 6.4); without one it leaves at once and its name is free."""
    server = start_server(rate=0, resume_window=window)
    alice = Peer(server.address)
    alice.register("alice")
    with server.room.lock:
        conns = [c for c in server._connections if c.member is not None]
        server.writer.abort(conns[0])
    assert alice.closed()
    listed = [("alice", False)] if window else []
    wait_until(lambda: [(u.name, u.connected) for u in server.room.users()] == listed,
               what="alice to be cut off")
    other = Peer(server.address)
    other.send({"type": "hello", "name": "alice", "ref": "t"})
    answer = other.next_event()
    if window:
        assert (answer["type"], answer["code"]) == ("error", "name-taken")
    else:
        assert (answer["type"], answer["name"]) == ("welcome", "alice")
    other.close()
    alice.close()


def test_an_account_logging_in_again_ends_its_own_reserved_session(start_server: Start) -> None:
    """teacher's client crashed (its session waits in the resume window): logging in with the
    account's password takes the name at once and ends that session silently; without the
    password, or for a name that is no account, the name stays reserved (name-taken)."""
    server = start_server(rate=0, resume_window=120)
    teacher_account(server)
    crashed = Peer(server.address)
    old = crashed.register("teacher", password=GOOD)
    plain = Peer(server.address)
    plain.register("alice")
    watcher = Peer(server.address)
    watcher.register("sam")
    watcher.view()
    for peer in (crashed, plain):
        peer.close()
    wait_until(lambda: [(u.name, u.connected) for u in server.room.users()] == [
        ("teacher", False), ("alice", False), ("sam", True)], what="both to be cut off")
    assert sorted(watcher.wait_for("notice", event="lost")["user"]["name"] for _ in range(2)) == [
        "alice", "teacher"]
    for name, code in (("teacher", "password-required"), ("alice", "name-taken")):
        other = Peer(server.address)
        other.send({"type": "hello", "name": name, "ref": "t"})
        assert other.next_event()["code"] == code
        other.close()
    again = Peer(server.address)
    welcome = again.register("teacher", password=GOOD)
    assert (welcome["name"], welcome["resumed"], welcome["account"]) == ("teacher", False, True)
    assert [(u.name, u.connected) for u in server.room.users()] == [
        ("alice", False), ("sam", True), ("teacher", True)]
    assert watcher.wait_for("notice")["event"] == "joined"  # no second "lost", no "left"
    stale, answer = resume(server, old["session"])
    assert (answer["resumed"], answer["name"]) == (False, "user1")  # that session is over
    for peer in (stale, again, watcher):
        peer.close()


def test_backlog_gives_an_account_its_direct_messages_from_an_earlier_session(
        start_server: Start) -> None:
    """SPEC 6.3: logged in again (a new session) to its account, a member's backlog has the
    direct messages that account sent and received before; a member without it gets none."""
    server = start_server(rate=0)
    alice = Peer(server.address)
    alice.register("alice")
    assert reply(alice, {"type": "register", "password": GOOD}, "reg")["type"] == "ok"
    alice.view()
    bob = Peer(server.address)
    bob.register("bob")
    bob.view()
    alice.send({"type": "dm", "to": "bob", "text": "secret to bob"})
    bob.wait_for("message", text="secret to bob")
    bob.send({"type": "dm", "to": "alice", "text": "secret to alice"})
    alice.wait_for("message", text="secret to alice")
    alice.send({"type": "quit"})
    alice.wait_for("bye")
    alice.close()
    wait_until(lambda: server.room.names() == ["bob"], what="alice to leave")
    again = Peer(server.address)
    again.register("alice", password=GOOD)
    page = reply(again, {"type": "backlog"}, "b")
    assert [e["text"] for e in page["events"] if e["type"] == "message"] == [
        "secret to bob", "secret to alice"]
    carol = Peer(server.address)
    carol.register("carol")
    page = reply(carol, {"type": "backlog"}, "c")
    assert [e for e in page["events"] if e["type"] == "message"] == []
    for peer in (again, bob, carol):
        peer.close()
