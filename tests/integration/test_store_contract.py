"""The store's contract: every test runs against the in-memory fake and against the real
store on a fresh migrated database, with the same assertions, so the fake the unit
tests rely on cannot drift from PostgreSQL.

`-k memory` runs only the fake's side (no database at all)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from daemons.store import Store, TaskRow, TaskStore
from daemons.testing import InMemoryStore
from tests.conftest import sql, states


@dataclass
class Backend:
    """One implementation, and what other writers (an operator, retention, the clock)
    do to its rows, which the contract itself has no operation for."""

    url: str | None  # None: the fake

    @asynccontextmanager
    async def store(self) -> AsyncIterator[TaskStore]:
        if self.url is None:
            self.fake = InMemoryStore()
            yield self.fake
            return
        real = Store(self.url, pool_size=2, name="contract")
        await real.open(10)
        try:
            yield real
        finally:
            await real.close()

    def backdate(self, seconds: float) -> None:
        """Unfinished tasks last touched `seconds` earlier (done ones live in partitions
        by their done time, and stay)."""
        if self.url is None:
            self.fake.backdate(seconds)
        else:
            sql(
                self.url,
                "UPDATE tasks SET last_update_time = last_update_time - %s WHERE state <> 'done'",
                (seconds,),
            )

    def delete(self, ids: Iterable[int]) -> None:
        if self.url is None:
            self.fake.delete(ids)
        else:
            sql(self.url, "DELETE FROM tasks WHERE id = ANY(%s)", (list(ids),))

    def states(self) -> dict[str, int]:
        """What is stored, read around the operations under test."""
        if self.url is not None:
            return states(self.url)
        out = {"received": 0, "processing": 0, "done": 0}
        for task in self.fake.tasks.values():
            out[task.state] += 1
        return out


@pytest.fixture(params=["memory", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend(None)
    return Backend(request.getfixturevalue("db_url"))


def _ids(rows: Iterable[TaskRow]) -> list[int]:
    return sorted(r.id for r in rows)


async def test_insert_gives_increasing_ids_and_the_rows_back(backend: Backend) -> None:
    async with backend.store() as store:
        now = time.time()
        rows = await store.insert_batch([1, 2, 3], [10, 20, 30], [now, now + 1, now + 2])
        assert [(r.type, r.value, r.creation_time) for r in sorted(rows, key=lambda r: r.id)] == [
            (1, 10, now),
            (2, 20, now + 1),
            (3, 30, now + 2),
        ]
        more = await store.insert_batch([4], [40], [now])
        assert min(r.id for r in more) > max(r.id for r in rows)
        await store.insert_batch([5, 5], [1, 1], [now] * 2, state="processing")
        assert backend.states() == {"received": 4, "processing": 2, "done": 0}
        assert await store.count_by_state() == backend.states()
        assert await store.count_unfinished() == 6


async def test_a_retried_reserved_insert_never_makes_a_second_copy(backend: Backend) -> None:
    """Reserved ids are fresh and unique; a retry after a committed first attempt (its
    reply lost) inserts nothing and says so, even once the rows have moved on to done."""
    async with backend.store() as store:
        (old,) = await store.insert_batch([0], [1], [time.time()])
        ids = await store.reserve_ids(3)
        assert len(set(ids)) == 3 and min(ids) > old.id
        rows = [TaskRow(i, 2, 5, time.time()) for i in ids]
        assert await store.insert_reserved(rows) is True
        assert await store.insert_reserved(rows, retried=True) is False
        await store.mark_done(await store.mark_processing(ids[:1]))
        assert await store.insert_reserved(rows, retried=True) is False
        assert backend.states() == {"received": 3, "processing": 0, "done": 1}
        # A retry of an attempt that did not commit inserts the rows.
        fresh = [TaskRow(i, 3, 7, time.time()) for i in await store.reserve_ids(2)]
        assert await store.insert_reserved(fresh, retried=True) is True
        assert backend.states()["received"] == 5
        assert await store.count_unfinished() == 5


async def test_a_key_registers_its_task_once(backend: Backend) -> None:
    """Client tasks with idempotency keys: made `processing` once; the same key again
    gives the first task back, unclaimed (attempt 0); a key twice in one batch is made
    for its first request and the second is told to try again (None)."""
    async with backend.store() as store:
        now = time.time()
        first = await store.register_keyed(["a", "b"], [1, 2], [10, 20], [now, now])
        assert all(r is not None and r.attempt == 1 for r in first)
        assert [(r.type, r.value) for r in first if r] == [(1, 10), (2, 20)]
        again = await store.register_keyed(["b", "c", "a"], [2, 3, 1], [20, 30, 10], [now] * 3)
        assert again[0] is not None and again[2] is not None and again[1] is not None
        assert (again[0].id, again[0].attempt) == (first[1].id, 0)  # type: ignore[union-attr]
        assert (again[2].id, again[2].attempt) == (first[0].id, 0)  # type: ignore[union-attr]
        assert again[1].attempt == 1  # "c" is new
        twice = await store.register_keyed(["d", "d"], [4, 4], [1, 1], [now, now])
        assert twice[0] is not None and twice[0].attempt == 1 and twice[1] is None
        assert backend.states() == {"received": 0, "processing": 4, "done": 0}
        done = await store.mark_done([r for r in first if r])
        assert sorted(done) == sorted(r.id for r in first if r)


async def test_each_transition_wins_once_and_only_from_its_state(backend: Backend) -> None:
    async with backend.store() as store:
        rows = await store.insert_batch([1, 1, 2, 3], [10, 20, 30, 40], [time.time()] * 4)
        ids = _ids(rows)
        assert await store.mark_done(rows) == []  # received: not done yet
        claimed = await store.mark_processing(ids[:3] + ids[:1])  # id 0 twice
        assert _ids(claimed) == ids[:3]
        assert {r.attempt for r in claimed} == {1}
        assert await store.mark_processing(ids[:3]) == []  # a second delivery wins nothing
        by_id = {r.id: r for r in claimed}
        assert sorted(await store.mark_done([by_id[i] for i in ids[:2]])) == ids[:2]
        assert await store.mark_done([by_id[i] for i in ids[:2]]) == []
        assert await store.release_processing(claimed) == [ids[2]]  # only the processing one
        assert await store.release_processing(claimed) == []
        assert backend.states() == {"received": 2, "processing": 0, "done": 2}
        assert await store.count_by_state() == backend.states()
        assert await store.count_unfinished() == 2
        # A done task never comes back.
        assert await store.mark_processing(ids[:2]) == []
        assert await store.release_processing(claimed) == []


async def test_a_stale_owner_changes_nothing(backend: Backend) -> None:
    """Every claim and reclaim ends the attempt before it: the owner whose lease was
    taken back can neither complete nor release the task that now is someone else's."""
    async with backend.store() as store:
        ids = _ids(await store.insert_batch([4, 4], [9, 9], [time.time()] * 2))
        stale = await store.mark_processing(ids)
        backend.backdate(100)
        reclaimed = await store.reclaim_expired(10, 10)
        assert _ids(reclaimed) == ids and {r.attempt for r in reclaimed} == {2}
        fresh = await store.mark_processing(ids)
        assert {r.attempt for r in fresh} == {3}
        assert await store.mark_done(stale) == []
        assert await store.mark_done(stale, retried=True) == []
        assert await store.release_processing(stale) == []
        assert backend.states() == {"received": 0, "processing": 2, "done": 0}
        assert sorted(await store.mark_done(fresh)) == ids
        assert (await store.done_totals_by_type())[4] == (2, 18)


async def test_a_retried_done_write_counts_what_it_did_once(backend: Backend) -> None:
    """A done write whose reply was lost: its retry reports the rows the first attempt
    moved (its own attempt, now done) as well as what it moves itself, and only those."""
    async with backend.store() as store:
        ids = _ids(await store.insert_batch([5] * 3, [1] * 3, [time.time()] * 3))
        claimed = {r.id: r for r in await store.mark_processing(ids)}
        assert await store.mark_done([claimed[ids[0]]]) == [ids[0]]  # reply "lost"
        retry = [claimed[i] for i in ids]
        assert sorted(await store.mark_done(retry, retried=True)) == ids
        assert sorted(await store.mark_done(retry, retried=True)) == ids  # still ours
        assert await store.mark_done(retry) == []  # a first try would say nothing moved
        assert (await store.done_totals_by_type())[5] == (3, 3)


async def test_mark_processing_returns_the_whole_row(backend: Backend) -> None:
    async with backend.store() as store:
        created = time.time() - 5
        (row,) = await store.insert_batch([7], [77], [created])
        (won,) = await store.mark_processing([row.id])
        assert (won.id, won.type, won.value, won.creation_time) == (row.id, 7, 77, created)


async def test_existing_ids_are_those_stored_in_any_state(backend: Backend) -> None:
    async with backend.store() as store:
        ids = _ids(await store.insert_batch([0, 0, 0], [1, 1, 1], [time.time()] * 3))
        claimed = {r.id: r for r in await store.mark_processing(ids[1:])}
        await store.mark_done([claimed[ids[2]]])
        assert await store.existing_ids([*ids, 999_999]) == set(ids)
        assert await store.existing_ids([]) == set()
        backend.delete(ids[:1])
        assert await store.existing_ids(ids) == set(ids[1:])


async def test_done_totals_are_lifetime_per_type(backend: Backend) -> None:
    async with backend.store() as store:
        assert await store.done_totals_by_type() == {t: (0, 0) for t in range(10)}
        ids = _ids(await store.insert_batch([1, 1, 2, 9], [10, 5, 20, 99], [time.time()] * 4))
        claimed = {r.id: r for r in await store.mark_processing(ids)}
        await store.mark_done([claimed[i] for i in ids[:3]])
        await store.mark_done([claimed[i] for i in ids[:3]])  # lost transitions count nothing
        (late,) = await store.insert_batch([9], [1], [time.time()], state="processing")
        assert late.attempt == 1  # a client's task, registered as claimed
        await store.mark_done([late])
        totals = await store.done_totals_by_type()
        assert sorted(totals) == list(range(10))
        assert {t: v for t, v in totals.items() if v != (0, 0)} == {
            1: (2, 15),
            2: (1, 20),
            9: (1, 1),
        }
        # Removing done rows (retention, or by hand) leaves the lifetime totals alone,
        # while the counts say what is stored.
        backend.delete(ids[:3])
        assert await store.done_totals_by_type() == totals
        assert await store.count_by_state() == {"received": 0, "processing": 1, "done": 1}


async def test_expired_leases_are_reclaimed_once_oldest_first(backend: Backend) -> None:
    async with backend.store() as store:
        ids = _ids(await store.insert_batch([0] * 6, [1] * 6, [time.time()] * 6))
        await store.mark_processing(ids[:4])
        backend.backdate(100)
        (fresh,) = await store.insert_batch([0], [1], [time.time()], state="processing")
        assert await store.reclaim_expired(1000, 10) == []  # not old enough
        first = await store.reclaim_expired(10, 3)
        assert len(first) == 3 and set(_ids(first)) <= set(ids[:4])
        rest = await store.reclaim_expired(10, 10)
        assert _ids(first + rest) == ids[:4]  # each once; the fresh lease is left alone
        assert await store.reclaim_expired(10, 10) == []  # reclaimed rows are restamped
        assert backend.states() == {"received": 6, "processing": 1, "done": 0}
        assert await store.mark_processing([fresh.id]) == []  # still processing


async def test_stale_received_are_claimed_once_and_stay_received(backend: Backend) -> None:
    async with backend.store() as store:
        ids = _ids(await store.insert_batch([0] * 5, [1] * 5, [time.time()] * 5))
        await store.mark_processing(ids[4:])
        backend.backdate(100)
        new = _ids(await store.insert_batch([0], [1], [time.time()]))
        assert await store.claim_stale_received(1000, 10) == []
        first = await store.claim_stale_received(10, 2)
        rest = await store.claim_stale_received(10, 10)
        assert len(first) == 2 and _ids(first + rest) == ids[:4]  # not the processing one
        assert await store.claim_stale_received(10, 10) == []  # restamped
        assert backend.states() == {"received": 5, "processing": 1, "done": 0}
        assert _ids(await store.mark_processing(ids[:4] + new)) == ids[:4] + new


async def test_released_work_is_stale_at_once(backend: Backend) -> None:
    """A draining consumer's unfinished work goes back stamped 0, so the next sweep
    sends it again whatever the threshold."""
    async with backend.store() as store:
        ids = _ids(await store.insert_batch([3, 3], [1, 1], [time.time()] * 2))
        claimed = {r.id: r for r in await store.mark_processing(ids)}
        assert await store.release_processing([claimed[ids[0]]]) == ids[:1]
        assert _ids(await store.claim_stale_received(3600, 10)) == ids[:1]


async def test_ping(backend: Backend) -> None:
    async with backend.store() as store:
        assert await store.ping() is None
