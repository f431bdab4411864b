"""modes.py: the hold queue's bounds and order, and how the client reads what the user types."""

from __future__ import annotations

import pytest

from modes import (
    COMMAND_WORDS,
    AskSend,
    Broadcast,
    DirectMessage,
    HelpCommand,
    HistoryCommand,
    Invalid,
    Mode,
    Nothing,
    QuitCommand,
    StatusCommand,
    SwitchMode,
    UsersCommand,
    ViewAction,
    dropped_text,
    read_mode_choice,
    read_typed_line,
    read_view_key,
)


def test_dropped_text_singular_and_plural() -> None:
    """The dropped notice's sentence agrees with its count."""
    assert dropped_text(1) == "1 older message was dropped while you were typing."
    assert dropped_text(3) == "3 older messages were dropped while you were typing."


# --------------------------------------------------------------------------------------------
# read_typed_line


@pytest.mark.parametrize("line", ["#quite", "#quit", "/quit", "!quit", "quit", "  quit  "])
def test_quit_words(line: str) -> None:
    """Every quit word of the seeds and SPEC 4.4 means quit."""
    assert read_typed_line(line) == QuitCommand()


@pytest.mark.parametrize("line, expected", [
    ("#view", SwitchMode(Mode.VIEWING)),
    ("/help", HelpCommand()),
    ("/HELP", HelpCommand()),
    ("/users", UsersCommand()),
    ("!who", UsersCommand()),
    ("/status", StatusCommand()),
    ("chs", StatusCommand()),
    ("send", AskSend()),
    ("history", HistoryCommand()),
    ("/history bob", HistoryCommand("bob")),
    ("/history 12", HistoryCommand("12")),
    ("", Nothing()),
    ("   ", Nothing()),
])
def test_commands(line: str, expected: object) -> None:
    """Each command word is read as its command."""
    assert read_typed_line(line) == expected


@pytest.mark.parametrize("line, expected", [
    ('/dm client2 "Hello there!"', DirectMessage("client2", "Hello there!")),
    ("/dm 7 'single quotes'", DirectMessage("7", "single quotes")),
    ("/dm bob no quotes at all", DirectMessage("bob", "no quotes at all")),
    ('/dm bob "say \\"hi\\""', DirectMessage("bob", 'say "hi"')),
    ('/dm bob "unbalanced', DirectMessage("bob", '"unbalanced')),
    ("@bob  hi there", DirectMessage("bob", "hi there")),
    ("@12 yo", DirectMessage("12", "yo")),
])
def test_direct_messages(line: str, expected: DirectMessage) -> None:
    """/dm <user> "text" and @<user> text name the user and carry the text (quotes removed)."""
    assert read_typed_line(line) == expected


@pytest.mark.parametrize("line, expected", [
    ('/bc "Hello!"', Broadcast("Hello!")),
    ("/bc plain words", Broadcast("plain words")),
    ("hello  world ", Broadcast("hello  world ")),
    ("//etc/passwd is a path", Broadcast("/etc/passwd is a path")),
    ("#views", Broadcast("#views")),
    ("@", Broadcast("@")),
])
def test_broadcasts(line: str, expected: Broadcast) -> None:
    """/bc and any other line broadcast; // escapes a leading slash; spaces inside are kept."""
    assert read_typed_line(line) == expected


@pytest.mark.parametrize("line, reason", [
    ("/dm", '/dm needs a user and a text: /dm <user> "text"'),
    ("/dm bob", '/dm bob needs a text: /dm bob "text"'),
    ('/dm bob ""', '/dm bob needs a text: /dm bob "text"'),
    ("/bc", '/bc needs a text: /bc "text"'),
    ("@bob", "@bob needs a text: @bob text"),
    ("/history", "/history needs a user: /history <name or id>"),
    ("/history bob carol", "/history takes one user: /history <name or id>"),
    ("/nope", "Unknown command /nope; /help lists the commands (// sends a leading /)."),
])
def test_invalid_commands_say_how_to_write_them(line: str, reason: str) -> None:
    """A command written wrongly is refused with its usage, not broadcast."""
    assert read_typed_line(line) == Invalid(reason)


@pytest.mark.parametrize("line, reason", [
    ("/users extra", "/users takes no arguments"),
    ("/USERS  all of them", "/users takes no arguments"),
    ("!who me", "!who takes no arguments"),
    ("/help me", "/help takes no arguments"),
    ("/status xyz", "/status takes no arguments (it switches between available and unavailable)"),
    ("/quit now", "/quit takes no arguments (it leaves the chat)"),
    ("!quit now", "!quit takes no arguments (it leaves the chat)"),
])
def test_bare_commands_given_arguments_say_so(line: str, reason: str) -> None:
    """A command that takes nothing, given something, says exactly that (not "Unknown command")."""
    assert read_typed_line(line) == Invalid(reason)


@pytest.mark.parametrize("line, expected", [
    ("/Users", UsersCommand()),
    ("/STATUS", StatusCommand()),
    ("/Quit", QuitCommand()),
    ("quit now", Broadcast("quit now")),
    ("!hello", Broadcast("!hello")),
    ("/", Broadcast("/")),
])
def test_command_words_ignore_case_and_plain_words_stay_messages(
        line: str, expected: object) -> None:
    """Slash commands are read in any case; a quit word with more text, or ! alone, is a message."""
    assert read_typed_line(line) == expected


def test_every_command_word_is_offered_for_completion() -> None:
    """COMMAND_WORDS holds each word read_typed_line knows, so Tab can complete all of them."""
    for word in COMMAND_WORDS:
        read = read_typed_line(word)
        assert not isinstance(read, Broadcast), word
        assert not (isinstance(read, Invalid) and read.reason.startswith("Unknown")), word
    assert {"/help", "/users", "/dm", "/bc", "/status", "/history", "/quit", "#view",
            "#quite"} <= set(COMMAND_WORDS)


# --------------------------------------------------------------------------------------------
# read_view_key and read_mode_choice


@pytest.mark.parametrize("key, expected", [
    ("e", ViewAction(mode=Mode.TYPING)),
    ("E", ViewAction(mode=Mode.TYPING)),
    ("e\n", ViewAction(mode=Mode.TYPING)),
    ("q", ViewAction(quit=True)),
    ("Q\n", ViewAction(quit=True)),
    ("x", ViewAction()),
    ("", ViewAction()),
    ("quit", ViewAction()),
])
def test_view_keys(key: str, expected: ViewAction) -> None:
    """In mode 2, e types, q quits (a key or a line from a pipe), anything else does nothing."""
    assert read_view_key(key) == expected


@pytest.mark.parametrize("text, expected", [
    ("1", Mode.TYPING), ("2", Mode.VIEWING), (" 2\n", Mode.VIEWING),
    ("3", None), ("", None), ("one", None), ("12", None),
])
def test_mode_choice(text: str, expected: Mode | None) -> None:
    """The mode menu accepts 1 or 2 and nothing else."""
    assert read_mode_choice(text) == expected
