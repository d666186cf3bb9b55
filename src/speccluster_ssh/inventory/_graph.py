"""The group/host graph of an inventory, with ansible-core's bookkeeping rules.

The graph mirrors what ansible's ``InventoryData`` does while plugins parse
a source: groups ``all`` and ``ungrouped`` always exist, a port given in a
host pattern is set only when the host is first seen, and after parsing
:meth:`InventoryGraph.reconcile` hangs every parentless group under ``all``
and moves hosts that belong to no group into ``ungrouped``.  Group depth is
the longest path from ``all``; groups are merged in ``(depth, priority,
name)`` order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._errors import InventoryError, Origin

__all__ = ["GroupNode", "HostNode", "InventoryGraph", "sort_groups"]


class GroupNode:
    """A mutable group while an inventory is being built."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hosts: list[HostNode] = []
        self.host_names: set[str] = set()
        self.children: list[GroupNode] = []
        self.parents: list[GroupNode] = []
        self.vars: dict[str, Any] = {}
        self.origins: dict[str, Origin] = {}
        self.priority = 1
        self.depth = 0

    def __repr__(self) -> str:
        return f"GroupNode({self.name!r})"

    def ancestors(self) -> list[GroupNode]:
        """Every group above this one, nearest first, without duplicates."""
        seen: dict[str, GroupNode] = {}
        todo = list(self.parents)
        while todo:
            group = todo.pop(0)
            if group.name not in seen:
                seen[group.name] = group
                todo.extend(group.parents)
        return list(seen.values())

    def descendants(self) -> list[GroupNode]:
        """This group and every group below it, breadth first."""
        seen: dict[str, GroupNode] = {self.name: self}
        todo = list(self.children)
        while todo:
            group = todo.pop(0)
            if group.name not in seen:
                seen[group.name] = group
                todo.extend(group.children)
        return list(seen.values())

    def all_hosts(self) -> list[HostNode]:
        """Hosts of this group and of its descendants, without duplicates."""
        hosts: dict[str, HostNode] = {}
        for group in self.descendants():
            for host in group.hosts:
                hosts.setdefault(host.name, host)
        return list(hosts.values())


class HostNode:
    """A mutable host while an inventory is being built."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.direct_groups: list[GroupNode] = []
        self.vars: dict[str, Any] = {}
        self.origins: dict[str, Origin] = {}

    def __repr__(self) -> str:
        return f"HostNode({self.name!r})"

    def groups(self) -> list[GroupNode]:
        """Every group the host is in, ancestors of its groups included."""
        found: dict[str, GroupNode] = {}
        for group in self.direct_groups:
            for each in [group, *group.ancestors()]:
                found.setdefault(each.name, each)
        return list(found.values())


def sort_groups(groups: Iterable[GroupNode]) -> list[GroupNode]:
    """Order groups the way ansible merges their variables."""
    return sorted(groups, key=lambda g: (g.depth, g.priority, g.name))


class InventoryGraph:
    """Groups and hosts of one inventory, in the order they were first seen."""

    def __init__(self) -> None:
        self.groups: dict[str, GroupNode] = {}
        self.hosts: dict[str, HostNode] = {}
        self.warnings: list[str] = []
        self.add_group("all")
        self.add_group("ungrouped")
        self.add_child("all", "ungrouped")

    def add_group(self, name: Any, origin: Origin | None = None) -> GroupNode:
        """Return the group called ``name``, creating it if needed."""
        if not isinstance(name, str) or not name:
            raise InventoryError(
                f"invalid group name {name!r}: group names must be non-empty strings; quote the name",
                origin,
            )
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = GroupNode(name)
        return group

    def add_host(self, name: str, group: str | None = None, port: int | None = None) -> HostNode:
        """Return the host called ``name``, creating it and joining ``group``."""
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = HostNode(name)
            # as in ansible, a "host:port" pattern only counts the first time
            if port:
                host.vars["ansible_port"] = int(port)
        if group is not None:
            self._join(self.groups[group], host)
        return host

    @staticmethod
    def _join(group: GroupNode, host: HostNode) -> None:
        if host.name not in group.host_names:
            group.hosts.append(host)
            group.host_names.add(host.name)
            host.direct_groups.append(group)

    @staticmethod
    def _leave(group: GroupNode, host: HostNode) -> None:
        group.hosts = [h for h in group.hosts if h.name != host.name]
        group.host_names.discard(host.name)
        host.direct_groups = [g for g in host.direct_groups if g.name != group.name]

    def add_child(self, parent: str, child: str, origin: Origin | None = None) -> None:
        """Make group or host ``child`` a member of group ``parent``.

        Raises
        ------
        InventoryError
            If the edge would make a group its own ancestor; the message
            spells out the cycle.
        """
        group = self.groups[parent]
        if child not in self.groups:
            if child not in self.hosts:
                raise InventoryError(
                    f"{child!r}, listed as a child of group {parent!r}, is neither a group nor a host; "
                    "define it as a group (a mapping, possibly empty) or remove it",
                    origin,
                )
            self._join(group, self.hosts[child])
            return
        sub = self.groups[child]
        if sub is group:
            raise InventoryError(
                f"group {parent!r} lists itself as a child group; remove {child!r} from its children",
                origin,
            )
        if any(c is sub for c in group.children):
            return
        path = self._path_down(sub, group)
        if path is not None:
            cycle = " -> ".join([group.name, *[g.name for g in path]])
            raise InventoryError(
                f"group {child!r} would become its own ancestor (cycle {cycle}); "
                f"remove one of these parent/child links",
                origin,
            )
        group.children.append(sub)
        if all(p.name != group.name for p in sub.parents):
            sub.parents.append(group)

    @staticmethod
    def _path_down(start: GroupNode, target: GroupNode) -> list[GroupNode] | None:
        """Groups from ``start`` down to ``target`` through children, if any."""
        stack: list[tuple[GroupNode, list[GroupNode]]] = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            if node is target:
                return path
            if node.name in seen:
                continue
            seen.add(node.name)
            for child in reversed(node.children):
                stack.append((child, [*path, child]))
        return None

    def set_group_var(self, group: str, key: Any, value: Any, origin: Origin | None) -> None:
        """Set a group variable; ``ansible_group_priority`` sets the priority."""
        node = self.groups[group]
        if key == "ansible_group_priority":
            try:
                # ansible applies int() to the value, so "10" and 10.5 are fine
                node.priority = int(value)
            except (TypeError, ValueError) as exc:
                raise InventoryError(
                    f"ansible_group_priority of group {group!r} must be an integer, got {value!r}; "
                    "use a whole number such as 10",
                    origin,
                ) from exc
            return
        node.vars[key] = value
        if origin is not None:
            node.origins[key] = origin
        else:
            node.origins.pop(key, None)

    def set_host_var(self, host: str, key: Any, value: Any, origin: Origin | None) -> None:
        """Set a host variable."""
        node = self.hosts[host]
        node.vars[key] = value
        if origin is not None:
            node.origins[key] = origin
        else:
            node.origins.pop(key, None)

    def reconcile(self) -> None:
        """Apply ansible's post-parse rules and compute group depths."""
        all_group = self.groups["all"]
        for group in list(self.groups.values()):
            if group is not all_group and not group.parents:
                self.add_child("all", group.name)
        ungrouped = self.groups["ungrouped"]
        for host in self.hosts.values():
            names = {g.name for g in host.groups()}
            if "ungrouped" in names:
                if names - {"all", "ungrouped"}:
                    self._leave(ungrouped, host)
            elif not names or names == {"all"}:
                self._join(ungrouped, host)
        self._compute_depths()

    def _compute_depths(self) -> None:
        # longest path from "all": what ansible's incremental depth updates
        # amount to once every group hangs under "all" (the graph is acyclic)
        depth: dict[str, int] = {}
        for group in self.groups.values():
            stack = [group]
            while stack:
                node = stack[-1]
                if node.name in depth:
                    stack.pop()
                    continue
                pending = [p for p in node.parents if p.name not in depth]
                if pending:
                    stack.extend(pending)
                    continue
                depth[node.name] = max((depth[p.name] + 1 for p in node.parents), default=0)
                stack.pop()
        for name, group in self.groups.items():
            group.depth = depth[name]
