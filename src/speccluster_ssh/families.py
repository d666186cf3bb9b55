"""Which address family (IPv4 or IPv6) the head reaches a host over.

A host's inventory name may resolve to addresses of both families (a
dual-stack lab), of one (an IPv6-only lab: AAAA records only), or be a
literal of either. The head connects over SSH to the first address that
answers, in the order the resolver sorts them (RFC 6724), giving a
preferred address a short head start over the next ones as in Happy
Eyeballs (RFC 8305): an address family blocked between the head and the
host (packets dropped, no refusal) costs a fraction of a second, not the
connect timeout. Everything the cluster later builds for the host (its
workers' advertised addresses, the scheduler address it is given, the reach
probes) follows the family of that SSH link, so one working family carries
the whole cluster.

An address the head has no route to at all (an IPv6-only host and a head
without IPv6) is found before any packet is sent: :func:`no_route_reason`
gives the one line of the :class:`~speccluster_ssh.errors.HostError`.

Text formatting of addresses is :mod:`speccluster_ssh.addresses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Sequence

from .addresses import family, family_name

__all__ = [
    "HAPPY_EYEBALLS_DELAY", "NoRouteError", "connect_first", "dual_stack_socket", "listen_socket", "no_route_reason",
    "resolve", "route_source",
]

#: Seconds a preferred address may still answer after a later one did (RFC 8305 suggests 0.25).
HAPPY_EYEBALLS_DELAY = 0.25

# connect() errors that mean "the head has no way to this address", not "the host is down".
_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


async def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to on the head, resolver order, each once.

    Raises
    ------
    OSError
        (``socket.gaierror``) when the name does not resolve.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for fam, _, _, _, sockaddr in infos:
        if fam in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in seen:
            seen.append(str(sockaddr[0]))
    return seen


def route_source(address: str) -> str | None:
    """The head's own address that packets to ``address`` leave from; ``None`` when the head has no route there.

    A UDP socket's ``connect`` only looks the route up; nothing is sent.
    """
    fam = socket.AF_INET6 if family(address) == 6 else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as sock:
            sock.connect((address, 9))
            return str(sock.getsockname()[0])
    except OSError as exc:
        if exc.errno in _NO_ROUTE:
            return None
        raise


def no_route_reason(name: str, addresses: Sequence[str]) -> str | None:
    """Why the head cannot use any of ``addresses`` of host ``name``; ``None`` when it has a route to one."""
    unusable = []
    for address in addresses:
        try:
            if route_source(address) is not None:
                return None
        except OSError:
            return None  # not a routing question: let the connection say what it is
        unusable.append(address)
    if not unusable:
        return None
    families = sorted({family_name(family(a)) for a in unusable})
    return (
        f"{name} has only {' and '.join(families)} addresses ({', '.join(unusable)}), "
        f"and the head has no route to {'them' if len(unusable) > 1 else 'it'}"
    )


def listen_socket(port: int = 0) -> socket.socket:
    """A TCP socket listening on every address of both families where the head has IPv6, else of IPv4.

    One dual-stack socket (``IPV6_V6ONLY`` off) has one port for both
    families, unlike two sockets bound to port 0.
    """
    if socket.has_ipv6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        except OSError:
            sock.close()
        else:
            sock.listen(64)
            return sock
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("0.0.0.0", port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


class NoRouteError(OSError):
    """The head has no route to any address of a host (its message is :func:`no_route_reason`'s line)."""


async def dual_stack_socket(label: str, address: str, port: int, timeout: float) -> socket.socket | None:
    """A connected socket to ``address`` when it names both families (see :func:`connect_first`), else ``None``.

    ``None`` leaves connecting to the caller as before: a literal, a name of
    one family, or one the head cannot resolve (the caller's own connect
    reports that).

    Raises
    ------
    NoRouteError
        When the head has no route to any of its addresses.
    OSError, TimeoutError
        From :func:`connect_first`, when no address answered.
    """
    try:
        addresses = await resolve(address, port)
    except OSError:
        return None
    why = no_route_reason(label, addresses)
    if why is not None:
        raise NoRouteError(why)
    if len({family(a) for a in addresses}) < 2:
        return None
    return await connect_first(addresses, port, timeout)


async def _connect_one(address: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if family(address) == 6 else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_first(
    addresses: Sequence[str], port: int, timeout: float, delay: float = HAPPY_EYEBALLS_DELAY
) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers, earlier ones preferred.

    Every address is tried at once; a later address that answered wins
    only when every earlier one failed, or ``delay`` seconds passed without
    an earlier one answering. The other connections are closed.

    Raises
    ------
    OSError
        The first address's error when none connected.
    TimeoutError
        When none answered within ``timeout`` seconds.
    """
    if not addresses:
        raise OSError(errno.EADDRNOTAVAIL, "no address to connect to")
    loop = asyncio.get_running_loop()
    tries = [asyncio.ensure_future(_connect_one(a, port)) for a in addresses]
    deadline = loop.time() + timeout
    first_win: float | None = None
    chosen: asyncio.Future[socket.socket] | None = None
    try:
        while chosen is None:
            for attempt in tries:
                if not attempt.done():
                    break
                if attempt.exception() is None:
                    chosen = attempt  # every earlier one failed
                    break
            if chosen is not None:
                break
            won = [t for t in tries if t.done() and t.exception() is None]
            now = loop.time()
            if won and first_win is None:
                first_win = now
            if won and (now >= (first_win or now) + delay or now >= deadline):
                chosen = won[0]
                break
            pending = [t for t in tries if not t.done()]
            if not pending:
                raise tries[0].exception() or OSError("no address answered")
            if now >= deadline:
                raise TimeoutError(f"no answer within {timeout:g} s")
            until = deadline if first_win is None else min(deadline, first_win + delay)
            await asyncio.wait(pending, timeout=max(0.0, until - now), return_when=asyncio.FIRST_COMPLETED)
        return chosen.result()
    finally:
        for attempt in tries:
            if attempt is chosen:
                continue
            attempt.cancel()
        # Awaited, so no connection is left half open; the losers' sockets close here.
        results = await asyncio.gather(*tries, return_exceptions=True)
        for attempt, result in zip(tries, results):
            if attempt is not chosen and isinstance(result, socket.socket):
                with contextlib.suppress(OSError):
                    result.close()
