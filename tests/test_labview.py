"""The view of a shared lab (``labview.py``, ``hosts``): its rows and JSON, built from records, no host contacted.

The survey itself (agents over SSH) is tested on the lab in ``test_labview_lab.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from speccluster_ssh import labview as V
from speccluster_ssh.cli import main
from speccluster_ssh.inventory import Inventory
from speccluster_ssh.leases import Amount, Lease

NOW = 1_700_000_000.0


def host(**extra: Any) -> Any:
    spec = {"name": "h1", "ansible_host": "192.0.2.1", "speccluster_slots": 4, **extra}
    return Inventory.from_hosts([spec]).hosts[str(spec["name"])]


def lease(user: str, cluster: str, slots: int, *, kind: str = "lease", since: float = NOW - 600, state: str = "",
          state_since: float = 0.0, gpus: tuple[str, ...] = (), host_name: str = "h1") -> Lease:  # fmt: skip
    return Lease(host=host_name, kind=kind, user=user, cluster=cluster, amount=Amount(slots=slots, gpus=gpus),
                 since=since, name=f"name-{cluster}", head="head1", entry="0", lease_id=f"id-{cluster}-{kind}",
                 state=state, state_since=state_since)  # fmt: skip


def test_capacity_comes_from_the_inventory_and_auto_gpus_from_the_facts() -> None:
    sized = V.inventory_capacity(host(speccluster_nworkers=2, speccluster_nthreads=3, speccluster_memory_limit="1 GiB"))
    assert sized == Amount(slots=4, cores=24, memory=8 * 2**30, gpus=())
    assert V.inventory_capacity(host()) == Amount(slots=4, cores=None, memory=None, gpus=())
    auto = host(speccluster_gpus="auto")
    assert V.inventory_capacity(auto, {"gpus": ["0", "1"]}).gpus == ("0", "1")
    assert V.inventory_capacity(auto).gpus == (), "no facts: no known device"
    assert V.inventory_capacity(host(speccluster_slots=2, speccluster_gpus=2)).gpus == ("0", "1")


def test_a_host_row_counts_every_cluster_s_leases_and_lists_holders_and_wants_oldest_first() -> None:
    spec = host(speccluster_gpus=[0, 1, 2, 3])
    leases = (
        lease("alice", "b-2", 1, since=NOW - 60, state="idle", state_since=NOW - 30, gpus=("1",)),
        lease("root", "a-1", 2, since=NOW - 600, state="busy", state_since=NOW - 300),
        lease("bob", "c-3", 2, kind="want", since=NOW - 10),
    )
    view = V.host_view(spec, V.HostSurvey("h1", True, {"gpus": []}, leases))
    assert view.capacity == Amount(slots=4, gpus=("0", "1", "2", "3"))
    assert view.free == Amount(slots=1, gpus=("0", "2", "3")), "every lease is subtracted, wants take nothing"
    assert [x.cluster for x in view.holders] == ["a-1", "b-2"] and [x.cluster for x in view.wants] == ["c-3"]
    data = V.lab_json([view])
    assert data["version"] == 1 and data["users"] == {"alice": 1, "root": 2}
    (row,) = data["hosts"]
    assert row["free"] == {"slots": 1, "cores": None, "memory": None, "gpus": ["0", "2", "3"]}
    first = row["holders"][0]
    assert first == {"user": "root", "cluster": "a-1", "name": "name-a-1", "head": "head1", "entry": "0",
                     "since": NOW - 600, "id": "id-a-1-lease",
                     "holds": {"slots": 2, "cores": None, "memory": None, "gpus": []}, "holds_text": "2 slots",
                     "state": "busy", "state_since": NOW - 300}  # fmt: skip
    assert row["holders"][1]["holds_text"] == "1 slot, GPUs 1"
    assert row["wants"][0]["wants_text"] == "2 slots" and "state" not in row["wants"][0]
    json.dumps(data)  # plain JSON
    rows = V.table_rows([view], NOW)
    assert rows[0][:3] == ("h1", "4 slots, GPUs 0,1,2,3", "1 slot, GPUs 0,2,3")
    assert rows[0][3:] == ("root", "name-a-1", "head1", "2 slots", V._clock(NOW - 600, NOW), "busy 5 min")
    assert rows[1][:3] == ("", "", "") and rows[1][3] == "alice" and rows[1][-1] == "idle 30 s"
    assert rows[2][3] == "bob" and rows[2][6] == "wants 2 slots" and rows[2][-1] == "waiting 10 s"
    assert V.holders_line(row) == ("root (name-a-1 from head1: 2 slots, busy); alice (name-b-2 from head1: "
                                   "1 slot, GPUs 1, idle); bob waits (name-c-3: 2 slots)")  # fmt: skip
    assert V.free_line(row) == "1 of 4 slots free"


def test_an_unreached_host_and_unreadable_leases_say_why() -> None:
    spec = host()
    views = V.lab_views([spec, host(name="h2")], {
        "h1": V.HostSurvey("h1", False, error="cannot connect: refused", fix="start sshd"),
    })
    assert [(v.host, v.reached, v.free) for v in views] == [("h1", False, None), ("h2", False, None)]
    assert views[1].error == "not surveyed"
    unread = V.host_view(spec, V.HostSurvey("h1", True, {}, None, error="the lease directory is a symlink"))
    assert unread.capacity == Amount(slots=4) and unread.free is None
    data = V.lab_json([*views, unread])
    assert data["hosts"][0]["capacity"] is None and data["hosts"][0]["fix"] == "start sshd"
    assert V.free_line(data["hosts"][2]) == "?"
    rows = V.table_rows([views[0], unread], NOW)
    assert rows[0][-1] == "not reached" and rows[1][-1] == "leases unknown"
    assert V.problem_lines([views[0], unread]) == [
        "h1: not reached: cannot connect: refused; fix: start sshd",
        "h1: leases not read: the lease directory is a symlink",
    ]


def test_a_free_host_has_one_row() -> None:
    view = V.host_view(host(), V.HostSurvey("h1", True, {}, ()))
    assert V.table_rows([view], NOW) == [("h1", "4 slots", "4 slots", "", "", "", "", "", "free")]
    assert V.holders_line(V.view_json(view)) == "no one"


def test_hosts_json_and_table_through_the_cli(tmp_path: Path, monkeypatch: Any) -> None:
    """The command shows what the survey found (the survey stubbed: no host here), and exits 1 on an unreached host."""
    inventory = tmp_path / "inv.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"h1": {"ansible_host": "192.0.2.1", "speccluster_slots": 2},
                                                       "h2": {"ansible_host": "192.0.2.2"}}}}))  # fmt: skip
    asked: list[Any] = []

    async def survey(hosts: Any, settings: Any, timeout: float) -> dict[str, V.HostSurvey]:
        asked.append((sorted(hosts), settings.known_hosts_policy, timeout))
        return {"h1": V.HostSurvey("h1", True, {}, (lease("root", "a-1", 1, state="busy", state_since=NOW),)),
                "h2": V.HostSurvey("h2", False, error="no answer within 10 s")}  # fmt: skip

    monkeypatch.setattr(V, "survey_hosts", survey)
    result = CliRunner().invoke(main, ["hosts", str(inventory), "--json", "--timeout", "7",
                                       "--known-hosts", "accept-new"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert asked == [(["h1", "h2"], "accept-new", 7.0)]
    data = json.loads(result.stdout)
    assert [(h["host"], h["reached"]) for h in data["hosts"]] == [("h1", True), ("h2", False)]
    assert data["hosts"][0]["free"]["slots"] == 1 and data["hosts"][0]["holders"][0]["state"] == "busy"
    table = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["hosts", str(inventory)])
    assert table.exit_code == 1
    assert "1 of 2 slots free on the 1 hosts read; held: root 1" in table.stdout, table.stdout
    assert "name-a-1" in table.stdout and "busy" in table.stdout and "not reached" in table.stdout
    assert "h2: not reached: no answer within 10 s" in table.stdout
    missing = CliRunner().invoke(main, ["hosts", str(tmp_path / "nope.yml")])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr


def test_plan_says_what_is_free_and_goes_on_without_the_hosts(tmp_path: Path, monkeypatch: Any) -> None:
    inventory = tmp_path / "inv.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"h1": {"ansible_host": "192.0.2.1", "speccluster_slots": 2}}}}))

    async def survey(hosts: Any, settings: Any, timeout: float) -> dict[str, V.HostSurvey]:
        return {"h1": V.HostSurvey("h1", True, {}, (lease("alice", "b-2", 1, state="idle", state_since=NOW),))}

    monkeypatch.setattr(V, "survey_hosts", survey)
    text = CliRunner().invoke(main, ["plan", str(inventory)])
    assert text.exit_code == 0, text.output
    assert "free now: 1 of 2 slots free; held: alice 1" in text.stdout
    assert "free now: 1 of 2 slots free; held by alice (name-b-2 from head1: 1 slot, idle)" in text.stdout
    data = json.loads(CliRunner().invoke(main, ["plan", str(inventory), "--json"]).stdout)
    assert data["now"]["hosts"][0]["free"]["slots"] == 1 and data["now"]["users"] == {"alice": 1}

    async def broken(hosts: Any, settings: Any, timeout: float) -> dict[str, V.HostSurvey]:
        raise RuntimeError("no event loop today")

    monkeypatch.setattr(V, "survey_hosts", broken)
    degraded = CliRunner().invoke(main, ["plan", str(inventory)])
    assert degraded.exit_code == 0, degraded.output
    assert "warning: could not ask the hosts what is free now: no event loop today" in degraded.stderr
    assert "entry 0" in degraded.stdout and "free now:" not in degraded.stdout
    offline = CliRunner().invoke(main, ["plan", str(inventory), "--offline", "--json"])
    assert json.loads(offline.stdout)["now"] is None
