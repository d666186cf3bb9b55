"""SSH connections to inventory hosts: one per host, shared by every entry there.

A :class:`HostConnection` is either an asyncssh connection or, for
``ansible_connection: local`` hosts, a stand-in that runs the same commands
as local subprocesses. Both hand out :class:`Channel` objects, the byte pipes
the host agent talks over, so the rest of the code has one path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from . import families, timeline
from .addresses import format_hostport
from .errors import HostError, UserError
from .inventory import HostSpec, JumpHop, parse_jump_list
from .jump import JumpContext, JumpLease, JumpPool, expand_chain, login_options

logger = logging.getLogger(__name__)

STDERR_TAIL = 16384


@dataclass
class ConnectSettings:
    """How to reach hosts, shared by every connection of a cluster.

    Parameters
    ----------
    known_hosts
        A known_hosts file to verify host keys against, in addition to the
        ones ssh_config names. ``None`` uses the user's defaults.
    known_hosts_policy
        ``"strict"`` (refuse unknown keys) or ``"accept-new"`` (record
        unknown keys in ``managed_known_hosts``; changed keys are refused).
    ssh_config
        Extra ssh_config files to read (``~/.ssh/config`` is read anyway).
    connect_timeout
        Seconds to wait for a host to answer and authenticate.
    keepalive_interval
        Seconds between SSH keepalives; a host missing three is dropped.
    max_parallel_connects
        Cap on handshakes in flight, to stay under sshd's MaxStartups.
    """

    known_hosts: str | None = None
    known_hosts_policy: str | None = None
    managed_known_hosts: str | None = None
    ssh_config: Sequence[str] = ()
    connect_timeout: float | None = None
    keepalive_interval: float = 5.0
    max_parallel_connects: int = 8
    _semaphore: asyncio.Semaphore | None = field(default=None, repr=False)
    _jumps: JumpPool | None = field(default=None, repr=False)

    @property
    def semaphore(self) -> asyncio.Semaphore:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_parallel_connects)
        return self._semaphore

    @property
    def jumps(self) -> JumpPool:
        """The cluster's shared connections to jump hosts."""
        if self._jumps is None:
            self._jumps = JumpPool()
        return self._jumps


class Channel(Protocol):
    """A bidirectional byte stream to a process on a host."""

    def write(self, data: bytes) -> None: ...

    async def readline(self) -> bytes: ...

    def stderr_tail(self) -> str: ...

    async def close(self) -> None: ...


def _bounded_append(buffer: bytearray, data: bytes, limit: int = STDERR_TAIL) -> None:
    buffer += data
    if len(buffer) > limit:
        del buffer[: len(buffer) - limit]


class _StreamChannel:
    """A channel over asyncio-style writer/reader objects, draining stderr."""

    def __init__(self, stdin: Any, stdout: Any, stderr: Any, closer: Any) -> None:
        self._stdin = stdin
        self._stdout = stdout
        self._stderr_buf = bytearray()
        self._closer = closer
        self._stderr_task = asyncio.ensure_future(self._drain(stderr))

    async def _drain(self, stderr: Any) -> None:
        # Reading stderr all the time is what keeps a chatty remote from blocking.
        try:
            while True:
                chunk = await stderr.read(65536)
                if not chunk:
                    return
                _bounded_append(self._stderr_buf, chunk)
        except (asyncssh.Error, OSError, asyncio.CancelledError):
            return

    def write(self, data: bytes) -> None:
        self._stdin.write(data)

    async def drain(self) -> None:
        """Wait until what was written has gone out (flow control for bulk data, such as wheels)."""
        await self._stdin.drain()

    async def readline(self) -> bytes:
        return await self._stdout.readline()

    def stderr_tail(self) -> str:
        return self._stderr_buf.decode("utf-8", "replace")

    async def close(self) -> None:
        try:
            self._stdin.write_eof()
        except (OSError, asyncssh.Error, AttributeError, RuntimeError):
            pass
        await self._closer()
        self._stderr_task.cancel()


class HostConnection:
    """One connection to one host, opened once and shared.

    Parameters
    ----------
    host
        The resolved inventory host.
    settings
        Connection settings shared by the cluster.
    """

    def __init__(self, host: HostSpec, settings: ConnectSettings) -> None:
        self.host = host
        self.settings = settings
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self.local_address: str | None = None
        self._lease: JumpLease | None = None
        self.via: str | None = None  # the jump hosts of the open connection, as named

    @property
    def is_open(self) -> bool:
        if self.host.is_local:
            return True
        return self._conn is not None and not self._conn.is_closed()

    async def open(self) -> None:
        """Connect (once); raise :class:`HostError` with a clear reason on failure."""
        if self.host.is_local:
            self.local_address = "127.0.0.1"
            return
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            await self._release_jumps()
            async with self.settings.semaphore:
                timeline.stamp("ssh_connect", self.host.name)
                self._conn = await self._connect()
                timeline.stamp("ssh_connected", self.host.name)
            # Behind jumps, the head's address as the hosts see it is the one the first jump sees.
            first = self._lease.first if self._lease is not None else self._conn
            sockname = first.get_extra_info("sockname")
            self.local_address = sockname[0] if sockname else None

    async def _release_jumps(self) -> None:
        lease, self._lease = self._lease, None
        self.via = None
        if lease is not None:
            await lease.release()

    async def _connect(self) -> asyncssh.SSHClientConnection:
        from .security import known_hosts_for

        host = self.host
        kwargs = ssh_options_from_common_args(host.ssh_common_args)
        timeout = self.settings.connect_timeout or host.connect_timeout
        timeout = float(kwargs.pop("connect_timeout", timeout))
        options: dict[str, Any] = {
            "connect_timeout": timeout,
            "keepalive_interval": self.settings.keepalive_interval,
            "keepalive_count_max": 3,
        }
        options.update(login_options(host.port, host.user, host.key_file))
        config: list[str] = [str(Path(p).expanduser()) for p in self.settings.ssh_config]
        default_config = Path("~/.ssh/config").expanduser()
        if default_config.exists():
            config.insert(0, str(default_config))
        options["config"] = config or None
        options.update(kwargs)
        # Explicit settings win over the inventory's ssh args, which win over its vars.
        policy = str(self.settings.known_hosts_policy or options.pop("known_hosts_policy", None) or host.known_hosts)
        options.pop("known_hosts_policy", None)
        known_hosts_file = self.settings.known_hosts or options.pop("known_hosts_file", None)
        options.pop("known_hosts_file", None)
        checker = known_hosts_for(host, policy, known_hosts_file, self.settings.managed_known_hosts)
        options.update(checker.connect_options())
        chain = self._jump_chain(options.pop("tunnel", None), options.get("config") or [])
        # Always explicit: asyncssh would open its own, unshared, tunnel from ssh_config.
        options["tunnel"] = None
        label = ""
        if chain:
            context = JumpContext(
                host=host,
                config=options.get("config") or [],
                connect_timeout=timeout,
                keepalive_interval=self.settings.keepalive_interval,
                checker=lambda spec: known_hosts_for(spec, policy, known_hosts_file, self.settings.managed_known_hosts),
                extra={k: options[k] for k in ("agent_path",) if k in options},
            )
            self._lease = await self.settings.jumps.acquire(chain, context)
            self.via = self._lease.label
            options["tunnel"] = self._lease.conn
            label = self._lease.label
        try:
            if not chain:
                # A dual-stack name: connect to the family that answers (see families.py).
                options["sock"] = await self._first_answering(options, timeout)
            conn = await asyncio.wait_for(
                asyncssh.connect(host.address, **options), timeout=timeout + 5
            )
        except BaseException as exc:
            await self._release_jumps()
            if isinstance(exc, Exception):
                raise self._failure(exc, checker, timeout, label) from exc
            raise
        return conn

    async def _first_answering(self, options: dict[str, Any], timeout: float) -> socket.socket | None:
        """A connected socket to the first of the host's addresses that answers, when they are of both families.

        ``None`` leaves connecting to asyncssh (see
        :func:`~speccluster_ssh.families.dual_stack_socket`). ssh_config's
        ``HostName`` is what is resolved, when it gives one. An address family
        the head has no route to at all is a :class:`HostError` with its fix.
        """
        from .jump import config_hostname

        host = self.host
        port = int(options.get("port") or host.port or 22)
        address = config_hostname(options.get("config") or [], host.address, host.port, host.user)
        try:
            sock = await families.dual_stack_socket(host.name, address, port, timeout)
        except families.NoRouteError as exc:
            raise HostError(
                host.name, str(exc),
                fix=f"give the head an address and route of that family, or give {host.name} an ansible_host "
                "of a family the head has",
            ) from None
        except TimeoutError:
            raise HostError(host.name, f"did not answer within {timeout:g} s at {host.address}") from None
        except OSError as exc:
            raise HostError(host.name, f"cannot connect to {host.address}: {exc.strerror or exc}") from None
        if sock is not None:
            logger.info("%s answered at %s", host.name, sock.getpeername()[0])
        return sock

    def _failure(self, exc: Exception, checker: Any, timeout: float, jumps: str) -> Exception:
        """The :class:`HostError` that says why connecting failed; other errors as they are."""
        host = self.host
        via = f" (through jump host {jumps})" if jumps else ""
        if isinstance(exc, HostError):
            return exc  # a jump host's failure, already named
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return HostError(host.name, f"did not answer within {timeout:g} s at {host.address}{via}")
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return HostError(
                host.name, checker.refusal_message(exc),
                fix=f"check {host.name}'s host key, then update the known_hosts file (or speccluster_known_hosts)",
            )
        if isinstance(exc, asyncssh.PermissionDenied):
            return HostError(
                host.name,
                f"refused our login as {host.user or 'the default user'} at {host.address}{via}: "
                "check ansible_user and ansible_ssh_private_key_file",
            )
        if isinstance(exc, asyncssh.ChannelOpenError) and via:
            return HostError(host.name, f"jump host {jumps} cannot reach {host.address}: {exc.reason}")
        if isinstance(exc, asyncssh.Error):
            return HostError(host.name, f"SSH failed{via}: {exc.reason}")
        if isinstance(exc, OSError):
            return HostError(host.name, f"cannot connect to {host.address}{via}: {exc.strerror or exc}")
        return exc

    def _jump_chain(self, from_args: str | None, config: Sequence[str]) -> tuple[JumpHop, ...]:
        """The jumps to ``self.host``: the inventory's, else its ssh args', else ssh_config's."""
        host = self.host
        try:
            if host.jumps is not None:
                chain: tuple[JumpHop, ...] | None = host.jumps
            elif from_args is not None:
                chain = parse_jump_list(from_args)
            else:
                from .jump import config_jumps

                chain = config_jumps(config, host.address, host.port, host.user)
                if chain and any(hop.address in (host.address, host.name) for hop in chain):
                    chain = ()  # "Host *" naming the jump host itself
            return expand_chain(chain, config) if chain else ()
        except ValueError as exc:
            raise HostError(host.name, f"bad ProxyJump: {exc}") from None

    async def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run one command given as an argv list and return (status, stdout, stderr)."""
        if self.host.is_local:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(input), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                proc.kill()
                await proc.wait()
                raise HostError(self.host.name, f"{argv[0]} did not finish within {timeout:g} s") from None
            return proc.returncode or 0, out, err
        await self.open()
        if self._conn is None:
            raise HostError(self.host.name, "not connected")
        result = await asyncio.wait_for(
            self._conn.run(remote_command(argv), input=input, encoding=None, check=False),
            timeout,
        )
        return int(result.exit_status or 0), bytes(result.stdout or b""), bytes(result.stderr or b"")

    async def forward_local_port(self, remote_host: str, remote_port: int) -> asyncssh.SSHListener:
        """Listen on a free port of ``127.0.0.1`` on the head and forward it to ``remote_host:remote_port``.

        The address is as the host sees it; connections travel inside this
        SSH connection. ``listener.get_port()`` is the head's port.
        """
        await self.open()
        if self._conn is None:
            raise HostError(self.host.name, "not connected, so no SSH forward can be opened")
        try:
            return await self._conn.forward_local_port("127.0.0.1", 0, remote_host, remote_port)
        except OSError as exc:
            raise HostError(
                self.host.name, f"cannot open an SSH forward to {format_hostport(remote_host, remote_port)}: {exc.strerror or exc}"
            ) from exc

    async def open_channel(self, argv: Sequence[str], shell_prefix: str | None = None) -> Channel:
        """Start ``argv`` on the host and return a channel to its stdin/stdout.

        ``shell_prefix`` is the host's prologue: the one place where the
        user's own shell lines run, evaluated by ``/bin/sh`` before
        ``argv`` is executed with ``exec``.
        """
        if shell_prefix:
            # The prologue is a positional argument, never spliced into the script.
            script = 'eval "$1" >&2 || exit 97; shift; exec "$@"'
            argv = ["/bin/sh", "-c", script, "speccluster-prologue", shell_prefix, *argv]
        command = remote_command(argv)  # refuses what cannot travel, for both paths
        if self.host.is_local:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    limit=2**24,
                    start_new_session=True,
                )
            except OSError as exc:
                raise HostError(self.host.name, f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc

            async def close_local() -> None:
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except (asyncio.TimeoutError, TimeoutError):
                    proc.kill()
                    await proc.wait()

            return _StreamChannel(proc.stdin, proc.stdout, proc.stderr, close_local)
        await self.open()
        if self._conn is None:
            raise HostError(self.host.name, "not connected")
        process = await self._conn.create_process(command, encoding=None)
        # asyncssh's reader has a default line limit; our JSON lines may be long.
        stdout = process.stdout

        async def close_ssh() -> None:
            try:
                await asyncio.wait_for(process.wait_closed(), 15)
            except (asyncio.TimeoutError, TimeoutError, asyncssh.Error, OSError):
                process.close()

        return _StreamChannel(process.stdin, stdout, process.stderr, close_ssh)

    async def close(self) -> None:
        """Close the connection; the host's agents see EOF and clean up."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except (asyncio.TimeoutError, TimeoutError, OSError, asyncssh.Error):
                pass
        # The last host behind a jump host closes the connection to it.
        await self._release_jumps()


def remote_command(argv: Sequence[str]) -> str:
    """The command line sshd hands to the login shell for ``argv``, one word per element.

    SSH carries a command as one string that the remote shell splits again,
    so every element is quoted; a NUL byte cannot travel in argv at all, and
    SSH sends the command as UTF-8, so both are refused.  When both problems
    occur, NUL wins: every element is checked for NUL before any is encoded,
    so the error does not depend on the order of the elements.
    """
    for arg in argv:
        if "\0" in arg:
            raise UserError(f"a NUL byte cannot be passed to a remote command: {arg!r}")
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"not valid UTF-8, so it cannot be sent over SSH: {arg!r}") from None
    return shlex.join(argv)


def ssh_options_from_common_args(args: Sequence[str]) -> dict[str, Any]:
    """Translate the ssh options we can honour from ``ansible_ssh_common_args``.

    Supported: ``-o UserKnownHostsFile=``, ``-o StrictHostKeyChecking=``,
    ``-o ConnectTimeout=``, ``-o Port=``, ``-o User=``, ``-o IdentityFile=``,
    ``-o ProxyJump=``/``-J``, ``-p``, ``-i``, ``-l``, ``-F``. Others are logged
    and ignored.
    """
    out: dict[str, Any] = {}
    items = list(args)
    index = 0
    while index < len(items):
        arg = items[index]
        value = items[index + 1] if index + 1 < len(items) else ""
        if arg in ("-o", "-J", "-p", "-i", "-l", "-F") and index + 1 < len(items):
            index += 2
        elif len(arg) > 2 and arg[:2] in ("-o", "-J", "-p", "-i", "-l", "-F"):
            arg, value = arg[:2], arg[2:]
            index += 1
        else:
            logger.warning("ignoring ssh argument %r in ansible_ssh_common_args", arg)
            index += 1
            continue
        if arg == "-o":
            key, _, opt = value.replace(" ", "=", 1).partition("=")
            _apply_ssh_option(out, key.lower(), opt.strip())
        elif arg == "-J":
            out["tunnel"] = value
        elif arg == "-p":
            out["port"] = int(value)
        elif arg == "-i":
            out["client_keys"] = [os.path.expanduser(value)]
        elif arg == "-l":
            out["username"] = value
        elif arg == "-F":
            out.setdefault("config", []).append(os.path.expanduser(value))
    return out


def _apply_ssh_option(out: dict[str, Any], key: str, value: str) -> None:
    if key == "userknownhostsfile":
        out["known_hosts_file"] = os.path.expanduser(value.split()[0])
    elif key == "stricthostkeychecking":
        if value.lower() in ("accept-new",):
            out["known_hosts_policy"] = "accept-new"
        elif value.lower() in ("yes", "ask"):
            out["known_hosts_policy"] = "strict"
        else:
            # Turning checking off silently is not something we offer.
            logger.warning("StrictHostKeyChecking=%s is not honoured; host keys stay checked", value)
    elif key == "connecttimeout":
        out["connect_timeout"] = float(value)
    elif key == "port":
        out["port"] = int(value)
    elif key == "user":
        out["username"] = value
    elif key == "identityfile":
        out["client_keys"] = [os.path.expanduser(value)]
    elif key == "proxyjump":
        out["tunnel"] = value
    elif key == "identitiesonly":
        if value.lower() == "yes":
            out["agent_path"] = None  # offer only the named keys, not an agent's
    elif key == "globalknownhostsfile" and value in ("/dev/null", "none"):
        pass  # we never read a global file unless named, so nothing to turn off
    else:
        logger.warning("ignoring ssh option -o %s in ansible_ssh_common_args", key)
