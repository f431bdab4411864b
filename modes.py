"""Client modes (seed 000): what typing and viewing mean, for the server and for the client.

* ``Mode``: 1 typing, 2 viewing (the numbers people type and the wire carries).
* the hold's bounds (``PENDING_LIMIT``, ``PENDING_BYTES``) and the ``dropped`` sentence: the
  server's hold itself, a cursor into the room's shared stream, is ``chatsuite.server.members``;
* ``read_typed_line`` / ``read_view_key``: how the client reads what the user types in each mode.

Pure: no sockets, threads or terminal. Invariant: reading a line never raises on what a person
types; it gives a command or the sentence saying what is wrong with it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import IntEnum


class Mode(IntEnum):
    """1 = typing (events are held), 2 = viewing (events are shown live)."""

    TYPING = 1
    VIEWING = 2


PENDING_LIMIT = 10_000
"""Default most events held for one typing client (server ``--pending-limit``)."""

PENDING_BYTES = 4 * 1024 * 1024
"""Most bytes of encoded events held for one typing client."""

def dropped_text(count: int) -> str:
    """The sentence of a ``dropped`` notice."""
    noun = "message was" if count == 1 else "messages were"
    return f"{count} older {noun} dropped while you were typing."


# --------------------------------------------------------------------------------------------
# What the user types, read by the client.


@dataclass(frozen=True)
class Broadcast:
    """Send ``text`` to everybody else."""

    text: str


@dataclass(frozen=True)
class DirectMessage:
    """Send ``text`` to one user, named by name or id."""

    to: str
    text: str


@dataclass(frozen=True)
class SwitchMode:
    """Change to ``mode``."""

    mode: Mode


@dataclass(frozen=True)
class QuitCommand:
    """Tell the server, close and end the program."""


@dataclass(frozen=True)
class HelpCommand:
    """Print every command."""


@dataclass(frozen=True)
class UsersCommand:
    """List users."""


@dataclass(frozen=True)
class StatusCommand:
    """Toggle available / unavailable."""


@dataclass(frozen=True)
class AskSend:
    """``send``: ask for a receiver id, then a message (seed 003)."""


@dataclass(frozen=True)
class HistoryCommand:
    """Show the direct-message log with ``peer``; None means ask for an id."""

    peer: str | None = None


@dataclass(frozen=True)
class BacklogCommand:
    """``/backlog [N]``: show N earlier room messages from the server (None: the default)."""

    count: int | None = None


BACKLOG_MAX = 500  # the most one backlog request returns (SPEC 1.2)


@dataclass(frozen=True)
class RegisterCommand:
    """``/register``: make our name an account (the password is asked without echo)."""


@dataclass(frozen=True)
class PasswordCommand:
    """``/password``: change our account's password (asked without echo)."""


@dataclass(frozen=True)
class ModerateCommand:
    """``/kick``, ``/mute``, ``/unmute``, ``/ban`` (SPEC 7.3): ``action`` is the request type."""

    action: str
    user: str
    reason: str | None = None
    minutes: int | None = None


@dataclass(frozen=True)
class Nothing:
    """An empty line: nothing to do."""


@dataclass(frozen=True)
class Invalid:
    """A command written wrongly; ``reason`` says how to write it."""

    reason: str


Command = (
    Broadcast | DirectMessage | SwitchMode | QuitCommand | HelpCommand | UsersCommand |
    StatusCommand | AskSend | HistoryCommand | BacklogCommand | RegisterCommand |
    PasswordCommand | ModerateCommand | Nothing | Invalid
)

QUIT_WORDS = frozenset({"#quite", "#quit", "/quit", "!quit", "quit"})

HELP_TEXT = """\
Commands (type them at "type in your text:"):
  <text>                 broadcast <text> to everybody
  /bc "text"             broadcast text to everybody
  /dm <user> "text"      direct message to one user (<user> is a name or an id)
  @<user> text           the same, shorter
  send                   direct message: asks for the receiver's id, then the message
  /users  or  !who       list users: id, name, title, company, status
  /status  or  chs       switch between available and unavailable
  history                show the direct messages with a user: asks for a name or id
  /history <user>        the same, with the user given (a name or an id)
  /backlog [N]           show N earlier room messages from the server (default 20)
  #view                  switch to viewing mode (2): see messages; then e = type, q = quit
  /register              make your name an account: asks for a password (not shown)
  /password              change your account's password: asks for the old and the new one
  /kick <user> [reason]  admins: disconnect a user, with an optional reason
  /mute <user> [minutes] admins: the user may not send messages (default 10 minutes)
  /unmute <user>         admins: lift a mute
  /ban <user> [minutes]  admins: disconnect and keep out (default: until the server stops)
  /help                  this list
  #quite, #quit, /quit, !quit, quit
                         leave the chat
Keys: Tab completes commands and user names (again: the next name), Up and Down recall earlier
lines, Ctrl-C cancels the line or question (on an empty line: leave), Ctrl-D leaves."""


def _unquote(text: str) -> str:
    """The text between matching quotes, as seed 004 writes it; otherwise the text unchanged."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _dm_from_command(rest: str) -> Command:
    rest = rest.strip()
    if not rest:
        return Invalid('/dm needs a user and a text: /dm <user> "text"')
    try:
        # shlex reads the quoted text the way a shell would, so "a \"quote\"" works.
        words = shlex.split(rest)
    except ValueError:
        words = []
    target, _, text = rest.partition(" ")
    text = words[1] if len(words) == 2 and words[0] == target else _unquote(text)
    if not text:
        return Invalid(f'/dm {target} needs a text: /dm {target} "text"')
    return DirectMessage(target, text)


def _moderation_from_command(action: str, rest: str) -> Command:
    """``/kick user [reason]``, ``/mute user [minutes]``, ``/unmute user``, ``/ban user [min]``."""
    usage = {"kick": "/kick <user> [reason]", "mute": "/mute <user> [minutes]",
             "unmute": "/unmute <user>", "ban": "/ban <user> [minutes]"}[action]
    user, _, extra = rest.strip().partition(" ")
    extra = extra.strip()
    if not user:
        return Invalid(f"/{action} needs a user: {usage}")
    if action == "kick":
        return ModerateCommand(action, user, reason=extra or None)
    if action == "unmute":
        return ModerateCommand(action, user) if not extra else Invalid(
            f"/unmute takes one user: {usage}")
    if not extra:
        return ModerateCommand(action, user)
    if not (extra.isascii() and extra.isdigit()) or not 1 <= int(extra) <= 527_040:
        return Invalid(f"/{action}: minutes is a whole number from 1 to 527040: {usage}")
    return ModerateCommand(action, user, minutes=int(extra))


def _history_from_command(rest: str) -> Command:
    words = rest.split()
    if not words:
        return Invalid("/history needs a user: /history <name or id>")
    if len(words) > 1:
        return Invalid("/history takes one user: /history <name or id>")
    return HistoryCommand(words[0])


def _backlog_from_command(rest: str) -> Command:
    words = rest.split()
    if not words:
        return BacklogCommand()
    if len(words) == 1 and words[0].isascii() and words[0].isdigit() and (
            1 <= int(words[0]) <= BACKLOG_MAX):
        return BacklogCommand(int(words[0]))
    return Invalid(f"/backlog takes a number of messages from 1 to {BACKLOG_MAX}: /backlog [N]")


# The commands that are a word alone; given anything after it, the word is refused with a
# sentence (``/users extra``), not taken for an unknown command or sent as a message.
_BARE_COMMANDS: dict[str, Command] = {
    "/users": UsersCommand(), "!who": UsersCommand(), "/status": StatusCommand(),
    "/help": HelpCommand(), "/quit": QuitCommand(), "!quit": QuitCommand(),
    "/register": RegisterCommand(), "/password": PasswordCommand(),
}
_BARE_HINTS = {
    "/status": " (it switches between available and unavailable)",
    "/quit": " (it leaves the chat)",
    "!quit": " (it leaves the chat)",
    "/register": " (it asks for the password, which is not shown)",
    "/password": " (it asks for the passwords, which are not shown)",
}

COMMAND_WORDS = (
    "/help", "/users", "/dm", "/bc", "/status", "/history", "/backlog", "/quit", "/register",
    "/password", "/kick", "/mute", "/unmute", "/ban",
    "#view", "#quite", "#quit", "!who", "!quit", "send", "history", "chs", "quit",
)
"""Every command word, for Tab completion (``@<user>`` completes from user names)."""


def _slash_command(line: str, stripped: str, word: str, rest: str) -> Command:
    """A line starting with ``/``, ``!`` or ``@``: a command, or why it cannot be one."""
    lower = word.lower()
    if lower in _BARE_COMMANDS:
        if rest.strip():
            return Invalid(f"{lower} takes no arguments{_BARE_HINTS.get(lower, '')}")
        return _BARE_COMMANDS[lower]
    if lower == "/history":
        return _history_from_command(rest)
    if lower == "/backlog":
        return _backlog_from_command(rest)
    if lower == "/dm":
        return _dm_from_command(rest)
    if lower in ("/kick", "/mute", "/unmute", "/ban"):
        return _moderation_from_command(lower[1:], rest)
    if lower == "/bc":
        text = _unquote(rest)
        return Broadcast(text) if text else Invalid('/bc needs a text: /bc "text"')
    if word.startswith("@") and len(word) > 1:
        text = rest.strip()
        return DirectMessage(word[1:], text) if text else Invalid(
            f"{word} needs a text: {word} text")
    if word.startswith("//"):
        return Broadcast(stripped[1:])  # "//" escapes a text that starts with "/"
    if word.startswith("/") and len(word) > 1:
        return Invalid(f"Unknown command {word}; /help lists the commands (// sends a leading /).")
    return Broadcast(line.rstrip("\r\n"))


def read_typed_line(line: str) -> Command:
    """What a line typed in mode 1 asks for (seed 000, 003, 004 and SPEC 4.4)."""
    stripped = line.strip()
    if not stripped:
        return Nothing()
    if stripped == "#view":
        return SwitchMode(Mode.VIEWING)
    if stripped in QUIT_WORDS:
        return QuitCommand()
    if stripped == "chs":
        return StatusCommand()
    if stripped == "send":
        return AskSend()
    if stripped == "history":
        return HistoryCommand()
    word, _, rest = stripped.partition(" ")
    if word[0] in "/!@" and (word.lower() in _BARE_COMMANDS or word[0] != "!"):
        return _slash_command(line, stripped, word, rest)
    return Broadcast(line.rstrip("\r\n"))


@dataclass(frozen=True)
class ViewAction:
    """What a key (or a line, from a pipe) pressed in mode 2 asks for: None means nothing."""

    mode: Mode | None = None
    quit: bool = False


def read_view_key(key: str) -> ViewAction:
    """``e`` switches to typing, ``q`` quits (seed 000); anything else does nothing."""
    key = key.strip().lower()
    if key == "e":
        return ViewAction(mode=Mode.TYPING)
    if key == "q":
        return ViewAction(quit=True)
    return ViewAction()


def read_mode_choice(text: str) -> Mode | None:
    """The mode menu's answer: ``1`` or ``2``; None for anything else."""
    text = text.strip()
    if text in ("1", "2"):
        return Mode(int(text))
    return None
