"""Retention and the partitioned layout against a real PostgreSQL: removal takes whole
done partitions only, never an unfinished task; maintainers running at once conflict on
nothing; a done time beyond the partitions made so far is not an error; start-up reads
the same few rows whatever the history."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from daemons import maintenance
from daemons import store as store_module
from daemons.store import Partition, Store
from tests.conftest import explain_analyze, sql, states


@pytest.fixture(params=["superuser", "daemons' role"])
def url(request: pytest.FixtureRequest, db_url: str) -> str:
    """Maintenance runs in the daemons, as their role (no superuser): it must be able
    to make, detach and drop partitions and vacuum as that role too."""
    if request.param == "superuser":
        return db_url
    return request.getfixturevalue("app_db_url")  # type: ignore[no-any-return]


async def _store(url: str) -> Store:
    store = Store(url, pool_size=3, name="test")
    await store.open(10)
    return store


def _db_now(url: str) -> float:
    return float(sql(url, "SELECT extract(epoch FROM clock_timestamp())")[0][0])  # type: ignore[arg-type]


async def _past(url: str, t: float) -> None:
    """Until the database's clock has passed `t` (a wait on a clock, not on a condition)."""
    await asyncio.sleep(max(0.0, t - _db_now(url)))
    assert _db_now(url) >= t


def _contiguous(parts: list[Partition]) -> bool:
    return all(a.upper == b.lower for a, b in itertools.pairwise(parts))


async def _done_long_ago(store: Store, url: str, n: int, type_sql: str, value: int) -> Partition:
    """`n` tasks done at t=1000, in the oldest done partition, which is returned."""
    legacy = (await store.done_partitions())[0]
    sql(
        url,
        "INSERT INTO tasks (type, value, state, creation_time, last_update_time)"
        f" SELECT {type_sql}, {value}, 'done', 1000, 1000 FROM generate_series(1, {n}) g",
    )
    return legacy


def _stored_done(url: str) -> int:
    return int(sql(url, "SELECT count(*) FROM tasks_done")[0][0])  # type: ignore[arg-type]


async def test_retention_drops_old_done_partitions_and_never_an_unfinished_task(
    url: str,
) -> None:
    store = await _store(url)
    try:
        parts = await store.done_partitions()
        legacy = parts[0]
        assert legacy.lower == 0 and _contiguous(parts)
        # Done long ago (in the oldest partition), done now, and unfinished tasks whose
        # stamps are older than any retention: received, and stuck in processing.
        sql(
            url,
            "INSERT INTO tasks (type, value, state, creation_time, last_update_time)"
            " SELECT g %% 10, 1, 'done', 1000, 1000 + g FROM generate_series(1, 500) g",
        )
        await _past(url, legacy.upper + 1)  # the template may be a second old
        rows = await store.insert_batch([3] * 30, [7] * 30, [1000.0] * 30)
        ids = [r.id for r in rows]
        claimed = {r.id: r for r in await store.mark_processing(ids[:20])}
        assert sorted(await store.mark_done([claimed[i] for i in ids[:10]])) == sorted(ids[:10])
        sql(url, "UPDATE tasks SET last_update_time = 1000 WHERE state <> 'done'")
        totals_before = await store.done_totals_by_type()
        # A retention that makes the oldest partition expire and nothing newer.
        retention = _db_now(url) - legacy.upper - 0.5
        assert parts[1].upper > _db_now(url)
        report = await store.maintain(60, 600, retention)
        assert report.maintainer
        assert report.dropped == [legacy.name] and report.dropped_rows == 500
        assert states(url) == {"received": 10, "processing": 10, "done": 10}
        assert await store.count_by_state() == states(url)
        # Lifetime totals do not forget what retention removed.
        assert await store.done_totals_by_type() == totals_before
        assert sum(n for n, _ in totals_before.values()) == 510
        after = await store.done_partitions()
        assert legacy.name not in {p.name for p in after} and _contiguous(after)
        assert after[-1].upper >= _db_now(url) + 600 - 1  # made ahead of need
        # A retention far shorter than any age still leaves every unfinished task.
        await store.maintain(60, 600, 1)
        assert states(url)["received"] == 10 and states(url)["processing"] == 10
        # 0 keeps everything.
        kept = await store.done_partitions()
        await store.maintain(60, 600, 0)
        assert [p.name for p in await store.done_partitions()][: len(kept)] == [
            p.name for p in kept
        ]
    finally:
        await store.close()


async def test_a_dropped_partition_is_counted_exactly_slice_by_slice(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count before a drop goes a few pages at a time (not to take both cores at
    once): every slice, the last one open-ended, adds up to the partition's rows."""
    monkeypatch.setattr(store_module, "COUNT_SLICE_PAGES", 4)
    monkeypatch.setattr(store_module, "COUNT_PAUSE_MAX_S", 0.0)
    store = await _store(url)
    try:
        legacy = await _done_long_ago(store, url, 5003, "g %% 10", 3)
        pages = int(sql(url, f"SELECT pg_relation_size('{legacy.name}') / 8192")[0][0])  # type: ignore[arg-type]
        assert pages > 5 * 4  # many slices and a part-filled last one
        await _past(url, legacy.upper + 1)
        report = await store.maintain(60, 600, _db_now(url) - legacy.upper - 0.5)
        assert report.dropped == [legacy.name] and report.dropped_rows == 5003
        assert (await store.count_by_state())["done"] == 0 == states(url).get("done", 0)
    finally:
        await store.close()


async def test_a_pass_stopped_between_detach_and_drop_is_finished_next_time(url: str) -> None:
    store = await _store(url)
    try:
        legacy = await _done_long_ago(store, url, 40, "1", 2)
        # As if a maintainer died right after its DETACH: rows invisible, still counted.
        sql(url, f"ALTER TABLE tasks_done DETACH PARTITION {legacy.name}")
        assert states(url)["done"] == 0 and (await store.count_by_state())["done"] == 40
        report = await store.maintain(60, 600, 0)
        assert report.dropped == [legacy.name] and report.dropped_rows == 40
        assert (await store.count_by_state())["done"] == 0
        assert (await store.done_totals_by_type())[1] == (40, 80)
    finally:
        await store.close()


async def test_maintainers_at_once_conflict_on_nothing_while_tasks_flow(url: str) -> None:
    stores = [await _store(url) for _ in range(3)]
    legacy = (await stores[0].done_partitions())[0]
    await _past(url, legacy.upper + 1)
    # Retention such that the oldest partition is due for removal while they run.
    retention = _db_now(url) - legacy.upper - 0.5
    jobs = [maintenance.Maintenance(s, retention_s=retention, interval_s=0.01) for s in stores]
    stop = asyncio.Event()
    maintainers = 0

    async def flow() -> int:
        done = 0
        while not stop.is_set():
            rows = await stores[0].insert_batch([5] * 200, [1] * 200, [time.time()] * 200)
            ids = [r.id for r in rows]
            done += len(await stores[0].mark_done(await stores[0].mark_processing(ids)))
        return done

    async def maintain(job: maintenance.Maintenance) -> None:
        nonlocal maintainers
        for _ in range(15):
            report = await job.run_once()
            maintainers += report.maintainer
            assert _contiguous(report.partitions)

    try:
        flowing = asyncio.create_task(flow())
        await asyncio.gather(*(maintain(j) for j in jobs))
        stop.set()
        done = await flowing
        assert done > 0 and maintainers >= 1
        # The due partition was removed once, by one of them.
        assert sum(j.dropped for j in jobs) == 1
        parts = await stores[0].done_partitions()
        assert _contiguous(parts)
        names = [p.name for p in parts]
        assert len(names) == len(set(names))
        assert await stores[0].count_by_state() == states(url)
        assert (await stores[0].done_totals_by_type())[5] == (done, done)
    finally:
        for s in stores:
            await s.close()


async def test_a_done_time_past_the_last_partition_makes_one_on_demand(url: str) -> None:
    store = await _store(url)
    try:
        now = _db_now(url)
        for part in await store.done_partitions():
            if part.upper > now - 1:  # every partition that could take a task done now
                sql(url, f"ALTER TABLE tasks_done DETACH PARTITION {part.name}")
                sql(url, f"DROP TABLE {part.name}")
        # Two writers find no partition at the same moment: each makes one, neither fails.
        other = await _store(url)
        now = time.time()
        batches = [await s.insert_batch([2] * 5, [3] * 5, [now] * 5) for s in (store, other)]
        ids = [[r.id for r in rows] for rows in batches]
        claimed = {r.id: r for r in await store.mark_processing(ids[0] + ids[1])}
        done = await asyncio.gather(
            store.mark_done([claimed[i] for i in ids[0]]),
            other.mark_done([claimed[i] for i in ids[1]]),
        )
        assert [sorted(d) for d in done] == [sorted(i) for i in ids]
        assert states(url)["done"] == 10
        parts = await store.done_partitions()
        assert _contiguous(parts) and len({p.name for p in parts}) == len(parts)
        await other.close()
    finally:
        await store.close()


def _buffers(url: str, query: str) -> int:
    top = explain_analyze(url, query)
    return int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))


async def test_start_up_reads_the_same_few_rows_whatever_the_history(db_url: str) -> None:
    """Consumer start-up seeds its running sums from the rollup: the blocks that query
    reads stay a handful between an empty history and two million done tasks."""
    from daemons.store import q

    query = q("done_totals_by_type")
    empty = _buffers(db_url, query)
    sql(
        db_url,
        "INSERT INTO tasks (type, value, state, creation_time, last_update_time)"
        " SELECT g %% 10, g %% 100, 'done', 1000, 1000 FROM generate_series(1, 2000000) g",
    )
    sql(db_url, "VACUUM ANALYZE")
    full = _buffers(db_url, query)
    done_pages = int(
        sql(
            db_url,
            "SELECT sum(pg_relation_size(inhrelid)) / current_setting('block_size')::int"
            " FROM pg_inherits WHERE inhparent = 'tasks_done'::regclass",
        )[0][0]  # type: ignore[arg-type]
    )
    # A handful of blocks of the ten-row rollup either way, against ~10,000 of history.
    assert empty < 16 and full < 16 and done_pages > 5000, (empty, full, done_pages)
    store = await _store(db_url)
    try:
        totals = await store.done_totals_by_type()
        assert sum(n for n, _ in totals.values()) == 2_000_000
        assert totals[3] == (200_000, sum(g % 100 for g in range(3, 2_000_001, 10)))
    finally:
        await store.close()


async def test_idempotency_keys_are_kept_as_long_as_done_tasks(url: str) -> None:
    store = await _store(url)
    try:
        now = time.time()
        await store.register_keyed(["old", "new"], [1, 1], [1, 1], [now, now])
        sql(url, "UPDATE task_keys SET created = created - 7200 WHERE key = 'old'")
        await store.maintain(60, 600, 0)  # no retention: keys are kept too
        assert len(sql(url, "SELECT key FROM task_keys")) == 2
        await store.maintain(60, 600, 3600)
        assert sql(url, "SELECT key FROM task_keys") == [("new",)]
    finally:
        await store.close()
