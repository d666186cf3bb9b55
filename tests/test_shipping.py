"""The head's driver of shipped environments (shipping.py), through a local connection under a bare python.

Fake wheelhouses of tiny wheels stand in for the head's, except in the last
test, where a whole local cluster runs on the head's real environment.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from distributed import Client
from envfakes import FakeWheel, bare_python, fake_wheelhouse, make_wheel

from speccluster_ssh.cluster import SSHSpecCluster
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.environments import EnvRequest, EnvTarget
from speccluster_ssh.errors import HostError
from speccluster_ssh.cli import main
from speccluster_ssh.inventory import Inventory, load_inventory
from speccluster_ssh.preflight import check_hosts
from speccluster_ssh.shipping import Wheelhouses, _usable_target, ensure_environment, env_lock_of


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> str:
    return bare_python(tmp_path_factory.mktemp("bare") / "venv")


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("wheels")
    return fake_wheelhouse([make_wheel(d, "distributed", "0.0.1")], ("distributed==0.0.1",))


def local_host(python: str, env_dir: Path, **variables: Any) -> Any:
    spec = {"name": "here", "ansible_connection": "local", "speccluster_python": python,
            "speccluster_environment": "head", "speccluster_env_dir": str(env_dir), **variables}
    return Inventory.from_hosts([spec]).hosts["here"]


def fixed(house: Any) -> Wheelhouses:
    return Wheelhouses(builder=lambda request, target, cache: house, fingerprint_of=lambda r, t: house.fingerprint)


async def ensure(host: Any, wheelhouses: Wheelhouses, labels: list[str] | None = None) -> str:
    connection = HostConnection(host, ConnectSettings())
    try:
        return await ensure_environment(connection, host, wheelhouses,
                                        progress=(lambda h, label: labels.append(label)) if labels is not None else None)
    finally:
        await connection.close()


def test_ships_and_builds_once_then_finds_it_ready(python: str, house: Any, tmp_path: Path) -> None:
    host = local_host(python, tmp_path / "envs")
    wheelhouses = fixed(house)
    labels: list[str] = []
    env_python = asyncio.run(ensure(host, wheelhouses, labels))
    assert env_python == str(tmp_path / "envs" / house.fingerprint / "bin" / "python")
    assert env_lock_of(env_python) == str(tmp_path / "envs" / house.fingerprint) + ".lock"
    assert wheelhouses.stats.shipped == {"here": house.size} and wheelhouses.stats.built == {"here": 1}
    assert labels[0] == "checking environment" and labels[-1] == "environment ready"
    assert any(label.startswith("shipping") for label in labels) and "building (pip install)" in labels
    again = Wheelhouses(builder=lambda *a: house, fingerprint_of=lambda r, t: house.fingerprint)
    assert asyncio.run(ensure(host, again)) == env_python
    assert again.stats.bytes_shipped == 0 and again.stats.builds == 0


def test_a_broken_wheel_fails_with_the_fix_and_leaves_nothing(python: str, house: Any, tmp_path: Path) -> None:
    wheel = house.wheels[0]
    copy = tmp_path / wheel.filename
    data = bytearray(wheel.path.read_bytes())
    data[-10] ^= 0xFF  # damaged after its hash was taken
    copy.write_bytes(bytes(data))
    broken = type(house)(house.fingerprint, house.target, house.pins, (FakeWheel(wheel.filename, wheel.sha256, wheel.size, copy),))
    env_dir = tmp_path / "envs"
    with pytest.raises(HostError) as info:
        asyncio.run(ensure(local_host(python, env_dir), fixed(broken)))
    assert "broken wheel" in info.value.reason and str(copy) in info.value.fix
    assert sorted(p.name for p in env_dir.iterdir()) == [f"{house.fingerprint}.lock", "wheels"]
    assert not list((env_dir / "wheels").iterdir())


def test_a_failed_build_fails_with_pips_tail(python: str, tmp_path: Path) -> None:
    import hashlib

    bogus = tmp_path / "distributed-0.0.3-py3-none-any.whl"
    bogus.write_bytes(b"not a zip")
    house = fake_wheelhouse([FakeWheel(bogus.name, hashlib.sha256(b"not a zip").hexdigest(), 9, bogus)],
                            ("distributed==0.0.3",))
    env_dir = tmp_path / "envs"
    with pytest.raises(HostError) as info:
        asyncio.run(ensure(local_host(python, env_dir), fixed(house)))
    assert "building the environment" in info.value.reason and info.value.tail.strip() and info.value.fix
    assert not (env_dir / house.fingerprint).exists()
    assert not [p for p in env_dir.iterdir() if p.name.startswith(".tmp-")]


def test_an_env_dir_that_cannot_be_written_fails_with_the_fix(python: str, house: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    with pytest.raises(HostError) as info:
        asyncio.run(ensure(local_host(python, blocker / "envs"), fixed(house)))
    assert "cannot write" in info.value.reason and "speccluster_env_dir" in info.value.fix


def test_a_python_without_venv_or_too_old_is_refused_with_the_fix(tmp_path: Path) -> None:
    host = local_host("/usr/bin/python3", tmp_path)
    facts = {"python": "3.11", "machine": "x86_64", "libc": "glibc 2.36", "venv": True, "ensurepip": True}
    assert _usable_target(host, facts) == EnvTarget("3.11", "x86_64", "glibc 2.36")
    with pytest.raises(HostError) as old:
        _usable_target(host, {**facts, "python": "3.8", "version": "3.8.10"})
    assert "3.10 or newer" in old.value.reason and "speccluster_python" in old.value.fix
    with pytest.raises(HostError) as novenv:
        _usable_target(host, {**facts, "ensurepip": False})
    assert "python3-venv" in novenv.value.fix
    with pytest.raises(HostError) as missing:
        asyncio.run(ensure(local_host(str(tmp_path / "no-such-python"), tmp_path), Wheelhouses()))
    assert "install python3" in missing.value.fix


def test_the_script_runs_under_python_38_which_is_refused_with_the_fix(tmp_path: Path) -> None:
    """The host script keeps to Python 3.8 (a host's old python must get the fix, not a SyntaxError)."""
    import shutil
    import subprocess

    found = [shutil.which("python3.8"), *map(str, Path.home().glob(".pyenv/versions/3.8*/bin/python3.8"))]
    works = [p for p in found if p and subprocess.run([p, "-c", "pass"], capture_output=True).returncode == 0]
    if not works:
        pytest.skip("no python3.8 on this machine")
    old = works[0]
    with pytest.raises(HostError) as info:
        asyncio.run(ensure(local_host(old, tmp_path), Wheelhouses()))
    assert "environments need 3.10 or newer" in info.value.reason and "python 3.8" in info.value.reason
    assert "speccluster_python" in info.value.fix


def test_wheelhouses_gather_once_per_fingerprint_and_resolve_again_each_time(house: Any) -> None:
    """Concurrent hosts share one gathering; a later start with other pins (a restart after an upgrade) gets a new one."""
    built: list[str] = []
    gate = threading.Event()
    current = {"fp": "aaaa0000"}

    def builder(request: Any, target: Any, cache: Any) -> Any:
        gate.wait(10)
        built.append(current["fp"])
        return type(house)(current["fp"], target, house.pins, house.wheels)

    wheelhouses = Wheelhouses(builder=builder, fingerprint_of=lambda r, t: current["fp"])
    target = EnvTarget("3.11", "x86_64")

    async def main() -> None:
        starts = [asyncio.ensure_future(wheelhouses.get(EnvRequest(), target)) for _ in range(4)]
        await asyncio.sleep(0)
        gate.set()
        assert {h.fingerprint for h in await asyncio.gather(*starts)} == {"aaaa0000"}
        assert (await wheelhouses.get(EnvRequest(), target)).fingerprint == "aaaa0000"
        current["fp"] = "bbbb1111"  # the head's packages changed
        assert (await wheelhouses.get(EnvRequest(), target)).fingerprint == "bbbb1111"
        await wheelhouses.close()

    asyncio.run(main())
    assert built == ["aaaa0000", "bbbb1111"]


def test_a_local_cluster_runs_on_the_heads_environment(python: str, tmp_path: Path) -> None:
    import distributed

    inventory = tmp_path / "inv.yml"
    inventory.write_text(
        "all:\n  hosts:\n    here:\n      ansible_connection: local\n      speccluster_environment: head\n"
        f"      speccluster_python: {python}\n      speccluster_env_dir: {tmp_path / 'envs'}\n"
        "      speccluster_nthreads: 1\n"
    )
    # check and plan only look: missing, and what it takes.
    [row] = check_hosts(load_inventory(inventory), None, 30)
    assert row["result"] == "warn" and row["environment"]["state"] == "missing", row
    assert "it will be built" in row["environment"]["detail"] and "python" not in row
    with SSHSpecCluster.from_inventory(inventory) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        versions = client.run(lambda: (distributed.__version__, sys.executable))
        [(version, executable)] = versions.values()
        assert version == distributed.__version__
        assert executable.startswith(str(tmp_path / "envs"))
        assert cluster.pool.wheelhouses.stats.builds == 1
        # The agent holds its environment's lock shared: the host script's collection cannot take it.
        fd = os.open(env_lock_of(executable), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    [row] = check_hosts(load_inventory(inventory), None, 30)
    assert row["environment"]["state"] == "ready" and row["distributed"] == distributed.__version__, row
    assert row["python"].startswith(str(tmp_path / "envs"))
    out = CliRunner().invoke(main, ["plan", str(inventory)], catch_exceptions=False).output
    assert "the head's environment there now: " + row["environment"]["fingerprint"][:12] + ": ready" in out, out


def test_a_renewed_agent_moves_to_the_new_environment(python: str, tmp_path: Path) -> None:
    """What a rolling restart does per host (pool.renew): the new agent resolves again and runs on the new environment."""
    from speccluster_ssh.environments import build_wheelhouse
    from speccluster_ssh.pool import AgentPool

    extra = make_wheel(tmp_path, "tinyextra", "1.0")
    version = {"n": 0}

    def builder(request: Any, target: Any, cache: Any) -> Any:
        real = build_wheelhouse(request, target, None)
        if not version["n"]:
            return real
        # The head's packages changed: one more package, another fingerprint.
        return type(real)("f" * 16, target, (*real.pins, "tinyextra==1.0"),
                          (*real.wheels, type(real.wheels[0])(extra.filename, extra.sha256, extra.size, extra.path)))

    host = local_host(python, tmp_path / "envs")

    async def main() -> None:
        pool = AgentPool("envrenew", {"here": host}, ConnectSettings())
        pool.wheelhouses = Wheelhouses(builder=builder, fingerprint_of=lambda r, t: "f" * 16 if version["n"] else "e" * 16)
        try:
            first = await pool.agent("here")
            version["n"] = 1
            old, _ = await pool.renew("here", new_connection=False)
            assert old is first
            if old is not None:
                await old.close()
            new = pool.agents["here"]
            assert first.facts["python"] != new.facts["python"]
            assert new.facts["python"].startswith(str(tmp_path / "envs" / ("f" * 16)))
        finally:
            await pool.close()

    asyncio.run(main())
