"""The steps of an SSHSpecCluster's reconcile, and the map from dask workers to spec entries.

The reconcile (:func:`reconcile_spec`, run by the cluster with its spec
lock held) makes ``workers`` (the running process interfaces) match
``worker_spec`` (what should run), in these steps:

- :func:`close_removed` retires the workers of entries no longer in the spec
  by name, so the scheduler moves their data first, then closes their
  processes concurrently and keeps their logs;
- :func:`create_missing` makes a process interface for every entry that
  should run and can: its host is usable and it is not backing off;
- :func:`start_created` starts them concurrently and tells the healer how
  each start went. A failed start is not raised: the healer moves the entry
  or retries its host, and a start short of ``min_workers`` says why.

Spec keys name entries; a group entry runs several dask workers named
``key-suffix``. :func:`key_of_member` and :func:`keys_holding` map the
scheduler's names and addresses back to keys (SpecCluster maps by name only,
which misses group members: dask issue 9102).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import dask
from dask.utils import parse_timedelta
from distributed.core import Status

from . import entries, timeline
from .process import RemoteProcess, with_pool
from .tasks import log_failures

if TYPE_CHECKING:
    from .cluster_protocols import ReconcileCluster

logger = logging.getLogger("speccluster_ssh.cluster")  # the messages users know from the cluster's log


async def reconcile_spec(cluster: ReconcileCluster) -> None:
    """One reconcile, with the spec lock held: close the entries that left the spec, start the missing ones."""
    to_close = [k for k in cluster.workers if k not in cluster.worker_spec]
    if to_close:
        await close_removed(cluster, to_close)
    created = create_missing(cluster)
    cluster.track(worker for _, worker in created)
    if created:
        await start_created(cluster, created)


async def close_removed(cluster: ReconcileCluster, keys: list[Any]) -> None:
    """Retire, then close, the running entries ``keys`` that left the spec."""
    names = [m for k in keys for m in member_names_of(cluster.workers[k], k)]
    if cluster.scheduler.status == Status.running and names:
        # Retire by name so the scheduler moves their data first.
        try:
            await cluster.scheduler_comm.retire_workers(names=names, remove=True, close_workers=False)
        except Exception as exc:  # they are closed below all the same, data or not
            logger.warning("could not retire workers %s before closing them: %s", ", ".join(names), exc)
    results = await asyncio.gather(*(cluster.workers[k].close() for k in keys), return_exceptions=True)
    log_failures(results, [f"entry {k}" for k in keys], logger, "closing removed entries")
    for key in keys:
        cluster.reports.keep_logs(cluster.workers.pop(key, None))


def create_missing(cluster: ReconcileCluster) -> list[tuple[Any, Any]]:
    """Process interfaces, not yet started, for the entries that should run and can."""
    # Entries of hosts that are down or put aside wait for the host (or for
    # the healer to move them); trying them would only fail again. An entry
    # found to fail by itself waits out its backoff.
    unavailable = cluster.healer.unavailable_hosts()
    address = getattr(cluster.scheduler, "contact_address", None) or cluster.scheduler.address
    created = []
    for key, spec in cluster.worker_spec.items():
        if key in cluster.workers or spec.get("options", {}).get("host") in unavailable or cluster.healer.waiting(key):
            continue
        opts = dict(spec.get("options", {}))
        opts.setdefault("name", key)
        if spec.get("group"):
            opts["group"] = spec["group"]
        worker = spec["cls"](address, **with_pool(spec["cls"], opts, cluster.pool))
        if isinstance(worker, RemoteProcess):
            cluster.healer.watch(worker)
        created.append((key, worker))
    return created


async def start_created(cluster: ReconcileCluster, created: list[tuple[Any, Any]]) -> None:
    """Start ``created`` concurrently; record each in ``workers`` and tell the healer how it went."""
    tasks = [
        # Read below; kept in the task set so a cancelled reconcile leaves none running.
        cluster.tasks.start(_await(worker), name=f"start entry {key}", log_failure=False)
        for key, worker in created
    ]
    await asyncio.wait(tasks)
    for (key, worker), task in zip(created, tasks):
        cluster.workers[key] = worker
        host = getattr(worker, "host", None)
        if not task.cancelled() and task.exception() is not None:
            cluster.start_errors[key] = str(task.exception())
            cluster.healer.entry_start_failed(key, str(task.exception()))
        elif host is not None:
            cluster.start_errors.pop(key, None)
            cluster.healer.entry_started(key, host)


def follow_scheduler_event(cluster: ReconcileCluster, op: str, msg: Any) -> None:
    """Keep each entry's ``worker_address`` on what the scheduler has, and tell the healer of lost workers.

    Addresses follow ``add`` events, so a worker restarted by its nanny is
    followed too. A removed worker that does not come back within
    ``lost-worker-timeout`` is the healer's to look at.
    """
    if op == "add":
        for address, info in dict(msg.get("workers") or {}).items():
            member = str(info.get("name"))
            timeline.stamp("worker_registered", "", member)
            process = cluster.workers.get(key_of_member(cluster.worker_spec, cluster.workers, member))
            if isinstance(process, RemoteProcess) and process.role != "scheduler":
                process.follow_worker(member, address)
    if op == "remove" and msg in cluster.scheduler_info.get("workers", {}):
        member = str(cluster.scheduler_info["workers"][msg].get("name"))
        key = key_of_member(cluster.worker_spec, cluster.workers, member)
        process = cluster.workers.get(key) if key is not None else None
        if isinstance(process, RemoteProcess) and process.members.get(member, {}).get("worker_address") == msg:
            process.follow_worker(member, None)
        if process is not None:
            delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay, cluster.healer.worker_left, key, process, member)


async def in_background(cluster: ReconcileCluster) -> None:
    """Reconcile after ``scale``, then wake the healer for the entries it could not start."""
    await cluster.reconcile_and_log()
    # Entries the reconcile could not start (their host is down) are the healer's to move.
    cluster.healer.wake("the spec changed")


def stop_hosts(cluster: ReconcileCluster, grace: float) -> None:
    """The whole cluster closes: its worker hosts' processes stop first, before anything awaits.

    No worker's data is kept, so none is retired. Every entry is marked
    closing (its processes' exits are no failures, so nothing is healed), no
    agent starts any more, and each agent but the scheduler host's gets one
    shutdown message now (``grace`` seconds, then SIGKILL) instead of a stop
    per process. Hosts sharing the head's CPUs (a lab) give them back to the
    rest of the close at once.
    """
    cluster.pool.shutdown_grace = grace
    cluster.pool.closed = True
    for worker in cluster.workers.values():
        if isinstance(worker, RemoteProcess):
            worker.mark_closing()
    scheduler = cluster.scheduler
    keep = scheduler.host if isinstance(scheduler, RemoteProcess) else None
    cluster.pool.stop_agents(set(cluster.pool.agents) - {keep})


async def drop_entries(cluster: ReconcileCluster) -> None:
    """Mark every entry closed and forget it, without stopping its processes (see :func:`stop_hosts`).

    Called with the cluster's spec lock held.
    """
    cluster.worker_spec.clear()
    dropped = [(k, w) for k, w in cluster.workers.items() if isinstance(w, RemoteProcess)]
    await asyncio.gather(*(w.close(stop=False) for _, w in dropped))
    for key, _ in dropped:
        cluster.reports.keep_logs(cluster.workers.pop(key, None))


def member_names_of(process: Any, key: Any) -> list[str]:
    """The dask worker names a running entry holds."""
    return process.member_names if isinstance(process, RemoteProcess) else [str(key)]


def key_of_member(worker_spec: Mapping[Any, Any], workers: Mapping[Any, Any], member: str) -> Any:
    """The spec key of the entry that holds the dask worker named ``member``; ``None`` if none does.

    Entries still in the spec first, then running ones already removed from it.
    """
    for key, spec in worker_spec.items():
        if member in entries.member_names(key, spec):
            return key
    for key, process in workers.items():
        if member in getattr(process, "member_names", [str(key)]):
            return key
    return None


def keys_holding(
    worker_spec: Mapping[Any, Any], scheduler_workers: Mapping[str, Any], workers: Iterable[Any]
) -> list[Any]:
    """Spec keys of the entries holding ``workers``: spec keys, member names or worker addresses."""
    by_name: dict[str, Any] = {}
    for key, spec in worker_spec.items():
        by_name[str(key)] = key
        for member in entries.member_names(key, spec):
            by_name[member] = key
    keys = []
    for worker in workers:
        key = by_name.get(str(worker))
        if key is None:
            # An address: the scheduler knows its worker's name.
            info = scheduler_workers.get(worker)
            key = by_name.get(str(info["name"])) if info else None
        if key is not None and key not in keys:
            keys.append(key)
    return keys


async def _await(worker: Any) -> Any:
    return await worker
