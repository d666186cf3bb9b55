"""Placement and capacity arithmetic (pure, no lab)."""

from __future__ import annotations

import pytest

from speccluster_ssh.placement import (
    EntryShape,
    Target,
    capacity,
    choose_host,
    default_nthreads,
    describe_default_nthreads,
    entries_to_add,
    entries_to_remove,
    entry_gpus,
    given_nthreads,
    planned_nthreads,
    usable_cpus,
    worker_nthreads,
    workers_for,
)
from speccluster_ssh.inventory import HostSpec, Inventory
from speccluster_ssh.planning import build_plan
from speccluster_ssh.process import same_release

SLOTS = {"a": 2, "b": 2, "c": 1}


def test_spread_takes_the_least_used_host_in_inventory_order() -> None:
    used: dict[str, int] = {}
    order = []
    for _ in range(5):
        host = choose_host(SLOTS, used, policy="spread")
        assert host is not None
        order.append(host)
        used[host] = used.get(host, 0) + 1
    assert order == ["a", "b", "c", "a", "b"]
    assert choose_host(SLOTS, used) is None


def test_pack_fills_hosts_one_after_another() -> None:
    used: dict[str, int] = {}
    order = []
    for _ in range(5):
        host = choose_host(SLOTS, used, policy="pack")
        assert host is not None
        order.append(host)
        used[host] = used.get(host, 0) + 1
    assert order == ["a", "a", "b", "b", "c"]


def test_down_hosts_are_never_chosen() -> None:
    assert choose_host(SLOTS, {}, unavailable={"a", "b"}) == "c"
    assert choose_host(SLOTS, {"c": 1}, unavailable={"a", "b"}) is None


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="spread"):
        choose_host(SLOTS, {}, policy="random")


def test_workers_round_up_to_whole_groups() -> None:
    group = EntryShape("a", workers=3, threads=1, memory=100)
    assert entries_to_add([], [group] * 4, Target(workers=4)) == 2
    assert entries_to_add([], [group] * 4, Target(workers=3)) == 1
    # Capacity runs out: every candidate is taken and no more.
    assert entries_to_add([], [group] * 2, Target(workers=100)) == 2


def test_cores_and_memory_use_each_entry_shape() -> None:
    small = EntryShape("a", workers=1, threads=1, memory=1000)
    big = EntryShape("gpu", workers=2, threads=4, memory=8000)
    assert entries_to_add([], [big, small, small], Target(cores=9)) == 2
    assert entries_to_add([small], [small, big], Target(memory=10_000)) == 2
    assert capacity([small, big]) == Target(workers=3, cores=9, memory=17_000)


def test_remove_keeps_the_target_and_never_splits_groups() -> None:
    shapes = [EntryShape("a", 2, 1, 10), EntryShape("b", 2, 1, 10), EntryShape("c", 1, 1, 10)]
    # Dropping to 3 workers: the newest (index 2, one worker) and then one
    # group would leave 2 < 3, so only index 2 goes... then index 1 leaves 2.
    assert entries_to_remove(shapes, [2, 1, 0], Target(workers=3)) == [2]
    assert entries_to_remove(shapes, [2, 1, 0], Target(workers=2)) == [2, 1]
    assert entries_to_remove(shapes, [0, 1, 2], Target(workers=0)) == [0, 1, 2]


def test_workers_for_cores_and_memory() -> None:
    assert workers_for(cores=5, memory=None, threads=2, memory_per_worker=0) == 3
    assert workers_for(cores=None, memory=2500, threads=1, memory_per_worker=1000) == 3
    assert workers_for(cores=1, memory=5000, threads=1, memory_per_worker=1000) == 5


def test_release_comparison() -> None:
    assert same_release("2026.8.0", "2026.8.1")
    assert not same_release("2026.8.0", "2026.9.0")
    assert not same_release("2025.8.0", "2026.8.0")


# -- the nthreads of workers the inventory leaves unset -----------------------------------------


@pytest.mark.parametrize(
    ("cpu_count", "workers", "threads"),
    [
        (8, 1, 8),  # one worker takes the host
        (8, 2, 4),  # a group shares it
        (7, 3, 2),  # rounded down
        (3, 4, 1),  # more workers than cpus: one thread each, never 0
        (1, 1, 1),
        (None, 2, 1),  # the agent has not said yet
        (0, 1, 1),
    ],
)
def test_default_nthreads_shares_the_host_cpus(cpu_count: int | None, workers: int, threads: int) -> None:
    assert default_nthreads(cpu_count, workers) == threads


def test_plan_shows_the_default_nthreads_per_entry() -> None:
    inv = Inventory.from_hosts([
        {"name": "g", "groups": ["workers"], "speccluster_nworkers": 2},
        {"name": "one", "groups": ["workers"]},
        {"name": "set", "groups": ["workers"], "speccluster_nthreads": 3},
    ])
    plan = build_plan(inv, name="c", workers=None, placement="spread", tls=False)
    shown = {h["host"]: [e["options"]["nthreads"] for e in h["entries"]] for h in plan["hosts"]}
    assert shown == {
        "g": [describe_default_nthreads(2)],
        "one": [describe_default_nthreads(1)],
        "set": [3],  # set in the inventory: shown as is
    }
    assert describe_default_nthreads(2) == "auto (host cpus // 2, at least 1)"


@pytest.mark.parametrize(
    ("given", "cpu_count", "workers", "threads", "shown"),
    [
        (None, 8, 2, 4, describe_default_nthreads(2)),  # unset: the host's cpus shared
        (0, 8, 2, 4, describe_default_nthreads(2)),  # 0 is unset too, not dask's "every cpu" per worker
        (0, None, 1, 1, describe_default_nthreads(1)),
        (3, 8, 2, 3, 3),  # given: as is, whatever the host has
        (16, 2, 1, 16, 16),
    ],
)
def test_a_users_nthreads_is_read_by_one_rule(given: int | None, cpu_count: int | None, workers: int, threads: int,
                                              shown: int | str) -> None:
    """The process interface starts, scaling counts and plan shows the same threads (issue 22, item 3)."""
    assert worker_nthreads(given, cpu_count, workers) == threads
    assert planned_nthreads(given, workers) == shown
    assert given_nthreads(given) == (given or None)


def test_a_negative_nthreads_is_refused() -> None:
    with pytest.raises(ValueError, match="nthreads must be 1 or more, or unset"):
        worker_nthreads(-2, 8, 1)


# -- GPU shares: decided where the entry is placed ---------------------------------------------------


def gpu_host(**variables: object) -> HostSpec:
    spec = {"name": "g", "ansible_connection": "local", **variables}
    return Inventory.from_hosts([spec]).hosts["g"]


@pytest.mark.parametrize(
    ("variables", "held", "workers", "expected"),
    [
        ({}, {}, 1, {}),  # no speccluster_gpus: nothing to hand over
        ({"speccluster_gpus": 4, "speccluster_slots": 2}, {}, 1, {"gpu_slot": 0, "gpus": [["0", "1"]]}),
        ({"speccluster_gpus": 4, "speccluster_slots": 2}, {"7": 0}, 1, {"gpu_slot": 1, "gpus": [["2", "3"]]}),
        # The slot a removed entry left is taken again: the lowest free one.
        ({"speccluster_gpus": [4, 5, 6], "speccluster_slots": 3}, {"1": 0, "3": 2}, 1, {"gpu_slot": 1, "gpus": [["5"]]}),
        ({"speccluster_gpus": 4, "speccluster_nworkers": 2, "speccluster_slots": 2}, {"0": 1}, 2,
         {"gpu_slot": 0, "gpus": [["0"], ["1"]]}),
        # Every slot held (an entry written by hand, or rebuilt in place): no GPU rather than a shared one.
        ({"speccluster_gpus": 2, "speccluster_slots": 2}, {"0": 0, "1": 1}, 1, {"gpu_slot": None, "gpus": [[]]}),
        ({"speccluster_gpus": "auto", "speccluster_slots": 2}, {"0": 0}, 1, {"gpu_slot": 1, "gpus": "auto"}),
    ],
)
def test_entry_gpus_takes_the_lowest_free_slot_and_its_devices(
    variables: dict[str, object], held: dict[str, int], workers: int, expected: dict[str, object]
) -> None:
    assert entry_gpus(gpu_host(**variables), held, workers) == expected


@pytest.mark.parametrize(
    ("cpu_count", "affinity", "cpus"),
    [(8, None, 8), (8, (0, 1, 2), 3), (None, None, None), (None, (4, 5), 2), (8, (), 8)],
)
def test_pinned_workers_share_the_listed_cpus_not_every_cpu(
    cpu_count: int | None, affinity: tuple[int, ...] | None, cpus: int | None
) -> None:
    """speccluster_cpu_affinity sets the cpus an unset nthreads shares; without it, the agent's count."""
    assert usable_cpus(cpu_count, affinity) == cpus
    if cpus:
        assert worker_nthreads(None, usable_cpus(cpu_count, affinity), 1) == cpus
