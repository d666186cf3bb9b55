"""The host's side of ``speccluster_environment: head``: receive wheels, build the environment, keep it tidy.

A shipped source like the agent's, but not one of ``AGENT_SOURCES``: it runs
*before* the agent, under the host's bare python (``speccluster_python``,
which may have no packages at all), so it imports only the standard library
and keeps to Python 3.8. The head starts it with the agent's bootstrap and
talks to it over one channel (see :mod:`speccluster_ssh.shipping`).

Protocol: JSON lines both ways; a wheel travels as one line
``{"op": "wheel", "sha256", "size", "filename"}`` followed by exactly
``size`` raw bytes.

1. This script says ``target`` (python minor, machine, libc, whether ``venv``
   and ``ensurepip`` work, the env dir).
2. Head ``need`` (fingerprint, pins, wheels): ``ready`` when
   ``<env_dir>/<fingerprint>/`` carries its marker; otherwise, under an
   exclusive ``flock`` of ``<env_dir>/<fingerprint>.lock`` (a second
   builder waits here, saying ``progress waiting``, then finds it ready),
   ``missing`` (which wheels the store ``<env_dir>/wheels/`` lacks).
3. Head ``wheel`` frames: each is hashed on arrival, written to a temp name,
   renamed to ``<sha256>.whl`` (``got``) or dropped (``bad_wheel``).
4. Head ``build``: venv in ``.tmp-<fingerprint>-<random>``, ``pip install
   --no-index``, ``import distributed``, marker written last, rename into
   place (``ready``); a failure removes the temp dir (``failed`` with the
   output's tail).
Head ``inspect`` (for ``check`` and ``plan``) only looks: ``state`` says
whether the environment is ready and which of its wheels the store holds.

5. Head ``bye`` (or EOF; ``collect`` false skips this): environments unused for ``gc_days`` that no live
   agent holds (a shared lock on their ``.lock``) are removed, then the
   script exits.

Other shipped sources run before ``main`` may add request handlers to
:data:`OPS` (a peer fetch of wheels, for one).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import select
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

MARKER = "speccluster-env.json"  # written last into a complete environment
LAST_USED = ".last-used"  # touched each time the environment is handed out
WHEELS = "wheels"  # the wheel store, shared by the environments, files named <sha256>.whl
TAIL_LINES = 40
HEARTBEAT = 5.0  # seconds between progress events while waiting or building
_FINGERPRINT = re.compile(r"^[0-9a-f]{8,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9_.+!-]+\.whl$")

#: op -> handler(session, message), for the ops other shipped sources add.
OPS: Dict[str, Callable[["EnvSession", Dict[str, Any]], None]] = {}


def default_env_dir() -> str:
    """``$XDG_CACHE_HOME/speccluster-ssh/envs``, else ``~/.cache/speccluster-ssh/envs``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "speccluster-ssh", "envs")


def wheel_path(store: str, sha256: str) -> str:
    """Where the wheel of content ``sha256`` lives in the wheel store ``store``."""
    return os.path.join(store, sha256 + ".whl")


def env_python(env: str) -> str:
    return os.path.join(env, "bin", "python")


def is_ready(env: str) -> bool:
    """A complete environment: its marker (written last) is there."""
    return os.path.isfile(os.path.join(env, MARKER)) and os.path.exists(env_python(env))


def touch(path: str) -> None:
    try:
        with open(path, "a"):
            pass
        os.utime(path, None)
    except OSError:
        pass


def target_facts() -> Dict[str, Any]:
    """What the head needs to pick the wheels: python minor, machine, libc; and whether venv works here."""
    facts = {
        "python": "%d.%d" % sys.version_info[:2],
        "version": platform.python_version(),
        "machine": platform.machine(),
        "libc": " ".join(x for x in platform.libc_ver() if x),
        "executable": sys.executable,
        "venv": _importable("venv"),
        "ensurepip": False,
    }
    try:
        import ensurepip

        facts["ensurepip"] = bool(ensurepip.version())  # Debian's stub without python3-venv fails here
    except Exception:
        pass
    return facts


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:
        return False


def open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


class EnvSession:
    """The channel to the head (stdin/stdout, byte-exact) and what this run holds."""

    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = config
        self.env_dir = os.path.abspath(os.path.expanduser(config.get("env_dir") or default_env_dir()))
        self.store = os.path.join(self.env_dir, WHEELS)
        self.gc_days = float(config.get("gc_days", 30))
        self.buf = b""
        self.eof = False
        self.lock_fd = -1  # the exclusive lock of the fingerprint being built
        self.need: Optional[Dict[str, Any]] = None

    # -- the channel ------------------------------------------------------
    def send(self, event: str, **fields: Any) -> None:
        data = (json.dumps(dict(fields, event=event)) + "\n").encode()
        while data:
            data = data[os.write(1, data):]

    def _fill(self, timeout: Optional[float] = None) -> bool:
        """Read what stdin has into the buffer; False at EOF (or nothing within ``timeout``)."""
        if timeout is not None and not select.select([0], [], [], timeout)[0]:
            return False
        chunk = os.read(0, 1 << 20)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_message(self) -> Optional[Dict[str, Any]]:
        while b"\n" not in self.buf:
            if self.eof or not self._fill():
                return None
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            return {"op": "garbage"}
        return message if isinstance(message, dict) else {"op": "garbage"}

    def read_bytes(self, n: int) -> bytes:
        """Up to ``n`` bytes of the stream (fewer only at EOF)."""
        if not self.buf and not self.eof:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    # -- locks ----------------------------------------------------------
    def lock_exclusive(self, path: str) -> int:
        """Take the exclusive lock at ``path``; while another holds it, say so, and give up if the head goes."""
        fd = open_lock(path)
        said = 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError:
                pass
            if time.monotonic() - said > HEARTBEAT:  # again and again: the head knows we are alive
                self.send("progress", phase="waiting", why="another build of this environment holds its lock")
                said = time.monotonic()
            # Nothing is expected from the head meanwhile; only its end matters.
            if self.eof or (select.select([0], [], [], 0.5)[0] and not self._fill(0)):
                os.close(fd)
                sys.exit(0)

    def unlock(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def handle_need(session: EnvSession, message: Dict[str, Any]) -> None:
    fingerprint = str(message.get("fingerprint") or "")
    wheels = message.get("wheels") or []
    if not _FINGERPRINT.match(fingerprint) or not all(_good_wheel(w) for w in wheels):
        session.send("error", error="a malformed need (fingerprint or wheel names)")
        return
    env = os.path.join(session.env_dir, fingerprint)
    if is_ready(env):  # no lock: a ready environment may be held (shared) by running agents
        _say_ready(session, env, built=False)
        return
    os.makedirs(session.store, exist_ok=True)
    session.lock_fd = session.lock_exclusive(env + ".lock")
    if is_ready(env):  # built by whoever held the lock
        session.unlock()
        _say_ready(session, env, built=False)
        return
    session.need = message
    missing = [w for w in wheels if not _have_wheel(session.store, w)]
    session.send("missing", wheels=[w["sha256"] for w in missing], bytes=sum(int(w["size"]) for w in missing))


def handle_inspect(session: EnvSession, message: Dict[str, Any]) -> None:
    """Whether the environment is ready, and which of its wheels the store holds: no lock, nothing changed."""
    fingerprint = str(message.get("fingerprint") or "")
    wheels = [w for w in message.get("wheels") or [] if _good_wheel(w)]
    if not _FINGERPRINT.match(fingerprint):
        session.send("error", error="a malformed fingerprint")
        return
    env = os.path.join(session.env_dir, fingerprint)
    have = [w["sha256"] for w in wheels if os.path.isfile(wheel_path(session.store, w["sha256"]))]
    session.send("state", ready=is_ready(env), python=env_python(env), have=have,
                 others=sorted(n for n in _listdir(session.env_dir) if _FINGERPRINT.match(n) and n != fingerprint))


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _good_wheel(wheel: Any) -> bool:
    return (isinstance(wheel, dict) and _SHA256.match(str(wheel.get("sha256"))) is not None
            and _WHEEL_NAME.match(str(wheel.get("filename"))) is not None and isinstance(wheel.get("size"), int))


def _have_wheel(store: str, wheel: Dict[str, Any]) -> bool:
    path = wheel_path(store, wheel["sha256"])
    try:
        if os.path.getsize(path) != int(wheel["size"]):
            return False
    except OSError:
        return False
    touch(path)  # in use: the store's collection keeps it
    return True


def _say_ready(session: EnvSession, env: str, built: bool) -> None:
    touch(os.path.join(env, LAST_USED))
    session.send("ready", python=env_python(env), lock=env + ".lock", env=env, built=built)


def receive_wheel(session: EnvSession, message: Dict[str, Any]) -> None:
    """Read one wheel frame into the store: hashed as it arrives, renamed into place only when it matches."""
    sha, size = str(message.get("sha256")), int(message.get("size") or 0)
    if not _SHA256.match(sha):
        session.read_bytes(0)
        session.send("error", error="a wheel frame without a sha256")
        return
    os.makedirs(session.store, exist_ok=True)
    tmp = os.path.join(session.store, ".tmp-%s-%s" % (sha[:16], os.urandom(4).hex()))
    digest = hashlib.sha256()
    problem = ""
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        problem = "cannot write %s: %s" % (tmp, exc.strerror or exc)
    left = size
    try:
        while left:
            chunk = session.read_bytes(min(left, 1 << 20))
            if not chunk:
                sys.exit(3)  # the head went away mid-wheel; the finally removes the temp file
            left -= len(chunk)
            digest.update(chunk)
            while chunk and fd >= 0 and not problem:
                try:
                    chunk = chunk[os.write(fd, chunk):]
                except OSError as exc:  # the frame is still read to its end, to keep the stream in step
                    problem = "cannot write %s: %s" % (tmp, exc.strerror or exc)
        if fd >= 0:
            os.close(fd)
            fd = -1
        if not problem and digest.hexdigest() != sha:
            problem = "its sha256 is %s, not %s as the head's manifest says" % (digest.hexdigest(), sha)
        if not problem:
            os.replace(tmp, wheel_path(session.store, sha))
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
    if problem:
        session.send("bad_wheel", sha256=sha, filename=message.get("filename"), why=problem)
    else:
        session.send("got", sha256=sha, size=size)


def handle_build(session: EnvSession, message: Dict[str, Any]) -> None:
    need = session.need
    if need is None or session.lock_fd < 0:
        session.send("error", error="build before need")
        return
    fingerprint = str(need["fingerprint"])
    env = os.path.join(session.env_dir, fingerprint)
    try:
        _clear_leftovers(session.env_dir, fingerprint)
        if os.path.lexists(env):  # no marker (checked under this lock): not ours to trust
            _remove(env)
        lacking = [w["filename"] for w in need["wheels"] if not _have_wheel(session.store, w)]
        if lacking:
            session.send("failed", reason="wheels missing on the host: " + ", ".join(lacking), tail="")
            return
        tmp = os.path.join(session.env_dir, ".tmp-%s-%s" % (fingerprint, os.urandom(4).hex()))
        try:
            failure = _build_in(session, tmp, need)
            if failure is not None:
                session.send("failed", reason=failure[0], tail=failure[1])
                return
            os.rename(tmp, env)
        finally:
            if os.path.lexists(tmp):
                _remove(tmp)
        _say_ready(session, env, built=True)
    finally:
        session.unlock()
        session.need = None


def _build_in(session: EnvSession, tmp: str, need: Dict[str, Any]) -> Optional[tuple]:
    """Build the environment in ``tmp``: None when done (marker written), else (reason, output tail)."""
    session.send("progress", phase="building", step="venv")
    # pip runs from python's own bundled wheel when there is one: seconds faster than installing it in the venv.
    pip_wheel = _pip_wheel()
    def beat(step: str) -> Callable[[], None]:
        return lambda: session.send("progress", phase="building", step=step)

    code, out = _run([sys.executable, "-m", "venv"] + (["--without-pip"] if pip_wheel else []) + [tmp], beat("venv"))
    if code:
        return "python -m venv failed (exit %d)" % code, _tail(out)
    links = os.path.join(tmp, ".speccluster-wheels")  # pip finds wheels by file name: link them under theirs
    os.mkdir(links)
    for wheel in need["wheels"]:
        os.symlink(wheel_path(session.store, wheel["sha256"]), os.path.join(links, wheel["filename"]))
    python = env_python(tmp)
    session.send("progress", phase="building", step="pip install")
    pins = [str(p) for p in need.get("pins") or []]
    pip = [python, os.path.join(pip_wheel, "pip")] if pip_wheel else [python, "-m", "pip"]
    code, out = _run(pip + ["install", "--no-index", "--find-links", links, "--no-input",
                      "--disable-pip-version-check", "--no-warn-script-location", "--no-compile", "--"] + pins,
                     beat("pip install"))
    if code:
        return "pip install --no-index failed (exit %d)" % code, _tail(out)
    session.send("progress", phase="building", step="check")
    code, out = _run([python, "-c", "import distributed; print(distributed.__version__)"], beat("check"))
    if code:
        return "the new environment cannot import distributed", _tail(out)
    shutil.rmtree(links)
    _fix_scripts(tmp, os.path.join(session.env_dir, str(need["fingerprint"])))
    record = {"fingerprint": need["fingerprint"], "pins": pins, "created": time.time(), "python": sys.executable,
              "wheels": [{"sha256": w["sha256"], "filename": w["filename"]} for w in need["wheels"]]}
    with open(os.path.join(tmp, MARKER + ".tmp"), "w") as f:
        json.dump(record, f)
    os.rename(os.path.join(tmp, MARKER + ".tmp"), os.path.join(tmp, MARKER))
    return None


def _pip_wheel() -> str:
    """The pip wheel that comes with this python (ensurepip's, or Debian's python3-pip-whl), or ""."""
    try:
        import ensurepip

        places = [os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"), "/usr/share/python-wheels"]
    except Exception:
        places = ["/usr/share/python-wheels"]
    for place in places:
        try:
            found = sorted(n for n in os.listdir(place) if n.startswith("pip-") and n.endswith(".whl"))
        except OSError:
            continue
        if found:
            return os.path.join(place, found[-1])
    return ""


def _run(argv: List[str], beat: Optional[Callable[[], None]] = None) -> tuple:
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1", PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    except OSError as exc:
        return 127, str(exc).encode()
    with proc:
        while True:
            try:
                out, _ = proc.communicate(timeout=HEARTBEAT)  # a retry loses none of the output
                return proc.returncode, out or b""
            except subprocess.TimeoutExpired:
                if beat is not None:
                    beat()


def _tail(out: bytes) -> str:
    return "\n".join(out.decode("utf-8", "replace").splitlines()[-TAIL_LINES:])


def _fix_scripts(tmp: str, final: str) -> None:
    """Point the console scripts' shebangs (and activate) at the final path, not the temp one."""
    bindir = os.path.join(tmp, "bin")
    old, new = tmp.encode(), final.encode()
    for name in os.listdir(bindir):
        path = os.path.join(bindir, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
            if old in data and b"\0" not in data:
                with open(path, "wb") as f:
                    f.write(data.replace(old, new))
        except OSError:
            pass


def _clear_leftovers(env_dir: str, fingerprint: str) -> None:
    """Temp dirs of this fingerprint that a killed builder left (we hold its lock, so none is live)."""
    prefix = ".tmp-%s-" % fingerprint
    for name in os.listdir(env_dir):
        if name.startswith(prefix):
            _remove(os.path.join(env_dir, name))


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def collect_garbage(env_dir: str, days: float, keep: str = "") -> List[str]:
    """Remove environments unused for ``days`` that no live agent holds, then wheels no environment names.

    Returns the names of the environments removed.
    """
    cutoff = time.time() - days * 86400
    removed: List[str] = []
    try:
        names = os.listdir(env_dir)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(env_dir, name)
        if name == keep or not _FINGERPRINT.match(name) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if _last_used(path) > cutoff:
            continue
        try:
            fd = open_lock(path + ".lock")
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while an agent holds it shared
        except OSError:
            os.close(fd)
            continue
        try:
            if _last_used(path) <= cutoff:
                doomed = os.path.join(env_dir, ".tmp-gc-%s-%s" % (name, os.urandom(4).hex()))
                os.rename(path, doomed)  # gone at once for everyone; removed at leisure
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    _collect_wheels(env_dir, cutoff)
    return removed


def _last_used(env: str) -> float:
    for name in (LAST_USED, MARKER, ""):
        try:
            return os.stat(os.path.join(env, name) if name else env).st_mtime
        except OSError:
            continue
    return 0.0


def _collect_wheels(env_dir: str, cutoff: float) -> None:
    store = os.path.join(env_dir, WHEELS)
    named = set()
    for name in os.listdir(env_dir):
        try:
            with open(os.path.join(env_dir, name, MARKER)) as f:
                named.update(w["sha256"] for w in json.load(f).get("wheels", ()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    try:
        files = os.listdir(store)
    except OSError:
        return
    for name in files:
        path = os.path.join(store, name)
        try:
            old = os.stat(path).st_mtime <= cutoff
        except OSError:
            continue
        # Fresh files may be a live build's: only old ones go.
        if old and (name.startswith(".tmp-") or (name.endswith(".whl") and name[:-4] not in named)):
            try:
                os.unlink(path)
            except OSError:
                pass


def main(config: Dict[str, Any]) -> None:
    """Say the target, then answer the head's requests until ``bye`` or EOF, then collect garbage."""
    session = EnvSession(config)
    session.send("target", env_dir=session.env_dir, **target_facts())
    handlers = dict(OPS, need=handle_need, wheel=receive_wheel, build=handle_build, inspect=handle_inspect)
    while True:
        message = session.read_message()
        if message is None or message.get("op") == "bye":
            break
        handler = handlers.get(str(message.get("op")))
        if handler is None:
            session.send("error", error="unknown op %r" % message.get("op"))
            continue
        try:
            handler(session, message)
        except OSError as exc:  # an env dir we cannot write: one clear answer, not a traceback
            session.unlock()
            where = exc.filename or session.env_dir
            session.send("failed", reason="cannot write %s: %s" % (where, exc.strerror or exc), tail="",
                         unwritable=str(session.env_dir))
    session.unlock()
    keep = str((message or {}).get("keep") or "")
    if session.gc_days > 0 and os.path.isdir(session.env_dir) and (message or {}).get("collect", True):
        removed = collect_garbage(session.env_dir, session.gc_days, keep)
        if message is not None:
            session.send("bye", removed=removed)
    elif message is not None:
        session.send("bye", removed=[])
