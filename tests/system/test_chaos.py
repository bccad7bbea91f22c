"""Chaos suite: each scenario injects a failure while tasks flow at a steady rate, lets
the producer finish its total (it exits 0 only once everything is done), and checks
that nothing was lost or counted twice and that no program ended FATAL.

The suite runs on its own PostgreSQL cluster, because it restarts it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from daemons.bench.cluster import PrivatePostgres
from tests.conftest import BIN, sql, states
from tests.system.harness import (
    Bundle,
    Supervisor,
    db_done_by_type,
    done_by_type,
    lifetime_by_type,
    wait_until,
)
from tests.system.ledgers import (
    compare,
    compare_created,
    consumer_ledger,
    producer_ledger,
    unlogged_outside_kills,
)

TOTAL = 4000
RATE = "600"  # tasks/s: each scenario runs ~5 s of steady flow plus recovery
CHAOS_ENV = {
    "PRODUCER_RATE": RATE,
    "PRODUCER_TOTAL": str(TOTAL),
    "PRODUCER_SWEEP_INTERVAL": "0.5",
    "PRODUCER_REDELIVER_AFTER": "2",
    "PRODUCER_LEASE_TIMEOUT": "3",
    "PRODUCER_SEND_TIMEOUT": "2",
    "CONSUMER_WORK_SCALE": "1",
    "CONSUMER_DRAIN_TIMEOUT": "5",
}


@dataclass
class Result:
    scenario: str
    produced: int
    done: int
    lost: int
    double_counted: int
    recovery_s: float
    starts: str = ""
    in_flight: str = ""


RESULTS: list[Result] = []
# Each program starts once; a scenario that kills one says how many starts it expects,
# so a crash that supervisor quietly restarted fails the scenario.
EXPECTED_STARTS = {"consumer": 1, "producer": 1}


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL that scenarios may restart (stop() is a fast shutdown)."""
    c = PrivatePostgres.start_new("tasks-chaos-pg-")
    yield c
    c.close()


def run_scenario(
    name: str,
    cluster: PrivatePostgres,
    tmp_path: Path,
    inject: Callable[[Bundle, Supervisor], None],
    total: int = TOTAL,
    expect_starts: dict[str, int] | None = None,
) -> None:
    db_url = cluster.new_database(f"chaos_{name}")
    bundle = Bundle(db_url, tmp_path)
    sup = Supervisor(bundle, **{**CHAOS_ENV, "PRODUCER_TOTAL": str(total)})
    try:
        sup.wait_running("consumer", "producer")
        wait_until(lambda: states(db_url)["done"] >= 500, 30, "steady flow")
        inject(bundle, sup)
        assert sup.in_flight, "the scenario must inject while work is in flight"
        t_end = time.monotonic()
        done_at_end = states(db_url)["done"]
        # Recovered: tasks reach `done` again (or, if the load ended meanwhile, all did).
        wait_until(
            lambda: (
                states(db_url)["done"] > done_at_end + 100
                or sup.status().get("producer") == "EXITED"
            ),
            60,
            "recovery",
        )
        recovery_s = time.monotonic() - t_end
        wait_until(
            lambda: sup.status().get("producer") == "EXITED", 90, "producer finished", every_s=0.5
        )
        st = sup.status()
        assert "FATAL" not in st.values(), st
        produced = int(sql(db_url, "SELECT count(*) FROM tasks")[0][0])  # type: ignore[arg-type]
        # Ledger 0, the producers' logs: every row created by exactly one committed insert
        # that a producer logged (a row may go unnamed only if its producer was SIGKILLed
        # right after the commit), each clean stop's count equal to its own lines, and the
        # last run, which reached its total, made exactly the total.
        producers = producer_ledger(sup.log("producer"))
        twice, unnamed, not_rows = compare_created(producers, db_url)
        assert not twice and not not_rows, (twice, sorted(not_rows)[:10])
        assert not unlogged_outside_kills(
            db_url, unnamed, sup.kills.get("producer", []), "creation_time"
        ), f"rows no producer created: {sorted(unnamed)[:10]}"
        for p in producers:
            assert p.stopped_with in (None, len(p.ids)), (p.stopped_with, len(p.ids))
        assert producers[-1].stopped_with == total, producers[-1].stopped_with
        final = states(db_url)
        lost = produced - final["done"]
        db = db_done_by_type(db_url)
        # Ledger 1, the consumers' logs: every done task named exactly once across all
        # consumer processes, nothing named that is not done.
        ledger = consumer_ledger(sup.log("consumer"))
        double, unlogged, not_done = compare(ledger, db_url)
        assert not not_done, f"logged done but not done: {sorted(not_done)[:10]}"
        assert not unlogged_outside_kills(db_url, unlogged, sup.kills.get("consumer", [])), sorted(
            unlogged
        )[:10]
        # Ledger 2, the last consumer process's counters (from zero at its start) against
        # its own lines: a double count inside that process shows here.
        wait_until(
            lambda: done_by_type(bundle.metrics_url("consumer")) == ledger.processes[-1].by_type,
            5,
            "the last consumer's counters equal its own task_done lines",
        )
        # The lifetime totals the consumer exports (the database's rollup) equal the rows,
        # and the running sums in the last lines continue from them.
        wait_until(
            lambda: lifetime_by_type(bundle.metrics_url("consumer")) == db,
            10,
            "tasks_done_in_db equals the database",
        )
        assert ledger.last_sums() == {t: s for t, (_, s) in db.items()}
        starts = {
            "consumer": ledger.starts,
            "producer": len(producers),
        }
        assert starts == {**EXPECTED_STARTS, **(expect_starts or {})}, starts
        RESULTS.append(
            Result(
                name,
                produced,
                final["done"],
                lost,
                double,
                recovery_s,
                f"c{starts['consumer']}/p{starts['producer']}",
                ",".join(map(str, sup.in_flight)),
            )
        )
        assert lost == 0 and double == 0, RESULTS[-1]
        assert any(
            "exit status 0" in x for x in sup.log("supervisord").splitlines() if ": producer (" in x
        )
    finally:
        sup.close()
        bundle.close()


def test_postgres_restart(cluster: PrivatePostgres, tmp_path: Path) -> None:
    def inject(bundle: Bundle, sup: Supervisor) -> None:
        _in_flight(bundle, sup)
        cluster.stop()
        time.sleep(2.0)  # the outage itself: the database stays away for 2 s
        cluster.start()

    run_scenario("pg_restart", cluster, tmp_path, inject)


def test_all_backends_killed(cluster: PrivatePostgres, tmp_path: Path) -> None:
    def inject(bundle: Bundle, sup: Supervisor) -> None:
        for _ in range(3):
            _in_flight(bundle, sup)
            killed = sql(
                cluster.admin_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name IN ('producer', 'consumer')",
            )
            assert killed
            time.sleep(0.5)  # let them reconnect between the rounds

    run_scenario("backends_killed", cluster, tmp_path, inject)


def test_connection_exhaustion(cluster: PrivatePostgres, tmp_path: Path) -> None:
    def inject(bundle: Bundle, sup: Supervisor) -> None:
        held: list[psycopg.Connection[tuple[object, ...]]] = []
        _in_flight(bundle, sup)  # before the slots are gone: this check needs one too
        try:
            # Take every free slot (the daemons keep the connections they hold)...
            while True:
                try:
                    held.append(psycopg.connect(cluster.admin_url, connect_timeout=2))
                except psycopg.OperationalError:
                    break
            # ...and kill theirs, so they must reconnect into a full server.
            sql_conn = held.pop()
            sql_conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name IN ('producer', 'consumer')"
            )
            sql_conn.close()
            held.append(psycopg.connect(cluster.admin_url))
            time.sleep(3.0)  # hold every slot for a few seconds
        finally:
            for conn in held:
                conn.close()

    run_scenario("conn_exhaustion", cluster, tmp_path, inject)


def _in_flight(bundle: Bundle, sup: Supervisor, state: str = "processing") -> None:
    """Wait until tasks are in `state` (work in the consumer: processing; sends from the
    producer: received), and note how many, for the summary: a failure injected when
    nothing is in flight proves little."""
    n = wait_until(lambda: states(bundle.db_url)[state], 20, f"tasks {state}")
    sup.in_flight.append(int(n))


def _kill_and_wait_restart(sup: Supervisor, program: str) -> None:
    """SIGKILL a program and wait until supervisor has a new process running for it."""
    old = sup.pid(program)
    sup.kills.setdefault(program, []).append(time.time())
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: sup.pid(program) not in (0, old), 20, f"{program} restarted")


def test_consumer_sigkill_mid_work(cluster: PrivatePostgres, tmp_path: Path) -> None:
    def inject(bundle: Bundle, sup: Supervisor) -> None:
        sup.wait_running("consumer", timeout_s=30)
        _in_flight(bundle, sup)
        _kill_and_wait_restart(sup, "consumer")

    run_scenario("consumer_kill", cluster, tmp_path, inject, expect_starts={"consumer": 2})


def test_producer_sigkill_mid_send(cluster: PrivatePostgres, tmp_path: Path) -> None:
    def inject(bundle: Bundle, sup: Supervisor) -> None:
        for _ in range(2):
            sup.wait_running("producer", timeout_s=30)
            _in_flight(bundle, sup, "received")  # inserted, not yet taken by the consumer
            _kill_and_wait_restart(sup, "producer")

    run_scenario("producer_kill", cluster, tmp_path, inject, expect_starts={"producer": 3})


def test_five_consumer_kills_in_a_minute(cluster: PrivatePostgres, tmp_path: Path) -> None:
    def inject(bundle: Bundle, sup: Supervisor) -> None:
        for _ in range(5):
            sup.wait_running("consumer", timeout_s=30)
            _in_flight(bundle, sup)
            _kill_and_wait_restart(sup, "consumer")

    # Five kills take ~15 s at this rate: a larger total keeps the load on throughout.
    run_scenario(
        "consumer_kill_x5", cluster, tmp_path, inject, total=12000, expect_starts={"consumer": 6}
    )


def test_migration_up_and_down_under_load(cluster: PrivatePostgres, tmp_path: Path) -> None:
    def inject(bundle: Bundle, sup: Supervisor) -> None:
        env = bundle.env()
        for _ in range(3):
            for step in ("down", "up"):
                _in_flight(bundle, sup)
                out = subprocess.run(
                    [str(BIN / "migrator"), step], env=env, capture_output=True, text=True
                )
                assert out.returncode == 0, out.stderr

    # Six migrator runs of 1-2 s each (0005 waits for the writers in flight): a larger
    # total keeps the load on throughout.
    run_scenario("migration_flip", cluster, tmp_path, inject, total=12000)


def summary_table(results: list[Result]) -> str:
    """The chaos summary's rows (also tests/system/test_chaos_db.py's)."""
    lines = [
        f"{'scenario':18} {'produced':>8} {'done':>6} {'lost':>5} {'double':>6} {'recovery_s':>10}"
        f" {'starts':>7}  in flight at each injection"
    ]
    for r in results:
        lines.append(
            f"{r.scenario:18} {r.produced:8d} {r.done:6d} {r.lost:5d} {r.double_counted:6d}"
            f" {r.recovery_s:10.2f} {r.starts:>7}  {r.in_flight}"
        )
    return "\n".join(lines)


def test_print_summary() -> None:
    """Runs last in this module: the per-scenario table for the record."""
    text = summary_table(RESULTS)
    print("\nchaos summary\n" + text)
    Path(__file__).resolve().parents[2].joinpath("profiles", "chaos-summary.txt").write_text(
        text + "\n"
    )
    assert len(RESULTS) == 7 and all(r.lost == 0 and r.double_counted == 0 for r in RESULTS)
