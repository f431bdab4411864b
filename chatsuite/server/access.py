"""Who may enter (SPEC 7): refusals, the plaintext rule and the login throttle; pure.

What it owns:

* ``Refusal``: every refusal of SPEC 7 carries the SPEC's code (with ``for`` and
  ``retry_after`` where SPEC says) and a sentence for people;
* the plaintext rule (7.2): an account password travels only over TLS or loopback;
* the throttle (7.2): 5 failed attempts per name or per address in a sliding minute, then
  ``too-many-attempts`` with ``retry_after``; bounded tables, one lock, never held while hashing.

Password hashing and the server password live in ``passwords.py``, admins and sanctions in
``moderation.py``. Invariant: nothing here blocks on I/O, and time is injected (``Clock``)
wherever behaviour depends on it.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from protocol import ErrorCode
from protocol import Refusal as Refusal  # re-exported: access refusals are protocol's

Clock = Callable[[], float]


# --------------------------------------------------------------------------------------------
# Refusals: the SPEC's error codes this module answers with.


Code = ErrorCode
"""The SPEC 1.3 error codes (protocol's ``ErrorCode``: one enum for every refusal on the wire)."""


class For(str, Enum):
    """Which password ``password-required`` and ``bad-password`` are about (their ``for``)."""

    SERVER = "server"
    ACCOUNT = "account"


# ``Refusal`` is protocol's: an access refusal is raised without a ``ref``, and the handler's
# one error path gives it the request's ``ref`` and turns it into the ``error`` event.

# --------------------------------------------------------------------------------------------
# Addresses: loopback (the plaintext rule) and the keys the throttle and bans use.


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = host.strip("[]").partition("%")[0]  # "[::1]" and "fe80::1%eth0" as peers report them
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 from a dual-stack listener is 127.0.0.1
    return ip


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything else or unreadable."""
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def may_carry_password(*, tls: bool, host: str, allow_plaintext: bool) -> bool:
    """May an account password travel here (SPEC 7.2)? TLS or loopback, else only by opt-in."""
    return tls or allow_plaintext or is_loopback(host)


def check_channel(*, tls: bool, host: str, allow_plaintext: bool) -> None:
    """``not-allowed`` unless an account password may travel on this connection."""
    if not may_carry_password(tls=tls, host=host, allow_plaintext=allow_plaintext):
        raise Refusal(Code.NOT_ALLOWED,
                      "Account passwords travel only over TLS: reconnect with TLS.")


def address_key(host: str) -> str:
    """The key one peer is counted under: its IPv4 address, or its IPv6 /64 (one subscriber).

    An IPv6 host usually holds a whole /64, so keying by single address would let one machine
    step around the throttle and bans with 2**64 addresses. Unreadable hosts key as themselves.
    """
    ip = _ip(host)
    if ip is None:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def name_key(name: str) -> str:
    """The key a name is counted and sanctioned under (names are unique without regard to case)."""
    return name.casefold()


# --------------------------------------------------------------------------------------------
# The throttle (7.2).

ATTEMPT_LIMIT = 5
ATTEMPT_WINDOW = 60.0
MAX_TRACKED = 10_000
"""Entries per table (names, addresses). An entry is a key and a tuple of at most 5 floats:
measured 3.3 MiB for both tables full, so the throttle stays small whatever the flood. Each
entry costs the flooder a failed attempt, and one address gets 5 a minute: to push out a live
entry within its minute takes 2,000 addresses (IPv6: /64s) working together."""


@dataclass(frozen=True)
class Attempt:
    """One password attempt in progress, counted as a failure until ``succeed``/``cancel``."""

    name: str | None
    address: str
    at: float


class Throttle:
    """At most 5 failed password attempts per name and per address in any 60 s (SPEC 7.2).

    ``begin`` counts the attempt as a failure before any hashing, under the lock, so 30 threads
    guessing at once cannot all slip past the count; ``succeed`` then clears the name's record
    and takes this attempt back from the address, ``cancel`` takes it back from both (the
    attempt never reached a password check). A failure needs no call. The address's earlier
    failures stay after a success, so a flooder cannot launder its count by logging into its
    own account between guesses.

    Each table is a dict ordered by last failure (a key is moved to the end when it fails), so
    expired entries are at the front and pruning is amortised O(1); past ``max_tracked`` the
    entry that failed longest ago goes. The clock must not go backwards (``time.monotonic``).
    """

    def __init__(self, *, limit: int = ATTEMPT_LIMIT, window: float = ATTEMPT_WINDOW,
                 max_tracked: int = MAX_TRACKED, clock: Clock = time.monotonic,
                 settle_addresses: bool = False) -> None:
        # settle_addresses: the address counts a failure when ``fail`` reports it, not up
        # front, so a class behind one NAT address logging in at once (30 right passwords in
        # flight) is not refused; the name is still counted up front. The server uses it.
        self.settle_addresses = settle_addresses
        self.limit = limit
        self.window = window
        self.max_tracked = max_tracked
        self.clock = clock
        # Guards both tables; held only for dict work, never while hashing.
        self._lock = threading.Lock()
        self._names: dict[str, tuple[float, ...]] = {}
        self._addresses: dict[str, tuple[float, ...]] = {}

    def begin(self, name: str | None, host: str) -> Attempt:
        """Count one attempt for ``name`` (None: no name involved) from ``host``, or refuse it.

        ``Refusal`` ``too-many-attempts`` with ``retry_after``: whole seconds until either
        count lets an attempt through again (at least 1).
        """
        key, address = (None if name is None else name_key(name)), address_key(host)
        with self._lock:
            now = self.clock()
            wait = self._wait(self._addresses, address, now)
            if key is not None:
                wait = max(wait, self._wait(self._names, key, now))
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                raise Refusal(Code.TOO_MANY_ATTEMPTS,
                              f"Too many failed attempts; try again in {seconds} s.",
                              retry_after=seconds)
            if not self.settle_addresses:
                self._add(self._addresses, address, now)
            if key is not None:
                self._add(self._names, key, now)
        return Attempt(key, address, now)

    def fail(self, attempt: Attempt) -> None:
        """The password was wrong. Needed only with ``settle_addresses`` (the address counts
        the failure now); otherwise the failure was counted by ``begin`` already."""
        if self.settle_addresses:
            with self._lock:
                self._add(self._addresses, attempt.address, self.clock())

    def succeed(self, attempt: Attempt) -> None:
        """The password was right: forget the name's failures and take this attempt back."""
        with self._lock:
            if not self.settle_addresses:
                self._take_back(self._addresses, attempt.address, attempt.at)
            if attempt.name is not None:
                self._names.pop(attempt.name, None)

    def cancel(self, attempt: Attempt) -> None:
        """The attempt never reached a password check: take it back from both counts."""
        with self._lock:
            if not self.settle_addresses:
                self._take_back(self._addresses, attempt.address, attempt.at)
            if attempt.name is not None:
                self._take_back(self._names, attempt.name, attempt.at)

    def tracked(self) -> tuple[int, int]:
        """How many names and addresses are remembered now (for tests and the status log)."""
        with self._lock:
            return len(self._names), len(self._addresses)

    def _wait(self, table: dict[str, tuple[float, ...]], key: str, now: float) -> float:
        stamps = table.get(key)
        if stamps is None:
            return 0.0
        live = tuple(t for t in stamps if now - t < self.window)
        if not live:
            del table[key]
            return 0.0
        if len(live) != len(stamps):
            table[key] = live  # stays in place: the last failure did not change
        if len(live) < self.limit:
            return 0.0
        return live[-self.limit] + self.window - now

    def _add(self, table: dict[str, tuple[float, ...]], key: str, now: float) -> None:
        stamps = table.pop(key, ())
        table[key] = (*stamps[-(self.limit - 1):], now) if self.limit > 1 else (now,)
        self._prune(table, now)

    def _prune(self, table: dict[str, tuple[float, ...]], now: float) -> None:
        # Ordered by last failure: the front is the stalest. Drop what has expired, then, if a
        # flood still overfills the table, what failed longest ago.
        while table:
            oldest = next(iter(table))
            if now - table[oldest][-1] < self.window and len(table) <= self.max_tracked:
                break
            del table[oldest]

    @staticmethod
    def _take_back(table: dict[str, tuple[float, ...]], key: str, at: float) -> None:
        stamps = table.get(key)
        if stamps is None or at not in stamps:
            return  # pruned or pushed out meanwhile: nothing to take back
        i = stamps.index(at)
        rest = stamps[:i] + stamps[i + 1:]
        if rest:
            table[key] = rest
        else:
            del table[key]
