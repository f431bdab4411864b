"""One connection's life on the server: its reader thread, from the first byte to the close.

A ``Handler`` is the only reader of its socket, and thin: it reads bytes into the protocol
(``protocol.sniff`` picks the dialect, the decoders turn bytes into typed requests) and hands
what they decode to the ``Room``, whose answers are typed events. It keeps only the connection's
clocks: the rate limit (a pure ``TokenBucket``), the heartbeat and the hello deadline. It reaches
the server through the narrow ``Host`` protocol, never the whole ``ChatServer``. Replies go
through the same outbox as everything else, so the writer thread sends them in order.
Invariant: whatever a peer sends, the handler ends at most its own connection, and always
removes its member from the room and hands its socket to the writer to be closed.
"""

from __future__ import annotations

import select
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from chatsuite.dialects import (
    PLAIN_QUIT,
    LineList,
    LineLogin,
    LineReply,
    LineSend,
    line,
    line_list,
    parse_line_command,
    plain_text,
)
from chatsuite.server.members import Member
from chatsuite.server.room import Room
from chatsuite.server.writer import RECV_SIZE, Connection
from modes import Mode
from protocol import (
    LF,
    NUL,
    BacklogRequest,
    Bye,
    ChatError,
    Dialect,
    Dm,
    Error,
    ErrorCode,
    Hello,
    ListUsers,
    ModeChanged,
    Ok,
    Oversized,
    Ping,
    Pong,
    ProtocolError,
    Quit,
    Refusal,
    Refused,
    Request,
    RequestDecoder,
    Say,
    SetMode,
    SetStatus,
    Splitter,
    StatusChanged,
    Users,
    encode_event,
    encode_json,
    ok_frames,
    sniff,
)

T = TypeVar("T")

PING_FRAME = encode_event(Ping())
EPSILON = 1e-9


class TokenBucket:
    """A rate limit, pure: ``rate`` items a second, up to ``burst`` at once; time from ``clock``.

    ``take(n)`` says how many of ``n`` items may pass now (and spends them) and, when none may,
    how many seconds until one can. A rate of 0 or less lets everything pass.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst  # a new connection may send its burst at once
        self.refilled = clock()

    def take(self, wanted: int) -> tuple[int, float]:
        """``(items that may pass now, seconds to wait when that is 0)``."""
        if self.rate <= 0:
            return wanted, 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        # EPSILON: waiting exactly the time told may refill to 0.999...: that must count as 1.
        if self.tokens < 1 - EPSILON:
            return 0, (1 - self.tokens) / self.rate
        count = min(wanted, int(self.tokens + EPSILON))
        self.tokens = max(0.0, self.tokens - count)
        return count, 0.0


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
    def log(self, text: str) -> None: ...
    def log_messages(self, sender: str, to: str, texts: list[str]) -> None: ...
    def dialect_known(self, conn: Connection, dialect: Dialect) -> None: ...
    def forget(self, conn: Connection) -> None: ...


class Disconnect(Exception):
    """Ends a connection's reader; ``quitting`` tells a chosen quit from a lost connection."""

    def __init__(self, quitting: bool = False, reason: str = "") -> None:
        super().__init__(reason)
        self.quitting = quitting
        self.reason = reason


class Handler:
    """Reads one connection, in its own thread, until it ends."""

    def __init__(self, server: Host, conn: Connection,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.config = server.config
        self.room = server.room
        self.conn = conn
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
            Quit: self.quit, BacklogRequest: self.backlog,
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
            count, wait = self.bucket.take(len(items) - start)
            if count == 0:
                if self.server.stopping.wait(wait):
                    raise Disconnect(reason="server stopping")
                continue
            yield items[start : start + count]
            start += count

    # -- the connection's life ----------------------------------------------------------------

    def run(self) -> None:
        quitting = False
        reason = "closed by the client"
        try:
            first = self.detect()
            if first is not None:
                dialect, data = first
                self.server.dialect_known(self.conn, dialect)
                if self.conn.refused:
                    self.refuse(dialect)
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
            if quitting or not self.room.suspend(self.member, notify=not stopping):
                self.room.leave(self.member, quitting, notify=not stopping)
            self.server.forget(self.conn)
            self.server.writer.close(self.conn)
            self.server.log(
                f"disconnected: {self.conn.address} ({reason}; {self.room.online} online)"
            )

    def refuse(self, dialect: Dialect) -> None:
        """Answer "server full" in the connection's own dialect and end it."""
        if dialect is Dialect.NATIVE:
            self.error(Refusal(ErrorCode.SERVER_FULL,
                               "Too many connections from your address; try again later."))
        elif dialect is Dialect.LINE:
            self.send_line(LineReply.BUSY.value)
        raise Disconnect(reason="too many connections from its address")

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
            item = items[index]
            if isinstance(item, Say) and self.member.registered:
                # A run of broadcasts is delivered as one: one put per recipient.
                end = index + 1
                while end < len(items) and isinstance(items[end], Say):
                    end += 1
                self.say([s for s in items[index:end] if isinstance(s, Say)])
                index = end
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
        carry_out(request)

    def hello(self, request: Request) -> None:
        assert isinstance(request, Hello)
        if self.member.registered:
            raise Refusal(ErrorCode.ALREADY_REGISTERED, "You are already registered.",
                          request.ref)
        if request.session is not None and self.resume(request):
            return
        try:
            self.room.register(self.member, request.name, request.title, request.company,
                               request.ref)
        except Refusal as error:
            if error.code is ErrorCode.SERVER_FULL:
                self.error(error)
                raise Disconnect(reason="server full") from None
            raise

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

    # -- line protocol (seed 002) -------------------------------------------------------------

    def send_line(self, text: str) -> None:
        self.room.push(self.member, line(text))

    def run_line(self, data: bytes) -> None:
        self.member.dialect = Dialect.LINE
        self.member.mode = Mode.VIEWING
        splitter = Splitter(LF, self.config.max_frame)
        while data:
            for batch in self.admitted(splitter.feed(data)):
                for raw in batch:
                    if isinstance(raw, Oversized):
                        self.send_line(LineReply.BAD_BODY.value)
                    else:
                        self.handle_line(raw)
            data = self.receive()

    def handle_line(self, raw: bytes) -> None:
        command = parse_line_command(raw)
        member = self.member
        if isinstance(command, LineReply):
            self.send_line(command.value)
        elif isinstance(command, LineLogin):
            if member.registered:
                self.send_line(LineReply.BAD_HEADER.value)
                return
            try:
                self.room.register(member, command.name)
            except Refusal as error:
                if error.code is ErrorCode.SERVER_FULL:
                    self.send_line(LineReply.BUSY.value)
                    raise Disconnect(reason="server full") from None
                taken = error.code is ErrorCode.NAME_TAKEN
                self.send_line((LineReply.IN_USE if taken else LineReply.BAD_BODY).value)
        elif not member.registered:
            self.send_line(LineReply.BAD_HEADER.value)
        elif isinstance(command, LineList):
            self.used_who = self.used_who or command.who
            self.room.push(member, line_list(self.room.names(), command.who))
        elif isinstance(command, LineSend):
            try:
                recipient, _ = self.room.direct(member, command.user, command.text)
            except Refusal:
                bad = LineReply.UNKNOWN if self.used_who else LineReply.BAD_DEST
                self.send_line(bad.value)
                return
            self.send_line(LineReply.SEND_OK.value)
            self.server.log_messages(member.name, recipient.name, [command.text])

    # -- plain text (seed 001) ----------------------------------------------------------------

    def run_plain(self, data: bytes) -> None:
        self.member.dialect = Dialect.PLAIN
        self.member.mode = Mode.VIEWING
        splitter = Splitter(NUL, self.config.max_frame)
        while data:
            for batch in self.admitted(splitter.feed(data)):
                texts: list[str] = []
                for raw in batch:
                    if isinstance(raw, Oversized):
                        continue
                    text = plain_text(raw)
                    if text == PLAIN_QUIT:
                        self.flush_plain(texts)
                        raise Disconnect(quitting=True, reason="quit")
                    if not text:
                        continue
                    if not self.member.registered:
                        try:
                            self.room.register(self.member, None)
                        except Refusal:
                            raise Disconnect(reason="server full") from None
                    texts.append(text)
                self.flush_plain(texts)
            data = self.receive()

    def flush_plain(self, texts: list[str]) -> None:
        if texts:
            self.room.broadcast(self.member, texts)
            self.server.log_messages(self.member.name, "all", texts)
