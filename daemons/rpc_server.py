"""The consumer's gRPC face: request validation, the servicer, and the one interceptor
that maps the exception hierarchy to status codes and records RPC metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from daemons import engine as eng
from daemons import metrics
from daemons.errors import DaemonError, Draining, InvalidTask
from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from daemons.store import TRANSIENT_ERRORS

TYPE_RANGE = range(10)
VALUE_RANGE = range(100)

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
        code = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.UNKNOWN
        raise
    finally:
        metrics.rpc_server.record(method, code.name, time.perf_counter() - start)


def to_new_task(task: tasks_pb2.Task, index: int | None = None) -> eng.NewTask:
    where = "" if index is None else f"tasks[{index}]: "
    if task.type not in TYPE_RANGE:
        raise InvalidTask(f"{where}type {task.type} out of range 0..9")
    if task.value not in VALUE_RANGE:
        raise InvalidTask(f"{where}value {task.value} out of range 0..99")
    if task.id < 0:
        raise InvalidTask(f"{where}id {task.id} is negative")
    if task.creation_time < 0 or task.creation_time != task.creation_time:
        raise InvalidTask(f"{where}creation_time {task.creation_time} is not a unix time")
    return eng.NewTask(task.id, task.type, task.value, task.creation_time)


def validate_batch(tasks: Any, max_batch: int) -> list[eng.NewTask]:
    if not tasks:
        raise InvalidTask("empty batch")
    if len(tasks) > max_batch:
        raise InvalidTask(f"batch of {len(tasks)} tasks exceeds the limit of {max_batch}")
    out = [to_new_task(t, i) for i, t in enumerate(tasks)]
    seen: set[int] = set()
    for i, t in enumerate(out):
        if t.id:
            if t.id in seen:
                raise InvalidTask(f"tasks[{i}]: id {t.id} appears twice in the batch")
            seen.add(t.id)
    return out


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
        ids, statuses = await self.engine.admit([task])
        status = statuses[0]
        if status in (eng.RATE_LIMITED, eng.BUSY):
            why = "rate limit" if status == eng.RATE_LIMITED else "in-flight cap"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"refused by the {why}")
        if status == eng.INVALID:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task with id {task.id}")
        return tasks_pb2.SubmitReply(id=ids[0], status=status)  # type: ignore[arg-type]

    async def SubmitBatch(
        self, request: tasks_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.SubmitBatchReply:
        try:
            tasks = validate_batch(request.tasks, self.max_batch)
        except InvalidTask:
            metrics.rejected["invalid"].inc(max(1, len(request.tasks)))
            raise
        ids, statuses = await self.engine.admit(tasks)
        return tasks_pb2.SubmitBatchReply(ids=ids, statuses=statuses)  # type: ignore[arg-type]
