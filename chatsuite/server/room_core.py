"""The room's core: the registry, delivery, holds and modes (room.py's ``Room`` is built on it).

``RoomCore`` keeps the members of this node (by id, by name, split into viewers and the
others), numbers and logs every event (``_message``, ``_notice``, ``_log_event``: the message
path, kept here so it stays one direct call each) and decides who gets what: live, held (seed
000 modes) or nothing, and which bytes each dialect gets. Guard and Backplane are the narrow
interfaces the room asks of the accounts and of a cluster.

Invariant: one lock (``Room.lock``, made here) guards the registry and every ``push`` and
``hold``, and it is held only for those decisions and queue puts, never for socket or Redis
I/O. Because every event a member receives is put in its outbox or hold queue under that lock,
each member receives events in one total order, and a flush of held events is never overtaken
by a live one. Every method here that starts with ``_`` is called with the lock held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from chatsuite.dialects import plain_frame
from chatsuite.server.access import name_key
from chatsuite.server.members import (
    Delivery,
    Dialect,
    Event,
    Hold,
    Member,
    Outbox,
    Stream,
    push_each,
)
from chatsuite.server.memstore import LoggedEvent, MemoryStore, SessionRecord, Store
from chatsuite.server.pending import NO_NOTES, PendingNotes
from modes import PENDING_BYTES, PENDING_LIMIT, Mode, dropped_text
from protocol import (
    MAX_FRAME,
    ErrorCode,
    Notice,
    Ref,
    Refusal,
    encode_event,
    encode_json,
    message_frame,
    name_problem,
    utc_timestamp,
)


class Guard(Protocol):
    """The accounts' side of a claim (gate.py): asked under the room lock, cheap, a leaf."""

    def is_account(self, name: str) -> bool: ...
    def check_name(self, name: str, account: str | None) -> None: ...
    def is_admin(self, name: str, account: str | None) -> bool: ...


class Backplane(Protocol):
    """What the room asks of a cluster backplane (cluster.py); never called with the lock held."""

    node: int

    def claim(self, name: str, record: dict[str, Any]) -> bool | None: ...
    def release(self, name: str, member_id: int) -> None: ...
    def auto_number(self) -> int | None: ...
    def lookup(self, target: str | int) -> dict[str, Any] | None: ...
    def joined(self, record: dict[str, Any], claimed: bool) -> None: ...
    def left(self, record: dict[str, Any], kind: str) -> None: ...
    def updated(self, record: dict[str, Any]) -> None: ...
    def said(self, record: dict[str, Any], texts: list[str], ts: str) -> None: ...
    def sent(self, record: dict[str, Any], to: dict[str, Any], text: str, ts: str) -> None: ...
    def moderated(self, event: dict[str, Any]) -> None: ...


NOTICE_TEXTS = {
    "joined": "{name} joined the chat.",
    "left": "{name} is quitting.",
    "lost": "{name} has lost its connection.",
    "back": "{name} is back.",
}
SHUTDOWN_TEXT = "The server is shutting down."
# The room's own recent log (by seq, shared references to the events it logs): what backlog
# and resume read for the events the store may not have committed yet (the last 50 ms).
RECENT_LIMIT = 10_000
RECENT_BYTES = 16 * 1024 * 1024  # and at most this much of their frames (SPEC 1.5's bounds)
# Ids handed out while a member in its resume window keeps its own (SPEC 6.4): ids are file
# descriptors, which the system reuses at once, so a new connection whose descriptor is a
# reserved id gets a number from this range instead (above any descriptor this server opens,
# below a cluster node's ID_STRIDE of 1,000,000).
SPARE_IDS = range(500_000, 1_000_000)
FOREVER = 10 * 365 * 86400.0  # a connected member's stored session does not expire
TRIM_EVERY = 256  # stream appends between two trims (each looks at every typing member)


class RoomCore:
    """The state of the one room and its delivery decisions (the lock held)."""

    def __init__(
        self,
        max_clients: int = 1024,
        pending_limit: int = PENDING_LIMIT,
        pending_bytes: int = PENDING_BYTES,
        log: Callable[[str], None] = lambda line: None,
        backplane: Backplane | None = None,
        max_frame: int = MAX_FRAME,
        store: Store | None = None,
        resume_window: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lock = threading.Lock()
        # SPEC 6: the store (appended to under the lock, never waited for), the latest seq,
        # the recent log, the resume window and the native members' sessions by token hash.
        self.store: Store = store if store is not None else MemoryStore()
        self.seq = self.store.start_seq - 1
        # Within the store's own bounds, or backlog and resume would outlive --history-limit
        # and --history-days until the next restart.
        self.recent = MemoryStore(history_limit=min(RECENT_LIMIT, self.store.history_limit),
                                  history_days=self.store.history_seconds / 86400,
                                  history_bytes=RECENT_BYTES)
        self.resume_window = resume_window
        self.clock = clock
        self._sessions: dict[str, Member] = {}
        # The events to everyone that typing members hold: each hold is a cursor into it.
        self.stream = Stream()
        self._key = 0  # delivery order, shared by the stream and the holds' own events
        self._trim_due = TRIM_EVERY
        self._next_spare = SPARE_IDS.start
        # Set by the server: abort a connection (marked cut, its socket closed by the writer).
        self.abort: Callable[[Outbox], None] = lambda outbox: None
        self.max_frame = max_frame  # told to native clients in their welcome
        self.backplane = backplane
        self.max_clients = max_clients
        self.pending_limit = pending_limit
        self.pending_bytes = pending_bytes
        self.log = log
        self._members: dict[int, Member] = {}  # registered members by id, in registration order
        self._names: dict[str, Member] = {}  # by casefolded name
        self._next_auto = 1
        self._ts_cache = (0, "")
        # The same registered members, split by how an event reaches them: native viewers all
        # get the same bytes (``fan_out`` pushes them in one tight loop, the hot path of a
        # broadcast), the others one by one (typing ones hold it; line and plain get their own).
        self._viewers: dict[int, Outbox] = {}
        self._individual: dict[int, Member] = {}
        # (Any: the server passes the outboxes it knows, its own Connection objects.)
        self.fan_out: Callable[[Iterable[Any], bytes, object], int] = push_each
        # Told of every hold queue that changes (the server's ``PendingTicker``, pending.py).
        self.pending: PendingNotes = NO_NOTES
        # Members of the other nodes (cluster only), by id and by casefolded name.
        self._remote: dict[int, Member] = {}
        self._remote_names: dict[str, Member] = {}
        # Set (without the lock) when the server stops: members leaving then are not announced.
        # Checked under the lock, so a crowd of leaving threads drains in microseconds each.
        self.closing = False
        # Accounts (SPEC 7.2): a registered name is claimed only by a connection that proved
        # its password; checked at the claim, under the lock, so none can slip in meanwhile.
        self.guard: Guard | None = None

    @property
    def online(self) -> int:
        return len(self._members)

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
            if name.casefold() not in self._names and not (
                    self.guard is not None and self.guard.is_account(name)):
                return name

    def _new_hold(self, member: Member) -> Hold:
        return Hold(self.stream, member, self.pending_limit, self.pending_bytes)

    def _next_key(self) -> int:
        self._key += 1
        return self._key

    def _keep(self, events: list[Event], shared: bool) -> None:
        """Number events in delivery order and, when they go to everyone, add them to the
        stream: done once, when the first typing recipient holds them (lock held)."""
        for event in events:
            event.key = self._next_key()
            if shared:
                self.stream.append(event)
                self._trim_due -= 1

    def _trim_stream(self) -> None:
        """Forget the stream's events no hold needs any more (lock held)."""
        starts = [m.hold.start for m in self._individual.values() if m.hold.shared]
        self.stream.trim(min(starts) if starts else self.stream.end)
        self._trim_due = TRIM_EVERY

    def _deliver(self, events: list[Event], recipients: Iterable[Member],
                 shared: bool = False) -> Delivery:
        """Deliver consecutive events to the same recipients, in order: one put per live one.

        Each dialect's bytes are joined once, the first time a recipient needs them; a
        recipient whose dialect does not get these events (line clients and notices) gets
        nothing and is not counted.
        """
        rendered: dict[Dialect, bytes] = {}

        def render(dialect: Dialect) -> bytes:
            if dialect not in rendered:
                parts = [e.live if dialect is Dialect.NATIVE else
                         e.line if dialect is Dialect.LINE else e.plain for e in events]
                rendered[dialect] = b"".join(part for part in parts if part is not None)
            return rendered[dialect]

        delivered = queued = 0
        kept = False  # the events are in the stream (shared) or numbered (private)
        for member in recipients:
            if member.dialect is Dialect.NATIVE and (member.mode is not Mode.VIEWING
                                                     or not member.connected):
                if not kept:
                    kept = True
                    self._keep(events, shared)
                member.hold.hold_all(events, shared)
                if member.connected:
                    self.pending.changed(member)
                queued += 1
                continue
            data = render(member.dialect)
            if data:
                member.outbox.push(data)
                delivered += 1
        for event in events:
            event.release()  # from now on only holds keep it: native frames only
        return Delivery(delivered, queued)

    def _to_everyone(self, events: list[Event], skip: Member | None = None) -> Delivery:
        """Deliver events to every registered member of this node but ``skip``."""
        live = events[0].live if len(events) == 1 else b"".join(e.live for e in events)
        delivered = self.fan_out(
            self._viewers.values(), live, skip.outbox if skip is not None else None
        )
        for event in events:
            event.skip = skip
        rest = self._deliver(events, [m for m in self._individual.values() if m is not skip],
                             shared=True)
        if self._trim_due <= 0:
            self._trim_stream()
        return Delivery(delivered + rest.delivered, rest.queued)

    def _sort(self, member: Member) -> None:
        """File a registered member under how events reach it (after joining or a mode change)."""
        if member.dialect is Dialect.NATIVE and member.mode is Mode.VIEWING and member.connected:
            self._individual.pop(member.id, None)
            self._viewers[member.id] = member.outbox
        else:
            self._viewers.pop(member.id, None)
            self._individual[member.id] = member

    def _notice(self, kind: str, member: Member, ts: str | None = None) -> Event:
        text = NOTICE_TEXTS[kind].format(name=member.name)
        self.seq += 1
        notice = Notice(kind, text, ts or self._timestamp(), member.as_user(), seq=self.seq)
        live = encode_event(notice)
        self._log_event("notice", live, member, None)
        return Event(live, None, plain_frame(text), self.seq)

    def _check_name(self, member: Member, name: str | None, ref: Ref) -> None:
        """``already-registered``, ``bad-name`` or ``name-taken`` for registering ``member`` as
        ``name`` (None: an automatic name), if it deserves one. A name reserved for a session in
        its resume window is taken, except by that account's owner (``_owner_of_reserved``).
        Lock held."""
        if member.registered:
            raise Refusal(ErrorCode.ALREADY_REGISTERED, "You are already registered.", ref)
        if name is None:
            return
        problem = name_problem(name)
        if problem:
            raise Refusal(ErrorCode.BAD_NAME, problem, ref)
        holder = self._names.get(name.casefold())
        if holder is not None and not _owner_of_reserved(member, holder):
            raise _name_taken(name, ref)

    def _message(
        self, sender: Member, text: str, to: Member | None, ts: str | None = None
    ) -> Event:
        to_json = "null" if to is None else encode_json({"id": to.id, "name": to.name})
        self.seq += 1
        live = message_frame(sender.user_json(), to_json, text, ts or self._timestamp(),
                             self.seq)
        self._log_event("message", live, sender, to)
        return Event(live, None, None, self.seq, sender.name, text)

    def _log_event(self, kind: str, live: bytes, sender: Member, to: Member | None) -> None:
        """Hand the event just numbered to the store and the recent log (lock held; O(1)).

        A notice names the member it is about as its sender (so a resume knows its own); only
        a direct message has a recipient, which makes it private to the two sessions.
        """
        # Built with tuple.__new__: the NamedTuple's own __new__ is a Python call, and this runs
        # under the room lock for every event (it was a sixth of all2all's GIL time).
        account = sender.account
        if to is None:
            event = _new_logged(LoggedEvent, (
                self.seq, time.time(), kind, live[:-1], sender.name, sender.id, None,
                sender.session_hash, None, None if account is None else name_key(account), None))
        else:
            event = _new_logged(LoggedEvent, (
                self.seq, time.time(), kind, live[:-1], sender.name, sender.id, to.name,
                sender.session_hash, to.session_hash, _account_key(sender), _account_key(to)))
        self.store.append(event)
        self.recent.append(event)

    def _remove(self, member: Member) -> None:
        """Take ``member`` out of the registry (lock held); its session ends with it."""
        del self._members[member.id]
        del self._names[member.name.casefold()]
        self._viewers.pop(member.id, None)
        self._individual.pop(member.id, None)
        member.registered = False
        if member.session_hash is not None and self._sessions.get(member.session_hash) is member:
            del self._sessions[member.session_hash]
            self.store.delete_session(member.session_hash)

    def _save_session(self, member: Member) -> None:
        """Hand the member's session to the store (lock held; queued, never waited for)."""
        if member.session_hash is None or not member.registered:
            return
        expires = member.expires if not member.connected else self.clock() + FOREVER
        self.store.save_session(SessionRecord(
            member.session_hash, member.name, member.title, member.company, member.status,
            int(member.mode), self.seq, expires, member.account, member.id))

    def _dropped_frame(self, count: int) -> bytes:
        return encode_event(Notice("dropped", dropped_text(count), self._timestamp(),
                                   count=count, queued=True))

    def _everyone(self) -> Iterable[Member]:
        """Members of this node and, in a cluster, of the others: in registration order."""
        if not self._remote:
            return self._members.values()
        return sorted([*self._members.values(), *self._remote.values()], key=_joined_at)


_new_logged = tuple.__new__


def _account_key(member: Member) -> str | None:
    """The case-folded account ``member`` is logged in to, or None (SPEC 6.3: its own DMs)."""
    return None if member.account is None else name_key(member.account)


def _name_taken(name: str, ref: Ref) -> Refusal:
    return Refusal(ErrorCode.NAME_TAKEN, f'The name "{name}" is taken; choose another.', ref)


def _joined_at(member: Member) -> float:
    return member.joined_at


def _owner_of_reserved(member: Member, holder: Member) -> bool:
    """True when ``member``, registering under ``holder``'s name, may take it although the name
    is reserved: ``holder`` is a session in its resume window (SPEC 6.4) and ``member`` proved
    the same account's password (SPEC 7.2: nobody takes an account *without* it). Its owner
    whose client crashed, or who moved to another computer, need not wait for the window."""
    return (not holder.connected and holder.account is not None and member.account is not None
            and name_key(holder.account) == name_key(member.account))
