"""The client at the keyboard, in a pseudo-terminal: pastes, Ctrl-C, Tab, input history, bell.

Each test runs the real ``chat_client.py`` under pexpect against an in-process server, with raw
``Peer`` clients as the other side; waits are pexpect expectations or ``Peer`` reads with
deadlines, never sleeps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from client_helpers import PROMPT, ClientPrograms, choose_typing, command, ended, output
from conftest import Peer

CONFIRMATION = "message sent (delivered to 1, held for 0)"
EDITOR_CODES = re.compile(r"\x1b\[\?2004[hl]")  # readline's bracketed-paste switches


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., pexpect.spawn]]:
    """Start ``chat_client.py`` in a pseudo-terminal; every child is killed after the test."""
    programs = ClientPrograms(tmp_path / "history")
    yield programs.start
    programs.close()


def address(server: Any) -> list[str]:
    host, port = server.address
    return ["--host", host, "--port", str(port)]


def typing_client(spawn: Callable[..., pexpect.spawn], server: Any, name: str,
                  *args: str) -> pexpect.spawn:
    """A client registered as ``name``, waiting at the mode-1 prompt."""
    child = spawn(name, *address(server), "--no-color", *args)
    child.expect(f"welcome {name}, your id is \\d+")
    return choose_typing(child)


def viewing_peer(connect: Callable[..., Peer], server: Any, name: str) -> Peer:
    """A raw peer registered as ``name``, viewing."""
    peer = connect(server)
    peer.register(name)
    peer.view()
    return peer


def screen_lines(child: pexpect.spawn) -> list[str]:
    """The transcript as lines, without readline's bracketed-paste switches."""
    return EDITOR_CODES.sub("", output(child)).split("\r\n")


def test_many_lines_at_once_keep_confirmations_and_prompts_whole(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any],
        connect: Callable[..., Peer]) -> None:
    """80 lines arriving faster than the replies: every prompt and confirmation is a whole line."""
    server = start_server(rate=0)
    bob = viewing_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    lines = [f"pasted line {n:02}" for n in range(80)]
    for line in lines:
        child.send(line + "\r")  # one write each: some land while the client awaits a reply
    for _ in lines:
        child.expect_exact(CONFIRMATION)
    child.expect_exact(PROMPT)
    received = [bob.wait_for("message")["text"] for _ in lines]
    assert received == lines
    transcript = screen_lines(child)
    start = next(i for i, text in enumerate(transcript) if text.startswith(PROMPT))
    expected = []
    for line in lines:
        expected += [PROMPT + line, CONFIRMATION]
    assert transcript[start:start + len(expected)] == expected
