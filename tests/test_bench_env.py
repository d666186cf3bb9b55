"""Issue 24's bench rows (``bench/env_session.py``) from made-up runs: the arithmetic, not the lab."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_env_rows_head_bytes_and_warm_over_host() -> None:
    sys.path.insert(0, str(REPO))
    from bench.env_session import env_cases, env_rows

    def rec(case: str, run: int, startup: float, env: dict | None = None) -> dict:
        return {"case": case, "tool": "ours", "run": run, "errors": [], "startup": startup,
                **({"env": env} if env else {})}

    house = 40_000_000
    records = [
        rec("env-cold-16", 0, 100.0, {"head_bytes": 2 * house, "wheelhouse_bytes": house, "peer_bytes": 14 * house}),
        rec("env-cold-16", 1, 120.0, {"head_bytes": 3 * house, "wheelhouse_bytes": house, "peer_bytes": 13 * house}),
        rec("env-cold-4", 0, 30.0, {"head_bytes": 2 * house, "wheelhouse_bytes": house, "peer_bytes": 2 * house}),
        rec("env-warm-4", 0, 4.5), rec("env-warm-4", 1, 4.7),
        rec("env-host-4", 0, 4.3), rec("env-host-4", 1, 4.4),
        {"case": "env-cold-4", "tool": "ours", "run": 1, "errors": ["start failed: boom"]},
    ]
    cases = {c.name: {"hosts": c.hosts, "nworkers": c.nworkers} for c in env_cases()}
    rows = {r[0]: r for r in env_rows(records, cases)}
    share16 = rows["cold environment, 16 hosts: head bytes sent / wheelhouse size"]
    assert share16[1] == "2.50×" and share16[-1] == "yes"
    start16 = next(r for label, r in rows.items() if label.startswith("cold environment, 16 hosts × 1 worker"))
    assert start16[1] == "110.00 s" and "head sent 100.0 MB of a 40.0 MB wheelhouse" in start16[0]
    start4 = next(r for label, r in rows.items() if label.startswith("cold environment, 4 hosts × 1 worker"))
    assert "1/2: start failed: boom" in start4[1]
    warm = next(r for label, r in rows.items() if label.startswith("warm environment"))
    assert warm[1] == "4.60 s" and "+0.250 s" in warm[0] and warm[-1] == "yes"
    records.append(rec("env-cold-16", 2, 90.0, {"head_bytes": 4 * house, "wheelhouse_bytes": house, "peer_bytes": 0}))
    records.append(rec("env-cold-16", 3, 90.0, {"head_bytes": 5 * house, "wheelhouse_bytes": house, "peer_bytes": 0}))
    rows = {r[0]: r for r in env_rows(records, cases)}
    assert rows["cold environment, 16 hosts: head bytes sent / wheelhouse size"][-1] == "**no**"
