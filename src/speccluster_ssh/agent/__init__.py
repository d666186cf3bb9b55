"""The head's side of the host agent: start it over a connection and talk to it.

One :class:`HostAgent` runs per host and cluster. It ships the agent's
sources (:data:`AGENT_SOURCES`, ending with :mod:`speccluster_ssh.agent.remote`)
over its channel (nothing of this package needs to be installed on the
host), then sends requests as JSON lines and routes the agent's events
(ready, exited) to whoever waits for them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from ..addresses import format_hostport
from ..connection import Channel, HostConnection
from ..errors import HostError
from ..inventory import HostSpec
from ..tasks import TaskSet
from .lease_requests import HeldLease, LeaseRefused, LeaseRequests  # noqa: F401  (the results of its lease requests)

logger = logging.getLogger(__name__)

# Reads a JSON config line, then the number of sources and each source
# ("NAME SIZE" line, then SIZE bytes) from stdin byte-exactly (no buffered
# reader, so nothing meant for the agent is swallowed), runs the sources in
# order in one namespace, then the last one's main().
BOOTSTRAP = """\
import os, sys, json
def line():
    data = b''
    while not data.endswith(b'\\n'):
        chunk = os.read(0, 1)
        if not chunk:
            sys.exit(3)
        data += chunk
    return data
config = json.loads(line())
namespace = {'__name__': 'speccluster_agent'}
for _ in range(int(line())):
    name, size = line().split()
    source = b''
    while len(source) < int(size):
        chunk = os.read(0, int(size) - len(source))
        if not chunk:
            sys.exit(3)
        source += chunk
    exec(compile(source, 'speccluster_agent/' + name.decode(), 'exec'), namespace)
namespace['main'](config)
"""

#: The agent's source files, in the order they run in one namespace on the
#: host: each may use the names of those before it. Split by concern (log
#: files, host facts, lease records, the lease store, the agent's leases, the
#: forked child's body, the agent's children, the agent's loop) to keep each file small; none imports another there
#: (none is a package module), and no two define the same top-level name.
AGENT_SOURCES = ("logs.py", "host.py", "lease_records.py", "leases.py", "lease_keeper.py", "child.py", "children.py", "remote.py")

EventHandler = Callable[[dict[str, Any]], None]


def agent_sources() -> list[tuple[str, bytes]]:
    """The agent program's sources ``(file name, source)``, in the order the host runs them."""
    package = resources.files(__package__)
    return [(name, package.joinpath(name).read_bytes()) for name in AGENT_SOURCES]


def agent_payload(config: dict[str, Any]) -> bytes:
    """What the head writes to the bootstrap: the config line, then every source."""
    sources = agent_sources()
    parts = [json.dumps(config).encode() + b"\n", str(len(sources)).encode() + b"\n"]
    for name, source in sources:
        parts.append(f"{name} {len(source)}\n".encode() + source)
    return b"".join(parts)


MARKER_ENV = "SPECCLUSTER_SSH_CLUSTER"
# Seconds one TCP connect of a reach probe may take (host -> head, head -> host).
PROBE_CONNECT_TIMEOUT = 5.0


def agent_argv(host: HostSpec, cluster_id: str = "", python: str | None = None) -> list[str]:
    """The argv that starts the agent bootstrap on ``host`` (under ``python`` when given: a shipped environment's).

    ``env`` puts the cluster marker in the agent's initial environment, so
    that it shows in ``/proc/PID/environ`` of the agent and of every child it
    forks (the teardown playbook finds strays by it). A local host left at
    the default ``python3`` uses the head's own interpreter, which is known
    to have ``distributed``.
    """
    if python is None:
        python = sys.executable if host.is_local and host.python == "python3" else host.python
    if python.startswith("~/"):
        # Quoted, "~" would not expand; a remote command starts in $HOME anyway.
        python = os.path.expanduser(python) if host.is_local else python[2:]
    return ["env", f"{MARKER_ENV}={cluster_id}", python, "-u", "-c", BOOTSTRAP]


class HostAgent(LeaseRequests):
    """A live agent on one host, for one cluster.

    Parameters
    ----------
    connection
        The shared connection to the host.
    cluster_id
        Identifies the cluster; names the per-cluster directory on the host.
    silence
        Seconds without a word from the head after which the agent kills
        everything; the head pings every quarter of that.
    lease_dir
        The host's lease directory (``speccluster_lease_dir``; the agent's default when ``None``).
        Lease requests (see :class:`LeaseRequests`) end with the agent, which releases them all.
    python
        Run under this python instead of the host's (an environment the head shipped there).
    env_lock
        The lock file of that environment: the agent holds it shared while it runs, so it is never collected.
    """

    def __init__(
        self,
        connection: HostConnection,
        cluster_id: str,
        *,
        silence: float = 15.0,
        base_dir: str | None = None,
        probe_port: int | None = None,
        on_probe: Callable[[dict[str, str]], None] | None = None,
        lease_dir: str | None = None,
        python: str | None = None,
        env_lock: str | None = None,
    ) -> None:
        self.connection = connection
        self.python = python
        self.env_lock = env_lock
        # A port the head listens on: the agent probes the network before its import (scheduler_reach auto).
        self.probe_port = probe_port
        self._on_probe = on_probe
        self.host = connection.host
        self.cluster_id = cluster_id
        self.silence = silence
        self.base_dir = base_dir
        self.lease_dir = lease_dir
        self.facts: dict[str, Any] = {}
        self._channel: Channel | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pending_stops: dict[int, str] = {}  # request id -> process name, for the stops in flight
        # The reply to the shutdown close() sent (or why it failed); None until close() sends it.
        self._shutdown: asyncio.Future[dict[str, Any]] | None = None
        self._shutdown_id: int | None = None
        self._closing: asyncio.Future[None] | None = None  # set by the first close(); later calls wait for it
        self._handlers: dict[str, list[EventHandler]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._tasks = TaskSet(f"agent on {self.host.name}", logger)
        self._last_heard = time.monotonic()
        self.lost_reason: str | None = None
        self._lost = asyncio.Event()
        self._on_lost: list[Callable[[str], None]] = []
        # What the agent reports outside any request (a log it cannot write, a request it cannot read).
        self.on("error", lambda message: logger.warning("host %s: the agent says: %s", self.host.name, message.get("error")))
        self.on("lease_warning", lambda message: logger.warning("host %s: %s", self.host.name, message.get("warning")))

    @property
    def alive(self) -> bool:
        return self._channel is not None and not self._lost.is_set()

    async def start(self, timeout: float = 30.0) -> dict[str, Any]:
        """Start the agent and return the facts it reports (versions, cpus, memory)."""
        await self.connection.open()
        channel = await self.connection.open_channel(agent_argv(self.host, self.cluster_id, self.python), self.host.prologue)
        self._channel = channel
        config = {
            "cluster": self.cluster_id,
            "host_label": self.host.name,
            "silence": self.silence,
            "base_dir": self.base_dir,
            "listen_address": "127.0.0.1" if self.host.is_local else None,
            "log_max_bytes": self.host.log_max_bytes,
            "log_retention": self.host.log_retention,
            "detect_gpus": self.host.gpus == "auto",
            "lease_dir": self.lease_dir,
        }
        if self.env_lock:
            config["env_lock"] = self.env_lock
        if self.host.worker_class_path:
            # Imported by the agent before its hello: a class the host lacks is one line here.
            config.update(worker_class=self.host.worker_class_path, pythonpath=self.host.env.get("PYTHONPATH"))
        head = self.connection.local_address
        if self.probe_port is not None and head:
            config["probe"] = {"head": format_hostport(head, self.probe_port),
                               "timeout": PROBE_CONNECT_TIMEOUT}  # fmt: skip
        channel.write(agent_payload(config))
        hello = _parse(await self._first_line(channel, timeout))
        if hello.get("event") == "probe":
            found = await self._probed(hello)
            # A failure may only be the agent dying at its import (no distributed there): such
            # a host did not answer, so a failed probe counts only once the hello came.
            held = found if found["to_head"] or found["from_head"] else None
            if held is None and self._on_probe is not None:
                self._on_probe(found)
            hello = _parse(await self._first_line(channel, timeout))
            if held is not None and self._on_probe is not None and hello.get("event") == "hello":
                self._on_probe(held)
        if hello.get("event") != "hello":
            await channel.close()
            reason, fix = _start_failure(self.host, channel.stderr_tail())
            raise HostError(self.host.name, reason, channel.stderr_tail(), fix=fix)
        if hello.get("error"):
            await channel.close()
            base = self.base_dir or "$XDG_CACHE_HOME/speccluster-ssh (else ~/.cache/speccluster-ssh)"
            user = self.host.user or "the login user"
            raise HostError(
                self.host.name,
                f"the agent cannot work: {hello['error']}",
                fix=f"make {base} on {self.host.name} a directory that {user} can write (it holds the logs), "
                "or free the disk there",
            )
        if hello.get("worker_class_error"):
            await channel.close()
            self._mark_lost("closed")  # the agent has exited: nothing to shut down
            raise _worker_class_error(self.host, hello)
        self.facts = hello
        self._last_heard = time.monotonic()
        self._reader = self._tasks.start(self._read_loop(), name=f"read from the agent on {self.host.name}")
        self._pinger = self._tasks.start(self._ping_loop(), name=f"ping the agent on {self.host.name}")
        return hello

    async def _first_line(self, channel: Channel, timeout: float) -> bytes:
        try:
            return await asyncio.wait_for(channel.readline(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            await channel.close()
            raise HostError(self.host.name, f"the agent did not start within {timeout:g} s", channel.stderr_tail()) from None

    async def _probed(self, message: dict[str, Any]) -> dict[str, str]:
        """The agent's reach probe: connect back to the port it opened; both directions, ``""`` where it worked."""
        port, address = message.get("port"), str(message.get("address") or self.host.address)
        target = format_hostport(address, str(port))
        from_head = ""
        if not port:
            from_head = "no probe listener could be started there"
        else:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(address, int(port)), PROBE_CONNECT_TIMEOUT)
                writer.close()
            except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
                what = "no answer" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else (exc.strerror or str(exc))
                from_head = f"{target}: {what}"
        return {"to_head": str(message.get("to_head") or ""), "from_head": from_head}

    def on(self, event: str, handler: EventHandler) -> Callable[[], None]:
        """Call ``handler(message)`` for each ``event``; returns an unsubscribe function."""
        self._handlers.setdefault(event, []).append(handler)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._handlers[event].remove(handler)

        return unsubscribe

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once when the agent or its channel is lost."""
        self._on_lost.append(callback)

    async def request(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raise :class:`HostError` on failure.

        Once :meth:`close` has sent the agent its shutdown, nothing more is
        sent: the agent no longer reads requests. A ``stop`` then gets the
        shutdown's outcome, since the shutdown stops every process; any other
        request fails at once.
        """
        shutdown = self._shutdown
        if shutdown is not None and op != "shutdown":
            if op != "stop":
                raise HostError(self.host.name, f"agent is shutting down; {op!r} was not sent")
            try:
                outcome = await asyncio.wait_for(asyncio.shield(shutdown), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise HostError(self.host.name, f"agent did not finish its shutdown within {timeout:g} s") from None
            reply = _stopped_by(outcome, str(fields.get("name")))
        else:
            reply = await self._send(op, timeout, fields)
        if not reply.get("ok"):
            raise HostError(self.host.name, f"{op} failed: {reply.get('error')}", fix=str(reply.get("fix") or ""))
        return reply

    async def _send(self, op: str, timeout: float, fields: dict[str, Any]) -> dict[str, Any]:
        """Write one request to the agent and return its reply (``ok`` false when it failed)."""
        if not self.alive or self._channel is None:
            raise HostError(self.host.name, f"agent is not running ({self.lost_reason or 'not started'})")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if op == "stop":
            self._pending_stops[request_id] = str(fields.get("name"))
        elif op == "shutdown":
            self._shutdown_id = request_id
        message = {"op": op, "id": request_id, **fields}
        try:
            self._channel.write(json.dumps(message).encode() + b"\n")
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise HostError(self.host.name, f"agent did not answer {op!r} within {timeout:g} s") from None
        except (OSError, ConnectionError) as exc:
            raise HostError(self.host.name, f"lost the agent while sending {op!r}: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
            self._pending_stops.pop(request_id, None)

    async def write_file(self, relative_path: str, data: bytes, mode: int = 0o600) -> str:
        """Write ``data`` into the cluster directory on the host; return its path there."""
        reply = await self.request("write_file", path=relative_path, data_b64=base64.b64encode(data).decode(), mode=mode)
        return str(reply["path"])

    async def _read_loop(self) -> None:
        channel = self._channel
        reason = "the agent's channel closed"
        try:
            while channel is not None:
                line = await channel.readline()
                if not line:
                    tail = channel.stderr_tail().strip()
                    if tail:
                        reason += ": " + tail.splitlines()[-1]
                    break
                self._last_heard = time.monotonic()
                message = _parse(line)
                request_id = message.get("id")
                if request_id is not None and "event" not in message:
                    future = self._pending.get(request_id)
                    if future is not None and not future.done():
                        future.set_result(message)
                    if request_id == self._shutdown_id:
                        # Settled here, before the end of the channel that follows can fail the stops.
                        self._shutdown_done(message)
                    continue
                for handler in list(self._handlers.get(str(message.get("event")), ())):
                    try:
                        handler(message)
                    except Exception:  # one broken handler must not stop the others
                        logger.exception("handler for %s on %s failed", message.get("event"), self.host.name)
        except asyncio.CancelledError:
            reason = "closed"
            raise
        except Exception as exc:
            # Any failure of the channel (asyncssh's ConnectionLost is no
            # OSError) means the agent is lost; that is reported through
            # on_lost, so the task itself ends without an exception.
            reason = f"reading from the agent failed: {type(exc).__name__}: {exc}"
        finally:
            self._mark_lost(reason)

    async def _ping_loop(self) -> None:
        interval = max(0.2, self.silence / 4)
        while self.alive and self._channel is not None:
            await asyncio.sleep(interval)
            if time.monotonic() - self._last_heard > self.silence:
                self._mark_lost(f"no word from the agent for {self.silence:g} s")
                return
            try:
                self._channel.write(b'{"op": "ping"}\n')
            except Exception as exc:  # a dead channel fails in many ways; all mean lost
                self._mark_lost(f"cannot write to the agent: {type(exc).__name__}: {exc}")
                return

    def _shutdown_done(self, reply: dict[str, Any]) -> None:
        """The shutdown's outcome is known: it answers the stops still waiting (see :meth:`request`)."""
        if self._shutdown is not None and not self._shutdown.done():
            self._shutdown.set_result(reply)
        for request_id, name in list(self._pending_stops.items()):
            future = self._pending.get(request_id)
            if future is not None and not future.done():
                future.set_result(_stopped_by(reply, name))

    def _mark_lost(self, reason: str) -> None:
        if self._lost.is_set():
            return
        shutdown = self._shutdown
        if shutdown is not None and shutdown.done() and shutdown.result().get("ok"):
            reason = "closed"  # the agent ended because we asked it to
        self.lost_reason = reason
        self._lost.set()
        for future in self._pending.values():
            if not future.done():
                future.set_result({"ok": False, "error": f"agent lost: {reason}"})
        for callback in self._on_lost:
            try:
                callback(reason)
            except Exception:
                logger.exception("lost-agent callback on %s failed", self.host.name)

    async def close(
        self, *, remove_files: bool = False, timeout: float = 15.0, grace: float | None = None, keep_tls: bool = False
    ) -> None:
        """Stop every process of this cluster on the host, then the agent itself.

        ``grace``: seconds between the processes' SIGTERM and SIGKILL (the agent's default when ``None``).
        ``keep_tls``: leave the host's TLS files (another agent of the cluster on the host uses them);
        ``remove_files`` true removes the logs at once instead of keeping them for the host's
        ``speccluster_log_retention``.

        Only a real failure is logged (a warning): the agent was lost before
        it could be told, it did not confirm its shutdown, or processes were
        still running after it. A second call waits for the first.
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            await self._shut_down(remove_files=remove_files, timeout=timeout, grace=grace, keep_tls=keep_tls)
        finally:
            self._closing.set_result(None)

    async def _shut_down(self, *, remove_files: bool, timeout: float, grace: float | None, keep_tls: bool) -> None:
        if self.alive:
            self._shutdown = asyncio.get_running_loop().create_future()
            extra = {} if grace is None else {"grace": grace}
            try:
                reply = await self.request("shutdown", remove=remove_files, keep_tls=keep_tls, timeout=timeout, **extra)
            except HostError as exc:
                # Closing the channel below stops the agent anyway (it exits when stdin closes).
                reply = {"ok": False, "error": f"the agent's shutdown failed: {exc.reason}"}
                logger.warning("host %s: the agent did not confirm its shutdown: %s", self.host.name, exc.reason)
            else:
                if reply.get("left"):
                    left = ", ".join(map(str, reply["left"]))
                    logger.warning("host %s: still running after the agent's shutdown: %s", self.host.name, left)
            self._shutdown_done(reply)
        elif self._channel is not None and self.lost_reason not in (None, "closed"):
            # Lost while the cluster closed, so no one else reported it.
            logger.warning("host %s: the agent was lost before the close could shut it down: %s",
                           self.host.name, self.lost_reason)  # fmt: skip
        self._mark_lost("closed")
        current = asyncio.current_task()
        if current is not None and current in (self._pinger, self._reader):
            # Called from one of our own loops: it cannot wait for itself.
            for task in (self._pinger, self._reader):
                if task is not None and task is not current:
                    task.cancel()
        else:
            await self._tasks.close(timeout=timeout)
        if self._channel is not None:
            await self._channel.close()


def _stopped_by(shutdown: dict[str, Any], name: str) -> dict[str, Any]:
    """The reply to a stop of process ``name`` that the agent's shutdown (reply ``shutdown``) answers."""
    if not shutdown.get("ok"):
        return {"ok": False, "error": shutdown.get("error") or "the agent's shutdown failed"}
    if name in (shutdown.get("left") or ()):
        return {"ok": False, "error": f"{name} was still running after the agent's shutdown"}
    return {"ok": True, "code": None, "by": "shutdown"}


def _parse(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        return {"event": "garbage", "data": line[:200].decode("utf-8", "replace")}
    return message if isinstance(message, dict) else {"event": "garbage"}


def _worker_class_error(host: HostSpec, hello: dict[str, Any]) -> HostError:
    """The error of a host whose agent could not import ``speccluster_worker_class``."""
    python = hello.get("python") or host.python
    return HostError(
        host.name,
        f"speccluster_worker_class {host.worker_class_path!r} cannot be imported there: {hello['worker_class_error']}",
        fix=f"install it in the host's python ({python}) or fix the inventory",
    )


def _start_failure(host: HostSpec, stderr: str) -> tuple[str, str]:
    """Why the agent did not start, and the fix when retrying cannot help."""
    if "No module named 'distributed'" in stderr or 'No module named "distributed"' in stderr:
        fix = f"install distributed on {host.name} for {host.python}, or set speccluster_python to a python that has it"
        return f"python {host.python} has no 'distributed'; install it there or set speccluster_python", fix
    if "not found" in stderr or "No such file" in stderr:
        fix = f"set speccluster_python for {host.name} to a python 3 that has distributed"
        return f"cannot run python {host.python!r}; set speccluster_python to a python 3 with distributed", fix
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    return f"the agent failed to start with {host.python}: {last}", ""
