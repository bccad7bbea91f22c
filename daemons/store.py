"""The one module that talks to PostgreSQL: a connection pool and the domain operations,
each working on whole batches (one statement per batch per transition).

SQL lives in `schema/queries.sql` as named blocks, loaded once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, LiteralString, Protocol
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from daemons import schema_dir
from daemons.errors import DatabaseUnavailable, SettingsError
from daemons.logs import fields

log = logging.getLogger(__name__)


class NoReply(psycopg.OperationalError):
    """A statement got no answer within its deadline: the network (or the server) went
    silent. The connection is dropped and the pool's idle ones replaced."""


# Errors that mean "the database is away for now", as opposed to a bug in a query.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    # Includes AdminShutdown (pg_terminate_backend, restarts), QueryCanceled (statement
    # timeout), LockNotAvailable (lock timeout), DiskFull, and NoReply.
    psycopg.OperationalError,
    psycopg.InterfaceError,  # a connection that died under us
    PoolTimeout,  # no connection could be had in time (outage, exhaustion)
    # A standby not yet promoted, or a database set read-only by an operator: wait for
    # a primary (with target_session_attrs=read-write, a reconnect finds it).
    psycopg.errors.ReadOnlySqlTransaction,
)
# Errors after which the pool's connections are not worth keeping: a read-only session
# stays read-only, and connections that went silent all went silent together.
RECONNECT_ERRORS = (psycopg.errors.ReadOnlySqlTransaction, NoReply)
# Errors a smaller or later statement may avoid: the done writer splits its batch.
TIMEOUT_ERRORS = (psycopg.errors.QueryCanceled, NoReply)
RECONNECT_EVERY_S = 1.0  # the pool is emptied at most this often

# libpq parameters every connection gets unless the URL sets them itself, so a peer that
# vanished is noticed in seconds: the kernel's defaults wait two hours before the first
# keepalive, and about fifteen minutes of retransmissions before giving up on a write.
TCP_PARAMS = {
    "connect_timeout": "5",  # per host: a multi-host URL moves on to the next one
    "keepalives": "1",
    "keepalives_idle": "10",  # s idle before the first probe ...
    "keepalives_interval": "3",  # ... then a probe every 3 s ...
    "keepalives_count": "3",  # ... and the connection is dead after 3 unanswered
    "tcp_user_timeout": "20000",  # ms sent data may stay unacknowledged
}
# A reply later than statement_timeout plus this is not coming (the server would have
# cancelled the statement and said so): the connection is dropped. Covers what TCP
# cannot see, a peer whose kernel acknowledges and then forwards nothing (a proxy, a
# hung server).
REPLY_GRACE_S = 5.0

POOL_WAIT_S = 5.0  # a caller waits this long for a connection before a transient error
QUIET_WAIT_S = 10.0  # waiting for the database this long at start-up is normal
# A row moved to another partition (done) while a statement waited on it fails that
# statement with a serialization error instead of skipping the row; the transitions are
# conditional, so running the statement again is safe and gives the usual outcome.
MOVED_ROW_RETRIES = 5
MAINTENANCE_STATEMENT_TIMEOUT_S = 30  # DETACH ... CONCURRENTLY waits for old snapshots
# A maintenance pass runs a handful of statements; past this it is dropped as silent.
MAINTENANCE_PASS_DEADLINE_S = 4 * (MAINTENANCE_STATEMENT_TIMEOUT_S + REPLY_GRACE_S)
DEFAULT_PARTITION_S = 3600.0  # done partitions made on demand before maintenance ran
# Counting a detached partition before its drop reads every row, the one part of removal
# that costs per row: it is done a slice of pages at a time on one core, with a pause as
# long as the slice took (at most COUNT_PAUSE_MAX_S), so the pipeline keeps a core. As
# one parallel count(*) it took both cores for 0.33 s per 1.9 M-row partition, a p99
# spike of 200 ms in every minute of a soak.
COUNT_SLICE_PAGES = 2048  # 16 MB of heap per statement
COUNT_PAUSE_MAX_S = 0.05

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    """Parse `queries.sql` into {name: sql}. Comment lines inside a block are dropped."""
    text = (schema_dir() / "queries.sql").read_text()
    parts = _NAME.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = "\n".join(
            line
            for line in body.splitlines()
            if line.strip() and not line.lstrip().startswith("--")
        ).strip()
        if name in out:
            raise ValueError(f"queries.sql: query {name!r} defined twice")
        out[name] = sql
    return out


def q(name: str) -> LiteralString:
    # The text comes from our own file, never from input: safe to treat as a literal.
    return queries()[name]


async def wait_for_database(dsn: str, timeout_s: float, *, require_schema: bool) -> None:
    """Wait, with capped backoff, until the database accepts connections (and has the
    `tasks` table when `require_schema`): a database that is still starting, or not yet
    migrated, is not a crash. Raises DatabaseUnavailable with the last reason."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    logged = ""
    warned = False
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=5, autocommit=True)
            try:
                # Every relation and column the daemons' queries need (0004: attempt),
                # and this role's right to write them: the migrator hands the tables to
                # the daemons' role as its last step, so a daemon started next to it
                # (make run) waits for that instead of failing its first query.
                cur = await conn.execute(
                    "SELECT to_regclass('tasks') IS NOT NULL"
                    " AND to_regclass('task_counts') IS NOT NULL"
                    " AND to_regclass('task_totals') IS NOT NULL"
                    " AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('tasks')"
                    "             AND attname = 'attempt' AND NOT attisdropped),"
                    " CASE WHEN to_regclass('task_totals') IS NULL THEN false ELSE"
                    "  has_table_privilege('tasks', 'SELECT, INSERT, UPDATE')"
                    "  AND has_table_privilege('task_counts', 'SELECT, UPDATE')"
                    "  AND has_table_privilege('task_totals', 'SELECT, UPDATE') END"
                )
                row = await cur.fetchone()
            finally:
                await conn.close()
            if not require_schema or (row and row[0] and row[1]):
                if logged:
                    log.info("database_ready")
                return
            reason = (
                "schema older than this daemon (tables `tasks`/`task_counts`/"
                "`task_totals` or column `tasks.attempt` missing): run `migrator up` "
                "(make migrate); a database made by an early 0001 without task_counts "
                "must be recreated"
                if not (row and row[0])
                else "this role may not write the tables yet: the migrator hands them over"
                " when it ends (make migrate; MIGRATOR_APP_ROLE)"
            )
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        except psycopg.ProgrammingError as exc:  # libpq cannot parse it: waiting won't help
            raise SettingsError(f"invalid DATABASE_URL: {exc}") from None
        if time.monotonic() + delay > deadline:
            raise DatabaseUnavailable(f"database not ready after {timeout_s:.0f}s: {reason}")
        # A database still starting (make run starts its own next to the daemons) is
        # normal for a few seconds: INFO then, one WARNING once it takes longer.
        waited = round(timeout_s - (deadline - time.monotonic()), 1)
        slow = waited >= QUIET_WAIT_S
        if reason != logged or (slow and not warned):
            level = logging.WARNING if slow else logging.INFO
            log.log(level, "database_waiting", extra=fields(reason=reason, waited_s=waited))
            logged, warned = reason, warned or slow
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def count_stored_tasks(dsn: str) -> int:
    """Rows in `tasks` (0 when there is no such table): what a destructive rollback
    would delete."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT to_regclass('tasks') IS NOT NULL")
        row = await cur.fetchone()
        if not (row and row[0]):
            return 0
        cur = await conn.execute("SELECT count(*) FROM tasks")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


# The migrator's own bookkeeping stays with the migrator's role.
_YOYO_TABLES = ("_yoyo_log", "_yoyo_migration", "_yoyo_version", "yoyo_lock")
_OWNED = {
    # Relations the application role must own (partitions included: attaching,
    # detaching, dropping and vacuuming them are owner rights). Sequences linked to a
    # table follow their table.
    "TABLE": """SELECT c.oid::regclass::text FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v')
          AND c.relowner <> %(role)s::regrole AND NOT c.relname = ANY(%(skip)s)""",
    "SEQUENCE": """SELECT c.oid::regclass::text FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'
          AND c.relowner <> %(role)s::regrole AND NOT EXISTS (SELECT FROM pg_depend d
            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
              AND d.deptype IN ('a', 'i'))""",
    "TYPE": """SELECT t.oid::regtype::text FROM pg_type t
        WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd', 'r')
          AND t.typowner <> %(role)s::regrole""",
    "ROUTINE": """SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace AND p.proowner <> %(role)s::regrole""",
}


async def hand_over(dsn: str, role: str) -> int:
    """Make `role` (the daemons') own every table, partition, sequence, type and
    function of the schema, and create in it (maintenance makes partitions), so the
    daemons need no superuser; the migrator keeps only its own bookkeeping. Idempotent,
    and converts a database migrated before the roles were split. Returns the number
    of objects handed over."""
    moved = 0
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        ident = sql.Identifier(role)
        await conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(ident))
        for kind, query in _OWNED.items():
            cur = await conn.execute(query, {"role": role, "skip": list(_YOYO_TABLES)})
            for (name,) in await cur.fetchall():
                # Names come from the catalogue, already quoted by the reg* casts.
                stmt = sql.SQL("ALTER {} {} OWNER TO {}").format(
                    sql.SQL(kind), sql.SQL(name), ident
                )
                await conn.execute(stmt)
                moved += 1
    return moved


def session_conninfo(dsn: str, statement_timeout_s: float, lock_timeout_s: float) -> str:
    """`dsn` with the TCP parameters it lacks and the daemons' session timeouts (as
    `options`, applied at connection start with no extra round trip; options already in
    the URL come after ours, so they win). Any libpq URL works, several hosts included."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:  # libpq cannot parse it: a setting, not an outage
        raise SettingsError(f"invalid DATABASE_URL: {exc}") from None
    extra: dict[str, Any] = {k: v for k, v in TCP_PARAMS.items() if k not in given}
    # A session whose client went silent inside a transaction would hold its locks until
    # the server's own keepalives noticed; this ends it once no reply can be awaited.
    idle_s = statement_timeout_s + REPLY_GRACE_S
    # Custom plans only: psycopg prepares a statement on its fifth use, and PostgreSQL's
    # generic plan for the batch updates cannot see the array's length. After a vacuum of
    # the hot partition counts few live rows (inserts in flight are not counted), that
    # plan became a nested loop over batch x partition: 1,000 ids took 0.3-1 s, not 10 ms.
    ours = (
        f"-c statement_timeout={round(statement_timeout_s * 1000)}"
        f" -c lock_timeout={round(lock_timeout_s * 1000)}"
        f" -c idle_in_transaction_session_timeout={round(idle_s * 1000)}"
        " -c plan_cache_mode=force_custom_plan"
    )
    extra["options"] = f"{ours} {given['options']}" if given.get("options") else ours
    return make_conninfo(dsn, **extra)


def single_host_url(dsn: str) -> str:
    """`dsn` for tools that parse URLs themselves and take one host (yoyo): a URL naming
    several (a primary and its standbys, target_session_attrs=read-write) becomes one
    naming the host libpq connects to now, with the same user, password, database and
    other parameters."""
    params = conninfo_to_dict(dsn)
    if "," not in str(params.get("host", "")):
        return dsn
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        host, port = conn.info.host, conn.info.port
    user = quote(str(params.pop("user", "")), safe="")
    password = params.pop("password", None)
    auth = f"{user}:{quote(str(password), safe='')}@" if password else f"{user}@" if user else ""
    dbname = quote(str(params.pop("dbname", "")), safe="")
    rest = {k: v for k, v in params.items() if k not in ("host", "port", "hostaddr")}
    query = f"?{urlencode(rest)}" if rest else ""
    return f"postgresql://{auth}{host}:{port}/{dbname}{query}"


def pg_array(items: Iterable[int | float]) -> str:
    """A numeric array as PostgreSQL's text literal, cast in SQL (`%(ids)s::bigint[]`):
    joining in C is several times cheaper than adapting a list element by element,
    which dominated the producer's profile."""
    return "{" + ",".join(map(str, items)) + "}"


def _no_partition(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.errors.CheckViolation) and "no partition" in str(exc)


@dataclass(slots=True)
class Partition:
    name: str
    lower: int  # unix seconds; 0 = everything before (MINVALUE)
    upper: int
    detach_pending: bool = False


@dataclass
class MaintenanceReport:
    created: int = 0
    dropped: list[str] = field(default_factory=list)
    dropped_rows: int = 0
    partitions: list[Partition] = field(default_factory=list)
    db_now: float = 0.0
    maintainer: bool = False


@dataclass(slots=True)
class TaskRow:
    id: int
    type: int
    value: int
    creation_time: float
    # The claim this row was read under (0: never claimed): moves out of `processing`
    # succeed only for the current one, so a stale owner changes nothing.
    attempt: int = 0


def _claims(rows: Sequence[TaskRow]) -> dict[str, str]:
    return {"ids": pg_array([r.id for r in rows]), "attempts": pg_array([r.attempt for r in rows])}


class TaskStore(Protocol):
    """The domain operations the engines call: the seam between their logic and
    PostgreSQL. `Store` below is the real one; `daemons.testing.InMemoryStore` is a fake
    held to the same outcomes by contract tests (tests/integration/test_store_contract.py).

    Every transition is conditional: ids not in the expected state are left alone and
    left out of the result, so a duplicate or late delivery wins nothing."""

    async def insert_batch(
        self,
        types: Sequence[int],
        values: Sequence[int],
        creation_times: Sequence[float],
        *,
        state: str = "received",
    ) -> list[TaskRow]: ...

    async def register_keyed(
        self,
        keys: Sequence[str],
        types: Sequence[int],
        values: Sequence[int],
        creation_times: Sequence[float],
    ) -> list[TaskRow | None]: ...

    async def reserve_ids(self, n: int) -> list[int]: ...

    async def insert_reserved(
        self, rows: Sequence[TaskRow], *, retried: bool = False, state: str = "received"
    ) -> bool: ...

    async def mark_processing(self, ids: Sequence[int]) -> list[TaskRow]: ...

    async def mark_done(self, rows: Sequence[TaskRow], *, retried: bool = False) -> list[int]: ...

    async def release_processing(self, rows: Sequence[TaskRow]) -> list[int]: ...

    async def ping(self) -> None: ...

    async def existing_ids(self, ids: Sequence[int]) -> set[int]: ...

    async def count_unfinished(self) -> int: ...

    async def count_by_state(self) -> dict[str, int]: ...

    async def done_totals_by_type(self) -> dict[int, tuple[int, int]]: ...

    async def reclaim_expired(self, lease_s: float, limit: int) -> list[TaskRow]: ...

    async def claim_stale_received(self, age_s: float, limit: int) -> list[TaskRow]: ...


class Store:
    """Pool plus domain operations. The constructor does no I/O; `open()` waits for the
    database with backoff and raises DatabaseUnavailable with the reason after
    `connect_timeout` seconds."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        name: str = "daemons",
        statement_timeout_s: float = 10.0,
        lock_timeout_s: float = 2.0,
    ) -> None:
        self.dsn = session_conninfo(dsn, statement_timeout_s, lock_timeout_s)
        self.reply_deadline_s = statement_timeout_s + REPLY_GRACE_S
        self._reconnected_at = -RECONNECT_EVERY_S
        # Width of done partitions made on demand (maintenance sets the configured one).
        self.partition_s = DEFAULT_PARTITION_S
        self.pool = AsyncConnectionPool(
            self.dsn,
            min_size=min(2, pool_size),
            max_size=pool_size,
            open=False,
            name=name,
            timeout=POOL_WAIT_S,
            # Keep trying through long outages; the default gives up after 5 minutes.
            reconnect_timeout=24 * 3600,
            kwargs={"autocommit": True, "application_name": name},
            # No check on checkout: it costs a round trip per statement. A connection that
            # died meanwhile fails its statement with a transient error, which every
            # caller retries, and the pool replaces it.
        )

    async def open(self, connect_timeout: float = 60.0) -> None:
        deadline = time.monotonic() + connect_timeout
        await wait_for_database(self.dsn, connect_timeout, require_schema=True)
        await self.pool.open(wait=True, timeout=max(1.0, deadline - time.monotonic()))

    async def close(self, grace_s: float = 5.0) -> None:
        await self.pool.close(timeout=grace_s)

    def stats(self) -> dict[str, int]:
        return self.pool.get_stats()

    async def _reconnect(self) -> None:
        """Replace the pool's idle connections (those in use are replaced when they come
        back), at most once a second however many statements fail meanwhile."""
        now = time.monotonic()
        if now - self._reconnected_at >= RECONNECT_EVERY_S:
            self._reconnected_at = now
            await self.pool.drain()

    async def _rows(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        for attempt in range(MOVED_ROW_RETRIES):
            try:
                async with self.pool.connection() as conn:
                    try:
                        # On expiry psycopg asks the server to cancel, waits a little and
                        # closes the connection: the pool then replaces it.
                        async with asyncio.timeout(self.reply_deadline_s):
                            cur = await conn.execute(q(name), params)
                            return await cur.fetchall()
                    except TimeoutError:
                        raise NoReply(
                            f"{name}: no reply from the database in {self.reply_deadline_s:.0f} s"
                        ) from None
            except RECONNECT_ERRORS:
                await self._reconnect()
                raise
            except psycopg.errors.SerializationFailure:
                if attempt == MOVED_ROW_RETRIES - 1:
                    raise
            except psycopg.errors.CheckViolation as exc:
                if not _no_partition(exc) or attempt:
                    raise
                # A done time beyond the partitions made so far (maintenance not running
                # yet, or far behind): make them now, then write.
                log.info("partition_made_on_demand", extra=fields(query=name))
                await self.ensure_partitions(self.partition_s, self.partition_s)
        raise AssertionError("unreachable")

    # --- domain operations -------------------------------------------------------

    async def insert_batch(
        self,
        types: Sequence[int],
        values: Sequence[int],
        creation_times: Sequence[float],
        *,
        state: str = "received",
    ) -> list[TaskRow]:
        rows = await self._rows(
            "insert_batch",
            {
                "types": pg_array(types),
                "values": pg_array(values),
                "creation_times": pg_array(creation_times),
                "state": state,
            },
        )
        return [TaskRow(*r) for r in rows]

    async def register_keyed(
        self,
        keys: Sequence[str],
        types: Sequence[int],
        values: Sequence[int],
        creation_times: Sequence[float],
    ) -> list[TaskRow | None]:
        """Client tasks with idempotency keys, registered `processing`. One result per
        request, in order: the new task (attempt 1); the task an earlier call with that
        key made (attempt 0: this call claimed nothing); None if a concurrent call is
        registering the same key (try again)."""
        rows = await self._rows(
            "register_keyed",
            {
                "keys": list(keys),
                "types": pg_array(types),
                "values": pg_array(values),
                "creation_times": pg_array(creation_times),
            },
        )
        out: list[TaskRow | None] = [None] * len(keys)
        for n, *row in rows:
            out[n - 1] = TaskRow(*row)
        return out

    async def reserve_ids(self, n: int) -> list[int]:
        """n ids of the task sequence, for insert_reserved."""
        return [r[0] for r in await self._rows("reserve_ids", {"n": n})]

    async def insert_reserved(
        self, rows: Sequence[TaskRow], *, retried: bool = False, state: str = "received"
    ) -> bool:
        """Insert tasks under ids from reserve_ids, in one statement. `retried`: an
        earlier attempt failed with its outcome unknown (a lost reply may hide a commit),
        so insert only if none of the ids is stored. True if this call inserted them;
        False if they were already stored, by the earlier attempt."""
        params = {
            "ids": pg_array([r.id for r in rows]),
            "types": pg_array([r.type for r in rows]),
            "values": pg_array([r.value for r in rows]),
            "creation_times": pg_array([r.creation_time for r in rows]),
            "state": state,
        }
        try:
            out = await self._rows(
                "insert_reserved_retry" if retried else "insert_reserved", params
            )
        except psycopg.errors.UniqueViolation:
            if not retried:
                raise
            return False  # the earlier attempt's commit became visible meanwhile
        return bool(out)

    async def mark_processing(self, ids: Sequence[int]) -> list[TaskRow]:
        """Move `received` tasks to `processing`; returns the rows that won the transition."""
        rows = await self._rows("mark_processing", {"ids": pg_array(ids)})
        return [TaskRow(*r) for r in rows]

    async def mark_done(self, rows: Sequence[TaskRow], *, retried: bool = False) -> list[int]:
        """Move `processing` tasks to `done` under the attempt each row was claimed with;
        returns the ids this writer moved. `retried`: an earlier call with these rows
        failed with its outcome unknown, so the ids it may have moved count too."""
        out = await self._rows("mark_done_retry" if retried else "mark_done", _claims(rows))
        return [r[0] for r in out]

    async def release_processing(self, rows: Sequence[TaskRow]) -> list[int]:
        """Give `processing` tasks back to `received` (their attempt ends); only the
        current owner's release counts."""
        out = await self._rows("release_processing", _claims(rows))
        return [r[0] for r in out]

    async def ping(self) -> None:
        await self._rows("ping", {})

    async def existing_ids(self, ids: Sequence[int]) -> set[int]:
        rows = await self._rows("existing_ids", {"ids": pg_array(ids)})
        return {r[0] for r in rows}

    async def count_unfinished(self) -> int:
        rows = await self._rows("count_unfinished", {})
        return int(rows[0][0])

    async def count_by_state(self) -> dict[str, int]:
        """Tasks per state from the trigger-maintained counts: 16 shards, no scan."""
        rows = await self._rows("count_by_state", {})
        received, processing, done = rows[0]
        return {"received": int(received), "processing": int(processing), "done": int(done)}

    async def done_totals_by_type(self) -> dict[int, tuple[int, int]]:
        """{type: (count, value sum)} of every task ever done, from the rollup (160 rows,
        untouched by retention): seeds the running sums at start-up in constant time."""
        rows = await self._rows("done_totals_by_type", {})
        return {int(t): (int(n), int(s)) for t, n, s in rows}

    async def reclaim_expired(self, lease_s: float, limit: int) -> list[TaskRow]:
        rows = await self._rows("reclaim_expired", {"lease_s": lease_s, "limit": limit})
        return [TaskRow(*r) for r in rows]

    async def claim_stale_received(self, age_s: float, limit: int) -> list[TaskRow]:
        rows = await self._rows("claim_stale_received", {"age_s": age_s, "limit": limit})
        return [TaskRow(*r) for r in rows]

    # --- maintenance: partitions ahead, retention, vacuum --------------------------

    async def ensure_partitions(self, width_s: float, ahead_s: float) -> int:
        rows = await self._rows("ensure_partitions", {"width_s": width_s, "ahead_s": ahead_s})
        return int(rows[0][0])

    async def done_partitions(self) -> list[Partition]:
        return [Partition(*r) for r in await self._rows("done_partitions", {})]

    async def maintain(
        self, width_s: float, ahead_s: float, retention_s: float
    ) -> MaintenanceReport:
        """One maintenance pass, if no other daemon is running one (advisory lock):
        partitions ahead, then whole done partitions older than `retention_s` (0 = keep
        all) detached without blocking writers and dropped, then a vacuum of the hot
        table. Only done partitions are ever removed, so no unfinished task can be."""
        report = MaintenanceReport()
        try:
            async with asyncio.timeout(MAINTENANCE_PASS_DEADLINE_S):
                await self._maintain_pass(width_s, ahead_s, retention_s, report)
        except TimeoutError:
            raise NoReply(f"maintenance: no reply in {MAINTENANCE_PASS_DEADLINE_S:.0f} s") from None
        return report

    async def _maintain_pass(
        self, width_s: float, ahead_s: float, retention_s: float, report: MaintenanceReport
    ) -> None:
        async with self.pool.connection() as conn:
            got = await (await conn.execute(q("maintenance_lock"))).fetchone()
            if got and got[0]:
                report.maintainer = True
                try:
                    await conn.execute(
                        sql.SQL("SET statement_timeout = {}").format(
                            sql.Literal(f"{MAINTENANCE_STATEMENT_TIMEOUT_S}s")
                        )
                    )
                    await self._maintain(conn, width_s, ahead_s, retention_s, report)
                finally:
                    await conn.execute("RESET statement_timeout")
                    await conn.execute(q("maintenance_unlock"))
            now = await (await conn.execute(q("db_now"))).fetchone()
            report.db_now = float(now[0]) if now else time.time()
            cur = await conn.execute(q("done_partitions"))
            report.partitions = [Partition(*r) for r in await cur.fetchall()]

    async def _maintain(
        self,
        conn: psycopg.AsyncConnection[Any],
        width_s: float,
        ahead_s: float,
        retention_s: float,
        report: MaintenanceReport,
    ) -> None:
        cur = await conn.execute(q("ensure_partitions"), {"width_s": width_s, "ahead_s": ahead_s})
        made = await cur.fetchone()
        report.created = int(made[0]) if made else 0
        # A pass that stopped half-way left partitions detached but not dropped, or a
        # detach pending: finish those first.
        for (name,) in await (await conn.execute(q("detached_partitions"))).fetchall():
            await self._drop_detached(conn, name, report)
        now_row = await (await conn.execute(q("db_now"))).fetchone()
        now = float(now_row[0]) if now_row else time.time()
        cur = await conn.execute(q("done_partitions"))
        for part in [Partition(*r) for r in await cur.fetchall()]:
            expired = retention_s > 0 and part.upper <= now - retention_s
            if not (expired or part.detach_pending):
                continue
            ident = sql.Identifier(part.name)
            how = sql.SQL("FINALIZE" if part.detach_pending else "CONCURRENTLY")
            # CONCURRENTLY: writers and readers of tasks go on meanwhile (a plain DETACH
            # or DROP would queue them behind an exclusive lock on tasks_done).
            await conn.execute(
                sql.SQL("ALTER TABLE tasks_done DETACH PARTITION {} {}").format(ident, how)
            )
            await self._drop_detached(conn, part.name, report)
        if retention_s > 0:
            await conn.execute(q("prune_task_keys"), {"retention_s": retention_s})
        await conn.execute(q("vacuum_unfinished"))

    async def _drop_detached(
        self, conn: psycopg.AsyncConnection[Any], name: str, report: MaintenanceReport
    ) -> None:
        """Count, take off the stored-done count, drop: one transaction, so the count is
        taken off exactly once whatever stops the pass."""
        ident = sql.Identifier(name)
        async with conn.transaction():
            n = await self._count_gently(conn, name)
            await conn.execute(q("take_off_done"), {"n": n})
            await conn.execute(sql.SQL("DROP TABLE {}").format(ident))
        report.dropped.append(name)
        report.dropped_rows += n

    @staticmethod
    async def _count_gently(conn: psycopg.AsyncConnection[Any], name: str) -> int:
        """The rows of a detached partition (nobody writes it any more), counted by
        ranges of pages (TID range scans), no parallel workers, pausing between ranges.
        The last range is open-ended, so pages past the size read first count too."""
        await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        ident = sql.Identifier(name)
        cur = await conn.execute(
            "SELECT pg_relation_size(quote_ident(%s)::regclass)"
            " / current_setting('block_size')::bigint",
            (name,),
        )
        row = await cur.fetchone()
        pages = int(row[0]) if row else 0
        total = 0
        for start in range(0, max(pages, 1), COUNT_SLICE_PAGES):
            t0 = time.perf_counter()
            end = start + COUNT_SLICE_PAGES
            cond = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({start},0)"))
            if end < pages:
                cond += sql.SQL(" AND ctid < {}::tid").format(sql.Literal(f"({end},0)"))
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE ").format(ident) + cond)
            row = await cur.fetchone()
            total += int(row[0]) if row else 0
            if end < pages:
                await asyncio.sleep(min(COUNT_PAUSE_MAX_S, time.perf_counter() - t0))
        return total
