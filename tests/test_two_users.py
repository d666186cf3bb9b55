"""Two users of one lab (issue 23): each has its own state, caches and scratch, and neither can touch the other's cluster.

Root drives the command line as the other lab tests do (``test_cli_lab.Cli``,
a private ``XDG_STATE_HOME``); the ordinary user drives it on the head as
itself (``tests/labusers.py``: ``runuser``, its own ``HOME``, its own SSH key,
logging in to the lab hosts as itself). What runs on the hosts is found by
the cluster marker in each process's environment, as in ``test_cli_lab.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labusers import LabUser
from sshlab import Lab
from test_cli_lab import Cli, all_pids, cli, poll, settle, status_counts, write_inventory  # noqa: F401  (cli: a fixture)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _user_up(user: LabUser, inventory: Path, name: str, *extra: str) -> dict[str, Any]:
    """``up --detach`` as the user; the state of its running cluster."""
    _ok(user.cli("up", str(inventory), "--detach", "--name", name, "--timeout", "60", *extra, timeout=150))
    state = json.loads((user.state_root / name / "state.json").read_text())
    assert state["phase"] == "running", state
    return dict(state)


def _user_settle(user: LabUser, name: str, total: int) -> dict[str, Any]:
    """Wait until the user's ``status`` shows ``total`` running workers."""
    def running() -> dict[str, Any] | None:
        report = json.loads(_ok(user.cli("status", "--name", name, "--json")).stdout)
        return report if sum(status_counts(report).values()) == total else None

    return poll(running, 45, f"{total} running workers of {user.name}'s {name}")


def _owned(path: Path, uid: int, mode: int | None = 0o700) -> bool:
    info = path.lstat()
    return stat.S_ISDIR(info.st_mode) and info.st_uid == uid and (mode is None or info.st_mode & 0o777 == mode)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A scratch directory for everyone, as an admin would make it (root's, mode 1777, like /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="sclab-shared-scratch-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_state_caches_and_scratch_are_each_users_own(
    lab: Lab, cli: Cli, lab_user: LabUser, tmp_path: Path, shared_dir: Path,
) -> None:
    """Root and a user start clusters of the same name on one host with one speccluster_local_directory.

    Each head keeps its state under its own home, each agent its logs under
    its user's home on the host, and each cluster's scratch is
    ``<dir>/<user>/<cluster>/<host>``: nothing collides, nothing is refused,
    and each cluster's scratch goes when it ends.
    """
    common = {"speccluster_slots": 2, "speccluster_local_directory": str(shared_dir)}
    theirs = write_inventory(lab, tmp_path / "root.yml", ["h1"], **common)
    mine = lab_user.write_inventory("same", ["h1"], **common)
    root_state = cli.up_detached(theirs, "same", "--workers", "1", "--no-tls")
    user_state = _user_up(lab_user, mine, "same", "--workers", "1")
    settle(cli, lab, "same", root_state["cluster_id"], 1)
    _user_settle(lab_user, "same", 1)
    root_id, user_id = root_state["cluster_id"], user_state["cluster_id"]
    assert root_id != user_id

    # The head's state: under each user's own home (root's test points XDG_STATE_HOME elsewhere).
    assert _owned(lab_user.state_root / "same", lab_user.uid)
    assert (lab_user.state_root / "same" / "client.yaml").is_file()  # TLS on: the user's client files
    assert (cli.state_root / "same" / "state.json").is_file()
    # The hosts' caches (the agents' logs): under each user's home on the host.
    assert _owned(lab_user.cache_root / user_id / "h1", lab_user.uid)
    assert (Path.home() / ".cache" / "speccluster-ssh" / root_id / "h1").is_dir()
    assert not (Path.home() / ".cache" / "speccluster-ssh" / user_id).exists()
    # Scratch and spill: one shared directory, a part for each user and cluster.
    user_scratch = shared_dir / lab_user.name / user_id / "h1"
    root_scratch = shared_dir / "root" / root_id / "h1"
    poll(lambda: (user_scratch / "dask-scratch-space").is_dir() and (root_scratch / "dask-scratch-space").is_dir(),
         20, "both workers' scratch directories", lambda: sorted(str(p) for p in shared_dir.rglob("*"))[:20])
    assert _owned(shared_dir / lab_user.name, lab_user.uid) and _owned(user_scratch, lab_user.uid)
    assert _owned(shared_dir / "root", 0) and _owned(root_scratch, 0)

    _ok(lab_user.cli("down", "--name", "same", timeout=90))
    poll(lambda: not (shared_dir / lab_user.name / user_id).exists(), 20, "the user's scratch to go",
         lambda: sorted(str(p) for p in (shared_dir / lab_user.name).rglob("*"))[:20])
    assert (root_scratch / "dask-scratch-space").is_dir()  # root's cluster runs on
    cli.ok("down", "--name", "same")
    poll(lambda: not (shared_dir / "root" / root_id).exists(), 20, "root's scratch to go")
    assert shared_dir.is_dir()


# Every command that acts on or reads a cluster by its name.
_BY_NAME = [
    ("down",), ("status",), ("logs",), ("logs", "h1"), ("scale", "0"), ("adapt", "--off"), ("restart",),
    ("drain", "h1"), ("undrain", "h1"), ("reload",), ("dashboard",), ("client-config",),
]


def _refused(result: subprocess.CompletedProcess[str], name: str) -> None:
    assert result.returncode == 2, (result.args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and name in result.stderr, (result.args, result.stderr)


def test_a_user_cannot_stop_signal_or_read_another_users_cluster(
    lab: Lab, cli: Cli, lab_user: LabUser, tmp_path: Path,
) -> None:
    """Root's detached cluster: every command of the user that names it is refused (exit 2); it runs on untouched.

    Also when the user points its state directory at root's, and, the other
    way round, root's commands do not reach the user's cluster either.
    """
    inventory = write_inventory(lab, tmp_path / "root.yml", ["h1", "h2"], speccluster_slots=1)
    state = cli.up_detached(inventory, "shared", "--workers", "2", "--no-tls")
    settle(cli, lab, "shared", state["cluster_id"], 2)
    pids = all_pids(lab, state["cluster_id"])
    logs_before = {p: p.stat().st_mtime_ns for p in (Path.home() / ".cache" / "speccluster-ssh" / state["cluster_id"]).rglob("*.log")}
    assert pids and logs_before

    for command in _BY_NAME:
        _refused(lab_user.cli(*command, "--name", "shared", timeout=60), "shared")
    # Pointing the tool at root's state directory gets the user nowhere either.
    into_root = {"DASK_SPECCLUSTER_SSH__STATE_DIR": str(cli.state_root)}
    for command in (("down",), ("status",), ("logs",), ("scale", "0")):
        result = lab_user.cli(*command, "--name", "shared", timeout=60, env=into_root)
        _refused(result, "not yours")
        assert not result.stdout, result.stdout  # nothing of root's cluster is shown

    # Root's cluster is as it was: the same processes, its workers running, its logs untouched by anyone else.
    assert all_pids(lab, state["cluster_id"]) == pids
    assert status_counts(cli.json("status", "--name", "shared")) == {"h1": 1, "h2": 1}
    for path in logs_before:
        assert path.stat().st_uid == 0

    # The other way round: root's commands by the name of the user's cluster find nothing of it.
    mine = lab_user.write_inventory("mine", ["h3"], speccluster_slots=1)
    user_state = _user_up(lab_user, mine, "mine", "--workers", "1", "--no-tls")
    _user_settle(lab_user, "mine", 1)
    user_pids = all_pids(lab, user_state["cluster_id"])
    for command in (("down",), ("status",), ("scale", "0")):
        _refused(cli.run(*command, "--name", "mine", timeout=60), "mine")
    assert all_pids(lab, user_state["cluster_id"]) == user_pids
    assert all(os.stat(f"/proc/{pid}").st_uid == lab_user.uid for pid in user_pids)

    _ok(lab_user.cli("down", "--name", "mine", timeout=90))
    cli.ok("down", "--name", "shared")


def test_the_python_api_runs_as_the_user_with_its_own_key_and_scratch(lab: Lab, lab_user: LabUser) -> None:
    """The user's script starts a cluster on its own: processes of the user, scratch in /tmp/speccluster-ssh-<user>.

    The user's key logs in as the user only: not as root.
    """
    import asyncio

    import asyncssh

    async def login(username: str) -> str:
        async with asyncssh.connect(lab.hosts[0].ip, username=username, client_keys=[str(lab_user.key)],
                                    known_hosts=str(lab.known_hosts)) as conn:
            return str((await conn.run("id -un", check=True)).stdout).strip()

    assert asyncio.run(login(lab_user.name)) == lab_user.name
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(login("root"))

    inventory = lab_user.write_inventory("api", ["h4"], speccluster_slots=1)
    result = lab_user.python_script(f"""
import json, os
from distributed import Client
from speccluster_ssh.cluster import SSHSpecCluster
with SSHSpecCluster(inventory={str(inventory)!r}, n_workers=1) as cluster, Client(cluster) as client:
    seen = client.run(lambda dask_worker: (os.getuid(), dask_worker.local_directory))
    print(json.dumps(list(seen.values())))
""", timeout=120)
    _ok(result)
    [[uid, local_directory]] = json.loads(result.stdout.strip().splitlines()[-1])
    assert uid == lab_user.uid
    scratch = Path(tempfile.gettempdir()) / f"speccluster-ssh-{lab_user.name}"
    assert Path(local_directory).is_relative_to(scratch), local_directory
    cluster_dirs = list(scratch.iterdir())
    assert not cluster_dirs, cluster_dirs  # gone with the cluster
