"""Who may submit (issue 16): bearer tokens checked in constant time by one server
interceptor, and the caller's name for the limiter's fairness.

With tokens configured (CONSUMER_AUTH_TOKENS or CONSUMER_AUTH_TOKEN_FILE), every RPC
but the standard health check (which load balancers and the producer's channel make
without credentials, and which tells nothing) must carry `authorization: Bearer
<token>`; anything else is UNAUTHENTICATED before the servicer runs, so nothing is
written, and counted by reason. Client certificates (CONSUMER_TLS_CLIENT_CA) are
checked by TLS itself; their common name then names the caller.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from daemons import metrics

BEARER = "bearer "
EXEMPT_PREFIX = "/grpc.health.v1.Health/"

# The authenticated caller of the RPC being served ("" = anonymous), for the limiter.
caller: ContextVar[str] = ContextVar("caller", default="")


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class Authenticate(AsyncServerInterceptor):
    """UNAUTHENTICATED unless the call carries one of the tokens (when tokens are
    configured); sets `caller` to the token's name, or the client certificate's common
    name. Every token is compared, each in constant time on digests of equal length, so
    neither the time nor the length of a guess tells anything."""

    def __init__(self, tokens: dict[str, str], names_from_certificates: bool = False) -> None:
        self._tokens = [(_digest(t.encode()), name) for t, name in tokens.items()]
        self._certificates = names_from_certificates

    async def intercept(
        self,
        method: Callable[..., Any],
        request: Any,
        context: grpc.aio.ServicerContext,
        method_name: str,
    ) -> Any:
        if not method_name.startswith(EXEMPT_PREFIX):
            if self._tokens:
                caller.set(await self._check(context))
            elif self._certificates:
                caller.set(_common_name(context))
        reply = method(request, context)
        if hasattr(reply, "__aiter__"):
            return reply
        return await reply

    async def _check(self, context: grpc.aio.ServicerContext) -> str:
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
        if header is None:
            await self._refuse(context, "missing", "no `authorization: Bearer <token>` metadata")
        if header[: len(BEARER)].lower() != BEARER or not header[len(BEARER) :].strip():
            await self._refuse(context, "malformed", "authorization is not `Bearer <token>`")
        digest = _digest(header[len(BEARER) :].strip().encode())
        name = None
        for expected, who in self._tokens:  # no early exit: the same work for any guess
            if hmac.compare_digest(digest, expected):
                name = who
        if name is None:
            await self._refuse(context, "invalid", "unknown token")
        return name

    @staticmethod
    async def _refuse(context: grpc.aio.ServicerContext, reason: str, detail: str) -> NoReturn:
        metrics.auth_refused[reason].inc()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)
        raise AssertionError("abort raises")  # for the type checker


def _common_name(context: grpc.aio.ServicerContext) -> str:
    names: list[bytes] = context.auth_context().get("x509_common_name") or [b""]
    return names[0].decode(errors="replace")
