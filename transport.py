"""Sockets for the protocol: one client-side ``Connection``, one server base.

Both sides speak ``protocol.py`` frames over TCP.  This module owns what the
sans-IO protocol leaves out: connecting, the HELLO handshake, timeouts,
turning socket failures into ``Unavailable``/``Timeout``, and the server
loop that reads a request, calls ``do_<OP>`` and turns exceptions into
``ERROR`` frames.  Servers (master, storage node) subclass ``RequestHandler``
and add ``do_<OP>`` methods; they never see a raw socket error.

Security lives here too, because it is part of opening a connection: the
optional TLS layer, the HMAC challenge-response on a shared secret that
follows HELLO (security.py has the arithmetic, docs/SECURITY.md the threat
model), and the limits that keep strangers cheap -- a bounded number of
connections, a handshake that must finish within ``io_timeout_s`` with tiny
frames only, and a half-sent frame dropped after ``io_timeout_s``.  With no
secret and no TLS configured, a connection is exactly what it always was.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time

import protocol
import security as security_module
from protocol import BackupError, RemoteProtocolError
from security import NO_SECURITY, Security

logger = logging.getLogger(__name__)

# Socket buffering of the file objects: large enough that a header and a
# small body are one syscall, small enough not to matter per connection.
# Bulk bodies bypass it (a BufferedReader reads a request larger than its
# buffer straight into the caller's; a BufferedWriter writes one through).
_STREAM_BUFFER_BYTES = 16 * 1024
# What a connection may make its server allocate is bounded twice over.
# Headers of up to FREE_HEADER_BYTES are read without asking: every request
# that is not a page of a list (an upload's name, a heartbeat) fits.  JSON
# decodes to Python objects of up to ~24 times its size ('[],[],...'), so a
# free header costs at most ~24 KiB per connection.
FREE_HEADER_BYTES = 1024
# Larger headers (pages of INVENTORY or DELETE_BLOBS, or junk) share one
# budget per server: at most this many header bytes are read and parsed at
# once over all connections, so their objects stay under ~6 MiB however
# many connections send them.  Four full pages, so nodes that register
# together still overlap.
HEADER_BUDGET_BYTES = 4 * protocol.PAGE_BYTES
# Bytes of a non-protocol answer to HELLO quoted in the error: enough to
# recognise "HTTP/1.1 400 Bad Request" or an SSH banner.
_ANSWER_QUOTED_BYTES = 48
# The frame's length prefix (protocol.py: 4 bytes, big-endian).
_FRAME_PREFIX_BYTES = 4
# A server over its max_connections (or out of frame memory) logs one line
# per this many seconds at most, with the count held back meanwhile: a
# flood must not flood the log.
_REFUSAL_LOG_INTERVAL_S = 5.0


def _tune(sock: socket.socket) -> None:
    # Frames are written whole and flushed; Nagle would only add latency to
    # small request/reply pairs.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Connection:
    """A connection to a server: handshake done, ready for requests.

    ``send``/``recv`` allow pipelining (several requests before reading the
    replies); ``request`` is the one-at-a-time form.  Socket errors surface
    as ``protocol.Unavailable`` (peer gone) or ``protocol.Timeout`` (peer
    silent past ``timeout_s``).  After any error the connection is broken
    and must be closed.
    """

    def __init__(self, address: tuple[str, int], role: str, timeout_s: float,
                 security: Security | None = None, *, secret: bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None, handshake_timeout_s: float | None = None,
                 expect_server_id: str | None = None):
        """Connect, (TLS,) HELLO, and authenticate when the server asks to.

        ``security`` bundles the shared secret and the client TLS context;
        ``secret``/``ssl_context`` override its parts.  Raises AuthFailed if
        the server rejects our secret, if it asks for one we lack, if it
        cannot prove it knows ours, or if we hold a secret and it asks for
        none (it might be an impostor collecting our data).

        ``handshake_timeout_s`` (default ``timeout_s``) bounds connecting
        and the handshake; ``timeout_s`` then bounds each read or write.  A
        caller that may wait long for a reply (a writer queued behind a
        lock) still learns within the short bound that the peer is not a
        backup server at all.  A peer that answers HELLO with anything but a
        handshake frame, or (``expect_server_id``) with another server id,
        raises Unavailable "HOST:PORT is not a backup ... (it answered ...)";
        one that answers nothing raises Timeout saying so.
        """
        security = security or NO_SECURITY
        secret = secret if secret is not None else security.secret
        ssl_context = ssl_context if ssl_context is not None else security.client_context
        self.address = address
        self.broken = False
        where = format_address(address)
        if handshake_timeout_s is None:
            handshake_timeout_s = timeout_s
        try:
            self.sock = socket.create_connection(address, timeout=handshake_timeout_s)
        except socket.timeout:
            raise protocol.Timeout(f"timed out connecting to {where}") from None
        except OSError as exc:
            raise protocol.Unavailable(f"cannot reach {where}: {exc.strerror or exc}") from None
        _tune(self.sock)
        if ssl_context is not None:
            import ssl  # noqa: PLC0415 - loaded already with the context (see _tls_errors)
            try:
                self.sock = ssl_context.wrap_socket(self.sock, server_hostname=address[0])
            except socket.timeout:
                self.sock.close()
                raise protocol.Timeout(f"TLS handshake with {where} timed out") from None
            except ssl.SSLCertVerificationError as exc:
                self.sock.close()
                raise protocol.AuthFailed(f"{where} presented a TLS certificate we do not trust: "
                                          f"{exc.verify_message or exc}") from None
            except (ssl.SSLError, OSError) as exc:
                self.sock.close()
                raise protocol.Unavailable(f"TLS handshake with {where} failed (does it speak TLS?): {exc}") from None
        self.rfile = self.sock.makefile("rb", buffering=_STREAM_BUFFER_BYTES)
        self.wfile = self.sock.makefile("wb", buffering=_STREAM_BUFFER_BYTES)
        try:
            reply = self._hello(role, handshake_timeout_s, expect_server_id)
            self._authenticate(reply, role, secret)
            self.sock.settimeout(timeout_s)
        except BaseException:
            self.close()
            raise
        self.peer_id = reply.server_id

    def _hello(self, role: str, timeout_s: float, expect_server_id: str | None) -> protocol.HelloOk:
        """Send HELLO and read HELLO_OK, telling a peer that is no backup server apart.

        The reply is read with the server-side handshake limits (a small
        header, no body), so an HTTP server's "HTTP" read as a length asks
        for nothing; what the peer sent is quoted in the error instead.
        """
        where = format_address(self.address)
        kind = "backup storage node" if role == "master" else "backup master"
        self.send(protocol.Hello(version=protocol.PROTOCOL_VERSION, role=role))
        try:
            answer = self.rfile.peek(_ANSWER_QUOTED_BYTES)[:_ANSWER_QUOTED_BYTES]
            if not answer:
                raise protocol.Unavailable(f"{where} is not a {kind} (it closed the connection without answering)")
            msg = protocol.read_message(self.rfile, max_header_bytes=protocol.MAX_HANDSHAKE_HEADER_BYTES,
                                        max_body_bytes=0)
        except socket.timeout:
            self.broken = True
            raise protocol.Timeout(f"{where} accepted the connection but answered nothing within "
                                   f"{timeout_s:g} s: it is not a {kind}, or it is hung") from None
        except RemoteProtocolError:
            self.broken = True
            text = bytes(answer).decode("ascii", "backslashreplace")
            raise protocol.Unavailable(f"{where} is not a {kind} (it answered {text!r})") from None
        except OSError as exc:
            self.broken = True
            raise protocol.Unavailable(f"lost connection to {where}: {exc}") from None
        if isinstance(msg, protocol.Error):
            raise protocol.error_from_code(msg.code, msg.message, msg.leader or "")
        if not isinstance(msg, protocol.HelloOk):
            self.broken = True
            raise protocol.Unavailable(f"{where} is not a {kind} (it answered {msg.OP} to HELLO)")
        if expect_server_id is not None and msg.server_id != expect_server_id:
            self.broken = True
            raise protocol.Unavailable(f"{where} is not a {kind} (it answered as {msg.server_id[:64]!r}, "
                                       f"not {expect_server_id!r}: a storage node's address?)")
        return msg

    def _authenticate(self, hello_ok: protocol.HelloOk, role: str, secret: bytes | None) -> None:
        where = format_address(self.address)
        if hello_ok.challenge is None:
            if secret:
                raise protocol.AuthFailed(
                    f"{where} does not require authentication but we hold a shared secret; refusing to talk "
                    f"to it (it may be an impostor, or run without a secret by mistake)")
            return
        if not secret:
            raise protocol.AuthFailed(f"{where} requires authentication: give the cluster's shared secret "
                                      f"with --secret-file PATH or [security] secret")
        challenge = security_module.parse_hex(hello_ok.challenge, security_module.NONCE_BYTES)
        if challenge is None:
            self.broken = True
            raise RemoteProtocolError(f"{where} sent a malformed authentication challenge")
        nonce = security_module.new_nonce()
        mac = security_module.client_mac(secret, challenge, nonce, role)
        reply = self.request(protocol.Auth(client_nonce=nonce.hex(), mac=mac.hex()), protocol.AuthOk)
        proof = security_module.parse_hex(reply.mac, security_module.MAC_BYTES)
        if not security_module.macs_equal(security_module.server_mac(secret, nonce, challenge), proof):
            self.broken = True
            raise protocol.AuthFailed(f"{where} could not prove it knows the shared secret "
                                      f"(an impostor, or a different secret)")

    def send(self, msg: protocol.Message, flush: bool = True) -> None:
        try:
            protocol.write_message(self.wfile, msg, flush=flush)
        except socket.timeout:
            self.broken = True
            raise protocol.Timeout(f"{format_address(self.address)} did not accept data in time") from None
        except OSError as exc:
            self.broken = True
            raise protocol.Unavailable(f"lost connection to {format_address(self.address)}: {exc}") from None

    def flush(self) -> None:
        try:
            self.wfile.flush()
        except OSError as exc:
            self.broken = True
            raise protocol.Unavailable(f"lost connection to {format_address(self.address)}: {exc}") from None

    def recv(self, body_buffer=None) -> protocol.Message | None:
        """The next message, or None if the peer closed the connection."""
        try:
            return protocol.read_message(self.rfile, body_buffer)
        except socket.timeout:
            self.broken = True
            raise protocol.Timeout(f"{format_address(self.address)} did not answer in time") from None
        except protocol.ClosedMidFrame as exc:
            # The peer died or dropped us mid-reply: a lost connection (like
            # ECONNRESET), which MasterLink may re-run elsewhere, not a bad frame.
            self.broken = True
            raise protocol.Unavailable(f"lost connection to {format_address(self.address)}: {exc.message}") from None
        except RemoteProtocolError:
            self.broken = True
            raise
        except OSError as exc:
            self.broken = True
            raise protocol.Unavailable(f"lost connection to {format_address(self.address)}: {exc}") from None

    def expect(self, cls, body_buffer=None):
        """Receive the next message and check it is a ``cls`` (see protocol.expect)."""
        msg = self.recv(body_buffer)
        if msg is None:
            self.broken = True
        try:
            return protocol.expect(msg, cls)
        except RemoteProtocolError:
            self.broken = True
            raise

    def request(self, msg: protocol.Message, reply_cls, body_buffer=None):
        self.send(msg)
        return self.expect(reply_cls, body_buffer)

    def peer_closed(self) -> bool:
        """True if an idle connection was closed by the peer (or has stray data).

        Nothing may arrive on an idle request/reply connection, so a readable
        socket means EOF or garbage: either way it cannot be reused.
        """
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def abandon(self) -> None:
        """Give up on this connection at once: mark it broken and wake a thread blocked reading it.

        ``close`` alone does not wake a ``recv`` blocked in another thread on
        Linux; shutting the socket down does.
        """
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        for closable in (getattr(self, "wfile", None), getattr(self, "rfile", None), self.sock):
            if closable is None:
                continue
            try:
                closable.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServerBusy(RemoteProtocolError):
    """The server could not get memory for a frame within ``io_timeout_s``.

    The frame is half read, so the connection cannot go on: the peer gets
    ``ERROR UNAVAILABLE`` and the connection is closed; it may retry.
    """

    code = "UNAVAILABLE"


class MemoryBudget:
    """Bytes that the connections of one server may hold at once for one purpose.

    ``take(n, timeout_s)`` waits until ``n`` bytes are free and returns
    True, or False after ``timeout_s``.  A request larger than the whole
    budget is granted once nothing else is held, so no size is refused for
    being large alone.  ``give(n)`` returns bytes taken.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._cond = threading.Condition()

    def take(self, nbytes: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.used_bytes and self.used_bytes + nbytes > self.limit_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self.used_bytes += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._cond:
            self.used_bytes -= nbytes
            self._cond.notify_all()


class BodyBuffers(MemoryBudget):
    """A budget for request bodies, with reusable buffers of ``buffer_bytes``.

    ``lend(n, timeout_s)`` returns a buffer for a body of ``n`` bytes: a
    pooled one when ``n <= buffer_bytes`` (allocated on first need, kept for
    the next frame), else None (the reader allocates it as the bytes arrive);
    either way ``n`` or ``buffer_bytes`` is counted against the budget until
    ``give_back``.  Raises ServerBusy if the budget stays full for
    ``timeout_s``.  So a connection that sends no body costs no buffer, and
    all connections together hold at most about ``limit_bytes`` of bodies.
    """

    def __init__(self, limit_bytes: int, buffer_bytes: int = 0):
        super().__init__(limit_bytes)
        self.buffer_bytes = buffer_bytes
        self._free: list[bytearray] = []

    def lend(self, nbytes: int, timeout_s: float) -> tuple[bytearray | None, int]:
        """(buffer or None, bytes counted): give both back with ``give_back``."""
        pooled = 0 < nbytes <= self.buffer_bytes
        counted = self.buffer_bytes if pooled else nbytes
        if not self.take(counted, timeout_s):
            raise ServerBusy(f"server busy: {self.used_bytes} bytes of request bodies in use, try again later")
        if not pooled:
            return None, counted
        with self._cond:
            buffer = self._free.pop() if self._free else None
        return (buffer if buffer is not None else bytearray(self.buffer_bytes)), counted

    def give_back(self, buffer: bytearray | None, counted: int) -> None:
        if buffer is not None and len(buffer) == self.buffer_bytes:
            with self._cond:
                self._free.append(buffer)
        self.give(counted)


class RequestHandler(socketserver.StreamRequestHandler):
    """One connection on a server: handshake, then request -> do_<OP> -> reply.

    Subclasses add ``do_<OP>(self, msg)`` methods that use ``self.reply`` and
    ``self.next_message``.  A body is read into a buffer lent by the
    server's ``BodyBuffers`` (unless the caller passes its own), and a large
    header only once the server's header budget allows: what a frame holds
    is given back when the next frame is read, so a message's body and
    fields stay valid until then.  An exception of type ``BackupError``
    becomes an ``ERROR`` frame; a ``RemoteProtocolError`` (a malformed
    frame, or ``ServerBusy``) also closes the connection, because the stream
    can no longer be trusted to be in sync.
    """

    rbufsize = _STREAM_BUFFER_BYTES
    wbufsize = _STREAM_BUFFER_BYTES

    def setup(self):
        self.request.settimeout(self.server.io_timeout_s)
        _tune(self.request)
        self._tls_socket = None
        context = self.server.security.server_context
        if context is not None:
            # No I/O here: the TLS handshake runs in handle(), under the
            # handshake deadline, where its failures are caught and logged.
            self.request = self._tls_socket = context.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False)
        super().setup()
        self.peer = format_address(self.client_address)
        self.role = None
        self._gone_logged = False
        self._header_held = 0  # header budget held for the last frame read
        self._body_loan: tuple[bytearray | None, int] | None = None  # its body buffer

    def finish(self):
        try:
            self._release_frame()
            super().finish()
        except OSError as exc:
            # StreamRequestHandler.finish ignores a failed flush, then flushes
            # the same unsent bytes again in wfile.close(), unguarded: a peer
            # that left with a reply still buffered would end in a traceback.
            self._peer_gone(exc)
            for stream in (self.wfile, self.rfile):
                try:
                    stream.close()
                except OSError:
                    pass  # the failed flush closed the socket file; nothing left to send
        finally:
            # socketserver closes the socket it accepted, which the TLS
            # wrapper took over; close the wrapper ourselves.
            if self._tls_socket is not None:
                self._tls_socket.close()

    def handle(self):
        try:
            if not self._handshake():
                return
            while True:
                try:
                    msg = self._next_request()
                except protocol.UnknownOperation as exc:
                    if not exc.recoverable:
                        raise
                    self.reply(protocol.error_message(exc))  # frame skipped: still in step
                    continue
                if msg is None:
                    return
                self._dispatch(msg)
                # A handled request holds nothing while the peer is idle: its
                # fields may be a page's worth of objects (see _release_frame).
                del msg
                self._release_frame()
        except protocol.ClosedMidFrame as exc:
            self._peer_gone(exc)
        except RemoteProtocolError as exc:
            if isinstance(exc, ServerBusy):
                self.server.log_limited("busy", "%s: %s; closing", self.peer, exc)
            else:
                logger.warning("%s: bad frame, closing: %s", self.peer, exc)
            try:
                self.reply(protocol.error_message(exc))
            except OSError:
                pass
        except (socket.timeout, TimeoutError):
            logger.info("%s: idle or stalled past the timeout, closing", self.peer)
        except OSError as exc:
            self._peer_gone(exc)

    def _peer_gone(self, exc: BaseException) -> None:
        """Log, once per connection, that the peer went away (one line, no traceback)."""
        if self._gone_logged:
            return
        self._gone_logged = True
        if is_peer_gone(exc):
            logger.info("%s: peer went away (%s)", self.peer, _describe(exc))
        else:
            logger.warning("%s: connection failed: %s", self.peer, _describe(exc))

    def _dispatch(self, msg: protocol.Message) -> None:
        """``do_<OP>(msg)``; a BackupError it raises becomes an ERROR reply (RemoteProtocolError passes)."""
        self.before_request(msg)
        method = getattr(self, "do_" + msg.OP, None)
        if method is None:
            self.reply(protocol.error_message(protocol.UnknownOperation(f"{msg.OP} is not served here")))
            return
        started = time.monotonic()
        try:
            method(msg)
        except RemoteProtocolError:
            raise
        except BackupError as exc:
            logger.debug("%s: %s failed: %s", self.peer, msg.OP, exc)
            self.reply(protocol.error_message(exc))
        self.after_request(msg, time.monotonic() - started)

    # --- handshake ------------------------------------------------------------------------
    def _handshake(self) -> bool:
        """TLS, HELLO, and AUTH if the server has a secret: True once the peer may send requests.

        The whole handshake must finish within ``io_timeout_s`` of the
        connection (a peer trickling bytes cannot hold a thread longer), its
        frames are limited to MAX_HANDSHAKE_HEADER_BYTES and no body, and
        nothing but HELLO and AUTH is read before the peer has authenticated.
        Returns False after answering (or not) a peer that must be dropped.
        """
        deadline = time.monotonic() + self.server.io_timeout_s
        if self._tls_socket is not None:
            try:
                self._tls_socket.do_handshake()
            except OSError as exc:  # ssl.SSLError and socket.timeout are OSErrors
                logger.warning("%s: TLS handshake failed, closing: %s", self.peer, exc)
                return False
        secret = self.server.security.secret
        hello = self._read_handshake_frame(deadline)
        if hello is None:
            return False
        if not isinstance(hello, protocol.Hello):
            if secret:
                return self._refuse(f"sent {hello.OP} before authenticating")
            raise RemoteProtocolError(f"expected HELLO, got {hello.OP}")
        if hello.version != protocol.PROTOCOL_VERSION:
            self.reply(protocol.error_message(protocol.VersionMismatch(
                f"server speaks protocol {protocol.PROTOCOL_VERSION}, peer {hello.version}")))
            return False
        self.role = hello.role
        if not secret:
            self.reply(protocol.HelloOk(version=protocol.PROTOCOL_VERSION, server_id=self.server.server_id))
            return True
        challenge = security_module.new_nonce()
        self.reply(protocol.HelloOk(version=protocol.PROTOCOL_VERSION, server_id=self.server.server_id,
                                    challenge=challenge.hex()))
        auth = self._read_handshake_frame(deadline)
        if auth is None:
            logger.warning("%s: authentication failed (role %r): closed the connection without answering "
                           "the challenge (peer has no secret?)", self.peer, hello.role[:32])
            return False
        if not isinstance(auth, protocol.Auth):
            return self._refuse(f"sent {auth.OP} instead of AUTH")
        nonce = security_module.parse_hex(auth.client_nonce, security_module.NONCE_BYTES)
        mac = security_module.parse_hex(auth.mac, security_module.MAC_BYTES)
        if nonce is None or not security_module.macs_equal(
                security_module.client_mac(secret, challenge, nonce, hello.role), mac):
            return self._refuse("wrong shared secret")
        self.reply(protocol.AuthOk(mac=security_module.server_mac(secret, nonce, challenge).hex()))
        logger.debug("%s: authenticated as %r", self.peer, hello.role[:32])
        return True

    def _refuse(self, reason: str) -> bool:
        """Log a failed authentication with the peer's address, answer AUTH_FAILED; False."""
        logger.warning("%s: authentication failed (role %r): %s; closing", self.peer, (self.role or "?")[:32], reason)
        try:
            self.reply(protocol.error_message(protocol.AuthFailed(
                "authentication failed: the shared secret is wrong or missing")))
        except OSError:
            pass
        return False

    def _read_handshake_frame(self, deadline: float):
        """One small, bodiless frame, all of it before ``deadline``; None at a clean EOF.

        Reads with ``read1`` (one recv at most) and re-arms the socket timeout
        with the time left before each, so a byte every few seconds does not
        keep a connection past the deadline.  Raises socket.timeout past it.
        """
        prefix = self._read_by(_FRAME_PREFIX_BYTES, deadline, eof_ok=True)
        if prefix is None:
            return None
        length = protocol.parse_header_length(prefix, protocol.MAX_HANDSHAKE_HEADER_BYTES)
        cls, fields, _ = protocol.parse_header(self._read_by(length, deadline), max_body_bytes=0)
        return cls(**fields)

    def _read_by(self, size: int, deadline: float, eof_ok: bool = False) -> bytes | None:
        data = bytearray()
        try:
            while len(data) < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("handshake not finished in time")
                self.request.settimeout(remaining)
                # peek: one recv of whatever has arrived into the buffer (so a
                # peer's unread bytes do not turn our close into a reset that
                # would swallow our ERROR frame); read1 then takes from it.
                piece = self.rfile.read1(size - len(data)) if self.rfile.peek(1) else b""
                if not piece:
                    if eof_ok and not data:
                        return None
                    raise protocol.ClosedMidFrame(f"connection closed mid-frame ({len(data)} of {size} bytes)")
                data += piece
        finally:
            self.request.settimeout(self.server.io_timeout_s)
        return bytes(data)

    # --- requests -------------------------------------------------------------------------
    def before_request(self, msg: protocol.Message) -> None:
        """Hook run before each request is dispatched; subclasses may override."""

    def after_request(self, msg: protocol.Message, elapsed_s: float) -> None:
        """Hook run after each request was served (or answered with ERROR); for metrics."""

    def idle_deadline_s(self) -> float | None:
        """Seconds the peer may stay silent between requests before ``on_idle`` runs.

        None (the default): no such deadline, only the server's idle timeout,
        which closes the connection.  Subclasses that hold something on the
        peer's behalf between requests override both.
        """
        return None

    def on_idle(self) -> None:
        """The peer sent nothing for ``idle_deadline_s``; the connection stays open."""

    def _next_request(self):
        """The next request frame (None at EOF), running ``on_idle`` if the peer is quiet too long."""
        idle_s = self.server.idle_timeout_s
        deadline_s = self.idle_deadline_s()
        if deadline_s is not None and deadline_s < idle_s and not self._wait_readable(deadline_s):
            self.on_idle()
            idle_s -= deadline_s
        return self.next_message(idle_s)

    def _wait_readable(self, timeout_s: float) -> bool:
        """True once a byte (or EOF) can be read at once, False after ``timeout_s`` of silence.

        Unlike a read that times out (which leaves a socket file unusable),
        this leaves the connection as it was.  Bytes already buffered (a
        pipelined next request) count; else the socket is polled.
        """
        try:
            self.request.settimeout(0.0)
            # Non-blocking: returns buffered bytes, or b"" if nothing came yet
            # (TLS raises SSLWantReadError instead).
            if self.rfile.peek(1):
                return True
        except (BlockingIOError, *_tls_errors("SSLWantReadError")):
            pass
        finally:
            self.request.settimeout(self.server.io_timeout_s)
        with selectors.DefaultSelector() as selector:  # select.select fails on fds past 1023
            selector.register(self.request, selectors.EVENT_READ)
            return bool(selector.select(timeout_s))

    def next_message(self, timeout_s: float | None = None, body_buffer=None):
        """Read the next request frame (None at EOF); the previous frame's memory is given back first.

        The body goes into ``body_buffer`` if it fits, else into a buffer
        lent by the server.  ``timeout_s`` bounds only the wait for the
        frame's first byte (an idle peer); the rest of the frame must then
        arrive at ``io_timeout_s`` per read, so a peer that sends half a
        frame and stalls is dropped within ``io_timeout_s``, not after the
        idle timeout.  Raises ServerBusy if the server has no memory for the
        frame within ``io_timeout_s``.
        """
        self._release_frame()
        if timeout_s is not None:
            self.request.settimeout(timeout_s)
            try:
                if not self.rfile.peek(1):
                    return None
            finally:
                self.request.settimeout(self.server.io_timeout_s)

        def lend(nbytes: int):
            if body_buffer is not None and len(body_buffer) >= nbytes:
                return body_buffer
            self._body_loan = self.server.body_buffers.lend(nbytes, self.server.io_timeout_s)
            return self._body_loan[0]

        return protocol.read_message(self.rfile, lend, admit=self._admit_header)

    def _admit_header(self, nbytes: int) -> None:
        """Wait for the server's header budget before reading a large header (see HEADER_BUDGET_BYTES)."""
        if nbytes <= FREE_HEADER_BYTES:
            return
        if not self.server.header_budget.take(nbytes, self.server.io_timeout_s):
            raise ServerBusy(f"server busy: no room to read a header of {nbytes} bytes, try again later")
        self._header_held = nbytes

    def _release_frame(self) -> None:
        """Give back the header budget and body buffer of the last frame read."""
        if self._header_held:
            self.server.header_budget.give(self._header_held)
            self._header_held = 0
        if self._body_loan is not None:
            loan, self._body_loan = self._body_loan, None
            self.server.body_buffers.give_back(*loan)

    def reply(self, msg: protocol.Message, flush: bool = True) -> None:
        protocol.write_message(self.wfile, msg, flush=flush)

    @property
    def can_sendfile(self) -> bool:
        """True if a body can go from a file straight to the peer (os.sendfile: no TLS layer to pass)."""
        return self._tls_socket is None and hasattr(os, "sendfile")

    def reply_from_file(self, msg: protocol.Message, fd: int, ranges: list, body_len: int) -> None:
        """Send ``msg`` whose body is the byte ``ranges`` (``(offset, length)``) of file ``fd``, with sendfile.

        The bytes go from the page cache to the socket without entering this
        process.  Only where ``can_sendfile``.  Once the header is out, a
        failure cannot become an ERROR frame: an OSError (the file shorter
        than the ranges, a disk error, the peer gone or too slow past
        ``io_timeout_s``) ends the connection (``handle``), and the peer sees
        a frame cut short.
        """
        self.wfile.write(protocol.encode_header(msg, body_bytes=body_len))
        self.wfile.flush()
        for offset, length in ranges:
            send_file_range(self.request, fd, offset, length, self.server.io_timeout_s)


def send_file_range(sock: socket.socket, fd: int, offset: int, length: int, timeout_s: float | None) -> None:
    """os.sendfile ``length`` bytes of ``fd`` from ``offset`` to ``sock`` (a socket with a timeout is
    non-blocking underneath: wait for room up to ``timeout_s`` at a time).

    Raises socket.timeout if the peer takes nothing for ``timeout_s``,
    OSError(EIO) if the file ends before ``length`` bytes.
    """
    selector = None  # made only once the socket is full: most replies fit its buffer at once
    try:
        while length > 0:
            try:
                sent = os.sendfile(sock.fileno(), fd, offset, length)
            except BlockingIOError:
                if selector is None:
                    selector = selectors.DefaultSelector()
                    selector.register(sock, selectors.EVENT_WRITE)
                if not selector.select(timeout_s):
                    raise socket.timeout("the peer took no data in time") from None
                continue
            if sent == 0:
                raise OSError(errno.EIO, f"file ends {length} bytes before the range sent")
            offset += sent
            length -= sent
    finally:
        if selector is not None:
            selector.close()


class ConnectionSlots:
    """Mixin for a threading socketserver: each connection is served in a thread of its own only if
    one of ``connection_slots`` (a BoundedSemaphore the subclass sets) is free; otherwise
    ``_refuse_connection`` closes it at once, so a flood costs neither threads nor memory."""

    connection_slots: threading.BoundedSemaphore

    def process_request(self, request, client_address):
        if not self.connection_slots.acquire(blocking=False):
            self._refuse_connection(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connection_slots.release()  # the thread never started
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

    def _refuse_connection(self, request, client_address) -> None:
        self.shutdown_request(request)


class Server(ConnectionSlots, socketserver.ThreadingTCPServer):
    """Threaded TCP server: one daemon thread per connection.

    ``server_id`` names this server in HELLO_OK; ``io_timeout_s`` bounds any
    single read or write inside a request; ``idle_timeout_s`` bounds the wait
    for the next request on an idle connection.  Request bodies come out of
    ``body_buffers``: at most ``body_budget_bytes`` of them at once, over all
    connections, in reusable buffers of ``body_buffer_bytes`` (0 = allocate
    per frame); large headers out of ``header_budget``
    (HEADER_BUDGET_BYTES).  So the memory a flood of connections can make
    the server hold is bounded whatever the frames they send.

    ``security`` (security.Security): the shared secret every peer must
    prove it knows, and the TLS context to serve with; default none.
    ``max_connections``: connections served at once; one more is closed as
    soon as it is accepted (with a best-effort ``ERROR UNAVAILABLE`` on plain
    TCP), so a flood costs neither threads nor memory beyond the limit.
    """

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    # socketserver's default backlog of 5 makes a burst of connections wait
    # seconds in SYN retries; connections over max_connections are refused
    # at accept, so a deep queue costs nothing and drains fast.
    request_queue_size = 128

    def __init__(self, address, handler_cls, server_id: str, io_timeout_s: float, idle_timeout_s: float,
                 body_buffer_bytes: int = 0, security: Security | None = None, max_connections: int = 256,
                 body_budget_bytes: int = protocol.MAX_BODY_BYTES):
        self.server_id = server_id
        self.body_buffers = BodyBuffers(body_budget_bytes, body_buffer_bytes)
        self.header_budget = MemoryBudget(HEADER_BUDGET_BYTES)
        self._log_times: dict[str, tuple[float, int]] = {}
        self.io_timeout_s = io_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.security = security or NO_SECURITY
        self.max_connections = max_connections
        self.connection_slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler_cls)

    @property
    def address_text(self) -> str:
        return format_address(self.server_address)

    def _refuse_connection(self, request, client_address) -> None:
        if self.security.server_context is None:
            try:
                request.setblocking(False)
                request.send(protocol.encode(protocol.error_message(protocol.Unavailable(
                    f"server busy: {self.max_connections} connections already open, try again later"))))
            except OSError:
                pass
        self.shutdown_request(request)
        self.log_limited("refused", "%s: refused, %d connection(s) already open (max_connections)",
                         format_address(client_address), self.max_connections)

    def log_limited(self, key: str, message: str, *args) -> None:
        """A warning logged once per _REFUSAL_LOG_INTERVAL_S per ``key``, with the count held back."""
        now = time.monotonic()
        last, held_back = self._log_times.get(key, (float("-inf"), 0))
        if now - last < _REFUSAL_LOG_INTERVAL_S:
            self._log_times[key] = (last, held_back + 1)
            return
        self._log_times[key] = (now, 0)
        suffix = f" ({held_back} more since the last such line)" if held_back else ""
        logger.warning(message + suffix, *args)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if is_peer_gone(exc):
            logger.info("%s: peer went away (%s)", format_address(client_address), _describe(exc))
            return
        logger.exception("unhandled error serving %s", format_address(client_address))


def is_peer_gone(exc: BaseException | None) -> bool:
    """True for the ways a connection ends when the peer closes, dies or resets it: routine, not a bug."""
    return isinstance(exc, (ConnectionError, protocol.ClosedMidFrame,
                            *_tls_errors("SSLEOFError", "SSLZeroReturnError")))


def _tls_errors(*names: str) -> tuple:
    """The ssl module's exception classes ``names``; none if ssl was never imported.

    ssl is imported (by security.py) only when TLS is configured, and
    without it none of its exceptions can exist: so a client without TLS
    does not pay ~5 ms of start-up to import it.
    """
    ssl = sys.modules.get("ssl")
    return () if ssl is None else tuple(getattr(ssl, name) for name in names)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def serve_until_stopped(server: Server, on_stop) -> None:
    """The tail of every server's main(): announce, serve, stop cleanly.

    Prints the one ``listening on HOST:PORT`` line scripts and tests wait
    for, serves until SIGTERM or Ctrl-C, then closes the listening socket
    and calls ``on_stop()``.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"listening on {server.address_text}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        on_stop()
