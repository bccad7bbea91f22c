"""A private PostgreSQL for the tests, the chaos suite and the benchmarks: the embedded
server in a directory of its own, on a port of its own, with a migrated database per
test or phase. One piece of code, so the three cannot drift apart.

    pg = PrivatePostgres.start_new()
    url = pg.new_database("phase_1")       # migrated with the real migrator
    ...
    pg.close()                             # fast shutdown, directory removed

The database functions below take the URL of any server's maintenance database, so the
tests run the same code on TEST_DATABASE_URL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from daemons import localdb
from daemons.bench.ports import free_port

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
# Settings of the daemons that must not leak from the caller's environment into a
# private bundle (its own database, its own ports).
DAEMON_PREFIXES = ("PRODUCER_", "CONSUMER_", "LOCALDB_", "TASKS_")


class PostgresDidNotStart(RuntimeError):
    pass


def clean_env(**overrides: str) -> dict[str, str]:
    """The caller's environment without any daemon setting, the venv first on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(DAEMON_PREFIXES) and k != "DATABASE_URL"
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(overrides)
    return env


def with_database(url: str, name: str) -> str:
    """The same server URL (user, host, parameters) naming database `name`."""
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + name
    return base + (f"?{query}" if query else "")


def migrate(url: str, cwd: Path | None = None, app_role: str | None = None) -> None:
    """`migrator up` on `url`, the real migrator, with none of the caller's settings;
    `app_role` (MIGRATOR_APP_ROLE) is made owner of what it creates."""
    env = clean_env(DATABASE_URL=url)
    if app_role:
        env["MIGRATOR_APP_ROLE"] = app_role
    out = subprocess.run(
        [str(BIN / "migrator"), "up"],
        env=env,
        cwd=cwd or tempfile.gettempdir(),  # no .env of the checkout leaks in
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"migrator up failed:\n{out.stdout}{out.stderr}")


def create_database(admin_url: str, name: str, *, migrated: bool = True, template: str = "") -> str:
    """A fresh database (dropped first if it exists), migrated with the real migrator
    or cloned from `template`; its URL."""
    drop_database(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    url = with_database(admin_url, name)
    if migrated and not template:
        migrate(url)
    return url


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class PrivatePostgres:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls, prefix: str = "tasks-pg-") -> PrivatePostgres:
        pg = cls(Path(tempfile.mkdtemp(prefix=prefix)))
        pg.start()
        return pg

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, db: str, role: str = localdb.OWNER_ROLE) -> str:
        """The superuser's URL by default; `role=localdb.APP_ROLE` for the daemons'."""
        return localdb.url_for(self.port, db, role, localdb.passfile_for(self.root / "pgdata"))

    def start(self) -> None:
        self.popen = localdb.start_background(self.root / "pgdata", self.port, self.log_path)
        if not localdb.wait_ready(self.admin_url, START_TIMEOUT_S):
            log = self.log_path.read_text(errors="replace")[-3000:]
            raise PostgresDidNotStart(f"PostgreSQL did not start:\n{log}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are cut off, as in a crash of the server."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def new_database(self, name: str, *, migrate: bool = True, template: str = "") -> str:
        return create_database(self.admin_url, name, migrated=migrate, template=template)

    def drop_database(self, name: str) -> None:
        drop_database(self.admin_url, name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
