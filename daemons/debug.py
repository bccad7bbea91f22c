"""The profiling port: a tiny HTTP server whose /debug/tasks dumps every asyncio task and
every thread with its stack (the Python answer to Go's goroutine profile). CPU and heap
profiles are taken from outside with py-spy and memray."""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import traceback


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


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await asyncio.wait_for(reader.readline(), 5)
        parts = request.decode("latin-1").split()
        path = parts[1] if len(parts) >= 2 else ""
        if path.split("?")[0] in ("/debug/tasks", "/debug/pprof/goroutine"):
            status, body = "200 OK", dump_tasks()
        else:
            status, body = "404 Not Found", "try /debug/tasks\n"
        data = body.encode()
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> asyncio.Server | None:
    if not port:
        return None
    return await asyncio.start_server(_handle, host, port)
