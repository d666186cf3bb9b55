"""Which address family the hosts reach each other over, when they have both (issue 26).

The head picks a host's family when it connects over SSH
(:mod:`speccluster_ssh.families`), and the host's workers listen and are
reached at the host's end of that link. A dual-stack lab may block one
family between the hosts only (IPv4 open between the head and each host,
firewalled between hosts): workers on that family then cannot fetch data
from each other.

Each agent reports its global addresses of each family (``addresses`` in its
hello). When every host has addresses of both families and the peer probe
over the SSH links' family fails, it is run once more over the other
family; when that one works, the cluster uses it between hosts: workers (and
a scheduler on a host) listen on the host's address of that family, and the
head's scheduler is given to each host at the head's address of that family
on its link. Hosts of one family cost nothing more: no second probe, and at
the start no peer probe at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import families
from .addresses import family, family_name

if TYPE_CHECKING:
    from .agent import HostAgent

#: :func:`speccluster_ssh.reach.peer_probe`: (pool, hosts, addresses) -> host -> {peer: why not}.
PeerProbe = Callable[..., Awaitable[dict[str, dict[str, str]]]]


class AgentPool(Protocol):
    """What this module uses of :class:`speccluster_ssh.pool.AgentPool` (which imports this module)."""

    table: Any
    peer_family: PeerFamily | None
    head_addresses: dict[str, str]

    def agent_starts(self, names: Sequence[str]) -> Mapping[str, asyncio.Future[HostAgent]]: ...

logger = logging.getLogger(__name__)

__all__ = ["PeerFamily", "address_of_family", "adopt", "choose_at_start", "other_addresses", "try_other_family", "use"]


@dataclass(frozen=True)
class PeerFamily:
    """The hosts reach each other over ``family`` only; ``blocked`` failed between ``hosts``.

    Attributes
    ----------
    family
        4 or 6: the family the cluster uses between hosts.
    hosts
        The hosts between which the other family failed.
    """

    family: int
    hosts: tuple[str, ...]

    @property
    def blocked(self) -> int:
        """The family that failed between the hosts."""
        return 4 if self.family == 6 else 6

    def describe(self) -> str:
        """E.g. ``IPv6 between hosts (IPv4 blocked between h1, h2)``: ``check``'s line and the log's."""
        return (f"{family_name(self.family)} between hosts "
                f"({family_name(self.blocked)} blocked between {', '.join(self.hosts)})")


def address_of_family(facts: Mapping[str, Any], version: int) -> str | None:
    """The host's first global address of family ``version`` (4 or 6) from its agent's facts; ``None`` without one."""
    found = facts.get("addresses")
    listed = found.get(str(version)) if isinstance(found, Mapping) else None
    if isinstance(listed, list) and listed and family(str(listed[0])) == version:
        return str(listed[0])
    return None


def other_addresses(pool: AgentPool, agents: Mapping[str, HostAgent]) -> dict[str, str] | None:
    """Host -> its address of the family its SSH link does not use; ``None`` unless every host has one.

    Also ``None`` when the links are not all of one family, or one host is the head itself.
    """
    out: dict[str, str] = {}
    links = set()
    for name, agent in agents.items():
        if pool.table.specs[name].is_local:
            return None
        link = family(str(agent.facts.get("listen_address") or ""))
        if link is None:
            return None
        links.add(link)
        other = address_of_family(agent.facts, 6 if link == 4 else 4)
        if other is None:
            return None
        out[name] = other
    return out if len(links) == 1 else None


async def try_other_family(
    pool: AgentPool, agents: Mapping[str, HostAgent], failed: Mapping[str, Mapping[str, str]], peer_probe: PeerProbe
) -> tuple[PeerFamily, dict[str, str]] | None:
    """After a peer probe that ``failed`` over the links' family: do the hosts reach each other over the other?

    Returns
    -------
    (PeerFamily, addresses) or None
        The family that works between every pair and each host's address of
        it; ``None`` when nothing failed, a host lacks the other family (no
        probe then), or the other family fails too.
    """
    names = list(agents)
    if not any(failed.get(n) for n in names):
        return None
    others = other_addresses(pool, agents)
    if others is None:
        return None
    second = await peer_probe(pool, names, addresses=others)
    if set(second) != set(names) or any(second.values()):
        logger.info("the hosts' other address family does not help between them: %s", second)
        return None
    hosts = sorted({n for n in names if failed.get(n)} | {p for n in names for p in failed.get(n, {})})
    return PeerFamily(family(next(iter(others.values()))) or 6, tuple(hosts)), others


def use(pool: AgentPool, choice: PeerFamily, addresses: Mapping[str, str], agents: Mapping[str, HostAgent]) -> None:
    """Make the hosts ``addresses`` name listen there, and reach the head over the same family.

    Workers (and a scheduler on a host) take the agent's ``listen_address``;
    the head's scheduler address for a host is the head's own address of
    that family on the route to it (none: the host keeps the SSH link's).
    """
    pool.peer_family = choice
    for name, address in addresses.items():
        _listen_at(pool, name, agents[name], address)
    logger.info("address family: %s; the workers use it", choice.describe())


def _listen_at(pool: AgentPool, name: str, agent: HostAgent, address: str) -> None:
    agent.facts["listen_address"] = address
    try:
        source = families.route_source(address)
    except OSError:
        source = None
    if source:
        pool.head_addresses[name] = source


def adopt(pool: AgentPool, name: str, agent: HostAgent) -> None:
    """A host whose agent starts after the choice (healed, added) follows it when it has that family."""
    choice = pool.peer_family
    if choice is None or pool.table.specs[name].is_local:
        return
    if family(str(agent.facts.get("listen_address") or "")) == choice.family:
        return
    address = address_of_family(agent.facts, choice.family)
    if address is not None:
        _listen_at(pool, name, agent, address)


async def _dual_stack_agents(pool: AgentPool, names: Sequence[str], timeout: float) -> dict[str, HostAgent] | None:
    """The agents of ``names`` that start within ``timeout``; ``None`` as soon as one has a single family."""
    starts = pool.agent_starts(names)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending: set[asyncio.Future[HostAgent]] = set(starts.values())
    while pending:
        # Not cancelled at the deadline: a start goes on for whoever claims it.
        done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()),
                                           return_when=asyncio.FIRST_COMPLETED)
        if not done:
            break
        for name, start in starts.items():
            if start in done and not start.cancelled() and start.exception() is None:
                if other_addresses(pool, {name: start.result()}) is None:
                    return None  # a host of one family: nothing to choose, and no probe
    return {n: s.result() for n, s in starts.items() if s.done() and not s.cancelled() and s.exception() is None}


async def choose_at_start(
    pool: AgentPool, names: Sequence[str], timeout: float, peer_probe: PeerProbe
) -> PeerFamily | None:
    """At a cluster's start: the family between hosts, when they have two and the links' one fails between them.

    Waits for the agents of ``names`` that are starting (their outcome left to
    whoever claims it), and ends at the first one of a single family: labs of
    one family wait for one agent's hello, and probe nothing. ``peer_probe``
    is :func:`speccluster_ssh.reach.peer_probe` (which imports this module).
    """
    up = await _dual_stack_agents(pool, names, timeout)
    if up is None or len(up) < 2 or other_addresses(pool, up) is None:
        return None
    links = {n: str(a.facts.get("listen_address")) for n, a in up.items()}
    first = await peer_probe(pool, list(up), addresses=links)
    found = await try_other_family(pool, up, first, peer_probe)
    if found is None:
        return None
    use(pool, *found, up)
    return found[0]
