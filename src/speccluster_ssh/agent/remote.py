"""The host agent: one long-lived process per host and cluster.

This file is shipped as source over the SSH channel and run by the host's
python, so it may import only the standard library and ``distributed``.
It never imports anything from ``speccluster_ssh``.

Protocol (JSON, one object per line):

head -> agent
    ``{"op": "start", "id": 7, "name": "3", "role": "nanny", "scheduler": "tcp://..",
    "options": {...}, "env": {...}, "files": {...}}``,
    ``{"op": "stop", "id": 8, "name": "3", "grace": 5}``,
    ``{"op": "tail", "id": 9, "name": "3", "bytes": 65536}``,
    ``{"op": "write_file", "id": 10, "path": "tls/ca.pem", "data_b64": "..", "mode": 384}``,
    ``{"op": "ping"}``, ``{"op": "shutdown", "id": 11, "remove": true}``.
agent -> head
    ``{"event": "hello", ...facts}`` once, replies ``{"id": 7, "ok": true, ...}`` or
    ``{"id": 7, "ok": false, "error": ".."}``, and unsolicited events
    ``{"event": "ready", "name": .., "address": .., "worker_address": ..}``,
    ``{"event": "exited", "name": .., "code": .., "tail": ..}``, ``{"event": "pong"}``.

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
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import stat
import sys
import time
from typing import Any

PR_SET_PDEATHSIG = 1
TAIL_BYTES = 16384
MAX_OUTBUF = 16 * 1024 * 1024
MARKER_ENV = "SPECCLUSTER_SSH_CLUSTER"


def _set_parent_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _tail_of(path: str, nbytes: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _private_dir(path: str) -> str:
    """Create ``path`` (and parents) as a directory only we can enter.

    Every existing component must be owned by root or by us: a directory or
    symlink that another user planted in a shared place such as ``/tmp`` is
    refused instead of followed.
    """
    path = os.path.abspath(path)
    uid = os.getuid()
    current = os.sep
    for part in path.split(os.sep)[1:]:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o700)
            st = os.lstat(current)
        if st.st_uid not in (0, uid):
            raise PermissionError(f"{current} belongs to uid {st.st_uid}; refusing to use it")
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a plain directory; refusing to use it")
    os.chmod(path, 0o700)
    return path


def _run_child(request: dict[str, Any], status_fd: int, log_path: str) -> None:
    """Body of a forked child: run one dask server until it finishes."""
    import asyncio

    import dask

    os.environ.update(request.get("env") or {})
    dask.config.refresh()
    if request.get("config"):
        dask.config.update(dask.config.config, request["config"], priority="new")
    # The nanny forks its worker from this warm process instead of spawning.
    dask.config.set({"distributed.worker.multiprocessing-method": "fork"})

    from distributed import Nanny, Scheduler, Worker
    from distributed.security import Security

    role = request["role"]
    options = dict(request.get("options") or {})
    tls = options.pop("security", None)
    if tls:
        options["security"] = Security(**tls)

    def report(message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            os.write(status_fd, data)
        except OSError:
            pass

    async def serve() -> None:
        if role == "scheduler":
            server = Scheduler(**options)
        elif role == "nanny":
            server = Nanny(request["scheduler"], **options)
        else:
            server = Worker(request["scheduler"], **options)
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task[Any]] = []

        def on_term() -> None:
            if not stopping:
                stopping.append(asyncio.ensure_future(server.close()))

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_term)
        # A nanny forks its worker from here; without this the worker would
        # inherit the handlers' wakeup fd, and the SIGTERM of a memory-limit
        # restart would close the nanny instead of only its worker.
        os.register_at_fork(after_in_child=_default_signals_in_child)
        await server
        ready: dict[str, Any] = {
            "event": "ready",
            "name": request["name"],
            "address": server.address,
            "pid": os.getpid(),
        }
        if role == "nanny":
            ready["worker_address"] = server.worker_address
        elif role == "worker":
            ready["worker_address"] = server.address
        else:
            http_server = getattr(server, "http_server", None)
            ready["dashboard_port"] = getattr(http_server, "port", None)
        report(ready)
        await server.finished()

    try:
        asyncio.run(serve())
    except BaseException as exc:  # report every start failure before dying
        import traceback

        traceback.print_exc()
        report({"event": "failed", "name": request["name"], "pid": os.getpid(), "error": _describe_failure(exc)})
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _default_signals_in_child() -> None:
    """In a process forked by a server: take back the signal handling it inherited."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # not the main thread: nothing was inherited there
        pass


def _describe_failure(exc: BaseException) -> str:
    """One line for a start failure: the outer error and its root cause.

    dask wraps the real cause ("name taken", "could not connect") in
    ``RuntimeError('Nanny failed to start.')``; the chain keeps it.
    """
    chain: list[BaseException] = [exc]
    seen = {id(exc)}
    current = exc
    for _ in range(20):  # bounded: a chain is short, but may loop
        following = current.__cause__ or current.__context__
        if following is None or id(following) in seen:
            break
        seen.add(id(following))
        chain.append(following)
        current = following
    outer, root = chain[0], chain[-1]
    text = f"{type(outer).__name__}: {outer}"
    if root is not outer:
        text += f" caused by {type(root).__name__}: {root}"
    return " ".join(text.split())[:2000]


class Child:
    """One forked dask server process."""

    def __init__(self, name: str, pid: int, status_fd: int, log_path: str) -> None:
        self.name = name
        self.pid = pid
        self.status_fd = status_fd
        self.status_buf = b""
        self.log_path = log_path
        self.exit_code: int | None = None
        self.kill_deadline: float | None = None
        self.stop_waiters: list[int] = []


class Agent:
    """The select loop that owns every child of one cluster on this host."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.silence = float(config.get("silence", 15.0))
        self.cluster = str(config["cluster"])
        base = os.path.expanduser(config.get("base_dir") or "~/.cache/speccluster-ssh")
        self.root_dir = _private_dir(os.path.join(base, self.cluster))
        self.dir = _private_dir(os.path.join(self.root_dir, config["host_label"]))
        self.log_dir = _private_dir(os.path.join(self.dir, "logs"))
        self.children: dict[str, Child] = {}
        self.by_pid: dict[int, Child] = {}
        self.selector = selectors.DefaultSelector()
        self.inbuf = b""
        self.outbuf = bytearray()
        self.last_heard = time.monotonic()
        self.running = True
        self.shutdown_reply: int | None = None
        self.remove_dir = False
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

    # -- children -------------------------------------------------------
    def start_child(self, request: dict[str, Any]) -> dict[str, Any]:
        name = str(request["name"])
        old = self.children.get(name)
        if old is not None and old.exit_code is None:
            return {"ok": False, "error": f"a process named {name} is already running"}
        log_path = os.path.join(self.log_dir, f"{_safe(name)}.log")
        read_fd, write_fd = os.pipe()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.setpgid(0, 0)
                _set_parent_death_signal()
                if os.getppid() == 1:
                    os._exit(1)
                os.close(read_fd)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                for fd in (devnull, log_fd):
                    os.close(fd)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                cwd = request.get("cwd") or self.dir
                os.chdir(_private_dir(cwd) if cwd.startswith(self.dir) else cwd)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                _run_child(request, write_fd, log_path)
            finally:
                os._exit(1)
        os.close(write_fd)
        os.close(log_fd)
        try:
            os.setpgid(pid, pid)  # also from the parent: no race with killpg
        except OSError:
            pass
        os.set_blocking(read_fd, False)
        child = Child(name, pid, read_fd, log_path)
        self.children[name] = child
        self.by_pid[pid] = child
        self.selector.register(read_fd, selectors.EVENT_READ, ("status", child))
        return {"ok": True, "pid": pid, "log": log_path}

    def _on_status(self, child: Child) -> None:
        try:
            data = os.read(child.status_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(child.status_fd)
            os.close(child.status_fd)
            child.status_fd = -1
            return
        child.status_buf += data
        while b"\n" in child.status_buf:
            line, child.status_buf = child.status_buf.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "failed":
                message["tail"] = _tail_of(child.log_path)
            self.send(message)

    def _reap(self) -> None:
        for _ in range(10000):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.by_pid.pop(pid, None)
            if child is None:
                continue
            child.exit_code = os.waitstatus_to_exitcode(status)
            if child.status_fd >= 0:
                self._on_status(child)  # deliver a last "ready"/"failed" first
            self.send(
                {
                    "event": "exited",
                    "name": child.name,
                    "pid": pid,
                    "code": child.exit_code,
                    "tail": _tail_of(child.log_path, 4096),
                }
            )
            for request_id in child.stop_waiters:
                self.send({"id": request_id, "ok": True, "code": child.exit_code})
            child.stop_waiters.clear()

    def stop_child(self, name: str, grace: float, request_id: int | None) -> bool:
        """Send SIGTERM now and SIGKILL after ``grace``; reply once it exited."""
        child = self.children.get(name)
        if child is None or child.exit_code is not None:
            return False
        if request_id is not None:
            child.stop_waiters.append(request_id)
        _killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        if child.kill_deadline is None or deadline < child.kill_deadline:
            child.kill_deadline = deadline
        return True

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for child in self.by_pid.values():
            if child.kill_deadline is not None and now >= child.kill_deadline:
                _killpg(child.pid, signal.SIGKILL)
                child.kill_deadline = now + 1.0

    # -- requests -------------------------------------------------------
    def handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        request_id = message.get("id")
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
                path = child.log_path if child else ""
                reply = {"ok": True, "data": _tail_of(path, int(message.get("bytes", TAIL_BYTES)))}
            elif op == "logs":
                nbytes = int(message.get("bytes", TAIL_BYTES))
                reply = {
                    "ok": True,
                    "logs": {n: _tail_of(c.log_path, nbytes) for n, c in self.children.items()},
                }
            elif op == "write_file":
                reply = self.write_file(message)
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
                "free_disk": shutil.disk_usage(self.dir).free,
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
                elif kind == "wake":
                    drained = _drain(wake_r)
                    if signal.SIGTERM in drained or signal.SIGHUP in drained:
                        term_seen = True
                elif key.fd == 1:
                    self._flush()
            self._reap()
            self._enforce_deadlines()
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
            time.sleep(0.02)
        # Keys never outlive the cluster, even when the logs stay for a post-mortem.
        shutil.rmtree(os.path.join(self.dir, "tls"), ignore_errors=True)
        if self.remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            try:
                os.rmdir(self.root_dir)  # only when no other host of the cluster uses it
            except OSError:
                pass
        if self.shutdown_reply is not None:
            self.send({"id": self.shutdown_reply, "ok": True, "left": sorted(c.name for c in self.by_pid.values())})
        os.set_blocking(1, True)
        if self.outbuf:
            try:
                os.write(1, self.outbuf)
            except OSError:
                pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass


def _drain(fd: int) -> bytes:
    out = b""
    for _ in range(1000):
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            break
        if not chunk:
            break
        out += chunk
    return out


def _listen_address(config: dict[str, Any]) -> str | None:
    """The address of this host that faces the head: the server end of our SSH link."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    if len(fields) == 4:
        return fields[2]
    return config.get("listen_address")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def _distributed_version() -> str:
    import distributed

    return str(distributed.__version__)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def main(config: dict[str, Any]) -> None:
    """Import dask once, then serve requests until the head goes away."""
    # Import every server class now so that forked children start warm.
    import distributed.nanny  # noqa: F401
    import distributed.scheduler  # noqa: F401
    import distributed.worker  # noqa: F401

    Agent(config).run()
    os._exit(0)
