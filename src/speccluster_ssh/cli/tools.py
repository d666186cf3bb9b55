"""Commands for working with a running cluster: ``run`` (a command or script
with the cluster's client config in its environment, like ``ray submit``)
and ``dashboard`` (the dashboard's URL and the ``ssh -L`` line that reaches
it from a laptop, like ``ray dashboard``).
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from .. import control
from .. import state as st
from ..control import Op
from ..dashboards import LOCAL_PORT, LOOPBACK, host_tunnel_argv, is_loopback, tunnel_argv
from ..messages import PROG
from .common import _ask, _exit, _json_option, _name_option, _resolve, main
from .display import _echo_json, _error_line

# Signals a shell would pass on to its foreground job; SIGINT only when it
# did not come from the terminal, which sends it to the child itself.
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _running(name: str | None) -> st.KnownCluster:
    known = _resolve(name)
    if not known.alive or known.state.phase != "running":
        raise control.ControlError(f"cluster {known.state.name} is {known.status}; there is nothing to connect to")
    return known


def _flat(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
    """Dask config as ``DASK_*`` variables: ``tls.ca-file`` under ``distributed.comm`` is
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _flat(f"{prefix}__{str(key).upper().replace('-', '_')}", inner)
    else:
        yield prefix, str(value)


def client_environment(client_config: str | os.PathLike[str]) -> dict[str, str]:
    """The ``DASK_*`` variables of a cluster's ``client.yaml``, so that a plain ``Client()`` connects.

    Environment variables win over every dask config file, so the user's own
    files (and ``DASK_CONFIG``) cannot point the client elsewhere, and are
    otherwise left as they are.
    """
    import yaml

    config = yaml.safe_load(Path(client_config).read_text()) or {}
    return dict(
        item for key, value in config.items() for item in _flat(f"DASK_{str(key).upper().replace('-', '_')}", value)
    )


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_name_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARG]...")
def run(name: str | None, command: Sequence[str]) -> None:
    """Run CMD on this machine with a cluster's client config in its environment.

    A plain Client() in CMD connects to the cluster (TLS included).
    The exit status is CMD's; 128+N when a signal N ended it, 127 when
    CMD is not found. CMD runs as given, without a shell.

    \b
    Example:
      speccluster-ssh run -- python my_job.py --input data/
      speccluster-ssh run --name lab -- jupyter lab
    """
    known = _running(name)
    env = dict(os.environ)
    env.update(client_environment(known.state.client_config))
    _exit(run_child(list(command), env))


def run_child(argv: list[str], env: Mapping[str, str]) -> int:
    """Run ``argv`` until it ends, passing signals on as a shell does; its exit status as a shell gives it."""
    try:
        child = subprocess.Popen(argv, env=dict(env))
    except FileNotFoundError:
        _error_line(f"run: command not found: {argv[0]}")
        return 127
    except PermissionError:
        _error_line(f"run: permission denied: {argv[0]} (not executable)")
        return 126
    except OSError as exc:
        _error_line(f"run: cannot run {argv[0]}: {exc.strerror or exc}")
        return 126

    def forward(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and _terminal_sent_it():
            return  # Ctrl-C: the terminal sent it to the child's process group too
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def _terminal_sent_it() -> bool:
    """Whether a SIGINT most likely came from the terminal: we are its foreground process group."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


@main.command()
@_name_option
@click.option("--ssh-host", "ssh_host", default=None, metavar="[USER@]HOST",
              help="This machine as the laptop reaches it (default: USER@ its fully qualified name).")
@click.option("--local-port", "local_port", type=click.IntRange(1, 65535), default=LOCAL_PORT, show_default=True,
              help="The laptop's end of the tunnel.")
@_json_option
def dashboard(name: str | None, ssh_host: str | None, local_port: int, as_json: bool) -> None:
    """Print the dashboard's URL and the ssh -L line that reaches it from a laptop.

    The dashboard listens on loopback unless 'up --dashboard-address'
    exposed it. Run the ssh line on the laptop, then open the printed
    localhost URL there.

    \b
    Example:
      speccluster-ssh dashboard --name lab
      speccluster-ssh dashboard --ssh-host me@gateway.example.org
    """
    known = _running(name)
    report = _ask(known, Op.STATUS)
    where = dict(report.get("dashboard") or {})
    link = str(where.get("link") or report.get("dashboard_link") or "")
    if not link:
        raise control.ControlError(
            f"cluster {known.state.name} has no dashboard; install bokeh on its scheduler's host"
        )
    head = ssh_host or f"{getpass.getuser()}@{this_machine()}"
    lines = dashboard_lines(link, where, head, local_port, _scheduler_host(known, where.get("host")))
    if as_json:
        _echo_json(lines)
        return
    click.echo(f"dashboard: {lines['url']}")
    if lines["listens_on"] == "loopback":
        click.echo("  it listens on loopback only (no authentication); from a laptop run")
    else:
        click.echo("  from a laptop that cannot reach it directly, run")
    click.echo(f"  {_shell_text(lines['ssh'])}")
    if lines.get("ssh_direct"):
        click.echo(f"  or, through the inventory's jump hosts, straight to {where.get('host')}:")
        click.echo(f"  {_shell_text(lines['ssh_direct'])}")
    click.echo(f"  then open {lines['local_url']}")


def this_machine() -> str:
    """This machine's name as another machine may know it: its fully qualified name, else its host name."""
    name = socket.getfqdn()
    if not name or name.split(".")[0] == "localhost":
        name = socket.gethostname()
    return name


def _shell_text(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)


def _scheduler_host(known: st.KnownCluster, host: Any) -> Any:
    """The inventory's ``HostSpec`` of the scheduler's host; ``None`` for the head or when it cannot be read."""
    if not host or not known.state.inventory:
        return None
    from ..inventory import load_inventory

    try:
        inventory = load_inventory(known.state.inventory)
    except Exception as exc:  # the inventory may have changed since up; the head line still works
        click.echo(f"{PROG}: warning: cannot read {known.state.inventory} for the jump hosts: {exc}", err=True)
        return None
    return inventory.hosts.get(str(host))


def dashboard_lines(
    link: str, where: Mapping[str, Any], head: str, local_port: int = LOCAL_PORT, scheduler_host: Any = None
) -> dict[str, Any]:
    """What ``dashboard`` prints: the URL, and ssh argv lists that reach it from a laptop.

    Parameters
    ----------
    link
        The cluster's dashboard link, as it is reachable on the head.
    where
        The ``dashboard`` part of the status report
        (:func:`speccluster_ssh.dashboards.where`).
    head
        ``[user@]host`` of this machine as the laptop reaches it.
    local_port
        The laptop's end of the tunnel.
    scheduler_host
        The inventory ``HostSpec`` of a scheduler on another host; it adds a
        line straight to that host through its jump hosts.
    """
    parts = urllib.parse.urlsplit(link)
    host = parts.hostname or LOOPBACK
    port = int(parts.port or 80)
    # On the head: the link's own host; loopback names the head's loopback (maybe a forward of the head's).
    ssh = tunnel_argv(head, LOOPBACK if is_loopback(host) else host, port, local_port=local_port)
    local_url = urllib.parse.urlunsplit(parts._replace(netloc=f"localhost:{local_port}"))
    bind = str(where.get("bind", host))  # "" is every interface
    lines: dict[str, Any] = {
        "url": link,
        "listens_on": "loopback" if bind and is_loopback(bind) else "network",
        "ssh": ssh,
        "local_url": local_url,
    }
    remote_port = where.get("port")
    if scheduler_host is not None and not scheduler_host.is_local and remote_port:
        lines["ssh_direct"] = host_tunnel_argv(
            scheduler_host, str(where.get("bind") or ""), int(remote_port), local_port=local_port
        )
    return lines
