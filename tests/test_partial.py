"""Labs where some machines are off (issue 16): start with the hosts that answer.

A host without sshd, or whose python lacks distributed, does not stop the
cluster: its entries wait (or move to free slots), ``status_report`` says
why, and the host's workers join when it answers. ``min_workers`` sets how
many workers a start needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import psutil
import pytest
from distributed import Client

from proctools import kill_tree
from speccluster_ssh.cluster import SSHSpecCluster
from speccluster_ssh.errors import SpecClusterError
from sshlab import processes_besides_sshd
from test_peer import DEADLINE, inventory, lab_cluster, names, run, slowinc, until

pytestmark = pytest.mark.lab


def test_start_with_a_host_switched_off(lab: Any, tmp_path: Path) -> None:
    """One of four hosts has no sshd: three start and compute; the fourth joins when it returns."""
    path = inventory(lab, tmp_path, {h.name: {} for h in lab.hosts[:4]})
    off = lab.hosts[2]
    off.kill_all()

    async def main() -> None:
        try:
            async with lab_cluster(lab, path, n_workers=4, connect_timeout=5) as (cluster, _):
                await until(lambda: len(names(cluster)) == 3, DEADLINE, "three workers")
                report = cluster.status_report()
                host = report["hosts"][off.name]
                assert host["state"] == "down", host
                assert "connect" in host["reason"], host
                assert report["summary"]["hosts_up"] == 3 and report["summary"]["hosts"] == 4, report["summary"]
                assert report["summary"]["workers_running"] == 3 and report["summary"]["workers_wanted"] == 4
                async with Client(cluster, asynchronous=True) as client:
                    assert await client.gather(client.map(slowinc, range(10), delay=0)) == list(range(1, 11))
                await asyncio.to_thread(off.restart_sshd)
                # Its worker joins without a call to scale.
                await until(lambda: len(names(cluster)) == 4, DEADLINE, f"{off.name}'s worker to join")
                assert cluster.status_report()["hosts"][off.name]["state"] == "up"
        finally:
            if not off.sshd_running:
                off.restart_sshd()

    run(main())


def test_min_workers_not_met_fails_with_one_line_and_leaves_nothing(lab: Any, tmp_path: Path) -> None:
    """``min_workers`` above what the answering hosts hold: the start fails naming the missing host."""
    path = inventory(lab, tmp_path, {h.name: {} for h in lab.hosts[:4]})
    off = lab.hosts[3]
    off.kill_all()

    async def main() -> None:
        with pytest.raises(SpecClusterError) as info:
            async with SSHSpecCluster(
                inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, n_workers=4,
                min_workers=4, start_timeout=15, connect_timeout=5, security=False,
            ):
                pass
        message = str(info.value)
        assert off.name in message and "3 of 4" in message, message
        assert "Traceback" not in message
        await until(lambda: not processes_besides_sshd(lab), 20, "every process on the lab hosts to end")

    try:
        run(main())
    finally:
        off.restart_sshd()


def test_host_without_distributed_is_shown_with_the_fix_and_retried_rarely(lab: Any, tmp_path: Path) -> None:
    """A host whose python lacks distributed: the others start; status names the fix; few retries."""
    hosts = {h.name: {} for h in lab.hosts[:3]}
    broken = lab.hosts[1].name
    hosts[broken] = {"speccluster_python": "/usr/bin/python3"}  # Debian's python, without distributed
    path = inventory(lab, tmp_path, hosts)

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=3) as (cluster, _):
            await until(lambda: len(names(cluster)) == 2, DEADLINE, "two workers")
            state = cluster.pool.states[broken]
            await until(lambda: state.state != "new", DEADLINE, f"{broken} to be tried")
            host = cluster.status_report()["hosts"][broken]
            assert host["state"] in ("down", "broken"), host
            assert "distributed" in host["reason"], host
            assert host.get("fix") and "distributed" in host["fix"], host
            assert "No module named" in host.get("tail", ""), host  # the remote log tail comes with it
            tries = len(state.failures)
            await asyncio.sleep(12)  # watching the retry rate, not waiting for a condition
            assert len(state.failures) - tries <= 1, state.as_dict()

    run(main())


def test_every_host_down_fails_within_the_connect_timeout(lab: Any, tmp_path: Path) -> None:
    """No host answers: the start fails once the connect timeout ran out, with one line per host.

    How soon it fails is the connect timeout's business: each line names it.
    """
    chosen = lab.hosts[:2]
    path = inventory(lab, tmp_path, {h.name: {} for h in chosen})
    for host in chosen:
        host.cut()

    async def main() -> None:
        with pytest.raises(SpecClusterError) as info:
            async with SSHSpecCluster(
                inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, n_workers=2,
                connect_timeout=4, security=False,
            ):
                pass
        lines = str(info.value).splitlines()
        for host in chosen:
            [line] = [line for line in lines if host.name in line]
            assert "did not answer within 4 s" in line, lines

    try:
        run(main())
    finally:
        for host in chosen:
            host.heal()


# -- an ordinary user --------------------------------------------------------------


@contextlib.contextmanager
def readable_by_all(path: Path) -> Iterator[None]:
    """Let every user read ``path`` (a public key file) and enter its folders, for a while."""
    chain = [path, *[p for p in path.parents if p != Path("/")]]
    modes = {p: p.stat().st_mode & 0o7777 for p in chain}
    try:
        path.chmod(modes[path] | 0o044)
        for folder in chain[1:]:
            folder.chmod(modes[folder] | 0o011)
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


@pytest.fixture
def lab_user(lab: Any, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An ordinary account on the machine (so on every lab host), with a python that has distributed.

    The lab's sshd reads one authorized_keys file for every user, so the lab
    key logs in as this user too, once the user may read that file. Removed,
    with its processes, afterwards.
    """
    if os.geteuid() != 0:
        pytest.fail("the non-root lab test creates a user and needs root")
    user = f"scuser{os.getpid() % 100000}"
    home = Path("/home") / user
    subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh", user], check=True, timeout=30)
    # No password, but not locked: sshd without PAM refuses locked accounts.
    subprocess.run(["usermod", "--password", "*", user], check=True, timeout=30)
    keys = contextlib.ExitStack()
    try:
        keys.enter_context(readable_by_all(Path(lab.authorized_keys)))
        # The head's python lives under /root; the user gets Debian's python
        # with the head's distributed release from pip's cache.
        venv = home / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(venv / "bin/python"), "-m", "pip", "install", "-q", f"distributed=={distributed.__version__}"],
            check=True, timeout=600, capture_output=True,
        )
        subprocess.run(["chown", "-R", f"{user}:{user}", str(home)], check=True, timeout=60)
        yield user, str(venv / "bin/python")
    finally:
        keys.close()
        for proc in psutil.process_iter(["uids"]):
            if proc.info["uids"] and proc.info["uids"].real == pwd.getpwnam(user).pw_uid:
                kill_tree(proc.pid)
        subprocess.run(["userdel", "--remove", user], check=False, timeout=60, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _user_processes(user: str) -> list[str]:
    uid = pwd.getpwnam(user).pw_uid
    return [
        f"{p.pid} {' '.join(p.info['cmdline'] or [])}"
        for p in psutil.process_iter(["uids", "cmdline"])
        if p.info["uids"] and p.info["uids"].real == uid
    ]


def test_ordinary_user_with_tls_leaves_nothing_after_the_head_is_killed(
    lab: Any, tmp_path: Path, lab_user: tuple[str, str]
) -> None:
    """``ansible_user`` an ordinary account, TLS on: kill the head, and nothing of the user's is left."""
    user, python = lab_user
    chosen = lab.hosts[:2]
    path = inventory(
        lab, tmp_path, {h.name: {"ansible_user": user, "speccluster_python": python} for h in chosen},
    )
    script = tmp_path / "head.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from distributed import Client
        from speccluster_ssh.cluster import SSHSpecCluster
        with SSHSpecCluster(inventory={str(path)!r}, known_hosts={str(lab.known_hosts)!r}, n_workers=2, security=True) as cluster:
            with Client(cluster) as client:
                assert client.submit(sum, [1, 2]).result(timeout=60) == 3
                print("READY", flush=True)
                time.sleep(600)
    """))
    head = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and head.poll() is None:
            line = head.stdout.readline() if head.stdout else ""
            if "READY" in line:
                break
        assert "READY" in line, head.stderr.read() if head.poll() is not None and head.stderr else line
        assert _user_processes(user), "the cluster's processes should run as the user"
        head.send_signal(signal.SIGKILL)
        head.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _user_processes(user) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _user_processes(user), _user_processes(user)
    finally:
        if head.poll() is None:
            kill_tree(head.pid)
            head.wait(timeout=30)
