"""The host agent's cleanup rules, and a whole cluster, run through a local connection (no lab needed)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed import Client, Scheduler

from speccluster_ssh.agent import MARKER_ENV, HostAgent
from speccluster_ssh.agent.host import _private_dir
from speccluster_ssh.cluster import SSHSpecCluster
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.errors import HostError
from speccluster_ssh.inventory import Inventory


def local_host(**variables: Any) -> Any:
    spec = {"name": "here", "ansible_connection": "local", "speccluster_python": sys.executable, **variables}
    return Inventory.from_hosts([spec]).hosts["here"]


async def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        await asyncio.sleep(0.05)
    return alive


async def start_with_worker(tmp_path: Path, silence: float = 15.0) -> tuple[Scheduler, HostAgent, int]:
    scheduler = Scheduler(host="127.0.0.1", port=0, dashboard_address=":0")
    await scheduler
    agent = HostAgent(HostConnection(local_host(), ConnectSettings()), f"local-{time.monotonic_ns()}", silence=silence, base_dir=str(tmp_path / "base"))
    await agent.start()
    ready = asyncio.get_running_loop().create_future()
    agent.on("ready", lambda m: ready.done() or ready.set_result(m))
    await agent.request("start", name="w", role="worker", scheduler=scheduler.address, options={"nthreads": 1, "name": "w"})
    message = await asyncio.wait_for(ready, 60)
    return scheduler, agent, int(message["pid"])


def test_children_die_with_a_killed_agent(tmp_path: Path) -> None:
    async def main() -> None:
        scheduler, agent, pid = await start_with_worker(tmp_path)
        try:
            os.kill(int(agent.facts["pid"]), signal.SIGKILL)
            assert await wait_gone([pid], 10) == []
        finally:
            await agent.close()
            await scheduler.close()

    asyncio.run(main())


def test_silent_head_makes_the_agent_kill_everything(tmp_path: Path) -> None:
    async def main() -> None:
        scheduler, agent, pid = await start_with_worker(tmp_path, silence=1.5)
        try:
            assert agent._pinger is not None
            agent._pinger.cancel()  # the head goes quiet, as after a network cut
            agent_pid = int(agent.facts["pid"])
            assert await wait_gone([pid, agent_pid], 15) == []
        finally:
            await agent.close()
            await scheduler.close()

    asyncio.run(main())


def test_closed_channel_makes_the_agent_kill_everything(tmp_path: Path) -> None:
    async def main() -> None:
        scheduler, agent, pid = await start_with_worker(tmp_path)
        try:
            agent_pid = int(agent.facts["pid"])
            assert agent._channel is not None
            await agent._channel.close()  # EOF on the agent's stdin
            assert await wait_gone([pid, agent_pid], 15) == []
        finally:
            await agent.close()
            await scheduler.close()

    asyncio.run(main())


def test_shutdown_removes_the_cluster_directory(tmp_path: Path) -> None:
    async def main() -> None:
        scheduler, agent, pid = await start_with_worker(tmp_path)
        directory = Path(agent.facts["dir"])
        assert directory.is_dir()
        assert oct(directory.stat().st_mode & 0o777) == oct(0o700)
        path = await agent.write_file("tls/secret.pem", b"secret")
        assert oct(Path(path).stat().st_mode & 0o777) == oct(0o600)
        with pytest.raises(HostError, match="inside the cluster directory"):
            await agent.write_file("../escape", b"x")
        await agent.close(remove_files=True)
        await scheduler.close()
        assert await wait_gone([pid], 10) == []
        assert not directory.exists()

    asyncio.run(main())


def test_missing_python_is_explained(tmp_path: Path) -> None:
    async def main() -> None:
        host = local_host(speccluster_python=str(tmp_path / "no-python"))
        agent = HostAgent(HostConnection(host, ConnectSettings()), "x")
        with pytest.raises((HostError, OSError)) as info:
            await agent.start(timeout=20)
        assert "no-python" in str(info.value)

    asyncio.run(main())


def test_private_dir_refuses_other_users_places(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    planted = shared / "planted"
    planted.mkdir()
    os.chown(planted, 65534, 65534)  # as if another user made it first
    with pytest.raises(PermissionError, match="uid 65534"):
        _private_dir(str(planted / "cluster"))
    link = shared / "link"
    link.symlink_to(tmp_path)
    os.lchown(link, 65534, 65534)
    with pytest.raises(PermissionError):
        _private_dir(str(link / "cluster"))
    mine = _private_dir(str(shared / "mine" / "cluster"))
    assert oct(os.stat(mine).st_mode & 0o777) == oct(0o700)


def test_wrong_distributed_version_is_refused_with_both_versions(tmp_path: Path) -> None:
    import distributed

    from speccluster_ssh.process import AgentPool

    # A python whose distributed claims another release, as on a host with an old venv.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import distributed\ndistributed.__version__ = '2020.1.0'\n")
    wrapper = tmp_path / "old-python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    host = local_host(speccluster_python=str(wrapper))

    cluster_id = f"v-{time.monotonic_ns()}"

    async def main() -> None:
        pool = AgentPool(cluster_id, {"here": host}, ConnectSettings())
        try:
            with pytest.raises(HostError) as info:
                await pool.agent("here")
        finally:
            await pool.close()
        message = str(info.value)
        assert "2020.1.0" in message and distributed.__version__ in message and "here" in message
        assert pool.states["here"].state == "down"
        # The refused agent ends. The wrapper execs python, so it is found by
        # the cluster marker in its environment, not by the wrapper's path.
        deadline = time.monotonic() + 15
        while _marked_pids(cluster_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert _marked_pids(cluster_id) == [], f"an agent of {cluster_id} is still running"

    asyncio.run(main())


def _marked_pids(cluster_id: str) -> list[int]:
    """PIDs of this user's processes whose environment carries ``SPECCLUSTER_SSH_CLUSTER=<cluster_id>``."""
    marker = f"{MARKER_ENV}={cluster_id}".encode()
    found = []
    for pid in psutil.pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if marker in environ:
            found.append(pid)
    return found


def test_shutdown_keeps_the_tls_files_for_a_newer_agent_when_asked(tmp_path: Path) -> None:
    """A restart's old agent stops with keep_tls: the host's TLS files stay for the new agent sharing the directory."""

    async def main() -> None:
        cluster_id = f"local-{time.monotonic_ns()}"
        agents = [HostAgent(HostConnection(local_host(), ConnectSettings()), cluster_id, base_dir=str(tmp_path / "base"))
                  for _ in range(2)]
        for agent in agents:
            await agent.start()
        directory = Path(agents[0].facts["dir"])
        assert Path(agents[1].facts["dir"]) == directory
        await agents[1].write_file("tls/ca.pem", b"ca")
        await agents[0].close(remove_files=False, keep_tls=True)
        assert (directory / "tls" / "ca.pem").read_bytes() == b"ca"
        # Without it the keys go, even when the logs stay (for their retention; an agent that ran nothing keeps none).
        (directory / "logs" / "w.log").write_text("a worker's log\n")
        await agents[1].close(remove_files=False)
        assert not (directory / "tls").exists() and (directory / "logs" / "w.log").is_file()

    asyncio.run(main())


def test_local_connection_needs_no_sshd(tmp_path: Path) -> None:
    inventory = tmp_path / "local.yml"
    inventory.write_text(
        "all:\n  hosts:\n    here:\n      ansible_connection: local\n"
        f"      speccluster_python: {sys.executable}\n      speccluster_nworkers: 2\n      speccluster_nthreads: 1\n"
    )
    with SSHSpecCluster.from_inventory(inventory) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            assert client.submit(lambda x: x * 2, 21).result(timeout=30) == 42
            assert sorted(w["name"] for w in client.scheduler_info()["workers"].values()) == ["0-0", "0-1"]
