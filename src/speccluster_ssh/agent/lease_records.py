"""What a lease says, and whether a claim fits: the pure part of the host's leases. A shipped source.

Runs in the agent's namespace after ``host.py`` and before ``leases.py``
(the lease store, which uses these names as globals; see ``agent_sources``):
standard library only, Python 3.8, no dataclass, every name prefixed
``lease``. No I/O: the head imports it too (``leases.py`` of the package
checks against :func:`lease_fit` that the head and the hosts agree).

What is decided, and why
------------------------
Records
    One JSON object per file: ``v`` (:data:`LEASE_VERSION`), ``kind``
    (``lease`` or ``want``), ``uid`` and ``pid`` of the agent, ``cluster``
    (its id), ``name``, ``head`` (the head's host), ``entry``, ``host`` (the
    inventory's name of this host: capacity is counted per name, see
    :func:`lease_fit`), ``since``
    (when taken) and an amount, ``holds`` (a lease) or ``wants`` (a want):
    ``{"slots", "cores", "memory", "gpus"}``; optionally ``state`` (``busy``
    or ``idle``, as the holder last marked it; absent is ``""``: not said)
    and ``state_since`` (when it was marked). :func:`lease_record` accepts
    nothing else (sizes and types bounded), since anyone can write a file in
    the shared directory; unknown fields are ignored, for later versions.
Capacity
    A claim fits when the live leases of every cluster (its own too: they
    are real use of the host) plus the request stay within the capacity the
    claimer's inventory gives (:func:`lease_fit`): slots always, cores and
    memory when given, GPU devices disjoint (a request may give a count: the
    lowest free devices are chosen, atomically with the claim). Slots of two
    inventories may differ in size; cores, memory and devices are physical.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Tuple

LEASE_VERSION = 1
LEASE_MAX_BYTES = 16384
_LEASE_AMOUNTS = ("slots", "cores", "memory")
_LEASE_TEXT_LIMIT = 256
#: What a holder may say of its lease (``lease_mark``); ``""`` is "not said".
LEASE_STATES = ("", "busy", "idle")
#: What a ``power`` record says of its host (see ``leases.py``): a cluster's power-on ran and it is
#: ``waking`` (written on the head), or the cluster woke it and its agent runs there (``woken``).
LEASE_POWER_STATES = ("waking", "woken")


class LeaseRefusal:
    """A claim that did not fit: what was short, what was free, and who holds the rest."""

    __slots__ = ("short", "free", "holders")

    def __init__(self, short: Dict[str, Any], free: Dict[str, Any], holders: List[Dict[str, Any]]) -> None:
        self.short = short
        self.free = free
        self.holders = holders

    def describe(self) -> str:
        """One line: what is short, then each holder (user, cluster, head, what, since)."""
        short = ", ".join(f"{k} {v}" for k, v in sorted(self.short.items()))
        who = "; ".join(
            f"{h['user']} (cluster {h['name'] or h['cluster']} from {h['head'] or '?'}: "
            f"{lease_amount_text(h['holds'])} since {time.strftime('%Y-%m-%d %H:%M', time.localtime(h['since']))})"
            for h in self.holders
        )
        return f"short of {short}; held by {who or 'no one (the capacity is smaller than the request)'}"


def _lease_text(value: Any, required: bool) -> Optional[str]:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or len(value) > _LEASE_TEXT_LIMIT or (required and not value):
        return None
    return value


def _lease_count(value: Any) -> Optional[int]:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        return None
    return value


def lease_amount(data: Any, choose_gpus: bool = False) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(amount, "")`` for a valid ``holds``/``wants`` mapping, normalized; ``(None, why)`` otherwise.

    An amount is ``{"slots": n, "cores": n, "memory": bytes, "gpus": [device ids]}``; a missing
    field is 0 or no device. With ``choose_gpus``, ``gpus`` may be a count (the claim picks the devices).
    """
    if not isinstance(data, dict):
        return None, "its amount is not a mapping"
    amount = {}  # type: Dict[str, Any]
    for key in _LEASE_AMOUNTS:
        value = _lease_count(data.get(key))
        if value is None:
            return None, f"its {key} is not a whole number >= 0"
        amount[key] = value
    gpus = data.get("gpus") or []
    if choose_gpus and _lease_count(gpus) is not None:
        amount["gpus"] = gpus
    elif (not isinstance(gpus, list) or len(gpus) > 1024
          or not all(isinstance(g, str) and 0 < len(g) <= 64 for g in gpus) or len(set(gpus)) != len(gpus)):
        return None, "its gpus are not a list of distinct device ids"
    else:
        amount["gpus"] = list(gpus)
    return amount, ""


def lease_amount_text(amount: Dict[str, Any]) -> str:
    """``2 slots, 8 cores, 16 GiB, GPUs 0,1``: the non-zero parts of an amount."""
    parts = [f"{amount.get('slots', 0)} slot{'' if amount.get('slots') == 1 else 's'}"]
    if amount.get("cores"):
        parts.append(f"{amount['cores']} cores")
    if amount.get("memory"):
        parts.append(f"{amount['memory'] / 2**30:.3g} GiB")
    if amount.get("gpus"):
        parts.append("GPUs " + ",".join(amount["gpus"]))
    return ", ".join(parts)


def _lease_time(value: Any) -> Optional[float]:
    # Bounded, so that formatting it (time.localtime) cannot fail.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1e11:
        return None
    return float(value)


def lease_record(data: Any, kind: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(record, "")`` when ``data`` (a file's JSON) is a valid record of ``kind``; ``(None, why)`` otherwise.

    The record has ``kind``, ``uid`` (as written: the reader compares it with the file's owner),
    ``cluster``, ``name``, ``head``, ``entry``, ``pid``, ``since``, ``holds`` (a lease) or ``wants``
    (a want) or ``power`` (a power record: one of :data:`LEASE_POWER_STATES`), ``state`` (one of :data:`LEASE_STATES`, ``""`` when absent) and ``state_since``
    (``0.0`` when absent).
    """
    if not isinstance(data, dict):
        return None, "it is not a JSON object"
    if data.get("v") != LEASE_VERSION or data.get("kind") != kind:
        return None, f"it is no version {LEASE_VERSION} {kind}"
    record = {"kind": kind}  # type: Dict[str, Any]
    for key, required in (("cluster", True), ("name", False), ("head", False), ("entry", False), ("host", False)):
        text = _lease_text(data.get(key), required)
        if text is None:
            return None, f"its {key} is not a short {'non-empty ' if required else ''}string"
        record[key] = text
    for key in ("uid", "pid"):
        value = _lease_count(data.get(key))
        if value is None or key not in data:
            return None, f"its {key} is not a whole number >= 0"
        record[key] = value
    since = _lease_time(data.get("since"))
    if since is None:
        return None, "its since is not a time"
    record["since"] = since
    state = data.get("state", "")
    if state not in LEASE_STATES:
        return None, "its state is not busy or idle"
    record["state"] = state
    state_since = _lease_time(data.get("state_since", 0.0))
    if state_since is None:
        return None, "its state_since is not a time"
    record["state_since"] = state_since
    if kind == "power":
        # No amount: it says who woke the host (a cluster), not what it holds.
        if data.get("power") not in LEASE_POWER_STATES:
            return None, "its power is not waking or woken"
        record["power"] = data["power"]
        return record, ""
    field = "holds" if kind == "lease" else "wants"
    amount, why = lease_amount(data.get(field))
    if amount is None:
        return None, why
    record[field] = amount
    return record, ""


# -- capacity --------------------------------------------------------------------------------------


def lease_fit(capacity: Dict[str, Any], held: List[Dict[str, Any]], request: Dict[str, Any]
              ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:  # fmt: skip
    """Whether ``request`` fits on a host of ``capacity`` beside the leases ``held`` (pure).

    Parameters
    ----------
    capacity
        ``slots`` (always checked), ``cores`` and ``memory`` (checked when non-zero),
        ``gpus`` (the host's device ids; when given, a request's devices must be among them).
    held
        Live lease records (their ``holds``), of every cluster.
    request
        An amount (see :func:`lease_amount`); its ``gpus`` may be a count: the lowest free
        devices of ``capacity`` are chosen.

    Returns
    -------
    tuple
        ``(short, free, grant)``: what is short (empty when it fits: slots, cores, memory
        by how much, ``gpus`` the devices taken or the count missing), what is free, and
        the request with its devices chosen.
    """
    used = {key: sum(h["holds"][key] for h in held) for key in _LEASE_AMOUNTS}
    taken = [g for h in held for g in h["holds"]["gpus"]]
    devices = [str(g) for g in capacity.get("gpus") or []]
    free = {}  # type: Dict[str, Any]
    short = {}  # type: Dict[str, Any]
    for key in _LEASE_AMOUNTS:
        limit = int(capacity.get(key) or 0)
        if key != "slots" and not limit:
            continue
        free[key] = max(limit - used[key], 0)
        if request[key] > free[key]:
            short[key] = request[key] - free[key]
    free["gpus"] = [g for g in devices if g not in taken]
    grant = dict(request)
    if isinstance(request["gpus"], int):
        grant["gpus"] = free["gpus"][:request["gpus"]]
        if len(grant["gpus"]) < request["gpus"]:
            short["gpus"] = request["gpus"] - len(grant["gpus"])
    else:
        clash = [g for g in request["gpus"] if g in taken or (devices and g not in devices)]
        if clash:
            short["gpus"] = clash
    return short, free, grant
