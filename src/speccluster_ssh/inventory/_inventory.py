"""The :class:`Inventory` model: hosts, groups and their merged variables."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import InventoryError, Origin
from ._graph import HostNode, InventoryGraph, sort_groups
from ._hostspec import HostSpec, check_var_names, resolve_host
from ._jumps import resolve_jump_chain
from ._loader import UnsafeStr, VaultStr
from ._patterns import expand_host_pattern
from ._varsfiles import VarsFiles

__all__ = ["GroupInfo", "Inventory", "hosts_table_rows"]


# Variables ansible computes itself and strips from ``ansible-inventory``
# output (its INTERNAL_STATIC_VARS); setting them in an inventory has no effect.
INTERNAL_VARS = frozenset(
    {
        "ansible_async_path", "ansible_collection_name", "ansible_config_file",
        "ansible_dependent_role_names", "ansible_diff_mode", "ansible_facts", "ansible_forks",
        "ansible_inventory_sources", "ansible_limit", "ansible_play_batch", "ansible_play_hosts",
        "ansible_play_hosts_all", "ansible_play_role_names", "ansible_playbook_python",
        "ansible_role_name", "ansible_role_names", "ansible_run_tags", "ansible_skip_tags",
        "ansible_verbosity", "ansible_version", "inventory_dir", "inventory_file",
        "inventory_hostname", "inventory_hostname_short", "groups", "group_names", "hostvars",
        "playbook_dir", "play_hosts", "role_name", "role_names", "role_path", "role_uuid",
    }
)



@dataclass(frozen=True)
class GroupInfo:
    """A group of the inventory, as ansible sees it after parsing.

    Attributes
    ----------
    name
        Group name.
    hosts
        Names of the hosts listed directly in the group, in inventory order.
    children
        Names of the child groups, in the order they were added.
    parents
        Names of the parent groups.
    depth
        Longest distance from ``all`` (``all`` is 0); deeper groups win.
    priority
        ``ansible_group_priority`` (default 1); at equal depth higher wins.
    vars
        Variables set on the group in the inventory file itself.
    """

    name: str
    hosts: tuple[str, ...]
    children: tuple[str, ...]
    parents: tuple[str, ...]
    depth: int
    priority: int
    vars: dict[str, Any] = field(compare=False, hash=False)


def _json_key(key: Any) -> str:
    # the same key conversions json.dumps applies
    if isinstance(key, str):
        return str(key)
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, float):
        return {float("inf"): "Infinity", float("-inf"): "-Infinity"}.get(key, repr(key))
    return str(key)


def to_json_value(value: Any) -> Any:
    """Convert a variable value to what ``ansible-inventory --list`` prints for it.

    Parameters
    ----------
    value
        A variable value as read from an inventory.

    Returns
    -------
    Any
        JSON-native data: ``!unsafe`` strings become ``{"__ansible_unsafe": s}``,
        vaulted ones ``{"__ansible_vault": ciphertext}``, dates ISO strings,
        tuples and sets lists.
    """
    if isinstance(value, UnsafeStr):
        return {"__ansible_unsafe": str(value)}
    if isinstance(value, VaultStr):
        return {"__ansible_vault": str(value)}
    if isinstance(value, str):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {_json_key(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class Inventory:
    """A parsed, validated inventory.

    Use :func:`load_inventory` to read a file or :meth:`from_hosts` to build
    one in code.

    Attributes
    ----------
    path : pathlib.Path or None
        Absolute path of the inventory source, ``None`` for programmatic ones.
    hosts : dict of str to HostSpec
        Every host, in inventory order.
    groups : dict of str to GroupInfo
        Every group, ``all`` and ``ungrouped`` included, in definition order.
    scheduler_host : HostSpec or None
        The one host of the scheduler group, or ``None`` to run the scheduler
        on the machine that starts the cluster.
    worker_hosts : list of HostSpec
        Hosts that run workers, in inventory order (hosts with
        ``speccluster_slots: 0`` are left out).
    warnings : list of str
        Non-fatal problems ansible would also only warn about.
    scheduler_group, worker_group : str
        Names of the groups that select the scheduler and worker hosts.
    """

    def __init__(
        self,
        graph: InventoryGraph,
        files: VarsFiles,
        path: pathlib.Path | None,
        *,
        scheduler_group: str = "scheduler",
        worker_group: str = "workers",
        shown: str = "<inventory>",
    ) -> None:
        self.path = path
        self.scheduler_group = scheduler_group
        self.worker_group = worker_group
        self.warnings: list[str] = graph.warnings
        self._graph = graph
        self._files = files

        for group in graph.groups.values():
            check_var_names(group.vars, group.origins, f"group {group.name}")

        self._hostvars: dict[str, dict[str, Any]] = {}
        self.hosts: dict[str, HostSpec] = {}
        for host in graph.hosts.values():
            variables, origins = self._merge(host)
            self._hostvars[host.name] = variables
            names = tuple(sorted(g.name for g in host.groups() if g.name != "all"))
            self.hosts[host.name] = resolve_host(host.name, variables, origins, names, self.warnings)
        # Jumps may name other inventory hosts, so they are filled in once all are known.
        as_written = dict(self.hosts)
        for hostname, spec in as_written.items():
            if spec.jumps:
                try:
                    chain = resolve_jump_chain(hostname, as_written)
                except ValueError as exc:
                    raise InventoryError(f"host {hostname}: {exc}", Origin(shown)) from None
                self.hosts[hostname] = dataclasses.replace(spec, jumps=chain)

        self.groups: dict[str, GroupInfo] = {
            g.name: GroupInfo(
                name=g.name,
                hosts=tuple(h.name for h in g.hosts),
                children=tuple(c.name for c in g.children),
                parents=tuple(p.name for p in g.parents),
                depth=g.depth,
                priority=g.priority,
                vars=dict(g.vars),
            )
            for g in graph.groups.values()
        }

        scheduler_node = graph.groups.get(scheduler_group)
        scheduler_names = [h.name for h in scheduler_node.all_hosts()] if scheduler_node else []
        if len(scheduler_names) > 1:
            raise InventoryError(
                f"group {scheduler_group!r} must hold one host, the scheduler, but holds "
                f"{len(scheduler_names)}: {', '.join(scheduler_names)}; keep exactly one of them there",
                Origin(shown),
            )
        self.scheduler_host: HostSpec | None = self.hosts[scheduler_names[0]] if scheduler_names else None

        worker_node = graph.groups.get(worker_group)
        if worker_node is not None:
            members = {h.name for h in worker_node.all_hosts()}
        else:
            # no workers group: every host but the scheduler runs workers
            members = set(self.hosts) - set(scheduler_names)
        self.worker_hosts: list[HostSpec] = [
            spec for name, spec in self.hosts.items() if name in members and spec.slots > 0
        ]
        self._worker_names = frozenset(spec.name for spec in self.worker_hosts)
        scheduler = self.scheduler_host
        if scheduler is not None and scheduler.name not in self._worker_names and scheduler.worker_class_path:
            # It runs no worker, so its agent does not import the class (often installed on worker hosts only).
            self.scheduler_host = dataclasses.replace(scheduler, worker_class="nanny")

    # -- variables ---------------------------------------------------------------

    def _merge(self, host: HostNode) -> tuple[dict[str, Any], dict[str, Origin]]:
        """Merge a host's variables in ansible-core's default precedence order.

        all (inventory) < other groups (inventory, by depth, priority, name)
        < group_vars/all < group_vars/<groups> (same order) < host (inventory)
        < host_vars/<host>.  Each step replaces whole top-level values.
        """
        variables: dict[str, Any] = {}
        origins: dict[str, Origin] = {}

        def add(new: Mapping[str, Any], new_origins: Mapping[str, Origin]) -> None:
            for key, value in new.items():
                variables[key] = value
                if key in new_origins:
                    origins[key] = new_origins[key]
                else:
                    origins.pop(key, None)

        def add_group_file(name: str) -> None:
            file_vars, file_origins = self._files.group_vars(name)
            check_var_names(file_vars, file_origins, f"group {name}")
            add(file_vars, file_origins)

        all_group = self._graph.groups["all"]
        groups = sort_groups(g for g in host.groups() if g.name != "all")
        add(all_group.vars, all_group.origins)
        for group in groups:
            add(group.vars, group.origins)
        add_group_file("all")
        for group in groups:
            add_group_file(group.name)
        add(host.vars, host.origins)
        host_vars, host_origins = self._files.host_vars(host.name)
        check_var_names(host_vars, host_origins, f"host {host.name}")
        add(host_vars, host_origins)
        for name in INTERNAL_VARS.intersection(variables):
            del variables[name]
            origins.pop(name, None)
        return variables, origins

    # -- queries -------------------------------------------------------------------

    def hosts_in_group(self, group: str) -> list[HostSpec]:
        """Hosts of ``group`` and of its descendant groups, in inventory order.

        Parameters
        ----------
        group
            Group name.

        Returns
        -------
        list of HostSpec
            Empty when the group does not exist.
        """
        node = self._graph.groups.get(group)
        if node is None:
            return []
        names = {h.name for h in node.all_hosts()}
        return [spec for name, spec in self.hosts.items() if name in names]

    def role(self, host: str) -> str:
        """What a host does in the cluster.

        Parameters
        ----------
        host
            Inventory hostname.

        Returns
        -------
        str
            ``"scheduler"``, ``"worker"``, ``"both"`` or ``"-"`` (neither).
        """
        is_scheduler = self.scheduler_host is not None and self.scheduler_host.name == host
        is_worker = host in self._worker_names
        if is_scheduler and is_worker:
            return "both"
        if is_scheduler:
            return "scheduler"
        if is_worker:
            return "worker"
        return "-"

    def to_ansible_list(self) -> dict[str, Any]:
        """Render the inventory like ``ansible-inventory -i INVENTORY --list``.

        Returns
        -------
        dict
            ``{"_meta": {"hostvars": ...}, "all": {"children": [...]}, GROUP: ...}``
            with the same content and list order as ansible-core prints
            (without its ``_meta.profile`` key).  Empty groups are left out
            as keys but still listed as children; ``all`` never lists hosts.
        """
        result: dict[str, Any] = {}
        seen: set[str] = set()

        def render(name: str) -> None:
            group = self._graph.groups[name]
            entry: dict[str, Any] = {}
            if name != "all":
                entry["hosts"] = [h.name for h in group.hosts]
            entry["children"] = [c.name for c in group.children]
            for child in group.children:
                if child.name not in seen:
                    seen.add(child.name)
                    render(child.name)
            entry = {k: v for k, v in entry.items() if v}
            if entry:
                result[name] = entry

        render("all")
        hostvars: dict[str, Any] = {}
        for name, variables in self._hostvars.items():
            if variables:
                hostvars[name] = to_json_value(variables)
        result["_meta"] = {"hostvars": hostvars}
        return result

    def __repr__(self) -> str:
        return (
            f"Inventory(path={str(self.path) if self.path else None!r}, hosts={len(self.hosts)}, "
            f"groups={len(self.groups)}, scheduler={self.scheduler_host.name if self.scheduler_host else None!r}, "
            f"workers={len(self.worker_hosts)})"
        )

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_hosts(
        cls,
        hosts: Sequence[str | Mapping[str, Any]],
        *,
        scheduler_group: str = "scheduler",
        worker_group: str = "workers",
        **group_vars: Any,
    ) -> Inventory:
        """Build an inventory in code.

        Parameters
        ----------
        hosts
            Host entries: a string (``"10.0.0.1"``, ``"node[01:04]"``,
            ``"host:2222"``) or a mapping with a ``"name"`` key, an optional
            ``"groups"`` key (a group name or a list of them) and any host
            variables, e.g. ``{"name": "n1", "ansible_host": "10.0.0.1",
            "speccluster_nworkers": 2, "groups": ["workers"]}``.
        scheduler_group, worker_group
            Group names that select the scheduler and worker hosts.
        **group_vars
            Variables of the ``all`` group, validated like any other.

        Returns
        -------
        Inventory
            The validated inventory; its :attr:`path` is ``None``.

        Raises
        ------
        InventoryError
            For a malformed entry or an invalid variable.
        """
        graph = InventoryGraph()
        for key, value in group_vars.items():
            graph.set_group_var("all", key, value, None)
        for index, item in enumerate(hosts):
            where = f"host entry #{index + 1}"
            if isinstance(item, str):
                pattern: Any = item
                host_vars: dict[str, Any] = {}
                groups: Any = []
            elif isinstance(item, Mapping):
                host_vars = dict(item)
                pattern = host_vars.pop("name", None)
                groups = host_vars.pop("groups", [])
            else:
                raise InventoryError(
                    f"{where} must be a host name or a mapping with a 'name' key, got {item!r}; "
                    "write e.g. 'node01' or {'name': 'node01', 'ansible_host': '10.0.0.1'}"
                )
            if not isinstance(pattern, str) or not pattern:
                raise InventoryError(f"{where} has no 'name' (got {pattern!r}); add 'name': 'HOSTNAME'")
            if isinstance(groups, str):
                groups = [groups]
            if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) and g for g in groups):
                raise InventoryError(f"'groups' of {where} must be a list of group names, got {groups!r}")
            try:
                names, port = expand_host_pattern(pattern)
            except ValueError as exc:
                raise InventoryError(f"{where}: {exc}") from exc
            for group in groups:
                if group == "all":
                    continue
                graph.add_group(group)
            for name in names:
                graph.add_host(name, "ungrouped" if not groups else None, port)
                for group in groups:
                    graph.add_child(group, name)
                for key, value in host_vars.items():
                    graph.set_host_var(name, key, value, None)
        graph.reconcile()
        files = VarsFiles(None, "", graph.warnings)
        return cls(
            graph, files, None, scheduler_group=scheduler_group, worker_group=worker_group, shown="<from_hosts>"
        )


def hosts_table_rows(inv: Inventory) -> list[dict[str, Any]]:
    """One row per host for ``speccluster-ssh inventory INV --hosts [--json]``.

    Parameters
    ----------
    inv
        The inventory.

    Returns
    -------
    list of dict
        Keys: ``name``, ``address``, ``port``, ``user``, ``key``, ``python``,
        ``connection``, ``role`` (``scheduler``/``worker``/``both``/``-``),
        ``nworkers``, ``nthreads``, ``memory_limit`` (bytes or ``"auto"``),
        ``slots`` and ``resources``.  Values are JSON-serialisable.
    """
    rows: list[dict[str, Any]] = []
    for spec in inv.hosts.values():
        rows.append(
            {
                "name": spec.name,
                "address": spec.address,
                "port": spec.port,
                "user": spec.user,
                "key": spec.key_file,
                "python": spec.python,
                "connection": spec.connection,
                "role": inv.role(spec.name),
                "nworkers": spec.nworkers,
                "nthreads": spec.nthreads,
                "memory_limit": spec.memory_limit,
                "slots": spec.slots,
                "resources": dict(spec.resources),
            }
        )
    return rows
