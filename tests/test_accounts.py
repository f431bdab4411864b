"""Who may enter (SPEC 7) over real loopback sockets: the server password, accounts, the throttle,
the plaintext rule, the store and admins' moderation, in every dialect."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Peer, RawConnection, notice_of, reply, wait_until

from chat_server import ChatServer
from chatsuite.server.access import Code, Throttle
from chatsuite.server.access import Refusal as AccessRefusal
from chatsuite.server.gate import Entry, Gate
from chatsuite.server.memstore import AccountRecord, MemoryStore
from chatsuite.server.passwords import hash_password
from protocol import ErrorCode, Refusal, User

Start = Callable[..., ChatServer]
STUDENT_HOST = "127.0.0.2"  # still loopback; lets a ban by address spare the teacher's 127.0.0.1
GOOD = "correct horse"
OTHER = "battery staple"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Text(RawConnection):
    """A line (``\\n``) or plain (NUL) client: text units both ways."""

    def __init__(self, server: ChatServer, terminator: bytes, host: str = "127.0.0.1") -> None:
        sock = socket.create_connection(server.address, timeout=5, source_address=(host, 0))
        super().__init__(sock)
        self.terminator = terminator

    def send_text(self, text: str) -> None:
        self.send_raw(text.encode() + self.terminator)

    def read(self) -> str:
        return self.read_unit().decode()


@pytest.fixture
def peers() -> Iterator[Callable[..., Any]]:
    """A factory of native ``Peer``s and line/plain ``Text`` clients (from ``host``)."""
    made: list[RawConnection] = []

    def make(server: ChatServer, dialect: str = "native", host: str = "127.0.0.1") -> Any:
        conn: RawConnection
        if dialect == "native":
            sock = socket.create_connection(server.address, timeout=5, source_address=(host, 0))
            conn = Peer(server.address, sock=sock)
        else:
            conn = Text(server, b"\n" if dialect == "line" else b"\0", host)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()


def error_of(peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
    """Send ``request`` and return the error answering it, without type, ref and message."""
    event = reply(peer, request, "r")
    assert event["type"] == "error", event
    return {k: v for k, v in event.items() if k not in ("type", "ref", "message")}


def ok(peer: Peer, request: dict[str, Any]) -> None:
    """Send ``request``; its answer must be ``ok``."""
    event = reply(peer, request, "ok")
    assert event["type"] == "ok", event


def account(server: ChatServer, connect: Callable[..., Any], name: str,
            password: str = GOOD, **hello: Any) -> Peer:
    """A peer registered as ``name`` that made it an account."""
    peer: Peer = connect(server)
    peer.register(name, **hello)
    ok(peer, {"type": "register", "password": password})
    return peer


def users(peer: Peer) -> dict[str, dict[str, Any]]:
    return {u["name"]: u for u in reply(peer, {"type": "users"}, "u")["users"]}


# -- 7.1 the server password --------------------------------------------------------------------


def test_server_password_required_then_wrong_then_right_on_one_connection(
        start_server: Start, peers: Callable[..., Any]) -> None:
    """hello without server_password is password-required (server), a wrong one bad-password
    (server), and the connection stays open until the right one is welcomed."""
    server = start_server(rate=0, server_password="class key")
    peer = peers(server)
    assert error_of(peer, {"type": "hello", "name": "ann"}) == {
        "code": "password-required", "for": "server"}
    assert error_of(peer, {"type": "hello", "name": "ann", "server_password": "nope"}) == {
        "code": "bad-password", "for": "server"}
    welcome = peer.register("ann", server_password="class key")
    assert welcome["name"] == "ann" and welcome["admin"] is False


def test_server_password_failures_count_towards_the_throttle(
        start_server: Start, peers: Callable[..., Any]) -> None:
    """Five wrong server passwords from one address within a minute, then too-many-attempts with
    retry_after, even for the right one; a minute later it is let in."""
    server = start_server(rate=0, server_password="class key")
    clock = FakeClock()
    server.gate.use_clock(clock)
    peer = peers(server)
    for _ in range(5):
        assert error_of(peer, {"type": "hello", "server_password": "guess"})["code"] == (
            "bad-password")
    clock.now += 10
    assert error_of(peer, {"type": "hello", "server_password": "class key"}) == {
        "code": "too-many-attempts", "retry_after": 50}
    clock.now += 50
    assert peer.register(None, server_password="class key")["name"] == "user1"


def test_line_and_plain_clients_are_refused_when_the_server_has_a_password(
        start_server: Start, peers: Callable[..., Any]) -> None:
    """With a server password a line client gets BUSY then the close, a plain client is closed
    and its text reaches nobody."""
    server = start_server(rate=0, server_password="class key")
    watcher = peers(server)
    watcher.register("watcher", server_password="class key")
    watcher.view()
    line = peers(server, "line")
    line.send_text("HELLO-FROM bob")
    assert line.read() == "BUSY"
    assert line.closed()
    plain = peers(server, "plain")
    plain.send_text("hello all")
    assert plain.closed()
    assert watcher.sync() == []


def test_open_dialects_lets_line_and_plain_clients_in_despite_the_password(
        start_server: Start, peers: Callable[..., Any]) -> None:
    """``--open-dialects``: line and plain clients join a room that has a server password."""
    server = start_server(rate=0, server_password="class key", open_dialects=True)
    line = peers(server, "line")
    line.send_text("HELLO-FROM bob")
    assert line.read() == "HELLO bob"
    plain = peers(server, "plain")
    plain.send_text("hi")
    wait_until(lambda: server.room.online == 2, what="the plain client to join")


# -- 7.2 accounts -----------------------------------------------------------------------------


def test_register_makes_the_name_an_account_nobody_takes_without_its_password(
        server: ChatServer, peers: Callable[..., Any]) -> None:
    """After register, the name in any case needs its password: none is password-required
    (account), a wrong one bad-password (account), the right one is name-taken while the owner
    is online and welcomed once it left."""
    owner = account(server, peers, "Alice")
    assert users(owner)["Alice"].get("account") is True
    thief = peers(server)
    assert error_of(thief, {"type": "hello", "name": "alice"}) == {
        "code": "password-required", "for": "account"}
    assert error_of(thief, {"type": "hello", "name": "ALICE", "password": OTHER}) == {
        "code": "bad-password", "for": "account"}
    assert error_of(thief, {"type": "hello", "name": "alice", "password": GOOD}) == {
        "code": "name-taken"}
    owner.send({"type": "quit"})
    owner.wait_for("bye")
    wait_until(lambda: server.room.online == 0, what="the owner to leave")
    assert error_of(thief, {"type": "hello", "name": "alice"})["code"] == "password-required"
    welcome = thief.register("alice", password=GOOD)
    assert welcome["name"] == "alice" and welcome["account"] is True


def test_register_refuses_a_short_password_and_a_second_registration(
        server: ChatServer, peers: Callable[..., Any]) -> None:
    """register: under 8 characters is bad-password (account); an account already is name-taken."""
    peer = peers(server)
    peer.register("bob")
    assert error_of(peer, {"type": "register", "password": "short"}) == {
        "code": "bad-password", "for": "account"}
    assert "account" not in users(peer)["bob"]
    ok(peer, {"type": "register", "password": GOOD})
    assert error_of(peer, {"type": "register", "password": OTHER}) == {"code": "name-taken"}


def test_a_line_client_cannot_take_an_account_online_or_offline(
        server: ChatServer, peers: Callable[..., Any]) -> None:
    """HELLO-FROM an account's name, in any case, is IN-USE whether its owner is online or not."""
    owner = account(server, peers, "carol")
    line = peers(server, "line")
    line.send_text("HELLO-FROM CAROL")
    assert line.read() == "IN-USE"
    owner.close()
    wait_until(lambda: server.room.online == 0, what="the owner to leave")
    line.send_text("HELLO-FROM carol")
    assert line.read() == "IN-USE"
    line.send_text("HELLO-FROM dave")
    assert line.read() == "HELLO dave"


def test_automatic_names_skip_accounts(server: ChatServer, peers: Callable[..., Any]) -> None:
    """A name given automatically (native without a name, plain clients) is never an account's."""
    owner = account(server, peers, "user1")
    owner.close()
    wait_until(lambda: server.room.online == 0, what="the owner to leave")
    assert peers(server).register()["name"] == "user2"


def test_password_changes_the_account_password(server: ChatServer,
                                               peers: Callable[..., Any]) -> None:
    """password: a wrong old is bad-password (account); after a change only the new one works;
    without an account it is not-allowed."""
    stranger = peers(server)
    stranger.register("erin")
    assert error_of(stranger, {"type": "password", "old": GOOD, "new": OTHER})["code"] == (
        "not-allowed")
    owner = account(server, peers, "frank")
    assert error_of(owner, {"type": "password", "old": OTHER, "new": OTHER}) == {
        "code": "bad-password", "for": "account"}
    ok(owner, {"type": "password", "old": GOOD, "new": OTHER})
    owner.close()
    wait_until(lambda: server.room.online == 1, what="the owner to leave")
    again = peers(server)
    assert error_of(again, {"type": "hello", "name": "frank", "password": GOOD})["code"] == (
        "bad-password")
    assert again.register("frank", password=OTHER)["account"] is True


def test_the_throttle_stops_guessing_one_name_from_any_address(
        server: ChatServer, peers: Callable[..., Any]) -> None:
    """Five wrong passwords for a name within a minute, then too-many-attempts with retry_after,
    from another address too; once the minute has passed the right password works."""
    clock = FakeClock()
    server.gate.use_clock(clock)
    account(server, peers, "gina").close()
    wait_until(lambda: server.room.online == 0, what="the owner to leave")
    guesser = peers(server)
    for _ in range(5):
        assert error_of(guesser, {"type": "hello", "name": "gina", "password": OTHER})[
            "code"] == "bad-password"
        clock.now += 1
    elsewhere = peers(server, host=STUDENT_HOST)
    assert error_of(elsewhere, {"type": "hello", "name": "gina", "password": GOOD}) == {
        "code": "too-many-attempts", "retry_after": 55}
    clock.now += 55
    assert elsewhere.register("gina", password=GOOD)["account"] is True


def test_account_passwords_need_tls_or_loopback_unless_allowed(
        start_server: Start, peers: Callable[..., Any]) -> None:
    """From a host that is not loopback, over plain TCP: register, password and a hello carrying
    password are not-allowed; --allow-plaintext-passwords lets them through."""
    server = start_server(rate=0, is_local=lambda host: False)
    peer = peers(server)
    assert error_of(peer, {"type": "hello", "name": "hank", "password": GOOD})["code"] == (
        "not-allowed")
    peer.register("hank")
    assert error_of(peer, {"type": "register", "password": GOOD})["code"] == "not-allowed"
    assert error_of(peer, {"type": "password", "old": GOOD, "new": OTHER})["code"] == (
        "not-allowed")
    assert "account" not in users(peer)["hank"]
    allowed = start_server(rate=0, is_local=lambda host: False, allow_plaintext_passwords=True)
    account(allowed, peers, "hank")


def test_the_store_keeps_accounts_as_scrypt_hashes_only(
        start_server: Start, peers: Callable[..., Any], tmp_path: Path) -> None:
    """Accounts survive a restart in the SQLite store, which holds no password in any form but
    a salted scrypt string (the plaintext is in none of its files)."""
    path = tmp_path / "class.db"
    server = start_server(rate=0, store=str(path))
    for name, password in (("ivy", "ivy's secret pw"), ("jack", "jack-password-42")):
        account(server, peers, name, password)
    assert server.store.flush()
    server.stop()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for secret in ("ivy's secret pw", "jack-password-42"):
        assert secret.encode() not in raw
        assert secret.encode("utf-16-le") not in raw
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT key, password_hash FROM accounts ORDER BY key").fetchall()
    assert [key for key, _ in rows] == ["ivy", "jack"]
    assert all(h.startswith("scrypt$n=16384,r=8,p=1$") and len(h.split("$")) == 4
               for _, h in rows)
    again = start_server(rate=0, store=str(path))
    assert error_of(peers(again), {"type": "hello", "name": "ivy"})["code"] == (
        "password-required")
    assert peers(again).register("ivy", password="ivy's secret pw")["account"] is True


# -- 7.3 admins -----------------------------------------------------------------------------


@pytest.fixture
def classroom(start_server: Start, peers: Callable[..., Any]) -> Callable[[], Any]:
    """A server with --admin teacher, the teacher logged in with its account and viewing."""

    def make(**options: Any) -> tuple[ChatServer, Peer]:
        server = start_server(rate=0, admins=("teacher",), **options)
        account(server, peers, "teacher").close()
        wait_until(lambda: server.room.online == 0, what="the registration to end")
        teacher: Peer = peers(server)
        welcome = teacher.register("teacher", password=GOOD)
        assert welcome["admin"] is True
        teacher.view()
        return server, teacher

    return make


def test_an_admin_without_an_account_is_named_in_the_log_at_start(
        start_server: Start, peers: Callable[..., Any], tmp_path: Path) -> None:
    """--admin names an account; one not registered yet is said at start (whoever registers it
    first moderates), and an admin that has its account is not."""
    lines: list[str] = []
    store = str(tmp_path / "room.db")
    server = start_server(rate=0, admins=("teacher", "Helper"), log=lines.append, store=store)
    wait_until(lambda: any(x.startswith("store: ") for x in lines), what="the start's lines")
    assert [x for x in lines if x.startswith("admin ")] == [
        "admin teacher has no account yet: connect as teacher and /register it before anyone "
        "else does",
        "admin Helper has no account yet: connect as Helper and /register it before anyone "
        "else does",
    ]
    account(server, peers, "teacher").close()
    server.stop()
    lines.clear()
    start_server(rate=0, admins=("teacher", "Helper"), log=lines.append, store=store)
    wait_until(lambda: any(x.startswith("store: ") for x in lines), what="the start's lines")
    assert [x for x in lines if x.startswith("admin ")] == [
        "admin Helper has no account yet: connect as Helper and /register it before anyone "
        "else does",
    ]


def test_an_admin_is_marked_and_only_it_may_moderate(
        classroom: Callable[[], Any], peers: Callable[..., Any]) -> None:
    """The admin's welcome says admin and users marks it; a non-admin's kick, mute, unmute
    and ban are not-allowed, as is the admin acting on itself."""
    server, teacher = classroom()
    student = peers(server)
    assert student.register("sam")["admin"] is False
    assert users(student)["teacher"] | {"id": 0} == {
        "id": 0, "name": "teacher", "title": None, "company": None, "status": "available",
        "mode": 2, "account": True, "admin": True}
    for kind in ("kick", "mute", "unmute", "ban"):
        assert error_of(student, {"type": kind, "to": "teacher"}) == {"code": "not-allowed"}
    assert error_of(teacher, {"type": "kick", "to": "TEACHER"}) == {"code": "not-allowed"}
    assert error_of(teacher, {"type": "kick", "to": "nobody"}) == {"code": "no-such-user"}


def test_an_admin_name_without_its_password_is_no_admin(
        start_server: Start, peers: Callable[..., Any]) -> None:
    """--admin names an account: the name taken before it is registered moderates nothing."""
    server = start_server(rate=0, admins=("teacher",))
    impostor = peers(server)
    assert impostor.register("teacher")["admin"] is False
    peers(server).register("sam")
    assert error_of(impostor, {"type": "kick", "to": "sam"}) == {"code": "not-allowed"}


def join_as_sam(student: Any, dialect: str, teacher: Peer) -> str:
    """Register ``student`` in its dialect (sam; a plain client's automatic name) and return
    the name the room gave it, as the teacher heard it joining."""
    if dialect == "native":
        student.register("sam")
    elif dialect == "line":
        student.send_text("HELLO-FROM sam")
        assert student.read() == "HELLO sam"
    else:
        student.send_text("hi")
    name: str = teacher.wait_for("notice", event="joined")["user"]["name"]
    return name


@pytest.mark.parametrize("dialect", ["native", "line", "plain"])
def test_kick_disconnects_a_client_of_each_dialect_and_tells_the_room(
        classroom: Callable[[], Any], peers: Callable[..., Any], dialect: str) -> None:
    """kick: the room gets a kicked notice naming the admin and the reason, the target (native
    or plain) hears it too, and its connection is closed."""
    server, teacher = classroom()
    student = peers(server, dialect)
    name = join_as_sam(student, dialect, teacher)
    ok(teacher, {"type": "kick", "to": name, "reason": "spam"})
    notice = notice_of(teacher, "kicked")
    assert (notice["user"]["name"], notice["by"], notice["reason"], notice["text"]) == (
        name, "teacher", "spam", f"{name} was kicked by teacher: spam")
    if dialect == "native":
        assert student.wait_for("notice", event="kicked")["by"] == "teacher"
    elif dialect == "plain":
        assert student.read() == f"{name} was kicked by teacher: spam"
    assert student.closed()
    assert name not in users(teacher)
    assert [e for e in teacher.sync() if e.get("event") == "lost"] == []


def test_mute_refuses_say_dm_and_line_send_until_unmute(
        classroom: Callable[[], Any], peers: Callable[..., Any]) -> None:
    """mute: the muted member's say and dm get muted (with their refs), its line SEND gets
    BAD-RQST-BODY, nothing is delivered; unmute lifts it; each is told to the room."""
    server, teacher = classroom()
    student = peers(server)
    student.register("sam")
    line = peers(server, "line")
    line.send_text("HELLO-FROM lee")
    assert line.read() == "HELLO lee"
    ok(teacher, {"type": "mute", "to": "sam", "minutes": 5})
    assert notice_of(teacher, "muted")["text"] == (
        "sam was muted by teacher for 5 minutes.")
    teacher.events.clear()
    ok(teacher, {"type": "mute", "to": "lee"})
    assert notice_of(teacher, "muted")["text"] == (
        "lee was muted by teacher for 10 minutes.")
    student.send({"type": "say", "text": "noise", "ref": 1})
    student.send({"type": "say", "text": "more", "ref": 2})
    student.send({"type": "dm", "to": "teacher", "text": "psst", "ref": 3})
    for ref in (1, 2, 3):
        event = student.wait_for("error", ref=ref)
        assert (event["code"], event["message"]) == (
            "muted", "You are muted by teacher for 5 more minutes.")
    line.send_text("SEND teacher hello")
    assert line.read() == "BAD-RQST-BODY"
    assert [e for e in teacher.sync() if e["type"] == "message"] == []
    ok(teacher, {"type": "unmute", "to": "sam"})
    assert notice_of(teacher, "unmuted")["by"] == "teacher"
    student.send({"type": "say", "text": "sorry", "ref": 4})
    student.wait_for("ok", ref=4)
    assert teacher.wait_for("message")["text"] == "sorry"
    refused = reply(teacher, {"type": "unmute", "to": "sam"}, "u1")  # here, and not muted
    assert (refused["code"], refused["message"]) == ("bad-request", "sam is not muted.")
    refused = reply(teacher, {"type": "unmute", "to": "nobody"}, "u2")
    assert (refused["code"], refused["message"]) == (
        "no-such-user", 'User "nobody" is not connected to the server.')


def test_a_mute_ends_after_its_minutes(classroom: Callable[[], Any],
                                       peers: Callable[..., Any]) -> None:
    """A mute lasts its minutes by the wall clock (injected), then say works again."""
    server, teacher = classroom()
    clock = FakeClock(1_700_000_000.0)
    server.gate.wall_clock = clock
    student = peers(server)
    student.register("sam")
    ok(teacher, {"type": "mute", "to": "sam", "minutes": 2})
    clock.now += 119
    assert error_of(student, {"type": "say", "text": "x"})["code"] == "muted"
    clock.now += 1
    ok(student, {"type": "say", "text": "x"})


@pytest.mark.parametrize("dialect", ["native", "line", "plain"])
def test_ban_of_an_unregistered_name_keeps_its_address_out(
        classroom: Callable[[], Any], peers: Callable[..., Any], dialect: str) -> None:
    """ban of a name that is no account: its client (any dialect) is disconnected, the room told,
    and its address cannot register again (native banned, line BUSY, plain closed), except an
    account logging in with its password (another student behind the same NAT)."""
    server, teacher = classroom()
    kim = peers(server, "native", STUDENT_HOST)
    kim.register("kim")
    ok(kim, {"type": "register", "password": GOOD})
    kim.close()
    assert teacher.wait_for("notice", event="joined")["user"]["name"] == "kim"
    student = peers(server, dialect, STUDENT_HOST)
    name = join_as_sam(student, dialect, teacher)
    ok(teacher, {"type": "ban", "to": name})
    notice = notice_of(teacher, "banned")
    assert (notice["by"], notice["text"]) == (
        "teacher", f"{name} was banned by teacher until the server stops.")
    assert student.closed()
    again = peers(server, dialect, STUDENT_HOST)
    if dialect == "native":
        assert error_of(again, {"type": "hello", "name": "other"})["code"] == "banned"
    elif dialect == "line":
        again.send_text("HELLO-FROM other")
        assert again.read() == "BUSY"
        assert again.closed()
    else:
        again.send_text("back")
        assert again.closed()
    assert server.store.load_bans() == []  # until the server stops: not kept past this run
    peers(server).register("fromteacherhost")  # another address is not banned
    assert peers(server, "native", STUDENT_HOST).register("kim", password=GOOD)["account"] is True


def test_ban_of_an_account_with_minutes_is_kept_in_the_store(
        classroom: Callable[[], Any], peers: Callable[..., Any]) -> None:
    """ban of an account for some minutes: its right password is then banned from any address,
    and the ban (with its end) is in the store."""
    server, teacher = classroom()
    student = peers(server, host=STUDENT_HOST)
    student.register("sam")
    ok(student, {"type": "register", "password": GOOD})
    ok(teacher, {"type": "ban", "to": "sam", "minutes": 30, "reason": "cheating"})
    assert notice_of(teacher, "banned")["text"] == (
        "sam was banned by teacher for 30 minutes: cheating")
    assert student.closed()
    wait_until(lambda: server.room.online == 1, what="sam to be gone")
    assert error_of(peers(server), {"type": "hello", "name": "sam", "password": GOOD})[
        "code"] == "banned"
    [ban] = server.store.load_bans()
    assert ban.key == "account:sam" and ban.until is not None


# -- the wire values and the program's options -------------------------------------------------


def test_user_account_and_admin_flags_are_written_only_when_true() -> None:
    """A user's ``account`` and ``admin`` travel only when true, and parse back."""
    plain = User(3, "sam")
    marked = User(4, "teacher", account=True, admin=True)
    assert "account" not in plain.wire() and "admin" not in plain.wire()
    assert (marked.wire()["account"], marked.wire()["admin"]) == (True, True)
    assert User.parse(marked.wire()) == marked and User.parse(plain.wire()) == plain


def test_an_access_refusal_is_the_protocols_refusal_with_for_and_retry_after() -> None:
    """access raises protocol's Refusal; its fields and its equality include for/retry_after."""
    assert AccessRefusal is Refusal and Code is ErrorCode
    wait = Refusal(ErrorCode.TOO_MANY_ATTEMPTS, "Later.", retry_after=9)
    assert wait.fields() == {"code": "too-many-attempts", "message": "Later.", "retry_after": 9}
    assert wait != Refusal(ErrorCode.TOO_MANY_ATTEMPTS, "Later.", retry_after=8)
    assert Refusal(ErrorCode.BAD_PASSWORD, "No.", for_="server") != Refusal(
        ErrorCode.BAD_PASSWORD, "No.", for_="account")


def test_the_program_reads_the_server_password_from_a_file_or_the_environment(
        server_process: Callable[..., Any], tmp_path: Path) -> None:
    """``--password-file`` (its first line) and ``CHAT_PASSWORD`` both set the server password."""
    secret = tmp_path / "room-key"
    secret.write_text("from the file\nignored\n")
    proc = server_process("--password-file", str(secret))
    peer = Peer(proc.address)
    try:
        assert error_of(peer, {"type": "hello"}) == {"code": "password-required",
                                                      "for": "server"}
        assert peer.register("ann", server_password="from the file")["name"] == "ann"
    finally:
        peer.close()
    env = dict(os.environ, CHAT_PASSWORD="from the env")
    out = subprocess.run(
        [sys.executable, "-c", "import chat_server; "
         "print(chat_server.parse_args([]).server_password)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=10, check=True)
    assert out.stdout == "from the env\n"


def test_an_empty_password_file_refuses_to_start(tmp_path: Path) -> None:
    """A password file whose first line is empty is an error at start (exit 2), no traceback."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "chat_server.py"), "--port", "0", "--store", "none",
         "--password-file", str(empty)], check=False, capture_output=True, text=True,
        timeout=10)
    assert out.returncode == 2
    assert "--password-file" in out.stderr and "Traceback" not in out.stderr


def test_settled_address_counts_only_reported_failures() -> None:
    """With settle_addresses, 30 attempts in flight from one address (a class behind one NAT
    address) all go ahead; 5 reported failures then refuse the address; names count up front."""
    throttle = Throttle(clock=FakeClock(), settle_addresses=True)
    attempts = [throttle.begin(f"student{i}", "203.0.113.9") for i in range(30)]
    for attempt in attempts[:5]:
        throttle.fail(attempt)
    for attempt in attempts[5:]:
        throttle.succeed(attempt)
    with pytest.raises(Refusal) as refused:
        throttle.begin("student99", "203.0.113.9")
    assert refused.value.retry_after == 60
    for _ in range(5):
        throttle.begin("teacher", f"198.51.100.{_}")
    with pytest.raises(Refusal):
        throttle.begin("teacher", "198.51.100.77")


def test_a_class_logs_in_at_once_from_one_address(
        start_server: Start, peers: Callable[..., Any]) -> None:
    """30 accounts logging in with the right password at the same moment from one address are
    all welcomed (the throttle counts failures, not logins in flight)."""
    server = start_server(rate=0, max_unregistered_per_ip=0)
    names = [f"student{i}" for i in range(30)]
    for name in names:
        account(server, peers, name).close()
    wait_until(lambda: server.room.online == 0, what="the registrations to end")
    students = [peers(server) for _ in names]
    for student, name in zip(students, names, strict=True):
        student.send({"type": "hello", "name": name, "password": GOOD})
    assert [student.next_event()["type"] for student in students] == ["welcome"] * 30


def test_a_muted_plain_client_is_told_and_its_text_goes_nowhere(
        classroom: Callable[[], Any], peers: Callable[..., Any]) -> None:
    """A muted plain client's text is not delivered; it gets the refusal's sentence instead."""
    server, teacher = classroom()
    plain = peers(server, "plain")
    plain.send_text("first")
    name = teacher.wait_for("notice", event="joined")["user"]["name"]
    assert teacher.wait_for("message")["text"] == "first"
    ok(teacher, {"type": "mute", "to": name, "minutes": 1})
    assert plain.read() == f"{name} was muted by teacher for 1 minute."
    plain.send_text("second")
    assert plain.read() == "You are muted by teacher for 1 more minute."
    assert [e for e in teacher.sync() if e["type"] == "message"] == []


def test_moderation_minutes_out_of_range_are_a_bad_request(
        classroom: Callable[[], Any], peers: Callable[..., Any]) -> None:
    """mute or ban with minutes 0, a string or over a year is bad-request, and nothing happens."""
    server, teacher = classroom()
    peers(server).register("sam")
    for kind in ("mute", "ban"):
        for minutes in (0, "5", 527_041):
            assert error_of(teacher, {"type": kind, "to": "sam", "minutes": minutes}) == {
                "code": "bad-request"}
    assert "sam" in users(teacher)
    assert server.gate.sanctions.is_muted("sam", server.gate.wall_clock()) is None


def test_a_timed_ban_outlives_a_restart_and_one_without_minutes_does_not(
        start_server: Start, peers: Callable[..., Any], tmp_path: Path) -> None:
    """A ban with minutes is read back from the store at start; a ban until the server stops is
    gone after a restart."""
    path = str(tmp_path / "class.db")
    server = start_server(rate=0, store=path, admins=("teacher",))
    teacher = account(server, peers, "teacher")
    for name in ("sam", "kim"):
        student = peers(server)
        student.register(name)
        ok(student, {"type": "register", "password": GOOD})
    ok(teacher, {"type": "ban", "to": "sam", "minutes": 60})
    ok(teacher, {"type": "ban", "to": "kim"})
    assert server.store.flush()
    server.stop()
    again = start_server(rate=0, store=path)
    assert error_of(peers(again), {"type": "hello", "name": "sam", "password": GOOD}) == {
        "code": "banned"}
    assert peers(again).register("kim", password=GOOD)["account"] is True


def test_a_disputed_key_is_an_account_no_password_opens_until_a_valid_record() -> None:
    """Gate.dispute_accounts: a key with no record becomes an account (hello needs a password,
    none is accepted, register is name-taken), newly disputed keys are returned once, a key with
    a record is never disputed, and adopting a valid record or a snapshot without it ends it."""
    gate = Gate(MemoryStore())
    replaced: list[str] = []
    gate.on_account_replaced = replaced.append
    known = AccountRecord("alice", "alice", hash_password(GOOD), 1.0)
    assert gate.adopt_account(known, 1.0) is True
    assert gate.dispute_accounts(["teacher", "alice"]) == ["teacher"]
    assert gate.dispute_accounts(["teacher", "alice"]) == []  # logged once
    assert (gate.is_account("Teacher"), gate.is_account("bob")) == (True, False)
    for password, code in ((None, ErrorCode.PASSWORD_REQUIRED), (GOOD,
                                                                 ErrorCode.BAD_PASSWORD)):
        with pytest.raises(Refusal) as refused:
            gate.check_entry(Entry("teacher", None, password), host="127.0.0.1", tls=False)
        assert (refused.value.code, refused.value.for_) == (code, "account")
    with pytest.raises(Refusal) as taken:
        gate.register("teacher", GOOD, host="127.0.0.1", tls=False)
    assert taken.value.code is ErrorCode.NAME_TAKEN
    record = AccountRecord("teacher", "teacher", hash_password(GOOD), 2.0)
    assert gate.adopt_account(record, 2.0) is True
    assert gate.check_entry(Entry("teacher", None, GOOD), host="127.0.0.1",
                            tls=False) == "teacher"
    assert replaced == []  # nothing replaced: a dispute had no record
    gate.dispute_accounts(["ghost"])
    assert gate.dispute_accounts([]) == [] and not gate.is_account("ghost")
    earlier = known._replace(password_hash=hash_password("another one!"), created=0.5)
    assert gate.adopt_account(earlier, 0.5) is True
    assert replaced == ["alice"]
