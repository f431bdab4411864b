"""The chat server: a thread-per-connection TCP server for one room, three dialects on one port.

Theory of operation
-------------------
* The acceptor thread accepts connections and starts one reader thread for each.
* A connection's reader thread (handler.py) is the only reader of its socket. It learns the
  dialect from the first bytes (SPEC 2), decodes requests with ``protocol``, and asks the
  ``Room`` what to do.
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
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chatsuite.server.handler import Handler
from chatsuite.server.log import Log
from chatsuite.server.members import Dialect
from chatsuite.server.room import Room
from chatsuite.server.writer import Connection, Writer
from chatsuite.tls import TlsSession
from modes import PENDING_BYTES, PENDING_LIMIT
from protocol import MAX_FRAME

if TYPE_CHECKING:
    from chatsuite.server.cluster import Backplane

OUTPUT_LIMIT = 8 * 1024 * 1024


@dataclass
class ServerConfig:
    """Every option of SPEC 1.5 and 3; ``log`` receives each log line from the log thread (None
    prints them, stamped, on standard output)."""

    host: str = "0.0.0.0"
    port: int = 4040
    max_frame: int = MAX_FRAME
    pending_limit: int = PENDING_LIMIT
    pending_bytes: int = PENDING_BYTES
    output_limit: int = OUTPUT_LIMIT
    heartbeat: float = 30.0
    hello_timeout: float = 60.0
    max_clients: int = 1024
    rate: float = 100.0
    quiet: bool = False
    max_per_ip: int = 0  # 0: unlimited
    tls_cert: str | None = None
    tls_key: str | None = None
    redis_url: str | None = None  # join the cluster of servers sharing this Redis (cluster.py)
    cluster_ttl: float = 3.0  # seconds without a heartbeat before a node counts as dead
    cluster_retry: float = 0.5  # seconds between attempts to reach Redis again after an outage
    cluster_secret: str | None = None  # the nodes' shared secret (else the file, else the env)
    cluster_secret_file: str | None = None  # a file holding it (--cluster-secret-file)
    redis_insecure: bool = False  # allow a Redis on another host with no password in the URL
    log: Callable[[str], None] | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# The server: acceptor, connections, shutdown.


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
        self.room = Room(config.max_clients, config.pending_limit, config.pending_bytes, self.log,
                         self.backplane, config.max_frame)
        self.writer = Writer(self.room.lock, self.log)
        self.room.fan_out = self.writer.push_all  # the inlined broadcast loop
        self.stopping = threading.Event()
        self._connections: dict[Connection, Dialect | None] = {}  # guarded by the room lock
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._acceptor: threading.Thread | None = None
        self.address: tuple[str, int] = (config.host, config.port)
        self._tls_context = tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None

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
        self.writer.thread.start()
        self._acceptor = threading.Thread(target=self._accept_loop, name="acceptor", daemon=True)
        self._acceptor.start()
        secure = " (TLS)" if self._tls_context is not None else ""
        self.log(f"chat server listening on {self.address[0]}:{self.address[1]}{secure}")

    def _accept_loop(self) -> None:
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
                except OSError as error:
                    self.log(f"accept failed: {error}")
                    break
                self._open(sock, f"{peer[0]}:{peer[1]}")
        selector.close()

    def _open(self, sock: socket.socket, address: str) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        conn = Connection(sock, address, self.writer, self.config.output_limit)
        if self._tls_context is not None:
            conn.tls = TlsSession(self._tls_context, server_side=True)
        ip = address.rsplit(":", 1)[0]
        with self.room.lock:
            if self.config.max_per_ip > 0:
                conn.refused = sum(
                    1 for other in self._connections if other.address.rsplit(":", 1)[0] == ip
                ) >= self.config.max_per_ip
            # Connections not yet registered are bounded too, so a crowd of idle sockets cannot
            # exhaust threads: registered ones are limited by --max-clients at registration.
            if len(self._connections) >= 2 * self.config.max_clients + 16:
                refused = True
            else:
                refused = False
                self._connections[conn] = None
            online = self.room.online
        if refused:
            sock.close()
            self.log(f"refused: {address} (too many connections)")
            return
        self.log(f"connected: {address} ({online} online)")
        thread = threading.Thread(target=self._serve, args=(conn,), name=f"conn-{conn.fd}",
                                  daemon=True)
        self._threads.add(thread)
        thread.start()

    def _serve(self, conn: Connection) -> None:
        try:
            Handler(self, conn).run()
        finally:
            self._threads.discard(threading.current_thread())

    def dialect_known(self, conn: Connection, dialect: Dialect) -> None:
        with self.room.lock:
            if conn in self._connections:
                self._connections[conn] = dialect

    @property
    def id_base(self) -> int:
        """Added to a socket's file descriptor to make a member id (a cluster node's offset)."""
        return self.backplane.id_base if self.backplane is not None else 0

    def _drop_member(self, member_id: int) -> None:
        """Disconnect a member (the cluster found its name taken elsewhere after an outage)."""
        with self.room.lock:
            for conn in self._connections:
                if conn.member is not None and conn.member.id == member_id:
                    self.writer.abort(conn)

    def forget(self, conn: Connection) -> None:
        with self.room.lock:
            self._connections.pop(conn, None)

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
        self.writer.close_all([conn for conn, _ in connections])
        self.writer.stop()
        self.writer.thread.join(max(0.0, deadline - time.monotonic()))
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stop_r.close()
        self._stop_w.close()
        self.log("chat server stopped")
        # A stalled output gets what is left of the second, at least a tenth; then the log
        # thread is left to the process's end (it holds no lock the exit needs).
        self.log.close(max(0.1, deadline + 0.1 - time.monotonic()))


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="chat-server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    parser.add_argument("--port", type=int, default=4040, help="TCP port (default 4040)")
    parser.add_argument("--max-frame", type=int, default=MAX_FRAME,
                        help="largest frame or line in bytes (default 65536)")
    parser.add_argument("--pending-limit", type=int, default=PENDING_LIMIT,
                        help="most events held for a typing client (default 10000)")
    parser.add_argument("--output-limit", type=int, default=OUTPUT_LIMIT,
                        help="unsent bytes past which a slow client is dropped (default 8 MiB)")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="seconds of silence before a ping; as long again to answer (default 30)")
    parser.add_argument("--hello-timeout", type=float, default=60.0,
                        help="seconds a new connection has to register (default 60)")
    parser.add_argument("--max-clients", type=int, default=1024,
                        help="most registered clients (default 1024)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="frames per second per client, burst twice that; 0 = off (default 100)")
    parser.add_argument("--quiet", action="store_true", help="do not log message texts")
    parser.add_argument("--max-per-ip", type=int, default=0,
                        help="most connections from one address; 0 = unlimited (default)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    parser.add_argument("--redis", metavar="URL",
                        help="join the cluster of servers sharing this Redis, e.g. "
                             "redis://127.0.0.1:6379/0 (needs the 'cluster' extra)")
    parser.add_argument("--cluster-ttl", type=float, default=3.0, metavar="S",
                        help="with --redis: seconds before a silent node counts as dead (default 3)")
    parser.add_argument("--cluster-secret-file", metavar="FILE",
                        help="with --redis: the nodes' shared secret (else $CHAT_CLUSTER_SECRET); "
                             "required")
    parser.add_argument("--redis-insecure", action="store_true",
                        help="allow a Redis on another host without a password in the URL")
    args = parser.parse_args(argv)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    return ServerConfig(
        host=args.host, port=args.port, max_frame=args.max_frame, pending_limit=args.pending_limit,
        output_limit=args.output_limit, heartbeat=args.heartbeat,
        hello_timeout=args.hello_timeout, max_clients=args.max_clients, rate=args.rate,
        quiet=args.quiet, max_per_ip=args.max_per_ip, tls_cert=args.tls_cert,
        tls_key=args.tls_key, redis_url=args.redis, cluster_ttl=args.cluster_ttl,
        cluster_secret_file=args.cluster_secret_file, redis_insecure=args.redis_insecure,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until Ctrl-C or SIGTERM; exit code 0 on a clean stop."""
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
    try:
        server = ChatServer(config)
    except cluster_options as error:  # unsafe or missing cluster options: like any bad option
        print(f"chat-server: {error}", file=sys.stderr)
        return 2
    except cluster_errors as error:
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
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(3600):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
