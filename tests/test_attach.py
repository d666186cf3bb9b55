"""Attaching to a detached cluster does not own it (issue 21, point 3; local agents, no lab).

``SSHSpecCluster.from_name(NAME)`` returns a handle whose ``close()``,
``with`` block, ``async with`` block and garbage collection only detach:
the cluster, started by ``up --detach``, keeps running. ``shutdown()``, or
``from_name(NAME, shutdown_on_close=True)`` and then ``close()``, tears it
down through its head process. A handle's ``get_logs()`` is keyed by worker
name, as ``SSHSpecCluster.get_logs`` is.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from speccluster_ssh import SSHSpecCluster
from speccluster_ssh.detached import DetachedCluster

CLI = [sys.executable, "-m", "speccluster_ssh.cli"]


class Detached:
    """``up --detach`` clusters of this test module, and the environment they share."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # The module's clusters keep their leases apart from this machine's /var/tmp, where another test
        # session's clusters would take the local host's slots (own_lease_dir is per test, too late for them).
        leases = root / "leases"
        leases.mkdir(mode=0o755)
        self.env = dict(os.environ, XDG_STATE_HOME=str(root / "state"), XDG_CACHE_HOME=str(root / "cache"),
                        SPECCLUSTER_SSH_LEASE_DIR=str(leases))
        self.inventory = root / "local.yml"
        self.inventory.write_text(
            "all:\n  hosts:\n    here:\n      ansible_connection: local\n"
            f"      speccluster_python: {sys.executable}\n      speccluster_nthreads: 1\n      speccluster_slots: 2\n"
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True, timeout=120)

    def up(self, name: str) -> int:
        """Start cluster ``name`` with one worker; the head process's pid."""
        done = self.run("up", str(self.inventory), "--detach", "--name", name, "--workers", "1")
        assert done.returncode == 0, done.stderr
        return int(json.loads(self.state_file(name).read_text())["pid"])

    def state_file(self, name: str) -> Path:
        return self.root / "state" / "speccluster-ssh" / name / "state.json"


@pytest.fixture(scope="module")
def detached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Detached]:
    clusters = Detached(tmp_path_factory.mktemp("attach"))
    with pytest.MonkeyPatch.context() as patch:
        # from_name reads the state directory in this process.
        patch.setenv("XDG_STATE_HOME", clusters.env["XDG_STATE_HOME"])
        yield clusters
    for name in ("keep", "down1", "down2"):
        clusters.run("down", "--name", name)


@pytest.fixture(scope="module")
def kept(detached: Detached) -> int:
    """A cluster that every test of attaching leaves running; its head's pid."""
    return detached.up("keep")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def wait_workers(cluster: DetachedCluster, n: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(cluster.scheduler_info.get("workers", {})) < n:
        time.sleep(0.1)
    return sorted(str(w["name"]) for w in cluster.scheduler_info["workers"].values())


def still_running(name: str, pid: int) -> None:
    """The cluster runs: its head process lives and a new handle sees its worker."""
    assert alive(pid)
    with SSHSpecCluster.from_name(name) as again:
        assert wait_workers(again, 1) == ["0"]


def test_close_detaches_and_the_cluster_keeps_running(detached: Detached, kept: int) -> None:
    cluster = SSHSpecCluster.from_name("keep")
    assert isinstance(cluster, DetachedCluster)
    assert cluster.shutdown_on_close is False
    assert wait_workers(cluster, 1) == ["0"]
    cluster.close()
    assert cluster.status.name == "closed"
    still_running("keep", kept)
    assert detached.run("status", "--name", "keep").returncode == 0


def test_leaving_with_detaches(kept: int) -> None:
    with SSHSpecCluster.from_name("keep") as cluster:
        assert cluster.scheduler_address.startswith("tls://")
    assert cluster.status.name == "closed"
    still_running("keep", kept)


def test_async_with_and_await_close_detach(kept: int) -> None:
    async def attach() -> list[str]:
        async with SSHSpecCluster.from_name("keep", asynchronous=True) as cluster:
            names = sorted(str(w["name"]) for w in cluster.scheduler_info["workers"].values())
        other = await SSHSpecCluster.from_name("keep", asynchronous=True)
        await other.close()
        return names

    assert asyncio.run(attach()) == ["0"]
    still_running("keep", kept)


def test_garbage_collection_never_tears_down(kept: int) -> None:
    # Even a handle that would tear the cluster down at close() only detaches when collected.
    cluster = SSHSpecCluster.from_name("keep", shutdown_on_close=True)
    assert wait_workers(cluster, 1) == ["0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # "unclosed cluster": detached by the collection
        del cluster
        gc.collect()
    still_running("keep", kept)


def test_get_logs_is_keyed_by_worker_name(kept: int) -> None:
    with SSHSpecCluster.from_name("keep") as cluster:
        assert wait_workers(cluster, 1) == ["0"]
        logs = cluster.get_logs()
        assert {"Cluster", "Scheduler", "0"} <= set(logs)
        assert not [k for k in logs if "://" in k]  # no address as a key
        (address,) = cluster.scheduler_info["workers"]
        assert set(cluster.get_logs(cluster=False, scheduler=False, workers=[address])) == {"0"}
        assert set(cluster.get_logs(cluster=False, scheduler=False, workers=["0"])) == {"0"}


def test_shutdown_tears_the_cluster_down(detached: Detached) -> None:
    pid = detached.up("down1")
    cluster = SSHSpecCluster.from_name("down1")
    cluster.shutdown()
    assert cluster.status.name == "closed"
    assert wait_gone(pid)
    assert "down1" not in detached.run("list").stdout or not detached.state_file("down1").exists()


def test_shutdown_on_close_tears_the_cluster_down_at_the_end_of_with(detached: Detached) -> None:
    pid = detached.up("down2")
    with SSHSpecCluster.from_name("down2", shutdown_on_close=True) as cluster:
        assert wait_workers(cluster, 1) == ["0"]
    assert wait_gone(pid)
