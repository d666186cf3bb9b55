"""Sharing a lab (issue 23), the head's mechanism: claims, wants and the lease watcher.

Each entry claims a lease on its host before its processes start
(:func:`claim_entry`, called by the process interface) and gives it back
when they stop (:func:`release_entry`); the host's agent holds it, so it
ends with the agent whatever kills it. What was claimed, and every other
cluster's leases as each host last listed them, live in the host table.

:class:`LeaseWatcher` keeps that view fresh and acts on it, one task per
cluster:

- it lists each worker host's leases (every few seconds while the cluster is
  short of its target, less often otherwise);
- while the cluster is short, it records a *want* on the hosts other clusters
  fill, and grows the spec again as soon as a slot is free for it (fair
  share decides, :func:`~speccluster_ssh.leases.fair_limits`), without anyone
  calling ``scale``; once the target is met it removes its wants;
- it marks each lease busy or idle, for ``hosts`` (when the agent can);
- an adaptive cluster whose idle workers above its minimum have been idle for
  ``speccluster_yield_after`` while another cluster waits for their hosts
  retires them (their data moves first), so the waiting cluster gets the slots.

The arithmetic is pure and lives in :mod:`speccluster_ssh.leases`; the
functions here that need no I/O (:func:`host_capacity_of`,
:func:`slot_limits`) only read the table.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import math
import socket
import time
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import HostError
from .leases import Amount, entry_amount, fair_limits, host_capacity, quota_refusal

if TYPE_CHECKING:
    from .agent import HeldLease, HostAgent, LeaseRefused
    from .cluster_protocols import SharingCluster
    from .hosts import HostTable
    from .inventory import HostSpec
    from .leases import Lease
    from .pool import AgentPool

logger = logging.getLogger("speccluster_ssh.cluster")  # the messages users know from the cluster's log

#: Seconds between lease listings while the cluster waits for slots, and otherwise.
SHORT_INTERVAL = 2.0
IDLE_INTERVAL = 15.0
LIST_TIMEOUT = 10.0


class LeaseShort(HostError):
    """An entry's claim did not fit on its host: other clusters hold the rest, or the user's quota is reached.

    No failure of the host: the entry is dropped and the cluster waits for a
    free slot. ``refusal`` is the host's answer; ``quota`` says the head
    refused it for ``speccluster_user_quota``.
    """

    def __init__(self, host: str, reason: str, refusal: LeaseRefused | None = None, *, quota: bool = False) -> None:
        super().__init__(host, reason)
        self.refusal = refusal
        self.quota = quota


# -- pure: what a host gives, and what this cluster may place ---------------------------------------


def host_devices(spec: HostSpec, facts: Mapping[str, Any]) -> tuple[str, ...]:
    """The GPU devices of a host: its inventory's list, or what its agent found under ``auto``."""
    if spec.gpus == "auto":
        return tuple(str(g) for g in facts.get("gpus") or ())
    return tuple(str(g) for g in spec.gpus) if isinstance(spec.gpus, (list, tuple)) else ()


def host_capacity_of(spec: HostSpec, facts: Mapping[str, Any] | None = None) -> Amount:
    """A host's capacity as the inventory gives it (devices found by its agent under ``gpus: auto``)."""
    return host_capacity(
        spec.slots, nworkers=spec.nworkers, nthreads=spec.nthreads, memory_limit=spec.memory_limit,
        gpus=list(host_devices(spec, facts or {})),
    )


def entry_gpu_count(spec: HostSpec, facts: Mapping[str, Any] | None = None) -> int:
    """GPU devices one entry (one slot) of the host uses: the slot's even share, 0 without GPUs."""
    devices = host_devices(spec, facts or {})
    return len(devices) // spec.slots if devices and spec.slots else 0


def per_entry_of(spec: HostSpec, facts: Mapping[str, Any] | None = None) -> Amount:
    """What one entry of the host uses (see :func:`~speccluster_ssh.leases.entry_amount`)."""
    return entry_amount(spec.slots, host_capacity_of(spec, facts), entry_gpu_count(spec, facts))


def lab_quota(table: HostTable) -> dict[str, int] | None:
    """``speccluster_user_quota`` of the lab: the first worker host's (one value for the lab, under all.vars)."""
    for spec in table.workers.values():
        return spec.user_quota
    return None


def slot_limits(table: HostTable, cluster: str) -> dict[str, int]:
    """Entries ``cluster`` may have on each worker host whose leases are known (the others: its slots)."""
    hosts = {}
    for name, spec in table.workers.items():
        if name in table.leases:
            facts = table.agents[name].facts if name in table.agents else {}
            hosts[name] = (host_capacity_of(spec, facts), per_entry_of(spec, facts))
    limits = fair_limits(hosts, table.lab_leases(), cluster, lab_quota(table))
    return {name: min(table.workers[name].slots, limit) for name, limit in limits.items()}


def lab_user(table: HostTable, cluster: str, spec: HostSpec) -> str:
    """The user this cluster's leases are under: as its hosts name it, else the inventory's or the head's."""
    for lease in table.lab_leases():
        if lease.cluster == cluster:
            return lease.user
    return spec.user or getpass.getuser()


def holders_text(leases: Iterable[Lease]) -> str:
    """``2 slots held by root (cluster alpha from vm, since 12:52)``: the live leases of a host, by holder."""
    groups: dict[tuple[str, str, str], list[Lease]] = {}
    for lease in leases:
        if lease.held:
            groups.setdefault((lease.user, lease.name or lease.cluster, lease.head or "?"), []).append(lease)
    parts = []
    for (user, name, head), held in groups.items():
        slots = sum(lease.amount.slots for lease in held)
        since = time.strftime("%H:%M", time.localtime(min(lease.since for lease in held)))
        parts.append(f"{slots} slot{'' if slots == 1 else 's'} held by {user} (cluster {name} from {head}, since {since})")
    return "; ".join(parts) or "no one holds it (the host's capacity is smaller than one entry)"


def display_name(cluster_id: str) -> str:
    """The name a cluster was given (its id without the random suffix)."""
    return cluster_id.rsplit("-", 1)[0] if "-" in cluster_id else cluster_id


# -- claims and releases ------------------------------------------------------------------------------



async def claim_entry(pool: AgentPool, agent: HostAgent, entry: str, gpus: int = 0) -> HeldLease:
    """Claim the lease of one entry on ``agent``'s host before its processes start.

    Raises
    ------
    LeaseShort
        Other clusters hold what the entry needs (or the user's quota is
        reached): who holds it is in the message.
    HostError
        The claim could not be made (an unsafe lease directory, say), with its fix.
    """
    from .agent import LeaseRefused

    table = pool.table
    host = agent.host.name
    spec = table.specs[host]
    quota = lab_quota(table)
    if quota:
        user = lab_user(table, pool.cluster_id, spec)
        pending = table.claims_in_flight
        refusal = quota_refusal(quota, user, table.lab_leases(), 1 + pending)
        if refusal:
            claiming = f" (counting the {pending} this cluster is claiming now)" if pending else ""
            raise LeaseShort(host, refusal + claiming, quota=True)
    table.claims_in_flight += 1
    try:
        reply = await _claim(agent, spec, entry, display_name(pool.cluster_id), gpus)
    finally:
        table.claims_in_flight -= 1
    if isinstance(reply, LeaseRefused):
        table.see_leases(host, reply.holders)
        raise LeaseShort(host, f"no room for entry {entry}: {holders_text(reply.holders)}", reply)
    table.hold(host, entry, agent, reply)
    return reply


async def _claim(agent: HostAgent, spec: HostSpec, entry: str, name: str, gpus: int
                 ) -> HeldLease | LeaseRefused:  # fmt: skip
    """The claim request of one entry: what it holds, against the host's capacity."""
    host = agent.host.name
    capacity = host_capacity_of(spec, agent.facts)
    per_entry = per_entry_of(spec, agent.facts)
    holds = {"slots": 1, "cores": per_entry.cores or 0, "memory": per_entry.memory or 0, "gpus": gpus}
    limit = {"slots": capacity.slots, "cores": capacity.cores or 0, "memory": capacity.memory or 0,
             "gpus": list(capacity.gpus)}
    try:
        return await agent.lease_claim(holds, limit, name=name, head=socket.gethostname(), entry=entry)
    except HostError as exc:
        if not exc.fix or exc.fix in exc.reason:
            raise
        # A failed entry start is known by its message alone (the healer's log, a put-aside host's
        # reason, the start error): the fix goes in it, or the user never sees it.
        raise HostError(host, f"{exc.reason}; fix: {exc.fix}", exc.tail, fix=exc.fix) from exc


async def release_entry(pool: AgentPool, host: str, entry: str) -> None:
    """Give entry ``entry``'s lease on ``host`` back (its processes stopped); a no-op when it holds none."""
    released = pool.table.let_go(host, entry)
    if released is None:
        return
    agent, lease = released
    if not agent.alive:
        return  # its leases ended with it
    try:
        await agent.lease_release(lease.lease_id)
    except HostError as exc:  # the agent went meanwhile: so did the lease
        logger.info("lease of entry %s on %s not released: %s", entry, host, exc)


# -- the watcher ---------------------------------------------------------------------------------------


class LeaseWatcher:
    """Keeps one cluster's view of the lab fresh, waits for slots fairly and yields idle ones (see the module).

    Parameters
    ----------
    cluster
        The cluster it acts for.
    pool
        The cluster's agents (and through them its host table).
    """

    def __init__(self, cluster: SharingCluster, pool: AgentPool) -> None:
        self.cluster = cluster
        self.pool = pool
        self.table = pool.table
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle_since: dict[str, float] = {}  # worker name -> when it was first seen idle
        self._marked: dict[str, str] = {}  # lease id -> the state last marked
        self._told: dict[str, str] = {}  # host -> the holders last said, so each is said once
        self.passes = 0

    def start(self) -> None:
        """Start watching (once), as a task of the cluster."""
        if self._task is None:
            self._task = self.cluster.tasks.start(self._run(), name="lease watcher")

    async def stop(self) -> None:
        """Stop watching and wait until it ended."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    def wake(self) -> None:
        """Look at the lab soon (a claim was refused, a lease released)."""
        self._wake.set()

    def limits(self) -> dict[str, int]:
        """Entries the cluster may have on each worker host now (see :func:`slot_limits`)."""
        return slot_limits(self.table, self.pool.cluster_id)

    async def _run(self) -> None:
        from distributed.core import Status

        cluster = self.cluster
        interval = SHORT_INTERVAL
        for _ in range(10**9):  # bounded; the cluster's close cancels it
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            self._wake.clear()
            if cluster.status in (Status.closing, Status.closed):
                return
            try:
                short = await self.watch_once()
            except Exception as exc:  # keep watching; the log says why each time
                logger.warning("lease watcher: %s: %s", type(exc).__name__, exc, exc_info=exc)
                short = True
            interval = SHORT_INTERVAL if short else IDLE_INTERVAL

    async def watch_once(self) -> bool:
        """One pass: list, grow into free slots, want or unwant, mark, yield; whether the cluster is short."""
        self.passes += 1
        await self.refresh()
        cluster = self.cluster
        short = cluster.regrow()
        await self.tend_wants(short)
        await self.mark_states()
        waited_for = await self.yield_idle()
        # Looked at often while it waits, or while others wait for its hosts (it may yield).
        return bool(short) or waited_for

    async def refresh(self, hosts: Collection[str] | None = None) -> None:
        """List the leases of the worker hosts that have an agent (all of them, or ``hosts``)."""
        agents = {n: a for n, a in self.table.agents.items()
                  if a.alive and n in self.table.workers and (hosts is None or n in hosts)}
        results = await asyncio.gather(*(a.lease_list(timeout=LIST_TIMEOUT) for a in agents.values()),
                                       return_exceptions=True)
        now = time.monotonic()
        for name, result in zip(agents, results):
            if isinstance(result, BaseException):
                logger.info("leases of %s not listed: %s", name, result)
                continue
            self.table.see_leases(name, result, now)

    def wanted_here(self, short: int) -> dict[str, int]:
        """Slots to want on the usable worker hosts that other clusters fill: ``short`` in all, in placement order.

        No more than the cluster lacks, so a cluster that yields slots to it
        yields no more than it waits for.
        """
        used: dict[str, int] = {}
        for spec in self.cluster.worker_spec.values():
            host = spec.get("options", {}).get("host")
            used[host] = used.get(host, 0) + 1
        unavailable = self.table.unavailable()
        limits = self.limits()
        wants: dict[str, int] = {}
        for name, spec in self.table.workers.items():
            room = spec.slots - used.get(name, 0)
            if short <= 0:
                break
            if name not in unavailable and name in limits and limits[name] < spec.slots and room > 0:
                wants[name] = min(room, short)
                short -= wants[name]
        return wants

    async def tend_wants(self, short: int) -> None:
        """Record wants for the ``short`` entries the cluster waits for, where others hold slots; none once it waits no more."""
        wanted = self.wanted_here(short) if short else {}
        current = self.table.wanting()
        for name, want in current.items():
            if wanted.get(name) != want.lease.amount.slots:
                old = self.table.set_want(name, None)
                if old is not None and old[0].alive:
                    await old[0].lease_unwant(want.lease_id)
        for name, slots in wanted.items():
            if name in self.table.wanting() or name not in self.table.agents:
                continue
            agent = self.table.agents[name]
            held = await agent.lease_want({"slots": slots}, name=display_name(self.pool.cluster_id),
                                          head=socket.gethostname())
            self.table.set_want(name, (agent, held))
            self._say_holders(name)
        if wanted:
            # Our wants are part of the lab now: fair share counts them.
            await self.refresh(wanted)

    def _say_holders(self, host: str) -> None:
        """Say once who holds the host this cluster waits for."""
        others = [le for le in self.table.leases.get(host, ())
                  if le.held and le.cluster != self.pool.cluster_id and le.host == host]
        text = holders_text(others) if others else ""
        if text and self._told.get(host) != text:
            self._told[host] = text
            message = f"waiting for a slot on {host}: {text}"
            logger.warning("%s", message)
            self.cluster.log_event(message, echo=False)

    def _idle_workers(self) -> dict[str, str]:
        """Registered worker name -> address, of the workers with no task now."""
        idle = {}
        for address, info in (self.cluster.scheduler_info or {}).get("workers", {}).items():
            metrics = info.get("metrics") or {}
            if not metrics.get("executing") and not metrics.get("in_flight") and not info.get("processing"):
                idle[str(info.get("name"))] = address
        return idle

    async def mark_states(self) -> None:
        """Mark each lease busy or idle, as its entry's workers are (shown by ``hosts``)."""
        idle = self._idle_workers()
        now = time.monotonic()
        self._idle_since = {name: self._idle_since.get(name, now) for name in idle}
        live = {lease.lease_id for held in self.table.held.values() for lease in held.values()}
        self._marked = {lease_id: state for lease_id, state in self._marked.items() if lease_id in live}
        for host, held in self.table.held.items():
            agent = self.table.agents.get(host)
            if agent is None or not agent.alive:
                continue
            for entry, lease in held.items():
                members = self.cluster.member_names_of(entry)
                state = "idle" if members and all(m in idle for m in members) else "busy"
                if self._marked.get(lease.lease_id) != state:
                    self._marked[lease.lease_id] = state
                    await agent.lease_mark(lease.lease_id, state)

    async def yield_idle(self) -> bool:
        """An adaptive cluster gives idle workers above its minimum back while another cluster waits.

        Returns whether another cluster waits for one of the cluster's hosts.
        """
        ours = self.pool.cluster_id
        mine = {host for host, held in self.table.held.items() if held}
        wants = [le for le in self.table.lab_leases() if not le.held and le.cluster != ours and le.host in mine]
        waited_for = {le.host for le in wants}
        asked = sum(max(le.amount.slots, 1) for le in wants)  # slots: no more is given back than is waited for
        adaptive = self.cluster.running_adaptive()
        if adaptive is None or not waited_for:
            return bool(waited_for)
        now = time.monotonic()
        minimum = int(getattr(adaptive, "minimum", 0) or 0)
        running = sum(len(self.cluster.member_names_of(str(k))) for k in self.cluster.worker_spec)
        spare = running - minimum
        if spare <= 0:
            return True
        idle = self._idle_workers()
        chosen: list[str] = []
        given = 0
        for key, spec in list(self.cluster.worker_spec.items()):
            host = spec.get("options", {}).get("host")
            if host not in waited_for or given >= asked:
                continue
            after = self.table.specs[host].yield_after if host in self.table.specs else math.inf
            members = self.cluster.member_names_of(str(key))
            if not members or len(members) > spare - len(chosen):
                continue
            if all(m in idle and now - self._idle_since.get(m, now) >= after for m in members):
                chosen.extend(members)
                given += 1
        if chosen:
            message = f"yielding {len(chosen)} idle worker(s) to a waiting cluster: {', '.join(chosen)}"
            logger.info("%s", message)
            self.cluster.log_event(message, echo=False)
            await self.cluster.yield_workers(chosen)
        return True
