"""The producer daemon: generate at a rate, store each batch as `received` with one
statement, send it with one RPC, never beyond the max backlog.

The database is the outbox: a task the consumer refused or never got stays `received`,
is resent with backoff, and the redelivery sweep finds anything older than a threshold
(including work a dead consumer held past its lease), so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable

import grpc

from daemons import debug, maintenance, metrics, rpc_client
from daemons.lifecycle import Lifecycle
from daemons.logs import fields
from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from daemons.settings import ProducerSettings
from daemons.store import TRANSIENT_ERRORS, Store, TaskRow

log = logging.getLogger("daemons.producer")

ACCEPTED = tasks_pb2.TASK_STATUS_ACCEPTED
DUPLICATE = tasks_pb2.TASK_STATUS_DUPLICATE
INVALID = tasks_pb2.TASK_STATUS_INVALID
TICK_S = 0.02  # generation tick: batches of rate * 20 ms
BACKLOG_REFRESH_S = 0.25  # re-read the global backlog at least this often
MAX_BURST_S = 1.0  # credit never exceeds one second of production (no burst after a pause)


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


class ProducerApp:
    def __init__(self, settings: ProducerSettings) -> None:
        self.settings = settings
        self.lifecycle = Lifecycle()
        self.store = Store(settings.dsn(), pool_size=settings.db_pool_size, name="producer")
        self.slots = asyncio.Semaphore(settings.max_concurrent_sends)
        self.sends: set[asyncio.Task[None]] = set()
        self.in_send: dict[int, TaskRow] = {}
        self.pending: dict[int, TaskRow] = {}  # refused or failed: to resend
        self.retry_at = 0.0
        self.backoff_s = 0.05
        self.produced = 0
        self.accepted = 0
        self.redelivered = 0
        self.generation_done = asyncio.Event()
        self.remaining: int | None = None  # tasks still to make when PRODUCER_TOTAL is set
        self.inserting = 0  # insert statements in flight
        self.inserting_tasks = 0  # tasks in them
        self.finished = asyncio.Event()
        self._episodes: dict[str, float] = {}

    # --- helpers -------------------------------------------------------------------

    def _trouble(self, what: str, error: object) -> None:
        """Log a failing condition once per episode, not once per batch."""
        if what not in self._episodes:
            self._episodes[what] = time.monotonic()
            log.warning(f"{what}_failing", extra=fields(error=str(error).strip()[:300]))

    def _recovered(self, what: str) -> None:
        since = self._episodes.pop(what, None)
        if since is not None:
            log.info(f"{what}_recovered", extra=fields(after_s=round(time.monotonic() - since, 2)))

    def _all_sent(self) -> bool:
        return self.generation_done.is_set() and not self.pending and not self.in_send

    async def _finish_when_done(self) -> None:
        """With PRODUCER_TOTAL: exit once everything produced is sent and nothing is left
        unfinished in the database (the sweep keeps running meanwhile, so work a dead
        consumer held is reclaimed and sent again before we leave)."""
        while True:
            await asyncio.sleep(0.2)
            if not self._all_sent():
                continue
            try:
                if await self.store.count_unfinished() == 0:
                    self.finished.set()
                    return
            except TRANSIENT_ERRORS as exc:
                self._trouble("db_count", exc)

    # --- generation ----------------------------------------------------------------

    async def generate(self) -> None:
        """Each tick turns the accumulated credit (rate x elapsed) into batches. A batch is
        inserted and sent by its own task, holding one of PRODUCER_MAX_CONCURRENT_SENDS
        slots, so inserts and sends overlap and the loop never waits on one of them."""
        s = self.settings
        tick = min(max(1.0 / s.rate, TICK_S), 1.0)
        credit = 0.0
        last = next_tick = time.monotonic()
        backlog_db, counted_at, since_count = 0, 0.0, 0
        paused = False
        self.remaining = s.total or None
        stopping = self.lifecycle.stopping
        while not stopping.is_set():
            delay = next_tick - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                    break
                except TimeoutError:
                    pass
            now = time.monotonic()
            next_tick = max(next_tick + tick, now)
            credit = min(credit + s.rate * (now - last), max(1.0, s.rate * MAX_BURST_S))
            last = now
            if self.remaining == 0:
                if not self.inserting:
                    log.info("producer_total_reached", extra=fields(produced=self.produced))
                    break
                continue  # a failed insert may still give tasks back
            while credit >= 1 and not stopping.is_set():
                want = min(int(credit), s.batch_max)
                try:
                    if (
                        now - counted_at > BACKLOG_REFRESH_S
                        or backlog_db + since_count + want > s.max_backlog
                    ):
                        # Inserts still in flight may or may not be in the count: assume
                        # not (an overestimate keeps the cap; an underestimate would not).
                        in_flight = self.inserting_tasks
                        backlog_db, counted_at, since_count = (
                            await self.store.count_unfinished(),
                            time.monotonic(),
                            in_flight,
                        )
                        metrics.producer_backlog.set(backlog_db)
                        self._recovered("db_count")
                except TRANSIENT_ERRORS as exc:
                    self._trouble("db_count", exc)
                    break
                room = s.max_backlog - backlog_db - since_count
                if room <= 0:
                    if not paused:
                        paused = True
                        metrics.producer_paused.set(1)
                        log.info("producer_paused", extra=fields(backlog=backlog_db + since_count))
                    credit = 0.0
                    break
                if paused:
                    paused = False
                    metrics.producer_paused.set(0)
                    log.info("producer_resumed", extra=fields(backlog=backlog_db + since_count))
                n = batch_size(credit, room, s.batch_max, self.remaining)
                if n == 0:
                    break
                await self.slots.acquire()
                credit -= n
                since_count += n
                if self.remaining is not None:
                    self.remaining -= n
                self.inserting += 1
                self.inserting_tasks += n
                task = asyncio.create_task(self._insert_and_send(n), name="insert-and-send")
                self.sends.add(task)
                task.add_done_callback(self.sends.discard)
                self.lifecycle.watch(task)
        self.generation_done.set()

    async def _insert_and_send(self, n: int) -> None:
        """Insert a batch of n new tasks, then send it; holds a slot the caller took."""
        try:
            types, values = random_tasks(n)
            rows = await self.store.insert_batch(types, values, [time.time()] * n)
        except TRANSIENT_ERRORS as exc:
            self._trouble("db_insert", exc)
            if self.remaining is not None:
                self.remaining += n  # nothing was created: make them again
            self.slots.release()
            return
        except BaseException:
            self.slots.release()
            raise
        finally:
            self.inserting -= 1
            self.inserting_tasks -= n
        self._recovered("db_insert")
        self.produced += n
        metrics.tasks_produced.inc(n)
        for row in rows:
            self.in_send[row.id] = row
        await self._send(rows)

    # --- sending -------------------------------------------------------------------

    def _start_send(self, rows: list[TaskRow]) -> None:
        """Send `rows` in a watched task; the caller holds one slot, released at the end."""
        for row in rows:
            self.in_send[row.id] = row
        task = asyncio.create_task(self._send(rows), name="send-batch")
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)
        self.lifecycle.watch(task)

    async def _send(self, rows: list[TaskRow]) -> None:
        try:
            request = tasks_pb2.SubmitBatchRequest(
                tasks=[
                    tasks_pb2.Task(
                        id=r.id, type=r.type, value=r.value, creation_time=r.creation_time
                    )
                    for r in rows
                ]
            )
            metrics.producer_batch_size.observe(len(rows))
            try:
                reply = await self.stub.SubmitBatch(request, timeout=self.settings.send_timeout)
            except grpc.aio.AioRpcError as exc:
                metrics.producer_send_errors.labels(exc.code().name).inc()
                self._trouble("send", f"{exc.code().name}: {exc.details()}")
                self._refused(rows)
                return
            self._recovered("send")
            refused = []
            for row, status in zip(rows, reply.statuses, strict=True):
                if status == ACCEPTED:
                    self.accepted += 1
                elif status == DUPLICATE:
                    pass  # already processing or done elsewhere: nothing to do
                elif status == INVALID:
                    log.error("task_unknown_to_consumer", extra=fields(id=row.id))
                else:
                    refused.append(row)
            if refused:
                metrics.producer_refused.inc(len(refused))
                self._refused(refused)
            else:
                self.backoff_s = 0.05
        finally:
            for row in rows:
                self.in_send.pop(row.id, None)
            self.slots.release()

    def _refused(self, rows: Iterable[TaskRow]) -> None:
        for row in rows:
            self.pending[row.id] = row
        # Back off while refusals go on; jitter keeps several producers out of step.
        self.retry_at = time.monotonic() + self.backoff_s * (0.5 + random.random())
        self.backoff_s = min(self.backoff_s * 2, self.settings.retry_backoff_max)

    async def resend(self) -> None:
        """Send refused and swept tasks again once their backoff has passed."""
        while True:
            delay = self.retry_at - time.monotonic()
            if not self.pending or delay > 0:
                await asyncio.sleep(max(delay, 0.01) if self.pending else 0.02)
                continue
            await self.slots.acquire()
            if self.lifecycle.stopping.is_set():
                self.slots.release()
                return
            take = list(self.pending.values())[: self.settings.batch_max]
            for row in take:
                del self.pending[row.id]
            self._start_send(take)

    async def sweep(self) -> None:
        """Redelivery: reclaim expired leases, claim stale `received` tasks (several
        producers never claim the same rows: SKIP LOCKED)."""
        s = self.settings
        while True:
            await asyncio.sleep(s.sweep_interval)
            try:
                rows = await self.store.reclaim_expired(s.lease_timeout, s.batch_max)
                rows += await self.store.claim_stale_received(s.redeliver_after, s.batch_max)
                self._recovered("sweep")
            except TRANSIENT_ERRORS as exc:
                self._trouble("sweep", exc)
                continue
            fresh = [r for r in rows if r.id not in self.pending and r.id not in self.in_send]
            if fresh:
                self.redelivered += len(fresh)
                metrics.producer_redelivered.inc(len(fresh))
                log.info("redelivering", extra=fields(tasks=len(fresh)))
                for row in fresh:
                    self.pending[row.id] = row

    # --- run -----------------------------------------------------------------------

    async def run(self) -> int:
        s = self.settings
        started = time.monotonic()
        self.lifecycle.install_signal_handlers()
        metrics.serve(s.http_host, s.metrics_port)
        await self.store.open(s.db_connect_timeout)
        channel = rpc_client.channel(
            s.consumer_target, s.tls_ca.read_bytes() if s.tls_ca else None, s.tls_server_name
        )
        self.stub = tasks_pb2_grpc.ConsumerStub(channel)
        debug_server = None
        try:
            debug_server = await debug.serve(s.http_host, s.profiling_port)
            log.info(
                "producer_started",
                extra=fields(
                    rate=s.rate,
                    max_backlog=s.max_backlog,
                    total=s.total,
                    target=s.consumer_target,
                ),
            )
            self.lifecycle.spawn("generator", self.generate())
            self.lifecycle.spawn("resender", self.resend())
            self.lifecycle.spawn("sweeper", self.sweep())
            if s.total:
                self.lifecycle.spawn("finisher", self._finish_when_done())
            self.lifecycle.spawn("db-gauges", metrics.refresh_db_gauges(self.store, "producer"))
            maintenance.spawn(self.lifecycle, self.store, s)
            stop = asyncio.create_task(self.lifecycle.stopping.wait())
            done = asyncio.create_task(self.finished.wait())
            await asyncio.wait({stop, done}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            done.cancel()
            return await self._shutdown(started)
        finally:
            await self.lifecycle.cancel_all()
            if debug_server is not None:
                debug_server.close()
            await channel.close()
            await self.store.close()

    async def _shutdown(self, started: float) -> int:
        t0 = time.monotonic()
        self.lifecycle.stopping.set()  # generator and resender stop taking new work
        in_flight = len(self.in_send)
        if self.sends:
            await asyncio.wait(list(self.sends), timeout=self.settings.drain_timeout)
        abandoned = len(self.in_send) + len(self.pending)
        for task in list(self.sends):
            task.cancel()
        log.info(
            "producer_stopped",
            extra=fields(
                produced=self.produced,
                accepted=self.accepted,
                redelivered=self.redelivered,
                in_flight_at_stop=in_flight,
                abandoned_still_received=abandoned,
                drain_s=round(time.monotonic() - t0, 3),
                uptime_s=round(time.monotonic() - started, 1),
                reason="total_reached" if self.finished.is_set() else "signal",
                failure=repr(self.lifecycle.failure) if self.lifecycle.failure else "none",
            ),
        )
        return 1 if self.lifecycle.failure else 0
