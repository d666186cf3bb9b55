"""A handle on a detached cluster from another process (for dask-ctl and scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed.deploy.cluster import Cluster

from .control import ControlError, request
from .state import CA_FILE, CLIENT_CERT, CLIENT_KEY, check_name, cluster_dir, head_alive, read_state


class DetachedCluster(Cluster):
    """A running detached cluster seen from another process.

    It talks to the scheduler directly (with the cluster's client
    certificates) for information, and to the head process's control socket
    for ``scale``, ``adapt`` and ``close``. Build it with :meth:`from_name`
    or ``SSHSpecCluster.from_name``.
    """

    directory: Path

    @classmethod
    def from_name(cls, name: str, asynchronous: bool = False, loop: Any = None) -> DetachedCluster:
        """Attach to the detached cluster ``name`` started on this head node.

        Raises
        ------
        ControlError
            When no such cluster runs here.
        """
        from distributed.core import Status, rpc
        from distributed.security import Security

        directory = cluster_dir(check_name(name))
        state = read_state(directory)
        if state is None or not head_alive(directory) or not state.scheduler_address:
            raise ControlError(f"no running cluster named {name!r} on this head node; see 'speccluster-ssh list'", 2)
        security = Security()
        if state.tls:
            security = Security(
                tls_ca_file=str(directory / CA_FILE),
                tls_client_cert=str(directory / CLIENT_CERT),
                tls_client_key=str(directory / CLIENT_KEY),
                require_encryption=True,
            )
        cluster = cls(asynchronous=asynchronous, loop=loop, name=name)
        cluster.directory = directory
        cluster.security = security
        cluster.scheduler_comm = rpc(state.scheduler_address, connection_args=security.get_connection_args("client"))
        if not asynchronous:
            cluster._loop_runner.start()
        cluster.status = Status.starting
        cluster.sync(cluster._start)
        return cluster

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> None:
        """Ask the head process to scale (see ``SSHSpecCluster.scale``)."""
        request(self.directory, "scale", n=n, cores=cores, memory=memory)

    def adapt(self, minimum: int = 0, maximum: int | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Ask the head process to adapt between ``minimum`` and ``maximum`` workers."""
        return request(self.directory, "adapt", minimum=minimum, maximum=maximum, **kwargs)

    def close(self, timeout: float | None = None) -> None:  # type: ignore[override]
        """Tear the cluster down through its head process."""
        request(self.directory, "down", timeout=timeout or 60.0)
        self._loop_runner.stop()
