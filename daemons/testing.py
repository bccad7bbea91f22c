"""An in-memory fake of the store, shipped with the package (as procrastinate ships
`InMemoryConnector`): the engines' logic can be tested, here or in a user's own tests,
without a database.

It keeps the real store's outcomes, and contract tests run the same assertions against
both (tests/integration/test_store_contract.py), so the fake cannot drift:
`received -> processing -> done` only from the expected state, increasing ids, lifetime
totals per type that deleting rows leaves alone, counts of what is stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from daemons.store import TaskRow, TaskStore

STATES = ("received", "processing", "done")
TYPES = range(10)


@dataclass(slots=True)
class StoredTask:
    row: TaskRow
    state: str
    last_update_time: float
    attempt: int = 0

    def claimed(self) -> TaskRow:
        """A copy carrying the current attempt: a holder's row must not change under it
        when the task is claimed again."""
        return replace(self.row, attempt=self.attempt)


class InMemoryStore:
    """Every domain operation of `TaskStore`, on a dict. `clock` stands in for both the
    daemons' and the database's clock (the real store uses one for leases, the other for
    done times; a fake has one host). Set `fail` to an exception to have every
    operation raise it, as the real store raises transient errors in an outage."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.tasks: dict[int, StoredTask] = {}
        self.totals = {t: [0, 0] for t in TYPES}  # type -> [done count, value sum], lifetime
        self.fail: BaseException | None = None
        self.keys: dict[str, int] = {}  # idempotency key -> task id
        # Set lose_reply for the next write (insert_reserved, mark_done) to commit and
        # then raise lose_reply_error, as a connection lost before the reply does.
        self.lose_reply = False
        self.lose_reply_error: BaseException = ConnectionError("reply lost")
        self._next_id = 1

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    def _lose_reply(self) -> None:
        if self.lose_reply:
            self.lose_reply = False
            raise self.lose_reply_error

    def _current(self, rows: Iterable[TaskRow]) -> list[StoredTask]:
        """The `processing` tasks still under the attempt a row holds. As in SQL, an id
        given twice (an older and a newer attempt) matches by its current attempt, once."""
        out: dict[int, StoredTask] = {}
        for row in rows:
            task = self.tasks.get(row.id)
            if task is not None and task.state == "processing" and task.attempt == row.attempt:
                out[row.id] = task
        return list(out.values())

    def _count_done(self, task: StoredTask) -> None:
        total = self.totals[task.row.type]
        total[0] += 1
        total[1] += task.row.value

    def _claim(self, state: str, older_than_s: float, limit: int, to: str) -> list[TaskRow]:
        """The sweeps: the oldest first, restamped so the next sweep passes them by."""
        now = self.clock()
        old = [t for t in self.tasks.values() if t.state == state]
        old = [t for t in old if t.last_update_time < now - older_than_s]
        old.sort(key=lambda t: t.last_update_time)
        for task in old[:limit]:
            if task.state != to:
                task.attempt += 1  # a reclaim ends the attempt
            task.state, task.last_update_time = to, now
        return [t.claimed() for t in old[:limit]]

    # --- the TaskStore operations ----------------------------------------------------

    async def insert_batch(
        self,
        types: Sequence[int],
        values: Sequence[int],
        creation_times: Sequence[float],
        *,
        state: str = "received",
    ) -> list[TaskRow]:
        self._maybe_fail()
        if state not in STATES:
            raise ValueError(f"no task state {state!r}")
        now, rows = self.clock(), []
        for t, v, created in zip(types, values, creation_times, strict=True):
            row = TaskRow(self._next_id, t, v, created)
            self._next_id += 1
            self.tasks[row.id] = task = StoredTask(row, state, now, int(state == "processing"))
            if state == "done":
                self._count_done(task)
            rows.append(task.claimed())
        return rows

    async def register_keyed(
        self,
        keys: Sequence[str],
        types: Sequence[int],
        values: Sequence[int],
        creation_times: Sequence[float],
    ) -> list[TaskRow | None]:
        self._maybe_fail()
        known = {k: self.keys[k] for k in keys if k in self.keys}  # before this call
        out: list[TaskRow | None] = []
        now = self.clock()
        for key, t, v, created in zip(keys, types, values, creation_times, strict=True):
            if key in known:
                out.append(TaskRow(known[key], t, v, created, 0))
            elif key in self.keys:  # twice in this batch: as a concurrent registration
                out.append(None)
            else:
                row = TaskRow(self._next_id, t, v, created)
                self._next_id += 1
                self.keys[key] = row.id
                task = StoredTask(row, "processing", now, 1)
                self.tasks[row.id] = task
                out.append(task.claimed())
        return out

    async def reserve_ids(self, n: int) -> list[int]:
        self._maybe_fail()
        first = self._next_id
        self._next_id += n
        return list(range(first, first + n))

    async def insert_reserved(
        self, rows: Sequence[TaskRow], *, retried: bool = False, state: str = "received"
    ) -> bool:
        self._maybe_fail()
        if retried and any(r.id in self.tasks for r in rows):
            return False
        if any(r.id in self.tasks for r in rows):
            raise ValueError("duplicate task id")  # the real store: UniqueViolation
        now = self.clock()
        for row in rows:
            self.tasks[row.id] = StoredTask(replace(row, attempt=0), state, now)
        self._lose_reply()
        return True

    async def mark_processing(self, ids: Sequence[int]) -> list[TaskRow]:
        self._maybe_fail()
        now, won = self.clock(), []
        for task_id in dict.fromkeys(ids):  # a repeated id moves once, as in SQL
            task = self.tasks.get(task_id)
            if task is not None and task.state == "received":
                task.state, task.last_update_time = "processing", now
                task.attempt += 1
                won.append(task.claimed())
        return won

    async def mark_done(self, rows: Sequence[TaskRow], *, retried: bool = False) -> list[int]:
        self._maybe_fail()
        already = []
        if retried:  # done earlier under the same attempt: by the write being retried
            for row in rows:
                task = self.tasks.get(row.id)
                if task is None or task.state != "done" or row.id in already:
                    continue
                if task.attempt == row.attempt:
                    already.append(row.id)
        won = self._current(rows)
        now = self.clock()
        for task in won:
            task.state, task.last_update_time = "done", now
            self._count_done(task)
        self._lose_reply()
        return [t.row.id for t in won] + already

    async def release_processing(self, rows: Sequence[TaskRow]) -> list[int]:
        self._maybe_fail()
        won = self._current(rows)
        for task in won:
            # Stamped 0: the next redelivery sweep takes it at once (see queries.sql).
            task.state, task.last_update_time = "received", 0.0
            task.attempt += 1
        return [t.row.id for t in won]

    async def ping(self) -> None:
        self._maybe_fail()

    async def existing_ids(self, ids: Sequence[int]) -> set[int]:
        self._maybe_fail()
        return {i for i in ids if i in self.tasks}

    async def count_unfinished(self) -> int:
        self._maybe_fail()
        return sum(1 for t in self.tasks.values() if t.state != "done")

    async def count_by_state(self) -> dict[str, int]:
        self._maybe_fail()
        counts = dict.fromkeys(STATES, 0)
        for task in self.tasks.values():
            counts[task.state] += 1
        return counts

    async def done_totals_by_type(self) -> dict[int, tuple[int, int]]:
        self._maybe_fail()
        return {t: (n, s) for t, (n, s) in self.totals.items()}

    async def reclaim_expired(self, lease_s: float, limit: int) -> list[TaskRow]:
        self._maybe_fail()
        return self._claim("processing", lease_s, limit, to="received")

    async def claim_stale_received(self, age_s: float, limit: int) -> list[TaskRow]:
        self._maybe_fail()
        return self._claim("received", age_s, limit, to="received")

    # --- what other writers do (an operator, retention), for tests -------------------

    def delete(self, ids: Iterable[int]) -> None:
        """Rows removed (by hand, or by retention): the lifetime totals stay."""
        for task_id in ids:
            self.tasks.pop(task_id, None)

    def backdate(self, seconds: float) -> None:
        """Every unfinished task last touched `seconds` earlier than it was (as if the
        clock had moved on: leases expire, received tasks go stale)."""
        for task in self.tasks.values():
            if task.state != "done":
                task.last_update_time -= seconds


if TYPE_CHECKING:
    _: TaskStore = InMemoryStore()  # mypy: the fake has every operation, with its types
