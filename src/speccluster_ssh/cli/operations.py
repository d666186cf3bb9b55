"""The commands that operate a running cluster: ``restart``, ``drain``, ``undrain`` and ``reload``.

Each registers itself on the command group when :mod:`speccluster_ssh.cli`
imports this module, and they ask the cluster's head process (see
:mod:`speccluster_ssh.head`), like ``scale`` does. The work is done there,
by :mod:`speccluster_ssh.operations` and :mod:`speccluster_ssh.reload`; this
module only parses arguments and prints results.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from ..control import Op
from ..messages import PROG
from .common import _ask, _json_option, _load_inventory, _name_option, _resolve, main
from .display import _echo_json

# Seconds to wait for the head's answer to a restart or reload (the operation goes on in the head after).
OPERATION_TIMEOUT = 3600.0


def _timeout_option(func: Any) -> Any:
    return click.option(
        "--timeout", type=click.FloatRange(min=1), default=OPERATION_TIMEOUT, show_default=True,
        help="Seconds to wait for the head's answer; the operation goes on in the head after that.",
    )(func)


def _moved_lines(result: Mapping[str, Any]) -> list[str]:
    lines = []
    for old, new in sorted(result.get("moved", {}).items(), key=lambda kv: _order(kv[0])):
        if new["entry"] == old:
            lines.append(f"  entry {old}: retired, then started again on {new['host']}")
        else:
            lines.append(f"  entry {old}: replaced by entry {new['entry']} on {new['host']}, then retired")
    for key in result.get("dropped", []):
        lines.append(f"  entry {key}: retired; no usable slot was free for it (the cluster is short until one is)")
    for host, reason in result.get("refused", {}).items():
        lines.append(f"  host {host} refused, its entries left as they were: {reason}")
    return lines


def _order(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 30, key)


@main.command()
@click.option("--batch", "-b", type=click.IntRange(min=1), default=1, show_default=True,
              help="Entries replaced at once; at most this many entries' workers are missing at any moment.")
@_timeout_option
@_name_option
@_json_option
def restart(batch: int, timeout: float, name: str | None, as_json: bool) -> None:
    """Restart every worker of a cluster, a few at a time, keeping its data.

    Every host gets a new agent first, so a wheel installed since (for
    example by provision.yml) is used; a host whose distributed is no
    longer the head's release is refused. Each entry is retired (its data
    moves to other workers) before it starts again, or its replacement
    starts first where a slot is free.

    \b
    Example:
      speccluster-ssh restart --name lab
      speccluster-ssh restart --name lab --batch 2
    """
    known = _resolve(name)
    click.echo(f"cluster {known.state.name}: rolling restart, {batch} entr{'y' if batch == 1 else 'ies'} at a time ...",
               err=True)
    result = _ask(known, Op.RESTART, timeout=timeout, batch=batch)
    if as_json:
        _echo_json(result)
        return
    for line in _moved_lines(result):
        click.echo(line)
    done = len(result.get("moved", {}))
    agents = f" (new agents on {', '.join(result['new_agents'])})" if result.get("new_agents") else ""
    click.echo(f"cluster {known.state.name}: {done} of {result.get('entries', done)} entries restarted "
               f"in {result.get('seconds', 0):g} s{agents}")


@main.command()
@click.argument("host", metavar="HOST")
@click.option("--reason", default="", metavar="TEXT", help="Why, shown by 'status' (default: drained by the user).")
@_name_option
@_json_option
def drain(host: str, reason: str, name: str | None, as_json: bool) -> None:
    """Move HOST's workers elsewhere, keeping their data, and place nothing there.

    Workers that find no free slot elsewhere are retired; the cluster
    refills when the host is undrained. 'status' shows the host as drained.

    \b
    Example:
      speccluster-ssh drain node03 --name lab --reason "disk replacement"
      speccluster-ssh undrain node03 --name lab
    """
    known = _resolve(name)
    result = _ask(known, Op.DRAIN, timeout=OPERATION_TIMEOUT, host=host, reason=reason)
    if as_json:
        _echo_json(result)
        return
    click.echo(f"cluster {known.state.name}: host {host} drained ({result.get('reason')})")
    for line in _moved_lines(result):
        click.echo(line)
    click.echo(f"nothing is placed on {host} until '{PROG} undrain {host} --name {known.state.name}'")


@main.command()
@click.argument("host", metavar="HOST")
@_name_option
@_json_option
def undrain(host: str, name: str | None, as_json: bool) -> None:
    """Take a drained HOST back: entries may be placed there again.

    A cluster of a fixed size that was short of its workers starts the
    missing ones.

    \b
    Example:
      speccluster-ssh undrain node03 --name lab
    """
    known = _resolve(name)
    result = _ask(known, Op.UNDRAIN, host=host)
    if as_json:
        _echo_json(result)
        return
    if not result.get("was_drained"):
        click.echo(f"cluster {known.state.name}: host {host} was not drained")
        return
    added = result.get("added", [])
    more = f"; {len(added)} entr{'y' if len(added) == 1 else 'ies'} added to reach the target" if added else ""
    click.echo(f"cluster {known.state.name}: host {host} undrained{more}")


@main.command()
@click.argument("inventory", metavar="[INVENTORY]", required=False)
@click.option("--dry-run", is_flag=True, help="Only print the difference; change nothing.")
@click.option("--batch", "-b", type=click.IntRange(min=1), default=1, show_default=True,
              help="Entries of changed hosts replaced at once.")
@_timeout_option
@_name_option
@_json_option
def reload(inventory: str | None, dry_run: bool, batch: int, timeout: float, name: str | None, as_json: bool) -> None:
    """Read a running cluster's inventory again and apply the difference.

    Without INVENTORY the file the cluster was started from is read. The
    difference is printed first: hosts added become usable, hosts removed
    are drained and then closed, and the workers of hosts whose
    speccluster_* or connection variables changed are replaced a batch at
    a time. An inventory with an error changes nothing.

    \b
    Example:
      speccluster-ssh reload --name lab --dry-run
      speccluster-ssh reload --name lab lab.yml
    """
    from ..reload import describe

    known = _resolve(name)
    path = None
    if inventory is not None:
        # Read here first: a mistake gives the line 'up' gives, and nothing is asked of the head.
        _load_inventory(inventory)
        path = str(Path(inventory).expanduser().absolute()) if os.path.exists(inventory) else inventory
    result = _ask(known, Op.RELOAD, timeout=timeout, inventory=path, dry_run=dry_run, batch=batch)
    if as_json:
        _echo_json(result)
        return
    for warning in result.get("warnings", []) if inventory is None else []:  # else said above
        click.echo(f"{PROG}: warning: {warning}", err=True)
    note = " (dry run: nothing is changed)" if dry_run else ""
    click.echo(f"reload of cluster {known.state.name} from {result.get('source')}{note}")
    for line in describe(result, batch=batch):
        click.echo(f"  {line}")
    if dry_run or not result.get("applied"):
        return
    for line in _moved_lines(result):
        click.echo(line)
    added = result.get("added_entries", [])
    if added:
        click.echo(f"  {len(added)} entr{'y' if len(added) == 1 else 'ies'} added to reach the target")
    click.echo(f"cluster {known.state.name}: inventory reloaded")
