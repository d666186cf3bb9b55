"""The peer suite: what distributed's own tests ask of a SpecCluster, asked of ours.

Each test re-asks, in our own code, on the SSH lab, what one upstream test
of ``distributed/deploy/tests`` (``test_spec_cluster.py``,
``test_adaptive.py``, ``test_slow_adaptive.py``) asserts of a
``SpecCluster``; its docstring names that test. The tests after those cover
what SSH-launched processes add: inventory capacity, healing, lost hosts and
heterogeneous hosts.

Upstream behaviours that do not apply here
------------------------------------------
- ``test_spec_cluster.py::test_loop_started``, ``test_repr``,
  ``test_dashboard_link``, ``test_widget``, ``test_scheduler_info``,
  ``test_bad_close``: about the ``Cluster`` base class and the head
  scheduler, which we use unchanged; no SSH-launched process is involved.
- ``test_spec_cluster.py::test_spec_close_clusters``: the atexit hook is
  SpecCluster's own; our processes are ended by the host agents instead
  (covered in ``test_remote.py``).
- ``test_spec_cluster.py::test_new_worker_spec``,
  ``test_run_spec_cluster_worker_names``: entries are made by placement on
  inventory hosts, not by a user ``new_worker_spec``; naming is covered by
  ``test_scale`` and ``test_MultiWorker``.
- ``test_spec_cluster.py::test_nanny_port``: a fixed port per worker would
  collide on a host with several slots; ports come from the host.
- ``test_spec_cluster.py::test_spec_process``, ``test_ProcessInterfaceValid``,
  ``test_run_spec``: they exercise a bare in-process ``ProcessInterface``;
  every entry here is a remote process started by a host agent.
- ``test_slow_adaptive.py::test_startup``, ``test_adaptive``: their
  ``SlowWorker`` reports running before it starts; a remote process counts
  as started only when it reports ready, so ``await cluster`` waits for it
  (``test_scale_up_down`` covers the slow entry that has not arrived).
- ``test_adaptive.py::test_adaptive_local_cluster*``,
  ``test_basic_no_loop``, ``test_scale_needs_to_be_awaited``,
  ``test_task_adaptive_*``: LocalCluster- and in-process-specific.
- ``test_adaptive.py::test_adaptive_config``: tests ``Adaptive`` alone,
  without a cluster.
- ``test_adaptive.py::test_adaptive_scale_down_override``: xfail upstream
  (changed API).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, get_worker
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import is_valid_xml

from speccluster_ssh.cluster import SSHSpecCluster
from speccluster_ssh.errors import StartError
from speccluster_ssh.process import RemoteNanny, RemoteWorker
from sshlab import processes_besides_sshd

pytestmark = pytest.mark.lab

# Small, cheap workers: one thread, a known memory limit, no nanny.
SMALL = {
    "speccluster_nthreads": 1,
    "speccluster_memory_limit": "1 GiB",
    "speccluster_worker_class": "worker",
}
DEADLINE = 60.0


# -- task functions (run on the workers) -------------------------------------------


def _task_functions() -> tuple[Callable[..., Any], ...]:
    """Task functions, made inside a function so that they travel by value.

    The workers cannot import this test module; dask pickles a module-level
    function by reference, and a local one by value.
    """

    def slowinc(x: int, delay: float = 0.1) -> int:
        time.sleep(delay)
        return x + 1

    def where_am_i(_: Any = None, delay: float = 0.0) -> tuple[str, int]:
        time.sleep(delay)
        return str(get_worker().name), os.getpid()

    def mark_and_sleep(path: str, delay: float) -> int:
        with open(path, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(delay)
        return os.getpid()

    return slowinc, where_am_i, mark_and_sleep


slowinc, where_am_i, mark_and_sleep = _task_functions()


# -- helpers -------------------------------------------------------------------------


def run(coro: Any, timeout: float = 240) -> Any:
    """Run one test's coroutine with an outer deadline."""
    try:
        return asyncio.run(asyncio.wait_for(coro, timeout))
    finally:
        # Collect the cluster's garbage now: finalizers that run later, while
        # pytest parses a module it imports, can trip a CPython 3.11 bug
        # ("AST constructor recursion depth mismatch", gh-106905).
        gc.collect()


async def until(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def holds_for(predicate: Callable[[], Any], seconds: float, what: str = "condition") -> None:
    """Check that ``predicate`` holds at every poll for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        await asyncio.sleep(0.05)


def names(cluster: SSHSpecCluster) -> set[str]:
    """Worker names the (head) scheduler knows."""
    return {str(ws.name) for ws in cluster.scheduler.workers.values()}


def host_of(cluster: SSHSpecCluster, key: str) -> str:
    """The inventory host of spec entry ``key``."""
    return str(cluster.worker_spec[key]["options"]["host"])


def lab_host(lab: Any, name: str) -> Any:
    """The lab host called ``name``."""
    return next(h for h in lab.hosts if h.name == name)


def inventory(
    lab: Any,
    tmp_path: Path,
    hosts: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    name: str = "inv.yml",
    **options: Any,
) -> Path:
    """An inventory of lab hosts with small workers; ``hosts`` maps a host to its own vars.

    By default every lab host is a worker host with one slot.
    """
    chosen = dict(hosts) if hosts is not None else {h.name: {} for h in lab.hosts}
    host_vars = {h: {**SMALL, **v} for h, v in chosen.items()}
    options.setdefault("groups", {"workers": list(chosen)})
    return Path(lab.write_inventory(tmp_path / name, host_vars=host_vars, **options))


class Watch(SchedulerPlugin):
    """Records, at the scheduler, when each worker name arrives and leaves."""

    name = "peer-watch"

    def __init__(self) -> None:
        self.added: list[tuple[float, str]] = []
        self.removed: list[tuple[float, str]] = []
        self.removed_by: dict[str, str] = {}  # name -> the stimulus that removed it (one per retire request)
        self.duplicates: list[str] = []
        self.peak = 0
        self._names: dict[str, str] = {}

    def add_worker(self, scheduler: Any, worker: str) -> None:
        name = str(scheduler.workers[worker].name)
        self._names[worker] = name
        self.added.append((time.monotonic(), name))
        current = [str(ws.name) for ws in scheduler.workers.values()]
        if current.count(name) > 1:
            self.duplicates.append(name)
        self.peak = max(self.peak, len(current))

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        name = self._names.get(worker, worker)
        self.removed.append((time.monotonic(), name))
        self.removed_by[name] = str(kwargs.get("stimulus_id"))


@contextlib.asynccontextmanager
async def lab_cluster(lab: Any, path: Path, **options: Any) -> AsyncIterator[tuple[SSHSpecCluster, Watch]]:
    """An asynchronous cluster on the lab, watched for duplicate names, checked clean after."""
    options.setdefault("n_workers", 0)
    options.setdefault("security", False)
    async with SSHSpecCluster(inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, **options) as cluster:
        watch = Watch()
        cluster.scheduler.add_plugin(watch)
        yield cluster, watch
        assert not watch.duplicates, watch.duplicates
        log = "\n".join(line for _, line in cluster.scheduler.get_logs())
        assert "duplicate name" not in log
    await until(lambda: not processes_besides_sshd(lab), 20, "every process on the lab hosts to end")


@contextlib.contextmanager
def captured(logger_name: str, level: int = logging.WARNING) -> Iterator[list[logging.LogRecord]]:
    """Records of ``logger_name`` (and its children) at ``level`` or above."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level)
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# -- test_spec_cluster.py ---------------------------------------------------------------


def test_scale(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_scale."""

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path)) as (cluster, _):
            assert not cluster.workers
            assert not cluster.worker_spec

            cluster.scale(2)  # only the spec changes until we wait
            assert not cluster.workers
            assert len(cluster.worker_spec) == 2

            await cluster
            assert len(cluster.workers) == 2
            # spread placement: one entry per host
            assert len({host_of(cluster, k) for k in cluster.worker_spec}) == 2
            await until(lambda: names(cluster) == set(cluster.worker_spec), what="both workers to register")

            cluster.scale(1)  # lazy: nothing closes yet
            assert len(cluster.workers) == 2
            await cluster
            assert len(cluster.workers) == 1
            await until(lambda: names(cluster) == set(cluster.worker_spec), what="one worker left")

            await cluster.scale(2)
            await cluster
            assert len(cluster.workers) == 2

    run(main())


def test_unexpected_closed_worker(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_unexpected_closed_worker.

    Upstream the entry comes back at the next ``await cluster``; ours comes
    back by itself: nobody calls ``scale`` or awaits the cluster.
    """

    async def main() -> None:
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "200ms"}):
            async with lab_cluster(lab, inventory(lab, tmp_path)) as (cluster, _):
                cluster.scale(2)
                await cluster
                assert len(cluster.workers) == 2
                key = sorted(cluster.workers)[0]
                victim = cluster.workers[key]

                await victim.close()
                await until(lambda: cluster.workers.get(key) is not victim, 10, "the closed entry to leave workers")
                assert len(cluster.worker_spec) == 2  # still wanted

                await until(
                    lambda: len(cluster.workers) == 2
                    and cluster.workers[key] is not victim
                    and names(cluster) == set(cluster.worker_spec),
                    what="the entry to come back",
                )

    run(main())


def test_specification(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_specification: a mixed spec given by the user."""
    spec = {
        "0": {"cls": RemoteWorker, "options": {"host": "h1", "options": {"nthreads": 1}}},
        "1": {"cls": RemoteNanny, "options": {"host": "h2", "options": {"nthreads": 2}}},
        "my-worker": {"cls": "speccluster_ssh.process.RemoteWorker", "options": {"host": "h3", "options": {"nthreads": 3}}},
    }

    async def main() -> None:
        path = inventory(lab, tmp_path)
        # TLS on (the default), as a user would run it.
        async with SSHSpecCluster(inventory=path, known_hosts=str(lab.known_hosts), workers=spec, asynchronous=True) as cluster:
            assert set(cluster.worker_spec) == set(spec)
            assert set(cluster.workers) == set(spec)
            assert isinstance(cluster.workers["0"], RemoteWorker)
            assert isinstance(cluster.workers["1"], RemoteNanny)
            assert isinstance(cluster.workers["my-worker"], RemoteWorker)
            assert cluster.scheduler.address.startswith("tls://")
            await until(lambda: names(cluster) == set(spec), what="every worker to register")
            threads = {str(ws.name): ws.nthreads for ws in cluster.scheduler.workers.values()}
            assert threads == {"0": 1, "1": 2, "my-worker": 3}
            for key, proc in cluster.workers.items():
                assert proc.name == key
                assert proc.host == spec[key]["options"]["host"]

            async with Client(cluster, asynchronous=True) as client:
                assert await client.submit(lambda x: x + 1, 10) == 11
        await until(lambda: not processes_besides_sshd(lab), 20, "every process to end")

    run(main())


def test_spec_sync(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_spec_sync: a mixed spec from the inventory, synchronous API."""
    path = inventory(
        lab,
        tmp_path,
        {"h1": {}, "h2": {"speccluster_worker_class": "nanny", "speccluster_nthreads": 2}},
    )
    with SSHSpecCluster(inventory=path, known_hosts=str(lab.known_hosts), security=False) as cluster:
        assert set(cluster.worker_spec) == {"0", "1"}
        kinds = {host_of(cluster, k): type(cluster.workers[k]) for k in cluster.worker_spec}
        assert kinds == {"h1": RemoteWorker, "h2": RemoteNanny}
        with Client(cluster) as client:
            assert cluster.loop is client.loop
            client.wait_for_workers(2, timeout=DEADLINE)
            info = client.scheduler_info(n_workers=-1)["workers"].values()
            by_name = {str(w["name"]): w["nthreads"] for w in info}
            assert by_name == {k: (2 if host_of(cluster, k) == "h2" else 1) for k in cluster.worker_spec}
            assert client.submit(lambda x: x + 1, 10).result(timeout=DEADLINE) == 11
    gc.collect()  # see run()
    deadline = time.monotonic() + 20
    while processes_besides_sshd(lab) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_besides_sshd(lab)


def test_broken_worker(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_broken_worker.

    Upstream, one broken worker fails the start. Here a start needs
    ``min_workers`` (default 1), so the test asks for both: the start fails,
    naming the broken host and why.
    """
    spec = {
        "good": {"cls": RemoteWorker, "options": {"host": "h1", "options": {"nthreads": 1}}},
        "bad": {"cls": RemoteWorker, "options": {"host": "h2", "options": {"memory_limit": "plenty"}}},
    }

    async def main() -> None:
        path = inventory(lab, tmp_path)
        with pytest.raises(StartError) as info:
            async with SSHSpecCluster(
                inventory=path, known_hosts=str(lab.known_hosts), workers=spec, asynchronous=True, security=False,
                min_workers=2, start_timeout=20, heal=False,  # healing would move "bad" to a free host
            ):
                raise AssertionError("the cluster must not start")
        assert list(info.value.hosts) == ["h2"]
        assert "plenty" in info.value.hosts["h2"]
        await until(lambda: not processes_besides_sshd(lab), 20, "nothing left running")

    run(main())


def test_restart(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_restart (dask issue 3062)."""

    async def main() -> None:
        path = inventory(lab, tmp_path, {"h1": {"speccluster_worker_class": "nanny"}, "h2": {"speccluster_worker_class": "nanny"}})
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "5s"}):
            async with lab_cluster(lab, path) as (cluster, _):
                async with Client(cluster, asynchronous=True) as client:
                    cluster.scale(2)
                    await cluster
                    assert len(cluster.workers) == 2
                    before = {k: dict(p.pids) for k, p in cluster.workers.items()}
                    await client.restart()
                    await until(
                        lambda: len(cluster.workers) == 2 and names(cluster) == {"0", "1"},
                        what="both workers back after restart",
                    )
                    # The nannies restarted their workers; no entry was relaunched.
                    assert {k: dict(p.pids) for k, p in cluster.workers.items()} == before
                    assert await client.submit(slowinc, 1, delay=0) == 2

    run(main())


def test_adaptive_killed_worker(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_adaptive_killed_worker.

    Upstream kills the worker through its Python object; ours is a remote
    process, so it gets SIGKILL by its pid.
    """

    async def main() -> None:
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "100ms"}):
            path = inventory(lab, tmp_path, {"h1": {"speccluster_worker_class": "nanny"}, "h2": {}})
            async with lab_cluster(lab, path) as (cluster, _):
                async with Client(cluster, asynchronous=True) as client:
                    cluster.adapt(minimum=1, maximum=1, interval="200ms")
                    await until(lambda: len(cluster.workers) == 1 and len(names(cluster)) == 1, what="one worker")

                    future = client.submit(where_am_i, delay=1.0, pure=False)
                    [key] = cluster.workers
                    [pid] = cluster.workers[key].pids.values()
                    os.kill(pid, signal.SIGKILL)

                    name, new_pid = await asyncio.wait_for(future, DEADLINE)
                    assert new_pid != pid
                    assert len(cluster.worker_spec) == 1

    run(main())


def test_get_logs(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_logs: cluster, scheduler and per-worker logs, filterable."""

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path)) as (cluster, _):
            cluster.scale(2)
            await cluster
            await until(lambda: names(cluster) == cluster.observed == {"0", "1"}, what="two workers")

            logs = await cluster.get_logs()
            assert {"Cluster", "Scheduler", "0", "1"} <= set(logs)
            assert "Register worker" in logs["Scheduler"]
            for name in ("0", "1"):
                assert "Registered to" in logs[name], logs[name][-2000:]
            assert is_valid_xml("<div>" + logs._repr_html_() + "</div>")

            assert list(await cluster.get_logs(cluster=True, scheduler=False, workers=False)) == ["Cluster"]
            assert list(await cluster.get_logs(cluster=False, scheduler=True, workers=False)) == ["Scheduler"]
            assert list(await cluster.get_logs(cluster=False, scheduler=False, workers=False)) == []
            assert set(await cluster.get_logs(cluster=False, scheduler=False, workers=True)) == {"0", "1"}
            assert set(await cluster.get_logs(cluster=False, scheduler=False, workers=["1"])) == {"1"}
            # Upstream filters by address: that works too.
            address = next(a for a, ws in cluster.scheduler.workers.items() if str(ws.name) == "0")
            assert set(await cluster.get_logs(cluster=False, scheduler=False, workers=[address])) == {"0"}

            # A worker that is gone keeps its log.
            cluster.scale(1)
            await cluster
            gone = "1" if "1" not in cluster.worker_spec else "0"
            logs = await cluster.get_logs(cluster=False, scheduler=False, workers=[gone])
            assert "Registered to" in logs[gone]

    run(main())


def test_MultiWorker(lab: Any, tmp_path: Path) -> None:  # noqa: N802
    """Mirrors test_spec_cluster.py::test_MultiWorker with group entries.

    Our ``scale`` counts dask workers and rounds up to whole entries, where
    upstream's counts entries; the numbers below follow ours.
    """
    path = inventory(
        lab,
        tmp_path,
        {h: {"speccluster_nworkers": 2} for h in ("h1", "h2", "h3")},
    )

    async def main() -> None:
        async with lab_cluster(lab, path) as (cluster, _):
            s = cluster.scheduler
            async with Client(cluster, asynchronous=True) as client:
                cluster.scale(4)
                await cluster
                assert len(cluster.worker_spec) == 2
                await client.wait_for_workers(4)
                assert cluster.plan == names(cluster) == {"0-0", "0-1", "1-0", "1-1"}
                await until(lambda: "workers=4" in repr(cluster), what="repr to count 4 workers")

                cluster.scale(3)  # rounds up: still two entries
                await cluster
                assert len(cluster.worker_spec) == 2

                cluster.scale(1)
                await cluster
                assert len(cluster.worker_spec) == 1
                await until(lambda: len(s.workers) == 2, what="one entry of two workers")

                cluster.scale(memory="3 GiB")  # 1 GiB per worker: 3 workers, so 2 entries
                await cluster
                assert len(cluster.worker_spec) == 2
                await until(lambda: len(s.workers) == 4, what="four workers")
                assert cluster.plan == names(cluster)

                cluster.scale(cores=5)  # 1 thread per worker: 3 entries
                await cluster
                assert len(cluster.workers) == 3
                await until(lambda: len(s.workers) == 6, what="six workers")

                adapt = cluster.adapt(minimum=0, maximum=6, interval="1h", wait_count=3)
                for _ in range(adapt.wait_count):  # relax down to no workers
                    await adapt.adapt()
                await cluster
                await until(lambda: not s.workers, what="adapt to retire every worker")
                assert not cluster.worker_spec

                future = client.submit(lambda x: x + 1, 10)
                await until(lambda: future.key in s.tasks, what="the scheduler to see the task")
                await adapt.adapt()
                assert await asyncio.wait_for(future, DEADLINE) == 11
                await cluster  # an entry joins workers once all of its members are up
                assert len(cluster.workers) == 1
                await until(lambda: names(cluster) == cluster.plan and len(s.workers) == 2, what="one whole group")

    run(main())


# -- test_slow_adaptive.py -----------------------------------------------------------


SLOW_PRELOAD = """
import asyncio

async def dask_setup(worker):
    await asyncio.sleep({delay})
"""


def test_scale_up_down(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_slow_adaptive.py::test_scale_up_down.

    The older entry is the slow one, so dropping "the newest" would be wrong:
    the one that has not arrived must go first.
    """
    preload = tmp_path / "slow_preload.py"
    preload.write_text(SLOW_PRELOAD.format(delay=4))
    path = inventory(
        lab,
        tmp_path,
        {"h1": {"speccluster_worker_options": {"preload": [str(preload)]}}, "h2": {}},
    )

    async def main() -> None:
        async with lab_cluster(lab, path) as (cluster, _):
            cluster.scale(2)
            assert host_of(cluster, "0") == "h1"  # slow
            assert host_of(cluster, "1") == "h2"  # fast
            # As the cluster sees it (its scheduler_info follows the scheduler's).
            await until(lambda: cluster.observed == {"1"}, what="the fast worker to arrive first")

            cluster.scale(1)  # remove a worker: the one that is not there yet
            assert list(cluster.worker_spec) == ["1"]
            await cluster
            await until(lambda: set(cluster.workers) == {"1"}, what="the slow entry to close")
            assert names(cluster) == {"1"}

            cluster.scale(0)
            await cluster
            assert not cluster.worker_spec
            await until(lambda: not names(cluster), what="no workers")

    run(main())


# -- test_adaptive.py ----------------------------------------------------------------


def test_adapt_down(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_adaptive.py::test_adapt_down: a lower maximum removes workers."""

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path)) as (cluster, _):
            async with Client(cluster, asynchronous=True) as client:
                cluster.adapt(interval="200ms", maximum=4)
                futures = client.map(slowinc, range(400), delay=0.1)
                await until(lambda: len(cluster.scheduler.workers) == 4, what="four workers")

                cluster.adapt(maximum=2)
                await until(lambda: len(cluster.scheduler.workers) == 2, what="adapt down to two")
                await holds_for(lambda: len(cluster.scheduler.workers) <= 2, 1.0, "at most two workers")
                del futures

    run(main())


def test_min_max(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_adaptive.py::test_min_max."""

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path)) as (cluster, _):
            adapt = cluster.adapt(minimum=1, maximum=2, interval="200ms", wait_count=10)
            async with Client(cluster, asynchronous=True) as client:
                await until(lambda: len(cluster.scheduler.workers) == 1, what="the minimum of one worker")
                await holds_for(lambda: len(cluster.scheduler.workers) == 1, 1.0, "one idle worker")
                assert [d for _, d in adapt.log] == [{"status": "up", "n": 1}]

                futures = client.map(slowinc, range(100), delay=0.1)
                await until(lambda: len(cluster.scheduler.workers) == 2, what="the maximum of two workers")
                await holds_for(
                    lambda: len(cluster.scheduler.workers) == 2 and len(cluster.worker_spec) == 2,
                    1.0,
                    "two workers, never more",
                )
                assert len(adapt.log) == 2 and all(d["status"] == "up" for _, d in adapt.log)

                del futures
                await until(lambda: len(cluster.scheduler.workers) == 1, what="back to the minimum")
                assert adapt.log[-1][1]["status"] == "down"

    run(main())


def test_avoid_churn(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_adaptive.py::test_avoid_churn: short pauses do not remove workers."""

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path)) as (cluster, watch):
            async with Client(cluster, asynchronous=True) as client:
                adapt = cluster.adapt(interval="200ms", wait_count=5)
                for i in range(8):
                    await client.submit(slowinc, i, delay=0.2)
                    await asyncio.sleep(0.2)  # a pause in the user's work, shorter than wait_count beats
                assert len(adapt.log) == 1
                assert not watch.removed

    run(main())


def test_adapt_quickly(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_adaptive.py::test_adapt_quickly."""

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path)) as (cluster, _):
            async with Client(cluster, asynchronous=True) as client:
                adapt = cluster.adapt(interval="200ms", wait_count=5, maximum=4)
                future = client.submit(slowinc, 1, delay=0.1)
                await future
                assert len(adapt.log) == 1

                # Scale up when there is plenty of work.
                futures = client.map(slowinc, range(1000), delay=0.1)
                await until(lambda: len(adapt.log) > 1, what="adapt to scale up")
                assert adapt.log[1][1]["status"] == "up"
                assert 2 < adapt.log[1][1]["n"] <= adapt.maximum
                await until(lambda: len(cluster.workers) == adapt.maximum, what="the maximum")

                del futures
                await until(lambda: len(cluster.scheduler.tasks) <= 1, what="the work to be forgotten")
                await cluster
                await until(
                    lambda: len(cluster.scheduler.workers) <= 1 and len(cluster.worker_spec) <= 1,
                    what="adapt down to one worker",
                )
                await cluster  # the retired entries are closed

                # No scaling up for a long sequential computation.
                x = await client.scatter(1)
                for _ in range(20):
                    x = client.submit(slowinc, x, delay=0.1)
                await holds_for(
                    lambda: len(cluster.workers) <= 1 and len(cluster.worker_spec) <= 1, 1.0, "a single worker for a chain"
                )
                assert await x == 21

    run(main())


def test_no_more_workers_than_tasks(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_adaptive.py::test_no_more_workers_than_tasks."""

    async def main() -> None:
        with dask.config.set({"distributed.scheduler.default-task-durations": {"slowinc": 1000}}):
            async with lab_cluster(lab, inventory(lab, tmp_path)) as (cluster, watch):
                adapt = cluster.adapt(minimum=0, maximum=4, interval="200ms")
                async with Client(cluster, asynchronous=True) as client:
                    assert await client.submit(slowinc, 1, delay=0.1) == 2
                    assert len(cluster.scheduler.workers) <= 1
                    assert watch.peak <= 1
                    assert all(d["n"] <= 1 for _, d in adapt.log if d["status"] == "up")

    run(main())


def test_worker_keys(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_adaptive.py::test_worker_keys: a worker_key retires whole groups."""
    path = inventory(lab, tmp_path, {"h1": {"speccluster_nworkers": 2}, "h2": {"speccluster_nworkers": 2}})

    async def main() -> None:
        async with lab_cluster(lab, path) as (cluster, _):
            cluster.scale(4)
            await cluster
            await until(lambda: len(cluster.scheduler.workers) == 4, what="four workers")

            def key(ws: Any) -> str:
                return str(ws.name).split("-")[0]

            cluster._adaptive_options = {"worker_key": key}
            adaptive = cluster.adapt(minimum=1, interval="200ms", wait_count=2)
            await adaptive.adapt()
            await until(lambda: len(cluster.scheduler.workers) != 4, what="adapt to retire a group")
            await until(lambda: len(cluster.worker_spec) == 1, what="one entry left")
            await holds_for(lambda: len(cluster.scheduler.workers) == 2, 1.0, "one whole group")
            assert names(cluster) in ({"0-0", "0-1"}, {"1-0", "1-1"})

    run(main())


def test_adapt_cores_memory(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_adaptive.py::test_adapt_cores_memory."""
    path = inventory(
        lab, tmp_path, {"h1": {"speccluster_slots": 8, "speccluster_nthreads": 2, "speccluster_memory_limit": "3 GB"}}
    )

    async def main() -> None:
        async with lab_cluster(lab, path) as (cluster, _):
            try:
                # A long interval: these adapt objects are only inspected.
                adapt = cluster.adapt(minimum_cores=3, maximum_cores=9, interval="1h")
                assert (adapt.minimum, adapt.maximum) == (2, 4)
                adapt = cluster.adapt(minimum_memory="7GB", maximum_memory="20 GB", interval="1h")
                assert (adapt.minimum, adapt.maximum) == (3, 6)
                adapt = cluster.adapt(
                    minimum_cores=1, minimum_memory="7GB", maximum_cores=10, maximum_memory="1 TB", interval="1h"
                )
                assert (adapt.minimum, adapt.maximum) == (3, 5)
                # Never more than the inventory holds.
                adapt = cluster.adapt(maximum_cores=100, interval="1h")
                assert adapt.maximum == cluster.capacity_workers() == 8
            finally:
                cluster._adaptive.stop()
            assert not cluster.worker_spec

    run(main())


def test_scale_cores_memory(lab: Any, tmp_path: Path) -> None:
    """Mirrors test_spec_cluster.py::test_scale_cores_memory."""

    async def main() -> None:
        path = inventory(lab, tmp_path, {"h1": {"speccluster_slots": 2}, "h2": {"speccluster_slots": 2}})
        async with lab_cluster(lab, path) as (cluster, _):
            cluster.scale(cores=2)
            assert len(cluster.worker_spec) == 2
            cluster.scale(memory="3 GiB")  # 1 GiB per worker
            assert len(cluster.worker_spec) == 3
            cluster.scale(cores=1)
            assert len(cluster.worker_spec) == 1
            await cluster
            assert len(cluster.workers) == 1

        # Without a memory limit and before any host was reached, the memory
        # of a worker is unknown: say so instead of filling every slot.
        path = inventory(lab, tmp_path, {"h1": {"speccluster_memory_limit": "auto"}}, name="auto.yml")
        async with lab_cluster(lab, path) as (cluster, _):
            with pytest.raises(ValueError, match="memory"):
                cluster.scale(memory="5GB")
            assert not cluster.worker_spec

    run(main())


# -- the same issue: capacity, adapt with groups, graceful scale-down -------------------


def test_scale_past_capacity(lab: Any, tmp_path: Path) -> None:
    """Scaling past the inventory's capacity scales to capacity and says so once."""
    path = inventory(lab, tmp_path, {"h1": {}, "h2": {}})

    async def main() -> None:
        with captured("speccluster_ssh.cluster") as notes, captured("distributed") as dask_logs, captured("asyncio") as loop_logs:
            async with lab_cluster(lab, path) as (cluster, _):
                cluster.scale(5)
                assert len(cluster.worker_spec) == 2
                assert "capacity" in cluster.capacity_note
                assert cluster.status_report()["capacity_note"] == cluster.capacity_note
                cluster.scale(6)
                cluster.scale(5)
                assert len(cluster.worker_spec) == 2
                await asyncio.wait_for(cluster._correct_state(), DEADLINE)
                assert len(cluster.workers) == 2

                # adapt asked for more than fits: capped, no error on any tick.
                adapt = cluster.adapt(minimum=5, interval="100ms")
                assert adapt.maximum == adapt.minimum == 2
                await holds_for(lambda: len(cluster.worker_spec) == 2, 1.5, "two entries")
                assert adapt.state == "running"
                said = [r for r in notes if "capacity" in r.getMessage()]
                assert len(said) == 1, [r.getMessage() for r in said]
                assert cluster.status_report()["capacity_note"]

                cluster.adapt(minimum=1, maximum=1, interval="100ms")
                cluster.scale(1)
                assert cluster.capacity_note == ""
                assert cluster.status_report()["capacity_note"] == ""
        errors = [r for r in dask_logs + loop_logs if r.levelno >= logging.ERROR or "Adaptive" in r.getMessage()]
        assert not errors, [r.getMessage() for r in errors]

    run(main())


def test_adapt_groups_and_mixed_hosts_without_churn(lab: Any, tmp_path: Path) -> None:
    """adapt() over a group host and single hosts: up once, down once, groups whole."""
    path = inventory(lab, tmp_path, {"h1": {"speccluster_nworkers": 2}, "h2": {}, "h3": {}})

    async def main() -> None:
        async with lab_cluster(lab, path) as (cluster, watch):
            async with Client(cluster, asynchronous=True) as client:
                adapt = cluster.adapt(minimum=0, interval="200ms", wait_count=3)
                assert adapt.maximum == 4
                futures = client.map(slowinc, range(80), delay=0.2)
                await until(lambda: len(cluster.scheduler.workers) == 4, what="all four workers")
                await client.gather(futures)
                del futures
                await until(lambda: not cluster.scheduler.workers and not cluster.worker_spec, what="adapt down to none")
                await holds_for(lambda: not cluster.worker_spec, 1.0, "no worker without work")

            added = [n for _, n in watch.added]
            assert len(added) == len(set(added)) == 4, added  # nobody started twice
            first_removal = min(t for t, _ in watch.removed)
            assert all(t < first_removal for t, _ in watch.added), "a worker started after one was retired"
            # The two members of the group left together, never one alone:
            # removed by the same retire request of adapt.
            group = [n for n in added if "-" in n]
            assert len(group) == 2
            assert watch.removed_by[group[0]] == watch.removed_by[group[1]], watch.removed_by

    run(main())


def test_adapt_dead_group_member_does_not_stall(lab: Any, tmp_path: Path) -> None:
    """A dead member of a group must not stall adapt (dask issue 9102).

    The healer is off, so only adapt can bring the entry back: it must see
    that the entry is no longer fully there.
    """
    path = inventory(lab, tmp_path, {"h1": {"speccluster_nworkers": 2}})

    async def main() -> None:
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "200ms"}):
            async with lab_cluster(lab, path, heal=False) as (cluster, _):
                cluster.adapt(minimum=2, maximum=2, interval="200ms")
                await until(lambda: names(cluster) == {"0-0", "0-1"} and "0" in cluster.workers, what="the group")
                old = dict(cluster.workers["0"].pids)
                os.kill(old["0-1"], signal.SIGKILL)
                await until(lambda: "0-1" not in names(cluster), 10, "the member to be gone")
                await until(
                    lambda: names(cluster) == {"0-0", "0-1"} and "0" in cluster.workers
                    and cluster.workers["0"].pids.get("0-1") not in (None, old["0-1"]),
                    what="adapt to bring the group back",
                )

    run(main())


def test_adapt_twice_keeps_running_work(lab: Any, tmp_path: Path) -> None:
    """Calling adapt() again (and again) must not kill work that is running."""
    marks = tmp_path / "marks"
    marks.mkdir()

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path, {"h1": {}, "h2": {}})) as (cluster, watch):
            async with Client(cluster, asynchronous=True) as client:
                cluster.scale(2)
                await cluster
                await client.wait_for_workers(2)
                # One long task pinned to each worker: a retired worker would leave its task stuck.
                futures = [
                    client.submit(
                        mark_and_sleep, str(marks / name), 4.0, workers=[name], allow_other_workers=False, pure=False
                    )
                    for name in ("0", "1")
                ]
                await until(lambda: len(list(marks.iterdir())) == 2, what="both tasks to start")
                cluster.adapt(minimum=0, maximum=2, interval="200ms", wait_count=3)
                cluster.adapt(minimum=0, maximum=2, interval="200ms", wait_count=3)
                cluster.adapt()
                pids = await asyncio.wait_for(client.gather(futures), DEADLINE)
                assert not watch.removed  # nobody was retired while working
                for name, pid in zip(("0", "1"), pids):
                    assert (marks / name).read_text().split() == [str(pid)]  # each ran once

    run(main())


def test_graceful_scale_down_keeps_results(lab: Any, tmp_path: Path) -> None:
    """A result held only by a worker that scale-down removes is still there afterwards."""

    async def main() -> None:
        async with lab_cluster(lab, inventory(lab, tmp_path, {"h1": {}, "h2": {}})) as (cluster, _):
            async with Client(cluster, asynchronous=True) as client:
                cluster.scale(2)
                await cluster
                await client.wait_for_workers(2)
                # Pinned to worker "1" with no way to run elsewhere: a recompute would hang.
                future = client.submit(where_am_i, workers=["1"], allow_other_workers=False, pure=False)
                first = await future
                assert first[0] == "1"

                await cluster.scale_down(["1"])
                assert names(cluster) == {"0"}
                assert await asyncio.wait_for(future, 30) == first
                ts = cluster.scheduler.tasks[future.key]
                assert {str(ws.name) for ws in ts.who_has} == {"0"}

    run(main())


# -- the reconciler heals without being asked ----------------------------------------


def test_heal_relaunches_killed_workers(lab: Any, tmp_path: Path) -> None:
    """A worker process (single or group member) that dies is relaunched (how fast: bench's ops-4x2)."""
    path = inventory(lab, tmp_path, {"h1": {"speccluster_worker_class": "nanny"}, "h2": {"speccluster_nworkers": 2}})

    async def main() -> None:
        async with lab_cluster(lab, path) as (cluster, _):
            cluster.scale(3)
            await cluster
            await until(lambda: names(cluster) == {"0", "1-0", "1-1"}, what="three workers")
            for key, member in (("0", "0"), ("1", "1-1")):
                victim = cluster.workers[key]
                pid = victim.pids[member]
                os.kill(pid, signal.SIGKILL)
                await until(
                    lambda: cluster.workers.get(key) not in (None, victim)
                    and names(cluster) == {"0", "1-0", "1-1"},
                    DEADLINE,
                    f"entry {key} to be relaunched",
                )
                assert pid not in cluster.workers[key].pids.values()
                assert len(cluster.worker_spec) == 2

    run(main())


def test_heal_lost_host(lab: Any, tmp_path: Path) -> None:
    """A lost host is marked down, its entries move, it is retried with backoff and used again."""
    path = inventory(lab, tmp_path, {"h1": {}, "h2": {}, "h3": {}})
    h2 = lab_host(lab, "h2")

    async def main() -> None:
        async with lab_cluster(lab, path, silence=3) as (cluster, _):
            cluster.scale(2)
            await cluster
            assert {host_of(cluster, k) for k in cluster.worker_spec} == {"h1", "h2"}
            [moved] = [k for k in cluster.worker_spec if host_of(cluster, k) == "h2"]
            await until(lambda: len(names(cluster)) == 2, what="two workers")

            h2.kill_all()
            try:
                state = cluster.pool.states["h2"]
                await until(lambda: state.state == "down", 20, "h2 to be marked down")
                assert state.reason
                await until(
                    lambda: host_of(cluster, moved) == "h3" and names(cluster) == set(cluster.worker_spec),
                    what="the entry to move to h3",
                )
                # Retried with backoff: a few attempts, not one per healing pass.
                await until(lambda: len(state.failures) >= 3, 20, "h2 to be retried")
                assert len(state.failures) <= 5, state.as_dict()
                # The first failure is the loss; the backoff starts at 1 s and
                # doubles, so retry k starts no sooner than 2**k - 1 s after it.
                # Without backoff each retry's end wakes the healer for the next:
                # failures milliseconds apart (and ten kept of many).
                times = [t for t, _ in state.failures]
                assert all(t - times[0] >= 2**k - 1 - 0.1 for k, t in enumerate(times)), state.as_dict()
            finally:
                h2.restart_sshd()
            await until(lambda: cluster.pool.states["h2"].state == "up", DEADLINE, "h2 to answer again")

            cluster.scale(3)  # the free slot is h2's again
            [new] = [k for k in cluster.worker_spec if host_of(cluster, k) == "h2"]
            await cluster
            await until(lambda: names(cluster) == set(cluster.worker_spec), what="three workers")
            assert len(cluster.worker_spec) == 3
            assert h2.ip in str(cluster.workers[new].worker_address)

            # Lost again, now with no free slot anywhere: the entry waits for its host.
            h2.kill_all()
            try:
                await until(lambda: cluster.pool.states["h2"].state == "down", 20, "h2 to be marked down again")
                await until(lambda: new not in cluster.workers, 20, "the entry on h2 to stop")
                await holds_for(lambda: host_of(cluster, new) == "h2", 1.0, "the entry to stay on h2")
            finally:
                h2.restart_sshd()
            await until(lambda: cluster.pool.states["h2"].state == "up", DEADLINE, "h2 to answer once more")
            await until(
                lambda: new in cluster.workers and names(cluster) == set(cluster.worker_spec),
                what="the entry to start on h2 again",
            )
            assert h2.ip in str(cluster.workers[new].worker_address)
            assert all(s.state == "up" for s in cluster.pool.states.values())

    run(main())


def test_heal_cut_host_without_duplicate_names(lab: Any, tmp_path: Path) -> None:
    """A host cut off from the network: its entry moves, and its name is not left taken.

    The scheduler cannot hear that the cut host's worker died, so it would
    keep the name and refuse the relaunched entry.
    """
    path = inventory(lab, tmp_path, {"h1": {}, "h2": {}, "h3": {}})
    h2 = lab_host(lab, "h2")

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=2, silence=3) as (cluster, watch):
            [moved] = [k for k in cluster.worker_spec if host_of(cluster, k) == "h2"]
            await until(lambda: names(cluster) == set(cluster.worker_spec), what="two workers")
            h2.cut()
            try:
                await until(lambda: cluster.pool.states["h2"].state == "down", 20, "h2 to be marked down")
                await until(
                    lambda: host_of(cluster, moved) == "h3"
                    and names(cluster) == set(cluster.worker_spec)
                    and any(ws.host == lab_host(lab, "h3").ip for ws in cluster.scheduler.workers.values()),
                    what="the entry to run on h3",
                )
                assert len(cluster.scheduler.workers) == 2
                assert all(s.state != "aside" for s in cluster.pool.states.values()), cluster.status_report()["hosts"]
            finally:
                h2.heal()
            await until(lambda: cluster.pool.states["h2"].state == "up", DEADLINE, "h2 to answer again")
            assert names(cluster) == set(cluster.worker_spec)

    run(main())


def test_heal_puts_failing_host_aside(lab: Any, tmp_path: Path) -> None:
    """A host that fails to start workers again and again is put aside, and the reason kept."""
    path = inventory(
        lab,
        tmp_path,
        {"h1": {}, "h2": {"speccluster_worker_options": {"memory_limit": "plenty"}}, "h3": {}},
    )

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=1) as (cluster, _):
            assert host_of(cluster, "0") == "h1"
            cluster.scale(2)  # the next slot is h2's, where workers cannot start
            assert host_of(cluster, "1") == "h2"
            state = cluster.pool.states["h2"]
            await until(lambda: state.state == "aside", DEADLINE, "h2 to be put aside")
            assert "failed to start" in state.reason and "plenty" in state.reason
            assert cluster.status_report()["hosts"]["h2"]["state"] == "aside"
            assert len(state.failures) >= 3
            # Its entry went to the host with a free slot.
            await until(lambda: host_of(cluster, "1") == "h3" and names(cluster) == {"0", "1"}, what="the entry on h3")
            assert cluster.pool.states["h1"].state == cluster.pool.states["h3"].state == "up"

    # Failures are handled, never raised out of a background task.
    with captured("tornado") as tornado_logs, captured("asyncio") as loop_logs:
        run(main())
    errors = [r for r in tornado_logs + loop_logs if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# -- heterogeneous inventories -------------------------------------------------------


def test_heterogeneous_inventory(lab: Any, tmp_path: Path) -> None:
    """A gpu group with resources and its own threads and memory gets its own entries."""
    path = Path(
        lab.write_inventory(
            tmp_path / "inv.yml",
            groups={"workers": ["h1", "h2", "h3"], "cpu": ["h1", "h2"], "gpu": ["h3"]},
            group_vars={
                "workers": {"speccluster_worker_class": "worker"},
                "cpu": {"speccluster_nthreads": 1, "speccluster_memory_limit": "1 GiB"},
                "gpu": {
                    "speccluster_nthreads": 2,
                    "speccluster_memory_limit": "2 GiB",
                    "speccluster_resources": {"GPU": 1},
                },
            },
        )
    )

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=None) as (cluster, _):
            assert len(cluster.worker_spec) == 3
            by_host = {host_of(cluster, k): (k, spec) for k, spec in cluster.worker_spec.items()}
            assert set(by_host) == {"h1", "h2", "h3"}
            for host, (key, spec) in by_host.items():
                assert spec["cls"] is RemoteWorker
                inner = spec["options"]["options"]
                if host == "h3":
                    assert inner["nthreads"] == 2
                    assert inner["memory_limit"] == 2 * 2**30
                    assert inner["resources"] == {"GPU": 1}
                else:
                    assert inner["nthreads"] == 1
                    assert inner["memory_limit"] == 2**30
                    assert "resources" not in inner
            await until(lambda: names(cluster) == set(cluster.worker_spec), what="three workers")
            seen = {str(ws.name): ws for ws in cluster.scheduler.workers.values()}
            gpu_key = by_host["h3"][0]
            assert seen[gpu_key].resources == {"GPU": 1}
            assert seen[gpu_key].nthreads == 2
            assert seen[gpu_key].memory_limit == 2 * 2**30

            async with Client(cluster, asynchronous=True) as client:
                name, _ = await client.submit(where_am_i, resources={"GPU": 1}, pure=False)
                assert name == gpu_key

            report = {w["name"]: w for w in cluster.status_report()["workers"]}
            assert report[gpu_key]["host"] == "h3"
            assert report[gpu_key]["threads"] == 2

    run(main())
