"""What survives a reconnection and what ends it (SPEC 4.12, 6.5, 7.3), and password prompts
that nothing lands on (SPEC 4.12).

The real ``chat_client.py`` runs in a pseudo-terminal against a ``ScriptedServer`` the test
steps through: the input history kept across a reconnection, a kick or ban of ourselves ending
the session, a refusal that retrying cannot mend ending the reconnection, the count of messages
missed leaving out our own, and ``pending`` lines kept off a password question.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import pytest
from client_helpers import (
    FAST,
    LOST_LINE,
    NEW_PROMPT,
    PROMPT,
    ClientPrograms,
    ScriptedServer,
    ended,
    message,
    output,
)

UP = "\x1b[A"


def folder(programs: ClientPrograms, scripted: ScriptedServer, name: str = "alice") -> Path:
    return programs.history_dir / f"127.0.0.1_{scripted.port}" / name


def typing_then_dropped(scripted: ScriptedServer,
                        spawn: Callable[..., pexpect.spawn]) -> tuple[pexpect.spawn, Any]:
    """alice at the mode-1 prompt, her connection dropped: the client and its next hello."""
    child = scripted.register(spawn, env=FAST)
    child.sendline("1")
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)
    scripted.drop()
    child.expect_exact(LOST_LINE)
    scripted.accept()
    return child, scripted.expect("hello")


def typed(name_folder: Path) -> list[str]:
    """The lines of an input-history file (readline's own header left out)."""
    lines = (name_folder / "input.history").read_text().splitlines()
    return [line for line in lines if not line.startswith("_HiStOrY")]


def send_recalled(scripted: ScriptedServer, child: pexpect.spawn, text: str) -> None:
    """Enter on the line Up brought back: it goes out as ``text``, and is confirmed."""
    child.expect_exact(text)
    child.send("\r")
    request = scripted.expect("say")
    assert request["text"] == text
    scripted.reply(request, type="ok", delivered=1, queued=0)
    child.expect_exact(PROMPT)


def quit_cleanly(scripted: ScriptedServer, child: pexpect.spawn) -> None:
    """/quit: the server hears it, the client ends with 0."""
    child.sendline("/quit")
    scripted.expect("quit")
    scripted.drop()
    assert ended(child) == 0


def say(scripted: ScriptedServer, child: pexpect.spawn, text: str) -> None:
    """Type ``text`` at the prompt; the server takes it and answers ok."""
    child.sendline(text)
    request = scripted.expect("say")
    assert request["text"] == text
    scripted.reply(request, type="ok", delivered=1, queued=0)
    child.expect_exact("message sent")
    child.expect_exact(PROMPT)


def reregistered(scripted: ScriptedServer, child: pexpect.spawn, name: str = "alice") -> None:
    """After a drop: the client comes back, is registered anew as ``name`` and types again."""
    child.expect_exact(LOST_LINE)
    scripted.accept()
    hello = scripted.expect("hello")
    scripted.welcome(hello, seq=20, session="tok-2", resumed=False)
    child.expect_exact(f"you are registered again as {name}")
    assert scripted.answer_mode() == 1
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)


def test_the_input_history_typed_before_a_reconnection_is_kept_in_memory_and_on_disk(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer,
        programs: ClientPrograms) -> None:
    """Lines typed before a drop are still recalled by Up after re-registering under the same
    name, and the input-history file holds them all when the client ends."""
    child = scripted.register(spawn, env=FAST)
    child.sendline("1")
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)
    say(scripted, child, "alpha")
    say(scripted, child, "beta")
    scripted.drop()
    reregistered(scripted, child)
    say(scripted, child, "gamma")
    child.send(UP * 3)
    send_recalled(scripted, child, "alpha")
    quit_cleanly(scripted, child)
    assert typed(folder(programs, scripted)) == ["alpha", "beta", "gamma", "alpha", "/quit"]


def test_a_reconnection_under_another_name_switches_to_that_names_input_history(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer,
        programs: ClientPrograms) -> None:
    """Re-registered as alice2 (alice was taken): alice's lines stay in alice's file, Up offers
    alice2's own lines from its file, and what is typed then goes to alice2's file."""
    earlier = folder(programs, scripted, "alice2")
    earlier.mkdir(parents=True, mode=0o700)
    (earlier / "input.history").write_text("from alice2\n")
    child = scripted.register(spawn, env=FAST)
    child.sendline("1")
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)
    say(scripted, child, "by alice")
    scripted.drop()
    child.expect_exact(LOST_LINE)
    scripted.accept()
    hello = scripted.expect("hello")
    scripted.reply(hello, type="error", code="name-taken", message='The name "alice" is taken.')
    child.expect_exact("your name (Enter for an automatic one): ")
    child.sendline("alice2")
    hello = scripted.expect("hello")
    scripted.welcome(hello, seq=20, session="tok-2", resumed=False)
    assert scripted.answer_mode() == 1
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)
    child.send(UP)
    send_recalled(scripted, child, "from alice2")
    quit_cleanly(scripted, child)
    assert typed(folder(programs, scripted)) == ["by alice"]
    assert typed(earlier) == ["from alice2", "/quit"]


@pytest.mark.parametrize("event", ["kicked", "banned"])
def test_a_client_kicked_or_banned_says_so_and_ends_without_reconnecting(
        event: str, spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer,
        programs: ClientPrograms) -> None:
    """A kicked or banned notice about someone else changes nothing; one naming us is shown,
    followed by one line, and the client ends with 1, its session file gone, no reconnection."""
    child = scripted.typing_client(spawn)
    saved = folder(programs, scripted) / "session"
    assert saved.exists()
    bob = {"id": 7, "name": "bob", "title": None, "company": None, "status": "available",
           "mode": 1}
    scripted.send(type="notice", event=event, text=f"bob was {event} by boss", user=bob,
                  by="boss", ts="2026-11-30T05:00:00.000Z", seq=3)
    scripted.send(type="error", code="bad-request", message="marker", ref=None)
    child.expect_exact("server: marker")
    me = dict(bob, id=5, name="alice")
    scripted.send(type="notice", event=event, text=f"alice was {event} by boss: go away",
                  user=me, by="boss", reason="go away", ts="2026-11-30T05:00:01.000Z", seq=4)
    scripted.drop()
    child.expect_exact(f"* alice was {event} by boss: go away\r\n")
    child.expect_exact("you were removed from the chat by boss: not reconnecting\r\n")
    assert ended(child) == 1
    assert "reconnecting (Ctrl-C" not in output(child)
    assert not saved.exists()


def test_a_ban_refusing_the_reconnection_is_said_and_ends_it(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """A reconnection's hello refused with banned: the server's sentence, exit 1, no retry."""
    child, hello = typing_then_dropped(scripted, spawn)
    scripted.reply(hello, type="error", code="banned",
                   message="You are banned from this room by boss.")
    child.expect_exact("the server refused the connection: You are banned from this room by "
                       "boss.\r\n")
    assert ended(child) == 1
    assert output(child).count("reconnecting") == 1


def test_a_full_server_refusing_the_reconnection_is_tried_again(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """A reconnection's hello refused with server-full passes with time: the client tries
    again and comes back."""
    child, hello = typing_then_dropped(scripted, spawn)
    scripted.reply(hello, type="error", code="server-full", message="The server is full.")
    scripted.accept()
    hello = scripted.expect("hello")
    scripted.welcome(hello, seq=20, session="tok-2", resumed=False)
    child.expect_exact("you are registered again as alice")
    assert scripted.answer_mode() == 1
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)
    assert "refused" not in output(child)


def test_the_missed_count_leaves_out_our_own_messages(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """Resumed in mode 1: of the backlog after the last seq seen, our own broadcasts and direct
    messages (by id or by name) are not counted as missed; the others' are."""
    child = scripted.register(spawn, env=FAST, seq=4)
    child.sendline("1")
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)
    for text in ("own 1", "own 2", "own 3"):
        say(scripted, child, text)
    scripted.drop()
    child.expect_exact(LOST_LINE)
    scripted.accept()
    hello = scripted.expect("hello")
    assert (hello["session"], hello["last_seq"]) == ("tok-1", 4)
    scripted.welcome(hello, seq=10, resumed=True)
    assert scripted.answer_mode() == 1
    backlog = scripted.expect("backlog")
    assert backlog["after"] == 4
    own_dm = dict(message(8, "to bob", sender="alice", sender_id=5),
                  to={"id": 7, "name": "bob"})
    scripted.reply(backlog, type="backlog", more=False, events=[
        message(5, "own 1", sender="alice", sender_id=5),
        message(6, "own 2", sender="alice", sender_id=5),
        message(7, "own 3", sender="ALICE", sender_id=9),  # an earlier connection's id
        own_dm,
        message(9, "from bob"),
    ])
    child.expect_exact("reconnected: 1 message missed while away (#view to read them)\r\n")
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)


def test_a_pending_count_waits_until_the_password_questions_are_answered(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """A pending count that comes while /register asks for the password is not printed on the
    question; it is said once, after the questions."""
    child = scripted.typing_client(spawn)
    child.sendline("/register")
    child.expect_exact("new account password: ")
    scripted.send(type="pending", count=25)
    scripted.send(type="ping")
    scripted.expect("pong")  # the receiver has handled the count
    child.sendline("secret words")
    child.expect_exact("the same password again: ")
    child.sendline("secret words")
    child.expect_exact("25 messages waiting: #view to read them\r\n")
    request = scripted.expect("register")
    scripted.reply(request, type="ok", delivered=0, queued=0)
    child.expect_exact("alice is now an account")
    child.expect_exact(PROMPT)
    printed = output(child)
    assert "new account password: \r\nthe same password again: \r\n" in printed
    assert printed.count("25 messages waiting") == 1


def test_ctrl_c_at_a_password_question_ends_its_line_first(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """Ctrl-C at /register's question: the chat prompt comes back on a row of its own."""
    child = scripted.typing_client(spawn)
    child.sendline("/register")
    child.expect_exact("new account password: ")
    child.sendintr()
    child.expect(NEW_PROMPT)
    assert "new account password: type in" not in output(child)


def test_ctrl_c_at_the_login_password_question_says_bye_on_its_own_line(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """Ctrl-C at an account's password question: bye on a row of its own, exit 0."""
    child = spawn("user1", *scripted.args(), "--no-color")
    scripted.accept()
    hello = scripted.expect("hello")
    scripted.reply(hello, type="error", code="password-required", message="A password.",
                   **{"for": "account"})
    child.expect_exact("password for user1: ")
    child.sendintr()
    child.expect_exact("bye\r\n")
    assert ended(child) == 0
    assert "password for user1: \r\nbye\r\n" in output(child)
