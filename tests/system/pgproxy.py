"""A TCP proxy on loopback in front of PostgreSQL, for the faults a network makes. One
proxy, two faults, each injected for real on the wire:

- Lost replies (`marker=`): it forwards a chosen statement to the server, lets the
  server run and commit it, and then cuts the connection instead of passing the answer
  back. To the client that is a statement whose outcome it cannot know, the case a retry
  must get right (exactly once, issue 14). With `hold_s`, every statement containing
  `marker` also waits that long before it is passed on: a slow writer, whose work piles
  up between its statements.
- Silence (`silence()`): every connection open at that moment goes silent. Nothing its
  client sends reaches the server any more and nothing is closed (the kernel still
  acknowledges, so TCP keepalives and tcp_user_timeout see a healthy peer: only a reply
  deadline can tell). Connections made afterwards work normally (issue 15).

To choose statements it reads the client's side of the wire protocol only as far as it
must: the message frames, the query text of `Parse` (named or not, since psycopg
prepares statements it runs often) and of simple `Query` messages, and which statement
each `Bind` runs. A statement is chosen when its text contains `marker` and the
countdown (every `every`-th, `limit` times at most) says so. Without a marker the bytes
pass as they come."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

READY_FOR_QUERY = b"Z\x00\x00\x00\x05"  # the server's answer ends, after the commit
NOT_A_STARTUP = (80877103, 80877104)  # SSL and GSS requests: the startup message follows


@dataclass
class _Link:
    client: socket.socket
    server: socket.socket
    statements: dict[bytes, bytes] = field(default_factory=dict)  # name -> query text
    doomed: bool = False  # the next answer's end cuts the connection
    silent: bool = False  # the client's bytes are swallowed; nothing is closed


class PgProxy:
    def __init__(
        self,
        upstream_port: int,
        marker: str = "",
        *,
        every: int = 1,
        limit: int = 0,
        hold_s: float = 0.0,
    ) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.upstream_port = upstream_port
        self.marker = marker.encode()
        self.every, self.limit = every, limit
        self.hold_s = hold_s
        self.seen = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closing = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def url(self, db_url: str) -> str:
        """`db_url` (of the upstream server) through this proxy."""
        return db_url.replace(f":{self.upstream_port}/", f":{self.port}/")

    def silence(self) -> int:
        """Make every connection open now silent; how many there were."""
        with self._lock:
            for link in self._links:
                link.silent = True
            return len(self._links)

    def close(self) -> None:
        self._closing = True
        # close() alone leaves a blocked accept() holding the socket open, listening for
        # the rest of the run; shutdown() wakes it.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for link in self._links:
                link.client.close()
                link.server.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            link = _Link(client, socket.create_connection(self.upstream))
            with self._lock:
                self._links.append(link)
            for pump in (self._client_to_server, self._server_to_client):
                threading.Thread(target=pump, args=(link,), daemon=True).start()

    def _choose(self, query: bytes) -> bool:
        if self.marker not in query:
            return False
        with self._lock:
            self.seen += 1
            if self.dropped < self.limit and self.seen % self.every == 0:
                self.dropped += 1
                return True
        return False

    def _client_to_server(self, link: _Link) -> None:
        buf = b""
        started = False
        try:
            while data := link.client.recv(65536):
                if link.silent:
                    continue  # swallowed: the client waits for a reply that never comes
                if not self.marker:
                    link.server.sendall(data)
                    continue
                buf += data
                out = b""
                while True:
                    if not started:  # startup, SSL or cancel request: length first, no type
                        if len(buf) < 4:
                            break
                        (n,) = struct.unpack("!I", buf[:4])
                        if len(buf) < n:
                            break
                        msg, buf = buf[:n], buf[n:]
                        code = struct.unpack("!I", msg[4:8])[0] if n >= 8 else 0
                        started = code not in NOT_A_STARTUP
                        out += msg
                        continue
                    if len(buf) < 5:
                        break
                    (n,) = struct.unpack("!I", buf[1:5])
                    if len(buf) < n + 1:
                        break
                    msg, buf = buf[: n + 1], buf[n + 1 :]
                    if self._inspect(link, msg) and self.hold_s:
                        time.sleep(self.hold_s)
                    out += msg
                if out:
                    link.server.sendall(out)
        except OSError:
            pass
        finally:
            _close(link)

    def _inspect(self, link: _Link, msg: bytes) -> bool:
        """Note what the message runs; True if it runs a statement with the marker."""
        kind, body = msg[:1], msg[5:]
        if kind == b"P":  # Parse: name \0 query \0 ...
            name, _, rest = body.partition(b"\0")
            link.statements[name] = rest.partition(b"\0")[0]
            return False
        if kind == b"B":  # Bind: portal \0 statement \0 ...
            query = link.statements.get(body.partition(b"\0")[2].partition(b"\0")[0], b"")
        elif kind == b"Q":
            query = body
        else:
            return False
        if self._choose(query):
            link.doomed = True
        return self.marker in query

    def _server_to_client(self, link: _Link) -> None:
        try:
            while data := link.server.recv(65536):
                if link.doomed and READY_FOR_QUERY in data:
                    break  # the statement ran and committed; its answer is lost
                link.client.sendall(data)
        except OSError:
            pass
        finally:
            _close(link)


def _close(link: _Link) -> None:
    """Both ends, unless the link is silent: then its server session lingers, as behind a
    real partition, until the server's own timeouts end it."""
    if link.silent:
        return
    for s in (link.client, link.server):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
