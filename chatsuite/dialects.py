"""The other two dialects of SPEC 2, sans I/O: seed 002's line protocol and seed 001's plain text.

Like ``protocol`` (which keeps the native protocol and the shared framing), this module never
touches a socket: commands in, replies out, for the server and for the client's ``--protocol
line``. Its one invariant: every byte sequence a peer sends parses to a command or to the reply
it deserves; nothing here raises on remote input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from protocol import LF, NUL, UNSAFE_TEXT

# --------------------------------------------------------------------------------------------
# Neutralising text for peers and logs that print what they get (SPEC 2.1, 2.2, 3).


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """Text with every character of ``protocol.UNSAFE_TEXT`` (control characters, DEL, C1,
    bidirectional controls, line separators) written as a visible escape: ``\\x1b``,
    ``\\u202e``. The one escaping of the server: its log and the line and plain renderings."""
    return UNSAFE_TEXT.sub(_escaped, text)


_NEWLINE = re.compile("\r\n|[\r\n]")


def neutralise(text: str) -> str:
    """Text for a line or plain client: each newline (``\\r\\n``, ``\\n`` or a lone ``\\r``) a
    space, every other unsafe character a visible escape (``escape``)."""
    # The common case, checked in C: every UNSAFE_TEXT character is a control, a format
    # character or a line/paragraph separator, none of which is printable.
    if text.isprintable():
        return text
    return escape(_NEWLINE.sub(" ", text))


# --------------------------------------------------------------------------------------------
# Line protocol of seed 002 (SPEC 2.1), server side and client side.


class LineReply(str, Enum):
    """Fixed replies of the line protocol."""

    IN_USE = "IN-USE"
    BUSY = "BUSY"
    BAD_HEADER = "BAD-RQST-HDR"
    BAD_BODY = "BAD-RQST-BODY"
    SEND_OK = "SEND-OK"
    BAD_DEST = "BAD-DEST-USER"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class LineLogin:
    """``HELLO-FROM <name>``."""

    name: str


@dataclass(frozen=True)
class LineList:
    """``LIST`` (2021 version) or ``WHO`` (2020 version); ``who`` says which was used."""

    who: bool = False


@dataclass(frozen=True)
class LineSend:
    """``SEND <user> <text>``; the text is kept exactly as sent."""

    user: str
    text: str


LineCommand = LineLogin | LineList | LineSend


def parse_line_command(line: bytes) -> LineCommand | LineReply:
    """Read one line (without ``\\n``; a trailing ``\\r`` is ignored) sent by a line client.

    Returns the command, or the error reply it deserves (``BAD-RQST-HDR`` or ``BAD-RQST-BODY``).
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    text = line.decode("utf-8", "replace")
    head, space, body = text.partition(" ")
    if head == "HELLO-FROM":
        name = body.strip(" ")
        if not space or not name or " " in name:
            return LineReply.BAD_BODY
        return LineLogin(name)
    if head in ("LIST", "WHO"):
        return LineReply.BAD_BODY if space else LineList(who=head == "WHO")
    if head == "SEND":
        user, space2, message = body.partition(" ")
        if not space or not user or not space2 or not message:
            return LineReply.BAD_BODY
        return LineSend(user, message)
    return LineReply.BAD_HEADER


def line(text: str) -> bytes:
    """One line-protocol line: UTF-8 text then ``\\n``."""
    return text.encode("utf-8", "replace") + LF


def line_hello(name: str) -> bytes:
    return line(f"HELLO {name}")


def line_list(names: list[str], who: bool = False) -> bytes:
    return line(("WHO-OK " if who else "LIST-OK ") + ",".join(names))


def line_delivery(sender: str, text: str) -> bytes:
    """``DELIVERY <sender> <text>``, the text neutralised (``neutralise``): one line, no raw
    control character, whatever the sender put in it."""
    return line(f"DELIVERY {sender} {neutralise(text)}")


_HTTP_REQUEST_LINE = re.compile(rb"[A-Z]{3,10} \S+ HTTP/\d")


def is_http_request_line(first_line: bytes) -> bool:
    """True for an HTTP request line such as ``POST / HTTP/1.1`` (a browser, not a chat client)."""
    return _HTTP_REQUEST_LINE.match(first_line) is not None


# Client side of the line protocol: what a seed 002 server says.


@dataclass(frozen=True)
class ServerLine:
    """One line from a seed 002 server: a normalised ``kind`` and the rest of the line."""

    kind: str
    body: str = ""


_LINE_KINDS = {
    "HELLO", "IN-USE", "BUSY", "BAD-RQST-HDR", "BAD-RQST-BODY", "LIST-OK", "WHO-OK",
    "SEND-OK", "BAD-DEST-USER", "UNKNOWN", "DELIVERY",
}


def parse_server_line(raw: bytes) -> ServerLine:
    """Read a line from a seed 002 server; underscored variants (``BAD_RQST_HDR``) normalised."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    text = raw.decode("utf-8", "replace")
    head, _, body = text.partition(" ")
    kind = head.replace("_", "-")
    if kind not in _LINE_KINDS:
        return ServerLine("OTHER", text)
    return ServerLine(kind, body)


def split_names(body: str) -> list[str]:
    """Names of a ``LIST-OK``/``WHO-OK`` reply, separated by commas and/or spaces."""
    return [name for name in re.split(r"[,\s]+", body) if name]


def split_delivery(body: str) -> tuple[str, str]:
    """``(sender, text)`` of a ``DELIVERY`` body."""
    sender, _, text = body.partition(" ")
    return sender, text


# --------------------------------------------------------------------------------------------
# Plain text protocol of seed 001 (SPEC 2.2).

PLAIN_QUIT = "q"


def plain_frame(text: str) -> bytes:
    """One plain-protocol frame: the text neutralised (``neutralise``: so no NUL inside), then
    NUL."""
    return neutralise(text).encode("utf-8", "replace") + NUL


def plain_text(frame: bytes) -> str:
    """The text of a plain frame; bytes that are not UTF-8 become U+FFFD."""
    return frame.decode("utf-8", "replace")
