"""``plan`` fails where ``up`` would, with the same stderr and exit status; no argument plans on localhost.

Both commands call one function for the checks ``up`` makes before it
starts (:func:`speccluster_ssh.cli.common._prepare_up`), so each bad case
here must give byte-identical stderr from the two, and ``up`` must leave
no state behind.
"""

from __future__ import annotations

import json
from pathlib import Path

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
