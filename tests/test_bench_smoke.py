"""Smoke test of the benchmark: its quickest mode runs and writes every output.

Nothing here looks at timings: the machine running the tests is shared and
its numbers say nothing. Only the shape of the outputs is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The bench builds its own lab on the lab subnet, so it must run before the
# session's shared lab exists (see conftest.py).
pytestmark = [pytest.mark.lab, pytest.mark.lab_first]

EXPECTED_ROWS = (
    "start-up, 4 hosts × 1 worker",
    "start-up, 4 hosts × 2 workers",
    "start-up, 4 hosts × 2 workers, ours with TLS off",
    "reference: one `ssh host python -m distributed.cli.dask_worker`",
    "scale-up +4 workers on warm hosts",
    "scale-down −4 workers",
    "SIGKILL of a worker process → replacement registered",
    "SIGKILL of the head → nothing left on any host",
    "teardown, 4 × 2",
    "SSH connections per host",
    "head RSS",
    "head RSS growth per additional worker",
)


@pytest.mark.timeout(400)
def test_quick_bench_writes_json_markdown_and_png(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((out / "runs.json").read_text())
    for key in ("date", "cpu_count", "python", "distributed", "asyncssh"):
        assert key in data["machine"], key
    assert data["settings"]["quick"] is True
    runs = data["runs"]
    assert {r["tool"] for r in runs} == {"ours", "dask", "plain", "floor"}
    assert {r["case"] for r in runs} >= {"plain-1", "4x1", "4x2", "4x2-notls", "ops-4x2"}
    for record in runs:
        assert "time" in record and "leftovers" in record
    # Every session of ours started its cluster (a number, whatever its size),
    # and every start-up case measured the floor.
    for record in runs:
        if record["tool"] in ("ours", "floor"):
            assert isinstance(record.get("startup"), float), record
    # Ours recorded the phases of its start-ups, in order per worker.
    timed = [r for r in runs if r["tool"] == "ours" and r.get("timeline")]
    assert timed
    phases = {e["phase"] for e in timed[0]["timeline"]}
    assert {"ssh_connected", "agent_ready", "scheduler_ready", "start_request", "forked", "worker_registered"} <= phases

    text = (out / "results.md").read_text()
    assert "| row | ours (median) | SSHCluster (median) | ours / SSHCluster | target | met? |" in text
    for row in EXPECTED_ROWS:
        assert f"| {row}" in text, row

    assert "start-up above the floor, 4 × 2" in text
    assert "## Timeline of one start-up" in text
    assert "## Growth with hosts (one worker each), and the floor" in text
    for name in ("startup.png", "growth.png", "timeline.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000, name
