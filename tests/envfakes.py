"""Small stand-ins for the environment tests: tiny wheels made here, a bare python, and a wheelhouse of them.

``make_wheel`` writes a real (pure-python) wheel with zipfile; a wheel
named ``distributed`` lets the host script's ``import distributed`` check
pass without shipping the real thing.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FakeWheel:
    filename: str
    sha256: str
    size: int
    path: Path


@dataclass(frozen=True)
class FakeTarget:
    python: str
    machine: str
    libc: str = ""

    def describe(self) -> str:
        return f"python {self.python} on {self.machine}"


@dataclass(frozen=True)
class FakeWheelhouse:
    fingerprint: str
    target: Any
    pins: tuple[str, ...]
    wheels: tuple[FakeWheel, ...]

    @property
    def size(self) -> int:
        return sum(w.size for w in self.wheels)

    def manifest(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "pins": list(self.pins),
                "wheels": [{"filename": w.filename, "sha256": w.sha256, "size": w.size} for w in self.wheels]}


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(directory: Path, name: str, version: str, files: dict[str, str] | None = None,
               requires: tuple[str, ...] = ()) -> FakeWheel:
    """A pure-python wheel ``name-version-py3-none-any.whl`` holding ``files`` (path -> text)."""
    files = files if files is not None else {f"{name}/__init__.py": f"__version__ = {version!r}\n"}
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    contents = {**files, f"{info}/METADATA": metadata,
                f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: envfakes\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [_record_line(path, text.encode()) for path, text in contents.items()] + [f"{info}/RECORD,,"]
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in contents.items():
            zf.writestr(member, text)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    data = path.read_bytes()
    return FakeWheel(path.name, hashlib.sha256(data).hexdigest(), len(data), path)


def fake_wheelhouse(wheels: list[FakeWheel], pins: tuple[str, ...], target: Any = None) -> FakeWheelhouse:
    digest = hashlib.sha256("\n".join([*pins, *(w.sha256 for w in wheels)]).encode()).hexdigest()[:32]
    target = target or FakeTarget(f"{sys.version_info[0]}.{sys.version_info[1]}", "x86_64")
    return FakeWheelhouse(digest, target, pins, tuple(wheels))


def bare_python(directory: Path) -> str:
    """A venv without pip or site packages: the bare python of a host that has nothing installed."""
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(directory)], check=True)
    return str(directory / "bin" / "python")
