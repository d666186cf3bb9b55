"""Preflight of an inventory's hosts (``speccluster-ssh check``).

Per host: SSH and its host key (and the jump hosts it goes through), the python and ``distributed`` the host agent
reports against the head's, free disk, whether the host can open a
connection back to the head (as its workers will to a scheduler here), and
what is free there now: the live leases of every user's clusters (see
:mod:`speccluster_ssh.labview`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from .addresses import family, family_name
from .errors import HostError
from .reach import ReachChoice, ReachProbe, choose_reach, peer_problem, probe_reach, reach_setting
from .tasks import log_failures

if TYPE_CHECKING:
    from .inventory import HostSpec, Inventory

logger = logging.getLogger(__name__)


def check_hosts(inv: Inventory, policy: str | None, timeout: float) -> list[dict[str, Any]]:
    """The rows of :func:`check_lab` (see there), without the mode."""
    return check_lab(inv, policy, timeout)[0]


def check_lab(inv: Inventory, policy: str | None, timeout: float) -> tuple[list[dict[str, Any]], ReachChoice | None]:
    """Start the host agent once on every host of ``inv``, look at what it reports, stop it.

    Parameters
    ----------
    inv
        The inventory; its worker hosts and its scheduler host are checked.
    policy
        Host key policy for every host; ``None`` keeps each host's own.
    timeout
        Seconds for each host's agent to answer.

    Returns
    -------
    list of dict
        One row per host: ``host``, ``address``, ``connection``, ``ok``,
        ``result`` (``ok``, ``warn`` or ``FAIL``), ``problems``, ``seconds``
        and, when the agent answered, what it found (python, distributed,
        cpus, memory, free disk, whether the host reaches the head), and how
        the head reached it: ``via`` (the jump hosts as named, ``None`` when
        direct) and ``reach`` (``direct`` or ``through jump host NAME``);
        ``family``, ``"IPv4"`` or ``"IPv6"``: the address family the host was
        reached over, which its workers listen on; ``peer_family``, the family
        its peers reach it over (``family``, unless only the other one works
        between the hosts: then ``peer_family_why`` says so, and ``up`` uses it);
        ``reaches_peers`` (whether it can open a connection to a port every
        other host listens on, as dask workers do) and ``unreached_peers``;
        ``capacity``, ``free``, ``holders`` and ``wants`` as ``hosts --json``
        gives them (see :func:`speccluster_ssh.labview.lab_json`), ``free``
        ``None`` when the leases could not be read (a problem of the row).
    ReachChoice or None
        The mode ``up`` would choose (see :func:`speccluster_ssh.reach.choose_reach`);
        ``None`` when no host answered.
    """
    import secrets

    import distributed
    from dask.utils import format_bytes

    from .connection import ConnectSettings
    from .labview import HostSurvey, host_view, view_json
    from .pool import AgentPool, same_release

    hosts: dict[str, HostSpec] = {h.name: h for h in inv.worker_hosts}
    if inv.scheduler_host is not None:
        hosts.setdefault(inv.scheduler_host.name, inv.scheduler_host)
    head_python = ".".join(map(str, sys.version_info[:2]))

    async def probe_all() -> list[dict[str, Any]]:
        # Like up: a --known-hosts flag wins, else each host's speccluster_known_hosts.
        settings = ConnectSettings(known_hosts_policy=policy)
        pool = AgentPool(f"check-{secrets.token_hex(4)}", hosts, settings, agent_timeout=timeout)
        pool.ship_environments = False  # check only looks
        async def probe(name: str) -> dict[str, Any]:
            host = hosts[name]
            row: dict[str, Any] = {"host": name, "address": host.address, "connection": host.connection}
            t0 = time.monotonic()
            try:
                if host.environment == "head" and not await _environment(pool, host, row, timeout):
                    row["seconds"] = round(time.monotonic() - t0, 1)
                    return row  # not there yet: up ships and builds it (no agent can run before)
                agent = await asyncio.wait_for(pool.agent(name), timeout + host.connect_timeout + 5)
            except HostError as exc:
                row.update(ok=False, result="FAIL", problems=[exc.reason], seconds=round(time.monotonic() - t0, 1))
                return row
            except (asyncio.TimeoutError, TimeoutError):
                row.update(ok=False, result="FAIL", problems=[f"no answer within {timeout:g} s"],
                           seconds=round(time.monotonic() - t0, 1))
                return row
            except OSError as exc:  # a local host whose python cannot be run
                where = f": {exc.filename}" if exc.filename else ""
                row.update(ok=False, result="FAIL", problems=[f"{exc.strerror or exc}{where}"],
                           seconds=round(time.monotonic() - t0, 1))
                return row
            facts = agent.facts
            # How the head reached the host: directly, or over which jump hosts (as named).
            via = pool.connection(name).via
            row.update(via=via, reach=f"through jump host {via}" if via else "direct")
            # The family of the host's end of the SSH link: its workers listen and are reached there.
            listen = str(facts.get("listen_address") or "")
            row["family"] = family_name(family(listen)) if family(listen) else None
            problems: list[str] = []
            warnings: list[str] = []
            version = str(facts.get("python_version", ""))
            if ".".join(version.split(".")[:2]) != head_python:
                warnings.append(f"python {version} differs from the head's {head_python}")
            remote = str(facts.get("distributed", ""))
            if remote != distributed.__version__ and same_release(remote, distributed.__version__):
                warnings.append(f"distributed {remote} differs from the head's {distributed.__version__}")
            try:
                survey = HostSurvey(name, True, facts, tuple(await agent.lease_list(timeout=timeout)))
            except HostError as exc:
                survey = HostSurvey(name, True, facts, None, error=exc.reason, fix=exc.fix)
                problems.append(f"its leases cannot be read: {exc.reason}" + (f"; fix: {exc.fix}" if exc.fix else ""))
            lab = view_json(host_view(host, survey))
            row.update({key: lab[key] for key in ("capacity", "free", "holders", "wants")})
            free = int(facts.get("free_disk") or 0)
            if free and free < 1 << 30:
                warnings.append(f"only {format_bytes(free)} free in {facts.get('dir')}")
            row.update(
                ok=not problems,
                result="FAIL" if problems else ("ok" if not warnings else "warn"),
                python=facts.get("python"),
                python_version=version,
                distributed=remote,
                cpu_count=facts.get("cpu_count"),
                memory=facts.get("memory"),
                free_disk=free,
                problems=problems + warnings,
                seconds=round(time.monotonic() - t0, 1),
            )
            return row

        try:
            # Every probe ends before the pool closes, even when one of them fails unexpectedly.
            results = await asyncio.gather(*(probe(n) for n in hosts), return_exceptions=True)
            failures = log_failures(results, list(hosts), logger, "check")
            if failures:
                raise failures[0]
            rows: list[dict[str, Any]] = list(results)
            answered = [r["host"] for r in rows if "python" in r]
            if not answered:
                return rows, None
            scheduler = inv.scheduler_host.name if inv.scheduler_host is not None else None
            found = await probe_reach(pool, answered, scheduler_host=scheduler, peers=True)
            choice = choose_reach(setting, [h.name for h in inv.worker_hosts], scheduler, found)
            for row in rows:
                if row["host"] in answered:
                    _add_reach(row, found, choice, len(answered) - 1)
            return rows, choice
        finally:
            await pool.close()

    setting = reach_setting(inv)
    return asyncio.run(probe_all())


async def _environment(pool: Any, host: HostSpec, row: dict[str, Any], timeout: float) -> bool:
    """Put the state of the head's environment on ``host`` into ``row``; True when it is ready (the agent can start).

    Raises :class:`HostError` when the host has no usable python3.
    """
    from .shipping import inspect_environment

    found = await asyncio.wait_for(
        inspect_environment(pool.connection(host.name), host, cluster_id=pool.cluster_id, timeout=timeout),
        timeout + host.connect_timeout + 5,
    )
    row["environment"] = {"state": found.state, "detail": found.detail, "fingerprint": found.fingerprint,
                          "to_ship": found.to_ship}
    if found.state == "ready":
        return True
    row.update(ok=True, result="warn", problems=[f"environment {found.fingerprint[:12]}: {found.detail}"])
    return False


def _add_reach(row: dict[str, Any], found: ReachProbe, choice: ReachChoice, peers: int) -> None:
    """Put what the reach probes found about ``row``'s host into it."""
    name = row["host"]
    to_head = found.to_head.get(name, "not probed")
    row["reaches_head"] = not to_head
    unreached = found.peers.get(name, {})
    row["reaches_peers"] = not unreached if peers else None
    row["unreached_peers"] = sorted(unreached)
    if peers:
        # The family the host's peers reach it over: its SSH link's, unless only the other one works between hosts.
        row["peer_family"] = family_name(found.peer_family.family) if found.peer_family else row.get("family")
        if found.peer_family is not None:
            row["peer_family_why"] = found.peer_family.describe()
    problems: list[str] = []
    if unreached:
        problems.append(peer_problem(name, unreached, peers))
    if to_head and choice.mode == "direct" and choice.scheduler_host is None:
        # Only a problem when workers must reach a scheduler on the head.
        problems.append(to_head)
    if name in found.from_head and found.from_head[name] and choice.mode == "direct":
        problems.append(f"the head cannot open a connection to a port here ({found.from_head[name]}), "
                        "which a scheduler reached directly needs")
    if problems:
        row["problems"] = problems + row["problems"]
        row.update(ok=False, result="FAIL")
