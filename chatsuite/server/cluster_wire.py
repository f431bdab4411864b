"""The cluster's wire (cluster.py): Redis key names and scripts, and what travels through them.

What it owns:

* the registry's keys and its Lua scripts: ``chat:names`` (hash: casefolded name -> id,
  claimed with HSETNX, so exactly one node wins a name), ``chat:users`` (hash: id -> the
  member's record, JSON: its ``user`` object, node, dialect and registration time),
  ``chat:nodes`` (set of node numbers), ``chat:node:<k>`` (node ``k`` is alive: a key with a
  TTL), ``chat:reap:<k>`` (who cleans up after a dead node), ``chat:auto`` (automatic names),
  ``chat:node-seq`` (node numbers), ``chat:accounts`` (hash: account key -> the account,
  JSON: its name, scrypt hash string, ``created`` and ``changed`` times; never a password);
* the encoding of member records (stored in ``chat:users``) and of messages (published on
  ``chat:room``: the events of a round, with their origin node and what makes a replay
  detectable), sealed and opened by ``Seals``;
* the ``Publisher``, which takes what the room hands the backplane from one FIFO queue and
  writes each round as one pipeline: registry changes, then the events of the round as few
  PUBLISHes as their order allows. One queue, filled by each sender's own thread, so the events
  of one sender reach every node in the order it sent them;
* the registry operations that keep no state of the node (``stored``, ``contest``,
  ``new_node``, ``release_stale``, ``reap``): the backplane calls them, and handles their
  ``RedisError``.

Invariant: nothing read from Redis is used unless its seal is valid and it is filed under its
own id or name; what is not is ignored and counted in ``Complaints`` (seal.py).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis
from redis.commands.core import Script
from redis.exceptions import RedisError

from chatsuite.server.seal import (
    ACCOUNT_SEAL,
    ROOM_SEAL,
    USER_SEAL,
    Complaints,
    Forged,
    ReplayGuard,
    Sealer,
    Unsigned,
)
from protocol import utc_timestamp

CHANNEL = "chat:room"
NODE_SEQ = "chat:node-seq"
AUTO_SEQ = "chat:auto"
NAMES = "chat:names"
USERS = "chat:users"
ACCOUNTS = "chat:accounts"
NODES = "chat:nodes"
ID_STRIDE = 1_000_000  # member id = node * ID_STRIDE + file descriptor
REAP_CLAIM_MS = 30_000

# Claims a name and stores its member's record, at once: whoever finds the name finds the record.
CLAIM_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
# Frees a name only if it still belongs to this id (the id may have claimed it long ago).
RELEASE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
# The record of the member holding a name, in one round trip.
LOOKUP_NAME_LUA = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
return redis.call('HGET', KEYS[2], id)
"""
# Hands a name to a member if it is still held by whom the caller saw ('' for nobody); the
# record of the member it is taken from goes with it (that member is being disconnected).
TAKE_LUA = """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if (holder or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
if holder and holder ~= ARGV[3] then redis.call('HDEL', KEYS[2], holder) end
return 1
"""
# After Redis lost its data, the counter must not hand out a number a running node holds.
RAISE_LUA = """
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


def node_key(node: int) -> str:
    return f"chat:node:{node}"


def reap_key(node: int) -> str:
    return f"chat:reap:{node}"


def dumps(value: Any) -> str:
    # ASCII escapes: a text never makes Redis's UTF-8 encoding fail.
    return json.dumps(value, separators=(",", ":"))


def text_of(value: str | bytes) -> str:
    """A reply as text (the client decodes replies already; its type hints cannot know that)."""
    return value.decode() if isinstance(value, bytes) else value


def rank(record: Record) -> tuple[float, int]:
    """Registration order across the cluster: time on the node's clock, then id (unique)."""
    return float(record["at"]), int(record["id"])


@dataclass
class Op:
    """One thing for the publisher: registry commands, then events (or ``lazy`` makes both)."""

    commands: list[Command] = field(default_factory=list)
    events: list[Record] = field(default_factory=list)
    done: threading.Event | None = None
    lazy: Callable[[], tuple[list[Command], list[Record]]] | None = None


class Seals:
    """Member records and messages as sealed text, and back (what is not valid is ignored)."""

    def __init__(self, sealer: Sealer, token: str, complaints: Complaints) -> None:
        self._sealer = sealer
        self.token = token  # names this node's publisher stream
        self.complaints = complaints
        self._sequence = 0  # of the messages of this node's publisher (its thread only)
        self._guard = ReplayGuard(CHANNEL)  # the subscriber's thread only

    def seal_record(self, record: Record) -> str:
        return self._sealer.seal(USER_SEAL, dumps(record))

    def seal_message(self, origin: int, events: list[Record], stream: str | None = None) -> str:
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
        return self._sealer.seal(ROOM_SEAL, dumps(message))

    def open_message(self, data: str, node: int) -> Record | None:
        """The message published as ``data``, unless it is unsigned, forged, replayed (ignored
        and counted) or ``node``'s own (delivered already); raises ``ValueError``,
        ``KeyError`` or ``TypeError`` when it is malformed."""
        try:
            text = self._sealer.open(ROOM_SEAL, data)
        except Unsigned:
            self.complaints(f"an unsigned message on {CHANNEL}")
            return None
        except Forged:
            self.complaints(f"a forged message on {CHANNEL} (its seal does not match)")
            return None
        message: Record = json.loads(text)
        if message["o"] == node:
            return None  # this node delivered its own events already
        replayed = self._guard.replayed(message)
        if replayed is not None:
            self.complaints(replayed)
            return None
        return message


    def open_record(self, raw: str | bytes | None, member_id: int | str | bytes | None = None,
                     name: str | None = None) -> Record | None:
        """A stored record if its seal is valid and it is filed under its own id or name.

        A valid record copied under another id or name would misroute: it is refused too.
        """
        if raw is None:
            return None
        if isinstance(member_id, bytes):
            member_id = text_of(member_id)
        try:
            record = json.loads(self._sealer.open(USER_SEAL, text_of(raw)))
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


    def seal_account(self, account: Record) -> str:
        return self._sealer.seal(ACCOUNT_SEAL, dumps(account))

    def open_account(self, raw: str | bytes | None, key: str | bytes | None = None,
                     where: str = ACCOUNTS) -> Record | None:
        """An account (``key``, ``name``, ``hash``, ``created``, ``changed``) if its seal is
        valid, its fields well typed and (``key`` given) it is filed under its own key."""
        if raw is None:
            return None
        try:
            account = json.loads(self._sealer.open(ACCOUNT_SEAL, text_of(raw)))
            if not isinstance(account, dict):
                raise TypeError("not an object")
            for field_name, kind in (("key", str), ("name", str), ("hash", str),
                                     ("created", (int, float)), ("changed", (int, float))):
                if not isinstance(account[field_name], kind):
                    raise TypeError(f"{field_name}: {account[field_name]!r}")
            if key is not None and account["key"] != text_of(key):
                raise Forged(f"the account {account['key']!r} filed under {text_of(key)!r}")
        except (Unsigned, Forged) as error:
            kind_text = "an unsigned" if isinstance(error, Unsigned) else "a forged"
            self.complaints(f"{kind_text} account in {where} ({error})")
            return None
        except (ValueError, KeyError, TypeError) as error:
            self.complaints(f"a malformed account in {where} ({error!r})")
            return None
        return account


class Scripts:
    """The registry's Lua scripts, registered on one client (each call may raise RedisError)."""

    def __init__(self, client: redis.Redis) -> None:
        self.claim = client.register_script(CLAIM_LUA)
        self.release = client.register_script(RELEASE_LUA)
        self.lookup_name = client.register_script(LOOKUP_NAME_LUA)
        self.raise_ = client.register_script(RAISE_LUA)
        self.take = client.register_script(TAKE_LUA)


class Publisher:
    """The publisher thread's queue and loop (see the module docstring)."""

    def __init__(self, client: redis.Redis, seals: Seals, log: Callable[[str], None],
                 up: Callable[[], bool], down: Callable[[BaseException], None],
                 stopping: threading.Event, origin: Callable[[], int]) -> None:
        self._redis = client
        self._seals = seals
        self.log = log
        self._up = up  # Redis is there
        self._down = down  # Redis failed
        self._stopping = stopping
        self._origin = origin  # this node's number, once it has one
        self._ops: list[Op] = []
        self._ops_ready = threading.Condition()

    def wake(self) -> None:
        """Have the loop look again (it ends once stopping and empty)."""
        with self._ops_ready:
            self._ops_ready.notify()

    def enqueue(self, op: Op) -> None:
        if not self._up() or self._stopping.is_set():
            if op.done is not None:
                op.done.set()  # Redis is away: remote nodes miss it (see docs/cluster.md)
            return
        with self._ops_ready:
            self._ops.append(op)
            if len(self._ops) == 1:
                self._ops_ready.notify()

    def run(self) -> None:
        while True:
            with self._ops_ready:
                while not self._ops and not self._stopping.is_set():
                    self._ops_ready.wait()
                ops, self._ops = self._ops, []
            if not ops:
                return
            try:
                if self._up():
                    self._write(ops)
            except RedisError as error:
                self._down(error)
            except Exception as error:  # the publisher must outlive any one bug
                self.log(f"cluster: publisher error, carrying on: {error!r}")
            finally:
                for op in ops:
                    if op.done is not None:
                        op.done.set()

    def _write(self, ops: list[Op]) -> None:
        """One pipeline: each op's commands, and its events as few PUBLISHes as order allows."""
        pipe = self._redis.pipeline(transaction=False)
        batch: list[Record] = []
        for op in ops:
            commands, events = op.lazy() if op.lazy is not None else (op.commands, op.events)
            if commands:
                # The registry changes before the events after it: a snapshot taken after
                # subscribing then never misses what an event already announced.
                if batch:
                    pipe.publish(CHANNEL, self._seals.seal_message(self._origin(), batch))
                    batch = []
                for command in commands:
                    command(pipe)
            batch.extend(events)
        if batch:
            pipe.publish(CHANNEL, self._seals.seal_message(self._origin(), batch))
        pipe.execute()


# -- registry operations that hold no state of the node (each may raise ``RedisError``) -------


def stored(client: redis.Redis, seals: Seals) -> list[Record]:
    """Every valid member record in Redis."""
    found = (seals.open_record(raw, key) for key, raw in client.hgetall(USERS).items())
    return [record for record in found if record is not None]


def contest(client: redis.Redis, seals: Seals, take: Script, record: Record,
            node: int) -> tuple[Outcome, int | None]:
    """Claim the name of a member of ``node`` that registered while Redis was away: earlier wins.

    ``lost``: a member of a live node who registered earlier (``rank``) holds it.
    ``wait``: such a member holds it but its node's heartbeat is missing: that node may be
    rejoining after the same outage (Redis kept its data, the heartbeats expired), or dead
    and soon reaped; the keeper asks again at its next beat. ``won``: the name is this
    member's, with the id of the member it was taken from, if any.
    """
    folded, mine = record["name"].casefold(), str(record["id"])
    sealed = seals.seal_record(record)
    for _ in range(8):  # the holder changed between our read and our write: look again
        reply = client.hget(NAMES, folded)
        holder = None if reply is None else text_of(reply)
        if holder == mine:
            return "won", None
        if holder is not None:
            theirs = seals.open_record(client.hget(USERS, holder), holder, folded)
            # Names of this node are unique here already: its holder is a stale entry.
            if (theirs is not None and int(theirs["node"]) != node
                    and rank(theirs) < rank(record)):
                their_node = int(theirs["node"])
                if client.exists(node_key(their_node)):
                    return "lost", None
                if client.sismember(NODES, str(their_node)):
                    return "wait", None
                # Neither alive nor listed: nobody will ever free it, so it is stale.
        if take(keys=[NAMES, USERS], args=[folded, holder or "", mine, sealed]):
            return "won", int(holder) if holder is not None and holder.isdigit() else None
    return "wait", None


def reap_node(client: redis.Redis, seals: Seals, release: Script, node: int, token: str) -> int:
    """Free the names of ``node``'s members and announce them lost, as if ``node`` did."""
    theirs = [r for r in stored(client, seals) if r["node"] == node]
    if not theirs:
        return 0
    pipe = client.pipeline(transaction=False)
    ts = utc_timestamp()
    for record in theirs:
        release(keys=[NAMES], args=[record["name"].casefold(), record["id"]], client=pipe)
        pipe.hdel(USERS, record["id"])
    # Published in the dead node's name, so that every live node (this one too) takes it.
    events = [{"k": "leave", "u": r, "e": "lost", "ts": ts} for r in theirs]
    stream = f"{token}/reap/{uuid.uuid4().hex}"
    pipe.publish(CHANNEL, seals.seal_message(node, events, stream))
    pipe.execute()
    return len(theirs)


def new_node(client: redis.Redis, token: str, ttl_ms: int) -> int:
    """A new node number, marked alive (``chat:node:<k>``, ``token``) and listed."""
    while True:
        node = int(client.incr(NODE_SEQ))
        # After Redis lost its data a running node may hold this number: skip it.
        if client.set(node_key(node), token, nx=True, px=ttl_ms):
            client.sadd(NODES, node)
            return node


def release_stale(client: redis.Redis, release: Script, node: int, held: list[Record],
                  current: dict[int, Record]) -> None:
    """Of the records ``held`` in Redis, free what ``node`` no longer has (``current``: its
    members now): the names it no longer gives, the records of members that left."""
    pipe = client.pipeline(transaction=False)
    for record in held:
        if record["node"] != node:
            continue
        if current.get(record["id"], {}).get("name") != record["name"]:
            release(keys=[NAMES], args=[record["name"].casefold(), record["id"]], client=pipe)
        if record["id"] not in current:
            pipe.hdel(USERS, record["id"])
    pipe.execute()


def reap(client: redis.Redis, seals: Seals, release: Script, node: int, token: str,
         reaped: Callable[[int, int], None]) -> None:
    """Clean up after the nodes whose key expired, one node (SET NX ``chat:reap:<k>``) for each;
    ``reaped(dead node, its users announced lost)`` for each that ``node`` reaped."""
    nodes = [int(n) for n in client.smembers(NODES) if int(n) != node]
    if not nodes:
        return
    pipe = client.pipeline(transaction=False)
    for other in nodes:
        pipe.exists(node_key(other))
    for other, alive in zip(nodes, pipe.execute(), strict=True):
        if alive or not client.set(reap_key(other), node, nx=True, px=REAP_CLAIM_MS):
            continue
        count = reap_node(client, seals, release, other, token)
        client.srem(NODES, other)
        reaped(other, count)
