"""Authenticated submitters (issue 16), against a real consumer over loopback: with
tokens configured, no token, a wrong one and one of the wrong length are UNAUTHENTICATED
and write nothing; the producer and Locust work with theirs; two clients hammering with
different tokens each get their share of admissions; mutual TLS refuses a client
without a certificate; a consumer other hosts can reach refuses to start open."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from tests.conftest import BIN, ROOT, free_port, states
from tests.system.harness import Bundle, scrape, self_signed_cert

TOKENS = {name: secrets.token_hex(24) for name in ("producer", "alice", "bob", "locust")}
TOKEN_SETTING = ",".join(f"{name}:{token}" for name, token in TOKENS.items())


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def one_task() -> tasks_pb2.SubmitRequest:
    return tasks_pb2.SubmitRequest(task=tasks_pb2.Task(type=1, value=1))


def batch(n: int) -> tasks_pb2.SubmitBatchRequest:
    return tasks_pb2.SubmitBatchRequest(tasks=[tasks_pb2.Task(type=2, value=0) for _ in range(n)])


def refused_by_reason(bundle: Bundle) -> dict[str, float]:
    return {
        labels["reason"]: value
        for name, labels, value in scrape(bundle.metrics_url("consumer"))
        if name == "consumer_auth_refused_total"
    }


def test_calls_without_a_valid_token_are_refused_and_write_nothing(bundle: Bundle) -> None:
    bundle.consumer(CONSUMER_AUTH_TOKENS=TOKEN_SETTING, CONSUMER_WORK_SCALE="0")
    good = TOKENS["alice"]
    wrong = {
        "missing": None,
        "invalid": secrets.token_hex(24),  # a wrong token, the right length
        "invalid ": good[:-1],  # the right token but one character short
        "malformed": good,  # no "Bearer "
    }
    with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
        stub = tasks_pb2_grpc.ConsumerStub(channel)
        for reason, token in wrong.items():
            metadata = None
            if token is not None:
                metadata = (("authorization", token),) if reason == "malformed" else bearer(token)
            for rpc, request in ((stub.Submit, one_task()), (stub.SubmitBatch, batch(5))):
                with pytest.raises(grpc.RpcError) as err:
                    rpc(request, timeout=5, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, reason
        assert sum(states(bundle.db_url).values()) == 0  # nothing written
        counted = refused_by_reason(bundle)
        assert counted == {"missing": 2.0, "invalid": 4.0, "malformed": 2.0}, counted
        # The health check asks for nothing; the right token gets in.
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = stub.Submit(one_task(), timeout=5, metadata=bearer(good))
        assert reply.status == tasks_pb2.TASK_STATUS_ACCEPTED


def test_the_producer_and_locust_work_with_their_tokens(bundle: Bundle, tmp_path: Path) -> None:
    bundle.consumer(CONSUMER_AUTH_TOKENS=TOKEN_SETTING, CONSUMER_WORK_SCALE="0")
    producer = bundle.producer(
        PRODUCER_RATE="500", PRODUCER_TOTAL="300", PRODUCER_AUTH_TOKEN=TOKENS["producer"]
    )
    assert producer.wait(30) == 0
    assert states(bundle.db_url)["done"] == 300
    locust = subprocess.run(
        [
            str(BIN / "locust"),
            "-f",
            str(ROOT / "loadtest"),
            "--headless",
            *("-u", "2", "-r", "2", "-t", "3s"),
            *("--host", f"127.0.0.1:{bundle.grpc_port}", "--only-summary"),
        ],
        cwd=tmp_path,
        env=bundle.env(LOCUST_AUTH_TOKEN=TOKENS["locust"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert locust.returncode == 0, locust.stdout[-3000:] + locust.stderr[-3000:]
    assert "UNAUTHENTICATED" not in locust.stderr + locust.stdout
    assert states(bundle.db_url)["done"] > 300
    assert TOKENS["locust"] not in locust.stdout + locust.stderr


def test_two_clients_hammering_each_get_their_share(bundle: Bundle) -> None:
    """alice sends four times as often as bob; the limiter still splits its 200 tasks a
    second about evenly between them (without fairness alice took about 80 %)."""
    bundle.consumer(
        CONSUMER_AUTH_TOKENS=TOKEN_SETTING,
        CONSUMER_RATE_LIMIT="200",
        CONSUMER_RATE_PERIOD="1",
        CONSUMER_WORK_SCALE="0",
    )
    accepted: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + 4.0

    def hammer(who: str) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
            stub = tasks_pb2_grpc.ConsumerStub(channel)
            while time.monotonic() < deadline:
                reply = stub.SubmitBatch(batch(20), timeout=5, metadata=bearer(TOKENS[who]))
                n = sum(1 for s in reply.statuses if s == tasks_pb2.TASK_STATUS_ACCEPTED)
                with lock:
                    accepted[who] += n

    threads = [threading.Thread(target=hammer, args=(who,)) for who in ["alice"] * 4 + ["bob"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    total = accepted["alice"] + accepted["bob"]
    assert total <= 200 * 5, accepted  # the limit holds for both together
    assert accepted["bob"] >= 0.35 * total and accepted["alice"] >= 0.35 * total, accepted


def test_mutual_tls_refuses_a_client_without_a_certificate(bundle: Bundle, tmp_path: Path) -> None:
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    server_dir.mkdir()
    client_dir.mkdir()
    cert, key = self_signed_cert(server_dir)
    client_cert, client_key = self_signed_cert(client_dir)  # its own CA
    bundle.consumer(
        CONSUMER_TLS_CERT=str(cert),
        CONSUMER_TLS_KEY=str(key),
        CONSUMER_TLS_CLIENT_CA=str(client_cert),
        CONSUMER_WORK_SCALE="0",
    )
    producer = bundle.producer(
        PRODUCER_RATE="500",
        PRODUCER_TOTAL="200",
        PRODUCER_TLS_CA=str(cert),
        PRODUCER_TLS_SERVER_NAME="localhost",
        PRODUCER_TLS_CERT=str(client_cert),
        PRODUCER_TLS_KEY=str(client_key),
    )
    assert producer.wait(30) == 0
    assert states(bundle.db_url)["done"] == 200
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{bundle.grpc_port}", creds, options) as channel:
        with pytest.raises(grpc.RpcError) as err:
            tasks_pb2_grpc.ConsumerStub(channel).Submit(one_task(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sum(states(bundle.db_url).values()) == 200


def test_a_consumer_reachable_from_other_hosts_refuses_to_start_open(
    bundle: Bundle, tmp_path: Path
) -> None:
    listen = f"0.0.0.0:{free_port()}"
    out = subprocess.run(
        [str(BIN / "consumer")],
        env=bundle.env(CONSUMER_LISTEN=listen),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "CONSUMER_LISTEN" in lines[0] and "CONSUMER_AUTH_TOKENS" in lines[0]
    for allowed in ({"CONSUMER_AUTH_TOKENS": TOKEN_SETTING}, {"CONSUMER_INSECURE_LISTEN": "true"}):
        ok = subprocess.run(
            [str(BIN / "consumer"), "--explain"],
            env=bundle.env(CONSUMER_LISTEN=listen, **allowed),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
        assert all(token not in ok.stdout for token in TOKENS.values())
