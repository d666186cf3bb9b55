"""What ``up`` would start, worked out without contacting any host (``speccluster-ssh plan``).

The entries come from :mod:`speccluster_ssh.entries`, the factory the cluster
uses, placed the way the cluster places its first entries, so the plan and
the cluster cannot disagree.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .entries import EntrySettings, capacity_workers, member_names, next_entry
from .placement import planned_nthreads

if TYPE_CHECKING:
    from .inventory import HostSpec, Inventory

# The variable that marks every remote process of a cluster with its id.
MARKER_ENV = "SPECCLUSTER_SSH_CLUSTER"


def plan_entries(
    inventory: Inventory, workers: int | None, policy: str, settings: EntrySettings | None = None
) -> dict[str, dict[str, Any]]:
    """The spec entries a new cluster would start, by entry name.

    ``workers=None`` fills every slot, otherwise entries are added until they
    hold at least ``workers`` dask workers (groups round up) or the slots run
    out: the entries :class:`~speccluster_ssh.cluster.SSHSpecCluster` starts
    with ``n_workers=len(result)``.

    Parameters
    ----------
    inventory
        The inventory.
    workers
        Dask workers wanted; ``None`` for every slot.
    policy
        ``"spread"`` or ``"pack"``.
    settings
        Shared entry settings; by default a stand-in cluster id and the
        process kinds by name.
    """
    settings = settings or EntrySettings(cluster_id="<cluster-id>", start_timeout=0.0)
    hosts = {h.name: h for h in inventory.worker_hosts}
    spec: dict[str, dict[str, Any]] = {}
    counter = 0
    total = 0
    while workers is None or total < workers:
        entry, counter = next_entry(settings, hosts, spec, counter, policy=policy)
        if entry is None:
            break
        spec.update(entry)
        total += sum(len(member_names(key, value)) for key, value in entry.items())
    return spec


def place_entries(inventory: Inventory, workers: int | None, policy: str) -> list[tuple[str, HostSpec]]:
    """The spec entries a new cluster would start, as ``(entry name, host)``; see :func:`plan_entries`."""
    hosts = {h.name: h for h in inventory.worker_hosts}
    return [(key, hosts[spec["options"]["host"]]) for key, spec in plan_entries(inventory, workers, policy).items()]


@dataclass
class UpCheck:
    """What :func:`check_up` worked out from ``up``'s (or ``plan``'s) command line.

    Attributes
    ----------
    wanted
        Workers to start with: ``--workers``, else the ``--adapt`` minimum,
        else ``None`` (every slot).
    entries
        Spec entries placed for ``wanted``; ``None`` for every slot.
    placement
        ``spread`` or ``pack``, from the option or the config.
    warnings
        Lines to print as warnings (a request beyond the capacity).
    """

    wanted: int | None
    entries: int | None
    placement: str
    warnings: list[str] = field(default_factory=list)


def check_up(
    inv: Inventory,
    source: str,
    *,
    workers: int | None,
    adapt: tuple[int, int] | None,
    placement: str | None,
    min_workers: str | None,
    scheduler_reach: str | None,
    worker_group: str,
) -> UpCheck:
    """Every check ``up`` makes before it starts anything; ``plan`` makes the same ones.

    One function for both, so that ``plan`` fails wherever ``up`` would,
    with the same line.

    Parameters
    ----------
    inv
        The inventory, already read.
    source
        The inventory as the user named it (for messages).
    workers, adapt, placement, min_workers, scheduler_reach
        The options of ``up``.
    worker_group
        The group of worker hosts (for messages).

    Raises
    ------
    UserError
        For the first mistake found, in one line.
    """
    from . import config
    from .errors import UserError
    from .reach import reach_setting
    from .scaling import resolve_min_workers

    if not inv.worker_hosts:
        raise UserError(
            f"{source}: no worker hosts (group {worker_group!r} is empty or every host has "
            "speccluster_slots: 0); add hosts to run workers on"
        )
    policy = placement or config.get("placement")
    if policy not in ("spread", "pack"):
        raise UserError(f"config speccluster-ssh.placement is {policy!r}; set it to spread or pack")
    wanted = workers if workers is not None else (adapt[0] if adapt is not None else None)
    result = UpCheck(wanted=wanted, entries=None, placement=policy)
    if wanted is not None:
        placed = place_entries(inv, wanted, policy)
        result.entries = len(placed)
        if sum(h.nworkers for _, h in placed) < wanted:
            result.warnings.append(
                f"asked for {wanted} workers; the inventory holds {capacity(inv)}, starting that many"
            )
    if min_workers is not None:
        try:
            resolve_min_workers(min_workers, wanted if wanted is not None else capacity(inv))
        except UserError as exc:
            raise UserError(f"--min-workers: {exc}") from None
    # The cluster reads this setting when it is built: a mistake in it would fail the start.
    reach_setting(inv, scheduler_reach)
    return result


def inventory_fingerprint(inv: Inventory) -> str:
    """A digest of the parsed inventory (hosts, groups, variables), to tell whether it changed.

    Parsed content, not the file's bytes: a comment or a reordering that
    changes nothing gives the same digest.
    """
    import hashlib
    import json

    text = json.dumps(inv.to_ansible_list(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def capacity(inventory: Inventory) -> int:
    """Dask workers the inventory holds when every slot is used."""
    return capacity_workers(inventory.worker_hosts)


def agent_python(host: HostSpec) -> str:
    """The python the host's agent runs: the one in the command line of :func:`build_plan`."""
    from .agent import agent_argv

    return agent_argv(host, "<cluster-id>")[2]


def ssh_target(host: HostSpec) -> str:
    """How the head reaches ``host``, as a user would type it."""
    if host.is_local:
        return "local subprocess (no SSH)"
    target = f"{host.user}@{host.address}" if host.user else host.address
    return f"ssh {target}" + (f" -p {host.port}" if host.port else "")


def _entry_plan(key: str, spec: dict[str, Any], tls: bool) -> dict[str, Any]:
    options = dict(spec["options"]["options"])
    workers = member_names(key, spec)
    options["nthreads"] = planned_nthreads(options.get("nthreads"), len(workers))
    cls = spec["options"].get("worker_class") or spec["cls"]  # an import path from speccluster_worker_class
    plan = {"entry": key, "class": cls, "workers": workers, "options": options, "tls": tls}
    # What the process is handed: worker name -> its GPU devices, or "auto" for its GPU slot's
    # share of those the host finds at start; None without speccluster_gpus.
    gpus = spec["options"].get("gpus")
    plan["gpus"] = dict(zip(workers, gpus)) if isinstance(gpus, list) else gpus
    if gpus is not None:
        plan["gpu_slot"] = spec["options"].get("gpu_slot")
    return plan


def build_plan(
    inv: Inventory, *, name: str, workers: int | None, placement: str, tls: bool, scheduler_reach: str | None = None
) -> dict[str, Any]:
    """What ``up`` would start, per host, without contacting any host.

    Parameters
    ----------
    inv
        The inventory.
    name
        The cluster name.
    workers
        Dask workers wanted; ``None`` for every slot.
    placement
        ``"spread"`` or ``"pack"``.
    tls
        Whether the cluster would use TLS.
    scheduler_reach
        ``auto``, ``direct`` or ``forward`` as given to ``up``; ``None`` for
        the inventory's or the config's.

    Returns
    -------
    dict
        The JSON of ``speccluster-ssh plan --json``.
    """
    from .agent import agent_argv
    from .envstate import plan_environments

    marker = f"{name}-<8 random hex digits, chosen by up>"
    by_host: dict[str, list[dict[str, Any]]] = {}
    for key, spec in plan_entries(inv, workers, placement).items():
        by_host.setdefault(spec["options"]["host"], []).append(_entry_plan(key, spec, tls))
    hosts: list[dict[str, Any]] = []
    order = list(inv.worker_hosts)
    sched = inv.scheduler_host
    if sched is not None and all(h.name != sched.name for h in order):
        order.insert(0, sched)
    shipped = plan_environments(order)  # hosts with speccluster_environment: head (issue 24)
    for host in order:
        runs_scheduler = sched is not None and sched.name == host.name
        host_entries = by_host.get(host.name, [])
        # The real id is made by 'up'; the plan shows where it goes.
        argv = agent_argv(host, "<cluster-id>")
        hosts.append({
            "host": host.name,
            "address": host.address,
            "connection": host.connection,
            "target": ssh_target(host),
            "scheduler": runs_scheduler,
            "started": bool(host_entries) or runs_scheduler,
            "slots": host.slots,
            "entries": host_entries,
            "command": argv,
            "command_line": shlex.join(argv),
            "prologue": host.prologue,
            "environment": {**host.env, MARKER_ENV: marker},
            **({"shipped_environment": shipped[host.name]} if host.name in shipped else {}),
        })
    planned = sum(len(e["workers"]) for items in by_host.values() for e in items)
    return {
        "name": name,
        "scheduler": sched.name if sched is not None else "head (this machine)",
        "tls": tls,
        "placement": placement,
        "workers_requested": workers,
        "workers_planned": planned,
        "capacity": capacity(inv),
        "scheduler_reach": plan_reach(inv, scheduler_reach),
        "hosts": hosts,
    }


def plan_reach(inv: Inventory, explicit: str | None) -> dict[str, Any]:
    """How the head would reach the scheduler: the mode, or under ``auto`` how ``up`` decides."""
    from .reach import choose_reach, reach_setting

    setting = reach_setting(inv, explicit)
    sched = inv.scheduler_host.name if inv.scheduler_host is not None else None
    if setting == "auto":
        return {
            "setting": setting, "mode": None, "scheduler_host": sched,
            "why": "decided by 'up': it probes host -> head and head -> host, direct when both work, else forward",
        }
    return choose_reach(setting, [h.name for h in inv.worker_hosts], sched, None).as_dict()
