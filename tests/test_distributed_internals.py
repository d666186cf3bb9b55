"""distributed's private names are used in one module only, and each of them still exists.

``speccluster_ssh.distributed_internals`` lists every private name of
distributed that the package uses. Any other module of ``src/`` that uses
one of the private names of distributed's classes we build on (as an
attribute, or as a method it defines), or imports a private name or module of
``distributed``, fails here: move the use into that module, with its reason.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import ProcessInterface, SpecCluster

from speccluster_ssh.distributed_internals import PRIVATE_NAMES

SRC = Path(__file__).resolve().parent.parent / "src" / "speccluster_ssh"
INTERNALS = SRC / "distributed_internals.py"
# distributed's classes the package subclasses or whose instances it handles.
DISTRIBUTED_CLASSES = (SpecCluster, Cluster, ProcessInterface, Adaptive)


def private(name: str) -> bool:
    # _repr_html_ and _ipython_display_ are IPython's protocol, not distributed's private API.
    return name.startswith("_") and not name.startswith("__") and not name.endswith("_")


def private_names_of(cls: type) -> set[str]:
    """Private names ``cls`` and its distributed bases define: methods, and attributes they set on ``self``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("distributed"):
            continue
        names |= {n for n in vars(klass) if private(n)}
        names |= {n for n in re.findall(r"self\.(_\w+)", inspect.getsource(klass)) if private(n)}
    return names


def distributed_private_names() -> set[str]:
    return set().union(*(private_names_of(cls) for cls in DISTRIBUTED_CLASSES))


def derives_from_distributed(node: ast.ClassDef, module: str | None) -> bool:
    """Whether the class ``node`` (of ``module``, when given) is a subclass of one of :data:`DISTRIBUTED_CLASSES`."""
    if module is not None:
        cls = getattr(importlib.import_module(module), node.name, None)
        return isinstance(cls, type) and issubclass(cls, DISTRIBUTED_CLASSES)
    return any(ast.unparse(b).split(".")[-1] in {c.__name__ for c in DISTRIBUTED_CLASSES} for b in node.bases)


def uses_of(tree: ast.AST, names: set[str], module: str | None = None) -> list[tuple[int, str, str]]:
    """``(line, what, name)`` for each use of one of ``names`` or of a private name of ``distributed.*``.

    A use is: an attribute of any object but ``self``; an attribute of
    ``self``, or a method defined, in a subclass of distributed's classes
    (our own classes' private names are their own); a ``getattr``/``setattr``
    /``hasattr`` of such a name; an import of a private module or name of
    distributed.
    """
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, in_subclass: bool) -> None:
        if isinstance(node, ast.ClassDef):
            in_subclass = derives_from_distributed(node, module)
        if isinstance(node, ast.Attribute) and node.attr in names:
            if in_subclass or getattr(node.value, "id", None) != "self":
                found.append((node.lineno, f".{node.attr}", node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names and in_subclass:
            found.append((node.lineno, f"def {node.name}", node.name))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr"):
            literal = node.args[1] if len(node.args) > 1 else None
            if isinstance(literal, ast.Constant) and literal.value in names:
                found.append((node.lineno, f"{ast.unparse(node.func)}(..., {literal.value!r})", literal.value))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "distributed":
            parts = (node.module or "").split(".")
            for alias in node.names:
                if any(private(p) for p in parts) or private(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}", alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "distributed" and any(private(p) for p in alias.name.split(".")):
                    found.append((node.lineno, f"import {alias.name}", alias.name))
        for child in ast.iter_child_nodes(node):
            visit(child, in_subclass)

    visit(tree, False)
    return found


def module_of(path: Path) -> str:
    parts = ["speccluster_ssh", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_listed_name_exists_on_the_installed_distributed() -> None:
    missing = [f"{n.owner.__name__}.{n.name}" for n in PRIVATE_NAMES if n.name not in private_names_of(n.owner)]
    assert not missing, f"gone from this distributed release: {missing}; see distributed_internals.py"


def test_every_listed_name_says_why() -> None:
    assert all(len(n.why) > 20 for n in PRIVATE_NAMES)
    assert len({n.name for n in PRIVATE_NAMES}) == len(PRIVATE_NAMES)


def test_the_internals_module_uses_only_listed_names() -> None:
    listed = {n.name for n in PRIVATE_NAMES}
    tree = ast.parse(INTERNALS.read_text())
    used = {name for _, _, name in uses_of(tree, distributed_private_names(), module_of(INTERNALS))}
    assert used <= listed, f"used in distributed_internals.py but not in PRIVATE_NAMES: {sorted(used - listed)}"


def test_no_other_module_uses_a_private_name_of_distributed() -> None:
    names = distributed_private_names()
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path != INTERNALS:
            uses = uses_of(ast.parse(path.read_text()), names, module_of(path))
            found += [f"{path.relative_to(SRC)}:{line}: {what}" for line, what, _ in uses]
    assert not found, "private names of distributed outside distributed_internals.py:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("cluster._adaptive.stop()", ["._adaptive"]),
        ("class C(SpecCluster):\n    async def _correct_state_internal(self): ...", ["def _correct_state_internal"]),
        ("class C(ProcessInterface):\n    def f(self):\n        self._event_finished.set()", ["._event_finished"]),
        ("getattr(cluster, '_lock', None)", ["getattr(..., '_lock')"]),
        ("from distributed.utils import _maybe_complex", ["from distributed.utils import _maybe_complex"]),
        ("import distributed._concurrent_futures_thread", ["import distributed._concurrent_futures_thread"]),
        # Our own classes' private names, os._exit and public imports are no use of distributed's.
        ("class Pool:\n    async def _start(self):\n        self._lock = None", []),
        ("os._exit(0)\nfrom distributed.utils import Log", []),
    ],
)
def test_the_scan_sees_each_kind_of_use(source: str, expected: list[str]) -> None:
    assert [what for _, what, _ in uses_of(ast.parse(source), distributed_private_names())] == expected
