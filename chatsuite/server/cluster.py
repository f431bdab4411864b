"""The cluster backplane: several chat servers acting as one room, over Redis (``--redis URL``).

Imported only when ``--redis`` is given (it needs the ``redis`` package: the ``cluster`` extra).

What it owns:

* the node's number ``k`` (``INCR chat:node-seq``); member ids are ``k * 1_000_000 + fd``, so
  they stay integers and unique across the cluster;
* the cluster registry in Redis: ``chat:names`` (hash: casefolded name -> id, claimed with
  HSETNX, so exactly one node wins a name), ``chat:users`` (hash: id -> the member's record,
  JSON: its ``user`` object, node, dialect and registration time), ``chat:nodes`` (set of node
  numbers), ``chat:node:<k>`` (this node is alive: a key with a TTL of ``ttl`` seconds),
  ``chat:reap:<k>`` (who cleans up after a dead node), ``chat:auto`` (automatic names);
* three threads:
  - the publisher takes what the room hands it (``joined``, ``left``, ``updated``, ``said``,
    ``sent``) from one FIFO queue and writes each round as one pipeline: registry changes, and
    the events of the round as one PUBLISH on ``chat:room``. One queue, filled by each sender's
    own thread, so the events of one sender reach every node in the order it sent them;
  - the subscriber: SUBSCRIBE, then a snapshot of ``chat:users`` into the room's mirror of the
    other nodes, then every other node's events into ``Room.remote`` (its own are skipped);
  - the keeper refreshes ``chat:node:<k>`` three times per TTL, claims the names of members
    that registered while Redis was away, and reaps nodes whose key expired: it takes
    ``chat:reap:<k>`` (SET NX), announces their users ``lost`` and frees their names. While
    Redis is away it retries every ``retry`` seconds, then rejoins.

Trust: Redis is not trusted. Everything a node publishes and every member record it stores
is sealed with an HMAC-SHA256 of the cluster's shared secret (``--cluster-secret-file`` or
``CHAT_CLUSTER_SECRET``; required); a message or record that is unsigned, forged, or filed
under another id or name is ignored and logged (at most once per ``COMPLAINT_INTERVAL``).
A node refuses to start against a Redis on another host whose URL has no password, unless
told ``--redis-insecure``. Sealing is integrity only: a Redis reader still sees every text.

Names after an outage: a name given on two nodes while Redis was away goes to the earlier
registration, ranked by ``(joined_at, id)``, whichever node rejoins first; the other member
is disconnected.

Invariant: no Redis call is made with ``Room.lock`` held, and every Redis call is guarded: a
connection error marks an outage (logged once), the room keeps serving this node's members on
its own, and the keeper brings the node back into the cluster when Redis answers again.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from chatsuite.server.room import Room
from protocol import parse_target, utc_timestamp

CHANNEL = "chat:room"
NODE_SEQ = "chat:node-seq"
AUTO_SEQ = "chat:auto"
NAMES = "chat:names"
USERS = "chat:users"
NODES = "chat:nodes"
ID_STRIDE = 1_000_000  # member id = node * ID_STRIDE + file descriptor
REAP_CLAIM_MS = 30_000
SECRET_ENV = "CHAT_CLUSTER_SECRET"
MIN_SECRET = 16  # bytes: shorter secrets are refused
COMPLAINT_INTERVAL = 10.0  # seconds between two log lines about ignored data
# What a seal covers besides the payload: a record can never pass for a message, nor the reverse.
ROOM_SEAL = b"chat:room"
USER_SEAL = b"chat:users"
MAC_CHARS = 64  # hex SHA-256
# A message sent longer ago than this (by its node's clock) is refused as a replay; within it,
# each publisher's sequence numbers must grow.
REPLAY_WINDOW = 120.0

# Claims a name and stores its member's record, at once: whoever finds the name finds the record.
_CLAIM = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
# Frees a name only if it still belongs to this id (the id may have claimed it long ago).
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
# The record of the member holding a name, in one round trip.
_LOOKUP_NAME = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
return redis.call('HGET', KEYS[2], id)
"""
# Hands a name to a member if it is still held by whom the caller saw ('' for nobody); the
# record of the member it is taken from goes with it (that member is being disconnected).
_TAKE = """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if (holder or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
if holder and holder ~= ARGV[3] then redis.call('HDEL', KEYS[2], holder) end
return 1
"""
# After Redis lost its data, the counter must not hand out a number a running node holds.
_RAISE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"""

Record = dict[str, Any]
Outcome = Literal["won", "lost", "wait"]
Command = Callable[[Any], object]  # applied to a pipeline


class PubSub(Protocol):
    """What the subscriber uses of ``redis.client.PubSub``."""

    def subscribe(self, *channels: str) -> object: ...
    def get_message(self, ignore_subscribe_messages: bool = False,
                    timeout: float = 0.0) -> dict[str, Any] | None: ...
    def close(self) -> None: ...


class ClusterError(Exception):
    """Redis cannot be reached (or the URL is wrong) when the server starts."""


class ClusterConfigError(ClusterError):
    """The cluster options are unsafe or incomplete: the node refuses to start (exit code 2)."""


def node_key(node: int) -> str:
    return f"chat:node:{node}"


def reap_key(node: int) -> str:
    return f"chat:reap:{node}"


def _dumps(value: Any) -> str:
    # ASCII escapes: a text never makes Redis's UTF-8 encoding fail.
    return json.dumps(value, separators=(",", ":"))


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


def _text(value: str | bytes) -> str:
    """A reply as text (the client decodes replies already; its type hints cannot know that)."""
    return value.decode() if isinstance(value, bytes) else value


def _rank(record: Record) -> tuple[float, int]:
    """Registration order across the cluster: time on the node's clock, then id (unique)."""
    return float(record["at"]), int(record["id"])


@dataclass
class _Op:
    """One thing for the publisher: registry commands, then events (or ``lazy`` makes both)."""

    commands: list[Command] = field(default_factory=list)
    events: list[Record] = field(default_factory=list)
    done: threading.Event | None = None
    lazy: Callable[[], tuple[list[Command], list[Record]]] | None = None


class Backplane:
    """This node's link to the cluster: the registry in Redis and the event channel."""

    def __init__(
        self, url: str, log: Callable[[str], None], ttl: float = 3.0, retry: float = 0.5,
        disconnect: Callable[[int], None] | None = None, *, secret: str | None = None,
        secret_file: str | None = None, insecure: bool = False,
    ) -> None:
        # Both checks before the client exists: a refused URL is never connected to.
        check_url(url, insecure)
        self._sealer = Sealer(load_secret(secret, secret_file))
        self.url = url
        self.log = log
        self.ttl = ttl
        self.retry = retry
        self.disconnect = disconnect or (lambda member_id: None)
        self.node = 0
        self.token = uuid.uuid4().hex
        self.timeout = min(1.0, ttl / 2)
        self.room: Room | None = None
        self.complaints = Complaints(log)
        try:
            # No hidden retries: an error means an outage, which this module handles itself.
            self._redis = redis.Redis.from_url(
                url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0), decode_responses=True,
            )
        except ValueError as error:
            raise ClusterError(f"bad Redis URL {url!r}: {error}") from None
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._lookup_name = self._redis.register_script(_LOOKUP_NAME)
        self._raise = self._redis.register_script(_RAISE)
        self._take = self._redis.register_script(_TAKE)
        self._pubsub: Callable[[], PubSub] = self._redis.pubsub  # typed: redis's is not
        self._state = threading.Lock()  # guards the four fields below
        self._up = False
        self._generation = 0  # counts outages: the subscriber resubscribes after each
        self._up_since = 0.0
        self._claimed: set[int] = set()  # members of this node whose name Redis holds
        self._evicting: set[tuple[int, float]] = set()  # (id, joined_at) being disconnected
        self._sequence = 0  # of the messages of this node's publisher (its thread only)
        self._streams: dict[str, tuple[int, float]] = {}  # publisher -> (last seq, its time)
        self._up_event = threading.Event()
        self._synced = threading.Event()  # the subscriber has subscribed and taken its snapshot
        self._stopping = threading.Event()
        self._ops: list[_Op] = []
        self._ops_ready = threading.Condition()
        self._threads: list[threading.Thread] = []

    # -- life ---------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    @property
    def id_base(self) -> int:
        """What this node adds to a file descriptor to make a member id."""
        return self.node * ID_STRIDE

    def start(self, room: Room) -> None:
        """Join the cluster (raises ``ClusterError`` when Redis does not answer) and start."""
        self.room = room
        try:
            self._redis.ping()
            while True:
                node = int(self._redis.incr(NODE_SEQ))
                # After Redis lost its data a running node may hold this number: skip it.
                if self._redis.set(node_key(node), self.token, nx=True, px=self._ttl_ms):
                    break
            self._redis.sadd(NODES, node)
        except RedisError as error:
            raise ClusterError(f"cannot reach Redis at {safe_url(self.url)}: {error}") from None
        self.node = node
        self._mark_up()
        for target, name in ((self._publish_loop, "publisher"),
                             (self._subscribe_loop, "subscriber"), (self._keep_loop, "keeper")):
            thread = threading.Thread(target=target, name=f"cluster-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        # Serve only once this node hears the others, so its first clients see the whole room.
        if not self._synced.wait(self.ttl):
            self.log("cluster: the subscription is slow to start; carrying on")
        self.log(f"cluster: joined {safe_url(self.url)} as node {node} "
                 f"(member ids {self.id_base} + fd)")

    def stop(self) -> None:
        """Leave the cluster: this node's users are announced lost to the others, names freed."""
        self._stopping.set()
        with self._ops_ready:
            self._ops_ready.notify()
        self._threads[0].join(0.5)  # the publisher sends what was queued before
        if self._up:
            try:
                self._reap_node(self.node)
                self._redis.delete(node_key(self.node))
                self._redis.srem(NODES, self.node)
            except RedisError:
                pass  # the other nodes reap this one when its key expires
        for thread in self._threads[1:]:
            thread.join(0.5)
        self._redis.close()

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def _mark_up(self) -> None:
        with self._state:
            self._up = True
            self._up_since = time.monotonic()
        self._up_event.set()

    def _down(self, error: BaseException) -> None:
        """Redis failed: log it once, forget the other nodes, keep serving this node's members.

        Only a lost or timed-out connection is an outage; Redis refusing one command (an
        error reply) is logged and that command alone fails.
        """
        if not isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
            self.log(f"cluster: Redis refused a command: {error!r}")
            return
        with self._state:
            if not self._up:
                return
            self._up = False
            self._generation += 1
            self._claimed.clear()  # Redis may come back without its data: claim them again
        self._up_event.clear()
        if self._stopping.is_set():
            return
        self.log(f"cluster: lost Redis at {safe_url(self.url)} ({error}); "
                 f"serving this node's clients only until it is back")
        assert self.room is not None
        self.room.cluster_reset([])

    # -- what the room calls (never with its lock held) -----------------------------------

    def claim(self, name: str, record: Record) -> bool | None:
        """Claim ``name`` in the whole cluster for the member of ``record`` (stored with it).

        True: it is this member's; False: taken; None: Redis is away (not known).
        """
        if not self._up:
            return None
        try:
            sealed = self._seal_record(record)
            return bool(self._claim(keys=[NAMES, USERS],
                                    args=[name.casefold(), record["id"], sealed]))
        except RedisError as error:
            self._down(error)
            return None

    def release(self, name: str, member_id: int) -> None:
        """Give back a name claimed for a registration that then failed."""
        if not self._up:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            self._release(keys=[NAMES], args=[name.casefold(), member_id], client=pipe)
            pipe.hdel(USERS, member_id)
            pipe.execute()
        except RedisError as error:
            self._down(error)

    def auto_number(self) -> int | None:
        """The next number for an automatic name (``user<n>``), shared by all nodes."""
        if not self._up:
            return None
        try:
            return int(self._redis.incr(AUTO_SEQ))
        except RedisError as error:
            self._down(error)
            return None

    def lookup(self, target: str | int) -> Record | None:
        """The record of a member of the cluster, by id or name, straight from Redis."""
        if not self._up:
            return None
        key = parse_target(target)
        try:
            if isinstance(key, int):
                raw = self._redis.hget(USERS, str(key))
            else:
                raw = self._lookup_name(keys=[NAMES, USERS], args=[key.casefold()])
        except RedisError as error:
            self._down(error)
            return None
        # Filed under the id or name asked for, or it would route the message to someone else.
        if isinstance(key, int):
            return self._open_record(raw, member_id=key)
        return self._open_record(raw, name=key.casefold())

    def joined(self, record: Record, claimed: bool) -> None:
        """A member registered here: store it and announce it (unclaimed: the keeper will)."""
        if not claimed:
            return
        with self._state:
            self._claimed.add(record["id"])
        self._enqueue(_Op([self._store(record)],
                          [{"k": "join", "u": record, "ts": utc_timestamp()}]))

    def left(self, record: Record, kind: str) -> None:
        """A member left (``left``) or vanished (``lost``): free its name, tell the others.

        Waits (briefly) until Redis has it, so that the name is free when the connection
        closes and its file descriptor, the id, cannot be reused before.
        """
        with self._state:
            self._claimed.discard(record["id"])
            self._evicting.discard((record["id"], record["at"]))
        member_id, name = record["id"], record["name"].casefold()
        done = threading.Event()
        self._enqueue(_Op(
            [lambda pipe: self._release(keys=[NAMES], args=[name, member_id], client=pipe),
             lambda pipe: pipe.hdel(USERS, member_id)],
            [{"k": "leave", "u": record, "e": kind, "ts": utc_timestamp()}], done,
        ))
        done.wait(self.timeout)

    def updated(self, record: Record) -> None:
        """A member's status or mode changed."""
        self._enqueue(_Op([self._store(record)], [{"k": "update", "u": record}]))

    def said(self, record: Record, texts: list[str], ts: str) -> None:
        """A broadcast (a run of texts) from a member of this node."""
        self._enqueue(_Op(events=[{"k": "say", "u": record, "t": texts, "ts": ts}]))

    def sent(self, record: Record, to: Record, text: str, ts: str) -> None:
        """A direct message from a member of this node to a member of another."""
        self._enqueue(_Op(events=[{"k": "dm", "u": record, "to": to, "t": text, "ts": ts}]))

    def _store(self, record: Record) -> Command:
        value = self._seal_record(record)
        return lambda pipe: pipe.hset(USERS, record["id"], value)

    # -- seals --------------------------------------------------------------------------------

    def _seal_record(self, record: Record) -> str:
        return self._sealer.seal(USER_SEAL, _dumps(record))

    def _seal_message(self, origin: int, events: list[Record], stream: str | None = None) -> str:
        """A message, sealed, with what makes a replay of it detectable.

        ``p`` names the publisher (this node's publisher thread, unless ``stream``), ``s``
        counts its messages, ``t`` is the time it was sealed.
        """
        if stream is None:
            self._sequence += 1
            stream, sequence = self.token, self._sequence
        else:
            sequence = 1  # a stream of one message (the reaper's)
        message = {"o": origin, "p": stream, "s": sequence, "t": round(time.time(), 3),
                   "ev": events}
        return self._sealer.seal(ROOM_SEAL, _dumps(message))

    def _replayed(self, message: Record) -> str | None:
        """Why a validly sealed message is not new (None: it is); the subscriber's thread only.

        A stream is forgotten once its last message is older than the window, when a copy of
        it would be refused for its age anyway.
        """
        now, sent = time.time(), float(message["t"])
        if abs(now - sent) > REPLAY_WINDOW:
            return (f"a message sealed {now - sent:.0f} s ago by its node's clock on {CHANNEL} "
                    "(a replay, or the nodes' clocks disagree)")
        stream, sequence = str(message["p"]), int(message["s"])
        last = self._streams.get(stream)
        if last is not None and sequence <= last[0]:
            return f"a replayed message on {CHANNEL}"
        if last is None:
            self._streams = {k: v for k, v in self._streams.items() if v[1] > now - REPLAY_WINDOW}
        self._streams[stream] = (sequence, sent)
        return None

    def _open_record(self, raw: str | bytes | None, member_id: int | str | bytes | None = None,
                     name: str | None = None) -> Record | None:
        """A stored record if its seal is valid and it is filed under its own id or name.

        A valid record copied under another id or name would misroute: it is refused too.
        """
        if raw is None:
            return None
        if isinstance(member_id, bytes):
            member_id = _text(member_id)
        try:
            record = json.loads(self._sealer.open(USER_SEAL, _text(raw)))
            if not isinstance(record, dict):
                raise TypeError("not an object")
            if member_id is not None and str(record["id"]) != str(member_id):
                raise Forged(f"a record of id {record['id']} filed under id {member_id!r}")
            if name is not None and str(record["name"]).casefold() != name:
                raise Forged(f"a record of {record['name']!r} filed under the name {name!r}")
        except (Unsigned, Forged) as error:
            kind = "an unsigned" if isinstance(error, Unsigned) else "a forged"
            self.complaints(f"{kind} member record in {USERS} ({error})")
            return None
        except (ValueError, KeyError, TypeError) as error:
            self.complaints(f"a malformed member record in {USERS} ({error!r})")
            return None
        return record

    def _stored(self) -> list[Record]:
        """Every valid member record in Redis."""
        found = (self._open_record(raw, key) for key, raw in self._redis.hgetall(USERS).items())
        return [record for record in found if record is not None]

    # -- the publisher ------------------------------------------------------------------------

    def _enqueue(self, op: _Op) -> None:
        if not self._up or self._stopping.is_set():
            if op.done is not None:
                op.done.set()  # Redis is away: remote nodes miss it (see docs/cluster.md)
            return
        with self._ops_ready:
            self._ops.append(op)
            if len(self._ops) == 1:
                self._ops_ready.notify()

    def _publish_loop(self) -> None:
        while True:
            with self._ops_ready:
                while not self._ops and not self._stopping.is_set():
                    self._ops_ready.wait()
                ops, self._ops = self._ops, []
            if not ops:
                return
            try:
                if self._up:
                    self._write(ops)
            except RedisError as error:
                self._down(error)
            except Exception as error:  # the publisher must outlive any one bug
                self.log(f"cluster: publisher error, carrying on: {error!r}")
            finally:
                for op in ops:
                    if op.done is not None:
                        op.done.set()

    def _write(self, ops: list[_Op]) -> None:
        """One pipeline: each op's commands, and its events as few PUBLISHes as order allows."""
        pipe = self._redis.pipeline(transaction=False)
        batch: list[Record] = []
        for op in ops:
            commands, events = op.lazy() if op.lazy is not None else (op.commands, op.events)
            if commands:
                # The registry changes before the events after it: a snapshot taken after
                # subscribing then never misses what an event already announced.
                if batch:
                    pipe.publish(CHANNEL, self._seal_message(self.node, batch))
                    batch = []
                for command in commands:
                    command(pipe)
            batch.extend(events)
        if batch:
            pipe.publish(CHANNEL, self._seal_message(self.node, batch))
        pipe.execute()

    # -- the subscriber -----------------------------------------------------------------------

    def _subscribe_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._up_event.wait(0.2):
                continue
            generation = self._generation
            pubsub = self._pubsub()
            try:
                pubsub.subscribe(CHANNEL)
                deadline = time.monotonic() + self.ttl
                while True:  # the confirmation: from here on every event reaches us
                    message = pubsub.get_message(timeout=0.1)
                    if message is not None and message["type"] == "subscribe":
                        break
                    if time.monotonic() > deadline or self._stopping.is_set():
                        raise redis.ConnectionError("no confirmation of SUBSCRIBE")
                self._snapshot()
                self._synced.set()
                while not self._stopping.is_set() and self._generation == generation:
                    message = pubsub.get_message(timeout=0.1)
                    if message is not None and message["type"] == "message":
                        self._receive(message["data"])
            except RedisError as error:
                self._down(error)
            except Exception as error:  # the subscriber must outlive any one bug
                self.log(f"cluster: subscriber error, resubscribing: {error!r}")
            finally:
                try:
                    pubsub.close()
                except (RedisError, OSError):
                    pass

    def _snapshot(self) -> None:
        assert self.room is not None
        self.room.cluster_reset(r for r in self._stored() if r["node"] != self.node)

    def _receive(self, data: str) -> None:
        assert self.room is not None
        try:
            text = self._sealer.open(ROOM_SEAL, data)
        except Unsigned:
            self.complaints(f"an unsigned message on {CHANNEL}")
            return
        except Forged:
            self.complaints(f"a forged message on {CHANNEL} (its seal does not match)")
            return
        try:
            message = json.loads(text)
            if message["o"] == self.node:
                return  # this node delivered its own events already
            replayed = self._replayed(message)
            if replayed is not None:
                self.complaints(replayed)
                return
            events = []
            for event in message["ev"]:
                if event["k"] != "evict":
                    events.append(event)
                elif int(event["id"]) // ID_STRIDE == self.node:
                    self._give_up(int(event["id"]), str(event["name"]))
            self.room.remote(events)
        except (ValueError, KeyError, TypeError) as error:
            self.log(f"cluster: skipped a malformed event: {error!r}")

    # -- the keeper ---------------------------------------------------------------------------

    def _keep_loop(self) -> None:
        while not self._stopping.wait(self.ttl / 3 if self._up else self.retry):
            self.complaints.flush()
            try:
                if self._up:
                    self._beat()
                else:
                    self._rejoin()
            except RedisError as error:
                self._down(error)
            except Exception as error:  # the keeper must outlive any one bug
                self.log(f"cluster: keeper error, carrying on: {error!r}")

    def _beat(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(node_key(self.node), self.token, px=self._ttl_ms)
        pipe.sadd(NODES, self.node)
        _, added = pipe.execute()
        if added:
            # Another node took this one for dead (it stalled past the TTL) and announced its
            # users lost: claim them again and announce them joined.
            self.log(f"cluster: node {self.node} was taken for dead; announcing its users again")
            self._resync(announce=True)
        else:
            self._check_names()
            self._claim_unclaimed(announce=False)
        if time.monotonic() - self._up_since >= self.ttl:
            # Only after a TTL here: nodes rejoining after an outage have had time to beat.
            self._reap()

    def _rejoin(self) -> None:
        """Redis answers again: register the node, claim its members' names, resubscribe."""
        self._redis.connection_pool.disconnect()  # connections to the old Redis are dead
        self._redis.ping()
        self._raise(keys=[NODE_SEQ], args=[self.node])
        self._redis.set(node_key(self.node), self.token, px=self._ttl_ms)
        self._redis.sadd(NODES, self.node)
        reaped = bool(self._redis.delete(reap_key(self.node)))
        self._mark_up()
        self._resync(announce=reaped)
        self.log(f"cluster: Redis at {safe_url(self.url)} is back; rejoined as node {self.node}")

    def _resync(self, announce: bool) -> None:
        """Make Redis hold exactly this node's members, then tell the other nodes who they are."""
        assert self.room is not None
        stored = self._stored()
        # Read after the registry: a member in ``stored`` registered before this snapshot.
        current = {r["id"]: r for r in self.room.cluster_records()}
        pipe = self._redis.pipeline(transaction=False)
        for record in stored:
            if record["node"] != self.node:
                continue
            if current.get(record["id"], {}).get("name") != record["name"]:
                self._release(keys=[NAMES], args=[record["name"].casefold(), record["id"]],
                              client=pipe)
            if record["id"] not in current:
                pipe.hdel(USERS, record["id"])
        pipe.execute()
        with self._state:
            self._claimed.clear()
        self._claim_unclaimed(announce)

    def _claim_unclaimed(self, announce: bool) -> None:
        """Claim the names of members that registered while Redis was away; sync if any."""
        assert self.room is not None
        with self._state:
            claimed = set(self._claimed)
        todo = [r for r in self.room.cluster_records() if r["id"] not in claimed]
        if not todo:
            return
        won = []
        evicts: list[Record] = []
        for record in todo:
            outcome, displaced = self._contest(record)
            if outcome == "lost":
                self._give_up(record["id"], record["name"])
            if outcome != "won":
                continue  # lost, or undecided: the next beat asks again
            won.append(record)
            if displaced is not None:
                # Its node disconnects it on hearing this (or, failing that, at its next beat).
                evicts.append({"k": "evict", "id": displaced, "name": record["name"]})
        with self._state:
            self._claimed.update(r["id"] for r in won)
        still_here = {r["id"] for r in self.room.cluster_records()}
        for record in won:
            if record["id"] not in still_here:  # it left while we claimed: give the name back
                self._release(keys=[NAMES], args=[record["name"].casefold(), record["id"]])
        joined = {r["id"] for r in won} if announce else set()
        self._enqueue(_Op(lazy=lambda: self._sync(joined, evicts)))

    def _contest(self, record: Record) -> tuple[Outcome, int | None]:
        """Claim the name of a member that registered while Redis was away: earlier wins.

        ``lost``: a member of a live node who registered earlier (``_rank``) holds it.
        ``wait``: such a member holds it but its node's heartbeat is missing: that node may be
        rejoining after the same outage (Redis kept its data, the heartbeats expired), or dead
        and soon reaped; the keeper asks again at its next beat. ``won``: the name is this
        member's, with the id of the member it was taken from, if any.
        """
        folded, mine = record["name"].casefold(), str(record["id"])
        sealed = self._seal_record(record)
        for _ in range(8):  # the holder changed between our read and our write: look again
            reply = self._redis.hget(NAMES, folded)
            holder = None if reply is None else _text(reply)
            if holder == mine:
                return "won", None
            if holder is not None:
                theirs = self._open_record(self._redis.hget(USERS, holder), holder, folded)
                # Names of this node are unique here already: its holder is a stale entry.
                if (theirs is not None and int(theirs["node"]) != self.node
                        and _rank(theirs) < _rank(record)):
                    node = int(theirs["node"])
                    if self._redis.exists(node_key(node)):
                        return "lost", None
                    if self._redis.sismember(NODES, str(node)):
                        return "wait", None
                    # Neither alive nor listed: nobody will ever free it, so it is stale.
            if self._take(keys=[NAMES, USERS], args=[folded, holder or "", mine, sealed]):
                return "won", int(holder) if holder is not None and holder.isdigit() else None
        return "wait", None

    def _check_names(self) -> None:
        """Forget the claims of members of this node whose name Redis no longer gives them.

        ``_claim_unclaimed`` then contests those names again: a member that an earlier
        registration took the name from is disconnected (the fallback for an ``evict`` event
        this node missed while resubscribing), and a name lost or overwritten in Redis any other
        way is taken back.
        """
        assert self.room is not None
        with self._state:
            claimed = set(self._claimed)
        records = [r for r in self.room.cluster_records() if r["id"] in claimed]
        if not records:
            return
        holders = self._redis.hmget(NAMES, [r["name"].casefold() for r in records])
        lost = {r["id"] for r, holder in zip(records, holders, strict=True)
                if holder != str(r["id"])}
        if lost:
            with self._state:
                self._claimed -= lost

    def _give_up(self, member_id: int, name: str) -> None:
        """A member of this node lost its name to an earlier registration: disconnect it, once."""
        assert self.room is not None
        record = next((r for r in self.room.cluster_records()
                       if r["id"] == member_id and r["name"].casefold() == name.casefold()), None)
        if record is None:
            return  # gone already, or that id is someone else's now
        with self._state:
            if (member_id, record["at"]) in self._evicting:
                return
            self._evicting.add((member_id, record["at"]))
        self.log(f"cluster: the name {record['name']} was taken on another node while Redis was "
                 f"away, by an earlier registration; disconnecting {record['name']} "
                 f"(id {member_id})")
        self.disconnect(member_id)

    def _sync(self, announce: set[int], evicts: list[Record]) -> tuple[list[Command], list[Record]]:
        """Built when written: this node's claimed members as they are now."""
        assert self.room is not None
        with self._state:
            claimed = set(self._claimed)
        records = [r for r in self.room.cluster_records() if r["id"] in claimed]
        ts = utc_timestamp()
        events: list[Record] = [{"k": "sync", "node": self.node, "users": records}]
        events += [{"k": "join", "u": r, "ts": ts} for r in records if r["id"] in announce]
        return [self._store(r) for r in records], events + evicts

    def _reap(self) -> None:
        """Clean up after nodes whose key expired (one node does it for each)."""
        nodes = [int(n) for n in self._redis.smembers(NODES) if int(n) != self.node]
        if not nodes:
            return
        pipe = self._redis.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(node_key(node))
        for node, alive in zip(nodes, pipe.execute(), strict=True):
            if alive or not self._redis.set(reap_key(node), self.node, nx=True,
                                            px=REAP_CLAIM_MS):
                continue
            count = self._reap_node(node)
            self._redis.srem(NODES, node)
            self.log(f"cluster: node {node} stopped answering; its {count} users are lost")

    def _reap_node(self, node: int) -> int:
        """Free the names of ``node``'s members and announce them lost, as if ``node`` did."""
        theirs = [r for r in self._stored() if r["node"] == node]
        if not theirs:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        ts = utc_timestamp()
        for record in theirs:
            self._release(keys=[NAMES], args=[record["name"].casefold(), record["id"]],
                          client=pipe)
            pipe.hdel(USERS, record["id"])
        # Published in the dead node's name, so that every live node (this one too) takes it.
        events = [{"k": "leave", "u": r, "e": "lost", "ts": ts} for r in theirs]
        stream = f"{self.token}/reap/{uuid.uuid4().hex}"
        pipe.publish(CHANNEL, self._seal_message(node, events, stream))
        pipe.execute()
        return len(theirs)
