"""Operating a running cluster: rolling restart, drain and undrain.

Every operation works by changing the cluster's ``worker_spec`` and letting
the cluster's reconcile act on it, so a retired entry's workers leave the
way ``scale`` down makes them leave: the scheduler retires them by name
(``retire_workers``), which moves the data only they hold to other workers,
before their processes are stopped.

Replacing an entry (:func:`replace_entries`) takes one of two paths:

- **start first**, when a usable host has a free slot: a new entry starts
  there; once its workers registered, the old entry is retired. Nothing is
  lost meanwhile.
- **retire first**, when every usable slot is taken: the old entry is
  retired, then started again under the same name on its own host (or, when
  its host may not be used, on another one with a free slot; with none, the
  entry is dropped and the cluster is short of its target until slots come
  back).

Entries are replaced ``batch`` at a time and a batch waits for its
replacements to register before the next begins, so at most ``batch``
entries' workers are missing at any moment.

A rolling restart also starts a fresh host agent on every host before its
entries are replaced (:class:`AgentRenewal`). The agent imports
``distributed`` once and forks every process of the host from itself, so new
processes of the old agent would still run the code it imported: a wheel
installed since (``provision.yml``) is only picked up by a new agent. A new
agent whose ``distributed`` is no longer the head's release is refused, as
at start, and the entries of that host keep running untouched. An old agent
is stopped once no process of the cluster runs on it any more: at the end of
the restart when every one of its entries was replaced, else (a batch that
failed, entries left as they were, entries that were still starting) when
its last such process ends, or at the latest when the cluster closes.

An operation stops quietly between batches when the cluster is closing.

The functions take the cluster and use its reconcile, its host table
(:mod:`speccluster_ssh.hosts`) and :mod:`speccluster_ssh.entries`; the
cluster's public methods (``rolling_restart``, ``drain``, ``undrain``)
delegate here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed.core import Status

from . import entries
from .errors import HostError, SpecClusterError, UserError
from .process import RemoteProcess

if TYPE_CHECKING:
    from .agent import HostAgent
    from .cluster_protocols import OperationsCluster, OperationsLock
    from .connection import HostConnection

logger = logging.getLogger("speccluster_ssh.cluster")  # the messages users know from the cluster's log

# Seconds between looks at the scheduler's worker list while waiting for replacements.
POLL = 0.1


class OperationError(SpecClusterError):
    """An operation stopped part way; ``str(exc)`` says where and why, and what was done."""


@dataclass
class Replaced:
    """What :func:`replace_entries` did."""

    # old entry -> (new entry, its host); the same name when it was retired first
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)
    # entries retired for good: no usable slot was left for them
    dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON for results: ``{"moved": {old: {"entry": new, "host": host}}, "dropped": [...]}``."""
        return {
            "moved": {old: {"entry": new, "host": host} for old, (new, host) in self.moved.items()},
            "dropped": list(self.dropped),
        }


class Operations:
    """The operations of one cluster; one runs at a time.

    Restart, drain, undrain and reload each hold :attr:`lock` while they
    change the cluster's spec, so two of them never replace the same entries.

    Parameters
    ----------
    cluster
        The cluster operated on.
    """

    def __init__(self, cluster: OperationsCluster) -> None:
        self.cluster = cluster
        self.lock = asyncio.Lock()


def of(cluster: OperationsCluster) -> OperationsLock:
    """The :class:`Operations` of ``cluster`` (the cluster makes it)."""
    return cluster.operations


# -- looking at the cluster ----------------------------------------------------------------------


def host_of(spec: Mapping[str, Any]) -> str:
    """The inventory host of a spec entry."""
    return str(spec.get("options", {}).get("host"))


def registered(cluster: OperationsCluster) -> set[str]:
    """Worker names the scheduler has now."""
    return {str(w.get("name")) for w in (cluster.scheduler_info or {}).get("workers", {}).values()}


def running_keys(cluster: OperationsCluster, keys: Iterable[Any]) -> list[Any]:
    """Those of ``keys`` whose processes run (entries still starting or dead are the healer's)."""
    return [k for k in keys if k in cluster.worker_spec and getattr(cluster.workers.get(k), "status", None) == Status.running]


def check_host(cluster: OperationsCluster, host: str) -> None:
    """Raise a one-line :class:`UserError` unless ``host`` is a worker host of the cluster."""
    if host not in cluster.worker_hosts:
        known = ", ".join(cluster.worker_hosts) or "(none)"
        raise UserError(f"cluster {cluster.name} has no worker host named {host!r}; its worker hosts: {known}")


def check_running(cluster: OperationsCluster) -> None:
    """Raise a one-line :class:`UserError` unless the cluster is running (not starting, closing or closed)."""
    if cluster.status != Status.running:
        raise UserError(f"cluster {cluster.name} is {cluster.status.name}; operations need a running cluster")


def new_key(cluster: OperationsCluster, taken: Collection[str]) -> str:
    """A spec key no entry, process or name of ``taken`` has."""
    return cluster.take_entry_name(taken)


def _place(
    cluster: OperationsCluster, used: Mapping[str, int], avoid: Collection[str], prefer: str | None = None
) -> dict[str, Any] | None:
    """A new entry on a usable host with a free slot: ``prefer`` when it has one, else the policy's choice."""
    return entries.place_entry(
        cluster.entry_settings, cluster.worker_hosts, used, unavailable=cluster.healer.unavailable_hosts() | set(avoid),
        policy=cluster.placement_policy, new_spec=cluster.new_spec, prefer=prefer,
        gpus_held=entries.gpus_held(cluster.worker_spec),
    )


async def reconcile(cluster: OperationsCluster) -> None:
    # The shared reconcile task: shielded, so cancelling an operation never cancels it under scale().
    await asyncio.shield(cluster.reconcile_now())


async def _wait_started(cluster: OperationsCluster, keys: Sequence[str], timeout: float) -> dict[str, str]:
    """Wait until every member of ``keys`` is registered; return entry -> why, for those that are not."""
    members = {k: entries.member_names(k, cluster.worker_spec[k]) for k in keys if k in cluster.worker_spec}
    deadline = time.monotonic() + timeout
    failed: dict[str, str] = {}
    for _ in range(int(timeout / POLL) + 2):  # bounded; the deadline ends it first
        names = registered(cluster)
        for key, wanted in list(members.items()):
            proc = cluster.workers.get(key)
            if all(m in names for m in wanted):
                del members[key]
            elif proc is not None and proc.status in (Status.failed, Status.closed):
                failed[key] = cluster.start_errors.get(key) or f"entry {key} failed to start"
                del members[key]
        if not members or time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL)
    for key in members:
        failed[key] = f"entry {key} did not register within {timeout:g} s"
    return failed


# -- replacing entries ---------------------------------------------------------------------------


async def replace_entries(
    cluster: OperationsCluster,
    keys: Sequence[Any],
    *,
    batch: int,
    avoid: Collection[str] = (),
    why: str = "replaced",
) -> Replaced:
    """Replace entries ``keys``, ``batch`` at a time, each by a new one built from today's inventory.

    Parameters
    ----------
    cluster
        The cluster.
    keys
        The entries to replace, in order.
    batch
        Entries replaced at once; at most this many entries' workers are missing at any moment.
    avoid
        Hosts no replacement may go to (besides those down, put aside or drained).
    why
        For the log: ``"restarted"``, ``"moved off h2"``, ...

    Raises
    ------
    OperationError
        When replacements did not start: the operation stops after that
        batch, so no more entries are lost; what was done is said.
    """
    done = Replaced()
    keys = [str(k) for k in keys]
    for start in range(0, len(keys), batch):
        if cluster.status != Status.running:
            # Closing ('down'): its spec is emptied; putting entries back would start them again.
            logger.info("the cluster is %s: %d entries left as they were", cluster.status.name, len(keys) - start)
            break
        chunk = [k for k in keys[start:start + batch] if k in cluster.worker_spec]
        if chunk:
            failed = await _replace_batch(cluster, chunk, set(avoid), why, done)
            if failed:
                left = len(keys) - start - len(chunk)
                detail = "; ".join(f"{k}: {w}" for k, w in failed.items())
                raise OperationError(
                    f"stopped after {len(done.moved)} of {len(keys)} entries ({left} left as they were): {detail}"
                )
    return done


async def _replace_batch(
    cluster: OperationsCluster, chunk: list[str], avoid: set[str], why: str, done: Replaced
) -> dict[str, str]:
    spec = cluster.worker_spec
    used = entries.slots_used(spec)
    first: list[tuple[str, str]] = []  # (old key, new key): the new one starts before the old one goes
    later: list[str] = []  # retired first, started again after
    new_keys: list[str] = []
    for key in chunk:
        placed = _place(cluster, used, avoid, prefer=host_of(spec[key]))
        if placed is None:
            later.append(key)
            continue
        new = new_key(cluster, new_keys)
        new_keys.append(new)
        used[host_of(placed)] = used.get(host_of(placed), 0) + 1
        spec[new] = placed
        first.append((key, new))
    old_hosts = {key: host_of(spec[key]) for key in chunk}
    for key in later:
        del spec[key]  # the reconcile retires it: the scheduler moves its data first
    await reconcile(cluster)
    failed = await _wait_started(cluster, [new for _, new in first], cluster.start_timeout)
    for old, new in first:
        if new not in spec:  # scaled away meanwhile (adapt): the old entry stays as it is
            continue
        if new in failed:
            del spec[new]  # the old entry stays; the next reconcile stops what was started
            continue
        spec.pop(old, None)
        done.moved[old] = (new, host_of(spec[new]))
        cluster.log_event(f"entry {old} {why}: entry {new} on {host_of(spec[new])} replaced it")
    back: list[str] = []
    if cluster.status != Status.running:
        return {}  # closing: the retired entries stay retired, and the caller stops quietly
    for key in later:
        placed = _place(cluster, entries.slots_used(spec), avoid, prefer=old_hosts[key])
        if placed is None:
            done.dropped.append(key)
            cluster.log_event(f"entry {key} {why}: retired; no usable slot is free for it")
            continue
        spec[key] = placed
        back.append(key)
    await reconcile(cluster)
    failed_back = await _wait_started(cluster, back, cluster.start_timeout)
    for key in back:
        if key not in failed_back and key in spec:
            done.moved[key] = (key, host_of(spec[key]))
            cluster.log_event(f"entry {key} {why}: started again on {host_of(spec[key])}")
    # Entries that failed to come back stay in the spec: the healer keeps trying them.
    cluster.healer.wake("entries replaced")
    return {**failed, **failed_back}


# -- fresh agents for a restart ------------------------------------------------------------------


class AgentRenewal:
    """Starts a new agent on hosts, keeps the old ones until their processes are gone, then stops them.

    Parameters
    ----------
    cluster
        The cluster whose pool holds the agents.
    """

    def __init__(self, cluster: OperationsCluster) -> None:
        self.cluster = cluster
        self.old_agents: dict[str, HostAgent] = {}
        self.old_connections: dict[str, HostConnection] = {}
        self.refused: dict[str, str] = {}
        self.renewed: list[str] = []

    async def renew(self, names: Iterable[str], *, new_connection: Collection[str] = ()) -> None:
        """Start a new agent on each host of ``names`` (a new connection too for those in ``new_connection``).

        A host whose new agent does not start (another ``distributed``
        release, a python that is gone, ...) is recorded in ``refused`` and
        keeps its old agent.
        """
        names = list(dict.fromkeys(names))
        results = await asyncio.gather(
            *(self._renew_one(n, n in new_connection) for n in names), return_exceptions=True
        )
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                reason = result.reason if isinstance(result, HostError) else f"{type(result).__name__}: {result}"
                if isinstance(result, HostError) and result.fix:
                    reason += f"; fix: {result.fix}"
                self.refused[name] = reason
                logger.warning("host %s: no new agent, its entries are left as they are: %s", name, reason)
                self.cluster.log_event(f"host {name} refused: {reason}")

    async def _renew_one(self, name: str, new_connection: bool) -> None:
        old, old_conn = await self.cluster.pool.renew(name, new_connection)
        self.renewed.append(name)
        if old is not None:
            self.old_agents[name] = old
        if old_conn is not None:
            self.old_connections[name] = old_conn

    async def close_old(self) -> None:
        """Stop the old agents no process runs on any more, and their old connections.

        An old agent that still runs processes of the cluster (entries a
        failed batch left as they were, entries that were starting when its
        host got the new agent) is kept, with its connection, until the last
        of them ended (closed or failed), or the pool closes.
        """
        pool = self.cluster.pool
        agents, self.old_agents = self.old_agents, {}
        conns, self.old_connections = self.old_connections, {}
        unused: dict[str, HostAgent] = {}
        for name, old in agents.items():
            users = processes_on(self.cluster, old)
            if users and not pool.closed:
                logger.info("host %s: the old agent is kept while %d of its entries run", name, len(users))
                # The pool's close awaits it (and it ends within a second of that close).
                pool.stop_later(
                    _close_when_unused(self.cluster, old, users, conns.pop(name, None)),
                    f"stop the old agent on {name} once unused",
                )
            else:
                unused[name] = old
        # keep_tls: the new agent of the host uses the same TLS files.
        results = await asyncio.gather(
            *(a.close(remove_files=False, keep_tls=True) for a in unused.values()), return_exceptions=True
        )
        for name, result in zip(unused, results):
            if isinstance(result, BaseException):
                logger.warning("stopping the old agent on %s failed: %s", name, result)
        results = await asyncio.gather(*(c.close() for c in conns.values()), return_exceptions=True)
        for name, result in zip(conns, results):
            if isinstance(result, BaseException):
                logger.warning("closing the old connection to %s failed: %s", name, result)


def processes_on(cluster: OperationsCluster, agent: HostAgent) -> list[RemoteProcess]:
    """The cluster's processes, running or starting, whose members run under ``agent``."""
    candidates = {id(p): p for p in (*cluster.workers.values(), *cluster.processes(), cluster.scheduler)}
    return [
        p for p in candidates.values()
        if isinstance(p, RemoteProcess) and p.runs_under(agent)
    ]


async def _close_when_unused(
    cluster: OperationsCluster, agent: HostAgent, users: list[RemoteProcess], connection: HostConnection | None
) -> None:
    """Stop ``agent`` (then ``connection``) once every one of ``users`` ended, or the pool closes."""
    pool = cluster.pool
    waits = [asyncio.ensure_future(p.finished()) for p in users]
    try:
        while not pool.closed:  # ends with the users, or within a second of the pool's close
            _, pending = await asyncio.wait(waits, timeout=1.0)
            if not pending:
                break
    finally:
        for w in waits:
            w.cancel()
    # At the pool's close it goes as every agent goes: keys removed, logs kept for their retention.
    await agent.close(keep_tls=not pool.closed, grace=pool.shutdown_grace)
    if connection is not None:
        await connection.close()


# -- the operations ------------------------------------------------------------------------------


async def rolling_restart(cluster: OperationsCluster, batch: int = 1) -> dict[str, Any]:
    """See :meth:`SSHSpecCluster.rolling_restart`."""
    if int(batch) < 1:
        raise UserError(f"the restart batch must be 1 or more, got {batch}")
    check_running(cluster)
    ops = of(cluster)
    async with ops.lock:
        keys = running_keys(cluster, list(cluster.worker_spec))
        renewal = AgentRenewal(cluster)
        scheduler_host = cluster.scheduler.host if isinstance(cluster.scheduler, RemoteProcess) else None
        # Every host with an agent, those with no entry now too (drained ones, say): what starts
        # there later runs the new code. The scheduler's host keeps its agent: the agent owns the
        # scheduler, which a restart leaves alone.
        await renewal.renew(h for h in list(cluster.host_table.agents) if h != scheduler_host)
        keys = [k for k in keys if host_of(cluster.worker_spec[k]) not in renewal.refused]
        started = time.monotonic()
        cluster.log_event(f"rolling restart of {len(keys)} entries, {batch} at a time")
        try:
            done = await replace_entries(cluster, keys, batch=int(batch), avoid=set(renewal.refused), why="restarted")
        finally:
            await renewal.close_old()
        return {
            "entries": len(keys),
            "batch": int(batch),
            "seconds": round(time.monotonic() - started, 1),
            "refused": renewal.refused,
            "new_agents": sorted(renewal.renewed),
            **done.as_dict(),
        }


async def drain(cluster: OperationsCluster, host: str, reason: str = "") -> dict[str, Any]:
    """See :meth:`SSHSpecCluster.drain`."""
    check_host(cluster, host)
    check_running(cluster)
    async with of(cluster).lock:
        return await drain_unlocked(cluster, host, reason or "drained by the user")


async def drain_unlocked(cluster: OperationsCluster, host: str, reason: str) -> dict[str, Any]:
    """Drain ``host`` (the caller holds the operations lock)."""
    cluster.capacity.remember_target()
    drained = cluster.host_table.drain(host, reason)
    cluster.log_event(f"host {host} drained: {drained}")
    keys = [str(k) for k, s in cluster.worker_spec.items() if host_of(s) == host]
    # Entries not running yet have nothing to retire: they are just placed elsewhere, under a new
    # key. One that is starting (not yet in ``workers``), or in ``workers`` but not running, has a
    # process on this host already: the reconcile closes it only when its key left the spec.
    idle = [k for k in keys if k not in running_keys(cluster, keys)]
    result = Replaced()
    for key in idle:
        del cluster.worker_spec[key]
        placed = _place(cluster, entries.slots_used(cluster.worker_spec), {host})
        if placed is None:
            result.dropped.append(key)
        else:
            new = new_key(cluster, (key,))
            cluster.worker_spec[new] = placed
            result.moved[key] = (new, host_of(placed))
    running = [k for k in keys if k not in idle]
    if running:
        done = await replace_entries(cluster, running, batch=len(running), avoid={host}, why=f"moved off {host}")
        result.moved.update(done.moved)
        result.dropped.extend(done.dropped)
    else:
        await reconcile(cluster)
    return {"host": host, "reason": drained, **result.as_dict()}


async def undrain(cluster: OperationsCluster, host: str) -> dict[str, Any]:
    """See :meth:`SSHSpecCluster.undrain`."""
    check_host(cluster, host)
    check_running(cluster)
    async with of(cluster).lock:
        was = cluster.host_table.undrain(host)
        before = set(cluster.worker_spec)
        # A fixed-size cluster short of its target (entries that found no slot) grows back.
        cluster.capacity.refill()
        added = [str(k) for k in cluster.worker_spec if k not in before]
        cluster.log_event(f"host {host} undrained" + (f"; {len(added)} entries added" if added else ""))
        await reconcile(cluster)
        cluster.healer.wake(f"host {host} undrained")
        return {"host": host, "was_drained": was, "added": added}
