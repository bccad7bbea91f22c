"""A TCP proxy in front of PostgreSQL that loses replies on purpose: it forwards a chosen
statement to the server, lets the server run and commit it, and then cuts the
connection instead of passing the answer back. To the client that is a statement whose
outcome it cannot know, the case a retry must get right.

It reads the client's side of the wire protocol only as far as it must: the message
frames, the query text of `Parse` (named or not, since psycopg prepares statements it
runs often) and of simple `Query` messages, and which statement each `Bind` runs. A
statement is "chosen" when its text contains `marker` and the countdown says so.
With `hold_s`, every statement containing `marker` also waits that long before it is
passed on: a slow writer, whose work piles up between its statements."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

READY_FOR_QUERY = b"Z\x00\x00\x00\x05"  # the server's answer ends, after the commit


@dataclass
class _Conn:
    client: socket.socket
    server: socket.socket
    statements: dict[bytes, bytes] = field(default_factory=dict)  # name -> query text
    doomed: bool = False  # the next answer's end cuts the connection


class ReplyDropper:
    def __init__(
        self, upstream_port: int, marker: str, every: int, limit: int, hold_s: float = 0.0
    ) -> None:
        """Lose the reply of every `every`-th run of a statement containing `marker`,
        `limit` times at most."""
        self.upstream = ("127.0.0.1", upstream_port)
        self.marker = marker.encode()
        self.every, self.limit = every, limit
        self.hold_s = hold_s
        self.seen = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db_url: str, upstream_port: int) -> str:
        return db_url.replace(f":{upstream_port}/", f":{self.port}/")

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            conn = _Conn(client, server)
            threading.Thread(target=self._client_to_server, args=(conn,), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(conn,), daemon=True).start()

    def _choose(self, query: bytes) -> bool:
        if self.marker not in query:
            return False
        with self._lock:
            self.seen += 1
            if self.dropped < self.limit and self.seen % self.every == 0:
                self.dropped += 1
                return True
        return False

    def _client_to_server(self, conn: _Conn) -> None:
        buf = b""
        started = False
        try:
            while data := conn.client.recv(65536):
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
                        started = code not in (80877103, 80877104)  # SSL, GSS: another follows
                        out += msg
                        continue
                    if len(buf) < 5:
                        break
                    (n,) = struct.unpack("!I", buf[1:5])
                    if len(buf) < n + 1:
                        break
                    msg, buf = buf[: n + 1], buf[n + 1 :]
                    if self._inspect(conn, msg) and self.hold_s:
                        time.sleep(self.hold_s)
                    out += msg
                if out:
                    conn.server.sendall(out)
        except OSError:
            pass
        finally:
            _close(conn)

    def _inspect(self, conn: _Conn, msg: bytes) -> bool:
        """Note what the message runs; True if it runs a statement with the marker."""
        kind, body = msg[:1], msg[5:]
        if kind == b"P":  # Parse: name \0 query \0 ...
            name, _, rest = body.partition(b"\0")
            conn.statements[name] = rest.partition(b"\0")[0]
            return False
        if kind == b"B":  # Bind: portal \0 statement \0 ...
            query = conn.statements.get(body.partition(b"\0")[2].partition(b"\0")[0], b"")
        elif kind == b"Q":
            query = body
        else:
            return False
        if self._choose(query):
            conn.doomed = True
        return self.marker in query

    def _server_to_client(self, conn: _Conn) -> None:
        try:
            while data := conn.server.recv(65536):
                if conn.doomed and READY_FOR_QUERY in data:
                    break  # the statement ran and committed; its answer is lost
                conn.client.sendall(data)
        except OSError:
            pass
        finally:
            _close(conn)


def _close(conn: _Conn) -> None:
    for s in (conn.client, conn.server):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
