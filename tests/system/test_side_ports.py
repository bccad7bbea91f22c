"""Side ports that cannot be held hostage (issue 16): idle connections to the metrics
and profiling ports are cut after the read timeout, at most a bounded number are
served at once, and meanwhile gRPC and the database carry on."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import grpc

from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from tests.conftest import states
from tests.system.harness import Bundle, wait_until

IDLE = 300
READ_TIMEOUT_S = 2.0


def _threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def _closed_by_peer(sock: socket.socket) -> bool:
    """EOF from the consumer (after a 503 answer, for those beyond the bound)."""
    try:
        while sock.recv(4096):
            pass
        return True
    except BlockingIOError:
        return False  # still open, nothing to read
    except OSError:
        return True  # reset


def test_idle_connections_to_the_metrics_port_are_cut_and_work_goes_on(bundle: Bundle) -> None:
    consumer = bundle.consumer(
        CONSUMER_HTTP_READ_TIMEOUT=str(READ_TIMEOUT_S),
        CONSUMER_HTTP_MAX_CONNECTIONS="32",
        CONSUMER_WORK_SCALE="0",
    )
    port = bundle.ports["CONSUMER_METRICS_PORT"]
    before = _threads_and_fds(consumer.pid)
    idle = []
    for _ in range(IDLE):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        idle.append(sock)
    # While they are held: gRPC answers, tasks reach done in the database.
    with grpc.insecure_channel(f"127.0.0.1:{bundle.grpc_port}") as channel:
        stub = tasks_pb2_grpc.ConsumerStub(channel)
        for _ in range(20):
            reply = stub.Submit(
                tasks_pb2.SubmitRequest(task=tasks_pb2.Task(type=1, value=1)), timeout=5
            )
            assert reply.status == tasks_pb2.TASK_STATUS_ACCEPTED
    wait_until(lambda: states(bundle.db_url)["done"] >= 20, 10, "tasks done while ports are held")
    threads, fds = _threads_and_fds(consumer.pid)
    # No thread per connection; at most max_connections of them still open.
    assert threads <= before[0] + 2, (before, threads)
    assert fds <= before[1] + 32 + 10, (before, fds)
    # Every idle connection is closed by the consumer within the read timeout (plus slack).
    wait_until(
        lambda: all(_closed_by_peer(s) for s in idle), READ_TIMEOUT_S + 5, "idle connections cut"
    )
    for sock in idle:
        sock.close()
    t0 = time.monotonic()
    body = urllib.request.urlopen(bundle.metrics_url("consumer"), timeout=5).read().decode()
    assert time.monotonic() - t0 < 1.0
    assert "tasks_done_total" in body
    assert _threads_and_fds(consumer.pid)[1] <= before[1] + 5


def test_profiling_port_answers_and_cuts_slow_clients(bundle: Bundle) -> None:
    bundle.consumer(CONSUMER_HTTP_READ_TIMEOUT="1", CONSUMER_HTTP_MAX_CONNECTIONS="2")
    base = f"http://127.0.0.1:{bundle.ports['CONSUMER_PROFILING_PORT']}"
    assert (
        "# asyncio tasks:"
        in urllib.request.urlopen(base + "/debug/tasks", timeout=5).read().decode()
    )
    port = bundle.ports["CONSUMER_PROFILING_PORT"]
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    for sock in held:
        sock.sendall(b"GET /debug/tas")  # a request that never ends
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
        extra.sendall(b"GET /debug/tasks HTTP/1.0\r\n\r\n")
        assert extra.recv(100).startswith(b"HTTP/1.0 503")
    for sock in held:
        sock.settimeout(3)
        assert sock.recv(100) == b""  # cut after the read timeout, nothing answered
        sock.close()
    with urllib.request.urlopen(base + "/debug/tasks", timeout=5) as resp:
        assert resp.status == 200
