"""``up`` for a cluster name that is already running: compare, then apply or refuse.

The head records ``up``'s options in ``state.json`` (``up_options``, with the
size kept current by ``scale`` and ``adapt``) and a fingerprint of the
inventory in effect. ``up`` again compares its own options with them:

- the same inventory and options: ``nothing changed``, exit 0;
- a changed inventory (another path, or the same file with other content):
  applied as ``reload`` applies it, and printed;
- another size (``--workers N``, ``--adapt MIN:MAX``, or neither, which means
  every slot): applied as ``scale`` or ``adapt`` apply it, and printed;
- any other option (``--no-tls``, ``--placement``, ``--known-hosts``,
  ``--scheduler-reach``, the groups, and options added later): only a new
  start can change it, so ``up`` refuses in one line that names it and
  ``down``, exit 2, and changes nothing.

``--detach``, ``--timeout`` and ``--min-workers`` govern a start only; a
running cluster has no start left, so they are not compared.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from .. import control
from .. import state as st
from ..errors import SpecClusterError, UserError
from ..head import UpOptions
from ..messages import PROG
from .common import UpRequest
from .display import _echo_json, _print_connect_info, workers_text

# Options that only govern a start (and the entries it placed): not compared.
START_ONLY = ("entries", "timeout", "min_workers")
# The size: applied through scale and adapt.
SIZE = ("workers", "adapt")
# Seconds to wait for a reload that 'up' again applies.
RELOAD_TIMEOUT = 3600.0


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(key: str, value: Any) -> str:
    return f"{_flag(key)} {value}" if value is not None else f"no {_flag(key)}"


def fixed_differences(
    running: Mapping[str, Any], wanted: Mapping[str, Any], running_tls: bool, wanted_tls: bool
) -> list[tuple[str, str]]:
    """The options only a new start can change, as ``(what runs, what was asked)``.

    Parameters
    ----------
    running
        The running cluster's ``up_options``.
    wanted
        This ``up``'s options, as a dict.
    running_tls, wanted_tls
        Whether the cluster uses TLS, and whether this ``up`` would.
    """
    found: list[tuple[str, str]] = []
    if running_tls != wanted_tls:
        found.append(("TLS", "--no-tls") if running_tls else ("--no-tls", "TLS"))
    for key, value in wanted.items():
        if key in ("name", "inventory", "tls", *START_ONLY, *SIZE):
            continue
        if running.get(key) != value:
            found.append((_shown(key, running.get(key)), _shown(key, value)))
    return found


def size_of(options: Mapping[str, Any]) -> tuple[str, Any]:
    """``("adapt", (min, max))`` or ``("workers", N or None)``: None is every slot."""
    adapt = options.get("adapt")
    if adapt:
        return "adapt", tuple(adapt)
    return "workers", options.get("workers")


def size_text(size: tuple[str, Any]) -> str:
    kind, value = size
    if kind == "adapt":
        return f"--adapt {value[0]}:{value[1]}"
    return "every slot (no --workers)" if value is None else f"--workers {value}"


def up_again(directory: Path, options: UpOptions, request: UpRequest, as_json: bool) -> None:
    """Report, apply or refuse ``up`` for a cluster whose head runs (see the module docstring)."""
    from .. import config
    from ..planning import capacity, inventory_fingerprint

    found = st.read_state(directory)
    if found is None:
        raise SpecClusterError(f"cluster {directory.name} is being set up by another command; try again shortly")
    name = found.name
    if found.up_options is None:
        raise UserError(
            f"cluster {name} was started by an earlier {PROG} that did not record its options, so 'up' cannot "
            f"compare them; use scale, adapt or reload, or '{PROG} down --name {name}' first"
        )
    wanted = json.loads(options.to_json())
    wanted_tls = False if options.tls is False else bool(config.get("tls"))
    fixed = fixed_differences(found.up_options, wanted, found.tls, wanted_tls)
    inventory_changed = (
        found.up_options.get("inventory") != options.inventory
        or found.inventory_fingerprint != inventory_fingerprint(request.inventory)
    )
    running_size, wanted_size = size_of(found.up_options), size_of(wanted)
    changes = bool(fixed) or inventory_changed or running_size != wanted_size
    if changes and (found.phase != "running" or not st.head_alive(directory)):
        raise UserError(
            f"cluster {name} is {found.phase} (head pid {found.pid}) and cannot change now; "
            "run the same 'up' again once it runs"
        )
    if fixed:
        runs = " and ".join(r for r, _ in fixed)
        asked = " and ".join(w for _, w in fixed)
        raise UserError(
            f"cluster {name} is running with {runs}; {asked} need{'s' if len(fixed) == 1 else ''} "
            f"'{PROG} down --name {name}' first"
        )
    said: list[str] = []
    if inventory_changed:
        said += _reload(directory, name, options.inventory)
    if running_size != wanted_size:
        said += _resize(directory, name, running_size, wanted_size, capacity(request.inventory))
    current = st.read_state(directory) or found
    if as_json:
        _echo_json({**current.to_dict(), "already_running": True, "changed": said})
        return
    for line in said:
        click.echo(line)
    if found.phase != "running":
        click.echo(f"cluster {name} is already {found.phase} (head pid {found.pid}); nothing changed")
        return
    if said:
        click.echo(f"cluster {name} is running (head pid {current.pid}); '{PROG} status --name {name}' shows it now")
        return
    click.echo(f"cluster {name} is already running with these options; nothing changed")
    # Without the summary of the start, which a scale, adapt or reload since may have made stale.
    _print_connect_info(dataclasses.replace(current, summary={}), directory, detached=True)


def _reload(directory: Path, name: str, inventory: str) -> list[str]:
    """Apply the inventory as ``reload`` does; the lines that say what changed."""
    from ..reload import describe
    from .operations import _moved_lines

    result = control.request(directory, control.Op.RELOAD, timeout=RELOAD_TIMEOUT, inventory=inventory, dry_run=False,
                             batch=1)
    lines = [f"cluster {name}: the inventory changed; reloaded from {result.get('source')} "
             f"(as '{PROG} reload --name {name}' does)"]
    lines += [f"  {line}" for line in describe(result, batch=1)]
    lines += _moved_lines(result)
    return lines


def _resize(
    directory: Path, name: str, running: tuple[str, Any], wanted: tuple[str, Any], every_slot: int
) -> list[str]:
    """Apply the size of ``up`` as ``scale`` or ``adapt`` do; the lines that say what changed."""
    change = f"cluster {name}: {size_text(running)} -> {size_text(wanted)}"
    kind, value = wanted
    if kind == "adapt":
        result = control.request(directory, control.Op.ADAPT, timeout=60.0, minimum=value[0], maximum=value[1])
        info = result.get("adaptive") or {}
        return [f"{change}; adaptive scaling between {info.get('minimum')} and {info.get('maximum')} workers"]
    if running[0] == "adapt":
        control.request(directory, control.Op.ADAPT_OFF, timeout=60.0)
    n = every_slot if value is None else int(value)
    result = control.request(directory, control.Op.SCALE, timeout=60.0, n=n, every_slot=value is None)
    lines = [f"{change}; scaling to {workers_text(result.get('planned_workers'))}"]
    if result.get("capacity_note"):
        lines.append(f"note: {result['capacity_note']}")
    return lines
