"""What only the real store has: several writers at once, live migrations, triggers.
The operations one by one are in test_store_contract.py, held against the fake too."""

import asyncio
import logging
import os
import subprocess
import time

import psycopg
import pytest

from daemons import store as store_module
from daemons.errors import DatabaseUnavailable
from daemons.store import Store, wait_for_database
from tests.conftest import BIN, explain_analyze, sql, states


async def _store(url: str) -> Store:
    store = Store(url, pool_size=3, name="test")
    await store.open(10)
    return store


async def test_sweeps_claim_each_row_once_across_producers(db_url: str) -> None:
    a, b = await _store(db_url), await _store(db_url)
    try:
        old = time.time() - 100
        rows = await a.insert_batch([0] * 50, [1] * 50, [old] * 50)
        sql(db_url, "UPDATE tasks SET last_update_time = %s", (old,))
        await a.mark_processing([r.id for r in rows[:20]])
        sql(db_url, "UPDATE tasks SET last_update_time = %s", (old,))
        got = await asyncio.gather(
            a.claim_stale_received(10, 1000),
            b.claim_stale_received(10, 1000),
            a.reclaim_expired(10, 1000),
            b.reclaim_expired(10, 1000),
        )
        stale = [r.id for r in got[0] + got[1]]
        expired = [r.id for r in got[2] + got[3]]
        assert len(stale) == len(set(stale))
        assert len(expired) == len(set(expired)) == 20
        # Claimed rows are restamped: a second sweep right after finds nothing new.
        assert await a.claim_stale_received(10, 1000) == []
        assert states(db_url)["processing"] == 0
    finally:
        await a.close()
        await b.close()


async def test_queries_survive_comment_column_coming_and_going(db_url: str) -> None:
    store = await _store(db_url)
    try:
        sql(db_url, "ALTER TABLE tasks DROP COLUMN comment")
        rows = await store.insert_batch([4], [44], [time.time()])
        sql(db_url, "ALTER TABLE tasks ADD COLUMN comment text")
        claimed = await store.mark_processing([rows[0].id])
        assert [r.id for r in claimed] == [rows[0].id]
        assert await store.mark_done(claimed) == [rows[0].id]
    finally:
        await store.close()


async def test_task_counts_stay_exact_for_any_writer(db_url: str) -> None:
    store = await _store(db_url)
    try:
        rows = await store.insert_batch([1] * 10, [1] * 10, [time.time()] * 10)
        await store.insert_batch([2] * 3, [2] * 3, [time.time()] * 3, state="processing")
        ids = [r.id for r in rows]
        claimed = {r.id: r for r in await store.mark_processing(ids[:6])}
        await store.mark_done([claimed[i] for i in ids[:4]])
        await store.release_processing([claimed[ids[4]]])
        # Writers other than the daemons: psql, a migration, an operator's fix.
        sql(db_url, "UPDATE tasks SET state = 'done' WHERE id = %s", (ids[9],))
        sql(db_url, "DELETE FROM tasks WHERE id = %s", (ids[8],))
        # Deleting done rows (by hand, or retention) leaves the lifetime totals alone.
        sql(db_url, "DELETE FROM tasks WHERE id = %s", (ids[0],))
        assert await store.count_by_state() == states(db_url)
        assert (await store.done_totals_by_type())[1] == (5, 5)  # ids 0-3 and 9
        assert await store.count_unfinished() == sum(
            n for s, n in states(db_url).items() if s != "done"
        )
    finally:
        await store.close()


async def test_waiting_for_a_database_that_is_starting_is_quiet_at_first(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make run starts its own PostgreSQL next to the daemons: the first seconds of
    waiting are INFO; one WARNING comes once the wait is longer than that."""
    monkeypatch.setattr(store_module, "QUIET_WAIT_S", 0.5)
    caplog.set_level(logging.INFO, logger="daemons.store")
    with pytest.raises(DatabaseUnavailable):
        await wait_for_database("postgresql://nobody@127.0.0.1:1/tasks", 3, require_schema=True)
    waits = [r for r in caplog.records if r.getMessage() == "database_waiting"]
    assert waits and waits[0].levelno == logging.INFO
    assert [r.levelno for r in waits].count(logging.WARNING) == 1


def test_rolling_back_0001_with_tasks_stored_needs_drop_tasks(db_url: str) -> None:
    """`make drop` twice too many must not delete every task without a word."""
    sql(
        db_url,
        "INSERT INTO tasks (type, value, creation_time, last_update_time) VALUES (1, 1, 0, 0)",
    )
    env = {**os.environ, "DATABASE_URL": db_url}

    def down(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "migrator"), "down", *args], env=env, capture_output=True, text=True
        )

    for expected in (
        "0005_shard_counts",
        "0003_add_comment",
        "0006_hot_partition_keeps_its_pages",
        "0004_task_attempts",
        "0002_partition_tasks",
    ):
        out = down()
        assert out.returncode == 0 and f"id={expected}" in out.stderr, out.stderr
    refused = down()
    assert refused.returncode == 2, refused.stderr
    assert "1 stored tasks" in refused.stderr and "FORCE=1" in refused.stderr
    assert states(db_url)["received"] == 1  # nothing changed
    assert down("--drop-tasks").returncode == 0
    assert sql(db_url, "SELECT to_regclass('tasks')") == [(None,)]


async def test_sessions_carry_the_timeouts_and_a_lock_wait_is_transient(db_url: str) -> None:
    store = Store(db_url, pool_size=1, name="test", statement_timeout_s=3, lock_timeout_s=0.2)
    await store.open(10)
    try:
        async with store.pool.connection() as conn:
            shown = [
                (await (await conn.execute(f"SHOW {name}")).fetchone() or ("",))[0]
                for name in ("statement_timeout", "lock_timeout")
            ]
        assert shown == ["3s", "200ms"]
        rows = await store.insert_batch([0], [1], [time.time()])
        # Someone holds the row: the transition gives up after the lock timeout, with
        # an error the engines retry, instead of queueing behind them.
        with psycopg.connect(db_url) as holder:
            holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (rows[0].id,))
            t0 = time.monotonic()
            with pytest.raises(store_module.TRANSIENT_ERRORS):
                await store.mark_processing([rows[0].id])
            assert time.monotonic() - t0 < 2
        assert [r.id for r in await store.mark_processing([rows[0].id])] == [rows[0].id]
    finally:
        await store.close()


async def test_batch_updates_are_planned_for_each_batch_never_generically(db_url: str) -> None:
    """psycopg prepares a statement on its fifth use. Once a vacuum of the hot partition
    had counted few live rows, PostgreSQL's generic plan for a batch update (which cannot
    see the array's length) was a nested loop over batch x partition: 0.3-1 s for 1,000
    ids. The sessions ask for custom plans, planned with the batch in hand."""
    store = Store(db_url, pool_size=1, name="test")
    await store.open(10)
    try:
        now = time.time()
        rows = await store.insert_batch([0] * 2000, [1] * 2000, [now] * 2000)
        await store.mark_done(await store.mark_processing([r.id for r in rows[:1990]]))
        sql(db_url, "VACUUM tasks_unfinished")  # counts 10 live rows on the partition's pages
        fresh = await store.insert_batch([0] * 2000, [1] * 2000, [now] * 2000)
        # Past psycopg's fifth use and PostgreSQL's five custom plans before a generic one.
        for i in range(16):
            claimed = await store.mark_processing([r.id for r in fresh[i * 125 : (i + 1) * 125]])
            assert len(claimed) == 125
        async with store.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%%state = ''processing''%%ANY%%'"
            )
            plans = await cur.fetchall()
            mode = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
        assert mode == ("force_custom_plan",)
        assert plans and all(g == 0 and c >= 10 for g, c in plans), plans
    finally:
        await store.close()


def _most_rows_a_node_touched(db_url: str, query: str, params: dict[str, str]) -> tuple[int, str]:
    """EXPLAIN ANALYZE `query` (rolled back): the most rows any plan node produced over
    all its loops, and the plan, for a message."""

    def walk(node: dict) -> tuple[float, list[str]]:  # type: ignore[type-arg]
        here = float(node["Actual Rows"]) * float(node["Actual Loops"])
        names = [f"{node['Node Type']} rows={node['Actual Rows']} loops={node['Actual Loops']}"]
        for child in node.get("Plans", []):
            n, sub = walk(child)
            here, names = max(here, n), names + sub
        return here, names

    most, names = walk(explain_analyze(db_url, query, params))
    return int(most), " / ".join(names)


async def test_claims_stay_driven_by_the_batch_when_statistics_saw_one_state(
    db_url: str,
) -> None:
    """Autoanalyze samples the hot partition as it is at that instant; a sample with no
    `received` row at all made the planner count on 1 received row and loop over the
    whole batch for each received task it then found (batch x partition rows, +60 %
    PostgreSQL CPU for the minute until the next analyze, in the soak). A claim touches
    about its batch, whatever the statistics say."""
    store = Store(db_url, pool_size=1, name="test")
    await store.open(10)
    try:
        now = time.time()
        for _ in range(6):  # a burst's pages, then a vacuum: a roomy, sparse partition
            burst = await store.insert_batch([0] * 5000, [1] * 5000, [now] * 5000)
            await store.mark_done(await store.mark_processing([r.id for r in burst]))
        sql(db_url, "VACUUM tasks_unfinished")
        old = await store.insert_batch([0] * 1000, [1] * 1000, [now] * 1000)
        await store.mark_processing([r.id for r in old])
        sql(db_url, "ANALYZE tasks_unfinished")  # every sampled row is `processing`
        fresh = await store.insert_batch([0] * 1000, [1] * 1000, [now] * 1000)
        batch = {"ids": store_module.pg_array([r.id for r in fresh[:180]])}
        most, plan = _most_rows_a_node_touched(db_url, store_module.q("mark_processing"), batch)
        assert most <= 5000, plan  # one pass over the partition at most, never batch x rows
        assert len(await store.mark_processing([r.id for r in fresh[:180]])) == 180
    finally:
        await store.close()


async def test_vacuum_leaves_the_hot_partition_its_pages(db_url: str) -> None:
    """A vacuum that truncates the hot partition's empty tail takes ACCESS EXCLUSIVE on
    it, over and over under load, holding every writer (migration 0006): its pages stay,
    for the next backlog to fill."""
    store = Store(db_url, pool_size=1, name="test")
    await store.open(10)
    try:
        rows = await store.insert_batch([0] * 5000, [1] * 5000, [time.time()] * 5000)
        await store.mark_done(await store.mark_processing([r.id for r in rows]))
        size = int(sql(db_url, "SELECT pg_relation_size('tasks_unfinished')")[0][0])  # type: ignore[call-overload]
        assert states(db_url)["done"] == 5000  # the hot partition holds none of them now
        sql(db_url, "VACUUM tasks_unfinished")  # would cut every page without 0006
        kept = int(sql(db_url, "SELECT pg_relation_size('tasks_unfinished')")[0][0])  # type: ignore[call-overload]
        assert size > 8192 * 10 and kept == size, (size, kept)
    finally:
        await store.close()
