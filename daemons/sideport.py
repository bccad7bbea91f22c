"""The daemons' side ports (metrics, profiling): a small HTTP/1.0 server on the event loop
that cannot be held hostage.

prometheus_client's own server gives every connection a thread and never times a read
out: 300 idle connections to the consumer's metrics port took it from 13 threads and 25
file descriptors to 313 and 325, for as long as the clients wished, until it could open
neither database connections nor gRPC ones. Here a connection costs a coroutine, must
send its request head within `read_timeout_s` (then it is closed), and at most
`max_connections` are served at once: one more is answered 503 and closed at once.
One request per connection (HTTP/1.0, `Connection: close`), GET only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from daemons.errors import DaemonError

MAX_HEAD_BYTES = 8192  # a scraper's request head is a few hundred bytes
# (content type, body) for a path; returns None for "not here" (404).
Route = Callable[[], Awaitable[tuple[str, bytes]]]
TEXT = "text/plain; charset=utf-8"


@dataclass
class SidePort:
    routes: Mapping[str, Route]
    read_timeout_s: float = 5.0
    max_connections: int = 64
    not_found: str = "not found\n"
    active: int = 0  # connections being served now
    refused: int = 0  # connections answered 503 because `max_connections` were open
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            self.refused += 1
            await self._reply(writer, "503 Service Unavailable", TEXT, b"too many connections\n")
            return
        self.active += 1
        try:
            status, ctype, body = await asyncio.wait_for(self._serve(reader), self.read_timeout_s)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            writer.close()  # idle, too slow, or not HTTP: nothing to answer
            return
        finally:
            self.active -= 1
        await self._reply(writer, status, ctype, body)

    async def _serve(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        """Read the whole request head (within the caller's timeout), then route it."""
        head = await _read_head(reader)
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", TEXT, b"GET only\n"
        route = self.routes.get(parts[1].split("?", 1)[0])
        if route is None:
            return "404 Not Found", TEXT, self.not_found.encode()
        ctype, body = await route()
        return "200 OK", ctype, b"" if parts[0] == "HEAD" else body

    async def _reply(
        self, writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes
    ) -> None:
        head = (
            f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            # A client that does not read its answer is cut off like one that does not ask.
            await asyncio.wait_for(writer.drain(), self.read_timeout_s)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self, host: str, port: int) -> SidePort:
        """Listen on host:port (port 0 = off)."""
        if port:
            try:
                self.server = await asyncio.start_server(
                    self.handle, host, port, limit=MAX_HEAD_BYTES
                )
            except OSError as exc:
                raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers; a head longer than MAX_HEAD_BYTES is a ValueError
    (asyncio's LimitOverrunError)."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise ValueError("request head too long") from exc
