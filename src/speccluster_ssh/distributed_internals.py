"""Every private name of distributed that speccluster-ssh uses, and why; nothing else of ours touches one.

distributed gives a cluster manager few public hooks: a :class:`SpecCluster`
subclass changes how it starts, reconciles, follows the scheduler and closes
by overriding private methods, and reads its reconcile lock, its log and its
adaptive object from private attributes. This module holds all of that:

- :class:`SpecClusterBridge` sits between ``SpecCluster`` and
  :class:`~speccluster_ssh.cluster.SSHSpecCluster`. It overrides each private
  hook and hands it to a public method of the subclass (``start_cluster``,
  ``reconcile_spec``, ``follow_scheduler_event``, ``close_cluster``,
  ``add_logs``), and gives public names to the private state the rest of the
  package needs (``spec_lock``, ``reconcile_now``, ``log_event``,
  ``processes``, ``running_adaptive``, ...).
- :class:`ClusterBridge` does the same for the handle on a detached cluster,
  a plain ``Cluster``.
- :func:`set_finished` is the one private name a process interface needs.

:data:`PRIVATE_NAMES` lists each name with its reason; ``tests/test_distributed_internals.py``
checks that each still exists on the installed distributed, and that no
other module of the package uses one of them (nor any other private name of
distributed's classes, nor a private module or name of ``distributed.*``).

Tested range: distributed 2024.1.0 (pyproject's lower bound, CI's "oldest"
stage) to 2026.8.0 (the lock, scripts/constraints.txt). Every name below has
the same meaning across that range.

No longer used, and why: ``worker._cluster`` (SpecCluster sets it on each
process interface, but nothing in distributed reads it), ``_member_names``
(never a hook of distributed), ``_i`` (SpecCluster's own name counter; the
cluster counts its entry names in an attribute of its own, which
SpecCluster's constructor does not reset).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import ProcessInterface, SpecCluster

__all__ = ["PRIVATE_NAMES", "ClusterBridge", "PrivateName", "SpecClusterBridge", "set_finished"]


@dataclass(frozen=True)
class PrivateName:
    """A private name of distributed's class ``owner`` that we use, and why."""

    owner: type
    name: str
    why: str


PRIVATE_NAMES: tuple[PrivateName, ...] = (
    PrivateName(Cluster, "_start", "the start hook: SpecCluster's makes the scheduler and scheduler_comm; "
                "we start the hosts' agents around it and wait for min_workers. Cluster's subscribes a "
                "detached handle to the scheduler's worker events."),
    PrivateName(Cluster, "_close", "the close hook: our hosts stop first, with no worker retired (no data "
                "is kept), instead of SpecCluster's scale(0) and reconcile. For a detached handle: detach, "
                "and tear down only when asked."),
    PrivateName(Cluster, "_get_logs", "the hook of get_logs(): worker and scheduler logs are files on the "
                "hosts, read through the agents, not the servers' in-memory logs."),
    PrivateName(Cluster, "_update_worker_status", "the only place the scheduler's worker add/remove events "
                "arrive. SpecCluster's own version closes a lost worker by its name, which for a group "
                "member is no spec key (dask issue 9102): we call Cluster's, skipping SpecCluster's."),
    PrivateName(SpecCluster, "_correct_state", "SpecCluster's reconcile entry point (scale, close and "
                "__await__ call it). It hands out one shared task until that task runs; a task cancelled "
                "before it ran would be handed out forever, so a done one is dropped first."),
    PrivateName(SpecCluster, "_correct_state_internal", "the reconcile itself, rewritten whole: SpecCluster "
                "awaits every new process and raises the first failure; ours starts each entry on its "
                "host, accounts failures per entry and host, and retires removed entries by member name."),
    PrivateName(SpecCluster, "_correct_state_waiting", "the shared reconcile task of _correct_state: our "
                "reconcile clears it on entry, as SpecCluster's does, and drops a cancelled one."),
    PrivateName(SpecCluster, "_lock", "the lock over worker_spec and workers; SpecCluster's close holds it "
                "while it terminates the scheduler, so every reconcile and change of the spec holds the same one."),
    PrivateName(SpecCluster, "_created", "the process interfaces the cluster made; SpecCluster's close checks "
                "that each has ended, and our operations find a host's processes among them."),
    PrivateName(Cluster, "_adaptive", "the running Adaptive, which Cluster keeps no public handle of: "
                "adaptive_bounds reports it, stop_adapt and close stop it, an inventory reload recomputes its bounds."),
    PrivateName(Cluster, "_adaptive_options", "Cluster.adapt merges each call's options into it: stop_adapt "
                "empties it, so a later adapt() starts from its own options."),
    PrivateName(Cluster, "_log", "the cluster's log, which get_logs() returns as 'Cluster', printed unless quiet."),
    PrivateName(Cluster, "_cluster_manager_logs", "the same log, written without printing a message the "
                "user was already told another way."),
    PrivateName(Cluster, "_loop_runner", "a detached handle's event loop thread: SpecCluster starts it in its "
                "constructor, a plain Cluster leaves that to its subclass."),
    PrivateName(ProcessInterface, "_event_finished", "what finished() waits for; ProcessInterface sets it "
                "only in close(), and a remote process that failed by itself has finished too."),
)


class SpecClusterBridge(SpecCluster):
    """SpecCluster with its private hooks handed to public methods of the subclass.

    A subclass implements :meth:`start_cluster`, :meth:`reconcile_spec`,
    :meth:`follow_scheduler_event`, :meth:`close_cluster` and
    :meth:`add_logs`; they are called by distributed's machinery, not by users.
    """

    # -- hooks: what the subclass implements ---------------------------------
    async def start_cluster(self, start_scheduler: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]) -> None:
        """Start the cluster; ``start_scheduler`` is SpecCluster's start, ``close`` the whole close."""
        raise NotImplementedError

    async def reconcile_spec(self) -> None:
        """Make ``workers`` match ``worker_spec``; called with :attr:`spec_lock` held."""
        raise NotImplementedError

    def follow_scheduler_event(self, op: str, msg: Any) -> None:
        """A worker event of the scheduler (``"add"`` or ``"remove"``), before ``scheduler_info`` follows it."""

    async def close_cluster(self, whole: bool, close_spec_cluster: Callable[[], Awaitable[None]]) -> None:
        """Close; ``whole`` when the cluster ran (or failed) and its entries are to go, ``close_spec_cluster`` SpecCluster's close."""
        await close_spec_cluster()

    async def add_logs(self, logs: Any, scheduler: bool, workers: bool | Sequence[str]) -> Any:
        """``logs`` (the cluster's own, a ``distributed.utils.Logs``) with the scheduler's and workers' added as asked."""
        return logs

    # -- distributed's private hooks, each handed over -----------------------
    async def _start(self) -> None:
        await self.start_cluster(super()._start, self._close)

    def _correct_state(self) -> Any:
        waiting = self._correct_state_waiting
        if waiting is not None and waiting.done():
            self._correct_state_waiting = None
        return super()._correct_state()

    async def _correct_state_internal(self) -> None:
        async with self._lock:
            self._correct_state_waiting = None
            await self.reconcile_spec()

    def _update_worker_status(self, op: str, msg: Any) -> None:
        self.follow_scheduler_event(op, msg)
        Cluster._update_worker_status(self, op, msg)  # not SpecCluster's: see PRIVATE_NAMES

    async def _close(self) -> None:
        # SpecCluster's close closes the entries only of a cluster that ran or failed.
        await self.close_cluster(self.status in (Status.running, Status.failed), super()._close)

    async def _get_logs(self, cluster: bool = True, scheduler: bool = True, workers: bool | Sequence[str] = True) -> Any:
        logs = await super()._get_logs(cluster=cluster, scheduler=False, workers=False)
        return await self.add_logs(logs, scheduler, workers)

    # -- public names for SpecCluster's private state ------------------------
    async def close_in_loop(self) -> None:
        """Close the whole cluster from a task of its own event loop (an idle cluster ending itself).

        ``close()`` of a synchronous cluster would block that loop, waiting for itself.
        """
        self.loop_close = asyncio.current_task()
        await self._close()

    def close(self, timeout: float | None = None) -> Any:
        """Close the cluster (see :meth:`distributed.deploy.Cluster.close`).

        After :meth:`close_in_loop` the cluster says ``closed`` before its
        hosts are clean (distributed sets it, then our close stops the
        agents): wait for that close to end first.
        """
        running: asyncio.Task[None] | None = getattr(self, "loop_close", None)
        if self.status == Status.closed and running is not None and not running.done():
            waited = self.sync(asyncio.wait, [running], callback_timeout=timeout)
            if self.asynchronous:
                return waited
        return super().close(timeout)

    @property
    def spec_lock(self) -> asyncio.Lock:
        """The lock over ``worker_spec`` and ``workers`` that every reconcile holds."""
        return self._lock

    def reconcile_now(self) -> Any:
        """The reconcile (SpecCluster's ``_correct_state``): await it to have ``workers`` match ``worker_spec``."""
        return self._correct_state()

    def log_event(self, message: str, *, echo: bool = True) -> None:
        """Record ``message`` in the cluster's log (``get_logs()``); ``echo`` prints it too unless ``quiet``."""
        if echo:
            self._log(message)
        else:
            self._cluster_manager_logs.append((datetime.datetime.now(), message))  # said another way already

    def processes(self) -> list[Any]:
        """Every process interface the cluster made and has not forgotten, running or starting."""
        return list(self._created)

    def track(self, processes: Iterable[Any]) -> None:
        """Count ``processes``, just made, among :meth:`processes` (SpecCluster's close checks they ended)."""
        self._created.update(processes)

    def running_adaptive(self) -> Adaptive | None:
        """The adaptive scaling object while it runs, else ``None``."""
        adaptive = self._adaptive
        if adaptive is None or getattr(adaptive, "periodic_callback", None) is None:
            return None
        return adaptive

    def adaptive_bounds(self) -> dict[str, Any] | None:
        """``{"minimum": .., "maximum": ..}`` while adaptive scaling runs, else ``None``."""
        adaptive = self.running_adaptive()
        return None if adaptive is None else {"minimum": adaptive.minimum, "maximum": adaptive.maximum}

    def stop_adapt(self) -> bool:
        """Turn adaptive scaling off and keep the current workers; True if it was on."""
        adaptive = self._adaptive
        if adaptive is not None:
            adaptive.stop()
        self._adaptive = None
        if hasattr(self, "_adaptive_options"):
            self._adaptive_options = {}
        return adaptive is not None


class ClusterBridge(Cluster):
    """distributed's Cluster for a handle on a cluster that runs elsewhere.

    A subclass implements :meth:`close_handle` and :meth:`fetch_logs`.
    """

    async def close_handle(self) -> None:
        """What ``close()`` does; :meth:`disconnect` is Cluster's own close."""
        await self.disconnect()

    async def fetch_logs(self, cluster: bool, scheduler: bool, workers: bool | Sequence[str]) -> Any:
        """What ``get_logs()`` returns."""
        raise NotImplementedError

    def start_loop(self) -> None:
        """Start the handle's event loop thread (a synchronous handle)."""
        self._loop_runner.start()

    def stop_loop(self) -> None:
        """Stop the handle's event loop thread (a synchronous handle)."""
        self._loop_runner.stop()

    async def connect(self) -> None:
        """Follow the scheduler's workers through ``scheduler_comm`` (Cluster's start)."""
        await self._start()

    async def disconnect(self) -> None:
        """Close this handle's comms and background tasks (Cluster's close); the cluster is left alone."""
        await super()._close()

    async def _close(self) -> None:
        await self.close_handle()

    async def _get_logs(self, cluster: bool = True, scheduler: bool = True, workers: bool | Sequence[str] = True) -> Any:
        return await self.fetch_logs(cluster, scheduler, workers)


def set_finished(process: ProcessInterface) -> None:
    """Wake whatever awaits ``process.finished()``: the process has ended without ``close()``."""
    process._event_finished.set()
