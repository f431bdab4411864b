"""What every client session shares, whatever protocol it speaks: the link and the two modes.

* ``Link``: one connection to the server. Its receiver thread is the only reader of the
  transport; it hands what arrives to ``feed`` (protocol-specific), and when the stream ends,
  or the session cannot go on, records why (``fail``: the first reason wins) and wakes the
  main thread once.
* ``Session``: the mode menu, the mode-1 command loop and mode-2 viewing, on top of a few
  protocol-specific steps (``register``, ``broadcast``, ``send_direct``, ...) that
  ``client_native.NativeSession`` and ``client_line.LineSession`` provide.

Invariant: after ``fail`` the main thread is woken exactly once, and a session that ``close``s
its link on purpose is never woken by the end of the stream that follows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from chatsuite.client.display import Palette
from chatsuite.client.history import History, HistoryKey, history_line
from chatsuite.client.terminal import Terminal, Viewer
from chatsuite.client.transport import Transport
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

REPLY_TIMEOUT = 10.0  # the server answers at once (SPEC 1.2); longer means it is gone
BYE_TIMEOUT = 1.0  # how long a leaving client waits for ``bye`` before closing anyway

LOST = "connection to the server was lost"
SHUT_DOWN = "connection to the server was closed: the server shut down"
MENU = "1- type in your own message, 2- View other user messages"
VIEW_HINT = "viewing messages: press e to type, q to quit"


def closed_early(tls: bool) -> str:
    """Why a connection ended before the server answered anything."""
    hint = "" if tls else " (if the server uses TLS, add --tls)"
    return f"the server closed the connection without answering{hint}"


class ConnectionLost(Exception):
    """The connection ended (or the server stopped answering); the text says why."""


class Link:
    """One connection: a receiver thread feeding ``feed``, a shared writing path, and its end."""

    def __init__(self, transport: Transport, on_end: Callable[[], None]) -> None:
        self.transport = transport
        self._on_end = on_end  # wakes the main thread when the connection fails under it
        self._state_lock = threading.Lock()  # guards failure, closing, ended and _woken
        self.ended = False  # the receiver saw the end of the stream
        self._woken = False
        self.closing = False  # we chose to leave: the end of the stream is expected
        self.failure: str | None = None
        self.received_any = False  # receiver thread only
        self._thread = threading.Thread(target=self._receive, name="receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send_bytes(self, data: bytes) -> None:
        """Write ``data``; ``ConnectionLost`` when the socket is gone."""
        try:
            self.transport.sendall(data)
        except OSError:
            self.fail(LOST)
            raise ConnectionLost(self.failure or LOST) from None

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

    def close(self) -> None:
        """Close the connection; the end of the stream that follows is expected."""
        with self._state_lock:
            self.closing = True
        self.transport.close()

    def feed(self, data: bytes) -> None:
        """Handle received bytes (receiver thread)."""
        raise NotImplementedError

    def stream_ended(self) -> None:
        """The stream ended: release waiting requests and say why (receiver thread)."""
        self.fail(LOST if self.received_any else closed_early(self.transport.tls))

    def _receive(self) -> None:
        try:
            while True:
                data = self.transport.recv()
                if not data:
                    break
                self.received_any = True
                self.feed(data)
        except OSError:
            pass  # a reset, a broken TLS record or our own close: all end the stream
        finally:
            with self._state_lock:
                self.ended = True
            self.stream_ended()


class Session:
    """One session: register, then the mode menu, mode 1 (typing) and mode 2 (viewing)."""

    receiver_prompt = "receiver id: "
    history_prompt = "user id: "
    link: Link

    def __init__(self, terminal: Terminal, palette: Palette, history: History,
                 name: str | None = None, title: str | None = None,
                 company: str | None = None) -> None:
        self.terminal = terminal
        self.show = terminal.show
        self.ask = terminal.ask
        self.palette = palette
        self.history = history
        self.viewer = Viewer(self.show)
        self.name, self.title, self.company = name, title, company
        self.exiting = False  # set first thing when ending: later wake-ups are ignored
        self.ending: str | None = None  # why the main thread itself ended the session

    @property
    def failure(self) -> str | None:
        """Why the session cannot go on, or None."""
        return self.ending or self.link.failure

    def run(self) -> int:
        """The whole session; the exit code (0 chosen, 1 connection failure)."""
        self.link.start()
        try:
            self.register()
            mode: Mode | None = self.choose_mode()
            while mode is not None:
                mode = self.typing() if mode is Mode.TYPING else self.viewing()
        except (KeyboardInterrupt, EOFError, ConnectionLost):
            pass
        return self.finish()

    def finish(self) -> int:
        """End the session: a failure is said, gives 1; a chosen exit tells the server, gives 0."""
        self.exiting = True
        if self.failure:
            self.link.close()
            self.show(self.palette.bad(self.failure))
            return 1
        self.leave()
        self.show("bye")
        return 0

    def choose_mode(self) -> Mode:
        self.show(MENU)
        while True:
            mode = read_mode_choice(self.ask("your choice (1 or 2): "))
            if mode is not None:
                return mode
            self.show("please type 1 or 2")

    def typing(self) -> Mode | None:
        """Mode 1: read and carry out lines; the next mode, or None to quit."""
        self.viewer.stop_viewing()
        self.enter_mode(Mode.TYPING)
        while True:
            command = read_typed_line(self.ask("type in your text: "))
            if isinstance(command, SwitchMode):
                return command.mode
            if isinstance(command, QuitCommand):
                return None
            if isinstance(command, Broadcast):
                self.broadcast(command.text)
            elif isinstance(command, DirectMessage):
                self.send_direct(command.to, command.text)
            elif isinstance(command, AskSend):
                self.ask_send()
            elif isinstance(command, UsersCommand):
                self.show_users()
            elif isinstance(command, StatusCommand):
                self.toggle_status()
            elif isinstance(command, HistoryCommand):
                self.show_history(command.peer)
            elif isinstance(command, HelpCommand):
                self.show(self.help_text())
            elif isinstance(command, Invalid):
                self.show(command.reason)
            # Nothing (an empty line): prompt again.

    def ask_send(self) -> None:
        """``send`` (seed 003): ask for the receiver, then the message, and send it."""
        to = self.ask(self.receiver_prompt).strip()
        text = self.ask("message: ")
        if to and text.strip():
            self.send_direct(to, text)
        else:
            self.show(f"nothing sent: a {self.receiver_prompt[:-2]} and a message are needed")

    def viewing(self) -> Mode | None:
        """Mode 2: show what arrives until ``e`` (typing) or ``q`` (None: quit)."""
        with self.terminal.keys() as read_key:
            self.show(VIEW_HINT)
            self.viewer.start_viewing()
            self.enter_mode(Mode.VIEWING)
            while True:
                key = read_key()
                if key is None:
                    return None
                action = read_view_key(key)
                if action.quit:
                    return None
                if action.mode is not None:
                    return action.mode

    def show_history(self, peer: str | None) -> None:
        """Print the direct-message log with ``peer`` (asked when None), or ``No History``."""
        if peer is None:
            peer = self.ask(self.history_prompt).strip()
            if not peer:
                return
        key = self.history_key(peer)
        if key is None:
            return
        for line in self.history.read(key) or ["No History"]:
            self.show(line)

    def log(self, peer: Any, direction: str, peer_name: Any, text: Any,
            when: datetime | None = None) -> None:
        """Append one direct message to the peer's log; a failure to write is said at once."""
        problem = self.history.record(
            peer, history_line(when or datetime.now(), direction, peer_name, text))
        if problem:
            self.viewer.say(self.palette.bad(problem))

    def report_failure(self, reason: str) -> None:
        """Say why a send failed (SPEC 4.4: ``failed to deliver message because ...``)."""
        self.show(self.palette.bad(f"failed to deliver message because {reason}"))

    # ---- what each protocol provides

    def register(self) -> None:
        raise NotImplementedError

    def enter_mode(self, mode: Mode) -> None:
        raise NotImplementedError

    def broadcast(self, text: str) -> None:
        raise NotImplementedError

    def send_direct(self, to: str, text: str) -> None:
        raise NotImplementedError

    def show_users(self) -> None:
        raise NotImplementedError

    def toggle_status(self) -> None:
        raise NotImplementedError

    def history_key(self, peer: str) -> HistoryKey | None:
        """Whose log ``peer`` (as typed) means; None after saying why there is none."""
        raise NotImplementedError

    def leave(self) -> None:
        """The chosen exit: tell the server if the protocol can, and close."""
        raise NotImplementedError

    def help_text(self) -> str:
        return HELP_TEXT

