"""End to end: both real daemons as subprocesses on loopback, a real PostgreSQL."""

import signal
import subprocess
import time

import grpc
import psycopg
import pytest

from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from tests.conftest import BIN, sql, states
from tests.system.harness import (
    Bundle,
    db_done_by_type,
    done_by_type,
    lifetime_by_type,
    wait_until,
)
from tests.system.ledgers import compare, consumer_ledger


def test_tasks_flow_to_done_and_logs_carry_running_sums(bundle: Bundle) -> None:
    consumer = bundle.consumer(CONSUMER_WORK_SCALE="0.2")
    producer = bundle.producer(PRODUCER_RATE="400")
    wait_until(lambda: states(bundle.db_url)["done"] >= 300, 30, "300 tasks done")
    producer.terminate()
    assert producer.wait(15) == 0
    wait_until(lambda: states(bundle.db_url)["processing"] == 0, 15, "nothing processing")
    consumer.terminate()
    assert consumer.wait(20) == 0
    st = states(bundle.db_url)
    assert st["received"] == 0 and st["processing"] == 0
    # One final line per task; the last running sum per type equals the database's.
    done_lines = consumer.events("task_done")
    assert len(done_lines) == st["done"]
    assert len({line["id"] for line in done_lines}) == len(done_lines)
    last: dict[int, int] = {}
    for line in done_lines:
        last[int(line["type"])] = int(line["type_sum"])
    assert last == {t: s for t, (_, s) in db_done_by_type(bundle.db_url).items()}
    stopped = consumer.events("consumer_stopped")[-1]
    assert int(stopped["done"]) == st["done"]
    assert producer.events("producer_stopped")[-1]["reason"] == "signal"


def test_max_backlog_stops_production_and_it_resumes(bundle: Bundle) -> None:
    producer = bundle.producer(PRODUCER_RATE="2000", PRODUCER_MAX_BACKLOG="200")
    producer.wait_event("producer_paused", 20)
    unfinished = lambda: sum(v for k, v in states(bundle.db_url).items() if k != "done")  # noqa: E731
    assert unfinished() == 200
    time.sleep(1.0)  # the cap holds over time, not just at one instant
    assert unfinished() == 200
    bundle.consumer(CONSUMER_WORK_SCALE="0.05")
    producer.wait_event("producer_resumed", 20)
    wait_until(lambda: states(bundle.db_url)["done"] >= 1000, 30, "production resumed")
    assert unfinished() <= 200


def test_total_ends_the_producer_with_status_0_and_all_done(bundle: Bundle) -> None:
    bundle.consumer(CONSUMER_WORK_SCALE="0.1")
    producer = bundle.producer(PRODUCER_RATE="2000", PRODUCER_TOTAL="1500")
    assert producer.wait(30) == 0
    assert producer.events("producer_stopped")[-1]["reason"] == "total_reached"
    wait_until(lambda: states(bundle.db_url)["done"] == 1500, 20, "all 1500 done")
    assert states(bundle.db_url) == {"received": 0, "processing": 0, "done": 1500}


def test_rate_limiter_bounds_the_done_rate(bundle: Bundle) -> None:
    bundle.consumer(CONSUMER_RATE_LIMIT="100", CONSUMER_RATE_PERIOD="0.5", CONSUMER_WORK_SCALE="0")
    bundle.producer(PRODUCER_RATE="2000", PRODUCER_MAX_BACKLOG="5000")
    wait_until(lambda: states(bundle.db_url)["done"] >= 100, 20, "first tasks done")
    start_done, t0 = states(bundle.db_url)["done"], time.monotonic()
    time.sleep(3.0)  # measuring a rate: the window is the point, not a synchronisation
    rate = (states(bundle.db_url)["done"] - start_done) / (time.monotonic() - t0)
    # 100 per 0.5 s = 200/s at most; the producer offers 2000/s.
    assert 120 <= rate <= 200 * 1.1, rate


def test_invalid_batches_are_refused_and_change_nothing(bundle: Bundle) -> None:
    consumer = bundle.consumer()
    ids = [
        r[0]
        for r in sql(
            bundle.db_url,
            "INSERT INTO tasks (type, value, creation_time, last_update_time)"
            " SELECT 1, 1, 0, 0 FROM generate_series(1, 3) RETURNING id",
        )
    ]
    before = sql(
        bundle.db_url,
        "SELECT id, type, value, state::text, last_update_time FROM tasks ORDER BY id",
    )
    with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
        stub = tasks_pb2_grpc.ConsumerStub(channel)
        for bad in ({"type": 10, "value": 1}, {"type": 1, "value": 100}, {"type": 1, "value": -1}):
            request = tasks_pb2.SubmitBatchRequest(
                tasks=[tasks_pb2.Task(id=ids[0], type=1, value=1), tasks_pb2.Task(id=ids[1], **bad)]
            )
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitBatch(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            with pytest.raises(grpc.RpcError) as err:
                stub.Submit(tasks_pb2.SubmitRequest(task=tasks_pb2.Task(**bad)), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitBatch(tasks_pb2.SubmitBatchRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            sql(
                bundle.db_url,
                "SELECT id, type, value, state::text, last_update_time FROM tasks ORDER BY id",
            )
            == before
        )
        # The consumer keeps serving: a good batch, then the same again (duplicates).
        good = tasks_pb2.SubmitBatchRequest(
            tasks=[tasks_pb2.Task(id=i, type=1, value=1) for i in ids]
        )
        reply = stub.SubmitBatch(good, timeout=5)
        assert list(reply.statuses) == [tasks_pb2.TASK_STATUS_ACCEPTED] * 3
        reply = stub.SubmitBatch(good, timeout=5)
        assert list(reply.statuses) == [tasks_pb2.TASK_STATUS_DUPLICATE] * 3
        # An external task without an id is registered by the consumer.
        single = stub.Submit(
            tasks_pb2.SubmitRequest(task=tasks_pb2.Task(type=2, value=3)), timeout=5
        )
        assert single.id > 0 and single.status == tasks_pb2.TASK_STATUS_ACCEPTED
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(
                tasks_pb2.SubmitRequest(task=tasks_pb2.Task(id=10**12, type=2, value=3)), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    wait_until(lambda: states(bundle.db_url)["done"] == 4, 10, "the 4 good tasks done")
    assert consumer.popen.poll() is None


def test_a_migration_behind_a_long_transaction_does_not_stall_the_pipeline(
    bundle: Bundle,
) -> None:
    """An operator's transaction holds `tasks` for 8 s. The live migration (0003 down,
    then up) needs an exclusive lock: it waits at most its lock_timeout (1 s) at a time,
    so writers queue behind it at most that long, and the migrator retries until the
    reader is gone. Without the timeout every writer would wait the whole 8 s."""
    bundle.consumer(CONSUMER_WORK_SCALE="0.1")
    producer = bundle.producer(PRODUCER_RATE="500")
    wait_until(lambda: states(bundle.db_url)["done"] >= 200, 20, "tasks flowing")
    # 0005 first (it does not touch `tasks`), so that the next down is 0003's.
    first = subprocess.run(
        [str(BIN / "migrator"), "down"], env=bundle.env(), capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    with psycopg.connect(bundle.db_url) as reader:
        reader.execute("SELECT count(*) FROM tasks").fetchone()  # holds its lock until rollback
        migrator = subprocess.Popen(
            [str(BIN / "migrator"), "down"],
            env=bundle.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        samples = []
        t_end = time.monotonic() + 8
        while time.monotonic() < t_end:
            samples.append((time.monotonic(), states(bundle.db_url)["done"]))
            time.sleep(0.2)
        assert migrator.poll() is None, "the migration must wait for the reader"
        reader.rollback()
    out, _ = migrator.communicate(timeout=60)
    assert migrator.returncode == 0, out
    assert "migration_waiting_for_lock" in out and "migration_rolled_back" in out, out
    # Longest stretch without a task reaching done while the reader held the table.
    stall, since = 0.0, samples[0]
    for t, done in samples[1:]:
        if done > since[1]:
            since = (t, done)
        stall = max(stall, t - since[0])
    assert stall < 3.0, f"pipeline stalled {stall:.1f} s behind the migration"
    assert samples[-1][1] > samples[0][1] + 500
    up = subprocess.run(
        [str(BIN / "migrator"), "up"], env=bundle.env(), capture_output=True, text=True, timeout=60
    )
    assert up.returncode == 0, up.stderr
    producer.terminate()
    assert producer.wait(15) == 0


def test_migrations_0003_and_0005_applied_and_rolled_back_while_running(bundle: Bundle) -> None:
    consumer = bundle.consumer(CONSUMER_WORK_SCALE="0.1")
    producer = bundle.producer(PRODUCER_RATE="500")
    env = bundle.env()
    for _ in range(2):
        # 0005 (counts in shards), then 0003 (comment), back, and up again: both.
        for step in (["down"], ["down"], ["up", "--one"], ["up"]):
            before = states(bundle.db_url)["done"]
            out = subprocess.run(
                [str(BIN / "migrator"), *step], env=env, capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, out.stderr
            wait_until(
                lambda b=before: states(bundle.db_url)["done"] > b + 50, 15, "tasks still flowing"
            )
    cols = [
        r[0]
        for r in sql(
            bundle.db_url,
            "SELECT column_name FROM information_schema.columns WHERE table_name='tasks'",
        )
    ]
    assert "comment" in cols
    producer.terminate()
    consumer_rc = None
    assert producer.wait(15) == 0
    wait_until(lambda: states(bundle.db_url)["processing"] == 0, 15, "drained")
    consumer.terminate()
    consumer_rc = consumer.wait(20)
    assert consumer_rc == 0
    for proc in (producer, consumer):
        bad = [
            line
            for line in proc.log().splitlines()
            if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
        ]
        assert not bad, bad


def test_second_signal_exits_at_once(bundle: Bundle) -> None:
    consumer = bundle.consumer(CONSUMER_WORK_SCALE="100", CONSUMER_DRAIN_TIMEOUT="60")
    bundle.producer(PRODUCER_RATE="500")
    wait_until(lambda: states(bundle.db_url)["processing"] >= 100, 20, "work in flight")
    consumer.terminate()
    consumer.wait_event("consumer_draining", 10)
    t0 = time.monotonic()
    consumer.signal(signal.SIGTERM)  # the second one: no more waiting
    rc = consumer.wait(5)
    assert time.monotonic() - t0 < 3 and rc == 128 + signal.SIGTERM
    assert consumer.events("second_signal_exit_now")


def test_cli_version_explain_and_bad_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for argv in (["producer", "--version"], ["consumer", "-version"]):
        out = subprocess.run(
            [str(BIN / argv[0]), argv[1]], capture_output=True, text=True, cwd=tmp_path, timeout=30
        )
        assert (
            out.returncode == 0 and out.stdout.startswith(argv[0] + " ") and "commit" in out.stdout
        )
    out = subprocess.run(
        [str(BIN / "producer"), "--explain"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        env={
            "PATH": "/usr/bin:/bin",
            "DATABASE_URL": "postgresql://u:hunter2@h/db",
            "PRODUCER_RATE": "7",
        },
    )
    assert out.returncode == 0
    assert (
        "hunter2" not in out.stdout
        and "PRODUCER_RATE" in out.stdout
        and "environment" in out.stdout
    )
    out = subprocess.run(
        [str(BIN / "producer")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "PRODUCER_RATE": "abc"},
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "PRODUCER_RATE" in out.stderr and "'abc'" in out.stderr
    assert "Traceback" not in out.stderr


def test_after_a_consumer_restart_counters_start_at_zero_and_lifetime_gauges_equal_the_db(
    bundle: Bundle,
) -> None:
    first = bundle.consumer(CONSUMER_WORK_SCALE="0.5")
    producer = bundle.producer(
        PRODUCER_RATE="1000",
        PRODUCER_TOTAL="4000",
        PRODUCER_SWEEP_INTERVAL="0.5",
        PRODUCER_REDELIVER_AFTER="2",
    )
    wait_until(lambda: states(bundle.db_url)["done"] >= 1000, 20, "first half")
    first.terminate()
    assert first.wait(20) == 0
    second = bundle.consumer(CONSUMER_WORK_SCALE="0.5")
    assert producer.wait(60) == 0
    db = db_done_by_type(bundle.db_url)
    ledger = consumer_ledger(first.log(), second.log())
    assert ledger.starts == 2 and compare(ledger, bundle.db_url) == (0, set(), set())
    # Each process counts what it did: the second one from zero, not from the database.
    assert done_by_type(bundle.metrics_url("consumer")) == ledger.processes[1].by_type
    assert sum(n for n, _ in ledger.processes[1].by_type.values()) < 4000
    # What the dashboard's per-type panels show: the database's lifetime totals.
    wait_until(
        lambda: lifetime_by_type(bundle.metrics_url("consumer")) == db, 10, "lifetime gauges"
    )
    # The running sums in the log lines continue across the restart.
    assert ledger.last_sums() == {t: s for t, (_, s) in db.items()}


def test_no_password_in_errors_or_logs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:9/tasks",
        "CONSUMER_DB_CONNECT_TIMEOUT": "1",
        "CONSUMER_METRICS_PORT": "0",
        "CONSUMER_PROFILING_PORT": "0",
    }
    out = subprocess.run(
        [str(BIN / "consumer")], capture_output=True, text=True, cwd=tmp_path, timeout=60, env=env
    )
    assert out.returncode == 3  # database unreachable at start-up
    assert "database" in out.stderr and "hunter2" not in out.stdout + out.stderr
