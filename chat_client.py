"""The terminal chat client (SPEC section 4): connect, register, then type (mode 1) or view (mode 2).

Theory of operation. One socket, two threads:

* the receiver thread is the only reader of the socket. It decodes events; a reply (an event
  carrying the ``ref`` of one of our requests) goes to the request waiting for it; a ``message``
  or ``notice`` goes to the ``Viewer``, which prints it while viewing and keeps it while typing;
  a ``ping`` is answered with ``pong``.
* the main thread is the only reader of the keyboard. It sends requests and waits for their
  replies (``Connection.request``).

Every write to the socket goes through ``Connection.send``, under one lock (the receiver's
``pong`` is the only write from the other thread). When the connection ends under us, or the
server announces ``shutdown``, the receiver records why and wakes the main thread with SIGINT,
which interrupts whatever it is blocked in (a prompt, a key read, a wait for a reply); the main
thread then sees the recorded failure, prints it and exits 1. A watchdog ends the process if the
main thread cannot be woken (Windows console input), so the client never hangs.

Every string that comes from the network goes through ``sanitize`` before it reaches the terminal
or a history file: control characters and bidirectional overrides are shown, never interpreted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from colorama import Fore, Style

from modes import (
    HELP_TEXT,
    AskSend,
    Broadcast,
    DirectMessage,
    HelpCommand,
    HistoryCommand,
    Invalid,
    Mode,
    QuitCommand,
    StatusCommand,
    SwitchMode,
    UsersCommand,
    read_mode_choice,
    read_typed_line,
    read_view_key,
)
from protocol import EventDecoder, encode, parse_target

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4040  # seed 004's prompt defaults and seed 001's port
DEFAULT_HISTORY_DIR = "~/.chat-suite/history"
CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 10.0  # the server answers at once (SPEC 1.2); longer means it is gone
BYE_TIMEOUT = 1.0  # how long a leaving client waits for ``bye`` before closing anyway
WATCHDOG_DELAY = 3.0  # how long the main thread has to notice a lost connection

LOST = "connection to the server was lost"
SHUT_DOWN = "connection to the server was closed: the server shut down"
MENU = "1- type in your own message, 2- View other user messages"
VIEW_HINT = "viewing messages: press e to type, q to quit"

# --------------------------------------------------------------------------------------------
# Pure helpers: sanitising, formatting, history file names. No I/O.

# C0 controls, DEL, C1 controls, and the invisible characters that reorder or break lines:
# bidirectional marks, embeddings, overrides and isolates (the "Trojan Source" set), U+2028/9.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)  # caret notation: ESC is ^[, BEL is ^G
    if code <= 0xFF:
        return f"\\x{code:02x}"  # DEL and C1 (\x9b is a one-byte CSI)
    return f"\\u{code:04x}"


def sanitize(text: Any, newline: str | None = None) -> str:
    """``text`` made safe to print: every control or bidi character shown visibly, never obeyed.

    A newline is shown as ``^J`` unless ``newline`` says what to put in its place.
    """
    if not isinstance(text, str):
        text = "-" if text is None else str(text)
    if newline is None:
        return _UNSAFE.sub(_visible, text)
    return newline.join(_UNSAFE.sub(_visible, part) for part in text.split("\n"))


def local_time(ts: Any, fmt: str = "%H:%M:%S") -> str:
    """A server timestamp (UTC, ISO 8601) as local time; ``--:--:--`` when it is not one."""
    try:
        moment = datetime.fromisoformat(ts)
    except (TypeError, ValueError):
        return "--:--:--"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime(fmt)


@dataclass(frozen=True)
class Palette:
    """Terminal colours; with ``enabled`` False every method returns its text unchanged."""

    enabled: bool = False

    def paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{Style.RESET_ALL}" if self.enabled else text

    def time(self, text: str) -> str:
        return self.paint(text, Style.DIM)

    def name(self, text: str) -> str:
        return self.paint(text, Fore.CYAN + Style.BRIGHT)

    def direct(self, text: str) -> str:
        return self.paint(text, Fore.MAGENTA + Style.BRIGHT)

    def notice(self, text: str) -> str:
        return self.paint(text, Fore.YELLOW)

    def good(self, text: str) -> str:
        return self.paint(text, Fore.GREEN)

    def bad(self, text: str) -> str:
        return self.paint(text, Fore.RED + Style.BRIGHT)


def use_colour(no_color_flag: bool, environ: Mapping[str, str], stream: TextIO) -> bool:
    """Colour only on a terminal, without ``--no-color`` and without ``NO_COLOR`` (no-color.org)."""
    if no_color_flag or environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


CONTINUATION = "\n    "
"""What a newline inside a message text becomes on screen: an indented continuation line."""


def describe_user(user: Any) -> str:
    """``name (id 5, title: Engineer, company: Acme)``; absent title or company left out."""
    if not isinstance(user, dict):
        return "?"
    details = [f"id {sanitize(user.get('id'))}"]
    for field in ("title", "company"):
        if user.get(field):
            details.append(f"{field}: {sanitize(user[field])}")
    return f"{sanitize(user.get('name'))} ({', '.join(details)})"


def format_message(event: dict[str, Any], palette: Palette = Palette()) -> str:
    """A ``message`` event as one screen line (continuation lines for newlines in the text)."""
    raw = event.get("from")
    sender: dict[str, Any] = raw if isinstance(raw, dict) else {}
    stamp = palette.time(local_time(event.get("ts")))
    text = sanitize(event.get("text"), CONTINUATION)
    if event.get("to") is None:
        return f"{stamp} {palette.name(sanitize(sender.get('name')))}: {text}"
    return f"{stamp} {palette.direct('[direct]')} {palette.name(describe_user(sender))}: {text}"


def format_notice(event: dict[str, Any], palette: Palette = Palette()) -> str:
    """A ``notice`` event (joined, left, lost, dropped, shutdown) as one screen line."""
    stamp = palette.time(local_time(event.get("ts")))
    return f"{stamp} {palette.notice('* ' + sanitize(event.get('text'), CONTINUATION))}"


def format_users(users: Any, own_id: Any = None) -> list[str]:
    """The ``users`` reply as an aligned table: id, name, title, company, status."""
    header = ("id", "name", "title", "company", "status")
    rows = [header]
    for user in users if isinstance(users, list) else []:
        if isinstance(user, dict):
            name = sanitize(user.get("name")) + (" (you)" if user.get("id") == own_id else "")
            rows.append((sanitize(user.get("id")), name, sanitize(user.get("title")),
                         sanitize(user.get("company")), sanitize(user.get("status"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_delivery(reply: dict[str, Any]) -> str:
    """The ``ok`` reply to a send, for people."""
    return (f"message sent (delivered to {sanitize(reply.get('delivered', 0))}, "
            f"held for {sanitize(reply.get('queued', 0))})")


def format_failure(reply: dict[str, Any]) -> str:
    """An ``error`` reply to a send, with the server's own sentence (seed 004)."""
    return f"failed to deliver message because {sanitize(reply.get('message'))}"


def history_path(directory: Path, peer_id: int) -> Path:
    """The direct-message log with one peer: ``<directory>/<id>.log`` (an int: no path tricks)."""
    return directory / f"{int(peer_id)}.log"


def history_line(when: datetime, direction: str, peer_name: Any, text: Any) -> str:
    """One log line: ``2026-11-22 07:00:01 sent to bob: hi`` (newlines in the text as ``\\n``)."""
    return f"{when.strftime('%Y-%m-%d %H:%M:%S')} {direction} {sanitize(peer_name)}: " + sanitize(
        text, "\\n"
    )


def parse_port(text: str) -> int | None:
    """A port typed at the prompt: Enter means 4040; None when it is not a port number."""
    text = text.strip()
    if not text:
        return DEFAULT_PORT
    if text.isascii() and text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


# --------------------------------------------------------------------------------------------
# The socket: one receiver thread, one lock-protected writing path.


class ConnectionLost(Exception):
    """The connection ended (or the server stopped answering); the text says why."""


class Connection:
    """A native-protocol connection: requests with refs out, replies matched back by ref."""

    def __init__(self, sock: socket.socket, on_event: Callable[[dict[str, Any]], None],
                 on_end: Callable[[], None]) -> None:
        self._sock = sock
        self._on_event = on_event  # message, notice and stray errors (receiver thread)
        self._on_end = on_end  # wakes the main thread when the connection fails under it
        self._send_lock = threading.Lock()  # the one writing path: requests and pongs
        self._state_lock = threading.Lock()  # guards failure, closing, _woken and _waiting
        self._waiting: dict[int, queue.Queue[dict[str, Any] | None]] = {}
        self._refs = itertools.count(1)
        self._ended = False
        self._woken = False
        self.closing = False  # we chose to leave: the end of the stream is expected
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._receive, name="receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, obj: dict[str, Any]) -> None:
        """Write one frame; ``ConnectionLost`` when the socket is gone."""
        data = encode(obj)
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError:
            self.fail(LOST)
            raise ConnectionLost(self.failure) from None

    def request(self, obj: dict[str, Any], timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """Send ``obj`` with a fresh ref and return the server's reply to it."""
        ref = next(self._refs)
        replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with self._state_lock:
            if self._ended:
                raise ConnectionLost(self.failure or LOST)
            self._waiting[ref] = replies
        try:
            self.send({**obj, "ref": ref})
            reply = replies.get(timeout=timeout)
        except queue.Empty:
            self.fail("the server did not answer; disconnected")
            raise ConnectionLost(self.failure) from None
        finally:
            with self._state_lock:
                self._waiting.pop(ref, None)
        if reply is None:
            raise ConnectionLost(self.failure or LOST)
        return reply

    def fail(self, reason: str) -> None:
        """Record why the session cannot go on (first reason wins) and wake the main thread once."""
        with self._state_lock:
            if self.closing:
                return
            if self.failure is None:
                self.failure = reason
            wake, self._woken = not self._woken, True
        if wake:
            self._on_end()

    def _receive(self) -> None:
        decoder = EventDecoder()
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                for event in decoder.feed(data):
                    self._dispatch(event)
        except OSError:
            pass  # a reset or our own close: both end the stream
        finally:
            with self._state_lock:
                self._ended = True
                waiting = list(self._waiting.values())
            for replies in waiting:
                replies.put(None)
            self.fail(LOST)

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind, ref = event.get("type"), event.get("ref")
        if kind == "ping":
            try:
                self.send({"type": "pong"} if ref is None else {"type": "pong", "ref": ref})
            except ConnectionLost:
                pass
            return
        if kind == "error" and event.get("code") == "server-full":
            # The server closes right after this (SPEC 1.2): record the real reason before the
            # end of the stream records "lost".
            self.fail(f"the server refused the connection: {sanitize(event.get('message'))}")
        with self._state_lock:
            replies = self._waiting.get(ref) if isinstance(ref, int) else None
        if replies is not None:
            replies.put(event)
        else:
            self._on_event(event)

    def close(self) -> None:
        """Close the socket; the end of the stream that follows is expected."""
        with self._state_lock:
            self.closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def quit(self) -> None:
        """Tell the server we leave (``quit``), wait briefly for ``bye``, close."""
        with self._state_lock:
            self.closing = True
        try:
            self.request({"type": "quit"}, timeout=BYE_TIMEOUT)
        except ConnectionLost:
            pass
        self.close()


# --------------------------------------------------------------------------------------------
# History logs and the viewer (what the receiver thread shows).


class History:
    """Direct-message logs, one append-only file per peer id (seed 003)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()  # the receiver logs what arrives, the main thread what it sends

    def record(self, peer_id: Any, line: str) -> str | None:
        """Append ``line`` to the peer's log; a sentence when it could not be written."""
        if isinstance(peer_id, bool) or not isinstance(peer_id, int):
            return None
        try:
            with self._lock:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                with history_path(self.directory, peer_id).open("a", encoding="utf-8") as log:
                    log.write(line + "\n")
        except OSError as error:
            return f"could not write the history file: {sanitize(error.strerror or error)}"
        return None

    def read(self, peer_id: int) -> list[str]:
        """The peer's log lines, made safe to print; empty when there is none."""
        try:
            with history_path(self.directory, peer_id).open(encoding="utf-8", errors="replace") as log:
                return [sanitize(line.rstrip("\n")) for line in log if line.strip()]
        except OSError:
            return []


class Viewer:
    """Shows message and notice events while viewing; keeps them while typing.

    The server holds events while we type, but some can cross our ``mode 1`` request on the
    wire; those are kept here and shown, before anything newer, when viewing starts again.
    """

    def __init__(self, show: Callable[[str], None], palette: Palette, history: History,
                 on_shutdown: Callable[[], None]) -> None:
        self._show = show
        self._palette = palette
        self._history = history
        self._on_shutdown = on_shutdown
        self._lock = threading.Lock()  # guards viewing and kept, so nothing is shown out of order
        self._viewing = False
        self._kept: list[str] = []

    def start_viewing(self) -> None:
        with self._lock:
            self._viewing = True
            kept, self._kept = self._kept, []
            for line in kept:
                self._show(line)

    def stop_viewing(self) -> None:
        with self._lock:
            self._viewing = False

    def deliver(self, event: dict[str, Any]) -> None:
        """Called by the receiver thread for every event that is not a reply."""
        kind = event.get("type")
        if kind == "message":
            line = format_message(event, self._palette)
            if event.get("to") is not None:
                self._log_received(event)
        elif kind == "notice":
            line = format_notice(event, self._palette)
            if event.get("event") == "shutdown":
                self._show(line)  # said at once, whatever the mode, then the session ends
                self._on_shutdown()
                return
        elif kind == "error":
            # An error that answers no waiting request (the server refusing the connection,
            # or a late reply): rare and about us, so said at once, whatever the mode.
            self._show(self._palette.bad(f"server: {sanitize(event.get('message'))}"))
            return
        else:
            return
        with self._lock:
            if self._viewing:
                self._show(line)
            else:
                self._kept.append(line)

    def _log_received(self, event: dict[str, Any]) -> None:
        raw = event.get("from")
        sender: dict[str, Any] = raw if isinstance(raw, dict) else {}
        when = datetime.now()
        if isinstance(event.get("ts"), str):
            try:
                when = datetime.fromisoformat(event["ts"]).astimezone()
            except ValueError:
                pass
        problem = self._history.record(
            sender.get("id"), history_line(when, "received from", sender.get("name"), event.get("text"))
        )
        if problem:
            self._show(self._palette.bad(problem))


# --------------------------------------------------------------------------------------------
# The terminal: lines, prompts and single keys.


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
        """A key reader for mode 2: single keys on a terminal, lines from a pipe; None at the end."""
        if not self.interactive:
            yield lambda: self.stdin.readline() or None
        elif os.name == "posix":
            import termios

            fd = self.stdin.fileno()
            old = termios.tcgetattr(fd)
            new = termios.tcgetattr(fd)
            new[3] &= ~(termios.ECHO | termios.ICANON)  # cbreak: keys at once, no echo, Ctrl-C works
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


# --------------------------------------------------------------------------------------------
# The session: register, then the two modes.


class Client:
    """One registered session: the mode menu, mode 1 commands and mode 2 viewing."""

    def __init__(self, conn_socket: socket.socket, terminal: Terminal, palette: Palette,
                 history: History, wake_main: Callable[[], None],
                 name: str | None = None, title: str | None = None,
                 company: str | None = None) -> None:
        self.terminal = terminal
        self.show = terminal.show
        self.ask = terminal.ask
        self.palette = palette
        self.history = history
        self.viewer = Viewer(self.show, palette, history, lambda: self.conn.fail(SHUT_DOWN))
        self.conn = Connection(conn_socket, self.viewer.deliver, wake_main)
        self.name, self.title, self.company = name, title, company
        self.own_id: Any = None
        self.exiting = False  # set first thing when ending: later wake-ups are ignored

    def run(self) -> int:
        """The whole session; the exit code (0 chosen, 1 connection failure)."""
        self.conn.start()
        try:
            self.register()
            mode: Mode | None = self.choose_mode()
            while mode is not None:
                mode = self.typing() if mode is Mode.TYPING else self.viewing()
        except (KeyboardInterrupt, EOFError, ConnectionLost):
            pass
        return self.finish()

    def finish(self) -> int:
        """End the session: a failure is said and gives 1; a chosen exit tells the server, gives 0."""
        self.exiting = True
        if self.conn.failure:
            self.conn.close()
            self.show(self.palette.bad(self.conn.failure))
            return 1
        self.conn.quit()
        self.show("bye")
        return 0

    # ---- start-up

    def register(self) -> None:
        name = self.name
        if name is None:
            name = self.ask("your name (Enter for an automatic one): ").strip()
            self.title = self.title or self.ask("your job title (Enter for none): ").strip() or None
            self.company = self.company or self.ask("your company (Enter for none): ").strip() or None
        while True:
            hello: dict[str, Any] = {"type": "hello"}
            for key, value in (("name", name), ("title", self.title), ("company", self.company)):
                if value:
                    hello[key] = value
            reply = self.conn.request(hello)
            if reply.get("type") == "welcome":
                self.own_id = reply.get("id")
                self.show(self.palette.good(
                    f"welcome {sanitize(reply.get('name'))}, your id is {sanitize(reply.get('id'))}"
                    f" ({sanitize(reply.get('online'))} online)"))
                return
            reason = sanitize(reply.get("message"))
            if reply.get("code") not in ("name-taken", "bad-name"):
                self.conn.fail(f"the server refused the connection: {reason}")
                raise ConnectionLost(self.conn.failure)
            self.show(self.palette.bad(f"that name cannot be used: {reason}"))
            name = self.ask("your name (Enter for an automatic one): ").strip()

    def choose_mode(self) -> Mode:
        self.show(MENU)
        while True:
            mode = read_mode_choice(self.ask("your choice (1 or 2): "))
            if mode is not None:
                return mode
            self.show("please type 1 or 2")

    # ---- mode 1

    def typing(self) -> Mode | None:
        """Mode 1: read and carry out lines; the next mode, or None to quit."""
        self.viewer.stop_viewing()
        self.conn.request({"type": "mode", "mode": int(Mode.TYPING)})
        while True:
            command = read_typed_line(self.ask("type in your text: "))
            if isinstance(command, SwitchMode):
                return command.mode
            if isinstance(command, QuitCommand):
                return None
            if isinstance(command, Broadcast):
                self.report(self.conn.request({"type": "say", "text": command.text}))
            elif isinstance(command, DirectMessage):
                self.send_direct(command.to, command.text)
            elif isinstance(command, AskSend):
                to = self.ask("receiver id: ").strip()
                text = self.ask("message: ")
                if to and text.strip():
                    self.send_direct(to, text)
                else:
                    self.show("nothing sent: a receiver id and a message are needed")
            elif isinstance(command, UsersCommand):
                for row in format_users(self.users(), self.own_id):
                    self.show(row)
            elif isinstance(command, StatusCommand):
                reply = self.conn.request({"type": "status"})
                self.show(f"your status is now {sanitize(reply.get('status'))}")
            elif isinstance(command, HistoryCommand):
                self.show_history(command.peer)
            elif isinstance(command, HelpCommand):
                self.show(HELP_TEXT)
            elif isinstance(command, Invalid):
                self.show(command.reason)
            # Nothing (an empty line): prompt again.

    def report(self, reply: dict[str, Any]) -> bool:
        """Say whether a send worked; True when it did."""
        if reply.get("type") == "ok":
            self.show(self.palette.good(format_delivery(reply)))
            return True
        self.show(self.palette.bad(format_failure(reply)))
        return False

    def users(self) -> list[dict[str, Any]]:
        users = self.conn.request({"type": "users"}).get("users")
        return [user for user in users if isinstance(user, dict)] if isinstance(users, list) else []

    def find_user(self, who: str) -> dict[str, Any] | None:
        """The connected user named ``who`` (a name, any case, or an id), or None."""
        target = parse_target(who)
        for user in self.users():
            name = user.get("name")
            if user.get("id") == target or (
                isinstance(target, str) and isinstance(name, str)
                and name.casefold() == target.casefold()
            ):
                return user
        return None

    def send_direct(self, to: str, text: str) -> None:
        peer = self.find_user(to)  # for the log: its id names the file
        reply = self.conn.request({"type": "dm", "to": parse_target(to), "text": text})
        if self.report(reply) and peer is not None:
            problem = self.history.record(
                peer.get("id"), history_line(datetime.now(), "sent to", peer.get("name"), text))
            if problem:
                self.show(self.palette.bad(problem))

    def show_history(self, peer: str | None) -> None:
        if peer is None:
            peer = self.ask("user id: ").strip()
            if not peer:
                return
        target = parse_target(peer)
        if isinstance(target, str):
            user = self.find_user(target)
            if user is None or not isinstance(user.get("id"), int):
                self.show(f'nobody named "{sanitize(target)}" is connected; '
                          "give the id to see an older history")
                return
            target = user["id"]
        lines = self.history.read(target)
        for line in lines or ["No History"]:
            self.show(line)

    # ---- mode 2

    def viewing(self) -> Mode | None:
        """Mode 2: show what the server sends until ``e`` (typing) or ``q`` (None: quit)."""
        with self.terminal.keys() as read_key:
            self.show(VIEW_HINT)
            self.viewer.start_viewing()
            self.conn.request({"type": "mode", "mode": int(Mode.VIEWING)})
            while True:
                key = read_key()
                if key is None:
                    return None
                action = read_view_key(key)
                if action.quit:
                    return None
                if action.mode is not None:
                    return action.mode


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chat-client", description="Terminal client of the chat suite.")
    parser.add_argument("name", nargs="?", help="your user name (asked when absent)")
    parser.add_argument("title", nargs="?", help="your job title")
    parser.add_argument("company", nargs="?", help="your company")
    parser.add_argument("--host", help=f"server address (asked when absent; default {DEFAULT_HOST})")
    parser.add_argument("--port", type=_port_argument,
                        help=f"server port (asked when absent; default {DEFAULT_PORT})")
    parser.add_argument("--no-color", action="store_true", help="no colours")
    parser.add_argument("--history-dir", default=DEFAULT_HISTORY_DIR,
                        help=f"folder of the direct-message logs (default {DEFAULT_HISTORY_DIR})")
    return parser.parse_args(argv)


def _port_argument(text: str) -> int:
    port = parse_port(text) if text.strip() else None
    if port is None:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


def ask_address(args: argparse.Namespace, terminal: Terminal) -> tuple[str, int]:
    """The server's address: options first, then prompts on a terminal, then the defaults."""
    host, port = args.host, args.port
    if host is None:
        host = DEFAULT_HOST
        if terminal.interactive:
            host = terminal.ask(f"server address [{DEFAULT_HOST}]: ").strip() or DEFAULT_HOST
    while port is None:
        if not terminal.interactive:
            port = DEFAULT_PORT
            break
        port = parse_port(terminal.ask(f"server port [{DEFAULT_PORT}]: "))
        if port is None:
            terminal.show("a port is a number from 1 to 65535")
    return host, port


def _waker(terminal: Terminal, client_ref: list[Client]) -> Callable[[], None]:
    """How the receiver wakes the main thread: SIGINT to it, and a watchdog if that fails."""
    main_ident = threading.get_ident()

    def force_exit() -> None:
        client = client_ref[0]
        if client.exiting:
            return
        terminal.restore()
        terminal.show(client.conn.failure or LOST)
        os._exit(1)

    def wake() -> None:
        client = client_ref[0] if client_ref else None
        if client is None or client.exiting:
            return
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(main_ident, signal.SIGINT)
        else:
            import _thread

            _thread.interrupt_main()
        watchdog = threading.Timer(WATCHDOG_DELAY, force_exit)
        watchdog.daemon = True
        watchdog.start()

    return wake


def main(argv: list[str] | None = None) -> int:
    """Run the client; 0 when the user chose to leave, 1 when the connection failed."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a non-UTF-8 terminal gets "?", not a traceback
    colour = use_colour(args.no_color, os.environ, sys.stdout)
    if colour:
        import colorama

        colorama.just_fix_windows_console()
    try:
        import readline  # noqa: F401  (line editing for input(), where the platform has it)
    except ImportError:
        pass
    terminal = Terminal()
    palette = Palette(colour)
    client_ref: list[Client] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if client_ref and client_ref[0].exiting:
            return  # already ending: a late wake-up must not interrupt the goodbye
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        host, port = ask_address(args, terminal)
    except (EOFError, KeyboardInterrupt):
        terminal.show("bye")
        return 0
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except ConnectionRefusedError:
        terminal.show(palette.bad(
            f"could not connect to the server at {sanitize(host)}:{port}: "
            "the connection was refused (is the server running?)"))
        return 1
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        terminal.show(palette.bad(
            f"could not connect to the server at {sanitize(host)}:{port}: {sanitize(reason)}"))
        return 1
    except KeyboardInterrupt:
        terminal.show("bye")
        return 0
    sock.settimeout(None)
    terminal.show("you are now connected to the server")
    history = History(Path(args.history_dir).expanduser())
    client = Client(sock, terminal, palette, history, _waker(terminal, client_ref),
                    args.name, args.title, args.company)
    client_ref.append(client)
    try:
        return client.run()
    except KeyboardInterrupt:  # a wake-up that landed while the session was already ending
        return client.finish()


if __name__ == "__main__":
    raise SystemExit(main())
