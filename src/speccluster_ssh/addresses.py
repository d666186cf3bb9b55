"""Host and port text, IPv6 literals included: the one place that writes and reads ``host:port``.

An IPv6 literal takes brackets wherever a port follows it (``[fd00::12]:22``,
``tls://[fd00::12]:40123``, ``http://[fd00::12]:8787/status``) and none where
it stands alone (``ansible_host: fd00::12``, ``ssh -J`` without a port, an
argument of :func:`socket.create_connection`). Every module that builds or
parses such text uses these helpers instead of splitting on ``":"``. Pure
functions, no I/O: which family a host is reached over is
:mod:`speccluster_ssh.families`.

The shipped agent sources (stdlib only, run on the hosts) cannot import
this module; they parse ``host:port`` with ``rpartition(":")`` and strip the
brackets, which agrees with :func:`split_hostport` for every text
:func:`format_hostport` writes.
"""

from __future__ import annotations

import ipaddress

__all__ = ["bracket", "family", "family_name", "format_hostport", "split_hostport", "split_url", "unbracket", "url"]


def unbracket(host: str) -> str:
    """``"[fd00::1]"`` -> ``"fd00::1"``; anything else unchanged."""
    if len(host) >= 2 and host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def family(host: str) -> int | None:
    """4 or 6 for an IPv4 or IPv6 literal (brackets and a ``%zone`` allowed), ``None`` for a name."""
    text = unbracket(host.strip())
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).version
    except ValueError:
        return None


def family_name(version: int | None) -> str:
    """``"IPv4"``, ``"IPv6"``, or ``"unknown family"``."""
    return {4: "IPv4", 6: "IPv6"}.get(version or 0, "unknown family")


def bracket(host: str) -> str:
    """An IPv6 literal in brackets (as it stands before ``:port``); names and IPv4 unchanged."""
    host = unbracket(host)
    return f"[{host}]" if ":" in host else host


def format_hostport(host: str, port: int | str) -> str:
    """``("fd00::1", 22)`` -> ``"[fd00::1]:22"``; ``("h1", 22)`` -> ``"h1:22"``."""
    return f"{bracket(host)}:{port}"


def split_hostport(text: str, default_port: int | None = None) -> tuple[str, int | None]:
    """Read ``host[:port]``: ``"[fd00::1]:22"`` -> ``("fd00::1", 22)``, ``"fd00::1"`` -> ``("fd00::1", default_port)``.

    An unbracketed text with more than one ``":"`` is an IPv6 literal without
    a port, as OpenSSH and Ansible read it.

    Raises
    ------
    ValueError
        For an unclosed ``[``, text after ``]`` that is not ``:port``, an
        empty host, or a port that is not a number from 0 to 65535.
    """
    rest = text.strip()
    port_text: str | None
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r} has an unclosed '['")
        if tail and not tail.startswith(":"):
            raise ValueError(f"{text!r} has text after ']' that is not :port")
        port_text = tail[1:] if tail else None
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, None
    if not host:
        raise ValueError(f"{text!r} names no host")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r} has port {port_text!r}, not a number from 0 to 65535")
    return host, int(port_text)


def url(scheme: str, host: str, port: int | str, path: str = "") -> str:
    """``("tls", "fd00::12", 40123)`` -> ``"tls://[fd00::12]:40123"``; ``path`` is appended as it is."""
    return f"{scheme}://{format_hostport(host, port)}{path}"


def split_url(address: str, default_scheme: str = "tcp") -> tuple[str, str, int]:
    """A dask address's parts: ``"tls://[fd00::12]:40123"`` -> ``("tls", "fd00::12", 40123)``.

    Raises
    ------
    ValueError
        When the address has no port or an unreadable one.
    """
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = default_scheme, address
    rest = rest.split("/", 1)[0]
    host, port = split_hostport(rest)
    if port is None:
        raise ValueError(f"address {address!r} has no port")
    return scheme or default_scheme, host, port
