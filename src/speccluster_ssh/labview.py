"""A view of a shared lab (issue 23): per host, its capacity, what is free, who holds the rest, who waits.

``speccluster-ssh hosts`` shows it; ``check`` and ``plan`` add the same
facts to their rows. Two halves:

- :func:`survey_lab` connects to every host of an inventory in parallel
  (through its jump hosts, with the inventory's connection settings) and
  asks each host's agent for its live leases and facts
  (:class:`HostSurvey`). Its agents are those of a cluster of its own
  (``survey-<hex>``), which holds nothing, and are all stopped at its end,
  whatever happened.
- :func:`host_view` and :func:`lab_json` turn what was found into rows
  (:class:`HostView`) and the documented JSON shape: pure, no I/O, no clock
  (the caller passes ``now``), unit-tested without a lab.

What is decided, and why
------------------------
Capacity
    What *this* inventory gives the host (:func:`inventory_capacity`):
    ``speccluster_slots``, and cores and memory when every slot's size is
    known (``nthreads``, a ``memory_limit`` in bytes), and the GPU devices
    (``auto``: those ``nvidia-smi -L`` lists there). Another user's
    inventory may size the host differently; each sees it by their own.
Free
    The capacity minus every live lease on the host, whatever its cluster
    (:func:`speccluster_ssh.leases.free_capacity` asked for no cluster):
    what a new cluster could take now. Wants take nothing.
Users
    A holder's user is the owner of its lease file on the host, which no
    record can forge; the lab-wide slots per user (the measure fair share
    uses, see :mod:`speccluster_ssh.leases`) are summed over the hosts
    reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .agent.lease_records import lease_amount_text
from .leases import Amount, Lease, free_capacity, host_capacity, slots_held
from .powermarks import PowerMark, head_power_marks, label_text, power_label

if TYPE_CHECKING:
    from .connection import ConnectSettings
    from .inventory import HostSpec, Inventory

__all__ = [
    "HostSurvey",
    "HostView",
    "amount_json",
    "host_view",
    "inventory_capacity",
    "lab_json",
    "lease_json",
    "lab_views",
    "power_lines",
    "survey_hosts",
    "survey_lab",
]

logger = logging.getLogger(__name__)

#: The version of the ``hosts --json`` shape; a field that changes meaning gets a new one.
LAB_JSON_VERSION = 1


@dataclass(frozen=True)
class HostSurvey:
    """What one host said: its facts and live leases and wants, or why it could not be asked.

    ``reached`` is whether its agent answered; ``leases`` is ``None`` when the lease list failed
    (``error`` and ``fix`` say why: an unsafe lease directory, a lock held too long) or the host
    was not reached.
    """

    host: str
    reached: bool
    facts: Mapping[str, Any] = field(default_factory=dict)
    leases: tuple[Lease, ...] | None = None
    error: str = ""
    fix: str = ""
    power_marks: tuple[PowerMark, ...] = ()  # the power records there: who woke it (powermarks.py)


@dataclass(frozen=True)
class HostView:
    """One host of the view: its capacity and free capacity (``None`` when unknown), holders, wants."""

    host: str
    reached: bool
    capacity: Amount | None
    free: Amount | None
    holders: tuple[Lease, ...] = ()
    wants: tuple[Lease, ...] = ()
    error: str = ""
    fix: str = ""
    # Of a host that sleeps (speccluster_power_on or _off): "asleep" or "waking" when it did not answer,
    # "awake" (woken by power_by) or "on" when it did.
    power: str = ""
    power_by: PowerMark | None = None


# -- pure: rows and JSON ---------------------------------------------------------------------------


def inventory_capacity(host: HostSpec, facts: Mapping[str, Any] | None = None) -> Amount:
    """The capacity ``host``'s inventory gives it (see the module); ``facts`` resolve ``speccluster_gpus: auto``.

    Parameters
    ----------
    host
        The host's spec: its ``slots``, ``nworkers``, ``nthreads``, ``memory_limit`` and ``gpus``.
    facts
        What its agent reported (``gpus``: the device ids ``nvidia-smi -L`` lists); without them an
        ``auto`` host has no known devices.
    """
    gpus: Any = host.gpus
    if gpus == "auto":
        gpus = list((facts or {}).get("gpus") or ())
    return host_capacity(
        int(host.slots), nworkers=int(host.nworkers), nthreads=host.nthreads,
        memory_limit=host.memory_limit, gpus=gpus,
    )


def host_view(host: HostSpec, survey: HostSurvey, head_marks: Iterable[PowerMark] = ()) -> HostView:
    """The row of one host: capacity from the inventory and facts, free after every live lease, holders, wants.

    ``head_marks`` are the power records of the head (a cluster waking a host says so there).
    """
    sleeps = host.power_on is not None or host.power_off is not None
    marks = (*survey.power_marks, *head_marks)
    if not survey.reached:
        # A survey never wakes a host: one that may be asleep is said to be (or waking, by a cluster).
        power, by = power_label("asleep" if host.power_on is not None and not survey.fix else "", marks, host.name)
        return HostView(host.name, False, None, None, error=survey.error, fix=survey.fix, power=power, power_by=by)
    power, by = power_label("on" if sleeps else "", marks, host.name)
    capacity = inventory_capacity(host, survey.facts)
    if survey.leases is None:
        return HostView(host.name, True, capacity, None, error=survey.error, fix=survey.fix, power=power, power_by=by)
    # Capacity is counted per inventory name (see agent/lease_records.py): one machine under two names is two hosts.
    leases = [lease for lease in survey.leases if lease.host == host.name]
    by_time = sorted(leases, key=lambda lease: (lease.since, lease.cluster, lease.lease_id))
    return HostView(
        host.name, True, capacity, free_capacity(capacity, leases, cluster=""),
        holders=tuple(lease for lease in by_time if lease.held),
        wants=tuple(lease for lease in by_time if not lease.held),
        error=survey.error, fix=survey.fix, power=power, power_by=by,
    )


def lab_views(hosts: Sequence[HostSpec], surveys: Mapping[str, HostSurvey],
              head_marks: Sequence[PowerMark] = ()) -> list[HostView]:  # fmt: skip
    """:func:`host_view` of every host, in the order given; a host missing from ``surveys`` is unreached."""
    return [host_view(h, surveys.get(h.name) or HostSurvey(h.name, False, error="not surveyed"), head_marks)
            for h in hosts]  # fmt: skip


def amount_json(amount: Amount | None) -> dict[str, Any] | None:
    """``{"slots", "cores", "memory", "gpus"}`` of an amount; ``cores``/``memory`` ``None`` when not given."""
    if amount is None:
        return None
    return {"slots": amount.slots, "cores": amount.cores, "memory": amount.memory, "gpus": list(amount.gpus)}


def amount_text(amount: Amount | None) -> str:
    """``2 slots, 8 cores, 16 GiB, GPUs 0,1``; ``?`` when unknown."""
    if amount is None:
        return "?"
    return lease_amount_text({"slots": amount.slots, "cores": amount.cores or 0, "memory": amount.memory or 0,
                              "gpus": list(amount.gpus)})  # fmt: skip


def lease_json(lease: Lease) -> dict[str, Any]:
    data: dict[str, Any] = {
        "user": lease.user,
        "cluster": lease.cluster,
        "name": lease.name,
        "head": lease.head,
        "entry": lease.entry,
        "since": lease.since,
        "id": lease.lease_id,
    }
    if lease.held:
        data.update(holds=amount_json(lease.amount), holds_text=amount_text(lease.amount),
                    state=lease.state, state_since=lease.state_since or None)  # fmt: skip
    else:
        data.update(wants=amount_json(lease.amount), wants_text=amount_text(lease.amount))
    return data


def view_json(view: HostView) -> dict[str, Any]:
    """One host of :func:`lab_json` (see there for the shape)."""
    return {
        "host": view.host,
        "reached": view.reached,
        "error": view.error,
        "fix": view.fix,
        "capacity": amount_json(view.capacity),
        "free": amount_json(view.free),
        "holders": [lease_json(lease) for lease in view.holders],
        "wants": [lease_json(lease) for lease in view.wants],
        "power": view.power,
        "power_since": view.power_by.since if view.power_by else None,
        "power_by": power_by_json(view.power_by),
    }


def power_by_json(mark: PowerMark | None) -> dict[str, str] | None:
    """``{"user", "cluster", "name", "head"}`` of the cluster waking or that woke a host; ``None`` when none."""
    if mark is None:
        return None
    return {"user": mark.user, "cluster": mark.cluster, "name": mark.name, "head": mark.head}


def lab_json(views: Iterable[HostView]) -> dict[str, Any]:
    """The JSON of ``speccluster-ssh hosts --json``: stable, documented in the README ("Sharing a lab").

    Returns
    -------
    dict
        ``{"version": 1, "hosts": [..], "users": {user: slots held on the hosts reached}}``; each host:
        ``host``, ``reached``, ``error`` and ``fix`` (``""`` when none), ``capacity`` and ``free``
        (``{"slots", "cores", "memory", "gpus"}``, ``cores``/``memory`` ``null`` when the inventory
        does not size them; ``null`` when unknown), ``holders`` (``user``, ``cluster`` (its id),
        ``name``, ``head`` (the head's host), ``entry``, ``since`` (Unix time), ``id``, ``holds``,
        ``holds_text``, ``state`` (``busy``, ``idle`` or ``""``: not said) and ``state_since``
        (Unix time or ``null``)) and ``wants`` (the same without the state, with ``wants`` and
        ``wants_text``), each oldest first; ``power`` (``asleep``, ``waking``, ``awake``, ``on``,
        ``""``), ``power_since`` (Unix time the waking cluster's power-on ran, or its agent said it
        woke the host; ``null`` otherwise) and ``power_by`` (``user``, ``cluster``, ``name``,
        ``head`` of that cluster, or ``null``).
    """
    views = list(views)
    held = slots_held(lease for view in views for lease in view.holders)
    return {
        "version": LAB_JSON_VERSION,
        "hosts": [view_json(view) for view in views],
        "users": dict(sorted(held.items())),
    }


def _clock(when: float, now: float) -> str:
    """``14:05`` today, else ``06-02 14:05``: short enough for a table cell."""
    local, today = time.localtime(when), time.localtime(now)
    if local[:3] == today[:3]:
        return time.strftime("%H:%M", local)
    return time.strftime("%m-%d %H:%M", local)


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def lease_state_text(lease: Lease, now: float) -> str:
    """``busy 3 min``, ``idle 12 s``, ``waiting 1 min`` or ``-`` (a lease that says neither)."""
    if not lease.held:
        return f"waiting {_ago(now - lease.since)}"
    if lease.state:
        return f"{lease.state} {_ago(now - lease.state_since)}" if lease.state_since else lease.state
    return "-"


#: The columns of :func:`table_rows`.
TABLE_COLUMNS = ("host", "capacity", "free", "user", "cluster", "head", "holds", "since", "state")


def table_rows(views: Iterable[HostView], now: float) -> list[tuple[str, ...]]:
    """The rows of the ``hosts`` table: one per holder and want, the host's columns on its first row only.

    A host without holders or wants has one row; an unreached host says ``not reached`` (its
    reason follows the table, see :func:`problem_lines`).
    """
    rows: list[tuple[str, ...]] = []
    for view in views:
        first = (view.host, amount_text(view.capacity), amount_text(view.free))
        blank = ("", "", "")
        if not view.reached:
            said = label_text(view.power, view.power_by, now) if view.power in ("asleep", "waking") else "not reached"
            rows.append((*first, "", "", "", "", "", said))
            continue
        if view.free is None:
            rows.append((*first, "", "", "", "", "", "leases unknown"))
            continue
        people = [*view.holders, *view.wants]
        if not people:
            rows.append((*first, "", "", "", "", "", "free"))
            continue
        for i, lease in enumerate(people):
            what = amount_text(lease.amount) if lease.held else f"wants {amount_text(lease.amount)}"
            cluster = lease.name or lease.cluster
            rows.append((*(first if i == 0 else blank), lease.user, cluster, lease.head or "?", what,
                         _clock(lease.since, now), lease_state_text(lease, now)))  # fmt: skip
    return rows


def problem_lines(views: Iterable[HostView]) -> list[str]:
    """One line per host that was not reached or whose leases could not be read: why, and the fix."""
    lines = []
    for view in views:
        if view.error:
            what = "not reached" if not view.reached else "leases not read"
            if view.power == "asleep":
                what = "asleep (its power-on command wakes it when a cluster needs it), not reached"
            elif view.power == "waking" and view.power_by is not None:
                what = f"waking (powered on by {view.power_by.who()}), not reached yet"
            lines.append(f"{view.host}: {what}: {view.error}" + (f"; fix: {view.fix}" if view.fix else ""))
    return lines


def power_lines(views: Iterable[HostView], now: float) -> list[str]:
    """One line per host a cluster woke: ``h2: awake (woken by nap of alice, from head1 at 14:05)``."""
    lines = []
    for view in views:
        mark = view.power_by
        if view.power == "awake" and mark is not None:
            lines.append(f"{view.host}: awake (woken by {mark.who()}, from {mark.head or '?'} at "
                         f"{_clock(mark.since, now)})")  # fmt: skip
    return lines


def holders_line(data: Mapping[str, Any]) -> str:
    """``root (cluster a from head1: 2 slots, busy); alice waits (b)``: who holds and wants what on a host.

    ``data`` is a host of :func:`lab_json` (or a ``check`` row, which has the same fields).
    """
    parts = []
    for lease in data.get("holders") or ():
        state = f", {lease['state']}" if lease.get("state") else ""
        parts.append(f"{lease['user']} ({lease['name'] or lease['cluster']} from {lease['head'] or '?'}: "
                     f"{lease['holds_text']}{state})")  # fmt: skip
    waiting = [f"{lease['user']} waits ({lease['name'] or lease['cluster']}: {lease['wants_text']})"
               for lease in data.get("wants") or ()]  # fmt: skip
    return "; ".join(parts + waiting) or "no one"


def free_line(data: Mapping[str, Any]) -> str:
    """``1 of 2 slots free`` for a host of :func:`lab_json`; ``?`` when its leases are unknown."""
    free, capacity = data.get("free"), data.get("capacity")
    if not free or not capacity:
        return "?"
    return f"{free['slots']} of {capacity['slots']} slot{'' if capacity['slots'] == 1 else 's'} free"


# -- I/O: asking the hosts -------------------------------------------------------------------------


def survey_settings(known_hosts_policy: str | None) -> ConnectSettings:
    """The connection settings of a survey: as ``up`` makes them, with ``--known-hosts`` when given."""
    from . import startup

    return startup.connect_settings(None, known_hosts_policy, (), None)


async def survey_hosts(
    hosts: Mapping[str, HostSpec], settings: ConnectSettings, timeout: float = 30.0
) -> dict[str, HostSurvey]:
    """Ask every host of ``hosts`` at once for its facts and live leases; every agent is stopped at the end.

    Parameters
    ----------
    hosts
        The hosts by inventory name (jump hosts are reached through, not asked).
    settings
        How to connect (see :func:`survey_settings`).
    timeout
        Seconds for each host's agent to answer (plus its connect timeout).

    Returns
    -------
    dict
        A :class:`HostSurvey` per host name, in the order of ``hosts``; never raises for a host
        that cannot be reached or asked.
    """
    import secrets

    from .errors import HostError
    from .pool import AgentPool
    from .tasks import log_failures

    pool = AgentPool(f"survey-{secrets.token_hex(4)}", hosts, settings, agent_timeout=timeout)
    pool.ship_environments = False  # a survey only looks

    async def ask(name: str) -> HostSurvey:
        limit = timeout + float(hosts[name].connect_timeout) + 5
        try:
            agent = await asyncio.wait_for(pool.agent(name), limit)
        except HostError as exc:
            return HostSurvey(name, False, error=exc.reason, fix=exc.fix)
        except (asyncio.TimeoutError, TimeoutError):
            return HostSurvey(name, False, error=f"no answer within {limit:g} s")
        except OSError as exc:  # a local host whose python cannot be run
            return HostSurvey(name, False, error=f"{exc.strerror or exc}")
        facts = dict(agent.facts)
        try:
            leases, marks = await agent.lease_and_power_list(timeout=timeout)
        except HostError as exc:
            return HostSurvey(name, True, facts, None, error=exc.reason, fix=exc.fix)
        return HostSurvey(name, True, facts, tuple(leases), power_marks=tuple(marks))

    names = list(hosts)
    try:
        # Every question ends before the pool closes, even when one fails unexpectedly.
        results = await asyncio.gather(*(ask(n) for n in names), return_exceptions=True)
    finally:
        await pool.close()
    log_failures(results, names, logger, "survey")  # an unexpected failure: logged, and its host says so
    return {
        name: result if isinstance(result, HostSurvey) else HostSurvey(name, False, error=f"{type(result).__name__}: {result}")
        for name, result in zip(names, results)
    }


def survey_targets(inv: Inventory) -> dict[str, HostSpec]:
    """The hosts a survey asks: the worker hosts and the scheduler host, as ``check`` checks them."""
    hosts: dict[str, HostSpec] = {h.name: h for h in inv.worker_hosts}
    if inv.scheduler_host is not None:
        hosts.setdefault(inv.scheduler_host.name, inv.scheduler_host)
    return hosts


def survey_lab(inv: Inventory, known_hosts_policy: str | None = None, timeout: float = 30.0) -> list[HostView]:
    """Survey ``inv``'s hosts (see :func:`survey_hosts`) and return their rows; runs its own event loop."""
    hosts = survey_targets(inv)
    surveys = asyncio.run(survey_hosts(hosts, survey_settings(known_hosts_policy), timeout))
    # Read after the survey: a host found not answering may be one a cluster on this head is waking.
    return lab_views(list(hosts.values()), surveys, head_power_marks())
