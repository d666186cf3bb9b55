"""GPU pinning (issue 12, item 5): ``speccluster_gpus`` shares a host's GPUs evenly among its workers.

These machines have no GPU, so the tests that need ``nvidia-smi`` put a
stand-in script first on the host's PATH (through ``speccluster_prologue``)
that lists 4 devices the way ``nvidia-smi -L`` does. The share arithmetic
and the inventory checks are pure and run without a lab.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from speccluster_ssh.agent import HostAgent
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.placement import free_gpu_slot, gpu_share, slot_gpus, uneven_gpus
from speccluster_ssh.errors import HostError
from speccluster_ssh.inventory import Inventory, InventoryError
from speccluster_ssh.planning import build_plan
from speccluster_ssh.process import AgentPool

# What `nvidia-smi -L` prints on a machine with four GPUs (UUIDs made up).
STAND_IN = """#!/bin/sh
# A stand-in for nvidia-smi: the test machines have no GPU.
[ "$1" = "-L" ] || exit 9
for i in $(seq 0 $(( ${FAKE_GPU_COUNT:-4} - 1 ))); do
  echo "GPU $i: NVIDIA Stand-in T4 (UUID: GPU-00000000-0000-0000-0000-00000000000$i)"
done
"""


def stand_in_bin(directory: Path, count: int = 4) -> Path:
    """A directory holding a stand-in ``nvidia-smi`` listing ``count`` devices."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(STAND_IN.replace("${FAKE_GPU_COUNT:-4}", str(count)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def host(**variables: Any) -> Any:
    spec = {"name": "g1", "ansible_connection": "local", "speccluster_python": sys.executable, **variables}
    return Inventory.from_hosts([spec]).hosts["g1"]


# -- arithmetic ---------------------------------------------------------------------------------------


@given(st.integers(1, 8), st.integers(0, 4))
def test_shares_are_disjoint_equal_and_cover_every_device(workers: int, per: int) -> None:
    devices = [f"d{i}" for i in range(workers * per)]
    shares = [gpu_share(devices, workers, i) for i in range(workers)]
    assert all(len(s) == per for s in shares)
    assert sorted(d for s in shares for d in s) == sorted(devices)


def test_uneven_shares_are_refused() -> None:
    with pytest.raises(ValueError, match="3 GPUs do not divide evenly among 2 workers"):
        gpu_share(["0", "1", "2"], 2, 0)
    with pytest.raises(ValueError):
        gpu_share(["0", "1"], 2, 2)
    assert gpu_share(["0", "1", "2", "3"], 2, 1) == ["2", "3"]
    assert free_gpu_slot({0, 2}, 3) == 1
    assert free_gpu_slot({0, 1}, 2) is None


# -- the inventory ------------------------------------------------------------------------------------


def test_gpus_as_count_list_or_auto() -> None:
    assert host().gpus == ()
    assert host(speccluster_gpus=4, speccluster_nworkers=2).gpus == ("0", "1", "2", "3")
    assert host(speccluster_gpus="2").gpus == ("0", "1")
    assert host(speccluster_gpus=[3, "GPU-abc"], speccluster_nworkers=2).gpus == ("3", "GPU-abc")
    assert host(speccluster_gpus="auto").gpus == "auto"


@pytest.mark.parametrize(
    "variables",
    [
        {"speccluster_gpus": 3, "speccluster_nworkers": 2},
        {"speccluster_gpus": [0, 1, 2], "speccluster_slots": 2},
        {"speccluster_gpus": 4, "speccluster_slots": 3},
    ],
)
def test_gpus_that_do_not_divide_evenly_are_one_line_naming_host_and_variable(variables: dict[str, Any]) -> None:
    with pytest.raises(InventoryError) as info:
        host(**variables)
    message = str(info.value)
    assert "speccluster_gpus on host g1" in message and "do not divide evenly" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("bad", [-1, "some", [0, 0], ["a,b"], [True], {"a": 1}])
def test_bad_gpus_values_are_refused(bad: Any) -> None:
    with pytest.raises(InventoryError, match="speccluster_gpus on host g1 must be 'auto', a number of GPUs"):
        host(speccluster_gpus=bad)


def test_plan_shows_each_workers_devices() -> None:
    inv = Inventory.from_hosts([
        {"name": "g1", "ansible_connection": "local", "speccluster_gpus": 4, "speccluster_nworkers": 2},
        {"name": "g2", "ansible_connection": "local", "speccluster_gpus": [5, 7], "speccluster_slots": 2},
        {"name": "g3", "ansible_connection": "local", "speccluster_gpus": "auto"},
        {"name": "c1", "ansible_connection": "local"},
    ])
    plan = build_plan(inv, name="p", workers=None, placement="spread", tls=False)
    entries = {e["entry"]: (h["host"], e["gpus"]) for h in plan["hosts"] for e in h["entries"]}
    by_host = {h: g for h, g in entries.values() if h != "g2"}
    assert list(by_host["g1"].values()) == [["0", "1"], ["2", "3"]]
    assert by_host["g3"] == "auto"
    assert by_host["c1"] is None
    g2 = [g for h, g in entries.values() if h == "g2"]
    assert sorted(d for g in g2 for ds in g.values() for d in ds) == ["5", "7"]
    assert slot_gpus(inv.hosts["g1"].gpus, inv.hosts["g1"], 0, 2) == [["0", "1"], ["2", "3"]]


def test_plan_shows_the_gpu_slot_each_auto_entry_holds(tmp_path: Path) -> None:
    """With ``auto`` the devices are known only at start; the slot, which decides their share, is known now."""
    from click.testing import CliRunner

    from speccluster_ssh.cli import main

    path = tmp_path / "auto.yml"
    path.write_text('{"all": {"hosts": {"g": {"ansible_connection": "local", "speccluster_gpus": "auto", '
                    '"speccluster_slots": 2}}}}')
    plan = build_plan(Inventory.from_hosts([{"name": "g", "ansible_connection": "local", "speccluster_gpus": "auto",
                                             "speccluster_slots": 2}]), name="p", workers=None, placement="spread",
                      tls=False)
    assert [(e["gpus"], e["gpu_slot"]) for e in plan["hosts"][0]["entries"]] == [("auto", 0), ("auto", 1)]
    text = CliRunner().invoke(main, ["plan", str(path)]).stdout
    assert "gpus: GPU slot 1's share of those nvidia-smi -L lists on the host at start" in text, text


def test_auto_gpus_that_do_not_divide_are_a_host_error_with_a_fix() -> None:
    spec = host(speccluster_gpus="auto", speccluster_nworkers=2)
    pool = AgentPool("gpu-test", {"g1": spec})
    reason, fix = pool._gpu_problem("g1", {"gpus": ["0", "1", "2"]}) or ("", "")
    assert "nvidia-smi -L lists 3 GPUs" in reason and "2 workers" in reason, reason
    assert "speccluster_gpus" in fix and "g1" in fix, fix
    assert pool._gpu_problem("g1", {"gpus": ["0", "1"]}) is None
    assert pool._gpu_problem("g1", {"gpus": []}) is None  # no GPU found: no share, no error
    assert uneven_gpus(3, spec)


def test_agent_detects_gpus_with_nvidia_smi_on_its_path(tmp_path: Path) -> None:
    """The agent runs ``nvidia-smi -L`` (here the stand-in, first on PATH through the prologue)."""
    bin_dir = stand_in_bin(tmp_path / "bin")
    spec = host(speccluster_gpus="auto", speccluster_prologue=f"PATH={bin_dir}:$PATH; export PATH")

    async def main() -> None:
        agent = HostAgent(HostConnection(spec, ConnectSettings()), "gpu-detect", base_dir=str(tmp_path / "base"))
        facts = await agent.start(timeout=30)
        try:
            assert facts["gpus"] == ["0", "1", "2", "3"], facts
        finally:
            await agent.close()
        plain = HostAgent(HostConnection(host(), ConnectSettings()), "gpu-none", base_dir=str(tmp_path / "base"))
        facts = await plain.start(timeout=30)
        await plain.close()
        assert "gpus" not in facts  # only hosts with speccluster_gpus: auto run nvidia-smi

    asyncio.run(main())


# -- on the lab ---------------------------------------------------------------------------------------


@pytest.mark.lab
def test_two_workers_share_four_stand_in_gpus(lab: Any, tmp_path: Path) -> None:
    """``auto`` on a host whose (stand-in) nvidia-smi lists 4 devices, 2 workers: ``0,1`` and ``2,3``, GPU 2 each."""
    from distributed import Client

    from test_peer import inventory, lab_cluster, run

    bin_dir = stand_in_bin(tmp_path / "bin")
    gpu_host = lab.hosts[0]
    path = inventory(lab, tmp_path, {gpu_host.name: {
        "speccluster_gpus": "auto",
        "speccluster_nworkers": 2,
        "speccluster_resources": {"FPGA": 1},
        # Stand-in first on PATH, for the agent only: the machine's /usr/bin is not touched.
        "speccluster_prologue": f"PATH={bin_dir}:$PATH; export PATH",
    }})

    def visible(dask_worker: Any) -> tuple[str, str, dict[str, float]]:
        return str(dask_worker.name), os.environ.get("CUDA_VISIBLE_DEVICES", ""), dict(dask_worker.state.total_resources)

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=2) as (cluster, _):
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(2, timeout=60)
                seen = sorted((await client.run(visible)).values())
                rows = {w["name"]: w["gpus"] for w in cluster.status_report()["workers"]}
                # A task that needs 2 GPUs runs; one that needs 3 could never be placed.
                assert await client.submit(lambda: 1, resources={"GPU": 2}, pure=False) == 1
        assert [devices for _, devices, _ in seen] == ["0,1", "2,3"], seen
        assert all(resources == {"GPU": 2.0, "FPGA": 1.0} for _, _, resources in seen), seen
        assert sorted(",".join(d) for d in rows.values()) == ["0,1", "2,3"], rows

    run(main())


def test_auto_gpus_found_uneven_on_the_host_fail_its_agent_with_the_fix(tmp_path: Path) -> None:
    """3 (stand-in) GPUs for 2 workers: the host's agent start fails once, saying what to set."""
    bin_dir = stand_in_bin(tmp_path / "bin3", count=3)
    spec = host(speccluster_gpus="auto", speccluster_nworkers=2, speccluster_prologue=f"PATH={bin_dir}:$PATH; export PATH")

    async def main() -> None:
        pool = AgentPool("gpu-uneven", {"g1": spec}, base_dir=str(tmp_path / "base"))
        try:
            with pytest.raises(HostError) as info:
                await pool.agent("g1")
        finally:
            await pool.close()
        state = pool.states["g1"].as_dict()
        assert "nvidia-smi -L lists 3 GPUs" in str(info.value), info.value
        assert "speccluster_gpus" in state.get("fix", ""), state

    asyncio.run(main())
