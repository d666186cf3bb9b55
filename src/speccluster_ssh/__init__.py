"""Deploy Dask clusters over SSH on the machines of an Ansible inventory."""

from __future__ import annotations

__version__ = "0.1.0"
