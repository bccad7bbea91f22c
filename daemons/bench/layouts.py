"""Table layouts compared: tasks/s and PostgreSQL CPU per 1,000 tasks for the pipeline's
three writes (insert, -> processing, -> done), one process, batches of 1,000, on an
empty history and again after `--history` done rows. The figures behind the layout
migration 0002 chose (README, "Long life").

    python -m daemons.bench.layouts [--seconds 15] [--history 10000000]

It starts a private PostgreSQL (the embedded one) in a temporary directory and builds
each layout in a database of its own: the migrations for 0001 and 0002, and a plain
table (no secondary index, no trigger) as the yardstick.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from daemons.bench.cluster import PrivatePostgres
from daemons.bench.cpu import tree_cpu

BATCH = 1000
VACUUM_EVERY_S = 2.0  # what the maintenance loop does to tasks_unfinished

INSERT = """INSERT INTO tasks (type, value, state, creation_time, last_update_time)
SELECT u.type, u.value, 'received', u.creation_time, %(now)s
FROM unnest(%(types)s::smallint[], %(values)s::smallint[], %(times)s::float8[])
     AS u(type, value, creation_time)
RETURNING id"""
TO_PROCESSING = """UPDATE tasks AS t SET state = 'processing', last_update_time = %(now)s
FROM unnest(%(ids)s::bigint[]) AS u(id) WHERE t.id = u.id AND t.state = 'received'
RETURNING t.id"""
TO_DONE = """UPDATE tasks AS t SET state = 'done', last_update_time = %(now)s
FROM unnest(%(ids)s::bigint[]) AS u(id) WHERE t.id = u.id AND t.state = 'processing'
RETURNING t.id"""
PLAIN = """CREATE TYPE task_state AS ENUM ('received', 'processing', 'done');
CREATE TABLE tasks (id bigserial PRIMARY KEY, type smallint NOT NULL,
    value smallint NOT NULL, state task_state NOT NULL,
    creation_time float8 NOT NULL, last_update_time float8 NOT NULL)"""


@dataclass
class Layout:
    name: str
    setup: Callable[[psycopg.Connection[Any], str], None]
    vacuum: bool = False


def _migrate(url: str, *args: str) -> None:
    migrator = Path(sys.executable).parent / "migrator"
    env = {**os.environ, "DATABASE_URL": url}
    subprocess.run([str(migrator), "up", *args], env=env, check=True, capture_output=True)


def _plain(conn: psycopg.Connection[Any], url: str) -> None:
    conn.execute(PLAIN)


def _with_stamp_index(conn: psycopg.Connection[Any], url: str) -> None:
    _migrate(url)
    conn.execute("CREATE INDEX ON tasks_unfinished (state, last_update_time)")


LAYOUTS = [
    Layout("plain table, no index, no trigger (yardstick)", _plain),
    Layout("0001: one table, partial (state, stamp) index", lambda c, u: _migrate(u, "--one")),
    Layout("by state, + (state, stamp) index, vacuum 2 s", _with_stamp_index, vacuum=True),
    Layout("by state, primary key only, no vacuum", lambda c, u: _migrate(u)),
    Layout("by state, primary key only, vacuum 2 s (0002)", lambda c, u: _migrate(u), True),
]


def _array(items: list[Any]) -> str:
    return "{" + ",".join(map(str, items)) + "}"


def measure(
    conn: psycopg.Connection[Any], seconds: float, pg_pid: int, vacuum: bool
) -> tuple[float, float]:
    def batch() -> int:
        now = time.time()
        params = {
            "types": _array([random.randrange(10) for _ in range(BATCH)]),
            "values": _array([random.randrange(100) for _ in range(BATCH)]),
            "times": _array([now] * BATCH),
            "now": now,
        }
        ids = _array([r[0] for r in conn.execute(INSERT, params).fetchall()])
        conn.execute(TO_PROCESSING, {"ids": ids, "now": time.time()}).fetchall()
        return len(conn.execute(TO_DONE, {"ids": ids, "now": time.time()}).fetchall())

    for _ in range(5):
        batch()
    cpu0, t0 = tree_cpu(pg_pid), time.monotonic()
    done, vacuumed = 0, t0
    while time.monotonic() - t0 < seconds:
        done += batch()
        if vacuum and time.monotonic() - vacuumed > VACUUM_EVERY_S:
            conn.execute("VACUUM tasks_unfinished")
            vacuumed = time.monotonic()
    elapsed = time.monotonic() - t0
    return done / elapsed, (tree_cpu(pg_pid) - cpu0) / (done / 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemons.bench.layouts")
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--history", type=int, default=10_000_000, help="done rows added")
    parser.add_argument(
        "--only", default="", help="comma-separated layout numbers (0-based) to run, e.g. 0,4"
    )
    args = parser.parse_args(argv)
    pg = PrivatePostgres.start_new("tasks-layouts-")
    try:
        print(f"{'layout':48} {'tasks/s':>9} {'+history':>9} {'pg s/1k':>8} {'+history':>9}")
        with psycopg.connect(pg.admin_url, autocommit=True) as admin:
            only = {int(x) for x in args.only.split(",") if x.strip()}
            for i, layout in enumerate(LAYOUTS):
                if only and i not in only:
                    continue
                db = f"layout_{i}"
                admin.execute(f"CREATE DATABASE {db}")
                url = pg.url(db)
                with psycopg.connect(url, autocommit=True) as conn:
                    layout.setup(conn, url)
                    empty = measure(conn, args.seconds, pg.pid, layout.vacuum)
                    old = time.time() - 3600
                    conn.execute(
                        "INSERT INTO tasks (type, value, state, creation_time, last_update_time)"
                        f" SELECT g % 10, g % 100, 'done', {old}, {old}"
                        f" FROM generate_series(1, {int(args.history)}) g"
                    )
                    conn.execute("VACUUM ANALYZE")
                    full = measure(conn, args.seconds, pg.pid, layout.vacuum)
                print(
                    f"{layout.name:48} {empty[0]:9,.0f} {full[0]:9,.0f}"
                    f" {empty[1]:8.4f} {full[1]:9.4f}",
                    flush=True,
                )
                admin.execute(f"DROP DATABASE {db}")
    finally:
        pg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
