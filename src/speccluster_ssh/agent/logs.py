"""Bounded log files of the host agent: the first of the agent's shipped sources.

The agent ships as two sources run in one namespace, this one first (see
``agent_sources`` in ``agent/__init__.py``): so this file, like
``remote.py``, may import only the standard library and never imports
anything of ``speccluster_ssh``. It is a file of its own because the log
pump is a unit with its own rules, and ``remote.py`` would otherwise pass
the size limit of a module.

A child's stdout and stderr are one pipe; the agent reads it without
blocking, in chunks of at most :data:`LOG_CHUNK` bytes, and appends to the
child's :class:`LogFile`. A file that would pass its cap is cut: it is
rewritten with a line saying so and the newest half of the cap (from a
line start), then the chunk is appended; a file is never larger than its
cap. The cut file replaces the old one by rename, so a reader sees the old
file or the new one, never half of one; the newest part, which every tail
reads, is the same text before and after the cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
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
