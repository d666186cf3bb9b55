"""The commands that start and end clusters and list them: ``up`` (in the
foreground, or detached: a head process from :mod:`speccluster_ssh.head`
keeps the cluster alive), the hidden ``_serve`` that is that head process,
``down``, ``list`` and ``client-config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from .. import control, postmortem
from .. import state as st
from ..errors import SpecClusterError
from ..head import CLOSE_TIMEOUT, Head, UpOptions
from ..messages import PROG
from .common import (
    HEAD_SLACK,
    _exit,
    _group_options,
    _json_option,
    _inventory_or_local,
    _name_option,
    _prepare_up,
    _resolve,
    _setup_logging,
    main,
)
from .display import ProgressView, _console, _echo_json, _error_line, _print_connect_info, _table, _tail

logger = logging.getLogger("speccluster_ssh.cli")


def _clear_stale(directory: Path) -> None:
    """Empty a cluster directory of a dead head (we hold the lock, so keep the lock file)."""
    previous = st.read_state(directory)
    if previous is not None:
        postmortem.keep_record(st.KnownCluster(previous, directory, alive=False))  # 'logs --name' of the crashed one
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


@main.command()
@click.argument("inventory", metavar="[INVENTORY]", required=False)
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
@click.option("--dashboard-address", "dashboard_address", default=None, metavar="HOST[:PORT]",
              help="Where the scheduler's dashboard listens on its host (default: config dashboard-address, "
                   "127.0.0.1). It has no authentication: 0.0.0.0 exposes it to every network of the host.")
@click.option("--idle-timeout", "idle_timeout", default=None, metavar="DURATION",
              help="End the cluster (every host cleaned, as 'down') after it has had no task running and no "
                   "client connected for DURATION, e.g. 2h, 30min, 45s; 0: never (default: config idle-timeout).")
@_group_options
@_json_option
def up(
    inventory: str | None, name: str | None, workers: int | None, adapt_range: str | None, detach: bool,
    timeout: float | None, placement: str | None, known_hosts: str | None, no_tls: bool, min_workers: str | None,
    scheduler_reach: str | None, scheduler_group: str, worker_group: str, as_json: bool,
    dashboard_address: str | None = None, idle_timeout: str | None = None,
) -> None:
    """Start a Dask cluster on the hosts of INVENTORY (default: this machine alone).

    In the foreground the cluster runs until Ctrl-C (or SIGTERM), then it is
    closed cleanly. With --detach the command returns once the cluster is up
    and a head process keeps it; use status, scale, adapt, logs and down.
    Hosts that do not answer do not stop the start: the last line says
    which are down and why, and they join when they answer. The exit
    status is 0 when --min-workers workers came up, 1 otherwise.

    'up' again for a running name: the same inventory and options change
    nothing; a changed inventory is reloaded and another --workers/--adapt
    is applied, each printed; other options (--no-tls, --placement, ...)
    are refused (exit 2) until 'down'. --detach, --timeout and
    --min-workers only govern a start. 'plan' makes every check 'up' makes.

    \b
    Example:
      speccluster-ssh up --detach                # the packaged local inventory
      speccluster-ssh up lab.yml --detach --name lab --workers 8
      speccluster-ssh up lab.yml --detach --min-workers 75%
      speccluster-ssh up lab.yml --detach --idle-timeout 2h
    """
    from .. import config

    idle_seconds = _idle_seconds(idle_timeout)
    inventory = _inventory_or_local(inventory)
    # The checks 'plan' makes too (one function, so that the two cannot drift).
    request = _prepare_up(
        inventory, name=name, workers=workers, adapt_range=adapt_range, placement=placement,
        min_workers=min_workers, scheduler_reach=scheduler_reach, scheduler_group=scheduler_group,
        worker_group=worker_group, dashboard_address=dashboard_address,
    )
    cluster_name, adapt = request.name, request.adapt
    options = UpOptions(
        name=cluster_name,
        inventory=str(Path(inventory).expanduser().absolute()) if os.path.exists(inventory) else inventory,
        entries=request.check.entries,
        workers=workers,
        adapt=adapt,
        timeout=float(timeout or config.get("start-timeout")),
        placement=request.check.placement,
        known_hosts=known_hosts,
        tls=False if no_tls else None,
        scheduler_group=scheduler_group,
        worker_group=worker_group,
        min_workers=min_workers,
        scheduler_reach=scheduler_reach,
        dashboard_address=request.dashboard_address,
        idle_timeout=idle_seconds,
    )
    directory = st.make_cluster_dir(cluster_name)
    lock = st.HeadLock(directory)
    if not lock.acquire():
        from .again import up_again

        up_again(directory, options, request, as_json)
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


def _idle_seconds(value: str | None) -> float | None:
    """Seconds of ``--idle-timeout`` (``None`` when not given: the config's applies)."""
    if value is None:
        return None
    from ..units import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(f"{exc}", param_hint="'--idle-timeout'") from None


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
        click.echo(f"cluster {options.name} closed" + (f": {head.end_reason}" if head.end_reason else ""), err=True)
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
                progress = control.request(directory, control.Op.PROGRESS, timeout=10)
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


@main.command()
@_name_option
@click.option("--timeout", type=click.FloatRange(min=1), default=CLOSE_TIMEOUT, show_default=True,
              help="Seconds to wait for the cluster to close.")
@_json_option
def down(name: str | None, timeout: float, as_json: bool) -> None:
    """Close a cluster: retire its workers, stop every process, end its head.

    A stale cluster (its head process is gone) only has its state removed;
    its remote agents stop their processes by themselves once the head's
    SSH connections are gone. Either way the hosts keep the cluster's logs
    for their speccluster_log_retention, and 'logs --name NAME' prints them.

    \b
    Example:
      speccluster-ssh down --name lab
    """
    known = _resolve(name, allow_stale=True)
    cluster_name, directory, pid = known.state.name, known.directory, known.state.pid
    postmortem.purge_records()
    if not known.alive:
        postmortem.keep_record(known)  # where its logs are, for 'logs --name' (see postmortem.py)
        st.remove_cluster_dir(directory)
        message = (f"cluster {cluster_name} was stale (head process {pid} is gone); removed its state in {directory}; "
                   "its remote processes stop by themselves once the head's connections are gone; "
                   f"'{PROG} logs --name {cluster_name}' prints the logs its hosts keep")
        if as_json:
            _echo_json({"name": cluster_name, "stale": True, "closed": True})
        else:
            click.echo(message)
        return
    click.echo(f"closing cluster {cluster_name} ...", err=True)
    try:
        control.request(directory, control.Op.DOWN, timeout=timeout)
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
    # The head kept the record as it ended (head.py); one of an older head is kept here.
    record = postmortem.latest_record(cluster_name)
    if record is None or record.cluster_id != known.state.cluster_id:
        record = postmortem.keep_record(known)
    st.remove_cluster_dir(directory)
    if as_json:
        _echo_json({"name": cluster_name, "stale": False, "closed": True})
    else:
        click.echo(f"cluster {cluster_name} closed")
        if record is not None:
            click.echo(f"its logs stay on its hosts for {_days(record.retention)}: '{PROG} logs --name {cluster_name}'",
                       err=True)


@main.command("list")
@_json_option
def list_clusters(as_json: bool) -> None:
    """List the clusters known on this machine: running, stale, or ended (their logs are kept).

    \b
    Example:
      speccluster-ssh list
      speccluster-ssh list --json
    """
    known = st.known_clusters()
    postmortem.purge_records()
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
    rows += _ended_rows({r["name"] for r in rows})
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"no clusters in {st.state_root()}")
        return
    columns = ("name", "status", "pid", "scheduler_address", "dashboard_link", "started", "inventory")
    _console().print(_table(columns, [[_cell(r, c) for c in columns] for r in rows]))
    if any(r["status"] == "stale" for r in rows):
        click.echo(f"stale clusters: their head process is gone; '{PROG} down --name NAME' removes them", err=True)
    if any(r["status"] == "ended" for r in rows):
        click.echo(f"ended clusters: down, their hosts keep the logs; '{PROG} logs --name NAME' prints them", err=True)


def _cell(row: dict[str, Any], column: str) -> Any:
    if column == "pid":
        return row[column] or ""  # an ended cluster has no head process: empty, not 0
    if column == "status" and row.get("reason"):
        return f"{row[column]} ({row['reason']})"  # ended by itself: say why
    return row[column]


def _ended_rows(taken: set[str]) -> list[dict[str, Any]]:
    """``list`` rows of the ended clusters whose logs are kept (the last of each name not in use again)."""
    latest = {r.name: r for r in postmortem.ended_clusters() if r.name not in taken}
    return [
        {
            "name": r.name, "status": "ended", "pid": 0, "scheduler_address": "", "dashboard_link": "",
            "started": r.started, "inventory": r.inventory, "directory": str(r.directory),
            "ended": datetime.datetime.fromtimestamp(r.ended).astimezone().isoformat(timespec="seconds"),
            "reason": r.reason,  # why it ended by itself ("idle for 2h"); "" after down
            "logs_kept_until": datetime.datetime.fromtimestamp(r.ended + r.retention).astimezone().isoformat(
                timespec="seconds"),
        }
        for r in sorted(latest.values(), key=lambda r: r.name)
    ]


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds / 3600:g} hours"


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
