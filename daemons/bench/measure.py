"""What the bench measures: CPU of processes and trees, RSS, PostgreSQL's counters and
statements, latency percentiles (from the database, or from a list of latencies), the
per-second series, the per-minute rows of a soak, and the psycopg ceiling."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg

from daemons.bench.cpu import cpu_of, tree_cpu
from daemons.bench.layouts import BATCH, PLAIN, measure


def percentiles_ms(seconds: Sequence[float], ps: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """{"p50": ms, ...} of latencies given in seconds; 0 for each when there are none."""
    if not seconds:
        return {f"p{p}": 0.0 for p in ps}
    if len(seconds) == 1:
        return {f"p{p}": seconds[0] * 1000 for p in ps}
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return {f"p{p}": cuts[p - 1] * 1000 for p in ps}


def system_busy() -> float:
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


# --- from the database ----------------------------------------------------------------


def window_latency(
    conn: psycopg.Connection[Any], t0: float, t1: float, work_scale: float
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
    assert row is not None
    ms = [float(x) * 1000 for x in (row[1] or [0.0, 0.0, 0.0])]
    return int(row[0]), ms, float(row[2] or 0.0) * 1000


def as_observer(conn: psycopg.Connection[Any]) -> None:
    """Run this connection's backend at the lowest CPU priority (best effort: the bench
    owns the private server's processes). On 2 cores, the minute rows' percentile over
    a minute of rows took CPU from the pipeline they measure, once a minute."""
    pid = int(one(conn, "SELECT pg_backend_pid()"))
    # Its parallel workers would be other processes, at normal priority: none.
    conn.execute("SET max_parallel_workers_per_gather = 0")
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except OSError:
        pass


def one(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def lifetime_done(conn: psycopg.Connection[Any]) -> int:
    """Tasks ever done (the rollup), whatever retention removed since."""
    return int(one(conn, "SELECT coalesce(sum(done), 0) FROM task_totals"))


def pg_counters(conn: psycopg.Connection[Any]) -> dict[str, float]:
    """Cluster WAL and this database's commits (PostgreSQL publishes these at most once a
    second per busy backend: approximate over a short window)."""
    row = conn.execute(
        "SELECT (SELECT wal_records FROM pg_stat_wal), (SELECT wal_bytes FROM pg_stat_wal),"
        " (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())"
    ).fetchone()
    assert row is not None
    return {"wal_records": float(row[0]), "wal_bytes": float(row[1]), "commits": float(row[2])}


def top_statements(
    conn: psycopg.Connection[Any], window: float, n: int = 10
) -> list[dict[str, Any]]:
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


def series(
    conn: psycopg.Connection[Any], start: float, end: float
) -> list[tuple[int, int, float, float]]:
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


class MinuteRows:
    """During the window, one row per minute as the minute ends (an hour-long soak shows
    its progress): tasks/s, p99 beyond each task's own work, PostgreSQL CPU per 1,000
    tasks, database size on disk, the done partitions stored, and the daemons' RSS (so
    growth is told from warming up: a leak climbs every minute, a heap that settles
    flattens)."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        pg_pid: int,
        work_scale: float,
        t0: float,
        m0: float,
        every_s: float = 60.0,
        rss: Callable[[], dict[str, float]] = dict,
    ) -> None:
        self.conn, self.pg_pid, self.work_scale, self.rss = conn, pg_pid, work_scale, rss
        self.rows: list[dict[str, Any]] = []
        self.every_s = every_s
        self.start_wall, self.next_at = t0, m0 + every_s
        self.cpu = tree_cpu(pg_pid)

    def due(self, now: float) -> dict[str, Any] | None:
        """The row of the minute that ended at `now` (monotonic), if one did."""
        if now < self.next_at:
            return None
        self.next_at += self.every_s
        end = time.time()
        cpu = tree_cpu(self.pg_pid)
        done, _, beyond = window_latency(self.conn, self.start_wall, end, self.work_scale)
        size, parts = self.conn.execute(
            "SELECT pg_database_size(current_database()),"
            " (SELECT count(*) FROM pg_inherits WHERE inhparent = 'tasks_done'::regclass)"
        ).fetchone() or (0, 0)
        row = {
            "minute": len(self.rows) + 1,
            "tasks_per_s": done / max(end - self.start_wall, 1e-6),
            "p99_beyond_work_ms": beyond,
            "pg_cpu_s_per_1k": (cpu - self.cpu) / max(done / 1000, 1e-6),
            "db_size_mb": int(size) / 2**20,
            "partitions": int(parts),
            **{f"{role}_rss_mb": mb for role, mb in self.rss().items()},
        }
        self.rows.append(row)
        self.start_wall, self.cpu = end, cpu
        return row


def first_vs_last(minutes: list[dict[str, Any]], n: int = SOAK_EDGE_MINUTES) -> dict[str, Any]:
    """Mean of the first n minutes against the last n, and last / first, per figure."""
    n = max(1, min(n, len(minutes) // 2 or 1))
    out: dict[str, Any] = {"minutes_each": n}
    keys = ["tasks_per_s", "p99_beyond_work_ms", "pg_cpu_s_per_1k", "db_size_mb"]
    keys += [k for k in minutes[0] if k.endswith("_rss_mb")] if minutes else []
    for key in keys:
        first = statistics.fmean(m[key] for m in minutes[:n])
        last = statistics.fmean(m[key] for m in minutes[-n:])
        out[key] = {"first": first, "last": last, "ratio": last / first if first else None}
    return out


def ceiling(url: str, seconds: float, pg_pid: int) -> dict[str, Any]:
    """The yardstick: the pipeline's three writes (insert, -> processing, -> done) from
    one Python process with psycopg, in batches of 1,000, one autocommit statement each,
    on a plain table (primary key only, no trigger) in a schema of its own on the same
    server. Our own schema can change; this must not, or the ratio means nothing."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS ceiling CASCADE")
        conn.execute("CREATE SCHEMA ceiling")
        conn.execute("SET search_path = ceiling")
        for statement in PLAIN.split(";"):
            conn.execute(statement)
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


def bracketed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The yardstick run on both sides of our window, as one: tasks over seconds, CPU per
    1,000 weighted by tasks, both runs' tasks/s kept. A machine whose speed drifts within
    minutes (other tenants; 1.7x between two 5 s runs minutes apart was seen here) then
    moves ours and the yardstick alike, and a drift too large to trust shows."""
    runs = (before, after)
    tasks = sum(r["tasks"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {
        **before,
        "tasks_per_s": tasks / max(seconds, 1e-6),
        "tasks": tasks,
        "seconds": round(seconds, 2),
        "cpu_s_per_1k": {
            n: sum(r["cpu_s_per_1k"][n] * r["tasks"] for r in runs) / max(tasks, 1)
            for n in before["cpu_s_per_1k"]
        },
        "before_tasks_per_s": before["tasks_per_s"],
        "after_tasks_per_s": after["tasks_per_s"],
    }
