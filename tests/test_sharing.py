"""The head's lease arithmetic over the host table (sharing.py's pure part): no lab, no I/O."""

from __future__ import annotations

from types import SimpleNamespace

from speccluster_ssh.hosts import HostTable
from speccluster_ssh.inventory import Inventory
from speccluster_ssh.leases import Amount, Lease
from speccluster_ssh.sharing import (
    entry_gpu_count,
    holders_text,
    host_capacity_of,
    per_entry_of,
    slot_limits,
)

GiB = 2**30


def table(**variables: object) -> HostTable:
    inventory = Inventory.from_hosts([{"name": n, "groups": ["workers"]} for n in ("h1", "h2")], **variables)
    return HostTable(inventory.worker_hosts)


def held(host: str, cluster: str, user: str = "root", since: float = 0.0) -> Lease:
    return Lease(host, "lease", user, cluster, Amount(1), since, name=cluster, head="vm", lease_id=f"{cluster}-{host}")


def test_capacity_and_one_entry_from_the_inventory_and_the_agent_s_devices() -> None:
    spec = table(speccluster_slots=2, speccluster_nthreads=2, speccluster_memory_limit="4 GiB").specs["h1"]
    assert host_capacity_of(spec) == Amount(2, 4, 8 * GiB, ())
    assert per_entry_of(spec) == Amount(1, 2, 4 * GiB, ())
    auto = table(speccluster_slots=2, speccluster_gpus="auto").specs["h1"]
    assert entry_gpu_count(auto, {"gpus": ["0", "1", "2", "3"]}) == 2
    assert entry_gpu_count(auto, {}) == 0  # nvidia-smi found none


def test_slot_limits_count_other_clusters_only_on_hosts_whose_leases_are_known() -> None:
    hosts = table(speccluster_slots=2)
    assert slot_limits(hosts, "mine") == {}  # nothing listed yet: placement offers every slot
    hosts.see_leases("h1", [held("h1", "theirs")])
    hosts.see_leases("h2", [held("h2", "mine"), held("h2", "theirs")])
    assert slot_limits(hosts, "mine") == {"h1": 1, "h2": 1}
    assert slot_limits(hosts, "theirs") == {"h1": 2, "h2": 1}


def test_a_lease_held_and_released_through_the_table() -> None:
    hosts = table()
    agent = SimpleNamespace(alive=True)
    lease = held("h1", "mine")
    hosts.hold("h1", "0", agent, SimpleNamespace(lease_id=lease.lease_id, lease=lease))  # type: ignore[arg-type]
    assert [le.cluster for le in hosts.lab_leases()] == ["mine"]
    assert list(hosts.held["h1"]) == ["0"]
    assert hosts.let_go("h1", "0") is not None and hosts.lab_leases() == []
    assert hosts.let_go("h1", "0") is None  # once


def test_holders_text_groups_each_holder() -> None:
    text = holders_text([held("h1", "a"), held("h1", "a"), held("h1", "b", "alice")])
    assert text.startswith("2 slots held by root (cluster a from vm, since ")
    assert "; 1 slot held by alice (cluster b from vm, since " in text
    assert holders_text([]).startswith("no one holds it")
