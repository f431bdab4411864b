"""The durable room's store: the event log, sessions, accounts and bans, in SQLite (SPEC 6.2).

What it owns: one SQLite database (WAL) and the one thread that writes it. Chat threads hand it
work with :meth:`SqliteStore.append` and the ``save_*``/``delete_*`` methods, which put an item on
a bounded deque and return: O(1), one small allocation at most, never a lock the writer holds,
never sqlite. The writer thread drains the deque, gathers for up to ``BATCH_WINDOW`` (so one
commit covers many events; at once when ``LARGE_BATCH`` items wait) and commits, so an event is
committed within 50 ms of being handed over. Reads (backlog, the ``load_*`` calls at start) run
on the caller's thread through a separate read-only connection: WAL lets them run beside the
writer, and they never take the room's lock (the caller must not hold it either).

The invariant: a sequence number the room handed out is never handed out again, not even after a
SIGKILL and a restart. The room assigns ``seq`` in memory (no disk wait), starting at
:attr:`start_seq`. The store keeps a high-water mark ``reserved`` in its ``meta`` table, committed
*ahead* of the room: on open it commits ``reserved = start_seq - 1 + reserve``, and whenever the
room's latest seq comes within ``reserve // 2`` of the mark, the writer commits
``reserved = latest + reserve`` (in the same transaction as the events it is writing). A clean
close writes ``reserved = latest`` (so a restart continues at latest + 1, without a jump). After a
crash the next start is ``reserved + 1``, above anything any client could have been sent, unless
the room ran past the committed mark: that needs ``reserve // 2`` events (500 million by default)
handed out while the writer could not commit once. This server's peak is about 120,000 room
events a second (all-to-all in docs/performance.md), so the writer would have to be stalled for
over an hour at full load; the jump of at most ``reserve`` per crash leaves room for millions of
crashes below 2**53 (the largest integer every JSON reader keeps exactly).

What a SIGKILL can lose: the events not yet committed, at most the last ``BATCH_WINDOW`` plus one
commit (under 50 ms), never a committed one. ``synchronous=NORMAL`` in WAL mode writes each commit
to the WAL file without an fsync (fsync at checkpoints only): a committed transaction survives the
process being killed (it is in the OS's page cache), and only a power loss or OS crash could take
the last commits back, which SPEC 6.2 does not promise against; ``FULL`` would add an fsync to
every 50 ms commit and stall the writer on slow disks.

Failures: a store that cannot be opened raises :class:`StoreError` (a sentence) at start. A store
that fails later (disk full, file removed, any ``sqlite3.Error`` in the writer) is logged once and
goes on memory-only: events go to an in-memory log (:class:`MemoryStore`, bounded the same way)
that backlog reads merge with the database, and every write not stored is counted. A full deque
(the writer stalled, e.g. by another process's lock) is handled the same way for the overflowing
items only: they are kept in memory and counted, logged by the writer once it moves again, and
the store goes on writing when the deque drains. ``--store none`` is :class:`MemoryStore` itself,
with the same interface, so the room never special-cases it.

Length: about 80 lines past STYLE's ~500, kept whole on purpose: the writer thread, its batching
and the reservation of sequence numbers are one invariant, and the records, the interface and
the memory store already live apart in ``memstore.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, one server per file is up to the operator
    fcntl = None  # type: ignore[assignment]

from chatsuite.server.memstore import (
    AccountRecord,
    BacklogPage,
    BanRecord,
    LoggedEvent,
    MemoryStore,
    SessionRecord,
    Store,
    Viewer,
    check_limit,
    merge_pages,
)

__all__ = [
    "AccountRecord", "BacklogPage", "BanRecord", "LoggedEvent", "MemoryStore", "SessionRecord",
    "SqliteStore", "Store", "StoreError", "StoreStats", "Viewer", "hash_token", "open_store",
]

BATCH_WINDOW = 0.02     # seconds the writer gathers after the first item: commit well within 50 ms
LARGE_BATCH = 512       # items waiting that make the writer commit at once
MAX_BATCH = 10_000      # items in one transaction at most (about 60 ms of writing)
QUEUE_LIMIT = 100_000   # items waiting past which appends overflow to memory (see docs/store.md)
QUEUE_BYTES = 64 * 1024 * 1024  # and frame bytes waiting: 100,000 frames of 64 KiB would be 6 GB
DELETE_BATCH = 500      # rows per retention transaction, so no transaction is long
RESERVE = 1_000_000_000  # sequence numbers reserved ahead (see the module docstring)
HOUSEKEEP_EVERY = 1.0   # seconds (of the injected clock) between retention passes
IDLE_WAKE = 0.2         # seconds the idle writer sleeps before looking at housekeeping again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, frame BLOB NOT NULL,
    sender_name TEXT, sender_id INTEGER, recipient TEXT,
    sender_session TEXT, recipient_session TEXT, sender_account TEXT, recipient_account TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, title TEXT, company TEXT,
    status TEXT NOT NULL, mode INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    expires_at REAL NOT NULL, account TEXT, member_id INTEGER);
CREATE TABLE IF NOT EXISTS accounts (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, password_hash TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS bans (key TEXT PRIMARY KEY, until REAL);
"""
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # primary result codes worth a retry
_INSERT_EVENT = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
ROWS_PER_INSERT = 90  # 990 parameters: under SQLite's oldest limit of 999 per statement
_INSERT_ROWS = "INSERT INTO events VALUES " + ", ".join(
    ["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * ROWS_PER_INSERT)
# An upsert, not INSERT OR REPLACE: the row keeps its rowid, the registration order a restart
# restores the members in (SPEC 1.2: users in registration order).
_SAVE_SESSION = ("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                 " ON CONFLICT(token_hash) DO UPDATE SET name = excluded.name,"
                 " title = excluded.title, company = excluded.company, status = excluded.status,"
                 " mode = excluded.mode, last_seq = excluded.last_seq,"
                 " expires_at = excluded.expires_at, account = excluded.account,"
                 " member_id = excluded.member_id")
_SAVE_ACCOUNT = "INSERT OR REPLACE INTO accounts VALUES (?, ?, ?, ?)"
_SAVE_BAN = "INSERT OR REPLACE INTO bans VALUES (?, ?)"
_VISIBLE = ("(recipient IS NULL OR sender_session = :s OR recipient_session = :s"
            " OR sender_account = :a OR recipient_account = :a)")
_COLUMNS = ("seq, ts, kind, frame, sender_name, sender_id, recipient,"
            " sender_session, recipient_session, sender_account, recipient_account")


class StoreError(Exception):
    """The store cannot be opened; the message is a sentence for the operator."""


def hash_token(token: str) -> str:
    """The only form of a session token the store keeps: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _is_busy(error: sqlite3.Error) -> bool:
    """The database is locked by another connection: worth a retry, not a failure."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF in _BUSY


def _lock_exclusively(path: str) -> int | None:
    """Hold an exclusive ``flock`` on the database file for this store's life: two servers
    handing out seqs from one file would repeat them. (Not on Windows: no ``fcntl``.)"""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise StoreError(f"The store {path} cannot be opened: {error.strerror}.") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        raise StoreError(f"The store {path} is in use by another server.") from error
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


class _Op(NamedTuple):
    """A write other than an event: one SQL statement and its parameters."""

    sql: str
    params: tuple[object, ...]


@dataclass
class StoreStats:
    """Counters for the log and the tests; approximate under concurrent callers (no lock)."""

    committed: int = 0     # events committed to the database
    overflowed: int = 0    # items that found the queue full (kept in memory, not stored)
    dropped: int = 0       # items not stored because the store had failed
    failed: bool = False   # the writer hit an error and the store is memory-only


def open_store(path: str, *, history_days: float = 30, history_limit: int = 100_000,
               log: Callable[[str], None] = lambda line: None,
               clock: Callable[[], float] = time.time) -> Store:
    """``--store PATH``: the SQLite store at PATH, or the memory store for ``none``."""
    if path == "none":
        return MemoryStore(history_days=history_days, history_limit=history_limit, clock=clock)
    return SqliteStore(path, history_days=history_days, history_limit=history_limit, log=log,
                       clock=clock)


class SqliteStore:
    """The log, sessions, accounts and bans in one SQLite file, written by one thread."""

    def __init__(self, path: str, *, history_days: float = 30, history_limit: int = 100_000,
                 log: Callable[[str], None] = lambda line: None,
                 clock: Callable[[], float] = time.time, reserve: int = RESERVE,
                 queue_limit: int = QUEUE_LIMIT, queue_bytes: int = QUEUE_BYTES) -> None:
        self.path = path
        self.history_seconds = history_days * 86400.0
        self.history_limit = history_limit
        self.stats = StoreStats()
        self._log = log
        self._clock = clock
        self._reserve = reserve
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        # The frame bytes queued are _bytes_in - _bytes_out: each counter has one writer (the
        # room lock serialises append(); the writer thread takes), so neither needs a lock.
        self._bytes_in = 0
        self._bytes_out = 0
        # A deque, not queue.Queue: append/popleft are atomic under the GIL and take no lock,
        # so a chat thread's put costs a length check and one append; the bound is ours.
        self._queue: deque[LoggedEvent | _Op | threading.Event] = deque()
        self._wake = threading.Event()     # set by the first item of a batch, and by close()
        self._large = threading.Event()    # set when LARGE_BATCH items wait: commit at once
        self._closing = False
        self._failed = False
        self._busy = False  # the last batch found the database locked by another process
        self._next_housekeep = 0.0  # when (by the injected clock) retention by age runs next
        self._overflow_logged = 0  # stats.overflowed when the writer last logged it
        self._memory = MemoryStore(history_days=history_days, history_limit=history_limit,
                                   clock=clock)
        self._read_lock = threading.Lock()  # one read connection shared by reading threads
        self._conn, self._reader = self._open()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # -- opening ---------------------------------------------------------------------------
    def _open(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        self._lock_fd = _lock_exclusively(self.path)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
            # check_same_thread=False: opened here (so errors surface at start), used only by
            # the writer thread from then on.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn = conn  # closed below if opening fails past this point
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"The store {self.path} cannot use WAL journaling ({mode}).")
            conn.execute("PRAGMA synchronous=NORMAL")  # why: see the module docstring
            conn.execute("PRAGMA busy_timeout=1000")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
            if "member_id" not in columns:  # a store written before ids were kept
                conn.execute("ALTER TABLE sessions ADD COLUMN member_id INTEGER")
            self._recover(conn)
            reader = sqlite3.connect(f"{Path(self.path).resolve().as_uri()}?mode=ro", uri=True,
                                     isolation_level=None, check_same_thread=False)
            reader.execute("PRAGMA busy_timeout=1000")
        except (sqlite3.Error, StoreError) as error:
            if hasattr(self, "_conn"):
                self._conn.close()
            _unlock(self._lock_fd)
            if isinstance(error, StoreError):
                raise
            raise StoreError(f"The store {self.path} cannot be opened: {error}.") from error
        return conn, reader

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Read the marks left by the last run and reserve this run's first block of seqs."""
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        top = conn.execute("SELECT max(seq), count(*) FROM events").fetchone()
        self._last_logged: int | None = top[0]
        self._count: int = top[1]
        reserved = max(int(meta.get("reserved", 0)), top[0] or 0)
        self._clean = bool(meta.get("clean", 1)) if meta else True
        self._start = reserved + 1
        self._last_seq = reserved  # the latest seq handed to append (by the room)
        self._reserved = reserved + self._reserve
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                         [("reserved", self._reserved), ("clean", 0), ("schema", 1)])
        conn.execute("COMMIT")

    @property
    def start_seq(self) -> int:
        """The first sequence number the room may assign in this run."""
        return self._start

    @property
    def clean(self) -> bool:
        """False when the last run ended without close() (killed): events may be missing."""
        return self._clean

    @property
    def last_logged_seq(self) -> int | None:
        """The highest seq the log held when opened (None: empty)."""
        return self._last_logged

    @property
    def failed(self) -> bool:
        """True once the store has gone memory-only."""
        return self._failed

    # -- the caller's side: never waits ----------------------------------------------------
    def append(self, event: LoggedEvent) -> None:
        """Hand one room event to the writer: O(1), no lock, no sqlite (the room lock is held)."""
        # Inlined _put(): this runs once per room event under the room lock (about 0.3 us).
        self._last_seq = event[0]
        queue = self._queue
        if (self._failed or len(queue) >= self._queue_limit
                or self._bytes_in - self._bytes_out >= self._queue_bytes):
            self._keep_in_memory(event)
            return
        self._bytes_in += len(event[3])  # the frame
        queue.append(event)
        waiting = len(queue)
        if waiting == 1:
            self._wake.set()
        elif waiting == LARGE_BATCH:
            self._large.set()

    def _put(self, item: LoggedEvent | _Op) -> None:
        queue = self._queue
        if self._failed or len(queue) >= self._queue_limit:
            self._keep_in_memory(item)
            return
        queue.append(item)
        waiting = len(queue)
        if waiting == 1:
            self._wake.set()
        elif waiting == LARGE_BATCH:
            self._large.set()

    def _keep_in_memory(self, item: LoggedEvent | _Op) -> None:
        if self._failed:
            self.stats.dropped += 1
        else:
            self.stats.overflowed += 1
        if isinstance(item, LoggedEvent):
            self._memory.append(item)

    def save_session(self, record: SessionRecord) -> None:
        """Insert or replace a session (keyed by its token's hash); queued like append()."""
        self._put(_Op(_SAVE_SESSION, tuple(record)))

    def delete_session(self, token_hash: str) -> None:
        """Forget a session (quit, kick, expiry); queued."""
        self._put(_Op("DELETE FROM sessions WHERE token_hash = ?", (token_hash,)))

    def save_account(self, record: AccountRecord) -> None:
        """Insert or replace an account (keyed by its case-folded name); queued."""
        self._put(_Op(_SAVE_ACCOUNT, tuple(record)))

    def delete_account(self, key: str) -> None:
        """Remove an account by its case-folded name; queued."""
        self._put(_Op("DELETE FROM accounts WHERE key = ?", (key,)))

    def save_ban(self, record: BanRecord) -> None:
        """Insert or replace a ban; queued."""
        self._put(_Op(_SAVE_BAN, tuple(record)))

    def delete_ban(self, key: str) -> None:
        """Lift a ban; queued."""
        self._put(_Op("DELETE FROM bans WHERE key = ?", (key,)))

    # -- reads: the caller's thread, never under the room lock -----------------------------
    def backlog(self, viewer: Viewer, before: int | None = None, after: int | None = None,
                limit: int = 50) -> BacklogPage:
        """Logged events ``viewer`` may see, oldest first (SPEC 6.3); DMs only its own."""
        check_limit(limit)
        pages = []
        if self._memory.oldest_seq() is not None:  # only after an overflow or a failure
            pages.append(self._memory.backlog(viewer, before, after, limit))
        if after is not None:
            where, order = f"seq > :x AND {_VISIBLE}", "ASC"
        elif before is not None:
            where, order = f"seq < :x AND {_VISIBLE}", "DESC"
        else:
            where, order = _VISIBLE, "DESC"
        sql = f"SELECT {_COLUMNS} FROM events WHERE {where} ORDER BY seq {order} LIMIT :n"
        params = {"x": after if after is not None else before, "s": viewer.session,
                  "a": viewer.account, "n": limit + 1}
        rows = self._read(sql, params)
        if rows is not None:
            events = [LoggedEvent(*row) for row in rows]
            more = len(events) > limit
            del events[limit:]
            if order == "DESC":
                events.reverse()
            pages.append(BacklogPage(events, more))
        return merge_pages(pages, after is not None, limit)

    def oldest_seq(self) -> int | None:
        """The oldest seq the log still holds (a resume from before it gets a ``gap``)."""
        rows = self._read("SELECT min(seq) FROM events", {})
        stored = rows[0][0] if rows else None
        kept = self._memory.oldest_seq()
        return min((s for s in (stored, kept) if s is not None), default=None)

    def load_sessions(self) -> list[SessionRecord]:
        """Sessions not yet expired (by the injected clock), in registration order, read at
        start."""
        rows = self._read("SELECT * FROM sessions WHERE expires_at > :t ORDER BY rowid",
                          {"t": self._clock()})
        return [SessionRecord(*row) for row in rows or ()]

    def load_accounts(self) -> list[AccountRecord]:
        """Every account, read at start."""
        return [AccountRecord(*row) for row in self._read("SELECT * FROM accounts", {}) or ()]

    def load_bans(self) -> list[BanRecord]:
        """Bans still in force (``until`` None: no end time), read at start."""
        rows = self._read("SELECT * FROM bans WHERE until IS NULL OR until > :t",
                          {"t": self._clock()})
        return [BanRecord(*row) for row in rows or ()]

    def _read(self, sql: str, params: Mapping[str, object]) -> list[tuple[Any, ...]] | None:
        """Run one query on the read connection; None (and a log line) when it fails."""
        try:
            with self._read_lock:
                return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as error:
            self._log(f"store: read failed: {error}")
            return None

    # -- stopping --------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything handed over so far is committed (not for chat threads)."""
        if self._failed or not self._thread.is_alive():
            return False
        done = threading.Event()
        self._queue.append(done)  # past the bound on purpose: a marker, not data
        self._wake.set()
        return done.wait(timeout) and not self._failed

    def close(self, timeout: float = 2.0) -> None:
        """Commit what is queued, mark a clean stop and close; gives up after ``timeout``."""
        self._closing = True
        self._wake.set()
        self._large.set()
        self._thread.join(timeout)
        with self._read_lock:
            self._reader.close()
        if not self._thread.is_alive():  # a writer still stuck keeps the file locked
            _unlock(self._lock_fd)
            self._lock_fd = None

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            more = False  # retention left work for the next pass: do not sleep
            while True:
                if not self._queue and not self._closing and not more:
                    self._wake.wait(IDLE_WAKE)
                self._wake.clear()
                if self._queue and not self._closing and len(self._queue) < LARGE_BATCH:
                    self._large.wait(BATCH_WINDOW)  # gather: one commit for many events
                self._large.clear()
                if not self._failed:
                    self._write_batch()
                    self._report_overflow()
                    more = self._housekeep()
                else:
                    self._drain_failed()
                if self._closing and not self._queue:
                    break
            self._finish()
        except Exception as error:
            # A bug here must not leave appends queueing for nobody: memory-only from now on.
            self._failed = self.stats.failed = True
            self._log(f"store: writer stopped by an unexpected error ({error!r}); going on in"
                      " memory only, new events are not stored")
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()

    def _take(self) -> tuple[list[LoggedEvent], list[_Op], list[threading.Event]]:
        events: list[LoggedEvent] = []
        ops: list[_Op] = []
        markers: list[threading.Event] = []
        queue = self._queue
        taken = 0
        for _ in range(min(len(queue), MAX_BATCH)):  # no transaction grows long
            try:
                item = queue.popleft()
            except IndexError:
                break
            if type(item) is LoggedEvent:
                events.append(item)
                taken += len(item.frame)
            elif isinstance(item, _Op):
                ops.append(item)
            else:
                markers.append(item)  # type: ignore[arg-type]
        self._bytes_out += taken
        return events, ops, markers

    def _write_batch(self) -> None:
        events, ops, markers = self._take()
        latest = self._last_seq
        reserve = latest + self._reserve if latest + self._reserve // 2 > self._reserved else 0
        if events or ops or reserve:
            try:
                self._transaction(events, ops, reserve)
            except sqlite3.Error as error:
                if not _is_busy(error):
                    self.stats.dropped += len(ops)
                    self._fail(error, events)
                else:
                    # Another process holds the database (a backup, the sqlite3 shell): keep
                    # the batch, in order, and retry; appends overflow to memory meanwhile.
                    self._queue.extendleft(reversed([*events, *ops, *markers]))
                    if not self._busy:
                        self._log(f"store: {self.path} is locked by another process; retrying")
                    self._busy = True
                    return
        self._busy = False
        for marker in markers:
            marker.set()

    def _transaction(self, events: list[LoggedEvent], ops: list[_Op], reserve: int) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Whole rows of ROWS_PER_INSERT events in one statement: one sqlite3_step (run
            # with the GIL released) per 90 events rather than per event, so the writer holds
            # the GIL far less (about 3.3 us of CPU per event against 4.7 with executemany).
            whole = len(events) - len(events) % ROWS_PER_INSERT
            for start in range(0, whole, ROWS_PER_INSERT):
                conn.execute(_INSERT_ROWS, list(chain.from_iterable(
                    events[start:start + ROWS_PER_INSERT])))
            if whole < len(events):
                conn.executemany(_INSERT_EVENT, events[whole:])
            for op in ops:
                conn.execute(op.sql, op.params)
            if reserve:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'reserved'", (reserve,))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        if reserve:
            self._reserved = reserve
        self._count += len(events)
        self.stats.committed += len(events)

    def _fail(self, error: sqlite3.Error, events: Iterable[LoggedEvent]) -> None:
        """Go memory-only: keep the batch that failed, and everything after it, in memory."""
        self._failed = True
        self.stats.failed = True
        for event in events:
            self._memory.append(event)
            self.stats.dropped += 1
        self._log(f"store: writing {self.path} failed ({error}); going on in memory only,"
                  " new events are not stored")
        self._drain_failed()

    def _drain_failed(self) -> None:
        events, ops, markers = self._take()
        for event in events:
            self._memory.append(event)
        self.stats.dropped += len(events) + len(ops)
        for marker in markers:
            marker.set()

    def _report_overflow(self) -> None:
        if self.stats.overflowed != self._overflow_logged:
            self._overflow_logged = self.stats.overflowed
            self._log(f"store: the write queue was full; {self._overflow_logged} writes so far"
                      " kept in memory only (not stored)")

    def _housekeep(self) -> bool:
        """Retention, one small transaction at a time: by count after every batch, by age each
        second; then expired sessions and bans. True when more is left for the next pass."""
        now = self._clock()
        excess = self._count - self.history_limit
        due = now >= self._next_housekeep
        if (excess <= 0 and not due) or self._busy:
            return False
        try:
            if excess > 0:
                self._delete("DELETE FROM events WHERE seq IN (SELECT seq FROM events"
                             " ORDER BY seq LIMIT ?)", (min(excess, DELETE_BATCH),))
            if due:
                # ts grows with seq (both set under the room lock), so the old ones are first.
                deleted = self._delete(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq"
                    " LIMIT ?) AND ts < ?", (DELETE_BATCH, now - self.history_seconds))
                if deleted < DELETE_BATCH:  # caught up: next pass in a second
                    self._next_housekeep = now + HOUSEKEEP_EVERY
                    self._conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
                    self._conn.execute("DELETE FROM bans WHERE until <= ?", (now,))
        except sqlite3.Error as error:
            if not _is_busy(error):  # locked by another process: the next pass retries
                self._fail(error, ())
            return False
        return self._count > self.history_limit or now >= self._next_housekeep

    def _delete(self, sql: str, params: tuple[object, ...]) -> int:
        deleted = self._conn.execute(sql, params).rowcount  # autocommit: its own transaction
        self._count -= deleted
        return deleted

    def _finish(self) -> None:
        """Clean stop: the next run starts right after the latest seq, with no jump."""
        if self._failed:
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("UPDATE meta SET value = ? WHERE key = ?",
                                   [(self._last_seq, "reserved"), (1, "clean")])
            self._conn.execute("COMMIT")
        except sqlite3.Error as error:
            self._log(f"store: closing {self.path} failed ({error})")
