"""The client's screen and keyboard: ``Terminal`` (lines, prompts, single keys) and ``Viewer``.

Both threads print (the receiver shows what arrives, the main thread prompts), so every line
goes through ``Terminal.show`` under one lock. Invariant: a line printed while a prompt is on
screen starts below the prompt, and lines reach the screen in the order they were posted.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class Terminal:
    """Printing, prompting and key reading on the real stdin/stdout."""

    def __init__(self, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self._lock = threading.Lock()  # both threads print; guards _mid_line
        self._mid_line = False  # a prompt is on screen: the next line must start below it
        try:
            self.interactive = stdin.isatty()
        except (AttributeError, ValueError):
            self.interactive = False
        self.saved_mode: Any = None
        if self.interactive and os.name == "posix":
            import termios

            self.saved_mode = termios.tcgetattr(stdin.fileno())

    def show(self, text: str) -> None:
        """Print one line (below a prompt on screen, if there is one)."""
        with self._lock:
            start = "\n" if self._mid_line else ""
            self._mid_line = False
            self.stdout.write(start + text + "\n")
            self.stdout.flush()

    def ask(self, prompt: str) -> str:
        """One line typed after ``prompt``; EOFError at the end of input (Ctrl-D)."""
        with self._lock:
            self._mid_line = True  # until a line is typed; Ctrl-C, Ctrl-D or a notice leave it so
        if self.stdin is sys.stdin and self.stdout is sys.stdout:
            line = input(prompt)  # readline editing when available
        else:
            self.stdout.write(prompt)
            self.stdout.flush()
            line = self.stdin.readline()
            if not line:
                raise EOFError
        with self._lock:
            self._mid_line = False
        return line.rstrip("\r\n")

    @contextmanager
    def keys(self) -> Iterator[Callable[[], str | None]]:
        """Mode 2's key reader: single keys on a terminal, lines from a pipe; None at the end."""
        if not self.interactive:
            yield lambda: self.stdin.readline() or None
        elif os.name == "posix":
            import termios

            fd = self.stdin.fileno()
            old = termios.tcgetattr(fd)
            new = termios.tcgetattr(fd)
            # cbreak: keys at once, no echo, Ctrl-C works
            new[3] &= ~(termios.ECHO | termios.ICANON)
            new[6][termios.VMIN], new[6][termios.VTIME] = 1, 0
            termios.tcsetattr(fd, termios.TCSANOW, new)  # TCSANOW: keys typed already are kept
            try:
                yield lambda: _read_posix_key(fd)
            finally:
                termios.tcsetattr(fd, termios.TCSANOW, old)
        else:
            yield _read_windows_key

    def restore(self) -> None:
        """Put the terminal back as we found it (used when the process must end at once)."""
        if self.saved_mode is not None:
            import termios

            try:
                termios.tcsetattr(self.stdin.fileno(), termios.TCSANOW, self.saved_mode)
            except (OSError, termios.error):
                pass


def _read_posix_key(fd: int) -> str | None:
    chunk = os.read(fd, 32)
    if not chunk or chunk == b"\x04":
        return None  # end of input, or Ctrl-D
    if chunk.startswith(b"\x1b"):
        return ""  # an arrow or function key: its letters (F2 is ESC O Q) are not commands
    return chunk.decode("utf-8", "replace")[0]


def _read_windows_key() -> str | None:
    import msvcrt

    while not msvcrt.kbhit():  # type: ignore[attr-defined]
        time.sleep(0.05)  # poll, so that Ctrl-C and a lost connection are noticed
    key: str = msvcrt.getwch()  # type: ignore[attr-defined]
    if key in ("\x00", "\xe0"):
        msvcrt.getwch()  # type: ignore[attr-defined]  # second half of a special key
        return ""
    return None if key in ("\x03", "\x04", "\x1a") else key


class Viewer:
    """Shows incoming lines while viewing (mode 2) and keeps them, in order, while typing (mode 1).

    With the native protocol the server holds events while we type, but some can cross our
    ``mode 1`` request on the wire; with the line protocol the server never holds anything. Both
    end up here, and are shown, before anything newer, when viewing starts again.
    """

    def __init__(self, show: Callable[[str], None]) -> None:
        self._show = show
        self._lock = threading.Lock()  # guards viewing and kept, so nothing is shown out of order
        self._viewing = False
        self._kept: list[str] = []

    def start_viewing(self) -> None:
        """Show everything kept, in order; from now on lines are shown at once."""
        with self._lock:
            self._viewing = True
            kept, self._kept = self._kept, []
            for line in kept:
                self._show(line)

    def stop_viewing(self) -> None:
        """From now on lines are kept."""
        with self._lock:
            self._viewing = False

    def post(self, line: str) -> None:
        """Show ``line`` now while viewing, or keep it for later while typing."""
        with self._lock:
            if self._viewing:
                self._show(line)
            else:
                self._kept.append(line)

    def say(self, line: str) -> None:
        """Show ``line`` at once, whatever the mode (about us: shutdown, refusals, log failures)."""
        self._show(line)
