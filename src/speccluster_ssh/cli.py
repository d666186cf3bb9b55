"""The ``speccluster-ssh`` command line.

``up`` starts a cluster from an inventory, in the foreground (Ctrl-C stops
it) or detached (``--detach``: a head process keeps the cluster object, its
healing loop and adaptive scaling alive, and serves a control socket).
``status``, ``scale``, ``adapt``, ``logs`` and ``down`` talk to that head
process; ``list`` shows the clusters known on this machine; ``inventory``,
``plan`` and ``check`` look at an inventory without starting a cluster.

User mistakes are reported as one line on stderr with exit status 2; other
failures exit with status 1.

This module only parses arguments and presents results: the head process is
in :mod:`~speccluster_ssh.head`, the control socket in
:mod:`~speccluster_ssh.control`, ``check`` in :mod:`~speccluster_ssh.preflight`
and ``plan`` in :mod:`~speccluster_ssh.planning`. It is longer than the other
modules (about 1100 lines) because each of its eleven commands carries its
options, help text with examples, and its table and text output; splitting
the commands over several files would scatter one command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import control
from . import state as st
from .errors import HostError, SpecClusterError, UserError
from .head import CLOSE_TIMEOUT, Head, UpOptions
from .messages import PROG, host_error_text, is_inventory_error, one_line

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from .inventory import Inventory

logger = logging.getLogger(__name__)

# Seconds a detached head may take beyond --timeout (python start-up, imports, cleanup).
HEAD_SLACK = 60.0


# -- output helpers -------------------------------------------------------------------


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    # Pipes and test runners get 80 columns by default, which mangles tables.
    return Console(stderr=stderr, width=160)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _error_line(message: str) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text cells: inventory values such as "node[01]" must not be read as markup.
        table.add_row(*(Text("" if v is None else str(v)) for v in row))
    return table


def _bytes(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        from dask.utils import format_bytes

        return format_bytes(int(value))
    return "" if value in (None, 0) else str(value)


def _exit(code: int) -> NoReturn:
    raise click.exceptions.Exit(code)


# -- the command group -------------------------------------------------------------------


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


def _load_inventory(path: str, scheduler_group: str = "scheduler", worker_group: str = "workers") -> Inventory:
    from .inventory import load_inventory

    inv = load_inventory(path, scheduler_group=scheduler_group, worker_group=worker_group)
    for warning in inv.warnings:
        click.echo(f"{PROG}: warning: {warning}", err=True)
    return inv


def _parse_adapt(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    low, sep, high = value.partition(":")
    try:
        if not sep:
            raise ValueError
        minimum = int(low) if low.strip() else 0
        maximum = int(high)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not MIN:MAX, e.g. 2:8", param_hint="'--adapt'") from None
    if minimum < 0 or maximum < minimum:
        raise click.BadParameter(f"{value!r}: need 0 <= MIN <= MAX", param_hint="'--adapt'")
    return minimum, maximum


def _check_bytes(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    from dask.utils import parse_bytes

    try:
        parse_bytes(value)
    except (ValueError, TypeError):
        raise click.BadParameter(f"{value!r} is not a size; write e.g. '64 GiB'", param_hint=f"'{option}'") from None
    return value


# -- progress display ------------------------------------------------------------------------


class ProgressView:
    """Shows hosts connecting and workers registering.

    On a terminal a live table is redrawn; elsewhere (CI, pipes) one line
    is printed whenever a host changes state, with its count and elapsed time.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Any = None
        self.last: dict[str, tuple[str, int, int, str]] = {}

    def update(self, progress: Mapping[str, Any]) -> None:
        rows = progress.get("hosts", [])
        if self.console.is_terminal:
            if self.live is None:
                from rich.live import Live

                self.live = Live(console=self.console, auto_refresh=False, transient=False)
                self.live.start()
            self.live.update(self.render(progress), refresh=True)
            return
        from rich.text import Text

        for row in rows:
            key = (row["label"], row["ready"], row["wanted"], row["reason"])
            if self.last.get(row["host"]) != key:
                self.last[row["host"]] = key
                self.console.print(Text(self._line(row)), soft_wrap=True)

    @staticmethod
    def _line(row: Mapping[str, Any]) -> str:
        what = "scheduler" if row["role"] == "scheduler" else "workers"
        line = f"{row['host']}: {row['label']}, {row['ready']}/{row['wanted']} {what} ({row['seconds']:.1f} s)"
        return line + (f" - {row['reason']}" if row.get("reason") else "")

    @staticmethod
    def render(progress: Mapping[str, Any]) -> RenderableType:
        """A table of the hosts in ``progress``."""
        rows = [
            (r["host"], r["role"], r["label"], f"{r['ready']}/{r['wanted']}", f"{r['seconds']:.1f} s", r["reason"])
            for r in progress.get("hosts", [])
        ]
        title = f"cluster {progress.get('name')}: {progress.get('phase')} ({progress.get('seconds', 0):.1f} s)"
        return _table(("host", "role", "state", "ready", "elapsed", "reason"), rows, title=title)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _reach_line(reach: Mapping[str, Any]) -> str:
    """``forward, scheduler on h1: why`` from a ``scheduler_reach`` report."""
    where = reach.get("scheduler_host") or "the head"
    return f"{reach.get('mode')}, scheduler on {where}: {reach.get('why')}"


def _print_connect_info(state: st.ClusterState, directory: Path, *, detached: bool) -> None:
    lines = [
        f"cluster {state.name} is running (head pid {state.pid})",
        f"  scheduler: {state.scheduler_address}",
        f"  dashboard: {state.dashboard_link or '(none)'}",
    ]
    if state.scheduler_reach:
        lines.append(f"  reach:     {_reach_line(state.scheduler_reach)}")
    if state.client_config:
        lines.append(f"  connect:   DASK_CONFIG={state.client_config} python -c 'from distributed import Client; Client()'")
        lines.append(f"             or paste the output of: {PROG} client-config --name {state.name}")
    if not state.tls:
        lines.append("  TLS is off: anyone who can reach the scheduler can run code as you")
    if detached:
        lines.append(f"  stop:      {PROG} down --name {state.name}")
    else:
        lines.append("  stop:      press Ctrl-C")
    if state.summary:
        from .reporting import summary_line

        lines.append(summary_line(state.summary))
    for line in lines:
        click.echo(line)


# -- resolving a cluster name ------------------------------------------------------------------


def _resolve(name: str | None, *, allow_stale: bool = False) -> st.KnownCluster:
    if name is not None:
        directory = st.cluster_dir(name)
        found = st.read_state(directory) if directory.is_dir() else None
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
    found = st.read_state(directory) if directory.is_dir() else None
    if found is None or found.phase != "running" or not st.head_alive(directory):
        return {}
    try:
        report = control.request(directory, "status", timeout=10)
    except control.ControlError as exc:
        logger.info("cluster %s runs but did not answer for plan: %s", name, exc)
        return {}
    return {
        h: {"state": v.get("state"), "reason": v.get("reason", ""), "fix": v.get("fix", "")}
        for h, v in (report.get("hosts") or {}).items()
    }


def _ask(known: st.KnownCluster, op: str, *, timeout: float = 60.0, **fields: Any) -> Any:
    if not known.alive:
        raise control.ControlError(
            f"cluster {known.state.name} is stale: its head process (pid {known.state.pid}) is gone; "
            f"'{PROG} down --name {known.state.name}' removes what is left"
        )
    return control.request(known.directory, op, timeout=timeout, **fields)


# -- commands: inventory, plan, check ----------------------------------------------------------


@main.command()
@click.argument("inventory", metavar="INVENTORY")
@click.option("--list", "show_list", is_flag=True, help="JSON as 'ansible-inventory --list' prints it.")
@click.option("--hosts", "show_hosts", is_flag=True, help="One row per host with its speccluster settings (default).")
@_json_option
@_group_options
def inventory(
    inventory: str, show_list: bool, show_hosts: bool, as_json: bool, scheduler_group: str, worker_group: str
) -> None:
    """Show how INVENTORY is read, without contacting any host.

    \b
    Example:
      speccluster-ssh inventory lab.yml --hosts
      speccluster-ssh inventory lab.yml --list > lab.json
    """
    if show_list and show_hosts:
        raise click.UsageError("--list and --hosts exclude each other; pick one")
    inv = _load_inventory(inventory, scheduler_group, worker_group)
    if show_list:
        _echo_json(inv.to_ansible_list())
        return
    from .inventory import hosts_table_rows

    rows = hosts_table_rows(inv)
    if as_json:
        _echo_json(rows)
        return
    columns = ("name", "address", "port", "user", "connection", "role", "python",
               "nworkers", "nthreads", "memory_limit", "slots", "resources")
    table_rows = []
    for row in rows:
        values = dict(row)
        values["nthreads"] = row["nthreads"] if row["nthreads"] is not None else "auto"
        values["memory_limit"] = _bytes(row["memory_limit"])
        values["resources"] = ", ".join(f"{k}={v}" for k, v in row["resources"].items())
        table_rows.append([values.get(c) for c in columns])
    _console().print(_table(columns, table_rows, title=f"{len(rows)} hosts in {inventory}"))


@main.command()
@click.argument("inventory", metavar="INVENTORY")
@click.option("--name", "-n", default=None, metavar="NAME", help="Cluster name (default: the inventory's file name).")
@click.option("--workers", "-w", type=click.IntRange(min=0), default=None, help="Dask workers (default: every slot).")
@click.option("--adapt", "adapt_range", default=None, metavar="MIN:MAX", help="Start MIN workers (adaptive range).")
@click.option("--placement", type=click.Choice(["spread", "pack"]), default=None, help="Where entries go.")
@click.option("--no-tls", is_flag=True, help="Plain TCP instead of TLS.")
@_group_options
@_json_option
def plan(
    inventory: str, name: str | None, workers: int | None, adapt_range: str | None, placement: str | None,
    no_tls: bool, scheduler_group: str, worker_group: str, as_json: bool,
) -> None:
    """Show what 'up' would start on each host, touching no host.

    Per host: the spec entries, the exact remote command of the host agent
    (shell-quoted), the prologue and the environment of the dask processes.
    When a cluster of that name runs, a table first lists the hosts it
    cannot use now (down or put aside) and why.

    \b
    Example:
      speccluster-ssh plan lab.yml --workers 8
      speccluster-ssh plan lab.yml --json | jq '.hosts[].command_line'
    """
    from . import config
    from .planning import build_plan

    adapt = _parse_adapt(adapt_range)
    inv = _load_inventory(inventory, scheduler_group, worker_group)
    cluster_name = st.check_name(name or st.default_name(inventory))
    if workers is None and adapt is not None:
        workers = adapt[0]
    tls = False if no_tls else bool(config.get("tls"))
    result = build_plan(inv, name=cluster_name, workers=workers, placement=placement or config.get("placement"), tls=tls)
    seen = _hosts_seen_by_running_cluster(cluster_name)
    for host in result["hosts"]:
        if host["host"] in seen:
            host["seen"] = seen[host["host"]]
    if as_json:
        _echo_json(result)
        return
    click.echo(f"plan for cluster {cluster_name} (dry run: nothing is started, no host is contacted)")
    unusable = {h: v for h, v in seen.items() if v.get("state") in ("down", "aside")}
    if unusable:
        _console().print(_table(
            ("host", "state", "reason"),
            [(h, v["state"], (v.get("reason") or "") + (f"; fix: {v['fix']}" if v.get("fix") else ""))
             for h, v in unusable.items()],
            title=f"hosts the running cluster {cluster_name} cannot use now",
        ))
    click.echo(f"  scheduler: {result['scheduler']}; TLS {'on' if tls else 'off'}; placement {result['placement']}")
    wanted = "every slot" if workers is None else f"{workers} requested"
    click.echo(f"  workers: {result['workers_planned']} planned ({wanted}; the inventory holds {result['capacity']})")
    for host in result["hosts"]:
        click.echo("")
        role = " [scheduler]" if host["scheduler"] else ""
        click.echo(f"host {host['host']}{role}: {host['target']}, {host['slots']} slot(s)")
        if not host["started"]:
            click.echo("  nothing placed here: the agent is not started")
            continue
        for entry in host["entries"]:
            opts = ", ".join(f"{k}={v}" for k, v in entry["options"].items())
            click.echo(f"  entry {entry['entry']}: {entry['class']} x{len(entry['workers'])} "
                       f"({', '.join(entry['workers'])}); {opts}")
        env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in host["environment"].items())
        click.echo(f"  environment: {env}")
        if host["prologue"]:
            click.echo("  prologue (run by /bin/sh before the agent):")
            for line in str(host["prologue"]).splitlines():
                click.echo(f"    {line}")
        click.echo("  remote command (the agent's source follows on its stdin):")
        for line in host["command_line"].splitlines():
            click.echo(f"    {line}")


@main.command()
@click.argument("inventory", metavar="INVENTORY")
@click.option("--known-hosts", "known_hosts", type=click.Choice(["strict", "accept-new"]), default=None,
              help="Host key policy (default: each host's speccluster_known_hosts).")
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds for each host's agent to answer.")
@_group_options
@_json_option
def check(
    inventory: str, known_hosts: str | None, timeout: float, scheduler_group: str, worker_group: str, as_json: bool
) -> None:
    """Preflight every host of INVENTORY: SSH, host key, python, distributed, disk.

    Starts the host agent once per host (nothing else) and stops it again.
    Exit status 1 when any host fails.

    \b
    Example:
      speccluster-ssh check lab.yml
      speccluster-ssh check lab.yml --known-hosts accept-new --json
    """
    import distributed

    inv = _load_inventory(inventory, scheduler_group, worker_group)
    from .preflight import check_lab

    rows, choice = check_lab(inv, known_hosts, timeout)
    failed = [r for r in rows if not r["ok"]]
    if as_json:
        _echo_json({"head": {"python": sys.version.split()[0], "distributed": distributed.__version__},
                    "hosts": rows, "ok": not failed,
                    "scheduler_reach": choice.as_dict() if choice is not None else None})
    else:
        yes_no = {True: "yes", False: "NO"}
        columns = ("host", "address", "via", "result", "python", "version", "distributed", "cpus", "memory",
                   "free disk", "reaches head", "reaches peers", "time", "problems")
        table_rows = [
            (r["host"], r["address"], r.get("via") or ("direct" if "via" in r else ""), r["result"], r.get("python"),
             r.get("python_version"), r.get("distributed"), r.get("cpu_count"), _bytes(r.get("memory")),
             _bytes(r.get("free_disk")), yes_no.get(r.get("reaches_head"), ""),
             yes_no.get(r.get("reaches_peers"), ""), f"{r['seconds']:.1f} s", "; ".join(r["problems"]))
            for r in rows
        ]
        title = f"head: python {sys.version.split()[0]}, distributed {distributed.__version__}"
        _console().print(_table(columns, table_rows, title=title))
        if choice is not None:
            where = f"on {choice.scheduler_host}" if choice.scheduler_host else "on the head"
            click.echo(f"up would run the scheduler {where}, mode {choice.mode}: {choice.why}")
        for r in rows:
            if r.get("unreached_peers"):
                click.echo(f"{r['host']}: {r['problems'][0]}")
        if failed:
            click.echo(f"{len(failed)} of {len(rows)} hosts failed", err=True)
    if failed:
        _exit(1)


# -- commands: up and the head process ----------------------------------------------------------


def _report_existing(directory: Path, as_json: bool) -> None:
    found = st.read_state(directory)
    if found is None:
        raise SpecClusterError(f"cluster {directory.name} is being set up by another command; try again shortly")
    if as_json:
        _echo_json({**found.to_dict(), "already_running": True})
        return
    if found.phase != "running":
        click.echo(f"cluster {found.name} is already {found.phase} (head pid {found.pid}); nothing changed")
        return
    click.echo(f"cluster {found.name} is already running; nothing changed")
    _print_connect_info(found, directory, detached=True)


def _clear_stale(directory: Path) -> None:
    """Empty a cluster directory of a dead head (we hold the lock, so keep the lock file)."""
    previous = st.read_state(directory)
    leftovers = [p for p in directory.iterdir() if p.name != st.LOCK_FILE]
    if previous is not None and leftovers:
        click.echo(
            f"cluster {directory.name}: removing the state of a previous head (pid {previous.pid}) that is gone",
            err=True,
        )
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            st.remove_cluster_dir(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _setup_logging(level: int) -> None:
    package = logging.getLogger("speccluster_ssh")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        package.addHandler(handler)
    package.setLevel(level)


@main.command()
@click.argument("inventory", metavar="INVENTORY")
@click.option("--name", "-n", default=None, metavar="NAME", help="Cluster name (default: the inventory's file name).")
@click.option("--workers", "-w", type=click.IntRange(min=0), default=None,
              help="Dask workers to start (default: every worker host's slots).")
@click.option("--adapt", "adapt_range", default=None, metavar="MIN:MAX",
              help="Scale adaptively between MIN and MAX workers.")
@click.option("--detach", "-d", is_flag=True, help="Return once the cluster is up; a head process keeps it.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None,
              help="Seconds for the cluster to come up (default: config start-timeout).")
@click.option("--placement", type=click.Choice(["spread", "pack"]), default=None,
              help="Spread entries over hosts or pack them (default: config placement).")
@click.option("--known-hosts", "known_hosts", type=click.Choice(["strict", "accept-new"]), default=None,
              help="Host key policy (default: each host's speccluster_known_hosts).")
@click.option("--no-tls", is_flag=True, help="Plain TCP instead of TLS (anyone reaching the scheduler can run code).")
@click.option("--min-workers", "min_workers", default=None, metavar="M",
              help="Workers the start needs: a count, a fraction (0.5) or a percentage (50%); default 1. "
                   "Hosts that do not answer are retried in the background.")
@click.option("--scheduler-reach", "scheduler_reach", type=click.Choice(["auto", "direct", "forward"]), default=None,
              help="How the head reaches the scheduler (default: speccluster_scheduler_reach, else config "
                   "scheduler-reach).")
@_group_options
@_json_option
def up(
    inventory: str, name: str | None, workers: int | None, adapt_range: str | None, detach: bool,
    timeout: float | None, placement: str | None, known_hosts: str | None, no_tls: bool, min_workers: str | None,
    scheduler_reach: str | None, scheduler_group: str, worker_group: str, as_json: bool,
) -> None:
    """Start a Dask cluster on the hosts of INVENTORY.

    In the foreground the cluster runs until Ctrl-C (or SIGTERM), then it is
    closed cleanly. With --detach the command returns once the cluster is up
    and a head process keeps it; use status, scale, adapt, logs and down.
    Running 'up' again for a running name reports it and changes nothing.
    Hosts that do not answer do not stop the start: the last line says
    which are down and why, and they join when they answer. The exit
    status is 0 when --min-workers workers came up, 1 otherwise.

    \b
    Example:
      speccluster-ssh up lab.yml --detach --name lab --workers 8
      speccluster-ssh up lab.yml --detach --min-workers 75%
      speccluster-ssh up inventories/local.yml
    """
    from . import config

    adapt = _parse_adapt(adapt_range)
    inv = _load_inventory(inventory, scheduler_group, worker_group)
    cluster_name = st.check_name(name or st.default_name(inventory))
    if not inv.worker_hosts:
        raise UserError(
            f"{inventory}: no worker hosts (group {worker_group!r} is empty or every host has "
            "speccluster_slots: 0); add hosts to run workers on"
        )
    policy = placement or config.get("placement")
    if policy not in ("spread", "pack"):
        raise UserError(f"config speccluster-ssh.placement is {policy!r}; set it to spread or pack")
    wanted = workers if workers is not None else (adapt[0] if adapt is not None else None)
    entries = None
    if wanted is not None:
        from .planning import capacity, place_entries

        placed = place_entries(inv, wanted, policy)
        entries = len(placed)
        if sum(h.nworkers for _, h in placed) < wanted:
            click.echo(f"{PROG}: warning: asked for {wanted} workers; the inventory holds {capacity(inv)}, "
                       "starting that many", err=True)
    if min_workers is not None:
        from .planning import capacity
        from .scaling import resolve_min_workers

        try:
            resolve_min_workers(min_workers, wanted if wanted is not None else capacity(inv))
        except UserError as exc:
            raise UserError(f"--min-workers: {exc}") from None
    options = UpOptions(
        name=cluster_name,
        inventory=str(Path(inventory).expanduser().absolute()) if os.path.exists(inventory) else inventory,
        entries=entries,
        workers=workers,
        adapt=adapt,
        timeout=float(timeout or config.get("start-timeout")),
        placement=policy,
        known_hosts=known_hosts,
        tls=False if no_tls else None,
        scheduler_group=scheduler_group,
        worker_group=worker_group,
        min_workers=min_workers,
        scheduler_reach=scheduler_reach,
    )
    directory = st.make_cluster_dir(cluster_name)
    lock = st.HeadLock(directory)
    if not lock.acquire():
        _report_existing(directory, as_json)
        return
    try:
        _clear_stale(directory)
        if detach:
            code = _up_detached(options, directory, lock, as_json)
        else:
            code = _up_foreground(options, directory, lock, as_json)
    finally:
        if not detach:
            # Whatever ended the foreground head (even Ctrl-C before it ran), nothing of it survives.
            st.remove_cluster_dir(directory)
        lock.release()
    if code:
        _exit(code)


def _up_foreground(options: UpOptions, directory: Path, lock: st.HeadLock, as_json: bool) -> int:
    _setup_logging(logging.WARNING)
    head = Head(options, directory, lock, detached=False)
    view = ProgressView(_console(stderr=True))

    def on_running(state: st.ClusterState) -> None:
        view.stop()
        if as_json:
            _echo_json(state.to_dict())
        else:
            _print_connect_info(state, directory, detached=False)

    try:
        code = asyncio.run(head.run(on_progress=view.update, on_running=on_running))
    finally:
        view.stop()
    if head.phase == "failed":
        _error_line(head.error)
        return head.error_exit
    if code == 0:
        click.echo(f"cluster {options.name} closed", err=True)
    else:
        _error_line(f"cluster {options.name} did not close cleanly")
    return code


def _up_detached(options: UpOptions, directory: Path, lock: st.HeadLock, as_json: bool) -> int:
    if lock.fd is None:
        raise SpecClusterError("internal: the head lock is not held")
    log_fd = os.open(directory / st.LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    argv = [sys.executable, "-m", "speccluster_ssh.cli", "_serve", "--lock-fd", str(lock.fd), options.to_json()]
    try:
        # Its own session: Ctrl-C or a closed terminal must not reach the head.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            pass_fds=(lock.fd,), start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        st.remove_cluster_dir(directory)
        raise SpecClusterError(f"cannot start the head process ({sys.executable}): {exc}") from None
    finally:
        os.close(log_fd)
    view = ProgressView(_console(stderr=True))
    deadline = time.monotonic() + options.timeout + HEAD_SLACK
    progress: dict[str, Any] | None = None
    try:
        while True:
            code = proc.poll()
            if code is not None:
                break
            try:
                progress = control.request(directory, "progress", timeout=10)
            except control.ControlError as exc:
                # Expected until the head serves its socket; proc.poll() above notices a dead head.
                logger.debug("no progress yet: %s", exc)
            if progress is not None:
                view.update(progress)
                if progress.get("phase") == "running":
                    break
            if time.monotonic() > deadline:
                proc.terminate()
                proc.wait(timeout=CLOSE_TIMEOUT)
                code = proc.returncode
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        view.stop()
        _error_line(f"interrupted; stopping the head process of cluster {options.name}")
        proc.terminate()
        try:
            proc.wait(timeout=CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            _error_line(f"the head process (pid {proc.pid}) did not stop within {CLOSE_TIMEOUT:g} s; "
                        f"stop it with 'kill {proc.pid}'")
        return 130
    finally:
        view.stop()
    found = st.read_state(directory)
    if progress is not None and progress.get("phase") == "running" and found is not None and proc.poll() is None:
        if as_json:
            _echo_json(found.to_dict())
        else:
            _print_connect_info(found, directory, detached=True)
        return 0
    # The head is gone: say why, then remove what it left.
    if found is not None and found.error:
        message, status = found.error, found.error_exit
    else:
        tail = _tail(directory / st.LOG_FILE)
        message = f"the head process of cluster {options.name} exited with status {code}" + (
            f"; its log ends with:\n{tail}" if tail else ""
        )
        status = 1
    st.remove_cluster_dir(directory)
    _error_line(message)
    return status


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


@main.command("_serve", hidden=True)
@click.option("--lock-fd", type=int, required=True)
@click.argument("spec")
def serve(lock_fd: int, spec: str) -> None:
    """Run a detached head process (started by 'up --detach')."""
    options = UpOptions.from_json(spec)
    directory = st.cluster_dir(options.name)
    # The agent subprocesses of local hosts must not inherit the lock.
    os.set_inheritable(lock_fd, False)
    _setup_logging(logging.INFO)
    head = Head(options, directory, st.HeadLock(directory, lock_fd), detached=True)
    code = asyncio.run(head.run())
    if head.phase == "failed":
        logger.error("start failed: %s", head.error)
    _exit(code)


# -- commands talking to a running cluster -------------------------------------------------------


def _render_status(report: Mapping[str, Any]) -> None:
    console = _console()
    if report.get("phase") != "running":
        console.print(ProgressView.render(report.get("progress") or report))
        return
    adaptive = report.get("adaptive")
    scaling = f"adaptive {adaptive['minimum']}..{adaptive['maximum']}" if adaptive else "manual scaling"
    lines = [
        f"cluster {report.get('name')}: running (head pid {report.get('pid')}, since {report.get('started')}, {scaling})",
        f"  scheduler: {report.get('scheduler_address')}",
        f"  dashboard: {report.get('dashboard_link') or '(none)'}",
    ]
    reach = report.get("scheduler_reach")
    if reach:
        lines.append(f"  reach:     {_reach_line(reach)}")
    for line in lines:
        click.echo(line)
    hosts = report.get("hosts", {})
    console.print(_table(
        ("host", "address", "state", "slots used", "reason"),
        [(h, v.get("address"), f"{v.get('state')}, drained" if v.get("drained") else v.get("state"),
          f"{v.get('slots_used')}/{v.get('slots')}",
          "; ".join(filter(None, (f"drained: {v['drained']}" if v.get("drained") else "", v.get("reason") or "")))
          + (f"; fix: {v['fix']}" if v.get("fix") else ""))
         for h, v in hosts.items()],
        title="hosts",
    ))
    if report.get("summary"):
        from .reporting import summary_line

        click.echo(summary_line(report["summary"]))
    workers = report.get("workers", [])
    console.print(_table(
        ("name", "host", "address", "status", "threads", "memory"),
        [(w.get("name"), w.get("host"), w.get("address"), w.get("status"), w.get("threads"),
          _bytes(w.get("memory_limit"))) for w in workers],
        title=f"{len(workers)} workers",
    ))
    if report.get("capacity_note"):
        click.echo(f"note: {report['capacity_note']}")


@main.command()
@_name_option
@_json_option
def status(name: str | None, as_json: bool) -> None:
    """Show the scheduler, the dashboard, every host and every worker of a cluster.

    \b
    Example:
      speccluster-ssh status --name lab
      speccluster-ssh status --json | jq '.workers[].address'
    """
    known = _resolve(name)
    report = _ask(known, "status")
    if as_json:
        _echo_json(report)
    else:
        _render_status(report)


@main.command()
@click.argument("n", type=click.IntRange(min=0), required=False)
@click.option("--cores", type=click.IntRange(min=1), default=None, help="At least this many threads in total.")
@click.option("--memory", default=None, metavar="SIZE", help="At least this much worker memory, e.g. '64 GiB'.")
@_name_option
@_json_option
def scale(n: int | None, cores: int | None, memory: str | None, name: str | None, as_json: bool) -> None:
    """Scale a cluster to N dask workers (or to --cores / --memory).

    Group entries count as their size and are added or removed whole.
    Asking for more than the inventory holds scales to its capacity.

    \b
    Example:
      speccluster-ssh scale 8
      speccluster-ssh scale --cores 64 --name lab
    """
    if n is None and cores is None and memory is None:
        raise click.UsageError("give a number of workers N, --cores or --memory")
    _check_bytes(memory, "--memory")
    known = _resolve(name)
    result = _ask(known, "scale", n=n or 0, cores=cores, memory=memory)
    if as_json:
        _echo_json(result)
        return
    click.echo(f"cluster {known.state.name}: scaling to {result['planned_workers']} workers")
    if result.get("capacity_note"):
        click.echo(f"note: {result['capacity_note']}")
    if result.get("adaptive"):
        click.echo(f"note: adaptive scaling is on and may change this; '{PROG} adapt --off' stops it")


@main.command()
@click.option("--minimum", type=click.IntRange(min=0), default=None, help="Fewest workers.")
@click.option("--maximum", type=click.IntRange(min=0), default=None, help="Most workers (default: capacity).")
@click.option("--minimum-memory", default=None, metavar="SIZE", help="Keep at least this much memory, e.g. '32 GiB'.")
@click.option("--maximum-memory", default=None, metavar="SIZE", help="Use at most this much memory.")
@click.option("--off", is_flag=True, help="Stop adaptive scaling (the workers stay).")
@_name_option
@_json_option
def adapt(
    minimum: int | None, maximum: int | None, minimum_memory: str | None, maximum_memory: str | None,
    off: bool, name: str | None, as_json: bool,
) -> None:
    """Scale a cluster automatically with its load, or stop doing so.

    \b
    Example:
      speccluster-ssh adapt --minimum 2 --maximum 16
      speccluster-ssh adapt --off
    """
    bounds = (minimum, maximum, minimum_memory, maximum_memory)
    if off and any(b is not None for b in bounds):
        raise click.UsageError("--off takes no bounds; give either --off or --minimum/--maximum")
    if not off and all(b is None for b in bounds):
        raise click.UsageError("give --minimum/--maximum (or memory bounds), or --off")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise click.UsageError(f"--minimum {minimum} is larger than --maximum {maximum}")
    _check_bytes(minimum_memory, "--minimum-memory")
    _check_bytes(maximum_memory, "--maximum-memory")
    known = _resolve(name)
    if off:
        result = _ask(known, "adapt-off")
        message = "adaptive scaling stopped" if result.get("was_on") else "adaptive scaling was not on"
    else:
        result = _ask(known, "adapt", minimum=minimum, maximum=maximum,
                      minimum_memory=minimum_memory, maximum_memory=maximum_memory)
        info = result.get("adaptive") or {}
        message = f"adaptive scaling between {info.get('minimum')} and {info.get('maximum')} workers"
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"cluster {known.state.name}: {message}")


def _new_text(old: str, new: str) -> str:
    """What ``new`` adds after ``old``.

    Log tails are windows of bounded size: when the window slides, ``new``
    is an end part of ``old`` followed by the added text. Of the possible
    overlaps the longest is taken, so repeated lines are not printed twice.
    """
    if not old:
        return new
    if new.startswith(old):
        return new[len(old):]
    anchor = old[-256:]
    best = -1
    start = new.find(anchor)
    while start >= 0:
        end = start + len(anchor)
        if old.endswith(new[:end]):
            best = end
        start = new.find(anchor, start + 1)
    return new[best:] if best >= 0 else new


@main.command()
@click.argument("target", required=False, metavar="[WORKER|HOST]")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True,
              help="Seconds between polls with --follow.")
@_name_option
@_json_option
def logs(target: str | None, follow: bool, interval: float, name: str | None, as_json: bool) -> None:
    """Print the logs of a cluster's workers (also of dead ones) and scheduler.

    TARGET picks one worker by name, every worker of one host, 'scheduler',
    or 'head' (the log of a detached head process on this machine).

    \b
    Example:
      speccluster-ssh logs
      speccluster-ssh logs node03 --follow
    """
    known = _resolve(name)
    if target == "head":
        text = (known.directory / st.LOG_FILE).read_text(errors="replace") if (known.directory / st.LOG_FILE).exists() else ""
        if as_json:
            _echo_json({"head": text})
        else:
            click.echo(text, nl=False)
        return
    current = _ask(known, "logs", target=target)
    if as_json and not follow:
        _echo_json(current)
        return
    seen: dict[str, str] = {}

    def show(logs_now: Mapping[str, str]) -> None:
        for source, text in logs_now.items():
            added = _new_text(seen.get(source, ""), text)
            seen[source] = text
            if not added.strip():
                continue
            if follow:
                for line in added.splitlines():
                    click.echo(f"{source} | {line}")
            else:
                click.echo(f"==> {source} <==")
                click.echo(added.rstrip("\n"))

    show(current)
    if not follow:
        return
    try:
        while True:
            time.sleep(interval)
            show(_ask(known, "logs", target=target))
    except KeyboardInterrupt:
        return
    except control.ControlError:
        if not st.head_alive(known.directory):
            click.echo(f"cluster {known.state.name} is gone", err=True)
            return
        raise


@main.command()
@_name_option
@click.option("--timeout", type=click.FloatRange(min=1), default=CLOSE_TIMEOUT, show_default=True,
              help="Seconds to wait for the cluster to close.")
@_json_option
def down(name: str | None, timeout: float, as_json: bool) -> None:
    """Close a cluster: retire its workers, stop every process, end its head.

    A stale cluster (its head process is gone) only has its state removed;
    its remote agents stop their processes by themselves once the head's
    SSH connections are gone.

    \b
    Example:
      speccluster-ssh down --name lab
    """
    known = _resolve(name, allow_stale=True)
    cluster_name, directory, pid = known.state.name, known.directory, known.state.pid
    if not known.alive:
        st.remove_cluster_dir(directory)
        message = (f"cluster {cluster_name} was stale (head process {pid} is gone); removed its state in {directory}; "
                   "its remote processes stop by themselves once the head's connections are gone")
        if as_json:
            _echo_json({"name": cluster_name, "stale": True, "closed": True})
        else:
            click.echo(message)
        return
    click.echo(f"closing cluster {cluster_name} ...", err=True)
    try:
        control.request(directory, "down", timeout=timeout)
    except control.ControlError as exc:
        if st.head_alive(directory):
            raise
        # The head ended before it could answer: the next check tells whether it cleaned up.
        logger.debug("down: %s", exc)
    gone = st.wait_for_exit(pid, 30.0) if pid else True
    deadline = time.monotonic() + 30.0
    while st.head_alive(directory) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not gone or st.head_alive(directory):
        raise SpecClusterError(
            f"the head process of cluster {cluster_name} (pid {pid}) did not exit; stop it with 'kill {pid}'"
        )
    st.remove_cluster_dir(directory)
    if as_json:
        _echo_json({"name": cluster_name, "stale": False, "closed": True})
    else:
        click.echo(f"cluster {cluster_name} closed")


@main.command("list")
@_json_option
def list_clusters(as_json: bool) -> None:
    """List the clusters known on this machine, running or stale.

    \b
    Example:
      speccluster-ssh list
      speccluster-ssh list --json
    """
    known = st.known_clusters()
    rows = [
        {
            "name": k.state.name,
            "status": k.status,
            "pid": k.state.pid,
            "scheduler_address": k.state.scheduler_address,
            "dashboard_link": k.state.dashboard_link,
            "started": k.state.started,
            "inventory": k.state.inventory,
            "directory": str(k.directory),
        }
        for k in known
    ]
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"no clusters in {st.state_root()}")
        return
    columns = ("name", "status", "pid", "scheduler_address", "dashboard_link", "started", "inventory")
    _console().print(_table(columns, [[r[c] for c in columns] for r in rows]))
    if any(r["status"] == "stale" for r in rows):
        click.echo(f"stale clusters: their head process is gone; '{PROG} down --name NAME' removes them", err=True)


@main.command("client-config")
@click.argument("cluster", required=False, metavar="[NAME]")
@_name_option
@click.option("--yaml", "as_yaml", is_flag=True, help="Print the dask config file instead of Python.")
@click.option("--path", "as_path", is_flag=True, help="Print the path of the dask config file.")
def client_config(cluster: str | None, name: str | None, as_yaml: bool, as_path: bool) -> None:
    """Print Python that connects a dask Client to a cluster (TLS files included).

    \b
    Example:
      speccluster-ssh client-config lab > connect.py
      DASK_CONFIG=$(speccluster-ssh client-config lab --path) python my_job.py
    """
    if cluster is not None and name is not None and cluster != name:
        raise click.UsageError("give the cluster name once, as NAME or --name")
    known = _resolve(cluster or name)
    if not known.alive or known.state.phase != "running":
        raise control.ControlError(f"cluster {known.state.name} is {known.status}; there is nothing to connect to")
    if as_path:
        click.echo(known.state.client_config)
        return
    if as_yaml:
        click.echo(Path(known.state.client_config).read_text(), nl=False)
        return
    click.echo(f"# cluster {known.state.name}; or run with DASK_CONFIG={known.state.client_config} and Client()")
    click.echo(st.client_snippet(known.state, known.directory), nl=False)


if __name__ != "__main__":
    # restart, drain, undrain and reload (operating a running cluster) are in their own module.
    from .cli_operations import register as _register_operations

    _register_operations(main)
else:
    # Run as a module (the detached head): the package's own copy, with every command registered.
    from speccluster_ssh.cli import main as _main

    _main()
