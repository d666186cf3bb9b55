"""dask-ctl's discovery of the detached clusters started on this head node.

Registered under the ``dask_cluster_discovery`` entry point group. It lives
apart from :mod:`speccluster_ssh.state` because it names the cluster class:
state.py stays free of the cluster code, which itself imports state.py
(through :mod:`speccluster_ssh.detached`).

dask-ctl builds each cluster's handle with ``SSHSpecCluster.from_name``,
which attaches without owning: its ``delete`` calls the handle's ``close()``,
which only detaches. ``speccluster-ssh down`` (or the handle's
``shutdown()``) ends a cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from .cluster import SSHSpecCluster
from .state import running_clusters


async def discover() -> AsyncIterator[tuple[str, type]]:
    """Running clusters as ``(name, SSHSpecCluster)``, for dask-ctl's discovery.

    dask-ctl iterates discovery methods with ``async for``; register this
    function under the ``dask_cluster_discovery`` entry point group.

    Yields
    ------
    (str, type)
        The cluster name and :class:`~speccluster_ssh.cluster.SSHSpecCluster`.
    """
    for state in running_clusters():
        yield state.name, SSHSpecCluster
