"""Database fixtures, thin wrappers over daemons.bench.cluster (the code the bench and
the chaos suite run): a real PostgreSQL for the whole session (a throwaway private
cluster, or TEST_DATABASE_URL), and a fresh database per test cloned from a migrated
template."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from daemons import localdb
from daemons.bench.cluster import (
    PrivatePostgres,
    create_database,
    drop_database,
    migrate,
    with_database,
)
from tests.conftest import need, sql

TEMPLATE = "tasks_template"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of the maintenance database (`postgres`) of a server for this session."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield with_database(os.environ["TEST_DATABASE_URL"], "postgres")
        return
    pg = PrivatePostgres.start_new("tasks-test-pg-")
    try:
        yield pg.admin_url
    finally:
        pg.close()


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> str:
    url = create_database(pg_server, TEMPLATE, migrated=False)
    # In the private cluster the daemons' role (no superuser) owns the tables, as in a
    # real install; on TEST_DATABASE_URL the tables belong to whoever migrates.
    migrate(url, app_role=None if os.environ.get("TEST_DATABASE_URL") else localdb.APP_ROLE)
    return url


@pytest.fixture
def db_url(pg_server: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield create_database(pg_server, name, template=TEMPLATE)
    drop_database(pg_server, name)


@pytest.fixture
def app_db_url(db_url: str) -> str:
    """The same database as the daemons' role sees it (no superuser; owns the tables)."""
    # A skip locally; under CI=true (which never sets TEST_DATABASE_URL) a failure.
    need(
        not os.environ.get("TEST_DATABASE_URL"),
        "the daemons' role exists in the private test cluster only",
    )
    url = as_role(db_url, localdb.APP_ROLE)
    assert sql(
        url, "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user"
    ) == [(localdb.APP_ROLE, False)]
    return url


def as_role(url: str, role: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{role}@{rest.rpartition('@')[2]}"
