"""The healer: keeps a cluster's spec entries running, woken only by events.

Shaped like :class:`distributed.deploy.Adaptive`: an object attached to a
cluster, started and stopped with it, that looks at the cluster and acts
through it. Unlike ``Adaptive`` it does not tick. It sleeps until one of:

- a process of an entry exits, fails to start, or loses its host
  (:meth:`~speccluster_ssh.process.RemoteProcess.on_failed`);
- a host's agent is lost (:meth:`~speccluster_ssh.pool.AgentPool.on_host_lost`);
- the spec changed (the cluster calls :meth:`Healer.wake`), or a worker the
  scheduler lost did not come back within ``lost-worker-timeout``
  (:meth:`Healer.worker_left`);
- the next retry time: of a host that is down (set when it went down, by
  :func:`~speccluster_ssh.health.next_retry`) or of an entry backing off
  (``FailureLedger.retry_at``).

On each wake it makes one pass (:meth:`Healer.heal_once`): it reads the
cluster into a :class:`~speccluster_ssh.healing.Snapshot`, asks the pure
:class:`~speccluster_ssh.healing.HealingCore` what to do, and carries out
its actions: it retries hosts that are due, removes dead entries' processes
(and their names from the scheduler), charges failed starts to the host or
the entry, moves entries off hosts that are down or put aside, and
reconciles. The decisions are the core's, the I/O is the healer's.

The healer carries out host health decisions (``put_aside``, ``restore``,
retry attempts) through the host table
(:class:`~speccluster_ssh.hosts.HostTable`), each in one small method, and
holds the core with its
:class:`~speccluster_ssh.health.FailureLedger`; the cluster asks it
(:meth:`Healer.unavailable_hosts`, :meth:`Healer.drained_hosts`,
:meth:`Healer.waiting`, :meth:`Healer.problem`) and reports start outcomes to it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from distributed.core import Status

from . import entries
from .errors import HostError
from .healing import (
    Action,
    BackOffEntry,
    ChargeStartFailure,
    DropDeadEntry,
    EntryView,
    ForgetShortEntry,
    HealingCore,
    HostView,
    MoveEntry,
    Process,
    PutHostAside,
    Reconcile,
    RestoreHost,
    RetryHost,
    Snapshot,
    StartAgainInPlace,
)
from .pool import AgentPool
from .process import RemoteProcess
from .tasks import TaskSet

if TYPE_CHECKING:
    from .cluster_protocols import HealerCluster

logger = logging.getLogger(__name__)

# After a pass that failed unexpectedly, the next one comes this much later
# (a deadline like a retry time, not a poll: nothing else may wake us).
PASS_RETRY_DELAY = 1.0


class Healer:
    """Relaunches dead entries, moves entries off lost hosts and retries those hosts.

    Parameters
    ----------
    cluster
        The cluster to heal.
    pool
        The cluster's agents and host states.
    tasks
        Where the healer's own tasks (its loop, host retries) run.
    """

    def __init__(self, cluster: HealerCluster, pool: AgentPool, tasks: TaskSet) -> None:
        self.cluster = cluster
        self.pool = pool
        self.core = HealingCore()
        self.hosts = pool.table
        self.last_error = ""
        self._tasks = tasks
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._retry_tasks: dict[str, asyncio.Task[None]] = {}
        self._start_errors: dict[str, str] = {}
        self._pass_retry_at = 0.0
        self.passes = 0  # for tests and the benchmark: passes made so far
        pool.on_host_lost(self._host_lost)

    # -- questions the cluster asks ---------------------------------------------------------------
    def unavailable_hosts(self) -> set[str]:
        """Hosts that are down, put aside or drained: no entry is placed or started there."""
        return self.hosts.unavailable()

    def drained_hosts(self) -> dict[str, str]:
        """Drained host -> why (see :meth:`~speccluster_ssh.hosts.HostTable.drain`)."""
        return self.hosts.drained()

    def waiting(self, key: Any) -> bool:
        """Whether entry ``key`` is backing off after failing by itself."""
        return self.core.waiting(key)

    def problem(self, key: Any) -> str:
        """Entry ``key``'s own problem, when it was found to have one."""
        return self.core.problem(key)

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    # -- events -----------------------------------------------------------------------------------
    def wake(self, why: str = "") -> None:
        """Make one healing pass soon (a no-op when the healer is not running)."""
        if why:
            logger.debug("healer woken: %s", why)
        self._wake.set()

    def watch(self, process: RemoteProcess) -> None:
        """Wake when ``process`` fails: it exited, failed to start or lost its host."""
        process.on_failed(lambda proc: self.wake(f"{proc.role} {proc.name} on {proc.host} failed"))

    def entry_started(self, key: Any, host: str) -> None:
        """Entry ``key`` started on ``host``: its problem and the host's failure streak end."""
        self.core.entry_started(key, host)

    def entry_start_failed(self, key: Any, error: str) -> None:
        """Entry ``key`` failed to start with ``error``; charged on the next pass."""
        self._start_errors[str(key)] = error
        self.wake(f"entry {key} failed to start")

    def _host_lost(self, host: str, reason: str) -> None:
        logger.warning("host %s lost: %s", host, reason)
        self.cluster.log_event(f"host {host} lost: {reason}")
        self.wake(f"host {host} lost")

    # -- running ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start healing (once); the first pass runs at once."""
        if self._loop_task is None:
            self._wake.set()
            self._loop_task = self._tasks.start(self._run(), name="healer")

    async def stop(self) -> None:
        """Stop healing and the host retries in flight, and wait until they ended."""
        stopping = [t for t in (self._loop_task, *self._retry_tasks.values()) if t is not None and not t.done()]
        for task in stopping:
            task.cancel()
        if stopping:
            await asyncio.wait(stopping)  # their outcome is logged by the task set
        self._retry_tasks.clear()

    def next_deadline(self) -> float:
        """The monotonic time of the next retry that is due without any event, or ``inf``."""
        return self.core.next_deadline(self.snapshot(), time.monotonic())

    async def _run(self) -> None:
        cluster = self.cluster
        while cluster.status not in (Status.closing, Status.closed):
            timeout = self.next_deadline() - time.monotonic()
            if not self._wake.is_set() and timeout > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), None if math.isinf(timeout) else timeout)
                except (asyncio.TimeoutError, TimeoutError):
                    pass  # a retry time came
            self._wake.clear()
            if cluster.status in (Status.closing, Status.closed):
                return
            self._pass_retry_at = 0.0
            try:
                await self.heal_once()
            except Exception as exc:  # keep healing; the reason shows in the log and last_error
                logger.warning("healing failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
                self.last_error = str(exc)
                self._pass_retry_at = time.monotonic() + PASS_RETRY_DELAY

    async def heal_once(self) -> None:
        """One pass: ask the core what to do (:meth:`HealingCore.plan`) and carry it out."""
        self.passes += 1
        cluster = self.cluster
        now = time.monotonic()
        actions = self.core.plan(self.snapshot(), now)
        # Hosts first, each retried in a task of its own and without waiting
        # for the lock: a host that does not answer must not hold up
        # relaunching entries elsewhere.
        for action in actions:
            if isinstance(action, RetryHost):
                self._apply_retry_started(action.host)
        on_entries = [a for a in actions if not isinstance(a, (RetryHost, Reconcile))]
        if any(isinstance(a, DropDeadEntry) for a in on_entries):
            # Under the lock: a reconcile must not see dead entries half-removed.
            async with cluster.spec_lock:
                for action in on_entries:
                    await self.carry_out(action)
        else:
            for action in on_entries:
                await self.carry_out(action)
        # The cluster may have begun to close while this pass awaited.
        if any(isinstance(a, Reconcile) for a in actions) and cluster.status == Status.running:
            await cluster.reconcile_and_log()

    def snapshot(self) -> Snapshot:
        """The cluster's hosts and entries as plain values, for :class:`HealingCore`."""
        cluster = self.cluster
        hosts = tuple(
            HostView(name, s.state, bool(s.drained), s.retry_at, name in self._retry_tasks)
            for name, s in self.hosts.states.items()
        )
        views = []
        for key, spec in cluster.worker_spec.items():
            worker = cluster.workers.get(key)
            view = EntryView(key, spec["options"].get("host"), start_error=self._start_errors.get(str(key), ""))
            if isinstance(worker, RemoteProcess):
                process = Process.DEAD if _is_dead(worker) else Process.RUNNING
                view = replace(view, process=process, process_host=worker.host, started=bool(worker.members),
                               lease_short=worker.lease_short is not None)
            elif worker is not None:
                view = replace(view, process=Process.RUNNING)
            views.append(view)
        # A sleeping host is worth retrying (which wakes it) only when an entry waits for it.
        power = getattr(self.pool, "power", None)  # a pool without a power keeper has no sleeping host
        asleep = power.not_awake() if power is not None else set()
        return Snapshot(
            hosts, frozenset(cluster.worker_hosts) - asleep, tuple(views), cluster.status == Status.running,
            self._pass_retry_at,
        )

    async def carry_out(self, action: Action) -> None:
        """Carry out one action of a plan (the host retries and the reconcile are :meth:`heal_once`'s)."""
        cluster = self.cluster
        if isinstance(action, DropDeadEntry):
            await self._drop_dead_entry(action.key)
        elif isinstance(action, ChargeStartFailure):
            self._apply_failure(action.host, action.cause)
            logger.warning("%s", action.message)
        elif isinstance(action, RestoreHost):
            self._apply_restore(action.host)
            cluster.log_event(f"host {action.host} taken back: entry {action.key} fails by itself")
        elif isinstance(action, BackOffEntry):
            cluster.log_event(f"{action.message}; entry {action.key} retried in {action.retry_in:g} s")
        elif isinstance(action, PutHostAside):
            self._apply_put_aside(action.host, action.reason)
            logger.warning("host %s put aside: %s", action.host, action.reason)
            cluster.log_event(f"host {action.host} put aside: {action.reason}")
        elif isinstance(action, StartAgainInPlace):
            logger.info("entry %s started again on %s", action.key, action.host)
            cluster.log_event(f"entry {action.key} started again on {action.host}")
        elif isinstance(action, MoveEntry):
            self._move_entry(action.key, action.host)
        elif isinstance(action, ForgetShortEntry):
            cluster.forget_short_entry(action.key)
        else:
            raise TypeError(f"the healer cannot carry out {action!r} here")

    # -- host state changes, through the host table: one method each ----------------------------
    def _apply_retry_started(self, name: str) -> None:
        self._retry_tasks[name] = self._tasks.start(self._retry_host(name), name=f"retry host {name}")

    def _apply_failure(self, name: str, cause: str) -> None:
        if name in self.hosts:  # a reload may have removed it since the snapshot
            self.hosts.record_failure(name, cause)

    def _apply_put_aside(self, name: str, reason: str) -> None:
        if name in self.hosts:
            self.hosts.put_aside(name, reason)

    def _apply_restore(self, name: str) -> None:
        self.hosts.restore(name)

    # -- entries ----------------------------------------------------------------------------------
    async def _drop_dead_entry(self, key: Any) -> None:
        cluster = self.cluster
        self._start_errors.pop(str(key), None)  # read by the plan, charged or not
        worker = cluster.workers.get(key)
        if not isinstance(worker, RemoteProcess) or not _is_dead(worker):
            return  # dropped or replaced since the snapshot
        await worker.close()
        cluster.workers.pop(key, None)
        cluster.reports.keep_logs(worker)
        # Before any replacement starts: a name the scheduler still holds (a
        # cut host cannot say its worker died) would refuse the replacement.
        await self._remove_members_from_scheduler(worker.member_names, f"dead-{key}")

    async def _retry_host(self, name: str) -> None:
        try:
            await self.pool.agent(name)
        except HostError as exc:
            logger.info("host %s still does not answer: %s", name, exc.reason)
            self._still_down(name, exc.reason)
            return  # the next attempt waits longer
        except Exception as exc:
            logger.warning("retrying host %s failed: %s: %s", name, type(exc).__name__, exc)
            self._still_down(name, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._retry_tasks.pop(name, None)
            # Up: start its entries. Still down: sleep until its next retry time.
            self.wake(f"retry of host {name} ended")
        self.cluster.log_event(f"host {name} answers again")

    def _still_down(self, name: str, reason: str) -> None:
        # A failure the pool did not record (it never reached a start) is a transition to
        # down all the same: it schedules the next attempt, or the next pass would retry at once.
        if self.hosts.due_for_retry([name]):
            self.hosts.mark_lost(name, reason)

    def worker_left(self, key: Any, proc: Any, member: str) -> None:
        """The scheduler lost ``member`` of entry ``key`` a while ago: drop the entry's process if it did not come back.

        The entry stays in the spec, so the next reconcile starts it again.
        Only the process interface seen at removal time is dropped, never a
        replacement started meanwhile.
        """
        cluster = self.cluster
        if cluster.status in (Status.closing, Status.closed) or cluster.workers.get(key) is not proc:
            return
        back = {str(w.get("name")) for w in cluster.scheduler_info.get("workers", {}).values()}
        if member in back:
            return
        self._tasks.start(self._drop_entry_process(key, proc, member), name=f"drop entry {key}")

    async def _drop_entry_process(self, key: Any, proc: Any, member: str) -> None:
        # Under the lock, and closed before it leaves ``workers``: the entry's
        # replacement reuses its member names and must not start while the
        # old processes are still stopping.
        cluster = self.cluster
        async with cluster.spec_lock:
            if cluster.workers.get(key) is not proc:
                return
            logger.info("worker %s of entry %s is gone; the entry will be started again", member, key)
            try:
                await proc.close()
            except Exception as exc:  # its host may be gone; the agent kills what it leaves
                logger.warning("closing entry %s failed: %s: %s", key, type(exc).__name__, exc)
            cluster.workers.pop(key, None)
            cluster.reports.keep_logs(proc)
        self.wake(f"entry {key} dropped")

    async def _remove_members_from_scheduler(self, members: Sequence[str], why: str) -> None:
        """Make the scheduler drop every worker registered under one of ``members``.

        Called under the reconcile lock for entries whose processes are gone,
        before their replacements start, so a replacement never meets a ghost
        of its own name. By name, not by the address we last saw: a nanny may
        have restarted its worker under a new address.
        """
        comm = self.cluster.scheduler_comm
        if not members or comm is None:
            return
        wanted = set(members)
        try:
            identity = await comm.identity()
        except Exception as exc:
            logger.warning("could not ask the scheduler for workers %s: %s", ", ".join(sorted(wanted)), exc)
            return
        for address, info in identity.get("workers", {}).items():
            if str(info.get("name")) not in wanted:
                continue
            try:
                await comm.unregister(
                    address=address, stimulus_id=f"speccluster-{why}-{time.time()}", close=False
                )
            except Exception as exc:
                logger.warning("could not remove worker %s (%s) from the scheduler: %s", info.get("name"), address, exc)
            else:
                logger.info("removed worker %s (%s) of a gone entry from the scheduler", info.get("name"), address)

    def _move_entry(self, key: Any, old_host: str | None) -> None:
        """Move entry ``key`` off the unusable ``old_host`` to a free slot, or leave it there.

        An entry that finds no free slot stays wanted on its own host and
        starts again when that host answers.
        """
        cluster = self.cluster
        if key not in cluster.worker_spec or key in cluster.workers:
            return  # removed, or started elsewhere, since the snapshot
        moved = entries.place_entry(
            cluster.entry_settings, cluster.worker_hosts, entries.slots_used(cluster.worker_spec),
            unavailable=self.unavailable_hosts(), policy=cluster.placement_policy, new_spec=cluster.new_spec,
            leaving=old_host, gpus_held=entries.gpus_held({k: s for k, s in cluster.worker_spec.items() if k != key}),
            limits=cluster.slot_limits(),
        )
        if moved is None:
            return
        # Same key, same place in the spec: only the host changes.
        cluster.worker_spec[key] = moved
        host = moved["options"]["host"]
        logger.info("entry %s moved from %s to %s", key, old_host, host)
        cluster.log_event(f"entry {key} moved from {old_host} to {host}")


def _is_dead(process: RemoteProcess) -> bool:
    return process.status in (Status.failed, Status.closed)
