"""Prometheus metrics. Children of labelled metrics are created once and cached here,
so the per-task path only calls `.inc()` / `.observe()`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from daemons import commit, version

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
consumer_db_batch_size = Histogram(
    "consumer_db_batch_size",
    "Rows per state-transition statement",
    ["transition"],
    buckets=BATCH_BUCKETS,
)

REJECT_REASONS = ("rate_limit", "busy", "invalid", "duplicate", "draining")
rejected = {reason: tasks_rejected.labels(reason) for reason in REJECT_REASONS}
done_by_type = [tasks_done.labels(str(t)) for t in TYPES]
value_sum_by_type = [tasks_value_sum.labels(str(t)) for t in TYPES]
batch_processing = consumer_db_batch_size.labels("processing")
batch_done = consumer_db_batch_size.labels("done")


def serve(host: str, port: int) -> None:
    """Start /metrics on a daemon thread (port 0 = off)."""
    build_info.info({"version": version(), "commit": commit()})
    if port:
        start_http_server(port, addr=host)
