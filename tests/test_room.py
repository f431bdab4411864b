"""The room's delivery decisions, without sockets: fake outboxes record what each member gets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatsuite.server.members import HELD_OVERHEAD, Dialect, Member
from chatsuite.server.room import Room
from modes import Mode
from protocol import ErrorCode, Refusal, User


class RecordingOutbox:
    """Collects pushed bytes, as a connection's outbox would before the writer sends them."""

    def __init__(self) -> None:
        self.data = b""

    def push(self, data: bytes) -> None:
        self.data += data

    def frames(self) -> list[Any]:
        """Native frames decoded; taken, so the next call sees only newer ones."""
        frames = [json.loads(f) for f in self.data.split(b"\0")[:-1]]
        self.data = b""
        return frames

    def take(self) -> bytes:
        data, self.data = self.data, b""
        return data


def member(room: Room, id_: int, name: str | None, dialect: Dialect = Dialect.NATIVE) -> Member:
    new = Member(id_, RecordingOutbox(), dialect)
    if dialect is not Dialect.NATIVE:
        new.mode = Mode.VIEWING
    room.register(new, name)
    return new


def outbox(m: Member) -> RecordingOutbox:
    assert isinstance(m.outbox, RecordingOutbox)
    return m.outbox


def test_register_welcomes_and_announces_to_others_only() -> None:
    """A new member gets its welcome; members already there get a held joined notice."""
    room = Room()
    alice = member(room, 5, "alice")
    assert outbox(alice).frames()[0]["online"] == 1
    bob = member(room, 6, "bob")
    welcome = outbox(bob).frames()
    assert [f["type"] for f in welcome] == ["welcome"]
    assert welcome[0]["online"] == 2
    assert len(alice.hold) == 1 and outbox(alice).frames() == []


def test_name_rules_and_taken_names() -> None:
    """Bad names, names taken in another case, and a second registration are refused."""
    room = Room()
    alice = member(room, 5, "alice")
    for name, code in [("ALICE", ErrorCode.NAME_TAKEN), ("", ErrorCode.BAD_NAME),
                       ("123", ErrorCode.BAD_NAME), ("All", ErrorCode.BAD_NAME),
                       ("a" * 33, ErrorCode.BAD_NAME), ("sp ace", ErrorCode.BAD_NAME),
                       ("-", ErrorCode.BAD_NAME), ("....", ErrorCode.BAD_NAME)]:
        with pytest.raises(Refusal) as failure:
            room.register(Member(9, RecordingOutbox(), Dialect.NATIVE), name)
        assert failure.value.code is code, name
    with pytest.raises(Refusal) as failure:
        room.register(alice, "again")
    assert failure.value.code is ErrorCode.ALREADY_REGISTERED
    assert [u.name for u in room.users()] == ["alice"]


def test_automatic_names_count_up_and_skip_taken_ones() -> None:
    """Members without a name get user1, user2, ..., skipping a name someone chose."""
    room = Room()
    member(room, 1, "user2")
    assert member(room, 2, None).name == "user1"
    assert member(room, 3, None).name == "user3"


def test_server_full_changes_nothing() -> None:
    """Past max_clients a registration is refused with server-full and nobody is told."""
    room = Room(max_clients=1)
    alice = member(room, 1, "alice")
    with pytest.raises(Refusal) as failure:
        room.register(Member(2, RecordingOutbox(), Dialect.NATIVE), "bob")
    assert failure.value.code is ErrorCode.SERVER_FULL
    assert len(alice.hold) == 0


def test_broadcast_counts_live_and_held_recipients_per_dialect() -> None:
    """A broadcast is live for viewers, line and plain members, held for typists."""
    room = Room()
    sender = member(room, 1, "alice")
    viewer = member(room, 2, "bob")
    room.set_mode(viewer, Mode.VIEWING, b"")
    typist = member(room, 3, "carol")
    liner = member(room, 4, "dave", Dialect.LINE)
    plain = member(room, 5, None, Dialect.PLAIN)
    for m in (sender, viewer, typist, liner, plain):
        outbox(m).take()
    delivery = room.broadcast(sender, ["hi\nthere", "again"])
    assert (delivery.delivered, delivery.queued) == (3, 1)
    assert [f["text"] for f in outbox(viewer).frames()] == ["hi\nthere", "again"]
    assert outbox(liner).take() == b"DELIVERY alice hi there\nDELIVERY alice again\n"
    assert outbox(plain).take() == b"alice: hi there\0alice: again\0"
    assert outbox(sender).take() == b""
    assert len(typist.hold) == 2 + 2  # two joined notices, then the two messages


def test_flush_sends_reply_then_dropped_notice_then_held_in_order() -> None:
    """Entering viewing pushes the reply, a dropped notice, then the newest held events in order."""
    room = Room(pending_limit=3)
    sender = member(room, 1, "alice")
    typist = member(room, 2, "bob")
    outbox(typist).take()
    room.broadcast(sender, [f"m{i}" for i in range(5)])
    room.set_mode(typist, Mode.VIEWING, b'{"type":"mode","mode":2}\0')
    frames = outbox(typist).frames()
    assert frames[0] == {"type": "mode", "mode": 2}
    assert frames[1]["event"] == "dropped" and frames[1]["count"] == 2
    assert frames[1]["queued"] is True
    assert [(f["text"], f["queued"]) for f in frames[2:]] == [
        ("m2", True), ("m3", True), ("m4", True)]
    room.broadcast(sender, ["live"])
    assert [(f["text"], f["queued"]) for f in outbox(typist).frames()] == [("live", False)]


def test_direct_message_by_name_id_and_errors() -> None:
    """A dm finds its recipient by name in any case or by id, and refuses missing or unavailable
    users."""
    room = Room()
    alice = member(room, 7, "alice")
    bob = member(room, 8, "bob")
    room.set_mode(bob, Mode.VIEWING, b"")
    outbox(bob).take()
    for target in ("BOB", 8, "8"):
        recipient, delivery = room.direct(alice, target, "psst")
        assert recipient is bob and (delivery.delivered, delivery.queued) == (1, 0)
    frames = outbox(bob).frames()
    assert [f["to"] for f in frames] == [{"id": 8, "name": "bob"}] * 3
    assert frames[0]["from"]["name"] == "alice"
    with pytest.raises(Refusal) as failure:
        room.direct(alice, "client4", "x", ref=3)
    assert (failure.value.code, failure.value.message, failure.value.ref) == (
        ErrorCode.NO_SUCH_USER, 'User "client4" is not connected to the server.', 3)
    assert room.set_status(bob, None) == "unavailable"
    with pytest.raises(Refusal) as failure:
        room.direct(alice, "bob", "x")
    assert failure.value.code is ErrorCode.UNAVAILABLE
    assert outbox(bob).take() == b""


def test_leave_announces_left_or_lost_once() -> None:
    """Leaving tells the others once: left for a quit, lost otherwise; a second leave does
    nothing."""
    room = Room()
    alice = member(room, 1, "alice")
    bob = member(room, 2, "bob")
    carol = member(room, 3, "carol")
    room.set_mode(carol, Mode.VIEWING, b"")
    outbox(carol).take()
    room.leave(alice, quitting=True)
    room.leave(alice, quitting=False)
    room.leave(bob, quitting=False)
    texts = [(f["event"], f["text"]) for f in outbox(carol).frames()]
    assert texts == [("left", "alice is quitting."), ("lost", "bob has lost its connection.")]
    assert [u.name for u in room.users()] == ["carol"]
    assert member(room, 4, "alice").name == "alice"  # the name is free again


def test_user_objects_follow_status_and_mode_changes() -> None:
    """users() reflects each member's current status and mode, in registration order."""
    room = Room()
    alice = member(room, 1, "alice")
    bob = member(room, 2, "bob")
    room.set_status(alice, "unavailable")
    room.set_mode(bob, Mode.VIEWING, b"")
    assert room.users() == (
        User(1, "alice", None, None, "unavailable", 1), User(2, "bob", None, None, "available", 2))


def test_direct_by_id_with_another_name_is_no_such_user_and_delivers_nothing() -> None:
    """A dm by id that names someone else (the id was reused) is no-such-user; nothing is sent."""
    room = Room()
    sender = member(room, 1, "bob")
    mallory = member(room, 10, "mallory")
    room.set_mode(mallory, Mode.VIEWING, b"")
    outbox(mallory).take()
    with pytest.raises(Refusal) as failure:
        room.direct(sender, 10, "for alice", "r", name="alice")
    assert (failure.value.code, failure.value.message, failure.value.ref) == (
        ErrorCode.NO_SUCH_USER, 'User "alice" is not connected to the server.', "r")
    assert outbox(mallory).take() == b"" and len(mallory.hold) == 0
    recipient, _ = room.direct(sender, "10", "for mallory", name="MALLORY")
    assert recipient is mallory
    assert [f["text"] for f in outbox(mallory).frames()] == ["for mallory"]


def test_a_held_event_keeps_only_its_native_frame_and_counts_what_it_keeps() -> None:
    """Once delivered, a broadcast held for a typing member keeps neither its line nor its plain
    rendering, and the hold's byte count is the frame plus its bookkeeping, not less."""
    room = Room()
    typist = member(room, 5, "typist")
    line = member(room, 6, "liner", Dialect.LINE)
    plain = member(room, 7, None, Dialect.PLAIN)
    typist.hold.flush()
    room.broadcast(plain, ["hello"])
    assert outbox(line).take().endswith(b"hello\n")  # the line client got its rendering live
    _, held = typist.hold.flush()
    assert [e.seq for e in held] == [4]  # after three joined notices
    event = held[0]
    assert (event.line, event.plain) == (None, None)
    room.broadcast(plain, ["again"])
    assert typist.hold.size == len(typist.hold.peek().__next__().live) + HELD_OVERHEAD
    assert event.held.endswith(b'"queued":true}\0') and not hasattr(event, "_held")


def test_a_broadcast_held_by_many_typists_is_kept_once() -> None:
    """500 typing members holding the same broadcasts share one copy of each (the room's
    stream): no per-member entry, and the stream forgets them once every hold is flushed."""
    room = Room()
    typists = [member(room, 10 + n, f"t{n}") for n in range(500)]
    sender = member(room, 9, "sender")
    sender.mode = Mode.VIEWING
    for typist in typists:
        typist.hold.flush()  # the joined notices
    room._trim_stream()
    room.broadcast(sender, ["one", "two", "three"])
    assert len(room.stream.events) == 3
    assert all(len(t.hold) == 3 and not t.hold.private for t in typists)
    flushed = [t.hold.flush()[1] for t in typists]
    assert all([e.seq for e in held] == [e.seq for e in flushed[0]] for held in flushed)
    assert [json.loads(e.live[:-1])["text"] for e in flushed[0]] == ["one", "two", "three"]
    room._trim_stream()
    assert len(room.stream.events) == 0


def test_a_hold_merges_its_own_events_with_the_stream_and_drops_the_oldest() -> None:
    """A typist's direct messages and the broadcasts come out in delivery order, its own
    broadcasts are never held for it, and past the limit the oldest of either kind goes."""
    room = Room(pending_limit=3)
    typist = member(room, 5, "typist")
    other = member(room, 6, "other")
    typist.hold.flush()
    room.broadcast(other, ["b1"])
    room.direct(other, "typist", "d1")
    room.broadcast(typist, ["mine"])  # not for itself
    room.broadcast(other, ["b2"])
    texts = [json.loads(e.live[:-1])["text"] for e in typist.hold.peek()]
    assert texts == ["b1", "d1", "b2"] and len(typist.hold) == 3
    room.direct(other, "typist", "d2")  # over the limit: b1 goes
    dropped, held = typist.hold.flush()
    assert dropped == 1
    assert [json.loads(e.live[:-1])["text"] for e in held] == ["d1", "b2", "d2"]
