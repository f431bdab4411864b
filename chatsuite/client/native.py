"""The client speaking the native protocol (SPEC section 1): registering, the events, the commands.

``NativeSession`` owns what a native session says and does: the ``hello`` exchange with its
password prompts, the events the receiver thread hands over (``deliver``: a ``message`` or
``notice`` goes to the ``Viewer``, which prints it while viewing and keeps it while typing;
events carrying a ``seq`` already seen are dropped, a replay after a resume; ``pending`` counts
are said once per change, never over a password question; a ``kicked`` or ``banned`` notice
naming us ends the session without reconnecting), and the commands (say, dm, users, status,
accounts, moderation).
The connection itself (requests by ref, bounded waits) is ``connection.Connection``; coming back
after a drop and earlier messages are its base ``resume.Resuming``. The names tests and
``chat_client`` import from here stay importable from here.

Invariant: each request gets exactly its own reply, or ``TooLong`` (not sent), ``NoReply`` (not
answered in time: the connection goes on, a late reply is dropped), or ``ConnectionLost``; the
receiver thread never writes but ``pong``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from chatsuite.client.connection import Connection, too_long
from chatsuite.client.display import (
    format_delivery,
    format_failure,
    format_message,
    format_notice,
    format_users,
    sanitize,
)
from chatsuite.client.history import HistoryKey
from chatsuite.client.reconnect import Comeback, SeenSeqs, SessionFile
from chatsuite.client.resume import (
    EARLIER,
    EARLIER_END,
    EARLIER_MARK,
    SESSION_SAVE_EVERY,
    Resuming,
)
from chatsuite.client.session import SHUT_DOWN, ConnectionLost, NoReply, Refused
from chatsuite.client.terminal import Terminal
from chatsuite.client.transport import Transport
from modes import Mode, ModerateCommand
from protocol import (
    Ban,
    ChangePassword,
    Dm,
    Error,
    ErrorCode,
    Event,
    Kick,
    ListUsers,
    Message,
    Mute,
    Notice,
    Ok,
    Pending,
    Register,
    Say,
    SetMode,
    SetStatus,
    StatusChanged,
    UnknownEvent,
    Unmute,
    User,
    Users,
    Welcome,
    parse_target,
)

__all__ = ["EARLIER", "EARLIER_END", "EARLIER_MARK", "SESSION_SAVE_EVERY", "Connection",
           "NameGivenUp", "NativeSession", "too_long", "unexpected", "waiting_line"]

NO_WELCOME = "it did not register us"
PASSWORD_CODES = (ErrorCode.PASSWORD_REQUIRED.value, ErrorCode.BAD_PASSWORD.value)
RETRYABLE = (ErrorCode.SERVER_FULL.value, ErrorCode.TOO_MANY_ATTEMPTS.value,
             ErrorCode.UNAVAILABLE.value)
"""Refusals of a ``hello`` that pass with time: a reconnection tries again after them; any
other (``banned``, a bad request) ends the session as it would on start."""
REMOVED_EVENTS = ("kicked", "banned")  # a notice naming us: the session is over (SPEC 7.3)
MODERATION: dict[str, type[Kick | Mute | Unmute | Ban]] = {
    "kick": Kick, "mute": Mute, "unmute": Unmute, "ban": Ban}


class NameGivenUp(Exception):
    """Enter alone at an account's password prompt: choose another name."""


def unexpected(reply: Event) -> str:
    """Why a reply of the wrong kind is a failure, for people."""
    kind = reply.type if isinstance(reply, UnknownEvent) else reply.TYPE
    return f"the server answered with an unexpected {sanitize(kind)}"


class NativeSession(Resuming):
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
        self.removed = False  # kicked or banned (receiver thread): the session is over
        # A password question is open (main thread): a ``pending`` line would land on it, so
        # it waits until the question is answered (``_count_lock`` guards it, held, waiting).
        self.secret_open = False
        self._count_lock = threading.Lock()

    # ---- the receiver thread's side

    def deliver(self, event: Event) -> None:
        """Called by the receiver thread for every event that is not a reply."""
        if isinstance(event, (Message, Notice)) and event.seq is not None:
            if not self.seen.first_time(event.seq):
                return  # seen already: replayed after a resume (SPEC 6.5)
            if isinstance(event, Message) and not self.own_message(event):
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
            if event.event in REMOVED_EVENTS and self.names_us(event.user):
                self.removed_by(line, event.by)
            elif event.event == "shutdown":
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

    def names_us(self, user: User | None) -> bool:
        """True when ``user`` (a notice's) is us."""
        return user is not None and self.is_us(user)

    def removed_by(self, line: str, admin: str | None) -> None:
        """We were kicked or banned (receiver thread): the notice is said at once, whatever
        the mode, and the session ends without reconnecting (SPEC 7.3: the server ended it)."""
        self.removed = True
        self.token = None  # nothing to resume: the session file is not written again
        self.viewer.say(line)
        by = sanitize(admin) if admin else "an admin"
        self.conn.fail(f"you were removed from the chat by {by}: not reconnecting")

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
                if isinstance(reply, Error) and reply.code in RETRYABLE:
                    raise ConnectionLost(self.conn.failure)  # a reconnection tries again
                raise Refused(self.conn.failure)
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
            with self.secret_question():
                secret = self.terminal.ask_secret("server password: ")
            self.server_password = secret
            return given
        if wrong:
            self.show(self.palette.bad(f"wrong password for {sanitize(name)}"))
        else:
            self.show(f"{sanitize(name)} is an account (Enter alone to give the name up)")
        with self.secret_question():
            secret = self.terminal.ask_secret(f"password for {sanitize(name)}: ")
        if secret:
            return secret
        raise NameGivenUp

    def register_account(self) -> None:
        """``/register``: the password asked twice, without echo; our name becomes an account."""
        with self.secret_question():
            password = self.terminal.ask_secret("new account password: ")
            again = self.terminal.ask_secret("the same password again: ")
        if password != again:
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
        with self.secret_question():
            old = self.terminal.ask_secret("current password: ")
            new = self.terminal.ask_secret("new password: ")
            again = self.terminal.ask_secret("the new password again: ")
        if new != again:
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

    def pending(self, count: int) -> None:
        """A ``pending`` event (mode 1): a line whenever the number changes (SPEC 4.12); at the
        mode menu it is kept, and said once typing starts (``enter_mode``); during a password
        question, said once it is answered (``secret_question``)."""
        with self._count_lock:
            self.held = count
            self._say_waiting()

    @contextmanager
    def secret_question(self) -> Iterator[None]:
        """Password questions (no echo) are open for the block: no ``pending`` line lands on
        them; the count, if it changed meanwhile, is said after them (even after Ctrl-C)."""
        with self._count_lock:
            self.secret_open = True
        try:
            yield
        finally:
            with self._count_lock:
                self.secret_open = False
                self._say_waiting()

    def _say_waiting(self) -> None:
        """Say the held count when it changed since last said, typing and no question open
        (``_count_lock`` held)."""
        count = self.held
        if count == self.waiting or self.mode_now is not Mode.TYPING or self.secret_open:
            return
        self.waiting = count
        if count > 0:
            self.viewer.say(waiting_line(count))


def waiting_line(count: int) -> str:
    """SPEC 4.12: ``3 messages waiting: #view to read them``."""
    noun = "message" if count == 1 else "messages"
    return f"{count} {noun} waiting: #view to read them"
