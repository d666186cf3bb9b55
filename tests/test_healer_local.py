"""The healer wakes on events only, through a local connection (no lab needed).

An idle cluster makes no healing passes; a killed worker process wakes the
healer, which relaunches its entry; nothing ends with an unretrieved task
exception. An entry whose process died on a lost host, but which was already
moved to a usable one, is said to start again there, not to move (no cluster).
A pass reads hosts and entries into a snapshot and carries out the plan: an
entry stranded on a down host moves, then the cluster reconciles (no cluster).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from distributed import Client
from distributed.core import Status

from speccluster_ssh import SSHSpecCluster, entries
from speccluster_ssh.entries import EntrySettings
from speccluster_ssh.errors import CapacityError, HostError
from speccluster_ssh.healer import Healer
from speccluster_ssh.healing import (
    DropDeadEntry,
    EntryView,
    HostView,
    Process,
    Reconcile,
    RetryHost,
    Snapshot,
    StartAgainInPlace,
)
from speccluster_ssh.hosts import HostTable
from speccluster_ssh.inventory import Inventory
from speccluster_ssh.tasks import TaskSet


def local_inventory(tmp_path: Path, slots: int = 2) -> Path:
    inventory = tmp_path / "local.yml"
    inventory.write_text(
        "all:\n  hosts:\n    here:\n      ansible_connection: local\n"
        f"      speccluster_python: {sys.executable}\n      speccluster_slots: {slots}\n"
        "      speccluster_nthreads: 1\n"
    )
    return inventory


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_idle_healer_sleeps_and_a_killed_worker_wakes_it(tmp_path: Path) -> None:
    unhandled: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unhandled.append(context))
        async with SSHSpecCluster.from_inventory(local_inventory(tmp_path), asynchronous=True) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(2, timeout=60)
                assert cluster.scheduler_ready()  # a scheduler in this process counts too
                healer = cluster.healer
                # The passes of the start settle: nothing is left to retry (a loaded machine takes longer).
                await until(lambda: healer.next_deadline() == float("inf"), 30, "the healer to go idle")
                passes = healer.passes
                await asyncio.sleep(2.0)
                assert healer.passes == passes, "the healer polled while nothing happened"
                assert healer.next_deadline() == float("inf")

                proc = cluster.workers["1"]
                (pid,) = proc.pids.values()
                os.kill(pid, signal.SIGKILL)
                await until(lambda: healer.passes > passes, 10, "the healer to wake on the exit")
                await until(
                    lambda: cluster.workers.get("1") is not proc and getattr(cluster.workers.get("1"), "status", None)
                    and cluster.workers["1"].status.name == "running",
                    60,
                    "entry 1 to run again",
                )
                await client.wait_for_workers(2, timeout=60)
                assert await client.submit(lambda x: x + 1, 1) == 2

                # Full: the next entry has no slot, and that is no host's error.
                with pytest.raises(CapacityError) as info:
                    cluster.new_worker_spec()
                assert not isinstance(info.value, HostError)
                assert "host *" not in str(info.value)

    asyncio.run(main())
    assert not [c.get("message") for c in unhandled]


def test_an_entry_already_on_a_usable_host_starts_again_there_not_moved_to_itself() -> None:
    """The random-fault run's "entry 1 moved from sclab-h3 to sclab-h3", replayed without a cluster.

    Entry 1 was starting on h2 when h2 was lost; the healer moved its spec
    to h3 before that start ended. The failed process (still on h2) then
    lands in ``workers``, and the next pass re-places the entry again: its
    spec's host h3 is usable, so it stays there and the log says so.
    """
    inventory = Inventory.from_hosts(
        [{"name": name, "groups": ["workers"]} for name in ("h1", "h2", "h3")], speccluster_nthreads=1
    )
    hosts = {h.name: h for h in inventory.worker_hosts}
    settings = EntrySettings("c-test", 10.0)
    logged: list[str] = []
    cluster = SimpleNamespace(
        worker_hosts=hosts,
        worker_spec={"0": entries.worker_entry(settings, hosts["h1"]), "1": entries.worker_entry(settings, hosts["h3"])},
        entry_settings=settings,
        new_spec=None,
        placement_policy="spread",
        log_event=logged.append,
        slot_limits=lambda: {},  # no other cluster holds anything
    )
    table = HostTable(hosts.values())
    for name in hosts:
        table.renew_agent(name, SimpleNamespace(alive=True))  # type: ignore[arg-type]
    table.mark_lost("h2", "connection lost")
    pool = SimpleNamespace(table=table, on_host_lost=lambda callback: None)

    async def main() -> None:
        healer = Healer(cluster, pool, TaskSet("test"))  # type: ignore[arg-type]
        # What heal_once plans for entry 1's dead process on h2 (unusable): drop it, place the entry.
        snapshot = Snapshot(
            hosts=tuple(HostView(n, s.state) for n, s in table.states.items()),
            worker_hosts=frozenset(hosts),
            entries=(EntryView("0", "h1", Process.RUNNING, "h1", started=True), EntryView("1", "h3", Process.DEAD, "h2")),
        )
        actions = healer.core.plan(snapshot, time.monotonic())
        assert actions == [RetryHost("h2"), DropDeadEntry("1"), StartAgainInPlace("1", "h3"), Reconcile()]
        await healer.carry_out(actions[2])

    asyncio.run(main())
    assert logged == ["entry 1 started again on h3"]
    assert cluster.worker_spec["1"]["options"]["host"] == "h3"
    assert cluster.worker_spec["0"]["options"]["host"] == "h1"


def test_a_pass_moves_an_entry_stranded_on_a_down_host_and_reconciles() -> None:
    """heal_once without a cluster: the snapshot it reads, and the actions it carries out."""
    inventory = Inventory.from_hosts(
        [{"name": name, "groups": ["workers"]} for name in ("h1", "h2")], speccluster_nthreads=1
    )
    hosts = {h.name: h for h in inventory.worker_hosts}
    settings = EntrySettings("c-test", 10.0)
    logged: list[str] = []
    reconciles: list[str] = []

    async def reconcile_and_log() -> None:
        reconciles.append("reconcile")

    cluster = SimpleNamespace(
        worker_hosts=hosts,
        worker_spec={"0": entries.worker_entry(settings, hosts["h2"])},
        workers={},
        status=Status.running,
        entry_settings=settings,
        new_spec=None,
        placement_policy="spread",
        log_event=logged.append,
        slot_limits=lambda: {},  # no other cluster holds anything
        reconcile_and_log=reconcile_and_log,
    )
    table = HostTable(hosts.values())
    table.renew_agent("h1", SimpleNamespace(alive=True))  # type: ignore[arg-type]
    # Lost "an hour from now": its retry is not due, so the pass must not start one.
    table.mark_lost("h2", "connection lost", now=time.monotonic() + 3600)
    pool = SimpleNamespace(table=table, on_host_lost=lambda callback: None)

    async def main() -> None:
        healer = Healer(cluster, pool, TaskSet("test"))  # type: ignore[arg-type]
        healer.entry_start_failed("0", "could not connect")
        snapshot = healer.snapshot()
        assert snapshot.entries == (EntryView("0", "h2", Process.NONE, None, False, "could not connect"),)
        assert [(h.name, h.health, h.usable) for h in snapshot.hosts] == [("h1", "up", True), ("h2", "down", False)]
        assert healer.next_deadline() == table.states["h2"].retry_at
        await healer.heal_once()
        assert healer.passes == 1

    asyncio.run(main())
    assert cluster.worker_spec["0"]["options"]["host"] == "h1"
    assert logged == ["entry 0 moved from h2 to h1"]
    assert reconciles == ["reconcile"]
