"""The consumer's processing engine, independent of gRPC.

    admit -> (limiter, in-flight cap) -> mark `processing` (one statement for all requests
    that arrive together) -> work (a timer of `value` ms, no task per sleep) -> a
    group-commit writer marks `done` for everything finished since its last statement.

Only the transition that wins in the database counts (metrics, running sums, log line),
so a task delivered twice is counted once. Every claim carries the attempt the database
gave it (a fencing token): a task taken back and handed out again, even to this same
process, is worked and counted under its newest attempt only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

from daemons import logs, metrics
from daemons.errors import Draining
from daemons.limiter import FairLimiter, SlidingWindowLimiter
from daemons.logs import fields
from daemons.outage import Outage
from daemons.store import TIMEOUT_ERRORS, TRANSIENT_ERRORS, TaskRow, TaskStore

log = logging.getLogger("daemons.consumer")
task_log = logging.getLogger("daemons.consumer.tasks")

TASK_LINE_FIELDS = ("id", "type", "value", "type_sum")
MAX_ROWS_PER_STATEMENT = 5000  # keeps one statement well under a second
# Group commit of done rows: statements start at least 20 ms apart ... At 31,600
# tasks/s (`default` work), 5 ms made statements of ~160 rows and PostgreSQL spent 0.025
# CPU s per 1,000 tasks; 20 ms: ~630 rows, 0.018 (-30 %), p99 beyond the work no worse.
DONE_FLUSH_INTERVAL_S = 0.02
DONE_FLUSH_ROWS = 2000  # ... unless this many finished tasks are waiting
ADMIT_GAP_S = 0.002  # admission statements start at least 2 ms apart ...
ADMIT_FULL = 64  # ... unless this many requests are waiting
BACKOFF_MAX_S = 2.0
# A done statement unanswered this long is an outage (health NOT_SERVING) before its
# deadline runs out: a silent network looks like a slow statement until then.
STALL_S = 3.0
# A write outage ends with a success this long after its last failure: longer than the
# done writer's longest backoff, so writes that keep failing between others that work
# (a full disk) make one episode.
DB_SETTLE_S = BACKOFF_MAX_S + 0.5
FLUSH_GRACE_S = 5.0  # after the drain deadline, time left to write finished work

In = TypeVar("In")
R = TypeVar("R")


class TaskStatus(IntEnum):
    """What became of one delivered task: tasks.v1.TaskStatus without importing gRPC
    here (tests/unit pins every member to the generated enum's name and value)."""

    ACCEPTED = 1
    RATE_LIMITED = 2
    DUPLICATE = 3
    INVALID = 4
    BUSY = 5


@dataclass(slots=True)
class NewTask:
    """A task as a request carries it (id 0 = not registered yet)."""

    id: int
    type: int
    value: int
    creation_time: float = 0.0
    key: str = ""  # a new task's idempotency key ("" = none)


class Coalescer(Generic[In, R]):
    """Runs one statement for every request that arrived while the previous statement
    ran: batches grow with load on their own and add no delay when idle.

    Statements also start at least `min_gap_s` apart unless `full` requests wait. Without
    that, single-task calls under load (statement time ~0.5 ms, a call every 0.3 ms) made
    batches of 1-2 rows, and psycopg's ~150 µs per statement became most of a call's
    cost. A lone caller is not delayed (see Pacer).

    `run(items)` returns one result per item (None = lost the transition). `on_rows` sees
    every non-None result even when the waiting caller was cancelled meanwhile, so work
    the database now records is never dropped by a client that went away.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[In]], Awaitable[list[R | None]]],
        on_rows: Callable[[list[R]], None],
        outage: Outage,
        max_items: int = MAX_ROWS_PER_STATEMENT,
        min_gap_s: float = ADMIT_GAP_S,
        full: int = ADMIT_FULL,
    ) -> None:
        self.name = name
        self._run = run
        self._on_rows = on_rows
        self._outage = outage
        self._max = max_items
        self._pace = Pacer(min_gap_s, full)
        self._queue: list[tuple[list[In], asyncio.Future[list[R | None]]]] = []
        self._wake = asyncio.Event()

    async def submit(self, items: list[In]) -> list[R | None]:
        fut: asyncio.Future[list[R | None]] = asyncio.get_running_loop().create_future()
        self._queue.append((items, fut))
        self._wake.set()
        return await fut

    async def run_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._pace.wait(lambda: sum(len(chunk) for chunk, _ in self._queue))
                take, size = 0, 0
                while take < len(self._queue) and (
                    take == 0 or size + len(self._queue[take][0]) <= self._max
                ):
                    size += len(self._queue[take][0])
                    take += 1
                batch, self._queue = self._queue[:take], self._queue[take:]
                items = [item for chunk, _ in batch for item in chunk]
                try:
                    results = await self._run(items)
                except TRANSIENT_ERRORS as exc:
                    self._outage.failing(exc)
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self._outage.ok()
                self._on_rows([r for r in results if r is not None])
                pos = 0
                for chunk, fut in batch:
                    if not fut.done():
                        fut.set_result(results[pos : pos + len(chunk)])
                    pos += len(chunk)


class Pacer:
    """Group commit: while requests come concurrently, statements of one writer start at
    least `min_gap_s` apart, unless `full` items are already waiting. A lone caller
    (one item per statement, one at a time) and the first statement after a quiet spell
    wait for nothing."""

    def __init__(self, min_gap_s: float, full: int) -> None:
        self.min_gap_s = min_gap_s
        self.full = full
        self._last = -1e9
        self._last_size = 0

    async def wait(self, waiting: Callable[[], int]) -> None:
        loop = asyncio.get_running_loop()
        pause = self._last + self.min_gap_s - loop.time()
        n = waiting()
        if pause > 0 and n < self.full and max(n, self._last_size) > 1:
            await asyncio.sleep(pause)
            n = waiting()
        self._last = loop.time()
        self._last_size = n


@dataclass
class Engine:
    store: TaskStore
    rate_limit: int
    rate_period_s: float
    max_in_flight: int
    work_scale: float = 1.0
    # Told when database writes start or stop failing (the consumer flips its health).
    on_db_state: Callable[[bool], None] | None = None
    db: Outage = field(init=False)
    # Share the limit fairly among authenticated callers (tokens or client certificates).
    fair: bool = False
    limiter: SlidingWindowLimiter | FairLimiter = field(init=False)
    draining: bool = False
    # Admitted and not yet written `done`: id -> (row as claimed, with its attempt; work
    # timer, or None once finished). A newer claim of the same id replaces the entry.
    processing: dict[int, tuple[TaskRow, asyncio.TimerHandle | None]] = field(default_factory=dict)
    reserved: int = 0
    sums: list[int] = field(default_factory=lambda: [0] * 10)
    counts: list[int] = field(default_factory=lambda: [0] * 10)
    done_total: int = 0
    _finished: list[tuple[TaskRow, float]] = field(default_factory=list)
    _wake_writer: asyncio.Event = field(default_factory=asyncio.Event)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _done_pace: Pacer = field(default_factory=lambda: Pacer(DONE_FLUSH_INTERVAL_S, DONE_FLUSH_ROWS))

    def __post_init__(self) -> None:
        limiter = FairLimiter if self.fair else SlidingWindowLimiter
        self.limiter = limiter(self.rate_limit, self.rate_period_s)
        self._idle.set()
        self.db = Outage(
            "db_write",
            log,
            on_change=self._db_changed,
            settle_s=DB_SETTLE_S,
            clock=lambda: asyncio.get_running_loop().time(),
        )
        self.marker: Coalescer[int, TaskRow] = Coalescer(
            "mark-processing", self._mark_processing, self._start_work, self.db
        )
        self.registrar: Coalescer[NewTask, TaskRow] = Coalescer(
            "register", self._register, self._start_registered, self.db
        )

    def _db_changed(self, ok: bool) -> None:
        """At each edge of a write outage: the gauge, and the health hook."""
        metrics.db_write_failing.set(0 if ok else 1)
        if self.on_db_state is not None:
            self.on_db_state(ok)

    async def seed(self) -> None:
        """Running sums survive restarts and retention: they start from the database's
        lifetime totals (a ten-row rollup, so start-up does not grow with history).

        The Prometheus counters do not: they start at zero in each process, as Prometheus
        expects, so `sum(rate(...))` is right across any number of consumers and
        restarts. The lifetime totals are exported as gauges (`tasks_done_in_db`)."""
        for t, (count, total) in (await self.store.done_totals_by_type()).items():
            self.counts[t], self.sums[t] = count, total

    # --- admission ---------------------------------------------------------------

    async def admit(
        self, tasks: Sequence[NewTask], caller: str = ""
    ) -> tuple[list[int], list[TaskStatus]]:
        """Admit what the limiter (its share for `caller`, when fair) and the in-flight
        cap allow. Returns (ids, statuses) in request order. Raises Draining while
        stopping."""
        if self.draining:
            metrics.rejected["draining"].inc(len(tasks))
            raise Draining("consumer is draining; send to another consumer or retry later")
        n = len(tasks)
        metrics.tasks_received.inc(n)
        free = self.max_in_flight - len(self.processing) - self.reserved
        room = max(0, min(n, free))
        granted = self.limiter.acquire(room, caller)
        rate_limited, busy = TaskStatus.RATE_LIMITED, TaskStatus.BUSY  # once, not per task
        statuses = [rate_limited if i < room else busy for i in range(n)]
        ids = [t.id for t in tasks]
        if granted < n:
            limited = room - granted
            if limited:
                metrics.rejected["rate_limit"].inc(limited)
            if n - room:
                metrics.rejected["busy"].inc(n - room)
        if granted == 0:
            return ids, statuses
        self.reserved += granted
        try:
            admitted = range(granted)
            known = [i for i in admitted if tasks[i].id]
            fresh = [i for i in admitted if not tasks[i].id]
            if known:
                rows = await self.marker.submit([tasks[i].id for i in known])
                losers = [tasks[i].id for i, row in zip(known, rows, strict=True) if row is None]
                existing = await self.store.existing_ids(losers) if losers else set()
                for i, row in zip(known, rows, strict=True):
                    if row is not None:
                        statuses[i] = TaskStatus.ACCEPTED
                    elif tasks[i].id in existing:
                        statuses[i] = TaskStatus.DUPLICATE
                        metrics.rejected["duplicate"].inc()
                    else:
                        statuses[i] = TaskStatus.INVALID
                        metrics.rejected["invalid"].inc()
            if fresh:
                rows = await self.registrar.submit([tasks[i] for i in fresh])
                for i, row in zip(fresh, rows, strict=True):
                    if row is None:
                        continue  # its key is being registered by another call: retry
                    ids[i] = row.id
                    if row.attempt:
                        statuses[i] = TaskStatus.ACCEPTED
                    else:  # an earlier call with its key made the task
                        statuses[i] = TaskStatus.DUPLICATE
                        metrics.rejected["duplicate"].inc()
        finally:
            self.reserved -= granted
        return ids, statuses

    async def _mark_processing(self, ids: list[int]) -> list[TaskRow | None]:
        rows = await self.store.mark_processing(ids)
        metrics.batch_processing.observe(len(ids))
        by_id = {row.id: row for row in rows}
        return [by_id.pop(i, None) for i in ids]

    async def _register(self, tasks: list[NewTask]) -> list[TaskRow | None]:
        """Tasks without a key in one statement, tasks with one in another. A row with
        attempt 0 is one an earlier call with the same key made (not claimed now)."""
        now = time.time()
        out: list[TaskRow | None] = [None] * len(tasks)
        plain = [i for i, t in enumerate(tasks) if not t.key]
        keyed = [i for i, t in enumerate(tasks) if t.key]
        made: list[TaskRow] = []
        if plain:
            made = await self.store.insert_batch(
                [tasks[i].type for i in plain],
                [tasks[i].value for i in plain],
                [tasks[i].creation_time or now for i in plain],
                state="processing",
            )
            # Sequence values are drawn in row order within one INSERT ... SELECT.
            made.sort(key=lambda r: r.id)
            for i, row in zip(plain, made, strict=True):
                out[i] = row
        if keyed:
            try:
                rows = await self.store.register_keyed(
                    [tasks[i].key for i in keyed],
                    [tasks[i].type for i in keyed],
                    [tasks[i].value for i in keyed],
                    [tasks[i].creation_time or now for i in keyed],
                )
            except TRANSIENT_ERRORS:
                self._start_work(made)  # registered already: worked, whatever the callers hear
                raise
            for i, maybe in zip(keyed, rows, strict=True):
                out[i] = maybe
        metrics.batch_processing.observe(len(tasks))
        return out

    def _start_registered(self, rows: list[TaskRow]) -> None:
        self._start_work([r for r in rows if r.attempt])  # attempt 0: made earlier

    # --- work ----------------------------------------------------------------------

    def _start_work(self, rows: list[TaskRow]) -> None:
        """The work is a wait of `value` ms: one timer per distinct value in the batch
        (at most 100), not one per task."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        by_value: dict[int, list[TaskRow]] = {}
        for row in rows:
            by_value.setdefault(row.value, []).append(row)
        processing = self.processing
        for value, group in by_value.items():
            handle = loop.call_later(
                value * self.work_scale / 1000.0, self._work_finished, group, now
            )
            for row in group:
                processing[row.id] = (row, handle)
        if processing:
            self._idle.clear()
        metrics.tasks_processing.set(len(processing))

    def _work_finished(self, group: list[TaskRow], started: float) -> None:
        processing = self.processing
        took = asyncio.get_running_loop().time() - started
        finished_at = time.time()
        finished = self._finished
        n = 0
        for row in group:
            if not self._current(row):
                continue  # released by a drain, or claimed again since: a stale timer
            processing[row.id] = (row, None)
            finished.append((row, finished_at))
            n += 1
        metrics.observe_many(metrics.task_processing_seconds, [took] * n)
        self._wake_writer.set()

    def _current(self, row: TaskRow) -> bool:
        """Whether `row` is this process's newest claim of its task."""
        entry = self.processing.get(row.id)
        return entry is not None and entry[0].attempt == row.attempt

    async def done_writer(self) -> None:
        """Group commit: one `done` statement for everything finished since the last one.
        While the database is away the finished work is kept and retried, never lost."""
        delay = 0.05
        # The first `unsure` finished rows were in a statement that failed with its
        # outcome unknown: they are written with the retry's query until written.
        unsure = 0
        rows = MAX_ROWS_PER_STATEMENT
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._finished:
                # Fewer, larger statements (one commit each), also while work trickles in.
                await self._done_pace.wait(lambda: len(self._finished))
                batch = self._finished[:rows]
                try:
                    won = set(
                        await self._watched(
                            self.store.mark_done([row for row, _ in batch], retried=unsure > 0)
                        )
                    )
                except TRANSIENT_ERRORS as exc:
                    # It may have committed with its reply lost: the retry (this batch
                    # leads the next one) also counts what it finds done under our
                    # attempts, so nothing is counted twice or missed.
                    self.db.failing(exc)
                    unsure = max(unsure, len(batch))
                    if isinstance(exc, TIMEOUT_ERRORS):
                        # A batch that keeps timing out is split until it fits.
                        rows = max(1, len(batch) // 2)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                self.db.ok()
                delay, unsure = 0.05, max(0, unsure - len(batch))
                rows = min(MAX_ROWS_PER_STATEMENT, rows * 2)
                del self._finished[: len(batch)]
                metrics.batch_done.observe(len(batch))
                self._record_done(batch, won)

    async def _watched(self, write: Awaitable[R]) -> R:
        """`write`, reported as an outage once it has gone unanswered for STALL_S (an
        alarm, not a task of its own: this wraps every done statement)."""
        alarm = asyncio.get_running_loop().call_later(
            STALL_S, self.db.failing, f"no reply to a done statement for {STALL_S:.0f} s"
        )
        try:
            return await write
        finally:
            alarm.cancel()

    def _record_done(self, batch: list[tuple[TaskRow, float]], won: set[int]) -> None:
        sums, counts = self.sums, self.counts
        batch_counts = [0] * 10
        batch_sums = [0] * 10
        latencies = []
        lines = []
        processing = self.processing
        for row, finished_at in batch:
            current = self._current(row)
            if current:
                del processing[row.id]
            if row.id not in won or not current:
                # Someone else's transition won (lease reclaimed and redelivered), or
                # this row's attempt is an older one: the winner counts it, not us.
                continue
            t = row.type
            sums[t] += row.value
            batch_sums[t] += row.value
            batch_counts[t] += 1
            latencies.append(max(0.0, finished_at - row.creation_time))
            lines.append((row.id, t, row.value, sums[t]))
        for t in range(10):
            if batch_counts[t]:
                counts[t] += batch_counts[t]
                metrics.done_by_type[t].inc(batch_counts[t])
                metrics.value_sum_by_type[t].inc(batch_sums[t])
        metrics.observe_many(metrics.task_latency_seconds, latencies)
        logs.emit_rows(task_log, "task_done", TASK_LINE_FIELDS, lines)
        self.done_total += len(won)
        metrics.tasks_processing.set(len(self.processing))
        if not self.processing:
            self._idle.set()

    async def db_probe(self, every_s: float = 1.0) -> None:
        """While writes are failing, find out when the database is back even if no work
        arrives meanwhile (with health NOT_SERVING, producers stop sending)."""
        while True:
            await asyncio.sleep(every_s)
            if not self.db.active:
                continue
            try:
                await self.store.ping()
            except TRANSIENT_ERRORS:
                continue
            self.db.ok()

    # --- drain ---------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> tuple[int, int]:
        """Stop admitting, let admitted work finish and be written `done` within
        `timeout_s`. What is left goes back to `received` (redelivered later). Returns
        (finished during drain, released)."""
        self.draining = True
        before = self.done_total
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            pass
        released = 0
        if self.processing:
            # Not finished in time: stop the timers, give the work back.
            rows = []
            for row, handle in list(self.processing.values()):
                if handle is not None:
                    handle.cancel()
                    rows.append(row)
            if rows:
                try:
                    released = len(await asyncio.shield(self.store.release_processing(rows)))
                except TRANSIENT_ERRORS as exc:
                    # The database is away (or stopping first): the tasks stay
                    # `processing`, and the lease sweep gives them back after its timeout.
                    log.warning(
                        "drain_release_failed",
                        extra=fields(tasks=len(rows), error=str(exc).strip()[:300]),
                    )
                for row in rows:
                    self.processing.pop(row.id, None)
            if not self.processing:
                self._idle.set()
            # Work that did finish is still written `done`; it only waits on the database.
            try:
                await asyncio.wait_for(self._idle.wait(), FLUSH_GRACE_S)
            except TimeoutError:
                log.error("drain_unwritten", extra=fields(tasks=len(self.processing)))
        return self.done_total - before, released
