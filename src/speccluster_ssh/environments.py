"""The head's side of shipped environments (``speccluster_environment: head``): what to install, and its wheels.

- :func:`resolve_pins` lists what a host's environment holds: the head's own
  ``distributed``, ``dask`` and their dependencies at the head's versions, plus
  the packages the inventory names (``speccluster_packages``,
  ``speccluster_requirements``).
- :func:`fingerprint` names that set for one :class:`EnvTarget` (python minor,
  machine, libc); the name is used everywhere: the head's cache, the host's
  environment directory.
- :func:`build_wheelhouse` gathers the wheels once per fingerprint into the
  head's cache (``$XDG_CACHE_HOME/speccluster-ssh/wheelhouse/<fingerprint>``),
  atomically and under a lock, and checks a cached one before handing it out.
  It blocks: call it in a thread.
- :func:`describe_need` is the phrase ``check`` and ``plan`` show.

The wheels themselves are made by :mod:`speccluster_ssh.wheelbuild`. Nothing
here talks to a host; shipping and building on the host is ``pool``'s part.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from . import wheelbuild
from .errors import UserError
from .wheelbuild import WheelhouseError

if TYPE_CHECKING:
    from .inventory import HostSpec

__all__ = [
    "EnvRequest",
    "EnvTarget",
    "WheelFile",
    "Wheelhouse",
    "WheelhouseError",
    "build_wheelhouse",
    "cached_wheelhouse",
    "default_cache_dir",
    "describe_need",
    "fingerprint",
    "prune_cache",
    "resolve_pins",
]

logger = logging.getLogger(__name__)

ROOTS = ("distributed", "dask")
# Never shipped as dependencies: this package runs on the head only, and the host's venv brings its own pip.
# (setuptools and wheel are never walked to unless a package requires them, and then the host needs them too.)
HEAD_ONLY = frozenset({"speccluster-ssh", "pip"})
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
MAX_UNUSED = 30 * 86400.0  # seconds a wheelhouse of the head's cache is kept unused
_STALE = 86400.0  # a scratch directory this old belongs to a build that died
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class EnvTarget:
    """The platform of a host's environment, as the host reported it.

    Attributes
    ----------
    python
        Python minor version, e.g. ``"3.11"``.
    machine
        ``platform.machine()``, e.g. ``"x86_64"``.
    libc
        ``platform.libc_ver()`` joined by a space, e.g. ``"glibc 2.36"``; empty when unknown.
    """

    python: str
    machine: str
    libc: str = ""

    @classmethod
    def of_head(cls) -> EnvTarget:
        """The head's own platform."""
        return cls(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine(),
                   " ".join(part for part in platform.libc_ver() if part))

    @classmethod
    def parse(cls, python: str, machine: str, libc: str | Iterable[str] = "") -> EnvTarget:
        """A target from what a host reports, in the spelling :meth:`of_head` uses.

        Parameters
        ----------
        python
            ``platform.python_version()`` (``"3.11.7"``) or the minor (``"3.11"``).
        machine
            ``platform.machine()``.
        libc
            ``platform.libc_ver()`` as a pair (``("glibc", "2.36")``) or joined by a space.
        """
        minor = ".".join(str(python).strip().split(".")[:2])
        parts = libc.split() if isinstance(libc, str) else [str(part) for part in libc]
        return cls(minor, str(machine).strip(), " ".join(part for part in parts if part))

    def describe(self) -> str:
        """E.g. ``python 3.11 on x86_64 (glibc 2.36)``."""
        return f"python {self.python} on {self.machine}" + (f" ({self.libc})" if self.libc else "")


@dataclass(frozen=True)
class EnvRequest:
    """What one host's inventory asks to add to the head's ``distributed``.

    Attributes
    ----------
    packages
        Requirement strings (``speccluster_packages``).
    requirements_file
        A requirements file on the head (``speccluster_requirements``).
    """

    packages: tuple[str, ...] = ()
    requirements_file: str | None = None

    @classmethod
    def from_host(cls, spec: HostSpec) -> EnvRequest:
        """The request of one inventory host (its ``speccluster_packages`` and ``speccluster_requirements``)."""
        return cls(tuple(spec.packages), spec.requirements)


@dataclass(frozen=True)
class WheelFile:
    """One wheel of a wheelhouse.

    Attributes
    ----------
    filename
        The wheel's file name.
    sha256
        Hex digest of its bytes.
    size
        Its size in bytes.
    path
        Where it is in the head's cache.
    """

    filename: str
    sha256: str
    size: int
    path: Path


@dataclass(frozen=True)
class Wheelhouse:
    """The wheels of one environment, ready in the head's cache.

    Attributes
    ----------
    fingerprint
        Names the environment everywhere.
    target
        The platform the wheels are for.
    pins
        ``name==version`` of every package, what the host installs with ``pip install --no-index``.
    wheels
        The wheel files, sorted by name.
    """

    fingerprint: str
    target: EnvTarget
    pins: tuple[str, ...]
    wheels: tuple[WheelFile, ...]

    @property
    def size(self) -> int:
        """Bytes of all its wheels."""
        return sum(wheel.size for wheel in self.wheels)

    def manifest(self) -> dict[str, Any]:
        """JSON-able description: fingerprint, target, pins and ``[{filename, sha256, size}]``."""
        return {
            "format": MANIFEST_FORMAT,
            "fingerprint": self.fingerprint,
            "target": {"python": self.target.python, "machine": self.target.machine, "libc": self.target.libc},
            "pins": list(self.pins),
            "wheels": [{"filename": w.filename, "sha256": w.sha256, "size": w.size} for w in self.wheels],
        }


# --- what to install -----------------------------------------------------------


def _marker_env(target: EnvTarget) -> dict[str, str]:
    env = dict(default_environment())
    head_minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    env["python_version"] = target.python
    if target.python != head_minor:
        env["python_full_version"] = f"{target.python}.0"
    env["platform_machine"] = target.machine
    return env


def _applies(req: Requirement, env: Mapping[str, str], extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in {"", *extras})


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _parse(text: str, where: str) -> Requirement:
    try:
        return Requirement(text)
    except InvalidRequirement as exc:
        raise UserError(f"{where}: {text!r} is not a requirement ({exc}); write e.g. 'pandas>=2'") from None


def _file_requirements(path: str) -> list[Requirement]:
    """The requirements of a requirements file: one per line, comments and blank lines skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"speccluster_requirements {path}: cannot read it ({exc.strerror or exc}); "
                        "give the path of a requirements file on this machine") from None
    found: list[Requirement] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise UserError(f"{path}:{number}: pip option {line.split()[0]} is not supported here; "
                            "list only requirements such as 'pandas>=2' (options go in pip's own config)")
        found.append(_parse(line, f"{path}:{number}"))
    return found


def resolve_pins(request: EnvRequest, target: EnvTarget) -> tuple[str, ...]:
    """What a host's environment installs: the head's versions where it has them, else the requirement.

    ``distributed`` and ``dask`` (and every requirement of ``request``) are
    followed through their ``Requires-Dist`` recursively, markers evaluated
    for ``target`` (its python version and machine; other markers are the
    head's), extras only where a requirement names them. A package installed
    on the head that satisfies the requirement is pinned to the head's
    version; any other requirement stays as written, for pip to resolve when
    the wheels are gathered.

    Parameters
    ----------
    request
        The inventory's packages and requirements file.
    target
        The host's platform.

    Returns
    -------
    tuple of str
        Sorted: ``name==version`` pins first, then requirement strings.

    Raises
    ------
    UserError
        On a bad requirement or an unreadable requirements file.
    """
    env = _marker_env(target)
    todo: list[tuple[Requirement, bool]] = [(Requirement(name), True) for name in ROOTS]
    todo += [(_parse(text, "speccluster_packages"), False) for text in request.packages]
    if request.requirements_file:
        todo += [(req, False) for req in _file_requirements(request.requirements_file)]
    pinned: dict[str, str] = {}
    walked: dict[str, set[str]] = {}
    loose: set[str] = set()
    while todo:
        req, dependency = todo.pop()
        name = canonicalize_name(req.name)
        if not _applies(req, env, ()) or (dependency and name in HEAD_ONLY):
            continue
        dist = _installed(name)
        if dist is None or not req.specifier.contains(dist.version, prereleases=True):
            req.marker = None  # evaluated above; pip gets the plain requirement
            loose.add(str(req))
            continue
        pinned[name] = f"{name}=={dist.version}"
        extras = {canonicalize_name(e) for e in req.extras}
        first = name not in walked
        done = walked.setdefault(name, set())
        if not first and extras <= done:
            continue  # walked already with these extras
        done.update(extras)
        for text in dist.requires or ():
            sub = Requirement(text)
            if _applies(sub, env, done):
                sub.marker = None
                todo.append((sub, True))
    return tuple(sorted(pinned.values())) + tuple(sorted(loose))


def fingerprint(pins: Iterable[str], target: EnvTarget) -> str:
    """The name of an environment: sha256 of the sorted pins and the target, 16 hex digits.

    Parameters
    ----------
    pins
        From :func:`resolve_pins`.
    target
        The host's platform.
    """
    text = json.dumps({"pins": sorted(pins), "python": target.python, "machine": target.machine,
                       "libc": target.libc}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the head's cache of wheels --------------------------------------------------


class _Broken(Exception):
    """A cached wheelhouse no longer matches its manifest."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/speccluster-ssh/wheelhouse``, else ``~/.cache/speccluster-ssh/wheelhouse``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "speccluster-ssh" / "wheelhouse"


# (path, size, mtime_ns) -> sha256: a wheel is hashed once per process while its file is unchanged
_HASHED: dict[tuple[str, int, int], str] = {}
_HASHED_LOCK = threading.Lock()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked_sha256(path: Path, size: int, mtime_ns: int) -> str:
    key = (str(path), size, mtime_ns)
    with _HASHED_LOCK:
        known = _HASHED.get(key)
    if known is None:
        known = _sha256(path)
        with _HASHED_LOCK:
            _HASHED[key] = known
    return known


def _load(directory: Path, fp: str) -> Wheelhouse | None:
    """The wheelhouse cached in ``directory``, checked against its manifest; ``None`` when there is none.

    Raises ``_Broken`` when a wheel is missing, or its size or sha256 differs from the manifest.
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        if directory.exists():
            raise _Broken(f"{directory} has no {MANIFEST}") from None
        return None
    except (OSError, ValueError) as exc:
        raise _Broken(f"{directory / MANIFEST} cannot be read ({exc})") from None
    try:
        if manifest["format"] != MANIFEST_FORMAT or manifest["fingerprint"] != fp:
            raise _Broken(f"{directory / MANIFEST} is of another format or fingerprint")
        target = EnvTarget(**manifest["target"])
        wheels: list[WheelFile] = []
        for item in manifest["wheels"]:
            path = directory / item["filename"]
            try:
                info = path.stat()
            except OSError:
                raise _Broken(f"{path} is missing") from None
            if info.st_size != item["size"] or _checked_sha256(path, info.st_size, info.st_mtime_ns) != item["sha256"]:
                raise _Broken(f"{path} does not match the sha256 or size of {MANIFEST}")
            wheels.append(WheelFile(item["filename"], item["sha256"], item["size"], path))
        house = Wheelhouse(fp, target, tuple(manifest["pins"]), tuple(wheels))
    except (KeyError, TypeError) as exc:
        raise _Broken(f"{directory / MANIFEST} lacks {exc}") from None
    try:
        os.utime(directory)  # its last use, for prune_cache
    except OSError:
        pass  # a read-only cache still serves
    return house


class _Locked:
    """An exclusive ``flock`` on a file: one builder per fingerprint, across threads, processes and heads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock, waiting for it unless not ``blocking``; whether it was taken."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        """Let go of the lock (closing the file drops it)."""
        fd, self.fd = self.fd, -1
        os.close(fd)

    def __enter__(self) -> _Locked:
        self.acquire()  # blocks while another builds the same fingerprint
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _discard(path: Path) -> None:
    """Move ``path`` out of the way (a rename is atomic), then delete it."""
    if not path.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".broken-{path.name}-", dir=path.parent))
    os.rename(path, aside / "old")
    shutil.rmtree(aside, ignore_errors=True)


def _build(pins: tuple[str, ...], target: EnvTarget, fp: str, root: Path) -> Wheelhouse:
    for stale in root.glob(f".tmp-{fp}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a build that died; we hold the lock, so none runs
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{fp}-", dir=root))
    final = root / fp
    try:
        made: dict[str, str] = {}
        same = target == EnvTarget.of_head()
        platform_args = None if same else (target.python, target.machine, target.libc)
        final_pins = wheelbuild.gather(pins, tmp, made, platform_args, target.describe())
        wheels = tuple(
            WheelFile(path.name, _sha256(path), path.stat().st_size, final / path.name)
            for path in sorted(tmp.glob("*.whl"))
        )
        house = Wheelhouse(fp, target, final_pins, wheels)
        manifest = {**house.manifest(), "made": made, "resolved": list(pins)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return house


def build_wheelhouse(request: EnvRequest, target: EnvTarget, cache_dir: Path | None = None) -> Wheelhouse:
    """The wheelhouse of ``request`` for ``target``: from the head's cache, else built into it.

    Built once per fingerprint: in a temporary directory renamed into place,
    under an exclusive lock (``<fingerprint>.lock``), so two heads or threads
    building the same one build it once. A cached wheelhouse is checked
    against its manifest (each wheel's size and sha256); a broken one is
    removed and built anew. Blocking: run it in a thread.

    Parameters
    ----------
    request
        The inventory's packages.
    target
        The host's platform.
    cache_dir
        The cache; default :func:`default_cache_dir`.

    Returns
    -------
    Wheelhouse

    Raises
    ------
    WheelhouseError
        When pip cannot download a wheel the head cannot repack.
    UserError
        On a bad requirement or an unreadable requirements file.
    """
    pins = resolve_pins(request, target)
    fp = fingerprint(pins, target)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise WheelhouseError(f"cannot create the wheel cache {root} ({exc.strerror or exc})",
                              "make it writable, or set XDG_CACHE_HOME to a writable directory") from None
    try:
        found = _load(root / fp, fp)
        if found is not None:
            return found
    except _Broken:
        pass  # checked again under the lock, then rebuilt
    with _Locked(root / f"{fp}.lock"):
        try:
            found = _load(root / fp, fp)
            if found is not None:
                return found  # another thread or head built it while we waited
        except _Broken as exc:
            logger.warning("the cached wheelhouse %s is broken (%s); building it again", fp, exc)
            _discard(root / fp)
        house = _build(pins, target, fp, root)
    prune_cache(root, keep={fp})
    return house


def cached_wheelhouse(request: EnvRequest, target: EnvTarget, cache_dir: Path | None = None) -> Wheelhouse | None:
    """The wheelhouse if the head's cache holds it intact, else ``None``; never builds (for ``check`` and ``plan``)."""
    pins = resolve_pins(request, target)
    fp = fingerprint(pins, target)
    try:
        return _load((Path(cache_dir) if cache_dir is not None else default_cache_dir()) / fp, fp)
    except _Broken:
        return None


def prune_cache(cache_dir: Path | None = None, max_unused: float = MAX_UNUSED, keep: Iterable[str] = ()) -> list[str]:
    """Remove the head's wheelhouses unused for ``max_unused`` seconds (30 days by default).

    A wheelhouse's directory is touched each time it is loaded; one being
    built or checked (its lock held) is left alone, as are those in ``keep``.

    Returns
    -------
    list of str
        The fingerprints removed.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    keep = set(keep)
    removed: list[str] = []
    now = time.time()
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for path in children:
        try:
            if path.name.startswith(".broken-") or (
                path.name.startswith((".tmp-", ".loose-")) and now - path.stat().st_mtime > _STALE
            ):
                shutil.rmtree(path, ignore_errors=True)  # left by a build or a removal that was cut short
                continue
            if path.name in keep or not _FINGERPRINT.fullmatch(path.name) or now - path.stat().st_mtime < max_unused:
                continue
            lock = _Locked(root / f"{path.name}.lock")
            if lock.acquire(blocking=False):  # else being built or checked right now: keep it
                try:
                    _discard(path)
                finally:
                    lock.release()
                removed.append(path.name)
        except OSError as exc:
            logger.warning("cannot prune the old wheelhouse %s: %s", path, exc.strerror or exc)
    return removed


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def describe_need(wheelhouse: Wheelhouse, host_has: set[str]) -> str:
    """What a host lacking the environment needs, for ``check`` and ``plan``.

    Parameters
    ----------
    wheelhouse
        The environment's wheels.
    host_has
        The wheels the host's store holds already: file names or sha256 digests.

    Returns
    -------
    str
        E.g. ``"missing (it will be built, 12.3 MB to ship)"``.
    """
    missing = [w for w in wheelhouse.wheels if w.filename not in host_has and w.sha256 not in host_has]
    if not missing:
        return "missing (it will be built from the wheels it has, nothing to ship)"
    return f"missing (it will be built, {_megabytes(sum(w.size for w in missing))} to ship)"
