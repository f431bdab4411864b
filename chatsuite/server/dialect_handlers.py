"""The readers of the two older dialects: the line protocol (seed 002) and plain text (seed 001).

``DialectReaders`` is a mixin of ``handler.Handler``: ``run_line`` and ``run_plain`` read a
connection that ``protocol.sniff`` found speaking one of them, decode with ``chatsuite.dialects``
and hand what they decode to the ``Room``, as the native reader does; ``refuse_dialect`` turns
one away when the server has a password. They use the handler's reading (``receive``,
``admitted``, ``check_cut``) and state, declared below for the type checker only. It also owns
``Disconnect``, the exception that ends any reader (the handler re-exports it).
Invariant: these readers end at most their own connection (by raising ``Disconnect``), and a
line or plain client never gets a native frame: every reply is in its own dialect.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

from chatsuite.dialects import (
    PLAIN_QUIT,
    LineList,
    LineLogin,
    LineReply,
    LineSend,
    line,
    line_list,
    parse_line_command,
    plain_frame,
    plain_text,
)
from modes import Mode
from protocol import LF, NUL, Dialect, ErrorCode, Oversized, Refusal, Splitter

if TYPE_CHECKING:
    from chatsuite.server.gate import Gate
    from chatsuite.server.handler import Host, Limits
    from chatsuite.server.members import Member
    from chatsuite.server.room import Room

T = TypeVar("T")


class Disconnect(Exception):
    """Ends a connection's reader; ``quitting`` tells a chosen quit from a lost connection."""

    def __init__(self, quitting: bool = False, reason: str = "") -> None:
        super().__init__(reason)
        self.quitting = quitting
        self.reason = reason


class DialectReaders:
    """The line and plain readers of a ``Handler`` (which provides everything declared here)."""

    server: Host
    config: Limits
    room: Room
    gate: Gate
    member: Member
    host: str
    used_who: bool  # the line client asked WHO: a bad destination is then UNKNOWN (seed 002)

    if TYPE_CHECKING:  # the handler's reading; at run time the Handler's own methods
        def receive(self) -> bytes: ...
        def admitted(self, items: list[T]) -> Iterator[list[T]]: ...
        def check_cut(self) -> None: ...

    def refuse_dialect(self, dialect: Dialect) -> None:
        """A line or plain client cannot give the server password (SPEC 7.1): line gets
        ``BUSY``, plain is just closed."""
        if dialect is Dialect.LINE:
            self.send_line(LineReply.BUSY.value)
        raise Disconnect(reason="the server has a password and this dialect cannot give one")

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
                    self.check_cut()
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
                self.gate.check_line_entry(command.name, self.host)
                self.room.register(member, command.name)
            except Refusal as error:
                if error.code in (ErrorCode.SERVER_FULL, ErrorCode.BANNED):
                    self.send_line(LineReply.BUSY.value)
                    raise Disconnect(reason=error.code.value) from None
                # An account's name: a line client cannot give its password (SPEC 7.2).
                taken = error.code in (ErrorCode.NAME_TAKEN, ErrorCode.PASSWORD_REQUIRED)
                self.send_line((LineReply.IN_USE if taken else LineReply.BAD_BODY).value)
        elif not member.registered:
            self.send_line(LineReply.BAD_HEADER.value)
        elif isinstance(command, LineList):
            self.used_who = self.used_who or command.who
            self.room.push(member, line_list(self.room.names(), command.who))
        elif isinstance(command, LineSend):
            try:
                self.gate.check_may_speak(member.name)
            except Refusal:
                # Muted: the line protocol has no word for it; BAD-RQST-BODY says "refused"
                # without claiming the recipient is gone (docs/dialects.md).
                self.send_line(LineReply.BAD_BODY.value)
                return
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
                    self.check_cut()
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
                            self.gate.check_line_entry(None, self.host)
                            self.room.register(self.member, None)
                        except Refusal as error:
                            raise Disconnect(reason=error.code.value) from None
                    texts.append(text)
                self.flush_plain(texts)
            data = self.receive()

    def flush_plain(self, texts: list[str]) -> None:
        if texts:
            try:
                self.gate.check_may_speak(self.member.name)
            except Refusal as refusal:  # muted: told in the dialect's own way, nothing sent
                self.room.push(self.member, plain_frame(refusal.message))
                return
            self.room.broadcast(self.member, texts)
            self.server.log_messages(self.member.name, "all", texts)

