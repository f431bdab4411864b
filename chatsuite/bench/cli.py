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

The work is split by job, in ``chatsuite/bench/``: ``load`` is the load process (its epoll
loop), ``frames`` its frame counting, ``group`` the load process groups and the server
subprocess, ``scenarios`` the four scenario runners, ``system`` the clock and the CPU and memory
readings; this module is the command line and the report.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from chatsuite.bench.group import BenchError, ServerProcess
from chatsuite.bench.scenarios import (
    Options,
    run_all2all,
    run_conns,
    run_fanout,
    run_latency,
)
from chatsuite.bench.system import raise_fd_limit

SCENARIOS = ("fanout", "all2all", "latency", "conns")


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


def _addresses(text: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]``: one server, or the nodes of one cluster."""
    return [_address(part) for part in text.split(",") if part]


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
    parser.add_argument("--connect", type=_addresses, metavar="HOST:PORT[,HOST:PORT...]",
                        help="use running servers instead of starting one; with several (the "
                             "nodes of one cluster) the clients are spread over them in turn "
                             "(memory: null)")
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
