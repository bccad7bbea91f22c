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
import sys
from typing import Any

from yoyo import get_backend, read_migrations

from daemons import logs, schema_dir
from daemons.errors import DaemonError
from daemons.settings import _Common, load, mask
from daemons.store import wait_for_database

log = logging.getLogger("daemons.migrator")


class MigratorSettings(_Common):
    pass


def _backend(dsn: str) -> Any:
    # yoyo picks its driver from the URL scheme: psycopg 3 is "postgresql+psycopg".
    _scheme, rest = dsn.split("://", 1)
    return get_backend(f"postgresql+psycopg://{rest}")


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
    up = sub.add_parser("up", parents=[common], help="apply pending migrations")
    up.add_argument("--one", action="store_true", help="apply only the next migration")
    sub.add_parser("down", parents=[common], help="roll back the latest applied migration")
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
            backend.apply_migrations(todo)
            for m in todo:
                log.info("migration_applied", extra=logs.fields(id=m.id, db=mask("URL", dsn)))
            if not todo:
                log.info("migrations_up_to_date")
            return 0
        todo = backend.to_rollback(migrations)[:1]
        backend.rollback_migrations(todo)
        for m in todo:
            log.info("migration_rolled_back", extra=logs.fields(id=m.id))
        if not todo:
            log.info("nothing_to_roll_back")
        return 0
