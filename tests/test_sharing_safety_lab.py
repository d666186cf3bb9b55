"""Sharing a lab safely (issue 23), on the SSH lab: GPUs, hostile lease files, the user quota, ``memory_limit: auto``.

Each lab host has its own ``/var/tmp`` (``LabHost.var_tmp``, tests/sshlab.py),
where every cluster's agents keep their lease files. These tests write
hostile files there (as root, then handed to ``nobody``), hold some of them
with a live process of that user, and check what clusters make of them. The
lab runs every cluster as root.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from speccluster_ssh.errors import StartError

from test_gpus import stand_in_bin
from test_peer import captured, inventory, processes_besides_sshd, run, until
from test_sharing_lab import cluster_on, leases_on

pytestmark = pytest.mark.lab

DEADLINE = 90.0
NOBODY = 65534


def lease_gpus(lab: Any, host: str) -> list[list[str]]:
    """The GPU devices each live lease file on ``host`` holds."""
    return sorted(r["holds"]["gpus"] for r in leases_on(lab)[host])


async def devices_of(cluster: Any, n: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each of the cluster's ``n`` workers, as the workers see it."""

    def visible_devices() -> str:  # local: the workers cannot import this module, so it goes by value
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")

    async with Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(n, timeout=60)
        return sorted((await client.run(visible_devices)).values())


# -- 1. GPU devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", ["list", "auto"])
def test_two_clusters_on_one_gpu_host_get_disjoint_devices(lab: Any, tmp_path: Path, gpus: str) -> None:
    """4 GPUs on 2 slots, one entry in each of two clusters: ``0,1`` and ``2,3``, not ``0,1`` twice.

    Each cluster alone would place its entry on GPU slot 0; only the leases keep them apart.
    """
    gpu_host = lab.hosts[0]
    variables: dict[str, Any] = {"speccluster_slots": 2}
    if gpus == "list":
        variables["speccluster_gpus"] = [0, 1, 2, 3]
    else:
        bin_dir = stand_in_bin(tmp_path / "bin")
        variables.update(speccluster_gpus="auto", speccluster_prologue=f"PATH={bin_dir}:$PATH; export PATH")
    path = inventory(lab, tmp_path, {gpu_host.name: variables})

    async def main() -> None:
        async with cluster_on(lab, path, n_workers=1, name="gpu-a") as a:
            seen_a = await devices_of(a, 1)
            async with cluster_on(lab, path, n_workers=1, name="gpu-b") as b:
                seen_b = await devices_of(b, 1)
                held = lease_gpus(lab, gpu_host.name)
                rows = [w["gpus"] for c in (a, b) for w in c.status_report()["workers"]]
        assert seen_a == ["0,1"], seen_a
        assert seen_b == ["2,3"], seen_b
        assert held == [["0", "1"], ["2", "3"]], held
        assert rows == [["0", "1"], ["2", "3"]], rows  # status shows what each worker got
        await until(lambda: not processes_besides_sshd(lab), 30, "every process on the lab hosts to end")

    run(main(), timeout=300)


# -- 2. hostile lease files ---------------------------------------------------------------------------

# Holds an exclusive flock on each file named in argv, as user nobody, until its stdin closes.
HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    sys.stdin.readline()  # the files are written
    fds = [os.open(p, os.O_RDONLY | os.O_NOFOLLOW) for p in sys.argv[2:]]
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    uid = int(sys.argv[1])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    print("held", flush=True)
    sys.stdin.read()
""")


def lease_content(uid: int, host: str, slots: int, *, pid: int = 1, cluster: str = "theirs-0000") -> dict[str, Any]:
    """A well-formed lease record, as another user's agent would write it."""
    return {"v": 1, "kind": "lease", "uid": uid, "pid": pid, "since": time.time(), "cluster": cluster,
            "name": cluster.rsplit("-", 1)[0], "head": "elsewhere", "entry": "0", "host": host,
            "holds": {"slots": slots, "cores": 0, "memory": 0, "gpus": []}}


def lease_name(uid: int) -> str:
    return f"speccluster-lease.{uid}.{secrets.token_hex(8)}.json"


@contextmanager
def held_by_nobody(paths: list[Path]) -> Iterator[subprocess.Popen[str]]:
    """A live process of user nobody holding a flock on each of ``paths`` (which it can only read)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(NOBODY), *map(str, paths)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)


def write_as(path: Path, data: str, uid: int) -> None:
    path.write_text(data)
    os.chmod(path, 0o644)
    os.chown(path, uid, uid)


def test_hostile_lease_files_are_ignored_with_one_warning_each(lab: Any, tmp_path: Path) -> None:
    """3 slots, and in /var/tmp: a symlink, garbage JSON, a lease claiming root's uid, a dead lease of nobody for
    every slot, and a live one of nobody for 1 slot. The cluster gets 2 workers: only the live, valid lease counts.
    """
    host = lab.hosts[0]
    var_tmp = Path(host.var_tmp)
    path = inventory(lab, tmp_path, {host.name: {"speccluster_slots": 3}})
    target = tmp_path / "target.json"
    target.write_text(json.dumps(lease_content(0, host.name, 3)))
    symlink = var_tmp / lease_name(0)
    garbage = var_tmp / lease_name(NOBODY)
    impostor = var_tmp / lease_name(0)  # owned by nobody, says root
    dead = var_tmp / lease_name(NOBODY)
    live = var_tmp / lease_name(NOBODY)
    made = [symlink, garbage, impostor, dead, live]
    try:
        with held_by_nobody([garbage, impostor, live]) as holder:
            symlink.symlink_to(target)
            write_as(garbage, "{not json", NOBODY)
            write_as(impostor, json.dumps(lease_content(0, host.name, 3, pid=holder.pid)), NOBODY)
            write_as(dead, json.dumps(lease_content(NOBODY, host.name, 3)), NOBODY)  # no process holds it
            write_as(live, json.dumps(lease_content(NOBODY, host.name, 1, pid=holder.pid)), NOBODY)
            assert holder.stdin is not None and holder.stdout is not None
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "held"

            async def main() -> None:
                with captured("speccluster_ssh") as records:
                    async with cluster_on(lab, path, n_workers=3, min_workers=0, name="careful") as cluster:
                        await until(lambda: len(cluster.scheduler.workers) == 2, DEADLINE, "2 workers")
                        # The watcher lists the host's leases again and again: each bad file is still said once.
                        passes = cluster.lease_watcher.passes
                        await until(lambda: cluster.lease_watcher.passes >= passes + 3, DEADLINE, "3 more lists")
                        assert len(cluster.scheduler.workers) == 2
                        ours = [r for r in leases_on(lab)[host.name] if r["cluster"] != "theirs-0000"]
                        assert len(ours) == 2, ours
                said = [r.getMessage() for r in records]
                for bad, why in ((symlink, "not a regular file"), (garbage, "is not JSON"),
                                 (impostor, "is owned by nobody but says uid 0")):
                    about = [line for line in said if bad.name in line]
                    assert len(about) == 1 and why in about[0], (bad.name, about, said)
                # A dead lease is no one's: ignored without a word; the valid live one is not bad.
                assert not [line for line in said if dead.name in line or live.name in line], said
                # Another user's files are theirs: the cluster neither changed nor removed them.
                assert all(p.is_symlink() or p.stat().st_uid == NOBODY for p in made)
                await until(lambda: not processes_besides_sshd(lab), 30, "every process on the lab hosts to end")

            run(main(), timeout=300)
    finally:
        for p in made:
            p.unlink(missing_ok=True)


def test_a_world_writable_lease_dir_without_sticky_bit_is_refused_with_the_fix(lab: Any, tmp_path: Path) -> None:
    """h2's speccluster_lease_dir is mode 0777: nothing starts there, its state names the fix; h1 runs."""
    good, bad = lab.hosts[0], lab.hosts[1]
    open_dir = Path(bad.var_tmp) / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)  # world-writable, not sticky: anyone could delete anyone's lease
    path = inventory(lab, tmp_path, {good.name: {}, bad.name: {"speccluster_lease_dir": "/var/tmp/open"}})
    try:
        async def main() -> None:
            async with cluster_on(lab, path, n_workers=2, min_workers=1, name="picky") as cluster:
                await until(lambda: not cluster.host_table.states[bad.name].usable, DEADLINE,
                            f"{bad.name} to be unusable")
                state = cluster.status_report()["hosts"][bad.name]
                ip_of = {h.ip: h.name for h in lab.hosts}
                hosts = [ip_of.get(a.split("://")[-1].rsplit(":", 1)[0]) for a in cluster.scheduler.workers]
            assert hosts == [good.name], hosts  # the other host runs: placement did not crash
            assert not list(open_dir.iterdir())  # no lease written there
            # Why, and what to do, in the host's state (its agent start failed, as for a wrong release).
            assert "/var/tmp/open" in state["reason"] and "sticky" in state["reason"], state
            assert "1777" in state["fix"], state
            # The same host alone: the start fails, and says why and what to do.
            alone = inventory(lab, tmp_path, {bad.name: {"speccluster_lease_dir": "/var/tmp/open"}}, name="alone.yml")
            with pytest.raises(StartError) as info:
                async with cluster_on(lab, alone, n_workers=1, name="alone", start_timeout=20):
                    pass
            text = str(info.value)
            assert bad.name in text and "/var/tmp/open" in text and "1777" in text, text
            assert "within" not in info.value.summary, info.value.summary  # it ended at once: no timeout waited out
            await until(lambda: not processes_besides_sshd(lab), 30, "every process on the lab hosts to end")

        run(main(), timeout=300)
    finally:
        remove_open_dir(open_dir)


def remove_open_dir(open_dir: Path) -> None:
    """Remove a test's lease directory and what is in it (the lab's /var/tmp outlives each test)."""
    for p in open_dir.iterdir():
        p.unlink()
    open_dir.rmdir()


# -- 3. the user quota ---------------------------------------------------------------------------------


def test_a_user_quota_caps_a_cluster_and_says_so(lab: Any, tmp_path: Path) -> None:
    """speccluster_user_quota 2 under all.vars, 4 workers asked on 4 free slots: 2 start, and the log says why."""
    path = inventory(lab, tmp_path, {h.name: {} for h in lab.hosts}, group_vars={"all": {"speccluster_user_quota": 2}})

    async def main() -> None:
        with captured("speccluster_ssh") as records:
            async with cluster_on(lab, path, n_workers=4, min_workers=0, name="capped") as cluster:
                await until(lambda: len(cluster.scheduler.workers) >= 2, DEADLINE, "2 workers")
                passes = cluster.lease_watcher.passes
                await until(lambda: cluster.lease_watcher.passes >= passes + 2, DEADLINE, "2 more watcher passes")
                # The watcher grows the cluster back into free slots: never past the quota.
                assert len(cluster.scheduler.workers) == 2, leases_on(lab)
                assert sum(len(r) for r in leases_on(lab).values()) == 2, leases_on(lab)
        said = "\n".join(r.getMessage() for r in records)
        assert "speccluster_user_quota" in said, said
        await until(lambda: not processes_besides_sshd(lab), 30, "every process on the lab hosts to end")

    run(main(), timeout=300)


def test_a_quota_start_does_not_blame_other_clusters(lab: Any, tmp_path: Path) -> None:
    """Alone on the lab, capped by the quota: the start's line names the quota, not other clusters."""
    path = inventory(lab, tmp_path, {h.name: {} for h in lab.hosts}, group_vars={"all": {"speccluster_user_quota": 1}})

    async def main() -> None:
        with captured("speccluster_ssh") as records:
            async with cluster_on(lab, path, n_workers=2, min_workers=0, name="alone"):
                pass
        said = [r.getMessage() for r in records if "speccluster_user_quota" in r.getMessage()]
        assert said and not any("other clusters" in line for line in said), said

    run(main(), timeout=300)


# -- 4. memory_limit: auto -----------------------------------------------------------------------------


def test_auto_memory_limit_divides_the_host_among_its_slots(lab: Any, tmp_path: Path) -> None:
    """One worker on a 2-slot host: its memory_limit is half the host's memory, not all of it."""
    host = lab.hosts[0]
    path = inventory(lab, tmp_path, {host.name: {"speccluster_slots": 2, "speccluster_memory_limit": "auto"}})
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the lab hosts are this machine

    async def main() -> None:
        async with cluster_on(lab, path, n_workers=1, name="sized") as cluster:
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(1, timeout=60)
                limits = [ws.memory_limit for ws in cluster.scheduler.workers.values()]
                on_worker = list((await client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit))
                                 .values())
        assert limits == [total // 2], (limits, total)
        assert on_worker == [total // 2], (on_worker, total)
        await until(lambda: not processes_besides_sshd(lab), 30, "every process on the lab hosts to end")

    run(main(), timeout=300)
