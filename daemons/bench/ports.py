"""Free TCP ports on 127.0.0.1 for private bundles (the benchmark, the tests).

A port from bind(("127.0.0.1", 0)) lies in the kernel's ephemeral range, and any
outgoing connection made before our daemon binds it (a client of PostgreSQL, say) may
take that very number as its source port: the daemon then fails with "address already
in use" (seen in `make bench`). So ports come from just below that range, checked free
by a bind, never the same one twice in a process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    low = _ephemeral_low()
    candidates = range(max(1024, low - 12_000), max(1025, low))
    for _ in range(200):
        port = random.choice(candidates)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _handed_out.add(port)
    return port
