"""The host agent: one long-lived process per host and cluster.

This file is shipped as source over the SSH channel and run by the host's
python, so it may import only the standard library and ``distributed``.
It never imports anything from ``speccluster_ssh``. It is the last of the
agent's sources, which run in order in one namespace (``agent_sources`` in
``agent/__init__.py``): ``logs.py`` (capped log files), ``host.py`` (the
host's facts and directories), ``lease_records.py``, ``leases.py`` and
``lease_keeper.py`` (who holds what on the host, and this agent's leases),
``child.py`` (the body of a forked child), ``children.py`` (starting,
reaping and stopping the children), then this file (the agent's loop and
its requests); it uses their names as globals.

The head first sends one JSON line of agent config: ``cluster``,
``host_label``, ``silence``, ``base_dir``, ``listen_address``,
``log_max_bytes`` (cap of each log file), ``log_retention`` (seconds the
logs stay after the cluster ended, see ``logs.py``) and ``detect_gpus`` (run
``nvidia-smi -L`` for the hello). A config with ``read_logs`` only prints
the kept logs of ``cluster`` on this host (one ``kept_logs`` line) and exits.
With ``worker_class`` (an import path) and ``pythonpath`` (the host's
``PYTHONPATH`` in ``speccluster_env``) the agent imports that class before
its hello, which says ``worker_class_kind``, or ``worker_class_error``
(then the agent exits at once, having created nothing on the host).

Protocol (JSON, one object per line):

head -> agent
    ``{"op": "start", "id": 7, "name": "3", "role": "nanny", "scheduler": "tcp://..",
    "options": {...}, "env": {...}, "config": {...}, "host_vars": {...}}``
    (``config``: the head's dask config; ``host_vars``: the host's
    variables whose table row says ``request``, by field name, such as
    ``dask_config``, the host's ``speccluster_dask_config``, merged over it),
    ``{"op": "stop", "id": 8, "name": "3", "grace": 5}``,
    ``{"op": "tail", "id": 9, "name": "3", "bytes": 65536}``,
    ``{"op": "write_file", "id": 10, "path": "tls/ca.pem", "data_b64": "..", "mode": 384}``,
    ``{"op": "lease_claim", "id": 12, "record": {..}, "capacity": {..}}`` and
    ``lease_want``, ``lease_release``, ``lease_unwant``, ``lease_list`` (see
    ``lease_keeper.py``; every lease is released when the agent stops),
    ``{"op": "ping"}``, ``{"op": "shutdown", "id": 11, "remove": true, "grace": 0.5, "keep_tls": false}``
    (``keep_tls``: leave the host's TLS files, which a newer agent of the
    same cluster on the host uses; otherwise they are removed. The logs stay
    for their retention unless ``remove`` is true).
agent -> head
    ``{"event": "probe", "to_head": .., "port": .., "address": ..}`` first when the
    config asks for a reach probe (scheduler_reach auto),
    ``{"event": "hello", ...facts}`` once (facts include ``gpus``, the
    device ids ``nvidia-smi -L`` lists when asked, and ``error`` when the
    agent cannot work, e.g. its log directory is not writable, after which
    it exits), replies ``{"id": 7, "ok": true, ...}`` or
    ``{"id": 7, "ok": false, "error": ".."}``, and unsolicited events
    ``{"event": "ready", "name": .., "address": .., "worker_address": ..}``,
    ``{"event": "exited", "name": .., "code": .., "tail": ..}``, ``{"event": "pong"}``,
    ``{"event": "lease_warning", "warning": ..}`` (a bad file in the lease directory, once).

Logs: a child's stdout and stderr are one pipe that the agent reads without
blocking and appends to the child's log file, cut at ``log_max_bytes``
(``logs.py``); what a child wrote is in its log before its ``exited`` or
``failed`` event and before any ``tail`` reply.

Process tree: the agent is single threaded and runs no event loop, so it can
fork warm children safely. Each child is put in its own process group (so a
nanny and the worker it starts are signalled together) and gets a
parent-death signal, so killing the agent kills its children; a nanny's worker
already exits when the nanny's pipe closes. The agent kills every child when
its stdin closes (head gone), when the head is silent for ``silence`` seconds,
or when told to shut down.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import shutil
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # shipped, these are globals already: the other sources run first in the same namespace
    from .child import worker_class_facts
    from .children import Child, _drain
    from .lease_keeper import LeaseKeeper
    from .leases import LEASE_LOCK_TIMEOUT
    from .host import (
        _cpu_count, _detect_gpus, _distributed_version, _global_addresses, _hold_env, _listen_address, _private_dir,
        _probe_writable, _reach_probe, _total_memory,
    )
    from .logs import (
        DEFAULT_RETENTION, TAIL_BYTES, LogFile, LogPipe, _base_dir, _hold_lock, _kept_logs, _leave, _sweep, _tail_of,
    )

if __name__ == "speccluster_ssh.agent.remote":  # imported as a package module (tests, docs), not shipped
    from .children import ChildProcesses

MAX_OUTBUF = 16 * 1024 * 1024
MARKER_ENV = "SPECCLUSTER_SSH_CLUSTER"


class Agent(ChildProcesses):
    """The select loop that owns every child of one cluster on this host."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.silence = float(config.get("silence", 15.0))
        self.cluster = str(config["cluster"])
        self.log_max_bytes = int(config.get("log_max_bytes") or 64 * 2**20)
        base = _base_dir(config)
        self.setup_error = ""
        self.retention = float(config.get("log_retention", DEFAULT_RETENTION))
        self.lock_fd = -1
        try:
            self.root_dir = _private_dir(os.path.join(base, self.cluster))
            self.dir = _private_dir(os.path.join(self.root_dir, config["host_label"]))
            self.log_dir = _private_dir(os.path.join(self.dir, "logs"))
            _probe_writable(self.log_dir)
            self.lock_fd = _hold_lock(self.dir, self.retention)  # held until exit: this cluster is alive
            _sweep(base, self.cluster)  # ended clusters' keys, expired logs
        except OSError as exc:
            # Said in the hello, so the head gives one clear error instead of retrying a crash.
            where = getattr(exc, "filename", None) or base
            self.setup_error = f"cannot write the log directory under {base} ({where}: {exc.strerror or exc})"
            self.root_dir = self.dir = self.log_dir = ""
        self.log_files: dict[str, LogFile] = {}  # path -> its file, shared by processes of one name
        self.log_pipes: set[LogPipe] = set()
        self.children: dict[str, Child] = {}
        self.by_pid: dict[int, Child] = {}
        self.selector = selectors.DefaultSelector()
        self.inbuf = b""
        self.outbuf = bytearray()
        self.last_heard = time.monotonic()
        self.running = True
        self.shutdown_reply: int | None = None
        self.remove_dir = False
        self.keep_tls = False
        self.probe_listener: socket.socket | None = None  # see _reach_probe
        self.class_facts: dict[str, str] = {}  # see worker_class_facts, for the hello
        self.scratch: list[str] = []  # scratch directories of the children (their "scratch" events), see logs.py
        # speccluster_lease_dir; waiting for its lock blocks this loop, so less than the head's patience.
        self.leases = LeaseKeeper(self.cluster, config.get("lease_dir"), min(LEASE_LOCK_TIMEOUT, self.silence / 3))
        os.environ[MARKER_ENV] = self.cluster

    # -- output ---------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        if len(self.outbuf) > MAX_OUTBUF:
            # Nobody has read us for a long time: the head is gone.
            self.running = False
            return
        self.outbuf += (json.dumps(message) + "\n").encode()
        self._update_stdout_interest()

    def _update_stdout_interest(self) -> None:
        try:
            self.selector.modify(1, selectors.EVENT_WRITE) if self.outbuf else None
        except KeyError:
            if self.outbuf:
                self.selector.register(1, selectors.EVENT_WRITE)

    def _flush(self) -> None:
        try:
            written = os.write(1, self.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self.running = False
            return
        del self.outbuf[:written]
        if not self.outbuf:
            self.selector.unregister(1)

    # -- requests -------------------------------------------------------
    def handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        request_id = message.get("id")
        if self.probe_listener is not None and op != "ping":
            # The head connected to it before it read our hello; no child may inherit it.
            self.probe_listener.close()
            self.probe_listener = None
        try:
            if op == "ping":
                self.send({"event": "pong"})
                return
            if op == "start":
                reply = self.start_child(message)
            elif op == "stop":
                grace = float(message.get("grace", 5.0))
                if self.stop_child(str(message["name"]), grace, request_id):
                    return  # replied once it has exited
                reply = {"ok": True, "code": None}
            elif op == "tail":
                child = self.children.get(str(message["name"]))
                self._flush_log(child)
                path = child.log_path if child else ""
                reply = {"ok": True, "data": _tail_of(path, int(message.get("bytes", TAIL_BYTES)))}
            elif op == "logs":
                nbytes = int(message.get("bytes", TAIL_BYTES))
                for child in self.children.values():
                    self._flush_log(child)
                reply = {
                    "ok": True,
                    "logs": {n: _tail_of(c.log_path, nbytes) for n, c in self.children.items()},
                }
            elif op == "write_file":
                reply = self.write_file(message)
            elif str(op).startswith("lease_"):
                reply = self.leases.handle(str(op), message)
                for warning in self.leases.warnings.take():
                    self.send({"event": "lease_warning", "warning": warning})
            elif op == "processes":
                reply = {
                    "ok": True,
                    "processes": {
                        n: {"pid": c.pid, "exit_code": c.exit_code}
                        for n, c in self.children.items()
                    },
                }
            elif op == "shutdown":
                self.remove_dir = bool(message.get("remove", False))
                self.keep_tls = bool(message.get("keep_tls", False))
                if message.get("grace") is not None:
                    self.config["grace"] = float(message["grace"])
                self.shutdown_reply = request_id
                self.running = False
                return
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # a bad request must not kill the agent
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if request_id is not None:
            reply["id"] = request_id
            self.send(reply)

    def write_file(self, message: dict[str, Any]) -> dict[str, Any]:
        relative = os.path.normpath(str(message["path"]))
        if relative.startswith("..") or os.path.isabs(relative):
            return {"ok": False, "error": f"path must stay inside the cluster directory: {relative}"}
        target = os.path.join(self.dir, relative)
        _private_dir(os.path.dirname(target))
        mode = int(message.get("mode", 0o600))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(message["data_b64"]))
        os.chmod(target, mode)
        return {"ok": True, "path": target}

    def _on_stdin(self) -> None:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.running = False  # the head is gone
            self.selector.unregister(0)
            return
        self.last_heard = time.monotonic()
        self.inbuf += data
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                try:
                    message = json.loads(line)
                except ValueError:
                    self.send({"event": "error", "error": "unreadable request"})
                    continue
                self.handle(message)

    # -- main loop ------------------------------------------------------
    def run(self) -> None:
        # Before SIGCHLD has a handler: the probe's own child is reaped by subprocess.
        gpus = _detect_gpus() if self.config.get("detect_gpus") and not self.setup_error else {}
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # A TERM or HUP to the agent means the same as losing the head.
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGHUP, lambda *_: None)
        self.selector.register(wake_r, selectors.EVENT_READ, ("wake", None))
        os.set_blocking(0, False)
        os.set_blocking(1, False)
        self.selector.register(0, selectors.EVENT_READ, ("stdin", None))
        if self.setup_error:
            self.send({"event": "hello", "pid": os.getpid(), "hostname": socket.gethostname(), "error": self.setup_error})
            self._finish_output()
            return
        self.send(
            {
                "event": "hello",
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "python": sys.executable,
                "python_version": ".".join(map(str, sys.version_info[:3])),
                "distributed": _distributed_version(),
                "cpu_count": _cpu_count(),
                "memory": _total_memory(),
                "dir": self.dir,
                "listen_address": _listen_address(self.config),
                "addresses": _global_addresses(),
                "free_disk": shutil.disk_usage(self.dir).free,
                **gpus,
                **self.class_facts,
            }
        )
        term_seen = False
        while self.running:
            for key, _ in self.selector.select(timeout=0.25):
                kind = key.data[0] if key.data else "stdout"
                if kind == "stdin":
                    self._on_stdin()
                elif kind == "status":
                    self._on_status(key.data[1])
                elif kind == "log":
                    self._pump(key.data[1])
                elif kind == "wake":
                    drained = _drain(wake_r)
                    if signal.SIGTERM in drained or signal.SIGHUP in drained:
                        term_seen = True
                elif key.fd == 1:
                    self._flush()
            self._reap()
            self._enforce_deadlines()
            self.leases.tick(time.monotonic())
            if term_seen or time.monotonic() - self.last_heard > self.silence:
                self.running = False
        # Told to shut down: the scheduler is alive, so give servers time to
        # close cleanly. Head lost: they would only wait for a dead scheduler.
        if self.shutdown_reply is not None:
            grace = float(self.config.get("grace", 3.0))
        else:
            grace = float(self.config.get("lost_grace", 0.5))
        self.stop_all(grace=grace)

    def stop_all(self, grace: float) -> None:
        for name in list(self.children):
            self.stop_child(name, grace, None)
        deadline = time.monotonic() + grace + 5.0
        while self.by_pid and time.monotonic() < deadline:
            self._reap()
            self._enforce_deadlines()
            # Keep reading their output while they stop, or a chatty one would block on its pipe.
            for key, _ in self.selector.select(timeout=0.02):
                kind = key.data[0] if key.data else "stdout"
                if kind == "log":
                    self._pump(key.data[1])
                elif kind == "wake":
                    _drain(key.fd)
                elif kind == "stdin":
                    self.selector.unregister(0)  # stopping: no more requests are read
                elif key.fd == 1:
                    self._flush()
        for pipe in list(self.log_pipes):
            self._pump(pipe, max_chunks=64)
        self.leases.release_all()  # its processes have stopped: their capacity is free
        # Keys never outlive the cluster, the logs stay for a post-mortem (logs.py); a
        # restart's old agent leaves the keys to the new agent of the host (keep_tls).
        if self.dir:
            _leave(self.dir, self.root_dir, self.lock_fd, keep_tls=self.keep_tls, remove=self.remove_dir,
                   retention=self.retention, scratch=self.scratch)
        if self.shutdown_reply is not None:
            self.send({"id": self.shutdown_reply, "ok": True, "left": sorted(c.name for c in self.by_pid.values())})
        self._finish_output()

    def _finish_output(self) -> None:
        """Write what is left for the head, blocking: the agent is about to exit."""
        os.set_blocking(1, True)
        if self.outbuf:
            try:
                os.write(1, self.outbuf)
            except OSError:
                pass


def main(config: dict[str, Any]) -> None:
    """Import dask once, then serve requests until the head goes away (or, asked ``read_logs``, print the kept logs)."""
    if config.get("read_logs"):
        os.write(1, (json.dumps({"event": "kept_logs", **_kept_logs(config)}) + "\n").encode())
        return
    _hold_env(config)  # a shipped environment we run under is in use until we exit
    # Under scheduler_reach auto the head decides where the scheduler runs
    # from this, while the import below runs.
    listener = _reach_probe(config)
    # Import every server class now so that forked children start warm.
    import distributed.nanny  # noqa: F401
    import distributed.scheduler  # noqa: F401
    import distributed.worker  # noqa: F401
    import multiprocessing.synchronize  # noqa: F401  (a nanny's queues to its worker)

    import distributed.versions

    # Every worker sends these when it registers; cached here, each forked
    # child has them instead of scanning the installed packages again.
    distributed.versions.get_versions()
    # speccluster_worker_class, imported before any fork; a host without it only says why, and touches nothing.
    class_facts = worker_class_facts(config)
    if "worker_class_error" in class_facts:
        hello = {"event": "hello", "pid": os.getpid(), "python": sys.executable, **class_facts}
        os.write(1, (json.dumps(hello) + "\n").encode())
        return
    agent = Agent(config)
    agent.probe_listener = listener
    agent.class_facts = class_facts
    agent.run()
    os._exit(0)
