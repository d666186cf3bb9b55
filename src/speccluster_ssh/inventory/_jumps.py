"""Jump hosts (``ProxyJump``) named in a host's ssh arguments.

OpenSSH spells a jump as ``-J a,b`` or ``-o ProxyJump=a,b``; each hop is
``[user@]host[:port]`` or ``ssh://[user@]host[:port]``. Arguments arrive here
already split into tokens (``shlex``), never through a shell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from ..addresses import split_hostport

__all__ = ["JumpHop", "JumpTarget", "parse_hop", "parse_jump_list", "jumps_from_args", "resolve_jump_chain"]

MAX_CHAIN = 8


@dataclass(frozen=True)
class JumpHop:
    """One jump host on the way to an inventory host.

    Attributes
    ----------
    label
        The hop as the user wrote it (``bastion``, ``admin@10.0.0.1:2222``),
        used in messages.
    address
        What to connect to: an address, a name, or an ssh_config ``Host`` alias.
    port
        Port, ``None`` for ssh_config's or 22.
    user
        Login user, ``None`` for ssh_config's or the SSH default.
    key_file
        Private key, set when the hop is an inventory host that names one.
    inventory_host
        The inventory host this hop is, if any.
    """

    label: str
    address: str
    port: int | None = None
    user: str | None = None
    key_file: str | None = None
    inventory_host: str | None = None


def parse_hop(text: str) -> JumpHop:
    """Parse ``[ssh://][user@]host[:port]`` (IPv6 in brackets) into a :class:`JumpHop`.

    Raises
    ------
    ValueError
        On an empty host or a port that is not a number from 1 to 65535.
    """
    rest = text.strip()
    if rest.startswith("ssh://"):
        rest = rest[len("ssh://") :].rstrip("/")
    user: str | None = None
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        user = user or None
    try:
        host, port = split_hostport(rest)
    except ValueError as exc:
        raise ValueError(f"jump host {exc}") from None
    if port == 0:
        raise ValueError(f"jump host {text!r} has port 0, not a number from 1 to 65535")
    return JumpHop(label=text.strip(), address=host, port=port, user=user)


def parse_jump_list(value: str) -> tuple[JumpHop, ...]:
    """Parse a ``ProxyJump`` value: comma-separated hops, ``none`` for no jump."""
    if value.strip().lower() == "none":
        return ()
    return tuple(parse_hop(part) for part in value.split(",") if part.strip())


def jumps_from_args(args: Sequence[str]) -> tuple[JumpHop, ...] | None:
    """The jump chain that ssh arguments (already split into tokens) ask for.

    ``-J a,b``, ``-Ja,b``, ``-o ProxyJump=a,b``, ``-oProxyJump=a,b`` and
    ``-o "ProxyJump a,b"`` are understood; as in OpenSSH the first value
    given wins. ``None`` when the arguments name no jump (ssh_config may
    still name one), ``()`` for ``ProxyJump=none``.

    Raises
    ------
    ValueError
        When a hop cannot be parsed.
    """
    items = list(args)
    index = 0
    while index < len(items):
        arg = items[index]
        flag, value = arg[:2], arg[2:]
        if arg in ("-J", "-o"):
            if index + 1 >= len(items):
                return None
            value = items[index + 1]
            index += 2
        else:
            index += 1
        if flag == "-J" and value:
            return parse_jump_list(value)
        if flag == "-o" and value:
            key, _, opt = value.strip().replace(" ", "=", 1).replace("\t", "=", 1).partition("=")
            if key.strip().lower() == "proxyjump":
                return parse_jump_list(opt.strip())
    return None


class JumpTarget(Protocol):
    """What a jump chain reads of an inventory host (a :class:`~speccluster_ssh.inventory.HostSpec`).

    A protocol, so that this module needs nothing of the host spec's, which needs the jumps.
    """

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def key_file(self) -> str | None: ...
    @property
    def jumps(self) -> tuple[JumpHop, ...] | None: ...
    @property
    def is_local(self) -> bool: ...


def resolve_jump_chain(
    name: str, hosts: Mapping[str, JumpTarget], seen: Iterable[str] = ()
) -> tuple[JumpHop, ...] | None:
    """The full jump chain of inventory host ``name``, hops that are inventory hosts filled in.

    A hop that names an inventory host (and sets neither user nor port)
    takes that host's address, port, user and key. The first hop's own
    jumps come before it; later hops are reached through the hop before
    them, so their own jumps do not count (as in OpenSSH).

    A host that is one of its own jumps (``-J gw`` under ``all:vars``, where
    ``gw`` is an inventory host) is reached by the hops before that one, and
    directly (``()``) when there are none: OpenSSH does not pass the command
    line's jump on to the jump's own ssh, so it is no loop.

    Raises
    ------
    ValueError
        On a loop of jump hosts or a chain longer than :data:`MAX_CHAIN`.
    """
    host = hosts[name]
    if host.jumps is None:
        return None
    hops = host.jumps
    own = [position for position, hop in enumerate(hops) if _inventory_target(hop, hosts) == name]
    if own:
        hops = hops[: own[0]]
        if not hops:
            return ()  # reached directly, as ProxyJump=none would (its ssh args' jump is itself)
    path = [*seen, name]
    chain: list[JumpHop] = []
    for position, hop in enumerate(hops):
        target_name = _inventory_target(hop, hosts)
        if target_name is None:
            chain.append(hop)
            continue
        target = hosts[target_name]
        if target.name in path:
            raise ValueError(f"jump hosts form a loop: {' -> '.join([*path, target.name])}")
        if position == 0:
            chain.extend(resolve_jump_chain(target.name, hosts, path) or ())
        chain.append(
            replace(
                hop,
                address=target.address,
                port=target.port,
                user=target.user,
                key_file=target.key_file,
                inventory_host=target.name,
            )
        )
    if len(chain) > MAX_CHAIN:
        raise ValueError(f"host {name} has {len(chain)} jump hosts, more than {MAX_CHAIN}")
    return tuple(chain)


def _inventory_target(hop: JumpHop, hosts: Mapping[str, JumpTarget]) -> str | None:
    """The inventory host a hop stands for, to be filled in from it; ``None`` for a hop taken as written."""
    target = hosts.get(hop.address)
    if target is None or hop.inventory_host or hop.user is not None or hop.port is not None or target.is_local:
        return None
    return target.name
