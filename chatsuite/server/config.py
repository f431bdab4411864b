"""The server's options: ``ServerConfig`` (every option of SPEC 1.5 and 3) and ``parse_args``,
which turns the ``chat-server`` command line into one.

Owns the option names, their defaults and their help; nothing here starts a thread or opens a
socket. ``chat_server`` re-exports both (``chat_server.ServerConfig``, ``chat_server.parse_args``).
Invariant: each command-line default equals the ``ServerConfig`` default of the same option, and
this module never imports ``chat_server`` (chatsuite never does).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chatsuite.options import seconds, whole
from chatsuite.server.access import is_loopback
from chatsuite.server.passwords import load_server_password
from chatsuite.server.pending import INTERVAL as PENDING_INTERVAL
from modes import PENDING_BYTES, PENDING_LIMIT
from protocol import MAX_FRAME

OUTPUT_LIMIT = 8 * 1024 * 1024
DESCRIPTION = ("The chat server: a thread-per-connection TCP server for one room, three dialects "
               "on one port.")
"""``chat-server --help``'s description: the first line of chat_server.py's docstring."""


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
    pending_interval: float = PENDING_INTERVAL  # at most one ``pending`` per client this often
    heartbeat: float = 30.0
    hello_timeout: float = 60.0
    max_clients: int = 1024
    rate: float = 100.0
    quiet: bool = False
    max_per_ip: int = 0  # 0: unlimited
    max_unregistered_per_ip: int = 8  # connections from one address waiting to register; 0: any
    max_unregistered: int | None = None  # the door's table; None: unregistered_table(max_clients)
    tls_cert: str | None = None
    tls_key: str | None = None
    redis_url: str | None = None  # join the cluster of servers sharing this Redis (cluster.py)
    cluster_ttl: float = 3.0  # seconds without a heartbeat before a node counts as dead
    cluster_retry: float = 0.5  # seconds between attempts to reach Redis again after an outage
    cluster_secret: str | None = None  # the nodes' shared secret (else the file, else the env)
    cluster_secret_file: str | None = None  # a file holding it (--cluster-secret-file)
    redis_insecure: bool = False  # allow a Redis on another host with no password in the URL
    # The durable room (SPEC 6): the store's file ("none": memory only), retention, and how
    # long a dropped native client's session waits for it to resume (0: no resume).
    store: str = "chat-suite.db"
    history_days: float = 30.0
    history_limit: int = 100_000
    resume_window: float = 120.0
    # Who may enter (SPEC 7): the server password (read by main from --password-file or
    # CHAT_PASSWORD), line and plain clients despite it, account passwords over plain TCP from
    # afar, the admins; ``is_local`` decides "loopback" for the plaintext rule (tests inject).
    server_password: str | None = field(default=None, repr=False)
    open_dialects: bool = False
    allow_plaintext_passwords: bool = False
    admins: tuple[str, ...] = ()
    is_local: Callable[[str], bool] = field(default=is_loopback, repr=False)
    log: Callable[[str], None] | None = field(default=None, repr=False)


_SECONDS = seconds(zero_allowed=False)
_SECONDS_OR_OFF = seconds(zero_allowed=True)  # for the options where 0 turns a thing off


def parse_args(argv: Sequence[str] | None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="chat-server", description=DESCRIPTION)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    parser.add_argument("--port", type=whole(0, 65535), default=4040,
                        help="TCP port (default 4040)")
    parser.add_argument("--max-frame", type=whole(1024), default=MAX_FRAME,
                        help="largest frame or line in bytes (default 65536)")
    parser.add_argument("--pending-limit", type=whole(1), default=PENDING_LIMIT,
                        help="most events held for a typing client (default 10000)")
    parser.add_argument("--output-limit", type=whole(1), default=OUTPUT_LIMIT,
                        help="unsent bytes past which a slow client is dropped (default 8 MiB)")
    parser.add_argument("--heartbeat", type=_SECONDS_OR_OFF, default=30.0,
                        help="seconds of silence before a ping; as long again to answer "
                             "(default 30)")
    parser.add_argument("--hello-timeout", type=_SECONDS, default=60.0,
                        help="seconds a new connection has to register (default 60)")
    parser.add_argument("--max-clients", type=whole(1), default=1024,
                        help="most registered clients (default 1024)")
    parser.add_argument("--rate", type=_SECONDS_OR_OFF, default=100.0,
                        help="frames per second per client, burst twice that; 0 = off "
                             "(default 100)")
    parser.add_argument("--quiet", action="store_true", help="do not log message texts")
    parser.add_argument("--max-per-ip", type=whole(0), default=0,
                        help="most connections from one address; 0 = unlimited (default)")
    parser.add_argument("--max-unregistered-per-ip", type=whole(0), default=8, metavar="N",
                        help="most connections from one address waiting to register; "
                             "0 = unlimited (default 8)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    parser.add_argument("--redis", metavar="URL",
                        help="join the cluster of servers sharing this Redis, e.g. "
                             "redis://127.0.0.1:6379/0 (needs the 'cluster' extra)")
    parser.add_argument("--cluster-ttl", type=_SECONDS, default=3.0, metavar="S",
                        help="with --redis: seconds before a silent node counts as dead "
                             "(default 3)")
    parser.add_argument("--cluster-secret-file", metavar="FILE",
                        help="with --redis: the nodes' shared secret (else "
                             "$CHAT_CLUSTER_SECRET); required")
    parser.add_argument("--store", default="chat-suite.db", metavar="PATH",
                        help="SQLite file for history, sessions, accounts and bans, or 'none' for "
                             "memory only until the server stops "
                             "(default chat-suite.db in the working directory)")
    parser.add_argument("--history-days", type=_SECONDS, default=30.0, metavar="D",
                        help="days of history kept (default 30)")
    parser.add_argument("--history-limit", type=whole(1), default=100_000, metavar="N",
                        help="most events kept in the history (default 100000)")
    parser.add_argument("--resume-window", type=_SECONDS_OR_OFF, default=120.0, metavar="S",
                        help="seconds a dropped client's session waits for it; 0 = off "
                             "(default 120)")
    parser.add_argument("--redis-insecure", action="store_true",
                        help="allow a Redis on another host without a password in the URL")
    parser.add_argument("--password-file", metavar="FILE",
                        help="the server password is this file's first line (else "
                             "$CHAT_PASSWORD); every client must give it")
    parser.add_argument("--open-dialects", action="store_true",
                        help="with a server password: let line and plain clients in anyway "
                             "(they cannot give it)")
    parser.add_argument("--allow-plaintext-passwords", action="store_true",
                        help="accept account passwords over plain TCP from other hosts")
    parser.add_argument("--admin", action="append", default=[], metavar="NAME",
                        help="this account may moderate once logged in (repeatable)")
    args = parser.parse_args(argv)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    try:
        server_password = load_server_password(args.password_file)
    except (OSError, ValueError) as error:
        parser.error(f"--password-file: {error}")
    return ServerConfig(
        host=args.host, port=args.port, max_frame=args.max_frame, pending_limit=args.pending_limit,
        output_limit=args.output_limit, heartbeat=args.heartbeat,
        hello_timeout=args.hello_timeout, max_clients=args.max_clients, rate=args.rate,
        quiet=args.quiet, max_per_ip=args.max_per_ip,
        max_unregistered_per_ip=args.max_unregistered_per_ip, tls_cert=args.tls_cert,
        tls_key=args.tls_key, redis_url=args.redis, cluster_ttl=args.cluster_ttl,
        cluster_secret_file=args.cluster_secret_file, redis_insecure=args.redis_insecure,
        store=args.store, history_days=args.history_days, history_limit=args.history_limit,
        resume_window=args.resume_window, server_password=server_password,
        open_dialects=args.open_dialects,
        allow_plaintext_passwords=args.allow_plaintext_passwords, admins=tuple(args.admin),
    )
