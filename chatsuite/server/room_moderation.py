"""The room's side of moderation (SPEC 7.3): finding a member, announcing a sanction.

``Moderation`` is what the handler's admin requests ask of the room; the rules themselves
(who may, mutes and bans) are in moderation.py.

Invariant: a sanction's notice is numbered, logged and delivered under the room lock like any
room event, and a removed target is told at once, whatever its mode, and leaves no session.
"""

from __future__ import annotations

from chatsuite.dialects import plain_frame
from chatsuite.server.members import Dialect, Event, Member
from chatsuite.server.room_core import RoomCore
from protocol import Notice, encode_event, parse_target


class Moderation(RoomCore):
    """Looking members up and announcing sanctions."""

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
