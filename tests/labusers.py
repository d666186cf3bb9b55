"""Ordinary users for lab tests: accounts on this machine (so on every lab host), and a way to act as them.

Lab hosts are network namespaces of this machine, so an account made here
with ``useradd`` exists on every lab host too. Each :class:`LabUser` has

* a home under ``/home`` (the head's state and the hosts' caches live there),
* its own SSH key, authorised for that account only (the lab's sshd reads
  ``authorized_keys.%u`` in the lab's work directory besides the shared file,
  see ``sshlab.py``), and a ``~/.ssh/known_hosts`` with the lab's host keys,
* the lab's shared authorized_keys readable, so that root's lab key (what a
  head run by root uses) logs in as the user too,
* :meth:`LabUser.cli` and :meth:`LabUser.python`, which run the command line
  or a Python script on the head *as that user* (``runuser``, a clean
  environment with the user's ``HOME``), returning the ``CompletedProcess``.

The user's python (:func:`build_user_python`, once per session) is Debian's
``/usr/bin/python3`` in a venv with the head's releases of distributed and
of this package's dependencies, and this checkout's ``src`` on its path: the
head's own python lives under ``/root``, which other users cannot enter.

Cleanup is by PID and by uid, never by name: every process of the account
is killed, its files in the shared temporary directories are removed, then
the account; an ``atexit`` hook does the same if the session dies first.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import psutil
import yaml

import speccluster_ssh
from proctools import kill_tree
from sshlab import Lab

# Distributions the head needs, installed in the users' python at the head's releases.
_HEAD_DISTRIBUTIONS = ("distributed", "dask", "asyncssh", "PyYAML", "click", "rich", "bokeh", "psutil", "cryptography")
_counter = itertools.count(1)


def build_user_python(root: Path) -> str:
    """Make a venv under ``root`` that any user can run, with what the head needs; return its python.

    Parameters
    ----------
    root
        A directory of root's; it is made readable and enterable by everyone.
    """
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    venv = root / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120, capture_output=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in _HEAD_DISTRIBUTIONS]
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", *pins], check=True, timeout=600,
                   capture_output=True)
    # This checkout's package, as the head runs it (never a copy that could lag behind).
    source = Path(speccluster_ssh.__file__).resolve().parents[1]
    site = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, timeout=30, capture_output=True, text=True).stdout.strip()
    (Path(site) / "speccluster_checkout.pth").write_text(f"{source}\n")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True, timeout=60)
    return str(venv / "bin/python")


@contextlib.contextmanager
def readable_by_all(path: Path) -> Iterator[None]:
    """Let every user read ``path`` and enter its folders, for a while (modes are put back after)."""
    chain = [path, *[p for p in path.parents if p != Path("/")]]
    modes = {p: p.stat().st_mode & 0o7777 for p in chain}
    try:
        path.chmod(modes[path] | 0o044)
        for folder in chain[1:]:
            folder.chmod(modes[folder] | 0o011)
        yield
    finally:
        for p, mode in modes.items():
            with contextlib.suppress(OSError):
                p.chmod(mode)


@dataclass
class LabUser:
    """An ordinary account for lab tests (see the module docstring).

    Attributes
    ----------
    name, uid, home
        The account.
    python
        The python it runs on the head and names as ``speccluster_python``.
    key
        Its private SSH key (``~/.ssh/id_ed25519``), authorised for it on every lab host.
    known_hosts
        ``~/.ssh/known_hosts``: the lab's host keys.
    lab
        The lab.
    """

    name: str
    uid: int
    home: Path
    python: str
    key: Path
    known_hosts: Path
    lab: Lab

    @property
    def state_root(self) -> Path:
        """Where the user's ``up`` keeps its clusters: the default under its home."""
        return self.home / ".local" / "state" / "speccluster-ssh"

    @property
    def cache_root(self) -> Path:
        """Where the user's host agents keep logs: the default under its home (lab hosts share this filesystem)."""
        return self.home / ".cache" / "speccluster-ssh"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean login-like environment of the user (nothing of root's leaks in)."""
        env = {
            "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "SHELL": "/bin/sh",
            "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": "200",
        }
        env.update(extra or {})
        return env

    def run(self, argv: Sequence[str], *, timeout: float = 150.0, env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the head as the user, in its home; its output is captured as text."""
        return subprocess.run(
            [_runuser(), "-u", self.name, "--", *argv], env=self.env(env), cwd=self.home, capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def cli(self, *args: str, timeout: float = 150.0, env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``speccluster-ssh ARGS`` as the user."""
        return self.run([self.python, "-m", "speccluster_ssh.cli", *args], timeout=timeout, env=env)

    def python_script(self, code: str, *, timeout: float = 150.0, env: Mapping[str, str] | None = None,
                      ) -> subprocess.CompletedProcess[str]:
        """Run the Python ``code`` as the user (written to a file of its own first)."""
        path = self.own_file(f"scripts/script-{next(_counter)}.py", code)
        return self.run([self.python, str(path)], timeout=timeout, env=env)

    def own_file(self, relative: str, text: str, mode: int = 0o644) -> Path:
        """Write ``text`` to ``~/relative``, owned by the user."""
        path = self.home / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chown(path.parent, self.uid, self.uid)
        path.write_text(text)
        os.chown(path, self.uid, self.uid)
        path.chmod(mode)
        return path

    def write_inventory(self, name: str, hosts: Sequence[str], host_vars: Mapping[str, Mapping[str, Any]] | None = None,
                        **common: Any) -> Path:
        """An inventory of the user's own (``~/NAME.yml``): ``hosts`` as workers, logged in as the user with its key.

        Workers run one thread; ``common`` goes to every host (``all.vars``).
        """
        all_vars: dict[str, Any] = {
            "ansible_user": self.name,
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={self.known_hosts} -o GlobalKnownHostsFile=/dev/null "
                "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
            ),
            "speccluster_python": self.python,
            "speccluster_nthreads": 1,
            **common,
        }
        entries = {h: {"ansible_host": self.lab.host(h).ip, **dict((host_vars or {}).get(h, {}))} for h in hosts}
        data = {"all": {"vars": all_vars, "children": {"workers": {"hosts": entries}}}}
        return self.own_file(f"{name}.yml", yaml.safe_dump(data, sort_keys=False))

    def processes(self) -> list[psutil.Process]:
        """Every process running as the user (its real uid), on the head and on every lab host."""
        found = []
        for proc in psutil.process_iter(["uids"]):
            uids = proc.info["uids"]
            if uids and self.uid in (uids.real, uids.effective):
                found.append(proc)
        return found

    def kill_processes(self, timeout: float = 30.0) -> list[int]:
        """SIGKILL every process of the user, by PID, until none is left; return the PIDs killed."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [p for p in self.processes() if p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            for proc in alive:
                killed.append(proc.pid)
                kill_tree(proc.pid)
            time.sleep(0.1)
        return killed


def _runuser() -> str:
    """The path of ``runuser`` (in an sbin directory, which the user's PATH leaves out)."""
    found = shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found is None:
        raise RuntimeError("runuser (util-linux) is missing; install util-linux")
    return found


def _remove_files_of(uid: int, directories: Sequence[Path]) -> None:
    """Remove what ``uid`` owns directly in each shared directory (its scratch, its lease files)."""
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


@contextlib.contextmanager
def lab_user(lab: Lab, python: str, stem: str = "scuser") -> Iterator[LabUser]:
    """A fresh ordinary account for the lab, removed afterwards with everything it left (see the module docstring).

    Parameters
    ----------
    lab
        The running lab.
    python
        The python of :func:`build_user_python`.
    stem
        The start of the account's name (a number unique to this session follows).
    """
    if os.geteuid() != 0:
        raise RuntimeError("lab users are made with useradd, which needs root")
    name = f"{stem}{os.getpid() % 100000}x{next(_counter)}"
    home = Path("/home") / name
    created = False
    uid = -1
    stack = contextlib.ExitStack()

    def remove() -> None:
        if not created:
            return
        user = LabUser(name, uid, home, python, home, home, lab)
        user.kill_processes()
        _remove_files_of(uid, [Path(tempfile.gettempdir()), *[h.var_tmp for h in lab.hosts]])
        subprocess.run(["userdel", "--remove", name], check=False, timeout=60, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        with contextlib.suppress(OSError, Exception):
            lab.user_authorized_keys(name).unlink()

    atexit.register(remove)  # if the session dies before the finally below
    try:
        subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh", name],
                       check=True, timeout=30, capture_output=True)
        created = True
        uid = pwd.getpwnam(name).pw_uid
        # No password, but not locked: sshd without PAM refuses locked accounts.
        subprocess.run(["usermod", "--password", "*", name], check=True, timeout=30, capture_output=True)
        user = LabUser(name, uid, home, python, home / ".ssh" / "id_ed25519", home / ".ssh" / "known_hosts", lab)
        key = asyncssh.generate_private_key("ssh-ed25519", comment=name)
        user.own_file(".ssh/id_ed25519", key.export_private_key("openssh").decode(), 0o600)
        public = key.export_public_key("openssh").decode()
        user.own_file(".ssh/id_ed25519.pub", public)
        user.own_file(".ssh/known_hosts", lab.known_hosts.read_text())
        (home / ".ssh").chmod(0o700)
        # sshd reads a user's authorized keys as that user: its own file, in a folder it may enter.
        authorized = lab.user_authorized_keys(name)
        authorized.write_text(public)
        os.chown(authorized, uid, uid)
        authorized.chmod(0o600)
        stack.enter_context(readable_by_all(lab.authorized_keys))
        yield user
    finally:
        stack.close()
        remove()
        atexit.unregister(remove)
