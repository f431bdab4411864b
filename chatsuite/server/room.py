"""The room: who is here, and who gets what (the server's core, apart from sockets and threads).

The ``Room`` keeps the registry of members (clients of every dialect) and makes every delivery
decision: who receives an event, whether it is shown live or held (seed 000 modes), and which
bytes each dialect gets. It talks back to the connections through one narrow interface, the
member's ``Outbox.push(bytes)``; the socket shell behind it does the writing.

Invariant: one lock (``Room.lock``) guards the registry and every ``push`` and ``hold``, and it
is held only for those decisions and queue puts, never for socket or Redis I/O. Because every
event a member receives is put in its outbox or hold queue under that lock, each member receives
events in one total order, and a flush of held events is never overtaken by a live one.

In a cluster (``--redis``, cluster.py) the room also keeps a mirror of the members of the other
nodes (``node`` set, no outbox), fed by the backplane's subscriber through ``remote()``; a room
without a backplane has an empty mirror and behaves exactly as a single server.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Protocol

from chatsuite.dialects import line_hello, plain_frame
from chatsuite.server.access import name_key
from chatsuite.server.members import (
    GONE,
    Delivery,
    Dialect,
    Event,
    Hold,
    Member,
    Outbox,
    Stream,
    push_each,
)
from chatsuite.server.memstore import (
    LoggedEvent,
    MemoryStore,
    SessionRecord,
    Store,
    Viewer,
    merge_pages,
)
from chatsuite.server.pending import NO_NOTES, PendingNotes
from chatsuite.server.store import hash_token
from modes import PENDING_BYTES, PENDING_LIMIT, Mode, dropped_text
from protocol import (
    AVAILABLE,
    MAX_FRAME,
    UNAVAILABLE,
    ErrorCode,
    Notice,
    Ref,
    Refusal,
    User,
    Welcome,
    encode_event,
    encode_json,
    message_frame,
    name_problem,
    no_such_user_message,
    parse_target,
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
# Ids handed out while a member in its resume window keeps its own (SPEC 6.4): ids are file
# descriptors, which the system reuses at once, so a new connection whose descriptor is a
# reserved id gets a number from this range instead (above any descriptor this server opens,
# below a cluster node's ID_STRIDE of 1,000,000).
SPARE_IDS = range(500_000, 1_000_000)
FOREVER = 10 * 365 * 86400.0  # a connected member's stored session does not expire
TRIM_EVERY = 256  # stream appends between two trims (each looks at every typing member)


class Room:
    """The one room: registration, delivery and the seed 000 hold rules for every member."""

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
        self.recent = MemoryStore(history_limit=RECENT_LIMIT, history_days=1e6)
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

    # -- registration -------------------------------------------------------------------------

    @property
    def online(self) -> int:
        return len(self._members)

    def register(
        self, member: Member, name: str | None, title: str | None = None,
        company: str | None = None, ref: Ref = None,
    ) -> None:
        """Add ``member`` under ``name`` (None: automatic) and tell the others it joined.

        Raises ``Refusal`` (``bad-name``, ``name-taken``, ``server-full``,
        ``already-registered``) and changes nothing then. In a cluster the name is first
        claimed in Redis (outside the lock), and released again if registering here fails.
        """
        backplane = self.backplane
        claimed = False
        record: dict[str, Any] = {}
        if backplane is not None:
            member.joined_at = time.time()
            name, claimed = self._claim(member, name, title, company, ref)
        try:
            with self.lock:
                self._check_registration(member, name, ref)
                self._admit(member, name if name is not None else self._auto_name(), title,
                            company, ref)
                online = len(self._members)
                if backplane is not None:
                    record = member.record(backplane.node)
        except Refusal:
            if claimed and backplane is not None and name is not None:
                backplane.release(name, member.id)
            raise
        if backplane is not None:
            backplane.joined(record, claimed)
        self.log(
            f"{member.name} (id {member.id}, {member.dialect.value}) joined from "
            f"{member.address} ({online} online)"
        )

    def _check_registration(self, member: Member, name: str | None, ref: Ref) -> None:
        """Raise the ``Refusal`` that registering ``member`` as ``name`` deserves, if any."""
        if member.registered:
            raise Refusal(ErrorCode.ALREADY_REGISTERED, "You are already registered.", ref)
        if name is not None:
            problem = name_problem(name)
            if problem:
                raise Refusal(ErrorCode.BAD_NAME, problem, ref)
            if name.casefold() in self._names:
                raise _name_taken(name, ref)
            if self.guard is not None:
                self.guard.check_name(name, member.account)
        if len(self._members) >= self.max_clients:
            raise Refusal(
                ErrorCode.SERVER_FULL,
                f"The server is full ({self.max_clients} clients); try again later.", ref,
            )

    def _admit(self, member: Member, name: str, title: str | None, company: str | None,
               ref: Ref) -> None:
        """Register ``member`` (checked): welcome it, tell the others, file it (lock held)."""
        member.name = name
        member.title, member.company = title, company
        member.registered = True
        member.hold = self._new_hold(member)
        if member.id in self._members:  # a reserved id (its member is in its resume window)
            member.id = self._spare_id()
        member.changed()
        if member.dialect is Dialect.NATIVE:
            online = len(self._members) + len(self._remote) + 1
            token = secrets.token_urlsafe(24)  # 192 bits; only its hash is kept (SPEC 6.4)
            member.session_hash = hash_token(token)
            self._sessions[member.session_hash] = member
            self._save_session(member)
            welcome = Welcome(member.as_user(), online, self.max_frame, ref, seq=self.seq,
                              session=token, admin=member.admin)
            member.outbox.push(encode_event(welcome))
        elif member.dialect is Dialect.LINE:
            member.outbox.push(line_hello(member.name))
        self._to_everyone([self._notice("joined", member)])
        self._members[member.id] = member
        self._names[member.name.casefold()] = member
        self._sort(member)

    def _claim(
        self, member: Member, name: str | None, title: str | None, company: str | None, ref: Ref
    ) -> tuple[str | None, bool]:
        """Claim ``name``, or the cluster's next automatic name, in Redis (lock not held).

        The member's record is stored with the claim, so that any node can find it as soon as
        it is welcomed. Returns the name to register and whether it was claimed: not with
        Redis away, when only this node's names can be checked (the backplane claims it once
        Redis is back).
        """
        assert self.backplane is not None
        node = self.backplane.node

        def record(name: str) -> dict[str, Any]:
            return replace(member, name=name, title=title, company=company).record(node)

        if member.registered:
            raise Refusal(ErrorCode.ALREADY_REGISTERED, "You are already registered.", ref)
        if name is not None:
            problem = name_problem(name)
            if problem:
                raise Refusal(ErrorCode.BAD_NAME, problem, ref)
            with self.lock:
                taken = name.casefold() in self._names
            if not taken:
                claimed = self.backplane.claim(name, record(name))
                if claimed is not False:
                    return name, bool(claimed)
            raise _name_taken(name, ref)
        while True:
            number = self.backplane.auto_number()
            if number is None:
                return None, False
            candidate = f"user{number}"
            with self.lock:
                # Keep the local counter ahead, for automatic names while Redis is away.
                self._next_auto = max(self._next_auto, number + 1)
                if candidate.casefold() in self._names:
                    continue
            claimed = self.backplane.claim(candidate, record(candidate))
            if claimed is None:
                return None, False
            if claimed:
                return candidate, True

    def leave(self, member: Member, quitting: bool, notify: bool = True) -> None:
        """Remove ``member``; the others get ``left`` (it quit) or ``lost`` (it vanished)."""
        backplane = self.backplane
        with self.lock:
            if not member.registered or self._members.get(member.id) is not member:
                return
            self._remove(member)
            if notify and not self.closing and member.connected:
                kind = "left" if quitting else "lost"
                self._to_everyone([self._notice(kind, member)])
            online = len(self._members)
            record = member.record(backplane.node) if backplane is not None else {}
        if backplane is not None:
            # A node that stops takes its users with it: to the other nodes they are lost.
            backplane.left(record, "left" if quitting else "lost")
        verb = "quit" if quitting else "lost its connection"
        self.log(f"{member.name} (id {member.id}) {verb} ({online} online)")

    def cut_off(self, member: Member, notify: bool = True) -> None:
        """``member``'s connection ended without ``quit`` (lost, heartbeat, output limit, error):
        ``lost`` to the others at once (SPEC 1.5); a native member keeps its session, name and
        id reserved, for the resume window (SPEC 6.4, ``suspend``), any other leaves now."""
        if not self.suspend(member, notify):
            self.leave(member, quitting=False, notify=notify)

    # -- moderation (SPEC 7.3) -----------------------------------------------------------------

    def member_named(self, target: str | int) -> Member | None:
        """The member of this node ``target`` (a name, any case, or an id) names, or None."""
        key = parse_target(target)
        with self.lock:
            if isinstance(key, int):
                return self._members.get(key)
            return self._names.get(key.casefold())

    def moderated(self, kind: str, target: Member | None, text: str, *, by: str,
                  reason: str | None, remove: bool) -> bool:
        """Tell everyone (``target`` too) the ``kind`` notice (kicked, muted, unmuted, banned)
        naming the admin ``by``; with ``remove``, take ``target`` out of the room at once
        (no ``lost`` notice follows: the notice said why). False when ``target`` had left."""
        with self.lock:
            if remove and target is not None and self._members.get(target.id) is not target:
                return False
            user = target.as_user() if target is not None else None
            # A room event (SPEC 6.1): numbered and logged, the admin as its sender.
            self.seq += 1
            notice = Notice(kind, text, self._timestamp(), user, by=by, reason=reason,
                            seq=self.seq)
            live = encode_event(notice)
            sender = self._names.get(by.casefold()) or target
            if sender is not None:
                self._log_event("notice", live, sender, None)
            event = Event(live, None, plain_frame(text), self.seq)
            if remove and target is not None:
                # The target is told at once, whatever its mode (like shutdown): it is leaving.
                self._to_everyone([event], skip=target)
                if target.dialect is not Dialect.LINE:
                    target.outbox.push(event.live if target.dialect is Dialect.NATIVE
                                       else plain_frame(text))
            else:
                self._to_everyone([event])
            if remove and target is not None:
                self._remove(target)  # its session ends too, not kept for resuming (SPEC 7.3)
            online = len(self._members)
        if remove and target is not None:
            self.log(f"{target.name} (id {target.id}) {kind} by {by} ({online} online)")
        return True

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

    def end_session(self, member: Member) -> None:
        """End ``member``'s session (lock held): cut off, it leaves rather than waiting for a
        resume (its name lost to another node after a cluster outage)."""
        if member.session_hash is not None and self._sessions.get(member.session_hash) is member:
            del self._sessions[member.session_hash]
            self.store.delete_session(member.session_hash)
        member.session_hash = None

    def _spare_id(self) -> int:
        """An id no member has, from ``SPARE_IDS`` (lock held): see ``SPARE_IDS``."""
        base = self.backplane.node * 1_000_000 if self.backplane is not None else 0
        while True:
            candidate = base + self._next_spare
            self._next_spare += 1
            if self._next_spare >= SPARE_IDS.stop:
                self._next_spare = SPARE_IDS.start
            if candidate not in self._members and candidate not in self._remote:
                return candidate

    def _save_session(self, member: Member) -> None:
        """Hand the member's session to the store (lock held; queued, never waited for)."""
        if member.session_hash is None or not member.registered:
            return
        expires = member.expires if not member.connected else self.clock() + FOREVER
        self.store.save_session(SessionRecord(
            member.session_hash, member.name, member.title, member.company, member.status,
            int(member.mode), self.seq, expires, member.account))

    def _pushed_upto(self, member: Member) -> int:
        """The seq up to which all that ``member`` was entitled to left its hold (lock held):
        everything after it is in its hold (SPEC 6.4's replay starts from the log up to here)."""
        for event in member.hold.peek():
            if event.seq is not None:
                return event.seq - 1
        return self.seq

    def suspend(self, member: Member, notify: bool = True) -> bool:
        """A native member's connection ended without ``quit``: keep it for the resume window.

        The others get ``lost`` at once (``notify``); the member stays listed, not connected,
        its name and id reserved and everything for it held. False when there is no window
        (the caller then lets it ``leave``).
        """
        if self.resume_window <= 0 or member.dialect is not Dialect.NATIVE:
            return False
        backplane = self.backplane
        with self.lock:
            if not member.registered or self._members.get(member.id) is not member:
                return True  # gone already, or resumed elsewhere: nothing to announce
            if member.session_hash is None:
                return False  # its session was ended (end_session): it leaves
            if not member.connected:
                return True
            # The notice shows the member as it was (seed 004's user), then it is held for.
            notice = self._notice("lost", member) if notify and not self.closing else None
            record = member.record(backplane.node) if backplane is not None else None
            self._detach(member)
            if notice is not None:
                self._to_everyone([notice], member)
        if backplane is not None and record is not None and not self.closing:
            # The other nodes see it lost now and its name is free there (docs/cluster.md); a
            # resume on this node claims it again.
            backplane.left(record, "lost")
        self.log(f"{member.name} (id {member.id}) lost its connection; its session is kept "
                 f"for {self.resume_window:g} s")
        return True

    def _detach(self, member: Member) -> None:
        """Mark ``member`` disconnected and hold everything for it from now on (lock held)."""
        member.pushed_upto = self._pushed_upto(member)
        member.connected = False
        member.expires = self.clock() + self.resume_window
        member.changed()
        old = member.outbox
        member.outbox = GONE
        self._sort(member)
        self._save_session(member)
        if old is not GONE:
            self.abort(old)

    def resume(self, member: Member, token: str, last_seq: int | None, ref: Ref) -> bool:
        """``hello`` with ``session``: take over the session's member (SPEC 6.4) as ``member``.

        False when the session is unknown or expired (a plain registration follows). The log
        is read outside the lock (it may be the store's database); then, under the lock, the
        member moves to this connection: ``welcome`` (resumed), ``back`` to the others, then
        what it missed after ``last_seq``, in order, exactly once: held (mode 1) or sent.
        """
        if self.resume_window <= 0 or member.registered or member.dialect is not Dialect.NATIVE:
            return False
        token_hash = hash_token(token)
        for _ in range(3):  # the recent log may turn over while it is read: read again
            with self.lock:
                old = self._sessions.get(token_hash)
                if old is None:
                    return False
                half_open = old.connected
                if half_open:  # close the old connection, no lost notice
                    old_record = old.record(self.backplane.node) if self.backplane else None
                    self._detach(old)
                upto = old.pushed_upto
                expires = old.expires
            if half_open and self.backplane is not None and old_record is not None:
                self.backplane.left(old_record, "lost")  # its name, free to claim again
            after = upto if last_seq is None else max(0, min(last_seq, upto))
            replay = self._replay(token_hash, after, upto)
            claimed = False
            if self.backplane is not None:
                claimed_or_none = self._claim_again(member, old)
                if claimed_or_none is False:
                    return False  # another node has the name now: a plain registration
                claimed = bool(claimed_or_none)
            with self.lock:
                if self._sessions.get(token_hash) is not old or old.connected:
                    continue  # resumed by another connection meanwhile: try again
                if old.expires != expires:
                    continue
                self._take_over(member, old, token, after, replay, ref)
                record = member.record(self.backplane.node) if self.backplane else None
                break
        else:
            return False
        if self.backplane is not None and record is not None:
            self.backplane.joined(record, claimed)
        self.log(f"{member.name} (id {member.id}) is back (resumed after seq {after})")
        return True

    def _claim_again(self, member: Member, old: Member) -> bool | None:
        """In a cluster: claim the session's name again for ``member`` (lock not held)."""
        assert self.backplane is not None
        with self.lock:
            if member.id in self._members and self._members[member.id] is not old:
                member.id = self._spare_id()
            record = replace(member, name=old.name, title=old.title, company=old.company,
                             status=old.status, mode=old.mode,
                             joined_at=old.joined_at).record(self.backplane.node)
        return self.backplane.claim(old.name, record)

    def _replay(self, token_hash: str, after: int, upto: int) -> list[Event]:
        """What a resuming member missed in (after, upto], from the log: gaps first (outside the
        lock). The recent log is read when it reaches back far enough, else the store."""
        if upto <= after:
            return []
        events: list[LoggedEvent] = []
        gaps: list[tuple[int, int]] = []
        store = self.store
        if not store.clean and after < store.start_seq - 1:
            # The killed run may have handed out seqs the log never got (docs/store.md).
            low = max(after, store.last_logged_seq or 0) + 1
            if low <= store.start_seq - 1:
                gaps.append((low, min(upto, store.start_seq - 1)))
        viewer = Viewer(token_hash)
        recent_oldest = self.recent.oldest_seq()
        cursor = after
        if recent_oldest is None or recent_oldest > after + 1:
            store.flush(1.0)  # rare (a long absence): what was appended is in the database
            oldest = store.oldest_seq()
            if oldest is None or oldest > after + 1:
                end = upto if oldest is None else min(upto, oldest - 1)
                if not gaps or gaps[-1][1] < after + 1:
                    gaps.insert(0, (after + 1, end))
            cursor = self._page(store, viewer, cursor, upto, events)
        self._page(self.recent, viewer, cursor, upto, events)
        out = [Event(_gap_frame(low, high, self._timestamp()), None, None)
               for low, high in gaps]
        out.extend(Event(e.frame + b"\0", None, None, e.seq) for e in events
                   if e.sender_session != token_hash)
        return out

    @staticmethod
    def _page(source: Store, viewer: Viewer, cursor: int, upto: int,
              into: list[LoggedEvent]) -> int:
        """Append the events ``viewer`` may see in (cursor, upto] from ``source``; the last seq."""
        if into:
            cursor = max(cursor, into[-1].seq)
        while cursor < upto:
            page = source.backlog(viewer, after=cursor, limit=500)
            for event in page.events:
                if event.seq > upto:
                    return cursor
                into.append(event)
                cursor = event.seq
            if not page.more or not page.events:
                break
        return cursor

    def _take_over(self, member: Member, old: Member, token: str, after: int,
                   replay: list[Event], ref: Ref) -> None:
        """Move the session's member ``old`` onto ``member``'s connection (lock held)."""
        if member.id in self._members and self._members[member.id] is not old:
            member.id = self._spare_id()
        member.name, member.title, member.company = old.name, old.title, old.company
        member.status, member.mode, member.session_hash = old.status, old.mode, old.session_hash
        member.joined_at = old.joined_at
        # The token stood for its passwords (SPEC 7.1): the session's account and admin flag.
        member.account, member.admin = old.account, old.admin
        member.registered = True
        member.changed()
        # The same place in the registration order, under the new id.
        self._members = {(member.id if m is old else key): (member if m is old else m)
                         for key, m in self._members.items()}
        self._names[member.name.casefold()] = member
        self._viewers.pop(old.id, None)
        self._individual.pop(old.id, None)
        assert member.session_hash is not None
        self._sessions[member.session_hash] = member
        old.registered = False  # its handler, if still running, leaves nothing behind
        dropped, held = old.hold.flush()
        hold = self._new_hold(member)
        if after >= old.pushed_upto:
            hold.dropped = dropped  # else the replay from the log brings back what it dropped
        member.hold = hold
        online = len(self._members) + len(self._remote)
        welcome = Welcome(member.as_user(), online, self.max_frame, ref, seq=self.seq,
                          session=token, resumed=True, admin=member.admin)
        member.outbox.push(encode_event(welcome))
        self._to_everyone([self._notice("back", member)], member)
        missed = replay + [event for event in held if event.seq is None or event.seq > after]
        if member.mode is Mode.VIEWING:
            if hold.dropped:
                member.outbox.push(self._dropped_frame(hold.dropped))
                hold.dropped = 0
            if missed:
                member.outbox.push(b"".join(event.held for event in missed))
        else:
            for event in missed:
                hold.hold(event, self._next_key())
            if missed or hold.dropped:
                self.pending.changed(member)
        self._sort(member)
        self._save_session(member)

    def _dropped_frame(self, count: int) -> bytes:
        return encode_event(Notice("dropped", dropped_text(count), self._timestamp(),
                                   count=count, queued=True))

    def expire(self) -> int:
        """Remove, silently, the members whose resume window has ended; how many."""
        now = self.clock()
        with self.lock:
            gone = [m for m in self._sessions.values() if not m.connected and m.expires <= now]
            for member in gone:
                self._remove(member)  # the cluster heard it lost when it dropped
        for member in gone:
            self.log(f"{member.name}'s resume window ended ({self.online} online)")
        return len(gone)

    def restore(self, records: Iterable[SessionRecord]) -> int:
        """At start: the sessions a store kept, as members in their resume window (SPEC 6.4,
        the window counting from now); everything after the last run is replayed from the log."""
        if self.resume_window <= 0:
            return 0
        count = 0
        with self.lock:
            for record in records:
                if record.name.casefold() in self._names:
                    continue
                member = Member(self._spare_id(), GONE, Dialect.NATIVE, name=record.name,
                                title=record.title, company=record.company,
                                status=record.status, mode=Mode(record.mode), registered=True,
                                session_hash=record.token_hash, connected=False,
                                expires=self.clock() + self.resume_window,
                                pushed_upto=self.store.start_seq - 1, joined_at=time.time(),
                                account=record.account)
                member.admin = self.guard is not None and self.guard.is_admin(record.name,
                                                                               record.account)
                member.hold = self._new_hold(member)
                self._members[member.id] = member
                self._names[member.name.casefold()] = member
                self._sessions[record.token_hash] = member
                self._sort(member)
                self._save_session(member)
                count += 1
        return count

    def backlog(self, member: Member, before: int | None, after: int | None,
                limit: int) -> tuple[list[LoggedEvent], bool]:
        """SPEC 6.3 for ``member`` (outside the lock): the store, with the recent log for what
        it may not have committed yet."""
        viewer = Viewer(member.session_hash, _account_key(member))
        pages = [self.store.backlog(viewer, before, after, limit)]
        if self.recent is not self.store:
            pages.append(self.recent.backlog(viewer, before, after, limit))
        page = merge_pages(pages, after is not None, limit)
        return page.events, page.more

    # -- messages -----------------------------------------------------------------------------

    def broadcast(self, sender: Member, texts: list[str]) -> Delivery:
        """Send each text to every other registered member; one delivery count for them all.

        In a cluster the count includes the other nodes' members as this node last heard of
        them (viewing or line or plain: delivered; typing: queued), and the texts are published
        after the lock, from the sender's thread, so its events keep their order everywhere.
        """
        backplane = self.backplane
        with self.lock:
            ts = self._timestamp()
            events = [self._message(sender, t, None, ts) for t in texts]
            delivery = self._to_everyone(events, sender)
            if backplane is None:
                return delivery
            delivery += _reach(self._remote.values())
            record = sender.record(backplane.node)
        backplane.said(record, texts, ts)
        return delivery

    def _find(self, target: str | int) -> Member | None:
        """A member of this node or, in a cluster, of another node as last heard of here."""
        key = parse_target(target)
        if isinstance(key, int):
            return self._members.get(key) or self._remote.get(key)
        folded = key.casefold()
        return self._names.get(folded) or self._remote_names.get(folded)

    def direct(
        self, sender: Member, target: str | int, text: str, ref: Ref = None,
        name: str | None = None,
    ) -> tuple[Member, Delivery]:
        """Send ``text`` to one member; raises ``no-such-user`` or ``unavailable``.

        ``name``, with an id: the name the sender believes that id has; when the id is now
        someone else's (ids are reused file descriptors) it is ``no-such-user``, nothing sent.
        A member of another node is found in this node's mirror, or else asked of Redis (it
        may have joined a moment ago); the message is published after the lock.
        """
        backplane = self.backplane
        if not isinstance(parse_target(target), int):
            name = None  # by name: the name is the target itself
        with self.lock:
            recipient = _named(self._find(target), name)
            if recipient is None and backplane is None:
                raise _no_such_user(target, name, ref)
            if recipient is not None and recipient.node is None:
                _check_available(recipient, ref)
                delivery = self._deliver([self._message(sender, text, recipient)], [recipient])
                return recipient, delivery
        assert backplane is not None
        if recipient is None:
            record = backplane.lookup(target)
            if record is None or record["node"] == backplane.node:
                raise _no_such_user(target, name, ref)
            recipient = _named(Member.from_record(record), name)
            if recipient is None:
                raise _no_such_user(target, name, ref)
        _check_available(recipient, ref)
        with self.lock:
            ts = self._timestamp()
            sender_record = sender.record(backplane.node)
        backplane.sent(sender_record, {"id": recipient.id, "name": recipient.name}, text, ts)
        return recipient, _reach([recipient])

    # -- state of one member ------------------------------------------------------------------

    def _everyone(self) -> Iterable[Member]:
        """Members of this node and, in a cluster, of the others: in registration order."""
        if not self._remote:
            return self._members.values()
        return sorted([*self._members.values(), *self._remote.values()], key=_joined_at)

    def users(self) -> tuple[User, ...]:
        """Every registered member's ``user`` object, in registration order."""
        with self.lock:
            return tuple(member.as_user() for member in self._everyone())

    def names(self) -> list[str]:
        with self.lock:
            return [member.name for member in self._everyone()]

    def set_mode(self, member: Member, mode: Mode, reply: bytes) -> None:
        """Switch modes; push ``reply``, then on viewing everything held, before any live event."""
        with self.lock:
            member.mode = mode
            member.changed()
            if member.registered:
                self._sort(member)
                self._save_session(member)
            record = member.record(self.backplane.node) if self.backplane is not None else None
            member.outbox.push(reply)
            if mode is Mode.VIEWING:
                dropped, held = member.hold.flush()
                self.pending.flushed(member)
                if dropped:
                    member.outbox.push(self._dropped_frame(dropped))
                if held:
                    member.outbox.push(b"".join(event.held for event in held))
        if record is not None and self.backplane is not None:
            self.backplane.updated(record)

    def set_status(self, member: Member, status: str | None) -> str:
        """Set (or, with None, toggle) availability; return the new status."""
        with self.lock:
            if status is None:
                status = UNAVAILABLE if member.status == AVAILABLE else AVAILABLE
            member.status = status
            member.changed()
            self._save_session(member)
            if self.backplane is None:
                return status
            record = member.record(self.backplane.node)
        self.backplane.updated(record)
        return status

    def push(self, member: Member, data: bytes) -> None:
        """Put a reply in the member's outbox (under the lock, like every other put)."""
        with self.lock:
            member.outbox.push(data)

    def shutdown(self, members: Iterable[Member]) -> None:
        """Tell every member the server is stopping, at once, whatever its mode."""
        with self.lock:
            frame = encode_event(Notice("shutdown", SHUTDOWN_TEXT, self._timestamp()))
            for member in members:
                if member.dialect is Dialect.NATIVE:
                    member.outbox.push(frame)
                elif member.dialect is Dialect.PLAIN:
                    member.outbox.push(plain_frame(SHUTDOWN_TEXT))

    # -- the cluster's side (cluster.py calls these; never with Redis I/O under the lock) -------

    def cluster_records(self) -> list[dict[str, Any]]:
        """The cluster record of every member registered on this node."""
        assert self.backplane is not None
        with self.lock:
            return [member.record(self.backplane.node) for member in self._members.values()]

    def cluster_reset(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the mirror of the other nodes' members (empty while Redis is away)."""
        with self.lock:
            self._remote.clear()
            self._remote_names.clear()
            for record in records:
                self._mirror(Member.from_record(record))

    def remote(self, events: Iterable[dict[str, Any]]) -> None:
        """Apply events published by another node: mirror its members, deliver to ours.

        Messages and notices are rendered exactly as for a sender on this node; each event
        carries the sender's record and timestamp, so every node shows the same ones.
        """
        with self.lock:
            for event in events:
                kind = event["k"]
                if kind == "sync":
                    self._sync_node(int(event["node"]), event["users"])
                    continue
                sender = Member.from_record(event["u"])
                if kind == "say":
                    self._to_everyone(
                        [self._message(sender, text, None, event["ts"]) for text in event["t"]]
                    )
                elif kind == "dm":
                    recipient = self._members.get(int(event["to"]["id"]))
                    # The name too: the id's descriptor may have been reused a moment ago.
                    if recipient is not None and recipient.name == event["to"]["name"]:
                        message = self._message(sender, event["t"], recipient, event["ts"])
                        self._deliver([message], [recipient])
                elif kind == "join":
                    self._mirror(sender)
                    self._to_everyone([self._notice("joined", sender, event["ts"])])
                elif kind == "leave":
                    if self._unmirror(sender.id) is not None and not self.closing:
                        self._to_everyone([self._notice(event["e"], sender, event["ts"])])
                elif kind == "update":
                    self._mirror(sender)

    def _mirror(self, member: Member) -> None:
        self._unmirror(member.id)
        self._remote[member.id] = member
        self._remote_names[member.name.casefold()] = member

    def _unmirror(self, member_id: int) -> Member | None:
        old = self._remote.pop(member_id, None)
        if old is not None and self._remote_names.get(old.name.casefold()) is old:
            del self._remote_names[old.name.casefold()]
        return old

    def _sync_node(self, node: int, records: list[dict[str, Any]]) -> None:
        """A node (back after an outage) says who is on it: mirror exactly those, silently."""
        for member in [m for m in self._remote.values() if m.node == node]:
            self._unmirror(member.id)
        for record in records:
            self._mirror(Member.from_record(record))


_new_logged = tuple.__new__


def _account_key(member: Member) -> str | None:
    """The case-folded account ``member`` is logged in to, or None (SPEC 6.3: its own DMs)."""
    return None if member.account is None else name_key(member.account)


def _gap_frame(low: int, high: int, ts: str) -> bytes:
    """A ``gap`` notice (SPEC 6.4): the log no longer holds ``low`` to ``high``."""
    text = (f"Messages {low} to {high} are no longer available."
            if low != high else f"Message {low} is no longer available.")
    return encode_event(Notice("gap", text, ts, from_seq=low, to_seq=high))


def _name_taken(name: str, ref: Ref) -> Refusal:
    return Refusal(ErrorCode.NAME_TAKEN, f'The name "{name}" is taken; choose another.', ref)


def _named(member: Member | None, name: str | None) -> Member | None:
    """``member`` unless the sender named someone else for its id (SPEC 1.2)."""
    if member is None or name is None or member.name.casefold() == name.casefold():
        return member
    return None


def _no_such_user(target: str | int, name: str | None, ref: Ref) -> Refusal:
    """``no-such-user``; for an id the sender put a name on, the sentence names that name."""
    return Refusal(ErrorCode.NO_SUCH_USER, no_such_user_message(name or target), ref)


def _check_available(recipient: Member, ref: Ref) -> None:
    """Direct messages to an unavailable member are refused (seed 003)."""
    if recipient.status == UNAVAILABLE:
        raise Refusal(
            ErrorCode.UNAVAILABLE, f"{recipient.name} is unavailable right now.", ref
        )


def _reach(members: Iterable[Member]) -> Delivery:
    """How a message to members of other nodes counts in ``ok``, from what this node knows."""
    delivered = queued = 0
    for member in members:
        if member.dialect is Dialect.NATIVE and member.mode is Mode.TYPING:
            queued += 1
        else:
            delivered += 1
    return Delivery(delivered, queued)


def _joined_at(member: Member) -> float:
    return member.joined_at
