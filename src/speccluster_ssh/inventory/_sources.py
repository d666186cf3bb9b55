"""Reading inventory sources as ansible-core does: :func:`load_inventory`.

A path is a YAML or INI file (YAML tried first for files without an
extension, then INI, as ansible's plugin chain does), a directory of such
files, or a comma-separated host list. The sources fill an
:class:`~._graph.InventoryGraph`; :class:`~._inventory.Inventory` then merges
and validates each host's variables.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

from ._errors import InventoryError, Origin
from ._graph import InventoryGraph
from ._ini import parse_ini_inventory
from ._inventory import Inventory
from ._loader import load_data
from ._patterns import split_port
from ._varsfiles import VarsFiles
from ._yamlinv import parse_yaml_inventory

__all__ = ["load_inventory"]

_YAML_EXTENSIONS = (".yml", ".yaml", ".json")

# What ansible skips when the inventory is a directory of sources.
_IGNORED_ENTRY = re.compile(
    r"^\.|^host_vars$|^group_vars$|^vars_plugins$"
    r"|(\.pyc|\.pyo|\.swp|\.bak|~|\.rpm|\.md|\.txt|\.rst|\.orig|\.cfg|\.retry)$"
)

_INI_HINT = re.compile(r"^\s*\[[^\]\s]+\]\s*(?:[#;].*)?$|^[^#;:\s]+\s+\S+=", re.MULTILINE)


# -- reading sources ---------------------------------------------------------------------


def _read_text(path: str, shown: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise InventoryError(f"inventory is not valid UTF-8 ({exc.reason}); save it as UTF-8", Origin(shown)) from exc
    except OSError as exc:
        raise InventoryError(
            f"cannot read inventory: {exc.strerror}; check the path and its permissions", Origin(shown)
        ) from exc


def _describe(value: Any) -> str:
    kinds = ((bool, "a boolean"), (str, "a string"), (int, "a number"), (float, "a number"), (list, "a list"))
    for kind, label in kinds:
        if isinstance(value, kind):
            return label
    return f"a {type(value).__name__}"


def _parse_file(graph: InventoryGraph, path: str, shown: str) -> None:
    """Parse one inventory file, choosing YAML or INI like ansible's plugin chain."""
    ext = os.path.splitext(path)[1]
    if ext == ".toml":
        raise InventoryError(
            "TOML inventories are not supported; convert it to YAML (ansible-inventory -i FILE --list --yaml)",
            Origin(shown),
        )
    text = _read_text(path, shown)
    yaml_ext = ext in _YAML_EXTENSIONS
    if not (yaml_ext or ext == ""):
        parse_ini_inventory(graph, text, shown)
        return

    # ansible's yaml plugin takes .yml/.yaml/.json and extension-less files
    yaml_error: InventoryError | None = None
    data: Any = None
    try:
        data = load_data(text, shown, graph.warnings)
    except InventoryError as exc:
        yaml_error = exc
    if yaml_error is None and isinstance(data, dict) and data:
        parse_yaml_inventory(graph, data, shown)
        return

    # not a YAML inventory: ansible tries the INI plugin next
    try:
        parse_ini_inventory(graph, text, shown)
        if yaml_ext and text.strip():
            graph.warnings.append(f"{shown}: not a YAML inventory, read as INI (as ansible does)")
        return
    except InventoryError as ini_error:
        if yaml_error is None and not data:
            # empty document: ansible ends up with an empty inventory
            graph.warnings.append(f"{shown}: inventory is empty")
            return
        if yaml_error is not None:
            if yaml_ext or not _INI_HINT.search(text):
                raise yaml_error from None
            raise ini_error from None
        if yaml_ext:
            raise InventoryError(
                f"a YAML inventory must be a mapping of group names (such as 'all:'), got "
                f"{_describe(data)}; start the file with 'all:' and list hosts under 'hosts:'",
                Origin(shown, 1),
            ) from None
        raise ini_error from None


def _parse_source(graph: InventoryGraph, path: str, shown: str) -> None:
    if os.path.isdir(path):
        # a directory is a set of sources, read in name order
        for entry in sorted(os.listdir(path)):
            if _IGNORED_ENTRY.search(entry):
                continue
            _parse_source(graph, os.path.join(path, entry), os.path.join(shown, entry))
    else:
        _parse_file(graph, path, shown)


def _parse_host_list(graph: InventoryGraph, text: str) -> None:
    # ansible's host_list plugin: "a,b:2222,c"; no ranges, bad names kept as is
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, port = split_port(item)
        if "[" in name:
            name, port = item, None
        if name not in graph.hosts:
            graph.add_host(name, "ungrouped", port)


def load_inventory(
    path: str | os.PathLike[str],
    *,
    scheduler_group: str = "scheduler",
    worker_group: str = "workers",
) -> Inventory:
    """Read an Ansible inventory the way ansible-core does.

    Parameters
    ----------
    path
        A YAML (``.yml``, ``.yaml``, ``.json``) or INI inventory file, a file
        with no extension (YAML is tried first, then INI), a directory of
        such files, or a comma-separated host list such as ``"a,b:2222,"``.
        ``group_vars/`` and ``host_vars/`` beside the file (inside the
        directory) are applied as ansible's ``host_group_vars`` plugin does.
    scheduler_group
        Group whose single host runs the scheduler.
    worker_group
        Group whose hosts run workers; when absent every host outside the
        scheduler group runs workers.

    Returns
    -------
    Inventory
        The parsed and validated inventory.

    Raises
    ------
    InventoryError
        With a one-line message for a missing file, syntax errors, bad
        ranges, group cycles, unknown or invalid ``speccluster_`` variables,
        unsupported connections or more than one scheduler host.
    """
    text_path = os.fspath(path)
    shown = text_path
    graph = InventoryGraph()
    if not os.path.exists(text_path):
        if "," in text_path:
            _parse_host_list(graph, text_path)
            graph.reconcile()
            return Inventory(
                graph, VarsFiles(None, "", graph.warnings), None,
                scheduler_group=scheduler_group, worker_group=worker_group, shown=shown,
            )
        raise InventoryError(
            f"inventory {text_path!r} not found; check the path (relative paths start at {os.getcwd()})"
        )
    absolute = os.path.abspath(os.path.expanduser(text_path))
    _parse_source(graph, absolute, shown)
    graph.reconcile()
    if os.path.isdir(absolute):
        basedir, shown_basedir = absolute, shown
    else:
        basedir, shown_basedir = os.path.dirname(absolute), os.path.dirname(shown)
    files = VarsFiles(basedir, shown_basedir, graph.warnings)
    return Inventory(
        graph, files, pathlib.Path(absolute),
        scheduler_group=scheduler_group, worker_group=worker_group, shown=shown,
    )
