"""What the host agent learns about and sets up on its host. A shipped source (see ``remote.py``).

Facts for the agent's hello (cpus, memory, the address facing the head,
GPUs), the reach probe it runs before its import (scheduler_reach auto), the
private directories it keeps logs and files in, and the scratch directory of
the dask processes (:func:`_scratch_dir`). Runs in the
agent's namespace after ``logs.py``; imports only the standard library (and
``distributed`` for its version).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
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
    # A name of this process's own: the children of one host probe the same directory at once.
    path = os.path.join(directory, f".write-probe.{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, b"ok\n")
    finally:
        os.close(fd)
        os.unlink(path)


def _user_name() -> str:
    """This process's user name, usable in a path (its uid when the account has no name)."""
    import pwd

    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = ""
    return _path_part(name) if name else str(os.getuid())


def _path_part(text: str) -> str:
    """``text`` as one path component: only letters, digits, ``-``, ``_`` and ``.``, never ``.``/``..``."""
    part = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).lstrip(".")
    return part or "_"


def _own_dir(path: str) -> None:
    """Make ``path`` a directory only we can enter, or check that it is one of ours (never a symlink)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a plain directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}")
    os.chmod(path, 0o700)


def _scratch_dir(configured: str | None, temporary: str, cluster: str, label: str) -> str:
    """Create and return the scratch (and spill) directory of this user's dask processes of one cluster here.

    Parameters
    ----------
    configured
        ``speccluster_local_directory`` (or ``local_directory`` of the worker
        options): the directory becomes ``<configured>/<user>/<cluster>/<label>``,
        so that users and clusters sharing it never meet. It is created
        when missing, as dask would; a ``<user>`` directory that is not ours
        is refused with the fix.
    temporary
        Where the scratch goes otherwise (dask's ``temporary-directory``, else
        the system's): ``<temporary>/speccluster-ssh-<user>/<cluster>/<label>``.
        A ``speccluster-ssh-<user>`` that someone else planted there is
        passed over for a fresh private directory beside it.
    cluster, label
        The cluster id and the host's label (lab hosts may share one filesystem).

    Raises
    ------
    PermissionError
        One line naming the directory, the reason and the fix.
    """
    import tempfile

    user = _user_name()
    tail = (_path_part(cluster), _path_part(label))
    if configured:
        base = os.path.abspath(os.path.expanduser(configured))
        top = os.path.join(base, user)
    else:
        base = os.path.abspath(temporary)
        top = os.path.join(base, f"speccluster-ssh-{user}")
    try:
        os.makedirs(base, exist_ok=True)
        try:
            _own_dir(top)
        except PermissionError:
            if configured:
                raise
            top = tempfile.mkdtemp(prefix=f"speccluster-ssh-{user}-", dir=base)
        path = top
        for part in tail:
            path = os.path.join(path, part)
            _own_dir(path)
        _probe_writable(path)
    except OSError as exc:
        where = getattr(exc, "filename", None) or top
        reason = exc.strerror or str(exc)
        fix = (
            f"make {base} writable by every user of the lab (chmod 1777, as /tmp is), or create {top} for "
            f"{user}, or set speccluster_local_directory to a directory of {user}'s own"
            if configured
            else f"set speccluster_local_directory to a directory {user} may write"
        )
        raise PermissionError(f"cannot use {where} for the scratch files of {user}'s dask processes ({reason}); {fix}") from None
    return path


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


def _hold_env(config: dict[str, Any]) -> int:
    """Hold the shipped environment's lock (``env_lock``) shared for this process's life; its fd, or -1.

    The environment script removes only environments whose lock it can take
    exclusively, so one that a live agent (or its forked children) runs
    under is never collected.
    """
    path = config.get("env_lock")
    if not path:
        return -1
    import fcntl

    try:
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        return -1  # the environment's script touched its last use just now; it is 30 days from collection anyway
    return fd


def _listen_address(config: dict[str, Any]) -> str | None:
    """The address of this host that faces the head: the server end of our SSH link."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    if len(fields) == 4:
        return fields[2]
    return config.get("listen_address")


def _global_addresses() -> dict[str, list[str]]:
    """This host's global addresses, ``{"4": [...], "6": [...]}``: the head picks the family between hosts from them.

    ``ip -j addr`` where there is one; else /proc/net/if_inet6 for IPv6 and
    our end of the SSH link for IPv4 (the resolver's view of our own name is
    unreliable).
    """
    found: dict[str, list[str]] = {"4": [], "6": []}
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if ip:
        try:
            out = subprocess.run([ip, "-j", "addr", "show", "scope", "global"], capture_output=True, timeout=5,
                                 check=True).stdout
            for link in json.loads(out or b"[]"):
                for info in link.get("addr_info", []):
                    version = {"inet": "4", "inet6": "6"}.get(info.get("family"))
                    if version and info.get("local") and not info.get("tentative") and not info.get("deprecated"):
                        found[version].append(str(info["local"]))
            return found
        except (OSError, ValueError, AttributeError, TypeError, subprocess.SubprocessError):
            found = {"4": [], "6": []}
    try:
        with open("/proc/net/if_inet6") as lines:
            for line in lines:
                fields = line.split()
                # Scope 00 is global; flags 0x40 tentative, 0x20 deprecated.
                if len(fields) >= 6 and fields[3] == "00" and not int(fields[4], 16) & 0x60:
                    found["6"].append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0])))
    except (OSError, ValueError):
        pass
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    if len(ssh) == 4 and ":" not in ssh[2]:
        found["4"].append(ssh[2])
    return found


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
        try:
            # One port for both families: the head tries the address it reached us at, of either.
            listener = socket.socket(socket.AF_INET6)
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(("::", 0))
        except OSError:
            if listener is not None:
                listener.close()
            listener = socket.socket()
            listener.bind(("0.0.0.0", 0))
        listener.listen(64)
        message["port"] = listener.getsockname()[1]
    except OSError as exc:
        message["listen_error"] = str(exc)
    os.write(1, (json.dumps(message) + "\n").encode())
    return listener
