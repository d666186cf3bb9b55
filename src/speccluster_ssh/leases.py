"""Shared labs, the head's side (issue 23): what is free, who gets a freed slot, and the user quota.

Pure functions on the lease records the hosts report (``agent/leases.py``
reads and writes them on each host): no I/O, no clock, and no import of the
rest of the package, so the inventory's variable table can use
:func:`parse_user_quota` when ``speccluster_user_quota`` gets its row.
The cluster's lease watcher (``sharing.py``), placement and the CLI call them.

What is decided, and why
------------------------
Free capacity
    :func:`free_capacity`: what the inventory gives for a host minus the
    live leases of *other* clusters (a cluster's own entries are counted by
    its placement already). Slots always; cores and memory only where the
    inventory gives them (``None`` otherwise: unknown is not zero); GPU
    devices by id, so two clusters never get the same device.
Fair share
    :func:`fair_order`: max-min fairness by progressive filling. Each freed
    slot goes to the waiting cluster whose *user* holds the fewest slots on
    the lab (every host the records come from), counting the slots given so
    far; ties go to the earliest want, then the smallest cluster id, so
    every deployer that sees the same records computes the same order and
    no server is needed. Users, not clusters, are the unit: one user
    running two clusters does not get twice the share. A cluster wants at
    most the slots its live wants ask for on the host; a user at their
    quota is skipped. A user is the name the host gives the file's owner,
    which no record can forge; a want's time is as its deployer wrote it,
    so fairness between users who run the tool is exact, and a user who
    bypasses it can only win ties (see the module ``agent/leases.py``).
"The lab"
    is the hosts whose records a deployer reads: deployers of one
    inventory agree; deployers of overlapping inventories may differ about
    the hosts only one of them sees.
Quota
    ``speccluster_user_quota`` limits the slots one user holds on the lab:
    a count for everyone, or a map of user to count with ``"*"`` for every
    other user (:func:`parse_user_quota`). The head checks it when it
    claims (:func:`quota_refusal`); it is as cooperative as the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Amount",
    "Lease",
    "Waiting",
    "entries_fit",
    "entry_amount",
    "fair_order",
    "free_capacity",
    "host_capacity",
    "next_claimer",
    "parse_user_quota",
    "quota_of",
    "quota_refusal",
    "fair_grants",
    "fair_limits",
    "slots_held",
    "waiting_clusters",
]

EVERYONE = "*"


@dataclass(frozen=True)
class Amount:
    """Slots, cores, memory (bytes) and GPU devices; ``cores``/``memory`` ``None`` when not given."""

    slots: int = 0
    cores: int | None = None
    memory: int | None = None
    gpus: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Amount:
        """From a record's ``holds``/``wants`` (as ``agent/leases.py`` checked it: 0 means none)."""
        return cls(
            slots=int(data.get("slots") or 0),
            cores=int(data.get("cores") or 0),
            memory=int(data.get("memory") or 0),
            gpus=tuple(str(g) for g in data.get("gpus") or ()),
        )


@dataclass(frozen=True)
class Lease:
    """One live lease (``kind`` ``"lease"``) or want (``"want"``) a host reported.

    ``user`` is the name the host gives the file's owner; ``since`` is when it
    was taken (for a want: when the cluster started waiting); ``lease_id`` is
    its file's name on the host (unique there). ``state`` is ``"busy"`` or
    ``"idle"`` as its holder last marked it (``""``: not said), since
    ``state_since``.
    """

    host: str
    kind: str
    user: str
    cluster: str
    amount: Amount
    since: float = 0.0
    name: str = ""
    head: str = ""
    entry: str = ""
    lease_id: str = ""
    state: str = ""
    state_since: float = 0.0

    @classmethod
    def from_record(cls, host: str, record: Mapping[str, Any]) -> Lease:
        """From one record of ``lease_list`` on ``host``."""
        kind = str(record["kind"])
        return cls(
            # The inventory's name of the host, as the claimer gave it; else the host that listed it.
            host=str(record.get("host") or host),
            kind=kind,
            user=str(record["user"]),
            cluster=str(record["cluster"]),
            amount=Amount.from_record(record["holds" if kind == "lease" else "wants"]),
            since=float(record.get("since") or 0.0),
            name=str(record.get("name") or ""),
            head=str(record.get("head") or ""),
            entry=str(record.get("entry") or ""),
            lease_id=str(record.get("file") or ""),
            state=str(record.get("state") or ""),
            state_since=float(record.get("state_since") or 0.0),
        )

    @property
    def held(self) -> bool:
        return self.kind == "lease"


def host_capacity(
    slots: int,
    *,
    nworkers: int = 1,
    nthreads: int | None = None,
    memory_limit: int | str | None = None,
    gpus: Any = None,
) -> Amount:
    """A host's capacity as its inventory gives it.

    Cores and memory are known only when every slot's size is:
    ``slots x nworkers x nthreads`` and ``slots x nworkers x memory_limit``
    (``memory_limit`` in bytes; ``"auto"`` gives none). GPU devices only
    when the inventory lists them (a count or ``"auto"`` is resolved by the
    host's agent: pass its device ids).
    """
    workers = slots * nworkers
    cores = workers * nthreads if nthreads else None
    memory = workers * memory_limit if isinstance(memory_limit, int) and memory_limit > 0 else None
    devices = tuple(str(g) for g in gpus) if isinstance(gpus, (list, tuple)) else ()
    return Amount(slots=slots, cores=cores, memory=memory, gpus=devices)


def free_capacity(capacity: Amount, leases: Iterable[Lease], cluster: str) -> Amount:
    """What ``cluster`` may still take on one host: ``capacity`` minus the live leases of other clusters.

    Parameters
    ----------
    capacity
        The host's capacity (see :func:`host_capacity`).
    leases
        The host's live records (wants take nothing).
    cluster
        The id of the cluster asking; its own leases are not subtracted.
    """
    others = [lease.amount for lease in leases if lease.held and lease.cluster != cluster]
    taken = {gpu for amount in others for gpu in amount.gpus}

    def left(limit: int | None, used: int) -> int | None:
        return None if limit is None else max(limit - used, 0)

    return Amount(
        slots=max(capacity.slots - sum(a.slots for a in others), 0),
        cores=left(capacity.cores, sum(a.cores or 0 for a in others)),
        memory=left(capacity.memory, sum(a.memory or 0 for a in others)),
        gpus=tuple(gpu for gpu in capacity.gpus if gpu not in taken),
    )


def slots_held(leases: Iterable[Lease]) -> dict[str, int]:
    """Slots each user holds on the lab (every host in ``leases``)."""
    held: dict[str, int] = {}
    for lease in leases:
        if lease.held:
            held[lease.user] = held.get(lease.user, 0) + lease.amount.slots
    return held


@dataclass(frozen=True)
class Waiting:
    """A cluster waiting for slots on one host: its user, since when it waits (lab-wide), how many it wants here."""

    cluster: str
    user: str
    since: float
    slots: int


def waiting_clusters(leases: Iterable[Lease], host: str) -> list[Waiting]:
    """The clusters with a live want on ``host``, in the order ties go (earliest want, then cluster id).

    A cluster's time is its earliest want anywhere on the lab, so waiting
    on more hosts does not lose it its place; it wants the sum of its wants
    on ``host`` (at least one slot each).
    """
    wants = [lease for lease in leases if not lease.held]
    first: dict[str, float] = {}
    for want in wants:
        first[want.cluster] = min(first.get(want.cluster, want.since), want.since)
    here: dict[str, Waiting] = {}
    for want in wants:
        if want.host != host:
            continue
        known = here.get(want.cluster)
        slots = max(want.amount.slots, 1) + (known.slots if known else 0)
        here[want.cluster] = Waiting(want.cluster, want.user, first[want.cluster], slots)
    return sorted(here.values(), key=lambda w: (w.since, w.cluster))


def fair_order(
    leases: Iterable[Lease], host: str, free_slots: int, quota: Mapping[str, int] | None = None
) -> list[str]:
    """Which waiting clusters get the ``free_slots`` free slots of ``host``, one cluster id per slot, in order.

    Max-min fairness (see the module): each slot goes to the waiting cluster
    whose user holds the fewest slots on the lab, counting the slots given
    so far; ties to the earliest want, then the smallest cluster id. Fewer
    ids than slots when the wants (or the quotas) run out.

    Parameters
    ----------
    leases
        The live records of every host of the lab (leases and wants).
    host
        The host whose slots are free.
    free_slots
        How many.
    quota
        The parsed ``speccluster_user_quota`` (see :func:`parse_user_quota`), or ``None``.
    """
    leases = list(leases)
    held = slots_held(leases)
    waiting = waiting_clusters(leases, host)
    remaining = {w.cluster: w.slots for w in waiting}
    order: list[str] = []
    for _ in range(max(free_slots, 0)):
        candidates = [w for w in waiting if remaining[w.cluster] > 0 and _below_quota(quota, w.user, held)]
        if not candidates:
            break
        chosen = min(candidates, key=lambda w: (held.get(w.user, 0), w.since, w.cluster))
        order.append(chosen.cluster)
        held[chosen.user] = held.get(chosen.user, 0) + 1
        remaining[chosen.cluster] -= 1
    return order


def next_claimer(leases: Iterable[Lease], host: str, quota: Mapping[str, int] | None = None) -> str | None:
    """The cluster that takes the next free slot of ``host``: :func:`fair_order`'s first, ``None`` if no one waits."""
    order = fair_order(leases, host, 1, quota)
    return order[0] if order else None


# -- the user quota ------------------------------------------------------------------------------


def parse_user_quota(value: Any) -> dict[str, int] | None:
    """``speccluster_user_quota``: ``None`` (no quota), a count for every user, or a map of user to count.

    In a map, ``"*"`` is the count of every user it does not name; without
    it, users it does not name have no quota.

    Raises
    ------
    ValueError
        Saying what is expected, for anything else.
    """
    expected = "a whole number of slots >= 0, or a map of user name to one (with '*' for everyone else)"
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(expected)
        return {EVERYONE: value}
    if not isinstance(value, Mapping) or not value:
        raise ValueError(expected)
    quota: dict[str, int] = {}
    for user, count in value.items():
        if not isinstance(user, str) or not user or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{expected}; bad item {user!r}: {count!r}")
        quota[user] = count
    return quota


def quota_of(quota: Mapping[str, int] | None, user: str) -> int | None:
    """The slots ``user`` may hold on the lab; ``None`` when unlimited."""
    if not quota:
        return None
    return quota.get(user, quota.get(EVERYONE))


def _below_quota(quota: Mapping[str, int] | None, user: str, held: Mapping[str, int]) -> bool:
    limit = quota_of(quota, user)
    return limit is None or held.get(user, 0) < limit


def quota_refusal(quota: Mapping[str, int] | None, user: str, leases: Iterable[Lease], slots: int) -> str | None:
    """Why ``user`` may not claim ``slots`` more slots on the lab; ``None`` when the quota allows it."""
    limit = quota_of(quota, user)
    if limit is None:
        return None
    held = slots_held(leases).get(user, 0)
    if held + slots <= limit:
        return None
    return (
        f"{user} holds {held} of the {limit} slots speccluster_user_quota gives them on the lab; "
        f"{slots} more would pass it"
    )


# -- what one cluster may place on a host -------------------------------------------------------


def entry_amount(slots: int, capacity: Amount, gpus: int = 0) -> Amount:
    """What one entry (one slot) of a host uses: its share of the cores and memory the inventory gives, and ``gpus`` devices.

    ``gpus`` is a count here: the host picks the devices when it grants the claim.
    """
    share = max(slots, 1)
    return Amount(
        slots=1,
        cores=capacity.cores // share if capacity.cores else None,
        memory=capacity.memory // share if capacity.memory else None,
        gpus=tuple(str(i) for i in range(gpus)),
    )


def entries_fit(free: Amount, per_entry: Amount) -> int:
    """How many entries of ``per_entry`` fit in ``free``: slots always; cores, memory and GPU devices where both are known."""
    fits = [free.slots]
    for have, need in ((free.cores, per_entry.cores), (free.memory, per_entry.memory)):
        if have is not None and need:
            fits.append(have // need)
    if per_entry.gpus:
        fits.append(len(free.gpus) // len(per_entry.gpus))
    return max(min(fits), 0)


def fair_grants(
    leases: Iterable[Lease], free_slots: Mapping[str, int], quota: Mapping[str, int] | None = None
) -> dict[str, list[str]]:
    """Who gets the free slots of several hosts at once: one cluster id per slot, per host.

    :func:`fair_order` across the hosts together: each slot goes to the waiting
    cluster whose user holds the fewest slots on the lab, counting every slot
    given so far on any host, so slots freed on two hosts at the same moment do
    not both go to the same user. Ties: earliest want, then cluster id, then the
    host's name, so every deployer that reads the same records gives the same
    answer.

    Parameters
    ----------
    leases
        The live records of every host of the lab.
    free_slots
        Free slots per host.
    quota
        The parsed ``speccluster_user_quota``, or ``None``.
    """
    leases = list(leases)
    held = slots_held(leases)
    waiting = {host: waiting_clusters(leases, host) for host in free_slots}
    remaining = {(host, w.cluster): w.slots for host, ws in waiting.items() for w in ws}
    left = {host: max(n, 0) for host, n in free_slots.items()}
    grants: dict[str, list[str]] = {host: [] for host in free_slots}
    for _ in range(sum(left.values())):
        candidates = [
            (held.get(w.user, 0), w.since, w.cluster, host, w.user)
            for host in sorted(left) if left[host] > 0
            for w in waiting[host] if remaining[(host, w.cluster)] > 0 and _below_quota(quota, w.user, held)
        ]
        if not candidates:
            break
        _, _, cluster, host, user = min(candidates)
        grants[host].append(cluster)
        held[user] = held.get(user, 0) + 1
        remaining[(host, cluster)] -= 1
        left[host] -= 1
    return grants


def fair_limits(
    hosts: Mapping[str, tuple[Amount, Amount]],
    lab: Iterable[Lease],
    cluster: str,
    quota: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """How many entries ``cluster`` may have on each host now, beside the other clusters of the lab.

    On a host no other cluster waits for: its own live leases plus what is
    free of the other clusters' (:func:`free_capacity`). Where others wait,
    the free part goes by fair share over all those hosts at once
    (:func:`fair_grants`): ``cluster`` takes only the slots given to it (none
    unless it waits there too), so every deployer that reads the same records
    lets the same cluster claim.

    Parameters
    ----------
    hosts
        Per host: its capacity as the inventory gives it (:func:`host_capacity`)
        and what one entry uses (:func:`entry_amount`).
    lab
        The live records of every host of the lab.
    cluster
        The id of the cluster asking.
    quota
        The parsed ``speccluster_user_quota``, or ``None``.
    """
    lab = list(lab)
    room: dict[str, int] = {}
    own: dict[str, int] = {}
    for host, (capacity, per_entry) in hosts.items():
        here = [lease for lease in lab if lease.host == host]
        own[host] = sum(1 for lease in here if lease.held and lease.cluster == cluster)
        room[host] = entries_fit(free_capacity(capacity, here, cluster), per_entry)  # its own leases included
    contested = {host for host in hosts if any(w.cluster != cluster for w in waiting_clusters(lab, host))}
    grants = fair_grants(lab, {host: max(room[host] - own[host], 0) for host in contested}, quota)
    return {host: own[host] + grants[host].count(cluster) if host in contested else room[host] for host in hosts}
