"""The single-task RPC figure: a consumer alone, N concurrent unary `Submit` calls with
tasks of id 0, from h2load (nghttp2's C load generator, when on PATH) or else
`daemons.bench.rpc_load` (Python, grpc.aio; it needs about as much CPU per call as the
consumer, which on two cores it takes from the consumer and PostgreSQL).

    run_rpc(run, opts, progress, stamp)
      start_h2load / start_python   the generators, measuring on their own clocks
      sample_cpu                    CPU every 0.2 s until they are done
      read_h2load / read_python     calls, latencies, the window (wall time), codes
      rpc_figures                   calls/s, OK calls/s, latency, CPU per 1k calls
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from daemons.bench import profile, rpc_load
from daemons.bench.cluster import clean_env
from daemons.bench.measure import CpuSnapshot, one, percentiles_ms
from daemons.bench.options import ROOT, Options
from daemons.bench.process import BIN, Daemon
from daemons.bench.report import Progress
from daemons.bench.run import BenchError, Run
from daemons.bench.scrape import metric_sum, metrics_url
from daemons.bench.workload import HIGH_LIMIT

RPC_TYPE_WARMUP, RPC_TYPE_MEASURED = 1, 2  # h2load: tells the window's rows apart

Generators = list[tuple[subprocess.Popen[bytes], Path]]  # (process, its log or latencies)


def rpc_generator(choice: str) -> tuple[str, str | None]:
    """(generator, h2load's path when it is the one)."""
    h2load = shutil.which("h2load") if choice in ("auto", "h2load") else None
    if choice == "h2load" and h2load is None:
        raise BenchError("--rpc-generator h2load: h2load is not on PATH (Debian: nghttp2-client)")
    return ("h2load", h2load) if h2load else ("python", None)


def start_h2load(
    run: Run, opts: Options, h2load: str, target: str, progress: Progress
) -> Generators:
    """Warm-up with one task type, measure with another: the database then says exactly
    which measured calls succeeded (h2load sees HTTP 200, not grpc-status)."""

    def command(name: str, task_type: int, seconds: float, log: str | None) -> list[str]:
        body = run.tmp / f"rpc-{name}.bin"
        body.write_bytes(rpc_load.grpc_frame(task_type, 42))
        return rpc_load.h2load_command(
            h2load, target, str(body), seconds, opts.rpc_concurrency, opts.rpc_procs, log
        )

    if opts.rpc_warmup > 0:
        progress.show("[rpc] warm-up (h2load)")
        warm = subprocess.run(
            command("warmup", RPC_TYPE_WARMUP, opts.rpc_warmup, None),
            capture_output=True,
            timeout=opts.rpc_warmup + 60,
        )
        if warm.returncode != 0:
            raise BenchError(f"h2load failed:\n{warm.stdout.decode()}{warm.stderr.decode()}")
    log_path = run.tmp / "rpc-h2load.log"
    gen = subprocess.Popen(
        command("measured", RPC_TYPE_MEASURED, opts.rpc_seconds, str(log_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    run.others.append(gen)
    return [(gen, log_path)]


def start_python(run: Run, opts: Options, target: str) -> Generators:
    gens: Generators = []
    for i in range(opts.rpc_procs):
        lat_path = run.tmp / f"rpc-lat-{i}.bin"
        gen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemons.bench.rpc_load",
                "--target",
                target,
                "--concurrency",
                str(opts.rpc_concurrency),
                "--warmup",
                str(opts.rpc_warmup),
                "--seconds",
                str(opts.rpc_seconds),
                "--latencies",
                str(lat_path),
            ],
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        run.others.append(gen)
        gens.append((gen, lat_path))
    return gens


def sample_cpu(
    run: Run, opts: Options, consumer: Daemon, gens: Generators, what: str, progress: Progress
) -> list[tuple[float, CpuSnapshot]]:
    """The generators measure on their own clocks and report their window (wall time):
    sample CPU every 0.2 s meanwhile, to keep the samples that bracket that window."""
    pids = {"consumer": consumer.pid, **{f"gen{i}": g.pid for i, (g, _) in enumerate(gens)}}
    samples: list[tuple[float, CpuSnapshot]] = []
    begin = time.monotonic()
    limit = begin + opts.rpc_warmup + opts.rpc_seconds + 60
    while any(g.poll() is None for g, _ in gens):
        if time.monotonic() > limit:
            raise BenchError("RPC load generator did not finish")
        consumer.check()
        samples.append((time.time(), CpuSnapshot.take(pids, {"postgres": run.pg_pid})))
        progress.show(f"[rpc] {time.monotonic() - begin:3.0f} s ({what})")
        time.sleep(0.2)
    progress.done()
    return samples


@dataclass
class Calls:
    """What the generators measured: every call's latency (s) and the window (wall)."""

    latencies: array[float]
    t0: float
    t1: float
    codes: dict[str, int] = field(default_factory=dict)
    not_200: int = 0


def read_h2load(gens: Generators) -> Calls:
    gen, log_path = gens[0]
    out, err = gen.communicate(timeout=10)
    if gen.returncode != 0 or not log_path.exists():
        raise BenchError(f"h2load failed:\n{out.decode()}{err.decode()}")
    latencies, t0, t1, not_200 = rpc_load.read_h2load_log(str(log_path))
    return Calls(array("d", latencies), t0, t1, not_200=not_200)


def read_python(gens: Generators) -> Calls:
    lat = array("d")
    reports = []
    for gen, lat_path in gens:
        out, err = gen.communicate(timeout=10)
        if gen.returncode != 0:
            raise BenchError(f"RPC load generator failed:\n{err.decode(errors='replace')}")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
        lat.frombytes(lat_path.read_bytes())
    codes: dict[str, int] = {}
    for r in reports:
        for code, n in r["codes"].items():
            codes[code] = codes.get(code, 0) + n
    return Calls(lat, min(r["t0_wall"] for r in reports), max(r["t1_wall"] for r in reports), codes)


def h2load_codes(calls: Calls, url: str) -> dict[str, int]:
    """Calls still in flight when h2load stopped may have registered rows it did not
    log: count no more OK calls than it measured."""
    with psycopg.connect(url, autocommit=True) as conn:
        measured = one(conn, "SELECT count(*) FROM tasks WHERE type = %s", (RPC_TYPE_MEASURED,))
    n = len(calls.latencies)
    ok = min(n, int(measured))
    codes = {"OK": ok}
    if n - ok:
        codes["not OK (grpc-status)"] = n - ok
    if calls.not_200:
        codes["HTTP status not 200"] = calls.not_200
    return codes


def run_rpc(run: Run, opts: Options, progress: Progress, stamp: str) -> dict[str, Any]:
    generator, h2load = rpc_generator(opts.rpc_generator)
    bundle = run.phase("rpc")
    knobs = {
        "CONSUMER_RATE_LIMIT": HIGH_LIMIT,
        "CONSUMER_MAX_IN_FLIGHT": str(opts.max_in_flight),
        "CONSUMER_WORK_SCALE": "0",
        **{k: v for k, v in opts.overrides.items() if k.startswith("CONSUMER_")},
    }
    consumer = bundle.consumer(**knobs)
    target = consumer.env["CONSUMER_LISTEN"]
    if h2load is not None:
        gens = start_h2load(run, opts, h2load, target, progress)
        spy_seconds = opts.rpc_seconds
    else:
        gens = start_python(run, opts, target)
        spy_seconds = opts.rpc_warmup + opts.rpc_seconds
    spies: profile.Spies = {}
    if opts.py_spy:  # the same steady load throughout, once the channels are up
        folded = opts.out / f"bench-rpc-consumer-{stamp}.folded.txt"
        spy = profile.start_record(BIN / "py-spy", consumer.pid, spy_seconds, folded)
        run.others.append(spy)
        spies["consumer"] = (spy, folded)
    samples = sample_cpu(run, opts, consumer, gens, generator, progress)
    calls = read_h2load(gens) if h2load is not None else read_python(gens)
    if not samples or not calls.latencies:
        raise BenchError("RPC load generators ended before any measurement")
    prof = profile.finish(spies, spy_seconds, "single-task Submit RPC", stamp)
    port = consumer.env["CONSUMER_METRICS_PORT"]
    batch_size = "consumer_db_batch_size_count"
    statements = {
        "register": metric_sum(metrics_url(port), batch_size, transition="processing"),
        "done": metric_sum(metrics_url(port), batch_size, transition="done"),
    }
    exit_code = consumer.stop()
    with psycopg.connect(bundle.db_url, autocommit=True) as conn:
        registered = int(
            one(
                conn,
                "SELECT count(*) FROM tasks WHERE creation_time >= %s AND creation_time < %s",
                (calls.t0, calls.t1),
            )
        )
    codes = h2load_codes(calls, bundle.db_url) if h2load is not None else calls.codes
    run.end_phase(bundle)
    return {
        "generator": generator,
        **rpc_figures(opts, calls, codes, samples, registered),
        "consumer_exit_code": exit_code,
        "statements": statements,
        **({"profile": prof} if prof else {}),
        "settings": knobs,
    }


def rpc_figures(
    opts: Options,
    calls: Calls,
    codes: dict[str, int],
    samples: list[tuple[float, CpuSnapshot]],
    registered: int,
) -> dict[str, Any]:
    """Calls/s, OK calls/s and latency over the generators' window; CPU from the two
    samples that bracket it."""
    first = next((s for s in samples if s[0] >= calls.t0), samples[0])
    last = next((s for s in reversed(samples) if s[0] <= calls.t1), samples[-1])
    span = max(last[0] - first[0], 1e-6)
    cpu = last[1].minus(first[1])
    ok_per_s = codes.get("OK", 0) / opts.rpc_seconds
    return {
        "calls_per_s": len(calls.latencies) / opts.rpc_seconds,
        "ok_per_s": ok_per_s,
        "latency_ms": percentiles_ms(calls.latencies),
        "codes": codes,
        "concurrency": opts.rpc_concurrency * opts.rpc_procs,
        "generator_procs": opts.rpc_procs,
        "seconds": opts.rpc_seconds,
        "db_registered_per_s": registered / max(calls.t1 - calls.t0, 1e-6),
        "cpu_s_per_1k_calls": {
            n: cpu[n] / span / max(ok_per_s, 1e-6) * 1000 for n in ("consumer", "postgres")
        },
        "cpu_cores": {
            "consumer": cpu["consumer"] / span,
            "postgres": cpu["postgres"] / span,
            "generators": sum(v for n, v in cpu.items() if n.startswith("gen")) / span,
            "other": cpu["other"] / span,
        },
    }
