"""Wheels from host to host: a small TLS file server and its client. A shipped source.

Sent to the hosts beside ``envbuild.py`` (the environment script) and run in
its namespace, under a python that may have no packages: the standard library
only, Python 3.8 syntax, and every top-level name starts with ``wheelpeer_``,
``WheelPeer`` or ``_wheelpeer`` so that nothing clashes with the script's own.

A host whose wheel store holds a wheelhouse serves it to the other hosts of
the same cluster (:func:`wheelpeer_serve`), which fetch with
:func:`wheelpeer_fetch`; the head then sends each wheel to a few hosts only
(``fanout.py`` decides who fetches from whom).

Both sides authenticate each other with the cluster's own CA (the files of
``security.make_security``: ``tls/ca.pem``, ``tls/node.pem``,
``tls/node.key``), received as data: a client without a certificate of that
CA is refused during the handshake. The node certificate names no host, so
the hostname is not checked; the CA is the whole trust (the same as the
cluster's dask servers). The server answers only for the file names of its
allow-list (the manifest); the client checks every file's size and sha256,
writes it under a temporary name and renames it into place only when it
matches, so a failed or corrupted transfer leaves nothing behind.

The protocol, on one TLS connection: the client sends a JSON line
``{"file": NAME}``; the server answers a JSON line ``{"size": N}`` followed by
exactly N bytes, or ``{"error": WHY}`` and closes. The client may ask for
several files one after the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# Bytes read from disk or the socket at a time.
_WHEELPEER_CHUNK = 1 << 18
# Longest request line a server reads (a JSON object with one file name).
_WHEELPEER_MAX_LINE = 4096
# Connections one server handles at once; more wait in the listen backlog.
_WHEELPEER_MAX_CLIENTS = 16


class WheelPeerError(Exception):
    """A peer transfer failed (refused, unreachable, too slow, or a file that does not match)."""


def _wheelpeer_context(pems: Dict[str, str], server: bool) -> ssl.SSLContext:
    """A TLS context requiring a certificate of the cluster's CA from the other side.

    ``pems`` holds the PEM texts ``ca``, ``cert`` and ``key``. They are written
    to a private temporary directory only for as long as the context takes to
    load them (``ssl`` reads certificates from files only).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        # The node certificate is one for all hosts and names none of them.
        ctx.check_hostname = False
    folder = tempfile.mkdtemp(prefix="wheelpeer-")  # 0700
    try:
        paths = {}
        for key in ("ca", "cert", "key"):
            path = os.path.join(folder, key + ".pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(pems[key])
            paths[key] = path
        ctx.load_verify_locations(cafile=paths["ca"])
        ctx.load_cert_chain(paths["cert"], paths["key"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return ctx


def _wheelpeer_name_ok(name: Any) -> bool:
    """A plain file name: no directory part, no hidden or temporary file."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
    )


def wheelpeer_lab_address() -> str:
    """The address this host was reached on over SSH: the one facing the cluster.

    From ``SSH_CONNECTION`` (client address, client port, server address,
    server port); ``0.0.0.0`` when the script does not run under sshd.
    """
    parts = os.environ.get("SSH_CONNECTION", "").split()
    return parts[2] if len(parts) == 4 else "0.0.0.0"


class WheelPeerServer:
    """A running wheel server (see :func:`wheelpeer_serve`).

    Attributes
    ----------
    address : tuple
        ``(host, port)`` it listens on.
    bytes_sent : int
        File bytes sent so far (headers left out).
    files_sent : int
        Files sent in full.
    refused : int
        Connections refused in the handshake, and requests for names not allowed.
    """

    def __init__(self, directory: str, allowed: Iterable[str], context: ssl.SSLContext,
                 listener: socket.socket, lifetime: float, io_timeout: float) -> None:
        self.directory = directory
        self.allowed = frozenset(allowed)
        self.address = listener.getsockname()[:2]
        self.bytes_sent = 0
        self.files_sent = 0
        self.refused = 0
        self._context = context
        self._listener = listener
        self._io_timeout = io_timeout
        self._deadline = time.monotonic() + lifetime
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(_WHEELPEER_MAX_CLIENTS)
        self._threads: List[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="wheelpeer-accept", daemon=True)
        self._acceptor.start()

    @property
    def running(self) -> bool:
        return self._acceptor.is_alive()

    def stats(self) -> Dict[str, Any]:
        """What it did, JSON-able."""
        with self._lock:
            return {"bytes_sent": self.bytes_sent, "files_sent": self.files_sent, "refused": self.refused}

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, and wait (up to ``timeout``) for the transfers under way."""
        self._stop.set()
        self._acceptor.join(timeout)
        end = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, end - time.monotonic()))

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)  # to notice stop() and the lifetime
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    conn, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not self._slots.acquire(timeout=self._io_timeout):
                    conn.close()
                    continue
                thread = threading.Thread(target=self._handle, args=(conn,), name="wheelpeer-conn", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()
        finally:
            self._listener.close()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._io_timeout)
            try:
                tls = self._context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                self._count(refused=1)  # no certificate of the cluster's CA (or none at all)
                return
            with tls:
                self._serve_requests(tls)
        except (OSError, ValueError):
            pass  # the client went away or sent garbage: its own fetch reports it
        finally:
            conn.close()
            self._slots.release()

    def _serve_requests(self, tls: ssl.SSLSocket) -> None:
        reader = tls.makefile("rb")
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            line = reader.readline(_WHEELPEER_MAX_LINE)
            if not line:
                return
            request = json.loads(line)
            name = request.get("file") if isinstance(request, dict) else None
            if not _wheelpeer_name_ok(name) or name not in self.allowed:
                self._count(refused=1)
                tls.sendall(json.dumps({"error": "not offered: %r" % (name,)}).encode() + b"\n")
                return
            try:
                fd = os.open(os.path.join(self.directory, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                tls.sendall(json.dumps({"error": "cannot read %s: %s" % (name, exc.strerror)}).encode() + b"\n")
                return
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                tls.sendall(json.dumps({"size": size}).encode() + b"\n")
                sent = 0
                while sent < size:
                    chunk = f.read(min(_WHEELPEER_CHUNK, size - sent))
                    if not chunk:
                        raise OSError("%s shrank while being sent" % name)
                    tls.sendall(chunk)
                    sent += len(chunk)
                    self._count(bytes_sent=len(chunk))
            self._count(files_sent=1)


def wheelpeer_serve(directory: str, allowed: Iterable[str], pems: Dict[str, str], bind: Optional[str] = None,
                    port: int = 0, lifetime: float = 900.0, io_timeout: float = 30.0) -> WheelPeerServer:
    """Serve the files of ``directory`` named in ``allowed`` to clients of the cluster's CA.

    Parameters
    ----------
    directory
        The wheel store.
    allowed
        The only file names served (the manifest's).
    pems
        PEM texts: ``ca`` (the cluster's CA), ``cert`` and ``key`` (the node's).
    bind
        Address to listen on; default :func:`wheelpeer_lab_address`.
    port
        Port; 0 picks a free one (read it from ``address``).
    lifetime
        Seconds after which the server stops by itself, even if nobody says so.
    io_timeout
        Seconds one handshake, read or write may take.

    Returns
    -------
    WheelPeerServer
        Already accepting, in threads of its own; ``stop()`` ends it.
    """
    context = _wheelpeer_context(pems, server=True)
    host = bind if bind is not None else wheelpeer_lab_address()
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    listener = socket.create_server((host, port), family=family, backlog=64)
    return WheelPeerServer(directory, allowed, context, listener, lifetime, io_timeout)


def _wheelpeer_readline(tls: ssl.SSLSocket, deadline: float, io_timeout: float) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        _wheelpeer_timeout(tls, deadline, io_timeout)
        byte = tls.recv(1)
        if not byte:
            raise WheelPeerError("the peer closed the connection")
        line += byte
        if len(line) > _WHEELPEER_MAX_LINE:
            raise WheelPeerError("the peer's answer is too long")
    return line


def _wheelpeer_timeout(sock: socket.socket, deadline: float, io_timeout: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise WheelPeerError("deadline passed")
    sock.settimeout(min(left, io_timeout))


def _wheelpeer_receive(tls: ssl.SSLSocket, directory: str, name: str, sha256: str, size: int,
                       deadline: float, io_timeout: float) -> int:
    """Receive one file into ``directory`` under a temporary name; rename it once it matches."""
    tls.sendall(json.dumps({"file": name}).encode() + b"\n")
    header = json.loads(_wheelpeer_readline(tls, deadline, io_timeout))
    if "error" in header:
        raise WheelPeerError("peer refused %s: %s" % (name, header["error"]))
    if header.get("size") != size:
        raise WheelPeerError("peer offers %s with %s bytes, the manifest says %d" % (name, header.get("size"), size))
    # ".tmp-": the environment script's collection removes what a killed fetch left.
    fd, temp = tempfile.mkstemp(prefix=".tmp-wheelpeer-", suffix=".part", dir=directory)
    try:
        digest = hashlib.sha256()
        got = 0
        with os.fdopen(fd, "wb") as f:
            while got < size:
                _wheelpeer_timeout(tls, deadline, io_timeout)
                chunk = tls.recv(min(_WHEELPEER_CHUNK, size - got))
                if not chunk:
                    raise WheelPeerError("peer closed the connection after %d of %d bytes of %s" % (got, size, name))
                digest.update(chunk)
                f.write(chunk)
                got += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != sha256:
            raise WheelPeerError("%s from the peer does not match its sha256 (got %s)" % (name, digest.hexdigest()))
        os.chmod(temp, 0o644)
        os.replace(temp, os.path.join(directory, name))
    except BaseException:
        # Whatever stopped it (timeout, mismatch, a signal), no partial file stays.
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    return got


def wheelpeer_fetch(host: str, port: int, files: Sequence[Tuple[str, str, int]], directory: str,
                    pems: Dict[str, str], timeout: float = 300.0, io_timeout: float = 30.0,
                    connect_timeout: float = 5.0) -> Dict[str, Any]:
    """Fetch ``files`` (``(filename, sha256, size)``) from the peer at ``host:port`` into ``directory``.

    Each file is checked against its size and sha256 and renamed into place
    only then; the files fetched before a failure stay (they are complete and
    checked), the one under way leaves nothing.

    Parameters
    ----------
    host, port
        The peer's server.
    files
        What to fetch.
    directory
        The wheel store.
    pems
        PEM texts ``ca``, ``cert``, ``key``, as for :func:`wheelpeer_serve`.
    timeout
        Seconds for the whole fetch.
    io_timeout
        Seconds one handshake, read or write may take.
    connect_timeout
        Seconds the TCP connect may take: a peer behind a firewall that drops
        packets costs this, then the head sends instead.

    Returns
    -------
    dict
        ``bytes`` received and ``files`` fetched (names, in order).

    Raises
    ------
    WheelPeerError
        Refused, unreachable, too slow or a file that does not match; the
        message says which file and why.
    """
    deadline = time.monotonic() + timeout
    for name, _, _ in files:
        if not _wheelpeer_name_ok(name):
            raise WheelPeerError("not a plain file name: %r" % (name,))
    context = _wheelpeer_context(pems, server=False)
    received = 0
    done: List[str] = []
    try:
        sock = socket.create_connection((host, port), timeout=min(connect_timeout, timeout))
    except OSError as exc:
        raise WheelPeerError("cannot connect to peer %s:%d: %s" % (host, port, exc)) from None
    try:
        _wheelpeer_timeout(sock, deadline, io_timeout)  # for the handshake
        with context.wrap_socket(sock) as tls:
            for name, sha256, size in files:
                received += _wheelpeer_receive(tls, directory, name, sha256, int(size), deadline, io_timeout)
                done.append(name)
    except WheelPeerError:
        raise
    except (OSError, ValueError) as exc:
        # ssl.SSLError and socket.timeout are OSErrors; a bad JSON line a ValueError.
        raise WheelPeerError("peer %s:%d: %s (after %d files)" % (host, port, exc or type(exc).__name__, len(done))) from None
    finally:
        sock.close()
    return {"bytes": received, "files": done}


# -- ops of the environment script (envbuild.py), when this runs in its namespace ---------------------------------
# Requests of the head (JSON lines, see shipping.py and peerwheels.py on the head):
#   {"op": "peer_fetch", "host", "port", "wheels": [{"sha256", "size"}], "pems", "timeout"}
#       -> {"event": "fetched", "got": [sha256...], "bytes": N, "error": "" or why}
#   {"op": "serve", "wheels": [sha256...], "pems", "bind" (optional), "lifetime"}
#       -> {"event": "serving", "address": [host, port]} or {"event": "serve_failed", "why"}
#   {"op": "stop_serving"} -> {"event": "stopped", "bytes_sent", "files_sent", "refused"}
# The wheel store names each file <sha256>.whl, so those are the names served and fetched.

_WHEELPEER_SERVERS: List[WheelPeerServer] = []


def _wheelpeer_store_name(sha256: Any) -> str:
    name = "%s.whl" % (sha256,)
    if not _wheelpeer_name_ok(name) or len(str(sha256)) != 64:
        raise ValueError("not a sha256: %r" % (sha256,))
    return name


def _wheelpeer_op_fetch(session: Any, message: Dict[str, Any]) -> None:
    files = [(_wheelpeer_store_name(w["sha256"]), str(w["sha256"]), int(w["size"])) for w in message["wheels"]]
    os.makedirs(session.store, exist_ok=True)
    error = ""
    received = 0
    try:
        received = wheelpeer_fetch(str(message["host"]), int(message["port"]), files, session.store,
                                   message["pems"], timeout=float(message.get("timeout", 300.0)))["bytes"]
    except WheelPeerError as exc:
        error = str(exc)
    # What the store holds now (the files before a failure stay, checked): the head sends the rest itself.
    got = [sha for name, sha, size in files if os.path.isfile(os.path.join(session.store, name))]
    session.send("fetched", got=got, bytes=received, error=error)


def _wheelpeer_op_serve(session: Any, message: Dict[str, Any]) -> None:
    _wheelpeer_stop_all()
    bind = message.get("bind") or wheelpeer_lab_address()
    if bind in ("0.0.0.0", "::"):
        session.send("serve_failed", why="no address facing the cluster (not reached over SSH)")
        return
    try:
        allowed = [_wheelpeer_store_name(sha) for sha in message["wheels"]]
        server = wheelpeer_serve(session.store, allowed, message["pems"], bind=bind,
                                 lifetime=float(message.get("lifetime", 900.0)))
    except (OSError, ValueError, KeyError) as exc:  # ssl.SSLError is an OSError
        session.send("serve_failed", why=str(exc))
        return
    _WHEELPEER_SERVERS.append(server)
    session.send("serving", address=list(server.address))


def _wheelpeer_stop_all() -> Dict[str, Any]:
    totals = {"bytes_sent": 0, "files_sent": 0, "refused": 0}
    while _WHEELPEER_SERVERS:
        server = _WHEELPEER_SERVERS.pop()
        server.stop()
        for key, value in server.stats().items():
            totals[key] += value
    return totals


def _wheelpeer_op_stop(session: Any, message: Dict[str, Any]) -> None:
    session.send("stopped", **_wheelpeer_stop_all())


if isinstance(globals().get("OPS"), dict):
    globals()["OPS"].update(peer_fetch=_wheelpeer_op_fetch, serve=_wheelpeer_op_serve, stop_serving=_wheelpeer_op_stop)
