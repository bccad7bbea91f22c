"""Bearer tokens (issue 16): the interceptor lets a known token through and names its
caller; no token, a malformed header, a wrong token and one of the wrong length are
UNAUTHENTICATED before the handler runs, counted by reason; health needs none."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from daemons import auth
from daemons.tokens import parse_tokens, tokens_from

GOOD = "a" * 24


class Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def refused(reason: str) -> float:
    value = REGISTRY.get_sample_value("consumer_auth_refused_total", {"reason": reason})
    return value or 0.0


async def call(
    metadata: tuple[tuple[str, str], ...], method: str = "/tasks.v1.Consumer/Submit"
) -> tuple[Any, Context]:
    ran: list[str] = []

    async def handler(request: Any, context: Any) -> str:
        ran.append(auth.caller.get())
        return "reply"

    context = Context(metadata)
    interceptor = auth.Authenticate({GOOD: "alice"})
    try:
        reply = await interceptor.intercept(handler, None, context, method)  # type: ignore[arg-type]
    except grpc.aio.AbortError:
        reply = None
    return (reply, ran), context


async def test_a_known_token_passes_and_names_its_caller() -> None:
    (reply, ran), context = await call((("authorization", f"Bearer {GOOD}"),))
    assert reply == "reply" and ran == ["alice"] and context.aborted is None


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "missing"),
        ((("authorization", GOOD),), "malformed"),
        ((("authorization", "Bearer "),), "malformed"),
        ((("authorization", "Bearer " + "b" * 24),), "invalid"),
        ((("authorization", "Bearer " + GOOD[:-1]),), "invalid"),  # the wrong length
        ((("authorization", "Bearer " + GOOD * 3),), "invalid"),
    ],
)
async def test_anything_else_is_unauthenticated_before_the_handler(
    metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    before = refused(reason)
    (reply, ran), context = await call(metadata)
    assert reply is None and ran == []
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert refused(reason) == before + 1


async def test_the_health_check_needs_no_token() -> None:
    (reply, _), context = await call((), "/grpc.health.v1.Health/Check")
    assert reply == "reply" and context.aborted is None


def test_token_entries_are_checked_and_never_shown() -> None:
    assert parse_tokens(["alice:" + GOOD, "b" * 16], "X") == {GOOD: "alice", "b" * 16: "client2"}
    for bad in (["short"], ["bad name:" + GOOD], [GOOD, GOOD], ["x:tok en" + GOOD]):
        with pytest.raises(ValueError) as err:
            parse_tokens(bad, "X")
        assert GOOD not in str(err.value) and "short" not in str(err.value)


def test_a_token_file_with_comments(tmp_path: Any) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# the producer\nproducer:{GOOD}\n\nlocust:{'c' * 20}  # load\n")
    assert tokens_from(None, path) == {GOOD: "producer", "c" * 20: "locust"}
