"""Reading a daemon from outside: its /metrics page (through prometheus_client's own
parser) and its gRPC health, for the tests, the chaos suite and the bench."""

from __future__ import annotations

import urllib.request
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


def metrics_url(port: int | str) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def scrape(url: str, timeout_s: float = 5.0) -> list[Sample]:
    """Every sample of a /metrics page; raises OSError when it cannot be read."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        text = reply.read().decode()
    return [
        Sample(sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric_sum(url: str, name: str, **labels: str) -> float | None:
    """Sum of the samples called `name` that carry `labels`; None when the page cannot be
    read (the daemon is starting or gone)."""
    try:
        samples = scrape(url, timeout_s=2)
    except (OSError, ValueError):
        return None
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def metric_positive(url: str, name: str) -> bool:
    value = metric_sum(url, name)
    return value is not None and value > 0


def serving(target: str) -> bool:
    """The consumer at `target` answers SERVING on the standard health service."""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
