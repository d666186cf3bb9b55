"""``up`` on a lab with a host switched off (issue 16): the last line, the exit status, ``--json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sshlab import processes_besides_sshd
from test_cli_lab import Cli, cli, write_inventory  # noqa: F401  (cli is a fixture)
from test_peer import until  # noqa: F401

pytestmark = pytest.mark.lab


def _wait_clean(lab: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while processes_besides_sshd(lab) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_besides_sshd(lab), processes_besides_sshd(lab)


def test_up_with_a_host_off_ends_with_a_summary_line(lab: Any, tmp_path: Path, cli: Cli) -> None:
    """Three of four hosts answer: up succeeds, says which host is down and why, and --json says the same."""
    hosts = [h.name for h in lab.hosts[:4]]
    off = lab.hosts[3]
    path = write_inventory(lab, tmp_path / "inv.yml", hosts)
    off.kill_all()
    try:
        result = cli.ok("up", str(path), "--detach", "--name", "partial", "--timeout", "60", timeout=150)
        last = result.stdout.strip().splitlines()[-1]
        assert last.startswith("3 of 4 hosts up, 3 of 4 workers; "), last
        assert f"{off.name} down: " in last and "(retrying)" in last, last
        status = cli.json("status", "--name", "partial")
        assert status["summary"]["missing_hosts"][off.name]["state"] == "down"
        assert status["hosts"][off.name]["reason"]
        # status and plan show the host that is down, with its reason, in one table.
        shown = cli.ok("status", "--name", "partial").stdout
        assert any(off.name in line and "down" in line and "connect" in line for line in shown.splitlines()), shown
        planned = cli.ok("plan", str(path), "--name", "partial").stdout
        assert "cannot use now" in planned and off.name in planned.split("cannot use now", 1)[1], planned
        cli.ok("down", "--name", "partial", timeout=120)
        # --json carries the same facts.
        data = json.loads(cli.ok("up", str(path), "--detach", "--name", "partial2", "--json", timeout=150).stdout)
        assert data["summary"]["hosts_up"] == 3 and data["summary"]["workers_running"] == 3
        assert off.name in data["summary"]["missing_hosts"]
        cli.ok("down", "--name", "partial2", timeout=120)
    finally:
        off.restart_sshd()
    _wait_clean(lab)


def test_up_below_min_workers_exits_1_naming_the_host(lab: Any, tmp_path: Path, cli: Cli) -> None:
    """--min-workers above what answers: exit 1, the missing host named, nothing left."""
    hosts = [h.name for h in lab.hosts[:2]]
    off = lab.hosts[1]
    path = write_inventory(lab, tmp_path / "inv.yml", hosts)
    off.kill_all()
    try:
        result = cli.run("up", str(path), "--detach", "--name", "short", "--timeout", "15", "--min-workers", "100%",
                         timeout=150)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "only 1 of 2 workers" in result.stderr, result.stderr
        assert f"{off.name}: down: " in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        bad = cli.run("up", str(path), "--min-workers", "lots")
        assert bad.returncode == 2 and "--min-workers" in bad.stderr, bad.stderr
    finally:
        off.restart_sshd()
    _wait_clean(lab)
