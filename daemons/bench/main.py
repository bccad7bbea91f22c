"""Benchmark: a private bundle driven flat out; prints a table and one JSON line.

    make bench                                             # what CI and humans run
    .venv/bin/python -m daemons.bench --seconds 20 --warmup 5 --workloads zero,default
    .venv/bin/python -m daemons.bench --workloads zero --py-spy   # + CPU profiles
    .venv/bin/python -m daemons.bench --help               # every option

Everything is private to the run: an embedded PostgreSQL cluster in a temporary
directory on a free port, `migrator up` into one fresh database per phase, then the real
`consumer` and `producer` console scripts as subprocesses (production code paths, INFO
logs to a file as under supervisor). Only these differ from the defaults: the rate
(PRODUCER_RATE at its maximum), the limiter (CONSUMER_RATE_LIMIT out of the way), the
max backlog and max in flight (sized for throughput) and CONSUMER_WORK_SCALE (workload
`zero` = no work, `default` = `value` ms of work, 0-99). `--set VAR=VALUE` changes any
other knob for an experiment; the JSON line records every override.

Per workload (daemons.bench.workload), after `--warmup` seconds, over `--seconds`:
  tasks/s        tasks that reached `done` in the window / window (from the database:
                 `last_update_time` of done rows; a per-second series goes to the chart)
  latency        creation -> done (`last_update_time - creation_time`) p50/p95/p99
  CPU s per 1k   user+system CPU of producer, consumer and the whole PostgreSQL process
                 tree (psutil) over the window, per 1,000 tasks done
  peak RSS       VmHWM of each daemon
  ceiling        on the same database before the daemons start and once they are
                 stopped: one Python process, psycopg, batches of 1,000 through the same
                 three statements on a plain table; ratio = ours / the two runs as one
Each workload then runs again at half the rate it reached (`--no-half-rate` skips it):
the latency target is set there, as creation -> done p99 beyond the task's own work.
Then the single-task RPC figure (daemons.bench.rpc).

Charts (throughput and latency over time, inline SVG) go to profiles/ as
bench-<workload>-<timestamp>.html and bench-latest.html (daemons.bench.report).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from daemons import commit, version
from daemons.bench.options import Options, OptionsError
from daemons.bench.process import HarnessError
from daemons.bench.report import Progress, fmt_table, write_charts
from daemons.bench.rpc import run_rpc
from daemons.bench.run import BenchError, Run, private_run
from daemons.bench.workload import run_workload


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_all(run: Run, opts: Options, stamp: str, progress: Progress) -> dict[str, Any]:
    """Each workload flat out, then at half the rate it reached; then the RPC figure."""
    result: dict[str, Any] = {"workloads": {}}
    for workload in opts.workloads:
        flat_out = run_workload(run, opts, workload, stamp, progress)
        result["workloads"][workload] = flat_out
        if opts.runs_half_rate:
            # The latency target is set at half the maximum rate.
            half = str(max(1, round(flat_out["tasks_per_s"] / 2)))
            name = f"{workload}@half"
            result["workloads"][name] = run_workload(
                run, opts, workload, stamp, progress, rate=half, label=name
            )
    if opts.rpc_seconds > 0:
        result["rpc"] = run_rpc(run, opts, progress, stamp)
    return result


def correctness_failures(result: dict[str, Any]) -> dict[str, Any]:
    return {
        name: w["check"]
        for name, w in result["workloads"].items()
        if w["check"]["double_counted"]
        or w["check"]["lost_processing"]
        or not w["check"]["exit_codes_ok"]
    }


def main(argv: list[str] | None = None) -> int:
    try:
        opts = Options.parse(sys.argv[1:] if argv is None else argv)
    except OptionsError as exc:
        print(f"python -m daemons.bench: error: {exc}", file=sys.stderr)
        return 2
    # Also SIGINT: a shell may start us with it ignored (background job), and Ctrl-C or
    # `kill -INT` must still stop everything this run started.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    opts.out.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    result: dict[str, Any] = {
        "bench": "tasks-daemons",
        "version": version(),
        "commit": commit(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "seconds": opts.seconds,
        "warmup": opts.warmup,
        "workloads": {},
    }
    try:
        with private_run(opts.pg_stats) as run:
            result.update(run_all(run, opts, stamp, progress))
    except KeyboardInterrupt:
        progress.done()
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (BenchError, HarnessError) as exc:
        progress.done()
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    charts = write_charts(result, opts.out, stamp) if result["workloads"] else []
    result["charts"] = [str(p) for p in charts]
    print(fmt_table(result))
    if charts:
        print(f"\ncharts: {', '.join(str(p) for p in charts)}")
    print(json.dumps(result, separators=(",", ":")), flush=True)
    bad = correctness_failures(result)
    if bad:
        print(f"bench: correctness check failed: {bad}", file=sys.stderr)
        return 1
    print("correctness: 0 lost, 0 double-counted, every daemon exited 0", file=sys.stderr)
    return 0
