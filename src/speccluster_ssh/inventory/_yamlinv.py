"""YAML (and JSON) inventories, parsed with the rules of ansible-core's ``yaml`` plugin.

Every top-level key is a group (``all`` is just the usual first one).  A
group is a mapping with optional ``vars``, ``children`` and ``hosts`` keys,
handled in the order they appear; a bare string is accepted in place of a
one-entry mapping.  Keys that are not mappings are skipped with a warning,
as ansible does.
"""

from __future__ import annotations

from typing import Any

from ._errors import InventoryError, Origin
from ._graph import InventoryGraph
from ._loader import LinedDict
from ._patterns import expand_host_pattern

__all__ = ["parse_yaml_inventory"]

_SECTIONS = ("vars", "children", "hosts")


def _line(mapping: Any, key: Any) -> int | None:
    if isinstance(mapping, LinedDict):
        return mapping.lines.get(key)
    return None


def _type_name(value: Any) -> str:
    # bool before int: True is an int to isinstance
    for kind, label in ((bool, "boolean"), (dict, "mapping"), (list, "list"), (str, "string"), (int, "integer")):
        if isinstance(value, kind):
            return label
    return type(value).__name__


class _YamlParser:
    def __init__(self, graph: InventoryGraph, shown: str) -> None:
        self.graph = graph
        self.shown = shown

    def origin(self, mapping: Any, key: Any) -> Origin:
        return Origin(self.shown, _line(mapping, key))

    def parse(self, data: dict[Any, Any]) -> None:
        for name, body in data.items():
            self.group(name, body, self.origin(data, name))

    def group(self, name: Any, body: Any, origin: Origin) -> Any:
        if not isinstance(body, (dict, type(None))):
            self.graph.warnings.append(
                f"{origin}: skipping {name!r}: a group must be a mapping with vars/children/hosts, "
                f"got a {_type_name(body)}"
            )
            return name
        self.graph.add_group(name, origin)
        if body is None:
            return name
        for section in _SECTIONS:
            if section not in body:
                continue
            if isinstance(body[section], str):
                # "hosts: node1" means one host without variables
                one = LinedDict({body[section]: None})
                section_line = _line(body, section)
                if section_line is not None:
                    one.lines[body[section]] = section_line
                body[section] = one
            if not isinstance(body[section], (dict, type(None))):
                raise InventoryError(
                    f"the {section!r} entry of group {name!r} must be a mapping, got a "
                    f"{_type_name(body[section])}; write it as 'name:' entries, one per line",
                    self.origin(body, section),
                )
        for key, value in body.items():
            where = self.origin(body, key)
            if not isinstance(value, (dict, type(None))):
                self.graph.warnings.append(f"{where}: skipping key {key!r} in group {name!r}: not a mapping")
                continue
            if value is None:
                continue
            if key == "vars":
                for var, var_value in value.items():
                    self.graph.set_group_var(name, var, var_value, self.origin(value, var))
            elif key == "children":
                for sub, sub_body in value.items():
                    sub_origin = self.origin(value, sub)
                    child = self.group(sub, sub_body, sub_origin)
                    self.graph.add_child(name, child, sub_origin)
            elif key == "hosts":
                for pattern, host_vars in value.items():
                    self.hosts(name, pattern, host_vars, self.origin(value, pattern))
            else:
                self.graph.warnings.append(
                    f"{where}: skipping unexpected key {key!r} in group {name!r}; "
                    "only vars, children and hosts are valid"
                )
        return name

    def hosts(self, group: str, pattern: Any, host_vars: Any, origin: Origin) -> None:
        if not isinstance(pattern, str):
            raise InventoryError(
                f"host {pattern!r} in group {group!r} must be a string; put the name in quotes",
                origin,
            )
        try:
            names, port = expand_host_pattern(pattern)
        except ValueError as exc:
            raise InventoryError(str(exc), origin) from exc
        if any(not name for name in names):
            raise InventoryError(f"empty host name in group {group!r}; remove it", origin)
        # ansible treats any false value (null, "", 0) as "no variables"
        variables = host_vars or {}
        if not isinstance(variables, dict):
            raise InventoryError(
                f"variables of host {pattern!r} in group {group!r} must be a mapping, got a "
                f"{_type_name(variables)}; write 'name: value' lines under the host",
                origin,
            )
        for name in names:
            self.graph.add_host(name, group, port)
            for key, value in variables.items():
                self.graph.set_host_var(name, key, value, self.origin(variables, key))


def parse_yaml_inventory(graph: InventoryGraph, data: dict[Any, Any], shown: str) -> None:
    """Add the groups, hosts and variables of a parsed YAML inventory to ``graph``.

    Parameters
    ----------
    graph
        Graph to fill.
    data
        The parsed document, a non-empty mapping.
    shown
        File name used in messages.

    Raises
    ------
    InventoryError
        For structural errors (a section that is not a mapping, a host name
        that is not a string, a bad range), with file and line.
    """
    if data.get("plugin"):
        raise InventoryError(
            f"this is a configuration file for the inventory plugin {data.get('plugin')!r}, not a static "
            "inventory; run 'ansible-inventory -i FILE --list --yaml' and use its output instead",
            Origin(shown, _line(data, "plugin")),
        )
    _YamlParser(graph, shown).parse(data)
