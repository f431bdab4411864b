"""The client speaking the native protocol (SPEC section 1): JSON requests with refs, and events.

The receiver thread decodes events: a reply (an event carrying the ``ref`` of one of our
requests) goes to the request waiting for it; a ``message`` or ``notice`` goes to the
``Viewer``, which prints it while viewing and keeps it while typing; a ``ping`` is answered with
``pong`` (the only write from that thread). Invariant: each request gets exactly its own reply,
or ``ConnectionLost``.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
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
from chatsuite.client.session import (
    BYE_TIMEOUT,
    LOST,
    REPLY_TIMEOUT,
    SHUT_DOWN,
    ConnectionLost,
    Link,
    Session,
    closed_early,
)
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
    EventDecoder,
    Hello,
    Kick,
    ListUsers,
    Message,
    Mute,
    Notice,
    Ok,
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
PASSWORD_CODES = (ErrorCode.PASSWORD_REQUIRED.value, ErrorCode.BAD_PASSWORD.value)
MODERATION: dict[str, type[Kick | Mute | Unmute | Ban]] = {
    "kick": Kick, "mute": Mute, "unmute": Unmute, "ban": Ban}


class NameGivenUp(Exception):
    """Enter alone at an account's password prompt: choose another name."""


class Connection(Link):
    """A native-protocol connection: typed requests with refs out, replies matched back by ref."""

    def __init__(self, transport: Transport, on_event: Callable[[Event], None],
                 on_end: Callable[[], None]) -> None:
        super().__init__(transport, on_end)
        self._on_event = on_event  # message, notice and stray errors (receiver thread)
        self._waiting: dict[int, queue.Queue[Event | None]] = {}  # _state_lock
        self._refs = itertools.count(1)
        self._decoder = EventDecoder()
        self._first = True

    def send(self, request: Request) -> None:
        """Write one request; ``ConnectionLost`` when the socket is gone."""
        self.send_bytes(encode_event(request))

    def request(self, request: Request, timeout: float = REPLY_TIMEOUT) -> Event:
        """Send ``request`` with a fresh ref and return the server's reply to it."""
        ref = next(self._refs)
        replies: queue.Queue[Event | None] = queue.Queue()
        with self._state_lock:
            if self.ended:
                raise ConnectionLost(self.failure or LOST)
            self._waiting[ref] = replies
        try:
            self.send(dataclasses.replace(request, ref=ref))
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
        if replies is not None:
            replies.put(event)
        else:
            self._on_event(event)

    def quit(self) -> None:
        """Tell the server we leave (``quit``), wait briefly for ``bye``, close."""
        with self._state_lock:
            self.closing = True
        try:
            self.request(Quit(), timeout=BYE_TIMEOUT)
        except ConnectionLost:
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
                 wake_main: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(terminal, *args, **kwargs)
        self.link = self.conn = Connection(transport, self.deliver, wake_main)
        self.own_id: int | None = None
        # The name last seen for each id (users list, message senders): a dm by id carries it,
        # so that a reused id never delivers to someone else (SPEC 1.2). Both threads write it.
        self.seen_names: dict[int, str] = {}
        self.server_password: str | None = None  # asked once when the server wants it (7.1)
        self.admin = False  # the welcome said we may moderate (SPEC 7.3)

    # ---- the receiver thread's side

    def deliver(self, event: Event) -> None:
        """Called by the receiver thread for every event that is not a reply."""
        if isinstance(event, Message):
            self.seen_names[event.sender.id] = event.sender.name
            bell = self.heard(event.sender.name, event.text)
            self.viewer.post(format_message(event, self.palette) + bell)
            if event.to is not None:
                self._log_received(event)
        elif isinstance(event, Notice):
            line = format_notice(event, self.palette)
            if event.event == "shutdown":
                self.viewer.say(line)  # said at once, whatever the mode, then the session ends
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

    def register(self) -> None:
        name = self.name
        if name is None:
            name = self.ask("your name (Enter for an automatic one): ").strip()
            self.title = self.title or self.ask("your job title (Enter for none): ").strip()
            self.company = self.company or self.ask("your company (Enter for none): ").strip()
        password: str | None = None  # the account's, asked when the server says so
        while True:
            reply = self.conn.request(Hello(name or None, self.title or None, self.company or None,
                                            server_password=self.server_password,
                                            password=password))
            if isinstance(reply, Error) and reply.code in PASSWORD_CODES:
                try:
                    password = self.ask_password(reply, name or "", password)
                except NameGivenUp:
                    name = self.ask("your name (Enter for an automatic one): ").strip()
                    password = None
                continue
            if isinstance(reply, Welcome):
                self.admin = reply.admin
                self.own_id = reply.user.id
                self.registered(reply.user.name)
                self.show(self.palette.good(
                    f"welcome {sanitize(reply.user.name)}, your id is {reply.user.id}"
                    f" ({reply.online} online)"))
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
        self.conn.request(SetMode(int(mode)))

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
