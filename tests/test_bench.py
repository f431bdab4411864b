"""chat-bench: each scenario runs small against the real server and reports sane figures.

No test asserts a speed: only that every message arrived, that the figures exist and are
positive, and that the command line prints one JSON line per scenario.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, ServerProcess, free_port

from chatsuite.bench.cli import format_table
from chatsuite.bench.frames import count_chunk, parse_sample
from chatsuite.bench.scenarios import (
    Options,
    percentile,
    run_all2all,
    run_conns,
    run_fanout,
    run_latency,
)

SMALL = Options(procs=2, timeout=30.0, stall=10.0)


@pytest.fixture
def bench_server(server_process: Callable[..., ServerProcess]) -> ServerProcess:
    """A server subprocess with the rate limit off, as the benchmark starts it."""
    return server_process("--rate", "0", "--max-clients", "200", "--quiet")


def assert_clean(result: dict[str, Any]) -> None:
    """Every expected message arrived, nobody was dropped, no error came back."""
    assert result["expected"] > 0
    assert result["received"] == result["expected"], result
    assert result["lost"] == 0
    assert result["errors"] == 0
    assert result["disconnects"] == 0
    assert result["format_ok"] is True
    assert result["short"] == []
    for proc in result["load_cpu"]:
        # Each load process is one thread: it cannot use more CPU than the time it ran (the
        # 10 ms allow for the clocks' granularity and the rounding to milliseconds).
        assert 0 <= proc["cpu_s"] <= proc["wall_s"] + 0.01, proc


def test_count_chunk_counts_a_kind_cut_across_two_chunks() -> None:
    """A message frame split inside its ``"type":"message"`` key is counted once, in the chunk
    that completes it, and the tail kept is what the next chunk needs."""
    wire = b'{"type":"ok"}\0{"type":"message","text":"a"}\0'
    cut = wire.index(b'message') + 3
    first, second = bytearray(wire[:cut]), bytearray(wire[cut:])
    counts1, frames1, tail = count_chunk(first, len(first), b"")
    assert (counts1, frames1) == ([0, 1, 0, 0, 0], 1)
    assert tail == bytes(first[-15:])
    counts2, frames2, tail = count_chunk(second, len(second), tail)
    assert (counts2, frames2, tail) == ([1, 0, 0, 0, 0], 1, b"")


def test_parse_sample_takes_only_a_whole_message_frame() -> None:
    """The sample is the first message frame wholly inside the chunk; a cut one gives None."""
    data = b'{"type":"ok"}\0{"type":"message","text":"a"}\0'
    assert parse_sample(data, len(data), True) == {"type": "message", "text": "a"}
    assert parse_sample(data[14:], len(data) - 14, False) is None


def test_fanout_small(bench_server: ServerProcess) -> None:
    """Fanout of 200 messages to 5 viewers delivers all 1,000 and reports a positive rate."""
    result = run_fanout(bench_server.address, viewers=5, messages=200, options=SMALL,
                        server_pid=bench_server.proc.pid)
    assert_clean(result)
    assert result["expected"] == 1000
    assert result["acks"] == 200
    assert result["deliveries_per_s"] > 0 and result["seconds"] > 0
    assert [p["role"] for p in result["load_cpu"]] == ["viewers", "viewers", "sender"]
    assert result["server_cpu_s"] is not None and result["server_threads"] > 0


def test_fanout_with_window(bench_server: ServerProcess) -> None:
    """A fanout sender limited to 50 says in flight still delivers every message."""
    result = run_fanout(bench_server.address, viewers=3, messages=300, options=SMALL,
                        window=50)
    assert_clean(result)
    assert result["expected"] == 900 and result["acks"] == 300


def test_all2all_small(bench_server: ServerProcess) -> None:
    """Three clients saying 100 each, all viewing, each receive the other two's 200."""
    result = run_all2all(bench_server.address, clients=3, messages=100, options=SMALL,
                         window=40)
    assert_clean(result)
    assert result["expected"] == 600
    assert result["acks"] == 300
    assert result["deliveries_per_s"] > 0


def test_latency_small(bench_server: ServerProcess) -> None:
    """A 500/s sender for 0.5 s reaches 3 viewers, and every delivery has a latency."""
    result = run_latency(bench_server.address, viewers=3, rate=500, seconds=0.5,
                         options=SMALL)
    assert_clean(result)
    assert result["messages"] == 250 and result["expected"] == 750
    assert result["samples"] == 750
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["send_seconds"] > 0


def test_conns_small(bench_server: ServerProcess) -> None:
    """Fifty viewers register, hear every joined notice and one broadcast; memory is measured."""
    result = run_conns(bench_server.address, clients=50, options=SMALL,
                       server_pid=bench_server.proc.pid)
    assert_clean(result)
    assert result["expected"] == 50
    assert result["joined_received"] == result["joined_expected"] == 50 * 49 // 2
    assert result["registrations_per_s"] > 0
    assert result["broadcast_ms"] is not None and result["broadcast_ms"] > 0
    assert result["rss_before_kib"] > 0 and result["rss_after_kib"] > 0
    per_client = (result["rss_after_kib"] - result["rss_before_kib"]) / 50
    assert result["rss_per_client_kib"] == round(per_client, 1)


def test_conns_without_server_pid_reports_null_memory(bench_server: ServerProcess) -> None:
    """Against a server the bench did not start, memory per client is null, not a guess."""
    result = run_conns(bench_server.address, clients=10, options=SMALL)
    assert_clean(result)
    assert result["rss_per_client_kib"] is None


def test_percentile_of_sorted_runs_matches_merged_list() -> None:
    """The nearest-rank percentile over several sorted runs equals that of their merge."""
    runs = [[1, 5, 9, 12], [2, 3, 40], [7]]
    merged = sorted(v for run in runs for v in run)
    for pct in (1, 50, 90, 99, 100):
        rank = max(1, -(-pct * len(merged) // 100))
        assert percentile(runs, pct) == merged[rank - 1]
    assert percentile([[], []], 50) is None


def test_cli_runs_every_scenario_and_prints_json_lines(tmp_path: Path) -> None:
    """`chat-bench --scenario all` with tiny sizes prints a table and four clean JSON lines."""
    command = [
        sys.executable, "-m", "chatsuite.bench.cli", "--scenario", "all",
        # A store file of the test's own (the servers' default would be one in the checkout).
        "--server-arg=--store", f"--server-arg={tmp_path / 'bench.db'}",
        "--fanout-viewers", "5", "--fanout-messages", "200",
        "--all2all-clients", "3", "--all2all-messages", "100",
        "--latency-viewers", "3", "--latency-rate", "500", "--latency-seconds", "0.5",
        "--conns", "50", "--timeout", "30", "--stall", "10",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["scenario", "clients", "expected"]
    results = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["scenario"] for r in results] == ["fanout", "all2all", "latency", "conns"]
    for result in results:
        assert_clean(result)
        assert result["server_exit"]["code"] == 0
    conns = results[3]
    assert conns["rss_per_client_kib"] == round(
        (conns["rss_after_kib"] - conns["rss_before_kib"]) / conns["clients"], 1)
    assert format_table(results).count("\n") == 4


def test_cli_reports_an_unreachable_server() -> None:
    """`--connect` to a closed port ends with exit code 1 and an error line, not a traceback."""
    command = [sys.executable, "-m", "chatsuite.bench.cli", "--scenario", "fanout",
               "--connect", f"127.0.0.1:{free_port()}", "--fanout-viewers", "2",
               "--fanout-messages", "10", "--timeout", "10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["scenario"] == "fanout"
