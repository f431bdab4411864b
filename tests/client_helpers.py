"""Driving the real ``chat_client.py`` in a pseudo-terminal (pexpect), shared by the client tests.

``ClientPrograms`` starts the program with the same terminal, environment and history folder for
every test file and kills every child it started; the functions read what a child printed. Each
test file keeps a thin ``spawn`` fixture that adds its own arguments (protocol, host, port).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
from conftest import ROOT

CLIENT = str(ROOT / "chat_client.py")
TIMEOUT = 3  # seconds a pexpect expectation waits: the client answers on loopback at once
PROMPT = "type in your text: "
CHOICE = r"your choice \(1 or 2\): "
TIME = r"\d\d:\d\d:\d\d"
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class ClientPrograms:
    """The client programs one test started, each in a pseudo-terminal; ``close`` kills them."""

    def __init__(self, history_dir: Path) -> None:
        self.history_dir = history_dir
        self.children: list[pexpect.spawn] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
        """Run ``chat_client.py *args`` with its own history folder; output is also recorded."""
        # NO_COLOR set in the developer's shell must not decide a colour test.
        environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        environment.update({"TERM": "xterm", **(env or {})})
        child = pexpect.spawn(
            sys.executable, [CLIENT, *args, "--history-dir", str(self.history_dir)],
            env=environment, encoding="utf-8", codec_errors="replace", timeout=TIMEOUT,
            dimensions=(40, 250),
        )
        child.logfile_read = io.StringIO()  # the whole output, for "never this" checks
        self.children.append(child)
        return child

    def close(self) -> None:
        """Kill every child still running (a failed test must not leave a client behind)."""
        for child in self.children:
            child.close(force=True)


EDITOR_CODES = re.compile(r"\x1b\[\?2004h|\x1b\[\?2004l\r?")
"""readline asking the terminal to mark pastes while it reads a line, and to stop: invisible."""


SWITCHES = r"(?:\x1b\[\?2004[hl]\r?)*"
"""A regular expression for EDITOR_CODES where they may come, in an ``expect`` pattern."""
NEW_PROMPT = "\r\n" + SWITCHES + re.escape(PROMPT)
"""The mode-1 prompt at the start of a new line (after a cancelled line or question)."""


def output(child: pexpect.spawn) -> str:
    """Everything the child printed so far (without readline's paste-marking switches)."""
    return EDITOR_CODES.sub("", child.logfile_read.getvalue())


def ended(child: pexpect.spawn) -> int:
    """Wait for the child to end; its exit code."""
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def choose_typing(child: pexpect.spawn) -> pexpect.spawn:
    """At the mode menu, choose 1 (typing) and wait for the prompt."""
    child.expect(CHOICE)
    child.sendline("1")
    child.expect_exact(PROMPT)
    return child


WAITING_LINE = re.compile(r"(?:\r?\x1b\[K)?\d+ messages? waiting: #view to read them\r?\n")
"""The client's asynchronous ``pending`` line (SPEC 4.12), which redraws the prompt after it."""


def command(child: pexpect.spawn, line: str) -> str:
    """Type ``line`` in mode 1; what the client printed before the prompt that follows it.

    A ``pending`` line ("3 messages waiting") may come at any moment, with a prompt of its
    own: it is left out, and a prompt that followed only such a line is not the one awaited.
    """
    child.sendline(line)
    printed = ""
    while True:
        child.expect_exact(PROMPT)
        chunk = EDITOR_CODES.sub("", child.before).replace("\r\n", "\n")
        waiting = WAITING_LINE.search(chunk.replace("\n", "\r\n")) is not None
        chunk = WAITING_LINE.sub("", chunk.replace("\n", "\r\n")).replace("\r\n", "\n")
        printed += chunk
        if not waiting or printed.strip() not in ("", line.strip()):
            return printed.lstrip("\r").removeprefix(line + "\n")


FAST: dict[str, str] = {"CHAT_CLIENT_DELAY_SCALE": "0.01"}  # backoff delays of 10 ms, 20 ms, ...
LOST_LINE = "connection to the server was lost: reconnecting (Ctrl-C to leave)\r\n"


class ScriptedServer:
    """A native server (SPEC 1, 6) on 127.0.0.1 that a test drives step by step: it accepts,
    reads requests and answers them only when told to, drops or refuses connections, and
    replays events (duplicates included) as a resuming server would."""

    def __init__(self) -> None:
        self.listener: socket.socket | None = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.buffer = b""

    def args(self) -> list[str]:
        """The client's options to reach this server."""
        return ["--host", "127.0.0.1", "--port", str(self.port)]

    def accept(self) -> None:
        """Take the next connection (the earlier one, if any, is forgotten)."""
        assert self.listener is not None
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(TIMEOUT)
        self.buffer = b""

    def read(self) -> dict[str, Any]:
        """The next request the client sent."""
        assert self.conn is not None
        while b"\0" not in self.buffer:
            data = self.conn.recv(65536)
            assert data, "client closed"
            self.buffer += data
        frame, _, self.buffer = self.buffer.partition(b"\0")
        request: dict[str, Any] = json.loads(frame)
        return request

    def expect(self, kind: str) -> dict[str, Any]:
        """The next request, which must be of type ``kind``."""
        request = self.read()
        assert request["type"] == kind, request
        return request

    def send(self, **fields: Any) -> None:
        assert self.conn is not None
        self.conn.sendall(json.dumps(fields).encode() + b"\0")

    def reply(self, request: dict[str, Any], **fields: Any) -> None:
        self.send(**fields, ref=request["ref"])

    def welcome(self, hello: dict[str, Any], *, session: str | None = "tok-1", seq: int = 0,
                resumed: bool = False, user_id: int = 5, max_frame: int = 65536) -> None:
        """Answer ``hello`` with a welcome for the name it asked (``session`` None: a server
        of before SPEC 6, which gives none)."""
        self.reply(hello, type="welcome", id=user_id, name=hello.get("name") or "user1",
                   title=None, company=None, status="available", mode=1, online=2, seq=seq,
                   session=session, resumed=resumed, admin=False, max_frame=max_frame)

    def no_backlog(self) -> None:
        """Answer the client's ``backlog`` request as a server without one does."""
        self.reply(self.expect("backlog"), type="error", code="unknown-type",
                   message='The request type "backlog" is not known.')

    def typing_client(self, spawn: Callable[..., pexpect.spawn]) -> pexpect.spawn:
        """alice, registered (no backlog) and at the mode-1 prompt."""
        child = self.register(spawn)
        child.sendline("1")
        assert self.answer_mode() == 1
        child.expect_exact(PROMPT)
        return child

    def answer_mode(self) -> int:
        """Answer the client's ``mode`` request; the mode it asked."""
        request = self.expect("mode")
        self.reply(request, type="mode", mode=request["mode"])
        mode: int = request["mode"]
        return mode

    def register(self, spawn: Callable[..., pexpect.spawn], *args: str, seq: int = 0,
                 env: dict[str, str] | None = None) -> pexpect.spawn:
        """Start a client named alice, welcome it (no backlog), and wait at the menu."""
        child = spawn("alice", *self.args(), "--no-color", *args, env=env)
        self.accept()
        hello = self.expect("hello")
        self.welcome(hello, seq=seq)
        self.no_backlog()
        child.expect(CHOICE)
        return child

    def drop(self, reset: bool = False) -> None:
        """Cut the connection (``reset``: with an RST rather than a FIN)."""
        assert self.conn is not None
        if reset:  # linger 0: close sends RST instead of FIN
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.conn.close()
        self.conn = None

    def refuse(self) -> None:
        """Stop listening: connections are refused until ``listen``."""
        assert self.listener is not None
        self.listener.close()
        self.listener = None

    def listen(self) -> None:
        """Listen again on the same port."""
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(TIMEOUT)

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


def message(seq: int, text: str, sender: str = "bob", sender_id: int = 7,
            queued: bool = False) -> dict[str, Any]:
    """A broadcast ``message`` event with ``seq``, as SPEC 1.3 writes it."""
    return {"type": "message", "from": {"id": sender_id, "name": sender, "title": None,
                                        "company": None, "status": "available", "mode": 2},
            "to": None, "text": text, "ts": "2026-11-30T05:00:00.000Z", "seq": seq,
            "queued": queued}
