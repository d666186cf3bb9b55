"""SSH local port forwards to a scheduler on a lab host (the ``forward`` mode of :mod:`speccluster_ssh.reach`).

The head's own connections to such a scheduler (the cluster's, clients',
the CLI's) and to its dashboard go through forwards over the SSH connection
already open to the scheduler's host; TLS bytes pass through unchanged.
A scheduler the head reaches directly gets a forward for its dashboard
only, when that listens on its host's loopback (the default, see
:mod:`speccluster_ssh.dashboards`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from . import dashboards
from .addresses import format_hostport, split_url, url
from .process import RemoteScheduler

if TYPE_CHECKING:
    import asyncssh

    from .connection import HostConnection

logger = logging.getLogger(__name__)


def split_address(address: str) -> tuple[str, str, int]:
    """``tls://10.0.0.3:8786`` -> ``("tls", "10.0.0.3", 8786)``; ``tls://[fd00::3]:8786`` -> ``("tls", "fd00::3", 8786)``."""
    return split_url(address)


class SchedulerForwards:
    """SSH local port forwards to one host, over the connection already open to it.

    Each forward listens on ``127.0.0.1`` of the head on a free port; what
    it carries (TLS included) goes through the SSH connection to a
    ``direct-tcpip`` channel that the host's sshd connects onwards. Behind
    jump hosts the connection itself runs through them, so the forwards do too.

    Parameters
    ----------
    connection
        The open connection to the host.
    """

    def __init__(self, connection: HostConnection) -> None:
        self.connection = connection
        self.listeners: list[asyncssh.SSHListener] = []
        self.ports: dict[tuple[str, int], int] = {}

    async def forward_port(self, host: str, port: int) -> int:
        """Forward a free port of ``127.0.0.1`` on the head to ``host:port`` as the host sees it."""
        key = (host, port)
        if key in self.ports:
            return self.ports[key]
        listener = await self.connection.forward_local_port(host, port)
        self.listeners.append(listener)
        local = int(listener.get_port())
        self.ports[key] = local
        logger.info("forwarding 127.0.0.1:%d on the head to %s on %s", local, format_hostport(host, port), self.connection.host.name)
        return local

    async def forward(self, address: str) -> str:
        """The head's address for dask ``address`` (``tls://10.0.0.3:8786`` -> ``tls://127.0.0.1:<port>``)."""
        protocol, host, port = split_address(address)
        local = await self.forward_port(host, port)
        return url(protocol, "127.0.0.1", local)

    async def close(self) -> None:
        """Stop listening; connections already carried end with the SSH connection."""
        listeners, self.listeners = self.listeners, []
        self.ports.clear()
        for listener in listeners:
            listener.close()
            try:
                await asyncio.wait_for(listener.wait_closed(), 5)
            except (asyncio.TimeoutError, TimeoutError, OSError) as exc:
                logger.debug("SSH forward on %s not closed cleanly: %r", self.connection.host.name, exc)


class ForwardedScheduler(RemoteScheduler):
    """A scheduler on a lab host that the head reaches through SSH forwards.

    ``address`` stays the scheduler's lab address (what workers use);
    ``external_address`` is the forward on the head, which SpecCluster
    connects to, and :attr:`head_dashboard_link` the dashboard's.
    """

    #: Whether the head's connections to the scheduler go through a forward (else only the dashboard's).
    forward_scheduler = True

    def __init__(self, *, host: str, **kwargs: Any) -> None:
        super().__init__(host=host, **kwargs)
        self.forwards: SchedulerForwards | None = None
        self.head_dashboard_link: str = ""

    async def start(self) -> None:
        await super().start()
        connection = self._require_pool().connection(self.host)
        if connection.host.is_local or not self.address:
            return  # the head is the host: its address works as it is
        loopback = dashboards.on_loopback(self.options.get("dashboard_address"))
        if not self.forward_scheduler and not loopback:
            return  # the head reaches the scheduler and its dashboard directly
        self.forwards = SchedulerForwards(connection)
        try:
            if self.forward_scheduler:
                self.external_address = await self.forwards.forward(self.address)
            port = self.dashboard_port
            if port:
                _, host, _ = split_address(self.address)
                # As the host's sshd reaches it: a loopback dashboard on its own loopback.
                target = dashboards.reach_host(self.options.get("dashboard_address"), host)
                local = await self.forwards.forward_port(target, port)
                self.head_dashboard_link = f"http://127.0.0.1:{local}/status"
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self.forwards is not None:
                await self.forwards.close()


class DashboardForwardedScheduler(ForwardedScheduler):
    """A scheduler on a lab host that the head reaches directly; only its dashboard, on loopback, is forwarded."""

    forward_scheduler = False
