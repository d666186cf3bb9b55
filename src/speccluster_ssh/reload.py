"""Reloading a running cluster's inventory: the difference (pure), and applying it.

:func:`diff_inventories` compares the worker hosts of two inventories:

- **added**: worker hosts only the new inventory has;
- **removed**: worker hosts only the old one has (left out, or no longer in
  the worker group, or ``speccluster_slots: 0``);
- **changed**: worker hosts whose ``speccluster_*`` or ``ansible_*``
  (connection) variables differ, after ansible's precedence merged them,
  with the variables that changed.

The scheduler cannot move while the cluster runs, so an inventory that
changes the scheduler host (or its variables) is refused, as is one with no
worker host left.

:func:`reload_inventory` applies the difference, in this order, so that
entries moving off removed hosts can use the new ones:

1. new hosts become usable: entries may be placed there;
2. removed hosts are drained (their entries move to free slots, see
   :mod:`speccluster_ssh.operations`), then their agent and SSH connection
   are closed and the cluster forgets them;
3. the entries of changed hosts are replaced ``batch`` at a time, each by
   an entry built from the new variables, through a new agent on a new
   SSH connection (made from the new variables);
4. a fixed-size cluster short of its last target grows back onto free
   slots, and a running ``adapt`` gets its maximum recomputed from the
   bounds it was asked for.

An inventory that cannot be read changes nothing and gives the same one
line as at start.

The cluster adopts the new inventory (what the next reload compares with)
only once every step succeeded, and then with the hosts whose new agent was
refused as they really run (:func:`in_effect`): a reload that stopped part
way, or refused a host, shows the rest of the difference again and can be
run again once the cause is fixed.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import entries, operations
from .errors import UserError
from .messages import one_line

if TYPE_CHECKING:
    from .cluster_protocols import ReloadCluster
    from .inventory import HostSpec, Inventory

logger = logging.getLogger("speccluster_ssh.cluster")

# Variables whose change means the host's entries must be replaced.
SETTING_PREFIX = "speccluster_"
CONNECTION_PREFIX = "ansible_"
# Connection variables whose values are shown; others (passwords, keys' passphrases) only by name.
SHOWN_CONNECTION_VARS = frozenset({
    "ansible_host", "ansible_ssh_host", "ansible_port", "ansible_ssh_port", "ansible_user", "ansible_ssh_user",
    "ansible_connection", "ansible_python_interpreter", "ansible_ssh_common_args", "ansible_ssh_extra_args",
    "ansible_ssh_private_key_file",
})


@dataclass(frozen=True)
class VarChange:
    """One variable of a host that differs between the inventories.

    ``old``/``new`` are ``None`` when the variable is unset on that side;
    ``shown`` is false for connection variables whose values are not printed.
    """

    name: str
    old: Any
    new: Any
    shown: bool = True

    @property
    def connection(self) -> bool:
        """Whether this is a connection (``ansible_*``) variable: the host's SSH connection is made again."""
        return self.name.startswith(CONNECTION_PREFIX)

    def as_dict(self) -> dict[str, Any]:
        if not self.shown:
            return {"name": self.name, "old": None, "new": None, "shown": False}
        return {"name": self.name, "old": _json(self.old), "new": _json(self.new), "shown": True}


@dataclass(frozen=True)
class InventoryDiff:
    """What differs between the worker hosts of two inventories."""

    source: str
    added: tuple[HostSpec, ...] = ()
    removed: tuple[str, ...] = ()
    changed: Mapping[str, tuple[VarChange, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def connection_changed(self, host: str) -> bool:
        """Whether a connection variable of ``host`` changed (its SSH connection must be made again)."""
        return any(c.connection for c in self.changed.get(host, ()))

    def as_dict(self, entries_on: Mapping[str, int] | None = None) -> dict[str, Any]:
        """JSON for ``reload --json``; ``entries_on`` (host -> entries there now) adds the entries affected."""
        from .planning import ssh_target

        counts = entries_on or {}
        return {
            "source": self.source,
            "added": [{"host": h.name, "slots": h.slots, "target": ssh_target(h)} for h in self.added],
            "removed": [{"host": h, "entries": counts.get(h, 0)} for h in self.removed],
            "changed": [
                {"host": h, "entries": counts.get(h, 0), "variables": [c.as_dict() for c in changes]}
                for h, changes in self.changed.items()
            ],
        }


def _json(value: Any) -> Any:
    from .inventory import to_json_value

    return to_json_value(value)


def relevant_vars(host: HostSpec) -> dict[str, Any]:
    """The host's merged ``speccluster_*`` and ``ansible_*`` variables."""
    return {k: v for k, v in host.vars.items() if isinstance(k, str) and k.startswith((SETTING_PREFIX, CONNECTION_PREFIX))}


def var_changes(old: HostSpec, new: HostSpec) -> tuple[VarChange, ...]:
    """The ``speccluster_*`` and connection variables that differ between two versions of a host, by name."""
    before, after = relevant_vars(old), relevant_vars(new)
    changes = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name) or (name in before) != (name in after):
            shown = name.startswith(SETTING_PREFIX) or name in SHOWN_CONNECTION_VARS
            changes.append(VarChange(name, before.get(name), after.get(name), shown))
    return tuple(changes)


def diff_inventories(old: Inventory, new: Inventory, source: str = "") -> InventoryDiff:
    """The difference between a running cluster's inventory ``old`` and ``new``.

    Parameters
    ----------
    old, new
        The inventories.
    source
        Where ``new`` was read, for messages.

    Raises
    ------
    UserError
        When the scheduler host would change, or no worker host is left.
    """
    where = source or str(new.path or "the new inventory")
    before_s, after_s = old.scheduler_host, new.scheduler_host
    fix = "put it back as it was, or restart the cluster ('speccluster-ssh down', then 'up')"
    if (before_s is None) != (after_s is None) or (before_s and after_s and before_s.name != after_s.name):
        was = before_s.name if before_s else "the head"
        now = after_s.name if after_s else "the head"
        raise UserError(f"{where}: the scheduler cannot move while the cluster runs (from {was} to {now}); {fix}")
    if before_s is not None and after_s is not None:
        changed = var_changes(before_s, after_s)
        if changed:
            names = ", ".join(c.name for c in changed)
            raise UserError(f"{where}: the scheduler host {after_s.name} changed ({names}) while the cluster runs; {fix}")
    if not new.worker_hosts:
        raise UserError(f"{where}: no worker host is left (group {new.worker_group!r} is empty); "
                        "keep at least one, or stop the cluster with 'speccluster-ssh down'")
    old_workers = {h.name: h for h in old.worker_hosts}
    new_workers = {h.name: h for h in new.worker_hosts}
    added = tuple(h for n, h in new_workers.items() if n not in old_workers)
    removed = tuple(n for n in old_workers if n not in new_workers)
    changed = {}
    for name, host in new_workers.items():
        if name in old_workers:
            changes = var_changes(old_workers[name], host)
            if changes:
                changed[name] = changes
    return InventoryDiff(where, added, removed, changed)


def describe(diff: Mapping[str, Any], *, batch: int = 1) -> list[str]:
    """The lines ``reload`` prints for a difference (the ``as_dict`` of an :class:`InventoryDiff`), plan style."""
    lines = []
    for host in diff.get("added", []):
        lines.append(f"host {host['host']}: added, {host['slots']} slot(s), {host['target']}; "
                     "entries may be placed there")
    for host in diff.get("removed", []):
        n = host.get("entries", 0)
        lines.append(f"host {host['host']}: removed; " + (
            f"drained first (its {n} entr{'y moves' if n == 1 else 'ies move'} to free slots), then " if n else "")
            + "its agent and connection are closed")
    for host in diff.get("changed", []):
        parts = []
        for var in host["variables"]:
            if not var.get("shown", True):
                parts.append(f"{var['name']} (value not shown)")
            else:
                parts.append(f"{var['name']}: {_value(var['old'])} -> {_value(var['new'])}")
        n = host.get("entries", 0)
        then = f"its {n} entr{'y is' if n == 1 else 'ies are'} replaced, {batch} at a time" if n else "no entry runs there"
        lines.append(f"host {host['host']}: changed {', '.join(parts)}; {then}")
    if not lines:
        lines.append("no worker host was added, removed or changed")
    return lines


def _value(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def in_effect(old: Inventory, new: Inventory, refused: Collection[str]) -> Inventory:
    """The inventory a reload of ``new`` put in effect: ``new``, with the hosts of ``refused`` as ``old`` has them.

    A refused host keeps running with its old variables, so the next reload
    finds its change again.
    """
    if not refused:
        return new
    kept = copy.copy(new)
    kept.hosts = {name: old.hosts[name] if name in refused and name in old.hosts else spec
                  for name, spec in new.hosts.items()}
    kept.worker_hosts = [kept.hosts[h.name] for h in new.worker_hosts]
    return kept


# -- applying ------------------------------------------------------------------------------------


def read_inventory(cluster: ReloadCluster, path: str | os.PathLike[str] | None) -> Inventory:
    """The inventory at ``path`` (default: where the cluster's was read), with the cluster's group names.

    Raises
    ------
    UserError
        With the one line ``up`` gives for the same inventory.
    """
    from .inventory import load_inventory
    from .messages import is_inventory_error

    old = cluster.inventory
    source = path if path is not None else old.path
    if source is None:
        raise UserError(f"cluster {cluster.name}'s inventory was not read from a file; give the inventory to reload")
    try:
        return load_inventory(source, scheduler_group=old.scheduler_group, worker_group=old.worker_group)
    except Exception as exc:
        if is_inventory_error(exc):
            raise UserError(one_line(str(exc))) from None
        raise


def entries_per_host(cluster: ReloadCluster) -> dict[str, int]:
    """Spec entries per host now."""
    return entries.slots_used(cluster.worker_spec)


async def reload_inventory(
    cluster: ReloadCluster, path: str | os.PathLike[str] | None = None, *, dry_run: bool = False, batch: int = 1
) -> dict[str, Any]:
    """See :meth:`SSHSpecCluster.reload_inventory`."""
    if int(batch) < 1:
        raise UserError(f"the reload batch must be 1 or more, got {batch}")
    new = read_inventory(cluster, path)
    diff = diff_inventories(cluster.inventory, new, str(new.path or path or ""))
    result = diff.as_dict(entries_per_host(cluster))
    result.update({"dry_run": dry_run, "applied": False, "batch": int(batch), "warnings": list(new.warnings)})
    if dry_run or diff.empty:
        return result
    operations.check_running(cluster)
    async with operations.of(cluster).lock:
        # Read again under the lock: another operation may have changed the cluster meanwhile.
        diff = diff_inventories(cluster.inventory, new, diff.source)
        result.update(diff.as_dict(entries_per_host(cluster)))
        try:
            applied = await _apply(cluster, new, diff, int(batch))
        except operations.OperationError as exc:
            # Not adopted: the next reload finds what is left of the difference.
            raise operations.OperationError(f"{exc}; the reload stopped there: run it again once fixed") from exc
        result.update(applied)
        # Adopted only now, with refused hosts as they run.
        cluster.host_table.adopt_inventory(in_effect(cluster.inventory, new, applied["refused"]))
        result["applied"] = True
    return result


async def _apply(cluster: ReloadCluster, new: Inventory, diff: InventoryDiff, batch: int) -> dict[str, Any]:
    table = cluster.host_table
    old_hosts = dict(cluster.worker_hosts)
    new_hosts = {h.name: h for h in new.worker_hosts}
    cluster.capacity.remember_target()
    cluster.log_event(f"reloading the inventory from {diff.source}")
    # 1. New and changed hosts; removed ones stay known (drained) until they are closed.
    for host in diff.added:
        table.add(host, worker=True)
    for name in diff.changed:
        table.replace_spec(name, new_hosts[name])
    # A removed host a reload that stopped part way closed already is not known any more.
    removed = [n for n in diff.removed if n in old_hosts]
    table.put_in_order([*new_hosts, *removed])  # the new inventory's order decides placement ties
    out: dict[str, Any] = {"moved": {}, "dropped": [], "refused": {}}

    def keep(done: Mapping[str, Any]) -> None:
        out["moved"].update(done.get("moved", {}))
        out["dropped"].extend(done.get("dropped", []))

    # 2. Removed hosts: drained, then closed.
    for name in removed:
        keep(await operations.drain_unlocked(cluster, name, f"removed from the inventory {diff.source}"))
        await _forget_host(cluster, name)
    # 3. Changed hosts: entries replaced through a new agent (and connection).
    if diff.changed:
        renewal = operations.AgentRenewal(cluster)
        # A new connection for every changed host: it carries the host's spec, which the
        # new agent's command line (python, prologue) is made from.
        await renewal.renew([n for n in diff.changed if n in table.agents], new_connection=set(diff.changed))
        for name, reason in renewal.refused.items():
            # The host keeps running as it was; the user fixes the inventory and reloads again.
            table.replace_spec(name, old_hosts[name])
            out["refused"][name] = reason
        targets = [n for n in diff.changed if n not in renewal.refused]
        for name in targets:
            if name not in renewal.old_connections and name not in table.agents:
                # No agent ran there: a connection left from before must not be reused.
                stale = table.drop_connection(name)
                if stale is not None:
                    await stale.close()
        keys = [str(k) for k, s in cluster.worker_spec.items() if operations.host_of(s) in targets]
        running = operations.running_keys(cluster, keys)
        for key in keys:
            if key not in running:
                # Not running: built again from the new variables, under a new key, so that a
                # process already starting (or failed) with the old ones is closed by the reconcile.
                host = operations.host_of(cluster.worker_spec.pop(key))
                new_key = operations.new_key(cluster, (key,))
                rebuilt = entries.place_entry(
                    cluster.entry_settings, cluster.worker_hosts, {}, new_spec=cluster.new_spec, stay=host,
                    gpus_held=entries.gpus_held(cluster.worker_spec),
                )
                if rebuilt is not None:  # never None: it stays on its host
                    cluster.worker_spec[new_key] = rebuilt
        try:
            done = await operations.replace_entries(
                cluster, running, batch=batch, avoid=set(renewal.refused), why="replaced: its host changed"
            )
        finally:
            await renewal.close_old()
        keep(done.as_dict())
    # 4. Fill the target again, onto new hosts too; adapt may grow onto them.
    before = set(cluster.worker_spec)
    cluster.capacity.refill()
    out["added_entries"] = [str(k) for k in cluster.worker_spec if k not in before]
    adaptive = cluster.running_adaptive()
    if adaptive is not None:
        cluster.capacity.refresh_adapt(adaptive)
    await operations.reconcile(cluster)
    cluster.healer.wake("inventory reloaded")
    cluster.log_event(f"inventory reloaded from {diff.source}")
    return out


async def _forget_host(cluster: ReloadCluster, name: str) -> None:
    """Close a removed host's agent and connection, and forget it (unless something still runs there)."""
    left = [k for k, s in cluster.worker_spec.items() if operations.host_of(s) == name]
    scheduler_here = getattr(cluster.scheduler, "host", None) == name
    if left or scheduler_here:
        logger.warning("host %s was removed from the inventory but still runs %s", name,
                       "the scheduler" if scheduler_here else f"entries {', '.join(map(str, left))}")
        return
    agent, conn = cluster.host_table.forget(name)
    if agent is not None:
        await agent.close()
    if conn is not None:
        await conn.close()
    cluster.log_event(f"host {name} removed: its agent and connection are closed")
