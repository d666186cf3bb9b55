"""``speccluster_environment: head`` on the lab: hosts with only a bare python get the head's environment.

Every lab host's interpreter is one bare venv (no pip, no packages, no
system site packages), made once for the module; each host keeps its
environments in a directory of its own (the lab hosts share one
filesystem). The first test builds pandas + pyarrow environments on every
host; the second start reuses them. The other cases use fresh environment
directories and the small default environment, to stay cheap.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from envfakes import bare_python

from sshlab import Lab, processes_besides_sshd
from speccluster_ssh.cluster import SSHSpecCluster
from speccluster_ssh.connection import ConnectSettings
from speccluster_ssh.errors import HostError
from speccluster_ssh.inventory import load_inventory
from speccluster_ssh.pool import AgentPool
from speccluster_ssh.shipping import Wheelhouses
from test_jump import _bastion_topology, _need, _private_inventory, _watch_bastion
from test_peer import SMALL, run, until

pytestmark = pytest.mark.lab

PACKAGES = ["pandas", "pyarrow"]


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> str:
    return bare_python(tmp_path_factory.mktemp("bare") / "venv")


@pytest.fixture(scope="module")
def warm_envs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Environment directories (one per host) that the first test fills and the second reuses."""
    return tmp_path_factory.mktemp("envs")


def write_inventory(lab: Lab, path: Path, bare: str, envs: Path, hosts: list[str] | None = None,
                    **extra: Any) -> Path:
    names = hosts or [h.name for h in lab.hosts]
    host_vars = {n: {**SMALL, "speccluster_env_dir": str(envs / n), **extra} for n in names}
    return Path(lab.write_inventory(path, groups={"workers": names}, host_vars=host_vars, python=bare,
                                    group_vars={"all": {"speccluster_environment": "head"}}))


def no_leftovers(envs: Path) -> list[str]:
    """Half-built environments or wheels: temp names anywhere under ``envs``."""
    return [str(p) for p in envs.rglob(".tmp-*")]


async def start(lab: Lab, path: Path, n: int, **options: Any) -> Any:
    cluster = SSHSpecCluster(inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, security=False,
                             n_workers=n, **options)
    await cluster
    return cluster


def test_up_ships_builds_then_reuses_and_a_p2p_shuffle_runs(lab: Lab, tmp_path: Path, bare: str,
                                                             warm_envs: Path) -> None:
    """Cold: every host gets the head's distributed (+ pandas, pyarrow) and a P2P shuffle runs; warm: nothing moves."""
    import distributed

    # The bare python really has nothing.
    assert subprocess.run([bare, "-c", "import distributed"], capture_output=True).returncode != 0
    path = write_inventory(lab, tmp_path / "inv.yml", bare, warm_envs, speccluster_packages=PACKAGES)
    n = len(lab.hosts)

    async def cold() -> None:
        cluster = await start(lab, path, n)
        async with cluster, Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(n, timeout=120)
            versions = await client.run(lambda: (distributed.__version__, sys.executable))
            assert {v for v, _ in versions.values()} == {distributed.__version__}
            assert all(exe.startswith(str(warm_envs)) for _, exe in versions.values()), versions
            stats = cluster.pool.wheelhouses.stats
            # Every host got the wheels, from the head or (the fan-out) from another host.
            fanned = set(stats.shipped) | set(cluster.pool.fanout.peer_bytes)
            assert stats.builds == n and fanned == {h.name for h in lab.hosts}, (stats, cluster.pool.fanout.peer_bytes)
            await shuffle(client)
        await until(lambda: not processes_besides_sshd(lab), 20, "every process on the lab hosts to end")

    async def warm() -> None:
        cluster = await start(lab, path, n)
        async with cluster, Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(n, timeout=60)
            stats = cluster.pool.wheelhouses.stats
            assert stats.bytes_shipped == 0 and stats.builds == 0, stats
            assert len(stats.ready) == n

    run(cold(), timeout=600)
    run(warm())
    assert not no_leftovers(warm_envs)


async def shuffle(client: Client) -> None:
    import dask
    import dask.dataframe as dd
    import pandas as pd

    frame = pd.DataFrame({"key": [i % 13 for i in range(2000)], "value": range(2000)})
    ddf = dd.from_pandas(frame, npartitions=8)
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        shuffled = ddf.shuffle(on="key")
        result = await client.compute(shuffled)
    assert sorted(result["value"]) == list(range(2000))
    # Every key ended in one partition.
    parts = await client.gather(client.compute(shuffled.map_partitions(lambda p: sorted(set(p["key"]))).to_delayed()))
    keys = [k for part in parts for k in part]
    assert sorted(keys) == list(range(13))


def test_two_clusters_starting_together_build_once(lab: Lab, tmp_path: Path, bare: str) -> None:
    envs = tmp_path / "envs"
    names = [h.name for h in lab.hosts[:2]]
    path = write_inventory(lab, tmp_path / "inv.yml", bare, envs, hosts=names)

    async def main() -> None:
        clusters = await asyncio.gather(start(lab, path, 0), start(lab, path, 0))
        try:
            # Each cluster starts an agent on both hosts only when it places there; ask for both.
            await asyncio.gather(*(c.pool.agent(n) for c in clusters for n in names))
            stats = [c.pool.wheelhouses.stats for c in clusters]
            assert sum(s.builds for s in stats) == len(names), stats
            for name in names:
                assert sum(s.built.get(name, 0) for s in stats) == 1
        finally:
            for cluster in clusters:
                await cluster.close()

    run(main())
    assert not no_leftovers(envs)


def test_a_broken_wheelhouse_fails_cleanly_with_the_fix(lab: Lab, tmp_path: Path, bare: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wheel that does not install: the host is down with the fix, and no half-built environment is left."""
    from speccluster_ssh.environments import EnvRequest, build_wheelhouse

    envs = tmp_path / "envs"
    name = lab.hosts[0].name
    inv = load_inventory(write_inventory(lab, tmp_path / "inv.yml", bare, envs, hosts=[name]))

    def broken(request: EnvRequest, target: Any, cache: Any) -> Any:
        good = build_wheelhouse(request, target, None)
        wheel = good.wheels[-1]
        bad = tmp_path / wheel.filename
        bad.write_bytes(b"not a zip, with the right hash")
        import hashlib

        data = bad.read_bytes()
        wheels = (*good.wheels[:-1], type(wheel)(wheel.filename, hashlib.sha256(data).hexdigest(), len(data), bad))
        return type(good)(good.fingerprint, target, good.pins, wheels)

    async def main() -> None:
        pool = AgentPool("envbroken", {name: inv.hosts[name]}, ConnectSettings(known_hosts=str(lab.known_hosts)))
        pool.wheelhouses = Wheelhouses(builder=broken)
        try:
            with pytest.raises(HostError) as info:
                await pool.agent(name)
        finally:
            await pool.close()
        assert "building the environment" in info.value.reason and info.value.tail.strip()
        state = pool.states[name]
        assert state.state == "down" and state.fix

    run(main())
    assert not no_leftovers(envs)
    assert sorted(p.name for p in (envs / name).iterdir() if not p.name.endswith(".lock")) == ["wheels"]


def test_through_a_bastion_the_wheels_pass_through_its_one_connection(lab: Lab, tmp_path: Path, bare: str) -> None:
    _need(lab, 3)
    bastion, private = lab.hosts[0], lab.hosts[1:3]
    envs = tmp_path / "envs"
    config = lab.write_ssh_config(tmp_path / "ssh_config", {h.name: bastion.name for h in private})
    path = _private_inventory(lab, tmp_path, private, slots=1)
    # The same private inventory, on the bare python with the head's environment.
    text = path.read_text().replace(sys.executable, bare)
    path.write_text(text)
    import yaml

    data = yaml.safe_load(text)
    data["all"]["vars"]["speccluster_environment"] = "head"
    for name, host in data["all"]["children"]["workers"]["hosts"].items():
        host["speccluster_env_dir"] = str(envs / name)
    path.write_text(yaml.safe_dump(data))

    async def main() -> None:
        with _bastion_topology(lab, [bastion], private):
            async with _watch_bastion(lab, bastion) as peak:
                cluster = await start(lab, path, len(private), ssh_config=[str(config)])
                async with cluster, Client(cluster, asynchronous=True) as client:
                    await client.wait_for_workers(len(private), timeout=120)
                    stats = cluster.pool.wheelhouses.stats
                    # From the head through the bastion, or (the fan-out) from the other private host.
                    fanned = set(stats.shipped) | set(cluster.pool.fanout.peer_bytes)
                    assert stats.shipped and fanned == {h.name for h in private} and stats.builds == len(private)
            assert peak[0] == 1, f"the head held {peak[0]} connections to the bastion"

    run(main())
    assert not no_leftovers(envs)

