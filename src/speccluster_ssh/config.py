"""Defaults in a dask config section, ``speccluster-ssh``.

The shipped ``speccluster-ssh.yaml`` holds the defaults; the user's dask
config files and ``DASK_SPECCLUSTER_SSH__*`` environment variables override
them, and command-line flags override those.
"""

from __future__ import annotations

import os
from typing import Any

import dask
import yaml

SECTION = "speccluster-ssh"
_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "speccluster-ssh.yaml")


def _load_defaults() -> None:
    with open(_DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)


_load_defaults()


def get(key: str, default: Any = None) -> Any:
    """The configured value of ``speccluster-ssh.<key>``."""
    return dask.config.get(f"{SECTION}.{key}", default=default)
