"""What the host agent learns about and sets up on its host. A shipped source (see ``remote.py``).

Facts for the agent's hello (cpus, memory, the address facing the head,
GPUs), the reach probe it runs before its import (scheduler_reach auto), and
the private directories it keeps logs and files in. Runs in the
agent's namespace after ``logs.py``; imports only the standard library (and
``distributed`` for its version).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from typing import Any


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


def _probe_writable(directory: str) -> None:
    """Raise OSError unless a file can be created and written in ``directory``."""
    path = os.path.join(directory, ".write-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ok\n")
    finally:
        os.close(fd)
        os.unlink(path)


def _detect_gpus() -> dict[str, Any]:
    """``{"gpus": [device ids]}`` as ``nvidia-smi -L`` lists them; none without nvidia-smi.

    ``gpu_note`` says why the list is empty when nvidia-smi is there but
    failed (a machine with the tools and no driver has no usable GPU).
    """
    import re
    import subprocess

    path = shutil.which("nvidia-smi")
    if path is None:
        return {"gpus": []}
    try:
        result = subprocess.run(
            [path, "-L"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"gpus": [], "gpu_note": f"nvidia-smi -L failed: {exc}"}
    if result.returncode != 0:
        last = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        return {"gpus": [], "gpu_note": f"nvidia-smi -L exited with {result.returncode}: {last[0][:200]}"}
    ids = []
    for line in result.stdout.decode("utf-8", "replace").splitlines()[:1024]:
        match = re.match(r"\s*GPU\s+(\d+)\s*:", line)
        if match:
            ids.append(match.group(1))
    return {"gpus": ids}


def _listen_address(config: dict[str, Any]) -> str | None:
    """The address of this host that faces the head: the server end of our SSH link."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    if len(fields) == 4:
        return fields[2]
    return config.get("listen_address")


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


def _reach_probe(config: dict[str, Any]) -> socket.socket | None:
    """Before the slow import: can this host open a connection to the head, and a port for the head to try.

    Writes ``{"event": "probe", "to_head": "" or why not, "port": .., "address": ..}``
    and returns the listening socket (the kernel completes the head's
    connection in its backlog; the agent closes it at the head's first request).
    """
    probe = config.get("probe")
    if not probe:
        return None
    target = str(probe["head"])
    timeout = float(probe.get("timeout", 5.0))
    message: dict[str, Any] = {"event": "probe", "to_head": "", "port": None, "address": _listen_address(config)}
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout).close()
    except OSError as exc:
        why = exc.strerror or (f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else type(exc).__name__)
        message["to_head"] = f"cannot reach the head at {target}: {why}"
    listener = None
    try:
        listener = socket.socket()
        listener.bind(("0.0.0.0", 0))
        listener.listen(64)
        message["port"] = listener.getsockname()[1]
    except OSError as exc:
        message["listen_error"] = str(exc)
    os.write(1, (json.dumps(message) + "\n").encode())
    return listener
