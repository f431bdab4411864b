"""Load processes of ``chat-bench``: many native clients on one epoll loop per process.

A load process connects its clients, registers them in mode 2, then counts, sends and times on
the parent's command over a pipe. Invariant: a load process never outlives the benchmark. It
ignores Ctrl-C and exits when its control pipe closes (and, on Linux, when the parent dies).

Load processes count frames without parsing them (``chatsuite.bench.frames``), and take their
times from ``chatsuite.bench.system.monotonic_ns``, one clock for every process on Linux.
"""

from __future__ import annotations

import json
import math
import selectors
import signal
import socket
from array import array
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from chatsuite.bench.frames import LATENCY_TEXT, PONG_FRAME, count_chunk, parse_sample
from chatsuite.bench.system import cpu_seconds, die_with_parent, monotonic_ns, raise_fd_limit

RECV_SIZE = 1 << 20  # one recv drains a whole socket buffer: fewer system calls per frame
SEND_CHUNK = 256 * 1024  # a sender writes this many bytes of pipelined frames per send()

SETUP, LIVE, CLOSED = 0, 1, 2


class Client:
    """One native connection of a load process, with its counters."""

    __slots__ = (
        "complete", "error", "errors", "expected", "first_send_ns", "frames", "joined",
        "last_message_ns", "messages", "name", "oks", "out", "parse", "partial", "pings", "rate",
        "send_start_ns", "sent", "sent_all_ns", "setup_buf", "sock", "state", "tail", "to_send",
        "window",
    )

    def __init__(self, name: str, to_send: int, rate: float, parse: bool, window: int) -> None:
        self.sock: socket.socket | None = None
        self.name = name
        self.state = SETUP
        self.setup_buf = b""
        self.error: str | None = None
        self.messages = self.oks = self.joined = self.pings = self.errors = self.frames = 0
        self.tail = b""  # last bytes of the previous chunk when it ended inside a frame
        self.expected = 0
        self.complete = True
        self.out = bytearray()
        self.to_send = to_send
        self.window = window  # say frames in flight (sent, not yet answered); 0: no limit
        self.rate = rate
        self.sent = 0  # say frames handed to the outgoing buffer
        self.first_send_ns = 0
        self.sent_all_ns = 0
        self.send_start_ns = 0
        self.last_message_ns = 0
        self.parse = parse
        self.partial = b""  # latency viewers: the incomplete frame after the last NUL


class LoadWorker:
    """A load process: connects its clients, then counts, sends and times on command."""

    def __init__(self, ctrl: Connection, spec: dict[str, Any]) -> None:
        self.ctrl = ctrl
        # Clients are spread over the servers in turn (several nodes of one cluster), counting
        # from this worker's first client's place among all the load's clients.
        self.addresses = [tuple(address) for address in spec["addresses"]]
        self.next_address = spec.get("first", 0)
        self.role: str = spec["role"]
        self.inflight_limit: int = spec.get("inflight", 32)
        self.connect_timeout: float = spec.get("connect_timeout", 10.0)
        self.clients = [
            Client(name, spec.get("send", 0), spec.get("rate", 0.0), spec.get("parse", False),
                   spec.get("window", 0))
            for name in spec["names"]
        ]
        self.sel = selectors.DefaultSelector()
        self.sel.register(ctrl.fileno(), selectors.EVENT_READ, None)
        self.buf = bytearray(RECV_SIZE)
        self.view = memoryview(self.buf)
        self.last_progress_ns = monotonic_ns()
        self.latencies: array[int] = array("q")
        self.sample: dict[str, Any] | None = None
        self.disconnects = 0
        self.pending = 0  # clients not yet complete in the running phase
        self.stop_requested = False

    # -- control ------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve commands from the parent until ``stop`` (or until the parent goes away)."""
        try:
            while not self.stop_requested:
                command, params = self._next_command()
                if command == "setup":
                    self.ctrl.send(("ready", self.setup()))
                elif command == "go":
                    result = self.go(params)
                    if self.stop_requested:
                        break  # aborted: the parent no longer reads, so send nothing big
                    self.ctrl.send(("done", result))
                elif command == "status":
                    self.ctrl.send(("status", self.status()))
                elif command == "stop":
                    break
        except (EOFError, BrokenPipeError, ConnectionResetError):
            pass  # the parent is gone: nothing to report to
        finally:
            for client in self.clients:
                if client.sock is not None:
                    client.sock.close()
            self.sel.close()

    def _next_command(self) -> tuple[str, dict[str, Any]]:
        """Drain the sockets until the parent sends a command (clients must never stop reading)."""
        while True:
            for key, events in self.sel.select(timeout=1.0):
                if key.data is None:
                    message = self.ctrl.recv()
                    return message[0], (message[1] if len(message) > 1 else {})
                self._service(key.data, events)

    def _poll_control(self) -> None:
        """Answer a command that arrives while a phase runs (status, or stop to abort it)."""
        command = self.ctrl.recv()
        if command[0] == "status":
            self.ctrl.send(("status", self.status()))
        elif command[0] == "stop":
            self.stop_requested = True

    def status(self) -> dict[str, Any]:
        """Counters so far, summed over this process's clients."""
        return {
            "messages": sum(c.messages for c in self.clients),
            "joined": sum(c.joined for c in self.clients),
            "live": sum(c.state == LIVE for c in self.clients),
            "disconnects": self.disconnects,
        }

    # -- setup: connect and register, a bounded number at a time -------------------------------

    def setup(self) -> dict[str, Any]:
        """Connect every client, register it and enter mode 2; report when all are ready."""
        cpu0, start = cpu_seconds(), monotonic_ns()
        deadline = start + int(self.connect_timeout * 1e9) * max(1, len(self.clients) // 100)
        waiting = deque(self.clients)
        inflight = failed = 0
        ready = 0
        while ready + failed < len(self.clients):
            while waiting and inflight < self.inflight_limit:
                client = waiting.popleft()
                try:
                    self._open(client)
                    inflight += 1
                except OSError as error:
                    client.error = f"connect: {error}"
                    client.state = CLOSED
                    failed += 1
            for key, events in self.sel.select(timeout=0.5):
                if key.data is None:
                    self._poll_control()
                    continue
                client = key.data
                was = client.state
                self._service(client, events)
                if was == SETUP and client.state != SETUP:
                    inflight -= 1
                    if client.state == LIVE:
                        ready += 1
                    else:
                        failed += 1
            if self.stop_requested or monotonic_ns() > deadline:
                break
        end = monotonic_ns()
        errors = sorted({c.error for c in self.clients if c.error})
        return {
            "ready": ready, "failed": len(self.clients) - ready, "start_ns": start,
            "end_ns": end, "cpu_s": cpu_seconds() - cpu0, "errors": errors[:5],
        }

    def _open(self, client: Client) -> None:
        address = self.addresses[self.next_address % len(self.addresses)]
        self.next_address += 1
        sock = socket.create_connection(address, timeout=self.connect_timeout)
        # Small frames sent at a fixed rate must not wait for Nagle's algorithm.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = json.dumps({"type": "hello", "name": client.name}).encode() + b"\0"
        sock.sendall(hello + b'{"type":"mode","mode":2}\0')
        sock.setblocking(False)
        client.sock = sock
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _setup_data(self, client: Client, data: bytes, now: int) -> None:
        """Parse the few frames before the ``mode`` reply; count the rest like live traffic."""
        data = client.setup_buf + data
        while client.state == SETUP:
            end = data.find(b"\0")
            if end < 0:
                client.setup_buf = data
                return
            frame, data = data[:end], data[end + 1 :]
            try:
                event = json.loads(frame)
            except ValueError:
                event = {"type": "?"}
            kind = event.get("type")
            if kind == "mode":
                client.state = LIVE
            elif kind == "error":
                client.error = str(event.get("code"))
                self._close(client)
                return
            elif kind == "ping":
                self._queue_out(client, PONG_FRAME)
        client.setup_buf = b""
        if data:
            self.buf[: len(data)] = data
            self._count(client, len(data), now)

    # -- the running phase -------------------------------------------------------------------

    def go(self, params: dict[str, Any]) -> dict[str, Any]:
        """Send what this process sends and count until every client has what it expects."""
        expected = params.get("expect", 0)
        stall_ns = int(params.get("stall", 15.0) * 1e9)
        deadline = monotonic_ns() + int(params.get("timeout", 300.0) * 1e9)
        cpu0, start = cpu_seconds(), monotonic_ns()
        senders = self._start_phase(expected, start)
        self.last_progress_ns = monotonic_ns()
        while self.pending and not self.stop_requested:
            timeout = 0.2
            now = monotonic_ns()
            for client in senders:
                if client.rate > 0 and client.sent < client.to_send:
                    timeout = min(timeout, self._pace(client, now))
            for key, events in self.sel.select(timeout=timeout):
                if key.data is None:
                    self._poll_control()
                else:
                    self._service(key.data, events)
            now = monotonic_ns()
            if now > deadline or now - self.last_progress_ns > stall_ns:
                break
        return self._phase_result(expected, senders, start, cpu0)

    def _start_phase(self, expected: int, start: int) -> list[Client]:
        """Set what each live client expects, count the pending ones, start the pipelined
        senders (rate 0: all their frames at once; paced ones are fed by ``go``); the senders."""
        self.pending = 0
        senders: list[Client] = []
        for client in self.clients:
            if client.state != LIVE:
                continue
            client.expected = expected
            client.complete = client.messages >= expected and not client.to_send
            if client.to_send:
                senders.append(client)
                client.send_start_ns = start
            if not client.complete:
                self.pending += 1
        for client in senders:
            if client.rate <= 0:
                self._queue_says(client, min(client.window or client.to_send, client.to_send))
        return senders

    def _phase_result(self, expected: int, senders: list[Client], start: int,
                      cpu0: float) -> dict[str, Any]:
        """The running phase's counters and times, summed over this process's clients."""
        end = monotonic_ns()
        result: dict[str, Any] = {
            "role": self.role,
            "clients": len(self.clients),
            "messages": sum(c.messages for c in self.clients),
            "expected": expected * sum(c.state != SETUP for c in self.clients),
            "oks": sum(c.oks for c in self.clients),
            "errors": sum(c.errors for c in self.clients),
            "joined": sum(c.joined for c in self.clients),
            "sent": sum(c.sent for c in self.clients),
            "disconnects": self.disconnects,
            "complete": self.pending == 0,
            "first_send_ns": min((c.first_send_ns for c in senders if c.first_send_ns), default=0),
            "sent_all_ns": max((c.sent_all_ns for c in senders), default=0),
            "last_message_ns": max((c.last_message_ns for c in self.clients), default=0),
            "start_ns": start,
            "end_ns": end,
            "cpu_s": cpu_seconds() - cpu0,
            "sample": self.sample,
            # Who fell short, for diagnosis: the first few incomplete clients' counters.
            "short": [
                {"name": c.name, "sent": c.sent, "oks": c.oks, "messages": c.messages,
                 "unsent_bytes": len(c.out), "state": c.state}
                for c in self.clients if c.state != SETUP and not c.complete
            ][:5],
        }
        if any(c.parse for c in self.clients):
            result["latencies"] = array("q", sorted(self.latencies))
        return result

    def _queue_says(self, client: Client, count: int) -> None:
        """Queue the next ``count`` say frames of a pipelined sender, as one write."""
        payload = b"".join(
            b'{"type":"say","text":"m%d"}\0' % i for i in range(client.sent, client.sent + count)
        )
        client.sent += count
        if not client.first_send_ns:
            client.first_send_ns = monotonic_ns()
        self._queue_out(client, payload)

    def _pace(self, client: Client, now: int) -> float:
        """Queue the frames a paced sender owes by now; return seconds until the next is due."""
        elapsed = now - client.send_start_ns
        due = min(client.to_send, int(elapsed * client.rate / 1e9) + 1)
        if due > client.sent:
            # Each frame carries its send time; frames due together share one stamp.
            stamp = monotonic_ns()
            frame = b'{"type":"say","text":"lat:%d"}\0' % stamp
            if not client.first_send_ns:
                client.first_send_ns = stamp
            count, client.sent = due - client.sent, due
            self._queue_out(client, frame * count)
        if client.sent >= client.to_send:
            return 0.2
        next_due = client.send_start_ns + math.ceil(client.sent * 1e9 / client.rate)
        return max(0.0, (next_due - monotonic_ns()) / 1e9)

    # -- socket events -----------------------------------------------------------------------

    def _service(self, client: Client, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush(client)
        if events & selectors.EVENT_READ and client.state != CLOSED:
            self._read(client)

    def _read(self, client: Client) -> None:
        assert client.sock is not None
        try:
            n = client.sock.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._close(client)
            return
        now = monotonic_ns()
        self.last_progress_ns = now
        if client.state == SETUP:
            self._setup_data(client, bytes(self.view[:n]), now)
        else:
            self._count(client, n, now)

    def _count(self, client: Client, n: int, now: int) -> None:
        """Count the frames of ``self.buf[:n]`` by kind (the hot path of every viewer)."""
        sample_source: bytes | bytearray
        if client.parse:
            chunk = self._whole_frames(client, n, now)
            if chunk is None:
                return
            counts, frames, _ = count_chunk(chunk, len(chunk), b"")
            sample_source, sample_len, clean_start = chunk, len(chunk), True
        else:
            clean_start = not client.tail
            counts, frames, client.tail = count_chunk(self.buf, n, client.tail)
            sample_source, sample_len = self.buf, n
        messages, oks, joined, pings, errors = counts
        client.frames += frames
        if messages:
            client.messages += messages
            client.last_message_ns = now
            if self.sample is None:
                self.sample = parse_sample(sample_source, sample_len, clean_start)
        client.oks += oks
        client.joined += joined
        client.errors += errors
        self._top_up_window(client)
        if pings:
            client.pings += pings
            self._queue_out(client, PONG_FRAME * pings)
        self._check_complete(client)

    def _whole_frames(self, client: Client, n: int, now: int) -> bytes | None:
        """Latency viewers: the whole frames received so far (None: not one yet); the send time
        of each message in them is recorded as a latency."""
        data = client.partial + bytes(self.view[:n])
        last = data.rfind(b"\0")
        if last < 0:
            client.partial = data
            return None
        chunk, client.partial = data[: last + 1], data[last + 1 :]
        stamps = LATENCY_TEXT.findall(chunk)
        if stamps:
            self.latencies.extend([now - int(s) for s in stamps])
        return chunk

    def _top_up_window(self, client: Client) -> None:
        """Windowed sender: top the window up once half of it has been answered. An ok is
        queued behind what the server owes this client, so this also bounds its backlog."""
        if client.window and client.send_start_ns and client.sent < client.to_send \
                and client.rate <= 0:
            in_flight = client.sent - client.oks - client.errors
            if in_flight <= client.window // 2:
                self._queue_says(client, min(client.window - in_flight,
                                             client.to_send - client.sent))

    def _check_complete(self, client: Client) -> None:
        """Mark ``client`` complete once it has all it expects and, as a sender, every answer."""
        if (
            not client.complete and client.messages >= client.expected
            and (not client.to_send or (
                client.sent >= client.to_send and not client.out
                and client.oks + client.errors >= client.to_send))
        ):
            client.complete = True
            self.pending -= 1

    def _queue_out(self, client: Client, data: bytes) -> None:
        if client.sock is None or client.state == CLOSED:
            return
        had_output = bool(client.out)
        client.out += data
        if not had_output:
            self._flush(client)

    def _flush(self, client: Client) -> None:
        """Write as much pending output as the socket takes; watch for writability otherwise."""
        assert client.sock is not None
        try:
            while client.out:
                with memoryview(client.out) as view:
                    sent = client.sock.send(view[:SEND_CHUNK])
                del client.out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(client)
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        if self.sel.get_key(client.sock).events != mask:
            self.sel.modify(client.sock, mask, client)
        if client.to_send and not client.out and client.sent >= client.to_send \
                and not client.sent_all_ns:
            client.sent_all_ns = monotonic_ns()

    def _close(self, client: Client) -> None:
        if client.sock is not None:
            try:
                self.sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            client.sock.close()
        if client.state == LIVE:
            self.disconnects += 1
            if not client.complete:
                client.complete = True
                self.pending -= 1
        client.state = CLOSED
        client.out.clear()


def worker_main(ctrl: Connection, spec: dict[str, Any]) -> None:
    """Entry point of a load process."""
    # Ctrl-C reaches the whole process group: the parent alone decides when load processes end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # fork copied the parent's cleanup handler
    die_with_parent()
    raise_fd_limit()
    try:
        LoadWorker(ctrl, spec).run()
    except Exception as error:  # broad on purpose: reported to the parent as a BenchError
        import traceback

        try:
            ctrl.send(("error", f"{error!r}\n{traceback.format_exc()}"))
        except OSError:
            pass
