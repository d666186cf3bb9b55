"""Capacity scaling of an SSHSpecCluster: the arithmetic behind ``scale`` and ``adapt``.

``scale(n, memory=, cores=)`` becomes a :class:`~speccluster_ssh.placement.Target`;
:class:`Capacity` grows the spec entry by entry (each from
:mod:`speccluster_ssh.entries`) until the target is met or the inventory is
full, or removes entries (not yet arrived first, then the newest) with
:func:`~speccluster_ssh.placement.entries_to_remove`. Bounds of ``adapt`` in
cores or memory become worker counts with the threads and memory of one
worker of the next entry. A shortfall is said once, in ``capacity_note``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dask.utils import parse_bytes
from distributed.deploy.adaptive import Adaptive

from . import entries
from .errors import UserError
from .placement import EntryShape, Target, auto_memory_limit, entries_to_remove, usable_cpus, worker_nthreads

if TYPE_CHECKING:
    from .cluster_protocols import CapacityCluster

logger = logging.getLogger("speccluster_ssh.cluster")  # the messages users know from the cluster's log


class UnknownMemoryError(UserError, ValueError):
    """Scaling by memory was asked for, but the memory of a worker is not known.

    A ``ValueError`` too, as ``SpecCluster.scale(memory=...)`` raises one.
    """


class SSHAdaptive(Adaptive):
    """Adaptive scaling that retires whole spec entries.

    The scheduler proposes single workers to close; an entry of a group is
    closed only when every member of it was proposed, so adapt never kills
    the healthy half of a group. With an explicit ``worker_key`` the
    scheduler groups workers itself, as upstream does.
    """

    async def workers_to_close(self, target: int) -> list[str]:
        names = await super().workers_to_close(target)
        if self.worker_key is not None or not names:
            return names
        cluster = self.cluster
        proposed = set(map(str, names))
        chosen: list[str] = []
        for key, spec in list(cluster.worker_spec.items()):
            members = entries.member_names(key, spec)
            if members and set(members) <= proposed:
                chosen.extend(members)
        return chosen


def to_bytes(value: str | int) -> int:
    """Bytes from ``"4 GiB"`` or a number."""
    return parse_bytes(value) if isinstance(value, str) else int(value)


def resolve_min_workers(value: int | float | str | None, requested: int) -> int:
    """How many of ``requested`` dask workers a start needs, from ``min_workers``.

    ``value`` is a count (``3``), a fraction of the requested workers
    (``0.5``) or a percentage (``"50%"``); ``None`` means 1. Never more than
    ``requested``, and 0 when nothing was requested.

    Raises
    ------
    UserError
        For anything else, with the value and the forms accepted.
    """
    forms = "a whole number (3), a fraction of the requested workers (0.5) or a percentage (50%)"
    if value is None:
        need = 1
    elif isinstance(value, bool):
        raise UserError(f"min_workers must be {forms}; got {value!r}")
    elif isinstance(value, int):
        need = value
    elif isinstance(value, float):
        if not 0 <= value <= 1:
            raise UserError(f"min_workers as a fraction must be between 0 and 1; got {value!r}")
        need = math.ceil(value * requested)
    elif isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if not 0 <= percent <= 100:
                    raise ValueError(text)
                need = math.ceil(percent / 100 * requested)
            elif text.isdigit():
                need = int(text)
            else:
                return resolve_min_workers(float(text), requested)
        except ValueError:
            raise UserError(f"min_workers must be {forms}; got {value!r}") from None
    else:
        raise UserError(f"min_workers must be {forms}; got {value!r}")
    if need < 0:
        raise UserError(f"min_workers must be 0 or more; got {value!r}")
    return min(need, requested)


class Capacity:
    """Grows and shrinks one cluster's spec to a target, within the inventory's capacity.

    Parameters
    ----------
    cluster
        The cluster whose ``worker_spec`` is changed.
    """

    def __init__(self, cluster: CapacityCluster) -> None:
        self.cluster = cluster
        self.note = ""  # the shortfall last said, "" while the target fits
        # The last target asked for, which a drain or reload may leave the cluster short of.
        self.target: Target | None = None
        # The bounds adapt was last asked for, before capping at the capacity of the time.
        self.adapt_asked: tuple[Any, ...] | None = None

    def shortfall_told(self) -> None:
        """The user was told of the next shortfall already (``up``'s warning): it is recorded, not said again."""
        self.note = self.note or "asked for more workers than the inventory holds"

    def _say_shortfall(self, note: str) -> None:
        # Once per shortfall, not on every adapt tick that repeats it: one
        # WARNING, and the cluster's log records it without printing it again.
        if not self.note:
            logger.warning("scaled to capacity: %s", note)
            self.cluster.log_event(f"scaled to capacity: {note}", echo=False)
        self.note = note

    def shape(self, spec: Mapping[str, Any]) -> EntryShape:
        """Workers, threads and memory of one entry, as its processes will have them."""
        opts = spec.get("options", {})
        inner = opts.get("options", {})
        host_name = opts.get("host", "")
        group = spec.get("group")
        workers = len(group) if group else 1
        agents = self.cluster.host_table.agents
        facts = agents[host_name].facts if host_name in agents else {}
        # As the process interface will start it.
        cpus = usable_cpus(facts.get("cpu_count"), (opts.get("host_vars") or {}).get("cpu_affinity"))
        threads = worker_nthreads(inner.get("nthreads"), cpus, workers)
        memory = inner.get("memory_limit")
        if isinstance(memory, str) and memory != "auto":
            try:
                memory = parse_bytes(memory)
            except ValueError:
                memory = 0  # the worker itself will refuse it, with the host named
        if not isinstance(memory, int) or memory <= 0:
            host = self.cluster.host_table.specs.get(host_name)
            # As the process interface sets it: the host's memory among all its slots.
            memory = (auto_memory_limit(facts.get("memory"), host.slots, host.nworkers) if host is not None else None) or 0
        return EntryShape(host=host_name, workers=workers, threads=threads, memory=memory)

    def scale_to(self, target: Target, growing_allowed: bool = True) -> None:
        """Add or remove spec entries until ``target`` is met (or the inventory is full)."""
        self.target = target
        if target.memory:
            self.memory_per_worker()  # fail early rather than fill every slot
        shapes = {key: self.shape(spec) for key, spec in self.cluster.worker_spec.items()}
        if not target.met_by(list(shapes.values())):
            if growing_allowed:
                self._grow(target, shapes)
        else:
            self._shrink(target, shapes)

    def _grow(self, target: Target, shapes: dict[Any, EntryShape]) -> None:
        cluster = self.cluster
        for _ in range(cluster.total_slots + 1):
            if target.met_by(list(shapes.values())):
                self.note = ""
                return
            entry = cluster.next_entry()
            if entry is None:
                break
            cluster.worker_spec.update(entry)
            for key, spec in entry.items():
                shapes[key] = self.shape(spec)
        # Only what was asked for: scale(3) asked for no cores or memory.
        asked = [f"{v} {unit}" for v, unit in ((target.workers, "workers"), (target.cores, "cores"),
                                               (target.memory, "bytes")) if v]
        limits = cluster.slot_limits()
        if any(limit < cluster.worker_hosts[name].slots for name, limit in limits.items() if name in cluster.worker_hosts):
            self._say_shortfall(
                f"asked for {', '.join(asked) or '0 workers'}; {sum(s.workers for s in shapes.values())} workers "
                "fit now: other clusters hold the rest of the lab, and slots are taken as they are freed"
            )
            return
        self._say_shortfall(
            f"asked for {', '.join(asked) or '0 workers'}; "
            f"the inventory's usable capacity is {sum(s.workers for s in shapes.values())} workers"
        )

    def _shrink(self, target: Target, shapes: dict[Any, EntryShape]) -> None:
        cluster = self.cluster
        keys = list(shapes)
        registered: set[str] = set()
        try:
            registered = {str(w["name"]) for w in (cluster.scheduler_info or {}).get("workers", {}).values()}
        except Exception as exc:  # then every entry counts as not yet arrived
            logger.warning("could not read the registered workers to choose entries to remove: %s", exc)

        def arrived(key: Any) -> bool:
            return any(m in registered for m in entries.member_names(key, cluster.worker_spec[key]))

        # Not-yet-arrived entries go first, then the newest.
        order = sorted(range(len(keys)), key=lambda i: (arrived(keys[i]), -i))
        for index in entries_to_remove([shapes[k] for k in keys], order, target):
            del cluster.worker_spec[keys[index]]
        if self.note and target.met_by(list(shapes.values())):
            self.note = ""

    def remember_target(self) -> Target:
        """The target to come back to; the current size when none was asked for yet (the initial spec)."""
        if self.target is None:
            workers = sum(len(entries.member_names(k, s)) for k, s in self.cluster.worker_spec.items())
            self.target = Target(workers=workers)
        return self.target

    def refill(self) -> None:
        """Grow back to the last target where usable slots allow (after an undrain or a reload)."""
        if self.target is not None:
            self.scale_to(self.target)

    def refresh_adapt(self, adaptive: Any) -> None:
        """Recompute the bounds of a running ``adaptive`` from what was asked, within today's capacity.

        The maximum was capped at the inventory's capacity when adapt was
        asked; a reload that added hosts raises that cap (or lowers it).
        """
        if self.adapt_asked is not None and adaptive is not None:
            adaptive.minimum, adaptive.maximum = self.adapt_bounds(*self.adapt_asked)

    def per_worker(self) -> tuple[int, int]:
        """Threads and memory of one worker of the next entry, for adapt's arithmetic."""
        cluster = self.cluster
        # The next entry as if every slot were free: its shape, not a free slot, is asked for.
        spec = entries.place_entry(
            cluster.entry_settings, cluster.worker_hosts, {}, unavailable=cluster.unavailable_hosts(),
            policy=cluster.placement_policy, new_spec=cluster.new_spec,
        )
        if spec is not None:
            return self._threads_memory(self.shape(spec))
        shapes = [self.shape(s) for s in cluster.worker_spec.values()]
        return self._threads_memory(shapes[0]) if shapes else (1, 0)

    @staticmethod
    def _threads_memory(shape: EntryShape) -> tuple[int, int]:
        return shape.threads, shape.memory

    def threads_per_worker(self) -> int:
        return self.per_worker()[0]

    def memory_per_worker(self) -> int:
        """Memory of one worker of the next entry.

        Raises
        ------
        UnknownMemoryError
            When neither the inventory nor a reached host tells it.
        """
        memory = self.per_worker()[1]
        if not memory:
            raise UnknownMemoryError(
                "scaling by memory needs the memory of a worker: set speccluster_memory_limit, "
                "or start a worker first so the host's memory is known"
            )
        return memory

    def adapt_bounds(
        self,
        minimum: float,
        maximum: float,
        minimum_cores: int | None = None,
        maximum_cores: int | None = None,
        minimum_memory: str | int | None = None,
        maximum_memory: str | int | None = None,
    ) -> tuple[float, int]:
        """Worker bounds for ``adapt``: the tighter of the given ones, within the usable capacity."""
        self.adapt_asked = (minimum, maximum, minimum_cores, maximum_cores, minimum_memory, maximum_memory)
        if minimum_cores is not None:
            minimum = max(minimum or 0, math.ceil(minimum_cores / self.threads_per_worker()))
        if minimum_memory is not None:
            minimum = max(minimum or 0, math.ceil(to_bytes(minimum_memory) / self.memory_per_worker()))
        if maximum_cores is not None:
            maximum = min(maximum, math.floor(maximum_cores / self.threads_per_worker()))
        if maximum_memory is not None:
            maximum = min(maximum, math.floor(to_bytes(maximum_memory) / self.memory_per_worker()))
        # Every host counts, down ones too: they come back, and a cap taken
        # while hosts are down would keep adapt small after they returned.
        capacity = entries.capacity_workers(self.cluster.worker_hosts.values())
        if maximum > capacity:
            maximum = capacity
        if minimum > maximum:
            # Asking adapt for more than the inventory holds would repeat the
            # same impossible request on every tick.
            self._say_shortfall(
                f"adapt asked for at least {minimum} workers; the inventory's usable capacity is {capacity}"
            )
            minimum = maximum
        return minimum, int(maximum)
