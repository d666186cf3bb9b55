"""The local inventory and the playbooks ship inside the package, and the
packaged local inventory can show scale and adapt (local agent, no lab).

In the checkout, ``src/speccluster_ssh/data/`` holds symlinks to the
top-level ``inventories/local.yml`` and ``playbooks/``, the one source of
truth; sdist and wheel builds copy their contents (.ci/run's wheel stage
checks the archives, tests/test_wheel.py the installed wheel).
"""

from __future__ import annotations

import asyncio
import fnmatch
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from distributed import Client

from speccluster_ssh import SSHSpecCluster, resources
from speccluster_ssh.errors import SpecClusterError
from speccluster_ssh.inventory import load_inventory

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "src" / "speccluster_ssh" / "data"
CLI = [sys.executable, "-m", "speccluster_ssh.cli"]


def test_packaged_files_are_the_top_level_files() -> None:
    assert resources.local_inventory().read_bytes() == (REPO / "inventories" / "local.yml").read_bytes()
    top = sorted(p.name for p in (REPO / "playbooks").iterdir() if p.is_file())
    packaged = sorted(p.name for p in resources.playbooks_dir().iterdir() if p.is_file())
    assert packaged == top, "every file of playbooks/ needs a symlink in src/speccluster_ssh/data/playbooks/"
    for name in top:
        assert (resources.playbooks_dir() / name).read_bytes() == (REPO / "playbooks" / name).read_bytes(), name


def test_checkout_data_are_symlinks_to_the_top_level() -> None:
    """One source of truth: a copy in data/ instead of a symlink would drift."""
    if not DATA.is_dir():
        pytest.skip("no source checkout beside the tests")  # never the case in this repository's CI
    entries = [DATA / "local.yml", *sorted((DATA / "playbooks").iterdir())]
    for entry in entries:
        assert entry.is_symlink(), f"{entry} must be a symlink to the top-level file"
        target = entry.resolve()
        assert target.parent in (REPO / "inventories", REPO / "playbooks"), (entry, target)


def test_package_data_globs_cover_every_packaged_file() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["speccluster_ssh"]
    package = REPO / "src" / "speccluster_ssh"
    for entry in [DATA / "local.yml", *sorted((DATA / "playbooks").iterdir())]:
        relative = entry.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, glob) for glob in globs), f"{relative} is not package data"


def test_zip_import_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported from a zip, the data are no files other programs can open: say so."""
    archive = tmp_path / "speccluster_ssh.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("speccluster_ssh/data/local.yml", "all: {}\n")
        zf.writestr("speccluster_ssh/data/playbooks/check.yml", "[]\n")
    monkeypatch.setattr(resources.resources, "files", lambda _package: zipfile.Path(archive, "speccluster_ssh/"))
    for func in (resources.local_inventory, resources.playbooks_dir):
        with pytest.raises(SpecClusterError, match="imported from an archive.*install it with pip"):
            func()


def test_local_inventory_has_four_single_worker_slots() -> None:
    """The shape the Quick start relies on: scale 1..4 in steps of one worker."""
    inventory = load_inventory(resources.local_inventory())
    (host,) = inventory.hosts.values()
    assert (host.slots, host.nworkers, host.nthreads) == (4, 1, 1)
    # A stated limit: four "auto" workers on a 2-core machine would be promised twice its memory.
    assert isinstance(host.memory_limit, int) and host.memory_limit <= 2**30
    raw = yaml.safe_load(resources.local_inventory().read_text())
    assert raw["all"]["hosts"]["localhost"]["ansible_connection"] == "local"


def test_playbooks_command_prints_and_copies(tmp_path: Path) -> None:
    printed = subprocess.run([*CLI, "playbooks"], capture_output=True, text=True, timeout=60, check=True)
    where = Path(printed.stdout.strip())
    assert where == resources.playbooks_dir() and (where / "provision.yml").is_file()

    dest = tmp_path / "pb"
    subprocess.run([*CLI, "playbooks", "--copy", str(dest)], capture_output=True, text=True, timeout=60, check=True)
    copied = sorted(p.name for p in dest.iterdir())
    assert copied == sorted(p.name for p in where.iterdir())
    assert not any(p.is_symlink() for p in dest.iterdir()), "copies must be plain files"
    assert (dest / "check.yml").read_bytes() == (where / "check.yml").read_bytes()

    again = subprocess.run([*CLI, "playbooks", "--copy", str(dest)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    (dest / "check.yml").write_text("edited\n")
    forced = subprocess.run([*CLI, "playbooks", "--copy", str(dest), "--force"], capture_output=True, timeout=60)
    assert forced.returncode == 0 and (dest / "check.yml").read_bytes() == (where / "check.yml").read_bytes()

    a_file = tmp_path / "file"
    a_file.write_text("")
    bad = subprocess.run([*CLI, "playbooks", "--copy", str(a_file)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a directory" in bad.stderr


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


def test_packaged_local_inventory_scales_and_adapts() -> None:
    """scale(1), scale(4) and adapt(minimum=1, maximum=4) reach the numbers asked."""

    async def main() -> None:
        async with SSHSpecCluster.from_inventory(
            resources.local_inventory(), n_workers=1, asynchronous=True
        ) as cluster:
            async with Client(cluster, asynchronous=True) as client:

                def running() -> int:
                    return len(cluster.scheduler_info.get("workers", {}))

                await _until(lambda: running() == 1, 120, "1 worker at start")
                cluster.scale(4)
                await client.wait_for_workers(4, timeout=180)
                await _until(lambda: running() == 4, 30, "4 workers after scale(4)")
                cluster.scale(1)
                await _until(lambda: running() == 1 and len(cluster.worker_spec) == 1, 120,
                             "1 worker after scale(1)")

                cluster.adapt(minimum=1, maximum=4, interval="200ms", wait_count=2)
                # 40 one-second tasks of unknown duration: the scheduler's target is past 4,
                # capped at the maximum.
                def slow(x: int) -> int:  # defined here: pickled by value, the workers can't import tests/
                    time.sleep(1.0)
                    return x

                futures = client.map(slow, range(40), pure=False)
                await _until(lambda: running() == 4, 180, "adapt to grow to its maximum of 4")
                assert len(cluster.worker_spec) == 4  # never past the maximum
                assert sum(await client.gather(futures)) == sum(range(40))
                del futures
                await _until(lambda: running() == 1 and len(cluster.worker_spec) == 1, 120,
                             "adapt to shrink back to its minimum of 1")

    asyncio.run(asyncio.wait_for(main(), 600))
