"""What every tier shares: the fixtures (written once, in the modules named by
pytest_plugins, psycopg-style), the repository's paths, `need` for a missing tool, and
SQL helpers."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daemons.bench.ports import free_port as free_port  # re-exported for the tests

pytest_plugins = ("tests.fix_db", "tests.fix_bundle")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    """Skip for a missing tool locally; under CI=true that is a failure instead."""
    if not condition:
        if CI:
            pytest.fail(f"CI=true and a test prerequisite is missing: {reason}")
        pytest.skip(reason)


def sql(url: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def explain_analyze(url: str, query: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    """The top node of `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` of `query`, run in a
    transaction that is rolled back (so an UPDATE changes nothing)."""
    with psycopg.connect(url) as conn:
        cur = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}", params)  # type: ignore[arg-type]
        plan = cur.fetchone()[0]  # type: ignore[index]
        conn.rollback()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return plan[0]["Plan"]  # type: ignore[no-any-return]


def states(url: str) -> dict[str, int]:
    out = {"received": 0, "processing": 0, "done": 0}
    out.update(
        {str(s): int(n) for s, n in sql(url, "SELECT state::text, count(*) FROM tasks GROUP BY 1")}
    )  # type: ignore[call-overload]
    return out


LOG_TAIL_LINES = 40


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that ran a bundle in `tmp_path` reports the tail of every log the
    bundle wrote (supervisord's, each daemon's, PostgreSQL's), so a hang seen once in a
    full run can be read from the report instead of reproduced."""
    report = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp, Path) and tmp.exists():
        for path in sorted(tmp.glob("**/var/log/*.log")):
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"tail of {path.relative_to(tmp)}", "\n".join(lines)))
    return report
