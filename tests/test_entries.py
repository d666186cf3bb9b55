"""The spec entry factory (pure, no lab): the exact dicts the cluster has always built.

The expected dicts below are written out by hand from what
``SSHSpecCluster`` built before it used :mod:`speccluster_ssh.entries`
(``_entry_for_host``, ``_complete_entry``, ``_scheduler_spec``,
``_remote_security_paths``), so a change of any key or value shows here.
"""

from __future__ import annotations

from typing import Any

import pytest
from distributed.scheduler import Scheduler
from distributed.security import Security

from speccluster_ssh import entries
from speccluster_ssh.entries import EntrySettings
from speccluster_ssh.errors import UserError
from speccluster_ssh.inventory import Inventory
from speccluster_ssh.process import RemoteNanny, RemoteProcess, RemoteScheduler, RemoteWorker
from speccluster_ssh.security import make_security, remote_security_paths

CLASSES = {"nanny": RemoteNanny, "worker": RemoteWorker, "scheduler": RemoteScheduler}
TLS_PATHS = {
    "tls_ca_file": "tls/ca.pem",
    "tls_scheduler_cert": "tls/node.pem",
    "tls_scheduler_key": "tls/node.key",
    "tls_worker_cert": "tls/node.pem",
    "tls_worker_key": "tls/node.key",
    "tls_client_cert": "tls/node.pem",
    "tls_client_key": "tls/node.key",
}
REMOTE_SECURITY = dict(TLS_PATHS, require_encryption=True)


def inventory() -> Inventory:
    return Inventory.from_hosts([
        {"name": "s", "groups": ["scheduler"], "speccluster_dashboard_port": 8790, "speccluster_interface": "eth1",
         "speccluster_env": {"A": "1"}},
        {"name": "n1", "groups": ["workers"], "speccluster_nworkers": 2, "speccluster_env": {"OMP_NUM_THREADS": "1"},
         "speccluster_resources": {"GPU": 1}, "speccluster_interface": "ib0",
         "speccluster_local_directory": "/scratch"},
        {"name": "n2", "groups": ["workers"], "speccluster_worker_class": "worker", "speccluster_nthreads": 2,
         "speccluster_memory_limit": "2 GiB", "speccluster_slots": 2,
         "speccluster_worker_options": {"lifetime": "1h"}},
    ])


def settings(tls: bool = True, **options: Any) -> EntrySettings:
    paths = TLS_PATHS if tls else {}
    return EntrySettings("lab-0123abcd", 42.0, paths, classes=CLASSES, process_base=RemoteProcess, **options)


# -- TLS paths come from the code that makes the files ------------------------------------------


def test_remote_security_paths_name_the_files_make_security_makes() -> None:
    _, files = make_security(True, "c1")
    paths = remote_security_paths(files)
    assert paths == TLS_PATHS
    assert set(paths.values()) == set(files)  # every path is a file the hosts get, and each file is used
    assert remote_security_paths(make_security(False, "c1")[1]) == {}
    assert remote_security_paths(make_security(Security(), "c1")[1]) == {}
    assert EntrySettings.for_tls_files("c1", 1.0, files).remote_security == TLS_PATHS
    assert EntrySettings.for_tls_files("c1", 1.0, {}).security_options() is None


# -- worker entries -------------------------------------------------------------------------------


def test_group_entry_with_tls() -> None:
    inv = inventory()
    assert entries.worker_entry(settings(), inv.hosts["n1"]) == {
        "cls": RemoteNanny,
        "options": {
            "host": "n1",
            "cluster": "lab-0123abcd",
            "options": {
                "nthreads": None,
                "memory_limit": "auto",
                "dashboard_address": "127.0.0.1:0",
                "resources": {"GPU": 1},
                "local_directory": "/scratch",
                "interface": "ib0",
                "security": REMOTE_SECURITY,
            },
            "env": {"OMP_NUM_THREADS": "1"},
            "start_timeout": 42.0,
        },
        "group": ["-0", "-1"],
    }


def test_single_worker_entry_without_tls_with_cluster_options() -> None:
    inv = inventory()
    spec = entries.worker_entry(settings(tls=False, worker_options={"nthreads": 3}), inv.hosts["n2"])
    assert spec == {
        "cls": RemoteWorker,
        "options": {
            "host": "n2",
            "cluster": "lab-0123abcd",
            # inventory options, then the host's worker_options, then the cluster's
            "options": {"nthreads": 3, "memory_limit": 2 * 2**30, "dashboard_address": "127.0.0.1:0", "lifetime": "1h"},
            "env": {},
            "start_timeout": 42.0,
        },
    }
    assert "group" not in spec


def test_new_spec_class_and_options() -> None:
    host = inventory().hosts["n1"]

    class MyWorker(RemoteWorker):
        pass

    # SpecCluster's default new_spec: nothing changes
    default = entries.worker_entry(settings(), host, {"cls": RemoteNanny, "options": {}})
    assert default == entries.worker_entry(settings(), host)
    # A process class replaces the inventory's; its options win
    mine = entries.worker_entry(settings(), host, {"cls": MyWorker, "options": {"nthreads": 7}})
    assert mine["cls"] is MyWorker
    assert mine["options"]["options"]["nthreads"] == 7
    # A class that is no process interface is ignored, RemoteNanny never overrides a bare worker
    assert entries.worker_entry(settings(), host, {"cls": dict})["cls"] is RemoteNanny
    worker_host = inventory().hosts["n2"]
    assert entries.worker_entry(settings(), worker_host, {"cls": RemoteNanny})["cls"] is RemoteWorker


def test_complete_a_user_written_entry() -> None:
    inv = inventory()
    hosts = {h.name: h for h in inv.worker_hosts}
    spec = {"cls": "speccluster_ssh.process.RemoteWorker", "options": {"host": "n2", "options": {"nthreads": 3}}}
    assert entries.complete_entry(settings(), spec, hosts) == {
        "cls": RemoteWorker,
        "options": {
            "host": "n2",
            "options": {"nthreads": 3, "security": REMOTE_SECURITY, "dashboard_address": "127.0.0.1:0"},
            "cluster": "lab-0123abcd",
            "start_timeout": 42.0,
            "env": {},
        },
    }
    kept = entries.complete_entry(
        settings(tls=False),
        {"cls": RemoteNanny, "options": {"host": "n1", "env": {"X": "1"}, "start_timeout": 5}},
        hosts,
    )
    assert kept["options"] == {
        "host": "n1", "env": {"X": "1"}, "start_timeout": 5, "cluster": "lab-0123abcd",
        "options": {"dashboard_address": "127.0.0.1:0"},
    }
    with pytest.raises(UserError, match="RemoteNanny or RemoteWorker"):
        entries.complete_entry(settings(), {"cls": dict, "options": {"host": "n1"}}, hosts)
    with pytest.raises(UserError, match="not a worker host"):
        entries.complete_entry(settings(), {"cls": RemoteWorker, "options": {"host": "s"}}, hosts)


# -- placement over a worker_spec -------------------------------------------------------------------


def test_next_entries_fill_slots_like_the_cluster() -> None:
    inv = inventory()
    hosts = {h.name: h for h in inv.worker_hosts}
    spec: dict[str, Any] = {"0": {"options": {"host": "n2"}}}  # e.g. a user entry named "0"
    counter = 0
    names = []
    while True:
        entry, counter = entries.next_entry(settings(), hosts, spec, counter)
        if entry is None:
            break
        names.extend((name, s["options"]["host"]) for name, s in entry.items())
        spec.update(entry)
    # spread, with n2 already holding one entry: n1, then n2, then nothing is free
    assert names == [("1", "n1"), ("2", "n2")]
    assert counter == 3
    assert entries.slots_used(spec) == {"n1": 1, "n2": 2}
    assert entries.next_entry(settings(), hosts, {}, 0, unavailable={"n1", "n2"}) == (None, 0)
    packed, _ = entries.next_entry(settings(), hosts, {}, 0, policy="pack")
    assert packed is not None and packed["0"]["options"]["host"] == "n1"
    assert entries.next_entry_name({"0", "1", "3"}, 0) == ("2", 3)
    assert entries.member_names("4", packed["0"]) == ["4-0", "4-1"]
    assert entries.member_names(5, {"options": {}}) == ["5"]
    assert entries.capacity_workers(inv.worker_hosts) == 2 + 2
    assert entries.capacity_workers(inv.worker_hosts, {"n2"}) == 2
    chosen = entries.choose_entry_host(hosts, {"n1": 1}, (), "spread")
    assert chosen is not None and chosen.name == "n2"


# -- GPU shares, held by entries of the spec ----------------------------------------------------------


def gpu_inventory() -> Inventory:
    return Inventory.from_hosts([
        {"name": "g", "groups": ["workers"], "speccluster_gpus": 4, "speccluster_slots": 2},
        {"name": "a", "groups": ["workers"], "speccluster_gpus": "auto", "speccluster_slots": 2,
         "speccluster_nworkers": 2},
    ])


def test_entries_hold_gpu_slots_by_name_and_a_removed_one_frees_its_slot() -> None:
    hosts = {h.name: h for h in gpu_inventory().worker_hosts}
    spec: dict[str, Any] = {}
    counter = 0
    while True:
        entry, counter = entries.next_entry(settings(), hosts, spec, counter, policy="pack")
        if entry is None:
            break
        spec.update(entry)
    shares = {k: (s["options"]["host"], s["options"]["gpu_slot"], s["options"]["gpus"]) for k, s in spec.items()}
    assert shares == {
        "0": ("g", 0, [["0", "1"]]),
        "1": ("g", 1, [["2", "3"]]),
        "2": ("a", 0, "auto"),  # its devices are those the agent finds: slot 0's share of them
        "3": ("a", 1, "auto"),
    }
    assert entries.gpus_held(spec) == {"g": {"0": 0, "1": 1}, "a": {"2": 0, "3": 1}}
    del spec["0"]
    placed = entries.place_entry(settings(), hosts, entries.slots_used(spec), policy="pack",
                                 gpus_held=entries.gpus_held(spec))
    assert placed is not None and placed["options"]["host"] == "g"
    assert (placed["options"]["gpu_slot"], placed["options"]["gpus"]) == (0, [["0", "1"]])
    # Rebuilt in place on a full host (its variables changed): no GPU rather than a shared one.
    stay = entries.place_entry(settings(), hosts, {}, stay="g", gpus_held=entries.gpus_held({**spec, "9": placed}))
    assert stay is not None and (stay["options"]["gpu_slot"], stay["options"]["gpus"]) == (None, [[]])


def test_a_user_written_entry_takes_a_free_gpu_slot_unless_it_names_one() -> None:
    hosts = {h.name: h for h in gpu_inventory().worker_hosts}
    held = {"g": {"5": 0}}
    user = entries.complete_entry(settings(), {"cls": RemoteNanny, "options": {"host": "g"}}, hosts, held)
    assert (user["options"]["gpu_slot"], user["options"]["gpus"]) == (1, [["2", "3"]])
    own = entries.complete_entry(settings(), {"cls": RemoteNanny, "options": {"host": "g", "gpus": [["3"]]}}, hosts, held)
    assert own["options"]["gpus"] == [["3"]] and "gpu_slot" not in own["options"]


# -- scheduler entries ------------------------------------------------------------------------------


# -- placing a new or moved entry ------------------------------------------------------------------
# n1 has 1 slot, n2 has 2; the policy alone picks n1 first (spread and pack).


@pytest.mark.parametrize(
    ("used", "options", "host"),
    [
        ({}, {}, "n1"),
        ({}, {"policy": "pack"}, "n1"),
        ({"n1": 1}, {}, "n2"),
        ({"n1": 1, "n2": 2}, {}, None),  # every slot taken
        ({}, {"unavailable": {"n1"}}, "n2"),
        ({}, {"unavailable": {"n1", "n2"}}, None),
        ({}, {"prefer": "n2"}, "n2"),  # a usable preferred host wins over the policy
        ({"n2": 2}, {"prefer": "n2"}, "n1"),  # ... unless it is full
        ({}, {"prefer": "n2", "unavailable": {"n2"}}, "n1"),  # ... or unusable
        ({}, {"prefer": "zz"}, "n1"),  # ... or not a worker host
        ({"n1": 1, "n2": 2}, {"leaving": "n1"}, "n1"),  # a moved entry's own slot counts as free
        ({"n1": 1, "n2": 2}, {"leaving": "n2"}, "n2"),
        ({"n1": 1}, {"leaving": "n2"}, "n2"),  # a host it held no slot on frees nothing
        ({"n1": 1}, {"stay": "n1", "unavailable": {"n1"}}, "n1"),  # rebuilt on its host whatever its state
    ],
)
def test_place_entry(used: dict[str, int], options: dict[str, Any], host: str | None) -> None:
    inv = inventory()
    hosts = {h.name: h for h in inv.worker_hosts}
    before = dict(used)
    spec = entries.place_entry(settings(), hosts, used, **options)
    assert used == before  # the caller's count is not changed
    if host is None:
        assert spec is None
    else:
        # Host and options are those of the factory: placing adds nothing of its own.
        assert spec == entries.worker_entry(settings(), inv.hosts[host])


def test_place_entry_applies_new_spec() -> None:
    inv = inventory()
    hosts = {h.name: h for h in inv.worker_hosts}
    new_spec = {"cls": RemoteNanny, "options": {"nthreads": 5}}
    spec = entries.place_entry(settings(), hosts, {"n1": 1}, new_spec=new_spec)
    assert spec == entries.worker_entry(settings(), inv.hosts["n2"], new_spec)
    assert spec is not None and spec["options"]["options"]["nthreads"] == 5


def test_remote_scheduler_entry() -> None:
    host = inventory().hosts["s"]
    assert entries.remote_scheduler_entry(settings(), host, 8787, {"idle_timeout": "1h"}) == {
        "cls": RemoteScheduler,
        "options": {
            "host": "s",
            "cluster": "lab-0123abcd",
            "options": {
                "port": 0,
                "dashboard_address": "127.0.0.1:8790",
                "interface": "eth1",
                "security": REMOTE_SECURITY,
                "protocol": "tls",
                "idle_timeout": "1h",
            },
            "env": {"A": "1"},
            "start_timeout": 42.0,
        },
    }
    plain = Inventory.from_hosts([{"name": "s", "groups": ["scheduler"]}, {"name": "w", "groups": ["workers"]}])
    assert entries.remote_scheduler_entry(settings(tls=False), plain.hosts["s"], 8787)["options"]["options"] == {
        "port": 0, "dashboard_address": "127.0.0.1:8787",
    }


def test_local_scheduler_entry() -> None:
    sec = Security()
    assert entries.local_scheduler_entry(Scheduler, sec, 0, 8787, {"port": 9000}) == {
        "cls": Scheduler,
        "options": {
            "host": "", "port": 9000, "dashboard_address": "127.0.0.1:8787", "security": sec, "protocol": "tcp",
        },
    }


def test_host_vars_go_in_every_kind_of_entry_of_the_host() -> None:
    """The variables a host sends with each start (rows marked ``request``) are in its worker, scheduler and user-written entries."""
    inv = Inventory.from_hosts([
        {"name": "s", "groups": ["scheduler"], "speccluster_dask_config": {"x": 1}},
        {"name": "n1", "groups": ["workers"], "speccluster_dask_config": {"distributed.worker.memory.target": 0.5}},
    ])
    sent = {"dask_config": {"distributed": {"worker": {"memory": {"target": 0.5}}}}}
    assert inv.hosts["n1"].request_vars() == sent
    assert entries.worker_entry(settings(), inv.hosts["n1"])["options"]["host_vars"] == sent
    assert entries.remote_scheduler_entry(settings(), inv.hosts["s"], 8787)["options"]["host_vars"] == {"dask_config": {"x": 1}}
    user = entries.complete_entry(settings(), {"cls": RemoteNanny, "options": {"host": "n1"}}, {"n1": inv.hosts["n1"]})
    assert user["options"]["host_vars"] == sent
