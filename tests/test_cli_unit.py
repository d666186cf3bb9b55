"""The command line without an SSH lab: help, inventory, plan, state handling, control socket.

The end-to-end tests use ``ansible_connection: local`` hosts, which run the
same host agent as a local subprocess, so they need no sshd either.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import psutil
from proctools import kill_tree
import pytest
from click.testing import CliRunner, Result

from speccluster_ssh import control
from speccluster_ssh import state as st
from speccluster_ssh.cli import _new_text, main
from speccluster_ssh.planning import place_entries
from speccluster_ssh.errors import UserError

MARKER = "SPECCLUSTER_SSH_CLUSTER"


# -- helpers --------------------------------------------------------------------------




def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def subprocess_env(state_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_STATE_HOME"] = str(state_root.parent)
    env.pop("DASK_SPECCLUSTER_SSH__STATE_DIR", None)
    env["COLUMNS"] = "200"
    return env


def run_cli(state_root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speccluster_ssh.cli", *args],
        env=subprocess_env(state_root), capture_output=True, text=True, timeout=timeout,
    )


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def gone(proc: psutil.Process) -> bool:
    """True when the process ended (a zombie counts: nothing runs any more)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_with_marker(cluster_id: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if cluster_id in proc.environ().get(MARKER, ""):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Reaper:
    """Head processes a test started; whatever is left of them is killed at the end."""

    def __init__(self) -> None:
        self.heads: list[tuple[int, Path | None]] = []

    def add(self, pid: int, state_dir: Path | None = None) -> None:
        self.heads.append((pid, state_dir))

    def up_detached(self, state_root: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``up ARGS --detach --name NAME``; the head it leaves is reaped at the end."""
        up = run_cli(state_root, "up", *args, "--detach", "--name", name)
        directory = state_root / name
        if (directory / st.STATE_FILE).exists():
            self.add(json.loads((directory / st.STATE_FILE).read_text())["pid"], directory)
        return up

    def reap(self) -> None:
        for pid, state_dir in self.heads:
            cluster_id = ""
            if state_dir is not None and (state_dir / st.STATE_FILE).exists():
                cluster_id = json.loads((state_dir / st.STATE_FILE).read_text()).get("cluster_id", "")
            kill_tree(pid)
            # A killed head's agents keep their directory for post-mortems; a test has no use for it.
            if cluster_id:
                shutil.rmtree(Path.home() / ".cache" / "speccluster-ssh" / cluster_id, ignore_errors=True)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    yield r
    r.reap()


def local_inventory(tmp_path: Path, name: str = "inv.yml", **extra: Any) -> Path:
    host = {
        "ansible_connection": "local",
        "speccluster_python": sys.executable,
        "speccluster_nthreads": 1,
        **extra,
    }
    path = tmp_path / name
    path.write_text(json.dumps({"all": {"hosts": {"local1": host}}}))
    return path


def assert_one_error_line(result: Result | subprocess.CompletedProcess[str], code: int = 2) -> str:
    stderr = result.stderr
    status = result.exit_code if isinstance(result, Result) else result.returncode
    assert status == code, (status, result.stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("speccluster-ssh: error: "), stderr
    assert "Traceback" not in stderr + result.stdout
    return lines[0]


LAB_INVENTORY = textwrap.dedent(
    """\
    all:
      vars:
        ansible_user: lab
      children:
        workers:
          hosts:
            node[01:02]:
              ansible_host: 192.0.2.10
              speccluster_nworkers: 2
              speccluster_slots: 2
              speccluster_env: {OMP_NUM_THREADS: 1}
            edge:
              ansible_host: 192.0.2.20
              ansible_port: 2222
              speccluster_python: /opt/py/bin/python3
              speccluster_prologue: "module load dask"
    """
)


# -- help ---------------------------------------------------------------------------------


def test_help_of_every_command() -> None:
    top = cli("--help")
    assert top.exit_code == 0
    visible = [name for name, command in main.commands.items() if not command.hidden]
    assert {"up", "down", "status", "scale", "adapt", "logs", "list", "check", "plan", "inventory"} <= set(visible)
    assert "_serve" not in top.stdout
    for name in visible:
        result = cli(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        assert result.stdout.startswith(f"Usage: speccluster-ssh {name}"), name
        assert "Example:" in result.stdout, f"{name} --help has no example"


def test_no_arguments_prints_help() -> None:
    result = cli()
    assert result.exit_code == 0
    assert "Commands:" in result.stdout


# -- inventory ---------------------------------------------------------------------------------


def test_inventory_hosts_and_list(tmp_path: Path) -> None:
    from speccluster_ssh.inventory import load_inventory

    path = tmp_path / "lab.yml"
    path.write_text(LAB_INVENTORY)

    rows = json.loads(cli("inventory", str(path), "--hosts", "--json").stdout)
    assert [r["name"] for r in rows] == ["node01", "node02", "edge"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["edge"]["port"] == 2222
    assert by_name["node01"]["nworkers"] == 2
    assert by_name["node01"]["user"] == "lab"

    listed = json.loads(cli("inventory", str(path), "--list").stdout)
    assert listed == json.loads(json.dumps(load_inventory(path).to_ansible_list()))
    assert listed["workers"]["hosts"] == ["node01", "node02", "edge"]
    assert listed["_meta"]["hostvars"]["edge"]["ansible_port"] == 2222

    table = cli("inventory", str(path), "--hosts")
    assert table.exit_code == 0
    for name in ("node01", "node02", "edge", "192.0.2.20"):
        assert name in table.stdout


def test_inventory_list_and_hosts_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "lab.yml"
    path.write_text(LAB_INVENTORY)
    assert "exclude" in assert_one_error_line(cli("inventory", str(path), "--list", "--hosts"))


# -- user mistakes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["inventory", "{tmp}/missing.yml"], "not found"),
        (["up", "{tmp}/missing.yml"], "not found"),
        (["plan", "{bad}"], "speccluster_nworkerz"),
        (["up", "{good}", "--adapt", "x"], "MIN:MAX"),
        (["up", "{good}", "--adapt", "5:2"], "MIN <= MAX"),
        (["up", "{good}", "--name", "../escape"], "not usable"),
        (["up", "{good}", "--workers", "-1"], "--workers"),
        (["up", "{good}", "--placement", "everywhere"], "--placement"),
        (["scale"], "number of workers"),
        (["scale", "2", "--memory", "lots"], "not a size"),
        (["adapt", "--off", "--minimum", "1"], "--off"),
        (["adapt"], "--minimum"),
        (["adapt", "--minimum", "4", "--maximum", "2"], "larger"),
        (["status", "--name", "nosuch"], "no cluster named"),
        (["status"], "no cluster is running"),
        (["down"], "no cluster is running"),
        (["frobnicate"], "No such command"),
        (["up", "{good}", "--frob"], "--frob"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(
    tmp_path: Path, state_home: Path, args: list[str], needle: str
) -> None:
    good = local_inventory(tmp_path)
    bad = tmp_path / "bad.yml"
    bad.write_text("all:\n  hosts:\n    h1:\n      speccluster_nworkerz: 2\n")
    filled = [a.format(tmp=tmp_path, good=good, bad=bad) for a in args]
    line = assert_one_error_line(cli(*filled))
    assert needle in line
    # A refused command leaves no state behind.
    assert not any(p.is_dir() for p in state_home.glob("*")) if state_home.exists() else True


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [("lgo", None), ("frobnicate", None), ("stauts", "status"), ("lsit", "list"), ("log", "logs"), ("x", None)],
)
def test_an_unknown_command_suggests_only_a_close_one(typed: str, suggested: str | None) -> None:
    line = assert_one_error_line(cli(typed))
    assert f"No such command {typed!r}." in line
    if suggested is None:
        assert "Did you mean" not in line, line
    else:
        assert f"Did you mean {suggested!r}?" in line and "one of" not in line, line


def test_inventory_shows_the_python_that_plan_runs(tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    path.write_text(json.dumps({"all": {"hosts": {"local1": {"ansible_connection": "local"},
                                                  "far": {"ansible_host": "192.0.2.9"}}}}))
    rows = {r["name"]: r for r in json.loads(cli("inventory", str(path), "--json").stdout)}
    plan = {h["host"]: h for h in json.loads(cli("plan", str(path), "--offline", "--json").stdout)["hosts"]}
    # A local host left at python3 runs the head's own interpreter; a remote one runs python3.
    assert rows["local1"]["python"] == plan["local1"]["command"][2] == sys.executable
    assert rows["far"]["python"] == plan["far"]["command"][2] == "python3"


def test_status_title_counts_running_workers_and_pending_apart() -> None:
    from speccluster_ssh.cli.display import _workers_title

    workers = [{"status": "running"}, {"status": "running"}, {"status": "pending"}, {"status": "created"}]
    assert _workers_title(workers) == "2 workers running, 2 pending"
    assert _workers_title(workers[:2]) == "2 workers running"
    assert _workers_title(workers[:1]) == "1 worker running"
    assert _workers_title([]) == "0 workers running"


# -- plan ------------------------------------------------------------------------------------------


def test_plan_touches_no_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    from speccluster_ssh import connection
    from speccluster_ssh.agent import agent_argv
    from speccluster_ssh.inventory import load_inventory

    path = tmp_path / "lab.yml"
    path.write_text(LAB_INVENTORY)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("plan tried to contact a host")

    monkeypatch.setattr(connection.HostConnection, "open", refuse)
    monkeypatch.setattr(connection.HostConnection, "open_channel", refuse)
    monkeypatch.setattr(connection.HostConnection, "run", refuse)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)

    result = cli("plan", str(path), "--offline", "--workers", "6", "--name", "lab", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    inv = load_inventory(path)
    hosts = {h["host"]: h for h in plan["hosts"]}
    # spread: node01, node02, edge, then node01 again -> 2+2+1+2 = 7 >= 6 workers
    assert [len(e["workers"]) for h in plan["hosts"] for e in h["entries"]] == [2, 2, 2, 1]
    assert plan["workers_planned"] == 7
    assert hosts["node01"]["entries"][0]["workers"] == ["0-0", "0-1"]
    assert hosts["edge"]["command"] == agent_argv(inv.hosts["edge"], "<cluster-id>")
    assert hosts["edge"]["command_line"] == shlex.join(agent_argv(inv.hosts["edge"], "<cluster-id>"))
    assert hosts["edge"]["command"][:3] == ["env", "SPECCLUSTER_SSH_CLUSTER=<cluster-id>", "/opt/py/bin/python3"]
    assert hosts["edge"]["prologue"] == "module load dask"
    assert hosts["edge"]["target"] == "ssh lab@192.0.2.20 -p 2222"
    assert hosts["node01"]["environment"]["OMP_NUM_THREADS"] == "1"
    assert hosts["node01"]["environment"][MARKER].startswith("lab-")

    human = cli("plan", str(path), "--offline", "--workers", "1", "--placement", "pack")
    assert human.exit_code == 0, human.output
    assert "nothing placed here" in human.stdout  # node02 and edge get no entry when packing one
    assert "module load dask" not in human.stdout
    assert "speccluster_agent" in human.stdout  # the bootstrap is shown verbatim


def test_place_entries_matches_slots(tmp_path: Path) -> None:
    from speccluster_ssh.inventory import load_inventory

    path = tmp_path / "lab.yml"
    path.write_text(LAB_INVENTORY)
    inv = load_inventory(path)
    assert len(place_entries(inv, None, "spread")) == 5  # every slot
    assert [h.name for _, h in place_entries(inv, 4, "pack")] == ["node01", "node01"]
    assert [h.name for _, h in place_entries(inv, 0, "spread")] == []
    assert len(place_entries(inv, 100, "spread")) == 5  # capacity caps it


# -- state dir -------------------------------------------------------------------------------------


def test_state_dir_locations(tmp_path: Path, state_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert st.state_root() == state_home
    monkeypatch.setenv("XDG_STATE_HOME", "relative/path")  # the XDG spec says: ignore it
    assert st.state_root() == Path.home() / ".local" / "state" / "speccluster-ssh"
    with dask.config.set({"speccluster-ssh.state-dir": str(tmp_path / "configured")}):
        assert st.state_root() == tmp_path / "configured"
        directory = st.make_cluster_dir("c1")
    assert directory == tmp_path / "configured" / "c1"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    st.write_state(directory, st.ClusterState(name="c1", pid=1))
    assert stat.S_IMODE((directory / st.STATE_FILE).stat().st_mode) == 0o600
    assert st.read_state(directory) is not None and st.read_state(directory).pid == 1  # type: ignore[union-attr]
    for bad in ("", "../x", "a/b", ".hidden", "x" * 64):
        with pytest.raises(UserError):
            st.check_name(bad)
    assert st.default_name("/some/where/lab inventory.yml") == "lab-inventory"


def test_list_status_down_with_stale_state(state_home: Path) -> None:
    # A head that died: its pid is gone and nobody holds the lock.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    directory = st.make_cluster_dir("old")
    st.write_state(directory, st.ClusterState(name="old", pid=dead.pid, phase="running",
                                              scheduler_address="tcp://10.0.0.1:1"))
    (directory / st.LOCK_FILE).touch()
    (state_home / "known_hosts").write_text("")  # accept-new's file lives here too; it is no cluster

    listed = json.loads(cli("list", "--json").stdout)
    assert [(c["name"], c["status"]) for c in listed] == [("old", "stale")]
    table = cli("list")
    assert "stale" in table.stdout and "down --name NAME" in table.stderr

    assert "stale" in assert_one_error_line(cli("status", "--name", "old"), code=1)
    assert "no cluster is running" in assert_one_error_line(cli("status"))

    result = cli("down")  # the only cluster, stale: down removes it
    assert result.exit_code == 0, result.output
    assert "stale" in result.stdout
    assert not directory.exists()
    assert json.loads(cli("list", "--json").stdout) == []


def test_several_running_clusters_need_a_name(state_home: Path) -> None:
    locks = []
    for name in ("a", "b"):
        directory = st.make_cluster_dir(name)
        st.write_state(directory, st.ClusterState(name=name, pid=os.getpid(), phase="running"))
        lock = st.HeadLock(directory)
        assert lock.acquire()
        locks.append(lock)
    try:
        assert {c["status"] for c in json.loads(cli("list", "--json").stdout)} == {"running"}
        line = assert_one_error_line(cli("status"))
        assert "--name" in line and "a, b" in line
        # A second head for the same name cannot take the lock.
        assert not st.HeadLock(st.cluster_dir("a")).acquire()
    finally:
        for lock in locks:
            lock.release()
    assert not st.head_alive(st.cluster_dir("a"))


# -- the control socket -------------------------------------------------------------------------


def test_control_socket_roundtrip_and_errors(tmp_path: Path) -> None:
    # A deep directory: the socket path is longer than sun_path allows.
    directory = tmp_path.joinpath(*(["d" * 30] * 4))
    directory.mkdir(parents=True)
    assert len(str(directory / st.SOCKET_FILE)) > 108

    async def handler(request: dict[str, Any]) -> Any:
        if request["op"] == "echo":
            return {"got": request.get("value")}
        if request["op"] == "mistake":
            raise UserError("that was wrong")
        raise RuntimeError("boom")

    loop = asyncio.new_event_loop()
    server = control.ControlServer(directory / st.SOCKET_FILE, handler)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert stat.S_IMODE(os.stat(directory / st.SOCKET_FILE).st_mode) == 0o600
        assert control.request(directory, "echo", value=[1, "x"]) == {"got": [1, "x"]}
        with pytest.raises(control.ControlError) as mistake:
            control.request(directory, "mistake")
        assert mistake.value.exit_code == 2 and "that was wrong" in str(mistake.value)
        with pytest.raises(control.ControlError) as failure:
            control.request(directory, "other")
        assert failure.value.exit_code == 1 and "boom" in str(failure.value)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert not (directory / st.SOCKET_FILE).exists()
    with pytest.raises(control.ControlError, match="does not answer"):
        control.request(directory, "echo")


def test_control_operations_are_named_once_and_keep_their_wire_strings() -> None:
    """Senders and the head use ``control.Op``; what goes on the wire is the plain string of before."""
    assert [op.value for op in control.Op] == [
        "progress", "status", "scale", "adapt", "adapt-off", "logs", "restart", "drain", "undrain", "reload", "down",
    ]
    assert json.loads(json.dumps({"op": control.Op.ADAPT_OFF})) == {"op": "adapt-off"}
    assert f"{control.Op.STATUS}" == str(control.Op.STATUS) == "status"
    assert control.Op("reload") is control.Op.RELOAD


def test_new_text_of_sliding_log_tails() -> None:
    assert _new_text("", "a\nb\n") == "a\nb\n"
    assert _new_text("a\nb\n", "a\nb\nc\n") == "c\n"
    # The tail slid: the start of the old text is gone, its end is still there.
    old = "".join(f"line {i}\n" for i in range(100))
    assert _new_text(old, old[300:] + "line 100\n") == "line 100\n"
    # A block logged twice (say a traceback): the repeat is new text, not the old end.
    block = "".join(f"  frame {i}\n" for i in range(40))
    first = "start\n" + block
    assert _new_text(first, first[20:] + block) == block
    # Nothing in common: everything is new.
    assert _new_text(old, "other\n") == "other\n"


# -- end to end with local hosts ------------------------------------------------------------------


def failing_python(tmp_path: Path, name: str, stderr_line: str) -> Path:
    """A stand-in host python that prints ``stderr_line`` to stderr and fails."""
    fake = tmp_path / name
    fake.write_text(f"#!/bin/sh\necho {shlex.quote(stderr_line)} >&2\nexit 1\n")
    fake.chmod(0o755)
    return fake


def test_failed_up_cleans_up_and_exits_1(tmp_path: Path, state_home: Path) -> None:
    fake = failing_python(tmp_path, "fakepython", "this python is broken")
    inv = local_inventory(tmp_path, speccluster_python=str(fake))
    result = cli("up", str(inv), "--detach", "--name", "broken", "--no-tls", "--timeout", "20")
    assert result.exit_code == 1, result.output
    assert "no worker host answered" in result.stderr
    assert "local1: down: " in result.stderr and "this python is broken" in result.stderr
    assert "Traceback" not in result.output
    assert not (state_home / "broken").exists()


def test_a_host_without_distributed_answered(tmp_path: Path, state_home: Path) -> None:
    """The host answered, its python lacks distributed: not 'no worker host answered' (issue 21, point 14)."""
    fake = failing_python(tmp_path, "nodask", "ModuleNotFoundError: No module named 'distributed'")
    inv = local_inventory(tmp_path, speccluster_python=str(fake))
    result = cli("up", str(inv), "--detach", "--name", "nodask", "--no-tls", "--timeout", "20")
    assert result.exit_code == 1, result.output
    first = next(line for line in result.stderr.splitlines() if line.startswith("speccluster-ssh: error: "))
    assert "no worker host answered" not in result.stderr, result.stderr
    assert "no worker host can run workers (at least 1 needed): local1 answered but cannot run them" in first
    assert "has no 'distributed'" in result.stderr and "fix: install distributed on local1" in result.stderr


def test_up_detached_status_scale_down(tmp_path: Path, state_home: Path, reaper: Reaper) -> None:
    inv = local_inventory(tmp_path, speccluster_slots=2)
    up = reaper.up_detached(state_home, "t1", str(inv), "--no-tls", "--workers", "1", "--timeout", "60")
    directory = state_home / "t1"
    assert up.returncode == 0, up.stderr
    assert "scheduler: tcp://" in up.stdout
    assert "local1: ready, 1/1 workers" in up.stderr  # progress: a line per host with count and time

    saved = json.loads((directory / st.STATE_FILE).read_text())
    head = psutil.Process(saved["pid"])
    cluster_id = saved["cluster_id"]
    assert saved["phase"] == "running" and saved["hosts"] == {"local1": "local1"}
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / st.SOCKET_FILE).stat().st_mode) == 0o600

    def workers_with_address(count: int) -> Callable[[], list[dict[str, Any]] | None]:
        def check() -> list[dict[str, Any]] | None:
            result = cli("status", "--json")
            assert result.exit_code == 0, result.output
            report = json.loads(result.stdout)
            ready = [w for w in report["workers"] if w["address"] and w["status"] == "running"]
            return report if len(ready) == count else None
        return check

    report = poll(workers_with_address(1), 30, "one worker with an address")
    assert report["name"] == "t1"
    assert report["scheduler_address"].startswith("tcp://")
    assert report["dashboard_link"]
    assert report["hosts"]["local1"]["state"] == "up"
    assert report["workers"][0]["host"] == "local1"
    assert {"name", "host", "address", "status"} <= set(report["workers"][0])

    # Idempotent: a second up with the same options reports the running cluster and starts nothing.
    again = cli("up", str(inv), "--detach", "--name", "t1", "--no-tls", "--workers", "1")
    assert again.exit_code == 0 and "already running" in again.stdout, again.output
    assert "nothing changed" in again.stdout, again.output
    assert json.loads((directory / st.STATE_FILE).read_text())["pid"] == head.pid

    listed = json.loads(cli("list", "--json").stdout)
    assert [(c["name"], c["status"]) for c in listed] == [("t1", "running")]
    human = cli("status", "--name", "t1")
    assert human.exit_code == 0, human.output
    assert "local1" in human.stdout and "1 workers" in human.stdout and "manual scaling" in human.stdout

    scaled = cli("scale", "2")
    assert scaled.exit_code == 0, scaled.output
    assert "using cluster t1" in scaled.stderr
    report = poll(workers_with_address(2), 30, "two workers with addresses")
    assert sorted(w["name"] for w in report["workers"]) == ["0", "1"]

    adapted = cli("adapt", "--minimum", "1", "--maximum", "2", "--name", "t1")
    assert adapted.exit_code == 0, adapted.output
    assert json.loads(cli("status", "--json").stdout)["adaptive"] == {"minimum": 1, "maximum": 2}
    assert "stopped" in cli("adapt", "--off").stdout
    assert json.loads(cli("status", "--json").stdout)["adaptive"] is None

    logs = cli("logs", "0", "--json")
    assert logs.exit_code == 0, logs.output
    assert "distributed" in json.loads(logs.stdout)["0"]
    assert "no worker or host" in assert_one_error_line(cli("logs", "nobody", "--name", "t1"))
    assert "tcp://" in cli("client-config").stdout

    family = head.children(recursive=True)
    assert len(family) >= 3  # the agent, and a nanny with its worker at least
    down = cli("down", "--name", "t1")
    assert down.exit_code == 0, down.output
    assert "closed" in down.stdout
    poll(lambda: gone(head), 30, "the head process to end")
    leftovers = [p.pid for p in family if not gone(p)]
    assert leftovers == [], f"processes of the cluster survived down: {leftovers}"
    assert processes_with_marker(cluster_id) == []
    assert not directory.exists()


def test_foreground_tls_up_connects_and_stops_on_sigterm(
    tmp_path: Path, state_home: Path, reaper: Reaper
) -> None:
    inv = local_inventory(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "speccluster_ssh.cli", "up", str(inv), "--name", "fg", "--timeout", "60"],
        env=subprocess_env(state_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    directory = state_home / "fg"
    reaper.add(proc.pid, directory)
    try:
        def running() -> dict[str, Any] | None:
            if proc.poll() is not None:
                pytest.fail(f"up exited early with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
            found = st.read_state(directory) if directory.exists() else None
            return found.to_dict() if found is not None and found.phase == "running" else None

        saved = poll(running, 60, "the foreground cluster to run")
        assert saved["pid"] == proc.pid and saved["tls"] is True
        for name in (st.CA_FILE, st.CLIENT_CERT, st.CLIENT_KEY, st.CLIENT_CONFIG):
            assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
        # A plain Client() finds address and certificates through DASK_CONFIG.
        env = subprocess_env(state_home)
        env["DASK_CONFIG"] = saved["client_config"]
        client = subprocess.run(
            [sys.executable, "-c",
             "from distributed import Client\n"
             "with Client(timeout=30) as c:\n"
             "    print(c.scheduler.address, c.submit(lambda x: x + 1, 41).result())"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.split() == [saved["scheduler_address"], "42"]
        family = psutil.Process(proc.pid).children(recursive=True)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "scheduler: tls://" in out and "Ctrl-C" in out
    assert "closed" in err
    assert [p.pid for p in family if not gone(p)] == []
    assert not directory.exists()


def test_a_host_error_that_names_no_host_is_printed_without_host_star() -> None:
    from speccluster_ssh.errors import HostError
    from speccluster_ssh.messages import host_error_text

    assert host_error_text(HostError("*", "no free slot on any usable host")) == "no free slot on any usable host"
    assert host_error_text(HostError("h1", "refused")) == "host h1: refused"
    assert host_error_text(HostError("*", "died", tail="last words")).startswith("died\n  remote log tail:")
