"""Process helpers shared by tests: kill what a test started, by PID only."""

from __future__ import annotations

import contextlib

import psutil


def kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and all its descendants (never by name)."""
    try:
        head = psutil.Process(pid)
        family = [*head.children(recursive=True), head]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
