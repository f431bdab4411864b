"""A room's members and the events they receive, as values (no lock, no sockets).

A ``Member`` is one client of any dialect: identity, mode, availability, hold queue and the
outbox its bytes go to. An ``Event`` is a ``message`` or ``notice`` encoded once for every
recipient. ``Room`` (room.py) owns them and decides who gets what, under its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

from chatsuite.dialects import line_delivery, plain_frame
from modes import PENDING_BYTES, PENDING_LIMIT, Mode
from protocol import AVAILABLE, Dialect, User, encode_json, held_variant

__all__ = ["GONE", "HELD_OVERHEAD", "NOWHERE", "Delivery", "Dialect", "Event", "Hold", "Member",
           "Outbox", "Stream", "push_each"]


class Outbox(Protocol):
    """Where the room puts bytes for a member; called with ``Room.lock`` held."""

    def push(self, data: bytes) -> None: ...


class _Nowhere:
    """The outbox of a member of another node: the room never pushes to it."""

    def push(self, data: bytes) -> None:
        raise AssertionError("pushed to a member of another node")


NOWHERE = _Nowhere()


class _Gone:
    """The outbox of a member in its resume window (SPEC 6.4): it is held for, never pushed to;
    a stray push (a reply racing the drop) is dropped with the connection it was meant for."""

    def push(self, data: bytes) -> None:
        pass


GONE = _Gone()


def push_each(outboxes: Iterable[Outbox], data: bytes, skip: object = None) -> int:
    """Push ``data`` to every outbox but ``skip``; how many got it (``Room.fan_out``'s default)."""
    count = 0
    for outbox in outboxes:
        if outbox is not skip:
            outbox.push(data)
            count += 1
    return count


# What one held event costs its holder besides the frame's bytes: the frame's bytes object
# header, the ``Event`` (slots) and the hold queue's entry (a 2-tuple and its deque slot). Every
# byte held for a client counts against its bound (SPEC 1.5), not only the frame.
HELD_OVERHEAD = 33 + 72 + 56 + 8


class Event:
    """A ``message`` or ``notice`` as each dialect receives it, encoded once for all recipients.

    Once delivered (``release``), an event held for typing members keeps only its native frame:
    the line and plain renderings are live-only (those dialects never hold), and the held
    variant (``queued`` true) is made when a flush sends it, not kept.
    """

    __slots__ = ("_line", "_plain", "_sender", "_text", "index", "key", "live", "seq", "skip")

    def __init__(self, live: bytes, line: bytes | None, plain: bytes | None,
                 seq: int | None = None, sender: str | None = None,
                 text: str | None = None) -> None:
        self.live = live  # native frame with queued false
        self.seq = seq  # the room's sequence number (SPEC 6.1); None for per-client notices
        self._line = line  # None: line clients do not receive it (they get no notices)
        self._plain = plain
        # A message keeps its sender's name and text instead, and renders the line and plain
        # forms only when a recipient of that dialect needs them: most rooms have none, and
        # rendering is done under the room lock.
        self._sender = sender
        self._text = text
        # In the room's stream (an event to everyone): its position, its place in the room's
        # delivery order, and the member it was not for (its sender), for the holds' cursors.
        self.index = -1
        self.key = -1
        self.skip: object = None

    @property
    def line(self) -> bytes | None:
        """The line-protocol rendering (seed 002), or None when line clients do not get it."""
        if self._line is None and self._text is not None:
            assert self._sender is not None
            self._line = line_delivery(self._sender, self._text)
        return self._line

    @property
    def plain(self) -> bytes | None:
        """The plain-text rendering (seed 001)."""
        if self._plain is None and self._text is not None:
            self._plain = plain_frame(f"{self._sender}: {self._text}")
        return self._plain

    @property
    def held(self) -> bytes:
        """The native frame with ``queued`` true (made on each flush: a hold keeps only live)."""
        return held_variant(self.live)

    @property
    def kept(self) -> int:
        """The bytes a hold really keeps for this event (its bound counts these)."""
        return len(self.live) + HELD_OVERHEAD

    def release(self) -> None:
        """Delivered: drop the renderings only live recipients needed (and what makes them)."""
        self._line = self._plain = None
        self._sender = self._text = None


class Stream:
    """The events delivered to everyone while someone typed, by position, shared by every hold.

    A typing member's hold is a cursor into it (see ``Hold``), so an event held by 500 typists
    is kept once. The room trims it up to the oldest position any hold still needs.
    """

    __slots__ = ("base", "events")

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.base = 0  # the position of events[0]

    @property
    def end(self) -> int:
        return self.base + len(self.events)

    def append(self, event: Event) -> None:
        event.index = self.end
        self.events.append(event)

    def since(self, index: int) -> Iterator[Event]:
        return islice(self.events, max(0, index - self.base), None)

    def trim(self, keep_from: int) -> None:
        """Forget the events before position ``keep_from``."""
        events = self.events
        while self.base < keep_from and events:
            events.popleft()
            self.base += 1


class Hold:
    """What is held for one typing (or dropped, SPEC 6.4) member: a cursor into the room's
    ``Stream`` (the events to everyone from position ``start`` on, but its own) and the events
    for it alone (direct messages, a resume's replay), merged in delivery order on a flush.

    Bounded like SPEC 1.4 says: at most ``limit`` events and ``max_bytes`` (each event's frame
    and bookkeeping, ``Event.kept``); past either the oldest is dropped and counted. Held
    events to everyone cost this member a counter, not a copy or a queue entry.
    """

    __slots__ = ("bytes", "count", "dropped", "limit", "max_bytes", "owner", "private",
                 "shared", "start", "stream")

    def __init__(self, stream: Stream | None = None, owner: object = None,
                 limit: int = PENDING_LIMIT, max_bytes: int = PENDING_BYTES) -> None:
        self.stream = stream if stream is not None else Stream()
        self.owner = owner
        self.limit = limit
        self.max_bytes = max_bytes
        self.start = 0  # the stream position of the oldest held event to everyone
        self.shared = 0  # how many events to everyone are held (from ``start``, not own)
        self.private: deque[tuple[int, Event, int]] = deque()  # (order key, event, size)
        self.count = 0
        self.bytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self.count

    @property
    def size(self) -> int:
        """Bytes held (frames and bookkeeping)."""
        return self.bytes

    def hold_all(self, events: list[Event], shared: bool) -> None:
        """Hold events the room has numbered (``Event.key``), in the stream when ``shared``."""
        for event in events:
            if shared:
                self.hold_shared(event)
            else:
                self.hold(event, event.key)

    def hold_shared(self, event: Event) -> None:
        """Hold an event of the stream (already appended to it)."""
        if not self.shared:
            self.start = event.index
        self.shared += 1
        self.count += 1
        self.bytes += event.kept
        self._bound()

    def hold(self, event: Event, key: int) -> None:
        """Hold an event for this member alone; ``key`` orders it among the stream's."""
        size = event.kept
        self.private.append((key, event, size))
        self.count += 1
        self.bytes += size
        self._bound()

    def _first_shared(self) -> Event | None:
        if not self.shared:
            return None
        for event in self.stream.since(self.start):
            if event.skip is not self.owner:
                return event
            self.start += 1  # its own broadcast: never held for it
        return None

    def _bound(self) -> None:
        while self.count > self.limit or (self.bytes > self.max_bytes and self.count):
            first = self._first_shared()
            if first is not None and (not self.private or first.key < self.private[0][0]):
                self.start = first.index + 1
                self.shared -= 1
                self.bytes -= first.kept
            else:
                _, _, size = self.private.popleft()
                self.bytes -= size
            self.count -= 1
            self.dropped += 1

    def peek(self) -> Iterator[Event]:
        """The held events, oldest first, left in place."""
        shared: list[Event] = []
        if self.shared:
            for event in self.stream.since(self.start):
                if event.skip is not self.owner:
                    shared.append(event)
                    if len(shared) == self.shared:
                        break
        private = list(self.private)  # indexed below: a deque's middle is O(n) away
        i = j = 0
        while i < len(shared) or j < len(private):
            if j >= len(private) or (i < len(shared) and shared[i].key < private[j][0]):
                yield shared[i]
                i += 1
            else:
                yield private[j][1]
                j += 1

    def flush(self) -> tuple[int, list[Event]]:
        """Take everything: ``(number dropped since the last flush, held events in order)``."""
        dropped, items = self.dropped, list(self.peek())
        self.private.clear()
        self.shared = self.count = self.bytes = self.dropped = 0
        return dropped, items


@dataclass(eq=False)
class Member:
    """One connection's client: identity, mode, availability, and where its bytes go."""

    id: int
    outbox: Outbox
    dialect: Dialect
    address: str = ""
    name: str = ""
    title: str | None = None
    company: str | None = None
    status: str = AVAILABLE
    mode: Mode = Mode.TYPING
    hold: Hold = field(default_factory=Hold)
    registered: bool = False
    node: int | None = None  # None: connected here; else the cluster node it is connected to
    joined_at: float = 0.0  # registration time: the cluster's users are listed in this order
    account: str | None = None  # the account this connection proved (or registered), SPEC 7.2
    admin: bool = False  # may moderate: an --admin account logged in with its password (7.3)
    # The durable room (SPEC 6.4): the SHA-256 of the session token (never the token), whether
    # a connection is attached (False: in its resume window, until ``expires``), and the seq up
    # to which everything it was entitled to went to its old connection's outbox (or was held
    # and dropped): a resume replays the log after the client's ``last_seq`` up to there.
    session_hash: str | None = None
    connected: bool = True
    expires: float = 0.0
    pushed_upto: int = 0
    _user_json: str | None = None

    def user(self) -> dict[str, Any]:
        """The wire's ``user`` object (``account``/``admin`` only when true)."""
        obj: dict[str, Any] = {
            "id": self.id, "name": self.name, "title": self.title, "company": self.company,
            "status": self.status, "mode": int(self.mode),
        }
        if self.account is not None:
            obj["account"] = True
        if self.admin:
            obj["admin"] = True
        return obj

    def as_user(self) -> User:
        """The wire's ``user`` object, typed."""
        return User(self.id, self.name, self.title, self.company, self.status, int(self.mode),
                    self.connected, account=self.account is not None, admin=self.admin)

    def user_json(self) -> str:
        """``user()`` as compact JSON, cached until the member changes."""
        if self._user_json is None:
            self._user_json = encode_json(self.user())
        return self._user_json

    def changed(self) -> None:
        self._user_json = None

    def record(self, node: int) -> dict[str, Any]:
        """What the cluster stores and publishes about this member (``user()`` and routing)."""
        return {**self.user(), "node": node, "dialect": self.dialect.value, "at": self.joined_at}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Member:
        """A member of another node, from its cluster record."""
        return cls(
            int(record["id"]), NOWHERE, Dialect(record["dialect"]), name=record["name"],
            title=record["title"], company=record["company"], status=record["status"],
            mode=Mode(record["mode"]), registered=True, node=int(record["node"]),
            joined_at=float(record["at"]),
        )


@dataclass(frozen=True)
class Delivery:
    """What became of a message: recipients that got it live, and those holding it."""

    delivered: int
    queued: int

    def __add__(self, other: Delivery) -> Delivery:
        return Delivery(self.delivered + other.delivered, self.queued + other.queued)
