"""What one bench run holds: the private PostgreSQL (daemons.bench.cluster, as the tests
use), one database and one bundle of daemons per phase, and the helper processes
(py-spy, load generators). Everything it started is stopped at the end, also on Ctrl-C
or an error, PostgreSQL included."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from daemons.bench.cluster import PostgresDidNotStart, PrivatePostgres
from daemons.bench.private import PrivateBundle
from daemons.bench.process import stop


class BenchError(Exception):
    pass


@dataclass
class Run:
    tmp: Path
    pg_stats: bool = False
    bundles: list[PrivateBundle] = field(default_factory=list)
    others: list[subprocess.Popen[Any]] = field(default_factory=list)
    pg: PrivatePostgres | None = None

    @property
    def pg_pid(self) -> int:
        assert self.pg is not None, "not started"
        return self.pg.pid

    def start(self) -> None:
        self.pg = PrivatePostgres(self.tmp)
        self._launch()
        if self.pg_stats:
            with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            self.pg.stop()
            self._launch()

    def _launch(self) -> None:
        assert self.pg is not None
        # initdb and the single-user step inherit our stderr and chat on it (LOG lines):
        # send them to the cluster's log instead.
        try:
            with quiet_stderr(self.tmp / "postgres-init.log"):
                self.pg.start()
        except PostgresDidNotStart as exc:
            raise BenchError(str(exc)) from None

    def phase(self, name: str) -> PrivateBundle:
        """A fresh migrated database named after the phase, and a bundle on it."""
        assert self.pg is not None
        db_name = "bench_" + re.sub(r"\W", "_", name)
        try:
            url = self.pg.new_database(db_name)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        if self.pg_stats:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        bundle = PrivateBundle(url, self.tmp, bench=True)
        self.bundles.append(bundle)
        return bundle

    def end_phase(self, bundle: PrivateBundle) -> None:
        """A finished phase's database goes at once: otherwise autovacuum works through
        its million updated rows during the next phase and takes CPU from it."""
        assert self.pg is not None
        bundle.stop()
        self.pg.drop_database(str(conninfo_to_dict(bundle.db_url)["dbname"]))

    def close(self) -> None:
        # py-spy writes what it has on SIGINT; the RPC generators just stop.
        for proc in self.others:
            stop(proc, signal.SIGINT, 5)
        for bundle in self.bundles:
            bundle.stop()
        # PostgreSQL's fast shutdown (SIGTERM would wait for every client).
        if self.pg is not None:
            self.pg.stop()


@contextlib.contextmanager
def quiet_stderr(path: Path) -> Iterator[None]:
    """Point file descriptor 2 (inherited by children) at `path` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def private_run(pg_stats: bool = False) -> Iterator[Run]:
    run = Run(Path(tempfile.mkdtemp(prefix="tasks-bench-")), pg_stats)
    try:
        run.start()
        yield run
    finally:
        # Bounded, and not to be cut short by a second Ctrl-C: a half-done clean-up
        # would leave daemons or PostgreSQL behind.
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            run.close()
            shutil.rmtree(run.tmp, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
