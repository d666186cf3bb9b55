"""``speccluster-ssh run`` and ``speccluster-ssh dashboard``, and dashboards on loopback by default.

Unit tests (no lab): dashboard addresses, the client environment ``run``
gives, the ``ssh -L`` lines (``-J`` through an inventory's jump hosts).
Lab tests: a detached cluster whose scheduler runs in the head and one on a
lab host: ``run`` exits with its command's status and its ``Client()``
computes; the dashboard answers on loopback, not on the lab address of its
host, unless ``--dashboard-address`` exposes it.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil
import pytest
from sshlab import Lab
from test_cli_lab import Cli, cli, fetch, settle, write_inventory  # noqa: F401  (cli is a fixture)

from speccluster_ssh import state as st
from speccluster_ssh.cli.tools import client_environment, dashboard_lines, this_machine
from speccluster_ssh.dashboards import (
    checked_address,
    dashboard_bind,
    host_tunnel_argv,
    on_loopback,
    reach_host,
    split_dashboard_address,
)
from speccluster_ssh.entries import local_scheduler_entry
from speccluster_ssh.errors import UserError
from speccluster_ssh.inventory import load_inventory
from speccluster_ssh.placement import worker_options
from speccluster_ssh.security import make_security

# -- unit tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        (None, 8787, "127.0.0.1:8787"),
        ("127.0.0.1", 0, "127.0.0.1:0"),
        ("0.0.0.0", 8787, "0.0.0.0:8787"),
        ("0.0.0.0:9000", 8787, "0.0.0.0:9000"),
        (":9000", 8787, ":9000"),
        ("::1", 8787, "[::1]:8787"),
        ("[::]:9000", 8787, "[::]:9000"),
    ],
)
def test_dashboard_bind(address: str | None, port: int, expected: str) -> None:
    assert dashboard_bind(address, port) == expected


def test_dashboard_addresses_are_checked() -> None:
    assert split_dashboard_address("[::1]:8787") == ("::1", 8787)
    assert checked_address(None) is None and checked_address(" 0.0.0.0:1 ") == "0.0.0.0:1"
    for bad in ("0.0.0.0:http", "host:99999", "a b", 8787):
        with pytest.raises(UserError, match="dashboard address"):
            checked_address(bad)
    assert on_loopback("127.0.0.1:0") and on_loopback("localhost:1") and on_loopback("[::1]:2")
    assert not on_loopback(":0") and not on_loopback("0.0.0.0:8787") and not on_loopback(None)
    # Where a server given each address is reached on its own host (the forward's and the link's host).
    assert [reach_host(a, "10.0.0.3") for a in ("127.0.0.1:0", "localhost", "10.0.0.9:1", ":0", "0.0.0.0", None)] == [
        "127.0.0.1", "127.0.0.1", "10.0.0.9", "10.0.0.3", "10.0.0.3", "10.0.0.3",
    ]


def test_dashboards_default_to_loopback() -> None:
    """The scheduler's and the workers' dashboards listen on loopback unless told otherwise."""
    sec, _ = make_security(False, "t-1")
    entry = local_scheduler_entry(object, sec, 0, 8787)
    assert entry["options"]["dashboard_address"] == "127.0.0.1:8787"
    exposed = local_scheduler_entry(object, sec, 0, 8787, dashboard_address="0.0.0.0")
    assert exposed["options"]["dashboard_address"] == "0.0.0.0:8787"
    (host,) = load_inventory_text("all:\n  hosts:\n    n1: {ansible_host: 10.0.0.1}\n").worker_hosts
    assert worker_options(host)["dashboard_address"] == "127.0.0.1:0"


def test_the_shipped_config_binds_the_dashboard_to_loopback() -> None:
    from speccluster_ssh import config

    assert config.get("dashboard-address") == "127.0.0.1"


def load_inventory_text(text: str, tmp: Path | None = None) -> Any:
    directory = Path(tmp or tempfile.mkdtemp())
    path = directory / "inv.yml"
    path.write_text(textwrap.dedent(text))
    return load_inventory(path)


def test_client_environment_makes_a_plain_client_connect_with_tls(tmp_path: Path) -> None:
    """The DASK_* variables of client.yaml give the scheduler address and the TLS files, over any DASK_CONFIG."""
    sec, _ = make_security(True, "t-2")
    path = st.write_client_files(tmp_path, "tls://10.0.0.1:8786", sec)
    env = client_environment(path)
    assert env["DASK_SCHEDULER_ADDRESS"] == "tls://10.0.0.1:8786"
    # The user's own dask config names another scheduler: the variables win.
    own = tmp_path / "own"
    own.mkdir()
    (own / "dask.yaml").write_text("scheduler-address: tcp://elsewhere:1\n")
    probe = (
        "import dask, distributed, json;"
        "g = dask.config.get;"
        "print(json.dumps([g('scheduler-address'), g('distributed.comm.require-encryption'),"
        " g('distributed.comm.tls.ca-file'), g('distributed.comm.tls.client.cert'),"
        " g('distributed.comm.tls.client.key')]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "DASK_CONFIG": str(own), **env},
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert json.loads(result.stdout) == [
        "tls://10.0.0.1:8786", True, str(tmp_path / st.CA_FILE),
        str(tmp_path / st.CLIENT_CERT), str(tmp_path / st.CLIENT_KEY),
    ]


def test_ssh_lines_to_the_head_and_through_jump_hosts(tmp_path: Path) -> None:
    """The head's line goes to this machine; a remote scheduler's goes there through its whole -J chain."""
    inventory = load_inventory_text(
        """
        all:
          hosts:
            gw: {ansible_host: 192.0.2.10, ansible_user: admin, ansible_port: 2222}
          children:
            scheduler:
              hosts:
                s1:
                  ansible_host: 10.1.0.3
                  ansible_user: dask
                  ansible_port: 2200
                  ansible_ssh_common_args: -o ProxyJump=gw,ops@10.1.0.1
            workers:
              hosts:
                w1: {ansible_host: 10.1.0.4}
        """,
        tmp_path,
    )
    s1 = inventory.hosts["s1"]
    assert host_tunnel_argv(s1, "127.0.0.1", 8790) == [
        "ssh", "-N", "-L", "8787:127.0.0.1:8790", "-J", "admin@192.0.2.10:2222,ops@10.1.0.1",
        "-p", "2200", "dask@10.1.0.3",
    ]
    # Forwarded to the head's loopback: the laptop's line goes to the head; the other straight to s1.
    where = {"link": "http://127.0.0.1:41234/status", "host": "s1", "bind": "127.0.0.1", "port": 8790}
    lines = dashboard_lines(where["link"], where, "me@head.example.org", 9999, s1)
    assert lines["ssh"] == ["ssh", "-N", "-L", "9999:127.0.0.1:41234", "me@head.example.org"]
    assert lines["ssh_direct"][:6] == [
        "ssh", "-N", "-L", "9999:127.0.0.1:8790", "-J", "admin@192.0.2.10:2222,ops@10.1.0.1",
    ]
    assert lines["local_url"] == "http://localhost:9999/status" and lines["listens_on"] == "loopback"
    # Exposed on every interface of the head: still a line, to the address the link names.
    where = {"link": "http://10.250.0.1:8787/status", "host": None, "bind": "", "port": 8787}
    lines = dashboard_lines(where["link"], where, "head")
    assert lines["ssh"] == ["ssh", "-N", "-L", "8787:10.250.0.1:8787", "head"] and lines["listens_on"] == "network"
    assert "ssh_direct" not in lines


def test_run_and_dashboard_need_a_running_cluster(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    env.pop("DASK_SPECCLUSTER_SSH__STATE_DIR", None)
    for args in (["run", "--", "true"], ["dashboard"], ["run", "--name", "nope", "--", "true"]):
        result = subprocess.run(
            [sys.executable, "-m", "speccluster_ssh.cli", *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, (args, result)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_up_refuses_a_bad_dashboard_address(tmp_path: Path) -> None:
    inventory = tmp_path / "inv.yml"
    inventory.write_text("all:\n  hosts:\n    localhost: {ansible_connection: local}\n")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    env.pop("DASK_SPECCLUSTER_SSH__STATE_DIR", None)
    result = subprocess.run(
        [sys.executable, "-m", "speccluster_ssh.cli", "up", str(inventory), "--dashboard-address", "0.0.0.0:web"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "speccluster-ssh: error: dashboard address '0.0.0.0:web': the port must be a number from 0 to 65535; "
        "write HOST or HOST:PORT, e.g. 127.0.0.1 or 0.0.0.0:8787"
    ]


# -- on the lab ----------------------------------------------------------------------------------


def _listening(pid: int, port: int) -> set[str]:
    """The addresses process ``pid`` listens on at TCP ``port``."""
    return {
        c.laddr.ip for c in psutil.Process(pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def _connects(address: str, port: int) -> bool:
    """Whether a TCP connection to ``address:port`` (loopback or the lab) is accepted."""
    try:
        with socket.create_connection((address, port), timeout=10):
            return True
    except OSError:
        return False


@pytest.mark.lab
@pytest.mark.timeout(400)
def test_run_and_the_head_dashboard(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """Scheduler in the head (TLS): run's Client() computes and its status is run's; the dashboard is loopback only."""
    inventory = write_inventory(lab, tmp_path / "run.yml", ["h1"])
    state = cli.up_detached(inventory, "rd")
    settle(cli, lab, "rd", state["cluster_id"], 1)

    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        "from distributed import Client\n"
        "with Client(timeout=60) as client:\n"
        "    print(client.submit(sum, [1, 2, 3]).result(), client.scheduler.address)\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    result = cli.run("run", "--name", "rd", "--", sys.executable, str(script), "7")
    assert result.returncode == 7, result
    assert result.stdout.split() == ["6", state["scheduler_address"]], result.stdout
    # A signal: 128 + N, as a shell says it.
    result = cli.run("run", "--name", "rd", "--", sys.executable, "-c", "import os; os.kill(os.getpid(), 15)")
    assert result.returncode == 128 + 15, result
    # Not found: one line, 127; and the argv is not a shell line.
    result = cli.run("run", "--name", "rd", "--", "no-such-command-here", "x; touch /tmp/never")
    assert result.returncode == 127 and "Traceback" not in result.stderr, result
    assert result.stderr.strip().splitlines() == [
        "speccluster-ssh: error: run: command not found: no-such-command-here"
    ]

    # An interrupt of run (here not from a terminal) reaches the command, whose status run returns.
    waiter = (
        "import sys, time\nprint('ready', flush=True)\n"
        "try:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n    sys.exit(42)\n"
    )
    proc = cli.popen("run", "--name", "rd", "--", sys.executable, "-c", waiter)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 42, proc.communicate()

    # The dashboard: on the head's loopback, answering there, not on its lab address.
    link = state["dashboard_link"]
    parts = urllib.parse.urlsplit(link)
    assert parts.hostname == "127.0.0.1" and parts.port, link
    assert fetch(link, lab)[0] == 200
    assert _listening(state["pid"], parts.port) == {"127.0.0.1"}
    assert not _connects(lab.head_ip, parts.port)
    shown = cli.ok("dashboard", "--name", "rd", "--ssh-host", "me@head.example.org").stdout
    assert f"dashboard: {link}" in shown
    assert f"ssh -N -L 8787:127.0.0.1:{parts.port} me@head.example.org" in shown, shown
    assert cli.json("dashboard", "--name", "rd")["ssh"][-1] == f"{_user()}@{this_machine()}"
    cli.ok("down", "--name", "rd")

    # Exposed on request: then the head's lab address answers too.
    state = cli.up_detached(inventory, "rx", "--dashboard-address", "0.0.0.0")
    port = urllib.parse.urlsplit(state["dashboard_link"]).port
    assert port and _listening(state["pid"], port) == {"0.0.0.0"}
    assert fetch(f"http://{lab.head_ip}:{port}/status", lab)[0] == 200
    cli.ok("down", "--name", "rx")


def _user() -> str:
    return getpass.getuser()


@pytest.mark.lab
@pytest.mark.timeout(400)
def test_dashboard_of_a_scheduler_behind_a_jump_host(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """Scheduler on h4, whose SSH is reached only through h1: its dashboard is on h4's loopback.

    The head forwards it to its own loopback; ``dashboard`` prints a line to
    the head and one straight to h4 through the jump host, and that second
    line, run by the real ``ssh`` here (the lab's keys from its ssh_config),
    brings the dashboard to a local port.
    """
    h1, h4 = lab.host("h1"), lab.host("h4")
    # h1 is an inventory host (group jumps), so the hop takes its address, user and key.
    inventory = Path(lab.write_inventory(
        tmp_path / "remote.yml", groups={"workers": ["h2"], "scheduler": ["h4"], "jumps": ["h1"]},
        host_vars={"h4": {"ansible_ssh_common_args": f"{_strict_args(lab)} -o ProxyJump=h1"}},
        group_vars={"all": {"speccluster_nthreads": 1}},
    ))
    lab.make_private([h4], [h1])
    try:
        assert not _connects(h4.ip, 22), "the head still reaches h4's sshd directly"
        state = cli.up_detached(inventory, "rs", "--no-tls")
        report = settle(cli, lab, "rs", state["cluster_id"], 1)
        assert report["scheduler_reach"]["mode"] == "direct", report["scheduler_reach"]
        link = state["dashboard_link"]
        assert urllib.parse.urlsplit(link).hostname == "127.0.0.1", link  # the head's forward
        status, body = fetch(link, lab)
        assert status == 200 and "Dask" in body
        where = report["dashboard"]
        assert (where["host"], where["bind"]) == ("h4", "127.0.0.1") and where["port"], where
        assert not _connects(h4.ip, where["port"])  # not on h4's lab address

        local_port = _free_port()
        shown = cli.json("dashboard", "--name", "rs", "--ssh-host", "head", "--local-port", str(local_port))
        head_port = urllib.parse.urlsplit(link).port
        assert shown["ssh"] == ["ssh", "-N", "-L", f"{local_port}:127.0.0.1:{head_port}", "head"]
        direct = shown["ssh_direct"]
        assert direct == [
            "ssh", "-N", "-L", f"{local_port}:127.0.0.1:{where['port']}", "-J", f"root@{h1.ip}", f"root@{h4.ip}",
        ], direct
        human = cli.ok("dashboard", "--name", "rs", "--ssh-host", "head").stdout
        assert "straight to h4" in human and f"-J root@{h1.ip} root@{h4.ip}" in human, human

        # The line works: ssh (keys and known_hosts from the lab's ssh_config) through h1 to h4's loopback.
        tunnel = subprocess.Popen(
            [direct[0], "-F", str(lab.ssh_config), "-o", "ExitOnForwardFailure=yes", *direct[1:]],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            url = f"http://127.0.0.1:{local_port}/status"
            deadline = time.monotonic() + 60
            while not _connects("127.0.0.1", local_port):
                assert tunnel.poll() is None, tunnel.communicate()
                assert time.monotonic() < deadline, "the ssh tunnel did not listen"
                time.sleep(0.2)
            status, body = fetch(url, lab)
            assert status == 200 and "Dask" in body
        finally:
            tunnel.terminate()
            tunnel.wait(timeout=30)
        cli.ok("down", "--name", "rs")
    finally:
        h4.clear_firewall()


def _strict_args(lab: Lab) -> str:
    return (
        f"-o UserKnownHostsFile={lab.known_hosts} -o GlobalKnownHostsFile=/dev/null "
        "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
