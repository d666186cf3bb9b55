"""Host and port text with IPv6 literals (addresses.py), and picking the family that answers (families.py)."""

from __future__ import annotations

import asyncio
import types
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from speccluster_ssh import families
from speccluster_ssh.addresses import (
    bracket,
    family,
    format_hostport,
    split_hostport,
    split_url,
    unbracket,
    url,
)
from speccluster_ssh.dashboards import cluster_link, dashboard_bind, tunnel_argv
from speccluster_ssh.forwards import split_address
from speccluster_ssh.inventory._jumps import parse_hop

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
names = st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}\Z")
hosts = st.one_of(ipv4, ipv6, names)
ports = st.integers(0, 65535)


@given(hosts, ports)
def test_format_then_split_gives_the_host_and_port_back(host: str, port: int) -> None:
    text = format_hostport(host, port)
    assert split_hostport(text) == (host, port)
    # The stdlib agent's parse (rpartition, strip the brackets) agrees.
    left, _, right = text.rpartition(":")
    assert (left.strip("[]"), int(right)) == (host, port)


@given(hosts, ports, st.sampled_from(["tcp", "tls", "http"]))
def test_url_then_split_url(host: str, port: int, scheme: str) -> None:
    assert split_url(url(scheme, host, port, "/status")) == (scheme, host, port)


@given(ipv6)
def test_ipv6_is_bracketed_only_before_a_port(address: str) -> None:
    assert bracket(address) == f"[{address}]" == bracket(f"[{address}]")
    assert unbracket(f"[{address}]") == address
    assert split_hostport(address, 22) == (address, 22)  # no brackets: no port
    assert family(address) == 6 and family(f"[{address}]") == 6


@given(st.one_of(ipv4, names))
def test_ipv4_and_names_are_never_bracketed(host: str) -> None:
    assert bracket(host) == host
    assert family(host) == (4 if host[0].isdigit() else None)


def test_examples() -> None:
    assert format_hostport("fd00::11", 22) == "[fd00::11]:22"
    assert url("tls", "fd00::12", 40123) == "tls://[fd00::12]:40123"
    assert split_url("tls://[fd00::12]:40123") == ("tls", "fd00::12", 40123)
    assert split_url("10.0.0.3:8786") == ("tcp", "10.0.0.3", 8786)
    assert split_hostport("h1") == ("h1", None)
    assert family("fe80::1%eth0") == 6 and family("h1") is None


@pytest.mark.parametrize("bad", ["[fd00::1", "[fd00::1]x", "[fd00::1]:http", "h1:99999", ":22", "[]:22"])
def test_bad_text_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        split_hostport(bad)
    with pytest.raises(ValueError):
        split_url("tls://" + bad if ":" in bad else "tls://" + bad + ":x")


def test_users_of_the_helpers_bracket_ipv6() -> None:
    assert split_address("tls://[fd00::3]:8786") == ("tls", "fd00::3", 8786)
    hop = parse_hop("admin@[fd00::11]:2222")
    assert (hop.address, hop.port, hop.user) == ("fd00::11", 2222, "admin")
    assert (parse_hop("fd00::11").address, parse_hop("fd00::11").port) == ("fd00::11", None)
    assert dashboard_bind("::1", 8787) == "[::1]:8787"
    assert tunnel_argv("fd00::11", "::1", 8787)[3] == "8787:[::1]:8787"

    class Scheduler:
        address = "tls://[fd00::12]:40123"
        dashboard_port = 8787
        options = {"dashboard_address": "[fd00::12]:8787"}

    assert cluster_link(Scheduler(), "", remote=True) == "http://[fd00::12]:8787/status"


def _listener(family_: int, host: str) -> socket.socket:
    sock = socket.socket(family_, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    return sock


def _pair() -> tuple[socket.socket, socket.socket]:
    """Listeners on ::1 and 127.0.0.1 with one port number."""
    v6 = _listener(socket.AF_INET6, "::1")
    try:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.bind(("127.0.0.1", v6.getsockname()[1]))
        v4.listen(8)
    except OSError:
        v6.close()
        pytest.skip("the port taken on ::1 is in use on 127.0.0.1")
    return v4, v6


def test_connect_first_prefers_the_earlier_address() -> None:
    v4, v6 = _pair()
    port = v6.getsockname()[1]

    async def main() -> list[str]:
        peers = []
        for order in (["::1", "127.0.0.1"], ["127.0.0.1", "::1"]):
            sock = await families.connect_first(order, port, 5)
            peers.append(sock.getpeername()[0])
            sock.close()
        return peers

    try:
        assert asyncio.run(main()) == ["::1", "127.0.0.1"]
    finally:
        v4.close()
        v6.close()


def test_connect_first_falls_over_to_the_next_address() -> None:
    v4, v6 = _pair()
    port = v6.getsockname()[1]
    v4.close()  # 127.0.0.1 now refuses

    async def main() -> str:
        sock = await families.connect_first(["127.0.0.1", "::1"], port, 5)
        peer = str(sock.getpeername()[0])
        sock.close()
        return peer

    try:
        assert asyncio.run(main()) == "::1"
        v6.close()
        with pytest.raises(OSError):
            asyncio.run(families.connect_first(["127.0.0.1", "::1"], port, 5))
    finally:
        v6.close()


def test_connect_first_takes_a_later_address_when_an_earlier_one_never_answers() -> None:
    # A listener whose backlog is full and never accepts stands in for dropped packets.
    v6 = _listener(socket.AF_INET6, "::1")

    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # 192.0.2.1 (TEST-NET-1) has no host: the SYN goes unanswered or is unroutable.
        sock = await families.connect_first(["192.0.2.1", "::1"], v6.getsockname()[1], 10, delay=0.05)
        assert sock.getpeername()[0] == "::1"
        sock.close()
        return loop.time() - t0

    try:
        asyncio.run(main())
    finally:
        v6.close()


def test_no_route_reason_names_the_family() -> None:
    # 127.0.0.1 always has a route; a reason only when none of the addresses has one.
    assert families.no_route_reason("h1", ["127.0.0.1"]) is None
    assert families.route_source("127.0.0.1") == "127.0.0.1"


def test_no_route_reason_when_the_head_lacks_the_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(families, "route_source", lambda address: None)
    why = families.no_route_reason("h1", ["fd00::11"])
    assert why == "h1 has only IPv6 addresses (fd00::11), and the head has no route to it"


def test_listen_socket_takes_both_families() -> None:
    sock = families.listen_socket()
    try:
        port = sock.getsockname()[1]
        for host in ("127.0.0.1", "::1"):
            socket.create_connection((host, port), 2).close()
    finally:
        sock.close()


def test_a_host_with_no_address_of_a_family_the_head_can_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head has no route to the host's only family: one HostError with its fix, nothing sent."""
    from speccluster_ssh import families
    from speccluster_ssh.connection import ConnectSettings, HostConnection
    from speccluster_ssh.errors import HostError
    from speccluster_ssh.inventory import load_inventory

    path = tmp_path / "inv.yml"
    path.write_text("all:\n  hosts:\n    far:\n      ansible_host: fd00:250:99::11\n")
    host = load_inventory(path).worker_hosts[0]
    monkeypatch.setattr(families, "route_source", lambda address: None)  # a head without IPv6
    with pytest.raises(HostError) as caught:
        asyncio.run(HostConnection(host, ConnectSettings()).open())
    assert caught.value.reason == "far has only IPv6 addresses (fd00:250:99::11), and the head has no route to it"
    assert "ansible_host of a family the head has" in (caught.value.fix or "")


def test_an_interface_with_ipv6_only_becomes_a_bracketed_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """dask reads ``interface`` for IPv4 alone; the agent's child turns an IPv6-only one into ``host``."""
    import psutil

    from speccluster_ssh.agent.child import _interface_host

    def addr(family_: int, address: str) -> object:
        return types.SimpleNamespace(family=family_, address=address)

    interfaces = {
        "v6": [addr(socket.AF_INET6, "fe80::1%v6"), addr(socket.AF_INET6, "fd00:250:71::11")],
        "both": [addr(socket.AF_INET, "10.0.0.1"), addr(socket.AF_INET6, "fd00::1")],
        "linklocal": [addr(socket.AF_INET6, "fe80::2%linklocal")],
    }
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: interfaces)
    options = {"interface": "v6"}
    _interface_host(options)
    assert options == {"host": "[fd00:250:71::11]"}
    for name in ("both", "linklocal", "missing"):
        options = {"interface": name}
        _interface_host(options)
        assert options == {"interface": name}  # left to dask (and its own error)


def test_a_dashboard_on_an_ipv6_host_goes_to_dask_as_a_pair() -> None:
    """dask splits a dashboard_address string on ":"; an IPv6 host goes as [(host, port)]."""
    from speccluster_ssh.dashboards import dask_dashboard_address

    assert dask_dashboard_address("[fd00::1]:8787") == [("fd00::1", 8787)]
    assert dask_dashboard_address("127.0.0.1:0") == "127.0.0.1:0"
    assert dask_dashboard_address(":8787") == ":8787"
