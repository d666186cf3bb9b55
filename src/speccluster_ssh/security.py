"""Host key policies and TLS material for a cluster.

Host keys are always checked. ``strict`` accepts only keys already listed in
known_hosts; ``accept-new`` also records keys of hosts never seen before in a
known_hosts file this tool manages, and still refuses a key that changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import asyncssh

from .inventory import HostSpec

logger = logging.getLogger(__name__)

KNOWN_HOSTS_POLICIES = ("strict", "accept-new")

# Where make_security's files go on a host, relative to the host's cluster directory.
CA_PEM = "tls/ca.pem"
NODE_CERT = "tls/node.pem"
NODE_KEY = "tls/node.key"


def default_managed_known_hosts() -> str:
    """Where ``accept-new`` records keys: ``$XDG_STATE_HOME/speccluster-ssh/known_hosts``."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "speccluster-ssh", "known_hosts")


class _RecordingClient(asyncssh.SSHClient):
    """Remembers the key a server offered, and decides on keys not yet trusted."""

    def __init__(self, checker: KnownHostsChecker) -> None:
        self._checker = checker

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self._checker.offered_key = key
        return self._checker.accept_unlisted(host, addr, port, key)


class KnownHostsChecker:
    """Host key verification for one host under one policy.

    Parameters
    ----------
    host
        The inventory host.
    policy
        ``"strict"`` or ``"accept-new"``.
    known_hosts
        An explicit known_hosts file; ``None`` means ``~/.ssh/known_hosts``.
    managed
        The file ``accept-new`` writes to.
    """

    def __init__(self, host: HostSpec, policy: str, known_hosts: str | None, managed: str | None) -> None:
        if policy not in KNOWN_HOSTS_POLICIES:
            from .errors import UserError

            raise UserError(
                f"host {host.name}: known-hosts policy must be one of {', '.join(KNOWN_HOSTS_POLICIES)}, got {policy!r}"
            )
        self.host = host
        self.policy = policy
        self.managed = managed or default_managed_known_hosts()
        user_file = os.path.expanduser("~/.ssh/known_hosts")
        self.files = [str(known_hosts)] if known_hosts else [user_file]
        if policy == "accept-new" and os.path.exists(self.managed):
            self.files.append(self.managed)
        self.offered_key: asyncssh.SSHKey | None = None
        self.recorded = False

    def connect_options(self) -> dict[str, Any]:
        existing = [f for f in self.files if os.path.exists(f)]
        return {
            "known_hosts": existing if existing else ([], [], []),
            "client_factory": lambda: _RecordingClient(self),
        }

    def _listed_keys(self, host: str, addr: str, port: int) -> list[asyncssh.SSHKey]:
        keys: list[asyncssh.SSHKey] = []
        for path in self.files:
            if not os.path.exists(path):
                continue
            try:
                trusted = asyncssh.read_known_hosts(path).match(host, addr, port)[0]
            except (OSError, ValueError):
                continue
            keys.extend(trusted)
        return keys

    def accept_unlisted(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        """Called for a key not trusted by the files: only accept-new may take it."""
        if self.policy != "accept-new":
            return False
        if self._listed_keys(host, addr, port):
            return False  # a different key is on record: the key changed
        self._record(host, port, key)
        return True

    def _record(self, host: str, port: int, key: asyncssh.SSHKey) -> None:
        path = Path(self.managed)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = host if port == 22 else f"[{host}]:{port}"
        line = f"{name} {key.export_public_key().decode().strip()}\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line)
        self.recorded = True
        logger.warning("recorded new host key for %s in %s", self.host.name, path)

    def refusal_message(self, exc: Exception) -> str:
        key = self.offered_key
        fingerprint = key.get_fingerprint("sha256") if key is not None else "unknown"
        listed = bool(self._listed_keys(self.host.address, self.host.address, self.host.port or 22))
        files = ", ".join(self.files)
        if listed:
            return (
                f"host key for {self.host.address} CHANGED (offered {fingerprint}); "
                f"if the host was reinstalled, remove its old line from {files} and connect again"
            )
        hint = "or use --known-hosts accept-new" if self.policy == "strict" else ""
        return (
            f"host key for {self.host.address} is not known (offered {fingerprint}); "
            f"add it to {files} (ssh-keyscan {self.host.address}) {hint}".rstrip()
        )


def known_hosts_for(host: HostSpec, policy: str, known_hosts: str | None, managed: str | None) -> KnownHostsChecker:
    """The host key checker for ``host`` under ``policy``."""
    return KnownHostsChecker(host, policy, known_hosts, managed)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool) -> Any:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_security(security: Any, cluster_id: str) -> tuple[Any, dict[str, bytes]]:
    """The head's ``Security`` and the files every host needs.

    Parameters
    ----------
    security
        ``True`` for a fresh CA with certificates for the hosts' processes and
        for the head's client, ``False`` for plain TCP, or a ready
        ``distributed.Security`` (used as is; hosts get no files).
    cluster_id
        Names the CA.

    Returns
    -------
    (Security, files)
        ``files`` maps paths relative to a host's cluster directory to contents.
    """
    from distributed.security import Security

    if isinstance(security, Security):
        return security, {}
    if not security:
        logger.warning("TLS is off: anyone who can reach the scheduler can run code as you")
        return Security(), {}
    ca_key = _new_key()
    ca_name = f"speccluster-ssh CA {cluster_id}"
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    node_key = _new_key()
    node = _cert(f"{cluster_id} node", node_key, ca_name, ca_key, ca=False)
    client_key = _new_key()
    client = _cert(f"{cluster_id} client", client_key, ca_name, ca_key, ca=False)
    ca_pem, node_pem, node_key_pem = _pem_cert(ca), _pem_cert(node), _pem_key(node_key)
    head = Security(
        require_encryption=True,
        tls_ca_file=ca_pem.decode(),
        tls_scheduler_cert=node_pem.decode(),
        tls_scheduler_key=node_key_pem.decode(),
        tls_worker_cert=node_pem.decode(),
        tls_worker_key=node_key_pem.decode(),
        tls_client_cert=_pem_cert(client).decode(),
        tls_client_key=_pem_key(client_key).decode(),
    )
    files = {CA_PEM: ca_pem, NODE_CERT: node_pem, NODE_KEY: node_key_pem}
    return head, files


def remote_security_paths(files: Mapping[str, bytes]) -> dict[str, str]:
    """Security keyword options of the hosts' dask servers, for the files of :func:`make_security`.

    Every server on a host (scheduler, nanny, worker) uses the one node
    certificate, also as a client of the others.

    Parameters
    ----------
    files
        The ``files`` that :func:`make_security` returned.

    Returns
    -------
    dict
        ``tls_*`` options of ``distributed.Security`` to paths relative to
        the host's cluster directory (the host agent resolves them); empty
        when the hosts get no files (TLS off, or a ready ``Security``).
    """
    if not files:
        return {}
    return {
        "tls_ca_file": CA_PEM,
        "tls_scheduler_cert": NODE_CERT,
        "tls_scheduler_key": NODE_KEY,
        "tls_worker_cert": NODE_CERT,
        "tls_worker_key": NODE_KEY,
        "tls_client_cert": NODE_CERT,
        "tls_client_key": NODE_KEY,
    }
