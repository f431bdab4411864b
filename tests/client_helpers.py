"""Driving the real ``chat_client.py`` in a pseudo-terminal (pexpect), shared by the client tests.

``ClientPrograms`` starts the program with the same terminal, environment and history folder for
every test file and kills every child it started; the functions read what a child printed. Each
test file keeps a thin ``spawn`` fixture that adds its own arguments (protocol, host, port).
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

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


def command(child: pexpect.spawn, line: str) -> str:
    """Type ``line`` in mode 1; what the client printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return EDITOR_CODES.sub("", child.before).replace("\r\n", "\n").removeprefix(line + "\n")
