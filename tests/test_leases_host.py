"""The host's lease store (``agent/leases.py`` and ``agent/lease_records.py``, issue 23) on real files, flocks and processes, no SSH.

Each test works in its own directory made like the default (root-owned,
mode 1777; the suite runs as root), so no test touches ``/var/tmp``'s leases.
A race is run with real processes released together by a barrier; a dead
holder is a child killed with SIGKILL by its pid.
"""

from __future__ import annotations

import ast
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from speccluster_ssh.agent import AGENT_SOURCES
from speccluster_ssh.agent import leases as L

AGENT_DIR = Path(L.__file__).resolve().parent
NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="needs root to make files of another user")
CAPACITY = {"slots": 2, "cores": 8, "memory": 8 * 2**30, "gpus": ["0", "1", "2", "3"]}


# A script's prologue that runs the lease sources as the host does: in order, in one namespace ``ns``.
SHIPPED = "ns = {'__name__': 'speccluster_agent'}\n" + "".join(
    f"exec(compile(open({str(AGENT_DIR / name)!r}).read(), {name!r}, 'exec'), ns)\n"
    for name in ("lease_records.py", "leases.py", "lease_keeper.py")
)


def shared_dir(tmp_path: Path) -> str:
    path = tmp_path / "leases"
    path.mkdir()
    path.chmod(0o1777)
    return str(path)


def claim_of(cluster: str, slots: int = 1, **holds: Any) -> dict[str, Any]:
    return {"cluster": cluster, "name": f"name-{cluster}", "head": "head1", "entry": "0",
            "holds": {"slots": slots, **holds}}  # fmt: skip


def poll(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def plant(directory: str, kind: str, uid: int, content: Any, *, owner: int | None = None, hold: bool = True) -> Any:
    """A lease file written by hand (as another user would); returns its open, locked fd when ``hold``."""
    name = f"speccluster-{kind}.{uid}.{os.urandom(8).hex()}.json"
    path = os.path.join(directory, name)
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)
    if owner is not None:
        os.chown(path, owner, owner)
    if not hold:
        return path
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def valid(kind: str = "lease", uid: int = 0, cluster: str = "other", **extra: Any) -> dict[str, Any]:
    field = "holds" if kind == "lease" else "wants"
    return {"v": 1, "kind": kind, "uid": uid, "pid": 1, "since": 1000.0, "cluster": cluster, "name": "n",
            "head": "h", field: {"slots": 1}, **extra}  # fmt: skip


# -- the directory ---------------------------------------------------------------------------------


def test_the_default_directory_is_accepted_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stock host's /var/tmp (root, 1777) passes every check; the agent's environment may name another."""
    monkeypatch.delenv("SPECCLUSTER_SSH_LEASE_DIR", raising=False)
    assert L.lease_dir_path() == "/var/tmp" and L.lease_dir_path("/srv/x") == "/srv/x"
    fd = L.lease_open_dir(L.lease_dir_path())
    os.close(fd)
    monkeypatch.setenv("SPECCLUSTER_SSH_LEASE_DIR", "/srv/y")
    assert L.lease_dir_path() == "/srv/y" and L.lease_dir_path("/srv/x") == "/srv/x"


def test_a_shared_and_a_private_directory_are_accepted(tmp_path: Path) -> None:
    os.close(L.lease_open_dir(shared_dir(tmp_path)))
    private = tmp_path / "mine"
    private.mkdir(mode=0o755)
    os.close(L.lease_open_dir(str(private)))


def refused(path: str) -> L.LeaseError:
    with pytest.raises(L.LeaseError) as caught:
        L.lease_open_dir(path)
    assert caught.value.fix, "every refusal says the fix"
    assert str(caught.value).count("fix:") == 1
    return caught.value


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(shared_dir(tmp_path))
    error = refused(str(link))
    assert "is a symlink" in error.message and "real directory" in error.fix
    # Nor through a symlink another user planted above it.
    above = tmp_path / "above"
    above.symlink_to(tmp_path)
    if os.getuid() == 0:
        os.lchown(above, NOBODY, NOBODY)
        assert "symlink owned by uid" in refused(str(above / "leases")).message


def test_a_world_writable_directory_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    os.chmod(path, 0o777)
    error = refused(path)
    assert "without the sticky bit" in error.message and f"chmod +t {path}" in error.fix
    os.chmod(path, 0o775)
    assert "writable by its group" in refused(path).message
    os.chmod(path, 0o1777)
    os.chmod(tmp_path, 0o777)  # a directory above it: it could be swapped
    assert "the directory above the lease directory" in refused(path).message


@ROOT_ONLY
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    os.chown(path, NOBODY, NOBODY)
    error = refused(path)
    assert "belongs to nobody" in error.message and "install -d -m 1777 -o root" in error.fix


def test_a_missing_relative_or_plain_file_path_is_refused(tmp_path: Path) -> None:
    assert "does not exist" in refused(str(tmp_path / "nope")).message
    assert "not an absolute path" in refused("var/tmp").message
    (tmp_path / "file").write_text("")
    assert "not a directory" in refused(str(tmp_path / "file")).message


# -- claim, list, release --------------------------------------------------------------------------


def test_claim_list_release(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    first = L.lease_claim(path, claim_of("a", cores=4, memory=2**30, gpus=2), CAPACITY)
    assert isinstance(first, L.LeaseHandle), first
    assert first.record["holds"]["gpus"] == ["0", "1"], "the lowest free devices are chosen"
    st = os.stat(os.path.join(path, first.name))
    assert (st.st_mode & 0o7777, st.st_uid) == (0o644, os.getuid())
    second = L.lease_claim(path, claim_of("b", gpus=2), CAPACITY)
    assert isinstance(second, L.LeaseHandle) and second.record["holds"]["gpus"] == ["2", "3"]
    live = L.lease_list(path)
    assert {r["cluster"]: r["holds"]["gpus"] for r in live} == {"a": ["0", "1"], "b": ["2", "3"]}
    assert [r["file"] for r in live] == sorted([first.name, second.name])
    assert {r["user"] for r in live} == {L.lease_user_name(os.getuid())}
    refusal = L.lease_claim(path, claim_of("c"), CAPACITY)
    assert isinstance(refusal, L.LeaseRefusal)
    assert refusal.short == {"slots": 1} and refusal.free["slots"] == 0
    assert {h["cluster"] for h in refusal.holders} == {"a", "b"}
    assert "held by" in refusal.describe() and "name-a" in refusal.describe()
    L.lease_release(first)
    L.lease_release(first)  # twice is harmless
    assert not os.path.exists(os.path.join(path, first.name))
    third = L.lease_claim(path, claim_of("c", gpus=["2"]), CAPACITY)
    assert isinstance(third, L.LeaseRefusal) and third.short == {"gpus": ["2"]}, "a device is never shared"
    fourth = L.lease_claim(path, claim_of("c", cores=9), CAPACITY)
    assert isinstance(fourth, L.LeaseRefusal) and fourth.short == {"cores": 1}
    fifth = L.lease_claim(path, claim_of("c", gpus=["0"]), CAPACITY)
    assert isinstance(fifth, L.LeaseHandle)
    for handle in (second, fifth):
        L.lease_release(handle)
    assert L.lease_list(path) == []


def test_want_and_unwant(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    want = L.lease_want(path, {"cluster": "w", "name": "waiting", "head": "h2", "wants": {"slots": 2}})
    (record,) = L.lease_list(path)
    assert record["kind"] == "want" and record["wants"]["slots"] == 2 and record["name"] == "waiting"
    # A want takes no capacity.
    assert isinstance(L.lease_claim(path, claim_of("a", slots=2), CAPACITY), L.LeaseHandle)
    L.lease_unwant(want)
    assert [r["kind"] for r in L.lease_list(path)] == ["lease"]


def test_touch_keeps_a_held_lease_young_and_a_short_capacity_is_said(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    handle = L.lease_claim(path, claim_of("a"), {"slots": 1})
    assert isinstance(handle, L.LeaseHandle)
    file = os.path.join(path, handle.name)
    os.utime(file, (1000.0, 1000.0))  # as old as an age-based cleaner would remove
    L.lease_touch(handle)
    assert os.stat(file).st_mtime > time.time() - 3600
    (record,) = L.lease_list(path)
    assert record["since"] == handle.record["since"] > 1000.0, "since is what the claim wrote, not the file's times"
    L.lease_release(handle)
    L.lease_touch(handle)  # released: nothing to do
    refusal = L.lease_claim(path, claim_of("b", slots=2), {"slots": 1})
    assert isinstance(refusal, L.LeaseRefusal) and "held by no one" in refusal.describe()


def test_mark_rewrites_the_held_file_in_place_and_keeps_it_alive(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    handle = L.lease_claim(path, claim_of("a", slots=2), {"slots": 3})
    assert isinstance(handle, L.LeaseHandle)
    file = os.path.join(path, handle.name)
    inode = os.stat(file).st_ino
    (record,) = L.lease_list(path)
    assert (record["state"], record["state_since"]) == ("", 0.0), "a lease says nothing until marked"
    assert L.lease_mark(handle, "busy") is True
    (record,) = L.lease_list(path)
    assert record["state"] == "busy" and record["state_since"] >= record["since"]
    assert handle.record["state"] == "busy" and handle.record["state_since"] == record["state_since"]
    busy_since = record["state_since"]
    assert L.lease_mark(handle, "busy") is True
    assert L.lease_list(path)[0]["state_since"] == busy_since, "the same state keeps its time"
    assert L.lease_mark(handle, "idle") is True
    # A shorter content is cut, not left with a tail: the file parses, on the same inode.
    (record,) = L.lease_list(path)
    assert record["state"] == "idle" and record["holds"]["slots"] == 2 and record["cluster"] == "a"
    assert os.stat(file).st_ino == inode and (os.stat(file).st_mode & 0o777) == 0o644
    # Still held: a reader's shared flock fails, and a claim counts it.
    probe = os.open(file, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(probe)
    assert isinstance(L.lease_claim(path, claim_of("b", slots=2), {"slots": 3}), L.LeaseRefusal)
    with pytest.raises(L.LeaseError, match="bad lease state"):
        L.lease_mark(handle, "asleep")
    want = L.lease_want(path, {"cluster": "w", "wants": {"slots": 1}})
    with pytest.raises(L.LeaseError, match="is a want"):
        L.lease_mark(want, "busy")
    L.lease_release(want)
    L.lease_release(handle)
    assert L.lease_mark(handle, "busy") is False, "a released lease is marked no more"
    assert L.lease_list(path) == []


def test_mark_waits_for_the_host_lock(tmp_path: Path) -> None:
    """A mark writes only under the directory's exclusive lock, which a reader's shared lock holds off."""
    path = shared_dir(tmp_path)
    handle = L.lease_claim(path, claim_of("a"), {"slots": 1})
    reader = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(reader, fcntl.LOCK_SH)
    try:
        with pytest.raises(L.LeaseError, match="stayed locked"):
            L.lease_mark(handle, "busy", timeout=0.2)
        assert L.lease_list(path)[0]["state"] == "", "nothing was written without the lock"
    finally:
        os.close(reader)
    assert L.lease_mark(handle, "busy", timeout=5) is True
    L.lease_release(handle)


def test_the_lock_times_out_with_a_fix(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    holder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(L.LeaseError) as caught:
            L.lease_claim(path, claim_of("a"), CAPACITY, timeout=0.2)
        assert "stayed locked" in caught.value.message and "lslocks" in caught.value.fix
        with pytest.raises(L.LeaseError):
            L.lease_list(path, timeout=0.2)
    finally:
        os.close(holder)
    assert L.lease_list(path, timeout=0.2) == []


# -- races and deaths, with real processes ----------------------------------------------------------


def _claim_in_child(path: str, cluster: str, barrier: Any, results: Any, done: Any) -> None:
    barrier.wait(timeout=60)
    outcome = L.lease_claim(path, claim_of(cluster), {"slots": 1})
    results.put((cluster, isinstance(outcome, L.LeaseHandle)))
    done.wait(timeout=120)  # hold the lease until the parent has looked


def test_two_processes_claiming_the_last_slot_at_once_one_wins(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for round_ in range(10):
        (tmp_path / str(round_)).mkdir()
        path = shared_dir(tmp_path / str(round_))
        barrier, results, done = context.Barrier(2), context.Queue(), context.Event()
        children = [context.Process(target=_claim_in_child, args=(path, c, barrier, results, done)) for c in "ab"]
        for child in children:
            child.start()
        try:
            outcomes = dict(results.get(timeout=60) for _ in children)
            assert sorted(outcomes.values()) == [False, True], f"round {round_}: {outcomes}"
            assert [r["cluster"] for r in L.lease_list(path)] == [c for c, won in outcomes.items() if won]
        finally:
            done.set()
            for child in children:
                child.join(timeout=60)
        assert L.lease_list(path) == [], "the winner's lease ended with its process"


def test_a_killed_holder_leaves_no_live_lease(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    script = SHIPPED + (
        "import time\n"
        f"h = ns['lease_claim']({path!r}, {{'cluster': 'doomed', 'holds': {{'slots': 2}}}}, {{'slots': 2}})\n"
        "print(h.name, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        name = child.stdout.readline().strip()
        assert [r["cluster"] for r in L.lease_list(path)] == ["doomed"]
        assert isinstance(L.lease_claim(path, claim_of("a"), {"slots": 2}), L.LeaseRefusal)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
    assert os.path.exists(os.path.join(path, name)), "the file stays, dead"
    assert L.lease_list(path) == []
    handle = L.lease_claim(path, claim_of("a", slots=2), {"slots": 2})
    assert isinstance(handle, L.LeaseHandle)
    assert not os.path.exists(os.path.join(path, name)), "its owner's next claim removed the dead file"


# -- hostile and broken files ---------------------------------------------------------------------


def test_bad_files_are_ignored_with_one_warning_each(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    uid = os.getuid()
    fds = [
        plant(path, "lease", uid, b"{not json"),
        plant(path, "lease", uid, b" " * (L.LEASE_MAX_BYTES + 1)),
        plant(path, "lease", uid, valid(holds={"slots": -1})),
        plant(path, "lease", uid, valid(kind="want")),  # a want's content in a lease's name
        plant(path, "lease", uid, valid(uid=uid + 1)),
        plant(path, "want", uid, valid("want", uid, since=float("nan"))),
        plant(path, "want", uid, valid("want", uid, since=1e300)),
        plant(path, "lease", uid, valid(uid=uid, state="asleep")),
        plant(path, "lease", uid, valid(uid=uid, state="busy", state_since="now")),
    ]
    target = os.path.join(path, f"speccluster-lease.{uid}.{'a' * 16}.json")
    os.symlink(os.path.join(path, os.listdir(path)[0]), target)
    (Path(path) / "unrelated-file").write_text("not ours")
    warnings = L.LeaseWarnings()
    assert L.lease_list(path, warnings) == []
    notes = warnings.take()
    assert len(notes) == 10, notes
    text = "\n".join(notes)
    for part in ("is not JSON", "larger than", "slots is not a whole number", "no version 1 lease", "says uid",
                 "since is not a time", "not a regular file", "state is not busy or idle",
                 "state_since is not a time"):
        assert part in text, part
    assert L.lease_list(path, warnings) == [] and warnings.take() == [], "one warning per file, not per look"
    # None of them keeps a claim from seeing the host as free.
    assert isinstance(L.lease_claim(path, claim_of("a", slots=2), {"slots": 2}, warnings), L.LeaseHandle)
    for fd in fds:
        os.close(fd)


def test_a_second_name_of_a_lease_counts_once(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    handle = L.lease_claim(path, claim_of("a"), {"slots": 2})
    assert isinstance(handle, L.LeaseHandle)
    uid = os.getuid()
    for first in ("0", "f"):  # a hard link sorting before, and after, the lease's own name
        os.link(os.path.join(path, handle.name), os.path.join(path, f"speccluster-lease.{uid}.{first * 16}.json"))
    warnings = L.LeaseWarnings()
    assert [r["cluster"] for r in L.lease_list(path, warnings)] == ["a"]
    assert len(warnings.take()) == 2
    assert isinstance(L.lease_claim(path, claim_of("b"), {"slots": 2}), L.LeaseHandle), "one slot is still free"


@ROOT_ONLY
def test_a_lease_of_another_user(tmp_path: Path) -> None:
    path = shared_dir(tmp_path)
    # Written by root, then given to nobody: its owner and its content disagree.
    forged = plant(path, "lease", 0, valid(uid=0), owner=NOBODY)
    warnings = L.LeaseWarnings()
    assert L.lease_list(path, warnings) == []
    assert "owned by nobody but says uid 0" in warnings.take()[0]
    # A well-formed lease of nobody, held: it counts, under nobody's name whatever it says.
    theirs = plant(path, "lease", NOBODY, valid(uid=NOBODY, user="root", cluster="theirs"), owner=NOBODY)
    (record,) = L.lease_list(path, warnings)
    assert (record["user"], record["cluster"]) == ("nobody", "theirs")
    refusal = L.lease_claim(path, claim_of("mine", slots=2), {"slots": 2})
    assert isinstance(refusal, L.LeaseRefusal) and "nobody (cluster n from h" in refusal.describe()
    # Dead, it is ignored but not removed by us: only its owner removes it.
    os.close(theirs)
    dead = os.path.join(path, record["file"])
    handle = L.lease_claim(path, claim_of("mine", slots=2), {"slots": 2})
    assert isinstance(handle, L.LeaseHandle) and os.path.exists(dead)
    os.close(forged)


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@ROOT_ONLY
def test_two_users_share_a_directory_and_cannot_touch_each_others_leases() -> None:
    """A real second user (nobody) in a root-owned sticky directory: each sees the other's lease, under its owner's
    name, and can neither change nor delete it."""
    path = tempfile.mkdtemp(prefix="speccluster-lease-test-", dir="/tmp")  # /tmp: nobody can reach it
    try:
        os.chmod(path, 0o1777)
        mine = L.lease_claim(path, claim_of("root-cluster"), {"slots": 2})
        assert isinstance(mine, L.LeaseHandle)
        script = SHIPPED + (
            "import json, os\n"
            f"path = {path!r}\n"
            "seen = [(r['user'], r['cluster']) for r in ns['lease_list'](path)]\n"
            "tries = {}\n"
            f"target = os.path.join(path, {mine.name!r})\n"
            "for what, act in (('unlink', lambda: os.unlink(target)), ('write', lambda: open(target, 'a')),\n"
            "                  ('rename', lambda: os.rename(target, target + '.x'))):\n"
            "    try:\n"
            "        act()\n"
            "        tries[what] = 'done'\n"
            "    except PermissionError:\n"
            "        tries[what] = 'refused'\n"
            "h = ns['lease_claim'](path, {'cluster': 'nobody-cluster', 'holds': {'slots': 1}}, {'slots': 2})\n"
            "print(json.dumps({'seen': seen, 'tries': tries, 'claimed': h.name}), flush=True)\n"
            "input()\n"  # hold the lease until the test has looked
        )
        child = None
        for python in (sys.executable, "/usr/bin/python3"):  # the stdlib is all the sources need
            try:
                child = subprocess.Popen([python, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, preexec_fn=as_nobody, cwd="/")  # fmt: skip
                break
            except PermissionError:
                continue
        if child is None:
            pytest.skip("no python that nobody may run here")
        try:
            line = child.stdout.readline()
            if not line:
                pytest.skip(f"python cannot run as nobody here: {child.stderr.read()[-300:]}")
            report = json.loads(line)
            assert report["seen"] == [["root", "root-cluster"]]
            assert report["tries"] == {"unlink": "refused", "write": "refused", "rename": "refused"}
            assert os.stat(os.path.join(path, report["claimed"])).st_uid == NOBODY
            assert sorted((r["user"], r["cluster"]) for r in L.lease_list(path)) == [
                ("nobody", "nobody-cluster"), ("root", "root-cluster")]
            assert isinstance(L.lease_claim(path, claim_of("third"), {"slots": 2}), L.LeaseRefusal)
        finally:
            child.communicate("\n", timeout=60)
        assert [r["user"] for r in L.lease_list(path)] == ["root"], "nobody's lease ended with its process"
        L.lease_release(mine)
    finally:
        shutil.rmtree(path)


# -- shipped with the agent --------------------------------------------------------------------------


def test_the_agent_sources_define_each_name_once() -> None:
    """They run in one namespace: a name defined twice would silently replace the first."""
    defined: dict[str, str] = {}
    clashes = []
    for name in AGENT_SOURCES:
        tree = ast.parse((AGENT_DIR / name).read_text())
        for node in tree.body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for found in names:
                if found in defined:
                    clashes.append(f"{found} in {defined[found]} and {name}")
                defined.setdefault(found, name)
    assert {"lease_records.py", "leases.py", "lease_keeper.py"} <= set(AGENT_SOURCES) and not clashes, clashes


def python38() -> str | None:
    for candidate in ("python3.8", os.path.expanduser("~/.pyenv/versions/3.8.18/bin/python")):
        found = shutil.which(candidate)
        if found and subprocess.run([found, "-c", "import sys; assert sys.version_info[:2] == (3, 8)"],
                                    capture_output=True).returncode == 0:  # fmt: skip
            return found
    return None


def test_it_runs_under_python_3_8(tmp_path: Path) -> None:
    """Lab hosts may have an old python: claim, list and release under 3.8, in the agent's namespace."""
    python = python38()
    if python is None:
        pytest.skip("no python 3.8 here")
    path = shared_dir(tmp_path)
    script = SHIPPED + (
        f"h = ns['lease_claim']({path!r}, {{'cluster': 'c', 'holds': {{'slots': 1, 'gpus': 1}}}}, "
        "{'slots': 1, 'gpus': ['7']})\n"
        f"assert [r['holds']['gpus'] for r in ns['lease_list']({path!r})] == [['7']]\n"
        f"assert isinstance(ns['lease_claim']({path!r}, {{'cluster': 'd', 'holds': {{'slots': 1}}}}, "
        "{'slots': 1}), ns['LeaseRefusal'])\n"
        "ns['lease_release'](h)\n"
        f"assert ns['lease_list']({path!r}) == []\n"
        f"k = ns['LeaseKeeper']('c', {path!r})\n"
        "assert k.handle('lease_claim', {'record': {'holds': {'slots': 1}}, 'capacity': {'slots': 1}})['held']\n"
        f"(lease,) = [r['file'] for r in ns['lease_list']({path!r})]\n"
        "assert k.handle('lease_mark', {'lease': lease, 'state': 'idle'})['marked']\n"
        f"assert ns['lease_list']({path!r})[0]['state'] == 'idle'\n"
        "k.release_all()\n"
        f"assert ns['lease_list']({path!r}) == []\n"
        "print('ok')\n"
    )
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
