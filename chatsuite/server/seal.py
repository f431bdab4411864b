"""The cluster's trust: Redis is not trusted (``--redis``, cluster.py).

What it owns: the shared secret (``--cluster-secret-file`` or ``CHAT_CLUSTER_SECRET``) and the
check of the Redis URL made before any connection (a Redis on another host needs a password
unless ``--redis-insecure``); the ``Sealer`` (an HMAC-SHA256 of the secret over everything a
node publishes or stores, integrity only: a Redis reader still sees every text); the
``ReplayGuard`` (a validly sealed message seen again, or sealed too long ago, is refused); and
``Complaints``, which logs what is ignored at most once per ``COMPLAINT_INTERVAL``.

Invariant: pure apart from the clock and the secret file: no Redis, no room, no thread of its
own; ``Complaints`` may be called from any thread, a ``ReplayGuard`` from one (the subscriber).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SECRET_ENV = "CHAT_CLUSTER_SECRET"
MIN_SECRET = 16  # bytes: shorter secrets are refused
COMPLAINT_INTERVAL = 10.0  # seconds between two log lines about ignored data
# What a seal covers besides the payload: a member record, a message and an account can never
# pass for one another.
ROOM_SEAL = b"chat:room"
USER_SEAL = b"chat:users"
ACCOUNT_SEAL = b"chat:accounts"
MAC_CHARS = 64  # hex SHA-256
# A message sent longer ago than this (by its node's clock) is refused as a replay; within it,
# each publisher's sequence numbers must grow.
REPLAY_WINDOW = 120.0


class ClusterError(Exception):
    """Redis cannot be reached (or the URL is wrong) when the server starts."""


class ClusterConfigError(ClusterError):
    """The cluster options are unsafe or incomplete: the node refuses to start (exit code 2)."""


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"***@{host}").geturl()


def is_loopback(host: str) -> bool:
    """``host`` is this machine, judged from its text alone (no name is ever resolved)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # another name: it may resolve anywhere
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_url(url: str, insecure: bool = False) -> None:
    """Refuse (``ClusterConfigError``) a Redis on another host whose URL carries no password.

    Decided from the URL alone, before any connection: a ``unix://`` socket and a loopback
    address are this machine; anything else needs a password (``redis://:PASSWORD@host``, or
    ``?password=``) unless ``insecure``. Read as redis-py reads it (the host may be a query
    argument when the URL has none).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ClusterConfigError(f"bad Redis URL {safe_url(url)!r}: "
                                 "it must start with redis://, rediss:// or unix://")
    if parts.scheme == "unix" or insecure:
        return
    query = parse_qs(parts.query)
    host = unquote(parts.hostname or "") or query.get("host", ["localhost"])[0]
    password = parts.password or query.get("password", [""])[0]
    if not is_loopback(host) and not password:
        raise ClusterConfigError(
            f"refusing Redis at {safe_url(url)}: it is not on this machine and the URL has no "
            "password, so anyone who can reach it could read and disrupt the cluster; give "
            "Redis a password (redis://:PASSWORD@host:port/db, rediss:// for TLS) or accept "
            "the risk with --redis-insecure"
        )


def load_secret(secret: str | None, path: str | None,
                environ: Mapping[str, str] | None = None) -> bytes:
    """The cluster's shared secret: given, else read from ``path``, else ``$CHAT_CLUSTER_SECRET``.

    Surrounding whitespace (a file's last newline) is not part of it. Missing or shorter than
    ``MIN_SECRET`` bytes: ``ClusterConfigError``.
    """
    if secret is not None:
        where, value = "the cluster secret", secret.strip().encode()
    elif path is not None:
        where = f"the cluster secret file {path}"
        try:
            with open(path, "rb") as file:
                value = file.read().strip()
        except OSError as error:
            raise ClusterConfigError(f"cannot read {where}: {error.strerror}") from None
    else:
        where = f"${SECRET_ENV}"
        value = (os.environ if environ is None else environ).get(SECRET_ENV, "").strip().encode()
        if not value:
            raise ClusterConfigError(
                "--redis needs the cluster's shared secret (the same on every node): "
                f"--cluster-secret-file FILE or the environment variable {SECRET_ENV}"
            )
    if len(value) < MIN_SECRET:
        raise ClusterConfigError(f"{where} is too short: at least {MIN_SECRET} bytes")
    return value


class Unsigned(ValueError):
    """Data without a seal."""


class Forged(ValueError):
    """Data whose seal does not match: another secret, or changed after sealing."""


class Sealer:
    """Seals text with an HMAC-SHA256 of the cluster secret: ``<64 hex digits>.<text>``."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, kind: bytes, text: str) -> str:
        return hmac.digest(self._secret, kind + b"\0" + text.encode(), hashlib.sha256).hex()

    def seal(self, kind: bytes, text: str) -> str:
        return f"{self._mac(kind, text)}.{text}"

    def open(self, kind: bytes, sealed: str) -> str:
        """The text under a valid seal of this ``kind``; raises ``Unsigned`` or ``Forged``."""
        if len(sealed) <= MAC_CHARS or sealed[MAC_CHARS] != ".":
            raise Unsigned("no seal")
        text = sealed[MAC_CHARS + 1:]
        if not hmac.compare_digest(sealed[:MAC_CHARS], self._mac(kind, text)):
            raise Forged("bad seal")
        return text


class Complaints:
    """Logs ignored data at most once per ``interval``, with how many were not logged since.

    A flood of forgeries then costs the log one line per interval, not one per forgery.
    """

    def __init__(self, log: Callable[[str], None], interval: float = COMPLAINT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.interval = interval
        self.clock = clock
        self.count = 0  # everything ignored, logged or not
        self._lock = threading.Lock()
        self._quiet_until = float("-inf")
        self._unlogged = 0

    def __call__(self, text: str) -> None:
        with self._lock:
            self.count += 1
            now = self.clock()
            if now < self._quiet_until:
                self._unlogged += 1
                return
            unlogged, self._unlogged = self._unlogged, 0
            self._quiet_until = now + self.interval
        more = f" ({unlogged} more ignored since the last such line)" if unlogged else ""
        self.log(f"cluster: ignored {text}{more}")

    def flush(self) -> None:
        """Log the count of the unlogged ones once the interval is over (the keeper calls it)."""
        with self._lock:
            if not self._unlogged or self.clock() < self._quiet_until:
                return
            unlogged, self._unlogged = self._unlogged, 0
            self._quiet_until = self.clock() + self.interval
        self.log(f"cluster: ignored {unlogged} more unsigned, forged or replayed items")



class ReplayGuard:
    """Tells a validly sealed message that is new from a replay: by its age and its sequence.

    Each publisher (``p``, a stream) numbers its messages (``s``) and stamps them (``t``); a
    stream is forgotten once its last message is older than the window, when a copy of it
    would be refused for its age anyway.
    """

    def __init__(self, channel: str, window: float = REPLAY_WINDOW,
                 clock: Callable[[], float] = time.time) -> None:
        self.channel = channel  # named in the reasons
        self.window = window
        self.clock = clock
        self._streams: dict[str, tuple[int, float]] = {}  # publisher -> (last seq, its time)

    def replayed(self, message: dict[str, Any]) -> str | None:
        """Why ``message`` is not new (None: it is, and it is remembered)."""
        now, sent = self.clock(), float(message["t"])
        if abs(now - sent) > self.window:
            return (f"a message sealed {now - sent:.0f} s ago by its node's clock on "
                    f"{self.channel} (a replay, or the nodes' clocks disagree)")
        stream, sequence = str(message["p"]), int(message["s"])
        last = self._streams.get(stream)
        if last is not None and sequence <= last[0]:
            return f"a replayed message on {self.channel}"
        if last is None:
            self._streams = {k: v for k, v in self._streams.items() if v[1] > now - self.window}
        self._streams[stream] = (sequence, sent)
        return None
