"""What the chat client shows: sanitising, formatting and colours, pure (no files, no sockets).

Its one invariant: every string that comes from the network goes through ``sanitize`` before it
reaches the terminal or a history file (history.py), so control characters and bidirectional
overrides are shown, never interpreted.
"""

from __future__ import annotations

import re
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


@dataclass(frozen=True)
class Palette:
    """Terminal colours; with ``enabled`` False every method returns its text unchanged."""

    enabled: bool = False

    def paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{Style.RESET_ALL}" if self.enabled else text

    def time(self, text: str) -> str:
        return self.paint(text, Style.DIM)

    def name(self, text: str) -> str:
        return self.paint(text, Fore.CYAN + Style.BRIGHT)

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
    if event.to is None:
        return f"{stamp} {palette.name(sanitize(event.sender.name))}: {text}"
    return (f"{stamp} {palette.direct('[direct]')} {palette.name(describe_user(event.sender))}: "
            f"{text}")


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
        name = sanitize(user.name) + (" (you)" if user.id == own_id else "")
        rows.append((str(user.id), name, sanitize(user.title), sanitize(user.company),
                     sanitize(user.status)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


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
