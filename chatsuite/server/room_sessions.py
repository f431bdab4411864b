"""The room's sessions (SPEC 6.4): suspend, resume, the resume window and its reserved ids.

``Sessions`` keeps a native member whose connection ended without ``quit`` listed, not
connected, its name and id reserved and everything for it held, until it resumes (``resume``,
on any connection with its token) or its window ends (``expire``); ``restore`` brings back the
sessions a store kept across a restart.

Invariant: a session (by token hash, ``_sessions``) belongs to at most one registered member,
and a resumed member gets what it missed after its ``last_seq`` exactly once, in order, before
any later event; the log is read outside the lock, the take-over is one step under it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace

from chatsuite.server.members import GONE, Dialect, Event, Member
from chatsuite.server.memstore import SessionRecord
from chatsuite.server.room_core import SPARE_IDS
from chatsuite.server.room_log import RoomLog
from chatsuite.server.store import hash_token
from modes import Mode
from protocol import Ref, Welcome, encode_event


class Sessions(RoomLog):
    """Suspended members, their resume and their expiry."""

    def end_session(self, member: Member) -> None:
        """End ``member``'s session (lock held): cut off, it leaves rather than waiting for a
        resume (its name lost to another node after a cluster outage)."""
        if member.session_hash is not None and self._sessions.get(member.session_hash) is member:
            del self._sessions[member.session_hash]
            self.store.delete_session(member.session_hash)
        member.session_hash = None

    def _restored_id(self, record: SessionRecord) -> int:
        """The id a restored session had, reserved again for its window (SPEC 6.4: a message
        to that id must not reach whoever the new run gives that descriptor); a spare one when
        it has none, or in a cluster (the node's number may have changed). Lock held."""
        kept = record.member_id
        if kept is None or self.backplane is not None or kept in self._members:
            return self._spare_id()
        return kept

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

    def _end_reserved(self, name: str) -> Member | None:
        """End, silently as at the window's end, the reserved session that holds ``name``,
        if any; its owner is logging in again (``_owner_of_reserved``). Lock held."""
        holder = self._names.get(name.casefold())
        if holder is None or holder.connected:
            return None
        self._remove(holder)
        return holder

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
                member = Member(self._restored_id(record), GONE, Dialect.NATIVE, name=record.name,
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

