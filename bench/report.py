"""Turn the bench's raw runs into ``runs.json``, ``results.md``, ``startup.png``, ``growth.png`` and ``timeline.png``."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 1024 * 1024
START_CASES = ("4x1", "4x2", "4x4", "8x4", "8x8")  # the growth series, by worker count
HOST_CASES = ("4x1", "8x1", "16x1", "32x1", "48x1")  # the growth series, by host count (one worker each)
# The phases ours stamps during a start-up (speccluster_ssh.timeline), in the order they happen.
PHASES = (
    ("ssh_connect", "SSH connect begins"),
    ("ssh_connected", "SSH connected"),
    ("reach_probed", "scheduler reach probed"),
    ("scheduler_ready", "scheduler ready"),
    ("agent_ready", "agent ready (hello, files written)"),
    ("lease_claimed", "entry's lease claimed on its host"),
    ("start_request", "worker start request sent"),
    ("forked", "worker process forked (agent replied)"),
    ("worker_ready", "worker server ready (reported by its process)"),
    ("worker_registered", "worker registered (the cluster heard it from the scheduler)"),
)


@dataclass
class Summary:
    """The numeric median of one metric over runs, and what the other runs said instead."""

    values: list[float]
    notes: list[str]
    runs: int

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def spread(self) -> tuple[float, float] | None:
        return (min(self.values), max(self.values)) if self.values else None


def _get(record: dict[str, Any], key: str) -> Any:
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _summary(records: list[dict[str, Any]], case: str, tool: str, measure: Callable[[dict[str, Any]], float | str]) -> Summary:
    """Over the runs of ``case`` by ``tool``: a number from ``measure`` counts as a value, a text as a note."""
    values: list[float] = []
    notes: list[str] = []
    runs = 0
    for rec in records:
        if rec["case"] != case or rec["tool"] != tool:
            continue
        runs += 1
        got = measure(rec)
        if isinstance(got, str):
            notes.append(got)
        else:
            values.append(got)
    return Summary(values, notes, runs)


def summarize(records: list[dict[str, Any]], case: str, tool: str, key: str) -> Summary:
    """Median of ``key`` (dotted path) over the runs of ``case`` by ``tool``.

    A run whose value is text (``"not supported"``, ``"left 3 processes"``)
    or that failed before measuring counts as a note, not as a number.
    """

    def measure(rec: dict[str, Any]) -> float | str:
        value = _get(rec, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return value
        return "failed: " + "; ".join(rec.get("errors") or ["no value"])[:120]

    return _summary(records, case, tool, measure)


def fmt_seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 1 else f"{value:.2f} s"


def cell(summary: Summary, unit: str = "s") -> str:
    """A table cell: the median, and how many runs gave no number (with the commonest reason)."""
    if summary.runs == 0:
        return "not run"
    if summary.median is None:
        return _commonest(summary.notes)
    text = fmt_value(summary.median, unit)
    if summary.notes:
        text += f" ({len(summary.notes)}/{summary.runs}: {_commonest(summary.notes)})"
    return text


def fmt_value(value: float, unit: str) -> str:
    if unit == "s":
        return fmt_seconds(value)
    if unit == "MB":
        return f"{value / MB:.0f} MB"
    if unit == "MB/worker":
        return f"{value / MB:.2f} MB"
    if unit == "%":
        return f"{value * 100:.1f} %"
    return f"{value:g}"


def _commonest(notes: list[str]) -> str:
    return Counter(notes).most_common(1)[0][0] if notes else "—"


def ratio(a: Summary, b: Summary) -> float | None:
    if a.median is None or b.median is None or b.median == 0:
        return None
    return a.median / b.median


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``y`` over ``x``; ``None`` with fewer than two distinct ``x``."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    num = sum((x - mx) * (y - my) for x, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return num / den


def _ssh_per_host(rec: dict[str, Any]) -> float | None:
    ssh = _get(rec, "head.ssh")
    if not isinstance(ssh, dict) or not ssh:
        return None
    return float(max(ssh.values()))


def _rss_growth(rec: dict[str, Any]) -> float | None:
    head = rec.get("head") or {}
    if "rss" not in head or "rss_before" not in head:
        return None
    return float(head["rss"] - head["rss_before"])


def _derived(records: list[dict[str, Any]]) -> None:
    """Add per-record values that are computed from others (in place)."""
    for rec in records:
        value = _ssh_per_host(rec)
        if value is not None:
            rec.setdefault("derived", {})["ssh_per_host"] = value
            rec["derived"]["ssh_hosts"] = len(rec["head"]["ssh"])
        growth = _rss_growth(rec)
        if growth is not None:
            rec.setdefault("derived", {})["rss_growth"] = growth


def build_rows(data: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """The main table's rows and the growth table's rows."""
    records = data["runs"]
    _derived(records)
    cases = {c["name"]: c for c in data["settings"]["cases"]}
    # The 32-worker case carries the head's cost; quick mode has only 4 × 2.
    cost_case = next((c for c in ("8x4", "4x2") if c in cases), "8x4")
    cost_workers = cases[cost_case]["hosts"] * cases[cost_case]["nworkers"] if cost_case in cases else 32
    rows: list[list[str]] = []

    def s(case: str, tool: str, key: str) -> Summary:
        return summarize(records, case, tool, key)

    def met(flag: bool | None) -> str:
        return "—" if flag is None else ("yes" if flag else "**no**")

    plain = s("plain-1", "plain", "startup")
    # Start-up.
    for case, label, ours_case in (
        ("4x1", "start-up, 4 hosts × 1 worker", "4x1"),
        ("4x2", "start-up, 4 hosts × 2 workers", "4x2"),
        ("4x2", "start-up, 4 hosts × 2 workers, ours with TLS off", "4x2-notls"),
        ("8x4", "start-up, 8 hosts × 4 workers", "8x4"),
    ):
        ours, dask = s(ours_case, "ours", "startup"), s(case, "dask", "startup")
        r = ratio(ours, dask)
        if case == "4x1":
            target = f"< one plain ssh worker ({cell(plain)})"
            flag = None if ours.median is None or plain.median is None else ours.median < plain.median
        else:
            target = "≤ 0.35 × SSHCluster"
            flag = None if r is None else r <= 0.35
        rows.append([label, cell(ours), cell(dask), _ratio(r), target, met(flag) if ours.runs else "not run"])
    rows.append(["reference: one `ssh host python -m distributed.cli.dask_worker` (nanny, 1 thread)",
                 cell(plain), "—", "—", "reference", "—"])  # fmt: skip

    # Operations on a warm 4 × 2 cluster.
    up = s("ops-4x2", "ours", "scale_up")
    rows.append(["scale-up +4 workers on warm hosts, until registered", cell(up),
                 cell(s("ops-4x2", "dask", "scale_up")), "—", "< 0.5 s",
                 met(None if up.median is None else up.median < 0.5)])  # fmt: skip
    o, d = s("ops-4x2", "ours", "scale_down"), s("ops-4x2", "dask", "scale_down")
    rows.append(["scale-down −4 workers, until their processes are gone", cell(o), cell(d), _ratio(ratio(o, d)), "—", "—"])
    rows.append(["workers the scheduler lists after that scale-down (wanted)",
                 _listed_cell(records, "ours"), _listed_cell(records, "dask"), "—", "= wanted", "—"])  # fmt: skip
    o, d = s("ops-4x2", "ours", "recover"), s("ops-4x2", "dask", "recover")
    rows.append(["SIGKILL of a worker process → replacement registered", cell(o), cell(d), _ratio(ratio(o, d)), "< 3 s",
                 met(None if o.median is None else o.median < 3 and not o.notes)])  # fmt: skip
    # Quick mode ends the ops session with the head crash instead of a session of its own.
    crash_case = "headcrash-4x2" if "headcrash-4x2" in cases else "ops-4x2"
    o, d = s(crash_case, "ours", "head_crash"), s(crash_case, "dask", "head_crash")
    if not any("head_crash" in r for r in records if r["case"] == crash_case):
        o = d = Summary([], [], 0)  # a full-mode ops session ends with close(), not a crash
    rows.append(["SIGKILL of the head → nothing left on any host", cell(o), cell(d), _ratio(ratio(o, d)), "< 10 s",
                 met(None if o.median is None else o.median < 10 and not o.notes)])  # fmt: skip
    o, d = s("4x2", "ours", "teardown"), s("4x2", "dask", "teardown")
    rows.append(["teardown, 4 × 2: `close()` → nothing left on any host", cell(o), cell(d), _ratio(ratio(o, d)), "< 2 s",
                 met(None if o.median is None else o.median < 2 and not o.notes)])  # fmt: skip

    # Cost on the head.
    o, d = s(cost_case, "ours", "derived.ssh_per_host"), s(cost_case, "dask", "derived.ssh_per_host")
    hosts_o = s(cost_case, "ours", "derived.ssh_hosts")
    hosts_d = s(cost_case, "dask", "derived.ssh_hosts")
    rows.append([f"SSH connections per host, {cost_workers} workers (max over hosts; hosts reached)",
                 _conn_cell(o, hosts_o), _conn_cell(d, hosts_d), "—", "1 per host",
                 met(None if not o.values else max(o.values) == 1)])  # fmt: skip
    o, d = s(cost_case, "ours", "head.rss"), s(cost_case, "dask", "head.rss")
    rows.append([f"head RSS, {cost_workers} workers registered", cell(o, "MB"), cell(d, "MB"), _ratio(ratio(o, d)), "—", "—"])
    o, d = s(cost_case, "ours", "head.cpu_startup"), s(cost_case, "dask", "head.cpu_startup")
    rows.append([f"head CPU seconds to start {cost_workers} workers", cell(o), cell(d), _ratio(ratio(o, d)), "—", "—"])
    o, d = s(cost_case, "ours", "head.cpu_per_s_idle"), s(cost_case, "dask", "head.cpu_per_s_idle")
    rows.append([f"head CPU while idle, {cost_workers} workers (share of one core)", cell(o, "%"), cell(d, "%"),
                 _ratio(ratio(o, d)), "—", "—"])  # fmt: skip
    rows += target_rows(records, cases)
    rows += _idle_rows(records, cases)
    rows += _bastion_rows(records, cases)
    from .lease_report import lease_rows  # issue 23's rows; it uses this module's helpers

    rows += lease_rows(records, cases)
    from .env_session import env_rows  # issue 24's rows

    rows += env_rows(records, cases)
    growth_rows, slopes = _growth(records, cases)
    so, sd = slopes.get("ours"), slopes.get("dask")
    rows.append(["head RSS growth per additional worker (least squares over the growth series)",
                 "—" if so is None else fmt_value(so, "MB/worker"), "—" if sd is None else fmt_value(sd, "MB/worker"),
                 "—" if so is None or not sd else f"{so / sd:.2f}", "< 2 MB",
                 met(None if so is None else so < 2 * MB)])  # fmt: skip
    return rows, growth_rows


def above_floor(records: list[dict[str, Any]], case: str, tool: str = "ours") -> Summary:
    """``tool``'s start-up minus the floor's, run by run (the same run's floor), for ``case``."""
    floors = {r["run"]: r.get("startup") for r in records if r["case"] == case and r["tool"] == "floor"}

    def measure(rec: dict[str, Any]) -> float | str:
        mine, floor = rec.get("startup"), floors.get(rec["run"])
        if isinstance(mine, (int, float)) and isinstance(floor, (int, float)):
            return float(mine) - float(floor)
        return "no floor in this run" if isinstance(mine, (int, float)) else "no start-up"

    return _summary(records, case, tool, measure)


def _case_label(cases: dict[str, Any], name: str) -> str:
    c = cases[name]
    return f"{c['hosts']} × {c['nworkers']}"


def target_rows(records: list[dict[str, Any]], cases: dict[str, Any]) -> list[list[str]]:
    """The targets of issue 15: above the floor, ours / SSHCluster at 16 and 32 hosts, teardown, 48 hosts."""
    rows: list[list[str]] = []

    def s(case: str, tool: str, key: str) -> Summary:
        return summarize(records, case, tool, key)

    for name, limit in (("4x2", 0.5), ("16x1", 1.0)):
        if name not in cases:
            continue
        above, floor = above_floor(records, name), s(name, "floor", "startup")
        rows.append([f"start-up above the floor, {_case_label(cases, name)} (ours − floor of the same run; "
                     f"floor {cell(floor)}: `import distributed` once per host, at once, over SSH)",
                     cell(above), cell(above_floor(records, name, "dask")), "—", f"≤ {limit:g} s",
                     met_text(None if above.median is None else above.median <= limit)])  # fmt: skip
    for name in ("16x1", "32x1"):
        if name not in cases:
            continue
        ours, dask = s(name, "ours", "startup"), s(name, "dask", "startup")
        r = ratio(ours, dask)
        left = sum(int(rec.get("leftovers") or 0) for rec in records if rec["case"] == name and rec["tool"] == "ours")
        extra = f"; ours left {left} processes" if name == "32x1" else ""
        flag = None if r is None else r <= 0.45 and (left == 0 or name != "32x1")
        rows.append([f"start-up, {_case_label(cases, name)}, ours / SSHCluster" + (", nothing left behind by ours" if name == "32x1" else ""),
                     cell(ours), cell(dask), _ratio(r), "≤ 0.45" + (", 0 left" if name == "32x1" else ""),
                     met_text(flag) + extra])  # fmt: skip
    for name in ("8x4", "32x1"):
        if name not in cases:
            continue
        o, d = s(name, "ours", "teardown"), s(name, "dask", "teardown")
        ret = s(name, "ours", "close_returned")
        rows.append([f"teardown, {_case_label(cases, name)}: `close()` → nothing left on any host "
                     f"(ours' `close()` returned after {cell(ret)})", cell(o), cell(d), _ratio(ratio(o, d)), "< 1 s",
                     met_text(None if o.median is None else o.median < 1 and not o.notes)])  # fmt: skip
    if "48x1" in cases:
        o, d = s("48x1", "ours", "startup"), s("48x1", "dask", "startup")
        rss, cpu = s("48x1", "ours", "head.rss"), s("48x1", "ours", "head.cpu_startup")
        drss, dcpu = s("48x1", "dask", "head.rss"), s("48x1", "dask", "head.cpu_startup")
        rows.append(["start-up, 48 hosts × 1 worker (head RSS; head CPU seconds to start)",
                     f"{cell(o)} ({cell(rss, 'MB')}; {cell(cpu)})", f"{cell(d)} ({cell(drss, 'MB')}; {cell(dcpu)})",
                     _ratio(ratio(o, d)), "reported", "—"])  # fmt: skip
    return rows


def host_growth(records: list[dict[str, Any]], cases: dict[str, Any]) -> tuple[list[list[str]], list[list[str]], dict[str, Any]]:
    """The hosts × 1 series: its rows, the slope rows (seconds per added host) and the points, for the plot."""
    rows: list[list[str]] = []
    points: dict[str, list[tuple[float, float]]] = {"ours": [], "dask": [], "floor": []}
    cpu_points: list[tuple[float, float]] = []  # ours: the head's CPU seconds to start, against hosts
    stopped: dict[str, str] = {}
    for name in HOST_CASES:
        if name not in cases:
            continue
        n = cases[name]["hosts"]
        sums = {tool: summarize(records, name, tool, "startup") for tool in points}
        for tool, summ in sums.items():
            if tool in stopped or summ.runs == 0:
                continue
            if summ.median is None:
                # The series stops at its first failure; later sizes are not fitted.
                stopped[tool] = f"at {n} hosts: {_commonest(summ.notes)}"
            else:
                points[tool].append((float(n), summ.median))
        above_o, above_d = above_floor(records, name), above_floor(records, name, "dask")
        cpu = summarize(records, name, "ours", "head.cpu_startup")
        if cpu.median is not None:
            cpu_points.append((float(n), cpu.median))
        rows.append([str(n), cell(sums["ours"]), cell(sums["dask"]), cell(sums["floor"]), cell(above_o), cell(above_d),
                     _ratio(ratio(sums["ours"], sums["dask"])), cell(cpu),
                     cell(summarize(records, name, "ours", "derived.rss_growth"), "MB")])  # fmt: skip
    slopes = {tool: slope(p) for tool, p in points.items()}
    fit = [[{"ours": "ours", "dask": "SSHCluster", "floor": "floor"}[tool],
            "—" if slopes[tool] is None else f"{slopes[tool]:.3f} s",
            ", ".join(f"{x:g}" for x, _ in points[tool]) or "—",
            stopped.get(tool, "—")] for tool in points]  # fmt: skip
    k = slope(cpu_points)
    fit.append(["head CPU seconds of ours to start (scheduler, TLS, SSH)", "—" if k is None else f"{k:.3f} s",
                ", ".join(f"{x:g}" for x, _ in cpu_points) or "—", "—"])  # fmt: skip
    return rows, fit, {"points": points, "slopes": slopes, "stopped": stopped}


def timeline_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The start-up whose timeline is shown: ours at 16 × 1 if run, else ours' largest with one."""
    mine = [r for r in records if r["tool"] == "ours" and r.get("timeline")]
    if not mine:
        return None
    preferred = [r for r in mine if r["case"] == "16x1"]
    return (preferred or sorted(mine, key=lambda r: (r["workers"], -r["run"])))[-1 if not preferred else 0]


def _per_item(events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Phase -> key (host, or worker name) -> first stamp."""
    out: dict[str, dict[str, float]] = {}
    for e in events:
        key = e.get("item") or e.get("host") or ""
        out.setdefault(e["phase"], {}).setdefault(key, float(e["t"]))
    return out


def timeline_rows(record: dict[str, Any]) -> list[list[str]]:
    """Phase | how many | first | median | last, in seconds after the constructor was called."""
    by_phase = _per_item(record["timeline"])
    rows = []
    for phase, label in PHASES:
        times = sorted(by_phase.get(phase, {}).values())
        if not times:
            continue
        rows.append([label, str(len(times)), f"{times[0]:.3f}", f"{statistics.median(times):.3f}", f"{times[-1]:.3f}"])
    if isinstance(record.get("startup"), (int, float)):
        rows.append(["every worker registered (the bench's poll of the scheduler)", "1", "", "", f"{record['startup']:.3f}"])
    return rows


def _bars(record: dict[str, Any]) -> tuple[list[str], dict[str, list[tuple[float, float, str]]], dict[str, float]]:
    """Hosts, their (start, end, segment) bars, and head-wide marks, from one timeline."""
    events = record["timeline"]
    host_of: dict[str, str] = {}
    for e in events:
        if e.get("item") and e.get("host"):
            host_of.setdefault(e["item"], e["host"])
    stamps: dict[tuple[str, str], dict[str, float]] = {}
    for e in events:
        item = e.get("item") or ""
        host = e.get("host") or host_of.get(item, "")
        if not host:
            continue
        stamps.setdefault((host, item), {}).setdefault(e["phase"], float(e["t"]))
    marks = {e["phase"]: float(e["t"]) for e in events if not e.get("host") and not e.get("item")}
    bars: dict[str, list[tuple[float, float, str]]] = {}
    segments = (
        ("ssh_connect", "ssh_connected", "SSH connect"),
        ("ssh_connected", "agent_ready", "agent start (imports distributed)"),
        ("lease_claim", "lease_claimed", "lease claim"),
        ("start_request", "forked", "start request → fork"),
        ("forked", "worker_registered", "worker starts and registers"),
    )
    for (host, _item), st in stamps.items():
        for a, b, label in segments:
            if a in st and b in st:
                bars.setdefault(host, []).append((st[a], st[b], label))
    hosts = sorted(bars, key=lambda h: (len(h), h))
    return hosts, bars, marks


def plot_timeline(record: dict[str, Any], path: Path) -> None:
    """``timeline.png``: a Gantt chart of one start-up, one row per host."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts, bars, marks = _bars(record)
    colors = {"SSH connect": "tab:blue", "agent start (imports distributed)": "tab:orange",
              "start request → fork": "tab:red", "worker starts and registers": "tab:green",
              "lease claim": "tab:purple"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.2 * len(hosts) + 2.0)), dpi=100)
    seen: set[str] = set()
    for row, host in enumerate(hosts):
        for start, end, label in bars[host]:
            ax.barh(row, max(end - start, 0.005), left=start, height=0.6, color=colors[label],
                    label=None if label in seen else label)  # fmt: skip
            seen.add(label)
    for phase, style in (("reach_probed", ":"), ("scheduler_ready", "--")):
        if phase in marks:
            ax.axvline(marks[phase], color="black", linestyle=style, linewidth=1, label=phase.replace("_", " "))
    if isinstance(record.get("startup"), (int, float)):
        ax.axvline(record["startup"], color="grey", linewidth=1, label="all registered")
    ax.set_yticks(range(len(hosts)), hosts)
    ax.invert_yaxis()
    ax.set_xlabel("seconds after the constructor was called")
    ax.set_title(f"One start-up of ours, {record['case']} (run {record['run'] + 1})")
    ax.grid(True, axis="x", alpha=0.3)
    if len(hosts) > 24:
        ax.tick_params(axis="y", labelsize=6)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_growth(data: dict[str, Any], path: Path) -> None:
    """``growth.png``: start-up against hosts (one worker each) for ours, SSHCluster and the floor, with fitted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {c["name"]: c for c in data["settings"]["cases"]}
    _, _, fit = host_growth(data["runs"], cases)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for tool, label, style in (("ours", "speccluster-ssh (TLS)", "o-"), ("dask", "dask SSHCluster (TCP)", "s--"),
                               ("floor", "floor: import distributed per host", "^:")):  # fmt: skip
        pts = fit["points"][tool]
        if not pts:
            continue
        k = fit["slopes"][tool]
        ax.plot([x for x, _ in pts], [y for _, y in pts], style,
                label=label + ("" if k is None else f" ({k:.2f} s/host)"))  # fmt: skip
    ax.set_xlabel("hosts (one worker each)")
    ax.set_ylabel("seconds until all registered (median)")
    ax.set_ylim(bottom=0)
    ax.set_title("Start-up against hosts, on one 2-core machine")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _idle_rows(records: list[dict[str, Any]], cases: dict[str, Any]) -> list[list[str]]:
    """Head CPU of ours while idle, healing on and off (the ``idle-HxN`` pairs), and the healer's passes then."""
    rows: list[list[str]] = []
    for name, case in cases.items():
        off_name = f"{name}-noheal"
        if case.get("kind") != "idle" or not case.get("heal", True) or off_name not in cases:
            continue
        workers = case["hosts"] * case["nworkers"]
        idle = case.get("idle", 0)
        on, off = summarize(records, name, "ours", "head.cpu_per_s_idle"), summarize(records, off_name, "ours", "head.cpu_per_s_idle")
        # Within the spread of healing off: the machine is shared, and one median is noisy.
        flag = None if on.median is None or off.spread is None else on.median <= off.spread[1]
        label = f"head CPU while idle {idle:g} s, {workers} workers, ours with healing on (share of one core; min – max)"
        rows.append([label, _spread_cell(on, "%"), "—", "—", "≤ healing off (its max)", met_text(flag)])
        rows.append([f"head CPU while idle {idle:g} s, {workers} workers, ours with healing off (`heal=False`)",
                     _spread_cell(off, "%"), "—", "—", "reference", "—"])  # fmt: skip
        passes = summarize(records, name, "ours", "head.healer_passes_idle")
        rows.append([f"healing passes in that idle window, {workers} workers (healing on)", cell(passes, ""), "—", "—",
                     "0 (wakes on events only)", met_text(None if not passes.values else max(passes.values) == 0)])  # fmt: skip
    return rows


def _bastion_rows(records: list[dict[str, Any]], cases: dict[str, Any]) -> list[list[str]]:
    """Ours only: start-up on N hosts behind one strict bastion beside the same N hosts reached directly."""
    rows: list[list[str]] = []
    for name, case in cases.items():
        if case.get("topology") != "bastion":
            continue
        n = case["hosts"]
        flat_name = next((k for k, c in cases.items() if c.get("topology") == "flat" and c["hosts"] == n), None)
        behind = summarize(records, name, "ours", "startup")
        flat = summarize(records, flat_name, "ours", "startup") if flat_name else Summary([], [], 0)
        rows.append([f"start-up, {n} hosts × 1 worker, flat network (every host reached directly)",
                     cell(flat), "—", "—", "reference", "—"])  # fmt: skip
        rows.append([f"start-up, {n} private hosts × 1 worker behind one bastion (`MaxStartups 2:100:2`, "
                     "ProxyJump from an ssh_config, scheduler on the head)", cell(behind), "—", "—",
                     "reported beside flat", "—"])  # fmt: skip
        r = ratio(behind, flat)
        rows.append([f"start-up behind the bastion / flat, {n} hosts", "—" if r is None else f"{r:.2f}", "—", "—", "—", "—"])
        peak = summarize(records, name, "ours", "bastion_peak")
        rows.append([f"bastion connections: the head's SSH connections to the bastion during that start-up "
                     f"(peak, sampled every 0.2 s), {n} hosts behind it", cell(peak, ""), "—", "—", "1",
                     met_text(None if not peak.values else max(peak.values) == 1 and not peak.notes)])  # fmt: skip
    return rows


def met_text(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "**no**")


def _spread_cell(summary: Summary, unit: str) -> str:
    text = cell(summary, unit)
    if summary.spread is not None and len(summary.values) > 1:
        text += f" ({fmt_value(summary.spread[0], unit)} – {fmt_value(summary.spread[1], unit)})"
    return text


def _ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}"


def _listed_cell(records: list[dict[str, Any]], tool: str) -> str:
    listed = summarize(records, "ops-4x2", tool, "workers_after_scale_down")
    wanted = summarize(records, "ops-4x2", tool, "scale_down_target")
    if listed.median is None or wanted.median is None:
        return cell(listed)
    return f"{listed.median:g} ({wanted.median:g})"


def _conn_cell(per_host: Summary, hosts: Summary) -> str:
    if per_host.median is None:
        return cell(per_host)
    return f"{per_host.median:g} (to {hosts.median:g} hosts)"


def _growth(records: list[dict[str, Any]], cases: dict[str, Any]) -> tuple[list[list[str]], dict[str, float | None]]:
    rows = []
    points: dict[str, list[tuple[float, float]]] = {"ours": [], "dask": []}
    for name in START_CASES:
        if name not in cases:
            continue
        workers = cases[name]["hosts"] * cases[name]["nworkers"]
        row = [f"{workers} ({cases[name]['hosts']} × {cases[name]['nworkers']})"]
        for tool in ("ours", "dask"):
            start = summarize(records, name, tool, "startup")
            row.append(cell(start))
        for tool in ("ours", "dask"):
            row.append(cell(summarize(records, name, tool, "derived.rss_growth"), "MB"))
        for tool in ("ours", "dask"):
            row.append(cell(summarize(records, name, tool, "head.cpu_startup")))
        for tool in ("ours", "dask"):
            growth = summarize(records, name, tool, "derived.rss_growth")
            if growth.median is not None:
                points[tool].append((float(workers), growth.median))
        rows.append(row)
    return rows, {tool: slope(p) for tool, p in points.items()}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    """The text of ``results.md``."""
    rows, growth = build_rows(data)
    m, st = data["machine"], data["settings"]
    records = data["runs"]
    mode = "quick (1 run, small cases only)" if st["quick"] else f"{st['runs']} runs"
    out = [
        "# speccluster-ssh vs dask's SSHCluster",
        "",
        f"{m['date']} · {mode} · {m['cpu_count']} CPUs · Python {m['python']} · distributed {m['distributed']} · "
        f"asyncssh {m['asyncssh']} · load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at end · {m['seconds']:.0f} s in all",
        "",
        *([f"Merged from {len(m['sittings'])} sittings (`--merge`): "
           + "; ".join(f"{x['date']}, load {x['loadavg_start'][0]:.1f} → {x['loadavg_end'][0]:.1f}" for x in m["sittings"]),
           ""] if m.get("sittings") else []),  # fmt: skip
        "Medians over runs; the two tools ran alternately on the same lab hosts (real sshd in network "
        "namespaces on this one machine). Ours uses its default TLS unless a row says otherwise; "
        "SSHCluster uses plain TCP and runs its scheduler over SSH on a host of its own. Nanny workers, "
        "1 thread each. A value with `(k/n: …)` had k runs that gave no number, for the reason shown.",
        "",
        _table(["row", "ours (median)", "SSHCluster (median)", "ours / SSHCluster", "target", "met?"], rows),
        "",
        "## Growth",
        "",
        _table(["workers (hosts × per host)", "start-up, ours", "start-up, SSHCluster", "head RSS added, ours",
                "head RSS added, SSHCluster", "head CPU to start, ours", "head CPU to start, SSHCluster"], growth),  # fmt: skip
        "",
        "Head RSS added: the head process's RSS when every worker is registered, minus the same just before "
        "the constructor (after imports). Ours carries the scheduler (and its dashboard) in the head; "
        "SSHCluster's runs on a lab host, which is also why it holds one more SSH connection than it has "
        "worker hosts.",
        "",
        "## Clean-up between runs",
        "",
        _table(["tool", "sessions", "sessions with leftovers", "processes SIGKILLed by the bench", "sessions with errors"],
               _cleanup_rows(records)),  # fmt: skip
        "",
        f"Caps: start-up {st['start_cap']:g} s (twice that above 32 workers), replacement {st['recover_cap']:g} s, "
        f"head crash {st['crash_cap']:g} s, processes gone {st['gone_cap']:g} s.",
        "",
    ]
    cases = {c["name"]: c for c in st["cases"]}
    hrows, fit, _ = host_growth(records, cases)
    if hrows:
        out += [
            "## Growth with hosts (one worker each), and the floor",
            "",
            _table(["hosts", "start-up, ours", "start-up, SSHCluster", "floor", "ours above floor",
                    "SSHCluster above floor", "ours / SSHCluster", "head CPU to start, ours",
                    "head RSS added, ours"], hrows),  # fmt: skip
            "",
            _table(["series", "seconds per added host (least squares)", "hosts fitted", "stopped"], fit),
            "",
            "Floor: `python -c \"import distributed\"` once on each host, all at once, each over its own SSH "
            "connection opened the way ours opens them (speccluster-ssh's `HostConnection`, same inventory), timed "
            "from before the connections open to the last import's end. Here every lab host shares the same two "
            "cores, so the floor grows with the host count; on real hardware each host imports on its own CPUs "
            "and the floor stays flat.",
            "",
        ]
    rec = timeline_record(records)
    if rec is not None:
        out += [
            f"## Timeline of one start-up (ours, {rec['case']}, run {rec['run'] + 1})",
            "",
            "Seconds after the constructor was called, from the stamps the code records at each phase "
            "(`speccluster_ssh.timeline`); per host or per worker, first / median / last. See `timeline.png`.",
            "",
            _table(["phase", "count", "first", "median", "last"], timeline_rows(rec)),
            "",
        ]
    spread = _spread_rows(records)
    if spread:
        out += ["## Spread (min – max over runs)", "", _table(["case", "metric", "ours", "SSHCluster"], spread), ""]
    return "\n".join(out)


def _cleanup_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for tool in ("ours", "nolease", "dask", "plain"):
        recs = [r for r in records if r["tool"] == tool]
        if not recs:
            continue
        rows.append([
            {"ours": "ours", "nolease": "ours, lease claims skipped", "dask": "SSHCluster", "plain": "plain ssh worker"}[tool],
            str(len(recs)),
            str(sum(1 for r in recs if r.get("leftovers"))),
            str(sum(int(r.get("leftovers") or 0) for r in recs)),
            str(sum(1 for r in recs if r.get("errors"))),
        ])
    return rows


def _spread_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    seen = []
    for rec in records:
        if rec["case"] not in seen:
            seen.append(rec["case"])
    for case in seen:
        for key in ("startup", "scale_up", "scale_down", "recover", "head_crash", "teardown"):
            cells = []
            for tool in ("ours", "dask"):
                sp = summarize(records, case, tool, key).spread
                cells.append("—" if sp is None else f"{fmt_seconds(sp[0])} – {fmt_seconds(sp[1])}")
            if any(c != "—" for c in cells):
                rows.append([case, key, *cells])
    return rows


def plot(data: dict[str, Any], path: Path) -> None:
    """``startup.png``: start-up time against worker count for both tools."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["runs"]
    cases = {c["name"]: c for c in data["settings"]["cases"]}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for tool, label, style in (("ours", "speccluster-ssh (TLS)", "o-"), ("dask", "dask SSHCluster (TCP)", "s--")):
        xs, ys, lo, hi = [], [], [], []
        for name in START_CASES:
            if name not in cases:
                continue
            summ = summarize(records, name, tool, "startup")
            if summ.median is None or summ.spread is None:
                continue
            xs.append(cases[name]["hosts"] * cases[name]["nworkers"])
            ys.append(summ.median)
            lo.append(summ.median - summ.spread[0])
            hi.append(summ.spread[1] - summ.median)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=label)
    plain = summarize(records, "plain-1", "plain", "startup")
    if plain.median is not None:
        ax.axhline(plain.median, color="grey", linestyle=":", label="one plain ssh dask_worker")
    ax.set_xscale("log", base=2)
    ticks = sorted({cases[n]["hosts"] * cases[n]["nworkers"] for n in START_CASES if n in cases})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("workers (nanny, 1 thread each)")
    ax.set_ylabel("seconds until all registered (median)")
    ax.set_ylim(bottom=0)
    ax.set_title("Start-up time")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(data: dict[str, Any], out: Path) -> None:
    """Write ``runs.json``, ``results.md`` and ``startup.png`` into ``out``."""
    text = markdown(data)  # also adds the derived values the JSON keeps
    (out / "runs.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    (out / "results.md").write_text(text)
    plot(data, out / "startup.png")
    cases = {c["name"]: c for c in data["settings"]["cases"]}
    if any(name in cases for name in HOST_CASES):
        plot_growth(data, out / "growth.png")
    rec = timeline_record(data["runs"])
    if rec is not None:
        plot_timeline(rec, out / "timeline.png")
