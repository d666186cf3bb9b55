"""The head's dask config on every remote process (issue 12, item 1), and ``speccluster_dask_config``.

Like dask's SSHCluster, the head sends its dask config to every worker,
nanny and remote scheduler (in the start request, never on a command line),
less the head-only parts (``HEAD_ONLY_CONFIG``). A host's
``speccluster_dask_config`` is deep-merged over it on that host only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client

from speccluster_ssh.entries import HEAD_ONLY_CONFIG, deep_merge, forwarded_dask_config
from speccluster_ssh.inventory import Inventory, InventoryError, load_inventory

TARGET = "distributed.worker.memory.target"


def test_forwarded_config_leaves_out_head_only_parts_and_objects() -> None:
    config = {
        "temporary-directory": "/scratch/head-only",
        "speccluster-ssh": {"placement": "pack"},
        "distributed": {
            "worker": {"memory": {"target": 0.42}, "resources": {}},
            "comm": {"tls": {"ca-file": "/head/ca.pem", "min-version": 1.2, "worker": {"cert": "/head/w.pem"}}},
        },
        "scheduler": object(),
        "array": {"chunk-size": "64MiB", "pair": (1, 2)},
    }
    sent, dropped = forwarded_dask_config(config)
    assert sent == {
        "distributed": {"worker": {"memory": {"target": 0.42}, "resources": {}}, "comm": {"tls": {"min-version": 1.2}}},
        "array": {"chunk-size": "64MiB", "pair": [1, 2]},
    }
    assert dropped == ["scheduler"]
    sent, _ = forwarded_dask_config(config, (*HEAD_ONLY_CONFIG, "array"))
    assert "array" not in sent


def test_forwarded_config_of_the_real_head_travels_as_json() -> None:
    import json

    with dask.config.set({TARGET: 0.42}):
        sent, _ = forwarded_dask_config(dask.config.config)
    assert sent["distributed"]["worker"]["memory"]["target"] == 0.42
    assert "speccluster-ssh" not in sent and "temporary-directory" not in sent
    json.dumps(sent)


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [2]}, "e": {"f": 1}}) == {"a": {"b": 1, "c": [2]}, "d": 1, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}


def host(**variables: Any) -> Any:
    return Inventory.from_hosts([{"name": "here", "ansible_connection": "local", **variables}]).hosts["here"]


def test_speccluster_dask_config_takes_nested_and_dotted_keys() -> None:
    spec = host(speccluster_dask_config={TARGET: 0.3, "distributed": {"worker": {"memory": {"spill": 0.9}}}})
    assert spec.dask_config == {"distributed": {"worker": {"memory": {"target": 0.3, "spill": 0.9}}}}
    assert host().dask_config == {}
    for bad in ("target: 0.3", {"a..b": 1}, {"a": {1, 2}}):
        with pytest.raises(InventoryError, match="speccluster_dask_config on host here must be a mapping of dask config"):
            host(speccluster_dask_config=bad)


def test_group_dask_config_is_overridden_by_a_host_the_ansible_way(tmp_path: Path) -> None:
    """ansible-core replaces a mapping set on a group by the host's (hash_behaviour=replace)."""
    path = tmp_path / "inv.yml"
    path.write_text(
        "all:\n"
        "  children:\n"
        "    workers:\n"
        "      vars: {speccluster_dask_config: {distributed.worker.memory.target: 0.3, array.chunk-size: 1MiB}}\n"
        "      hosts:\n"
        "        a: {}\n"
        "        b: {speccluster_dask_config: {distributed.worker.memory.target: 0.2}}\n"
    )
    inv = load_inventory(str(path))
    assert inv.hosts["a"].dask_config == {"distributed": {"worker": {"memory": {"target": 0.3}}}, "array": {"chunk-size": "1MiB"}}
    assert inv.hosts["b"].dask_config == {"distributed": {"worker": {"memory": {"target": 0.2}}}}


@pytest.mark.lab
def test_head_config_reaches_every_process_and_a_group_config_wins_only_there(lab: Any, tmp_path: Path) -> None:
    """A remote scheduler, a nanny's worker and a bare worker see the head's value; the group ``tuned`` its own."""
    from speccluster_ssh.cluster import SSHSpecCluster
    from sshlab import processes_besides_sshd
    from test_peer import inventory, run, until

    sched, plain, tuned = lab.hosts[:3]
    path = inventory(
        lab, tmp_path,
        {sched.name: {"speccluster_slots": 0}, plain.name: {"speccluster_worker_class": "nanny"}, tuned.name: {}},
        groups={"scheduler": [sched.name], "workers": [plain.name, tuned.name], "tuned": [tuned.name]},
        group_vars={"tuned": {"speccluster_dask_config": {TARGET: 0.3, "distributed.worker.memory.spill": 0.91}}},
    )

    def seen(dask_worker: Any) -> dict[str, Any]:
        import dask

        return {
            "name": str(dask_worker.name),
            "target": dask.config.get("distributed.worker.memory.target"),
            "spill": dask.config.get("distributed.worker.memory.spill"),
            "tmp": dask.config.get("temporary-directory"),
        }

    async def main() -> None:
        # The head's config as the cluster starts; a temporary directory of the head must not travel.
        with dask.config.set({TARGET: 0.42, "temporary-directory": "/nowhere/head-only"}):
            async with SSHSpecCluster(
                inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, n_workers=2, security=False
            ) as cluster:
                async with Client(cluster, asynchronous=True) as client:
                    await client.wait_for_workers(2, timeout=60)
                    by_host = {cluster.worker_spec[k]["options"]["host"]: str(k) for k in cluster.worker_spec}
                    results = {r["name"]: r for r in (await client.run(seen)).values()}
                    on_scheduler = await client.run_on_scheduler(
                        lambda: __import__("dask").config.get("distributed.worker.memory.target")
                    )
        await until(lambda: not processes_besides_sshd(lab), 20, "every process on the lab hosts to end")
        assert on_scheduler == 0.42
        assert results[by_host[plain.name]]["target"] == 0.42, results
        assert results[by_host[plain.name]]["spill"] == 0.7, results  # dask's default: not tuned here
        assert results[by_host[tuned.name]]["target"] == 0.3, results
        assert results[by_host[tuned.name]]["spill"] == 0.91, results
        assert all(r["tmp"] != "/nowhere/head-only" for r in results.values()), results

    run(main())
