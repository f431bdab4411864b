"""The cluster backplane: several chat servers acting as one room, over Redis (``--redis URL``).

Imported only when ``--redis`` is given (it needs the ``redis`` package: the ``cluster`` extra).

What it owns:

* the node's number ``k`` (``INCR chat:node-seq``); member ids are ``k * 1_000_000 + fd``, so
  they stay integers and unique across the cluster;
* the cluster registry in Redis (its keys: cluster_wire.py), this node's part of it;
* the cluster's accounts (``chat:accounts``): the gate (``accounts``, wired by the server) hands
  each registration and password change to ``account_saved``, which stores it in Redis and
  announces it (an ``account`` event) through the publisher's queue; every other node's gate
  adopts it (``Gate.adopt_account``: the earlier registration, then the later change, holds);
  a node whose own record supersedes one it hears of writes its own back and announces it at
  once, so a conflicting node adopts the earlier registration without waiting; a key of
  ``chat:accounts`` that cannot be opened and that the node has no record of is disputed
  (``Gate.dispute_accounts``: an account no password opens) until a valid record arrives;
* three threads:
  - the publisher (``cluster_wire.Publisher``) takes what the room hands it (``joined``,
    ``left``, ``updated``, ``said``, ``sent``) from one FIFO queue and writes each round as one
    pipeline, so the events of one sender reach every node in the order it sent them;
  - the subscriber: SUBSCRIBE, then a snapshot of ``chat:users`` into the room's mirror of the
    other nodes and of ``chat:accounts`` into the gate (and of the gate's accounts Redis lacks
    or holds an older or invalid copy of into Redis, so that accounts registered during an
    outage spread when it ends), then every other node's events into ``Room.remote`` (its own
    are skipped) and their accounts into the gate;
  - the keeper refreshes ``chat:node:<k>`` three times per TTL, claims the names of members
    that registered while Redis was away, and reaps nodes whose key expired: it takes
    ``chat:reap:<k>`` (SET NX), announces their users ``lost`` and frees their names. While
    Redis is away it retries every ``retry`` seconds, then rejoins.

Trust: Redis is not trusted. Everything a node publishes and every member record it stores
is sealed with an HMAC-SHA256 of the cluster's shared secret (seal.py); a message or record
that is unsigned, forged, replayed, or filed under another id or name is ignored and logged.

Names after an outage: a name given on two nodes while Redis was away goes to the earlier
registration, ranked by ``(joined_at, id)``, whichever node rejoins first; the other member
is disconnected.

Invariant: no Redis call is made with ``Room.lock`` held, and every Redis call is guarded: a
connection error marks an outage (logged once), the room keeps serving this node's members on
its own, and the keeper brings the node back into the cluster when Redis answers again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from chatsuite.server.cluster_wire import (
    ACCOUNTS,
    AUTO_SEQ,
    CHANNEL,
    ID_STRIDE,
    NAMES,
    NODE_SEQ,
    NODES,
    USERS,
    Command,
    Op,
    Publisher,
    PubSub,
    Record,
    Scripts,
    Seals,
    contest,
    new_node,
    node_key,
    reap,
    reap_key,
    reap_node,
    release_stale,
    stored,
    text_of,
)
from chatsuite.server.gate import supersedes
from chatsuite.server.memstore import AccountRecord
from chatsuite.server.room import Room
from chatsuite.server.seal import (
    ClusterConfigError,
    ClusterError,
    Complaints,
    Sealer,
    check_url,
    load_secret,
    safe_url,
)
from protocol import parse_target, utc_timestamp

__all__ = ["Backplane", "ClusterConfigError", "ClusterError"]  # the errors: for chat_server.py



# What a call to Redis from a chat thread raises when its connection fails: redis-py's errors,
# and the socket's own (OSError, or ValueError "I/O operation on closed file") when an outage
# closed the connection under it. Each is an outage for that call: its request gets its reply.
CALL_FAILURES = (RedisError, OSError, ValueError)


def as_outage(error: BaseException) -> RedisError:
    """``error`` as the redis error an outage is handled by."""
    if isinstance(error, RedisError):
        return error
    return redis.ConnectionError(f"the connection failed: {error!r}")

class Accounts(Protocol):
    """What the backplane asks of the gate (gate.py): never with the room lock held."""

    def adopt_account(self, record: AccountRecord, changed: float) -> bool: ...
    def account_versions(self) -> list[tuple[AccountRecord, float]]: ...
    def account_version(self, key: str) -> tuple[AccountRecord, float] | None: ...
    def dispute_accounts(self, keys: Iterable[str]) -> list[str]: ...


def account_record(account: Record) -> AccountRecord:
    return AccountRecord(account["key"], account["name"], account["hash"],
                         float(account["created"]))


def account_of(record: AccountRecord, changed: float) -> Record:
    """An account as Redis and the events carry it: its scrypt hash string, never a password."""
    return {"key": record.key, "name": record.name, "hash": record.password_hash,
            "created": record.created, "changed": changed}


class Backplane:
    """This node's link to the cluster: the registry in Redis and the event channel."""

    def __init__(
        self, url: str, log: Callable[[str], None], ttl: float = 3.0, retry: float = 0.5,
        disconnect: Callable[[int], None] | None = None, *, secret: str | None = None,
        secret_file: str | None = None, insecure: bool = False,
    ) -> None:
        # Both checks before the client exists: a refused URL is never connected to.
        check_url(url, insecure)
        sealer = Sealer(load_secret(secret, secret_file))
        self.url = url
        self.log = log
        self.ttl = ttl
        self.retry = retry
        self.disconnect = disconnect or (lambda member_id: None)
        self.node = 0
        self.token = uuid.uuid4().hex
        self.timeout = min(1.0, ttl / 2)
        self.room: Room | None = None
        self.accounts: Accounts | None = None  # the gate: set by the server before start
        # Applies another node's ``moderate`` event here (set by the server before start).
        self.moderation: Callable[[Record], None] | None = None
        self.complaints = Complaints(log)
        self._seals = Seals(sealer, self.token, self.complaints)
        try:
            # No hidden retries: an error means an outage, which this module handles itself.
            self._redis = redis.Redis.from_url(
                url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0), decode_responses=True,
                # Anyone who can write Redis can write bytes that are no UTF-8: decoded with
                # U+FFFD they fail their seal and are ignored (and counted) like any forgery,
                # where a strict decode raised in the subscriber and cut the node off.
                encoding_errors="replace",
            )
        except ValueError as error:
            raise ClusterError(f"bad Redis URL {url!r}: {error}") from None
        self._lua = Scripts(self._redis)
        self._pubsub: Callable[[], PubSub] = self._redis.pubsub  # typed: redis's is not
        self._state = threading.Lock()  # guards the four fields below
        self._up = False
        self._generation = 0  # counts outages: the subscriber resubscribes after each
        self._up_since = 0.0
        self._claimed: set[int] = set()  # members of this node whose name Redis holds
        self._evicting: set[tuple[int, float]] = set()  # (id, joined_at) being disconnected
        self._up_event = threading.Event()
        self._synced = threading.Event()  # the subscriber has subscribed and taken its snapshot
        self._stopping = threading.Event()
        self._publisher = Publisher(self._redis, self._seals, log, lambda: self._up, self._down,
                                    self._stopping, lambda: self.node)
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
            node = new_node(self._redis, self.token, self._ttl_ms)
        except RedisError as error:
            raise ClusterError(f"cannot reach Redis at {safe_url(self.url)}: {error}") from None
        self.node = node
        self._mark_up()
        for target, name in ((self._publisher.run, "publisher"),
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
        self._publisher.wake()
        self._threads[0].join(0.5)  # the publisher sends what was queued before
        if self._up:
            try:
                reap_node(self._redis, self._seals, self._lua.release, self.node, self.token)
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
            sealed = self._seals.seal_record(record)
            return bool(self._lua.claim(keys=[NAMES, USERS],
                                    args=[name.casefold(), record["id"], sealed]))
        except CALL_FAILURES as error:
            self._down(as_outage(error))
            return None

    def release(self, name: str, member_id: int) -> None:
        """Give back a name claimed for a registration that then failed."""
        if not self._up:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            self._lua.release(keys=[NAMES], args=[name.casefold(), member_id], client=pipe)
            pipe.hdel(USERS, member_id)
            pipe.execute()
        except CALL_FAILURES as error:
            self._down(as_outage(error))

    def auto_number(self) -> int | None:
        """The next number for an automatic name (``user<n>``), shared by all nodes."""
        if not self._up:
            return None
        try:
            return int(self._redis.incr(AUTO_SEQ))
        except CALL_FAILURES as error:
            self._down(as_outage(error))
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
                raw = self._lua.lookup_name(keys=[NAMES, USERS], args=[key.casefold()])
        except CALL_FAILURES as error:
            self._down(as_outage(error))
            return None
        # Filed under the id or name asked for, or it would route the message to someone else.
        if isinstance(key, int):
            return self._seals.open_record(raw, member_id=key)
        return self._seals.open_record(raw, name=key.casefold())

    def joined(self, record: Record, claimed: bool) -> None:
        """A member registered here: store it and announce it (unclaimed: the keeper will)."""
        if not claimed:
            return
        with self._state:
            self._claimed.add(record["id"])
        self._publisher.enqueue(Op([self._store(record)],
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
        self._publisher.enqueue(Op(
            [lambda pipe: self._lua.release(keys=[NAMES], args=[name, member_id], client=pipe),
             lambda pipe: pipe.hdel(USERS, member_id)],
            [{"k": "leave", "u": record, "e": kind, "ts": utc_timestamp()}], done,
        ))
        done.wait(self.timeout)

    def updated(self, record: Record) -> None:
        """A member's status or mode changed."""
        self._publisher.enqueue(Op([self._store(record)], [{"k": "update", "u": record}]))

    def said(self, record: Record, texts: list[str], ts: str) -> None:
        """A broadcast (a run of texts) from a member of this node."""
        self._publisher.enqueue(Op(events=[{"k": "say", "u": record, "t": texts, "ts": ts}]))

    def sent(self, record: Record, to: Record, text: str, ts: str) -> None:
        """A direct message from a member of this node to a member of another."""
        event = {"k": "dm", "u": record, "to": to, "t": text, "ts": ts}
        self._publisher.enqueue(Op(events=[event]))

    def moderated(self, event: Record) -> None:
        """An admin of this node kicked, muted, unmuted or banned someone (a ``moderate``
        event: its action, target, admin, text and time); every other node applies it."""
        self._publisher.enqueue(Op(events=[{"k": "moderate", **event}]))

    def account_saved(self, record: AccountRecord, changed: float) -> None:
        """The gate registered an account or changed its password: store it in Redis and tell
        the other nodes (through the publisher's queue: the caller never waits for Redis).

        Overwritten in Redis (HSET): with Redis up, only the node of the member holding the
        name can register it, and whatever else is there is stale or not a node's. While
        Redis is away this is dropped; the snapshot after the outage spreads it.
        """
        sealed = self._seals.seal_account(account_of(record, changed))
        key = record.key
        self._publisher.enqueue(Op([lambda pipe: pipe.hset(ACCOUNTS, key, sealed)],
                                   [{"k": "account", "a": sealed}]))

    def _store(self, record: Record) -> Command:
        value = self._seals.seal_record(record)
        return lambda pipe: pipe.hset(USERS, record["id"], value)

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
                # Not at once: what failed may fail again (bad data), and a tight loop of
                # resubscribing would burn a core and the log.
                self._stopping.wait(self.retry)
            finally:
                try:
                    pubsub.close()
                except (RedisError, OSError):
                    pass

    def _snapshot(self) -> None:
        assert self.room is not None
        others = [r for r in stored(self._redis, self._seals) if r["node"] != self.node]
        self.room.cluster_reset(others)
        self._sync_accounts()

    def _sync_accounts(self) -> None:
        """Adopt every valid account in Redis; write the gate's that Redis lacks, or holds an
        older or invalid copy of (announced, so that the other nodes adopt them too)."""
        if self.accounts is None:
            return
        held: dict[str, tuple[AccountRecord, float]] = {}
        unreadable: list[str] = []
        present = self._redis.hgetall(ACCOUNTS)
        for key, raw in present.items():
            account = self._seals.open_account(raw, key)
            if account is not None:
                held[account["key"]] = (account_record(account), float(account["changed"]))
            else:
                unreadable.append(text_of(key))
        adopted = sum(self.accounts.adopt_account(*version) for version in held.values())
        if adopted:
            self.log(f"cluster: took {adopted} new or changed accounts from Redis")
        # Damaged is not free: a Redis writer must not make a name an account anyone can claim.
        for key in self.accounts.dispute_accounts(unreadable):
            self.log(f"cluster: the account {key!r} in chat:accounts cannot be opened and this "
                     f"node has no record of it: disputed (no password accepted) until a valid "
                     f"record arrives")
        pipe = self._redis.pipeline(transaction=False)
        events: list[Record] = []
        for record, changed in self.accounts.account_versions():
            theirs = held.get(record.key)
            if theirs is not None and not supersedes(record, changed, *theirs):
                continue
            sealed = self._seals.seal_account(account_of(record, changed))
            # Absent from Redis: HSETNX, a node registering it meanwhile keeps its own; an
            # invalid entry (not a node's) or an older record is overwritten.
            if record.key not in present:
                pipe.hsetnx(ACCOUNTS, record.key, sealed)
            else:
                pipe.hset(ACCOUNTS, record.key, sealed)
            events.append({"k": "account", "a": sealed})
        if events:
            pipe.execute()
            self._publisher.enqueue(Op(events=events))

    def _receive(self, data: str) -> None:
        assert self.room is not None
        try:
            message = self._seals.open_message(data, self.node)
            if message is None:
                return  # ignored (and counted), or this node's own
            events: list[Record] = []
            for event in message["ev"]:
                if event["k"] == "account":
                    self._adopt(event["a"])
                elif event["k"] == "moderate":
                    # In its place among the others: what came before it is delivered first.
                    self.room.remote(events)
                    events = []
                    if self.moderation is not None:
                        self.moderation(event)
                elif event["k"] != "evict":
                    events.append(event)
                elif int(event["id"]) // ID_STRIDE == self.node:
                    self._give_up(int(event["id"]), str(event["name"]))
            self.room.remote(events)
        except (ValueError, KeyError, TypeError) as error:
            self.log(f"cluster: skipped a malformed event: {error!r}")

    def _adopt(self, sealed: str) -> None:
        """An account another node announced (sealed as an account inside its sealed message)."""
        account = self._seals.open_account(sealed, where=CHANNEL)
        if account is None or self.accounts is None:
            return
        record, changed = account_record(account), float(account["changed"])
        if self.accounts.adopt_account(record, changed):
            what = "registered" if account["changed"] == record.created else "changed"
            self.log(f"cluster: account {what} on another node: {record.name}")
            return
        own = self.accounts.account_version(record.key)
        if own is not None and supersedes(*own, record, changed):
            # Ours is the earlier registration (or the later change): correct Redis and the
            # announcing node now rather than at the next resubscribe.
            self.log(f"cluster: another node announced a superseded record of the account "
                     f"{record.name}; announcing this node's")
            self.account_saved(*own)

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
        self._lua.raise_(keys=[NODE_SEQ], args=[self.node])
        self._redis.set(node_key(self.node), self.token, px=self._ttl_ms)
        self._redis.sadd(NODES, self.node)
        reaped = bool(self._redis.delete(reap_key(self.node)))
        self._mark_up()
        self._resync(announce=reaped)
        self.log(f"cluster: Redis at {safe_url(self.url)} is back; rejoined as node {self.node}")

    def _resync(self, announce: bool) -> None:
        """Make Redis hold exactly this node's members, then tell the other nodes who they are."""
        assert self.room is not None
        held = stored(self._redis, self._seals)
        # Read after the registry: a member in ``stored`` registered before this snapshot.
        current = {r["id"]: r for r in self.room.cluster_records()}
        release_stale(self._redis, self._lua.release, self.node, held, current)
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
            outcome, displaced = contest(self._redis, self._seals, self._lua.take, record,
                                         self.node)
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
                self._lua.release(keys=[NAMES], args=[record["name"].casefold(), record["id"]])
        joined = {r["id"] for r in won} if announce else set()
        self._publisher.enqueue(Op(lazy=lambda: self._sync(joined, evicts)))

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
        def reaped(node: int, count: int) -> None:
            self.log(f"cluster: node {node} stopped answering; its {count} users are lost")

        reap(self._redis, self._seals, self._lua.release, self.node, self.token, reaped)
