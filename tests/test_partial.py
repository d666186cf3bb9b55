"""Labs where some machines are off (issue 16): start with the hosts that answer.

A host without sshd, or whose python lacks distributed, does not stop the
cluster: its entries wait (or move to free slots), ``status_report`` says
why, and the host's workers join when it answers. ``min_workers`` sets how
many workers a start needs.
"""

from __future__ import annotations

import asyncio
import pwd
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed import Client

from labusers import LabUser
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


def _user_processes(user: str) -> list[str]:
    uid = pwd.getpwnam(user).pw_uid
    return [
        f"{p.pid} {' '.join(p.info['cmdline'] or [])}"
        for p in psutil.process_iter(["uids", "cmdline"])
        if p.info["uids"] and p.info["uids"].real == uid
    ]


def test_ordinary_user_with_tls_leaves_nothing_after_the_head_is_killed(
    lab: Any, tmp_path: Path, lab_user: LabUser
) -> None:
    """``ansible_user`` an ordinary account, TLS on: kill the head, and nothing of the user's is left."""
    user, python = lab_user.name, lab_user.python
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
