"""One connection's life on the server: its reader thread, from the first byte to the close.

A ``Handler`` is the only reader of its socket, and thin: it reads bytes into the protocol
(``protocol.sniff`` picks the dialect, the decoders turn bytes into typed requests) and hands
what they decode to the ``Room``, whose answers are typed events. It keeps only the connection's
clocks: the rate limit (a pure ``TokenBucket``), the heartbeat and the hello deadline. It reaches
the server through the narrow ``Host`` protocol, never the whole ``ChatServer``. Replies go
through the same outbox as everything else, so the writer thread sends them in order. This
module reads the native protocol; the line and plain readers are its mixin ``DialectReaders``
(dialect_handlers.py).
Invariant: whatever a peer sends, the handler ends at most its own connection, and always
removes its member from the room and hands its socket to the writer to be closed.
"""

from __future__ import annotations

import select
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from chatsuite.server.dialect_handlers import DialectReaders, Disconnect
from chatsuite.server.gate import Entry, Gate, host_of
from chatsuite.server.members import Member
from chatsuite.server.moderation import MUTE_MINUTES, Action, ban_until
from chatsuite.server.ratelimit import TokenBucket
from chatsuite.server.room import Room
from chatsuite.server.writer import RECV_SIZE, Connection
from modes import Mode
from protocol import (
    BacklogRequest,
    Ban,
    Bye,
    ChangePassword,
    ChatError,
    Dialect,
    Dm,
    Error,
    ErrorCode,
    Hello,
    Kick,
    ListUsers,
    ModeChanged,
    Moderation,
    Mute,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Quit,
    Refusal,
    Refused,
    Register,
    Request,
    RequestDecoder,
    Say,
    SetMode,
    SetStatus,
    StatusChanged,
    Unmute,
    Users,
    encode_event,
    encode_json,
    no_such_user_message,
    ok_frames,
    sniff,
)

T = TypeVar("T")

PING_FRAME = encode_event(Ping())
NOTICE_OF = {Action.KICK: "kicked", Action.MUTE: "muted", Action.UNMUTE: "unmuted",
             Action.BAN: "banned"}
"""The notice each moderation request sends the room (SPEC 7.3)."""


def moderation_text(action: Action, name: str, by: str, minutes: int | None,
                    reason: str | None) -> str:
    """The sentence of a moderation notice: ``sam was muted by teacher for 10 minutes.``"""
    if action in (Action.MUTE, Action.BAN) and (minutes or action is Action.MUTE):
        count = minutes or MUTE_MINUTES
        how_long = f" for {count} minute{'' if count == 1 else 's'}"
    else:
        how_long = " until the server stops" if action is Action.BAN else ""
    end = "." if not reason else f": {reason}"
    return f"{name} was {NOTICE_OF[action]} by {by}{how_long}{end}"


def record_sanction(gate: Gate, action: Action, name: str, address: str | None,
                    minutes: int | None, *, by: str, reason: str | None) -> None:
    """Record ``action`` on ``name`` in this node's sanctions (kick records nothing).

    ``address``: the member's, when it is connected to this node; a ban holds its account,
    else that address; with neither (a guest of another node) this node bans nothing.
    Raises ``bad-request`` for minutes out of range, before anything is recorded.
    """
    now = gate.wall_clock()
    if action is Action.MUTE:
        gate.sanctions.mute(name, now, minutes, by=by, reason=reason)
    elif action is Action.UNMUTE:
        gate.sanctions.unmute(name)
    elif action is Action.BAN:
        ban_until(now, minutes)  # checks minutes, whoever records the ban
        if address is not None or gate.is_account(name):
            gate.ban(gate.ban_key_for(name, address or ""), minutes, by=by, reason=reason)


def moderate_from_cluster(server: Host, event: dict[str, Any]) -> None:
    """Apply another node's ``moderate`` event (sealed: its admin's right was checked there).

    Every node records the sanction (a ban: by account, or by address on the target's node)
    and renders the same notice; the target's node also disconnects a kicked or banned member.
    """
    action, by, reason = Action(str(event["a"])), str(event["by"]), event["r"]
    room, gate = server.room, server.gate
    to = event["to"]
    local: Member | None = None
    target: Member | None = None
    if to is not None:
        local = room.member_named(int(to["id"]))
        if local is not None and local.name != to["name"]:
            local = None  # that id is someone else's now: the target has left
        target = local or Member.from_record(event["u"])
        if local is None and target.node is None:
            target = None
    try:
        record_sanction(gate, action, str(event["n"]), None if local is None else local.address,
                        event["m"], by=by, reason=reason)
    except Refusal as refusal:
        server.log(f"cluster: skipped a moderate event: {refusal.message}")
        return
    remove = action in (Action.KICK, Action.BAN) and target is not None
    text = str(event["t"])
    if room.moderated(NOTICE_OF[action], target, text, by=by, reason=reason, remove=remove,
                      ts=str(event["ts"])) and remove and local is not None:
        server.disconnect(local)
    server.log(f"moderation (from another node): {text}")


class Limits(Protocol):
    """The server options a connection's reader obeys."""

    @property
    def max_frame(self) -> int: ...
    @property
    def rate(self) -> float: ...
    @property
    def heartbeat(self) -> float: ...
    @property
    def hello_timeout(self) -> float: ...


class WriterHooks(Protocol):
    """What a reader asks of the one writer thread."""

    def wait_for_room(self) -> None: ...
    def kick(self, conn: Connection) -> None: ...
    def close(self, conn: Connection) -> None: ...


class Host(Protocol):
    """What a handler needs of its server, and nothing more (``ChatServer`` is one)."""

    @property
    def config(self) -> Limits: ...
    @property
    def room(self) -> Room: ...
    @property
    def writer(self) -> WriterHooks: ...
    @property
    def stopping(self) -> threading.Event: ...
    @property
    def id_base(self) -> int: ...
    @property
    def gate(self) -> Gate: ...
    def log(self, text: str) -> None: ...
    def log_messages(self, sender: str, to: str, texts: list[str]) -> None: ...
    def dialect_known(self, conn: Connection, dialect: Dialect) -> None: ...
    def forget(self, conn: Connection) -> None: ...
    def disconnect(self, member: Member) -> None: ...


class Handler(DialectReaders):
    """Reads one connection, in its own thread, until it ends."""

    def __init__(self, server: Host, conn: Connection,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.config = server.config
        self.room = server.room
        self.gate = server.gate
        self.conn = conn
        self.host = host_of(conn.address)  # the peer's address, for the throttle and bans
        self.sock = conn.sock
        self.clock = clock
        self.member = Member(server.id_base + conn.fd, conn, Dialect.NATIVE, conn.address)
        conn.member = self.member
        self.started = clock()
        self.last_heard = self.started
        self.ping_sent: float | None = None
        self.bucket = TokenBucket(self.config.rate, 2.0 * self.config.rate, clock)
        self.used_who = False
        self._poll = select.poll() if hasattr(select, "poll") else None
        if self._poll is not None:
            self._poll.register(self.sock, select.POLLIN)
        self._requests: dict[type, Callable[[Request], None]] = {
            Hello: self.hello, Say: self.say_one, Dm: self.dm, SetMode: self.set_mode,
            ListUsers: self.users, SetStatus: self.set_status, Ping: self.ping,
            Pong: lambda r: None,  # it already counted as a sign of life when it arrived
            Quit: self.quit, Register: self.register, ChangePassword: self.change_password,
            BacklogRequest: self.backlog,
            Kick: self.moderate, Mute: self.moderate, Unmute: self.moderate, Ban: self.moderate,
        }

    # -- reading ------------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        """When this connection next needs attention if nothing arrives."""
        if not self.member.registered:
            return self._deadline_of_hello()
        if self.member.dialect is not Dialect.NATIVE or self.config.heartbeat <= 0:
            return None
        if self.ping_sent is not None:
            return self.ping_sent + self.config.heartbeat
        return self.last_heard + self.config.heartbeat

    def _deadline_of_hello(self) -> float:
        return self.started + self.config.hello_timeout

    def _on_deadline(self) -> None:
        if not self.member.registered:
            raise Disconnect(reason="no registration within the hello timeout")
        if self.ping_sent is not None:
            raise Disconnect(reason="no answer to ping")
        self.ping_sent = self.clock()
        self.room.push(self.member, PING_FRAME)

    def _wait_readable(self, timeout: float | None) -> bool:
        if self._poll is not None:
            return bool(self._poll.poll(None if timeout is None else max(0, timeout) * 1000))
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def receive(self) -> bytes:
        """The next bytes from the peer, serving deadlines while waiting; b"" at the end."""
        self.check_cut()
        self.server.writer.wait_for_room()  # a saturated writer slows the senders down
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                deadline = self._deadline()
                timeout = None if deadline is None else deadline - self.clock()
                if timeout is not None and timeout <= 0:
                    self._on_deadline()
                    continue
                self._wait_readable(timeout)
                continue
            except OSError:
                return b""
            self.last_heard = self.clock()
            self.ping_sent = None
            if not self.member.registered and self.last_heard > self._deadline_of_hello():
                # Checked on arrival too: a peer that never pauses must not outlive the timeout.
                raise Disconnect(reason="no registration within the hello timeout")
            tls = self.conn.tls
            if tls is None:
                return data
            try:
                plaintext = tls.decrypt(data)
            except ssl.SSLError as error:
                raise Disconnect(reason=f"TLS failed: {error.reason or error}") from None
            if tls.records_waiting:
                self.server.writer.kick(self.conn)  # handshake records to send
            if plaintext or not data:
                return plaintext

    def admitted(self, items: list[T]) -> Iterator[list[T]]:
        """``items`` in slices no faster than ``--rate`` allows: excess waits, nothing is dropped.

        While this thread waits it does not read, so TCP pushes back on this sender alone.
        """
        start = 0
        while start < len(items):
            self.check_cut()
            count, wait = self.bucket.take(len(items) - start)
            if count == 0:
                if self.server.stopping.wait(wait):
                    raise Disconnect(reason="server stopping")
                continue
            yield items[start : start + count]
            start += count

    def check_cut(self) -> None:
        """End now if the server cut this connection off (output limit, failed send, door,
        cluster): nothing more it sent is acted on (SPEC 1.5). Checked before every request."""
        if self.conn.cut:
            raise Disconnect(reason="cut off by the server")

    # -- the connection's life ----------------------------------------------------------------

    def run(self) -> None:
        quitting = False
        reason = "closed by the client"
        try:
            first = self.detect()
            if first is not None:
                dialect, data = first
                self.server.dialect_known(self.conn, dialect)
                if not self.gate.admits(dialect):
                    self.refuse_dialect(dialect)
                {Dialect.NATIVE: self.run_native, Dialect.LINE: self.run_line,
                 Dialect.PLAIN: self.run_plain}[dialect](data)
        except Disconnect as end:
            quitting, reason = end.quitting, end.reason or reason
        except Exception as error:  # one broken connection never takes the server down
            reason = f"internal error: {error!r}"
        finally:
            if self.conn.overflowed:
                reason = "too slow to read its messages"
            stopping = self.server.stopping.is_set()
            if stopping:
                reason = "server stopped"
            # A native member that did not quit keeps its session for the resume window.
            if quitting:
                self.room.leave(self.member, quitting, notify=not stopping)
            else:
                self.room.cut_off(self.member, notify=not stopping)
            self.server.forget(self.conn)
            self.server.writer.close(self.conn)
            self.server.log(
                f"disconnected: {self.conn.address} ({reason}; {self.room.online} online)"
            )

    def detect(self) -> tuple[Dialect, bytes] | None:
        """Read until ``protocol.sniff`` knows the dialect; the bytes from where it begins."""
        data = b""
        while True:
            chunk = self.receive()
            if not chunk:
                return None
            data += chunk
            found = sniff(data, tls=self.conn.tls is not None, limit=self.config.max_frame)
            if isinstance(found, Refused):
                raise Disconnect(reason=found.reason)
            if found is not None:
                return found.dialect, data[found.start :]

    # -- native -------------------------------------------------------------------------------

    def send(self, event: Error | Users | StatusChanged | Pong | Bye) -> None:
        self.room.push(self.member, encode_event(event))

    def error(self, error: ChatError) -> None:
        """The one place where a ``ProtocolError`` or a ``Refusal`` becomes an ``error`` event."""
        if (isinstance(error, ProtocolError) and not self.member.registered
                and error.kind not in (None, "hello")):
            error = Refusal(ErrorCode.NOT_REGISTERED, 'Register first with "hello".', error.ref)
        self.send(Error.of(error))

    def run_native(self, data: bytes) -> None:
        decoder = RequestDecoder(self.config.max_frame)
        while data:
            for batch in self.admitted(decoder.feed(data)):
                self.handle_batch(batch)
            data = self.receive()

    def handle_batch(self, items: list[Request | ProtocolError]) -> None:
        index = 0
        while index < len(items):
            self.check_cut()
            item = items[index]
            if isinstance(item, Say) and self.member.registered:
                # A run of broadcasts is delivered as one: one put per recipient.
                end = index + 1
                while end < len(items) and isinstance(items[end], Say):
                    end += 1
                run = [s for s in items[index:end] if isinstance(s, Say)]
                index = end
                try:
                    self.gate.check_may_speak(self.member.name)
                except Refusal as refusal:
                    for request in run:  # each say gets its own reply
                        self.error(Refusal(refusal.code, refusal.message, request.ref))
                    continue
                self.say(run)
                continue
            index += 1
            try:
                if isinstance(item, ProtocolError):
                    raise item
                self.handle(item)
            except ChatError as error:
                self.error(error)

    def handle(self, request: Request) -> None:
        """Carry out one request; a refusal is raised (``Refusal``) and answered by the caller."""
        if not self.member.registered and not isinstance(request, Hello):
            raise Refusal(ErrorCode.NOT_REGISTERED, 'Register first with "hello".', request.ref)
        carry_out = self._requests.get(type(request))
        if carry_out is None:  # parsed by the protocol, not (yet) served by this server
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE,
                                f'This server does not serve "{request.TYPE}" requests.',
                                request.ref, request.TYPE)
        try:
            carry_out(request)
        except Refusal as refusal:
            if refusal.ref is None:  # raised by a rule that does not know the request
                refusal.ref = request.ref
            raise

    @property
    def tls(self) -> bool:
        return self.conn.tls is not None

    def hello(self, request: Request) -> None:
        assert isinstance(request, Hello)
        if self.member.registered:
            raise Refusal(ErrorCode.ALREADY_REGISTERED, "You are already registered.",
                          request.ref)
        # A hello that resumes a session (SPEC 6.4) skips the password checks: its token stands
        # for both passwords (SPEC 7.1), and resuming never runs scrypt.
        if request.session is not None and self.resume(request):
            return
        self.check_entry(request)
        try:
            self.room.register(self.member, request.name, request.title, request.company,
                               request.ref)
        except Refusal as error:
            if error.code is ErrorCode.SERVER_FULL:
                self.error(error)
                raise Disconnect(reason="server full") from None
            raise

    def check_entry(self, request: Hello) -> None:
        """The password checks of a new session (SPEC 7.1, 7.2): ban, server password, account.

        On the connection's own thread, no lock held: an account's scrypt runs on the hash
        workers while this thread waits, and nobody else waits for it.
        """
        entry = Entry(request.name, request.server_password, request.password)
        account = self.gate.check_entry(entry, host=self.host, tls=self.tls)
        self.member.account = account
        self.member.admin = account is not None and self.gate.admins.may_moderate(
            request.name or "", account)

    def register(self, request: Request) -> None:
        """``register``: the current name becomes an account with this password."""
        assert isinstance(request, Register)
        member = self.member
        account = self.gate.register(member.name, request.password, host=self.host, tls=self.tls)
        with self.room.lock:
            member.account = account
            member.admin = self.gate.admins.may_moderate(member.name, account)
            member.changed()
        self.room.push(member, ok_frames(Ok(0, 0), [request.ref]))

    def change_password(self, request: Request) -> None:
        """``password``: change this account's password (the old one first)."""
        assert isinstance(request, ChangePassword)
        self.gate.change_password(self.member.account, request.old, request.new,
                                  host=self.host, tls=self.tls)
        self.room.push(self.member, ok_frames(Ok(0, 0), [request.ref]))

    def moderate(self, request: Request) -> None:
        """``kick``, ``mute``, ``unmute``, ``ban`` (SPEC 7.3): an admin's action, told to all.

        In a cluster the target may be a member of another node (found in this node's mirror):
        the sanction is published as a ``moderate`` event, which its node applies, and ``ok``
        means it was handed to that node (like a dm to another node).
        """
        assert isinstance(request, Moderation)
        action, admin, gate, room = Action(request.TYPE), self.member, self.gate, self.room
        target = room.member_named(request.to)
        if target is None and room.backplane is not None:
            target = room.remote_named(request.to)
        remote = target is not None and target.node is not None
        name = target.name if target is not None else str(request.to)
        gate.admins.authorize(admin.name, admin.account, action, name)  # not-allowed
        if action is Action.UNMUTE:
            # A mute given anywhere in the cluster is recorded here too (its moderate event),
            # but one given while this node was away is not: a remote target's node decides.
            if gate.sanctions.unmute(name) is None and not remote:
                if target is None:  # nobody of that name here, muted or not
                    raise Refusal(ErrorCode.NO_SUCH_USER, no_such_user_message(request.to))
                # There, but not muted: no-such-user would say it is gone (SPEC 1.3).
                raise Refusal(ErrorCode.BAD_REQUEST, f"{name} is not muted.")
        elif target is None and not (action is Action.BAN and gate.is_account(name)):
            raise Refusal(ErrorCode.NO_SUCH_USER, no_such_user_message(request.to))
        else:
            # Online here: its account, else its address; elsewhere or offline: its account
            # (an address is banned by the target's own node, which knows it).
            address = target.address if target is not None and not remote else None
            record_sanction(gate, action, name, address, request.minutes, by=admin.name,
                            reason=request.reason)
        remove = action in (Action.KICK, Action.BAN) and target is not None
        text = moderation_text(action, name, admin.name, request.minutes, request.reason)
        announce = None
        if room.backplane is not None:
            to = None if target is None else {"id": target.id, "name": target.name}
            announce = {"a": action.value, "to": to, "n": name, "by": admin.name,
                        "r": request.reason, "m": request.minutes, "t": text}
        if not room.moderated(NOTICE_OF[action], target, text, by=admin.name,
                              reason=request.reason, remove=remove, announce=announce):
            raise Refusal(ErrorCode.NO_SUCH_USER, no_such_user_message(request.to))
        if remove and target is not None and not remote:
            # Its session ended in ``moderated`` (not kept for resuming, SPEC 7.3): when its
            # reader leaves, there is nothing left to suspend.
            self.server.disconnect(target)
        self.server.log(f"moderation: {text}")
        self.room.push(admin, ok_frames(Ok(0, 0), [request.ref]))

    def resume(self, request: Hello) -> bool:
        """``hello`` with a session within its window resumes it (SPEC 6.4); False: register."""
        assert request.session is not None
        return self.room.resume(self.member, request.session, request.last_seq, request.ref)

    def backlog(self, request: Request) -> None:
        """SPEC 6.3: read on this thread, outside the room lock; the logged frames spliced."""
        assert isinstance(request, BacklogRequest)
        events, more = self.room.backlog(self.member, request.before, request.after,
                                         request.limit)
        ref = b"" if request.ref is None else b',"ref":' + encode_json(request.ref).encode()
        frame = (b'{"type":"backlog","events":[' + b",".join(e.frame for e in events)
                 + b'],"more":' + (b"true" if more else b"false") + ref + b"}\0")
        self.room.push(self.member, frame)

    def say_one(self, request: Request) -> None:
        assert isinstance(request, Say)
        self.say([request])

    def say(self, requests: list[Say]) -> None:
        texts = [request.text for request in requests]
        delivery = self.room.broadcast(self.member, texts)
        ok = Ok(delivery.delivered, delivery.queued)  # one count for the run, each with its ref
        self.room.push(self.member, ok_frames(ok, [request.ref for request in requests]))
        self.server.log_messages(self.member.name, "all", texts)

    def dm(self, request: Request) -> None:
        assert isinstance(request, Dm)
        self.gate.check_may_speak(self.member.name)
        recipient, delivery = self.room.direct(self.member, request.to, request.text,
                                               request.ref, request.name)
        self.room.push(self.member, ok_frames(Ok(delivery.delivered, delivery.queued),
                                              [request.ref]))
        self.server.log_messages(self.member.name, recipient.name, [request.text])

    def set_mode(self, request: Request) -> None:
        assert isinstance(request, SetMode)
        reply = encode_event(ModeChanged(request.mode, request.ref))
        self.room.set_mode(self.member, Mode(request.mode), reply)

    def users(self, request: Request) -> None:
        self.send(Users(self.room.users(), request.ref))

    def set_status(self, request: Request) -> None:
        assert isinstance(request, SetStatus)
        self.send(StatusChanged(self.room.set_status(self.member, request.status), request.ref))

    def ping(self, request: Request) -> None:
        self.send(Pong(request.ref))

    def quit(self, request: Request) -> None:
        self.room.leave(self.member, quitting=True)
        self.send(Bye(request.ref))
        raise Disconnect(quitting=True, reason="quit")
