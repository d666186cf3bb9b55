"""SSHSpecCluster: a SpecCluster whose entries run on inventory hosts.

The scheduler runs on the head (in this process) unless the inventory has a
``scheduler`` group, in which case a host agent runs it there. Workers are
placed on worker hosts slot by slot. The cluster is the hub; each concern
lives in a module of its own and is reached through one attribute:

- spec entries are built by :mod:`speccluster_ssh.entries` (``entry_settings``);
- every host, with its health, drain flag, agent and connection, is in a
  :class:`~speccluster_ssh.hosts.HostTable` (``host_table``), whose methods
  alone change them; ``inventory`` and ``worker_hosts`` read it;
- the remote processes are :mod:`speccluster_ssh.process` interfaces, their
  hosts' agents an :class:`~speccluster_ssh.pool.AgentPool` (``pool``);
- healing (relaunching dead entries, moving entries off lost hosts, retrying
  hosts) is :class:`~speccluster_ssh.healer.Healer` (``healer``);
- the arithmetic of ``scale`` and ``adapt`` is
  :class:`~speccluster_ssh.scaling.Capacity` (``capacity``);
- status, readiness and logs are :class:`~speccluster_ssh.reporting.Reports` (``reports``);
- how the cluster is put together and started, and what a start short of
  ``min_workers`` raises, is :mod:`speccluster_ssh.startup`;
- the steps of the reconcile and the map from dask workers to entries are
  :mod:`speccluster_ssh.reconcile`.

What stays here is the public API (constructor, ``scale``, ``adapt``,
``status_report``, ...), each method delegating, and the steps of the life
cycle that :class:`~speccluster_ssh.distributed_internals.SpecClusterBridge`,
its base, hands over from SpecCluster's private hooks: this class uses no
private name of distributed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster

from . import config as sc_config
from . import dashboards, entries, idle, operations, reach, reconcile, startup
from .day2 import Day2Operations
from .distributed_internals import SpecClusterBridge
from .entries import EntrySettings
from .errors import CapacityError, UserError
from .healer import Healer
from .hosts import HostTable
from .inventory import HostSpec, Inventory, load_inventory
from .placement import Target
from .pool import AgentPool
from .powerctl import PowerKeeper
from .process import RemoteNanny, RemoteProcess, RemoteScheduler, RemoteWorker
from .reporting import Reports
from .scaling import Capacity, SSHAdaptive, UnknownMemoryError, to_bytes
from .security import make_security
from .sharing import LeaseWatcher, slot_limits
from .tasks import TaskSet

# Importable from here as before they moved to scaling.py.
__all__ = ["PROCESS_CLASSES", "SSHAdaptive", "SSHSpecCluster", "UnknownMemoryError"]

# The process classes spec entries name, for :class:`~speccluster_ssh.entries.EntrySettings`.
PROCESS_CLASSES: Mapping[str, type] = {"nanny": RemoteNanny, "worker": RemoteWorker, "scheduler": RemoteScheduler}

logger = logging.getLogger(__name__)

# Seconds the processes of a closing cluster get between SIGTERM and SIGKILL.
# A worker dies at its SIGTERM anyway (it has the default handler); only its
# nanny would close gracefully, and nothing of it is kept.
CLOSE_GRACE = 0.2


class SSHSpecCluster(Day2Operations, SpecClusterBridge):
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
    min_workers
        Dask workers the start needs: a count, a fraction of the requested
        workers (``0.5``) or a percentage (``"50%"``); default 1. Hosts that
        do not answer do not fail the start: their entries go to free slots
        or wait for them. If fewer are up within ``start_timeout`` (or every
        host is down), the start fails with one line per missing host, and
        nothing is left running.
    start_timeout
        Seconds for an agent, a process, and the whole start to come up.
    security
        A ``distributed.Security``, ``True`` for fresh TLS certificates
        (the default), or ``False`` for plain TCP.
    dashboard_address
        ``HOST`` or ``HOST:PORT`` the scheduler's dashboard listens on, on
        the scheduler's host; default config ``dashboard-address``, the
        host's loopback (the dashboard has no authentication). ``"0.0.0.0"``
        exposes it; a loopback dashboard on another host is forwarded to the
        head's loopback, which ``dashboard_link`` then names.
    idle_timeout
        Seconds (or ``"2h"``) with no task and no client after which it closes itself; 0 never; config ``idle-timeout``.
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
        min_workers: int | float | str | None = None,
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
        scheduler_reach: str | None = None,
        dashboard_address: str | None = None, idle_timeout: float | str | None = None,
    ) -> None:
        inventory = startup.resolve_inventory(hosts, inventory)
        self.host_table = HostTable.from_inventory(inventory)  # every host, its health and its agent
        self.placement_policy = placement or sc_config.get("placement")
        if self.placement_policy not in ("spread", "pack"):
            raise UserError(f"placement must be 'spread' or 'pack', got {self.placement_policy!r}")
        self.cluster_id = f"{name or 'speccluster'}-{secrets.token_hex(4)}"
        # Every background task of the cluster; awaited by close_cluster.
        self.tasks = TaskSet(f"cluster {self.cluster_id}", logger)
        self.heal = heal
        self.min_workers_asked = min_workers
        self.min_workers = 0  # resolved once the initial spec is known
        self.start_errors: dict[Any, str] = {}  # entry key -> why its last start failed (reconcile.start_created)
        self.start_timeout = float(start_timeout or sc_config.get("start-timeout"))
        self.silence = float(silence or sc_config.get("silence"))
        self.worker_options = dict(worker_options or {})
        self.capacity = Capacity(self)
        self.reports = Reports(self)
        self.given_scheduler_address = scheduler_address
        settings = startup.connect_settings(known_hosts, known_hosts_policy, ssh_config, connect_timeout)
        self.pool = AgentPool(self.cluster_id, self.host_table, settings, silence=self.silence, agent_timeout=self.start_timeout)
        # Owns host health decisions and start-failure accounting; runs only with heal=True.
        self.healer = Healer(self, self.pool, self.tasks)
        # Other clusters' leases on the hosts: fair waiting for slots, and yielding idle ones.
        self.lease_watcher = LeaseWatcher(self, self.pool)
        # Wakes sleeping hosts when they are needed and powers idle woken ones off (speccluster_power_*).
        self.power = PowerKeeper(self, self.pool, self.tasks)
        self._found_no_room = False  # an entry left the spec for lack of room: regrow looks again
        self.operations = operations.Operations(self)  # restart, drain, undrain and reload, one at a time
        sec, files = make_security(sc_config.get("tls") if security is None else security, self.cluster_id)
        self.pool.files.update(files)  # sent to each host's cluster directory by its agent
        self.entry_settings = EntrySettings.for_tls_files(
            self.cluster_id, self.start_timeout, files, worker_options=self.worker_options,
            classes=PROCESS_CLASSES, process_base=RemoteProcess,
            dashboard_address=dashboards.checked_address(
                dashboard_address if dashboard_address is not None else sc_config.get("dashboard-address")
            ),
        )
        self.remote_security = self.entry_settings.remote_security

        # Where the scheduler runs and how the head reaches it; auto probes in start_cluster.
        self.reach_setting = reach.reach_setting(inventory, scheduler_reach)
        self.pool.agent_probes = self.reach_setting == "auto"  # agents probe as they start (reach.probe_reach)
        self.reach: reach.ReachChoice | None = None
        self.scheduler_options = dict(scheduler_options or {})
        self.idle = idle.IdleWatcher.for_cluster(self, idle_timeout, own_scheduler=scheduler is None)
        if scheduler is None:
            scheduler = startup.scheduler_entry(self, self.scheduler_options, sec)
        else:
            self.reach = reach.ReachChoice("direct", None, "the scheduler's spec was given to the cluster", "direct")
        self._entry_counter = 0  # the counter of entry names (not SpecCluster's _i, which its constructor resets)
        # Placed before SpecCluster starts, so that a synchronous constructor returns with every worker running.
        initial = startup.initial_spec(self, workers or {}, worker, n_workers)
        super().__init__(
            workers=initial, scheduler=dict(scheduler), worker=dict(worker) if worker else {"cls": RemoteNanny, "options": {}},
            asynchronous=asynchronous, loop=loop, security=sec, silence_logs=silence_logs, name=name,
            shutdown_on_close=shutdown_on_close, scheduler_sync_interval=scheduler_sync_interval,
        )

    # -- construction helpers -------------------------------------------
    @classmethod
    def from_name(  # type: ignore[override]
        cls, name: str, asynchronous: bool = False, loop: Any = None, shutdown_on_close: bool = False
    ) -> Any:
        """Attach to the detached cluster ``name``: a :class:`~speccluster_ssh.detached.DetachedCluster`.

        Attaching does not own: its ``close()`` only detaches, unless
        ``shutdown_on_close``; ``shutdown()`` tears the cluster down. See
        :meth:`DetachedCluster.from_name <speccluster_ssh.detached.DetachedCluster.from_name>`.
        """
        from .detached import DetachedCluster

        return DetachedCluster.from_name(name, asynchronous, loop, shutdown_on_close=shutdown_on_close)

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

    # Read from the host table, which reload changes: the inventory in effect, and its worker hosts by name.
    inventory: Inventory = property(lambda self: self.host_table.inventory)  # type: ignore[assignment]
    worker_hosts: Mapping[str, HostSpec] = property(lambda self: self.host_table.workers)  # type: ignore[assignment]
    total_slots: int = property(lambda self: sum(h.slots for h in self.worker_hosts.values()))  # type: ignore[assignment]

    def unavailable_hosts(self) -> set[str]:
        """Worker hosts nothing is placed on now: down, put aside or drained."""
        return self.healer.unavailable_hosts()

    @property
    def capacity_note(self) -> str:
        """The last shortfall of ``scale`` or ``adapt`` against the inventory's capacity; ``""`` when none."""
        return self.capacity.note

    @property
    def dead_logs(self) -> dict[str, str]:
        """Member name -> last log tail, for members whose processes are gone."""
        return self.reports.gone_logs

    @property
    def gone_member_hosts(self) -> dict[str, str]:
        """Member name -> the host its gone process ran on."""
        return self.reports.gone_member_hosts

    @property
    def last_heal_error(self) -> str:
        """Why the last healing pass failed, if one did."""
        return self.healer.last_error

    def next_entry(self) -> dict[str, Any] | None:
        """The next entry ``{name: spec}`` on a host with a free slot; ``None`` when there is none."""
        # Hosts that answer first; sleeping ones only when they have no room, one at a time.
        for unavailable, wakes in self.power.placement_rounds(self.unavailable_hosts()):
            entry, self._entry_counter = entries.next_entry(
                self.entry_settings,
                self.worker_hosts,
                self.worker_spec,
                self._entry_counter,
                unavailable=unavailable,
                policy=self.placement_policy,
                new_spec=self.new_spec,
                limits=self.slot_limits(),
            )
            if entry is not None:
                if wakes is not None:
                    self.healer.wake(f"an entry was placed on the sleeping host {wakes}")
                return entry
        return None

    def slot_limits(self) -> dict[str, int]:
        """Entries the cluster may have on each worker host beside other clusters (see :func:`sharing.slot_limits`)."""
        return slot_limits(self.host_table, self.cluster_id)

    # -- sharing the lab (the lease watcher's hooks) ------------------------
    def regrow(self) -> int:
        """Grow back towards the last target where slots are free now; the entries the cluster is still short of.

        Only while it is short because of the lab (a shortfall said, or an entry
        that found no room), and never under a restart, drain or reload: those
        take entries out of the spec on purpose, for a moment.
        """
        target = self.capacity.target
        if self.status != Status.running or target is None or self.operations.lock.locked():
            return 0
        if not (self.capacity.note or self._found_no_room):
            return 0
        self._found_no_room = False
        before = set(self.worker_spec)
        self.capacity.refill()
        if set(self.worker_spec) != before:
            self._reconcile_in_background("reconcile after slots were freed")
        if not self.capacity.note:
            return 0
        if not target.workers:  # short of cores or memory: as many entries as the inventory could add
            return max(self.total_slots - len(self.worker_spec), 1)
        have = sum(len(entries.member_names(k, s)) for k, s in self.worker_spec.items())
        per_entry = max((h.nworkers for h in self.worker_hosts.values()), default=1)
        return max(math.ceil((target.workers - have) / per_entry), 1)

    def member_names_of(self, entry: str) -> list[str]:
        """The dask worker names of spec entry ``entry`` (by its name); none once it left the spec."""
        for key, spec in self.worker_spec.items():
            if str(key) == entry:
                return entries.member_names(key, spec)
        return []

    async def yield_workers(self, names: Sequence[str]) -> None:
        """Give the slots of idle workers ``names`` back to a waiting cluster: retired, data moved first."""
        await self.scale_down(names)

    def forget_short_entry(self, key: Any) -> None:
        """Entry ``key`` found no room on its host (other clusters hold it): it leaves the spec and is waited for."""
        self.capacity.remember_target()
        self.worker_spec.pop(key, None)
        self._found_no_room = True
        self.lease_watcher.wake()

    def take_entry_name(self, taken: Collection[str] = ()) -> str:
        """A new spec key that no entry, process or name of ``taken`` has."""
        taken = {*map(str, self.worker_spec), *map(str, self.workers), *taken}
        name, self._entry_counter = entries.next_entry_name(taken, self._entry_counter)
        return name

    def new_worker_spec(self) -> dict[str, Any]:
        """Name and spec of the next entry, on a host with a free slot.

        Raises
        ------
        CapacityError
            When every slot of every usable host is taken.
        """
        entry = self.next_entry()
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
        target = Target(workers=int(n or 0), cores=int(cores or 0), memory=to_bytes(memory or 0))
        self.capacity.scale_to(target, growing_allowed=self.status not in (Status.closing, Status.closed))
        # scale() may be called from another thread: the task starts in the loop.
        self.loop.add_callback(self._reconcile_in_background, "reconcile after scale")
        if self.asynchronous:
            from distributed.utils import NoOpAwaitable

            return NoOpAwaitable()
        return None

    async def scale_down(self, workers: Sequence[Any]) -> None:
        """Remove the entries that hold ``workers`` (names, addresses or spec keys)."""
        for key in reconcile.keys_holding(self.worker_spec, self.scheduler_info.get("workers", {}), workers):
            self.worker_spec.pop(key, None)
        await self

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
            at the inventory's capacity (hosts down for now included, as they
            come back), and ``minimum`` at ``maximum``.
        minimum_cores, maximum_cores, minimum_memory, maximum_memory
            The same bounds in threads or bytes, turned into workers with the
            threads and memory of one worker of the next entry.
        **kwargs
            ``interval``, ``wait_count``, ``target_duration``, ``worker_key``
            and the rest of :class:`distributed.deploy.Adaptive`'s options.
        """
        minimum, maximum = self.capacity.adapt_bounds(
            minimum, maximum, minimum_cores, maximum_cores, minimum_memory, maximum_memory
        )
        return Cluster.adapt(self, Adaptive=Adaptive, minimum=minimum, maximum=maximum, **kwargs)

    def readiness(self) -> tuple[dict[str, int], dict[str, int]]:
        """Dask workers wanted and workers running, per host name.

        Counts entries still starting (not yet in ``workers``) as wanted, so
        progress can be shown while the constructor runs.
        """
        return self.reports.readiness()

    def scheduler_ready(self) -> bool:
        """Whether the scheduler runs: on its inventory host, or in this process."""
        scheduler = getattr(self, "scheduler", None)
        return scheduler is not None and scheduler.status == Status.running

    def capacity_workers(self) -> int:
        """Dask workers the inventory can hold when every usable slot is used."""
        return entries.capacity_workers(self.worker_hosts.values(), self.unavailable_hosts())

    # -- the life cycle, as SpecClusterBridge hands it over -------------
    async def start_cluster(self, start_scheduler: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]) -> None:
        await startup.start(self, start_scheduler, close)
        self.idle.start()  # idle time counts from a finished start, however long the start took

    async def reconcile_spec(self) -> None:
        await reconcile.reconcile_spec(self)
        # Heal only once the first reconcile succeeded: a constructor that
        # fails must raise its own error, not race the healer for it.
        if self.heal and self.status == Status.running:
            self.healer.start()
        if self.status == Status.running:
            self.lease_watcher.start()
            self.power.start()

    def _reconcile_in_background(self, why: str) -> None:
        """Start a reconcile as a task of the cluster (called in the event loop)."""
        if self.status not in (Status.closing, Status.closed):
            self.tasks.start(reconcile.in_background(self), name=why)

    async def reconcile_and_log(self) -> None:
        """Reconcile after ``scale``; a failure is logged here and handled by the healer."""
        try:
            # Shielded: the reconcile task is shared with close() and scale();
            # cancelling the healer must not cancel it under their feet.
            await asyncio.shield(self.reconcile_now())
        except Exception as exc:
            if self.status not in (Status.closing, Status.closed):
                logger.warning("could not start every worker: %s", exc)

    def follow_scheduler_event(self, op: str, msg: Any) -> None:
        reconcile.follow_scheduler_event(self, op, msg)

    async def close_cluster(self, whole: bool, close_spec_cluster: Callable[[], Awaitable[None]]) -> None:
        # The healer and retries first, so nothing starts while we close. Not
        # the whole task set: a reconcile that close() itself awaits may be
        # waiting for entry starts in it.
        if whole:
            reconcile.stop_hosts(self, CLOSE_GRACE)
        for part in (self.healer, self.lease_watcher, self.power, self.idle):
            await part.stop()
        try:
            if whole:
                adaptive = self.running_adaptive()
                if adaptive is not None:
                    adaptive.stop()  # before the entries go; its bounds stay readable
                async with self.spec_lock:
                    await reconcile.drop_entries(self)
            await close_spec_cluster()
        finally:
            try:
                await self.pool.close()
            finally:
                # Tasks started while closing (drops of lost workers, say).
                await self.tasks.close()

    # -- inspection ------------------------------------------------------
    @property
    def dashboard_link(self) -> str:
        return dashboards.cluster_link(self.scheduler, super().dashboard_link, remote=isinstance(self.scheduler, RemoteScheduler))

    def status_report(self) -> dict[str, Any]:
        """A JSON-able view of hosts, entries and workers, for ``status``."""
        report = self.reports.status_report()
        # How the head reaches the scheduler: {"mode", "why", "scheduler_host", "setting"}.
        report["scheduler_reach"] = self.reach.as_dict() if self.reach is not None else None
        report["dashboard"] = dashboards.where(
            self.scheduler, self.dashboard_link, remote=isinstance(self.scheduler, RemoteScheduler)
        )
        return report

    async def add_logs(self, logs: Any, scheduler: bool, workers: bool | Sequence[str]) -> Any:
        if scheduler:
            logs["Scheduler"] = await self.reports.scheduler_log()
        if not workers:
            return logs
        return await self.reports.worker_logs(logs, workers)
