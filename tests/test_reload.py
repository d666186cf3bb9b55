"""``speccluster-ssh reload`` against a detached cluster on the lab (issue 12).

The cluster runs on h1..h3 of the lab (one slot each, though four workers
were asked for); h4 is the spare. The inventory file is then changed: h4
added with two slots, h1 removed, ``speccluster_nthreads`` of h2 raised. ``reload --dry-run`` must print exactly that difference and change
nothing; ``reload`` must print it again and apply it while a computation
runs; an inventory with an error must change nothing and give the line
``up`` gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import Client

from sshlab import Lab
from test_cli_lab import Cli, cli, cluster_tree, settle, status_counts, write_inventory  # noqa: F401 (cli is a fixture)
from test_peer import slowinc

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


def test_reload_adds_removes_and_changes_hosts(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    path = write_inventory(lab, tmp_path / "lab.yml", ["h1", "h2", "h3"])
    state = cli.up_detached(path, "rel", "--no-tls", "--workers", "4")  # short by one
    cluster_id = state["cluster_id"]
    settle(cli, lab, "rel", cluster_id, 3)

    write_inventory(lab, path, ["h2", "h3", "h4"],
                    host_vars={"h2": {"speccluster_nthreads": 2}, "h4": {"speccluster_slots": 2}})
    h4 = next(h for h in lab.hosts if h.name == "h4")
    expected = [
        f"  host h4: added, 2 slot(s), ssh root@{h4.ip}; entries may be placed there",
        "  host h1: removed; drained first (its 1 entry moves to free slots), then its agent and connection are closed",
        "  host h2: changed speccluster_nthreads: 1 -> 2; its 1 entry is replaced, 1 at a time",
    ]
    dry = cli.ok("reload", "--name", "rel", "--dry-run").stdout.splitlines()
    assert dry == [f"reload of cluster rel from {path} (dry run: nothing is changed)", *expected], dry
    assert status_counts(cli.json("status", "--name", "rel")) == {"h1": 1, "h2": 1, "h3": 1}

    with Client(state["scheduler_address"], timeout=30) as client:
        running = client.map(slowinc, range(60), delay=0.25, pure=False)
        applied = cli.ok("reload", "--name", "rel").stdout.splitlines()
        assert applied[:4] == [f"reload of cluster rel from {path}", *expected], applied
        # The cluster was short of the four workers asked for: h4's second slot fills it.
        assert applied[-2:] == ["  1 entry added to reach the target", "cluster rel: inventory reloaded"], applied
        report = settle(cli, lab, "rel", cluster_id, 4)
        assert status_counts(report) == {"h2": 1, "h3": 1, "h4": 2}
        assert set(report["hosts"]) == {"h2", "h3", "h4"}
        threads = sorted((w["host"], w["threads"]) for w in report["workers"])
        assert threads == [("h2", 2), ("h3", 1), ("h4", 1), ("h4", 1)], report["workers"]
        # The scheduler itself says so.
        info = client.scheduler_info()["workers"].values()
        assert sorted(w["nthreads"] for w in info) == [1, 1, 1, 2]
        assert not any(w["host"] == lab.hosts[0].ip for w in info)
        assert client.gather(running) == list(range(1, 61))
    assert not cluster_tree(lab, cluster_id)["h1"].pids  # its agent and connection are closed

    # An inventory with an error changes nothing, with the one line 'up' gives for it.
    path.write_text(path.read_text().replace("speccluster_nthreads: 2", "speccluster_nthread: 2"))
    refused = cli.run("reload", "--name", "rel")
    at_start = cli.run("up", str(path), "--name", "other", "--no-tls")
    assert refused.returncode == at_start.returncode == 2, (refused, at_start)
    assert refused.stderr == at_start.stderr and len(refused.stderr.splitlines()) == 1, (refused.stderr, at_start.stderr)
    assert "speccluster_nthread" in refused.stderr and "did you mean" in refused.stderr
    assert status_counts(cli.json("status", "--name", "rel")) == {"h2": 1, "h3": 1, "h4": 2}
    # So does a host the cluster does not have.
    unknown = cli.run("drain", "nosuch", "--name", "rel")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1, unknown
    assert "no worker host named 'nosuch'" in unknown.stderr and "h2, h3, h4" in unknown.stderr
    cli.ok("down", "--name", "rel")
