"""A handle on a detached cluster from another process (for dask-ctl, scripts and notebooks).

Attaching does not own. The cluster belongs to its head process (started by
``speccluster-ssh up --detach``); a handle only talks to it. ``close()``,
leaving a ``with`` block and garbage collection detach the handle and leave
the cluster running. :meth:`DetachedCluster.shutdown`, or a handle made with
``shutdown_on_close=True``, tears it down through the head process, as
``speccluster-ssh down`` does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from distributed.core import Status

from .control import ControlError, Op, request
from .distributed_internals import ClusterBridge
from .state import CA_FILE, CLIENT_CERT, CLIENT_KEY, check_name, cluster_dir, head_alive, read_state

logger = logging.getLogger(__name__)

# Seconds a teardown through the head process may take by default.
SHUTDOWN_TIMEOUT = 60.0


class DetachedCluster(ClusterBridge):
    """A running detached cluster seen from another process.

    It talks to the scheduler directly (with the cluster's client
    certificates) for information, and to the head process's control socket
    for ``scale``, ``adapt``, ``get_logs`` and ``shutdown``. Build it with
    :meth:`from_name` or ``SSHSpecCluster.from_name``.

    Parameters
    ----------
    name
        The cluster's name, as ``speccluster-ssh list`` shows it.
    directory
        The cluster's state directory on this head node.
    shutdown_on_close
        Whether :meth:`close` (and so leaving a ``with`` block) tears the
        cluster down. False by default: the handle only detaches.
    asynchronous, loop
        As for :class:`distributed.deploy.Cluster`.

    Examples
    --------
    >>> cluster = SSHSpecCluster.from_name("t1")  # doctest: +SKIP
    >>> client = Client(cluster)  # doctest: +SKIP
    >>> cluster.close()  # doctest: +SKIP
    >>> SSHSpecCluster.from_name("t1").shutdown()  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str,
        directory: Path,
        *,
        shutdown_on_close: bool = False,
        asynchronous: bool = False,
        loop: Any = None,
    ) -> None:
        super().__init__(asynchronous=asynchronous, loop=loop, name=name)
        self.directory = directory
        self.shutdown_on_close = shutdown_on_close

    @classmethod
    def from_name(
        cls, name: str, asynchronous: bool = False, loop: Any = None, shutdown_on_close: bool = False
    ) -> DetachedCluster:
        """Attach to the detached cluster ``name`` started on this head node.

        Parameters
        ----------
        name
            The cluster's name.
        asynchronous
            True inside an event loop: ``await`` the handle (or use
            ``async with``) to connect it.
        loop
            The event loop to use, as for :class:`distributed.deploy.Cluster`.
        shutdown_on_close
            True makes :meth:`close` tear the cluster down; by default it
            only detaches.

        Returns
        -------
        DetachedCluster
            The handle, connected to the scheduler unless asynchronous.

        Raises
        ------
        ControlError
            When no such cluster runs here.
        """
        from distributed.core import rpc
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
        handle = cls(name, directory, shutdown_on_close=shutdown_on_close, asynchronous=asynchronous, loop=loop)
        handle.security = security
        handle.scheduler_comm = rpc(state.scheduler_address, connection_args=security.get_connection_args("client"))
        if not asynchronous:
            handle.start_loop()
            try:
                handle.sync(handle.connect)
            except BaseException:
                handle.shutdown_on_close = False  # detach only: the failure may be ours, not the cluster's
                handle.close()
                raise
        return handle

    def __await__(self) -> Generator[Any, None, DetachedCluster]:
        # Asynchronous handles connect when awaited (and so in ``async with``).
        async def connected() -> DetachedCluster:
            if self.status == Status.created:
                self.status = Status.starting
                await self.connect()
            return self

        return connected().__await__()

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Ask the head process to scale (see ``SSHSpecCluster.scale``); awaitable when asynchronous."""
        from distributed.utils import NoOpAwaitable

        request(self.directory, Op.SCALE, n=n, cores=cores, memory=memory)
        return NoOpAwaitable() if self.asynchronous else None

    def adapt(self, minimum: int = 0, maximum: int | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Ask the head process to adapt between ``minimum`` and ``maximum`` workers."""
        return request(self.directory, Op.ADAPT, minimum=minimum, maximum=maximum, **kwargs)

    def close(self, timeout: float | None = None) -> Any:  # type: ignore[override]
        """Detach from the cluster, which keeps running; with ``shutdown_on_close``, tear it down first.

        Parameters
        ----------
        timeout
            Seconds the whole close may take.
        """
        result = super().close(timeout=timeout)
        if not self.asynchronous:
            self.stop_loop()
        return result

    def shutdown(self, timeout: float | None = None) -> Any:
        """Tear the cluster down through its head process (as ``speccluster-ssh down``), then detach.

        Returns once the cluster is closed; awaitable when asynchronous. A
        cluster that is already down is no error.

        Parameters
        ----------
        timeout
            Seconds the teardown may take (default 60).

        Raises
        ------
        ControlError
            When the head process does not answer, or its close failed.
        """
        result = self.sync(self._shutdown, timeout=timeout)
        if not self.asynchronous:
            self.stop_loop()
        return result

    async def _shutdown(self, timeout: float | None = None) -> None:
        try:
            await self._tear_down(timeout)
        finally:
            await self.disconnect()

    async def close_handle(self) -> None:
        """What ``close()`` does: detach, after tearing the cluster down with ``shutdown_on_close``."""
        if self.status == Status.closed:
            return
        try:
            if self.shutdown_on_close:
                await self._tear_down(None)
        finally:
            await self.disconnect()  # detach: the scheduler comms and background tasks of this handle

    async def _tear_down(self, timeout: float | None) -> None:
        """Ask the head process to close the cluster, and wait until it has."""
        if not head_alive(self.directory):
            logger.info("cluster %s: its head process has already ended", self.name)
            return
        down = functools.partial(request, self.directory, Op.DOWN, timeout=timeout or SHUTDOWN_TIMEOUT)
        await asyncio.get_running_loop().run_in_executor(None, down)

    async def fetch_logs(self, cluster: bool, scheduler: bool, workers: bool | Sequence[str]) -> Any:
        """The head process's logs, keyed as ``SSHSpecCluster.get_logs``: by worker name."""
        from distributed.utils import Log, Logs

        fetch = functools.partial(request, self.directory, Op.LOGS, timeout=SHUTDOWN_TIMEOUT)
        found: dict[str, str] = await asyncio.get_running_loop().run_in_executor(None, fetch)
        logs = Logs()
        if cluster and "Cluster" in found:
            logs["Cluster"] = Log(found["Cluster"])
        if scheduler and "Scheduler" in found:
            logs["Scheduler"] = Log(found["Scheduler"])
        if workers:
            # Worker names or addresses, as distributed's get_logs takes them.
            known = self.scheduler_info.get("workers", {})
            wanted = None if workers is True else {str(known.get(w, {}).get("name", w)) for w in workers}
            for name, text in found.items():
                if name not in ("Cluster", "Scheduler") and (wanted is None or name in wanted):
                    logs[name] = Log(text)
        return logs

    def __del__(self) -> None:
        # Garbage collection never tears the cluster down, whatever the handle was made with.
        self.shutdown_on_close = False
        super().__del__()
