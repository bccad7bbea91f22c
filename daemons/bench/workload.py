"""One workload on a fresh database: the real daemons flat out (or at a given rate), a
warm-up, a measured window, the correctness check, and the figures of that window.

    run_workload(run, opts, "zero", stamp, progress)
      start_daemons   consumers, then producers, on a bundle of their own
      Phase.tick      the warm-up, then the window: progress, liveness, RSS, minute rows
      Window          what is sampled at the window's two ends (CPU, RSS, pg counters)
      check           producers stopped, consumers idle: nothing lost or counted twice
      figures         the result: tasks/s, latency, CPU per 1k, RSS, pg, the series
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from daemons.bench import profile
from daemons.bench.measure import (
    CpuSnapshot,
    MinuteRows,
    as_observer,
    bracketed,
    ceiling,
    first_vs_last,
    lifetime_done,
    one,
    peak_rss_mb,
    pg_counters,
    rss_mb,
    series,
    top_statements,
    window_latency,
)
from daemons.bench.options import WORKLOADS, Options
from daemons.bench.private import PrivateBundle
from daemons.bench.process import BIN, STOP_TIMEOUT_S, Daemon
from daemons.bench.report import MAX_RATE, Progress, print_minute
from daemons.bench.run import Run
from daemons.bench.scrape import metric_sum, metrics_url

HIGH_LIMIT = "1000000000"  # CONSUMER_RATE_LIMIT: never the limit
ROLES = ("producer", "consumer")


def role(name: str) -> str:
    """`consumer_2` -> `consumer`: the instances of a role are added up."""
    return name.split("_")[0]


def knobs_for(opts: Options, workload: str, rate: str) -> dict[str, str]:
    """The daemons' settings that differ from the defaults; `--set` wins (make soak)."""
    return {
        "PRODUCER_RATE": rate,
        "PRODUCER_MAX_BACKLOG": str(opts.backlog),
        "CONSUMER_RATE_LIMIT": HIGH_LIMIT,
        "CONSUMER_MAX_IN_FLIGHT": str(opts.max_in_flight),
        "CONSUMER_WORK_SCALE": WORKLOADS[workload],
        **opts.overrides,
    }


@dataclass
class Phase:
    """The daemons of one workload while it runs, and what is watched meanwhile."""

    name: str
    daemons: dict[str, Daemon]  # producer, consumer, consumer_1, ..., producer_1, ...
    started: float  # wall time the producers were started: the charts' zero
    rss_seen: dict[str, float] = field(default_factory=dict)

    @property
    def done_urls(self) -> list[str]:
        return [
            metrics_url(d.env["CONSUMER_METRICS_PORT"])
            for name, d in self.daemons.items()
            if role(name) == "consumer"
        ]

    def done_counted(self) -> int | None:
        """The consumers' done counters added up (None while one cannot be read). The
        progress line uses them: a count query would cost PostgreSQL a few % of a core."""
        counts = [metric_sum(url, "tasks_done_total") for url in self.done_urls]
        return None if None in counts else int(sum(c or 0 for c in counts))

    def pids(self) -> dict[str, int]:
        return {name: d.pid for name, d in self.daemons.items()}

    def rss(self) -> dict[str, float]:
        """RSS MB of the first instance of each role, now."""
        return {r: rss_mb(self.daemons[r].pid) for r in ROLES}

    def tick(
        self, what: str, seconds: float, progress: Progress, minutes: MinuteRows | None = None
    ) -> None:
        """Watch for `seconds`: every second, each daemon alive (else fail), its RSS, and
        the done rate on the progress line; a soak's row as each minute ends."""
        t_start = time.monotonic()
        until = t_start + seconds
        last_n, last_t = self.done_counted(), t_start
        while True:
            now = time.monotonic()
            row = minutes.due(now) if minutes is not None else None
            if row is not None:
                print_minute(row, progress)
            if now >= until:
                return
            time.sleep(min(1.0, until - now))
            for name, d in self.daemons.items():
                d.check()
                self.rss_seen[name] = max(self.rss_seen.get(name, 0.0), rss_mb(d.pid))
            n, t = self.done_counted(), time.monotonic()
            now_rate = (
                f"{(n - last_n) / max(t - last_t, 1e-6):,.0f}"
                if n is not None and last_n is not None
                else "?"
            )
            last_n, last_t = n, t
            progress.show(
                f"[{self.name}] {what} {t - t_start:4.0f}/{seconds:.0f} s"
                f"  done {'?' if n is None else f'{n:,}'}  now {now_rate} tasks/s"
            )


def start_daemons(bundle: PrivateBundle, opts: Options, knobs: dict[str, str], name: str) -> Phase:
    """Consumers first, then producers; instances beyond the first get their own ports,
    and producers target every consumer (round_robin)."""
    consumer_envs: list[dict[str, str]] = [{}] + [
        bundle.extra_consumer_env() for _ in range(opts.consumers - 1)
    ]
    consumers = [bundle.consumer(**knobs, **e) for e in consumer_envs]
    target: dict[str, str] = {}
    if opts.consumers > 1:
        listen = ",".join(c.env["CONSUMER_LISTEN"] for c in consumers)
        target = {"PRODUCER_CONSUMER_TARGET": f"ipv4:{listen}"}
    started = time.time()
    producer_envs: list[dict[str, str]] = [{}] + [
        bundle.extra_producer_env() for _ in range(opts.producers - 1)
    ]
    producers = [bundle.producer(**knobs, **target, **e) for e in producer_envs]
    daemons = {"producer": producers[0], "consumer": consumers[0]}
    daemons.update({f"consumer_{i}": d for i, d in enumerate(consumers[1:], 1)})
    daemons.update({f"producer_{i}": d for i, d in enumerate(producers[1:], 1)})
    return Phase(name, daemons, started)


def start_spies(run: Run, opts: Options, phase: Phase, stamp: str) -> profile.Spies:
    spies: profile.Spies = {}
    if opts.py_spy:
        for name, pid in phase.pids().items():
            out = opts.out / f"bench-{phase.name}-{name}-{stamp}.folded.txt"
            spy = profile.start_record(BIN / "py-spy", pid, opts.seconds, out)
            run.others.append(spy)
            spies[name] = (spy, out)
    return spies


@dataclass
class Window:
    """The measured window: what was sampled at its two ends."""

    t0: float
    t1: float
    lifetime_done: int  # tasks that reached done in it, from the rollup
    cpu: dict[str, float]  # CPU seconds by role, postgres, bench, other
    rss_growth_pct: dict[str, float]
    peak_rss_mb: dict[str, float]
    pg_before: dict[str, float]
    pg_after: dict[str, float]
    statements: list[dict[str, Any]]
    minutes: list[dict[str, Any]]

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


def measure_window(
    run: Run,
    opts: Options,
    phase: Phase,
    conn: psycopg.Connection[Any],
    work_scale: float,
    progress: Progress,
) -> Window:
    if run.pg_stats:
        conn.execute("SELECT pg_stat_statements_reset()")
    pids, pg = phase.pids(), {"postgres": run.pg_pid}
    pg_before = pg_counters(conn)
    lifetime_before = lifetime_done(conn)
    before = CpuSnapshot.take(pids, pg)
    rss_start = phase.rss()
    t0 = time.time()
    minutes = (
        MinuteRows(
            conn,
            run.pg_pid,
            work_scale,
            t0,
            time.monotonic(),
            opts.row_seconds,
            rss=phase.rss,
        )
        if opts.minute_rows
        else None
    )
    phase.tick("measure", opts.seconds, progress, minutes)
    t1 = time.time()
    lifetime_at_t1 = lifetime_done(conn)
    # Memory growth over the window (the soak's figure): RSS at its end vs its start.
    rss_end = phase.rss()
    rss_growth = {r: (rss_end[r] - rss_start[r]) / max(rss_start[r], 1e-6) * 100 for r in ROLES}
    cpu = CpuSnapshot.take(pids, pg).minus(before)
    for extra in [name for name in pids if "_" in name]:  # sum instances per role
        cpu[role(extra)] += cpu.pop(extra)
    pg_after = pg_counters(conn)
    statements = top_statements(conn, t1 - t0) if run.pg_stats else []
    peak_all = {
        name: max(peak_rss_mb(pid), phase.rss_seen.get(name, 0.0)) for name, pid in pids.items()
    }
    peak = {r: max(v for name, v in peak_all.items() if role(name) == r) for r in ROLES}
    progress.done()
    return Window(
        t0,
        t1,
        lifetime_at_t1 - lifetime_before,
        cpu,
        rss_growth,
        peak,
        pg_before,
        pg_after,
        statements,
        minutes.rows if minutes is not None else [],
    )


def check(phase: Phase, conn: psycopg.Connection[Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Correctness, every run: stop the producers, let the consumers go idle, then the
    consumers' done counters must equal the database (nothing counted twice) and, once
    they have drained, nothing may be left `processing` (nothing lost; `received` tasks
    the producers abandoned are redelivered by the next run). (exit codes, the check)"""
    exit_codes = {
        name: d.stop(timeout_s=STOP_TIMEOUT_S)
        for name, d in phase.daemons.items()
        if role(name) == "producer"
    }
    idle_by = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < idle_by and one(conn, "SELECT sum(processing) FROM task_counts"):
        time.sleep(0.2)
    counted = sum(metric_sum(url, "tasks_done_total") or 0 for url in phase.done_urls)
    # Lifetime done (the rollup): retention may have removed rows in the meantime.
    db_done = lifetime_done(conn)
    exit_codes.update(
        {
            name: d.stop(timeout_s=STOP_TIMEOUT_S)
            for name, d in phase.daemons.items()
            if role(name) == "consumer"
        }
    )
    left = one(conn, "SELECT count(*) FROM tasks WHERE state = 'processing'")
    return exit_codes, {
        "double_counted": int(counted - db_done),
        "lost_processing": int(left),
        "exit_codes_ok": all(code == 0 for code in exit_codes.values()),
    }


def figures(
    opts: Options,
    phase: Phase,
    conn: psycopg.Connection[Any],
    w: Window,
    knobs: dict[str, str],
) -> dict[str, Any]:
    """The window's figures, from the database once the daemons are stopped."""
    work_scale = float(knobs["CONSUMER_WORK_SCALE"])
    stored, (p50, p95, p99), p99_beyond_work = window_latency(conn, w.t0, w.t1, work_scale)
    # Retention may have removed part of the window's rows by now (make soak): the
    # count comes from the lifetime totals; the percentiles, from the rows left.
    done = max(stored, w.lifetime_done)
    per_second = series(conn, phase.started, w.t1)
    states = dict(conn.execute("SELECT state::text, count(*) FROM tasks GROUP BY 1").fetchall())
    k = max(done, 1) / 1000
    since = phase.started
    in_window = [n for s, n, _, _ in per_second if w.t0 - since <= s < w.t1 - since - 1]
    pg = {key: w.pg_after[key] - w.pg_before[key] for key in w.pg_before}
    result: dict[str, Any] = {
        "work_scale": work_scale,
        "consumers": opts.consumers,
        "producers": opts.producers,
        "tasks_per_s": done / w.seconds,
        "done_in_window": done,
        "window_s": round(w.seconds, 2),
        "min_1s_tasks_per_s": min(in_window) if in_window else 0,
        "max_1s_tasks_per_s": max(in_window) if in_window else 0,
        "rate_offered": knobs["PRODUCER_RATE"],
        "latency_ms": {"p50": p50, "p95": p95, "p99": p99, "p99_beyond_work": p99_beyond_work},
        "latency_from_stored_rows": stored,
        "cpu_s_per_1k": {n: w.cpu[n] / k for n in ("producer", "consumer", "postgres")},
        "cpu_cores": {
            n: w.cpu[n] / w.seconds for n in ("producer", "consumer", "postgres", "bench", "other")
        },
        "peak_rss_mb": w.peak_rss_mb,
        "rss_growth_pct": w.rss_growth_pct,
        "postgres": {
            "commits_per_1k": pg["commits"] / k,
            "wal_bytes_per_task": pg["wal_bytes"] / max(done, 1),
            "wal_records_per_task": pg["wal_records"] / max(done, 1),
        },
        "final_states": {str(s): int(n) for s, n in states.items()},
        "settings": knobs,
        "series": [
            {"t": s, "tasks": n, "p50_ms": round(a, 2), "p99_ms": round(b, 2)}
            for s, n, a, b in per_second
        ],
        "window_from_s": round(w.t0 - since, 2),
    }
    if w.statements:
        result["postgres"]["statements"] = w.statements
    if w.minutes:
        result["minutes"] = w.minutes
        result["minutes_first_vs_last"] = first_vs_last(w.minutes)
    return result


def run_workload(
    run: Run,
    opts: Options,
    workload: str,
    stamp: str,
    progress: Progress,
    rate: str = MAX_RATE,
    label: str = "",
) -> dict[str, Any]:
    """One workload on a fresh database: flat out, or at `rate` tasks/s offered (the
    half-rate phase, `label` e.g. "zero@half" names its database, files and progress)."""
    name = label or workload
    knobs = knobs_for(opts, workload, rate)
    bundle = run.phase(name)
    yardstick = opts.ceiling_seconds > 0 and not label

    def plain_ceiling(when: str) -> dict[str, Any]:
        progress.show(f"[{name}] ceiling {when}: a plain table, one psycopg process")
        out = ceiling(bundle.db_url, opts.ceiling_seconds, run.pg_pid)
        progress.done()
        return out

    before = plain_ceiling("before") if yardstick else {}
    phase = start_daemons(bundle, opts, knobs, name)
    with psycopg.connect(bundle.db_url, autocommit=True) as conn:
        as_observer(conn)
        phase.tick("warm-up", opts.warmup, progress)
        spies = start_spies(run, opts, phase, stamp)
        window = measure_window(
            run, opts, phase, conn, float(knobs["CONSUMER_WORK_SCALE"]), progress
        )
        profile.wait(spies)  # their window is over: out of the way of the check
        exit_codes, correct = check(phase, conn)
        result = figures(opts, phase, conn, window, knobs)
    result["exit_codes"], result["check"] = exit_codes, correct
    if spies:
        result["profile"] = profile.finish(spies, opts.seconds, name, stamp)
    if yardstick:
        result["ceiling"] = bracketed(before, plain_ceiling("after"))
        result["ratio_to_ceiling"] = result["tasks_per_s"] / result["ceiling"]["tasks_per_s"]
    run.end_phase(bundle)
    return result
