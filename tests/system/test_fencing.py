"""Fencing tokens and sweeping without a producer, with real daemons: leases that look
expired while their owner still works them (what a clock an hour off, a clock step or a
slow done writer does), done writes whose replies are lost at the same time, and a
consumer killed holding tasks after every producer has gone."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import psycopg

from tests.conftest import sql, states
from tests.system.harness import Bundle, wait_until
from tests.system.ledgers import (
    compare,
    consumer_ledger,
    stop_and_check_one_consumer,
    unlogged_outside_kills,
)
from tests.system.pgproxy import PgProxy

SWEEPING = {
    "PRODUCER_SWEEP_INTERVAL": "0.5",
    "PRODUCER_REDELIVER_AFTER": "2",
    "PRODUCER_LEASE_TIMEOUT": "3",
}


def _age_leases(db_url: str, stop: threading.Event, aged: list[int]) -> None:
    """Every fresh `processing` lease made to look an hour old, as the sweep sees it
    when the owner's clock is an hour behind (or the clock stepped)."""
    while not stop.wait(0.2):
        try:
            rows = sql(
                db_url,
                "UPDATE tasks SET last_update_time = last_update_time - 3600"
                " WHERE state = 'processing'"
                " AND last_update_time > extract(epoch FROM now()) - 60 RETURNING id",
            )
        except psycopg.errors.SerializationFailure:
            continue  # a row moved to done under it: the next round
        aged.append(len(rows))


def test_stale_leases_and_lost_done_replies_count_each_task_once(bundle: Bundle) -> None:
    total = 6000
    pg_port = urlsplit(bundle.db_url).port
    assert pg_port
    # Done writes held 0.3 s each, half of their replies lost: finished work piles up
    # between statements, so a task's older and newer attempts meet in one batch.
    proxy = PgProxy(pg_port, "SET state = 'done'", every=2, limit=1_000_000, hold_s=0.3)
    stop, aged = threading.Event(), []
    ager = threading.Thread(target=_age_leases, args=(bundle.db_url, stop, aged), daemon=True)
    try:
        consumer = bundle.consumer(DATABASE_URL=proxy.url(bundle.db_url))
        producer = bundle.producer(
            PRODUCER_RATE="600",
            PRODUCER_TOTAL=str(total),
            **{**SWEEPING, "PRODUCER_SWEEP_INTERVAL": "0.2"},
        )
        wait_until(lambda: states(bundle.db_url)["processing"], 20, "work in flight")
        ager.start()
        time.sleep(10.0)  # the fault's duration: leases aged for 10 s under load
        stop.set()
        ager.join(5)
        assert producer.wait(90) == 0, producer.log()[-3000:]
        stop_and_check_one_consumer(bundle, consumer)
    finally:
        stop.set()
        proxy.close()
    reclaimed = int(sql(bundle.db_url, "SELECT count(*) FROM tasks WHERE attempt > 1")[0][0])  # type: ignore[arg-type]
    assert sum(aged) > 100 and reclaimed > 100, (sum(aged), reclaimed)  # the fault was real
    assert proxy.dropped >= 5, proxy.dropped
    assert states(bundle.db_url) == {"received": 0, "processing": 0, "done": total}
    print(
        f"\nleases aged {sum(aged)}, tasks reclaimed {reclaimed}, done replies lost"
        f" {proxy.dropped}; {total} done, counted and logged once each"
    )


def test_a_killed_consumers_tasks_are_done_after_every_producer_exited(bundle: Bundle) -> None:
    total = 300
    first = bundle.consumer(CONSUMER_WORK_SCALE="100", CONSUMER_SWEEP_INTERVAL="0")  # ~5 s each
    producer = bundle.producer(PRODUCER_RATE="1000", PRODUCER_TOTAL=str(total))
    wait_until(lambda: states(bundle.db_url)["processing"] >= 100, 20, "tasks held")
    producer.terminate()  # gone for good: nothing will redeliver from its side
    assert producer.wait(20) == 0
    kill_at = time.time()
    first.kill()
    held = states(bundle.db_url)["processing"]
    assert held >= 100, held
    second = bundle.consumer(
        CONSUMER_WORK_SCALE="0.01",
        CONSUMER_SWEEP_INTERVAL="0.5",
        CONSUMER_LEASE_TIMEOUT="2",
        CONSUMER_REDELIVER_AFTER="2",
    )
    made = int(sql(bundle.db_url, "SELECT count(*) FROM tasks")[0][0])  # type: ignore[arg-type]
    wait_until(lambda: states(bundle.db_url)["done"] == made, 30, "every task done")
    assert second.events("swept_tasks_taken")
    second.terminate()
    assert second.wait(20) == 0
    double, unlogged, not_done = compare(consumer_ledger(first.log(), second.log()), bundle.db_url)
    assert double == 0 and not not_done
    assert not unlogged_outside_kills(bundle.db_url, unlogged, [kill_at])
    print(f"\nheld by the killed consumer: {held}; all {made} done, none twice")
