"""The chat suite's native protocol, sans I/O: bytes in, typed values out, and back again.

This module owns the native protocol of SPEC section 1, symmetric like h11 and wsproto:

* framing: one compact JSON object per frame, each ended by a NUL byte (``Splitter``, shared
  with the line and plain dialects, whose codecs live in ``chatsuite/dialects.py``);
* every request (``Hello``, ``Say``, ``Dm``, ...) and every event (``Welcome``, ``Ok``,
  ``Error``, ``Message``, ``Notice``, ...) as a frozen dataclass, with one encoder
  (``encode_event``, also ``encode_request``) and one parser each way (``RequestDecoder`` on the
  server, ``EventDecoder`` on the client); the server's hot path (``message_frame``,
  ``held_variant``) writes the same bytes as ``encode_event(Message(...))``, once per broadcast;
* the two error families: ``ProtocolError`` (the peer broke the protocol) and ``Refusal`` (a
  well-formed request the room refuses), both carrying code, sentence and ref;
* ``sniff``: which of the three dialects a connection speaks, from its first bytes (SPEC 2).

It never touches a socket, a thread or a terminal, so every rule can be tested (and fuzzed) alone.
Its one invariant: whatever bytes a peer sends, the decoders return only well-formed values or
``ProtocolError`` values carrying the SPEC's error code (the client's: ``UnknownEvent``); they
never raise on remote input, and they never keep more than one frame's worth of partial data.

Length: past STYLE's ~500 lines on purpose. Issue 10 asks for every request and event here,
and SPEC 6 and 7 added a dozen more (backlog, register, password, the moderation requests, the
durable room's fields): each is a small dataclass with its parser, and a reader of the wire
protocol finds them all in one file. This module must stay at the top of the repository and
import only the standard library (STYLE), so it cannot hand part of itself to ``chatsuite``;
the split, when it comes, is this module becoming a package of the same name (framing and
sniffing, requests, events), with no change for its importers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from types import NoneType
from typing import Any, ClassVar

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
    # Access (SPEC 7): password-required and bad-password carry "for"; too-many-attempts
    # carries "retry_after".
    PASSWORD_REQUIRED = "password-required"
    BAD_PASSWORD = "bad-password"
    TOO_MANY_ATTEMPTS = "too-many-attempts"
    NOT_ALLOWED = "not-allowed"
    MUTED = "muted"
    BANNED = "banned"


Ref = str | int | None


class ChatError(Exception):
    """An error reply in waiting: the code, a sentence for people and the request's ref."""

    def __init__(self, code: ErrorCode, message: str, ref: Ref = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, ChatError) and (
            (self.code, self.message, self.ref) == (other.code, other.message, other.ref))

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.ref))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r}, ref={self.ref!r})"


class ProtocolError(ChatError):
    """The peer broke the protocol (bad-frame, frame-too-large, bad-request, unknown-type, ...)."""

    def __init__(self, code: ErrorCode, message: str, ref: Ref = None,
                 kind: str | None = None) -> None:
        super().__init__(code, message, ref)
        self.kind = kind  # the request's "type", when the frame had one


class Refusal(ChatError):
    """A well-formed request the room refuses (name-taken, no-such-user, server-full, ...).

    ``for_`` ("server" or "account") goes with password-required and bad-password, and
    ``retry_after`` (whole seconds) with too-many-attempts (SPEC 1.3).
    """

    def __init__(self, code: ErrorCode, message: str, ref: Ref = None, *,
                 for_: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(code, message, ref)
        self.for_ = for_
        self.retry_after = retry_after

    def fields(self) -> dict[str, str | int]:
        """The ``error`` frame's fields but ``type`` and ``ref``: ``for``/``retry_after`` if set."""
        out: dict[str, str | int] = {"code": self.code.value, "message": self.message}
        if self.for_ is not None:
            out["for"] = str(self.for_)
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and isinstance(other, Refusal) and (
            (self.for_, self.retry_after) == (other.for_, other.retry_after))

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.ref, self.for_, self.retry_after))

    def __repr__(self) -> str:
        return (f"Refusal({self.code.value!r}, {self.message!r}, ref={self.ref!r}, "
                f"for_={self.for_!r}, retry_after={self.retry_after!r})")


# --------------------------------------------------------------------------------------------
# Framing: a delimiter-separated byte stream with a size limit (shared by all three dialects).


HEAD = 256  # bytes kept of an oversized frame's start: enough to show its "ref"


@dataclass(frozen=True)
class Oversized:
    """Marks a frame that exceeded the limit; its bytes were discarded up to its terminator."""

    size: int
    head: bytes = field(default=b"", compare=False)  # its first bytes (at most ``HEAD``)


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
        self._head = b""  # the first bytes of the oversized frame being dropped

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
            out.append(Oversized(self._discarding + end, self._head))
            self._discarding, self._head = 0, b""
            data = data[end + 1 :]
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        parts = data.split(self.delimiter)
        tail = parts.pop()
        limit = self.max_size
        for part in parts:
            out.append(part if len(part) <= limit else Oversized(len(part), part[:HEAD]))
        if len(tail) > limit:
            self._discarding, self._head = len(tail), tail[:HEAD]
        else:
            self._buffer = tail
        return out


# --------------------------------------------------------------------------------------------
# Native protocol values.


UNSAFE_TEXT = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
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


json_string = json.encoder.encode_basestring
"""A str as a JSON string literal, raw UTF-8 kept, quotes and controls escaped (C speed)."""


def encode_json(value: Any) -> str:
    """Compact JSON text of a value (for pre-encoding parts of frames that are sent often)."""
    return _json_encoder.encode(value)


_LIVE_TAIL = b'"queued":false}\0'
_HELD_TAIL = b'"queued":true}\0'


def message_frame(from_json: str, to_json: str, text: str, ts: str,
                  seq: int | None = None) -> bytes:
    """A ``message`` event frame (live), built from pre-encoded parts: the server's hot path.

    ``from_json`` and ``to_json`` are compact JSON (see ``encode_json``); ``seq`` is the room's
    sequence number (SPEC 6.1; None: not written); ``queued`` is last so that ``held_variant``
    can turn the frame into its held form without encoding it again.
    """
    numbered = "" if seq is None else f'"seq":{seq:d},'
    return (
        f'{{"type":"message","from":{from_json},"to":{to_json},'
        f'"text":{json_string(text)},"ts":"{ts}",{numbered}'
    ).encode() + _LIVE_TAIL


def held_variant(frame: bytes) -> bytes:
    """The same event frame with ``queued`` true (the frame must end in ``"queued":false}``)."""
    if not frame.endswith(_LIVE_TAIL):
        raise ValueError("not a live event frame")
    return frame[: -len(_LIVE_TAIL)] + _HELD_TAIL


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
    """True when any string inside a decoded JSON value holds a lone surrogate.

    A walk with its own stack, not recursion: the JSON decoder accepts nesting almost as deep as
    Python's recursion limit, and a recursive walk on top of it would overflow that limit.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_object(frame: bytes) -> dict[str, Any]:
    """Decode one native frame (without its NUL) to a JSON object with a string ``type``.

    Raises ``ProtocolError``: ``bad-frame`` for anything that is not such an object, and
    ``bad-request`` for text holding a lone surrogate.
    """
    # A frame that cannot be read may still show its ref at its start (SPEC 1.3: the error
    # carries it, so the client waiting for that reply does not wait in vain).
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "The frame is not valid UTF-8.",
                            _ref_in_head(frame[:HEAD])) from None
    try:
        obj = _json_decoder.decode(text)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_FRAME, "The frame is not valid JSON.",
                            _ref_in_head(frame[:HEAD])) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "The frame is not a JSON object.")
    ref = _ref_of(obj)
    if not isinstance(obj.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_FRAME, 'The frame has no string "type".', ref)
    # Raw UTF-8 cannot carry a surrogate, only a \u escape can: skip the walk when there is none.
    if "\\u" in text and _any_surrogate(obj):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "The text holds a lone surrogate.", ref)
    return obj


# --------------------------------------------------------------------------------------------
# Typed values: requests (client to server) and events (server to client), frozen dataclasses.
# ``TYPE`` is the wire's "type"; ``wire()`` is the JSON object, fields in declaration order,
# ``ref`` only when set (an error always has one, maybe null).

AVAILABLE = "available"
UNAVAILABLE = "unavailable"


class _Wire:
    TYPE: ClassVar[str]

    def wire(self) -> dict[str, Any]:
        """The JSON object for this value (what travels, before framing)."""
        obj: dict[str, Any] = {"type": self.TYPE}
        for key, value in self.__dict__.items():
            if value is None and key in _OMIT_NONE:
                continue
            obj[_WIRE_NAMES.get(key, key)] = (
                value.wire() if isinstance(value, User)
                else [item.wire() if isinstance(item, User) else item for item in value]
                if isinstance(value, tuple) else value)
        return obj


_OMIT_NONE = frozenset({
    "ref", "status", "name", "title", "company", "user", "count",
    # The durable room (SPEC 6) and access (SPEC 7): written only when set.
    "session", "last_seq", "server_password", "password", "before", "after", "seq",
    "from_seq", "to_seq", "by", "reason", "minutes",
})
_WIRE_NAMES = {"sender": "from"}


@dataclass(frozen=True)
class User:
    """The wire's ``user`` object (SPEC 1.2)."""

    id: int
    name: str
    title: str | None = None
    company: str | None = None
    status: str = AVAILABLE
    mode: int = 1
    connected: bool = True  # False: within its resume window (SPEC 6.4), written only then
    account: bool = False  # logged in to an account (SPEC 7.2), written only when true
    admin: bool = False  # may moderate (SPEC 7.3), written only when true

    def wire(self) -> dict[str, Any]:
        obj = dict(self.__dict__)
        if self.connected:
            del obj["connected"]
        if not self.account:
            del obj["account"]
        if not self.admin:
            del obj["admin"]
        return obj

    @classmethod
    def parse(cls, obj: Any) -> User:
        """A user from its JSON object; ``ValueError`` when it is not one."""
        if not isinstance(obj, dict):
            raise ValueError("not a user")
        return cls(_of(obj, "id", int), _of(obj, "name", str), _of(obj, "title", str, None),
                   _of(obj, "company", str, None), _of(obj, "status", str, AVAILABLE),
                   _of(obj, "mode", int, 1), _of(obj, "connected", bool, True),
                   _of(obj, "account", bool, False), _of(obj, "admin", bool, False))


_MISSING: Any = object()


def _of(obj: dict[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    """``obj[key]`` when it has type ``kind`` (bool is no int); else the default or ValueError."""
    value = obj.get(key)
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    if default is not _MISSING and value is None:
        return default
    raise ValueError(f"bad {key!r}")


@dataclass(frozen=True)
class Hello(_Wire):
    """Register: optional name (None asks for an automatic one), title and company.

    ``session`` and ``last_seq`` resume a session (SPEC 6.4); ``server_password`` is the room's
    key (7.1) and ``password`` the account's (7.2): never shown by ``repr``.
    """
    TYPE = "hello"
    name: str | None = None
    title: str | None = None
    company: str | None = None
    ref: Ref = None
    session: str | None = field(default=None, repr=False)
    last_seq: int | None = None
    server_password: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SetMode(_Wire):
    """Switch to mode 1 (typing) or 2 (viewing)."""
    TYPE = "mode"
    mode: int
    ref: Ref = None


@dataclass(frozen=True)
class Say(_Wire):
    """Broadcast text to every other registered client."""
    TYPE = "say"
    text: str
    ref: Ref = None


@dataclass(frozen=True)
class Dm(_Wire):
    """Direct message to a user named by name or id; ``name``: who the sender believes the id is."""
    TYPE = "dm"
    to: str | int
    text: str
    ref: Ref = None
    name: str | None = None


@dataclass(frozen=True)
class ListUsers(_Wire):
    """Ask for the list of registered users."""
    TYPE = "users"
    ref: Ref = None


@dataclass(frozen=True)
class SetStatus(_Wire):
    """Set availability; None toggles it."""
    TYPE = "status"
    status: str | None = None
    ref: Ref = None


@dataclass(frozen=True)
class Ping(_Wire):
    """Liveness check, either direction (a request, and the server's event)."""
    TYPE = "ping"
    ref: Ref = None


@dataclass(frozen=True)
class Pong(_Wire):
    """Answer to a ``ping``, either direction."""
    TYPE = "pong"
    ref: Ref = None


@dataclass(frozen=True)
class Quit(_Wire):
    """Leave the room; the server answers ``bye`` and closes."""
    TYPE = "quit"
    ref: Ref = None


BACKLOG_LIMIT = 50  # SPEC 6.3: the default page, and at most BACKLOG_MAX
BACKLOG_MAX = 500


@dataclass(frozen=True)
class BacklogRequest(_Wire):
    """Logged events (SPEC 6.3): just before ``before``, just after ``after``, else the latest."""
    TYPE = "backlog"
    before: int | None = None
    after: int | None = None
    limit: int = BACKLOG_LIMIT
    ref: Ref = None


@dataclass(frozen=True)
class Register(_Wire):
    """Make the current name an account with this password (SPEC 7.2)."""
    TYPE = "register"
    password: str = field(repr=False)
    ref: Ref = None


@dataclass(frozen=True)
class ChangePassword(_Wire):
    """Change the account's password (SPEC 7.2)."""
    TYPE = "password"
    old: str = field(repr=False)
    new: str = field(repr=False)
    ref: Ref = None


@dataclass(frozen=True)
class Moderation(_Wire):
    """An admin's action on a user (SPEC 7.3); one subclass per wire type."""
    to: str | int
    reason: str | None = None
    minutes: int | None = None
    ref: Ref = None


@dataclass(frozen=True)
class Kick(Moderation):
    """Disconnect ``to`` (its session ends, not kept)."""
    TYPE = "kick"


@dataclass(frozen=True)
class Mute(Moderation):
    """Refuse ``to``'s say and dm for ``minutes`` (default 10)."""
    TYPE = "mute"


@dataclass(frozen=True)
class Unmute(Moderation):
    """Lift a mute."""
    TYPE = "unmute"


@dataclass(frozen=True)
class Ban(Moderation):
    """Keep ``to``'s account (or address) out for ``minutes`` (default: until the server stops)."""
    TYPE = "ban"


Request = (Hello | SetMode | Say | Dm | ListUsers | SetStatus | Ping | Pong | Quit
           | BacklogRequest | Register | ChangePassword | Kick | Mute | Unmute | Ban)


@dataclass(frozen=True)
class Welcome(_Wire):
    """Registered: who we are, how many are online, the server's frame limit, and (SPEC 6, 7)
    the room's latest ``seq``, the resume token, whether this resumed a session, admin or not."""
    TYPE = "welcome"
    user: User
    online: int
    max_frame: int = MAX_FRAME
    ref: Ref = None
    seq: int = 0
    session: str | None = field(default=None, repr=False)
    resumed: bool = False
    admin: bool = False

    def wire(self) -> dict[str, Any]:
        obj = {"type": self.TYPE, **self.user.wire(), "online": self.online,
               "max_frame": self.max_frame, "seq": self.seq, "resumed": self.resumed,
               "admin": self.admin}
        if self.session is not None:
            obj["session"] = self.session
        if self.ref is not None:
            obj["ref"] = self.ref
        return obj


@dataclass(frozen=True)
class Ok(_Wire):
    """A message went out: recipients that got it live, and those holding it."""
    TYPE = "ok"
    delivered: int
    queued: int
    ref: Ref = None

    def wire(self) -> dict[str, Any]:
        # Spelled out: an ``ok`` answers every say, so it is on the message path.
        obj = {"type": "ok", "delivered": self.delivered, "queued": self.queued}
        if self.ref is not None:
            obj["ref"] = self.ref
        return obj


def ok_frames(ok: Ok, refs: list[Ref]) -> bytes:
    """The ``ok`` frames answering a run of says, one per ref, spelled out: the same bytes as
    ``encode_event(replace(ok, ref=ref))`` for each (an ``ok`` answers every say: hot path)."""
    head = b'{"type":"ok","delivered":%d,"queued":%d' % (ok.delivered, ok.queued)
    plain = head + b"}\0"
    return b"".join(
        plain if ref is None else head + b',"ref":' + (
            json_string(ref) if isinstance(ref, str) else str(ref)).encode() + b"}\0"
        for ref in refs)


@dataclass(frozen=True)
class Error(_Wire):
    """A request failed, or a frame was bad: the code (``ErrorCode`` value), a sentence, the ref."""
    TYPE = "error"
    code: str
    message: str
    ref: Ref = None
    for_: str | None = None  # "server" or "account": password-required, bad-password
    retry_after: int | None = None  # seconds: too-many-attempts

    def wire(self) -> dict[str, Any]:
        obj = {"type": self.TYPE, "code": self.code, "message": self.message, "ref": self.ref}
        if self.for_ is not None:
            obj["for"] = self.for_
        if self.retry_after is not None:
            obj["retry_after"] = self.retry_after
        return obj

    @classmethod
    def of(cls, error: ChatError) -> Error:
        """The reply to a ``ProtocolError`` or ``Refusal``: the one place either becomes data."""
        if isinstance(error, Refusal):
            return cls(error.code.value, error.message, error.ref, error.for_, error.retry_after)
        return cls(error.code.value, error.message, error.ref)


@dataclass(frozen=True)
class Users(_Wire):
    """The registered users, in registration order."""
    TYPE = "users"
    users: tuple[User, ...]
    ref: Ref = None


@dataclass(frozen=True)
class ModeChanged(_Wire):
    """The reply to ``mode``."""
    TYPE = "mode"
    mode: int
    ref: Ref = None


@dataclass(frozen=True)
class StatusChanged(_Wire):
    """The reply to ``status``: the status now."""
    TYPE = "status"
    status: str
    ref: Ref = None


@dataclass(frozen=True)
class Bye(_Wire):
    """The reply to ``quit``; the server closes next."""
    TYPE = "bye"
    ref: Ref = None


@dataclass(frozen=True)
class Pending(_Wire):
    """How many events the server holds for us while we type."""
    TYPE = "pending"
    count: int


@dataclass(frozen=True)
class Target(_Wire):
    """The ``to`` of a direct message: {id, name}."""

    id: int
    name: str


@dataclass(frozen=True)
class Message(_Wire):
    """A chat message; ``to`` None for a broadcast; ``queued`` written last (``held_variant``)."""
    TYPE = "message"
    sender: User
    to: Target | None
    text: str
    ts: str
    queued: bool = False
    seq: int | None = None  # SPEC 6.1: written before ``queued``, which stays last

    def wire(self) -> dict[str, Any]:
        to = None if self.to is None else {"id": self.to.id, "name": self.to.name}
        obj: dict[str, Any] = {"type": self.TYPE, "from": self.sender.wire(), "to": to,
                               "text": self.text, "ts": self.ts}
        if self.seq is not None:
            obj["seq"] = self.seq
        obj["queued"] = self.queued
        return obj


@dataclass(frozen=True)
class Notice(_Wire):
    """Something happened (joined, left, lost, back, kicked, muted, unmuted, banned, dropped,
    gap, shutdown); room events carry ``seq`` (SPEC 6.1), a ``gap`` its ``from_seq``/``to_seq``,
    a moderation notice ``by`` (the admin) and ``reason``; ``queued`` is written last."""
    TYPE = "notice"
    event: str
    text: str
    ts: str
    user: User | None = None
    count: int | None = None
    from_seq: int | None = None
    to_seq: int | None = None
    by: str | None = None
    reason: str | None = None
    seq: int | None = None
    queued: bool = False


@dataclass(frozen=True)
class Backlog(_Wire):
    """The reply to ``backlog``: logged events, oldest first; ``more`` past ``limit``."""
    TYPE = "backlog"
    events: tuple[Message | Notice, ...]
    more: bool
    ref: Ref = None

    def wire(self) -> dict[str, Any]:
        obj = {"type": self.TYPE, "events": [event.wire() for event in self.events],
               "more": self.more}
        if self.ref is not None:
            obj["ref"] = self.ref
        return obj


@dataclass(frozen=True)
class UnknownEvent:
    """An event this client does not know, or a known one it could not read: kept, not obeyed."""

    type: str
    fields: dict[str, Any] = field(compare=False)

    @property
    def ref(self) -> Ref:
        ref = self.fields.get("ref")
        return ref if isinstance(ref, (str, int)) and not isinstance(ref, bool) else None


Event = (Welcome | Ok | Error | Users | ModeChanged | StatusChanged | Pong | Bye | Ping | Message
         | Notice | Pending | Backlog | UnknownEvent)


def encode_event(event: _Wire) -> bytes:
    """One native frame for an event or a request (the server's and the client's ``send``)."""
    return encode(event.wire())


encode_request = encode_event


# --------------------------------------------------------------------------------------------
# Parsing: requests (server side: strict, errors are data) and events (client side: tolerant).


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


DETAIL_MAX = 64  # title and company (SPEC 1.2): 32 KB of title made a 27-byte say 64 KB


def _detail(obj: dict[str, Any], key: str, ref: Ref) -> str | None:
    value: str | None = _field(obj, key, ref, optional=True)
    if value is not None and (len(value) > DETAIL_MAX or UNSAFE_TEXT.search(value)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'"{key}" must be at most {DETAIL_MAX} '
                            "characters, with no control characters.", ref)
    return value


def _count(obj: dict[str, Any], key: str, ref: Ref, low: int = 0,
           high: int = 2**63 - 1) -> int | None:
    """An optional whole number from ``low`` to ``high`` (not a bool, not a float)."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'"{key}" must be a whole number from {low} to {high}.', ref)
    return value


def _password(obj: dict[str, Any], key: str, ref: Ref, *, optional: bool = False) -> Any:
    """A password field: a string (its rules, length included, are the room's: SPEC 7)."""
    return _field(obj, key, ref, optional=optional)


def _parse_hello(obj: dict[str, Any], ref: Ref) -> Request:
    return Hello(_field(obj, "name", ref, optional=True), _detail(obj, "title", ref),
                 _detail(obj, "company", ref), ref,
                 session=_field(obj, "session", ref, optional=True),
                 last_seq=_count(obj, "last_seq", ref),
                 server_password=_password(obj, "server_password", ref, optional=True),
                 password=_password(obj, "password", ref, optional=True))


def _parse_backlog(obj: dict[str, Any], ref: Ref) -> Request:
    limit = _count(obj, "limit", ref, 1, BACKLOG_MAX)
    return BacklogRequest(_count(obj, "before", ref), _count(obj, "after", ref),
                          BACKLOG_LIMIT if limit is None else limit, ref)


MODERATION_MINUTES_MAX = 366 * 24 * 60  # a year: past it, "minutes" is a mistake


def _moderation(kind: type[Moderation]) -> Callable[[dict[str, Any], Ref], Request]:
    def parse(obj: dict[str, Any], ref: Ref) -> Request:
        to = obj.get("to")
        if isinstance(to, bool) or not isinstance(to, (str, int)) or to == "":
            raise ProtocolError(ErrorCode.BAD_REQUEST, '"to" must be a name or an id.', ref)
        reason = _detail(obj, "reason", ref) if kind is not Unmute else None
        minutes = (_count(obj, "minutes", ref, 1, MODERATION_MINUTES_MAX)
                   if kind in (Mute, Ban) else None)
        return kind(to, reason, minutes, ref)  # type: ignore[return-value]
    return parse


def _parse_mode(obj: dict[str, Any], ref: Ref) -> Request:
    mode = obj.get("mode")
    if type(mode) is not int or mode not in (1, 2):  # not True, not 1.0
        raise ProtocolError(ErrorCode.BAD_REQUEST, '"mode" must be 1 or 2.', ref)
    return SetMode(int(mode), ref)


def _parse_dm(obj: dict[str, Any], ref: Ref) -> Request:
    to = obj.get("to")
    if isinstance(to, bool) or not isinstance(to, (str, int)) or to == "":
        raise ProtocolError(ErrorCode.BAD_REQUEST, '"to" must be a name or an id.', ref)
    return Dm(to, _text(obj, ref), ref, _field(obj, "name", ref, optional=True))


def _parse_status(obj: dict[str, Any], ref: Ref) -> Request:
    status = obj.get("status")
    if status is not None and status not in (AVAILABLE, UNAVAILABLE):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, '"status" must be "available" or "unavailable".', ref
        )
    return SetStatus(status, ref)


_REQUEST_PARSERS: dict[str, Callable[[dict[str, Any], Ref], Request]] = {
    "hello": _parse_hello,
    "mode": _parse_mode,
    "say": lambda obj, ref: Say(_text(obj, ref), ref),
    "dm": _parse_dm,
    "users": lambda obj, ref: ListUsers(ref),
    "status": _parse_status,
    "ping": lambda obj, ref: Ping(ref),
    "pong": lambda obj, ref: Pong(ref),
    "quit": lambda obj, ref: Quit(ref),
    "backlog": _parse_backlog,
    "register": lambda obj, ref: Register(_password(obj, "password", ref), ref),
    "password": lambda obj, ref: ChangePassword(_password(obj, "old", ref),
                                                _password(obj, "new", ref), ref),
    "kick": _moderation(Kick),
    "mute": _moderation(Mute),
    "unmute": _moderation(Unmute),
    "ban": _moderation(Ban),
}

REQUEST_TYPES = frozenset(_REQUEST_PARSERS)


def _ref_of(obj: dict[str, Any]) -> Ref:
    """The object's ref when it is one we can echo (a string without lone surrogates, an int)."""
    ref = obj.get("ref")
    if isinstance(ref, str):
        return None if _has_surrogate(ref) else ref
    return ref if isinstance(ref, int) and not isinstance(ref, bool) else None


def parse_request(frame: bytes) -> Request:
    """Decode one native frame into a typed request, or raise ``ProtocolError``."""
    obj = parse_object(frame)
    ref = _ref_of(obj)
    kind = obj["type"]
    if ref is None and not isinstance(obj.get("ref"), (str, NoneType)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, '"ref" must be a string or a whole number.',
                            None, kind)
    parser = _REQUEST_PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f'Unknown request type "{kind}".', ref, kind)
    try:
        return parser(obj, ref)
    except ProtocolError as error:
        error.kind = kind
        raise


_EVENT_PARSERS: dict[str, Callable[[dict[str, Any], Ref], Event]] = {
    "welcome": lambda o, r: Welcome(
        # A welcome's "admin" is its own field, not its user's.
        User.parse({**o, "admin": False}), _of(o, "online", int, 0),
        _of(o, "max_frame", int, MAX_FRAME), r,
        _of(o, "seq", int, 0), _of(o, "session", str, None), _of(o, "resumed", bool, False),
        _of(o, "admin", bool, False)),
    "ok": lambda o, r: Ok(_of(o, "delivered", int, 0), _of(o, "queued", int, 0), r),
    "error": lambda o, r: Error(_of(o, "code", str), _of(o, "message", str, ""), r,
                                _of(o, "for", str, None), _of(o, "retry_after", int, None)),
    "users": lambda o, r: Users(tuple(User.parse(u) for u in _of(o, "users", list)), r),
    "mode": lambda o, r: ModeChanged(_of(o, "mode", int), r),
    "status": lambda o, r: StatusChanged(_of(o, "status", str), r),
    "pong": lambda o, r: Pong(r),
    "bye": lambda o, r: Bye(r),
    "ping": lambda o, r: Ping(r),
    "pending": lambda o, r: Pending(_of(o, "count", int)),
    "message": lambda o, r: _parse_message(o),
    "notice": lambda o, r: _parse_notice(o),
    "backlog": lambda o, r: Backlog(tuple(_parse_logged(e) for e in _of(o, "events", list)),
                                    _of(o, "more", bool, False), r),
}


def _parse_message(o: dict[str, Any]) -> Message:
    return Message(
        User.parse(o.get("from")), None if o.get("to") is None else Target(
            _of(o["to"], "id", int), _of(o["to"], "name", str)),
        _of(o, "text", str), _of(o, "ts", str, ""), _of(o, "queued", bool, False),
        _of(o, "seq", int, None))


def _parse_notice(o: dict[str, Any]) -> Notice:
    return Notice(
        _of(o, "event", str), _of(o, "text", str, ""), _of(o, "ts", str, ""),
        None if o.get("user") is None else User.parse(o["user"]), _of(o, "count", int, None),
        _of(o, "from_seq", int, None), _of(o, "to_seq", int, None), _of(o, "by", str, None),
        _of(o, "reason", str, None), _of(o, "seq", int, None), _of(o, "queued", bool, False))


def _parse_logged(o: Any) -> Message | Notice:
    """One event of a ``backlog`` reply: a message or a notice (ValueError otherwise)."""
    if isinstance(o, dict) and o.get("type") == "message":
        return _parse_message(o)
    if isinstance(o, dict) and o.get("type") == "notice":
        return _parse_notice(o)
    raise ValueError("not a logged event")


def parse_event(frame: bytes) -> Event:
    """Decode one event frame; an unknown type, or a known one with bad fields, is an
    ``UnknownEvent``. Raises ``ProtocolError`` only when the frame is no object with a type."""
    obj = parse_object(frame)
    parser = _EVENT_PARSERS.get(obj["type"])
    if parser is not None:
        try:
            return parser(obj, _ref_of(obj))
        except (ValueError, TypeError, AttributeError):
            pass
    return UnknownEvent(obj["type"], obj)


def _ref_in_head(head: bytes) -> Ref:
    """The ref shown in the first bytes of a frame that is too large or cannot be parsed, if
    any (a cheap look, no parse)."""
    match = _REF_RE.search(head)
    if match is None:
        return None
    try:
        ref = json.loads(match.group(1))
    except ValueError:
        return None
    return _ref_of({"ref": ref})


_REF_RE = re.compile(rb'"ref"\s*:\s*("(?:[^"\\]|\\.){0,200}"|-?\d{1,18})\s*[,}]')


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
                out.append(ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"The frame of {frame.size} bytes is over the "
                    f"limit of {self.max_frame} bytes.", _ref_in_head(frame.head)))
                continue
            try:
                out.append(parse_request(frame))
            except ProtocolError as error:
                out.append(error)
        return out


class EventDecoder:
    """Native protocol, client side: bytes in, typed events out.

    The client trusts the server's structure less than its own: a frame that is not an object
    with a string ``type`` is skipped, and one it cannot read is an ``UnknownEvent``, so a broken
    server cannot crash it.
    """

    def __init__(self, max_frame: int = 16 * MAX_FRAME) -> None:
        self._splitter = Splitter(NUL, max_frame)

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes; return the events they complete."""
        out: list[Event] = []
        for frame in self._splitter.feed(data):
            if isinstance(frame, Oversized):
                continue
            try:
                out.append(parse_event(frame))
            except ProtocolError:
                continue
        return out


# --------------------------------------------------------------------------------------------
# Names.

NAME_MAX = 32
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}\Z")
_LETTER_RE = re.compile(r"[A-Za-z]")
RESERVED_NAMES = frozenset({"server", "all"})


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a user name (a sentence), or None when it can (SPEC 1.2)."""
    if not _NAME_RE.match(name):
        return "A name is 1 to 32 characters: ASCII letters, digits, '_', '-' and '.'."
    if name.isdigit():
        return "A name cannot be all digits (those are ids)."
    if not _LETTER_RE.search(name):
        return "A name needs at least one ASCII letter."
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


# --------------------------------------------------------------------------------------------
# Dialect sniffing (SPEC 2): which protocol a connection speaks, from its first bytes.


class Dialect(str, Enum):
    """How a client speaks: the native JSON protocol, seed 002's lines or seed 001's plain text."""

    NATIVE = "native"
    LINE = "line"
    PLAIN = "plain"


@dataclass(frozen=True)
class Sniffed:
    """The dialect, and where its bytes start (past a byte order mark, and for native the
    white space before the ``{``)."""

    dialect: Dialect
    start: int


@dataclass(frozen=True)
class Refused:
    """The connection is no chat client: close it at once; ``reason`` is for the log."""

    reason: str


BOM = b"\xef\xbb\xbf"
_HTTP_REQUEST_LINE = re.compile(rb"[A-Z]{3,10} \S+ HTTP/\d")


def sniff(data: bytes, *, tls: bool = False, limit: int = MAX_FRAME) -> Sniffed | Refused | None:
    """The dialect of a connection that began with ``data``; None: need more bytes.

    After a UTF-8 byte order mark and ASCII white space (newlines too: SPEC 2), a ``{`` is
    native; white space alone decides nothing yet. Else the first ``\\n`` or NUL decides:
    ``\\n`` the line protocol (an empty line first is then that client's first command), NUL
    plain text. An HTTP request line, a TLS handshake on a plain port (``tls`` False) and
    ``limit`` bytes with no end are refused.
    """
    start = len(BOM) if data.startswith(BOM) else 0
    if BOM.startswith(data):
        return None  # all of it may still be the byte order mark
    rest = data[start:].lstrip(b" \t\r\n\f\v")
    if rest[:1] == b"{":
        return Sniffed(Dialect.NATIVE, len(data) - len(rest))
    if not rest:
        return Refused("no line or frame end in the first bytes") if len(data) > limit else None
    if data[:1] == b"\x16" and not tls:
        return Refused("a TLS handshake on a plain port")
    newline, nul = data.find(LF), data.find(NUL)
    if newline < 0 and nul < 0:
        return Refused("no line or frame end in the first bytes") if len(data) > limit else None
    if nul < 0 or 0 <= newline < nul:
        if _HTTP_REQUEST_LINE.match(data, start):
            return Refused("an HTTP request, not a chat client")
        return Sniffed(Dialect.LINE, start)
    return Sniffed(Dialect.PLAIN, start)
