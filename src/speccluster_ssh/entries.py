"""Spec entries: the one place that builds them. Pure functions, no I/O.

A spec entry is what :class:`distributed.deploy.SpecCluster` keeps per
worker (or per group of workers) in ``worker_spec``::

    {"cls": RemoteNanny,
     "options": {"host": "node01", "cluster": "<cluster id>",
                 "options": {<keyword options of the dask worker>},
                 "env": {<environment of the process>},
                 "host_vars": {<the host's variables sent with each start>},
                 "start_timeout": 60.0},
     "group": ["-0", "-1"]}          # only for more than one worker

The cluster, ``speccluster-ssh plan`` and ``up`` build entries with these
functions, so what ``plan`` shows is what the cluster starts. Every new or
moved entry is placed by :func:`place_entry` (host and options). Host choice
comes from :func:`speccluster_ssh.placement.choose_host`, worker options from
:func:`~speccluster_ssh.placement.worker_options`, the TLS paths on hosts from
:func:`speccluster_ssh.security.remote_security_paths`.

The process classes are given in :class:`EntrySettings` rather than imported,
so that this module stays free of the SSH and process code: the cluster
passes its ``RemoteNanny``/``RemoteWorker``/``RemoteScheduler``, the planner
passes :data:`CLASS_NAMES`.

An entry's ``host_vars`` are its host's variables whose table row says
``request`` (:meth:`~speccluster_ssh.inventory.HostSpec.request_vars`); every
start request carries them and the host's agent reads them by name.

The head's dask config as sent to hosts is worked out here too
(:func:`forwarded_dask_config`, merged with a host's ``speccluster_dask_config``
on the host). An entry on a host with ``speccluster_gpus`` holds one of the
host's GPU slots, chosen when it is placed (:func:`~speccluster_ssh.placement.entry_gpus`
given :func:`gpus_held`): its ``gpu_slot`` and ``gpus`` options are what the
process interface is handed and what ``plan`` shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .dashboards import LOOPBACK, dashboard_bind, dask_dashboard_address
from .errors import UserError
from .inventory import HostSpec
from .placement import choose_host, entry_gpus, group_suffixes, worker_options
from .security import remote_security_paths

# For callers that only name the kind of process (the planner).
CLASS_NAMES: Mapping[str, Any] = {"nanny": "nanny", "worker": "worker", "scheduler": "scheduler"}
_NONE_HELD: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class EntrySettings:
    """What every spec entry of one cluster shares.

    Parameters
    ----------
    cluster_id
        The cluster's unique id (the marker in the remote processes' environment).
    start_timeout
        Seconds a remote process may take to start.
    remote_security
        ``tls_*`` paths on the hosts (see :meth:`for_tls_files`); empty
        without TLS files.
    worker_options
        Keyword options given to the cluster for every worker; they win over
        the inventory's.
    classes
        The process class per kind: ``"nanny"``, ``"worker"`` and ``"scheduler"``.
    process_base
        The base class every worker entry's class must derive from; ``None``
        accepts any class.
    dashboard_address
        Where the scheduler's dashboard listens on its host: ``HOST`` or
        ``HOST:PORT`` (see :func:`~speccluster_ssh.dashboards.dashboard_bind`);
        ``None`` for the host's loopback.
    """

    cluster_id: str
    start_timeout: float
    remote_security: Mapping[str, str] = field(default_factory=dict)
    worker_options: Mapping[str, Any] = field(default_factory=dict)
    classes: Mapping[str, Any] = field(default_factory=lambda: dict(CLASS_NAMES))
    process_base: type | None = None
    dashboard_address: str | None = None

    @classmethod
    def for_tls_files(cls, cluster_id: str, start_timeout: float, tls_files: Mapping[str, bytes],
                      **options: Any) -> EntrySettings:
        """Settings whose TLS paths are those of the files ``make_security`` made.

        Parameters
        ----------
        cluster_id, start_timeout
            As for :class:`EntrySettings`.
        tls_files
            The files returned by :func:`speccluster_ssh.security.make_security`.
        **options
            Other fields of :class:`EntrySettings`.
        """
        return cls(cluster_id, start_timeout, remote_security_paths(tls_files), **options)

    def security_options(self) -> dict[str, Any] | None:
        """The ``security`` keyword of remote dask servers; ``None`` without TLS."""
        if not self.remote_security:
            return None
        return dict(self.remote_security, require_encryption=True)


# -- worker entries ------------------------------------------------------------------------------


def worker_entry(
    settings: EntrySettings, host: HostSpec, new_spec: Mapping[str, Any] | None = None,
    gpus_held: Mapping[str, int] = _NONE_HELD,
) -> dict[str, Any]:
    """The spec entry of one worker (or group) on ``host``, without its name.

    Parameters
    ----------
    settings
        The cluster's shared settings.
    host
        The worker host.
    new_spec
        The cluster's ``new_spec`` (``worker=`` of SpecCluster): its class
        replaces the inventory's when it is a ``process_base`` class other
        than the nanny class, and its options win over every other.
    gpus_held
        The GPU slots other entries hold on ``host``, by entry name: the
        entry takes a free one (see :func:`~speccluster_ssh.placement.entry_gpus`).
    """
    options = worker_options(host)
    security = settings.security_options()
    if security is not None:
        options["security"] = security
    options.update(settings.worker_options)
    # A class given by import path runs under the worker interface; the host picks how to start it.
    cls = settings.classes["nanny"] if host.worker_class == "nanny" else settings.classes["worker"]
    override = new_spec.get("cls") if new_spec else None
    if (
        isinstance(override, type)
        and override is not settings.classes["nanny"]
        and settings.process_base is not None
        and issubclass(override, settings.process_base)
    ):
        cls = override
    if new_spec:
        options.update(new_spec.get("options", {}))
    spec: dict[str, Any] = {
        "cls": cls,
        "options": {
            "host": host.name,
            "cluster": settings.cluster_id,
            "options": options,
            "env": dict(host.env),
            "start_timeout": settings.start_timeout,
        },
    }
    _add_host_vars(spec, host)
    if host.worker_class_path:
        # Imported by the host's agent when it starts; started there as dask's SpecCluster would (child.py).
        spec["options"]["worker_class"] = host.worker_class_path
    suffixes = group_suffixes(host)
    spec["options"].update(entry_gpus(host, gpus_held, len(suffixes or [None])))
    if suffixes:
        spec["group"] = suffixes
    return spec


def _add_host_vars(spec: dict[str, Any], host: HostSpec) -> None:
    """Put the variables ``host`` sends with each start request (if any) in the entry ``spec``."""
    sent = host.request_vars()
    if sent:
        spec["options"]["host_vars"] = sent


def complete_entry(
    settings: EntrySettings, spec: Mapping[str, Any], worker_hosts: Mapping[str, HostSpec],
    gpus_held: Mapping[str, Mapping[str, int]] = _NONE_HELD,
) -> dict[str, Any]:
    """Fill in what a user-written spec entry cannot know: the cluster id, TLS files and GPU share.

    Parameters
    ----------
    settings
        The cluster's shared settings.
    spec
        An entry as a user wrote it: ``cls`` (a class or its dotted name)
        and ``options`` with at least ``host``.
    worker_hosts
        The inventory's worker hosts by name.
    gpus_held
        GPU slots held per host by the entries completed before (see
        :func:`gpus_held`); an entry that names neither ``gpu_slot`` nor
        ``gpus`` takes a free slot of its host.

    Raises
    ------
    UserError
        For a class that is not a ``process_base`` class, or a host that is
        not a worker host.
    """
    entry = dict(spec)
    cls = entry.get("cls")
    if isinstance(cls, str):
        from distributed.utils import import_term  # only for entries written by users

        cls = entry["cls"] = import_term(cls)
    base = settings.process_base
    if not (isinstance(cls, type) and (base is None or issubclass(cls, base))):
        raise UserError(f"a worker spec entry needs a RemoteNanny or RemoteWorker class, got {cls!r}")
    options = dict(entry.get("options") or {})
    host = options.get("host")
    if host not in worker_hosts:
        raise UserError(
            f"a worker spec entry names host {host!r}, which is not a worker host of the inventory; "
            f"use one of {', '.join(worker_hosts) or '(none)'}"
        )
    options["cluster"] = settings.cluster_id
    options.setdefault("start_timeout", settings.start_timeout)
    options.setdefault("env", dict(worker_hosts[host].env))
    sent = worker_hosts[host].request_vars()
    if sent:
        options.setdefault("host_vars", sent)
    inner = dict(options.get("options") or {})
    security = settings.security_options()
    if security is not None:
        inner.setdefault("security", security)
    inner.setdefault("dashboard_address", f"{LOOPBACK}:0")
    options["options"] = inner
    if "gpu_slot" not in options and "gpus" not in options:
        workers = len(entry.get("group") or [None])
        options.update(entry_gpus(worker_hosts[host], gpus_held.get(host, _NONE_HELD), workers))
    entry["options"] = options
    return entry


def member_names(key: Any, spec: Mapping[str, Any]) -> list[str]:
    """The dask worker names of entry ``key``: the key itself, or key + suffix per group member."""
    group = spec.get("group")
    return [str(key) + s for s in group] if group else [str(key)]


# -- placement over a worker_spec ------------------------------------------------------------------


def slots_used(worker_spec: Mapping[Any, Mapping[str, Any]]) -> dict[str, int]:
    """Entries per host name in ``worker_spec``."""
    used: dict[str, int] = {}
    for spec in worker_spec.values():
        host = spec.get("options", {}).get("host")
        if host is not None:
            used[host] = used.get(host, 0) + 1
    return used


def gpus_held(worker_spec: Mapping[Any, Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """The GPU slots entries of ``worker_spec`` hold: host name -> entry name -> slot.

    An entry holds its slot while it is in the spec, whatever its process
    does: one started again in place keeps its devices, one removed or moved
    frees them for the next entry placed on the host.
    """
    held: dict[str, dict[str, int]] = {}
    for key, spec in worker_spec.items():
        options = spec.get("options", {})
        if options.get("gpu_slot") is not None and options.get("host") is not None:
            held.setdefault(options["host"], {})[str(key)] = int(options["gpu_slot"])
    return held


def choose_entry_host(
    worker_hosts: Mapping[str, HostSpec],
    used: Mapping[str, int],
    unavailable: Collection[str],
    policy: str,
    limits: Mapping[str, int] | None = None,
) -> HostSpec | None:
    """The host for the next entry (see :func:`~speccluster_ssh.placement.choose_host`), or ``None``.

    ``limits``: entries the cluster may have on a host beside other clusters
    (:func:`~speccluster_ssh.sharing.slot_limits`); a host not named there offers its slots.
    """
    limits = limits or {}
    slots = {n: min(h.slots, limits.get(n, h.slots)) for n, h in worker_hosts.items()}
    name = choose_host(slots, used, unavailable, policy)
    return worker_hosts[name] if name is not None else None


def place_entry(
    settings: EntrySettings,
    worker_hosts: Mapping[str, HostSpec],
    used: Mapping[str, int],
    *,
    unavailable: Collection[str] = (),
    policy: str = "spread",
    new_spec: Mapping[str, Any] | None = None,
    prefer: str | None = None,
    leaving: str | None = None,
    stay: str | None = None,
    gpus_held: Mapping[str, Mapping[str, int]] = _NONE_HELD,
    limits: Mapping[str, int] | None = None,
) -> dict[str, Any] | None:
    """The spec of a new or moved entry: its host, options and GPU share; ``None`` when no usable slot is free.

    Parameters
    ----------
    settings
        The cluster's shared settings.
    worker_hosts
        The inventory's worker hosts by name, in inventory order.
    used
        Entries placed per host (see :func:`slots_used`).
    unavailable
        Hosts that are down, put aside, drained or to be avoided.
    policy
        ``"spread"`` or ``"pack"``.
    new_spec
        As for :func:`worker_entry`.
    prefer
        A host that takes the entry whenever it is usable and has a free
        slot, whatever the policy would choose (an entry replaced in place).
    leaving
        The host a moved entry leaves: its slot there counts as free.
    stay
        A host the entry is built on again from today's variables, whatever
        its slots or health (its host changed in the inventory).
    gpus_held
        The GPU slots held per host, by entry name (:func:`gpus_held` of the
        spec the entry joins, without the entry itself): the entry takes a
        free one on its host. Needed wherever a host may have ``speccluster_gpus``.
    limits
        Entries the cluster may have per host beside other clusters (see
        :func:`choose_entry_host`); ``None``: every slot of the inventory.
    """
    if leaving is not None and leaving in used:
        used = {**used, leaving: used[leaving] - 1}
    if stay is not None:
        host: HostSpec | None = worker_hosts[stay]
    elif (prefer is not None and prefer in worker_hosts and prefer not in unavailable
          and used.get(prefer, 0) < min(worker_hosts[prefer].slots, (limits or {}).get(prefer, math.inf))):
        host = worker_hosts[prefer]
    else:
        host = choose_entry_host(worker_hosts, used, unavailable, policy, limits)
    return worker_entry(settings, host, new_spec, gpus_held.get(host.name, _NONE_HELD)) if host is not None else None


def next_entry_name(taken: Collection[Any], counter: int) -> tuple[str, int]:
    """The first free name ``str(i)`` for ``i >= counter``, and the counter to use next time."""
    while str(counter) in taken:
        counter += 1
    return str(counter), counter + 1


def next_entry(
    settings: EntrySettings,
    worker_hosts: Mapping[str, HostSpec],
    worker_spec: Mapping[Any, Mapping[str, Any]],
    counter: int,
    *,
    unavailable: Collection[str] = (),
    policy: str = "spread",
    new_spec: Mapping[str, Any] | None = None,
    limits: Mapping[str, int] | None = None,
) -> tuple[dict[str, Any] | None, int]:
    """The next entry ``{name: spec}`` on a host with a free slot.

    Parameters
    ----------
    settings
        The cluster's shared settings.
    worker_hosts
        The inventory's worker hosts by name, in inventory order.
    worker_spec
        The entries placed so far (the slots they use, the names they take).
    counter
        Where to start looking for a free entry name.
    unavailable
        Hosts that are down or put aside.
    policy
        ``"spread"`` or ``"pack"``.
    new_spec
        As for :func:`worker_entry`.
    limits
        As for :func:`place_entry`.

    Returns
    -------
    (dict or None, int)
        The entry (``None`` when every usable slot is taken) and the counter
        for the next call (unchanged when there was no slot).
    """
    spec = place_entry(
        settings, worker_hosts, slots_used(worker_spec), unavailable=unavailable, policy=policy, new_spec=new_spec,
        gpus_held=gpus_held(worker_spec), limits=limits,
    )
    if spec is None:
        return None, counter
    name, counter = next_entry_name(worker_spec, counter)
    return {name: spec}, counter


def capacity_workers(hosts: Iterable[HostSpec], unavailable: Collection[str] = ()) -> int:
    """Dask workers ``hosts`` hold when every slot of every usable host is used."""
    return sum(h.slots * h.nworkers for h in hosts if h.name not in unavailable)


# -- scheduler entries -----------------------------------------------------------------------------


def remote_scheduler_entry(
    settings: EntrySettings, host: HostSpec, default_dashboard_port: int | str, options: Mapping[str, Any] | None = None,
    cls: Any = None,
) -> dict[str, Any]:
    """The spec of a scheduler on inventory host ``host``.

    Parameters
    ----------
    settings
        The cluster's shared settings.
    host
        The scheduler host.
    default_dashboard_port
        The dashboard port when the host sets none (config ``dashboard-port``).
    options
        ``scheduler_options`` given to the cluster; they win.
    cls
        The process class; default the settings' ``"scheduler"`` class (the
        cluster passes another for a scheduler reached through SSH forwards).
    """
    dashboard_port = host.dashboard_port if host.dashboard_port is not None else default_dashboard_port
    remote_options: dict[str, Any] = {
        "port": host.scheduler_port,
        "dashboard_address": dashboard_bind(settings.dashboard_address, dashboard_port),
    }
    if host.interface:
        remote_options["interface"] = host.interface
    security = settings.security_options()
    if security is not None:
        remote_options["security"] = security
        remote_options["protocol"] = "tls"
    remote_options.update(options or {})
    spec: dict[str, Any] = {
        "cls": cls if cls is not None else settings.classes["scheduler"],
        "options": {
            "host": host.name,
            "cluster": settings.cluster_id,
            "options": remote_options,
            "env": dict(host.env),
            "start_timeout": settings.start_timeout,
        },
    }
    _add_host_vars(spec, host)
    return spec


def local_scheduler_entry(
    scheduler_cls: Any, security: Any, port: int, dashboard_port: int | str, options: Mapping[str, Any] | None = None,
    dashboard_address: str | None = None,
) -> dict[str, Any]:
    """The spec of a scheduler in the head process itself (no scheduler host in the inventory).

    Parameters
    ----------
    scheduler_cls
        ``distributed.Scheduler``.
    security
        The head's ``distributed.Security``; its ``require_encryption`` picks the protocol.
    port, dashboard_port
        Config ``scheduler-port`` and ``dashboard-port``.
    options
        ``scheduler_options`` given to the cluster; they win.
    dashboard_address
        Where the dashboard listens (see :func:`~speccluster_ssh.dashboards.dashboard_bind`);
        default the head's loopback.
    """
    local_options: dict[str, Any] = {
        # Every address of both families ("" binds one socket per family on one port): hosts
        # reached over IPv6 connect to the head's IPv6 address. dask still advertises its IPv4 one.
        "host": "",
        "port": int(port),
        "dashboard_address": dask_dashboard_address(dashboard_bind(dashboard_address, dashboard_port)),
        "security": security,
        "protocol": "tls" if security.require_encryption else "tcp",
    }
    local_options.update(options or {})
    return {"cls": scheduler_cls, "options": local_options}


# -- the head's dask config on the hosts -----------------------------------------------------------

#: Parts of the head's dask config never sent to hosts (dotted keys; a key drops its whole subtree):
#: the head's own settings, and paths that name files or directories of the head (its temporary
#: directory, its TLS certificates; a cluster's TLS files are shipped and passed on their own).
HEAD_ONLY_CONFIG: tuple[str, ...] = (
    "speccluster-ssh",
    "temporary-directory",
    "distributed.comm.tls.ca-file",
    "distributed.comm.tls.scheduler",
    "distributed.comm.tls.worker",
    "distributed.comm.tls.client",
    "distributed.scheduler.dashboard.tls",
)


def _json_value(value: Any) -> tuple[bool, Any]:
    """``(True, value)`` with tuples as lists when ``value`` travels as JSON, else ``(False, None)``."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True, value
    if isinstance(value, (list, tuple)):
        items = [_json_value(v) for v in value]
        if all(ok for ok, _ in items):
            return True, [v for _, v in items]
        return False, None
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        items_ = {k: _json_value(v) for k, v in value.items()}
        if all(ok for ok, _ in items_.values()):
            return True, {k: v for k, (_, v) in items_.items()}
    return False, None


def forwarded_dask_config(
    config: Mapping[str, Any], exclude: Iterable[str] = HEAD_ONLY_CONFIG
) -> tuple[dict[str, Any], list[str]]:
    """The part of the head's dask config that is sent to every remote process.

    Like dask's own ``SSHCluster``, the whole config travels (it goes over
    the SSH channel in the start request, never on a command line), less the
    keys in ``exclude`` and the values that are not plain data (a Python
    object set with ``dask.config.set`` cannot travel as JSON).

    Parameters
    ----------
    config
        The head's config, ``dask.config.config``.
    exclude
        Dotted keys left out with their subtrees, e.g. ``"temporary-directory"``.

    Returns
    -------
    (dict, list of str)
        The config to send, and the dotted keys left out because their
        values are not plain data (sorted).
    """
    excluded = {tuple(key.split(".")) for key in exclude if key}
    dropped: list[str] = []

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            here = (*path, str(key))
            if here in excluded:
                continue
            if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
                out[str(key)] = walk(value, here)
                continue
            ok, plain = _json_value(value)
            if ok:
                out[str(key)] = plain
            else:
                dropped.append(".".join(here))
        return out

    return walk(config, ()), sorted(dropped)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: mappings merge key by key, other values replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_size(config: Mapping[str, Any]) -> int:
    """Bytes ``config`` takes in a start request."""
    return len(json.dumps(config))
