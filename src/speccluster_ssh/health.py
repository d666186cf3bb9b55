"""Host health and start-failure accounting: pure logic, no I/O.

A host is ``new`` until its agent first answers, then ``up``; ``down`` when
its agent is lost or cannot be started (retried with backoff, see
:func:`next_retry`); ``aside`` when it failed to start workers again and
again while its agent answered.

The state of every host lives in :class:`speccluster_ssh.hosts.HostTable`,
whose methods are the only callers of :class:`HostState`'s.

Apart from its health, a host may be *drained* (:meth:`HostState.drain`):
taken out of use by the user (``speccluster-ssh drain``) or by a reload that
removed it from the inventory. Draining is a flag beside the health, not a
health of its own, because the two change independently: a drained host
still goes down and comes back up, and undraining it must give back the
health it has then. A drained host is not :attr:`~HostState.usable`, so
nothing is placed or started there.

The rule that decides whether a failed start is the host's fault
(:class:`FailureLedger`):

- A failure counts against a host only when it looks host-specific: a
  worker name still taken at the scheduler, for example, is not the host's
  fault. Three host-specific failures in a row put the host aside.
- An entry that fails the same way on two different hosts is the entry's
  problem: it backs off (2 s, doubling up to 60 s), its failures are no
  longer counted against any host, and the hosts it put aside come back.
- One entry never puts more than half of the healthy hosts aside.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAILURES_BEFORE_ASIDE = 3
ENTRY_BACKOFF_FIRST = 2.0
ENTRY_BACKOFF_MAX = 60.0
HOST_BACKOFF_FIRST = 1.0
HOST_BACKOFF_MAX = 60.0
# A host whose failure has a fix (see HostError.fix) is retried this rarely at first.
FIXABLE_BACKOFF_FIRST = 30.0
FIXABLE_BACKOFF_MAX = 300.0

# Causes that say nothing about the host the entry was started on.
_NOT_THE_HOST = ("name taken", "the cluster is closing")


def retry_due(health: Health, retry_at: float, now: float) -> bool:
    """Whether a host's next attempt is due: it is down and the time :func:`next_retry` set has come."""
    return health == Health.DOWN and now >= retry_at


def next_retry(backoff: float, fixable: bool, now: float) -> tuple[float, float]:
    """The retry rule of a host that went down: when to try it next, and the backoff after that.

    Every transition to ``down`` (a lost agent, a failed start, a failed
    retry) schedules the next attempt at ``now + backoff``; the backoff
    doubles from 1 s up to 60 s, and for a failure with a fix (the user
    must change something: retrying rarely is enough) from 30 s up to 300 s.
    Nothing else schedules a retry: the healer only attempts the hosts that
    are due.

    Parameters
    ----------
    backoff
        The host's backoff now (:data:`HOST_BACKOFF_FIRST` after it answered).
    fixable
        Whether the failure has a fix.
    now
        Monotonic time of the failure.

    Returns
    -------
    tuple
        ``(retry_at, next_backoff)``.
    """
    if fixable:
        backoff = min(max(backoff, FIXABLE_BACKOFF_FIRST), FIXABLE_BACKOFF_MAX)
    return now + backoff, min(backoff * 2, FIXABLE_BACKOFF_MAX if fixable else HOST_BACKOFF_MAX)


class Health(str, enum.Enum):
    """The states of a host. A ``str`` so that reports and JSON show the plain word."""

    NEW = "new"
    UP = "up"
    DOWN = "down"
    ASIDE = "aside"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class HostState:
    """What the cluster knows about one host: its health, why, and when to retry it.

    Every change of ``state`` goes through the methods below, which only
    :class:`speccluster_ssh.hosts.HostTable` calls.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = Health.NEW
        self.reason = ""
        self.fix = ""  # what the user must change, when retrying cannot help
        self.tail = ""  # the end of the remote log of the last failure, when there is one
        self.failures: list[tuple[float, str]] = []
        self.retry_at = 0.0
        self.backoff = HOST_BACKOFF_FIRST
        self.drained = ""  # why the host is drained; "" when it is not

    @property
    def usable(self) -> bool:
        """Whether entries may be placed and started here: healthy and not drained."""
        return self.state not in (Health.DOWN, Health.ASIDE) and not self.drained

    def drain(self, reason: str) -> None:
        """Take the host out of use (whatever its health); ``reason`` is shown by ``status``."""
        self.drained = reason.strip() or "drained"

    def undrain(self) -> None:
        """Undo :meth:`drain`: the host is usable again if it is healthy."""
        self.drained = ""

    def record_failure(self, reason: str) -> None:
        self.failures.append((time.time(), reason))
        del self.failures[:-10]

    def mark_up(self) -> None:
        self.state = Health.UP
        self.reason = ""
        self.fix = ""
        self.tail = ""
        self.backoff = HOST_BACKOFF_FIRST

    def mark_down(self, reason: str, fix: str = "", tail: str = "", now: float | None = None) -> None:
        """The agent is lost or cannot be started: the next attempt is scheduled (:func:`next_retry`).

        ``fix`` says what the user must change when retrying cannot help;
        such a host is retried rarely. ``now`` is the monotonic time (for tests).
        """
        self.state = Health.DOWN
        self.reason = reason
        self.fix = fix
        self.tail = tail[-4096:]
        self.record_failure(reason)
        self.retry_at, self.backoff = next_retry(self.backoff, bool(fix), time.monotonic() if now is None else now)

    def put_aside(self, reason: str) -> None:
        self.state = Health.ASIDE
        self.reason = reason

    def restore(self) -> None:
        """Undo :meth:`put_aside`: the failures were not the host's fault."""
        if self.state == Health.ASIDE:
            self.state = Health.UP
            self.reason = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reason": self.reason,
            "fix": self.fix,
            "tail": self.tail,
            "drained": self.drained,
            "failures": [{"time": t, "reason": r} for t, r in self.failures],
        }


def normalized_cause(cause: str) -> str:
    """A failure's text without the numbers that differ between hosts and tries."""
    return re.sub(r"0x[0-9a-f]+|\d+", "N", cause.lower()).strip()


def is_host_specific(cause: str) -> bool:
    """Whether a start failure may be the host's fault."""
    lowered = cause.lower()
    return not any(marker in lowered for marker in _NOT_THE_HOST)


@dataclass
class Verdict:
    """What to do after one failed start."""

    put_host_aside: bool = False
    entry_retry_in: float = 0.0
    restore_hosts: list[str] = field(default_factory=list)
    message: str = ""


@dataclass
class _EntryRecord:
    hosts_by_cause: dict[str, set[str]] = field(default_factory=dict)
    put_aside: set[str] = field(default_factory=set)
    retry_at: float = 0.0
    backoff: float = 0.0
    problem: str = ""


class FailureLedger:
    """Decides, failure by failure, whether a host or an entry is at fault.

    Parameters
    ----------
    failures_before_aside
        Host-specific failures in a row that put a host aside.
    clock
        Monotonic clock, replaceable in tests.
    """

    def __init__(self, failures_before_aside: int = FAILURES_BEFORE_ASIDE, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_before_aside = failures_before_aside
        self.clock = clock
        self._streaks: dict[str, list[str]] = {}  # host -> entries of its failures in a row
        self._entries: dict[str, _EntryRecord] = {}

    def start_failed(self, entry: str, host: str, cause: str, healthy_hosts: int) -> Verdict:
        """Account one failed start of ``entry`` on ``host``.

        ``healthy_hosts`` counts the hosts that are up now.
        """
        record = self._entries.setdefault(entry, _EntryRecord())
        hosts = record.hosts_by_cause.setdefault(normalized_cause(cause), set())
        hosts.add(host)
        if not is_host_specific(cause):
            return self._entry_at_fault(entry, record, cause, f"entry {entry} failed to start on {host}: {cause}")
        if len(hosts) >= 2:
            where = ", ".join(sorted(hosts))
            return self._entry_at_fault(entry, record, cause, f"entry {entry} fails the same way on {where}: {cause}")
        streak = self._streaks.setdefault(host, [])
        streak.append(entry)
        if len(streak) < self.failures_before_aside:
            return Verdict(message=f"entry {entry} failed to start on {host}: {cause}")
        # Half of the healthy hosts, counting those this entry already put aside.
        limit = (healthy_hosts + len(record.put_aside)) // 2
        if len(record.put_aside) + 1 > limit:
            # The hosts already aside stay there: their causes differed.
            return self._entry_at_fault(
                entry, record, cause,
                f"entry {entry} failed on {host} {len(streak)} times, but it may not put more than "
                f"half of the healthy hosts aside: {cause}",
                restore=False,
            )
        self._streaks.pop(host, None)
        record.put_aside.add(host)
        return Verdict(
            put_host_aside=True,
            message=f"failed to start workers {len(streak)} times in a row; last error: {cause}",
        )

    def _entry_at_fault(
        self, entry: str, record: _EntryRecord, cause: str, message: str, *, restore: bool = True
    ) -> Verdict:
        for host, streak in list(self._streaks.items()):
            kept = [e for e in streak if e != entry]
            if kept:
                self._streaks[host] = kept
            else:
                del self._streaks[host]
        restored = sorted(record.put_aside) if restore else []
        if restore:
            record.put_aside.clear()
        record.backoff = min(record.backoff * 2, ENTRY_BACKOFF_MAX) if record.backoff else ENTRY_BACKOFF_FIRST
        record.retry_at = self.clock() + record.backoff
        record.problem = cause
        return Verdict(entry_retry_in=record.backoff, restore_hosts=restored, message=message)

    def start_succeeded(self, entry: str, host: str) -> None:
        """A start worked: the host's streak and the entry's problem end."""
        self._streaks.pop(host, None)
        self._entries.pop(entry, None)

    def forget_entry(self, entry: str) -> None:
        """The entry left the spec."""
        self._entries.pop(entry, None)
        for host in list(self._streaks):
            self._streaks[host] = [e for e in self._streaks[host] if e != entry]
            if not self._streaks[host]:
                del self._streaks[host]

    def waiting(self, entry: str) -> bool:
        """Whether ``entry`` is backing off and must not be started yet."""
        record = self._entries.get(entry)
        return record is not None and self.clock() < record.retry_at

    def retry_at(self, entry: str) -> float:
        record = self._entries.get(entry)
        return record.retry_at if record is not None else 0.0

    def problem(self, entry: str) -> str:
        """The entry's own problem, if it has been found to have one."""
        record = self._entries.get(entry)
        return record.problem if record is not None else ""
