"""The client speaking the seed 002 line protocol (SPEC 2.1 and 4.9), to our server or another.

That protocol has no refs: a reply is known only by coming next. So the main thread sends one
request at a time and the receiver thread hands it the first non-``DELIVERY`` line that follows;
``DELIVERY`` lines go to the ``Viewer`` (kept while typing, shown while viewing), since the
server never holds anything for a line client. Invariant: at most one request is outstanding,
and every reply line goes to it, in order, or, with none outstanding, is shown as it is.

Both published versions work: the client asks ``WHO`` first (some 2020 servers close the
connection on a command they do not know) and switches to ``LIST`` for good when the answer is
``BAD-RQST-HDR`` (or ``BAD_RQST_HDR``); a bad destination is ``BAD-DEST-USER`` or ``UNKNOWN``.
What the protocol cannot do (broadcast, status, ids) is refused with a sentence.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from datetime import datetime
from typing import Any

from chatsuite.client.display import format_delivery_line, format_names, sanitize
from chatsuite.client.history import HistoryKey
from chatsuite.client.session import (
    LOST,
    REPLY_TIMEOUT,
    ConnectionLost,
    Link,
    Session,
    closed_early,
)
from chatsuite.client.terminal import Terminal
from chatsuite.client.transport import ConnectError, Transport
from chatsuite.dialects import ServerLine, line, parse_server_line, split_delivery, split_names
from modes import HELP_TEXT, Mode
from protocol import LF, MAX_FRAME, Oversized, Splitter

BUSY = "the server is busy: it has no room for another client; try again later"
NO_BROADCAST = 'the line protocol cannot broadcast: use /dm <user> "text"'
NO_STATUS = "the line protocol has no status: you are always available"
NAME_NEEDED = "the line protocol needs a name: please type one"
BAD_DEST_REPLIES = ("BAD-DEST-USER", "UNKNOWN")  # 2021 and 2020 versions
LINE_HELP = (
    "With --protocol line: a direct message is the only way to send (no broadcast, no /bc),\n"
    "there is no /status, and users are named, not numbered (give names where ids are asked).")


def raw_text(reply: ServerLine) -> str:
    """A reply line as the server wrote it (underscores normalised), made safe to print."""
    return sanitize(f"{reply.kind} {reply.body}".rstrip() if reply.kind != "OTHER" else reply.body)


class LineLink(Link):
    """A line-protocol connection: one request at a time, its reply being the next reply line."""

    def __init__(self, transport: Transport, on_delivery: Callable[[str, str], None],
                 on_stray: Callable[[ServerLine], None], on_end: Callable[[], None]) -> None:
        super().__init__(transport, on_end)
        self._on_delivery = on_delivery
        self._on_stray = on_stray  # a reply line nobody asked for
        self._splitter = Splitter(LF, MAX_FRAME)
        self._replies: queue.Queue[ServerLine | None] = queue.Queue()
        self._outstanding = False  # a request waits for its reply (_state_lock)
        self._abandoned = 0  # replies still to come for requests given up by Ctrl-C (same)
        self.logged_in = False  # before, the end of the stream is a failed login, not a failure

    def request(self, text: str, timeout: float = REPLY_TIMEOUT) -> ServerLine:
        """Send one command line and return the reply line that follows it."""
        with self._state_lock:
            if self.ended:
                raise ConnectionLost(self.failure or LOST)
            self._outstanding = True
        self.send_bytes(line(text))
        try:
            reply = self._replies.get(timeout=timeout)
        except KeyboardInterrupt:
            self._abandon()
            raise
        except queue.Empty:
            self.fail("the server did not answer; disconnected")
            raise ConnectionLost(self.failure) from None
        if reply is None:
            raise ConnectionLost(self.failure or LOST)
        return reply

    def _abandon(self) -> None:
        """Ctrl-C while a reply was awaited: its reply, now or later, answers nothing."""
        with self._state_lock:
            if self._outstanding:
                self._outstanding = False
                self._abandoned += 1  # still to come: feed drops it
            else:
                try:
                    self._replies.get_nowait()  # already here: dropped now
                except queue.Empty:
                    pass

    def feed(self, data: bytes) -> None:
        for raw in self._splitter.feed(data):
            if isinstance(raw, Oversized):
                continue  # a line longer than any reply or message we could show: skipped
            reply = parse_server_line(raw)
            if reply.kind == "DELIVERY":
                self._on_delivery(*split_delivery(reply.body))
                continue
            with self._state_lock:
                if self._abandoned:
                    self._abandoned -= 1  # replies come in order: this one was given up
                    continue
                mine, self._outstanding = self._outstanding, False
                if mine:
                    self._replies.put(reply)  # under the lock: _abandon sees it or drops it
            if mine:
                continue
            if reply.kind == "BUSY":
                self.fail(BUSY)  # some servers say it on connecting, before any login
            else:
                self._on_stray(reply)

    def stream_ended(self) -> None:
        self._replies.put(None)
        if self.logged_in:
            self.fail(LOST if self.received_any else closed_early(self.transport.tls))


class LineSession(Session):
    """A session in the line protocol: names only, direct messages only, modes kept locally."""

    receiver_prompt = "receiver name: "
    history_prompt = "user name: "
    link: LineLink

    def __init__(self, transport: Transport, terminal: Terminal, *args: Any,
                 wake_main: Callable[[], None], reconnect: Callable[[], Transport],
                 **kwargs: Any) -> None:
        super().__init__(terminal, *args, **kwargs)
        self._wake_main = wake_main
        self._reconnect = reconnect  # a new transport to the same server; ConnectError if not
        self.link = self._new_link(transport)
        self.use_list = False  # True once the server has said it does not know WHO

    def _new_link(self, transport: Transport) -> LineLink:
        return LineLink(transport, self.deliver, self.stray, self._wake_main)

    # ---- the receiver thread's side

    def deliver(self, sender: str, text: str) -> None:
        """A ``DELIVERY``: shown like a direct message, logged under the sender's name."""
        now = datetime.now()
        self.viewer.post(format_delivery_line(sender, text, now, self.palette)
                         + self.heard(sender or None, text))
        if sender:
            self.log(sender, "received from", sender, text, now)

    def stray(self, reply: ServerLine) -> None:
        """A line that answers nothing we asked: said at once, whatever the mode."""
        self.viewer.say(self.palette.bad(f"server: {raw_text(reply)}"))

    # ---- the main thread's side

    def register(self) -> None:
        name = self.name or ""
        reconnected = False
        while True:
            while not name:
                name = self.ask("your name: ").strip()
                if not name:
                    self.show(NAME_NEEDED)
            try:
                if self.link.ended:
                    self.connect_again()
                reply = self.link.request(f"HELLO-FROM {name}")
            except ConnectionLost:
                if self.link.failure or reconnected:
                    self.ending = self.link.failure or (
                        "the server closed the connection at login" if self.link.received_any
                        else closed_early(self.link.transport.tls))
                    raise
                # The server closed after the last failed login (or just now): a fresh
                # connection, the same name, once.
                reconnected = True
                self.connect_again()
                continue
            reconnected = False
            if reply.kind == "HELLO":
                self.name = reply.body.strip() or name
                self.registered(self.name)
                self.link.logged_in = True
                if self.link.ended:  # closed between the answer and now: no quieter than lost
                    self.link.fail(LOST)
                self.show(self.palette.good(f"welcome {sanitize(self.name)}"))
                return
            if reply.kind == "BUSY":
                self.ending = BUSY
                raise ConnectionLost(BUSY)
            if reply.kind == "IN-USE":
                self.show(self.palette.bad(f"that name is taken: {sanitize(name)} is in use"))
            elif reply.kind == "BAD-RQST-BODY":
                self.show(self.palette.bad(f"that name cannot be used: the server refused "
                                           f"{sanitize(name)} as invalid"))
            else:
                self.ending = (f"the server does not speak the line protocol: it answered "
                               f"HELLO-FROM with {raw_text(reply)}")
                raise ConnectionLost(self.ending)
            name = ""

    def connect_again(self) -> None:
        """Replace a connection the server closed with a new one (before login only)."""
        self.link.close()
        try:
            transport = self._reconnect()
        except ConnectError as error:
            self.ending = str(error)
            raise ConnectionLost(self.ending) from None
        self.link = self._new_link(transport)
        self.link.start()

    def enter_mode(self, mode: Mode) -> None:
        pass  # the server never holds anything for a line client: the Viewer does it here

    def broadcast(self, text: str) -> None:
        self.show(self.palette.bad(NO_BROADCAST))

    def toggle_status(self) -> None:
        self.show(self.palette.bad(NO_STATUS))

    def names(self) -> list[str] | None:
        """The members' names: ``WHO`` until the server says it does not know it, then ``LIST``."""
        command = "LIST" if self.use_list else "WHO"
        reply = self.link.request(command)
        if command == "WHO" and reply.kind == "BAD-RQST-HDR":
            self.use_list = True  # a 2021 server: LIST from now on
            command = "LIST"
            reply = self.link.request(command)
        if reply.kind in ("LIST-OK", "WHO-OK"):
            return split_names(reply.body)
        self.show(self.palette.bad(
            f"could not list the users: the server answered {command} with {raw_text(reply)}"))
        return None

    def member_names(self) -> list[str]:
        return self.names() or []

    def show_users(self) -> None:
        names = self.names()
        if names is not None:
            for row in format_names(names, self.name):
                self.show(row)

    def send_direct(self, to: str, text: str) -> None:
        # One line per command: a newline in the text would end it early.
        flat = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        reply = self.link.request(f"SEND {to} {flat}")
        if reply.kind == "SEND-OK":
            self.show(self.palette.good("message sent"))
            self.log(to, "sent to", to, flat)
        elif reply.kind in BAD_DEST_REPLIES:
            self.report_failure(f"{sanitize(to)} is not connected or not available")
        else:
            self.report_failure(f"the server answered {raw_text(reply)}")

    def history_key(self, peer: str) -> HistoryKey | None:
        return peer  # no ids in this protocol: the log is named by the peer's name

    def leave(self) -> None:
        self.link.close()  # the protocol has no goodbye: closing is all there is

    def help_text(self) -> str:
        return HELP_TEXT + "\n" + LINE_HELP
