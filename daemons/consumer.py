"""The consumer daemon: wires settings, store, engine and the gRPC server, and owns the
order of start-up and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from daemons import debug, maintenance, metrics
from daemons.auth import Authenticate
from daemons.engine import Engine, NewTask, TaskStatus
from daemons.errors import DaemonError, Draining
from daemons.lifecycle import Lifecycle
from daemons.logs import fields
from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from daemons.rpc_server import ConsumerServicer, ErrorsAndMetrics
from daemons.settings import ConsumerSettings
from daemons.sideport import SidePort
from daemons.store import TRANSIENT_ERRORS, Store, TaskRow
from daemons.sweep import Sweep

log = logging.getLogger("daemons.consumer")

SERVICE_NAME = tasks_pb2.DESCRIPTOR.services_by_name["Consumer"].full_name
MAX_REPLY_BYTES = 16 * 1024 * 1024  # a reply to 10,000 tasks is ~100 KB
RPC_GRACE_S = 2.0  # in-flight RPCs get this long to answer once we stop listening


class ConsumerApp:
    def __init__(self, settings: ConsumerSettings) -> None:
        self.settings = settings
        self.lifecycle = Lifecycle()
        self.store = Store(
            settings.dsn(),
            pool_size=settings.db_pool_size,
            name="consumer",
            **settings.store_options(),
        )
        self.engine = Engine(
            self.store,
            rate_limit=settings.rate_limit,
            rate_period_s=settings.rate_period,
            max_in_flight=settings.max_in_flight,
            work_scale=settings.work_scale,
            on_db_state=self._on_db_state,
            fair=bool(settings.tokens() or settings.tls_client_ca),
        )
        # Its own sweep, so no task is stranded once every producer has exited: what it
        # claims it works itself, through the limiter like any delivery.
        self.sweep = Sweep.configured(self.store, settings, limit=settings.max_in_flight, log=log)
        self.health = health.aio.HealthServicer()
        self._health_tasks: set[asyncio.Task[None]] = set()

    def _on_db_state(self, ok: bool) -> None:
        """NOT_SERVING while the database cannot be written, so balancers and the
        producer stop sending here until it is back."""
        if self.engine.draining:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.get_running_loop().create_task(self._set_health(status))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        metrics.consumer_serving.set(status == health_pb2.HealthCheckResponse.SERVING)

    async def run(self) -> int:
        s = self.settings
        started = time.monotonic()
        self.lifecycle.install_signal_handlers()
        metrics_port = await metrics.serve(
            s.http_host, s.metrics_port, s.http_read_timeout, s.http_max_connections
        )
        await self.store.open(s.db_connect_timeout)
        try:
            await self.engine.seed()
            server = grpc.aio.server(
                interceptors=[
                    ErrorsAndMetrics(),  # outermost: refused calls are counted too
                    Authenticate(s.tokens(), names_from_certificates=bool(s.tls_client_ca)),
                ],
                options=[
                    ("grpc.max_receive_message_length", s.max_message_bytes),
                    ("grpc.max_send_message_length", MAX_REPLY_BYTES),
                    ("grpc.so_reuseport", 0),
                ],
            )
            tasks_pb2_grpc.add_ConsumerServicer_to_server(
                ConsumerServicer(self.engine, s.max_batch), server
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            if s.reflection:
                reflection.enable_server_reflection(
                    (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
                )
            try:
                if s.tls_cert and s.tls_key:
                    # TLS only: a plaintext client fails its handshake on this port.
                    # With a client CA: mutual TLS, a client without a certificate
                    # that CA signed fails its handshake.
                    creds = grpc.ssl_server_credentials(
                        [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                        root_certificates=s.tls_client_ca.read_bytes() if s.tls_client_ca else None,
                        require_client_auth=s.tls_client_ca is not None,
                    )
                    server.add_secure_port(s.listen, creds)
                else:
                    server.add_insecure_port(s.listen)
            except RuntimeError as exc:
                raise DaemonError(f"cannot listen on CONSUMER_LISTEN={s.listen}: {exc}") from None
            self.lifecycle.spawn("processing-writer", self.engine.marker.run_forever())
            self.lifecycle.spawn("register-writer", self.engine.registrar.run_forever())
            self.lifecycle.spawn("done-writer", self.engine.done_writer())
            self.lifecycle.spawn("db-probe", self.engine.db_probe())
            self.lifecycle.spawn("db-gauges", metrics.refresh_db_gauges(self.store, "consumer"))
            maintenance.spawn(self.lifecycle, self.store, s)
            if s.sweep_interval:
                self.lifecycle.spawn("sweeper", self.sweep.run_forever(self._work_swept))
            debug_server = await debug.serve(
                s.http_host, s.profiling_port, s.http_read_timeout, s.http_max_connections
            )
            await server.start()
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info(
                "consumer_started",
                extra=fields(
                    listen=s.listen,
                    rate_limit=s.rate_limit,
                    rate_period_s=s.rate_period,
                    max_in_flight=s.max_in_flight,
                    done_so_far=sum(self.engine.counts),
                    startup_s=round(time.monotonic() - started, 3),
                ),
            )
            await self.lifecycle.stopping.wait()
            return await self._shutdown(server, debug_server, started)
        finally:
            await self.lifecycle.cancel_all()
            await metrics_port.close()
            await self.store.close()

    def _work_swept(self, rows: list[TaskRow]) -> None:
        if rows and not self.engine.draining:
            self.lifecycle.spawn("swept", self._admit_swept(rows))

    async def _admit_swept(self, rows: list[TaskRow]) -> None:
        tasks = [NewTask(r.id, r.type, r.value, r.creation_time) for r in rows]
        try:
            _, statuses = await self.engine.admit(tasks, caller="sweep")
        except Draining:
            return
        except TRANSIENT_ERRORS:
            return  # they stay `received`, for the next sweep or a producer
        log.info(
            "swept_tasks_taken",
            extra=fields(tasks=len(rows), accepted=statuses.count(TaskStatus.ACCEPTED)),
        )

    async def _shutdown(
        self, server: grpc.aio.Server, debug_server: SidePort, started: float
    ) -> int:
        s = self.settings
        t0 = time.monotonic()
        in_flight = len(self.engine.processing)
        log.info("consumer_draining", extra=fields(in_flight=in_flight, timeout_s=s.drain_timeout))
        # Health first, so balancers stop sending before the port closes.
        await self.health.enter_graceful_shutdown()
        metrics.consumer_serving.set(0)
        self.engine.draining = True
        await server.stop(RPC_GRACE_S)
        if self.lifecycle.failure is None:
            finished, released = await self.engine.drain(s.drain_timeout)
        else:
            finished, released = 0, 0
        await debug_server.close()
        log.info(
            "consumer_stopped",
            extra=fields(
                done=self.engine.done_total,
                in_flight_at_stop=in_flight,
                finished_in_drain=finished,
                released_to_received=released,
                drain_s=round(time.monotonic() - t0, 3),
                uptime_s=round(time.monotonic() - started, 1),
                failure=repr(self.lifecycle.failure) if self.lifecycle.failure else "none",
            ),
        )
        return 1 if self.lifecycle.failure else 0
