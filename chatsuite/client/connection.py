"""The native connection (SPEC 1): typed requests out with fresh refs, replies matched back by ref.

``Connection`` owns the receiver's side of a native link: its thread decodes events; a reply (an
event carrying the ``ref`` of one of our requests) goes to the request waiting for it; a ``ping``
is answered with ``pong`` (the only write from that thread); every other event goes to
``on_event``. A request waits for its reply a bounded time; a ref given up on is remembered (at
most ``ABANDONED_MAX``), so that its late reply is dropped rather than taken for an event.

Invariant: each request gets exactly its own reply, or ``TooLong`` (not sent), ``NoReply`` (not
answered in time: the connection goes on, a late reply is dropped), or ``ConnectionLost``.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
from collections.abc import Callable

from chatsuite.client.display import sanitize
from chatsuite.client.session import (
    BYE_TIMEOUT,
    LOST,
    REPLY_TIMEOUT,
    ConnectionLost,
    Link,
    NoReply,
    RequestFailed,
    TooLong,
    closed_early,
)
from chatsuite.client.transport import Transport
from protocol import (
    MAX_FRAME,
    Error,
    ErrorCode,
    Event,
    EventDecoder,
    Ping,
    Pong,
    Quit,
    Request,
    encode_event,
)

TLS_RECORD_STARTS = (0x15, 0x16)  # a TLS alert or handshake record: the server speaks TLS
ABANDONED_MAX = 1024  # refs given up on that are remembered, to drop their late replies
NO_REPLY = "the server did not answer in time"


def too_long(size: int, limit: int) -> str:
    """Why a line is not sent (SPEC 4.10), in one sentence."""
    return (f"that line is too long to send: the server accepts at most {limit:,} bytes a "
            f"request and this one is {size:,} bytes, so nothing was sent")


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
