"""The producer's engine on the in-memory store and a virtual clock: the backlog cap,
the total, refused tasks resent with backoff, the sweep's tasks redelivered. No I/O:
`send` is a stand-in consumer, and seconds of pacing take no real time."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

import psycopg
import pytest
from prometheus_client import REGISTRY

from daemons.engine import TaskStatus
from daemons.lifecycle import Lifecycle
from daemons.logs import parse_id_ranges
from daemons.outbox import FIRST_BACKOFF_S, Outbox, SendFailed
from daemons.store import TaskRow
from daemons.sweep import Sweep
from daemons.testing import InMemoryStore
from tests.virtual_clock import run

ACCEPTED, RATE_LIMITED = TaskStatus.ACCEPTED, TaskStatus.RATE_LIMITED
Answer = Callable[[int, TaskRow], TaskStatus]  # (call number from 1, task) -> status


class Consumer:
    """Stands in for the consumer behind `send`: answers each task as `answer` says and,
    when `works`, takes accepted tasks to `done` in the store at once."""

    def __init__(
        self, store: InMemoryStore, answer: Answer = lambda n, row: ACCEPTED, works: bool = True
    ) -> None:
        self.store = store
        self.answer = answer
        self.works = works
        self.calls: list[tuple[float, list[int]]] = []  # (loop time, ids sent)
        self.fail_calls = 0  # the first this many calls fail as the transport would

    async def __call__(self, rows: list[TaskRow]) -> list[TaskStatus]:
        self.calls.append((asyncio.get_running_loop().time(), [r.id for r in rows]))
        if len(self.calls) <= self.fail_calls:
            raise SendFailed("UNAVAILABLE: connection refused")
        statuses = [self.answer(len(self.calls), row) for row in rows]
        accepted = [r.id for r, s in zip(rows, statuses, strict=True) if s == ACCEPTED]
        if self.works and accepted:
            await self.store.mark_done(await self.store.mark_processing(accepted))
        return statuses


def _outbox(store: InMemoryStore, consumer: Consumer, **kw: float) -> tuple[Outbox, Lifecycle]:
    params: dict[str, float] = dict(rate=1000, max_backlog=10_000, batch_max=100)
    params.update(kw)
    lifecycle = Lifecycle()
    outbox = Outbox(store, consumer, lifecycle, **params)  # type: ignore[arg-type]
    lifecycle.spawn("generator", outbox.generate())
    lifecycle.spawn("resender", outbox.resend())
    if outbox.remaining is not None:
        lifecycle.spawn("finisher", outbox.finish_when_done())
    return outbox, lifecycle


async def _finished(outbox: Outbox, lifecycle: Lifecycle, limit_s: float = 30) -> None:
    """Until a total is made, sent and done (in virtual time), then stop."""
    await asyncio.wait_for(outbox.finished.wait(), limit_s)
    await _stop(outbox, lifecycle)


async def _stop(outbox: Outbox, lifecycle: Lifecycle) -> None:
    lifecycle.stopping.set()
    await outbox.drain(1.0)
    await lifecycle.cancel_all()
    assert lifecycle.failure is None


def _events(caplog: pytest.LogCaptureFixture, *names: str) -> list[tuple[str, dict[str, object]]]:
    records = [r for r in caplog.records if r.getMessage() in names]
    return [(r.getMessage(), dict(getattr(r, "fields", {}))) for r in records]


async def _undone(store: InMemoryStore) -> int:
    return await store.count_unfinished()


def test_production_pauses_at_the_backlog_cap_and_resumes_when_it_drains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        store = InMemoryStore()
        outbox, lifecycle = _outbox(store, Consumer(store, works=False), max_backlog=50)
        await asyncio.sleep(1.0)  # 1,000 tasks of credit against a cap of 50
        assert await _undone(store) == 50 and outbox.backlog.paused
        assert REGISTRY.get_sample_value("producer_paused") == 1
        await asyncio.sleep(2.0)  # the cap holds over time, not at one instant only
        assert await _undone(store) == 50 and outbox.produced == 50
        received = [t.row.id for t in store.tasks.values() if t.state == "received"]
        await store.mark_done(await store.mark_processing(received))  # the consumer catches up
        await asyncio.sleep(0.5)
        assert outbox.produced > 50 and await _undone(store) <= 50
        await _stop(outbox, lifecycle)

    run(scenario())
    events = _events(caplog, "producer_paused", "producer_resumed")
    assert events[:2] == [
        ("producer_paused", {"backlog": 50}),
        ("producer_resumed", {"backlog": 0}),
    ]


def test_a_total_stops_production_once_all_is_done(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> Outbox:
        store = InMemoryStore()
        outbox, lifecycle = _outbox(store, Consumer(store), rate=2000, total=130, batch_max=25)
        await asyncio.wait_for(outbox.finished.wait(), 10)
        assert await store.count_by_state() == {"received": 0, "processing": 0, "done": 130}
        await asyncio.sleep(1.0)  # nothing more is made after the total
        assert len(store.tasks) == 130
        await _stop(outbox, lifecycle)
        return outbox

    outbox = run(scenario())
    assert outbox.produced == outbox.accepted == 130 and outbox.remaining == 0
    assert _events(caplog, "producer_total_reached") == [
        ("producer_total_reached", {"produced": 130})
    ]


def test_refused_tasks_are_resent_with_growing_jittered_backoff() -> None:
    """Four refusals in a row, then accepted: the waits between sends double from
    FIRST_BACKOFF_S up to the cap, each within its jitter (0.5x to 1.5x)."""

    async def scenario() -> tuple[Consumer, Outbox]:
        store = InMemoryStore()
        consumer = Consumer(store, answer=lambda n, row: RATE_LIMITED if n <= 4 else ACCEPTED)
        outbox, lifecycle = _outbox(store, consumer, rate=250, total=5, backoff_max_s=0.3)
        await _finished(outbox, lifecycle)
        return consumer, outbox

    consumer, outbox = run(scenario())
    times, batches = zip(*consumer.calls, strict=True)
    assert len(batches) == 5 and all(sorted(b) == sorted(batches[0]) for b in batches)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, backoff in zip(gaps, [0.05, 0.1, 0.2, 0.3], strict=True):
        assert 0.5 * backoff <= gap <= 1.5 * backoff + 0.01, (gaps, backoff)
    assert outbox.backoff_s == FIRST_BACKOFF_S  # reset by the accepted batch


def test_a_failed_send_is_resent_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> Consumer:
        store = InMemoryStore()
        consumer = Consumer(store)
        consumer.fail_calls = 3
        outbox, lifecycle = _outbox(store, consumer, rate=250, total=5)
        await _finished(outbox, lifecycle)
        return consumer

    consumer = run(scenario())
    assert len(consumer.calls) == 4
    assert _events(caplog, "send_failing", "send_recovered")[0] == (
        "send_failing",
        {"error": "UNAVAILABLE: connection refused"},
    )
    assert [e for e, _ in _events(caplog, "send_failing", "send_recovered")] == [
        "send_failing",
        "send_recovered",
    ]


def test_duplicate_and_invalid_tasks_are_settled_not_resent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def answer(n: int, row: TaskRow) -> TaskStatus:
        return {1: TaskStatus.DUPLICATE, 2: TaskStatus.INVALID}.get(row.id, ACCEPTED)

    async def scenario() -> tuple[Consumer, Outbox]:
        store = InMemoryStore()
        consumer = Consumer(store, answer=answer)
        outbox, lifecycle = _outbox(store, consumer, rate=250, total=5)
        await asyncio.sleep(1.0)
        await _stop(outbox, lifecycle)
        return consumer, outbox

    consumer, outbox = run(scenario())
    assert len(consumer.calls) == 1 and outbox.accepted == 3 and not outbox.pending
    assert _events(caplog, "task_unknown_to_consumer") == [("task_unknown_to_consumer", {"id": 2})]


def test_a_database_outage_is_reported_once_and_production_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> InMemoryStore:
        store = InMemoryStore()
        store.fail = psycopg.OperationalError("server closed the connection unexpectedly")
        outbox, lifecycle = _outbox(store, Consumer(store), rate=500, total=100)
        await asyncio.sleep(2.0)
        assert not store.tasks
        store.fail = None
        await _finished(outbox, lifecycle)
        return store

    store = run(scenario())
    assert len(store.tasks) == 100
    events = _events(caplog, "db_count_failing", "db_count_recovered")
    assert [e for e, _ in events] == ["db_count_failing", "db_count_recovered"]
    assert isinstance(events[1][1]["after_s"], float)  # the wall clock's: not judged here


def test_an_insert_whose_reply_was_lost_is_neither_repeated_nor_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store commits a batch and then fails as a dropped connection does: the retry
    of the same reserved ids finds them stored, so the total is made exactly once and
    every task is sent, counted and logged once."""
    caplog.set_level(logging.INFO)

    async def scenario() -> tuple[Consumer, Outbox, InMemoryStore]:
        store = InMemoryStore()
        store.lose_reply = True
        store.lose_reply_error = psycopg.OperationalError("server closed the connection")
        consumer = Consumer(store)
        outbox, lifecycle = _outbox(store, consumer, rate=500, total=60, batch_max=20)
        await _finished(outbox, lifecycle)
        return consumer, outbox, store

    consumer, outbox, store = run(scenario())
    assert not store.lose_reply, "the fault was injected"
    assert len(store.tasks) == 60 and outbox.produced == 60
    sent = [i for _, ids in consumer.calls for i in ids]
    assert sorted(sent) == sorted(store.tasks)
    inserted = [
        i for _, f in _events(caplog, "tasks_inserted") for i in parse_id_ranges(str(f["ids"]))
    ]
    assert sorted(inserted) == sorted(store.tasks)
    assert [e for e, _ in _events(caplog, "db_insert_failing", "db_insert_recovered")] == [
        "db_insert_failing",
        "db_insert_recovered",
    ]


def test_swept_tasks_are_redelivered_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> tuple[Consumer, Outbox, InMemoryStore]:
        store = InMemoryStore()
        lost = await store.insert_batch([1] * 4, [1] * 4, [0.0] * 4)  # a dead producer's
        await store.mark_processing([r.id for r in lost[:2]])  # a dead consumer's
        store.backdate(60)
        consumer = Consumer(store)
        outbox, lifecycle = _outbox(store, consumer, rate=1, max_backlog=0)  # sends only
        sweep = Sweep(
            store, lease_s=30, stale_s=10, limit=100, interval_s=1, log=logging.getLogger("t")
        )
        rows = await sweep.once()
        outbox.redeliver(rows)
        outbox.redeliver(rows)  # a second sweep's claim while they wait: not twice
        await asyncio.sleep(0.5)
        await _stop(outbox, lifecycle)
        return consumer, outbox, store

    consumer, outbox, store = run(scenario())
    assert [sorted(ids) for _, ids in consumer.calls] == [[1, 2, 3, 4]]
    assert outbox.redelivered == 4 and outbox.produced == 0
    assert all(t.state == "done" for t in store.tasks.values())
    assert _events(caplog, "redelivering") == [("redelivering", {"tasks": 4})]
