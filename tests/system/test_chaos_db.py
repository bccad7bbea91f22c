"""Chaos suite, database faults beyond a restart (issue 15): a network that goes silent,
a database that turns read-only. Each scenario runs under the steady load of
tests/system/test_chaos.py and ends with its checks (run_scenario): every task done,
metrics equal the database per type, nothing counted twice, no program FATAL.

The scenarios run on a PostgreSQL cluster of their own (the fixture is test_chaos's)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from daemons.bench.cluster import PrivatePostgres
from tests.conftest import BIN, sql, states
from tests.system.harness import Bundle, Supervisor, wait_until
from tests.system.test_chaos import (
    RESULTS,
    Cluster,
    _in_flight,
    cluster,
    run_scenario,
    summary_table,
)

__all__ = ["cluster"]  # the module-scoped fixture, used here under its own name

SCENARIOS = ("blackhole", "read_only", "long_transactions")
READ_ONLY_S = 10.0  # how long the database refuses writes
READER_S = 30.0  # how long a reader holds `tasks` while a migration waits for it
HOLDER_S = 6.0  # how long a write transaction holds rows of the counts
LOCK_TIMEOUT_S = 2.0  # the daemons' default *_DB_LOCK_TIMEOUT


class SilentProxy:
    """A TCP proxy on loopback in front of PostgreSQL. `silence()` makes every connection
    open at that moment silent: nothing its client sends reaches the server any more and
    nothing is closed (the kernel still acknowledges, so TCP keepalives and
    tcp_user_timeout see a healthy peer: only a reply deadline can tell). Connections
    made afterwards work normally.

    What the server had already received is still answered: a commit whose reply is lost
    is issue 14's scenario (exactly once across lost replies), with its own proxy."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.links: list[dict[str, object]] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            link: dict[str, object] = {"client": client, "server": server, "silent": False}
            with self.lock:
                self.links.append(link)
            for src, dst, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(link, src, dst, upstream), daemon=True
                ).start()

    def _pump(
        self, link: dict[str, object], src: socket.socket, dst: socket.socket, upstream: bool
    ) -> None:
        try:
            while data := src.recv(65536):
                if upstream and link["silent"]:
                    continue  # swallowed: the client waits for a reply that never comes
                dst.sendall(data)
        except OSError:
            pass
        # A silent link does not pass the close on either: its server session lingers, as
        # behind a real partition, until the server's own timeouts end it.
        if not link["silent"]:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def silence(self) -> int:
        with self.lock:
            for link in self.links:
                link["silent"] = True
            return len(self.links)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for link in self.links:
                for key in ("client", "server"):
                    sock = link[key]
                    assert isinstance(sock, socket.socket)
                    sock.close()


@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[SilentProxy]:
    p = SilentProxy(cluster.port)
    yield p
    p.close()


def _events(log: str, event: str) -> list[str]:
    return [line for line in log.splitlines() if f" {event} " in f"{line} "]


def test_blackhole(cluster: Cluster, proxy: SilentProxy, tmp_path: Path) -> None:
    # The daemons (and this test) reach the cluster through the proxy.
    through_proxy = PrivatePostgres(cluster.root, port=proxy.port)
    cut: list[float] = []

    def inject(bundle: Bundle, sup: Supervisor) -> None:
        _in_flight(bundle, sup)
        assert proxy.silence() >= 4  # the daemons' pools, at least
        cut.append(time.monotonic())

    run_scenario("blackhole", through_proxy, tmp_path, inject)
    log = (tmp_path / "var" / "log" / "consumer.log").read_text()
    # Health went NOT_SERVING (the outage's first edge flips it) while no write was
    # answered, and back once a fresh connection took the writes.
    failing = _events(log, "db_write_failing")
    assert failing and _events(log, "db_write_recovered"), log[-3000:]


def test_read_only(cluster: Cluster, tmp_path: Path) -> None:
    db = "chaos_read_only"

    def inject(bundle: Bundle, sup: Supervisor) -> None:
        _in_flight(bundle, sup)
        sql(cluster.admin_url, f"ALTER DATABASE {db} SET default_transaction_read_only = on")
        t0 = time.monotonic()
        try:
            # Sessions keep the setting they started with: end the daemons' sessions, so
            # that the ones they open next are read-only.
            killed = sql(
                cluster.admin_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name IN ('producer', 'consumer')",
                (db,),
            )
            assert killed
            wait_until(
                lambda: (
                    _events(sup.log("consumer"), "db_write_failing")
                    and _events(sup.log("producer"), "db_insert_failing")
                ),
                READ_ONLY_S,
                "both daemons report the read-only database",
            )
            time.sleep(max(0.0, READ_ONLY_S - (time.monotonic() - t0)))  # the outage itself
        finally:
            # Back to read-write; the daemons' read-only sessions are theirs to replace.
            sql(cluster.admin_url, f"ALTER DATABASE {db} RESET default_transaction_read_only")

    run_scenario("read_only", cluster, tmp_path, inject)
    for program in ("consumer", "producer"):
        log = (tmp_path / "var" / "log" / f"{program}.log").read_text()
        assert "Traceback" not in log, log[-3000:]


def _longest_stall(db_url: str, seconds: float, stalls: list[float]) -> None:
    """Sample the done count for `seconds`; note the longest stretch with no task
    reaching done."""
    t0 = last_t = time.monotonic()
    last_done = states(db_url)["done"]
    longest = 0.0
    while (now := time.monotonic()) < t0 + seconds:
        done = states(db_url)["done"]
        if done > last_done:
            last_t, last_done = now, done
        longest = max(longest, now - last_t)
        time.sleep(0.2)  # the sampling period
    stalls.append(longest)


def test_long_transactions(cluster: Cluster, tmp_path: Path) -> None:
    """A reader holds `tasks` (ACCESS SHARE) for 30 s while `migrator up` applies 0003,
    which needs it exclusively; then a write transaction holds the counts (the row every
    writer once needed, and a shard through the trigger) for 6 s. Neither may stop the
    pipeline for longer than the lock timeout and a second."""
    db_url = cluster.url("chaos_long_transactions")
    stalls: list[float] = []

    def migrator(step: str, env: dict[str, str]) -> Callable[[], str]:
        proc = subprocess.Popen(
            [str(BIN / "migrator"), step],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def finish() -> str:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out
            return out

        return finish

    def inject(bundle: Bundle, sup: Supervisor) -> None:
        env = bundle.env()
        for _ in range(2):  # 0004, then 0003: `up` has 0003 to apply again
            migrator("down", env)()
        _in_flight(bundle, sup)
        with psycopg.connect(db_url) as reader:
            reader.execute("SELECT count(*) FROM tasks").fetchone()  # held until rollback
            finish = migrator("up", env)
            _longest_stall(db_url, READER_S, stalls)
            reader.rollback()
        out = finish()
        assert "migration_waiting_for_lock" in out and out.count("migration_applied") == 2, out
        _in_flight(bundle, sup)
        with psycopg.connect(db_url) as holder:
            # An operator's transaction: the counts' first row by hand, and a task archived
            # (its trigger takes a shard), left open.
            holder.execute("UPDATE task_counts SET done = done WHERE id = 1")
            holder.execute(
                "DELETE FROM tasks WHERE id = (SELECT min(id) FROM tasks WHERE state = 'done')"
            )
            _longest_stall(db_url, HOLDER_S, stalls)
            holder.rollback()

    # ~42 s of injections at 600 tasks/s: a total that keeps the load on throughout.
    run_scenario("long_transactions", cluster, tmp_path, inject, total=30000)
    print(f"\nlong_transactions: longest stall behind the reader / the holder: {stalls} s")
    assert max(stalls) <= LOCK_TIMEOUT_S + 1.0, stalls


def test_print_summary() -> None:
    """Runs last in this module: this module's rows of the chaos summary."""
    rows = [r for r in RESULTS if r.scenario in SCENARIOS]
    text = summary_table(rows)
    print("\nchaos summary (database faults)\n" + text)
    Path(__file__).resolve().parents[2].joinpath("profiles", "chaos-db-summary.txt").write_text(
        text + "\n"
    )
    # test_chaos.py's own summary counts its scenarios in RESULTS: if that module runs
    # after this one, it must not find these rows there.
    RESULTS[:] = [r for r in RESULTS if r.scenario not in SCENARIOS]
    assert len(rows) == len(SCENARIOS) and all(r.lost == 0 and r.double_counted == 0 for r in rows)
