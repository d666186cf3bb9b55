"""Putting an SSHSpecCluster together and starting it.

Two halves, both called only by :class:`~speccluster_ssh.cluster.SSHSpecCluster`:

- construction, which needs no event loop: the inventory the cluster runs
  on, how hosts are reached (:class:`~speccluster_ssh.connection.ConnectSettings`),
  and the scheduler's spec, provisional under ``scheduler_reach: auto``;
- the start policy: where the scheduler runs once the hosts are probed
  (:func:`place_scheduler`), waiting for ``min_workers``
  (:func:`wait_for_min_workers`), and the :class:`~speccluster_ssh.errors.StartError`
  of a start that falls short, raised only after everything is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distributed.scheduler import Scheduler

from . import config as sc_config
from . import entries, peerfamily, reach, timeline
from .addresses import split_url
from .connection import ConnectSettings
from .errors import HostError, StartError, UserError
from .forwards import DashboardForwardedScheduler, ForwardedScheduler
from .hosts import HostView
from .inventory import HostSpec, Inventory, load_inventory
from .placement import Target
from .process import with_pool
from .scaling import resolve_min_workers

if TYPE_CHECKING:
    from .cluster_protocols import StartupCluster

logger = logging.getLogger("speccluster_ssh.cluster")  # the messages users know from the cluster's log


# -- construction ------------------------------------------------------
def resolve_inventory(
    hosts: Sequence[str | Mapping[str, Any]] | None, inventory: Inventory | str | os.PathLike[str] | None
) -> Inventory:
    """The inventory a cluster runs on: parsed from a path, given, or made from ``hosts``."""
    if isinstance(inventory, (str, os.PathLike)):
        return load_inventory(inventory)
    if inventory is not None:
        return inventory
    if not hosts:
        raise UserError("SSHSpecCluster needs hosts or an inventory")
    return Inventory.from_hosts(list(hosts))


def connect_settings(
    known_hosts: str | None, known_hosts_policy: str | None, ssh_config: Sequence[str], connect_timeout: float | None
) -> ConnectSettings:
    """How the head reaches hosts; a non-default policy in the dask config applies to every host."""
    configured = sc_config.get("known-hosts")
    return ConnectSettings(
        known_hosts=known_hosts,
        known_hosts_policy=known_hosts_policy or (configured if configured != "strict" else None),
        ssh_config=list(ssh_config),
        connect_timeout=connect_timeout,
    )


def scheduler_entry(cluster: StartupCluster, options: dict[str, Any], sec: Any) -> dict[str, Any]:
    """The scheduler's spec: on the inventory's scheduler host, or in the head's process.

    Sets ``cluster.reach`` when the mode is known without probing. Under
    ``auto`` (and ``forward`` without a scheduler host) the spec is
    provisional: :func:`place_scheduler` decides once the hosts are probed.
    """
    sched_host = cluster.inventory.scheduler_host
    setting = "direct" if cluster.given_scheduler_address is not None else cluster.reach_setting
    if setting == "direct" or (setting == "forward" and sched_host is not None):
        cluster.reach = reach.choose_reach(setting, list(cluster.worker_hosts), sched_host and sched_host.name, None)
    dashboard_port = sc_config.get("dashboard-port")
    if cluster.reach is not None and cluster.reach.mode == "forward" and sched_host is not None:
        return entries.remote_scheduler_entry(
            cluster.entry_settings, sched_host, dashboard_port, options, cls=ForwardedScheduler
        )
    if sched_host is not None:
        return entries.remote_scheduler_entry(
            cluster.entry_settings, sched_host, dashboard_port, options, cls=DashboardForwardedScheduler
        )
    return entries.local_scheduler_entry(
        Scheduler, sec, sc_config.get("scheduler-port"), dashboard_port, options,
        dashboard_address=cluster.entry_settings.dashboard_address,
    )


def initial_spec(
    cluster: StartupCluster, workers: Mapping[Any, Any], worker: Mapping[str, Any] | None, n_workers: int | None
) -> dict[str, Any]:
    """The spec entries the cluster starts with, set as its ``worker_spec``; also ``new_spec`` and ``min_workers``.

    ``workers`` are entries written by the user, completed from the
    inventory; without them ``n_workers`` entries are placed. Returns the
    spec (the same dict as ``worker_spec`` now), which SpecCluster takes as
    its initial ``workers``.
    """
    initial: dict[str, Any] = {}
    for key, spec in workers.items():
        # Each takes a GPU slot the entries before it left free.
        held = entries.gpus_held(initial)
        initial[str(key)] = entries.complete_entry(cluster.entry_settings, spec, cluster.worker_hosts, held)
    cluster.worker_spec = initial
    cluster.new_spec = dict(worker) if worker else None
    if not initial:
        fill_initial_spec(cluster, n_workers)
    requested = sum(len(entries.member_names(k, s)) for k, s in cluster.worker_spec.items())
    cluster.min_workers = resolve_min_workers(cluster.min_workers_asked, requested)
    return initial


def fill_initial_spec(cluster: StartupCluster, n_workers: int | None) -> None:
    """Place ``n_workers`` entries (every slot when ``None``) before SpecCluster starts.

    Placed up front so that a synchronous constructor returns with every
    worker running.
    """
    count = cluster.total_slots if n_workers is None else n_workers
    for placed in range(count):
        entry = cluster.next_entry()
        if entry is None:
            # Short of what was asked: remembered, so that hosts that come later (an
            # undrain, a reload that adds hosts) fill it up; the missing entries counted
            # with the size of the last one placed.
            members = [len(entries.member_names(k, s)) for k, s in cluster.worker_spec.items()]
            wanted = sum(members) + (count - placed) * (members[-1] if members else 1)
            cluster.capacity.target = Target(workers=wanted)
            break
        cluster.worker_spec.update(entry)


# -- the start policy ----------------------------------------------------
async def start(
    cluster: StartupCluster, start_scheduler: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]
) -> None:
    """Start the cluster: agents, the scheduler (``start_scheduler``: SpecCluster's), then the workers.

    ``close`` closes the whole cluster (SpecCluster's close) when too few
    workers came up (see :func:`wait_for_min_workers`).

    Connecting to the hosts overlaps the scheduler's (and its dashboard's)
    start. Whatever fails first closes the agents before it is raised.
    """
    hosts = {spec.get("options", {}).get("host") for spec in cluster.worker_spec.values()}
    if cluster.inventory.scheduler_host is not None:
        hosts.add(cluster.inventory.scheduler_host.name)
    names = {h for h in hosts if h is not None}
    cluster.pool.prestart(names)
    try:
        try:
            await place_scheduler(cluster, names)
        except BaseException:
            await cluster.pool.close()
            raise
        # Hosts with both address families: which one works between them (peerfamily.py). It overlaps a
        # scheduler on the head's start; one on a host listens on that family, so it waits for it.
        family = cluster.pool.tasks.start(
            peerfamily.choose_at_start(cluster.pool, sorted(names), cluster.pool.agent_timeout + reach.PROBE_SLACK,
                                       reach.peer_probe),
            name="choose the address family between hosts",
        )
        if cluster.reach is not None and cluster.reach.scheduler_host is not None:
            await family
        # distributed makes the scheduler from its spec: one on a host is handed the agent pool there.
        spec = cluster.scheduler_spec
        cluster.scheduler_spec = {**spec, "options": with_pool(spec["cls"], spec.get("options", {}), cluster.pool)}
        await start_scheduler()
        timeline.stamp("scheduler_ready")
        await family
    except RuntimeError as exc:
        await cluster.pool.close()
        host_error = host_error_of(exc)
        if host_error is not None:
            raise host_error from None
        raise
    if isinstance(cluster.scheduler, Scheduler) and cluster.given_scheduler_address is None:
        # Each host finds the head's scheduler at the local end of its own SSH connection.
        protocol, _, port = split_url(cluster.scheduler.address)
        cluster.pool.head_scheduler = (protocol, port)
    await wait_for_min_workers(cluster, close)


async def place_scheduler(cluster: StartupCluster, hosts: set[str]) -> None:
    """Choose where the scheduler runs (probing the hosts under ``auto``), once, before it starts."""
    if cluster.reach is not None or cluster.scheduler is not None:
        return
    sched_host = cluster.inventory.scheduler_host
    sched = sched_host.name if sched_host is not None else None
    probe = None
    if cluster.reach_setting == "auto":
        # The hosts with entries (all worker hosts when there is none yet) and the scheduler host.
        names = [h for h in cluster.worker_hosts if h in hosts] or list(cluster.worker_hosts)
        if sched is not None and sched not in names:
            names.append(sched)
        probe = await reach.probe_reach(cluster.pool, names, scheduler_host=sched)
    choice = reach.choose_reach(cluster.reach_setting, list(cluster.worker_hosts), sched, probe)
    if choice.mode == "forward" and choice.scheduler_host is None:
        states = cluster.host_table.states
        why = {n: f"{states[n].state}: {states[n].reason}; fix: {states[n].fix}"
               for n in cluster.worker_hosts if n in states and states[n].fix}
        if why:
            raise StartError(f"no worker host can run the scheduler: {', '.join(why)} answered but cannot run it", why)
        raise StartError("no worker host answered, so there is no host to run the scheduler on", {})
    cluster.reach = choice
    logger.info(
        "scheduler reach: %s, scheduler on %s: %s", choice.mode, choice.scheduler_host or "the head", choice.why
    )
    if choice.mode == "forward" and choice.scheduler_host is not None:
        cluster.scheduler_spec = entries.remote_scheduler_entry(
            cluster.entry_settings, cluster.host_table.specs[choice.scheduler_host], sc_config.get("dashboard-port"),
            cluster.scheduler_options, cls=ForwardedScheduler,
        )


def registered_workers(cluster: StartupCluster) -> int:
    return len(cluster.scheduler_info.get("workers", {}))


async def wait_for_min_workers(cluster: StartupCluster, close: Callable[[], Awaitable[None]]) -> None:
    """The first reconcile, then wait until ``min_workers`` workers registered.

    Hosts that do not answer do not fail the start: the healer moves their
    entries to free slots or retries them. The start fails, and closes
    everything, when the start timeout runs out first, or at once when every
    worker host was tried and none answered.
    """
    started = time.monotonic()
    await cluster.reconcile_now()
    registered = registered_workers(cluster)
    for _ in range(int(cluster.start_timeout / 0.1) + 100):  # bounded; the deadline ends it first
        registered = registered_workers(cluster)
        if registered >= cluster.min_workers:
            say_held_elsewhere(cluster)
            return
        elapsed = time.monotonic() - started
        if cluster.host_table.no_worker_answers() or elapsed >= cluster.start_timeout:
            break
        if workers_possible(cluster) < cluster.min_workers:
            break  # other clusters hold the rest of the lab: waiting would not help
        await asyncio.sleep(0.1)
    error = start_error(cluster, registered, time.monotonic() - started)
    logger.warning("start failed: %s", error.summary)
    await close()
    raise error


def held_elsewhere(cluster: StartupCluster) -> dict[Any, str]:
    """Entries whose lease claim found no room (other clusters hold their host): key -> why."""
    return {k: str(w.lease_short.reason) for k, w in cluster.workers.items()
            if getattr(w, "lease_short", None) is not None}


def workers_possible(cluster: StartupCluster) -> int:
    """Dask workers the spec can still bring: every entry but those that found no room."""
    short = held_elsewhere(cluster)
    return sum(len(entries.member_names(k, s)) for k, s in cluster.worker_spec.items() if k not in short)


def say_held_elsewhere(cluster: StartupCluster) -> None:
    """The start met ``min_workers`` without some entries: say why (other clusters, or the quota); the cluster waits."""
    short = held_elsewhere(cluster)
    quota = {k for k, w in cluster.workers.items() if getattr(getattr(w, "lease_short", None), "quota", False)}
    for keys, what in (([k for k in short if k not in quota], "slots that other clusters hold"),
                       ([k for k in short if k in quota], "room under speccluster_user_quota")):
        keys = [k for k in keys if k in cluster.worker_spec]
        if keys:
            missing = sum(len(entries.member_names(k, cluster.worker_spec[k])) for k in keys)
            hosts = sorted({str(cluster.worker_spec[k]["options"]["host"]) for k in keys})
            logger.warning("%d workers wait for %s (%s); they start as slots are freed. %s",
                           missing, what, ", ".join(hosts), short[keys[0]])


def start_error(cluster: StartupCluster, registered: int, elapsed: float) -> StartError:
    """The error of a start short of ``min_workers``: a summary, then why each missing host is missing."""
    wanted = sum(len(entries.member_names(k, s)) for k, s in cluster.worker_spec.items())
    running = {str(w.get("name")) for w in cluster.scheduler_info.get("workers", {}).values()}
    states = cluster.host_table.states
    why: dict[str, str] = {}
    for key, spec in cluster.worker_spec.items():
        if all(m in running for m in entries.member_names(key, spec)):
            continue
        host = str(spec.get("options", {}).get("host"))
        state = states.get(host)
        if state is not None and not state.usable and state.reason:
            why.setdefault(host, f"{state.state}: {state.reason}" + (f"; fix: {state.fix}" if state.fix else ""))
        else:
            why.setdefault(host, cluster.start_errors.get(key) or "did not start in time")
    if cluster.host_table.no_worker_answers():
        summary = no_usable_host_summary(states, cluster.worker_hosts, cluster.min_workers)
        for name, state in states.items():
            if name in cluster.worker_hosts and state.reason:
                why.setdefault(name, f"{state.state}: {state.reason}")
    elif held_elsewhere(cluster):
        quota = any(getattr(getattr(w, "lease_short", None), "quota", False) for w in cluster.workers.values())
        summary = (
            f"only {registered} of {wanted} workers can start: "
            f"{'speccluster_user_quota or ' if quota else ''}other clusters hold the rest of the lab "
            f"(at least {cluster.min_workers} needed; --min-workers 0 starts and waits for free slots)"
        )
    else:
        summary = (
            f"only {registered} of {wanted} workers started within {elapsed:.0f} s; "
            f"at least {cluster.min_workers} needed"
        )
    return StartError(summary, why)


def no_usable_host_summary(
    states: Mapping[str, HostView], worker_hosts: Mapping[str, HostSpec], needed: int
) -> str:
    """The first line of a start where every worker host is down or put aside.

    A host with a fix (no distributed, another distributed release, an
    unwritable directory, a changed host key) answered: saying that no host
    answered would send the user looking at the network instead.
    """
    answered = [n for n in worker_hosts if states[n].fix]
    if not answered:
        return f"no worker host answered (at least {needed} workers needed)"
    silent = len(worker_hosts) - len(answered)
    shown = ", ".join(answered[:5]) + (f" and {len(answered) - 5} more" if len(answered) > 5 else "")
    return (
        f"no worker host can run workers (at least {needed} needed): {shown} answered but cannot run them"
        + (f", {silent} did not answer" if silent else "")
        + "; the fix for each host follows"
    )


def host_error_of(exc: BaseException) -> HostError | None:
    """The host error behind SpecCluster's ``RuntimeError("Cluster failed to start")``, if one is."""
    cause = exc.__cause__
    return cause if isinstance(cause, HostError) else None
