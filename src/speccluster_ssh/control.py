"""The control socket of a detached cluster's head process: server and client.

Each cluster directory (see :mod:`speccluster_ssh.state`) holds
``control.sock``, a Unix socket (0600) served by the head process. Requests
and replies are JSON objects, one per line: ``{"op": "status"}`` is answered
by ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "...",
"exit": 1}``. The operations a head answers (see
:class:`speccluster_ssh.head.Head`) are the members of :class:`Op`, named
once here: senders and the head use ``Op.STATUS`` and the like, so a
misspelt operation fails where it is written, not as an "unknown control
operation" at run time.

Like :mod:`speccluster_ssh.state`, this module imports neither
``distributed`` nor the cluster code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import enum
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import SpecClusterError, UserError
from .state import SOCKET_FILE

logger = logging.getLogger(__name__)

# sun_path holds 108 bytes including the terminating NUL.
_SOCKET_PATH_MAX = 107
_MAX_LINE = 64 * 1024 * 1024


class Op(str, enum.Enum):
    """The operations of the control protocol; each value is the ``op`` string on the wire."""

    PROGRESS = "progress"
    STATUS = "status"
    SCALE = "scale"
    ADAPT = "adapt"
    ADAPT_OFF = "adapt-off"
    LOGS = "logs"
    RESTART = "restart"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    RELOAD = "reload"
    DOWN = "down"

    def __str__(self) -> str:
        return str(self.value)  # the wire string in messages and f-strings, on every Python


class ControlError(SpecClusterError):
    """The head process of a cluster cannot be reached, or it refused a request.

    Parameters
    ----------
    message
        One line for the user.
    exit_code
        2 when the request itself was a user mistake, 1 otherwise.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code



# -- the server ---------------------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@contextlib.contextmanager
def _socket_path(path: Path) -> Iterator[str]:
    """A path for bind/connect that fits in sun_path even when ``path`` is long.

    Long paths go through ``/proc/self/fd/N`` of the directory (Linux).
    """
    text = str(path)
    if len(os.fsencode(text)) <= _SOCKET_PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if len(short) > _SOCKET_PATH_MAX:  # pragma: no cover - cannot happen with sane names
            raise UserError(f"the state directory path {path.parent} is too long for a socket; shorten it")
        yield short
    finally:
        os.close(fd)


class ControlServer:
    """Serve JSON-line requests on a cluster's ``control.sock``.

    Parameters
    ----------
    path
        The socket path.
    handler
        ``await handler(request)`` returns a JSON-able result or raises:
        :class:`UserError` (or an exception with ``exit_code == 2``) answers
        with exit status 2, anything else with 1. A ``HostError``'s
        ``details()`` is sent in full.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Bind the socket (replacing a leftover one) and start serving."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with _socket_path(self.path) as bind_path:
            self._server = await asyncio.start_unix_server(self._serve, path=bind_path, limit=_MAX_LINE)
        # The directory is 0700 already; the socket itself is tightened as well.
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                reply = await self._answer(line)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            # A client that went away or sent an oversized line; the next one is served as usual.
            logger.debug("control connection dropped: %s: %s", type(exc).__name__, exc)
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError) as exc:
                logger.debug("control connection did not close cleanly: %s", exc)

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("not a request object")
        except ValueError:
            return {"ok": False, "error": "malformed request; send one JSON object with an 'op' per line", "exit": 2}
        try:
            return {"ok": True, "result": await self.handler(request)}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes a reply, never a dead server
            details = getattr(exc, "details", None)
            message = details() if callable(details) else str(exc) or type(exc).__name__
            code = 2 if isinstance(exc, UserError) or getattr(exc, "exit_code", 1) == 2 else 1
            if not isinstance(exc, SpecClusterError):
                logger.exception("control request %r failed", request.get("op"))
                message = f"{type(exc).__name__}: {message}"
            return {"ok": False, "error": message, "exit": code}

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, let replies in flight finish, remove the socket."""
        if self._server is not None:
            self._server.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        stuck = list(self._tasks)
        for task in stuck:
            task.cancel()
        if stuck:
            logger.warning("control socket: cancelled %d connection(s) still busy after %g s", len(stuck), timeout)
            # Cancelled handlers still close their writers; wait for that.
            await asyncio.wait(stuck)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(self.path)


def request(directory: Path, op: Op | str, *, timeout: float = 30.0, **fields: Any) -> Any:
    """Send one request to a cluster's head process and return its result.

    Parameters
    ----------
    directory
        The cluster directory.
    op
        The operation, e.g. ``Op.STATUS`` (a plain string is sent as it is:
        this transport serves any handler).
    timeout
        Seconds to wait for the reply.
    **fields
        Arguments of the operation.

    Raises
    ------
    ControlError
        When the head cannot be reached or answers with an error.
    """
    op = str(op)  # the wire string, also in the messages below
    path = directory / SOCKET_FILE
    payload = json.dumps({"op": op, **fields}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _socket_path(path) as connect_path:
                sock.connect(connect_path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise ControlError(
                f"cluster {directory.name}: its head process does not answer at {path} ({exc.strerror or exc})"
            ) from None
        try:
            sock.sendall(payload)
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:  # socket.timeout is an alias since 3.10
            raise ControlError(f"cluster {directory.name}: no answer to {op!r} within {timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"cluster {directory.name}: lost the head process during {op!r}: {exc}") from None
    if not data:
        raise ControlError(f"cluster {directory.name}: the head process closed the connection during {op!r}")
    try:
        reply = json.loads(bytes(data))
    except ValueError:
        raise ControlError(f"cluster {directory.name}: garbled reply to {op!r}") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error") or f"{op} failed"), int(reply.get("exit") or 1))
    return reply.get("result")
