"""The room's cluster mirror (``--redis``, cluster.py): the members of the other nodes.

``ClusterMirror`` keeps the other nodes' members (``node`` set, no outbox) by id and by name,
fed by the backplane's subscriber through ``remote()``, which also delivers their messages and
notices to this node's members; ``_claim`` claims a name in Redis before registering.

Invariant: the mirror is changed only under the room lock, and never with Redis I/O under it;
a room without a backplane has an empty mirror and behaves exactly as a single server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from chatsuite.server.members import Delivery, Dialect, Member
from chatsuite.server.room_core import RoomCore, _name_taken
from modes import Mode
from protocol import Ref


class ClusterMirror(RoomCore):
    """The other nodes' members, as this node last heard of them."""

    def cluster_records(self) -> list[dict[str, Any]]:
        """The cluster record of every member connected to this node. A member in its resume
        window is not in the cluster: the others heard it lost and Redis freed its name; it
        is reserved on this node only, and claims its name again when it resumes (or never,
        when its window ends: claimed meanwhile by the keeper, the name stayed a ghost's)."""
        assert self.backplane is not None
        with self.lock:
            return [member.record(self.backplane.node) for member in self._members.values()
                    if member.connected]

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

        with self.lock:
            self._check_name(member, name, ref)
        if name is not None:
            claimed = self.backplane.claim(name, record(name))
            if claimed is False:
                raise _name_taken(name, ref)
            return name, bool(claimed)
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


def _reach(members: Iterable[Member]) -> Delivery:
    """How a message to members of other nodes counts in ``ok``, from what this node knows."""
    delivered = queued = 0
    for member in members:
        if member.dialect is Dialect.NATIVE and member.mode is Mode.TYPING:
            queued += 1
        else:
            delivered += 1
    return Delivery(delivered, queued)
