"""The operating-system side of ``chat-bench``: one clock, CPU and memory readings, limits.

Every bench process (the parent and its load processes) takes its times and CPU figures from
here. Invariant: times cross processes as ``monotonic_ns`` (CLOCK_MONOTONIC, one clock for the
whole machine on Linux); a reading that the platform cannot give is None, never an exception.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any


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


def die_with_parent() -> None:
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
