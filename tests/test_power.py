"""Machines that sleep (issue 25) without a lab: placeholders, power states, decisions, the variables, the commands."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from speccluster_ssh.cli import main
from speccluster_ssh.errors import HostError
from speccluster_ssh.hosts import HostTable
from speccluster_ssh.inventory import Inventory, InventoryError
from speccluster_ssh.power import Power, PowerBook, PlaceholderError, fill_command, hosts_to_wake, on_host, placeholders
from speccluster_ssh.powerctl import PowerKeeper, run_command
from speccluster_ssh.reporting import summarize, summary_line
from speccluster_ssh.units import parse_duration


# -- placeholders -----------------------------------------------------------------------------------
def test_placeholders_fill_one_element_each_and_nothing_is_read_by_a_shell() -> None:
    argv = ["ipmitool", "-H", "{bmc_host}", "-U", "{bmc_user}", "chassis", "power", "on", "--mac={speccluster_mac}"]
    evil = "$(touch /tmp/x); rm -rf / `id` 'a b'"
    filled = fill_command(argv, {"bmc_host": "10.0.0.9", "bmc_user": 7, "speccluster_mac": evil}, "h1")
    assert filled == ["ipmitool", "-H", "10.0.0.9", "-U", "7", "chassis", "power", "on", f"--mac={evil}"]
    assert len(filled) == len(argv)
    assert placeholders(argv) == ["bmc_host", "bmc_user", "speccluster_mac"]


def test_a_value_with_braces_is_not_filled_again() -> None:
    assert fill_command(["{a}"], {"a": "{b}", "b": "no"}, "h") == ["{b}"]
    assert fill_command(["{not a name}", "{}"], {}, "h") == ["{not a name}", "{}"]


@pytest.mark.parametrize("variables, why", [({}, "not set"), ({"mac": None}, "not set"),
                                            ({"mac": ["a"]}, "not a string"), ({"mac": True}, "not a string")])
def test_a_missing_or_odd_variable_names_the_host_and_the_variable(variables: dict[str, Any], why: str) -> None:
    with pytest.raises(PlaceholderError) as info:
        fill_command(["wakeonlan", "{mac}"], variables, "node07")
    assert (info.value.host, info.value.variable) == ("node07", "mac") and why in info.value.why


def test_a_power_off_starting_with_ssh_runs_on_the_host() -> None:
    assert on_host(["ssh", "sudo", "systemctl", "suspend"]) and not on_host(["ipmitool", "ssh"]) and not on_host([])


# -- the state machine --------------------------------------------------------------------------------
def test_a_host_woken_by_the_cluster_is_awake_and_one_that_answered_is_on() -> None:
    book = PowerBook()
    assert book.label("h1", 0) == "" and book.state("h1") == Power.UNKNOWN
    book.answered("h1", 1.0)
    book.no_answer("h2", 1.0)
    assert book.label("h1", 2) == "on" and book.label("h2", 2) == "asleep" and book.not_awake() == {"h2"}
    book.waking_up("h2", 10.0)
    book.no_answer("h2", 11.0)  # a failed connection while it boots: still waking
    assert book.label("h2", 22.4) == "waking (12 s)" and book.waking() == ["h2"]
    book.answered("h2", 30.0)
    assert book.label("h2", 31) == "awake (woken)" and book.woken("h2") and not book.woken("h1")
    book.answered("h2", 40.0)  # a later agent start on it: still woken by us
    assert book.state("h2") == Power.AWAKE
    book.powered_off("h2", 50.0)
    assert book.state("h2") == Power.ASLEEP and book.as_dict("h2", 51) == {"power": "asleep", "power_label": "asleep"}


def test_only_a_woken_host_idle_long_enough_is_due_unless_managed_always() -> None:
    book = PowerBook()
    book.answered("on", 0.0)
    book.waking_up("woken", 0.0)
    book.answered("woken", 1.0)
    rules = {"on": (10.0, False), "woken": (10.0, False)}
    book.see_use({"woken"}, 2.0)  # busy at 2: idle only from the next look on
    book.see_use(set(), 5.0)
    assert book.idle_due(rules, 14.9) == [] and book.next_due(rules) == 15.0
    assert book.idle_due(rules, 15.0) == ["woken"]  # "on" was idle longer, but it was not woken by us
    assert book.idle_due({**rules, "on": (10.0, True)}, 15.0) == ["on", "woken"]
    book.see_use({"woken"}, 16.0)  # work came back: its idle time starts again
    assert book.idle_due(rules, 100.0) == [] and book.next_due(rules) is None


@pytest.mark.parametrize("needed, sleeping, woken", [
    (0, [("h2", 1), ("h3", 1)], []),
    (1, [("h2", 1), ("h3", 1)], ["h2"]),
    (2, [("h2", 4), ("h3", 1)], ["h2"]),
    (3, [("h2", 0), ("h3", 2), ("h4", 2)], ["h3", "h4"]),
    (9, [("h2", 1), ("h3", 1)], ["h2", "h3"]),
])
def test_as_few_sleeping_hosts_are_woken_as_give_the_workers(needed: int, sleeping: list[tuple[str, int]],
                                                              woken: list[str]) -> None:
    assert hosts_to_wake(needed, sleeping) == woken


# -- the inventory ------------------------------------------------------------------------------------
def test_power_variables_are_read_and_checked() -> None:
    host = Inventory.from_hosts([{
        "name": "h1", "speccluster_mac": "52:54:00:12:34:56",
        "speccluster_power_on": ["wakeonlan", "{speccluster_mac}"],
        "speccluster_power_off": ["ssh", "sudo", "systemctl", "suspend"], "speccluster_idle_poweroff": "30min",
    }]).hosts["h1"]
    assert host.power_on == ("wakeonlan", "{speccluster_mac}") and host.power_off[0] == "ssh"
    assert (host.idle_poweroff, host.boot_timeout, host.power_manage) == (1800.0, 300.0, "woken")


@pytest.mark.parametrize("variables, said", [
    ({"speccluster_power_on": ["wakeonlan", "{speccluster_mac}"]},
     "speccluster_power_on on host h1 uses {speccluster_mac}, but speccluster_mac is not set for that host"),
    ({"speccluster_power_on": "wakeonlan 52:54:00:12:34:56"}, "must be a list of arguments"),
    ({"speccluster_power_off": ["ssh"]}, "[ssh] alone runs nothing"),
    ({"speccluster_power_on": ["ipmitool", "chassis", "power", True]}, "quote on, off, yes and no: 'on'"),
    ({"speccluster_idle_poweroff": "soon"}, "must be a duration greater than 0"),
    ({"speccluster_power_manage": "sometimes"}, "must be one of 'woken' or 'always'"),
])
def test_a_bad_power_variable_is_an_inventory_error_naming_the_host(variables: dict[str, Any], said: str) -> None:
    with pytest.raises(InventoryError) as info:
        Inventory.from_hosts([{"name": "h1", **variables}])
    assert said in str(info.value) and "h1" in str(info.value), str(info.value)


def test_a_missing_variable_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "lab.yml"
    path.write_text("all:\n  hosts:\n    node07:\n      speccluster_power_on: [wakeonlan, '{speccluster_mac}']\n")
    result = CliRunner().invoke(main, ["inventory", str(path), "--hosts"])
    assert result.exit_code == 2, result.output
    assert "node07" in result.output and "speccluster_mac" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("text, seconds", [(30, 30.0), ("90s", 90.0), ("30min", 1800.0), ("30m", 1800.0),
                                           ("2h", 7200.0), ("1.5 hours", 5400.0), ("1d", 86400.0), ("0", 0.0)])
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-1", "soon", "3 fortnights", True, float("inf"), None, "1e3x"])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- the commands and placement -----------------------------------------------------------------------
class _Cluster:
    """Just enough of a cluster for the power keeper: its log."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.worker_spec: dict[str, Any] = {}

    def log_event(self, message: str, *, echo: bool = True) -> None:
        self.events.append(message)


class _Pool:
    def __init__(self, table: HostTable) -> None:
        self.table = table
        self.power: Any = None
        self.cluster_id = "nap-1a2b"


def _keeper(hosts: list[dict[str, Any]]) -> tuple[PowerKeeper, _Cluster]:
    table = HostTable(Inventory.from_hosts(hosts).worker_hosts)
    cluster = _Cluster()
    return PowerKeeper(cluster, _Pool(table), None), cluster  # type: ignore[arg-type]


def test_a_failing_power_command_is_a_host_error_with_its_stderr_and_is_logged() -> None:
    script = "import sys; print('sent'); sys.stderr.write('BMC 10.0.0.9: session refused\\n'); sys.exit(3)"
    keeper, cluster = _keeper([{"name": "h1", "speccluster_power_on": [sys.executable, "-c", script]}])
    with pytest.raises(HostError) as info:
        asyncio.run(keeper.run_power(keeper.table.specs["h1"], "power on", keeper.table.specs["h1"].power_on))
    assert "failed with exit status 3: BMC 10.0.0.9: session refused" in info.value.reason
    assert "session refused" in info.value.tail
    assert cluster.events == [f"host h1: power on: {sys.executable} exited 3; stdout: sent; "
                              "stderr: BMC 10.0.0.9: session refused"]


def test_a_power_command_that_cannot_run_is_a_host_error() -> None:
    keeper, _ = _keeper([{"name": "h1", "speccluster_power_on": ["/no/such/wakeonlan", "x"]}])
    with pytest.raises(HostError) as info:
        asyncio.run(keeper.run_power(keeper.table.specs["h1"], "power on", ["/no/such/wakeonlan", "x"]))
    assert "cannot be run" in info.value.reason


def test_run_command_passes_each_argument_as_it_is(tmp_path: Path) -> None:
    marker = tmp_path / "x"
    status, out, _ = asyncio.run(run_command([sys.executable, "-c", "import sys; print(sys.argv[1:])",
                                              f"$(touch {marker})", "a b"]))
    assert status == 0 and out == repr([f"$(touch {marker})", "a b"]) and not marker.exists()


def test_sleeping_hosts_are_placed_on_last_and_one_at_a_time() -> None:
    on = ["wakeonlan", "{speccluster_mac}"]
    keeper, _ = _keeper([{"name": n, "speccluster_mac": "m", "speccluster_power_on": on} for n in ("h1", "h2", "h3")]
                        + [{"name": "h4"}])
    keeper.book.answered("h1", 0)
    keeper.book.no_answer("h2", 0)
    keeper.book.no_answer("h3", 0)
    rounds = keeper.placement_rounds({"h4"})
    assert rounds == [({"h2", "h3", "h4"}, None), ({"h3", "h4"}, "h2"), ({"h2", "h4"}, "h3")]
    keeper.book.waking_up("h2", 1)
    assert keeper.placement_rounds(set()) == [({"h2", "h3"}, None), ({"h3"}, None), (set(), "h3")]
    keeper.table.drain("h3", "by hand")  # a drained host is not woken
    assert keeper.placement_rounds(set()) == [({"h2", "h3"}, None), ({"h3"}, None)]


def test_summary_counts_sleeping_hosts_apart() -> None:
    hosts = {"h1": {"state": "up", "power": "on"}, "h2": {"state": "asleep", "power": "asleep"},
             "h3": {"state": "waking", "power": "waking"}}
    summary = summarize(hosts, [{"status": "running"}], 1)
    assert summary_line(summary) == "1 of 3 hosts up (2 asleep), 1 of 1 workers"


def test_the_readme_inventory_of_machines_that_sleep_is_read_as_it_says(tmp_path: Path) -> None:
    from speccluster_ssh.inventory import load_inventory

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Machines that sleep"):]
    example = section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml\n") + 8)]
    (tmp_path / "sleep.yml").write_text(example)
    hosts = {h.name: h for h in load_inventory(tmp_path / "sleep.yml").worker_hosts}
    pc = hosts["pc02.lab.example.org"]
    assert fill_command(pc.power_on, pc.vars, pc.name) == ["wakeonlan", "52:54:00:12:34:02"]
    assert on_host(pc.power_off) and pc.idle_poweroff == 1800.0 and pc.boot_timeout == 180.0
    srv = hosts["srv01.lab.example.org"]
    assert fill_command(srv.power_on, srv.vars, srv.name) == [
        "ipmitool", "-I", "lanplus", "-H", "srv01-bmc.lab.example.org", "-U", "power", "-E", "chassis", "power", "on"]
