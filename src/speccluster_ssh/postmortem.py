"""Logs after the end: what ``down`` keeps on the head, and the kept logs on the hosts.

Every host keeps an ended cluster's logs for its ``speccluster_log_retention``
(see ``agent/logs.py``). So that ``logs --name N`` can still reach them,
``down`` keeps a *record* of the cluster on the head, in
``<state-dir>/.ended/<name>/<cluster id>/``: ``record.json`` (name, cluster
id, inventory path, host names and addresses, start and end time, retention;
never a TLS secret) and the head process's ``head.log``. A record is kept as
long as the longest retention of its hosts, and purged by ``up`` and
``list`` once that has passed. A stale cluster (its head was killed) needs no
record: its state directory still says where its hosts are.

:func:`fetch_kept_logs` reads the kept logs of one cluster: it starts the
agent program over SSH in its read-only mode (``read_logs``), one host at a
time in parallel, and never changes anything there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import state as st
from .agent.logs import DEFAULT_RETENTION, sweep_action

logger = logging.getLogger(__name__)

ENDED_DIR = ".ended"  # not a cluster name (those start with a letter or digit), so list() skips it
RECORD_FILE = "record.json"


@dataclass
class EndedCluster:
    """What the head keeps of a cluster after ``down``: enough to reach its hosts again.

    Attributes
    ----------
    name, cluster_id, inventory, hosts, started
        As in :class:`speccluster_ssh.state.ClusterState`.
    ended
        When ``down`` ended it (seconds since the epoch).
    retention
        Seconds the record (and the hosts' logs) are kept after ``ended``.
    known_hosts
        The host key policy ``up --known-hosts`` gave, if any (reaching the hosts again uses it too).
    reason
        Why it ended when nobody asked (``"idle for 2h"``); ``""`` after ``down``.
    directory
        Where the record is (not saved in it).
    """

    name: str
    cluster_id: str
    inventory: str = ""
    hosts: dict[str, str] = field(default_factory=dict)
    started: str = ""
    ended: float = 0.0
    retention: float = DEFAULT_RETENTION
    known_hosts: str | None = None
    reason: str = ""
    directory: Path = field(default=Path(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy, without ``directory``."""
        data = asdict(self)
        data.pop("directory")
        return data

    @classmethod
    def of(cls, state: st.ClusterState, ended: float = 0.0, retention: float = DEFAULT_RETENTION) -> EndedCluster:
        """What a cluster's state says about reaching its hosts (``ended`` 0: not ended, its head died)."""
        options = getattr(state, "up_options", None) or {}
        return cls(state.name, state.cluster_id, state.inventory, dict(state.hosts), state.started, ended, retention,
                   options.get("known_hosts") if isinstance(options, dict) else None)

    @property
    def head_log(self) -> Path:
        """The kept log of the head process."""
        return self.directory / st.LOG_FILE


def ended_root() -> Path:
    """The directory holding the records of ended clusters."""
    return st.state_root() / ENDED_DIR


def host_retention(inventory: str, hosts: Sequence[str]) -> float:
    """The longest ``speccluster_log_retention`` of ``hosts`` in ``inventory``; the default if it cannot be read."""
    from .errors import SpecClusterError
    from .inventory import InventoryError, load_inventory

    try:
        inv = load_inventory(inventory)
    except (SpecClusterError, InventoryError, OSError, ValueError) as exc:
        logger.info("retention of %s's hosts unknown (%s); keeping its record %g s", inventory, exc, DEFAULT_RETENTION)
        return DEFAULT_RETENTION
    found = [h.log_retention for h in inv.hosts.values() if h.name in hosts]
    return max(found) if found else DEFAULT_RETENTION


def keep_record(known: st.KnownCluster, retention: float | None = None, reason: str = "") -> EndedCluster | None:
    """Keep the record of ``known`` (and its head log) before its state directory goes.

    ``reason`` says why it ended when nobody asked (``"idle for 2h"``).

    ``None`` when the state says too little to reach its hosts again (no cluster id).
    """
    state = known.state
    if not state.cluster_id:
        return None
    if retention is None:
        retention = host_retention(state.inventory, list(state.hosts))
    record = EndedCluster.of(state, time.time(), retention)
    record.reason = reason
    directory = ended_root() / state.name / state.cluster_id
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for part in (ended_root(), directory.parent, directory):
            part.chmod(0o700)
        st.write_private(directory / RECORD_FILE, json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")
        head_log = known.directory / st.LOG_FILE
        if head_log.is_file():
            shutil.copyfile(head_log, directory / st.LOG_FILE)
            (directory / st.LOG_FILE).chmod(0o600)
    except OSError as exc:
        logger.warning("cannot keep the record of cluster %s in %s: %s", state.name, directory, exc)
        return None
    record.directory = directory
    return record


def _read_record(directory: Path) -> EndedCluster | None:
    try:
        data = json.loads((directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    known = {f.name for f in fields(EndedCluster)} - {"directory"}
    try:
        record = EndedCluster(**{k: v for k, v in data.items() if k in known})
    except TypeError:
        return None
    record.directory = directory
    return record


def ended_clusters() -> list[EndedCluster]:
    """Every kept record, oldest end first."""
    root = ended_root()
    found = []
    try:
        names = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    for name_dir in names:
        try:
            ids = [p for p in name_dir.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            continue
        found += [r for r in map(_read_record, ids) if r is not None]
    return sorted(found, key=lambda r: r.ended)


def latest_record(name: str) -> EndedCluster | None:
    """The record of the last cluster called ``name`` that ended, if one is kept."""
    records = [r for r in ended_clusters() if r.name == name]
    return records[-1] if records else None


def purge_records(now: float | None = None) -> list[EndedCluster]:
    """Remove the records whose retention has passed (the same decision as the hosts'); return them."""
    now = time.time() if now is None else now
    purged = []
    for record in ended_clusters():
        if sweep_action(now=now, lock_free=True, ended_at=record.ended, retention=record.retention) == "remove":
            shutil.rmtree(record.directory, ignore_errors=True)
            purged.append(record)
            try:
                record.directory.parent.rmdir()  # only when no other record of the name is left
            except OSError:
                pass
    return purged


# -- the hosts' kept logs ----------------------------------------------------------------


def fetch_kept_logs(
    inventory: str, cluster_id: str, hosts: Sequence[str], *, nbytes: int = 16384, timeout: float = 60.0,
    known_hosts: str | None = None,
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Read the kept logs of cluster ``cluster_id`` on ``hosts`` over SSH.

    Parameters
    ----------
    inventory
        The inventory the cluster was started from (how to reach the hosts).
    cluster_id
        Names the cluster's directory on each host.
    hosts
        Inventory names of the hosts to ask.
    nbytes
        Bytes of each log's tail.
    timeout
        Seconds one host may take.
    known_hosts
        The host key policy ``up --known-hosts`` used, if any.

    Returns
    -------
    tuple
        Host -> process name -> log tail, for the hosts that answered; and
        host -> why not, for the others.
    """
    from .inventory import load_inventory

    inv = load_inventory(inventory)
    specs = {name: inv.hosts[name] for name in hosts if name in inv.hosts}
    problems = {name: f"not in {inventory} any more" for name in hosts if name not in specs}
    logs: dict[str, dict[str, str]] = {}

    async def main() -> None:
        from . import startup

        settings = startup.connect_settings(None, known_hosts, (), None)
        names = list(specs)
        results = await asyncio.gather(
            *(_read_host(specs[n], settings, cluster_id, nbytes, timeout) for n in names), return_exceptions=True
        )
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                problems[name] = getattr(result, "reason", None) or f"{type(result).__name__}: {result}"
            else:
                logs[name] = result

    asyncio.run(main())
    return logs, problems


async def _read_host(host: Any, settings: Any, cluster_id: str, nbytes: int, timeout: float) -> dict[str, str]:
    """The kept logs on one host, read by the agent program in its read-only mode."""
    from .agent import agent_argv, agent_payload
    from .connection import HostConnection
    from .errors import HostError

    connection = HostConnection(host, settings)
    try:
        await connection.open()
        # No cluster marker: this reader is not one of the cluster's processes.
        channel = await connection.open_channel(agent_argv(host, ""), host.prologue)
        try:
            config = {"read_logs": True, "cluster": cluster_id, "host_label": host.name, "bytes": nbytes}
            channel.write(agent_payload(config))
            try:
                line = await asyncio.wait_for(channel.readline(), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise HostError(host.name, f"no answer within {timeout:g} s") from None
            try:
                reply = json.loads(line)
            except ValueError:
                tail = channel.stderr_tail().strip().splitlines()
                raise HostError(host.name, f"cannot read its logs: {tail[-1] if tail else 'no answer'}") from None
        finally:
            await channel.close()
    finally:
        await connection.close()
    if reply.get("error") and not reply.get("logs"):
        raise HostError(host.name, f"no logs kept there ({reply['error']})")
    return {str(k): str(v) for k, v in (reply.get("logs") or {}).items()}


def pick_logs(
    logs: Mapping[str, Mapping[str, str]], target: str | None, hosts: Sequence[str]
) -> dict[str, str]:
    """The logs ``logs --name N [TARGET]`` prints: every one, one host's, or one process's (by name).

    Raises :class:`speccluster_ssh.errors.UserError` when ``target`` names none of them.
    """
    from .errors import UserError

    if target and target in hosts:
        return dict(logs.get(target, {}))
    seen: dict[str, int] = {}
    for per_host in logs.values():
        for name in per_host:
            seen[name] = seen.get(name, 0) + 1
    # A name kept on two hosts (an entry relaunched elsewhere) is told apart by its host.
    flat = {
        (name if seen[name] == 1 else f"{name} on {host}"): text
        for host, per_host in logs.items() for name, text in per_host.items()
    }
    if not target:
        return flat
    wanted = {
        k: v for k, v in flat.items()
        if k.split(" on ")[0] == target or k.split(" on ")[0].lower() == target.lower() == "scheduler"
    }
    if not wanted:
        raise UserError(
            f"no kept log named {target!r}; logs: {', '.join(sorted(flat)) or 'none'}; "
            f"hosts: {', '.join(sorted(hosts)) or 'none'}"
        )
    return wanted
