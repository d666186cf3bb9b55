"""Who woke a host, as ``hosts`` reads it (``powermarks.py``, issue 25): the records, the labels, the JSON. No lab."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh import labview as V
from speccluster_ssh.agent import leases as L
from speccluster_ssh.agent.lease_keeper import LeaseKeeper
from speccluster_ssh.inventory import Inventory
from speccluster_ssh.powermarks import PowerMark, WakingMarks, head_power_marks, label_text, power_label

NOW = 1_700_000_000.0


def shared_dir(tmp_path: Path) -> str:
    path = tmp_path / "leases"
    path.mkdir()
    path.chmod(0o1777)
    return str(path)


def mark(host: str, power: str, since: float = NOW - 12, name: str = "nap") -> PowerMark:
    return PowerMark(host=host, power=power, user="alice", cluster=f"{name}-1a2b", name=name, head="head1", since=since)


def sleeper(**extra: Any) -> Any:
    spec = {"name": "h2", "ansible_host": "192.0.2.2", "speccluster_slots": 1,
            "speccluster_power_on": ["wakeonlan", "52:54:00:00:00:02"], **extra}  # fmt: skip
    return Inventory.from_hosts([spec]).hosts["h2"]


def test_the_label_is_waking_for_a_host_not_answering_and_awake_for_one_answering() -> None:
    marks = [mark("h2", "waking"), mark("h2", "woken", name="late", since=NOW - 1), mark("h3", "woken")]
    assert power_label("asleep", marks, "h2") == ("waking", marks[0])
    assert power_label("on", marks, "h2") == ("awake", marks[1])
    assert power_label("on", marks, "h4") == ("on", None), "records of other hosts do not count"
    assert power_label("", marks, "h2") == ("", None), "not a host that sleeps"
    assert power_label("asleep", [mark("h2", "woken")], "h2") == ("asleep", None), "woken, but it no longer answers"
    assert label_text("waking", marks[0], NOW) == "waking (12 s)"
    assert label_text("awake", marks[1], NOW) == "awake (woken by late of alice)"
    assert label_text("asleep", None, NOW) == "asleep"


def test_hosts_shows_waking_and_awake_in_its_rows_lines_and_json() -> None:
    waking = V.host_view(sleeper(), V.HostSurvey("h2", False, error="cannot connect"), [mark("h2", "waking")])
    assert (waking.power, waking.power_by and waking.power_by.name) == ("waking", "nap")
    assert V.table_rows([waking], NOW)[0][-1] == "waking (12 s)"
    assert V.problem_lines([waking]) == ["h2: waking (powered on by nap of alice), not reached yet: cannot connect"]
    woken = V.host_view(sleeper(), V.HostSurvey("h2", True, {}, (), power_marks=(mark("h2", "woken"),)))
    assert woken.power == "awake" and V.table_rows([woken], NOW)[0][-1] == "free"
    (line,) = V.power_lines([woken], NOW)
    assert line.startswith("h2: awake (woken by nap of alice, from head1 at ")
    data = V.lab_json([waking, woken])["hosts"]
    assert [(h["power"], h["power_since"]) for h in data] == [("waking", NOW - 12), ("awake", NOW - 12)]
    assert data[1]["power_by"] == {"user": "alice", "cluster": "nap-1a2b", "name": "nap", "head": "head1"}
    plain = V.lab_json([V.host_view(sleeper(), V.HostSurvey("h2", True, {}, ()))])["hosts"][0]
    assert (plain["power"], plain["power_since"], plain["power_by"]) == ("on", None, None)


def test_a_power_record_is_listed_apart_from_the_leases_and_ends_with_its_holder(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    keeper = LeaseKeeper("nap-1a2b", path)
    reply = keeper.handle("lease_power", {"record": {"name": "nap", "head": "head1", "host": "h2"}})
    assert reply["ok"] and reply["lease"].startswith(f"speccluster-power.{os.getuid()}.")
    listed = LeaseKeeper("other-9", path).handle("lease_list", {})
    assert listed["records"] == [], "a power record holds nothing: no lease, no want"
    (record,) = listed["power"]
    assert PowerMark.from_record(record) == PowerMark("h2", "woken", record["user"], "nap-1a2b", "nap", "head1",
                                                      record["since"])  # fmt: skip
    claim = {"cluster": "c", "name": "c", "head": "h", "entry": "0", "host": "h2", "holds": {"slots": 1}}
    assert isinstance(L.lease_claim(path, claim, {"slots": 1}), L.LeaseHandle), "it takes no capacity"
    keeper.release_all()
    assert LeaseKeeper("other-9", path).handle("lease_list", {})["power"] == []
    with pytest.raises(L.LeaseError, match="bad power record"):
        L.lease_power(path, {"cluster": "c", "power": "dozing"})


def _hold_and_die(path: str) -> None:
    L.lease_power(path, {"cluster": "gone-1", "host": "h3", "power": "waking"})
    os._exit(0)  # the process dies holding it, as a killed head would


def test_waking_records_on_the_head_are_read_by_hosts_and_end_with_the_cluster(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    marks = WakingMarks("nap-1a2b", "nap", path)
    marks.start("h2")
    (seen,) = head_power_marks(path)
    assert (seen.host, seen.power, seen.name) == ("h2", "waking", "nap")
    marks.end("h2")
    assert head_power_marks(path) == []
    process = multiprocessing.get_context("fork").Process(target=_hold_and_die, args=(path,))
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert head_power_marks(path) == [], "its holder died: the record is dead"
    marks.start("h2")
    marks.close()
    assert head_power_marks(path) == []
    assert head_power_marks(str(tmp_path / "missing")) == [], "an unreadable directory: no record, no failure"
