"""Jump hosts: one shared SSH connection per jump host, for every host behind it.

asyncssh's own ``ProxyJump`` support opens a new connection to the jump host
for every host behind it; behind a bastion with a strict ``MaxStartups``
that fails. Here a :class:`JumpPool` (one per cluster, held by
:class:`~speccluster_ssh.connection.ConnectSettings`) connects to each jump
host once, on first use, and hands that connection to every host behind it
as asyncssh's ``tunnel=``, so each of them is a direct-tcpip channel over it.
Connections are reference-counted by :class:`JumpLease` and closed when the
last host behind them lets go. A jump connection that dropped is made again
on the next use; the hosts behind it lose their channels with it, which the
agents' lost-host path handles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from . import families
from .errors import HostError
from .inventory import HostSpec, JumpHop, parse_jump_list
from .inventory._jumps import MAX_CHAIN

logger = logging.getLogger(__name__)

# A hop's identity: where it is and who we are there, and how we got there.
_Key = tuple[tuple[str, int | None, str | None], ...]


def _ssh_config(paths: Sequence[str], host: str, port: int | None, user: str | None) -> Any:
    """asyncssh's evaluation of ssh_config ``paths`` for one host."""
    from asyncssh.config import SSHClientConfig

    try:
        local_user = getpass.getuser()
    except (KeyError, OSError):
        local_user = "root"
    return SSHClientConfig.load(
        None, list(paths), False, False, False, local_user,
        user if user is not None else (), host, port if port is not None else (),
    )


def config_hostname(paths: Sequence[str], host: str, port: int | None, user: str | None) -> str:
    """The address ssh_config ``paths`` send ``host`` to: its ``HostName``, else ``host`` itself."""
    if not paths:
        return host
    return str(_ssh_config(paths, host, port, user).get("Hostname", host))


def config_jumps(paths: Sequence[str], host: str, port: int | None, user: str | None) -> tuple[JumpHop, ...] | None:
    """The ``ProxyJump`` chain ssh_config ``paths`` give ``host``; ``None`` when they give none.

    Raises
    ------
    ValueError
        When the ``ProxyJump`` value cannot be parsed.
    """
    if not paths:
        return None
    value = _ssh_config(paths, host, port, user).get("ProxyJump", ())
    if value == () or value is None:  # unset, or ProxyJump none
        return None
    return parse_jump_list(str(value))


def expand_chain(chain: Sequence[JumpHop], paths: Sequence[str]) -> tuple[JumpHop, ...]:
    """Put in front of ``chain`` the jumps ssh_config gives its first hop, recursively.

    Only the first hop's own ``ProxyJump`` counts: the later ones are
    reached through the hop before them, as in OpenSSH.

    Raises
    ------
    ValueError
        On a loop, or a chain longer than :data:`~speccluster_ssh.inventory._jumps.MAX_CHAIN`.
    """
    out = list(chain)
    seen = {hop.address for hop in out}
    while out and len(out) <= MAX_CHAIN:
        first = out[0]
        before = config_jumps(paths, first.address, first.port, first.user)
        # "Host * / ProxyJump gw" also matches gw itself; like a direct hop, that ends the chain.
        if not before or any(hop.address == first.address for hop in before):
            break
        for hop in before:
            if hop.address in seen:
                raise ValueError(f"ProxyJump in ssh_config forms a loop at {hop.label}")
            seen.add(hop.address)
        out[:0] = before
    if len(out) > MAX_CHAIN:
        raise ValueError(f"more than {MAX_CHAIN} jump hosts")
    return tuple(out)


def describe_chain(chain: Sequence[JumpHop]) -> str:
    """``bastion`` or ``outer -> inner``: the jumps as the user named them."""
    return " -> ".join(hop.label for hop in chain)


def login_options(port: int | None, user: str | None, key_file: str | None) -> dict[str, Any]:
    """asyncssh ``connect`` options for a host's port, user and key, where they are set."""
    options: dict[str, Any] = {}
    if port is not None:
        options["port"] = port
    if user is not None:
        options["username"] = user
    if key_file is not None:
        options["client_keys"] = [key_file]
    return options

@dataclass
class JumpContext:
    """What connecting to a jump host on behalf of one inventory host needs.

    Parameters
    ----------
    host
        The inventory host behind the jumps (named in errors; its key
        policy applies to the jump hosts too).
    config
        ssh_config files, as the host's own connection reads them.
    connect_timeout, keepalive_interval
        As for the host's own connection.
    checker
        Makes the host key checker for a jump host from a stand-in
        :class:`HostSpec` with the jump's name, address and port.
    """

    host: HostSpec
    config: Sequence[str]
    connect_timeout: float
    keepalive_interval: float
    checker: Callable[[HostSpec], Any]
    extra: dict[str, Any] = field(default_factory=dict)


class _Entry:
    """One shared connection to one hop, and how many hosts use it."""

    def __init__(self, key: _Key, hop: JumpHop) -> None:
        self.key = key
        self.hop = hop
        self.conn: asyncssh.SSHClientConnection | None = None
        self.parent: asyncssh.SSHClientConnection | None = None
        self.users = 0
        self.lock = asyncio.Lock()
        self.address = hop.address

    @property
    def is_open(self) -> bool:
        return self.conn is not None and not self.conn.is_closed()


class JumpLease:
    """A host's use of a chain of shared jump connections; :meth:`release` once done.

    Attributes
    ----------
    conn
        The connection to the last jump host: pass it as ``tunnel=``.
    first
        The connection to the first jump host, the one that leaves the head.
    label
        The jumps as the user named them, for messages.
    """

    def __init__(self, pool: JumpPool, entries: list[_Entry], label: str) -> None:
        self._pool = pool
        self._entries = entries
        self.label = label
        self.released = False

    @property
    def conn(self) -> asyncssh.SSHClientConnection:
        conn = self._entries[-1].conn
        assert conn is not None
        return conn

    @property
    def first(self) -> asyncssh.SSHClientConnection:
        conn = self._entries[0].conn
        assert conn is not None
        return conn

    @property
    def first_address(self) -> str:
        return self._entries[0].address

    async def release(self) -> None:
        """Stop using the chain; a jump connection nobody uses any more is closed."""
        if self.released:
            return
        self.released = True
        await self._pool._release(self._entries)


class JumpPool:
    """Shared connections to jump hosts, keyed by the chain that reaches them."""

    def __init__(self) -> None:
        self._entries: dict[_Key, _Entry] = {}

    def open_connections(self) -> int:
        """How many jump connections are open now (for tests and ``status``)."""
        return sum(1 for e in self._entries.values() if e.is_open)

    async def acquire(self, chain: Sequence[JumpHop], context: JumpContext) -> JumpLease:
        """Connect (or reuse the connections) to every hop of ``chain``, in order.

        Raises
        ------
        HostError
            Naming the host behind and the jump host that failed.
        """
        entries: list[_Entry] = []
        key: _Key = ()
        # Counted before connecting, so a failed connect releases what it took.
        for hop in chain:
            key = (*key, (hop.address, hop.port, hop.user))
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(key, hop)
            entry.users += 1
            entries.append(entry)
        lease = JumpLease(self, entries, describe_chain(chain))
        try:
            parent: asyncssh.SSHClientConnection | None = None
            for entry in entries:
                async with entry.lock:
                    # A hop made over an earlier connection to its parent runs over a dead one.
                    if not entry.is_open or entry.parent is not parent:
                        old, entry.conn = entry.conn, None
                        if old is not None:
                            old.close()
                        entry.conn = await self._connect(entry, parent, context)
                        entry.parent = parent
                parent = entry.conn
        except BaseException:
            await lease.release()
            raise
        return lease

    async def _connect(
        self, entry: _Entry, parent: asyncssh.SSHClientConnection | None, context: JumpContext
    ) -> asyncssh.SSHClientConnection:
        hop = entry.hop
        host = context.host
        timeout = context.connect_timeout
        resolved = _ssh_config(context.config, hop.address, hop.port, hop.user) if context.config else None
        address = str(resolved.get("Hostname", hop.address)) if resolved is not None else hop.address
        port = hop.port or (int(resolved.get("Port", 22)) if resolved is not None else 22)
        entry.address = address
        # The jump's key is checked under the same policy and files as the host behind it.
        stand_in = dataclasses.replace(host, name=hop.label, address=address, port=port, jumps=None)
        checker = context.checker(stand_in)
        options: dict[str, Any] = {
            "connect_timeout": timeout,
            "keepalive_interval": context.keepalive_interval,
            "keepalive_count_max": 3,
            "config": list(context.config) or None,
            # Explicit, so asyncssh never opens an unshared tunnel from ssh_config.
            "tunnel": parent,
        }
        options.update(context.extra)
        options.update(login_options(hop.port, hop.user, hop.key_file))
        options.update(checker.connect_options())

        def fail(reason: str) -> HostError:
            return HostError(host.name, f"cannot connect through jump host {hop.label} ({address}): {reason}")

        try:
            if parent is None:
                # A dual-stack first hop: connect to the family that answers (see families.py).
                options["sock"] = await families.dual_stack_socket(hop.label, address, port, timeout)
            conn = await asyncio.wait_for(asyncssh.connect(hop.address, **options), timeout + 5)
        except families.NoRouteError as exc:
            raise fail(str(exc)) from exc
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise fail(f"it did not answer within {timeout:g} s") from exc
        except asyncssh.HostKeyNotVerifiable as exc:
            raise fail(checker.refusal_message(exc)) from exc
        except asyncssh.PermissionDenied as exc:
            raise fail(f"it refused our login as {hop.user or 'the default user'}") from exc
        except asyncssh.ChannelOpenError as exc:
            raise fail(f"the jump before it cannot reach it: {exc.reason}") from exc
        except asyncssh.Error as exc:
            raise fail(f"SSH failed: {exc.reason}") from exc
        except OSError as exc:
            raise fail(exc.strerror or str(exc)) from exc
        logger.info("connected to jump host %s (%s) for %s", hop.label, address, host.name)
        return conn

    async def _release(self, entries: list[_Entry]) -> None:
        closing: list[asyncssh.SSHClientConnection] = []
        # Innermost first, so a chain closes from the far end back to the head.
        for entry in reversed(entries):
            entry.users -= 1
            if entry.users <= 0 and self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
                if entry.conn is not None:
                    closing.append(entry.conn)
                    entry.conn = None
        for conn in closing:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except (asyncio.TimeoutError, TimeoutError, OSError, asyncssh.Error):
                pass

