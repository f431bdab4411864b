"""The scenarios of ``chat-bench``: each runner measures one phase and returns its figures.

Each scenario runner (``run_fanout``, ``run_all2all``, ``run_latency``, ``run_conns``) spawns its
load processes (``chatsuite.bench.load``, through ``chatsuite.bench.group.LoadGroup``), sets them
up, measures one phase and returns a flat dict of figures. Invariant: a runner never leaves a
process behind: it runs its load processes inside a ``LoadGroup``, which ends them on exit.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatsuite.bench.group import Address, BenchError, LoadGroup, Worker
from chatsuite.bench.system import Measure, raise_fd_limit, read_proc_status


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


def _cpu_report(results: Sequence[dict[str, Any]],
                wall_key: tuple[str, str] = ("start_ns", "end_ns")) -> list[dict[str, Any]]:
    report = []
    for result in results:
        wall = (result[wall_key[1]] - result[wall_key[0]]) / 1e9
        report.append({
            "role": result.get("role", "?"), "clients": result.get("clients"),
            "cpu_s": round(result["cpu_s"], 3), "wall_s": round(wall, 3),
            "cpu_pct": round(100 * result["cpu_s"] / wall, 1) if wall > 0 else None,
        })
    return report


def _setup(group: LoadGroup, workers: Sequence[Worker], timeout: float) -> list[dict[str, Any]]:
    group.command(workers, "setup")
    ready = group.collect(workers, "ready", timeout)
    for worker, info in zip(workers, ready, strict=True):
        if info["failed"]:
            raise BenchError(f"{info['failed']} of {worker.clients} {worker.role} clients did not "
                             f"register: {info['errors']}")
    return ready


def _sample_ok(results: Sequence[dict[str, Any]], sender_prefix: str | None) -> bool:
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


def _throughput(results: Sequence[dict[str, Any]],
                first_send_ns: int) -> tuple[float | None, float | None]:
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


def run_fanout(address: Address, viewers: int = 100, messages: int = 20_000,
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
        results = group.collect([*viewer_workers, sender], "done", options.timeout + 30)
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


def run_all2all(address: Address, clients: int = 20, messages: int = 5_000,
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


def run_latency(address: Address, viewers: int = 100, rate: float = 5_000.0,
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
        results = group.collect([*viewer_workers, sender], "done", options.timeout + seconds + 30)
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


def run_conns(address: Address, clients: int = 5_000, options: Options | None = None,
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
        results = group.collect([*workers, sender], "done", options.timeout + 30)
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
                 for w, r in zip(workers, ready, strict=True)]
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


def _short(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
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
