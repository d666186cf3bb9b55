"""Scratch and spill directories of the dask processes: per user, per cluster and per host, and gone at the end.

Run through a local connection (no lab): the agent decides the directory in
each forked child (``_scratch_dir`` of ``agent/host.py``), records it in its
lock file, and removes it when it leaves, or a later agent's sweep does
when it was killed. The lab test of two users sharing a directory is in
``test_two_users.py``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, Scheduler

from speccluster_ssh.agent import HostAgent
from speccluster_ssh.agent.host import _scratch_dir
from speccluster_ssh.connection import ConnectSettings, HostConnection
from test_agent_local import local_host, wait_gone

USER = pwd.getpwuid(os.getuid()).pw_name


async def _agent_with_worker(
    tmp_path: Path, scheduler: Scheduler, cluster_id: str, *, options: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[HostAgent, int]:
    agent = HostAgent(HostConnection(local_host(), ConnectSettings()), cluster_id, base_dir=str(tmp_path / "base"))
    await agent.start()
    ready = asyncio.get_running_loop().create_future()
    agent.on("ready", lambda m: ready.done() or ready.set_result(m))
    await agent.request(
        "start", name="w", role="nanny", scheduler=scheduler.address,
        options={"nthreads": 1, "name": f"w-{cluster_id}", **(options or {})}, config=config or {},
    )
    message = await asyncio.wait_for(ready, 60)
    return agent, int(message["pid"])


async def _local_directories(scheduler: Scheduler) -> dict[str, str]:
    """Worker name -> its ``local_directory``."""
    async with Client(scheduler.address, asynchronous=True) as client:
        found = await client.run(lambda dask_worker: (dask_worker.name, dask_worker.local_directory))
    return dict(found.values())


def test_default_scratch_is_per_user_and_cluster_under_the_temporary_directory(tmp_path: Path) -> None:
    """dask's temporary-directory stays honoured; two clusters there never share a directory, and each goes at its end."""
    temporary = tmp_path / "tmp"

    async def main() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler:
            ids = [f"sa-{time.monotonic_ns()}", f"sb-{time.monotonic_ns()}"]
            started = [await _agent_with_worker(tmp_path, scheduler, cid, config={"temporary-directory": str(temporary)})
                       for cid in ids]
            try:
                dirs = await _local_directories(scheduler)
                for cid in ids:
                    expected = temporary / f"speccluster-ssh-{USER}" / cid / "here"
                    assert Path(dirs[f"w-{cid}"]).is_relative_to(expected), dirs
                    assert oct(expected.stat().st_mode & 0o777) == oct(0o700)
            finally:
                for agent, _ in started:
                    await agent.close()
            assert await wait_gone([pid for _, pid in started], 15) == []
            for cid in ids:
                assert not (temporary / f"speccluster-ssh-{USER}" / cid).exists()

    asyncio.run(main())


def test_local_directory_is_shared_safely_and_stays_honoured(tmp_path: Path) -> None:
    """speccluster_local_directory D: <D>/<user>/<cluster>/<host label>; D itself stays, the cluster's part goes."""
    shared = tmp_path / "scratch"

    async def main() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler:
            cid = f"sl-{time.monotonic_ns()}"
            agent, pid = await _agent_with_worker(tmp_path, scheduler, cid, options={"local_directory": str(shared)})
            try:
                dirs = await _local_directories(scheduler)
                assert Path(dirs[f"w-{cid}"]).is_relative_to(shared / USER / cid / "here"), dirs
            finally:
                await agent.close()
            assert await wait_gone([pid], 15) == []
            assert shared.is_dir() and not (shared / USER / cid).exists()

    asyncio.run(main())


def test_scratch_of_a_killed_agent_goes_at_the_next_agents_sweep(tmp_path: Path) -> None:
    temporary = tmp_path / "tmp"

    async def main() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler:
            cid = f"sk-{time.monotonic_ns()}"
            agent, pid = await _agent_with_worker(tmp_path, scheduler, cid, config={"temporary-directory": str(temporary)})
            scratch = temporary / f"speccluster-ssh-{USER}" / cid / "here"
            try:
                spill = scratch / "spilled.bin"
                spill.write_bytes(b"x" * 1024)
                os.kill(int(agent.facts["pid"]), signal.SIGKILL)
                assert await wait_gone([pid, int(agent.facts["pid"])], 15) == []
                assert spill.exists()  # nobody was left to remove it
            finally:
                await agent.close()
            # Any later agent of this user on the host sweeps it, as it sweeps the dead agent's TLS keys.
            later = HostAgent(HostConnection(local_host(), ConnectSettings()), f"later-{cid}", base_dir=str(tmp_path / "base"))
            await later.start()
            await later.close()
            assert not scratch.exists()

    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="plants a directory of another uid")
def test_a_planted_user_directory_is_passed_over_or_refused_with_the_fix(tmp_path: Path) -> None:
    base = tmp_path / "tmp"
    base.mkdir()
    planted = base / f"speccluster-ssh-{USER}"
    planted.mkdir()
    os.chown(planted, 65534, 65534)  # another user made it first, in a shared /tmp
    path = Path(_scratch_dir(None, str(base), "c1", "h1"))
    assert path.parent.parent.parent == base and path.parent.parent != planted
    assert path.parent.parent.stat().st_uid == os.getuid()
    # A symlink planted in its place is never followed.
    planted.rmdir()
    planted.symlink_to(tmp_path)
    path = Path(_scratch_dir(None, str(base), "c1", "h1"))
    assert not path.is_relative_to(planted) and path.is_dir()
    # A configured directory is the user's choice: refused, with what to do.
    configured = tmp_path / "scratch"
    (configured / USER).mkdir(parents=True)
    os.chown(configured / USER, 65534, 65534)
    with pytest.raises(PermissionError, match="speccluster_local_directory") as info:
        _scratch_dir(str(configured), str(base), "c1", "h1")
    assert str(configured / USER) in str(info.value) and "\n" not in str(info.value)


def test_names_cannot_leave_the_directory(tmp_path: Path) -> None:
    path = Path(_scratch_dir(None, str(tmp_path), "../../etc", "a/b"))
    assert path.is_relative_to(tmp_path / f"speccluster-ssh-{USER}")
    assert path.name == "a_b"


def test_the_children_of_one_host_probe_its_scratch_directory_at_once(tmp_path: Path) -> None:
    """Two workers of one host start together: neither's write probe may remove the other's."""
    import multiprocessing

    def probe_many(errors: Any) -> None:
        try:
            for _ in range(300):
                _scratch_dir(None, str(tmp_path), "speccluster-race", "here")
        except OSError as exc:
            errors.put(str(exc))

    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    workers = [context.Process(target=probe_many, args=(errors,)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert errors.empty(), errors.get()
    directory = tmp_path / f"speccluster-ssh-{pwd.getpwuid(os.getuid()).pw_name}" / "speccluster-race" / "here"
    assert list(directory.iterdir()) == []  # every probe removed its file
