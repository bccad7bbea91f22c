"""Statements that commit while their reply is lost: a proxy between a daemon and
PostgreSQL lets the statement run and commit, then cuts the connection before the answer
comes back. The daemon's retry must neither make a second copy nor lose the work, and the
database, the metrics and the logs must still agree."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import grpc

from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from tests.conftest import sql, states
from tests.system.harness import Bundle, wait_until
from tests.system.ledgers import (
    compare,
    compare_created,
    consumer_ledger,
    producer_ledger,
    stop_and_check_one_consumer,
)
from tests.system.pgproxy import PgProxy

TOTAL = 3000


def test_a_producer_insert_whose_reply_is_lost_is_made_once(bundle: Bundle) -> None:
    pg_port = urlsplit(bundle.db_url).port
    assert pg_port
    proxy = PgProxy(pg_port, "INSERT INTO tasks", every=4, limit=8)
    try:
        consumer = bundle.consumer(CONSUMER_WORK_SCALE="0.05")
        producer = bundle.producer(
            DATABASE_URL=proxy.url(bundle.db_url),
            PRODUCER_RATE="1500",
            PRODUCER_TOTAL=str(TOTAL),
            PRODUCER_BATCH_MAX="50",
        )
        assert producer.wait(60) == 0, producer.log()[-3000:]
    finally:
        proxy.close()
    assert proxy.dropped == 8, "every planned reply was lost"
    # Exactly the total, each row made by one logged insert, nothing twice.
    assert int(sql(bundle.db_url, "SELECT count(*) FROM tasks")[0][0]) == TOTAL  # type: ignore[arg-type]
    (run,) = producer_ledger(producer.log())
    assert compare_created([run], bundle.db_url) == (0, set(), set())
    assert run.stopped_with == len(run.ids) == TOTAL
    assert len(producer.events("db_insert_failing")) >= 1
    wait_until(lambda: states(bundle.db_url)["done"] == TOTAL, 30, "all done")
    consumer.terminate()
    assert consumer.wait(20) == 0
    assert compare(consumer_ledger(consumer.log()), bundle.db_url) == (0, set(), set())
    print(f"\nlost insert replies: {proxy.dropped}; rows {TOTAL} = total, all done, 0 twice")


def test_a_done_write_whose_reply_is_lost_is_counted_once(bundle: Bundle) -> None:
    pg_port = urlsplit(bundle.db_url).port
    assert pg_port
    # Each lost reply is an outage that ends 2.5 s after its last failure (health
    # NOT_SERVING meanwhile, so the producer holds off): a longer run for six of them.
    proxy = PgProxy(pg_port, "SET state = 'done'", every=2, limit=6)
    try:
        consumer = bundle.consumer(
            DATABASE_URL=proxy.url(bundle.db_url), CONSUMER_WORK_SCALE="0.05"
        )
        producer = bundle.producer(PRODUCER_RATE="1500", PRODUCER_TOTAL=str(2 * TOTAL))
        assert producer.wait(90) == 0, producer.log()[-3000:]
        wait_until(lambda: states(bundle.db_url)["done"] == 2 * TOTAL, 30, "all done")
        assert proxy.dropped == 6, f"{proxy.dropped} of 6 planned replies lost"
        stop_and_check_one_consumer(bundle, consumer)
    finally:
        proxy.close()
    assert len(consumer.events("db_write_failing")) >= 1
    print(f"\nlost done replies: {proxy.dropped}; {2 * TOTAL} done, counted and logged once each")


def test_a_client_registration_whose_reply_is_lost_is_made_once(bundle: Bundle) -> None:
    """The consumer's insert of a client's keyed task commits and its reply is lost: the
    client hears UNAVAILABLE and retries with the same key, and gets the first task back.
    The task, registered but never started by the failed call, is reclaimed by the
    consumer's own sweep once its lease ends, and done."""
    pg_port = urlsplit(bundle.db_url).port
    assert pg_port
    proxy = PgProxy(pg_port, "INSERT INTO task_keys", every=2, limit=5)
    stamp = time.time() - 60.0
    try:
        bundle.consumer(
            DATABASE_URL=proxy.url(bundle.db_url),
            CONSUMER_WORK_SCALE="0",
            CONSUMER_SWEEP_INTERVAL="0.5",
            CONSUMER_LEASE_TIMEOUT="2",
            CONSUMER_REDELIVER_AFTER="1",
        )
        with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
            stub = tasks_pb2_grpc.ConsumerStub(channel)
            retried = 0
            for k in range(20):
                task = tasks_pb2.Task(type=k % 10, value=k, creation_time=stamp)
                task.idempotency_key = f"lost-{k}"
                for _ in range(10):
                    try:
                        reply = stub.Submit(tasks_pb2.SubmitRequest(task=task), timeout=5)
                        break
                    except grpc.RpcError as err:
                        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                        retried += 1
                assert reply.status in (
                    tasks_pb2.TASK_STATUS_ACCEPTED,
                    tasks_pb2.TASK_STATUS_DUPLICATE,
                )
        wait_until(lambda: states(bundle.db_url)["done"] == 20, 30, "every task done")
    finally:
        proxy.close()
    assert proxy.dropped == 5 and retried >= 5, (proxy.dropped, retried)
    assert len(sql(bundle.db_url, "SELECT id FROM tasks WHERE creation_time = %s", (stamp,))) == 20
    print(f"\nlost registration replies: {proxy.dropped}, retries {retried}; 20 keys, 20 tasks")
