"""The head's lease requests to a host agent (issue 23): claim, want, release, mark busy or idle, list. Head only, not shipped.

:class:`LeaseRequests` is a base of :class:`~speccluster_ssh.agent.HostAgent`
(kept apart so that class stays small); the agent side is
``agent/lease_keeper.py``. A refused claim is an answer, not an error: it
comes back as a :class:`LeaseRefused` naming who holds the rest. An error
(an unsafe lease directory, a lock held too long, a lost agent) is a
:class:`~speccluster_ssh.errors.HostError` whose ``fix`` says what to do.
Not used by placement or startup yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..leases import Lease

if TYPE_CHECKING:
    from ..inventory import HostSpec
    from ..powermarks import PowerMark


@dataclass(frozen=True)
class HeldLease:
    """A lease (or want) the host's agent holds for this cluster until it is released or the agent ends.

    ``lease_id`` names it in :meth:`LeaseRequests.lease_release`; ``lease`` is its record as the host wrote it
    (for a claim, with the GPU devices the host chose).
    """

    host: str
    lease_id: str
    lease: Lease


@dataclass(frozen=True)
class LeaseRefused:
    """A claim that did not fit on ``host``.

    ``short``: what was missing (slots, cores, memory by how much; ``gpus`` the devices taken or
    the count missing); ``free``: what was free; ``holders``: every live lease there; ``why``: one
    line naming them.
    """

    host: str
    why: str
    short: dict[str, Any] = field(default_factory=dict)
    free: dict[str, Any] = field(default_factory=dict)
    holders: tuple[Lease, ...] = ()


class LeaseRequests:
    """The lease requests of a :class:`~speccluster_ssh.agent.HostAgent` (see the module)."""

    if TYPE_CHECKING:
        host: HostSpec

        async def request(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]: ...

    async def lease_claim(
        self,
        holds: Mapping[str, Any],
        capacity: Mapping[str, Any],
        *,
        name: str = "",
        head: str = "",
        entry: str = "",
        timeout: float = 60.0,
    ) -> HeldLease | LeaseRefused:
        """Claim ``holds`` on the host for this cluster, atomically with every other cluster's claims there.

        Parameters
        ----------
        holds
            What the entry uses: ``slots``, and ``cores``, ``memory`` (bytes) and ``gpus`` (device
            ids, or a count: the host picks the lowest free devices) where the inventory gives them.
        capacity
            The host's capacity as this cluster's inventory gives it: ``slots``, ``cores``,
            ``memory``, ``gpus`` (device ids); cores and memory are checked when non-zero.
        name, head, entry
            Shown to other users: the cluster's name, the head's host, the entry's name.
        timeout
            Seconds to wait for the agent's answer.

        Returns
        -------
        HeldLease or LeaseRefused
            The lease, held by the agent until :meth:`lease_release` or the agent's end; or why
            not, and who holds the rest.

        Raises
        ------
        HostError
            The claim could not be made (see the module); its ``fix`` says what to do.
        """
        record = {"name": name, "head": head, "entry": entry, "host": self.host.name, "holds": dict(holds)}
        reply = await self.request("lease_claim", timeout=timeout, record=record, capacity=dict(capacity))
        if not reply.get("held"):
            return LeaseRefused(
                host=self.host.name,
                why=str(reply.get("why") or ""),
                short=dict(reply.get("short") or {}),
                free=dict(reply.get("free") or {}),
                holders=tuple(Lease.from_record(self.host.name, r) for r in reply.get("holders") or ()),
            )
        return self._held(reply)

    async def lease_want(
        self, wants: Mapping[str, Any], *, name: str = "", head: str = "", entry: str = "", timeout: float = 60.0
    ) -> HeldLease:
        """Record on the host that this cluster waits for ``wants`` (an amount, as ``holds`` of :meth:`lease_claim`).

        Parameters
        ----------
        wants
            What the cluster waits for here; ``gpus`` are device ids.
        name, head, entry
            Shown to other users, as for :meth:`lease_claim`.
        timeout
            Seconds to wait for the agent's answer.

        Returns
        -------
        HeldLease
            The want, held until :meth:`lease_unwant` or the agent's end.
        """
        record = {"name": name, "head": head, "entry": entry, "host": self.host.name, "wants": dict(wants)}
        return self._held(await self.request("lease_want", timeout=timeout, record=record))

    async def lease_release(self, lease_id: str, timeout: float = 60.0) -> bool:
        """Give a lease back (its entry's processes have stopped).

        Parameters
        ----------
        lease_id
            :attr:`HeldLease.lease_id` of a claim.
        timeout
            Seconds to wait for the agent's answer.

        Returns
        -------
        bool
            Whether the agent held it (``False``: released already, or never held).
        """
        return await self._give_back("lease_release", lease_id, timeout)

    async def lease_unwant(self, want_id: str, timeout: float = 60.0) -> bool:
        """Stop waiting: remove a want (see :meth:`lease_want`); ``False`` when the agent did not hold it.

        Parameters
        ----------
        want_id
            :attr:`HeldLease.lease_id` of a want.
        timeout
            Seconds to wait for the agent's answer.
        """
        return await self._give_back("lease_unwant", want_id, timeout)

    async def _give_back(self, op: str, lease_id: str, timeout: float) -> bool:
        reply = await self.request(op, timeout=timeout, lease=lease_id)
        return bool(reply.get("released"))

    async def lease_mark(self, lease_id: str, state: str, timeout: float = 60.0) -> bool:
        """Say on the host whether a held lease's workers are ``"busy"`` or ``"idle"`` (others see it).

        The host rewrites the lease's file in place (see ``agent/leases.py``); marking it with the
        state it has keeps the time it was marked.

        Parameters
        ----------
        lease_id
            :attr:`HeldLease.lease_id` of a claim.
        state
            ``"busy"``, ``"idle"``, or ``""`` (not said).
        timeout
            Seconds to wait for the agent's answer.

        Returns
        -------
        bool
            Whether the agent holds that lease (``False``: released, or never held).

        Raises
        ------
        HostError
            The state is none of those three, the id names a want, or the host's lock stayed taken.
        """
        reply = await self.request("lease_mark", timeout=timeout, lease=lease_id, state=state)
        return bool(reply.get("marked"))

    async def lease_list(self, timeout: float = 60.0) -> list[Lease]:
        """The live leases and wants on the host, of every user and cluster, in file name order.

        Parameters
        ----------
        timeout
            Seconds to wait for the agent's answer.

        Returns
        -------
        list of Lease
            Each with its user (the file's owner on the host) and ``lease_id``; bad files are left
            out, and the agent reports each once as a ``lease_warning`` event.
        """
        reply = await self.request("lease_list", timeout=timeout)
        return [Lease.from_record(self.host.name, r) for r in reply.get("records") or ()]

    async def lease_and_power_list(self, timeout: float = 60.0) -> tuple[list[Lease], list[PowerMark]]:
        """:meth:`lease_list`, and the power records there: who woke the host (see :mod:`~speccluster_ssh.powermarks`)."""
        from ..powermarks import PowerMark

        reply = await self.request("lease_list", timeout=timeout)
        leases = [Lease.from_record(self.host.name, r) for r in reply.get("records") or ()]
        return leases, [PowerMark.from_record(r) for r in reply.get("power") or ()]

    async def lease_power(self, name: str, head: str, timeout: float = 60.0) -> str:
        """Say on the host that this cluster woke it, until the agent ends; the record's id.

        Parameters
        ----------
        name, head
            Shown to other users: the cluster's name and the head's host.
        timeout
            Seconds to wait for the agent's answer.
        """
        record = {"name": name, "head": head, "host": self.host.name}
        reply = await self.request("lease_power", timeout=timeout, record=record)
        return str(reply["lease"])

    def _held(self, reply: dict[str, Any]) -> HeldLease:
        return HeldLease(self.host.name, str(reply["lease"]), Lease.from_record(self.host.name, reply["record"]))
