"""Regenerate every transcript of the README and docs/transcripts/ from real runs.

Run as root from the repository (it builds the test lab of tests/sshlab.py,
four sshd hosts in network namespaces, and tears it down at the end)::

    python3 scripts/transcripts.py            # every scenario
    python3 scripts/transcripts.py local lab  # some of them

Each scenario is a list of steps; a step runs one command (or one line of a
Python session) and records what it printed, stdout and stderr together, as
a terminal would show them with the output piped. The whole scenario goes to
``docs/transcripts/<scenario>.txt``. In README.md, a fenced block right after
a marker line::

    <!-- transcript: lab up,status -->

is replaced by the output of those steps of that scenario, so the README
shows only real output. Nothing else of the README is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import speccluster_ssh  # noqa: E402,F401  (first: it silences asyncssh's known warning)
import yaml  # noqa: E402
from sshlab import Lab  # noqa: E402

OUT_DIR = REPO / "docs" / "transcripts"
# SCDOC_WORK, SCDOC_PREFIX, SCDOC_SUBNET: another work directory and lab, for runs side by side.
WORK = Path(os.environ.get("SCDOC_WORK", "/tmp/speccluster-transcripts"))
PROG = "speccluster-ssh"
COLUMNS = 160  # wide enough for every table but check's
WIDE = {"check": 250}  # a command's own width: check's table has a column per fact
MARKER = re.compile(r"^<!-- transcript: (?P<scenario>[\w-]+) (?P<steps>[\w,-]+) -->\n```(?P<lang>\w*)\n.*?^```\n", re.M | re.S)


@dataclass
class Step:
    """One command of a scenario and what it printed."""

    key: str
    shown: str  # the command line as the reader sees it ("" for a Python session)
    argv: list[str]
    before: Callable[[], None] | None = None  # waits for a condition, or changes the lab
    output: str = ""
    status: int = 0


@dataclass
class Scenario:
    """Steps run in order, in one working directory, with one environment."""

    name: str
    about: str
    steps: list[Step] = field(default_factory=list)
    cleanup: Callable[[], None] | None = None  # puts the lab back (firewalls) after the scenario

    def text(self, keys: Sequence[str] | None = None) -> str:
        chosen = [s for s in self.steps if keys is None or s.key in keys]
        return "\n".join(f"$ {step.shown}\n{step.output}" if step.shown else step.output for step in chosen)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(XDG_STATE_HOME=str(WORK / "state"), XDG_CACHE_HOME=str(WORK / "cache"), COLUMNS=str(COLUMNS), NO_COLOR="1")
    env.pop("DASK_SPECCLUSTER_SSH__STATE_DIR", None)
    return env


def run_step(step: Step, env: dict[str, str]) -> None:
    if step.before is not None:
        step.before()
    argv = list(step.argv)
    if argv[0] == PROG:  # the console script of this python, whatever PATH says
        argv[0] = str(Path(sys.executable).with_name(PROG))
    env = {**env, "COLUMNS": str(WIDE.get(argv[1] if len(argv) > 1 else "", COLUMNS))}
    done = subprocess.run(argv, cwd=WORK, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    # Rich pads table titles to the table's width: trailing blanks are noise here.
    step.output = "".join(line.rstrip() + "\n" for line in done.stdout.splitlines())
    step.status = done.returncode
    if done.returncode != 0:
        step.output += f"$ echo $?\n{done.returncode}\n"


def poll(check: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"transcripts: timed out waiting for {what}")


def running_workers(name: str, env: dict[str, str]) -> int:
    done = subprocess.run([str(Path(sys.executable).with_name(PROG)), "status", "--name", name, "--json"],
                          cwd=WORK, env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return -1
    report = json.loads(done.stdout)
    return sum(1 for w in report.get("workers", []) if w.get("status") == "running")


def wait_workers(name: str, n: int, env: dict[str, str]) -> Callable[[], None]:
    return lambda: poll(lambda: running_workers(name, env) == n, f"{n} running workers in {name}")


def cmd(key: str, line: str, before: Callable[[], None] | None = None) -> Step:
    return Step(key, line, shlex.split(line), before)


# -- scenarios -----------------------------------------------------------------------------------


def scenario_local(env: dict[str, str]) -> Scenario:
    s = Scenario("local", "The packaged local inventory (no sshd): the README's Quick start.")
    s.steps = [
        cmd("up", f"{PROG} up --detach --name demo"),
        cmd("status", f"{PROG} status --name demo"),
        cmd("scale", f"{PROG} scale 1 --name demo", wait_workers("demo", 4, env)),
        cmd("status1", f"{PROG} status --name demo", wait_workers("demo", 1, env)),
        cmd("adapt", f"{PROG} adapt --minimum 1 --maximum 4 --name demo"),
        cmd("run", f"{PROG} run --name demo -- python3 -c \"from distributed import Client; print(Client().submit(sum, [1, 2, 3]).result())\""),
        cmd("dashboard", f"{PROG} dashboard --name demo"),
        cmd("down", f"{PROG} down --name demo"),
    ]
    return s


def lab_inventory(lab: Lab, path: Path, hosts: Sequence[str], **extra: Any) -> None:
    lab.write_inventory(path, groups={"workers": list(hosts)},
                        group_vars={"all": {"speccluster_slots": 2, "speccluster_nthreads": 2, **extra}})
    data = yaml.safe_load(path.read_text())
    data["all"].pop("hosts", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def scenario_lab(env: dict[str, str], lab: Lab) -> Scenario:
    s = Scenario("lab", "Three sshd hosts h1..h3 in the 'workers' group, 2 slots and 2 threads each; "
                        "the scheduler runs in the head process; TLS on.")
    lab_inventory(lab, WORK / "lab.yml", ["h1", "h2", "h3"])
    s.steps = [
        cmd("check", f"{PROG} check lab.yml"),
        cmd("plan", f"{PROG} plan lab.yml --workers 3"),
        cmd("up", f"{PROG} up lab.yml --detach --name lab --workers 3"),
        cmd("status", f"{PROG} status --name lab", wait_workers("lab", 3, env)),
        cmd("scale", f"{PROG} scale 5 --name lab"),
        cmd("list", f"{PROG} list", wait_workers("lab", 5, env)),
        cmd("down", f"{PROG} down --name lab"),
        cmd("postmortem", f"{PROG} logs h1 --name lab"),
    ]
    return s


def scenario_off(env: dict[str, str], lab: Lab) -> Scenario:
    s = Scenario("off", "Four sshd hosts h1..h4, 2 slots each; h3 is cut off the network before 'up'.")
    lab_inventory(lab, WORK / "off.yml", ["h1", "h2", "h3", "h4"])
    s.steps = [
        cmd("up", f"{PROG} up off.yml --detach --name off --workers 6", lambda: lab.host("h3").cut()),
        cmd("status", f"{PROG} status --name off"),
        cmd("down", f"{PROG} down --name off"),
        cmd("short", f"{PROG} up off.yml --detach --name off --workers 8 --min-workers 100% --timeout 15"),
    ]
    return s


def scenario_idle(env: dict[str, str], lab: Lab) -> Scenario:
    s = Scenario("idle", "Two sshd hosts h1, h2 with 2 slots each; the cluster ends itself after 10 s with no "
                         "task and no client (up --idle-timeout).")
    lab_inventory(lab, WORK / "idle.yml", ["h1", "h2"])
    ended = lambda: poll(lambda: not (WORK / "state" / PROG / "nightly").exists(), "the idle cluster to end")  # noqa: E731
    s.steps = [
        cmd("up", f"{PROG} up idle.yml --detach --name nightly --idle-timeout 10s"),
        cmd("list", f"{PROG} list", ended),
    ]
    return s


def scenario_ops(env: dict[str, str], lab: Lab) -> Scenario:
    s = Scenario("ops", "Day-2 operations: h1..h3 with 2 slots each, 6 workers; then h4 added, h1 removed "
                        "and speccluster_nthreads of h2 raised to 4 in lab.yml before the reloads.")
    path = WORK / "ops.yml"

    def rewrite() -> None:
        lab_inventory(lab, path, ["h2", "h3", "h4"], )
        data = yaml.safe_load(path.read_text())
        data["all"]["children"]["workers"]["hosts"]["h2"]["speccluster_nthreads"] = 4
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    lab_inventory(lab, path, ["h1", "h2", "h3"])
    s.steps = [
        cmd("up", f"{PROG} up ops.yml --detach --name ops --workers 6"),
        cmd("restart", f"{PROG} restart --name ops", wait_workers("ops", 6, env)),
        cmd("drain", f"{PROG} drain h3 --name ops --reason \"disk replacement\""),
        cmd("status", f"{PROG} status --name ops", wait_workers("ops", 4, env)),
        cmd("undrain", f"{PROG} undrain h3 --name ops"),
        cmd("dry", f"{PROG} reload --name ops --dry-run", rewrite),
        cmd("reload", f"{PROG} reload --name ops"),
        cmd("down", f"{PROG} down --name ops"),
    ]
    return s


PYTHON_SESSION = [
    "from distributed import Client",
    "from speccluster_ssh import SSHSpecCluster, resources",
    "cluster = SSHSpecCluster.from_inventory(resources.local_inventory(), n_workers=2)",
    "client = Client(cluster)              # TLS with a fresh CA: just works",
    "cluster",
    "{k: (s['options']['host'], s['cls'].__name__) for k, s in cluster.worker_spec.items()}",
    "cluster.scale(4); client.wait_for_workers(4)",
    "sorted(cluster.plan)",
    "cluster.scale(1)          # whole entries, retired by name so their data moves first",
    "client.wait_for_workers(1); len(client.scheduler_info()['workers'])",
    "cluster.adapt(minimum=1, maximum=4)",
    "client.submit(sum, [1, 2, 3]).result()",
    "client.close(); cluster.close()",
]

# Runs PYTHON_SESSION as an interactive interpreter would show it.
_SESSION_DRIVER = r"""
import json, sys, time, traceback
lines = json.loads(sys.argv[1])
namespace = {}
for line in lines:
    first, *rest = line.rstrip("\n").split("\n")
    print("\n".join([">>> " + first] + ["... " + more for more in rest] + (["..."] if rest else [])), flush=True)
    try:
        exec(compile(line, "<stdin>", "single"), namespace)
    except Exception:
        traceback.print_exc()
    sys.stdout.flush(); sys.stderr.flush()
    time.sleep(0.2)  # lets log lines of the step land before the next prompt
"""


def session(key: str, lines: Sequence[str], before: Callable[[], None] | None = None) -> Step:
    """A Python session of ``lines``, shown as the interactive interpreter shows it."""
    return Step(key, "", [sys.executable, "-c", _SESSION_DRIVER, json.dumps(list(lines))], before)


def scenario_python(env: dict[str, str]) -> Scenario:
    s = Scenario("python", "A Python session on the packaged local inventory.")
    s.steps = [session("session", PYTHON_SESSION)]
    return s


def scenario_again(env: dict[str, str]) -> Scenario:
    s = Scenario("again", "'up' run again for a running name, on the packaged local inventory.")
    s.steps = [
        cmd("up", f"{PROG} up --detach --workers 2"),
        cmd("same", f"{PROG} up --detach --workers 2"),
        cmd("workers", f"{PROG} up --workers 3"),
        cmd("adapt", f"{PROG} up --adapt 1:4"),
        cmd("tls", f"{PROG} up --workers 3 --no-tls"),
        cmd("down", f"{PROG} down"),
    ]
    return s


ATTACH_SESSION = [
    "from distributed import Client",
    "from speccluster_ssh import SSHSpecCluster",
    "with SSHSpecCluster.from_name('t1') as cluster:    # attach; the end of the block detaches\n"
    "    client = Client(cluster)\n"
    "    print(cluster)\n"
    "    print(sorted(cluster.get_logs(cluster=False, scheduler=False)))   # keyed by worker name\n",
    "client.close()",
    "SSHSpecCluster.from_name('t1').shutdown()        # the same as: speccluster-ssh down --name t1",
]


def scenario_attach(env: dict[str, str]) -> Scenario:
    s = Scenario("attach", "A detached cluster t1 on the packaged local inventory, attached to from Python.")
    s.steps = [
        cmd("up", f"{PROG} up --detach --name t1 --workers 2"),
        session("session", ATTACH_SESSION, wait_workers("t1", 2, env)),
        cmd("list", f"{PROG} list"),
    ]
    return s


GROUPS_SESSION = [
    "from distributed import Client",
    "from speccluster_ssh import SSHSpecCluster",
    "cluster = SSHSpecCluster.from_inventory('inventory.yml', n_workers=2)",
    "client = Client(cluster)              # TLS with a fresh CA: just works",
    "cluster",
    "{k: (s['options']['host'], s['cls'].__name__, s.get('group')) for k, s in cluster.worker_spec.items()}",
    "cluster.worker_spec['0']['options']['options']['dashboard_address']",
    "cluster.scale(4); client.wait_for_workers(4)   # counts dask workers",
    "sorted(cluster.plan)",
    "{k: w.worker_address for k, w in cluster.workers.items()}",
    "cluster.scale(1)          # whole entries, retired by name so their data moves first",
    "client.wait_for_workers(1); sorted(w['name'] for w in client.scheduler_info()['workers'].values())",
    "cluster.scale(cores=16)   # or memory='64 GiB': per-entry threads and memory",
    "cluster.adapt(minimum=1, maximum=4)   # also minimum_cores=, maximum_memory=, ...",
    "client.close(); cluster.close()",
]


def scenario_groups(env: dict[str, str]) -> Scenario:
    s = Scenario("groups", "A Python session on inventory.yml: node01 (2 slots of one worker) and node02 "
                           "(1 slot of a group of 2), both ansible_connection: local.")
    (WORK / "inventory.yml").write_text(yaml.safe_dump({"all": {
        "vars": {"ansible_connection": "local", "speccluster_nthreads": 1, "speccluster_memory_limit": "1 GiB"},
        "hosts": {"node01": {"speccluster_slots": 2},
                  "node02": {"speccluster_slots": 1, "speccluster_nworkers": 2}}}}, sort_keys=False))
    s.steps = [session("session", GROUPS_SESSION)]
    return s


NVIDIA_STAND_IN = """#!/bin/sh
# A stand-in for nvidia-smi: this machine has no GPU.
[ "$1" = "-L" ] || exit 9
for i in 0 1 2 3; do echo "GPU $i: NVIDIA Stand-in T4 (UUID: GPU-00000000-0000-0000-0000-00000000000$i)"; done
"""


def scenario_gpu(env: dict[str, str], lab: Lab) -> Scenario:
    s = Scenario("gpu", "Two sshd hosts with speccluster_nworkers: 2, speccluster_gpus: auto and a stand-in "
                        "nvidia-smi listing four devices (this machine has no GPU); TLS off.")
    bin_dir = WORK / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").write_text(NVIDIA_STAND_IN)
    (bin_dir / "nvidia-smi").chmod(0o755)
    lab_inventory(lab, WORK / "gpu.yml", ["h1", "h2"], speccluster_slots=1, speccluster_nthreads=1,
                  speccluster_nworkers=2, speccluster_gpus="auto", speccluster_memory_limit="1 GiB",
                  speccluster_prologue=f"PATH={bin_dir}:$PATH; export PATH")
    s.steps = [
        cmd("up", f"{PROG} up gpu.yml --detach --name gpu --no-tls"),
        cmd("status", f"{PROG} status --name gpu", wait_workers("gpu", 4, env)),
        cmd("down", f"{PROG} down --name gpu"),
    ]
    return s


def scenario_bastion(env: dict[str, str], lab: Lab) -> Scenario:
    s = Scenario("bastion", "h1 is a bastion (MaxStartups 2:100:2); h2..h5 accept SSH only from it and drop "
                            "everything else the head sends them; the inventory names the jump with -J.")
    bastion, private = lab.host("h1"), [lab.host(n) for n in ("h2", "h3", "h4", "h5")]
    # h1 stays in the inventory, ungrouped: the jump takes its address, user and key from there.
    lab.write_inventory(WORK / "bastion.yml", groups={"workers": ["h2", "h3", "h4", "h5"]},
                        group_vars={"all": {"speccluster_slots": 2, "speccluster_nthreads": 2}})
    data = yaml.safe_load((WORK / "bastion.yml").read_text())
    data["all"]["hosts"] = {"h1": data["all"]["hosts"]["h1"]}
    data["all"]["vars"]["ansible_ssh_common_args"] += " -J h1"
    (WORK / "bastion.yml").write_text(yaml.safe_dump(data, sort_keys=False))

    def fence() -> None:
        lab.make_bastion(bastion)
        lab.make_private(private, [bastion], from_head="all")

    s.steps = [
        cmd("check", f"{PROG} check bastion.yml", fence),
        cmd("up", f"{PROG} up bastion.yml --detach --name bastion --workers 6"),
        cmd("dashboard", f"{PROG} dashboard --name bastion --ssh-host me@head.example.org",
            wait_workers("bastion", 6, env)),
        cmd("down", f"{PROG} down --name bastion"),
    ]
    def unfence() -> None:
        for host in private:
            host.clear_firewall()

    s.cleanup = unfence
    return s


def scenario_ipv6(env: dict[str, str], lab: Lab) -> Scenario:
    s = Scenario("ipv6", "IPv6-only: h1..h3 drop every IPv4 packet (nftables in their own namespaces); the "
                         "inventory gives each host's IPv6 address as ansible_host; 2 slots and 2 threads each.")
    lab.write_inventory(WORK / "lab6.yml", groups={"workers": ["h1", "h2", "h3"]}, family=6,
                        group_vars={"all": {"speccluster_slots": 2, "speccluster_nthreads": 2}})
    data = yaml.safe_load((WORK / "lab6.yml").read_text())
    data["all"].pop("hosts", None)
    (WORK / "lab6.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    s.steps = [
        cmd("check", f"{PROG} check lab6.yml", lab.drop_ipv4),
        cmd("up", f"{PROG} up lab6.yml --detach --name lab6 --workers 3"),
        cmd("status", f"{PROG} status --name lab6", wait_workers("lab6", 3, env)),
        cmd("down", f"{PROG} down --name lab6"),
    ]
    s.cleanup = lab.restore_ipv4
    return s


def scenario_envs(env: dict[str, str], lab: Lab) -> Scenario:
    s = Scenario("envs", "h1..h3 have only a bare python (a venv with no packages at all); "
                         "speccluster_environment: head, each host with its own speccluster_env_dir.")
    bare = WORK / "bare-python"
    if not (bare / "bin" / "python").exists():
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(bare)], check=True)
    envs = WORK / "envs"
    subprocess.run(["rm", "-rf", str(envs)], check=True)  # cold hosts, every time
    lab.write_inventory(WORK / "envs.yml", groups={"workers": ["h1", "h2", "h3"]}, python=str(bare / "bin" / "python"),
                        host_vars={h: {"speccluster_env_dir": str(envs / h)} for h in ("h1", "h2", "h3")},
                        group_vars={"all": {"speccluster_slots": 2, "speccluster_nthreads": 2,
                                            "speccluster_environment": "head"}})
    s.steps = [
        cmd("check", f"{PROG} check envs.yml"),
        cmd("up", f"{PROG} up envs.yml --detach --name envs --workers 3"),
        cmd("down", f"{PROG} down --name envs", wait_workers("envs", 3, env)),
        cmd("again", f"{PROG} up envs.yml --detach --name envs --workers 3"),
        cmd("check2", f"{PROG} check envs.yml", wait_workers("envs", 3, env)),
        cmd("down2", f"{PROG} down --name envs"),
    ]
    return s


# -- driver --------------------------------------------------------------------------------------


def versions() -> str:
    import distributed

    import speccluster_ssh

    return (f"speccluster-ssh {speccluster_ssh.__version__}, distributed {distributed.__version__}, "
            f"Python {sys.version_info.major}.{sys.version_info.minor}")


def write_scenario(s: Scenario, lab: Lab | None) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    where = (f"the SSH test lab of tests/sshlab.py ({len(lab.hosts)} sshd hosts in network namespaces, "
             f"{lab.hosts[0].ip}..{lab.hosts[-1].ip})" if lab else "this machine alone")
    header = (f"# Real output of {versions()}, recorded by scripts/transcripts.py on {where}.\n"
              f"# {s.about}\n# Output was piped (stdout and stderr together), not a terminal; COLUMNS={COLUMNS} "
              f"({', '.join(f'{w} for {c}' for c, w in WIDE.items())}); "
              f"XDG_STATE_HOME={WORK / 'state'}.\n\n")
    (OUT_DIR / f"{s.name}.txt").write_text(header + s.text())


def update_readme(done: dict[str, Scenario]) -> list[str]:
    readme = REPO / "README.md"
    text = readme.read_text()
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        scenario = done.get(match["scenario"])
        if scenario is None:
            return match[0]
        keys = match["steps"].split(",")
        unknown = [k for k in keys if k not in {s.key for s in scenario.steps}]
        if unknown:
            missing.append(f"{match['scenario']}: {unknown}")
            return match[0]
        head = match[0].split("\n", 2)
        return f"{head[0]}\n{head[1]}\n{scenario.text(keys)}```\n"

    readme.write_text(MARKER.sub(replace, text))
    return missing


def stop_all(env: dict[str, str]) -> None:
    """``down`` every cluster still running in the transcripts' state directory."""
    root = WORK / "state" / "speccluster-ssh"
    for state in sorted(root.glob("*/state.json")) if root.is_dir() else []:
        subprocess.run([str(Path(sys.executable).with_name(PROG)), "down", "--name", state.parent.name],
                       cwd=WORK, env=env, capture_output=True, timeout=120)


@contextlib.contextmanager
def lab_if(needed: bool) -> Iterator[Lab | None]:
    if not needed:
        yield None
        return
    # IPv6 too (fd00:250:40::/64), for the ipv6 scenario; the others reach the hosts over IPv4 as before.
    with Lab(5, prefix=os.environ.get("SCDOC_PREFIX", "scdoc"),
             subnet_base=os.environ.get("SCDOC_SUBNET", "10.250.40"), ipv6=True) as lab:
        yield lab


LOCAL_SCENARIOS: dict[str, Callable[[dict[str, str]], Scenario]] = {
    "local": scenario_local, "again": scenario_again, "python": scenario_python,
    "attach": scenario_attach, "groups": scenario_groups,
}
LAB_SCENARIOS: dict[str, Callable[[dict[str, str], Lab], Scenario]] = {
    "lab": scenario_lab, "off": scenario_off, "ops": scenario_ops, "gpu": scenario_gpu, "bastion": scenario_bastion,
    "ipv6": scenario_ipv6, "idle": scenario_idle,
    "envs": scenario_envs,
}


def main(argv: Sequence[str]) -> int:
    wanted = list(argv) or [*LOCAL_SCENARIOS, *LAB_SCENARIOS]
    unknown = [w for w in wanted if w not in LOCAL_SCENARIOS and w not in LAB_SCENARIOS]
    if unknown:
        print(f"transcripts: unknown scenarios {unknown}; known: {[*LOCAL_SCENARIOS, *LAB_SCENARIOS]}", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    env = environment()
    done: dict[str, Scenario] = {}
    failed: list[str] = []
    with lab_if(any(w in LAB_SCENARIOS for w in wanted)) as lab:
        for name in wanted:
            if name in LAB_SCENARIOS:
                scenario = LAB_SCENARIOS[name](env, lab)
            else:
                scenario = LOCAL_SCENARIOS[name](env)
            try:
                for step in scenario.steps:
                    print(f"transcripts: {name}: {step.shown[:80] or 'python session'}", file=sys.stderr)
                    run_step(step, env)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # The scenario's files and README blocks stay as they were; what it printed so far helps.
                print(f"transcripts: {name} failed: {exc}\n{scenario.text()}", file=sys.stderr)
                failed.append(name)
                continue
            finally:
                # Whatever a failed step left running, and the lab as it was.
                stop_all(env)
                if scenario.cleanup is not None:
                    scenario.cleanup()
                if lab is not None:
                    for host in lab.hosts:
                        host.heal()
            write_scenario(scenario, lab if name in LAB_SCENARIOS else None)
            done[name] = scenario
    missing = update_readme(done)
    for line in missing:
        print(f"transcripts: README names unknown steps: {line}", file=sys.stderr)
    if failed:
        print(f"transcripts: failed scenarios: {failed}", file=sys.stderr)
    return 1 if missing or failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
