"""``chat-client --protocol line`` (SPEC 4.9) against scripted seed 002 servers and our own.

Each ``FakeLineServer`` is a small seed 002 server in a thread (a listening socket on
127.0.0.1, port 0), scripted to behave like one published version or one known habit: the 2021
version (``LIST``, ``BAD-DEST-USER``), the 2020 version (``WHO``, ``UNKNOWN``, closing on any
command it does not know), underscored replies, closing after a failed login or not, ``BUSY``.
It records every line it receives, per connection, so tests assert exactly what the client sent.
The client runs as the real program in a pseudo-terminal (pexpect); waits are expectations.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pexpect
import pytest
from client_helpers import (
    NEW_PROMPT,
    PROMPT,
    STAMP,
    TIME,
    TIMEOUT,
    ClientPrograms,
    choose_typing,
    command,
    ended,
    output,
)
from conftest import Peer, wait_until

from chatsuite.client.display import format_delivery_line, format_names
from chatsuite.client.history import history_path
from chatsuite.client.line import LINE_HELP
from modes import HELP_TEXT

BUSY = "the server is busy: it has no room for another client; try again later"
NO_BROADCAST = 'the line protocol cannot broadcast: use /dm <user> "text"'

# --------------------------------------------------------------------------------------------
# Pure helpers.


def test_format_names_marks_oneself_and_sanitises() -> None:
    """A member list is a count, then one name a line, with (you) after one's own name in any
    case."""
    assert format_names(["bob", "ALICE", "e\x1bvil"], "alice") == [
        "users (3):", "  bob", "  ALICE (you)", "  e^[vil"]


def test_history_path_of_a_name_cannot_leave_the_folder() -> None:
    """A name's log is <casefolded, percent-encoded name>.log, so / and .. stay inside."""
    assert history_path(Path("/h"), "s_1", "me", "Bob") == Path("/h/s_1/me/bob.log")
    assert history_path(Path("/h"), "s_1", "..", "../x/y") == Path("/h/s_1/%2E./%2E.%2Fx%2Fy.log")


def test_format_delivery_line_is_a_direct_message() -> None:
    """A DELIVERY is shown with the time, [direct], the sender and the sanitised text."""
    when = datetime(2026, 11, 22, 7, 0, 1)
    assert format_delivery_line("bob", "hi\x07", when) == "07:00:01 [direct] bob: hi^G"


# --------------------------------------------------------------------------------------------
# Scripted seed 002 servers.


class FakeLineServer:
    """A seed 002 server in threads, scripted by version and habits; it records what it receives."""

    def __init__(self, *, version: int = 2021, underscores: bool = False, separator: str = ",",
                 taken: tuple[str, ...] = (), close_after_failed_login: bool = False,
                 busy: str | None = None, members: tuple[str, ...] = ("bob", "carol"),
                 slow: str | None = None) -> None:
        self.version = version
        self.underscores = underscores
        self.separator = separator
        self.taken = taken
        self.close_after_failed_login = close_after_failed_login
        self.busy = busy  # "connect": BUSY as soon as one connects; "login": as the login's answer
        self.members = members
        self.slow = slow  # a SEND to this user is answered only after ``release`` is set
        self.release = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sessions: list[list[str]] = []  # the lines received, one list per connection
        self.logged_in = threading.Event()
        self._live: socket.socket | None = None  # the logged-in connection
        self._send_lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by the test
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _send(self, conn: socket.socket, text: str) -> None:
        with self._send_lock:
            conn.sendall(text.encode() + b"\n")

    def _serve(self, conn: socket.socket) -> None:
        received: list[str] = []
        self.sessions.append(received)
        try:
            if self.busy == "connect":
                self._send(conn, "BUSY")
                return
            self._converse(conn, received)
        except OSError:
            pass
        finally:
            conn.close()

    def _converse(self, conn: socket.socket, received: list[str]) -> None:
        name = None
        header_error = "BAD_RQST_HDR" if self.underscores else "BAD-RQST-HDR"
        for raw in conn.makefile("rb"):
            text = raw.decode().removesuffix("\n")
            received.append(text)
            head, _, body = text.partition(" ")
            if head == "HELLO-FROM" and name is None:
                if self.busy == "login":
                    self._send(conn, "BUSY")
                    return
                if body in self.taken or not body or " " in body:
                    self._send(conn, "IN-USE" if body in self.taken else "BAD-RQST-BODY")
                    if self.close_after_failed_login:
                        return
                    continue
                name = body
                self._send(conn, f"HELLO {name}")
                self._live = conn
                self.logged_in.set()
            elif name and head == ("WHO" if self.version == 2020 else "LIST") and not body:
                names = self.separator.join([*self.members, name])
                self._send(conn, f"{head}-OK {names}")
            elif name and head == "SEND":
                user, _, message = body.partition(" ")
                if user == self.slow:
                    self.release.wait(TIMEOUT)
                if user == name:
                    self._send(conn, f"DELIVERY {name} {message}")
                if user in self.members or user == name:
                    self._send(conn, "SEND-OK")
                else:
                    self._send(conn, "UNKNOWN" if self.version == 2020 else "BAD-DEST-USER")
            elif self.version == 2020:
                return  # some 2020 servers hang up on any command they do not know
            else:
                self._send(conn, header_error)

    def push(self, line: str) -> None:
        """Send ``line`` to the logged-in client."""
        assert self.logged_in.wait(TIMEOUT) and self._live is not None
        self._send(self._live, line)

    def hang_up(self) -> None:
        """Close the logged-in connection."""
        assert self._live is not None
        self._live.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        except OSError:
            pass
        self.listener.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(TIMEOUT)


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeLineServer]]:
    """A factory of scripted seed 002 servers, all closed after the test."""
    servers: list[FakeLineServer] = []

    def make(**habits: Any) -> FakeLineServer:
        server = FakeLineServer(**habits)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., pexpect.spawn]]:
    """Start ``chat_client.py --protocol line`` on a port in a pseudo-terminal; killed after."""
    programs = ClientPrograms(tmp_path / "history")

    def start(port: int, *args: str) -> pexpect.spawn:
        return programs.start(*args, "--protocol", "line", "--host", "127.0.0.1",
                              "--port", str(port), "--no-color")

    yield start
    programs.close()


def typing(child: pexpect.spawn, name: str = "alice") -> pexpect.spawn:
    """Wait for the welcome, choose mode 1, wait for the prompt."""
    child.expect_exact(f"welcome {name}\r\n")
    return choose_typing(child)


# --------------------------------------------------------------------------------------------
# Versions: WHO first, LIST for good after BAD-RQST-HDR.


@pytest.mark.parametrize("underscores", [False, True], ids=["dashes", "underscores"])
def test_2021_server_gets_who_once_then_list_for_good(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer],
        underscores: bool) -> None:
    """WHO answered BAD-RQST-HDR (or BAD_RQST_HDR) makes the client ask LIST now and from then
    on."""
    server = fake(version=2021, underscores=underscores)
    child = typing(spawn(server.port, "alice"))
    listing = "users (3):\n  bob\n  carol\n  alice (you)\n"
    assert command(child, "/users") == listing
    assert command(child, "!who") == listing
    assert server.sessions == [["HELLO-FROM alice", "WHO", "LIST", "LIST"]]


def test_2021_server_send_ok_and_bad_dest_user(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer]) -> None:
    """SEND-OK is 'message sent'; BAD-DEST-USER is the failure sentence naming the user."""
    server = fake(version=2021)
    child = typing(spawn(server.port, "alice"))
    assert command(child, '/dm bob "hi  there "') == "message sent\n"
    assert command(child, "@zed hello") == (
        "failed to deliver message because zed is not connected or not available\n")
    assert server.sessions == [["HELLO-FROM alice", "SEND bob hi  there ", "SEND zed hello"]]


def test_2020_server_keeps_who_and_unknown_is_a_failure(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer]) -> None:
    """A 2020 server answering WHO is never sent LIST (it would hang up); UNKNOWN is a failure."""
    server = fake(version=2020)
    child = typing(spawn(server.port, "alice"))
    listing = "users (3):\n  bob\n  carol\n  alice (you)\n"
    assert command(child, "/users") == listing
    assert command(child, "/users") == listing
    assert command(child, "@nobody x") == (
        "failed to deliver message because nobody is not connected or not available\n")
    assert command(child, "@carol x y") == "message sent\n"
    assert server.sessions == [
        ["HELLO-FROM alice", "WHO", "WHO", "SEND nobody x", "SEND carol x y"]]


@pytest.mark.parametrize("separator", [",", ", ", " "], ids=["comma", "comma-space", "space"])
def test_member_lists_split_on_commas_and_spaces(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer],
        separator: str) -> None:
    """LIST-OK names separated by commas, commas and spaces, or spaces all give the same list."""
    server = fake(version=2021, separator=separator)
    child = typing(spawn(server.port, "alice"))
    assert command(child, "/users") == "users (3):\n  bob\n  carol\n  alice (you)\n"


# --------------------------------------------------------------------------------------------
# Login.


def test_failed_login_on_a_server_that_closes_reconnects(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer]) -> None:
    """IN-USE then a closed connection: the client asks another name and logs in on a new one."""
    server = fake(taken=("bob",), close_after_failed_login=True)
    child = spawn(server.port, "bob")
    child.expect_exact("that name is taken: bob is in use\r\n")
    child.expect_exact("your name: ")
    child.sendline("alice")
    typing(child)
    assert command(child, "@carol hi") == "message sent\n"
    assert server.sessions == [["HELLO-FROM bob"], ["HELLO-FROM alice", "SEND carol hi"]]


def test_failed_logins_on_a_server_that_keeps_the_connection(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer]) -> None:
    """Enter, a taken name and an invalid one are each asked again, all on one connection."""
    server = fake(taken=("bob",))
    child = spawn(server.port)
    child.expect_exact("your name: ")
    child.sendline("")
    child.expect_exact("the line protocol needs a name: please type one\r\n")
    child.expect_exact("your name: ")
    child.sendline("bob")
    child.expect_exact("that name is taken: bob is in use\r\n")
    child.expect_exact("your name: ")
    child.sendline("a b")
    child.expect_exact("that name cannot be used: the server refused a b as invalid\r\n")
    child.expect_exact("your name: ")
    child.sendline("alice")
    typing(child)
    assert server.sessions == [["HELLO-FROM bob", "HELLO-FROM a b", "HELLO-FROM alice"]]


@pytest.mark.parametrize("when", ["login", "connect"])
def test_busy_is_a_sentence_and_exit_1(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer],
        when: str) -> None:
    """BUSY, as the login's answer or on connecting, is one clear sentence and exit code 1."""
    server = fake(busy=when)
    child = spawn(server.port, "alice")
    child.expect_exact(BUSY + "\r\n")
    assert ended(child) == 1
    assert "Traceback" not in output(child)


# --------------------------------------------------------------------------------------------
# What the protocol cannot do, modes, history, endings.


def test_broadcast_and_status_are_refused_without_sending(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer]) -> None:
    """A plain line, /bc, /status and chs are refused with a sentence; nothing reaches the
    server."""
    server = fake()
    child = typing(spawn(server.port, "alice"))
    assert command(child, "hello all") == NO_BROADCAST + "\n"
    assert command(child, '/bc "hello"') == NO_BROADCAST + "\n"
    no_status = "the line protocol has no status: you are always available\n"
    assert command(child, "/status") == no_status
    assert command(child, "chs") == no_status
    assert command(child, "/help") == HELP_TEXT + "\n" + LINE_HELP + "\n"
    assert server.sessions == [["HELLO-FROM alice"]]


def test_deliveries_are_held_while_typing_then_shown_in_order_then_live(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer]) -> None:
    """DELIVERY lines wait while typing, appear in order on #view, and then arrive live."""
    server = fake(version=2020)
    child = typing(spawn(server.port, "alice"))
    server.push("DELIVERY bob first one")
    server.push("DELIVERY carol second\x1b[2J")
    # WHO's answer follows the deliveries on the stream: once it is shown, both have arrived.
    assert command(child, "/users") == "users (3):\n  bob\n  carol\n  alice (you)\n"
    child.sendline("#view")
    child.expect_exact("viewing messages: press e to type, q to quit\r\n")
    child.expect(f"{TIME} \\[direct\\] bob: first one\r\n"
                 f"{TIME} \\[direct\\] carol: second\\^\\[\\[2J\r\n")
    server.push("DELIVERY bob live now")
    child.expect(f"{TIME} \\[direct\\] bob: live now\r\n")
    child.send("q")
    child.expect_exact("bye")
    assert ended(child) == 0
    assert "\x1b" not in output(child)


def test_history_is_kept_by_peer_name(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer],
        tmp_path: Path) -> None:
    """DMs sent and received are logged under the peer's name; history asks a name, /history
    takes one."""
    server = fake()
    child = typing(spawn(server.port, "alice"))
    command(child, "@bob hi bob")
    server.push("DELIVERY bob hi alice")
    child.sendline("#view")
    child.expect_exact("[direct] bob: hi alice")
    child.send("e")
    child.expect_exact(PROMPT)
    child.sendline("history")
    child.expect_exact("user name: ")
    logged = command(child, "bob").splitlines()
    assert len(logged) == 2
    assert re.fullmatch(f"{STAMP} sent to bob: hi bob", logged[0])
    assert re.fullmatch(f"{STAMP} received from bob: hi alice", logged[1])
    assert command(child, "/history BOB").splitlines() == logged
    assert command(child, "/history carol") == "No History\n"
    log_file = tmp_path / "history" / f"127.0.0.1_{server.port}" / "alice" / "bob.log"
    assert log_file.read_text(encoding="utf-8").splitlines() == logged


def test_send_asks_receiver_name(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer]) -> None:
    """``send`` asks 'receiver name:' (no ids in this protocol), then the message."""
    server = fake()
    child = typing(spawn(server.port, "alice"))
    child.sendline("send")
    child.expect_exact("receiver name: ")
    child.sendline("carol")
    child.expect_exact("message: ")
    assert command(child, "via send") == "message sent\n"
    assert server.sessions == [["HELLO-FROM alice", "SEND carol via send"]]


@pytest.mark.parametrize("view", [False, True], ids=["typing", "viewing"])
def test_server_hanging_up_after_login_is_exit_1(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer],
        view: bool) -> None:
    """A connection closed under a logged-in client ends it with a clear sentence and exit 1."""
    server = fake()
    child = typing(spawn(server.port, "alice"))
    if view:
        child.sendline("#view")
        child.expect_exact("viewing messages: press e to type, q to quit\r\n")
    server.hang_up()
    child.expect_exact("connection to the server was lost\r\n")
    assert ended(child) == 1
    assert "Traceback" not in output(child)


# --------------------------------------------------------------------------------------------
# Our own server.


def test_line_client_and_native_peer_on_our_server(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any],
        connect: Callable[..., Peer]) -> None:
    """On our server the line client lists, sends to and receives from a native client."""
    server = start_server(rate=0)
    bob = connect(server)
    bob.register("bob", title="CTO")
    bob.view()
    child = typing(spawn(server.address[1], "alice", "Eng"))
    assert "the line protocol has no job title or company: they are not sent" in output(child)
    assert command(child, "/users") == "users (2):\n  bob\n  alice (you)\n"
    assert command(child, '/dm BOB "hello  bob"') == "message sent\n"
    message = bob.wait_for("message")
    assert (message["from"]["name"], message["to"]["name"], message["text"]) == (
        "alice", "bob", "hello  bob")
    assert message["from"]["title"] is None
    assert command(child, "@nobody x") == (
        "failed to deliver message because nobody is not connected or not available\n")
    bob.send({"type": "say", "text": "to all\nof you", "ref": 1})
    assert bob.wait_for("ok", ref=1)["delivered"] == 1
    child.sendline("#view")
    child.expect(f"{TIME} \\[direct\\] bob: to all of you\r\n")
    child.send("q")
    child.expect_exact("bye")
    assert ended(child) == 0
    assert bob.wait_for("notice", event="lost")["text"] == "alice has lost its connection."


def test_ctrl_c_while_awaiting_a_reply_drops_that_late_reply(
        spawn: Callable[..., pexpect.spawn], fake: Callable[..., FakeLineServer]) -> None:
    """Ctrl-C while a SEND awaits its answer returns to the prompt; the late SEND-OK is not
    taken for the answer to the next request."""
    server = fake(version=2020, slow="carol")
    child = typing(spawn(server.port, "alice"))
    child.sendline("@carol are you there")
    wait_until(lambda: server.sessions[-1][-1:] == ["SEND carol are you there"])
    child.sendintr()
    child.expect(NEW_PROMPT)
    server.release.set()
    assert command(child, "/users") == "users (3):\n  bob\n  carol\n  alice (you)\n"
    assert "server:" not in output(child)
