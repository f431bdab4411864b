"""The write side of the server: every socket's output, written by one thread.

``Connection.push`` (called under the room lock) appends bytes to a connection's outbox and,
when the outbox was empty, hands the connection to the ``Writer``, waking it at most once
however many frames arrive. The writer takes whole outboxes and writes each with one
non-blocking ``send``, so many frames leave in one system call. A socket whose kernel buffer is
full waits in the writer's selector while everyone else is served; past its output limit the
connection is cut off (``Connection.cut``) and shut down. Leaving the room is not done there,
under the lock in the middle of someone else's delivery: the cut connection's own reader sees
the mark before its next request, acts on nothing more, and leaves (``Room.cut_off``).

Invariant: only the writer thread sends on or closes a socket, so bytes leave in the order they
were pushed, and a file descriptor (a member's id) is never reused while anything may still
write to it.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
from collections.abc import Callable, Iterable

from chatsuite.server.members import Member
from chatsuite.tls import TlsSession

RECV_SIZE = 256 * 1024


class Connection:
    """One accepted socket: its outbox (filled under the room lock) and the writer's state."""

    __slots__ = (
        "address", "blocked", "closing", "cut", "fd", "limit", "member", "out", "out_bytes",
        "overflowed", "pushed", "queued", "rest", "sent", "sock", "tls", "writer",
    )

    def __init__(self, sock: socket.socket, address: str, writer: Writer, limit: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.writer = writer
        self.limit = limit
        # Guarded by the room lock:
        self.out: list[bytes] = []  # pushed, not yet taken by the writer
        self.out_bytes = 0  # bytes in ``out``
        self.pushed = 0  # bytes pushed in all
        self.queued = False  # handed to the writer and not yet taken
        self.blocked = False  # the kernel refused part of a send: waiting for the peer to read
        self.overflowed = False
        self.closing = False
        # Set under the lock when the server ends the connection (``Writer.abort``): from then
        # on its reader acts on nothing more it read (a bool, so it reads it without the lock).
        self.cut = False
        # Writer thread only:
        self.sent = 0  # bytes written in all
        self.rest: memoryview | None = None  # the part of a send the kernel refused
        self.member: Member | None = None
        self.tls: TlsSession | None = None

    def push(self, data: bytes) -> None:
        """Queue bytes for the writer; called with the room lock held."""
        if self.overflowed or self.closing:
            return
        size = len(data)
        self.out.append(data)
        self.out_bytes += size
        self.pushed += size
        if self.blocked:
            if self.pushed - self.sent > self.limit:
                # This peer does not read: drop it, so nobody waits and memory stays bounded.
                self.overflowed = True
                self.out.clear()
                self.out_bytes = 0
                self.writer.abort(self)
                return
        else:
            self.writer.owe(size)
        if not self.queued:
            self.queued = True
            self.writer.ready(self)


BACKLOG_HIGH = 64 * 1024 * 1024
BACKLOG_LOW = 16 * 1024 * 1024


class Writer:
    """Writes every connection's outbox with non-blocking sends, in one thread.

    Two kinds of lag are told apart. A peer that does not read blocks its own socket: its
    output waits in its outbox, and past the connection's limit it is dropped. A writer that
    cannot keep up with everybody (the server is saturated) is the server's own lag: then the
    bytes waiting for unblocked sockets (the backlog) pass ``BACKLOG_HIGH`` and reader threads
    wait in ``wait_for_room`` before reading more, so TCP slows the senders down instead.
    """

    def __init__(self, lock: threading.Lock, log: Callable[[str], None]) -> None:
        self.lock = lock  # the room lock: guards outboxes and the lists below
        self.log = log
        self._ready: list[Connection] = []
        self._closing: list[Connection] = []
        self._aborted: list[Connection] = []
        self._awake = False
        self.backlog = 0  # bytes in the outboxes of connections that are not blocked
        self._room = threading.Event()  # set while the backlog is small enough to add to
        self._room.set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._waiting: set[Connection] = set()  # blocked sockets, registered for EVENT_WRITE
        self._running = True
        self.thread = threading.Thread(target=self._run, name="writer", daemon=True)

    # -- called with the room lock held -------------------------------------------------------

    def _wake(self) -> None:
        if not self._awake:
            self._awake = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # already full of wake-ups: the writer is bound to look

    def ready(self, conn: Connection) -> None:
        self._ready.append(conn)
        self._wake()

    def owe(self, size: int) -> None:
        self.backlog += size
        if self.backlog > BACKLOG_HIGH and self._room.is_set():
            self._room.clear()

    def push_all(self, conns: Iterable[Connection], data: bytes, skip: object = None) -> int:
        """``push(data)`` to every connection but ``skip``; returns how many got it.

        The broadcast hot path (a joined notice reaches thousands): ``push`` inlined for the
        common case, and the writer woken once.
        """
        size = len(data)
        count = owed = 0
        ready = self._ready
        for conn in conns:
            if conn is skip:
                continue
            count += 1
            if conn.blocked or conn.closing or conn.overflowed:
                conn.push(data)  # the rare cases keep their rules in one place
                continue
            conn.out.append(data)
            conn.out_bytes += size
            conn.pushed += size
            owed += size
            if not conn.queued:
                conn.queued = True
                ready.append(conn)
        if owed:
            self.owe(owed)
        if ready:
            self._wake()
        return count

    def abort(self, conn: Connection) -> None:
        """Disconnect a connection now: marked cut, so its reader acts on nothing more it read
        and leaves the room at its next step (SPEC 1.5); the writer shuts the socket down."""
        conn.cut = True
        self._aborted.append(conn)
        self._wake()

    # -- called by other threads, lock free ---------------------------------------------------

    def wait_for_room(self) -> None:
        """Block while the writer is far behind (see the class docstring); returns once stopped."""
        while not self._room.wait(0.1):
            if not self._running:
                return

    def kick(self, conn: Connection) -> None:
        """Have the writer look at ``conn`` though nothing was pushed (TLS handshake records)."""
        with self.lock:
            if not conn.queued and not conn.closing:
                conn.queued = True
                self.ready(conn)

    def close(self, conn: Connection) -> None:
        """Write what is queued for ``conn``, then close it (called by its reader)."""
        self.close_all([conn])

    def close_all(self, conns: list[Connection]) -> None:
        """``close`` for many connections at once (server shutdown): one lock, one wake-up."""
        with self.lock:
            for conn in conns:
                conn.closing = True
            self._closing.extend(conns)
            self._wake()

    def stop(self) -> None:
        with self.lock:
            self._running = False
            self._room.set()
            self._wake()

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception as error:  # broad on purpose: the writer must outlive any one bug
                self.log(f"writer: unexpected error, carrying on: {error!r}")

    def _step(self) -> bool:
        """One round: wait, then write everything that is ready. False once stopped."""
        writable = self._select()
        with self.lock:
            self._awake = False
            closing, self._closing = self._closing, []
            aborted, self._aborted = self._aborted, []
            running = self._running
            batches = self._take_outboxes()
        for conn in writable:
            self._drain(conn)
        for conn, chunks in batches:
            self._send(conn, self._bytes_of(conn, chunks))
        for conn in aborted:
            self._shutdown(conn)
        for conn in closing:
            self._finish(conn)
        return running

    def _select(self) -> list[Connection]:
        """Wait for a socket to drain or a wake-up; the connections whose sockets drained."""
        writable = []
        for key, _ in self._selector.select():
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            else:
                writable.append(key.data)
        return writable

    def _take_outboxes(self) -> list[tuple[Connection, list[bytes]]]:
        """Under ``lock``: take the outboxes of the ready, unblocked connections."""
        ready, self._ready = self._ready, []
        batches = []
        taken = 0
        for conn in ready:
            if conn.blocked:
                continue  # stays queued: its outbox is taken when the socket drains
            conn.queued = False
            if conn.out or conn.tls is not None:
                batches.append((conn, conn.out))
                taken += conn.out_bytes
                conn.out = []
                conn.out_bytes = 0
        self.backlog -= taken
        if self.backlog < BACKLOG_LOW and not self._room.is_set():
            self._room.set()
        return batches

    def _bytes_of(self, conn: Connection, chunks: list[bytes]) -> bytes:
        """What goes on the wire for these outbox chunks: joined, and encrypted under TLS."""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if conn.tls is None:
            return data
        try:
            return conn.tls.encrypt(data)
        except ssl.SSLError:
            self._shutdown(conn)
            return b""

    def _drain(self, conn: Connection) -> None:
        """A blocked socket became writable: send the refused part, then what queued meanwhile."""
        if conn.rest is not None and not self._send(conn, conn.rest):
            return
        self._selector.unregister(conn.sock)
        self._waiting.discard(conn)
        with self.lock:
            conn.blocked = False
            conn.queued = False
            chunks, conn.out = conn.out, []
            conn.out_bytes = 0  # never counted in the backlog while blocked
        if chunks or conn.tls is not None:  # TLS records may wait in the session too
            self._send(conn, self._bytes_of(conn, chunks))

    def _send(self, conn: Connection, data: bytes | memoryview) -> bool:
        """One non-blocking send; keep what the kernel refuses and wait for room. True: all sent."""
        if conn.sock.fileno() < 0:
            return False
        if not data:
            conn.rest = None
            return True
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._shutdown(conn)  # the reader sees the end and reports the connection lost
            return False
        conn.sent += sent
        if sent == len(data):
            conn.rest = None
            return True
        conn.rest = memoryview(data)[sent:]
        if conn not in self._waiting:
            self._waiting.add(conn)
            self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            with self.lock:
                conn.blocked = True
                conn.queued = True  # later pushes wait in the outbox until the socket drains
                self.backlog -= conn.out_bytes
        return False

    def _shutdown(self, conn: Connection) -> None:
        conn.cut = True  # a send that failed ends it too: its reader acts on nothing more
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _finish(self, conn: Connection) -> None:
        """Last write (best effort, never blocking), then close the socket."""
        with self.lock:
            chunks, conn.out = conn.out, []
            if not conn.blocked:
                self.backlog -= conn.out_bytes
            conn.out_bytes = 0
        if conn.sock.fileno() < 0:
            return
        if not conn.overflowed:
            data = self._bytes_of(conn, chunks) if chunks else b""
            if conn.rest is not None:
                data = bytes(conn.rest) + data
            if data:
                self._send(conn, data)
        if conn in self._waiting:
            self._waiting.discard(conn)
            self._selector.unregister(conn.sock)
        try:
            # Read what the peer sent and we will never read: closing with unread data would
            # send a reset, which can destroy our last reply before the peer reads it.
            while conn.sock.recv(RECV_SIZE):
                pass
        except OSError:
            pass
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()
