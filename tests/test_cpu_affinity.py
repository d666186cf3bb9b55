"""``speccluster_cpu_affinity``: a host's dask processes pinned to a CPU list.

The list is checked when the inventory is read; it travels with every start
request of the host (its table row says ``request``), and the agent pins the
process it starts before the dask server makes a thread or forks a worker.
A CPU the host does not have is one line at start: what, where, the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh import entries
from speccluster_ssh.agent.child import _cpu_ranges, _pin_to_cpus
from speccluster_ssh.entries import EntrySettings
from speccluster_ssh.inventory import Inventory, InventoryError, load_inventory

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux only")


def host(**variables: Any) -> Any:
    return Inventory.from_hosts([{"name": "n1", **variables}]).hosts["n1"]


@pytest.mark.parametrize(
    ("value", "cpus"),
    [
        ("0-3,8", (0, 1, 2, 3, 8)),
        ("8, 0-1 ,1", (0, 1, 8)),
        (2, (2,)),
        ("2", (2,)),
        ([4, "0-1"], (0, 1, 4)),
        (None, None),
    ],
)
def test_a_cpu_list_is_read_as_sorted_cpu_numbers(value: Any, cpus: Any) -> None:
    assert host(speccluster_cpu_affinity=value).cpu_affinity == cpus


def test_unset_means_no_pinning_and_sends_nothing() -> None:
    assert host().cpu_affinity is None
    assert "host_vars" not in entries.worker_entry(EntrySettings("c-1", 60.0), host())["options"]


@pytest.mark.parametrize(("value", "part"), [("3-1", "'3-1'"), ("0-3,", "''"), ("a", "'a'"), ("99999", "'99999'"),
                                             ("-1", "'-1'"), ([True], "'True'")])
def test_a_bad_cpu_list_is_refused_when_the_inventory_is_read(value: Any, part: str) -> None:
    with pytest.raises(InventoryError) as info:
        host(speccluster_cpu_affinity=value)
    assert str(info.value) == (
        f"speccluster_cpu_affinity on host n1 must be a CPU list such as '0-3,8' (bad part {part}), got {value!r}; "
        "write CPU numbers and ranges separated by commas, e.g. 0-3,8, or null for no pinning"
    )


@pytest.mark.parametrize("value", [1.5, True, {}, []])
def test_a_value_of_another_kind_is_refused_too(value: Any) -> None:
    with pytest.raises(InventoryError, match=r"^speccluster_cpu_affinity on host n1 must be a CPU list such as '0-3,8', got"):
        host(speccluster_cpu_affinity=value)


def test_a_bad_cpu_list_names_the_line_of_the_inventory(tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    path.write_text("all:\n  hosts:\n    n1:\n      speccluster_cpu_affinity: 4-2\n")
    with pytest.raises(InventoryError, match=r"inv\.yml:4: speccluster_cpu_affinity on host n1 must be a CPU list"):
        load_inventory(path)


def test_the_cpu_list_travels_in_every_entry_of_the_host() -> None:
    inv = Inventory.from_hosts([
        {"name": "s", "groups": ["scheduler"], "speccluster_cpu_affinity": "0"},
        {"name": "n1", "groups": ["workers"], "speccluster_cpu_affinity": "2-3", "speccluster_nworkers": 2},
    ])
    settings = EntrySettings("c-1", 60.0)
    assert entries.worker_entry(settings, inv.hosts["n1"])["options"]["host_vars"] == {"cpu_affinity": (2, 3)}
    assert entries.remote_scheduler_entry(settings, inv.hosts["s"], 8787)["options"]["host_vars"] == {"cpu_affinity": (0,)}


def test_cpu_ranges_is_the_short_form() -> None:
    assert _cpu_ranges([8, 0, 1, 2, 3, 10, 11]) == "0-3,8,10-11"
    assert _cpu_ranges({5}) == "5"


@needs_affinity
def test_a_cpu_the_host_does_not_have_is_one_line_with_the_fix() -> None:
    offered = os.sched_getaffinity(0)
    absent = max(offered) + 1
    with pytest.raises(ValueError) as info:
        _pin_to_cpus([min(offered), absent])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"speccluster_cpu_affinity {min(offered)},{absent} names CPU(s) {absent}, which this host "
                              "does not have for its dask processes (they may use ")
    assert message.endswith(f"); set speccluster_cpu_affinity to CPUs among {_cpu_ranges(offered)}, or remove it")
    assert os.sched_getaffinity(0) == offered  # nothing was pinned


@needs_affinity
def test_pinning_applies_to_the_process_and_what_it_forks() -> None:
    cpu = max(os.sched_getaffinity(0))
    code = (
        "import os, sys\n"
        "from speccluster_ssh.agent.child import _pin_to_cpus\n"
        f"_pin_to_cpus([{cpu}])\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print(sorted(os.sched_getaffinity(0)), flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == f"[{cpu}]"


def _allowed(pid: int | str) -> str:
    """The ``Cpus_allowed_list`` of a process, as the kernel writes it (the lab hosts share the head's pids)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list in /proc/{pid}/status")


@pytest.mark.lab
@needs_affinity
def test_a_started_worker_runs_on_its_hosts_cpus_only(lab: Any, tmp_path: Path) -> None:
    """The nanny and the worker it forks on the pinned host run on its CPU list; the other host's are not pinned."""
    from distributed import Client

    from speccluster_ssh.cluster import SSHSpecCluster
    from sshlab import processes_besides_sshd
    from test_peer import inventory, run, until

    cpu = max(os.sched_getaffinity(0))
    pinned, free = lab.hosts[:2]
    path = inventory(lab, tmp_path, {pinned.name: {"speccluster_cpu_affinity": str(cpu)}, free.name: {}})

    async def main() -> None:
        async with SSHSpecCluster(
            inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, n_workers=2, security=False
        ) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(2, timeout=60)
                worker_pids = await client.run(os.getpid)  # worker address -> pid
                seen = {}
                for key, spec in cluster.worker_spec.items():
                    process = cluster.workers[key]
                    (nanny_pid,) = process.pids.values()
                    seen[spec["options"]["host"]] = (
                        _allowed(nanny_pid), _allowed(worker_pids[process.worker_address])
                    )
        await until(lambda: not processes_besides_sshd(lab), 20, "every process on the lab hosts to end")
        assert seen[pinned.name] == (str(cpu), str(cpu)), seen
        assert seen[free.name] == (_allowed("self"), _allowed("self")), seen

    run(main())


@pytest.mark.lab
@needs_affinity
def test_a_cpu_the_host_does_not_have_fails_the_start_in_one_line(lab: Any, tmp_path: Path) -> None:
    from speccluster_ssh.cluster import SSHSpecCluster
    from speccluster_ssh.errors import StartError
    from sshlab import processes_besides_sshd
    from test_peer import inventory, run, until

    offered = os.sched_getaffinity(0)
    absent = max(offered) + 1
    bad = lab.hosts[0]
    path = inventory(lab, tmp_path, {bad.name: {"speccluster_cpu_affinity": f"0,{absent}"}})

    async def main() -> None:
        with pytest.raises(StartError) as info:
            async with SSHSpecCluster(
                inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, n_workers=1, security=False,
                start_timeout=30, heal=False,
            ):
                raise AssertionError("the cluster must not start")
        await until(lambda: not processes_besides_sshd(lab), 20, "nothing left running")
        assert list(info.value.hosts) == [bad.name]
        why = info.value.hosts[bad.name]
        assert "\n" not in why
        assert f"speccluster_cpu_affinity 0,{absent} names CPU(s) {absent}, which this host does not have" in why, why
        assert f"set speccluster_cpu_affinity to CPUs among {_cpu_ranges(offered)}, or remove it" in why, why

    run(main())
