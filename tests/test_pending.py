"""The ``pending`` event (SPEC 1.3, 1.4): counts of held events for a typing client, at most one
an interval: the ticker's decisions with a fake clock, then the server over real sockets."""

from __future__ import annotations

import itertools
import time
from typing import Any

from conftest import Peer
from test_room import member, outbox

from chat_server import ChatServer
from chatsuite.server.members import Dialect, Member
from chatsuite.server.pending import PendingTicker
from chatsuite.server.room import Room
from modes import Mode


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ticking_room(**options: Any) -> tuple[Room, PendingTicker, FakeClock]:
    """A room whose ticker is driven by hand (``tick()``, under the lock) and a fake clock."""
    room = Room(**options)
    clock = FakeClock()
    ticker = PendingTicker(room.lock, 1.0, clock)
    room.pending = ticker
    return room, ticker, clock


def tick(room: Room, ticker: PendingTicker) -> float | None:
    with room.lock:
        return ticker.tick()


def pendings(m: Member) -> list[int]:
    """The counts of the ``pending`` events pushed to ``m`` since last asked (others dropped)."""
    return [f["count"] for f in outbox(m).frames() if f["type"] == "pending"]


def test_first_count_at_once_then_at_most_one_a_second() -> None:
    """A typist held 1,000 broadcasts within a second gets the first count at once, then the
    latest count one second after it, and nothing in between."""
    room, ticker, clock = ticking_room()
    typist = member(room, 5, "typist")
    talker = member(room, 6, "talker")
    assert tick(room, ticker) is None
    assert pendings(typist) == [1]  # the talker's joined notice, told at once
    clock.now += 1.0
    room.broadcast(talker, ["one"])
    assert tick(room, ticker) is None
    assert pendings(typist) == [2]
    for i in range(1000):
        clock.now += 0.0005
        room.broadcast(talker, [f"m{i}"])
        wait = tick(room, ticker)
        if i == 0:
            assert wait is not None and 0 < wait <= 1.0
    assert pendings(typist) == []
    clock.now += 1.0
    assert tick(room, ticker) is None
    assert pendings(typist) == [1002]
    assert tick(room, ticker) is None and pendings(typist) == []


def test_count_is_told_only_when_it_changed() -> None:
    """An event noted but with the same count as last told (held at the bound) sends nothing;
    the count after a dropped overflow is the number held, the bound."""
    room, ticker, clock = ticking_room(pending_limit=3)
    typist = member(room, 5, "typist")
    talker = member(room, 6, "talker")
    tick(room, ticker)
    assert pendings(typist) == [1]
    room.broadcast(talker, ["a", "b", "c", "d", "e"])
    clock.now += 1.0
    tick(room, ticker)
    assert pendings(typist) == [3]
    room.broadcast(talker, ["f"])
    clock.now += 1.0
    assert tick(room, ticker) is None
    assert pendings(typist) == []  # still 3 held: nothing changed for the typist


def test_no_pending_in_mode_2_and_the_flush_counts_as_zero() -> None:
    """A viewer gets no pending; after a flush the typist's count starts again from 0, so one
    held event is told as 1 even when 1 was the last count told before the flush."""
    room, ticker, clock = ticking_room()
    viewer = member(room, 4, "viewer")
    room.set_mode(viewer, Mode.VIEWING, b"")
    typist = member(room, 5, "typist")
    talker = member(room, 6, "talker")
    tick(room, ticker)
    assert pendings(typist) == [1] and pendings(viewer) == []
    room.set_mode(typist, Mode.VIEWING, b"")
    room.set_mode(typist, Mode.TYPING, b"")
    room.broadcast(talker, ["x"])
    clock.now += 1.0
    tick(room, ticker)
    assert pendings(typist) == [1]
    assert pendings(viewer) == []


def test_members_that_left_or_are_not_native_are_never_told() -> None:
    """A typist that left before its count was due, and a line member, get nothing."""
    room, ticker, clock = ticking_room()
    line = member(room, 3, "liner", Dialect.LINE)
    typist = member(room, 5, "typist")
    talker = member(room, 6, "talker")
    tick(room, ticker)
    assert pendings(typist) == [1]
    room.broadcast(talker, ["x"])
    room.leave(typist, quitting=True)
    clock.now += 1.0
    assert tick(room, ticker) is None
    assert pendings(typist) == []
    assert b"pending" not in outbox(line).take()


# -- over sockets ---------------------------------------------------------------------------


def registered(server: ChatServer, name: str, *, view: bool = False) -> Peer:
    peer = Peer(server.address)
    peer.keep_pending = True
    peer.register(name)
    if view:
        peer.view()
    return peer


def test_server_sends_pending_counts_at_most_once_an_interval(start_server: Any) -> None:
    """Over a socket, a typist gets the first count at once and then one count per interval
    however many broadcasts arrive, each the exact number held; a viewer gets none."""
    server = start_server(rate=0, pending_interval=0.5)
    typist = registered(server, "typist")
    viewer = registered(server, "viewer", view=True)
    talker = registered(server, "talker")
    try:
        assert typist.wait_for("pending") == {"type": "pending", "count": 1}  # viewer joined
        told = time.monotonic()
        talker.send_raw(b"".join(
            b'{"type":"say","text":"m%d","ref":%d}\0' % (i, i) for i in range(200)))
        talker.wait_for("ok", ref=199)
        counts, times = [], [told]
        while not counts or counts[-1] != 202:  # the talker's joined notice and 200 says
            counts.append(typist.wait_for("pending")["count"])
            times.append(time.monotonic())
        assert counts == sorted(set(counts)), counts
        # Never two within the interval (0.5 s); the slack is for a busy machine, where a count
        # may reach the test late and the next one on time.
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert min(gaps) > 0.3, gaps
        assert len(counts) <= (times[-1] - times[0] + 0.2) / 0.5, (counts, gaps)
        assert [e for e in typist.sync() if e["type"] == "pending"] == []
        typist.send({"type": "mode", "mode": 2, "ref": "v"})
        flushed = []
        while (event := typist.next_event())["type"] != "mode":
            flushed.append(event)
        assert flushed == []  # the reply first, then the flush
        held = [typist.next_event() for _ in range(202)]
        assert [e["queued"] for e in held] == [True] * 202
        assert [e for e in viewer.sync() if e["type"] == "pending"] == []
        assert [e for e in viewer.events if e["type"] == "pending"] == []
    finally:
        for peer in (typist, viewer, talker):
            peer.close()


def test_server_pending_count_after_a_dropped_overflow_is_the_held_count(
    start_server: Any,
) -> None:
    """Past --pending-limit the oldest are dropped, and the count told is the number held."""
    server = start_server(rate=0, pending_interval=0.2, pending_limit=5)
    typist = registered(server, "typist")
    talker = registered(server, "talker")
    try:
        assert typist.wait_for("pending") == {"type": "pending", "count": 1}
        talker.send_raw(b"".join(
            b'{"type":"say","text":"t%d","ref":%d}\0' % (i, i) for i in range(20)))
        talker.wait_for("ok", ref=19)
        counts = [typist.wait_for("pending")["count"]]
        while counts[-1] != 5:  # an interval may end while the says arrive: counts below 5
            counts.append(typist.wait_for("pending")["count"])
        assert counts == sorted(set(counts)) and counts[-1] == 5, counts
        typist.send({"type": "mode", "mode": 2})
        typist.wait_for("mode")
        dropped = typist.next_event()
        assert (dropped["event"], dropped["count"]) == ("dropped", 16)
        assert [typist.next_event()["text"] for _ in range(5)] == [f"t{i}" for i in range(15, 20)]
        assert typist.sync() == []
    finally:
        typist.close()
        talker.close()
