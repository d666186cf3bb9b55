"""The README's Python session on the packaged local inventory says each thing once.

A scale beyond the inventory's capacity printed "scaled to capacity" twice in
a plain ``python3`` session (issue 21, point 14): once through the cluster's
own log, which distributed prints, and once more as a WARNING of our logger.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SESSION = """
from distributed import Client
from speccluster_ssh import SSHSpecCluster
from speccluster_ssh.resources import local_inventory
with SSHSpecCluster.from_inventory(local_inventory(), n_workers=1) as cluster, Client(cluster) as client:
    cluster.scale(9)
    client.wait_for_workers(4, timeout=120)
    print("workers", len(client.scheduler_info()["workers"]))
"""


def test_scale_beyond_capacity_is_said_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SESSION], capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "workers 4" in done.stdout, out
    assert out.count("scaled to capacity") == 1, out
    assert "asked for 9 workers" in out and "capacity is 4 workers" in out, out
