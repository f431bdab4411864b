"""The client's private files (SPEC 4.11): direct-message logs and the input history.

``History`` is the only code that touches them. They live in one folder per server and own
name, ``<history-dir>/<host>_<port>/<own name>/``: a log per peer name (``<peer>.log``) and the
lines typed at the prompt (``input.history``). Invariants: every folder on that path that this
code makes or uses is 0700 and every file 0600, so another person on the same computer account
reads nothing through it; a name never picks a file outside its folder (names are case-folded
and percent-encoded); every log line is written and read through ``sanitize``, so a log never
holds or prints a raw control character.
"""

from __future__ import annotations

import os
import stat
import threading
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from chatsuite.client.display import sanitize

FOLDER_MODE = 0o700
FILE_MODE = 0o600
INPUT_HISTORY = "input.history"  # never a peer's log: those all end in ".log"
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a planted symbolic link is not written through


HistoryKey = str
"""Whose log: a peer's name (an id is first resolved to a name: ids are reused)."""


def file_name(name: str) -> str:
    """``name`` as one safe path component: case-folded, percent-encoded, never ``.`` or ``..``.

    Our server treats names without regard to case, so ``Bob`` and ``bob`` share a file; ``/``
    becomes ``%2F`` and a leading dot ``%2E``, so no name can reach outside its folder.
    """
    safe = quote(name.casefold(), safe="")
    if safe.startswith("."):
        safe = "%2E" + safe[1:]
    return safe or "%00"


def server_folder(host: str, port: int) -> str:
    """The folder of one server: ``<host>_<port>`` (``127.0.0.1_4040``), made safe."""
    return f"{file_name(host)}_{int(port)}"


def history_path(directory: Path, server: str, own_name: str, peer: str) -> Path:
    """The direct-message log of ``own_name`` with ``peer`` on ``server`` (a ``server_folder``)."""
    return directory / server / file_name(own_name) / f"{file_name(peer)}.log"


def history_line(when: datetime, direction: str, peer_name: Any, text: Any) -> str:
    """One log line: ``2026-11-22 07:00:01 sent to bob: hi`` (newlines in the text as ``\\n``)."""
    stamp = when.strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} {direction} {sanitize(peer_name)}: " + sanitize(text, "\\n")


def is_history_key(peer: Any) -> bool:
    """True for a peer name a log can be kept under: a non-empty string."""
    return isinstance(peer, str) and peer.strip() != ""


def private_folder(path: Path) -> None:
    """Make ``path`` (and missing parents) a folder only its owner can enter: 0700."""
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != FOLDER_MODE:
        path.chmod(FOLDER_MODE)  # made by an older client, or by hand: tightened


def name_folder(directory: Path, folder: Path) -> None:
    """Make the history ``directory`` and, in it, ``folder`` (``<host>_<port>/<name>``) with its
    server's folder, those two 0700 (``private_folder``)."""
    directory.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    private_folder(folder.parent)
    private_folder(folder)


def private_file(path: Path) -> int:
    """Open ``path`` for appending, created 0600 (an existing file is tightened); a descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NO_FOLLOW, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


class History:
    """One person's files for one server; ``own_name`` (set once registered) picks the folder."""

    def __init__(self, directory: Path, host: str, port: int) -> None:
        self.directory = directory
        self.server = server_folder(host, port)
        self.own_name: str | None = None  # the name the server gave us (may change)
        self._lock = threading.Lock()  # the receiver logs what arrives, the main thread sends

    def folder(self) -> Path | None:
        """``<history-dir>/<host>_<port>/<own name>``, or None before registration."""
        if not self.own_name:
            return None
        return self.directory / self.server / file_name(self.own_name)

    def path(self, peer: str) -> Path | None:
        """The log with ``peer``, or None before registration."""
        if not self.own_name:
            return None
        return history_path(self.directory, self.server, self.own_name, peer)

    def prepare(self) -> Path | None:
        """Make the own folder (0700 at each level from the server's folder on); None before
        registration."""
        folder = self.folder()
        if folder is None:
            return None
        name_folder(self.directory, folder)
        return folder

    def record(self, peer: Any, line: str) -> str | None:
        """Append ``line`` to the peer's log; a sentence when it could not be written."""
        if not is_history_key(peer) or self.path(peer) is None:
            return None
        try:
            with self._lock:
                self.prepare()
                path = self.path(peer)
                assert path is not None
                fd = private_file(path)
                with os.fdopen(fd, "a", encoding="utf-8") as log:
                    log.write(line + "\n")
        except OSError as error:
            return f"could not write the history file: {sanitize(error.strerror or error)}"
        return None

    def read(self, peer: str) -> list[str]:
        """The peer's log lines, made safe to print; empty when there is none."""
        path = self.path(peer) if is_history_key(peer) else None
        if path is None:
            return []
        try:
            with path.open(encoding="utf-8", errors="replace") as log:
                return [sanitize(line.rstrip("\n")) for line in log if line.strip()]
        except (OSError, ValueError):
            return []

    def input_history(self) -> Path | None:
        """The file of lines typed at the prompt (0600, beside the logs), its folder made; None
        before registration or when the folder cannot be made."""
        try:
            folder = self.prepare()
            if folder is None:
                return None
            path = folder / INPUT_HISTORY
            os.close(private_file(path))
        except OSError:
            return None
        return path
