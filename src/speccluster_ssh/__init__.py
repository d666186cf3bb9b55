"""Deploy Dask clusters over SSH on the machines of an Ansible inventory."""

from __future__ import annotations

from .quiet import silence_known_warnings

# Before anything of ours imports asyncssh (see quiet.py).
silence_known_warnings()

__version__ = "0.1.0"

__all__ = ["SSHSpecCluster", "load_inventory", "Inventory", "HostSpec", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy, so that `speccluster-ssh --help` and the inventory code stay quick to import.
    if name == "SSHSpecCluster":
        from .cluster import SSHSpecCluster

        return SSHSpecCluster
    if name in ("load_inventory", "Inventory", "HostSpec"):
        from . import inventory

        return getattr(inventory, name)
    raise AttributeError(name)
