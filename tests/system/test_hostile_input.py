"""Random and hostile requests against a live consumer: every answer has the right
status code, and after every answer the database holds exactly what that answer says.

Each example gets a fresh block of tasks (half left `received`, half already worked to
`done`), so that new tasks, known tasks, duplicates and unknown ids are all in play every
time; task ids are drawn as references into that block and resolved when it exists."""

from __future__ import annotations

import math
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from daemons.bench.process import Daemon
from daemons.bench.scrape import scrape
from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from daemons.rpc_server import MAX_CLOCK_SKEW_S, MAX_TASK_AGE_S
from tests.conftest import BIN, sql, states
from tests.system.harness import Bundle, self_signed_cert, wait_until

S = tasks_pb2
MAX_BATCH = 50
HALF = 4  # tasks per example left `received`, and as many already `done`
ROWS = "SELECT id, type, value, state::text, creation_time, last_update_time FROM tasks"
INSERT = (
    "INSERT INTO tasks (type, value, creation_time, last_update_time)"
    " SELECT g %% 10, g %% 100, %s, %s FROM generate_series(1, %s) g RETURNING id"
)

# A task as drawn: (id ref, type, value, stamp ref). An id ref is ("new", serial),
# ("received", k) or ("done", k) into the example's block, ("unknown", id) or
# ("negative", id); new refs carry a serial only so that unique_by leaves them alone.
# A stamp ref is ("abs", unix seconds) or ("rel", seconds from the moment of sending).
Ref = tuple[str, int]
Stamp = tuple[str, float]
Spec = tuple[Ref, int, int, Stamp]
Row = tuple[object, ...]  # type, value, state, creation_time, last_update_time

I32 = st.integers(-(2**31), 2**31 - 1)
new_ref = st.tuples(st.just("new"), st.integers(0, 2**16))
known_ref = st.tuples(st.sampled_from(["received", "done"]), st.integers(0, HALF - 1))
unknown_ref = st.tuples(st.just("unknown"), st.integers(10**12, 2**62))  # never assigned
any_ref = st.one_of(
    new_ref, known_ref, unknown_ref, st.tuples(st.just("negative"), st.integers(-(2**63), -1))
)
ok_stamp = st.sampled_from([("abs", 0.0), ("rel", 0.0), ("rel", -60.0)])
any_stamp = st.one_of(
    ok_stamp,
    st.sampled_from([("abs", x) for x in (1.0, 1e12, math.inf, -math.inf, math.nan)]),
    st.tuples(st.just("abs"), st.floats(-1e18, -1e-9)),
    # Either side of both edges of a new task's window, a minute away from each edge.
    st.sampled_from(
        [
            ("rel", s * (edge + d))
            for s, edge in ((-1, MAX_TASK_AGE_S), (1, MAX_CLOCK_SKEW_S))
            for d in (-60.0, 60.0)
        ]
    ),
)
clean_task = st.tuples(
    st.one_of(new_ref, known_ref, unknown_ref), st.integers(0, 9), st.integers(0, 99), ok_stamp
)
any_task = st.tuples(
    any_ref, st.one_of(st.integers(0, 9), I32), st.one_of(st.integers(0, 99), I32), any_stamp
)
batch_st = st.one_of(
    st.lists(clean_task, max_size=MAX_BATCH, unique_by=lambda t: t[0]),
    # One hostile task among valid ones: the whole batch is refused, its valid part too.
    st.tuples(
        st.lists(clean_task, max_size=MAX_BATCH - 1, unique_by=lambda t: t[0]),
        any_task,
        st.integers(0, MAX_BATCH - 1),
    ).map(lambda x: [*x[0][: x[2]], x[1], *x[0][x[2] :]]),
    st.lists(st.one_of(clean_task, any_task), max_size=MAX_BATCH + 10),
)
EVERY_PATH = {"accepted new", "accepted known", "duplicate", "unknown id", "invalid argument"}


@dataclass
class Block:
    received: list[int]
    done: list[int]

    def resolve(self, ref: Ref) -> int:
        kind, n = ref
        if kind == "new":
            return 0
        if kind in ("received", "done"):
            return (self.received if kind == "received" else self.done)[n]
        return n


def stamp_at(ref: Stamp, now: float) -> float:
    return ref[1] + (now if ref[0] == "rel" else 0.0)


def valid(task: tasks_pb2.Task, now: float) -> bool:
    """The consumer's rule, stated independently (the stamps drawn lie a minute or more
    from either edge, so `now` here and the consumer's own differ harmlessly)."""
    stamp = task.creation_time
    if task.id == 0:
        stamp_ok = stamp == 0 or now - MAX_TASK_AGE_S <= stamp <= now + MAX_CLOCK_SKEW_S
    else:
        stamp_ok = math.isfinite(stamp) and stamp >= 0
    return task.id >= 0 and 0 <= task.type <= 9 and 0 <= task.value <= 99 and stamp_ok


def batch_refused(tasks: list[tasks_pb2.Task], now: float) -> bool:
    known = [t.id for t in tasks if t.id]
    return (
        not tasks
        or len(tasks) > MAX_BATCH
        or not all(valid(t, now) for t in tasks)
        or len(known) != len(set(known))
    )


class Live:
    """A consumer, a stub on it, and the database checks of every answer."""

    def __init__(self, bundle: Bundle, stub: tasks_pb2_grpc.ConsumerStub) -> None:
        self.url = bundle.db_url
        self.metrics_url = bundle.metrics_url("consumer")
        self.stub = stub
        self.paths: Counter[str] = Counter()

    def rows(self) -> dict[int, Row]:
        return {int(r[0]): r[1:] for r in sql(self.url, ROWS)}  # type: ignore[call-overload]

    def quiet(self) -> None:
        wait_until(lambda: states(self.url)["processing"] == 0, 10, "no work left", every_s=0.01)

    def fresh_block(self) -> Block:
        now = time.time()
        ids = [int(r[0]) for r in sql(self.url, INSERT, (now, now, 2 * HALF))]  # type: ignore[call-overload]
        block = Block(received=ids[:HALF], done=ids[HALF:])
        reply = self.stub.SubmitBatch(
            S.SubmitBatchRequest(tasks=[S.Task(id=i, type=1, value=1) for i in block.done]),
            timeout=10,
        )
        assert list(reply.statuses) == [S.TASK_STATUS_ACCEPTED] * HALF
        self.quiet()
        return block

    def request(self, specs: list[Spec], block: Block, now: float) -> list[tasks_pb2.Task]:
        return [
            S.Task(id=block.resolve(ref), type=t, value=v, creation_time=stamp_at(stamp, now))
            for ref, t, v, stamp in specs
        ]

    def check_latencies(self) -> None:
        """Every stamp the consumer took lies within a day back, so the end-to-end
        latencies it observed do too (stamps of 1970 once added 9e9 s to the sum)."""
        latency = {
            s.name: s.value for s in scrape(self.metrics_url) if s.name.startswith("task_latency")
        }
        count, total = latency["task_latency_seconds_count"], latency["task_latency_seconds_sum"]
        assert count > 0 and 0 <= total <= count * (MAX_TASK_AGE_S + 60), latency

    def path(self, name: str) -> None:
        self.paths[name] += 1
        event(name)

    def check_refused(self, before: dict[int, Row], why: str) -> None:
        """Nothing written: the database is exactly as before."""
        self.path(why)
        assert self.rows() == before

    def check_answer(
        self,
        before: dict[int, Row],
        sent: list[tasks_pb2.Task],
        answers: list[tuple[int, int]],
        sent_between: tuple[float, float],
    ) -> None:
        """Each (id, status) against the rows it implies, at once; then, once the work is
        done, every row of the database against what the answers say it must be."""
        now_rows = self.rows()
        expected = dict(before)
        touched = set()
        for task, (task_id, status) in zip(sent, answers, strict=True):
            row = now_rows.get(task_id)
            if task.id == 0:
                assert status == S.TASK_STATUS_ACCEPTED, (task, status)
                assert task_id not in before and task_id not in touched and row, (task_id, row)
                assert row[:2] == (task.type, task.value) and row[2] in ("processing", "done")
                if task.creation_time:
                    assert row[3] == task.creation_time
                else:  # unset: stamped by the consumer on arrival
                    assert sent_between[0] - 1 <= row[3] <= sent_between[1] + 1, row  # type: ignore[operator]
                expected[task_id] = (task.type, task.value, "done", row[3])
                self.path("accepted new")
            elif task_id not in before:
                assert status == S.TASK_STATUS_INVALID and task_id == task.id, (task, status)
                assert row is None, row
                self.path("unknown id")
                continue
            elif before[task_id][2] == "received":
                assert status == S.TASK_STATUS_ACCEPTED and task_id == task.id, (task, status)
                was = before[task_id]
                assert row and row[2] in ("processing", "done"), row
                assert (row[:2], row[3]) == (was[:2], was[3]), "content is the database's"
                expected[task_id] = (*was[:2], "done", was[3])
                self.path("accepted known")
            else:
                assert status == S.TASK_STATUS_DUPLICATE and task_id == task.id, (task, status)
                assert row == before[task_id], "a duplicate changed its row"
                self.path("duplicate")
                continue
            touched.add(task_id)
        self.quiet()
        after = self.rows()
        assert set(after) == set(expected), "rows appeared or vanished that no answer names"
        for task_id, row in after.items():
            if task_id in touched:  # worked to done; content and creation_time as answered
                assert row[:4] == expected[task_id], (task_id, row, expected[task_id])
            else:
                assert row == expected[task_id], (task_id, row, expected[task_id])


@pytest.fixture
def live(bundle: Bundle) -> Iterator[Live]:
    bundle.consumer(
        CONSUMER_MAX_BATCH=str(MAX_BATCH), CONSUMER_WORK_SCALE="0", CONSUMER_RATE_LIMIT="100000"
    )
    with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
        yield Live(bundle, tasks_pb2_grpc.ConsumerStub(channel))


NEW, RECEIVED, DONE = ("new", 0), ("received", 0), ("done", 0)
UNKNOWN = ("unknown", 10**15)
NOW, UNSET = ("rel", 0.0), ("abs", 0.0)


def test_random_batches(live: Live) -> None:
    @settings(max_examples=100, deadline=None)
    @given(batch=batch_st)
    @example(
        batch=[(NEW, 1, 2, UNSET), (RECEIVED, 3, 4, NOW), (DONE, 5, 6, NOW), (UNKNOWN, 1, 1, NOW)]
    )
    @example(batch=[])
    @example(batch=[(NEW, 1, 2, ("abs", math.inf))])
    def run(batch: list[Spec]) -> None:
        block = live.fresh_block()
        before = live.rows()
        now = time.time()
        tasks = live.request(batch, block, now)
        try:
            reply = live.stub.SubmitBatch(S.SubmitBatchRequest(tasks=tasks), timeout=10)
        except grpc.RpcError as err:
            assert batch_refused(tasks, now), (err.code(), err.details())
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            live.check_refused(before, "empty batch" if not tasks else "invalid argument")
            return
        assert not batch_refused(tasks, now), tasks
        answers = list(zip(reply.ids, reply.statuses, strict=True))
        live.check_answer(before, tasks, answers, (now, time.time()))

    run()
    print(f"\npaths: {dict(live.paths)}")
    assert EVERY_PATH | {"empty batch"} <= set(live.paths), live.paths
    live.check_latencies()


def test_random_single_tasks(live: Live) -> None:
    @settings(max_examples=60, deadline=None)
    @given(spec=st.one_of(st.none(), clean_task, any_task))
    @example(spec=None)
    @example(spec=(NEW, 1, 2, UNSET))
    @example(spec=(RECEIVED, 1, 2, NOW))
    @example(spec=(DONE, 1, 2, NOW))
    @example(spec=(UNKNOWN, 1, 2, NOW))
    @example(spec=(NEW, 1, 2, ("abs", 1.0)))
    def run(spec: Spec | None) -> None:
        block = live.fresh_block()
        before = live.rows()
        now = time.time()
        task = None if spec is None else live.request([spec], block, now)[0]
        try:
            reply = live.stub.Submit(S.SubmitRequest(task=task), timeout=10)
        except grpc.RpcError as err:
            if task is None or not valid(task, now):
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                live.check_refused(before, "no task" if task is None else "invalid argument")
            else:
                assert err.code() == grpc.StatusCode.NOT_FOUND, (task, err.details())
                assert task.id not in before
                live.check_refused(before, "unknown id")
            return
        assert task is not None and valid(task, now), task
        live.check_answer(before, [task], [(reply.id, reply.status)], (now, time.time()))

    run()
    print(f"\npaths: {dict(live.paths)}")
    assert EVERY_PATH | {"no task"} <= set(live.paths), live.paths
    live.check_latencies()


# --- deadlines, cancellation and oversized messages, on a consumer that takes big batches

BIG = 5000  # a batch whose admission takes the consumer tens of milliseconds
DEADLINES_S = (0.002, 0.005, 0.01, 0.02, 0.04)
ROUNDS_MAX_S = 30.0


@pytest.fixture
def roomy(bundle: Bundle) -> Iterator[tuple[Daemon, tasks_pb2_grpc.ConsumerStub, grpc.Channel]]:
    consumer = bundle.consumer(
        CONSUMER_MAX_BATCH=str(BIG),
        CONSUMER_MAX_IN_FLIGHT="1000000",
        CONSUMER_RATE_LIMIT="10000000",
        CONSUMER_WORK_SCALE="0",
    )
    with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
        yield consumer, tasks_pb2_grpc.ConsumerStub(channel), channel


def marked_batch(n: int, stamp: float) -> tasks_pb2.SubmitBatchRequest:
    """New tasks whose creation_time (inside the accepted window) tells their call apart."""
    return S.SubmitBatchRequest(
        tasks=[S.Task(type=i % 10, value=i % 100, creation_time=stamp) for i in range(n)]
    )


def held(url: str, stamp: float) -> list[tuple[object, ...]]:
    query = "SELECT type, value, state::text FROM tasks WHERE creation_time = %s"
    return sql(url, query, (stamp,))


def check_whole_and_done(url: str, stamp: float, n: int, answered: bool) -> bool:
    """The call's tasks are in the database whole (or, unanswered, not at all), with the
    content sent, and worked to `done`. Returns whether they are there."""
    rows = held(url, stamp)
    assert len(rows) == n if answered else len(rows) in (0, n), (stamp, len(rows))
    assert Counter((t, v) for t, v, _ in rows) == Counter(
        (i % 10, i % 100) for i in range(len(rows))
    )
    assert {state for _, _, state in rows} <= {"done"}, Counter(s for _, _, s in rows)
    return bool(rows)


def unanswered_at_server(bundle: Bundle, method: str) -> dict[str, float]:
    """Calls of `method` the consumer's handler ended without an OK reply, by code."""
    out: dict[str, float] = {}
    for sample in scrape(bundle.metrics_url("consumer")):
        if (
            sample.name == "grpc_server_handled_total"
            and sample.labels["method"] == method
            and sample.labels["code"] != "OK"
            and sample.value
        ):
            out[sample.labels["code"]] = sample.value
    return out


def test_deadlines_that_expire_while_the_server_works(bundle: Bundle, roomy) -> None:  # type: ignore[no-untyped-def]
    consumer, stub, channel = roomy
    base = time.time() - 3600.0
    outcomes: list[tuple[float, bool]] = []
    started = time.monotonic()
    for r in range(2 * len(DEADLINES_S)):
        if time.monotonic() - started > ROUNDS_MAX_S:
            break
        stamp = base + r
        try:
            reply = stub.SubmitBatch(marked_batch(BIG, stamp), timeout=DEADLINES_S[r % 5])
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
            outcomes.append((stamp, False))
        else:
            assert set(reply.statuses) == {S.TASK_STATUS_ACCEPTED}
            outcomes.append((stamp, True))
    # The server stays healthy: it answers the next calls at once.
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    after = stub.Submit(S.SubmitRequest(task=S.Task(type=1, value=1)), timeout=5)
    assert after.status == S.TASK_STATUS_ACCEPTED and consumer.popen.poll() is None
    wait_until(lambda: states(bundle.db_url)["processing"] == 0, 30, "no work left")
    worked_unanswered = [
        stamp
        for stamp, answered in outcomes
        if check_whole_and_done(bundle.db_url, stamp, BIG, answered) and not answered
    ]
    print(f"\n{len(outcomes)} calls, {sum(a for _, a in outcomes)} answered in time,")
    print(f"{len(worked_unanswered)} unanswered but registered by the server")
    # The deadlines did expire at the server, mid-work: it took calls the client had
    # given up on, and its handler ended some of them without a reply.
    assert worked_unanswered, outcomes
    # ... and says why: the deadline passed (or the client cancelled), never "unknown".
    codes = unanswered_at_server(bundle, "SubmitBatch")
    assert sum(codes.values()) >= 1 and set(codes) <= {"DEADLINE_EXCEEDED", "CANCELLED"}, codes
    assert states(bundle.db_url) == {
        "received": 0,
        "processing": 0,
        "done": BIG * len(worked_unanswered) + BIG * sum(a for _, a in outcomes) + 1,
    }


def test_oversized_messages_and_cancellation(bundle: Bundle, roomy) -> None:  # type: ignore[no-untyped-def]
    _, stub, _ = roomy
    before = sql(bundle.db_url, ROWS)
    huge = tasks_pb2.SubmitBatchRequest(
        tasks=[tasks_pb2.Task(type=1, value=1, creation_time=1.0)] * 400_000
    )  # ~6 MB, over the 4 MB default limit
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitBatch(huge, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sql(bundle.db_url, ROWS) == before
    stamp = time.time() - 60.0
    future = stub.SubmitBatch.future(marked_batch(10, stamp), timeout=10)
    future.cancel()
    # A call behind it through the same registration writer: once it is answered, what
    # the cancelled call registered (if anything) is in (polling at once raced it).
    after = stub.Submit(S.SubmitRequest(task=S.Task(type=1, value=1)), timeout=5)
    assert after.status == S.TASK_STATUS_ACCEPTED
    # Whatever a cancelled call managed to register is still worked to `done`.
    wait_until(lambda: states(bundle.db_url)["processing"] == 0, 10, "no stuck work")
    check_whole_and_done(bundle.db_url, stamp, 10, answered=False)


def test_tls_link_and_plaintext_refused(bundle: Bundle, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    bundle.consumer(CONSUMER_TLS_CERT=str(cert), CONSUMER_TLS_KEY=str(key), CONSUMER_WORK_SCALE="0")
    producer = bundle.producer(
        PRODUCER_RATE="500",
        PRODUCER_TOTAL="500",
        PRODUCER_TLS_CA=str(cert),
        PRODUCER_TLS_SERVER_NAME="localhost",
    )
    assert producer.wait(30) == 0
    assert states(bundle.db_url)["done"] == 500
    with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            tasks_pb2_grpc.ConsumerStub(channel).Submit(
                tasks_pb2.SubmitRequest(task=tasks_pb2.Task(type=1, value=1)), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert states(bundle.db_url)["done"] == 500
    # Half a TLS configuration is a settings error, named, exit 2.
    out = subprocess.run(
        [str(BIN / "consumer")],
        env=bundle.env(CONSUMER_TLS_CERT=str(cert)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "CONSUMER_TLS_KEY" in out.stderr


def test_new_tasks_retried_with_their_key_after_a_deadline_are_made_once(
    bundle: Bundle, roomy
) -> None:  # type: ignore[no-untyped-def]
    """Submit(id 0) with an idempotency key under deadlines short enough to expire while
    the server works, then the same call again: one row per key, the retry answered with
    the first call's id; and a client that went away leaves no traceback in the log."""
    consumer, stub, _ = roomy
    stamp = time.time() - 120.0
    ids: dict[str, int] = {}
    duplicates = 0
    made = 0
    # Whether a call's deadline passes after the server has made its task is a race: a
    # round of 40 keys can miss it altogether (CI did once), so rounds of new keys go on
    # until one retry met its first call's task, five at most.
    for rnd in range(5):
        for k in range(40):
            key = f"r{rnd}-{k}"
            task = S.Task(type=k % 10, value=k % 100, creation_time=stamp, idempotency_key=key)
            made += 1
            try:
                stub.Submit(S.SubmitRequest(task=task), timeout=(0.0003, 0.001, 0.002)[k % 3])
                continue  # answered in time: nothing to retry
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
            reply = stub.Submit(S.SubmitRequest(task=task), timeout=5)
            assert reply.status in (S.TASK_STATUS_ACCEPTED, S.TASK_STATUS_DUPLICATE), reply
            duplicates += reply.status == S.TASK_STATUS_DUPLICATE
            ids[task.idempotency_key] = reply.id
        if duplicates:
            break
    wait_until(lambda: states(bundle.db_url)["processing"] == 0, 30, "no work left")
    rows = sql(bundle.db_url, "SELECT id FROM tasks WHERE creation_time = %s", (stamp,))
    keys = dict(sql(bundle.db_url, "SELECT key, id FROM task_keys WHERE key LIKE 'r%%'"))
    assert len(rows) == len(keys) == made, (len(rows), len(keys), made)  # one task per key
    assert {k: keys[k] for k in ids} == ids  # each retry was told the first call's task
    print(f"\n{len(ids)} calls retried after their deadline, {duplicates} had made the task")
    assert duplicates >= 1, "no retry met a task its first call had made: tighten deadlines"
    log = consumer.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
