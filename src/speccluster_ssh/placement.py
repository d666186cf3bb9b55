"""Placement and capacity arithmetic: pure functions, no I/O.

A host offers ``slots`` spec entries. An entry is one dask worker, or a group
of ``nworkers`` workers. These functions decide where the next entry goes and
how many entries a request for workers, cores or memory needs, the threads
of a worker whose ``nthreads`` is unset (:func:`worker_nthreads`) and the GPU
share of an entry (:func:`entry_gpus`).

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
    interface then starts each worker with :func:`worker_nthreads`.
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


def auto_memory_limit(total: int | None, slots: int, nworkers: int) -> int | None:
    """``memory_limit: auto`` of one worker: the host's memory among every worker its slots hold.

    Every slot, whichever cluster holds it (issue 23): a worker sized as if its
    cluster were alone would oversubscribe a shared host. ``None`` when the
    host's memory is not known.
    """
    if not total or total <= 0:
        return None
    return int(total) // max(slots * nworkers, 1)


def default_nthreads(cpu_count: int | None, workers: int) -> int:
    """Threads of each worker of an entry whose ``nthreads`` is unset: the host's cpus shared, at least one each.

    Parameters
    ----------
    cpu_count
        The cpus the host's agent may use (its ``cpu_count`` fact); ``None``
        or 0 while unknown, counted as 1.
    workers
        Dask workers the entry starts (its group size).
    """
    return max(1, int(cpu_count or 1) // workers)


def usable_cpus(cpu_count: int | None, cpu_affinity: Sequence[int] | None) -> int | None:
    """The cpus an entry's workers share on a host: its ``speccluster_cpu_affinity`` list, else every cpu the agent has.

    Parameters
    ----------
    cpu_count
        The host agent's ``cpu_count`` fact; ``None`` while unknown.
    cpu_affinity
        The CPUs the host's dask processes are pinned to, or ``None``.
    """
    return len(cpu_affinity) if cpu_affinity else cpu_count


def given_nthreads(value: Any) -> int | None:
    """The ``nthreads`` a user gave, read once for everyone; ``None`` when it is unset.

    ``None`` and 0 both mean unset (dask itself reads 0 as "choose for me").
    The inventory refuses 0, but ``worker_options``, a ``worker=`` spec or an
    entry written by hand may carry it; the process interface, scaling and
    ``plan`` all read it here, so it means one thing everywhere.

    Raises
    ------
    ValueError
        For a number below 0, or a value that is no number.
    """
    if value is None or value == 0:
        return None
    threads = int(value)
    if threads < 1:
        raise ValueError(f"nthreads must be 1 or more, or unset (None or 0), got {value!r}")
    return threads


def worker_nthreads(value: Any, cpu_count: int | None, workers: int) -> int:
    """Threads of each worker of an entry: the ``nthreads`` given, else :func:`default_nthreads`.

    The process interface starts workers with it and scaling counts cores
    with it; ``plan``, which knows no cpu count, shows :func:`planned_nthreads`.

    Parameters
    ----------
    value
        The entry's ``nthreads`` option (see :func:`given_nthreads`).
    cpu_count, workers
        As for :func:`default_nthreads`.
    """
    given = given_nthreads(value)
    return given if given is not None else default_nthreads(cpu_count, workers)


def planned_nthreads(value: Any, workers: int) -> int | str:
    """:func:`worker_nthreads` as ``plan`` shows it before any host is reached."""
    given = given_nthreads(value)
    return given if given is not None else describe_default_nthreads(workers)


def describe_default_nthreads(workers: int) -> str:
    """:func:`default_nthreads` for an entry of ``workers`` workers, as ``plan`` shows it before any host is reached."""
    return f"auto (host cpus // {workers}, at least 1)"


def group_suffixes(host: HostSpec) -> list[str] | None:
    """Name suffixes of the workers of one entry on ``host``; ``None`` for a single worker."""
    return [f"-{i}" for i in range(host.nworkers)] if host.nworkers > 1 else None


# -- GPUs --------------------------------------------------------------------------------------------
# A host with ``speccluster_gpus`` has one GPU slot per entry slot: the entry holding slot ``s`` runs
# workers ``s * nworkers`` .. ``s * nworkers + nworkers - 1`` of the host's ``slots * nworkers``,
# each with its equal share of the devices.


def gpu_share(devices: Sequence[str], host_workers: int, index: int) -> list[str]:
    """The devices of worker ``index`` of the ``host_workers`` workers of a host.

    Parameters
    ----------
    devices
        The host's devices, e.g. ``["0", "1", "2", "3"]``.
    host_workers
        Workers the host holds when every slot is used (slots x nworkers).
    index
        ``slot * nworkers + member``: which worker of the host.

    Raises
    ------
    ValueError
        When the devices do not divide evenly among the workers, or
        ``index`` is not one of them.
    """
    if host_workers < 1 or not 0 <= index < host_workers:
        raise ValueError(f"worker {index} is not one of the host's {host_workers} workers")
    if len(devices) % host_workers:
        raise ValueError(f"{len(devices)} GPUs do not divide evenly among {host_workers} workers")
    per = len(devices) // host_workers
    return [str(d) for d in devices[index * per:(index + 1) * per]]


def uneven_gpus(count: int, host: HostSpec) -> str | None:
    """Why ``count`` GPUs cannot be shared among ``host``'s workers; ``None`` when they can."""
    workers = host.slots * host.nworkers
    if count == 0 or workers == 0 or count % workers == 0:
        return None
    return (
        f"{count} GPUs do not divide evenly among its {workers} workers "
        f"(speccluster_slots {host.slots} x speccluster_nworkers {host.nworkers})"
    )


def free_gpu_slot(held: Collection[int], slots: int) -> int | None:
    """The lowest GPU slot of a host that no entry holds; ``None`` when all are held."""
    return next((slot for slot in range(slots) if slot not in held), None)


def slot_gpus(devices: Sequence[str], host: HostSpec, slot: int | None, workers: int) -> list[list[str]]:
    """The devices of each of the ``workers`` workers of the entry in GPU slot ``slot`` of ``host``.

    No slot (every one is held), or devices that do not divide evenly: no
    GPU for the worker (an empty list) rather than one shared with another.
    """
    shares: list[list[str]] = []
    for member in range(workers):
        try:
            if slot is None:
                raise ValueError("no GPU slot")
            shares.append(gpu_share(devices, host.slots * host.nworkers, slot * host.nworkers + member))
        except ValueError:
            shares.append([])
    return shares


def entry_gpus(host: HostSpec, held: Mapping[str, int], workers: int) -> dict[str, Any]:
    """The GPU options of a new entry on ``host``: the GPU slot it holds and its workers' devices.

    The one place that decides GPU shares: the lowest slot no other entry
    on the host holds, and that slot's devices. The process interface is
    handed them; ``plan`` shows them.

    Parameters
    ----------
    host
        The entry's host.
    held
        The GPU slots other entries on the host hold, by entry name (see
        :func:`speccluster_ssh.entries.gpus_held`).
    workers
        Dask workers the entry starts (its group size).

    Returns
    -------
    dict
        ``{}`` for a host without ``speccluster_gpus``. Else ``gpu_slot``
        (``None`` when every slot is held: no GPU) and ``gpus``: one list of
        device ids per worker, or ``"auto"`` when the host's agent finds its
        devices at start (``nvidia-smi -L``); the process then takes its
        slot's share of them with :func:`slot_gpus`.
    """
    if not host.gpus:
        return {}
    slot = free_gpu_slot(set(held.values()), host.slots)
    gpus: list[list[str]] | str = "auto" if host.gpus == "auto" else slot_gpus(host.gpus, host, slot, workers)
    return {"gpu_slot": slot, "gpus": gpus}
