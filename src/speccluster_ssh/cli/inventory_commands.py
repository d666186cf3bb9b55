"""The commands that look at an inventory without starting a cluster:
``inventory`` (what was read), ``plan`` (where workers would go, and what is
free now; the work is :mod:`speccluster_ssh.planning` and
:mod:`speccluster_ssh.labview`) and ``check`` (can every host be reached and
run workers; the work is :mod:`speccluster_ssh.preflight`).
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from .common import (
    _exit,
    _group_options,
    _hosts_seen_by_running_cluster,
    _inventory_or_local,
    _json_option,
    _load_inventory,
    _prepare_up,
    _survey_options,
    main,
)
from ..messages import PROG
from .display import _bytes, _console, _echo_json, _reach_line, _table


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
    from ..inventory import hosts_table_rows
    from ..planning import agent_python

    rows = hosts_table_rows(inv)
    for row in rows:
        # The interpreter the agent runs (a local host's default python3 is the head's own), as plan shows it.
        row["python"] = agent_python(inv.hosts[row["name"]])
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
@click.argument("inventory", metavar="[INVENTORY]", required=False)
@click.option("--name", "-n", default=None, metavar="NAME", help="Cluster name (default: the inventory's file name).")
@click.option("--workers", "-w", type=click.IntRange(min=0), default=None, help="Dask workers (default: every slot).")
@click.option("--adapt", "adapt_range", default=None, metavar="MIN:MAX", help="Start MIN workers (adaptive range).")
@click.option("--placement", type=click.Choice(["spread", "pack"]), default=None, help="Where entries go.")
@click.option("--no-tls", is_flag=True, help="Plain TCP instead of TLS.")
@click.option("--scheduler-reach", "scheduler_reach", type=click.Choice(["auto", "direct", "forward"]), default=None,
              help="How the head reaches the scheduler, as for 'up'.")
@click.option("--min-workers", "min_workers", default=None, metavar="M", help="Checked as 'up' checks it.")
# Taken so that an 'up' command line works with 'plan' in its place; they only concern the start.
@click.option("--detach", "-d", is_flag=True, hidden=True)
@click.option("--timeout", type=click.FloatRange(min=1), default=None, hidden=True)
@click.option("--known-hosts", "known_hosts", type=click.Choice(["strict", "accept-new"]), default=None,
              help="Host key policy when asking the hosts what is free (default: each host's speccluster_known_hosts).")
@click.option("--dashboard-address", "dashboard_address", default=None, metavar="HOST[:PORT]",
              help="Checked as 'up' checks it.")
@click.option("--offline", is_flag=True,
              help="Contact no host: leave out what is free now (the other clusters' leases).")
@_group_options
@_json_option
def plan(
    inventory: str | None, name: str | None, workers: int | None, adapt_range: str | None, placement: str | None,
    no_tls: bool, scheduler_reach: str | None, min_workers: str | None, detach: bool, timeout: float | None,
    known_hosts: str | None, scheduler_group: str, worker_group: str, as_json: bool,
    dashboard_address: str | None = None, offline: bool = False,
) -> None:
    """Show what 'up' would start on each host, starting nothing.

    Per host: the spec entries, the exact remote command of the host agent
    (shell-quoted), the prologue and the environment of the dask processes,
    and what is free there now: 'plan' asks every host (as 'hosts' does)
    which leases other clusters hold; a host that cannot be reached says
    so, and the plan is shown all the same. --offline contacts no host.
    When a cluster of that name runs, a table first lists the hosts it
    cannot use now (down or put aside) and why. 'plan' makes every check
    'up' makes before it starts, so it fails where 'up' would, with the
    same line and exit status. Without INVENTORY: the packaged local one.

    \b
    Example:
      speccluster-ssh plan lab.yml --workers 8
      speccluster-ssh plan lab.yml --offline --json | jq '.hosts[].command_line'
    """
    from .. import config
    from ..planning import build_plan

    inventory = _inventory_or_local(inventory)
    request = _prepare_up(
        inventory, name=name, workers=workers, adapt_range=adapt_range, placement=placement,
        min_workers=min_workers, scheduler_reach=scheduler_reach, scheduler_group=scheduler_group,
        worker_group=worker_group, dashboard_address=dashboard_address,
    )
    inv, cluster_name, workers = request.inventory, request.name, request.check.wanted
    tls = False if no_tls else bool(config.get("tls"))
    result = build_plan(
        inv, name=cluster_name, workers=workers, placement=request.check.placement, tls=tls,
        scheduler_reach=scheduler_reach,
    )
    seen = _hosts_seen_by_running_cluster(cluster_name)
    for host in result["hosts"]:
        if host["host"] in seen:
            host["seen"] = seen[host["host"]]
    now = None if offline else _free_now(inv, known_hosts, timeout)
    result["now"] = now
    there = {} if offline else _environments_now(inv, known_hosts, timeout)  # speccluster_environment: head
    for host in result["hosts"]:
        if host["host"] in there:
            host["environment_now"] = there[host["host"]]
    if as_json:
        _echo_json(result)
        return
    if offline:
        click.echo(f"plan for cluster {cluster_name} (dry run: nothing is started, no host is contacted)")
    else:
        click.echo(f"plan for cluster {cluster_name} (dry run: nothing is started; --offline contacts no host)")
    unusable = {h: v for h, v in seen.items() if v.get("state") in ("down", "aside")}
    if unusable:
        _console().print(_table(
            ("host", "state", "reason"),
            [(h, v["state"], (v.get("reason") or "") + (f"; fix: {v['fix']}" if v.get("fix") else ""))
             for h, v in unusable.items()],
            title=f"hosts the running cluster {cluster_name} cannot use now",
        ))
    click.echo(f"  scheduler: {result['scheduler']}; TLS {'on' if tls else 'off'}; placement {result['placement']}")
    click.echo(f"  reach: {_plan_reach_line(result['scheduler_reach'])}")
    wanted = "every slot" if workers is None else f"{workers} requested"
    click.echo(f"  workers: {result['workers_planned']} planned ({wanted}; the inventory holds {result['capacity']})")
    lab = {h["host"]: h for h in now["hosts"]} if now is not None else {}
    if now is not None:
        click.echo(f"  free now: {now['summary']}")
    for host in result["hosts"]:
        click.echo("")
        role = " [scheduler]" if host["scheduler"] else ""
        click.echo(f"host {host['host']}{role}: {host['target']}, {host['slots']} slot(s)")
        if host["host"] in lab:
            click.echo(f"  free now: {_free_now_line(lab[host['host']])}")
        if not host["started"]:
            click.echo("  nothing placed here: the agent is not started")
            continue
        if "environment_now" in host:
            click.echo(f"  the head's environment there now: {host['environment_now']}")
        for entry in host["entries"]:
            opts = ", ".join(f"{k}={v}" for k, v in entry["options"].items())
            gpus = entry.get("gpus")
            if isinstance(gpus, dict):
                opts += "; gpus " + " ".join(f"{w}={','.join(d) or '-'}" for w, d in gpus.items())
            elif gpus and entry.get("gpu_slot") is None:
                opts += "; no GPU: every GPU slot of the host is held"
            elif gpus:
                opts += (f"; gpus: GPU slot {entry['gpu_slot']}'s share of those nvidia-smi -L lists "
                         "on the host at start")
            click.echo(f"  entry {entry['entry']}: {entry['class']} x{len(entry['workers'])} "
                       f"({', '.join(entry['workers'])}); {opts}")
        env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in host["environment"].items())
        click.echo(f"  environment: {env}")
        if host.get("shipped_environment"):
            shipped = host["shipped_environment"]
            click.echo(f"  {shipped['summary']}; the host builds it in {shipped['env_dir']}/{shipped['fingerprint']}")
        if host["prologue"]:
            click.echo("  prologue (run by /bin/sh before the agent):")
            for line in str(host["prologue"]).splitlines():
                click.echo(f"    {line}")
        click.echo("  remote command (the agent's source follows on its stdin):")
        for line in host["command_line"].splitlines():
            click.echo(f"    {line}")


@main.command()
@click.argument("inventory", metavar="[INVENTORY]", required=False)
@_survey_options
@_group_options
@_json_option
def check(
    inventory: str | None, known_hosts: str | None, timeout: float, scheduler_group: str, worker_group: str,
    as_json: bool,
) -> None:
    """Preflight every host of INVENTORY (default: this machine): SSH, host key, python, distributed, disk.

    Also what is free there now, and who holds the rest (as 'hosts' shows).
    Starts the host agent once per host (nothing else) and stops it again.
    Exit status 1 when any host fails.

    \b
    Example:
      speccluster-ssh check lab.yml
      speccluster-ssh check lab.yml --known-hosts accept-new --json
    """
    import distributed

    inv = _load_inventory(_inventory_or_local(inventory), scheduler_group, worker_group)
    from ..preflight import check_lab

    rows, choice = check_lab(inv, known_hosts, timeout)
    failed = [r for r in rows if not r["ok"]]
    if as_json:
        _echo_json({"head": {"python": sys.version.split()[0], "distributed": distributed.__version__},
                    "hosts": rows, "ok": not failed,
                    "scheduler_reach": choice.as_dict() if choice is not None else None})
    else:
        yes_no = {True: "yes", False: "NO"}
        from ..labview import free_line, holders_line
        from .lab import lab_summary

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
        by_family: dict[str, list[str]] = {}
        for r in rows:
            if r.get("family"):
                by_family.setdefault(r["family"], []).append(r["host"])
        if by_family:
            # Which family the hosts answered over, and so the one their workers will use.
            click.echo("address family: " + "; ".join(f"{fam} ({', '.join(names)})" for fam, names in sorted(by_family.items())))
        between = sorted({r["peer_family_why"] for r in rows if r.get("peer_family_why")})
        if between:
            # The hosts reach each other only over the family their SSH links do not use: the workers use it.
            click.echo("address family: " + "; ".join(between))
        for r in rows:
            if r.get("unreached_peers"):
                click.echo(f"{r['host']}: {r['problems'][0]}")
        for r in rows:
            if r.get("environment"):  # speccluster_environment: head
                env = r["environment"]
                click.echo(f"{r['host']}: the head's environment {env['fingerprint'][:12]}: {env['detail']}")
        read = [r for r in rows if "free" in r]
        if read:
            click.echo(f"free now: {lab_summary(read)}")
        for r in read:
            if r.get("holders") or r.get("wants"):
                click.echo(f"{r['host']}: {free_line(r)}; held by {holders_line(r)}")
        if failed:
            click.echo(f"{len(failed)} of {len(rows)} hosts failed", err=True)
    if failed:
        _exit(1)


def _free_now(inv: Any, known_hosts: str | None, timeout: float | None) -> dict[str, Any] | None:
    """What is free on ``inv``'s hosts now (``hosts --json``'s shape plus ``summary``); ``None`` if none could be asked.

    A host that cannot be reached is a row that says why; a failure of the survey itself is one
    warning line, and the plan goes on without it.
    """
    from ..labview import lab_json, survey_lab
    from .lab import lab_summary

    try:
        views = survey_lab(inv, known_hosts, min(timeout or 30.0, 30.0))
    except Exception as exc:  # the plan stands without it
        click.echo(f"{PROG}: warning: could not ask the hosts what is free now: {exc}", err=True)
        return None
    data = lab_json(views)
    data["summary"] = lab_summary(data["hosts"])
    return data


def _environments_now(inv: Any, known_hosts: str | None, timeout: float | None) -> dict[str, str]:
    """Per host with ``speccluster_environment: head``: its environment there now (ready, or what 'up' ships)."""
    import asyncio

    from ..labview import survey_settings
    from ..shipping import survey_environments

    hosts = [h for h in inv.worker_hosts if h.environment == "head"]
    if not hosts:
        return {}
    found = asyncio.run(survey_environments(hosts, survey_settings(known_hosts), min(timeout or 30.0, 30.0)))
    return {name: (f"{state.fingerprint[:12]}: {state.detail}" if not isinstance(state, str) else f"not known: {state}")
            for name, state in found.items()}


def _free_now_line(data: dict[str, Any]) -> str:
    from ..labview import free_line, holders_line

    if not data["reached"]:
        return f"not known: not reached ({data['error']})"
    if data["free"] is None:
        return f"not known: its leases cannot be read ({data['error']})"
    if not data["holders"] and not data["wants"]:
        return free_line(data)
    return f"{free_line(data)}; held by {holders_line(data)}"


def _plan_reach_line(reach: dict[str, Any]) -> str:
    if reach.get("mode") is None:
        return f"{reach['setting']}: {reach['why']}"
    return f"{reach['setting']}: {_reach_line(reach)}"
