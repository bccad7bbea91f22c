"""The daemons' role (issue 16): owns what the daemons touch, and nothing more than an
ordinary role may do: no COPY ... TO PROGRAM, no CREATE ROLE, no superuser."""

from __future__ import annotations

import psycopg
import pytest

from daemons import localdb
from tests.conftest import sql


def test_the_daemons_role_owns_the_schema_but_not_the_migrators_bookkeeping(
    app_db_url: str,
) -> None:
    owners = dict(
        sql(
            app_db_url,
            "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text FROM pg_class c"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'S')",
        )
    )
    mine = {name for name, owner in owners.items() if owner == localdb.APP_ROLE}
    assert {"tasks", "tasks_unfinished", "tasks_done", "task_counts", "task_totals"} <= mine
    assert {n for n in owners if n.startswith("tasks_done_")} <= mine  # partitions too
    assert owners["_yoyo_migration"] == localdb.OWNER_ROLE


@pytest.mark.parametrize(
    "statement",
    [
        "COPY (SELECT 1) TO PROGRAM 'true'",
        "COPY tasks FROM PROGRAM 'true'",
        "CREATE ROLE intruder LOGIN",
        "ALTER ROLE tasks SUPERUSER",
        "SELECT pg_read_file('/etc/passwd')",
        "DELETE FROM _yoyo_migration",
    ],
)
def test_the_daemons_role_cannot(statement: str, app_db_url: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sql(app_db_url, statement)
