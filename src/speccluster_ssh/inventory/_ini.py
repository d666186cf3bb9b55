"""INI inventories, parsed with the rules of ansible-core's ``ini`` plugin.

Lines before the first section belong to ``ungrouped``.  ``[g]`` sections
hold host lines (``pattern key=value ...``, split like a shell command line,
``#`` starts a comment), ``[g:vars]`` sections hold ``key = value`` lines
taken verbatim after the first ``=``, and ``[g:children]`` sections hold
group names, which may be declared further down the file.  In both host
lines and ``:vars`` sections ansible-core 2.19 types each value with
``ast.literal_eval`` (``1`` is an int, ``True`` a bool, ``"1"`` the string
``1``, ``[1, 2]`` a list); what cannot be evaluated stays a string.
Because host lines are shell-split first, ``x="1"`` on a host line is the
int ``1`` while ``x = "1"`` in ``:vars`` is the string ``"1"``.
"""

from __future__ import annotations

import ast
import re
import shlex
import warnings
from typing import Any

from ._errors import InventoryError, Origin
from ._graph import InventoryGraph
from ._patterns import expand_host_pattern

__all__ = ["parse_ini_inventory", "parse_ini_value"]

_COMMENT_CHARS = ("#", ";")
_SECTION_RE = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?$")
# "[name]" or "[name:type]" followed by more text
_HEADER_PREFIX_RE = re.compile(r"^\[[^:\]\s]+(?::\w+)?\](?=\s+[^\s#])")
_GROUP_NAME_RE = re.compile(r"^([^:\]\s]+)\s*(?:#.*)?$")


def _coerce(value: Any) -> Any:
    """Turn what ``literal_eval`` may return into plain variable types."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)):
        # ansible turns tuples and sets into lists ("a=1,2" is [1, 2])
        return [_coerce(v) for v in value]
    if isinstance(value, dict):
        return {k: _coerce(v) for k, v in value.items()}
    if value is ...:
        return "..."
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return value


def parse_ini_value(text: str) -> Any:
    """Type one INI value the way ansible-core 2.19 does.

    Parameters
    ----------
    text
        The text after ``=``.

    Returns
    -------
    Any
        An int, float, bool, None, list, dict or str.

    Raises
    ------
    ValueError
        When Python's literal parser fails in a way ansible does not catch
        (for example an unhashable dict key), which makes ansible reject the
        whole file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            value: Any = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        # not a Python literal: ansible keeps the text as a string
        value = text
    except (TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"cannot evaluate value {text!r} ({type(exc).__name__}: {exc})") from exc
    return _coerce(value)


class _IniParser:
    def __init__(self, graph: InventoryGraph, shown: str) -> None:
        self.graph = graph
        self.shown = shown
        # groups referenced before being declared, as in ansible's parser
        self.pending: dict[str, dict[str, Any]] = {}

    def parse(self, text: str) -> None:
        group = "ungrouped"
        state = "hosts"
        for number, raw in enumerate(text.splitlines(), start=1):
            origin = Origin(self.shown, number)
            line = raw.strip()
            if not line or line.startswith(_COMMENT_CHARS):
                continue
            match = _SECTION_RE.match(line)
            if match:
                group, state = match.group(1), match.group(2) or "hosts"
                self._enter_section(group, state, origin)
                continue
            if line.startswith("[") and line.endswith("]"):
                raise InventoryError(
                    f"invalid section header {line!r}; write [group], [group:vars] or "
                    "[group:children] with no spaces inside the brackets",
                    origin,
                )
            if state == "hosts":
                self._host_line(group, line, origin)
            elif state == "vars":
                self._vars_line(group, line, origin)
            else:
                self._children_line(group, line, origin)
        self._check_pending()

    def _enter_section(self, group: str, state: str, origin: Origin) -> None:
        if state not in ("hosts", "children", "vars"):
            raise InventoryError(
                f"section [{group}:{state}] has unknown type {state!r}; "
                f"use [{group}], [{group}:vars] or [{group}:children]",
                origin,
            )
        if group not in self.graph.groups:
            # [g:vars] alone does not declare g; remember to check it later
            if state == "vars" and group not in self.pending:
                self.pending[group] = {"origin": origin, "state": "vars", "parents": []}
            self.graph.add_group(group, origin)
        if group in self.pending and state != "vars":
            if self.pending[group]["state"] == "children":
                self._add_pending_children(group)
            else:
                del self.pending[group]

    def _add_pending_children(self, group: str) -> None:
        entry = self.pending.pop(group)
        for parent, origin in entry["parents"]:
            self.graph.add_child(parent, group, origin)
            if parent in self.pending and self.pending[parent]["state"] == "children":
                self._add_pending_children(parent)

    def _check_pending(self) -> None:
        for name, entry in self.pending.items():
            if entry["state"] == "vars":
                raise InventoryError(
                    f"section [{name}:vars] sets variables of group {name!r}, which is never defined; "
                    f"add a [{name}] section (it may be empty) or fix the group name",
                    entry["origin"],
                )
            parent, origin = entry["parents"][-1]
            raise InventoryError(
                f"section [{parent}:children] lists group {name!r}, which is never defined; "
                f"add a [{name}] section (it may be empty) or fix the group name",
                origin,
            )

    def _host_line(self, group: str, line: str, origin: Origin) -> None:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise InventoryError(f"cannot split host line {line!r}: {exc}; check the quotes", origin) from exc
        if not tokens:
            return
        pattern = tokens[0]
        try:
            names, port = expand_host_pattern(pattern)
        except ValueError as exc:
            header = _HEADER_PREFIX_RE.match(line)
            if header:
                # "[g:vars] ; note" is not a header, so it was read as a host
                raise InventoryError(
                    f"unexpected text after section header {header.group(0)}; only a '#' comment may follow it",
                    origin,
                ) from exc
            raise InventoryError(str(exc), origin) from exc
        if pattern.strip().endswith(":") and port is None:
            raise InventoryError(
                f"host pattern {pattern!r} ends with ':'; write host:PORT with a port number or drop the colon",
                origin,
            )
        if any(name.strip() == "---" for name in names):
            raise InventoryError(
                "host '---' looks like the start of a YAML document; give the file a .yml extension",
                origin,
            )
        if any(not name for name in names):
            raise InventoryError("empty host name; remove the empty quotes", origin)
        variables: dict[str, Any] = {}
        for token in tokens[1:]:
            if "=" not in token:
                raise InventoryError(
                    f"expected key=value after host {pattern!r}, got {token!r}; "
                    "write variables as name=value (quote values with spaces)",
                    origin,
                )
            key, value = token.split("=", 1)
            variables[key] = self._value(value, key, origin)
        for name in names:
            self.graph.add_host(name, group, port)
            for key, value in variables.items():
                self.graph.set_host_var(name, key, value, origin)

    def _vars_line(self, group: str, line: str, origin: Origin) -> None:
        if "=" not in line:
            raise InventoryError(
                f"expected key=value in section [{group}:vars], got {line!r}; write name = value",
                origin,
            )
        key, value = (part.strip() for part in line.split("=", 1))
        self.graph.set_group_var(group, key, self._value(value, key, origin), origin)

    def _children_line(self, group: str, line: str, origin: Origin) -> None:
        match = _GROUP_NAME_RE.match(line)
        if match is None:
            raise InventoryError(
                f"expected a group name in section [{group}:children], got {line!r}; list one group per line",
                origin,
            )
        child = match.group(1)
        if child in self.graph.groups:
            self.graph.add_child(group, child, origin)
        elif child in self.pending:
            self.pending[child]["parents"].append((group, origin))
        else:
            self.pending[child] = {"origin": origin, "state": "children", "parents": [(group, origin)]}

    @staticmethod
    def _value(text: str, key: str, origin: Origin) -> Any:
        try:
            return parse_ini_value(text)
        except ValueError as exc:
            raise InventoryError(f"variable {key!r}: {exc}; quote the value to keep it a string", origin) from exc


def parse_ini_inventory(graph: InventoryGraph, text: str, shown: str) -> None:
    """Add the groups, hosts and variables of an INI inventory to ``graph``.

    Parameters
    ----------
    graph
        Graph to fill.
    text
        Content of the file.
    shown
        File name used in error messages.

    Raises
    ------
    InventoryError
        On any syntax error, with file and line.
    """
    _IniParser(graph, shown).parse(text)
