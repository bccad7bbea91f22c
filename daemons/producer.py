"""The producer daemon: wires settings, store, the outbox engine, the redelivery sweep
and the gRPC channel, and owns the order of start-up and shutdown.

The engine (daemons.outbox) paces, caps the backlog and resends; this module gives it
`send`, the one gRPC call: TaskRows out as a SubmitBatch request, a status per task back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import cast

import grpc

from daemons import debug, maintenance, metrics, rpc_client
from daemons.engine import TaskStatus
from daemons.lifecycle import Lifecycle
from daemons.logs import fields
from daemons.outbox import Outbox, SendFailed
from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from daemons.settings import ProducerSettings
from daemons.store import Store, TaskRow
from daemons.sweep import Sweep

log = logging.getLogger("daemons.producer")


class ProducerApp:
    def __init__(self, settings: ProducerSettings) -> None:
        s = self.settings = settings
        token = s.auth_token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.lifecycle = Lifecycle()
        self.store = Store(s.dsn(), pool_size=s.db_pool_size, name="producer", **s.store_options())
        self.outbox = Outbox(
            self.store,
            self._send,
            self.lifecycle,
            rate=s.rate,
            max_backlog=s.max_backlog,
            batch_max=s.batch_max,
            total=s.total,
            max_concurrent_sends=s.max_concurrent_sends,
            backoff_max_s=s.retry_backoff_max,
        )
        self.sweep = Sweep.configured(self.store, s, limit=s.batch_max, log=log)

    async def _send(self, rows: list[TaskRow]) -> Sequence[TaskStatus]:
        request = tasks_pb2.SubmitBatchRequest(
            tasks=[
                tasks_pb2.Task(id=r.id, type=r.type, value=r.value, creation_time=r.creation_time)
                for r in rows
            ]
        )
        try:
            reply = await self.stub.SubmitBatch(
                request, timeout=self.settings.send_timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            metrics.producer_send_errors.labels(exc.code().name).inc()
            raise SendFailed(f"{exc.code().name}: {exc.details()}") from None
        # The same numbers (a unit test pins every member), so a cast will do:
        # converting would be a step per task on the hottest path, to change nothing.
        return cast("Sequence[TaskStatus]", reply.statuses)

    async def run(self) -> int:
        s = self.settings
        started = time.monotonic()
        self.lifecycle.install_signal_handlers()
        metrics_port = await metrics.serve(
            s.http_host, s.metrics_port, s.http_read_timeout, s.http_max_connections
        )
        await self.store.open(s.db_connect_timeout)
        pair = (
            (s.tls_key.read_bytes(), s.tls_cert.read_bytes()) if s.tls_key and s.tls_cert else None
        )
        channel = rpc_client.channel(
            s.consumer_target, s.tls_ca.read_bytes() if s.tls_ca else None, s.tls_server_name, pair
        )
        self.stub = tasks_pb2_grpc.ConsumerStub(channel)
        debug_server = None
        try:
            debug_server = await debug.serve(
                s.http_host, s.profiling_port, s.http_read_timeout, s.http_max_connections
            )
            log.info(
                "producer_started",
                extra=fields(
                    rate=s.rate,
                    max_backlog=s.max_backlog,
                    total=s.total,
                    target=s.consumer_target,
                ),
            )
            self._spawn_loops()
            await self._until_stopped_or_finished()
            return await self._shutdown(started)
        finally:
            await self.lifecycle.cancel_all()
            if debug_server is not None:
                await debug_server.close()
            await metrics_port.close()
            await channel.close()
            await self.store.close()

    def _spawn_loops(self) -> None:
        s, outbox, spawn = self.settings, self.outbox, self.lifecycle.spawn
        spawn("generator", outbox.generate())
        spawn("resender", outbox.resend())
        spawn("sweeper", self.sweep.run_forever(outbox.redeliver))
        if s.total:
            spawn("finisher", outbox.finish_when_done())
        spawn("db-gauges", metrics.refresh_db_gauges(self.store, "producer"))
        maintenance.spawn(self.lifecycle, self.store, s)

    async def _until_stopped_or_finished(self) -> None:
        stop = asyncio.create_task(self.lifecycle.stopping.wait())
        done = asyncio.create_task(self.outbox.finished.wait())
        await asyncio.wait({stop, done}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        done.cancel()

    async def _shutdown(self, started: float) -> int:
        t0 = time.monotonic()
        self.lifecycle.stopping.set()  # generator and resender stop taking new work
        in_flight, abandoned = await self.outbox.drain(self.settings.drain_timeout)
        outbox = self.outbox
        log.info(
            "producer_stopped",
            extra=fields(
                produced=outbox.produced,
                accepted=outbox.accepted,
                redelivered=outbox.redelivered,
                in_flight_at_stop=in_flight,
                abandoned_still_received=abandoned,
                drain_s=round(time.monotonic() - t0, 3),
                uptime_s=round(time.monotonic() - started, 1),
                reason="total_reached" if outbox.finished.is_set() else "signal",
                failure=repr(self.lifecycle.failure) if self.lifecycle.failure else "none",
            ),
        )
        return 1 if self.lifecycle.failure else 0
