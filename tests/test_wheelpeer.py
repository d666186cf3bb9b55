"""``agent/wheelpeer.py`` off the lab: it fits in the environment script's namespace and runs under Python 3.8."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from speccluster_ssh.security import CA_PEM, NODE_CERT, NODE_KEY, make_security


def source(name: str) -> str:
    return resources.files("speccluster_ssh.agent").joinpath(name).read_text()


def top_level_names(text: str) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_no_name_clashes_with_the_environment_script_and_no_main() -> None:
    ours = top_level_names(source("wheelpeer.py"))
    assert ours and all(n.lower().lstrip("_").startswith("wheelpeer") for n in ours), ours
    assert not ours & top_level_names(source("envbuild.py"))
    assert "main" not in ours  # the bootstrap calls envbuild's


def test_serves_and_fetches_under_python_38(tmp_path: Path) -> None:
    """The oldest python a host may have: serve and fetch over loopback, in one 3.8 process."""
    found = [shutil.which("python3.8"), *map(str, Path.home().glob(".pyenv/versions/3.8*/bin/python3.8"))]
    works = [p for p in found if p and subprocess.run([p, "-c", "pass"], capture_output=True).returncode == 0]
    if not works:
        pytest.skip("no python3.8 on this machine")
    _, tls = make_security(True, "py38")
    pems = {"ca": tls[CA_PEM].decode(), "cert": tls[NODE_CERT].decode(), "key": tls[NODE_KEY].decode()}
    (tmp_path / "served").mkdir()
    (tmp_path / "got").mkdir()
    data = b"wheel bytes " * 1000
    (tmp_path / "served" / "w.whl").write_bytes(data)
    script = source("wheelpeer.py") + """
import json, sys
config = json.loads(sys.stdin.read())
server = wheelpeer_serve(config["served"], ["w.whl"], config["pems"], bind="127.0.0.1")
try:
    print(json.dumps(wheelpeer_fetch(server.address[0], server.address[1], [("w.whl", config["sha"], config["size"])],
                                     config["got"], config["pems"], timeout=30)))
finally:
    server.stop()
"""
    config = {"served": str(tmp_path / "served"), "got": str(tmp_path / "got"), "pems": pems,
              "sha": hashlib.sha256(data).hexdigest(), "size": len(data)}
    done = subprocess.run([works[0], "-c", script], input=json.dumps(config), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"bytes": len(data), "files": ["w.whl"]}
    assert (tmp_path / "got" / "w.whl").read_bytes() == data
