"""An event loop with a virtual clock, for the unit tests of anything timed (pacing,
backoff, ticks): judged on the wall clock, bounds of a few milliseconds were the
likeliest flakes on a loaded 2-core machine."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock stands still while callbacks run and, when the loop
    would wait, jumps straight to its next timer: a sleep takes exactly as long as
    asked, in no real time. Nothing to wait for at all is a deadlock, and fails."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self.loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("deadlock: nothing ready and no timer pending")
        self.loop.now += timeout
        return super().select(0)


def run(coro: Coroutine[Any, Any, T]) -> T:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
