"""SSHSpecCluster: a SpecCluster whose entries run on inventory hosts.

The scheduler runs on the head (in this process) unless the inventory has a
``scheduler`` group, in which case a host agent runs it there. Workers are
placed on worker hosts slot by slot (see :mod:`speccluster_ssh.placement`).
The healer (:mod:`speccluster_ssh.healer`) relaunches entries whose
processes died, re-places entries of hosts that were lost, and retries lost
hosts with backoff; it wakes on those events only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import dask
from dask.utils import parse_bytes, parse_timedelta
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.scheduler import Scheduler
from distributed.utils import Log

from . import config as sc_config
from .connection import ConnectSettings
from . import entries
from .entries import EntrySettings
from .errors import CapacityError, HostError, UserError
from .healer import Healer
from .inventory import Inventory, load_inventory
from .placement import EntryShape, Target, entries_to_remove
from .process import AgentPool, RemoteNanny, RemoteProcess, RemoteScheduler, RemoteWorker
from .security import remote_security_paths
from .tasks import TaskSet, log_failures

# The process classes spec entries name, for :class:`~speccluster_ssh.entries.EntrySettings`.
PROCESS_CLASSES: Mapping[str, type] = {"nanny": RemoteNanny, "worker": RemoteWorker, "scheduler": RemoteScheduler}

logger = logging.getLogger(__name__)


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


class SSHSpecCluster(SpecCluster):
    """A Dask cluster on the hosts of an Ansible inventory, started over SSH.

    Parameters
    ----------
    hosts
        Host names or addresses, or mappings of inventory variables (see
        :meth:`Inventory.from_hosts`). Ignored when ``inventory`` is given.
    inventory
        A parsed inventory, or a path to one.
    n_workers
        Spec entries to start with; ``None`` fills every worker host's slots.
    placement
        ``"spread"`` (default) or ``"pack"``; see :mod:`speccluster_ssh.placement`.
    scheduler_address
        Address workers use to reach a scheduler on the head; by default it
        is found per host from the local end of the SSH connection.
    scheduler_options, worker_options
        Extra keyword options for the dask Scheduler and workers.
    known_hosts, known_hosts_policy, ssh_config, connect_timeout
        How to reach hosts; see :class:`~speccluster_ssh.connection.ConnectSettings`.
    silence
        Seconds without contact after which an agent kills its processes
        and the head marks the host down.
    heal
        Relaunch dead entries and re-place those of lost hosts (default on).
    security
        A ``distributed.Security``, ``True`` for fresh TLS certificates
        (the default), or ``False`` for plain TCP.
    name, asynchronous, loop, silence_logs, shutdown_on_close
        As for :class:`distributed.deploy.SpecCluster`.

    Examples
    --------
    >>> cluster = SSHSpecCluster.from_inventory("inventory.yml", n_workers=4)  # doctest: +SKIP
    >>> client = Client(cluster)  # doctest: +SKIP
    >>> cluster.scale(8)  # doctest: +SKIP
    >>> cluster.adapt(minimum=2, maximum=16)  # doctest: +SKIP
    """

    def __init__(
        self,
        hosts: Sequence[str | Mapping[str, Any]] | None = None,
        *,
        inventory: Inventory | str | os.PathLike[str] | None = None,
        n_workers: int | None = None,
        placement: str | None = None,
        scheduler_address: str | None = None,
        scheduler_options: Mapping[str, Any] | None = None,
        worker_options: Mapping[str, Any] | None = None,
        known_hosts: str | None = None,
        known_hosts_policy: str | None = None,
        ssh_config: Sequence[str] = (),
        connect_timeout: float | None = None,
        silence: float | None = None,
        heal: bool = True,
        start_timeout: float | None = None,
        security: Any = None,
        name: str | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        silence_logs: int | bool = logging.CRITICAL,
        shutdown_on_close: bool = True,
        scheduler: Mapping[str, Any] | None = None,
        worker: Mapping[str, Any] | None = None,
        workers: Mapping[str, Any] | None = None,
        scheduler_sync_interval: float = 1,
    ) -> None:
        from .security import make_security

        if isinstance(inventory, (str, os.PathLike)):
            inventory = load_inventory(inventory)
        if inventory is None:
            if not hosts:
                raise UserError("SSHSpecCluster needs hosts or an inventory")
            inventory = Inventory.from_hosts(list(hosts))
        self.inventory: Inventory = inventory
        self.placement_policy = placement or sc_config.get("placement")
        if self.placement_policy not in ("spread", "pack"):
            raise UserError(f"placement must be 'spread' or 'pack', got {self.placement_policy!r}")
        self.cluster_id = f"{name or 'speccluster'}-{secrets.token_hex(4)}"
        # Every background task of the cluster; awaited by _close.
        self._tasks = TaskSet(f"cluster {self.cluster_id}", logger)
        self.heal = heal
        self.start_timeout = float(start_timeout or sc_config.get("start-timeout"))
        self.silence = float(silence or sc_config.get("silence"))
        self.worker_options = dict(worker_options or {})
        self.capacity_note = ""
        self.dead_logs: dict[str, str] = {}
        self.dead_hosts: dict[str, str] = {}  # member -> host, for logs by host
        self._scheduler_address = scheduler_address
        worker_hosts = {h.name: h for h in inventory.worker_hosts}
        self.worker_hosts = worker_hosts
        all_hosts = dict(worker_hosts)
        if inventory.scheduler_host is not None:
            all_hosts[inventory.scheduler_host.name] = inventory.scheduler_host
        settings = ConnectSettings(
            known_hosts=known_hosts,
            # A non-default policy in the dask config applies to every host.
            known_hosts_policy=known_hosts_policy
            or (sc_config.get("known-hosts") if sc_config.get("known-hosts") != "strict" else None),
            ssh_config=list(ssh_config),
            connect_timeout=connect_timeout,
        )
        self.pool = AgentPool(
            self.cluster_id,
            all_hosts,
            settings,
            silence=self.silence,
            agent_timeout=self.start_timeout,
        )
        # Owns host health decisions and start-failure accounting; runs only with heal=True.
        self.healer = Healer(self, self.pool, self._tasks)
        if security is None:
            security = sc_config.get("tls")
        self.security_files: dict[str, bytes] = {}
        sec, files = make_security(security, self.cluster_id)
        self.pool.files.update(files)
        self.remote_security = remote_security_paths(files)
        self.entry_settings = EntrySettings(
            self.cluster_id,
            self.start_timeout,
            self.remote_security,
            self.worker_options,
            classes=PROCESS_CLASSES,
            process_base=RemoteProcess,
        )

        if scheduler is None:
            scheduler = self._scheduler_entry(dict(scheduler_options or {}), sec)
        self._i = 0
        initial = {
            str(key): entries.complete_entry(self.entry_settings, spec, self.worker_hosts)
            for key, spec in (workers or {}).items()
        }
        self._init_spec(
            initial, scheduler, worker, asynchronous, loop, sec, silence_logs, name, shutdown_on_close,
            scheduler_sync_interval, n_workers,
        )

    def _init_spec(
        self,
        initial: dict[str, Any],
        scheduler: Mapping[str, Any],
        worker: Mapping[str, Any] | None,
        asynchronous: bool,
        loop: Any,
        sec: Any,
        silence_logs: int | bool,
        name: str | None,
        shutdown_on_close: bool,
        scheduler_sync_interval: float,
        n_workers: int | None,
    ) -> None:
        # The initial spec is placed before SpecCluster starts, so that a
        # synchronous constructor returns with every worker running.
        self.worker_spec = initial
        self.new_spec = dict(worker) if worker else None
        if not initial:
            count = self.total_slots if n_workers is None else n_workers
            for _ in range(count):
                entry = self._next_entry()
                if entry is None:
                    break
                self.worker_spec.update(entry)
        super().__init__(
            workers=initial,
            scheduler=dict(scheduler),
            worker=dict(worker) if worker else {"cls": RemoteNanny, "options": {}},
            asynchronous=asynchronous,
            loop=loop,
            security=sec,
            silence_logs=silence_logs,
            name=name,
            shutdown_on_close=shutdown_on_close,
            scheduler_sync_interval=scheduler_sync_interval,
        )

    # -- construction helpers -------------------------------------------
    @classmethod
    def from_name(cls, name: str, asynchronous: bool = False, loop: Any = None) -> Any:  # type: ignore[override]
        """Attach to the detached cluster ``name`` running on this head node.

        Returns a :class:`~speccluster_ssh.detached.DetachedCluster`: a
        ``Cluster`` that reads the scheduler directly and asks the cluster's
        head process to scale, adapt and close. dask-ctl uses this.
        """
        from .detached import DetachedCluster

        return DetachedCluster.from_name(name, asynchronous=asynchronous, loop=loop)

    @classmethod
    def from_inventory(cls, path: str | os.PathLike[str], **options: Any) -> SSHSpecCluster:
        """Build a cluster from an Ansible inventory file.

        Parameters
        ----------
        path
            The inventory (YAML or INI), read as ansible-inventory reads it.
        **options
            Any keyword of :class:`SSHSpecCluster`.
        """
        scheduler_group = options.pop("scheduler_group", "scheduler")
        worker_group = options.pop("worker_group", "workers")
        inventory = load_inventory(path, scheduler_group=scheduler_group, worker_group=worker_group)
        return cls(inventory=inventory, **options)

    def _scheduler_entry(self, options: dict[str, Any], sec: Any) -> dict[str, Any]:
        """The scheduler's spec: on the inventory's scheduler host, or in this process."""
        sched_host = self.inventory.scheduler_host
        if sched_host is not None:
            return entries.remote_scheduler_entry(
                self.entry_settings, sched_host, sc_config.get("dashboard-port"), options
            )
        return entries.local_scheduler_entry(
            Scheduler, sec, sc_config.get("scheduler-port"), sc_config.get("dashboard-port"), options
        )

    @property
    def total_slots(self) -> int:
        return sum(h.slots for h in self.worker_hosts.values())

    def _member_names(self, key: Any, spec: Mapping[str, Any]) -> list[str]:
        return entries.member_names(key, spec)

    def _unavailable_hosts(self) -> set[str]:
        return self.healer.unavailable_hosts()

    @property
    def last_heal_error(self) -> str:
        """Why the last healing pass failed, if one did."""
        return self.healer.last_error

    def _shape(self, spec: Mapping[str, Any]) -> EntryShape:
        opts = spec.get("options", {})
        inner = opts.get("options", {})
        host_name = opts.get("host", "")
        group = spec.get("group")
        workers = len(group) if group else 1
        facts = self.pool.agents[host_name].facts if host_name in self.pool.agents else {}
        threads = int(inner.get("nthreads") or 0)
        if not threads:
            # As the process interface will decide: the host's cpus shared by the group.
            threads = max(1, int(facts.get("cpu_count") or 1) // workers)
        memory = inner.get("memory_limit")
        if isinstance(memory, str) and memory != "auto":
            try:
                memory = parse_bytes(memory)
            except ValueError:
                memory = 0  # the worker itself will refuse it, with the host named
        if not isinstance(memory, int) or memory <= 0:
            total = int(facts.get("memory") or 0)
            cpus = int(facts.get("cpu_count") or 1)
            memory = int(total * min(1.0, threads / cpus)) if total else 0
        return EntryShape(host=host_name, workers=workers, threads=threads, memory=memory)

    def _next_entry(self) -> dict[str, Any] | None:
        """The next entry ``{name: spec}`` on a host with a free slot; ``None`` when there is none."""
        entry, self._i = entries.next_entry(
            self.entry_settings,
            self.worker_hosts,
            self.worker_spec,
            self._i,
            unavailable=self._unavailable_hosts(),
            policy=self.placement_policy,
            new_spec=self.new_spec,
        )
        return entry

    def new_worker_spec(self) -> dict[str, Any]:
        """Name and spec of the next entry, on a host with a free slot.

        Raises
        ------
        CapacityError
            When every slot of every usable host is taken.
        """
        entry = self._next_entry()
        if entry is None:
            raise CapacityError("no free slot on any usable host of the inventory")
        return entry

    # -- scaling ---------------------------------------------------------
    def scale(self, n: int = 0, memory: str | int | None = None, cores: int | None = None) -> Any:
        """Scale to at least ``n`` dask workers, ``cores`` threads and ``memory`` bytes.

        Counts dask workers (a group entry counts as its size, rounded up to
        whole entries). Past the inventory's capacity it scales to capacity
        and says so once, in the log and in :meth:`status_report`.

        Raises
        ------
        UnknownMemoryError
            For ``memory=`` when a worker's memory is not known: set
            ``speccluster_memory_limit``, or let the cluster reach a host first.
        """
        target = Target(
            workers=int(n or 0),
            cores=int(cores or 0),
            memory=parse_bytes(memory) if isinstance(memory, str) else int(memory or 0),
        )
        if target.memory:
            self._memory_per_worker()  # fail early rather than fill every slot
        shapes = {key: self._shape(spec) for key, spec in self.worker_spec.items()}
        if not target.met_by(list(shapes.values())):
            if self.status not in (Status.closing, Status.closed):
                self._grow(target, shapes)
        else:
            self._shrink(target, shapes)
        # scale() may be called from another thread: the task starts in the loop.
        self.loop.add_callback(self._reconcile_in_background, "reconcile after scale")
        if self.asynchronous:
            from distributed.utils import NoOpAwaitable

            return NoOpAwaitable()
        return None

    def _grow(self, target: Target, shapes: dict[Any, EntryShape]) -> None:
        bound = self.total_slots + 1
        for _ in range(bound):
            if target.met_by(list(shapes.values())):
                self.capacity_note = ""
                return
            entry = self._next_entry()
            if entry is None:
                break
            self.worker_spec.update(entry)
            for key, spec in entry.items():
                shapes[key] = self._shape(spec)
        note = (
            f"asked for {target.workers} workers, {target.cores} cores, {target.memory} bytes; "
            f"the inventory's usable capacity is {sum(s.workers for s in shapes.values())} workers"
        )
        # Say it once per shortfall, not on every adapt tick that repeats it.
        if not self.capacity_note:
            logger.warning("scaled to capacity: %s", note)
            self._log(f"scaled to capacity: {note}")
        self.capacity_note = note

    def _shrink(self, target: Target, shapes: dict[Any, EntryShape]) -> None:
        keys = list(shapes)
        registered: set[str] = set()
        try:
            registered = {str(w["name"]) for w in (self.scheduler_info or {}).get("workers", {}).values()}
        except Exception as exc:  # then every entry counts as not yet arrived
            logger.warning("could not read the registered workers to choose entries to remove: %s", exc)

        def arrived(key: Any) -> bool:
            return any(m in registered for m in self._member_names(key, self.worker_spec[key]))

        # Not-yet-arrived entries go first, then the newest.
        order = sorted(range(len(keys)), key=lambda i: (arrived(keys[i]), -i))
        for index in entries_to_remove([shapes[k] for k in keys], order, target):
            del self.worker_spec[keys[index]]
        if self.capacity_note and target.met_by(list(shapes.values())):
            self.capacity_note = ""

    async def scale_down(self, workers: Sequence[Any]) -> None:
        """Remove the entries that hold ``workers`` (names or spec keys)."""
        mapping: dict[str, Any] = {}
        for key, spec in self.worker_spec.items():
            mapping[str(key)] = key
            for member in self._member_names(key, spec):
                mapping[member] = key
        for worker in workers:
            key = mapping.get(str(worker))
            if key is None:
                # An address: find the worker's name through the scheduler.
                info = self.scheduler_info.get("workers", {}).get(worker)
                key = mapping.get(str(info["name"])) if info else None
            if key is not None and key in self.worker_spec:
                del self.worker_spec[key]
        await self

    def _per_worker(self) -> tuple[int, int]:
        """Threads and memory of one worker of the next entry, for adapt's arithmetic."""
        entry = self._next_entry_preview()
        if entry is None:
            shapes = [self._shape(s) for s in self.worker_spec.values()]
            if not shapes:
                return 1, 0
            shape = shapes[0]
        else:
            shape = self._shape(entry)
        return shape.threads, shape.memory

    def _next_entry_preview(self) -> dict[str, Any] | None:
        """The spec the next entry would have on an empty cluster (no name), for adapt's arithmetic."""
        host = entries.choose_entry_host(self.worker_hosts, {}, self._unavailable_hosts(), self.placement_policy)
        return entries.worker_entry(self.entry_settings, host, self.new_spec) if host is not None else None

    def _threads_per_worker(self) -> int:
        return self._per_worker()[0]

    def _memory_per_worker(self) -> int:
        memory = self._per_worker()[1]
        if not memory:
            raise UnknownMemoryError(
                "scaling by memory needs the memory of a worker: set speccluster_memory_limit, "
                "or start a worker first so the host's memory is known"
            )
        return memory

    def adapt(  # noqa: N803
        self,
        Adaptive: type[Adaptive] = SSHAdaptive,
        minimum: float = 0,
        maximum: float = math.inf,
        minimum_cores: int | None = None,
        maximum_cores: int | None = None,
        minimum_memory: str | int | None = None,
        maximum_memory: str | int | None = None,
        **kwargs: Any,
    ) -> Adaptive:
        """Scale automatically with the scheduler's load; see :meth:`SpecCluster.adapt`.

        Parameters
        ----------
        Adaptive
            The adaptive class; :class:`SSHAdaptive` retires group entries whole.
        minimum, maximum
            Dask workers to keep at least and at most. ``maximum`` is capped
            at the inventory's usable capacity, and ``minimum`` at ``maximum``.
        minimum_cores, maximum_cores, minimum_memory, maximum_memory
            The same bounds in threads or bytes, turned into workers with the
            threads and memory of one worker of the next entry.
        **kwargs
            ``interval``, ``wait_count``, ``target_duration``, ``worker_key``
            and the rest of :class:`distributed.deploy.Adaptive`'s options.
        """
        if minimum_cores is not None:
            minimum = max(minimum or 0, math.ceil(minimum_cores / self._threads_per_worker()))
        if minimum_memory is not None:
            minimum = max(minimum or 0, math.ceil(_bytes(minimum_memory) / self._memory_per_worker()))
        if maximum_cores is not None:
            maximum = min(maximum, math.floor(maximum_cores / self._threads_per_worker()))
        if maximum_memory is not None:
            maximum = min(maximum, math.floor(_bytes(maximum_memory) / self._memory_per_worker()))
        capacity = self.capacity_workers()
        if maximum > capacity:
            maximum = capacity
        if minimum > maximum:
            # Asking adapt for more than the inventory holds would repeat the
            # same impossible request on every tick.
            note = f"adapt asked for at least {minimum} workers; the inventory's usable capacity is {capacity}"
            if not self.capacity_note:
                logger.warning("scaled to capacity: %s", note)
                self._log(f"scaled to capacity: {note}")
            self.capacity_note = note
            minimum = maximum
        return Cluster.adapt(self, Adaptive=Adaptive, minimum=minimum, maximum=int(maximum), **kwargs)

    def adaptive_bounds(self) -> dict[str, Any] | None:
        """``{"minimum": .., "maximum": ..}`` while adaptive scaling runs, else ``None``."""
        adaptive = self._adaptive
        if adaptive is None or getattr(adaptive, "periodic_callback", None) is None:
            return None
        return {"minimum": adaptive.minimum, "maximum": adaptive.maximum}

    def stop_adapt(self) -> bool:
        """Turn adaptive scaling off and keep the current workers; True if it was on."""
        adaptive = self._adaptive
        if adaptive is not None:
            adaptive.stop()
        self._adaptive = None
        if hasattr(self, "_adaptive_options"):
            self._adaptive_options = {}
        return adaptive is not None

    def readiness(self) -> tuple[dict[str, int], dict[str, int]]:
        """Dask workers wanted and workers running, per host name.

        Counts entries still starting (not yet in ``workers``) as wanted, so
        progress can be shown while the constructor runs.
        """
        wanted: dict[str, int] = {}
        ready: dict[str, int] = {}
        for spec in list(self.worker_spec.values()):
            host = spec.get("options", {}).get("host")
            group = spec.get("group")
            wanted[host] = wanted.get(host, 0) + (len(group) if group else 1)
        processes = {id(p): p for p in [*self._created, *self.workers.values()]}
        for proc in processes.values():
            if (
                isinstance(proc, RemoteProcess)
                and proc.role != "scheduler"
                and proc.status == Status.running
                and proc.name in self.worker_spec
            ):
                ready[proc.host] = ready.get(proc.host, 0) + len(proc.member_names)
        return wanted, ready

    def capacity_workers(self) -> int:
        """Dask workers the inventory can hold when every usable slot is used."""
        return entries.capacity_workers(self.worker_hosts.values(), self._unavailable_hosts())

    # -- reconciling -----------------------------------------------------
    async def _start(self) -> None:
        # Connect to the hosts while the scheduler (and its dashboard) starts.
        hosts = {spec.get("options", {}).get("host") for spec in self.worker_spec.values()}
        if self.inventory.scheduler_host is not None:
            hosts.add(self.inventory.scheduler_host.name)
        self.pool.prestart(h for h in hosts if h is not None)
        try:
            await super()._start()
        except RuntimeError as exc:
            await self.pool.close()
            cause = exc.__cause__
            if isinstance(cause, HostError):
                raise cause from None
            raise
        if isinstance(self.scheduler, Scheduler) and self._scheduler_address is None:
            protocol, _, rest = self.scheduler.address.partition("://")
            self.pool.head_scheduler = (protocol, int(rest.rsplit(":", 1)[1]))

    async def _correct_state_internal(self) -> None:
        async with self._lock:
            self._correct_state_waiting = None
            to_close = [k for k in self.workers if k not in self.worker_spec]
            if to_close:
                names = [
                    m
                    for k in to_close
                    for m in (self.workers[k].member_names if isinstance(self.workers[k], RemoteProcess) else [str(k)])
                ]
                if self.scheduler.status == Status.running and names:
                    # Retire by name so the scheduler moves their data first.
                    try:
                        await self.scheduler_comm.retire_workers(names=names, remove=True, close_workers=False)
                    except Exception as exc:  # they are closed below all the same, data or not
                        logger.warning("could not retire workers %s before closing them: %s", ", ".join(names), exc)
                results = await asyncio.gather(*(self.workers[k].close() for k in to_close), return_exceptions=True)
                log_failures(results, [f"entry {k}" for k in to_close], logger, "closing removed entries")
                for key in to_close:
                    self._keep_logs(key, self.workers.pop(key, None))
            # Entries of hosts that are down or put aside wait for the host (or
            # for the healer to move them); trying them would only fail again.
            unavailable = self._unavailable_hosts()
            # An entry found to fail by itself waits out its backoff.
            to_open = [
                k for k in self.worker_spec
                if k not in self.workers
                and self.worker_spec[k].get("options", {}).get("host") not in unavailable
                and not self.healer.waiting(k)
            ]
            created = []
            for key in to_open:
                spec = self.worker_spec[key]
                cls = spec["cls"]
                opts = dict(spec.get("options", {}))
                opts.setdefault("name", key)
                if spec.get("group"):
                    opts["group"] = spec["group"]
                address = getattr(self.scheduler, "contact_address", None) or self.scheduler.address
                worker = cls(address, **opts)
                if isinstance(worker, RemoteProcess):
                    self.healer.watch(worker)
                self._created.add(worker)
                created.append((key, worker))
            if created:
                tasks = [
                    # Read below; kept in the task set so a cancelled reconcile leaves none running.
                    self._tasks.start(_await(w), name=f"start entry {key}", log_failure=False)
                    for key, w in created
                ]
                await asyncio.wait(tasks)
                for (key, worker), task in zip(created, tasks):
                    self.workers[key] = worker
                    worker._cluster = weakref.ref(self)
                    host = getattr(worker, "host", None)
                    if not task.cancelled() and task.exception() is not None:
                        self.healer.entry_start_failed(key, str(task.exception()))
                    elif host is not None:
                        self.healer.entry_started(key, host)
                await asyncio.gather(*tasks)
        # Heal only once the first reconcile succeeded: a constructor that
        # fails must raise its own error, not race the healer for it.
        if self.heal and self.status == Status.running:
            self.healer.start()

    def _correct_state(self) -> Any:
        # SpecCluster hands out one shared reconcile task until it runs; a task
        # that was cancelled before running would be handed out forever.
        waiting = self._correct_state_waiting
        if waiting is not None and waiting.done():
            self._correct_state_waiting = None
        return super()._correct_state()

    def _reconcile_in_background(self, why: str) -> None:
        """Start a reconcile as a task of the cluster (called in the event loop)."""
        if self.status not in (Status.closing, Status.closed):
            self._tasks.start(self._reconcile_then_wake_healer(), name=why)

    async def _reconcile_then_wake_healer(self) -> None:
        await self._correct_state_in_background()
        # Entries the reconcile could not start (their host is down) are the healer's to move.
        self.healer.wake("the spec changed")

    async def _correct_state_in_background(self) -> None:
        """Reconcile after ``scale``; a failure is logged here and handled by the healer."""
        try:
            # Shielded: the reconcile task is shared with close() and scale();
            # cancelling the healer must not cancel it under their feet.
            await asyncio.shield(self._correct_state())
        except Exception as exc:
            if self.status not in (Status.closing, Status.closed):
                logger.warning("could not start every worker: %s", exc)

    def _update_worker_status(self, op: str, msg: Any) -> None:
        # SpecCluster forgets a lost worker by its name, which for a group
        # member is not a spec key (dask issue 9102): map members to entries.
        if op == "add":
            # worker_address follows what the scheduler has, through restarts
            # a nanny does by itself.
            for address, info in dict(msg.get("workers") or {}).items():
                self._follow(str(info.get("name")), address)
        if op == "remove" and msg in self.scheduler_info.get("workers", {}):
            member = str(self.scheduler_info["workers"][msg].get("name"))
            key = self._key_of_member(member)
            proc = self.workers.get(key) if key is not None else None
            if isinstance(proc, RemoteProcess) and proc.members.get(member, {}).get("worker_address") == msg:
                proc.follow_worker(member, None)
            if proc is not None:
                delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
                asyncio.get_running_loop().call_later(delay, self._forget_lost, key, proc, member)
        super(SpecCluster, self)._update_worker_status(op, msg)

    def _follow(self, member: str, address: str) -> None:
        key = self._key_of_member(member)
        proc = self.workers.get(key) if key is not None else None
        if isinstance(proc, RemoteProcess) and proc.role != "scheduler":
            proc.follow_worker(member, address)

    def _key_of_member(self, member: str) -> Any:
        for key, spec in self.worker_spec.items():
            if member in self._member_names(key, spec):
                return key
        for key, proc in self.workers.items():
            if member in getattr(proc, "member_names", [str(key)]):
                return key
        return None

    def _forget_lost(self, key: Any, proc: Any, member: str) -> None:
        """Drop entry ``key`` from ``workers`` if ``member`` did not come back.

        The entry stays in the spec, so the next reconcile starts it again.
        Only the process interface seen at removal time is dropped, never a
        replacement started meanwhile.
        """
        if self.status in (Status.closing, Status.closed) or self.workers.get(key) is not proc:
            return
        back = {str(w.get("name")) for w in self.scheduler_info.get("workers", {}).values()}
        if member in back:
            return
        self._tasks.start(self._drop_entry_process(key, proc, member), name=f"drop entry {key}")

    async def _drop_entry_process(self, key: Any, proc: Any, member: str) -> None:
        # Under the lock, and closed before it leaves ``workers``: the entry's
        # replacement reuses its member names and must not start while the
        # old processes are still stopping.
        async with self._lock:
            if self.workers.get(key) is not proc:
                return
            logger.info("worker %s of entry %s is gone; the entry will be started again", member, key)
            try:
                await proc.close()
            except Exception as exc:  # its host may be gone; the agent kills what it leaves
                logger.warning("closing entry %s failed: %s: %s", key, type(exc).__name__, exc)
            self.workers.pop(key, None)
            self._keep_logs(key, proc)
        self.healer.wake(f"entry {key} dropped")

    def _keep_logs(self, key: Any, worker: Any) -> None:
        if isinstance(worker, RemoteProcess):
            for member, info in worker.exit_info.items():
                self.dead_logs[member] = str(info.get("tail", ""))
                self.dead_hosts[member] = worker.host

    async def _remove_members_from_scheduler(self, members: Sequence[str], why: str) -> None:
        """Make the scheduler drop every worker registered under one of ``members``.

        Called under the reconcile lock for entries whose processes are gone,
        before their replacements start, so a replacement never meets a ghost
        of its own name. By name, not by the address we last saw: a nanny may
        have restarted its worker under a new address.
        """
        if not members or self.scheduler_comm is None:
            return
        wanted = set(members)
        try:
            identity = await self.scheduler_comm.identity()
        except Exception as exc:
            logger.warning("could not ask the scheduler for workers %s: %s", ", ".join(sorted(wanted)), exc)
            return
        for address, info in identity.get("workers", {}).items():
            if str(info.get("name")) not in wanted:
                continue
            try:
                await self.scheduler_comm.unregister(
                    address=address, stimulus_id=f"speccluster-{why}-{time.time()}", close=False
                )
            except Exception as exc:
                logger.warning("could not remove worker %s (%s) from the scheduler: %s", info.get("name"), address, exc)
            else:
                logger.info("removed worker %s (%s) of a gone entry from the scheduler", info.get("name"), address)

    async def _close(self) -> None:
        # The healer and retries first, so nothing starts while we close. Not
        # the whole task set: a reconcile that close() itself awaits may be
        # waiting for entry starts in it.
        await self.healer.stop()
        try:
            await super()._close()
        finally:
            try:
                await self.pool.close()
            finally:
                # Tasks started while closing (drops of lost workers, say).
                await self._tasks.close()

    # -- inspection ------------------------------------------------------
    @property
    def dashboard_link(self) -> str:
        if isinstance(self.scheduler, RemoteScheduler):
            port = self.scheduler.dashboard_port
            host = self.scheduler.address.split("://")[-1].rsplit(":", 1)[0] if self.scheduler.address else "localhost"
            return f"http://{host}:{port}/status" if port else ""
        return super().dashboard_link

    def status_report(self) -> dict[str, Any]:
        """A JSON-able view of hosts, entries and workers, for ``status``."""
        info = self.scheduler_info.get("workers", {}) if self.scheduler_info else {}
        by_name = {str(w["name"]): (addr, w) for addr, w in info.items()}
        workers = []
        hosts: dict[str, Any] = {}
        used = entries.slots_used(self.worker_spec)
        for name, host in self.worker_hosts.items():
            state = self.pool.states[name]
            hosts[name] = {
                "address": host.address,
                "slots": host.slots,
                "slots_used": used.get(name, 0),
                **state.as_dict(),
            }
        for key, spec in self.worker_spec.items():
            host = spec["options"].get("host")
            proc = self.workers.get(key)
            for member in self._member_names(key, spec):
                addr, winfo = by_name.get(member, (None, {}))
                workers.append(
                    {
                        "name": member,
                        "entry": str(key),
                        "host": host,
                        "address": addr,
                        "status": "running" if addr else (proc.status.name if proc else self._pending_status(key)),
                        "threads": winfo.get("nthreads"),
                        "memory_limit": winfo.get("memory_limit"),
                        "problem": self.healer.problem(key),
                    }
                )
        return {
            "name": self.name,
            "cluster_id": self.cluster_id,
            "scheduler_address": self.scheduler_address,
            "dashboard_link": self.dashboard_link,
            "hosts": hosts,
            "workers": workers,
            "capacity_note": self.capacity_note,
        }

    def _pending_status(self, key: Any) -> str:
        return "backing off" if self.healer.waiting(key) else "pending"

    async def _get_logs(self, cluster: bool = True, scheduler: bool = True, workers: bool | Sequence[str] = True) -> Any:
        logs = await super()._get_logs(cluster=cluster, scheduler=scheduler, workers=False)
        if not workers:
            return logs
        wanted = None if workers is True else {self._name_of(str(w)) for w in workers}  # type: ignore[union-attr]
        for key, proc in list(self.workers.items()):
            if isinstance(proc, RemoteProcess):
                for member, text in (await proc.tail()).items():
                    if wanted is None or member in wanted:
                        logs[member] = Log(text)
        for member, text in self.dead_logs.items():
            if (wanted is None or member in wanted) and member not in logs:
                logs[member] = Log(text)
        return logs

    def _name_of(self, worker: str) -> str:
        """The worker name for a name or an address the scheduler knows."""
        info = (self.scheduler_info or {}).get("workers", {}).get(worker)
        return str(info["name"]) if info else worker


def _bytes(value: str | int) -> int:
    return parse_bytes(value) if isinstance(value, str) else int(value)


async def _await(worker: Any) -> Any:
    return await worker

