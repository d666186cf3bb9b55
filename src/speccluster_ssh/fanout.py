"""Who sends a wheelhouse to whom: the head to a few hosts, hosts to the others.

Hosts of one cluster reach each other directly (dask workers must), so a host
whose wheel store holds a wheelhouse can serve it to the others over TLS with
the cluster's CA (``agent/wheelpeer.py``). The head then sends the wheels to
at most ``direct`` hosts; every host that finishes serves up to ``per_peer``
others at a time, so the number of hosts holding the wheels about multiplies
by ``per_peer + 1`` each round, while the head's bytes stay at ``direct``
times the wheelhouse (16 cold hosts: at most ``direct`` = 2 or 3 sends).

A failed fetch from a peer falls back to the head for that host (over the SSH
channel, always there); a peer that failed ``max_peer_failures`` fetches is
offered to nobody else. The head also sends beyond ``direct`` when no host
could ever serve (no peer, none in flight): waiting would never end.

:class:`FanoutPlan` is the plan as a state machine, pure (no I/O, no clock),
for any order in which fetches end; :func:`plan_waves` runs it with every
fetch taking as long (what ``plan`` would show); :class:`FanoutCoordinator`
hands its decisions to the concurrent starts of a start-up (asyncio, still no
I/O). One plan serves one wheelhouse: hosts of another target have their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Hosts the head sends a wheelhouse to itself (when no peer serves it yet).
DEFAULT_DIRECT = 2
#: Fetches one peer serves at once.
DEFAULT_PER_PEER = 3
#: Failed fetches after which a peer is offered to nobody else.
DEFAULT_MAX_PEER_FAILURES = 2


@dataclass(frozen=True)
class Source:
    """Where one host gets its wheels: the head (``peer`` None) or a peer host's server.

    Attributes
    ----------
    peer
        The serving host's inventory name, ``None`` for the head.
    address
        The peer server's ``host:port`` (``None`` for the head).
    fallback
        The head, because a fetch from a peer failed (or no peer could ever serve).
    """

    peer: str | None = None
    address: str | None = None
    fallback: bool = False

    @property
    def is_head(self) -> bool:
        return self.peer is None


HEAD = Source()


@dataclass
class _Peer:
    address: str
    active: int = 0
    served: int = 0
    failures: int = 0


@dataclass
class FanoutPlan:
    """The fan-out of one wheelhouse, as a state machine.

    Hosts that need the wheels :meth:`want` them; :meth:`assign` says which of
    them start now and from where; :meth:`finished` records how each fetch
    ended (and the server a host then runs, which makes it a peer). Hosts that
    already hold the wheels and serve them join with :meth:`add_peer`.

    Parameters
    ----------
    direct
        Hosts the head sends the wheels to when no peer can (its budget;
        fallbacks after a failed peer fetch are on top).
    per_peer
        Fetches one peer serves at once.
    max_peer_failures
        Failed fetches after which a peer is no longer offered.
    """

    direct: int = DEFAULT_DIRECT
    per_peer: int = DEFAULT_PER_PEER
    max_peer_failures: int = DEFAULT_MAX_PEER_FAILURES
    waiting: list[str] = field(default_factory=list)
    in_flight: dict[str, Source] = field(default_factory=dict)
    peers: dict[str, _Peer] = field(default_factory=dict)
    #: Every assignment made, in order: (host, source); a host appears twice after a fallback.
    history: list[tuple[str, Source]] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    head_sends: int = 0  # within the budget
    head_fallbacks: int = 0  # beyond it
    _retry_from_head: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.direct < 1 or self.per_peer < 1 or self.max_peer_failures < 1:
            raise ValueError("direct, per_peer and max_peer_failures must be at least 1")

    def add_peer(self, name: str, address: str) -> None:
        """``name`` holds the wheels and serves them at ``address``."""
        self.peers.setdefault(name, _Peer(address)).address = address

    def want(self, name: str) -> None:
        """``name`` needs the wheels (again, if a fetch of it failed and it retries)."""
        if name in self.in_flight or name in self.waiting:
            return
        self.done.discard(name)
        self.failed.discard(name)
        self.waiting.append(name)

    def withdraw(self, name: str) -> None:
        """``name`` gave up (its start was cancelled): it neither waits nor fetches, and blames nobody."""
        if name in self.waiting:
            self.waiting.remove(name)
        source = self.in_flight.pop(name, None)
        if source is None:
            return
        if source.peer is not None and source.peer in self.peers:
            self.peers[source.peer].active -= 1
        elif source.fallback:
            self.head_fallbacks -= 1
        elif source.is_head:
            self.head_sends -= 1  # the head sent nothing: the budget is not spent

    def _free_peer(self, name: str) -> str | None:
        """The peer with room that served least so far (then the least busy, then the first added)."""
        free = [
            (peer.served, peer.active, i, key)
            for i, (key, peer) in enumerate(self.peers.items())
            if key != name and peer.active < self.per_peer and peer.failures < self.max_peer_failures
        ]
        return min(free)[3] if free else None

    def _could_serve_later(self) -> bool:
        """A usable peer exists (busy now), or a host in flight may become one."""
        usable = any(p.failures < self.max_peer_failures for p in self.peers.values())
        return usable or bool(self.in_flight)

    def assign(self) -> list[tuple[str, Source]]:
        """The hosts that start fetching now, each with its source, in the order they asked."""
        started: list[tuple[str, Source]] = []
        for name in list(self.waiting):
            source: Source | None = None
            if name in self._retry_from_head:
                source = Source(fallback=True)
            elif (peer := self._free_peer(name)) is not None:
                source = Source(peer, self.peers[peer].address)
                self.peers[peer].active += 1
                self.peers[peer].served += 1
            elif self.head_sends < self.direct:
                source = HEAD
            elif not self._could_serve_later():
                source = Source(fallback=True)
            if source is None:
                continue  # waits for a peer to free up or to appear
            if source.is_head:
                if source.fallback:
                    self.head_fallbacks += 1
                else:
                    self.head_sends += 1
            self.waiting.remove(name)
            self.in_flight[name] = source
            self.history.append((name, source))
            started.append((name, source))
        return started

    def finished(self, name: str, ok: bool, address: str | None = None) -> None:
        """How ``name``'s fetch ended.

        Parameters
        ----------
        name
            The host.
        ok
            Its wheel store is complete.
        address
            The server it now runs for the others (``host:port``), if any.
            A host that failed from a peer gets the head when it wants again.
        """
        source = self.in_flight.pop(name, None)
        if source is None:
            return
        peer = self.peers.get(source.peer) if source.peer is not None else None
        if peer is not None:
            peer.active -= 1
        self._retry_from_head.discard(name)
        if ok:
            self.done.add(name)
            if address:
                self.add_peer(name, address)
        elif peer is not None:
            peer.failures += 1
            self._retry_from_head.add(name)  # its next want() gets the head
        else:
            self.failed.add(name)  # the head's own send failed: the host's start reports why

    def drop_peer(self, name: str) -> None:
        """``name``'s server is gone: offer it to nobody else."""
        peer = self.peers.get(name)
        if peer is not None:
            peer.failures = self.max_peer_failures

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing is in flight."""
        return not self.waiting and not self.in_flight


def plan_waves(
    needing: Iterable[str],
    have: Iterable[str] = (),
    direct: int = DEFAULT_DIRECT,
    per_peer: int = DEFAULT_PER_PEER,
) -> list[list[tuple[str, Source]]]:
    """The fan-out when every fetch takes as long: the rounds of fetches, each ``(host, source)``.

    Parameters
    ----------
    needing
        Hosts that lack the wheels.
    have
        Hosts that hold them and serve them from the start.
    direct, per_peer
        As for :class:`FanoutPlan`.

    Returns
    -------
    list of list
        Round by round, the hosts that fetch in it and from where; every
        host of ``needing`` appears once.
    """
    plan = FanoutPlan(direct=direct, per_peer=per_peer)
    for name in have:
        plan.add_peer(name, name)
    for name in needing:
        plan.want(name)
    waves: list[list[tuple[str, Source]]] = []
    while plan.waiting:
        wave = plan.assign()
        if not wave:  # cannot happen (the head serves when nothing else can); never loop forever
            raise RuntimeError(f"fan-out stalled with {plan.waiting} waiting")
        waves.append(wave)
        for name, _ in wave:
            plan.finished(name, ok=True, address=name)
    return waves


class FanoutCoordinator:
    """Hands :class:`FanoutPlan`'s decisions to the concurrent starts of one wheelhouse.

    Each host's start awaits :meth:`source_for`, fetches, then calls
    :meth:`finished` (always, also when it failed or was cancelled: use
    ``try``/``finally``), with its server's address once it serves.

    Parameters
    ----------
    plan
        The plan (a fresh :class:`FanoutPlan` when ``None``).
    """

    def __init__(self, plan: FanoutPlan | None = None) -> None:
        self.plan = plan if plan is not None else FanoutPlan()
        self._waiters: dict[str, asyncio.Future[Source]] = {}

    async def source_for(self, name: str) -> Source:
        """Wait until ``name`` may fetch, and say from where."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[name] = future
        self.plan.want(name)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            self._waiters.pop(name, None)
            self.plan.withdraw(name)  # waiting, or assigned just as it was cancelled
            self._dispatch()
            raise

    def finished(self, name: str, ok: bool, address: str | None = None) -> None:
        """``name``'s fetch ended; with ``address``, it now serves the others there.

        After a failed fetch from a peer, the host's next :meth:`source_for` gets the head.
        """
        self.plan.finished(name, ok, address)
        self._dispatch()

    def add_peer(self, name: str, address: str) -> None:
        """A host that already holds the wheels serves them at ``address``."""
        self.plan.add_peer(name, address)
        self._dispatch()

    def withdraw(self, name: str) -> None:
        """``name``'s start was cancelled while it fetched: its slot goes to another, nobody is blamed."""
        self.plan.withdraw(name)
        self._dispatch()

    def drop_peer(self, name: str) -> None:
        """``name`` no longer serves."""
        self.plan.drop_peer(name)
        self._dispatch()

    def _dispatch(self) -> None:
        gave_back = True
        while gave_back:  # a slot given back by a start that is gone goes to the next one
            gave_back = False
            for name, source in self.plan.assign():
                future = self._waiters.pop(name, None)
                if future is not None and not future.done():
                    future.set_result(source)
                else:
                    self.plan.withdraw(name)
                    gave_back = True
