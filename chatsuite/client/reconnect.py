"""What the client keeps to come back after a drop (SPEC 4.8, 6.5): the backoff, the sequence
numbers seen, and the session file.

* ``Backoff``: when to try again: 1 s, then doubling up to 30 s, each delay with +-20 % jitter,
  until a budget (``--reconnect-for``) has passed. Its clock, sleep and random source are
  injected, so tests run it with a fake clock and a seeded random.
* ``SeenSeqs``: the sequence numbers already shown or held, so an event replayed after a resume
  is dropped, and the last one, the ``last_seq`` a resume asks from.
* ``Comeback``: the options (``--reconnect-for``, ``--no-reconnect``, ``--backlog``).
* ``SessionFile``: ``<history-dir>/<host>_<port>/<own name>/session``, the token and the last
  sequence number, so a restarted client resumes too. A running client holds that name's
  ``session.lock`` (``flock``): a second client started with the same name and folder neither
  resumes nor overwrites the first's session, or each would take the other's connection over
  (SPEC 6.4) in turn; it registers anew (the server then says the name is taken).

Invariants: ``Backoff`` never sleeps past its deadline; ``SeenSeqs.first_time`` is True at most
once for a sequence number; the session file is 0600 and replaced whole (written to a private
temporary file, then renamed), so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from chatsuite.client.history import (
    _NO_FOLLOW,
    FILE_MODE,
    History,
    file_name,
    name_folder,
)
from chatsuite.client.transport import Transport

if sys.platform != "win32":
    import fcntl

FIRST_DELAY = 1.0  # seconds before the first attempt
MAX_DELAY = 30.0  # the delay doubles up to this
JITTER = 0.2  # each delay is drawn within +-20 % of its nominal value
RECONNECT_FOR = 600.0  # default --reconnect-for: seconds of trying before giving up

DELAY_SCALE_VARIABLE = "CHAT_CLIENT_DELAY_SCALE"
"""For tests only: a factor applied to every backoff delay (0.01: 10 ms instead of 1 s)."""


def delay_scale(environ: Mapping[str, str]) -> float:
    """The test-only factor of the backoff delays (1.0 unless the variable holds a positive
    number)."""
    try:
        scale = float(environ.get(DELAY_SCALE_VARIABLE, "1"))
    except ValueError:
        return 1.0
    return scale if scale > 0 else 1.0


class Backoff:
    """The waits between reconnection attempts, within a budget of seconds from ``start``."""

    def __init__(self, budget: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, scale: float = 1.0) -> None:
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.scale = scale
        self.deadline = clock() + budget
        self.attempts = 0  # waits done so far

    def nominal(self, attempt: int) -> float:
        """The delay before attempt ``attempt`` (0 first), without jitter: 1, 2, 4, ... 30."""
        return min(MAX_DELAY, FIRST_DELAY * float(2 ** min(attempt, 16))) * self.scale

    def next_delay(self) -> float:
        """The next delay, with jitter (it advances the count)."""
        nominal = self.nominal(self.attempts)
        self.attempts += 1
        return nominal * self.rng.uniform(1 - JITTER, 1 + JITTER)

    def wait(self) -> bool:
        """Sleep before the next attempt; False (without sleeping) once the budget is spent.
        A wait that would end past the deadline ends at it, for one last attempt."""
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            return False
        self.sleep(min(self.next_delay(), remaining))
        return True


class SeenSeqs:
    """The sequence numbers of the events already shown or held (the most recent ``keep``)."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()  # the receiver (live events), the main thread (backlog)
        self.keep = keep
        self.last: int | None = None  # the highest seen: where a resume starts from
        self._seen: set[int] = set()
        self._order: deque[int] = deque()
        self._floor: int | None = None  # the highest number forgotten: older is "seen"

    def start_at(self, seq: int) -> None:
        """Registered anew at the room's ``seq``: nothing at or before it will be shown live."""
        with self._lock:
            if self.last is None or seq > self.last:
                self.last = seq

    def first_time(self, seq: int) -> bool:
        """True, and remembered, the first time ``seq`` comes; False when it came already."""
        with self._lock:
            return self._first_time(seq)

    def _first_time(self, seq: int) -> bool:
        if seq in self._seen or (self._floor is not None and seq <= self._floor):
            return False
        self._seen.add(seq)
        self._order.append(seq)
        if len(self._order) > self.keep:
            forgotten = self._order.popleft()
            self._seen.discard(forgotten)
            self._floor = forgotten if self._floor is None else max(self._floor, forgotten)
        if self.last is None or seq > self.last:
            self.last = seq
        return True


SESSION_FILE = "session"  # never a peer's log (those end in ".log")
LOCK_FILE = "session.lock"  # held (flock) by the running client of that name


class SessionFile:
    """The resume token and last sequence number of each own name on one server, on disk."""

    def __init__(self, history: History) -> None:
        self.history = history
        self._lock = threading.Lock()  # both threads save: one temporary file at a time
        self._held: dict[str, int] = {}  # name -> the descriptor of its locked session.lock

    def folder(self, name: str) -> Path:
        """``<history-dir>/<host>_<port>/<name>``: the folder of that name's logs."""
        return self.history.directory / self.history.server / file_name(name)

    def load(self, name: str) -> tuple[str, int | None] | None:
        """The saved ``(session, last_seq)`` of ``name``, or None (none, or unreadable)."""
        try:
            saved = json.loads((self.folder(name) / SESSION_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or not isinstance(saved.get("session"), str):
            return None
        with self._lock:
            if not self._claim(name):
                return None  # another running client of this name holds it
        last = saved.get("last_seq")
        return saved["session"], last if isinstance(last, int) and last >= 0 else None

    def save(self, name: str, session: str, last_seq: int | None) -> bool:
        """Replace ``name``'s file whole, 0600 (folders 0700); False when it could not be."""
        with self._lock:
            return self._claim(name) and self._save(name, session, last_seq)

    def _claim(self, name: str) -> bool:
        """Hold ``name``'s session for this process until it ends (the lock goes with it);
        False when another running client holds it. Where no lock can be taken (no ``flock``,
        an unwritable folder) the file works as it would without one."""
        if name in self._held or sys.platform == "win32":
            return True
        folder = self.folder(name)
        try:
            name_folder(self.history.directory, folder)
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | _NO_FOLLOW, FILE_MODE)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._held[name] = fd
        return True

    def _save(self, name: str, session: str, last_seq: int | None) -> bool:
        folder = self.folder(name)
        temporary = folder / f".{SESSION_FILE}.{os.getpid()}"
        try:
            name_folder(self.history.directory, folder)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NO_FOLLOW,
                         FILE_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                os.fchmod(out.fileno(), FILE_MODE)  # a left-over temporary file is tightened
                json.dump({"session": session, "last_seq": last_seq}, out)
            os.replace(temporary, folder / SESSION_FILE)
        except OSError:
            return False
        return True

    def remove(self, name: str) -> None:
        """``name``'s session ended (we quit): nothing to resume next time."""
        try:
            (self.folder(name) / SESSION_FILE).unlink()
        except OSError:
            pass


BACKLOG_ON_START = 20  # default --backlog: earlier messages shown after registering
REPLY_TIMEOUT_VARIABLE = "CHAT_CLIENT_REPLY_TIMEOUT"
"""For tests only: seconds a request waits for its reply (default ``session.REPLY_TIMEOUT``)."""


def reply_timeout(environ: Mapping[str, str], default: float) -> float:
    """The test-only bound on a reply's wait, or ``default``."""
    try:
        seconds = float(environ.get(REPLY_TIMEOUT_VARIABLE, ""))
    except ValueError:
        return default
    return seconds if seconds > 0 else default


@dataclass(frozen=True)
class Comeback:
    """How a native session comes back after a drop, and what it shows on start.

    ``reconnect_for`` None: never reconnect (``--no-reconnect``); ``connect`` makes a new
    transport to the same server (``ConnectError`` when it cannot)."""

    reconnect_for: float | None = RECONNECT_FOR
    backlog: int = BACKLOG_ON_START
    delay_scale: float = 1.0
    reply_timeout: float = 10.0
    connect: Callable[[], Transport] | None = None
