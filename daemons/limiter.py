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

    def acquire(self, wanted: int) -> int:
        """Admit up to `wanted` tasks now; returns how many were admitted (maybe 0)."""
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
