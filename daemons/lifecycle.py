"""Signals, stop event and watched background tasks.

The first SIGTERM/SIGINT sets `stopping` (a graceful drain follows); a second one exits
at once. A watched background task that dies sets `failure` and `stopping`, so the daemon
stops loudly with a non-zero status instead of hanging half-alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any

from daemons.logs import fields

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Lifecycle:
    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.failure: BaseException | None = None
        self.signals = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("stop_requested", extra=fields(signal=sig.name))
            self.stopping.set()
        else:
            log.warning("second_signal_exit_now", extra=fields(signal=sig.name))
            logging.shutdown()
            os._exit(128 + sig)

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a named, watched background task."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)
        return task

    def watch(self, task: asyncio.Task[Any]) -> None:
        """Stop the daemon if this short-lived task dies with an error."""
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.failure is None:
            self.failure = exc
            log.critical(
                "background_task_died",
                extra=fields(task=task.get_name(), error=repr(exc)),
                exc_info=exc,
            )
            self.stopping.set()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
