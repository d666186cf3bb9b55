"""An idle cluster ends itself: ``idle_timeout``, ``up --idle-timeout``, config ``idle-timeout``.

A cluster is idle while no task runs (none processing, queued, or waiting
for a worker) and no client is connected. After ``idle_timeout`` seconds
of that, it closes as ``down`` closes it: every host cleaned, every agent
stopped.

distributed has an idle timeout of its own (``distributed.scheduler.idle-timeout``:
:meth:`Scheduler.check_idle`), but it counts tasks only, not clients, from
2024.1.0 to 2026.x alike: a client that is connected, between two
computations, would lose its cluster. So the decision is made here, on the
head:

- :data:`ACTIVITY_PRELOAD` is a scheduler preload (distributed's
  ``dask_setup`` hook, given as source text, so that a scheduler host needs
  nothing of this package) that adds one handler to the scheduler,
  ``speccluster_activity``: tasks processing, queued or unrunnable, clients
  connected (without the scheduler's own ``fire-and-forget``), and
  seconds since the scheduler's own last activity (``idle_since``, which
  distributed's check keeps, transitions included);
- :class:`IdleClock` is the policy, pure: it takes those readings with the
  time and says how long the cluster has been idle;
- :class:`IdleWatcher` polls the scheduler (on the head or on its host,
  through ``scheduler_comm``) and, once the clock says so, ends the
  cluster: through ``on_idle`` when a head owns the cluster (the head then
  closes it as ``down`` does and records why), else by closing it itself.

A scheduler that closes itself because distributed's own idle timeout is
set (in the dask config or ``scheduler_options``) ends the cluster the same
way, with the same reason (``idle for 2h``), instead of leaving its workers
waiting for a scheduler that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dask
from dask.utils import parse_timedelta
from distributed.core import Status

from .cluster_protocols import IdleCluster
from .tasks import TaskSet
from .units import format_duration, parse_duration

__all__ = [
    "ACTIVITY_HANDLER", "ACTIVITY_PRELOAD", "Activity", "IdleClock", "IdleWatcher", "idle_reason",
    "resolve_idle_timeout", "scheduler_idle_timeout", "with_activity_preload",
]

logger = logging.getLogger(__name__)

ACTIVITY_HANDLER = "speccluster_activity"
# Seconds the close of a cluster whose scheduler closed itself tries to reach it (rpc's public timeout).
GONE_SCHEDULER_TIMEOUT = 1.0

# Run by the scheduler at its start (a preload given as text: distributed
# writes it to a file and imports it). Public attributes of the scheduler only.
ACTIVITY_PRELOAD = f'''
"""speccluster-ssh: the scheduler's activity, read by the head for its idle timeout."""
import time


def dask_setup(scheduler):
    def activity(**_):
        processing = sum(len(ws.processing) for ws in scheduler.workers.values())
        since = scheduler.idle_since
        now = time.time()
        return {{
            "tasks": processing + len(scheduler.queued) + len(scheduler.unrunnable),
            "clients": len([c for c in scheduler.clients if c != "fire-and-forget"]),
            "quiet_for": (now - since) if since else None,
        }}

    scheduler.handlers["{ACTIVITY_HANDLER}"] = activity
'''


def with_activity_preload(options: Mapping[str, Any]) -> dict[str, Any]:
    """``scheduler_options`` with :data:`ACTIVITY_PRELOAD` added to its preloads (or to the configured ones)."""
    given = options.get("preload")
    if given is None:
        given = dask.config.get("distributed.scheduler.preload", default=[])
    preloads = [given] if isinstance(given, str) else list(given or [])
    return {**options, "preload": [*preloads, ACTIVITY_PRELOAD]}


def resolve_idle_timeout(value: float | str | None) -> float:
    """Seconds of ``idle_timeout`` (``None``: config ``idle-timeout``); 0 means never.

    Raises
    ------
    UserError
        For a value that is not a duration.
    """
    from . import config as sc_config
    from .errors import UserError

    if value is None:
        value = sc_config.get("idle-timeout")
        where = "config speccluster-ssh.idle-timeout"
    else:
        where = "idle_timeout"
    if value is None:
        return 0.0
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def scheduler_idle_timeout(options: Mapping[str, Any]) -> float:
    """distributed's own idle timeout of the scheduler, in seconds (0: none): its option, else the dask config."""
    value = options.get("idle_timeout") or dask.config.get("distributed.scheduler.idle-timeout", default=None)
    try:
        return float(parse_timedelta(value)) if value else 0.0
    except (TypeError, ValueError, KeyError):
        return 0.0  # the scheduler itself refuses it at its start


def idle_reason(seconds: float) -> str:
    """Why an idle cluster ended: ``"idle for 2h"``."""
    return f"idle for {format_duration(seconds)}"


@dataclass(frozen=True)
class Activity:
    """One reading of the scheduler's activity.

    Attributes
    ----------
    tasks
        Tasks processing on workers, queued, or waiting for a worker.
    clients
        Clients connected (the scheduler's own ``fire-and-forget`` is not one).
    quiet_for
        Seconds since the scheduler's last task activity (a transition, a
        graph submitted); ``None`` while it is busy.
    """

    tasks: int = 0
    clients: int = 0
    quiet_for: float | None = 0.0

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> Activity:
        """The reading in the scheduler's reply to ``speccluster_activity``."""
        quiet = reply.get("quiet_for")
        return cls(int(reply.get("tasks") or 0), int(reply.get("clients") or 0),
                   None if quiet is None else max(float(quiet), 0.0))

    @property
    def busy(self) -> bool:
        """Whether anything keeps the cluster in use now."""
        return self.tasks > 0 or self.clients > 0 or self.quiet_for is None


class IdleClock:
    """The idle policy: how long the cluster has been idle, from readings of its activity.

    Pure: it is given the time, so tests need no clock.

    Parameters
    ----------
    timeout
        Seconds of idleness after which the cluster ends (> 0).
    now
        When the cluster started (its idle time counts from there).

    Examples
    --------
    >>> clock = IdleClock(10, now=0)
    >>> clock.observe(Activity(clients=1), now=5)  # a client: in use at 5
    False
    >>> clock.observe(Activity(quiet_for=60), now=14)
    False
    >>> clock.observe(Activity(quiet_for=60), now=15)  # nothing since 5
    True
    """

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = float(timeout)
        self.active_at = float(now)  # the last time something was in use

    def idle_for(self, now: float) -> float:
        """Seconds the cluster has been idle at ``now``."""
        return max(now - self.active_at, 0.0)

    def observe(self, activity: Activity | None, now: float) -> bool:
        """Take one reading (``None``: the scheduler could not be read) at ``now``; ``True`` once idle long enough.

        A reading that failed counts as activity: a cluster never ends on what
        could not be seen. A busy reading makes ``now`` the last activity; an
        idle one moves it to the scheduler's own last activity when that is
        later (a computation that ran between two readings).
        """
        if activity is None or activity.busy:
            self.active_at = max(self.active_at, now)
        else:
            quiet = activity.quiet_for or 0.0
            self.active_at = max(self.active_at, now - quiet)
        return self.idle_for(now) >= self.timeout


def poll_interval(timeout: float) -> float:
    """Seconds between two readings for ``timeout``: a tenth of it, within 0.25 s and 10 s."""
    return min(max(timeout / 10, 0.25), 10.0)


class IdleWatcher:
    """Ends a cluster that has been idle for its ``idle_timeout`` (see the module).

    Parameters
    ----------
    cluster
        The cluster it watches and ends.
    timeout
        Seconds of idleness; 0 watches only for a scheduler that closed
        itself for distributed's own idle timeout.
    scheduler_timeout
        distributed's idle timeout of the scheduler (0: none).

    Attributes
    ----------
    on_idle
        Called with the reason (``"idle for 2h"``) instead of closing the
        cluster here: a head that owns the cluster sets it, closes the
        cluster as ``down`` does and records the reason.
    reason
        Why the cluster ended itself; ``""`` while it has not.
    """

    def __init__(self, cluster: IdleCluster, timeout: float, scheduler_timeout: float = 0.0) -> None:
        self.cluster = cluster
        self.timeout = float(timeout)
        self.scheduler_timeout = float(scheduler_timeout)
        self.on_idle: Callable[[str], None] | None = None
        self.reason = ""
        self.clock: IdleClock | None = None
        self._tasks = TaskSet("idle watcher", logger)
        self._task: asyncio.Task[None] | None = None
        self._told_unreadable = False

    @classmethod
    def for_cluster(cls, cluster: IdleCluster, idle_timeout: float | str | None, *, own_scheduler: bool) -> IdleWatcher:
        """The watcher of a cluster being made, given its ``idle_timeout`` argument.

        With a timeout, the cluster's ``scheduler_options`` get the preload
        the watcher reads (``own_scheduler``: the cluster makes its scheduler's
        spec; one given whole is left as it is, and then never ends for idleness).

        Raises
        ------
        UserError
            For an ``idle_timeout`` (or config ``idle-timeout``) that is not a duration.
        """
        seconds = resolve_idle_timeout(idle_timeout)
        if seconds > 0 and own_scheduler:
            cluster.scheduler_options = with_activity_preload(cluster.scheduler_options)
        return cls(cluster, seconds, scheduler_idle_timeout(cluster.scheduler_options))

    @property
    def active(self) -> bool:
        """Whether there is anything to watch for."""
        return self.timeout > 0 or self.scheduler_timeout > 0

    def start(self) -> None:
        """Start watching a running cluster (in its event loop); again is a no-op."""
        if self.active and self._task is None and self.cluster.status == Status.running:
            self.clock = IdleClock(self.timeout, time.monotonic()) if self.timeout > 0 else None
            self._task = self._tasks.start(self._watch(), name="idle watcher")

    async def stop(self) -> None:
        """Stop watching (the cluster closes).

        A no-op from the watcher's own task, which is the one closing the
        cluster then. Once the watcher ends the cluster, another close waits
        for that close to finish instead of cancelling it: the cluster says
        ``closed`` before its hosts are clean.
        """
        task = self._task
        if task is None or task is asyncio.current_task():
            return
        if self.reason:
            await self.wait_closed()  # asyncio.wait: a cancel of ours does not cancel the close
            return
        await self._tasks.close()

    async def wait_closed(self) -> None:
        """Wait until the close the watcher started has finished: every host clean."""
        if self._task is not None and self._task is not asyncio.current_task():
            await asyncio.wait([self._task])

    def idle_for(self) -> float | None:
        """Seconds the cluster has been idle, as last seen; ``None`` without an ``idle_timeout``."""
        return self.clock.idle_for(time.monotonic()) if self.clock is not None else None

    async def _watch(self) -> None:
        cluster = self.cluster
        interval = poll_interval(self.timeout or self.scheduler_timeout)
        while cluster.status == Status.running:
            await asyncio.sleep(interval)
            if cluster.status != Status.running:
                return
            if getattr(cluster.scheduler, "status", None) in (Status.closing, Status.closed, Status.failed):
                if self.scheduler_timeout > 0:
                    # Closed by distributed's own idle timeout: end every host too, not only the scheduler.
                    # SpecCluster's close still asks it to terminate: not for the 30 s of a connect timeout.
                    cluster.scheduler_comm.timeout = GONE_SCHEDULER_TIMEOUT
                    await self._end(idle_reason(self.scheduler_timeout), "its scheduler closed itself (distributed's "
                                    f"idle-timeout, {format_duration(self.scheduler_timeout)})")
                    return
                continue
            if self.clock is None:
                continue
            if self.clock.observe(await self._read(), time.monotonic()):
                await self._end(idle_reason(self.timeout), "no task ran and no client was connected")
                return

    async def _read(self) -> Activity | None:
        try:
            reply = await getattr(self.cluster.scheduler_comm, ACTIVITY_HANDLER)()
            return Activity.from_reply(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # counted as activity: the cluster never ends on what it could not see
            if not self._told_unreadable:
                self._told_unreadable = True
                logger.warning("cannot read the scheduler's activity (%s: %s); the cluster does not end for "
                               "idleness while it cannot", type(exc).__name__, exc)
            return None

    async def _end(self, reason: str, why: str) -> None:
        self.reason = reason
        message = f"cluster {self.cluster.name} ends: {reason} ({why})"
        logger.warning("%s", message)
        self.cluster.log_event(message, echo=False)
        if self.on_idle is not None:
            self.on_idle(reason)
            return
        await self.cluster.close_in_loop()
