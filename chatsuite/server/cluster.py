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

Invariant: no Redis call is made with ``Room.lock`` held, and every Redis call is guarded: a
connection error marks an outage (logged once), the room keeps serving this node's members on
its own, and the keeper brings the node back into the cluster when Redis answers again.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

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
# After Redis lost its data, the counter must not hand out a number a running node holds.
_RAISE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"""

Record = dict[str, Any]
Command = Callable[[Any], object]  # applied to a pipeline


class ClusterError(Exception):
    """Redis cannot be reached (or the URL is wrong) when the server starts."""


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
        disconnect: Callable[[int], None] | None = None,
    ) -> None:
        self.url = url
        self.log = log
        self.ttl = ttl
        self.retry = retry
        self.disconnect = disconnect or (lambda member_id: None)
        self.node = 0
        self.token = uuid.uuid4().hex
        self.timeout = min(1.0, ttl / 2)
        self.room: Room | None = None
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
        self._state = threading.Lock()  # guards the four fields below
        self._up = False
        self._generation = 0  # counts outages: the subscriber resubscribes after each
        self._up_since = 0.0
        self._claimed: set[int] = set()  # members of this node whose name Redis holds
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
            return bool(self._claim(keys=[NAMES, USERS],
                                    args=[name.casefold(), record["id"], _dumps(record)]))
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
        return json.loads(raw) if raw else None

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

    @staticmethod
    def _store(record: Record) -> Command:
        value = _dumps(record)
        return lambda pipe: pipe.hset(USERS, record["id"], value)

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
            except Exception as error:  # noqa: BLE001 - the publisher must outlive any one bug
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
                    pipe.publish(CHANNEL, _dumps({"o": self.node, "ev": batch}))
                    batch = []
                for command in commands:
                    command(pipe)
            batch.extend(events)
        if batch:
            pipe.publish(CHANNEL, _dumps({"o": self.node, "ev": batch}))
        pipe.execute()

    # -- the subscriber -----------------------------------------------------------------------

    def _subscribe_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._up_event.wait(0.2):
                continue
            generation = self._generation
            pubsub = self._redis.pubsub()
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
            except Exception as error:  # noqa: BLE001 - the subscriber must outlive any one bug
                self.log(f"cluster: subscriber error, resubscribing: {error!r}")
            finally:
                try:
                    pubsub.close()
                except (RedisError, OSError):
                    pass

    def _snapshot(self) -> None:
        assert self.room is not None
        records = [json.loads(raw) for raw in self._redis.hgetall(USERS).values()]
        self.room.cluster_reset(r for r in records if r["node"] != self.node)

    def _receive(self, data: str) -> None:
        assert self.room is not None
        try:
            message = json.loads(data)
            if message["o"] == self.node:
                return  # this node delivered its own events already
            self.room.remote(message["ev"])
        except (ValueError, KeyError, TypeError) as error:
            self.log(f"cluster: skipped a malformed event: {error!r}")

    # -- the keeper ---------------------------------------------------------------------------

    def _keep_loop(self) -> None:
        while not self._stopping.wait(self.ttl / 3 if self._up else self.retry):
            try:
                if self._up:
                    self._beat()
                else:
                    self._rejoin()
            except RedisError as error:
                self._down(error)
            except Exception as error:  # noqa: BLE001 - the keeper must outlive any one bug
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
        stored = [json.loads(raw) for raw in self._redis.hgetall(USERS).values()]
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
        for record in todo:
            folded = record["name"].casefold()
            claim = [folded, record["id"], _dumps(record)]
            if (not self._claim(keys=[NAMES, USERS], args=claim)
                    and self._redis.hget(NAMES, folded) != str(record["id"])):
                self.log(f"cluster: the name {record['name']} was taken on another node while "
                         f"Redis was away; disconnecting {record['name']} (id {record['id']})")
                self.disconnect(record["id"])
                continue
            won.append(record)
        with self._state:
            self._claimed.update(r["id"] for r in won)
        still_here = {r["id"] for r in self.room.cluster_records()}
        for record in won:
            if record["id"] not in still_here:  # it left while we claimed: give the name back
                self._release(keys=[NAMES], args=[record["name"].casefold(), record["id"]])
        joined = {r["id"] for r in won} if announce else set()
        self._enqueue(_Op(lazy=lambda: self._sync(joined)))

    def _sync(self, announce: set[int]) -> tuple[list[Command], list[Record]]:
        """Built when written: this node's claimed members as they are now."""
        assert self.room is not None
        with self._state:
            claimed = set(self._claimed)
        records = [r for r in self.room.cluster_records() if r["id"] in claimed]
        ts = utc_timestamp()
        events: list[Record] = [{"k": "sync", "node": self.node, "users": records}]
        events += [{"k": "join", "u": r, "ts": ts} for r in records if r["id"] in announce]
        return [self._store(r) for r in records], events

    def _reap(self) -> None:
        """Clean up after nodes whose key expired (one node does it for each)."""
        nodes = [int(n) for n in self._redis.smembers(NODES) if int(n) != self.node]
        if not nodes:
            return
        pipe = self._redis.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(node_key(node))
        for node, alive in zip(nodes, pipe.execute()):
            if alive or not self._redis.set(reap_key(node), self.node, nx=True,
                                            px=REAP_CLAIM_MS):
                continue
            count = self._reap_node(node)
            self._redis.srem(NODES, node)
            self.log(f"cluster: node {node} stopped answering; its {count} users are lost")

    def _reap_node(self, node: int) -> int:
        """Free the names of ``node``'s members and announce them lost, as if ``node`` did."""
        stored = [json.loads(raw) for raw in self._redis.hgetall(USERS).values()]
        theirs = [r for r in stored if r["node"] == node]
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
        pipe.publish(CHANNEL, _dumps({"o": node, "ev": events}))
        pipe.execute()
        return len(theirs)
