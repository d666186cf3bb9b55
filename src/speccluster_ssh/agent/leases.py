"""Leases on a host: who holds what, in a directory every user of the lab shares. A shipped source.

Runs in the agent's namespace after ``host.py`` (see ``agent_sources`` in
``agent/__init__.py``), so it imports only the standard library, stays
Python 3.8 compatible, uses no dataclass (the namespace is no module in
``sys.modules``), and prefixes its names with ``lease`` (one namespace for
every source). The head imports it too, as a plain module. Nothing here is
wired into the agent yet (issue 23): these are the host's building blocks.

What is decided, and why
------------------------
Where
    The default directory is ``/var/tmp`` itself (:data:`LEASE_DIR_DEFAULT`),
    lease files directly in it, named ``speccluster-<kind>.<uid>.<16 hex>.json``.
    On a stock Linux host ``/var/tmp`` exists, is owned by root, mode 1777,
    and is local to the host. A subdirectory such as
    ``/var/tmp/speccluster-leases`` would belong to the first user who
    made it, and the owner of a sticky directory may delete anyone's files
    in it, so every other user would have to refuse it; only root could
    make one that is safe to share. ``/dev/shm`` was the other candidate:
    logind's ``RemoveIPC=yes`` (the upstream default) deletes a user's files
    there when the user's last session ends, which would drop the live
    lease of a head left running in tmux after a logout. ``/var/tmp``'s
    only cleaner is systemd-tmpfiles' 30-day aging, which skips files and
    directories that hold a BSD lock, and :func:`lease_touch` keeps a
    lease's times fresh for older versions. ``speccluster_lease_dir`` names
    another directory (checked the same way, never created).
Safety
    :func:`lease_open_dir` refuses, with one message that says the fix: a
    relative or missing path, a symlink, anything but a directory, a
    directory (or any directory above it) owned by another user than root
    or us, or writable by group or others without the sticky bit. The path
    is checked as given and as resolved, then opened ``O_NOFOLLOW`` and
    compared by inode, and every later file operation is relative to that
    open directory, so a swap after the check changes nothing.
Files
    Created ``O_CREAT|O_EXCL|O_NOFOLLOW`` with a random name, mode 0600 while
    they are written (no one else can open, hence lock, them), then 0644:
    others can read them; the sticky directory keeps them from changing or
    deleting them. A file is never rewritten: a claim makes a new file, a
    release unlinks it.
Alive
    The holder (the agent) keeps an exclusive ``flock`` on its open lease
    file. A reader probes with a shared, non-blocking ``flock``: if that
    succeeds, no one holds the file and the lease is dead (ignored, and
    removed by a later claim of its owner). A lease therefore vanishes with
    its agent, whatever killed it. The agent forks workers without exec:
    it must close its lease fds in every child (they are ``O_CLOEXEC`` for
    children that exec), or a child would keep the lease alive.
Atomic
    One host-wide lock: ``flock`` on the directory itself, exclusive around
    "read the live leases, check the capacity, write mine" (claim, want),
    shared while listing. No lock file exists that a user could own,
    delete or chmod. A release needs no lock: it only frees capacity.
Trust
    A record's user is the file's ``st_uid`` (and the uid in its name and
    content must agree), never a name written in it. A file that is not a
    regular file, a symlink, larger than :data:`LEASE_MAX_BYTES`, not JSON,
    of a wrong shape, or whose uids disagree is ignored with one warning
    (:class:`LeaseWarnings`, once per file version), never a crash. A user
    who bypasses the tool can still write a well-formed lease of their own
    and hold it; it shows under their own name.
Capacity
    A claim fits when the live leases of every cluster (this one's too:
    they are real use of the host) plus the request stay within the
    capacity the claimer's inventory gives (:func:`lease_fit`): slots
    always, cores and memory when given (non-zero), GPU devices always
    disjoint. Slots of different inventories need not mean the same entry
    size; cores, memory and devices are physical.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import time
from typing import Any, Dict, List, Optional, Tuple

LEASE_DIR_DEFAULT = "/var/tmp"
LEASE_VERSION = 1
LEASE_KINDS = ("lease", "want")
LEASE_MAX_BYTES = 16384
LEASE_LOCK_TIMEOUT = 10.0
_LEASE_NAME = re.compile(r"^speccluster-(lease|want)\.([0-9]{1,10})\.([0-9a-f]{16})\.json$")
_LEASE_AMOUNTS = ("slots", "cores", "memory")
_LEASE_TEXT_LIMIT = 256
_LEASE_FIX_SHARED = ("use a directory owned by root with mode 1777, such as the default /var/tmp "
                     "(to make one: sudo install -d -m 1777 -o root -g root DIR), or one only you write to")


class LeaseError(Exception):
    """A lease operation cannot be done: ``message`` says why, ``fix`` what to do."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}; fix: {self.fix}" if self.fix else self.message


class LeaseWarnings:
    """Collects warnings about bad lease files, each file version once; the caller takes and reports them."""

    def __init__(self) -> None:
        self.seen = set()  # type: set
        self.pending = []  # type: List[str]

    def note(self, key: Any, text: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.pending.append(text)

    def take(self) -> List[str]:
        taken, self.pending = self.pending, []
        return taken


class LeaseHandle:
    """A lease (or want) this process holds: its open, exclusively locked file."""

    __slots__ = ("path", "name", "fd", "record")

    def __init__(self, path: str, name: str, fd: int, record: Dict[str, Any]) -> None:
        self.path = path  # the lease directory
        self.name = name  # the file's name in it
        self.fd = fd
        self.record = record

    @property
    def held(self) -> bool:
        return self.fd >= 0


class LeaseRefusal:
    """A claim that did not fit: what was short, what was free, and who holds the rest."""

    __slots__ = ("short", "free", "holders")

    def __init__(self, short: Dict[str, Any], free: Dict[str, Any], holders: List[Dict[str, Any]]) -> None:
        self.short = short
        self.free = free
        self.holders = holders

    def describe(self) -> str:
        """One line: what is short, then each holder (user, cluster, head, what, since)."""
        short = ", ".join(f"{k} {v}" for k, v in sorted(self.short.items()))
        who = "; ".join(
            f"{h['user']} (cluster {h['name'] or h['cluster']} from {h['head'] or '?'}: "
            f"{lease_amount_text(h['holds'])} since {time.strftime('%Y-%m-%d %H:%M', time.localtime(h['since']))})"
            for h in self.holders
        )
        return f"short of {short}; held by {who or 'no one (the capacity is smaller than the request)'}"


# -- the directory ---------------------------------------------------------------------------------


def lease_dir_path(configured: Optional[str] = None) -> str:
    """The lease directory: ``speccluster_lease_dir`` when set, else :data:`LEASE_DIR_DEFAULT`."""
    return configured or LEASE_DIR_DEFAULT


def _lease_check_component(path: str, st: os.stat_result, uid: int, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid not in (0, uid):
            raise LeaseError(f"{what} {path} goes through a symlink owned by uid {st.st_uid}", _LEASE_FIX_SHARED)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise LeaseError(f"{what} {path} is not a directory", "set speccluster_lease_dir to a directory")
    if st.st_uid not in (0, uid):
        raise LeaseError(
            f"{what} {path} belongs to {lease_user_name(st.st_uid)}, who could delete or replace other users' leases",
            _LEASE_FIX_SHARED,
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise LeaseError(
            f"{what} {path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} without the "
            "sticky bit, so anyone there could delete or replace other users' leases",
            f"chmod +t {path} (as its owner), or {_LEASE_FIX_SHARED}",
        )


def _lease_check_path(path: str, uid: int) -> None:
    """Check every component of ``path`` (as written) with lstat; a missing one raises FileNotFoundError."""
    current = os.sep
    for part in [p for p in path.split(os.sep) if p]:
        current = os.path.join(current, part)
        what = "the lease directory" if current == path else "the directory above the lease directory,"
        _lease_check_component(current, os.lstat(current), uid, what)


def lease_open_dir(path: str) -> int:
    """Check ``path`` is safe to share (see the module's Safety) and return an open fd of it.

    Raises
    ------
    LeaseError
        When it is refused; the message says why and the fix.
    """
    uid = os.getuid()
    if not os.path.isabs(path):
        raise LeaseError(f"the lease directory {path!r} is not an absolute path", "set speccluster_lease_dir to one")
    path = os.path.normpath(path)
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise LeaseError(
                f"the lease directory {path} is a symlink (to {os.path.realpath(path)})",
                "set speccluster_lease_dir to the real directory, once you checked it is safe to share",
            )
        _lease_check_path(path, uid)
        real = os.path.realpath(path)
        if real != path:
            _lease_check_path(real, uid)  # where the root-owned symlinks above it lead
            st = os.lstat(real)
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LeaseError(
            f"the lease directory {path} does not exist",
            f"create it (shared by every user: sudo install -d -m 1777 -o root -g root {path}; only for you: "
            f"mkdir -m 755 {path}), or unset speccluster_lease_dir to use {LEASE_DIR_DEFAULT}",
        ) from None
    except OSError as exc:
        raise LeaseError(f"cannot open the lease directory {path}: {exc.strerror or exc}", _LEASE_FIX_SHARED) from None
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise LeaseError(f"the lease directory {path} changed while it was checked", "try again")
    if not os.access(real, os.W_OK | os.X_OK):
        os.close(fd)
        raise LeaseError(f"{lease_user_name(uid)} cannot create files in the lease directory {path}", _LEASE_FIX_SHARED)
    return fd


def _lease_lock(dir_fd: int, path: str, exclusive: bool, timeout: float) -> None:
    """Take the host-wide lock (a flock on the directory), waiting at most ``timeout`` seconds."""
    import fcntl

    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            fcntl.flock(dir_fd, mode)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                raise
        if time.monotonic() >= deadline:
            raise LeaseError(
                f"the lease directory {path} stayed locked for {timeout:g} s",
                f"a process holds a flock on {path}: find it with 'lslocks' (or /proc/locks) and ask its owner",
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


# -- reading ---------------------------------------------------------------------------------------


def lease_user_name(uid: int) -> str:
    """The user name of ``uid`` on this host, ``uid N`` when it has none."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return f"uid {uid}"


def _lease_text(value: Any, required: bool) -> Optional[str]:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or len(value) > _LEASE_TEXT_LIMIT or (required and not value):
        return None
    return value


def _lease_count(value: Any) -> Optional[int]:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        return None
    return value


def lease_amount(data: Any, choose_gpus: bool = False) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(amount, "")`` for a valid ``holds``/``wants`` mapping, normalized; ``(None, why)`` otherwise.

    An amount is ``{"slots": n, "cores": n, "memory": bytes, "gpus": [device ids]}``; a missing
    field is 0 or no device. With ``choose_gpus``, ``gpus`` may be a count (the claim picks the devices).
    """
    if not isinstance(data, dict):
        return None, "its amount is not a mapping"
    amount = {}  # type: Dict[str, Any]
    for key in _LEASE_AMOUNTS:
        value = _lease_count(data.get(key))
        if value is None:
            return None, f"its {key} is not a whole number >= 0"
        amount[key] = value
    gpus = data.get("gpus") or []
    if choose_gpus and _lease_count(gpus) is not None:
        amount["gpus"] = gpus
    elif (not isinstance(gpus, list) or len(gpus) > 1024
          or not all(isinstance(g, str) and 0 < len(g) <= 64 for g in gpus) or len(set(gpus)) != len(gpus)):
        return None, "its gpus are not a list of distinct device ids"
    else:
        amount["gpus"] = list(gpus)
    return amount, ""


def lease_amount_text(amount: Dict[str, Any]) -> str:
    """``2 slots, 8 cores, 16 GiB, GPUs 0,1``: the non-zero parts of an amount."""
    parts = [f"{amount.get('slots', 0)} slot{'' if amount.get('slots') == 1 else 's'}"]
    if amount.get("cores"):
        parts.append(f"{amount['cores']} cores")
    if amount.get("memory"):
        parts.append(f"{amount['memory'] / 2**30:.3g} GiB")
    if amount.get("gpus"):
        parts.append("GPUs " + ",".join(amount["gpus"]))
    return ", ".join(parts)


def lease_record(data: Any, kind: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(record, "")`` when ``data`` (a file's JSON) is a valid record of ``kind``; ``(None, why)`` otherwise.

    The record has ``kind``, ``uid`` (as written: the reader compares it with the file's owner),
    ``cluster``, ``name``, ``head``, ``entry``, ``pid``, ``since`` and ``holds`` (a lease) or ``wants`` (a want).
    """
    if not isinstance(data, dict):
        return None, "it is not a JSON object"
    if data.get("v") != LEASE_VERSION or data.get("kind") != kind:
        return None, f"it is no version {LEASE_VERSION} {kind}"
    record = {"kind": kind}  # type: Dict[str, Any]
    for key, required in (("cluster", True), ("name", False), ("head", False), ("entry", False)):
        text = _lease_text(data.get(key), required)
        if text is None:
            return None, f"its {key} is not a short {'non-empty ' if required else ''}string"
        record[key] = text
    for key in ("uid", "pid"):
        value = _lease_count(data.get(key))
        if value is None or key not in data:
            return None, f"its {key} is not a whole number >= 0"
        record[key] = value
    since = data.get("since")
    if isinstance(since, bool) or not isinstance(since, (int, float)) or not math.isfinite(since) or since < 0:
        return None, "its since is not a time"
    record["since"] = float(since)
    field = "holds" if kind == "lease" else "wants"
    amount, why = lease_amount(data.get(field))
    if amount is None:
        return None, why
    record[field] = amount
    return record, ""


def _lease_read(dir_fd: int, path: str, name: str, warnings: LeaseWarnings) -> Tuple[Optional[Dict[str, Any]], bool]:
    """``(record, False)`` for a live lease file, ``(None, True)`` for a dead one, ``(None, False)`` if ignored."""
    import fcntl

    match = _LEASE_NAME.match(name)
    if match is None:
        return None, False
    kind, name_uid = match.group(1), int(match.group(2))
    where = os.path.join(path, name)
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, False  # released meanwhile
    key = (name, st.st_ino, st.st_mtime_ns, st.st_size, st.st_uid)
    if not stat.S_ISREG(st.st_mode):
        warnings.note(key, f"lease file {where} is not a regular file (a symlink?); ignored")
        return None, False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, False
    except OSError as exc:
        warnings.note(key, f"lease file {where} of {lease_user_name(st.st_uid)} cannot be read ({exc.strerror}); ignored")
        return None, False
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or opened.st_ino != st.st_ino:
            return None, False  # replaced meanwhile: the next look sees the new one
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            live = True
        else:
            live = False  # no holder: the lease died with its agent
        if not live:
            return None, True
        data = os.read(fd, LEASE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    user = lease_user_name(opened.st_uid)
    if len(data) > LEASE_MAX_BYTES:
        warnings.note(key, f"lease file {where} of {user} is larger than {LEASE_MAX_BYTES} bytes; ignored")
        return None, False
    try:
        content = json.loads(data.decode("utf-8"))
    except ValueError:
        warnings.note(key, f"lease file {where} of {user} is not JSON; ignored")
        return None, False
    record, why = lease_record(content, kind)
    if record is None:
        warnings.note(key, f"lease file {where} of {user} is malformed ({why}); ignored")
        return None, False
    if not record["uid"] == name_uid == opened.st_uid:
        warnings.note(key, f"lease file {where} is owned by {user} but says uid {record['uid']} "
                           f"(its name: {name_uid}); ignored")  # fmt: skip
        return None, False
    record.update(user=user, file=name)
    return record, False


def _lease_scan(dir_fd: int, path: str, warnings: LeaseWarnings, sweep: bool = False) -> List[Dict[str, Any]]:
    """The live records of the directory, in name order; with ``sweep``, our own dead files go (caller holds EX)."""
    uid = os.getuid()
    live = []
    with os.scandir(dir_fd) as entries:
        names = sorted(e.name for e in entries if e.name.startswith("speccluster-"))
    for name in names:
        record, dead = _lease_read(dir_fd, path, name, warnings)
        if record is not None:
            live.append(record)
        elif dead and sweep:
            match = _LEASE_NAME.match(name)
            try:
                if match and int(match.group(2)) == uid and os.lstat(name, dir_fd=dir_fd).st_uid == uid:
                    os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass  # another agent of ours swept it first
    return live


def lease_list(path: str, warnings: Optional[LeaseWarnings] = None, timeout: float = LEASE_LOCK_TIMEOUT
               ) -> List[Dict[str, Any]]:  # fmt: skip
    """The live leases and wants in ``path``: records (see :func:`lease_record`) plus ``user`` and ``file``.

    ``user`` comes from the file's owner. Bad files are left out, with a note in ``warnings``.
    """
    dir_fd = lease_open_dir(path)
    try:
        _lease_lock(dir_fd, path, exclusive=False, timeout=timeout)
        return _lease_scan(dir_fd, path, warnings if warnings is not None else LeaseWarnings())
    finally:
        os.close(dir_fd)  # drops the lock


# -- capacity --------------------------------------------------------------------------------------


def lease_fit(capacity: Dict[str, Any], held: List[Dict[str, Any]], request: Dict[str, Any]
              ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:  # fmt: skip
    """Whether ``request`` fits on a host of ``capacity`` beside the leases ``held`` (pure).

    Parameters
    ----------
    capacity
        ``slots`` (always checked), ``cores`` and ``memory`` (checked when non-zero),
        ``gpus`` (the host's device ids; when given, a request's devices must be among them).
    held
        Live lease records (their ``holds``), of every cluster.
    request
        An amount (see :func:`lease_amount`); its ``gpus`` may be a count: the lowest free
        devices of ``capacity`` are chosen.

    Returns
    -------
    tuple
        ``(short, free, grant)``: what is short (empty when it fits: slots, cores, memory
        by how much, ``gpus`` the devices taken or the count missing), what is free, and
        the request with its devices chosen.
    """
    used = {key: sum(h["holds"][key] for h in held) for key in _LEASE_AMOUNTS}
    taken = [g for h in held for g in h["holds"]["gpus"]]
    devices = [str(g) for g in capacity.get("gpus") or []]
    free = {}  # type: Dict[str, Any]
    short = {}  # type: Dict[str, Any]
    for key in _LEASE_AMOUNTS:
        limit = int(capacity.get(key) or 0)
        if key != "slots" and not limit:
            continue
        free[key] = max(limit - used[key], 0)
        if request[key] > free[key]:
            short[key] = request[key] - free[key]
    free["gpus"] = [g for g in devices if g not in taken]
    grant = dict(request)
    if isinstance(request["gpus"], int):
        grant["gpus"] = free["gpus"][:request["gpus"]]
        if len(grant["gpus"]) < request["gpus"]:
            short["gpus"] = request["gpus"] - len(grant["gpus"])
    else:
        clash = [g for g in request["gpus"] if g in taken or (devices and g not in devices)]
        if clash:
            short["gpus"] = clash
    return short, free, grant


# -- writing ---------------------------------------------------------------------------------------


def _lease_create(dir_fd: int, path: str, kind: str, content: Dict[str, Any]) -> LeaseHandle:
    """Create, lock and write one lease file (the caller holds the host lock exclusively)."""
    import fcntl
    import secrets

    data = json.dumps(content, sort_keys=True).encode()
    for _ in range(100):
        name = f"speccluster-{kind}.{os.getuid()}.{secrets.token_hex(8)}.json"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)  # fmt: skip
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # mode 600: no one else could open it yet
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
        except BaseException:
            os.unlink(name, dir_fd=dir_fd)
            os.close(fd)
            raise
        record = dict(content)
        record.update(user=lease_user_name(os.getuid()), file=name)
        del record["v"]
        return LeaseHandle(path, name, fd, record)
    raise LeaseError(f"cannot find a free lease file name in {path}", "try again")


def _lease_content(kind: str, record: Dict[str, Any], amount: Dict[str, Any]) -> Dict[str, Any]:
    content = {"v": LEASE_VERSION, "kind": kind, "uid": os.getuid(), "pid": os.getpid(), "since": time.time()}
    for key in ("cluster", "name", "head", "entry"):
        content[key] = record.get(key) or ""
    content["holds" if kind == "lease" else "wants"] = amount
    checked, why = lease_record(content, kind)
    if checked is None:
        raise LeaseError(f"bad {kind} record: {why}", "this is a bug of speccluster-ssh")
    return content


def lease_claim(path: str, record: Dict[str, Any], capacity: Dict[str, Any], warnings: Optional[LeaseWarnings] = None,
                timeout: float = LEASE_LOCK_TIMEOUT) -> Any:  # fmt: skip
    """Claim ``record["holds"]`` on this host, atomically under the host-wide lock.

    Parameters
    ----------
    path
        The lease directory (see :func:`lease_dir_path`).
    record
        ``cluster`` (its id), ``name``, ``head`` (the head's host), ``entry`` and ``holds``
        (an amount; ``gpus`` may be a count, see :func:`lease_fit`).
    capacity
        The host's capacity as the claimer's inventory gives it (see :func:`lease_fit`).
    warnings
        Collects notes about bad lease files.

    Returns
    -------
    LeaseHandle or LeaseRefusal
        The held lease (keep it: the lease lives while its fd is open), or why not and who holds the rest.
    """
    request, why = lease_amount(record.get("holds"), choose_gpus=True)
    if request is None:
        raise LeaseError(f"bad lease request: {why}", "this is a bug of speccluster-ssh")
    warnings = warnings if warnings is not None else LeaseWarnings()
    dir_fd = lease_open_dir(path)
    try:
        _lease_lock(dir_fd, path, exclusive=True, timeout=timeout)
        held = [r for r in _lease_scan(dir_fd, path, warnings, sweep=True) if r["kind"] == "lease"]
        short, free, grant = lease_fit(capacity, held, request)
        if short:
            return LeaseRefusal(short, free, held)
        return _lease_create(dir_fd, path, "lease", _lease_content("lease", record, grant))
    finally:
        os.close(dir_fd)


def lease_want(path: str, record: Dict[str, Any], warnings: Optional[LeaseWarnings] = None,
               timeout: float = LEASE_LOCK_TIMEOUT) -> LeaseHandle:  # fmt: skip
    """Record that a cluster waits for ``record["wants"]`` (an amount) here; held like a lease."""
    amount, why = lease_amount(record.get("wants"))
    if amount is None:
        raise LeaseError(f"bad want: {why}", "this is a bug of speccluster-ssh")
    dir_fd = lease_open_dir(path)
    try:
        _lease_lock(dir_fd, path, exclusive=True, timeout=timeout)
        _lease_scan(dir_fd, path, warnings if warnings is not None else LeaseWarnings(), sweep=True)
        return _lease_create(dir_fd, path, "want", _lease_content("want", record, amount))
    finally:
        os.close(dir_fd)


def lease_release(handle: LeaseHandle) -> None:
    """Give a lease (or want) back: unlink its file, then drop its lock. Idempotent, never blocks."""
    if handle.fd < 0:
        return
    fd, handle.fd = handle.fd, -1
    try:
        dir_fd = os.open(handle.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        dir_fd = -1
    try:
        if dir_fd >= 0 and os.lstat(handle.name, dir_fd=dir_fd).st_ino == os.fstat(fd).st_ino:
            os.unlink(handle.name, dir_fd=dir_fd)
    except OSError:
        pass  # gone already; closing below ends the lease anyway
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
        os.close(fd)


lease_unwant = lease_release


def lease_touch(handle: LeaseHandle) -> None:
    """Refresh a held file's times, for an age-based cleaner that does not honour its lock."""
    if handle.fd >= 0:
        try:
            os.utime(handle.fd)
        except OSError:
            pass
