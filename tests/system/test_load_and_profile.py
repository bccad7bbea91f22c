"""Locust (loadtest/) against a real consumer, and live profiles of that consumer under
load through the Makefile targets (loadtest/profile.sh)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from daemons.bench.scrape import metric_sum
from tests.conftest import BIN, ROOT, free_port, need
from tests.system.harness import Bundle, Supervisor, wait_until

LOCUST_TIMEOUT_S = 60


def _metric(bundle: Bundle, name: str) -> float:
    return metric_sum(bundle.metrics_url("consumer"), name) or 0.0


def _locust(bundle: Bundle, out: Path, run_time: str, port: int | None = None) -> subprocess.Popen:  # type: ignore[type-arg]
    """A headless Locust run on loopback, CSV stats in `out`/locust_stats.csv."""
    out.mkdir(exist_ok=True)
    argv = [
        str(BIN / "locust"),
        "-f",
        str(ROOT / "loadtest"),
        "--headless",
        "-u",
        "5",
        "-r",
        "5",
        "-t",
        run_time,
        "--host",
        f"127.0.0.1:{port or bundle.grpc_port}",
        "--csv",
        str(out / "locust"),
        "--only-summary",
    ]
    log = open(out / "locust.log", "wb")
    return subprocess.Popen(argv, cwd=out, env=bundle.env(), stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, out: Path) -> tuple[int, dict[tuple[str, str], dict[str, str]]]:  # type: ignore[type-arg]
    rc = proc.wait(LOCUST_TIMEOUT_S)
    with open(out / "locust_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    return rc, rows


def _count(rows: dict[tuple[str, str], dict[str, str]], kind: str, name: str) -> int:
    row = rows.get((kind, name))
    return int(row["Request Count"]) if row else 0


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=90
    )


def test_locust_load_is_all_received_by_the_consumer(bundle: Bundle, tmp_path: Path) -> None:
    bundle.consumer(CONSUMER_RATE_LIMIT="1000000", CONSUMER_WORK_SCALE="0.1")
    before = _metric(bundle, "tasks_received_total")
    rc, rows = _finish(_locust(bundle, tmp_path, "4s"), tmp_path)
    log = (tmp_path / "locust.log").read_text()
    assert rc == 0, log
    assert _count(rows, "grpc", "Submit") > 0 and _count(rows, "grpc", "SubmitBatch") > 0, rows
    assert rows[("", "Aggregated")]["Failure Count"] == "0", log
    accepted = _count(rows, "task", "accepted")
    assert accepted > _count(rows, "grpc", "Submit"), "batches carry many tasks each"
    assert _metric(bundle, "tasks_received_total") - before >= accepted


def test_refusals_are_not_errors_but_real_errors_fail_the_run(
    bundle: Bundle, tmp_path: Path
) -> None:
    bundle.consumer(CONSUMER_RATE_LIMIT="50", CONSUMER_WORK_SCALE="0")
    limited = _locust(bundle, tmp_path / "limited", "3s")
    # Nothing listens on this port: every RPC fails UNAVAILABLE.
    down = _locust(bundle, tmp_path / "down", "2s", port=free_port())
    rc, rows = _finish(limited, tmp_path / "limited")
    assert rc == 0, (tmp_path / "limited" / "locust.log").read_text()
    refused = _count(rows, "grpc", "Submit (refused)") + _count(rows, "task", "rate limited")
    assert refused > 0 and rows[("", "Aggregated")]["Failure Count"] == "0", rows
    # Judged from the run's own verdict line: Locust's CSV of a run whose every call
    # failed at once is sometimes written before its stats are (0 requests shown).
    rc = down.wait(LOCUST_TIMEOUT_S)
    verdict = re.search(
        r"loadtest_result rpcs=(\d+) failed=(\d+) .* (ok|FAILED)",
        (tmp_path / "down" / "locust.log").read_text(),
    )
    assert verdict, (tmp_path / "down" / "locust.log").read_text()[-2000:]
    rpcs, failed, word = int(verdict[1]), int(verdict[2]), verdict[3]
    assert rc == 1 and word == "FAILED" and failed == rpcs > 0, verdict[0]


def test_live_profiles_of_a_loaded_consumer(bundle: Bundle, tmp_path: Path) -> None:
    need(shutil.which("make") is not None, "make is not installed")
    for tool in ("py-spy", "memray"):
        need((BIN / tool).exists(), f"{tool} is not installed in the venv (make venv)")
    need(
        bool(shutil.which("gdb") or shutil.which("lldb")),
        "memray attach needs gdb or lldb (apt-get install gdb lldb)",
    )
    consumer = bundle.consumer(CONSUMER_WORK_SCALE="0.1")
    locust = _locust(bundle, tmp_path / "locust", f"{LOCUST_TIMEOUT_S - 10}s")
    try:
        wait_until(lambda: _metric(bundle, "tasks_received_total") > 0, 20, "Locust load arrives")
        out = tmp_path / "profiles"
        make = _make(
            "consumer_profiles",
            f"PID={consumer.pid}",
            "SECONDS=2",
            f"OUT={out}",
            f"PROFILING_PORT={bundle.ports['CONSUMER_PROFILING_PORT']}",
        )
    finally:
        locust.terminate()
        locust.wait(LOCUST_TIMEOUT_S)
    report = make.stdout + make.stderr
    need(make.returncode != 3, f"cannot attach to a process here:\n{report}")
    assert make.returncode == 0, report

    def latest(kind: str, ext: str) -> Path:
        path = out / f"consumer-{kind}-latest.{ext}"
        stamped = list(out.glob(f"consumer-{kind}-2*.{ext}"))
        assert path.exists() and len(stamped) == 1, sorted(out.iterdir())
        assert path.read_bytes() == stamped[0].read_bytes()
        return path

    svg = ET.parse(latest("cpu", "svg")).getroot()
    assert svg.tag.endswith("svg") and len(list(svg.iter())) > 20
    speedscope = json.loads(latest("cpu", "speedscope.json").read_text())
    assert "speedscope" in speedscope["$schema"] and speedscope["profiles"]
    assert latest("heap", "bin").stat().st_size > 0
    html = latest("heap", "html").read_text()
    assert "<html" in html and "packed_data" in html
    assert "Total allocations" in latest("heap", "txt").read_text()
    stacks = latest("stacks", "txt").read_text()
    assert "MainThread" in stacks  # py-spy's view of the threads
    for task in ("done-writer", "processing-writer"):  # the daemon's own asyncio dump
        assert f"--- task {task}" in stacks
    assert consumer.popen.poll() is None, "the consumer survived being profiled"


def test_profile_targets_take_the_pid_from_supervisorctl(bundle: Bundle, tmp_path: Path) -> None:
    need(shutil.which("make") is not None, "make is not installed")
    sup = Supervisor(bundle, PRODUCER_RATE="50")
    try:
        sup.wait_running("consumer")
        out = tmp_path / "profiles"
        ctl = f"{BIN / 'supervisorctl'} -c {sup.conf}"
        port = bundle.ports["CONSUMER_PROFILING_PORT"]
        make = _make(
            "consumer_goroutine", f"SUPERVISORCTL={ctl}", f"OUT={out}", f"PROFILING_PORT={port}"
        )
        report = make.stdout + make.stderr
        need(make.returncode != 3, f"cannot attach to a process here:\n{report}")
        assert make.returncode == 0, report
        stacks = (out / "consumer-stacks-latest.txt").read_text()
        assert stacks.startswith(f"# consumer pid {sup.pid('consumer')} ")
        assert "--- task done-writer" in stacks
        # A daemon that is not running is named as such, with what to do.
        sup.ctl("stop", "producer", check=True)
        make = _make("producer_stacks", f"SUPERVISORCTL={ctl}", f"OUT={out}")
        assert make.returncode != 0 and "no running producer" in make.stderr, make.stderr
    finally:
        sup.close()
