"""Coming back after a drop, and earlier messages, for the native session (SPEC 4.8, 6.4, 6.5).

``Resuming`` is the part of ``NativeSession`` (its base) that owns the session to resume: the
``hello`` carrying the token and the last seq seen (from memory or the session file), what a
``welcome`` sets, the session file written as we go, the main loop that reconnects with backoff
when the link drops (``run``, ``may_reconnect``, ``come_back``, ``try_again``) and stays in its
mode, the one line saying so (``say_reconnected``), and the earlier messages shown on start and
on ``/backlog`` (``show_earlier``, ``show_backlog``). The state it uses is set up by
``NativeSession.__init__``; registering and the events themselves are ``NativeSession``'s.

Invariants: an event is shown at most once (``seen``), whether it comes live, replayed after a
resume or as an earlier message; a reconnection is said in one line, and the count it gives
never includes our own messages; a refusal that trying again cannot mend (``Refused``: a ban)
ends the reconnection; the session file is kept unless we quit or were removed (kicked or
banned), so a restarted client resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from chatsuite.client.connection import Connection
from chatsuite.client.display import format_message, format_notice, sanitize
from chatsuite.client.reconnect import BACKLOG_ON_START, Backoff, Comeback, SeenSeqs, SessionFile
from chatsuite.client.session import (
    LOST,
    SHUT_DOWN,
    ConnectionLost,
    NoReply,
    Refused,
    Session,
)
from chatsuite.client.transport import ConnectError
from modes import Mode
from protocol import (
    BACKLOG_MAX,
    Backlog,
    BacklogRequest,
    Error,
    Event,
    Hello,
    Message,
    User,
    Welcome,
)

EARLIER = "--- earlier messages ---"
EARLIER_MARK = "| "  # the start of each earlier line: not live
EARLIER_END = "--- end of earlier messages"
SESSION_SAVE_EVERY = 1.0  # seconds: the last seq is written at most this often while chatting


class Resuming(Session):
    """The native session's resume, reconnect and backlog flow (``NativeSession`` is one)."""

    link: Connection
    conn: Connection
    comeback: Comeback
    _wake_main: Callable[[], None]
    own_id: int | None
    seen: SeenSeqs
    token: str | None
    sessions: SessionFile
    _saved_at: float
    mode_now: Mode | None
    replayed: int
    oldest_shown: int | None
    left_while_away: bool
    resumed: bool
    removed: bool
    server_password: str | None

    def register(self, again: bool = False) -> None:
        raise NotImplementedError

    def deliver(self, event: Event) -> None:
        """Called by the receiver thread for every event that is not a reply."""
        raise NotImplementedError

    def hello(self, name: str | None, password: str | None = None) -> Hello:
        """Our ``hello``: with the session to resume, from memory or (a restarted client) from
        the session file of that name, and the passwords the server asked for (SPEC 7)."""
        if self.token is None and name:
            saved = self.sessions.load(name)
            if saved is not None:
                self.token = saved[0]
                if saved[1] is not None:
                    self.seen.start_at(saved[1])
        last = self.seen.last if self.token is not None else None
        self.replayed = 0
        return Hello(name or None, self.title or None, self.company or None,
                     session=self.token, last_seq=last, server_password=self.server_password,
                     password=password)

    def welcomed(self, reply: Welcome, again: bool, had_session: bool = True) -> None:
        """Registered: remember who we are, the server's limit and the session to resume."""
        self.own_id = reply.user.id
        self.conn.max_frame = reply.max_frame
        if not reply.resumed:
            self.seen.start_at(reply.seq)  # what came before is not ours to be shown live
        self.token = reply.session
        self.resumed = reply.resumed
        self.registered(reply.user.name)
        self.keep_session()
        if again:
            if not reply.resumed:
                why = ("the server did not resume your session (it had ended)" if had_session
                       else "reconnected to a server that keeps no sessions")
                self.show(f"{why}: you are registered again as {sanitize(reply.user.name)}, "
                          f"your id is {reply.user.id}")
            return
        self.show(self.palette.good(
            f"welcome {sanitize(reply.user.name)}, your id is {reply.user.id}"
            f" ({reply.online} online)"))
        if reply.resumed:
            self.show("your earlier session was resumed: nothing sent to you since was lost")
            return
        # Earlier means before this welcome: up to its seq, so never our own "joined" notice
        # nor what arrives live meanwhile (SPEC 6.1: welcome carries the latest seq).
        self.oldest_shown = reply.seq + 1
        if self.comeback.backlog:
            self.show_earlier(self.comeback.backlog, before=self.oldest_shown, quiet=True)

    def keep_session(self, at_most_every: float = 0.0) -> None:
        """Write the session file (0600): the token and the last seq seen."""
        own = self.history.own_name
        now = time.monotonic()
        if self.token is None or not own or now - self._saved_at < at_most_every:
            return
        self._saved_at = now
        self.sessions.save(own, self.token, self.seen.last)

    def show_backlog(self, count: int | None) -> None:
        """``/backlog [N]``: N more earlier messages, older than the oldest shown."""
        self.show_earlier(count or self.comeback.backlog or BACKLOG_ON_START,
                          before=self.oldest_shown)

    def show_earlier(self, limit: int, before: int | None = None, quiet: bool = False) -> None:
        """Ask the server for earlier room events and show them, marked as earlier. ``quiet``
        (on start): a server that keeps none, or does not answer, is no news."""
        try:
            reply = self.conn.request(BacklogRequest(before=before, limit=min(limit, BACKLOG_MAX)))
        except NoReply:
            if quiet:
                return
            raise
        if isinstance(reply, Error):
            if not quiet:
                self.show("this server keeps no earlier messages" if reply.code == "unknown-type"
                          else self.palette.bad(f"no earlier messages: {sanitize(reply.message)}"))
            return
        if not isinstance(reply, Backlog):
            return
        if not reply.events:
            if not quiet:
                self.show("no earlier messages")
            return
        self.show(EARLIER)
        for event in reply.events:
            if event.seq is not None:
                self.seen.first_time(event.seq)  # shown here: a held copy is not shown again
                if self.oldest_shown is None or event.seq < self.oldest_shown:
                    self.oldest_shown = event.seq
            line = (format_message(event, self.palette) if isinstance(event, Message)
                    else format_notice(event, self.palette))
            self.show(self.palette.time(EARLIER_MARK) + line)
        more = "; /backlog shows more" if reply.more else ""
        self.show(f"{EARLIER_END}{more} ---")

    def run(self) -> int:
        """The whole session; a lost connection is reconnected (unless ``--no-reconnect``)."""
        self.link.start()
        try:
            self.register()
            mode: Mode | None = None  # None: at the menu
            while True:
                try:
                    if mode is None:
                        mode = self.choose_mode()
                    mode = self.typing() if mode is Mode.TYPING else self.viewing()
                    if mode is None:
                        break
                except (KeyboardInterrupt, ConnectionLost):
                    if not self.may_reconnect():
                        raise
                    self.come_back()
        except (KeyboardInterrupt, EOFError, ConnectionLost):
            pass
        return self.finish()

    def may_reconnect(self) -> bool:
        """The link failed under us (not a key, not a refusal) and reconnecting is on."""
        failure = self.link.failure
        return (self.comeback.reconnect_for is not None and self.comeback.connect is not None
                and not self.ending and failure in (LOST, SHUT_DOWN))

    def come_back(self) -> None:
        """Say in one line that the connection is gone, and reconnect with backoff until the
        budget is spent (``ConnectionLost``); Ctrl-C while waiting leaves (KeyboardInterrupt)."""
        old = self.conn
        old.noticed = True  # dealt with here: its wake-up and watchdog are not needed
        budget = self.comeback.reconnect_for or 0.0
        # Everything from here is in the try: a Ctrl-C that lands just after the line below
        # is printed (a busy machine) still leaves with "bye", not as the connection's failure.
        try:
            old.close()
            self.viewer.stop_viewing()  # what comes on the new link is kept until it is said
            self.keep_session()
            before = self.seen.last
            why = "the server is shutting down" if old.failure == SHUT_DOWN else LOST
            self.show(self.palette.bad(f"{why}: reconnecting (Ctrl-C to leave)"))
            backoff = Backoff(budget, scale=self.comeback.delay_scale)
            while backoff.wait():
                if self.try_again(before):
                    return
        except KeyboardInterrupt:
            self.left_while_away = self.link.failure is not None or self.link is old
            raise
        self.ending = f"could not reconnect to the server for {budget:g} seconds: giving up"
        raise ConnectionLost(self.ending)

    def try_again(self, before: int | None) -> bool:
        """One attempt: connect, resume (or register anew), say so; False when it failed."""
        assert self.comeback.connect is not None
        try:
            transport = self.comeback.connect()
        except ConnectError:
            return False
        conn = Connection(transport, self.deliver, self._wake_main, self.comeback.reply_timeout)
        conn.noticed = True  # its failures during the handshake are seen here, as exceptions
        self.link = self.conn = conn
        conn.start()
        try:
            self.register(again=True)
            self.say_reconnected(before)
        except Refused as refusal:
            conn.close()
            self.ending = str(refusal)  # trying again cannot mend it: said, and the end
            raise
        except (ConnectionLost, NoReply):
            conn.close()
            return False
        conn.noticed = False
        if conn.failure is not None:  # failed just now: its wake-up was spent while noticed
            conn.close()
            return False
        return True

    def say_reconnected(self, before: int | None) -> None:
        """The one line after a reconnection, with how many messages were missed."""
        mode = self.mode_now
        if mode is not None:
            # Also the fence: a resumed viewer's missed events come before this reply.
            self.enter_mode(mode)
        if not self.resumed:
            return  # registered anew: said by ``welcomed``; what was missed is not ours
        missed = self.replayed
        counted = mode is Mode.VIEWING or missed > 0
        if not counted and before is not None:
            try:
                reply = self.conn.request(BacklogRequest(after=before, limit=BACKLOG_MAX))
            except NoReply:
                reply = None
            if isinstance(reply, Backlog):
                missed = sum(isinstance(event, Message) and event.seq is not None
                             and event.seq > before and not self.own_message(event)
                             for event in reply.events)
                counted = True
        if not counted:
            self.show(self.palette.good("reconnected"))
            return
        noun = "message" if missed == 1 else "messages"
        held = " (#view to read them)" if missed and mode is not Mode.VIEWING else ""
        self.show(self.palette.good(f"reconnected: {missed} {noun} missed while away{held}"))

    def is_us(self, user: User) -> bool:
        """True when ``user`` is us: our id, or our name (names are unique in the room, and
        an event replayed after a resume may carry an earlier connection's id)."""
        own = self.history.own_name
        return user.id == self.own_id or (
            own is not None and user.name.casefold() == own.casefold())

    def own_message(self, event: Message) -> bool:
        """True when we sent ``event``: it is never news to us."""
        return self.is_us(event.sender)

    def finish(self) -> int:
        """End the session; the session file is kept for a resume unless we quit or were
        removed (kicked or banned: the server ended the session)."""
        if self.left_while_away:
            self.exiting = True
            self.link.close()
            self.show("bye")
            return 0
        code = super().finish()
        own = self.history.own_name
        if (code == 0 or self.removed) and own:
            self.sessions.remove(own)  # we quit: the server ended the session
        else:
            self.keep_session()
        return code
