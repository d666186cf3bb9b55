"""The healer's decisions, with no I/O: a snapshot goes in, actions come out.

Split from the healer (:mod:`speccluster_ssh.healer`) as distributed splits
``AdaptiveCore`` (what to do) from ``Adaptive`` (doing it). A pass of the
healer reads the cluster into a :class:`Snapshot` (its hosts' health and its
entries' processes), asks :meth:`HealingCore.plan` what to do, and carries
out the actions in order. The core holds the
:class:`~speccluster_ssh.health.FailureLedger`, which remembers failed
starts from one pass to the next.

The rules, in the order of a pass:

- **Host retries.** A host is due when it is ``down``, its retry time has
  come, it is wanted (a worker host, or the host of an entry) and no retry
  of it is in flight. When its next retry comes is not decided here: the
  host's own state schedules it (:meth:`~speccluster_ssh.health.HostState.schedule_retry`).
- **Dead entries.** An entry whose process failed or closed is dropped (its
  process closed, its names removed from the scheduler). If it never started
  on a usable host, the failed start is charged to the host or to the entry
  (the ledger's verdict): the host may be put aside, hosts the entry put
  aside may be taken back, the entry may back off. If its process's host is
  unusable (even just put aside), the entry moves, or starts again in place
  when its spec already names a usable worker host.
- **Entries without room.** An entry whose lease claim found its host held
  by other clusters is dropped and leaves the spec, uncharged: the lease
  watcher grows the cluster again when a slot is free for it.
- **Stranded entries.** An entry without a process whose host is unusable
  (placed there before the host went down) moves.
- **Reconcile** when the cluster runs and some entry has no process.

*Moving* is the executor's: where an entry goes is placement's decision
(:func:`speccluster_ssh.entries.place_entry`); the plan says which entries
leave which host.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, Union

from .health import FailureLedger, Health, retry_due


class Process(str, enum.Enum):
    """What runs for an entry: nothing yet, a process (starting or running), or a dead one."""

    NONE = "none"
    RUNNING = "running"
    DEAD = "dead"


@dataclass(frozen=True)
class HostView:
    """One host as the healer sees it at the start of a pass."""

    name: str
    health: Health = Health.UP
    drained: bool = False
    retry_at: float = 0.0
    retrying: bool = False  # a retry of this host is in flight

    @property
    def usable(self) -> bool:
        """The rule of :attr:`~speccluster_ssh.health.HostState.usable`."""
        return self.health not in (Health.DOWN, Health.ASIDE) and not self.drained


@dataclass(frozen=True)
class EntryView:
    """One spec entry and its process, as the healer sees it at the start of a pass."""

    key: Any
    host: str | None  # the host its spec names
    process: Process = Process.NONE
    process_host: str | None = None  # where its process runs (may differ from ``host`` after a move)
    started: bool = False  # its process started at least one member
    start_error: str = ""  # the last error of a failed start, not yet charged
    lease_short: bool = False  # its claim found no room: other clusters hold its host (no failure)


@dataclass(frozen=True)
class Snapshot:
    """Everything :meth:`HealingCore.plan` reads: plain values, no live objects.

    ``hosts`` are the hosts with a health (in the pool's order),
    ``worker_hosts`` the inventory's worker hosts, ``entries`` the spec's
    entries in spec order. ``pass_retry_at`` is when the healer retries
    a pass that failed (0 when none did).
    """

    hosts: tuple[HostView, ...] = ()
    worker_hosts: frozenset[str] = frozenset()
    entries: tuple[EntryView, ...] = ()
    running: bool = True  # the cluster's status is running
    pass_retry_at: float = 0.0


# -- actions, carried out by the healer in the order given ---------------------------------------
@dataclass(frozen=True)
class RetryHost:
    """Try to start the agent of ``host`` again, in the background."""

    host: str


@dataclass(frozen=True)
class DropDeadEntry:
    """Close entry ``key``'s dead process, forget it and remove its names from the scheduler."""

    key: Any


@dataclass(frozen=True)
class ChargeStartFailure:
    """Entry ``key`` failed to start on ``host``: record it on the host and say ``message``."""

    key: Any
    host: str
    cause: str
    message: str


@dataclass(frozen=True)
class RestoreHost:
    """Take ``host`` back from aside: entry ``key`` was found to fail by itself."""

    host: str
    key: Any


@dataclass(frozen=True)
class BackOffEntry:
    """Entry ``key`` fails by itself and waits ``retry_in`` seconds (the ledger keeps the time)."""

    key: Any
    retry_in: float
    message: str


@dataclass(frozen=True)
class PutHostAside:
    """Put ``host`` aside: entries failed to start there again and again."""

    host: str
    reason: str


@dataclass(frozen=True)
class StartAgainInPlace:
    """Entry ``key``'s spec already names the usable host ``host``: it starts again there."""

    key: Any
    host: str


@dataclass(frozen=True)
class MoveEntry:
    """Move entry ``key`` off the unusable host ``host`` to a free slot, if there is one."""

    key: Any
    host: str | None


@dataclass(frozen=True)
class ForgetShortEntry:
    """Entry ``key`` found no room on its host: it leaves the spec, and the cluster waits for a free slot."""

    key: Any


@dataclass(frozen=True)
class Reconcile:
    """Start the entries that have no process (the cluster's reconcile)."""


Action = Union[
    RetryHost, DropDeadEntry, ChargeStartFailure, RestoreHost, BackOffEntry, PutHostAside,
    StartAgainInPlace, MoveEntry, ForgetShortEntry, Reconcile,
]


def wanted_hosts(state: Snapshot) -> set[str]:
    """Hosts worth retrying: the worker hosts and every host an entry's spec names."""
    return set(state.worker_hosts) | {e.host for e in state.entries if e.host is not None}


def awaits_retry(host: HostView, wanted: Collection[str]) -> bool:
    """Whether ``host`` waits for a retry: ``down``, wanted, and no retry of it in flight."""
    return host.health == Health.DOWN and host.name in wanted and not host.retrying


def is_due(host: HostView, wanted: Collection[str], now: float) -> bool:
    """The retry rule: ``host`` waits for a retry (:func:`awaits_retry`) and its retry time has come."""
    return awaits_retry(host, wanted) and retry_due(host.health, host.retry_at, now)


class _Hosts:
    """The plan's own view of the hosts, changed by the actions it has decided so far."""

    def __init__(self, state: Snapshot) -> None:
        self.views = {h.name: h for h in state.hosts}
        self.worker_hosts = state.worker_hosts

    def known(self, name: str | None) -> bool:
        return name in self.views

    def health(self, name: str) -> Health | None:
        view = self.views.get(name)
        return view.health if view is not None else None

    def set_health(self, name: str, health: Health) -> None:
        self.views[name] = replace(self.views[name], health=health)

    def usable(self, name: str | None) -> bool:
        # A host without a health is not unavailable (see Healer.unavailable_hosts).
        view = self.views.get(name) if name is not None else None
        return view is None or view.usable

    def healthy(self) -> int:
        """Worker hosts that are up, as the ledger counts them."""
        return sum(1 for n, h in self.views.items() if h.health == Health.UP and n in self.worker_hosts)


@dataclass
class HealingCore:
    """Decides each healing pass; holds the failure ledger across passes.

    Parameters
    ----------
    failures
        The ledger of failed starts; a new one (on the monotonic clock) by default.
    """

    failures: FailureLedger = field(default_factory=FailureLedger)

    @classmethod
    def with_clock(cls, clock: Callable[[], float]) -> HealingCore:
        """A core whose ledger reads ``clock`` (tests)."""
        return cls(FailureLedger(clock=clock))

    def plan(self, state: Snapshot, now: float) -> list[Action]:
        """The actions of one pass, in the order to carry them out.

        Charging a failed start updates the ledger, so a snapshot is planned
        once. ``now`` is the monotonic time of the pass.
        """
        hosts = _Hosts(state)
        wanted = wanted_hosts(state)
        actions: list[Action] = [RetryHost(h.name) for h in state.hosts if is_due(h, wanted, now)]
        placed: set[Any] = set()  # entries already moved or started again in this pass
        for entry in state.entries:
            if entry.process != Process.DEAD:
                continue
            actions.append(DropDeadEntry(entry.key))
            if entry.lease_short:
                # Other clusters hold its host: no failure to charge, and waiting for a slot is the lease watcher's.
                actions.append(ForgetShortEntry(entry.key))
                placed.add(entry.key)
                continue
            actions.extend(self._charge(entry, hosts))
            if not hosts.usable(entry.process_host):
                actions.append(_replace(entry, hosts))
                placed.add(entry.key)
        # Entries placed on hosts that became unusable before they were created.
        for entry in state.entries:
            if entry.process != Process.RUNNING and entry.key not in placed and not hosts.usable(entry.host):
                actions.append(MoveEntry(entry.key, entry.host))
        if state.running and any(e.process != Process.RUNNING and not e.lease_short for e in state.entries):
            actions.append(Reconcile())
        return actions

    def _charge(self, entry: EntryView, hosts: _Hosts) -> list[Action]:
        """Account a dead entry's failed start, to its host or to itself.

        A process that started and then died, or one on a host that was lost,
        is no failed start: the first is relaunched, the second's host retried.
        """
        host = entry.process_host
        if entry.started or host is None or not hosts.known(host) or not hosts.usable(host):
            return []
        cause = entry.start_error or f"entry {entry.key} failed to start"
        verdict = self.failures.start_failed(str(entry.key), host, cause, hosts.healthy())
        actions: list[Action] = [ChargeStartFailure(entry.key, host, cause, verdict.message)]
        for name in verdict.restore_hosts:
            if hosts.health(name) == Health.ASIDE:
                hosts.set_health(name, Health.UP)
                actions.append(RestoreHost(name, entry.key))
        if verdict.entry_retry_in:
            actions.append(BackOffEntry(entry.key, verdict.entry_retry_in, verdict.message))
        if verdict.put_host_aside:
            hosts.set_health(host, Health.ASIDE)
            actions.append(PutHostAside(host, verdict.message))
        return actions

    def next_deadline(self, state: Snapshot, now: float) -> float:
        """When the next pass is due without any event: a retry time, or ``inf``.

        The retry times of hosts that are down (wanted, no retry in flight),
        the end of the backoff of entries without a process, and
        ``pass_retry_at``. A backoff already over was handled by the pass
        after it, so it does not count.
        """
        wanted = wanted_hosts(state)
        deadlines = [state.pass_retry_at] if state.pass_retry_at else []
        deadlines += [h.retry_at for h in state.hosts if awaits_retry(h, wanted)]
        for entry in state.entries:
            at = self.failures.retry_at(str(entry.key))
            if entry.process == Process.NONE and at > now:
                deadlines.append(at)
        return min(deadlines, default=math.inf)

    # -- questions the cluster asks, answered by the ledger ---------------------------------------
    def waiting(self, key: Any) -> bool:
        """Whether entry ``key`` is backing off after failing by itself."""
        return self.failures.waiting(str(key))

    def problem(self, key: Any) -> str:
        """Entry ``key``'s own problem, when it was found to have one."""
        return self.failures.problem(str(key))

    def entry_started(self, key: Any, host: str) -> None:
        """Entry ``key`` started on ``host``: its problem and the host's failure streak end."""
        self.failures.start_succeeded(str(key), host)


def _replace(entry: EntryView, hosts: _Hosts) -> Action:
    """A dead entry on an unusable host moves, unless its spec already names a usable worker host.

    Its spec names another host when it was moved there while its old
    process was still starting on the lost one: it starts again there.
    """
    if entry.host is not None and entry.host in hosts.worker_hosts and hosts.usable(entry.host):
        return StartAgainInPlace(entry.key, entry.host)
    return MoveEntry(entry.key, entry.host)
