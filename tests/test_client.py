"""The terminal client: pure helpers in-process, and the real program in a pseudo-terminal.

End-to-end tests run ``python chat_client.py`` under pexpect against a real in-process server
(``start_server``), with raw ``Peer`` clients as the other side. Waits are pexpect expectations
or ``Peer`` reads with deadlines, never sleeps.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pexpect
import pytest
from client_helpers import (
    CHOICE,
    CLIENT,
    PROMPT,
    STAMP,
    SWITCHES,
    TIME,
    ScriptedServer,
    choose_typing,
    command,
    ended,
    output,
)
from conftest import ROOT, Peer, ServerProcess, free_port, leave, take_over_id

import chat_client
from chat_client import ask_address, parse_port
from chatsuite.client.display import (
    Palette,
    describe_user,
    format_delivery,
    format_failure,
    format_message,
    format_notice,
    format_users,
    local_time,
    sanitize,
    use_colour,
)
from chatsuite.client.history import history_line, history_path
from modes import HELP_TEXT
from protocol import Error, Message, Notice, Ok, Target, User

# --------------------------------------------------------------------------------------------
# Pure helpers.


def test_sanitize_shows_c0_controls_in_caret_notation() -> None:
    """ESC, BEL, NUL, TAB, CR and a newline become ^[, ^G, ^@, ^I, ^M and ^J."""
    assert sanitize("a\x1b[2Jb\x07\x00\t\r\n") == "a^[[2Jb^G^@^I^M^J"


def test_sanitize_escapes_del_c1_and_bidi_characters() -> None:
    """DEL, C1 controls and bidirectional marks, overrides and isolates become visible escapes."""
    text = "\x7f\x9b\x85\u202a\u202e\u2066\u2069\u200e\u200f\u2028"
    assert sanitize(text) == r"\x7f\x9b\x85\u202a\u202e\u2066\u2069\u200e\u200f\u2028"


def test_sanitize_keeps_printable_unicode() -> None:
    """Accents, emoji (with their zero-width joiner) and CJK text pass unchanged."""
    assert sanitize("café 👩‍💻 日本") == "café 👩‍💻 日本"


def test_sanitize_replaces_newlines_when_asked() -> None:
    """With ``newline`` given, each newline becomes it and the parts are still sanitised."""
    assert sanitize("one\ntwo\x1b", "\n    ") == "one\n    two^["


def test_sanitize_shows_missing_and_non_text_values() -> None:
    """None prints as a dash and a number as its digits."""
    assert (sanitize(None), sanitize(7)) == ("-", "7")


def test_local_time_converts_utc_to_local_clock() -> None:
    """A server timestamp is shown as local HH:MM:SS; garbage as --:--:--."""
    expected = datetime(2026, 11, 22, 6, 5, 9, tzinfo=UTC).astimezone().strftime("%H:%M:%S")
    assert local_time("2026-11-22T06:05:09.123Z") == expected
    assert local_time("yesterday") == "--:--:--"
    assert local_time(None) == "--:--:--"


TS = "2026-11-22T06:05:09.123Z"


def test_format_broadcast_message() -> None:
    """A broadcast shows time, sender name and text, a newline as an indented continuation."""
    event = Message(User(4, "bob"), None, "hi\nthere", TS)
    assert format_message(event) == f"{local_time(TS)} bob: hi\n    there"


def test_format_direct_message_shows_sender_details() -> None:
    """A direct message also shows the sender's id, title and company (seed 003)."""
    event = Message(User(4, "bob", "CTO", "Acme\x1b"), Target(5, "al"), "psst", TS)
    assert format_message(event) == (
        f"{local_time(TS)} [direct] bob (id 4, title: CTO, company: Acme^[): psst")


def test_describe_user_leaves_out_missing_fields() -> None:
    """A user without title or company is described by name and id only."""
    assert describe_user(User(9, "eve", None, None)) == "eve (id 9)"


def test_format_notice() -> None:
    """A notice shows time, a star and its sentence."""
    assert format_notice(Notice("left", "bob is quitting.", TS)) == (
        f"{local_time(TS)} * bob is quitting.")


def test_format_users_table() -> None:
    """The users table aligns id, name, title, company and status, marking oneself."""
    users = [User(4, "bob", "CTO", None, "available"),
             User(12, "al", None, "Acme", "unavailable")]
    assert format_users(users, own_id=12) == [
        "id  name      title  company  status",
        "4   bob       CTO    -        available",
        "12  al (you)  -      Acme     unavailable",
    ]


def test_format_delivery_and_failure() -> None:
    """A send reports its counts, or the server's reason (seed 004's sentence)."""
    assert format_delivery(Ok(2, 1)) == "message sent (delivered to 2, held for 1)"
    error = Error("no-such-user", 'User "client4" is not connected to the server.')
    assert format_failure(error) == (
        'failed to deliver message because User "client4" is not connected to the server.')


def test_history_path_and_line() -> None:
    """Logs are ``<dir>/<server>/<own name>/<peer>.log`` with one sanitised line per message."""
    assert history_path(Path("/h"), "127.0.0.1_4040", "Alice", "Bob") == Path(
        "/h/127.0.0.1_4040/alice/bob.log")
    when = datetime(2026, 11, 22, 7, 0, 1)
    assert history_line(when, "sent to", "bob", "a\nb\x07") == (
        "2026-11-22 07:00:01 sent to bob: a\\nb^G")


def test_parse_port() -> None:
    """Enter means 4040; a number 1-65535 is a port; anything else is None."""
    assert [parse_port(x) for x in ("", " 80 ", "0", "65536", "http", "٣")] == [
        4040, 80, None, None, None, None]


def test_use_colour_rules() -> None:
    """Colour needs a terminal, no --no-color and no non-empty NO_COLOR."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_colour(False, {}, Tty()) is True
    assert use_colour(True, {}, Tty()) is False
    assert use_colour(False, {"NO_COLOR": "1"}, Tty()) is False
    assert use_colour(False, {"NO_COLOR": ""}, Tty()) is True
    assert use_colour(False, {}, io.StringIO()) is False


def test_palette_off_returns_text_unchanged() -> None:
    """A disabled palette adds no escape sequence."""
    assert Palette(False).bad("x") == "x"
    assert Palette(True).bad("x").startswith("\x1b[")


class FakeTerminal:
    """Answers prompts from a list and records them."""

    def __init__(self, answers: list[str], interactive: bool = True) -> None:
        self.answers = answers
        self.interactive = interactive
        self.prompts: list[str] = []
        self.lines: list[str] = []

    def ask(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)

    def show(self, text: str) -> None:
        self.lines.append(text)


def test_ask_address_takes_defaults_on_enter() -> None:
    """On a terminal, Enter at both prompts gives 127.0.0.1 and 4040."""
    terminal = FakeTerminal(["", ""])
    args = chat_client.parse_args([])
    assert ask_address(args, terminal) == ("127.0.0.1", 4040)  # type: ignore[arg-type]
    assert terminal.prompts == ["server address [127.0.0.1]: ", "server port [4040]: "]


def test_ask_address_uses_defaults_silently_without_terminal() -> None:
    """Without a terminal and without options, the defaults are used and nothing is asked."""
    terminal = FakeTerminal([], interactive=False)
    assert ask_address(chat_client.parse_args([]), terminal) == ("127.0.0.1", 4040)  # type: ignore[arg-type]
    assert terminal.prompts == []


def test_ask_address_only_asks_what_options_lack() -> None:
    """--host given: only the port is asked."""
    terminal = FakeTerminal(["5000"])
    args = chat_client.parse_args(["--host", "10.0.0.1"])
    assert ask_address(args, terminal) == ("10.0.0.1", 5000)  # type: ignore[arg-type]
    assert terminal.prompts == ["server port [4040]: "]


def test_importing_the_client_starts_nothing() -> None:
    """Importing chat_client opens no socket, starts no thread and does not touch the console."""
    code = ("import signal, socket, sys, threading; import chat_client; "
            "print(threading.active_count(), sys.stdout is sys.__stdout__, "
            "signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
            "'readline' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            check=False, text=True, timeout=10)
    assert result.stdout == "1 True True False\n"


# --------------------------------------------------------------------------------------------
# The real program in a pseudo-terminal.


def address(server: Any) -> list[str]:
    host, port = server.address
    return ["--host", host, "--port", str(port)]


def typing_client(spawn: Callable[..., pexpect.spawn], server: Any, *names: str,
                  args: tuple[str, ...] = ("--no-color",), env: dict[str, str] | None = None
                  ) -> pexpect.spawn:
    """A client registered with ``names`` (name, title, company) and waiting in mode 1."""
    child = spawn(*names, *address(server), *args, env=env)
    child.expect_exact("you are now connected to the server")
    child.expect(f"welcome {names[0]}, your id is \\d+ \\(\\d+ online\\)")
    child.expect_exact("1- type in your own message, 2- View other user messages")
    return choose_typing(child)


def registered_peer(connect: Callable[..., Peer], server: Any, name: str,
                    **fields: Any) -> tuple[Peer, int]:
    """A raw peer registered as ``name``, viewing; with its id."""
    peer = connect(server)
    peer_id = peer.register(name, **fields)["id"]
    peer.view()
    return peer, peer_id


def client_id(server: Any, connect: Callable[..., Peer], name: str) -> int:
    """The id the server gave ``name`` (asked by a throwaway peer)."""
    probe = connect(server)
    probe.register(f"probe{free_port()}")
    probe.send({"type": "users", "ref": "u"})
    users = probe.expect("users")["users"]
    return next(user["id"] for user in users if user["name"] == name)


def test_refused_connection_is_a_sentence_and_exit_1(spawn: Callable[..., pexpect.spawn]) -> None:
    """Nothing listening: one clear sentence, exit code 1, no traceback."""
    port = free_port()
    child = spawn("alice", "--host", "127.0.0.1", "--port", str(port), "--no-color")
    child.expect_exact(f"could not connect to the server at 127.0.0.1:{port}: "
                       "the connection was refused (is the server running?)")
    assert ended(child) == 1
    assert "Traceback" not in output(child)


def test_address_prompts_take_default_host_and_retry_bad_port(
        spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """Without options on a terminal it asks host (Enter = 127.0.0.1) and port, re-asking a bad
    port."""
    child = spawn("alice", "--no-color")
    child.expect_exact("server address [127.0.0.1]: ")
    child.sendline("")
    child.expect_exact("server port [4040]: ")
    child.sendline("http")
    child.expect_exact("a port is a number from 1 to 65535")
    child.expect_exact("server port [4040]: ")
    child.sendline(str(server.address[1]))
    child.expect_exact("you are now connected to the server")
    child.expect(r"welcome alice, your id is \d+ \(1 online\)")


def test_name_prompt_retries_on_bad_and_taken_names(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """A bad name and a taken name are explained and asked again; then the welcome is shown."""
    registered_peer(connect, server, "alice")
    child = spawn(*address(server), "--no-color")
    child.expect_exact("you are now connected to the server")
    child.expect_exact("your name (Enter for an automatic one): ")
    child.sendline("bad name!")
    child.expect_exact("your job title (Enter for none): ")
    child.sendline("Engineer")
    child.expect_exact("your company (Enter for none): ")
    child.sendline("Acme")
    child.expect_exact("that name cannot be used: A name is 1 to 32 characters")
    child.expect_exact("your name (Enter for an automatic one): ")
    child.sendline("ALICE")
    child.expect_exact("that name cannot be used: ")
    child.expect_exact("your name (Enter for an automatic one): ")
    child.sendline("carol")
    child.expect(r"welcome carol, your id is \d+ \(2 online\)")
    child.expect(CHOICE)
    assert output(child).count("that name cannot be used") == 2


def test_enter_at_name_prompt_gets_automatic_name(
        spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """Enter at the name prompt registers with the server's automatic name user1."""
    child = spawn(*address(server), "--no-color")
    for prompt in ("your name", "your job title", "your company"):
        child.expect_exact(prompt)
        child.sendline("")
    child.expect(r"welcome user1, your id is \d+ \(1 online\)")


def test_mode_menu_waits_for_1_or_2(spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """Anything but 1 or 2 at the mode menu is refused and asked again."""
    child = spawn("alice", *address(server), "--no-color")
    child.expect(CHOICE)
    child.sendline("3")
    child.expect_exact("please type 1 or 2")
    child.expect(CHOICE)
    child.sendline("1")
    child.expect_exact(PROMPT)


def test_plain_line_broadcasts_and_reports_counts(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """Any other line is broadcast; the client reports delivered and held counts."""
    bob, _ = registered_peer(connect, server, "bob")
    typer = connect(server)
    typer.register("dave")  # stays in mode 1: its copy is held
    child = typing_client(spawn, server, "alice", "Eng", "Acme")
    assert command(child, "hello  all") == "message sent (delivered to 1, held for 1)\n"
    message = bob.wait_for("message")
    assert (message["text"], message["to"], message["from"]["name"]) == (
        "hello  all", None, "alice")
    assert (message["from"]["title"], message["from"]["company"]) == ("Eng", "Acme")


def test_dm_and_bc_commands_reach_the_peer(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """/dm name "text", @id text and /bc "text" send what they say."""
    bob, bob_id = registered_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    assert command(child, '/dm bob "Hello there!"') == "message sent (delivered to 1, held for 0)\n"
    assert command(child, f"@{bob_id} psst") == "message sent (delivered to 1, held for 0)\n"
    assert command(child, '/bc "Hello!"') == "message sent (delivered to 1, held for 0)\n"
    received = [bob.wait_for("message") for _ in range(3)]
    assert [(m["text"], m["to"]) for m in received] == [
        ("Hello there!", {"id": bob_id, "name": "bob"}),
        ("psst", {"id": bob_id, "name": "bob"}),
        ("Hello!", None),
    ]


def test_failed_dm_says_why_with_the_server_sentence(
        spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """A dm to a missing user prints seed 004's sentence after 'failed to deliver message
    because'."""
    child = typing_client(spawn, server, "alice")
    assert command(child, '/dm client4 "Goodbye."') == (
        'failed to deliver message because User "client4" is not connected to the server.\n')


def test_send_asks_receiver_id_then_message(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """``send`` asks 'receiver id:' and 'message:', then sends a direct message (seed 003)."""
    bob, bob_id = registered_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    child.sendline("send")
    child.expect_exact("receiver id: ")
    child.sendline(str(bob_id))
    child.expect_exact("message: ")
    assert command(child, "via send") == "message sent (delivered to 1, held for 0)\n"
    message = bob.wait_for("message")
    assert (message["text"], message["from"]["name"], message["to"]["id"]) == (
        "via send", "alice", bob_id)


def test_send_to_a_reused_id_says_it_is_no_longer_the_user_seen(
        spawn: Callable[..., pexpect.spawn], server_process: Callable[..., ServerProcess],
        connect: Callable[..., Peer]) -> None:
    """``send`` to the id /users showed as alice, now mallory's, delivers nothing and says so."""
    server = server_process()
    alice, alice_id = registered_peer(connect, server, "alice")
    child = typing_client(spawn, server, "carol")
    assert f"{alice_id}" in command(child, "/users")
    leave(alice)
    mallory = take_over_id(connect, server, alice_id, "mallory")
    mallory.view()
    mallory.sync()
    child.sendline("send")
    child.expect_exact("receiver id: ")
    child.sendline(str(alice_id))
    child.expect_exact("message: ")
    assert command(child, "for alice only") == (
        f"failed to deliver message because id {alice_id} is no longer alice: "
        'User "alice" is not connected to the server.\n')
    assert mallory.sync() == []
    child.sendline("send")  # the failure forgot the old name: now the id means mallory
    child.expect_exact("receiver id: ")
    child.sendline(str(alice_id))
    child.expect_exact("message: ")
    assert command(child, "hi") == "message sent (delivered to 1, held for 0)\n"
    assert mallory.wait_for("message")["text"] == "hi"


def test_users_and_who_list_everyone(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """/users and !who print id, name, title, company and status of every user."""
    _, bob_id = registered_peer(connect, server, "bob", title="CTO", company="Acme")
    child = typing_client(spawn, server, "alice")
    alice_id = client_id(server, connect, "alice")
    for line in ("/users", "!who"):
        rows = command(child, line).splitlines()
        assert [row.split() for row in rows[:3]] == [
            ["id", "name", "title", "company", "status"],
            [str(bob_id), "bob", "CTO", "Acme", "available"],
            [str(alice_id), "alice", "(you)", "-", "-", "available"],
        ]


def test_status_and_chs_toggle_availability(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """/status and chs toggle the status, print it, and the server refuses dms meanwhile."""
    bob, _ = registered_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    assert command(child, "/status") == "your status is now unavailable\n"
    bob.send({"type": "dm", "to": "alice", "text": "hi", "ref": 1})
    assert bob.wait_for("error", ref=1)["code"] == "unavailable"
    assert command(child, "chs") == "your status is now available\n"
    bob.send({"type": "dm", "to": "alice", "text": "hi", "ref": 2})
    assert bob.wait_for("ok", ref=2)["queued"] == 1


def test_help_prints_every_command(spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """/help prints modes.HELP_TEXT."""
    child = typing_client(spawn, server, "alice")
    assert command(child, "/help") == HELP_TEXT + "\n"


def test_unknown_slash_command_is_explained(
        spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """A mistyped command is explained rather than broadcast."""
    child = typing_client(spawn, server, "alice")
    assert command(child, "/frobnicate") == (
        "Unknown command /frobnicate; /help lists the commands (// sends a leading /).\n")


@pytest.mark.parametrize("word", ["#quite", "#quit", "/quit", "!quit", "quit"])
def test_quit_words_leave_with_exit_0(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer], word: str
) -> None:
    """Each quit word tells the server (others see 'left'), prints bye and exits 0."""
    bob, _ = registered_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    child.sendline(word)
    child.expect_exact("bye")
    assert ended(child) == 0
    assert bob.wait_for("notice", event="left")["text"] == "alice is quitting."


def test_view_shows_held_then_live_and_single_keys_switch(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """Mode 2 shows held messages, then live ones; e (no Enter) types again, q (no Enter) quits."""
    bob, bob_id = registered_peer(connect, server, "bob", title="CTO", company="Acme")
    child = typing_client(spawn, server, "alice")
    bob.send({"type": "say", "text": "held one", "ref": 1})
    bob.wait_for("ok", ref=1)
    bob.send({"type": "dm", "to": "alice", "text": "held dm", "ref": 2})
    bob.wait_for("ok", ref=2)
    child.sendline("#view")
    child.expect_exact("viewing messages: press e to type, q to quit")
    child.expect(f"{TIME} bob: held one\r\n")
    child.expect(re.escape(f"[direct] bob (id {bob_id}, title: CTO, company: Acme): held dm"))
    bob.send({"type": "say", "text": "live one"})
    child.expect(f"{TIME} bob: live one\r\n")
    carol = connect(server)
    carol.register("carol")
    child.expect(f"{TIME} \\* carol joined the chat.\r\n")
    carol.send({"type": "quit"})
    child.expect(f"{TIME} \\* carol is quitting.\r\n")
    child.send("e")
    child.expect_exact(PROMPT)
    child.sendline("#view")
    child.expect_exact("viewing messages: press e to type, q to quit")
    child.send("q")
    child.expect_exact("bye")
    assert ended(child) == 0
    left = bob.wait_for("notice", event="left", text="alice is quitting.")
    assert left["user"]["name"] == "alice"


def test_view_starts_with_dropped_notice(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any],
        connect: Callable[..., Peer]) -> None:
    """Past the pending limit, viewing starts with the dropped notice and then the newest held."""
    server = start_server(rate=0, pending_limit=2)
    bob, _ = registered_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    for number in range(3):
        bob.send({"type": "say", "text": f"m{number}", "ref": number})
        bob.wait_for("ok", ref=number)
    child.sendline("#view")
    child.expect_exact("viewing messages: press e to type, q to quit\r\n")
    child.expect(f"{TIME} \\* 1 older message was dropped while you were typing.\r\n"
                 f"{TIME} bob: m1\r\n{TIME} bob: m2\r\n")


def test_control_characters_from_the_network_are_shown_not_obeyed(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """ESC, BEL, C1 and bidi overrides in texts are printed visibly, never raw (titles cannot
    hold them: the server refuses them, and describe_user's test shows they are escaped too)."""
    bob, bob_id = registered_peer(connect, server, "bob", title="CTO", company="Acme")
    child = typing_client(spawn, server, "alice")
    child.sendline("#view")
    child.expect_exact("viewing messages: press e to type, q to quit")
    bob.send({"type": "say", "text": "\x1b[2J wipe \x07 ring \x9b1m \u202eevil\x7f"})
    child.expect_exact("bob: ^[[2J wipe ^G ring \\x9b1m \\u202eevil\\x7f\r\n")
    bob.send({"type": "dm", "to": "alice", "text": "two\nlines"})
    child.expect_exact(f"[direct] bob (id {bob_id}, title: CTO, company: Acme): "
                       "two\r\n    lines\r\n")
    printed = output(child)
    for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\x7f"):
        assert raw not in printed


def test_history_after_a_real_dm_exchange(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer],
        tmp_path: Path) -> None:
    """DMs sent and received are logged per peer name; history and /history take a name or id."""
    bob, bob_id = registered_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    command(child, '/dm bob "hi bob"')
    bob.send({"type": "dm", "to": "alice", "text": "hi alice\x07", "ref": 1})
    bob.wait_for("ok", ref=1)
    child.sendline("#view")
    child.expect_exact("hi alice^G")
    child.send("e")
    child.expect_exact(PROMPT)
    child.sendline("history")
    child.expect_exact("user name or id: ")
    logged = command(child, str(bob_id)).splitlines()
    assert len(logged) == 2
    assert re.fullmatch(f"{STAMP} sent to bob: hi bob", logged[0])
    assert re.fullmatch(f"{STAMP} received from bob: hi alice\\^G", logged[1])
    assert command(child, "/history BOB").splitlines() == logged
    assert command(child, f"/history {bob_id}").splitlines() == logged
    assert command(child, "/history 99999") == (
        "nobody has the id 99999 now; give the name to see the history with someone who left\n")
    assert command(child, "/history carol") == "No History\n"
    host, port = server.address
    log_file = tmp_path / "history" / f"{host}_{port}" / "alice" / "bob.log"
    assert log_file.read_text(encoding="utf-8").splitlines() == logged


def test_history_of_unknown_id_is_explained(
        spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """/history with an id nobody has now says so instead of guessing whose log it was."""
    child = typing_client(spawn, server, "alice")
    assert command(child, "/history 4242") == (
        "nobody has the id 4242 now; give the name to see the history with someone who left\n")


def test_colour_is_on_in_a_terminal_by_default(
        spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """Without --no-color or NO_COLOR, a terminal gets coloured output."""
    child = typing_client(spawn, server, "alice", args=())
    assert "\x1b[32mwelcome alice" in output(child)


@pytest.mark.parametrize("args, env", [(("--no-color",), {}), ((), {"NO_COLOR": "1"})],
                         ids=["flag", "env"])
def test_no_color_means_no_escape_sequences(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer],
        args: tuple[str, ...], env: dict[str, str]) -> None:
    """--no-color and NO_COLOR produce output without a single ESC byte."""
    bob, _ = registered_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice", args=args, env=env)
    command(child, "/dm nobody x")
    command(child, "/dm bob x")
    child.sendline("#view")
    child.expect_exact("viewing messages")
    bob.send({"type": "dm", "to": "alice", "text": "hello"})
    child.expect_exact("[direct] bob")
    child.send("q")
    assert ended(child) == 0
    assert "\x1b" not in output(child)


def test_ctrl_c_and_ctrl_d_are_a_chosen_exit(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """Ctrl-C at the mode-1 prompt, Ctrl-D at the menu and Ctrl-C in mode 2 print bye and exit 0."""
    bob, _ = registered_peer(connect, server, "bob")
    first = typing_client(spawn, server, "alice")
    first.sendintr()
    first.expect_exact("bye")
    assert ended(first) == 0
    assert bob.wait_for("notice", event="left")["text"] == "alice is quitting."
    second = spawn("carol", *address(server), "--no-color")
    second.expect(CHOICE)
    second.sendeof()
    second.expect_exact("bye")
    assert ended(second) == 0
    third = typing_client(spawn, server, "dave")
    third.sendline("#view")
    third.expect_exact("viewing messages")
    third.sendintr()
    third.expect_exact("bye")
    assert ended(third) == 0
    for child in (first, second, third):
        assert "Traceback" not in output(child)


@pytest.mark.parametrize("view", [False, True], ids=["typing", "viewing"])
def test_server_stopping_under_a_running_client(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any], view: bool) -> None:
    """With --no-reconnect the shutdown notice is printed at once, then a clear sentence;
    exit 1, no traceback."""
    server = start_server(rate=0)
    child = typing_client(spawn, server, "alice", args=("--no-color", "--no-reconnect"))
    if view:
        child.sendline("#view")
        child.expect_exact("viewing messages: press e to type, q to quit\r\n")
    server.stop()
    child.expect(f"{TIME} \\* The server is shutting down.\r\n")
    # Typing: the notice takes the prompt's row (cleared) and the prompt comes back below it.
    assert child.before == ("" if view else "\r\x1b[K")
    prompt_again = "" if view else re.escape(PROMPT) + SWITCHES + "\r\n"
    child.expect(prompt_again + "connection to the server was closed: the server shut down\r\n")
    assert ended(child) == 1
    assert "Traceback" not in output(child)


def test_full_server_refusal_is_a_sentence_and_exit_1(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any],
        connect: Callable[..., Peer]) -> None:
    """A server-full refusal of the hello is said with the server's reason; exit 1."""
    server = start_server(rate=0, max_clients=1)
    registered_peer(connect, server, "bob")
    child = spawn("alice", *address(server), "--no-color")
    child.expect_exact("the server refused the connection: ")
    assert ended(child) == 1
    assert "Traceback" not in output(child)


@pytest.mark.parametrize("mode, reset", [(1, False), (2, True)],
                         ids=["typing-close", "viewing-reset"])
def test_connection_lost_ends_client_with_exit_1(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer, mode: int,
        reset: bool) -> None:
    """With --no-reconnect a connection closed or reset under the client ends it:
    'connection ... lost', exit 1."""
    child = scripted.register(spawn, "--no-reconnect")
    child.sendline(str(mode))
    assert scripted.answer_mode() == mode
    child.expect_exact(PROMPT if mode == 1 else "viewing messages")
    scripted.drop(reset)
    child.expect_exact("connection to the server was lost\r\n")
    assert ended(child) == 1
    assert "Traceback" not in output(child)


def test_ping_is_answered_with_pong(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """A server ping (with or without ref) gets a pong carrying the same ref."""
    scripted.register(spawn)
    scripted.send(type="ping")
    assert scripted.read() == {"type": "pong"}
    scripted.send(type="ping", ref="hb-7")
    assert scripted.read() == {"type": "pong", "ref": "hb-7"}


def test_piped_input_reads_lines_and_prints_no_colour(server: Any, tmp_path: Path,
                                                      connect: Callable[..., Peer]) -> None:
    """From a pipe the client reads lines (q as a line in mode 2), without colour, and exits 0."""
    bob, _ = registered_peer(connect, server, "bob")
    result = subprocess.run(
        [sys.executable, CLIENT, "carol", *address(server), "--history-dir", str(tmp_path)],
        input="1\nhello pipe\n#view\nq\n", capture_output=True, text=True, timeout=10, check=False,
        env={k: v for k, v in os.environ.items() if k != "NO_COLOR"},
    )
    assert result.returncode == 0
    assert "message sent (delivered to 1, held for 0)\n" in result.stdout
    assert result.stdout.endswith("viewing messages: press e to type, q to quit\nbye\n")
    assert "\x1b" not in result.stdout
    assert result.stderr == ""
    assert bob.wait_for("message")["text"] == "hello pipe"
