"""Issue 23's release case: one cluster holds a full lab, another waits, one slot is freed.

:func:`release_session` runs the ``release-4x1`` session of
:class:`bench.run.Bench`: two head processes (:mod:`bench.driver`) on the
same hosts, the holder and the waiter, and the time from the holder's
release to the waiter's first worker registered.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .run import Driver, wait_for

if TYPE_CHECKING:
    from .run import Bench, Case


def wants(bench: Bench, case: Case) -> int:
    """Wants recorded in the lease directories (each host's own /var/tmp) of ``case``'s hosts."""
    return sum(len(list(Path(h.var_tmp).glob("speccluster-want.*.json"))) for h in bench.hosts_of(case))


def release_session(bench: Bench, case: Case, record: dict[str, Any], run: int) -> None:
    """A full lab, a cluster waiting for it; one slot freed: release → the waiter's first worker registered.

    The holder fills every slot of ``case``'s hosts; the waiter asks for
    as many with ``min_workers=0`` and starts with none. Once its wants
    are on the hosts (it waits, not timed) and a moment of its watcher's
    cycle has passed (spread evenly over it by the runs), the holder
    scales down by one.
    The release is timed in the holder's head, around the release of the
    entry's lease (after its processes stopped); the first worker the
    waiter's scheduler lists, by the waiter's poll (every 25 ms).
    """
    s = bench.settings
    holder_cfg = {**bench.config(case, "ours"), "name": "holder"}
    waiter_cfg = {**bench.config(case, "ours"), "name": "waiter", "min_workers": 0, "await_workers": 0}
    holder = Driver(holder_cfg, bench.workdir / f"{case.name}-holder.log")
    waiter: Driver | None = None
    try:
        started = holder.expect("started", "start_failed", timeout=holder_cfg["cap"] + 120)
        if started["event"] == "start_failed" or not started.get("ok"):
            record["errors"].append(f"holder did not start: {started.get('error') or started.get('workers')}")
            return
        record["holder_startup"] = started["startup"]
        waiter = Driver(waiter_cfg, bench.workdir / f"{case.name}-waiter.log")
        began = waiter.expect("started", "start_failed", timeout=waiter_cfg["cap"] + 120)
        if began["event"] == "start_failed":
            record["errors"].append(f"waiter did not start: {began.get('error')}")
            return
        record["waiter_workers_at_start"] = began["workers"]
        # Its watcher records wants on the full hosts within a pass or two (every 2 s while short).
        if wait_for(lambda: wants(bench, case) >= case.hosts, 30.0) is None:
            record["errors"].append(f"the waiter recorded {wants(bench, case)} wants on {case.hosts} full hosts")
            return
        # Released right after the waiter's look, the slot would always wait a whole interval;
        # a release comes at any moment of the waiter's cycle, so the runs spread evenly over it.
        from speccluster_ssh.sharing import SHORT_INTERVAL  # how often a waiting cluster looks

        record["release_offset"] = (run + 0.5) / bench.settings.runs * SHORT_INTERVAL
        time.sleep(record["release_offset"])
        holder.send(cmd="scale_down", k=1)
        down = holder.expect("scaled_down", "error", timeout=60)
        if down["event"] == "error":
            record["errors"].append(f"holder scale down: {down['error']}")
            return
        waiter.send(cmd="await_first", n=1, cap=s.start_cap)
        first = waiter.expect("first", "error", timeout=s.start_cap + 60)
        holder.send(cmd="released")
        released = holder.expect("released", timeout=60)["releases"]
        if not released:
            record["errors"].append("the holder released no lease")
            return
        t_release = released[0]["t_end"]
        record["release_seconds"] = released[0]["t_end"] - released[0]["t_begin"]
        record["scale_down_to_release"] = t_release - down["t0"]
        if first["event"] == "error" or not first.get("ok"):
            record["release_to_registered"] = f"no worker of the waiter within {s.start_cap:g} s"
            return
        record["release_to_registered"] = first["t_first"] - t_release
        # The waiter's stamps meanwhile (its lease claim, start request, ...), in seconds after the release.
        record["waiter_timeline"] = [{**e, "t": round(e["t"] - t_release, 4)} for e in first["timeline"]]
    finally:
        for driver in (waiter, holder):
            if driver is None:
                continue
            if driver.proc.poll() is None:
                try:
                    close_quietly(driver, record)
                except Exception as exc:  # noqa: BLE001 - the other still closes; leftovers are counted
                    record["errors"].append(f"close: {type(exc).__name__}: {exc}")
                    driver.kill()
            driver.stop()


def close_quietly(driver: Driver, record: dict[str, Any]) -> None:
    """Close one of several clusters on the same hosts (the hosts empty only once all are closed)."""
    driver.send(cmd="close")
    driver.expect("closing", timeout=30)
    closed = driver.expect("closed", timeout=120)
    if closed.get("error"):
        record["errors"].append(f"close: {closed['error']}")
