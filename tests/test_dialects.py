"""Black-box tests of the two older dialects the server accepts on its one port (SPEC section 2).

Every line-protocol (seed 002) and plain-protocol (seed 001) client here is a raw socket written in
this file, read up to its terminator (``\n`` or NUL) by conftest's ``RawConnection``, so the tests
check the bytes on the wire and not our own codec (protocol.py is deliberately not used). Native
peers come from conftest.
Nothing sleeps for a fixed time: every read has a deadline, every "nothing else arrived" is checked
with a round trip (a native ``ping``, or a line ``LIST``) that the server answers in order.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Peer, RawConnection, wait_until

from chat_server import ChatServer

READ_TIMEOUT = 5.0
TS_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")

Address = tuple[str, int]
Connect = Callable[..., Peer]
StartServer = Callable[..., ChatServer]


# --------------------------------------------------------------------------------------------
# Raw clients of the two older dialects.


class RawClient(RawConnection):
    """A raw TCP client of the older dialects (its reader is conftest's ``RawConnection``)."""

    terminator = b"\n"

    def __init__(self, address: Address, *, rcvbuf: int | None = None,
                 timeout: float = READ_TIMEOUT) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Set before connect so the window the server sees is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect(address)
        super().__init__(sock, timeout)

    def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.send_raw(data)


class LineClient(RawClient):
    """A seed 002 client: commands out as lines, the server's lines in (``\\n`` stripped only)."""

    terminator = b"\n"

    def command(self, text: str, ending: str = "\n") -> None:
        """Send one command line."""
        self.send(text.encode("utf-8") + ending.encode("ascii"))

    def read_line(self, timeout: float | None = None) -> str:
        """The next line from the server, decoded, without its ``\\n`` (a ``\\r`` would stay)."""
        return self.read_unit(timeout).decode("utf-8")

    def expect(self, text: str) -> None:
        """The next line must be exactly ``text``."""
        got = self.read_line()
        assert got == text, f"expected {text!r}, got {got!r}"

    def exchange(self, text: str, reply: str) -> None:
        """Send the command line ``text``; the next line must be exactly ``reply``."""
        self.command(text)
        self.expect(reply)

    def login(self, name: str) -> None:
        """``HELLO-FROM name``, answered by ``HELLO name``."""
        self.exchange(f"HELLO-FROM {name}", f"HELLO {name}")

    def sync(self, command: str = "LIST") -> tuple[list[str], str]:
        """Round-trip a ``LIST`` (or ``WHO``): ``(lines that came before its answer, the
        answer)``."""
        self.command(command)
        before: list[str] = []
        while True:
            got = self.read_line()
            if got.startswith(f"{command}-OK"):
                return before, got
            before.append(got)


class PlainClient(RawClient):
    """A seed 001 client: UTF-8 text frames ended by NUL, both ways."""

    terminator = b"\0"

    def say(self, text: str) -> None:
        """Send one frame."""
        self.send(text.encode("utf-8") + b"\0")

    def read_frame(self, timeout: float | None = None) -> str:
        """The next frame from the server, decoded."""
        return self.read_unit(timeout).decode("utf-8")

    def expect(self, text: str) -> None:
        """The next frame must be exactly ``text``."""
        got = self.read_frame()
        assert got == text, f"expected {text!r}, got {got!r}"


@pytest.fixture
def line_client() -> Iterator[Callable[..., LineClient]]:
    """A factory for line-protocol clients (logged in when ``login`` names them), closed after."""
    clients: list[LineClient] = []

    def make(server: ChatServer, *, login: str | None = None, **options: Any) -> LineClient:
        client = LineClient(server.address, **options)
        clients.append(client)
        if login is not None:
            client.login(login)  # most tests need a member, not the login exchange itself
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def plain_client() -> Iterator[Callable[..., PlainClient]]:
    """A factory for plain-protocol clients, all closed after the test."""
    clients: list[PlainClient] = []

    def make(server: ChatServer, **options: Any) -> PlainClient:
        client = PlainClient(server.address, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# --------------------------------------------------------------------------------------------
# Native helpers.


def viewer(server: ChatServer, connect: Connect, name: str) -> Peer:
    """A registered native peer in mode 2 (viewing), so messages and notices arrive live."""
    peer = connect(server)
    peer.register(name)
    peer.view()
    return peer


def typist(server: ChatServer, connect: Connect, name: str) -> Peer:
    """A registered native peer left in mode 1, so only replies arrive (a clean observer)."""
    peer = connect(server)
    peer.register(name)
    return peer


def users_of(peer: Peer) -> list[dict[str, Any]]:
    """The ``users`` reply; nothing else may arrive before it (use on a quiet peer)."""
    ref = f"users-{time.monotonic_ns()}"
    peer.send({"type": "users", "ref": ref})
    event = peer.next_event()
    assert event.get("type") == "users" and event.get("ref") == ref, event
    return list(event["users"])


def names_of(peer: Peer) -> list[str]:
    """Registered names, in registration order, as the native ``users`` reply lists them."""
    return [user["name"] for user in users_of(peer)]


def wait_registered(observer: Peer, name: str) -> dict[str, Any]:
    """Poll ``users`` from a quiet (mode 1) peer until ``name`` is registered; its user object."""
    def find() -> dict[str, Any] | None:
        return next((u for u in users_of(observer) if u["name"] == name), None)
    user: dict[str, Any] = wait_until(find, READ_TIMEOUT, f"{name} to be registered")
    return user


def say(peer: Peer, text: str) -> dict[str, Any]:
    """Broadcast from a native peer; the ``ok`` reply."""
    ref = f"say-{time.monotonic_ns()}"
    peer.send({"type": "say", "text": text, "ref": ref})
    return peer.expect("ok", ref=ref)


def dm(peer: Peer, to: str | int, text: str) -> dict[str, Any]:
    """Direct message from a native peer; the reply (``ok`` or ``error``)."""
    ref = f"dm-{time.monotonic_ns()}"
    peer.send({"type": "dm", "to": to, "text": text, "ref": ref})
    event = peer.next_event()
    assert event.get("ref") == ref, event
    return event


def line_user(user_id: int, name: str) -> dict[str, Any]:
    """The user object of a line or plain client: no title or company, available, mode 2."""
    return {"id": user_id, "name": name, "title": None, "company": None,
            "status": "available", "mode": 2}


def expect_message(peer: Peer, sender: str, text: str, to: dict[str, Any] | None,
                   queued: bool = False) -> dict[str, Any]:
    """The next event must be this message, with a well-formed UTC timestamp."""
    event = peer.expect("message", text=text, to=to, queued=queued)
    assert event["from"]["name"] == sender, event
    assert TS_PATTERN.match(event["ts"]), event
    return event


def expect_notice(peer: Peer, kind: str, name: str, text: str | None = None) -> dict[str, Any]:
    """The next event must be a notice of this kind about ``name``."""
    event = peer.expect("notice", event=kind)
    assert event["user"]["name"] == name, event
    if text is not None:
        assert event["text"] == text, event
    return event


def plain_join(server: ChatServer, plain_client: Callable[..., PlainClient], observer: Peer,
               first_text: str, name: str) -> PlainClient:
    """A plain client that sent its first frame and is registered as ``name`` (observer: mode 1)."""
    plain = plain_client(server)
    plain.say(first_text)
    wait_registered(observer, name)
    return plain


def assert_closed_unanswered(server: ChatServer, alice: Peer, data: bytes) -> None:
    """A raw connection sending ``data`` is closed unanswered; ``alice`` (alone) hears nothing."""
    browser = RawClient(server.address)
    try:
        browser.send(data)
        assert browser.read_until_closed() == b""
    finally:
        browser.close()
    assert alice.sync() == []
    assert names_of(alice) == ["alice"]


# --------------------------------------------------------------------------------------------
# Dialect detection by the first byte.


def test_first_byte_brace_selects_native_protocol(server: ChatServer) -> None:
    """A connection whose first byte is '{' speaks the native JSON protocol."""
    raw = RawClient(server.address)
    raw.terminator = b"\0"
    try:
        raw.send(b'{"type":"hello","name":"alice","ref":7}\0')
        welcome = json.loads(raw.read_unit().decode("utf-8"))
        assert welcome["type"] == "welcome"
        assert (welcome["name"], welcome["ref"], welcome["mode"], welcome["online"]) == (
            "alice", 7, 1, 1)
    finally:
        raw.close()


def test_first_line_ending_newline_selects_line_protocol(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """A connection whose first line ends in '\\n' before any NUL speaks the line protocol."""
    bob = line_client(server)
    bob.send(b"HELLO-FROM bob\n")
    assert bob.read_unit() == b"HELLO bob"


def test_first_nul_selects_plain_protocol(server: ChatServer, connect: Connect,
                                          plain_client: Callable[..., PlainClient]) -> None:
    """A connection whose first NUL comes before any '\\n' is a plain client: the frame is chat."""
    alice = viewer(server, connect, "alice")
    plain = plain_client(server)
    plain.send(b"hello there\0")
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "hello there", None)


def test_line_detection_works_one_byte_at_a_time(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """The first line may arrive one byte per segment and is still read as the line protocol."""
    bob = line_client(server)
    for byte in b"HELLO-FROM bob\n":
        bob.send(bytes([byte]))
    bob.expect("HELLO bob")


def test_plain_detection_works_one_byte_at_a_time(
        server: ChatServer, connect: Connect, plain_client: Callable[..., PlainClient]) -> None:
    """The first plain frame may arrive one byte per segment and is still broadcast whole."""
    alice = viewer(server, connect, "alice")
    plain = plain_client(server)
    for byte in b"hi\0":
        plain.send(bytes([byte]))
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "hi", None)


def test_empty_first_line_selects_line_protocol(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """An empty line, then a command, is the line protocol: the empty line gets BAD-RQST-HDR,
    login still works."""
    bob = line_client(server)
    bob.send(b"\n")
    bob.send(b"LIST\n")
    bob.expect("BAD-RQST-HDR")
    bob.expect("BAD-RQST-HDR")  # LIST before HELLO-FROM
    bob.login("bob")


@pytest.mark.parametrize("request_line", [b"POST / HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n",
                                          b"GET /chat?x=1 HTTP/1.1\n"])
def test_http_request_line_is_closed_at_once(server: ChatServer, connect: Connect,
                                             request_line: bytes) -> None:
    """A connection that begins with an HTTP request line is closed, unanswered and unregistered."""
    alice = viewer(server, connect, "alice")
    assert_closed_unanswered(server, alice, request_line)


def test_http_post_carrying_chat_commands_is_not_obeyed(
        server: ChatServer, connect: Connect) -> None:
    """A browser POST whose body holds line commands is closed before any of them runs."""
    alice = viewer(server, connect, "alice")
    body = b"HELLO-FROM mallory\nSEND alice you have been pwned\n"
    request = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:4040\r\nContent-Type: text/plain\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert_closed_unanswered(server, alice, request)


# --------------------------------------------------------------------------------------------
# Line protocol: login.


def test_line_login_is_answered_with_hello_and_registers(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """HELLO-FROM <name> gets HELLO <name>, and the line client is a live, available user."""
    alice = typist(server, connect, "alice")
    bob = line_client(server)
    bob.login("bob")
    users = users_of(alice)
    assert [u["name"] for u in users] == ["alice", "bob"]
    assert users[1] == line_user(users[1]["id"], "bob")
    assert isinstance(users[1]["id"], int)


def test_line_login_in_use_leaves_connection_open(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """A name already taken by a line client gets IN-USE and the connection may try again."""
    line_client(server, login="bob")
    other = line_client(server)
    other.exchange("HELLO-FROM bob", "IN-USE")
    other.exchange("HELLO-FROM Bob", "IN-USE")
    other.login("bobby")
    assert other.sync() == ([], "LIST-OK bob,bobby")


def test_line_login_in_use_against_native_name_any_case(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A native user's name is IN-USE for a line login whatever the case."""
    typist(server, connect, "Alice")
    bob = line_client(server)
    for attempt in ("Alice", "alice", "ALICE"):
        bob.exchange(f"HELLO-FROM {attempt}", "IN-USE")
    bob.login("bob")
    assert bob.sync() == ([], "LIST-OK Alice,bob")


def test_native_hello_with_line_users_name_is_name_taken(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A native hello with a line user's name (other case) gets name-taken."""
    line_client(server, login="bob")
    alice = connect(server)
    alice.send({"type": "hello", "name": "BOB", "ref": 1})
    alice.expect("error", code="name-taken", ref=1)


@pytest.mark.parametrize("bad", ["HELLO-FROM al!ce", "HELLO-FROM 12345", "HELLO-FROM server",
                                 "HELLO-FROM ALL", "HELLO-FROM " + "a" * 33,
                                 "HELLO-FROM two words", "HELLO-FROM", "HELLO-FROM h\u00e9",
                                 "HELLO-FROM -", "HELLO-FROM ....", "HELLO-FROM 1-2"])
def test_line_login_with_invalid_name_is_bad_body_and_may_retry(
        server: ChatServer, line_client: Callable[..., LineClient], bad: str) -> None:
    """An invalid, reserved or missing name gets BAD-RQST-BODY and the connection may try again."""
    bob = line_client(server)
    bob.exchange(bad, "BAD-RQST-BODY")
    bob.login("bob")
    assert bob.sync() == ([], "LIST-OK bob")


def test_line_login_accepts_a_32_character_name(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """A name of 32 characters of the allowed set is accepted as-is."""
    name = "a.b-c_" + "x" * 26
    bob = line_client(server)
    bob.login(name)


def test_line_login_busy_when_full_then_closed(
        start_server: StartServer, connect: Connect,
        line_client: Callable[..., LineClient]) -> None:
    """Past max_clients a line login gets BUSY and the connection is closed, nobody registered."""
    server = start_server(rate=0, max_clients=2)
    alice = typist(server, connect, "alice")
    line_client(server, login="bob")
    carol = line_client(server)
    carol.exchange("HELLO-FROM carol", "BUSY")
    assert carol.read_until_closed() == b""
    assert names_of(alice) == ["alice", "bob"]


def test_line_login_possible_again_after_a_member_leaves(
        start_server: StartServer, connect: Connect,
        line_client: Callable[..., LineClient]) -> None:
    """Once a member leaves a full server, a new line login succeeds."""
    server = start_server(rate=0, max_clients=2)
    alice = typist(server, connect, "alice")
    bob = line_client(server, login="bob")
    bob.close()
    wait_until(lambda: names_of(alice) == ["alice"], READ_TIMEOUT, "bob to be gone")
    carol = line_client(server)
    carol.login("carol")


def test_second_hello_from_is_bad_header(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """A second HELLO-FROM on a logged-in connection gets BAD-RQST-HDR and changes nothing."""
    bob = line_client(server, login="bob")
    bob.exchange("HELLO-FROM bob", "BAD-RQST-HDR")
    bob.exchange("HELLO-FROM robert", "BAD-RQST-HDR")
    assert bob.sync() == ([], "LIST-OK bob")


# --------------------------------------------------------------------------------------------
# Line protocol: LIST and WHO.


def test_list_names_every_dialect_in_registration_order(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """LIST answers LIST-OK with native, line and plain members, comma-separated, in join order."""
    alice = typist(server, connect, "alice")
    bob = line_client(server, login="bob")
    plain_join(server, plain_client, alice, "hi", "user1")
    bob.expect("DELIVERY user1 hi")
    typist(server, connect, "carol")
    bob.exchange("LIST", "LIST-OK alice,bob,user1,carol")
    assert names_of(alice) == ["alice", "bob", "user1", "carol"]


def test_who_answers_who_ok(server: ChatServer, connect: Connect,
                            line_client: Callable[..., LineClient]) -> None:
    """WHO (2020 version) answers WHO-OK with the same list as LIST."""
    typist(server, connect, "alice")
    bob = line_client(server, login="bob")
    bob.exchange("WHO", "WHO-OK alice,bob")
    bob.exchange("LIST", "LIST-OK alice,bob")


@pytest.mark.parametrize("command", ["LIST extra", "WHO extra", "LIST alice,bob"])
def test_list_with_a_body_is_bad_body(server: ChatServer, line_client: Callable[..., LineClient],
                                      command: str) -> None:
    """LIST or WHO followed by anything gets BAD-RQST-BODY."""
    bob = line_client(server, login="bob")
    bob.exchange(command, "BAD-RQST-BODY")


# --------------------------------------------------------------------------------------------
# Line protocol: SEND.


def test_send_answers_send_ok_and_delivers(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """SEND <user> <text> gets SEND-OK and the recipient gets DELIVERY <sender> <text>."""
    alice = line_client(server, login="alice")
    bob = line_client(server, login="bob")
    alice.exchange("SEND bob hello bob", "SEND-OK")
    bob.expect("DELIVERY alice hello bob")
    assert alice.sync() == ([], "LIST-OK alice,bob")


def test_send_keeps_spaces_and_utf8_exactly(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """The text is everything after 'SEND <user> ', leading, inner and trailing spaces kept."""
    carol = viewer(server, connect, "carol")
    alice = line_client(server, login="alice")
    bob = line_client(server, login="bob")
    expect_notice(carol, "joined", "alice")
    expect_notice(carol, "joined", "bob")
    alice.send(b"SEND bob  two  spaces \n")
    alice.expect("SEND-OK")
    assert bob.read_unit() == b"DELIVERY alice  two  spaces "
    alice.send("SEND bob h\u00e9llo \u2713 \u4f60\u597d\n".encode("utf-8"))
    alice.expect("SEND-OK")
    assert bob.read_unit() == "DELIVERY alice h\u00e9llo \u2713 \u4f60\u597d".encode("utf-8")
    alice.exchange("SEND carol  two  spaces ", "SEND-OK")
    expect_message(carol, "alice", " two  spaces ", {"id": carol.events[0]["id"], "name": "carol"})


def test_send_to_oneself_delivers_then_confirms(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """A SEND to oneself is delivered: DELIVERY first, then SEND-OK."""
    alice = line_client(server, login="alice")
    alice.exchange("SEND alice note to self", "DELIVERY alice note to self")
    alice.expect("SEND-OK")


def test_send_to_missing_user_is_bad_dest_user(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """A SEND to nobody of that name gets BAD-DEST-USER on a connection that used LIST."""
    alice = line_client(server, login="alice")
    alice.exchange("SEND nobody hi", "BAD-DEST-USER")
    alice.sync("LIST")
    alice.exchange("SEND nobody hi", "BAD-DEST-USER")


def test_send_to_unavailable_native_is_bad_dest_user_and_not_stored(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A SEND to an unavailable native user gets BAD-DEST-USER and nothing reaches that user."""
    alice = viewer(server, connect, "alice")
    alice.send({"type": "status", "status": "unavailable", "ref": "st"})
    alice.expect("status", status="unavailable", ref="st")
    bob = line_client(server, login="bob")
    expect_notice(alice, "joined", "bob")
    bob.exchange("SEND alice are you there", "BAD-DEST-USER")
    assert alice.sync() == []
    alice.send({"type": "status", "status": "available", "ref": "st2"})
    alice.expect("status", status="available", ref="st2")
    bob.exchange("SEND alice now?", "SEND-OK")
    expect_message(alice, "bob", "now?", {"id": alice.events[0]["id"], "name": "alice"})


def test_connection_that_used_who_gets_unknown_instead_of_bad_dest_user(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """After WHO, a bad destination (missing or unavailable) is UNKNOWN, even after a later LIST."""
    alice = typist(server, connect, "alice")
    alice.send({"type": "status", "status": "unavailable", "ref": "st"})
    alice.expect("status", status="unavailable", ref="st")
    bob = line_client(server, login="bob")
    bob.exchange("WHO", "WHO-OK alice,bob")
    bob.exchange("SEND nobody hi", "UNKNOWN")
    bob.exchange("SEND alice hi", "UNKNOWN")
    bob.exchange("LIST", "LIST-OK alice,bob")
    bob.exchange("SEND nobody hi", "UNKNOWN")
    # Another connection that never said WHO keeps the 2021 answer.
    carol = line_client(server, login="carol")
    carol.exchange("SEND nobody hi", "BAD-DEST-USER")


def test_crlf_line_endings_are_accepted(
        server: ChatServer, line_client: Callable[..., LineClient]) -> None:
    """A '\\r' before each '\\n' is ignored: it is part of no name, command or text."""
    alice = line_client(server)
    alice.command("HELLO-FROM alice", ending="\r\n")
    assert alice.read_unit() == b"HELLO alice"
    bob = line_client(server)
    bob.command("HELLO-FROM bob", ending="\r\n")
    assert bob.read_unit() == b"HELLO bob"
    alice.command("LIST", ending="\r\n")
    assert alice.read_unit() == b"LIST-OK alice,bob"
    alice.command("WHO", ending="\r\n")
    assert alice.read_unit() == b"WHO-OK alice,bob"
    alice.command("SEND bob hi there", ending="\r\n")
    assert alice.read_unit() == b"SEND-OK"
    assert bob.read_unit() == b"DELIVERY alice hi there"


@pytest.mark.parametrize("command", ["FOO", "list", "who", "send bob hi", "hello-from carol",
                                     "", "HELLO", "SENDbob hi", "DELIVERY bob hi"])
def test_unknown_lowercase_or_empty_command_after_login_is_bad_header(
        server: ChatServer, line_client: Callable[..., LineClient], command: str) -> None:
    """An unknown, lowercase or empty command gets BAD-RQST-HDR and the connection stays usable."""
    alice = line_client(server, login="alice")
    bob = line_client(server, login="bob")
    alice.exchange(command, "BAD-RQST-HDR")
    alice.exchange("SEND bob still here", "SEND-OK")
    bob.expect("DELIVERY alice still here")


@pytest.mark.parametrize("command", ["LIST", "WHO", "SEND bob hi", "FOO", "list",
                                     "hello-from carol"])
def test_commands_before_login_are_bad_header(
        server: ChatServer, line_client: Callable[..., LineClient], command: str) -> None:
    """LIST, WHO or SEND before login (and any unknown or lowercase command) get BAD-RQST-HDR."""
    bob = line_client(server, login="bob")
    carol = line_client(server)
    carol.exchange(command, "BAD-RQST-HDR")
    carol.login("carol")
    assert bob.sync() == ([], "LIST-OK bob,carol")


@pytest.mark.parametrize("command", ["SEND bob", "SEND bob ", "SEND"])
def test_send_without_text_is_bad_body(
        server: ChatServer, line_client: Callable[..., LineClient], command: str) -> None:
    """A SEND with no text (or no user) gets BAD-RQST-BODY and delivers nothing."""
    alice = line_client(server, login="alice")
    bob = line_client(server, login="bob")
    alice.exchange(command, "BAD-RQST-BODY")
    assert bob.sync() == ([], "LIST-OK alice,bob")


# --------------------------------------------------------------------------------------------
# What line clients receive.


def test_native_broadcast_reaches_line_client_with_newlines_as_spaces(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A native broadcast arrives as DELIVERY <sender> <text>, each newline replaced by a space."""
    bob = line_client(server, login="bob")
    alice = typist(server, connect, "alice")
    assert say(alice, "one\ntwo\n\nthree  four")["delivered"] == 1
    bob.expect("DELIVERY alice one two  three  four")
    assert say(alice, "\nedge\n")["queued"] == 0
    assert bob.read_unit() == b"DELIVERY alice  edge "


def test_native_dm_reaches_line_client_by_name_and_id(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A native dm to a line client, by name or by id, arrives as DELIVERY, newlines flattened."""
    bob = line_client(server, login="bob")
    alice = typist(server, connect, "alice")
    bob_id = wait_registered(alice, "bob")["id"]
    reply = dm(alice, "bob", "by\nname")
    assert (reply["type"], reply["delivered"], reply["queued"]) == ("ok", 1, 0)
    bob.expect("DELIVERY alice by name")
    reply = dm(alice, bob_id, "by id")
    assert (reply["type"], reply["delivered"], reply["queued"]) == ("ok", 1, 0)
    bob.expect("DELIVERY alice by id")
    reply = dm(alice, str(bob_id), "by id string")
    assert reply["type"] == "ok"
    bob.expect("DELIVERY alice by id string")


def test_line_send_reaches_native_as_direct_message(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A line SEND to a native user is a message from the line user, to that native user."""
    alice = viewer(server, connect, "alice")
    bob = line_client(server, login="bob")
    expect_notice(alice, "joined", "bob")
    bob.exchange("SEND alice hi alice", "SEND-OK")
    message = expect_message(alice, "bob", "hi alice", {"id": alice.events[0]["id"],
                                                        "name": "alice"})
    assert message["from"] == line_user(message["from"]["id"], "bob")


def test_line_clients_get_no_notices(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """Joins, quits and lost connections of others send nothing to a line client."""
    observer = typist(server, connect, "observer")
    bob = line_client(server, login="bob")
    alice = typist(server, connect, "alice")
    alice.send({"type": "quit", "ref": "q"})
    alice.expect("bye", ref="q")
    assert alice.closed()
    carol = typist(server, connect, "carol")
    carol.close()
    dave = line_client(server, login="dave")
    dave.close()
    plain = plain_join(server, plain_client, observer, "hi", "user1")
    bob.expect("DELIVERY user1 hi")
    plain.say("q")
    plain.read_until_closed()
    wait_until(lambda: names_of(observer) == ["observer", "bob"], READ_TIMEOUT,
               "everybody else to be gone")
    # Had any joined, left or lost notice been sent to bob, it would come before this answer.
    assert bob.sync() == ([], "LIST-OK observer,bob")


def test_natives_get_joined_and_lost_notices_about_line_clients(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A line client's login is a joined notice, and its closing (no quit exists) a lost notice."""
    alice = viewer(server, connect, "alice")
    bob = line_client(server, login="bob")
    expect_notice(alice, "joined", "bob")
    bob.close()
    expect_notice(alice, "lost", "bob", "bob has lost its connection.")


def test_typing_native_holds_line_send_until_view(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A native client in mode 1 gets a line SEND held, then flushed with queued:true on mode 2."""
    alice = typist(server, connect, "alice")
    alice_to = {"id": alice.events[0]["id"], "name": "alice"}
    bob = line_client(server, login="bob")
    bob.exchange("SEND alice first", "SEND-OK")
    bob.exchange("SEND alice second", "SEND-OK")
    assert alice.sync() == []
    alice.view()
    assert expect_notice(alice, "joined", "bob")["queued"] is True
    expect_message(alice, "bob", "first", alice_to, queued=True)
    expect_message(alice, "bob", "second", alice_to, queued=True)
    bob.exchange("SEND alice live", "SEND-OK")
    expect_message(alice, "bob", "live", alice_to, queued=False)


# --------------------------------------------------------------------------------------------
# Plain protocol.


def test_plain_client_gets_automatic_name_and_is_listed(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """A plain client is named user1, user2, ... and appears in users and LIST, live and
    available."""
    alice = typist(server, connect, "alice")
    plain_join(server, plain_client, alice, "first", "user1")
    plain_join(server, plain_client, alice, "second", "user2")
    users = users_of(alice)
    assert [u["name"] for u in users] == ["alice", "user1", "user2"]
    assert users[1] == line_user(users[1]["id"], "user1")
    assert users[2] == line_user(users[2]["id"], "user2")
    bob = line_client(server, login="bob")
    assert bob.sync() == ([], "LIST-OK alice,user1,user2,bob")


def test_plain_client_is_not_a_member_before_its_first_frame(
        server: ChatServer, connect: Connect, plain_client: Callable[..., PlainClient]) -> None:
    """A plain connection that has sent nothing yet is not listed (its first frame joins it)."""
    alice = viewer(server, connect, "alice")
    plain = plain_client(server)
    # Best effort: give the server a round trip's time to (wrongly) announce the silent connection.
    assert alice.sync() == []
    assert names_of(alice) == ["alice"]
    plain.say("now")
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "now", None)


def test_plain_automatic_name_skips_names_in_use(
        server: ChatServer, connect: Connect, plain_client: Callable[..., PlainClient]) -> None:
    """The plain client gets the next free automatic name, after a native one and a taken one."""
    anon = connect(server)
    assert anon.register()["name"] == "user1"
    typist(server, connect, "user2")
    plain_join(server, plain_client, anon, "hi", "user3")
    assert names_of(anon) == ["user1", "user2", "user3"]


def test_plain_frames_are_broadcast_to_native_and_line(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """Each plain frame, the first included, is a broadcast: a message with to null, or DELIVERY."""
    alice = viewer(server, connect, "alice")
    bob = line_client(server, login="bob")
    expect_notice(alice, "joined", "bob")
    plain = plain_client(server)
    plain.say("first frame")
    plain.say("multi\nline  text")
    expect_notice(alice, "joined", "user1")
    first = expect_message(alice, "user1", "first frame", None)
    assert first["from"] == line_user(first["from"]["id"], "user1")
    expect_message(alice, "user1", "multi\nline  text", None)
    bob.expect("DELIVERY user1 first frame")
    bob.expect("DELIVERY user1 multi line  text")


def test_plain_receives_messages_as_sender_colon_text(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """A plain client receives '<sender>: <text>' frames for broadcasts and direct messages."""
    alice = typist(server, connect, "alice")
    bob = line_client(server, login="bob")
    plain = plain_join(server, plain_client, alice, "hi", "user1")
    bob.expect("DELIVERY user1 hi")
    reply = say(alice, "hello\nplain  world")
    assert (reply["delivered"], reply["queued"]) == (2, 0)
    assert plain.read_unit() == b"alice: hello plain  world"
    bob.expect("DELIVERY alice hello plain  world")
    bob.exchange("SEND user1  spaced  out ", "SEND-OK")
    assert plain.read_unit() == b"bob:  spaced  out "


def test_native_dm_to_plain_by_name_and_id(
        server: ChatServer, connect: Connect, plain_client: Callable[..., PlainClient]) -> None:
    """A native dm reaches a plain client by name or by id, as '<sender>: <text>'."""
    alice = typist(server, connect, "alice")
    plain = plain_join(server, plain_client, alice, "hi", "user1")
    plain_id = wait_registered(alice, "user1")["id"]
    reply = dm(alice, "user1", "by name")
    assert (reply["type"], reply["delivered"], reply["queued"]) == ("ok", 1, 0)
    plain.expect("alice: by name")
    reply = dm(alice, plain_id, "by id")
    assert (reply["type"], reply["delivered"], reply["queued"]) == ("ok", 1, 0)
    plain.expect("alice: by id")


def test_plain_receives_notice_sentences(
        server: ChatServer, connect: Connect, plain_client: Callable[..., PlainClient]) -> None:
    """A plain client receives each notice as its sentence: quitting, lost connection."""
    watcher = viewer(server, connect, "watcher")
    alice = typist(server, connect, "alice")
    carol = typist(server, connect, "carol")
    expect_notice(watcher, "joined", "alice")
    expect_notice(watcher, "joined", "carol")
    plain = plain_join(server, plain_client, alice, "hi", "user1")
    expect_notice(watcher, "joined", "user1")
    expect_message(watcher, "user1", "hi", None)
    alice.send({"type": "quit"})
    alice.expect("bye")
    left = expect_notice(watcher, "left", "alice", "alice is quitting.")
    plain.expect("alice is quitting.")
    carol.close()
    lost = expect_notice(watcher, "lost", "carol", "carol has lost its connection.")
    plain.expect("carol has lost its connection.")
    assert (left["text"], lost["text"]) == ("alice is quitting.", "carol has lost its connection.")


def test_plain_q_frame_ends_connection_with_left_notice(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """A frame exactly 'q' ends the plain connection, is not broadcast, and others see 'left'."""
    alice = viewer(server, connect, "alice")
    bob = line_client(server, login="bob")
    expect_notice(alice, "joined", "bob")
    plain = plain_client(server)
    plain.say("bye all")
    plain.say("q")
    plain.read_until_closed()
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "bye all", None)
    expect_notice(alice, "left", "user1", "user1 is quitting.")
    assert alice.sync() == []
    assert bob.sync() == (["DELIVERY user1 bye all"], "LIST-OK alice,bob")


def test_plain_close_without_q_is_lost(
        server: ChatServer, connect: Connect, plain_client: Callable[..., PlainClient]) -> None:
    """A plain client that just closes its socket is announced as lost."""
    alice = viewer(server, connect, "alice")
    plain = plain_client(server)
    plain.say("hi")
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "hi", None)
    plain.close()
    expect_notice(alice, "lost", "user1", "user1 has lost its connection.")
    assert names_of(alice) == ["alice"]


@pytest.mark.parametrize("text", ["Q", "q ", " q", "quit", "qq", "q\nq"])
def test_plain_frame_only_exactly_q_quits(
        server: ChatServer, connect: Connect, plain_client: Callable[..., PlainClient],
        text: str) -> None:
    """A frame that merely resembles 'q' is an ordinary broadcast and the connection stays."""
    alice = viewer(server, connect, "alice")
    plain = plain_client(server)
    plain.say("hi")
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "hi", None)
    plain.say(text)
    expect_message(alice, "user1", text, None)
    reply = dm(alice, "user1", "still there?")
    assert reply["type"] == "ok"
    plain.expect("alice: still there?")


def test_nul_in_a_text_never_splits_a_plain_frame(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """A NUL inside a native or line text reaches plain and line clients as a visible \\x00, in
    one frame."""
    alice = typist(server, connect, "alice")
    bob = line_client(server, login="bob")
    plain = plain_join(server, plain_client, alice, "hi", "user1")
    bob.expect("DELIVERY user1 hi")
    assert say(alice, "x\u0000y")["delivered"] == 2
    assert plain.read_unit() == b"alice: x\\x00y"
    bob.send(b"SEND user1 a\0b\n")
    assert bob.read_unit() == b"DELIVERY alice x\\x00y"
    bob.expect("SEND-OK")
    assert plain.read_unit() == b"bob: a\\x00b"
    assert dm(alice, "user1", "next")["type"] == "ok"
    plain.expect("alice: next")


def test_carriage_return_in_a_text_reaches_line_client_as_space(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A lone '\r' in a text is flattened like a newline, so no line reader can split on it."""
    bob = line_client(server, login="bob")
    alice = typist(server, connect, "alice")
    assert dm(alice, "bob", "p\rq")["type"] == "ok"
    assert bob.read_unit() == b"DELIVERY alice p q"


HOSTILE = "A\x1b[2J\rB\nC\u202eD\x85E\x07F\x7fG\r\nH\u2028I"
"""Clear the screen, return the carriage, a newline, a right-to-left override, C1 NEL, a bell,
DEL, CR LF and a line separator: what a plain or line client must never get raw (SPEC 2.1)."""
NEUTRALISED = b"A\\x1b[2J B C\\u202eD\\x85E\\x07F\\x7fG H\\u2028I"


def test_line_client_gets_control_characters_as_visible_escapes(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient]) -> None:
    """A native text with ESC[2J, CR, LF, U+202E and C1 reaches a line client, broadcast or
    direct, as one DELIVERY line: newlines a space, every other control a visible escape."""
    bob = line_client(server, login="bob")
    alice = typist(server, connect, "alice")
    assert say(alice, HOSTILE)["delivered"] == 1
    assert bob.read_unit() == b"DELIVERY alice " + NEUTRALISED
    assert dm(alice, "bob", HOSTILE)["delivered"] == 1
    assert bob.read_unit() == b"DELIVERY alice " + NEUTRALISED
    assert bob.sync() == ([], "LIST-OK bob,alice")


def test_plain_client_gets_control_characters_as_visible_escapes(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """A native or line text with ESC[2J, CR, LF, U+202E and C1 reaches a plain client as one
    '<sender>: <text>' frame: newlines a space, every other control a visible escape."""
    alice = typist(server, connect, "alice")
    plain = plain_join(server, plain_client, alice, "hi", "user1")
    assert say(alice, HOSTILE)["delivered"] == 1
    assert plain.read_unit() == b"alice: " + NEUTRALISED
    assert dm(alice, "user1", HOSTILE)["delivered"] == 1
    assert plain.read_unit() == b"alice: " + NEUTRALISED
    bob = line_client(server, login="bob")
    plain.expect("bob joined the chat.")
    bob.send("SEND user1 \x1b[2J\rteacher is quitting.\x9b\n".encode())
    bob.expect("SEND-OK")
    assert plain.read_unit() == b"bob: \\x1b[2J teacher is quitting.\\x9b"


# --------------------------------------------------------------------------------------------
# One room, three dialects.


def test_room_native_line_and_plain_talk_in_every_direction(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """A native, a line and a plain client each reach both others, by broadcast and directly."""
    alice = viewer(server, connect, "alice")
    alice_to = {"id": alice.events[0]["id"], "name": "alice"}
    bob = line_client(server, login="bob")
    expect_notice(alice, "joined", "bob")
    plain = plain_client(server)
    plain.say("hi from plain")
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "hi from plain", None)
    bob.expect("DELIVERY user1 hi from plain")

    # native -> everyone, native -> line, native -> plain
    reply = say(alice, "hello room")
    assert (reply["delivered"], reply["queued"]) == (2, 0)
    bob.expect("DELIVERY alice hello room")
    plain.expect("alice: hello room")
    assert dm(alice, "bob", "psst bob")["delivered"] == 1
    bob.expect("DELIVERY alice psst bob")
    assert dm(alice, "user1", "psst plain")["delivered"] == 1
    plain.expect("alice: psst plain")

    # line -> native, line -> plain
    bob.exchange("SEND alice to alice", "SEND-OK")
    expect_message(alice, "bob", "to alice", alice_to)
    bob.exchange("SEND user1 to plain", "SEND-OK")
    plain.expect("bob: to plain")

    # plain -> everyone
    plain.say("from plain again")
    expect_message(alice, "user1", "from plain again", None)
    bob.expect("DELIVERY user1 from plain again")

    # Nothing else went anywhere: no notices to the line client, nothing extra to anyone.
    assert alice.sync() == []
    assert bob.sync() == ([], "LIST-OK alice,bob,user1")
    assert dm(alice, "user1", "last")["delivered"] == 1
    plain.expect("alice: last")
    assert [u["name"] for u in users_of(alice)] == ["alice", "bob", "user1"]


# --------------------------------------------------------------------------------------------
# Limits hold for every dialect.


def test_max_clients_closes_plain_client_without_joining(
        start_server: StartServer, connect: Connect,
        plain_client: Callable[..., PlainClient]) -> None:
    """Past max_clients a plain client is closed at its first frame; nothing is broadcast."""
    server = start_server(rate=0, max_clients=2)
    alice = viewer(server, connect, "alice")
    typist(server, connect, "bob")
    expect_notice(alice, "joined", "bob")
    plain = plain_client(server)
    plain.say("let me in")
    assert plain.read_until_closed() == b""
    assert alice.sync() == []
    assert names_of(alice) == ["alice", "bob"]


def test_max_clients_counts_line_and_plain_members(
        start_server: StartServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """Line and plain members fill the server like native ones: a native hello gets server-full."""
    server = start_server(rate=0, max_clients=2)
    bob = line_client(server, login="bob")
    plain = plain_client(server)
    plain.say("hi")
    bob.expect("DELIVERY user1 hi")
    late = connect(server)
    late.send({"type": "hello", "name": "late", "ref": 1})
    late.expect("error", code="server-full", ref=1)
    assert late.closed()
    assert bob.sync() == ([], "LIST-OK bob,user1")


def test_overlong_line_is_discarded_and_connection_survives(
        start_server: StartServer, connect: Connect,
        line_client: Callable[..., LineClient]) -> None:
    """A line longer than max_frame is not obeyed, and its sender and others keep working."""
    server = start_server(rate=0, max_frame=1024)
    alice = viewer(server, connect, "alice")
    bob = line_client(server, login="bob")
    carol = line_client(server, login="carol")
    expect_notice(alice, "joined", "bob")
    expect_notice(alice, "joined", "carol")
    bob.command("SEND carol " + "x" * 5000)
    bob.command("SEND carol short")
    replies: list[str] = []
    while (got := bob.read_line()) != "SEND-OK":
        replies.append(got)
    # SPEC 2.1 names no reply for an over-long line; ours is BAD-RQST-BODY (docs/dialects.md).
    assert replies == ["BAD-RQST-BODY"]
    carol.expect("DELIVERY bob short")
    assert say(alice, "still fine")["delivered"] == 2
    bob.expect("DELIVERY alice still fine")
    carol.expect("DELIVERY alice still fine")
    assert alice.sync() == []


def test_overlong_plain_frame_is_discarded_and_connection_survives(
        start_server: StartServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """A plain frame longer than max_frame is not broadcast; the next frame is, and others work."""
    server = start_server(rate=0, max_frame=1024)
    alice = viewer(server, connect, "alice")
    bob = line_client(server, login="bob")
    expect_notice(alice, "joined", "bob")
    plain = plain_client(server)
    plain.say("hi")
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "hi", None)
    bob.expect("DELIVERY user1 hi")
    plain.say("y" * 5000)
    plain.say("after")
    expect_message(alice, "user1", "after", None)
    bob.expect("DELIVERY user1 after")
    assert dm(alice, "user1", "ok?")["type"] == "ok"
    # Whatever the server told the plain client about the long frame, the dm still arrives.
    while (got := plain.read_frame()) != "alice: ok?":
        assert "y" * 100 not in got


def test_rate_limit_delays_line_commands_without_loss(
        start_server: StartServer, line_client: Callable[..., LineClient]) -> None:
    """Past its burst a flooding line client is held back, loses nothing, and slows nobody else
    (the bucket's timing is tested with a fake clock in test_handler.py)."""
    rate = 100
    server = start_server(rate=rate)
    alice = line_client(server, login="alice")
    bob = line_client(server, login="bob")
    carol = line_client(server, login="carol")
    count = 3 * rate  # the burst is 2 * rate, so about one second of delay
    alice.send(b"".join(f"SEND bob flood {i}\n".encode() for i in range(count)))
    carol.exchange("SEND bob not delayed", "SEND-OK")
    received = [bob.read_line() for _ in range(count + 1)]
    flood = [line for line in received if line.startswith("DELIVERY alice ")]
    assert flood == [f"DELIVERY alice flood {i}" for i in range(count)]
    # Carol's own budget is untouched: her message overtook the tail of alice's flood.
    assert received.index("DELIVERY carol not delayed") < count
    assert [alice.read_line() for _ in range(count)] == ["SEND-OK"] * count


def test_rate_limit_delays_plain_frames_without_loss(
        start_server: StartServer, connect: Connect,
        plain_client: Callable[..., PlainClient]) -> None:
    """Past its burst a flooding plain client is held back while others are served, and every
    frame is still broadcast, in order."""
    rate = 100
    server = start_server(rate=rate)
    alice = viewer(server, connect, "alice")
    bob = viewer(server, connect, "bob")
    expect_notice(alice, "joined", "bob")
    plain = plain_client(server)
    count = 3 * rate  # the burst is 2 * rate, so about one second of delay
    plain.send(b"".join(f"frame {i}\0".encode() for i in range(count)))
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "frame 0", None)
    bob.send({"type": "say", "text": "not delayed"})
    received = [alice.expect("message")["text"] for _ in range(count)]
    assert [text for text in received if text != "not delayed"] == [
        f"frame {i}" for i in range(1, count)]
    assert received.index("not delayed") < count - 1, "bob waited for the whole flood"


@pytest.mark.parametrize("dialect", ["line", "plain"])
def test_client_that_never_reads_is_dropped_without_stalling_others(
        start_server: StartServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient], dialect: str) -> None:
    """A line or plain client that never reads is disconnected (lost) while the others keep up."""
    server = start_server(rate=0, output_limit=64 * 1024)
    alice = viewer(server, connect, "alice")
    carol = line_client(server, login="carol")
    expect_notice(alice, "joined", "carol")
    if dialect == "line":
        slow_name = "slow"
        slow: RawClient = line_client(server, rcvbuf=4096)
        slow.send(b"HELLO-FROM slow\n")
        expect_notice(alice, "joined", "slow")
    else:
        slow_name = "user1"
        slow = plain_client(server, rcvbuf=4096)
        slow.send(b"hi\0")
        expect_notice(alice, "joined", "user1")
        expect_message(alice, "user1", "hi", None)
        carol.expect("DELIVERY user1 hi")
    # Each round is synchronous for alice and carol, so any stall shows up as a read timeout.
    payload = "z" * 30_000
    lost = None
    deadline = time.monotonic() + 20
    rounds = 0
    while lost is None:
        assert time.monotonic() < deadline, f"{slow_name} never dropped after {rounds} rounds"
        ref = f"flood-{rounds}"
        alice.send({"type": "say", "text": f"{rounds} {payload}", "ref": ref})
        while True:
            event = alice.next_event()
            if event.get("type") == "ok" and event.get("ref") == ref:
                break
            assert event.get("type") == "notice", event
            lost = event
        carol.expect(f"DELIVERY alice {rounds} {payload}")
        rounds += 1
    assert (lost["event"], lost["user"]["name"], lost["text"]) == (
        "lost", slow_name, f"{slow_name} has lost its connection.")
    assert carol.sync() == ([], "LIST-OK alice,carol")
    assert say(alice, "after the drop")["delivered"] == 1
    carol.expect("DELIVERY alice after the drop")


# --------------------------------------------------------------------------------------------
# Timeouts and shutdown, seen from the older dialects.


def test_line_connection_that_never_logs_in_is_closed_after_hello_timeout(
        start_server: StartServer, line_client: Callable[..., LineClient]) -> None:
    """A line connection that does not log in within hello_timeout is closed; a logged-in one
    stays."""
    server = start_server(rate=0, hello_timeout=0.3)
    bob = line_client(server, login="bob")
    idle = line_client(server)
    idle.exchange("LIST", "BAD-RQST-HDR")
    silent = line_client(server)  # sent nothing: its dialect is never known
    assert idle.read_until_closed(timeout=3) == b""
    assert silent.read_until_closed(timeout=3) == b""
    assert bob.sync() == ([], "LIST-OK bob")


def test_plain_connection_with_only_empty_frames_is_closed_after_hello_timeout(
        start_server: StartServer, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """Empty plain frames do not join, so such a connection is closed at hello_timeout unlisted."""
    server = start_server(rate=0, hello_timeout=0.3)
    bob = line_client(server, login="bob")
    plain = plain_client(server)
    plain.send(b"\0\0")
    assert plain.read_until_closed(timeout=3) == b""
    assert bob.sync() == ([], "LIST-OK bob")


def test_heartbeat_never_drops_line_or_plain_clients(
        start_server: StartServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """Line and plain clients cannot answer ping, so a silent one outlives the heartbeat."""
    server = start_server(rate=0, heartbeat=0.2)
    observer = typist(server, connect, "observer")
    bob = line_client(server, login="bob")
    plain = plain_join(server, plain_client, observer, "hi", "user1")
    bob.expect("DELIVERY user1 hi")
    mute = connect(server)
    mute.register("mute")  # never answers the server's ping: lost after about two heartbeats
    # The observer polls all the time, so it is never idle and never pinged.
    wait_until(lambda: "mute" not in names_of(observer), READ_TIMEOUT, "mute to be lost")
    assert names_of(observer) == ["observer", "bob", "user1"]
    assert bob.sync() == ([], "LIST-OK observer,bob,user1")
    assert dm(observer, "user1", "still here")["delivered"] == 1
    assert "mute" in plain.read_frame()  # the joined sentence (SPEC fixes no wording for it)
    plain.expect("mute has lost its connection.")
    plain.expect("observer: still here")


def test_shutdown_sends_plain_clients_the_sentence_and_just_closes_line_clients(
        server: ChatServer, connect: Connect, line_client: Callable[..., LineClient],
        plain_client: Callable[..., PlainClient]) -> None:
    """On stop, a plain client gets the shutdown notice's sentence; a line client gets nothing."""
    alice = viewer(server, connect, "alice")
    bob = line_client(server, login="bob")
    expect_notice(alice, "joined", "bob")
    plain = plain_client(server)
    plain.say("hi")
    expect_notice(alice, "joined", "user1")
    expect_message(alice, "user1", "hi", None)
    bob.expect("DELIVERY user1 hi")
    server.stop()
    notice = alice.expect("notice", event="shutdown")
    assert plain.read_until_closed() == notice["text"].encode("utf-8") + b"\0"
    assert bob.read_until_closed() == b""
