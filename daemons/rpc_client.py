"""The producer's gRPC channel: round_robin over every target, client-side health
checking, and one interceptor recording handled RPCs and latency per method.

grpc-interceptor offers no asyncio *client* interceptor, so this one implements
grpc.aio's interface directly (the server side uses grpc-interceptor)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc

from daemons import metrics

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVICE_CONFIG = json.dumps(
    {
        # Several targets (ipv4:a,b or dns:///name) are spread by gRPC itself; a consumer
        # that reports NOT_SERVING on the health service stops receiving work.
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "tasks.v1.Consumer"},
    }
)


class ClientMetrics(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        method = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
        start = time.perf_counter()
        call = await continuation(client_call_details, request)
        try:
            await call
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            metrics.rpc_client.record(method, code.name, time.perf_counter() - start)
        return call


def channel(
    target: str,
    ca_pem: bytes | None = None,
    server_name: str | None = None,
    client_pair: tuple[bytes, bytes] | None = None,
) -> grpc.aio.Channel:
    """A channel to the consumer(s); TLS when `ca_pem` is given, with a client
    certificate when `client_pair` (key, certificate chain) is."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 0),  # the producer retries itself, from the database
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # gRPC's default reconnect backoff grows to 120 s: after a few consumer restarts
        # the producer would sit idle long after the consumer is back.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if ca_pem is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=[ClientMetrics()])
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    key, chain = client_pair or (None, None)
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key, certificate_chain=chain
    )
    return grpc.aio.secure_channel(target, creds, options=options, interceptors=[ClientMetrics()])
