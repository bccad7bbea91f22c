"""The maintenance loop both daemons run: done partitions made ahead of need, done
partitions older than TASKS_RETENTION removed whole, and the hot partition vacuumed.

Any number of daemons may run it at once: a pass takes an advisory lock, and a daemon
that does not get it only refreshes its gauges. Removal works on whole done partitions
(detach without blocking writers, then drop), so it costs nothing per row and can never
touch a `received` or `processing` task, which live in another partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from daemons import metrics
from daemons.lifecycle import Lifecycle
from daemons.logs import fields
from daemons.outage import Outage
from daemons.store import TRANSIENT_ERRORS, MaintenanceReport, Store

log = logging.getLogger("daemons.maintenance")

PARTITIONS_PER_RETENTION = 12  # removal lags retention by at most 1/12 of it
MIN_PARTITION_S = 60.0  # fewer, larger partitions below this: planning cost per partition
MAX_PARTITION_S = 86400.0  # and with no retention (keep all): a partition a day
MIN_AHEAD_S = 600.0  # partitions exist at least ten minutes ahead of the clock


def partition_width_s(retention_s: float) -> float:
    if retention_s <= 0:
        return MAX_PARTITION_S
    return min(MAX_PARTITION_S, max(MIN_PARTITION_S, retention_s / PARTITIONS_PER_RETENTION))


def ahead_s(width_s: float) -> float:
    return max(MIN_AHEAD_S, 2 * width_s)


class Maintenance:
    def __init__(self, store: Store, retention_s: float, interval_s: float) -> None:
        self.store = store
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.width_s = partition_width_s(retention_s)
        self.ahead_s = ahead_s(self.width_s)
        self.passes = 0
        self.dropped = 0
        self.outage = Outage("maintenance", log)
        store.partition_s = self.width_s
        metrics.retention_seconds.set(retention_s)

    async def run_once(self) -> MaintenanceReport:
        t0 = time.perf_counter()
        report = await self.store.maintain(self.width_s, self.ahead_s, self.retention_s)
        if report.maintainer:
            metrics.maintenance_seconds.observe(time.perf_counter() - t0)
            self.passes += 1
        if report.dropped:
            self.dropped += len(report.dropped)
            metrics.partitions_dropped.inc(len(report.dropped))
            metrics.retention_rows_removed.inc(report.dropped_rows)
            log.info(
                "retention_removed",
                extra=fields(partitions=len(report.dropped), tasks=report.dropped_rows),
            )
        if report.created:
            log.debug("partitions_created", extra=fields(partitions=report.created))
        self._gauges(report)
        return report

    def _gauges(self, report: MaintenanceReport) -> None:
        parts, now = report.partitions, report.db_now
        metrics.partitions_stored.set(len(parts))
        metrics.partitions_ahead.set(sum(1 for p in parts if p.lower > now))
        if parts:
            oldest = parts[0]
            start = oldest.lower or oldest.upper  # the pre-partitioning one: its end
            metrics.oldest_done_age.set(max(0.0, now - start))
        else:
            metrics.oldest_done_age.set(0)

    async def run_forever(self) -> None:
        """A pass that fails for a transient reason (database away, a lock or statement
        timeout) is logged once per episode and tried again next interval."""
        while True:
            try:
                await self.run_once()
            except TRANSIENT_ERRORS as exc:  # lock and statement timeouts are among them
                self.outage.failing(exc)
            else:
                self.outage.ok()
            await asyncio.sleep(self.interval_s)


class _Settings(Protocol):
    @property
    def tasks_retention(self) -> float: ...

    @property
    def maintenance_interval(self) -> float: ...


def spawn(lifecycle: Lifecycle, store: Store, settings: _Settings) -> Maintenance | None:
    """Start the loop as a watched background task, unless the interval is 0."""
    if not settings.maintenance_interval:
        return None
    job = Maintenance(store, settings.tasks_retention, settings.maintenance_interval)
    lifecycle.spawn("maintenance", job.run_forever())
    return job
