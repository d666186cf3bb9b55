"""The package's import graph has no cycle, counting imports inside functions, nor counting type-only imports.

Two graphs: the run-time one leaves out imports under ``if TYPE_CHECKING:``
(they never run); the other counts them too, so that a module's types do not
depend on a module that depends on it (a module acting on the cluster types
it with a protocol of ``cluster_protocols``). A submodule's implicit import of
its own package (``cli.common`` needs ``cli``) is not an edge either; only the
imports written in the source are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "speccluster_ssh"
PACKAGE = "speccluster_ssh"


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def written_imports(tree: ast.AST, type_only: bool = False) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if not type_only and is_type_checking_block(node):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports; with ``type_only``, imports under ``TYPE_CHECKING`` too."""
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        for node in written_imports(ast.parse(path.read_text(), str(path)), type_only):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = name.split(".")
                    # "from . import x" in a/b.py is package a; in a/__init__.py it is a itself.
                    drop = node.level - 1 if is_package else node.level
                    base = ".".join(base_parts[: len(base_parts) - drop])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # "from pkg import name": name may be a module; pkg itself is an edge only when
                # named as a module ("from .x import y" imports x, "from . import y" does not import ".").
                targets = [f"{base}.{alias.name}" for alias in node.names] + ([base] if node.module else [])
            for target in targets:
                if target in paths and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    # cluster.py is reached at module level; cli/common.py loads the inventory inside a function.
    assert "speccluster_ssh.cluster" in graph["speccluster_ssh.head"]
    assert "speccluster_ssh.inventory" in graph["speccluster_ssh.cli.common"]


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    if cycle:
        pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_graph_sees_type_only_imports() -> None:
    assert "speccluster_ssh.cluster_protocols" in import_graph(type_only=True)["speccluster_ssh.healer"]
    assert "speccluster_ssh.cluster_protocols" not in import_graph()["speccluster_ssh.healer"]


def test_no_import_cycle_counting_type_only_imports() -> None:
    graph = import_graph(type_only=True)
    cycle = find_cycle(graph)
    if cycle:
        pytest.fail("import cycle, counting imports under TYPE_CHECKING: " + " -> ".join(cycle))
