"""Sharing a lab (issue 23), on the SSH lab: clusters that hold the same hosts never oversubscribe them.

Each lab host has its own ``/var/tmp`` (tests/sshlab.py), where every cluster's
agents record their leases; these tests read those files and the clusters'
schedulers to check that no host ever runs more workers than its slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh.cluster import SSHSpecCluster
from test_peer import captured, holds_for, inventory, processes_besides_sshd, run, slowinc, until

pytestmark = pytest.mark.lab

DEADLINE = 90.0


def leases_on(lab: Any) -> dict[str, list[dict[str, Any]]]:
    """The live lease records in each lab host's /var/tmp, by host name (wants left out)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for host in lab.hosts:
        records = []
        for path in sorted(Path(host.var_tmp).glob("speccluster-lease.*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # released while we read it
        found[host.name] = records
    return found


def wants_on(lab: Any) -> list[str]:
    """The live wants on the lab hosts: host, cluster and slots of each."""
    found = []
    for host in lab.hosts:
        for path in sorted(Path(host.var_tmp).glob("speccluster-want.*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            found.append(f"{host.name}: {record['cluster']} wants {record['wants']['slots']}")
    return found


def workers_per_host(lab: Any, *clusters: SSHSpecCluster) -> dict[str, int]:
    """Registered dask workers of ``clusters`` on each lab host (by the worker's address)."""
    ip_of = {h.ip: h.name for h in lab.hosts}
    counts = {h.name: 0 for h in lab.hosts}
    for cluster in clusters:
        scheduler = getattr(cluster, "scheduler", None)  # none before the cluster starts
        for address in list(scheduler.workers if scheduler is not None else ()):
            ip = address.split("://", 1)[-1].rsplit(":", 1)[0]
            if ip in ip_of:
                counts[ip_of[ip]] += 1
    return counts


class Sampler:
    """Samples every host's workers and leases while a test runs; records the worst seen."""

    def __init__(self, lab: Any, slots: int, *clusters: SSHSpecCluster) -> None:
        self.lab, self.slots, self.clusters = lab, slots, clusters
        self.worst: list[str] = []
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self.samples += 1
        for host, count in workers_per_host(self.lab, *self.clusters).items():
            if count > self.slots:
                self.worst.append(f"{host} ran {count} workers on {self.slots} slots")
        for host, records in leases_on(self.lab).items():
            if sum(r["holds"]["slots"] for r in records) > self.slots:
                self.worst.append(f"{host} had {len(records)} leases on {self.slots} slots")

    async def _run(self) -> None:
        for _ in range(100000):
            self.sample()
            await asyncio.sleep(0.1)

    def __enter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._task is not None:
            if self._task.done():
                self._task.result()  # a sampler that failed says why
            self._task.cancel()
        self.sample()
        assert self.samples > 3
        assert not self.worst, self.worst[:5]


def sharing_inventory(lab: Any, tmp_path: Path, slots: int) -> Path:
    return inventory(lab, tmp_path, {h.name: {"speccluster_slots": slots} for h in lab.hosts})


def cluster_on(lab: Any, path: Path, **options: Any) -> SSHSpecCluster:
    options.setdefault("security", False)
    return SSHSpecCluster(inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, **options)


def test_a_second_cluster_waits_for_the_first_and_takes_freed_slots_on_its_own(lab: Any, tmp_path: Path) -> None:
    """8 slots: the first takes 8, the second starts with 0 of 4 naming the holder, and reaches 4 when the first scales to 4."""
    path = sharing_inventory(lab, tmp_path, 2)

    async def main() -> None:
        async with cluster_on(lab, path, n_workers=8, name="first") as first:
            assert len(first.scheduler.workers) == 8
            assert sum(len(r) for r in leases_on(lab).values()) == 8
            with captured("speccluster_ssh") as records:
                async with cluster_on(lab, path, n_workers=4, min_workers=0, name="second") as second:
                    with Sampler(lab, 2, first, second):
                        assert len(second.scheduler.workers) == 0
                        said = "\n".join(r.getMessage() for r in records)
                        assert "held by root (cluster first from" in said, said
                        # Its wants are on the hosts, for everyone to see.
                        await until(lambda: wants_on(lab), DEADLINE, "the second cluster's wants")
                        # status shows the other holders on the cluster's hosts, and each side sees the other.
                        holders = second.status_report()["hosts"]["h1"]["holders"]
                        assert {(h["user"], h["name"]) for h in holders} == {("root", "first")}, holders
                        await until(lambda: first.status_report()["hosts"]["h1"]["wants"], DEADLINE,
                                    "the first cluster to see the second's want")
                        # Its leases are marked idle: no task runs on its workers.
                        await until(lambda: all(r.get("state") == "idle" for rs in leases_on(lab).values() for r in rs),
                                    DEADLINE, "the first cluster's leases to be marked idle")
                        first.scale(4)
                        await until(lambda: len(second.scheduler.workers) == 4, DEADLINE,
                                    "the second cluster to reach 4 workers by itself")
                        await until(lambda: len(first.scheduler.workers) == 4, DEADLINE, "the first to be at 4")
                        # Once it has what it asked for, it waits no more.
                        await until(lambda: not wants_on(lab), DEADLINE, "the wants to be removed")
            # The second cluster's leases ended with it.
            await until(lambda: sum(len(r) for r in leases_on(lab).values()) == 4, DEADLINE, "4 leases left")
        await until(lambda: not any(leases_on(lab).values()), DEADLINE, "every lease to end")

    run(main(), timeout=400)


def test_a_killed_head_s_leases_vanish_and_another_cluster_takes_the_lab(lab: Any, tmp_path: Path) -> None:
    """SIGKILL the first cluster's head: its leases end with its agents' silence, and the second scales to 8."""
    path = sharing_inventory(lab, tmp_path, 2)
    script = tmp_path / "head.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from speccluster_ssh.cluster import SSHSpecCluster
        cluster = SSHSpecCluster(inventory={str(path)!r}, known_hosts={str(lab.known_hosts)!r}, n_workers=8,
                                 security=False, silence=5, name="doomed")
        print("ready", flush=True)
        time.sleep(600)
    """))
    head = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert head.stdout is not None
        line = head.stdout.readline()
        assert line.strip() == "ready", line
        assert sum(len(r) for r in leases_on(lab).values()) == 8

        async def main() -> None:
            async with cluster_on(lab, path, n_workers=8, min_workers=0, name="next") as second:
                assert len(second.scheduler.workers) == 0
                head.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                await until(lambda: len(second.scheduler.workers) == 8, DEADLINE,
                            "the second cluster to take all 8 slots")
                # The agents' silence is 5 s; the watcher looks every 2 s while short.
                logging.getLogger(__name__).info("8 workers %.1f s after the kill", time.monotonic() - killed)

        run(main(), timeout=300)
    finally:
        if head.poll() is None:
            head.kill()
        head.wait(timeout=30)


async def awaited(cluster: SSHSpecCluster) -> None:
    await cluster  # starts it, as `async with` does


def test_two_clusters_started_together_never_hold_more_than_the_lab(lab: Any, tmp_path: Path) -> None:
    """4 slots, two clusters of 4 started at the same moment: together they hold 4, never more."""
    path = sharing_inventory(lab, tmp_path, 1)

    async def main() -> None:
        a = cluster_on(lab, path, n_workers=4, min_workers=0, name="left")
        b = cluster_on(lab, path, n_workers=4, min_workers=0, name="right")
        try:
            started = asyncio.gather(awaited(a), awaited(b))  # the same moment
            sampler = Sampler(lab, 1, a, b)
            with sampler:
                await started
                await until(lambda: len(a.scheduler.workers) + len(b.scheduler.workers) == 4, DEADLINE,
                            "the lab's 4 slots to be used")
                # Both keep waiting for 4 each: the lab stays at 4 while their watchers look again.
                await holds_for(lambda: len(a.scheduler.workers) + len(b.scheduler.workers) == 4, 5.0,
                                "4 workers in all")
                held = leases_on(lab)
                assert all(len(r) == 1 for r in held.values()), held
        finally:
            await asyncio.gather(a.close(), b.close(), return_exceptions=True)
        await until(lambda: not processes_besides_sshd(lab), 30, "every process on the lab hosts to end")

    run(main(), timeout=300)


def test_an_idle_adaptive_cluster_yields_to_a_waiting_one_and_no_result_is_lost(lab: Any, tmp_path: Path) -> None:
    """4 slots: an adaptive cluster holding them idle gives a waiting cluster the 2 it waits for after yield_after."""
    from distributed import Client, wait

    path = inventory(lab, tmp_path, {h.name: {"speccluster_slots": 1} for h in lab.hosts},
                     group_vars={"all": {"speccluster_yield_after": 2}})

    async def main() -> None:
        async with cluster_on(lab, path, n_workers=4, name="holder") as first:
            async with Client(first, asynchronous=True) as client:
                futures = client.map(slowinc, range(40), delay=0.01)
                await wait(futures)
                # Spread over the 4 workers: a yield that lost data would lose results.
                assert len({w for ws in (await client.who_has(futures)).values() for w in ws}) > 1
                # Adapt would keep them (its own scale-down waits a long time): only yielding frees them.
                first.adapt(minimum=1, maximum=4, interval="500ms", wait_count=100000)
                async with cluster_on(lab, path, n_workers=2, min_workers=0, name="waiter") as second:
                    with Sampler(lab, 1, first, second):
                        assert len(second.scheduler.workers) == 0
                        await until(lambda: len(second.scheduler.workers) == 2, DEADLINE,
                                    "the waiting cluster to get the 2 slots it waits for")
                        # No more than was waited for was given back.
                        await holds_for(lambda: len(first.scheduler.workers) == 2, 3.0, "the holder keeps 2")
                    assert await client.gather(futures) == [i + 1 for i in range(40)]

    run(main(), timeout=300)
