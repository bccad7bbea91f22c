"""Shared fixtures: a real PostgreSQL for the whole session (a throwaway embedded cluster,
or TEST_DATABASE_URL), and a fresh database per test cloned from a migrated template."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daemons import localdb
from daemons.bench.cluster import PrivatePostgres
from daemons.bench.ports import free_port as free_port  # re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEMPLATE = "tasks_template"


def need(condition: bool, reason: str) -> None:
    """Skip for a missing tool locally; under CI=true that is a failure instead."""
    if not condition:
        if CI:
            pytest.fail(f"CI=true and a test prerequisite is missing: {reason}")
        pytest.skip(reason)


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _with_db(url: str, dbname: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + dbname
    return base + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of the maintenance database (`postgres`) of a server for this session."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield _with_db(os.environ["TEST_DATABASE_URL"], "postgres")
        return
    pg = PrivatePostgres.start_new("tasks-test-pg-")
    try:
        yield pg.admin_url
    finally:
        pg.close()


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> str:
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    url = _with_db(pg_server, TEMPLATE)
    env = {**os.environ, "DATABASE_URL": url}
    if not os.environ.get("TEST_DATABASE_URL"):
        env["MIGRATOR_APP_ROLE"] = localdb.APP_ROLE  # the daemons' role owns the tables
    subprocess.run([str(BIN / "migrator"), "up"], env=env, check=True, capture_output=True)
    return url


@pytest.fixture
def db_url(pg_server: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield _with_db(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def app_db_url(db_url: str) -> str:
    """The same database as the daemons' role sees it (no superuser; owns the tables)."""
    if os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("the daemons' role exists in the private test cluster only")
    url = as_role(db_url, localdb.APP_ROLE)
    assert sql(
        url, "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user"
    ) == [(localdb.APP_ROLE, False)]
    return url


def as_role(url: str, role: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{role}@{rest.rpartition('@')[2]}"


def sql(url: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def states(url: str) -> dict[str, int]:
    out = {"received": 0, "processing": 0, "done": 0}
    out.update(
        {str(s): int(n) for s, n in sql(url, "SELECT state::text, count(*) FROM tasks GROUP BY 1")}
    )  # type: ignore[call-overload]
    return out
