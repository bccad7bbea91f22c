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
    ) -> None:
        self.what = what
        self.log = log
        # Told at both edges of an episode (True: recovered), not on every failure.
        self.on_change = on_change
        self.since: float | None = None  # time.monotonic() of the first failure

    @property
    def active(self) -> bool:
        return self.since is not None

    def failing(self, error: object) -> None:
        if self.since is not None:
            return
        self.since = time.monotonic()
        self.log.warning(
            f"{self.what}_failing", extra=fields(error=str(error).strip()[:ERROR_CHARS])
        )
        if self.on_change is not None:
            self.on_change(False)

    def ok(self) -> None:
        if self.since is None:
            return
        took = time.monotonic() - self.since
        self.since = None
        self.log.info(f"{self.what}_recovered", extra=fields(after_s=round(took, 2)))
        if self.on_change is not None:
            self.on_change(True)
