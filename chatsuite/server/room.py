"""The room: who is here, and who gets what (the server's core, apart from sockets and threads).

The ``Room`` keeps the registry of members (clients of every dialect) and makes every delivery
decision: who receives an event, whether it is shown live or held (seed 000 modes), and which
bytes each dialect gets. It talks back to the connections through one narrow interface, the
member's ``Outbox.push(bytes)``; the socket shell behind it does the writing.

Invariant: one lock (``Room.lock``) guards the registry and every ``push`` and ``hold``, and it
is held only for those decisions and queue puts, never for socket or Redis I/O. Because every
event a member receives is put in its outbox or hold queue under that lock, each member receives
events in one total order, and a flush of held events is never overtaken by a live one.

The room is composed, by job, of: room_core.py (the registry, delivery, holds and the message
path), room_log.py (backlog and replay), room_sessions.py (suspend, resume, the resume window),
room_cluster.py (the mirror of the other nodes' members) and room_moderation.py (sanctions).
This module adds registration, messages and each member's state, the public face of them all.

In a cluster (``--redis``, cluster.py) the room also keeps a mirror of the members of the other
nodes (``node`` set, no outbox), fed by the backplane's subscriber through ``remote()``; a room
without a backplane has an empty mirror and behaves exactly as a single server.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any

from chatsuite.dialects import line_hello, plain_frame
from chatsuite.server.members import Delivery, Dialect, Member
from chatsuite.server.room_cluster import ClusterMirror, _reach
from chatsuite.server.room_core import (
    FOREVER,
    NOTICE_TEXTS,
    RECENT_LIMIT,
    SHUTDOWN_TEXT,
    SPARE_IDS,
    TRIM_EVERY,
    Backplane,
    Guard,
)
from chatsuite.server.room_moderation import Moderation
from chatsuite.server.room_sessions import Sessions
from chatsuite.server.store import hash_token
from modes import Mode
from protocol import (
    AVAILABLE,
    UNAVAILABLE,
    ErrorCode,
    Notice,
    Ref,
    Refusal,
    User,
    Welcome,
    encode_event,
    no_such_user_message,
    parse_target,
)

# Re-exported: what other modules knew from here before the room was split by job.
__all__ = [
    "FOREVER",
    "NOTICE_TEXTS",
    "RECENT_LIMIT",
    "SHUTDOWN_TEXT",
    "SPARE_IDS",
    "TRIM_EVERY",
    "Backplane",
    "Guard",
    "Room",
]


class Room(Sessions, ClusterMirror, Moderation):
    """The one room: registration, delivery and the seed 000 hold rules for every member."""

    # -- registration -------------------------------------------------------------------------

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
                ended = self._end_reserved(name) if name is not None else None
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
        if ended is not None:
            self.log(f"{ended.name}'s earlier session ended: its account logged in again")
        self.log(
            f"{member.name} (id {member.id}, {member.dialect.value}) joined from "
            f"{member.address} ({online} online)"
        )

    def _check_registration(self, member: Member, name: str | None, ref: Ref) -> None:
        """Raise the ``Refusal`` that registering ``member`` as ``name`` deserves, if any."""
        self._check_name(member, name, ref)
        if name is not None and self.guard is not None:
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
