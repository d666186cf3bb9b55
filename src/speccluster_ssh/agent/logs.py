"""Bounded log files of the host agent, and how long they live: the first of the agent's shipped sources.

The agent ships as a few sources run in one namespace, this one first (see
``agent_sources`` in ``agent/__init__.py``): so this file, like
``remote.py``, may import only the standard library and never imports
anything of ``speccluster_ssh``. It is a file of its own because the log
pump is a unit with its own rules, and ``remote.py`` would otherwise pass
the size limit of a module. The head imports it too, for
:func:`sweep_action` and :data:`DEFAULT_RETENTION`.

A child's stdout and stderr are one pipe; the agent reads it without
blocking, in chunks of at most :data:`LOG_CHUNK` bytes, and appends to the
child's :class:`LogFile`. A file that would pass its cap is cut: it is
rewritten with a line saying so and the newest half of the cap (from a
line start), then the chunk is appended; a file is never larger than its
cap. The cut file replaces the old one by rename, so a reader sees the old
file or the new one, never half of one; the newest part, which every tail
reads, is the same text before and after the cut.

Logs live in ``<base>/<cluster>/<host label>/logs/`` (``<base>``: the
``base_dir`` the head gives, else ``$XDG_CACHE_HOME/speccluster-ssh``, else
``~/.cache/speccluster-ssh``) and outlive their agent: its end removes the
TLS keys only, and any later agent start removes them once the cluster's
retention has passed (see the section below).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterable
from typing import Any

TAIL_BYTES = 16384
LOG_CHUNK = 65536
# The largest pipe buffer asked for (F_SETPIPE_SZ), so a burst of output does not block the child.
PIPE_BUFFER = 1 << 20
_F_SETPIPE_SZ = 1031
_CUT_LINE = "[speccluster-ssh: older output cut here to keep this log under {cap} bytes]\n"


def _tail_of(path: str, nbytes: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def widen_pipe(fd: int) -> None:
    """Ask for a larger buffer on pipe ``fd`` (Linux only; best effort)."""
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BUFFER)
    except (ImportError, OSError):
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    for _ in range(10000):  # bounded: a regular file takes a chunk in very few writes
        if not view:
            return
        written = os.write(fd, view)
        view = view[written:]


def kept_part(old: bytes, data: bytes, cap: int) -> bytes:
    """What a cut log holds: a line saying so, then the newest half of the cap from a line start.

    Parameters
    ----------
    old
        The newest part of the file (at least half the cap when there is that much).
    data
        The chunk being appended.
    cap
        The file's cap in bytes.
    """
    marker = _CUT_LINE.format(cap=cap).encode()
    keep = max(cap // 2 - len(marker), 1)
    newest = (old + data)[-keep:]
    newline = newest.find(b"\n", 0, 4096)
    if 0 <= newline < len(newest) - 1:
        newest = newest[newline + 1:]
    return marker + newest


class LogFile:
    """One process's log file, capped at ``cap`` bytes; shared by the processes of one name.

    Parameters
    ----------
    path
        The file; created (mode 600) if missing, appended to otherwise.
    cap
        Its largest size in bytes; at least 4 KiB here (the inventory asks
        for 64 KiB, so that a cut keeps a useful tail).
    """

    def __init__(self, path: str, cap: int) -> None:
        self.path = path
        self.cap = max(int(cap), 4096)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.users = 0  # pipes still writing here
        self.cuts = 0

    def write(self, data: bytes) -> None:
        """Append ``data``, cutting the file first if it would pass its cap."""
        if self.fd < 0 or not data:
            return
        if self.size + len(data) > self.cap:
            self._cut(data)
            return
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return  # a full disk loses log lines, never the agent
        self.size += len(data)

    def _cut(self, data: bytes) -> None:
        keep = self.cap // 2
        with open(self.path, "rb") as f:
            f.seek(max(0, self.size - keep))
            old = f.read(keep)
        content = kept_part(old, data, self.cap)
        temporary = self.path + ".cut"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                _write_all(fd, content)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError:
            # Most likely a full disk: leave no half copy behind to make it fuller.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        old_fd, self.fd = self.fd, -1  # never closed twice, even if the reopen fails
        os.close(old_fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = len(content)
        self.cuts += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LogPipe:
    """The read end of one child's output pipe, feeding its :class:`LogFile`."""

    def __init__(self, fd: int, log: LogFile) -> None:
        self.fd = fd
        self.log = log
        log.users += 1

    def drain(self, max_chunks: int = 64) -> bool:
        """Move what the pipe holds now (at most ``max_chunks`` chunks); False at EOF."""
        for _ in range(max_chunks):
            try:
                data = os.read(self.fd, LOG_CHUNK)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return False
            if not data:
                return False
            self.log.write(data)
        return True

    def close(self) -> Any:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.log.users -= 1


# -- where logs live, and for how long ------------------------------------------------
#
# <base>/<cluster>/<host label>/ holds one agent's logs/ and tls/. Its agent
# holds a shared flock on LOCK_NAME for its whole life (a restart's new agent
# of the same cluster and host holds it too); the last one to leave writes
# ENDED_NAME. Any agent, when it starts, sweeps the other clusters' directories
# whose lock is free: their TLS keys go at once, their logs once their
# retention has passed since they ended. A held lock is never touched.
# The lock file's text says the retention and the scratch directories of the
# agent's processes (host.py's _scratch_dir, outside <base>, often in /tmp):
# the last agent to leave removes them, and so does a sweep that finds the
# agent gone, so spilled data never outlives its cluster.

LOCK_NAME = "agent.lock"
ENDED_NAME = "ended.json"
DEFAULT_RETENTION = 7 * 86400.0


def _base_dir(config: dict[str, Any]) -> str:
    """The agent's base directory: ``base_dir`` if given, else ``$XDG_CACHE_HOME`` or ``~/.cache``, + ``speccluster-ssh``."""
    if config.get("base_dir"):
        return os.path.expanduser(str(config["base_dir"]))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    cache = xdg if xdg and os.path.isabs(xdg) else os.path.expanduser("~/.cache")
    return os.path.join(cache, "speccluster-ssh")


def sweep_action(*, now: float, lock_free: bool, ended_at: float | None, retention: float) -> str:
    """What the sweep does with one cluster directory (pure: no file is looked at).

    Parameters
    ----------
    now
        The current time (seconds since the epoch).
    lock_free
        Whether no live agent holds the directory's lock.
    ended_at
        When the directory's cluster ended (its end marker), ``None`` when no marker exists.
    retention
        Seconds the logs are kept after the end.

    Returns
    -------
    str
        ``"live"``: leave everything; ``"mark"``: its agent died without a word (crashed host,
        SIGKILL): remove the TLS keys and record now as its end; ``"keep"``: ended within its
        retention, remove the TLS keys only; ``"remove"``: retention passed, remove the directory.
    """
    if not lock_free:
        return "live"
    if ended_at is None:
        return "mark"
    return "remove" if now - ended_at >= retention else "keep"


def _read_json(path: str) -> dict[str, Any]:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: str, data: dict[str, Any]) -> None:
    import json

    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(temporary, path)


def _hold_lock(directory: str, retention: float) -> int:
    """Take (shared) the lock of one agent directory for this process's life; return its fd.

    The file also says the retention this cluster asked for, which a sweep
    uses when the agent died before it could write its end marker.
    """
    import fcntl

    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    with contextlib.suppress(FileNotFoundError):  # alive again (a host back after a crash): not ended
        os.unlink(os.path.join(directory, ENDED_NAME))
    note_lock(fd, {"retention": retention, "pid": os.getpid()})
    return fd


def note_lock(fd: int, note: dict[str, Any]) -> None:
    """Write ``note`` as the text of the lock file ``fd`` (what a sweep reads when its agent died)."""
    import json

    with contextlib.suppress(OSError):  # only the marker's text: the lock is what counts
        data = json.dumps(note).encode().ljust(64) + b"\n"
        os.lseek(fd, 0, os.SEEK_SET)
        _write_all(fd, data)
        os.ftruncate(fd, len(data))


def _lock_free(directory: str, markers: Callable[[], set[str]]) -> int:
    """An fd holding the directory's lock exclusively when no agent holds it, else -1.

    A directory of an older agent (no lock file) counts as free only when no
    process of ours carries its cluster marker (``markers()``: the live ones).
    """
    import fcntl

    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        if os.path.basename(os.path.dirname(directory)) in markers():
            return -1
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError:
            return -1
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _live_markers() -> set[str]:
    """The ``SPECCLUSTER_SSH_CLUSTER`` values in the environment of the processes we can read."""
    prefix = b"SPECCLUSTER_SSH_CLUSTER="
    found: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {"*"}  # cannot tell: treat as alive (see _sweep)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                items = f.read().split(b"\0")
        except OSError:
            continue
        found.update(i[len(prefix):].decode("utf-8", "replace") for i in items if i.startswith(prefix))
    return found


def _sweep(base: str, own_cluster: str, now: float | None = None) -> None:
    """Apply :func:`sweep_action` to every agent directory under ``base`` but our own cluster's.

    Each directory is judged by the retention its own cluster asked for
    (its end marker, else its lock file), :data:`DEFAULT_RETENTION` when it
    says none (a directory of an older agent).
    """
    import time

    now = time.time() if now is None else now
    try:
        clusters = os.listdir(base)
    except OSError:
        return
    scanned: list[set[str]] = []

    def markers() -> set[str]:
        if not scanned:  # one scan of /proc, and only when an old directory asks for it
            scanned.append(_live_markers())
        return scanned[0] if "*" not in scanned[0] else set(clusters)

    for cluster in clusters:
        root = os.path.join(base, cluster)
        if cluster == own_cluster or os.path.islink(root) or not os.path.isdir(root):
            continue
        try:
            labels = os.listdir(root)
        except OSError:
            continue
        for label in labels:
            directory = os.path.join(root, label)
            if os.path.islink(directory) or not os.path.isdir(directory):
                continue
            fd = _lock_free(directory, markers)
            if fd < 0:
                continue
            try:
                _sweep_one(directory, now)
            finally:
                os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(root)  # only when every host's directory is gone


def _sweep_one(directory: str, now: float) -> None:
    """Act on one agent directory whose lock we hold (see :func:`sweep_action`)."""
    import shutil

    ended = _read_json(os.path.join(directory, ENDED_NAME))
    note = _read_json(os.path.join(directory, LOCK_NAME))
    # Its agent is gone: so are its processes, and their scratch files go now, whatever the retention.
    scratch = note.get("scratch")
    for path in scratch if isinstance(scratch, list) else []:
        if isinstance(path, str) and os.path.isabs(path):
            _remove_scratch(path)
    retention = _retention_of(ended)
    if retention is None:
        retention = _retention_of(note)
    retention = DEFAULT_RETENTION if retention is None else retention
    ended_at = ended.get("ended") if isinstance(ended.get("ended"), (int, float)) else None
    action = sweep_action(now=now, lock_free=True, ended_at=ended_at, retention=retention)
    if action == "remove":
        shutil.rmtree(directory, ignore_errors=True)
        return
    shutil.rmtree(os.path.join(directory, "tls"), ignore_errors=True)
    if action == "mark":
        with contextlib.suppress(OSError):
            _write_json(os.path.join(directory, ENDED_NAME),
                        {"ended": now, "retention": retention, "how": "found without its agent"})


def _retention_of(data: dict[str, Any]) -> float | None:
    value = data.get("retention")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def _leave(directory: str, root: str, lock_fd: int, *, keep_tls: bool, remove: bool, retention: float,
           scratch: Iterable[str] = ()) -> None:
    """At the agent's end: TLS keys go (unless a newer agent of the cluster uses them), logs stay.

    The last agent of the directory (its lock can be taken exclusively) writes
    the end marker that the retention counts from, and removes the
    ``scratch`` directories of its processes (a newer agent of the cluster
    uses the same ones); a directory without any log (``check``'s agents) or
    asked ``remove`` goes at once.
    """
    import fcntl
    import shutil
    import time

    if not keep_tls:
        shutil.rmtree(os.path.join(directory, "tls"), ignore_errors=True)
    last = False
    if lock_fd >= 0:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            last = True
        except OSError:
            last = False
    if last:
        for path in scratch:
            _remove_scratch(path)
        logs = os.path.join(directory, "logs")
        try:
            empty = not any(name.endswith(".log") for name in os.listdir(logs))
        except OSError:
            empty = True
        if remove or empty:
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(root)  # only when no other host of the cluster uses it
        else:
            with contextlib.suppress(OSError):
                _write_json(os.path.join(directory, ENDED_NAME), {"ended": time.time(), "retention": retention})
    if lock_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(lock_fd)


def _remove_scratch(path: str) -> None:
    """Remove a scratch directory of ours (``_scratch_dir`` of ``host.py``) and its cluster's directory when empty."""
    import shutil
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return  # not ours, whatever a record says
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))  # the cluster's, when no other host label uses it


def _kept_logs(config: dict[str, Any]) -> dict[str, Any]:
    """The kept logs of one cluster on this host: ``{"logs": {name: tail}, "dir": .., "ended": ..}``.

    Read-only: for ``logs`` of a cluster whose head is gone or that is down.
    """
    directory = os.path.join(_base_dir(config), str(config["cluster"]), str(config["host_label"]))
    logs_dir = os.path.join(directory, "logs")
    nbytes = int(config.get("bytes") or TAIL_BYTES)
    found: dict[str, str] = {}
    try:
        names = sorted(os.listdir(logs_dir))
    except OSError as exc:
        return {"logs": {}, "dir": directory, "error": f"{logs_dir}: {exc.strerror or exc}"}
    for name in names:
        if name.endswith(".log"):
            found[name[:-4]] = _tail_of(os.path.join(logs_dir, name), nbytes)
    return {"logs": found, "dir": directory, "ended": _read_json(os.path.join(directory, ENDED_NAME)).get("ended")}
