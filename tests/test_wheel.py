"""The installed package carries everything it needs at run time.

Run in every stage, and in .ci/run's wheel stage from a venv holding only the
built wheel: an editable install would hide package data that a wheel lost
(the dask config defaults, the agent source shipped to hosts, the local
inventory and the playbooks).  With
``SPECCLUSTER_SSH_EXPECT_INSTALLED=1`` the package must also come from the
interpreter's site-packages, not from a source tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from importlib import resources
from pathlib import Path

import pytest
import yaml

import speccluster_ssh
from speccluster_ssh.agent import agent_sources

REPO = Path(__file__).resolve().parent.parent


def test_package_data_is_installed() -> None:
    package = resources.files("speccluster_ssh")
    defaults = yaml.safe_load(package.joinpath("speccluster-ssh.yaml").read_text())
    assert "speccluster-ssh" in defaults
    assert package.joinpath("py.typed").is_file()
    # The Quick start's inventory and the provisioning playbooks (issue 21: a wheel had neither).
    from speccluster_ssh.resources import local_inventory, playbooks_dir

    assert "ansible_connection: local" in local_inventory().read_text()
    for name in ("provision.yml", "check.yml", "teardown.yml", "README.md"):
        assert (playbooks_dir() / name).is_file(), name
    assert yaml.safe_load((playbooks_dir() / "provision.yml").read_text())
    # The agent is sent to hosts as sources: they must be there and compile.
    sources = agent_sources()
    for name, source in sources:
        compile(source, f"speccluster_agent/{name}", "exec")
    assert b"def main(" in sources[-1][1]
    # So is the environment script (speccluster_environment: head), run before the agent.
    from speccluster_ssh.peerwheels import PEER_SOURCE
    from speccluster_ssh.shipping import env_sources

    for name, source in env_sources((PEER_SOURCE,)):  # with the fan-out's wheel server
        compile(source, f"speccluster_agent/{name}", "exec")


def test_installed_from_site_packages_when_asked() -> None:
    if os.environ.get("SPECCLUSTER_SSH_EXPECT_INSTALLED") != "1":
        # An editable install (the main suite) points at src/ on purpose.
        pytest.skip("only in .ci/run's wheel stage (SPECCLUSTER_SSH_EXPECT_INSTALLED=1), where the wheel is installed")
    origin = Path(speccluster_ssh.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert origin.is_relative_to(site), f"speccluster_ssh imported from {origin}, not from {site}"
    assert not origin.is_relative_to(REPO / "src"), origin


def test_local_cluster_computes_and_tears_down() -> None:
    """The README's first example through the Python API: the packaged local inventory, no sshd."""
    from distributed import Client

    from speccluster_ssh import SSHSpecCluster
    from speccluster_ssh.resources import local_inventory

    inventory = local_inventory()
    if os.environ.get("SPECCLUSTER_SSH_EXPECT_INSTALLED") == "1":
        # From the wheel: the packaged copy is a plain file inside site-packages.
        site = Path(sysconfig.get_paths()["purelib"]).resolve()
        assert inventory.is_relative_to(site) and not inventory.is_symlink(), inventory
    with SSHSpecCluster.from_inventory(inventory, n_workers=2) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)  # two of the four one-worker slots
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
            pids = set(client.run(os.getpid).values())
    for pid in pids:
        _wait_gone(pid)


def test_up_without_inventory_outside_the_tree(tmp_path: Path) -> None:
    """The Quick start from an install: ``up --detach`` with no inventory, run outside
    the source tree, starts the packaged local inventory's four workers; a Client
    computes on it; ``down`` ends it. In .ci/run's wheel stage this is the wheel's
    own console script."""
    script = Path(sys.executable).parent / "speccluster-ssh"
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "speccluster_ssh.cli"]
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("PYTHONPATH", None)
    name = "qsw"

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    up = run("up", "--detach", "--name", name)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        listed = json.loads(run("list", "--json").stdout)
        (entry,) = [c for c in listed if c["name"] == name]
        from speccluster_ssh.resources import local_inventory

        assert Path(entry["inventory"]) == local_inventory(), entry
        client_config = tmp_path / "state" / "speccluster-ssh" / name / "client.yaml"
        computed = subprocess.run(
            [sys.executable, "-c",
             "from distributed import Client\n"
             "with Client(timeout=30) as c:\n"
             "    c.wait_for_workers(4, timeout=120)\n"
             "    print(c.submit(sum, [1, 2, 3]).result(timeout=60), len(c.scheduler_info()['workers']))"],
            cwd=tmp_path, env=dict(env, DASK_CONFIG=str(client_config)), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert computed.returncode == 0 and computed.stdout.split() == ["6", "4"], computed.stdout + computed.stderr
    finally:
        down = run("down", "--name", name)
    assert down.returncode == 0, down.stdout + down.stderr


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"worker process {pid} still alive {timeout} s after close")
