"""Each module that acts on the cluster uses exactly what its protocol declares, and the cluster has all of it.

The protocols of ``speccluster_ssh.cluster_protocols`` stand between the
cluster and the modules it is built from (no import cycle, even counting
type-only imports). A module that reads a new attribute of the cluster fails
here until its protocol declares it; a protocol that declares what no module
uses any more fails too.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from speccluster_ssh import cluster_protocols as cp
from speccluster_ssh.cluster import SSHSpecCluster
from speccluster_ssh.healer import Healer
from speccluster_ssh.operations import Operations
from speccluster_ssh.powerctl import PowerKeeper
from speccluster_ssh.reporting import Reports
from speccluster_ssh.scaling import Capacity

SRC = Path(__file__).resolve().parent.parent / "src" / "speccluster_ssh"
PROTOCOL_OF = {
    "day2": cp.Day2Cluster,
    "healer": cp.HealerCluster,
    "idle": cp.IdleCluster,
    "operations": cp.OperationsCluster,
    "powerctl": cp.PowerCluster,
    "reconcile": cp.ReconcileCluster,
    "reload": cp.ReloadCluster,
    "reporting": cp.ReportsCluster,
    "scaling": cp.CapacityCluster,
    "sharing": cp.SharingCluster,
    "startup": cp.StartupCluster,
}
PARTS = {cp.HealerPart: Healer, cp.CapacityPart: Capacity, cp.LogKeeper: Reports, cp.OperationsLock: Operations,
         cp.PowerPart: PowerKeeper}


def own_members(protocol: type) -> set[str]:
    body = vars(protocol)
    return set(body.get("__annotations__", {})) | {
        n for n, v in body.items() if not n.startswith("_") and (callable(v) or isinstance(v, property))
    }


def members(protocol: type) -> set[str]:
    return set().union(*(own_members(k) for k in protocol.__mro__ if k.__module__ == cp.__name__))


def cluster_uses(source: str) -> set[str]:
    """Attributes read or written of ``cluster``, ``self.cluster``, and of ``self`` in the day-2 mixin's methods."""
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            value = node.value
            if isinstance(value, ast.Name) and value.id == "cluster":
                used.add(node.attr)
            elif isinstance(value, ast.Attribute) and value.attr == "cluster" and getattr(value.value, "id", None) == "self":
                used.add(node.attr)
    return used


def day2_uses(source: str) -> set[str]:
    tree = ast.parse(source)
    return {
        n.attr for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }


def is_set_on_self(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        tree = ast.parse(inspect.cleandoc("\n" + source) if source[:1].isspace() else source)
        if any(
            isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and n.attr == name
            and getattr(n.value, "id", None) == "self" for n in ast.walk(tree)
        ):
            return True
    return False


@pytest.mark.parametrize("module", sorted(PROTOCOL_OF))
def test_a_module_uses_only_what_its_protocol_declares(module: str) -> None:
    source = (SRC / f"{module}.py").read_text()
    used = day2_uses(source) if module == "day2" else cluster_uses(source)
    undeclared = used - members(PROTOCOL_OF[module])
    assert not undeclared, f"{module}.py uses {sorted(undeclared)} of the cluster: declare them in {PROTOCOL_OF[module].__name__}"


def test_every_declared_member_is_used() -> None:
    uses = {m: (day2_uses if m == "day2" else cluster_uses)((SRC / f"{m}.py").read_text()) for m in PROTOCOL_OF}
    unused = []
    for protocol in {k for p in PROTOCOL_OF.values() for k in p.__mro__ if k.__module__ == cp.__name__}:
        users = [m for m, p in PROTOCOL_OF.items() if protocol in p.__mro__]
        unused += [f"{protocol.__name__}.{n}" for n in own_members(protocol) if not any(n in uses[m] for m in users)]
    assert not unused, f"declared but used by no module: {sorted(unused)}"


@pytest.mark.parametrize("protocol", sorted({*PROTOCOL_OF.values()}, key=lambda p: p.__name__), ids=lambda p: p.__name__)
def test_the_cluster_has_every_member(protocol: type) -> None:
    missing = [n for n in members(protocol) if not hasattr(SSHSpecCluster, n) and not is_set_on_self(SSHSpecCluster, n)]
    assert not missing, f"SSHSpecCluster has no {missing} of {protocol.__name__}"


@pytest.mark.parametrize("part", list(PARTS), ids=lambda p: p.__name__)
def test_the_parts_have_every_member(part: type) -> None:
    cls = PARTS[part]
    missing = [n for n in members(part) if not hasattr(cls, n) and not is_set_on_self(cls, n)]
    assert not missing, f"{cls.__name__} has no {missing} of {part.__name__}"


def test_the_checks_see_a_use() -> None:
    assert cluster_uses("cluster.pool.states\nself.cluster.workers = {}\nother.x") == {"pool", "workers"}
    assert not is_set_on_self(Reports, "no_such_attribute")


def test_no_module_but_the_cluster_and_its_bridge_uses_a_private_name_of_the_cluster() -> None:
    """``cluster._x`` (or ``self.cluster._x``) appears nowhere in src/ but in cluster.py and distributed_internals.py."""
    own = {"cluster.py", "distributed_internals.py"}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in own:
            continue
        private = sorted(a for a in cluster_uses(path.read_text()) if a.startswith("_") and not a.startswith("__"))
        found += [f"{path.relative_to(SRC)}: cluster.{a}" for a in private]
    assert not found
    assert cluster_uses("cluster._log('x')\nself.cluster._tasks.start()\n") == {"_log", "_tasks"}  # the scan sees them
