"""Scale out on loopback: 2 producers and 3 consumers on one database."""

import signal

from daemons.bench.process import Daemon
from daemons.bench.scrape import metrics_url
from tests.conftest import states
from tests.system.harness import (
    Bundle,
    db_done_by_type,
    done_by_type,
    lifetime_by_type,
    wait_until,
)
from tests.system.ledgers import compare, consumer_ledger


def _consumers(bundle: Bundle, n: int, **env: str) -> tuple[list[Daemon], list[str], str]:
    procs, urls, addrs = [], [], []
    for _ in range(n):
        ports = bundle.extra_consumer_env()
        procs.append(bundle.consumer(**ports, **env))
        urls.append(metrics_url(ports["CONSUMER_METRICS_PORT"]))
        addrs.append(ports["CONSUMER_LISTEN"])
    return procs, urls, "ipv4:" + ",".join(addrs)


def _producers(bundle: Bundle, n: int, target: str, **env: str) -> list[Daemon]:
    return [
        bundle.producer(
            PRODUCER_CONSUMER_TARGET=target,
            PRODUCER_METRICS_PORT="0",
            PRODUCER_PROFILING_PORT="0",
            **env,
        )
        for _ in range(n)
    ]


SWEEP = {
    "PRODUCER_SWEEP_INTERVAL": "0.5",
    "PRODUCER_REDELIVER_AFTER": "2",
    "PRODUCER_LEASE_TIMEOUT": "3",
}


def test_two_producers_three_consumers_share_and_count_once(bundle: Bundle) -> None:
    consumers, urls, target = _consumers(bundle, 3, CONSUMER_WORK_SCALE="0.5")
    producers = _producers(bundle, 2, target, PRODUCER_RATE="800", PRODUCER_TOTAL="3000", **SWEEP)
    for p in producers:
        assert p.wait(60) == 0
    assert states(bundle.db_url) == {"received": 0, "processing": 0, "done": 6000}
    per_consumer = [done_by_type(u) for u in urls]
    # Each consumer served a share; together they counted every task exactly once.
    shares = [sum(n for n, _ in c.values()) for c in per_consumer]
    assert all(s > 6000 * 0.15 for s in shares), shares
    db = db_done_by_type(bundle.db_url)
    total = {
        t: (
            sum(c.get(t, (0, 0))[0] for c in per_consumer),
            sum(c.get(t, (0, 0))[1] for c in per_consumer),
        )
        for t in db
    }
    assert total == db
    for c in consumers:
        c.terminate()
        assert c.wait(20) == 0


def test_killing_one_consumer_loses_nothing_and_the_others_take_over(bundle: Bundle) -> None:
    consumers, urls, target = _consumers(bundle, 3, CONSUMER_WORK_SCALE="2")
    producers = _producers(bundle, 2, target, PRODUCER_RATE="600", PRODUCER_TOTAL="4000", **SWEEP)
    wait_until(lambda: states(bundle.db_url)["done"] >= 1500, 30, "load running")
    consumers[0].signal(signal.SIGKILL)
    consumers[0].wait(10)
    before = [sum(n for n, _ in done_by_type(u).values()) for u in urls[1:]]
    for p in producers:
        assert p.wait(90) == 0  # exits only once every task is done
    assert states(bundle.db_url) == {"received": 0, "processing": 0, "done": 8000}
    after = [sum(n for n, _ in done_by_type(u).values()) for u in urls[1:]]
    assert all(a > b + 500 for a, b in zip(after, before, strict=True)), (before, after)


def test_two_consumers_one_restarted_counters_and_lifetime_gauges(bundle: Bundle) -> None:
    """Prometheus' way with any number of consumers: each process's counters start at
    zero (so their sum of rates is right and a restart makes no phantom jump), and the
    database's lifetime totals, exported as gauges, equal the database on every one."""
    consumers, urls, target = _consumers(bundle, 2, CONSUMER_WORK_SCALE="0.5")
    (producer,) = _producers(bundle, 1, target, PRODUCER_RATE="800", PRODUCER_TOTAL="4000", **SWEEP)
    wait_until(lambda: states(bundle.db_url)["done"] >= 1500, 30, "load running")
    old = consumers[1]
    old.terminate()
    assert old.wait(20) == 0
    restarted = bundle.consumer(
        CONSUMER_LISTEN=target.removeprefix("ipv4:").split(",")[1],
        CONSUMER_METRICS_PORT=urls[1].rsplit(":", 1)[1].split("/")[0],
        CONSUMER_PROFILING_PORT="0",
        CONSUMER_WORK_SCALE="0.5",
    )
    # Right after its start, the new process has counted only what it did itself.
    assert sum(n for n, _ in done_by_type(urls[1]).values()) < 1000
    assert producer.wait(60) == 0
    db = db_done_by_type(bundle.db_url)
    ledgers = [consumer_ledger(consumers[0].log()), consumer_ledger(old.log(), restarted.log())]
    together = consumer_ledger(consumers[0].log(), old.log(), restarted.log())
    assert compare(together, bundle.db_url) == (0, set(), set())
    for url, ledger in zip(urls, ledgers, strict=True):
        assert done_by_type(url) == ledger.processes[-1].by_type
        wait_until(lambda u=url: lifetime_by_type(u) == db, 10, f"lifetime gauges on {url}")
    # The processes' counters plus what the stopped one counted equal the database.
    summed = [sum(n for n, _ in done_by_type(u).values()) for u in urls]
    stopped = sum(n for n, _ in ledgers[1].processes[0].by_type.values())
    assert sum(summed) + stopped == sum(n for n, _ in db.values())
    for c in (consumers[0], restarted):
        c.terminate()
        assert c.wait(20) == 0
