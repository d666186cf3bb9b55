"""The head process of a cluster: it owns the cluster object for the cluster's whole life.

``speccluster-ssh up`` runs a :class:`Head` in the foreground (Ctrl-C stops
it), and ``up --detach`` runs one in a process of its own (``_serve``). The
head starts the cluster, writes ``state.json`` and the client files (see
:mod:`speccluster_ssh.state`), answers the control socket (see
:mod:`speccluster_ssh.control`) and closes the cluster when asked to stop.
It uses only the public API of :class:`~speccluster_ssh.cluster.SSHSpecCluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import control, postmortem
from . import state as st
from .errors import HostError, SpecClusterError, UserError
from .messages import PROG, host_error_text, is_inventory_error, one_line
from .tasks import TaskSet

if TYPE_CHECKING:
    from .cluster import SSHSpecCluster
    from .inventory import Inventory

logger = logging.getLogger(__name__)

# Seconds the cluster may take to close before the head gives up on a clean close.
CLOSE_TIMEOUT = 120.0
# Seconds the head waits for a start beyond the cluster's own start timeout.
START_SLACK = 15.0
# Seconds to stop every agent (and so every remote process) after the cluster closed.
POOL_CLOSE_TIMEOUT = 30.0


@dataclass
class UpOptions:
    """What ``up`` asked for; passed as JSON to a detached head process."""

    name: str
    inventory: str
    entries: int | None = None
    workers: int | None = None
    adapt: tuple[int, int] | None = None
    timeout: float = 60.0
    placement: str | None = None
    known_hosts: str | None = None
    tls: bool | None = None
    scheduler_group: str = "scheduler"
    worker_group: str = "workers"
    min_workers: str | None = None
    scheduler_reach: str | None = None
    dashboard_address: str | None = None
    idle_timeout: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> UpOptions:
        data = json.loads(text)
        if data.get("adapt") is not None:
            data["adapt"] = tuple(data["adapt"])
        return cls(**data)


class Head:
    """Runs one cluster for its whole life and answers its control socket.

    Parameters
    ----------
    options
        What ``up`` asked for.
    directory
        The cluster's state directory.
    lock
        The held head lock (released when the head ends).
    detached
        In a detached head a failed start leaves ``state.json`` (with the
        error) for ``up`` to read; in the foreground the directory is removed.
    """

    def __init__(self, options: UpOptions, directory: Path, lock: st.HeadLock, *, detached: bool) -> None:
        self.options = options
        self.directory = directory
        self.lock = lock
        self.detached = detached
        self.cluster: SSHSpecCluster | None = None
        self.inventory: Inventory | None = None
        self.phase = "starting"
        self.error = ""
        self.error_exit = 1
        self.state = st.ClusterState(
            name=options.name, pid=os.getpid(), inventory=options.inventory, up_options=json.loads(options.to_json())
        )
        self.t0 = time.monotonic()
        self.ready_at: dict[str, float] = {}
        self.stop_event: asyncio.Event | None = None
        self.stop_reason = ""
        self.end_reason = ""  # why the cluster ended by itself ("idle for 2h"), kept in its record
        self.closed: asyncio.Future[str] | None = None
        self.server: control.ControlServer | None = None
        self.tasks = TaskSet(f"head {options.name}", logger)

    # -- life cycle ---------------------------------------------------------
    async def run(
        self,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        on_running: Callable[[st.ClusterState], None] | None = None,
    ) -> int:
        """Start the cluster, serve until asked to stop, close it; return the exit status."""
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.closed = loop.create_future()
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for sig in signals:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
        ticker: asyncio.Task[None] | None = None
        try:
            st.write_state(self.directory, self.state)
            self.server = control.ControlServer(self.directory / st.SOCKET_FILE, self.handle)
            await self.server.start()
            if on_progress is not None:
                ticker = self.tasks.start(self._tick(on_progress), name="progress display")
            started = await self._start()
            if ticker is not None:
                ticker.cancel()
                await asyncio.wait([ticker])  # unlike awaiting it, our own cancellation still reaches us
                if started and on_progress is not None:
                    on_progress(self.progress())
            if not started:
                if self.stop_event.is_set() and not self.closed.done():
                    # Stopped while starting: everything was cleaned up, which is what down wants.
                    self.closed.set_result("")
                return self.error_exit
            if on_running is not None:
                on_running(self.state)
            await self.stop_event.wait()
            logger.info("closing cluster %s (%s)", self.options.name, self.stop_reason)
            message = await self._close_cluster()
            if not self.closed.done():
                self.closed.set_result(message)
            return 0 if not message else 1
        except BaseException as exc:
            # Whatever ends the head early goes into head.log and to a waiting ``down``.
            logger.exception("the head process stopped")
            if self.closed is not None and not self.closed.done():
                self.closed.set_result(f"the head process stopped: {type(exc).__name__}: {exc}")
            raise
        finally:
            await self.tasks.close(timeout=CLOSE_TIMEOUT)
            if self.closed is not None and not self.closed.done():
                self.closed.set_result("the head process stopped")
            if self.server is not None:
                await self.server.close()
            for sig in signals:
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.remove_signal_handler(sig)
            if self.phase != "failed" or not self.detached:
                # Its hosts keep the logs: the record (and head.log) lets 'logs --name' find them.
                postmortem.keep_record(st.KnownCluster(self.state, self.directory, alive=False), reason=self.end_reason)
                st.remove_cluster_dir(self.directory)
            self.lock.release()

    def end_idle(self, reason: str) -> None:
        """The cluster has been idle for its idle timeout: close it as ``down`` does, and record why."""
        if self.stop_event is not None and not self.stop_event.is_set():
            self.end_reason = reason
        self.request_stop(reason)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask the head to close the cluster and end (signal handlers, ``down``)."""
        if self.stop_event is not None and not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()

    async def _tick(self, on_progress: Callable[[dict[str, Any]], None]) -> None:
        while True:
            on_progress(self.progress())
            await asyncio.sleep(0.25)

    async def _start(self) -> bool:
        """Start the cluster; on failure clean up, record why and return ``False``."""
        options = self.options
        stop_wait: asyncio.Task[Any] | None = None
        try:
            from .cluster import SSHSpecCluster
            from .inventory import load_inventory

            self.inventory = load_inventory(
                options.inventory, scheduler_group=options.scheduler_group, worker_group=options.worker_group
            )
            from .planning import inventory_fingerprint

            self.state.inventory_fingerprint = inventory_fingerprint(self.inventory)
            hosts = {h.name: h.address for h in self.inventory.worker_hosts}
            if self.inventory.scheduler_host is not None:
                hosts[self.inventory.scheduler_host.name] = self.inventory.scheduler_host.address
            self.state.hosts = hosts
            kwargs: dict[str, Any] = {
                "inventory": self.inventory,
                "n_workers": options.entries,
                "placement": options.placement,
                "known_hosts_policy": options.known_hosts,
                "start_timeout": options.timeout,
                "min_workers": options.min_workers,
                "name": options.name,
                "asynchronous": True,
            }
            if options.tls is not None:
                kwargs["security"] = options.tls
            if options.scheduler_reach is not None:
                kwargs["scheduler_reach"] = options.scheduler_reach
            if options.dashboard_address is not None:
                kwargs["dashboard_address"] = options.dashboard_address
            if options.idle_timeout is not None:
                kwargs["idle_timeout"] = options.idle_timeout
            self.cluster = SSHSpecCluster(**kwargs)
            self.cluster.idle.on_idle = self.end_idle  # the head closes it, cleans every host and records why
            self.state.cluster_id = self.cluster.cluster_id
            self.state.tls = bool(self.cluster.security.require_encryption)
            st.write_state(self.directory, self.state)

            # Its outcome is read below (result()), so the task set need not report it.
            starting = self.tasks.start(self._await_cluster(), name="cluster start", log_failure=False)
            stopping = self.stop_event
            stop_wait = self.tasks.start(stopping.wait(), name="stop request") if stopping is not None else None
            waiting = {starting} | ({stop_wait} if stop_wait else set())
            # A little past the cluster's own start timeout, so that its
            # StartError (which names every missing host) comes first.
            done, _ = await asyncio.wait(
                waiting, timeout=options.timeout + START_SLACK, return_when=asyncio.FIRST_COMPLETED
            )
            if starting not in done:
                starting.cancel()
                await asyncio.wait([starting])
                if not starting.cancelled() and starting.exception() is not None:
                    # The start failed on its way out; the reason given below is what interrupted it.
                    logger.info("the interrupted cluster start ended with %r", starting.exception())
                if self.stop_event is not None and self.stop_event.is_set():
                    raise SpecClusterError(f"start interrupted ({self.stop_reason}); everything started was stopped")
                raise SpecClusterError(
                    f"the cluster did not come up within {options.timeout:g} s "
                    f"(still waiting for: {', '.join(self._pending_hosts()) or 'the scheduler'}); "
                    "check the hosts with 'speccluster-ssh check' or raise --timeout"
                )
            starting.result()
            if options.adapt is not None:
                self.cluster.adapt(minimum=options.adapt[0], maximum=options.adapt[1])
            elif options.workers is not None and sum(self._wanted_and_ready()[0].values()) < options.workers:
                # More than the inventory holds: asked for all the same, so that hosts that
                # come later (undrain, a reload adding hosts) fill the cluster up to it.
                # 'up' has warned that the inventory holds fewer: the cluster's own warning would repeat it.
                self.cluster.capacity.shortfall_told()
                self.cluster.scale(options.workers)
        except Exception as exc:
            self._record_failure(exc)
            await self._close_cluster()
            self.phase = "failed"
            self.state.phase = "failed"
            self.state.error = self.error
            self.state.error_exit = self.error_exit
            try:
                st.write_state(self.directory, self.state)
            except OSError as write_error:
                logger.warning("cannot record the failed start in %s: %s", self.directory, write_error)
            return False
        finally:
            if stop_wait is not None:
                stop_wait.cancel()
        cluster = self.cluster
        self.phase = "running"
        self.state.phase = "running"
        self.state.scheduler_address = str(cluster.scheduler_address or "")
        self.state.dashboard_link = str(cluster.dashboard_link or "")
        self.state.summary = cluster.status_report()["summary"]
        # Forwarded addresses above work on the head; this says so, and why.
        self.state.scheduler_reach = cluster.reach.as_dict() if cluster.reach is not None else None
        path = st.write_client_files(
            self.directory, self.state.scheduler_address, cluster.security if self.state.tls else None
        )
        self.state.client_config = str(path)
        st.write_state(self.directory, self.state)
        return True

    async def _await_cluster(self) -> None:
        if self.cluster is not None:
            await self.cluster

    def _record_failure(self, exc: BaseException) -> None:
        cause = exc.__cause__ if isinstance(exc, RuntimeError) else None
        if isinstance(cause, HostError):
            exc = cause
        if isinstance(exc, HostError):
            self.error = host_error_text(exc)
        elif isinstance(exc, UserError) or is_inventory_error(exc):
            self.error, self.error_exit = one_line(str(exc)), 2
        elif isinstance(exc, SpecClusterError):
            self.error = str(exc)
        elif isinstance(exc, OSError):
            # e.g. a local host's python that does not exist
            what = exc.strerror or str(exc)
            where = f": {exc.filename}" if exc.filename else ""
            self.error = (f"cannot start the cluster: {what}{where}; "
                          f"check the hosts with '{PROG} check {self.options.inventory}'")
        else:
            self.error = f"{type(exc).__name__}: {one_line(str(exc))}"
        if self.detached:
            # The traceback is for head.log only; users get the line above.
            logger.error("cluster start failed", exc_info=exc)

    async def _close_cluster(self) -> str:
        """Close the cluster; return ``""`` when it closed cleanly, else why not."""
        cluster = self.cluster
        if cluster is None:
            return ""
        message = ""
        try:
            await asyncio.wait_for(_awaitable(cluster.close()), CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, TimeoutError):
            message = f"closing the cluster took longer than {CLOSE_TIMEOUT:g} s"
        except Exception as exc:  # report, then still drop every agent below
            message = f"closing the cluster failed: {type(exc).__name__}: {one_line(str(exc))}"
            logger.warning("%s", message, exc_info=exc)
        finally:
            # Closing the pool stops every agent, and with them every remote process.
            try:
                await asyncio.wait_for(cluster.pool.close(), POOL_CLOSE_TIMEOUT)
            except (asyncio.TimeoutError, TimeoutError):
                logger.warning("stopping the host agents took longer than %g s", POOL_CLOSE_TIMEOUT)
            except Exception as exc:  # the close above is what matters; this one is a safety net
                logger.warning("stopping the host agents failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return message

    # -- what the head knows ---------------------------------------------------
    def _wanted_and_ready(self) -> tuple[dict[str, int], dict[str, int]]:
        if self.cluster is None:
            return {}, {}
        return self.cluster.readiness()

    def _pending_hosts(self) -> list[str]:
        return [row["host"] for row in self.progress()["hosts"] if row["label"] not in ("ready", "idle")]

    def progress(self) -> dict[str, Any]:
        """Per host: connection state and workers ready out of wanted, with elapsed seconds."""
        now = time.monotonic()
        wanted, ready = self._wanted_and_ready()
        cluster = self.cluster
        rows: list[dict[str, Any]] = []
        names: list[tuple[str, str]] = []
        if self.inventory is not None:
            sched = self.inventory.scheduler_host
            if sched is not None:
                names.append((sched.name, "scheduler"))
            names.extend((h.name, "worker") for h in self.inventory.worker_hosts if sched is None or h.name != sched.name)
        for host, role in names:
            state = cluster.host_table.states.get(host) if cluster is not None else None
            conn = state.state if state is not None else "new"
            reason = state.reason if state is not None else ""
            want, have = wanted.get(host, 0), ready.get(host, 0)
            if role == "scheduler":
                up = cluster is not None and cluster.scheduler_ready()
                want, have = want + 1, have + (1 if up else 0)
            if conn in ("down", "aside"):
                label = conn
            elif want == 0:
                label = "idle"
            elif have >= want:
                label = "ready"
            elif conn == "up":
                label = "starting"
            else:
                # The head's environment on its way there (shipping, building) before the agent starts.
                label = (cluster.pool.env_progress.get(host) if cluster is not None else None) or "connecting"
            if label in ("ready", "idle"):
                self.ready_at.setdefault(host, now)
            else:
                self.ready_at.pop(host, None)
            elapsed = self.ready_at.get(host, now) - self.t0
            rows.append({
                "host": host, "role": role, "state": conn, "label": label, "wanted": want, "ready": have,
                "seconds": round(elapsed, 1), "reason": reason,
            })
        return {
            "name": self.options.name,
            "phase": self.phase,
            "seconds": round(now - self.t0, 1),
            "hosts": rows,
            "error": self.error,
        }

    def _adaptive_info(self) -> dict[str, Any] | None:
        return self.cluster.adaptive_bounds() if self.cluster is not None else None

    # -- control requests ---------------------------------------------------------
    async def handle(self, request: Mapping[str, Any]) -> Any:
        """Answer one control request (see :mod:`speccluster_ssh.control`)."""
        try:
            op = control.Op(request["op"])
        except ValueError:
            raise UserError(f"unknown control operation {request['op']!r}") from None
        if op is control.Op.PROGRESS:
            return self.progress()
        if op is control.Op.DOWN:
            self.request_stop("down requested")
            if self.closed is None:
                return {"closed": True}
            message = await asyncio.shield(self.closed)
            if message:
                raise SpecClusterError(message)
            return {"closed": True}
        cluster = self.cluster
        if self.phase != "running" or cluster is None:
            if op is control.Op.STATUS:
                # The same keys as a running cluster's report, so scripts need no special case.
                progress = self.progress()
                return {
                    "name": self.options.name,
                    "phase": self.phase,
                    "pid": os.getpid(),
                    "scheduler_address": None,
                    "dashboard_link": None,
                    "hosts": {row["host"]: row for row in progress["hosts"]},
                    "workers": [],
                    "progress": progress,
                }
            raise SpecClusterError(f"cluster {self.options.name} is {self.phase}; try again once it runs")
        if op is control.Op.STATUS:
            report = cluster.status_report()
            report.update({
                "phase": self.phase,
                "pid": os.getpid(),
                "started": self.state.started,
                "inventory": self.options.inventory,
                "tls": self.state.tls,
                "client_config": self.state.client_config,
                "adaptive": self._adaptive_info(),
            })
            return report
        if op is control.Op.SCALE:
            n = int(request.get("n") or 0)
            cores = request.get("cores")
            memory = request.get("memory")
            if n < 0:
                raise UserError("the number of workers must be 0 or more")
            cluster.scale(n, memory=memory, cores=int(cores) if cores is not None else None)
            wanted, _ = self._wanted_and_ready()
            # What 'up' again compares with; every_slot: 'up' without --workers asked for it.
            by_count = cores is None and memory is None
            every = by_count and bool(request.get("every_slot"))
            _record_size(self, workers=None if every else (n if by_count else sum(wanted.values())))
            return {
                "planned_workers": sum(wanted.values()),
                "capacity_note": cluster.capacity_note,
                "adaptive": self._adaptive_info(),
            }
        if op is control.Op.ADAPT:
            kwargs = {
                k: request[k]
                for k in ("minimum", "maximum", "minimum_memory", "maximum_memory")
                if request.get(k) is not None
            }
            cluster.adapt(**kwargs)
            info = self._adaptive_info() or {}
            _record_size(self, adapt=(info.get("minimum"), info.get("maximum")))
            return {"adaptive": self._adaptive_info()}
        if op is control.Op.ADAPT_OFF:
            was_on = cluster.stop_adapt()
            _record_size(self, workers=sum(self._wanted_and_ready()[0].values()), adapt=None)
            return {"adaptive": None, "was_on": was_on}
        if op is control.Op.LOGS:
            return await _cluster_logs(self.cluster, self.options.name, request.get("target"))
        if op in (control.Op.RESTART, control.Op.DRAIN, control.Op.UNDRAIN, control.Op.RELOAD):
            return await self._operate(cluster, op, request)
        raise UserError(f"unknown control operation {str(op)!r}")  # a member of Op not handled above

    async def _operate(self, cluster: SSHSpecCluster, op: control.Op, request: Mapping[str, Any]) -> Any:
        """The operations of a running cluster (see :mod:`speccluster_ssh.operations`, :mod:`speccluster_ssh.reload`)."""
        if op is control.Op.RESTART:
            return await cluster.rolling_restart(batch=int(request.get("batch") or 1))
        if op is control.Op.DRAIN:
            return await cluster.drain(str(request.get("host")), reason=str(request.get("reason") or ""))
        if op is control.Op.UNDRAIN:
            return await cluster.undrain(str(request.get("host")))
        result = await cluster.reload_inventory(
            request.get("inventory") or None, dry_run=bool(request.get("dry_run")), batch=int(request.get("batch") or 1)
        )
        # Not a dry run: applied, or nothing differed (the file's content is what runs either way).
        if not request.get("dry_run") and result.get("source"):
            # status and a later reload show (and read) the inventory now in use.
            self.options.inventory = self.state.inventory = str(result["source"])
            self.state.up_options = json.loads(self.options.to_json())
            # Refused hosts keep their old settings: the file is then not what is in effect.
            self.state.inventory_fingerprint = "" if result.get("refused") else _fingerprint_of(self.options)
            st.write_state(self.directory, self.state)
        return result


def _record_size(head: Head, **size: Any) -> None:
    """Record the size asked for by scale or adapt in ``state.json``, for 'up' again to compare."""
    for key, value in size.items():
        setattr(head.options, key, value)
    head.state.up_options = json.loads(head.options.to_json())
    try:
        st.write_state(head.directory, head.state)
    except OSError as exc:
        logger.warning("cannot record the new size in %s: %s", head.directory, exc)


async def _cluster_logs(cluster: SSHSpecCluster | None, name: str, target: str | None) -> dict[str, str]:
    """The logs of cluster ``name`` for ``logs [TARGET]``: all, one worker, a host's workers, or the scheduler."""
    if cluster is None:
        return {}
    logs = {str(k): str(v) for k, v in (await _awaitable(cluster.get_logs())).items()}
    if not target:
        return logs
    if target in logs:
        return {target: logs[target]}
    if target.lower() == "scheduler":
        return {k: v for k, v in logs.items() if k == "Scheduler"}
    workers = cluster.status_report()["workers"]
    members = [w["name"] for w in workers if w.get("host") == target]
    # Workers that died or were retired keep their logs; find them by their host too.
    members += [m for m, h in cluster.gone_member_hosts.items() if h == target and m not in members]
    known_hosts = set(cluster.worker_hosts) | {w.get("host") for w in workers}
    if target in known_hosts:
        return {m: logs.get(m, "") for m in members}
    raise UserError(
        f"cluster {name} has no worker or host named {target!r}; "
        f"workers: {', '.join(sorted(k for k in logs if k not in ('Cluster', 'Scheduler'))) or 'none'}; "
        f"hosts: {', '.join(sorted(h for h in known_hosts if h)) or 'none'}"
    )


def _fingerprint_of(options: UpOptions) -> str:
    """The fingerprint of the inventory file of ``options``; ``""`` when it cannot be read now."""
    from .inventory import load_inventory
    from .planning import inventory_fingerprint

    try:
        inv = load_inventory(options.inventory, scheduler_group=options.scheduler_group,
                             worker_group=options.worker_group)
    except Exception as exc:  # only a digest: 'up' again then reloads, which reports the error
        logger.info("cannot read %s for its fingerprint: %s", options.inventory, exc)
        return ""
    return inventory_fingerprint(inv)


async def _awaitable(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future) or hasattr(value, "__await__"):
        return await value
    return value
