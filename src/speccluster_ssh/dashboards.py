"""Where dask's dashboards listen, and how a laptop reaches one through SSH.

dask's dashboards (the scheduler's and each worker's HTTP server) have no
authentication, so every dashboard of a cluster listens on its host's
loopback unless the user exposes it: the scheduler's with config
``speccluster-ssh.dashboard-address``, ``up --dashboard-address`` or
``SSHSpecCluster(dashboard_address=...)``; a worker's with its
``dashboard_address`` worker option. A loopback dashboard of a scheduler on
another host is forwarded to the head's loopback over the SSH connection
the head already has (:mod:`speccluster_ssh.forwards`).

The functions here are pure: they parse addresses and build the ``ssh -L``
command line (as an argv list) that ``speccluster-ssh dashboard`` prints.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .addresses import bracket, format_hostport, split_url, url
from .errors import UserError

if TYPE_CHECKING:
    from .inventory import HostSpec, JumpHop

#: Where dashboards listen unless told otherwise: their host's own loopback.
LOOPBACK = "127.0.0.1"

#: The laptop's end of the tunnel that ``speccluster-ssh dashboard`` suggests.
LOCAL_PORT = 8787


def split_dashboard_address(address: str) -> tuple[str, int | None]:
    """``"0.0.0.0:8787"`` -> ``("0.0.0.0", 8787)``; ``"127.0.0.1"`` -> ``("127.0.0.1", None)``.

    ``":8787"`` gives ``("", 8787)`` (dask: every interface); an IPv6 host
    is written in brackets when a port follows (``"[::1]:8787"``).

    Raises
    ------
    UserError
        When the port is not a number from 0 to 65535.
    """
    text = str(address).strip()
    port_text: str | None
    if text.startswith("["):
        host, _, tail = text[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise UserError(
            f"dashboard address {address!r}: the port must be a number from 0 to 65535; "
            "write HOST or HOST:PORT, e.g. 127.0.0.1 or 0.0.0.0:8787"
        )
    return host, int(port_text)


def dashboard_bind(address: str | None, port: int | str | None) -> str:
    """A scheduler's ``dashboard_address``: the host of ``address`` (default loopback) and its port, else ``port``."""
    host, own_port = split_dashboard_address(address or LOOPBACK)
    chosen = own_port if own_port is not None else port
    return format_hostport(host, chosen if chosen is not None else LOCAL_PORT)


def dask_dashboard_address(address: str) -> str | list[tuple[str, int]]:
    """``address`` as dask's ``dashboard_address`` takes it: an IPv6 host as ``[(host, port)]``.

    dask splits a string on ``":"``, so ``"[fd00::1]:8787"`` would fail
    there; a list of ``(host, port)`` pairs is its other accepted form.
    """
    host, port = split_dashboard_address(address)
    if ":" in host:
        return [(host, port or 0)]
    return address


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is its machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind_host(dashboard_address: Any) -> str | None:
    """The host part of a ``dashboard_address`` (``HOST[:PORT]``); ``None`` for an unknown value."""
    if not isinstance(dashboard_address, str):
        return None
    try:
        return split_dashboard_address(dashboard_address)[0]
    except UserError:
        return None


def on_loopback(dashboard_address: Any) -> bool:
    """Whether a server given ``dashboard_address`` (``HOST[:PORT]``) listens on loopback only."""
    host = _bind_host(dashboard_address)
    return host is not None and is_loopback(host)


def reach_host(dashboard_address: Any, fallback: str) -> str:
    """The address that reaches, on its own host, a server given ``dashboard_address``.

    Loopback for a loopback address, the address itself for another one,
    ``fallback`` (the server's address) for every interface or an unknown value.
    """
    host = _bind_host(dashboard_address)
    if host is None:
        return fallback
    if is_loopback(host):
        return host if ":" in host else LOOPBACK
    return host if _any_as_empty(host) else fallback


def hop_text(hop: JumpHop) -> str:
    """A jump hop as ``ssh -J`` takes it: ``[user@]address[:port]``."""
    user = f"{hop.user}@" if hop.user else ""
    port = f":{hop.port}" if hop.port else ""
    return f"{user}{bracket(hop.address) if port else hop.address}{port}"


def tunnel_argv(
    target: str, remote_host: str, remote_port: int, *, local_port: int = LOCAL_PORT,
    port: int | None = None, jumps: Sequence[str] = (), key_file: str | None = None,
) -> list[str]:
    """``ssh -N -L LOCAL:REMOTE_HOST:REMOTE_PORT [-J JUMPS] [-p PORT] [-i KEY] TARGET`` as an argv list.

    Parameters
    ----------
    target
        ``[user@]host`` to log in to; ``remote_host`` is as that host sees it.
    remote_host, remote_port
        Where the dashboard listens, seen from ``target``.
    local_port
        The laptop's end of the tunnel.
    port, jumps, key_file
        The target's SSH port (22 is left out), jump hops first to last, and key.
    """
    argv = ["ssh", "-N", "-L", f"{local_port}:{format_hostport(remote_host, remote_port)}"]
    if jumps:
        argv += ["-J", ",".join(jumps)]
    if port and port != 22:
        argv += ["-p", str(port)]
    if key_file:
        argv += ["-i", key_file]
    argv.append(target)
    return argv


def host_tunnel_argv(host: HostSpec, bind_host: str, remote_port: int, *, local_port: int = LOCAL_PORT) -> list[str]:
    """The tunnel straight to inventory ``host`` (through its jump hosts) to a dashboard it serves.

    ``bind_host`` is where the dashboard listens on the host: its loopback,
    or, for an address of every interface, loopback reaches it as well.
    """
    remote = LOOPBACK if is_loopback(bind_host) or not _any_as_empty(bind_host) else bind_host
    target = f"{host.user}@{host.address}" if host.user else host.address
    jumps = [hop_text(hop) for hop in host.jumps or ()]
    return tunnel_argv(target, remote, remote_port, local_port=local_port, port=host.port, jumps=jumps)


def checked_address(value: Any) -> str | None:
    """``value`` of config ``dashboard-address`` (or the keyword) as a string, checked; ``None`` when unset.

    Raises
    ------
    UserError
        When it is not ``HOST`` or ``HOST:PORT``.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str) or any(c.isspace() for c in value.strip()):
        raise UserError(
            f"dashboard address {value!r} is not HOST or HOST:PORT; write e.g. 127.0.0.1 or 0.0.0.0:8787"
        )
    split_dashboard_address(value)
    return value.strip()


def where(scheduler: Any, link: str, *, remote: bool) -> dict[str, Any]:
    """Where a cluster's dashboard is, for ``status`` and ``speccluster-ssh dashboard``.

    Parameters
    ----------
    scheduler
        The cluster's scheduler: dask's ``Scheduler`` in the head, or a
        :class:`~speccluster_ssh.process.RemoteScheduler`.
    link
        The cluster's ``dashboard_link`` (reachable on the head).
    remote
        Whether the scheduler runs on an inventory host.

    Returns
    -------
    dict
        ``link``; ``host``, the inventory host the scheduler runs on
        (``None``: the head); ``bind``, the address it listens on there
        (``""``: every interface); ``port``, its port there (``None`` unknown).
    """
    if remote:
        address = scheduler.options.get("dashboard_address")
        bind = split_dashboard_address(address)[0] if isinstance(address, str) else ""
        return {"link": link, "host": scheduler.host, "bind": _any_as_empty(bind), "port": scheduler.dashboard_port}
    http = getattr(scheduler, "http_server", None)
    bind = getattr(http, "address", "") or ""
    return {"link": link, "host": None, "bind": _any_as_empty(bind), "port": getattr(http, "port", None)}


def _any_as_empty(bind: str) -> str:
    return "" if bind in ("0.0.0.0", "::", "[::]") else bind


def cluster_link(scheduler: Any, default: str, *, remote: bool) -> str:
    """The cluster's ``dashboard_link``: the address its scheduler's dashboard answers at.

    Parameters
    ----------
    scheduler
        The cluster's scheduler: dask's ``Scheduler`` in the head, or a
        :class:`~speccluster_ssh.process.RemoteScheduler` (``remote``).
    default
        distributed's own link for the cluster, used when nothing better is known.
    """
    # A forwarded scheduler's dashboard is reached through its forward on the head.
    forwarded = getattr(scheduler, "head_dashboard_link", "")
    if forwarded:
        return str(forwarded)
    if remote:
        port = scheduler.dashboard_port
        host = split_url(scheduler.address)[1] if scheduler.address else "localhost"
        # Loopback only when the scheduler's host is the head: other hosts' are forwarded.
        host = reach_host(scheduler.options.get("dashboard_address"), host)
        return url("http", host, port, "/status") if port else ""
    # The head's scheduler: the address its dashboard listens on, unless that is every interface.
    http_server = getattr(scheduler, "http_server", None)
    host = reach_host(getattr(http_server, "address", None), "")
    if host and default:
        from distributed.utils import format_dashboard_link

        return str(format_dashboard_link(bracket(host), http_server.port))
    return default
