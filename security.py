"""Who may talk to whom: the shared secret, the HMAC handshake, TLS, protected mode.

Every party of a cluster (master, storage nodes, clients) may hold one
shared secret.  A server that has one sends a fresh random challenge in
HELLO_OK; the peer answers AUTH with its own fresh nonce and
HMAC-SHA256(secret, b"client" + challenge + client_nonce + role); the server
checks it in constant time and proves itself in AUTH_OK with
HMAC-SHA256(secret, b"server" + client_nonce + challenge).  The secret never
crosses the wire, each MAC is good for one connection only (both nonces are
fresh), and the b"client"/b"server" labels and the swapped nonce order keep
a MAC from being reflected back as the other side's answer.

What this leaves out, on purpose (docs/SECURITY.md): the secret is shared,
so any party can act as any other; nothing after the handshake is signed,
so an active attacker on the path can hijack a plain-TCP connection once it
is authenticated -- TLS (optional, this module builds its contexts) closes
that; there are no users or per-name permissions.

This module holds pure functions and the ``Security`` bundle that
``transport.Connection`` and ``transport.Server`` take.  It never logs,
prints or formats the secret; ``Security``'s repr hides it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

# hashlib, hmac, secrets and ipaddress are imported by the functions that
# use them: a client without a shared secret never does, and they are a
# noticeable part of a short command's start-up.

# 32 random bytes per nonce: 256 bits, far past any chance of reuse.
NONCE_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
# A secret file holds a line of text; anything bigger is a wrong path.
MAX_SECRET_FILE_BYTES = 64 * 1024

HOW_TO_SET_A_SECRET = (
    "set a shared secret with --secret-file PATH (a file holding one line of random text, "
    "e.g. made by `openssl rand -hex 32 > secret && chmod 600 secret`) or [security] secret in config.ini, "
    "and give the same secret to the master, every node and every client; "
    "or pass --insecure to run without authentication anyway (see docs/SECURITY.md)")


@dataclass(frozen=True)
class Security:
    """What a process uses on its connections; ``Security()`` = none (the default).

    ``secret``: the shared secret (bytes) or None.  ``server_context``: TLS
    for the connections a server accepts; ``client_context``: TLS for the
    connections a process opens.  Built once by ``from_config``.
    """

    secret: bytes | None = field(default=None, repr=False)
    server_context: ssl.SSLContext | None = None
    client_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return (f"Security(secret={'set' if self.secret else 'none'}, "
                f"server_tls={self.server_context is not None}, client_tls={self.client_context is not None})")


NO_SECURITY = Security()


# --- the handshake's arithmetic -----------------------------------------------------------
def new_nonce() -> bytes:
    import secrets  # noqa: PLC0415 - see the imports at the top
    return secrets.token_bytes(NONCE_BYTES)


def _hmac_sha256(secret: bytes, message: bytes) -> bytes:
    import hashlib  # noqa: PLC0415 - see the imports at the top
    import hmac  # noqa: PLC0415
    return hmac.new(secret, message, hashlib.sha256).digest()


def client_mac(secret: bytes, challenge: bytes, client_nonce: bytes, role: str) -> bytes:
    """What the connecting side sends in AUTH: binds direction, both nonces and its role."""
    return _hmac_sha256(secret, b"client" + challenge + client_nonce + role.encode("utf-8"))


def server_mac(secret: bytes, client_nonce: bytes, challenge: bytes) -> bytes:
    """What the server sends in AUTH_OK (label and nonce order differ from ``client_mac``)."""
    return _hmac_sha256(secret, b"server" + client_nonce + challenge)


def macs_equal(expected: bytes, received: bytes | None) -> bool:
    """Constant-time comparison; a malformed ``received`` (None) is simply unequal."""
    import hmac  # noqa: PLC0415 - see the imports at the top
    return received is not None and hmac.compare_digest(expected, received)


def parse_hex(text: str, nbytes: int) -> bytes | None:
    """``nbytes`` bytes from exactly 2*nbytes hex digits, else None (never raises)."""
    if not isinstance(text, str) or len(text) != 2 * nbytes:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


# --- read capabilities (direct reads) -----------------------------------------------------
# A client reads chunks from the nodes itself only with a capability the
# master issues for each blob of the version it pinned: "EXPIRES.MAC", where
# EXPIRES is a unix time in whole seconds and MAC the first READ_CAP_MAC_BYTES
# of HMAC-SHA256(secret, b"read-capability" NUL cluster id NUL blob NUL
# EXPIRES).  Nodes check it without asking the master (they hold the same
# secret), so a read costs the master one request, not one per piece.
# 128 bits of MAC are far past guessing within a capability's lifetime, and
# keep every GET_CHUNKS of a 4 KiB file short.
READ_CAP_MAC_BYTES = 16


def _read_cap_mac(secret: bytes, cluster_id: str, blob: str, expires: int) -> bytes:
    message = b"\0".join((b"read-capability", cluster_id.encode(), blob.encode(), str(expires).encode()))
    return _hmac_sha256(secret, message)[:READ_CAP_MAC_BYTES]


def read_capability(secret: bytes, cluster_id: str, blob: str, expires: int) -> str:
    """The capability to read ``blob`` of cluster ``cluster_id`` until unix time ``expires``."""
    return f"{expires}.{_read_cap_mac(secret, cluster_id, blob, expires).hex()}"


def read_capability_problem(secret: bytes, cluster_id: str, blob: str, cap, now: float) -> str | None:
    """Why ``cap`` does not allow reading ``blob`` at unix time ``now``; None if it does.

    Never raises: a malformed capability is a problem like any other.  The
    MAC is compared in constant time.
    """
    if not isinstance(cap, str) or cap.count(".") != 1:
        return "no read capability" if not cap else "a malformed read capability"
    expires_text, mac_text = cap.split(".")
    if not expires_text.isdigit() or len(expires_text) > 12:
        return "a malformed read capability"
    mac = parse_hex(mac_text, READ_CAP_MAC_BYTES)
    if not macs_equal(_read_cap_mac(secret, cluster_id, blob, int(expires_text)), mac):
        return f"a read capability that is not the master's for blob {blob}"
    if int(expires_text) < now:
        return "an expired read capability"
    return None


# --- secrets ------------------------------------------------------------------------------
def load_secret_file(path: str) -> bytes:
    """The secret in ``path``, surrounding whitespace stripped.

    Raises ValueError (naming the path, never the content) if the file
    cannot be read, is too large or holds only whitespace.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"secret file {path} is larger than {MAX_SECRET_FILE_BYTES} bytes; wrong file?")
    secret = data.strip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


def from_config(config) -> Security:
    """The ``Security`` a ``config.Config`` asks for; ValueError naming the bad key.

    The secret comes from ``secret_file`` (the --secret-file flag or
    ``[security] secret_file``) if set, else from ``[security] secret``.
    TLS: ``tls_cert`` + ``tls_key`` make the server side speak TLS;
    ``tls_ca`` (or, for a self-signed certificate, ``tls_cert`` itself) makes
    the connections this process opens speak TLS and verify the peer.
    """
    if config.secret_file:
        secret = load_secret_file(config.secret_file)
    elif config.secret.strip():
        secret = config.secret.strip().encode("utf-8")
    else:
        secret = None
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("[security] tls_cert and tls_key must be set together")
    server_context = client_context = None
    if config.tls_cert:
        server_context = server_tls_context(config.tls_cert, config.tls_key)
    ca = config.tls_ca or config.tls_cert
    if ca:
        client_context = client_tls_context(ca)
    return Security(secret, server_context, client_context)


# ssl (~5 ms to import) is imported by the two functions below, the only
# users: a client or server without TLS never loads it (see transport._tls_errors).


def server_tls_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """TLS 1.2+ server context with this certificate; peers need no certificate
    (they prove themselves with the shared secret)."""
    import ssl  # noqa: PLC0415 - see above
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"[security] tls_cert/tls_key: cannot load {cert_path} / {key_path}: {exc}") from None
    return context


def client_tls_context(ca_path: str) -> ssl.SSLContext:
    """TLS 1.2+ client context that trusts only ``ca_path``.

    The chain is verified, the host name is not: every process of a cluster
    may share one certificate, and nodes are reached at whatever address
    they registered with.  A certificate signed by this CA is the identity.
    """
    import ssl  # noqa: PLC0415 - see above
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=ca_path)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"[security] tls_ca: cannot load {ca_path}: {exc}") from None
    return context


# --- protected mode -----------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address.

    "" / "0.0.0.0" / "::" (every interface) are not; a name that does not
    resolve is treated as not loopback, so the check errs on the safe side.
    """
    if host in ("", "0.0.0.0", "::"):
        return False
    import ipaddress  # noqa: PLC0415 - see the imports at the top
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def protected_mode_problem(host: str, security: Security, insecure: bool) -> str | None:
    """Why a server must not listen on ``host`` as configured, or None if it may.

    Like Redis's protected mode: listening beyond loopback without a secret
    would let anyone on the network read, overwrite and delete every backup.
    """
    if security.secret or insecure or is_loopback(host):
        return None
    return (f"refusing to listen on {host or '*'} without authentication: anyone who can reach it could "
            f"read, overwrite and delete every backup. To fix it, " + HOW_TO_SET_A_SECRET)


def for_server(config, host: str, insecure: bool) -> Security:
    """``from_config`` for a process that listens on ``host``, with protected mode.

    Raises ValueError for a bad [security] setting, and for a non-loopback
    ``host`` without a secret unless ``insecure`` (the message says how to
    set one).  A server configured for TLS serves TLS; its own outgoing
    connections use ``tls_ca`` or else its certificate as the trust anchor.
    """
    security = from_config(config)
    problem = protected_mode_problem(host, security, insecure)
    if problem:
        raise ValueError(problem)
    return security


def secret_file_is_private(path: str) -> bool:
    """False if group or others may read ``path`` (callers warn; it still works)."""
    try:
        return not os.stat(path).st_mode & 0o077
    except OSError:
        return True
