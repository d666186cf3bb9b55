"""The body of a forked child of the host agent: one dask server. A shipped source (see ``remote.py``).

Runs in the agent's namespace after ``logs.py`` and ``host.py``; imports
only the standard library and ``dask``/``distributed``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _run_child(request: dict[str, Any], status_fd: int, log_path: str) -> None:
    """Body of a forked child: run one dask server until it finishes."""
    import asyncio

    import dask

    os.environ.update(request.get("env") or {})
    # Lowest to highest: dask's defaults and this host's config files, the
    # head's config, DASK_* variables of this process (as with dask's
    # SSHCluster, where they beat the inherited config), the host's
    # speccluster_dask_config.
    dask.config.refresh()
    if request.get("config"):
        dask.config.update(dask.config.config, request["config"], priority="new")
        dask.config.update(dask.config.config, dask.config.collect_env(), priority="new")
    if request.get("host_config"):
        dask.config.update(dask.config.config, request["host_config"], priority="new")
    # The nanny forks its worker from this warm process instead of spawning.
    dask.config.set({"distributed.worker.multiprocessing-method": "fork"})

    from distributed import Nanny, Scheduler, Worker
    from distributed.security import Security

    role = request["role"]
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
        if role == "scheduler":
            server = Scheduler(**options)
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
        ready: dict[str, Any] = {
            "event": "ready",
            "name": request["name"],
            "address": server.address,
            "pid": os.getpid(),
        }
        if role == "nanny":
            ready["worker_address"] = server.worker_address
        elif role == "worker":
            ready["worker_address"] = server.address
        else:
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
