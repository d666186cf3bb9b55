"""IPv6-only and dual-stack labs (issue 26).

One lab of three hosts for the whole module, built with ``Lab(ipv6=True,
ipv4=False)``: every host has an IPv4 and an IPv6 address, and drops every
IPv4 packet but loopback's (nftables in its own namespace). So it is an
IPv6-only lab to an inventory of IPv6 literals, and a dual-stack lab with
IPv4 blocked to an inventory of names that resolve to both families.

The tests build their own lab on the session lab's prefix and subnet, so
they run first (``lab_first``), before the session lab exists; the lab's
IPv6 /64 comes from the subnet (``10.250.71`` -> ``fd00:250:71::/64``).

Names: "AAAA only" is a name that the inventory's ssh_config maps to the
host's IPv6 address (``HostName``), as the lab has no DNS; "both families" is
a name in an ``/etc/hosts`` of the head's own, bind-mounted in a private
mount namespace of the command under test (``unshare --mount``), so the
machine's own ``/etc/hosts`` is never touched.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

import sshlab
from sshlab import Lab, processes_besides_sshd
from test_cli_lab import Cli, cli  # noqa: F401  (cli is a fixture)
from test_jump import assert_nothing_left_after_head_kill, head_process
from test_peer import SMALL, run, slowinc, until

pytestmark = [pytest.mark.lab, pytest.mark.lab_first, pytest.mark.timeout(400)]

_SUBNET = os.environ.get("SCLAB_SUBNET", "10.250.0")
_PREFIX = os.environ.get("SCLAB_PREFIX", "sclab")


@pytest.fixture(scope="module")
def lab6() -> Iterator[Lab]:
    """Three hosts with IPv4 and IPv6 addresses, IPv4 dropped inside each."""
    if sshlab._ACTIVE_KEYS:
        pytest.fail("this module builds its own lab and must run before the session lab starts")
    lab = Lab(3, prefix=_PREFIX[:9] + "6", subnet_base=_SUBNET, ipv6=True, ipv4=False)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(autouse=True)
def _reset_lab6(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "lab6" in request.fixturenames:
        report = request.getfixturevalue("lab6").reset()
        assert report.clean, f"{request.node.nodeid} left processes on lab hosts:\n{report}"


def _inventory(lab: Lab, path: Path, *, hosts: dict[str, str] | None = None, common_args: str = "",
               **host_vars: Any) -> Path:
    """Every lab host a worker, ``ansible_host`` its IPv6 address (or ``hosts[name]``)."""
    values = {h.name: {**SMALL, "speccluster_slots": 2, **host_vars} for h in lab.hosts}
    for name, address in (hosts or {}).items():
        values[name]["ansible_host"] = address
    group_vars: dict[str, dict[str, Any]] = {}
    if common_args:
        group_vars["all"] = {"ansible_ssh_common_args": (
            f"-o UserKnownHostsFile={lab.known_hosts} -o GlobalKnownHostsFile=/dev/null "
            f"-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes {common_args}"
        )}
    return Path(lab.write_inventory(path, host_vars=values, group_vars=group_vars, family=6))


def _http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=60) as response:
        return int(response.status)


def _v6_worker_addresses(addresses: Any, lab: Lab) -> bool:
    wanted = {f"[{h.ip6}]" for h in lab.hosts}
    return all(a.split("://")[1].rsplit(":", 1)[0] in wanted for a in addresses)


def test_ipv6_only_lab_starts_computes_scales_and_serves_its_dashboard(lab6: Lab, tmp_path: Path) -> None:
    """IPv6 literals in the inventory, nothing of IPv4 between head and hosts: up, compute, scale, dashboard, down."""
    from speccluster_ssh.cluster import SSHSpecCluster

    path = _inventory(lab6, tmp_path / "v6.yml")

    async def main() -> None:
        # The dashboard on the head's IPv6 address of the lab link, fetched over it.
        async with SSHSpecCluster(
            inventory=path, known_hosts=str(lab6.known_hosts), asynchronous=True, n_workers=3, security=True,
            dashboard_address=f"[{lab6.head_ip6}]:0",
        ) as cluster:
            reach = cluster.status_report()["scheduler_reach"]
            assert (reach["mode"], reach["scheduler_host"]) == ("direct", None), reach
            assert cluster.dashboard_link.startswith(f"http://[{lab6.head_ip6}]:"), cluster.dashboard_link
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(3, timeout=120)
                workers = list(await client.run(os.getpid))
                assert len(workers) == 3 and _v6_worker_addresses(workers, lab6), workers
                assert await client.gather(client.map(slowinc, range(20), delay=0.0)) == list(range(1, 21))
                # Workers fetch from each other over IPv6 too.
                first = client.submit(list, range(1000), workers=[workers[0]])
                assert await client.submit(len, first, workers=[workers[1]]) == 1000
                assert await asyncio.to_thread(_http_status, cluster.dashboard_link) == 200
                cluster.scale(6)
                await client.wait_for_workers(6, timeout=120)
                assert _v6_worker_addresses(list(await client.run(os.getpid)), lab6)
                cluster.scale(2)
                await until(lambda: len(cluster.scheduler_info["workers"]) == 2, 60, "two workers")
        await until(lambda: not processes_besides_sshd(lab6), 20, "every process on the lab hosts to end")

    run(main(), timeout=300)


HEAD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from speccluster_ssh.cluster import SSHSpecCluster
    cluster = SSHSpecCluster.from_inventory(sys.argv[1], known_hosts=sys.argv[2], n_workers=3, silence=5)
    from distributed import Client
    with Client(cluster) as client:
        client.wait_for_workers(3, timeout=120)
        assert client.submit(sum, [1, 2, 3]).result() == 6
        print("READY", *sorted(client.scheduler_info()["workers"]), flush=True)
    time.sleep(600)
    """
)


def test_ipv6_only_lab_leaves_nothing_after_a_head_sigkill(lab6: Lab, tmp_path: Path) -> None:
    path = _inventory(lab6, tmp_path / "v6.yml")
    with head_process(HEAD_SCRIPT, [str(path), str(lab6.known_hosts)], ready_within=150) as line:
        assert line.startswith("READY"), f"the head did not come up: {line!r}"
        assert _v6_worker_addresses(line.split()[1:], lab6), line
        assert processes_besides_sshd(lab6)
    assert_nothing_left_after_head_kill(lab6, 15)


def test_bastion_in_front_of_private_ipv6_hosts_in_forward_mode(lab6: Lab, tmp_path: Path) -> None:
    """``-J root@[fd00:..::11]:22``; the private hosts drop everything the head sends: the scheduler is forwarded."""
    from speccluster_ssh.cluster import SSHSpecCluster

    bastion, private = lab6.hosts[0], lab6.hosts[1:]
    # The hop as written is no inventory host: its key comes from ssh_config's "Host fd00:..::11" block.
    config = lab6.write_ssh_config(tmp_path / "ssh_config", family=6)
    path = Path(lab6.write_inventory(
        tmp_path / "bastion.yml", family=6,
        host_vars={h.name: {**SMALL, "speccluster_slots": 2,
                            "ansible_ssh_common_args": (
                                f"-o UserKnownHostsFile={lab6.known_hosts} -o StrictHostKeyChecking=yes "
                                f"-o IdentitiesOnly=yes -F {config} -J root@[{bastion.ip6}]:22")}
                   for h in private},
        groups={"workers": [h.name for h in private], "jumps": [bastion.name]},
    ))

    async def main() -> None:
        async with SSHSpecCluster(
            inventory=path, known_hosts=str(lab6.known_hosts), asynchronous=True, n_workers=3, security=True,
        ) as cluster:
            reach = cluster.status_report()["scheduler_reach"]
            assert (reach["mode"], reach["scheduler_host"]) == ("forward", private[0].name), reach
            assert cluster.scheduler.address.startswith(f"tls://[{private[0].ip6}]:"), cluster.scheduler.address
            assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(3, timeout=150)
                assert _v6_worker_addresses(list(await client.run(os.getpid)), lab6)
                assert await client.gather(client.map(slowinc, range(20), delay=0.0)) == list(range(1, 21))
                assert await asyncio.to_thread(_http_status, cluster.dashboard_link) == 200
            assert cluster.pool.settings.jumps.open_connections() == 1
        await until(lambda: not processes_besides_sshd(lab6), 20, "every process on the lab hosts to end")

    try:
        lab6.make_bastion(bastion)
        lab6.make_private(private, [bastion], from_head="all")
        run(main(), timeout=300)
    finally:
        for host in lab6.hosts:
            host.clear_firewall()


def test_check_on_an_ipv6_only_lab_says_ipv6(lab6: Lab, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    """Names that resolve (through the inventory's ssh_config) to an IPv6 address alone; check says IPv6."""
    names = {h.name: f"{h.name}-v6" for h in lab6.hosts}
    config = lab6.write_ssh_config(tmp_path / "ssh_config", family=6, names=names)
    path = _inventory(lab6, tmp_path / "names.yml", hosts=names, common_args=f"-F {config}")
    result = cli.run("check", str(path), "--timeout", "30")
    print(result.stdout, result.stderr)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "address family: IPv6 (h1, h2, h3)" in result.stdout
    assert "up would run the scheduler on the head, mode direct" in result.stdout
    report = cli.json("check", str(path), "--timeout", "30")
    rows = {row["host"]: row for row in report["hosts"]}
    assert {name: (row["family"], row["ok"], row["reaches_head"], row["reaches_peers"]) for name, row in rows.items()} == {
        h.name: ("IPv6", True, True, True) for h in lab6.hosts
    }, rows


def _in_own_hosts_file(hosts_file: Path, argv: list[str]) -> list[str]:
    """``argv`` run with ``hosts_file`` as its /etc/hosts, in a private mount namespace (the machine's file untouched)."""
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(hosts_file), *argv]


def test_dual_stack_with_ipv4_blocked_picks_ipv6(lab6: Lab, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    """Names with an IPv4 and an IPv6 address each, IPv4 dropped by the hosts: check and up use IPv6."""
    hosts_file = tmp_path / "hosts"
    lines = ["127.0.0.1 localhost", "::1 localhost"]
    for h in lab6.hosts:
        lines += [f"{h.ip} {h.name}-dual", f"{h.ip6} {h.name}-dual"]
    hosts_file.write_text("\n".join(lines) + "\n")
    found = subprocess.run(
        _in_own_hosts_file(hosts_file, [sys.executable, "-c", "import socket; print(sorted({a[4][0] for a in "
                                        "socket.getaddrinfo('h1-dual', 22, type=socket.SOCK_STREAM)}))"]),
        capture_output=True, text=True, timeout=30,
    )
    assert found.stdout.strip() == repr(sorted([lab6.hosts[0].ip, lab6.hosts[0].ip6])), (found.stdout, found.stderr)
    path = _inventory(lab6, tmp_path / "dual.yml", hosts={h.name: f"{h.name}-dual" for h in lab6.hosts})

    def run_cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        from test_cli_lab import _command

        return subprocess.run(_in_own_hosts_file(hosts_file, [*_command(), *args]), env=cli.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    result = run_cli("check", str(path), "--timeout", "30")
    print(result.stdout, result.stderr)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "address family: IPv6 (h1, h2, h3)" in result.stdout
    result = run_cli("up", str(path), "--detach", "--name", "dual", "--timeout", "60", "--workers", "3")
    assert result.returncode == 0, (result.stdout, result.stderr)
    try:
        report = cli.json("status", "--name", "dual")
        addresses = [w["address"] for w in report["workers"]]
        assert len(addresses) == 3 and _v6_worker_addresses(addresses, lab6), report["workers"]
    finally:
        cli.ok("down", "--name", "dual", "--timeout", "60")
    run(until(lambda: not processes_besides_sshd(lab6), 20, "every process on the lab hosts to end"), timeout=60)



def test_dual_stack_with_ipv4_blocked_between_hosts_uses_ipv6_between_them(
    lab6: Lab, cli: Cli, tmp_path: Path  # noqa: F811
) -> None:
    """IPv4 open head <-> hosts, dropped host <-> host: workers use IPv6, data moves between them, check says so."""
    from speccluster_ssh.cluster import SSHSpecCluster

    # The head reaches the hosts over IPv4 (their inventory address); the hosts each other over IPv6 alone.
    path = _inventory(lab6, tmp_path / "v4.yml", hosts={h.name: h.ip for h in lab6.hosts})

    async def main() -> None:
        async with SSHSpecCluster(
            inventory=path, known_hosts=str(lab6.known_hosts), asynchronous=True, n_workers=3,
        ) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(3, timeout=120)
                workers = list(await client.run(os.getpid))
                # A result held by one worker, needed by a task on another: a fetch between hosts.
                first = client.submit(list, range(1000), workers=[workers[0]])
                second = client.submit(len, first, workers=[workers[1]], allow_other_workers=False)
                assert await asyncio.wait_for(second, 60) == 1000
                assert len(workers) == 3 and _v6_worker_addresses(workers, lab6), workers
        await until(lambda: not processes_besides_sshd(lab6), 20, "every process on the lab hosts to end")

    try:
        lab6.restore_ipv4()
        lab6.drop_ipv4_between_hosts()
        run(main(), timeout=300)
        result = cli.run("check", str(path), "--timeout", "30")
        print(result.stdout, result.stderr)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert "address family: IPv4 (h1, h2, h3)" in result.stdout  # the head's links
        assert "address family: IPv6 between hosts (IPv4 blocked between h1, h2, h3)" in result.stdout
        rows = {row["host"]: row for row in cli.json("check", str(path), "--timeout", "30")["hosts"]}
        assert {n: (r["peer_family"], r["reaches_peers"]) for n, r in rows.items()} == {
            h.name: ("IPv6", True) for h in lab6.hosts
        }, rows
    finally:
        lab6.restore_ipv4()
        lab6.drop_ipv4()


def test_a_scheduler_on_a_host_listens_on_ipv6_when_ipv4_is_blocked_between_hosts(lab6: Lab, tmp_path: Path) -> None:
    """Mode forward, IPv4 dropped between the hosts only: the scheduler on h1 is reached by the other hosts over IPv6."""
    from speccluster_ssh.cluster import SSHSpecCluster

    path = _inventory(lab6, tmp_path / "v4.yml", hosts={h.name: h.ip for h in lab6.hosts},
                      speccluster_scheduler_reach="forward")

    async def main() -> None:
        async with SSHSpecCluster(
            inventory=path, known_hosts=str(lab6.known_hosts), asynchronous=True, n_workers=3,
        ) as cluster:
            reach = cluster.status_report()["scheduler_reach"]
            assert (reach["mode"], reach["scheduler_host"]) == ("forward", lab6.hosts[0].name), reach
            assert cluster.scheduler.address.split("://")[1].startswith(f"[{lab6.hosts[0].ip6}]:"), cluster.scheduler.address
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(3, timeout=120)
                workers = list(await client.run(os.getpid))
                assert len(workers) == 3 and _v6_worker_addresses(workers, lab6), workers
                first = client.submit(list, range(1000), workers=[workers[1]])
                assert await asyncio.wait_for(client.submit(len, first, workers=[workers[2]]), 60) == 1000
        await until(lambda: not processes_besides_sshd(lab6), 20, "every process on the lab hosts to end")

    try:
        lab6.restore_ipv4()
        lab6.drop_ipv4_between_hosts()
        run(main(), timeout=300)
    finally:
        lab6.restore_ipv4()
        lab6.drop_ipv4()
