"""What every client session shares, whatever protocol it speaks: the link and the two modes.

* ``Link``: one connection to the server. Its receiver thread is the only reader of the
  transport; it hands what arrives to ``feed`` (protocol-specific), and when the stream ends,
  or the session cannot go on, records why (``fail``: the first reason wins) and wakes the
  main thread once.
* ``Session``: the mode menu, the mode-1 command loop and mode-2 viewing, on top of a few
  protocol-specific steps (``register``, ``broadcast``, ``send_direct``, ...) that
  ``client_native.NativeSession`` and ``client_line.LineSession`` provide.

* ``Names``: the names Tab completes (recent speakers first, then the members).

Keys (SPEC 4.12): Ctrl-C on typed text asks the same question again; Ctrl-C in a command's
own question (``receiver id:``) or while its answer is awaited cancels that command; Ctrl-C on
an empty prompt, Ctrl-D and the quit words end the session as a chosen exit. A Ctrl-C is told
from the receiver's wake-up (also SIGINT) by ``failure``, which the wake-up sets first.

Invariant: after ``fail`` the main thread is woken exactly once, and a session that ``close``s
its link on purpose is never woken by the end of the stream that follows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from chatsuite.client.display import BELL, Palette, mentions, sanitize
from chatsuite.client.editing import TabCompleter, ordered_names
from chatsuite.client.history import History, HistoryKey, history_line
from chatsuite.client.terminal import PASTE, Cancelled, Terminal, Viewer
from chatsuite.client.transport import Transport
from modes import (
    HELP_TEXT,
    AskSend,
    BacklogCommand,
    Broadcast,
    Command,
    DirectMessage,
    HelpCommand,
    HistoryCommand,
    Invalid,
    Mode,
    ModerateCommand,
    PasswordCommand,
    QuitCommand,
    RegisterCommand,
    StatusCommand,
    SwitchMode,
    UsersCommand,
    read_mode_choice,
    read_typed_line,
    read_view_key,
)

REPLY_TIMEOUT = 10.0  # the server answers at once (SPEC 1.2); past this, it did not answer
BYE_TIMEOUT = 1.0  # how long a leaving client waits for ``bye`` before closing anyway

LOST = "connection to the server was lost"
SHUT_DOWN = "connection to the server was closed: the server shut down"
MENU = "1- type in your own message, 2- View other user messages"
PROMPT = "type in your text: "  # seed 000
VIEW_HINT = "viewing messages: press e to type, q to quit"
PASTE_HINT = "a paste is not read while viewing: press e to type, then paste"
NO_ACCOUNTS = "accounts and moderation need the native protocol (this is the line protocol)"


def closed_early(tls: bool) -> str:
    """Why a connection ended before the server answered anything."""
    hint = "" if tls else " (if the server uses TLS, add --tls)"
    return f"the server closed the connection without answering{hint}"


class Names:
    """The names Tab offers: recent speakers (receiver thread) and the members (main thread)."""

    SPEAKERS = 50  # most recent speakers remembered
    REFRESH = 3.0  # seconds a member list asked of the server is used before asking again

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards speakers: the receiver adds, the main thread reads
        self.speakers: list[str] = []  # most recent first
        self.members: list[str] = []
        self.own: str | None = None
        self.asked: float | None = None  # when the members were last asked (monotonic)

    def spoke(self, name: str) -> None:
        with self._lock:
            folded = name.casefold()
            self.speakers = [name] + [n for n in self.speakers if n.casefold() != folded]
            del self.speakers[self.SPEAKERS:]

    def stale(self, now: float) -> bool:
        return self.asked is None or now - self.asked > self.REFRESH

    def ordered(self) -> list[str]:
        with self._lock:
            speakers = list(self.speakers)
        return ordered_names(speakers, self.members, self.own)


class ConnectionLost(Exception):
    """The connection ended; the text says why."""


class Refused(ConnectionLost):
    """The server refused us for a reason that trying again cannot mend (a ban, say): the
    session ends, a reconnection stops."""


class RequestFailed(Exception):
    """One request could not be done, but the connection goes on; the text says why, to people."""


class NoReply(RequestFailed):
    """The server did not answer a request in time (its late answer, if any, is dropped)."""


class TooLong(RequestFailed):
    """The request is over the server's frame limit: not sent (SPEC 4.10)."""


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
        # The main thread knows this link failed and deals with it: its wake-up is not needed
        # (a reconnecting client must not be ended by the watchdog, nor its SIGINT taken for
        # a key).
        self.noticed = False
        self._thread = threading.Thread(target=self._receive, name="receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send_bytes(self, data: bytes) -> None:
        """Write ``data``; ``ConnectionLost`` when the socket is gone."""
        try:
            self.transport.sendall(data)
        except OSError:
            self.fail(LOST)
            self.noticed = True
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
    history_prompt = "user name or id: "
    link: Link

    def __init__(self, terminal: Terminal, palette: Palette, history: History,
                 name: str | None = None, title: str | None = None,
                 company: str | None = None) -> None:
        self.terminal = terminal
        self.show = terminal.show
        self.ask = self.ask_again  # a prompt of its own: Ctrl-C on typed text asks it again
        self.palette = palette
        self.history = history
        self.viewer = Viewer(self.show)
        self.name, self.title, self.company = name, title, company
        self.exiting = False  # set first thing when ending: later wake-ups are ignored
        self.ending: str | None = None  # why the main thread itself ended the session
        self.bell = True  # ring when a message shown names us (--no-bell: never)
        self.known_names = Names()
        self._input_history: Path | None = None  # where the lines typed here are kept
        # One entry per wake-up sent (receiver thread appends, the SIGINT handler pops): tells
        # the receiver's SIGINT from a Ctrl-C typed.
        self.wakes: deque[int] = deque()

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
        """End the session: a failure is said, giving 1; a chosen exit tells the server, 0."""
        self.exiting = True
        if self._input_history is not None:
            self.terminal.save_history(self._input_history)
        if self.failure:
            self.link.close()
            self.show(self.palette.bad(self.failure))
            return 1
        self.leave()
        self.show("bye")
        return 0

    def ask_again(self, prompt: str) -> str:
        """A line typed at ``prompt``; Ctrl-C on typed text clears it and asks again (Ctrl-C on
        an empty line, KeyboardInterrupt, leaves)."""
        while True:
            try:
                return self.terminal.ask(prompt)
            except Cancelled:
                if self.failure:
                    raise  # the receiver's wake-up, not a key: the session ends

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
            line = self.ask(PROMPT)
            self.terminal.remember(line)
            command = read_typed_line(line)
            if isinstance(command, SwitchMode):
                return command.mode
            if isinstance(command, QuitCommand):
                return None
            try:
                self.carry_out(command)
            except RequestFailed as problem:
                self.show(self.palette.bad(str(problem)))
            except KeyboardInterrupt:
                if self.failure:
                    raise
                # Ctrl-C in a question (receiver id:) or while an answer was awaited: that
                # command is dropped and the prompt comes back (a late answer is ignored).

    def carry_out(self, command: Command) -> None:
        """Do what a typed line asks (all but switching mode and quitting)."""
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
        elif isinstance(command, BacklogCommand):
            self.show_backlog(command.count)
        elif isinstance(command, Invalid):
            self.show(sanitize(command.reason))
        else:
            self.carry_out_access(command)

    def carry_out_access(self, command: Command) -> None:
        """The account and admin commands (SPEC 7); anything else (an empty line) is nothing."""
        if isinstance(command, RegisterCommand):
            self.register_account()
        elif isinstance(command, PasswordCommand):
            self.change_password()
        elif isinstance(command, ModerateCommand):
            self.moderate(command)

    def ask_send(self) -> None:
        """``send`` (seed 003): ask for the receiver, then the message, and send it.

        Asked of the terminal directly: Ctrl-C in either question drops the command."""
        to = self.terminal.ask(self.receiver_prompt).strip()
        text = self.terminal.ask("message: ")
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
                if key == PASTE:
                    self.show(PASTE_HINT)
                    continue
                action = read_view_key(key)
                if action.quit:
                    return None
                if action.mode is not None:
                    return action.mode

    def show_history(self, peer: str | None) -> None:
        """Print the direct-message log with ``peer`` (asked when None), or ``No History``."""
        if peer is None:
            peer = self.terminal.ask(self.history_prompt).strip()
            if not peer:
                return
        key = self.history_key(peer)
        if key is None:
            return
        for line in self.history.read(key) or ["No History"]:
            self.show(line)

    def registered(self, name: Any) -> None:
        """The server gave us ``name``: our private files (logs, input history) are the ones of
        that name from now on, and Tab completes the others' names."""
        if not isinstance(name, str) or not name:
            return
        before = self._input_history
        if before is not None:
            # The lines typed so far are written first: the old name's stay its own, and
            # a re-registration under the same name (a reconnection) loses none of them.
            self.terminal.save_history(before)
        self.history.own_name = name
        self.known_names.own = name
        self._input_history = self.history.input_history()
        if self._input_history is not None and self._input_history != before:
            # Another name (or the first registration): that name's lines, from its file.
            # The same file is not read again: the lines in memory are already its own.
            self.terminal.load_history(self._input_history)
        self.terminal.complete_with(TabCompleter(self.completion_names))

    def completion_names(self) -> list[str]:
        """The names Tab offers: recent speakers first, then the members (asked of the server
        at most every few seconds)."""
        if self.known_names.stale(time.monotonic()):
            try:
                self.known_names.members = self.member_names()
            except (ConnectionLost, RequestFailed):
                pass
            self.known_names.asked = time.monotonic()
        return self.known_names.ordered()

    def heard(self, sender: Any, text: Any) -> str:
        """A message from ``sender`` is shown: remember the speaker; the bell when it names us."""
        if isinstance(sender, str):
            self.known_names.spoke(sender)
        own = self.history.own_name
        return BELL if self.bell and own and isinstance(text, str) and mentions(text, own) else ""

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

    def member_names(self) -> list[str]:
        """The names of the members now (asked of the server)."""
        raise NotImplementedError

    def leave(self) -> None:
        """The chosen exit: tell the server if the protocol can, and close."""
        raise NotImplementedError

    def show_backlog(self, count: int | None) -> None:
        """``/backlog [N]``: earlier room messages from the server, where the protocol has them."""
        self.show("this protocol has no earlier messages to show")

    def register_account(self) -> None:
        """``/register`` (SPEC 7.2); only the native protocol has accounts."""
        self.show(NO_ACCOUNTS)

    def change_password(self) -> None:
        """``/password`` (SPEC 7.2); only the native protocol has accounts."""
        self.show(NO_ACCOUNTS)

    def moderate(self, command: ModerateCommand) -> None:
        """``/kick``, ``/mute``, ``/unmute``, ``/ban`` (SPEC 7.3); native protocol only."""
        self.show(NO_ACCOUNTS)

    def help_text(self) -> str:
        return HELP_TEXT

