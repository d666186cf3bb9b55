"""What every command shares: the ``speccluster-ssh`` command group, which
turns every error into one line and an exit status (2 for user mistakes,
1 otherwise, 130 for Ctrl-C); the common options; loading an inventory;
and finding a running cluster by name and asking its head process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .. import control
from .. import state as st
from ..errors import HostError, SpecClusterError, UserError
from ..messages import PROG, host_error_text, is_inventory_error, one_line
from .display import _error_line

if TYPE_CHECKING:

    from ..inventory import Inventory
    from ..planning import UpCheck

logger = logging.getLogger("speccluster_ssh.cli")


# Seconds a detached head may take beyond --timeout (python start-up, imports, cleanup).
HEAD_SLACK = 60.0


def _exit(code: int) -> NoReturn:
    raise click.exceptions.Exit(code)


class SpecClusterCLI(click.Group):
    """A click group that turns errors into one line and an exit status."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = 0
        try:
            result = super().main(
                args=args, prog_name=prog_name or PROG, complete_var=complete_var, standalone_mode=False, **extra
            )
            code = result if isinstance(result, int) else 0
        except click.exceptions.UsageError as exc:
            code = _usage_error(exc)
        except click.ClickException as exc:
            _error_line(one_line(exc.format_message()))
            code = exc.exit_code
        except click.exceptions.Abort:
            _error_line("aborted")
            code = 1
        except KeyboardInterrupt:
            _error_line("interrupted")
            code = 130
        except Exception as exc:  # the last line of defence: never a traceback for users
            code = _report_exception(exc)
        if standalone_mode:
            sys.exit(code)
        return code

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        # Click's own hint lists every loosely similar command ('lgo' got 'logs', 'stauts'
        # got 'restart' too); suggest one command only when it is really close.
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            visible = [c for c in self.list_commands(ctx) if not getattr(self.get_command(ctx, c), "hidden", False)]
            best = closest_command(name, visible)
            hint = f" Did you mean {best!r}?" if best else ""
            raise click.UsageError(f"No such command {name!r}.{hint}", ctx)
        return super().resolve_command(ctx, args)


# How alike (difflib's ratio) an unknown command and a command must be to suggest it.
SUGGEST_RATIO = 0.75


def closest_command(name: str, commands: Sequence[str]) -> str | None:
    """The one command ``name`` is a likely typo of, or ``None``.

    Parameters
    ----------
    name
        What the user typed.
    commands
        The command names to choose from.

    Returns
    -------
    str or None
        The command with the highest :class:`difflib.SequenceMatcher` ratio,
        if it reaches :data:`SUGGEST_RATIO`.
    """
    import difflib

    scored = [(difflib.SequenceMatcher(None, name.lower(), c).ratio(), c) for c in commands]
    ratio, best = max(scored, default=(0.0, ""))
    return best if ratio >= SUGGEST_RATIO else None


def _usage_error(exc: click.exceptions.UsageError) -> int:
    ctx = exc.ctx
    if ctx is not None and type(exc).__name__ == "NoArgsIsHelpError":
        click.echo(ctx.get_help())
        return 0
    where = ctx.command_path if ctx is not None else PROG
    _error_line(f"{one_line(exc.format_message())} (see '{where} --help')")
    return 2


def _report_exception(exc: BaseException) -> int:
    """Print an exception for users and return the exit status it calls for."""
    if isinstance(exc, UserError) or is_inventory_error(exc):
        _error_line(one_line(str(exc)))
        return 2
    if isinstance(exc, HostError):
        _error_line(host_error_text(exc))
        return 1
    if isinstance(exc, control.ControlError):
        _error_line(str(exc))
        return exc.exit_code
    if isinstance(exc, SpecClusterError):
        _error_line(one_line(str(exc)))
        return 1
    if os.environ.get("SPECCLUSTER_SSH_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    else:
        _error_line(
            f"unexpected {type(exc).__name__}: {one_line(str(exc))} "
            "(set SPECCLUSTER_SSH_DEBUG=1 for the traceback and report it)"
        )
    return 1


@click.group(name=PROG, cls=SpecClusterCLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="speccluster-ssh", prog_name=PROG)
def main() -> None:
    """Deploy Dask clusters over SSH on the hosts of an Ansible inventory.

    \b
    Example:
      speccluster-ssh check inventory.yml
      speccluster-ssh up inventory.yml --detach --name lab
      speccluster-ssh status
      speccluster-ssh down
    """


def _name_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--name", "-n", default=None, metavar="NAME",
        help="Cluster to act on (default: the only running one).",
    )(func)


def _json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)


def _group_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--worker-group", default="workers", show_default=True, metavar="G",
        help="Inventory group whose hosts run workers (absent: every host but the scheduler's).",
    )(func)
    return click.option(
        "--scheduler-group", default="scheduler", show_default=True, metavar="G",
        help="Inventory group whose one host runs the scheduler (absent: this machine).",
    )(func)


def _survey_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--known-hosts`` and ``--timeout`` of the commands that ask every host of an inventory (check, hosts)."""
    func = click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
                        help="Seconds for each host's agent to answer.")(func)
    return click.option("--known-hosts", "known_hosts", type=click.Choice(["strict", "accept-new"]), default=None,
                        help="Host key policy (default: each host's speccluster_known_hosts).")(func)


def _load_inventory(path: str, scheduler_group: str = "scheduler", worker_group: str = "workers") -> Inventory:
    from ..inventory import load_inventory

    inv = load_inventory(path, scheduler_group=scheduler_group, worker_group=worker_group)
    for warning in inv.warnings:
        click.echo(f"{PROG}: warning: {warning}", err=True)
    return inv


def _parse_adapt(value: str | None) -> tuple[int, int] | None:
    # UserError, not click's BadParameter: its line would name the command, and up and plan must agree.
    if value is None:
        return None
    low, sep, high = value.partition(":")
    try:
        if not sep:
            raise ValueError
        minimum = int(low) if low.strip() else 0
        maximum = int(high)
    except ValueError:
        raise UserError(f"invalid value for '--adapt': {value!r} is not MIN:MAX, e.g. 2:8") from None
    if minimum < 0 or maximum < minimum:
        raise UserError(f"invalid value for '--adapt': {value!r}: need 0 <= MIN <= MAX")
    return minimum, maximum


def _inventory_or_local(inventory: str | None) -> str:
    """The inventory argument, or the packaged local inventory when none is given."""
    if inventory is not None:
        return inventory
    from ..resources import local_inventory

    return str(local_inventory())


@dataclass
class UpRequest:
    """``up``'s command line, read and checked (see :func:`_prepare_up`)."""

    inventory: Inventory
    source: str
    name: str
    adapt: tuple[int, int] | None
    check: UpCheck
    dashboard_address: str | None = None


def _prepare_up(
    source: str, *, name: str | None, workers: int | None, adapt_range: str | None, placement: str | None,
    min_workers: str | None, scheduler_reach: str | None, scheduler_group: str, worker_group: str,
    dashboard_address: str | None = None,
) -> UpRequest:
    """Every check of ``up`` before it starts anything, shared with ``plan``.

    Both commands call this first, so that ``plan`` fails where ``up`` would
    fail, with the same stderr (warnings included) and exit status.
    """
    from ..planning import check_up

    adapt = _parse_adapt(adapt_range)
    inv = _load_inventory(source, scheduler_group, worker_group)
    cluster_name = st.check_name(name or st.default_name(source))
    check = check_up(
        inv, source, workers=workers, adapt=adapt, placement=placement, min_workers=min_workers,
        scheduler_reach=scheduler_reach, worker_group=worker_group,
    )
    from ..dashboards import checked_address

    address = checked_address(dashboard_address)
    for warning in check.warnings:
        click.echo(f"{PROG}: warning: {warning}", err=True)
    return UpRequest(inv, source, cluster_name, adapt, check, address)


def _check_bytes(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    from dask.utils import parse_bytes

    try:
        parse_bytes(value)
    except (ValueError, TypeError):
        raise click.BadParameter(f"{value!r} is not a size; write e.g. '64 GiB'", param_hint=f"'{option}'") from None
    return value


def _named_state(name: str) -> tuple[Path, st.ClusterState | None]:
    """The state directory of cluster ``name`` and its state (``None`` without one).

    A directory this user may not read is another user's (state
    directories are 0700): one line, exit 2, nothing read or touched.
    """
    directory = st.cluster_dir(name)
    try:
        return directory, st.read_state(directory) if directory.is_dir() else None
    except PermissionError:
        raise UserError(
            f"cluster {name!r} in {directory.parent} is not yours (permission denied); use your own "
            "state directory (unset speccluster-ssh.state-dir and XDG_STATE_HOME)"
        ) from None


def _resolve(name: str | None, *, allow_stale: bool = False) -> st.KnownCluster:
    if name is not None:
        directory, found = _named_state(name)
        if found is None:
            raise UserError(f"no cluster named {name!r} on this machine; '{PROG} list' shows the known ones")
        return st.KnownCluster(found, directory, st.head_alive(directory))
    known = st.known_clusters()
    alive = [k for k in known if k.alive]
    candidates = alive or (known if allow_stale else [])
    if len(candidates) == 1:
        chosen = candidates[0]
        click.echo(f"using cluster {chosen.state.name} (the only {chosen.status} one)", err=True)
        return chosen
    if not candidates:
        raise UserError(f"no cluster is running on this machine; start one with '{PROG} up INVENTORY'")
    names = ", ".join(k.state.name for k in candidates)
    raise UserError(f"{len(candidates)} clusters are running ({names}); choose one with --name")


def _hosts_seen_by_running_cluster(name: str) -> dict[str, dict[str, Any]]:
    """Host name -> state, reason and fix, as a running cluster called ``name`` sees them; ``{}`` if none runs."""
    directory = st.cluster_dir(name)
    try:
        found = st.read_state(directory) if directory.is_dir() else None
    except PermissionError:  # another user's
        return {}
    if found is None or found.phase != "running" or not st.head_alive(directory):
        return {}
    try:
        report = control.request(directory, control.Op.STATUS, timeout=10)
    except control.ControlError as exc:
        logger.info("cluster %s runs but did not answer for plan: %s", name, exc)
        return {}
    return {
        h: {"state": v.get("state"), "reason": v.get("reason", ""), "fix": v.get("fix", "")}
        for h, v in (report.get("hosts") or {}).items()
    }


def _ask(known: st.KnownCluster, op: control.Op, *, timeout: float = 60.0, **fields: Any) -> Any:
    if not known.alive:
        raise control.ControlError(
            f"cluster {known.state.name} is stale: its head process (pid {known.state.pid}) is gone; "
            f"'{PROG} down --name {known.state.name}' removes what is left"
        )
    return control.request(known.directory, op, timeout=timeout, **fields)


def _setup_logging(level: int) -> None:
    package = logging.getLogger("speccluster_ssh")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        package.addHandler(handler)
    package.setLevel(level)
    # The head's scheduler logs a closed worker comm at INFO with a traceback; a
    # cluster's close stops its workers first, so that line is routine there.
    logging.getLogger("distributed.batched").setLevel(logging.WARNING)
