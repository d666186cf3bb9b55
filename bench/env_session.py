"""Issue 24's rows: environments the head ships (``speccluster_environment: head``).

Cases (ours only, one worker per host; :func:`env_cases`):

* ``env-cold-4``, ``env-cold-16``: every host's python is one bare venv (no
  packages) and its environment directory is empty (fresh for each session),
  so the start-up ships the wheels, builds each host's environment, then
  starts the workers. Measured: start-up (constructor → every worker
  registered), the bytes the head sent (wheel frames over SSH) against the
  wheelhouse's size, the bytes hosts fetched from each other (the fan-out),
  and the builds. The head's own wheel cache is gathered once before the
  first env session (not timed): these rows are about the hosts.
* ``env-warm-4`` and ``env-host-4``, a pair (they swap order from run to
  run): the same 4 hosts; ``warm`` under the head's environment already built
  on each host (built once, untimed, before its first session), ``host`` the
  default mode (the hosts' own python, which has distributed). Issue 24: a
  warm start costs no more than 0.3 s over ``host`` mode.

:func:`env_session` runs one session of :class:`bench.run.Bench`;
:func:`env_rows` adds the rows to ``results.md``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report import Summary, _summary, cell, met_text

if TYPE_CHECKING:
    from .run import Bench, Case

WARM_OVER_HOST = 0.3  # issue 24: a warm start costs at most this over host mode
HEAD_BYTES_TARGET = 3.0  # issue 24: for 16 cold hosts, the head sends at most 3 wheelhouses
COLD_CAP = 900.0  # seconds: 16 hosts building on two cores


def env_cases() -> list[Any]:
    from .run import Case

    return [
        Case("env-cold-4", 4, 1, kind="env", tools=("ours",), env="cold"),
        Case("env-cold-16", 16, 1, kind="env", tools=("ours",), env="cold"),
        Case("env-warm-4", 4, 1, kind="env", tools=("ours",), env="warm", pair="envwarm-4"),
        Case("env-host-4", 4, 1, kind="env", tools=("ours",), env="host", pair="envwarm-4"),
    ]


def _bare_python(workdir: Path) -> str:
    """A venv without pip or packages: every host's python in the head-environment cases (made once)."""
    venv = workdir / "bare-python"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(python)


def _gather_head_wheels(workdir: Path) -> float | None:
    """Gather the head's wheelhouse into its cache once (untimed for the sessions); seconds it took the first time."""
    marker = workdir / "head-wheels-gathered"
    if marker.exists():
        return None
    from speccluster_ssh.environments import EnvRequest, EnvTarget, build_wheelhouse

    began = time.monotonic()
    build_wheelhouse(EnvRequest(), EnvTarget.of_head())
    seconds = time.monotonic() - began
    marker.write_text(f"{seconds:.1f}\n")
    return seconds


def _inventory(bench: Bench, case: Case, envs: Path | None, path: Path) -> str:
    names = [h.name for h in bench.hosts_of(case)]
    head = case.env != "host"
    host_vars = {n: {"speccluster_env_dir": str(envs / n)} for n in names} if head and envs else {}
    all_vars: dict[str, Any] = {"speccluster_known_hosts": "strict"}
    if head:
        all_vars["speccluster_environment"] = "head"
    return str(bench.lab.write_inventory(
        path, groups={"workers": names}, host_vars=host_vars,
        python=_bare_python(bench.workdir) if head else sys.executable,
        group_vars={"all": all_vars, "workers": {"speccluster_nworkers": case.nworkers, "speccluster_nthreads": 1,
                                                 "speccluster_slots": case.slots}},
    ))  # fmt: skip


def _start_and_close(bench: Bench, case: Case, config: dict[str, Any], record: dict[str, Any], log: Path) -> None:
    from .run import Driver

    driver = Driver(config, log)
    try:
        started = driver.expect("started", "start_failed", timeout=config["cap"] + 120)
        if started["event"] == "start_failed" or not started.get("ok"):
            record["errors"].append(f"start failed: {started.get('error') or started.get('workers')}")
            driver.kill()
            return
        record["startup"] = started["startup"]
        if started.get("timeline"):
            # The phases of this start-up (SSH connect, agent ready, ...), in seconds after the constructor was called.
            record["timeline"] = [{**e, "t": round(e["t"] - started["t0"], 4)} for e in started["timeline"]]
        if started.get("env") is not None:
            record["env"] = started["env"]
        bench._close(driver, record, measure=False)
    finally:
        driver.stop()


def env_session(bench: Bench, case: Case, record: dict[str, Any], run: int) -> None:
    """One start-up (and close) of ``case``; the record gets ``startup`` and, for the head's environment, ``env``."""
    gathered = _gather_head_wheels(bench.workdir) if case.env != "host" else None
    if gathered is not None:
        record["head_gather_seconds"] = round(gathered, 1)
    envs: Path | None = None
    if case.env == "cold":
        envs = bench.workdir / f"envs-{case.name}-run{run}"
        shutil.rmtree(envs, ignore_errors=True)  # cold: nothing on any host
    elif case.env == "warm":
        envs = bench.workdir / "envs-warm"
    inventory = _inventory(bench, case, envs, bench.workdir / f"inventory-{case.name}-run{run}.yml")
    cap = COLD_CAP if case.env == "cold" else bench.settings.start_cap
    config = {**bench.config(case, "ours"), "inventory": inventory, "cap": cap, "start_timeout": cap,
              "security": True}  # fmt: skip
    if case.env == "warm" and envs is not None and not (envs / ".built").exists():
        # The environments are built once, untimed, before the first warm session.
        warmup: dict[str, Any] = {"errors": []}
        _start_and_close(bench, case, {**config, "cap": COLD_CAP, "start_timeout": COLD_CAP}, warmup,
                         bench.workdir / f"{case.name}-warmup.log")
        if warmup["errors"]:
            record["errors"].append(f"warm-up: {warmup['errors']}")
            return
        (envs / ".built").write_text("")
    _start_and_close(bench, case, config, record, bench.workdir / f"{case.name}-run{run}.log")
    if case.env == "cold" and envs is not None:
        shutil.rmtree(envs, ignore_errors=True)  # 16 environments: do not keep them


def _env_value(key: str) -> Any:
    def measure(rec: dict[str, Any]) -> float | str:
        value = (rec.get("env") or {}).get(key)
        if value is None:
            return "; ".join(rec.get("errors") or []) or "not reported"
        return float(value)

    return measure


def _head_share(rec: dict[str, Any]) -> float | str:
    env = rec.get("env") or {}
    if not env.get("wheelhouse_bytes"):
        return "; ".join(rec.get("errors") or []) or "not reported"
    return float(env["head_bytes"]) / float(env["wheelhouse_bytes"])


def env_rows(records: list[dict[str, Any]], cases: dict[str, Any]) -> list[list[str]]:
    """Rows of the main table (row, ours, SSHCluster, ratio, target, met?) for the cases present."""
    rows: list[list[str]] = []
    for name in ("env-cold-4", "env-cold-16"):
        if name not in cases:
            continue
        hosts = cases[name]["hosts"]
        start = _summary(records, name, "ours", lambda r: float(r["startup"]) if r.get("startup") is not None
                         else ("; ".join(r.get("errors") or []) or "no start"))  # fmt: skip
        share = _summary(records, name, "ours", _head_share)
        head_mb = _summary(records, name, "ours", _env_value("head_bytes"))
        house_mb = _summary(records, name, "ours", _env_value("wheelhouse_bytes"))
        peers_mb = _summary(records, name, "ours", _env_value("peer_bytes"))
        sizes = (f"head sent {_mb(head_mb)} of a {_mb(house_mb)} wheelhouse; hosts fetched {_mb(peers_mb)} "
                 "from each other")  # fmt: skip
        rows.append([f"cold environment, {hosts} hosts × 1 worker: start-up ({sizes})", cell(start), "—", "—",
                     "reported", "—"])  # fmt: skip
        flag = None if share.median is None else share.median <= HEAD_BYTES_TARGET
        rows.append([f"cold environment, {hosts} hosts: head bytes sent / wheelhouse size", _times(share), "—", "—",
                     f"≤ {HEAD_BYTES_TARGET:g} (16 hosts)" if hosts == 16 else "reported",
                     met_text(flag) if hosts == 16 else "—"])  # fmt: skip
    if "env-warm-4" in cases and "env-host-4" in cases:
        def startup(r: dict[str, Any]) -> float | str:
            return float(r["startup"]) if r.get("startup") is not None else ("; ".join(r.get("errors") or []) or "no start")

        warm = _summary(records, "env-warm-4", "ours", startup)
        host = _summary(records, "env-host-4", "ours", startup)
        over = None if warm.median is None or host.median is None else warm.median - host.median
        rows.append(["warm environment, 4 hosts × 1 worker: start-up (host mode: "
                     f"{cell(host)}; difference of the medians {'—' if over is None else f'{over:+.3f} s'})",
                     cell(warm), "—", "—", f"≤ host mode + {WARM_OVER_HOST:g} s",
                     met_text(None if over is None else over <= WARM_OVER_HOST)])  # fmt: skip
    return rows


def _mb(summary: Summary) -> str:
    return "—" if summary.median is None else f"{summary.median / 1e6:.1f} MB"


def _times(summary: Summary) -> str:
    return "—" if summary.median is None else f"{summary.median:.2f}×"
