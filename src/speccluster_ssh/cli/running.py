"""The commands that ask a running cluster's head process: ``status``,
``scale``, ``adapt`` and ``logs``.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping

import click

from .. import control, postmortem
from .. import state as st
from ..control import Op
from ..errors import SpecClusterError
from ..messages import PROG
from .common import _ask, _check_bytes, _json_option, _name_option, _named_state, _resolve, main
from .display import _echo_json, _new_text, _render_status, workers_text


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
    report = _ask(known, Op.STATUS)
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
    result = _ask(known, Op.SCALE, n=n or 0, cores=cores, memory=memory)
    if as_json:
        _echo_json(result)
        return
    click.echo(f"cluster {known.state.name}: scaling to {workers_text(result['planned_workers'])}")
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
        result = _ask(known, Op.ADAPT_OFF)
        message = "adaptive scaling stopped" if result.get("was_on") else "adaptive scaling was not on"
    else:
        result = _ask(known, Op.ADAPT, minimum=minimum, maximum=maximum,
                      minimum_memory=minimum_memory, maximum_memory=maximum_memory)
        info = result.get("adaptive") or {}
        message = f"adaptive scaling between {info.get('minimum')} and {info.get('maximum')} workers"
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"cluster {known.state.name}: {message}")


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
    or 'head' (the log of a detached head process on this machine). With
    --name, a cluster that is down or whose head died still shows the logs
    its hosts keep (speccluster_log_retention, 7 days by default).

    \b
    Example:
      speccluster-ssh logs
      speccluster-ssh logs node03 --follow
      speccluster-ssh logs --name lab      # also after 'down'
    """
    kept = _kept_source(name)
    if kept is not None:
        _print_kept_logs(kept, target, follow, as_json)
        return
    known = _resolve(name)
    if target == "head":
        text = (known.directory / st.LOG_FILE).read_text(errors="replace") if (known.directory / st.LOG_FILE).exists() else ""
        if as_json:
            _echo_json({"head": text})
        else:
            click.echo(text, nl=False)
        return
    current = _ask(known, Op.LOGS, target=target)
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
            show(_ask(known, Op.LOGS, target=target))
    except KeyboardInterrupt:
        return
    except control.ControlError:
        if not st.head_alive(known.directory):
            click.echo(f"cluster {known.state.name} is gone", err=True)
            return
        raise


def _kept_source(name: str | None) -> postmortem.EndedCluster | None:
    """What ``logs --name N`` reads instead of asking a head: a stale cluster's state, or the record of ``down``."""
    if name is None:
        return None
    postmortem.purge_records()
    directory, state = _named_state(name)
    if state is not None:
        if st.head_alive(directory) or not state.cluster_id:
            return None  # a live head answers; without an id there is nothing to look for on the hosts
        stale = postmortem.EndedCluster.of(state)
        stale.directory = directory
        return stale
    return postmortem.latest_record(name)


def _print_kept_logs(record: postmortem.EndedCluster, target: str | None, follow: bool, as_json: bool) -> None:
    """``logs`` of a cluster without a head: the kept head log, or the hosts' kept logs over SSH."""
    how = f"ended {_when(record.ended)}" if record.ended else "stale: its head process is gone"
    click.echo(f"cluster {record.name} is {how}; showing the logs kept on its hosts", err=True)
    if follow:
        click.echo("(--follow: a cluster without a head writes no new lines)", err=True)
    if target == "head":
        text = record.head_log.read_text(errors="replace") if record.head_log.is_file() else ""
        if as_json:
            _echo_json({"head": text})
        else:
            click.echo(text, nl=False)
        return
    hosts = list(record.hosts)
    wanted = [target] if target in record.hosts else hosts
    per_host, problems = postmortem.fetch_kept_logs(record.inventory, record.cluster_id, wanted,
                                                    known_hosts=record.known_hosts)
    for host, why in sorted(problems.items()):
        click.echo(f"host {host}: {why}", err=True)
    if not per_host and problems:
        raise SpecClusterError(f"no host of cluster {record.name} gave its kept logs (see above)")
    found = postmortem.pick_logs(per_host, target, hosts)
    if as_json:
        _echo_json(found)
        return
    for source, text in found.items():
        if text.strip():
            click.echo(f"==> {source} <==")
            click.echo(text.rstrip("\n"))


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
