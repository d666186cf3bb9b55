"""Smoke tests of the SSH lab itself (``tests/sshlab.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml

import sshlab
from sshlab import Lab, LabHost

pytestmark = pytest.mark.lab

_TESTS_DIR = Path(__file__).resolve().parent
# Same settings as the session lab (conftest), so that parallel sessions on
# separate subnets keep out of each other's way here too.
_SUBNET = os.environ.get("SCLAB_SUBNET", "10.250.0")
_PREFIX = os.environ.get("SCLAB_PREFIX", "sclab")


def _own_prefix(tag: str) -> str:
    """A prefix for a test's private lab, distinct from the session lab's."""
    return _PREFIX[:9] + tag


async def _run_on(lab: Lab, host: LabHost, command: str, **options: Any) -> str:
    async with asyncssh.connect(host.ip, **lab.connect_options(**options)) as conn:
        result = await conn.run(command, check=True, timeout=30)
    return str(result.stdout)


def _reachable(lab: Lab, host: LabHost, timeout: float = 3.0) -> bool:
    async def probe() -> bool:
        try:
            await _run_on(lab, host, "true", connect_timeout=timeout)
        except (OSError, asyncssh.Error, asyncio.TimeoutError):
            return False
        return True

    return asyncio.run(probe())


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _ip_netns_list() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def _ip_link_names() -> list[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines()]


def _require_no_session_lab() -> None:
    if sshlab._ACTIVE_KEYS:
        pytest.fail("this test builds its own lab and must run before the session lab starts")


# ---------------------------------------------------------------------------
# tests with their own lab; they run first, before the session lab exists
# ---------------------------------------------------------------------------


@pytest.mark.lab_first
def test_stop_leaves_nothing_behind() -> None:
    _require_no_session_lab()
    prefix = _own_prefix("t")
    lab = Lab(2, prefix=prefix, subnet_base=_SUBNET)
    with lab:
        sshd_pids = [h.sshd_pid for h in lab.hosts]
        workdir = lab.workdir
        assert all(sshd_pids)
        assert f"{prefix}-h1" in _ip_netns_list().split()
        assert f"{prefix}-head" in _ip_link_names()
    assert not [ns for ns in _ip_netns_list().split() if ns.startswith(f"{prefix}-")]
    assert not [name for name in _ip_link_names() if name.startswith(f"{prefix}-")]
    assert not workdir.exists()
    for pid in sshd_pids:
        assert not Path(f"/proc/{pid}").exists(), f"sshd {pid} survived the lab"
    assert sshlab.leftovers(prefix) == {"netns": [], "links": [], "processes": []}
    assert lab.start_seconds is not None and lab.stop_seconds is not None


@pytest.mark.lab_first
def test_crashed_lab_is_cleaned_by_next_start() -> None:
    _require_no_session_lab()
    prefix = _own_prefix("c")
    crash = textwrap.dedent(
        f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(_TESTS_DIR)!r})
        import sshlab
        lab = sshlab.Lab(2, prefix={prefix!r}, subnet_base={_SUBNET!r}).start()
        print(json.dumps({{"workdir": str(lab.workdir),
                           "sshd": [h.sshd_pid for h in lab.hosts]}}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit
        """
    )
    res = subprocess.run(
        # Its work dir where the next lab looks for crashed ones: this process's temporary directory
        # (the test session points its children's TMPDIR elsewhere).
        [sys.executable, "-c", crash], capture_output=True, text=True, timeout=280,
        env={**os.environ, "TMPDIR": tempfile.gettempdir()},
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    crashed = json.loads(res.stdout)
    try:
        # The crash left namespaces behind ...
        assert f"{prefix}-h1" in _ip_netns_list().split()
        # ... but its sshds died with it (parent-death signal).
        _wait_for(
            lambda: not sshlab.leftovers(prefix)["processes"], 10, "orphaned sshd to die"
        )
        with Lab(1, prefix=prefix, subnet_base=_SUBNET, check_mesh=False):
            assert f"{prefix}-h2" not in _ip_netns_list().split()
            assert not Path(crashed["workdir"]).exists()
    finally:
        sshlab.cleanup_leftovers(prefix, _SUBNET)
    assert sshlab.leftovers(prefix) == {"netns": [], "links": [], "processes": []}


# ---------------------------------------------------------------------------
# tests on the session lab
# ---------------------------------------------------------------------------


def test_every_host_answers_with_its_own_ip(lab: Lab) -> None:
    command = "ip -4 -o addr show dev eth0; hostname; getent hosts h1"

    async def ask_all() -> list[str]:
        return list(await asyncio.gather(*(_run_on(lab, h, command) for h in lab.hosts)))

    for host, out in zip(lab.hosts, asyncio.run(ask_all()), strict=True):
        addr_line, hostname, h1_line = out.strip().splitlines()
        assert addr_line.split()[3] == f"{host.ip}/24"
        assert hostname == host.name
        assert h1_line.split() == [lab.hosts[0].ip, "h1"]


def test_untrusted_host_key_is_refused(lab: Lab, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(_run_on(lab, lab.hosts[0], "true", known_hosts=str(empty)))


def test_rotated_host_key_is_refused_until_restored(lab: Lab) -> None:
    host = lab.hosts[0]
    old_key = host.host_public_key
    new_key = host.rotate_host_key()
    assert new_key != old_key
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(_run_on(lab, host, "true"))
    assert host.restore_host_key()
    assert _reachable(lab, host)


def test_kill_restart_cut_heal(lab: Lab) -> None:
    host = lab.hosts[-1]
    killed = host.kill_all()
    assert host.sshd_pid is None
    assert any("sshd" in " ".join(p.argv) for p in killed)
    assert host.pids() == []
    assert not host.is_up
    assert not _reachable(lab, host)

    host.restart_sshd()
    assert host.is_up
    assert _reachable(lab, host)

    host.cut()
    assert not host.link_up and not host.is_up
    assert not _reachable(lab, host, timeout=2.0)

    host.heal()
    assert host.is_up
    assert _reachable(lab, host)


def test_ssh_process_shows_only_in_its_host(lab: Lab) -> None:
    if len(lab.hosts) < 2:
        pytest.skip("needs two lab hosts")
    first, second = lab.hosts[0], lab.hosts[1]
    out = asyncio.run(
        _run_on(lab, first, "sleep 300 </dev/null >/dev/null 2>&1 & echo $!")
    )
    pid = int(out.strip())
    assert pid in first.pids()
    assert pid not in second.pids()
    assert any(p.pid == pid and p.argv[:1] == ["sleep"] for p in first.processes())

    report = lab.reset()
    assert pid in [p.pid for p in report.killed.get(first.name, [])]
    assert not report.clean
    assert pid not in first.pids()
    assert first.sshd_running


def test_reset_repairs_everything(lab: Lab) -> None:
    if len(lab.hosts) < 3:
        pytest.skip("needs three lab hosts")
    h1, h2, h3 = lab.hosts[:3]
    h1.cut()
    h2.kill_all()
    sleeper = h3.spawn(["sleep", "300"])
    try:
        # Until the wrapper has exec'd sleep, its set-up children (mount, hostname)
        # are processes of the host too, which reset would kill along with it.
        _wait_for(lambda: any(p.pid == sleeper.pid and p.argv[:1] == ["sleep"] for p in h3.processes()),
                  10, "sleep to run in the host")
        report = lab.reset()
    finally:
        sleeper.kill()  # no-op when reset already killed it
        sleeper.wait(timeout=10)
    assert report.healed == ["h1"]
    assert report.restarted == ["h2"]
    assert [p.pid for p in report.killed["h3"]] == [sleeper.pid], [(p.pid, p.argv) for p in report.killed["h3"]]
    assert all(h.is_up for h in lab.hosts)
    assert all(_reachable(lab, h) for h in (h1, h2, h3))
    assert lab.reset().clean


def test_name_lookups_inside_a_host_never_wait_for_a_resolver(lab: Lab) -> None:
    """Lab names resolve from /etc/hosts; any other lookup is refused at once, never left to time out.

    The host's only nameserver is 127.0.0.1, where nothing listens: a query
    there is refused (ICMP port unreachable), so an unknown name fails as
    soon as it is asked instead of after the resolver's timeout.
    """
    probe = textwrap.dedent(
        """
        import json, socket
        found = {}
        for name in ("localhost", "h1", "head", "no-such-host.invalid"):
            try:
                found[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 22)})
            except socket.gaierror:
                found[name] = None
        with open("/etc/resolv.conf") as fh:
            nameservers = [line.split()[1] for line in fh if line.startswith("nameserver")]
        # One DNS-sized query to each nameserver: refused, answered, or no answer.
        dns = {}
        for server in nameservers:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(30)
            try:
                s.connect((server, 53))
                s.send(bytes(12))
                s.recv(512)
                dns[server] = "answered"
            except ConnectionRefusedError:
                dns[server] = "refused"
            except socket.timeout:
                dns[server] = "no answer"
            finally:
                s.close()
        print(json.dumps({"found": found, "dns": dns, "h1": socket.gethostbyname("h1"),
                          "me": socket.gethostbyname(socket.gethostname())}))
        """
    )
    host = lab.hosts[-1]
    res = host.exec([sys.executable, "-I", "-S", "-c", probe], timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["h1"] == lab.hosts[0].ip
    assert data["me"] == host.ip
    found = data["found"]
    assert found["localhost"] and found["head"] and found["h1"] == [lab.hosts[0].ip], found
    assert found["no-such-host.invalid"] is None, found
    assert data["dns"] == {"127.0.0.1": "refused"}, f"the resolvers inside the lab: {data['dns']}"


def test_openssh_client_uses_lab_ssh_config(lab: Lab) -> None:
    host = lab.hosts[0]
    res = subprocess.run(
        ["ssh", "-F", str(lab.ssh_config), host.name, "hostname"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == host.name


def test_write_inventory(lab: Lab, tmp_path: Path) -> None:
    names = [h.name for h in lab.hosts]
    path = lab.write_inventory(
        tmp_path / "inventory.yml",
        groups={"scheduler": names[:1], "workers": names[1:] or names[:1]},
        host_vars={names[0]: {"speccluster_nthreads": 2}},
        group_vars={"workers": {"speccluster_memory_limit": "1GiB"}},
        python="/usr/bin/python3",
    )
    data = yaml.safe_load(path.read_text())
    all_vars = data["all"]["vars"]
    assert f"UserKnownHostsFile={lab.known_hosts}" in all_vars["ansible_ssh_common_args"]
    scheduler = data["all"]["children"]["scheduler"]["hosts"]
    assert scheduler[names[0]] == {
        "ansible_host": lab.hosts[0].ip,
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(lab.client_key),
        "speccluster_python": "/usr/bin/python3",
        "speccluster_nthreads": 2,
    }
    workers = data["all"]["children"]["workers"]
    assert workers["vars"] == {"speccluster_memory_limit": "1GiB"}
    assert {h: v["ansible_host"] for h, v in workers["hosts"].items()} == {
        h.name: h.ip for h in lab.hosts[1:] or lab.hosts[:1]
    }
    with pytest.raises(ValueError):
        lab.write_inventory(tmp_path / "bad.yml", groups={"workers": ["h99"]})

    # Cross-checked by Ansible itself: ansible-core is in the test extra, so a missing tool fails.
    exe = shutil.which("ansible-inventory")
    if exe is None:
        pytest.fail("ansible-inventory is not on PATH: pip install -e '.[test]' (ansible-core)", pytrace=False)
    res = subprocess.run(
        [exe, "-i", str(path), "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"},
    )
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert listed["_meta"]["hostvars"][names[0]]["ansible_host"] == lab.hosts[0].ip
    assert sorted(listed["scheduler"]["hosts"]) == names[:1]
