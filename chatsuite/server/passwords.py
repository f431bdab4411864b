"""Account password hashes and the server password (SPEC 7.1, 7.2); pure, no store.

Hashes are salted ``hashlib.scrypt`` in one self-describing string
(``scrypt$n=16384,r=8,p=1$<salt>$<key>``), verified in constant time with the parameters stored
beside the hash, so the cost can be raised later without breaking old accounts. Invariant:
scrypt (16 MiB a run) runs only on ``HASH_WORKERS`` threads, never on the caller's, so a class
logging in at once stays light; no lock is held while it runs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
import unicodedata
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from chatsuite.server.access import Code, For, Refusal

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
                      for_=For.ACCOUNT.value)
    if len(password) > MAX_PASSWORD:
        raise Refusal(Code.BAD_PASSWORD, f"A password has at most {MAX_PASSWORD} characters.",
                      for_=For.ACCOUNT.value)


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
                          for_=For.SERVER.value)
        if not hmac.compare_digest(self._hash(given), self._digest):
            raise Refusal(Code.BAD_PASSWORD, "That is not the server's password.",
                          for_=For.SERVER.value)
