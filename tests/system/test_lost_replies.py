"""Statements that commit while their reply is lost: a proxy between a daemon and
PostgreSQL lets the statement run and commit, then cuts the connection before the answer
comes back. The daemon's retry must neither make a second copy nor lose the work, and the
database, the metrics and the logs must still agree."""

from __future__ import annotations

from urllib.parse import urlsplit

from tests.conftest import sql, states
from tests.system.harness import Bundle, wait_until
from tests.system.ledgers import (
    compare,
    compare_created,
    consumer_ledger,
    producer_ledger,
    stop_and_check_one_consumer,
)
from tests.system.pgproxy import ReplyDropper

TOTAL = 3000


def test_a_producer_insert_whose_reply_is_lost_is_made_once(bundle: Bundle) -> None:
    pg_port = urlsplit(bundle.db_url).port
    assert pg_port
    proxy = ReplyDropper(pg_port, "INSERT INTO tasks", every=4, limit=8)
    try:
        consumer = bundle.consumer(CONSUMER_WORK_SCALE="0.05")
        producer = bundle.producer(
            DATABASE_URL=proxy.url(bundle.db_url, pg_port),
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


def test_a_done_write_whose_reply_is_lost_is_counted_once(bundle: Bundle) -> None:
    pg_port = urlsplit(bundle.db_url).port
    assert pg_port
    proxy = ReplyDropper(pg_port, "SET state = 'done'", every=3, limit=10)
    try:
        consumer = bundle.consumer(
            DATABASE_URL=proxy.url(bundle.db_url, pg_port), CONSUMER_WORK_SCALE="0.05"
        )
        producer = bundle.producer(PRODUCER_RATE="1500", PRODUCER_TOTAL=str(TOTAL))
        assert producer.wait(60) == 0, producer.log()[-3000:]
        wait_until(lambda: states(bundle.db_url)["done"] == TOTAL, 30, "all done")
        assert proxy.dropped == 10, "every planned reply was lost"
        stop_and_check_one_consumer(bundle, consumer)
    finally:
        proxy.close()
    assert len(consumer.events("db_write_failing")) >= 1
