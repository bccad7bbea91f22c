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

from pydantic import AliasChoices, Field
from yoyo import get_backend, read_migrations

from daemons import localdb, logs, schema_dir
from daemons.errors import DaemonError
from daemons.settings import CommonSettings, load, mask, secrets_in
from daemons.store import count_stored_tasks, hand_over, single_host_url, wait_for_database

log = logging.getLogger("daemons.migrator")


class MigratorSettings(CommonSettings):
    """The migrator may connect as a more privileged role than the daemons (the owner
    of the database), and hands every object it makes to the daemons' role."""

    owner_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MIGRATOR_DATABASE_URL"),
        description="PostgreSQL URL the migrator uses (default: DATABASE_URL; unset"
        " too = the local database's superuser)",
    )
    app_role: str | None = Field(
        None,
        pattern=r"^[a-z_][a-z0-9_]*$",
        validation_alias=AliasChoices("MIGRATOR_APP_ROLE"),
        description="role the daemons connect as: it is made owner of the tables"
        " (default: the local database's `tasks`; with DATABASE_URL, none)",
    )

    def dsn(self) -> str:
        return self.owner_url or self.database_url or localdb.owner_url()

    def role_to_own(self) -> str | None:
        if self.app_role:
            return self.app_role
        return None if self.owner_url or self.database_url else localdb.APP_ROLE


def _backend(dsn: str) -> Any:
    # yoyo picks its driver from the URL scheme: psycopg 3 is "postgresql+psycopg".
    _scheme, rest = single_host_url(dsn).split("://", 1)
    return get_backend(f"postgresql+psycopg://{rest}")


LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout
# Rolling these back deletes every task: only with --drop-tasks (make drop FORCE=1).
DESTRUCTIVE = {"0001_create_tasks"}


def refusal(migration: str, stored: int, where: str) -> str:
    """Why `make drop` did nothing: what rolling back `migration` would delete, and how
    to do it anyway. Always refused, even with no task stored: the table goes too."""
    return (
        f"migrator: rolling back {migration} would drop the tasks table with its"
        f" {stored:,} stored tasks, the per-state counts and the lifetime totals, in"
        f" {where}; nothing was changed. To do it: make drop FORCE=1"
        " (migrator down --drop-tasks)."
    )


def _hand_over(dsn: str, role: str | None) -> None:
    if role:
        moved = asyncio.run(hand_over(dsn, role))
        if moved:
            log.info("schema_handed_over", extra=logs.fields(role=role, objects=moved))


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
        help="allow rolling back 0001, which deletes the tasks table and every task in it"
        " (make drop FORCE=1)",
    )
    sub.add_parser("status", parents=[common], help="list applied and pending migrations")
    args = parser.parse_args(argv)
    try:
        settings = load(MigratorSettings)
    except DaemonError as exc:
        print(f"migrator: {exc}", file=sys.stderr)
        return exc.exit_code
    dsn = settings.dsn()
    logs.redact(*secrets_in(dsn))
    logs.configure("migrator", settings.log_level, settings.log_format)
    try:
        asyncio.run(wait_for_database(dsn, args.wait, require_schema=False))
    except DaemonError as exc:
        print(f"migrator: {logs.scrub(str(exc))}", file=sys.stderr)
        return exc.exit_code
    try:
        return _run(args, dsn, settings.role_to_own())
    except Exception:  # logged with passwords redacted, not a raw traceback
        log.exception("migrator_failed")
        return 1


def _run(args: argparse.Namespace, dsn: str, app_role: str | None) -> int:
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
            _hand_over(dsn, app_role)
            return 0
        todo = backend.to_rollback(migrations)[:1]
        for m in todo:
            if m.id in DESTRUCTIVE and not args.drop_tasks:
                print(refusal(m.id, _stored_tasks(dsn), mask("URL", dsn)), file=sys.stderr)
                return 2
            _retry_on_lock(partial(backend.rollback_migrations, todo), m.id, args.lock_wait)
        for m in todo:
            log.info("migration_rolled_back", extra=logs.fields(id=m.id))
        if not todo:
            log.info("nothing_to_roll_back")
        _hand_over(dsn, app_role)
        return 0
