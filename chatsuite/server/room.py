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

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Protocol

from chatsuite.dialects import line_delivery, line_hello, plain_frame
from chatsuite.server.members import Delivery, Dialect, Event, Member, Outbox, push_each
from chatsuite.server.pending import NO_NOTES, PendingNotes
from modes import PENDING_BYTES, PENDING_LIMIT, HoldQueue, Mode, dropped_text
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
        backplane: Backplane | None = None,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.lock = threading.Lock()
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

    def _deliver(self, events: list[Event], recipients: Iterable[Member]) -> Delivery:
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
        for member in recipients:
            if member.dialect is Dialect.NATIVE and member.mode is not Mode.VIEWING:
                for event in events:
                    member.hold.hold(event, len(event.live))
                self.pending.changed(member)
                queued += 1
                continue
            data = render(member.dialect)
            if data:
                member.outbox.push(data)
                delivered += 1
        return Delivery(delivered, queued)

    def _to_everyone(self, events: list[Event], skip: Member | None = None) -> Delivery:
        """Deliver events to every registered member of this node but ``skip``."""
        live = events[0].live if len(events) == 1 else b"".join(e.live for e in events)
        delivered = self.fan_out(
            self._viewers.values(), live, skip.outbox if skip is not None else None
        )
        rest = self._deliver(events, [m for m in self._individual.values() if m is not skip])
        return Delivery(delivered + rest.delivered, rest.queued)

    def _sort(self, member: Member) -> None:
        """File a registered member under how events reach it (after joining or a mode change)."""
        if member.dialect is Dialect.NATIVE and member.mode is Mode.VIEWING:
            self._individual.pop(member.id, None)
            self._viewers[member.id] = member.outbox
        else:
            self._viewers.pop(member.id, None)
            self._individual[member.id] = member

    def _notice(self, kind: str, member: Member, ts: str | None = None) -> Event:
        text = NOTICE_TEXTS[kind].format(name=member.name)
        notice = Notice(kind, text, ts or self._timestamp(), member.as_user())
        return Event(encode_event(notice), None, plain_frame(text))

    def _message(
        self, sender: Member, text: str, to: Member | None, ts: str | None = None
    ) -> Event:
        to_json = "null" if to is None else encode_json({"id": to.id, "name": to.name})
        live = message_frame(sender.user_json(), to_json, text, ts or self._timestamp())
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
        member.hold = HoldQueue(self.pending_limit, self.pending_bytes)
        member.changed()
        if member.dialect is Dialect.NATIVE:
            online = len(self._members) + len(self._remote) + 1
            welcome = Welcome(member.as_user(), online, self.max_frame, ref,
                              admin=member.admin)
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
            del self._members[member.id]
            del self._names[member.name.casefold()]
            self._viewers.pop(member.id, None)
            self._individual.pop(member.id, None)
            member.registered = False
            if notify and not self.closing:
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
        it leaves now, ``lost`` to the others and its name free (SPEC 1.5). The one place a
        resume window (SPEC 6.4) would keep it reserved instead."""
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
            notice = Notice(kind, text, self._timestamp(), user, by=by, reason=reason)
            event = Event(encode_event(notice), None, plain_frame(text))
            if remove and target is not None:
                # The target is told at once, whatever its mode (like shutdown): it is leaving.
                self._to_everyone([event], skip=target)
                if target.dialect is not Dialect.LINE:
                    target.outbox.push(event.live if target.dialect is Dialect.NATIVE
                                       else plain_frame(text))
            else:
                self._to_everyone([event])
            if remove and target is not None:
                del self._members[target.id]
                del self._names[target.name.casefold()]
                self._viewers.pop(target.id, None)
                self._individual.pop(target.id, None)
                target.registered = False
            online = len(self._members)
        if remove and target is not None:
            self.log(f"{target.name} (id {target.id}) {kind} by {by} ({online} online)")
        return True

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
            record = member.record(self.backplane.node) if self.backplane is not None else None
            member.outbox.push(reply)
            if mode is Mode.VIEWING:
                dropped, held = member.hold.flush()
                self.pending.flushed(member)
                if dropped:
                    notice = Notice("dropped", dropped_text(dropped), self._timestamp(),
                                    count=dropped, queued=True)
                    member.outbox.push(encode_event(notice))
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
