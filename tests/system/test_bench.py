"""The benchmark command in miniature: its own PostgreSQL, the real daemons, the
ceiling and the single-task RPC figure, for a couple of seconds each. Figures are not
asserted (benchmarks print figures, they are not timed tests); the report's shape is."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, need


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemons.bench", *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        capture_output=True,
        text=True,
        timeout=100,
    )


def report_of(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert not any(line.startswith("{") for line in lines[:-1]), "exactly one JSON line"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def test_bench_prints_one_json_line_with_positive_figures(tmp_path: Path) -> None:
    out = tmp_path / "profiles"
    run = bench(
        "--seconds",
        "2",
        "--warmup",
        "1",
        "--workloads",
        "zero",
        "--ceiling-seconds",
        "0.5",
        "--rpc-seconds",
        "1",
        "--rpc-warmup",
        "0.5",
        "--rpc-concurrency",
        "8",
        "--rpc-generator",
        "python",
        "--minute-rows",
        "--row-seconds",
        "0.9",
        "--set",
        "TASKS_RETENTION=1h",
        "--out",
        str(out),
    )
    report = report_of(run)
    assert "tasks/s end to end" in run.stdout  # the human table came first
    # The soak's rows: printed as each ends, then in the table with first-vs-last ratios.
    assert run.stderr.count("p99>work ms") >= 1 and "per minute, workload zero" in run.stdout

    zero = report["workloads"]["zero"]
    assert zero["tasks_per_s"] > 0 and zero["done_in_window"] > 0
    for p in ("p50", "p95", "p99"):
        assert zero["latency_ms"][p] > 0
    assert zero["latency_ms"]["p50"] <= zero["latency_ms"]["p99"]
    for daemon in ("producer", "consumer", "postgres"):
        assert zero["cpu_s_per_1k"][daemon] > 0, daemon
    for daemon in ("producer", "consumer"):
        assert zero["peak_rss_mb"][daemon] > 0, daemon
    assert zero["exit_codes"] == {"producer": 0, "consumer": 0}
    assert zero["check"] == {"double_counted": 0, "lost_processing": 0, "exit_codes_ok": True}
    assert zero["ceiling"]["tasks_per_s"] > 0
    # the yardstick ran on both sides of the window, and the ratio is to the two as one
    before, after = zero["ceiling"]["before_tasks_per_s"], zero["ceiling"]["after_tasks_per_s"]
    assert before > 0 and after > 0
    assert 0.99 * min(before, after) <= zero["ceiling"]["tasks_per_s"] <= 1.01 * max(before, after)
    assert zero["ratio_to_ceiling"] > 0
    assert zero["settings"]["CONSUMER_WORK_SCALE"] == "0"
    assert zero["settings"]["TASKS_RETENTION"] == "1h"
    rows = zero["minutes"]
    assert len(rows) >= 2 and all(r["tasks_per_s"] > 0 and r["db_size_mb"] > 0 for r in rows)
    assert all(r["partitions"] >= 1 and r["pg_cpu_s_per_1k"] > 0 for r in rows)
    assert zero["minutes_first_vs_last"]["tasks_per_s"]["ratio"] > 0
    # Each row has the daemons' RSS, and the edges compare it like the other figures.
    assert all(r["producer_rss_mb"] > 0 and r["consumer_rss_mb"] > 0 for r in rows)
    assert zero["minutes_first_vs_last"]["consumer_rss_mb"]["ratio"] > 0

    # No work: nothing to subtract from the latency.
    assert abs(zero["latency_ms"]["p99_beyond_work"] - zero["latency_ms"]["p99"]) < 0.01
    assert zero["rate_offered"] == "1000000"

    # The same workload again at half the rate it reached: the latency target's condition.
    half = report["workloads"]["zero@half"]
    assert half["rate_offered"] == str(max(1, round(zero["tasks_per_s"] / 2)))
    assert half["settings"]["PRODUCER_RATE"] == half["rate_offered"]
    assert half["done_in_window"] > 0
    assert half["check"] == {"double_counted": 0, "lost_processing": 0, "exit_codes_ok": True}
    assert "ceiling" not in half
    assert "zero@half" in run.stdout

    rpc = report["rpc"]
    assert rpc["generator"] == "python"
    assert rpc["ok_per_s"] > 0 and rpc["latency_ms"]["p99"] > 0
    assert rpc["codes"].get("OK", 0) > 0
    assert rpc["consumer_exit_code"] == 0

    charts = [Path(p) for p in report["charts"]]
    assert (out / "bench-latest.html") in charts
    assert all(p.is_file() and "<svg" in p.read_text() for p in charts)


def test_bench_rpc_figure_with_h2load_counts_only_calls_the_database_recorded() -> None:
    """h2load sees HTTP 200 even for a failed call (the gRPC status is a trailer): the
    bench counts a call as OK only when its row is in the database."""
    need(shutil.which("h2load") is not None, "h2load not installed (Debian: nghttp2-client)")
    run = bench(
        "--workloads",
        "none",
        "--rpc-seconds",
        "1.5",
        "--rpc-warmup",
        "0.5",
        "--rpc-concurrency",
        "8",
        "--rpc-generator",
        "h2load",
    )
    rpc = report_of(run)["rpc"]
    assert rpc["generator"] == "h2load"
    calls = round(rpc["calls_per_s"] * rpc["seconds"])
    ok = round(rpc["ok_per_s"] * rpc["seconds"])
    assert ok > 0 and rpc["codes"] == {"OK": ok}
    assert ok == calls  # every measured call registered exactly one task
    assert 0 < rpc["latency_ms"]["p50"] <= rpc["latency_ms"]["p99"]
    assert rpc["consumer_exit_code"] == 0
    assert "generator h2load" in run.stdout
