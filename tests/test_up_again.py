"""``up`` for a name that runs: the same options change nothing; others are applied or refused.

The refusals need no cluster: a test holds the head lock of a cluster
directory with a ``state.json`` of its own. The applied changes (scale,
adapt, reload) run against a real detached cluster of a local host.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from speccluster_ssh import state as st
from speccluster_ssh.cli import main
from speccluster_ssh.cli.again import fixed_differences
from speccluster_ssh.head import UpOptions
from speccluster_ssh.inventory import load_inventory
from speccluster_ssh.planning import inventory_fingerprint

from test_cli_unit import Reaper, assert_one_error_line, poll




@pytest.fixture
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    yield r
    r.reap()


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_inventory(path: Path, slots: int) -> Path:
    host = {
        "ansible_connection": "local", "speccluster_python": sys.executable, "speccluster_nthreads": 1,
        "speccluster_slots": slots, "speccluster_memory_limit": "1 GiB",
    }
    path.write_text(json.dumps({"all": {"hosts": {"local1": host}}}))
    return path


class HeldCluster:
    """A cluster directory whose head lock this test holds, with a ``state.json`` the test writes."""

    def __init__(self, state_root: Path, inventory: Path, **options: Any) -> None:
        self.directory = st.make_cluster_dir("t1")
        self.lock = st.HeadLock(self.directory)
        assert self.lock.acquire()
        self.options = UpOptions(name="t1", inventory=str(inventory), placement="spread", timeout=60.0, **options)
        self.inventory = inventory

    def write(self, *, phase: str = "running", tls: bool = True, recorded: bool = True) -> None:
        state = st.ClusterState(name="t1", pid=os.getpid(), inventory=str(self.inventory), phase=phase, tls=tls)
        if recorded:
            state.up_options = json.loads(self.options.to_json())
            state.inventory_fingerprint = inventory_fingerprint(load_inventory(self.inventory))
        st.write_state(self.directory, state)


@pytest.fixture
def held(tmp_path: Path, state_home: Path) -> Iterator[HeldCluster]:
    cluster = HeldCluster(state_home, write_inventory(tmp_path / "inv.yml", 2), workers=1)
    yield cluster
    cluster.lock.release()


def test_up_again_with_other_tls_is_refused_in_one_line(held: HeldCluster) -> None:
    """The issue's case: up --workers 0 --no-tls on a running TLS cluster must not exit 0."""
    held.write(tls=True)
    line = assert_one_error_line(cli("up", str(held.inventory), "--name", "t1", "--workers", "0", "--no-tls"))
    assert line == ("speccluster-ssh: error: cluster t1 is running with TLS; --no-tls needs "
                    "'speccluster-ssh down --name t1' first")


def test_up_again_refuses_options_only_a_new_start_changes(held: HeldCluster) -> None:
    held.write(tls=False)
    inv = str(held.inventory)
    line = assert_one_error_line(cli("up", inv, "--name", "t1", "--workers", "1", "--no-tls", "--placement", "pack"))
    assert "running with --placement spread; --placement pack needs 'speccluster-ssh down --name t1'" in line
    line = assert_one_error_line(cli("up", inv, "--name", "t1", "--workers", "1"))
    assert "running with --no-tls; TLS needs" in line
    line = assert_one_error_line(cli("up", inv, "--name", "t1", "--workers", "1", "--no-tls",
                                     "--scheduler-reach", "direct", "--worker-group", "w"))
    assert "running with --worker-group workers and no --scheduler-reach;" in line
    assert "--worker-group w and --scheduler-reach direct need 'speccluster-ssh down --name t1' first" in line
    # Start-only options are not compared: the same cluster, nothing changed.
    same = cli("up", inv, "--name", "t1", "--workers", "1", "--no-tls", "--timeout", "5", "--min-workers", "1",
               "--detach")
    assert same.exit_code == 0, same.output
    assert "already running with these options; nothing changed" in same.stdout


def test_up_again_cannot_change_a_cluster_that_is_starting(held: HeldCluster) -> None:
    held.write(phase="starting", tls=False)
    inv = str(held.inventory)
    same = cli("up", inv, "--name", "t1", "--workers", "1", "--no-tls")
    assert same.exit_code == 0 and "already starting" in same.stdout, same.output
    line = assert_one_error_line(cli("up", inv, "--name", "t1", "--workers", "2", "--no-tls"))
    assert "cluster t1 is starting" in line and "once it runs" in line


def test_up_again_of_a_cluster_without_recorded_options_is_refused(held: HeldCluster) -> None:
    held.write(recorded=False)
    line = assert_one_error_line(cli("up", str(held.inventory), "--name", "t1"))
    assert "did not record its options" in line


def test_new_up_options_are_compared_too() -> None:
    """An option added to UpOptions later is refused by name without any change here."""
    running = {"placement": "spread", "dashboard_address": None, "workers": 1, "timeout": 60.0}
    wanted = {"placement": "spread", "dashboard_address": "0.0.0.0", "workers": 3, "timeout": 5.0}
    assert fixed_differences(running, wanted, True, True) == [
        ("no --dashboard-address", "--dashboard-address 0.0.0.0")
    ]


def test_up_again_applies_size_and_inventory(tmp_path: Path, state_home: Path, reaper: Reaper) -> None:
    inv = write_inventory(tmp_path / "inv.yml", 2)
    # More than the 2 slots: the warning is printed once, and the cluster does not repeat it.
    up = reaper.up_detached(state_home, "t1", str(inv), "--no-tls", "--workers", "3", "--timeout", "60")
    directory = state_home / "t1"
    assert up.returncode == 0, up.stderr
    assert up.stderr.count("asked for 3 workers") == 1, up.stderr
    assert "scaled to capacity" not in up.stdout + up.stderr
    pid = json.loads((directory / st.STATE_FILE).read_text())["pid"]

    def running_workers(count: int) -> Any:
        def check() -> Any:
            report = json.loads(cli("status", "--name", "t1", "--json").stdout)
            return report if sum(w["status"] == "running" for w in report["workers"]) == count else None
        return check

    poll(running_workers(2), 60, "two running workers")
    args = [str(inv), "--name", "t1", "--no-tls"]
    same = cli("up", *args, "--workers", "3")
    assert same.exit_code == 0 and "nothing changed" in same.stdout, same.output

    smaller = cli("up", *args, "--workers", "1")
    assert smaller.exit_code == 0, smaller.output
    assert "cluster t1: --workers 3 -> --workers 1; scaling to 1 worker" in smaller.stdout
    poll(running_workers(1), 60, "one running worker")
    # scale is recorded: up --workers 1 again after 'scale 2' scales back.
    assert cli("scale", "2", "--name", "t1").exit_code == 0
    back = cli("up", *args, "--workers", "1")
    assert "--workers 2 -> --workers 1" in back.stdout, back.output

    adapted = cli("up", *args, "--adapt", "1:2")
    assert adapted.exit_code == 0, adapted.output
    assert "--workers 1 -> --adapt 1:2; adaptive scaling between 1 and 2 workers" in adapted.stdout
    assert json.loads(cli("status", "--name", "t1", "--json").stdout)["adaptive"] == {"minimum": 1, "maximum": 2}
    assert "nothing changed" in cli("up", *args, "--adapt", "1:2").stdout

    every = cli("up", *args)
    assert "--adapt 1:2 -> every slot (no --workers); scaling to 2 workers" in every.stdout, every.output
    assert json.loads(cli("status", "--name", "t1", "--json").stdout)["adaptive"] is None
    assert "nothing changed" in cli("up", *args).stdout

    # The same file with other content: applied as reload applies it.
    write_inventory(inv, 3)
    reloaded = cli("up", *args)
    assert reloaded.exit_code == 0, reloaded.output
    assert "the inventory changed; reloaded from" in reloaded.stdout
    assert "speccluster_slots: 2 -> 3" in reloaded.stdout
    assert "nothing changed" in cli("up", *args).stdout
    assert json.loads((directory / st.STATE_FILE).read_text())["pid"] == pid  # never a second head

    assert cli("down", "--name", "t1").exit_code == 0


def test_the_capacity_warning_is_printed_once_in_the_foreground(
    tmp_path: Path, state_home: Path, reaper: Reaper
) -> None:
    """The cluster's own note of the shortfall (a log line and a print) repeated up's warning."""
    import signal
    import subprocess

    from test_cli_unit import subprocess_env

    inv = write_inventory(tmp_path / "inv.yml", 2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "speccluster_ssh.cli", "up", str(inv), "--name", "fg", "--no-tls", "--workers", "3",
         "--timeout", "60"],
        env=subprocess_env(state_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    directory = state_home / "fg"
    reaper.add(proc.pid, directory)
    try:
        def running() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"up exited early with {proc.returncode}")
            found = st.read_state(directory) if directory.exists() else None
            return found is not None and found.phase == "running"

        poll(running, 60, "the foreground cluster to run")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err.count("asked for 3 workers") == 1, err
    assert "scaled to capacity" not in out + err
