"""Sockets for the protocol: one client-side ``Connection``, one server base.

Both sides speak ``protocol.py`` frames over TCP.  This module owns what the
sans-IO protocol leaves out: connecting, the HELLO handshake, timeouts,
turning socket failures into ``Unavailable``/``Timeout``, and the server
loop that reads a request, calls ``do_<OP>`` and turns exceptions into
``ERROR`` frames.  Servers (master, storage node) subclass ``RequestHandler``
and add ``do_<OP>`` methods; they never see a raw socket error.
"""

from __future__ import annotations

import logging
import socket
import socketserver

import protocol
from protocol import BackupError, RemoteProtocolError

logger = logging.getLogger(__name__)

# Socket buffering of the file objects: large enough that a header and a
# small body are one syscall, small enough not to matter per connection.
_STREAM_BUFFER_BYTES = 256 * 1024


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

    def __init__(self, address: tuple[str, int], role: str, timeout_s: float):
        self.address = address
        self.broken = False
        try:
            self.sock = socket.create_connection(address, timeout=timeout_s)
        except socket.timeout:
            raise protocol.Timeout(f"timed out connecting to {format_address(address)}") from None
        except OSError as exc:
            raise protocol.Unavailable(f"cannot reach {format_address(address)}: {exc.strerror or exc}") from None
        _tune(self.sock)
        self.rfile = self.sock.makefile("rb", buffering=_STREAM_BUFFER_BYTES)
        self.wfile = self.sock.makefile("wb", buffering=_STREAM_BUFFER_BYTES)
        try:
            reply = self.request(protocol.Hello(version=protocol.PROTOCOL_VERSION, role=role), protocol.HelloOk)
        except BaseException:
            self.close()
            raise
        self.peer_id = reply.server_id

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


class RequestHandler(socketserver.StreamRequestHandler):
    """One connection on a server: handshake, then request -> do_<OP> -> reply.

    Subclasses add ``do_<OP>(self, msg)`` methods that use ``self.reply`` and
    ``self.next_message``.  Bodies are read into one buffer per connection
    of the server's ``body_buffer_bytes``, reused frame after frame.  An
    exception of type ``BackupError`` becomes an ``ERROR`` frame; a
    ``RemoteProtocolError`` (a malformed frame) also closes the connection,
    because the stream can no longer be trusted to be in sync.
    """

    rbufsize = _STREAM_BUFFER_BYTES
    wbufsize = _STREAM_BUFFER_BYTES

    def setup(self):
        self.request.settimeout(self.server.io_timeout_s)
        _tune(self.request)
        super().setup()
        self.peer = format_address(self.client_address)
        size = self.server.body_buffer_bytes
        self.body_buffer = bytearray(size) if size else None
        self.role = None

    def handle(self):
        try:
            hello = self.next_message(self.server.idle_timeout_s)
            if hello is None:
                return
            if not isinstance(hello, protocol.Hello):
                raise RemoteProtocolError(f"expected HELLO, got {hello.OP}")
            if hello.version != protocol.PROTOCOL_VERSION:
                self.reply(protocol.error_message(protocol.VersionMismatch(
                    f"server speaks protocol {protocol.PROTOCOL_VERSION}, peer {hello.version}")))
                return
            self.role = hello.role
            self.reply(protocol.HelloOk(version=protocol.PROTOCOL_VERSION, server_id=self.server.server_id))
            while True:
                msg = self.next_message(self.server.idle_timeout_s)
                if msg is None:
                    return
                self.before_request(msg)
                method = getattr(self, "do_" + msg.OP, None)
                if method is None:
                    self.reply(protocol.error_message(protocol.UnknownOperation(f"{msg.OP} is not served here")))
                    continue
                try:
                    method(msg)
                except RemoteProtocolError:
                    raise
                except BackupError as exc:
                    logger.debug("%s: %s failed: %s", self.peer, msg.OP, exc)
                    self.reply(protocol.error_message(exc))
        except RemoteProtocolError as exc:
            logger.warning("%s: bad frame, closing: %s", self.peer, exc)
            try:
                self.reply(protocol.error_message(exc))
            except OSError:
                pass
        except (socket.timeout, TimeoutError):
            logger.info("%s: idle or stalled past the timeout, closing", self.peer)
        except (ConnectionError, OSError) as exc:
            logger.debug("%s: connection ended: %s", self.peer, exc)

    def before_request(self, msg: protocol.Message) -> None:
        """Hook run before each request is dispatched; subclasses may override."""

    def next_message(self, timeout_s: float | None = None, body_buffer=None):
        """Read the next request frame (None at EOF); body into the handler's buffer."""
        if timeout_s is not None:
            self.request.settimeout(timeout_s)
        try:
            return protocol.read_message(self.rfile, body_buffer if body_buffer is not None else self.body_buffer)
        finally:
            if timeout_s is not None:
                self.request.settimeout(self.server.io_timeout_s)

    def reply(self, msg: protocol.Message, flush: bool = True) -> None:
        protocol.write_message(self.wfile, msg, flush=flush)


class Server(socketserver.ThreadingTCPServer):
    """Threaded TCP server: one daemon thread per connection.

    ``server_id`` names this server in HELLO_OK; ``io_timeout_s`` bounds any
    single read or write inside a request; ``idle_timeout_s`` bounds the wait
    for the next request on an idle connection; ``body_buffer_bytes`` is the
    size of each connection's reusable body buffer (0 = allocate per frame).
    """

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address, handler_cls, server_id: str, io_timeout_s: float, idle_timeout_s: float,
                 body_buffer_bytes: int = 0):
        self.server_id = server_id
        self.body_buffer_bytes = body_buffer_bytes
        self.io_timeout_s = io_timeout_s
        self.idle_timeout_s = idle_timeout_s
        super().__init__(address, handler_cls)

    @property
    def address_text(self) -> str:
        return format_address(self.server_address)

    def handle_error(self, request, client_address):
        logger.exception("unhandled error serving %s", format_address(client_address))
