"""The consumer's gRPC face: request validation, the servicer, and the one interceptor
that maps the exception hierarchy to status codes and records RPC metrics."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from daemons import auth, metrics
from daemons import engine as eng
from daemons.engine import TaskStatus
from daemons.errors import DaemonError, Draining, InvalidTask
from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from daemons.store import TRANSIENT_ERRORS

TYPE_RANGE = range(10)
VALUE_RANGE = range(100)
# A new task's (id 0) creation_time is where its end-to-end latency starts, and a
# histogram's sum keeps every observation: five tasks stamped 1970 once added 9e9 s to
# task_latency_seconds_sum, and +inf or 10^12 (the year 33658) was accepted as given.
# So a client's stamp must lie within a day back (no client holds a task it has not
# registered yet that long) and five minutes ahead (hosts kept by NTP differ by far
# less); 0 means unset and the consumer stamps now. A known task (id > 0) is timed from
# the row's own creation_time, which the database returns on `processing`, so its stamp
# only has to be a time: a task redelivered after a week-long outage is still old, and
# still to be worked.
MAX_TASK_AGE_S = 24 * 3600.0
MAX_CLOCK_SKEW_S = 300.0
MAX_KEY_CHARS = 128

STATUS_OF_ERROR: dict[type[DaemonError], grpc.StatusCode] = {
    InvalidTask: grpc.StatusCode.INVALID_ARGUMENT,
    Draining: grpc.StatusCode.UNAVAILABLE,
}


class ErrorsAndMetrics(AsyncServerInterceptor):
    """DaemonError -> status code, transient database errors -> UNAVAILABLE; a handled
    counter and latency histogram per method. A streaming reply (server reflection) is
    counted when its stream ends."""

    async def intercept(
        self,
        method: Callable[..., Any],
        request: Any,
        context: grpc.aio.ServicerContext,
        method_name: str,
    ) -> Any:
        short = method_name.rsplit("/", 1)[-1]
        reply = method(request, context)
        if hasattr(reply, "__aiter__"):  # an async generator: awaiting it is a TypeError
            return _streamed(reply, context, short)
        async with _outcome(context, short):
            return await reply


async def _streamed(
    replies: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str
) -> AsyncIterator[Any]:
    async with _outcome(context, method):
        async for reply in replies:
            yield reply


@contextlib.asynccontextmanager
async def _outcome(context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except DaemonError as exc:
        code = STATUS_OF_ERROR.get(type(exc), grpc.StatusCode.INTERNAL)
        await context.abort(code, str(exc))
    except TRANSIENT_ERRORS:
        code = grpc.StatusCode.UNAVAILABLE
        await context.abort(code, "database unavailable; retry later")
    except grpc.aio.AbortError:
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    except BaseException:
        code = _abandoned(context)
        raise
    finally:
        metrics.rpc_server.record(method, code.name, time.perf_counter() - start)


def _abandoned(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code of a call whose handler was cut short: the client cancelled it, or its
    deadline passed while the server worked (the work done stays done)."""
    if context.cancelled():
        return grpc.StatusCode.CANCELLED
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNKNOWN


def to_new_task(
    task: tasks_pb2.Task, index: int | None = None, now: float | None = None
) -> eng.NewTask:
    where = "" if index is None else f"tasks[{index}]: "
    if task.type not in TYPE_RANGE:
        raise InvalidTask(f"{where}type {task.type} out of range 0..9")
    if task.value not in VALUE_RANGE:
        raise InvalidTask(f"{where}value {task.value} out of range 0..99")
    if task.id < 0:
        raise InvalidTask(f"{where}id {task.id} is negative")
    key = task.idempotency_key
    if key and task.id:
        raise InvalidTask(f"{where}idempotency_key is for new tasks (id 0) only")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidTask(f"{where}idempotency_key longer than {MAX_KEY_CHARS} characters")
    _check_creation_time(task, where, time.time() if now is None else now)
    return eng.NewTask(task.id, task.type, task.value, task.creation_time, key)


def _check_creation_time(task: tasks_pb2.Task, where: str, now: float) -> None:
    stamp = task.creation_time
    if task.id:
        if not (math.isfinite(stamp) and stamp >= 0):
            raise InvalidTask(
                f"{where}creation_time {stamp!r} out of range: a known task's is a finite"
                " unix time >= 0"
            )
        return
    low, high = now - MAX_TASK_AGE_S, now + MAX_CLOCK_SKEW_S
    if stamp != 0 and not low <= stamp <= high:  # NaN compares false: refused too
        raise InvalidTask(
            f"{where}creation_time {stamp!r} out of range: 0 (unset) or unix seconds in"
            f" [{low:.3f}, {high:.3f}] (now - {MAX_TASK_AGE_S:.0f} s .. now +"
            f" {MAX_CLOCK_SKEW_S:.0f} s)"
        )


def validate_batch(tasks: Any, max_batch: int, now: float | None = None) -> list[eng.NewTask]:
    if not tasks:
        raise InvalidTask("empty batch")
    if len(tasks) > max_batch:
        raise InvalidTask(f"batch of {len(tasks)} tasks exceeds the limit of {max_batch}")
    now = time.time() if now is None else now
    out = [to_new_task(t, i, now) for i, t in enumerate(tasks)]
    seen: set[int] = set()
    for i, t in enumerate(out):
        if t.id:
            if t.id in seen:
                raise InvalidTask(f"tasks[{i}]: id {t.id} appears twice in the batch")
            seen.add(t.id)
    return out


def to_wire(statuses: list[TaskStatus]) -> list[tasks_pb2.TaskStatus]:
    # The same numbers (a unit test pins every member), so a cast will do: converting
    # would be a step per task on the hottest path, to change nothing.
    return cast("list[tasks_pb2.TaskStatus]", statuses)


class ConsumerServicer(tasks_pb2_grpc.ConsumerServicer):
    def __init__(self, engine: eng.Engine, max_batch: int) -> None:
        self.engine = engine
        self.max_batch = max_batch

    async def Submit(
        self, request: tasks_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.SubmitReply:
        if not request.HasField("task"):
            metrics.rejected["invalid"].inc()
            raise InvalidTask("request has no task")
        try:
            task = to_new_task(request.task)
        except InvalidTask:
            metrics.rejected["invalid"].inc()
            raise
        ids, statuses = await self.engine.admit([task], auth.caller.get())
        status = statuses[0]
        if status in (TaskStatus.RATE_LIMITED, TaskStatus.BUSY):
            why = "rate limit" if status == TaskStatus.RATE_LIMITED else "in-flight cap"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"refused by the {why}")
        if status == TaskStatus.INVALID:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task with id {task.id}")
        return tasks_pb2.SubmitReply(id=ids[0], status=to_wire(statuses)[0])

    async def SubmitBatch(
        self, request: tasks_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.SubmitBatchReply:
        try:
            tasks = validate_batch(request.tasks, self.max_batch)
        except InvalidTask:
            metrics.rejected["invalid"].inc(max(1, len(request.tasks)))
            raise
        ids, statuses = await self.engine.admit(tasks, auth.caller.get())
        return tasks_pb2.SubmitBatchReply(ids=ids, statuses=to_wire(statuses))
