"""The head process of one benchmark session, run as ``python -m bench.driver CONFIG``.

Each session runs in a process of its own so that its RSS, CPU time and
TCP connections belong to one cluster alone, and so that the bench can
SIGKILL it to simulate a head crash. The parent (:mod:`bench.run`) sends
commands as JSON lines on stdin; the driver answers with JSON lines on
stdout, each prefixed with :data:`MARK` so that stray output cannot be
mistaken for an answer. Times are ``time.monotonic()`` values, which on
Linux share one clock across processes, so the parent can subtract them
from its own.

Tools
-----
``ours``
    :class:`speccluster_ssh.SSHSpecCluster` from an inventory file.
``dask``
    ``distributed.deploy.ssh.SSHCluster``; its scheduler runs over SSH on
    the first host given.
``ours`` with ``leases: false``
    The same, with each entry's lease claim skipped (the bench's ``nolease``
    tool): :meth:`RemoteProcess._claim_lease` is replaced by a no-op in this
    process only, since the product has no switch for it. Only to compare
    start-ups with and without the claim.
``plain``
    One ``ssh host python -m distributed.cli.dask_worker ADDRESS`` against a
    scheduler in this process, as a reference for a single worker start.
``floor``
    One ``python -c "import distributed"`` per host, all at once, each over
    the same kind of SSH connection as ours (speccluster-ssh's own
    ``HostConnection`` from the same inventory): the part of a start-up that
    no deployer can avoid on these hosts.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import psutil

MARK = "@@bench "
POLL = 0.025  # seconds between looks at the scheduler; small next to what is measured


def emit(message: dict[str, Any]) -> None:
    """Send one answer to the parent."""
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def head_cost() -> dict[str, Any]:
    """RSS, CPU seconds, threads and SSH connections per host of this process."""
    proc = psutil.Process()
    times = proc.cpu_times()
    ssh: Counter[str] = Counter()
    for conn in proc.net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == 22 and conn.status == psutil.CONN_ESTABLISHED:
            ssh[conn.raddr.ip] += 1
    return {
        "rss": proc.memory_info().rss,
        "cpu": times.user + times.system,
        "threads": proc.num_threads(),
        "ssh": dict(ssh),
    }


def wait_until(check: Any, cap: float, interval: float = POLL) -> float | None:
    """Poll ``check()`` until it is true; the monotonic time then, or ``None`` after ``cap`` s."""
    deadline = time.monotonic() + cap
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class Session:
    """One cluster of one tool, driven by the parent's commands.

    Parameters
    ----------
    config
        ``tool``, ``hosts`` (worker host addresses), ``sched_host`` (dask only),
        ``inventory`` (ours only), ``known_hosts``, ``client_key``, ``entries``
        (hosts used), ``nworkers`` (workers per host), ``security`` (ours),
        ``python`` and ``cap`` (start-up cap in seconds).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.tool = config["tool"]
        self.cluster: Any = None
        # Import both tools' modules before any clock starts: the bench
        # measures starting a cluster, not importing Python packages.
        import asyncssh  # noqa: F401
        import distributed  # noqa: F401
        from distributed.deploy.ssh import SSHCluster  # noqa: F401

        from speccluster_ssh import SSHSpecCluster  # noqa: F401

        # Ours: when each entry's lease claim begins, and when each release returned.
        self.releases: list[dict[str, Any]] = []
        if self.tool == "ours":
            instrument_leases(self.releases, claim=config.get("leases", True))

    # -- helpers --------------------------------------------------------
    def registered(self) -> dict[str, str]:
        """Registered workers as the scheduler lists them: address -> name."""
        info = self.cluster.sync(self.cluster.scheduler_comm.identity)
        return {addr: str(w.get("name")) for addr, w in info.get("workers", {}).items()}

    def _make(self) -> Any:
        c = self.config
        if self.tool == "ours":
            from speccluster_ssh import SSHSpecCluster

            return SSHSpecCluster.from_inventory(
                c["inventory"],
                known_hosts=c["known_hosts"],
                n_workers=c["entries"],
                security=c["security"],
                heal=c.get("heal", True),
                # Bastion cases: ProxyJump lines for the private hosts.
                **({"ssh_config": [c["ssh_config"]]} if c.get("ssh_config") else {}),
                **({"start_timeout": c["start_timeout"]} if c.get("start_timeout") else {}),
                # Release cases: the waiting cluster starts with what is free (0 allowed) and waits.
                **({"min_workers": c["min_workers"]} if c.get("min_workers") is not None else {}),
                **({"name": c["name"]} if c.get("name") else {}),
                scheduler_options={"dashboard_address": ":0"},
                # BENCH_LOG=1 keeps the cluster's logs (in the session's .log file).
                **({"silence_logs": False} if os.environ.get("BENCH_LOG") else {}),
            )
        from distributed.deploy.ssh import SSHCluster

        return SSHCluster(
            hosts=[c["sched_host"], *c["hosts"][: c["entries"]]],
            connect_options={"known_hosts": c["known_hosts"], "client_keys": [c["client_key"]], "username": "root"},
            worker_options={"nthreads": 1, "n_workers": c["nworkers"]},
            scheduler_options={"port": 0, "dashboard_address": ":0"},
            remote_python=c["python"],
        )

    def _pids(self) -> dict[str, dict[str, int]]:
        """Ours only: spec key -> member -> pid of the nanny on its host."""
        if self.tool != "ours":
            return {}
        return {str(k): dict(getattr(w, "pids", {})) for k, w in self.cluster.workers.items()}

    def _entry_hosts(self) -> dict[str, str]:
        """Spec key -> host (inventory name for ours, address for dask)."""
        out = {}
        for key, spec in self.cluster.worker_spec.items():
            opts = spec.get("options", {})
            out[str(key)] = str(opts.get("host") or opts.get("address"))
        return out

    def wanted(self) -> int:
        """Ours only: dask workers the spec asks for (group entries count each member)."""
        return sum(len(spec.get("group") or [None]) for spec in self.cluster.worker_spec.values())

    def settle(self, cap: float = 30.0) -> bool:
        """Ours only: wait until the cluster's own view matches its spec (not timed).

        The scheduler can list a new worker a moment before the cluster
        records the entry's pids; the next command must see both.
        """
        if self.tool != "ours":
            return True

        def settled() -> bool:
            spec, procs = self.cluster.worker_spec, self.cluster.workers
            if set(map(str, spec)) != set(map(str, procs)):
                return False
            members = sum(len(getattr(w, "pids", {})) for w in procs.values())
            return members == self.wanted() == len(self.registered())

        return wait_until(settled, cap) is not None

    # -- commands -------------------------------------------------------
    def start(self) -> None:
        # A cluster that starts to wait (min_workers 0) is started once its constructor returned.
        want = self.config.get("await_workers", self.config["entries"] * self.config["nworkers"])
        before = head_cost()
        from speccluster_ssh import timeline

        # Ours stamps its phases (SSH connect, agent ready, ...) into this.
        recorder = timeline.start() if self.tool == "ours" else None
        t0 = time.monotonic()
        try:
            self.cluster = self._make()
        except Exception as exc:
            timeline.stop()
            emit({"event": "start_failed", "t0": t0, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            return
        t_ctor = time.monotonic()
        t_reg = wait_until(lambda: len(self.registered()) >= want, self.config["cap"])
        after = head_cost()
        timeline.stop()
        emit(
            {
                "event": "started",
                "ok": t_reg is not None,
                "t0": t0,
                "t_ctor": t_ctor,
                "t_reg": t_reg,
                "startup": None if t_reg is None else t_reg - t0,
                "workers": len(self.registered()),
                "want": want,
                "before": before,
                "after": after,
                "pids": self._pids(),
                "entry_hosts": self._entry_hosts(),
                "timeline": recorder.as_list() if recorder is not None else None,
                "env": self._env_stats(),
            }
        )

    def _env_stats(self) -> dict[str, Any] | None:
        """Ours with ``speccluster_environment: head``: what the environments cost (issue 24), else None."""
        pool = getattr(self.cluster, "pool", None) if self.tool == "ours" else None
        wheelhouses = getattr(pool, "wheelhouses", None)
        if wheelhouses is None or not wheelhouses.stats.ready:
            return None
        stats, fanout = wheelhouses.stats, getattr(pool, "fanout", None)
        sizes = getattr(fanout, "sizes", {}) or {}
        return {
            "head_bytes": stats.bytes_shipped,
            "shipped_to": sorted(stats.shipped),
            "builds": stats.builds,
            "ready": len(stats.ready),
            "peer_bytes": sum(getattr(fanout, "peer_bytes", {}).values()),
            "wheelhouse_bytes": max(sizes.values()) if sizes else None,
        }

    def healer_passes(self) -> int | None:
        """Ours only: healing passes made so far (``None`` for other tools)."""
        healer = getattr(self.cluster, "healer", None)
        return getattr(healer, "passes", None)

    def cost(self, idle: float, settle: float) -> dict[str, Any]:
        """Head cost now, and CPU used over ``idle`` seconds after ``settle`` seconds of quiet."""
        first = head_cost()
        time.sleep(settle)  # let the start-up's last messages pass
        settled = head_cost()
        passes_settled = self.healer_passes()
        time.sleep(idle)  # a fixed window: nothing happens, that is what is measured
        second = head_cost()
        return {
            "event": "cost", "now": first, "settled": settled, "idle": idle, "after_idle": second,
            "passes_settled": passes_settled, "passes_after": self.healer_passes(),
        }

    def scale_up(self, k: int, cap: float) -> dict[str, Any]:
        n = len(self.registered())
        if not getattr(self.cluster, "_supports_scaling", True):
            # SSHCluster builds its SpecCluster without a worker template:
            # scale() would add an empty spec entry that then fails to start
            # and breaks later reconciling, so it is not called at all.
            return {
                "event": "scaled_up",
                "supported": False,
                "error": "SpecCluster without a worker template (new_spec is empty)",
            }
        t0 = time.monotonic()
        self.cluster.scale(n + k)
        done = wait_until(lambda: len(self.registered()) >= n + k, cap)
        return {
            "event": "scaled_up",
            "supported": True,
            "ok": done is not None,
            "seconds": None if done is None else done - t0,
            "workers": len(self.registered()),
            "settled": self.settle(),
        }

    def scale_down(self, k: int) -> dict[str, Any]:
        n = len(self.registered())
        keys = set(map(str, self.cluster.worker_spec))
        pids = self._pids()
        hosts = self._entry_hosts()
        t0 = time.monotonic()
        if self.tool == "ours":
            self.cluster.scale(n - k)
        else:
            # SSHCluster's spec entries are whole hosts of ``nworkers`` each.
            entries = len(self.cluster.worker_spec) - max(1, k // self.config["nworkers"])
            self.cluster.scale(entries)
        removed = sorted(keys - set(map(str, self.cluster.worker_spec)))
        return {
            "event": "scaled_down",
            "t0": t0,
            "removed": removed,
            "pids": [pid for key in removed for pid in pids.get(key, {}).values()],
            "hosts": [hosts[key] for key in removed],
            "target": n - k,
        }

    def victim(self) -> dict[str, Any]:
        """A worker to SIGKILL: its nanny's pid (ours) or the host it runs on (dask)."""
        if not self.settle():
            return {"event": "victim", "pid": None, "error": "the cluster did not settle"}
        workers = self.registered()
        if self.tool == "ours":
            by_name = {name: addr for addr, name in workers.items()}
            pids = self._pids()
            # Only entries still wanted: one being scaled away is no victim.
            for key in map(str, self.cluster.worker_spec):
                for member, pid in pids.get(key, {}).items():
                    if member in by_name:
                        host = self._entry_hosts()[key]
                        return {"event": "victim", "pid": pid, "gone": [by_name[member]], "host": host, "n": len(workers)}
            return {"event": "victim", "pid": None}
        host = self._entry_hosts()[sorted(self._entry_hosts())[0]]
        gone = [a for a in workers if a.split("://")[-1].rsplit(":", 1)[0] == host]
        return {"event": "victim", "pid": None, "gone": gone, "host": host, "n": len(workers)}

    def await_replacement(self, gone: list[str], n: int, cap: float) -> dict[str, Any]:
        """Wait until the scheduler lists ``n`` workers again, none of them at ``gone``."""
        noticed: list[float] = []

        def check() -> bool:
            workers = self.registered()
            if not noticed and not set(gone) & set(workers):
                noticed.append(time.monotonic())
            return len(workers) >= n and not set(gone) & set(workers)

        done = wait_until(check, cap)
        return {
            "event": "replaced",
            "ok": done is not None,
            "t_done": done,
            "t_noticed": noticed[0] if noticed else None,
            "workers": len(self.registered()),
        }

    def await_first(self, n: int, cap: float) -> dict[str, Any]:
        """Wait until the scheduler lists ``n`` workers; the time then, and ours' timeline meanwhile."""
        from speccluster_ssh import timeline

        recorder = timeline.start()
        try:
            done = wait_until(lambda: len(self.registered()) >= n, cap)
        finally:
            timeline.stop()
        return {
            "event": "first",
            "ok": done is not None,
            "t_first": done,
            "workers": len(self.registered()),
            "timeline": recorder.as_list(),
        }

    def close(self) -> None:
        emit({"event": "closing", "t": time.monotonic()})
        error = ""
        try:
            self.cluster.close()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        emit({"event": "closed", "t": time.monotonic(), "error": error})

    def serve(self) -> None:
        """Answer the parent's commands until ``close`` or the end of stdin."""
        self.start()
        if self.cluster is None:
            return
        for _ in range(1000):  # a session takes a handful of commands
            line = sys.stdin.readline()
            if not line:
                break
            cmd = json.loads(line)
            op = cmd.get("cmd")
            if op == "close":
                break
            try:
                if op == "cost":
                    emit(self.cost(float(cmd.get("idle", 0)), float(cmd.get("settle", 0))))
                elif op == "scale_up":
                    emit(self.scale_up(int(cmd["k"]), float(cmd["cap"])))
                elif op == "scale_down":
                    emit(self.scale_down(int(cmd["k"])))
                elif op == "victim":
                    emit(self.victim())
                elif op == "await_replacement":
                    emit(self.await_replacement(list(cmd["gone"]), int(cmd["n"]), float(cmd["cap"])))
                elif op == "await_first":
                    emit(self.await_first(int(cmd["n"]), float(cmd["cap"])))
                elif op == "released":
                    emit({"event": "released", "releases": list(self.releases)})
                elif op == "registered":
                    emit({"event": "registered", "workers": self.registered()})
                else:
                    emit({"event": "error", "error": f"unknown command {op!r}"})
            except Exception as exc:
                emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        self.close()


def instrument_leases(releases: list[dict[str, Any]], claim: bool = True) -> None:
    """Measure ours' leases from this head process, without changing what the product does.

    Each entry's claim stamps ``lease_claim`` in the active timeline as it
    begins (the product stamps ``lease_claimed`` when it is granted), and
    each release appends its host, entry and monotonic begin/end times to
    ``releases``. ``claim=False`` skips the claims altogether (the bench's
    ``nolease`` comparison): an entry without a lease releases nothing.
    """
    from speccluster_ssh import process, timeline

    claim_entry, release_entry = process.claim_entry, process.release_entry

    async def timed_claim(pool: Any, agent: Any, entry: str, gpus: int = 0) -> Any:
        timeline.stamp("lease_claim", agent.host.name, entry)
        return await claim_entry(pool, agent, entry, gpus)

    async def timed_release(pool: Any, host: str, entry: str) -> None:
        t_begin = time.monotonic()
        await release_entry(pool, host, entry)
        releases.append({"host": host, "entry": entry, "t_begin": t_begin, "t_end": time.monotonic()})

    async def no_claim(self: Any, pool: Any, agent: Any) -> None:
        return None

    process.claim_entry = timed_claim  # type: ignore[assignment]
    process.release_entry = timed_release  # type: ignore[assignment]
    if not claim:
        process.RemoteProcess._claim_lease = no_claim  # type: ignore[method-assign]


async def plain_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Start one nanny worker with the ``ssh`` client against a scheduler here."""
    from distributed import Scheduler

    scheduler = Scheduler(host=config["head_ip"], port=0, dashboard=False)
    await scheduler
    argv = [
        "ssh", "-F", "/dev/null", "-i", config["client_key"],
        "-o", f"UserKnownHostsFile={config['known_hosts']}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        f"root@{config['hosts'][0]}",
        config["python"], "-m", "distributed.cli.dask_worker", scheduler.address, "--nthreads", "1",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    t_reg = None
    deadline = t0 + float(config["cap"])
    while time.monotonic() < deadline and proc.returncode is None:
        if scheduler.workers:
            t_reg = time.monotonic()
            break
        await asyncio.sleep(0.01)
    # The scheduler tells its workers (and their nanny) to close as it closes.
    await scheduler.close()
    error = ""
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except (asyncio.TimeoutError, TimeoutError):
        proc.kill()  # our own child, by its pid
        await proc.wait()
        error = "ssh did not exit after the scheduler closed"
    if t_reg is None and proc.stderr is not None:
        error = (await proc.stderr.read()).decode(errors="replace")[-2000:]
    return {"event": "plain", "ok": t_reg is not None, "t0": t0, "startup": None if t_reg is None else t_reg - t0, "error": error}


async def floor(config: dict[str, Any]) -> dict[str, Any]:
    """``python -c "import distributed"`` on each of ``entries`` hosts at once, over our own SSH connections.

    Timed from before the connections open until the last import returned,
    as a start-up is timed from before the constructor.
    """
    from speccluster_ssh.connection import ConnectSettings, HostConnection
    from speccluster_ssh.inventory import load_inventory

    inventory = load_inventory(config["inventory"])
    hosts = list(inventory.worker_hosts)[: config["entries"]]
    settings = ConnectSettings(known_hosts=config["known_hosts"])
    connections = [HostConnection(h, settings) for h in hosts]
    done: dict[str, float] = {}

    async def one(conn: HostConnection) -> None:
        await conn.open()
        status, _, err = await conn.run([conn.host.python, "-c", "import distributed"], timeout=config["cap"])
        if status != 0:
            raise RuntimeError(f"{conn.host.name}: exit {status}: {err.decode(errors='replace')[-300:]}")
        done[conn.host.name] = time.monotonic()

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(c) for c in connections), return_exceptions=True)
    t_end = time.monotonic()
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return {
        "event": "floor",
        "ok": not errors,
        "t0": t0,
        "startup": None if errors else t_end - t0,
        "per_host": {name: t - t0 for name, t in done.items()},
        "error": "; ".join(errors)[:2000],
    }


def main(argv: list[str]) -> int:
    """Run one session described by the JSON in ``argv[1]``."""
    config = json.loads(argv[1])
    if os.environ.get("BENCH_LOG"):
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if config["tool"] == "plain":
        emit(asyncio.run(plain_worker(config)))
        return 0
    if config["tool"] == "floor":
        emit(asyncio.run(floor(config)))
        return 0
    Session(config).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
