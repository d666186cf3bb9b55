"""A cluster's close reports real failures only (local agents, no lab needed).

Issue 21: the README's Python session printed ``stopping nanny processes on
node02: 1-0 failed: HostError: host node02: stop failed: agent lost: closed``
at every ``close()``, although nothing was left running. The close had told
the agents to shut down, and stops sent to them meanwhile (a ``scale(1)``
still retiring entries) were answered "agent lost". Each close also logged
that the agents "did not confirm" their shutdown: the pool shut each agent
down twice. An agent that ends because we asked it to is no failure; one
killed before the close is, and is still reported.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from speccluster_ssh import SSHSpecCluster

# What a failure at close looks like in the log (process.py, pool.py, agent/__init__.py).
FAILURE_WORDS = ("failed", "did not confirm", "lost", "still running")
# Any free port: other clusters on this machine may hold 8787.
NO_DASHBOARD_PORT = {"dashboard_address": ":0"}


@pytest.fixture
def inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The README's inventory: node01 (2 slots of one worker), node02 (1 slot of a group of 2), both local."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the local agents' logs
    path = tmp_path / "inventory.yml"
    path.write_text(
        "all:\n  hosts:\n"
        f"    node01:\n      ansible_connection: local\n      speccluster_python: {sys.executable}\n"
        "      speccluster_slots: 2\n      speccluster_nthreads: 1\n"
        f"    node02:\n      ansible_connection: local\n      speccluster_python: {sys.executable}\n"
        "      speccluster_slots: 1\n      speccluster_nworkers: 2\n      speccluster_nthreads: 1\n"
    )
    yield path


def close_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The speccluster_ssh records at INFO or above that read like a failure."""
    return [
        f"{r.name} {r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("speccluster_ssh") and any(w in r.getMessage() for w in FAILURE_WORDS)
    ]


def pids_of(cluster: SSHSpecCluster) -> list[int]:
    """The agents' and the workers' processes."""
    pids = [int(a.facts["pid"]) for a in cluster.pool.agents.values()]
    for process in cluster.workers.values():
        pids += list(getattr(process, "pids", {}).values())
    return pids


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        time.sleep(0.05)
    return alive


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("scale_first", [False, True], ids=["close", "scale-1-then-close"])
def test_close_logs_no_failure_and_leaves_nothing(
    inventory: Path, caplog: pytest.LogCaptureFixture, scale_first: bool
) -> None:
    caplog.set_level(logging.INFO, logger="speccluster_ssh")
    # Three closes: without the fix, each of them logged a failure.
    for _ in range(3):
        cluster = SSHSpecCluster.from_inventory(inventory, n_workers=2, scheduler_options=NO_DASHBOARD_PORT)
        pids = pids_of(cluster)
        assert len(pids) == 5  # two agents, workers 0, 1-0 and 1-1
        if scale_first:
            cluster.scale(1)  # still retiring entry 1 of node02 when the close begins
        caplog.clear()
        cluster.close()
        assert close_records(caplog) == []
        assert wait_gone(pids) == []


def test_close_reports_an_agent_killed_before_it(inventory: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="speccluster_ssh")
    cluster = SSHSpecCluster.from_inventory(inventory, n_workers=2, scheduler_options=NO_DASHBOARD_PORT)
    pids = pids_of(cluster)
    # When node02's agent did not start, the log says why (pool.agent logs it).
    if "node02" not in cluster.pool.agents:
        cluster.close()
        pytest.fail(f"node02's agent did not start:\n{caplog.text}")
    os.kill(int(cluster.pool.agents["node02"].facts["pid"]), signal.SIGKILL)
    cluster.close()
    warnings = [r for r in close_records(caplog) if " WARNING " in r and "node02" in r]
    assert warnings, caplog.text
    assert wait_gone(pids) == []
