"""The report's rows of issue 23 (sharing a lab): a lease claim's cost at start-up, and a release until a waiting cluster's worker registers.

The cases are ``lease-16x1`` and ``release-4x1`` (:func:`bench.run.lease_cases`);
:func:`lease_rows` adds their rows to the main table of ``results.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .report import Summary, _commonest, _spread_cell, _summary, cell, met_text, summarize

CLAIM_TARGET = 0.050  # issue 23: a lease claim adds no more than 50 ms to a start-up at 16 hosts


def lease_claims(timeline: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per entry (``host/entry``) of one start: ``claim`` (the claim's own time: begun → granted) and
    ``after_agent`` (its host's agent ready → granted), in seconds.

    ``lease_claim`` is stamped by the bench's head as the claim begins
    (:func:`bench.driver.instrument_leases`), ``lease_claimed`` by the
    product when it is granted, ``agent_ready`` per host by the product.
    """
    begun: dict[str, float] = {}
    agent: dict[str, float] = {}
    out: dict[str, dict[str, float]] = {}
    for e in sorted(timeline, key=lambda e: e["t"]):
        key = f"{e.get('host')}/{e.get('item')}"
        if e["phase"] == "agent_ready":
            agent.setdefault(e.get("host", ""), float(e["t"]))
        elif e["phase"] == "lease_claim":
            begun.setdefault(key, float(e["t"]))
        elif e["phase"] == "lease_claimed" and key not in out:
            t = float(e["t"])
            one: dict[str, float] = {}
            if key in begun:
                one["claim"] = t - begun[key]
            if e.get("host", "") in agent:
                one["after_agent"] = t - agent[e.get("host", "")]
            out[key] = one
    return out


def last_registered_host(timeline: list[dict[str, Any]]) -> str | None:
    """The host of the worker that registered last in one start (by its start request's host)."""
    host_of = {e.get("item"): e.get("host") for e in timeline if e["phase"] == "start_request"}
    registered = [(float(e["t"]), host_of.get(e.get("item"))) for e in timeline if e["phase"] == "worker_registered"]
    return max(registered, key=lambda x: x[0])[1] if registered else None


@dataclass
class ClaimSummaries:
    """Lease claims over the runs of one case: see :func:`claim_summaries`."""

    per_entry: Summary  # the claim's own time, every entry of every run
    longest: Summary  # per start, its longest claim: an upper bound of what the claims added
    critical: Summary  # per start, the claim on the host whose worker registered last
    after_agent: Summary  # per entry, its host's agent ready → claim granted


def claim_summaries(records: list[dict[str, Any]], case: str) -> ClaimSummaries:
    """Over ours' runs of ``case``: claim times per entry and per start (see :class:`ClaimSummaries`)."""
    per_entry: list[float] = []
    after_agent: list[float] = []
    longest: list[float] = []
    critical: list[float] = []
    notes: list[str] = []
    runs = 0
    for rec in records:
        if rec["case"] != case or rec["tool"] != "ours":
            continue
        runs += 1
        timeline = rec.get("timeline") or []
        claims = lease_claims(timeline)
        times = [c["claim"] for c in claims.values() if "claim" in c]
        if not times:
            notes.append("failed: " + "; ".join(rec.get("errors") or ["no lease stamps"])[:120])
            continue
        per_entry += times
        after_agent += [c["after_agent"] for c in claims.values() if "after_agent" in c]
        # The claims run at once, one per host: a start waits at most its longest one, and its
        # end moves with the claim of the worker that registered last.
        longest.append(max(times))
        last = last_registered_host(timeline)
        on_last = [c["claim"] for key, c in claims.items() if "claim" in c and key.split("/", 1)[0] == last]
        if on_last:
            critical.append(max(on_last))
    return ClaimSummaries(Summary(per_entry, notes, runs), Summary(longest, notes, runs),
                          Summary(critical, notes, runs), Summary(after_agent, notes, runs))


def paired_difference(records: list[dict[str, Any]], case: str, key: str, tool: str, other: str) -> Summary:
    """``tool``'s ``key`` minus ``other``'s, run by run (the two ran one after the other in each run)."""
    theirs = {r["run"]: r.get(key) for r in records if r["case"] == case and r["tool"] == other}

    def measure(rec: dict[str, Any]) -> float | str:
        mine, base = rec.get(key), theirs.get(rec["run"])
        if isinstance(mine, (int, float)) and isinstance(base, (int, float)):
            return float(mine) - float(base)
        return f"no {key} of both in this run"

    return _summary(records, case, tool, measure)


def _ms(summary: Summary) -> str:
    if summary.runs == 0:
        return "not run"
    if summary.median is None:
        return _commonest(summary.notes)
    text = f"{summary.median * 1000:.1f} ms"
    if summary.spread is not None and len(summary.values) > 1:
        text += f" ({summary.spread[0] * 1000:.1f} – {summary.spread[1] * 1000:.1f})"
    if summary.notes:
        text += f" ({len(summary.notes)}/{summary.runs}: {_commonest(summary.notes)})"
    return text


def _waiter_phase(rec: dict[str, Any], phase: str) -> float | str:
    """The waiter's first ``phase`` stamp, in seconds after the holder's release."""
    times = [float(e["t"]) for e in rec.get("waiter_timeline") or [] if e["phase"] == phase and float(e["t"]) >= 0]
    return min(times) if times else f"no {phase} after the release"


def lease_rows(records: list[dict[str, Any]], cases: dict[str, Any]) -> list[list[str]]:
    """Issue 23's bench rows: a lease claim's cost at start-up, and a release until a waiting cluster's worker registers."""
    rows: list[list[str]] = []
    for name, case in cases.items():
        if "nolease" in (case.get("tools") or ()):
            hosts = case["hosts"]
            c = claim_summaries(records, name)
            rows.append([f"lease claim per entry, {hosts} hosts × 1 (the claim begun → granted, in the start-up "
                         "timeline; median over every entry of every run, min – max)", _ms(c.per_entry), "—", "—",
                         "reported", "—"])  # fmt: skip
            rows.append([f"lease claim added to one start-up, {hosts} hosts: the claim of the worker that registered "
                         "last (the claims run at once, one per host; median over runs, min – max)", _ms(c.critical),
                         "—", "—", f"≤ {CLAIM_TARGET * 1000:g} ms",
                         met_text(None if c.critical.median is None else c.critical.median <= CLAIM_TARGET)])  # fmt: skip
            rows.append([f"upper bound of that: the longest claim of one start-up, {hosts} hosts (median over runs, "
                         "min – max)", _ms(c.longest), "—", "—", f"≤ {CLAIM_TARGET * 1000:g} ms",
                         met_text(None if c.longest.median is None else c.longest.median <= CLAIM_TARGET)])  # fmt: skip
            rows.append([f"agent ready → lease claimed, per entry, {hosts} hosts (the claim and the entry's steps "
                         "before it)", _ms(c.after_agent), "—", "—", "reported", "—"])  # fmt: skip
            on, off = summarize(records, name, "ours", "startup"), summarize(records, name, "nolease", "startup")
            diff = paired_difference(records, name, "startup", "ours", "nolease")
            rows.append([f"start-up, {hosts} hosts × 1, leases claimed / claims skipped in the head (bench-only "
                         "patch); difference run by run (noisy: the start-up's own spread is seconds)",
                         f"{cell(on)} / {cell(off)}; difference {_ms(diff)}", "—", "—", "reported", "—"])  # fmt: skip
        if case.get("kind") == "release":
            hosts = case["hosts"]
            took = summarize(records, name, "ours", "release_to_registered")
            rows.append([f"release → a waiting cluster's first worker registered, {hosts} hosts × 1 slot held by "
                         "another cluster (its lease watcher looks every 2 s while short, then starts the worker; "
                         "the runs release at moments spread evenly over that cycle; min – max)",
                         _spread_cell(took, "s"), "—", "—", "reported (0–2 s + a worker start)", "—"])  # fmt: skip
            noticed = _summary(records, name, "ours", lambda r: _waiter_phase(r, "lease_claimed"))
            registered = _summary(records, name, "ours", lambda r: _waiter_phase(r, "worker_registered"))
            rows.append(["of which: release → the waiter's lease claimed (its watcher's next look); "
                         "→ its worker registered as the waiter's cluster heard it",
                         f"{cell(noticed)}; {cell(registered)}", "—", "—", "reported", "—"])  # fmt: skip
    return rows
