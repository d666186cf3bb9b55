"""Machines that sleep: running the power commands, waking hosts and putting idle ones back to sleep.

The decisions are :mod:`speccluster_ssh.power`'s; this module does the I/O.
One :class:`PowerKeeper` per cluster, made with it and handed to its agent
pool (``pool.power``):

- **Waking.** Every start of a host's agent first reaches the host
  (:meth:`PowerKeeper.reach`). A host with ``speccluster_power_on`` that
  does not answer (it refuses or times out the connection) gets its
  power-on command, once, and then up to ``speccluster_boot_timeout``
  seconds to answer SSH (one connection attempt a second); then its agent
  starts as a returning host's does. A start waits for it, and the pool
  shares one start among all who need the host, so a host is woken once
  however many entries wait for it. A power-on command that fails, or a
  host that does not answer in time, is a
  :class:`~speccluster_ssh.errors.HostError` (with the command's stderr):
  the host is down and retried with the usual backoff
  (:func:`~speccluster_ssh.health.next_retry`).
- **Placing.** Hosts asleep or waking are placed on only when the hosts
  that answer have no free slot, and then one sleeping host at a time, in
  inventory order (:meth:`PowerKeeper.placement_rounds`): ``scale`` and
  ``adapt`` count sleeping hosts as capacity, with a boot's delay, and wake
  only as many as the load needs.
- **Sleeping.** A loop (:meth:`PowerKeeper.start`) watches the hosts with
  ``speccluster_power_off`` and ``speccluster_idle_poweroff``: a host that
  this cluster woke (or any, under ``speccluster_power_manage: always``),
  with no entry of this cluster and no lease of any cluster for that long,
  is drained (:func:`~speccluster_ssh.operations.drain_unlocked`), its agent
  stopped, and powered off. A failed power-off is retried with the usual
  backoff.

Every power command is run as an argv list with no shell (on the head, or
on the host over the cluster's SSH connection when it starts with ``ssh``)
and recorded in the cluster's log with its exit status and output tail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from distributed.core import Status

from . import operations
from .errors import HostError
from .health import HOST_BACKOFF_FIRST, next_retry
from .power import BOOT_POLL, Power, PowerBook, fill_command, on_host
from .powermarks import WakingMarks
from .sharing import display_name

if TYPE_CHECKING:
    from .agent import HostAgent
    from .cluster_protocols import PowerCluster
    from .connection import HostConnection
    from .inventory import HostSpec
    from .pool import AgentPool
    from .tasks import TaskSet

logger = logging.getLogger("speccluster_ssh.cluster")  # the messages users know from the cluster's log

# Seconds a power command may run before it is killed and counts as failed.
COMMAND_TIMEOUT = 60.0
# Bytes of a command's output kept in the log and in its error.
TAIL_BYTES = 2000
# Longest wait between two looks at the idle hosts.
MAX_TICK = 10.0


def tail(data: bytes) -> str:
    """The end of a command's output, as text."""
    return data[-TAIL_BYTES:].decode(errors="replace").strip()


def no_answer(exc: HostError) -> bool:
    """Whether a failed connection means the host does not answer (it may be off), not that it refused us."""
    return isinstance(exc.__cause__, (OSError, asyncio.TimeoutError, TimeoutError)) or "did not answer" in exc.reason


async def run_command(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT,
                      connection: HostConnection | None = None) -> tuple[int, str, str]:
    """Run ``argv`` without a shell, on the head or on the host of ``connection``: its exit status and output tails.

    Raises
    ------
    OSError
        When the command cannot be run on the head (not found, not executable).
    asyncio.TimeoutError
        When it ran longer than ``timeout`` (it is killed).
    """
    if connection is not None:
        status, out, err = await connection.run(list(argv), timeout=timeout)
        return status, tail(out), tail(err)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return int(proc.returncode or 0), tail(out), tail(err)


class PowerKeeper:
    """Wakes the cluster's sleeping hosts when they are needed and powers idle woken ones off.

    Parameters
    ----------
    cluster
        The cluster whose hosts it keeps.
    pool
        The cluster's agent pool; it calls :meth:`reach` before each agent start.
    tasks
        Where the idle loop runs.
    """

    def __init__(self, cluster: PowerCluster, pool: AgentPool, tasks: TaskSet) -> None:
        self.cluster = cluster
        self.pool = pool
        self.table = pool.table
        self.book = PowerBook()
        # What `hosts` (another process) reads of this cluster's waking (see powermarks.py).
        self.marks = WakingMarks(pool.cluster_id, display_name(pool.cluster_id))
        self.passes = 0  # looks at the idle hosts so far (tests wait on it)
        self._tasks = tasks
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._off_retry: dict[str, tuple[float, float]] = {}  # host -> (retry at, backoff) after a failed power-off
        pool.power = self

    # -- questions --------------------------------------------------------------------------------
    def not_awake(self) -> set[str]:
        """Hosts asleep or waking: nothing is placed there while hosts that answer have room."""
        return self.book.not_awake()

    def report(self, name: str) -> dict[str, Any]:
        """``{"power": ..., "power_label": ...}`` of host ``name`` for ``status``."""
        return self.book.as_dict(name, time.monotonic())

    def placement_rounds(self, unavailable: set[str]) -> list[tuple[set[str], str | None]]:
        """The ``unavailable`` sets to place an entry with, in turn, and the sleeping host each one wakes.

        First the hosts that answer; then those waking too; then each
        wakeable sleeping host alone, in inventory order, so that one
        entry wakes at most one host and the first ones are woken first.
        """
        waking = set(self.book.waking())
        asleep = [n for n in self.table.workers if self.book.state(n) == Power.ASLEEP and self._wakeable(n)]
        base = set(unavailable) | waking | set(self.book.asleep())
        rounds: list[tuple[set[str], str | None]] = [(base, None)]
        if waking:
            rounds.append((base - waking, None))
        for name in asleep:
            rounds.append((base - waking - {name}, name))
        return rounds

    def _wakeable(self, name: str) -> bool:
        spec = self.table.specs.get(name)
        state = self.table.states.get(name)
        return spec is not None and spec.power_on is not None and state is not None and not state.drained \
            and str(state.state) != "aside"

    # -- waking -----------------------------------------------------------------------------------
    async def reach(self, name: str) -> None:
        """Make sure host ``name`` answers SSH before its agent starts, waking it when it may be asleep.

        Raises
        ------
        HostError
            The host does not answer and has no power-on command, its
            power-on command failed, or it did not answer within its boot
            timeout after it.
        """
        spec = self.table.specs[name]
        if spec.power_on is None and spec.power_off is None:
            return  # not a host that sleeps: the agent's start connects as always
        connection = self.pool.connection(name)
        try:
            await connection.open()
        except HostError as exc:
            if spec.power_on is None or not no_answer(exc):
                raise
            self.book.no_answer(name, time.monotonic())
            await self.wake(spec, connection, exc.reason)
            return
        self.book.answered(name, time.monotonic())

    async def wake(self, spec: HostSpec, connection: HostConnection, why: str) -> None:
        """Run host ``spec``'s power-on command, then wait up to its boot timeout for it to answer SSH."""
        name = spec.name
        self.cluster.log_event(f"host {name} does not answer ({why}): powering it on")
        await self.run_power(spec, "power on", spec.power_on or ())
        started = time.monotonic()
        self.book.waking_up(name, started)
        self.marks.start(name)
        try:
            await self._boot(spec, connection, why, started)
        finally:
            self.marks.end(name)

    async def started(self, name: str, agent: HostAgent) -> None:
        """Host ``name``'s agent started: when this cluster woke the host, say so there, for ``hosts``."""
        if self.book.state(name) != Power.AWAKE:
            return
        import socket

        try:
            await agent.lease_power(display_name(self.pool.cluster_id), socket.gethostname(), timeout=10.0)
        except HostError as exc:  # only the display of `hosts` loses it
            logger.info("host %s: its woken record not written: %s", name, exc.reason)

    async def _boot(self, spec: HostSpec, connection: HostConnection, why: str, started: float) -> None:
        """Wait up to host ``spec``'s boot timeout for it to answer SSH after its power-on command."""
        name = spec.name
        deadline = started + spec.boot_timeout
        last = why
        for _ in range(int(spec.boot_timeout / BOOT_POLL) + 2):  # bounded; the deadline ends it first
            try:
                await connection.open()
            except HostError as exc:
                if not no_answer(exc):
                    self.book.powered_off(name, time.monotonic())  # it answered, but not as it should: not woken
                    raise
                last = exc.reason
                if time.monotonic() + BOOT_POLL > deadline:
                    break
                await asyncio.sleep(BOOT_POLL)
                continue
            self.book.answered(name, time.monotonic())
            self.cluster.log_event(f"host {name} is awake after {time.monotonic() - started:.1f} s")
            return
        self.book.powered_off(name, time.monotonic())
        raise HostError(
            name, f"did not answer SSH within its boot timeout ({spec.boot_timeout:g} s) after its power-on "
            f"command ({last}); raise speccluster_boot_timeout if it boots slowly"
        )

    async def run_power(self, spec: HostSpec, what: str, command: Sequence[str]) -> None:
        """Run one power command of host ``spec``; record it in the cluster's log.

        Raises
        ------
        HostError
            When it cannot be run, runs too long or exits with a status
            other than 0: its stderr is the error's tail.
        """
        name = spec.name
        argv = fill_command(command, spec.vars, name)  # the inventory was checked: every variable is there
        connection = None
        if on_host(argv):
            argv = argv[1:]
            connection = self.pool.connection(name)  # the cluster's own; opened if the host had none yet
        where = f" on {name}" if connection is not None else ""
        try:
            status, out, err = await run_command(argv, connection=connection)
        except (asyncio.TimeoutError, TimeoutError):
            self.cluster.log_event(f"host {name}: {what}: {argv[0]}{where} did not finish within {COMMAND_TIMEOUT:g} s")
            raise HostError(name, f"{what} command {argv[0]} did not finish within {COMMAND_TIMEOUT:g} s") from None
        except OSError as exc:
            self.cluster.log_event(f"host {name}: {what}: cannot run {argv[0]}: {exc.strerror or exc}")
            raise HostError(name, f"{what} command {argv[0]} cannot be run: {exc.strerror or exc}") from None
        output = "; ".join(filter(None, (f"stdout: {out}" if out else "", f"stderr: {err}" if err else "")))
        said = f"; {output}" if output else ""
        self.cluster.log_event(f"host {name}: {what}: {argv[0]}{where} exited {status}{said}")
        if status != 0:
            last = err.splitlines()[-1] if err else (out.splitlines()[-1] if out else "no output")
            raise HostError(name, f"{what} command {argv[0]} failed with exit status {status}: {last}", err or out)

    # -- sleeping ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching for idle hosts (once), when some host may be powered off; find which hosts sleep."""
        if self._task is None and self._rules():
            self._task = self._tasks.start(self._run(), name="power keeper")
        unknown = [n for n, spec in self.table.workers.items()
                   if spec.power_on is not None and self.book.state(n) == Power.UNKNOWN and n not in self.table.agents]
        if unknown and self._probe is None:
            self._probe = self._tasks.start(self.probe(unknown), name="find the hosts that sleep")

    async def probe(self, names: Sequence[str]) -> None:
        """Connect to hosts ``names`` (no agent, no wake): ``on`` when they answer, ``asleep`` when they do not."""
        async def one(name: str) -> None:
            try:
                await self.pool.connection(name).open()
            except HostError as exc:
                if no_answer(exc) and self.book.state(name) == Power.UNKNOWN:
                    self.book.no_answer(name, time.monotonic())
                return
            if self.book.state(name) == Power.UNKNOWN:
                self.book.answered(name, time.monotonic())

        await asyncio.gather(*(one(n) for n in names))

    async def stop(self) -> None:
        """Stop watching (and finding which hosts sleep) and wait until it ended."""
        tasks = [t for t in (self._task, self._probe) if t is not None and not t.done()]
        self._task = None
        self.marks.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _rules(self) -> dict[str, tuple[float, bool]]:
        """Host -> (idle seconds, manage always), for the worker hosts that may be powered off."""
        return {
            name: (float(spec.idle_poweroff), spec.power_manage == "always")
            for name, spec in self.table.workers.items()
            if spec.power_off is not None and spec.idle_poweroff is not None
        }

    def _tick(self, rules: dict[str, tuple[float, bool]]) -> float:
        shortest = min((idle for idle, _ in rules.values()), default=MAX_TICK)
        return min(max(shortest / 4, 0.25), MAX_TICK)

    async def _run(self) -> None:
        cluster = self.cluster
        while cluster.status not in (Status.closing, Status.closed):
            rules = self._rules()
            tick = self._tick(rules)
            due = self.book.next_due(rules)
            timeout = tick if due is None else min(tick, max(due - time.monotonic(), 0.0))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            self._wake.clear()
            if cluster.status != Status.running:
                continue  # starting: nothing is idle yet; closing: the loop ends
            try:
                await self.tend_once()
            except Exception as exc:  # keep watching; the reason is in the log
                logger.warning("looking at idle hosts failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    def busy_hosts(self) -> set[str]:
        """Hosts that run workers now: an entry of this cluster, or a lease or want of any cluster, as last listed."""
        busy = {str(s.get("options", {}).get("host")) for s in self.cluster.worker_spec.values()}
        busy |= {name for name, leases in self.table.leases.items() if leases}
        return busy

    async def tend_once(self) -> list[str]:
        """One look at the hosts: note which are idle, and power off those idle long enough. The hosts powered off."""
        self.passes += 1
        rules = self._rules()
        now = time.monotonic()
        self.book.see_use(self.busy_hosts(), now)
        done = []
        for name in self.book.idle_due(rules, now):
            retry_at, _ = self._off_retry.get(name, (0.0, 0.0))
            if now < retry_at:
                continue
            if await self._still_idle(name) and await self.power_off(name, rules[name][0]):
                done.append(name)
        return done

    async def _still_idle(self, name: str) -> bool:
        """Ask the host's agent for every cluster's leases there now; whether there are none."""
        agent = self.table.agents.get(name)
        if agent is not None:
            try:
                self.table.see_leases(name, await agent.lease_list(timeout=10.0))
            except HostError as exc:
                logger.info("host %s: leases not read before powering it off, so it stays on: %s", name, exc.reason)
                return False
        if name in self.busy_hosts():
            self.book.see_use({name}, time.monotonic())
            return False
        return True

    async def power_off(self, name: str, idle: float) -> bool:
        """Drain idle host ``name``, stop its agent and run its power-off command; whether it was powered off."""
        cluster = self.cluster
        spec = self.table.specs[name]
        async with cluster.operations.lock:
            if cluster.status != Status.running or name in self.busy_hosts():
                return False
            await operations.drain_unlocked(cluster, name, f"idle for {idle:g} s: powering it off")
            try:
                agent = self.table.drop_agent(name)  # gone on purpose: its end is no host failure
                if agent is not None:
                    await agent.close(grace=self.pool.shutdown_grace)
                await self.run_power(spec, "power off", spec.power_off or ())
            except HostError as exc:
                self._power_off_failed(name, exc)
                return False
            finally:
                self.table.undrain(name)
            self._off_retry.pop(name, None)
            self.book.powered_off(name, time.monotonic())
            connection = self.table.drop_connection(name)
            if connection is not None:
                await connection.close()
            cluster.log_event(f"host {name} powered off after {idle:g} s idle; it is woken when the cluster needs it")
            return True

    def _power_off_failed(self, name: str, exc: HostError) -> None:
        _, backoff = self._off_retry.get(name, (0.0, HOST_BACKOFF_FIRST))
        retry_at, backoff = next_retry(backoff, False, time.monotonic())
        self._off_retry[name] = (retry_at, backoff)
        logger.warning("host %s: %s; tried again in %.0f s", name, exc.reason, retry_at - time.monotonic())
        self.cluster.log_event(f"host {name}: {exc.reason}; tried again in {retry_at - time.monotonic():.0f} s",
                               echo=False)  # said by the warning

    def wake_loop(self) -> None:
        """Look at the idle hosts soon (the spec changed)."""
        self._wake.set()

