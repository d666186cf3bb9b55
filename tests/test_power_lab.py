"""Machines that sleep (issue 25), on the lab, with stand-in power commands.

The stand-in is a small script the inventory names as its power commands.
It records its arguments and asks this test process (over a Unix socket) to
act: ``on HOST`` starts the host's sshd again, ``off HOST`` kills every
process of the host's namespace, sshd included, as a power cut would; a host
set to fail answers with exit status 1 and a BMC's message on stderr.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, Event

from speccluster_ssh.power import Power
from test_cli_lab import Cli, cli, write_inventory  # noqa: F401  (cli is a fixture)
from test_peer import DEADLINE, inventory, lab_cluster, lab_host, names, run, until

pytestmark = pytest.mark.lab

STAND_IN = """\
import json, socket, sys
with open({log!r}, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
sock = socket.socket(socket.AF_UNIX)
sock.connect({socket!r})
sock.sendall(json.dumps(sys.argv[1:]).encode() + b"\\n")
reply = json.loads(sock.makefile().readline())
sys.stderr.write(reply["stderr"])
sys.exit(reply["status"])
"""
BMC_ERROR = "Error: Unable to establish IPMI v2 / RMCP+ session with BMC 10.9.9.9"


class PowerStandIn:
    """The power switch of the lab: serves the stand-in script's requests, records them."""

    def __init__(self, lab: Any, directory: Path) -> None:
        self.lab = lab
        self.log = directory / "power-calls.jsonl"
        self.socket_path = directory / "power.sock"
        self.script = directory / "power.py"
        self.script.write_text(STAND_IN.format(log=str(self.log), socket=str(self.socket_path)))
        self.failing: set[str] = set()
        # When set, a power-on answers at once and the host's sshd starts only once the test says
        # so (``booted.set()``), as a machine woken by Wake-on-LAN answers later.
        self.slow_boot = False
        self.booted = threading.Event()
        self._boots: list[threading.Thread] = []
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(self.socket_path))
        self._server.listen()
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="power stand-in", daemon=True)
        self._thread.start()

    def command(self, action: str) -> list[str]:
        """The inventory's power command for ``action`` (``on`` or ``off``)."""
        return [sys.executable, str(self.script), action, "{lab_name}", "{speccluster_mac}"]

    def calls(self) -> list[list[str]]:
        """Every call so far: the stand-in's arguments."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            with conn:
                argv = json.loads(conn.makefile().readline())
                conn.sendall((json.dumps(self._act(argv)) + "\n").encode())

    def _act(self, argv: list[str]) -> dict[str, Any]:
        action, name = argv[0], argv[1]
        if name in self.failing:
            return {"status": 1, "stderr": BMC_ERROR + "\n"}
        host = lab_host(self.lab, name)
        if action == "on" and self.slow_boot:
            # As Wake-on-LAN does: the command returns at once, the machine answers later.
            boot = threading.Thread(target=self._boot, args=(host,), name=f"boot {name}", daemon=True)
            self._boots.append(boot)
            boot.start()
        elif action == "on":
            host.restart_sshd()
        else:
            host.kill_all()
        return {"status": 0, "stderr": ""}

    def _boot(self, host: Any) -> None:
        self.booted.wait(DEADLINE)
        if not self._stop.is_set():
            host.restart_sshd()

    def close(self) -> None:
        self._stop.set()
        self.booted.set()
        self._thread.join(10)
        for boot in self._boots:
            boot.join(20)
        self._server.close()


@pytest.fixture
def power(lab: Any, tmp_path: Path) -> Iterator[PowerStandIn]:
    switch = PowerStandIn(lab, tmp_path)
    try:
        yield switch
    finally:
        switch.close()
        for host in lab.hosts:
            if not host.sshd_running:
                host.restart_sshd()


def host_vars(power: PowerStandIn, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "lab_name": name,
        "speccluster_mac": f"52:54:00:00:00:{name[1:]:0>2}",
        "speccluster_power_on": power.command("on"),
        "speccluster_power_off": power.command("off"),
        "speccluster_boot_timeout": 30,
        **extra,
    }


def test_a_host_off_at_start_wakes_joins_and_sleeps_again_when_idle(
    lab: Any, tmp_path: Path, power: PowerStandIn
) -> None:
    """h2 is off at start: woken once, it joins with no scale; idle, drained and powered off; h1 was on and stays on."""
    h1, h2 = lab.hosts[0].name, lab.hosts[1].name
    path = inventory(lab, tmp_path, {n: host_vars(power, n, speccluster_idle_poweroff="2s") for n in (h1, h2)})
    lab_host(lab, h2).kill_all()

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=2, min_workers=2, connect_timeout=5) as (cluster, _):
            assert len(names(cluster)) == 2  # h2's worker joined during the start: no scale
            assert power.calls() == [["on", h2, "52:54:00:00:00:02"]]
            hosts = cluster.status_report()["hosts"]
            assert (hosts[h1]["power"], hosts[h2]["power_label"]) == ("on", "awake (woken)"), hosts
            log = str((await cluster.get_logs(cluster=True, scheduler=False, workers=False))["Cluster"])
            assert f"host {h2}: power on: " in log and "exited 0" in log, log

            await cluster.scale(0)
            await until(lambda: cluster.power.book.state(h2) == Power.ASLEEP, DEADLINE, f"{h2} to be powered off")
            assert power.calls()[-1] == ["off", h2, "52:54:00:00:00:02"]
            assert not lab_host(lab, h2).sshd_running
            # h1 was idle as long: a few more looks, and it is still on, never powered off.
            seen = cluster.power.passes
            await until(lambda: cluster.power.passes >= seen + 3, DEADLINE, "three more looks at the idle hosts")
            assert ["off", h1, "52:54:00:00:00:01"] not in power.calls()
            assert cluster.status_report()["hosts"][h1]["power"] == "on"
            assert cluster.status_report()["hosts"][h2]["power_label"] == "asleep"
            assert not cluster.host_table.drained()  # drained only while it was powered off

    run(main())


def test_adapt_wakes_exactly_the_hosts_the_load_needs(lab: Any, tmp_path: Path, power: PowerStandIn) -> None:
    """h1 answers, h2 and h3 sleep: two tasks that block need two workers, so h2 is woken and h3 is not."""
    h1, h2, h3 = (h.name for h in lab.hosts[:3])
    path = inventory(lab, tmp_path, {n: host_vars(power, n) for n in (h1, h2, h3)})
    lab_host(lab, h2).kill_all()
    lab_host(lab, h3).kill_all()

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=1, connect_timeout=5) as (cluster, _):
            await until(lambda: cluster.power.book.state(h3) == Power.ASLEEP, DEADLINE, "h3 to be found asleep")
            assert power.calls() == []
            cluster.adapt(minimum=1, maximum=3, interval="200ms", target_duration="0.1s")
            async with Client(cluster, asynchronous=True) as client:
                go = Event("go", client=client)
                futures = client.map(lambda i: Event("go").wait(120), range(2), pure=False)
                await until(lambda: len(names(cluster)) == 2, DEADLINE, "a second worker")
                assert power.calls() == [["on", h2, "52:54:00:00:00:02"]]
                hosts = cluster.status_report()["hosts"]
                labels = [hosts[n]["power_label"] for n in (h1, h2, h3)]
                assert labels == ["on", "awake (woken)", "asleep"], labels
                await go.set()
                assert all(await client.gather(futures))
            assert [c for c in power.calls() if c[1] == h3] == []

    run(main())


def test_a_failing_power_command_is_one_clear_error_and_placeholders_cannot_inject(
    lab: Any, tmp_path: Path, power: PowerStandIn
) -> None:
    """The BMC refuses: the host is down with the command's stderr; a MAC of ``$(touch x)`` is one argument."""
    h1, h2 = lab.hosts[0].name, lab.hosts[1].name
    marker = tmp_path / "injected"
    evil = f"$(touch {marker})"
    path = inventory(lab, tmp_path, {h1: {}, h2: host_vars(power, h2, speccluster_mac=evil)})
    lab_host(lab, h2).kill_all()
    power.failing.add(h2)

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=2, min_workers=1, connect_timeout=5) as (cluster, _):
            await until(lambda: cluster.status_report()["hosts"][h2]["state"] == "down", DEADLINE, f"{h2} to be down")
            reason = cluster.status_report()["hosts"][h2]["reason"]
            assert reason.startswith("power on command") and "failed with exit status 1" in reason, reason
            assert BMC_ERROR in reason, reason
            assert cluster.status_report()["hosts"][h2]["power_label"] == "asleep"
        assert power.calls()[0] == ["on", h2, evil]  # one argument, as written
        assert not marker.exists()

    run(main())


def test_status_and_hosts_show_the_power_states(lab: Any, tmp_path: Path, power: PowerStandIn, cli: Cli) -> None:
    """``hosts`` says asleep without waking; ``status`` and ``hosts`` show on, waking (N s), awake (woken), then asleep."""
    h1, h2, h3 = (h.name for h in lab.hosts[:3])
    path = write_inventory(lab, tmp_path / "lab.yml", [h1, h2, h3],
                           host_vars={n: host_vars(power, n, speccluster_idle_poweroff="3s") for n in (h1, h2, h3)})
    lab_host(lab, h2).kill_all()
    lab_host(lab, h3).kill_all()
    power.slow_boot = True

    def show(*args: str) -> dict[str, Any]:
        print(f"$ speccluster-ssh {' '.join(args)}")
        text = cli.ok(*args).stdout
        print(text)
        return cli.json("status", "--name", "nap") if args[0] == "status" else {"text": text}

    def wait_power(host: str, state: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while cli.json("status", "--name", "nap")["hosts"][host]["power"] != state:
            assert time.monotonic() < deadline, f"{host} never became {state}"
            time.sleep(0.2)

    # The head's waking records go to a directory of this test's own (the agents on the lab hosts
    # have their own /var/tmp): another session's `hosts` on this machine must not see them.
    head_dir = tmp_path / "head-leases"
    head_dir.mkdir(mode=0o755)
    cli.env["SPECCLUSTER_SSH_LEASE_DIR"] = str(head_dir)

    def wait_hosts(host: str, state: str) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE
        while True:
            row = {h["host"]: h for h in cli.json("hosts", str(path))["hosts"]}[host]
            if row["power"] == state:
                return row
            assert time.monotonic() < deadline, f"hosts never said {host} is {state}: {row}"
            time.sleep(0.2)

    show("hosts", str(path))  # exit status 0: asleep is no failure
    assert power.calls() == []  # a survey never wakes a host
    data = cli.json("hosts", str(path))
    assert [h["power"] for h in data["hosts"]] == ["on", "asleep", "asleep"], data
    show("up", str(path), "--detach", "--name", "nap", "--workers", "1", "--timeout", "60")
    wait_power(h3, "asleep")
    show("scale", "2", "--name", "nap")
    wait_power(h2, "waking")
    report = show("status", "--name", "nap")
    assert report["hosts"][h2]["power_label"].startswith("waking ("), report["hosts"][h2]
    # `hosts` (another process) sees it too: the cluster says so on the head while the host boots.
    row = wait_hosts(h2, "waking")
    assert row["power_by"]["name"] == "nap" and row["power_since"], row
    show("hosts", str(path))
    power.booted.set()
    wait_power(h2, "awake")
    report = show("status", "--name", "nap")
    assert [report["hosts"][n]["power_label"] for n in (h1, h2, h3)] == ["on", "awake (woken)", "asleep"]
    # Once woken, the cluster's agent on the host says so there, with the cluster and its user.
    row = wait_hosts(h2, "awake")
    assert (row["power_by"]["name"], row["power_by"]["user"]) == ("nap", getpass.getuser()), row
    assert f"{h2}: awake (woken by nap of {getpass.getuser()}, from " in show("hosts", str(path))["text"]
    show("scale", "1", "--name", "nap")
    wait_power(h2, "asleep")
    report = show("status", "--name", "nap")
    assert report["summary"]["hosts_asleep"] == 2 and report["hosts"][h2]["state"] == "asleep", report["summary"]
    cli.ok("down", "--name", "nap", timeout=120)
    assert [c[:2] for c in power.calls()] == [["on", h2], ["off", h2]]


def test_a_power_off_starting_with_ssh_runs_on_the_host_and_always_powers_off_a_host_that_was_on(
    lab: Any, tmp_path: Path, power: PowerStandIn
) -> None:
    """``speccluster_power_manage: always``: h1 was on and idle; its ``[ssh, ...]`` power-off runs there, as an argv."""
    h1, h2 = lab.hosts[0].name, lab.hosts[1].name
    record = tmp_path / "suspended"
    marker = tmp_path / "injected"
    evil = f"$(touch {marker}) 'x'"
    script = "import socket, sys; open(sys.argv[1], 'a').write(socket.gethostname() + ' ' + sys.argv[2])"
    suspend = ["ssh", sys.executable, "-c", script, str(record), "{speccluster_mac}"]
    path = inventory(lab, tmp_path, {
        h2: {},  # first: the one entry goes there, and h1 stays idle
        h1: host_vars(power, h1, speccluster_power_off=suspend, speccluster_power_manage="always",
                      speccluster_idle_poweroff="1s", speccluster_mac=evil),
    })

    async def main() -> None:
        async with lab_cluster(lab, path, n_workers=1, connect_timeout=5) as (cluster, _):
            assert cluster.worker_spec["0"]["options"]["host"] == h2
            await until(lambda: cluster.power.book.state(h1) == Power.ASLEEP, DEADLINE, f"{h1} to be powered off")
            assert record.read_text() == f"{h1} {evil}"  # ran on h1, the value as one argument
            assert not marker.exists()
            log = str((await cluster.get_logs(cluster=True, scheduler=False, workers=False))["Cluster"])
            assert f"host {h1}: power off: {sys.executable} on {h1} exited 0" in log, log
            assert power.calls() == []  # nothing ran on the head

    run(main())
