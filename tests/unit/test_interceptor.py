"""The consumer's one server interceptor, with a stand-in for the servicer context:
unary and streaming handlers both pass through it, and both are counted."""

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from daemons.errors import InvalidTask
from daemons.rpc_server import ErrorsAndMetrics


class Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self.aborted[0] if self.aborted else None

    def cancelled(self) -> bool:
        return False


def handled(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("grpc_server_handled_total", {"method": method, "code": code})
    return value or 0.0


async def call(handler: Any, request: Any = None) -> tuple[Any, Context]:
    context = Context()
    reply = await ErrorsAndMetrics().intercept(
        handler, request, context, f"/t.S/{handler.__name__}"
    )  # type: ignore[arg-type]
    return reply, context


async def test_a_streaming_reply_passes_through_and_is_counted_when_it_ends() -> None:
    async def UnitStream(request: Any, context: Any) -> AsyncIterator[int]:
        for i in range(3):
            yield i

    before = handled("UnitStream", "OK")
    replies, _ = await call(UnitStream)
    assert handled("UnitStream", "OK") == before  # not yet: the stream has not ended
    assert [r async for r in replies] == [0, 1, 2]
    assert handled("UnitStream", "OK") == before + 1


async def test_a_unary_reply_is_returned_and_an_error_becomes_its_status_code() -> None:
    async def UnitOk(request: Any, context: Any) -> str:
        return f"reply to {request}"

    assert (await call(UnitOk, "x"))[0] == "reply to x"
    assert handled("UnitOk", "OK") == 1

    async def UnitBad(request: Any, context: Any) -> None:
        raise InvalidTask("type 10 out of range 0..9")

    before = handled("UnitBad", "INVALID_ARGUMENT")
    with pytest.raises(grpc.aio.AbortError):
        await call(UnitBad)
    assert handled("UnitBad", "INVALID_ARGUMENT") == before + 1


async def test_a_streaming_error_becomes_its_status_code() -> None:
    async def UnitStreamBad(request: Any, context: Any) -> AsyncIterator[int]:
        yield 1
        raise InvalidTask("bad")

    replies, context = await call(UnitStreamBad)
    with pytest.raises(grpc.aio.AbortError):
        _ = [r async for r in replies]
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert handled("UnitStreamBad", "INVALID_ARGUMENT") == 1
