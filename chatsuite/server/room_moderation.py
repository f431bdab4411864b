"""The room's side of moderation (SPEC 7.3): finding a member, announcing a sanction.

``Moderation`` is what the handler's admin requests ask of the room; the rules themselves
(who may, mutes and bans) are in moderation.py.

In a cluster (``--redis``) a sanction is one ``moderate`` event for the whole room: the node
that gives it renders its notice here and publishes the event (``announce``); every other node
renders the same notice from it (same text, same timestamp), and the target's node also
removes its member (kick, ban). A removed member's ``leave`` follows the ``moderate`` event on
the channel, after every node has unmirrored it, so it adds no ``lost`` notice anywhere.

Invariant: a sanction's notice is numbered, logged and delivered under the room lock like any
room event, and a removed target is told at once, whatever its mode, and leaves no session.
"""

from __future__ import annotations

from typing import Any

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

    def remote_named(self, target: str | int) -> Member | None:
        """The member of another node ``target`` names, as this node last heard of it."""
        key = parse_target(target)
        with self.lock:
            if isinstance(key, int):
                return self._remote.get(key)
            return self._remote_names.get(key.casefold())

    def moderated(self, kind: str, target: Member | None, text: str, *, by: str,
                  reason: str | None, remove: bool, ts: str | None = None,
                  announce: dict[str, Any] | None = None) -> bool:
        """Tell everyone (``target`` too) the ``kind`` notice (kicked, muted, unmuted, banned)
        naming the admin ``by``; with ``remove``, take ``target`` out of the room at once
        (no ``lost`` notice follows: the notice said why). False when ``target`` had left.

        ``target`` may be a member of another node (``node`` set): with ``remove`` it is only
        unmirrored here, its own node removes it. ``ts``: the notice's time (another node's
        event's). ``announce``: in a cluster, the ``moderate`` event to publish (this node gave
        the sanction); it gets the notice's time and the target's record here.
        """
        backplane = self.backplane
        remote = target is not None and target.node is not None
        with self.lock:
            if remove and target is not None and self._gone(target, checked=announce is not None):
                return False
            user = target.as_user() if target is not None else None
            # A room event (SPEC 6.1): numbered and logged, the admin as its sender.
            self.seq += 1
            when = ts if ts is not None else self._timestamp()
            notice = Notice(kind, text, when, user, by=by, reason=reason, seq=self.seq)
            live = encode_event(notice)
            sender = self._names.get(by.casefold()) or target
            if sender is not None:
                self._log_event("notice", live, sender, None)
            event = Event(live, None, plain_frame(text), self.seq)
            record = None
            if remove and target is not None:
                record = self._take_out(target, event, text)
            else:
                self._to_everyone([event])
            online = len(self._members)
            if announce is not None and backplane is not None:
                node = backplane.node if target is None or target.node is None else target.node
                announce = {**announce, "ts": when,
                            "u": None if target is None else target.record(node)}
        if announce is not None and backplane is not None:
            backplane.moderated(announce)  # before its leave: the others unmirror it first
        if record is not None and backplane is not None:
            backplane.left(record, "lost")  # frees its name in the cluster
        if remove and target is not None and not remote:
            self.log(f"{target.name} (id {target.id}) {kind} by {by} ({online} online)")
        return True

    def _gone(self, target: Member, *, checked: bool) -> bool:
        """Has ``target`` left (lock held)? A member of another node is checked only by the
        node giving the sanction (``checked``): the others render what it decided."""
        if target.node is None:
            return self._members.get(target.id) is not target
        return checked and _mirrored(self._remote.get(target.id), target) is None

    def _take_out(self, target: Member, event: Event, text: str) -> dict[str, Any] | None:
        """Tell everyone ``event`` and take ``target`` out of the room (lock held); a member of
        another node is only unmirrored (its node removes it). Returns the cluster record of
        a member of this node removed in a cluster (its leave is published)."""
        if target.node is not None:
            self._to_everyone([event])
            mirrored = _mirrored(self._remote.get(target.id), target)
            if mirrored is not None:
                del self._remote[target.id]
                if self._remote_names.get(mirrored.name.casefold()) is mirrored:
                    del self._remote_names[mirrored.name.casefold()]
            return None
        # The target is told at once, whatever its mode (like shutdown): it is leaving.
        self._to_everyone([event], skip=target)
        if target.dialect is not Dialect.LINE:
            target.outbox.push(event.live if target.dialect is Dialect.NATIVE
                               else plain_frame(text))
        record = target.record(self.backplane.node) if self.backplane is not None else None
        self._remove(target)  # its session ends too, not kept for resuming (SPEC 7.3)
        return record

def _mirrored(mirrored: Member | None, target: Member) -> Member | None:
    """The mirror's member if it is still ``target`` (an id may be someone else's by now)."""
    if mirrored is not None and mirrored.name == target.name:
        return mirrored
    return None
