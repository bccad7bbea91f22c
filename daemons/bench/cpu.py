"""CPU seconds of processes and process trees, for per-task CPU figures."""

from __future__ import annotations

import contextlib

import psutil


def cpu_of(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree: live processes plus children already reaped (their
    whole lifetime, through the parent's children_* times), so deltas are exact."""
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return float(total)
    except psutil.Error:
        return 0.0
