"""The store (chatsuite/server/store.py): the log, backlog privacy, seq reservation, retention,
failures and the writer's queue, on temporary SQLite files (and the memory store alike)."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatsuite.server.store import (
    AccountRecord,
    BanRecord,
    LoggedEvent,
    MemoryStore,
    SessionRecord,
    SqliteStore,
    Store,
    StoreError,
    Viewer,
    hash_token,
    open_store,
)
from tests.conftest import ROOT, wait_until

T0 = 1_800_000_000.0  # a fixed "now" for the injected clock


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(seq: int, ts: float = T0, *, recipient: str | None = None, ss: str | None = None,
          rs: str | None = None, sa: str | None = None, ra: str | None = None,
          kind: str = "message") -> LoggedEvent:
    """A logged event whose frame names its seq, so a read can be checked byte for byte."""
    return LoggedEvent(seq, ts, kind, b'{"seq":%d}' % seq, "alice", 5, recipient, ss, rs, sa, ra)


def rows(path: Path, sql: str = "SELECT count(*) FROM events") -> Any:
    """One value read through a connection of our own, as another process would see it."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


@pytest.fixture(params=["sqlite", "memory"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """A factory for either store; SQLite ones are closed after the test."""
    opened: list[Store] = []

    def make(**options: Any) -> Store:
        store: Store
        if request.param == "sqlite":
            store = SqliteStore(str(tmp_path / "chat.db"), **options)
        else:
            store = MemoryStore(**options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def seqs(page_events: list[LoggedEvent]) -> list[int]:
    return [e.seq for e in page_events]


def test_append_and_read_back_in_order(make_store: Callable[..., Store]) -> None:
    """Appended events read back oldest first, paged by before/after/latest with `more`."""
    store = make_store(clock=Clock())
    first = store.start_seq
    assert first == 1
    for seq in range(1, 11):
        store.append(event(seq))
    assert store.flush()
    viewer = Viewer(hash_token("anyone"))
    latest = store.backlog(viewer, limit=3)
    assert (seqs(latest.events), latest.more) == ([8, 9, 10], True)
    assert latest.events[0].frame == b'{"seq":8}'
    page = store.backlog(viewer, before=8, limit=3)
    assert (seqs(page.events), page.more) == ([5, 6, 7], True)
    page = store.backlog(viewer, before=3, limit=5)
    assert (seqs(page.events), page.more) == ([1, 2], False)
    page = store.backlog(viewer, after=7, limit=2)
    assert (seqs(page.events), page.more) == ([8, 9], True)
    page = store.backlog(viewer, after=8, limit=5)
    assert (seqs(page.events), page.more) == ([9, 10], False)
    assert store.backlog(viewer, limit=500) == store.backlog(viewer, after=0, limit=500)
    assert store.oldest_seq() == 1
    for bad in (0, 501, 2.5, True):
        with pytest.raises(ValueError):
            store.backlog(viewer, limit=bad)


def test_backlog_privacy_with_a_reused_name(make_store: Callable[..., Store]) -> None:
    """A DM reaches backlog only for its two sessions (or accounts); a later owner of the name
    sees broadcasts and notices but never the earlier owner's DMs."""
    store = make_store(clock=Clock())
    first_alice, bob, second_alice = (hash_token(t) for t in ("tok-a1", "tok-b", "tok-a2"))
    store.append(event(1))                                        # broadcast
    store.append(event(2, recipient="bob", ss=first_alice, rs=bob))
    store.append(event(3, recipient="alice", ss=bob, rs=first_alice))
    store.append(event(4, kind="notice"))                         # alice left
    store.append(event(5, kind="notice"))                         # (another) alice joined
    store.append(event(6, recipient="carol", ss=hash_token("x"), rs=hash_token("y"),
                       sa="dave", ra="carol"))
    assert store.flush()
    assert seqs(store.backlog(Viewer(second_alice)).events) == [1, 4, 5]
    assert seqs(store.backlog(Viewer(second_alice, "alice")).events) == [1, 4, 5]
    assert seqs(store.backlog(Viewer(first_alice)).events) == [1, 2, 3, 4, 5]
    assert seqs(store.backlog(Viewer(bob)).events) == [1, 2, 3, 4, 5]
    assert seqs(store.backlog(Viewer(None)).events) == [1, 4, 5]
    # The same account in a new session (logged in again) sees its DMs; nobody else does.
    assert seqs(store.backlog(Viewer(hash_token("z"), "carol")).events) == [1, 4, 5, 6]
    assert seqs(store.backlog(Viewer(hash_token("z"), "dave")).events) == [1, 4, 5, 6]
    assert seqs(store.backlog(Viewer(hash_token("z"), "eve")).events) == [1, 4, 5]


def test_writer_commits_without_being_asked(tmp_path: Path) -> None:
    """Appended events become visible to another connection with no flush (the 50 ms batch)."""
    path = tmp_path / "chat.db"
    store = SqliteStore(str(path))
    try:
        appended = [event(seq, recipient="bob" if seq % 7 == 0 else None,
                          ss=hash_token(str(seq)), sa="alice") for seq in range(1, 301)]
        for one in appended:
            store.append(one)
        wait_until(lambda: rows(path) == 300, what="the writer to commit 300 events")
        conn = sqlite3.connect(path)
        try:
            stored = [LoggedEvent(*row) for row in conn.execute(
                "SELECT * FROM events ORDER BY seq")]
        finally:
            conn.close()
        assert stored == appended
        assert store.stats.committed == 300
    finally:
        store.close()


def test_clean_close_continues_right_after_the_last_seq(tmp_path: Path) -> None:
    """After close(), the next run starts at the last seq + 1 and says it was a clean stop."""
    path = str(tmp_path / "chat.db")
    store = SqliteStore(path, reserve=1000)
    for seq in range(store.start_seq, store.start_seq + 25):
        store.append(event(seq))
    store.close()
    again = SqliteStore(path, reserve=1000)
    try:
        assert (again.start_seq, again.clean, again.last_logged_seq) == (26, True, 25)
    finally:
        again.close()


KILLED_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from chatsuite.server.store import LoggedEvent, SqliteStore
    store = SqliteStore({path!r}, reserve=1000)
    seq = store.start_seq
    for _ in range(6):  # 1,800 committed events: past the half-way mark of three reservations
        for _ in range(300):
            store.append(LoggedEvent(seq, time.time(), "message", b"{{}}"))
            seq += 1
        assert store.flush(10)
    print(store.start_seq, seq - 1, flush=True)
    for _ in range(50):  # handed out (a client may have seen them), perhaps not committed
        store.append(LoggedEvent(seq, time.time(), "message", b"{{}}"))
        seq += 1
    print(seq - 1, flush=True)
    time.sleep(60)
""")


def test_seq_never_repeats_after_sigkill(tmp_path: Path) -> None:
    """A store killed with SIGKILL keeps every committed event, and the next run starts above
    every seq the killed one handed out."""
    path = str(tmp_path / "chat.db")
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD.format(root=str(ROOT), path=path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        start, committed = map(int, child.stdout.readline().split())
        handed_out = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert (start, committed, handed_out) == (1, 1800, 1850)
    reserved = rows(Path(path), "SELECT value FROM meta WHERE key = 'reserved'")
    store = SqliteStore(path, reserve=1000)
    try:
        assert store.start_seq == reserved + 1
        assert store.start_seq > handed_out
        assert store.clean is False
        assert rows(Path(path), "SELECT count(*) FROM events WHERE seq <= 1800") == 1800
    finally:
        store.close()


def test_retention_by_count(make_store: Callable[..., Store]) -> None:
    """Past --history-limit the oldest events go (in batches), the newest stay."""
    store = make_store(history_limit=1000, clock=Clock())
    for seq in range(1, 2601):
        store.append(event(seq))
    store.flush()
    viewer = Viewer(None)
    wait_until(lambda: store.oldest_seq() == 1601, what="the oldest 1,600 events to go")
    page = store.backlog(viewer, after=0, limit=500)
    assert (page.events[0].seq, page.more) == (1601, True)
    assert store.backlog(viewer, limit=1).events[0].seq == 2600


def test_retention_by_age(make_store: Callable[..., Store]) -> None:
    """Events older than --history-days go (in batches of 500 for SQLite); younger ones stay."""
    clock = Clock()
    store = make_store(history_days=1, clock=clock)
    for seq in range(1, 1201):
        store.append(event(seq, T0 - 2 * 86400 if seq <= 700 else T0 - 3600))
    store.flush()
    # A pass by age is due whenever the writer last looked (an idle pass may have run before
    # the events came, and the injected clock does not move by itself).
    clock.now += 2
    viewer = Viewer(None)
    wait_until(lambda: store.backlog(viewer, after=0, limit=1).events[0].seq == 701,
               what="the events of two days ago to go")
    assert store.backlog(viewer, before=701, limit=10).events == []
    clock.now += 86400  # a day later the rest are old too
    wait_until(lambda: store.backlog(viewer, limit=1).events == [], what="all events to go")


def test_sessions_accounts_and_bans_round_trip(make_store: Callable[..., Store]) -> None:
    """Sessions (by token hash), accounts and bans are kept (across a restart for SQLite);
    expired ones are not loaded, deleted ones are gone."""
    clock = Clock()
    store = make_store(clock=clock)
    live = SessionRecord(hash_token("t1"), "alice", "Dr", None, "available", 2, 41, T0 + 120,
                         "alice")
    store.save_session(live)
    store.save_session(live._replace(token_hash=hash_token("t2"), expires_at=T0 - 1))
    store.save_session(live._replace(token_hash=hash_token("t3")))
    store.delete_session(hash_token("t3"))
    account = AccountRecord("alice", "Alice", "scrypt$16384$8$1$salt$hash", T0)
    store.save_account(account)
    store.save_account(account._replace(key="bob", name="Bob"))
    store.delete_account("bob")
    store.save_ban(BanRecord("mallory", None))
    store.save_ban(BanRecord("10.0.0.1", T0 + 60))
    store.save_ban(BanRecord("10.0.0.2", T0 - 60))
    if isinstance(store, SqliteStore):
        store.close()
        store = make_store(clock=clock)
    assert store.load_sessions() == [live]
    assert store.load_accounts() == [account]
    assert sorted(store.load_bans()) == [BanRecord("10.0.0.1", T0 + 60),
                                         BanRecord("mallory", None)]


def test_token_hash_is_sha256_hex() -> None:
    """A session token is kept only as the hex SHA-256 of its UTF-8 bytes."""
    assert hash_token("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_open_failure_is_a_clear_error(tmp_path: Path) -> None:
    """A path that is a directory, or a file that is not a database, is a StoreError at start."""
    with pytest.raises(StoreError, match=f"The store {tmp_path} cannot be opened"):
        SqliteStore(str(tmp_path))
    garbage = tmp_path / "not.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot be opened: file is not a database"):
        open_store(str(garbage))


def test_a_store_that_fails_later_goes_memory_only(tmp_path: Path) -> None:
    """An sqlite3 error in the writer is logged once; the store keeps events in memory for
    backlog, counts what it could not store, and appends go on returning at once."""
    path = tmp_path / "chat.db"
    lines: list[str] = []
    store = SqliteStore(str(path), log=lines.append)
    try:
        store.append(event(1))
        assert store.flush()
        other = sqlite3.connect(path)
        other.execute("DROP TABLE events")  # the writer's next INSERT fails
        other.commit()
        other.close()
        for seq in range(2, 12):
            store.append(event(seq))
        wait_until(lambda: store.failed, what="the store to fail")
        for seq in range(12, 22):
            store.append(event(seq))
        assert store.flush() is False
        assert [line for line in lines if "going on in memory only" in line] == [
            f"store: writing {path} failed (no such table: events); going on in memory only,"
            " new events are not stored"]
        assert (store.stats.failed, store.stats.committed, store.stats.dropped) == (True, 1, 20)
        page = store.backlog(Viewer(None), limit=100)
        assert (seqs(page.events), page.more) == (list(range(2, 22)), False)
    finally:
        store.close()


def test_a_stalled_writer_never_blocks_appends(tmp_path: Path) -> None:
    """While another connection holds the write lock, appends return at once: past the queue's
    bound they are kept in memory (counted, logged); the rest are committed once the lock goes,
    and backlog still returns every event in order."""
    path = tmp_path / "chat.db"
    lines: list[str] = []
    store = SqliteStore(str(path), log=lines.append, queue_limit=100)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the one write lock of a WAL database
        store.append(event(1))
        wait_until(lambda: any("is locked by another process" in line for line in lines),
                   what="the writer to find the lock")
        for seq in range(2, 1002):
            store.append(event(seq))
        overflowed = store.stats.overflowed
        assert 800 <= overflowed <= 1000
        other.execute("ROLLBACK")
        assert store.flush()
        assert store.stats.committed + overflowed == 1001
        assert rows(path) == store.stats.committed
        assert any(line == f"store: the write queue was full; {overflowed} writes so far kept"
                   " in memory only (not stored)" for line in lines)
        viewer = Viewer(None)
        got = [e.seq for e in store.backlog(viewer, after=0, limit=500).events]
        while len(got) < 1001:
            got += [e.seq for e in store.backlog(viewer, after=got[-1], limit=500).events]
        assert got == list(range(1, 1002))
        assert store.failed is False
    finally:
        other.close()
        store.close()


def test_the_write_queue_is_bounded_by_bytes_as_well_as_by_count(tmp_path: Path) -> None:
    """With the writer stalled, large frames overflow to memory once ``queue_bytes`` of them
    wait, far below the count bound; nothing is lost from backlog, and the store writes again
    once the stall ends."""
    path = tmp_path / "chat.db"
    lines: list[str] = []
    store = SqliteStore(str(path), log=lines.append, queue_bytes=100_000)
    other = sqlite3.connect(path, isolation_level=None)
    big = b"x" * 10_000
    try:
        other.execute("BEGIN IMMEDIATE")  # the one write lock of a WAL database
        store.append(LoggedEvent(1, T0, "message", big))
        wait_until(lambda: any("is locked by another process" in line for line in lines),
                   what="the writer to find the lock")
        for seq in range(2, 41):  # 39 more frames of 10,000 bytes: 10 fit under the bound
            store.append(LoggedEvent(seq, T0, "message", big))
        assert store.stats.overflowed == 29
        other.execute("ROLLBACK")
        assert store.flush()
        assert (store.stats.committed, rows(path)) == (11, 11)
        store.append(LoggedEvent(41, T0, "message", big))  # the queue has room again
        assert store.flush()
        assert (store.stats.committed, store.stats.overflowed) == (12, 29)
        page = store.backlog(Viewer(None), after=0, limit=100)
        assert [e.seq for e in page.events] == list(range(1, 42))
    finally:
        other.close()
        store.close()


def test_a_store_written_before_member_ids_were_kept_opens_and_keeps_them_from_then_on(
        tmp_path: Path) -> None:
    """A sessions table of the earlier shape (no member_id) gets the column when opened: its
    sessions load with no id, and sessions saved from then on keep theirs."""
    path = tmp_path / "chat.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(
            "CREATE TABLE sessions (token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, title TEXT,"
            " company TEXT, status TEXT NOT NULL, mode INTEGER NOT NULL, last_seq INTEGER NOT"
            " NULL, expires_at REAL NOT NULL, account TEXT);"
            f"INSERT INTO sessions VALUES ('h1', 'alice', NULL, NULL, 'available', 2, 5, {T0 + 60},"
            " NULL);")
    store = SqliteStore(str(path), clock=Clock())
    try:
        assert store.load_sessions() == [
            SessionRecord("h1", "alice", None, None, "available", 2, 5, T0 + 60)]
        store.save_session(SessionRecord("h2", "bob", None, None, "available", 1, 6, T0 + 60,
                                         None, 17))
        assert store.flush()
        assert [r.member_id for r in store.load_sessions()] == [None, 17]
    finally:
        store.close()


def test_one_server_per_store_file(tmp_path: Path) -> None:
    """A second store on a file already open is refused (its seqs would repeat); after close()
    the file can be opened again."""
    path = str(tmp_path / "chat.db")
    store = SqliteStore(path)
    with pytest.raises(StoreError, match=f"The store {path} is in use by another server"):
        SqliteStore(path)
    store.close()
    SqliteStore(path).close()


def test_the_memory_store_is_bounded_by_bytes_as_well_as_by_count() -> None:
    """Past ``history_bytes`` of frames the oldest events go, whatever the count allows; past
    ``history_limit`` events too; what is kept stays in order and readable."""
    store = MemoryStore(history_limit=100, history_bytes=10_000)
    for seq in range(1, 21):  # 20 frames of 1,000 bytes: twice the byte bound
        store.append(LoggedEvent(seq, time.time(), "message", b"x" * 1000))
    assert store.oldest_seq() == 11
    page = store.backlog(Viewer("s"), limit=500)
    assert [event.seq for event in page.events] == list(range(11, 21))
    counted = MemoryStore(history_limit=5, history_bytes=10_000)
    for seq in range(1, 9):
        counted.append(LoggedEvent(seq, time.time(), "message", b"y"))
    assert counted.oldest_seq() == 4
    big = MemoryStore(history_limit=5, history_bytes=10)
    big.append(LoggedEvent(1, time.time(), "message", b"z" * 50))
    assert big.oldest_seq() == 1  # one event larger than the bound is still kept: the latest
