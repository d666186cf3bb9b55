"""What ``plan`` and ``check`` show about shipped environments (``speccluster_environment: head``).

Pure presentation over :mod:`speccluster_ssh.environments`: :func:`plan_environments`
says, without contacting any host, what each host set to ``head`` would get
(the fingerprint for the head's own platform, the packages, whether the
head's cache already holds the wheels and their size); :func:`describe_state`
turns what a host reported into the phrase of its ``check`` row: ``ready``,
``missing (it will be built, N MB to ship)``, or another python.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .environments import (
    EnvRequest,
    EnvTarget,
    Wheelhouse,
    cached_wheelhouse,
    describe_need,
    fingerprint,
    resolve_pins,
)

if TYPE_CHECKING:
    from .inventory import HostSpec

__all__ = ["DEFAULT_ENV_DIR", "describe_state", "plan_environments"]

#: Where a host keeps its shipped environments unless ``speccluster_env_dir`` says otherwise.
DEFAULT_ENV_DIR = "~/.cache/speccluster-ssh/envs"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def plan_environments(hosts: Iterable[HostSpec], cache_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """The shipped environment of each host set to ``speccluster_environment: head``, for ``plan``.

    No host is contacted, so the hosts are assumed to run the head's
    platform (python minor, machine, libc); a host of another platform gets
    its own fingerprint and wheels when ``up`` meets it.

    Parameters
    ----------
    hosts
        Inventory hosts; those in ``host`` mode are left out.
    cache_dir
        The head's wheel cache; default that of :func:`~speccluster_ssh.environments.build_wheelhouse`.

    Returns
    -------
    dict
        Host name -> ``fingerprint``, ``target`` (the platform assumed),
        ``env_dir``, ``pins``, ``cached`` (whether the head's cache holds
        the wheels), ``wheels`` and ``bytes`` (``None`` when not cached),
        and ``summary``, one line for the plan's text.

    Raises
    ------
    UserError
        On a bad requirement or an unreadable requirements file.
    """
    target = EnvTarget.of_head()
    by_request: dict[EnvRequest, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for host in hosts:
        if host.environment != "head":
            continue
        request = EnvRequest.from_host(host)
        if request not in by_request:
            pins = resolve_pins(request, target)
            house = cached_wheelhouse(request, target, cache_dir)
            fp = fingerprint(pins, target)
            if house is not None:
                where = (f"{len(house.wheels)} wheels cached on the head, "
                         f"{_megabytes(house.size)} to ship to a host that lacks them")
            else:
                where = "wheels not gathered yet: up gathers them once on the head, then ships them"
            by_request[request] = {
                "fingerprint": fp,
                "target": target.describe(),
                "pins": list(house.pins if house is not None else pins),
                "cached": house is not None,
                "wheels": len(house.wheels) if house is not None else None,
                "bytes": house.size if house is not None else None,
                "summary": (f"environment {fp} shipped from the head "
                            f"({len(pins)} packages for {target.describe()}; {where})"),
            }
        out[host.name] = {**by_request[request], "env_dir": host.env_dir or DEFAULT_ENV_DIR}
    return out


def describe_state(
    *,
    ready: bool,
    wheelhouse: Wheelhouse | None,
    host_has: set[str],
    target: EnvTarget,
    unusable: str | None = None,
) -> str:
    """The phrase of a host's ``check`` row for its shipped environment.

    Parameters
    ----------
    ready
        Whether the host has the environment of the fingerprint, complete.
    wheelhouse
        The environment's wheels when the head has them; ``None`` when not gathered yet.
    host_has
        The wheels the host's store holds: file names or sha256 digests.
    target
        The host's platform, as it reported it.
    unusable
        Why the host's python cannot build environments (too old, no venv), if so.

    Returns
    -------
    str
        ``ready``, ``missing (it will be built, 12.3 MB to ship)``,
        ``missing (it will be built; the head gathers its wheels first)``,
        either of them for ``another python (3.10, the head runs 3.11)``,
        or ``no usable python: ...``.
    """
    if unusable:
        return f"no usable python: {unusable}"
    if ready:
        return "ready"
    need = (describe_need(wheelhouse, host_has) if wheelhouse is not None
            else "missing (it will be built; the head gathers its wheels first)")
    head = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if target.python != head:
        return f"another python ({target.python}, the head runs {head}): {need}"
    return need
