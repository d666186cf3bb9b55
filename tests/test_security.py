"""Security on the SSH lab: host keys, TLS, secrets and remote files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from distributed.security import Security

from speccluster_ssh.cluster import SSHSpecCluster
from speccluster_ssh.errors import HostError, StartError

pytestmark = pytest.mark.lab


def test_changed_host_key_is_refused_with_its_fingerprint(lab: Any, tmp_path: Path) -> None:
    path = lab.write_inventory(tmp_path / "inv.yml", groups={"workers": ["h1", "h2"]})
    new_key = lab.hosts[1].rotate_host_key()
    try:
        with SSHSpecCluster.from_inventory(path, known_hosts=str(lab.known_hosts), n_workers=0, security=False) as cluster:
            async def connect(name: str) -> Any:
                return await cluster.pool.agent(name)

            # The good host is not affected.
            asyncio.run_coroutine_threadsafe(connect("h1"), cluster.loop.asyncio_loop).result(60)
            with pytest.raises(HostError) as info:
                asyncio.run_coroutine_threadsafe(connect("h2"), cluster.loop.asyncio_loop).result(60)
            message = str(info.value)
            assert "h2" in message and "CHANGED" in message
            assert "SHA256:" in message and str(lab.known_hosts) in message
            import asyncssh

            fingerprint = asyncssh.import_public_key(new_key).get_fingerprint("sha256")
            assert fingerprint in message
            assert not [p for p in lab.hosts[1].processes() if p.argv and "sshd" not in p.argv[0]]
    finally:
        lab.hosts[1].restore_host_key()


def test_accept_new_records_then_refuses_a_changed_key(lab: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    path = lab.write_inventory(tmp_path / "inv.yml", groups={"workers": ["h3"]})
    with pytest.raises(StartError, match="not known"):
        SSHSpecCluster.from_inventory(path, known_hosts=str(empty), n_workers=1, security=False)
    with SSHSpecCluster.from_inventory(path, known_hosts=str(empty), known_hosts_policy="accept-new", n_workers=1, security=False) as cluster:
        with Client(cluster) as client:
            assert client.submit(lambda: 1).result(timeout=30) == 1
    managed = tmp_path / "state" / "speccluster-ssh" / "known_hosts"
    assert lab.hosts[2].ip in managed.read_text()
    lab.hosts[2].rotate_host_key()
    try:
        with pytest.raises(StartError, match="CHANGED"):
            SSHSpecCluster.from_inventory(path, known_hosts=str(empty), known_hosts_policy="accept-new", n_workers=1, security=False)
    finally:
        lab.hosts[2].restore_host_key()


def test_tls_by_default_refuses_strangers_and_hides_secrets(lab: Any, tmp_path: Path) -> None:
    path = lab.write_inventory(tmp_path / "inv.yml", groups={"scheduler": ["h1"], "workers": ["h2", "h3"]})
    with SSHSpecCluster.from_inventory(path, known_hosts=str(lab.known_hosts), n_workers=2) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster) as client:
            assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2
        # A plain TCP client, and a TLS client without the cluster's certificates.
        plain = cluster.scheduler_address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout=3)
        stranger = Security.temporary()
        with pytest.raises((OSError, TimeoutError)):
            Client(cluster.scheduler_address, security=stranger, timeout=3)
        # No key material on any command line or in any environment.
        key_body = cluster.security.tls_client_key.splitlines()[1]
        node_key = cluster.pool.files["tls/node.key"].decode().splitlines()[1]
        checked = 0
        for host in lab.hosts:
            for proc in host.processes():
                for name in ("cmdline", "environ"):
                    try:
                        data = Path(f"/proc/{proc.pid}/{name}").read_bytes().decode("utf-8", "replace")
                    except OSError:
                        continue
                    checked += 1
                    assert key_body not in data and node_key not in data and "PRIVATE KEY" not in data
        assert checked >= 6
        dirs = [Path(a.facts["dir"]) for a in cluster.pool.agents.values()]
        for directory in dirs:
            key_file = directory / "tls" / "node.key"
            assert oct(key_file.stat().st_mode & 0o777) == oct(0o600)
            assert oct(directory.stat().st_mode & 0o777) == oct(0o700)
    deadline = time.monotonic() + 15
    # The end of the cluster removes its TLS keys; its logs stay for the retention period.
    while time.monotonic() < deadline and any((d / "tls").exists() for d in dirs):
        time.sleep(0.1)
    assert not any((d / "tls").exists() for d in dirs)
    assert all((d / "logs").is_dir() for d in dirs)
