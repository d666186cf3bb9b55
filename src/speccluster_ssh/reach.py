"""Heads the hosts cannot reach: where the scheduler runs, and how the head reaches it.

Three modes (``speccluster_scheduler_reach`` in an inventory, or
``scheduler-reach`` in the dask config section):

``direct``
    The scheduler runs on the head, or on the inventory's ``scheduler``
    host; the head connects to it directly. Every host must reach the
    scheduler, and the head must reach the scheduler host.
``forward``
    The scheduler runs on a lab host (the ``scheduler`` group's, or one the
    cluster picks); the head reaches it and its dashboard through SSH local
    port forwards over the connection already open to that host. TLS bytes
    travel through the forward unchanged: TLS ends at the scheduler.
``auto`` (the default)
    Probe first, then pick one of the two: ``direct`` when every host
    reaches the head (and the head reaches a ``scheduler`` host directly),
    else ``forward``.

This module holds the probes (host -> head, head -> host, host -> peers),
and the choice between the modes (:func:`choose_reach`, a pure function);
the forwards themselves are in :mod:`speccluster_ssh.forwards`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import families, peerfamily, timeline
from .addresses import format_hostport
from .errors import HostError, UserError
from .pool import AgentPool
from .tasks import log_failures

if TYPE_CHECKING:
    from .inventory import HostSpec, Inventory

logger = logging.getLogger(__name__)

REACH_MODES = ("auto", "direct", "forward")
VARIABLE = "speccluster_scheduler_reach"
CONFIG_KEY = "scheduler-reach"

# Seconds one TCP connect of a probe may take.
CONNECT_TIMEOUT = 5.0
# Seconds beyond the agent start timeout that a start probe is waited for.
PROBE_SLACK = 10.0
# Seconds a probe listener lives at most, whatever happens to the head.
LISTEN_LIFETIME = 120

# Run by a host's python with "address:port" arguments; prints {"address:port": "why not" or ""}.
CONNECT_PROBE = (
    "import json, socket, sys\n"
    "out = {}\n"
    "for target in sys.argv[2:]:\n"
    "    host, _, port = target.rpartition(':')\n"
    "    try:\n"
    "        socket.create_connection((host.strip('[]'), int(port)), float(sys.argv[1])).close()\n"
    "        out[target] = ''\n"
    "    except OSError as exc:\n"
    "        out[target] = exc.strerror or ('no answer within ' + sys.argv[1] + ' s' if isinstance(exc, TimeoutError) else type(exc).__name__)\n"
    "print(json.dumps(out))\n"
)

# Run by a host's python: listens on a free port, prints it, accepts (and drops)
# connections until its stdin closes or LISTEN_LIFETIME seconds have passed.
LISTEN_PROBE = (
    "import select, socket, sys, time\n"
    "try:\n"
    "    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(('::', 0))\n"
    "except OSError:\n"
    "    s = socket.socket(); s.bind(('0.0.0.0', 0))\n"
    "s.listen(64)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    ready, _, _ = select.select([s, sys.stdin], [], [], 1.0)\n"
    "    if s in ready:\n"
    "        s.accept()[0].close()\n"
    "    if sys.stdin in ready and not sys.stdin.buffer.read1(1):\n"
    "        break\n"
)


# -- the setting -------------------------------------------------------------------------------------


def _mode(value: Any) -> str | None:
    if isinstance(value, str) and value.strip().lower() in REACH_MODES:
        return value.strip().lower()
    return None


def reach_setting(inventory: Inventory, explicit: str | None = None) -> str:
    """The mode asked for: ``explicit``, else the inventory's variable, else the dask config's.

    Parameters
    ----------
    inventory
        Its hosts' ``speccluster_scheduler_reach`` (validated when the
        inventory was read) must agree where they are set.
    explicit
        A mode given to the cluster or on the command line.

    Raises
    ------
    UserError
        For a value that is not a mode, or hosts that disagree.
    """
    from . import config as sc_config

    if explicit is not None:
        mode = _mode(explicit)
        if mode is None:
            raise UserError(f"scheduler_reach must be 'auto', 'direct' or 'forward', got {explicit!r}")
        return mode
    hosts = list(inventory.worker_hosts)
    if inventory.scheduler_host is not None:
        hosts.append(inventory.scheduler_host)
    found: dict[str, list[str]] = {}
    for host in hosts:
        if VARIABLE in host.vars:
            value = _mode(host.vars[VARIABLE]) or str(host.vars[VARIABLE])
            found.setdefault(value, []).append(host.name)
    if len(found) > 1:
        listed = "; ".join(f"{value!r} on {', '.join(names)}" for value, names in found.items())
        raise UserError(
            f"{VARIABLE} differs between hosts ({listed}); it is one setting for the whole cluster: "
            "set it once, under all.vars"
        )
    if found:
        return next(iter(found))
    configured = sc_config.get(CONFIG_KEY, "auto")
    mode = _mode(configured)
    if mode is None:
        raise UserError(
            f"speccluster-ssh.{CONFIG_KEY} in the dask config must be 'auto', 'direct' or 'forward', "
            f"got {configured!r}; fix it in your dask config file or DASK_SPECCLUSTER_SSH__SCHEDULER_REACH"
        )
    return mode


# -- the choice --------------------------------------------------------------------------------------


@dataclass
class ReachProbe:
    """What the probes found, per host name.

    Attributes
    ----------
    to_head
        Host -> ``""`` when it can open a connection to the head, else why not.
        Hosts that could not be probed (down) are absent.
    from_head
        Host -> ``""`` when the head can open a connection to a port the host
        listens on, else why not (for the ``scheduler`` host only when there is one).
    via
        Host -> the jump hosts the head goes through, ``None`` when direct.
    peers
        Host -> {peer: why not} for the peers it cannot reach (empty when it reaches them all).
    peer_family
        Set when the hosts reach each other over the address family their
        SSH links do not use only (then ``peers`` are those over it).
    """

    to_head: dict[str, str] = field(default_factory=dict)
    from_head: dict[str, str] = field(default_factory=dict)
    via: dict[str, str | None] = field(default_factory=dict)
    peers: dict[str, dict[str, str]] = field(default_factory=dict)
    peer_family: peerfamily.PeerFamily | None = None


@dataclass(frozen=True)
class ReachChoice:
    """Where the scheduler runs and how the head reaches it.

    Attributes
    ----------
    mode
        ``"direct"`` or ``"forward"``.
    scheduler_host
        The inventory host the scheduler runs on; ``None`` for the head.
    why
        One sentence saying why, for the log and ``status``.
    setting
        The mode asked for (``auto``, ``direct`` or ``forward``).
    """

    mode: str
    scheduler_host: str | None
    why: str
    setting: str = "auto"

    def as_dict(self) -> dict[str, Any]:
        """``{"mode", "why", "scheduler_host", "setting"}`` for ``status_report``."""
        return {"mode": self.mode, "why": self.why, "scheduler_host": self.scheduler_host, "setting": self.setting}


def _names(hosts: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(hosts[:limit])
    return shown + (f" and {len(hosts) - limit} more" if len(hosts) > limit else "")


def pick_scheduler_host(worker_hosts: Sequence[str], probe: ReachProbe | None) -> str | None:
    """The worker host a forwarded scheduler runs on when the inventory names none.

    Among the hosts that answered (all of them without a probe): one the
    head reaches without a jump host, else any; the first in inventory
    order, so the choice is the same on every start.
    """
    usable = [h for h in worker_hosts if probe is None or h in probe.to_head]
    if not usable:
        return None
    direct = [h for h in usable if probe is None or not probe.via.get(h)]
    return (direct or usable)[0]


def choose_reach(
    setting: str,
    worker_hosts: Sequence[str],
    scheduler_host: str | None,
    probe: ReachProbe | None,
) -> ReachChoice:
    """Choose where the scheduler runs and how the head reaches it. No I/O.

    Parameters
    ----------
    setting
        ``"auto"``, ``"direct"`` or ``"forward"``.
    worker_hosts
        The inventory's worker hosts, in inventory order.
    scheduler_host
        The inventory's ``scheduler`` host, ``None`` without one.
    probe
        What the probes found; ``None`` when nothing was probed (then
        ``auto`` means ``direct``).

    Returns
    -------
    ReachChoice
    """
    if setting not in REACH_MODES:
        raise UserError(f"scheduler_reach must be 'auto', 'direct' or 'forward', got {setting!r}")
    if setting == "direct":
        where = f"on {scheduler_host}, the scheduler host of the inventory" if scheduler_host else "on the head"
        return ReachChoice("direct", scheduler_host, f"{VARIABLE} is direct: the scheduler runs {where}", setting)
    if setting == "forward":
        if scheduler_host is not None:
            return ReachChoice(
                "forward", scheduler_host,
                f"{VARIABLE} is forward: the scheduler runs on {scheduler_host}, the scheduler host of the "
                "inventory, and the head reaches it through SSH forwards",
                setting,
            )
        picked = pick_scheduler_host(worker_hosts, probe)
        return ReachChoice(
            "forward", picked,
            f"{VARIABLE} is forward and the inventory has no scheduler host: the scheduler runs on {picked}, "
            "the first worker host that answered"
            + ("" if probe is None or not probe.via.get(picked or "") else f" (through jump host {probe.via[picked or '']})")
            + "; the head reaches it through SSH forwards",
            setting,
        )
    # auto
    if probe is None:
        return ReachChoice("direct", scheduler_host, "nothing was probed, so the head connects directly", setting)
    if scheduler_host is not None:
        blocked = probe.from_head.get(scheduler_host)
        if blocked:
            via = probe.via.get(scheduler_host)
            jump = f", which it reaches over SSH only through jump host {via}" if via else ""
            return ReachChoice(
                "forward", scheduler_host,
                f"the head cannot open a connection to the scheduler host {scheduler_host}{jump} ({blocked}), "
                "so it reaches the scheduler through SSH forwards",
                setting,
            )
        return ReachChoice(
            "direct", scheduler_host,
            f"the head reaches the scheduler host {scheduler_host} directly", setting,
        )
    # A scheduler on the head needs both ways: workers connect to it, and it connects to them.
    to_head = [h for h in worker_hosts if probe.to_head.get(h)]
    from_head = [h for h in worker_hosts if probe.from_head.get(h)]
    probed = [h for h in worker_hosts if h in probe.to_head]
    if not probed:
        return ReachChoice("direct", None, "no host answered the probe, so the scheduler runs on the head", setting)
    if not to_head and not from_head:
        return ReachChoice(
            "direct", None,
            f"every host that answered ({len(probed)}) and the head can open connections to each other, "
            "so the scheduler runs on the head",
            setting,
        )
    reasons = []
    if to_head:
        reasons.append(f"{_names(to_head)} cannot open a connection to the head ({to_head[0]}: {probe.to_head[to_head[0]]})")
    if from_head:
        reasons.append(
            f"the head cannot open a connection to {_names(from_head)} ({from_head[0]}: {probe.from_head[from_head[0]]})"
        )
    picked = pick_scheduler_host(worker_hosts, probe)
    return ReachChoice(
        "forward", picked,
        f"{' and '.join(reasons)}, "
        f"so the scheduler runs on {picked}, the first worker host that answered"
        + (f" (through jump host {probe.via[picked]})" if picked and probe.via.get(picked) else "")
        + ", and the head reaches it through SSH forwards",
        setting,
    )


# -- the probes --------------------------------------------------------------------------------------


def _python(host: HostSpec) -> str:
    from .agent import agent_argv

    return agent_argv(host, "")[2]


def _target(address: str, port: int) -> str:
    return format_hostport(address, port)


async def connect_from(pool: AgentPool, name: str, targets: Sequence[str]) -> dict[str, str] | None:
    """From host ``name``, open (and close) a TCP connection to each ``address:port`` of ``targets``.

    Returns
    -------
    dict or None
        Target -> ``""`` when it connected, else why not; ``None`` when the
        probe could not run there (no connection, a python that does not
        start): that says nothing about the network, and the host's own
        start reports it.
    """
    if not targets:
        return {}
    try:
        status, out, _ = await pool.connection(name).run(
            [_python(pool.table.specs[name]), "-c", CONNECT_PROBE, str(CONNECT_TIMEOUT), *targets],
            timeout=CONNECT_TIMEOUT * len(targets) + 30,
        )
    except (HostError, asyncio.TimeoutError, TimeoutError, OSError) as exc:
        logger.info("no reach probe from %s: %s", name, exc)
        return None
    try:
        found = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1]) if status == 0 else None
    except (ValueError, IndexError):
        found = None
    if not isinstance(found, dict):
        logger.info("the reach probe did not run on %s (exit %s)", name, status)
        return None
    return {t: str(found.get(t, "not probed")) for t in targets}


class _Listener:
    """A probe listener on one host: a free port that accepts and drops connections."""

    def __init__(self, pool: AgentPool, name: str) -> None:
        self.pool = pool
        self.name = name
        self.port: int | None = None
        self._channel: Any = None

    async def __aenter__(self) -> _Listener:
        channel = await self.pool.connection(self.name).open_channel(
            [_python(self.pool.table.specs[self.name]), "-u", "-c", LISTEN_PROBE, str(LISTEN_LIFETIME)]
        )
        self._channel = channel
        try:
            line = await asyncio.wait_for(channel.readline(), 30)
        except BaseException:
            # __aexit__ does not run when __aenter__ fails: end the listener here.
            await channel.close()
            raise
        try:
            self.port = int(line.strip())
        except ValueError:
            self.port = None
            logger.info("no probe listener on %s: %s", self.name, channel.stderr_tail().strip()[-300:])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()


def _listen_address(pool: AgentPool, name: str) -> str:
    agent = pool.agents.get(name)
    listen = agent.facts.get("listen_address") if agent is not None else None
    return str(listen or pool.table.specs[name].address)


async def probe_reach(
    pool: AgentPool,
    names: Sequence[str],
    *,
    scheduler_host: str | None = None,
    peers: bool = False,
    head_port: int | None = None,
) -> ReachProbe:
    """Probe hosts ``names``: through their starting agents where the pool has them probe, else over SSH channels.

    A cluster's start under ``auto`` has its agents probe as they start
    (``AgentPool.agent_probes``), before their slow import: no SSH channel
    and no python start of its own per host. Other hosts, and ``check``,
    are probed by :func:`probe_by_channels`; the parameters are the same.
    """
    agents = [n for n in names if n in pool.probes] if not peers and head_port is None else []
    rest = [n for n in names if n not in agents]
    result = await probe_by_channels(pool, rest, scheduler_host=scheduler_host, peers=peers, head_port=head_port)
    if agents:
        # Each resolves at its agent's probe line, or with None when its start failed first;
        # the deadline covers an agent start that never ran (cancelled before it began).
        waiting = [pool.probes[n] for n in agents]
        done, _ = await asyncio.wait(waiting, timeout=pool.agent_timeout + PROBE_SLACK)
        found = [f.result() if f in done and not f.cancelled() else None for f in waiting]
        for name, probe in zip(agents, found):
            if probe is None:
                continue  # did not answer: left out, as below
            result.via[name] = pool.connection(name).via
            result.to_head[name] = probe["to_head"]
            if scheduler_host is None or name == scheduler_host:
                result.from_head[name] = probe["from_head"]
        await pool.stop_probing()
    timeline.stamp("reach_probed")
    return result


async def probe_by_channels(
    pool: AgentPool,
    names: Sequence[str],
    *,
    scheduler_host: str | None = None,
    peers: bool = False,
    head_port: int | None = None,
) -> ReachProbe:
    """Probe hosts ``names`` over their SSH connections (opened when needed).

    Parameters
    ----------
    pool
        The cluster's (or ``check``'s) agent pool.
    names
        Hosts to probe; the ones that do not answer are left out.
    scheduler_host
        Probe whether the head reaches a port this host listens on; ``None``
        probes that for every host (a scheduler on the head connects to each).
    peers
        Also probe whether each host reaches a port every other host listens on.
    head_port
        A port the head listens on; ``None`` opens a stand-in for the probe.
    """
    result = ReachProbe()
    if not names:
        return result

    async def connect(name: str) -> None:
        # One connect timeout at most: a start already connecting holds the connection's lock.
        host = pool.table.specs[name]
        await asyncio.wait_for(pool.connection(name).open(), (pool.settings.connect_timeout or host.connect_timeout) + 2)

    # Connections only, no agents: a probe must not change what the cluster knows of its hosts.
    started = await asyncio.gather(*(connect(n) for n in names), return_exceptions=True)
    up = [n for n, r in zip(names, started) if not isinstance(r, BaseException)]
    # A host that does not answer is left out (its own start reports why); anything else is a bug.
    quiet = (HostError, asyncio.TimeoutError, TimeoutError)
    odd = [(n, r) for n, r in zip(names, started) if isinstance(r, BaseException) and not isinstance(r, quiet)]
    log_failures([r for _, r in odd], [n for n, _ in odd], logger, "reach probe")
    for name in up:
        result.via[name] = pool.connection(name).via
    listener: asyncio.AbstractServer | None = None
    if head_port is None:
        # A stand-in for the scheduler's port: can each host open a connection to the head?
        # Both families on one port: a host reached over IPv6 probes the head over IPv6.
        listener = await asyncio.start_server(lambda r, w: w.close(), sock=families.listen_socket())
        head_port = int(listener.sockets[0].getsockname()[1])
    try:
        async def to_head(name: str) -> None:
            if pool.table.specs[name].is_local:
                result.to_head[name] = ""  # the head itself
                return
            address = pool.head_address_for(name)
            if not address:
                result.to_head[name] = "no address of the head is known from this host"
                return
            target = _target(address, head_port)
            found = await connect_from(pool, name, [target])
            if found is not None:  # else the host counts as not answering
                why = found[target]
                result.to_head[name] = f"cannot reach the head at {target}: {why}" if why else ""

        # Both directions at once: each costs a python start on the host, and
        # the two do not depend on each other (this runs before every start).
        targets = [scheduler_host] if scheduler_host is not None else list(up)
        targets = [t for t in targets if t in up and not pool.table.specs[t].is_local]
        found = await asyncio.gather(
            asyncio.gather(*(_head_reaches(pool, t) for t in targets)),
            *(to_head(n) for n in up),
        )
        answered = dict(zip(targets, found[0]))
    finally:
        if listener is not None:
            listener.close()
            await listener.wait_closed()
    # A host that did not answer the first probe counts as not answering.
    result.from_head.update({t: why for t, why in answered.items() if t in result.to_head})
    if peers and len(up) > 1:
        result.peers = await peer_probe(pool, up)
        if any(result.peers.values()) and all(n in pool.agents for n in up):
            # Hosts with both families may reach each other over the one their SSH links do not use.
            found = await peerfamily.try_other_family(pool, {n: pool.agents[n] for n in up}, result.peers, peer_probe)
            if found is not None:
                result.peer_family, result.peers = found[0], {n: {} for n in up}
    return result


async def _head_reaches(pool: AgentPool, name: str) -> str:
    """``""`` when the head can connect to a port host ``name`` listens on, else why not."""
    try:
        async with _Listener(pool, name) as listener:
            if listener.port is None:
                return "no probe listener could be started there"
            address = _listen_address(pool, name)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(address, listener.port), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
                what = "no answer" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else (exc.strerror or str(exc))
                return f"{_target(address, listener.port)}: {what}"
            writer.close()
            return ""
    except (HostError, asyncio.TimeoutError, TimeoutError) as exc:
        return exc.reason if isinstance(exc, HostError) else "the probe listener did not start"


async def peer_probe(
    pool: AgentPool, names: Sequence[str], addresses: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """Host -> {peer: why not}: every host connects to a port each of its peers listens on.

    ``addresses`` (host -> address) are where the peers are tried; by default
    each host's end of its SSH link.
    """
    async with contextlib.AsyncExitStack() as stack:
        listeners: dict[str, _Listener] = {}
        opened = await asyncio.gather(
            *(stack.enter_async_context(_Listener(pool, n)) for n in names), return_exceptions=True
        )
        for name, item in zip(names, opened):
            if isinstance(item, _Listener) and item.port is not None:
                listeners[name] = item
        where = {n: (addresses or {}).get(n) or _listen_address(pool, n) for n in listeners}
        targets = {n: _target(where[n], listeners[n].port or 0) for n in listeners}

        async def one(name: str) -> tuple[str, dict[str, str]]:
            wanted = {targets[p]: p for p in listeners if p != name}
            found = await connect_from(pool, name, list(wanted)) or {}
            return name, {wanted[t]: why for t, why in found.items() if why}

        pairs = await asyncio.gather(*(one(n) for n in names))
    return dict(pairs)


def peer_problem(name: str, unreachable: Mapping[str, str], total_peers: int) -> str:
    """The one line ``check`` prints for a host that cannot reach some of its peers."""
    peers = sorted(unreachable)
    first = peers[0]
    which = "any of its peers" if len(peers) == total_peers else f"its peer{'s' if len(peers) > 1 else ''} {_names(peers)}"
    return (
        f"cannot reach {which} ({first}: {unreachable[first]}); dask workers must reach each other directly, "
        "so open TCP between the hosts"
    )
