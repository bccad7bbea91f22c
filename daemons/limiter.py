"""Rate limiter: at most `limit` tasks admitted in any window of `period_s` seconds.

A sliding log of (time, count) admissions: exact (never more than `limit` in any window,
unlike a fixed window or a token bucket, which both allow bursts of up to 2x at a window
edge) and cheap, because one entry records a whole admitted batch, not one task.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class SlidingWindowLimiter:
    def __init__(
        self, limit: int, period_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1 or period_s <= 0:
            raise ValueError("limit must be >= 1 and period_s > 0")
        self.limit = limit
        self.period_s = period_s
        self._clock = clock
        self._log: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.period_s
        log = self._log
        while log and log[0][0] <= horizon:
            self._used -= log.popleft()[1]

    def available(self) -> int:
        self._expire(self._clock())
        return self.limit - self._used

    def acquire(self, wanted: int, caller: str = "") -> int:
        """Admit up to `wanted` tasks now; returns how many were admitted (maybe 0).
        Every caller counts the same here (FairLimiter tells them apart)."""
        if wanted <= 0:
            return 0
        now = self._clock()
        self._expire(now)
        granted = min(wanted, self.limit - self._used)
        if granted > 0:
            self._used += granted
            log = self._log
            if log and log[-1][0] == now:
                log[-1] = (now, log[-1][1] + granted)
            else:
                log.append((now, granted))
        return granted


class FairLimiter:
    """The same limit for all callers together, shared fairly among the callers active
    in the last period: with N of them, none is admitted more than limit/N in a window
    (one caller alone still gets all of it), so a client hammering the consumer cannot
    take another's admissions. Callers are named by the authentication (a token's
    name, a client certificate's common name); unnamed calls share one name."""

    def __init__(
        self, limit: int, period_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = SlidingWindowLimiter(limit, period_s, clock)
        self.limit = limit
        self.period_s = period_s
        self._clock = clock
        self._callers: dict[str, tuple[SlidingWindowLimiter, float]] = {}  # name -> (log, seen)

    def available(self) -> int:
        return self.total.available()

    def acquire(self, wanted: int, caller: str = "") -> int:
        now = self._clock()
        horizon = now - self.period_s
        own, _ = self._callers.get(caller) or (
            SlidingWindowLimiter(self.limit, self.period_s, self._clock),
            now,
        )
        self._callers[caller] = (own, now)
        for name, (_, seen) in list(self._callers.items()):
            if seen <= horizon and name != caller:
                del self._callers[name]  # idle for a whole window: no longer sharing
        share = -(-self.limit // len(self._callers))  # ceil
        used = self.limit - own.available()
        granted = self.total.acquire(max(0, min(wanted, share - used)))
        own.acquire(granted)
        return granted
