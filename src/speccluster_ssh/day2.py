"""The day-2 API of a cluster: rolling restart, drain, undrain and inventory reload.

:class:`Day2Operations` is a base class of
:class:`~speccluster_ssh.cluster.SSHSpecCluster` that holds these public
methods, each delegating to :mod:`speccluster_ssh.operations` (restart,
drain, undrain) or :mod:`speccluster_ssh.reload` (reload); it keeps the
cluster class to its core concern. Each runs in the cluster's event loop
through ``sync``, so it blocks on a synchronous cluster and is awaitable on
an asynchronous one.

What the methods hand to those modules is the cluster as
:class:`~speccluster_ssh.cluster_protocols.Day2Cluster` describes it (the
type of their ``self``): the operations depend on that protocol, not on the
cluster's class, so nothing here, there or in the protocols imports
``cluster.py`` back.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import operations, reload

if TYPE_CHECKING:
    from .cluster_protocols import Day2Cluster


class Day2Operations:
    """Operating a running cluster without stopping it and without losing data.

    A mixin: its methods need ``self`` to be a :class:`~speccluster_ssh.cluster_protocols.Day2Cluster`
    (``sync`` is distributed's Cluster's, the other base of SSHSpecCluster).
    """

    def rolling_restart(self: Day2Cluster, batch: int = 1) -> Any:
        """Replace every running entry by a new one, ``batch`` entries at a time.

        Each host gets a new agent first (so a newly installed wheel is
        used); a host whose ``distributed`` is no longer the head's release
        is refused and its entries left as they are. An entry is retired
        (its data moves to other workers) before its replacement starts, or
        its replacement starts first where a free slot allows: at most
        ``batch`` entries' workers are missing at any moment. Returns what
        was done (``moved``, ``dropped``, ``refused``); awaitable when the
        cluster is asynchronous.
        """
        return self.sync(operations.rolling_restart, self, batch)

    def drain(self: Day2Cluster, host: str, reason: str = "") -> Any:
        """Move ``host``'s entries elsewhere gracefully and place nothing there until :meth:`undrain`.

        Entries that find no free slot are retired, and the cluster is
        short of its target until the host (or another slot) comes back.
        ``status`` shows the host as drained, with ``reason``.
        """
        return self.sync(operations.drain, self, host, reason)

    def undrain(self: Day2Cluster, host: str) -> Any:
        """Make a drained ``host`` usable again; a fixed-size cluster short of its target refills."""
        return self.sync(operations.undrain, self, host)

    def reload_inventory(
        self: Day2Cluster, path: str | os.PathLike[str] | None = None, dry_run: bool = False, batch: int = 1
    ) -> Any:
        """Read the inventory again (``path``, default where it was read) and apply the difference.

        New hosts become usable, removed ones are drained then closed, and
        the entries of hosts whose ``speccluster_*`` or connection variables
        changed are replaced ``batch`` at a time. An invalid inventory
        changes nothing (:class:`~speccluster_ssh.errors.UserError`). Returns the difference (see
        :func:`speccluster_ssh.reload.describe`); ``dry_run`` only returns it.
        """
        return self.sync(reload.reload_inventory, self, path, dry_run=dry_run, batch=batch)
