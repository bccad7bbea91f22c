"""Independent accounts of what happened, to hold against the database (the truth).

A producer's log is one: a `tasks_inserted` line per committed insert naming the ids it
created, a `producer_started` line at each start and a `producer_stopped` line with its
count at a clean exit. Every row must be named by exactly one line (a batch inserted
twice, or a retried insert that had committed, leaves rows no producer owns), and each
cleanly stopped process's count must equal its own lines.

A consumer's log is a ledger of its own: one `task_done` line per task it moved to
done, and a `consumer_started` line at each start. Its counters start at zero in each
process, so the last process's counters must equal that process's own lines, and the
lines of all processes together must name every done task exactly once."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from daemons.bench.process import Daemon
from daemons.logs import parse_id_ranges
from tests.conftest import sql
from tests.system.harness import Bundle, db_done_by_type, done_by_type, wait_until


@dataclass
class ProcessLedger:
    ids: list[int] = field(default_factory=list)
    by_type: dict[int, tuple[int, int]] = field(default_factory=dict)
    last_sums: dict[int, int] = field(default_factory=dict)

    def add(self, task_id: int, t: int, value: int, type_sum: int) -> None:
        self.ids.append(task_id)
        n, s = self.by_type.get(t, (0, 0))
        self.by_type[t] = (n + 1, s + value)
        self.last_sums[t] = type_sum


@dataclass
class ConsumerLedger:
    processes: list[ProcessLedger]

    @property
    def starts(self) -> int:
        return len(self.processes)

    def ids(self) -> Counter[int]:
        return Counter(i for p in self.processes for i in p.ids)

    def last_sums(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for p in self.processes:
            out.update(p.last_sums)
        return out


def _kv(line: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in line.split() if "=" in p)


def consumer_ledger(*logs: str) -> ConsumerLedger:
    """Parse one or more consumer logs (each may span several processes, as a log that
    supervisor appends to does): a new process at each `consumer_started`."""
    processes: list[ProcessLedger] = []
    for log in logs:
        for line in log.splitlines():
            if " consumer_started " in line:
                processes.append(ProcessLedger())
            elif " task_done " in line:
                kv = _kv(line)
                if not processes:  # a log cut before its start line
                    processes.append(ProcessLedger())
                processes[-1].add(
                    int(kv["id"]), int(kv["type"]), int(kv["value"]), int(kv["type_sum"])
                )
    return ConsumerLedger(processes)


@dataclass
class ProducerProcess:
    ids: list[int] = field(default_factory=list)
    stopped_with: int | None = None  # `produced=` of its producer_stopped line
    unsettled: list[int] = field(default_factory=list)  # inserts given up at a stop


def producer_ledger(log: str) -> list[ProducerProcess]:
    """The producer processes of one log (supervisor appends every run to it)."""
    processes: list[ProducerProcess] = []
    for line in log.splitlines():
        if " producer_started " in line:
            processes.append(ProducerProcess())
        elif " tasks_inserted " in line:
            kv = _kv(line)
            ids = parse_id_ranges(kv["ids"])
            assert len(ids) == int(kv["n"]), line
            processes[-1].ids.extend(ids)
        elif " tasks_insert_unsettled " in line:
            processes[-1].unsettled.extend(parse_id_ranges(_kv(line)["ids"]))
        elif " producer_stopped " in line:
            processes[-1].stopped_with = int(_kv(line)["produced"])
    return processes


def compare_created(
    processes: list[ProducerProcess], db_url: str
) -> tuple[int, set[int], set[int]]:
    """(ids named twice, rows no producer named, ids named that are not rows). A row of
    an insert that its producer gave up on at a stop, outcome unknown, may exist or not."""
    named = Counter(i for p in processes for i in p.ids)
    maybe = {i for p in processes for i in p.unsettled}
    rows = {int(r[0]) for r in sql(db_url, "SELECT id FROM tasks")}  # type: ignore[call-overload]
    twice = sum(n - 1 for n in named.values() if n > 1)
    return twice, rows - named.keys() - maybe, named.keys() - rows


def done_ids(db_url: str) -> set[int]:
    return {int(r[0]) for r in sql(db_url, "SELECT id FROM tasks WHERE state = 'done'")}  # type: ignore[call-overload]


def compare(ledger: ConsumerLedger, db_url: str) -> tuple[int, set[int], set[int]]:
    """(double-logged tasks, done tasks never logged, logged tasks not done)."""
    logged = ledger.ids()
    done = done_ids(db_url)
    double = sum(n - 1 for n in logged.values() if n > 1)
    return double, done - logged.keys(), logged.keys() - done


KILL_WINDOW_S = 0.5  # a SIGKILL between a commit and its log write loses those lines


def unlogged_outside_kills(
    db_url: str, unlogged: set[int], kills: list[float], stamp: str = "last_update_time"
) -> list[int]:
    """Of the tasks no log names, those not explained by a SIGKILL: a process killed
    right after its commit never writes those lines (no log can be in the same
    transaction), so a task may go unlogged only if `stamp` (when it was done, or for
    the producer's inserts when it was created) falls just before a kill."""
    if not unlogged:
        return []
    rows = sql(
        db_url,
        f"SELECT id, {stamp} FROM tasks WHERE id = ANY(%s)",
        (sorted(unlogged),),
    )
    return [
        int(i)  # type: ignore[call-overload]
        for i, t in rows
        if not any(k - KILL_WINDOW_S <= float(t) <= k + 0.05 for k in kills)  # type: ignore[arg-type]
    ]


def stop_and_check_one_consumer(bundle: Bundle, consumer: Daemon) -> dict[int, tuple[int, int]]:
    """For a test with a single consumer process, its work ended: its counters (from zero)
    equal the database per type, and so do its own lines, each done task named once.
    Stops it; returns the database's {type: (count, sum)}."""
    db = db_done_by_type(bundle.db_url)
    wait_until(lambda: done_by_type(bundle.metrics_url("consumer")) == db, 5, "counters = database")
    consumer.terminate()
    assert consumer.wait(20) == 0
    ledger = consumer_ledger(consumer.log())
    assert compare(ledger, bundle.db_url) == (0, set(), set())
    assert ledger.processes[-1].by_type == db
    assert ledger.last_sums() == {t: s for t, (_, s) in db.items()}
    return db
