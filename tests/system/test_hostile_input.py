"""Random and hostile requests against a live consumer: every answer has the right
status code and the database changes only as the answer says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from tests.conftest import BIN, sql, states
from tests.system.harness import Bundle, self_signed_cert, wait_until

I32 = st.integers(-(2**31), 2**31 - 1)
task_st = st.builds(
    lambda id_, t, v: (id_, t, v),
    st.one_of(st.just(0), st.integers(1, 60), st.integers(-5, -1), st.integers(10**9, 2**62)),
    st.one_of(st.integers(0, 9), I32),
    st.one_of(st.integers(0, 99), I32),
)


def _valid(t: tuple[int, int, int]) -> bool:
    return t[0] >= 0 and 0 <= t[1] <= 9 and 0 <= t[2] <= 99


def _snapshot(url: str) -> list[tuple[object, ...]]:
    return sql(url, "SELECT id, type, value, state::text FROM tasks ORDER BY id")


@pytest.fixture
def live(bundle: Bundle):  # type: ignore[no-untyped-def]
    bundle.consumer(CONSUMER_MAX_BATCH="50", CONSUMER_WORK_SCALE="0", CONSUMER_RATE_LIMIT="100000")
    sql(
        bundle.db_url,
        "INSERT INTO tasks (type, value, creation_time, last_update_time)"
        " SELECT g %% 10, g %% 100, 0, 0 FROM generate_series(1, 60) g",
    )
    with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
        yield bundle, tasks_pb2_grpc.ConsumerStub(channel)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(task_st, min_size=0, max_size=60))
def test_random_batches(live, batch: list[tuple[int, int, int]]) -> None:  # type: ignore[no-untyped-def]
    bundle, stub = live
    wait_until(lambda: states(bundle.db_url)["processing"] == 0, 10, "quiet")
    before = _snapshot(bundle.db_url)
    request = tasks_pb2.SubmitBatchRequest(
        tasks=[tasks_pb2.Task(id=i, type=t, value=v) for i, t, v in batch]
    )
    ids_nonzero = [i for i, _, _ in batch if i]
    bad = (
        not batch
        or len(batch) > 50
        or not all(_valid(t) for t in batch)
        or len(ids_nonzero) != len(set(ids_nonzero))
    )
    try:
        reply = stub.SubmitBatch(request, timeout=10)
    except grpc.RpcError as err:
        assert bad, (err.code(), err.details())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _snapshot(bundle.db_url) == before
        return
    assert not bad
    by_id = {row[0]: row for row in before}
    S = tasks_pb2
    for (task_id, _, _), new_id, status in zip(batch, reply.ids, reply.statuses, strict=True):
        if task_id == 0:
            assert status == S.TASK_STATUS_ACCEPTED and new_id > 0
        elif task_id not in by_id:
            assert status == S.TASK_STATUS_INVALID
        elif by_id[task_id][3] == "received":
            assert status == S.TASK_STATUS_ACCEPTED
        else:
            assert status == S.TASK_STATUS_DUPLICATE
    wait_until(lambda: states(bundle.db_url)["processing"] == 0, 10, "work done")
    after = {row[0]: row for row in _snapshot(bundle.db_url)}
    for task_id, row in by_id.items():
        accepted = task_id in ids_nonzero and row[3] == "received"
        assert after[task_id][3] == ("done" if accepted else row[3])
        assert after[task_id][1:3] == row[1:3]  # content never changes


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(task=task_st)
def test_random_single_tasks(live, task: tuple[int, int, int]) -> None:  # type: ignore[no-untyped-def]
    bundle, stub = live
    before = len(_snapshot(bundle.db_url))
    try:
        reply = stub.Submit(
            tasks_pb2.SubmitRequest(task=tasks_pb2.Task(id=task[0], type=task[1], value=task[2])),
            timeout=10,
        )
    except grpc.RpcError as err:
        if not _valid(task):
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert err.code() == grpc.StatusCode.NOT_FOUND and task[0] > 60
        assert len(_snapshot(bundle.db_url)) == before
        return
    assert _valid(task)
    assert reply.status in (tasks_pb2.TASK_STATUS_ACCEPTED, tasks_pb2.TASK_STATUS_DUPLICATE)


def test_oversized_messages_deadlines_and_cancellation(live) -> None:  # type: ignore[no-untyped-def]
    bundle, stub = live
    before = _snapshot(bundle.db_url)
    huge = tasks_pb2.SubmitBatchRequest(
        tasks=[tasks_pb2.Task(type=1, value=1, creation_time=1.0)] * 400_000
    )  # ~6 MB, over the 4 MB default limit
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitBatch(huge, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitBatch(
            tasks_pb2.SubmitBatchRequest(tasks=[tasks_pb2.Task(type=1, value=1)]), timeout=0.000001
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    future = stub.SubmitBatch.future(
        tasks_pb2.SubmitBatchRequest(tasks=[tasks_pb2.Task(type=1, value=1)] * 10), timeout=10
    )
    future.cancel()
    # Whatever a cancelled call managed to register is still worked to `done`.
    wait_until(lambda: states(bundle.db_url)["processing"] == 0, 10, "no stuck work")
    assert all(r in _snapshot(bundle.db_url) for r in before)


def test_tls_link_and_plaintext_refused(bundle: Bundle, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    bundle.consumer(CONSUMER_TLS_CERT=str(cert), CONSUMER_TLS_KEY=str(key), CONSUMER_WORK_SCALE="0")
    producer = bundle.producer(
        PRODUCER_RATE="500",
        PRODUCER_TOTAL="500",
        PRODUCER_TLS_CA=str(cert),
        PRODUCER_TLS_SERVER_NAME="localhost",
    )
    assert producer.wait(30) == 0
    assert states(bundle.db_url)["done"] == 500
    with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            tasks_pb2_grpc.ConsumerStub(channel).Submit(
                tasks_pb2.SubmitRequest(task=tasks_pb2.Task(type=1, value=1)), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert states(bundle.db_url)["done"] == 500
    # Half a TLS configuration is a settings error, named, exit 2.
    out = subprocess.run(
        [str(BIN / "consumer")],
        env=bundle.env(CONSUMER_TLS_CERT=str(cert)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "CONSUMER_TLS_KEY" in out.stderr
