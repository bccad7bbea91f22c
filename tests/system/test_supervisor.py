"""The bundle under a real supervisord (the repository's conf/supervisord.conf), real
signals, SIGKILL and restarts."""

import os
import signal
import stat
import time
from collections.abc import Iterator

import pytest

from tests.conftest import states
from tests.system.harness import (
    Bundle,
    Supervisor,
    all_done_up_to,
    db_done_by_type,
    max_id,
    wait_until,
)

FAST_SWEEP = {
    "PRODUCER_SWEEP_INTERVAL": "0.5",
    "PRODUCER_REDELIVER_AFTER": "2",
    "PRODUCER_LEASE_TIMEOUT": "4",
}


@pytest.fixture
def sup_factory(bundle: Bundle) -> Iterator[object]:
    made: list[Supervisor] = []

    def make(**env: str) -> Supervisor:
        sup = Supervisor(bundle, **env)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.close()


def _exit_lines(sup: Supervisor, program: str) -> list[str]:
    return [line for line in sup.log("supervisord").splitlines() if f": {program} (" in line]


def _last_sums(log: str) -> tuple[dict[int, int], list[str]]:
    last: dict[int, int] = {}
    ids = []
    for line in log.splitlines():
        if " task_done " in line:
            kv = dict(part.split("=", 1) for part in line.split() if "=" in part)
            last[int(kv["type"])] = int(kv["type_sum"])
            ids.append(kv["id"])
    return last, ids


def test_stop_consumer_with_many_in_flight_drains_to_done(bundle: Bundle, sup_factory) -> None:  # type: ignore[no-untyped-def]
    sup = sup_factory(
        CONSUMER_WORK_SCALE="30",  # up to 3 s of work per task
        CONSUMER_MAX_IN_FLIGHT="20000",
        CONSUMER_RATE_LIMIT="100000",
        PRODUCER_RATE="2000",
        PRODUCER_MAX_BACKLOG="50000",
        **FAST_SWEEP,
    )
    sup.wait_running("consumer", "producer")
    wait_until(lambda: states(bundle.db_url)["processing"] >= 1000, 30, ">= 1000 in flight")
    in_flight = states(bundle.db_url)["processing"]
    t0 = time.monotonic()
    out = sup.ctl("stop", "consumer")
    drain_s = time.monotonic() - t0
    assert "consumer: stopped" in out
    assert sup.status()["consumer"] == "STOPPED"
    assert any("exit status 0" in line for line in _exit_lines(sup, "consumer")), sup.log(
        "supervisord"
    )
    assert states(bundle.db_url)["processing"] == 0
    stopped = [line for line in sup.log("consumer").splitlines() if "consumer_stopped" in line][-1]
    assert "released_to_received=0" in stopped
    assert drain_s < 10 + 3  # CONSUMER_DRAIN_TIMEOUT + RPC grace + margin
    print(f"\ndrain: {in_flight} tasks in flight, consumer stopped in {drain_s:.2f}s; {stopped}")


def test_stop_producer_mid_batch_then_start_loses_nothing(bundle: Bundle, sup_factory) -> None:  # type: ignore[no-untyped-def]
    sup = sup_factory(PRODUCER_RATE="3000", CONSUMER_WORK_SCALE="0.2", **FAST_SWEEP)
    sup.wait_running("consumer", "producer")
    wait_until(lambda: states(bundle.db_url)["done"] >= 1000, 30, "tasks flowing")
    assert "producer: stopped" in sup.ctl("stop", "producer")
    assert any("exit status 0" in line for line in _exit_lines(sup, "producer"))
    last_id = max_id(bundle.db_url)
    sup.ctl("start", "producer", check=True)
    wait_until(
        lambda: all_done_up_to(bundle.db_url, last_id),
        30,
        "every task inserted before the stop is done",
    )


def test_sigkill_consumer_is_restarted_and_nothing_is_lost_or_counted_twice(
    bundle: Bundle,
    sup_factory,  # type: ignore[no-untyped-def]
) -> None:
    sup = sup_factory(
        PRODUCER_RATE="1500", PRODUCER_TOTAL="6000", CONSUMER_WORK_SCALE="5", **FAST_SWEEP
    )
    sup.wait_running("consumer", "producer")
    wait_until(lambda: states(bundle.db_url)["processing"] >= 100, 30, "work in flight")
    old = sup.pid("consumer")
    os.kill(old, signal.SIGKILL)
    wait_until(
        lambda: sup.status().get("consumer") == "RUNNING" and sup.pid("consumer") != old,
        30,
        "restart",
    )
    # The producer exits 0 only once all 6000 are done (lease expiry + redelivery included).
    wait_until(
        lambda: sup.status().get("producer") == "EXITED", 60, "producer finished", every_s=0.5
    )
    assert any("exit status 0" in line for line in _exit_lines(sup, "producer"))
    assert states(bundle.db_url) == {"received": 0, "processing": 0, "done": 6000}
    last, ids = _last_sums(sup.log("consumer"))
    assert len(ids) == len(set(ids)), "a task was logged done twice"
    assert last == {t: s for t, (_, s) in db_done_by_type(bundle.db_url).items()}


def test_stop_all_then_start_all_resumes(bundle: Bundle, sup_factory) -> None:  # type: ignore[no-untyped-def]
    sup = sup_factory(PRODUCER_RATE="1000", CONSUMER_WORK_SCALE="1", **FAST_SWEEP)
    sup.wait_running("consumer", "producer")
    sock = bundle.workdir / "var" / "run" / "supervisor.sock"
    assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0, "control socket readable by others"
    wait_until(lambda: states(bundle.db_url)["done"] >= 500, 30, "tasks flowing")
    sup.ctl("stop", "all")
    st = sup.status()
    assert st["consumer"] == st["producer"] == "STOPPED", st
    for program in ("consumer", "producer"):
        assert all("exit status 0" in line for line in _exit_lines(sup, program)), sup.log(
            "supervisord"
        )
    assert states(bundle.db_url)["processing"] == 0
    # The cut-off is taken while nothing runs: every task of the first run is at or below
    # it, those its stop left `received` (abandoned sends) included.
    last_id = max_id(bundle.db_url)
    abandoned = states(bundle.db_url)["received"]
    before = states(bundle.db_url)["done"]
    sup.ctl("start", "all", check=True)
    sup.wait_running("consumer", "producer")
    wait_until(lambda: states(bundle.db_url)["done"] >= before + 500, 30, "pipeline resumed")
    # Everything left `received` by the stop is picked up again and worked to done.
    wait_until(
        lambda: all_done_up_to(bundle.db_url, last_id),
        30,
        f"every task of the first run done ({abandoned} left received by the stop)",
    )
    print(f"\n{abandoned} tasks left received by the stop, all done after the restart")
