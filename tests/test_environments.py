"""Unit tests of the head's side of shipped environments: pins, fingerprint, wheels, the cache (issue 24).

No test reaches a package index: wheels are repacked from the head's own
installs, and pip download is tested by its command line and by its failure
with ``--no-index`` and an empty find-links directory.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import venv
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

import speccluster_ssh.environments as environments
from speccluster_ssh import wheelbuild
from speccluster_ssh.environments import (
    EnvRequest,
    EnvTarget,
    WheelFile,
    Wheelhouse,
    WheelhouseError,
    build_wheelhouse,
    cached_wheelhouse,
    describe_need,
    fingerprint,
    resolve_pins,
)
from speccluster_ssh.envstate import DEFAULT_ENV_DIR, describe_state, plan_environments
from speccluster_ssh.errors import UserError
from speccluster_ssh.inventory import InventoryError, load_inventory

HEAD = EnvTarget.of_head()


def pin_names(pins: tuple[str, ...]) -> dict[str, str]:
    return {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pins if "==" in p}


def clean_pip_env() -> dict[str, str]:
    """The environment for a pip that must see no index, find-links or constraint from this machine's config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture
def no_pip_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


# -- pins ----------------------------------------------------------------------------------------


def test_pins_for_the_head_are_its_own_versions() -> None:
    pins = resolve_pins(EnvRequest(), HEAD)
    names = pin_names(pins)
    assert names["distributed"] == metadata.version("distributed")
    assert names["dask"] == metadata.version("dask")
    assert len(names) == len(pins), "everything distributed needs is installed on the head, so all are pinned"
    for text in metadata.requires("distributed") or ():
        if "extra ==" not in text:
            name = canonicalize_name(Requirement(text).name)
            assert name in names, f"{name}, a requirement of distributed, is not pinned"
    for head_only in ("speccluster-ssh", "pip", "setuptools", "wheel"):
        assert head_only not in names
    assert pins == resolve_pins(EnvRequest(), HEAD)


class FakeDist:
    def __init__(self, version: str, requires: list[str]) -> None:
        self.version = version
        self.requires = requires


def test_markers_are_evaluated_for_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = {
        "distributed": FakeDist("1.0", ["a>=1", "b; python_version < '3.12'", "d[x]", "pip", "setuptools>=60"]),
        "dask": FakeDist("1.0", ["c; extra == 'y'"]),  # an extra nobody names
        "a": FakeDist("2.0", []),
        "b": FakeDist("3.0", []),
        "c": FakeDist("4.0", []),
        "d": FakeDist("5.0", ["c; extra == 'x'", "e; platform_machine == 'aarch64'", "d[z]; extra == 'x'",
                              "f; extra == 'z'"]),
        "e": FakeDist("6.0", []),
        "f": FakeDist("7.0", []),
        "pip": FakeDist("24.0", []),
        "setuptools": FakeDist("80.0", []),
    }
    monkeypatch.setattr(environments, "_installed", lambda name: fakes.get(canonicalize_name(name)))
    x86 = resolve_pins(EnvRequest(), EnvTarget("3.11", "x86_64", "glibc 2.36"))
    # pip is the venv's own; setuptools, required, is shipped like any package
    assert x86 == ("a==2.0", "b==3.0", "c==4.0", "d==5.0", "dask==1.0", "distributed==1.0", "f==7.0",
                   "setuptools==80.0")
    arm = resolve_pins(EnvRequest(), EnvTarget("3.12", "aarch64", "glibc 2.36"))
    assert arm == ("a==2.0", "c==4.0", "d==5.0", "dask==1.0", "distributed==1.0", "e==6.0", "f==7.0",
                   "setuptools==80.0")


def test_user_packages_are_pinned_when_the_head_has_them(tmp_path: Path) -> None:
    pins = resolve_pins(EnvRequest(("pandas", "no-such-package-here>=1")), HEAD)
    names = pin_names(pins)
    assert names["pandas"] == metadata.version("pandas")
    assert "numpy" in names and "python-dateutil" in names  # pandas's own requirements, walked
    assert "no-such-package-here>=1" in pins  # left to pip
    # a version the head does not have stays a requirement, and is not walked
    pins = resolve_pins(EnvRequest(("pandas<1",)), HEAD)
    assert "pandas<1" in pins and "pandas" not in pin_names(pins)
    # the requirements file adds its lines, and a marker false for the target drops one
    requirements = tmp_path / "req.txt"
    requirements.write_text("# comment\n\npyarrow  # the columnar one\nnumpy; python_version < '3.0'\n")
    pins = resolve_pins(EnvRequest(requirements_file=str(requirements)), HEAD)
    assert pin_names(pins)["pyarrow"] == metadata.version("pyarrow")
    assert "numpy" not in pin_names(pins)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (EnvRequest(("pandas>>2",)), "'pandas>>2' is not a requirement"),
        (EnvRequest(requirements_file="/nonexistent/req.txt"), "cannot read it"),
    ],
)
def test_bad_requests_are_user_errors(request_: EnvRequest, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_pins(request_, HEAD)


def test_pip_options_in_a_requirements_file_are_refused(tmp_path: Path) -> None:
    requirements = tmp_path / "req.txt"
    requirements.write_text("pandas\n--index-url http://example.invalid/\n")
    with pytest.raises(UserError, match=r"req.txt:2: pip option --index-url is not supported"):
        resolve_pins(EnvRequest(requirements_file=str(requirements)), HEAD)


def test_targets_from_host_reports_match_the_head() -> None:
    import platform

    assert EnvTarget.parse(platform.python_version(), platform.machine(), platform.libc_ver()) == HEAD
    assert EnvTarget.parse("3.12.1", "aarch64", ("glibc", "2.28")) == EnvTarget("3.12", "aarch64", "glibc 2.28")
    assert EnvTarget.parse("3.12", "x86_64", ("", "")) == EnvTarget("3.12", "x86_64", "")
    assert EnvTarget("3.12", "aarch64", "glibc 2.28").describe() == "python 3.12 on aarch64 (glibc 2.28)"


# -- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_each_input() -> None:
    pins = ("a==1", "b==2")
    target = EnvTarget("3.11", "x86_64", "glibc 2.36")
    first = fingerprint(pins, target)
    assert len(first) == 16 and int(first, 16) >= 0
    assert fingerprint(tuple(reversed(pins)), EnvTarget("3.11", "x86_64", "glibc 2.36")) == first
    others = [
        fingerprint(("a==1", "b==3"), target),
        fingerprint(("a==1",), target),
        fingerprint(pins, EnvTarget("3.12", "x86_64", "glibc 2.36")),
        fingerprint(pins, EnvTarget("3.11", "aarch64", "glibc 2.36")),
        fingerprint(pins, EnvTarget("3.11", "x86_64", "glibc 2.31")),
    ]
    assert len({first, *others}) == 6


# -- repacked wheels -----------------------------------------------------------------------------


def check_record(wheel: Path) -> None:
    """Every file of the wheel is in its RECORD with the right sha256 and size, and nothing else is."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(archive.read(record_name).decode())))
        assert {row[0] for row in rows} == names
        for path, digest, size in rows:
            if path == record_name:
                assert digest == size == ""
                continue
            data = archive.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(data), path
        assert not any("__pycache__" in n or n.endswith((".pyc", "/INSTALLER", "/direct_url.json")) for n in names)


def dateutil_requirements() -> list[str]:
    """What python-dateutil needs here (six, or tzdata): pip resolves them among the repacked wheels."""
    needed = [Requirement(text) for text in metadata.requires("python-dateutil") or ()]
    return [canonicalize_name(r.name) for r in needed if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_repacked_wheels_install_offline_into_a_fresh_venv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = ["toolz", "msgpack", "python-dateutil", *dateutil_requirements()]
    made = [wheelbuild.repack(metadata.distribution(name), wheels) for name in names]
    for wheel in made:
        check_record(wheel)
        name, version, _, tags = parse_wheel_filename(wheel.name)
        assert str(version) == metadata.version(str(name))
        assert all(f"{t.interpreter}-{t.abi}-{t.platform}" in wheelbuild.installed_tags(metadata.distribution(name))
                   for t in tags)
    assert made[2].name.startswith("python_dateutil-")
    # the same installed files give the same bytes
    again = tmp_path / "again"
    again.mkdir()
    assert wheelbuild.repack(metadata.distribution("toolz"), again).read_bytes() == made[0].read_bytes()

    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)  # no system site-packages: only what pip puts there
    python = target / "bin" / "python"
    pins = [f"{n}=={metadata.version(n)}" for n in names]
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
                    "--find-links", str(wheels), *pins], env=clean_pip_env(), check=True, timeout=120)
    out = subprocess.run(
        [str(python), "-c", "import toolz, msgpack, msgpack._cmsgpack, dateutil; "
                            "print(msgpack.unpackb(msgpack.packb([1, 'x'])), msgpack.__file__)"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert out.startswith("[1, 'x'] " + str(target))


def test_editable_installs_cannot_be_repacked(tmp_path: Path) -> None:
    dist = metadata.distribution("speccluster-ssh")  # the tests run on an editable install
    if not wheelbuild.is_editable(dist):
        pytest.skip("speccluster-ssh is not installed editable here")
    with pytest.raises(wheelbuild.CannotRepack, match="editable"):
        wheelbuild.repack(dist, tmp_path)


def test_wheel_name_compresses_tags_and_normalises_the_name() -> None:
    tags = ["cp311-cp311-manylinux_2_17_x86_64", "cp311-cp311-manylinux2014_x86_64"]
    assert wheelbuild.wheel_name("Foo.Bar-baz", "1.0.post1", tags) == (
        "foo_bar_baz-1.0.post1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    )
    assert wheelbuild.wheel_name("six", "1.17", ["py2-none-any", "py3-none-any"]) == "six-1.17-py2.py3-none-any.whl"
    with pytest.raises(wheelbuild.CannotRepack):
        wheelbuild.wheel_name("x", "1", [])


# -- pip download (never run against an index here) -----------------------------------------------


def test_pip_download_argv_for_another_platform(tmp_path: Path) -> None:
    argv = wheelbuild.pip_download_argv("/py", tmp_path, ["numpy==2.0", "--evil"], ("3.12", "aarch64", "glibc 2.28"))
    assert argv[:4] == ["/py", "-m", "pip", "download"]
    assert "--only-binary=:all:" in argv and "--no-deps" in argv
    assert argv[argv.index("--dest") + 1] == str(tmp_path)
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert platforms[0] == "manylinux_2_28_aarch64"
    assert {"manylinux_2_17_aarch64", "manylinux2014_aarch64"} <= set(platforms)
    assert not any("x86_64" in p or p.startswith("manylinux_2_29") for p in platforms)
    assert argv[argv.index("--python-version") + 1] == "3.12"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--abi"] == ["cp312", "abi3", "none"]
    assert argv[-3:] == ["--", "numpy==2.0", "--evil"]  # requirements can never be read as options
    native = wheelbuild.pip_download_argv("/py", tmp_path, ["a"], None, no_deps=False,
                                          constraints=tmp_path / "c.txt", find_links=[tmp_path])
    assert "--platform" not in native and "--no-deps" not in native
    assert native[native.index("--constraint") + 1] == str(tmp_path / "c.txt")
    assert wheelbuild.platform_tags("x86_64", "musl 1.2")[:2] == ["musllinux_1_2_x86_64", "musllinux_1_1_x86_64"]
    assert wheelbuild.platform_tags("x86_64", "") == ["linux_x86_64"]


def test_pip_download_failure_is_one_clear_error(tmp_path: Path, no_pip_config: None) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = wheelbuild.pip_download_argv(sys.executable, tmp_path / "out", ["toolz==1.2.0"],
                                        extra=["--no-index", "--find-links", str(empty)])
    with pytest.raises(WheelhouseError) as caught:
        wheelbuild.pip_download(argv, "toolz for python 3.11")
    text = str(caught.value)
    assert "\n" not in text and "pip could not download toolz for python 3.11" in text
    assert "toolz" in caught.value.reason and "Traceback" not in text
    assert "package index" in caught.value.fix and caught.value.tail


# -- the cache -----------------------------------------------------------------------------------


class Counter:
    """Counts repack calls (by distribution name) and passes them on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()
        real = wheelbuild.repack

        def counted(dist: Any, dest: Path, *args: Any) -> Path:
            with self.lock:
                self.calls.append(canonicalize_name(dist.metadata["Name"]))
            return real(dist, dest, *args)

        monkeypatch.setattr(wheelbuild, "repack", counted)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Wheelhouse]:
    cache = tmp_path_factory.mktemp("wheelhouse")
    return cache, build_wheelhouse(EnvRequest(), HEAD, cache)


def test_build_makes_every_pinned_wheel(built: tuple[Path, Wheelhouse]) -> None:
    cache, house = built
    assert house.pins == resolve_pins(EnvRequest(), HEAD)
    assert house.fingerprint == fingerprint(house.pins, HEAD)
    assert {canonicalize_name(parse_wheel_filename(w.filename)[0]) for w in house.wheels} == set(pin_names(house.pins))
    manifest = json.loads((cache / house.fingerprint / "manifest.json").read_text())
    assert {k: manifest[k] for k in house.manifest()} == house.manifest()
    assert set(manifest["made"].values()) == {"repacked"}
    for wheel in house.wheels:
        assert wheel.path == cache / house.fingerprint / wheel.filename
        assert wheel.size == wheel.path.stat().st_size
        assert wheel.sha256 == hashlib.sha256(wheel.path.read_bytes()).hexdigest()
    assert house.size == sum(w.size for w in house.wheels)
    assert sorted(p.name for p in cache.iterdir()) == [house.fingerprint, house.fingerprint + ".lock"]
    assert cached_wheelhouse(EnvRequest(), HEAD, cache) == house


def test_the_wheelhouse_installs_offline_and_imports_distributed(
    built: tuple[Path, Wheelhouse], tmp_path: Path
) -> None:
    """What a host does with it: a venv without packages, pip install --no-index of the pins, import distributed."""
    house = built[1]
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
                    "--no-compile", "--find-links", str(house.wheels[0].path.parent), *house.pins],
                   env=clean_pip_env(), check=True, timeout=300)
    out = subprocess.run([str(python), "-c", "import distributed, dask; print(distributed.__version__, dask.__file__)"],
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert out[0] == metadata.version("distributed") and out[1].startswith(str(target))


def test_a_second_build_reuses_the_cache(built: tuple[Path, Wheelhouse], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, house = built
    counter = Counter(monkeypatch)
    mtimes = {w.filename: w.path.stat().st_mtime_ns for w in house.wheels}
    assert build_wheelhouse(EnvRequest(), HEAD, cache) == house
    assert counter.calls == []
    assert {w.filename: w.path.stat().st_mtime_ns for w in house.wheels} == mtimes


def copy_cache(built: tuple[Path, Wheelhouse], tmp_path: Path) -> tuple[Path, Path]:
    cache, house = built
    shutil.copytree(cache / house.fingerprint, tmp_path / house.fingerprint)
    return tmp_path, tmp_path / house.fingerprint


@pytest.mark.parametrize("damage", ["changed", "missing", "manifest"])
def test_a_broken_cache_is_found_and_rebuilt(
    built: tuple[Path, Wheelhouse], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    house = built[1]
    cache, directory = copy_cache(built, tmp_path)
    victim = directory / next(w.filename for w in house.wheels if w.filename.startswith("toolz-"))
    if damage == "changed":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, other bytes
        victim.write_bytes(bytes(data))
    elif damage == "missing":
        victim.unlink()
    else:
        (directory / "manifest.json").write_text("{not json")
    assert cached_wheelhouse(EnvRequest(), HEAD, cache) is None
    counter = Counter(monkeypatch)
    again = build_wheelhouse(EnvRequest(), HEAD, cache)
    assert "toolz" in counter.calls
    assert [w.sha256 for w in again.wheels] == [w.sha256 for w in house.wheels]  # repacks are reproducible
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == next(
        w.sha256 for w in house.wheels if w.path.name == victim.name
    )
    assert sorted(p.name for p in cache.iterdir()) == [house.fingerprint, house.fingerprint + ".lock"]


def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def cannot(dist: Any, dest: Path, *args: Any) -> Path:
        raise wheelbuild.CannotRepack("test")

    def offline(argv: list[str], what: str, timeout: float = 0) -> None:
        seen.append(argv)
        raise WheelhouseError(f"pip could not download {what}: no network", "fix it")

    monkeypatch.setattr(wheelbuild, "repack", cannot)
    monkeypatch.setattr(wheelbuild, "pip_download", offline)
    with pytest.raises(WheelhouseError, match="pip could not download"):
        build_wheelhouse(EnvRequest(), HEAD, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    assert "distributed==" + metadata.version("distributed") in seen[0]
    assert "--platform" not in seen[0]  # the head's own platform


def test_another_platform_repacks_pure_wheels_and_downloads_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []

    def offline(argv: list[str], what: str, timeout: float = 0) -> None:
        seen.append(argv)
        raise WheelhouseError("no network", "fix it")

    monkeypatch.setattr(wheelbuild, "pip_download", offline)
    counter = Counter(monkeypatch)
    arm = EnvTarget(HEAD.python, "aarch64", "glibc 2.36")
    with pytest.raises(WheelhouseError):
        build_wheelhouse(EnvRequest(), arm, tmp_path)
    asked = seen[0][seen[0].index("--") + 1:]
    assert "toolz" in counter.calls and "distributed" in counter.calls  # pure: repacked for any platform
    assert "msgpack" not in counter.calls
    assert f"msgpack=={metadata.version('msgpack')}" in asked and not any(a.startswith("toolz") for a in asked)
    assert "manylinux_2_36_aarch64" in seen[0]


def test_two_builders_at_once_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = Counter(monkeypatch)
    results: list[Wheelhouse] = []
    start = threading.Barrier(2)

    def one() -> None:
        start.wait(timeout=30)
        results.append(build_wheelhouse(EnvRequest(), HEAD, tmp_path))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1]
    assert counter.calls.count("distributed") == 1


def test_unused_wheelhouses_are_pruned(built: tuple[Path, Wheelhouse], tmp_path: Path) -> None:
    cache, old = copy_cache(built, tmp_path)
    month = 31 * 86400
    stale = time.time() - month
    os.utime(old, (stale, stale))
    recent = cache / "0123456789abcdef"
    recent.mkdir()
    busy = cache / "fedcba9876543210"
    busy.mkdir()
    os.utime(busy, (stale, stale))
    scratch = cache / ".tmp-0123456789abcdef-x"
    scratch.mkdir()
    os.utime(scratch, (stale, stale))
    holder = environments._Locked(cache / "fedcba9876543210.lock")
    with holder:  # being built or read by another head: left alone
        assert environments.prune_cache(cache) == [old.name]
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [recent.name, busy.name]
    # a wheelhouse in use is touched when loaded, so it is not pruned
    cache2, used = copy_cache(built, tmp_path / "second")
    os.utime(used, (stale, stale))
    assert cached_wheelhouse(EnvRequest(), HEAD, cache2) is not None
    assert environments.prune_cache(cache2) == []


# -- display -------------------------------------------------------------------------------------


def test_describe_need() -> None:
    wheels = (WheelFile("a-1-py3-none-any.whl", "aa" * 32, 12_000_000, Path("/c/a")),
              WheelFile("b-1-py3-none-any.whl", "bb" * 32, 300_000, Path("/c/b")))
    house = Wheelhouse("0123456789abcdef", HEAD, ("a==1", "b==1"), wheels)
    assert describe_need(house, set()) == "missing (it will be built, 12.3 MB to ship)"
    assert describe_need(house, {"a-1-py3-none-any.whl"}) == "missing (it will be built, 0.3 MB to ship)"
    assert describe_need(house, {"a-1-py3-none-any.whl", "bb" * 32}).startswith("missing (it will be built from")
    assert house.manifest()["wheels"][0] == {"filename": "a-1-py3-none-any.whl", "sha256": "aa" * 32,
                                             "size": 12_000_000}


# -- inventory -----------------------------------------------------------------------------------


def write_inventory(tmp_path: Path, hosts: dict[str, str]) -> Path:
    path = tmp_path / "inv.yml"
    lines = ["all:", "  hosts:"]
    for name, text in hosts.items():
        lines.append(f"    {name}:")
        lines += [f"      {line}" for line in text.splitlines()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_inventory_vars_make_the_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = load_inventory(str(write_inventory(tmp_path, {"h1": "speccluster_environment: HEAD\n"
                                                  "speccluster_packages: ['pandas>=2', pyarrow]\n"
                                                  "speccluster_requirements: req.txt\n"
                                                  "speccluster_env_dir: /scratch/envs\n"}))).hosts["h1"]
    assert spec.environment == "head" and spec.env_dir == "/scratch/envs"
    assert EnvRequest.from_host(spec) == EnvRequest(("pandas>=2", "pyarrow"), str(tmp_path / "req.txt"))
    plain = load_inventory(str(write_inventory(tmp_path, {"h1": "speccluster_nworkers: 1\n"}))).hosts["h1"]
    assert (plain.environment, plain.packages, plain.requirements, plain.env_dir) == ("host", (), None, None)
    assert EnvRequest.from_host(plain) == EnvRequest()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("speccluster_environment: conda", "speccluster_environment on host h1 must be one of 'host' or 'head'"),
        ("speccluster_packages: ['pandas>>2']", "speccluster_packages on host h1 must be a list of requirement"),
        ("speccluster_packages: {pandas: 2}", "speccluster_packages on host h1 must be a list of requirement"),
        ("speccluster_requirements: ''", "speccluster_requirements on host h1 must be a path"),
        ("speccluster_env_dir: 3", "speccluster_env_dir on host h1 must be a non-empty string"),
    ],
)
def test_bad_inventory_values(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message) as caught:
        load_inventory(str(write_inventory(tmp_path, {"h1": line})))
    assert "inv.yml:4" in str(caught.value) and "; write" in str(caught.value)


# -- what plan and check show ---------------------------------------------------------------------


def test_plan_environments(built: tuple[Path, Wheelhouse], tmp_path: Path) -> None:
    cache, house = built
    inv = load_inventory(str(write_inventory(tmp_path, {
        "h1": "speccluster_environment: head\nspeccluster_env_dir: /scratch/envs\n",
        "h2": "speccluster_environment: head\n",
        "h3": "speccluster_nworkers: 1\n",
    })))
    plans = plan_environments(inv.worker_hosts, cache)
    assert sorted(plans) == ["h1", "h2"]
    assert plans["h1"]["env_dir"] == "/scratch/envs" and plans["h2"]["env_dir"] == DEFAULT_ENV_DIR
    plan = plans["h2"]
    assert plan["fingerprint"] == house.fingerprint and plan["cached"] is True
    assert (plan["wheels"], plan["bytes"], plan["pins"]) == (len(house.wheels), house.size, list(house.pins))
    assert f"{house.size / 1e6:.1f} MB to ship" in plan["summary"] and house.fingerprint in plan["summary"]
    cold = plan_environments(inv.worker_hosts, tmp_path / "empty-cache")["h1"]
    assert cold["cached"] is False and cold["bytes"] is None and "not gathered yet" in cold["summary"]
    assert not (tmp_path / "empty-cache").exists()  # plan never builds


def test_plan_shows_the_shipped_environment(
    built: tuple[Path, Wheelhouse], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from speccluster_ssh.cli import main

    cache, house = built
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shutil.copytree(cache / house.fingerprint, environments.default_cache_dir() / house.fingerprint)
    path = write_inventory(tmp_path, {
        "h1": "ansible_connection: local\nspeccluster_environment: head\n",
        "h2": "ansible_connection: local\n",
    })
    result = CliRunner().invoke(main, ["plan", str(path), "--offline", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    hosts = {h["host"]: h for h in json.loads(result.stdout)["hosts"]}
    assert "shipped_environment" not in hosts["h2"]
    assert hosts["h1"]["shipped_environment"]["fingerprint"] == house.fingerprint
    assert hosts["h1"]["shipped_environment"]["bytes"] == house.size
    human = CliRunner().invoke(main, ["plan", str(path), "--offline"], catch_exceptions=False)
    assert f"environment {house.fingerprint} shipped from the head" in human.output
    assert f"the host builds it in {DEFAULT_ENV_DIR}/{house.fingerprint}" in human.output


def test_describe_state() -> None:
    wheels = (WheelFile("a-1-py3-none-any.whl", "aa" * 32, 2_500_000, Path("/c/a")),)
    house = Wheelhouse("0123456789abcdef", HEAD, ("a==1",), wheels)
    assert describe_state(ready=True, wheelhouse=house, host_has=set(), target=HEAD) == "ready"
    assert describe_state(ready=False, wheelhouse=house, host_has=set(), target=HEAD) == (
        "missing (it will be built, 2.5 MB to ship)"
    )
    assert describe_state(ready=False, wheelhouse=None, host_has=set(), target=HEAD) == (
        "missing (it will be built; the head gathers its wheels first)"
    )
    other = EnvTarget("3.99", HEAD.machine, HEAD.libc)
    assert describe_state(ready=False, wheelhouse=house, host_has=set(), target=other).startswith(
        f"another python (3.99, the head runs {HEAD.python}): missing"
    )
    assert describe_state(ready=False, wheelhouse=house, host_has=set(), target=HEAD,
                          unusable="python 3.8 is older than 3.10") == "no usable python: python 3.8 is older than 3.10"
