"""dask-ctl's discovery entry point finds detached clusters.

dask-ctl 2024.1.0 (the newest release) installs but does not import with
distributed 2026.x (it imports a removed ``install_signal_handlers``), so the
test loads our ``dask_cluster_discovery`` entry point the way dask-ctl does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def test_dask_ctl_lists_and_attaches_to_a_detached_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import entry_points

    from speccluster_ssh.cluster import SSHSpecCluster

    (entry,) = [e for e in entry_points(group="dask_cluster_discovery") if e.name == "speccluster-ssh"]
    discover_cluster_names = entry.load()
    inventory = tmp_path / "local.yml"
    inventory.write_text(
        "all:\n  hosts:\n    here:\n      ansible_connection: local\n"
        f"      speccluster_python: {sys.executable}\n      speccluster_nthreads: 1\n      speccluster_slots: 2\n"
    )
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cli = [sys.executable, "-m", "speccluster_ssh.cli"]
    up = run([*cli, "up", str(inventory), "--detach", "--name", "ctl1", "--workers", "1"], env)
    state_file = tmp_path / "state" / "speccluster-ssh" / "ctl1" / "state.json"
    try:
        assert up.returncode == 0, up.stderr

        async def names() -> list[tuple[str, type]]:
            return [item async for item in discover_cluster_names()]

        found = asyncio.run(names())
        assert ("ctl1", SSHSpecCluster) in found
        cluster = SSHSpecCluster.from_name("ctl1")
        try:
            assert cluster.scheduler_address.startswith("tls://")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(cluster.scheduler_info.get("workers", {})) < 1:
                time.sleep(0.1)
            assert [w["name"] for w in cluster.scheduler_info["workers"].values()] == ["0"]
            cluster.scale(2)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(cluster.scheduler_info.get("workers", {})) < 2:
                time.sleep(0.1)
            assert len(cluster.scheduler_info["workers"]) == 2
        finally:
            cluster.close()  # detaches only: the cluster is the head process's (issue 21)
        pid = json.loads(state_file.read_text())["pid"] if state_file.exists() else None
        assert pid and _alive(pid)
        SSHSpecCluster.from_name("ctl1").shutdown()
        deadline = time.monotonic() + 30
        while pid and time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        assert not (pid and _alive(pid))
    finally:
        run([*cli, "down", "--name", "ctl1"], env)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
