"""What an SSHSpecCluster tells about itself: status reports, readiness and worker logs.

:class:`Reports` reads the cluster (spec, processes, host states, the
scheduler's worker list) and never changes it. It keeps the last log tail
of every member whose processes are gone, so that ``get_logs`` and
``speccluster-ssh logs`` still show why a worker died after its entry was
relaunched elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.utils import Log

from . import entries
from .labview import lease_json
from .process import RemoteProcess

if TYPE_CHECKING:
    from .cluster_protocols import ReportsCluster


class Reports:
    """Status, readiness and logs of one cluster.

    Parameters
    ----------
    cluster
        The cluster reported on.

    Attributes
    ----------
    gone_logs
        Member name -> the last log tail of its process, for members whose
        processes are gone.
    gone_member_hosts
        Member name -> the host its gone process ran on (``logs --host``).
    """

    def __init__(self, cluster: ReportsCluster) -> None:
        self.cluster = cluster
        self.gone_logs: dict[str, str] = {}
        self.gone_member_hosts: dict[str, str] = {}

    def keep_logs(self, worker: Any) -> None:
        """Keep the exit log tails of ``worker``'s members, which are gone or going."""
        if isinstance(worker, RemoteProcess):
            for member, info in worker.exit_info.items():
                self.gone_logs[member] = str(info.get("tail", ""))
                self.gone_member_hosts[member] = worker.host

    def status_report(self) -> dict[str, Any]:
        """See :meth:`SSHSpecCluster.status_report`."""
        cluster = self.cluster
        info = cluster.scheduler_info.get("workers", {}) if cluster.scheduler_info else {}
        by_name = {str(w["name"]): (addr, w) for addr, w in info.items()}
        workers = []
        hosts: dict[str, Any] = {}
        used = entries.slots_used(cluster.worker_spec)
        for name, host in cluster.worker_hosts.items():
            hosts[name] = {
                "address": host.address,
                "slots": host.slots,
                "slots_used": used.get(name, 0),
                **cluster.host_table.states[name].as_dict(),
                **others_on(cluster.host_table.leases.get(name, ()), name, cluster.cluster_id),
                **cluster.power.report(name),  # asleep, waking, awake (woken) or on; "" for a host that never sleeps
            }
            if hosts[name]["power"] in ("asleep", "waking") and hosts[name]["state"] in ("up", "new"):
                # Its agent is gone with it (or never started): the host is not up, it sleeps.
                hosts[name]["state"] = hosts[name]["power"]
        healer = cluster.healer
        for key, spec in cluster.worker_spec.items():
            host = spec["options"].get("host")
            proc = cluster.workers.get(key)
            pending = "backing off" if healer.waiting(key) else "pending"
            for member in entries.member_names(key, spec):
                addr, winfo = by_name.get(member, (None, {}))
                workers.append(
                    {
                        "name": member,
                        "entry": str(key),
                        "host": host,
                        "address": addr,
                        "status": "running" if addr else (proc.status.name if proc else pending),
                        "threads": winfo.get("nthreads"),
                        "memory_limit": winfo.get("memory_limit"),
                        # The worker's GPU devices (CUDA_VISIBLE_DEVICES) on a host with speccluster_gpus.
                        "gpus": proc.gpus.get(member) if isinstance(proc, RemoteProcess) else None,
                        "problem": healer.problem(key),
                    }
                )
        return {
            "name": cluster.name,
            "cluster_id": cluster.cluster_id,
            "scheduler_address": cluster.scheduler_address,
            "dashboard_link": cluster.dashboard_link,
            "hosts": hosts,
            "workers": workers,
            "capacity_note": cluster.capacity_note,
            "summary": {**summarize(hosts, workers, cluster.min_workers), "held_elsewhere": held_elsewhere(hosts)
                        if cluster.capacity_note else ""},
        }

    def readiness(self) -> tuple[dict[str, int], dict[str, int]]:
        """See :meth:`SSHSpecCluster.readiness`."""
        cluster = self.cluster
        wanted: dict[str, int] = {}
        ready: dict[str, int] = {}
        for spec in list(cluster.worker_spec.values()):
            host = spec.get("options", {}).get("host")
            group = spec.get("group")
            wanted[host] = wanted.get(host, 0) + (len(group) if group else 1)
        processes = {id(p): p for p in [*cluster.processes(), *cluster.workers.values()]}
        for proc in processes.values():
            if (
                isinstance(proc, RemoteProcess)
                and proc.role != "scheduler"
                and proc.status == Status.running
                and proc.name in cluster.worker_spec
            ):
                ready[proc.host] = ready.get(proc.host, 0) + len(proc.member_names)
        return wanted, ready

    async def worker_logs(self, logs: dict[str, Any], workers: bool | Sequence[str]) -> dict[str, Any]:
        """Add the log of each wanted worker to ``logs``: live tails first, then kept ones."""
        cluster = self.cluster
        wanted = None if workers is True else {self.name_of(str(w)) for w in workers}  # type: ignore[union-attr]
        for proc in list(cluster.workers.values()):
            if isinstance(proc, RemoteProcess):
                for member, text in (await proc.tail()).items():
                    if wanted is None or member in wanted:
                        logs[member] = Log(text)
        for member, text in self.gone_logs.items():
            if (wanted is None or member in wanted) and member not in logs:
                logs[member] = Log(text)
        return logs

    async def scheduler_log(self) -> Log:
        """The scheduler's recent log records, oldest first like every other log (dask gives them newest first)."""
        records = await self.cluster.scheduler_comm.get_logs()
        return Log("\n".join(line for _level, line in reversed(records)))

    def name_of(self, worker: str) -> str:
        """The worker name for a name or an address the scheduler knows."""
        info = (self.cluster.scheduler_info or {}).get("workers", {}).get(worker)
        return str(info["name"]) if info else worker


def summarize(hosts: dict[str, Any], workers: list[dict[str, Any]], min_workers: int) -> dict[str, Any]:
    """The facts of ``up``'s last line: hosts up, workers running, and why hosts are missing.

    Parameters
    ----------
    hosts, workers
        The ``hosts`` and ``workers`` of a status report.
    min_workers
        Workers the start needed.
    """
    missing = {
        name: {"state": host["state"], "reason": host.get("reason", ""), "fix": host.get("fix", "")}
        for name, host in hosts.items()
        if host.get("state") in ("down", "aside")
    }
    running = sum(1 for w in workers if w.get("status") == "running")
    # Drained hosts are missing on purpose; they are said apart from the failing ones.
    drained = {name: str(host["drained"]) for name, host in hosts.items() if host.get("drained")}
    return {
        "hosts": len(hosts),
        "hosts_up": sum(1 for h in hosts.values() if h.get("state") == "up"),
        # Hosts that sleep (asleep or waking, speccluster_power_on): missing on purpose, woken when needed.
        "hosts_asleep": sum(1 for h in hosts.values() if h.get("power") in ("asleep", "waking")),
        "workers_wanted": len(workers),
        "workers_running": running,
        "min_workers": min_workers,
        "min_met": running >= min_workers,
        "missing_hosts": missing,
        "drained_hosts": drained,
    }


def summary_line(summary: dict[str, Any]) -> str:
    """One line, e.g. ``3 of 4 hosts up, 6 of 8 workers; h3 down: cannot connect (retrying)``."""
    asleep = f" ({summary['hosts_asleep']} asleep)" if summary.get("hosts_asleep") else ""
    line = (
        f"{summary['hosts_up']} of {summary['hosts']} hosts up{asleep}, "
        f"{summary['workers_running']} of {summary['workers_wanted']} workers"
    )
    parts = []
    for name, host in summary.get("missing_hosts", {}).items():
        reason = " ".join(str(host.get("reason") or "no reason recorded").split())
        then = f"fix: {host['fix']}" if host.get("fix") else ("retrying" if host["state"] == "down" else "put aside")
        parts.append(f"{name} {host['state']}: {reason} ({then})")
    for name, why in summary.get("drained_hosts", {}).items():
        parts.append(f"{name} drained: {' '.join(why.split())}")
    if summary.get("held_elsewhere"):
        parts.append(f"waiting for slots held by {summary['held_elsewhere']}")
    return line + ("; " + "; ".join(parts) if parts else "")


def others_on(leases: Sequence[Any], host: str, cluster_id: str) -> dict[str, Any]:
    """The other clusters on a host, as its agent last listed them: ``holders`` and ``wants`` (``hosts --json``'s shape)."""
    others = [lease for lease in leases if lease.cluster != cluster_id and lease.host == host]
    return {
        "holders": [lease_json(lease) for lease in others if lease.held],
        "wants": [lease_json(lease) for lease in others if not lease.held],
    }


def held_elsewhere(hosts: dict[str, Any]) -> str:
    """``root (alpha from vm) on h1, h2``: who holds the hosts of a status report that other clusters fill."""
    where: dict[str, list[str]] = {}
    for name, host in hosts.items():
        if host.get("slots_used", 0) >= host.get("slots", 0):
            continue
        for lease in host.get("holders") or ():
            who = f"{lease['user']} ({lease['name'] or lease['cluster']} from {lease['head'] or '?'})"
            where.setdefault(who, []).append(name)
    return "; ".join(f"{who} on {', '.join(dict.fromkeys(names))}" for who, names in where.items())
