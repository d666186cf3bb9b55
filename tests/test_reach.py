"""Heads the hosts cannot reach: the scheduler on a lab host, reached through SSH forwards.

Topologies come from sshlab (nftables rules inside the host namespaces;
the lab's reset() and the helpers here undo them):

- SSH-only hosts: the head may open only SSH to them, and they may open
  nothing towards the head (an extra output chain in their namespace);
- a strict bastion in front of private hosts, which drop everything the head sends;
- a host whose peers drop what it sends: ``check`` names it in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from sshlab import Lab, LabHost, processes_besides_sshd
from test_cli_lab import Cli, cli, write_inventory  # noqa: F401  (cli is a fixture)
from test_jump import _need, _watch_bastion, assert_nothing_left_after_head_kill, head_process
from test_peer import SMALL, run, slowinc, until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(400)]


def _nft(host: LabHost, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], input=script, text=True,
                   check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def _ssh_only(lab: Lab, hosts: Sequence[LabHost]) -> Iterator[None]:
    """The head reaches ``hosts`` only on port 22; they open nothing towards the head."""
    try:
        lab.make_ssh_only(hosts)
        for host in hosts:
            # Outgoing: only sshd's own replies may go to the head.
            _nft(host, textwrap.dedent(f"""\
                table inet sclabout
                delete table inet sclabout
                table inet sclabout {{
                  chain output {{
                    type filter hook output priority 0; policy accept;
                    ip daddr {lab.head_ip} tcp sport != 22 drop
                    ip daddr {lab.head_ip} meta l4proto != tcp drop
                  }}
                }}
                """))
        yield
    finally:
        for host in hosts:
            with contextlib.suppress(subprocess.CalledProcessError):
                _nft(host, "table inet sclabout\ndelete table inet sclabout\n")
            host.clear_firewall()


def _probe_head_from(host: LabHost, head_ip: str) -> bool:
    """Whether ``host`` can open a connection to a port the head listens on."""
    server = socket.create_server(("0.0.0.0", 0))
    try:
        port = server.getsockname()[1]
        code = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).close()"
        return host.exec([sys.executable, "-c", code, head_ip, str(port)]).returncode == 0
    finally:
        server.close()


@contextlib.asynccontextmanager
async def _forward_cluster(lab: Lab, path: Path, **options: Any) -> AsyncIterator[Any]:
    """An asynchronous cluster on the lab; checked clean after (its scheduler is remote)."""
    from speccluster_ssh.cluster import SSHSpecCluster

    options.setdefault("n_workers", 0)
    options.setdefault("security", True)
    async with SSHSpecCluster(inventory=path, known_hosts=str(lab.known_hosts), asynchronous=True, **options) as cluster:
        yield cluster
    await until(lambda: not processes_besides_sshd(lab), 20, "every process on the lab hosts to end")


def _http_status(url: str) -> int:
    # Generous: the first render of the bokeh status page is slow on a loaded machine.
    with urllib.request.urlopen(url, timeout=60) as response:  # the forward on the head's loopback
        return int(response.status)


def test_ssh_only_hosts_forward_the_scheduler(lab: Lab, tmp_path: Path) -> None:
    """No scheduler group, hosts that reach nothing of the head: auto forwards, picks a host, computes."""
    _need(lab, 3)
    hosts = lab.hosts[:3]
    path = Path(lab.write_inventory(
        tmp_path / "inv.yml", groups={"workers": [h.name for h in hosts]},
        host_vars={h.name: {**SMALL, "speccluster_slots": 2} for h in hosts},
    ))

    async def main() -> None:
        async with _forward_cluster(lab, path) as cluster:
            reach = cluster.status_report()["scheduler_reach"]
            assert (reach["mode"], reach["setting"], reach["scheduler_host"]) == ("forward", "auto", hosts[0].name)
            assert "cannot open a connection to the head" in reach["why"]
            assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
            assert cluster.scheduler.address.startswith(f"tls://{hosts[0].ip}:")  # what workers use
            assert cluster.dashboard_link.startswith("http://127.0.0.1:")
            cluster.scale(5)
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(5, timeout=120)
                assert await client.gather(client.map(slowinc, range(20), delay=0.0)) == list(range(1, 21))
                where = await client.run(socket.gethostname)
                assert len(where) == 5 and set(where.values()) <= {h.name for h in hosts}, where
                # In a thread: the forward runs in this event loop.
                assert await asyncio.to_thread(_http_status, cluster.dashboard_link) == 200
                cluster.scale(2)
                # Retiring goes through the forwarded scheduler_comm.
                await until(lambda: len(cluster.scheduler_info["workers"]) == 2, 60, "two workers")

    with _ssh_only(lab, hosts):
        assert not any(_probe_head_from(h, lab.head_ip) for h in hosts), "a host still reaches the head"
        run(main(), timeout=300)


HEAD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from speccluster_ssh.cluster import SSHSpecCluster
    cluster = SSHSpecCluster.from_inventory(
        sys.argv[1], known_hosts=sys.argv[2], ssh_config=[sys.argv[3]], n_workers=int(sys.argv[4]), silence=5,
    )
    from distributed import Client
    with Client(cluster) as client:
        client.wait_for_workers(int(sys.argv[4]), timeout=120)
        assert client.submit(sum, [1, 2, 3]).result() == 6
    print("READY", cluster.scheduler_address, cluster.status_report()["scheduler_reach"]["mode"], flush=True)
    time.sleep(600)
    """
)


def test_bastion_scheduler_on_a_private_host(lab: Lab, tmp_path: Path) -> None:
    """MaxStartups 2:100:2 bastion, private hosts that drop all the head sends, scheduler on one of them.

    Four private hosts on a lab of five (SCLAB_HOSTS=5); three, with two
    slots each, on CI's lab of four: six workers either way.
    """
    _need(lab, 4)
    bastion, private = lab.hosts[0], lab.hosts[1:5]
    config = lab.write_ssh_config(tmp_path / "ssh_config", {h.name: bastion.name for h in private})
    # The first private host is the scheduler host too.
    path = Path(lab.write_inventory(
        tmp_path / "inv.yml", host_vars={h.name: {**SMALL, "speccluster_slots": 2} for h in private},
        groups={"scheduler": [private[0].name], "workers": [h.name for h in private]},
    ))

    async def main() -> None:
        async with _watch_bastion(lab, bastion) as peak:
            async with _forward_cluster(lab, path, ssh_config=[str(config)]) as cluster:
                reach = cluster.status_report()["scheduler_reach"]
                assert (reach["mode"], reach["scheduler_host"]) == ("forward", private[0].name), reach
                assert "cannot open a connection to the scheduler host h2, which it reaches over SSH only through jump host h1" in reach["why"]
                cluster.scale(6)
                async with Client(cluster, asynchronous=True) as client:
                    await client.wait_for_workers(6, timeout=150)
                    results = await client.gather(client.map(slowinc, range(40), delay=0.0))
                    assert results == list(range(1, 41))
                    where = await client.run(socket.gethostname)
                    assert len(where) == 6 and set(where.values()) <= {h.name for h in private}, where
                assert cluster.pool.settings.jumps.open_connections() == 1
            assert peak[0] == 1, f"the head held {peak[0]} connections to the bastion"

    try:
        lab.make_bastion(bastion)
        lab.make_private(private, [bastion], from_head="all")
        run(main(), timeout=360)
        args = [str(path), str(lab.known_hosts), str(config), "4"]
        with head_process(HEAD_SCRIPT, args, ready_within=180) as line:
            assert line.startswith("READY") and line.split()[1].startswith("tls://127.0.0.1:"), line
            assert line.split()[2] == "forward", line
            assert bastion.ssh_peers().count(lab.head_ip) == 1
        assert_nothing_left_after_head_kill(lab, 15)
    finally:
        for host in [bastion, *private]:
            host.clear_firewall()


def test_check_names_a_host_that_cannot_reach_its_peers(lab: Lab, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    """The head reaches h3, but h1 and h2 drop what h3 sends them: check says so in one line."""
    _need(lab, 3)
    h1, h2, h3 = lab.hosts[:3]
    inventory = write_inventory(lab, tmp_path / "check.yml", ["h1", "h2", "h3"])
    try:
        for peer in (h1, h2):
            peer.firewall([f"ip saddr {h3.ip} drop"])
        result = cli.run("check", str(inventory), "--timeout", "20")
        report = json.loads(cli.run("check", str(inventory), "--timeout", "20", "--json").stdout)
    finally:
        for peer in (h1, h2):
            peer.clear_firewall()
    print(result.stdout, result.stderr)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("h3: cannot reach")]
    assert lines == [
        f"h3: cannot reach any of its peers (h1: {lines[0].split('(h1: ')[1].split(')')[0]}); "
        "dask workers must reach each other directly, so open TCP between the hosts"
    ], result.stdout
    assert "up would run the scheduler on the head, mode direct" in result.stdout
    rows = {row["host"]: row for row in report["hosts"]}
    assert rows["h3"]["reaches_peers"] is False and rows["h3"]["unreached_peers"] == ["h1", "h2"]
    assert rows["h1"]["reaches_peers"] is True and rows["h1"]["ok"], rows["h1"]
    assert report["scheduler_reach"]["mode"] == "direct"


def test_detached_head_keeps_the_forwards(lab: Lab, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    """up --detach on SSH-only hosts: client-config and status give addresses that work on the head."""
    _need(lab, 2)
    hosts = lab.hosts[:2]
    inventory = write_inventory(lab, tmp_path / "fwd.yml", [h.name for h in hosts], speccluster_slots=2)
    with _ssh_only(lab, hosts):
        state = cli.up_detached(inventory, "fwd", "--workers", "3")
        try:
            assert state["scheduler_address"].startswith("tls://127.0.0.1:"), state
            assert state["dashboard_link"].startswith("http://127.0.0.1:"), state
            assert _http_status(state["dashboard_link"]) == 200
            report = cli.json("status", "--name", "fwd")
            assert report["scheduler_reach"]["mode"] == "forward", report
            assert report["scheduler_address"] == state["scheduler_address"]
            snippet = cli.ok("client-config", "--name", "fwd").stdout
            assert repr(state["scheduler_address"]) in snippet
            # The snippet connects a client on the head, through the head process's forward.
            code = snippet + "\nprint(len(client.wait_for_workers(3, timeout=60) or client.scheduler_info()['workers']))\n"
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                    env=cli.env)
            assert result.returncode == 0 and result.stdout.split()[-1] == "3", (result.stdout, result.stderr)
            assert "reach:     forward, scheduler on h1" in cli.ok("status", "--name", "fwd").stdout
        finally:
            cli.ok("down", "--name", "fwd", "--timeout", "60")
