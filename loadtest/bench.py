"""Benchmark: a private bundle driven flat out; prints a table and one JSON line.

    make bench                                             # what CI and humans run
    .venv/bin/python -m loadtest.bench --seconds 20 --warmup 5 --workloads zero,default
    .venv/bin/python -m loadtest.bench --workloads zero --py-spy   # + CPU profiles

Everything is private to the run: an embedded PostgreSQL cluster in a temporary
directory on a free port, `migrator up` into one fresh database per phase, then the real
`consumer` and `producer` console scripts as subprocesses (production code paths, INFO
logs to a file as under supervisor). Only these differ from the defaults: the rate
(PRODUCER_RATE at its maximum), the limiter (CONSUMER_RATE_LIMIT out of the way), the
max backlog and max in flight (sized for throughput) and CONSUMER_WORK_SCALE (workload
`zero` = no work, `default` = `value` ms of work, 0-99). `--set VAR=VALUE` changes any
other knob for an experiment; the JSON line records every override.

Per workload, after `--warmup` seconds, over a window of `--seconds`:
  tasks/s        tasks that reached `done` in the window / window (from the database:
                 `last_update_time` of done rows; a per-second series goes to the chart)
  latency        creation -> done (`last_update_time - creation_time`) p50/p95/p99
  CPU s per 1k   user+system CPU of producer, consumer and the whole PostgreSQL process
                 tree (psutil) over the window, per 1,000 tasks done
  peak RSS       VmHWM of each daemon
  ceiling        on the same database once the daemons are stopped: one Python process,
                 psycopg, batches of 1,000 through the same three statements
                 (insert_batch, mark_processing, mark_done), one commit each; ratio = ours
                 / ceiling
Each workload then runs again at half the rate it reached (`--no-half-rate` skips it):
the latency target is set there, as creation -> done p99 beyond the task's own work.
Then the single-task RPC figure: a consumer alone, N concurrent unary `Submit` calls
with tasks of id 0, from h2load (nghttp2's C load generator, when on PATH) or else
`loadtest.bench_rpc` (Python, grpc.aio; it needs about as much CPU per call as the
consumer, which on two cores it takes from the consumer and PostgreSQL).

Charts (throughput and latency over time, inline SVG) go to profiles/ as
bench-<workload>-<timestamp>.html and bench-latest.html. Every process started is
stopped at the end, also on Ctrl-C or error (PostgreSQL included).

Imports stay light at module level: Locust imports every file of this directory.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemons.bench.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_OUT = ROOT / "profiles"

WORKLOADS = {"zero": "0", "default": "1"}  # CONSUMER_WORK_SCALE
MAX_RATE = "1000000"  # PRODUCER_RATE's upper bound
HIGH_LIMIT = "1000000000"  # CONSUMER_RATE_LIMIT: never the limit
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class BenchError(Exception):
    pass


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- processes ------------------------------------------------------------------------


def stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal, wait (bounded), then kill. Returns the exit code (None-safe)."""
    if proc is None:
        return 0
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


@dataclass
class Daemon:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")

    def wait_ready(
        self, event: str, probe: Callable[[], bool], timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Until the start-up log line appears or, with logs above INFO, `probe` says so."""
        deadline = time.monotonic() + timeout_s
        needle = f" {event}"
        while time.monotonic() < deadline:
            if needle in self.log_path.read_text(errors="replace") or probe():
                return
            self.check()
            time.sleep(0.05)
        raise BenchError(f"{self.name}: not ready after {timeout_s:.0f}s:\n{self.log_tail()}")


def consumer_serving(target: str) -> Callable[[], bool]:
    def probe() -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    return probe


def metric_positive(port: str, name: str) -> Callable[[], bool]:
    def probe() -> bool:
        value = scrape_sum(port, name)
        return value is not None and value > 0

    return probe


@dataclass
class Cluster:
    """The private PostgreSQL (daemons.bench.cluster, as the tests use) with one database
    per phase, and the daemons and helper processes a run started."""

    tmp: Path
    pg_stats: bool = False
    daemons: list[Daemon] = field(default_factory=list)
    others: list[subprocess.Popen[Any]] = field(default_factory=list)
    pg: Any = None

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return None if self.pg is None else self.pg.popen

    def start(self) -> None:
        from daemons.bench.cluster import PrivatePostgres

        self.pg = PrivatePostgres(self.tmp)
        self._launch()
        if self.pg_stats:
            import psycopg

            with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            self.pg.stop()
            self._launch()

    def _launch(self) -> None:
        from daemons.bench.cluster import PostgresDidNotStart

        # initdb and the single-user step inherit our stderr and chat on it (LOG lines):
        # send them to the cluster's log instead.
        try:
            with quiet_stderr(self.tmp / "postgres-init.log"):
                self.pg.start()
        except PostgresDidNotStart as exc:
            raise BenchError(str(exc)) from None

    def url(self, db: str) -> str:
        return str(self.pg.url(db))

    def new_database(self, name: str) -> str:
        import psycopg

        try:
            url = str(self.pg.new_database(name))
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        if self.pg_stats:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return url

    def drop_database(self, name: str) -> None:
        """A finished phase's database goes at once: otherwise autovacuum works through
        its million updated rows during the next phase and takes CPU from it."""
        self.pg.drop_database(name)

    def start_daemon(self, name: str, env: dict[str, str]) -> Daemon:
        log_path = self.tmp / f"{name}-{len(self.daemons)}.log"
        with open(log_path, "wb") as logf:
            popen = subprocess.Popen(
                [str(BIN / name)],
                env=env,
                cwd=self.tmp,  # no .env of the checkout leaks in
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )
        daemon = Daemon(name, popen, log_path)
        self.daemons.append(daemon)
        if name == "consumer":
            daemon.wait_ready("consumer_started", consumer_serving(env["CONSUMER_LISTEN"]))
        else:
            port = env["PRODUCER_METRICS_PORT"]
            daemon.wait_ready("producer_started", metric_positive(port, "tasks_produced_total"))
        return daemon

    def close(self) -> None:
        # py-spy writes what it has on SIGINT; the RPC generators just stop.
        for proc in self.others:
            stop(proc, signal.SIGINT, 5)
        # Producers first, so nothing new reaches a consumer that is draining.
        for d in sorted(self.daemons, key=lambda d: d.name != "producer"):
            stop(d.popen, signal.SIGTERM, STOP_TIMEOUT_S)
        # PostgreSQL's fast shutdown (SIGTERM would wait for every client).
        if self.pg is not None:
            self.pg.stop()


@contextlib.contextmanager
def quiet_stderr(path: Path) -> Iterator[None]:
    """Point file descriptor 2 (inherited by children) at `path` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def clean_env() -> dict[str, str]:
    from daemons.bench.cluster import clean_env as clean

    return clean()


# --- measurements ---------------------------------------------------------------------


def cpu_of(pid: int) -> float:
    from daemons.bench.cpu import cpu_of as of

    return of(pid)


def tree_cpu(pid: int) -> float:
    from daemons.bench.cpu import tree_cpu as tree

    return tree(pid)


def system_busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) in MB; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return 0.0


@dataclass
class CpuSnapshot:
    at: float
    by_name: dict[str, float]
    system: float

    @classmethod
    def take(cls, pids: dict[str, int], trees: dict[str, int]) -> CpuSnapshot:
        by_name = {name: cpu_of(pid) for name, pid in pids.items()}
        by_name.update({name: tree_cpu(pid) for name, pid in trees.items()})
        by_name["bench"] = cpu_of(os.getpid())
        return cls(time.monotonic(), by_name, system_busy())

    def minus(self, before: CpuSnapshot) -> dict[str, float]:
        out = {k: v - before.by_name.get(k, 0.0) for k, v in self.by_name.items()}
        out["other"] = max(0.0, (self.system - before.system) - sum(out.values()))
        return out


class Progress:
    """One status line on stderr: rewritten in place on a terminal, else every 5 s."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif now - self.last >= 5:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self.last = now

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def scrape_sum(port: str, name: str) -> float | None:
    """Sum of every series of `name` on a daemon's /metrics (None if unreachable). The
    progress line uses the consumer's done counter: a count query on the database would
    itself cost PostgreSQL a few % of a core."""
    import urllib.request

    if not port or port == "0":
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except (OSError, ValueError):
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def scrape_done(port: str) -> int | None:
    value = scrape_sum(port, "tasks_done_total")
    return None if value is None else int(value)


def percentiles(
    conn: Any, t0: float, t1: float, work_scale: float
) -> tuple[int, list[float], float]:
    """(tasks done in [t0, t1), creation->done p50/p95/p99 ms, p99 ms of the same minus
    each task's own work): the latency target is "under 100 ms plus the task's work"."""
    row = conn.execute(
        "SELECT count(*), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP"
        " (ORDER BY last_update_time - creation_time),"
        " percentile_cont(0.99) WITHIN GROUP"
        " (ORDER BY last_update_time - creation_time - value * %s / 1000.0)"
        " FROM tasks WHERE state = 'done' AND last_update_time >= %s AND last_update_time < %s",
        (work_scale, t0, t1),
    ).fetchone()
    ms = [float(x) * 1000 for x in (row[1] or [0.0, 0.0, 0.0])]
    return int(row[0]), ms, float(row[2] or 0.0) * 1000


def lifetime_done(conn: Any) -> int:
    """Tasks ever done (the rollup), whatever retention removed since."""
    return int(conn.execute("SELECT coalesce(sum(done), 0) FROM task_totals").fetchone()[0])


def pg_counters(conn: Any) -> dict[str, float]:
    """Cluster WAL and this database's commits (PostgreSQL publishes these at most once a
    second per busy backend: approximate over a short window)."""
    row = conn.execute(
        "SELECT (SELECT wal_records FROM pg_stat_wal), (SELECT wal_bytes FROM pg_stat_wal),"
        " (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())"
    ).fetchone()
    return {"wal_records": float(row[0]), "wal_bytes": float(row[1]), "commits": float(row[2])}


def top_statements(conn: Any, window: float, n: int = 10) -> list[dict[str, Any]]:
    """pg_stat_statements of this database since the last reset, by execution time."""
    rows = conn.execute(
        "SELECT calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 110)"
        " FROM pg_stat_statements"
        " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " ORDER BY total_exec_time DESC LIMIT %s",
        (n,),
    ).fetchall()
    return [
        {
            "query": str(q),
            "calls": int(c),
            "exec_ms_per_s": float(t) / window,
            "mean_ms": float(t) / max(int(c), 1),
            "rows_per_call": int(r) / max(int(c), 1),
        }
        for c, t, r, q in rows
    ]


def series(conn: Any, start: float, end: float) -> list[tuple[int, int, float, float]]:
    """Per second since `start`: (second, done, p50 ms, p99 ms)."""
    rows = conn.execute(
        "SELECT floor(last_update_time - %(s)s)::int AS sec, count(*),"
        " percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP"
        " (ORDER BY last_update_time - creation_time)"
        " FROM tasks WHERE state = 'done' AND last_update_time >= %(s)s"
        " AND last_update_time < %(e)s GROUP BY 1 ORDER BY 1",
        {"s": start, "e": end},
    ).fetchall()
    return [(int(s), int(n), float(p[0]) * 1000, float(p[1]) * 1000) for s, n, p in rows]


SOAK_EDGE_MINUTES = 5  # first 5 vs last 5 minutes
SHARED_SETTINGS = ("TASKS_RETENTION",)  # read by both daemons under one name


class MinuteRows:
    """During the window, one row per minute, printed as the minute ends (an hour-long
    soak shows its progress): tasks/s, p99 beyond each task's own work, PostgreSQL CPU
    per 1,000 tasks, database size on disk, and the done partitions stored."""

    def __init__(
        self,
        conn: Any,
        pg_pid: int,
        work_scale: float,
        t0: float,
        m0: float,
        out: list[dict[str, Any]],
        progress: Progress,
        every_s: float = 60.0,
    ) -> None:
        self.conn, self.pg_pid, self.work_scale = conn, pg_pid, work_scale
        self.out, self.progress = out, progress
        self.every_s = every_s
        self.start_wall, self.next_at = t0, m0 + every_s
        self.cpu = tree_cpu(pg_pid)

    def maybe(self, now: float) -> None:
        if now < self.next_at:
            return
        self.next_at += self.every_s
        end = time.time()
        cpu = tree_cpu(self.pg_pid)
        done, _, beyond = percentiles(self.conn, self.start_wall, end, self.work_scale)
        size, parts = self.conn.execute(
            "SELECT pg_database_size(current_database()),"
            " (SELECT count(*) FROM pg_inherits WHERE inhparent = 'tasks_done'::regclass)"
        ).fetchone()
        row = {
            "minute": len(self.out) + 1,
            "tasks_per_s": done / max(end - self.start_wall, 1e-6),
            "p99_beyond_work_ms": beyond,
            "pg_cpu_s_per_1k": (cpu - self.cpu) / max(done / 1000, 1e-6),
            "db_size_mb": int(size) / 2**20,
            "partitions": int(parts),
        }
        self.out.append(row)
        self.start_wall, self.cpu = end, cpu
        self.progress.done()
        if row["minute"] == 1:
            print(MINUTE_HEAD, file=sys.stderr)
        print(minute_line(row), file=sys.stderr, flush=True)


MINUTE_HEAD = (
    f"{'minute':>6} {'tasks/s':>9} {'p99>work ms':>11} {'pg s/1k':>8} {'db MB':>8} {'parts':>5}"
)


def minute_line(row: dict[str, Any]) -> str:
    return (
        f"{row['minute']:6d} {row['tasks_per_s']:9,.0f} {row['p99_beyond_work_ms']:11.1f}"
        f" {row['pg_cpu_s_per_1k']:8.4f} {row['db_size_mb']:8.0f} {row['partitions']:5d}"
    )


def first_vs_last(minutes: list[dict[str, Any]], n: int = SOAK_EDGE_MINUTES) -> dict[str, Any]:
    """Mean of the first n minutes against the last n, and last / first, per figure."""
    n = max(1, min(n, len(minutes) // 2 or 1))
    out: dict[str, Any] = {"minutes_each": n}
    for key in ("tasks_per_s", "p99_beyond_work_ms", "pg_cpu_s_per_1k", "db_size_mb"):
        first = statistics.fmean(m[key] for m in minutes[:n])
        last = statistics.fmean(m[key] for m in minutes[-n:])
        out[key] = {"first": first, "last": last, "ratio": last / first if first else None}
    return out


def ceiling(url: str, seconds: float, pg_pid: int) -> dict[str, Any]:
    """The yardstick: the pipeline's three writes (insert, -> processing, -> done) from
    one Python process with psycopg, in batches of 1,000, one autocommit statement each,
    on a plain table (primary key only, no trigger) in a schema of its own on the same
    server. Our own schema can change; this must not, or the ratio means nothing."""
    import psycopg

    from daemons.bench.layouts import BATCH, PLAIN, measure

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS ceiling CASCADE")
        conn.execute("CREATE SCHEMA ceiling")
        conn.execute("SET search_path = ceiling")
        for statement in PLAIN.split(";"):
            conn.execute(statement)  # type: ignore[call-overload]
        before = CpuSnapshot.take({}, {"postgres": pg_pid})
        t0 = time.monotonic()
        tasks_per_s, _ = measure(conn, seconds, pg_pid, vacuum=False)
        elapsed = time.monotonic() - t0
        cpu = CpuSnapshot.take({}, {"postgres": pg_pid}).minus(before)
        conn.execute("DROP SCHEMA ceiling CASCADE")
    done = tasks_per_s * elapsed
    k = max(done, 1) / 1000
    return {
        "tasks_per_s": tasks_per_s,
        "tasks": int(done),
        "batch": BATCH,
        "table": "plain (primary key only, no trigger)",
        "seconds": round(elapsed, 2),
        "cpu_s_per_1k": {"python": cpu["bench"] / k, "postgres": cpu["postgres"] / k},
    }


# --- phases ---------------------------------------------------------------------------


@dataclass
class Options:
    seconds: float
    warmup: float
    workloads: list[str]
    ceiling_seconds: float
    rpc_seconds: float
    rpc_warmup: float
    rpc_concurrency: int
    rpc_procs: int
    rpc_generator: str
    backlog: int
    max_in_flight: int
    overrides: dict[str, str]
    py_spy: bool
    pg_stats: bool
    out: Path
    consumers: int = 1
    producers: int = 1
    half_rate: bool = True
    minute_rows: bool = False
    row_seconds: float = 60.0


def daemon_env(cluster: Cluster, url: str, extra: dict[str, str]) -> dict[str, str]:
    grpc_port = free_port()
    env = clean_env()
    env.update(
        {
            "DATABASE_URL": url,
            "CONSUMER_LISTEN": f"127.0.0.1:{grpc_port}",
            "PRODUCER_CONSUMER_TARGET": f"127.0.0.1:{grpc_port}",
            "PRODUCER_METRICS_PORT": str(free_port()),
            "PRODUCER_PROFILING_PORT": str(free_port()),
            "CONSUMER_METRICS_PORT": str(free_port()),
            "CONSUMER_PROFILING_PORT": str(free_port()),
        }
    )
    env.update(extra)
    return env


def run_workload(
    cluster: Cluster,
    opts: Options,
    workload: str,
    stamp: str,
    progress: Progress,
    rate: str = MAX_RATE,
    label: str = "",
) -> dict[str, Any]:
    """One workload on a fresh database: flat out, or at `rate` tasks/s offered (the
    half-rate phase, `label` e.g. "zero@half" names its database, files and progress)."""
    import psycopg

    assert cluster.popen is not None
    pg_pid = cluster.popen.pid
    scale = WORKLOADS[workload]
    workload = label or workload
    db_name = "bench_" + re.sub(r"\W", "_", workload)
    url = cluster.new_database(db_name)
    knobs = {
        "PRODUCER_RATE": rate,
        "PRODUCER_MAX_BACKLOG": str(opts.backlog),
        "CONSUMER_RATE_LIMIT": HIGH_LIMIT,
        "CONSUMER_MAX_IN_FLIGHT": str(opts.max_in_flight),
        "CONSUMER_WORK_SCALE": scale,
        **opts.overrides,
    }
    rate = knobs["PRODUCER_RATE"]  # an override (make soak) wins
    work_scale = float(knobs["CONSUMER_WORK_SCALE"])
    env = daemon_env(cluster, url, knobs)
    # Instances beyond the first get their own ports; producers target every consumer.
    consumer_envs = [env] + [
        {
            **env,
            "CONSUMER_LISTEN": f"127.0.0.1:{free_port()}",
            "CONSUMER_METRICS_PORT": str(free_port()),
            "CONSUMER_PROFILING_PORT": "0",
        }
        for _ in range(opts.consumers - 1)
    ]
    if opts.consumers > 1:
        target = "ipv4:" + ",".join(e["CONSUMER_LISTEN"] for e in consumer_envs)
        env = {**env, "PRODUCER_CONSUMER_TARGET": target}
    producer_envs = [env] + [
        {**env, "PRODUCER_METRICS_PORT": str(free_port()), "PRODUCER_PROFILING_PORT": "0"}
        for _ in range(opts.producers - 1)
    ]
    consumers = [cluster.start_daemon("consumer", e) for e in consumer_envs]
    started = time.time()
    producers = [cluster.start_daemon("producer", e) for e in producer_envs]
    consumer, producer = consumers[0], producers[0]
    daemons = {"producer": producer, "consumer": consumer}
    daemons.update({f"consumer_{i}": d for i, d in enumerate(consumers[1:], 1)})
    daemons.update({f"producer_{i}": d for i, d in enumerate(producers[1:], 1)})
    spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    rss_seen = dict.fromkeys(daemons, 0.0)
    with psycopg.connect(url, autocommit=True) as conn:
        ports = [e["CONSUMER_METRICS_PORT"] for e in consumer_envs]

        def scrape_all() -> int | None:
            counts = [scrape_done(p) for p in ports]
            return None if None in counts else sum(c for c in counts if c is not None)

        minutes: list[dict[str, Any]] = []

        def tick(
            phase: str, until: float, t_start: float, every_minute: MinuteRows | None = None
        ) -> None:
            last_n, last_t = scrape_all(), time.monotonic()
            while True:
                now = time.monotonic()
                if every_minute is not None:
                    every_minute.maybe(now)
                if now >= until:
                    return
                time.sleep(min(1.0, until - now))
                for name, d in daemons.items():
                    d.check()
                    rss_seen[name] = max(rss_seen[name], rss_mb(d.pid))
                n, t = scrape_all(), time.monotonic()
                now_rate = (
                    f"{(n - last_n) / max(t - last_t, 1e-6):,.0f}"
                    if n is not None and last_n is not None
                    else "?"
                )
                last_n, last_t = n, t
                progress.show(
                    f"[{workload}] {phase} {t - t_start:4.0f}/{until - t_start:.0f} s"
                    f"  done {'?' if n is None else f'{n:,}'}  now {now_rate} tasks/s"
                )

        w0 = time.monotonic()
        tick("warm-up", w0 + opts.warmup, w0)
        pids = {name: d.pid for name, d in daemons.items()}
        if opts.py_spy:
            from loadtest import bench_profile

            for name, pid in pids.items():
                out = opts.out / f"bench-{workload}-{name}-{stamp}.folded.txt"
                spy = bench_profile.start_record(BIN / "py-spy", pid, opts.seconds, out)
                cluster.others.append(spy)
                spies[name] = (spy, out)
        if cluster.pg_stats:
            conn.execute("SELECT pg_stat_statements_reset()")
        pg_before = pg_counters(conn)
        lifetime_before = lifetime_done(conn)
        before = CpuSnapshot.take(pids, {"postgres": pg_pid})
        rss_start = {"producer": rss_mb(producer.pid), "consumer": rss_mb(consumer.pid)}
        t0 = time.time()
        m0 = time.monotonic()
        rows = (
            MinuteRows(conn, pg_pid, work_scale, t0, m0, minutes, progress, opts.row_seconds)
            if opts.minute_rows
            else None
        )
        tick("measure", m0 + opts.seconds, m0, rows)
        t1 = time.time()
        lifetime_at_t1 = lifetime_done(conn)
        # Memory growth over the window (the soak's figure): RSS at its end vs its start.
        rss_growth = {
            name: (rss_mb(d.pid) - rss_start[name]) / max(rss_start[name], 1e-6) * 100
            for name, d in (("producer", producer), ("consumer", consumer))
        }
        cpu = CpuSnapshot.take(pids, {"postgres": pg_pid}).minus(before)
        for extra in [name for name in pids if "_" in name]:  # sum instances per role
            cpu[extra.split("_")[0]] += cpu.pop(extra)
        pg_after = pg_counters(conn)
        statements = top_statements(conn, t1 - t0) if cluster.pg_stats else []
        window = t1 - t0
        peak_all = {name: max(peak_rss_mb(pid), rss_seen[name]) for name, pid in pids.items()}
        peak = {
            role: max(v for name, v in peak_all.items() if name.split("_")[0] == role)
            for role in ("producer", "consumer")
        }
        progress.done()
        for spy, _ in spies.values():
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                stop(spy, signal.SIGINT, 10)
        # Correctness, every run: stop the producers, let the consumers go idle, then
        # the consumers' done counters must equal the database (nothing counted twice)
        # and, once they have drained, nothing may be left `processing` (nothing lost;
        # `received` tasks the producers abandoned are redelivered by the next run).
        exit_codes = {
            name: stop(d.popen, signal.SIGTERM, STOP_TIMEOUT_S)
            for name, d in daemons.items()
            if name.startswith("prod")
        }
        idle_by = time.monotonic() + STOP_TIMEOUT_S
        while (
            time.monotonic() < idle_by
            and conn.execute("SELECT sum(processing) FROM task_counts").fetchone()[0]
        ):
            time.sleep(0.2)
        counted = sum(scrape_done(p) or 0 for p in ports)
        # Lifetime done (the rollup): retention may have removed rows in the meantime.
        db_done = lifetime_done(conn)
        exit_codes.update(
            {
                name: stop(d.popen, signal.SIGTERM, STOP_TIMEOUT_S)
                for name, d in daemons.items()
                if name.startswith("cons")
            }
        )
        left_processing = conn.execute(
            "SELECT count(*) FROM tasks WHERE state = 'processing'"
        ).fetchone()[0]
        check = {
            "double_counted": counted - db_done,
            "lost_processing": left_processing,
            "exit_codes_ok": all(code == 0 for code in exit_codes.values()),
        }
        stored, (p50, p95, p99), p99_beyond_work = percentiles(conn, t0, t1, work_scale)
        # Retention may have removed part of the window's rows by now (make soak): the
        # count comes from the lifetime totals; the percentiles, from the rows left.
        done = max(stored, lifetime_at_t1 - lifetime_before)
        per_second = series(conn, started, t1)
        states: dict[str, int] = dict(
            conn.execute("SELECT state::text, count(*) FROM tasks GROUP BY 1").fetchall()
        )
    k = max(done, 1) / 1000
    in_window = [n for s, n, _, _ in per_second if t0 - started <= s < t1 - started - 1]
    result: dict[str, Any] = {
        "work_scale": work_scale,
        "consumers": opts.consumers,
        "producers": opts.producers,
        "tasks_per_s": done / window,
        "done_in_window": done,
        "window_s": round(window, 2),
        "min_1s_tasks_per_s": min(in_window) if in_window else 0,
        "max_1s_tasks_per_s": max(in_window) if in_window else 0,
        "rate_offered": rate,
        "latency_ms": {"p50": p50, "p95": p95, "p99": p99, "p99_beyond_work": p99_beyond_work},
        "latency_from_stored_rows": stored,
        "cpu_s_per_1k": {n: cpu[n] / k for n in ("producer", "consumer", "postgres")},
        "cpu_cores": {
            n: cpu[n] / window for n in ("producer", "consumer", "postgres", "bench", "other")
        },
        "peak_rss_mb": peak,
        "rss_growth_pct": rss_growth,
        "postgres": {
            "commits_per_1k": (pg_after["commits"] - pg_before["commits"]) / k,
            "wal_bytes_per_task": (pg_after["wal_bytes"] - pg_before["wal_bytes"]) / max(done, 1),
            "wal_records_per_task": (pg_after["wal_records"] - pg_before["wal_records"])
            / max(done, 1),
        },
        "exit_codes": exit_codes,
        "check": check,
        "final_states": {str(s): int(n) for s, n in states.items()},
        "settings": knobs,
        "series": [
            {"t": s, "tasks": n, "p50_ms": round(a, 2), "p99_ms": round(b, 2)}
            for s, n, a, b in per_second
        ],
        "window_from_s": round(t0 - started, 2),
    }
    if statements:
        result["postgres"]["statements"] = statements
    if minutes:
        result["minutes"] = minutes
        result["minutes_first_vs_last"] = first_vs_last(minutes)
    if spies:
        result["profile"] = summarize_profiles(spies, opts.seconds, workload, stamp)
    if opts.ceiling_seconds > 0 and not label:
        progress.show(f"[{workload}] ceiling: a plain table, one psycopg process")
        result["ceiling"] = ceiling(url, opts.ceiling_seconds, pg_pid)
        result["ratio_to_ceiling"] = result["tasks_per_s"] / result["ceiling"]["tasks_per_s"]
        progress.done()
    cluster.drop_database(db_name)
    return result


def summarize_profiles(
    spies: dict[str, tuple[subprocess.Popen[bytes], Path]], seconds: float, label: str, stamp: str
) -> dict[str, Any]:
    """Wait for the py-spy recorders, print each hot-spot summary, write flame graphs."""
    from loadtest import bench_profile

    out: dict[str, Any] = {}
    for name, (spy, path) in spies.items():
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            stop(spy, signal.SIGINT, 10)
        if not path.exists():
            continue
        stacks = bench_profile.read_folded(path)
        summary = bench_profile.summarize(stacks, max(1, round(seconds)) * bench_profile.RATE)
        title = f"{name}, {label} ({stamp})"
        flame = path.with_name(path.name.replace(".folded.txt", ".flame.html"))
        flame.write_text(bench_profile.flame_html(title, stacks, summary))
        print(bench_profile.format_summary(title, summary, 15), file=sys.stderr)
        out[name] = {**summary.as_dict(10), "folded": str(path), "flame": str(flame)}
    return out


RPC_TYPE_WARMUP, RPC_TYPE_MEASURED = 1, 2  # h2load: tells the window's rows apart


def rpc_generator(choice: str) -> tuple[str, str | None]:
    """(generator, h2load's path when it is the one)."""
    h2load = shutil.which("h2load") if choice in ("auto", "h2load") else None
    if choice == "h2load" and h2load is None:
        raise BenchError("--rpc-generator h2load: h2load is not on PATH (Debian: nghttp2-client)")
    return ("h2load", h2load) if h2load else ("python", None)


def run_rpc(cluster: Cluster, opts: Options, progress: Progress, stamp: str) -> dict[str, Any]:
    from array import array

    import psycopg

    from loadtest import bench_rpc

    assert cluster.popen is not None
    pg_pid = cluster.popen.pid
    generator, h2load = rpc_generator(opts.rpc_generator)
    url = cluster.new_database("bench_rpc")
    knobs = {
        "CONSUMER_RATE_LIMIT": HIGH_LIMIT,
        "CONSUMER_MAX_IN_FLIGHT": str(opts.max_in_flight),
        "CONSUMER_WORK_SCALE": "0",
        **{k: v for k, v in opts.overrides.items() if k.startswith("CONSUMER_")},
    }
    env = daemon_env(cluster, url, knobs)
    consumer = cluster.start_daemon("consumer", env)
    target = env["CONSUMER_LISTEN"]
    gens: list[tuple[subprocess.Popen[bytes], Path]] = []
    if h2load is not None:
        # Warm-up with one task type, measure with another: the database then says
        # exactly which measured calls succeeded (h2load sees HTTP 200, not grpc-status).
        def h2load_phase(name: str, task_type: int, seconds: float, log: str | None) -> list[str]:
            body = cluster.tmp / f"rpc-{name}.bin"
            body.write_bytes(bench_rpc.grpc_frame(task_type, 42))
            return bench_rpc.h2load_command(
                h2load, target, str(body), seconds, opts.rpc_concurrency, opts.rpc_procs, log
            )

        if opts.rpc_warmup > 0:
            progress.show("[rpc] warm-up (h2load)")
            warm = subprocess.run(
                h2load_phase("warmup", RPC_TYPE_WARMUP, opts.rpc_warmup, None),
                capture_output=True,
                timeout=opts.rpc_warmup + 60,
            )
            if warm.returncode != 0:
                raise BenchError(f"h2load failed:\n{warm.stdout.decode()}{warm.stderr.decode()}")
        log_path = cluster.tmp / "rpc-h2load.log"
        gen = subprocess.Popen(
            h2load_phase("measured", RPC_TYPE_MEASURED, opts.rpc_seconds, str(log_path)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        cluster.others.append(gen)
        gens.append((gen, log_path))
        spy_seconds = opts.rpc_seconds
    else:
        for i in range(opts.rpc_procs):
            lat_path = cluster.tmp / f"rpc-lat-{i}.bin"
            gen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "loadtest.bench_rpc",
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
            cluster.others.append(gen)
            gens.append((gen, lat_path))
        spy_seconds = opts.rpc_warmup + opts.rpc_seconds
    spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    if opts.py_spy:  # the same steady load throughout, once the channels are up
        from loadtest import bench_profile

        folded = opts.out / f"bench-rpc-consumer-{stamp}.folded.txt"
        spy = bench_profile.start_record(BIN / "py-spy", consumer.pid, spy_seconds, folded)
        cluster.others.append(spy)
        spies["consumer"] = (spy, folded)
    # The generators measure on their own clocks and report their window (wall time):
    # sample CPU every 0.2 s meanwhile and keep the samples that bracket that window.
    pids = {"consumer": consumer.pid, **{f"gen{i}": g.pid for i, (g, _) in enumerate(gens)}}
    samples: list[tuple[float, CpuSnapshot]] = []
    begin = time.monotonic()
    limit = begin + opts.rpc_warmup + opts.rpc_seconds + 60
    while any(g.poll() is None for g, _ in gens):
        if time.monotonic() > limit:
            raise BenchError("RPC load generator did not finish")
        consumer.check()
        samples.append((time.time(), CpuSnapshot.take(pids, {"postgres": pg_pid})))
        progress.show(f"[rpc] {time.monotonic() - begin:3.0f} s ({generator})")
        time.sleep(0.2)
    progress.done()
    lat = array("d")
    codes: dict[str, int] = {}
    if generator == "h2load":
        gen, log_path = gens[0]
        out, err = gen.communicate(timeout=10)
        if gen.returncode != 0 or not log_path.exists():
            raise BenchError(f"h2load failed:\n{out.decode()}{err.decode()}")
        latencies, t0, t1, not_200 = bench_rpc.read_h2load_log(str(log_path))
        lat.extend(latencies)
        calls = len(latencies)
    else:
        reports = []
        for gen, lat_path in gens:
            out, err = gen.communicate(timeout=10)
            if gen.returncode != 0:
                raise BenchError(f"RPC load generator failed:\n{err.decode(errors='replace')}")
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
            with open(lat_path, "rb") as f:
                lat.frombytes(f.read())
        t0 = min(r["t0_wall"] for r in reports)
        t1 = max(r["t1_wall"] for r in reports)
        calls = sum(r["calls"] for r in reports)
        for r in reports:
            for code, n in r["codes"].items():
                codes[code] = codes.get(code, 0) + n
    if not samples or not calls:
        raise BenchError("RPC load generators ended before any measurement")
    first = next((s for s in samples if s[0] >= t0), samples[0])
    last = next((s for s in reversed(samples) if s[0] <= t1), samples[-1])
    span = max(last[0] - first[0], 1e-6)
    cpu = last[1].minus(first[1])
    profile = summarize_profiles(spies, spy_seconds, "single-task Submit RPC", stamp)
    port = env["CONSUMER_METRICS_PORT"]
    statements = {
        "register": scrape_sum(port, 'consumer_db_batch_size_count{transition="processing"}'),
        "done": scrape_sum(port, 'consumer_db_batch_size_count{transition="done"}'),
    }
    exit_code = stop(consumer.popen, signal.SIGTERM, STOP_TIMEOUT_S)
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM tasks WHERE creation_time >= %s AND creation_time < %s",
            (t0, t1),
        ).fetchone()
        measured = conn.execute(
            "SELECT count(*) FROM tasks WHERE type = %s", (RPC_TYPE_MEASURED,)
        ).fetchone()
    registered = int(found[0]) if found else 0
    if generator == "h2load":
        # Calls still in flight when h2load stopped may have registered rows it did
        # not log: count no more OK calls than it measured.
        ok = min(calls, int(measured[0]) if measured else 0)
        codes = {"OK": ok}
        if calls - ok:
            codes["not OK (grpc-status)"] = calls - ok
        if not_200:
            codes["HTTP status not 200"] = not_200
    else:
        ok = codes.get("OK", 0)
    ordered = sorted(lat)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else 0.0

    ok_per_s = ok / opts.rpc_seconds
    return {
        "generator": generator,
        "calls_per_s": calls / opts.rpc_seconds,
        "ok_per_s": ok_per_s,
        "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)},
        "codes": codes,
        "concurrency": opts.rpc_concurrency * opts.rpc_procs,
        "generator_procs": opts.rpc_procs,
        "seconds": opts.rpc_seconds,
        "db_registered_per_s": int(registered) / max(t1 - t0, 1e-6),
        "cpu_s_per_1k_calls": {
            n: cpu[n] / span / max(ok_per_s, 1e-6) * 1000 for n in ("consumer", "postgres")
        },
        "cpu_cores": {
            "consumer": cpu["consumer"] / span,
            "postgres": cpu["postgres"] / span,
            "generators": sum(v for n, v in cpu.items() if n.startswith("gen")) / span,
            "other": cpu["other"] / span,
        },
        "consumer_exit_code": exit_code,
        "statements": statements,
        **({"profile": profile} if profile else {}),
        "settings": knobs,
    }


# --- report ---------------------------------------------------------------------------


def fmt_table(result: dict[str, Any]) -> str:
    wls = result["workloads"]
    names = list(wls)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> None:
        rows.append((label, [get(wls[n]) for n in names]))

    row("tasks/s end to end (done)", lambda w: f"{w['tasks_per_s']:,.0f}")
    row(
        "  min / max over 1 s",
        lambda w: f"{w['min_1s_tasks_per_s']:,} / {w['max_1s_tasks_per_s']:,}",
    )
    row(
        "tasks/s offered (PRODUCER_RATE)",
        lambda w: "max" if w["rate_offered"] == MAX_RATE else f"{int(w['rate_offered']):,}",
    )
    for p in ("p50", "p95", "p99"):
        row(f"latency {p} ms (create->done)", lambda w, p=p: f"{w['latency_ms'][p]:,.1f}")
    row("  p99 ms beyond the task's work", lambda w: f"{w['latency_ms']['p99_beyond_work']:,.1f}")
    for n in ("producer", "consumer", "postgres"):
        row(f"CPU s / 1k tasks, {n}", lambda w, n=n: f"{w['cpu_s_per_1k'][n]:.4f}")
    for n in ("producer", "consumer", "postgres", "other"):
        row(f"CPU cores busy, {n}", lambda w, n=n: f"{w['cpu_cores'][n]:.2f}")
    for n in ("producer", "consumer"):
        row(f"peak RSS MB, {n}", lambda w, n=n: f"{w['peak_rss_mb'][n]:.0f}")
    for n in ("producer", "consumer"):
        row(f"RSS growth over window %, {n}", lambda w, n=n: f"{w['rss_growth_pct'][n]:+.1f}")
    row("pg commits / 1k tasks (approx)", lambda w: f"{w['postgres']['commits_per_1k']:.1f}")
    row("pg WAL bytes / task (approx)", lambda w: f"{w['postgres']['wal_bytes_per_task']:.0f}")
    if any("ceiling" in wls[n] for n in names):
        row(
            "ceiling tasks/s (plain table, 1k)",
            lambda w: f"{w['ceiling']['tasks_per_s']:,.0f}" if "ceiling" in w else "-",
        )
        row(
            "  ceiling CPU s/1k py / pg",
            lambda w: (
                f"{w['ceiling']['cpu_s_per_1k']['python']:.4f} / "
                f"{w['ceiling']['cpu_s_per_1k']['postgres']:.4f}"
                if "ceiling" in w
                else "-"
            ),
        )
        row(
            "ours / ceiling",
            lambda w: f"{w['ratio_to_ceiling'] * 100:.1f} %" if "ceiling" in w else "-",
        )
    row("exit codes producer/consumer", lambda w: "{producer}/{consumer}".format(**w["exit_codes"]))
    row(
        "lost / double-counted",
        lambda w: "{lost_processing}/{double_counted}".format(**w["check"]),
    )
    lines: list[str] = []
    if names:
        width = max(len(r[0]) for r in rows)
        colw = max(14, *(len(v) for _, vs in rows for v in vs))
        head = f"{'workload'.ljust(width)}  " + "  ".join(n.rjust(colw) for n in names)
        lines += [head, "-" * len(head)]
        lines += [
            f"{lab.ljust(width)}  " + "  ".join(v.rjust(colw) for v in vs) for lab, vs in rows
        ]
    for name in names:
        stmts = wls[name]["postgres"].get("statements")
        if stmts:
            lines += ["", f"pg_stat_statements, workload {name} (exec ms per s, calls, rows/call):"]
            lines += [
                f"  {st['exec_ms_per_s']:7.1f} {st['calls']:8,} {st['rows_per_call']:8.1f}  "
                f"{st['query']}"
                for st in stmts
            ]
    for name in names:
        minutes = wls[name].get("minutes")
        if minutes:
            lines += ["", f"per minute, workload {name}:", MINUTE_HEAD]
            lines += [minute_line(m) for m in minutes]
            edge = wls[name]["minutes_first_vs_last"]
            lines.append(f"first {edge['minutes_each']} min vs last {edge['minutes_each']} min:")
            for key, v in edge.items():
                if key != "minutes_each":
                    ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
                    lines.append(f"  {key:20} {v['first']:10.4g} -> {v['last']:10.4g}  {ratio}")
    rpc = result.get("rpc")
    if rpc:
        lat = rpc["latency_ms"]
        lines += [
            "",
            f"single-task Submit RPC ({rpc['concurrency']} concurrent calls, generator "
            f"{rpc['generator']} x{rpc['generator_procs']}, {rpc['seconds']:.0f} s):",
            f"  {rpc['ok_per_s']:,.0f} OK calls/s ({rpc['calls_per_s']:,.0f} calls/s), "
            f"latency p50 {lat['p50']:.2f} / p95 {lat['p95']:.2f} / p99 {lat['p99']:.2f} ms",
            f"  consumer CPU {rpc['cpu_s_per_1k_calls']['consumer']:.4f} s / 1k calls, "
            f"{rpc['cpu_cores']['consumer']:.2f} cores busy; postgres "
            f"{rpc['cpu_cores']['postgres']:.2f}, load generators "
            f"{rpc['cpu_cores']['generators']:.2f}, other {rpc['cpu_cores']['other']:.2f} cores",
            f"  codes {rpc['codes']}; rows registered in the database "
            f"{rpc['db_registered_per_s']:,.0f}/s",
        ]
    return "\n".join(lines)


def nice_ceiling(y: float) -> float:
    """The next 1, 2, 2.5 or 5 times a power of ten at or above y (axis top)."""
    if y <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(y))
    return float(next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= y))


def line_chart(
    title: str,
    unit: str,
    lines: list[tuple[str, str, list[tuple[float, float]]]],
    shade_to: float,
    width: int = 900,
    height: int = 260,
) -> str:
    """An SVG line chart: x = seconds since the producer started; the warm-up is shaded."""
    pad_l, pad_r, pad_t, pad_b = 70, 20, 30, 35
    xs = [x for _, _, pts in lines for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, _, pts in lines for _, y in pts] or [0.0, 1.0]
    x_max = max(max(xs), 1.0)
    y_max = nice_ceiling(max(ys) * 1.05)
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x: float) -> float:
        return pad_l + x / x_max * pw

    def sy(y: float) -> float:
        return pad_t + ph - y / y_max * ph

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        "font-family='sans-serif' font-size='11'>",
        f"<text x='{pad_l}' y='18' font-size='13' font-weight='bold'>{html.escape(title)}</text>",
        f"<rect x='{pad_l}' y='{pad_t}' width='{max(sx(shade_to) - pad_l, 0):.1f}' "
        f"height='{ph}' fill='#eee'/>",
        f"<text x='{pad_l + 4}' y='{pad_t + 12}' fill='#888'>warm-up</text>",
    ]
    for i in range(6):
        y = y_max * i / 5
        parts.append(
            f"<line x1='{pad_l}' x2='{width - pad_r}' y1='{sy(y):.1f}' y2='{sy(y):.1f}' "
            "stroke='#ddd'/>"
            f"<text x='{pad_l - 6}' y='{sy(y) + 4:.1f}' text-anchor='end'>{y:,.0f}</text>"
        )
    step = max(1, round(x_max / 10))
    for x in range(0, int(x_max) + 1, step):
        parts.append(
            f"<text x='{sx(x):.1f}' y='{height - pad_b + 15}' text-anchor='middle'>{x}</text>"
        )
    parts.append(
        f"<text x='{pad_l + pw / 2}' y='{height - 4}' text-anchor='middle'>seconds</text>"
        f"<text x='14' y='{pad_t + ph / 2}' transform='rotate(-90 14 {pad_t + ph / 2})' "
        f"text-anchor='middle'>{html.escape(unit)}</text>"
    )
    for i, (label, color, pts) in enumerate(lines):
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(
                f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{path}'/>"
            )
        parts.append(
            f"<text x='{width - pad_r - 60 * (len(lines) - i)}' y='18' fill='{color}' "
            "font-weight='bold'>"
            f"{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def workload_html(name: str, w: dict[str, Any]) -> str:
    pts = w["series"]
    # The last second is partial (the window ends inside it): left out of the chart.
    pts = pts[:-1] if len(pts) > 1 else pts
    tput = [(p["t"] + 0.5, float(p["tasks"])) for p in pts]
    p50 = [(p["t"] + 0.5, p["p50_ms"]) for p in pts]
    p99 = [(p["t"] + 0.5, p["p99_ms"]) for p in pts]
    shade = w["window_from_s"]
    lat = w["latency_ms"]
    summary = (
        f"{w['tasks_per_s']:,.0f} tasks/s over {w['window_s']} s; latency p50 "
        f"{lat['p50']:.1f} / p95 {lat['p95']:.1f} / p99 {lat['p99']:.1f} ms"
    )
    if "ratio_to_ceiling" in w:
        summary += (
            f"; ceiling {w['ceiling']['tasks_per_s']:,.0f} tasks/s "
            f"(ours {w['ratio_to_ceiling'] * 100:.1f} %)"
        )
    per_minute = ""
    if w.get("minutes"):
        ms = w["minutes"]

        def mline(key: str) -> list[tuple[float, float]]:
            return [(float(m["minute"]), float(m[key])) for m in ms]

        per_minute = "".join(
            "<br>" + line_chart(title, unit, [(label, color, mline(key))], 0)
            for title, unit, label, color, key in (
                ("tasks/s per minute", "tasks/s", "done/s", "#1f77b4", "tasks_per_s"),
                ("p99 beyond the work, per minute", "ms", "p99", "#d62728", "p99_beyond_work_ms"),
                ("PostgreSQL CPU per 1,000 tasks", "s", "pg", "#9467bd", "pg_cpu_s_per_1k"),
                ("database size on disk", "MB", "size", "#8c564b", "db_size_mb"),
            )
        )
    return (
        f"<h2>workload {html.escape(name)} (CONSUMER_WORK_SCALE={w['work_scale']:g})</h2>"
        f"<p>{html.escape(summary)}</p>"
        + line_chart("tasks done per second", "tasks/s", [("done/s", "#1f77b4", tput)], shade)
        + "<br>"
        + line_chart(
            "latency creation -> done, per second of completion",
            "ms",
            [("p50", "#2ca02c", p50), ("p99", "#d62728", p99)],
            shade,
        )
        + per_minute
    )


def write_charts(result: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    head = (
        "<!doctype html><html><head><meta charset='utf-8'><title>{t}</title>"
        "<style>body{{font-family:sans-serif;margin:16px}} pre{{font-size:12px}}</style>"
        "</head><body><h1>{t}</h1>"
    )
    table = f"<pre>{html.escape(fmt_table(result))}</pre>"
    paths = []
    for name, w in result["workloads"].items():
        path = out / f"bench-{name}-{stamp}.html"
        path.write_text(
            head.format(t=f"bench {name} {stamp}") + workload_html(name, w) + "</body></html>"
        )
        paths.append(path)
    latest = out / "bench-latest.html"
    latest.write_text(
        head.format(t=f"bench {stamp}")
        + table
        + "".join(workload_html(n, w) for n, w in result["workloads"].items())
        + "</body></html>"
    )
    return [*paths, latest]


# --- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per workload")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    p.add_argument(
        "--workloads",
        default="zero,default",
        help=f"comma-separated of {', '.join(WORKLOADS)}; none = only the RPC figure",
    )
    p.add_argument(
        "--ceiling-seconds", type=float, default=5.0, help="psycopg ceiling run (0 = skip)"
    )
    p.add_argument(
        "--rpc-seconds", type=float, default=10.0, help="single-task RPC window (0 = skip)"
    )
    p.add_argument("--rpc-warmup", type=float, default=2.0, help="RPC warm-up seconds")
    p.add_argument("--rpc-concurrency", type=int, default=32, help="callers per generator")
    p.add_argument(
        "--rpc-procs", type=int, default=1, help="generator processes (h2load: connections)"
    )
    p.add_argument(
        "--rpc-generator",
        choices=("auto", "h2load", "python"),
        default="auto",
        help="RPC load generator: h2load (C, nghttp2-client) when on PATH, else"
        " loadtest.bench_rpc (Python, grpc.aio)",
    )
    p.add_argument("--backlog", type=int, default=20_000, help="PRODUCER_MAX_BACKLOG")
    p.add_argument("--max-in-flight", type=int, default=50_000, help="CONSUMER_MAX_IN_FLIGHT")
    p.add_argument("--consumers", type=int, default=1, help="consumers (round_robin)")
    p.add_argument("--producers", type=int, default=1, help="producers on the database")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="any other daemon setting, e.g. --set PRODUCER_BATCH_MAX=5000 (repeatable)",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="record py-spy CPU profiles of both daemons over each window (perturbs figures)",
    )
    p.add_argument(
        "--pg-stats",
        action="store_true",
        help="load pg_stat_statements in the private cluster; report the top statements",
    )
    p.add_argument(
        "--half-rate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each workload, run it again at half the rate it reached (the latency"
        " target's condition); off when --set PRODUCER_RATE fixes the rate",
    )
    p.add_argument(
        "--minute-rows",
        action="store_true",
        help="print a row per minute of the window as it ends (tasks/s, p99 beyond the"
        " work, PostgreSQL CPU per 1k, database size) and chart them (make soak)",
    )
    p.add_argument(
        "--row-seconds", type=float, default=60.0, help="length of a --minute-rows row (tests)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where charts go")
    a = p.parse_args(argv)
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip() not in ("", "none")]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        p.error(f"--workloads: unknown {bad}; accepted: {', '.join(WORKLOADS)} or none")
    overrides = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or not (key.startswith(("PRODUCER_", "CONSUMER_")) or key in SHARED_SETTINGS):
            p.error(
                f"--set {item!r}: expected PRODUCER_*=VALUE, CONSUMER_*=VALUE or"
                f" one of {', '.join(SHARED_SETTINGS)}"
            )
        overrides[key] = value
    if a.seconds <= 0 or a.warmup < 0:
        p.error("--seconds must be > 0 and --warmup >= 0")
    return Options(
        seconds=a.seconds,
        warmup=a.warmup,
        workloads=workloads,
        ceiling_seconds=a.ceiling_seconds,
        rpc_seconds=a.rpc_seconds,
        rpc_warmup=a.rpc_warmup,
        rpc_concurrency=max(1, a.rpc_concurrency),
        rpc_procs=max(1, a.rpc_procs),
        rpc_generator=a.rpc_generator,
        backlog=a.backlog,
        max_in_flight=a.max_in_flight,
        overrides=overrides,
        py_spy=a.py_spy,
        pg_stats=a.pg_stats,
        out=a.out,
        consumers=max(1, a.consumers),
        producers=max(1, a.producers),
        half_rate=a.half_rate and "PRODUCER_RATE" not in overrides,
        minute_rows=a.minute_rows,
        row_seconds=a.row_seconds,
    )


@contextlib.contextmanager
def private_cluster(pg_stats: bool = False) -> Iterator[Cluster]:
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="tasks-bench-")), pg_stats)
    try:
        cluster.start()
        yield cluster
    finally:
        # Bounded, and not to be cut short by a second Ctrl-C: a half-done clean-up
        # would leave daemons or PostgreSQL behind.
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            cluster.close()
            shutil.rmtree(cluster.tmp, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # Also SIGINT: a shell may start us with it ignored (background job), and Ctrl-C or
    # `kill -INT` must still stop everything this run started.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    from daemons import commit, version

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
        with private_cluster(opts.pg_stats) as cluster:
            for workload in opts.workloads:
                flat_out = run_workload(cluster, opts, workload, stamp, progress)
                result["workloads"][workload] = flat_out
                if opts.half_rate:
                    # The latency target is set at half the maximum rate.
                    half = str(max(1, round(flat_out["tasks_per_s"] / 2)))
                    name = f"{workload}@half"
                    result["workloads"][name] = run_workload(
                        cluster, opts, workload, stamp, progress, rate=half, label=name
                    )
            if opts.rpc_seconds > 0:
                result["rpc"] = run_rpc(cluster, opts, progress, stamp)
    except KeyboardInterrupt:
        progress.done()
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        progress.done()
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    charts = write_charts(result, opts.out, stamp) if result["workloads"] else []
    result["charts"] = [str(p) for p in charts]
    print(fmt_table(result))
    if charts:
        print(f"\ncharts: {', '.join(str(p) for p in charts)}")
    print(json.dumps(result, separators=(",", ":")), flush=True)
    bad = {
        name: w["check"]
        for name, w in result["workloads"].items()
        if w["check"]["double_counted"]
        or w["check"]["lost_processing"]
        or not w["check"]["exit_codes_ok"]
    }
    if bad:
        print(f"bench: correctness check failed: {bad}", file=sys.stderr)
        return 1
    print("correctness: 0 lost, 0 double-counted, every daemon exited 0", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
