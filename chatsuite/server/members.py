"""A room's members and the events they receive, as values (no lock, no sockets).

A ``Member`` is one client of any dialect: identity, mode, availability, hold queue and the
outbox its bytes go to. An ``Event`` is a ``message`` or ``notice`` encoded once for every
recipient. ``Room`` (room.py) owns them and decides who gets what, under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from modes import HoldQueue, Mode
from protocol import AVAILABLE, Dialect, User, encode_json, held_variant

__all__ = ["GONE", "HELD_OVERHEAD", "NOWHERE", "Delivery", "Dialect", "Event", "Member", "Outbox",
           "push_each"]


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

    __slots__ = ("line", "live", "plain", "seq")

    def __init__(self, live: bytes, line: bytes | None, plain: bytes | None,
                 seq: int | None = None) -> None:
        self.live = live  # native frame with queued false
        self.seq = seq  # the room's sequence number (SPEC 6.1); None for per-client notices
        self.line = line  # None: line clients do not receive it (they get no notices)
        self.plain = plain

    @property
    def held(self) -> bytes:
        """The native frame with ``queued`` true (made on each flush: a hold keeps only live)."""
        return held_variant(self.live)

    @property
    def kept(self) -> int:
        """The bytes a hold really keeps for this event (its bound counts these)."""
        return len(self.live) + HELD_OVERHEAD

    def release(self) -> None:
        """Delivered: drop the renderings only live recipients needed."""
        self.line = self.plain = None


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
    hold: HoldQueue[Event] = field(default_factory=HoldQueue)
    registered: bool = False
    node: int | None = None  # None: connected here; else the cluster node it is connected to
    joined_at: float = 0.0  # registration time: the cluster's users are listed in this order
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
        """The wire's ``user`` object."""
        return {
            "id": self.id, "name": self.name, "title": self.title, "company": self.company,
            "status": self.status, "mode": int(self.mode),
        }

    def as_user(self) -> User:
        """The wire's ``user`` object, typed."""
        return User(self.id, self.name, self.title, self.company, self.status, int(self.mode),
                    self.connected)

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
