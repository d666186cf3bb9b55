"""Who woke a host, where ``speccluster-ssh hosts`` can read it without that cluster (issue 25).

A cluster's :class:`~speccluster_ssh.powerctl.PowerKeeper` knows which
hosts it woke; ``hosts`` is another process, often of another user. So the
waking cluster leaves *power records* in the lease store (``agent/leases.py``,
kind ``power``: ``speccluster-power.<uid>.<hex>.json``), held like leases:

``woken``
    Written on the host by the cluster's agent once the host answered after
    the cluster's power-on command. It ends with that agent: when the
    cluster powers the host off (its agent is stopped first) or ends,
    whatever ends it. ``hosts`` reads it with the leases, in the same
    request.
``waking``
    Written on the head (in its lease directory, where a survey run on the
    head reads it) while the host boots: the host cannot be asked yet. The
    cluster's process holds it from its power-on command until the host
    answers or its boot timeout ends, or the process ends.

Only data goes into the records (JSON, checked by ``lease_record`` on
reading); the user is the file's owner, never a written name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PowerMark", "WakingMarks", "head_power_marks", "label_text", "power_label"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PowerMark:
    """One live power record: cluster ``cluster`` (``name``, from ``head``) of ``user`` woke ``host``."""

    host: str
    power: str  # "waking" or "woken"
    user: str
    cluster: str
    name: str
    head: str
    since: float

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PowerMark:
        """From one ``power`` record of ``lease_list`` (checked there)."""
        return cls(
            host=str(record.get("host") or ""), power=str(record["power"]), user=str(record["user"]),
            cluster=str(record["cluster"]), name=str(record.get("name") or ""), head=str(record.get("head") or ""),
            since=float(record["since"]),
        )

    def who(self) -> str:
        """``<cluster name> of <user>``."""
        return f"{self.name or self.cluster} of {self.user}"


def power_label(power: str, marks: Iterable[PowerMark], host: str) -> tuple[str, PowerMark | None]:
    """The power state ``hosts`` shows for ``host`` and the record it comes from. Pure.

    Parameters
    ----------
    power
        What the survey alone says: ``asleep`` (it did not answer), ``on`` (it did), ``""``
        (not a host that sleeps).
    marks
        The power records read (on the host and on the head), of any host.

    Returns
    -------
    tuple
        ``("waking", mark)`` when the host did not answer and a cluster is waking it;
        ``("awake", mark)`` when it answered and a cluster's agent there says it woke it; else
        ``(power, None)``.
    """
    mine = sorted((m for m in marks if m.host == host), key=lambda m: m.since)
    if power == "asleep":
        waking = [m for m in mine if m.power == "waking"]
        if waking:
            return "waking", waking[0]
    elif power == "on":
        woken = [m for m in mine if m.power == "woken"]
        if woken:
            return "awake", woken[0]
    return power, None


def label_text(power: str, mark: PowerMark | None, now: float) -> str:
    """``waking (12 s)``, ``awake (woken by a of alice)``, or ``power`` itself."""
    if mark is None:
        return power
    if power == "waking":
        return f"waking ({max(now - mark.since, 0):.0f} s)"
    return f"awake (woken by {mark.who()})"


def head_power_marks(path: str | None = None) -> list[PowerMark]:
    """The live ``waking`` records in the head's lease directory; none when it cannot be read (logged)."""
    from .agent.leases import LeaseError, lease_dir_path, lease_list

    try:
        records = lease_list(lease_dir_path(path), timeout=2.0)
    except LeaseError as exc:
        logger.info("the head's power records not read: %s", exc)
        return []
    return [PowerMark.from_record(r) for r in records if r["kind"] == "power" and r["power"] == "waking"]


class WakingMarks:
    """The ``waking`` records one cluster holds on the head, one per host it is waking.

    Parameters
    ----------
    cluster
        The cluster's id.
    name
        Its name, shown to others.
    path
        The head's lease directory (``None``: the default, see ``agent/leases.py``).
    """

    def __init__(self, cluster: str, name: str, path: str | None = None) -> None:
        self.cluster = cluster
        self.name = name
        self.path = path
        self._held: dict[str, Any] = {}

    def start(self, host: str) -> None:
        """Say that host ``host`` is waking; a failure only loses the display (logged)."""
        import socket

        from .agent.leases import LeaseError, lease_dir_path, lease_power

        self.end(host)
        record = {"cluster": self.cluster, "name": self.name, "head": socket.gethostname(), "host": host,
                  "power": "waking"}  # fmt: skip
        try:
            self._held[host] = lease_power(lease_dir_path(self.path), record, timeout=2.0)
        except (LeaseError, OSError) as exc:
            logger.info("host %s: its waking record not written: %s", host, exc)

    def end(self, host: str) -> None:
        """Host ``host`` answered, or its boot timeout ended: its record goes."""
        from .agent.leases import lease_release

        handle = self._held.pop(host, None)
        if handle is not None:
            lease_release(handle)

    def close(self) -> None:
        """Remove every record (the cluster ends)."""
        for host in list(self._held):
            self.end(host)
