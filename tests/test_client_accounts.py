"""The client's side of SPEC 7: password prompts without echo, /register, /password, the admin
commands, and /users marking admins and accounts. The real program runs under pexpect against
an in-process server; the command parser and the users table are tested pure."""

from __future__ import annotations

from collections.abc import Callable

import pexpect
import pytest
from client_helpers import PROMPT, choose_typing, command, output
from conftest import Peer, wait_until

from chat_server import ChatServer
from chatsuite.client.display import format_users
from modes import (
    HELP_TEXT,
    Invalid,
    ModerateCommand,
    PasswordCommand,
    RegisterCommand,
    read_typed_line,
)
from protocol import User

GOOD = "correct horse"
OTHER = "battery staple"

# -- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "command_"), [
    ("/register", RegisterCommand()),
    ("/password", PasswordCommand()),
    ("/kick sam", ModerateCommand("kick", "sam")),
    ("/kick sam  too loud ", ModerateCommand("kick", "sam", reason="too loud")),
    ("/mute sam", ModerateCommand("mute", "sam")),
    ("/mute 12 5", ModerateCommand("mute", "12", minutes=5)),
    ("/unmute sam", ModerateCommand("unmute", "sam")),
    ("/ban sam", ModerateCommand("ban", "sam")),
    ("/BAN sam 60", ModerateCommand("ban", "sam", minutes=60)),
    ("/register now", Invalid(
        "/register takes no arguments (it asks for the password, which is not shown)")),
    ("/kick", Invalid("/kick needs a user: /kick <user> [reason]")),
    ("/unmute sam 5", Invalid("/unmute takes one user: /unmute <user>")),
    ("/mute sam soon", Invalid(
        "/mute: minutes is a whole number from 1 to 527040: /mute <user> [minutes]")),
    ("/ban sam 0", Invalid(
        "/ban: minutes is a whole number from 1 to 527040: /ban <user> [minutes]")),
])
def test_account_and_admin_commands_parse(line: str, command_: object) -> None:
    """/register, /password, /kick, /mute, /unmute and /ban read as their commands, or say how
    to write them."""
    assert read_typed_line(line) == command_


def test_help_lists_the_account_and_admin_commands() -> None:
    """/help names every new command."""
    for word in ("/register", "/password", "/kick <user> [reason]", "/mute <user> [minutes]",
                 "/unmute <user>", "/ban <user> [minutes]"):
        assert word in HELP_TEXT


def test_users_table_marks_admins_and_accounts() -> None:
    """/users marks an admin "(admin)" and another account "(account)"."""
    rows = format_users([User(4, "teacher", account=True, admin=True),
                         User(5, "sam", account=True), User(6, "guest")], own_id=5)
    assert [row.split() for row in rows[1:]] == [
        ["4", "teacher", "(admin)", "-", "-", "available"],
        ["5", "sam", "(account)", "(you)", "-", "-", "available"],
        ["6", "guest", "-", "-", "available"]]


# -- the program ----------------------------------------------------------------------------------


def client(spawn: Callable[..., pexpect.spawn], server: ChatServer, name: str) -> pexpect.spawn:
    host, port = server.address
    child = spawn(name, "--host", host, "--port", str(port), "--no-color")
    child.expect_exact("you are now connected to the server")
    return child


def welcomed(child: pexpect.spawn, name: str) -> pexpect.spawn:
    child.expect(f"welcome {name}, your id is \\d+")
    return choose_typing(child)


def make_account(server: ChatServer, connect: Callable[..., Peer], name: str) -> None:
    """Register ``name`` as an account with GOOD, then leave."""
    peer = connect(server)
    peer.register(name)
    peer.send({"type": "register", "password": GOOD, "ref": 1})
    peer.expect("ok", ref=1)
    peer.close()
    wait_until(lambda: server.room.online == 0, what=f"{name} to leave")


def test_the_client_asks_for_the_server_password_without_echo(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., ChatServer]) -> None:
    """password-required for the server: the client asks, a wrong one is said and asked again,
    the right one gets in; no typed password is shown."""
    server = start_server(rate=0, server_password="class key")
    child = client(spawn, server, "alice")
    child.expect_exact("server password: ")
    child.sendline("not it")
    child.expect_exact("wrong server password")
    child.expect_exact("server password: ")
    child.sendline("class key")
    welcomed(child, "alice")
    assert "class key" not in output(child) and "not it" not in output(child)


def test_the_client_asks_for_an_account_password_without_echo(
        spawn: Callable[..., pexpect.spawn], server: ChatServer,
        connect: Callable[..., Peer]) -> None:
    """A name that is an account: the client says so and asks for its password; a wrong one is
    said and asked again; the right one logs in and /users marks the account."""
    make_account(server, connect, "alice")
    child = client(spawn, server, "alice")
    child.expect_exact("alice is an account (Enter alone to give the name up)")
    child.expect_exact("password for alice: ")
    child.sendline(OTHER)
    child.expect_exact("wrong password for alice")
    child.expect_exact("password for alice: ")
    child.sendline(GOOD)
    welcomed(child, "alice")
    assert "alice (account) (you)" in command(child, "/users")
    assert GOOD not in output(child) and OTHER not in output(child)


def test_register_and_password_commands(
        spawn: Callable[..., pexpect.spawn], server: ChatServer,
        connect: Callable[..., Peer]) -> None:
    """/register asks twice without echo and makes the name an account; /password changes it;
    differing entries change nothing."""
    child = welcomed(client(spawn, server, "bob"), "bob")
    child.sendline("/register")
    child.expect_exact("new account password: ")
    child.sendline(GOOD)
    child.expect_exact("the same password again: ")
    child.sendline("typo typo")
    child.expect_exact("the two passwords differ; nothing changed")
    child.expect_exact(PROMPT)
    child.sendline("/register")
    child.expect_exact("new account password: ")
    child.sendline(GOOD)
    child.expect_exact("the same password again: ")
    child.sendline(GOOD)
    child.expect_exact("bob is now an account: nobody can use the name without its password")
    child.expect_exact(PROMPT)
    child.sendline("/password")
    for prompt, answer in (("current password: ", GOOD), ("new password: ", OTHER),
                           ("the new password again: ", OTHER)):
        child.expect_exact(prompt)
        child.sendline(answer)
    child.expect_exact("password changed")
    child.expect_exact(PROMPT)
    assert GOOD not in output(child) and OTHER not in output(child)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    wait_until(lambda: server.room.online == 0, what="bob to leave")
    assert connect(server).register("bob", password=OTHER)["account"] is True


def test_admin_commands_from_the_client(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., ChatServer],
        connect: Callable[..., Peer]) -> None:
    """An admin's client: /users marks it, /mute, /unmute and /kick act and the room's notices
    show; a non-admin's /ban is refused with the server's sentence."""
    server = start_server(rate=0, admins=("teacher",))
    make_account(server, connect, "teacher")
    sam: Peer = connect(server)
    sam.register("sam")
    child = client(spawn, server, "teacher")
    child.expect_exact("password for teacher: ")
    child.sendline(GOOD)
    welcomed(child, "teacher")
    assert "teacher (admin) (you)" in command(child, "/users")
    assert command(child, "/mute sam 5") == "mute: done\n"
    sam.send({"type": "say", "text": "noise", "ref": 1})
    assert sam.wait_for("error", ref=1)["code"] == "muted"
    assert command(child, "/unmute sam") == "unmute: done\n"
    assert command(child, "/kick sam too loud") == "kick: done\n"
    assert sam.wait_for("notice", event="kicked")["reason"] == "too loud"
    assert sam.closed()
    guest = welcomed(client(spawn, server, "guest"), "guest")
    assert command(guest, "/ban teacher") == (
        "refused: Only an admin logged in with its password may ban.\n")
    assert command(child, "/users").count("guest") == 1


def test_a_student_client_sees_the_mute_refusal(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., ChatServer],
        connect: Callable[..., Peer]) -> None:
    """A muted client's message fails with the server's sentence."""
    server = start_server(rate=0, admins=("teacher",))
    make_account(server, connect, "teacher")
    teacher = connect(server)
    teacher.register("teacher", password=GOOD)
    child = welcomed(client(spawn, server, "sam"), "sam")
    teacher.send({"type": "mute", "to": "sam", "ref": 1})
    teacher.wait_for("ok", ref=1)
    assert command(child, "hello") == (
        "failed to deliver message because You are muted by teacher for 10 more minutes.\n")


def test_a_client_kicked_by_the_real_server_ends_without_coming_back(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., ChatServer],
        connect: Callable[..., Peer]) -> None:
    """A client the admin kicks shows the notice and one line, exits 1 and never reconnects."""
    server = start_server(rate=0, admins=("teacher",))
    make_account(server, connect, "teacher")
    teacher: Peer = connect(server)
    teacher.register("teacher", password=GOOD)
    child = welcomed(client(spawn, server, "sam"), "sam")
    teacher.send({"type": "kick", "to": "sam", "reason": "go away", "ref": 1})
    teacher.wait_for("ok", ref=1)
    child.expect_exact("* sam was kicked by teacher: go away\r\n")
    child.expect_exact("you were removed from the chat by teacher: not reconnecting\r\n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "reconnecting (Ctrl-C" not in output(child)
    assert server.room.online == 1  # the teacher alone: sam did not come back
