"""An outage, reported once: `<what>_failing` at its first failure with the error, and
`<what>_recovered after_s=...` at its end, however many failures come between.

A database away for a minute fails thousands of batches; one line per batch buried the
start and the end of the episode, which are what an operator (and the runbook) looks for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from daemons.logs import fields

ERROR_CHARS = 300  # a driver's error can carry a whole query; the first lines say why


class Outage:
    def __init__(
        self,
        what: str,
        log: logging.Logger,
        on_change: Callable[[bool], None] | None = None,
        settle_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.log = log
        # Told at both edges of an episode (True: recovered), not on every failure.
        self.on_change = on_change
        # A success ends the episode only this long after its last failure: with some
        # writes failing and others not (a full disk fails the statements that need a
        # new page), one episode, not a flapping health.
        self.settle_s = settle_s
        self.clock = clock
        self.since: float | None = None  # clock() of the first failure
        self.last_failure = 0.0

    @property
    def active(self) -> bool:
        return self.since is not None

    def failing(self, error: object) -> None:
        self.last_failure = self.clock()
        if self.since is not None:
            return
        self.since = self.last_failure
        self.log.warning(
            f"{self.what}_failing", extra=fields(error=str(error).strip()[:ERROR_CHARS])
        )
        if self.on_change is not None:
            self.on_change(False)

    def ok(self) -> None:
        if self.since is None or self.clock() - self.last_failure < self.settle_s:
            return
        took = self.clock() - self.since
        self.since = None
        self.log.info(f"{self.what}_recovered", extra=fields(after_s=round(took, 2)))
        if self.on_change is not None:
            self.on_change(True)
