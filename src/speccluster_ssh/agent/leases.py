"""Leases on a host: who holds what, in a directory every user of the lab shares. A shipped source.

Runs in the agent's namespace after ``lease_records.py`` (what a lease says,
whether a claim fits; its names are globals here), see ``agent_sources``:
standard library only, Python 3.8, no dataclass (the namespace is in no
``sys.modules``), every name prefixed ``lease``. The head imports it as a
plain module too. The agent's requests on it are ``lease_keeper.py``'s.

What is decided, and why
------------------------
Where
    Files ``speccluster-<lease|want|power>.<uid>.<16 hex>.json`` directly in
    ``/var/tmp``: on a stock Linux host it exists, is root's, mode 1777 and
    local. A subdirectory would be its first user's, and a sticky
    directory's owner may delete anyone's files in it, so others would have
    to refuse it. ``/dev/shm`` loses a user's files at their last logout
    (logind ``RemoveIPC=yes``, the upstream default), e.g. the leases of a
    head left in tmux. tmpfiles' 30-day aging of ``/var/tmp`` skips locked
    files in recent systemd; :func:`lease_touch` covers older ones.
    ``speccluster_lease_dir`` overrides (checked alike, never created, local).
Safety
    :func:`lease_open_dir` refuses, with the fix: a relative or missing path,
    a symlink, a non-directory, a directory (or one above it) owned by
    another user than root or us, or group/world writable without the sticky
    bit. Checked as given and as resolved, opened ``O_NOFOLLOW``, compared by
    inode; every later operation is relative to that open directory.
Files
    Created ``O_CREAT|O_EXCL|O_NOFOLLOW`` (random name), mode 0600 while
    written (no one else can open, hence lock, them), then 0644: others read,
    and the sticky directory keeps them from changing or deleting them. A
    claim makes a file, a release unlinks it; only :func:`lease_mark`
    (busy or idle) rewrites it, in place (same inode, so its flock stays)
    under the directory's exclusive lock, which every reader's shared lock
    excludes: no reader sees it half written.
Alive
    The holder keeps an exclusive ``flock`` on its open file. A reader
    probes with a shared non-blocking ``flock``: when that succeeds the lease
    is dead, ignored, and removed by its owner's next claim. So a lease ends
    with its agent, whatever killed it. The agent forks workers without exec:
    it must close its lease fds in each child (they are ``O_CLOEXEC``).
Atomic
    A ``flock`` on the directory itself, exclusive around "read the live
    leases, check the capacity, write mine", shared while listing: no lock
    file a user could own, delete or chmod. A release needs no lock.
Trust
    The user is the file's ``st_uid`` (the uid in its name and content must
    agree), never a written name. Not a regular file, larger than
    :data:`LEASE_MAX_BYTES`, not JSON, a wrong shape, disagreeing uids, or a
    second name (hard link) of a counted file: ignored with one warning
    (:class:`LeaseWarnings`), never a crash. A user who bypasses the tool
    can still hold a well-formed lease; it shows under their name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from typing import Any, Dict, List, Optional, Tuple

if __name__ != "speccluster_agent":  # a plain module of the head; shipped, these are globals already
    from .lease_records import (
        LEASE_MAX_BYTES, LEASE_POWER_STATES, LEASE_STATES, LEASE_VERSION, LeaseRefusal, lease_amount, lease_fit,
        lease_record,
    )

LEASE_DIR_DEFAULT = "/var/tmp"
LEASE_LOCK_TIMEOUT = 10.0
_LEASE_NAME = re.compile(r"^speccluster-(lease|want|power)\.([0-9]{1,10})\.([0-9a-f]{16})\.json$")
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


# -- the directory ---------------------------------------------------------------------------------


def lease_dir_path(configured: Optional[str] = None) -> str:
    """The lease directory: ``speccluster_lease_dir`` when set, else ``$SPECCLUSTER_SSH_LEASE_DIR``, else :data:`LEASE_DIR_DEFAULT`.

    The environment variable is the agent's own: hosts reached over SSH start
    it with a clean environment, so in practice it serves local hosts (the
    head's machine), such as a test session's, which must not see another
    session's leases.
    """
    return configured or os.environ.get("SPECCLUSTER_SSH_LEASE_DIR") or LEASE_DIR_DEFAULT


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


def _lease_read(dir_fd: int, path: str, name: str, warnings: LeaseWarnings, counted: set
                ) -> Tuple[Optional[Dict[str, Any]], bool]:  # fmt: skip
    """``(record, False)`` for a live lease file, ``(None, True)`` for a dead one, ``(None, False)`` if ignored.

    ``counted`` holds the ``(device, inode)`` of the files read so far: a second name of one (a hard
    link) is ignored, so no lease counts twice.
    """
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
    if (st.st_dev, st.st_ino) in counted:
        warnings.note(key, f"lease file {where} has another name (a hard link); ignored")
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
    counted.add((st.st_dev, st.st_ino))
    return record, False


def _lease_scan(dir_fd: int, path: str, warnings: LeaseWarnings, sweep: bool = False) -> List[Dict[str, Any]]:
    """The live records of the directory, in name order; with ``sweep``, our own dead files go (caller holds EX)."""
    uid = os.getuid()
    live = []
    counted = set()  # type: set
    with os.scandir(dir_fd) as entries:
        names = sorted(e.name for e in entries if e.name.startswith("speccluster-"))
    for name in names:
        record, dead = _lease_read(dir_fd, path, name, warnings, counted)
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
    except OSError as exc:
        raise _lease_failed(path, "read", exc) from None
    finally:
        os.close(dir_fd)  # drops the lock


# -- writing ---------------------------------------------------------------------------------------


def _lease_failed(path: str, what: str, exc: OSError) -> LeaseError:
    """The error of a lease directory that could not be read or written (a full disk, a lost permission)."""
    return LeaseError(f"cannot {what} the leases in {path}: {exc.strerror or exc}",
                      f"free space in {path}, or set speccluster_lease_dir to another directory ({_LEASE_FIX_SHARED})")


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


def _lease_content(kind: str, record: Dict[str, Any], amount: Any) -> Dict[str, Any]:
    content = {"v": LEASE_VERSION, "kind": kind, "uid": os.getuid(), "pid": os.getpid(), "since": time.time()}
    for key in ("cluster", "name", "head", "entry", "host"):
        content[key] = record.get(key) or ""
    content[{"lease": "holds", "want": "wants"}.get(kind, kind)] = amount
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
        # Per inventory name of the host: two names for one machine (local hosts of a test) are two capacities.
        scope = record.get("host") or ""
        held = [r for r in _lease_scan(dir_fd, path, warnings, sweep=True)
                if r["kind"] == "lease" and r.get("host", "") == scope]
        short, free, grant = lease_fit(capacity, held, request)
        if short:
            return LeaseRefusal(short, free, held)
        return _lease_create(dir_fd, path, "lease", _lease_content("lease", record, grant))
    except OSError as exc:
        raise _lease_failed(path, "write", exc) from None
    finally:
        os.close(dir_fd)


def lease_want(path: str, record: Dict[str, Any], warnings: Optional[LeaseWarnings] = None,
               timeout: float = LEASE_LOCK_TIMEOUT) -> LeaseHandle:  # fmt: skip
    """Record that a cluster waits for ``record["wants"]`` (an amount) here; held like a lease."""
    amount, why = lease_amount(record.get("wants"))
    if amount is None:
        raise LeaseError(f"bad want: {why}", "this is a bug of speccluster-ssh")
    return _lease_record(path, "want", _lease_content("want", record, amount), warnings, timeout)


def lease_power(path: str, record: Dict[str, Any], warnings: Optional[LeaseWarnings] = None,
                timeout: float = LEASE_LOCK_TIMEOUT) -> LeaseHandle:  # fmt: skip
    """Record that cluster ``record["cluster"]`` woke host ``record["host"]`` (``record["power"]``: ``waking``, ``woken``).

    Held like a lease, so it ends with its holder; ``speccluster-ssh hosts`` reads it to say who
    woke a host (``woken``, written on the host by the cluster's agent) or that one is booting
    (``waking``, written on the head, where the host cannot be asked yet).
    """
    power = record.get("power")
    if power not in LEASE_POWER_STATES:
        raise LeaseError(f"bad power record: {power!r}", "this is a bug of speccluster-ssh")
    return _lease_record(path, "power", _lease_content("power", record, power), warnings, timeout)


def _lease_record(path: str, kind: str, content: Dict[str, Any], warnings: Optional[LeaseWarnings],
                  timeout: float) -> LeaseHandle:  # fmt: skip
    """Write a held record of ``kind`` (no capacity check: a want or a power record) under the directory's lock."""
    dir_fd = lease_open_dir(path)
    try:
        _lease_lock(dir_fd, path, exclusive=True, timeout=timeout)
        _lease_scan(dir_fd, path, warnings if warnings is not None else LeaseWarnings(), sweep=True)
        return _lease_create(dir_fd, path, kind, content)
    except OSError as exc:
        raise _lease_failed(path, "write", exc) from None
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


def lease_mark(handle: LeaseHandle, state: str, timeout: float = LEASE_LOCK_TIMEOUT) -> bool:
    """Say whether a held lease is ``"busy"`` or ``"idle"`` (``""``: not said): rewrite its file in place.

    Under the directory's exclusive lock, so no reader (they take it shared) sees the file half
    written; the same inode keeps its flock, so the lease stays alive throughout. Marking it with
    the state it has already keeps its ``state_since``.

    Returns
    -------
    bool
        ``False`` when the handle holds nothing any more (released).

    Raises
    ------
    LeaseError
        For a state that is none of :data:`LEASE_STATES`, a want, or a lock that stays taken.
    """
    if state not in LEASE_STATES:
        raise LeaseError(f"bad lease state {state!r}: it is busy, idle or empty", "this is a bug of speccluster-ssh")
    if handle.fd < 0:
        return False
    if handle.record.get("kind") != "lease":
        raise LeaseError(f"{handle.name} is a want, which is neither busy nor idle", "this is a bug of speccluster-ssh")
    if handle.record.get("state", "") == state:
        return True
    content = {key: value for key, value in handle.record.items() if key not in ("user", "file")}
    content.update(v=LEASE_VERSION, state=state, state_since=time.time())
    checked, why = lease_record(content, "lease")
    if checked is None:
        raise LeaseError(f"bad lease record: {why}", "this is a bug of speccluster-ssh")
    data = json.dumps(content, sort_keys=True).encode()
    dir_fd = lease_open_dir(handle.path)
    try:
        _lease_lock(dir_fd, handle.path, exclusive=True, timeout=timeout)
        # Written from the start, then cut: the same inode, so the flock held on it stays.
        view, offset = memoryview(data), 0
        while offset < len(data):
            offset += os.pwrite(handle.fd, view[offset:], offset)
        os.ftruncate(handle.fd, len(data))
    except OSError as exc:
        raise _lease_failed(handle.path, "write", exc) from None
    finally:
        os.close(dir_fd)  # drops the lock
    handle.record.update(state=state, state_since=content["state_since"])
    return True


def lease_touch(handle: LeaseHandle) -> None:
    """Refresh a held file's times, for an age-based cleaner that does not honour its lock."""
    if handle.fd >= 0:
        try:
            os.utime(handle.fd)
        except OSError:
            pass
