"""Where the command line keeps the clusters it started.

Every cluster started by ``speccluster-ssh up`` has a directory
``<state-dir>/<name>/`` (mode 0700). The state dir is the config value
``speccluster-ssh.state-dir``, else ``$XDG_STATE_HOME/speccluster-ssh``, else
``~/.local/state/speccluster-ssh``. A cluster directory holds:

``state.json``
    Name, pid of the head process, inventory, scheduler address, dashboard
    link, start time, hosts, phase (``starting``, ``running``, ``failed``).
``head.lock``
    Locked (``flock``) by the head process for as long as it lives. A
    cluster whose lock nobody holds is *stale*: its head is gone.
``control.sock``
    A Unix socket (0600) served by the head process; the protocol is in
    :mod:`speccluster_ssh.control`.
``ca.pem``, ``client.pem``, ``client.key``, ``client.yaml``
    With TLS, what a client needs to connect (0600); ``client.yaml`` is a
    dask config file, so ``DASK_CONFIG=<dir>/client.yaml`` makes a plain
    ``Client()`` connect to the cluster.
``head.log``
    Output of a detached head process.

The state dir also holds ``.ended/``, the records of ended clusters that
``logs --name`` reads (:mod:`speccluster_ssh.postmortem`); its name is no
cluster name, so :func:`known_clusters` never takes it for one.

This module imports neither ``distributed`` nor the cluster code, so that
commands such as ``status`` or ``list`` start quickly. dask-ctl's discovery
of these clusters is in :mod:`speccluster_ssh.discovery`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError

STATE_FILE = "state.json"
LOCK_FILE = "head.lock"
SOCKET_FILE = "control.sock"
LOG_FILE = "head.log"
CLIENT_CONFIG = "client.yaml"
CA_FILE = "ca.pem"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client.key"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


# -- locations ------------------------------------------------------------------


def state_root() -> Path:
    """The directory holding one subdirectory per cluster.

    Returns
    -------
    pathlib.Path
        Config ``speccluster-ssh.state-dir`` if set, else
        ``$XDG_STATE_HOME/speccluster-ssh``, else ``~/.local/state/speccluster-ssh``.
    """
    from . import config  # imports dask; kept out of module import time

    configured = config.get("state-dir")
    if configured:
        return Path(os.path.expanduser(str(configured))).absolute()
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "speccluster-ssh"


def check_name(name: str) -> str:
    """Return ``name`` if it can name a cluster directory, else raise :class:`UserError`."""
    if not _NAME_RE.match(name):
        raise UserError(
            f"cluster name {name!r} is not usable; use 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_name(inventory_path: str) -> str:
    """A cluster name derived from an inventory path (its file name without extension)."""
    stem = Path(inventory_path.rstrip("/")).stem or "cluster"
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).lstrip("-_.")[:63]
    return cleaned or "cluster"


def cluster_dir(name: str) -> Path:
    """The state directory of cluster ``name`` (it may not exist)."""
    return state_root() / check_name(name)


def make_cluster_dir(name: str) -> Path:
    """Create (or tighten) the state directory of ``name``, mode 0700, and return it."""
    root = state_root()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory = root / check_name(name)
        directory.mkdir(exist_ok=True, mode=0o700)
        # mkdir's mode is filtered by the umask; make sure nobody else can look in.
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise UserError(
            f"cannot create the state directory under {root}: {exc.strerror or exc}; "
            "set speccluster-ssh.state-dir (or XDG_STATE_HOME) to a writable place"
        ) from None
    return directory


def remove_cluster_dir(directory: Path) -> None:
    """Remove a cluster's state directory and everything in it (no error if absent)."""
    shutil.rmtree(directory, ignore_errors=True)


def write_private(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only (0600)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- state.json -------------------------------------------------------------------


def now_iso() -> str:
    """The current time as an ISO 8601 string with the local offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class ClusterState:
    """The content of a cluster's ``state.json``.

    Attributes
    ----------
    name
        Cluster name (the directory name).
    pid
        Process id of the head process.
    inventory
        Absolute path of the inventory the cluster was started from.
    phase
        ``starting``, ``running`` or ``failed``.
    cluster_id
        The cluster's unique id (also the marker in remote processes' environment).
    scheduler_address, dashboard_link
        Where to reach the cluster, once it runs.
    started
        ISO time the head started.
    hosts
        Inventory host name to address.
    tls
        Whether the cluster uses TLS.
    client_config
        Path of the dask config snippet for clients.
    error, error_exit
        Why a start failed, and the exit status it calls for.
    summary
        Hosts up, workers running and missing hosts when the start ended
        (see :func:`speccluster_ssh.reporting.summarize`).
    scheduler_reach
        Where the scheduler runs and how the head reaches it
        (:meth:`speccluster_ssh.reach.ReachChoice.as_dict`), once it runs.
    up_options
        The options of ``up`` (:class:`speccluster_ssh.head.UpOptions` as a
        dict), with ``workers`` and ``adapt`` kept current by ``scale`` and
        ``adapt``; ``None`` in files of versions that did not record them.
        ``up`` again compares its own options with these.
    inventory_fingerprint
        :func:`speccluster_ssh.planning.inventory_fingerprint` of the
        inventory in effect; ``""`` when unknown.
    """

    name: str
    pid: int = 0
    inventory: str = ""
    phase: str = "starting"
    cluster_id: str = ""
    scheduler_address: str = ""
    dashboard_link: str = ""
    started: str = field(default_factory=now_iso)
    hosts: dict[str, str] = field(default_factory=dict)
    tls: bool = True
    client_config: str = ""
    error: str = ""
    error_exit: int = 1
    summary: dict[str, Any] = field(default_factory=dict)
    scheduler_reach: dict[str, Any] | None = None
    up_options: dict[str, Any] | None = None
    inventory_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str) -> ClusterState:
        """Build from parsed JSON, ignoring unknown keys (files from newer versions)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["name"] = name
        return cls(**values)


def write_state(directory: Path, state: ClusterState) -> None:
    """Write ``state.json`` of a cluster directory atomically (0600)."""
    write_private(directory / STATE_FILE, json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n")


def read_state(directory: Path) -> ClusterState | None:
    """Read ``state.json``; ``None`` when the directory is not a cluster's.

    A damaged file gives a state with phase ``unknown``, so that the cluster
    still shows up (as stale) and ``down`` can remove it.
    """
    path = directory / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        if (directory / LOCK_FILE).exists():
            return ClusterState(name=directory.name, phase="unknown")
        return None
    except OSError:
        return ClusterState(name=directory.name, phase="unknown")
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return ClusterState.from_dict(data, directory.name)
    except (ValueError, TypeError):
        return ClusterState(name=directory.name, phase="unknown")


# -- liveness -------------------------------------------------------------------------


class HeadLock:
    """The ``flock`` that marks a cluster's head process as alive.

    The lock belongs to the open file, so it can be handed to a child
    process (``pass_fds``) without ever being released in between.

    Parameters
    ----------
    directory
        The cluster directory.
    fd
        An already locked descriptor (in a detached head, inherited from ``up``).
    """

    def __init__(self, directory: Path, fd: int | None = None) -> None:
        self.directory = directory
        self.fd = fd

    def acquire(self) -> bool:
        """Take the lock; ``False`` when another live head holds it."""
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        """Close the descriptor (the lock goes with the last copy of it)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def head_alive(directory: Path) -> bool:
    """Whether some process holds the cluster's head lock."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process, but it exists


@dataclass
class KnownCluster:
    """A cluster found in the state dir, with whether its head is alive."""

    state: ClusterState
    directory: Path
    alive: bool

    @property
    def status(self) -> str:
        """``running``, ``starting`` or ``stale`` (the head is gone)."""
        if not self.alive:
            return "stale"
        return "running" if self.state.phase == "running" else self.state.phase


def known_clusters() -> list[KnownCluster]:
    """Every cluster in the state dir, sorted by name."""
    root = state_root()
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    found: list[KnownCluster] = []
    for entry in entries:
        # The root also holds known_hosts of accept-new; only directories are clusters.
        if not entry.is_dir() or entry.is_symlink() or not _NAME_RE.match(entry.name):
            continue
        state = read_state(entry)
        if state is None:
            continue
        found.append(KnownCluster(state, entry, head_alive(entry)))
    return found


def running_clusters() -> Iterator[ClusterState]:
    """States of the clusters whose head process is alive and serving."""
    for known in known_clusters():
        if known.alive and known.state.phase == "running":
            yield known.state


# -- client files ---------------------------------------------------------------


def write_client_files(directory: Path, scheduler_address: str, security: Any | None) -> Path:
    """Write what a client needs to connect, and return the path of ``client.yaml``.

    Parameters
    ----------
    directory
        The cluster directory.
    scheduler_address
        Address clients connect to.
    security
        The cluster's ``distributed.Security`` holding PEM strings, or
        ``None``/a plain one for a cluster without TLS.
    """
    import yaml

    config: dict[str, Any] = {"scheduler-address": scheduler_address}
    ca = getattr(security, "tls_ca_file", None) if security is not None else None
    if ca and security is not None:
        parts = {
            CA_FILE: security.tls_ca_file,
            CLIENT_CERT: security.tls_client_cert,
            CLIENT_KEY: security.tls_client_key,
        }
        for filename, pem in parts.items():
            write_private(directory / filename, _pem_text(pem))
        config["distributed"] = {
            "comm": {
                "require-encryption": True,
                "tls": {
                    "ca-file": str(directory / CA_FILE),
                    "client": {"cert": str(directory / CLIENT_CERT), "key": str(directory / CLIENT_KEY)},
                },
            }
        }
    header = (
        "# dask config for clients of this cluster; use it with\n"
        f"#   DASK_CONFIG={directory / CLIENT_CONFIG} python -c 'from distributed import Client; Client()'\n"
    )
    path = directory / CLIENT_CONFIG
    write_private(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def _pem_text(value: Any) -> str:
    # distributed.Security accepts either file paths or PEM text; we were given PEM text.
    text = value.decode() if isinstance(value, bytes) else str(value)
    if "-----BEGIN" not in text and os.path.exists(text):
        return Path(text).read_text()
    return text


def client_snippet(state: ClusterState, directory: Path) -> str:
    """Python source that connects a ``Client`` to the cluster."""
    address = state.scheduler_address
    if state.tls:
        return (
            "from distributed import Client\n"
            "from distributed.security import Security\n\n"
            "security = Security(\n"
            f"    tls_ca_file={str(directory / CA_FILE)!r},\n"
            f"    tls_client_cert={str(directory / CLIENT_CERT)!r},\n"
            f"    tls_client_key={str(directory / CLIENT_KEY)!r},\n"
            "    require_encryption=True,\n"
            ")\n"
            f"client = Client({address!r}, security=security)\n"
        )
    return f"from distributed import Client\n\nclient = Client({address!r})\n"


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` is gone (or a zombie); ``False`` on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while pid_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    return True

