"""The host table (hosts.py): one owner of every host's state, and the one retry rule.

Pure: no I/O, no cluster. The last tests read src/ to check that the table's
methods are the only way any module changes a host's state.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from speccluster_ssh.health import (
    FIXABLE_BACKOFF_FIRST,
    FIXABLE_BACKOFF_MAX,
    HOST_BACKOFF_FIRST,
    HOST_BACKOFF_MAX,
    Health,
    next_retry,
)
from speccluster_ssh.hosts import HostTable, HostView
from speccluster_ssh.inventory import Inventory

SRC = Path(__file__).resolve().parent.parent / "src" / "speccluster_ssh"


def table(*names: str, scheduler: str | None = None) -> HostTable:
    hosts = [{"name": n, "groups": ["workers"]} for n in names]
    if scheduler is not None:
        hosts.append({"name": scheduler, "groups": ["scheduler"]})
    return HostTable.from_inventory(Inventory.from_hosts(hosts))


def answering(t: HostTable, *names: str) -> None:
    for name in names:
        t.renew_agent(name, SimpleNamespace(alive=True))  # type: ignore[arg-type]


# -- the retry rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff", "fixable", "now", "expected"),
    [
        (HOST_BACKOFF_FIRST, False, 100.0, (101.0, 2.0)),  # the first retry comes one second after the failure
        (2.0, False, 100.0, (102.0, 4.0)),  # then the backoff doubles
        (32.0, False, 0.0, (32.0, HOST_BACKOFF_MAX)),  # up to a minute
        (HOST_BACKOFF_MAX, False, 0.0, (HOST_BACKOFF_MAX, HOST_BACKOFF_MAX)),
        (HOST_BACKOFF_FIRST, True, 100.0, (100.0 + FIXABLE_BACKOFF_FIRST, 2 * FIXABLE_BACKOFF_FIRST)),  # a fix: rarely
        (240.0, True, 0.0, (240.0, FIXABLE_BACKOFF_MAX)),
        (FIXABLE_BACKOFF_MAX, True, 0.0, (FIXABLE_BACKOFF_MAX, FIXABLE_BACKOFF_MAX)),
    ],
)
def test_the_retry_rule(backoff: float, fixable: bool, now: float, expected: tuple[float, float]) -> None:
    assert next_retry(backoff, fixable, now) == expected


def test_a_host_lost_while_running_and_one_that_failed_at_start_wait_the_same() -> None:
    """Every transition to down schedules the next attempt; nothing else does."""
    t = table("run", "start")
    answering(t, "run")
    t.mark_lost("run", "connection lost", now=50.0)
    t.mark_lost("start", "cannot connect", now=50.0)  # never answered: a failed start
    assert t.states["run"].retry_at == t.states["start"].retry_at == 51.0
    assert t.due_for_retry(["run", "start"], now=50.5) == []
    assert t.due_for_retry(["run", "start"], now=51.0) == ["run", "start"]
    assert t.due_for_retry(["start"], now=51.0) == ["start"]  # only the hosts asked about
    # The retry fails: down again, the next attempt twice as far.
    t.mark_lost("start", "cannot connect", now=51.5)
    assert t.states["start"].retry_at == 53.5
    assert {n: (t.states[n].state, t.states[n].retry_at) for n in ("run", "start")} == {
        "run": ("down", 51.0), "start": ("down", 53.5)}
    # An answer ends the backoff.
    answering(t, "start")
    t.mark_lost("start", "connection lost", now=60.0)
    assert t.states["start"].retry_at == 61.0


def test_a_host_with_a_fix_is_retried_rarely() -> None:
    t = table("h1")
    t.mark_lost("h1", "distributed 2020.1 does not match", fix="install distributed", now=0.0)
    view = t.states["h1"]
    assert view.retry_at == FIXABLE_BACKOFF_FIRST and view.fix == "install distributed"
    for _ in range(6):
        t.mark_lost("h1", "again", fix="install distributed", now=1000.0)
    assert t.states["h1"].retry_at == 1000.0 + FIXABLE_BACKOFF_MAX


# -- the table -----------------------------------------------------------------------------------------


def test_workers_and_a_scheduler_only_host() -> None:
    t = table("h1", "h2", scheduler="s")
    assert list(t.workers) == ["h1", "h2"] and list(t.specs) == ["h1", "h2", "s"]
    assert "s" in t and "s" not in t.workers and t.inventory is not None
    answering(t, "h1", "s")
    assert [n for n in t.workers if t.states[n].state == "up"] == ["h1"]  # the scheduler's host runs no worker
    t.mark_lost("h1", "lost")
    assert not t.no_worker_answers()  # h2 was not tried yet
    t.mark_lost("h2", "lost")
    assert t.no_worker_answers()  # the scheduler's host answering runs no worker


def test_add_replace_order_and_forget() -> None:
    t = table("h1", "h2")
    workers = t.workers  # a live view
    answering(t, "h2")
    t.add(table("h3").specs["h3"])
    assert list(workers) == ["h1", "h2", "h3"] and t.states["h3"].state == Health.NEW
    changed = Inventory.from_hosts([{"name": "h2", "groups": ["workers"], "speccluster_slots": 3}]).hosts["h2"]
    t.replace_spec("h2", changed)
    assert workers["h2"].slots == 3 and t.states["h2"].state == Health.UP  # the health stays
    t.put_in_order(["h3", "h1"])
    assert list(workers) == ["h3", "h1", "h2"]
    conn = SimpleNamespace(name="conn")
    t.set_connection("h2", conn)  # type: ignore[arg-type]
    agent, connection = t.forget("h2")
    assert agent is not None and connection is conn
    assert "h2" not in t and list(workers) == ["h3", "h1"] and "h2" not in t.agents
    assert t.forget("h2") == (None, None)


def test_agents_and_connections() -> None:
    t = table("h1")
    assert t.drop_agent("h1") is None and t.drop_connection("h1") is None
    first, second = SimpleNamespace(alive=True), SimpleNamespace(alive=True)
    assert t.renew_agent("h1", first) is None  # type: ignore[arg-type]
    assert t.renew_agent("h1", second) is first  # type: ignore[arg-type]
    assert t.agents["h1"] is second and t.states["h1"].state == Health.UP
    assert t.drop_agent("h1") is second and dict(t.agents) == {}
    assert t.set_connection("h1", SimpleNamespace()) is None  # type: ignore[arg-type]
    assert len(t.connections) == 1


def test_drain_put_aside_and_restore() -> None:
    t = table("h1", "h2")
    answering(t, "h1", "h2")
    assert t.drain("h1", "  disk ") == "disk" and t.drained() == {"h1": "disk"}
    assert t.unavailable() == {"h1"}
    t.put_aside("h2", "failed three times")
    assert t.unavailable() == {"h1", "h2"} and t.states["h2"].reason == "failed three times"
    assert t.restore("h2") and not t.restore("h2")  # only an aside host comes back
    assert t.undrain("h1") == "disk" and t.undrain("h1") == ""
    assert t.unavailable() == set()
    t.record_failure("h2", "entry 3 failed to start")
    assert [r for _, r in t.states["h2"].failures] == ["entry 3 failed to start"]
    assert t.states["h2"].state == Health.UP  # a failure alone changes no health


def test_the_views_are_read_only() -> None:
    t = table("h1")
    view = t.states["h1"]
    assert isinstance(view, HostView)
    for mapping in (t.specs, t.workers, t.states, t.agents, t.connections):
        with pytest.raises(TypeError):
            mapping["h1"] = None  # type: ignore[index]
        assert not hasattr(mapping, "pop")
    for mutator in ("mark_up", "mark_down", "put_aside", "restore", "drain", "undrain", "record_failure"):
        assert not hasattr(view, mutator)
    with pytest.raises(AttributeError):
        view.state = Health.UP  # type: ignore[misc]
    t.mark_lost("h1", "lost")
    assert view.state == "down" and view.as_dict()["reason"] == "lost"  # live


# -- one owner: read from src/ -------------------------------------------------------------------------

# HostState's methods that change it; only hosts.py (and health.py, which defines them) call them.
HOST_STATE_ONLY = {"mark_up", "mark_down", "schedule_retry"}
# The table's internals: a HostState is reachable only through them.
TABLE_INTERNALS = {"HostState", "HostRecord", "_records", "_known", "_state"}
# The table's views, and the pool's and cluster's names for them: read, never written.
HOST_MAPPINGS = {"states", "agents", "connections", "worker_hosts", "workers", "specs"}
# The cluster's names for what the table holds (an Inventory has a worker_hosts list of its own).
CLUSTER_NAMES = {"worker_hosts", "inventory"}
WRITES = {"pop", "popitem", "setdefault", "clear", "update", "__setitem__", "__delitem__"}


def modules(*besides: str) -> list[tuple[str, ast.AST]]:
    return [
        (str(p.relative_to(SRC)), ast.parse(p.read_text(), str(p)))
        for p in sorted(SRC.rglob("*.py"))
        if str(p.relative_to(SRC)) not in besides
    ]


def host_state_changes(tree: ast.AST) -> list[str]:
    """Where ``tree`` changes host state other than through the table's methods."""
    found = []

    def mapping_of(node: ast.AST) -> str | None:
        # ``x.states[...]``, ``x.agents``: which host mapping ``node`` is, if it is one.
        if isinstance(node, ast.Subscript):
            node = node.value
        if isinstance(node, ast.Attribute) and node.attr in HOST_MAPPINGS:
            # cluster.workers is SpecCluster's own dictionary of processes.
            if node.attr == "workers" and not ast.unparse(node.value).endswith(("table", "host_table")):
                return None
            return ast.unparse(node)
        return None

    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name) and node.id in TABLE_INTERNALS:
            found.append(f"{line}: {node.id}")
        elif isinstance(node, ast.alias) and node.name in TABLE_INTERNALS:
            found.append(f"imports {node.name}")
        elif isinstance(node, ast.Attribute) and node.attr in TABLE_INTERNALS:
            found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in HOST_STATE_ONLY:
                found.append(f"{line}: {ast.unparse(node.func)}()")
            elif node.func.attr in WRITES and mapping_of(node.func.value):
                found.append(f"{line}: {ast.unparse(node.func)}()")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and mapping_of(target):
                    found.append(f"{line}: {ast.unparse(target)} written")
                elif isinstance(target, ast.Attribute) and (
                    target.attr in HOST_MAPPINGS - {"workers"} - CLUSTER_NAMES
                    or (target.attr in CLUSTER_NAMES and "cluster" in ast.unparse(target.value))
                ):
                    found.append(f"{line}: {ast.unparse(target)} assigned")
    return found


def test_only_the_host_table_changes_host_state() -> None:
    found = {name: where for name, tree in modules("hosts.py", "health.py") if (where := host_state_changes(tree))}
    assert found == {}


def test_the_check_sees_a_change_of_host_state() -> None:
    code = """
from speccluster_ssh.health import HostState
pool.states[name].mark_up()
cluster.pool.states.setdefault(name, x)
pool.agents[name] = agent
cluster.worker_hosts = {}
cluster.inventory = new
del pool.connections[name]
table._records.pop(name)
"""
    assert len(host_state_changes(ast.parse(code))) == 8
    assert host_state_changes(ast.parse("cluster.workers.pop(key)\nwriter.drain()\nself.inventory = x\n")) == []


def private_pool_reads(tree: ast.AST) -> list[str]:
    """``pool._x`` or ``x.pool._x`` in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner: Any = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name == "pool":
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reads_a_private_attribute_of_the_pool() -> None:
    found = {name: where for name, tree in modules("pool.py", "hosts.py") if (where := private_pool_reads(tree))}
    assert found == {}
    found = private_pool_reads(ast.parse("pool._start_agent(n)\ncluster.pool._unclaimed\nself._pool._release()"))
    assert sorted(found) == ["1: pool._start_agent", "2: cluster.pool._unclaimed"]
