"""The host table: every host a cluster knows, with one owner.

One :class:`HostRecord` per host holds its spec from the inventory, whether
it runs workers (or only the scheduler), its health
(:class:`~speccluster_ssh.health.HostState`), and the connection and agent
the pool made for it. :class:`HostTable`'s methods are the only way to change
any of these: the pool records the agents and connections it starts, and
reload, operations, the healer and startup add, forget, drain or put aside
hosts through it. Everything else reads the table through live, read-only
views (:attr:`HostTable.workers`, :attr:`HostTable.states`, ...), so no
module edits a dictionary that another one keeps in step.

Shaped like Ray's ``NodeProvider``: a small interface of mechanisms, with
the policy (when to retry, what to move where) decided by its callers and
by :func:`~speccluster_ssh.health.next_retry`, the one retry rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .health import Health, HostState, retry_due

if TYPE_CHECKING:
    from .agent import HeldLease, HostAgent
    from .leases import Lease
    from .connection import HostConnection
    from .inventory import HostSpec, Inventory

T = TypeVar("T")


@dataclass
class HostRecord:
    """What the cluster knows of one host; a field per fact."""

    spec: HostSpec
    worker: bool  # runs workers; False for a scheduler-only host
    state: HostState
    connection: HostConnection | None = None
    agent: HostAgent | None = None
    # Who holds the host: every cluster's live leases and wants as its agent last listed them, and when.
    leases: tuple[Lease, ...] = ()
    leases_seen: float = 0.0
    # This cluster's leases there, by entry name, each with the agent that holds it; and its want.
    held: dict[str, tuple[HostAgent, HeldLease]] = field(default_factory=dict)
    want: tuple[HostAgent, HeldLease] | None = None


class HostView:
    """A live, read-only view of one host's :class:`~speccluster_ssh.health.HostState`."""

    __slots__ = ("_state",)

    def __init__(self, state: HostState) -> None:
        self._state = state

    name = property(lambda self: self._state.name)
    state = property(lambda self: self._state.state, doc="The host's :class:`~speccluster_ssh.health.Health`.")
    reason = property(lambda self: self._state.reason)
    fix = property(lambda self: self._state.fix)
    tail = property(lambda self: self._state.tail)
    drained = property(lambda self: self._state.drained)
    retry_at = property(lambda self: self._state.retry_at)
    backoff = property(lambda self: self._state.backoff)
    usable = property(lambda self: self._state.usable)

    @property
    def failures(self) -> tuple[tuple[float, str], ...]:
        """The last failures, ``(time, reason)``, oldest first."""
        return tuple(self._state.failures)

    def as_dict(self) -> dict[str, Any]:
        return self._state.as_dict()

    def __repr__(self) -> str:
        return f"<HostView {self.name}: {self.state}{' (drained)' if self.drained else ''}>"


class _View(Mapping[str, T], Generic[T]):
    """A live, read-only mapping of host name -> one field of its record (hosts where it is ``None`` left out)."""

    def __init__(self, records: Mapping[str, HostRecord], get: Callable[[HostRecord], T | None]) -> None:
        self._records = records
        self._get = get

    def __getitem__(self, name: str) -> T:
        value = self._get(self._records[name])
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (n for n, r in list(self._records.items()) if self._get(r) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


class HostTable:
    """Every host a cluster knows, in inventory order; its methods are the only way to change them.

    Parameters
    ----------
    specs
        The hosts, in inventory order.
    workers
        The names of those that run workers; default: all of them.
    inventory
        The inventory in effect (what a reload compares with), when there is one.
    """

    def __init__(
        self, specs: Iterable[HostSpec] = (), *, workers: Collection[str] | None = None, inventory: Inventory | None = None
    ) -> None:
        self._records: dict[str, HostRecord] = {}
        self._inventory = inventory
        # This cluster's lease claims not answered yet: the user quota counts them (a start claims all at once).
        self.claims_in_flight = 0
        for spec in specs:
            self.add(spec, worker=workers is None or spec.name in workers)
        self.specs: Mapping[str, HostSpec] = _View(self._records, lambda r: r.spec)
        self.workers: Mapping[str, HostSpec] = _View(self._records, lambda r: r.spec if r.worker else None)
        self.states: Mapping[str, HostView] = _View(self._records, lambda r: HostView(r.state))
        self.agents: Mapping[str, HostAgent] = _View(self._records, lambda r: r.agent)
        self.connections: Mapping[str, HostConnection] = _View(self._records, lambda r: r.connection)
        # Leases: every cluster's on each host (as last listed), and this cluster's own by entry name.
        self.leases: Mapping[str, tuple[Lease, ...]] = _View(self._records, lambda r: r.leases if r.leases_seen else None)
        self.held: Mapping[str, Mapping[str, HeldLease]] = _View(
            self._records, lambda r: {entry: lease for entry, (_, lease) in r.held.items()}
        )

    @classmethod
    def from_inventory(cls, inventory: Inventory) -> HostTable:
        """The worker hosts of ``inventory``, then its scheduler host (when it is not one of them)."""
        specs = list(inventory.worker_hosts)
        workers = {h.name for h in specs}
        sched = inventory.scheduler_host
        if sched is not None and sched.name not in workers:
            specs.append(sched)
        return cls(specs, workers=workers, inventory=inventory)

    @property
    def inventory(self) -> Inventory | None:
        """The inventory in effect: what the next reload compares with (see :meth:`adopt_inventory`)."""
        return self._inventory

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def _known(self, name: str) -> HostRecord:
        return self._records[name]

    # -- the hosts -------------------------------------------------------------------------------
    def add(self, spec: HostSpec, *, worker: bool = True) -> None:
        """Know host ``spec`` (a no-op for its health when it is known already: its spec is replaced)."""
        record = self._records.get(spec.name)
        if record is None:
            self._records[spec.name] = HostRecord(spec, worker, HostState(spec.name))
        else:
            record.spec, record.worker = spec, worker

    def replace_spec(self, name: str, spec: HostSpec) -> None:
        """Host ``name``'s variables changed (a reload); its health, agent and connection stay."""
        self._known(name).spec = spec

    def put_in_order(self, names: Iterable[str]) -> None:
        """Put the known hosts of ``names`` first, in that order (the inventory's order decides placement ties)."""
        first = [n for n in dict.fromkeys(names) if n in self._records]
        ordered = {n: self._records[n] for n in (*first, *(n for n in self._records if n not in first))}
        self._records.clear()  # the same dictionary: the views read it
        self._records.update(ordered)

    def forget(self, name: str) -> tuple[HostAgent | None, HostConnection | None]:
        """Forget host ``name``; the agent and connection it had, which the caller closes."""
        record = self._records.pop(name, None)
        return (record.agent, record.connection) if record is not None else (None, None)

    def adopt_inventory(self, inventory: Inventory) -> None:
        """``inventory`` is in effect now (a reload succeeded)."""
        self._inventory = inventory

    # -- agents and connections ------------------------------------------------------------------
    def set_connection(self, name: str, connection: HostConnection | None) -> HostConnection | None:
        """Record ``connection`` as host ``name``'s (``None``: it has none); the one it had."""
        record = self._known(name)
        old, record.connection = record.connection, connection
        return old

    def drop_connection(self, name: str) -> HostConnection | None:
        """Host ``name`` has no connection any more; the one it had (the caller closes it)."""
        record = self._records.get(name)
        return self.set_connection(name, None) if record is not None else None

    def renew_agent(self, name: str, agent: HostAgent) -> HostAgent | None:
        """``agent`` answered on host ``name`` and is its agent now: the host is up; the agent it had."""
        record = self._known(name)
        old, record.agent = record.agent, agent
        record.state.mark_up()
        return old

    def drop_agent(self, name: str) -> HostAgent | None:
        """Host ``name`` has no agent any more (it stops or was lost); the one it had."""
        record = self._records.get(name)
        if record is None:
            return None
        old, record.agent = record.agent, None
        # What that agent held ends with it.
        record.held = {e: held for e, held in record.held.items() if held[0] is not old}
        if record.want is not None and record.want[0] is old:
            record.want = None
        return old

    # -- leases ------------------------------------------------------------------------------------
    def see_leases(self, name: str, leases: Iterable[Lease], now: float | None = None) -> None:
        """Host ``name``'s agent listed these live leases and wants (every cluster's) just now."""
        record = self._records.get(name)
        if record is not None:
            record.leases = tuple(leases)
            record.leases_seen = time.monotonic() if now is None else now

    def hold(self, name: str, entry: str, agent: HostAgent, lease: HeldLease) -> None:
        """``agent`` holds ``lease`` on host ``name`` for entry ``entry`` (a claim was granted)."""
        record = self._known(name)
        record.held[entry] = (agent, lease)
        record.leases = (*(le for le in record.leases if le.lease_id != lease.lease_id), lease.lease)
        record.leases_seen = record.leases_seen or time.monotonic()

    def let_go(self, name: str, entry: str) -> tuple[HostAgent, HeldLease] | None:
        """Entry ``entry`` gives its lease on host ``name`` back; the agent and lease (the caller releases it)."""
        record = self._records.get(name)
        if record is None:
            return None
        released = record.held.pop(entry, None)
        if released is not None:
            record.leases = tuple(le for le in record.leases if le.lease_id != released[1].lease_id)
        return released

    def set_want(self, name: str, want: tuple[HostAgent, HeldLease] | None) -> tuple[HostAgent, HeldLease] | None:
        """This cluster waits on host ``name`` with ``want`` (``None``: no more); the want it had."""
        record = self._records.get(name)
        if record is None:
            return None
        old, record.want = record.want, want
        return old

    def wanting(self) -> dict[str, HeldLease]:
        """The hosts where this cluster records a want, with it."""
        return {n: r.want[1] for n, r in self._records.items() if r.want is not None}

    def lab_leases(self) -> list[Lease]:
        """Every live lease and want of every cluster on every host, as last listed."""
        # One machine may be listed under two names (local hosts): each lease once.
        unique = {(lease.host, lease.kind, lease.lease_id): lease for r in self._records.values() for lease in r.leases}
        return list(unique.values())

    # -- health ------------------------------------------------------------------------------------
    def mark_lost(self, name: str, reason: str, *, fix: str = "", tail: str = "", now: float | None = None) -> None:
        """Host ``name``'s agent is lost or cannot be started: it is down until its next retry (:func:`~speccluster_ssh.health.next_retry`)."""
        record = self._records.get(name)
        if record is not None:
            record.state.mark_down(reason, fix=fix, tail=tail, now=now)

    def record_failure(self, name: str, cause: str) -> None:
        """A start on host ``name`` failed with ``cause`` (kept for ``status``; the health stays)."""
        self._known(name).state.record_failure(cause)

    def put_aside(self, name: str, reason: str) -> None:
        """Host ``name`` failed to start workers again and again: nothing is placed there."""
        self._known(name).state.put_aside(reason)

    def restore(self, name: str) -> bool:
        """Take host ``name`` back from aside; whether it was aside."""
        record = self._records.get(name)
        if record is None or record.state.state != Health.ASIDE:
            return False
        record.state.restore()
        return True

    def drain(self, name: str, reason: str) -> str:
        """Take host ``name`` out of use, whatever its health; the reason ``status`` shows."""
        state = self._known(name).state
        state.drain(reason)
        return state.drained

    def undrain(self, name: str) -> str:
        """Undo :meth:`drain`; why the host was drained (``""``: it was not)."""
        state = self._known(name).state
        was = state.drained
        state.undrain()
        return was

    # -- questions ---------------------------------------------------------------------------------
    def unavailable(self) -> set[str]:
        """Hosts that are down, put aside or drained: nothing is placed or started there."""
        return {n for n, r in self._records.items() if not r.state.usable}

    def drained(self) -> dict[str, str]:
        """Drained host -> why."""
        return {n: r.state.drained for n, r in self._records.items() if r.state.drained}

    def due_for_retry(self, among: Collection[str], now: float | None = None) -> list[str]:
        """The hosts of ``among`` that are down and whose next attempt is due."""
        now = time.monotonic() if now is None else now
        return [n for n, r in self._records.items() if n in among and retry_due(r.state.state, r.state.retry_at, now)]

    def no_worker_answers(self) -> bool:
        """Whether every worker host was tried and is down or put aside."""
        return all(r.state.state in (Health.DOWN, Health.ASIDE) for r in self._records.values() if r.worker)
