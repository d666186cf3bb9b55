"""The agents of one cluster: one per host, started once and shared.

:class:`AgentPool` starts each host's connection and agent, and records them,
with the host's health, in the cluster's
:class:`~speccluster_ssh.hosts.HostTable` (:attr:`AgentPool.table`). The
first process interface that needs a host's agent starts it
(:meth:`AgentPool.agent`); every later one shares the outcome. The pool
checks the host's ``distributed`` release and GPUs when its agent says hello,
tells the healer when a host is lost, and at close stops every agent, so every
process of the cluster. Which GPUs an entry gets is decided where it is placed
(:func:`speccluster_ssh.placement.entry_gpus`), not here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol

import dask.config

from . import config, families, peerfamily, timeline
from .addresses import url
from .agent import HostAgent
from .connection import ConnectSettings, HostConnection
from .entries import HEAD_ONLY_CONFIG, forwarded_dask_config
from .errors import HostError
from .hosts import HostTable, HostView
from .inventory import HostSpec
from .placement import uneven_gpus
from .peerfamily import PeerFamily
from .peerwheels import PeerFanout
from .shipping import Wheelhouses, ensure_environment, env_lock_of, inspect_environment
from .tasks import TaskSet, log_failures

logger = logging.getLogger("speccluster_ssh.process")  # the messages users know from the process log


class HostWaker(Protocol):
    """What the pool asks of the cluster's power keeper (:class:`~speccluster_ssh.powerctl.PowerKeeper`)."""

    async def reach(self, name: str) -> None:
        """Make sure host ``name`` answers SSH, waking it when it sleeps; raise ``HostError`` when it cannot."""

    def not_awake(self) -> set[str]:
        """The hosts asleep or waking."""

    async def started(self, name: str, agent: HostAgent) -> None:
        """Host ``name``'s agent started (it says there whether this cluster woke the host)."""


def same_release(a: str, b: str) -> bool:
    """True when two dask versions share their first two components."""
    return a.split(".")[:2] == b.split(".")[:2]


class AgentPool:
    """The agents of one cluster, one per host, started on first use.

    Parameters
    ----------
    cluster_id
        Unique id of the cluster (names remote directories and the marker).
    hosts
        Every host the cluster may use: its host table, or the hosts by
        inventory name (a table of them is made).
    settings
        Connection settings.
    silence
        Agent silence timeout in seconds.
    """

    def __init__(
        self,
        cluster_id: str,
        hosts: HostTable | Mapping[str, HostSpec],
        settings: ConnectSettings | None = None,
        *,
        silence: float = 15.0,
        base_dir: str | None = None,
        agent_timeout: float = 60.0,
    ) -> None:
        self.cluster_id = cluster_id
        self.table = hosts if isinstance(hosts, HostTable) else HostTable(hosts.values())
        self.settings = settings or ConnectSettings()
        self.silence = silence
        self.base_dir = base_dir
        self.agent_timeout = agent_timeout
        self._starting: dict[str, asyncio.Task[HostAgent]] = {}
        self._recorded: dict[str, asyncio.Task[HostAgent]] = {}  # the start whose outcome the table has
        self._unclaimed: set[str] = set()  # prestarted, outcome not yet handed out
        self._lost_callbacks: list[Callable[[str, str], None]] = []
        self.files: dict[str, bytes] = {}  # relative path -> content, written to every host
        self.head_scheduler: tuple[str, int] | None = None  # (protocol, port) of a head scheduler
        # The head's dask config as it is now, sent with every start (see forwarded_dask_config).
        extra = config.get("dask-config-exclude") or ()
        exclude = (*HEAD_ONLY_CONFIG, *([extra] if isinstance(extra, str) else extra))
        self.dask_config, dropped = forwarded_dask_config(dask.config.config, exclude)
        if dropped:
            logger.info("dask config not sent to the hosts (not plain data): %s", ", ".join(dropped))
        self.closed = False
        # Seconds between SIGTERM and SIGKILL at the agents' shutdown; None: the agents' default.
        self.shutdown_grace: float | None = None
        self._stopping: list[asyncio.Task[None]] = []  # agents shut down early by stop_agents()
        # Under scheduler_reach auto, agents started from now on probe the network as they start
        # (reach.probe_reach reads ``probes``), instead of the probe opening channels of its own.
        self.agent_probes = False
        self.probes: dict[str, asyncio.Future[dict[str, str] | None]] = {}
        self._probe_server: asyncio.AbstractServer | None = None
        # The family the hosts use between them when it is not their SSH links' (peerfamily.py),
        # and then the head's address of that family per host.
        self.peer_family: PeerFamily | None = None
        self.head_addresses: dict[str, str] = {}
        # Agent starts and connection closes; awaited by close().
        self.tasks = TaskSet(f"agents of {cluster_id}", logger)
        # Wakes a sleeping host before its agent starts (speccluster_power_on); the cluster sets it.
        self.power: HostWaker | None = None
        # speccluster_environment: head: the wheels, gathered once per fingerprint for every host;
        # what each host's environment is doing while its agent waits (shown by up's progress).
        self.wheelhouses = Wheelhouses()
        # Hosts fetch the wheels from each other; the head sends them to a few (issue 24's fan-out).
        self.fanout = PeerFanout(lambda: self.files, cluster_id=cluster_id)
        self.fanout.install(self.wheelhouses)
        self.env_progress: dict[str, str] = {}
        # False for pools that only look (check, plan, hosts): a host whose environment is not ready is
        # not shipped or built, it fails with what it would take.
        self.ship_environments = True

    # The table's live, read-only views (status and tests read them through the pool).
    states: Mapping[str, HostView] = property(lambda self: self.table.states)  # type: ignore[assignment]
    agents: Mapping[str, HostAgent] = property(lambda self: self.table.agents)  # type: ignore[assignment]
    connections: Mapping[str, HostConnection] = property(lambda self: self.table.connections)  # type: ignore[assignment]

    def on_host_lost(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(host_name, reason)`` when a host's agent is lost."""
        self._lost_callbacks.append(callback)

    def connection(self, name: str) -> HostConnection:
        """Host ``name``'s connection, made (not opened) on first use."""
        conn = self.table.connections.get(name)
        if conn is None:
            conn = HostConnection(self.table.specs[name], self.settings)
            self.table.set_connection(name, conn)
        return conn

    async def agent(self, name: str) -> HostAgent:
        """The running agent on host ``name``, starting it (once) if needed.

        Callers that arrive while a start is in flight share its outcome, so
        a host that does not answer costs one connect timeout, not one per
        spec entry; a start begun by :meth:`prestart` is handed to the first
        caller, success or failure.
        """
        if self.closed:
            raise HostError(name, "the cluster is closing")
        agent = self.table.agents.get(name)
        if agent is not None and agent.alive:
            return agent
        task = self._starting.get(name)
        if task is None or (task.done() and name not in self._unclaimed):
            # Its outcome is read (and reported) by every caller, below.
            task = self.tasks.start(self._start_agent(name), name=f"start the agent on {name}", log_failure=False)
            self._starting[name] = task
        self._unclaimed.discard(name)
        try:
            agent = await asyncio.shield(task)
        except HostError as exc:
            if self._first_to_record(name, task):  # one failed start is one failure, however many waited
                # Said once here, so a host that later looks merely "moved" or "down" has its cause in the log.
                logger.info("host %s: the agent did not start: %s", name, exc.reason)
                self.table.mark_lost(name, exc.reason, fix=exc.fix, tail=exc.tail)
            raise
        if self._first_to_record(name, task):
            self.table.renew_agent(name, agent)
        return agent

    def _first_to_record(self, name: str, task: asyncio.Task[HostAgent]) -> bool:
        if self._recorded.get(name) is task or name not in self.table:
            return False
        self._recorded[name] = task
        return True

    async def renew(self, name: str, new_connection: bool) -> tuple[HostAgent | None, HostConnection | None]:
        """Start a new agent on host ``name`` (on a new connection when ``new_connection``) beside its current one.

        The same start as :meth:`agent`'s: the release check and the files.
        The new agent is the host's from now on; returns the old agent and
        the old connection (when replaced), which the caller stops once
        unused. When the start fails, the host keeps what it had.
        """
        old_conn = self.table.drop_connection(name) if new_connection else None
        try:
            agent = await self._start_agent(name)
        except BaseException:
            if new_connection:
                failed = self.table.set_connection(name, old_conn)
                if failed is not None:
                    await failed.close()
            raise
        return self.table.renew_agent(name, agent), old_conn

    def prestart(self, names: Iterable[str]) -> None:
        """Begin starting the agents of ``names`` now, in the background.

        Nothing is recorded until a caller of :meth:`agent` claims the
        outcome, so a host that fails here fails where it is used.
        """
        for name in names:
            if name in self.table and name not in self.table.agents and name not in self._starting:
                if self.agent_probes and not self.table.specs[name].is_local:
                    self.probes.setdefault(name, asyncio.get_running_loop().create_future())
                # The first caller of agent() claims the outcome; close() reports an unclaimed failure.
                task = self.tasks.start(self._start_agent(name), name=f"start the agent on {name}", log_failure=False)
                self._starting[name] = task
                self._unclaimed.add(name)

    def agent_starts(self, names: Iterable[str]) -> dict[str, asyncio.Future[HostAgent]]:
        """Host -> its agent: a running one's resolved, a starting one's start (its outcome left unclaimed)."""
        out: dict[str, asyncio.Future[HostAgent]] = {}
        for name in names:
            agent = self.table.agents.get(name)
            if agent is not None and agent.alive:
                out[name] = asyncio.get_running_loop().create_future()
                out[name].set_result(agent)
            elif name in self._starting:
                out[name] = self._starting[name]
        return out

    async def _start_agent(self, name: str) -> HostAgent:
        import distributed

        probe = self.probes.get(name)
        if probe is not None and probe.done():
            probe = None  # probed already

        def probed(result: dict[str, str] | None) -> None:
            if probe is not None and not probe.done():
                probe.set_result(result)

        try:
            if self.power is not None:
                await self.power.reach(name)  # a host that sleeps is woken first
            # A host that runs the head's environment gets it first (shipped and built when missing).
            python = await self._environment(name) if self.table.specs[name].environment == "head" else None
            port = await self._probe_port() if probe is not None and self.agent_probes else None
            agent = HostAgent(
                self.connection(name), self.cluster_id, silence=self.silence, base_dir=self.base_dir,
                probe_port=port, on_probe=probed, lease_dir=self.table.specs[name].lease_dir,
                python=python, env_lock=env_lock_of(python) if python else None,
            )
            facts = await agent.start(timeout=self.agent_timeout)
        finally:
            probed(None)  # no answer (whatever failed first): the host is left out of the probe
            self.env_progress.pop(name, None)
        remote_version = str(facts.get("distributed", "?"))
        # Refused while another agent of the cluster runs on the host (a restart's new agent):
        # its directory, TLS files and live logs are that agent's and stay.
        refuse = {"remove_files": False, "keep_tls": True} if name in self.table.agents else {}
        if not same_release(remote_version, distributed.__version__):
            await agent.close(**refuse)
            raise HostError(
                name,
                f"distributed {remote_version} at {facts.get('python')} does not match the head's "
                f"{distributed.__version__}; install distributed=={distributed.__version__} there",
                fix=f"install distributed=={distributed.__version__} for {facts.get('python')} on {name}",
            )
        problem = self._gpu_problem(name, facts)
        if problem:
            await agent.close(**refuse)
            raise HostError(name, problem[0], fix=problem[1])
        try:
            # Who holds the host: placement sees it from the start, and an unusable lease
            # directory makes the host unusable here, with its fix, like a wrong release.
            leases = await agent.lease_list(timeout=self.agent_timeout)
        except HostError as exc:
            await agent.close(**refuse)
            raise HostError(name, exc.reason, fix=exc.fix or "set speccluster_lease_dir to a safe directory") from None
        self.table.see_leases(name, leases)
        if self.power is not None:
            await self.power.started(name, agent)
        for path, data in self.files.items():
            await agent.write_file(path, data)
        timeline.stamp("agent_ready", name)
        agent.on_lost(lambda reason, host=name, a=agent: self._lost(host, a, reason))
        if self.peer_family is not None:
            peerfamily.adopt(self, name, agent)  # the hosts' family between them, chosen before it came
        return agent

    async def _environment(self, name: str) -> str:
        """The python of the head's environment on host ``name``, made ready there first (see :mod:`.shipping`)."""

        def progress(host: str, label: str) -> None:
            self.env_progress[host] = label

        if not self.ship_environments:
            found = await inspect_environment(self.connection(name), self.table.specs[name], cluster_id=self.cluster_id,
                                              timeout=self.agent_timeout)
            if found.state != "ready":
                raise HostError(name, f"the head's environment {found.fingerprint[:12]} is {found.detail}",
                                fix="'speccluster-ssh up' ships and builds it")
            return found.python
        async with self.fanout.step(name):  # the last step to end stops the hosts' wheel servers
            return await ensure_environment(
                self.connection(name), self.table.specs[name], self.wheelhouses, progress=progress,
                cluster_id=self.cluster_id, timeout=self.agent_timeout,
            )

    def _gpu_problem(self, name: str, facts: Mapping[str, Any]) -> tuple[str, str] | None:
        """Why the GPUs that ``speccluster_gpus: auto`` found on ``name`` cannot be shared, and the fix."""
        host = self.table.specs[name]
        if host.gpus != "auto":
            return None  # a count or a list was checked when the inventory was read
        why = uneven_gpus(len(facts.get("gpus") or ()), host)
        if why is None:
            return None
        workers = host.slots * host.nworkers
        return (
            f"speccluster_gpus is auto and nvidia-smi -L lists {len(facts.get('gpus') or ())} GPUs: {why}",
            f"set speccluster_gpus for {name} to a list of GPUs whose length is a multiple of {workers}, "
            "or change speccluster_nworkers or speccluster_slots",
        )

    async def _probe_port(self) -> int:
        """The port of the head's stand-in listener that agents' reach probes connect to."""
        if self._probe_server is None:
            # Both families on one port: a host reached over IPv6 probes the head over IPv6.
            self._probe_server = await asyncio.start_server(lambda r, w: w.close(), sock=families.listen_socket())
        return int(self._probe_server.sockets[0].getsockname()[1])

    async def stop_probing(self) -> None:
        """The reach is decided: agents started from now on do not probe."""
        self.agent_probes = False
        server, self._probe_server = self._probe_server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _lost(self, name: str, agent: HostAgent, reason: str) -> None:
        if self.closed or self.table.agents.get(name) is not agent or reason == "closed":
            return
        self.table.mark_lost(name, reason)
        self.table.drop_agent(name)
        # The connection may be dead too; the next attempt reconnects.
        conn = self.table.drop_connection(name)
        if conn is not None:
            self.tasks.start(conn.close(), name=f"close the lost connection to {name}")
        for callback in self._lost_callbacks:
            try:
                callback(name, reason)
            except Exception:
                logger.exception("host-lost callback failed for %s", name)

    def head_address_for(self, name: str) -> str | None:
        """The head's address as seen from host ``name`` (local end of the SSH link, or of the peers' family)."""
        if name in self.head_addresses:
            return self.head_addresses[name]
        conn = self.table.connections.get(name)
        return conn.local_address if conn is not None else None

    def scheduler_address_for(self, name: str) -> str | None:
        """Where host ``name`` reaches a scheduler that runs on the head.

        The head may have several addresses (or a NAT one, as under Vagrant);
        the local end of the SSH connection to that host is one the host can
        reach. ``None`` when the scheduler is not on the head or an explicit
        address was set.
        """
        if self.head_scheduler is None:
            return None
        protocol, port = self.head_scheduler
        address = self.head_address_for(name)
        if not address:
            return None
        return url(protocol, address, port)

    def stop_agents(self, names: Iterable[str]) -> None:
        """Begin shutting down the agents of hosts ``names`` (and every process they run); :meth:`close` awaits it.

        For a closing cluster: the hosts' processes stop while the scheduler closes.
        """
        for name in names:
            agent = self.table.drop_agent(name)  # gone from the pool: its loss is no host failure
            if agent is not None:
                self.stop_later(agent.close(grace=self.shutdown_grace), f"stop the agent on {name}")

    def stop_later(self, stopping: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``stopping`` (the end of an agent the pool no longer holds) as a task that :meth:`close` awaits."""
        self._stopping.append(self.tasks.start(stopping, name=name))

    async def close(self) -> None:
        """Stop every agent (and so every process) and close the connections."""
        self.closed = True
        # Starts still in flight, or prestarted and never claimed, own agents too.
        starting = dict(self._starting)
        results = await asyncio.gather(*starting.values(), return_exceptions=True)
        # A claimed failure was reported to whoever claimed it; an unclaimed one only here.
        unclaimed = [(n, r) for n, r in zip(starting, results) if n in self._unclaimed]
        log_failures([r for _, r in unclaimed], [n for n, _ in unclaimed], logger, "starting agents")
        agents = {id(a): a for a in self.table.agents.values()}
        for name, result in zip(starting, results):
            # Not one lost earlier: its loss was reported then (see _lost), and it has nothing left to stop.
            if isinstance(result, HostAgent) and (result.alive or name in self._unclaimed):
                agents.setdefault(id(result), result)
        closing = list(agents.values())
        results = await asyncio.gather(
            *(a.close(grace=self.shutdown_grace) for a in closing), *self._stopping, return_exceptions=True
        )
        # The early stops' failures were logged by their tasks.
        log_failures(results[: len(closing)], [a.host.name for a in closing], logger, "stopping agents")
        self._stopping.clear()
        await self.stop_probing()
        await self.fanout.close()
        await self.wheelhouses.close()
        for name in list(self.table.agents):
            self.table.drop_agent(name)
        self._starting.clear()
        self._unclaimed.clear()
        self._recorded.clear()
        conns = {name: self.table.drop_connection(name) for name in list(self.table.connections)}
        results = await asyncio.gather(*(c.close() for c in conns.values() if c is not None), return_exceptions=True)
        log_failures(results, list(conns), logger, "closing connections")
        await self.tasks.close()
