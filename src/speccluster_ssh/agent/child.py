"""The body of a forked child of the host agent: one dask server. A shipped source (see ``remote.py``).

Runs in the agent's namespace after ``logs.py`` and ``host.py``; imports
only the standard library and ``dask``/``distributed``, and the class that
``speccluster_worker_class`` names by import path.

A class given by path is started as dask's ``SpecCluster`` (``dask spec``)
starts one: ``cls(scheduler, **options)``, awaited, then ``finished()``
awaited. The agent imports it when it starts (:func:`worker_class_facts`,
so that an import failure is one line at the head and forked children start
warm). What it is decides the rest: a ``Nanny`` subclass runs as a nanny, a
``Worker`` subclass as a bare worker, and any other server (such as
``dask_cuda.CUDAWorker``, which starts one nanny per visible GPU) gets its
``resources`` in dask-worker's text form (``GPU=1,FPGA=1``) and must start
exactly one nanny, so that the cluster knows its worker by name.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # shipped, a global already: host.py runs first in the same namespace
    from .host import _scratch_dir

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _add_pythonpath(value: str | None) -> None:
    """Put the entries of a ``PYTHONPATH`` on ``sys.path``, as a python started with it would have them.

    The agent and its forked children never read the ``PYTHONPATH`` of
    ``speccluster_env`` at startup (it is not in their environment then).
    """
    entries = [entry for entry in (value or "").split(os.pathsep) if entry and entry not in sys.path]
    sys.path[1:1] = entries  # after the entry of the current directory, before site-packages


def _import_worker_class(path: str) -> type:
    """The class at ``path`` (``package.module.Class``), imported as ``distributed.utils.import_term`` does."""
    import importlib

    module_name, _, attr = path.rpartition(".")
    found = getattr(importlib.import_module(module_name), attr)
    if not isinstance(found, type):
        raise TypeError(f"{path} is a {type(found).__name__}, not a class")
    return found


def _class_kind(cls: type) -> str:
    """``"nanny"``, ``"worker"`` or ``"server"`` (neither: a class such as ``dask_cuda.CUDAWorker``)."""
    from distributed import Nanny, Worker

    if issubclass(cls, Nanny):
        return "nanny"
    if issubclass(cls, Worker):
        return "worker"
    return "server"


def worker_class_facts(config: dict[str, Any]) -> dict[str, str]:
    """Import the class of ``config["worker_class"]``; for the hello, its kind or why it cannot be used.

    Returns ``{"worker_class_kind": ...}`` or ``{"worker_class_error": ...}``,
    or nothing when the host runs plain nannies or workers.
    """
    path = config.get("worker_class")
    if not path:
        return {}
    import contextlib

    _add_pythonpath(config.get("pythonpath"))
    try:
        # What a module prints as it is imported must not land in the agent's replies to the head.
        with contextlib.redirect_stdout(sys.stderr):
            return {"worker_class_kind": _class_kind(_import_worker_class(str(path)))}
    except (Exception, SystemExit) as exc:  # a module may fail in any way, or exit, as it is imported
        return {"worker_class_error": " ".join(f"{type(exc).__name__}: {exc}".split())[:500]}


def _start_worker_class(path: str, scheduler: str, options: dict[str, Any]) -> Any:
    """An instance of the class at ``path``, made as dask's SpecCluster makes one: ``cls(scheduler, **options)``."""
    cls = _import_worker_class(path)
    kind = _class_kind(cls)
    if kind == "server" and isinstance(options.get("resources"), dict):
        # dask-worker's text form, which such servers (dask_cuda.CUDAWorker) parse.
        options["resources"] = ",".join(f"{name}={amount:g}" for name, amount in options["resources"].items())
    server = cls(scheduler, **options)
    nannies = getattr(server, "nannies", None)
    if kind == "server" and isinstance(nannies, list) and len(nannies) > 1:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES", "every GPU")
        raise ValueError(
            f"{path} made {len(nannies)} dask workers for worker {options.get('name')} (one per visible GPU: "
            f"{devices}); give each worker one GPU, with speccluster_gpus equal to the host's number of workers"
        )
    return server


def _cpu_ranges(cpus: Any) -> str:
    """CPU numbers as a CPU list: ``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _pin_to_cpus(cpus: list[int] | None) -> None:
    """Run this process, and every thread and process it makes, on ``cpus`` only (``speccluster_cpu_affinity``).

    Only CPUs this host gives the agent: the kernel would quietly drop the
    others, and a list of none of them would fail without saying which.
    """
    if not cpus:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise OSError(
            "speccluster_cpu_affinity cannot pin processes on this host (its python has no os.sched_setaffinity, "
            "which only Linux has); remove speccluster_cpu_affinity for this host"
        )
    offered = os.sched_getaffinity(0)
    missing = set(cpus) - offered
    if missing:
        raise ValueError(
            f"speccluster_cpu_affinity {_cpu_ranges(cpus)} names CPU(s) {_cpu_ranges(missing)}, which this host "
            f"does not have for its dask processes (they may use {_cpu_ranges(offered)}); set "
            f"speccluster_cpu_affinity to CPUs among {_cpu_ranges(offered)}, or remove it"
        )
    os.sched_setaffinity(0, cpus)


def _interface_host(options: dict[str, Any]) -> None:
    """An ``interface`` with IPv6 addresses only becomes ``host`` (bracketed): dask's own lookup is IPv4 only.

    Link-local addresses (``fe80::/10``) are left out: they need a zone and
    other hosts cannot use them as they are. An interface with an IPv4
    address, or none at all, stays for dask to read (and to explain).
    """
    name = options.get("interface")
    if not name or "host" in options:
        return
    import ipaddress
    import socket as _socket

    import psutil

    found = psutil.net_if_addrs().get(str(name), [])
    if any(a.family == _socket.AF_INET for a in found):
        return
    usable = [a.address.split("%", 1)[0] for a in found if a.family == _socket.AF_INET6]
    usable = [a for a in usable if not ipaddress.ip_address(a).is_link_local]
    if usable:
        options.pop("interface")
        options["host"] = f"[{usable[0]}]"


def _addresses(server: Any) -> tuple[str | None, str | None]:
    """The server's own address and that of the dask worker it runs (the same for a bare worker)."""
    from distributed import Nanny, Worker

    if isinstance(server, Nanny):
        return server.address, server.worker_address
    if isinstance(server, Worker):
        return server.address, server.address
    nannies = getattr(server, "nannies", None)
    if isinstance(nannies, list) and nannies and isinstance(nannies[0], Nanny):
        return nannies[0].address, nannies[0].worker_address
    try:
        address = server.address
    except (AttributeError, ValueError):
        address = None
    return address, address


def _run_child(request: dict[str, Any], status_fd: int, log_path: str, where: tuple[str, str] = ("", "")) -> None:
    """Body of a forked child: run one dask server until it finishes.

    ``where`` is the cluster id and the host's label, which name its scratch
    directory (:func:`_use_scratch`).
    """
    import asyncio

    import dask

    host_vars = request.get("host_vars") or {}  # the host's variables sent with each start, by field name
    os.environ.update(request.get("env") or {})
    _add_pythonpath((request.get("env") or {}).get("PYTHONPATH"))
    # Lowest to highest: dask's defaults and this host's config files, the
    # head's config, DASK_* variables of this process (as with dask's
    # SSHCluster, where they beat the inherited config), the host's
    # speccluster_dask_config.
    dask.config.refresh()
    if request.get("config"):
        dask.config.update(dask.config.config, request["config"], priority="new")
        dask.config.update(dask.config.config, dask.config.collect_env(), priority="new")
    if host_vars.get("dask_config"):
        dask.config.update(dask.config.config, host_vars["dask_config"], priority="new")
    # The nanny forks its worker from this warm process instead of spawning.
    dask.config.set({"distributed.worker.multiprocessing-method": "fork"})

    from distributed import Nanny, Scheduler, Worker
    from distributed.security import Security

    role = request["role"]
    worker_class = request.get("worker_class") if role != "scheduler" else None
    options = dict(request.get("options") or {})
    tls = options.pop("security", None)
    if tls:
        options["security"] = Security(**tls)

    def report(message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            os.write(status_fd, data)
        except OSError:
            pass

    async def serve() -> None:
        if where[0]:
            _use_scratch(role, options, where, report)
        # First, so that every thread of the server and the worker a nanny forks inherit it.
        _pin_to_cpus(host_vars.get("cpu_affinity"))
        _interface_host(options)
        dashboard = options.get("dashboard_address")
        if isinstance(dashboard, str) and dashboard.startswith("["):
            # dask splits the string on ":": an IPv6 host goes as a (host, port) pair.
            host, _, port = dashboard.rpartition(":")
            options["dashboard_address"] = [(host.strip("[]"), int(port or 0))]
        if role == "scheduler":
            server = Scheduler(**options)
        elif worker_class:
            server = _start_worker_class(str(worker_class), request["scheduler"], options)
        elif role == "nanny":
            server = Nanny(request["scheduler"], **options)
        else:
            server = Worker(request["scheduler"], **options)
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task[Any]] = []

        def on_term() -> None:
            if not stopping:
                stopping.append(asyncio.ensure_future(server.close()))

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_term)
        # A nanny forks its worker from here; without this the worker would
        # inherit the handlers' wakeup fd, and the SIGTERM of a memory-limit
        # restart would close the nanny instead of only its worker.
        os.register_at_fork(after_in_child=_default_signals_in_child)
        await server
        ready: dict[str, Any] = {"event": "ready", "name": request["name"], "pid": os.getpid()}
        if role != "scheduler":
            ready["address"], ready["worker_address"] = _addresses(server)
        else:
            ready["address"] = server.address
            http_server = getattr(server, "http_server", None)
            ready["dashboard_port"] = getattr(http_server, "port", None)
        report(ready)
        await server.finished()

    try:
        asyncio.run(serve())
    except BaseException as exc:  # report every start failure before dying
        import traceback

        traceback.print_exc()
        report({"event": "failed", "name": request["name"], "pid": os.getpid(), "error": _describe_failure(exc)})
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _use_scratch(role: str, options: dict[str, Any], where: tuple[str, str], report: Any) -> None:
    """Put this server's scratch and spill files in its user's and cluster's own directory (``_scratch_dir``).

    Both dask's ``temporary-directory`` (what the server and libraries in it
    use when given no directory) and a ``local_directory`` option (from
    ``speccluster_local_directory``) point there; the agent learns the
    directory first, so that it goes when the cluster ends, even if this
    process is killed.
    """
    import tempfile

    import dask

    configured = options.get("local_directory") if role != "scheduler" else None
    temporary = dask.config.get("temporary-directory", None) or tempfile.gettempdir()
    path = _scratch_dir(str(configured) if configured else None, str(temporary), where[0], where[1])
    report({"event": "scratch", "path": path})
    dask.config.set({"temporary-directory": path})
    if configured:
        options["local_directory"] = path


def _default_signals_in_child() -> None:
    """In a process forked by a server: take back the signal handling it inherited."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # not the main thread: nothing was inherited there
        pass


def _describe_failure(exc: BaseException) -> str:
    """One line for a start failure: the outer error and its root cause.

    dask wraps the real cause ("name taken", "could not connect") in
    ``RuntimeError('Nanny failed to start.')``; the chain keeps it.
    """
    chain: list[BaseException] = [exc]
    seen = {id(exc)}
    current = exc
    for _ in range(20):  # bounded: a chain is short, but may loop
        following = current.__cause__ or current.__context__
        if following is None or id(following) in seen:
            break
        seen.add(id(following))
        chain.append(following)
        current = following
    outer, root = chain[0], chain[-1]
    text = f"{type(outer).__name__}: {outer}"
    if root is not outer:
        text += f" caused by {type(root).__name__}: {root}"
    return " ".join(text.split())[:2000]
