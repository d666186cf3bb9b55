"""No third-party deprecation warning reaches a user (issue 21, point 2).

asyncssh's import names cryptography's DSA types, which cryptography 51
deprecated: without ``speccluster_ssh.quiet`` each of these printed ten
lines of ``CryptographyDeprecationWarning``. The filter is narrow: other
warnings, from asyncssh's modules too, still show.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess[str]:
    # -W default shows every warning once, as a developer's shell would with
    # PYTHONWARNINGS set; the filter must win over it for the known one only.
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )


def test_import_prints_nothing() -> None:
    done = _python("import speccluster_ssh, asyncssh, speccluster_ssh.connection; from speccluster_ssh import SSHSpecCluster")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def test_other_warnings_still_show() -> None:
    code = (
        "import warnings, speccluster_ssh, asyncssh\n"
        "warnings.warn_explicit('something else is deprecated', DeprecationWarning, 'x.py', 1, module='asyncssh.misc')\n"
        "warnings.warn_explicit('DSA is deprecated', UserWarning, 'y.py', 1, module='mypkg')\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "something else is deprecated" in done.stderr
    assert "DSA is deprecated" in done.stderr  # the same text from another module is not ours to hide


@pytest.mark.parametrize("argv", [["--help"], ["reload", "--name", "no-such-cluster"], ["list"]])
def test_cli_prints_no_warning(argv: list[str], tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, "-m", "speccluster_ssh.cli", *argv], capture_output=True, text=True, timeout=120, env=env, cwd="/"
    )
    assert "Warning" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) <= 1, done.stderr


def test_drift_names_changed_packages(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import drift
    finally:
        sys.path.pop(0)
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\ncryptography==50.0.2\nPyYAML==6.0.4\nasyncssh==2.24.1\n")
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("cryptography==51.0.1\npyyaml==6.0.4\nasyncssh==2.24.1\nnew_thing==1.0\n")
    assert drift.drift(drift.pins(str(lock)), drift.pins(str(freeze))) == [
        "cryptography 51.0.1 (lock: 50.0.2)",
        "new-thing 1.0 (not in the lock)",
    ]
