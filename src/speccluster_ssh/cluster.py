"""SSHSpecCluster: a SpecCluster whose entries run on inventory hosts.

The scheduler runs on the head (in this process) unless the inventory has a
``scheduler`` group, in which case a host agent runs it there. Workers are
placed on worker hosts slot by slot (see :mod:`speccluster_ssh.placement`).
A healing loop relaunches entries whose processes died, re-places entries of
hosts that were lost, and retries lost hosts with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import dask
from dask.utils import parse_bytes
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.spec import SpecCluster
from distributed.scheduler import Scheduler

from . import config as sc_config
from .connection import ConnectSettings
from .errors import HostError, UserError
from .inventory import HostSpec, Inventory, load_inventory
from .placement import EntryShape, Target, choose_host, entries_to_remove
from .process import AgentPool, RemoteNanny, RemoteProcess, RemoteScheduler, RemoteWorker

logger = logging.getLogger(__name__)

FAILURES_BEFORE_ASIDE = 3


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
            members = cluster._member_names(key, spec)
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
        self.heal = heal
        self.start_timeout = float(start_timeout or sc_config.get("start-timeout"))
        self.silence = float(silence or sc_config.get("silence"))
        self.worker_options = dict(worker_options or {})
        self.capacity_note = ""
        self.dead_logs: dict[str, str] = {}
        self._entry_failures: dict[str, int] = {}
        self._heal_task: asyncio.Task[None] | None = None
        self._scheduler_address = scheduler_address
        worker_hosts = {h.name: h for h in inventory.worker_hosts}
        self.worker_hosts = worker_hosts
        all_hosts = dict(worker_hosts)
        if inventory.scheduler_host is not None:
            all_hosts[inventory.scheduler_host.name] = inventory.scheduler_host
        settings = ConnectSettings(
            known_hosts=known_hosts,
            known_hosts_policy=known_hosts_policy or sc_config.get("known-hosts"),
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
        self.pool.on_host_lost(self._host_lost)
        if security is None:
            security = sc_config.get("tls")
        self.security_files: dict[str, bytes] = {}
        sec, files = make_security(security, self.cluster_id)
        self.pool.files.update(files)
        self.remote_security = {k: v for k, v in _remote_security_paths(files).items()}

        if scheduler is None:
            scheduler = self._scheduler_spec(dict(scheduler_options or {}), sec)
        self._i = 0
        initial: dict[str, Any] = dict(workers or {})
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

    def _scheduler_spec(self, options: dict[str, Any], sec: Any) -> dict[str, Any]:

        sched_host = self.inventory.scheduler_host
        if sched_host is not None:
            remote_options: dict[str, Any] = {
                "port": sched_host.scheduler_port,
                "dashboard_address": f":{sched_host.dashboard_port if sched_host.dashboard_port is not None else sc_config.get('dashboard-port')}",
            }
            if sched_host.interface:
                remote_options["interface"] = sched_host.interface
            if self.remote_security:
                remote_options["security"] = dict(self.remote_security, require_encryption=True)
            remote_options.update(options)
            return {
                "cls": RemoteScheduler,
                "options": {
                    "host": sched_host.name,
                    "cluster": self.cluster_id,
                    "options": remote_options,
                    "env": dict(sched_host.env),
                    "start_timeout": self.start_timeout,
                },
            }
        local_options: dict[str, Any] = {
            "host": "0.0.0.0",
            "port": int(sc_config.get("scheduler-port")),
            "dashboard_address": f":{sc_config.get('dashboard-port')}",
            "security": sec,
            "protocol": "tls" if sec.require_encryption else "tcp",
        }
        local_options.update(options)
        return {"cls": Scheduler, "options": local_options}

    @property
    def total_slots(self) -> int:
        return sum(h.slots for h in self.worker_hosts.values())

    def _member_names(self, key: Any, spec: Mapping[str, Any]) -> list[str]:
        group = spec.get("group")
        return [str(key) + s for s in group] if group else [str(key)]

    def _slots_used(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for spec in self.worker_spec.values():
            host = spec.get("options", {}).get("host")
            if host is not None:
                used[host] = used.get(host, 0) + 1
        return used

    def _unavailable_hosts(self) -> set[str]:
        return {n for n, s in self.pool.states.items() if s.state in ("down", "aside")}

    def _entry_for_host(self, host: HostSpec) -> dict[str, Any]:
        """The spec of one entry on ``host`` (without its name)."""
        facts = self.pool.agents[host.name].facts if host.name in self.pool.agents else {}
        options: dict[str, Any] = {"nthreads": self._threads_on(host, facts)}
        options["memory_limit"] = host.memory_limit
        if host.resources:
            options["resources"] = dict(host.resources)
        if host.local_directory:
            options["local_directory"] = host.local_directory
        if host.interface:
            options["interface"] = host.interface
        options["dashboard_address"] = ":0"
        if self.remote_security:
            options["security"] = dict(self.remote_security, require_encryption=True)
        options.update(host.worker_options)
        options.update(self.worker_options)
        cls = RemoteNanny if host.worker_class == "nanny" else RemoteWorker
        if self.new_spec and self.new_spec.get("cls") not in (None, RemoteNanny) and isinstance(self.new_spec.get("cls"), type):
            if issubclass(self.new_spec["cls"], RemoteProcess):
                cls = self.new_spec["cls"]
        if self.new_spec:
            options.update(self.new_spec.get("options", {}))
        spec: dict[str, Any] = {
            "cls": cls,
            "options": {
                "host": host.name,
                "cluster": self.cluster_id,
                "options": options,
                "env": dict(host.env),
                "start_timeout": self.start_timeout,
            },
        }
        if host.nworkers > 1:
            spec["group"] = [f"-{i}" for i in range(host.nworkers)]
        return spec

    @staticmethod
    def _threads_on(host: HostSpec, facts: Mapping[str, Any]) -> int:
        if host.nthreads:
            return int(host.nthreads)
        cpus = int(facts.get("cpu_count") or 1)
        return max(1, cpus // max(1, host.nworkers))

    def _shape(self, spec: Mapping[str, Any]) -> EntryShape:
        opts = spec.get("options", {})
        inner = opts.get("options", {})
        host_name = opts.get("host", "")
        group = spec.get("group")
        workers = len(group) if group else 1
        threads = int(inner.get("nthreads") or 1)
        memory = inner.get("memory_limit")
        if isinstance(memory, str) and memory != "auto":
            memory = parse_bytes(memory)
        if not isinstance(memory, int) or memory <= 0:
            facts = self.pool.agents[host_name].facts if host_name in self.pool.agents else {}
            total = int(facts.get("memory") or 0)
            cpus = int(facts.get("cpu_count") or 1)
            memory = int(total * min(1.0, threads / cpus)) if total else 0
        return EntryShape(host=host_name, workers=workers, threads=threads, memory=memory)

    def _next_entry(self) -> dict[str, Any] | None:
        host_name = choose_host(
            {n: h.slots for n, h in self.worker_hosts.items()},
            self._slots_used(),
            self._unavailable_hosts(),
            self.placement_policy,
        )
        if host_name is None:
            return None
        while str(self._i) in self.worker_spec:
            self._i += 1
        name = str(self._i)
        self._i += 1
        return {name: self._entry_for_host(self.worker_hosts[host_name])}

    def new_worker_spec(self) -> dict[str, Any]:
        """Name and spec of the next entry, on a host with a free slot.

        Raises
        ------
        HostError
            When every slot of every usable host is taken.
        """
        entry = self._next_entry()
        if entry is None:
            raise HostError("*", "no free slot on any usable host")
        return entry

    # -- scaling ---------------------------------------------------------
    def scale(self, n: int = 0, memory: str | int | None = None, cores: int | None = None) -> Any:
        """Scale to at least ``n`` dask workers, ``cores`` threads and ``memory`` bytes.

        Counts dask workers (a group entry counts as its size, rounded up to
        whole entries). Past the inventory's capacity it scales to capacity
        and says so once, in the log and in :meth:`status_report`.
        """
        target = Target(
            workers=int(n or 0),
            cores=int(cores or 0),
            memory=parse_bytes(memory) if isinstance(memory, str) else int(memory or 0),
        )
        shapes = {key: self._shape(spec) for key, spec in self.worker_spec.items()}
        if not target.met_by(list(shapes.values())):
            if self.status not in (Status.closing, Status.closed):
                self._grow(target, shapes)
        else:
            self._shrink(target, shapes)
        self.loop.add_callback(self._correct_state)
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
        if note != self.capacity_note:
            logger.warning("scaled to capacity: %s", note)
        self.capacity_note = note

    def _shrink(self, target: Target, shapes: dict[Any, EntryShape]) -> None:
        keys = list(shapes)
        registered = set()
        with contextlib.suppress(Exception):
            registered = {str(w["name"]) for w in self.scheduler_info.get("workers", {}).values()}

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
        host_name = choose_host(
            {n: h.slots for n, h in self.worker_hosts.items()}, {}, self._unavailable_hosts(), self.placement_policy
        )
        if host_name is None:
            return None
        return self._entry_for_host(self.worker_hosts[host_name])

    def _threads_per_worker(self) -> int:
        return self._per_worker()[0]

    def _memory_per_worker(self) -> int:
        memory = self._per_worker()[1]
        if not memory:
            raise UserError("scaling by memory needs speccluster_memory_limit or a connected host")
        return memory

    def adapt(self, Adaptive: type[Adaptive] = SSHAdaptive, **kwargs: Any) -> Adaptive:  # noqa: N803
        """Scale automatically with the scheduler's load; see :meth:`SpecCluster.adapt`.

        Accepts ``minimum``/``maximum`` (workers), ``minimum_cores``/``maximum_cores``,
        ``minimum_memory``/``maximum_memory``, ``interval``, ``wait_count`` and
        ``target_duration``. Group entries are retired whole.
        """
        kwargs.setdefault("maximum", self.capacity_workers())
        if math.isinf(kwargs["maximum"]) or kwargs["maximum"] > self.capacity_workers():
            kwargs["maximum"] = self.capacity_workers()
        return super().adapt(Adaptive=Adaptive, **kwargs)

    def capacity_workers(self) -> int:
        """Dask workers the inventory can hold when every usable slot is used."""
        return sum(h.slots * h.nworkers for n, h in self.worker_hosts.items() if n not in self._unavailable_hosts())

    # -- reconciling -----------------------------------------------------
    async def _start(self) -> None:
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
        if self.heal and self._heal_task is None:
            self._heal_task = asyncio.ensure_future(self._heal_loop())

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
                    with contextlib.suppress(Exception):
                        await self.scheduler_comm.retire_workers(names=names, remove=True, close_workers=False)
                await asyncio.gather(*(self.workers[k].close() for k in to_close), return_exceptions=True)
                for key in to_close:
                    self._keep_logs(key, self.workers.pop(key, None))
            to_open = [k for k in self.worker_spec if k not in self.workers]
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
                self._created.add(worker)
                created.append((key, worker))
            if created:
                tasks = [asyncio.ensure_future(_await(w)) for _, w in created]
                await asyncio.wait(tasks)
                for key, worker in created:
                    self.workers[key] = worker
                    worker._cluster = weakref.ref(self)
                await asyncio.gather(*tasks)

    def _keep_logs(self, key: Any, worker: Any) -> None:
        if isinstance(worker, RemoteProcess):
            for member, info in worker.exit_info.items():
                self.dead_logs[member] = str(info.get("tail", ""))

    def _host_lost(self, host: str, reason: str) -> None:
        logger.warning("host %s lost: %s", host, reason)

    async def _heal_loop(self) -> None:
        interval = float(sc_config.get("heal-interval"))
        while self.status not in (Status.closing, Status.closed):
            try:
                await self._heal_once()
            except Exception as exc:  # keep healing; the reason shows in status
                logger.warning("healing failed: %s", exc)
                self.last_heal_error = str(exc)
            await asyncio.sleep(interval)

    async def _heal_once(self) -> None:
        now = time.monotonic()
        # Retry lost hosts with backoff.
        for name, state in self.pool.states.items():
            if state.state == "down" and now >= state.retry_at and name in self._hosts_wanted():
                state.retry_at = now + state.backoff
                state.backoff = min(state.backoff * 2, 60.0)
                with contextlib.suppress(HostError):
                    await self.pool.agent(name)
        dead = [
            k for k, w in self.workers.items()
            if isinstance(w, RemoteProcess) and w.status in (Status.failed, Status.closed) and k in self.worker_spec
        ]
        for key in dead:
            worker = self.workers.pop(key)
            await worker.close()
            self._keep_logs(key, worker)
            host = worker.host
            failures = self._entry_failures.get(host, 0) + 1
            self._entry_failures[host] = failures
            state = self.pool.states.get(host)
            if state is not None and failures >= FAILURES_BEFORE_ASIDE and not worker.members:
                state.state = "aside"
                state.reason = f"failed to start workers {failures} times"
            if host in self._unavailable_hosts():
                self._replace(key)
        # Entries on hosts that went down before they were created.
        for key, spec in list(self.worker_spec.items()):
            if spec["options"].get("host") in self._unavailable_hosts() and key not in self.workers:
                self._replace(key)
        if set(self.worker_spec) != set(self.workers) and self.status == Status.running:
            try:
                await self._correct_state()
            except Exception as exc:
                logger.warning("could not start every worker: %s", exc)

    def _hosts_wanted(self) -> set[str]:
        wanted = {spec["options"].get("host") for spec in self.worker_spec.values()}
        return wanted | set(self.worker_hosts)

    def _replace(self, key: Any) -> None:
        """Move entry ``key`` to another host with a free slot, or drop it if none."""
        spec = self.worker_spec.pop(key)
        host_name = choose_host(
            {n: h.slots for n, h in self.worker_hosts.items()},
            self._slots_used(),
            self._unavailable_hosts(),
            self.placement_policy,
        )
        if host_name is None:
            # Keep the entry wanted: it comes back when a host returns.
            self.worker_spec[key] = spec
            return
        new = self._entry_for_host(self.worker_hosts[host_name])
        self.worker_spec[key] = new
        logger.info("entry %s moved from %s to %s", key, spec["options"].get("host"), host_name)

    async def _close(self) -> None:
        if self._heal_task is not None:
            self._heal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._heal_task
            self._heal_task = None
        try:
            await super()._close()
        finally:
            await self.pool.close()

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
        for name, host in self.worker_hosts.items():
            state = self.pool.states[name]
            hosts[name] = {
                "address": host.address,
                "slots": host.slots,
                "slots_used": self._slots_used().get(name, 0),
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
                        "status": "running" if addr else (proc.status.name if proc else "pending"),
                        "threads": winfo.get("nthreads"),
                        "memory_limit": winfo.get("memory_limit"),
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

    async def _get_logs(self, cluster: bool = True, scheduler: bool = True, workers: bool | Sequence[str] = True) -> Any:
        logs = await super()._get_logs(cluster=cluster, scheduler=scheduler, workers=False)
        if not workers:
            return logs
        wanted = None if workers is True else {str(w) for w in workers}  # type: ignore[union-attr]
        for key, proc in list(self.workers.items()):
            if isinstance(proc, RemoteProcess):
                for member, text in (await proc.tail()).items():
                    if wanted is None or member in wanted:
                        logs[member] = text
        for member, text in self.dead_logs.items():
            if (wanted is None or member in wanted) and member not in logs:
                logs[member] = text
        return logs


async def _await(worker: Any) -> Any:
    return await worker


def _remote_security_paths(files: Mapping[str, bytes]) -> dict[str, str]:
    """Security keyword options for remote servers, as paths relative to the host's cluster dir.

    The agent resolves them; see :func:`speccluster_ssh.security.make_security`.
    """
    if not files:
        return {}
    return {"tls_ca_file": "tls/ca.pem", "tls_scheduler_cert": "tls/node.pem", "tls_scheduler_key": "tls/node.key",
            "tls_worker_cert": "tls/node.pem", "tls_worker_key": "tls/node.key",
            "tls_client_cert": "tls/node.pem", "tls_client_key": "tls/node.key"}

