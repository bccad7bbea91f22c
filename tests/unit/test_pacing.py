"""Group commit in the consumer's writers: statements start at least a gap apart unless
enough work waits, and a lone request after a quiet spell waits for nothing.

The pacing is judged on an event loop with a virtual clock, not on the wall clock:
bounds of 10-20 ms of real time were the likeliest flakes on a loaded 2-core machine.
Each test also runs its scenario with no gap, where the pacing assertions must fail."""

from __future__ import annotations

import asyncio
import logging

import pytest

from daemons import engine as eng
from daemons.outage import Outage
from tests.virtual_clock import run

GAP_S = 0.02


async def spaced(gap_s: float) -> tuple[float, float, float]:
    """When three statements start: after a quiet spell, too soon, and too soon but full."""
    loop = asyncio.get_running_loop()
    pacer = eng.Pacer(gap_s, full=10)
    await pacer.wait(lambda: 2)
    first = loop.time()
    await pacer.wait(lambda: 2)
    second = loop.time()
    await pacer.wait(lambda: 10)
    return first, second, loop.time()


def test_pacer_spaces_statements_unless_full() -> None:
    first, second, third = run(spaced(GAP_S))
    assert first == 0.0  # the first after a quiet spell: at once
    assert second - first == pytest.approx(GAP_S)  # concurrent, not full: waits out the gap
    assert third == second  # full: at once


def test_pacer_spacing_needs_the_gap() -> None:
    first, second, _ = run(spaced(0.0))
    assert not second - first == pytest.approx(GAP_S)


async def waits(gap_s: float, waiting: int, statements: int = 5) -> float:
    """How long `statements` statements of `waiting` items each take to start."""
    loop = asyncio.get_running_loop()
    pacer = eng.Pacer(gap_s, full=10)
    for _ in range(statements):
        await pacer.wait(lambda: waiting)
    return loop.time()


def test_pacer_does_not_delay_a_lone_caller() -> None:
    """One item per statement, one statement at a time: nothing to gather by waiting,
    while the same pacer does space statements that two items wait for."""
    assert run(waits(GAP_S, waiting=1)) == 0.0
    assert run(waits(GAP_S, waiting=2)) == pytest.approx(4 * GAP_S)
    assert run(waits(0.0, waiting=2)) == 0.0  # the contrast needs the gap


async def trickle(gap_s: float) -> tuple[list[int], float]:
    """200 single-item requests, 1 ms apart, against statements of 2 ms: the batch
    sizes the coalescer made, and how long it all took."""
    batches: list[int] = []

    async def statement(items: list[int]) -> list[int | None]:
        batches.append(len(items))
        await asyncio.sleep(0.002)
        return list(items)

    outage = Outage("test", logging.getLogger("test"))
    co: eng.Coalescer[int, int] = eng.Coalescer(
        "test", statement, lambda rows: None, outage, min_gap_s=gap_s
    )
    loop = asyncio.get_running_loop()
    runner = loop.create_task(co.run_forever())
    try:
        calls = []
        for i in range(200):
            calls.append(loop.create_task(co.submit([i])))
            await asyncio.sleep(0.001)
        results = await asyncio.gather(*calls)
    finally:
        runner.cancel()
    assert results == [[i] for i in range(200)]  # each caller gets its own row back
    assert sum(batches) == 200 and not outage.active
    return batches, loop.time()


def test_coalescer_batches_single_requests_that_trickle_in() -> None:
    """With a 20 ms gap, about one statement per gap carrying ~20 items; with no pacing,
    statements carry one or two items (checked below)."""
    batches, took = run(trickle(GAP_S))
    assert len(batches) <= took / GAP_S + 2, (took, batches)
    assert sum(batches) / len(batches) >= 10, batches


def test_coalescer_batching_needs_the_gap() -> None:
    batches, took = run(trickle(0.0))
    assert len(batches) > took / GAP_S + 2
    assert sum(batches) / len(batches) < 3, batches
