"""The consumer's engine with its writer loops, for the tests of every tier that drive
it directly (on the in-memory store or on PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from daemons import engine as eng
from daemons.store import TaskStore

Loops = list[asyncio.Task[None]]


async def start_engine(
    store: TaskStore, probe_s: float | None = None, **kw: Any
) -> tuple[eng.Engine, Loops]:
    """An engine seeded from `store`, its writers running (and the outage probe, every
    `probe_s`, when given). Generous limits unless `kw` says otherwise."""
    params: dict[str, Any] = dict(rate_limit=10_000, rate_period_s=1.0, max_in_flight=10_000)
    params.update(kw)
    engine = eng.Engine(store, **params)
    await engine.seed()
    loops = [
        asyncio.create_task(engine.marker.run_forever()),
        asyncio.create_task(engine.registrar.run_forever()),
        asyncio.create_task(engine.done_writer()),
    ]
    if probe_s is not None:
        loops.append(asyncio.create_task(engine.db_probe(probe_s)))
    return engine, loops


async def stop_loops(loops: Loops) -> None:
    for t in loops:
        t.cancel()
    await asyncio.gather(*loops, return_exceptions=True)


async def until(pred: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll on the loop's clock (virtual in the unit tier, so seconds of work take none)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
