"""One connection's life on the server: its reader thread, from the first byte to the close.

A ``Handler`` is the only reader of its socket. It learns the dialect from the first bytes
(SPEC 2: ``{`` native, else a line or a NUL frame first), decodes with ``protocol``, applies the
rate limit and the heartbeat and hello deadlines while it waits, and asks the ``Room`` what to
do with each request. Replies go through the same outbox as everything else, so the writer
thread sends them in order. Invariant: whatever a peer sends, the handler ends at most its own
connection, and always removes its member from the room and hands its socket to the writer
to be closed.
"""

from __future__ import annotations

import select
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

from chatsuite.dialects import (
    PLAIN_QUIT,
    LineList,
    LineLogin,
    LineReply,
    LineSend,
    is_http_request_line,
    line,
    line_list,
    parse_line_command,
    plain_text,
)
from chatsuite.server.members import Dialect, Member
from chatsuite.server.writer import RECV_SIZE, Connection
from modes import Mode
from protocol import (
    LF,
    NUL,
    Dm,
    ErrorCode,
    Hello,
    ListUsers,
    Oversized,
    Ping,
    Pong,
    ProtocolError,
    Quit,
    Ref,
    Request,
    RequestDecoder,
    Say,
    SetMode,
    SetStatus,
    Splitter,
    encode,
)

if TYPE_CHECKING:
    from chat_server import ChatServer

T = TypeVar("T")


class Disconnect(Exception):
    """Ends a connection's reader; ``quitting`` tells a chosen quit from a lost connection."""

    def __init__(self, quitting: bool = False, reason: str = "") -> None:
        super().__init__(reason)
        self.quitting = quitting
        self.reason = reason


class Handler:
    """Reads one connection, in its own thread, until it ends."""

    def __init__(self, server: ChatServer, conn: Connection) -> None:
        self.server = server
        self.config = server.config
        self.room = server.room
        self.conn = conn
        self.sock = conn.sock
        self.member = Member(server.id_base + conn.fd, conn, Dialect.NATIVE, conn.address)
        conn.member = self.member
        self.started = time.monotonic()
        self.last_heard = self.started
        self.ping_sent: float | None = None
        self.tokens = 2.0 * self.config.rate  # rate limit bucket: burst of twice the rate
        self.refilled = self.started
        self.used_who = False
        self._poll = select.poll() if hasattr(select, "poll") else None
        if self._poll is not None:
            self._poll.register(self.sock, select.POLLIN)

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
        self.ping_sent = time.monotonic()
        self.room.push(self.member, encode({"type": "ping"}))

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
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    self._on_deadline()
                    continue
                self._wait_readable(timeout)
                continue
            except OSError:
                return b""
            self.last_heard = time.monotonic()
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

        A token bucket holding up to twice the rate (the burst). While this thread waits it
        does not read, so TCP pushes back on this sender alone.
        """
        rate = self.config.rate
        if rate <= 0:
            if items:
                yield items
            return
        start = 0
        while start < len(items):
            now = time.monotonic()
            self.tokens = min(2.0 * rate, self.tokens + (now - self.refilled) * rate)
            self.refilled = now
            if self.tokens < 1:
                if self.server.stopping.wait((1 - self.tokens) / rate):
                    raise Disconnect(reason="server stopping")
                continue
            count = min(len(items) - start, int(self.tokens))
            self.tokens -= count
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
        except Exception as error:  # noqa: BLE001 - one broken connection never takes the server down
            reason = f"internal error: {error!r}"
        finally:
            if self.conn.overflowed:
                reason = "too slow to read its messages"
            stopping = self.server.stopping.is_set()
            if stopping:
                reason = "server stopped"
            self.room.leave(self.member, quitting, notify=not stopping)
            self.server.forget(self.conn)
            self.server.writer.close(self.conn)
            self.server.log(
                f"disconnected: {self.conn.address} ({reason}; {self.room.online} online)"
            )

    def refuse(self, dialect: Dialect) -> None:
        """Answer "server full" in the connection's own dialect and end it."""
        if dialect is Dialect.NATIVE:
            self.error(ProtocolError(ErrorCode.SERVER_FULL,
                                     "Too many connections from your address; try again later."))
        elif dialect is Dialect.LINE:
            self.send_line(LineReply.BUSY.value)
        raise Disconnect(reason="too many connections from its address")

    def detect(self) -> tuple[Dialect, bytes] | None:
        """Read until the dialect is known: ``{`` native, else a line or a NUL frame first."""
        data = b""
        while True:
            chunk = self.receive()
            if not chunk:
                return None
            data += chunk
            if data[:1] == b"{":
                return Dialect.NATIVE, data
            if data[:1] == b"\x16" and self.conn.tls is None:
                raise Disconnect(reason="a TLS handshake on a plain port")
            newline, nul = data.find(LF), data.find(NUL)
            if newline < 0 and nul < 0:
                if len(data) > self.config.max_frame:
                    raise Disconnect(reason="no line or frame end in the first bytes")
                continue
            if nul < 0 or 0 <= newline < nul:
                if is_http_request_line(data[:newline]):
                    raise Disconnect(reason="an HTTP request, not a chat client")
                return Dialect.LINE, data
            return Dialect.PLAIN, data

    # -- native -------------------------------------------------------------------------------

    def reply(self, obj: dict, ref: Ref) -> None:
        if ref is not None:
            obj["ref"] = ref
        self.room.push(self.member, encode(obj))

    def error(self, error: ProtocolError) -> None:
        self.room.push(self.member, encode({
            "type": "error", "code": error.code.value, "message": error.message, "ref": error.ref,
        }))

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
            if isinstance(item, ProtocolError):
                if not self.member.registered and item.kind not in (None, "hello"):
                    item = ProtocolError(ErrorCode.NOT_REGISTERED,
                                         'Register first with "hello".', item.ref)
                self.error(item)
            else:
                try:
                    self.handle(item)
                except ProtocolError as error:
                    self.error(error)

    def say(self, requests: list[Say]) -> None:
        texts = [request.text for request in requests]
        delivery = self.room.broadcast(self.member, texts)
        ok = {"type": "ok", "delivered": delivery.delivered, "queued": delivery.queued}
        plain_ok = encode(ok)  # the same for every say of the run that has no ref
        oks = [plain_ok if r.ref is None else encode({**ok, "ref": r.ref}) for r in requests]
        self.room.push(self.member, b"".join(oks))
        self.server.log_messages(self.member.name, "all", texts)

    def handle(self, request: object) -> None:
        member = self.member
        if isinstance(request, Hello):
            if member.registered:
                raise ProtocolError(ErrorCode.ALREADY_REGISTERED, "You are already registered.",
                                    request.ref)
            try:
                self.room.register(member, request.name, request.title, request.company,
                                   request.ref)
            except ProtocolError as error:
                if error.code is ErrorCode.SERVER_FULL:
                    self.error(error)
                    raise Disconnect(reason="server full")
                raise
            return
        ref = getattr(request, "ref", None)
        if not member.registered:
            raise ProtocolError(ErrorCode.NOT_REGISTERED, 'Register first with "hello".', ref)
        if isinstance(request, Pong):
            return  # it already counted as a sign of life when it arrived
        if isinstance(request, Say):
            self.say([request])
        elif isinstance(request, Dm):
            recipient, delivery = self.room.direct(member, request.to, request.text, ref)
            self.reply({"type": "ok", "delivered": delivery.delivered,
                        "queued": delivery.queued}, ref)
            self.server.log_messages(member.name, recipient.name, [request.text])
        elif isinstance(request, SetMode):
            reply = {"type": "mode", "mode": request.mode}
            if ref is not None:
                reply["ref"] = ref
            self.room.set_mode(member, Mode(request.mode), encode(reply))
        elif isinstance(request, ListUsers):
            self.reply({"type": "users", "users": self.room.users()}, ref)
        elif isinstance(request, SetStatus):
            status = self.room.set_status(member, request.status)
            self.reply({"type": "status", "status": status}, ref)
        elif isinstance(request, Ping):
            self.reply({"type": "pong"}, ref)
        elif isinstance(request, Quit):
            self.room.leave(member, quitting=True)
            self.reply({"type": "bye"}, ref)
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
            except ProtocolError as error:
                if error.code is ErrorCode.SERVER_FULL:
                    self.send_line(LineReply.BUSY.value)
                    raise Disconnect(reason="server full")
                reply = LineReply.IN_USE if error.code is ErrorCode.NAME_TAKEN else LineReply.BAD_BODY
                self.send_line(reply.value)
        elif not member.registered:
            self.send_line(LineReply.BAD_HEADER.value)
        elif isinstance(command, LineList):
            self.used_who = self.used_who or command.who
            self.room.push(member, line_list(self.room.names(), command.who))
        elif isinstance(command, LineSend):
            try:
                recipient, _ = self.room.direct(member, command.user, command.text)
            except ProtocolError:
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
                        except ProtocolError:
                            raise Disconnect(reason="server full") from None
                    texts.append(text)
                self.flush_plain(texts)
            data = self.receive()

    def flush_plain(self, texts: list[str]) -> None:
        if texts:
            self.room.broadcast(self.member, texts)
            self.server.log_messages(self.member.name, "all", texts)
