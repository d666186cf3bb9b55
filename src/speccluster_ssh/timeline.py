"""An optional recorder of the phases of a start-up, for the benchmark.

The modules that connect to hosts, start agents, start the scheduler and
start workers call :func:`stamp` at each phase. Nothing is recorded unless a
:class:`Timeline` is active (see :func:`recording`), so the default costs
one global lookup per call. Stamps are ``time.monotonic()`` values, which on
Linux share one clock across the processes of a machine, so the bench can
put them beside its own times.

Phases stamped (``host`` is the inventory name, ``item`` a worker's name):

``ssh_connect`` / ``ssh_connected``
    Opening the SSH connection to a host, and done.
``agent_ready``
    The host's agent said hello and has the cluster's files.
``reach_probed``
    The ``auto`` scheduler-reach probe is done (head only).
``scheduler_ready``
    The scheduler runs (head only).
``lease_claimed``
    A worker entry's lease on its host was granted (``item`` is the entry's
    name); its processes start after this.
``start_request`` / ``forked``
    A worker's start request sent to its agent, and the agent's reply with
    its pid (the fork is done).
``worker_ready``
    The worker's process reported its server ready.
``worker_registered``
    The cluster heard from the scheduler that the worker registered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Timeline", "active", "recording", "stamp", "start", "stop"]


class Timeline:
    """Stamps of one start-up: ``(monotonic time, phase, host, item)``."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str, str]] = []
        self._lock = threading.Lock()  # the cluster's loop may run in another thread

    def stamp(self, phase: str, host: str = "", item: str = "") -> None:
        """Record ``phase`` now, for ``host`` and ``item`` (both optional)."""
        now = time.monotonic()
        with self._lock:
            self.events.append((now, phase, host, item))

    def as_list(self) -> list[dict[str, Any]]:
        """The stamps as JSON-able dicts, in time order."""
        with self._lock:
            events = sorted(self.events)
        return [{"t": t, "phase": p, "host": h, "item": i} for t, p, h, i in events]


_active: Timeline | None = None


def active() -> Timeline | None:
    """The timeline being recorded, if any."""
    return _active


def stamp(phase: str, host: str = "", item: str = "") -> None:
    """Record ``phase`` in the active timeline; does nothing when none is."""
    timeline = _active
    if timeline is not None:
        timeline.stamp(phase, host, item)


@contextmanager
def recording(timeline: Timeline | None = None) -> Iterator[Timeline]:
    """Record stamps into ``timeline`` (a new one by default) while the block runs."""
    global _active
    previous = _active
    _active = timeline if timeline is not None else Timeline()
    try:
        yield _active
    finally:
        _active = previous


def start(timeline: Timeline | None = None) -> Timeline:
    """Begin recording without a block (the bench's head process); :func:`stop` ends it."""
    global _active
    _active = timeline if timeline is not None else Timeline()
    return _active


def stop() -> Timeline | None:
    """Stop recording; the timeline recorded, if any."""
    global _active
    timeline, _active = _active, None
    return timeline
