"""The terminal chat client (SPEC 4): connect, register, then type (mode 1) or view (mode 2).

This module is the entry point (``main``, the ``chat-client`` command): options, the server's
address, the connection, and the session. The rest lives in modules named by their job:

* ``client_display``: sanitising, formatting, colours, history files (pure);
* ``client_terminal``: the screen and keyboard, and the ``Viewer`` that holds lines while typing;
* ``client_transport``: plain TCP or verified TLS, failures as sentences;
* ``client_session``: what both protocols share (the link's receiver thread, the two modes);
* ``client_native`` and ``client_line``: the native protocol, and seed 002's line protocol.

Theory of operation. One connection, two threads:

* the receiver thread is the only reader of the connection; it routes replies to the request
  waiting for them and everything else to the ``Viewer``;
* the main thread is the only reader of the keyboard; it sends requests and waits for replies.

When the connection ends under us, or the server announces ``shutdown``, the receiver records
why and wakes the main thread with SIGINT, which interrupts whatever it is blocked in (a prompt,
a key read, a wait for a reply); the main thread then sees the recorded failure and reconnects
(``NativeSession.come_back``), or, with ``--no-reconnect``, prints it and exits 1. A wake-up for a
failure the main thread has already noticed (``Link.noticed``) is swallowed, so it is never taken
for a Ctrl-C. A watchdog ends the process if the main thread cannot be woken (Windows console
input), so the client never hangs.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from chatsuite.client.display import Palette, use_colour
from chatsuite.client.history import History
from chatsuite.client.line import LineSession
from chatsuite.client.native import NativeSession
from chatsuite.client.reconnect import (
    BACKLOG_ON_START,
    RECONNECT_FOR,
    Comeback,
    delay_scale,
    reply_timeout,
)
from chatsuite.client.session import LOST, REPLY_TIMEOUT, Link, Session
from chatsuite.client.terminal import Cancelled, Terminal
from chatsuite.client.transport import (
    INSECURE_WARNING,
    ConnectError,
    client_context,
    open_transport,
)
from chatsuite.options import seconds, whole
from modes import BACKLOG_MAX

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4040  # seed 004's prompt defaults and seed 001's port
DEFAULT_HISTORY_DIR = "~/.chat-suite/history"
CONNECT_TIMEOUT = 10.0
WATCHDOG_DELAY = 3.0  # how long the main thread has to notice a lost connection


def parse_port(text: str) -> int | None:
    """A port typed at the prompt: Enter means 4040; None when it is not a port number."""
    text = text.strip()
    if not text:
        return DEFAULT_PORT
    if text.isascii() and text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chat-client", description="Terminal client of the chat suite.")
    parser.add_argument("name", nargs="?", help="your user name (asked when absent)")
    parser.add_argument("title", nargs="?", help="your job title")
    parser.add_argument("company", nargs="?", help="your company")
    parser.add_argument("--host",
                        help=f"server address (asked when absent; default {DEFAULT_HOST})")
    parser.add_argument("--port", type=_port_argument,
                        help=f"server port (asked when absent; default {DEFAULT_PORT})")
    parser.add_argument("--no-color", action="store_true", help="no colours")
    parser.add_argument("--no-bell", action="store_true",
                        help="no bell when a message names you (mode 2)")
    parser.add_argument("--history-dir", default=DEFAULT_HISTORY_DIR,
                        help=f"folder of the direct-message logs (default {DEFAULT_HISTORY_DIR})")
    parser.add_argument("--protocol", choices=("native", "line"), default="native",
                        help="native (default), or line: seed 002's protocol, for any such server")
    parser.add_argument("--reconnect-for", type=seconds(zero_allowed=True), default=RECONNECT_FOR,
                        metavar="SECONDS",
                        help="when the connection drops, try to come back for this long "
                             f"(default {RECONNECT_FOR:g})")
    parser.add_argument("--no-reconnect", action="store_true",
                        help="when the connection drops, end (exit code 1): for scripts")
    parser.add_argument("--backlog", type=whole(0, BACKLOG_MAX), default=BACKLOG_ON_START,
                        metavar="N",
                        help="earlier room messages shown after registering "
                             f"(default {BACKLOG_ON_START}; 0: none)")
    parser.add_argument("--tls", action="store_true",
                        help="connect with TLS, checking the server's certificate and host "
                             "name")
    parser.add_argument("--cafile", metavar="FILE",
                        help="trust the authority in FILE (PEM) instead of the system's "
                             "(implies --tls)")
    parser.add_argument("--insecure", action="store_true",
                        help="TLS without checking the server's identity: DANGEROUS "
                             "(implies --tls)")
    args = parser.parse_args(argv)
    if args.insecure and args.cafile:
        parser.error("--insecure and --cafile contradict each other: choose one")
    args.tls = args.tls or args.insecure or args.cafile is not None
    return args


def _port_argument(text: str) -> int:
    port = parse_port(text) if text.strip() else None
    if port is None:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


def _ask_again(terminal: Terminal, prompt: str) -> str:
    """A line typed at ``prompt``; Ctrl-C on typed text asks again (on nothing: it leaves)."""
    while True:
        try:
            return terminal.ask(prompt)
        except Cancelled:
            pass


def ask_address(args: argparse.Namespace, terminal: Terminal) -> tuple[str, int]:
    """The server's address: options first, then prompts on a terminal, then the defaults."""
    host, port = args.host, args.port
    if host is None:
        host = DEFAULT_HOST
        if terminal.interactive:
            typed = _ask_again(terminal, f"server address [{DEFAULT_HOST}]: ")
            host = typed.strip() or DEFAULT_HOST
    while port is None:
        if not terminal.interactive:
            port = DEFAULT_PORT
            break
        port = parse_port(_ask_again(terminal, f"server port [{DEFAULT_PORT}]: "))
        if port is None:
            terminal.show("a port is a number from 1 to 65535")
    return host, port


def _waker(terminal: Terminal, session_ref: list[Session]) -> Callable[[], None]:
    """How the receiver wakes the main thread: SIGINT to it, and a watchdog if that fails."""
    main_ident = threading.get_ident()

    def force_exit(link: Link) -> None:
        session = session_ref[0]
        if session.exiting or link.noticed:
            return  # ending anyway, or the main thread deals with it (reconnecting)
        terminal.restore()
        terminal.show(session.failure or LOST)
        os._exit(1)

    def wake() -> None:
        session = session_ref[0] if session_ref else None
        if session is None or session.exiting:
            return
        session.wakes.append(1)
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(main_ident, signal.SIGINT)
        else:
            import _thread

            _thread.interrupt_main()
        watchdog = threading.Timer(WATCHDOG_DELAY, force_exit, (session.link,))
        watchdog.daemon = True
        watchdog.start()

    return wake


def main(argv: list[str] | None = None) -> int:
    """Run the client; 0 when the user chose to leave, 1 when the connection failed."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a non-UTF-8 terminal gets "?", not a traceback
    colour = use_colour(args.no_color, os.environ, sys.stdout)
    if colour:
        import colorama

        colorama.just_fix_windows_console()
    terminal = Terminal()
    terminal.start_editing()  # readline where the platform has it: Tab, history, clean pastes
    try:
        return _run(args, terminal, colour)
    finally:
        terminal.restore()  # the terminal's echo, turned off while editing, comes back


def _sigint_handler(terminal: Terminal,
                    session_ref: list[Session]) -> Callable[[int, Any], None]:
    """What SIGINT does: a Ctrl-C, or the receiver's wake-up (see ``_waker``)."""

    def on_sigint(signum: int, frame: Any) -> None:
        session = session_ref[0] if session_ref else None
        if session is not None and session.exiting:
            return  # already ending: a late wake-up must not interrupt the goodbye
        if session is not None and session.wakes:
            try:
                session.wakes.pop()
            except IndexError:
                pass
            if session.link.noticed:
                return  # the receiver's wake-up, for a failure the main thread already has
        terminal.interrupt()  # KeyboardInterrupt; what the line held decides: cancel or leave

    return on_sigint


def _run(args: argparse.Namespace, terminal: Terminal, colour: bool) -> int:
    palette = Palette(colour)
    session_ref: list[Session] = []
    signal.signal(signal.SIGINT, _sigint_handler(terminal, session_ref))
    try:
        host, port = ask_address(args, terminal)
    except (EOFError, KeyboardInterrupt):
        terminal.show("bye")
        return 0
    context: ssl.SSLContext | None = None
    connect = partial(open_transport, host, port, None, CONNECT_TIMEOUT)
    try:
        if args.tls:
            context = client_context(args.cafile, args.insecure)
            if args.insecure:
                terminal.show(palette.bad(INSECURE_WARNING))
            connect = partial(open_transport, host, port, context, CONNECT_TIMEOUT)
        transport = connect()
    except ConnectError as error:
        terminal.show(palette.bad(str(error)))
        return 1
    except KeyboardInterrupt:
        terminal.show("bye")
        return 0
    secure = " over TLS" if args.tls else ""
    terminal.show("you are now connected to the server" + secure)
    history = History(Path(args.history_dir).expanduser(), host, port)
    wake = _waker(terminal, session_ref)
    session: Session
    if args.protocol == "line":
        if args.title or args.company:
            terminal.show("the line protocol has no job title or company: they are not sent")
        session = LineSession(transport, terminal, palette, history, args.name,
                              wake_main=wake, reconnect=connect)
    else:
        comeback = Comeback(
            reconnect_for=None if args.no_reconnect else args.reconnect_for,
            backlog=args.backlog, delay_scale=delay_scale(os.environ),
            reply_timeout=reply_timeout(os.environ, REPLY_TIMEOUT), connect=connect)
        session = NativeSession(transport, terminal, palette, history, args.name, args.title,
                                args.company, wake_main=wake, comeback=comeback)
    session.bell = not args.no_bell
    session_ref.append(session)
    try:
        return session.run()
    except KeyboardInterrupt:  # a wake-up that landed while the session was already ending
        return session.finish()


if __name__ == "__main__":
    raise SystemExit(main())
