"""The native protocol and the line-protocol helpers of protocol.py, without sockets (SPEC 1, 2.1).

Every decoder case runs whole, one byte at a time and with neighbouring frames, as h11's tests do;
hypothesis checks the decoder's invariants over arbitrary splits and arbitrary bytes.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import tracemalloc
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsuite.dialects import (
    LineList,
    LineLogin,
    LineReply,
    LineSend,
    ServerLine,
    parse_line_command,
    parse_server_line,
    split_names,
)
from protocol import (
    MAX_FRAME,
    UNSAFE_TEXT,
    Backlog,
    BacklogRequest,
    Ban,
    Bye,
    ChangePassword,
    Dialect,
    Dm,
    Error,
    ErrorCode,
    EventDecoder,
    Hello,
    Kick,
    ListUsers,
    Message,
    ModeChanged,
    Mute,
    Notice,
    Ok,
    Oversized,
    Pending,
    Ping,
    Pong,
    ProtocolError,
    Quit,
    Refusal,
    Refused,
    Register,
    Request,
    RequestDecoder,
    Say,
    SetMode,
    SetStatus,
    Sniffed,
    Splitter,
    StatusChanged,
    Target,
    UnknownEvent,
    Unmute,
    User,
    Users,
    Welcome,
    encode,
    encode_event,
    encode_json,
    encode_request,
    held_variant,
    message_frame,
    name_problem,
    no_such_user_message,
    ok_frames,
    parse_object,
    parse_target,
    sniff,
    utc_timestamp,
)

REQUEST_CLASSES = (Hello, SetMode, Say, Dm, ListUsers, SetStatus, Ping, Pong, Quit,
                   BacklogRequest, Register, ChangePassword, Kick, Mute, Unmute, Ban)
EVENT_CLASSES = (Welcome, Ok, Error, Users, ModeChanged, StatusChanged, Pong, Bye, Ping, Message,
                 Notice, Pending, Backlog, UnknownEvent)

BAD_LENGTH_OR_CHARS = "A name is 1 to 32 characters: ASCII letters, digits, '_', '-' and '.'."
ALL_DIGITS = "A name cannot be all digits (those are ids)."


def frame(obj: Any) -> bytes:
    """A frame holding ``obj`` as the test writes it (json.dumps, so \\u escapes are allowed)."""
    return json.dumps(obj).encode("utf-8") + b"\0"


def decode_whole(data: bytes, max_frame: int = MAX_FRAME) -> list[Request | ProtocolError]:
    return RequestDecoder(max_frame).feed(data)


def decode_bytewise(data: bytes, max_frame: int = MAX_FRAME) -> list[Request | ProtocolError]:
    decoder = RequestDecoder(max_frame)
    out: list[Request | ProtocolError] = []
    for index in range(len(data)):
        out.extend(decoder.feed(data[index : index + 1]))
    return out


def decode_one(data: bytes) -> Request | ProtocolError:
    """Decode one frame whole, byte by byte, and between two pings; all three must agree."""
    whole = decode_whole(data)
    assert decode_bytewise(data) == whole
    ping = frame({"type": "ping"})
    assert decode_whole(ping + data + ping) == [Ping(), *whole, Ping()]
    assert len(whole) == 1, whole
    return whole[0]


def error(code: ErrorCode, message: str, ref: Any = None) -> ProtocolError:
    return ProtocolError(code, message, ref)


# --------------------------------------------------------------------------------------------
# Splitter.


def test_splitter_returns_frames_without_terminators_in_order() -> None:
    """Several frames in one feed come out in order, without their NUL, and a tail waits."""
    splitter = Splitter()
    assert splitter.feed(b"ab\0\0cd\0ef") == [b"ab", b"", b"cd"]
    assert splitter.pending == 2
    assert splitter.feed(b"g\0") == [b"efg"]
    assert splitter.pending == 0


def test_splitter_byte_by_byte_matches_one_feed() -> None:
    """Feeding a stream one byte at a time yields the same frames as feeding it at once."""
    data = b"one\0two\0\0three\0"
    splitter = Splitter()
    frames: list[bytes | Oversized] = []
    for byte in data:
        frames.extend(splitter.feed(bytes([byte])))
    assert frames == Splitter().feed(data) == [b"one", b"two", b"", b"three"]


def test_splitter_limit_is_inclusive() -> None:
    """A frame of exactly max_size bytes is kept; one byte more becomes an Oversized marker."""
    splitter = Splitter(max_size=8)
    assert splitter.feed(b"x" * 8 + b"\0" + b"y" * 9 + b"\0" + b"ok\0") == [
        b"x" * 8,
        Oversized(9),
        b"ok",
    ]


def test_splitter_oversized_frame_counted_across_feeds() -> None:
    """An oversized frame streamed in pieces is dropped, reported once with its size, and the next
    frame decodes."""
    splitter = Splitter(max_size=10)
    assert splitter.feed(b"a" * 6) == []
    assert splitter.feed(b"a" * 6) == []
    assert splitter.pending <= 10
    assert splitter.feed(b"a" * 100) == []
    assert splitter.pending <= 10
    assert splitter.feed(b"aa\0next\0") == [Oversized(114), b"next"]
    assert splitter.pending == 0


def test_splitter_memory_bound_without_terminator() -> None:
    """Feeding 10 MiB without a NUL never leaves more than max_size bytes pending."""
    splitter = Splitter(max_size=MAX_FRAME)
    chunk = b"z" * 4096
    for _ in range(10 * 1024 * 1024 // len(chunk)):
        assert splitter.feed(chunk) == []
        assert splitter.pending <= MAX_FRAME
    assert splitter.feed(b"\0{}\0") == [Oversized(10 * 1024 * 1024), b"{}"]


def test_splitter_line_delimiter() -> None:
    """The splitter also cuts on newline for the line protocol."""
    assert Splitter(b"\n").feed(b"LIST\nWHO\r\nSEN") == [b"LIST", b"WHO\r"]


def test_splitter_rejects_multibyte_delimiter() -> None:
    """A delimiter must be exactly one byte (a local misuse, so a ValueError)."""
    with pytest.raises(ValueError):
        Splitter(b"\r\n")


frames_strategy = st.lists(
    st.binary(max_size=40).map(lambda data: data.replace(b"\0", b"")), max_size=12
)


@settings(max_examples=200, deadline=None)
@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_splitter_any_split_matches_model(frames: list[bytes], cuts: list[int]) -> None:
    """For any frames and any split of their stream, the splitter yields each frame or
    Oversized(len) in order."""
    limit = 16
    stream = b"".join(f + b"\0" for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    splitter = Splitter(max_size=limit)
    out: list[bytes | Oversized] = []
    for start, end in itertools.pairwise(points):
        out.extend(splitter.feed(stream[start:end]))
        assert splitter.pending <= limit
    assert out == [f if len(f) <= limit else Oversized(len(f)) for f in frames]
    assert splitter.pending == 0


# --------------------------------------------------------------------------------------------
# RequestDecoder: whole frames, split frames, many frames.


VALID_FRAMES: list[tuple[dict[str, Any], Request]] = [
    ({"type": "hello"}, Hello()),
    ({"type": "hello", "name": None}, Hello()),
    (
        {"type": "hello", "name": "alice", "title": "dev", "company": "acme", "ref": 1},
        Hello("alice", "dev", "acme", 1),
    ),
    ({"type": "hello", "name": ""}, Hello("")),  # the name's rules are the server's: bad-name
    ({"type": "mode", "mode": 1}, SetMode(1)),
    ({"type": "mode", "mode": 2, "ref": "m"}, SetMode(2, "m")),
    ({"type": "say", "text": "hi"}, Say("hi")),
    (
        {"type": "say", "text": "line1\nline2\u0000end", "ref": "r"},
        Say("line1\nline2\u0000end", "r"),
    ),
    ({"type": "say", "text": "\ud83d\ude00"}, Say("\U0001f600")),  # a surrogate pair is fine
    ({"type": "dm", "to": "bob", "text": "x"}, Dm("bob", "x")),
    ({"type": "dm", "to": 7, "text": "x"}, Dm(7, "x")),
    ({"type": "dm", "to": "7", "text": "x"}, Dm("7", "x")),
    ({"type": "users"}, ListUsers()),
    ({"type": "users", "ref": -3}, ListUsers(-3)),
    ({"type": "status"}, SetStatus()),
    ({"type": "status", "status": None}, SetStatus()),
    ({"type": "status", "status": "available"}, SetStatus("available")),
    ({"type": "status", "status": "unavailable"}, SetStatus("unavailable")),
    ({"type": "ping"}, Ping()),
    ({"type": "pong", "ref": 5}, Pong(5)),
    ({"type": "quit", "extra": [1, {"a": None}]}, Quit()),  # unknown fields are ignored
]


@pytest.mark.parametrize("obj,expected", VALID_FRAMES, ids=[json.dumps(o) for o, _ in VALID_FRAMES])
def test_valid_request_decodes(obj: dict[str, Any], expected: Request) -> None:
    """Each valid request decodes to its typed value, whole, byte by byte and between other
    frames."""
    assert decode_one(frame(obj)) == expected


def test_many_frames_in_one_feed_and_byte_by_byte() -> None:
    """All the valid frames in one feed decode the same as when fed one byte at a time."""
    stream = b"".join(frame(obj) for obj, _ in VALID_FRAMES)
    expected = [request for _, request in VALID_FRAMES]
    assert decode_whole(stream) == expected
    assert decode_bytewise(stream) == expected


def test_raw_utf8_text_split_inside_a_character() -> None:
    """A multi-byte UTF-8 character split between two feeds decodes whole."""
    data = '{"type":"say","text":"é😀"}\0'.encode()
    decoder = RequestDecoder()
    cut = data.index("😀".encode()) + 2
    assert decoder.feed(data[:cut]) == []
    assert decoder.feed(data[cut:]) == [Say("é😀")]


def test_frame_of_exactly_max_frame_bytes_decodes() -> None:
    """A frame of exactly max_frame bytes before its NUL is accepted."""
    head = b'{"type":"say","text":"'
    tail = b'"}'
    body = head + b"x" * (MAX_FRAME - len(head) - len(tail)) + tail
    assert len(body) == MAX_FRAME
    assert decode_whole(body + b"\0") == [Say("x" * (MAX_FRAME - len(head) - len(tail)))]


def test_frame_too_large_then_next_frame_decodes() -> None:
    """A 65,537-byte frame yields frame-too-large, and the valid frame after it still decodes."""
    big = b'{"type":"say","text":"' + b"x" * (MAX_FRAME + 1 - 24) + b'"}'
    assert len(big) == MAX_FRAME + 1
    data = big + b"\0" + frame({"type": "ping", "ref": 1})
    expected = [
        error(
            ErrorCode.FRAME_TOO_LARGE,
            f"The frame of {MAX_FRAME + 1} bytes is over the limit of {MAX_FRAME} bytes.",
        ),
        Ping(1),
    ]
    assert decode_whole(data) == expected
    assert decode_bytewise(data) == expected


def test_decoder_memory_bounded_for_10_mib_without_nul() -> None:
    """Streaming 10 MiB without a NUL in 64 KiB pieces keeps the decoder's memory under a few
    frames."""
    decoder = RequestDecoder()
    chunk = b"[" * 65536
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(160):
            assert decoder.feed(chunk) == []
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    # A kept buffer would be 10 MiB; joining one partial frame and one chunk costs about 2 frames.
    assert peak < 4 * MAX_FRAME, peak
    assert decoder.feed(b"\0" + frame({"type": "ping"})) == [
        error(
            ErrorCode.FRAME_TOO_LARGE,
            f"The frame of {160 * 65536} bytes is over the limit of {MAX_FRAME} bytes.",
        ),
        Ping(),
    ]


def test_custom_max_frame_applies() -> None:
    """RequestDecoder(max_frame=N) rejects frames longer than N bytes."""
    data = frame({"type": "ping"})
    assert decode_whole(data, max_frame=len(data) - 1) == [Ping()]
    assert decode_whole(data, max_frame=len(data) - 2) == [
        error(
            ErrorCode.FRAME_TOO_LARGE,
            f"The frame of {len(data) - 1} bytes is over the limit of {len(data) - 2} bytes.",
        ),
    ]


# --------------------------------------------------------------------------------------------
# RequestDecoder: bad frames (bad-frame, bad-request, unknown-type) and the ref they echo.

NOT_UTF8 = "The frame is not valid UTF-8."
NOT_JSON = "The frame is not valid JSON."
NOT_OBJECT = "The frame is not a JSON object."
NO_TYPE = 'The frame has no string "type".'

BAD_FRAMES: list[tuple[bytes, ProtocolError]] = [
    (b'{"type":"say","text":"\xff"}', error(ErrorCode.BAD_FRAME, NOT_UTF8)),
    (b'{"type":"say","text":"\xc3"}', error(ErrorCode.BAD_FRAME, NOT_UTF8)),  # truncated sequence
    (
        b'{"type":"say","text":"\xed\xa0\x80"}',
        error(ErrorCode.BAD_FRAME, NOT_UTF8),
    ),  # raw surrogate
    (b'{"type":"say","text":"\xc0\xaf"}', error(ErrorCode.BAD_FRAME, NOT_UTF8)),  # overlong "/"
    (b"", error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b"not json", error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b'{"type":"ping"', error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b'{"type":"ping"}{"type":"ping"}', error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b"[" * 60_000, error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (
        b'{"type":"ping","n":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        error(ErrorCode.BAD_FRAME, NOT_JSON),
    ),
    (b'{"type":"ping","n":NaN}', error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b'{"type":"ping","n":Infinity}', error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b'{"type":"ping","n":-Infinity}', error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b'{"type":"ping","n":1e400}', error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b'{"type":"ping","n":-1e400}', error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b'{"type":"ping","n":' + str(10**100).encode() + b"}", error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b'{"type":"ping","n":' + b"9" * 60_000 + b"}", error(ErrorCode.BAD_FRAME, NOT_JSON)),
    (b"[]", error(ErrorCode.BAD_FRAME, NOT_OBJECT)),
    (b'[{"type":"ping"}]', error(ErrorCode.BAD_FRAME, NOT_OBJECT)),
    (b'"ping"', error(ErrorCode.BAD_FRAME, NOT_OBJECT)),
    (b"42", error(ErrorCode.BAD_FRAME, NOT_OBJECT)),
    (b"null", error(ErrorCode.BAD_FRAME, NOT_OBJECT)),
    (b"true", error(ErrorCode.BAD_FRAME, NOT_OBJECT)),
    (b"{}", error(ErrorCode.BAD_FRAME, NO_TYPE)),
    (b'{"text":"hi","ref":"r1"}', error(ErrorCode.BAD_FRAME, NO_TYPE, "r1")),
    (b'{"type":null,"ref":2}', error(ErrorCode.BAD_FRAME, NO_TYPE, 2)),
    (b'{"type":5}', error(ErrorCode.BAD_FRAME, NO_TYPE)),
    (b'{"type":["say"]}', error(ErrorCode.BAD_FRAME, NO_TYPE)),
    (b'{"type":true}', error(ErrorCode.BAD_FRAME, NO_TYPE)),
    # A frame that cannot be read still answers the ref its start shows (SPEC 1.3).
    (b'{"type":"ping","ref":6,"x":NaN}', error(ErrorCode.BAD_FRAME, NOT_JSON, 6)),
    (b'{"ref":"r7","type":"say","text":"\xff"}', error(ErrorCode.BAD_FRAME, NOT_UTF8, "r7")),
    (b'{"type":"ping","x":NaN,"ref":8}', error(ErrorCode.BAD_FRAME, NOT_JSON, 8)),
]

REF_MUST_BE = '"ref" must be a string or a whole number.'




@pytest.mark.parametrize("data,expected", BAD_FRAMES, ids=[repr(d[:40]) for d, _ in BAD_FRAMES])
def test_bad_frame(data: bytes, expected: ProtocolError) -> None:
    """Frames that are not UTF-8, not JSON, not an object, or have no string type are bad-frame."""
    assert decode_one(data + b"\0") == expected


def test_100000_open_brackets_is_bad_frame_not_a_crash() -> None:
    """Nesting 100,000 levels deep (with a limit that lets the frame through) is bad-frame, not a
    RecursionError."""
    data = b"[" * 100_000 + b"\0" + b'{"type":"ping"}\0'
    assert decode_whole(data, max_frame=200_000) == [error(ErrorCode.BAD_FRAME, NOT_JSON), Ping()]


LONE_SURROGATES = [
    {"type": "say", "text": "\ud800"},
    {"type": "say", "text": "ok \udfff ok", "ref": "s"},
    {"type": "dm", "to": "bob", "text": "\udc00"},
    {"type": "hello", "name": "al\ud800ice"},
    {"type": "ping", "extra": ["\ud800"]},
    {"type": "ping", "\ud800": 1},
]


@pytest.mark.parametrize("obj", LONE_SURROGATES, ids=[repr(o) for o in LONE_SURROGATES])
def test_lone_surrogate_is_bad_request(obj: dict[str, Any]) -> None:
    """A string holding a lone surrogate (written as a \\u escape) is bad-request, with the ref
    echoed."""
    assert decode_one(frame(obj)) == error(
        ErrorCode.BAD_REQUEST, "The text holds a lone surrogate.", obj.get("ref")
    )


def _parse_in_fresh_thread(frames: list[bytes]) -> list[object]:
    """``parse_object`` of each frame in a new thread (a server reader's shallow stack)."""
    results: list[object] = []

    def run() -> None:
        for data in frames:
            try:
                results.append(parse_object(data))
            except (ProtocolError, RecursionError) as problem:
                results.append(problem)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return results


def test_deep_nesting_with_an_escape_is_answered_not_a_recursion_error() -> None:
    """JSON nested 900 to 990 deep (which the decoder accepts) holding a \\u escape is walked for
    surrogates without a RecursionError: a lone surrogate is bad-request, an escaped letter
    parses."""
    depths = range(900, 991, 10)

    def nested(depth: int, text: str) -> bytes:
        return b'{"type":"ping","extra":' + b"[" * depth + text.encode() + b"]" * depth + b"}"

    surrogates = _parse_in_fresh_thread([nested(d, '"\\ud800"') for d in depths])
    assert surrogates == [error(ErrorCode.BAD_REQUEST, "The text holds a lone surrogate.")] * 10
    letters = _parse_in_fresh_thread([nested(d, '"\\u00e9"') for d in depths])
    assert [type(result) for result in letters] == [dict] * 10


TEXT_MESSAGE = '"text" must be a non-empty string.'
BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"type": "hello", "name": 5}, '"name" must be a string.'),
    ({"type": "hello", "name": ["a"]}, '"name" must be a string.'),
    ({"type": "hello", "name": "a", "title": 1}, '"title" must be a string.'),
    ({"type": "hello", "name": "a", "company": {}}, '"company" must be a string.'),
    ({"type": "mode"}, '"mode" must be 1 or 2.'),
    ({"type": "mode", "mode": 3}, '"mode" must be 1 or 2.'),
    ({"type": "mode", "mode": 0}, '"mode" must be 1 or 2.'),
    ({"type": "mode", "mode": "2"}, '"mode" must be 1 or 2.'),
    ({"type": "mode", "mode": True}, '"mode" must be 1 or 2.'),
    ({"type": "mode", "mode": None}, '"mode" must be 1 or 2.'),
    ({"type": "say"}, TEXT_MESSAGE),
    ({"type": "say", "text": ""}, TEXT_MESSAGE),
    ({"type": "say", "text": None}, TEXT_MESSAGE),
    ({"type": "say", "text": 5}, TEXT_MESSAGE),
    ({"type": "say", "text": ["hi"]}, TEXT_MESSAGE),
    ({"type": "dm", "text": "x"}, '"to" must be a name or an id.'),
    ({"type": "dm", "to": "", "text": "x"}, '"to" must be a name or an id.'),
    ({"type": "dm", "to": None, "text": "x"}, '"to" must be a name or an id.'),
    ({"type": "dm", "to": True, "text": "x"}, '"to" must be a name or an id.'),
    ({"type": "dm", "to": 1.5, "text": "x"}, '"to" must be a name or an id.'),
    ({"type": "dm", "to": ["bob"], "text": "x"}, '"to" must be a name or an id.'),
    ({"type": "dm", "to": "bob"}, TEXT_MESSAGE),
    ({"type": "dm", "to": "bob", "text": ""}, TEXT_MESSAGE),
    ({"type": "dm", "to": 3, "text": 3}, TEXT_MESSAGE),
    ({"type": "status", "status": "busy"}, '"status" must be "available" or "unavailable".'),
    ({"type": "status", "status": "Available"}, '"status" must be "available" or "unavailable".'),
    ({"type": "status", "status": 1}, '"status" must be "available" or "unavailable".'),
]


@pytest.mark.parametrize("obj,message", BAD_REQUESTS, ids=[json.dumps(o) for o, _ in BAD_REQUESTS])
def test_bad_request_fields(obj: dict[str, Any], message: str) -> None:
    """A missing or wrongly typed field, or an empty text, is bad-request, with and without a
    ref."""
    assert decode_one(frame(obj)) == error(ErrorCode.BAD_REQUEST, message)
    assert decode_one(frame({**obj, "ref": "r9"})) == error(ErrorCode.BAD_REQUEST, message, "r9")
    assert decode_one(frame({**obj, "ref": 9})) == error(ErrorCode.BAD_REQUEST, message, 9)


@pytest.mark.parametrize("kind", ["foo", "", "HELLO", "Say", "message", "welcome"])
def test_unknown_type(kind: str) -> None:
    """A request whose type is not one of the nine is unknown-type, with its ref echoed."""
    assert decode_one(frame({"type": kind, "ref": "u"})) == error(
        ErrorCode.UNKNOWN_TYPE, f'Unknown request type "{kind}".', "u"
    )


@pytest.mark.parametrize("ref", [1.5, True, False, [1], {"a": 1}])
def test_ref_that_is_not_string_or_int_is_bad_request(ref: Any) -> None:
    """SPEC 1.2: ref is a string or an integer; another type is a wrongly typed field, so the
    request is refused (bad-request, with no ref to echo), not run; a null ref is no ref."""
    for kind in ("ping", "say"):
        assert decode_one(frame({"type": kind, "ref": ref})) == error(
            ErrorCode.BAD_REQUEST, REF_MUST_BE)
    assert decode_one(frame({"type": "ping", "ref": None})) == Ping()


@pytest.mark.parametrize("ref", ["", "x" * 100, "é", 0, -1, 10**17])
def test_ref_is_kept(ref: Any) -> None:
    """A string or integer ref is kept on the request exactly."""
    assert decode_one(frame({"type": "users", "ref": ref})) == ListUsers(ref)


# --------------------------------------------------------------------------------------------
# Hypothesis: any split of valid frames, and arbitrary bytes.

ids = st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1)
refs = st.none() | st.text(max_size=8) | ids
texts = st.text(min_size=1, max_size=30)
optional_texts = st.none() | st.text(max_size=10)
details = st.none() | st.text(max_size=64).filter(lambda t: not UNSAFE_TEXT.search(t))
requests_strategy: st.SearchStrategy[Request] = st.one_of(
    st.builds(Hello, optional_texts, details, details, refs),
    st.builds(SetMode, st.sampled_from([1, 2]), refs),
    st.builds(Say, texts, refs),
    st.builds(Dm, texts | ids, texts, refs, optional_texts),
    st.builds(ListUsers, refs),
    st.builds(SetStatus, st.sampled_from([None, "available", "unavailable"]), refs),
    st.builds(Ping, refs),
    st.builds(Pong, refs),
    st.builds(Quit, refs),
)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.lists(requests_strategy, max_size=10),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_any_split_of_valid_frames_decodes_the_same(
    requests: list[Request], cuts: list[int]
) -> None:
    """Any split of any stream of encoded requests decodes to exactly those requests, in order."""
    stream = b"".join(encode_request(request) for request in requests)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = RequestDecoder()
    out: list[Request | ProtocolError] = []
    for start, end in itertools.pairwise(points):
        out.extend(decoder.feed(stream[start:end]))
    assert out == requests


chunk_strategy = st.one_of(
    st.binary(max_size=64),
    st.just(b"\0"),
    st.sampled_from([frame(obj) for obj, _ in VALID_FRAMES]),
    st.sampled_from([data + b"\0" for data, _ in BAD_FRAMES if len(data) < 200]),
    st.text(max_size=20).map(lambda t: t.encode("utf-8")),
    st.builds(
        lambda obj: json.dumps(obj).encode() + b"\0",
        st.dictionaries(
            st.sampled_from(["type", "text", "to", "ref", "name", "mode", "status"]),
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats()
            | st.text(max_size=5)
            | st.sampled_from(["say", "dm", "hello", "mode", "status", "\ud800"]),
            max_size=5,
        ),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(chunk_strategy, max_size=20), max_frame=st.sampled_from([8, 64, MAX_FRAME]))
def test_arbitrary_bytes_never_raise(chunks: list[bytes], max_frame: int) -> None:
    """Arbitrary bytes yield only Request values or ProtocolError values, never an exception."""
    decoder = RequestDecoder(max_frame)
    for chunk in chunks:
        for item in decoder.feed(chunk):
            assert isinstance(item, (*REQUEST_CLASSES, ProtocolError)), item
            if isinstance(item, ProtocolError):
                assert isinstance(item.code, ErrorCode)
                assert item.ref is None or (
                    isinstance(item.ref, (str, int)) and not isinstance(item.ref, bool)
                )


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_event_decoder_never_raises(data: bytes) -> None:
    """The client's EventDecoder skips anything that is not an object with a string type, never
    raising."""
    for event in EventDecoder().feed(data + b"\0"):
        assert isinstance(event, EVENT_CLASSES), event


# --------------------------------------------------------------------------------------------
# Encoding.


def test_encode_is_compact_raw_utf8_with_escaped_nul() -> None:
    """encode() writes compact JSON with raw UTF-8, escapes U+0000 and control characters, and ends
    with one NUL."""
    data = encode({"type": "message", "text": "a\u0000b\nc é 😀", "n": [1, None]})
    assert data == '{"type":"message","text":"a\\u0000b\\nc é 😀","n":[1,null]}\0'.encode()
    assert data.count(b"\0") == 1 and data.endswith(b"\0")


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1))
def test_encoded_text_round_trips(text: str) -> None:
    """Any text, NUL and newlines included, survives encode() and both decoders unchanged."""
    data = encode({"type": "say", "text": text})
    assert data.index(b"\0") == len(data) - 1
    assert RequestDecoder().feed(data) == [Say(text)]
    assert parse_object(data[:-1]) == {"type": "say", "text": text}


def test_encode_refuses_nan() -> None:
    """encode() never writes NaN, which our own decoder would reject as bad-frame."""
    with pytest.raises(ValueError):
        encode({"type": "x", "n": float("nan")})


@settings(max_examples=200, deadline=None)
@given(request=requests_strategy)
def test_encode_request_round_trips(request: Request) -> None:
    """encode_request() of any request decodes back to an equal request."""
    assert RequestDecoder().feed(encode_request(request)) == [request]


DURABLE_AND_ACCESS_REQUESTS = [
    Hello("alice", session="s" * 32, last_seq=17, ref=1),
    Hello("alice", server_password="room key", password="secret pass"),
    BacklogRequest(before=100, limit=20, ref="b"),
    BacklogRequest(after=5),
    BacklogRequest(),
    Register("long enough", 3),
    ChangePassword("old secret", "new secret"),
    Kick("bob", "spam"),
    Mute(6, None, 15),
    Unmute("bob"),
    Ban("bob", "again", 60, 9),
]


@pytest.mark.parametrize("request_value", DURABLE_AND_ACCESS_REQUESTS,
                         ids=[type(r).__name__ for r in DURABLE_AND_ACCESS_REQUESTS])
def test_durable_room_and_access_requests_round_trip(request_value: Request) -> None:
    """Every request of SPEC 6 and 7 decodes back to an equal request, whole or byte by byte."""
    data = encode_request(request_value)
    assert decode_whole(data) == [request_value]
    assert decode_bytewise(data) == [request_value]


def test_durable_room_and_access_requests_on_the_wire() -> None:
    """The new requests travel with SPEC 1.2's field names, optional fields left out."""
    assert encode_request(BacklogRequest()) == b'{"type":"backlog","limit":50}\0'
    assert encode_request(Hello(session="t", last_seq=3)) == (
        b'{"type":"hello","session":"t","last_seq":3}\0')
    assert encode_request(Mute("bob", minutes=5)) == b'{"type":"mute","to":"bob","minutes":5}\0'
    assert encode_request(ChangePassword("a", "b")) == (
        b'{"type":"password","old":"a","new":"b"}\0')


def test_passwords_never_show_in_repr() -> None:
    """A request's repr (logs, test failures) never holds a password or a session token."""
    shown = repr([Hello("a", session="TOKEN", server_password="ROOMKEY", password="ACCOUNT"),
                  Register("ACCOUNT"), ChangePassword("OLDPW", "NEWPW")])
    for secret in ("TOKEN", "ROOMKEY", "ACCOUNT", "OLDPW", "NEWPW"):
        assert secret not in shown


@pytest.mark.parametrize(("obj", "message"), [
    ({"type": "backlog", "limit": 0}, '"limit" must be a whole number from 1 to 500.'),
    ({"type": "backlog", "limit": 501}, '"limit" must be a whole number from 1 to 500.'),
    ({"type": "backlog", "before": -1}, '"before" must be a whole number from 0 to '
     f"{2**63 - 1}."),
    ({"type": "backlog", "after": 1.5}, '"after" must be a whole number from 0 to '
     f"{2**63 - 1}."),
    ({"type": "hello", "last_seq": True}, '"last_seq" must be a whole number from 0 to '
     f"{2**63 - 1}."),
    ({"type": "hello", "session": 5}, '"session" must be a string.'),
    ({"type": "register"}, '"password" must be a string.'),
    ({"type": "password", "old": "x"}, '"new" must be a string.'),
    ({"type": "kick"}, '"to" must be a name or an id.'),
    ({"type": "mute", "to": "bob", "minutes": 0},
     '"minutes" must be a whole number from 1 to 527040.'),
    ({"type": "ban", "to": "bob", "reason": "x" * 65},
     '"reason" must be at most 64 characters, with no control characters.'),
])
def test_durable_room_and_access_requests_refuse_bad_fields(obj: Any, message: str) -> None:
    """A malformed backlog, hello, register, password or moderation field is bad-request."""
    (error,) = decode_whole(frame({**obj, "ref": 8}))
    assert error == ProtocolError(ErrorCode.BAD_REQUEST, message, 8)


def test_refusal_carries_for_and_retry_after_into_the_error_event() -> None:
    """A Refusal's "for" and "retry_after" reach the error event, and only when set."""
    refusal = Refusal(ErrorCode.BAD_PASSWORD, "Wrong.", 4, for_="account")
    assert encode_event(Error.of(refusal)) == (
        b'{"type":"error","code":"bad-password","message":"Wrong.","ref":4,"for":"account"}\0')
    wait = Refusal(ErrorCode.TOO_MANY_ATTEMPTS, "Later.", None, retry_after=12)
    assert Error.of(wait) == Error("too-many-attempts", "Later.", None, None, 12)


def test_the_hot_path_writes_seq_like_the_typed_message() -> None:
    """message_frame() with a seq writes the same bytes as encode_event(Message(seq=...)),
    seq before queued, so held_variant still turns it into its held form."""
    ts = "2026-11-22T06:00:00.123Z"
    live = message_frame(encode_json(ALICE.wire()), "null", "hi", ts, 99)
    assert live == encode_event(Message(ALICE, None, "hi", ts, seq=99))
    assert held_variant(live) == encode_event(Message(ALICE, None, "hi", ts, True, 99))


def test_encode_request_omits_empty_optionals() -> None:
    """A request without a ref or a toggle status leaves those fields out of the wire object."""
    assert encode_request(SetStatus()) == b'{"type":"status"}\0'
    assert encode_request(Dm(4, "hi", "r")) == b'{"type":"dm","to":4,"text":"hi","ref":"r"}\0'


def test_utc_timestamp_format() -> None:
    """Timestamps are UTC ISO 8601 with milliseconds and a Z."""
    assert utc_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert utc_timestamp(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp())


# --------------------------------------------------------------------------------------------
# Names and targets.


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "A",
        "x" * 32,
        "alice",
        "Bob_2",
        "a-b.c",
        "_a",
        ".x",
        "-Z-",
        "1a",
        "a1",
        "007bond",
        "servers",
        "all1",
        "allison",
        "Server_",
        "ALL.x",
    ],
)
def test_good_names(name: str) -> None:
    """Names of 1 to 32 letters, digits, _ - and . with a letter, not reserved, are allowed."""
    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["-", "....", "_", "-_.", "1-2", "0.5", "_" * 32])
def test_names_without_a_letter_are_refused(name: str) -> None:
    """A name of only digits, '-', '.' and '_' (at least one not a digit) needs a letter."""
    assert name_problem(name) == "A name needs at least one ASCII letter."


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 33,
        "al ice",
        " alice",
        "alice ",
        "alice\n",
        "alice\t",
        "é",
        "ali\u00e9",
        "a!",
        "a/b",
        "a@b",
        "a,b",
        "a:b",
        "a\u0000",
        "\u0661\u0662",
        "ｆｕｌｌ",
        "a\x1b[31m",
        "😀",
    ],
)
def test_names_with_bad_length_or_characters(name: str) -> None:
    """A name that is empty, longer than 32, or has any other character is refused with the rule's
    sentence."""
    assert name_problem(name) == BAD_LENGTH_OR_CHARS


@pytest.mark.parametrize("name", ["0", "1", "42", "0000", "9" * 32])
def test_all_digit_names(name: str) -> None:
    """A name of digits only is refused, since it would read as an id."""
    assert name_problem(name) == ALL_DIGITS


@pytest.mark.parametrize(
    "name", ["server", "Server", "SERVER", "sErVeR", "all", "All", "ALL", "aLl"]
)
def test_reserved_names_in_any_case(name: str) -> None:
    """server and all are reserved in any case."""
    assert name_problem(name) == f'The name "{name}" is reserved.'


@pytest.mark.parametrize(
    "to,expected",
    [
        (4, 4),
        (0, 0),
        ("4", 4),
        ("0042", 42),
        ("bob", "bob"),
        ("4bob", "4bob"),
        ("b4", "b4"),
        ("-1", "-1"),
        (" 4", " 4"),
        ("\u0664", "\u0664"),
        ("４", "４"),
    ],
)
def test_parse_target(to: str | int, expected: str | int) -> None:
    """An int or a string of ASCII digits is an id; any other string is a name."""
    result = parse_target(to)
    assert result == expected
    assert type(result) is type(expected)


def test_no_such_user_message_reads_as_seed_004() -> None:
    """The no-such-user sentence is exactly the one of seed 004."""
    assert no_such_user_message("client4") == 'User "client4" is not connected to the server.'
    assert no_such_user_message(12) == 'User "12" is not connected to the server.'


# --------------------------------------------------------------------------------------------
# Line protocol helpers (SPEC 2.1, 4.9).

LINE_COMMANDS: list[tuple[bytes, Any]] = [
    (b"HELLO-FROM alice", LineLogin("alice")),
    (b"HELLO-FROM alice\r", LineLogin("alice")),
    (b"HELLO-FROM", LineReply.BAD_BODY),
    (b"HELLO-FROM ", LineReply.BAD_BODY),
    (b"HELLO-FROM al ice", LineReply.BAD_BODY),
    (b"hello-from alice", LineReply.BAD_HEADER),
    (b"LIST", LineList(who=False)),
    (b"LIST\r", LineList(who=False)),
    (b"WHO", LineList(who=True)),
    (b"LIST extra", LineReply.BAD_BODY),
    (b"WHO extra", LineReply.BAD_BODY),
    (b"list", LineReply.BAD_HEADER),
    (b"who", LineReply.BAD_HEADER),
    (b"SEND bob hi", LineSend("bob", "hi")),
    (b"SEND bob  two  spaces  ", LineSend("bob", " two  spaces  ")),
    (b"SEND bob hi\r", LineSend("bob", "hi")),
    (b"SEND bob h\xc3\xa9", LineSend("bob", "hé")),
    (b"SEND bob", LineReply.BAD_BODY),
    (b"SEND bob ", LineReply.BAD_BODY),
    (b"SEND", LineReply.BAD_BODY),
    (b"send bob hi", LineReply.BAD_HEADER),
    (b"", LineReply.BAD_HEADER),
    (b"\r", LineReply.BAD_HEADER),
    (b"FOO", LineReply.BAD_HEADER),
    (b"DELIVERY bob hi", LineReply.BAD_HEADER),
]


@pytest.mark.parametrize("raw,expected", LINE_COMMANDS, ids=[repr(r) for r, _ in LINE_COMMANDS])
def test_parse_line_command(raw: bytes, expected: Any) -> None:
    """Each line of SPEC 2.1 parses to its command, BAD-RQST-HDR for a bad head or BAD-RQST-BODY for
    a bad body."""
    assert parse_line_command(raw) == expected


SERVER_LINES: list[tuple[bytes, ServerLine]] = [
    (b"HELLO alice", ServerLine("HELLO", "alice")),
    (b"HELLO alice\r", ServerLine("HELLO", "alice")),
    (b"IN-USE", ServerLine("IN-USE")),
    (b"IN_USE", ServerLine("IN-USE")),
    (b"BUSY", ServerLine("BUSY")),
    (b"BAD-RQST-HDR", ServerLine("BAD-RQST-HDR")),
    (b"BAD_RQST_HDR", ServerLine("BAD-RQST-HDR")),
    (b"BAD_RQST_BODY", ServerLine("BAD-RQST-BODY")),
    (b"LIST-OK a,b", ServerLine("LIST-OK", "a,b")),
    (b"WHO-OK a,b", ServerLine("WHO-OK", "a,b")),
    (b"WHO_OK a b", ServerLine("WHO-OK", "a b")),
    (b"SEND-OK", ServerLine("SEND-OK")),
    (b"SEND_OK", ServerLine("SEND-OK")),
    (b"BAD-DEST-USER", ServerLine("BAD-DEST-USER")),
    (b"BAD_DEST_USER", ServerLine("BAD-DEST-USER")),
    (b"UNKNOWN", ServerLine("UNKNOWN")),
    (b"DELIVERY bob hi  there", ServerLine("DELIVERY", "bob hi  there")),
    (b"welcome to the server", ServerLine("OTHER", "welcome to the server")),
]


@pytest.mark.parametrize("raw,expected", SERVER_LINES, ids=[repr(r) for r, _ in SERVER_LINES])
def test_parse_server_line(raw: bytes, expected: ServerLine) -> None:
    """Server lines are classified, the underscored variants normalised to hyphens."""
    assert parse_server_line(raw) == expected


@pytest.mark.parametrize(
    "body,names",
    [
        ("alice,bob,carol", ["alice", "bob", "carol"]),
        ("alice, bob", ["alice", "bob"]),
        ("alice bob  carol", ["alice", "bob", "carol"]),
        ("alice,,bob,", ["alice", "bob"]),
        ("alice", ["alice"]),
        ("", []),
        (" , ", []),
    ],
)
def test_split_names(body: str, names: list[str]) -> None:
    """A user list splits on commas and/or spaces, empty pieces ignored."""
    assert split_names(body) == names


def test_mode_must_be_an_integer_not_a_float_or_bool() -> None:
    """A mode of 1.0 or true is bad-request: the mode is the integer 1 or 2."""
    from protocol import ErrorCode, ProtocolError, parse_request

    for raw in (b'{"type":"mode","mode":1.0}', b'{"type":"mode","mode":true}'):
        try:
            parse_request(raw)
        except ProtocolError as error:
            assert error.code is ErrorCode.BAD_REQUEST
        else:
            raise AssertionError(f"{raw!r} was accepted")


# --------------------------------------------------------------------------------------------
# Typed events: one encode and one parse each way.

ALICE = User(5, "alice", "CTO", None, "available", 2)
EVENTS = [
    Welcome(ALICE, 3, 1024, "r1"),
    Ok(2, 1, 7),
    Error("no-such-user", 'User "bob" is not connected to the server.', None),
    Error("bad-frame", "The frame is not valid JSON.", "x"),
    Users((ALICE, User(6, "bob")), 3),
    ModeChanged(2, 4),
    StatusChanged("unavailable"),
    Pong("p"),
    Bye(9),
    Ping(),
    Pending(12),
    Message(ALICE, None, "hi\nthere", "2026-11-22T06:00:00.123Z"),
    Message(ALICE, Target(6, "bob"), "psst", "2026-11-22T06:00:00.123Z", queued=True),
    Notice("joined", "alice joined the chat.", "2026-11-22T06:00:00.123Z", ALICE),
    Notice("dropped", "3 messages were dropped.", "2026-11-22T06:00:00.123Z", count=3,
           queued=True),
    # The durable room (SPEC 6) and access (SPEC 7).
    Welcome(replace(ALICE, mode=1), 2, MAX_FRAME, None, 41, "tok", True, True),
    Users((replace(ALICE, connected=False),)),
    Message(ALICE, None, "numbered", "2026-11-22T06:00:00.123Z", seq=42),
    Notice("back", "alice is back.", "2026-11-22T06:00:00.123Z", ALICE, seq=43),
    Notice("gap", "Messages 5 to 9 are no longer kept.", "2026-11-22T06:00:00.123Z",
           from_seq=5, to_seq=9),
    Notice("muted", "bob was muted by teacher.", "2026-11-22T06:00:00.123Z",
           User(6, "bob"), by="teacher", reason="flood", seq=44, queued=True),
    Backlog((Message(ALICE, None, "hi", "2026-11-22T06:00:00.123Z", seq=1),
             Notice("left", "bob is quitting.", "2026-11-22T06:00:00.124Z", User(6, "bob"),
                    seq=2)), True, "b"),
    Error("password-required", "This room needs its password.", 1, "server"),
    Error("too-many-attempts", "Too many attempts; try again later.", 2, retry_after=37),
]


@pytest.mark.parametrize("event", EVENTS, ids=[type(e).__name__ for e in EVENTS])
def test_every_event_round_trips_whole_and_byte_by_byte(event: Any) -> None:
    """encode_event() of any event decodes back to an equal event, whole or one byte at a time."""
    data = encode_event(event)
    assert EventDecoder().feed(data) == [event]
    decoder = EventDecoder()
    out: list[Any] = []
    for byte in data:
        out.extend(decoder.feed(bytes([byte])))
    assert out == [event]


def test_event_wire_shapes_are_the_specs() -> None:
    """Events travel with SPEC 1.3's fields: welcome flat with max_frame, seq, session, resumed
    and admin; error always with ref."""
    assert json.loads(encode_event(Welcome(ALICE, 3, 1024))[:-1]) == {
        "type": "welcome", "id": 5, "name": "alice", "title": "CTO", "company": None,
        "status": "available", "mode": 2, "online": 3, "max_frame": 1024, "seq": 0,
        "resumed": False, "admin": False}
    assert json.loads(encode_event(Welcome(ALICE, 3, 1024, 7, 41, "tok", True, True))[:-1]) == {
        "type": "welcome", "id": 5, "name": "alice", "title": "CTO", "company": None,
        "status": "available", "mode": 2, "online": 3, "max_frame": 1024, "seq": 41,
        "resumed": True, "admin": True, "session": "tok", "ref": 7}
    assert encode_event(Error("bad-frame", "x")) == (
        b'{"type":"error","code":"bad-frame","message":"x","ref":null}\0')
    assert encode_event(Ok(1, 0)) == b'{"type":"ok","delivered":1,"queued":0}\0'


def test_the_broadcast_hot_path_encodes_the_same_bytes_as_the_typed_message() -> None:
    """message_frame() (pre-encoded parts, once per broadcast) equals encode_event(Message)."""
    ts = "2026-11-22T06:00:00.123Z"
    live = message_frame(encode_json(ALICE.wire()), "null", "a \"b\" é\n", ts)
    assert live == encode_event(Message(ALICE, None, 'a "b" é\n', ts))
    assert held_variant(live) == encode_event(Message(ALICE, None, 'a "b" é\n', ts, queued=True))
    notice = Notice("left", "alice is quitting.", ts, ALICE)
    assert held_variant(encode_event(notice)) == encode_event(replace(notice, queued=True))


@pytest.mark.parametrize("frame", [
    b'{"type":"welcome","name":"x"}', b'{"type":"ok","delivered":"2"}',
    b'{"type":"message","from":7,"text":"x"}', b'{"type":"users","users":[1]}',
    b'{"type":"launch","ref":3}', b'{"type":"error","code":5,"ref":2}',
])
def test_unreadable_or_unknown_events_are_kept_as_unknown_events(frame: bytes) -> None:
    """A known event with bad fields, or an unknown type, is an UnknownEvent with its ref, not an
    exception."""
    [event] = EventDecoder().feed(frame + b"\0")
    assert isinstance(event, UnknownEvent)
    assert event.fields == json.loads(frame)
    assert event.ref == json.loads(frame).get("ref")


def test_refusals_and_protocol_errors_are_different_classes_with_the_same_data() -> None:
    """A Refusal (domain) is no ProtocolError (peer's fault); both become the same Error event."""
    refusal = Refusal(ErrorCode.NAME_TAKEN, "taken", 3)
    violation = ProtocolError(ErrorCode.BAD_FRAME, "bad", 4)
    assert not isinstance(refusal, ProtocolError) and not isinstance(violation, Refusal)
    assert refusal != ProtocolError(ErrorCode.NAME_TAKEN, "taken", 3)
    assert Error.of(refusal) == Error("name-taken", "taken", 3)
    assert Error.of(violation) == Error("bad-frame", "bad", 4)


@pytest.mark.parametrize("head,ref", [
    (b'{"type":"say","ref":"abc","text":"', "abc"),
    (b'{"ref": 42, "type":"say","text":"', 42),
    (b'{"type":"say","text":"', None),
    (b'{"type":"say","ref":"a\\"b","text":"', 'a"b'),
])
def test_frame_too_large_carries_the_ref_its_start_showed(head: bytes, ref: Any) -> None:
    """An oversized frame's error carries the ref found in its first bytes, fed whole or in
    pieces."""
    data = head + b"x" * 200 + b'"}\0'
    assert RequestDecoder(64).feed(data) == [
        ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                      f"The frame of {len(data) - 1} bytes is over the limit of 64 bytes.", ref)]
    decoder = RequestDecoder(64)
    out: list[Any] = []
    for start in range(0, len(data), 10):
        out.extend(decoder.feed(data[start : start + 10]))
    assert [e.ref for e in out] == [ref]


def test_dm_carries_the_name_the_sender_believes() -> None:
    """A dm's optional name is parsed and encoded; a non-string name is bad-request."""
    assert decode_one(frame({"type": "dm", "to": 10, "text": "hi", "name": "alice"})) == Dm(
        10, "hi", None, "alice")
    assert encode_request(Dm(10, "hi", name="alice")) == (
        b'{"type":"dm","to":10,"text":"hi","name":"alice"}\0')
    assert decode_one(frame({"type": "dm", "to": 10, "text": "hi", "name": 3})) == ProtocolError(
        ErrorCode.BAD_REQUEST, '"name" must be a string.')


DETAIL_PROBLEM = ("must be at most 64 characters, with no control characters.")


@pytest.mark.parametrize("key", ["title", "company"])
@pytest.mark.parametrize("value", ["x" * 65, "a\x1bb", "line\nbreak", "\u202eevil", "\x7f"])
def test_title_and_company_are_short_and_free_of_control_characters(key: str, value: str) -> None:
    """A title or company over 64 characters or holding a control character is bad-request."""
    assert decode_one(frame({"type": "hello", "name": "al", key: value, "ref": 1})) == (
        ProtocolError(ErrorCode.BAD_REQUEST, f'"{key}" {DETAIL_PROBLEM}', 1))


def test_title_of_64_characters_is_accepted() -> None:
    """A title and company of exactly 64 characters are kept."""
    assert decode_one(frame({"type": "hello", "title": "t" * 64, "company": "é" * 64})) == Hello(
        None, "t" * 64, "é" * 64)


# --------------------------------------------------------------------------------------------
# Sniffing the dialect (SPEC 2).

SNIFFS = [
    (b'{"type":"hello"}\0', Sniffed(Dialect.NATIVE, 0)),
    (b'\xef\xbb\xbf{"type":"hello"}\0', Sniffed(Dialect.NATIVE, 3)),
    (b' \t\r {"type"', Sniffed(Dialect.NATIVE, 4)),
    (b'\xef\xbb\xbf  {', Sniffed(Dialect.NATIVE, 5)),
    (b"HELLO-FROM bob\n", Sniffed(Dialect.LINE, 0)),
    (b"\xef\xbb\xbfHELLO-FROM bob\r\n", Sniffed(Dialect.LINE, 3)),
    (b"\n", None),  # white space alone: a { may still come
    (b"  \n{", Sniffed(Dialect.NATIVE, 3)),
    (b"\r\n\t{", Sniffed(Dialect.NATIVE, 3)),
    (b"\nHELLO-FROM bob\n", Sniffed(Dialect.LINE, 0)),  # an empty line first, then a command
    (b"hi\0", Sniffed(Dialect.PLAIN, 0)),
    (b"hi\0there\n", Sniffed(Dialect.PLAIN, 0)),
    (b"\0", Sniffed(Dialect.PLAIN, 0)),
    (b"", None),
    (b"\xef", None),
    (b"\xef\xbb\xbf", None),
    (b"   ", None),
    (b"HELLO-FROM", None),
    (b"POST / HTTP/1.1\r\n", Refused("an HTTP request, not a chat client")),
    (b"\x16\x03\x01\x02\x00", Refused("a TLS handshake on a plain port")),
]


@pytest.mark.parametrize("data,expected", SNIFFS, ids=[repr(d) for d, _ in SNIFFS])
def test_sniff(data: bytes, expected: Any) -> None:
    """The first bytes pick the dialect (BOM and white space skipped before '{'), or need more."""
    assert sniff(data) == expected


def test_sniff_on_a_tls_port_and_past_the_limit() -> None:
    """A TLS record is fine once decrypted (tls=True); no line end within the limit is refused."""
    assert sniff(b"\x16abc\0", tls=True) == Sniffed(Dialect.PLAIN, 0)
    assert sniff(b"x" * 10, limit=10) is None
    assert sniff(b"x" * 11, limit=10) == Refused("no line or frame end in the first bytes")


@pytest.mark.parametrize("data,expected", SNIFFS, ids=[repr(d) for d, _ in SNIFFS])
def test_sniff_decides_the_same_however_the_bytes_arrive(data: bytes, expected: Any) -> None:
    """Sniffing grown prefixes never decides early: the first decision is the final one."""
    for end in range(len(data) + 1):
        found = sniff(data[:end])
        if found is not None:
            assert found == expected
            break
    else:
        assert expected is None


def test_a_ref_with_a_lone_surrogate_is_not_echoed() -> None:
    """A ref holding a lone surrogate cannot be written back as UTF-8: the error's ref is null."""
    assert decode_one(b'{"type":"say","text":"\\ud800","ref":"\\udc00"}\0') == ProtocolError(
        ErrorCode.BAD_REQUEST, "The text holds a lone surrogate.")
    big = b'{"type":"say","ref":"\\ud800","text":"' + b"x" * 100 + b'"}\0'
    assert [e.ref for e in RequestDecoder(64).feed(big)] == [None]


@pytest.mark.parametrize("refs", [[None], [1, None, "a\"é", -5, ""], []])
def test_ok_frames_are_the_typed_oks_with_each_ref(refs: list[Any]) -> None:
    """ok_frames() (the say path's splice) writes exactly the encode_event() of each Ok."""
    ok = Ok(3, 2)
    assert ok_frames(ok, refs) == b"".join(encode_event(replace(ok, ref=ref)) for ref in refs)
