"""Remote processes on the SSH lab: agents, process interfaces and cleanup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, Scheduler
from distributed.core import Status

from speccluster_ssh.cluster import SSHSpecCluster
from speccluster_ssh.connection import ConnectSettings
from speccluster_ssh.errors import StartError
from speccluster_ssh.inventory import load_inventory
from speccluster_ssh.process import AgentPool, RemoteNanny, RemoteWorker
from sshlab import processes_besides_sshd

pytestmark = pytest.mark.lab


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def test_workers_and_nannies_on_several_hosts(lab: Any, tmp_path: Path) -> None:
    path = lab.write_inventory(
        tmp_path / "inv.yml",
        host_vars={"h2": {"speccluster_worker_class": "worker"}, "h3": {"speccluster_nworkers": 2}},
    )
    inv = load_inventory(path)
    with SSHSpecCluster(inventory=inv, known_hosts=lab.known_hosts, n_workers=3) as cluster:
        with Client(cluster) as client:
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
            seen = {w["name"]: addr for addr, w in client.scheduler_info()["workers"].items()}
            expected: dict[str, str] = {}
            for key, proc in cluster.workers.items():
                addresses = proc.worker_address
                if isinstance(addresses, list):
                    for suffix, addr in zip(cluster.worker_spec[key]["group"], addresses):
                        expected[f"{key}{suffix}"] = addr
                else:
                    expected[str(key)] = addresses
            assert seen == expected
            hosts_used = {cluster.worker_spec[k]["options"]["host"] for k in cluster.worker_spec}
            assert hosts_used == {"h1", "h2", "h3"}
            # Each worker really runs in its host's namespace, at its host's address.
            by_host = {h.name: h.ip for h in lab.hosts}
            for key, spec in cluster.worker_spec.items():
                addrs = cluster.workers[key].worker_address
                for addr in addrs if isinstance(addrs, list) else [addrs]:
                    assert by_host[spec["options"]["host"]] in addr
            assert isinstance(cluster.workers[[k for k, s in cluster.worker_spec.items() if s["options"]["host"] == "h2"][0]], RemoteWorker)
            # One connection per host, however many entries it holds.
            assert set(cluster.pool.connections) == {"h1", "h2", "h3"}
    assert wait_for(lambda: not processes_besides_sshd(lab), 15), processes_besides_sshd(lab)


async def _scheduler_and_pool(lab: Any, tmp_path: Path, **host_vars: Any) -> tuple[Scheduler, AgentPool]:
    path = lab.write_inventory(tmp_path / "inv.yml", host_vars=host_vars or None)
    inv = load_inventory(path)
    scheduler = Scheduler(host="0.0.0.0", port=0, dashboard_address=":0")
    await scheduler
    pool = AgentPool(f"t{os.getpid()}-{time.monotonic_ns()}", inv.hosts, ConnectSettings(known_hosts=lab.known_hosts), silence=5)
    pool.head_scheduler = ("tcp", scheduler.port)
    return scheduler, pool


def test_killed_worker_is_noticed(lab: Any, tmp_path: Path) -> None:
    """A worker killed on its host ends its process interface as failed (how fast: bench's ops-4x2, t_noticed)."""

    async def main() -> None:
        scheduler, pool = await _scheduler_and_pool(lab, tmp_path)
        try:
            nanny = RemoteNanny(scheduler.address, "k1", host="h1", pool=pool, options={"nthreads": 1})
            await nanny
            assert nanny.status == Status.running
            pid = nanny.pids["k1"]
            assert pid in lab.hosts[0].pids()
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(nanny.finished(), 60)
            assert nanny.status == Status.failed
            await nanny.close()
        finally:
            await pool.close()
            await scheduler.close()

    asyncio.run(main())


HEAD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from speccluster_ssh.cluster import SSHSpecCluster
    cluster = SSHSpecCluster.from_inventory(sys.argv[1], known_hosts=sys.argv[2], silence=float(sys.argv[3]))
    print("READY", cluster.scheduler_address, flush=True)
    time.sleep(600)
    """
)


def _start_head(inventory: Path, known_hosts: str, silence: float = 15) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HEAD_SCRIPT, str(inventory), known_hosts, str(silence)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return proc


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 90) -> str:
    if proc.stdout is None:
        raise RuntimeError("no stdout")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return line.split()[1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the head process did not come up")


def test_head_sigkill_leaves_nothing_with_remote_scheduler(lab: Any, tmp_path: Path) -> None:
    path = lab.write_inventory(
        tmp_path / "inv.yml",
        groups={"scheduler": ["h1"], "workers": ["h2", "h3"]},
        host_vars={"h2": {"speccluster_nworkers": 2}},
    )
    head = _start_head(path, lab.known_hosts)
    try:
        address = _wait_ready(head)
        assert lab.hosts[0].ip in address
        running = processes_besides_sshd(lab)
        assert {"h1", "h2", "h3"} <= set(running), running
    finally:
        head.kill()
        head.wait()
    # How soon: bench's headcrash-4x2.
    gone = wait_for(lambda: not processes_besides_sshd(lab), 60)
    assert gone, f"left behind: {processes_besides_sshd(lab)}"


def test_cut_link_kills_host_processes_and_no_duplicates_after_heal(lab: Any, tmp_path: Path) -> None:
    path = lab.write_inventory(tmp_path / "inv.yml")
    inv = load_inventory(path)
    host = lab.hosts[1]
    with SSHSpecCluster(inventory=inv, known_hosts=lab.known_hosts, n_workers=2, silence=3) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            on_host = [k for k, s in cluster.worker_spec.items() if s["options"]["host"] == host.name]
            assert on_host
            host.cut()
            try:
                # The agent there kills its processes once the head is silent.
                assert wait_for(lambda: not [p for p, a in host.processes() if a and "sshd" not in a[0]], 20)
                # The head marks the host down and re-places its entry.
                assert wait_for(lambda: cluster.pool.states[host.name].state == "down", 20)
                assert wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 60)
            finally:
                host.heal()
            # Once healed, the host comes back and nothing appears twice.
            assert wait_for(lambda: cluster.pool.states[host.name].state == "up", 60)
            names = [w["name"] for w in client.scheduler_info()["workers"].values()]
            assert len(names) == len(set(names)) == 2


def test_chatty_worker_never_blocks(lab: Any, tmp_path: Path) -> None:
    path = lab.write_inventory(tmp_path / "inv.yml")
    with SSHSpecCluster.from_inventory(path, known_hosts=lab.known_hosts, n_workers=1) as cluster:
        with Client(cluster) as client:
            def shout() -> int:
                chunk = "x" * 1023 + "\n"
                for _ in range(50 * 1024):
                    sys.stderr.write(chunk)
                sys.stderr.flush()
                return 50 * 1024 * 1024

            (address,) = client.scheduler_info()["workers"]
            assert client.run(shout, workers=[address], wait=True)[address] == 50 * 1024 * 1024
            assert client.submit(lambda: 42).result(timeout=30) == 42
            agent = cluster.pool.agents["h1"]
            log = Path(agent.facts["dir"]) / "logs" / "0.log"
            assert log.stat().st_size >= 50 * 1024 * 1024
            tail = asyncio.run_coroutine_threadsafe(cluster.workers["0"].tail(2048), cluster.loop.asyncio_loop).result(30)
            assert "xxxx" in tail["0"]


NASTY = "a'b\"c d;e$(touch {canary})`touch {canary}`&&f\nnew line $HOME \\ %s"


def test_option_values_arrive_literally(lab: Any, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    nasty = NASTY.format(canary=canary)
    odd_dir = tmp_path / "dir with 'quotes' and $(x) ;"
    path = lab.write_inventory(
        tmp_path / "inv.yml",
        host_vars={"h1": {"speccluster_env": {"NASTY": nasty}, "speccluster_local_directory": str(odd_dir), "speccluster_resources": {nasty: 1}}},
    )
    with SSHSpecCluster.from_inventory(path, known_hosts=lab.known_hosts, n_workers=1) as cluster:
        with Client(cluster) as client:
            seen = client.run(lambda: os.environ.get("NASTY"))
            assert list(seen.values()) == [nasty]
            info = list(client.scheduler_info()["workers"].values())[0]
            assert info["resources"] == {nasty: 1}
            assert odd_dir.is_dir()
    assert not canary.exists()


def test_start_failures_are_explained_and_clean(lab: Any, tmp_path: Path) -> None:
    # A missing python, on the only host: no host answers, and the fix is named.
    path = lab.write_inventory(
        tmp_path / "a.yml", groups={"workers": ["h1"]}, host_vars={"h1": {"speccluster_python": "/nonexistent/python3"}}
    )
    with pytest.raises(StartError) as info:
        SSHSpecCluster.from_inventory(path, known_hosts=lab.known_hosts, n_workers=1)
    assert list(info.value.hosts) == ["h1"]
    assert "/nonexistent/python3" in info.value.hosts["h1"]
    # A worker that exits at start, when the start needs it: the error names the host and the cause.
    path = lab.write_inventory(tmp_path / "b.yml", host_vars={"h2": {"speccluster_worker_options": {"memory_limit": "lots of it"}}})
    inv = load_inventory(path)
    with pytest.raises(StartError) as info:
        SSHSpecCluster(inventory=inv, known_hosts=lab.known_hosts, hosts=None, n_workers=2, heal=False,
                       min_workers=2, start_timeout=20)
    assert list(info.value.hosts) == ["h2"]
    assert "lots" in info.value.hosts["h2"]
    assert wait_for(lambda: not processes_besides_sshd(lab), 15), processes_besides_sshd(lab)
    # A host that does not answer.
    lab.hosts[2].cut()
    try:
        path = lab.write_inventory(tmp_path / "c.yml", groups={"workers": ["h3"]})
        with pytest.raises(StartError) as info:
            SSHSpecCluster.from_inventory(path, known_hosts=lab.known_hosts, connect_timeout=2, n_workers=1)
        assert list(info.value.hosts) == ["h3"]
        assert "did not answer" in info.value.hosts["h3"]
    finally:
        lab.hosts[2].heal()
    assert wait_for(lambda: not processes_besides_sshd(lab), 15), processes_besides_sshd(lab)
