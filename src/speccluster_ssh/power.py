"""Machines that sleep: power states and power decisions, pure logic with no I/O.

A host whose inventory gives a power-on command (``speccluster_power_on``)
may be switched off or asleep; the cluster wakes it when it needs it, and
puts it back to sleep when it woke it and nothing ran there for
``speccluster_idle_poweroff`` (see :mod:`speccluster_ssh.powerctl`, which
runs the commands). This module holds what is decided:

- :func:`fill_command`: a command's ``{name}`` placeholders filled from the
  host's inventory variables. Each placeholder is replaced inside the one
  argv element that holds it: the value never becomes more than that
  element, and no shell ever reads it, so a value such as ``$(touch /tmp/x)``
  is passed as it is.
- :class:`PowerBook`: the power state of every host, a small state machine
  (:class:`Power`):

  ``unknown`` (not tried yet) or ``on`` (it answered without being woken);
  ``asleep`` (it did not answer, or this cluster powered it off);
  ``waking`` (the power-on command ran, the host has not answered yet:
  shown with the seconds since); ``awake`` (this cluster woke it, and it
  answers).

- :func:`hosts_to_wake`: which sleeping hosts to wake for N more workers
  (as few as give them, in inventory order);
- :meth:`PowerBook.idle_due`: which hosts have been idle long enough to be
  powered off. A host is idle when no worker of any cluster runs there (no
  lease of any cluster, no entry of this one); only a host this cluster
  woke is ever powered off, unless ``speccluster_power_manage: always``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BOOT_POLL",
    "PLACEHOLDER",
    "Power",
    "PowerBook",
    "PlaceholderError",
    "fill_command",
    "hosts_to_wake",
    "on_host",
    "placeholders",
]

#: ``{name}`` in a power command: a variable name between braces.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: Seconds between connection attempts while a woken host boots.
BOOT_POLL = 1.0


class PlaceholderError(ValueError):
    """A power command names a variable the host does not have, or one that is not a plain value."""

    def __init__(self, host: str, variable: str, why: str) -> None:
        super().__init__(f"{why} {variable} on host {host}")
        self.host = host
        self.variable = variable
        self.why = why


def placeholders(argv: Iterable[str]) -> list[str]:
    """The variable names that the ``{name}`` placeholders of ``argv`` name, in order, each once."""
    return list(dict.fromkeys(m.group(1) for arg in argv for m in PLACEHOLDER.finditer(arg)))


def fill_command(argv: Sequence[str], variables: Mapping[str, Any], host: str) -> list[str]:
    """``argv`` with every ``{name}`` replaced by the host's variable ``name``, each inside its own element.

    Parameters
    ----------
    argv
        The command, one element per argument (``["wakeonlan", "{speccluster_mac}"]``).
    variables
        The host's merged inventory variables.
    host
        The host's inventory name, for the error.

    Returns
    -------
    list of str
        As many elements as ``argv``: a value never splits into more arguments.

    Raises
    ------
    PlaceholderError
        When a placeholder names a variable the host does not have, or one
        whose value is not a string or a number.
    """
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables or variables[name] is None:
            raise PlaceholderError(host, name, "the power command uses a variable that is not set:")
        found = variables[name]
        if isinstance(found, bool) or not isinstance(found, (str, int, float)):
            raise PlaceholderError(host, name, "the power command uses a variable that is not a string or a number:")
        return str(found)

    return [PLACEHOLDER.sub(value, str(arg)) for arg in argv]


def on_host(argv: Sequence[str]) -> bool:
    """Whether a power-off command runs on the host over the cluster's connection: it starts with ``ssh``."""
    return bool(argv) and argv[0] == "ssh"


class Power(str, enum.Enum):
    """The power state of a host. A ``str`` so that reports and JSON show the plain word."""

    UNKNOWN = "unknown"
    ON = "on"
    ASLEEP = "asleep"
    WAKING = "waking"
    AWAKE = "awake"

    def __str__(self) -> str:
        return self.value


@dataclass
class _HostPower:
    state: Power = Power.UNKNOWN
    since: float = 0.0  # monotonic time the state began
    idle_since: float | None = None  # monotonic time nothing ran there any more; None: busy


def hosts_to_wake(needed: int, sleeping: Sequence[tuple[str, int]]) -> list[str]:
    """The sleeping hosts to wake for ``needed`` more workers: the first ones, in order, until they give enough.

    Parameters
    ----------
    needed
        Workers wanted beyond what the awake (and waking) hosts give.
    sleeping
        ``(host, workers it gives)`` of every sleeping host, in inventory order.

    Returns
    -------
    list of str
        As few hosts as give ``needed`` workers when taken in order; all of
        them when even all together give fewer; none when nothing is needed.
    """
    chosen: list[str] = []
    for name, workers in sleeping:
        if needed <= 0:
            break
        if workers <= 0:
            continue
        chosen.append(name)
        needed -= workers
    return chosen


class PowerBook:
    """The power state of every host of one cluster; its methods are the transitions.

    Owned by the cluster's :class:`~speccluster_ssh.powerctl.PowerKeeper`;
    everything else reads it (:meth:`label`, :meth:`state`, :meth:`not_awake`).
    """

    def __init__(self) -> None:
        self._hosts: dict[str, _HostPower] = {}

    def _get(self, name: str) -> _HostPower:
        return self._hosts.setdefault(name, _HostPower())

    # -- questions --------------------------------------------------------------------------------
    def state(self, name: str) -> Power:
        """Host ``name``'s power state (``unknown`` until it was tried)."""
        record = self._hosts.get(name)
        return record.state if record is not None else Power.UNKNOWN

    def woken(self, name: str) -> bool:
        """Whether this cluster woke host ``name`` and it answers."""
        return self.state(name) == Power.AWAKE

    def asleep(self) -> list[str]:
        """The hosts known to be asleep."""
        return [n for n, r in self._hosts.items() if r.state == Power.ASLEEP]

    def waking(self) -> list[str]:
        """The hosts being woken."""
        return [n for n, r in self._hosts.items() if r.state == Power.WAKING]

    def not_awake(self) -> set[str]:
        """Hosts asleep or still waking: placed on only when the awake hosts have no room."""
        return {n for n, r in self._hosts.items() if r.state in (Power.ASLEEP, Power.WAKING)}

    def label(self, name: str, now: float) -> str:
        """What ``status`` shows: ``asleep``, ``waking (12 s)``, ``awake (woken)``, ``on``; ``""`` when unknown."""
        record = self._hosts.get(name)
        if record is None or record.state == Power.UNKNOWN:
            return ""
        if record.state == Power.WAKING:
            return f"waking ({max(now - record.since, 0):.0f} s)"
        if record.state == Power.AWAKE:
            return "awake (woken)"
        return record.state.value

    # -- transitions ------------------------------------------------------------------------------
    def answered(self, name: str, now: float) -> None:
        """Host ``name`` answered: ``awake`` when this cluster woke it, else ``on``."""
        record = self._get(name)
        if record.state in (Power.WAKING, Power.AWAKE):
            if record.state == Power.WAKING:
                record.since = now
            record.state = Power.AWAKE
        elif record.state != Power.ON:
            record.state, record.since = Power.ON, now
        if record.idle_since is None:
            record.idle_since = now  # idle until something is seen running there

    def no_answer(self, name: str, now: float) -> None:
        """Host ``name`` did not answer and may be woken: ``asleep`` (unless it is being woken)."""
        record = self._get(name)
        if record.state != Power.WAKING:
            record.state, record.since, record.idle_since = Power.ASLEEP, now, None

    def waking_up(self, name: str, now: float) -> None:
        """The power-on command of host ``name`` ran: ``waking`` from ``now``."""
        record = self._get(name)
        record.state, record.since, record.idle_since = Power.WAKING, now, None

    def powered_off(self, name: str, now: float) -> None:
        """This cluster powered host ``name`` off: ``asleep``."""
        record = self._get(name)
        record.state, record.since, record.idle_since = Power.ASLEEP, now, None

    def see_use(self, busy: Collection[str], now: float) -> None:
        """Hosts ``busy`` run workers now (any cluster's); every other host that answers is idle, from now or before."""
        for name, record in self._hosts.items():
            if record.state not in (Power.ON, Power.AWAKE):
                continue
            if name in busy:
                record.idle_since = None
            elif record.idle_since is None:
                record.idle_since = now

    def idle_due(self, rules: Mapping[str, tuple[float, bool]], now: float) -> list[str]:
        """The hosts to power off now: idle at least their idle time, woken by this cluster (or managed always).

        Parameters
        ----------
        rules
            Host -> ``(idle seconds, manage always)`` for the hosts that may
            be powered off (a power-off command and an idle time are set).
        now
            Monotonic time.
        """
        due = []
        for name, (idle, always) in rules.items():
            record = self._hosts.get(name)
            if record is None or record.idle_since is None or idle <= 0:
                continue
            if record.state == Power.AWAKE or (always and record.state == Power.ON):
                if now - record.idle_since >= idle:
                    due.append(name)
        return due

    def next_due(self, rules: Mapping[str, tuple[float, bool]]) -> float | None:
        """The monotonic time the first idle host of ``rules`` becomes due, if one is idle."""
        times = []
        for name, (idle, always) in rules.items():
            record = self._hosts.get(name)
            if record is None or record.idle_since is None or idle <= 0:
                continue
            if record.state == Power.AWAKE or (always and record.state == Power.ON):
                times.append(record.idle_since + idle)
        return min(times, default=None)

    def as_dict(self, name: str, now: float) -> dict[str, Any]:
        """JSON for ``status``: ``{"power": state, "power_label": label}`` (the state ``""`` when unknown)."""
        state = self.state(name)
        return {"power": "" if state == Power.UNKNOWN else state.value, "power_label": self.label(name, now)}
