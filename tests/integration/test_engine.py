import time

from daemons import engine as eng
from daemons.store import Store
from tests.conftest import sql, states
from tests.engines import Loops, start_engine, stop_loops, until


async def _engine(url: str, **kw: object) -> tuple[Store, eng.Engine, Loops]:
    store = Store(url, pool_size=3, name="test")
    await store.open(10)
    engine, loops = await start_engine(store, **kw)
    return store, engine, loops


async def _stop(store: Store, loops: Loops) -> None:
    await stop_loops(loops)
    await store.close()


async def test_admitted_tasks_reach_done_and_sums_count_once(db_url: str) -> None:
    store, engine, loops = await _engine(db_url, work_scale=0.1)
    try:
        rows = await store.insert_batch([1, 1, 2], [5, 7, 9], [time.time()] * 3)
        new = [eng.NewTask(r.id, r.type, r.value) for r in rows]
        ids, statuses = await engine.admit(new)
        assert statuses == [eng.TaskStatus.ACCEPTED] * 3
        # The same tasks again, concurrently delivered: duplicates, not counted again.
        _, again = await engine.admit(new)
        assert again == [eng.TaskStatus.DUPLICATE] * 3
        await until(lambda: not engine.processing)
        assert states(db_url)["done"] == 3
        assert engine.sums[1] == 12 and engine.counts[1] == 2 and engine.sums[2] == 9
        # External tasks (no id) are registered by the consumer itself.
        ids, statuses = await engine.admit([eng.NewTask(0, 3, 30), eng.NewTask(0, 4, 40)])
        assert statuses == [eng.TaskStatus.ACCEPTED] * 2 and all(ids)
        await until(lambda: not engine.processing)
        assert sorted(sql(db_url, "SELECT type, value FROM tasks WHERE id = ANY(%s)", (ids,))) == [
            (3, 30),
            (4, 40),
        ]
        # Unknown ids are INVALID and change nothing.
        _, st = await engine.admit([eng.NewTask(10_000_000, 1, 1)])
        assert st == [eng.TaskStatus.INVALID]
    finally:
        await _stop(store, loops)


async def test_running_sums_survive_a_restart(db_url: str) -> None:
    store, engine, loops = await _engine(db_url, work_scale=0)
    rows = await store.insert_batch([7] * 4, [10, 20, 30, 40], [time.time()] * 4)
    await engine.admit([eng.NewTask(r.id, r.type, r.value) for r in rows])
    await until(lambda: not engine.processing)
    await _stop(store, loops)
    store, engine, loops = await _engine(db_url)
    try:
        assert engine.sums[7] == 100 and engine.counts[7] == 4
    finally:
        await _stop(store, loops)


async def test_limiter_and_in_flight_cap_refuse_without_writing(db_url: str) -> None:
    store, engine, loops = await _engine(db_url, rate_limit=3, rate_period_s=60, max_in_flight=100)
    try:
        rows = await store.insert_batch([0] * 5, [1] * 5, [time.time()] * 5)
        _, st = await engine.admit([eng.NewTask(r.id, r.type, r.value) for r in rows])
        assert st == [eng.TaskStatus.ACCEPTED] * 3 + [eng.TaskStatus.RATE_LIMITED] * 2
        await until(lambda: not engine.processing)
        assert states(db_url) == {"received": 2, "processing": 0, "done": 3}
    finally:
        await _stop(store, loops)
    store, engine, loops = await _engine(db_url, max_in_flight=2, work_scale=100)
    try:
        rows = await store.insert_batch([0] * 3, [50] * 3, [time.time()] * 3)
        _, st = await engine.admit([eng.NewTask(r.id, r.type, r.value) for r in rows])
        assert st == [eng.TaskStatus.ACCEPTED] * 2 + [eng.TaskStatus.BUSY]
        # Drain with a short deadline: unfinished work goes back to `received`.
        finished, released = await engine.drain(0.2)
        assert (finished, released) == (0, 2)
        assert states(db_url)["processing"] == 0
        assert engine.draining
    finally:
        await _stop(store, loops)
