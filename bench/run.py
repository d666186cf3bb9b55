"""Run the benchmark: build the SSH lab, run every case for both tools, write the results.

Usage (from the repository root, as root)::

    python -m bench                 # full: 5 runs of every case
    python -m bench --quick         # 1 run of the small cases (CI smoke test)
    python -m bench --runs 7 --out /tmp/results

Each case is run once per tool per run, and the order of the two tools
flips from one run to the next, so that drift in the machine's load does not
always favour the same tool. Every session's head is a fresh process
(:mod:`bench.driver`). Before and after each session the lab hosts must be
empty (no process but sshd); leftovers are SIGKILLed by pid and counted as a
failure of the tool that left them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .driver import MARK, wait_until

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("ours", "dask")
# Start-up cases also measure the floor: one `import distributed` per host, at once, over SSH.
WITH_FLOOR = ("ours", "dask", "floor")
GROWTH_HOSTS = (4, 8, 16, 32, 48)  # the growth series: hosts × 1 worker


@dataclass(frozen=True)
class Case:
    """One kind of session: a host layout and what to do with the cluster."""

    name: str
    hosts: int
    nworkers: int
    kind: str = "start"  # start | ops | headcrash | plain | idle | release | env
    tools: tuple[str, ...] = WITH_FLOOR
    end: str = "close"  # close | crash: how an ops session ends
    security: bool = True
    idle: float = 0.0  # seconds of idle head cost to measure after start-up
    settle: float = 2.0  # seconds of quiet before that
    heal: bool = True  # ours: SSHSpecCluster(heal=...)
    pair: str = ""  # cases of one pair swap their order from run to run, like the tools
    topology: str = ""  # "" (the usual hosts) | flat | bastion: hosts 2.. behind host 1 or not
    cap_scale: float = 1.0  # times the start-up cap (many hosts importing distributed at once)
    slots: int = 2  # speccluster_slots of each host (2: room to scale up on warm hosts)
    env: str = ""  # kind "env": cold | warm | host (issue 24, see bench/env_session.py)

    @property
    def workers(self) -> int:
        return self.hosts * self.nworkers


@dataclass
class Settings:
    """What one invocation of the bench does."""

    runs: int
    quick: bool
    out: Path
    start_cap: float
    recover_cap: float
    crash_cap: float
    gone_cap: float = 15.0
    down_cap: float = 15.0
    cases: list[Case] = field(default_factory=list)


IDLE_SECONDS = 20.0  # the idle window of the healing on/off cases


def idle_pair(hosts: int, nworkers: int, idle: float = IDLE_SECONDS) -> list[Case]:
    """Ours only, idle after start-up, healing on and off: the healer must not cost CPU while nothing happens."""
    name = f"idle-{hosts}x{nworkers}"
    return [
        Case(name, hosts, nworkers, kind="idle", tools=("ours",), idle=idle, settle=3.0, pair=name),
        Case(f"{name}-noheal", hosts, nworkers, kind="idle", tools=("ours",), idle=idle, settle=3.0, heal=False, pair=name),
    ]


BASTION_MAX_STARTUPS = "2:100:2"  # the bastion's sshd, as on hardened sites


def bastion_pair(hosts: int) -> list[Case]:
    """Ours only, one worker on each of ``hosts`` hosts (lab hosts 2..), reached directly or through host 1.

    The bastion case puts those hosts behind a ``MaxStartups 2:100:2`` bastion
    (SSH only from it; the hosts still reach the head, so the scheduler stays
    there) and reaches them with ``ProxyJump`` from an ssh_config.
    """
    pair = f"jump-{hosts}"
    return [
        Case(f"flat-{hosts}", hosts, 1, tools=("ours",), pair=pair, topology="flat", cap_scale=2.0),
        Case(f"bastion-{hosts}", hosts, 1, tools=("ours",), pair=pair, topology="bastion", cap_scale=2.0),
    ]


def growth_cases(hosts: tuple[int, ...] = GROWTH_HOSTS) -> list[Case]:
    """One worker on each of 4 … 48 hosts, for ours, SSHCluster and the floor (``4x1`` is in the plan anyway).

    From 24 hosts on the cap doubles, and the cluster's own start timeout
    with it: 48 agents importing distributed on two cores take about a minute.
    """
    return [Case(f"{n}x1", n, 1, cap_scale=2.0 if n >= 24 else 1.0) for n in hosts if n != 4]


def lease_cases() -> list[Case]:
    """Issue 23's rows: what a lease claim adds to a start-up, and how soon a freed slot is taken.

    ``lease-16x1`` starts 16 hosts × 1 worker with each entry's lease
    claimed (``ours``) and with the claims skipped in the head (``nolease``,
    a bench-only patch: the product has no switch). ``release-4x1`` fills a
    4-host lab of 1 slot each with one cluster, starts a second that waits
    (``min_workers=0``), scales the first down by one and times the release
    until the waiting cluster's first worker is registered.
    """
    return [
        Case("lease-16x1", 16, 1, tools=("ours", "nolease")),
        Case("release-4x1", 4, 1, kind="release", tools=("ours",), slots=1),
    ]


# Names that stand for several cases in --cases.
CASE_GROUPS = {
    "growth": ["4x1", *(c.name for c in growth_cases())],
    "targets": ["4x2", "ops-4x2", "8x4", "16x1", "32x1", "48x1"],
    "leases": [c.name for c in lease_cases()],
    "envs": ["env-cold-4", "env-cold-16", "env-warm-4", "env-host-4"],  # issue 24 (bench/env_session.py)
}


def plan(quick: bool, idle: float = IDLE_SECONDS) -> list[Case]:
    """The cases of one run, in the order they are run.

    Quick mode keeps the smoke test short: 4 × 1 runs for ours alone (its
    target is the plain ssh worker, not SSHCluster), one 4 × 2 session
    per tool scales, loses a worker and then loses its head, and one
    release on 4 hosts (about 12 s). The idle healing on/off pair and the
    16-host lease claim are in the full plan only (``--cases`` picks them).
    """
    if quick:
        return [
            Case("plain-1", 1, 1, kind="plain", tools=("plain",)),
            Case("4x1", 4, 1, tools=("ours", "floor")),
            Case("4x2", 4, 2, idle=1.0, settle=1.0),
            Case("4x2-notls", 4, 2, tools=("ours",), security=False),
            Case("ops-4x2", 4, 2, kind="ops", end="crash", tools=TOOLS),
            *(c for c in lease_cases() if c.kind == "release"),
        ]
    return [
        Case("plain-1", 1, 1, kind="plain", tools=("plain",)),
        Case("4x1", 4, 1),
        Case("4x2", 4, 2),
        Case("4x2-notls", 4, 2, tools=("ours",), security=False),
        Case("ops-4x2", 4, 2, kind="ops", tools=TOOLS),
        Case("headcrash-4x2", 4, 2, kind="headcrash", tools=TOOLS),
        Case("4x4", 4, 4),
        Case("8x4", 8, 4, idle=5.0),
        Case("8x8", 8, 8),
        *growth_cases(),
        *idle_pair(8, 4, idle),
        *bastion_pair(24),
        *lease_cases(),
        *_env_cases(),
    ]


def _env_cases() -> list[Case]:
    from .env_session import env_cases  # issue 24's rows

    return env_cases()


# -- the lab ----------------------------------------------------------------
def import_sshlab() -> Any:
    """The lab module of the test suite (``tests/sshlab.py``)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import sshlab

    return sshlab


def _is_sshd(argv: list[str]) -> bool:
    return bool(argv) and "sshd" in argv[0]


def _netns_of(pid: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None  # gone, or a zombie (zombies have no namespaces left)
    return (st.st_dev, st.st_ino)


def _argv_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class LabView:
    """The processes of every lab host, from one pass over ``/proc``.

    ``LabHost.processes()`` scans ``/proc`` once per host; the bench polls
    every host many times a second while it measures, and a scan per host
    would eat a share of the same two cores the clusters run on.
    """

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.ns: dict[tuple[int, int], str] = {}
        for host in lab.hosts:
            st = os.stat(f"/run/netns/{host.netns}")
            self.ns[(st.st_dev, st.st_ino)] = host.name

    def processes(self) -> dict[str, list[tuple[int, list[str]]]]:
        """Host name -> (pid, argv) of every live process there but sshd."""
        out: dict[str, list[tuple[int, list[str]]]] = {}
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            host = self.ns.get(_netns_of(entry.name))  # type: ignore[arg-type]
            if host is None:
                continue
            pid = int(entry.name)
            argv = _argv_of(pid)
            if argv and not _is_sshd(argv):
                out.setdefault(host, []).append((pid, argv))
        return out

    def empty(self) -> bool:
        return not self.processes()

    def sessions_left(self) -> list[int]:
        """Pids of sshd session processes (anything sshd but the listener) still on the hosts."""
        listeners = {h.sshd_pid for h in self.lab.hosts}
        return [p for h in self.lab.hosts for p, argv in h.processes() if _is_sshd(argv) and p not in listeners]


def count(procs: dict[str, list[Any]]) -> int:
    return sum(len(v) for v in procs.values())


def wait_for(check: Callable[[], bool], cap: float) -> float | None:
    """Poll ``check()`` every 50 ms; the monotonic time it first held, or ``None`` after ``cap`` s."""
    return wait_until(check, cap, interval=0.05)


def kill_leftovers(view: LabView) -> list[dict[str, Any]]:
    """SIGKILL every non-sshd process on the lab hosts, by pid; what was killed.

    psutil checks that a pid still names the process it saw (by start time)
    before signalling it, so a recycled pid is never hit.
    """
    killed = []
    for _ in range(5):  # a dying parent may still fork; look again a few times
        procs = view.processes()
        if not procs:
            break
        for host, items in procs.items():
            for pid, argv in items:
                try:
                    psutil.Process(pid).kill()
                    killed.append({"host": host, "pid": pid, "argv": " ".join(argv)[:200]})
                except psutil.Error:
                    pass
        wait_for(view.empty, 2.0)
    return killed


def snapshot(view: LabView) -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, start time) of every non-sshd process on the lab hosts."""
    out: dict[int, tuple[int, float]] = {}
    for items in view.processes().values():
        for pid, _ in items:
            try:
                proc = psutil.Process(pid)
                out[pid] = (proc.ppid(), proc.create_time())
            except psutil.Error:
                pass
    return out


def family(tree: dict[int, tuple[int, float]], roots: list[int]) -> dict[int, float]:
    """``roots`` and their descendants in ``tree``, each with its start time (to tell a reused pid)."""
    out = {pid: tree[pid][1] for pid in roots if pid in tree}
    for _ in range(len(tree)):  # one generation per pass; bounded by the tree's size
        more = {pid: t for pid, (ppid, t) in tree.items() if ppid in out and pid not in out}
        if not more:
            break
        out.update(more)
    return out


def all_gone(procs: dict[int, float]) -> bool:
    for pid, started in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            continue
    return True


class BastionWatch:
    """Samples, in a thread, the head's established SSH connections to ``bastion`` (as its sshd sees them)."""

    def __init__(self, bastion: Any, head_ip: str, interval: float = 0.2) -> None:
        self.bastion, self.head_ip, self.interval = bastion, head_ip, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.bastion.ssh_peers().count(self.head_ip))
            except Exception:  # noqa: BLE001 - a failed look is no sample
                pass
            if self._stop.wait(self.interval):
                return

    def stop(self) -> int:
        """Stop sampling; the peak."""
        self._stop.set()
        self._thread.join(timeout=10)
        return self.peak


# -- the head process ---------------------------------------------------------
class Driver:
    """A :mod:`bench.driver` subprocess and its answers."""

    def __init__(self, config: dict[str, Any], log: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.driver", json.dumps(config)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            return
        for line in stdout:
            if line.startswith(MARK):
                self.answers.put(json.loads(line[len(MARK):]))
        self.answers.put(None)  # end of output

    def send(self, **cmd: Any) -> None:
        if self.proc.stdin is None:
            raise RuntimeError("driver has no stdin")
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, *events: str, timeout: float) -> dict[str, Any]:
        """The next answer, which must be one of ``events``."""
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer {events} from the head within {timeout:g} s") from None
        if answer is None:
            raise RuntimeError(f"the head exited (code {self.proc.poll()}) before answering {events}")
        if answer.get("event") not in events:
            raise RuntimeError(f"expected {events}, got {answer}")
        return answer

    def kill(self) -> None:
        """SIGKILL the head process (our own child, by pid)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()


# -- sessions ---------------------------------------------------------------
class Bench:
    """Runs sessions on one lab and collects their records."""

    def __init__(self, lab: Any, settings: Settings, workdir: Path) -> None:
        self.lab = lab
        self.view = LabView(lab)
        self.settings = settings
        self.workdir = workdir
        self.records: list[dict[str, Any]] = []
        self.by_ip = {h.ip: h for h in lab.hosts}
        # The last host runs SSHCluster's scheduler; the others are worker hosts for both tools.
        self.sched_host = lab.hosts[-1]
        self.worker_hosts = lab.hosts[:-1]
        self._inventories: dict[tuple[int, int, bool, int], str] = {}
        self._ssh_config: Path | None = None

    def hosts_of(self, case: Case) -> list[Any]:
        """The worker hosts of ``case``: lab hosts 2.. for flat/bastion (host 1 is the bastion)."""
        if case.topology:
            return self.lab.hosts[1 : 1 + case.hosts]
        return self.worker_hosts[: case.hosts]

    def inventory(self, case: Case) -> str:
        key = (case.hosts, case.nworkers, bool(case.topology), case.slots)
        if key not in self._inventories:
            names = [h.name for h in self.hosts_of(case)]
            tag = ("-behind" if case.topology else "") + (f"-{case.slots}slots" if case.slots != 2 else "")
            path = self.workdir / f"inventory-{case.hosts}x{case.nworkers}{tag}.yml"
            self._inventories[key] = str(
                self.lab.write_inventory(
                    path,
                    groups={"workers": names},
                    group_vars={
                        # The lab writes its known_hosts path here, but the
                        # inventory reads this variable as the host-key policy.
                        "all": {"speccluster_known_hosts": "strict"},
                        # Two slots per host (the default) leave room to scale up on warm hosts.
                        "workers": {"speccluster_nworkers": case.nworkers, "speccluster_nthreads": 1,
                                    "speccluster_slots": case.slots},
                    },
                )
            )
        return self._inventories[key]

    def config(self, case: Case, tool: str) -> dict[str, Any]:
        cap = self.settings.start_cap * (1 if case.workers <= 32 else 2) * case.cap_scale
        return {
            # nolease: ours with each entry's lease claim skipped in the head (bench.driver.instrument_leases).
            "tool": "ours" if tool == "nolease" else tool,
            "leases": tool != "nolease",
            "inventory": self.inventory(case) if tool in ("ours", "nolease", "floor") else None,
            "known_hosts": str(self.lab.known_hosts),
            "client_key": str(self.lab.client_key),
            "hosts": [h.ip for h in (self.hosts_of(case) if case.topology else self.worker_hosts)],
            "sched_host": self.sched_host.ip,
            "head_ip": self.lab.head_ip,
            "entries": case.hosts,
            "nworkers": case.nworkers,
            "security": case.security,
            "heal": case.heal,
            "python": sys.executable,
            "cap": cap,
            "ssh_config": str(self.ssh_config) if case.topology == "bastion" else None,
            # Many hosts at once: the cluster's own start timeout (60 s by default) grows with the cap.
            "start_timeout": cap if case.cap_scale > 1 else None,
        }

    @property
    def ssh_config(self) -> Path:
        """An ssh_config with ``ProxyJump h1`` for every host but the bastion itself."""
        if self._ssh_config is None:
            # Written once per bench: it names this lab's key and known_hosts.
            bastion = self.lab.hosts[0]
            self._ssh_config = self.lab.write_ssh_config(
                self.workdir / "ssh_config-bastion", {h.name: bastion.name for h in self.lab.hosts[1:]}
            )
        return self._ssh_config

    @contextmanager
    def topology(self, case: Case) -> Iterator[None]:
        """Hosts 2.. behind the strict bastion host 1 for a bastion case; undone whatever happens."""
        if case.topology != "bastion":
            yield
            return
        sshlab = import_sshlab()
        bastion, private = self.lab.hosts[0], self.hosts_of(case)
        try:
            self.lab.make_bastion(bastion, BASTION_MAX_STARTUPS)
            # "ssh": only SSH from the head is dropped, so the scheduler stays on the head.
            self.lab.make_private(private, [bastion], from_head="ssh")
            direct = [h.name for h in private if sshlab._tcp_accepts(h.ip, 22, 1.0)]
            if direct:
                raise RuntimeError(f"the head still reaches {direct} directly")
            yield
        finally:
            for host in private:
                host.clear_firewall()
            if bastion.sshd_overrides.pop("MaxStartups", None) is not None:
                bastion.set_sshd_option("MaxStartups", "100:30:200")  # the lab's default again

    def run_session(self, case: Case, tool: str, run: int) -> dict[str, Any]:
        """Run one session of ``case`` with ``tool``; its record (also kept in ``records``)."""
        record: dict[str, Any] = {
            "case": case.name,
            "tool": tool,
            "run": run,
            "workers": case.workers,
            "security": case.security if tool == "ours" else False,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": os.getloadavg()[0],
            "errors": [],
        }
        # The hosts must be empty before we start; what is there belongs to nobody.
        stray = kill_leftovers(self.view)
        # SSH sessions of the last head end once their processes are gone.
        if wait_for(lambda: not self.view.sessions_left(), 3.0) is None:
            for pid in self.view.sessions_left():
                try:
                    psutil.Process(pid).kill()
                    stray.append({"pid": pid})
                except psutil.Error:
                    pass
        if stray:
            record["stray_before"] = len(stray)
        began = time.monotonic()
        try:
            if case.kind == "plain":
                self._plain(case, tool, record)
            elif tool == "floor":
                self._floor(case, tool, record)
            elif case.kind == "env":
                from .env_session import env_session  # issue 24's environment cases

                env_session(self, case, record, run)
            elif case.kind == "release":
                from .lease_session import release_session  # issue 23's release case

                release_session(self, case, record, run)
            else:
                with self.topology(case):
                    self._cluster(case, tool, record)
        except Exception as exc:  # one broken session must not stop the bench
            record["errors"].append(f"{type(exc).__name__}: {exc}")
        finally:
            # Whatever is still on the hosts a moment later is the tool's leftover.
            wait_for(self.view.empty, 1.0)
            killed = kill_leftovers(self.view)
            record["leftovers"] = len(killed)
            if killed:
                record["leftover_argv"] = [k["argv"] for k in killed[:10]]
        record["session_seconds"] = round(time.monotonic() - began, 3)
        record["ok"] = not record["errors"] and not record["leftovers"]
        self.records.append(record)
        return record

    def _plain(self, case: Case, tool: str, record: dict[str, Any]) -> None:
        driver = Driver(self.config(case, tool), self.workdir / f"{case.name}-{tool}.log")
        try:
            answer = driver.expect("plain", timeout=self.settings.start_cap + 60)
        finally:
            driver.stop()
        record["startup"] = answer.get("startup")
        if not answer.get("ok"):
            record["errors"].append(f"plain worker did not register: {answer.get('error', '')[-300:]}")

    def _floor(self, case: Case, tool: str, record: dict[str, Any]) -> None:
        driver = Driver(self.config(case, tool), self.workdir / f"{case.name}-{tool}.log")
        try:
            answer = driver.expect("floor", timeout=self.config(case, tool)["cap"] + 60)
        finally:
            driver.stop()
        record["startup"] = answer.get("startup")
        record["per_host"] = answer.get("per_host")
        if not answer.get("ok"):
            record["errors"].append(f"floor: {answer.get('error', '')[-300:]}")

    def _cluster(self, case: Case, tool: str, record: dict[str, Any]) -> None:
        config = self.config(case, tool)
        watch = BastionWatch(self.lab.hosts[0], self.lab.head_ip) if case.topology == "bastion" else None
        driver = Driver(config, self.workdir / f"{case.name}-{tool}.log")
        try:
            try:
                started = driver.expect("started", "start_failed", timeout=config["cap"] + 120)
            finally:
                if watch is not None:
                    # The most connections the head held to the bastion during the start.
                    record["bastion_peak"] = watch.stop()
            if started["event"] == "start_failed" or not started.get("ok"):
                record["errors"].append(f"start failed: {started.get('error') or started.get('workers')}")
                driver.kill()
                return
            record["startup"] = started["startup"]
            record["constructor"] = started["t_ctor"] - started["t0"]
            if started.get("timeline"):
                # Ours: the phases of this start-up, in seconds after the constructor was called.
                record["timeline"] = [
                    {**e, "t": round(e["t"] - started["t0"], 4)} for e in started["timeline"]
                ]
            record["head"] = {
                "rss_before": started["before"]["rss"],
                "rss": started["after"]["rss"],
                "cpu_startup": started["after"]["cpu"] - started["before"]["cpu"],
                "threads": started["after"]["threads"],
                "ssh": started["after"]["ssh"],
            }
            if case.idle > 0:
                driver.send(cmd="cost", idle=case.idle, settle=case.settle)
                cost = driver.expect("cost", timeout=case.idle + case.settle + 60)
                record["head"]["rss_idle"] = cost["after_idle"]["rss"]
                record["head"]["cpu_per_s_idle"] = (cost["after_idle"]["cpu"] - cost["settled"]["cpu"]) / case.idle
                record["head"]["ssh"] = cost["after_idle"]["ssh"]
                record["head"]["cpu_idle"] = cost["after_idle"]["cpu"] - cost["settled"]["cpu"]
                record["idle_seconds"] = case.idle
                record["heal"] = case.heal
                if cost.get("passes_after") is not None and cost.get("passes_settled") is not None:
                    # Healing passes in the idle window: an event-driven healer makes none.
                    record["head"]["healer_passes_idle"] = cost["passes_after"] - cost["passes_settled"]
            if case.kind == "ops":
                self._ops(driver, tool, record)
            if case.kind == "headcrash" or case.end == "crash":
                self._head_crash(driver, record)
            else:
                self._close(driver, record, measure=case.kind == "start")
        finally:
            driver.stop()

    def _ops(self, driver: Driver, tool: str, record: dict[str, Any]) -> None:
        s = self.settings
        # Scale up by 4 workers on warm hosts.
        driver.send(cmd="scale_up", k=4, cap=s.start_cap)
        up = driver.expect("scaled_up", "error", timeout=s.start_cap + 30)
        if up["event"] == "error":
            record["errors"].append(f"scale up: {up['error']}")
        elif not up["supported"]:
            record["scale_up"] = "not supported"
            record["scale_up_note"] = up["error"]
        elif up["ok"]:
            record["scale_up"] = up["seconds"]
        else:
            record["errors"].append(f"scale up: only {up['workers']} workers after {s.start_cap:g} s")
        # Scale down by 4 workers, until their processes are gone from the hosts.
        tree = snapshot(self.view)
        driver.send(cmd="scale_down", k=4)
        down = driver.expect("scaled_down", "error", timeout=60)
        if down["event"] == "error":
            record["errors"].append(f"scale down: {down['error']}")
        else:
            if tool == "ours":
                doomed = family(tree, down["pids"])
            else:
                # SSHCluster's entries are whole hosts: everything there must go.
                names = {self.by_ip[ip].name for ip in down["hosts"] if ip in self.by_ip}
                procs = self.view.processes()
                doomed = family(tree, [pid for name in names for pid, _ in procs.get(name, [])])
            record["scale_down_processes"] = len(doomed)
            gone = wait_for(lambda: all_gone(doomed), s.down_cap) if doomed else None
            if gone is None:
                left = sum(1 for pid in doomed if not all_gone({pid: doomed[pid]}))
                record["scale_down"] = f"{left} processes left after {s.down_cap:g} s" if doomed else "nothing removed"
            else:
                record["scale_down"] = gone - down["t0"]
            # Does the scheduler still list the workers that were scaled away?
            driver.send(cmd="registered")
            record["workers_after_scale_down"] = len(driver.expect("registered", timeout=60)["workers"])
            record["scale_down_target"] = down["target"]
        # SIGKILL one worker process and wait for a replacement to register.
        driver.send(cmd="victim")
        victim = driver.expect("victim", "error", timeout=60)
        if victim["event"] == "error" or not victim.get("gone"):
            record["errors"].append(f"no worker to kill: {victim}")
            return
        pid = victim.get("pid")
        if pid is None and tool == "dask":
            # SSHCluster: the process it started on that host runs the nannies.
            name = self.by_ip[victim["host"]].name
            pids = [p for p, argv in self.view.processes().get(name, []) if "distributed.cli.dask_spec" in argv]
            pid = min(pids) if pids else None
        if pid is None:
            record["errors"].append("could not find the worker process to kill")
            return
        record["killed_argv"] = " ".join(_argv_of(pid))[:200]
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        driver.send(cmd="await_replacement", gone=victim["gone"], n=victim["n"], cap=s.recover_cap)
        rep = driver.expect("replaced", "error", timeout=s.recover_cap + 60)
        if rep["event"] == "error":
            record["errors"].append(f"replacement: {rep['error']}")
        elif rep["ok"]:
            record["recover"] = rep["t_done"] - t_kill
        else:
            record["recover"] = f"no replacement within {s.recover_cap:g} s"
        if rep.get("t_noticed"):
            record["kill_noticed"] = rep["t_noticed"] - t_kill

    def _head_crash(self, driver: Driver, record: dict[str, Any]) -> None:
        cap = self.settings.crash_cap
        t_kill = time.monotonic()
        driver.kill()
        done = wait_for(self.view.empty, cap)
        if done is None:
            left = count(self.view.processes())
            record["head_crash"] = f"left {left} processes after {cap:g} s"
            record["head_crash_left"] = left
        else:
            record["head_crash"] = done - t_kill

    def _close(self, driver: Driver, record: dict[str, Any], measure: bool) -> None:
        driver.send(cmd="close")
        closing = driver.expect("closing", timeout=30)
        done = wait_for(self.view.empty, self.settings.gone_cap)
        closed = driver.expect("closed", timeout=120)
        if closed.get("error"):
            record["errors"].append(f"close: {closed['error']}")
        if measure:
            record["close_returned"] = closed["t"] - closing["t"]
            if done is not None:
                record["teardown"] = done - closing["t"]
            else:
                record["teardown"] = f"left {count(self.view.processes())} processes after {self.settings.gone_cap:g} s"


# -- the whole run -----------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import asyncssh
    import dask
    import distributed

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "distributed": distributed.__version__,
        "dask": dask.__version__,
        "asyncssh": asyncssh.__version__,
        "psutil": psutil.__version__,
        "loadavg_start": os.getloadavg(),
    }


def run_order(cases: list[Case], run: int) -> list[Case]:
    """``cases`` in the order of run ``run``: on odd runs, each pair of cases swaps its order."""
    if run % 2 == 0:
        return list(cases)
    out: list[Case] = []
    for case in cases:
        # Consecutive cases of one pair come out reversed.
        if out and case.pair and out[-1].pair == case.pair:
            at = len(out) - 1
            while at > 0 and out[at - 1].pair == case.pair:
                at -= 1
            out.insert(at, case)
        else:
            out.append(case)
    return out


def sessions(settings: Settings) -> Iterator[tuple[int, Case, str]]:
    """(run, case, tool) in order: tools, and the cases of a pair, alternate which goes first from run to run."""
    for run in range(settings.runs):
        for case in run_order(settings.cases, run):
            tools = case.tools if run % 2 == 0 else tuple(reversed(case.tools))
            for tool in tools:
                yield run, case, tool


@contextmanager
def lab_for(settings: Settings) -> Iterator[Any]:
    """A lab big enough for every case, torn down however the bench ends."""
    sshlab = import_sshlab()
    # +1: SSHCluster's scheduler host (the last), or for a flat/bastion case
    # the bastion (host 1, its workers on hosts 2..).
    n_hosts = max(c.hosts for c in settings.cases) + 1
    # SCLAB_PREFIX/SCLAB_SUBNET let the bench run beside a test session's lab.
    with sshlab.Lab(
        n_hosts,
        prefix=os.environ.get("SCLAB_PREFIX", "sclab"),
        subnet_base=os.environ.get("SCLAB_SUBNET", "10.250.0"),
    ) as lab:
        yield lab


def run_bench(settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every session and return what ``runs.json`` holds."""
    from .report import write_outputs

    settings.out.mkdir(parents=True, exist_ok=True)
    workdir = settings.out / "work"
    workdir.mkdir(exist_ok=True)
    info = machine_info()
    began = time.monotonic()
    with lab_for(settings) as lab:
        # Includes waiting for another lab on the subnet to finish.
        info["lab_seconds"] = round(time.monotonic() - began, 1)
        log(f"lab of {len(lab.hosts)} hosts ready after {info['lab_seconds']:.1f} s")
        bench = Bench(lab, settings, workdir)
        for run, case, tool in sessions(settings):
            rec = bench.run_session(case, tool, run)
            shown = {k: rec[k] for k in ("startup", "scale_up", "scale_down", "recover", "head_crash", "teardown", "bastion_peak",
                                         "release_to_registered")
                     if k in rec}
            if case.kind == "idle" and "cpu_per_s_idle" in rec.get("head", {}):
                shown["idle_cpu_share"] = rec["head"]["cpu_per_s_idle"]
                shown["healer_passes_idle"] = rec["head"].get("healer_passes_idle")
            log(f"run {run + 1}/{settings.runs} {case.name:14} {tool:5} {_fmt(shown)}"
                + (f" leftovers={rec['leftovers']}" if rec.get("leftovers") else "")
                + (f" errors={rec['errors']}" if rec["errors"] else ""))
    info["loadavg_end"] = os.getloadavg()
    info["seconds"] = round(time.monotonic() - began, 1)
    data = {
        "machine": info,
        "settings": {
            "runs": settings.runs,
            "quick": settings.quick,
            "start_cap": settings.start_cap,
            "recover_cap": settings.recover_cap,
            "crash_cap": settings.crash_cap,
            "gone_cap": settings.gone_cap,
            "down_cap": settings.down_cap,
            "cases": [c.__dict__ for c in settings.cases],
        },
        "runs": bench.records,
    }
    write_outputs(data, settings.out)
    return data


def merge_outputs(sources: list[Path], out: Path) -> dict[str, Any]:
    """Combine the ``runs.json`` of several bench outputs (sittings) into one output in ``out``.

    Runs are renumbered in order, so run-by-run values (above the floor) pair
    within one sitting; the machine record keeps each sitting's date and load.
    """
    from .report import write_outputs

    datas = [json.loads((src / "runs.json").read_text()) for src in sources]
    merged = datas[0]
    merged["machine"]["sittings"] = []
    offset = 0
    seen = set()
    records: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    for data in datas:
        runs = data["runs"]
        for rec in runs:
            rec.pop("derived", None)  # recomputed
            records.append({**rec, "run": rec["run"] + offset})
        offset += 1 + max((r["run"] for r in runs), default=-1)
        cases += [c for c in data["settings"]["cases"] if c["name"] not in seen]
        seen |= {c["name"] for c in data["settings"]["cases"]}
        m = data["machine"]
        merged["machine"]["sittings"].append(
            {k: m.get(k) for k in ("date", "loadavg_start", "loadavg_end", "seconds")}
        )
    merged["runs"] = records
    merged["settings"]["cases"] = cases
    merged["settings"]["runs"] = offset
    merged["machine"]["loadavg_end"] = datas[-1]["machine"]["loadavg_end"]
    merged["machine"]["seconds"] = round(sum(d["machine"]["seconds"] for d in datas), 1)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(merged, out)
    return merged


def _fmt(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def main(argv: list[str] | None = None) -> int:
    """Command line of ``python -m bench``.

    Parameters
    ----------
    argv
        Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns
    -------
    int
        0 when the bench ran (whatever it measured), 2 when it could not run.
    """
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of every case (default 5)")
    parser.add_argument("--quick", action="store_true", help="1 run of the small cases only (smoke test)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory")
    parser.add_argument("--recover-cap", type=float, default=None, help="seconds to wait for a replacement worker")
    parser.add_argument("--crash-cap", type=float, default=None, help="seconds to wait for hosts to empty after a head crash")
    parser.add_argument("--cases", default="", help="comma-separated case names to run (default: all of the mode)")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS,
                        help=f"idle window of the healing on/off cases (default {IDLE_SECONDS:g})")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                        help="combine the runs.json of earlier outputs (sittings) into --out; runs nothing")
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge_outputs(args.merge, args.out)
        print(f"merged {len(merged['runs'])} sessions of {len(args.merge)} sittings into {args.out}")
        return 0
    if os.geteuid() != 0:
        print("the bench builds network namespaces and needs root", file=sys.stderr)
        return 2
    quick = bool(args.quick)
    settings = Settings(
        runs=1 if quick else max(1, args.runs),
        quick=quick,
        out=args.out,
        start_cap=60.0 if quick else 90.0,
        # In quick mode a tool that never recovers costs the smoke test less time.
        recover_cap=args.recover_cap or (5.0 if quick else 30.0),
        crash_cap=args.crash_cap or (6.0 if quick else 30.0),
        gone_cap=8.0 if quick else 15.0,
        down_cap=3.0 if quick else 15.0,
        cases=plan(quick, idle=max(1.0, args.idle_seconds)),
    )
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
        for group, names in CASE_GROUPS.items():
            if group in wanted:
                wanted = (wanted - {group}) | set(names)
        known = {c.name for c in settings.cases}
        if wanted - known:
            parser.error(f"unknown cases {sorted(wanted - known)}; choose from {sorted(known)}")
        settings.cases = [c for c in settings.cases if c.name in wanted]
    data = run_bench(settings)
    m = data["machine"]
    print(f"wrote runs.json, results.md and startup.png to {settings.out} in {m['seconds']:.0f} s "
          f"({m['lab_seconds']:.0f} s of it to get the lab)")
    return 0
