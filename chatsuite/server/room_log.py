"""The room's log side: backlog reads (SPEC 6.3) and a resume's replay (SPEC 6.4).

``RoomLog`` reads what ``RoomCore._log_event`` wrote: the store, with the room's recent log
for the events the store may not have committed yet (its last 50 ms).

Invariant: these reads run outside the room lock (the store may be a database); they take
only the events the viewer may see, each once, in seq order, gaps said first.
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
        pages = [self.store.backlog(viewer, before, after, limit)]
        if self.recent is not self.store:
            pages.append(self.recent.backlog(viewer, before, after, limit))
        page = merge_pages(pages, after is not None, limit)
        return page.events, page.more

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


def _gap_frame(low: int, high: int, ts: str) -> bytes:
    """A ``gap`` notice (SPEC 6.4): the log no longer holds ``low`` to ``high``."""
    text = (f"Messages {low} to {high} are no longer available."
            if low != high else f"Message {low} is no longer available.")
    return encode_event(Notice("gap", text, ts, from_seq=low, to_seq=high))

