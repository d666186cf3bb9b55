"""Operating a running cluster on the lab (issue 12): rolling restart, drain and undrain.

Each test starts its own small cluster (the lab is reset between tests).
How many workers the scheduler has is watched two ways during an
operation: a scheduler plugin sees every removal as it happens, and a task
polls the scheduler's worker list; the lowest count of either must stay at
or above what the operation promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, wait
from distributed.diagnostics.plugin import SchedulerPlugin

from speccluster_ssh.cluster import SSHSpecCluster
from test_cli_lab import agent_dir
from test_peer import DEADLINE, inventory, lab_cluster, names, run, slowinc, until, where_am_i

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


def _chunk_function() -> Any:
    # Made in a function so that it travels by value (workers cannot import this module).
    def chunk(i: int) -> Any:
        import numpy as np

        return np.full(1000, i, dtype="int64")

    return chunk


chunk = _chunk_function()


class Floor(SchedulerPlugin):
    """The fewest workers the scheduler had after any removal, and which watched keys ran again."""

    name = "ops-floor"

    def __init__(self, keys: set[Any]) -> None:
        self.floor = math.inf
        self.keys = keys
        self.recomputed: set[Any] = set()

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.floor = min(self.floor, len([w for w in scheduler.workers if w != worker]))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if key in self.keys and finish == "processing":
            self.recomputed.add(key)


@contextlib.asynccontextmanager
async def watched(cluster: SSHSpecCluster, keys: set[Any]) -> AsyncIterator[dict[str, Any]]:
    """Watch the worker count (plugin and polling) while the body runs; yields the lowest seen."""
    plugin = Floor(keys)
    cluster.scheduler.add_plugin(plugin)
    seen: dict[str, Any] = {"polled": math.inf, "plugin": plugin}
    stop = asyncio.Event()

    async def poll() -> None:
        # The plugin is the primary signal (it sees every removal); the poll is a cross-check.
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            seen["polled"] = min(seen["polled"], len(cluster.scheduler.workers))
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    try:
        yield seen
    finally:
        stop.set()
        await poller
        cluster.scheduler.remove_plugin(name=plugin.name)


async def restart_keeps_everything(cluster: SSHSpecCluster, workers: int, floor: int) -> dict[str, Any]:
    """Rolling restart (batch 1) under a computation, with 200 persisted chunks."""
    async with Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(workers)
        chunks = client.map(chunk, range(200), pure=False)
        await wait(chunks)
        before = set(cluster.scheduler.workers)
        running = client.map(slowinc, range(150), delay=0.2, pure=False)
        async with watched(cluster, {c.key for c in chunks}) as seen:
            result = await cluster.rolling_restart(batch=1)
        assert not result["refused"] and not result["dropped"], result
        assert len(result["moved"]) == len(cluster.worker_spec), result
        assert await client.gather(running) == list(range(1, 151))
        # Every chunk is still held (moved, not recomputed), and right.
        assert not seen["plugin"].recomputed, sorted(seen["plugin"].recomputed)[:5]
        assert all(cluster.scheduler.tasks[c.key].state == "memory" for c in chunks)
        totals = await client.gather(client.map(lambda a: int(a.sum()), chunks, pure=False))
        assert totals == [1000 * i for i in range(200)]
        after = set(cluster.scheduler.workers)
        assert len(after) == workers and not (before & after), (before, after)
        assert seen["plugin"].floor >= floor and seen["polled"] >= floor, (seen["plugin"].floor, seen["polled"])
        assert seen["plugin"].floor < math.inf, "no worker was ever removed"
        return result


def test_rolling_restart_single_worker_entries(lab: Any, tmp_path: Path) -> None:
    """Six single-worker entries filling every slot: each retired, then started again; never fewer than 5."""
    hosts = {h.name: {"speccluster_slots": 2} for h in lab.hosts[:3]}

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path, hosts), n_workers=6) as (cluster, _):
            agents = {h: a for h, a in cluster.pool.agents.items()}
            result = await restart_keeps_everything(cluster, workers=6, floor=5)
            assert result["new_agents"] == sorted(hosts), result
            # Fresh agents (a newly installed wheel is imported), and the old ones are gone.
            assert all(cluster.pool.agents[h] is not a and not a.alive for h, a in agents.items())
            assert names(cluster) == {str(i) for i in range(6)}  # retired first: the names stay

    run(main())


def test_rolling_restart_group_entries(lab: Any, tmp_path: Path) -> None:
    """Three entries of two workers each filling every slot: never fewer than 4."""
    hosts = {h.name: {"speccluster_nworkers": 2} for h in lab.hosts[:3]}

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path, hosts), n_workers=6) as (cluster, _):
            await restart_keeps_everything(cluster, workers=6, floor=4)

    run(main())


def test_drain_moves_workers_and_nothing_is_placed_there_until_undrain(lab: Any, tmp_path: Path) -> None:
    """Drain a host during a computation: its workers move with their data; scale up avoids it; undrain refills."""
    hosts = {h.name: {"speccluster_slots": 2} for h in lab.hosts[:3]}
    drained = lab.hosts[0].name

    def on(host: str) -> list[str]:
        return [w["name"] for w in cluster.status_report()["workers"] if w["host"] == host]

    async def main() -> None:
        nonlocal cluster
        async with lab_cluster(lab, inventory(lab, tmp_path, hosts), n_workers=4) as (cluster, _):
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(4)
                there = on(drained)
                assert len(there) == 2, cluster.status_report()["workers"]
                # A result held only by a worker of the drained host.
                pinned = client.submit(where_am_i, workers=[there[0]], allow_other_workers=False, pure=False)
                first = await pinned
                running = client.map(slowinc, range(60), delay=0.2, pure=False)
                result = await cluster.drain(drained, reason="disk replacement")
                assert sorted(result["moved"]) == sorted(there) and not result["dropped"], result
                assert on(drained) == []
                assert not {str(ws.name) for ws in cluster.scheduler.workers.values()} & set(there)
                report = cluster.status_report()
                assert report["hosts"][drained]["drained"] == "disk replacement"
                assert report["summary"]["drained_hosts"] == {drained: "disk replacement"}
                assert await client.gather(running) == list(range(1, 61))
                assert await asyncio.wait_for(pinned, 30) == first  # its data moved
                # While drained, growing places nothing there (the other slots are full): scale
                # changes the spec at once, so a placement there would show now.
                cluster.scale(6)
                assert on(drained) == [] and len(cluster.worker_spec) == 4
                assert not [s for s in cluster.worker_spec.values() if s["options"]["host"] == drained]
                assert "capacity" in cluster.capacity_note
                # Undrain: the cluster is short of its 6 and fills the host again.
                result = await cluster.undrain(drained)
                assert len(result["added"]) == 2, result
                await client.wait_for_workers(6)
                await until(lambda: len(on(drained)) == 2, DEADLINE, f"two workers on {drained}")
                assert cluster.status_report()["hosts"][drained]["drained"] == ""
                await drain_moves_an_entry_still_starting(cluster)

    cluster: SSHSpecCluster
    run(main())


def processes_on(cluster: SSHSpecCluster, host: str) -> list[Any]:
    """The cluster's entry processes on ``host`` that are not closed: running, starting or failed."""
    from distributed.core import Status

    procs = {id(p): p for p in (*cluster.workers.values(), *cluster._created)}
    return [p for p in procs.values() if getattr(p, "host", None) == host and p.status != Status.closed]


async def drain_moves_an_entry_still_starting(cluster: SSHSpecCluster) -> None:
    """Drain the host of an entry whose process is starting: the process is closed there, not left running."""
    cluster.scale(3)
    await until(lambda: len(cluster.scheduler.workers) == 3 and set(cluster.workers) == set(cluster.worker_spec),
                DEADLINE, "three workers")
    cluster.scale(4)  # two free slots are left after it, at least one on another host
    (key,) = [k for k in cluster.worker_spec if k not in cluster.workers]
    host = cluster.worker_spec[key]["options"]["host"]
    deadline = time.monotonic() + DEADLINE
    # Looked at every turn of the loop: the process is created at once, its start takes far longer.
    while not any(getattr(p, "name", None) == key for p in cluster._created):
        assert time.monotonic() < deadline, f"entry {key} was not created"
        await asyncio.sleep(0)
    assert key not in cluster.workers, "started already"
    result = await cluster.drain(host, reason="starting entry")
    assert key in result["moved"] and result["moved"][key]["host"] != host, result
    await until(lambda: not processes_on(cluster, host) and len(cluster.scheduler.workers) == 4, 30,
                f"no process left on {host}: {processes_on(cluster, host)}")


def test_drain_and_restart_refuse_user_mistakes(lab: Any, tmp_path: Path) -> None:
    """An unknown host or a batch below 1: one clear error, nothing changed."""
    from speccluster_ssh.errors import UserError

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path, {lab.hosts[0].name: {}}), n_workers=1) as (cluster, _):
            spec = dict(cluster.worker_spec)
            with pytest.raises(UserError, match="no worker host named 'nosuch'.*" + lab.hosts[0].name):
                await cluster.drain("nosuch")
            with pytest.raises(UserError, match="batch must be 1 or more"):
                await cluster.rolling_restart(batch=0)
            assert cluster.worker_spec == spec and not cluster.healer.drained_hosts()

    run(main())


@contextlib.contextmanager
def files_watched(directory: Path, files: Any) -> Iterator[set[str]]:
    """Look for ``files`` under ``directory`` every millisecond or so while the body runs; yields those ever missing.

    A thread, so the look goes on while the event loop is busy.
    """
    missing: set[str] = set()
    stop = threading.Event()

    def look() -> None:
        deadline = time.monotonic() + 300
        while not stop.wait(0.001) and time.monotonic() < deadline:
            missing.update(f for f in files if not (directory / f).is_file())

    assert all((directory / f).is_file() for f in files), list(directory.rglob("*"))
    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    try:
        yield missing
    finally:
        stop.set()
        thread.join(10)


def test_restart_refuses_a_host_whose_distributed_changed(lab: Any, tmp_path: Path) -> None:
    """After the start, h2's python claims another distributed release: h2 is refused, left as it was; h1 restarts.

    The refused host keeps its files (TLS, logs). Then a restart whose first replacement does not
    register in time stops there, and every entry it did not replace keeps running on its old agent
    until the cluster closes (which must leave nothing on the hosts).
    """
    import sys

    from speccluster_ssh.operations import OperationError

    wrappers = {}
    for host in lab.hosts[:2]:
        site = tmp_path / f"site-{host.name}"
        site.mkdir()
        wrapper = tmp_path / f"python-{host.name}"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
        wrapper.chmod(0o755)
        wrappers[host.name] = (site, wrapper)
    old, new = lab.hosts[1].name, lab.hosts[0].name
    hosts = {name: {"speccluster_python": str(wrapper)} for name, (_, wrapper) in wrappers.items()}
    hosts[new]["speccluster_slots"] = 3  # two entries and a free slot there

    def addresses() -> dict[str, str]:
        return {str(ws.name): addr for addr, ws in cluster.scheduler.workers.items()}

    def keys_on(host: str) -> list[str]:
        return [k for k, spec in cluster.worker_spec.items() if spec["options"]["host"] == host]

    async def main() -> None:
        nonlocal cluster
        async with lab_cluster(lab, inventory(lab, tmp_path, hosts), n_workers=3, security=True) as (cluster, _):
            await until(lambda: len(cluster.scheduler.workers) == 3, DEADLINE, "three workers")
            assert len(keys_on(new)) == 2 and len(keys_on(old)) == 1, cluster.worker_spec
            before = addresses()
            # As if provision.yml had installed another release on h2 since the start.
            (wrappers[old][0] / "sitecustomize.py").write_text(
                "import distributed\ndistributed.__version__ = '2020.1.0'\n")
            with files_watched(agent_dir(cluster.cluster_id) / new, cluster.pool.files) as missing:
                result = await cluster.rolling_restart()
            assert not missing, f"TLS files missing on {new} during the restart: {missing}"
            assert list(result["refused"]) == [old] and "2020.1.0" in result["refused"][old], result
            assert result["new_agents"] == [new], result
            after = addresses()
            kept = keys_on(old)
            assert kept and all(after[k] == before[k] for k in kept)  # left as they were
            assert not {before[k] for k in before if k not in kept} & set(after.values()), (before, after)
            assert cluster.status_report()["hosts"][old]["state"] == "up"
            # The refused agent left the host's files to the agent that runs there.
            there = agent_dir(cluster.cluster_id) / old
            assert cluster.pool.files and all((there / f).is_file() for f in cluster.pool.files), list(there.rglob("*"))
            assert all((there / "logs" / f"{k}.log").is_file() for k in kept), list(there.rglob("*"))
            async with Client(cluster, asynchronous=True) as client:
                assert (await client.submit(where_am_i, workers=kept, pure=False))[0] == kept[0]

            # A restart whose first replacement (start first, on h1's free slot) fails: h1's new agent
            # imports a dask whose servers cannot start.
            (wrappers[new][0] / "sitecustomize.py").write_text(
                "import distributed.nanny, distributed.worker\n"
                "async def broken(self):\n    raise RuntimeError('broken by the test')\n"
                "distributed.nanny.Nanny.start_unsafe = broken\ndistributed.worker.Worker.start_unsafe = broken\n")
            staying = keys_on(new)
            agent = cluster.pool.agents[new]
            before = addresses()
            with pytest.raises(OperationError, match="1 left as they were"):
                await cluster.rolling_restart()
            # The entries it did not replace run on, on their old agent, as they were.
            assert agent.alive and cluster.pool.agents[new] is not agent
            assert all(cluster.workers[k].status.name == "running" for k in staying), cluster.workers
            await until(lambda: set(cluster.worker_spec) == set(cluster.workers), DEADLINE, "the failed entry to close")
            assert {k: addresses().get(k) for k in staying} == {k: before[k] for k in staying}
            assert all(cluster.workers[k]._agent is agent for k in staying)
            # Once they are gone, so is their agent (the cluster's close must end the rest).
            await cluster.scale_down(staying[1:])
            assert agent.alive
            await cluster.scale_down(staying[:1])
            await until(lambda: not agent.alive, DEADLINE, "the old agent to stop")

    cluster: SSHSpecCluster
    run(main())
