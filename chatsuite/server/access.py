"""Who may enter and who is who (SPEC 7): the pure rules, with no socket, store or room in sight.

What it owns:

* account password hashes: salted ``hashlib.scrypt`` in one self-describing string
  (``scrypt$n=16384,r=8,p=1$<salt>$<key>``), verified in constant time with the parameters
  stored beside the hash, so the cost can be raised later without breaking old accounts;
* the server password (7.1): loaded once from ``--password-file`` or ``CHAT_PASSWORD``;
* the throttle (7.2): 5 failed attempts per name or per address in a sliding minute, then
  ``too-many-attempts`` with ``retry_after``; bounded tables, one lock, never held while hashing;
* the plaintext rule (7.2): an account password travels only over TLS or loopback;
* admins and sanctions (7.3): who may moderate, mutes and bans with their until-times.

Invariant: every refusal is a ``Refusal`` carrying the SPEC's code (with ``for`` and
``retry_after`` where SPEC says) and a sentence for people; nothing here blocks on I/O, no lock
is held while scrypt runs, and scrypt (16 MiB a run) runs only on ``HASH_WORKERS`` threads.
Time is injected (``Clock``) wherever behaviour depends on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import os
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

Clock = Callable[[], float]


# --------------------------------------------------------------------------------------------
# Refusals: the SPEC's error codes this module answers with.


class Code(str, Enum):
    """The error codes of SPEC 1.3 that access decisions produce; the value travels on the wire."""

    BAD_REQUEST = "bad-request"
    PASSWORD_REQUIRED = "password-required"
    BAD_PASSWORD = "bad-password"
    TOO_MANY_ATTEMPTS = "too-many-attempts"
    NOT_ALLOWED = "not-allowed"
    MUTED = "muted"
    BANNED = "banned"


class For(str, Enum):
    """Which password ``password-required`` and ``bad-password`` are about (their ``for``)."""

    SERVER = "server"
    ACCOUNT = "account"


class Refusal(Exception):
    """A request refused by an access rule: code, a sentence, and ``for``/``retry_after`` if any."""

    def __init__(self, code: Code, message: str, *, for_: For | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.for_ = for_
        self.retry_after = retry_after

    def fields(self) -> dict[str, str | int]:
        """The ``error`` frame's fields (without ``type`` and ``ref``)."""
        out: dict[str, str | int] = {"code": self.code.value, "message": self.message}
        if self.for_ is not None:
            out["for"] = self.for_.value
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Refusal) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Refusal({self.code.value!r}, {self.message!r}, for_={self.for_!r}, "
                f"retry_after={self.retry_after!r})")

    def _key(self) -> tuple[Code, str, For | None, int | None]:
        return (self.code, self.message, self.for_, self.retry_after)


# --------------------------------------------------------------------------------------------
# Account password hashes.

MIN_PASSWORD = 8
"""SPEC 7.2: an account password has at least 8 characters."""
MAX_PASSWORD = 1024
"""Longer passwords are refused: bounds the work per attempt (a passphrase fits easily)."""

MAX_SCRYPT_MEMORY = 16 * 1024 * 1024
"""SPEC 7.2: scrypt's big array (128 * r * n bytes) is at most 16 MiB per hash."""
MAX_SCRYPT_P = 16
"""Parallelism multiplies time, not memory; bounded so a stored string cannot ask for minutes."""
SALT_BYTES = 16
KEY_BYTES = 32
SCHEME = "scrypt"


@dataclass(frozen=True)
class ScryptParams:
    """scrypt's cost: ``n`` (a power of two), block size ``r``, parallelism ``p``."""

    n: int = 1 << 14
    r: int = 8
    p: int = 1

    @property
    def maxmem(self) -> int:
        """OpenSSL's own memory accounting for these parameters, passed to scrypt as ``maxmem``.

        OpenSSL counts the array V with two extra blocks, 128*r*(n+2), plus the buffer B,
        128*r*p; with exactly this limit scrypt runs, with one byte less it refuses (a test
        proves it). So ``maxmem`` is a true ceiling, not the 32 MiB default nor a guess.
        """
        return 128 * self.r * (self.n + 2 + self.p)

    def check(self) -> None:
        """Raise ``ValueError`` unless these parameters are within this server's bounds."""
        if self.n < 2 or self.n & (self.n - 1):
            raise ValueError(f"scrypt n must be a power of two above 1, not {self.n}")
        if self.r < 1 or not 1 <= self.p <= MAX_SCRYPT_P:
            raise ValueError(f"scrypt r={self.r}, p={self.p} out of bounds")
        if 128 * self.r * self.n > MAX_SCRYPT_MEMORY:
            raise ValueError(f"scrypt n={self.n}, r={self.r} needs more than 16 MiB")


HASH_WORKERS = max(1, min(4, os.cpu_count() or 1))
"""Threads that run scrypt: one per core (at most 4); every hash and verify runs on them.

scrypt releases the GIL, so 30 logins hashing on their own connection threads run all at once
and hold 30 * 16 MiB; worse, glibc gives each thread its own malloc arena and keeps the freed
16 MiB in it, so even one-at-a-time hashing spread over 30 threads leaves ~16 arenas * 16 MiB
resident. Measured on 2 cores, 30 verifies at once: 498 MiB peak RSS on the callers' threads,
258 MiB with a semaphore, 50 MiB on two workers, in the same time (the work is CPU-bound).
"""


class _Hashers:
    """The scrypt threads, started on first use (importing this module starts nothing)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the lazy start
        self._pool: ThreadPoolExecutor | None = None

    def run(self, secret: bytes, salt: bytes, params: ScryptParams, length: int) -> bytes:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="scrypt")
            pool = self._pool
        # The caller waits for its own result only (its login), outside every lock.
        return pool.submit(hashlib.scrypt, secret, salt=salt, n=params.n, r=params.r,
                           p=params.p, maxmem=params.maxmem, dklen=length).result()


_hashers = _Hashers()

DEFAULT_PARAMS = ScryptParams()
"""n=2**14, r=8, p=1: exactly 16 MiB for V, about 40 ms of one core per hash on this machine."""


class MalformedHash(ValueError):
    """A stored password hash that cannot be read (corrupt, foreign or over our bounds)."""


@dataclass(frozen=True)
class StoredHash:
    """A parsed password hash: its parameters, salt and derived key."""

    params: ScryptParams
    salt: bytes
    key: bytes

    def encode(self) -> str:
        """The one-string form kept in the store."""
        p = self.params
        return (f"{SCHEME}$n={p.n},r={p.r},p={p.p}$"
                f"{base64.b64encode(self.salt).decode()}${base64.b64encode(self.key).decode()}")


def check_password_rule(password: str) -> None:
    """Refuse (``bad-password``, for the account) a new password that is too short or too long."""
    if len(password) < MIN_PASSWORD:
        raise Refusal(Code.BAD_PASSWORD, f"A password needs at least {MIN_PASSWORD} characters.",
                      for_=For.ACCOUNT)
    if len(password) > MAX_PASSWORD:
        raise Refusal(Code.BAD_PASSWORD, f"A password has at most {MAX_PASSWORD} characters.",
                      for_=For.ACCOUNT)


def _derive(password: str, salt: bytes, params: ScryptParams, length: int) -> bytes:
    # NFC: the same password typed on two systems that compose accents differently is the same.
    secret = unicodedata.normalize("NFC", password).encode("utf-8", "surrogatepass")
    return _hashers.run(secret, salt, params, length)


def hash_password(password: str, params: ScryptParams = DEFAULT_PARAMS) -> str:
    """The stored form of a new account password; ``Refusal`` if the password breaks the rule.

    Slow on purpose (one scrypt): call it outside every lock.
    """
    check_password_rule(password)
    params.check()
    salt = secrets.token_bytes(SALT_BYTES)
    return StoredHash(params, salt, _derive(password, salt, params, KEY_BYTES)).encode()


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise MalformedHash("bad base64 in password hash") from exc


def _param_int(text: str) -> int:
    # Only plain ASCII digits: int() would also take "+8", " 8", "8_0" and Unicode digits.
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise MalformedHash(f"bad scrypt parameter {text!r}")
    return int(text)


def parse_hash(stored: str) -> StoredHash:
    """Read a stored hash; ``MalformedHash`` for anything but our format within our bounds."""
    if len(stored) > 512:  # ours are about 100 characters; do not decode a corrupt megabyte
        raise MalformedHash("password hash too long")
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise MalformedHash("not a scrypt password hash")
    fields = dict(item.partition("=")[::2] for item in parts[1].split(","))
    if sorted(fields) != ["n", "p", "r"] or parts[1].count(",") != 2:
        raise MalformedHash("scrypt parameters must be n, r and p")
    params = ScryptParams(_param_int(fields["n"]), _param_int(fields["r"]),
                          _param_int(fields["p"]))
    try:
        params.check()
    except ValueError as exc:
        raise MalformedHash(str(exc)) from exc
    salt, key = _b64(parts[2]), _b64(parts[3])
    if not 8 <= len(salt) <= 64 or not 16 <= len(key) <= 64:
        raise MalformedHash("salt or key of an unexpected length")
    return StoredHash(params, salt, key)


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``, using the parameters stored with it.

    Constant-time comparison; ``MalformedHash`` if ``stored`` cannot be read (the caller logs it
    and answers ``bad-password``). Slow on purpose (one scrypt): call it outside every lock.
    """
    parsed = parse_hash(stored)
    if len(password) > MAX_PASSWORD:
        return False  # could never have been registered; no need to spend scrypt on it
    return hmac.compare_digest(_derive(password, parsed.salt, parsed.params, len(parsed.key)),
                               parsed.key)


def needs_rehash(stored: str, params: ScryptParams = DEFAULT_PARAMS) -> bool:
    """True when ``stored`` was made with other parameters (rehash it after a good login)."""
    return parse_hash(stored).params != params


# --------------------------------------------------------------------------------------------
# The server password (7.1).

PASSWORD_ENV = "CHAT_PASSWORD"


def load_server_password(password_file: str | Path | None,
                         environ: Mapping[str, str] | None = None) -> str | None:
    """The server password: ``--password-file``'s first line, else ``CHAT_PASSWORD``, else None.

    The file's first line is taken without its line ending (spaces are kept: they may be part
    of the password). An empty first line is an error (``ValueError``): the operator meant a
    password. An empty ``CHAT_PASSWORD`` counts as unset, as shells often leave one behind.
    """
    if password_file is not None:
        with open(password_file, encoding="utf-8") as f:
            line = f.readline().rstrip("\r\n")
        if not line:
            raise ValueError(f"{password_file}: the first line (the server password) is empty")
        return line
    value = (os.environ if environ is None else environ).get(PASSWORD_ENV, "")
    return value or None


class ServerPassword:
    """The room's shared key: needed? given? right? (SPEC 7.1). Immutable once made."""

    def __init__(self, secret: str | None) -> None:
        # Kept as a digest: compare_digest then compares equal lengths, leaking not even that.
        self._digest = None if secret is None else self._hash(secret)

    @staticmethod
    def _hash(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    @property
    def required(self) -> bool:
        """True when every native ``hello`` must carry ``server_password``."""
        return self._digest is not None

    def check(self, given: str | None) -> None:
        """Nothing when admitted; ``password-required`` or ``bad-password`` (for the server)."""
        if self._digest is None:
            return
        if given is None:
            raise Refusal(Code.PASSWORD_REQUIRED, "This server needs its password.",
                          for_=For.SERVER)
        if not hmac.compare_digest(self._hash(given), self._digest):
            raise Refusal(Code.BAD_PASSWORD, "That is not the server's password.",
                          for_=For.SERVER)


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
                 max_tracked: int = MAX_TRACKED, clock: Clock = time.monotonic) -> None:
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
            self._add(self._addresses, address, now)
            if key is not None:
                self._add(self._names, key, now)
        return Attempt(key, address, now)

    def succeed(self, attempt: Attempt) -> None:
        """The password was right: forget the name's failures and take this attempt back."""
        with self._lock:
            self._take_back(self._addresses, attempt.address, attempt.at)
            if attempt.name is not None:
                self._names.pop(attempt.name, None)

    def cancel(self, attempt: Attempt) -> None:
        """The attempt never reached a password check: take it back from both counts."""
        with self._lock:
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


# --------------------------------------------------------------------------------------------
# Admins and sanctions (7.3).

MUTE_MINUTES = 10
"""SPEC 7.3: ``mute`` without ``minutes`` lasts 10 minutes."""
MAX_MINUTES = 366 * 24 * 60
"""A year: longer is a typo; a ban without ``minutes`` lasts until the server stops anyway."""


class Action(str, Enum):
    """The moderation requests; the value is the request's ``type``."""

    KICK = "kick"
    MUTE = "mute"
    UNMUTE = "unmute"
    BAN = "ban"


class Admins:
    """The ``--admin`` names, compared without regard to case. Immutable once made."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._keys = frozenset(name_key(name) for name in names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name_key(name) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def may_moderate(self, name: str, account: str | None) -> bool:
        """True when ``name`` is an admin and this session logged in as that very account.

        ``account``: the account this session proved its password for (or resumed a session
        that had), None otherwise. An admin's name taken before the account exists, or under
        ``--store none`` after a restart, moderates nothing until its password is proved.
        """
        return name in self and account is not None and name_key(account) == name_key(name)

    def authorize(self, name: str, account: str | None, action: Action, target: str) -> None:
        """``not-allowed`` unless this member may do ``action``, and not to itself."""
        if not self.may_moderate(name, account):
            raise Refusal(Code.NOT_ALLOWED, f"Only an admin logged in with its password may "
                                            f"{action.value}.")
        if name_key(target) == name_key(name):
            raise Refusal(Code.NOT_ALLOWED, f"An admin cannot {action.value} itself.")


def _minutes(value: object, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MINUTES:
        raise Refusal(Code.BAD_REQUEST,
                      f"minutes must be a whole number from 1 to {MAX_MINUTES}.")
    return value


def mute_until(now: float, minutes: object = None) -> float:
    """When a mute given at ``now`` ends (``minutes`` from the request; default 10)."""
    m = _minutes(minutes, MUTE_MINUTES)
    assert m is not None
    return now + 60.0 * m


def ban_until(now: float, minutes: object = None) -> float | None:
    """When a ban given at ``now`` ends; None (no ``minutes``): when the server stops."""
    m = _minutes(minutes, None)
    return None if m is None else now + 60.0 * m


class BanKind(str, Enum):
    """What a ban holds: an account (by name) or, for an unregistered name, an address."""

    ACCOUNT = "account"
    ADDRESS = "address"


@dataclass(frozen=True)
class BanKey:
    """What is banned: ``kind`` and its key (a case-folded name, or an ``address_key``)."""

    kind: BanKind
    value: str


def ban_key(name: str, host: str, *, is_account: bool) -> BanKey:
    """The key a ban on this member holds: its account, else its address (SPEC 7.3)."""
    if is_account:
        return BanKey(BanKind.ACCOUNT, name_key(name))
    return BanKey(BanKind.ADDRESS, address_key(host))


@dataclass(frozen=True)
class Mute:
    """``name`` (case-folded) may not ``say`` or ``dm`` until ``until``."""

    name: str
    until: float
    by: str
    reason: str | None = None


@dataclass(frozen=True)
class Ban:
    """``key`` may not register until ``until`` (None: until the server stops)."""

    key: BanKey
    until: float | None
    by: str
    reason: str | None = None

    def active(self, now: float) -> bool:
        """True while the ban holds."""
        return self.until is None or now < self.until


def _ban_left(ban: Ban, now: float) -> str:
    if ban.until is None:
        return "until the server stops"
    left = max(1, math.ceil((ban.until - now) / 60))
    return f"for {left} more minute{'' if left == 1 else 's'}"


class Sanctions:
    """The mutes and bans in force. Thread-safe (one leaf lock: it never calls out).

    Times are the caller's clock; bans outlive a restart in the store, so use wall-clock time
    (``time.time``) for both. Expired entries are dropped when they are looked at or listed.
    """

    def __init__(self, bans: Iterable[Ban] = ()) -> None:
        self._lock = threading.Lock()  # guards both dicts
        self._mutes: dict[str, Mute] = {}
        self._bans: dict[BanKey, Ban] = {ban.key: ban for ban in bans}

    def mute(self, name: str, now: float, minutes: object = None, *, by: str,
             reason: str | None = None) -> Mute:
        """Mute ``name`` (``minutes``: default 10); a new mute replaces an old one."""
        mute = Mute(name_key(name), mute_until(now, minutes), by, reason)
        with self._lock:
            self._mutes[mute.name] = mute
        return mute

    def unmute(self, name: str) -> Mute | None:
        """Lift ``name``'s mute; the mute lifted, or None if there was none."""
        with self._lock:
            return self._mutes.pop(name_key(name), None)

    def is_muted(self, name: str, now: float) -> Mute | None:
        """The mute holding ``name`` at ``now``, or None."""
        key = name_key(name)
        with self._lock:
            mute = self._mutes.get(key)
            if mute is not None and now >= mute.until:
                del self._mutes[key]
                return None
            return mute

    def check_may_speak(self, name: str, now: float) -> None:
        """``muted`` when ``name`` may not ``say`` or ``dm`` now."""
        mute = self.is_muted(name, now)
        if mute is not None:
            left = max(1, math.ceil((mute.until - now) / 60))
            raise Refusal(Code.MUTED, f"You are muted by {mute.by} for {left} more minute"
                                      f"{'' if left == 1 else 's'}.")

    def ban(self, key: BanKey, now: float, minutes: object = None, *, by: str,
            reason: str | None = None) -> Ban:
        """Ban ``key`` (``minutes``: default until the server stops); replaces an older ban."""
        ban = Ban(key, ban_until(now, minutes), by, reason)
        with self._lock:
            self._bans[key] = ban
        return ban

    def is_banned(self, key: BanKey, now: float) -> Ban | None:
        """The ban holding ``key`` at ``now``, or None."""
        with self._lock:
            ban = self._bans.get(key)
            if ban is not None and not ban.active(now):
                del self._bans[key]
                return None
            return ban

    def check_may_register(self, name: str, host: str, now: float, *, is_account: bool) -> None:
        """``banned`` when this ``hello`` may not register: its account's or its address's ban."""
        keys = [BanKey(BanKind.ADDRESS, address_key(host))]
        if is_account:
            keys.insert(0, BanKey(BanKind.ACCOUNT, name_key(name)))
        for key in keys:
            ban = self.is_banned(key, now)
            if ban is not None:
                raise Refusal(Code.BANNED, f"You are banned from this room by {ban.by} "
                                           f"{_ban_left(ban, now)}.")

    def bans(self, now: float) -> list[Ban]:
        """The bans in force at ``now`` (for the store), dropping those that ended."""
        with self._lock:
            for key in [k for k, ban in self._bans.items() if not ban.active(now)]:
                del self._bans[key]
            return list(self._bans.values())
