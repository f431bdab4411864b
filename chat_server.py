"""The chat server: a thread-per-connection TCP server for one room, three dialects on one port.

Theory of operation
-------------------
* The acceptor thread accepts connections and starts one reader thread for each. Before any
  thread or buffer is spent, the door (SPEC 1.5) refuses what is over ``--max-per-ip`` or
  ``--max-unregistered-per-ip`` (closed at once), and when the table of connections waiting to
  register is full it has the writer close the oldest of them. A failure to accept or to start
  a thread costs that one connection: it is logged, and the acceptor pauses briefly and goes on.
* A connection's reader thread (handler.py; the line and plain readers in dialect_handlers.py)
  is the only reader of its socket. It learns the dialect from the first bytes (SPEC 2), decodes
  requests with ``protocol``, and asks the ``Room`` what to do.
* The ``Room`` (room.py) decides who gets what under its one lock, and puts the bytes in each
  recipient's outbox (``Connection.push``) under that lock. Nothing else happens under it.
* One writer thread (outbox.py) is the only writer of every socket. ``push`` appends to the
  connection's outbox and, when the outbox was empty, hands the connection to the writer,
  waking it at most once however many frames arrive. The writer takes whole outboxes and
  writes each with one non-blocking ``send``, so many frames go out in one system call; when a
  socket's buffer is full it waits for it to drain in its selector while it serves everyone
  else. A slow reader
  therefore never delays anyone, and once its unsent output passes ``--output-limit`` it is
  disconnected. Only the writer closes sockets, so a socket's file descriptor (a member's id)
  is never reused while anything may still write to it.
* With ``--redis`` the room also has a backplane (cluster.py) that joins this server to others
  sharing the Redis; the room calls it only outside its lock. Without it, redis is never imported.
* Rate limiting delays the reader thread of a flooding connection; it stops reading, so TCP
  pushes back on that sender alone. Heartbeat and hello deadlines are the reader's wait timeouts.
* The durable room (SPEC 6): the room numbers every room event and hands it to the store
  (``--store``, store.py), whose own thread commits it to SQLite within 50 ms; nothing on the
  message path waits for the disk. A native client that drops keeps its member in the room for
  ``--resume-window`` seconds (the ``resume-windows`` thread ends the windows) and can resume
  it with its session token; backlog and resume read the log on the asking connection's thread.
"""

from __future__ import annotations

import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

# The options live in config.py; re-exported here, so ``chat_server.ServerConfig`` and
# ``chat_server.parse_args`` keep working for callers and tests.
from chatsuite.server.access import name_key
from chatsuite.server.config import ServerConfig, parse_args
from chatsuite.server.gate import Gate
from chatsuite.server.handler import Handler, moderate_from_cluster
from chatsuite.server.log import Log
from chatsuite.server.members import Dialect, Member
from chatsuite.server.pending import PendingTicker
from chatsuite.server.room import Room
from chatsuite.server.store import StoreError, open_store
from chatsuite.server.writer import Connection, Writer
from chatsuite.tls import TlsSession

if TYPE_CHECKING:
    from chatsuite.server.cluster import Backplane

# Each connection's thread reserves this much address space for its stack, not the system's
# default (often 8 MiB): the deepest recursion Python allows (its limit of 1000, through C code
# such as the JSON decoder) needs under 192 KiB, so this is more than twice the worst case.
THREAD_STACK = 512 * 1024
ACCEPT_PAUSE = 0.1  # seconds the acceptor waits after a failure to accept or to start a thread
# TCP keepalive on accepted sockets (SPEC 1.5): after 60 s of silence, 6 probes 10 s apart.
KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))


def unregistered_table(max_clients: int) -> int:
    """How many connections may wait to register at once, from all addresses together.

    As many as may be registered (an unregistered connection costs what a registered one does:
    a thread and a socket), and at least 64 so that a small server's burst of arrivals fits.
    """
    return max(64, max_clients)


# ---------------------------------------------------------------------------------------------
# The server: acceptor, connections, shutdown.


def set_socket_options(sock: socket.socket) -> None:
    """No Nagle delay, and TCP keepalive where the platform has it (SPEC 1.5)."""
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
               (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    options += [(socket.IPPROTO_TCP, getattr(socket, name), value)
                for name, value in KEEPALIVE if hasattr(socket, name)]
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass  # a peer already gone, or an option this system refuses: not worth a refusal


def tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer, with this certificate chain and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class ChatServer:
    """Listens, accepts and runs a ``Handler`` thread per connection until ``stop()``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.log = Log(config.log, quiet=config.quiet)  # its own thread: never waited for
        self.backplane: Backplane | None = None
        if config.redis_url is not None:
            from chatsuite.server.cluster import (
                Backplane,  # only with --redis: the redis package is optional
            )

            self.backplane = Backplane(config.redis_url, self.log, config.cluster_ttl,
                                       config.cluster_retry, self._drop_member,
                                       secret=config.cluster_secret,
                                       secret_file=config.cluster_secret_file,
                                       insecure=config.redis_insecure)
        # StoreError (a sentence) when it cannot be opened: main() prints it and exits 1.
        self.store = open_store(config.store, history_days=config.history_days,
                                history_limit=config.history_limit, log=self.log)
        self.room = Room(config.max_clients, config.pending_limit, config.pending_bytes, self.log,
                         self.backplane, config.max_frame, self.store, config.resume_window)
        self.gate = Gate(self.store, server_password=config.server_password,
                         admins=config.admins, open_dialects=config.open_dialects,
                         allow_plaintext=config.allow_plaintext_passwords,
                         is_local=config.is_local, log=self.log)
        self.room.guard = self.gate
        if self.backplane is not None:
            # Accounts are the cluster's: the gate hands its changes to Redis and the other
            # nodes, the backplane hands it theirs (the gate knows nothing of the cluster).
            self.gate.on_account_saved = self.backplane.account_saved
            self.backplane.accounts = self.gate
            # A login with a record the cluster has since replaced ends (see _drop_account).
            self.gate.on_account_replaced = self._drop_account
            # Sanctions too: another node's kick, mute, unmute or ban is applied here.
            self.backplane.moderation = lambda event: moderate_from_cluster(self, event)
        self.writer = Writer(self.room.lock, self.log)
        self.room.abort = self.writer.abort  # type: ignore[assignment]  # outboxes are ours
        self.room.fan_out = self.writer.push_all  # the inlined broadcast loop
        self.pending = PendingTicker(self.room.lock, config.pending_interval, log=self.log)
        self.room.pending = self.pending
        self.stopping = threading.Event()
        self._connections: dict[Connection, Dialect | None] = {}  # guarded by the room lock
        # The door's tables (guarded by the room lock): connections per address, and the ones
        # not seen registered yet, oldest first, in all and per address. A connection that
        # registers stays in ``_waiting`` until the door next looks at it (it checks
        # ``member.registered``), so the room needs no hook; the exact count of those waiting
        # is ``len(_connections) - room.online - len(_evicted)``.
        self._per_ip: dict[str, int] = {}
        self._waiting: OrderedDict[Connection, str] = OrderedDict()
        self._waiting_by_ip: dict[str, dict[Connection, None]] = {}
        self._evicted: set[Connection] = set()  # closed by the door, not yet forgotten
        self._table = (config.max_unregistered if config.max_unregistered is not None
                       else unregistered_table(config.max_clients))
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._acceptor: threading.Thread | None = None
        self.address: tuple[str, int] = (config.host, config.port)
        self._tls_context = (tls_context(config.tls_cert, config.tls_key) if config.tls_cert
                             else None)

    def start(self) -> None:
        """Bind, listen and start serving in background threads."""
        listener = socket.create_server(
            (self.config.host, self.config.port), backlog=4096, reuse_port=False
        )
        self._listener = listener
        self.address = listener.getsockname()[:2]
        if self.backplane is not None:
            try:
                self.backplane.start(self.room)  # before any connection: ids need the node
            except Exception:
                listener.close()
                raise
        # Process-wide, and before the first thread: see THREAD_STACK.
        threading.stack_size(THREAD_STACK)
        self.writer.thread.start()
        self.pending.start()
        restored = self.room.restore(self.store.load_sessions())
        if self.config.resume_window > 0:
            threading.Thread(target=self._expire_loop, name="resume-windows",
                             daemon=True).start()
        self._acceptor = threading.Thread(target=self._accept_loop, name="acceptor", daemon=True)
        self._acceptor.start()
        secure = " (TLS)" if self._tls_context is not None else ""
        self.log(f"chat server listening on {self.address[0]}:{self.address[1]}{secure}")
        where = "none (memory only)" if self.config.store == "none" else self.config.store
        self.log(f"store: {where}; latest seq {self.room.seq}"
                 + (f"; {restored} sessions may resume" if restored else ""))
        for name in self.config.admins:
            if not self.gate.is_account(name):
                # Whoever registers the name first owns it, and so moderates: say so now.
                self.log(f"admin {name} has no account yet: connect as {name} and /register "
                         "it before anyone else does")

    def _expire_loop(self) -> None:
        """End the resume windows that are over (SPEC 6.4), a few times per window."""
        every = min(1.0, self.config.resume_window / 4)
        while not self.stopping.wait(every):
            try:
                self.room.expire()
            except Exception as error:  # never the end of resume for everyone
                self.log(f"ending resume windows failed: {error!r}")

    def _accept_loop(self) -> None:
        """Accept until stopped. A failure costs at most one connection, never the acceptor."""
        assert self._listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._stop_r, selectors.EVENT_READ)
        self._listener.setblocking(False)
        while not self.stopping.is_set():
            selector.select()
            while not self.stopping.is_set():
                try:
                    sock, peer = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionAbortedError:
                    continue  # the peer gave up before we took it: nothing to do
                except OSError as error:
                    # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection waits in the backlog
                    # until something is freed. Pause instead of spinning on it.
                    self.log(f"accept failed: {error}")
                    self.stopping.wait(ACCEPT_PAUSE)
                    break
                try:
                    self._open(sock, peer[0], f"{peer[0]}:{peer[1]}")
                except Exception as error:  # the acceptor must outlive any one bug
                    self.log(f"accepting {peer[0]}:{peer[1]} failed: {error!r}")
                    self.stopping.wait(ACCEPT_PAUSE)
        selector.close()

    def _door(self, ip: str) -> tuple[str | None, list[tuple[Connection, str]]]:
        """Make room for one more connection from ``ip``: why it is refused (None: it is not),
        and the connections closed to make room, each with why.

        Called with the room lock held, before anything is spent on the connection (SPEC 1.5).
        When ``ip`` has as many connections waiting to register as it may, its oldest is closed;
        when the table of unregistered connections is full, the oldest ones are: the newest
        connection, likeliest a real user's, always gets its chance.
        """
        config = self.config
        if config.max_per_ip > 0 and self._per_ip.get(ip, 0) >= config.max_per_ip:
            return f"more than {config.max_per_ip} connections from its address", []
        evicted: list[tuple[Connection, str]] = []
        limit = config.max_unregistered_per_ip
        waiting = self._waiting_by_ip.get(ip)
        if waiting is not None and 0 < limit <= len(waiting):
            for conn in [c for c in waiting if c.member is not None and c.member.registered]:
                self._unwait(conn)
            while len(waiting) >= limit:  # emptied by _unwait as it goes
                self._evict(next(iter(waiting)), evicted,
                            f"the oldest of {limit} connections from its address waiting to "
                            "register, to make room")
        unregistered = len(self._connections) - self.room.online - len(self._evicted)
        while unregistered >= self._table and self._waiting:
            oldest = next(iter(self._waiting))
            if oldest.member is not None and oldest.member.registered:
                self._unwait(oldest)
                continue  # registered since the door last looked: it was never counted
            self._evict(oldest, evicted, f"the oldest of {self._table} connections waiting to "
                                         "register, to make room")
            unregistered -= 1
        return None, evicted

    def _evict(self, oldest: Connection, evicted: list[tuple[Connection, str]],
               why: str) -> None:
        """Close an unregistered connection to make room (room lock held). Its reader sees the
        end and forgets it; only the writer closes its socket."""
        self._unwait(oldest)
        self._evicted.add(oldest)
        self.writer.abort(oldest)
        evicted.append((oldest, why))

    def _unwait(self, conn: Connection) -> None:
        """Take ``conn`` out of the door's tables of unregistered connections (room lock held)."""
        ip = self._waiting.pop(conn, None)
        if ip is None:
            return
        waiting = self._waiting_by_ip[ip]
        del waiting[conn]
        if not waiting:
            del self._waiting_by_ip[ip]

    def _open(self, sock: socket.socket, ip: str, address: str) -> None:
        with self.room.lock:
            refusal, evicted = self._door(ip)
        for oldest, why in evicted:  # logged outside the lock, like every log line
            self.log(f"closed: {oldest.address} ({why})")
        if refusal is not None:
            sock.close()  # no thread, no buffer: nothing else knows this socket
            self.log(f"refused: {address} ({refusal})")
            return
        sock.setblocking(False)
        set_socket_options(sock)
        conn = Connection(sock, address, self.writer, self.config.output_limit)
        if self._tls_context is not None:
            conn.tls = TlsSession(self._tls_context, server_side=True)
        with self.room.lock:
            self._connections[conn] = None
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            self._waiting[conn] = ip
            self._waiting_by_ip.setdefault(ip, {})[conn] = None
            online = self.room.online
        self.log(f"connected: {address} ({online} online)")
        thread = threading.Thread(target=self._serve, args=(conn,), name=f"conn-{conn.fd}",
                                  daemon=True)
        try:
            self.start_thread(thread)
        except (RuntimeError, MemoryError) as error:  # "can't start new thread"
            # No thread ever saw this connection, and the writer holds nothing for it.
            self.forget(conn)
            sock.close()
            self.log(f"closed: {address} (cannot start its thread: {error})")
            self.stopping.wait(ACCEPT_PAUSE)

    def start_thread(self, thread: threading.Thread) -> None:
        """Start a connection's thread (a seam for tests that make it fail)."""
        thread.start()

    def _serve(self, conn: Connection) -> None:
        # Added here, once running: stop() joins only threads that really started.
        thread = threading.current_thread()
        self._threads.add(thread)
        try:
            Handler(self, conn).run()
        finally:
            self._threads.discard(thread)

    def dialect_known(self, conn: Connection, dialect: Dialect) -> None:
        with self.room.lock:
            if conn in self._connections:
                self._connections[conn] = dialect

    @property
    def id_base(self) -> int:
        """Added to a socket's file descriptor to make a member id (a cluster node's offset)."""
        return self.backplane.id_base if self.backplane is not None else 0

    def disconnect(self, member: Member) -> None:
        """End ``member``'s connection (kick, ban): what was pushed to it goes out first."""
        with self.room.lock:
            for conn in self._connections:
                if conn.member is member:
                    self.writer.abort(conn)

    def _drop_member(self, member_id: int) -> None:
        """Disconnect a member (the cluster found its name taken elsewhere after an outage)."""
        with self.room.lock:
            for conn in self._connections:
                if conn.member is not None and conn.member.id == member_id:
                    # Its name is another node's now: no session to keep for a resume.
                    self.room.end_session(conn.member)
                    self.writer.abort(conn)

    def _drop_account(self, key: str) -> None:
        """Disconnect this node's members logged in to the account ``key``, whose record the
        cluster replaced by one with another password hash (an earlier registration, or a
        password change): what their login gave (the account, admin rights) must not outlive
        the record it was checked against. No session is kept: a resume would restore it."""
        with self.room.lock:
            for conn in self._connections:
                member = conn.member
                if member is None or member.account is None or name_key(member.account) != key:
                    continue
                self.log(f"account {member.account}: its record was replaced in the cluster; "
                         f"disconnecting {member.name} (id {member.id}), logged in with the old")
                self.room.end_session(member)
                self.writer.abort(conn)

    def forget(self, conn: Connection) -> None:
        with self.room.lock:
            if conn not in self._connections:
                return  # forgotten already
            del self._connections[conn]
            self._unwait(conn)
            ip = conn.address.rsplit(":", 1)[0]  # the address is "ip:port" (see _accept_loop)
            self._evicted.discard(conn)
            count = self._per_ip.get(ip, 0) - 1
            if count > 0:
                self._per_ip[ip] = count
            else:
                self._per_ip.pop(ip, None)

    def log_messages(self, sender: str, to: str, texts: list[str]) -> None:
        """Log relayed messages (seed 001): a record handed to the log thread, which formats it."""
        self.log.messages(sender, to, texts)

    def stop(self) -> None:
        """Tell everyone, close every socket and the listener, and wait (briefly) for the threads.

        The whole stop takes well under a second, even with the log's output stalled: threads
        still busy after that are daemons and end with the process.
        """
        if self.stopping.is_set():
            return
        deadline = time.monotonic() + 0.8
        self.stopping.set()
        self.room.closing = True
        try:
            self._stop_w.send(b"\0")
        except OSError:
            pass
        if self._acceptor is not None:
            self._acceptor.join(0.2)
        if self._listener is not None:
            self._listener.close()
        with self.room.lock:
            connections = list(self._connections.items())
        self.room.shutdown(
            [conn.member for conn, dialect in connections if dialect and conn.member is not None]
        )
        if self.backplane is not None and self.backplane.node:
            self.backplane.stop()  # the other nodes hear that this node's users are lost
        self.pending.stop()
        self.writer.close_all([conn for conn, _ in connections])
        self.writer.stop()
        self.writer.thread.join(max(0.0, deadline - time.monotonic()))
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stop_r.close()
        self._stop_w.close()
        self.store.close(timeout=max(0.1, deadline - time.monotonic()))
        self.log("chat server stopped")
        # A stalled output gets what is left of the second, at least a tenth; then the log
        # thread is left to the process's end (it holds no lock the exit needs).
        self.log.close(max(0.1, deadline + 0.1 - time.monotonic()))


# ---------------------------------------------------------------------------------------------


def stop_signals() -> list[signal.Signals]:
    """Ctrl-C, SIGTERM, and SIGHUP when the terminal closes (not on Windows)."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        signals.append(signal.SIGHUP)
    return signals


@contextmanager
def main_thread_only(signals: list[signal.Signals]) -> Iterator[None]:
    """Block ``signals`` while the body starts the server's threads, which keep them blocked.

    Python runs signal handlers in the main thread only, and a signal the system hands to
    another thread does not wake the main thread's wait (seen: 3 SIGTERMs in 10 ignored right
    after 2,100 connections closed). So only the main thread takes them; one that arrives
    during the start is held until the end of the body, when the handlers are installed.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: signals go to the main thread
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until Ctrl-C, SIGTERM or SIGHUP; exit code 0 on a clean stop."""
    config = parse_args(argv)
    cluster_errors: tuple[type[Exception], ...] = ()  # none without --redis
    cluster_options: tuple[type[Exception], ...] = ()
    if config.redis_url is not None:
        try:
            from chatsuite.server.cluster import ClusterConfigError, ClusterError
        except ImportError:
            print("chat-server: --redis needs the redis package: "
                  "pip install 'chat-suite[cluster]'", file=sys.stderr)
            return 1
        cluster_errors = (ClusterError,)
        cluster_options = (ClusterConfigError,)
    signals = stop_signals()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    # Every thread the server makes (the log's included, started with the server object) is
    # started inside: they all keep the stop signals blocked.
    with main_thread_only(signals):
        try:
            server = ChatServer(config)
        except cluster_options as error:  # unsafe or missing cluster options: like any bad option
            print(f"chat-server: {error}", file=sys.stderr)
            return 2
        except cluster_errors as error:
            print(f"chat-server: {error}", file=sys.stderr)
            return 1
        except StoreError as error:
            print(f"chat-server: {error}", file=sys.stderr)
            return 1
        except (OSError, ssl.SSLError) as error:
            print(f"chat-server: cannot load the TLS certificate or key: {error}", file=sys.stderr)
            return 1
        try:
            server.start()
        except cluster_errors as error:
            print(f"chat-server: {error}", file=sys.stderr)
            return 1
        except OSError as error:
            print(f"chat-server: cannot listen on {config.host}:{config.port}: {error.strerror}",
                  file=sys.stderr)
            return 1
        for signum in signals:
            signal.signal(signum, on_signal)
    while not stop.wait(3600):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
