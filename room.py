"""The room: who is here, and who gets what (the server's core, apart from sockets and threads).

The ``Room`` keeps the registry of members (clients of every dialect) and makes every delivery
decision: who receives an event, whether it is shown live or held (seed 000 modes), and which
bytes each dialect gets. It talks back to the connections through one narrow interface, the
member's ``Outbox.push(bytes)``; the socket shell behind it does the writing.

Invariant: one lock (``Room.lock``) guards the registry and every ``push`` and ``hold``, and it
is held only for those decisions and queue puts, never for socket I/O. Because every event a
member receives is put in its outbox or hold queue under that lock, each member receives events
in one total order, and a flush of held events is never overtaken by a live one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from modes import PENDING_BYTES, PENDING_LIMIT, HoldQueue, Mode, dropped_text
from protocol import (
    AVAILABLE,
    UNAVAILABLE,
    ErrorCode,
    ProtocolError,
    Ref,
    encode,
    encode_json,
    event_frame,
    held_variant,
    line_delivery,
    message_frame,
    name_problem,
    no_such_user_message,
    parse_target,
    plain_frame,
    utc_timestamp,
)


class Dialect(str, Enum):
    """How a member speaks: the native JSON protocol, seed 002's lines or seed 001's plain text."""

    NATIVE = "native"
    LINE = "line"
    PLAIN = "plain"


class Outbox(Protocol):
    """Where the room puts bytes for a member; called with ``Room.lock`` held."""

    def push(self, data: bytes) -> None: ...


class Event:
    """A ``message`` or ``notice`` as each dialect receives it, encoded once for all recipients."""

    __slots__ = ("_held", "line", "live", "plain")

    def __init__(self, live: bytes, line: bytes | None, plain: bytes | None) -> None:
        self.live = live  # native frame with queued false
        self._held: bytes | None = None
        self.line = line  # None: line clients do not receive it (they get no notices)
        self.plain = plain

    @property
    def held(self) -> bytes:
        """The native frame with ``queued`` true, made the first time a typing member needs it."""
        if self._held is None:
            self._held = held_variant(self.live)
        return self._held


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
    _user_json: str | None = None

    def user(self) -> dict[str, Any]:
        """The wire's ``user`` object."""
        return {
            "id": self.id, "name": self.name, "title": self.title, "company": self.company,
            "status": self.status, "mode": int(self.mode),
        }

    def user_json(self) -> str:
        """``user()`` as compact JSON, cached until the member changes."""
        if self._user_json is None:
            self._user_json = encode_json(self.user())
        return self._user_json

    def changed(self) -> None:
        self._user_json = None


@dataclass(frozen=True)
class Delivery:
    """What became of a message: recipients that got it live, and those holding it."""

    delivered: int
    queued: int


NOTICE_TEXTS = {
    "joined": "{name} joined the chat.",
    "left": "{name} is quitting.",
    "lost": "{name} has lost its connection.",
}
SHUTDOWN_TEXT = "The server is shutting down."


class Room:
    """The one room: registration, delivery and the seed 000 hold rules for every member."""

    def __init__(
        self,
        max_clients: int = 1024,
        pending_limit: int = PENDING_LIMIT,
        pending_bytes: int = PENDING_BYTES,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.lock = threading.Lock()
        self.max_clients = max_clients
        self.pending_limit = pending_limit
        self.pending_bytes = pending_bytes
        self.log = log
        self._members: dict[int, Member] = {}  # registered members by id, in registration order
        self._names: dict[str, Member] = {}  # by casefolded name
        self._next_auto = 1
        self._ts_cache = (0, "")
        # Set (without the lock) when the server stops: members leaving then are not announced.
        # Checked under the lock, so a crowd of leaving threads drains in microseconds each.
        self.closing = False

    # -- helpers (lock held) ------------------------------------------------------------------

    def _timestamp(self) -> str:
        """``utc_timestamp()``, computed once per millisecond (it is on the hot path)."""
        now_ms = int(time.time() * 1000)
        if self._ts_cache[0] != now_ms:
            self._ts_cache = (now_ms, utc_timestamp(now_ms / 1000))
        return self._ts_cache[1]

    def _auto_name(self) -> str:
        while True:
            name = f"user{self._next_auto}"
            self._next_auto += 1
            if name.casefold() not in self._names:
                return name

    def _deliver(self, event: Event, recipients: Iterable[Member]) -> Delivery:
        delivered = queued = 0
        for member in recipients:
            if member.dialect is Dialect.NATIVE:
                if member.mode is Mode.VIEWING:
                    member.outbox.push(event.live)
                    delivered += 1
                else:
                    member.hold.hold(event, len(event.live))
                    queued += 1
            elif member.dialect is Dialect.LINE:
                if event.line is not None:
                    member.outbox.push(event.line)
                    delivered += 1
            elif event.plain is not None:
                member.outbox.push(event.plain)
                delivered += 1
        return Delivery(delivered, queued)

    def _others(self, member: Member) -> list[Member]:
        return [other for other in self._members.values() if other is not member]

    def _notice(self, kind: str, member: Member) -> Event:
        text = NOTICE_TEXTS[kind].format(name=member.name)
        obj = {"type": "notice", "event": kind, "user": member.user(), "text": text,
               "ts": self._timestamp()}
        return Event(event_frame(obj), None, plain_frame(text))

    def _message(self, sender: Member, text: str, to: Member | None) -> Event:
        to_json = "null" if to is None else encode_json({"id": to.id, "name": to.name})
        live = message_frame(sender.user_json(), to_json, text, self._timestamp())
        return Event(live, line_delivery(sender.name, text), plain_frame(f"{sender.name}: {text}"))

    # -- registration -------------------------------------------------------------------------

    @property
    def online(self) -> int:
        return len(self._members)

    def register(
        self, member: Member, name: str | None, title: str | None = None,
        company: str | None = None, ref: Ref = None,
    ) -> None:
        """Add ``member`` under ``name`` (None: automatic) and tell the others it joined.

        Raises ``ProtocolError`` (``bad-name``, ``name-taken``, ``server-full``,
        ``already-registered``) and changes nothing then.
        """
        with self.lock:
            if member.registered:
                raise ProtocolError(ErrorCode.ALREADY_REGISTERED, "You are already registered.", ref)
            if name is not None:
                problem = name_problem(name)
                if problem:
                    raise ProtocolError(ErrorCode.BAD_NAME, problem, ref)
                if name.casefold() in self._names:
                    raise ProtocolError(
                        ErrorCode.NAME_TAKEN, f'The name "{name}" is taken; choose another.', ref
                    )
            if len(self._members) >= self.max_clients:
                raise ProtocolError(
                    ErrorCode.SERVER_FULL,
                    f"The server is full ({self.max_clients} clients); try again later.", ref,
                )
            member.name = name if name is not None else self._auto_name()
            member.title, member.company = title, company
            member.registered = True
            member.hold = HoldQueue(self.pending_limit, self.pending_bytes)
            member.changed()
            if member.dialect is Dialect.NATIVE:
                welcome = {"type": "welcome", **member.user(), "online": len(self._members) + 1}
                if ref is not None:
                    welcome["ref"] = ref
                member.outbox.push(encode(welcome))
            elif member.dialect is Dialect.LINE:
                member.outbox.push(f"HELLO {member.name}\n".encode())
            self._deliver(self._notice("joined", member), self._members.values())
            self._members[member.id] = member
            self._names[member.name.casefold()] = member
            online = len(self._members)
        self.log(
            f"{member.name} (id {member.id}, {member.dialect.value}) joined from "
            f"{member.address} ({online} online)"
        )

    def leave(self, member: Member, quitting: bool, notify: bool = True) -> None:
        """Remove ``member``; the others get ``left`` (it quit) or ``lost`` (it vanished)."""
        with self.lock:
            if not member.registered or self._members.get(member.id) is not member:
                return
            del self._members[member.id]
            del self._names[member.name.casefold()]
            member.registered = False
            if notify and not self.closing:
                kind = "left" if quitting else "lost"
                self._deliver(self._notice(kind, member), self._members.values())
            online = len(self._members)
        verb = "quit" if quitting else "lost its connection"
        self.log(f"{member.name} (id {member.id}) {verb} ({online} online)")

    # -- messages -----------------------------------------------------------------------------

    def broadcast(self, sender: Member, texts: list[str]) -> Delivery:
        """Send each text to every other registered member; one delivery count for them all."""
        with self.lock:
            others = self._others(sender)
            if len(texts) == 1:
                delivery = self._deliver(self._message(sender, texts[0], None), others)
            else:
                delivery = self._deliver_run([self._message(sender, t, None) for t in texts], others)
        return delivery

    def _deliver_run(self, events: list[Event], recipients: list[Member]) -> Delivery:
        """Deliver consecutive events to the same recipients: one push per live recipient."""
        live = line = plain = b""
        delivered = queued = 0
        for member in recipients:
            if member.dialect is Dialect.NATIVE:
                if member.mode is Mode.VIEWING:
                    live = live or b"".join(e.live for e in events)
                    member.outbox.push(live)
                    delivered += 1
                else:
                    for event in events:
                        member.hold.hold(event, len(event.live))
                    queued += 1
            elif member.dialect is Dialect.LINE:
                line = line or b"".join(e.line or b"" for e in events)
                member.outbox.push(line)
                delivered += 1
            else:
                plain = plain or b"".join(e.plain or b"" for e in events)
                member.outbox.push(plain)
                delivered += 1
        return Delivery(delivered, queued)

    def find(self, target: str | int) -> Member | None:
        """A registered member by id (int or digit string) or by name, any case."""
        with self.lock:
            return self._find(target)

    def _find(self, target: str | int) -> Member | None:
        key = parse_target(target)
        if isinstance(key, int):
            return self._members.get(key)
        return self._names.get(key.casefold())

    def direct(self, sender: Member, target: str | int, text: str, ref: Ref = None) -> tuple[Member, Delivery]:
        """Send ``text`` to one member; raises ``no-such-user`` or ``unavailable``."""
        with self.lock:
            recipient = self._find(target)
            if recipient is None:
                raise ProtocolError(ErrorCode.NO_SUCH_USER, no_such_user_message(target), ref)
            if recipient.status == UNAVAILABLE:
                raise ProtocolError(
                    ErrorCode.UNAVAILABLE, f"{recipient.name} is unavailable right now.", ref
                )
            delivery = self._deliver(self._message(sender, text, recipient), [recipient])
        return recipient, delivery

    # -- state of one member ------------------------------------------------------------------

    def users(self) -> list[dict[str, Any]]:
        """Every registered member's ``user`` object, in registration order."""
        with self.lock:
            return [member.user() for member in self._members.values()]

    def names(self) -> list[str]:
        with self.lock:
            return [member.name for member in self._members.values()]

    def set_mode(self, member: Member, mode: Mode, reply: bytes) -> None:
        """Switch modes; push ``reply``, then on viewing everything held, before any live event."""
        with self.lock:
            member.mode = mode
            member.changed()
            member.outbox.push(reply)
            if mode is Mode.VIEWING:
                dropped, held = member.hold.flush()
                if dropped:
                    notice = {"type": "notice", "event": "dropped", "count": dropped,
                              "text": dropped_text(dropped), "ts": self._timestamp(),
                              "queued": True}
                    member.outbox.push(encode(notice))
                if held:
                    member.outbox.push(b"".join(event.held for event in held))

    def set_status(self, member: Member, status: str | None) -> str:
        """Set (or, with None, toggle) availability; return the new status."""
        with self.lock:
            if status is None:
                status = UNAVAILABLE if member.status == AVAILABLE else AVAILABLE
            member.status = status
            member.changed()
            return status

    def push(self, member: Member, data: bytes) -> None:
        """Put a reply in the member's outbox (under the lock, like every other put)."""
        with self.lock:
            member.outbox.push(data)

    def shutdown(self, members: Iterable[Member]) -> None:
        """Tell every member the server is stopping, at once, whatever its mode."""
        with self.lock:
            notice = {"type": "notice", "event": "shutdown", "text": SHUTDOWN_TEXT,
                      "ts": self._timestamp(), "queued": False}
            frame = encode(notice)
            for member in members:
                if member.dialect is Dialect.NATIVE:
                    member.outbox.push(frame)
                elif member.dialect is Dialect.PLAIN:
                    member.outbox.push(plain_frame(SHUTDOWN_TEXT))
