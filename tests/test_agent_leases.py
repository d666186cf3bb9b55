"""Lease requests over the real agent protocol (issue 23): local agents, no sshd, no lab.

Each test's lease directory is its own (root-owned like ``/var/tmp``, mode
1777), so no test touches the host's real leases. The head side is
:class:`~speccluster_ssh.agent.lease_requests.LeaseRequests`, the agent side
``agent/lease_keeper.py``; ``agent/leases.py`` read directly is the witness.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed import Scheduler

from speccluster_ssh.agent import HeldLease, HostAgent, LeaseRefused
from speccluster_ssh.agent import leases as L
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.errors import HostError
from speccluster_ssh.inventory import Inventory

CAPACITY = {"slots": 2, "cores": 8, "gpus": ["0", "1"]}


def local_host() -> Any:
    spec = {"name": "here", "ansible_connection": "local", "speccluster_python": sys.executable}
    return Inventory.from_hosts([spec]).hosts["here"]


def shared_dir(tmp_path: Path) -> str:
    path = tmp_path / "leases"
    path.mkdir()
    path.chmod(0o1777)
    return str(path)


async def started(tmp_path: Path, lease_dir: str, cluster: str, silence: float = 15.0) -> HostAgent:
    agent = HostAgent(HostConnection(local_host(), ConnectSettings()), f"{cluster}-{time.monotonic_ns()}",
                      base_dir=str(tmp_path / "base"), lease_dir=lease_dir, silence=silence)  # fmt: skip
    await agent.start()
    return agent


async def poll(check: Callable[[], Awaitable[Any] | Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


def test_claim_refuse_list_release(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)

    async def main() -> None:
        a = await started(tmp_path, path, "a")
        b = await started(tmp_path, path, "b")
        try:
            held = await a.lease_claim({"slots": 2, "cores": 4, "gpus": 1}, CAPACITY, name="first", head="h1", entry="0")
            assert isinstance(held, HeldLease), held
            assert held.lease.cluster == a.cluster_id and held.lease.amount.gpus == ("0",)
            assert held.lease.name == "first" and held.lease.user == L.lease_user_name(os.getuid())
            refused = await b.lease_claim({"slots": 1}, CAPACITY, name="second", head="h2")
            assert isinstance(refused, LeaseRefused), refused
            assert refused.short == {"slots": 1} and refused.free["slots"] == 0
            assert [h.cluster for h in refused.holders] == [a.cluster_id]
            assert "first" in refused.why and "held by" in refused.why
            # A device another cluster holds is refused even with slots to spare.
            assert isinstance(await b.lease_claim({"slots": 0, "gpus": ["0"]}, CAPACITY), LeaseRefused)
            listed = await b.lease_list()
            assert [(x.cluster, x.kind, x.lease_id) for x in listed] == [(a.cluster_id, "lease", held.lease_id)]
            assert await a.lease_release(held.lease_id) is True
            assert await a.lease_release(held.lease_id) is False, "a second release says it held nothing"
            assert await b.lease_release(held.lease_id) is False, "an agent releases only its own"
            assert await a.lease_list() == []
            second = await b.lease_claim({"slots": 1}, CAPACITY)
            assert isinstance(second, HeldLease)
            assert [r["cluster"] for r in L.lease_list(path)] == [b.cluster_id]
        finally:
            await a.close()
            await b.close()

    run(main)


def test_want_unwant_and_a_record_names_its_own_cluster(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)

    async def main() -> None:
        a = await started(tmp_path, path, "a")
        try:
            want = await a.lease_want({"slots": 3}, name="waiting", head="h1")
            (listed,) = await a.lease_list()
            assert (listed.kind, listed.amount.slots, listed.name, listed.lease_id) == ("want", 3, "waiting", want.lease_id)
            # The head cannot claim in another cluster's name: the agent writes its own.
            reply = await a.request("lease_claim", record={"cluster": "someone-else", "holds": {"slots": 1}},
                                    capacity=CAPACITY)  # fmt: skip
            assert reply["record"]["cluster"] == a.cluster_id
            assert await a.lease_unwant(want.lease_id) is True
            assert [x.kind for x in await a.lease_list()] == ["lease"]
        finally:
            await a.close()

    run(main)


def test_mark_busy_and_idle_shows_in_every_list(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)

    async def main() -> None:
        a = await started(tmp_path, path, "a")
        b = await started(tmp_path, path, "b")
        try:
            held = await a.lease_claim({"slots": 1}, CAPACITY, name="first", head="h1")
            assert isinstance(held, HeldLease) and held.lease.state == "" and held.lease.state_since == 0.0
            assert await a.lease_mark(held.lease_id, "busy") is True
            (seen,) = await b.lease_list()
            assert (seen.cluster, seen.state) == (a.cluster_id, "busy") and seen.state_since >= seen.since
            assert await a.lease_mark(held.lease_id, "idle") is True
            assert [x.state for x in await b.lease_list()] == ["idle"]
            assert await b.lease_mark(held.lease_id, "busy") is False, "an agent marks only its own leases"
            assert [x.state for x in await a.lease_list()] == ["idle"]
            with pytest.raises(HostError, match="bad lease state"):
                await a.lease_mark(held.lease_id, "sleepy")
            assert await a.lease_release(held.lease_id) is True
            assert await a.lease_mark(held.lease_id, "busy") is False
        finally:
            await a.close()
            await b.close()

    run(main)


def test_an_unsafe_directory_fails_with_its_fix(tmp_path: Path) -> None:
    path = tmp_path / "open"
    path.mkdir()
    path.chmod(0o777)  # world writable, not sticky

    async def main() -> None:
        a = await started(tmp_path, str(path), "a")
        try:
            with pytest.raises(HostError, match="without the sticky bit") as info:
                await a.lease_claim({"slots": 1}, CAPACITY)
            assert "chmod +t" in info.value.fix
            assert a.alive, "a refused directory does not stop the agent"
        finally:
            await a.close()

    run(main)


def test_a_held_host_lock_fails_the_claim_before_the_head_would_lose_the_agent(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)

    async def main() -> None:
        import fcntl

        a = await started(tmp_path, path, "a", silence=3.0)
        lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another claimer, stuck
            with pytest.raises(HostError, match="stayed locked for 1 s") as info:
                await a.lease_claim({"slots": 1}, CAPACITY)
            assert "lslocks" in info.value.fix
            os.close(lock)
            lock = -1
            assert a.alive and isinstance(await a.lease_claim({"slots": 1}, CAPACITY), HeldLease)
        finally:
            if lock >= 0:
                os.close(lock)
            await a.close()

    run(main)


def test_a_bad_file_is_one_warning_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = shared_dir(tmp_path)
    bad = Path(path) / f"speccluster-lease.{os.getuid()}.{'0' * 16}.json"

    async def main() -> None:
        a = await started(tmp_path, path, "a")
        warnings: list[str] = []
        a.on("lease_warning", lambda message: warnings.append(str(message["warning"])))
        try:
            import fcntl

            with open(bad, "w") as f:
                f.write("{not json")
                fcntl.flock(f, fcntl.LOCK_EX)  # alive, so it is read
                with caplog.at_level(logging.WARNING, logger="speccluster_ssh.agent"):
                    assert await a.lease_list() == []
                    assert isinstance(await a.lease_claim({"slots": 1}, CAPACITY), HeldLease)
                    await a.lease_list()
            assert len(warnings) == 1 and "is not JSON" in warnings[0], warnings
            assert any("is not JSON" in r.getMessage() and "host here" in r.getMessage() for r in caplog.records)
        finally:
            await a.close()

    run(main)


def test_the_agent_releases_everything_when_it_stops(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)

    async def main() -> None:
        a = await started(tmp_path, path, "a")
        held = await a.lease_claim({"slots": 1}, CAPACITY)
        want = await a.lease_want({"slots": 1})
        assert isinstance(held, HeldLease) and len(L.lease_list(path)) == 2
        await a.close()  # its shutdown reply comes after the release
        assert L.lease_list(path) == []
        assert not (Path(path) / held.lease_id).exists() and not (Path(path) / want.lease_id).exists()

    run(main)


def open_files(pid: int) -> set[str]:
    """The paths of ``pid``'s open fds (``/proc``)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return found


def test_no_child_keeps_a_lease_of_a_killed_agent(tmp_path: Path) -> None:
    """A nanny forked after the claim (and the worker it forks) never holds the lease file: the lease ends with the agent."""
    path = shared_dir(tmp_path)

    async def main() -> None:
        scheduler = Scheduler(host="127.0.0.1", port=0, dashboard_address=":0")
        await scheduler
        a = await started(tmp_path, path, "a")
        descendants: list[psutil.Process] = []
        try:
            held = await a.lease_claim({"slots": 1}, CAPACITY)
            assert isinstance(held, HeldLease)
            lease_file = os.path.join(path, held.lease_id)
            ready = asyncio.get_running_loop().create_future()
            a.on("ready", lambda m: ready.done() or ready.set_result(m))
            await a.request("start", name="n", role="nanny", scheduler=scheduler.address,
                            options={"nthreads": 1, "name": "n"})  # fmt: skip
            await asyncio.wait_for(ready, 60)
            agent_pid = int(a.facts["pid"])
            descendants = psutil.Process(agent_pid).children(recursive=True)
            assert len(descendants) >= 2, "the nanny and its worker"
            assert lease_file in open_files(agent_pid), "the check sees the agent's own fd"
            for process in descendants:
                assert lease_file not in open_files(process.pid), f"{process.name()} {process.pid} holds the lease"
            os.kill(agent_pid, signal.SIGKILL)
            await poll(lambda: L.lease_list(path) == [], 15, "the lease to end with the agent")
        finally:
            for process in descendants:
                try:
                    process.kill()  # by its pid; the parent-death signal has usually done it already
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(descendants, timeout=10)
            await a.close()
            await scheduler.close()
        assert L.lease_list(path) == []

    run(main)


def shipped_namespace() -> dict[str, Any]:
    """The lease sources run as the host runs them: in order, in one namespace."""
    from speccluster_ssh.agent import AGENT_SOURCES

    namespace: dict[str, Any] = {"__name__": "speccluster_agent"}
    directory = Path(L.__file__).resolve().parent
    for name in AGENT_SOURCES[AGENT_SOURCES.index("lease_records.py"):AGENT_SOURCES.index("lease_keeper.py") + 1]:
        exec(compile((directory / name).read_text(), name, "exec"), namespace)
    return namespace


def test_the_keeper_holds_touches_and_releases(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    keeper = shipped_namespace()["LeaseKeeper"]("c1", path)
    assert keeper.handle("lease_nothing", {}) == {"ok": False, "error": "unknown op 'lease_nothing'"}
    reply = keeper.handle("lease_claim", {"record": {"holds": {"slots": 1}}, "capacity": {"slots": 1}})
    assert reply["held"] and reply["record"]["cluster"] == "c1"
    (fd,) = keeper.fds()
    lease_file = Path(path) / reply["lease"]
    os.utime(lease_file, (1000.0, 1000.0))
    keeper.tick(keeper.touched + 1.0)
    assert lease_file.stat().st_mtime == 1000.0, "not touched before its time"
    keeper.tick(keeper.touched + 3601.0)  # not + 3600.0: (t + 3600.0) - t can round below 3600
    assert lease_file.stat().st_mtime > 1000.0
    refused = keeper.handle("lease_claim", {"record": {"holds": {"slots": 1}}, "capacity": {"slots": 1}})
    assert refused["ok"] and not refused["held"] and refused["short"] == {"slots": 1}
    keeper.release_all()
    assert keeper.fds() == [] and not lease_file.exists()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the lease is over


def test_leases_over_ssh_end_with_a_killed_agent(lab: Any, tmp_path: Path) -> None:
    """Two clusters' agents over real SSH on one lab host, in one lease directory: the first's claim refuses the
    second's, and once the first agent is SIGKILLed (by its pid) the second can claim. (Capacity is counted per
    inventory name of the host, so both must be on h1.)"""
    from speccluster_ssh.inventory import load_inventory

    path = shared_dir(tmp_path)
    inventory = load_inventory(lab.write_inventory(tmp_path / "inv.yml", groups={"workers": ["h1", "h2"]}))
    settings = ConnectSettings(known_hosts=str(lab.known_hosts))

    async def main() -> None:
        agents = [HostAgent(HostConnection(inventory.hosts[name], settings), f"{name}-{time.monotonic_ns()}",
                            base_dir=str(tmp_path / "base"), lease_dir=path) for name in ("h1", "h1")]  # fmt: skip
        try:
            await asyncio.gather(*(agent.start() for agent in agents))
            first, second = agents
            assert [agent.facts["hostname"] for agent in agents] == ["h1", "h1"], "both agents run on the lab host"
            assert not first.host.is_local and first.connection.local_address == lab.head_ip, "over SSH"
            held = await first.lease_claim({"slots": 1}, {"slots": 1}, name="first", head="head")
            assert isinstance(held, HeldLease), held
            refused = await second.lease_claim({"slots": 1}, {"slots": 1})
            assert isinstance(refused, LeaseRefused) and [h.cluster for h in refused.holders] == [first.cluster_id]
            os.kill(int(first.facts["pid"]), signal.SIGKILL)
            await poll(lambda: L.lease_list(path) == [], 15, "the lease to end with its agent")
            assert isinstance(await second.lease_claim({"slots": 1}, {"slots": 1}), HeldLease)
        finally:
            for agent in agents:
                await agent.close()
            for connection in {agent.connection for agent in agents}:
                await connection.close()
        assert L.lease_list(path) == []

    run(main)
