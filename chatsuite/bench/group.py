"""The processes a ``chat-bench`` scenario runs: its load processes and the server subprocess.

Invariant: nothing is left behind. ``LoadGroup`` stops every load process on exit, politely then
by force, and ``ServerProcess.stop`` ends the server (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Self

from chatsuite.bench.load import worker_main
from chatsuite.bench.system import die_with_parent

PROJECT_ROOT = Path(__file__).resolve().parents[2]

Address = Any
"""A ``(host, port)`` pair, or a list of them: the nodes of one cluster, used in turn."""


class BenchError(Exception):
    """The benchmark could not run (server did not start, a load process failed or timed out)."""


@dataclass
class Worker:
    """A load process as the parent sees it."""

    process: multiprocessing.process.BaseProcess
    ctrl: Connection
    role: str
    clients: int


class LoadGroup:
    """The load processes of one scenario; closing it ends every one of them."""

    def __init__(self, address: Address, inflight: int = 32) -> None:
        # One server, or several nodes of one cluster that the clients are spread over.
        self.addresses = [address] if isinstance(address[0], str) else list(address)
        self.assigned = 0  # clients given to load processes so far
        self.inflight = inflight
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.context: Any = multiprocessing.get_context(method)
        self.workers: list[Worker] = []

    def spawn(self, role: str, names: Sequence[str], **spec: Any) -> Worker:
        """Start one load process for these client names (not connected until ``setup``)."""
        parent_end, child_end = self.context.Pipe()
        full = dict(spec, role=role, names=list(names), addresses=self.addresses,
                    first=self.assigned, inflight=self.inflight)
        self.assigned += len(names)
        process = self.context.Process(
            target=worker_main, args=(child_end, full), name=f"chat-bench-{role}", daemon=True
        )
        process.start()
        child_end.close()
        worker = Worker(process, parent_end, role, len(names))
        self.workers.append(worker)
        return worker

    def command(self, workers: Iterable[Worker], command: str, **params: Any) -> None:
        for worker in workers:
            worker.ctrl.send((command, params))

    def collect(self, workers: Sequence[Worker], kind: str, timeout: float) -> list[dict[str, Any]]:
        """One ``kind`` reply from each worker, in order; BenchError on death, error or timeout."""
        replies: dict[int, dict[str, Any]] = {}
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
        return int(probe.getsockname()[1])


class ServerProcess:
    """The server (``python -m chat_server``) as a subprocess on a free loopback port, its
    output drained."""

    def __init__(self, max_clients: int, extra_args: Sequence[str] = (),
                 start_timeout: float = 15.0) -> None:
        self.port = free_port()
        self.address = ("127.0.0.1", self.port)
        # The checkout (or install) that holds this package holds chat_server too.
        path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        command = [sys.executable, "-m", "chat_server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--rate", "0", "--max-clients", str(max_clients),
                   *extra_args]
        if "--store" not in extra_args:
            command += ["--store", "none"]  # no chat-suite.db left in the working directory
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            # Only a prctl call runs between fork and exec, so the thread caveat does not bite.
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
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
