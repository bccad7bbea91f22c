"""The daemons of one test or one bench phase: their own ports, their own working
directory, one database. The system tests, the chaos suite and the bench start the real
console scripts through this, so that all three run the daemons the same way.

    bundle = PrivateBundle(db_url, workdir)
    consumer = bundle.consumer(CONSUMER_RATE_LIMIT="100")    # started and ready
    producer = bundle.producer(PRODUCER_RATE="500")
    ...
    bundle.stop()                                            # producers first, SIGTERM
"""

from __future__ import annotations

import signal
from pathlib import Path

from daemons.bench.cluster import clean_env
from daemons.bench.ports import free_port
from daemons.bench.process import STOP_TIMEOUT_S, Daemon
from daemons.bench.scrape import metric_positive, metrics_url, serving

START_TIMEOUT_S = 60.0


class PrivateBundle:
    def __init__(self, db_url: str, workdir: Path, *, bench: bool = False) -> None:
        """`bench`: each daemon in a session of its own (Ctrl-C reaches the bench, which
        stops them in order), and ready also by probe when its logs are above INFO."""
        self.db_url = db_url
        self.workdir = workdir
        self.bench = bench
        self.grpc_port = free_port()
        self.ports = {
            "PRODUCER_METRICS_PORT": free_port(),
            "PRODUCER_PROFILING_PORT": free_port(),
            "CONSUMER_METRICS_PORT": free_port(),
            "CONSUMER_PROFILING_PORT": free_port(),
        }
        self.daemons: list[Daemon] = []

    def env(self, **overrides: str) -> dict[str, str]:
        env = clean_env(
            DATABASE_URL=self.db_url,
            CONSUMER_LISTEN=f"127.0.0.1:{self.grpc_port}",
            PRODUCER_CONSUMER_TARGET=f"127.0.0.1:{self.grpc_port}",
            **{k: str(v) for k, v in self.ports.items()},
        )
        env.update(overrides)
        return env

    def start(self, name: str, **overrides: str) -> Daemon:
        """A console script (consumer, producer) with this bundle's environment, not
        waited for."""
        daemon = Daemon.start(name, self.env(**overrides), self.workdir, new_session=self.bench)
        self.daemons.append(daemon)
        return daemon

    def consumer(self, **overrides: str) -> Daemon:
        daemon = self.start("consumer", **overrides)
        listen = daemon.env["CONSUMER_LISTEN"]
        probe = (lambda: serving(listen)) if self.bench else None
        daemon.wait_event("consumer_started", START_TIMEOUT_S, probe)
        return daemon

    def producer(self, **overrides: str) -> Daemon:
        daemon = self.start("producer", **overrides)
        url = metrics_url(daemon.env["PRODUCER_METRICS_PORT"])
        probe = (lambda: metric_positive(url, "tasks_produced_total")) if self.bench else None
        daemon.wait_event("producer_started", START_TIMEOUT_S, probe)
        return daemon

    def extra_consumer_env(self) -> dict[str, str]:
        """Ports of one more consumer beside the first (no profiling port)."""
        return {
            "CONSUMER_LISTEN": f"127.0.0.1:{free_port()}",
            "CONSUMER_METRICS_PORT": str(free_port()),
            "CONSUMER_PROFILING_PORT": "0",
        }

    def extra_producer_env(self) -> dict[str, str]:
        return {"PRODUCER_METRICS_PORT": str(free_port()), "PRODUCER_PROFILING_PORT": "0"}

    def metrics_url(self, daemon: str) -> str:
        return metrics_url(self.ports[daemon.upper() + "_METRICS_PORT"])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, producers first (nothing new reaches a consumer that is draining)."""
        for daemon in sorted(self.daemons, key=lambda d: d.name != "producer"):
            daemon.stop(signal.SIGTERM, timeout_s)

    def close(self) -> None:
        """SIGKILL whatever is still running (a test's teardown)."""
        for daemon in self.daemons:
            daemon.kill()
