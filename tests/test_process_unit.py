"""Process interfaces without a lab: named options only, and a pool handed over when they are made.

A :class:`~speccluster_ssh.process.RemoteProcess` finds its hosts' agents
through the pool the cluster hands it (:func:`~speccluster_ssh.process.with_pool`),
not through a registry; an option it does not name is refused, never passed
on to the dask server.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from distributed.core import Status
from distributed.scheduler import Scheduler

from speccluster_ssh import entries
from speccluster_ssh.entries import EntrySettings
from speccluster_ssh.forwards import ForwardedScheduler
from speccluster_ssh.inventory import Inventory
from speccluster_ssh.pool import AgentPool
from speccluster_ssh.process import RemoteNanny, RemoteProcess, RemoteScheduler, RemoteWorker, with_pool

CLASSES = {"nanny": RemoteNanny, "worker": RemoteWorker, "scheduler": RemoteScheduler}


def inventory() -> Inventory:
    return Inventory.from_hosts([
        {"name": "s", "groups": ["scheduler"], "speccluster_env": {"A": "1"}},
        {"name": "n1", "groups": ["workers"], "speccluster_nworkers": 2, "speccluster_dask_config": {"a": 1},
         "speccluster_worker_class": "nanny"},
        {"name": "n2", "groups": ["workers"], "speccluster_worker_class": "worker", "speccluster_nthreads": 2},
    ])


def pool(cluster_id: str = "unit-0123") -> AgentPool:
    return AgentPool(cluster_id, inventory().hosts)


@pytest.mark.parametrize("cls", [RemoteNanny, RemoteWorker])
def test_an_unknown_option_is_refused_by_name(cls: type[RemoteProcess]) -> None:
    # nthreads belongs in options={...}: it was once passed on to the nanny unseen.
    with pytest.raises(TypeError, match=rf"{cls.__name__} got unknown option\(s\) 'nthreads', 'typo_option'; "
                                        r"options of the dask server go in its options="):
        cls("tcp://10.0.0.1:8786", "k1", host="n1", pool=pool(), typo_option=1, nthreads=2)


@pytest.mark.parametrize("cls", [RemoteScheduler, ForwardedScheduler])
def test_a_scheduler_refuses_an_unknown_option_too(cls: type[RemoteScheduler]) -> None:
    with pytest.raises(TypeError, match=rf"{cls.__name__} got unknown option\(s\) 'port'"):
        cls(host="s", pool=pool(), port=8786)


def test_a_process_made_without_a_pool_cannot_start() -> None:
    nanny = RemoteNanny("tcp://10.0.0.1:8786", "k1", host="n1", cluster="unit-0123")

    async def main() -> None:
        with pytest.raises(RuntimeError, match=r"nanny k1 on n1 was made without an agent pool and cannot start; "
                                               r"make it with pool="):
            await nanny.start()

    asyncio.run(main())
    assert nanny.status == Status.created  # nothing was tried: it is not a failed entry


def test_an_entry_of_another_cluster_is_refused() -> None:
    with pytest.raises(ValueError, match=r"entry of cluster 'other-1'.*agent pool of cluster 'unit-0123'"):
        RemoteNanny("tcp://10.0.0.1:8786", "k1", host="n1", cluster="other-1", pool=pool())


def test_with_pool_hands_the_pool_to_process_interfaces_only() -> None:
    the_pool = pool()
    options = {"host": "n1", "cluster": "unit-0123"}
    assert with_pool(RemoteNanny, options, the_pool) == {**options, "pool": the_pool}
    assert with_pool("speccluster_ssh.process.RemoteWorker", options, the_pool)["pool"] is the_pool
    assert with_pool(Scheduler, {"port": 0}, the_pool) == {"port": 0}
    assert options == {"host": "n1", "cluster": "unit-0123"}  # the spec entry stays plain data
    nanny = RemoteNanny("tcp://10.0.0.1:8786", "k1", **with_pool(RemoteNanny, options, the_pool))
    assert nanny.pool is the_pool and nanny.cluster == "unit-0123"


def test_every_entry_the_cluster_builds_makes_its_interface() -> None:
    """Whatever the entry factory writes is a named option of the class it names."""
    inv = inventory()
    settings = EntrySettings("unit-0123", 42.0, {}, classes=CLASSES, process_base=RemoteProcess)
    the_pool = pool()
    made: list[Any] = []
    for host in inv.worker_hosts:
        spec = entries.worker_entry(settings, host)
        opts = dict(spec["options"], name="k")
        if spec.get("group"):
            opts["group"] = spec["group"]
        made.append(spec["cls"]("tcp://10.0.0.1:8786", **with_pool(spec["cls"], opts, the_pool)))
    user = entries.complete_entry(settings, {"cls": RemoteWorker, "options": {"host": "n2"}}, {h.name: h for h in inv.worker_hosts})
    made.append(user["cls"]("tcp://10.0.0.1:8786", name="u", **with_pool(user["cls"], user["options"], the_pool)))
    sched = entries.remote_scheduler_entry(settings, inv.hosts["s"], 8787)
    made.append(sched["cls"](**with_pool(sched["cls"], sched["options"], the_pool)))
    assert [type(p) for p in made] == [RemoteNanny, RemoteWorker, RemoteWorker, RemoteScheduler]
    assert all(p.pool is the_pool and p.cluster == "unit-0123" for p in made)
    assert made[0].group == entries.worker_entry(settings, inv.hosts["n1"])["group"]


def test_the_start_request_carries_the_host_vars_by_name() -> None:
    """A variable whose table row says ``request`` reaches the agent by one generic path: entry, interface, request."""
    inv = inventory()
    settings = EntrySettings("unit-0123", 42.0, {}, classes=CLASSES, process_base=RemoteProcess)
    the_pool = pool()
    agent: Any = SimpleNamespace(facts={"cpu_count": 4})
    spec = entries.worker_entry(settings, inv.hosts["n1"])
    assert spec["options"]["host_vars"] == {"dask_config": {"a": 1}}
    nanny = spec["cls"]("tcp://10.0.0.1:8786", "k", group=spec["group"], **with_pool(spec["cls"], spec["options"], the_pool))
    request = nanny._start_request("k-0", agent, the_pool, "tcp://10.0.0.1:8786")
    assert request["host_vars"] == {"dask_config": {"a": 1}}
    json.dumps(request)  # it travels as one JSON line
    # A host that sets no such variable sends none.
    bare = entries.worker_entry(settings, inv.hosts["n2"])
    assert "host_vars" not in bare["options"]
    worker = bare["cls"]("tcp://10.0.0.1:8786", "b", **with_pool(bare["cls"], bare["options"], the_pool))
    assert worker._start_request("b", agent, the_pool, "tcp://10.0.0.1:8786")["host_vars"] == {}
# -- handed, not chosen: GPU devices and threads ---------------------------------------------------------


def gpu_pool() -> AgentPool:
    return AgentPool("unit-0123", Inventory.from_hosts([
        {"name": "g", "groups": ["workers"], "speccluster_gpus": 4, "speccluster_slots": 2},
        {"name": "a", "groups": ["workers"], "speccluster_gpus": "auto", "speccluster_nworkers": 2},
    ]).hosts)


def made(the_pool: AgentPool, host: str, key: str, held: dict[str, dict[str, int]]) -> RemoteProcess:
    settings = EntrySettings("unit-0123", 42.0, {}, classes=CLASSES, process_base=RemoteProcess)
    spec = entries.worker_entry(settings, the_pool.table.specs[host], gpus_held=held.get(host, {}))
    opts = dict(spec["options"], name=key)
    if spec.get("group"):
        opts["group"] = spec["group"]
    return spec["cls"]("tcp://10.0.0.1:8786", **with_pool(spec["cls"], opts, the_pool))


def test_a_process_is_handed_its_gpus_and_the_pool_holds_no_claims() -> None:
    the_pool = gpu_pool()
    agent: Any = SimpleNamespace(facts={"cpu_count": 8})
    second = made(the_pool, "g", "k2", {"g": {"k1": 0}})
    assert second.gpu_slot == 1
    gpus = second._member_gpus(agent, the_pool)
    assert gpus == {"k2": ["2", "3"]}
    second.gpus = gpus
    assert second._member_env("k2")["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert second._process_options("k2", agent)["resources"] == {"GPU": 2}
    assert not hasattr(the_pool, "gpu_claims")  # made twice, it gets the same share: nothing is claimed
    assert made(the_pool, "g", "k2", {"g": {"k1": 0}})._member_gpus(agent, the_pool) == gpus


def test_auto_gpus_are_the_placed_slots_share_of_those_the_agent_found() -> None:
    the_pool = gpu_pool()
    process = made(the_pool, "a", "k", {})
    assert (process.gpu_slot, process.placed_gpus) == (0, "auto")
    found: Any = SimpleNamespace(facts={"gpus": ["0", "1", "2", "3"]})
    assert process._member_gpus(found, the_pool) == {"k-0": ["0", "1"], "k-1": ["2", "3"]}
    none_found: Any = SimpleNamespace(facts={})
    assert process._member_gpus(none_found, the_pool) == {}  # nothing to pin


@pytest.mark.parametrize(("given", "threads"), [(None, 4), (0, 4), (2, 2)])
def test_unset_or_zero_nthreads_start_with_the_default(given: int | None, threads: int) -> None:
    """0 is unset, as scaling and plan read it: not passed on for dask to give every worker all cpus."""
    the_pool = pool()
    nanny = RemoteNanny("tcp://10.0.0.1:8786", "k", host="n1", pool=the_pool, group=["-0", "-1"],
                        options={"nthreads": given})
    agent: Any = SimpleNamespace(facts={"cpu_count": 8})
    assert nanny._process_options("k-0", agent)["nthreads"] == threads


@pytest.mark.parametrize(("group", "threads"), [(None, 3), (["-0", "-1"], 1)])
def test_unset_nthreads_of_a_pinned_host_share_its_listed_cpus(group: list[str] | None, threads: int) -> None:
    """With speccluster_cpu_affinity, the default counts the CPUs the workers are pinned to, not the host's."""
    nanny = RemoteNanny("tcp://10.0.0.1:8786", "k", host="n1", pool=pool(), group=group,
                        host_vars={"cpu_affinity": [0, 1, 5]})
    agent: Any = SimpleNamespace(facts={"cpu_count": 8})
    member = nanny.member_names[0]
    assert nanny._process_options(member, agent)["nthreads"] == threads
