"""The provisioning playbooks, the shipped inventories and the Vagrantfile.

The playbook tests run the real ``ansible-playbook`` against hosts of the SSH
lab.  The hosts are air-gapped: ``provision.yml`` installs ``distributed``
from a wheelhouse that the head downloads once per session with
``pip download``.  Each lab host gets its own venv (the hosts share the
head's filesystem), and a cluster is then started with the pythons of those
venvs.

``ruby`` and ``vagrant`` (Debian packages) are required for the Vagrantfile
tests; their absence fails the tests instead of skipping them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from speccluster_ssh.inventory import load_inventory

REPO = Path(__file__).resolve().parent.parent
PLAYBOOKS = REPO / "playbooks"
INVENTORIES = REPO / "inventories"
INVENTORY_FILES = sorted(p.name for p in INVENTORIES.iterdir() if p.is_file())
MARKER = "SPECCLUSTER_SSH_CLUSTER"
PROVISIONED_HOSTS = ("h1", "h2")
RECAP_RE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def require_tool(name: str, package: str) -> str:
    """Path of ``name``; fails (never skips) the test when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"'{name}' is not installed: apt-get install {package} (.ci/run installs it)",
            pytrace=False,
        )
    return path


def ansible_env(home: Path) -> dict[str, str]:
    """Environment for ansible: everything of its own under ``home``, strict host keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    for sub in ("tmp", "remote-tmp", "cp", "async"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env.update(
        ANSIBLE_CONFIG=str(home / "ansible.cfg"),  # absent: no user config leaks in
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(home / "remote-tmp"),
        ANSIBLE_ASYNC_DIR=str(home / "async"),
        ANSIBLE_SSH_CONTROL_PATH_DIR=str(home / "cp"),
        ANSIBLE_HOST_KEY_CHECKING="True",
        ANSIBLE_PIPELINING="True",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_LOCALHOST_WARNING="False",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    return env


def close_ssh_masters(home: Path) -> None:
    """End the ControlPersist masters ansible left, so no SSH session outlives a run."""
    for sock in sorted((home / "cp").iterdir()):
        subprocess.run(
            ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "lab-host"],
            capture_output=True,
            timeout=15,
            check=False,
        )


def run_playbook(
    home: Path, inventory: Path, playbook: str, *extra: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``ansible-playbook`` on one of our playbooks; output is captured."""
    exe = require_tool("ansible-playbook", "ansible-core (pip install -e '.[test]')")
    try:
        return subprocess.run(
            [exe, "-i", str(inventory), str(PLAYBOOKS / playbook), *extra],
            cwd=home,
            env=ansible_env(home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    finally:
        close_ssh_masters(home)


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    """Host -> counters of the PLAY RECAP."""
    return {
        m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
        for m in RECAP_RE.finditer(result.stdout)
    }


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"rc={result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-3000:]}"


def marked_pids(host: Any) -> list[int]:
    """PIDs of the host's processes whose environment carries the cluster marker."""
    found = []
    for pid, _argv in host.processes():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(MARKER.encode() + b"=") for e in environ):
            found.append(pid)
    return found


def free_ports(address: str, count: int) -> list[int]:
    """Ports that nothing listens on at ``address`` right now."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((address, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of ``proc``'s stdout, or b'' after ``timeout`` seconds or EOF."""
    if proc.stdout is None:
        return b""
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of the head's distributed and its dependencies, downloaded once.

    ``SCLAB_WHEELHOUSE`` names an existing wheelhouse to reuse instead.
    """
    import distributed

    reuse = os.environ.get("SCLAB_WHEELHOUSE")
    if reuse:
        return Path(reuse)
    dest = tmp_path_factory.mktemp("wheelhouse")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
         "--dest", str(dest), f"distributed=={distributed.__version__}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"pip download failed on the head:\n{proc.stderr[-3000:]}", pytrace=False)
    return dest


@dataclasses.dataclass
class Provisioned:
    """Two lab hosts after two runs of provision.yml."""

    inventory: Path
    home: Path
    venvs: dict[str, Path]
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    seconds: tuple[float, float]

    def python(self, host: str) -> str:
        return str(self.venvs[host] / "bin" / "python")


def write_lab_inventory(lab: Any, path: Path, venvs: dict[str, Path]) -> Path:
    """An inventory of the provisioned hosts with only speccluster_venv set.

    ``lab.write_inventory`` also sets ``speccluster_python`` (which would win
    over the venv) and lists the other lab hosts: both are dropped, so the
    cluster has to find its python through ``speccluster_venv`` alone.
    """
    lab.write_inventory(
        path,
        groups={"workers": list(venvs)},
        host_vars={name: {"speccluster_venv": str(venv)} for name, venv in venvs.items()},
        group_vars={"all": {"ansible_python_interpreter": sys.executable}},
    )
    data = yaml.safe_load(path.read_text())
    data["all"]["vars"].pop("speccluster_python", None)
    data["all"].pop("hosts", None)
    for group in data["all"]["children"].values():
        for host_vars in group["hosts"].values():
            host_vars.pop("speccluster_python", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def provisioned(lab: Any, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    """Run provision.yml twice on h1 and h2 with the offline wheelhouse."""
    work = tmp_path_factory.mktemp("provision")
    home = work / "ansible"
    home.mkdir()
    venvs = {name: work / "venvs" / name for name in PROVISIONED_HOSTS}
    inventory = write_lab_inventory(lab, work / "inventory.yml", venvs)
    args = (
        "-e", f"speccluster_wheelhouse={wheelhouse}",
        # The head's interpreter makes the venvs (the hosts share its disk).
        "-e", f"speccluster_base_python={sys.executable}",
        "-e", "speccluster_bokeh=false",
    )  # fmt: skip
    t0 = time.monotonic()
    first = run_playbook(home, inventory, "provision.yml", *args)
    t1 = time.monotonic()
    second = run_playbook(home, inventory, "provision.yml", *args) if first.returncode == 0 else first
    t2 = time.monotonic()
    yield Provisioned(inventory, home, venvs, first, second, (t1 - t0, t2 - t1))
    for venv in venvs.values():
        shutil.rmtree(venv, ignore_errors=True)


# --------------------------------------------------------------------------
# provision.yml, check.yml, teardown.yml on the lab
# --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::distributed.versions.VersionMismatchWarning")
def test_provision_installs_head_version_offline_and_is_idempotent(
    lab: Any, provisioned: Provisioned
) -> None:
    import distributed
    from distributed import Client

    from speccluster_ssh.cluster import SSHSpecCluster

    first, second = provisioned.first, provisioned.second
    assert first.returncode == 0, explain(first)
    assert {h: c["changed"] > 0 for h, c in recap(first).items()} == dict.fromkeys(PROVISIONED_HOSTS, True)
    assert second.returncode == 0, explain(second)
    counts = recap(second)
    assert set(counts) == set(PROVISIONED_HOSTS), explain(second)
    for host, numbers in counts.items():
        assert numbers["changed"] == 0 and numbers["failed"] == 0, f"{host} changed on a second run:\n{explain(second)}"
    for host in PROVISIONED_HOSTS:
        assert f"speccluster-ssh will start {provisioned.python(host)}" in second.stdout

    # Clean venvs with exactly the head's version, the wheelhouse inside.
    for host, venv in provisioned.venvs.items():
        cfg = (venv / "pyvenv.cfg").read_text()
        assert re.search(r"include-system-site-packages\s*=\s*false", cfg), cfg
        assert (venv / "wheelhouse" / ".speccluster-wheelhouse").is_file()
        assert list(venv.glob(f"lib/python*/site-packages/distributed-{distributed.__version__}.dist-info"))

    # The inventory names only speccluster_venv: the cluster must start the
    # venvs' pythons, which import distributed from the venv.
    inventory = load_inventory(provisioned.inventory)
    assert {h.name: h.python for h in inventory.worker_hosts} == {
        h: provisioned.python(h) for h in PROVISIONED_HOSTS
    }
    by_ip = {lab.host(h).ip: h for h in PROVISIONED_HOSTS}
    with SSHSpecCluster.from_inventory(
        provisioned.inventory,
        known_hosts=str(lab.known_hosts),
        n_workers=2,
        scheduler_options={"dashboard_address": ":0"},
    ) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        executables = client.run(lambda: sys.executable)
        modules = client.run(lambda: __import__("distributed").__file__)
        versions = client.run(lambda: __import__("distributed").__version__)
        assert client.submit(sum, range(10)).result(timeout=60) == 45
        assert sum(client.gather(client.map(lambda x: x * x, range(20)))) == 2470
    assert len(executables) == 2
    for address, executable in executables.items():
        host = by_ip[address.split("://")[1].rsplit(":", 1)[0]]
        assert executable == provisioned.python(host)
        assert modules[address].startswith(str(provisioned.venvs[host]) + "/lib/")
        assert versions[address] == distributed.__version__


def test_check_reports_ready_hosts_and_catches_a_mismatch(lab: Any, provisioned: Provisioned) -> None:
    import distributed

    assert provisioned.first.returncode == 0, explain(provisioned.first)
    ports = free_ports(lab.head_ip, 2)
    bind = ("-e", f"speccluster_check_bind={lab.head_ip}")
    ok = run_playbook(
        provisioned.home, provisioned.inventory, "check.yml",
        "-e", json.dumps({"speccluster_check_ports": ports}), *bind,
    )  # fmt: skip
    assert ok.returncode == 0, explain(ok)
    assert {h: (c["failed"], c["changed"]) for h, c in recap(ok).items()} == dict.fromkeys(PROVISIONED_HOSTS, (0, 0))
    assert ok.stdout.count(f'"distributed": "{distributed.__version__}"') == 2
    assert ok.stdout.count(f'"head_address": "{lab.head_ip}"') == 2
    assert ok.stdout.count(f'"{ports[0]}": "open"') == 2
    assert ok.stdout.count('"problems": []') == 2

    # The listener is gone: its ports can be listened on again (SO_REUSEADDR
    # only tolerates the TIME_WAIT of the probes' connections).
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((lab.head_ip, port))
            sock.listen(1)

    # A version the hosts do not have, and a port nobody listens on.
    closed = free_ports(lab.head_ip, 1)[0]
    bad = run_playbook(
        provisioned.home, provisioned.inventory, "check.yml",
        "-e", "speccluster_distributed_version=0.0.1",
        "-e", f"speccluster_check_ports={closed}", "-e", "speccluster_check_bind=127.0.0.1",
    )  # fmt: skip
    assert bad.returncode != 0, explain(bad)
    assert {h: c["failed"] for h, c in recap(bad).items()} == dict.fromkeys(PROVISIONED_HOSTS, 1)
    assert f"distributed {distributed.__version__} on the host, 0.0.1 on the head" in bad.stdout
    assert f"head port {lab.head_ip}:{closed} not reachable" in bad.stdout


def test_teardown_kills_marked_strays_and_removes_everything(
    lab: Any, provisioned: Provisioned, tmp_path: Path
) -> None:
    from speccluster_ssh.agent import agent_argv, agent_payload

    assert provisioned.first.returncode == 0, explain(provisioned.first)
    cache = tmp_path / "cache"
    cluster = "sctest-teardown"
    h1, h2 = lab.host("h1"), lab.host("h2")
    spec = {h.name: h for h in load_inventory(provisioned.inventory).worker_hosts}["h1"]
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    marked_env = dict(os.environ, **{MARKER: cluster})
    procs: list[subprocess.Popen[Any]] = []
    try:
        # What a head that died leaves behind: a host agent started exactly
        # as the head starts it (from the venv, with its marker), with its
        # cluster directory, and a marked process on another host.
        agent = h1.spawn(agent_argv(spec, cluster), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(agent)
        config = {"cluster": cluster, "host_label": "h1", "silence": 300, "base_dir": str(cache), "listen_address": None}
        assert agent.stdin is not None
        agent.stdin.write(agent_payload(config))
        agent.stdin.flush()
        hello = read_line(agent, 60)
        assert b'"hello"' in hello, (hello, agent.poll())
        stray = h2.spawn(sleeper, env=marked_env)
        procs.append(stray)
        (cache / "old-cluster" / "h2" / "logs").mkdir(parents=True)
        (cache / "other-cluster" / "h9").mkdir(parents=True)  # another host's: kept
        # Controls that must survive: unmarked on a lab host, marked on the head.
        unmarked = h1.spawn(sleeper)
        procs.append(unmarked)
        head_marked = subprocess.Popen(sleeper, env=marked_env, stdin=subprocess.DEVNULL)
        procs.append(head_marked)
        deadline = time.monotonic() + 30
        while (agent.pid not in marked_pids(h1) or stray.pid not in marked_pids(h2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.pid in marked_pids(h1) and stray.pid in marked_pids(h2)
        assert (cache / cluster / "h1").is_dir()

        result = run_playbook(
            provisioned.home, provisioned.inventory, "teardown.yml",
            "-e", f"speccluster_cache_dir={cache}", "-e", "speccluster_kill_grace=3",
        )  # fmt: skip
        assert result.returncode == 0, explain(result)
        assert {h: c["changed"] for h, c in recap(result).items()} == dict.fromkeys(PROVISIONED_HOSTS, 1)
        # The agent exits on SIGTERM by itself (status 0); the sleeper dies of it.
        agent.wait(timeout=15)
        assert stray.wait(timeout=15) != 0
        assert not marked_pids(h1) and not marked_pids(h2)
        assert unmarked.poll() is None and head_marked.poll() is None
        for venv in provisioned.venvs.values():
            assert not venv.exists()
        assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == ["other-cluster", "other-cluster/h9"]

        again = run_playbook(provisioned.home, provisioned.inventory, "teardown.yml", "-e", f"speccluster_cache_dir={cache}")
        assert again.returncode == 0, explain(again)
        assert {h: c["changed"] for h, c in recap(again).items()} == dict.fromkeys(PROVISIONED_HOSTS, 0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=15)


def test_teardown_refuses_a_directory_that_is_not_a_venv(lab: Any, tmp_path: Path) -> None:
    home = tmp_path / "ansible"
    home.mkdir()
    precious = tmp_path / "precious"
    (precious / "data").mkdir(parents=True)
    inventory = write_lab_inventory(lab, tmp_path / "inventory.yml", {"h1": precious})
    result = run_playbook(home, inventory, "teardown.yml", "-e", f"speccluster_cache_dir={tmp_path / 'cache'}")
    assert result.returncode != 0, explain(result)
    assert "is not a virtual environment" in result.stdout, explain(result)
    assert (precious / "data").is_dir()


# --------------------------------------------------------------------------
# inventories
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "extra", "expected"),
    [
        ({"HOME": "/home/u"}, {}, "/home/u/.cache/speccluster-ssh"),
        ({"HOME": "/home/u", "XDG_CACHE_HOME": "/scratch/c"}, {}, "/scratch/c/speccluster-ssh"),
        ({"HOME": "/home/u", "XDG_CACHE_HOME": "relative"}, {}, "/home/u/.cache/speccluster-ssh"),
        ({"HOME": "/h", "XDG_CACHE_HOME": "/x"}, {"speccluster_cache_dir": "~/mine/"}, "/h/mine"),
    ],
)
def test_teardown_finds_the_cache_where_the_agent_keeps_it(env: dict[str, str], extra: dict[str, str], expected: str) -> None:
    """teardown.yml's default cache directory is the agent's: $XDG_CACHE_HOME when absolute, else ~/.cache."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    play = yaml.safe_load((PLAYBOOKS / "teardown.yml").read_text())[0]
    names = ("_sc_home", "_sc_xdg_cache", "_sc_cache")
    variables = {"ansible_facts": {"env": env}, **extra, **{n: trust_as_template(play["vars"][n]) for n in names}}
    rendered = Templar(loader=DataLoader(), variables=variables).template(trust_as_template(play["vars"]["_sc_cache"]))
    assert rendered == expected


@pytest.mark.parametrize("playbook", ["provision.yml", "check.yml", "teardown.yml"])
def test_playbook_syntax(playbook: str, tmp_path: Path) -> None:
    exe = require_tool("ansible-playbook", "ansible-core (pip install -e '.[test]')")
    proc = subprocess.run(
        [exe, "--syntax-check", "-i", str(INVENTORIES / "example.yml"), str(PLAYBOOKS / playbook)],
        cwd=tmp_path, env=ansible_env(tmp_path), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", INVENTORY_FILES)
def test_ansible_and_speccluster_accept_shipped_inventory(name: str, tmp_path: Path) -> None:
    exe = require_tool("ansible-inventory", "ansible-core (pip install -e '.[test]')")
    env = ansible_env(tmp_path)
    # A file ansible cannot parse must fail, not pass as an empty inventory.
    env["ANSIBLE_INVENTORY_UNPARSED_FAILED"] = "True"
    proc = subprocess.run(
        [exe, "-i", str(INVENTORIES / name), "--list"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    inventory = load_inventory(INVENTORIES / name)
    hosts = {h.name for h in inventory.worker_hosts}
    if inventory.scheduler_host is not None:
        hosts.add(inventory.scheduler_host.name)
    assert hosts and hosts <= set(listed["_meta"]["hostvars"]) | {"localhost"}


def test_example_inventory_shape() -> None:
    inventory = load_inventory(INVENTORIES / "example.yml")
    assert inventory.scheduler_host is not None
    workers = {h.name: h for h in inventory.worker_hosts}
    assert {n for n in workers if n.startswith("node")} == {f"node0{i}.lab.example.org" for i in range(1, 5)}
    gpus = [h for h in workers.values() if "gpu" in h.groups]
    assert len(gpus) == 2 and all(h.resources == {"GPU": 1.0} and h.nworkers == 1 for h in gpus)
    assert all(h.python == h.venv.rstrip("/") + "/bin/python" for h in workers.values() if h.venv)


# --------------------------------------------------------------------------
# Vagrantfile
# --------------------------------------------------------------------------

# Evaluates a Vagrantfile with a stand-in for Vagrant that records every
# configuration call, and prints the record as JSON.
RUBY_RECORDER = r"""
require "json"

class Recorder
  def initialize
    @calls = []
    @children = {}
  end

  def method_missing(name, *args, **kwargs, &block)
    key = name.to_s
    if key.end_with?("=")
      @calls << { "set" => key.chomp("="), "value" => args.first }
      return args.first
    end
    if block
      child = Recorder.new
      @calls << { "call" => key, "args" => args, "kwargs" => kwargs, "block" => child }
      block.call(child) unless key == "ruby"  # trigger bodies run later
      return child
    end
    return (@children[key] ||= Recorder.new) if args.empty? && kwargs.empty?

    @calls << { "call" => key, "args" => args, "kwargs" => kwargs }
    nil
  end

  def respond_to_missing?(_name, _include_private = false)
    true
  end

  def to_json(*options)
    { "calls" => @calls, "children" => @children }.to_json(*options)
  end
end

module Vagrant
  CONFIGS = []

  def self.configure(_version)
    config = Recorder.new
    yield config
    CONFIGS << config
  end
end

load ARGV.fetch(0)
puts JSON.generate(Vagrant::CONFIGS)
"""


def vagrant_machines(vagrantfile: Path, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Machine name -> its private address and provisioners, as the Vagrantfile declares them."""
    ruby = require_tool("ruby", "ruby")
    script = tmp_path / "record.rb"
    script.write_text(RUBY_RECORDER)
    proc = subprocess.run(
        [ruby, str(script), str(vagrantfile)], cwd=vagrantfile.parent,
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (config,) = json.loads(proc.stdout)
    machines: dict[str, dict[str, Any]] = {}
    for call in config["children"]["vm"]["calls"]:
        if call.get("call") != "define":
            continue
        vm = call["block"]["children"].get("vm", {"calls": []})
        networks = [c for c in vm["calls"] if c.get("call") == "network" and c["args"] == ["private_network"]]
        provisioners = [
            {s["set"]: s["value"] for s in c["block"]["calls"] if "set" in s} | {"type": c["args"][0]}
            for c in vm["calls"]
            if c.get("call") == "provision"
        ]
        machines[call["args"][0]] = {
            "ips": [n["kwargs"].get("ip") for n in networks],
            "provisioners": provisioners,
        }
    return machines


def test_vagrantfile_syntax() -> None:
    ruby = require_tool("ruby", "ruby")
    proc = subprocess.run([ruby, "-c", str(REPO / "Vagrantfile")], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "Syntax OK" in proc.stdout, proc.stderr


def test_vagrantfile_and_vagrant_inventory_agree(tmp_path: Path) -> None:
    machines = vagrant_machines(REPO / "Vagrantfile", tmp_path)
    inventory = load_inventory(INVENTORIES / "vagrant.yml")
    hosts = {h.name: h for h in inventory.worker_hosts}
    assert inventory.scheduler_host is not None
    hosts[inventory.scheduler_host.name] = inventory.scheduler_host
    assert {name: m["ips"] for name, m in machines.items()} == {name: [h.address] for name, h in hosts.items()}
    assert len(machines) == 4 and inventory.scheduler_host.name == "head"
    # Nobody advertises Vagrant's NAT address: every host listens on the private network.
    assert {h.interface for h in hosts.values()} == {"eth1"}
    assert all(h.python == "/home/vagrant/.speccluster-ssh/venv/bin/python" for h in hosts.values())
    # One Ansible run provisions every machine with our playbook and inventory.
    ansible = [p for m in machines.values() for p in m["provisioners"] if p["type"] == "ansible"]
    assert len(ansible) == 1
    assert ansible[0]["limit"] == "all"
    assert (REPO / ansible[0]["playbook"]) == PLAYBOOKS / "provision.yml"
    assert (REPO / ansible[0]["inventory_path"]) == INVENTORIES / "vagrant.yml"


def test_vagrant_validates_the_vagrantfile(tmp_path: Path) -> None:
    vagrant = require_tool("vagrant", "vagrant")
    # A copy: vagrant writes a .vagrant/ directory next to the Vagrantfile.
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(REPO / "Vagrantfile", project / "Vagrantfile")
    shutil.copytree(PLAYBOOKS, project / "playbooks")
    shutil.copytree(INVENTORIES, project / "inventories")
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant-home"), VAGRANT_CHECKPOINT_DISABLE="1")
    proc = subprocess.run(
        [vagrant, "validate", "--ignore-provider"], cwd=project, env=env,
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0 and "validated successfully" in proc.stdout, proc.stdout + proc.stderr
