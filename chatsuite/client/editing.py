"""Line editing on a terminal, over the standard library's ``readline``: Tab completion, the
input history kept across runs, and what was typed when Ctrl-C came.

``LineEditor`` is the only code that touches ``readline``, which it imports in ``open`` (never
at import time, so importing the client changes nothing). ``TabCompleter`` is the pure part:
what Tab offers for what is typed. Invariants: only lines typed at the chat prompt enter the
input history (never an address, a name or a menu answer), and its file holds at most
``HISTORY_LENGTH`` lines.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from modes import COMMAND_WORDS

HISTORY_LENGTH = 1000  # lines kept in the input-history file
WORD_DELIMITERS = " \t\n\"'"  # so "/dm", "#view" and "@bob" are each one word to complete


class TabCompleter:
    """What Tab offers: command words first on the line, user names elsewhere (and after ``@``).

    ``names`` gives the names in the order to offer them (most recent speakers first). Commands
    are offered all at once (readline completes their common part and lists them); a name is
    offered one at a time, and Tab again on a name it put in offers the next one, as in irssi,
    so the order of recency is kept.
    """

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names
        self._cycle: list[str] = []  # the names the last Tab could offer, in order
        self._offered = ""  # the word the last Tab put in

    def matches(self, before: str, word: str) -> list[str]:
        """Completions of ``word``; ``before`` is the line before it."""
        first = before.strip() == ""
        prefix = "@" if word.startswith("@") else ""
        if first and not prefix:
            folded = word.casefold()
            return [command for command in COMMAND_WORDS if command.startswith(folded)]
        return self._next_name(word, prefix)

    def _next_name(self, word: str, prefix: str) -> list[str]:
        if word and word == self._offered and self._cycle:
            # Tab again on the name the last Tab put in: the next one, round the list.
            index = self._cycle.index(word[len(prefix):])
            name = self._cycle[(index + 1) % len(self._cycle)]
        else:
            folded = word[len(prefix):].casefold()
            self._cycle = [name for name in self._names() if name.casefold().startswith(folded)]
            if not self._cycle:
                self._offered = ""
                return []
            name = self._cycle[0]
        self._offered = prefix + name
        return [self._offered]


def ordered_names(speakers: Sequence[str], members: Sequence[str], own: str | None) -> list[str]:
    """Names to offer: recent speakers (most recent first), then the members; each name once
    (without regard to case), never one's own."""
    seen = {own.casefold()} if own else set()
    names = []
    for name in [*speakers, *members]:
        if name and name.casefold() not in seen:
            seen.add(name.casefold())
            names.append(name)
    return names


class LineEditor:
    """``readline`` set up for the chat: Tab, history without auto-adding, a prompt hook."""

    def __init__(self, readline: ModuleType) -> None:
        self._readline = readline
        self._completer: TabCompleter | None = None
        self._matches: list[str] = []

    @classmethod
    def open(cls) -> LineEditor | None:
        """The editor, when the platform has GNU readline or libedit; otherwise None."""
        try:
            import readline
        except ImportError:
            return None
        editor = cls(readline)
        readline.set_auto_history(False)
        readline.set_history_length(HISTORY_LENGTH)
        readline.set_completer_delims(WORD_DELIMITERS)
        readline.set_completer(editor._complete)
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")
            # Python turns bracketed paste off for its own prompt; here a paste of several
            # lines is one message (SPEC 4.12), so the terminal is asked to mark pastes.
            readline.parse_and_bind("set enable-bracketed-paste on")
        return editor

    def buffer(self) -> str:
        """What is typed on the line being edited."""
        text: str = self._readline.get_line_buffer()
        return text

    def on_prompt_shown(self, hook: Callable[[], None] | None) -> bool:
        """Call ``hook`` each time a prompt is on screen, before keys are read; False when the
        platform cannot."""
        setter = getattr(self._readline, "set_pre_input_hook", None)
        if setter is None:
            return False
        setter(hook)
        return True

    def complete_with(self, completer: TabCompleter | None) -> None:
        """Complete with ``completer`` from now on (None: Tab completes nothing)."""
        self._completer = completer

    def _complete(self, word: str, state: int) -> str | None:
        if state == 0:
            self._matches = []
            if self._completer is not None:
                line = self._readline.get_line_buffer()
                before = line[:self._readline.get_begidx()]
                try:
                    self._matches = self._completer.matches(before, word)
                except Exception:  # readline would swallow it and Tab would do nothing anyway
                    self._matches = []
        return self._matches[state] if state < len(self._matches) else None

    def remember(self, line: str) -> None:
        """Add a line typed at the chat prompt to the input history (not a repeat of the last)."""
        readline = self._readline
        length = readline.get_current_history_length()
        if line.strip() and (length == 0 or readline.get_history_item(length) != line):
            readline.add_history(line)

    def load(self, path: Path) -> None:
        """Replace the input history with the file's (a missing or unreadable file: empty)."""
        self._readline.clear_history()
        try:
            self._readline.read_history_file(str(path))
        except OSError:
            pass

    def save(self, path: Path) -> None:
        """Write the input history (its last ``HISTORY_LENGTH`` lines) to ``path``, 0600."""
        try:
            self._readline.write_history_file(str(path))
            os.chmod(path, 0o600)
        except OSError:
            pass
