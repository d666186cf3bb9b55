"""SpecCluster process interfaces for dask servers run by host agents.

A spec entry names its host; the interface is handed the cluster's
:class:`~speccluster_ssh.pool.AgentPool` when it is made (:func:`with_pool`:
the spec stays plain data), asks that host's agent to start one process (or
one per group suffix) and waits for each to report its real address. The agent tells
us the moment a process exits, so ``status`` and ``finished()`` follow the
remote process without waiting for a heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from . import timeline
from .addresses import bracket
from .agent import HostAgent
from .distributed_internals import set_finished
from .errors import HostError
from .placement import auto_memory_limit, slot_gpus, usable_cpus, worker_nthreads
from .sharing import LeaseShort, claim_entry, entry_gpu_count, release_entry
from .tasks import log_failures

logger = logging.getLogger(__name__)


from .pool import AgentPool, same_release

__all__ = [
    "AgentPool", "RemoteNanny", "RemoteProcess", "RemoteScheduler", "RemoteWorker", "same_release", "start_failure_cause",
    "with_pool",
]

_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Timeout)\b:? ?.*$")


def start_failure_cause(message: Mapping[str, Any]) -> str:
    """The cause of a failed start, from the agent's ``failed`` or ``exited`` event.

    The agent reports the exception chain; a process that died without
    reporting (killed, or failing before it could) is explained by the last
    error line of its log, when there is one.
    """
    error = str(message.get("error") or "")
    if " caused by " in error:
        return error
    lines = [line.strip() for line in str(message.get("tail") or "").splitlines()]
    logged = next((line for line in reversed(lines) if _ERROR_LINE.match(line)), "")
    if not error:
        error = f"exit {message.get('code')}"
    if logged and logged not in error:
        error = f"{error}; its log says: {logged}"
    return error


def with_pool(cls: Any, options: Mapping[str, Any], pool: AgentPool) -> dict[str, Any]:
    """The keyword options to make a spec entry's ``cls`` with: a :class:`RemoteProcess` class is handed ``pool``.

    Spec entries stay plain data (they name their cluster by its id); the pool
    is added only where the interface is made, so no registry of pools is needed.

    Parameters
    ----------
    cls
        The entry's class, or its import path (as SpecCluster accepts it).
    options
        The entry's options.
    pool
        The agent pool of the cluster that makes the interface.
    """
    if isinstance(cls, str):
        from distributed.utils import import_term  # only for specs written with a path

        cls = import_term(cls)
    made = dict(options)
    if isinstance(cls, type) and issubclass(cls, RemoteProcess):
        made["pool"] = pool
    return made


class _MemberStarts:
    """The start of one entry's members: one future per member, settled by its agent's events.

    An older process of the same name may still be exiting: its events carry
    another pid than the one this start got, and are not about this start.
    """

    def __init__(self, process: RemoteProcess) -> None:
        self.process = process
        loop = asyncio.get_running_loop()
        self.ready: dict[str, asyncio.Future[dict[str, Any]]] = {m: loop.create_future() for m in process.member_names}
        self.pids: dict[str, int] = {}  # member -> pid of the process this start began

    def ours(self, message: dict[str, Any]) -> bool:
        member = message.get("name")
        pid = message.get("pid")
        return member in self.ready and (pid is None or member not in self.pids or self.pids[member] == pid)

    def on_ready(self, message: dict[str, Any]) -> None:
        member = message.get("name")
        if self.ours(message) and not self.ready[member].done():
            timeline.stamp("worker_ready", self.process.host, str(member))
            self.ready[member].set_result(message)

    def on_failed(self, message: dict[str, Any]) -> None:
        member = message.get("name")
        if self.ours(message) and not self.ready[member].done():
            process = self.process
            cause = start_failure_cause(message)
            self.ready[member].set_exception(
                HostError(process.host, f"{process.role} {member} failed to start: {cause}", message.get("tail", ""))
            )

    def settle(self) -> None:
        """Cancel the members still starting and read every outcome of a start that failed."""
        for future in self.ready.values():
            # Read every outcome, or asyncio reports the other members'
            # failures as "Future exception was never retrieved".
            if future.done() and not future.cancelled():
                future.exception()
            else:
                future.cancel()


class RemoteProcess(ProcessInterface):
    """One spec entry: one dask server, or a group of them, on one host.

    Parameters
    ----------
    scheduler
        The scheduler address given by SpecCluster (workers only).
    name
        The spec key; workers register as ``str(name)`` or ``f"{name}{suffix}"``.
    host
        Inventory name of the host to run on.
    pool
        The cluster's :class:`~speccluster_ssh.pool.AgentPool`, which owns the
        host's agent; the cluster hands it over (:func:`with_pool`). An
        interface made without one cannot start.
    cluster
        Id of the cluster the entry belongs to, as its spec names it; it must
        be the pool's (default: the pool's).
    options
        Keyword options for the dask server class (JSON-able values).
    env
        Extra environment for the process.
    group
        Suffixes for a group entry: one process per suffix.
    start_timeout
        Seconds to wait for every process of the entry to report ready.
    worker_class
        Import path of the dask server class to run instead of the role's
        (``speccluster_worker_class``); the host's agent imports it.
    host_vars
        The host's variables sent with each start request, by field name
        (see :meth:`~speccluster_ssh.inventory.HostSpec.request_vars`); the
        host's agent reads them by name.
    gpu_slot, gpus
        The GPU share the entry was placed with (see
        :func:`~speccluster_ssh.placement.entry_gpus`): the host's GPU slot it
        holds (``None``: none was free) and each member's devices, or
        ``"auto"`` for the slot's share of the devices the host's agent found.

    Raises
    ------
    TypeError
        For an option not named above: options of the dask server itself go in ``options``.
    ValueError
        For a ``cluster`` id that is not the pool's.
    """

    role: ClassVar[str] = "worker"

    def __init__(
        self,
        scheduler: str | None = None,
        name: str | int | None = None,
        *,
        host: str,
        pool: AgentPool | None = None,
        cluster: str | None = None,
        options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        group: Sequence[str] | None = None,
        start_timeout: float = 60.0,
        stop_grace: float = 3.0,
        worker_class: str | None = None,
        host_vars: Mapping[str, Any] | None = None,
        gpu_slot: int | None = None,
        gpus: Sequence[Sequence[str]] | str | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            # Once passed on to the dask server as they were, so a misspelt one went unnoticed.
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {', '.join(map(repr, sorted(unknown)))}; "
                "options of the dask server go in its options={...}"
            )
        if pool is not None and cluster is not None and cluster != pool.cluster_id:
            raise ValueError(
                f"{type(self).__name__} {name!r} is an entry of cluster {cluster!r} "
                f"but was handed the agent pool of cluster {pool.cluster_id!r}"
            )
        super().__init__()
        self.scheduler = scheduler
        self.name = name
        self.host = host
        self.pool = pool
        self.cluster = cluster if cluster is not None else pool.cluster_id if pool is not None else None
        self.options = dict(options or {})
        self.env = dict(env or {})
        self.host_vars = dict(host_vars or {})
        self.worker_class = worker_class
        self.gpu_slot = gpu_slot
        self.placed_gpus = gpus if isinstance(gpus, str) or gpus is None else [[str(d) for d in g] for g in gpus]
        self.gpus: dict[str, list[str]] = {}  # member -> its GPU devices once started, on a host with speccluster_gpus
        self.group = list(group) if group else None
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.members: dict[str, dict[str, Any]] = {}
        self.exit_info: dict[str, dict[str, Any]] = {}
        self._agent: HostAgent | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._closing = False
        self._failed_callbacks: list[Callable[[RemoteProcess], None]] = []
        # The GPU devices the host granted with the entry's lease, and why a claim was refused.
        self.granted_gpus: list[str] | None = None
        self.lease_short: LeaseShort | None = None

    def on_failed(self, callback: Callable[[RemoteProcess], None]) -> None:
        """Call ``callback(self)`` when the entry fails: a process exited, the host was lost, or the start failed."""
        self._failed_callbacks.append(callback)

    def _set_failed(self) -> None:
        self.status = Status.failed
        set_finished(self)
        for callback in list(self._failed_callbacks):
            try:
                callback(self)
            except Exception:  # one broken watcher must not keep the others from hearing it
                logger.exception("failure callback of %s %s failed", self.role, self.name)

    def runs_under(self, agent: HostAgent) -> bool:
        """Whether this process was started through ``agent`` and has not ended (a restart's old agent, say)."""
        return self._agent is agent and self.status not in (Status.closed, Status.failed)

    @property
    def member_names(self) -> list[str]:
        base = str(self.name)
        return [base + suffix for suffix in self.group] if self.group else [base]

    @property
    def worker_address(self) -> str | list[str] | None:
        """Address of the dask worker(s) started, as the scheduler sees them."""
        addresses = [self.members.get(m, {}).get("worker_address") for m in self.member_names]
        if self.group:
            return addresses  # type: ignore[return-value]
        return addresses[0]

    def follow_worker(self, member: str, address: str | None) -> None:
        """Record the address the scheduler now has for ``member``.

        A nanny restarts its worker by itself (killed worker, memory limit,
        ``client.restart()``) under a new address; the cluster calls this on
        the scheduler's add and remove events, so ``worker_address`` stays
        what the scheduler has. ``None`` once the worker left.
        """
        info = self.members.get(member)
        if info is None:
            return
        if address is None:
            info["worker_address"] = None
        elif address != info.get("worker_address"):
            info["worker_address"] = address

    @property
    def pids(self) -> dict[str, int]:
        return {m: int(info["pid"]) for m, info in self.members.items() if "pid" in info}

    def _scheduler_for_host(self, pool: AgentPool) -> str | None:
        if self.scheduler is None:
            return None
        return pool.scheduler_address_for(self.host) or self.scheduler

    def _member_gpus(self, agent: HostAgent, pool: AgentPool) -> dict[str, list[str]]:
        """Each member's GPU devices, as the entry was placed: the pure layer chose them, or its slot under ``auto``."""
        placed = self.placed_gpus
        if placed is None or self.role == "scheduler":
            return {}
        if self.granted_gpus is not None:
            # The host chose them with the lease, apart from every other cluster's.
            per = len(self.granted_gpus) // len(self.member_names)
            placed = [self.granted_gpus[i * per:(i + 1) * per] for i in range(len(self.member_names))]
        if placed == "auto":
            found = [str(g) for g in agent.facts.get("gpus") or ()]
            if not found:
                return {}  # nvidia-smi found none: nothing to pin
            # Known only now, so shared here, by the same rule as a list in the inventory.
            placed = slot_gpus(found, pool.table.specs[self.host], self.gpu_slot, len(self.member_names))
        gpus = {member: list(placed[i]) if i < len(placed) else [] for i, member in enumerate(self.member_names)}
        for member, devices in gpus.items():
            if not devices:
                # No GPU rather than one shared with another entry.
                logger.warning("%s %s on %s gets no GPU: every GPU share of the host is held", self.role, member, self.host)
        return gpus

    def _member_env(self, member: str) -> dict[str, str]:
        env = dict(self.env)
        if member in self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[member])
            # CUDA numbers devices fastest first unless told; nvidia-smi numbers them by PCI bus.
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        return env

    def _process_options(self, member: str, agent: HostAgent) -> dict[str, Any]:
        options = dict(self.options)
        if member in self.gpus:
            options["resources"] = {**(options.get("resources") or {}), "GPU": len(self.gpus[member])}
        if self.role != "scheduler":
            options["name"] = member
            # Unset (None or 0) is read by one rule, also used by scaling and plan.
            cpus = usable_cpus(agent.facts.get("cpu_count"), self.host_vars.get("cpu_affinity"))
            options["nthreads"] = worker_nthreads(options.get("nthreads"), cpus,
                                                  len(self.member_names))
            if options.get("memory_limit") == "auto" and self.pool is not None and self.host in self.pool.table.specs:
                # The host's memory among all its slots, whoever holds them: not this cluster's workers alone.
                spec = self.pool.table.specs[self.host]
                options["memory_limit"] = auto_memory_limit(agent.facts.get("memory"), spec.slots, spec.nworkers) or "auto"
        if "host" not in options and "interface" not in options:
            listen = agent.facts.get("listen_address")
            if listen:
                options["host"] = bracket(listen)  # dask reads an unbracketed IPv6 host as host:port
        return options

    def _start_request(self, member: str, agent: HostAgent, pool: AgentPool, scheduler: str | None) -> dict[str, Any]:
        """The fields of the agent's ``start`` request for ``member``."""
        return {
            "name": member,
            "role": self.role,
            "scheduler": scheduler,
            "options": self._process_options(member, agent),
            "env": self._member_env(member),
            "config": pool.dask_config,
            "host_vars": self.host_vars,
            "worker_class": self.worker_class,
        }

    def _require_pool(self) -> AgentPool:
        if self.pool is None:
            raise RuntimeError(
                f"{self.role} {self.name} on {self.host} was made without an agent pool and cannot start; "
                "make it with pool=<the cluster's AgentPool>"
            )
        return self.pool

    async def start(self) -> None:
        pool = self._require_pool()
        try:
            agent = await pool.agent(self.host)
        except BaseException:
            # Failed, not still "created": nobody may start it again, and the
            # healer sees it as a dead entry (the host is down meanwhile).
            self._set_failed()
            raise
        self._agent = agent
        try:
            await self._claim_lease(pool, agent)
        except BaseException:
            self._set_failed()
            raise
        starts = _MemberStarts(self)
        self._unsubscribe = [
            agent.on("ready", starts.on_ready),
            agent.on("failed", starts.on_failed),
            agent.on("exited", partial(self._on_exited, starts)),
        ]
        agent.on_lost(self._on_agent_lost)
        scheduler = self._scheduler_for_host(pool)
        self.gpus = self._member_gpus(agent, pool)
        try:
            for member in self.member_names:
                timeline.stamp("start_request", self.host, member)
                reply = await agent.request("start", **self._start_request(member, agent, pool, scheduler))
                starts.pids[member] = int(reply["pid"])
                timeline.stamp("forked", self.host, member)
            done, pending = await asyncio.wait(starts.ready.values(), timeout=self.start_timeout)
            if pending:
                raise HostError(self.host, f"{self.role} {self.name} did not report ready within {self.start_timeout:g} s")
            for member, future in starts.ready.items():
                self.members[member] = future.result()
        except BaseException:
            starts.settle()
            await self._stop_members()
            await release_entry(pool, self.host, str(self.name))
            self._set_failed()
            raise
        first = self.members[self.member_names[0]]
        self.address = first.get("address")
        self.external_address = self.address
        self.status = Status.running

    async def _claim_lease(self, pool: AgentPool, agent: HostAgent) -> None:
        """Claim the entry's lease on its host (workers only: the scheduler takes no slot)."""
        if self.role == "scheduler":
            return
        spec = pool.table.specs[self.host]
        gpus = entry_gpu_count(spec, agent.facts) if self.placed_gpus is not None else 0
        try:
            held = await claim_entry(pool, agent, str(self.name), gpus)
        except LeaseShort as exc:
            self.lease_short = exc
            raise
        if gpus:
            self.granted_gpus = list(held.lease.amount.gpus)
        timeline.stamp("lease_claimed", self.host, str(self.name))

    def _on_exited(self, starts: _MemberStarts, message: dict[str, Any]) -> None:
        member = message.get("name")
        if member not in self.member_names or not starts.ours(message):
            return
        starts.on_failed(message)
        self.exit_info[member] = message
        if not self._closing and self.status == Status.running:
            logger.warning("%s %s on %s exited with code %s", self.role, member, self.host, message.get("code"))
            self._set_failed()

    def _on_agent_lost(self, reason: str) -> None:
        if not self._closing and self.status == Status.running:
            logger.warning("%s %s on %s lost: %s", self.role, self.name, self.host, reason)
            self._set_failed()

    async def _stop_members(self) -> None:
        agent = self._agent
        if agent is None or not agent.alive:
            return
        results = await asyncio.gather(
            *(agent.request("stop", name=m, grace=self.stop_grace, timeout=self.stop_grace + 10) for m in self.member_names),
            return_exceptions=True,
        )
        log_failures(results, self.member_names, logger, f"stopping {self.role} processes on {self.host}")

    def mark_closing(self) -> None:
        """From now on the entry's processes exiting, or its host's agent going, is no failure."""
        self._closing = True

    async def close(self, stop: bool = True) -> None:
        """Stop the entry's processes: SIGTERM, then SIGKILL after ``stop_grace``.

        ``stop=False`` only marks the entry closed: the whole cluster is
        closing, and its agents' shutdown stops every process of a host at once.
        """
        self._closing = True
        if stop:
            await self._stop_members()
        if self.pool is not None and self.role != "scheduler":
            if stop:
                await release_entry(self.pool, self.host, str(self.name))
            else:
                self.pool.table.let_go(self.host, str(self.name))  # ends with the host's agent, which is stopping
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        await super().close()  # closed, and finished() returns

    async def tail(self, nbytes: int = 16384) -> dict[str, str]:
        """The tail of each member's remote log."""
        if self._agent is None or not self._agent.alive:
            return {m: info.get("tail", "") for m, info in self.exit_info.items()}
        out: dict[str, str] = {}
        for member in self.member_names:
            try:
                reply = await self._agent.request("tail", name=member, bytes=nbytes)
            except HostError as exc:
                logger.info("no log tail of %s on %s: %s", member, self.host, exc)
                continue
            out[member] = str(reply.get("data", ""))
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} on {self.host}: status={self.status.name}>"


class RemoteWorker(RemoteProcess):
    """A dask ``Worker`` (no nanny) on a remote host."""

    role = "worker"


class RemoteNanny(RemoteProcess):
    """A dask ``Nanny`` and the worker it keeps alive, on a remote host."""

    role = "nanny"


class RemoteScheduler(RemoteProcess):
    """The dask scheduler on a remote host.

    ``address`` is the scheduler's address as it reported it; the dashboard
    link uses the port it reported.
    """

    role = "scheduler"

    def __init__(self, *, host: str, **kwargs: Any) -> None:
        super().__init__(None, "scheduler", host=host, **kwargs)

    @property
    def dashboard_port(self) -> int | None:
        info = self.members.get("scheduler", {})
        port = info.get("dashboard_port")
        return int(port) if port else None

    @property
    def worker_address(self) -> None:
        return None

