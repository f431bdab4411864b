"""The client speaking the native protocol (SPEC section 1): JSON requests with refs, and events.

The receiver thread decodes events: a reply (an event carrying the ``ref`` of one of our
requests) goes to the request waiting for it; a ``message`` or ``notice`` goes to the
``Viewer``, which prints it while viewing and keeps it while typing; a ``ping`` is answered with
``pong`` (the only write from that thread). Invariant: each request gets exactly its own reply,
or ``ConnectionLost``.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable
from datetime import datetime
from typing import Any

from chatsuite.client.display import (
    format_delivery,
    format_failure,
    format_message,
    format_notice,
    format_users,
    sanitize,
)
from chatsuite.client.history import HistoryKey
from chatsuite.client.session import (
    BYE_TIMEOUT,
    LOST,
    REPLY_TIMEOUT,
    SHUT_DOWN,
    ConnectionLost,
    Link,
    Session,
    closed_early,
)
from chatsuite.client.terminal import Terminal
from chatsuite.client.transport import Transport
from modes import Mode
from protocol import EventDecoder, encode, parse_target

TLS_RECORD_STARTS = (0x15, 0x16)  # a TLS alert or handshake record: the server speaks TLS


class Connection(Link):
    """A native-protocol connection: requests with refs out, replies matched back by ref."""

    def __init__(self, transport: Transport, on_event: Callable[[dict[str, Any]], None],
                 on_end: Callable[[], None]) -> None:
        super().__init__(transport, on_end)
        self._on_event = on_event  # message, notice and stray errors (receiver thread)
        self._waiting: dict[int, queue.Queue[dict[str, Any] | None]] = {}  # _state_lock
        self._refs = itertools.count(1)
        self._decoder = EventDecoder()
        self._first = True

    def send(self, obj: dict[str, Any]) -> None:
        """Write one frame; ``ConnectionLost`` when the socket is gone."""
        self.send_bytes(encode(obj))

    def request(self, obj: dict[str, Any], timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """Send ``obj`` with a fresh ref and return the server's reply to it."""
        ref = next(self._refs)
        replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with self._state_lock:
            if self.ended:
                raise ConnectionLost(self.failure or LOST)
            self._waiting[ref] = replies
        try:
            self.send({**obj, "ref": ref})
            reply = replies.get(timeout=timeout)
        except queue.Empty:
            self.fail("the server did not answer; disconnected")
            raise ConnectionLost(self.failure) from None
        finally:
            with self._state_lock:
                self._waiting.pop(ref, None)
        if reply is None:
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

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind, ref = event.get("type"), event.get("ref")
        if kind == "ping":
            try:
                self.send({"type": "pong"} if ref is None else {"type": "pong", "ref": ref})
            except ConnectionLost:
                pass
            return
        if kind == "error" and event.get("code") == "server-full":
            # The server closes right after this (SPEC 1.2): record the real reason before the
            # end of the stream records "lost".
            self.fail(f"the server refused the connection: {sanitize(event.get('message'))}")
        with self._state_lock:
            replies = self._waiting.get(ref) if isinstance(ref, int) else None
        if replies is not None:
            replies.put(event)
        else:
            self._on_event(event)

    def quit(self) -> None:
        """Tell the server we leave (``quit``), wait briefly for ``bye``, close."""
        with self._state_lock:
            self.closing = True
        try:
            self.request({"type": "quit"}, timeout=BYE_TIMEOUT)
        except ConnectionLost:
            pass
        self.close()


class NativeSession(Session):
    """A session in the native protocol: ids, titles, status, and the server holding for us."""

    link: Connection

    def __init__(self, transport: Transport, terminal: Terminal, *args: Any,
                 wake_main: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(terminal, *args, **kwargs)
        self.link = self.conn = Connection(transport, self.deliver, wake_main)
        self.own_id: Any = None

    # ---- the receiver thread's side

    def deliver(self, event: dict[str, Any]) -> None:
        """Called by the receiver thread for every event that is not a reply."""
        kind = event.get("type")
        if kind == "message":
            sender = event.get("from")
            name = sender.get("name") if isinstance(sender, dict) else None
            bell = self.heard(name, event.get("text"))
            self.viewer.post(format_message(event, self.palette) + bell)
            if event.get("to") is not None:
                self._log_received(event)
        elif kind == "notice":
            line = format_notice(event, self.palette)
            if event.get("event") == "shutdown":
                self.viewer.say(line)  # said at once, whatever the mode, then the session ends
                self.conn.fail(SHUT_DOWN)
            else:
                self.viewer.post(line)
        elif kind == "error":
            # An error that answers no waiting request (the server refusing the connection,
            # or a late reply): rare and about us, so said at once, whatever the mode.
            self.viewer.say(self.palette.bad(f"server: {sanitize(event.get('message'))}"))

    def _log_received(self, event: dict[str, Any]) -> None:
        raw = event.get("from")
        sender: dict[str, Any] = raw if isinstance(raw, dict) else {}
        when = datetime.now()
        if isinstance(event.get("ts"), str):
            try:
                when = datetime.fromisoformat(event["ts"]).astimezone()
            except ValueError:
                pass
        peer_name = sender.get("name")
        if isinstance(peer_name, str):  # the log is named by the name: ids are reused
            self.log(peer_name, "received from", peer_name, event.get("text"), when)

    # ---- the main thread's side

    def register(self) -> None:
        name = self.name
        if name is None:
            name = self.ask("your name (Enter for an automatic one): ").strip()
            self.title = self.title or self.ask("your job title (Enter for none): ").strip() or None
            self.company = self.company or self.ask("your company (Enter for none): ").strip() or None
        while True:
            hello: dict[str, Any] = {"type": "hello"}
            for key, value in (("name", name), ("title", self.title), ("company", self.company)):
                if value:
                    hello[key] = value
            reply = self.conn.request(hello)
            if reply.get("type") == "welcome":
                self.own_id = reply.get("id")
                self.registered(reply.get("name"))
                self.show(self.palette.good(
                    f"welcome {sanitize(reply.get('name'))}, your id is {sanitize(reply.get('id'))}"
                    f" ({sanitize(reply.get('online'))} online)"))
                return
            reason = sanitize(reply.get("message"))
            if reply.get("code") not in ("name-taken", "bad-name"):
                self.conn.fail(f"the server refused the connection: {reason}")
                raise ConnectionLost(self.conn.failure)
            self.show(self.palette.bad(f"that name cannot be used: {reason}"))
            name = self.ask("your name (Enter for an automatic one): ").strip()

    def enter_mode(self, mode: Mode) -> None:
        self.conn.request({"type": "mode", "mode": int(mode)})

    def report(self, reply: dict[str, Any]) -> bool:
        """Say whether a send worked; True when it did."""
        if reply.get("type") == "ok":
            self.show(self.palette.good(format_delivery(reply)))
            return True
        self.show(self.palette.bad(format_failure(reply)))
        return False

    def broadcast(self, text: str) -> None:
        self.report(self.conn.request({"type": "say", "text": text}))

    def users(self) -> list[dict[str, Any]]:
        users = self.conn.request({"type": "users"}).get("users")
        return [user for user in users if isinstance(user, dict)] if isinstance(users, list) else []

    def member_names(self) -> list[str]:
        return [user["name"] for user in self.users() if isinstance(user.get("name"), str)]

    def show_users(self) -> None:
        for row in format_users(self.users(), self.own_id):
            self.show(row)

    def find_user(self, who: str) -> dict[str, Any] | None:
        """The connected user named ``who`` (a name, any case, or an id), or None."""
        target = parse_target(who)
        for user in self.users():
            name = user.get("name")
            if user.get("id") == target or (
                isinstance(target, str) and isinstance(name, str)
                and name.casefold() == target.casefold()
            ):
                return user
        return None

    def send_direct(self, to: str, text: str) -> None:
        peer = self.find_user(to)  # for the log: an id typed is logged under its name
        reply = self.conn.request({"type": "dm", "to": parse_target(to), "text": text})
        name = peer.get("name") if peer is not None else parse_target(to)
        if self.report(reply) and isinstance(name, str):
            self.log(name, "sent to", name, text)

    def toggle_status(self) -> None:
        reply = self.conn.request({"type": "status"})
        self.show(f"your status is now {sanitize(reply.get('status'))}")

    def history_key(self, peer: str) -> HistoryKey | None:
        target = parse_target(peer)
        if isinstance(target, str):
            return target  # a name: its log, whether or not that person is here now
        user = self.find_user(peer)
        name = user.get("name") if user is not None else None
        if not isinstance(name, str):
            self.show(f"nobody has the id {target} now; give the name to see the history "
                      "with someone who left")
            return None
        return name

    def leave(self) -> None:
        self.conn.quit()
