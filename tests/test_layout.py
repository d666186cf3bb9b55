"""The layout stays readable: no module over about 600 lines without a written reason, no class over about 400.

"About": a module may reach 650 lines and a class 450 before this fails, so
that a small fix does not force a split; past that, split it (or, for a
module, say at its top why it must be one file, in a paragraph starting
"Why one module").
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "speccluster_ssh"
MODULE_LINES = 650
CLASS_LINES = 450


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def long_modules(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        text = path.read_text()
        lines = text.count("\n")
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > MODULE_LINES and "Why one module" not in docstring:
            found.append(f"{path.name}: {lines} lines")
    return found


def long_classes(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES:
                found.append(f"{path.name}: {node.name}, {node.end_lineno - node.lineno + 1} lines")
    return found


def test_modules_are_not_too_long() -> None:
    long = long_modules(sources())
    assert not long, "split these modules, or say at the top why not: " + "; ".join(long)


def test_classes_are_not_too_long() -> None:
    long = long_classes(sources())
    assert not long, "split these classes: " + "; ".join(long)


def test_the_checks_see_what_is_too_long(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(CLASS_LINES + 1))
    big = tmp_path / "big.py"
    big.write_text(f'"""A module."""\n\n\nclass Big:\n{body}\n' + "\n" * MODULE_LINES)
    assert long_classes([big]) == [f"big.py: Big, {CLASS_LINES + 2} lines"]  # the class line and its body
    assert long_modules([big]) and long_modules([big])[0].startswith("big.py: ")
    big.write_text('"""A module.\n\nWhy one module: a reason."""\n' + "\n" * (MODULE_LINES + 1))
    assert long_modules([big]) == []
