"""The head's side of the wheel fan-out: hosts fetch the wheels from each other, the head sends them to a few.

Plugs into :class:`~speccluster_ssh.shipping.Wheelhouses` (see
:meth:`PeerFanout.install`): its :attr:`~Wheelhouses.source_for` becomes
a :class:`PeerSource`, which asks :mod:`speccluster_ssh.fanout`'s plan
where the host gets its wheels. From the head, they go as frames over the
host's channel (:class:`~speccluster_ssh.shipping.FromHead`); from a peer,
the host script fetches them itself (``agent/wheelpeer.py``, shipped beside
``envbuild.py``) over TLS with the cluster's CA, and what a peer could not
deliver comes from the head after all. Once its wheel store is complete, the
host serves the wheelhouse to the others while it builds.

A serving host's script is kept after its ``ready`` (:meth:`PeerFanout.hold`);
when no host of the cluster is in its environment step any more (the
start-up's environment phase is over), the head stops every server and ends
those scripts (:meth:`PeerFanout.stop_servers`). The servers also stop by
themselves after ``lifetime`` seconds, and with their script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .fanout import DEFAULT_DIRECT, DEFAULT_PER_PEER, FanoutCoordinator, FanoutPlan, Source
from .security import CA_PEM, NODE_CERT, NODE_KEY
from .shipping import FromHead
from .tasks import TaskSet

if TYPE_CHECKING:
    from .environments import WheelFile, Wheelhouse
    from .shipping import Shipment, Wheelhouses

logger = logging.getLogger(__name__)

PEER_SOURCE = "wheelpeer.py"
# Seconds a server lives at most, whatever the head says (a head that vanished leaves no server behind).
SERVER_LIFETIME = 900.0
# Seconds a stopping script has to answer.
STOP_TIMEOUT = 10.0


class PeerFanout:
    """The fan-out of one cluster's wheelhouses (one plan per fingerprint).

    Parameters
    ----------
    tls_files
        Returns the cluster's TLS files (``security.make_security``'s); when
        there are none (TLS off), the fan-out makes a CA of its own.
    direct, per_peer
        As for :class:`~speccluster_ssh.fanout.FanoutPlan`.
    fetch_timeout
        Seconds one host's fetch from a peer may take before the head sends instead.
    """

    def __init__(
        self,
        tls_files: Callable[[], Mapping[str, bytes]] = dict,
        *,
        direct: int = DEFAULT_DIRECT,
        per_peer: int = DEFAULT_PER_PEER,
        fetch_timeout: float = 300.0,
        cluster_id: str = "",
    ) -> None:
        self._tls_files = tls_files
        self.direct = direct
        self.per_peer = per_peer
        self.fetch_timeout = fetch_timeout
        self.cluster_id = cluster_id
        self.plans: dict[str, FanoutCoordinator] = {}  # fingerprint -> its fan-out
        self.peer_bytes: dict[str, int] = {}  # host -> bytes it fetched from peers
        self.sizes: dict[str, int] = {}  # fingerprint -> the wheelhouse's size (what a cold host needs)
        self.served: dict[str, dict[str, Any]] = {}  # host -> what its server did (once stopped)
        self._pems: dict[str, str] | None = None
        self.serving: dict[str, str] = {}  # host -> the fingerprint its server offers
        self._held: dict[str, Shipment] = {}
        self._in_step = 0
        self._stopping: list[asyncio.Task[None]] = []  # stops begun by the last step's end
        self.tasks = TaskSet("the wheel fan-out", logger)

    def install(self, wheelhouses: Wheelhouses) -> None:
        """Make ``wheelhouses`` deliver through this fan-out."""
        wheelhouses.source_for = self.source_for
        wheelhouses.hold = self.hold
        if PEER_SOURCE not in wheelhouses.extra_sources:
            wheelhouses.extra_sources = (*wheelhouses.extra_sources, PEER_SOURCE)

    def pems(self) -> dict[str, str]:
        """The PEM texts the hosts' servers and clients use (``ca``, ``cert``, ``key``)."""
        if self._pems is None:
            files = dict(self._tls_files())
            if not files:
                from .security import make_security

                _, files = make_security(True, f"{self.cluster_id or 'cluster'} wheels")
            self._pems = {"ca": files[CA_PEM].decode(), "cert": files[NODE_CERT].decode(),
                          "key": files[NODE_KEY].decode()}  # fmt: skip
        return self._pems

    def plan_of(self, fingerprint: str) -> FanoutCoordinator:
        plan = self.plans.get(fingerprint)
        if plan is None:
            plan = self.plans[fingerprint] = FanoutCoordinator(FanoutPlan(direct=self.direct, per_peer=self.per_peer))
        return plan

    def source_for(self, name: str, wheelhouse: Wheelhouse) -> PeerSource:
        """Where host ``name`` gets the wheels of ``wheelhouse`` (``Wheelhouses.source_for``)."""
        self.sizes[wheelhouse.fingerprint] = wheelhouse.size
        return PeerSource(self, wheelhouse)

    def hold(self, name: str, shipment: Shipment, fingerprint: str) -> bool:
        """After ``ready``: keep the script of a host that serves (True), until :meth:`stop_servers`."""
        if self.serving.get(name) != fingerprint:
            return False
        self._held[name] = shipment
        return True

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[None]:
        """Around one host's environment step: when the last one ends, the servers stop."""
        self._in_step += 1
        try:
            yield
        finally:
            self._in_step -= 1
            if self._in_step == 0 and self._held:
                self._stopping = [t for t in self._stopping if not t.done()]
                self._stopping.append(self.tasks.start(self.stop_servers(), name="stop the wheel servers"))

    async def stop_servers(self) -> None:
        """Stop every server, end the scripts kept for them, and forget the plans (the phase is over)."""
        held, self._held = self._held, {}
        self.plans.clear()
        serving, self.serving = self.serving, {}
        await asyncio.gather(*(self._stop(name, shipment, serving.get(name, "")) for name, shipment in held.items()))

    async def _stop(self, name: str, shipment: Shipment, fingerprint: str) -> None:
        try:
            shipment.send({"op": "stop_serving"})
            answer = await shipment.receive(STOP_TIMEOUT)
            self.served[name] = {k: v for k, v in answer.items() if k != "event"}
            shipment.send({"op": "bye", "keep": fingerprint})
            await shipment.receive(STOP_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the script ends with its channel anyway
            logger.debug("host %s: stopping its wheel server: %s", name, exc)
        finally:
            await shipment.channel.close()

    async def close(self) -> None:
        """Stop the servers and end every task (the cluster closes).

        Stops already under way finish (each answer is bounded by ``STOP_TIMEOUT``), so their stats are kept.
        """
        await asyncio.gather(*self._stopping, return_exceptions=True)
        await self.stop_servers()
        await self.tasks.close()


class PeerSource:
    """Delivers a wheelhouse to one host: from a peer when the plan says so, else (or failing that) from the head."""

    def __init__(self, fanout: PeerFanout, wheelhouse: Wheelhouse) -> None:
        self.fanout = fanout
        self.wheelhouse = wheelhouse
        self.plan = fanout.plan_of(wheelhouse.fingerprint)

    async def deliver(self, shipment: Shipment, wheels: Sequence[WheelFile]) -> None:
        """Bring ``wheels`` into the host's store (see :class:`~speccluster_ssh.shipping.WheelSource`), then serve.

        Once the store is complete the host serves the whole wheelhouse to
        the others, if it can; the plan learns either way.
        """
        name = shipment.host
        remaining = list(wheels)
        while remaining:
            source = await self.plan.source_for(name)
            try:
                if source.is_head:
                    await FromHead().deliver(shipment, remaining)
                    remaining = []
                else:
                    remaining = await self._fetch(shipment, source, remaining)
            except asyncio.CancelledError:
                self.plan.withdraw(name)  # this start is gone: nobody's fault
                raise
            except BaseException:
                self.plan.finished(name, ok=False)
                raise
            if remaining:
                self.plan.finished(name, ok=False)  # the next source_for gives the head
        address = None
        try:
            address = await self._serve(shipment)
        finally:
            self.plan.finished(name, ok=True, address=address)

    async def _fetch(self, shipment: Shipment, source: Source, wheels: list[WheelFile]) -> list[WheelFile]:
        """Have the host fetch ``wheels`` from ``source``; the ones it still lacks."""
        host, _, port = (source.address or "").rpartition(":")
        shipment.say(f"fetching from {source.peer}")
        shipment.send({"op": "peer_fetch", "host": host.strip("[]"), "port": int(port), "pems": self.fanout.pems(),
                       "timeout": self.fanout.fetch_timeout,
                       "wheels": [{"sha256": w.sha256, "size": w.size} for w in wheels]})  # fmt: skip
        answer = await shipment.receive(self.fanout.fetch_timeout + 30)
        if answer.get("event") != "fetched":
            from .errors import HostError

            raise HostError(shipment.host, f"the environment script said {answer}", shipment.channel.stderr_tail())
        got = set(answer.get("got") or ())
        name = shipment.host
        self.fanout.peer_bytes[name] = self.fanout.peer_bytes.get(name, 0) + int(answer.get("bytes") or 0)
        if answer.get("error"):
            logger.info("host %s: fetching wheels from %s failed (the head sends the rest): %s",
                        name, source.peer, answer["error"])
        return [w for w in wheels if w.sha256 not in got]

    async def _serve(self, shipment: Shipment) -> str | None:
        """Start the host's server for the whole wheelhouse; its ``host:port``, or None when it cannot serve."""
        shipment.send({"op": "serve", "wheels": [w.sha256 for w in self.wheelhouse.wheels],
                       "pems": self.fanout.pems(), "lifetime": SERVER_LIFETIME})  # fmt: skip
        answer = await shipment.receive()
        if answer.get("event") != "serving":
            logger.info("host %s does not serve its wheels: %s", shipment.host, answer.get("why") or answer)
            return None
        host, port = answer["address"]
        self.fanout.serving[shipment.host] = self.wheelhouse.fingerprint  # PeerFanout.hold keeps its script
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
