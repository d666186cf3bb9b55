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
    "release → a waiting cluster's first worker registered, 4 hosts",
)


# The bench builds its own lab on the lab subnet, so this must run before the
# session's shared lab exists (see conftest.py).
@pytest.mark.lab
@pytest.mark.lab_first
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
    assert {r["case"] for r in runs} >= {"plain-1", "4x1", "4x2", "4x2-notls", "ops-4x2", "release-4x1"}
    for record in runs:
        assert "time" in record and "leftovers" in record
    # Every session of ours started its cluster (a number, whatever its size),
    # and every start-up case measured the floor.
    for record in runs:
        if record["tool"] in ("ours", "floor") and record["case"] != "release-4x1":
            assert isinstance(record.get("startup"), float), record
    # A slot freed by one cluster went to the one waiting for it (a number, whatever its size).
    released = [r for r in runs if r["case"] == "release-4x1"]
    assert released and isinstance(released[0].get("release_to_registered"), float), released
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


def _fake_data() -> dict:
    """Two runs of 4 × 1 and 8 × 1 for ours, SSHCluster and the floor, with one timeline (no lab needed)."""
    cases = [
        {"name": "4x1", "hosts": 4, "nworkers": 1, "kind": "start"},
        {"name": "8x1", "hosts": 8, "nworkers": 1, "kind": "start"},
    ]
    runs = []
    for run in range(2):
        for case, n in (("4x1", 4), ("8x1", 8)):
            base = {"case": case, "run": run, "workers": n, "errors": [], "leftovers": 0, "time": "t"}
            runs.append({**base, "tool": "floor", "startup": 1.0 * n})
            runs.append({**base, "tool": "dask", "startup": 2.0 * n, "teardown": 4.0})
            timeline = [
                {"t": 0.01, "phase": "ssh_connect", "host": "h1", "item": ""},
                {"t": 0.1, "phase": "ssh_connected", "host": "h1", "item": ""},
                {"t": 0.5, "phase": "reach_probed", "host": "", "item": ""},
                {"t": 1.0 * n - 0.3, "phase": "agent_ready", "host": "h1", "item": ""},
                {"t": 1.0 * n - 0.3, "phase": "scheduler_ready", "host": "", "item": ""},
                {"t": 1.0 * n - 0.2, "phase": "start_request", "host": "h1", "item": "0"},
                {"t": 1.0 * n - 0.1, "phase": "forked", "host": "h1", "item": "0"},
                {"t": 1.0 * n + 0.2, "phase": "worker_registered", "host": "", "item": "0"},
            ]
            runs.append({**base, "tool": "ours", "startup": 1.0 * n + 0.25, "teardown": 0.2, "timeline": timeline,
                         "head": {"rss_before": 100, "rss": 200, "cpu_startup": 1.0}})
    machine = {"date": "d", "cpu_count": 2, "python": "3", "distributed": "x", "asyncssh": "y",
               "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [1.0, 1.0, 1.0], "seconds": 1.0}
    settings = {"runs": 2, "quick": False, "start_cap": 90, "recover_cap": 30, "crash_cap": 30, "gone_cap": 15,
                "down_cap": 15, "cases": cases}
    return {"machine": machine, "settings": settings, "runs": runs}


@pytest.mark.timeout(120)
def test_report_floor_growth_timeline_and_merge(tmp_path: Path) -> None:
    """The report's arithmetic on made-up runs: above the floor run by run, seconds per host, the timeline, --merge."""
    sys.path.insert(0, str(REPO))
    from bench.report import above_floor, host_growth, write_outputs
    from bench.run import merge_outputs

    data = _fake_data()
    assert above_floor(data["runs"], "8x1").median == pytest.approx(0.25)
    cases = {c["name"]: c for c in data["settings"]["cases"]}
    _, fit, found = host_growth(data["runs"], cases)
    assert found["slopes"]["floor"] == pytest.approx(1.0)
    assert found["slopes"]["dask"] == pytest.approx(2.0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_outputs(_fake_data(), tmp_path / name)
    text = (tmp_path / "a" / "results.md").read_text()
    assert "## Timeline of one start-up (ours, 8x1" in text
    assert "| ours | 1.000 s | 4, 8 | — |" in text
    merged = merge_outputs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert merged["settings"]["runs"] == 4 and len(merged["runs"]) == 2 * len(data["runs"])
    assert "Merged from 2 sittings" in (tmp_path / "m" / "results.md").read_text()
    for name in ("startup.png", "growth.png", "timeline.png"):
        assert (tmp_path / "m" / name).read_bytes().startswith(b"\x89PNG")


def test_report_lease_claims_and_release_rows() -> None:
    """Claim times from made-up stamps: per entry, the last-registered worker's, the longest; a release row."""
    sys.path.insert(0, str(REPO))
    from bench.lease_report import claim_summaries, lease_rows

    def start(run: int, slow: float) -> list[dict]:
        # h1's claim takes 20 ms and its worker registers first; h2's takes ``slow`` and registers last.
        events = []
        for host, entry, claim, registered in (("h1", "0", 0.020, 1.5), ("h2", "1", slow, 2.0)):
            events += [
                {"t": 1.0, "phase": "agent_ready", "host": host, "item": ""},
                {"t": 1.01, "phase": "lease_claim", "host": host, "item": entry},
                {"t": 1.01 + claim, "phase": "lease_claimed", "host": host, "item": entry},
                {"t": 1.2, "phase": "start_request", "host": host, "item": f"w{entry}"},
                {"t": registered, "phase": "worker_registered", "host": "", "item": f"w{entry}"},
            ]
        return events

    records = []
    for run, slow in enumerate((0.030, 0.040, 0.090)):
        base = {"case": "lease-2x1", "run": run, "errors": []}
        records.append({**base, "tool": "ours", "startup": 2.0, "timeline": start(run, slow)})
        records.append({**base, "tool": "nolease", "startup": 1.9})
    records.append({"case": "release-2x1", "run": 0, "errors": [], "tool": "ours", "release_to_registered": 2.5,
                    "waiter_timeline": [{"t": 2.3, "phase": "lease_claimed", "host": "h1", "item": "3"},
                                        {"t": 2.5, "phase": "worker_registered", "host": "", "item": "3"}]})
    found = claim_summaries(records, "lease-2x1")
    assert found.per_entry.median == pytest.approx(0.025)
    assert found.critical.median == pytest.approx(0.040)
    assert found.longest.values == pytest.approx([0.030, 0.040, 0.090])
    assert found.after_agent.median == pytest.approx(0.035)
    cases = {"lease-2x1": {"hosts": 2, "nworkers": 1, "tools": ["ours", "nolease"]},
             "release-2x1": {"hosts": 2, "nworkers": 1, "kind": "release", "tools": ["ours"]}}
    rows = {r[0].split(",")[0]: r for r in lease_rows(records, cases)}
    added = rows["lease claim added to one start-up"]
    assert added[1].startswith("40.0 ms") and added[-1] == "yes"
    assert rows["upper bound of that: the longest claim of one start-up"][-1] == "yes"
    assert "difference 100.0 ms" in rows["start-up"][1]
    assert rows["release → a waiting cluster's first worker registered"][1].startswith("2.50 s")
    assert next(r for label, r in rows.items() if label.startswith("of which"))[1] == "2.30 s; 2.50 s"
