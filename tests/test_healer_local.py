"""The healer wakes on events only, through a local connection (no lab needed).

An idle cluster makes no healing passes; a killed worker process wakes the
healer, which relaunches its entry; nothing ends with an unretrieved task
exception.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from speccluster_ssh import SSHSpecCluster
from speccluster_ssh.errors import CapacityError, HostError


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
                await asyncio.sleep(0.5)  # the passes of the start settle
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
