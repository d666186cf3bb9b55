"""``hosts``: who holds what on a shared lab, per host (the work is :mod:`speccluster_ssh.labview`).

Also the lines ``check`` and ``plan`` print about what is free now.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click

from .common import _exit, _group_options, _json_option, _load_inventory, _survey_options, main
from .display import _console, _echo_json, _table

if TYPE_CHECKING:
    from ..labview import HostView


@main.command()
@click.argument("inventory", metavar="INVENTORY")
@_survey_options
@_group_options
@_json_option
def hosts(
    inventory: str, known_hosts: str | None, timeout: float, scheduler_group: str, worker_group: str, as_json: bool
) -> None:
    """Show who holds what on every host of INVENTORY: capacity, free, holders and waiting clusters.

    Connects to every host at once (through its jump hosts), reads the
    leases every user's clusters hold there, and stops again. Capacity is
    what INVENTORY gives a host; free is that minus every live lease. Each
    holder shows its user, cluster, head host, what it holds, since when,
    and whether its workers are busy or idle. A host with a power-on command
    that does not answer is shown asleep (the survey never wakes it), or
    waking while a cluster on this head powers it on; a host a cluster woke
    is shown awake, with that cluster and its user. Exit
    status 1 when another host could not be reached or its leases not read.

    \b
    Example:
      speccluster-ssh hosts lab.yml
      speccluster-ssh hosts lab.yml --json | jq '.hosts[] | {host, free: .free.slots}'
    """
    from ..labview import lab_json, survey_lab

    inv = _load_inventory(inventory, scheduler_group, worker_group)
    views = survey_lab(inv, known_hosts, timeout)
    if as_json:
        _echo_json(lab_json(views))
    else:
        print_lab(views, f"{len(views)} hosts of {inventory}")
    # A host asleep is no failure: a cluster that needs it wakes it (or is waking it).
    if any((view.error or not view.reached) and view.power not in ("asleep", "waking") for view in views):
        _exit(1)


def lab_summary(hosts: Sequence[Mapping[str, Any]]) -> str:
    """``6 of 8 slots free; held: alice 1, root 1`` over the hosts whose leases were read.

    ``hosts``: the hosts of ``hosts --json`` (or ``check`` rows, which have the same fields).
    """
    known = [h for h in hosts if h.get("free") is not None and h.get("capacity") is not None]
    free = sum(h["free"]["slots"] for h in known)
    total = sum(h["capacity"]["slots"] for h in known)
    held: dict[str, int] = {}
    for h in known:
        for holder in h.get("holders") or ():
            held[holder["user"]] = held.get(holder["user"], 0) + holder["holds"]["slots"]
    waiting = sorted({want["user"] for h in known for want in h.get("wants") or ()})
    text = f"{free} of {total} slots free"
    if len(known) < len(hosts):
        text += f" on the {len(known)} hosts read"
    if held:
        text += "; held: " + ", ".join(f"{user} {slots}" for user, slots in sorted(held.items()))
    if waiting:
        text += "; waiting: " + ", ".join(waiting)
    return text


def print_lab(views: Sequence[HostView], title: str) -> None:
    """The ``hosts`` table, its summary line, and one line per host that was not reached or read."""
    from ..labview import TABLE_COLUMNS, power_lines, problem_lines, table_rows

    now = time.time()
    _console().print(_table(TABLE_COLUMNS, table_rows(views, now), title=title))
    from ..labview import view_json

    click.echo(lab_summary([view_json(view) for view in views]))
    for line in power_lines(views, now) + problem_lines(views):
        click.echo(line)
