"""Shared pytest fixtures.

SSH lab fixtures come first: ``lab`` (one lab of network-namespace hosts for
the whole session) and ``lab_reset`` (puts the lab back in shape after every
test that used it).  See ``tests/sshlab.py``.  Then ordinary users for lab
tests: ``lab_user`` (one account) and ``make_lab_user`` (as many as a test
needs), see ``tests/labusers.py``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Make `import sshlab` work whatever pytest's import mode is.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from labusers import LabUser, build_user_python  # noqa: E402
from labusers import lab_user as _new_lab_user  # noqa: E402
from sshlab import Lab  # noqa: E402

# ---------------------------------------------------------------------------
# Hypothesis profiles
# ---------------------------------------------------------------------------
# "ci" is derandomized so a failure in CI fails the same way on every re-run
# and on a developer's machine; "default" keeps random exploration for
# developers (print_blob gives a @reproduce_failure line); "nightly" explores
# many more random examples.  Tests scale their own max_examples by the
# profile's max_examples / 100 (see tests/test_injection.py).  Chosen by
# HYPOTHESIS_PROFILE, else "ci" when CI=true, else "default".
from hypothesis import settings as _hypothesis_settings  # noqa: E402

# Hypothesis itself loads its own "ci" profile when a CI variable is merely
# present; every profile here starts from hypothesis's plain default instead.
_plain = _hypothesis_settings.get_profile("default")
_hypothesis_settings.register_profile("default", _plain, derandomize=False, print_blob=True)
_hypothesis_settings.register_profile("ci", _plain, derandomize=True, database=None, print_blob=True)
_hypothesis_settings.register_profile("nightly", _plain, derandomize=False, max_examples=1000, print_blob=True)
_hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE")
    or ("ci" if os.environ.get("CI", "").lower() == "true" else "default")
)

# ---------------------------------------------------------------------------
# Temporary files of child processes
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _children_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Child processes (local host agents and their dask processes) keep temporary files under pytest's base.

    Scratch directories go with their cluster, but a test that SIGKILLs an
    agent in a private base directory leaves its scratch for a sweep that
    never comes; there it goes with pytest's old runs. This process keeps
    its own (cached) temporary directory; lab hosts get theirs from sshd.
    """
    path = tmp_path_factory.mktemp("children-tmp")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old


# ---------------------------------------------------------------------------
# SSH lab
# ---------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lab_first: run before every other test, while the session lab does not "
        "exist yet (for tests that build their own lab on the lab subnet)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # A test that uses the lab is a lab test even if it forgot the marker,
        # so `-m "not lab"` really leaves out everything that needs root.
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lab)
    # Stable sort: lab_first tests move to the front, the rest keep their order.
    items.sort(key=lambda item: item.get_closest_marker("lab_first") is None)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The session's SSH lab: ``SCLAB_HOSTS`` hosts (default 4) on 10.250.0.0/24.

    Fails (does not skip) when the machine cannot build the lab.
    """
    n_hosts = int(os.environ.get("SCLAB_HOSTS", "4"))
    # Separate prefixes and subnets let several test sessions share a machine.
    session_lab = Lab(
        n_hosts,
        prefix=os.environ.get("SCLAB_PREFIX", "sclab"),
        subnet_base=os.environ.get("SCLAB_SUBNET", "10.250.0"),
    )
    session_lab.start()  # also registers an atexit teardown as a safety net
    try:
        yield session_lab
    finally:
        session_lab.stop()


@pytest.fixture(autouse=True)
def own_lease_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Local agents of a test that is not a lab test keep their leases in a directory of the test's own.

    This machine's /var/tmp is shared with other test sessions, and with the
    agents of an earlier test whose head was killed (they hold their leases
    until their silence timeout): either would take the local hosts' slots.
    Lab hosts have their own /var/tmp (tests/sshlab.py).
    """
    if "lab" in request.fixturenames:
        return
    directory = tmp_path_factory.mktemp("leases")
    directory.chmod(0o755)
    monkeypatch.setenv("SPECCLUSTER_SSH_LEASE_DIR", str(directory))


@pytest.fixture(autouse=True)
def lab_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used ``lab``: kill leftovers, heal links, restart sshd.

    A test that left processes running on lab hosts gets a warning, or fails
    in teardown when ``SCLAB_STRICT_RESET=1``.
    """
    yield
    if "lab" not in request.fixturenames:
        return
    # Collect a cluster's cycles now, not at interpreter exit, where this
    # CPython 3.11.7 can abort with "AST constructor recursion depth mismatch".
    gc.collect()
    try:
        session_lab: Lab = request.getfixturevalue("lab")
    except Exception:
        return  # the lab failed to build; its setup error is already reported
    report = session_lab.reset()
    if not report.clean:
        message = f"{request.node.nodeid} left processes on lab hosts:\n{report}"
        if os.environ.get("SCLAB_STRICT_RESET") == "1":
            pytest.fail(message)
        warnings.warn(message, stacklevel=1)


# ---------------------------------------------------------------------------
# Ordinary users of the lab
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lab_user_python(lab: Lab) -> Iterator[str]:
    """A python every user may run, with what the head needs and this checkout (built once a session)."""
    root = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-users-"))
    try:
        yield build_user_python(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_lab_user(lab: Lab, lab_user_python: str) -> Iterator[Callable[[], LabUser]]:
    """Makes fresh ordinary accounts (see ``labusers.py``); each is removed, with all it left, after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(_new_lab_user(lab, lab_user_python))


@pytest.fixture
def lab_user(make_lab_user: Callable[[], LabUser]) -> LabUser:
    """One ordinary account with its own SSH key, a home and a python (see ``labusers.py``)."""
    return make_lab_user()


# ---------------------------------------------------------------------------
# A private state directory (the CLI's clusters live there)
# ---------------------------------------------------------------------------


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``XDG_STATE_HOME``; yields the speccluster-ssh state root inside it."""
    import dask

    # Loaded first: otherwise leaving dask.config.set would drop the whole section.
    import speccluster_ssh.config  # noqa: F401

    home = tmp_path / "xdg"
    home.mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    monkeypatch.delenv("DASK_SPECCLUSTER_SSH__STATE_DIR", raising=False)
    with dask.config.set({"speccluster-ssh.state-dir": None}):
        yield home / "speccluster-ssh"
