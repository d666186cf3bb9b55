"""Make the wheels of a wheelhouse on the head: repack installed distributions, or ask pip.

Two ways, chosen per package by :func:`gather` (for :mod:`speccluster_ssh.environments`):

- :func:`repack` turns a distribution installed on the head back into a wheel
  (the files its ``RECORD`` lists under site-packages plus its dist-info, with
  a fresh ``RECORD``). No network, so offline heads and tests work; the
  result fits a host whose python minor, machine and libc match the head's,
  or any host when the distribution is pure Python.
- :func:`pip_download_argv` builds the ``pip download`` command line for the
  rest (another platform, editable installs, packages the head lacks) and
  :func:`pip_download` runs it, turning pip's failure into one
  :class:`WheelhouseError`.

Wheels are written reproducibly (sorted entries, fixed timestamps), so the
same installed files give the same bytes and the same sha256.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .errors import SpecClusterError

__all__ = [
    "CannotRepack",
    "WheelhouseError",
    "exact_pin",
    "gather",
    "installed_tags",
    "pip_download",
    "pip_download_argv",
    "platform_tags",
    "repack",
    "wheel_name",
]

logger = logging.getLogger(__name__)

# Written by the installer, not part of a wheel (PEP 376 / 610 / the wheel spec).
_INSTALLER_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "RECORD.jws", "RECORD.p7s"}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip date: same files, same bytes


class WheelhouseError(SpecClusterError):
    """The head cannot gather the wheels of an environment: what failed, pip's tail, and the fix.

    Parameters
    ----------
    reason
        What failed, one line.
    fix
        What the user can change.
    tail
        The last lines of pip's output, when pip ran.
    """

    def __init__(self, reason: str, fix: str, tail: str = "") -> None:
        self.reason = reason
        self.fix = fix
        self.tail = tail
        super().__init__(f"{reason}; {fix}")


class CannotRepack(Exception):
    """An installed distribution cannot be turned back into a wheel (editable, no RECORD, files gone)."""


@dataclass(frozen=True)
class _Entry:
    arcname: str
    source: Path


def _b64_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _dist_info_dir(dist: metadata.Distribution) -> str:
    """The dist-info directory name, relative to site-packages, as the RECORD lists it."""
    for path in dist.files or ():
        parts = PurePosixPath(str(path)).parts
        if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
            return parts[0]
    raise CannotRepack("its RECORD lists no .dist-info/METADATA")


def is_editable(dist: metadata.Distribution) -> bool:
    """Whether the distribution was installed editable (PEP 610 ``direct_url.json``)."""
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        return bool(json.loads(text).get("dir_info", {}).get("editable"))
    except (ValueError, AttributeError):
        return False


def installed_tags(dist: metadata.Distribution) -> tuple[str, ...]:
    """The ``Tag`` lines of the distribution's ``WHEEL`` file (empty when it has none)."""
    text = dist.read_text("WHEEL") or ""
    return tuple(line.split(":", 1)[1].strip() for line in text.splitlines() if line.lower().startswith("tag:"))


def is_pure(tags: Iterable[str]) -> bool:
    """Whether wheel tags say pure Python 3 (``py3-none-any`` and the like)."""
    tags = list(tags)
    return bool(tags) and all(
        tag.split("-")[1:] == ["none", "any"] and tag.split("-")[0] in ("py3", "py2.py3") for tag in tags
    )


def wheel_name(name: str, version: str, tags: Sequence[str]) -> str:
    """The wheel file name for a distribution and its tags, as the wheel spec writes it.

    Parameters
    ----------
    name, version
        The distribution's name and version, normalised here.
    tags
        ``python-abi-platform`` triples; their parts are compressed into
        dotted sets (``cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64``).
    """
    if not tags:
        raise CannotRepack("its WHEEL file has no Tag line")
    parts: list[list[str]] = [[], [], []]
    for tag in tags:
        pieces = tag.split("-")
        if len(pieces) != 3:
            raise CannotRepack(f"its WHEEL file has a bad tag {tag!r}")
        for i, piece in enumerate(pieces):
            for sub in piece.split("."):
                if sub not in parts[i]:
                    parts[i].append(sub)
    try:
        version = str(Version(version))
    except InvalidVersion:
        raise CannotRepack(f"its version {version!r} is not a valid version") from None
    escaped = re.sub(r"[-_.]+", "_", canonicalize_name(name))
    return f"{escaped}-{version.replace('-', '_')}-" + "-".join(".".join(p) for p in parts) + ".whl"


def _entries(dist: metadata.Distribution, info_dir: str) -> list[_Entry]:
    root = Path(dist.locate_file("")).resolve()
    entries: list[_Entry] = []
    for path in dist.files or ():
        posix = PurePosixPath(str(path))
        if ".." in posix.parts or posix.is_absolute():
            continue  # outside site-packages (bin/ scripts, headers): pip makes console scripts anew
        if "__pycache__" in posix.parts or posix.suffix == ".pyc":
            continue  # compiled on the host by pip
        if posix.parts[0] == info_dir and posix.name in _INSTALLER_FILES and len(posix.parts) == 2:
            continue
        source = root / Path(*posix.parts)
        if not source.is_file():
            raise CannotRepack(f"{posix} of its RECORD is missing on the head")
        entries.append(_Entry(str(posix), source))
    return sorted(entries, key=lambda e: e.arcname)


def repack(dist: metadata.Distribution, dest: Path, compresslevel: int = 1) -> Path:
    """Write an installed distribution back into a wheel in ``dest``.

    Parameters
    ----------
    dist
        The installed distribution (from :func:`importlib.metadata.distribution`).
    dest
        Directory of the new wheel.
    compresslevel
        Deflate level of the zip entries: 1 by default, which for pyarrow is
        twice as fast as 6 for 12 % more bytes; the build is on the path of
        a cold start, and the bytes cross a LAN.

    Returns
    -------
    Path
        The wheel written.

    Raises
    ------
    CannotRepack
        When the install is editable, has no ``RECORD`` or ``WHEEL``, or a
        file of its ``RECORD`` is gone.
    """
    if is_editable(dist):
        raise CannotRepack("it is installed editable")
    if dist.files is None:
        raise CannotRepack("it has no RECORD")
    info_dir = _dist_info_dir(dist)
    name = dist.metadata["Name"]
    if not name:
        raise CannotRepack("its METADATA has no Name")
    filename = wheel_name(name, dist.version, installed_tags(dist))
    entries = _entries(dist, info_dir)
    target = dest / filename
    partial = dest / f".{filename}.part"
    record: list[str] = []
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as archive:
        for entry in entries:
            data = entry.source.read_bytes()
            info = zipfile.ZipInfo(entry.arcname, date_time=_ZIP_TIME)
            mode = stat.S_IMODE(entry.source.stat().st_mode) | 0o444
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=compresslevel)
            record.append(f"{entry.arcname},sha256={_b64_digest(data)},{len(data)}")
        record_name = f"{info_dir}/RECORD"
        record.append(f"{record_name},,")
        info = zipfile.ZipInfo(record_name, date_time=_ZIP_TIME)
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        archive.writestr(info, "\n".join(record) + "\n", zipfile.ZIP_DEFLATED, compresslevel)
    os.replace(partial, target)
    return target


def platform_tags(machine: str, libc: str) -> list[str]:
    """The platform tags pip may take for a Linux host: manylinux (glibc) or musllinux, newest first.

    Parameters
    ----------
    machine
        ``platform.machine()`` of the host, e.g. ``x86_64``.
    libc
        ``"glibc 2.36"`` or ``"musl 1.2"`` as the host reported it; empty for unknown.
    """
    arch = machine.replace("-", "_").replace(".", "_")
    match = re.fullmatch(r"(glibc|musl)\s+(\d+)\.(\d+).*", libc.strip())
    tags: list[str] = []
    if match and match.group(1) == "glibc" and match.group(2) == "2":
        # manylinux_2_17 is the floor of the wheels built today; older aliases kept for old wheels
        for minor in range(int(match.group(3)), 4, -1):
            tags.append(f"manylinux_2_{minor}_{arch}")
            alias = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
            if alias:
                tags.append(f"{alias}_{arch}")
    elif match and match.group(1) == "musl":
        for minor in range(int(match.group(3)), -1, -1):
            tags.append(f"musllinux_{match.group(2)}_{minor}_{arch}")
    tags.append(f"linux_{arch}")
    return tags


def pip_download_argv(
    python: str,
    dest: Path,
    requirements: Sequence[str],
    target: tuple[str, str, str] | None = None,
    *,
    no_deps: bool = True,
    constraints: Path | None = None,
    find_links: Sequence[Path] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``pip download`` command line (a list, never a shell line) for binary wheels.

    Parameters
    ----------
    python
        The head's interpreter (``sys.executable``).
    dest
        Where pip puts the wheels.
    requirements
        Requirement strings, each one argument.
    target
        ``(python minor, machine, libc)`` of another platform, which adds
        ``--platform``, ``--python-version``, ``--implementation`` and
        ``--abi``; ``None`` for the head's own.
    no_deps
        Download only the named requirements (pins), not their dependencies.
    constraints
        A constraints file (the pins) for a download with dependencies.
    find_links
        Directories pip looks in before the index (wheels made already).
    extra
        More pip options (tests pass ``--no-index``).
    """
    argv = [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
            "--only-binary=:all:", "--dest", str(dest)]
    if no_deps:
        argv.append("--no-deps")
    if target is not None:
        minor, machine, libc = target
        digits = minor.replace(".", "")
        for tag in platform_tags(machine, libc):
            argv += ["--platform", tag]
        argv += ["--python-version", minor, "--implementation", "cp"]
        for abi in (f"cp{digits}", "abi3", "none"):
            argv += ["--abi", abi]
    if constraints is not None:
        argv += ["--constraint", str(constraints)]
    for directory in find_links:
        argv += ["--find-links", str(directory)]
    argv += list(extra)
    argv.append("--")
    argv += list(requirements)
    return argv


def _error_lines(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors[0] if errors else (lines[-1] if lines else "no output")).removeprefix("ERROR:").strip()


def pip_download(argv: list[str], what: str, timeout: float = 1800.0) -> None:
    """Run a :func:`pip_download_argv` command line; a failure becomes one :class:`WheelhouseError`.

    Parameters
    ----------
    argv
        The command line.
    what
        What is being downloaded, for the message (``"3 wheels for python 3.11 on aarch64"``).
    timeout
        Seconds before pip is given up.
    """
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise WheelhouseError(f"pip download of {what} took longer than {timeout:.0f} s",
                              "check the head's network and its pip index, then try again") from None
    except OSError as exc:
        raise WheelhouseError(f"cannot run pip on the head ({exc.strerror or exc})",
                              f"install pip for {sys.executable}") from None
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-20:])
        raise WheelhouseError(
            f"pip could not download {what}: {_error_lines(done.stdout)}",
            "let the head reach a package index that has these wheels (pip's own config: index-url, find-links), "
            "or use speccluster_environment: host for these hosts",
            tail,
        )


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def exact_pin(pin: str) -> tuple[str, str] | None:
    """``(name, version)`` of a ``name==version`` pin; ``None`` for any other requirement."""
    name, sep, version = pin.partition("==")
    return (name, version) if sep and not any(c in version for c in "=<>!~,; ") else None


def gather(
    pins: Sequence[str], dest: Path, made: dict[str, str], platform_args: tuple[str, str, str] | None, what: str
) -> tuple[str, ...]:
    """Put the wheels of ``pins`` into ``dest``: repacked where the head can, else from pip.

    Parameters
    ----------
    pins
        ``name==version`` pins and requirement strings (see
        :func:`speccluster_ssh.environments.resolve_pins`).
    dest
        The directory of the wheels; pip's scratch goes beside it.
    made
        Filled with wheel file name -> ``"repacked"`` or ``"pip"``.
    platform_args
        ``(python minor, machine, libc)`` of a host unlike the head; ``None`` for the head's own platform.
    what
        The platform, for messages (``python 3.11 on x86_64 (glibc 2.36)``).

    Returns
    -------
    tuple of str
        The final pins, sorted: requirement strings replaced by the exact versions pip chose.
    """
    same = platform_args is None
    exact: dict[str, str] = {}
    loose: list[str] = []
    repackable: dict[str, metadata.Distribution] = {}
    for pin in pins:
        parsed = exact_pin(pin)
        if parsed is None:
            loose.append(pin)
            continue
        name, version = parsed
        exact[canonicalize_name(name)] = pin
        dist = _installed(name)
        if dist is not None and dist.version == version and (same or is_pure(installed_tags(dist))):
            repackable[pin] = dist
    need_pip = [pin for pin in exact.values() if pin not in repackable]

    def one(pin: str) -> None:
        try:
            made[repack(repackable[pin], dest).name] = "repacked"
        except CannotRepack as exc:
            logger.info("%s cannot be repacked (%s); pip downloads it", pin, exc)
            need_pip.append(pin)

    # zlib lets go of the GIL while it compresses, so big wheels are made side by side
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="repack") as pool:
        for future in [pool.submit(one, pin) for pin in sorted(repackable)]:
            future.result()
    if need_pip:
        need_pip.sort()
        before = set(os.listdir(dest))
        listed = ", ".join(need_pip[:3]) + (", ..." if len(need_pip) > 3 else "")
        pip_download(
            pip_download_argv(sys.executable, dest, need_pip, platform_args),
            f"{len(need_pip)} wheels for {what} ({listed})",
        )
        made.update({name: "pip" for name in set(os.listdir(dest)) - before})
    if loose:
        with tempfile.TemporaryDirectory(prefix=".loose-", dir=dest.parent) as scratch:
            constraints = Path(scratch) / "constraints.txt"
            constraints.write_text("".join(pin + "\n" for pin in exact.values()))
            download = Path(scratch) / "wheels"
            pip_download(
                pip_download_argv(sys.executable, download, loose, platform_args, no_deps=False,
                                             constraints=constraints, find_links=[dest]),
                f"{', '.join(loose)} for {what}",
            )
            for wheel in sorted(download.glob("*.whl")):
                name, version, _, _ = parse_wheel_filename(wheel.name)
                if name not in exact:
                    exact[name] = f"{name}=={version}"
                    os.replace(wheel, dest / wheel.name)
                    made[wheel.name] = "pip"
    return tuple(sorted(exact.values()))
