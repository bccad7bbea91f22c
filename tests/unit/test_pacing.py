"""Group commit in the consumer's writers: statements start at least a gap apart unless
enough work waits, and a lone request after a quiet spell waits for nothing."""

import asyncio

from daemons import engine as eng


async def test_pacer_spaces_statements_unless_full() -> None:
    loop = asyncio.get_running_loop()
    pacer = eng.Pacer(0.02, full=10)
    t0 = loop.time()
    await pacer.wait(lambda: 2)  # first after a quiet spell: at once
    first = loop.time() - t0
    await pacer.wait(lambda: 2)  # too soon, concurrent and not full: waits out the gap
    second = loop.time() - t0
    await pacer.wait(lambda: 10)  # full: at once
    third = loop.time() - t0
    assert first < 0.01
    assert second >= 0.019
    assert third - second < 0.01


async def test_pacer_does_not_delay_a_lone_caller() -> None:
    """One item per statement, one statement at a time: nothing to gather by waiting."""
    loop = asyncio.get_running_loop()
    pacer = eng.Pacer(0.02, full=10)
    t0 = loop.time()
    for _ in range(5):
        await pacer.wait(lambda: 1)
    assert loop.time() - t0 < 0.02


async def test_coalescer_batches_single_requests_that_trickle_in() -> None:
    """Single-item requests arriving about 1 ms apart against a statement of 2 ms: with
    no pacing, statements carry one or two items; with a 20 ms gap, many (a slow machine
    spreads the arrivals, so the bounds leave room)."""
    batches: list[int] = []

    async def run(items: list[int]) -> list[int | None]:
        batches.append(len(items))
        await asyncio.sleep(0.002)
        return list(items)

    states: list[bool] = []
    co: eng.Coalescer[int, int] = eng.Coalescer(
        "test", run, lambda rows: None, lambda ok, exc: states.append(ok), min_gap_s=0.02
    )
    runner = asyncio.create_task(co.run_forever())
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        calls = []
        for i in range(200):
            calls.append(asyncio.create_task(co.submit([i])))
            await asyncio.sleep(0.001)
        results = await asyncio.gather(*calls)
        took = loop.time() - t0
    finally:
        runner.cancel()
    assert results == [[i] for i in range(200)]  # each caller gets its own row back
    assert sum(batches) == 200
    # About one statement per 20 ms gap (the sleeps above last longer than asked).
    assert len(batches) <= took / 0.02 + 3, (took, batches)
    assert sum(batches) / len(batches) >= 3, batches
    assert all(states)
