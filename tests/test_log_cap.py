"""Bounded logs (issue 12, item 6): ``speccluster_log_max_bytes`` caps each process's log on its host.

The agent reads each child's output from a pipe and appends it to the log,
cutting the file to the newest half of the cap when it would pass it. Unit
tests of the cut (``agent/logs.py``) and of ``logs --follow`` across it run
without a lab; a host agent run locally shows the exit tail and the error of
a log directory that cannot be written; one lab cluster shows a worker that
writes 200 MB to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import pytest
from distributed import Client, Scheduler

from speccluster_ssh.agent import HostAgent
from speccluster_ssh.agent.logs import LogFile, _tail_of, kept_part
from speccluster_ssh.cli.display import _new_text
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.errors import HostError
from speccluster_ssh.inventory import Inventory, InventoryError

KIB = 1024


def lines(start: int, count: int, width: int = 60) -> bytes:
    return b"".join(f"line {i:08d} ".encode().ljust(width, b"x") + b"\n" for i in range(start, start + count))


# -- the cut, without an agent ----------------------------------------------------------------------


def test_log_file_never_passes_its_cap_and_keeps_the_newest_lines(tmp_path: Path) -> None:
    cap = 64 * KIB
    log = LogFile(str(tmp_path / "w.log"), cap)
    written = 0
    sizes = []
    for chunk in range(400):
        data = lines(chunk * 50, 50)  # about 3 KiB per write
        log.write(data)
        written += len(data)
        sizes.append(os.path.getsize(log.path))
    log.close()
    assert written > 10 * cap
    assert max(sizes) <= cap, max(sizes)
    assert log.cuts >= 10
    text = Path(log.path).read_bytes()
    assert text.startswith(b"[speccluster-ssh: older output cut here")
    body = text.split(b"\n", 1)[1]
    assert body.startswith(b"line "), body[:80]  # the kept part starts at a line
    assert body.endswith(lines(399 * 50 + 49, 1))  # the newest line is there
    assert len(text) >= cap // 4


def test_a_write_larger_than_the_cap_keeps_its_end(tmp_path: Path) -> None:
    cap = 64 * KIB
    log = LogFile(str(tmp_path / "w.log"), cap)
    big = lines(0, 3000)  # about 180 KiB in one write
    log.write(big)
    log.close()
    text = Path(log.path).read_bytes()
    assert len(text) <= cap
    assert text.endswith(lines(2999, 1))
    assert kept_part(b"", b"abc", cap).endswith(b"abc")


def test_follow_prints_each_line_once_across_cuts(tmp_path: Path) -> None:
    """``logs --follow`` takes what a new tail adds after the old one; a cut does not disturb it."""
    cap = 64 * KIB
    log = LogFile(str(tmp_path / "w.log"), cap)
    printed = ""
    seen = ""
    for step in range(60):
        log.write(lines(step * 40, 40))  # about 2.4 KiB between two polls, a cut every ~13 polls
        tail = _tail_of(log.path, 16384)
        printed += _new_text(seen, tail)
        seen = tail
    log.close()
    assert log.cuts >= 3
    expected = lines(0, 60 * 40).decode()
    # Whatever was in the first window is printed once; from there on every line exactly once.
    assert printed == expected[len(expected) - len(printed):]
    assert printed.count(lines(59 * 40 + 39, 1).decode()) == 1
    assert len(printed) > 100 * KIB


def test_log_max_bytes_is_validated_like_other_sizes() -> None:
    def host(value: Any) -> Any:
        spec = {"name": "here", "ansible_connection": "local", "speccluster_log_max_bytes": value}
        return Inventory.from_hosts([spec]).hosts["here"]

    assert host("1MiB").log_max_bytes == 2**20
    assert host("64 MiB").log_max_bytes == 64 * 2**20
    assert host(100000).log_max_bytes == 100000
    for bad in ("10 KiB", "lots", True, -1):
        with pytest.raises(InventoryError, match="speccluster_log_max_bytes on host here must be a size"):
            host(bad)


# -- a host agent, run locally ----------------------------------------------------------------------


def local_host(**variables: Any) -> Any:
    spec = {"name": "here", "ansible_connection": "local", "speccluster_python": sys.executable, **variables}
    return Inventory.from_hosts([spec]).hosts["here"]


def test_log_directory_that_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    """The agent's base directory is a file: the start fails once, saying what to fix."""
    base = tmp_path / "base"
    base.write_text("not a directory")

    async def main() -> None:
        agent = HostAgent(HostConnection(local_host(), ConnectSettings()), "x", base_dir=str(base))
        with pytest.raises(HostError) as info:
            await agent.start(timeout=30)
        error = info.value
        assert "log directory" in error.reason and str(base) in error.reason, error.reason
        assert error.fix and str(base) in error.fix and "write" in error.fix, error.fix
        assert "\n" not in error.reason and "Traceback" not in error.reason

    asyncio.run(main())


# One burst of ~900 KB (the pipe holds it all) and an immediate exit: the
# agent still has it to read when it learns of the exit.
CHATTY_EXIT = """
import os, sys
burst = "".join(f"chatter {i:06d} " + "x" * 40 + "\\n" for i in range(16000)) + "LAST WORDS\\n"
sys.stderr.write(burst)
sys.stderr.flush()
os._exit(7)
"""


@contextlib.asynccontextmanager
async def local_worker(tmp_path: Path, cap: str) -> AsyncIterator[tuple[Scheduler, HostAgent, dict[str, Any]]]:
    """A scheduler here and a local agent whose worker ``w`` has registered, its log capped at ``cap``."""
    scheduler = Scheduler(host="127.0.0.1", port=0, dashboard_address=":0")
    await scheduler
    host = local_host(speccluster_log_max_bytes=cap)
    agent = HostAgent(HostConnection(host, ConnectSettings()), f"local-{time.monotonic_ns()}", base_dir=str(tmp_path / "b"))
    await agent.start()
    try:
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        agent.on("ready", lambda m: ready.done() or ready.set_result(m))
        reply = await agent.request(
            "start", name="w", role="worker", scheduler=scheduler.address, options={"nthreads": 1, "name": "w"}
        )
        await asyncio.wait_for(ready, 60)
        yield scheduler, agent, reply
    finally:
        await agent.close()
        await scheduler.close()


def test_exit_tail_holds_the_last_output_of_a_chatty_process(tmp_path: Path) -> None:
    """A worker writes ~900 KB at once and exits: its ``exited`` tail ends with its last line, the log stays capped."""

    async def main() -> None:
        async with local_worker(tmp_path, "256KiB") as (scheduler, agent, reply):
            exited: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            agent.on("exited", lambda m: exited.done() or exited.set_result(m))
            async with Client(scheduler.address, asynchronous=True) as client:
                future = client.submit(exec, CHATTY_EXIT, pure=False)  # the worker dies running it
                message = await asyncio.wait_for(exited, 60)
                del future
            assert message["code"] == 7
            assert message["tail"].rstrip().endswith("LAST WORDS"), message["tail"][-300:]
            size = os.path.getsize(reply["log"])
            assert size <= 256 * KIB, size
            tail = (await agent.request("tail", name="w", bytes=4096))["data"]
            assert tail.rstrip().endswith("LAST WORDS")

    asyncio.run(main())


# -- on the lab -------------------------------------------------------------------------------------

WRITE_200MB = """
import sys
block = "".join(f"noise {i:06d} " + "y" * 1000 + "\\n" for i in range(64))  # about 64 KiB per write
for _ in range(3200):
    sys.stderr.write(block)
sys.stderr.write("THE LAST LINE OF 200 MB\\n")
sys.stderr.flush()
"""


@pytest.mark.lab
def test_worker_writing_200_mb_leaves_a_capped_log_and_logs_shows_its_end(lab: Any, tmp_path: Path) -> None:
    from test_peer import inventory, lab_cluster, names, run

    cap = 2**20
    host = lab.hosts[0]
    path = inventory(lab, tmp_path, {host.name: {"speccluster_log_max_bytes": "1MiB"}})

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=1) as (cluster, _):
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(1, timeout=60)
                (name,) = names(cluster)
                log = Path.home() / ".cache/speccluster-ssh" / cluster.cluster_id / host.name / "logs" / f"{name}.log"
                sizes: list[int] = []
                writing = asyncio.ensure_future(client.run(exec, WRITE_200MB))
                for _ in range(6000):  # sample the file's size while the worker writes (at most ~10 min)
                    if writing.done():
                        break
                    sizes.append(log.stat().st_size if log.exists() else 0)
                    await asyncio.sleep(0.1)
                await writing
            final = log.stat().st_size
            assert log.read_bytes().startswith(b"[speccluster-ssh: older output cut here"), "the log was never cut"
            assert max([*sizes, final]) <= cap + 65536, (max(sizes), final)
            logs = await cluster.get_logs(cluster=False, scheduler=False, workers=True)
            # Its last lines; dask may log after them (e.g. that the event loop was busy).
            text = str(logs[name])
            end = text.rindex("THE LAST LINE OF 200 MB")
            assert len(text) - end < 4096 and "noise 000063 " in text[end - 2000:end], text[-3000:]

    run(main(), timeout=600)


def test_follow_through_the_agent_prints_every_line_once_across_cuts(tmp_path: Path) -> None:
    """``logs --follow``'s way (poll ``tail``, print what is new) over a worker's log that is cut again and again."""

    def write_batch(step: int) -> None:
        import sys

        sys.stderr.write("".join(f"step {step:04d} line {i:02d} " + "z" * 60 + "\n" for i in range(40)))
        sys.stderr.flush()

    async def main() -> None:
        async with local_worker(tmp_path, "64KiB") as (scheduler, agent, reply):
            printed, seen, sizes = "", "", []
            async with Client(scheduler.address, asynchronous=True) as client:
                for step in range(60):  # about 3.8 KiB a step: a cut every ~8 steps
                    await client.run(write_batch, step)
                    tail = (await agent.request("tail", name="w", bytes=16384))["data"]
                    printed += _new_text(seen, tail)
                    seen = tail
                    sizes.append(os.path.getsize(reply["log"]))
            assert max(sizes) <= 64 * KIB, max(sizes)
            assert Path(reply["log"]).read_bytes().startswith(b"[speccluster-ssh: older output cut here")
            ours = [line for line in printed.splitlines() if line.startswith("step ")]
            expected = [f"step {s:04d} line {i:02d} " + "z" * 60 for s in range(60) for i in range(40)]
            # From the first line the first tail showed, every line once and in order.
            assert ours == expected[len(expected) - len(ours):], ours[:3]
            assert len(ours) == len(expected)  # the first window held the whole log then

    asyncio.run(main())
