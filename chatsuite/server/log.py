"""The server log (SPEC 3): timestamped lines, written by its own thread, never waited for.

Chat threads (readers, the acceptor, the stop) only append a small record to a bounded buffer
under a lock held for a few instructions; the log thread takes the whole buffer at once, formats
it (escaping message texts with ``chatsuite.dialects.escape``), writes it and flushes. When the
output stalls (Ctrl-S in the terminal, a pipe nobody reads, a slow disk), only the log thread
waits: records past the bound are dropped and counted, and once the output moves again a line
says how many were lost.

Invariant: no call from a chat thread ever waits for the output, and the records held for a
stalled output stay within the bound (``max_lines`` lines, ``max_chars`` characters, or one
record alone), plus the batch the log thread is writing.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

from chatsuite.dialects import escape

MAX_LINES = 10_000  # unwritten lines held while the output is stalled
MAX_CHARS = 1024 * 1024  # unwritten message characters held (at most 4 MiB of str)
STOP_WAIT = 0.3  # longest the stop waits for the buffer to reach the output
# After each write the log thread lets records gather this long, so under load a chat thread
# wakes it at most about 50 times a second (waking a thread per line costs more than the
# write it saves: docs/performance.md). Lines keep the time of their event.
LINGER = 0.02
# Records formatted between two releases of the interpreter lock: a long run of formatting
# would otherwise hold it for a whole switch interval (5 ms) each time a chat thread comes
# back from a system call and wants it (the "convoy effect").
CHUNK = 64


class Stream(Protocol):
    """Where stamped lines go: a text stream (standard output); its ``fileno``, when it has
    one, is written directly."""

    def write(self, data: str, /) -> int: ...

    def flush(self) -> None: ...


# A record: (when, sender, to, texts); sender None means a ready line, texts[0] its text.
Record = tuple[float, str | None, str, list[str]]


def message_lines(sender: str, to: str, texts: list[str], quiet: bool) -> str:
    """The log text of relayed messages (seed 001), one line each, escaped; ``quiet`` keeps only
    their length."""
    if quiet:
        return "\n".join(f"message {sender} -> {to} ({len(t)} characters)" for t in texts)
    return "\n".join(f"message {sender} -> {to}: {escape(t)}" for t in texts)


def dropped_line(count: int) -> str:
    """The line that says how many log lines a stalled output cost."""
    return f"({count} log lines dropped while the output was stalled)"


class Log:
    """The server's log: ``log(text)`` and ``log.messages(...)`` enqueue; its thread writes.

    ``sink`` receives each record's text, unstamped (a test's ``logs.append``); without it the
    lines go, stamped with the local time, to ``stream`` (default: standard output).
    """

    def __init__(
        self,
        sink: Callable[[str], None] | None = None,
        stream: Stream | None = None,
        *,
        quiet: bool = False,
        max_lines: int = MAX_LINES,
        max_chars: int = MAX_CHARS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.quiet = quiet
        self._sink = sink
        self._stream = stream
        self._max_lines = max_lines
        self._max_chars = max_chars
        self._clock = clock
        # Guards the buffer and the counters below; never held while formatting or writing.
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._lines = 0  # lines in _records
        self._chars = 0  # message characters in _records
        self._dropped = 0  # lines dropped since the last report
        self._wake = threading.Event()  # set by the put that makes the buffer non-empty
        self._closed = threading.Event()  # set by close(): no more lingering
        self.thread = threading.Thread(target=self._run, name="log", daemon=True)
        self.thread.start()

    # -- chat threads ---------------------------------------------------------------------------

    def __call__(self, text: str) -> None:
        """Log one line (or several, separated by newlines); never waits."""
        self._put((self._clock(), None, "", [text]), 1, 0)

    def messages(self, sender: str, to: str, texts: list[str]) -> None:
        """Log relayed messages; the texts are formatted later, by the log thread."""
        # The texts are held (not copied) until written, quiet or not: they count.
        self._put((self._clock(), sender, to, texts), len(texts), sum(map(len, texts)))

    def _put(self, record: Record, lines: int, chars: int) -> None:
        with self._lock:
            # Into an empty buffer any record fits: one big batch of messages alone never costs
            # log lines, only an output too slow to take what keeps coming.
            if self._records and (self._lines + lines > self._max_lines
                                  or self._chars + chars > self._max_chars):
                self._dropped += lines
                return
            self._records.append(record)
            self._lines += lines
            self._chars += chars
            wake = len(self._records) == 1  # otherwise the log thread is already woken
        if wake:
            self._wake.set()

    def close(self, timeout: float = STOP_WAIT) -> bool:
        """Write what is buffered and end the thread, waiting at most ``timeout`` seconds for a
        stalled output; True when everything was written."""
        self._closed.set()
        self._wake.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- the log thread -------------------------------------------------------------------------

    def _take(self) -> tuple[list[Record], int]:
        with self._lock:
            records, self._records = self._records, []
            dropped, self._dropped = self._dropped, 0
            self._lines = self._chars = 0
            self._wake.clear()
        return records, dropped

    def _run(self) -> None:
        while True:
            self._wake.wait()
            closing = self._closed.is_set()
            records, dropped = self._take()
            texts: list[tuple[float, str]] = []
            for start in range(0, len(records), CHUNK):
                if start:
                    time.sleep(0)  # let the chat threads have the interpreter lock
                texts.extend((r[0], self._format(r)) for r in records[start:start + CHUNK])
            if dropped:
                texts.append((self._clock(), dropped_line(dropped)))
            if texts:
                self._write(texts)
            if closing:
                return
            self._closed.wait(LINGER)

    def _format(self, record: Record) -> str:
        _, sender, to, texts = record
        return texts[0] if sender is None else message_lines(sender, to, texts, self.quiet)

    def _write(self, texts: list[tuple[float, str]]) -> None:
        if self._sink is not None:
            for _, text in texts:
                try:
                    self._sink(text)
                except Exception:  # a broken sink loses its line, never the log
                    pass
            return
        try:
            out: list[str] = []
            second, stamp = -1, ""
            for when, text in texts:
                if int(when) != second:  # one strftime per second of events, not per line
                    second = int(when)
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
                out.extend(f"{stamp} {part}\n" for part in text.split("\n"))
            self._write_stream("".join(out))
        except Exception:  # a broken console must not end the log
            pass

    def _write_stream(self, data: str) -> None:
        stream = self._stream or sys.stdout
        try:
            fd = int(getattr(stream, "fileno")())  # noqa: B009 - not every stream has one
        except (AttributeError, OSError, ValueError):
            fd = -1
        if fd < 0:
            stream.write(data)
            stream.flush()
            return
        # Straight to the file descriptor: a write blocked on a stalled output then holds no
        # lock of the stream's, so the interpreter can still flush and exit while it waits.
        raw = memoryview(data.encode(getattr(stream, "encoding", None) or "utf-8", "replace"))
        while raw:
            raw = raw[os.write(fd, raw):]
