"""The agent's lease requests: it keeps the leases and wants of its cluster on the host. A shipped source.

Runs in the agent's namespace after ``leases.py`` (the lease store, whose
names are globals here) and before ``remote.py``, whose loop hands every
``lease_*`` request to :class:`LeaseKeeper` (see ``agent_sources``):
standard library only, Python 3.8, every name prefixed ``lease``; the head
can import it as a plain module too.

What is decided, and why
------------------------
Requests
    ``lease_claim`` (``record``: ``name``, ``head``, ``entry``, ``holds``;
    ``capacity``), ``lease_want`` (``record`` with ``wants``),
    ``lease_release`` and ``lease_unwant`` (``lease``: the id a claim or
    want returned), ``lease_mark`` (``lease``, ``state``: ``busy``, ``idle``
    or ``""``; rewrites the held file in place), ``lease_power`` (``record``:
    ``name``, ``head``, ``host``: the cluster woke this host; held until
    the agent ends), ``lease_list`` (``records``: leases and wants;
    ``power``: the power records). The cluster of a record is always the
    agent's own: an agent holds leases for its cluster only.
Replies
    A claim that does not fit is no failure: ``held`` false, with what is
    short, what is free, the holders and one line saying so. A
    :class:`LeaseError` (an unsafe directory, a lock that stays taken) is a
    failure whose ``fix`` the head shows. An id is the lease file's name,
    unique on the host; releasing an unknown id says ``released`` false.
Lifetime
    The keeper holds the open, locked files. Each forked child must close
    them (:meth:`LeaseKeeper.fds`, closed by the agent in every child), or a
    worker would keep its cluster's lease alive after the agent died. The
    agent releases everything once its children have stopped; if it dies
    instead, the kernel drops its flocks with its last fd.
Warnings
    Bad files met by any request, each file version once
    (:class:`LeaseWarnings`), are taken by the agent after the request and
    sent to the head as ``lease_warning`` events.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

if __name__ != "speccluster_agent":  # a plain module of the head; shipped, these are globals already
    from .lease_records import LeaseRefusal
    from .leases import (
        LEASE_LOCK_TIMEOUT, LeaseError, LeaseHandle, LeaseWarnings, lease_claim, lease_dir_path, lease_list,
        lease_mark, lease_power, lease_release, lease_touch, lease_want,
    )

#: Seconds between refreshes of the held files' times, for an age-based cleaner of ``/var/tmp``.
LEASE_TOUCH_EVERY = 3600.0


class LeaseKeeper:
    """The leases and wants one agent holds for its cluster, and the requests on them."""

    def __init__(self, cluster: str, directory: Optional[str] = None, lock_timeout: float = LEASE_LOCK_TIMEOUT) -> None:
        self.cluster = cluster
        self.path = lease_dir_path(directory)
        # The agent's loop waits for the host lock: bounded well below the head's silence timeout.
        self.lock_timeout = lock_timeout
        self.handles = {}  # type: Dict[str, LeaseHandle]
        self.warnings = LeaseWarnings()
        self.touched = time.monotonic()

    def fds(self) -> List[int]:
        """The open fds of the held files: a forked child must close them all."""
        return [h.fd for h in self.handles.values() if h.fd >= 0]

    def handle(self, op: str, message: Dict[str, Any]) -> Dict[str, Any]:
        """The reply to one ``lease_*`` request (``ok`` false with ``error`` and ``fix`` when it cannot be done)."""
        actions = {
            "lease_claim": self._claim,
            "lease_want": self._want,
            "lease_release": self._release,
            "lease_unwant": self._release,
            "lease_mark": self._mark,
            "lease_list": self._list,
            "lease_power": self._power,
        }  # type: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]]
        action = actions.get(op)
        if action is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        try:
            return action(message)
        except LeaseError as exc:
            return {"ok": False, "error": exc.message, "fix": exc.fix}

    def _record(self, message: Dict[str, Any]) -> Dict[str, Any]:
        record = dict(message.get("record") or {})
        record["cluster"] = self.cluster
        return record

    def _kept(self, handle: LeaseHandle) -> Dict[str, Any]:
        self.handles[handle.name] = handle
        return {"ok": True, "held": True, "lease": handle.name, "record": handle.record}

    def _claim(self, message: Dict[str, Any]) -> Dict[str, Any]:
        outcome = lease_claim(self.path, self._record(message), dict(message.get("capacity") or {}), self.warnings,
                              timeout=self.lock_timeout)  # fmt: skip
        if isinstance(outcome, LeaseRefusal):
            return {"ok": True, "held": False, "short": outcome.short, "free": outcome.free,
                    "holders": outcome.holders, "why": outcome.describe()}  # fmt: skip
        return self._kept(outcome)

    def _want(self, message: Dict[str, Any]) -> Dict[str, Any]:
        return self._kept(lease_want(self.path, self._record(message), self.warnings, timeout=self.lock_timeout))

    def _release(self, message: Dict[str, Any]) -> Dict[str, Any]:
        handle = self.handles.pop(str(message.get("lease")), None)
        if handle is not None:
            lease_release(handle)
        return {"ok": True, "released": handle is not None}

    def _mark(self, message: Dict[str, Any]) -> Dict[str, Any]:
        handle = self.handles.get(str(message.get("lease")))
        state = message.get("state")
        if not isinstance(state, str):
            raise LeaseError(f"bad lease state {state!r}", "this is a bug of speccluster-ssh")
        marked = handle is not None and lease_mark(handle, state, timeout=self.lock_timeout)
        return {"ok": True, "marked": marked, "record": handle.record if marked and handle else None}

    def _power(self, message: Dict[str, Any]) -> Dict[str, Any]:
        record = self._record(message)
        record["power"] = "woken"
        return self._kept(lease_power(self.path, record, self.warnings, timeout=self.lock_timeout))

    def _list(self, message: Dict[str, Any]) -> Dict[str, Any]:
        records = lease_list(self.path, self.warnings, timeout=self.lock_timeout)
        # Power records hold nothing: apart, so no reader counts them as leases or wants.
        return {"ok": True, "records": [r for r in records if r["kind"] != "power"],
                "power": [r for r in records if r["kind"] == "power"], "mine": sorted(self.handles)}

    def release_all(self) -> None:
        """Give back every lease and want (the agent is stopping, its children have)."""
        for handle in self.handles.values():
            lease_release(handle)
        self.handles.clear()

    def tick(self, now: float) -> None:
        """Refresh the held files' times now and then (see :data:`LEASE_TOUCH_EVERY`)."""
        if now - self.touched >= LEASE_TOUCH_EVERY:
            self.touched = now
            for handle in self.handles.values():
                lease_touch(handle)
