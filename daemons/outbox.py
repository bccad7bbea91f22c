"""The producer's engine, independent of gRPC: paced generation under the global
backlog cap, the bookkeeping of tasks in send and waiting to be resent, and backoff.

    tick -> credit (rate x elapsed) -> room under PRODUCER_MAX_BACKLOG -> a batch, in a
    task of its own: insert as `received` (one statement) -> send(rows) -> a status per
    task: accepted, duplicate and invalid are settled; refused, or a failed send, wait
    in `pending` and are resent with backoff.

The database is the outbox: a task refused or lost stays `received`, so whatever this
process forgets (a crash, a lost reply) the sweep (daemons.sweep) finds again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from daemons import metrics
from daemons.engine import TaskStatus
from daemons.lifecycle import Lifecycle
from daemons.logs import fields, id_ranges
from daemons.outage import Outage
from daemons.store import TRANSIENT_ERRORS, TaskRow, TaskStore

log = logging.getLogger("daemons.producer")

TICK_S = 0.02  # generation tick: batches of rate * 20 ms
BACKLOG_REFRESH_S = 0.25  # re-read the global backlog at least this often
MAX_BURST_S = 1.0  # credit never exceeds one second of production (no burst after a pause)
FIRST_BACKOFF_S = 0.05  # doubled at each refusal in a row, up to PRODUCER_RETRY_BACKOFF_MAX
FINISH_POLL_S = 0.2
ID_BLOCK_BATCHES = 10  # ids are reserved for this many full batches at a time

Send = Callable[[list[TaskRow]], Awaitable[Sequence[TaskStatus]]]


class SendFailed(Exception):
    """A batch that reached no consumer, or whose answer never came back; the message
    is the transport's reason. Every task of it is resent."""


def random_tasks(n: int) -> tuple[list[int], list[int]]:
    rnd = random.random
    return [int(rnd() * 10) for _ in range(n)], [int(rnd() * 100) for _ in range(n)]


def batch_size(credit: float, room: int, batch_max: int, remaining: int | None) -> int:
    """How many tasks this tick may create: whole credits, within the backlog room, the
    batch cap and what is left of the total."""
    n = min(int(credit), room, batch_max)
    if remaining is not None:
        n = min(n, remaining)
    return max(0, n)


class Credit:
    """Tasks the rate has earned and production has not spent yet, topped up once a
    tick. A tick is 1/rate at low rates (one task each), TICK_S above 50 tasks/s."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tick_s = min(max(1.0 / rate, TICK_S), 1.0)
        self.cap = max(1.0, rate * MAX_BURST_S)
        self.value = 0.0
        self.last = self.next_tick = now

    def earn(self, now: float) -> None:
        self.next_tick = max(self.next_tick + self.tick_s, now)
        self.value = min(self.value + self.rate * (now - self.last), self.cap)
        self.last = now


class Backlog:
    """Unfinished tasks against the global cap. The count is every producer's, from the
    database; it is re-read at least every BACKLOG_REFRESH_S, and before any batch that
    might cross the cap. Between reads, what this producer made since is added."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.counted = 0
        self.counted_at = -math.inf
        self.since = 0
        self.paused = False

    @property
    def total(self) -> int:
        return self.counted + self.since

    @property
    def room(self) -> int:
        return self.cap - self.total

    def made(self, n: int) -> None:
        self.since += n

    def stale(self, now: float, want: int) -> bool:
        return now - self.counted_at > BACKLOG_REFRESH_S or self.total + want > self.cap

    def recount(self, counted: int, at: float, in_flight: int) -> None:
        # Inserts still in flight may or may not be in the count: assume not (an
        # overestimate keeps the cap; an underestimate would not).
        self.counted, self.counted_at, self.since = counted, at, in_flight

    def hold(self, paused: bool) -> None:
        if paused == self.paused:
            return
        self.paused = paused
        metrics.producer_paused.set(1 if paused else 0)
        event = "producer_paused" if paused else "producer_resumed"
        log.info(event, extra=fields(backlog=self.total))


class IdBlock:
    """Task ids reserved ahead, `block` at a time: one sequence round trip (and commit)
    per block rather than one per batch. Ids a stop leaves unused are gaps, as any
    sequence has."""

    def __init__(self, store: TaskStore, block: int) -> None:
        self.store = store
        self.block = block
        self.ids: list[int] = []
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> list[int]:
        async with self.lock:  # one refill at a time; a take from a full block is instant
            if len(self.ids) < n:
                self.ids += await self.store.reserve_ids(max(self.block, n - len(self.ids)))
            out, self.ids = self.ids[:n], self.ids[n:]
            return out


class Outbox:
    def __init__(
        self,
        store: TaskStore,
        send: Send,
        lifecycle: Lifecycle,
        *,
        rate: float,
        max_backlog: int,
        batch_max: int,
        total: int = 0,  # 0: no total, produce until stopped
        max_concurrent_sends: int = 4,
        backoff_max_s: float = 2.0,
    ) -> None:
        self.store = store
        self.send = send
        self.lifecycle = lifecycle
        self.rate = rate
        self.batch_max = batch_max
        self.backoff_max_s = backoff_max_s
        self.backlog = Backlog(max_backlog)
        self.id_block = IdBlock(store, batch_max * ID_BLOCK_BATCHES)
        self.remaining: int | None = total or None  # tasks still to make, with a total
        self.slots = asyncio.Semaphore(max_concurrent_sends)
        self.sends: set[asyncio.Task[None]] = set()
        self.in_send: dict[int, TaskRow] = {}
        self.pending: dict[int, TaskRow] = {}  # refused or failed: to resend
        self.retry_at = 0.0
        self.backoff_s = FIRST_BACKOFF_S
        self.inserting = 0  # insert statements in flight
        self.inserting_tasks = 0  # tasks in them
        self.produced = 0
        self.accepted = 0
        self.redelivered = 0
        self.generation_done = asyncio.Event()
        self.finished = asyncio.Event()  # with a total: all made, sent and done
        self.db_count = Outage("db_count", log)
        # The producer's writes count as database writes too (read-only, disk full, ...).
        self.db_insert = Outage(
            "db_insert", log, on_change=lambda ok: metrics.db_write_failing.set(0 if ok else 1)
        )
        self.send_outage = Outage("send", log)

    # --- generation ------------------------------------------------------------------

    async def generate(self) -> None:
        """Each tick turns the credit earned into batches. A batch is inserted and sent
        by its own task, holding one of PRODUCER_MAX_CONCURRENT_SENDS slots, so inserts
        and sends overlap and this loop never waits on one of them."""
        loop = asyncio.get_running_loop()
        credit = Credit(self.rate, loop.time())
        while await self._next_tick(credit):
            now = loop.time()
            credit.earn(now)
            if self.remaining == 0:
                if not self.inserting:
                    log.info("producer_total_reached", extra=fields(produced=self.produced))
                    break
                continue  # a failed insert may still give tasks back
            await self._spend(credit, now)
        self.generation_done.set()

    async def _next_tick(self, credit: Credit) -> bool:
        """Wait for the next tick; False once stopping."""
        stopping = self.lifecycle.stopping
        delay = credit.next_tick - asyncio.get_running_loop().time()
        if delay > 0 and not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except TimeoutError:
                pass
        return not stopping.is_set()

    async def _spend(self, credit: Credit, now: float) -> None:
        """Batches for the credit, as far as the backlog leaves room."""
        stopping = self.lifecycle.stopping
        while credit.value >= 1 and not stopping.is_set():
            room = await self._room(now, min(int(credit.value), self.batch_max))
            if room is None:
                return  # the count failed: next tick
            if room <= 0:
                self.backlog.hold(True)
                credit.value = 0.0
                return
            self.backlog.hold(False)
            n = batch_size(credit.value, room, self.batch_max, self.remaining)
            if n == 0:
                return
            await self.slots.acquire()
            credit.value -= n
            self._start_batch(n)

    async def _room(self, now: float, want: int) -> int | None:
        """Room under the cap for `want` more tasks (None: the count failed)."""
        backlog = self.backlog
        if backlog.stale(now, want):
            in_flight = self.inserting_tasks
            try:
                counted = await self.store.count_unfinished()
            except TRANSIENT_ERRORS as exc:
                self.db_count.failing(exc)
                return None
            backlog.recount(counted, asyncio.get_running_loop().time(), in_flight)
            metrics.producer_backlog.set(counted)
            self.db_count.ok()
        return backlog.room

    def _start_batch(self, n: int) -> None:
        self.backlog.made(n)
        if self.remaining is not None:
            self.remaining -= n
        self.inserting += 1
        self.inserting_tasks += n
        self._spawn(self._insert_and_send(n), "insert-and-send")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)
        self.lifecycle.watch(task)

    async def _insert_and_send(self, n: int) -> None:
        """Insert a batch of n new tasks, then send it; holds a slot the caller took."""
        try:
            rows = await self._insert(n)
        except BaseException:
            self.slots.release()
            raise
        finally:
            self.inserting -= 1
            self.inserting_tasks -= n
        if rows is None:
            self.slots.release()
            return
        self.produced += n
        metrics.tasks_produced.inc(n)
        # The producer's own account of what it created, one line per committed insert:
        # held against the rows, it shows a batch inserted twice or a total overshot.
        log.info("tasks_inserted", extra=fields(n=n, ids=id_ranges(r.id for r in rows)))
        for row in rows:
            self.in_send[row.id] = row
        await self._send(rows)

    async def _insert(self, n: int) -> list[TaskRow] | None:
        """The batch's ids are reserved first, so every retry of its insert names the
        same rows: a failure whose outcome is unknown (a reply lost after the commit) can
        neither make a second copy nor lose the batch. None: nothing to send."""
        try:
            ids = await self.id_block.take(n)
        except TRANSIENT_ERRORS as exc:
            self.db_insert.failing(exc)
            if self.remaining is not None:
                self.remaining += n  # nothing was created: make them again
            return None
        types, values = random_tasks(n)
        now = time.time()
        rows = [TaskRow(*r) for r in zip(ids, types, values, [now] * n, strict=True)]
        retried, delay, stopping = False, FIRST_BACKOFF_S, self.lifecycle.stopping
        while True:
            try:
                await self.store.insert_reserved(rows, retried=retried)
                self.db_insert.ok()
                return rows
            except TRANSIENT_ERRORS as exc:
                self.db_insert.failing(exc)
            if stopping.is_set():
                # Stopping with the outcome unknown: if the rows exist they are `received`,
                # and a sweep sends them.
                log.warning("tasks_insert_unsettled", extra=fields(n=n, ids=id_ranges(ids)))
                return None
            retried = True
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, self.backoff_max_s)

    # --- sending ---------------------------------------------------------------------

    async def _send(self, rows: list[TaskRow]) -> None:
        """Send `rows` and settle every task; releases the slot the caller holds."""
        try:
            metrics.producer_batch_size.observe(len(rows))
            try:
                statuses = await self.send(rows)
            except SendFailed as exc:
                self.send_outage.failing(exc)
                self._refused(rows)
                return
            self.send_outage.ok()
            self._settle(rows, statuses)
        finally:
            for row in rows:
                self.in_send.pop(row.id, None)
            self.slots.release()

    def _settle(self, rows: list[TaskRow], statuses: Sequence[TaskStatus]) -> None:
        # Looked up once per batch, not once per task.
        accepted, duplicate, invalid = TaskStatus.ACCEPTED, TaskStatus.DUPLICATE, TaskStatus.INVALID
        refused = []
        for row, status in zip(rows, statuses, strict=True):
            if status == accepted:
                self.accepted += 1
            elif status == duplicate:
                pass  # already processing or done elsewhere: nothing to do
            elif status == invalid:
                log.error("task_unknown_to_consumer", extra=fields(id=row.id))
            else:
                refused.append(row)
        if refused:
            metrics.producer_refused.inc(len(refused))
            self._refused(refused)
        else:
            self.backoff_s = FIRST_BACKOFF_S

    def _refused(self, rows: Iterable[TaskRow]) -> None:
        for row in rows:
            self.pending[row.id] = row
        # Back off while refusals go on; jitter keeps several producers out of step.
        now = asyncio.get_running_loop().time()
        self.retry_at = now + self.backoff_s * (0.5 + random.random())
        self.backoff_s = min(self.backoff_s * 2, self.backoff_max_s)

    async def resend(self) -> None:
        """Send refused and swept tasks again once their backoff has passed."""
        loop = asyncio.get_running_loop()
        while True:
            delay = self.retry_at - loop.time()
            if not self.pending or delay > 0:
                await asyncio.sleep(max(delay, 0.01) if self.pending else 0.02)
                continue
            await self.slots.acquire()
            if self.lifecycle.stopping.is_set():
                self.slots.release()
                return
            take = list(self.pending.values())[: self.batch_max]
            for row in take:
                del self.pending[row.id]
                self.in_send[row.id] = row
            self._spawn(self._send(take), "send-batch")

    def redeliver(self, rows: list[TaskRow]) -> None:
        """Tasks the sweep claimed: resent, unless this process has them already."""
        fresh = [r for r in rows if r.id not in self.pending and r.id not in self.in_send]
        if fresh:
            self.redelivered += len(fresh)
            metrics.producer_redelivered.inc(len(fresh))
            log.info("redelivering", extra=fields(tasks=len(fresh)))
            for row in fresh:
                self.pending[row.id] = row

    # --- the end -----------------------------------------------------------------------

    def all_sent(self) -> bool:
        return self.generation_done.is_set() and not self.pending and not self.in_send

    async def finish_when_done(self) -> None:
        """With a total: set `finished` once everything produced is sent and nothing is
        left unfinished in the database (the sweep keeps running meanwhile, so work a
        dead consumer held is reclaimed and sent again before we leave)."""
        while True:
            await asyncio.sleep(FINISH_POLL_S)
            if not self.all_sent():
                continue
            try:
                if await self.store.count_unfinished() == 0:
                    self.finished.set()
                    return
            except TRANSIENT_ERRORS as exc:
                self.db_count.failing(exc)

    async def drain(self, timeout_s: float) -> tuple[int, int]:
        """Once stopping: wait up to `timeout_s` for the sends in flight, then cancel
        them. Returns (tasks in send at the start, tasks abandoned): abandoned tasks
        are still `received`, and a sweep sends them again."""
        in_flight = len(self.in_send)
        if self.sends:
            await asyncio.wait(list(self.sends), timeout=timeout_s)
        abandoned = len(self.in_send) + len(self.pending)
        for task in list(self.sends):
            task.cancel()
        return in_flight, abandoned
