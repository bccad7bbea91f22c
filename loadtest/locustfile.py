"""gRPC load against the consumer.

    locust -f loadtest                                     # web UI on http://localhost:8089
    locust -f loadtest --headless -u 20 -r 20 -t 15s       # what `make loadtest` runs

The host defaults to the consumer's listen address (CONSUMER_LISTEN from the
environment or .env, else 127.0.0.1:50051); --host HOST:PORT overrides it.

Statistics rows:
  grpc Submit, grpc SubmitBatch     one per RPC: latency, failures (real errors)
  grpc Submit (refused)             RESOURCE_EXHAUSTED: the consumer's limits at work
  task accepted, task rate limited, task busy, task duplicate, task invalid id
                                    one per task sent (single or in a batch), so their
                                    RPS is tasks per second by outcome; never failures

The run exits 1 when real errors exceed --max-error-ratio (default 1 %) of the RPCs;
refusals are not errors. A consumer that serves TLS: --tls-ca CA.pem [--tls-server-name]
[--grpc-client-cert C.pem --grpc-client-key K.pem]; one that wants a token:
--auth-token (or LOCUST_AUTH_TOKEN).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import grpc
from grpc_user import REQUEST_TYPE, GrpcUser
from locust import TaskSet, events, task
from locust.runners import WorkerRunner

from daemons.errors import SettingsError
from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from daemons.settings import ConsumerSettings, load

log = logging.getLogger("loadtest")

TASK_TYPE = "task"
OUTCOME: dict[int, str] = {
    tasks_pb2.TASK_STATUS_ACCEPTED: "accepted",
    tasks_pb2.TASK_STATUS_RATE_LIMITED: "rate limited",
    tasks_pb2.TASK_STATUS_BUSY: "busy",
    tasks_pb2.TASK_STATUS_DUPLICATE: "duplicate",
    tasks_pb2.TASK_STATUS_INVALID: "invalid id",
}
BATCH_SIZES = (10, 100)  # tasks per SubmitBatch, inclusive bounds


def consumer_address() -> str:
    """The consumer's listen address as a client should dial it."""
    try:
        listen = load(ConsumerSettings).listen
    except SettingsError:  # the consumer would not start either; dial the default
        listen = "127.0.0.1:50051"
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):  # a wildcard bind is reached on loopback
        host = "127.0.0.1"
    return f"{host}:{port}"


def new_task() -> tasks_pb2.Task:
    # id 0: the consumer registers the task itself.
    return tasks_pb2.Task(id=0, type=random.randrange(10), value=random.randrange(100))


class SubmitMix(TaskSet):
    """Single tasks as an external client sends them, and batches as the producer does."""

    user: ConsumerUser

    def _tasks(self, outcome: str, count: int, response_time_ms: float) -> None:
        fire = self.user.environment.events.request.fire
        for _ in range(count):
            fire(
                request_type=TASK_TYPE,
                name=outcome,
                response_time=response_time_ms,
                response_length=0,
                context={},
                exception=None,
            )

    @task(3)
    def submit(self) -> None:
        start = time.perf_counter()
        try:
            reply = self.user.stub.Submit(
                tasks_pb2.SubmitRequest(task=new_task()),
                timeout=self.user.timeout_s,
                metadata=self.user.metadata,
            )
        except grpc.RpcError as exc:  # reported by the interceptor
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # The reply carries no status; the detail names which limit refused it.
                busy = "in-flight" in (exc.details() or "")
                ms = (time.perf_counter() - start) * 1000
                self._tasks("busy" if busy else "rate limited", 1, ms)
            return
        self._tasks(OUTCOME.get(reply.status, "unknown"), 1, (time.perf_counter() - start) * 1000)

    @task(1)
    def submit_batch(self) -> None:
        request = tasks_pb2.SubmitBatchRequest(
            tasks=[new_task() for _ in range(random.randint(*BATCH_SIZES))]
        )
        start = time.perf_counter()
        try:
            reply = self.user.stub.SubmitBatch(
                request, timeout=self.user.timeout_s, metadata=self.user.metadata
            )
        except grpc.RpcError:  # reported by the interceptor
            return
        ms = (time.perf_counter() - start) * 1000
        counts: dict[int, int] = {}
        for status in reply.statuses:
            counts[status] = counts.get(status, 0) + 1
        for status, count in counts.items():
            self._tasks(OUTCOME.get(status, "unknown"), count, ms)


class ConsumerUser(GrpcUser):
    host = consumer_address()
    stub_class = tasks_pb2_grpc.ConsumerStub
    tasks = [SubmitMix]


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--max-error-ratio",
        type=float,
        default=0.01,
        env_var="LOCUST_MAX_ERROR_RATIO",
        help="exit 1 when failed RPCs exceed this share of all RPCs (refusals are not failures)",
    )
    parser.add_argument(
        "--tls-ca",
        default="",
        env_var="LOCUST_TLS_CA",
        help="PEM CA of the consumer's certificate: dial with TLS (default: plaintext)",
    )
    parser.add_argument(
        "--tls-server-name",
        default="",
        env_var="LOCUST_TLS_SERVER_NAME",
        help="name expected in the consumer's certificate (default: the host)",
    )
    parser.add_argument(
        "--grpc-client-cert",
        default="",
        env_var="LOCUST_GRPC_CLIENT_CERT",
        help="PEM client certificate, for a consumer with CONSUMER_TLS_CLIENT_CA",
    )
    parser.add_argument(
        "--grpc-client-key", default="", env_var="LOCUST_GRPC_CLIENT_KEY", help="its PEM key"
    )
    parser.add_argument(
        "--auth-token",
        default="",
        env_var="LOCUST_AUTH_TOKEN",
        help="bearer token sent with every call (a consumer with CONSUMER_AUTH_TOKENS)",
        is_secret=True,
    )


@events.quitting.add_listener
def _check_error_ratio(environment: Any, **_kwargs: Any) -> None:
    """Replace Locust's "any failure = exit 1" by a threshold on real errors."""
    if isinstance(environment.runner, WorkerRunner):
        return  # the master judges the whole run
    rpcs = [e for e in environment.stats.entries.values() if e.method == REQUEST_TYPE]
    total = sum(e.num_requests for e in rpcs)  # failures included
    failed = sum(e.num_failures for e in rpcs)
    refused = sum(e.num_requests for e in rpcs if e.name.endswith("(refused)"))
    exceptions = sum(e["count"] for e in environment.runner.exceptions.values())
    opts = environment.parsed_options
    limit = opts.max_error_ratio if opts else 0.01
    ratio = failed / total if total else 0.0
    # A headless run that made no call at all tested nothing; a web UI session closed
    # before any test started is fine.
    idle_ok = not total and not (opts and opts.headless)
    ok = (total > 0 or idle_ok) and ratio <= limit and not exceptions
    log.info(
        "loadtest_result rpcs=%d failed=%d (%.2f%%, limit %.2f%%) refused=%d exceptions=%d %s",
        total,
        failed,
        100 * ratio,
        100 * limit,
        refused,
        exceptions,
        "ok" if ok else "FAILED",
    )
    environment.process_exit_code = 0 if ok else 1
