"""A lab of real SSH hosts built from Linux network namespaces.

Each lab host is a network namespace with its own address on a private
/24 and its own ``sshd``.  The machine running the tests is the *head*:
it owns the first address of the subnet in the root namespace, so code
under test reaches the hosts over real TCP and real SSH, exactly as it
would reach machines of a cluster.

Topology (defaults)::

    root namespace                switch namespace "sclab-sw"      host namespaces
    sclab-head 10.250.0.1/24 ---- head ─┐
                                        br0 ─ h1 ------------------- eth0 10.250.0.11 (sclab-h1)
                                            ─ h2 ------------------- eth0 10.250.0.12 (sclab-h2)
                                            ...

The bridge lives in a namespace of its own, not in the root namespace.
A fresh namespace has an empty firewall, so bridged host-to-host traffic
never meets the root namespace's iptables/nftables rules, even when
``br_netfilter`` is loaded with ``net.bridge.bridge-nf-call-iptables=1``
and the FORWARD policy is DROP (as on machines running Docker).  Traffic
between the head and the hosts does cross the root namespace's INPUT and
OUTPUT chains, which are normally open.

Processes are never killed by name: every lab host shares the PID space
of the developer's machine.  A process belongs to a host when
``/proc/PID/ns/net`` is that host's namespace, and it is signalled
through a pidfd re-checked against the namespace, so a recycled PID is
never hit.

``Lab(ipv6=True)`` also gives the head and each host an IPv6 address in a
ULA /64 made from the subnet (``10.250.0`` -> ``fd00:250:0::/64``);
``ipv4=False`` (or :meth:`Lab.drop_ipv4`) then drops every IPv4 packet
inside the hosts' namespaces: an IPv6-only lab.

Inside a host (SSH sessions and :meth:`LabHost.exec` alike) the hostname
is ``hN`` and ``/etc/hosts`` maps ``localhost``, ``head`` and every
``hN``; ``/etc/resolv.conf`` points at 127.0.0.1 so that other lookups
fail at once instead of stalling.

Only one lab per prefix and per subnet runs on a machine at a time: a
second one (another test session, a benchmark) waits on a lock in
``/run/lock``.  Parallel sessions need their own prefix and subnet.
A lab leaves ``/run/sshd`` (sshd's privilege-separation directory) behind,
as the openssh-server package would.

The lab is meant for tests and benchmarks and must run as root.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import asyncssh

__all__ = [
    "Lab",
    "LabError",
    "LabHost",
    "Proc",
    "ResetReport",
    "cleanup_leftovers",
    "leftovers",
    "require_lab_support",
]

_NETNS_DIR = Path("/run/netns")
_PRIVSEP_DIR = Path("/run/sshd")
_SBIN_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_SSH_PORT = 22
_MAX_HOSTS = 200
# Kernel limit on interface names is 15 characters; "<prefix>-head" must fit.
_IFNAME_MAX = 15

# Run inside a host namespace: give the host its own hostname, /etc/hosts
# and resolv.conf (in a private mount namespace, so nothing leaks to the
# root namespace), then exec the real command.
_NS_SCRIPT = (
    'printf %s "$1" > /proc/sys/kernel/hostname'
    ' && mount --bind "$2" /etc/hosts'
    ' && mount --bind "$3" /etc/resolv.conf'
    ' && mount --bind "$4" /var/tmp'
    ' && shift 4 && exec "$@"'
)

# Fails fast: nothing listens on port 53 inside a namespace, so the query is
# refused at once instead of timing out against an unreachable resolver.
# Marks a lab work dir, so a later lab on the same subnet can remove it
# after a crash; kept work dirs (keep_workdir=True) lose the marker.
_WORKDIR_MARKER = ".sclab-subnet"

_RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


class LabError(RuntimeError):
    """The lab could not be built, driven or torn down."""


class Proc(NamedTuple):
    """A process seen inside a lab namespace.

    Attributes
    ----------
    pid : int
        Process id (shared PID space with the machine).
    argv : list of str
        Command line from ``/proc/PID/cmdline`` (empty if unreadable).
    """

    pid: int
    argv: list[str]


# --------------------------------------------------------------------------
# support checks
# --------------------------------------------------------------------------


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def require_lab_support() -> None:
    """Raise if this machine cannot build the lab.

    The lab needs root, ``sshd``, ``ip`` (iproute2), ``unshare``,
    ``setpriv`` and ``mount`` (util-linux), network namespaces, and a root
    account that ``sshd`` without PAM accepts.  This raises instead of
    skipping on purpose: CI must fail loudly when the lab cannot run.

    Raises
    ------
    RuntimeError
        Listing every missing requirement.
    """
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, sshd)")
    for tool, package in (
        ("sshd", "openssh-server"),
        ("ip", "iproute2"),
        ("unshare", "util-linux"),
        ("setpriv", "util-linux"),
        ("mount", "mount"),
    ):
        if _which(tool) is None:
            problems.append(f"'{tool}' not found (install {package})")
    if not Path("/proc/self/ns/net").exists():
        problems.append("kernel without network namespaces")
    if not hasattr(os, "pidfd_open"):
        problems.append("Python without os.pidfd_open (needs Linux and Python >= 3.9)")
    # sshd with UsePAM no refuses accounts whose password field starts with
    # "!" (locked), even for public-key logins.
    with contextlib.suppress(OSError):
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "root" and len(fields) > 1 and fields[1].startswith("!"):
                problems.append(
                    "root account is locked in /etc/shadow ('!'); sshd without PAM "
                    "refuses it: unlock it with e.g. `usermod -p '*' root`"
                )
    if problems:
        raise RuntimeError("SSH lab unavailable: " + "; ".join(problems))


_sshd_version_cache: tuple[int, int] | None = None


def _sshd_version() -> tuple[int, int]:
    global _sshd_version_cache
    if _sshd_version_cache is None:
        sshd = _which("sshd") or "sshd"
        out = subprocess.run(
            [sshd, "-V"], capture_output=True, text=True, timeout=10, check=False
        )
        match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
        _sshd_version_cache = (int(match[1]), int(match[2])) if match else (0, 0)
    return _sshd_version_cache


# --------------------------------------------------------------------------
# small process and iproute2 helpers
# --------------------------------------------------------------------------


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0) -> str:
    res = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise LabError(
            f"command failed ({res.returncode}): {' '.join(argv)}\n{res.stderr.strip()}"
        )
    return res.stdout


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return _run(argv)


def _ip_batch(lines: Sequence[str], *, netns: str | None = None, force: bool = False) -> str:
    """Run many iproute2 commands with one process (start-up is dominated by forks)."""
    if not lines:
        return ""
    argv = ["ip"] + (["-n", netns] if netns else []) + (["-force"] if force else [])
    return _run([*argv, "-batch", "-"], input="\n".join(lines) + "\n")


def _netns_list() -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(_NETNS_DIR))
    except FileNotFoundError:
        return []


def _root_links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"])
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _netns_id(name: str) -> tuple[int, int] | None:
    """Identity (device, inode) of a named namespace, or None if it is gone."""
    try:
        st = os.stat(_NETNS_DIR / name)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _pid_netns(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        # Gone, or a zombie: zombies have no namespaces left.
        return None
    return (st.st_dev, st.st_ino)


def _pids_in(ns_id: tuple[int, int]) -> list[int]:
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            pid = int(entry.name)
            if pid != me and _pid_netns(pid) == ns_id:
                pids.append(pid)
    return sorted(pids)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 else None


def _descends_from(pid: int, ancestor: int, max_depth: int = 64) -> bool:
    for _ in range(max_depth):
        parent = _ppid(pid)
        if parent is None or parent <= 1:
            return False
        if parent == ancestor:
            return True
        pid = parent
    return False


def _signal_in_netns(pid: int, ns_id: tuple[int, int], sig: int) -> bool:
    """Signal ``pid`` only if it is still a process of namespace ``ns_id``.

    The pidfd pins the process, so the namespace check made after opening
    it cannot be fooled by a PID that was recycled in between.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if _pid_netns(pid) != ns_id:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def _kill_netns_processes(
    netns: str,
    *,
    keep: frozenset[int] = frozenset(),
    timeout: float = 10.0,
    reap: Sequence[subprocess.Popen[Any]] = (),
) -> list[Proc]:
    """SIGKILL every process of ``netns`` except ``keep``; wait until they are gone.

    Returns the processes that were killed.  Processes forked while we kill
    are caught by the next round.
    """
    ns_id = _netns_id(netns)
    if ns_id is None:
        return []
    killed: dict[int, Proc] = {}
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        victims = [pid for pid in _pids_in(ns_id) if pid not in keep]
        for popen in reap:
            popen.poll()  # our own children would stay zombies otherwise
        if not victims:
            return list(killed.values())
        if time.monotonic() > deadline:
            survivors = ", ".join(f"{pid} {_cmdline(pid)}" for pid in victims)
            raise LabError(f"processes in {netns} survived SIGKILL for {timeout}s: {survivors}")
        for pid in victims:
            if pid not in killed:
                killed[pid] = Proc(pid, _cmdline(pid))
            _signal_in_netns(pid, ns_id, signal.SIGKILL)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _tcp_accepts(ip: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def _mount_count(path: str) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[4] == path:
                count += 1
    return count


def _write_private(path: Path, data: str) -> None:
    """Write a file that only root may read (sshd rejects looser host keys)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _new_key(comment: str) -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519", comment=comment)


# --------------------------------------------------------------------------
# cross-process locks: one lab per prefix and per subnet at a time
# --------------------------------------------------------------------------


class _FileLock:
    """An flock held for the lab's lifetime.

    It keeps two test sessions on one machine (e.g. two engineers on one
    checkout, or a test run and a benchmark) from tearing down each other's
    lab, and it makes leftover clean-up safe: whoever holds the lock knows
    the previous owner is dead.  The kernel drops the lock when its holder
    dies, however it dies.
    """

    def __init__(self, key: str) -> None:
        lock_dir = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
        self.path = lock_dir / f"sclab-{key}.lock"
        self._fd: int | None = None

    def acquire(self, timeout: float) -> None:
        start = time.monotonic()
        deadline = start + timeout
        told = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not told and time.monotonic() - start > 2:
                    # Explain the pause: another lab user is running.
                    print(
                        f"sshlab: waiting up to {timeout:.0f}s for {self.path} "
                        f"(held by pid {self._holder() or '?'})",
                        file=sys.stderr,
                        flush=True,
                    )
                    told = True
                if time.monotonic() > deadline:
                    raise LabError(
                        f"another lab holds {self.path} (pid {self._holder() or '?'}) for more "
                        f"than {timeout:.0f}s; is a second test session running?"
                    ) from None
                time.sleep(0.1)
                continue
            # The previous holder may have unlinked the file after we opened
            # it: then our lock guards nothing and we must retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------
# leftovers of crashed labs
# --------------------------------------------------------------------------


def _our_netns(prefix: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}-(sw|h\d+)$")
    return [name for name in _netns_list() if pattern.match(name)]


def _our_links(prefix: str) -> list[str]:
    return [name for name in _root_links() if name.startswith(f"{prefix}-")]


def leftovers(prefix: str = "sclab") -> dict[str, list[str]]:
    """List what a lab with ``prefix`` left on this machine.

    Parameters
    ----------
    prefix : str
        The lab prefix.

    Returns
    -------
    dict
        ``{"netns": [...], "links": [...], "processes": [...]}``; all lists
        are empty on a clean machine.
    """
    namespaces = _our_netns(prefix)
    procs: list[str] = []
    for ns in namespaces:
        ns_id = _netns_id(ns)
        if ns_id is not None:
            procs.extend(f"{ns}:{pid}" for pid in _pids_in(ns_id))
    return {"netns": namespaces, "links": _our_links(prefix), "processes": procs}


def cleanup_leftovers(prefix: str = "sclab", subnet_base: str | None = None) -> list[str]:
    """Remove namespaces, links and processes of a crashed lab.

    Only call this while no live lab uses ``prefix`` (``Lab.start`` calls
    it while holding the subnet lock).

    Parameters
    ----------
    prefix : str
        The lab prefix.
    subnet_base : str, optional
        Also delete work dirs that crashed labs on this subnet left in the
        temp dir.

    Returns
    -------
    list of str
        A description of every item removed.
    """
    removed: list[str] = []
    namespaces = _our_netns(prefix)
    for ns in namespaces:
        for proc in _kill_netns_processes(ns):
            removed.append(f"process {proc.pid} in {ns}: {' '.join(proc.argv)}")
    if namespaces:
        _ip_batch([f"netns delete {ns}" for ns in namespaces], force=True)
        removed.extend(f"netns {ns}" for ns in namespaces)
    links = _our_links(prefix)
    if links:
        _ip_batch([f"link delete {link}" for link in links], force=True)
        removed.extend(f"link {link}" for link in links)
    if subnet_base is not None:
        for marker in Path(tempfile.gettempdir()).glob(f"{prefix}-*/{_WORKDIR_MARKER}"):
            with contextlib.suppress(OSError):
                if marker.read_text().strip() == subnet_base:
                    shutil.rmtree(marker.parent)
                    removed.append(f"workdir {marker.parent}")
    return removed


# --------------------------------------------------------------------------
# SIGTERM safety net
# --------------------------------------------------------------------------

_ACTIVE_LABS: set[Lab] = set()
_ACTIVE_KEYS: set[str] = set()
_sigterm_installed = False


def _on_sigterm(signum: int, frame: object) -> None:
    # Python's default SIGTERM skips finally blocks and atexit; tear the
    # labs down, then die by SIGTERM as the sender asked.
    for lab in list(_ACTIVE_LABS):
        with contextlib.suppress(Exception):
            lab.stop()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_handler() -> None:
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


# --------------------------------------------------------------------------
# hosts
# --------------------------------------------------------------------------


class LabHost:
    """One SSH host of the lab: a network namespace running its own sshd.

    Do not build these directly; use ``Lab(...).hosts``.

    Attributes
    ----------
    name : str
        Short host name, ``h1`` .. ``hN``; also its hostname inside the
        namespace and its name in the lab's /etc/hosts and known_hosts.
    index : int
        1-based position in the lab.
    ip : str
        IPv4 address of ``eth0`` inside the namespace.
    ip6 : str or None
        IPv6 address of ``eth0`` in an ``ipv6`` lab, else None.
    netns : str
        Name of the network namespace (``ip netns`` name).
    dir : pathlib.Path
        Per-host directory holding sshd config, host key, log and hosts file.
    """

    def __init__(self, lab: Lab, index: int) -> None:
        self.lab = lab
        self.index = index
        self.name = f"h{index}"
        self.ip = f"{lab.subnet_base}.{10 + index}"
        # IPv6 address on eth0 when the lab is IPv6-capable (``Lab(ipv6=True)``), else None.
        # Canonical form (fd00:250:0::11 is written fd00:250::11 by every tool that prints it).
        self.ip6: str | None = str(ipaddress.IPv6Address(f"{lab.prefix6}::{10 + index}")) if lab.ipv6 else None
        self.netns = f"{lab.prefix}-h{index}"
        self.dir = lab.workdir / self.name
        self.port_name = self.name  # bridge port in the switch namespace
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        self.sshd_config_path = self.dir / "sshd_config"
        self.hosts_path = self.dir / "hosts"
        # The host's own /var/tmp (where clusters record their leases), bind-mounted
        # over the machine's: lab hosts share one filesystem, real hosts do not.
        self.var_tmp = lab.workdir / f"{self.name}-var-tmp"
        self.log_path = self.dir / "sshd.log"
        self.host_public_key = ""
        self._original_host_key = ""
        self._sshd: subprocess.Popen[bytes] | None = None
        # sshd_config settings a test changed (see set_sshd_option); reset() drops them.
        self.sshd_overrides: dict[str, str] = {}
        self.firewalled = False
        # Rules the lab itself keeps in the host (``Lab(ipv4=False)``): firewall() and reset() keep them.
        self.base_rules: list[str] = []
        self.base_output_rules: list[str] = []

    def __repr__(self) -> str:
        return f"<LabHost {self.name} {self.ip} netns={self.netns}>"

    # -- configuration -----------------------------------------------------

    def _write_host_key(self, key: asyncssh.SSHKey) -> None:
        _write_private(self.host_key_path, key.export_private_key("openssh").decode())
        self.host_public_key = key.export_public_key("openssh").decode().strip()

    def _write_sshd_config(self) -> None:
        lab = self.lab
        lines = [
            f"ListenAddress {self.ip}",
            *([f"ListenAddress {self.ip6}"] if self.ip6 else []),
            f"Port {_SSH_PORT}",
            f"HostKey {self.host_key_path}",
            # The shared file (the lab key, for every account), then one per
            # account: a lab user's own key (labusers.py) logs in as that user only.
            f"AuthorizedKeysFile {lab.authorized_keys} {lab.workdir}/authorized_keys.%u",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # Keys live under /tmp, which StrictModes would reject.
            "StrictModes no",
            "UsePAM no",
            "UseDNS no",
            # Root's ~/.bashrc may run `pyenv rehash` at every login; a session
            # killed mid-rehash (tests kill sessions) leaves its lock file, and
            # every later login would wait 60 s for it. Never wait.
            "SetEnv PYENV_REHASH_TIMEOUT=0",
            "PidFile none",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            # Tests open many connections at once; the default 10:30:100
            # would drop some of them at random.
            f"MaxStartups {self.sshd_overrides.get('MaxStartups', '100:30:200')}",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
        ]
        lines += [f"{k} {v}" for k, v in self.sshd_overrides.items() if k != "MaxStartups"]
        if _sshd_version() >= (9, 8):
            # Newer sshd penalises sources whose sessions crash; tests kill
            # sessions on purpose and must not lock the head out.
            lines.append("PerSourcePenalties no")
        self.sshd_config_path.write_text("\n".join(lines) + "\n")

    # -- running commands inside the host --------------------------------

    def ns_argv(self, argv: Sequence[str]) -> list[str]:
        """Wrap ``argv`` so that it runs inside this host.

        The command gets the host's network namespace, hostname,
        ``/etc/hosts`` and ``/etc/resolv.conf`` -- the same view as an
        SSH session on the host.

        Parameters
        ----------
        argv : sequence of str
            Command to run.

        Returns
        -------
        list of str
            The full command line.
        """
        lab = self.lab
        return [
            "ip", "netns", "exec", self.netns,
            "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", _NS_SCRIPT, "sclab-ns",
            self.name, str(self.hosts_path), str(lab.resolv_conf), str(self.var_tmp),
            *argv,
        ]  # fmt: skip

    def exec(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the host and wait for it.

        Parameters
        ----------
        argv : sequence of str
            Command to run.
        **kw
            Passed to :func:`subprocess.run`.  Defaults: output captured as
            text, ``timeout=60``, ``check=False``.

        Returns
        -------
        subprocess.CompletedProcess
        """
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        kw.setdefault("check", False)
        return subprocess.run(self.ns_argv(argv), **kw)

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside the host without waiting for it.

        The caller owns the returned process and should ``wait()`` it;
        ``Lab.reset`` kills it if it is still running after the test.

        Parameters
        ----------
        argv : sequence of str
            Command to run.
        **kw
            Passed to :class:`subprocess.Popen`.

        Returns
        -------
        subprocess.Popen
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.ns_argv(argv), **kw)

    # -- processes ---------------------------------------------------------

    def pids(self) -> list[int]:
        """Return the PIDs of every process in the host's namespace.

        Returns
        -------
        list of int
            Sorted PIDs; empty when the namespace is gone.
        """
        ns_id = _netns_id(self.netns)
        return _pids_in(ns_id) if ns_id is not None else []

    def processes(self) -> list[Proc]:
        """Return every process in the host's namespace with its command line.

        Returns
        -------
        list of Proc
            ``(pid, argv)`` tuples.
        """
        return [Proc(pid, _cmdline(pid)) for pid in self.pids()]

    @property
    def sshd_pid(self) -> int | None:
        """PID of the host's listening sshd, or None when it is not running."""
        if self._sshd is not None and self._sshd.poll() is None:
            return self._sshd.pid
        return None

    @property
    def sshd_running(self) -> bool:
        """Whether the host's listening sshd is alive."""
        return self.sshd_pid is not None

    def kill_all(self, exclude_sshd: bool = False, *, timeout: float = 10.0) -> list[Proc]:
        """SIGKILL every process in the host and wait until they are gone.

        Parameters
        ----------
        exclude_sshd : bool
            Spare the listening sshd (its sessions are still killed).
        timeout : float
            Seconds to wait for the processes to disappear.

        Returns
        -------
        list of Proc
            The processes killed.

        Raises
        ------
        LabError
            If some process survives ``timeout`` seconds.
        """
        keep: frozenset[int] = frozenset()
        if exclude_sshd and self.sshd_pid is not None:
            keep = frozenset({self.sshd_pid})
        reap = [self._sshd] if self._sshd is not None else []
        return _kill_netns_processes(self.netns, keep=keep, timeout=timeout, reap=reap)

    # -- sshd --------------------------------------------------------------

    def _launch_sshd(self) -> None:
        sshd = _which("sshd") or "/usr/sbin/sshd"
        argv = self.ns_argv([sshd, "-D", "-e", "-f", str(self.sshd_config_path)])
        if threading.current_thread() is threading.main_thread():
            # sshd dies with the test process even on SIGKILL.  Only from the
            # main thread: the death signal fires when the *thread* that
            # forked exits, which would kill sshd with a worker thread.
            argv = ["setpriv", "--pdeathsig", "KILL", *argv]
        with open(self.log_path, "ab") as log:
            self._sshd = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a test's killpg or a terminal ^C must not hit it.
                start_new_session=True,
            )

    def _stop_sshd(self) -> None:
        if self._sshd is None:
            return
        ns_id = _netns_id(self.netns)
        if self._sshd.poll() is None and ns_id is not None:
            _signal_in_netns(self._sshd.pid, ns_id, signal.SIGKILL)
        try:
            self._sshd.wait(timeout=10)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"sshd {self._sshd.pid} on {self.name} did not exit") from exc
        self._sshd = None

    def log_tail(self, n_bytes: int = 2000) -> str:
        """Return the end of the host's sshd log (for error messages).

        Parameters
        ----------
        n_bytes : int
            How many bytes from the end to return.

        Returns
        -------
        str
        """
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_bytes:].decode(errors="replace")

    def restart_sshd(self, *, timeout: float = 15.0) -> None:
        """(Re)start the host's sshd and wait until it accepts connections.

        Existing SSH sessions are left alone.

        Parameters
        ----------
        timeout : float
            Seconds to wait for port 22 to accept.

        Raises
        ------
        LabError
            If sshd exits or does not accept in time.
        """
        self._stop_sshd()
        self._launch_sshd()
        self.lab._wait_ready([self], timeout)

    def rotate_host_key(self) -> str:
        """Give the host a new host key and restart sshd.

        The lab's known_hosts is NOT updated, so strict clients must now
        refuse the host.  ``Lab.reset`` restores the original key.

        Returns
        -------
        str
            The new public key in OpenSSH format.
        """
        self._write_host_key(_new_key(f"{self.name}-rotated"))
        self.restart_sshd()
        return self.host_public_key

    def restore_host_key(self) -> bool:
        """Put back the host key listed in known_hosts, if it was rotated.

        Returns
        -------
        bool
            True if the key had to be restored (sshd was restarted).
        """
        if self.host_public_key == self._original_host_key:
            return False
        _write_private(self.host_key_path, (self.dir / "ssh_host_ed25519_key.orig").read_text())
        self.host_public_key = self._original_host_key
        self.restart_sshd()
        return True

    # -- network -----------------------------------------------------------

    def cut(self) -> None:
        """Unplug the host: its switch port goes down, packets are dropped.

        Connections neither get a reset nor complete; they time out, as
        with a dead cable or a partitioned network.
        """
        _ip("link", "set", self.port_name, "down", netns=self.lab.switch_netns)

    def heal(self) -> None:
        """Plug the host back in (undo :meth:`cut`)."""
        _ip("link", "set", self.port_name, "up", netns=self.lab.switch_netns)

    @property
    def link_up(self) -> bool:
        """Whether the host's switch port is up (not :meth:`cut`)."""
        return self.lab._port_states().get(self.port_name, False)

    @property
    def is_up(self) -> bool:
        """Whether the host is reachable: link up and sshd running."""
        return self.sshd_running and self.link_up

    # -- topologies (firewall and sshd settings; reset() undoes them) --------

    def set_sshd_option(self, key: str, value: str) -> None:
        """Set one sshd_config option (e.g. ``MaxStartups 2:100:2``) and restart sshd.

        ``Lab.reset`` puts the lab's own settings back.
        """
        self.sshd_overrides[key] = value
        self._write_sshd_config()
        self.restart_sshd()

    def firewall(self, rules: Sequence[str]) -> None:
        """Load nftables ``rules`` into an input chain inside this host's namespace.

        The rules go into table ``inet sclab`` of the host's own namespace
        (never the machine's), after "established traffic and loopback are
        accepted". Deleting the namespace, or ``Lab.reset``, removes them.

        Parameters
        ----------
        rules : sequence of str
            nftables rule statements, e.g. ``"tcp dport 22 drop"``.
        """
        body = "\n".join(f"    {rule}" for rule in rules)
        # The lab's own rules (no IPv4) come before anything is accepted, established traffic included.
        base = "".join(f"    {rule}\n" for rule in self.base_rules)
        output = ""
        if self.base_output_rules:
            output = (
                "  chain output {\n"
                "    type filter hook output priority 0; policy accept;\n"
                + "".join(f"    {rule}\n" for rule in self.base_output_rules)
                + "  }\n"
            )
        script = (
            "table inet sclab\n"
            "delete table inet sclab\n"
            "table inet sclab {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"{base}"
            "    ct state established,related accept\n"
            '    iifname "lo" accept\n'
            f"{body}\n"
            "  }\n"
            f"{output}"
            "}\n"
        )
        self.firewalled = True
        _run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"], input=script)

    def clear_firewall(self) -> None:
        """Remove what :meth:`firewall` loaded (nothing when it loaded nothing)."""
        if not self.firewalled:
            return
        if self.base_rules or self.base_output_rules:
            self.firewall([])  # back to the lab's own rules
            return
        _run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"],
             input="table inet sclab\ndelete table inet sclab\n")
        self.firewalled = False

    def ssh_peers(self) -> list[str]:
        """Addresses with an established TCP connection to this host's sshd, one per connection."""
        out = _run(["ip", "netns", "exec", self.netns, "ss", "-Htn", "state", "established",
                    "( sport = :22 )"])
        peers = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                peers.append(fields[-1].rsplit(":", 1)[0].strip("[]"))
        return peers


# --------------------------------------------------------------------------
# reset report
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ResetReport:
    """What :meth:`Lab.reset` had to repair.

    Attributes
    ----------
    killed : dict
        Host name -> processes killed there (anything but the listening sshd
        that was still running after a short grace period).
    healed : list of str
        Hosts whose link was cut.
    restarted : list of str
        Hosts whose sshd was dead and had to be restarted.
    keys_restored : list of str
        Hosts whose rotated host key was put back.
    """

    killed: dict[str, list[Proc]] = dataclasses.field(default_factory=dict)
    healed: list[str] = dataclasses.field(default_factory=list)
    restarted: list[str] = dataclasses.field(default_factory=list)
    keys_restored: list[str] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when no process had to be killed."""
        return not any(self.killed.values())

    def __str__(self) -> str:
        parts = []
        for host, procs in sorted(self.killed.items()):
            for proc in procs:
                parts.append(f"killed {host}:{proc.pid} {' '.join(proc.argv)[:200]}")
        if self.healed:
            parts.append("healed links: " + ", ".join(self.healed))
        if self.restarted:
            parts.append("restarted sshd: " + ", ".join(self.restarted))
        if self.keys_restored:
            parts.append("restored host keys: " + ", ".join(self.keys_restored))
        return "\n".join(parts) if parts else "lab clean"


# --------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------


class Lab:
    """A set of SSH hosts in network namespaces behind one virtual switch.

    Parameters
    ----------
    n_hosts : int
        Number of hosts, ``h1`` .. ``hN`` (1 to 200).
    prefix : str
        Prefix of every namespace and root-namespace link the lab creates
        (lowercase letters and digits, at most 10 characters).
    subnet_base : str
        First three octets of the /24; the head is ``.1``, host ``i`` is
        ``.(10+i)``.
    start_timeout : float
        Seconds to wait for all sshds to accept connections.
    lock_timeout : float, optional
        Seconds to wait for another lab with the same prefix or subnet (in
        another process) to finish.  Default: ``$SCLAB_LOCK_TIMEOUT`` or 240.
    keep_workdir : bool
        Keep the work dir (keys, configs, sshd logs) after :meth:`stop`.
    check_mesh : bool
        On start, check that hosts reach each other through the switch.
    ipv6 : bool
        Also give the head and every host an IPv6 address (``nodad``) in
        the ULA /64 made from the subnet (``10.250.71`` -> ``fd00:250:71::/64``;
        head ``::1``, host ``i`` ``::(10+i)``), listed in known_hosts, the
        hosts' /etc/hosts and the lab's ssh_config; sshd listens on both.
    ipv4 : bool
        ``False`` (needs ``ipv6``) drops every IPv4 packet in and out of
        each host's namespace except on loopback (nftables, in the hosts'
        own namespaces only), after start: an IPv6-only lab. The hosts keep
        their IPv4 addresses, so a dual-stack name still resolves to both.

    Attributes
    ----------
    hosts : list of LabHost
        The hosts, ``h1`` first (filled by :meth:`start`).
    head_ip : str
        Address of the head (this machine) on the lab subnet.
    start_seconds, stop_seconds : float or None
        Duration of the last start (without waiting for another lab) and stop.
    lock_wait_seconds : float or None
        Time the last start waited for another lab on the same prefix/subnet.

    Examples
    --------
    >>> with Lab(2) as lab:                                  # doctest: +SKIP
    ...     lab.hosts[0].exec(["hostname"]).stdout
    'h1\\n'
    """

    def __init__(
        self,
        n_hosts: int,
        *,
        prefix: str = "sclab",
        subnet_base: str = "10.250.0",
        start_timeout: float = 30.0,
        lock_timeout: float | None = None,
        keep_workdir: bool = False,
        check_mesh: bool = True,
        ipv6: bool = False,
        ipv4: bool = True,
    ) -> None:
        if not 1 <= n_hosts <= _MAX_HOSTS:
            raise ValueError(f"n_hosts must be between 1 and {_MAX_HOSTS}, got {n_hosts}")
        if not _PREFIX_RE.match(prefix) or len(f"{prefix}-head") > _IFNAME_MAX:
            raise ValueError(f"prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
        try:
            net = ipaddress.IPv4Network(f"{subnet_base}.0/24")
        except ValueError as exc:
            raise ValueError(f"subnet_base must be three octets, got {subnet_base!r}") from exc
        if not net.is_private:
            raise ValueError(f"subnet {net} is not private")
        if not ipv4 and not ipv6:
            raise ValueError("a lab without IPv4 needs ipv6=True")
        self.ipv6 = ipv6
        self.ipv4 = ipv4
        # The octets as written become hex groups: 10.250.71 -> fd00:250:71::/64 (valid hex, easy to read).
        o2, o3 = subnet_base.split(".")[1:3]
        self.prefix6 = f"fd00:{o2}:{o3}"
        self.subnet6 = f"fd00:{o2}:{o3}::/64"
        self.head_ip6: str | None = str(ipaddress.IPv6Address(f"{self.prefix6}::1")) if ipv6 else None
        self.n_hosts = n_hosts
        self.prefix = prefix
        self.subnet_base = subnet_base
        self.subnet = str(net)
        self.head_ip = f"{subnet_base}.1"
        self.head_link = f"{prefix}-head"
        self.switch_netns = f"{prefix}-sw"
        self.start_timeout = start_timeout
        if lock_timeout is None:
            lock_timeout = float(os.environ.get("SCLAB_LOCK_TIMEOUT", "240"))
        self.lock_timeout = lock_timeout
        self.keep_workdir = keep_workdir
        self.check_mesh = check_mesh
        self.hosts: list[LabHost] = []
        self._workdir: Path | None = None
        # Namespace names come from the prefix, addresses from the subnet:
        # a second lab sharing either would wreck this one.
        self._lock_keys = [f"prefix-{prefix}", subnet_base]
        self._locks = [_FileLock(key) for key in self._lock_keys]
        self._started = False
        self.lock_wait_seconds: float | None = None
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # -- paths -------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """Directory (mode 0700) with keys, configs and sshd logs."""
        if self._workdir is None:
            raise LabError("lab not started")
        return self._workdir

    @property
    def client_key(self) -> Path:
        """Private ed25519 key that every host accepts for root."""
        return self.workdir / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        """The authorized_keys file shared by every sshd."""
        return self.workdir / "authorized_keys"

    def user_authorized_keys(self, user: str) -> Path:
        """The authorized_keys file of account ``user`` alone (sshd reads it as that user)."""
        return self.workdir / f"authorized_keys.{user}"

    @property
    def known_hosts(self) -> Path:
        """known_hosts with every host's key under its IP and its name."""
        return self.workdir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        """OpenSSH client config with a Host entry per lab host (``ssh -F``)."""
        return self.workdir / "ssh_config"

    @property
    def resolv_conf(self) -> Path:
        """resolv.conf mounted in every host (fails fast)."""
        return self.workdir / "resolv.conf"

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"<Lab {self.prefix} {self.subnet} hosts={self.n_hosts} {state}>"

    def host(self, key: str) -> LabHost:
        """Look a host up by name (``h2``), IP or namespace name.

        Parameters
        ----------
        key : str
            Name, IP address or netns name.

        Returns
        -------
        LabHost
        """
        for host in self.hosts:
            if key in (host.name, host.ip, host.netns) or (host.ip6 and key == host.ip6):
                return host
        raise KeyError(key)

    def connect_options(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for :func:`asyncssh.connect` to a lab host.

        Strict host-key checking against :attr:`known_hosts`, the lab key
        only, and no ``~/.ssh/config`` or agent of the developer.

        Parameters
        ----------
        **overrides
            Replace or add options.

        Returns
        -------
        dict
        """
        options: dict[str, Any] = {
            "username": "root",
            "client_keys": [str(self.client_key)],
            "known_hosts": str(self.known_hosts),
            "config": None,
            "agent_path": None,
            "connect_timeout": 10,
        }
        options.update(overrides)
        return options

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Lab:
        """Build the lab and wait until every sshd accepts connections.

        Leftovers of an earlier crashed lab with the same prefix are
        removed first.  On failure everything built so far is torn down.

        Returns
        -------
        Lab
            ``self``.

        Raises
        ------
        RuntimeError
            If the machine cannot host the lab (see :func:`require_lab_support`).
        LabError
            If building the lab fails.
        """
        if self._started:
            return self
        require_lab_support()
        if _ACTIVE_KEYS.intersection(self._lock_keys):
            raise LabError(
                f"this process already runs a lab with prefix {self.prefix!r} or on {self.subnet}"
            )
        t0 = time.monotonic()
        acquired: list[_FileLock] = []
        try:
            for lock in self._locks:  # always in this order: no deadlock
                lock.acquire(self.lock_timeout)
                acquired.append(lock)
        except BaseException:
            for lock in reversed(acquired):
                lock.release()
            raise
        # Build time is measured without the wait for another lab.
        self.lock_wait_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        _ACTIVE_KEYS.update(self._lock_keys)
        _ACTIVE_LABS.add(self)
        self._started = True
        atexit.register(self.stop)
        _install_sigterm_handler()
        try:
            cleanup_leftovers(self.prefix, self.subnet_base)
            self._check_subnet_free()
            self._make_files()
            self._make_network()
            _PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
            for host in self.hosts:
                host._launch_sshd()
            self._wait_ready(self.hosts, self.start_timeout)
            if self.check_mesh:
                self.verify_mesh()
            if not self.ipv4:
                self.drop_ipv4()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Tear the lab down: processes, namespaces, links, files.

        Safe to call twice and on a partly built lab.  Every step is tried
        even if an earlier one fails; the first error is raised at the end.

        Raises
        ------
        LabError
            If something could not be removed.
        """
        if not self._started:
            return
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def attempt(func: Any, *args: Any) -> None:
            try:
                func(*args)
            except Exception as exc:  # keep tearing down, report at the end
                errors.append(exc)

        for host in self.hosts:
            attempt(host.kill_all)
        attempt(_kill_netns_processes, self.switch_netns)
        attempt(cleanup_leftovers, self.prefix)
        attempt(self._release_netns_mount)
        if self._workdir is not None:
            if self.keep_workdir:
                attempt((self._workdir / _WORKDIR_MARKER).unlink, True)
            else:
                attempt(shutil.rmtree, self._workdir)
        # Checked while still holding the locks: a lab that starts right
        # after us may legitimately own namespaces with our prefix.
        try:
            left = leftovers(self.prefix)
        except Exception as exc:
            errors.append(exc)
        else:
            if any(left.values()):
                errors.append(LabError(f"lab left things behind: {left}"))
        self._started = False
        _ACTIVE_LABS.discard(self)
        _ACTIVE_KEYS.difference_update(self._lock_keys)
        atexit.unregister(self.stop)
        for lock in reversed(self._locks):
            lock.release()
        self.stop_seconds = time.monotonic() - t0
        if errors:
            raise LabError(f"lab teardown failed: {errors[0]}") from errors[0]

    def reset(self, *, grace: float = 1.0) -> ResetReport:
        """Bring every host back to its initial state between tests.

        Heals cut links, restores rotated host keys, kills every process
        but the listening sshd, and restarts dead sshds.  SSH session
        processes get up to ``grace`` seconds to exit by themselves, since a
        client that just disconnected leaves them running for a moment.

        Parameters
        ----------
        grace : float
            Seconds to let sshd session processes finish on their own.

        Returns
        -------
        ResetReport
            What had to be repaired; ``report.clean`` is False when a test
            left processes behind.
        """
        report = ResetReport()
        states = self._port_states()
        down = [h for h in self.hosts if not states.get(h.port_name, False)]
        if down:
            _ip_batch([f"link set {h.port_name} up" for h in down], netns=self.switch_netns)
            report.healed = [h.name for h in down]
        deadline = time.monotonic() + grace
        for host in self.hosts:
            master = host.sshd_pid
            while master is not None and time.monotonic() < deadline:
                others = [p for p in host.pids() if p != master]
                # Only wait for sessions of our sshd (they end right after
                # their client leaves); anything else is a leftover.
                if not others or not all(_descends_from(p, master) for p in others):
                    break
                time.sleep(0.01)
            killed = host.kill_all(exclude_sshd=True)
            if killed:
                report.killed[host.name] = killed
        for host in self.hosts:
            # Topologies first: a firewall or sshd setting must not outlive its test.
            host.clear_firewall()
            if host.sshd_overrides:
                host.sshd_overrides.clear()
                host._write_sshd_config()
                host.restart_sshd()
                report.restarted.append(host.name)
        for host in self.hosts:
            if host.host_public_key != host._original_host_key:
                host.restore_host_key()
                report.keys_restored.append(host.name)
            elif not host.sshd_running:
                host.restart_sshd()
                report.restarted.append(host.name)
        return report

    # -- building ------------------------------------------------------------

    def _check_subnet_free(self) -> None:
        out = _run(["ip", "-o", "addr", "show"])
        nets = [ipaddress.ip_network(self.subnet)] + ([ipaddress.ip_network(self.subnet6)] if self.ipv6 else [])
        for line in out.splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[2] in ("inet", "inet6"):
                iface = ipaddress.ip_interface(fields[3])
                net = next((n for n in nets if n.version == iface.version), None)
                if net is None:
                    continue
                if iface.network.overlaps(net):
                    raise LabError(
                        f"{fields[1]} already has {fields[3]}, which overlaps the lab "
                        f"subnet {net}; remove it or pick another subnet_base"
                    )

    def drop_ipv4(self) -> None:
        """Drop every IPv4 packet of the hosts but loopback's, both ways (their own nftables only).

        An ``ipv6`` lab becomes IPv6-only; ``reset()`` keeps this, :meth:`restore_ipv4` undoes it.
        """
        if not self.ipv6:
            raise LabError("dropping IPv4 leaves nothing: make the lab with ipv6=True")
        for host in self.hosts:
            host.base_rules = ['iifname != "lo" meta nfproto ipv4 drop']
            host.base_output_rules = ['oifname != "lo" meta nfproto ipv4 drop']
            host.firewall([])

    def drop_ipv4_between_hosts(self) -> None:
        """Drop IPv4 between the lab hosts only (head <-> host stays open), both ways, in their own nftables.

        A dual-stack lab whose hosts reach each other over IPv6 alone;
        ``reset()`` keeps this, :meth:`restore_ipv4` undoes it.
        """
        if not self.ipv6:
            raise LabError("dropping IPv4 between the hosts leaves them nothing: make the lab with ipv6=True")
        for host in self.hosts:
            others = ", ".join(h.ip for h in self.hosts if h is not host)
            host.base_rules = [f"ip saddr {{ {others} }} drop"]
            host.base_output_rules = [f"ip daddr {{ {others} }} drop"]
            host.firewall([])

    def restore_ipv4(self) -> None:
        """Undo :meth:`drop_ipv4` (and any other firewall of the hosts)."""
        for host in self.hosts:
            host.base_rules, host.base_output_rules = [], []
            host.clear_firewall()

    def _make_files(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        os.chmod(self._workdir, 0o700)
        (self._workdir / _WORKDIR_MARKER).write_text(self.subnet_base + "\n")
        self.hosts = [LabHost(self, i) for i in range(1, self.n_hosts + 1)]

        client = _new_key(f"{self.prefix}-client")
        _write_private(self.client_key, client.export_private_key("openssh").decode())
        public = client.export_public_key("openssh").decode()
        (self.workdir / "id_ed25519.pub").write_text(public)
        self.authorized_keys.write_text(public)
        self.resolv_conf.write_text(_RESOLV_CONF)

        hosts_lines = [
            "127.0.0.1 localhost",
            "::1 localhost ip6-localhost ip6-loopback",
            f"{self.head_ip} head",
        ] + [f"{h.ip} {h.name}" for h in self.hosts]
        if self.ipv6:
            hosts_lines += [f"{self.head_ip6} head"] + [f"{h.ip6} {h.name}" for h in self.hosts]
        known_lines = []
        config_lines = []
        for host in self.hosts:
            host.dir.mkdir(mode=0o700)
            host.var_tmp.mkdir()
            os.chmod(host.var_tmp, 0o1777)  # as /var/tmp is: sticky, everyone's
            key = _new_key(host.name)
            host._write_host_key(key)
            host._original_host_key = host.host_public_key
            # Kept for restore_host_key after a rotation.
            _write_private(host.dir / "ssh_host_ed25519_key.orig", host.host_key_path.read_text())
            host.hosts_path.write_text("\n".join(hosts_lines) + "\n")
            host._write_sshd_config()
            v6 = f",{host.ip6}" if host.ip6 else ""
            known_lines.append(f"{host.ip}{v6},{host.name} {host.host_public_key}")
            config_lines += [
                *self._ssh_config_stanza(host),
                "",
            ]
        self.known_hosts.write_text("\n".join(known_lines) + "\n")
        self.ssh_config.write_text("\n".join(config_lines))

    def _mac(self, kind: int, index: int) -> str:
        # Fixed, locally administered MACs: a re-created lab must not leave
        # neighbours with stale ARP entries for the same IPs.
        o2, o3 = (int(x) for x in self.subnet_base.split(".")[1:3])
        return f"02:{o2:02x}:{o3:02x}:{kind:02x}:00:{index:02x}"

    def _make_network(self) -> None:
        sw = self.switch_netns
        root = [f"netns add {sw}"] + [f"netns add {h.netns}" for h in self.hosts]
        root.append(
            f"link add {self.head_link} address {self._mac(0xFE, 1)} type veth"
            f" peer name head address {self._mac(0xFD, 1)} netns {sw}"
        )
        for h in self.hosts:
            root.append(
                f"link add {h.port_name} address {self._mac(0x01, h.index)} netns {sw}"
                f" type veth peer name eth0 address {self._mac(0x00, h.index)} netns {h.netns}"
            )
        root += [
            f"addr add {self.head_ip}/24 dev {self.head_link}",
            *([f"addr add {self.head_ip6}/64 dev {self.head_link} nodad"] if self.ipv6 else []),
            f"link set {self.head_link} up",
        ]
        _ip_batch(root)

        switch = [
            f"link add br0 address {self._mac(0xFF, 1)} type bridge",
            "link set br0 up",
            "link set head master br0 up",
        ] + [f"link set {h.port_name} master br0 up" for h in self.hosts]
        _ip_batch(switch, netns=sw)

        for h in self.hosts:
            _ip_batch(
                [
                    "link set lo up",
                    f"addr add {h.ip}/24 dev eth0",
                    *([f"addr add {h.ip6}/64 dev eth0 nodad"] if h.ip6 else []),
                    "link set eth0 up",
                ],
                netns=h.netns,
            )

    def _wait_ready(self, hosts: Sequence[LabHost], timeout: float) -> None:
        pending = list(hosts)
        deadline = time.monotonic() + timeout
        while pending:
            for host in list(pending):
                proc = host._sshd
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise LabError(
                        f"sshd on {host.name} exited ({code}); log:\n{host.log_tail()}"
                    )
                # With IPv4 dropped (drop_ipv4) sshd answers on IPv6 alone.
                if _tcp_accepts(str(host.ip6) if host.base_rules else host.ip, _SSH_PORT, 0.5):
                    pending.remove(host)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(h.name for h in pending)
                raise LabError(f"sshd did not accept within {timeout}s on: {names}")
            time.sleep(0.02)

    def verify_mesh(self, timeout: float = 20.0) -> None:
        """Check that the first host reaches every other host's sshd.

        This catches a switch that drops bridged traffic.

        Parameters
        ----------
        timeout : float
            Seconds for the whole check.

        Raises
        ------
        LabError
            If some host cannot be reached from the first one.
        """
        if len(self.hosts) < 2:
            return
        probe = (
            "import socket, sys\n"
            "bad = []\n"
            "for ip in sys.argv[1:]:\n"
            "    try:\n"
            "        socket.create_connection((ip, 22), timeout=3).close()\n"
            "    except OSError as exc:\n"
            "        bad.append(f'{ip}: {exc}')\n"
            "print('; '.join(bad))\n"
            "sys.exit(1 if bad else 0)\n"
        )
        first = self.hosts[0]
        res = first.exec(
            [sys.executable, "-I", "-S", "-c", probe,
             *(ip for h in self.hosts[1:] for ip in (h.ip, h.ip6) if ip)],
            timeout=timeout,
        )
        if res.returncode != 0:
            raise LabError(
                f"{first.name} cannot reach other lab hosts through the switch: "
                f"{res.stdout.strip()} {res.stderr.strip()}"
            )

    def _port_states(self) -> dict[str, bool]:
        out = _ip("-o", "link", "show", netns=self.switch_netns)
        states: dict[str, bool] = {}
        for line in out.splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                name = parts[1].strip().split("@", 1)[0]
                flags = parts[2].split(">", 1)[0]
                states[name] = "UP" in flags.strip(" <").split(",")
        return states

    def _release_netns_mount(self) -> None:
        # `ip netns add` turns /run/netns into a bind mount of itself and
        # leaves it there.  Undo that once no namespace is left (another lab
        # may still run; `ip` re-creates the mount when needed).  A failure
        # (EBUSY: a namespace was just added) is harmless, so it is ignored.
        path = str(_NETNS_DIR)
        for _ in range(4):
            if _netns_list() or not _mount_count(path):
                break
            res = subprocess.run(["umount", path], capture_output=True, text=True, timeout=10)
            if res.returncode != 0:
                return
        with contextlib.suppress(OSError):
            _NETNS_DIR.rmdir()

    # -- topologies ----------------------------------------------------------

    def make_bastion(self, host: LabHost, max_startups: str = "2:100:2") -> None:
        """Make ``host`` a hardened bastion: sshd with a strict ``MaxStartups``."""
        host.set_sshd_option("MaxStartups", max_startups)

    def make_private(self, hosts: Sequence[LabHost], bastions: Sequence[LabHost], *, from_head: str = "ssh") -> None:
        """Put ``hosts`` on a "private network" reached over SSH only through ``bastions``.

        Inside each host's namespace, SSH is accepted only from the
        bastions. ``from_head="all"`` also drops every other connection the
        head opens (the hosts may still open connections to the head; note
        that a scheduler on the head then cannot connect to its workers,
        which dask needs to gather results); ``"ssh"`` drops only SSH.
        """
        if from_head not in ("ssh", "all"):
            raise ValueError(f"from_head must be 'ssh' or 'all', got {from_head!r}")
        allowed = ", ".join(b.ip for b in bastions)
        rules = [f"tcp dport {_SSH_PORT} ip saddr != {{ {allowed} }} drop"]
        if from_head == "all":
            rules.append(f"ip saddr {self.head_ip} drop")
        if self.ipv6:  # an "ip saddr" rule matches IPv4 packets only
            allowed6 = ", ".join(str(b.ip6) for b in bastions)
            rules.append(f"tcp dport {_SSH_PORT} ip6 saddr != {{ {allowed6} }} drop")
            if from_head == "all":
                rules.append(f"ip6 saddr {self.head_ip6} drop")
        for host in hosts:
            host.firewall(rules)

    def make_ssh_only(self, hosts: Sequence[LabHost]) -> None:
        """Let the head open only SSH connections to ``hosts`` (other ports are dropped)."""
        for host in hosts:
            rules = [f"ip saddr {self.head_ip} tcp dport != {_SSH_PORT} drop",
                     f"ip saddr {self.head_ip} meta l4proto != tcp drop"]
            if self.ipv6:
                rules += [f"ip6 saddr {self.head_ip6} tcp dport != {_SSH_PORT} drop",
                          f"ip6 saddr {self.head_ip6} meta l4proto != {{ tcp, ipv6-icmp }} drop"]
            host.firewall(rules)

    def write_ssh_config(
        self, path: str | os.PathLike[str], jumps: Mapping[str, str] | None = None, *, family: int = 4,
        names: Mapping[str, str] | None = None,
    ) -> Path:
        """Write an ssh_config like :attr:`ssh_config`, with ``ProxyJump`` lines.

        Parameters
        ----------
        path : path-like
            File to write.
        jumps : mapping, optional
            Host name -> ``ProxyJump`` value (e.g. ``{"h2": "h1"}``).
        family : int
            4 or 6: which address of each host ``HostName`` gives.
        names : mapping, optional
            Host name -> another name the stanza also answers to (e.g.
            ``{"h1": "h1-v6"}``): with ``family=6``, a name that resolves
            (through this file) to the host's IPv6 address alone.
        """
        jumps = dict(jumps or {})
        names = dict(names or {})
        lines = []
        for host in self.hosts:
            stanza = self._ssh_config_stanza(host, family)
            if host.name in names:
                stanza[0] += f" {names[host.name]}"
            lines += stanza
            if host.name in jumps:
                lines.append(f"    ProxyJump {jumps[host.name]}")
            lines.append("")
        out = Path(path)
        out.write_text("\n".join(lines))
        return out

    # -- inventory -----------------------------------------------------------

    def _ssh_config_stanza(self, host: LabHost, family: int = 4) -> list[str]:
        """The ``Host`` block of an ssh_config that reaches ``host`` with the lab's key, strictly.

        ``family=6`` makes ``HostName`` the host's IPv6 address (an ``ipv6`` lab).
        """
        aliases = " ".join([host.name, host.ip] + ([host.ip6] if host.ip6 else []))
        return [
            f"Host {aliases}",
            f"    HostName {host.ip6 if family == 6 else host.ip}",
            "    User root",
            f"    IdentityFile {self.client_key}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {self.known_hosts}",
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    BatchMode yes",
            "    ConnectTimeout 10",
        ]

    def write_inventory(
        self,
        path: str | os.PathLike[str],
        *,
        groups: Mapping[str, Sequence[str]] | None = None,
        host_vars: Mapping[str, Mapping[str, Any]] | None = None,
        group_vars: Mapping[str, Mapping[str, Any]] | None = None,
        python: str = sys.executable,
        family: int = 4,
    ) -> Path:
        """Write an Ansible YAML inventory describing the lab.

        Every host entry carries its full connection vars (``ansible_host``,
        ``ansible_user``, ``ansible_ssh_private_key_file``,
        ``speccluster_python``) wherever it is listed; ``all.vars`` carries
        the OpenSSH options that make plain ``ssh``/Ansible check host keys
        strictly against the lab's known_hosts.

        Parameters
        ----------
        path : path-like
            File to write (parent directories are created).
        groups : mapping, optional
            Group name -> host names, e.g. ``{"scheduler": ["h1"],
            "workers": ["h2", "h3"]}``.  Default: every host in ``workers``.
            Hosts in no group are listed under ``all.hosts``.
        host_vars : mapping, optional
            Host name -> extra vars (override the defaults).
        group_vars : mapping, optional
            Group name -> vars; the group ``all`` updates ``all.vars``.
        python : str
            Interpreter path for ``speccluster_python``.
        family : int
            4 or 6: ``ansible_host`` is each host's IPv4 or IPv6 address.

        Returns
        -------
        pathlib.Path
            The written file.

        Raises
        ------
        ValueError
            If a group or host_vars names an unknown host.
        """
        import yaml  # only needed here

        names = [h.name for h in self.hosts]
        if groups is None:
            groups = {"workers": names}
        host_vars = dict(host_vars or {})
        group_vars = dict(group_vars or {})
        for group, members in groups.items():
            unknown = [m for m in members if m not in names]
            if unknown:
                raise ValueError(f"group {group!r} names unknown hosts {unknown}")
        unknown = [h for h in host_vars if h not in names]
        if unknown:
            raise ValueError(f"host_vars for unknown hosts {unknown}")

        def entry(host: LabHost) -> dict[str, Any]:
            values: dict[str, Any] = {
                "ansible_host": host.ip6 if family == 6 else host.ip,
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.client_key),
                "speccluster_python": python,
            }
            values.update(host_vars.get(host.name, {}))
            return values

        all_vars: dict[str, Any] = {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.client_key),
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={self.known_hosts} "
                "-o GlobalKnownHostsFile=/dev/null "
                "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
            ),
            "speccluster_python": python,
        }
        all_vars.update(group_vars.get("all", {}))
        children: dict[str, Any] = {}
        for group, members in groups.items():
            if group == "all":
                continue
            body: dict[str, Any] = {"hosts": {m: entry(self.host(m)) for m in members}}
            if group_vars.get(group):
                body["vars"] = dict(group_vars[group])
            children[group] = body
        grouped = {m for group, members in groups.items() if group != "all" for m in members}
        inventory: dict[str, Any] = {"all": {"vars": all_vars}}
        ungrouped = {h.name: entry(h) for h in self.hosts if h.name not in grouped}
        if ungrouped:
            inventory["all"]["hosts"] = ungrouped
        if children:
            inventory["all"]["children"] = children

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(inventory, sort_keys=False, default_flow_style=False))
        return out


def processes_besides_sshd(lab: Lab) -> dict[str, list[Proc]]:
    """Every process on every lab host except its sshd, by host name (hosts with none left out).

    What a test means by "nothing of the cluster is left on any host".
    """
    out: dict[str, list[Proc]] = {}
    for host in lab.hosts:
        procs = [p for p in host.processes() if not (p.argv and "sshd" in p.argv[0])]
        if procs:
            out[host.name] = procs
    return out


def _main(argv: Sequence[str]) -> int:
    """Tiny CLI for humans: ``python tests/sshlab.py up 4 | cleanup | status``."""
    cmd = argv[0] if argv else "status"
    prefix = os.environ.get("SCLAB_PREFIX", "sclab")
    if cmd == "status":
        print(leftovers(prefix))
        return 0
    if cmd == "cleanup":
        for item in cleanup_leftovers(prefix):
            print("removed", item)
        return 0
    if cmd == "up":
        n = int(argv[1]) if len(argv) > 1 else 4
        with Lab(n, prefix=prefix, keep_workdir=True) as lab:
            print(f"lab up in {lab.start_seconds:.2f}s, workdir {lab.workdir}")
            print(f"try: ssh -F {lab.ssh_config} h1")
            print("press ^C to tear down")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    print(_main.__doc__, file=sys.stderr)
    return errno.EINVAL


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
