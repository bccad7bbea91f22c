"""Load generator for the benchmark's single-task RPC figure (run by `daemons.bench`).

    python -m daemons.bench.rpc_load --target 127.0.0.1:50051 --concurrency 32 \\
        --warmup 2 --seconds 10 --latencies /tmp/lat.bin

N concurrent callers on one grpc.aio channel each send unary `Submit` calls back to
back, with tasks of id 0 (the consumer registers them itself). Calls that *start* in
the measurement window count; their latencies (seconds, float64) go to `--latencies`
so that several generator processes can be merged exactly. Prints one JSON line.

When `h2load` (nghttp2) is on PATH the benchmark prefers it: a Python generator needs
about as much CPU per call as the consumer itself and, on two cores, takes it from the
consumer and PostgreSQL. The helpers below build its command and read its log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from array import array
from typing import Any

import grpc

from daemons.bench.measure import percentiles_ms
from daemons.rpc.tasks.v1 import tasks_pb2, tasks_pb2_grpc


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(args.target)
    await asyncio.wait_for(channel.channel_ready(), 30)
    stub = tasks_pb2_grpc.ConsumerStub(channel)
    lat = array("d")
    codes: dict[str, int] = {}
    start = time.perf_counter()
    t0 = start + args.warmup
    t1 = t0 + args.seconds

    async def caller(seed: int) -> None:
        rnd = random.Random(seed)
        while True:
            now = time.perf_counter()
            if now >= t1:
                return
            request = tasks_pb2.SubmitRequest(
                task=tasks_pb2.Task(id=0, type=rnd.randrange(10), value=rnd.randrange(100))
            )
            try:
                await stub.Submit(request, timeout=args.timeout)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            done = time.perf_counter()
            if now >= t0:
                lat.append(done - now)
                codes[code] = codes.get(code, 0) + 1

    try:
        await asyncio.gather(*(caller(i) for i in range(args.concurrency)))
    finally:
        await channel.close()
    ok = codes.get("OK", 0)
    pct = percentiles_ms(lat)
    wall = time.time() - time.perf_counter()
    return {
        "t0_wall": t0 + wall,
        "t1_wall": t1 + wall,
        "calls": len(lat),
        "ok": ok,
        "codes": codes,
        "seconds": args.seconds,
        "calls_per_s": len(lat) / args.seconds,
        "ok_per_s": ok / args.seconds,
        **{f"{p}_ms": ms for p, ms in pct.items()},
        "cpu_s": time.process_time(),
        "latencies": lat,
    }


# --- h2load: a C load generator, so that the generator leaves the CPU to the consumer ---

H2LOAD_HEADERS = ("content-type: application/grpc", "te: trailers")


def grpc_frame(task_type: int, value: int) -> bytes:
    """One unary `Submit` request as it goes on the wire: a gRPC length-prefixed message
    (flag 0 = uncompressed, 4-byte big-endian length, the protobuf)."""
    body = tasks_pb2.SubmitRequest(
        task=tasks_pb2.Task(id=0, type=task_type, value=value)
    ).SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def h2load_command(
    h2load: str,
    target: str,
    body: str,
    seconds: float,
    concurrency: int,
    procs: int,
    log_file: str | None = None,
) -> list[str]:
    """`concurrency` streams on each of `procs` connections (one thread each), for
    `seconds`, POSTing the same request to the consumer's `Submit` over cleartext HTTP/2:
    the same load as `procs` processes of the Python generator with that many callers."""
    cmd = [
        h2load,
        "--threads",
        str(procs),
        "--clients",
        str(procs),
        "--max-concurrent-streams",
        str(concurrency),
        "--duration",
        f"{max(1, round(seconds * 1000))}ms",
        "--data",
        body,
    ]
    for header in H2LOAD_HEADERS:
        cmd += ["--header", header]
    if log_file:
        cmd.append(f"--log-file={log_file}")
    return [*cmd, f"http://{target}/tasks.v1.Consumer/Submit"]


def read_h2load_log(path: str) -> tuple[list[float], float, float, int]:
    """(latencies in seconds, first start, last end (unix s), non-200 responses) from
    h2load's per-request log: start time (µs), HTTP status, duration (µs)."""
    lat: list[float] = []
    first, last, bad = float("inf"), 0.0, 0
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3:
                continue
            start, status, took = int(parts[0]) / 1e6, parts[1], int(parts[2]) / 1e6
            lat.append(took)
            first, last = min(first, start), max(last, start + took)
            bad += status != "200"
    return lat, first, last, bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m daemons.bench.rpc_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--target", required=True, help="consumer host:port")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent callers")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not counted")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of one call")
    parser.add_argument("--latencies", help="write measured latencies here (float64 s)")
    args = parser.parse_args(argv)
    report = asyncio.run(_run(args))
    lat = report.pop("latencies")
    if args.latencies:
        with open(args.latencies, "wb") as f:
            lat.tofile(f)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
