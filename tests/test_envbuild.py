"""The host's environment script (agent/envbuild.py), run as the head runs it, under a bare python, on this machine.

Tiny wheels made here stand in for the head's wheelhouse; one of them is a
``distributed`` package, so the script's ``import distributed`` check passes.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from envfakes import bare_python, fake_wheelhouse, make_wheel

from speccluster_ssh.agent import BOOTSTRAP
from speccluster_ssh.shipping import env_payload


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> str:
    return bare_python(tmp_path_factory.mktemp("bare") / "venv")


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("wheels")
    wheels = [make_wheel(d, "distributed", "0.0.1", requires=("tinydep",)), make_wheel(d, "tinydep", "1.0")]
    return fake_wheelhouse(wheels, ("distributed==0.0.1", "tinydep==1.0"))


class Script:
    """The script on a pipe: send requests and wheel frames, read its events."""

    def __init__(self, python: str, env_dir: Path, gc_days: float = 30) -> None:
        self.proc = subprocess.Popen([python, "-u", "-c", BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.write(env_payload({"env_dir": str(env_dir), "gc_days": gc_days}))
        self.events: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, **message: Any) -> None:
        self.write(json.dumps(message).encode() + b"\n")

    def event(self) -> dict[str, Any]:
        """The next event that is not progress."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, self.proc.stderr.read().decode() if self.proc.stderr else "EOF"
            message = json.loads(line)
            self.events.append(message)
            if message["event"] != "progress":
                return message

    def wheel(self, wheel: Any, data: bytes | None = None) -> None:
        self.send(op="wheel", sha256=wheel.sha256, size=wheel.size, filename=wheel.filename)
        self.write(data if data is not None else wheel.path.read_bytes())

    def bye(self, keep: str = "") -> dict[str, Any]:
        self.send(op="bye", keep=keep)
        answer = self.event()
        while answer["event"] != "bye":
            answer = self.event()
        self.proc.communicate(timeout=60)
        return answer


def build(python: str, env_dir: Path, house: Any) -> tuple[Script, dict[str, Any]]:
    script = Script(python, env_dir)
    assert script.event()["event"] == "target"
    script.send(op="need", **house.manifest())
    answer = script.event()
    if answer["event"] == "missing":
        for wheel in house.wheels:
            if wheel.sha256 in answer["wheels"]:
                script.wheel(wheel)
                assert script.event()["event"] == "got"
        script.send(op="build")
        answer = script.event()
    return script, answer


def leftovers(env_dir: Path) -> list[str]:
    return sorted(p.name for p in env_dir.iterdir() if p.name.startswith(".tmp-")) + sorted(
        p.name for p in (env_dir / "wheels").iterdir() if p.name.startswith(".tmp-"))


def test_target_then_build_then_ready_without_shipping(python: str, house: Any, tmp_path: Path) -> None:
    script = Script(python, tmp_path)
    target = script.event()
    assert target["event"] == "target" and target["venv"] and target["ensurepip"]
    assert target["python"].count(".") == 1 and target["machine"]
    script.bye()
    script, ready = build(python, tmp_path, house)
    assert ready["event"] == "ready" and ready["built"], script.events
    steps = [e.get("step") for e in script.events if e["event"] == "progress"]
    assert list(dict.fromkeys(steps)) == ["venv", "pip install", "check"]  # heartbeats repeat a step
    script.bye(keep=house.fingerprint)
    env = tmp_path / house.fingerprint
    assert ready["python"] == str(env / "bin" / "python") and ready["lock"] == str(env) + ".lock"
    out = subprocess.run([ready["python"], "-c", "import distributed, tinydep; print(distributed.__version__)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.0.1"
    assert not leftovers(tmp_path)
    # Again: ready at once, nothing missing, nothing built.
    script, again = build(python, tmp_path, house)
    assert again == {**ready, "built": False}
    assert [e["event"] for e in script.events] == ["target", "ready"]
    script.bye()


def test_a_wheel_with_the_wrong_hash_is_refused_and_not_kept(python: str, house: Any, tmp_path: Path) -> None:
    script = Script(python, tmp_path)
    script.event()
    script.send(op="need", **house.manifest())
    missing = script.event()
    assert missing["event"] == "missing" and missing["bytes"] == house.size
    wheel = house.wheels[0]
    broken = bytearray(wheel.path.read_bytes())
    broken[len(broken) // 2] ^= 0xFF
    script.wheel(wheel, bytes(broken))
    bad = script.event()
    assert bad["event"] == "bad_wheel" and "sha256" in bad["why"]
    # The stream stays in step: the next frame is read as a frame.
    script.wheel(house.wheels[1])
    assert script.event()["event"] == "got"
    script.send(op="build")
    failed = script.event()
    assert failed["event"] == "failed" and wheel.filename in failed["reason"]
    script.bye()
    assert not (tmp_path / house.fingerprint).exists() and not leftovers(tmp_path)
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == [house.wheels[1].sha256 + ".whl"]


def test_a_failed_install_leaves_no_environment_and_reports_pips_tail(python: str, tmp_path: Path) -> None:
    d = tmp_path / "src"
    d.mkdir()
    # Not a zip at all, but with the right hash: pip refuses it.
    bogus = d / "distributed-0.0.2-py3-none-any.whl"
    bogus.write_bytes(b"not a zip")
    import hashlib

    from envfakes import FakeWheel
    wheel = FakeWheel(bogus.name, hashlib.sha256(b"not a zip").hexdigest(), 9, bogus)
    house = fake_wheelhouse([wheel], ("distributed==0.0.2",))
    env_dir = tmp_path / "envs"
    script, failed = build(python, env_dir, house)
    assert failed["event"] == "failed" and "pip install" in failed["reason"], failed
    assert failed["tail"].strip()
    script.bye()
    assert not (env_dir / house.fingerprint).exists() and not leftovers(env_dir)


def test_two_builders_of_one_fingerprint_build_once(python: str, house: Any, tmp_path: Path) -> None:
    results: list[dict[str, Any]] = []

    def one() -> None:
        script, ready = build(python, tmp_path, house)
        script.bye()
        results.append({**ready, "waited": any(e.get("phase") == "waiting" for e in script.events)})

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(r["built"] for r in results) == [False, True], results
    assert all(r["event"] == "ready" for r in results)


def test_gc_removes_old_unheld_environments_only(python: str, house: Any, tmp_path: Path) -> None:
    script, ready = build(python, tmp_path, house)
    script.bye()
    old = time.time() - 40 * 86400
    env = tmp_path / house.fingerprint
    for path in (env / ".last-used", env / "speccluster-env.json", *(tmp_path / "wheels").iterdir()):
        os.utime(path, (old, old))
    # Held shared, as a live agent holds it: kept.
    fd = os.open(ready["lock"], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        assert Script(python, tmp_path).bye()["removed"] == []
    finally:
        os.close(fd)
    assert env.exists()
    # The fingerprint in use (keep) is kept too; an unheld old one goes, with its wheels.
    assert Script(python, tmp_path).bye(keep=house.fingerprint)["removed"] == []
    assert Script(python, tmp_path).bye()["removed"] == [house.fingerprint]
    assert not env.exists() and not list((tmp_path / "wheels").iterdir()) and not leftovers(tmp_path)
