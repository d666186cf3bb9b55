"""The children of the host agent: forking, watching, reaping and stopping its dask server processes.

Shipped as source like the other agent files (see ``agent_sources`` in
``agent/__init__.py``), it runs after ``child.py`` (the body of a forked
child) and before ``remote.py``, whose :class:`Agent` takes these methods
from :class:`ChildProcesses`; they use the agent's state (``children``,
``by_pid``, ``selector``, ``log_files``, ``send``). Standard library only.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # shipped, these are globals already: the other sources run first in the same namespace
    from .child import _run_child, _set_parent_death_signal
    from .host import _private_dir
    from .logs import LogFile, LogPipe, _tail_of, note_lock, widen_pipe


class Child:
    """One forked dask server process."""

    def __init__(self, name: str, pid: int, status_fd: int, log_path: str, log_pipe: LogPipe) -> None:
        self.name = name
        self.pid = pid
        self.status_fd = status_fd
        self.status_buf = b""
        self.log_path = log_path
        self.log_pipe = log_pipe
        self.exit_code: int | None = None
        self.kill_deadline: float | None = None
        self.stop_waiters: list[int] = []


class ChildProcesses:
    """The agent's methods that start, watch, reap and stop its children (mixed into ``Agent``)."""

    def start_child(self, request: dict[str, Any]) -> dict[str, Any]:
        name = str(request["name"])
        old = self.children.get(name)
        if old is not None and old.exit_code is None:
            return {"ok": False, "error": f"a process named {name} is already running"}
        log_path = os.path.join(self.log_dir, f"{_safe(name)}.log")
        log = self.log_files.get(log_path)
        if log is None:
            log = self.log_files[log_path] = LogFile(log_path, self.log_max_bytes)
        read_fd, write_fd = os.pipe()
        out_read, out_write = os.pipe()
        widen_pipe(out_write)
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.setpgid(0, 0)
                _set_parent_death_signal()
                if os.getppid() == 1:
                    os._exit(1)
                os.close(read_fd)
                os.close(out_read)
                self._close_in_child()
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out_write, 1)
                os.dup2(out_write, 2)
                for fd in (devnull, out_write):
                    os.close(fd)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                cwd = request.get("cwd") or self.dir
                os.chdir(_private_dir(cwd) if cwd.startswith(self.dir) else cwd)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                _run_child(request, write_fd, log_path, (self.cluster, str(self.config["host_label"])))
            finally:
                os._exit(1)
        os.close(write_fd)
        os.close(out_write)
        try:
            os.setpgid(pid, pid)  # also from the parent: no race with killpg
        except OSError:
            pass
        os.set_blocking(read_fd, False)
        os.set_blocking(out_read, False)
        pipe = LogPipe(out_read, log)
        self.log_pipes.add(pipe)
        child = Child(name, pid, read_fd, log_path, pipe)
        self.children[name] = child
        self.by_pid[pid] = child
        self.selector.register(read_fd, selectors.EVENT_READ, ("status", child))
        self.selector.register(out_read, selectors.EVENT_READ, ("log", pipe))
        return {"ok": True, "pid": pid, "log": log_path}

    def _close_in_child(self) -> None:
        """In a new child: close the agent's ends of the other children's pipes and files, and its leases.

        A lease lives while any fd of its file is open: one a worker kept would outlive the agent.
        """
        fds = [p.fd for p in self.log_pipes] + [f.fd for f in self.log_files.values()]
        fds += [c.status_fd for c in self.children.values()] + self.leases.fds()
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _pump(self, pipe: LogPipe, max_chunks: int = 1) -> None:
        """Move output of one pipe into its log; at EOF (every writer gone) close it."""
        try:
            open_ = pipe.drain(max_chunks)
        except OSError as exc:
            # The log cannot be written (disk, permissions): say so once, then drop
            # this log's output, still reading the pipe so that the child never blocks.
            self.send({"event": "error", "error": f"cannot write {pipe.log.path} ({exc}); its output is dropped"})
            pipe.log.close()
            open_ = True
        if open_:
            return
        self.selector.unregister(pipe.fd)
        pipe.close()
        self.log_pipes.discard(pipe)
        if pipe.log.users == 0:
            pipe.log.close()
            self.log_files.pop(pipe.log.path, None)

    def _flush_log(self, child: Child | None) -> None:
        """Everything ``child`` has written so far, into its log (before a tail is read)."""
        if child is not None and child.log_pipe.fd >= 0:
            self._pump(child.log_pipe, max_chunks=64)

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
            if message.get("event") == "scratch":  # the agent's own business: recorded, not sent
                self._note_scratch(message.get("path"))
                continue
            if message.get("event") == "failed":
                self._flush_log(child)
                message["tail"] = _tail_of(child.log_path)
            self.send(message)

    def _note_scratch(self, path: Any) -> None:
        """Record a child's scratch directory in the lock file, so that it goes when the cluster ends."""
        if not isinstance(path, str) or not os.path.isabs(path) or path in self.scratch:
            return
        self.scratch.append(path)
        if self.lock_fd >= 0:
            note_lock(self.lock_fd, {"retention": self.retention, "pid": os.getpid(), "scratch": self.scratch})

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
            self._flush_log(child)  # its last words are in the tail below
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


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"
