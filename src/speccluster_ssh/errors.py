"""Exceptions that carry one clear line for the user."""

from __future__ import annotations


class SpecClusterError(Exception):
    """Base class: ``str(exc)`` is one line saying what is wrong and how to fix it."""


class UserError(SpecClusterError):
    """A mistake in what the user gave us (inventory, option, name). Exit status 2."""


class HostError(SpecClusterError):
    """Something went wrong on, or on the way to, one host.

    Parameters
    ----------
    host
        Inventory name of the host.
    reason
        What went wrong, one line.
    tail
        The tail of the remote log, shown below the line when there is one.
    fix
        For a failure that retrying will not cure (a python without
        distributed, another distributed release, a refused host key): what
        the user must change. Such hosts are retried rarely.
    """

    def __init__(self, host: str, reason: str, tail: str = "", *, fix: str = "") -> None:
        self.host = host
        self.reason = reason
        self.tail = tail
        self.fix = fix
        super().__init__(f"host {host}: {reason}")

    def details(self) -> str:
        """The message followed by the remote log tail, for humans."""
        if not self.tail.strip():
            return str(self)
        lines = self.tail.strip().splitlines()[-20:]
        return str(self) + "\n  remote log tail:\n" + "\n".join("    " + line for line in lines)


class StartError(SpecClusterError):
    """Too few workers started: a summary line, then one line per host that failed and why.

    Parameters
    ----------
    summary
        How many workers started of how many, and how many were needed.
    hosts
        Host name -> why its workers did not start.
    """

    def __init__(self, summary: str, hosts: dict[str, str]) -> None:
        self.summary = summary
        self.hosts = dict(hosts)
        super().__init__("\n".join([summary, *(f"  {host}: {why}" for host, why in self.hosts.items())]))


class CapacityError(SpecClusterError):
    """The inventory has no room for what was asked: every usable slot is taken."""
