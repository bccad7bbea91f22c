"""The redelivery sweep: every interval, `processing` tasks whose lease expired (their
consumer died mid-work) go back to `received`, and `received` tasks nobody touched for
a while (refused, lost, or their producer died) are claimed. Both come back restamped,
so the next sweep passes them by, and several daemons sweeping at once never claim the
same rows (FOR UPDATE SKIP LOCKED). What is claimed goes to `deliver`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from daemons.outage import Outage
from daemons.store import TRANSIENT_ERRORS, TaskRow, TaskStore


class SweepSettings(Protocol):
    @property
    def lease_timeout(self) -> float: ...
    @property
    def redeliver_after(self) -> float: ...
    @property
    def sweep_interval(self) -> float: ...


class Sweep:
    def __init__(
        self,
        store: TaskStore,
        *,
        lease_s: float,
        stale_s: float,
        limit: int,
        interval_s: float,
        log: logging.Logger,
    ) -> None:
        self.store = store
        self.lease_s = lease_s
        self.stale_s = stale_s
        self.limit = limit  # of each kind, per sweep
        self.interval_s = interval_s
        self.outage = Outage("sweep", log)

    @classmethod
    def configured(
        cls, store: TaskStore, s: SweepSettings, *, limit: int, log: logging.Logger
    ) -> Sweep:
        """A daemon's sweep from its settings (PRODUCER_* or CONSUMER_*)."""
        return cls(
            store,
            lease_s=s.lease_timeout,
            stale_s=s.redeliver_after,
            limit=limit,
            interval_s=s.sweep_interval,
            log=log,
        )

    async def once(self) -> list[TaskRow]:
        rows = await self.store.reclaim_expired(self.lease_s, self.limit)
        rows += await self.store.claim_stale_received(self.stale_s, self.limit)
        return rows

    async def run_forever(self, deliver: Callable[[list[TaskRow]], None]) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                rows = await self.once()
            except TRANSIENT_ERRORS as exc:
                self.outage.failing(exc)
                continue
            self.outage.ok()
            deliver(rows)
