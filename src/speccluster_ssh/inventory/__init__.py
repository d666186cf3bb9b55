"""Ansible inventories for speccluster-ssh: parsing, variable precedence and host model.

This package reads static Ansible inventories (YAML, JSON, INI, directories
of them, ``group_vars/`` and ``host_vars/``) with the same results as
ansible-core 2.19, without importing ansible and without network access,
then validates the connection and ``speccluster_*`` variables of each host.

Examples
--------
>>> inv = Inventory.from_hosts(["node[01:02]"], speccluster_nworkers=2)
>>> [h.name for h in inv.worker_hosts]
['node01', 'node02']
>>> inv.hosts["node01"].nworkers
2
"""

from __future__ import annotations

from ._errors import InventoryError, Origin
from ._hostspec import HostSpec
from ._inventory import GroupInfo, Inventory, hosts_table_rows, to_json_value
from ._ini import parse_ini_value
from ._jumps import JumpHop, jumps_from_args, parse_jump_list
from ._loader import UnsafeStr, VaultStr
from ._patterns import expand_host_pattern, expand_ranges
from ._sources import load_inventory
from ._vars import SPECCLUSTER_VARS, VarSpec, speccluster_vars_markdown

__all__ = [
    "SPECCLUSTER_VARS",
    "GroupInfo",
    "HostSpec",
    "Inventory",
    "InventoryError",
    "JumpHop",
    "Origin",
    "UnsafeStr",
    "VarSpec",
    "VaultStr",
    "expand_host_pattern",
    "expand_ranges",
    "hosts_table_rows",
    "jumps_from_args",
    "load_inventory",
    "parse_ini_value",
    "parse_jump_list",
    "speccluster_vars_markdown",
    "to_json_value",
]
