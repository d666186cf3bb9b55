"""Print each package whose release in a ``pip freeze`` differs from the lock.

Used by .ci/run's "newest" stage: ``python scripts/drift.py LOCK FREEZE``
prints one line a package, ``NAME VERSION (lock: VERSION)`` or
``NAME VERSION (not in the lock)``, and nothing when the two agree.
"""

from __future__ import annotations

import re
import sys


def pins(path: str) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line, names normalized."""
    found: dict[str, str] = {}
    with open(path) as lines:
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#") and "==" in line:
                name, version = line.split("==", 1)
                found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def drift(locked: dict[str, str], newest: dict[str, str]) -> list[str]:
    """The lines to print, sorted by package name."""
    lines = []
    for name in sorted(newest):
        if name not in locked:
            lines.append(f"{name} {newest[name]} (not in the lock)")
        elif newest[name] != locked[name]:
            lines.append(f"{name} {newest[name]} (lock: {locked[name]})")
    return lines


if __name__ == "__main__":
    for row in drift(pins(sys.argv[1]), pins(sys.argv[2])):
        print(row)
