"""The profiling port: a tiny HTTP server whose /debug/tasks dumps every asyncio task and
every thread with its stack (the Python answer to Go's goroutine profile). CPU and heap
profiles are taken from outside with py-spy and memray."""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import traceback

from daemons.sideport import TEXT, SidePort


def dump_tasks() -> str:
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out.write(f"# asyncio tasks: {len(tasks)}\n")
    for task in tasks:
        out.write(f"\n--- task {task.get_name()} ({'done' if task.done() else 'pending'})\n")
        coro = task.get_coro()
        out.write(f"    coro: {getattr(coro, '__qualname__', coro)!s}\n")
        for frame in task.get_stack():
            for line in traceback.format_stack(frame, limit=1):
                out.write(line)
    frames = sys._current_frames()
    out.write(f"\n# threads: {len(frames)}\n")
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in frames.items():
        out.write(f"\n--- thread {names.get(ident, '?')} ({ident})\n")
        out.write("".join(traceback.format_stack(frame)))
    return out.getvalue()


async def _tasks_page() -> tuple[str, bytes]:
    return TEXT, dump_tasks().encode()


async def serve(host: str, port: int, read_timeout_s: float, max_connections: int) -> SidePort:
    """The profiling port (0 = off): /debug/tasks (and Go's name for it)."""
    routes = {"/debug/tasks": _tasks_page, "/debug/pprof/goroutine": _tasks_page}
    side = SidePort(routes, read_timeout_s, max_connections, "try /debug/tasks\n")
    return await side.start(host, port)
