"""Load benchmark of the chat server: how many deliveries per second, how fast, how many clients.

``chat-bench`` starts ``chat_server.py`` itself (a fresh server per scenario, so figures do not
leak between scenarios) unless ``--connect HOST:PORT`` is given, and drives it over loopback from
several load processes, each serving many sockets with one epoll loop. Scenarios:

* ``fanout``: one sender pipelines M ``say`` frames to N viewers;
* ``all2all``: N clients each broadcast M messages while all of them view;
* ``latency``: one sender at a fixed rate, N viewers measure each message's delivery latency;
* ``conns``: C clients register (mode 2) at once; registrations per second, the server's memory
  per client, and how long one broadcast takes to reach all of them.

Invariant: the benchmark never leaves a process behind. Load processes ignore Ctrl-C and exit
when their control pipe closes (and, on Linux, when the parent dies); the parent kills the
server and every load process in ``finally``, on Ctrl-C and SIGTERM too.

Load processes count frames without parsing them: one ``bytes.count`` per frame kind per
``recv`` (a quoted ``"type":"message"`` cannot occur inside a JSON string, where every quote is
escaped), so a loaded generator costs little next to the server it measures. Only the latency
viewers parse, with one regular expression per ``recv``. Times cross processes as
``time.monotonic_ns`` (CLOCK_MONOTONIC, one clock for the whole machine on Linux).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import multiprocessing
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
SCENARIOS = ("fanout", "all2all", "latency", "conns")

RECV_SIZE = 1 << 20  # one recv drains a whole socket buffer: fewer system calls per frame
SEND_CHUNK = 256 * 1024  # a sender writes this many bytes of pipelined frames per send()

# Frame kinds, counted per recv. Each pattern has quotes around a colon, which a JSON string
# value can only hold escaped (\"), so it matches the frame's own keys and nothing inside a text.
MESSAGE = b'"type":"message"'
OK = b'"type":"ok"'
JOINED = b'"event":"joined"'
PING = b'"type":"ping"'
ERROR = b'"type":"error"'
PATTERNS = (MESSAGE, OK, JOINED, PING, ERROR)
TAIL = max(len(p) for p in PATTERNS) - 1  # bytes kept of a chunk cut inside a frame
LATENCY_TEXT = re.compile(rb'"text":"lat:(\d+)"')
PONG_FRAME = b'{"type":"pong"}\0'


class BenchError(Exception):
    """The benchmark could not run (server did not start, a load process failed or timed out)."""


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds: comparable between processes on Linux."""
    return time.monotonic_ns()


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard limit (thousands of sockets); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this process when its parent dies (no orphans on kill -9)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def cpu_seconds() -> float:
    """User plus system CPU time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------
# Load process: many native clients on one epoll loop.

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
        self.address = tuple(spec["address"])
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
        self.latencies: array = array("q")
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
        sock = socket.create_connection(self.address, timeout=self.connect_timeout)
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
        # Pipelined senders (rate 0) get all their frames at once; paced ones are fed below.
        for client in senders:
            if client.rate <= 0:
                self._queue_says(client, min(client.window or client.to_send, client.to_send))
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
        buf = self.buf
        if client.parse:
            # Latency viewers: split whole frames and read each message's send time.
            data = client.partial + bytes(self.view[:n])
            last = data.rfind(b"\0")
            if last < 0:
                client.partial = data
                return
            chunk, client.partial = data[: last + 1], data[last + 1 :]
            stamps = LATENCY_TEXT.findall(chunk)
            if stamps:
                self.latencies.extend([now - int(s) for s in stamps])
            counts = [chunk.count(p) for p in PATTERNS]
            frames = chunk.count(b"\0")
            sample_source: bytes | bytearray = chunk
            sample_len, clean_start = len(chunk), True
        else:
            clean_start = not client.tail
            counts = [buf.count(p, 0, n) for p in PATTERNS]
            frames = buf.count(b"\0", 0, n)
            if client.tail:
                # The previous chunk ended inside a frame: count kinds cut across the boundary.
                head = bytes(self.view[: min(n, TAIL)])
                for i, p in enumerate(PATTERNS):
                    joint = client.tail[-(len(p) - 1) :] + head[: len(p) - 1]
                    counts[i] += joint.count(p)
            if buf[n - 1] == 0:
                client.tail = b""
            elif n >= TAIL:
                client.tail = bytes(self.view[n - TAIL : n])
            else:
                client.tail = (client.tail + bytes(self.view[:n]))[-TAIL:]
            sample_source, sample_len = buf, n
        messages, oks, joined, pings, errors = counts
        client.frames += frames
        if messages:
            client.messages += messages
            client.last_message_ns = now
            if self.sample is None:
                self._take_sample(sample_source, sample_len, clean_start)
        client.oks += oks
        client.joined += joined
        client.errors += errors
        if client.window and client.send_start_ns and client.sent < client.to_send \
                and client.rate <= 0:
            # Windowed sender: top the window up once half of it has been answered. An ok is
            # queued behind what the server owes this client, so this also bounds its backlog.
            in_flight = client.sent - client.oks - client.errors
            if in_flight <= client.window // 2:
                self._queue_says(client, min(client.window - in_flight,
                                             client.to_send - client.sent))
        if pings:
            client.pings += pings
            self._queue_out(client, PONG_FRAME * pings)
        if (
            not client.complete and client.messages >= client.expected
            and (not client.to_send or (
                client.sent >= client.to_send and not client.out
                and client.oks + client.errors >= client.to_send))
        ):
            client.complete = True
            self.pending -= 1

    def _take_sample(self, data: bytes | bytearray, n: int, clean_start: bool) -> None:
        """Parse one whole message frame: proof that the counted frames have the right form."""
        at = data.find(MESSAGE, 0, n)
        if at < 0:
            return  # the only one was cut across two chunks
        start = data.rfind(b"\0", 0, at) + 1
        end = data.find(b"\0", at, n)
        if (start == 0 and not clean_start) or end < 0:
            return  # not wholly inside this chunk; the next one will do
        try:
            self.sample = json.loads(bytes(data[start:end]))
        except ValueError as error:
            self.sample = {"unparsable": str(error)}

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


def _worker_main(ctrl: Connection, spec: dict[str, Any]) -> None:
    """Entry point of a load process."""
    # Ctrl-C reaches the whole process group: the parent alone decides when load processes end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # fork copied the parent's cleanup handler
    _die_with_parent()
    raise_fd_limit()
    try:
        LoadWorker(ctrl, spec).run()
    except Exception as error:  # noqa: BLE001 - reported to the parent as a BenchError
        import traceback

        try:
            ctrl.send(("error", f"{error!r}\n{traceback.format_exc()}"))
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# The parent side: load processes, the server subprocess, and the scenarios.


@dataclass
class Worker:
    """A load process as the parent sees it."""

    process: multiprocessing.process.BaseProcess
    ctrl: Connection
    role: str
    clients: int


class LoadGroup:
    """The load processes of one scenario; closing it ends every one of them."""

    def __init__(self, address: tuple[str, int], inflight: int = 32) -> None:
        self.address = address
        self.inflight = inflight
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.context: Any = multiprocessing.get_context(method)
        self.workers: list[Worker] = []

    def spawn(self, role: str, names: Sequence[str], **spec: Any) -> Worker:
        """Start one load process for these client names (not connected until ``setup``)."""
        parent_end, child_end = self.context.Pipe()
        full = dict(spec, role=role, names=list(names), address=self.address,
                    inflight=self.inflight)
        process = self.context.Process(
            target=_worker_main, args=(child_end, full), name=f"chat-bench-{role}", daemon=True
        )
        process.start()
        child_end.close()
        worker = Worker(process, parent_end, role, len(names))
        self.workers.append(worker)
        return worker

    def command(self, workers: Iterable[Worker], command: str, **params: Any) -> None:
        for worker in workers:
            worker.ctrl.send((command, params))

    def collect(self, workers: Sequence[Worker], kind: str, timeout: float) -> list[dict]:
        """One ``kind`` reply from each worker, in order; BenchError on death, error or timeout."""
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"load processes gave no {kind!r} within {timeout:.0f} s")
            waiting = [w for i, w in enumerate(workers) if i not in replies]
            ready = wait([w.ctrl for w in waiting] + [w.process.sentinel for w in waiting],
                         remaining)
            for i, worker in enumerate(workers):
                if i in replies:
                    continue
                if worker.ctrl in ready or worker.ctrl.poll():
                    try:
                        message = worker.ctrl.recv()
                    except EOFError:
                        raise BenchError(f"load process {worker.role} exited") from None
                    if message[0] == "error":
                        raise BenchError(f"load process {worker.role} failed: {message[1]}")
                    if message[0] == kind:
                        replies[i] = message[1]
                elif worker.process.sentinel in ready:
                    raise BenchError(f"load process {worker.role} exited "
                                     f"(code {worker.process.exitcode})")
        return [replies[i] for i in range(len(workers))]

    def close(self) -> None:
        """Stop every load process: politely, then by force."""
        for worker in self.workers:
            try:
                worker.ctrl.send(("stop", {}))
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(2.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(2.0)
            worker.ctrl.close()
        self.workers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``chat_server.py`` as a subprocess on a free loopback port, its output drained."""

    def __init__(self, max_clients: int, extra_args: Sequence[str] = (),
                 script: Path = HERE / "chat_server.py", start_timeout: float = 15.0) -> None:
        self.port = free_port()
        self.address = ("127.0.0.1", self.port)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = [sys.executable, str(script), "--host", "127.0.0.1", "--port", str(self.port),
                   "--rate", "0", "--max-clients", str(max_clients), *extra_args]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            # Only a prctl call runs between fork and exec, so the thread caveat does not bite.
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        self.pid = self.proc.pid
        self.lines: deque[str] = deque(maxlen=40)  # the last lines, for error reports
        self.line_count = 0
        self.exit: dict[str, Any] | None = None
        self._listening = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + start_timeout
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError("the server did not start: " + " | ".join(self.lines))

    def _drain(self) -> None:
        # The server logs every relayed message: its pipe must never fill up and block it.
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.line_count += 1
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if "listening on" in line:
                self._listening.set()

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then SIGKILL after 5 s; report the exit code and how long the exit took."""
        if self.proc.poll() is None:
            start = time.monotonic()
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
            self.exit = {"code": self.proc.returncode,
                         "seconds": round(time.monotonic() - start, 3)}
        elif self.exit is None:
            self.exit = {"code": self.proc.returncode, "seconds": None}
        return self.exit


def read_proc_status(pid: int | None, key: str) -> int | None:
    """A numeric field of /proc/PID/status (VmRSS in KiB, Threads), or None when unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_cpu(pid: int | None) -> float | None:
    """User plus system CPU seconds of a process, from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def host_busy() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, to see whether the machine was full."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class Measure:
    """CPU of the server and of the whole machine over one measured phase."""

    server_pid: int | None
    wall0: float = field(default_factory=time.monotonic)
    server0: float | None = None
    host0: tuple[int, int] | None = None
    parent0: float = 0.0

    def __post_init__(self) -> None:
        self.server0 = process_cpu(self.server_pid)
        self.host0 = host_busy()
        self.parent0 = cpu_seconds()

    def close(self) -> dict[str, Any]:
        wall = time.monotonic() - self.wall0
        server1, host1 = process_cpu(self.server_pid), host_busy()
        out: dict[str, Any] = {"server_cpu_s": None, "server_cpu_pct": None, "host_busy_pct": None}
        # This process coordinates and drains the server's log (one line per message relayed).
        out["bench_parent_cpu_pct"] = round(100 * (cpu_seconds() - self.parent0) / wall, 1) \
            if wall > 0 else None
        if self.server0 is not None and server1 is not None and wall > 0:
            out["server_cpu_s"] = round(server1 - self.server0, 3)
            out["server_cpu_pct"] = round(100 * (server1 - self.server0) / wall, 1)
        if self.host0 and host1 and host1[1] > self.host0[1]:
            cpus = os.cpu_count() or 1
            share = (host1[0] - self.host0[0]) / (host1[1] - self.host0[1])
            out["host_busy_pct"] = round(100 * share * cpus, 1)  # of one core, like top
        return out


def split_evenly(names: Sequence[str], parts: int) -> list[list[str]]:
    """``names`` cut into ``parts`` nearly equal runs (no empty run)."""
    parts = max(1, min(parts, len(names)))
    size, extra = divmod(len(names), parts)
    out, at = [], 0
    for i in range(parts):
        step = size + (1 if i < extra else 0)
        out.append(list(names[at : at + step]))
        at += step
    return out


def _names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def _token() -> str:
    """A short run tag so that names never clash with earlier runs on a shared server."""
    return os.urandom(3).hex()


def _cpu_report(results: Sequence[dict], wall_key: tuple[str, str] = ("start_ns", "end_ns")
                ) -> list[dict]:
    report = []
    for result in results:
        wall = (result[wall_key[1]] - result[wall_key[0]]) / 1e9
        report.append({
            "role": result.get("role", "?"), "clients": result.get("clients"),
            "cpu_s": round(result["cpu_s"], 3), "wall_s": round(wall, 3),
            "cpu_pct": round(100 * result["cpu_s"] / wall, 1) if wall > 0 else None,
        })
    return report


def _setup(group: LoadGroup, workers: Sequence[Worker], timeout: float) -> list[dict]:
    group.command(workers, "setup")
    ready = group.collect(workers, "ready", timeout)
    for worker, info in zip(workers, ready):
        if info["failed"]:
            raise BenchError(f"{info['failed']} of {worker.clients} {worker.role} clients did not "
                             f"register: {info['errors']}")
    return ready


def _sample_ok(results: Sequence[dict], sender_prefix: str | None) -> bool:
    """True when each viewer process's parsed sample message has the SPEC's fields."""
    for result in results:
        sample = result.get("sample")
        if result["messages"] == 0:
            continue
        if not isinstance(sample, dict) or sample.get("type") != "message":
            return False
        if not {"from", "to", "text", "ts", "queued"} <= sample.keys():
            return False
        sender = sample.get("from") or {}
        if sender_prefix and not str(sender.get("name", "")).startswith(sender_prefix):
            return False
        if sample.get("to") is not None or sample.get("queued") is not False:
            return False
    return True


def _throughput(results: Sequence[dict], first_send_ns: int) -> tuple[float | None, float | None]:
    last = max((r["last_message_ns"] for r in results), default=0)
    received = sum(r["messages"] for r in results)
    if not first_send_ns or last <= first_send_ns:
        return None, None
    seconds = (last - first_send_ns) / 1e9
    return round(seconds, 3), round(received / seconds, 1)


@dataclass
class Options:
    """Limits shared by every scenario."""

    procs: int = 2
    timeout: float = 300.0  # longest a measured phase may run
    stall: float = 15.0  # a phase ends when nothing arrives for this long
    inflight: int = 32  # registrations a load process has in flight at once


def run_fanout(address: tuple[str, int], viewers: int = 100, messages: int = 20_000,
               options: Options | None = None, server_pid: int | None = None,
               window: int = 0) -> dict[str, Any]:
    """One sender pipelines ``messages`` says to ``viewers`` viewers; deliveries per second.

    ``window`` bounds the says in flight (0: all of them are written at once).
    """
    options = options or Options()
    tag = _token()
    with LoadGroup(address, options.inflight) as group:
        viewer_workers = [group.spawn("viewers", names)
                          for names in split_evenly(_names(f"fv{tag}-", viewers), options.procs)]
        sender = group.spawn("sender", [f"fs{tag}"], send=messages, window=window)
        _setup(group, viewer_workers, options.timeout)
        _setup(group, [sender], options.timeout)  # after the viewers: they all get its joined
        measure = Measure(server_pid)
        group.command(viewer_workers, "go", expect=messages, stall=options.stall,
                      timeout=options.timeout)
        group.command([sender], "go", expect=0, stall=options.stall, timeout=options.timeout)
        results = group.collect(viewer_workers + [sender], "done", options.timeout + 30)
        cpu = measure.close()
        state = _server_state(server_pid)
    views, send = results[:-1], results[-1]
    received = sum(r["messages"] for r in views)
    expected = viewers * messages
    seconds, rate = _throughput(views, send["first_send_ns"])
    return {
        "scenario": "fanout", "viewers": viewers, "messages": messages, "window": window,
        "expected": expected,
        "received": received, "lost": expected - received, "seconds": seconds,
        "deliveries_per_s": rate,
        "send_seconds": _span(send["first_send_ns"], send["sent_all_ns"]),
        "acks": send["oks"], "errors": send["errors"] + sum(r["errors"] for r in views),
        "disconnects": sum(r["disconnects"] for r in results),
        "format_ok": _sample_ok(views, f"fs{tag}"),
        "load_cpu": _cpu_report(results), **cpu, **state, "short": _short(results),
    }


def run_all2all(address: tuple[str, int], clients: int = 20, messages: int = 5_000,
                options: Options | None = None, server_pid: int | None = None,
                window: int = 500) -> dict[str, Any]:
    """``clients`` clients each broadcast ``messages`` says, all viewing; deliveries per second.

    Each client keeps at most ``window`` says unanswered (0: no limit). Without a window the
    senders outrun the server's writer and every client passes the output limit.
    """
    options = options or Options()
    tag = _token()
    with LoadGroup(address, options.inflight) as group:
        workers = [group.spawn("peers", names, send=messages, window=window)
                   for names in split_evenly(_names(f"aa{tag}-", clients), options.procs)]
        _setup(group, workers, options.timeout)
        measure = Measure(server_pid)
        group.command(workers, "go", expect=(clients - 1) * messages, stall=options.stall,
                      timeout=options.timeout)
        results = group.collect(workers, "done", options.timeout + 30)
        cpu = measure.close()
        state = _server_state(server_pid)
    received = sum(r["messages"] for r in results)
    expected = clients * (clients - 1) * messages
    first = min((r["first_send_ns"] for r in results if r["first_send_ns"]), default=0)
    seconds, rate = _throughput(results, first)
    return {
        "scenario": "all2all", "clients": clients, "messages": messages, "window": window,
        "expected": expected,
        "received": received, "lost": expected - received, "seconds": seconds,
        "deliveries_per_s": rate,
        "send_seconds": _span(first, max(r["sent_all_ns"] for r in results)),
        "acks": sum(r["oks"] for r in results), "errors": sum(r["errors"] for r in results),
        "disconnects": sum(r["disconnects"] for r in results),
        "format_ok": _sample_ok(results, f"aa{tag}-"),
        "load_cpu": _cpu_report(results), **cpu, **state, "short": _short(results),
    }


def run_latency(address: tuple[str, int], viewers: int = 100, rate: float = 5_000.0,
                seconds: float = 5.0, options: Options | None = None,
                server_pid: int | None = None) -> dict[str, Any]:
    """One sender at ``rate`` messages/s for ``seconds``; delivery latency seen by the viewers."""
    options = options or Options()
    tag = _token()
    count = max(1, round(rate * seconds))
    with LoadGroup(address, options.inflight) as group:
        viewer_workers = [group.spawn("viewers", names, parse=True)
                          for names in split_evenly(_names(f"lv{tag}-", viewers), options.procs)]
        sender = group.spawn("sender", [f"ls{tag}"], send=count, rate=rate)
        _setup(group, viewer_workers, options.timeout)
        _setup(group, [sender], options.timeout)
        measure = Measure(server_pid)
        group.command(viewer_workers, "go", expect=count, stall=options.stall,
                      timeout=options.timeout + seconds)
        group.command([sender], "go", expect=0, stall=options.stall,
                      timeout=options.timeout + seconds)
        results = group.collect(viewer_workers + [sender], "done", options.timeout + seconds + 30)
        cpu = measure.close()
        state = _server_state(server_pid)
    views, send = results[:-1], results[-1]
    runs = [r["latencies"] for r in views]
    received = sum(r["messages"] for r in views)
    expected = viewers * count
    took, deliveries = _throughput(views, send["first_send_ns"])
    send_seconds = _span(send["first_send_ns"], send["sent_all_ns"])
    return {
        "scenario": "latency", "viewers": viewers, "rate": rate, "duration": seconds,
        "messages": count, "expected": expected, "received": received,
        "lost": expected - received, "seconds": took, "deliveries_per_s": deliveries,
        "send_seconds": send_seconds,
        "achieved_rate": round(count / send_seconds, 1) if send_seconds else None,
        "p50_ms": _ms(percentile(runs, 50)), "p99_ms": _ms(percentile(runs, 99)),
        "max_ms": _ms(percentile(runs, 100)), "samples": sum(len(r) for r in runs),
        "acks": send["oks"], "errors": send["errors"] + sum(r["errors"] for r in views),
        "disconnects": sum(r["disconnects"] for r in results),
        "format_ok": _sample_ok(views, f"ls{tag}"),
        "load_cpu": _cpu_report(results), **cpu, **state, "short": _short(results),
    }


def run_conns(address: tuple[str, int], clients: int = 5_000, options: Options | None = None,
              server_pid: int | None = None) -> dict[str, Any]:
    """``clients`` viewers register at once; registrations/s, server memory per client, and
    how long one broadcast takes to reach them all."""
    options = options or Options()
    tag = _token()
    raise_fd_limit()
    rss_before = read_proc_status(server_pid, "VmRSS")
    with LoadGroup(address, options.inflight) as group:
        workers = [group.spawn("viewers", names)
                   for names in split_evenly(_names(f"cv{tag}-", clients), options.procs)]
        sender = group.spawn("sender", [f"cs{tag}"], send=1)
        # Let the load processes start before the clock does: fork is not registration time.
        group.command(workers, "status")
        group.collect(workers, "status", 30)
        measure = Measure(server_pid)
        start = time.monotonic_ns()
        ready = _setup(group, workers, options.timeout)
        registered = max(r["end_ns"] for r in ready)
        reg_seconds = (registered - start) / 1e9
        reg_cpu = measure.close()
        # Every registration tells everyone already there: wait for those notices to land.
        joined_expected = clients * (clients - 1) // 2
        joined, drained = _await_joined(group, workers, joined_expected, options)
        rss_after = read_proc_status(server_pid, "VmRSS")
        _setup(group, [sender], options.timeout)
        measure = Measure(server_pid)
        group.command(workers, "go", expect=1, stall=options.stall, timeout=options.timeout)
        group.command([sender], "go", expect=0, stall=options.stall, timeout=options.timeout)
        results = group.collect(workers + [sender], "done", options.timeout + 30)
        cpu = measure.close()
        state = _server_state(server_pid)
    views, send = results[:-1], results[-1]
    received = sum(r["messages"] for r in views)
    per_client = None
    if rss_before is not None and rss_after is not None:
        per_client = round((rss_after - rss_before) / clients, 1)
    broadcast_ms = None
    last = max(r["last_message_ns"] for r in views)
    if send["first_send_ns"] and last >= send["first_send_ns"]:
        broadcast_ms = round((last - send["first_send_ns"]) / 1e6, 3)
    setup_cpu = [{"role": w.role, "clients": w.clients, "cpu_s": round(r["cpu_s"], 3),
                  "wall_s": round((r["end_ns"] - r["start_ns"]) / 1e9, 3),
                  "cpu_pct": round(100 * r["cpu_s"] * 1e9 / max(1, r["end_ns"] - r["start_ns"]),
                                   1)}
                 for w, r in zip(workers, ready)]
    return {
        "scenario": "conns", "clients": clients, "register_seconds": round(reg_seconds, 3),
        "registrations_per_s": round(clients / reg_seconds, 1) if reg_seconds > 0 else None,
        "joined_expected": joined_expected, "joined_received": joined,
        "joined_drain_seconds": drained,
        "rss_before_kib": rss_before, "rss_after_kib": rss_after, "rss_per_client_kib": per_client,
        "expected": clients, "received": received, "lost": clients - received,
        "broadcast_ms": broadcast_ms, "errors": sum(r["errors"] for r in results),
        "disconnects": sum(r["disconnects"] for r in results),
        "format_ok": _sample_ok(views, f"cs{tag}"),
        "register_cpu": setup_cpu,
        "register_server_cpu_pct": reg_cpu["server_cpu_pct"],
        "register_host_busy_pct": reg_cpu["host_busy_pct"],
        "load_cpu": _cpu_report(results), **cpu, **state, "short": _short(results),
    }


def _await_joined(group: LoadGroup, workers: Sequence[Worker], expected: int,
                  options: Options) -> tuple[int, float]:
    """Poll the load processes until ``expected`` joined notices arrived (or nothing moves)."""
    start = last_change = time.monotonic()
    seen = -1
    while True:
        group.command(workers, "status")
        joined = sum(s["joined"] for s in group.collect(workers, "status", options.timeout))
        now = time.monotonic()
        if joined >= expected or now - last_change > options.stall or now - start > options.timeout:
            return joined, round(now - start, 3)
        if joined != seen:
            seen, last_change = joined, now
        time.sleep(0.02)  # a poll interval, not a wait for an outcome: the loop checks the count


def _short(results: Sequence[dict]) -> list[dict]:
    """The clients that did not get all they expected (a few), empty when all did."""
    return [entry for result in results for entry in result["short"]][:10]


def _server_state(pid: int | None) -> dict[str, Any]:
    return {"server_threads": read_proc_status(pid, "Threads"),
            "server_rss_kib": read_proc_status(pid, "VmRSS")}


def _span(start_ns: int, end_ns: int) -> float | None:
    return round((end_ns - start_ns) / 1e9, 3) if start_ns and end_ns >= start_ns else None


def _ms(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def percentile(runs: Sequence[Sequence[int]], pct: float) -> int | None:
    """The nearest-rank percentile of the values of several sorted runs, without merging them."""
    total = sum(len(r) for r in runs)
    if not total:
        return None
    rank = max(1, math.ceil(pct / 100 * total))  # the rank-th smallest value
    low = min(r[0] for r in runs if len(r))
    high = max(r[-1] for r in runs if len(r))
    while low < high:  # the smallest v with at least `rank` values <= v
        mid = (low + high) // 2
        if sum(bisect.bisect_right(r, mid) for r in runs) >= rank:
            high = mid
        else:
            low = mid + 1
    return low


# --------------------------------------------------------------------------------------------
# Report.

COLUMNS = [
    ("scenario", "scenario", 9), ("clients", "clients", 7), ("expected", "expected", 9),
    ("received", "received", 9), ("lost", "lost", 6), ("seconds", "secs", 7),
    ("deliveries_per_s", "deliv/s", 9), ("p50_ms", "p50 ms", 8), ("p99_ms", "p99 ms", 8),
    ("max_ms", "max ms", 8), ("registrations_per_s", "regs/s", 8),
    ("rss_per_client_kib", "KiB/cl", 7), ("broadcast_ms", "bcast ms", 9),
    ("load_cpu_pct", "load cpu %", 16), ("server_cpu_pct", "server %", 9),
    ("host_busy_pct", "host %", 7),
]


def _cell(result: dict[str, Any], key: str) -> str:
    if key == "clients":
        value = result.get("viewers", result.get("clients"))
    elif key == "load_cpu_pct":
        value = ",".join(f"{p['cpu_pct']:.0f}" for p in result.get("load_cpu", [])
                         if p.get("cpu_pct") is not None)
    else:
        value = result.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a fixed-width table, one row per scenario."""
    rows = [" ".join(title.rjust(width) for _, title, width in COLUMNS)]
    for result in results:
        rows.append(" ".join(_cell(result, key).rjust(width) for key, _, width in COLUMNS))
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Command line.


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-bench",
        description="Load benchmark of the chat server over loopback. Starts a fresh "
                    "chat_server.py per scenario unless --connect is given. Prints a table, "
                    "then one JSON line per scenario.")
    parser.add_argument("--connect", type=_address, metavar="HOST:PORT",
                        help="use a running server instead of starting one (memory: null)")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--procs", type=_positive(int), default=2,
                        help="load processes for the viewers/clients (default 2); the single "
                             "sender of fanout, latency and conns runs in one more")
    parser.add_argument("--fanout-viewers", type=_positive(int), default=100)
    parser.add_argument("--fanout-messages", type=_positive(int), default=20_000)
    parser.add_argument("--fanout-window", type=int, default=0, metavar="N",
                        help="says in flight of the fanout sender (default 0: no limit)")
    parser.add_argument("--all2all-clients", type=_positive(int), default=20)
    parser.add_argument("--all2all-messages", type=_positive(int), default=5_000)
    parser.add_argument("--all2all-window", type=int, default=500, metavar="N",
                        help="says in flight per all2all client, topped up as oks return "
                             "(default 500; 0: all at once)")
    parser.add_argument("--latency-viewers", type=_positive(int), default=100)
    parser.add_argument("--latency-rate", type=_positive(float), default=5_000.0,
                        help="messages per second of the latency sender")
    parser.add_argument("--latency-seconds", type=_positive(float), default=5.0)
    parser.add_argument("--conns", type=_positive(int), default=5_000,
                        help="clients of the conns scenario")
    parser.add_argument("--inflight", type=_positive(int), default=32,
                        help="registrations in flight per load process (conns)")
    parser.add_argument("--timeout", type=_positive(float), default=300.0,
                        help="longest a measured phase may run, seconds")
    parser.add_argument("--stall", type=_positive(float), default=15.0,
                        help="end a phase when nothing arrives for this many seconds")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the started server (repeat), e.g. --quiet")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up exactly like Ctrl-C


def _run_one(name: str, args: argparse.Namespace, options: Options) -> dict[str, Any]:
    sizes = {"fanout": args.fanout_viewers, "all2all": args.all2all_clients,
             "latency": args.latency_viewers, "conns": args.conns}
    server: ServerProcess | None = None
    try:
        if args.connect:
            address, pid = args.connect, None
        else:
            server = ServerProcess(max_clients=sizes[name] + 16, extra_args=args.server_arg)
            address, pid = server.address, server.pid
        if name == "fanout":
            result = run_fanout(address, args.fanout_viewers, args.fanout_messages, options, pid,
                                args.fanout_window)
        elif name == "all2all":
            result = run_all2all(address, args.all2all_clients, args.all2all_messages, options,
                                 pid, args.all2all_window)
        elif name == "latency":
            result = run_latency(address, args.latency_viewers, args.latency_rate,
                                 args.latency_seconds, options, pid)
        else:
            result = run_conns(address, args.conns, options, pid)
        if server is not None:
            result["server_log_lines"] = server.line_count
            result["server_exit"] = server.stop()
        return result
    finally:
        if server is not None:
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios; 0 when all ran, 1 when one failed, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    options = Options(procs=args.procs, timeout=args.timeout, stall=args.stall,
                      inflight=args.inflight)
    raise_fd_limit()  # the started server inherits it: conns needs thousands of sockets
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results: list[dict[str, Any]] = []
    status = 0
    try:
        for name in names:
            try:
                results.append(_run_one(name, args, options))
            except BenchError as error:
                print(f"chat-bench: {name}: {error}", file=sys.stderr)
                results.append({"scenario": name, "error": str(error)})
                status = 1
    except KeyboardInterrupt:
        print("chat-bench: interrupted", file=sys.stderr)
        status = 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if results:
        if not args.json_only:
            print(format_table([r for r in results if "error" not in r]))
        for result in results:
            print(json.dumps(result, separators=(",", ":")))
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
