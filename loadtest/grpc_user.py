"""A reusable Locust user for gRPC services, after Locust's own gRPC example: the sync
stub on a gevent-aware gRPC core (never grpc.aio under gevent), and one client
interceptor that reports every call to Locust's statistics.

A call that fails with one of the user's `refused_codes` (RESOURCE_EXHAUSTED by
default: the server shedding load, as designed) is reported as a success under
"<method> (refused)", so load shedding is visible in the statistics without counting
as an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import grpc
import grpc.experimental.gevent as grpc_gevent
from grpc_interceptor import ClientInterceptor
from locust import User
from locust.env import Environment
from locust.exception import LocustError

# Importing locust has monkey-patched the standard library with gevent; gRPC's core must
# now be told to cooperate with it, and before the first channel exists.
grpc_gevent.init_gevent()

REQUEST_TYPE = "grpc"
REFUSED_SUFFIX = " (refused)"


def target(host: str) -> str:
    """A gRPC target from what Locust calls the host: `host:port`, also accepted with an
    http:// or grpc:// prefix (the web UI invites URLs)."""
    for scheme in ("grpc://", "http://", "https://"):
        if host.startswith(scheme):
            return host[len(scheme) :].rstrip("/")
    return host


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class LocustInterceptor(ClientInterceptor):
    """Fires Locust's request event once per call: name = the method's short name,
    response time in ms, response length in bytes, the exception if it failed."""

    def __init__(self, environment: Environment, refused_codes: frozenset[grpc.StatusCode]):
        self.env = environment
        self.refused_codes = refused_codes

    def intercept(
        self, method: Callable[..., Any], request_or_iterator: Any, call_details: Any
    ) -> Any:
        name = call_details.method.rsplit("/", 1)[-1]
        start = time.perf_counter()
        response = method(request_or_iterator, call_details)
        length, exception = 0, None
        try:
            length = response.result().ByteSize()
        except grpc.RpcError as exc:
            if exc.code() in self.refused_codes:
                name += REFUSED_SUFFIX
            else:
                exception = exc
        except Exception as exc:  # e.g. a request that does not serialise
            exception = exc
        self.env.events.request.fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            response=response,
            context={},
            exception=exception,
        )
        return response


class GrpcUser(User):
    """Subclass with `stub_class` (a generated *Stub) and a `host` ("host:port"); tasks
    call `self.stub.Method(request, timeout=self.timeout_s, metadata=self.metadata)` and
    catch grpc.RpcError (already reported by the interceptor). TLS when the run has a
    `tls_ca` option (optionally `tls_server_name`, and `grpc_client_cert` + `_key` for a
    client certificate), plaintext otherwise; a bearer token with `auth_token`."""

    abstract = True
    stub_class: ClassVar[type[Any] | None] = None
    refused_codes: ClassVar[frozenset[grpc.StatusCode]] = frozenset(
        {grpc.StatusCode.RESOURCE_EXHAUSTED}
    )
    timeout_s: ClassVar[float] = 10.0  # a hung server shows up as DEADLINE_EXCEEDED errors

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError("no host: pass --host HOST:PORT (the gRPC server's address)")
        if self.stub_class is None:
            raise LocustError(f"{type(self).__name__} needs a stub_class")
        # Own subchannel pool: each simulated user is a client with its own connection,
        # instead of every user sharing the process-wide one.
        options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
        opts = environment.parsed_options
        token = getattr(opts, "auth_token", None)
        # Sent with every call (`metadata=self.metadata`) to a consumer that wants tokens.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        ca = getattr(opts, "tls_ca", None)
        if ca:
            if getattr(opts, "tls_server_name", None):
                options.append(("grpc.ssl_target_name_override", opts.tls_server_name))
            cert = getattr(opts, "grpc_client_cert", None)
            key = getattr(opts, "grpc_client_key", None)
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ca),
                private_key=_read(key) if cert and key else None,
                certificate_chain=_read(cert) if cert and key else None,
            )
            self._channel = grpc.secure_channel(target(self.host), creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target(self.host), options=options)
        interceptor = LocustInterceptor(environment, self.refused_codes)
        self.stub = self.stub_class(grpc.intercept_channel(self._channel, interceptor))

    def on_stop(self) -> None:
        self._channel.close()
