"""The store's values, and the memory store: ``--store none``, and the SQLite store's fallback.

What it owns: the store's interface (:class:`Store`), the typed records it keeps (an event of
the room's log, a session, an account, a ban), the privacy rule of backlog (SPEC 6.3) and
:class:`MemoryStore`, which keeps the log in a bounded deque and the rest in dicts. The
invariant: a backlog read returns a direct message only to a viewer that is one of its two
parties, by session or by account, never by name (names are reused).

MemoryStore takes no lock: ``deque.append`` (bounded by ``maxlen``, so the count limit trims as
it goes) and dict assignment are atomic under the GIL, and a read copies the deque in one C call
(``list(deque)`` never lets another thread in) before looking through the copy.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

MAX_LIMIT = 500  # SPEC 6.3: backlog limit 1-500


class LoggedEvent(NamedTuple):
    """One room event as logged: a NamedTuple so the room builds it once and SQLite takes it
    as the row's parameters. ``recipient`` is None for broadcasts and notices (everyone may
    read them); a direct message names its recipient and carries both parties' session hashes
    (:func:`store.hash_token`) and case-folded account names (None when not logged in)."""

    seq: int
    ts: float                 # seconds since the epoch (retention by age)
    kind: str                 # "message" or "notice"
    frame: bytes              # the event's native JSON frame, UTF-8, without the NUL
    sender_name: str | None = None
    sender_id: int | None = None
    recipient: str | None = None
    sender_session: str | None = None
    recipient_session: str | None = None
    sender_account: str | None = None
    recipient_account: str | None = None


class Viewer(NamedTuple):
    """Who asks for backlog: its session's hash and, when logged in, its case-folded account."""

    session: str | None
    account: str | None = None


class SessionRecord(NamedTuple):
    """A resumable session (SPEC 6.4), keyed by the hash of its token, never the token."""

    token_hash: str
    name: str
    title: str | None
    company: str | None
    status: str               # "available" or "unavailable"
    mode: int                 # 1 typing, 2 viewing
    last_seq: int             # the last seq the member was sent (or held up to)
    expires_at: float         # seconds since the epoch: the end of the resume window
    account: str | None = None
    member_id: int | None = None  # its id, reserved again after a restart (SPEC 6.4)


class AccountRecord(NamedTuple):
    """An account (SPEC 7.2): the case-folded name is the key; the hash string is opaque here."""

    key: str
    name: str
    password_hash: str
    created: float


class BanRecord(NamedTuple):
    """A ban on an account key or an address; ``until`` None means no end time."""

    key: str
    until: float | None


class BacklogPage(NamedTuple):
    """A backlog answer: events oldest first, and whether more exist past ``limit``."""

    events: list[LoggedEvent]
    more: bool


class Store(Protocol):
    """What the room and the access layer use; SqliteStore and MemoryStore both provide it."""

    history_limit: int  # --history-limit: events kept at most
    history_seconds: float  # --history-days, in seconds: events kept no longer

    @property
    def start_seq(self) -> int: ...
    @property
    def clean(self) -> bool: ...
    @property
    def last_logged_seq(self) -> int | None: ...
    def append(self, event: LoggedEvent) -> None: ...
    def backlog(self, viewer: Viewer, before: int | None = None, after: int | None = None,
                limit: int = 50) -> BacklogPage: ...
    def oldest_seq(self) -> int | None: ...
    def save_session(self, record: SessionRecord) -> None: ...
    def delete_session(self, token_hash: str) -> None: ...
    def load_sessions(self) -> list[SessionRecord]: ...
    def save_account(self, record: AccountRecord) -> None: ...
    def delete_account(self, key: str) -> None: ...
    def load_accounts(self) -> list[AccountRecord]: ...
    def save_ban(self, record: BanRecord) -> None: ...
    def delete_ban(self, key: str) -> None: ...
    def load_bans(self) -> list[BanRecord]: ...
    def flush(self, timeout: float = 5.0) -> bool: ...
    def close(self, timeout: float = 2.0) -> None: ...


def check_limit(limit: int) -> None:
    """Backlog's ``limit`` is 1 to 500 (the handler answers ``bad-request`` before this)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"backlog limit must be 1 to {MAX_LIMIT}, not {limit}")


def visible(event: LoggedEvent, viewer: Viewer) -> bool:
    """SPEC 6.3: broadcasts and notices for all; a DM only for its sender or recipient."""
    if event.recipient is None:
        return True
    session, account = viewer
    if session is not None and session in (event.sender_session, event.recipient_session):
        return True
    return account is not None and account in (event.sender_account, event.recipient_account)


def merge_pages(pages: Iterable[BacklogPage], forward: bool, limit: int) -> BacklogPage:
    """Merge pages read from several sources (the database and memory) into one."""
    pages = list(pages)
    if len(pages) == 1:
        return pages[0]
    by_seq = {event.seq: event for page in pages for event in page.events}
    events = [by_seq[seq] for seq in sorted(by_seq)]
    more = any(page.more for page in pages) or len(events) > limit
    return BacklogPage(events[:limit] if forward else events[-limit:], more)


HISTORY_BYTES = 64 * 1024 * 1024
"""The most bytes of event frames a memory store keeps (``--store none``), whatever its count."""


def _seq(event: LoggedEvent) -> int:
    return event.seq


def _ts(event: LoggedEvent) -> float:
    return event.ts


class MemoryStore:
    """The store's interface with nothing on disk (``--store none``): nothing survives a stop."""

    def __init__(self, *, history_days: float = 30, history_limit: int = 100_000,
                 clock: Callable[[], float] = time.time, start_seq: int = 1,
                 history_bytes: int = HISTORY_BYTES) -> None:
        self.history_seconds = history_days * 86400.0
        self._clock = clock
        self._start = start_seq
        # Bounded by count and by the bytes of the frames kept (SPEC 1.5: every byte the server
        # keeps counts against a documented bound; 100,000 events of 64 KiB would be 6 GiB).
        self._events: deque[LoggedEvent] = deque()
        self._limit = history_limit
        self.history_limit = history_limit
        self._max_bytes = history_bytes
        self._bytes = 0
        self._sessions: dict[str, SessionRecord] = {}
        self._accounts: dict[str, AccountRecord] = {}
        self._bans: dict[str, BanRecord] = {}

    @property
    def start_seq(self) -> int:
        """The first sequence number the room may assign."""
        return self._start

    @property
    def clean(self) -> bool:
        """Nothing was kept, so nothing can be missing."""
        return True

    @property
    def last_logged_seq(self) -> int | None:
        """Nothing survives a stop: always None."""
        return None

    def append(self, event: LoggedEvent) -> None:
        """Keep one room event; the oldest are dropped past ``history_limit`` events or
        ``history_bytes`` of frames (O(1) amortised: called under the room lock)."""
        events = self._events
        if len(events) >= self._limit:
            self._bytes -= len(events.popleft().frame)
        events.append(event)
        self._bytes += len(event.frame)
        while self._bytes > self._max_bytes and len(events) > 1:
            self._bytes -= len(events.popleft().frame)

    def backlog(self, viewer: Viewer, before: int | None = None, after: int | None = None,
                limit: int = 50) -> BacklogPage:
        """Logged events ``viewer`` may see, oldest first, within ``history_days``."""
        check_limit(limit)
        events = self._copy()
        cutoff = self._clock() - self.history_seconds
        found: list[LoggedEvent] = []
        candidates: Iterator[LoggedEvent]
        if after is not None:
            start = bisect.bisect_right(events, after, key=_seq)
            candidates = (events[i] for i in range(start, len(events)))
        else:
            end = len(events) if before is None else bisect.bisect_left(events, before, key=_seq)
            candidates = (events[i] for i in range(end - 1, -1, -1))
        for event in candidates:
            if event.ts < cutoff:
                if after is None:
                    break  # older ones are older still
                continue
            if visible(event, viewer):
                found.append(event)
                if len(found) > limit:
                    break
        more = len(found) > limit
        del found[limit:]
        if after is None:
            found.reverse()
        return BacklogPage(found, more)

    def __len__(self) -> int:
        return len(self._events)

    def oldest_seq(self) -> int | None:
        """The oldest seq still kept and younger than ``history_days`` (None when none)."""
        try:
            first = self._events[0]
        except IndexError:
            return None
        cutoff = self._clock() - self.history_seconds
        if first.ts >= cutoff:
            return first.seq
        events = self._copy()  # rare: something is past its age; find the first that is not
        young = bisect.bisect_left(events, cutoff, key=_ts)
        return events[young].seq if young < len(events) else None

    def _copy(self) -> list[LoggedEvent]:
        """The events, as one consistent list (no lock: appends run under the room's)."""
        while True:
            try:
                return list(self._events)  # one C call
            except RuntimeError:  # mutated during the copy (a finalizer let a thread in): again
                continue

    def save_session(self, record: SessionRecord) -> None:
        """Keep a session until the server stops."""
        self._sessions[record.token_hash] = record

    def delete_session(self, token_hash: str) -> None:
        """Forget a session."""
        self._sessions.pop(token_hash, None)

    def load_sessions(self) -> list[SessionRecord]:
        """Sessions not yet expired."""
        now = self._clock()
        return [s for s in list(self._sessions.values()) if s.expires_at > now]

    def save_account(self, record: AccountRecord) -> None:
        """Keep an account until the server stops (SPEC 7.2)."""
        self._accounts[record.key] = record

    def delete_account(self, key: str) -> None:
        """Remove an account."""
        self._accounts.pop(key, None)

    def load_accounts(self) -> list[AccountRecord]:
        """Every account."""
        return list(self._accounts.values())

    def save_ban(self, record: BanRecord) -> None:
        """Keep a ban until the server stops."""
        self._bans[record.key] = record

    def delete_ban(self, key: str) -> None:
        """Lift a ban."""
        self._bans.pop(key, None)

    def load_bans(self) -> list[BanRecord]:
        """Bans still in force."""
        now = self._clock()
        return [b for b in list(self._bans.values()) if b.until is None or b.until > now]

    def flush(self, timeout: float = 5.0) -> bool:
        """Nothing to write: always done."""
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Nothing to close."""
