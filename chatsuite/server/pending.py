"""The ``pending`` event (SPEC 1.3, 1.4): how many events wait for a typing client, told at most
once an interval.

The room notes, under its lock, each member whose hold queue changed (``changed``: a dict insert,
and a wake-up the first time a member is noted); the ``PendingTicker``'s own thread sends each
noted member its latest count once ``interval`` has passed since the last ``pending`` it sent
that member, and only when the count differs from what that member was last told. A typist
held a thousand broadcasts in a second gets one or two ``pending`` events, not a thousand, and
no chat thread ever waits for the ticker.

Invariant: a member gets at most one ``pending`` per ``interval``, only while it is a registered
native member in mode 1, and always under the room lock (like every other put), so each count
is the count at the moment it was pushed, in order with the member's other events.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from chatsuite.server.members import Dialect, Member
from modes import Mode
from protocol import Pending, encode_event

INTERVAL = 1.0  # seconds: SPEC 1.3, "at most once a second"


class PendingNotes(Protocol):
    """What the room tells about hold queues (called with ``Room.lock`` held)."""

    def changed(self, member: Member) -> None: ...
    def flushed(self, member: Member) -> None: ...


class _NoNotes:
    """A room without a ticker (pure room tests): nothing noted, nothing sent."""

    def changed(self, member: Member) -> None:
        pass

    def flushed(self, member: Member) -> None:
        pass


NO_NOTES = _NoNotes()


class PendingTicker:
    """Sends ``pending`` counts, each member at most once per ``interval``, from one thread.

    ``tick()`` (lock held) is the whole decision and is driven by ``clock``, so a test can call it
    with a fake clock; the thread only calls it and sleeps until the next one is due.
    """

    def __init__(self, lock: threading.Lock, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.interval = interval
        self.clock = clock
        self.log = log  # the server's log: never waits (log.py)
        self._wake = threading.Condition(lock)  # the room lock: noted and sent under it
        self._noted: dict[Member, None] = {}  # members whose count may have changed, in order
        # What each member was last told, and when; weak so a member that left is forgotten.
        self._told: weakref.WeakKeyDictionary[Member, tuple[int, float]] = (
            weakref.WeakKeyDictionary())
        self._running = True
        self.thread = threading.Thread(target=self._run, name="pending", daemon=True)

    # -- called with the room lock held -------------------------------------------------------

    def changed(self, member: Member) -> None:
        """``member``'s hold queue changed (an event held, maybe older ones dropped)."""
        if member not in self._noted:
            self._noted[member] = None
            self._wake.notify()

    def flushed(self, member: Member) -> None:
        """``member`` entered mode 2 and got everything held: it now knows the count is 0."""
        self._noted.pop(member, None)
        told = self._told.get(member)
        if told is not None:
            self._told[member] = (0, told[1])

    def tick(self) -> float | None:
        """Send every count that is due; seconds until the next one is due (None: none waits)."""
        now = self.clock()
        next_due: float | None = None
        for member in list(self._noted):
            if (not member.registered or member.dialect is not Dialect.NATIVE
                    or member.mode is Mode.VIEWING):
                del self._noted[member]  # gone, or shown everything: nothing to tell
                continue
            count, at = self._told.get(member, (0, -math.inf))
            due = at + self.interval
            if now < due:
                next_due = due if next_due is None else min(next_due, due)
                continue
            del self._noted[member]
            held = len(member.hold)
            if held != count:
                member.outbox.push(encode_event(Pending(held)))
                self._told[member] = (held, now)
        return None if next_due is None else max(0.0, next_due - now)

    # -- the ticker's thread ------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while self._running:
                try:
                    wait = self.tick()
                except Exception as error:  # broad on purpose: the ticker must outlive any bug
                    self._noted.clear()
                    wait = None
                    self.log(f"pending: unexpected error, carrying on: {error!r}")
                self._wake.wait(wait)
