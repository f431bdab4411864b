"""The room's log side: backlog reads (SPEC 6.3) and a resume's replay (SPEC 6.4).

``RoomLog`` reads what ``RoomCore._log_event`` wrote: the store, with the room's recent log
for the events the store may not have committed yet (its last 50 ms).

Invariant: these reads run outside the room lock (the store may be a database); they take
only the events the viewer may see, each once, in seq order, each ``gap`` in its place.
"""

from __future__ import annotations

from chatsuite.server.members import Event, Member
from chatsuite.server.memstore import LoggedEvent, Store, Viewer, merge_pages
from chatsuite.server.room_core import RoomCore, _account_key
from protocol import Notice, encode_event


class RoomLog(RoomCore):
    """Reading the room's log: backlog and replay (outside the lock)."""

    def backlog(self, member: Member, before: int | None, after: int | None,
                limit: int) -> tuple[list[LoggedEvent], bool]:
        """SPEC 6.3 for ``member`` (outside the lock): the store, with the recent log for what
        it may not have committed yet."""
        viewer = Viewer(member.session_hash, _account_key(member))
        floor = self._floor()
        if after is not None:
            after = max(after, floor - 1)
        pages = [self.store.backlog(viewer, before, after, limit)]
        if self.recent is not self.store:
            pages.append(self.recent.backlog(viewer, before, after, limit))
        page = merge_pages(pages, after is not None, limit)
        events = [event for event in page.events if event.seq >= floor]
        more = page.more and (after is not None or (bool(events) and events[0].seq > floor))
        return events, more

    def _floor(self) -> int:
        """The oldest seq ``--history-limit`` allows now (0: no bound known here).

        The store deletes what is past the limit after each commit, so for a moment it may hold
        more; the recent log holds the newest events, so once it holds that many, its oldest is
        the bound, whatever the store has got to.
        """
        if len(self.recent) >= self.store.history_limit:
            return self.recent.oldest_seq() or 0
        return 0

    def _replay(self, token_hash: str, after: int, upto: int) -> list[Event]:
        """What a resuming member missed in (after, upto], from the log, in seq order (outside
        the lock): a ``gap`` for what retention deleted first, the logged events, then a ``gap``
        for the seqs a killed run reserved above its last stored one. The recent log is read
        when it reaches back far enough, else the store."""
        if upto <= after:
            return []
        events: list[LoggedEvent] = []
        gaps: list[tuple[int, int]] = []
        tail: list[Event] = []  # what a killed run may have handed out and never stored
        tail_low = upto + 1
        store = self.store
        if not store.clean and after < store.start_seq - 1:
            # Above every logged seq, so said after the logged events (docs/store.md: possibly
            # a false alarm; the killed run's last 50 ms at most).
            low = max(after, store.last_logged_seq or 0) + 1
            if low <= store.start_seq - 1:
                tail_low = low
                high = min(upto, store.start_seq - 1)
                tail.append(Event(_gap_frame(low, high, self._timestamp(), killed=True),
                                  None, None))
        floor = min(self._floor(), tail_low)
        if floor - 1 > after:  # past --history-limit already, though not yet deleted
            gaps.append((after + 1, floor - 1))
            after = floor - 1
        viewer = Viewer(token_hash)
        recent_oldest = self.recent.oldest_seq()
        cursor = after
        if recent_oldest is None or recent_oldest > after + 1:
            store.flush(1.0)  # rare (a long absence): what was appended is in the database
            oldest = store.oldest_seq()
            if oldest is None or oldest > after + 1:
                end = min(upto if oldest is None else oldest - 1, tail_low - 1)
                if end > after:
                    low = gaps.pop()[0] if gaps else after + 1  # one gap, not two adjacent
                    gaps.append((low, end))
            cursor = self._page(store, viewer, cursor, upto, events)
        self._page(self.recent, viewer, cursor, upto, events)
        out = [Event(_gap_frame(low, high, self._timestamp()), None, None)
               for low, high in gaps]
        out.extend(Event(e.frame + b"\0", None, None, e.seq) for e in events
                   if e.sender_session != token_hash)
        return out + tail

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


def _gap_frame(low: int, high: int, ts: str, killed: bool = False) -> bytes:
    """A ``gap`` notice (SPEC 6.4): the log no longer holds ``low`` to ``high``; ``killed``:
    those are the seqs a server killed (SIGKILL) had reserved, of which only the last moment's
    were handed out, if any, and so not stored."""
    if killed:
        text = (f"Messages after {low - 1} sent in the moment before the server was killed may "
                "have been lost.")
    else:
        text = (f"Messages {low} to {high} are no longer available."
                if low != high else f"Message {low} is no longer available.")
    return encode_event(Notice("gap", text, ts, from_seq=low, to_seq=high))

