"""Preflight of an inventory's hosts (``speccluster-ssh check``).

Per host: SSH and its host key (and the jump hosts it goes through), the python and ``distributed`` the host agent
reports against the head's, free disk, and whether the host can open a
connection back to the head (as its workers will to a scheduler here).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from .errors import HostError
from .tasks import log_failures

if TYPE_CHECKING:
    from .inventory import HostSpec, Inventory

logger = logging.getLogger(__name__)

# Run by each host's python with the head's address and port as arguments.
REACH_PROBE = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()"


def check_hosts(inv: Inventory, policy: str | None, timeout: float) -> list[dict[str, Any]]:
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
        direct) and ``reach`` (``direct`` or ``through jump host NAME``).
    """
    import secrets

    import distributed
    from dask.utils import format_bytes

    from .agent import agent_argv
    from .connection import ConnectSettings
    from .process import AgentPool, same_release

    hosts: dict[str, HostSpec] = {h.name: h for h in inv.worker_hosts}
    if inv.scheduler_host is not None:
        hosts.setdefault(inv.scheduler_host.name, inv.scheduler_host)
    head_python = ".".join(map(str, sys.version_info[:2]))

    async def probe_all() -> list[dict[str, Any]]:
        # Like up: a --known-hosts flag wins, else each host's speccluster_known_hosts.
        settings = ConnectSettings(known_hosts_policy=policy)
        pool = AgentPool(f"check-{secrets.token_hex(4)}", hosts, settings, agent_timeout=timeout)
        # A stand-in for the scheduler's port: can each host open a connection to the head?
        listener = await asyncio.start_server(lambda r, w: w.close(), host="0.0.0.0", port=0)
        head_port = int(listener.sockets[0].getsockname()[1])

        async def reaches_head(name: str) -> str | None:
            """``None`` when host ``name`` can connect to the head's port, else why not."""
            address = pool.head_address_for(name)
            if not address:
                return "no address of the head is known from this host"
            python = agent_argv(hosts[name], "")[2]
            try:
                status, _, err = await pool.connection(name).run(
                    [python, "-c", REACH_PROBE, address, str(head_port)], timeout=15
                )
            except HostError as exc:
                return exc.reason
            if status != 0:
                last = err.decode("utf-8", "replace").strip().splitlines()
                return f"cannot reach the head at {address}:{head_port} ({last[-1] if last else 'exit ' + str(status)})"
            return None

        async def probe(name: str) -> dict[str, Any]:
            host = hosts[name]
            row: dict[str, Any] = {"host": name, "address": host.address, "connection": host.connection}
            t0 = time.monotonic()
            try:
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
            problems: list[str] = []
            warnings: list[str] = []
            version = str(facts.get("python_version", ""))
            if ".".join(version.split(".")[:2]) != head_python:
                warnings.append(f"python {version} differs from the head's {head_python}")
            remote = str(facts.get("distributed", ""))
            if remote != distributed.__version__ and same_release(remote, distributed.__version__):
                warnings.append(f"distributed {remote} differs from the head's {distributed.__version__}")
            unreachable = await reaches_head(name)
            if unreachable:
                problems.append(unreachable)
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
                reaches_head=unreachable is None,
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
            return list(results)
        finally:
            await pool.close()
            listener.close()
            await listener.wait_closed()

    return asyncio.run(probe_all())
