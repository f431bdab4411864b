"""Pure tests of the one escaping of the server (chatsuite.dialects.escape) and of the line and
plain renderings built on it (SPEC 2.1, 2.2): nothing a sender types reaches a printing peer raw."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatsuite.dialects import escape, line_delivery, neutralise, plain_frame
from protocol import UNSAFE_TEXT


@pytest.mark.parametrize(("text", "expected"), [
    ("plain text, é ✓ 你好", "plain text, é ✓ 你好"),
    ("\x1b[2J", "\\x1b[2J"),
    ("a\nb", "a\\x0ab"),
    ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),
    ("\u202eevil\u2066\u2028\u061c", "\\u202eevil\\u2066\\u2028\\u061c"),
])
def test_escape_writes_every_unsafe_character_as_a_visible_escape(text: str, expected: str) -> None:
    """escape() writes C0, DEL, C1, bidi controls and line separators as \\xNN or \\uNNNN."""
    assert escape(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("one\ntwo\r\nthree\rfour", "one two three four"),
    ("\n\nx\n", "  x "),
    ("A\x1b[2J\rteacher is quitting.", "A\\x1b[2J teacher is quitting."),
    ("tab\there\x00", "tab\\x09here\\x00"),
    ("\u202eabc\u2029", "\\u202eabc\\u2029"),
    ("nothing to do", "nothing to do"),
])
def test_neutralise_makes_newlines_spaces_and_escapes_the_rest(text: str, expected: str) -> None:
    """neutralise() turns each newline (CR LF, LF, lone CR) into a space and escapes the rest."""
    assert neutralise(text) == expected


def test_line_delivery_is_one_neutralised_line() -> None:
    """line_delivery() is DELIVERY <sender> <text> with the text neutralised, ending in one LF."""
    text = "hi\x1b[2J\r\nfake\u202e\x85"
    assert line_delivery("alice", text) == b"DELIVERY alice hi\\x1b[2J fake\\u202e\\x85\n"


def test_plain_frame_is_one_neutralised_frame() -> None:
    """plain_frame() neutralises the text (no NUL, no control inside) and ends it with one NUL."""
    assert plain_frame("bob: a\x00b\nc\x1b[Kd") == b"bob: a\\x00b c\\x1b[Kd\0"
    assert plain_frame("alice is quitting.") == b"alice is quitting.\0"


@given(st.text())
def test_renderings_never_carry_an_unsafe_character(text: str) -> None:
    """Whatever the text, a line delivery holds one LF (its end) and a plain frame one NUL (its
    end), and neither holds any other unsafe character."""
    line = line_delivery("alice", text).decode("utf-8")
    frame = plain_frame(text).decode("utf-8")
    assert line.endswith("\n") and UNSAFE_TEXT.search(line[:-1]) is None
    assert frame.endswith("\0") and UNSAFE_TEXT.search(frame[:-1]) is None


def test_no_unsafe_character_is_printable() -> None:
    """neutralise() skips printable texts, so every UNSAFE_TEXT character must be non-printable."""
    assert [hex(code) for code in range(0x110000)
            if chr(code).isprintable() and UNSAFE_TEXT.match(chr(code))] == []
