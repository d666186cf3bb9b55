"""``plan`` fails where ``up`` would, with the same stderr and exit status; no argument plans on localhost.

Both commands call one function for the checks ``up`` makes before it
starts (:func:`speccluster_ssh.cli.common._prepare_up`), so each bad case
here must give byte-identical stderr from the two, and ``up`` must leave
no state behind.

What ``plan`` shows is what ``up`` does: each worker's GPU devices and
threads, as the workers of a local cluster have them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import dask
import pytest
from click.testing import CliRunner, Result

from speccluster_ssh.cli import main



def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


INVENTORIES = {
    # Only a scheduler: plan printed 'workers: 0 planned' and exited 0 (issue 21, point 8).
    "sched_only": {"all": {"children": {"scheduler": {"hosts": {"s1": {"ansible_connection": "local"}}}}}},
    "no_slots": {"all": {"hosts": {"h1": {"ansible_connection": "local", "speccluster_slots": 0}}}},
    "reach_disagrees": {"all": {"hosts": {
        "h1": {"ansible_connection": "local", "speccluster_scheduler_reach": "direct"},
        "h2": {"ansible_connection": "local", "speccluster_scheduler_reach": "forward"},
    }}},
    "typo": {"all": {"hosts": {"h1": {"ansible_connection": "local", "speccluster_nworkerz": 2}}}},
    "good": {"all": {"hosts": {"h1": {"ansible_connection": "local", "speccluster_slots": 2}}}},
}

CASES = [
    ("sched_only", [], {}, "no worker hosts"),
    ("no_slots", [], {}, "no worker hosts"),
    ("reach_disagrees", [], {}, "differs between hosts"),
    ("typo", [], {}, "speccluster_nworkerz"),
    ("missing", [], {}, "not found"),
    ("good", ["--adapt", "x"], {}, "MIN:MAX"),
    ("good", ["--adapt", "5:2"], {}, "MIN <= MAX"),
    ("good", ["--min-workers", "7x"], {}, "--min-workers"),
    ("good", ["--min-workers", "1.5"], {}, "--min-workers"),
    ("good", ["--name", "../escape"], {}, "not usable"),
    ("good", ["--workers", "9", "--min-workers", "x"], {}, "--min-workers"),  # the capacity warning first
    ("good", [], {"speccluster-ssh.placement": "everywhere"}, "placement"),
    ("good", [], {"speccluster-ssh.scheduler-reach": "sideways"}, "scheduler-reach"),
    ("good", ["--dashboard-address", "every where"], {}, "dashboard address"),
]


@pytest.mark.parametrize(("inventory", "options", "config", "needle"), CASES)
def test_plan_and_up_fail_alike(
    tmp_path: Path, state_home: Path, inventory: str, options: list[str], config: dict[str, str], needle: str
) -> None:
    path = tmp_path / f"{inventory}.yml"
    if inventory in INVENTORIES:
        path.write_text(json.dumps(INVENTORIES[inventory]))
    with dask.config.set(config):
        planned = cli("plan", str(path), *options)
        started = cli("up", str(path), "--detach", *options)
    assert started.exit_code == 2, started.output
    assert planned.exit_code == 2, planned.output
    assert planned.stderr == started.stderr
    assert needle in started.stderr
    assert started.stderr.count("speccluster-ssh: error: ") == 1 and "Traceback" not in started.output
    assert planned.stdout == started.stdout == ""
    assert not any(p.is_dir() for p in state_home.glob("*")) if state_home.exists() else True


def test_plan_prints_the_capacity_warning_as_up_does(tmp_path: Path) -> None:
    path = tmp_path / "good.yml"
    path.write_text(json.dumps(INVENTORIES["good"]))
    planned = cli("plan", str(path), "--workers", "9")
    assert planned.exit_code == 0, planned.output
    assert planned.stderr == (
        "speccluster-ssh: warning: asked for 9 workers; the inventory holds 2, starting that many\n"
    )


def test_plan_up_and_check_take_up_s_command_line_and_default_to_the_local_inventory() -> None:
    planned = cli("plan", "--json")
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)
    assert plan["name"] == "local"
    assert [h["host"] for h in plan["hosts"]] == ["localhost"]
    assert plan["hosts"][0]["target"] == "local subprocess (no SSH)"
    assert plan["workers_planned"] >= 1
    # An 'up' command line works with 'plan' in its place.
    same = cli("plan", "--detach", "--timeout", "30", "--known-hosts", "strict", "--min-workers", "50%",
               "--workers", "1")
    assert same.exit_code == 0, same.output
    for command in ("up", "plan", "check"):
        usage = cli(command, "--help").stdout
        assert f"{command} [OPTIONS] [INVENTORY]" in usage, usage


def test_up_hands_each_worker_the_gpus_and_threads_plan_shows(tmp_path: Path) -> None:
    """A host with a GPU list: each worker's CUDA_VISIBLE_DEVICES and threads are what plan showed.

    No GPU is needed: the devices are named in the inventory and only reach
    the workers' environment. A removed entry's GPUs go to the next entry
    placed there, which plan (the entries from the start) showed for that slot.
    """
    from distributed import Client

    from speccluster_ssh import SSHSpecCluster
    from speccluster_ssh.inventory import load_inventory
    from speccluster_ssh.planning import build_plan

    path = tmp_path / "gpus.yml"
    path.write_text(json.dumps({"all": {"hosts": {"here": {
        "ansible_connection": "local", "speccluster_python": sys.executable, "speccluster_slots": 2,
        "speccluster_nworkers": 2, "speccluster_gpus": [4, 5, 6, 7], "speccluster_nthreads": 1,
    }}}}))
    plan = build_plan(load_inventory(path), name="g", workers=None, placement="spread", tls=False)
    planned = {w: (",".join(d), e["options"]["nthreads"])
               for h in plan["hosts"] for e in h["entries"] for w, d in e["gpus"].items()}
    assert sorted(d for d, _ in planned.values()) == ["4", "5", "6", "7"]

    def visible(dask_worker: Any) -> tuple[str, str, int]:
        return str(dask_worker.name), os.environ.get("CUDA_VISIBLE_DEVICES", ""), dask_worker.state.nthreads

    async def seen(client: Any, count: int, gone: set[str]) -> dict[str, tuple[str, str, int]]:
        """Address -> what each worker has, once ``count`` run and none of ``gone`` is left."""
        deadline = time.monotonic() + 60
        while True:
            found = await client.run(visible)
            if len(found) == count and not gone & set(found):
                return found
            assert time.monotonic() < deadline, f"the workers did not settle: {found}"
            await asyncio.sleep(0.1)

    def by_name(found: dict[str, tuple[str, str, int]]) -> dict[str, tuple[str, int]]:
        return {name: (devices, threads) for name, devices, threads in found.values()}

    async def main() -> None:
        async with SSHSpecCluster.from_inventory(path, asynchronous=True) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(4, timeout=60)
                before = await seen(client, 4, set())
                assert by_name(before) == planned
                rows = {w["name"]: ",".join(w["gpus"]) for w in cluster.status_report()["workers"]}
                assert rows == {w: d for w, (d, _) in planned.items()}
                # Entry 0 leaves and a new entry comes: it gets slot 0's devices, as entry 0 had them.
                del cluster.worker_spec["0"]
                await cluster.reconcile_now()
                cluster.scale(4)
                await cluster.reconcile_now()
                gone = {a for a, (name, _, _) in before.items() if name.startswith("0-")}
                now = await seen(client, 4, gone)
                new = sorted((devices, threads) for a, (_, devices, threads) in now.items() if a not in before)
                assert new == [planned["0-0"], planned["0-1"]], now
                assert {a: v for a, v in now.items() if a in before} == {a: v for a, v in before.items() if a not in gone}

    asyncio.run(main())
