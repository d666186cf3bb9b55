"""Logs live as long as someone may need them (issue 21, point 9).

Where the agents keep logs (``$XDG_CACHE_HOME`` honoured), how long an ended
cluster's logs stay (``speccluster_log_retention``), which agent may remove
what (a lock each live agent holds, never age alone), the head's record of an
ended cluster, and ``logs --name N`` after ``down`` and after a head crash.

The unit tests run the agent's own functions (``agent/logs.py`` is a plain
module too) on private directories, and real agents over a local connection;
the lab tests drive the installed command against the SSH lab.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from speccluster_ssh import postmortem
from speccluster_ssh import state as st
from speccluster_ssh.agent import HostAgent
from speccluster_ssh.agent import logs as agent_logs
from speccluster_ssh.agent.logs import ENDED_NAME, LOCK_NAME, _hold_lock, _leave, _sweep, sweep_action
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.errors import UserError
from speccluster_ssh.inventory import Inventory
from speccluster_ssh.inventory._vars import BadValue, log_retention
from test_cli_lab import cli  # noqa: F401 (a fixture of the lab test)

DAY = 86400.0


def local_host(**variables: Any) -> Any:
    spec = {"name": "here", "ansible_connection": "local", "speccluster_python": sys.executable, **variables}
    return Inventory.from_hosts([spec]).hosts["here"]


def poll(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# -- the pure decision ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lock_free", "ended_at", "retention", "expected"),
    [
        (False, None, DAY, "live"),  # a live agent: never touched, whatever its age
        (False, 0.0, 0.0, "live"),  # even with an old end marker and no retention
        (True, None, DAY, "mark"),  # its agent died without a word: keys go, the end is now
        (True, 1000.0 - DAY + 1, DAY, "keep"),  # ended less than its retention ago
        (True, 1000.0 - DAY, DAY, "remove"),  # retention passed
        (True, 1000.0, 0.0, "remove"),  # retention 0: gone at the next start
    ],
)
def test_sweep_action(lock_free: bool, ended_at: float | None, retention: float, expected: str) -> None:
    assert sweep_action(now=1000.0, lock_free=lock_free, ended_at=ended_at, retention=retention) == expected


@pytest.mark.parametrize(("raw", "seconds"), [("7d", 7 * DAY), (0, 0.0), ("12h", 43200.0), ("30m", 1800.0),
                                              ("90", 90.0), (" 1.5 w ", 1.5 * 7 * DAY)])
def test_log_retention_values(raw: Any, seconds: float) -> None:
    assert log_retention(raw) == seconds


@pytest.mark.parametrize("raw", ["-1", "7 days", "d", True, [1]])
def test_log_retention_refuses(raw: Any) -> None:
    with pytest.raises(BadValue, match="a duration of 0 or more"):
        log_retention(raw)


def test_inventory_default_and_value() -> None:
    assert local_host().log_retention == 7 * DAY
    assert local_host(speccluster_log_retention="2h").log_retention == 7200.0


# -- the sweep on a private base directory -------------------------------------------------------


def agent_dir(base: Path, cluster: str, label: str = "h1") -> Path:
    directory = base / cluster / label
    (directory / "logs").mkdir(parents=True)
    (directory / "tls").mkdir()
    (directory / "logs" / "w.log").write_text(f"log of {cluster}\n")
    (directory / "tls" / "node.key").write_text("secret")
    return directory


def test_sweep_touches_no_live_cluster_and_cleans_the_dead(tmp_path: Path) -> None:
    base = tmp_path / "base"
    live = agent_dir(base, "live")
    live_fd = _hold_lock(str(live), DAY)  # a live agent of another cluster (same user)
    crashed = agent_dir(base, "crashed")
    os.close(_hold_lock(str(crashed), 2 * DAY))  # its agent was SIGKILLed: the lock is free
    recent = agent_dir(base, "recent")
    (recent / ENDED_NAME).write_text(json.dumps({"ended": 1000.0 - 1, "retention": DAY}))
    expired = agent_dir(base, "expired")
    (expired / ENDED_NAME).write_text(json.dumps({"ended": 1000.0 - DAY, "retention": DAY}))
    own = agent_dir(base, "own")
    try:
        _sweep(str(base), "own", now=1000.0)
        assert (live / "tls" / "node.key").read_text() == "secret"
        assert (live / "logs" / "w.log").exists() and not (live / ENDED_NAME).exists()
        assert not (crashed / "tls").exists() and (crashed / "logs" / "w.log").exists()
        marker = json.loads((crashed / ENDED_NAME).read_text())
        assert marker["ended"] == 1000.0 and marker["retention"] == 2 * DAY  # the retention its agent asked for
        assert not (recent / "tls").exists() and (recent / "logs" / "w.log").exists()
        assert not (base / "expired").exists()  # the directory and its emptied cluster directory
        assert (own / "tls" / "node.key").exists()  # our own cluster is never swept
        # The crashed one expires from when it was found dead, not from its files' age.
        _sweep(str(base), "own", now=1000.0 + 2 * DAY - 1)
        assert (crashed / "logs" / "w.log").exists()
        _sweep(str(base), "own", now=1000.0 + 2 * DAY)
        assert not crashed.exists()
        assert (live / "tls" / "node.key").exists()  # still alive: still untouched
    finally:
        os.close(live_fd)


def test_sweep_of_an_old_agents_directory_asks_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory without a lock file (an agent of an older version) is dead only when no process carries its marker."""
    base = tmp_path / "base"
    old_live = agent_dir(base, "old-live")
    old_dead = agent_dir(base, "old-dead")
    monkeypatch.setattr(agent_logs, "_live_markers", lambda: {"old-live"})
    _sweep(str(base), "own", now=1000.0)
    assert (old_live / "tls" / "node.key").exists() and not (old_live / LOCK_NAME).exists()
    assert not (old_dead / "tls").exists() and (old_dead / "logs" / "w.log").exists()
    assert json.loads((old_dead / ENDED_NAME).read_text())["retention"] == agent_logs.DEFAULT_RETENTION


def test_leave_keeps_logs_removes_keys_and_marks_the_end(tmp_path: Path) -> None:
    base = tmp_path / "base"
    directory = agent_dir(base, "c")
    first, second = _hold_lock(str(directory), DAY), _hold_lock(str(directory), DAY)  # a restart: two agents
    _leave(str(directory), str(base / "c"), first, keep_tls=True, remove=False, retention=DAY)
    assert (directory / "tls" / "node.key").exists() and not (directory / ENDED_NAME).exists()  # not the last
    before = time.time()
    _leave(str(directory), str(base / "c"), second, keep_tls=False, remove=False, retention=DAY)
    assert not (directory / "tls").exists() and (directory / "logs" / "w.log").exists()
    assert json.loads((directory / ENDED_NAME).read_text())["ended"] >= before
    empty = base / "check" / "h1"
    (empty / "logs").mkdir(parents=True)  # an agent that started nothing ('check'): nothing to keep
    _leave(str(empty), str(base / "check"), _hold_lock(str(empty), DAY), keep_tls=False, remove=False, retention=DAY)
    assert not (base / "check").exists()


# -- real agents, local connection ---------------------------------------------------------------


async def start_agent(cluster: str, base: Path | None, **variables: Any) -> HostAgent:
    agent = HostAgent(HostConnection(local_host(**variables), ConnectSettings()), cluster,
                      base_dir=str(base) if base else None)
    await agent.start()
    return agent


def test_two_live_clusters_and_a_killed_agent(tmp_path: Path) -> None:
    """Starting an agent never touches a live cluster's files; a SIGKILLed agent's key goes at the next start."""
    base = tmp_path / "base"

    async def main() -> None:
        a = await start_agent("cluster-a", base)
        b = await start_agent("cluster-b", base)
        key_a = Path(await a.write_file("tls/node.key", b"a"))
        key_b = Path(await b.write_file("tls/node.key", b"b"))
        for key in (key_a, key_b):
            (key.parent.parent / "logs" / "w.log").write_text("b's worker\n")  # as if a worker had run
        c = await start_agent("cluster-c", base)  # sweeps: a and b are alive
        assert key_a.read_bytes() == b"a" and key_b.read_bytes() == b"b"
        os.kill(int(b.facts["pid"]), signal.SIGKILL)
        poll(lambda: not psutil.pid_exists(int(b.facts["pid"])) or
             psutil.Process(int(b.facts["pid"])).status() == psutil.STATUS_ZOMBIE, 10, "the agent to die")
        assert key_b.exists()  # nobody swept yet
        d = await start_agent("cluster-d", base)
        assert not key_b.exists() and (key_b.parent.parent / "logs" / "w.log").read_text() == "b's worker\n"
        assert key_a.read_bytes() == b"a"  # a is still alive
        await a.close()
        assert not key_a.exists() and (key_a.parent.parent / ENDED_NAME).exists()
        for agent in (b, c, d):
            await agent.close()

    asyncio.run(main())


def test_agent_logs_honour_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))  # the local agent inherits the head's environment

    async def main() -> None:
        agent = await start_agent(f"xdg-{time.monotonic_ns()}", None)
        try:
            assert Path(agent.facts["dir"]) == cache / "speccluster-ssh" / agent.cluster_id / "here"
        finally:
            await agent.close()
        explicit = await start_agent(f"xdg-{time.monotonic_ns()}", tmp_path / "explicit")
        try:
            assert Path(explicit.facts["dir"]).parent.parent == tmp_path / "explicit"  # base_dir still wins
        finally:
            await explicit.close()

    asyncio.run(main())


def test_read_logs_mode_reads_without_touching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The post-mortem reader (the agent program in its read_logs mode) prints the kept logs and changes nothing."""
    cache = tmp_path / "xdg"
    directory = agent_dir(cache / "speccluster-ssh", "gone", "here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    found = asyncio.run(postmortem._read_host(local_host(), ConnectSettings(), "gone", 1024, 60.0))
    assert found == {"w": "log of gone\n"}
    assert (directory / "tls" / "node.key").exists() and not (directory / LOCK_NAME).exists()


# -- the head's record ------------------------------------------------------------------------------




def test_record_is_kept_then_purged(tmp_path: Path, state_home: Path) -> None:
    inventory = tmp_path / "inv.yml"
    inventory.write_text("all:\n  hosts:\n    h1:\n      speccluster_log_retention: 2h\n    h2: {}\n")
    directory = st.make_cluster_dir("lab")
    (directory / st.LOG_FILE).write_text("head says hi\n")
    (directory / st.CLIENT_KEY).write_text("secret")
    state = st.ClusterState(name="lab", cluster_id="lab-1234", inventory=str(inventory), hosts={"h1": "a", "h2": "b"})
    st.write_state(directory, state)
    record = postmortem.keep_record(st.KnownCluster(state, directory, alive=False))
    assert record is not None and record.retention == 7 * DAY  # the longest of its hosts (h2: the default)
    assert sorted(p.name for p in record.directory.iterdir()) == sorted([st.LOG_FILE, postmortem.RECORD_FILE])
    assert "secret" not in (record.directory / postmortem.RECORD_FILE).read_text()
    assert oct(record.directory.stat().st_mode & 0o777) == oct(0o700)
    assert postmortem.latest_record("lab") == record
    assert record.head_log.read_text() == "head says hi\n"
    assert [k.state.name for k in st.known_clusters()] == ["lab"]  # the record is not taken for a cluster
    assert postmortem.purge_records(now=record.ended + record.retention - 1) == []
    assert postmortem.purge_records(now=record.ended + record.retention) == [record]
    assert postmortem.latest_record("lab") is None and not (postmortem.ended_root() / "lab").exists()


def test_logs_command_of_an_ended_cluster(tmp_path: Path, state_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``logs --name N`` after ``down`` reads the kept logs on the hosts (here a local host) and the kept head log."""
    from click.testing import CliRunner

    from speccluster_ssh.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    agent_dir(cache / "speccluster-ssh", "lab-1", "here")
    inventory = tmp_path / "inv.yml"
    inventory.write_text(f"all:\n  hosts:\n    here:\n      ansible_connection: local\n"
                         f"      speccluster_python: {sys.executable}\n")
    directory = st.make_cluster_dir("lab")
    (directory / st.LOG_FILE).write_text("the head's last words\n")
    state = st.ClusterState(name="lab", cluster_id="lab-1", inventory=str(inventory), hosts={"here": "localhost"})
    assert postmortem.keep_record(st.KnownCluster(state, directory, alive=False)) is not None
    st.remove_cluster_dir(directory)

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    shown = run("logs", "--name", "lab")
    assert shown.exit_code == 0, shown.output
    assert "==> w <==\nlog of lab-1" in shown.stdout and "ended" in shown.stderr
    assert json.loads(run("logs", "here", "--name", "lab", "--json").stdout) == {"w": "log of lab-1\n"}
    assert run("logs", "head", "--name", "lab").stdout == "the head's last words\n"
    listed = json.loads(run("list", "--json").stdout)
    assert [(c["name"], c["status"]) for c in listed] == [("lab", "ended")]
    unknown = run("logs", "nobody", "--name", "lab")
    assert unknown.exit_code == 2 and "no kept log named 'nobody'" in unknown.stderr


def test_pick_logs() -> None:
    logs = {"h1": {"w-0": "a", "scheduler": "s"}, "h2": {"w-1": "b", "w-0": "c"}}
    assert postmortem.pick_logs(logs, None, ["h1", "h2"]) == {
        "w-0 on h1": "a", "scheduler": "s", "w-1": "b", "w-0 on h2": "c"}
    assert postmortem.pick_logs(logs, "h2", ["h1", "h2"]) == {"w-1": "b", "w-0": "c"}
    assert postmortem.pick_logs(logs, "w-1", ["h1", "h2"]) == {"w-1": "b"}
    assert postmortem.pick_logs(logs, "Scheduler", ["h1", "h2"]) == {"scheduler": "s"}
    with pytest.raises(UserError, match="no kept log named 'nope'"):
        postmortem.pick_logs(logs, "nope", ["h1", "h2"])


# -- the scheduler's log section ----------------------------------------------------------------------


def test_scheduler_log_is_oldest_first() -> None:
    from speccluster_ssh.reporting import Reports

    class Comm:
        async def get_logs(self) -> list[tuple[str, str]]:
            return [("INFO", "third"), ("INFO", "second\nwith a second line"), ("INFO", "first")]  # dask: newest first

    class Cluster:
        scheduler_comm = Comm()

    text = asyncio.run(Reports(Cluster()).scheduler_log())  # type: ignore[arg-type]
    assert str(text) == "first\nsecond\nwith a second line\nthird"


# -- on the SSH lab ---------------------------------------------------------------------------------


@pytest.mark.lab
@pytest.mark.timeout(400)
def test_logs_after_down_and_after_a_crash_on_the_lab(lab: Any, cli: Any, tmp_path: Path) -> None:
    """Two live clusters of one user on the same hosts; one dies hard (head and an agent SIGKILLed).

    The next agent start (``check``) removes the dead one's TLS key and leaves
    the live one alone; ``logs --name`` prints the dead one's worker logs
    (stale) and, after ``down``, the other's; once the dead one's retention
    (60 s) has passed, an agent start removes its logs. (Other lab tests on
    this machine start agents too, so any of them may be the one that sweeps.)
    """
    from test_cli_lab import agent_dir, all_pids, cluster_tree, poll as lab_poll, settle, write_inventory

    # Two slots a host: the clusters share them (issue 23: a cluster takes only what the other left free).
    inventory = write_inventory(lab, tmp_path / "keep.yml", ["h1", "h2"], speccluster_slots=2)
    short = write_inventory(lab, tmp_path / "short.yml", ["h1", "h2"], speccluster_slots=2,
                            speccluster_log_retention="60s")
    live = cli.up_detached(inventory, "live", "--workers", "2")
    dead = cli.up_detached(short, "dead", "--workers", "2")
    settle(cli, lab, "live", live["cluster_id"], 2)
    report = settle(cli, lab, "dead", dead["cluster_id"], 2)
    dead_workers = sorted(w["name"] for w in report["workers"])
    live_dir, dead_dir = agent_dir(live["cluster_id"]), agent_dir(dead["cluster_id"])
    live_keys = sorted(live_dir.glob("*/tls/*"))
    assert live_keys and sorted(dead_dir.glob("*/tls/*"))

    # An agent SIGKILLed (no clean-up), then its head: nothing of dead's removes its key on h1 ...
    (agent,) = cluster_tree(lab, dead["cluster_id"])["h1"].agents
    os.kill(agent, signal.SIGKILL)
    os.kill(dead["pid"], signal.SIGKILL)
    lab_poll(lambda: not all_pids(lab, dead["cluster_id"]), 30, "the dead cluster's processes to end",
             lambda: all_pids(lab, dead["cluster_id"]))
    # ... but the next agent start there does: the key goes at once, the logs stay, the live cluster is untouched.
    cli.run("check", str(inventory), timeout=120)
    assert not list(dead_dir.glob("*/tls/*")) and (dead_dir / "h1" / ENDED_NAME).is_file()
    assert sorted(live_dir.glob("*/tls/*")) == live_keys and not list(live_dir.glob(f"*/{ENDED_NAME}"))
    assert len(cli.json("status", "--name", "live")["workers"]) == 2

    # logs --name of the crashed (stale) cluster reads what its hosts keep.
    assert {c["name"]: c["status"] for c in cli.json("list")} == {"live": "running", "dead": "stale"}
    stale = cli.ok("logs", "--name", "dead")
    for name in dead_workers:
        assert f"==> {name} <==" in stale.stdout
    assert "distributed.worker" in stale.stdout and "stale" in stale.stderr
    assert set(cli.json("logs", "h2", "--name", "dead")) <= set(dead_workers)

    # Once its retention has passed since it was found dead, an agent start removes its logs.
    lab_poll(lambda: cli.run("check", str(inventory), timeout=120) and not dead_dir.exists(), 180,
             "the dead cluster's logs to expire", lambda: list(dead_dir.rglob("*")))
    assert sorted(live_dir.glob("*/tls/*")) == live_keys

    # down keeps a record: list shows the cluster as ended and logs --name still prints its workers' logs.
    live_workers = sorted(w["name"] for w in cli.json("status", "--name", "live")["workers"])
    down = cli.ok("down", "--name", "live")
    assert "logs --name live" in down.stderr
    assert {c["name"]: c["status"] for c in cli.json("list")}["live"] == "ended"
    kept = cli.json("logs", "--name", "live")
    assert sorted(kept) == live_workers and all("distributed.worker" in kept[w] for w in live_workers)
    assert cli.ok("logs", "head", "--name", "live").stdout.strip()  # the head's log survived down too
    assert not list(live_dir.glob("*/tls/*")) and list(live_dir.glob("*/logs/*.log"))
    assert "no kept log named 'nobody'" in cli.run("logs", "nobody", "--name", "live").stderr
