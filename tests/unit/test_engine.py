"""The consumer's engine on the in-memory store and a virtual clock: admission (limiter,
in-flight cap), duplicates counted once, unknown ids, drain, a write outage. No I/O:
work timers and group-commit gaps run in virtual time. tests/integration/test_engine.py
runs the same engine on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import psycopg
import psycopg_pool
import pytest

from daemons import engine as eng
from daemons.engine import NewTask, TaskStatus
from daemons.errors import Draining
from daemons.store import TaskRow
from daemons.testing import InMemoryStore
from tests.engines import start_engine, stop_loops, until
from tests.virtual_clock import run

ACCEPTED = TaskStatus.ACCEPTED


async def _tasks(store: InMemoryStore, types: list[int], values: list[int]) -> list[NewTask]:
    rows = await store.insert_batch(types, values, [time.time()] * len(types))
    return [NewTask(r.id, r.type, r.value, r.creation_time) for r in rows]


def _states(store: InMemoryStore) -> dict[str, int]:
    out = {"received": 0, "processing": 0, "done": 0}
    for task in store.tasks.values():
        out[task.state] += 1
    return out


def test_the_limiter_refuses_without_writing() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        engine, loops = await start_engine(store, rate_limit=3, rate_period_s=60, work_scale=0)
        _, statuses = await engine.admit(await _tasks(store, [0] * 5, [1] * 5))
        assert statuses == [ACCEPTED] * 3 + [TaskStatus.RATE_LIMITED] * 2
        await until(lambda: not engine.processing)
        assert _states(store) == {"received": 2, "processing": 0, "done": 3}
        await stop_loops(loops)

    run(scenario())


def test_the_in_flight_cap_answers_busy() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        engine, loops = await start_engine(store, max_in_flight=2, work_scale=100)  # 5 s of work
        _, statuses = await engine.admit(await _tasks(store, [0] * 3, [50] * 3))
        assert statuses == [ACCEPTED] * 2 + [TaskStatus.BUSY]
        _, statuses = await engine.admit(await _tasks(store, [0], [50]))
        assert statuses == [TaskStatus.BUSY]  # still full
        await until(lambda: not engine.processing)
        _, statuses = await engine.admit(await _tasks(store, [0], [1]))
        assert statuses == [ACCEPTED]  # room again once the work is done
        await stop_loops(loops)

    run(scenario())


def test_a_second_delivery_is_a_duplicate_and_counted_once() -> None:
    async def scenario() -> tuple[eng.Engine, InMemoryStore]:
        store = InMemoryStore()
        engine, loops = await start_engine(store, work_scale=0.1)
        tasks = await _tasks(store, [1, 1, 2], [5, 7, 9])
        # Delivered twice at once (a redelivery racing the first send), then once more.
        first, second = await asyncio.gather(engine.admit(tasks), engine.admit(tasks))
        assert sorted(first[1] + second[1]) == sorted([ACCEPTED] * 3 + [TaskStatus.DUPLICATE] * 3)
        await until(lambda: not engine.processing)
        _, again = await engine.admit(tasks)
        assert again == [TaskStatus.DUPLICATE] * 3
        await stop_loops(loops)
        return engine, store

    engine, store = run(scenario())
    assert engine.done_total == 3 and engine.counts[1] == 2 and engine.sums[1] == 12
    assert engine.sums[2] == 9 and store.totals[1] == [2, 12] and store.totals[2] == [1, 9]


def test_unknown_ids_are_invalid_and_change_nothing() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        engine, loops = await start_engine(store)
        known = await _tasks(store, [3], [1])
        _, statuses = await engine.admit([NewTask(10_000, 1, 1), *known])
        assert statuses == [TaskStatus.INVALID, ACCEPTED]
        assert 10_000 not in store.tasks
        await stop_loops(loops)

    run(scenario())


def test_new_tasks_are_registered_and_worked() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        engine, loops = await start_engine(store, work_scale=0)
        ids, statuses = await engine.admit([NewTask(0, 3, 30), NewTask(0, 4, 40)])
        assert statuses == [ACCEPTED] * 2 and ids[0] < ids[1]
        await until(lambda: not engine.processing)
        assert [(store.tasks[i].row.type, store.tasks[i].state) for i in ids] == [
            (3, "done"),
            (4, "done"),
        ]
        await stop_loops(loops)

    run(scenario())


def test_drain_gives_unfinished_work_back_to_received() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        engine, loops = await start_engine(store, work_scale=100)  # 0.1 s and 5 s of work
        _, statuses = await engine.admit(await _tasks(store, [0, 0, 0], [1, 50, 50]))
        assert statuses == [ACCEPTED] * 3
        finished, released = await engine.drain(1.0)
        assert (finished, released) == (1, 2)
        assert _states(store) == {"received": 2, "processing": 0, "done": 1}
        assert not engine.processing
        with pytest.raises(Draining):
            await engine.admit(await _tasks(store, [0], [1]))
        await stop_loops(loops)

    run(scenario())


def test_a_write_outage_is_reported_once_and_flips_health(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    health: list[bool] = []

    async def scenario() -> None:
        store = InMemoryStore()
        engine, loops = await start_engine(
            store, probe_s=0.1, on_db_state=health.append, work_scale=0
        )
        tasks = await _tasks(store, [0, 0], [1, 1])
        store.fail = psycopg.OperationalError("terminating connection due to administrator")
        for task in tasks:
            with pytest.raises(psycopg.OperationalError):
                await engine.admit([task])
        assert engine.db.active and health == [False]
        store.fail = None
        await until(lambda: not engine.db.active)  # the probe finds it back, no traffic
        _, statuses = await engine.admit(tasks)
        assert statuses == [ACCEPTED] * 2
        await stop_loops(loops)

    run(scenario())
    assert health == [False, True]
    events = [r.getMessage() for r in caplog.records if r.getMessage().startswith("db_write")]
    assert events == ["db_write_failing", "db_write_recovered"]


def test_a_task_taken_back_and_redelivered_to_the_same_engine_is_counted_once() -> None:
    """The lease of a task still being worked expires (a slow done writer, a clock step)
    and the sweep hands it out again, to this same consumer: the older attempt's timer
    and write change nothing, the newest attempt is worked, written and counted once."""

    async def scenario() -> tuple[eng.Engine, InMemoryStore]:
        store = InMemoryStore()
        engine, loops = await start_engine(store, work_scale=10)  # 0.5 s of work
        tasks = await _tasks(store, [6, 6], [50, 50])
        assert (await engine.admit(tasks))[1] == [ACCEPTED] * 2
        store.backdate(3600)
        assert len(await store.reclaim_expired(60, 10)) == 2  # attempt 1 ends
        assert (await engine.admit(tasks))[1] == [ACCEPTED] * 2  # attempt 3, same engine
        assert {row.attempt for row, _ in engine.processing.values()} == {3}
        await until(lambda: not engine.processing)
        await asyncio.sleep(1.0)  # the older timers have long fired
        await stop_loops(loops)
        return engine, store

    engine, store = run(scenario())
    assert _states(store) == {"received": 0, "processing": 0, "done": 2}
    assert engine.done_total == 2 and engine.counts[6] == 2 and engine.sums[6] == 100
    assert store.totals[6] == [2, 100]


def test_a_done_write_whose_reply_was_lost_is_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The done statement commits and the connection drops before its reply: the retry
    finds the rows done under its own attempts and counts each exactly once."""
    caplog.set_level(logging.INFO)

    async def scenario() -> tuple[eng.Engine, InMemoryStore]:
        store = InMemoryStore()
        store.lose_reply_error = psycopg.OperationalError("server closed the connection")
        engine, loops = await start_engine(store, work_scale=0)
        tasks = await _tasks(store, [7] * 5, [3] * 5)
        store.lose_reply = True  # the next write: the done statement
        assert (await engine.admit(tasks))[1] == [ACCEPTED] * 5
        await until(lambda: not engine.processing)
        await stop_loops(loops)
        assert not store.lose_reply, "the fault was injected"
        return engine, store

    engine, store = run(scenario())
    assert _states(store)["done"] == 5 and store.totals[7] == [5, 15]
    assert engine.done_total == 5 and engine.counts[7] == 5 and engine.sums[7] == 15
    assert sum(r.getMessage() == "task_done" for r in caplog.records) == 5  # a line each


def test_a_new_task_retried_with_its_key_is_made_once() -> None:
    """Submit(id 0) with an idempotency key, then the same call again (the client's
    deadline passed, or its reply was lost): one task, worked and counted once; the
    retry is answered DUPLICATE with the first call's id."""

    async def scenario() -> tuple[eng.Engine, InMemoryStore]:
        store = InMemoryStore()
        engine, loops = await start_engine(store, work_scale=0)
        task = NewTask(0, 8, 40, 0.0, "client-1:42")
        ids, statuses = await engine.admit([task])
        again_ids, again = await engine.admit([task, NewTask(0, 8, 2, 0.0, "client-1:43")])
        assert statuses == [ACCEPTED] and again == [TaskStatus.DUPLICATE, ACCEPTED]
        assert again_ids[0] == ids[0] and again_ids[1] != ids[0]
        await until(lambda: not engine.processing)
        await stop_loops(loops)
        return engine, store

    engine, store = run(scenario())
    assert len(store.tasks) == 2 and _states(store)["done"] == 2
    assert engine.counts[8] == 2 and engine.sums[8] == 42


class _TimingOutStore(InMemoryStore):
    """`mark_done` of more than `fits` ids times out (a statement too big for its
    statement_timeout); the sizes it was asked for are kept."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.sizes: list[int] = []

    async def mark_done(self, rows: Sequence[TaskRow], *, retried: bool = False) -> list[int]:
        self.sizes.append(len(rows))
        if len(rows) > self.fits:
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        return await super().mark_done(rows, retried=retried)


def test_the_done_writer_splits_a_batch_that_keeps_timing_out() -> None:
    async def scenario() -> _TimingOutStore:
        store = _TimingOutStore(fits=100)
        engine, loops = await start_engine(store, work_scale=0)
        _, statuses = await engine.admit(await _tasks(store, [0] * 1000, [1] * 1000))
        assert statuses == [ACCEPTED] * 1000
        await until(lambda: not engine.processing, 60)
        assert engine.done_total == 1000 and _states(store)["done"] == 1000
        await stop_loops(loops)
        return store

    store = run(scenario())
    assert store.sizes[:4] == [1000, 500, 250, 125] and max(store.sizes[4:]) <= 200


class _SilentStore(InMemoryStore):
    """`mark_done` hangs (no reply) until `answer` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()

    async def mark_done(self, rows: Sequence[TaskRow], *, retried: bool = False) -> list[int]:
        await self.answer.wait()
        return await super().mark_done(rows, retried=retried)


def test_a_done_statement_without_reply_flips_health_before_its_deadline() -> None:
    health: list[bool] = []

    async def scenario() -> None:
        store = _SilentStore()
        engine, loops = await start_engine(
            store, probe_s=0.1, on_db_state=health.append, work_scale=0
        )
        await engine.admit(await _tasks(store, [0], [1]))
        await asyncio.sleep(eng.STALL_S - 0.5)
        assert health == []
        await until(lambda: health == [False], 1.0)
        store.answer.set()
        await until(lambda: not engine.processing)
        await until(lambda: health == [False, True], eng.DB_SETTLE_S + 1)  # the probe
        await stop_loops(loops)

    run(scenario())
    assert health == [False, True]


class _FailingDoneStore(InMemoryStore):
    """`mark_done` fails (a transient error) while `failing` is set."""

    failing = False

    async def mark_done(self, rows: Sequence[TaskRow], *, retried: bool = False) -> list[int]:
        if self.failing:
            raise psycopg.OperationalError("terminating connection due to administrator")
        return await super().mark_done(rows, retried=retried)


def test_a_task_delivered_again_while_held_is_counted_once() -> None:
    async def scenario() -> tuple[eng.Engine, InMemoryStore]:
        store = _FailingDoneStore()
        engine, loops = await start_engine(store, work_scale=10)  # 1 s and 0.5 s of work
        tasks = await _tasks(store, [1, 2], [100, 50])
        store.failing = True  # the done writer retries its batch meanwhile
        await engine.admit(tasks)
        await asyncio.sleep(0.6)  # task 2 finished, its write waits; task 1 is at work
        # Both leases are reclaimed and delivered again to this same consumer.
        store.backdate(60)
        assert len(await store.reclaim_expired(30, 10)) == 2
        _, statuses = await engine.admit(tasks)
        assert statuses == [ACCEPTED] * 2
        await asyncio.sleep(1.5)  # the second deliveries' work finishes too
        store.failing = False
        await until(lambda: not engine.processing)
        await asyncio.sleep(2.0)  # every timer, the first delivery's too, has fired
        await stop_loops(loops)
        return engine, store

    engine, store = run(scenario())
    assert engine.done_total == 2 and engine.counts[1:3] == [1, 1]
    assert engine.sums[1:3] == [100, 50] and store.totals[1] == [1, 100]


def test_drain_survives_a_database_that_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL stopping first (or away): unfinished work cannot be given back, so it
    stays `processing` for the lease sweep, and the drain still ends."""
    caplog.set_level(logging.WARNING)

    async def scenario() -> tuple[int, int]:
        store = InMemoryStore()
        engine, loops = await start_engine(store, work_scale=100)  # 5 s of work
        await engine.admit(await _tasks(store, [0, 0], [50, 50]))
        store.fail = psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec")
        result = await engine.drain(1.0)
        assert _states(store) == {"received": 0, "processing": 2, "done": 0}
        await stop_loops(loops)
        return result

    assert run(scenario()) == (0, 0)
    assert [r.getMessage() for r in caplog.records] == ["drain_release_failed"]
