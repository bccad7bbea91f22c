"""The redelivery sweep on the in-memory store and a virtual clock."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from daemons.store import TaskRow
from daemons.sweep import Sweep
from daemons.testing import InMemoryStore
from tests.virtual_clock import run


def test_the_sweep_delivers_what_it_claims_and_reports_an_outage_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    delivered: list[list[int]] = []

    def deliver(rows: list[TaskRow]) -> None:
        delivered.append(sorted(r.id for r in rows))

    async def scenario() -> None:
        store = InMemoryStore()
        rows = await store.insert_batch([0] * 3, [1] * 3, [0.0] * 3)
        await store.mark_processing([rows[0].id])
        store.backdate(60)
        store.fail = psycopg.OperationalError("the database system is starting up")
        sweep = Sweep(
            store, lease_s=30, stale_s=10, limit=10, interval_s=1, log=logging.getLogger("t")
        )
        sweeping = asyncio.get_running_loop().create_task(sweep.run_forever(deliver))
        await asyncio.sleep(3.5)  # three failed sweeps
        assert delivered == [] and sweep.outage.active
        store.fail = None
        await asyncio.sleep(2.0)  # one that claims all three, one that finds nothing new
        sweeping.cancel()

    run(scenario())
    assert delivered == [[1, 2, 3], []]
    events = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sweep_")]
    assert events == ["sweep_failing", "sweep_recovered"]
