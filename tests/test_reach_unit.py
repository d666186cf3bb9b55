"""The choice of where the scheduler runs and how the head reaches it (no lab, no I/O)."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest

from speccluster_ssh.errors import UserError
from speccluster_ssh.inventory import load_inventory
from speccluster_ssh.inventory._errors import InventoryError
from speccluster_ssh.forwards import split_address
from speccluster_ssh.reach import ReachProbe, choose_reach, peer_problem, reach_setting

WORKERS = ["h1", "h2", "h3"]


def probe(to_head: dict[str, str], via: dict[str, str | None] | None = None,
          from_head: dict[str, str] | None = None) -> ReachProbe:
    return ReachProbe(to_head=to_head, via=dict(via or {}), from_head=dict(from_head or {}))


def test_auto_every_host_reaches_the_head_is_direct_on_the_head() -> None:
    choice = choose_reach("auto", WORKERS, None, probe({h: "" for h in WORKERS}))
    assert (choice.mode, choice.scheduler_host) == ("direct", None)
    assert "every host that answered (3) and the head can open connections to each other" in choice.why


def test_auto_a_host_that_cannot_reach_the_head_forwards_and_picks_a_host() -> None:
    choice = choose_reach("auto", WORKERS, None, probe({"h1": "", "h2": "cannot reach the head at x: refused", "h3": ""}))
    assert (choice.mode, choice.scheduler_host) == ("forward", "h1")
    assert choice.why.startswith("h2 cannot open a connection to the head (h2: cannot reach the head at x: refused)")
    assert "the scheduler runs on h1" in choice.why
    assert choice.as_dict() == {"mode": "forward", "why": choice.why, "scheduler_host": "h1", "setting": "auto"}


def test_auto_the_head_cannot_reach_the_hosts_ports_forwards() -> None:
    # Hosts reach the head, but a scheduler there could not connect to its workers.
    found = probe({h: "" for h in WORKERS}, from_head={"h1": "", "h2": "10.0.0.2:4000: no answer", "h3": ""})
    choice = choose_reach("auto", WORKERS, None, found)
    assert (choice.mode, choice.scheduler_host) == ("forward", "h1")
    assert choice.why.startswith("the head cannot open a connection to h2 (h2: 10.0.0.2:4000: no answer), so")


def test_the_picked_host_answered_and_is_reached_without_a_jump_if_one_is() -> None:
    # h1 did not answer (absent), h2 is behind a jump, h3 is direct.
    found = probe({"h2": "x", "h3": "x"}, via={"h2": "bastion", "h3": None})
    assert choose_reach("auto", WORKERS, None, found).scheduler_host == "h3"
    found = probe({"h2": "x", "h3": "x"}, via={"h2": "bastion", "h3": "bastion"})
    choice = choose_reach("auto", WORKERS, None, found)
    assert choice.scheduler_host == "h2" and "(through jump host bastion)" in choice.why


def test_auto_with_a_scheduler_host() -> None:
    every = {h: "" for h in [*WORKERS, "s"]}
    assert choose_reach("auto", WORKERS, "s", probe(every, from_head={"s": ""})).mode == "direct"
    behind = choose_reach("auto", WORKERS, "s", probe(every, via={"s": "bastion"}, from_head={"s": "no answer"}))
    assert (behind.mode, behind.scheduler_host) == ("forward", "s")
    assert "which it reaches over SSH only through jump host bastion (no answer)" in behind.why
    # Behind a jump host, but its ports answer the head: direct.
    assert choose_reach("auto", WORKERS, "s", probe(every, via={"s": "bastion"}, from_head={"s": ""})).mode == "direct"
    blocked = choose_reach("auto", WORKERS, "s", probe(every, from_head={"s": "10.0.0.9:4000: no answer"}))
    assert (blocked.mode, blocked.scheduler_host) == ("forward", "s")
    assert "(10.0.0.9:4000: no answer)" in blocked.why


def test_explicit_modes_need_no_probe() -> None:
    assert choose_reach("direct", WORKERS, None, None).scheduler_host is None
    assert choose_reach("direct", WORKERS, "s", None).scheduler_host == "s"
    # direct stays direct whatever the probes say: the user asked for it.
    assert choose_reach("direct", WORKERS, None, probe({"h1": "blocked"})).mode == "direct"
    forward = choose_reach("forward", WORKERS, None, None)
    assert (forward.mode, forward.scheduler_host, forward.setting) == ("forward", "h1", "forward")
    assert choose_reach("forward", WORKERS, "s", None).scheduler_host == "s"
    assert choose_reach("auto", WORKERS, None, None).mode == "direct"
    nobody = choose_reach("auto", WORKERS, None, probe({}))
    assert (nobody.mode, nobody.scheduler_host) == ("direct", None) and nobody.why.startswith("no host answered")
    with pytest.raises(UserError, match="'auto', 'direct' or 'forward'"):
        choose_reach("tunnel", WORKERS, None, None)


def test_peer_problem_is_one_plain_line() -> None:
    line = peer_problem("h3", {"h1": "Connection timed out", "h2": "Connection timed out"}, 2)
    assert line.startswith("cannot reach any of its peers (h1: Connection timed out)")
    assert "dask workers must reach each other directly" in line and "\n" not in line
    assert peer_problem("h3", {"h1": "refused"}, 3).startswith("cannot reach its peer h1 (h1: refused)")


def test_split_address() -> None:
    assert split_address("tls://10.0.0.3:8786") == ("tls", "10.0.0.3", 8786)
    assert split_address("tcp://[fe80::1]:9") == ("tcp", "fe80::1", 9)


def _inventory(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inv.yml"
    path.write_text(text)
    return path


def test_setting_from_inventory_config_and_argument(tmp_path: Path) -> None:
    plain = load_inventory(_inventory(tmp_path, "all:\n  hosts:\n    a:\n    b:\n"))
    assert reach_setting(plain) == "auto"
    with dask.config.set({"speccluster-ssh.scheduler-reach": "forward"}):
        assert reach_setting(plain) == "forward"
        assert reach_setting(plain, "Direct") == "direct"
    with dask.config.set({"speccluster-ssh.scheduler-reach": "sideways"}):
        with pytest.raises(UserError, match=r"speccluster-ssh.scheduler-reach in the dask config .* got 'sideways'"):
            reach_setting(plain)
    inv = load_inventory(_inventory(tmp_path, "all:\n  vars:\n    speccluster_scheduler_reach: FORWARD\n  hosts:\n    a:\n"))
    assert reach_setting(inv) == "forward"


def test_bad_or_differing_inventory_values_name_the_host(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="speccluster_scheduler_reach on host a must be one of 'auto' or 'direct'"):
        load_inventory(_inventory(tmp_path, "all:\n  hosts:\n    a:\n      speccluster_scheduler_reach: tunnel\n"))
    inv = load_inventory(_inventory(
        tmp_path, "all:\n  hosts:\n    a:\n      speccluster_scheduler_reach: forward\n"
        "    b:\n      speccluster_scheduler_reach: direct\n",
    ))
    with pytest.raises(UserError, match=r"differs between hosts \('forward' on a; 'direct' on b\).*under all.vars"):
        reach_setting(inv)


def test_plan_says_how_the_head_would_reach_the_scheduler() -> None:
    from speccluster_ssh.inventory import Inventory
    from speccluster_ssh.planning import build_plan

    inv = Inventory.from_hosts(["10.9.0.1", "10.9.0.2"])
    auto = build_plan(inv, name="c", workers=None, placement="spread", tls=True)["scheduler_reach"]
    assert (auto["setting"], auto["mode"]) == ("auto", None)
    assert "decided by 'up'" in auto["why"]
    forward = build_plan(inv, name="c", workers=None, placement="spread", tls=True, scheduler_reach="forward")
    reach = forward["scheduler_reach"]
    assert (reach["setting"], reach["mode"], reach["scheduler_host"]) == ("forward", "forward", "10.9.0.1")
    direct = build_plan(inv, name="c", workers=None, placement="spread", tls=True, scheduler_reach="direct")
    assert (direct["scheduler_reach"]["mode"], direct["scheduler_reach"]["scheduler_host"]) == ("direct", None)
