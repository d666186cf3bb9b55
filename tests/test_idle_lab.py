"""An idle cluster ends itself, on the SSH lab (issue 25, part 3).

- The Python API: a cluster with ``idle_timeout`` stays while a client is
  connected, and while a task runs with no client (``fire_and_forget``),
  then ends by itself once idle, with nothing left on its hosts. Its
  scheduler runs on a lab host, so the scheduler-side handler travels there.
- The command: ``up --detach --idle-timeout`` ends by itself, its head and
  state go, ``list`` says it ended and why, and every host is clean.

The policy itself is tested without a lab in ``test_idle.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, fire_and_forget
from distributed.core import Status

from speccluster_ssh.cluster import SSHSpecCluster
from test_cli_lab import Cli, _head_gone, assert_keys_gone_logs_kept, assert_lab_clean, cli, poll, write_inventory
from test_peer import holds_for, inventory, run, until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

__all__ = ["cli"]  # the fixture, imported for the CLI test

IDLE = 4.0  # seconds: short, yet longer than a client takes to connect on a busy machine


async def task_processing(client: Client, timeout: float = 20.0) -> None:
    """Wait until a worker runs a task (bounded)."""
    deadline = time.monotonic() + timeout
    while not any((await client.processing()).values()):
        assert time.monotonic() < deadline, "no task started on the worker"
        await asyncio.sleep(0.05)


def test_an_idle_cluster_ends_itself_but_not_while_used(lab: Any, tmp_path: Path) -> None:
    """A client keeps it, a task without a client keeps it; then idle for IDLE seconds, it closes and cleans up."""
    path = inventory(lab, tmp_path, {"h1": {}, "h2": {}}, groups={"scheduler": ["h1"], "workers": ["h2"]})

    async def scenario() -> SSHSpecCluster:
        cluster = await SSHSpecCluster(
            inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, n_workers=1, security=False,
            idle_timeout=f"{IDLE:g}s",
        )
        running = lambda: cluster.status == Status.running  # noqa: E731
        try:
            async with Client(cluster, asynchronous=True) as client:
                await holds_for(running, 2 * IDLE, "the cluster with a client connected")
                # A task that outlives the client: fire and forget, then the client leaves.
                task = client.submit(time.sleep, 3 * IDLE, pure=False)
                fire_and_forget(task)
                await task_processing(client)
            await holds_for(running, 1.5 * IDLE, "the cluster with a task running and no client")
            # The task ends within 3*IDLE of its start; then IDLE idle seconds and the cluster ends.
            await until(lambda: cluster.status == Status.closed, 6 * IDLE + 30, "the idle cluster to close")
            assert cluster.idle.reason == f"idle for {IDLE:g}s"
        finally:
            await cluster.close()  # closed already: a no-op
        return cluster

    run(scenario())
    assert_lab_clean(lab)


@pytest.mark.parametrize("where", ["head", "h2"])
def test_a_scheduler_closed_by_distributed_idle_timeout_ends_the_whole_cluster(lab: Any, tmp_path: Path, where: str) -> None:
    """distributed's own idle timeout closes the scheduler (on the head, on a host): the cluster follows, every host
    cleaned, with the same reason."""
    groups = {"workers": ["h1"], **({"scheduler": [where]} if where != "head" else {})}
    path = inventory(lab, tmp_path, {"h1": {}, **({where: {}} if where != "head" else {})}, groups=groups)
    seconds = 10  # distributed counts from the scheduler's start: the workers must be up well before

    async def scenario() -> None:
        cluster = await SSHSpecCluster(
            inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, n_workers=1, security=False,
            scheduler_options={"idle_timeout": f"{seconds}s"},
        )
        try:
            await until(lambda: cluster.status == Status.closed, 4 * seconds + 30, "the cluster to follow its scheduler")
            assert cluster.idle.reason == f"idle for {seconds}s"
        finally:
            await cluster.close()

    run(scenario())
    assert_lab_clean(lab)


def test_cli_up_idle_timeout_ends_and_list_says_why(lab: Any, cli: Cli, tmp_path: Path) -> None:
    """``up --detach --idle-timeout 5s``: the head closes the cluster, removes its state, and ``list`` says why."""
    path = write_inventory(lab, tmp_path / "lab.yml", ["h1"])
    state = cli.up_detached(path, "sleepy", "--no-tls", "--idle-timeout", "5s")
    cluster_id, head_pid = state["cluster_id"], int(state["pid"])
    assert state["up_options"]["idle_timeout"] == 5.0
    poll(lambda: _head_gone(head_pid) and not (cli.state_root / "sleepy").exists(), 90,
         "the idle cluster's head to end and remove its state", lambda: cli.state("sleepy"))
    rows = cli.json("list")
    assert [(r["name"], r["status"], r["reason"]) for r in rows] == [("sleepy", "ended", "idle for 5s")]
    assert "ended (idle for 5s)" in cli.ok("list").stdout
    assert_lab_clean(lab)
    assert_keys_gone_logs_kept(cluster_id)
