"""How failures are worded for users: one line each, and the exit status they call for.

Shared by the command line (:mod:`speccluster_ssh.cli`) and the head process
(:mod:`speccluster_ssh.head`), which records why a start failed for ``up``
to print.
"""

from __future__ import annotations

import sys

from .errors import HostError

PROG = "speccluster-ssh"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def is_inventory_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``InventoryError`` (without importing the inventory code)."""
    module = sys.modules.get("speccluster_ssh.inventory")
    return module is not None and isinstance(exc, module.InventoryError)


def host_error_text(exc: HostError) -> str:
    """A ``HostError`` with its log tail; one that names no single host says only its reason.

    The cluster raises ``HostError("*", ...)`` for "no free slot on any
    usable host", which would otherwise print as "host *: ...".
    """
    text = exc.details()
    if exc.host == "*":
        return text.removeprefix("host *: ")
    return text
