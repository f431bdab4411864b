"""The client speaking the native protocol (SPEC section 1): JSON requests with refs, and events.

The receiver thread decodes events: a reply (an event carrying the ``ref`` of one of our
requests) goes to the request waiting for it; a ``message`` or ``notice`` goes to the
``Viewer``, which prints it while viewing and keeps it while typing; a ``ping`` is answered with
``pong`` (the only write from that thread). Events carrying a ``seq`` already seen are dropped
(a replay after a resume).

The main thread registers (resuming a saved session when it can), shows earlier messages, and
runs the modes; when the connection drops it reconnects with backoff (``come_back``) and stays
in its mode. Invariant: each request gets exactly its own reply, or ``TooLong`` (not sent),
``NoReply`` (not answered in time: the connection goes on, a late reply is dropped), or
``ConnectionLost``.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from chatsuite.client.display import (
    format_delivery,
    format_failure,
    format_message,
    format_notice,
    format_users,
    sanitize,
)
from chatsuite.client.history import HistoryKey
from chatsuite.client.reconnect import BACKLOG_ON_START, Backoff, Comeback, SeenSeqs, SessionFile
from chatsuite.client.session import (
    BYE_TIMEOUT,
    LOST,
    REPLY_TIMEOUT,
    SHUT_DOWN,
    ConnectionLost,
    Link,
    NoReply,
    RequestFailed,
    Session,
    TooLong,
    closed_early,
)
from chatsuite.client.terminal import Terminal
from chatsuite.client.transport import ConnectError, Transport
from modes import Mode, ModerateCommand
from protocol import (
    BACKLOG_MAX,
    MAX_FRAME,
    Backlog,
    BacklogRequest,
    Ban,
    ChangePassword,
    Dm,
    Error,
    ErrorCode,
    Event,
    EventDecoder,
    Hello,
    Kick,
    ListUsers,
    Message,
    Mute,
    Notice,
    Ok,
    Pending,
    Ping,
    Pong,
    Quit,
    Register,
    Request,
    Say,
    SetMode,
    SetStatus,
    StatusChanged,
    UnknownEvent,
    Unmute,
    User,
    Users,
    Welcome,
    encode_event,
    parse_target,
)

TLS_RECORD_STARTS = (0x15, 0x16)  # a TLS alert or handshake record: the server speaks TLS
ABANDONED_MAX = 1024  # refs given up on that are remembered, to drop their late replies
NO_REPLY = "the server did not answer in time"
NO_WELCOME = "it did not register us"


def too_long(size: int, limit: int) -> str:
    """Why a line is not sent (SPEC 4.10), in one sentence."""
    return (f"that line is too long to send: the server accepts at most {limit:,} bytes a "
            f"request and this one is {size:,} bytes, so nothing was sent")


PASSWORD_CODES = (ErrorCode.PASSWORD_REQUIRED.value, ErrorCode.BAD_PASSWORD.value)
MODERATION: dict[str, type[Kick | Mute | Unmute | Ban]] = {
    "kick": Kick, "mute": Mute, "unmute": Unmute, "ban": Ban}


class NameGivenUp(Exception):
    """Enter alone at an account's password prompt: choose another name."""


class Connection(Link):
    """A native-protocol connection: typed requests with refs out, replies matched back by ref."""

    def __init__(self, transport: Transport, on_event: Callable[[Event], None],
                 on_end: Callable[[], None], reply_timeout: float = REPLY_TIMEOUT) -> None:
        super().__init__(transport, on_end)
        self._on_event = on_event  # message, notice and stray errors (receiver thread)
        self._waiting: dict[int, queue.Queue[Event | None]] = {}  # _state_lock
        self._abandoned: set[int] = set()  # refs given up waiting for (_state_lock)
        self.reply_timeout = reply_timeout
        self.max_frame = MAX_FRAME  # the server's limit, from its welcome
        self._refs = itertools.count(1)
        self._decoder = EventDecoder()
        self._first = True

    def send(self, request: Request) -> None:
        """Write one request; ``ConnectionLost`` when the socket is gone."""
        self.send_bytes(encode_event(request))

    def request(self, request: Request, timeout: float | None = None) -> Event:
        """Send ``request`` with a fresh ref and return the server's reply to it.

        ``TooLong`` (nothing sent) when its frame is over the server's limit; ``NoReply`` when
        no reply came within the bound (the connection goes on; a late reply is dropped);
        ``ConnectionLost`` when the connection ended."""
        ref = next(self._refs)
        frame = encode_event(dataclasses.replace(request, ref=ref))
        if len(frame) - 1 > self.max_frame:  # the NUL is not counted (SPEC 1.1)
            raise TooLong(too_long(len(frame) - 1, self.max_frame))
        replies: queue.Queue[Event | None] = queue.Queue()
        with self._state_lock:
            if self.ended:
                self.noticed = True
                raise ConnectionLost(self.failure or LOST)
            self._waiting[ref] = replies
        try:
            self.send_bytes(frame)
            reply = replies.get(timeout=self.reply_timeout if timeout is None else timeout)
        except queue.Empty:
            with self._state_lock:
                if len(self._abandoned) < ABANDONED_MAX:
                    self._abandoned.add(ref)
            raise NoReply(NO_REPLY) from None
        finally:
            with self._state_lock:
                self._waiting.pop(ref, None)
        if reply is None:
            self.noticed = True
            raise ConnectionLost(self.failure or LOST)
        return reply

    def feed(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if data[0] in TLS_RECORD_STARTS and not self.transport.tls:
                self.fail("the server answered in TLS: connect with --tls")
                return
        for event in self._decoder.feed(data):
            self._dispatch(event)

    def stream_ended(self) -> None:
        with self._state_lock:
            waiting = list(self._waiting.values())
        for replies in waiting:
            replies.put(None)
        self.fail(LOST if self.received_any else closed_early(self.transport.tls))

    def _dispatch(self, event: Event) -> None:
        ref = getattr(event, "ref", None)
        if isinstance(event, Ping):
            try:
                self.send(Pong(event.ref))
            except ConnectionLost:
                pass
            return
        if isinstance(event, Error) and event.code == ErrorCode.SERVER_FULL.value:
            # The server closes right after this (SPEC 1.2): record the real reason before the
            # end of the stream records "lost".
            self.fail(f"the server refused the connection: {sanitize(event.message)}")
        with self._state_lock:
            replies = self._waiting.get(ref) if isinstance(ref, int) else None
            late = replies is None and isinstance(ref, int) and ref in self._abandoned
            if late:
                self._abandoned.discard(ref)
        if replies is not None:
            replies.put(event)
        elif not late:  # a late reply to a request given up on is dropped
            self._on_event(event)

    def quit(self) -> None:
        """Tell the server we leave (``quit``), wait briefly for ``bye``, close."""
        with self._state_lock:
            self.closing = True
        try:
            self.request(Quit(), timeout=BYE_TIMEOUT)
        except (ConnectionLost, RequestFailed):
            pass
        self.close()


def unexpected(reply: Event) -> str:
    """Why a reply of the wrong kind is a failure, for people."""
    kind = reply.type if isinstance(reply, UnknownEvent) else reply.TYPE
    return f"the server answered with an unexpected {sanitize(kind)}"


class NativeSession(Session):
    """A session in the native protocol: ids, titles, status, and the server holding for us."""

    link: Connection

    def __init__(self, transport: Transport, terminal: Terminal, *args: Any,
                 wake_main: Callable[[], None], comeback: Comeback | None = None,
                 **kwargs: Any) -> None:
        super().__init__(terminal, *args, **kwargs)
        self.comeback = comeback or Comeback()
        self._wake_main = wake_main
        self.link = self.conn = Connection(transport, self.deliver, wake_main,
                                           self.comeback.reply_timeout)
        self.own_id: int | None = None
        # The name last seen for each id (users list, message senders): a dm by id carries it,
        # so that a reused id never delivers to someone else (SPEC 1.2). Both threads write it.
        self.seen_names: dict[int, str] = {}
        self.seen = SeenSeqs()  # receiver thread (the main thread reads it between links)
        self.token: str | None = None  # the session to resume (SPEC 6.4)
        self.sessions = SessionFile(self.history)
        self._saved_at = 0.0  # when the session file was last written (monotonic)
        self.mode_now: Mode | None = None  # the mode last asked of the server
        self.waiting: int | None = None  # the last ``pending`` count said
        self.held = 0  # the server's last ``pending`` count, said or not (receiver thread)
        self.replayed = 0  # messages that came first-time since the last hello (receiver)
        self.oldest_shown: int | None = None  # the oldest seq of the earlier messages shown
        self.left_while_away = False  # Ctrl-C while reconnecting: leave, exit 0
        self.resumed = False  # the last welcome resumed our session
        self.server_password: str | None = None  # asked once when the server wants it (7.1)
        self.admin = False  # the welcome said we may moderate (SPEC 7.3)

    # ---- the receiver thread's side

    def deliver(self, event: Event) -> None:
        """Called by the receiver thread for every event that is not a reply."""
        if isinstance(event, (Message, Notice)) and event.seq is not None:
            if not self.seen.first_time(event.seq):
                return  # seen already: replayed after a resume (SPEC 6.5)
            if isinstance(event, Message):
                self.replayed += 1
            self.keep_session(at_most_every=SESSION_SAVE_EVERY)
        if isinstance(event, Pending):
            self.pending(event.count)
        elif isinstance(event, Message):
            self.seen_names[event.sender.id] = event.sender.name
            bell = self.heard(event.sender.name, event.text)
            self.viewer.post(format_message(event, self.palette) + bell)
            if event.to is not None:
                self._log_received(event)
        elif isinstance(event, Notice):
            line = format_notice(event, self.palette)
            if event.event == "shutdown":
                if self.comeback.reconnect_for is None:
                    self.viewer.say(line)  # said at once, whatever the mode; the session ends
                # Reconnecting: the one line saying so is the reconnection's.
                self.conn.fail(SHUT_DOWN)
            else:
                self.viewer.post(line)
        elif isinstance(event, Error):
            # An error that answers no waiting request (the server refusing the connection,
            # or a late reply): rare and about us, so said at once, whatever the mode.
            self.viewer.say(self.palette.bad(f"server: {sanitize(event.message)}"))

    def _log_received(self, event: Message) -> None:
        when = datetime.now()
        try:
            when = datetime.fromisoformat(event.ts).astimezone()
        except ValueError:
            pass
        # The log is named by the peer's name: ids are reused.
        self.log(event.sender.name, "received from", event.sender.name, event.text, when)

    # ---- the main thread's side

    def register(self, again: bool = False) -> None:
        """Register (``again``: on a new connection, resuming the session when the server
        still has it; else as a new registration under the same name)."""
        name = self.history.own_name if again else self.name
        if name is None:
            name = self.ask("your name (Enter for an automatic one): ").strip()
            self.title = self.title or self.ask("your job title (Enter for none): ").strip()
            self.company = self.company or self.ask("your company (Enter for none): ").strip()
        password: str | None = None  # the account's, asked when the server says so
        while True:
            hello = self.hello(name, password)
            try:
                reply = self.conn.request(hello)
            except NoReply:
                self.conn.fail(f"the server did not answer in time: {NO_WELCOME}")
                raise ConnectionLost(self.conn.failure) from None
            if isinstance(reply, Error) and reply.code in PASSWORD_CODES:
                try:
                    password = self.ask_password(reply, name or "", password)
                except NameGivenUp:
                    name = self.ask("your name (Enter for an automatic one): ").strip()
                    password = None
                continue
            if isinstance(reply, Welcome):
                self.admin = reply.admin
                self.welcomed(reply, again, hello.session is not None)
                return
            reason = sanitize(reply.message) if isinstance(reply, Error) else unexpected(reply)
            if not isinstance(reply, Error) or reply.code not in ("name-taken", "bad-name"):
                self.conn.fail(f"the server refused the connection: {reason}")
                raise ConnectionLost(self.conn.failure)
            self.show(self.palette.bad(f"that name cannot be used: {reason}"))
            name = self.ask("your name (Enter for an automatic one): ").strip()
            password = None

    def ask_password(self, reply: Error, name: str, given: str | None) -> str | None:
        """The server wants a password (SPEC 7.1, 7.2): ask for the one it names, without echo.

        Returns the account password to send next (the server password is kept in
        ``server_password``); Enter alone at an account's prompt gives the name up."""
        wrong = reply.code == ErrorCode.BAD_PASSWORD.value
        if reply.for_ == "server":
            if wrong:
                self.show(self.palette.bad("wrong server password"))
            secret = self.terminal.ask_secret("server password: ")
            self.server_password = secret
            return given
        if wrong:
            self.show(self.palette.bad(f"wrong password for {sanitize(name)}"))
        else:
            self.show(f"{sanitize(name)} is an account (Enter alone to give the name up)")
        secret = self.terminal.ask_secret(f"password for {sanitize(name)}: ")
        if secret:
            return secret
        raise NameGivenUp

    def register_account(self) -> None:
        """``/register``: the password asked twice, without echo; our name becomes an account."""
        password = self.terminal.ask_secret("new account password: ")
        if password != self.terminal.ask_secret("the same password again: "):
            self.show(self.palette.bad("the two passwords differ; nothing changed"))
            return
        reply = self.conn.request(Register(password))
        if isinstance(reply, Ok):
            self.show(self.palette.good(
                f"{sanitize(self.history.own_name)} is now an account: "
                "nobody can use the name without its password"))
        else:
            self.show_refusal(reply)

    def change_password(self) -> None:
        """``/password``: the old password, then the new one twice, all without echo."""
        old = self.terminal.ask_secret("current password: ")
        new = self.terminal.ask_secret("new password: ")
        if new != self.terminal.ask_secret("the new password again: "):
            self.show(self.palette.bad("the two new passwords differ; nothing changed"))
            return
        reply = self.conn.request(ChangePassword(old, new))
        if isinstance(reply, Ok):
            self.show(self.palette.good("password changed"))
        else:
            self.show_refusal(reply)

    def moderate(self, command: ModerateCommand) -> None:
        """``/kick``, ``/mute``, ``/unmute``, ``/ban``: ask the server; the room's notice says
        what happened."""
        kind = MODERATION[command.action]
        reply = self.conn.request(kind(parse_target(command.user), command.reason,
                                       command.minutes))
        if isinstance(reply, Ok):
            self.show(self.palette.good(f"{command.action}: done"))
        else:
            self.show_refusal(reply)

    def show_refusal(self, reply: Event) -> None:
        """Say why the server refused a request (its own sentence)."""
        reason = sanitize(reply.message) if isinstance(reply, Error) else unexpected(reply)
        self.show(self.palette.bad(f"refused: {reason}"))

    def enter_mode(self, mode: Mode) -> None:
        self.mode_now = mode
        try:
            self.conn.request(SetMode(int(mode)))
        except NoReply as problem:
            self.show(self.palette.bad(str(problem)))
        if mode is Mode.VIEWING:
            # The server sends everything held, and no count while we view.
            self.held = self.waiting = 0
        elif self.held > 0 and self.held != self.waiting:
            # Counted while we were at the mode menu (or reconnecting): said now, once.
            self.waiting = self.held
            self.viewer.say(waiting_line(self.held))

    def report(self, reply: Event) -> bool:
        """Say whether a send worked; True when it did."""
        if isinstance(reply, Ok):
            self.show(self.palette.good(format_delivery(reply)))
            return True
        if isinstance(reply, Error):
            self.show(self.palette.bad(format_failure(reply)))
        else:
            self.report_failure(unexpected(reply))
        return False

    def broadcast(self, text: str) -> None:
        self.report(self.conn.request(Say(text)))

    def users(self) -> tuple[User, ...]:
        reply = self.conn.request(ListUsers())
        users = reply.users if isinstance(reply, Users) else ()
        for user in users:
            self.seen_names[user.id] = user.name
        return users

    def member_names(self) -> list[str]:
        return [user.name for user in self.users()]

    def show_users(self) -> None:
        for row in format_users(self.users(), self.own_id):
            self.show(row)

    def find_user(self, who: str) -> User | None:
        """The connected user named ``who`` (a name, any case, or an id), or None."""
        target = parse_target(who)
        for user in self.users():
            if user.id == target or (
                isinstance(target, str) and user.name.casefold() == target.casefold()
            ):
                return user
        return None

    def send_direct(self, to: str, text: str) -> None:
        target = parse_target(to)
        # By id: send the name we last saw on it, so that a reused id cannot misdeliver.
        believed = self.seen_names.get(target) if isinstance(target, int) else None
        peer = None if believed is not None else self.find_user(to)  # its name names the log
        reply = self.conn.request(Dm(target, text, name=believed))
        if believed is not None and isinstance(target, int):
            if isinstance(reply, Error) and reply.code == ErrorCode.NO_SUCH_USER.value:
                self.seen_names.pop(target, None)
                self.report_failure(f"id {target} is no longer {sanitize(believed)}: "
                                    f"{sanitize(reply.message)}")
                return
            peer = User(target, believed)
        name = peer.name if peer is not None else target
        if self.report(reply) and isinstance(name, str):
            self.log(name, "sent to", name, text)

    def toggle_status(self) -> None:
        reply = self.conn.request(SetStatus())
        status = reply.status if isinstance(reply, StatusChanged) else unexpected(reply)
        self.show(f"your status is now {sanitize(status)}")

    def history_key(self, peer: str) -> HistoryKey | None:
        target = parse_target(peer)
        if isinstance(target, str):
            return target  # a name: its log, whether or not that person is here now
        user = self.find_user(peer)
        if user is None:
            self.show(f"nobody has the id {target} now; give the name to see the history "
                      "with someone who left")
            return None
        return user.name

    def leave(self) -> None:
        self.conn.quit()

    # ---- sessions: resume, reconnect, backlog (SPEC 4.8, 6.4, 6.5)

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
        elif self.comeback.backlog:
            self.show_earlier(self.comeback.backlog, quiet=True)

    def keep_session(self, at_most_every: float = 0.0) -> None:
        """Write the session file (0600): the token and the last seq seen."""
        own = self.history.own_name
        now = time.monotonic()
        if self.token is None or not own or now - self._saved_at < at_most_every:
            return
        self._saved_at = now
        self.sessions.save(own, self.token, self.seen.last)

    def pending(self, count: int) -> None:
        """A ``pending`` event (mode 1): a line whenever the number changes (SPEC 4.12); at the
        mode menu it is kept, and said once typing starts (``enter_mode``)."""
        self.held = count
        if count == self.waiting or self.mode_now is not Mode.TYPING:
            return
        self.waiting = count
        if count > 0:
            self.viewer.say(waiting_line(count))

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
                             and event.seq > before for event in reply.events)
                counted = True
        if not counted:
            self.show(self.palette.good("reconnected"))
            return
        noun = "message" if missed == 1 else "messages"
        held = " (#view to read them)" if missed and mode is not Mode.VIEWING else ""
        self.show(self.palette.good(f"reconnected: {missed} {noun} missed while away{held}"))

    def finish(self) -> int:
        """End the session; the session file is kept for a resume unless we quit."""
        if self.left_while_away:
            self.exiting = True
            self.link.close()
            self.show("bye")
            return 0
        code = super().finish()
        own = self.history.own_name
        if code == 0 and own:
            self.sessions.remove(own)  # we quit: the server ended the session
        else:
            self.keep_session()
        return code


EARLIER = "--- earlier messages ---"
EARLIER_MARK = "| "  # the start of each earlier line: not live
EARLIER_END = "--- end of earlier messages"
SESSION_SAVE_EVERY = 1.0  # seconds: the last seq is written at most this often while chatting


def waiting_line(count: int) -> str:
    """SPEC 4.12: ``3 messages waiting: #view to read them``."""
    noun = "message" if count == 1 else "messages"
    return f"{count} {noun} waiting: #view to read them"
