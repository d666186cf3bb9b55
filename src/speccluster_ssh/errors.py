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
    """

    def __init__(self, host: str, reason: str, tail: str = "") -> None:
        self.host = host
        self.reason = reason
        self.tail = tail
        super().__init__(f"host {host}: {reason}")

    def details(self) -> str:
        """The message followed by the remote log tail, for humans."""
        if not self.tail.strip():
            return str(self)
        lines = self.tail.strip().splitlines()[-20:]
        return str(self) + "\n  remote log tail:\n" + "\n".join("    " + line for line in lines)


class CapacityError(SpecClusterError):
    """The inventory has no room for what was asked: every usable slot is taken."""
