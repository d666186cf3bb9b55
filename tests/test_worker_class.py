"""``speccluster_worker_class``: nanny, worker, or any class by import path (issue 21, point 10).

The classes come from ``tests/standin_workers.py``, copied to a directory
that the hosts find through ``PYTHONPATH`` in ``speccluster_env``; nothing
needs a GPU (the GPU test uses the stand-in ``nvidia-smi`` of test_gpus.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh.agent import HostAgent
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.entries import EntrySettings, worker_entry
from speccluster_ssh.errors import HostError
from speccluster_ssh.inventory import Inventory, InventoryError, load_inventory
from speccluster_ssh.planning import build_plan
from test_cli_lab import cli  # noqa: F401  (the fixture of the lab test below)

STANDIN = Path(__file__).with_name("standin_workers.py")


def standin_dir(tmp_path: Path) -> Path:
    """A directory holding only a copy of the stand-in module, for the hosts' PYTHONPATH."""
    directory = tmp_path / "pythonpath"
    directory.mkdir(exist_ok=True)
    shutil.copy(STANDIN, directory / STANDIN.name)
    return directory


def local_host(**variables: Any) -> Any:
    spec = {"name": "c1", "ansible_connection": "local", "speccluster_python": sys.executable, **variables}
    return Inventory.from_hosts([spec]).hosts["c1"]


# -- the inventory ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, stored",
    [
        ("nanny", "nanny"),
        ("Worker", "worker"),
        ("dask_cuda.CUDAWorker", "dask_cuda.CUDAWorker"),
        (" mypkg.sub.MyWorker ", "mypkg.sub.MyWorker"),
    ],
)
def test_worker_class_is_nanny_worker_or_an_import_path(value: str, stored: str) -> None:
    host = local_host(speccluster_worker_class=value)
    assert host.worker_class == stored
    assert host.worker_class_path == (None if stored in ("nanny", "worker") else stored)


@pytest.mark.parametrize("bad", ["MyWorker", "my-pkg.MyWorker", "mypkg.", ".MyWorker", "mypkg.class.W", "a b.C", "3"])
def test_a_bad_worker_class_names_file_line_host_and_fix(bad: str, tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    path.write_text(textwrap.dedent(f"""\
        all:
          hosts:
            h2:
              speccluster_worker_class: "{bad}"
        """))
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: "), message
    assert "speccluster_worker_class on host h2 must be 'nanny', 'worker' or the import path of a class" in message
    assert "dask_cuda.CUDAWorker" in message and "\n" not in message, message


def test_entry_and_plan_carry_the_class_path() -> None:
    host = local_host(speccluster_worker_class="standin_workers.MarkedNanny", speccluster_nworkers=2)
    spec = worker_entry(EntrySettings("c-1", 60.0), host)
    assert spec["cls"] == "worker" and spec["options"]["worker_class"] == "standin_workers.MarkedNanny"
    assert "worker_class" not in worker_entry(EntrySettings("c-1", 60.0), local_host())["options"]
    inv = Inventory.from_hosts([{"name": "c1", "ansible_connection": "local",
                                 "speccluster_worker_class": "dask_cuda.CUDAWorker"}])
    plan = build_plan(inv, name="p", workers=None, placement="spread", tls=False)
    assert [e["class"] for h in plan["hosts"] for e in h["entries"]] == ["dask_cuda.CUDAWorker"]


def test_a_scheduler_host_without_workers_does_not_need_the_class(tmp_path: Path) -> None:
    path = tmp_path / "inv.ini"
    path.write_text("[scheduler]\ns1\n[workers]\ng1\ng2\n[all:vars]\nspeccluster_worker_class=dask_cuda.CUDAWorker\n")
    inv = load_inventory(path)
    assert inv.scheduler_host is not None and inv.scheduler_host.worker_class_path is None
    assert [h.worker_class_path for h in inv.worker_hosts] == ["dask_cuda.CUDAWorker"] * 2
    both = tmp_path / "both.ini"
    both.write_text("[scheduler]\ns1\n[workers]\ns1\n[all:vars]\nspeccluster_worker_class=dask_cuda.CUDAWorker\n")
    assert load_inventory(both).scheduler_host.worker_class_path == "dask_cuda.CUDAWorker"  # it runs workers too


# -- the agent imports the class when it starts ------------------------------------------------------


def _start_agent(tmp_path: Path, worker_class: str, env: dict[str, str]) -> dict[str, Any]:
    spec = local_host(speccluster_worker_class=worker_class, speccluster_env=env)

    async def main() -> dict[str, Any]:
        agent = HostAgent(HostConnection(spec, ConnectSettings()), "class-test", base_dir=str(tmp_path / "base"))
        try:
            return await agent.start(timeout=30)
        finally:
            await agent.close()

    return asyncio.run(main())


def test_the_agent_imports_the_class_from_the_pythonpath_of_speccluster_env(tmp_path: Path) -> None:
    env = {"PYTHONPATH": f"/nonexistent{os.pathsep}{standin_dir(tmp_path)}"}
    assert _start_agent(tmp_path, "standin_workers.MarkedNanny", env)["worker_class_kind"] == "nanny"
    assert _start_agent(tmp_path, "standin_workers.MarkedWorker", env)["worker_class_kind"] == "worker"
    assert _start_agent(tmp_path, "standin_workers.StandInCUDAWorker", env)["worker_class_kind"] == "server"


@pytest.mark.parametrize(
    "worker_class, cause",
    [
        ("mypkg.MyWorker", "ModuleNotFoundError: No module named 'mypkg'"),
        ("standin_workers.Missing", "AttributeError: module 'standin_workers' has no attribute 'Missing'"),
        ("standin_workers.not_a_class", "TypeError: standin_workers.not_a_class is a function, not a class"),
    ],
)
def test_a_class_the_host_cannot_import_is_a_host_error_with_the_fix(
    worker_class: str, cause: str, tmp_path: Path
) -> None:
    with pytest.raises(HostError) as info:
        _start_agent(tmp_path, worker_class, {"PYTHONPATH": str(standin_dir(tmp_path))})
    assert str(info.value) == f"host c1: speccluster_worker_class {worker_class!r} cannot be imported there: {cause}"
    assert info.value.fix == f"install it in the host's python ({sys.executable}) or fix the inventory"


# -- how the host starts such a class -----------------------------------------------------------------


def test_a_server_class_gets_text_resources_and_must_make_one_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like dask_cuda.CUDAWorker: ``GPU=1,FPGA=2`` resources, and two visible GPUs for one worker is an error."""
    from speccluster_ssh.agent import child

    monkeypatch.syspath_prepend(str(standin_dir(tmp_path)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    options: dict[str, Any] = {"name": "w-0", "resources": {"GPU": 1, "FPGA": 2.0}, "nthreads": 1}
    server = child._start_worker_class("standin_workers.StandInCUDAWorker", "tcp://127.0.0.1:1", options)
    assert [n.name for n in server.nannies] == ["w-0"]
    assert options["resources"] == "GPU=1,FPGA=2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match=r"made 2 dask workers for worker w-0 .*visible GPU: 0,1.*speccluster_gpus"):
        child._start_worker_class("standin_workers.StandInCUDAWorker", "tcp://127.0.0.1:1", {"name": "w-0"})


# -- on the lab ------------------------------------------------------------------------------------------


@pytest.mark.lab
def test_workers_of_classes_given_by_path_are_those_classes(lab: Any, tmp_path: Path) -> None:
    """A Nanny subclass runs as the nanny of a plain worker; a Worker subclass runs bare."""
    from distributed import Client

    from standin_workers import MARK
    from test_peer import inventory, lab_cluster, run

    env = {"PYTHONPATH": str(standin_dir(tmp_path))}
    first, second = lab.hosts[0].name, lab.hosts[1].name
    path = inventory(lab, tmp_path, {
        first: {"speccluster_worker_class": "standin_workers.MarkedNanny", "speccluster_env": env},
        second: {"speccluster_worker_class": "standin_workers.MarkedWorker", "speccluster_env": env},
    })

    def kind(dask_worker: Any) -> tuple[str, str]:
        return type(dask_worker).__name__, os.environ.get(MARK, "")

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=2) as (cluster, _):
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(2, timeout=60)
                workers = await client.run(kind)
                with_nanny = [ws.address for ws in cluster.scheduler.workers.values() if ws.nanny]
                nannies = await client.run(kind, workers=with_nanny, nanny=True)
                assert await client.submit(lambda: 41 + 1, pure=False) == 42
        assert sorted(workers.values()) == [("MarkedWorker", "MarkedWorker"), ("Worker", "MarkedNanny")], workers
        assert [name for name, _ in nannies.values()] == ["MarkedNanny"], nannies

    run(main())


@pytest.mark.lab
def test_gpu_pinning_and_resources_with_a_cuda_worker_like_class(lab: Any, tmp_path: Path) -> None:
    """speccluster_gpus auto (a stand-in nvidia-smi lists 2), 2 workers: one GPU each, under their own names."""
    from distributed import Client

    from standin_workers import MARK
    from test_gpus import stand_in_bin
    from test_peer import inventory, lab_cluster, run

    bin_dir = stand_in_bin(tmp_path / "bin", count=2)
    gpu_host = lab.hosts[0].name
    path = inventory(lab, tmp_path, {gpu_host: {
        "speccluster_worker_class": "standin_workers.StandInCUDAWorker",
        "speccluster_env": {"PYTHONPATH": str(standin_dir(tmp_path))},
        "speccluster_gpus": "auto",
        "speccluster_nworkers": 2,
        "speccluster_resources": {"FPGA": 1},
        "speccluster_prologue": f"PATH={bin_dir}:$PATH; export PATH",
    }})

    def seen(dask_worker: Any) -> tuple[str, str, dict[str, float], str]:
        return (str(dask_worker.name), os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                dict(dask_worker.state.total_resources), os.environ.get(MARK, ""))

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=2) as (cluster, _):
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(2, timeout=60)
                rows = sorted((await client.run(seen)).values())
                planned = sorted(name for proc in cluster.workers.values() for name in proc.member_names)
                assert await client.submit(lambda: 1, resources={"GPU": 1}, pure=False) == 1
        assert [name for name, *_ in rows] == planned, (rows, planned)
        assert [(devices, resources, mark) for _, devices, resources, mark in rows] == [
            ("0", {"GPU": 1.0, "FPGA": 1.0}, "StandInCUDAWorker"),
            ("1", {"GPU": 1.0, "FPGA": 1.0}, "StandInCUDAWorker"),
        ], rows

    run(main())


@pytest.mark.lab
def test_a_class_missing_on_the_host_is_one_line_in_check_and_up(lab: Any, tmp_path: Path, cli: Any) -> None:
    """check and up name the host, the class, the cause and the fix; nothing stays behind."""
    from test_cli_lab import assert_lab_clean, write_inventory

    host = lab.hosts[0].name
    path = write_inventory(lab, tmp_path / "missing.yml", [host],
                           host_vars={host: {"speccluster_worker_class": "mypkg.MyWorker"}})
    line = (f"speccluster_worker_class 'mypkg.MyWorker' cannot be imported there: ModuleNotFoundError: "
            f"No module named 'mypkg'")
    fix = f"install it in the host's python ({sys.executable}) or fix the inventory"
    checked = cli.run("check", str(path), "--timeout", "20", "--json")
    assert checked.returncode == 1, (checked.stdout, checked.stderr)
    problems = [p for row in json.loads(checked.stdout)["hosts"] for p in row["problems"]]
    assert any(line in p for p in problems), problems
    started = cli.run("up", str(path), "--detach", "--name", "wc", "--timeout", "60", timeout=150)
    assert started.returncode != 0, (started.stdout, started.stderr)
    output = started.stdout + started.stderr
    assert f"{host}: " in output and line in output and fix in output, output
    assert "Traceback" not in output, output
    assert_lab_clean(lab)

