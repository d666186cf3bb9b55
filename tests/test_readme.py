"""The README documents every inventory variable with its real default."""

from __future__ import annotations

from pathlib import Path

from speccluster_ssh.inventory import SPECCLUSTER_VARS, speccluster_vars_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_has_the_current_variable_table() -> None:
    text = README.read_text()
    assert speccluster_vars_markdown() in text
    for name in SPECCLUSTER_VARS:
        assert f"`{name}`" in text
