"""Prometheus metrics. Children of labelled metrics are created once and cached here,
so the per-task path only calls `.inc()` / `.observe()`."""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, Info, generate_latest

from daemons import commit, version
from daemons.logs import fields
from daemons.sideport import SidePort

log = logging.getLogger(__name__)

TYPES = range(10)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WORK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

build_info = Info("tasks_build", "Version and commit of the running daemon")

# --- producer --------------------------------------------------------------------
tasks_produced = Counter("tasks_produced", "Tasks generated and stored as received")
producer_backlog = Gauge("producer_backlog", "Tasks not done (database count, estimated)")
producer_send_errors = Counter(
    "producer_send_errors", "Batch RPCs that failed, by gRPC code", ["code"]
)
producer_redelivered = Counter(
    "producer_redelivered", "Tasks resent by the redelivery sweep (stale or lease expired)"
)
producer_batch_size = Histogram(
    "producer_batch_size", "Tasks per batch RPC sent", buckets=BATCH_BUCKETS
)
producer_paused = Gauge("producer_paused", "1 while production is paused at max backlog")
producer_refused = Counter(
    "producer_refused", "Tasks the consumer refused for now (rate limit, busy), to resend"
)

# --- consumer --------------------------------------------------------------------
tasks_received = Counter("tasks_received", "Tasks that arrived in valid requests")
tasks_rejected = Counter("tasks_rejected", "Tasks refused, by reason", ["reason"])
tasks_processing = Gauge("tasks_processing", "Tasks admitted and not yet written done")
tasks_done = Counter("tasks_done", "Tasks this process moved to done, by type", ["type"])
tasks_value_sum = Counter(
    "tasks_value_sum", "Sum of value over tasks this process moved to done", ["type"]
)
task_processing_seconds = Histogram(
    "task_processing_seconds", "Work time of one task", buckets=WORK_BUCKETS
)
task_latency_seconds = Histogram(
    "task_latency_seconds", "Creation to done, per task", buckets=LATENCY_BUCKETS
)
# The health service's state as a number, for alerts: Prometheus cannot ask grpc.health.
consumer_serving = Gauge("consumer_serving", "1 while gRPC health is SERVING, 0 while NOT_SERVING")
consumer_db_batch_size = Histogram(
    "consumer_db_batch_size",
    "Rows per state-transition statement",
    ["transition"],
    buckets=BATCH_BUCKETS,
)

# Calls refused before the servicer (tokens configured): nothing was written.
consumer_auth_refused = Counter(
    "consumer_auth_refused", "RPCs refused UNAUTHENTICATED, by reason", ["reason"]
)
auth_refused = {r: consumer_auth_refused.labels(r) for r in ("missing", "malformed", "invalid")}

REJECT_REASONS = ("rate_limit", "busy", "invalid", "duplicate", "draining")
# Pre-created so dashboards see a series (at 0) before the first failure.
for _code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN"):
    producer_send_errors.labels(_code)
rejected = {reason: tasks_rejected.labels(reason) for reason in REJECT_REASONS}
done_by_type = [tasks_done.labels(str(t)) for t in TYPES]
value_sum_by_type = [tasks_value_sum.labels(str(t)) for t in TYPES]
batch_processing = consumer_db_batch_size.labels("processing")
batch_done = consumer_db_batch_size.labels("done")


# --- both daemons ------------------------------------------------------------------
tasks_in_state = Gauge(
    "tasks_in_state", "Tasks per state, from the database (short cache)", ["state", "service"]
)
db_pool_size = Gauge("db_pool_size", "Connections currently in the pool")
db_pool_available = Gauge("db_pool_available", "Idle connections in the pool")
db_pool_max = Gauge("db_pool_max", "Most connections the pool may open")
db_pool_requests_waiting = Gauge("db_pool_requests_waiting", "Callers waiting for a connection")
db_write_failing = Gauge("db_write_failing", "1 while writes to the database fail (outage)")
# Lifetime totals from the database's rollup (task_totals): the same in every process,
# whatever restarted or retention removed; dashboards take `max by (type)`.
done_in_db = Gauge(
    "tasks_done_in_db", "Tasks ever done, by type (database rollup)", ["type", "service"]
)
value_sum_in_db = Gauge(
    "tasks_value_sum_in_db",
    "Sum of value over tasks ever done, by type (rollup)",
    ["type", "service"],
)
# --- maintenance: partitions and retention ----------------------------------------
retention_seconds = Gauge("tasks_retention_seconds", "Configured TASKS_RETENTION (0 = keep all)")
partitions_stored = Gauge("tasks_partitions", "Done partitions attached (database)")
partitions_ahead = Gauge(
    "tasks_partitions_ahead", "Done partitions that start in the future (made ahead of need)"
)
oldest_done_age = Gauge(
    "tasks_oldest_done_age_seconds",
    "Age of the start of the oldest stored done partition: no stored done task is older",
)
partitions_dropped = Counter(
    "tasks_partitions_dropped", "Done partitions this process removed (retention)"
)
retention_rows_removed = Counter(
    "tasks_retention_removed", "Done tasks removed with their partitions by this process"
)
maintenance_seconds = Histogram(
    "tasks_maintenance_seconds",
    "Time of one maintenance pass this process ran (it held the maintenance lock)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class RpcMetrics:
    """Handled RPCs by method and code, and latency by method, for one side of the link
    (the consumer's server interceptor, the producer's client interceptor). Children are
    created once per method and code, not looked up per call."""

    def __init__(self, side: str, seen_by: str) -> None:
        self.handled = Counter(
            f"grpc_{side}_handled",
            f"RPCs completed on the {side}, by method and code",
            ["method", "code"],
        )
        self.seconds = Histogram(
            f"grpc_{side}_handling_seconds",
            f"RPC time seen by the {seen_by}",
            ["method"],
            buckets=RPC_BUCKETS,
        )
        self._handled: dict[tuple[str, str], Counter] = {}
        self._seconds: dict[str, Histogram] = {}

    def record(self, method: str, code: str, seconds: float) -> None:
        counter = self._handled.get((method, code))
        if counter is None:
            counter = self._handled[method, code] = self.handled.labels(method, code)
        counter.inc()
        timer = self._seconds.get(method)
        if timer is None:
            timer = self._seconds[method] = self.seconds.labels(method)
        timer.observe(seconds)


rpc_server = RpcMetrics("server", "server")
rpc_client = RpcMetrics("client", "client")

STATE_REFRESH_S = 2.0


class _StatsSource(Protocol):
    def stats(self) -> dict[str, int]: ...

    async def count_by_state(self) -> dict[str, int]: ...

    async def done_totals_by_type(self) -> dict[int, tuple[int, int]]: ...


async def refresh_db_gauges(store: _StatsSource, service: str) -> None:
    """Background task: pool gauges, tasks per state (one row kept exact by triggers) and
    lifetime totals per type (ten rows) from the database, every 2 s: right after
    restarts, no query per scrape or task."""
    children = {st: tasks_in_state.labels(st, service) for st in ("received", "processing", "done")}
    done_children = [done_in_db.labels(str(t), service) for t in TYPES]
    sum_children = [value_sum_in_db.labels(str(t), service) for t in TYPES]
    while True:
        stats = store.stats()
        db_pool_size.set(stats.get("pool_size", 0))
        db_pool_available.set(stats.get("pool_available", 0))
        db_pool_max.set(stats.get("pool_max", 0))
        db_pool_requests_waiting.set(stats.get("requests_waiting", 0))
        try:
            for st, n in (await store.count_by_state()).items():
                children[st].set(n)
            for t, (n, total) in (await store.done_totals_by_type()).items():
                done_children[t].set(n)
                sum_children[t].set(total)
        except Exception as exc:  # an outage must not kill the metrics loop
            log.debug("state_count_failed", extra=fields(error=str(exc)))
        await asyncio.sleep(STATE_REFRESH_S)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """Observe a whole batch: one increment per touched bucket instead of two locked
    increments per value (which showed at the top of the consumer's profile)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:  # a different client version
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    total.inc(sum(values))


async def page() -> tuple[str, bytes]:
    """The /metrics page, rendered on a worker thread: a scrape never stalls the loop."""
    return CONTENT_TYPE_LATEST, await asyncio.to_thread(generate_latest)


async def serve(host: str, port: int, read_timeout_s: float, max_connections: int) -> SidePort:
    """/metrics on the event loop (port 0 = off); see daemons.sideport for why not
    prometheus_client's threaded server. Stop it with `close()`."""
    build_info.info({"version": version(), "commit": commit()})
    side = SidePort({"/metrics": page}, read_timeout_s, max_connections, "try /metrics\n")
    return await side.start(host, port)
