"""What the chat client shows: sanitising, formatting and colours, pure (no files, no sockets).

Its one invariant: every string that comes from the network goes through ``sanitize`` before it
reaches the terminal or a history file (history.py), so control characters and bidirectional
overrides are shown, never interpreted.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from colorama import Fore, Style

from protocol import UNSAFE_TEXT, Error, Message, Notice, Ok, User

_UNSAFE = UNSAFE_TEXT  # what is never printed raw: see protocol.UNSAFE_TEXT


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)  # caret notation: ESC is ^[, BEL is ^G
    if code <= 0xFF:
        return f"\\x{code:02x}"  # DEL and C1 (\x9b is a one-byte CSI)
    return f"\\u{code:04x}"


def sanitize(text: Any, newline: str | None = None) -> str:
    """``text`` made safe to print: every control or bidi character shown visibly, never obeyed.

    A newline is shown as ``^J`` unless ``newline`` says what to put in its place.
    """
    if not isinstance(text, str):
        text = "-" if text is None else str(text)
    if newline is None:
        return _UNSAFE.sub(_visible, text)
    return newline.join(_UNSAFE.sub(_visible, part) for part in text.split("\n"))


def local_time(ts: Any, fmt: str = "%H:%M:%S") -> str:
    """A server timestamp (UTC, ISO 8601) as local time; ``--:--:--`` when it is not one."""
    try:
        moment = datetime.fromisoformat(ts)
    except (TypeError, ValueError):
        return "--:--:--"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime(fmt)


BELL = "\a"
"""Rings the terminal: written after a message that names the reader (mode 2, not --no-bell)."""

_NAME_CHAR = "A-Za-z0-9_.\\-"  # what names are made of (SPEC 1.2)


def mentions(text: str, name: str) -> bool:
    """True when ``text`` names ``name`` as a whole word, in any case (``hi Alice!``, ``@alice``;
    not ``malice`` or ``alice2``); a full stop after the name ends the sentence, not the name."""
    pattern = (f"(?<![{_NAME_CHAR}]){re.escape(name)}"
               f"(?![A-Za-z0-9_\\-])(?!\\.[{_NAME_CHAR}])")
    return re.search(pattern, text, re.IGNORECASE) is not None


NAME_COLOURS = (
    Fore.CYAN, Fore.GREEN, Fore.YELLOW, Fore.MAGENTA, Fore.LIGHTBLUE_EX, Fore.LIGHTCYAN_EX,
    Fore.LIGHTGREEN_EX, Fore.LIGHTMAGENTA_EX,
)
"""Colours readable on dark and light backgrounds; red (failures) and white/black are left out."""


def name_colour(name: str) -> str:
    """The colour of a user's name: the same in every run and on every computer (CRC-32 of the
    case-folded name; Python's ``hash`` changes from run to run)."""
    colour: str = NAME_COLOURS[zlib.crc32(name.casefold().encode("utf-8")) % len(NAME_COLOURS)]
    return colour


@dataclass(frozen=True)
class Palette:
    """Terminal colours; with ``enabled`` False every method returns its text unchanged."""

    enabled: bool = False

    def paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{Style.RESET_ALL}" if self.enabled else text

    def time(self, text: str) -> str:
        return self.paint(text, Style.DIM)

    def name(self, text: str, key: str | None = None) -> str:
        """``text`` in the colour of the name ``key`` (default: ``text`` itself is the name)."""
        return self.paint(text, name_colour(text if key is None else key) + Style.BRIGHT)

    def direct(self, text: str) -> str:
        return self.paint(text, Fore.MAGENTA + Style.BRIGHT)

    def notice(self, text: str) -> str:
        return self.paint(text, Fore.YELLOW)

    def good(self, text: str) -> str:
        return self.paint(text, Fore.GREEN)

    def bad(self, text: str) -> str:
        return self.paint(text, Fore.RED + Style.BRIGHT)


def use_colour(no_color_flag: bool, environ: Mapping[str, str], stream: TextIO) -> bool:
    """Colour only on a terminal, without ``--no-color`` and without ``NO_COLOR`` (no-color.org)."""
    if no_color_flag or environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


CONTINUATION = "\n    "
"""What a newline inside a message text becomes on screen: an indented continuation line."""


def describe_user(user: User) -> str:
    """``name (id 5, title: Engineer, company: Acme)``; absent title or company left out."""
    details = [f"id {user.id}"]
    for label, value in (("title", user.title), ("company", user.company)):
        if value:
            details.append(f"{label}: {sanitize(value)}")
    return f"{sanitize(user.name)} ({', '.join(details)})"


def format_message(event: Message, palette: Palette = Palette()) -> str:
    """A ``message`` event as one screen line (continuation lines for newlines in the text)."""
    stamp = palette.time(local_time(event.ts))
    text = sanitize(event.text, CONTINUATION)
    name = sanitize(event.sender.name)
    if event.to is None:
        return f"{stamp} {palette.name(name)}: {text}"
    who = palette.name(describe_user(event.sender), name)
    return f"{stamp} {palette.direct('[direct]')} {who}: {text}"


def format_delivery_line(sender: str, text: str, when: datetime,
                         palette: Palette = Palette()) -> str:
    """A line-protocol ``DELIVERY`` as a direct message: that protocol has no ids or details."""
    stamp = palette.time(when.strftime("%H:%M:%S"))
    return (f"{stamp} {palette.direct('[direct]')} {palette.name(sanitize(sender))}: "
            f"{sanitize(text, CONTINUATION)}")


def format_notice(event: Notice, palette: Palette = Palette()) -> str:
    """A ``notice`` event (joined, left, lost, dropped, shutdown) as one screen line."""
    stamp = palette.time(local_time(event.ts))
    return f"{stamp} {palette.notice('* ' + sanitize(event.text, CONTINUATION))}"


def format_users(users: Sequence[User], own_id: int | None = None) -> list[str]:
    """The ``users`` reply as an aligned table: id, name, title, company, status."""
    header = ("id", "name", "title", "company", "status")
    rows = [header]
    for user in users:
        # SPEC 7: who may moderate, and whose name is an account (only they can use it).
        mark = " (admin)" if user.admin else " (account)" if user.account else ""
        name = sanitize(user.name) + mark + (" (you)" if user.id == own_id else "")
        rows.append((str(user.id), name, sanitize(user.title), sanitize(user.company),
                     sanitize(user.status)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def format_names(names: list[str], own_name: str | None = None) -> list[str]:
    """A line-protocol member list (names only): a header, then one name a line, marking oneself."""
    own = own_name.casefold() if own_name else None
    return [f"users ({len(names)}):"] + [
        "  " + sanitize(name) + (" (you)" if name.casefold() == own else "") for name in names
    ]


def format_delivery(reply: Ok) -> str:
    """The ``ok`` reply to a send, for people."""
    return f"message sent (delivered to {reply.delivered}, held for {reply.queued})"


def format_failure(reply: Error) -> str:
    """An ``error`` reply to a send, with the server's own sentence (seed 004)."""
    return f"failed to deliver message because {sanitize(reply.message)}"
