"""The README's install line, run as a newcomer runs it (issue 21, point 1).

The line is read from README.md between ``<!-- install-line -->`` and
``<!-- /install-line -->``, and run by bash in a fresh clone of this
repository with ``PATH=/usr/bin:/bin``, so that on Debian 12 the system's
``python3`` (PEP 668, externally managed) is the one it meets. It must end
with a running local cluster of four workers, which ``status`` and ``scale``
drive; Ctrl-C (SIGINT to its process group) stops it and it exits 0.

It installs the package and its dependencies into a new venv: about a minute
and a half on a warm pip cache (marked ``install``; ``-m "not install"``
leaves it out). A fresh clone holds the committed tree only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PATH = "/usr/bin:/bin"

pytestmark = pytest.mark.install


def install_line() -> str:
    """The shell commands of the README's install block."""
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- install-line -->\s*```(?:sh|bash|console)?\n(.*?)```\s*<!-- /install-line -->", text, re.S)
    assert found, "README.md has no ```sh block between <!-- install-line --> and <!-- /install-line -->"
    lines = [line for line in found.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines, "the README's install block is empty"
    return "\n".join(lines)


def test_readme_install_line_shape() -> None:
    """A venv in the checkout, so that PEP 668's system python accepts the install."""
    line = install_line()
    assert "python3 -m venv .venv" in line
    assert ".venv/bin/python -m pip install" in line
    # .venv/bin/speccluster-ssh, or speccluster-ssh after ". .venv/bin/activate".
    assert re.search(r"(^|[\s/])speccluster-ssh up\s*$", line), "the line ends by running the main job"


def _poll(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the install line ended ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def test_readme_install_line_in_a_fresh_clone_with_the_system_python(tmp_path: Path) -> None:
    python3 = shutil.which("python3", path=SYSTEM_PATH)
    assert python3, f"no python3 on {SYSTEM_PATH}: install Debian's python3 and python3-venv"
    check = subprocess.run([python3, "-c", "import venv, ensurepip"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"{python3} cannot make a venv: apt-get install python3-venv ({check.stderr})"

    clone = tmp_path / "speccluster-ssh"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    # HOME stays, so pip's cache is the user's; the cluster's state is the test's own.
    env.update(PATH=SYSTEM_PATH, XDG_STATE_HOME=str(tmp_path / "state"))
    cli = [str(clone / ".venv" / "bin" / "speccluster-ssh")]

    def ask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=120)

    def running_workers() -> int | None:
        if not Path(cli[0]).exists():
            return None
        status = ask("status", "--json")
        if status.returncode != 0:
            return None
        return sum(w["status"] == "running" for w in json.loads(status.stdout)["workers"])

    log = tmp_path / "install-line.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", install_line()], cwd=clone, env=env, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _poll(lambda: running_workers() == 4, 420, "a running local cluster of 4 workers", proc, log)
        print(f"install line: 4 workers running after {time.monotonic() - started:.0f} s")
        # The installed package is the clone's, in the clone's venv, run by Debian's python.
        venv_python = (clone / ".venv" / "bin" / "python").resolve()
        assert str(venv_python).startswith(str(Path(python3).resolve().parent)), venv_python

        scaled = ask("scale", "1")
        assert scaled.returncode == 0, scaled.stderr
        _poll(lambda: running_workers() == 1, 120, "scale 1 to leave one worker", proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal that ran the line
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert "cluster local closed" in output, output[-4000:]
    assert "Traceback" not in output and "externally-managed" not in output, output[-4000:]
