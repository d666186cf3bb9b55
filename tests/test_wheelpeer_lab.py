"""Wheels from lab host to lab host (``agent/wheelpeer.py``), over real TCP between the hosts' namespaces.

The server and the client run on lab hosts as the hosts would run them:
``python -c BOOTSTRAP`` over each host's sshd, the sources sent on stdin (the
agent's own bootstrap), under the lab's python. The TLS material is a fresh
cluster CA from ``security.make_security``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh.agent import BOOTSTRAP, agent_argv
from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.inventory import load_inventory
from speccluster_ssh.security import CA_PEM, NODE_CERT, NODE_KEY, make_security

pytestmark = pytest.mark.lab

# Runs after wheelpeer.py in the bootstrap's namespace: serve until the head says stop, or fetch once.
MAIN = '''
import json, os, sys

def _say(message):
    sys.stdout.write(json.dumps(message) + "\\n")
    sys.stdout.flush()

def main(config):
    if config["op"] == "serve":
        server = wheelpeer_serve(config["dir"], config["allowed"], config["pems"], lifetime=120.0)
        _say({"address": list(server.address)})
        while os.read(0, 1) not in (b"", b"\\n"):
            pass
        server.stop()
        _say({"stats": server.stats()})
        return
    try:
        result = wheelpeer_fetch(config["host"], config["port"], config["files"], config["dir"], config["pems"],
                                 timeout=60.0)
    except WheelPeerError as exc:
        _say({"error": str(exc)})
    else:
        _say({"ok": result})
'''


def pems_of(files: dict[str, bytes]) -> dict[str, str]:
    return {"ca": files[CA_PEM].decode(), "cert": files[NODE_CERT].decode(), "key": files[NODE_KEY].decode()}


def payload(config: dict[str, Any]) -> bytes:
    source = resources.files("speccluster_ssh.agent").joinpath("wheelpeer.py").read_bytes()
    main = MAIN.encode()
    return (json.dumps(config).encode() + b"\n2\n" + f"wheelpeer.py {len(source)}\n".encode() + source
            + f"main.py {len(main)}\n".encode() + main)  # fmt: skip


class Hosts:
    def __init__(self, lab: Any, tmp_path: Path) -> None:
        self.lab = lab
        inventory = load_inventory(lab.write_inventory(tmp_path / "inv.yml", groups={"workers": ["h1", "h2"]}))
        settings = ConnectSettings(known_hosts=str(lab.known_hosts))
        self.connections = {name: HostConnection(inventory.hosts[name], settings) for name in ("h1", "h2")}

    async def run(self, name: str, config: dict[str, Any]) -> Any:
        connection = self.connections[name]
        channel = await connection.open_channel(agent_argv(connection.host, "wheelpeer-test"))
        channel.write(payload(config))
        return channel

    async def fetch(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        channel = await self.run(name, {"op": "fetch", **config})
        try:
            line = await asyncio.wait_for(channel.readline(), 90)
            assert line, channel.stderr_tail()
            return dict(json.loads(line))
        finally:
            await channel.close()

    @asynccontextmanager
    async def serving(self, name: str, directory: Path, allowed: list[str], pems: dict[str, str]
                      ) -> AsyncIterator[tuple[str, int, dict[str, Any]]]:
        """A server on ``name``: yields (address, port, stats filled in when it stopped)."""
        channel = await self.run(name, {"op": "serve", "dir": str(directory), "allowed": allowed, "pems": pems})
        stats: dict[str, Any] = {}
        try:
            line = await asyncio.wait_for(channel.readline(), 60)
            assert line, channel.stderr_tail()
            address, port = json.loads(line)["address"]
            yield address, port, stats
            channel.write(b"\n")
            stats.update(json.loads(await asyncio.wait_for(channel.readline(), 30))["stats"])
        finally:
            await channel.close()

    async def close(self) -> None:
        for connection in self.connections.values():
            await connection.close()


def wheels(directory: Path, sizes: dict[str, int]) -> list[tuple[str, str, int]]:
    directory.mkdir(mode=0o700, exist_ok=True)
    files = []
    for name, size in sizes.items():
        data = os.urandom(size)
        (directory / name).write_bytes(data)
        files.append((name, hashlib.sha256(data).hexdigest(), size))
    return files


def run(lab: Any, tmp_path: Path, body: Any) -> Any:
    async def main() -> Any:
        hosts = Hosts(lab, tmp_path)
        try:
            return await body(hosts)
        finally:
            await hosts.close()

    return asyncio.run(main())


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_wheels_pass_from_host_to_host_checked(lab: Any, tmp_path: Path) -> None:
    """h1 serves a wheel store to h2 over mutual TLS; h2's copies match byte for byte."""
    _, tls = make_security(True, "wheelpeer")
    pems = pems_of(tls)
    served, fetched = tmp_path / "served", tmp_path / "fetched"
    manifest = wheels(served, {"big-1.0-py3-none-any.whl": 3_000_001, "small-2.0-py3-none-any.whl": 17})
    fetched.mkdir()

    async def body(hosts: Hosts) -> tuple[dict[str, Any], dict[str, Any], str]:
        async with hosts.serving("h1", served, [m[0] for m in manifest], pems) as (address, port, stats):
            result = await hosts.fetch("h2", {"host": address, "port": port, "files": manifest, "dir": str(fetched),
                                              "pems": pems})  # fmt: skip
        return result, stats, address

    result, stats, address = run(lab, tmp_path, body)
    assert address == lab.host("h1").ip, "bound to the address the host was reached on"
    assert result == {"ok": {"bytes": 3_000_018, "files": [m[0] for m in manifest]}}, result
    for name, sha256, _ in manifest:
        assert (fetched / name).read_bytes() == (served / name).read_bytes()
        assert hashlib.sha256((fetched / name).read_bytes()).hexdigest() == sha256
    assert _files(fetched) == sorted(m[0] for m in manifest), "no temporary file left"
    assert stats == {"bytes_sent": 3_000_018, "files_sent": 2, "refused": 0}


def _raw_request(address: str, port: int, context: ssl.SSLContext, request: bytes) -> bytes:
    """What a server answers to one raw request from the head (b"" when it closed without a word)."""
    with socket.create_connection((address, port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock) as tls:
                tls.sendall(request)
                answer = b""
                deadline = time.monotonic() + 10
                while not answer.endswith(b"\n") and time.monotonic() < deadline:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                return answer
        except (ssl.SSLError, ConnectionError):
            return b""


def _client_context(ca: bytes, cert: bytes | None, key: bytes | None, tmp_path: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    (tmp_path / "ca.pem").write_bytes(ca)
    context.load_verify_locations(str(tmp_path / "ca.pem"))
    if cert is not None and key is not None:
        (tmp_path / "c.pem").write_bytes(cert)
        (tmp_path / "c.key").write_bytes(key)
        context.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
    return context


def test_clients_without_a_certificate_of_the_cluster_ca_get_nothing(lab: Any, tmp_path: Path) -> None:
    """A host with another cluster's certificate (trusting this cluster's CA), and a client with no certificate at
    all, are refused in the handshake; the server sends no byte of any wheel."""
    _, tls = make_security(True, "wheelpeer")
    _, other = make_security(True, "intruder")
    served, fetched = tmp_path / "served", tmp_path / "fetched"
    manifest = wheels(served, {"w-1.0-py3-none-any.whl": 4096})
    fetched.mkdir()
    intruder = {"ca": tls[CA_PEM].decode(), "cert": other[NODE_CERT].decode(), "key": other[NODE_KEY].decode()}

    async def body(hosts: Hosts) -> tuple[dict[str, Any], bytes, bytes, dict[str, Any]]:
        async with hosts.serving("h1", served, [manifest[0][0]], pems_of(tls)) as (address, port, stats):
            result = await hosts.fetch("h2", {"host": address, "port": port, "files": manifest, "dir": str(fetched),
                                              "pems": intruder})  # fmt: skip
            request = json.dumps({"file": manifest[0][0]}).encode() + b"\n"
            bare = _client_context(tls[CA_PEM], None, None, tmp_path)
            no_cert = await asyncio.to_thread(_raw_request, address, port, bare, request)
            # The control: the same raw request with the cluster's certificate is answered.
            good = _client_context(tls[CA_PEM], tls[NODE_CERT], tls[NODE_KEY], tmp_path)
            answered = await asyncio.to_thread(_raw_request, address, port, good, request)
        return result, no_cert, answered, stats

    result, no_cert, answered, stats = run(lab, tmp_path, body)
    assert "error" in result and "ok" not in result, result
    assert no_cert == b""
    assert json.loads(answered) == {"size": 4096}
    assert _files(fetched) == []
    assert stats["refused"] == 2 and stats["bytes_sent"] == 4096, stats  # the control's file alone


def test_names_outside_the_manifest_are_refused(lab: Any, tmp_path: Path) -> None:
    """A file of the served directory that is not in the allow-list, and a path outside it, are refused."""
    _, tls = make_security(True, "wheelpeer")
    served, fetched = tmp_path / "served", tmp_path / "fetched"
    offered, hidden = wheels(served, {"offered-1.0-py3-none-any.whl": 100, "hidden-1.0-py3-none-any.whl": 100})
    fetched.mkdir()
    (tmp_path / "secret").write_text("not a wheel")
    good = _client_context(tls[CA_PEM], tls[NODE_CERT], tls[NODE_KEY], tmp_path)

    async def body(hosts: Hosts) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
        async with hosts.serving("h1", served, [offered[0]], pems_of(tls)) as (address, port, stats):
            result = await hosts.fetch("h2", {"host": address, "port": port, "files": [offered, hidden],
                                              "dir": str(fetched), "pems": pems_of(tls)})  # fmt: skip
            escape = await asyncio.to_thread(_raw_request, address, port, good, b'{"file": "../secret"}\n')
        return result, escape, stats

    result, escape, stats = run(lab, tmp_path, body)
    assert "not offered" in result.get("error", ""), result
    assert _files(fetched) == [offered[0]], "the offered file came, the hidden one did not"
    assert "not offered" in json.loads(escape)["error"]
    assert stats["refused"] == 2 and stats["bytes_sent"] == 100, stats


def test_a_corrupted_transfer_is_rejected_and_leaves_no_file(lab: Any, tmp_path: Path) -> None:
    """The served file differs from the manifest's sha256 (same size): the fetch fails and leaves nothing."""
    _, tls = make_security(True, "wheelpeer")
    served, fetched = tmp_path / "served", tmp_path / "fetched"
    ((name, _, size),) = wheels(served, {"torn-1.0-py3-none-any.whl": 1_000_000})
    fetched.mkdir()
    expected = hashlib.sha256(b"\0" * size).hexdigest()

    async def body(hosts: Hosts) -> dict[str, Any]:
        async with hosts.serving("h1", served, [name], pems_of(tls)) as (address, port, _):
            return await hosts.fetch("h2", {"host": address, "port": port, "files": [(name, expected, size)],
                                            "dir": str(fetched), "pems": pems_of(tls)})  # fmt: skip

    result = run(lab, tmp_path, body)
    assert "does not match its sha256" in result.get("error", ""), result
    assert _files(fetched) == [], "no file, no temporary file"
