"""``group_vars/`` and ``host_vars/`` beside an inventory (ansible's ``host_group_vars``).

For an entity called NAME, the first of ``NAME``, ``NAME.yml``, ``NAME.yaml``
and ``NAME.json`` that exists is used.  If it is a directory, every file in
it (recursively, sorted by name, hidden files and ``*~`` backups skipped,
only files with no extension or one of the three extensions) is loaded and
merged in that order.  Empty files are ignored.
"""

from __future__ import annotations

import os
from typing import Any

from ._errors import InventoryError, Origin
from ._loader import LinedDict, load_data_file

__all__ = ["VARS_EXTENSIONS", "VarsFiles"]

VARS_EXTENSIONS = (".yml", ".yaml", ".json")

VarsWithOrigins = tuple[dict[str, Any], dict[str, Origin]]


class VarsFiles:
    """Loads and caches the vars files of one inventory directory.

    Parameters
    ----------
    basedir
        Directory holding ``group_vars/`` and ``host_vars/``, or ``None`` for
        inventories that have no directory (host lists, programmatic ones).
    shown_basedir
        How that directory should be written in messages.
    warnings
        List collecting non-fatal problems.
    """

    def __init__(self, basedir: str | None, shown_basedir: str, warnings: list[str]) -> None:
        self.basedir = os.path.realpath(basedir) if basedir is not None else None
        self.shown_basedir = shown_basedir
        self.warnings = warnings
        self._cache: dict[tuple[str, str], VarsWithOrigins] = {}
        self._warned: set[str] = set()

    def group_vars(self, name: str) -> VarsWithOrigins:
        """Variables of group ``name`` from ``group_vars/``, with their origins."""
        return self._load("group_vars", name)

    def host_vars(self, name: str) -> VarsWithOrigins:
        """Variables of host ``name`` from ``host_vars/``, with their origins."""
        return self._load("host_vars", name)

    def files(self, subdir: str, name: str) -> list[str]:
        """Paths of the files that hold the variables of ``name``, in load order."""
        if self.basedir is None or not name or name.startswith(os.sep):
            # ansible skips names that look like absolute paths (chroots)
            return []
        root = os.path.join(self.basedir, subdir)
        if not os.path.isdir(root):
            if os.path.exists(root) and root not in self._warned:
                self._warned.add(root)
                self.warnings.append(f"{self._shown(root)} is not a directory; ignored")
            return []
        base = os.path.join(root, name)
        for ext in ("", *VARS_EXTENSIONS):
            candidate = base + ext
            if os.path.exists(candidate):
                if os.path.isdir(candidate):
                    return self._directory_files(candidate)
                return [candidate]
        return []

    def _directory_files(self, path: str) -> list[str]:
        found: list[str] = []
        for entry in sorted(os.listdir(path)):
            if entry.startswith(".") or entry.endswith("~"):
                continue
            full = os.path.join(path, entry)
            ext = os.path.splitext(entry)[1]
            if os.path.isdir(full) and not ext:
                found.extend(self._directory_files(full))
            elif os.path.isfile(full) and (not ext or ext in VARS_EXTENSIONS):
                found.append(full)
        return found

    def _shown(self, path: str) -> str:
        if self.basedir is None:
            return path
        return os.path.join(self.shown_basedir, os.path.relpath(path, self.basedir))

    def _load(self, subdir: str, name: str) -> VarsWithOrigins:
        key = (subdir, name)
        if key not in self._cache:
            merged: dict[str, Any] = {}
            origins: dict[str, Origin] = {}
            for path in self.files(subdir, name):
                shown = self._shown(path)
                data = load_data_file(path, shown, self.warnings)
                if not data:
                    continue
                if not isinstance(data, dict):
                    raise InventoryError(
                        f"a vars file must hold a mapping of variable names to values, got "
                        f"{'a list' if isinstance(data, list) else repr(data)}; write 'name: value' lines",
                        Origin(shown),
                    )
                for var, value in data.items():
                    merged[var] = value
                    line = data.lines.get(var) if isinstance(data, LinedDict) else None
                    origins[var] = Origin(shown, line)
            self._cache[key] = (merged, origins)
        return self._cache[key]
