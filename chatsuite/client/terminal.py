"""The client's screen and keyboard: ``Terminal`` (lines, prompts, single keys) and ``Viewer``.

Both threads print (the receiver shows what arrives, the main thread prompts and answers), so
everything written to the screen goes through ``Terminal`` under one lock. Invariants: a line
is always written whole; a line that arrives while a prompt is being typed at replaces the
prompt's row and the prompt is drawn again below it, with what was typed so far; lines reach
the screen in the order they were posted.

On a terminal with line editing (``editing.LineEditor``), the terminal's own echo is off for
the whole session: what is typed is shown by the editor when it reads it, right after its
prompt. So lines typed (or pasted) faster than the answers come back are shown one by one, each
after its prompt and before its answer, never in the middle of one (issue 14, item 3).

In mode 2 keys are read one at a time; a paste (marked by the terminal, or several keys in
one read) is read whole and dropped (``PASTE``), so its letters are never taken for ``e``/``q``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from chatsuite.client.editing import LineEditor, TabCompleter

CLEAR_ROW = "\r\x1b[K"  # to the row's start, then erase it: where a redrawn prompt goes


class Cancelled(KeyboardInterrupt):
    """Ctrl-C on a line with something typed: cancel it (Ctrl-C on an empty line leaves)."""


class Terminal:
    """Printing, prompting and key reading on the real stdin/stdout."""

    def __init__(self, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
        self.stdin = stdin
        self.stdout = stdout
        # Both threads print; guards _mid_line, _prompt and the stream. Held by the main thread
        # from just before a prompt is written until the editor has drawn it (_handing_over).
        self._lock = threading.Lock()
        self._mid_line = False  # the cursor is after a prompt: the next line starts below it
        self._prompt: str | None = None  # the prompt on screen while a line is typed at it
        self._handing_over = False  # main thread: the lock waits for the editor's prompt hook
        self._asking = ""  # main thread: the prompt being handed to the editor
        self._typed_at_interrupt = ""  # main thread: what the line held when Ctrl-C came
        self._critical = False  # main thread: a Ctrl-C now waits (see _uninterrupted)
        self._deferred = False  # main thread: a Ctrl-C came while _critical
        self.editor: LineEditor | None = None
        try:
            self.interactive = stdin.isatty()
        except (AttributeError, ValueError):
            self.interactive = False
        self.saved_mode: Any = None
        if self.interactive and os.name == "posix":
            import termios

            self.saved_mode = termios.tcgetattr(stdin.fileno())

    def start_editing(self) -> None:
        """Edit lines with readline (Tab, history) where the terminal has it; the terminal's
        echo goes off, the editor showing what is typed (see the module docstring)."""
        if not (self.interactive and self.stdin is sys.stdin and self.stdout is sys.stdout):
            return
        try:
            if not self.stdout.isatty():
                return
        except (AttributeError, ValueError):
            return
        editor = LineEditor.open()
        if editor is None or not editor.on_prompt_shown(self._prompt_shown):
            return
        self.editor = editor
        self._echo(False)

    def _echo(self, on: bool) -> None:
        """The terminal's own echo on or off (ICANON and ISIG are kept: Ctrl-C still works).

        readline echoes only when the terminal echoed as it started (else it takes the line
        for a password), so the echo is on while it reads a line (it then turns the terminal's
        off itself) and off between lines, when nobody reads the keyboard."""
        if self.editor is None or self.saved_mode is None:
            return
        import termios

        fd = self.stdin.fileno()
        try:
            mode = termios.tcgetattr(fd)
            mode[3] = mode[3] | termios.ECHO if on else mode[3] & ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, mode)
        except (OSError, termios.error):
            pass

    def show(self, text: str) -> None:
        """Print one line; while a prompt is typed at, above it, and the prompt drawn again."""
        with self._lock:
            if self._prompt is not None and self.editor is not None:
                typed = self.editor.buffer()
                self.stdout.write(f"{CLEAR_ROW}{text}\n{self._prompt}{typed}")
            else:
                start = "\n" if self._mid_line else ""
                self._mid_line = False
                self.stdout.write(start + text + "\n")
            self.stdout.flush()

    def ask(self, prompt: str) -> str:
        """One line typed after ``prompt``; EOFError at the end of input (Ctrl-D); ``Cancelled``
        for Ctrl-C on a line with text, KeyboardInterrupt for Ctrl-C on an empty one."""
        if self.editor is not None:
            return self._edit(prompt)
        with self._lock:
            if self._mid_line:
                self.stdout.write("\n")
            self._mid_line = True  # until a line is typed; Ctrl-C, Ctrl-D or a notice leave it so
            self.stdout.write(prompt)
            self.stdout.flush()
        if self.stdin is sys.stdin and self.stdout is sys.stdout and self.interactive:
            line = input()  # the platform's own line reading (no readline here)
        else:
            line = self.stdin.readline()
            if not line:
                raise EOFError
        with self._lock:
            self._mid_line = False
        return line.rstrip("\r\n")

    def ask_secret(self, prompt: str) -> str:
        """A password typed after ``prompt``, not echoed (``getpass``) on a terminal; from a
        pipe, the next line (there is no screen to hide it from). EOFError at the end of input;
        Ctrl-C is KeyboardInterrupt."""
        if not (self.interactive and self.stdin is sys.stdin and self.stdout is sys.stdout):
            return self.ask(prompt)
        import getpass

        with self._lock:
            if self._mid_line:
                self.stdout.write("\n")
                self.stdout.flush()
            # Until the answer's Enter, the cursor is after the prompt: a Ctrl-C there leaves
            # it so, and the next line (bye, the chat prompt) starts on a row of its own.
            self._mid_line = True
        line = getpass.getpass(prompt)
        with self._lock:
            self._mid_line = False  # getpass ended the line
        return line

    def _edit(self, prompt: str) -> str:
        self._typed_at_interrupt = ""
        try:
            with self._uninterrupted():  # a Ctrl-C between the two would keep the lock held
                self._lock.acquire()  # released by _prompt_shown once the prompt is drawn
                self._handing_over = True
            self._asking = prompt
            if self._mid_line:
                self.stdout.write("\n")
                self.stdout.flush()
            self._mid_line = True
            self._echo(True)
            line = input(prompt)
        except KeyboardInterrupt:
            if self._typed_at_interrupt.strip():
                raise Cancelled from None
            raise
        finally:
            self._echo(False)
            if self._handing_over:
                self._handing_over = False
                self._lock.release()
            with self._lock:
                self._prompt = None
        with self._lock:
            self._mid_line = False
        return line.rstrip("\r\n")

    def _prompt_shown(self) -> None:
        """The editor's hook: its prompt is on screen; other threads may print (above it)."""
        self._critical = True  # readline drops what a hook raises: no Ctrl-C half-way through
        if self._handing_over:
            self._handing_over = False
            self._prompt = self._asking
            self._lock.release()
        self._critical = False
        # A Ctrl-C that came in between is lost here (readline would drop it anyway).
        self._deferred = False

    @contextmanager
    def _uninterrupted(self) -> Iterator[None]:
        """A Ctrl-C waits until the block is done, then interrupts (main thread)."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._deferred:
            self._deferred = False
            raise KeyboardInterrupt

    def interrupt(self) -> None:
        """What SIGINT does (its handler, main thread): note what the line held, then raise
        KeyboardInterrupt, unless a step that must not be cut is running (it raises after)."""
        self.note_interrupt()
        if self._critical:
            self._deferred = True
            return
        raise KeyboardInterrupt

    def note_interrupt(self) -> None:
        """Ctrl-C came (main thread, in the signal handler): remember what the line held."""
        if self.editor is not None and self._prompt is not None:
            self._typed_at_interrupt = self.editor.buffer()

    def remember(self, line: str) -> None:
        """Keep a line typed at the chat prompt in the input history (Up recalls it)."""
        if self.editor is not None:
            self.editor.remember(line)

    def load_history(self, path: Path) -> None:
        """Take the input history from ``path`` (lines typed in earlier runs)."""
        if self.editor is not None:
            self.editor.load(path)

    def save_history(self, path: Path) -> None:
        """Keep the input history in ``path`` for the next run."""
        if self.editor is not None:
            self.editor.save(path)

    def complete_with(self, completer: TabCompleter | None) -> None:
        """What Tab completes from now on."""
        if self.editor is not None:
            self.editor.complete_with(completer)

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
            self._paste_marks(True)
            try:
                yield lambda: _read_posix_key(fd)
            finally:
                self._paste_marks(False)
                termios.tcsetattr(fd, termios.TCSANOW, old)
        else:
            yield _read_windows_key

    def _paste_marks(self, on: bool) -> None:
        """Ask the terminal to mark pastes (or stop), as readline does while it reads a line."""
        if self.editor is None:
            return
        with self._lock:
            self.stdout.write("\x1b[?2004h" if on else "\x1b[?2004l")
            self.stdout.flush()

    def restore(self) -> None:
        """Put the terminal back as we found it (used when the process must end at once)."""
        if self.saved_mode is not None:
            import termios

            try:
                termios.tcsetattr(self.stdin.fileno(), termios.TCSANOW, self.saved_mode)
            except (OSError, termios.error):
                pass


PASTE = "\x1b[200~"
"""What the mode-2 key reader gives for a paste: never a command, whatever letters it holds."""
_PASTE_START, _PASTE_END = b"\x1b[200~", b"\x1b[201~"
PASTE_QUIET = 0.2  # seconds without input that end an unmarked paste read in mode 2


def _read_posix_key(fd: int) -> str | None:
    chunk = os.read(fd, 4096)
    if not chunk or chunk == b"\x04":
        return None  # end of input, or Ctrl-D
    if chunk.startswith(_PASTE_START):
        _swallow_paste(fd, chunk, marked=True)
        return PASTE
    if chunk.startswith(b"\x1b"):
        return ""  # an arrow or function key: its letters (F2 is ESC O Q) are not commands
    text = chunk.decode("utf-8", "replace")
    if len(text) > 1:
        # More than one key in one read: a paste the terminal did not mark. Its "e" or "q"
        # must not switch modes or quit, nor its rest be typed in mode 1.
        _swallow_paste(fd, chunk, marked=False)
        return PASTE
    return text


def _swallow_paste(fd: int, chunk: bytes, marked: bool) -> None:
    """Read and drop the rest of a paste: up to its end mark, or until the input pauses."""
    import select

    seen = chunk  # for a marked paste: enough of the end to find a mark split across reads
    while not (marked and _PASTE_END in seen):
        ready, _, _ = select.select([fd], [], [], 2.0 if marked else PASTE_QUIET)
        if not ready:
            return  # the input paused: the paste is over (or its end mark was lost)
        more = os.read(fd, 4096)
        if not more:
            return
        seen = seen[-(len(_PASTE_END) - 1):] + more


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
