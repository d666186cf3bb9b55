"""The ``speccluster-ssh`` command end to end on the SSH lab.

Every test drives the installed command as a subprocess, with a private
``XDG_STATE_HOME``, against real sshd hosts in network namespaces, and
looks at the hosts themselves (``/proc`` of the processes in each host's
namespace) to see what the command really started and stopped.

The processes of a cluster are recognised by the marker variable
``SPECCLUSTER_SSH_CLUSTER=<cluster_id>`` that the host agent and everything
it starts carry in their environment; on a host they form a tree::

    sshd session -> agent -> one process per spec entry (nanny) -> dask worker

Traffic goes only to loopback and to lab addresses. Processes are only ever
signalled by PID: head processes whose PID the test knows, and nothing on
the lab hosts (the ``lab_reset`` fixture cleans those by namespace).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from proctools import kill_tree
import pytest
import yaml

from sshlab import Lab, LabHost

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

MARKER = "SPECCLUSTER_SSH_CLUSTER"
T = TypeVar("T")


# -- waiting ----------------------------------------------------------------------------------


def poll(check: Callable[[], T], timeout: float, what: str, describe: Callable[[], Any] | None = None) -> T:
    """Call ``check`` until it returns something truthy and return that.

    Fails the test after ``timeout`` seconds, showing ``describe()`` (the
    state that was waited on) when given.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; last seen: {describe()!r}" if describe is not None else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{seen}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


# -- the command -----------------------------------------------------------------------------------


def _command() -> list[str]:
    """The installed console script next to this python, else the module."""
    script = Path(sys.executable).with_name("speccluster-ssh")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "speccluster_ssh.cli"]


@dataclass
class Cli:
    """Runs ``speccluster-ssh`` with a private state directory.

    Attributes
    ----------
    state_root
        ``$XDG_STATE_HOME/speccluster-ssh``: one directory per cluster.
    env
        The environment of every command run.
    popens
        Foreground ``up`` processes started by the test (ended at teardown).
    """

    state_root: Path
    env: dict[str, str]
    popens: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 150.0) -> subprocess.CompletedProcess[str]:
        """Run one command to its end and return its result."""
        return subprocess.run(
            [*_command(), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str, timeout: float = 150.0) -> subprocess.CompletedProcess[str]:
        """Run one command that must succeed."""
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
        # (stdout may quote remote logs, which hold tracebacks of their own)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def json(self, *args: str) -> Any:
        """Run a ``--json`` command that must succeed; return its parsed output."""
        return json.loads(self.ok(*args, "--json").stdout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start a command without waiting for it (a foreground ``up``)."""
        proc = subprocess.Popen(
            [*_command(), *args], env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.popens.append(proc)
        return proc

    def state(self, name: str) -> dict[str, Any] | None:
        """The cluster's ``state.json``, or ``None`` while there is none."""
        try:
            data = json.loads((self.state_root / name / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def up_detached(self, inventory: Path, name: str, *extra: str) -> dict[str, Any]:
        """``up --detach``; return the state of the running cluster."""
        self.ok("up", str(inventory), "--detach", "--name", name, "--timeout", "60", *extra, timeout=150)
        state = self.state(name)
        assert state is not None and state["phase"] == "running", state
        assert state["cluster_id"].startswith(f"{name}-"), state
        return state


def _head_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """A :class:`Cli` on a fresh state directory; stops whatever the test left running."""
    home = tmp_path / "xdg"
    home.mkdir()
    env = dict(os.environ)
    env["XDG_STATE_HOME"] = str(home)
    env.pop("DASK_SPECCLUSTER_SSH__STATE_DIR", None)
    env["COLUMNS"] = "200"
    runner = Cli(home / "speccluster-ssh", env)
    yield runner
    # A failed test may leave clusters: ask their heads to close, then make sure by PID.
    for proc in runner.popens:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.communicate(timeout=10)
    root = runner.state_root
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        state = runner.state(directory.name)
        if not state or not state.get("pid") or _head_gone(int(state["pid"])):
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            runner.run("down", "--name", directory.name, "--timeout", "60", timeout=90)
        kill_tree(int(state["pid"]))


# -- inventories -----------------------------------------------------------------------------------


def write_inventory(
    lab: Lab, path: Path, hosts: Sequence[str], host_vars: dict[str, dict[str, Any]] | None = None,
    scheduler: str | None = None, **common: Any,
) -> Path:
    """An inventory whose ``workers`` group holds ``hosts`` and which names no other lab host.

    ``scheduler`` names the host of the ``scheduler`` group (default: none, the
    scheduler runs in the head). ``common`` vars go to every host
    (``all.vars``); workers run one thread.
    """
    groups = {"workers": list(hosts)}
    if scheduler is not None:
        groups["scheduler"] = [scheduler]
    lab.write_inventory(
        path, groups=groups, host_vars=host_vars,
        group_vars={"all": {"speccluster_nthreads": 1, **common}},
    )
    data = yaml.safe_load(path.read_text())
    data["all"].pop("hosts", None)  # the lab's other hosts, listed ungrouped
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- what runs on the lab hosts ------------------------------------------------------------------


def _environ_marker(pid: int) -> str | None:
    """The process's ``SPECCLUSTER_SSH_CLUSTER`` value, or ``None``."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{MARKER}=".encode()
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def _ppid(pid: int) -> int | None:
    """The parent PID of ``pid``, or ``None`` once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


@dataclass
class HostTree:
    """One cluster's processes on one host, by their place in the tree."""

    agents: list[int] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)

    @property
    def pids(self) -> set[int]:
        """Every process of the cluster on the host."""
        return {*self.agents, *self.entries, *self.workers}


def cluster_tree(lab: Lab, cluster_id: str) -> dict[str, HostTree]:
    """Per lab host: the processes carrying ``SPECCLUSTER_SSH_CLUSTER=cluster_id``."""
    trees: dict[str, HostTree] = {}
    for host in lab.hosts:
        marked = {p.pid for p in host.processes() if _environ_marker(p.pid) == cluster_id}
        parents = {pid: _ppid(pid) for pid in marked}
        tree = HostTree()
        tree.agents = sorted(pid for pid in marked if parents[pid] not in marked)
        tree.entries = sorted(pid for pid in marked if parents[pid] in tree.agents)
        tree.workers = sorted(pid for pid in marked if parents[pid] in tree.entries)
        trees[host.name] = tree
    return trees


def workers_per_host(lab: Lab, cluster_id: str) -> dict[str, int]:
    """How many dask worker processes of the cluster run on each host (hosts with none left out)."""
    return {name: len(t.workers) for name, t in cluster_tree(lab, cluster_id).items() if t.workers}


def all_pids(lab: Lab, cluster_id: str) -> set[int]:
    """Every process of the cluster on every lab host."""
    return set().union(*(t.pids for t in cluster_tree(lab, cluster_id).values()))


def non_sshd(host: LabHost) -> list[tuple[int, str]]:
    """Every process in the host's namespace except its listening sshd."""
    return [(p.pid, " ".join(p.argv)[:120]) for p in host.processes() if p.pid != host.sshd_pid]


def lab_leftovers(lab: Lab) -> dict[str, list[tuple[int, str]]]:
    """Per lab host, its processes other than the listening sshd (hosts with none left out)."""
    return {h.name: procs for h in lab.hosts if (procs := non_sshd(h))}


def assert_lab_clean(lab: Lab, timeout: float = 20.0) -> None:
    """Every lab host is back to its bare sshd (SSH sessions may take a moment to end)."""
    poll(lambda: not lab_leftovers(lab), timeout, "every lab host to run only its sshd",
         lambda: lab_leftovers(lab))


def agent_dir(cluster_id: str) -> Path:
    """Where the host agents of a cluster keep their files."""
    # The lab hosts share this machine's file system, and the agents run as root there.
    return Path.home() / ".cache" / "speccluster-ssh" / cluster_id


def assert_keys_gone_logs_kept(cluster_id: str) -> None:
    """After a cluster's end: no TLS file is left on its hosts, its logs are (for speccluster_log_retention)."""
    root = agent_dir(cluster_id)
    poll(lambda: not list(root.glob("*/tls/*")), 20, "the hosts' TLS files to go", lambda: list(root.glob("*/tls/*")))
    assert list(root.glob("*/logs/*.log")) and all((d / "ended.json").is_file() for d in root.iterdir()), \
        list(root.rglob("*"))


# -- status ------------------------------------------------------------------------------------------


def status_counts(report: dict[str, Any]) -> dict[str, int]:
    """Running workers per host in a ``status --json`` report."""
    counts: dict[str, int] = {}
    for worker in report["workers"]:
        if worker["status"] == "running" and worker["address"]:
            counts[worker["host"]] = counts.get(worker["host"], 0) + 1
    return counts


def settle(cli: Cli, lab: Lab, name: str, cluster_id: str, total: int, timeout: float = 45.0) -> dict[str, Any]:
    """Wait until status shows ``total`` running workers and the hosts run exactly those.

    Returns the last ``status --json`` report.
    """
    last: dict[str, Any] = {}

    def agreed() -> dict[str, Any] | None:
        report = cli.json("status", "--name", name)
        last["status"] = status_counts(report)
        last["hosts"] = workers_per_host(lab, cluster_id)
        listed = len(report["workers"])
        if listed == total and sum(last["status"].values()) == total and last["status"] == last["hosts"]:
            return report
        return None

    return poll(agreed, timeout, f"{total} workers of {name} in status and on the hosts", lambda: last)


def _lab_network(lab: Lab) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The lab's /24 (head and hosts)."""
    return ipaddress.ip_network(f"{lab.head_ip}/24", strict=False)


def dashboard_url(link: str, lab: Lab) -> str:
    """The dashboard link, pointed at 127.0.0.1 unless its host is loopback or in the lab."""
    parts = urllib.parse.urlsplit(link)
    assert parts.scheme == "http" and parts.port, link
    try:
        address = ipaddress.ip_address(parts.hostname or "")
        allowed = address.is_loopback or address in _lab_network(lab)
    except ValueError:
        allowed = parts.hostname == "localhost"
    if allowed:
        return link
    # The head's scheduler listens on every interface, so loopback reaches it too.
    return urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{parts.port}"))


def fetch(url: str, lab: Lab, timeout: float = 20.0) -> tuple[int, str]:
    """GET ``url``, which must point at loopback or the lab; return (status, body)."""
    address = ipaddress.ip_address(urllib.parse.urlsplit(url).hostname or "")
    assert address.is_loopback or address in _lab_network(lab), url
    # No proxy: a proxy from the environment must not see (or break) lab traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.status, response.read().decode(errors="replace")


# -- the tests -----------------------------------------------------------------------------------------


def test_detached_lifecycle(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """up --detach, status, scale up and down, adapt, logs and down on h1..h3 (no TLS)."""
    inventory = write_inventory(lab, tmp_path / "lab.yml", ["h1", "h2", "h3"], speccluster_slots=2)
    state = cli.up_detached(inventory, "life", "--workers", "3", "--no-tls")
    cluster_id, head_pid = state["cluster_id"], state["pid"]
    assert state["tls"] is False
    ips = {h.name: h.ip for h in lab.hosts}

    report = settle(cli, lab, "life", cluster_id, 3)
    assert report["name"] == "life" and report["phase"] == "running" and report["pid"] == head_pid
    assert report["scheduler_address"].startswith("tcp://")
    assert report["adaptive"] is None
    assert set(report["hosts"]) == {"h1", "h2", "h3"}
    assert all(h["state"] == "up" for h in report["hosts"].values()), report["hosts"]
    for worker in report["workers"]:
        assert {"name", "host", "address", "status"} <= set(worker), worker
        assert worker["status"] == "running", worker
        # Each worker listens on its own host's lab address.
        assert worker["address"].startswith(f"tcp://{ips[worker['host']]}:"), worker
    assert status_counts(report) == {"h1": 1, "h2": 1, "h3": 1}  # spread: one per host
    assert workers_per_host(lab, cluster_id) == {"h1": 1, "h2": 1, "h3": 1}
    assert not cluster_tree(lab, cluster_id)["h4"].pids  # not in the inventory: untouched
    human = cli.ok("status", "--name", "life").stdout
    assert "3 workers" in human and "manual scaling" in human
    for name in ("h1", "h2", "h3"):
        assert ips[name] in human

    # scale up: 5 of the 6 slots.
    scaled = cli.ok("scale", "5", "--name", "life")
    assert "scaling to 5 workers" in scaled.stdout
    report = settle(cli, lab, "life", cluster_id, 5)
    assert sorted(status_counts(report).values()) == [1, 2, 2]
    # One agent per host, whatever the number of workers there.
    assert all(len(t.agents) == 1 for n, t in cluster_tree(lab, cluster_id).items() if n != "h4")

    # scale down: the workers go away on the hosts too.
    before = all_pids(lab, cluster_id)
    cli.ok("scale", "2", "--name", "life")
    report = settle(cli, lab, "life", cluster_id, 2)
    assert all_pids(lab, cluster_id) < before  # only removals, nothing restarted

    # adapt: an idle cluster shrinks to the minimum; --off keeps what is there.
    adapted = cli.ok("adapt", "--minimum", "1", "--maximum", "3", "--name", "life")
    assert "between 1 and 3" in adapted.stdout
    assert cli.json("status", "--name", "life")["adaptive"] == {"minimum": 1, "maximum": 3}
    settle(cli, lab, "life", cluster_id, 1, timeout=60)
    assert "adaptive 1..3" in cli.ok("status", "--name", "life").stdout
    off = cli.ok("adapt", "--off", "--name", "life")
    assert "adaptive scaling stopped" in off.stdout
    report = cli.json("status", "--name", "life")
    assert report["adaptive"] is None
    assert len(report["workers"]) == 1
    # Manual scaling works again once adaptive is off.
    cli.ok("scale", "2", "--name", "life")
    report = settle(cli, lab, "life", cluster_id, 2)

    # logs of one worker, by name and by host.
    worker = report["workers"][0]
    logs = cli.ok("logs", worker["name"], "--name", "life").stdout
    assert f"==> {worker['name']} <==" in logs
    assert "distributed.worker" in logs and worker["address"].split("://")[1] in logs
    by_host = cli.json("logs", worker["host"], "--name", "life")
    assert worker["name"] in by_host and "distributed.worker" in by_host[worker["name"]]
    assert "Scheduler" in cli.json("logs", "--name", "life")

    # down: nothing left on any host, the head is gone, and so is the state.
    assert all_pids(lab, cluster_id)
    down = cli.ok("down", "--name", "life")
    assert "cluster life closed" in down.stdout
    assert _head_gone(head_pid)
    assert not (cli.state_root / "life").exists()
    assert_lab_clean(lab)
    assert_keys_gone_logs_kept(cluster_id)
    assert [(c["name"], c["status"]) for c in cli.json("list")] == [("life", "ended")]  # its logs are kept


@pytest.mark.parametrize("where", ["head", "lab-host"])
def test_dashboard_works_out_of_the_box(lab: Lab, cli: Cli, tmp_path: Path, where: str) -> None:
    """The dashboard_link of status answers with the dashboard page, exposed with --dashboard-address.

    ``head``: the scheduler runs in the head process (TLS, default settings);
    ``lab-host``: it runs on h4, the inventory's ``scheduler`` group (no TLS).
    By default the dashboard listens on loopback only (test_run_dashboard.py).
    """
    tls = where == "head"
    inventory = write_inventory(lab, tmp_path / "dash.yml", ["h2"], scheduler=None if tls else "h4")
    exposed = ("--dashboard-address", "0.0.0.0")
    state = cli.up_detached(inventory, "dash", *exposed, *([] if tls else ["--no-tls"]))
    assert state["tls"] is tls
    report = settle(cli, lab, "dash", state["cluster_id"], 1)
    scheme = "tls" if tls else "tcp"
    assert report["scheduler_address"].startswith(f"{scheme}://"), report["scheduler_address"]
    link = report["dashboard_link"]
    assert link, report
    assert link == state["dashboard_link"]
    if where == "lab-host":
        assert report["scheduler_address"].startswith(f"tcp://{lab.host('h4').ip}:")
        assert urllib.parse.urlsplit(link).hostname == lab.host("h4").ip, link
        assert len(cluster_tree(lab, state["cluster_id"])["h4"].entries) == 1  # the scheduler

    url = dashboard_url(link, lab)
    status, body = fetch(url, lab)
    assert status == 200, (url, status)
    assert "Dask" in body and "bokeh" in body.lower(), body[:500]
    # Reachable from another lab host too: a user's browser is rarely next to the scheduler.
    parts = urllib.parse.urlsplit(url)
    seen_from_lab = url if where == "lab-host" else f"http://{lab.head_ip}:{parts.port}{parts.path}"
    probe = (
        "import urllib.request, sys\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "r = opener.open(sys.argv[1], timeout=20)\n"
        "print(r.status, 'Dask' in r.read().decode(errors='replace'))\n"
    )
    remote = lab.host("h3").exec([sys.executable, "-c", probe, seen_from_lab], timeout=60)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.split() == ["200", "True"], remote.stdout

    cli.ok("down", "--name", "dash")
    assert _head_gone(state["pid"])
    assert_lab_clean(lab)


@pytest.mark.parametrize(
    ("sig", "tls"),
    [(signal.SIGINT, False), (signal.SIGTERM, True)],
    ids=["sigint-no-tls", "sigterm-tls"],
)
def test_foreground_up_stops_on_signal(
    lab: Lab, cli: Cli, tmp_path: Path, sig: signal.Signals, tls: bool
) -> None:
    """A foreground up stopped by a signal closes everything and exits 0."""
    inventory = write_inventory(lab, tmp_path / "fg.yml", ["h1", "h2", "h3"])
    proc = cli.popen("up", str(inventory), "--name", "fg", "--timeout", "60", *([] if tls else ["--no-tls"]))

    def running() -> dict[str, Any] | None:
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"up exited early with status {proc.returncode}: {err}")
        state = cli.state("fg")
        return state if state is not None and state.get("phase") == "running" else None

    state = poll(running, 90, "the foreground cluster to run")
    assert state["pid"] == proc.pid and state["tls"] is tls
    cluster_id = state["cluster_id"]
    poll(lambda: workers_per_host(lab, cluster_id) == {"h1": 1, "h2": 1, "h3": 1}, 30,
         "a worker on each host", lambda: workers_per_host(lab, cluster_id))
    # The foreground head answers control requests too.
    assert len(cli.json("status", "--name", "fg")["workers"]) == 3

    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, (proc.returncode, err)
    assert "cluster fg is running" in out and "press Ctrl-C" in out
    assert ("tls://" if tls else "tcp://") in out
    assert "cluster fg closed" in err and "Traceback" not in err
    assert not (cli.state_root / "fg").exists()
    assert_lab_clean(lab)
    assert_keys_gone_logs_kept(cluster_id)


def test_check_names_bad_python_and_dead_host(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """check fails (status 1) naming a host with a wrong python and a host that is down."""
    inventory = write_inventory(
        lab, tmp_path / "check.yml", ["h1", "h2", "h3", "h4"],
        host_vars={
            "h3": {"speccluster_connect_timeout": 4},
            "h4": {"speccluster_python": "/nonexistent/python3"},
        },
    )
    lab.host("h3").cut()
    try:
        result = cli.run("check", str(inventory), "--timeout", "10")
        report = cli.run("check", str(inventory), "--timeout", "10", "--json")
    finally:
        lab.host("h3").heal()
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│ h")}
    assert set(rows) == {"h1", "h2", "h3", "h4"}, result.stdout
    assert "FAIL" in rows["h3"] and "FAIL" in rows["h4"], result.stdout
    assert "/nonexistent/python3" in result.stdout
    for good in ("h1", "h2"):
        assert "FAIL" not in rows[good] and sys.version.split()[0] in rows[good], rows[good]
    assert "2 of 4 hosts failed" in result.stderr

    assert report.returncode == 1, report.stderr
    data = json.loads(report.stdout)
    assert data["ok"] is False
    hosts = {row["host"]: row for row in data["hosts"]}
    assert [name for name, row in sorted(hosts.items()) if not row["ok"]] == ["h3", "h4"]
    assert any("/nonexistent/python3" in p for p in hosts["h4"]["problems"]), hosts["h4"]
    assert hosts["h3"]["problems"], hosts["h3"]
    for good in ("h1", "h2"):
        assert hosts[good]["result"] in ("ok", "warn") and hosts[good]["distributed"], hosts[good]
        # A worker there could reach a scheduler on the head (a probe port on the head's lab address).
        assert hosts[good]["reaches_head"] is True, hosts[good]
    # check starts the agent and stops it again: nothing stays behind.
    assert_lab_clean(lab)


SENTINEL = """
import pathlib, socket, sys
server = socket.create_server(("", int(sys.argv[1])))
pathlib.Path(sys.argv[2]).touch()
while True:
    conn, peer = server.accept()
    with open(sys.argv[3], "a") as out:
        out.write(f"{peer[0]}\\n")
    conn.close()
"""


def test_plan_touches_no_host(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """plan contacts no host and starts nothing anywhere.

    h1's SSH port in the inventory is a sentinel listener inside h1 that
    writes down every connection: one from plan would show there.
    """
    port = 2222
    inventory = write_inventory(
        lab, tmp_path / "plan.yml", ["h1", "h2", "h3", "h4"],
        host_vars={"h1": {"ansible_port": port}},
        speccluster_slots=2,
    )
    assert_lab_clean(lab, timeout=5)
    listening, contacts = tmp_path / "listening", tmp_path / "contacts"
    h1 = lab.host("h1")
    sentinel = h1.spawn([sys.executable, "-c", SENTINEL, str(port), str(listening), str(contacts)])
    seen: set[tuple[str, int]] = set()
    try:
        poll(listening.exists, 30, "the sentinel on h1 to listen")
        proc = cli.popen("plan", str(inventory), "--offline", "--workers", "6", "--name", "p", "--json")
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            for host in lab.hosts:
                seen.update((host.name, pid) for pid, _ in non_sshd(host) if pid != sentinel.pid)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=10)
    finally:
        sentinel.kill()  # ours, by its PID
        sentinel.wait(timeout=10)
    assert proc.returncode == 0, err
    assert not contacts.exists(), f"plan connected to h1's SSH port from {contacts.read_text().split()}"
    assert seen == set(), f"processes appeared on lab hosts during plan: {sorted(seen)}"
    assert_lab_clean(lab, timeout=20)
    plan = json.loads(out)
    assert [h["host"] for h in plan["hosts"]] == ["h1", "h2", "h3", "h4"]
    assert plan["workers_planned"] == 6 and plan["tls"] is True
    assert all(h["address"] == lab.host(h["host"]).ip for h in plan["hosts"])
    assert not (cli.state_root / "p").exists()


def test_two_clusters_side_by_side(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """Clusters a (TLS) and b (no TLS) share the hosts; scaling or closing one spares the other."""
    inventory = write_inventory(lab, tmp_path / "shared.yml", ["h1", "h2", "h3"], speccluster_slots=2)
    a = cli.up_detached(inventory, "a", "--workers", "3")
    b = cli.up_detached(inventory, "b", "--workers", "3", "--no-tls")
    assert a["cluster_id"] != b["cluster_id"] and a["pid"] != b["pid"]
    assert a["tls"] is True and b["tls"] is False
    settle(cli, lab, "a", a["cluster_id"], 3)
    report_b = settle(cli, lab, "b", b["cluster_id"], 3)
    b_pids = all_pids(lab, b["cluster_id"])
    b_addresses = sorted(w["address"] for w in report_b["workers"])
    a_pids = all_pids(lab, a["cluster_id"])
    assert b_pids and a_pids and not (a_pids & b_pids)
    # Each host runs one agent per cluster.
    for name in ("h1", "h2", "h3"):
        assert len(cluster_tree(lab, a["cluster_id"])[name].agents) == 1
        assert len(cluster_tree(lab, b["cluster_id"])[name].agents) == 1
    names = {c["name"]: c["status"] for c in cli.json("list")}
    assert names == {"a": "running", "b": "running"}
    ambiguous = cli.run("status")
    assert ambiguous.returncode == 2 and "--name" in ambiguous.stderr

    def b_untouched() -> None:
        assert all_pids(lab, b["cluster_id"]) == b_pids
        report = cli.json("status", "--name", "b")
        assert sorted(w["address"] for w in report["workers"]) == b_addresses
        assert status_counts(report) == {"h1": 1, "h2": 1, "h3": 1}

    # Scaling a down and up again leaves b alone.
    cli.ok("scale", "1", "--name", "a")
    settle(cli, lab, "a", a["cluster_id"], 1)
    b_untouched()
    # The 6 slots are shared: b holds 3, so a gets back to 3 and no further (issue 23: no oversubscription).
    cli.ok("scale", "4", "--name", "a")
    settle(cli, lab, "a", a["cluster_id"], 3)
    b_untouched()

    # Closing a leaves b running.
    cli.ok("down", "--name", "a")
    assert _head_gone(a["pid"])
    poll(lambda: not all_pids(lab, a["cluster_id"]), 20, "cluster a's processes to end",
         lambda: all_pids(lab, a["cluster_id"]))
    assert_keys_gone_logs_kept(a["cluster_id"])
    b_untouched()
    assert {c["name"]: c["status"] for c in cli.json("list")} == {"a": "ended", "b": "running"}

    # b closes cleanly after a is gone.
    cli.ok("down", "--name", "b")
    assert _head_gone(b["pid"])
    assert_lab_clean(lab)
    assert {c["name"]: c["status"] for c in cli.json("list")} == {"a": "ended", "b": "ended"}


def test_logs_of_a_host_include_its_retired_workers(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """After a scale down, 'logs HOST' still shows the retired worker's log, as 'logs WORKER' does."""
    inventory = write_inventory(lab, tmp_path / "logs.yml", ["h4"], speccluster_slots=2)
    state = cli.up_detached(inventory, "logs", "--workers", "2", "--no-tls")
    settle(cli, lab, "logs", state["cluster_id"], 2)
    cli.ok("scale", "1", "--name", "logs")
    report = settle(cli, lab, "logs", state["cluster_id"], 1)
    (alive,) = [w["name"] for w in report["workers"]]
    everything = cli.json("logs", "--name", "logs")
    retired = sorted(k for k in everything if k not in ("Cluster", "Scheduler", alive))
    assert len(retired) == 1, sorted(everything)
    # The retired worker's log is still there by its name ...
    assert "distributed.worker" in cli.json("logs", retired[0], "--name", "logs")[retired[0]]
    by_host = cli.json("logs", "h4", "--name", "logs")
    assert alive in by_host
    cli.ok("down", "--name", "logs")
    assert_lab_clean(lab)
    # ... but not by its host (checked after down, so that the cluster is closed either way).
    assert retired[0] in by_host, sorted(by_host)


def test_auto_threads_are_the_same_for_every_worker(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """Workers of one host get the same 'auto' threads whether up or scale started them."""
    inventory = tmp_path / "auto.yml"
    lab.write_inventory(inventory, groups={"workers": ["h1"]}, host_vars={"h1": {"speccluster_slots": 2}})
    facts = cli.json("check", str(inventory))
    cpus = {row["host"]: row["cpu_count"] for row in facts["hosts"]}["h1"]
    state = cli.up_detached(inventory, "auto", "--workers", "1", "--no-tls")
    cli.ok("scale", "2", "--name", "auto")
    report = settle(cli, lab, "auto", state["cluster_id"], 2)
    threads = {w["name"]: w["threads"] for w in report["workers"]}
    memory = {w["name"]: w["memory_limit"] for w in report["workers"]}
    cli.ok("down", "--name", "auto")
    assert_lab_clean(lab)
    assert threads == {"0": cpus, "1": cpus}, (threads, memory)
    assert len(set(memory.values())) == 1, memory
