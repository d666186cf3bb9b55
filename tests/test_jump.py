"""Hosts on a private network behind a bastion, reached over shared jump connections.

The topology: ``h1`` is a bastion whose sshd allows only ``MaxStartups
2:100:2``; the other lab hosts accept SSH only from the bastion (nftables
rules inside their namespaces), so the head reaches them only by jumping.
They may still open connections to the head, where the scheduler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from sshlab import Lab, LabHost, _tcp_accepts, processes_besides_sshd
from test_peer import SMALL, lab_cluster, names, run, slowinc, until

pytestmark = pytest.mark.lab


def _need(lab: Lab, n: int) -> None:
    if len(lab.hosts) < n:
        pytest.skip(f"needs a lab of {n} hosts (SCLAB_HOSTS={n}), this one has {len(lab.hosts)}")


def _private_inventory(
    lab: Lab, tmp_path: Path, private: Sequence[LabHost], *, slots: int = 2,
    common_args: dict[str, str] | None = None, extra_hosts: Sequence[LabHost] = (),
) -> Path:
    """Workers on ``private``; ``common_args`` adds ssh args to a host's lab defaults."""
    base = (
        f"-o UserKnownHostsFile={lab.known_hosts} -o GlobalKnownHostsFile=/dev/null "
        "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
    )
    host_vars: dict[str, dict[str, Any]] = {h.name: {**SMALL, "speccluster_slots": slots} for h in private}
    for name, args in (common_args or {}).items():
        host_vars.setdefault(name, {})["ansible_ssh_common_args"] = f"{base} {args}"
    groups = {"workers": [h.name for h in private]}
    if extra_hosts:
        groups["jumps"] = [h.name for h in extra_hosts]
    return Path(lab.write_inventory(tmp_path / "inv.yml", host_vars=host_vars, groups=groups))


@contextlib.contextmanager
def _bastion_topology(lab: Lab, bastions: Sequence[LabHost], private: Sequence[LabHost]) -> Iterator[None]:
    """A strict bastion in front of ``private``; the lab's reset() undoes it, and so does this."""
    try:
        for bastion in bastions:
            lab.make_bastion(bastion)
        lab.make_private(private, bastions[-1:])
        if len(bastions) > 1:
            # A chain: each bastion only from the one before it.
            for outer, inner in zip(bastions, bastions[1:]):
                lab.make_private([inner], [outer])
        for host in private:
            assert not _tcp_accepts(host.ip, 22, 1.0), f"the head still reaches {host.name} directly"
        yield
    finally:
        for host in [*bastions, *private]:
            host.clear_firewall()


async def _sample_bastion(bastion: LabHost, head_ip: str, peak: list[int], stop: asyncio.Event) -> None:
    """Record the most SSH connections the head held to ``bastion`` at any sample."""
    for _ in range(10_000):  # bounded; stops when asked
        peers = await asyncio.to_thread(bastion.ssh_peers)
        peak[0] = max(peak[0], peers.count(head_ip))
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
            return
        except (asyncio.TimeoutError, TimeoutError):
            pass


@contextlib.asynccontextmanager
async def _watch_bastion(lab: Lab, bastion: LabHost) -> AsyncIterator[list[int]]:
    peak = [0]
    stop = asyncio.Event()
    task = asyncio.ensure_future(_sample_bastion(bastion, lab.head_ip, peak, stop))
    try:
        yield peak
    finally:
        stop.set()
        await task


async def _compute(cluster: Any, n_workers: int, private: Sequence[LabHost]) -> None:
    async with Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(n_workers, timeout=120)
        results = await client.gather(client.map(slowinc, range(40), delay=0.0))
        assert results == list(range(1, 41))
        where = await client.run(socket.gethostname)
        assert set(where.values()) <= {h.name for h in private}, where


def test_private_hosts_through_proxyjump_in_ssh_config(lab: Lab, tmp_path: Path) -> None:
    """The lab's other hosts, private behind a MaxStartups 2:100:2 bastion, ProxyJump from an ssh_config.

    Three private hosts on CI's lab of four (up to four with SCLAB_HOSTS=5),
    two slots each: six workers.
    """
    _need(lab, 4)
    bastion, private = lab.hosts[0], lab.hosts[1:5]
    config = lab.write_ssh_config(tmp_path / "ssh_config", {h.name: bastion.name for h in private})
    path = _private_inventory(lab, tmp_path, private)

    async def main() -> float:
        async with _watch_bastion(lab, bastion) as peak:
            t0 = time.monotonic()
            async with lab_cluster(lab, path, ssh_config=[str(config)]) as (cluster, _):
                await cluster.scale(6)
                await _compute(cluster, 6, private)
                elapsed = time.monotonic() - t0
                await until(lambda: names(cluster) == set(cluster.worker_spec), what="six workers")
                assert {c.via for c in cluster.pool.connections.values()} == {bastion.name}
                assert cluster.pool.settings.jumps.open_connections() == 1
                assert bastion.ssh_peers().count(lab.head_ip) == 1
            assert peak[0] == 1, f"the head held {peak[0]} connections to the bastion"
        # Closed with the last host behind it.
        await until(lambda: lab.head_ip not in bastion.ssh_peers(), 15, "the bastion connection to close")
        return elapsed

    with _bastion_topology(lab, [bastion], private):
        elapsed = run(main())
    print(f"\nbastion start-up with 6 workers on {len(private)} private hosts: {elapsed:.1f} s")


def test_chain_of_two_jumps_from_ssh_args(lab: Lab, tmp_path: Path) -> None:
    """``-J`` and ``-o ProxyJump`` in ansible_ssh_common_args, two bastions in a chain, no ssh_config.

    Two private hosts behind the chain on CI's lab of four (up to four on a larger lab).
    """
    _need(lab, 4)
    outer, inner, private = lab.hosts[0], lab.hosts[1], lab.hosts[2:6]
    # One host names the chain, the others name the inner bastion, which itself jumps via the outer one.
    args = {h.name: "-o ProxyJump=h2" for h in private}
    args[private[0].name] = "-J h1,h2"
    args[inner.name] = "-J h1"
    path = _private_inventory(lab, tmp_path, private, common_args=args, extra_hosts=[outer, inner])

    async def main() -> None:
        async with _watch_bastion(lab, outer) as peak:
            async with lab_cluster(lab, path) as (cluster, _):
                await cluster.scale(2 * len(private))
                await _compute(cluster, 2 * len(private), private)
                assert {c.via for c in cluster.pool.connections.values()} == {"h1 -> h2"}
                assert cluster.pool.settings.jumps.open_connections() == 2
                assert inner.ssh_peers().count(outer.ip) == 1
            assert peak[0] == 1

    with _bastion_topology(lab, [outer, inner], private):
        run(main())


def test_bastion_cut_and_healed(lab: Lab, tmp_path: Path) -> None:
    """Cut off longer than the silence: the hosts behind are lost and come back, no name twice.

    Three private hosts on CI's lab of four (up to four on a larger lab), one worker each.
    """
    _need(lab, 3)
    bastion, private = lab.hosts[0], lab.hosts[1:5]
    config = lab.write_ssh_config(tmp_path / "ssh_config", {h.name: bastion.name for h in private})
    path = _private_inventory(lab, tmp_path, private, slots=1)
    n = len(private)

    def procs(host: LabHost) -> list[Any]:
        return [p for p in host.processes() if not (p.argv and "sshd" in p.argv[0])]

    async def main() -> None:
        async with lab_cluster(lab, path, ssh_config=[str(config)], silence=3, heal=True) as (cluster, _):
            await cluster.scale(n)
            await cluster
            await until(lambda: len(names(cluster)) == n, 120, "every worker")
            bastion.cut()
            try:
                # The agents behind end their processes once the head is silent for 3 s.
                await until(lambda: not any(procs(h) for h in private), 60, "the processes behind the bastion to end")
                await until(
                    lambda: all(cluster.pool.states[h.name].state == "down" for h in private), 60,
                    "the hosts behind the bastion to count as lost",
                )
            finally:
                bastion.heal()
            await until(lambda: all(cluster.pool.states[h.name].state == "up" for h in private), 120, "the hosts back up")
            await until(lambda: len(names(cluster)) == n and names(cluster) == set(cluster.worker_spec), 120,
                        "the cluster whole again")
            await _compute(cluster, n, private)
            assert cluster.pool.settings.jumps.open_connections() == 1

    with _bastion_topology(lab, [bastion], private):
        run(main(), timeout=400)


HEAD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from speccluster_ssh.cluster import SSHSpecCluster
    cluster = SSHSpecCluster.from_inventory(
        sys.argv[1], known_hosts=sys.argv[2], ssh_config=[sys.argv[3]], n_workers=int(sys.argv[4]), silence=5,
        security=False,
    )
    from distributed import Client
    with Client(cluster) as client:
        client.wait_for_workers(int(sys.argv[4]), timeout=120)
    print("READY", flush=True)
    time.sleep(600)
    """
)


@contextlib.contextmanager
def head_process(script: str, args: Sequence[str], ready_within: float) -> Iterator[str]:
    """Run ``script`` as a head process; yield its ``READY`` line (or the last line read), then SIGKILL it by PID."""
    head = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert head.stdout is not None
        line = ""
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline and not line.startswith("READY"):
            line = head.stdout.readline()
            if not line and head.poll() is not None:
                break
        yield line
    finally:
        head.send_signal(signal.SIGKILL)  # by PID: the head we started
        head.wait(30)


def assert_nothing_left_after_head_kill(lab: Lab, seconds: float = 15.0) -> None:
    """Poll (bounded) until no process of the cluster is left on any lab host, failing after ``seconds``."""
    killed_at = time.monotonic()
    left: dict[str, Any] = {}
    for _ in range(int(seconds / 0.1) + 100):  # bounded poll
        left = processes_besides_sshd(lab)
        if not left or time.monotonic() - killed_at > seconds:
            break
        time.sleep(0.1)
    assert not left, f"{seconds:g} s after SIGKILL of the head, still running: {left}"


def test_head_sigkill_leaves_nothing_behind_the_bastion(lab: Lab, tmp_path: Path) -> None:
    """A head killed by SIGKILL leaves no process behind the bastion.

    Four workers on three private hosts on CI's lab of four (up to four hosts on a larger lab).
    """
    _need(lab, 3)
    bastion, private = lab.hosts[0], lab.hosts[1:5]
    config = lab.write_ssh_config(tmp_path / "ssh_config", {h.name: bastion.name for h in private})
    path = _private_inventory(lab, tmp_path, private)
    with _bastion_topology(lab, [bastion], private):
        args = [str(path), str(lab.known_hosts), str(config), "4"]
        with head_process(HEAD_SCRIPT, args, ready_within=150) as line:
            assert line.startswith("READY"), "the head did not come up"
            running = processes_besides_sshd(lab)
            assert {h.name for h in private} & set(running), running
            assert bastion.ssh_peers().count(lab.head_ip) == 1
        assert_nothing_left_after_head_kill(lab, 15)


def _banner(ip: str, timeout: float = 3.0) -> socket.socket | None:
    """An unauthenticated connection to sshd that got its banner, or ``None`` when sshd dropped it."""
    sock = socket.create_connection((ip, 22), timeout)
    try:
        if sock.recv(64).startswith(b"SSH-"):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def test_topology_helpers_and_reset(lab: Lab) -> None:
    """The bastion really refuses a third pending handshake; reset() restores the flat lab."""
    _need(lab, 3)
    bastion, private, ssh_only = lab.hosts[0], lab.hosts[1], lab.hosts[2]
    lab.make_bastion(bastion)
    lab.make_private([private], [bastion], from_head="all")
    lab.make_ssh_only([ssh_only])
    listener = ssh_only.spawn([sys.executable, "-c", "import socket,time; s=socket.create_server(('', 8022)); time.sleep(60)"])
    held: list[socket.socket] = []
    try:
        for _ in range(2):
            sock = _banner(bastion.ip)
            assert sock is not None
            held.append(sock)
        # MaxStartups 2:100:2: with two handshakes pending, the third is dropped.
        assert _banner(bastion.ip) is None
        assert not _tcp_accepts(private.ip, 22, 1.0)
        # From the bastion, the private host's sshd answers.
        probe = "import socket,sys; socket.create_connection((sys.argv[1], 22), 3).close()"
        assert bastion.exec([sys.executable, "-c", probe, private.ip]).returncode == 0
        # The SSH-only host: port 22 answers the head, its other listening port does not.
        assert _tcp_accepts(ssh_only.ip, 22, 2.0)
        check = "import socket,sys; socket.create_connection(('127.0.0.1', 8022), 3).close()"
        deadline = time.monotonic() + 10
        while ssh_only.exec([sys.executable, "-c", check]).returncode != 0:
            assert time.monotonic() < deadline, "the listener on the SSH-only host did not start"
            time.sleep(0.1)
        assert not _tcp_accepts(ssh_only.ip, 8022, 1.0)
    finally:
        for sock in held:
            sock.close()
        listener.kill()
        listener.wait(10)
    lab.reset()
    assert not bastion.sshd_overrides and not private.firewalled and not ssh_only.firewalled
    assert "MaxStartups 100:30:200" in bastion.sshd_config_path.read_text()
    assert _tcp_accepts(private.ip, 22, 2.0)
    socks = [_banner(bastion.ip) for _ in range(3)]
    try:
        assert all(s is not None for s in socks)
    finally:
        for s in socks:
            if s is not None:
                s.close()


def test_check_says_how_the_head_reaches_each_host(lab: Lab, tmp_path: Path) -> None:
    from speccluster_ssh.inventory import load_inventory
    from speccluster_ssh.preflight import check_hosts

    _need(lab, 4)
    bastion, private, direct = lab.hosts[0], lab.hosts[1:3], lab.hosts[3]
    path = _private_inventory(
        lab, tmp_path, [*private, direct], common_args={h.name: "-J h1" for h in private}, extra_hosts=[bastion]
    )
    with _bastion_topology(lab, [bastion], private):
        rows = {r["host"]: r for r in check_hosts(load_inventory(path), None, 60)}
    for host in private:
        assert rows[host.name]["ok"], rows[host.name]
        assert (rows[host.name]["via"], rows[host.name]["reach"]) == ("h1", "through jump host h1")
    assert (rows[direct.name]["via"], rows[direct.name]["reach"]) == (None, "direct")
    assert rows[direct.name]["ok"] and rows[direct.name]["reaches_head"]


def test_a_jump_named_for_every_host_reaches_the_jump_host_directly(lab: Lab, tmp_path: Path) -> None:
    """``-o ProxyJump=h1`` under all.vars, h1 a worker host too: h1 directly, the private hosts through it."""
    from speccluster_ssh.inventory import load_inventory
    from speccluster_ssh.preflight import check_hosts

    _need(lab, 3)
    bastion, private = lab.hosts[0], lab.hosts[1:3]
    common = (
        f"-o UserKnownHostsFile={lab.known_hosts} -o GlobalKnownHostsFile=/dev/null "
        f"-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o ProxyJump={bastion.name}"
    )
    workers = [bastion, *private]
    path = Path(lab.write_inventory(
        tmp_path / "inv.yml", groups={"workers": [h.name for h in workers]},
        host_vars={h.name: dict(SMALL) for h in workers}, group_vars={"all": {"ansible_ssh_common_args": common}},
    ))
    with _bastion_topology(lab, [bastion], private):
        rows = {r["host"]: r for r in check_hosts(load_inventory(path), None, 60)}
    assert all(row["ok"] for row in rows.values()), rows
    assert (rows[bastion.name]["via"], rows[bastion.name]["reach"]) == (None, "direct")
    for host in private:
        assert rows[host.name]["via"] == bastion.name, rows[host.name]


def test_one_jump_connection_shared_counted_and_made_again(lab: Lab, tmp_path: Path) -> None:
    """Hosts share the bastion connection; it closes with the last; a dropped one is made again."""
    from speccluster_ssh.connection import ConnectSettings, HostConnection
    from speccluster_ssh.errors import HostError
    from speccluster_ssh.inventory import load_inventory

    _need(lab, 3)
    bastion, private = lab.hosts[0], lab.hosts[1:3]
    path = _private_inventory(lab, tmp_path, private, common_args={h.name: "-J h1" for h in private}, extra_hosts=[bastion])
    inv = load_inventory(path)

    async def main() -> None:
        settings = ConnectSettings(known_hosts=str(lab.known_hosts))
        first, second = (HostConnection(inv.hosts[h.name], settings) for h in private)
        try:
            await asyncio.gather(first.open(), second.open())
            assert settings.jumps.open_connections() == 1
            assert first.via == second.via == "h1"
            assert first.local_address == lab.head_ip
            await first.close()
            status, out, _ = await second.run(["hostname"])
            assert (status, out.strip()) == (0, private[1].name.encode())
            assert settings.jumps.open_connections() == 1
            # The bastion connection drops: the host behind it goes with it, and comes back.
            (entry,) = settings.jumps._entries.values()
            assert entry.conn is not None
            entry.conn.close()
            await until(lambda: not second.is_open, 10, "the host behind the bastion to drop")
            status, out, _ = await second.run(["hostname"])
            assert status == 0 and settings.jumps.open_connections() == 1
        finally:
            await first.close()
            await second.close()
        assert settings.jumps.open_connections() == 0 and not settings.jumps._entries

        # The bastion's key changed: refused under the same known_hosts policy, and the jump is named.
        bastion.rotate_host_key()
        third = HostConnection(inv.hosts[private[0].name], ConnectSettings(known_hosts=str(lab.known_hosts)))
        with pytest.raises(HostError) as caught:
            await third.open()
        await third.close()
        assert str(caught.value).startswith(f"host {private[0].name}: cannot connect through jump host h1 ({bastion.ip}): ")
        assert "CHANGED" in str(caught.value)

    with _bastion_topology(lab, [bastion], private):
        run(main(), timeout=120)
    await_gone = time.monotonic() + 15
    while lab.head_ip in bastion.ssh_peers() and time.monotonic() < await_gone:
        time.sleep(0.1)
    assert lab.head_ip not in bastion.ssh_peers()
