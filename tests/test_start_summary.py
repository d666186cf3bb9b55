"""min_workers and up's summary line (issue 16): pure, no lab."""

from __future__ import annotations

import pytest

from speccluster_ssh.errors import StartError, UserError
from speccluster_ssh.reporting import summarize, summary_line
from speccluster_ssh.scaling import resolve_min_workers


@pytest.mark.parametrize(
    ("value", "requested", "need"),
    [(None, 8, 1), (None, 0, 0), (3, 8, 3), (20, 8, 8), (0.5, 8, 4), (0.3, 8, 3), ("75%", 8, 6),
     ("100%", 8, 8), ("0.25", 8, 2), ("5", 8, 5), (1.0, 3, 3), (0, 8, 0)],
)
def test_min_workers_forms(value: object, requested: int, need: int) -> None:
    assert resolve_min_workers(value, requested) == need  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["lots", "150%", 1.5, -2, "-1%", True, [3]])
def test_min_workers_refuses_with_one_line(value: object) -> None:
    with pytest.raises(UserError) as info:
        resolve_min_workers(value, 8)  # type: ignore[arg-type]
    assert "min_workers" in str(info.value) and "\n" not in str(info.value)


def test_summary_line_names_missing_hosts_and_what_happens_next() -> None:
    hosts = {
        "h1": {"state": "up", "reason": ""},
        "h2": {"state": "down", "reason": "cannot connect to 10.0.0.2", "fix": ""},
        "h3": {"state": "down", "reason": "python /usr/bin/python3 has no 'distributed'", "fix": "install it"},
        "h4": {"state": "aside", "reason": "failed to start workers 3 times"},
    }
    workers = [{"status": "running"}, {"status": "running"}, {"status": "pending"}, {"status": "pending"}]
    summary = summarize(hosts, workers, min_workers=1)
    assert summary["min_met"] and summary["hosts_up"] == 1
    assert summary_line(summary) == (
        "1 of 4 hosts up, 2 of 4 workers; h2 down: cannot connect to 10.0.0.2 (retrying); "
        "h3 down: python /usr/bin/python3 has no 'distributed' (fix: install it); "
        "h4 aside: failed to start workers 3 times (put aside)"
    )
    assert summary_line(summarize({"h1": {"state": "up"}}, [{"status": "running"}], 1)) == "1 of 1 hosts up, 1 of 1 workers"


def test_start_error_has_a_summary_then_one_line_per_host() -> None:
    error = StartError("only 3 of 4 workers started within 15 s; at least 4 needed", {"h4": "down: cannot connect"})
    assert str(error).splitlines() == [
        "only 3 of 4 workers started within 15 s; at least 4 needed",
        "  h4: down: cannot connect",
    ]
