"""Placement and capacity arithmetic: pure functions, no I/O.

A host offers ``slots`` spec entries. An entry is one dask worker, or a group
of ``nworkers`` workers. These functions decide where the next entry goes and
how many entries a request for workers, cores or memory needs.

Policies
--------
``spread`` (default)
    The host with the fewest entries in use, ties broken by inventory order:
    work lands on as many machines as possible.
``pack``
    The first host in inventory order with a free slot: machines fill up one
    after another, leaving whole machines free for others.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .inventory import HostSpec

POLICIES = ("spread", "pack")


@dataclass(frozen=True)
class EntryShape:
    """What one spec entry on a host provides.

    Parameters
    ----------
    host
        Inventory name of the host.
    workers
        Dask workers the entry starts (its group size).
    threads
        Threads per worker.
    memory
        Memory limit per worker in bytes (0 when unknown or "auto").
    """

    host: str
    workers: int
    threads: int
    memory: int

    @property
    def cores(self) -> int:
        return self.workers * self.threads

    @property
    def total_memory(self) -> int:
        return self.workers * self.memory


def choose_host(
    slots: Mapping[str, int],
    used: Mapping[str, int],
    unavailable: Collection[str] = (),
    policy: str = "spread",
) -> str | None:
    """The host for the next entry, or ``None`` when every usable slot is taken.

    Parameters
    ----------
    slots
        Slots per host, in inventory order.
    used
        Entries already placed per host.
    unavailable
        Hosts that are down or put aside.
    policy
        ``"spread"`` or ``"pack"``.
    """
    if policy not in POLICIES:
        raise ValueError(f"placement policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    free = [h for h, n in slots.items() if h not in unavailable and used.get(h, 0) < n]
    if not free:
        return None
    if policy == "pack":
        return free[0]
    order = {h: i for i, h in enumerate(slots)}
    return min(free, key=lambda h: (used.get(h, 0), order[h]))


@dataclass(frozen=True)
class Target:
    """At least this many workers, cores and bytes of memory (each optional)."""

    workers: int = 0
    cores: int = 0
    memory: int = 0

    def met_by(self, shapes: Sequence[EntryShape]) -> bool:
        return (
            sum(s.workers for s in shapes) >= self.workers
            and sum(s.cores for s in shapes) >= self.cores
            and sum(s.total_memory for s in shapes) >= self.memory
        )


def entries_to_add(
    current: Sequence[EntryShape],
    candidates: Sequence[EntryShape],
    target: Target,
) -> int:
    """How many of ``candidates`` (in order) to add so ``current`` meets ``target``.

    Whole entries only, so a group rounds the count up. Returns at most
    ``len(candidates)``: the caller reports that capacity ran out when the
    target is still not met.
    """
    shapes = list(current)
    for count in range(len(candidates) + 1):
        if target.met_by(shapes):
            return count
        if count < len(candidates):
            shapes.append(candidates[count])
    return len(candidates)


def entries_to_remove(
    current: Sequence[EntryShape],
    order: Sequence[int],
    target: Target,
) -> list[int]:
    """Indexes of entries to drop while what remains still meets ``target``.

    ``order`` lists indexes of ``current`` from most to least removable (for
    example not-yet-started entries first, then newest first). An entry is
    dropped only if the rest still meets the target, so groups are never split.
    """
    keep = set(range(len(current)))
    removed: list[int] = []
    for index in order:
        rest = [current[i] for i in sorted(keep - {index})]
        if target.met_by(rest):
            keep.discard(index)
            removed.append(index)
    return removed


def capacity(shapes: Sequence[EntryShape]) -> Target:
    """The total workers, cores and memory of ``shapes``."""
    return Target(
        workers=sum(s.workers for s in shapes),
        cores=sum(s.cores for s in shapes),
        memory=sum(s.total_memory for s in shapes),
    )


def workers_for(cores: int | None, memory: int | None, threads: int, memory_per_worker: int) -> int:
    """Workers needed for ``cores`` and ``memory`` with uniform workers (rounded up)."""
    need = 0
    if cores:
        need = max(need, math.ceil(cores / max(threads, 1)))
    if memory and memory_per_worker:
        need = max(need, math.ceil(memory / memory_per_worker))
    return need


def worker_options(host: HostSpec) -> dict[str, Any]:
    """Keyword options of one dask worker (or nanny) on ``host``, from its variables.

    ``nthreads`` is ``None`` when the inventory leaves it unset: the process
    interface then starts each worker with :func:`default_nthreads`.
    """
    options: dict[str, Any] = {
        "nthreads": host.nthreads,
        "memory_limit": host.memory_limit,
        # Loopback: a worker's dashboard has no authentication either (see dashboards.py).
        "dashboard_address": "127.0.0.1:0",
    }
    if host.resources:
        options["resources"] = dict(host.resources)
    if host.local_directory:
        options["local_directory"] = host.local_directory
    if host.interface:
        options["interface"] = host.interface
    options.update(host.worker_options)
    return options


def default_nthreads(cpu_count: int | None, workers: int) -> int:
    """Threads of each worker of an entry whose ``nthreads`` the inventory leaves unset.

    The host's cpus shared by the entry's workers, at least one each. The
    process interface starts workers with it, scaling counts cores with it,
    and ``plan`` shows it as :func:`describe_default_nthreads`.

    Parameters
    ----------
    cpu_count
        The cpus the host's agent may use (its ``cpu_count`` fact); ``None``
        or 0 while unknown, counted as 1.
    workers
        Dask workers the entry starts (its group size).
    """
    return max(1, int(cpu_count or 1) // workers)


def describe_default_nthreads(workers: int) -> str:
    """:func:`default_nthreads` for an entry of ``workers`` workers, as ``plan`` shows it before any host is reached."""
    return f"auto (host cpus // {workers}, at least 1)"


def group_suffixes(host: HostSpec) -> list[str] | None:
    """Name suffixes of the workers of one entry on ``host``; ``None`` for a single worker."""
    return [f"-{i}" for i in range(host.nworkers)] if host.nworkers > 1 else None
