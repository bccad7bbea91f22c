"""The migrator: yoyo-migrations over `schema/migrations`.

migrator up          apply every pending migration
migrator up --one    apply the next one only        (make migrate)
migrator down        roll back the latest one        (make drop)
migrator status      list applied and pending
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from yoyo import get_backend, read_migrations

from daemons import logs, schema_dir
from daemons.errors import DaemonError
from daemons.settings import _Common, load, mask
from daemons.store import count_stored_tasks, single_host_url, wait_for_database

log = logging.getLogger("daemons.migrator")


class MigratorSettings(_Common):
    pass


def _backend(dsn: str) -> Any:
    # yoyo picks its driver from the URL scheme: psycopg 3 is "postgresql+psycopg".
    _scheme, rest = single_host_url(dsn).split("://", 1)
    return get_backend(f"postgresql+psycopg://{rest}")


LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout
# Rolling these back deletes tasks: only with --drop-tasks while any are stored.
DESTRUCTIVE = {"0001_create_tasks"}


def _stored_tasks(dsn: str) -> int:
    return asyncio.run(count_stored_tasks(dsn))


RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0


def _sqlstate(exc: BaseException | None) -> str | None:
    while exc is not None:
        state = getattr(exc, "sqlstate", None)
        if state:
            return str(state)
        exc = exc.__cause__ or exc.__context__
    return None


def _retry_on_lock(step: Callable[[], object], migration: str, wait_s: float) -> None:
    """Run one migration step; if it gave up waiting for a lock (its own lock_timeout:
    something holds the table, e.g. a long transaction), let the pipeline flow a moment
    and try again, until `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    delay = RETRY_FIRST_S
    tries = 1
    while True:
        try:
            step()
            return
        except Exception as exc:
            if _sqlstate(exc) != LOCK_NOT_AVAILABLE or time.monotonic() + delay > deadline:
                raise
            if tries == 1:
                log.warning(
                    "migration_waiting_for_lock",
                    extra=logs.fields(id=migration, error=str(exc).strip().splitlines()[0]),
                )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, RETRY_MAX_S)
            tries += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migrator", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wait this long for the database to accept connections (default 60)",
    )
    common.add_argument(
        "--lock-wait",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="keep retrying a migration that times out waiting for a table lock this long"
        " (default 300); each try waits at most its own lock_timeout",
    )
    up = sub.add_parser("up", parents=[common], help="apply pending migrations")
    up.add_argument("--one", action="store_true", help="apply only the next migration")
    down = sub.add_parser("down", parents=[common], help="roll back the latest applied migration")
    down.add_argument(
        "--drop-tasks",
        action="store_true",
        help="allow rolling back 0001, which deletes the tasks table and every task in it",
    )
    sub.add_parser("status", parents=[common], help="list applied and pending migrations")
    args = parser.parse_args(argv)
    try:
        settings = load(MigratorSettings)
    except DaemonError as exc:
        print(f"migrator: {exc}", file=sys.stderr)
        return exc.exit_code
    logs.configure("migrator", settings.log_level, settings.log_format)
    dsn = settings.dsn()
    try:
        asyncio.run(wait_for_database(dsn, args.wait, require_schema=False))
    except DaemonError as exc:
        print(f"migrator: {exc}", file=sys.stderr)
        return exc.exit_code
    backend = _backend(dsn)
    migrations = read_migrations(str(schema_dir() / "migrations"))
    with backend.lock():
        if args.cmd == "status":
            for m in migrations:
                state = "applied" if backend.is_applied(m) else "pending"
                print(f"{state:8} {m.id}")
            return 0
        if args.cmd == "up":
            todo = backend.to_apply(migrations)
            if args.one:
                todo = todo[:1]
            for i, m in enumerate(todo):
                one = todo[i : i + 1]  # a MigrationList, as yoyo wants
                _retry_on_lock(partial(backend.apply_migrations, one), m.id, args.lock_wait)
                log.info("migration_applied", extra=logs.fields(id=m.id, db=mask("URL", dsn)))
            if not todo:
                log.info("migrations_up_to_date")
            return 0
        todo = backend.to_rollback(migrations)[:1]
        for m in todo:
            if m.id in DESTRUCTIVE and not args.drop_tasks:
                stored = _stored_tasks(dsn)
                if stored:
                    print(
                        f"migrator: rolling back {m.id} would delete the tasks table and its"
                        f" {stored:,} tasks; nothing was changed. Pass --drop-tasks to do it"
                        " (make drop ARGS=--drop-tasks).",
                        file=sys.stderr,
                    )
                    return 2
            _retry_on_lock(partial(backend.rollback_migrations, todo), m.id, args.lock_wait)
        for m in todo:
            log.info("migration_rolled_back", extra=logs.fields(id=m.id))
        if not todo:
            log.info("nothing_to_roll_back")
        return 0
