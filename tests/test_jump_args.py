"""Jump hosts named in ssh arguments, ssh_config and the inventory (no lab needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from speccluster_ssh.connection import ConnectSettings, HostConnection
from speccluster_ssh.errors import HostError
from speccluster_ssh.inventory import InventoryError, JumpHop, jumps_from_args, load_inventory, parse_jump_list
from speccluster_ssh.jump import config_jumps, describe_chain, expand_chain


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], None),
        (["-o", "StrictHostKeyChecking=yes"], None),
        (["-J", "bastion"], ["bastion"]),
        (["-Jbastion"], ["bastion"]),
        (["-o", "ProxyJump=bastion"], ["bastion"]),
        (["-oProxyJump=bastion"], ["bastion"]),
        (["-o", "ProxyJump bastion"], ["bastion"]),
        (["-o", "proxyjump=a,b"], ["a", "b"]),
        (["-J", "a,b", "-o", "ProxyJump=c"], ["a", "b"]),  # the first value wins, as in ssh
        (["-o", "ProxyJump=none"], []),
        (["-J"], None),
    ],
)
def test_jumps_from_args(args: list[str], expected: list[str] | None) -> None:
    found = jumps_from_args(args)
    assert (None if found is None else [hop.label for hop in found]) == expected


@pytest.mark.parametrize(
    "text, address, port, user",
    [
        ("bastion", "bastion", None, None),
        ("admin@bastion", "bastion", None, "admin"),
        ("admin@10.0.0.1:2222", "10.0.0.1", 2222, "admin"),
        ("ssh://admin@gw.example.org:2200", "gw.example.org", 2200, "admin"),
        ("[fe80::1]:22", "fe80::1", 22, None),
        ("u@[::1]", "::1", None, "u"),
        ("fe80::1", "fe80::1", None, None),
    ],
)
def test_parse_hop(text: str, address: str, port: int | None, user: str | None) -> None:
    (hop,) = parse_jump_list(text)
    assert (hop.address, hop.port, hop.user, hop.label) == (address, port, user, text)


@pytest.mark.parametrize("text", ["bastion:http", "bastion:0", "user@", "[::1", "a,:22"])
def test_bad_hops_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="jump host"):
        parse_jump_list(text)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inv.yml"
    path.write_text(text)
    return path


def test_inventory_fills_jump_hosts_from_their_own_vars(tmp_path: Path) -> None:
    inv = load_inventory(
        _write(
            tmp_path,
            """
all:
  hosts:
    outer: {ansible_host: 192.0.2.1, ansible_user: gate, ansible_ssh_private_key_file: /k/outer}
    inner: {ansible_host: 10.1.0.1, ansible_port: 2222, ansible_ssh_common_args: "-J outer"}
  children:
    workers:
      hosts:
        w1: {ansible_host: 10.2.0.1, ansible_ssh_common_args: "-o 'ProxyJump=inner'"}
        w2: {ansible_host: 10.2.0.2, ansible_ssh_extra_args: "-J ops@203.0.113.9:2200,inner"}
        w3: {ansible_host: 10.2.0.3, ansible_ssh_common_args: "-o ProxyJump=none"}
        w4: {ansible_host: 10.2.0.4}
""",
        )
    )
    w1 = inv.hosts["w1"].jumps
    assert w1 is not None
    assert [(h.address, h.port, h.user, h.key_file, h.inventory_host) for h in w1] == [
        ("192.0.2.1", None, "gate", "/k/outer", "outer"),
        ("10.1.0.1", 2222, None, None, "inner"),
    ]
    assert describe_chain(w1) == "outer -> inner"
    w2 = inv.hosts["w2"].jumps
    assert w2 is not None
    # Only the first hop's own jumps count: inner is reached through ops@..., not outer.
    assert [h.label for h in w2] == ["ops@203.0.113.9:2200", "inner"]
    assert (w2[0].user, w2[0].port, w2[0].inventory_host, w2[1].address) == ("ops", 2200, None, "10.1.0.1")
    assert inv.hosts["w3"].jumps == ()
    assert inv.hosts["w4"].jumps is None


def test_a_loop_of_jump_hosts_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
all:
  hosts:
    a: {ansible_ssh_common_args: "-J b"}
    b: {ansible_ssh_common_args: "-J a"}
""",
    )
    with pytest.raises(InventoryError, match="loop"):
        load_inventory(path)


def test_a_host_that_is_its_own_jump_is_reached_directly(tmp_path: Path) -> None:
    """``-o ProxyJump=gw`` under ``[all:vars]`` also reaches gw: gw itself directly, as OpenSSH and Ansible do."""
    path = tmp_path / "inv.ini"
    path.write_text(
        "[gateways]\ngw ansible_host=192.0.2.10\n\n[workers]\nh1 ansible_host=10.1.0.1\nh2 ansible_host=10.1.0.2\n\n"
        "[all:vars]\nansible_ssh_common_args='-o ProxyJump=gw'\n"
    )
    inv = load_inventory(path)
    assert inv.hosts["gw"].jumps == ()  # reached directly: not through the jump its ssh args name
    for name in ("h1", "h2"):
        hops = inv.hosts[name].jumps
        assert hops is not None and [(h.address, h.inventory_host) for h in hops] == [("192.0.2.10", "gw")], hops


def test_own_hop_later_in_a_chain_keeps_the_hops_before_it(tmp_path: Path) -> None:
    """``-J bastion,gw`` for everyone: bastion is reached directly, gw through bastion, the rest through both."""
    path = _write(
        tmp_path,
        """
all:
  vars: {ansible_ssh_common_args: "-J bastion,gw"}
  hosts:
    bastion: {ansible_host: 192.0.2.1}
    gw: {ansible_host: 10.0.0.1}
    h1: {ansible_host: 10.1.0.1}
""",
    )
    inv = load_inventory(path)
    assert inv.hosts["bastion"].jumps == ()
    assert [h.inventory_host for h in inv.hosts["gw"].jumps or ()] == ["bastion"]
    assert [h.address for h in inv.hosts["h1"].jumps or ()] == ["192.0.2.1", "10.0.0.1"]


def test_a_loop_between_two_hosts_under_a_shared_jump_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "inv.ini"
    path.write_text(
        "[all]\ngw\na ansible_ssh_common_args='-J b'\nb ansible_ssh_common_args='-J a'\n\n"
        "[all:vars]\nansible_ssh_common_args='-o ProxyJump=gw'\n"
    )
    with pytest.raises(InventoryError, match=r"jump hosts form a loop: (a -> b -> a|b -> a -> b)"):
        load_inventory(path)


def test_a_bad_jump_names_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, 'all:\n  hosts:\n    a: {ansible_ssh_common_args: "-J gw:port"}\n')
    with pytest.raises(InventoryError, match="ansible_ssh_common_args on host a: jump host 'gw:port'"):
        load_inventory(path)


def test_ssh_config_proxyjump_and_chains(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        """
Host outer
    HostName 192.0.2.1
Host inner
    HostName 10.1.0.1
    ProxyJump outer
Host node*
    ProxyJump inner
Host direct
    ProxyJump none
"""
    )
    paths = [str(config)]
    chain = config_jumps(paths, "node7", None, None)
    assert chain is not None and [h.label for h in chain] == ["inner"]
    assert [h.label for h in expand_chain(chain, paths)] == ["outer", "inner"]
    assert config_jumps(paths, "direct", None, None) is None
    assert config_jumps(paths, "elsewhere", None, None) is None


def test_host_star_naming_the_jump_host_itself(tmp_path: Path) -> None:
    """``Host *`` / ``ProxyJump gw`` also matches gw: gw is then reached directly."""
    config = tmp_path / "ssh_config"
    config.write_text("Host gw\n    HostName 192.0.2.7\nHost *\n    ProxyJump gw\n")
    paths = [str(config)]
    gw = config_jumps(paths, "node1", None, None)
    assert gw is not None and [h.label for h in gw] == ["gw"]
    assert [h.label for h in expand_chain(gw, paths)] == ["gw"]
    assert config_jumps([], "node7", None, None) is None


def test_a_loop_in_ssh_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host a\n    ProxyJump b\nHost b\n    ProxyJump a\n")
    with pytest.raises(ValueError, match="loop"):
        expand_chain((JumpHop("a", "a"),), [str(config)])


def test_an_unreachable_jump_host_is_named(tmp_path: Path) -> None:
    """Nothing listens on the jump's port: the error names the host and the jump."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: connections are refused
    inv = load_inventory(
        _write(
            tmp_path,
            f'all:\n  hosts:\n    h3: {{ansible_host: 127.0.0.1, ansible_ssh_common_args: "-J root@127.0.0.1:{port}"}}\n',
        )
    )

    async def main() -> str:
        settings = ConnectSettings(known_hosts=str(tmp_path / "none"))
        conn = HostConnection(inv.hosts["h3"], settings)
        try:
            await conn.open()
        except HostError as exc:
            assert settings.jumps.open_connections() == 0
            return str(exc)
        finally:
            await conn.close()
        raise AssertionError("connected")

    message = asyncio.run(main())
    assert message.startswith(f"host h3: cannot connect through jump host root@127.0.0.1:{port} (127.0.0.1): ")
