"""No one-word data loss (issue 16): `make drop` rolls back one migration at a time and
refuses the one that creates `tasks` unless FORCE=1, saying what it would delete."""

from __future__ import annotations

import subprocess
from pathlib import Path

from daemons.bench.cluster import clean_env
from tests.conftest import ROOT, sql, states


def make_drop(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "drop", *args],
        env=clean_env(DATABASE_URL=url, MAKEFLAGS=""),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_drop_refuses_to_delete_the_tasks_without_force(db_url: str, tmp_path: Path) -> None:
    sql(
        db_url,
        "INSERT INTO tasks (type, value, creation_time, last_update_time)"
        " SELECT 1, 2, 0, 0 FROM generate_series(1, 3)",
    )
    # Every migration after 0001 rolls back and keeps the tasks, one `make drop` each
    # (however many there are: 0003 and 0002 as of this writing)...
    for _ in range(20):
        out = make_drop(db_url)
        if out.returncode != 0:
            break
        assert "migration_rolled_back" in out.stderr, out.stdout + out.stderr
        assert states(db_url)["received"] == 3
    else:
        raise AssertionError("make drop never refused")
    # ... then 0001 is refused, and again: nothing changed.
    for _ in range(2):
        refused = make_drop(db_url)
        assert refused.returncode != 0
        assert "0001_create_tasks" in refused.stderr and "3 stored tasks" in refused.stderr
        assert "make drop FORCE=1" in refused.stderr
        assert states(db_url)["received"] == 3
    out = make_drop(db_url, "FORCE=1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sql(db_url, "SELECT to_regclass('tasks')") == [(None,)]
