"""The chat suite's wire protocols, sans I/O: bytes in, messages out, messages in, bytes out.

This module owns every byte format the server and client speak (SPEC sections 1 and 2):

* the native protocol: one compact JSON object per frame, each frame ended by a NUL byte;
* the line protocol of seed 002 (``HELLO-FROM``, ``SEND``, ``LIST``/``WHO``), one command per line;
* the plain text protocol of seed 001: UTF-8 text frames ended by NUL.

It never touches a socket, a thread or a terminal, so every rule can be tested (and fuzzed) alone.
Its one invariant: whatever bytes a peer sends, the decoders return only well-formed values or
``ProtocolError`` values carrying the SPEC's error code; they never raise on remote input, and they
never keep more than one frame's worth of partial data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

MAX_FRAME = 65_536
"""Largest frame (bytes before its terminator) a peer may send; the server's ``--max-frame``."""

NUL = b"\0"
LF = b"\n"


class ErrorCode(str, Enum):
    """The error codes of SPEC 1.3; the value is what travels on the wire."""

    BAD_FRAME = "bad-frame"
    FRAME_TOO_LARGE = "frame-too-large"
    UNKNOWN_TYPE = "unknown-type"
    BAD_REQUEST = "bad-request"
    NOT_REGISTERED = "not-registered"
    ALREADY_REGISTERED = "already-registered"
    NAME_TAKEN = "name-taken"
    BAD_NAME = "bad-name"
    SERVER_FULL = "server-full"
    NO_SUCH_USER = "no-such-user"
    UNAVAILABLE = "unavailable"


Ref = str | int | None


class ProtocolError(Exception):
    """A remote peer broke the protocol; carries the error code, a sentence and the request's ref."""

    def __init__(self, code: ErrorCode, message: str, ref: Ref = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.kind = kind  # the request's "type", when the frame had one

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ProtocolError)
            and (self.code, self.message, self.ref) == (other.code, other.message, other.ref)
        )

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.ref))

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, ref={self.ref!r})"


# --------------------------------------------------------------------------------------------
# Framing: a delimiter-separated byte stream with a size limit (shared by all three dialects).


@dataclass(frozen=True)
class Oversized:
    """Marks a frame that exceeded the limit; its bytes were discarded up to its terminator."""

    size: int


class Splitter:
    """Incremental splitter: ``feed(bytes)`` returns complete frames, in order, without terminators.

    Like asyncio's ``StreamReader.readuntil`` it remembers how far it searched and has a limit.
    A frame longer than ``max_size`` is not kept: its bytes are counted and dropped as they
    stream in, and an ``Oversized`` marker takes its place once its terminator arrives. So the
    buffer never holds more than ``max_size`` bytes of one frame, however long the stream.
    """

    def __init__(self, delimiter: bytes = NUL, max_size: int = MAX_FRAME) -> None:
        if len(delimiter) != 1:
            raise ValueError("delimiter must be one byte")
        self.delimiter = delimiter
        self.max_size = max_size
        self._buffer = b""
        self._discarding = 0  # bytes dropped so far of an oversized frame, 0 when not discarding

    @property
    def pending(self) -> int:
        """Bytes held of the frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        """Add received bytes; return the frames they complete."""
        out: list[bytes | Oversized] = []
        if self._discarding:
            end = data.find(self.delimiter)
            if end < 0:
                self._discarding += len(data)
                return out
            out.append(Oversized(self._discarding + end))
            self._discarding = 0
            data = data[end + 1 :]
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        parts = data.split(self.delimiter)
        tail = parts.pop()
        limit = self.max_size
        for part in parts:
            out.append(part if len(part) <= limit else Oversized(len(part)))
        if len(tail) > limit:
            self._discarding = len(tail)
        else:
            self._buffer = tail
        return out


# --------------------------------------------------------------------------------------------
# Native protocol values.


UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""Characters that must never reach a terminal or a log as they are: C0 controls, DEL, C1
controls, and the invisible ones that reorder or break lines (bidirectional marks, embeddings,
overrides and isolates, the "Trojan Source" set, and U+2028/U+2029). Both programs show them
visibly, each in its own notation."""


def utc_timestamp(when: float | None = None) -> str:
    """UTC time in ISO 8601 with milliseconds, as in ``2026-11-22T06:00:00.123Z``."""
    moment = datetime.now(UTC) if when is None else datetime.fromtimestamp(when, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode(obj: dict[str, Any]) -> bytes:
    """One native frame: compact JSON, raw UTF-8, then NUL (control characters are escaped)."""
    return _json_encoder.encode(obj).encode("utf-8", "surrogatepass") + NUL


json_string = json.encoder.encode_basestring  # type: ignore[attr-defined]
"""A str as a JSON string literal, raw UTF-8 kept, quotes and control characters escaped (C speed)."""


def encode_json(value: Any) -> str:
    """Compact JSON text of a value (for pre-encoding parts of frames that are sent often)."""
    return _json_encoder.encode(value)


_LIVE_TAIL = b'"queued":false}\0'
_HELD_TAIL = b'"queued":true}\0'


def message_frame(from_json: str, to_json: str, text: str, ts: str) -> bytes:
    """A ``message`` event frame (live), built from pre-encoded parts: the server's hot path.

    ``from_json`` and ``to_json`` are compact JSON (see ``encode_json``); ``queued`` is last so
    that ``held_variant`` can turn the frame into its held form without encoding it again.
    """
    return (
        f'{{"type":"message","from":{from_json},"to":{to_json},'
        f'"text":{json_string(text)},"ts":"{ts}",'
    ).encode() + _LIVE_TAIL


def held_variant(frame: bytes) -> bytes:
    """The same event frame with ``queued`` true (the frame must end in ``"queued":false}``)."""
    if not frame.endswith(_LIVE_TAIL):
        raise ValueError("not a live event frame")
    return frame[: -len(_LIVE_TAIL)] + _HELD_TAIL


def event_frame(obj: dict[str, Any]) -> bytes:
    """An event frame for a ``message`` or ``notice`` object: ``queued`` false, written last."""
    body = dict(obj)
    body.pop("queued", None)
    text = _json_encoder.encode(body)
    return (text[:-1] + ",").encode("utf-8") + _LIVE_TAIL


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_int(text: str) -> int:
    # Python would build a million-digit integer; no field of ours needs more than 18 digits.
    if len(text.lstrip("-")) > 18:
        raise ValueError("number too large")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number too large")
    return value


_json_decoder = json.JSONDecoder(
    parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float
)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _any_surrogate(value: Any) -> bool:
    """True when any string inside a decoded JSON value holds a lone surrogate."""
    if isinstance(value, str):
        return _has_surrogate(value)
    if isinstance(value, dict):
        return any(_any_surrogate(k) or _any_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_any_surrogate(v) for v in value)
    return False


def parse_object(frame: bytes) -> dict[str, Any]:
    """Decode one native frame (without its NUL) to a JSON object with a string ``type``.

    Raises ``ProtocolError``: ``bad-frame`` for anything that is not such an object, and
    ``bad-request`` for text holding a lone surrogate.
    """
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "The frame is not valid UTF-8.") from None
    try:
        obj = _json_decoder.decode(text)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_FRAME, "The frame is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "The frame is not a JSON object.")
    ref = obj.get("ref")
    if not isinstance(ref, (str, int)) or isinstance(ref, bool):
        ref = None
    if not isinstance(obj.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_FRAME, 'The frame has no string "type".', ref)
    # Raw UTF-8 cannot carry a surrogate, only a \u escape can: skip the walk when there is none.
    if "\\u" in text and _any_surrogate(obj):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "The text holds a lone surrogate.", ref)
    return obj


# --------------------------------------------------------------------------------------------
# Requests (client to server).


@dataclass(frozen=True)
class Hello:
    """Register: optional name (None asks for an automatic one), title and company."""

    name: str | None = None
    title: str | None = None
    company: str | None = None
    ref: Ref = None


@dataclass(frozen=True)
class SetMode:
    """Switch to mode 1 (typing) or 2 (viewing)."""

    mode: int
    ref: Ref = None


@dataclass(frozen=True)
class Say:
    """Broadcast text to every other registered client."""

    text: str
    ref: Ref = None


@dataclass(frozen=True)
class Dm:
    """Direct message to a user named by name (str) or id (int)."""

    to: str | int
    text: str
    ref: Ref = None


@dataclass(frozen=True)
class ListUsers:
    """Ask for the list of registered users."""

    ref: Ref = None


@dataclass(frozen=True)
class SetStatus:
    """Set availability; None toggles it."""

    status: str | None = None
    ref: Ref = None


@dataclass(frozen=True)
class Ping:
    """Liveness check (either direction)."""

    ref: Ref = None


@dataclass(frozen=True)
class Pong:
    """Answer to a ``ping``."""

    ref: Ref = None


@dataclass(frozen=True)
class Quit:
    """Leave the room; the server answers ``bye`` and closes."""

    ref: Ref = None


Request = Hello | SetMode | Say | Dm | ListUsers | SetStatus | Ping | Pong | Quit

AVAILABLE = "available"
UNAVAILABLE = "unavailable"


def _field(obj: dict[str, Any], key: str, ref: Ref, *, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'"{key}" must be a string.', ref)
    return value


def _text(obj: dict[str, Any], ref: Ref) -> str:
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        raise ProtocolError(ErrorCode.BAD_REQUEST, '"text" must be a non-empty string.', ref)
    return text


def _parse_hello(obj: dict[str, Any], ref: Ref) -> Request:
    return Hello(
        _field(obj, "name", ref, optional=True),
        _field(obj, "title", ref, optional=True),
        _field(obj, "company", ref, optional=True),
        ref,
    )


def _parse_mode(obj: dict[str, Any], ref: Ref) -> Request:
    mode = obj.get("mode")
    if type(mode) is not int or mode not in (1, 2):  # not True, not 1.0
        raise ProtocolError(ErrorCode.BAD_REQUEST, '"mode" must be 1 or 2.', ref)
    return SetMode(int(mode), ref)


def _parse_dm(obj: dict[str, Any], ref: Ref) -> Request:
    to = obj.get("to")
    if isinstance(to, bool) or not isinstance(to, (str, int)) or to == "":
        raise ProtocolError(ErrorCode.BAD_REQUEST, '"to" must be a name or an id.', ref)
    return Dm(to, _text(obj, ref), ref)


def _parse_status(obj: dict[str, Any], ref: Ref) -> Request:
    status = obj.get("status")
    if status is not None and status not in (AVAILABLE, UNAVAILABLE):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, '"status" must be "available" or "unavailable".', ref
        )
    return SetStatus(status, ref)


_REQUEST_PARSERS = {
    "hello": _parse_hello,
    "mode": _parse_mode,
    "say": lambda obj, ref: Say(_text(obj, ref), ref),
    "dm": _parse_dm,
    "users": lambda obj, ref: ListUsers(ref),
    "status": _parse_status,
    "ping": lambda obj, ref: Ping(ref),
    "pong": lambda obj, ref: Pong(ref),
    "quit": lambda obj, ref: Quit(ref),
}

REQUEST_TYPES = frozenset(_REQUEST_PARSERS)


def parse_request(frame: bytes) -> Request:
    """Decode one native frame into a typed request, or raise ``ProtocolError``."""
    obj = parse_object(frame)
    ref = obj.get("ref")
    if not isinstance(ref, (str, int)) or isinstance(ref, bool):
        ref = None
    kind = obj["type"]
    parser = _REQUEST_PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f'Unknown request type "{kind}".', ref, kind)
    try:
        return parser(obj, ref)
    except ProtocolError as error:
        error.kind = kind
        raise


def request_to_wire(request: Request) -> dict[str, Any]:
    """The JSON object for a request (what a client sends); ``ref`` only when set."""
    kind = {
        Hello: "hello", SetMode: "mode", Say: "say", Dm: "dm", ListUsers: "users",
        SetStatus: "status", Ping: "ping", Pong: "pong", Quit: "quit",
    }[type(request)]
    obj: dict[str, Any] = {"type": kind}
    for key, value in request.__dict__.items():
        if key == "ref" and value is None:
            continue
        if isinstance(request, SetStatus) and key == "status" and value is None:
            continue
        obj[key] = value
    return obj


def encode_request(request: Request) -> bytes:
    """One native frame for a request."""
    return encode(request_to_wire(request))


class RequestDecoder:
    """Native protocol, server side: bytes in, ``Request`` or ``ProtocolError`` values out."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._splitter = Splitter(NUL, max_frame)
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Request | ProtocolError]:
        """Add received bytes; return the requests (or errors) of the frames they complete."""
        out: list[Request | ProtocolError] = []
        for frame in self._splitter.feed(data):
            if isinstance(frame, Oversized):
                out.append(
                    ProtocolError(
                        ErrorCode.FRAME_TOO_LARGE,
                        f"The frame of {frame.size} bytes is over the limit of "
                        f"{self.max_frame} bytes.",
                    )
                )
                continue
            try:
                out.append(parse_request(frame))
            except ProtocolError as error:
                out.append(error)
        return out


class EventDecoder:
    """Native protocol, client side: bytes in, event objects (dicts with a ``type``) out.

    The client trusts the server's structure less than its own: a frame that is not an object
    with a string ``type`` is skipped rather than raised, so a broken server cannot crash it.
    """

    def __init__(self, max_frame: int = 16 * MAX_FRAME) -> None:
        self._splitter = Splitter(NUL, max_frame)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return the events they complete."""
        out = []
        for frame in self._splitter.feed(data):
            if isinstance(frame, Oversized):
                continue
            try:
                out.append(parse_object(frame))
            except ProtocolError:
                continue
        return out


# --------------------------------------------------------------------------------------------
# Names.

NAME_MAX = 32
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}\Z")
RESERVED_NAMES = frozenset({"server", "all"})


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a user name (a sentence), or None when it can (SPEC 1.2)."""
    if not _NAME_RE.match(name):
        return "A name is 1 to 32 characters: ASCII letters, digits, '_', '-' and '.'."
    if name.isdigit():
        return "A name cannot be all digits (those are ids)."
    if name.casefold() in RESERVED_NAMES:
        return f'The name "{name}" is reserved.'
    return None


def parse_target(to: str | int) -> str | int:
    """A ``dm`` target: an int or a string of digits is an id; any other string is a name."""
    if isinstance(to, int):
        return to
    if to.isascii() and to.isdigit():
        return int(to)
    return to


def no_such_user_message(who: str | int) -> str:
    """The sentence of seed 004 for a missing user."""
    return f'User "{who}" is not connected to the server.'
