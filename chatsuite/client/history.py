"""The client's direct-message logs (seed 003): one append-only file per peer.

``History`` is the only code that touches the log files. Every line is written and read
through ``sanitize``, so a log never holds or prints a raw control character.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from chatsuite.client.display import sanitize

HistoryKey = int | str
"""Whose log: a peer id (native protocol), or a peer name (line protocol, which has no ids)."""


def history_path(directory: Path, peer: HistoryKey) -> Path:
    """The direct-message log with one peer: ``<id>.log``, or ``name-<name>.log`` for a name.

    An id is an int, and a name is case-folded and percent-encoded (``/`` is ``%2F``), so no
    peer can name a file outside ``directory``; the ``name-`` prefix keeps names and ids apart.
    """
    if isinstance(peer, int):
        return directory / f"{int(peer)}.log"
    return directory / f"name-{quote(peer.casefold(), safe='')}.log"


def history_line(when: datetime, direction: str, peer_name: Any, text: Any) -> str:
    """One log line: ``2026-11-22 07:00:01 sent to bob: hi`` (newlines in the text as ``\\n``)."""
    return f"{when.strftime('%Y-%m-%d %H:%M:%S')} {direction} {sanitize(peer_name)}: " + sanitize(
        text, "\\n"
    )


def is_history_key(peer: Any) -> bool:
    """True for an int id (not a bool) or a non-empty name."""
    if isinstance(peer, bool):
        return False
    return isinstance(peer, int) or (isinstance(peer, str) and peer != "")


class History:
    """Direct-message logs, one append-only file per peer (seed 003)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # The receiver logs what arrives, the main thread what it sends.
        self._lock = threading.Lock()

    def record(self, peer: Any, line: str) -> str | None:
        """Append ``line`` to the peer's log; a sentence when it could not be written."""
        if not is_history_key(peer):
            return None
        try:
            with self._lock:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                with history_path(self.directory, peer).open("a", encoding="utf-8") as log:
                    log.write(line + "\n")
        except OSError as error:
            return f"could not write the history file: {sanitize(error.strerror or error)}"
        return None

    def read(self, peer: HistoryKey) -> list[str]:
        """The peer's log lines, made safe to print; empty when there is none."""
        try:
            with history_path(self.directory, peer).open(encoding="utf-8", errors="replace") as log:
                return [sanitize(line.rstrip("\n")) for line in log if line.strip()]
        except (OSError, ValueError):
            return []
