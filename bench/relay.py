"""A bare relay: the floor of the backup system's architecture, for bench.py.

Three roles, each a process, doing the same durable work as the product on
the same path and nothing else:

    relay.py node   --port 0 --dir D        CRC32 per 1 KiB of each piece, append
                                            CRCs + piece to one file in D, fsync on FLUSH
    relay.py master --port 0 --nodes A,B    take a client's stream, forward every
                                            1 MiB piece as it is to both nodes, ack
                                            the file once both nodes fsynced it
    relay.py client FILE|DIR ... --master ADDR

client -> master, per file:  8-byte big-endian size, then the raw bytes;
                             the master answers b"K" once the file is durable.
master -> node, per piece:   b"P" + 4-byte big-endian length + the piece;
                             b"F" = fsync, answered b"K".

The least work this architecture allows: the master only forwards (its one
job that cannot move), and each node computes the per-chunk CRC32s of what
it stores (1 KiB chunks, as the product stores them, with the cheapest
stdlib loop: ``map`` over slices of one buffer) and writes them with the
piece in one ``writev``, as a product node could.  1 MiB pieces received
with ``recv_into`` into one reused buffer, ``sendall`` of a memoryview to
both nodes, one fsync per file on each node, one ack per file to the client
(so a directory of small files costs one round trip and two fsyncs per
file, like the product).  Left out on purpose, because that is what the
product adds: framing and headers, SHA-256, CRCs computed where the data is
cut (so they also cover the hop to the nodes), placement, metadata log and
its fsync, per-batch acks, GC, errors.  Not a server to run anywhere else:
no limits, no timeouts, no error replies; any problem closes the connection.

Each server prints ``listening on HOST:PORT`` once ready (like the product).
"""

from __future__ import annotations

import argparse
import array
import functools
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import zlib

EXIT_OK = 0
EXIT_FAILED = 1

PIECE_BYTES = 1 << 20  # the product's batch_bytes
CHUNK_BYTES = 1024  # the product's chunk_size_bytes
SIZE = struct.Struct(">Q")
PUT = struct.Struct(">cI")
FLUSH = PUT.pack(b"F", 0)
ACK = b"K"


def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False on a clean EOF before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("peer closed mid-message")
        got += n
    return True


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


# --- node ----------------------------------------------------------------------------
def chunk_crcs(piece: memoryview) -> bytes:
    """Big-endian CRC32 of each CHUNK_BYTES slice of ``piece`` (the product's wire form)."""
    crcs = array.array("I", map(zlib.crc32, map(piece.__getitem__, _slices(len(piece)))))
    if sys.byteorder == "little":
        crcs.byteswap()
    return crcs.tobytes()


@functools.lru_cache(maxsize=8)
def _slices(length: int) -> tuple[slice, ...]:
    return tuple(slice(i, i + CHUNK_BYTES) for i in range(0, length, CHUNK_BYTES))


class NodeHandler(socketserver.BaseRequestHandler):
    """One master connection: CRC and append every piece to one file, fsync on FLUSH."""

    def handle(self) -> None:
        sock = self.request
        _tune(sock)
        path = os.path.join(self.server.data_dir, f"relay-{threading.get_ident()}-{time.monotonic_ns()}.dat")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        head = bytearray(PUT.size)
        buffer = bytearray(PIECE_BYTES)
        view = memoryview(buffer)
        try:
            while recv_exactly(sock, memoryview(head)):
                kind, length = PUT.unpack(head)
                if kind == b"P":
                    piece = view[:length]
                    recv_exactly(sock, piece)
                    write_all(fd, [chunk_crcs(piece), piece])
                elif kind == b"F":
                    os.fsync(fd)
                    sock.sendall(ACK)
                else:
                    return
        except OSError:
            return
        finally:
            os.close(fd)


def write_all(fd: int, buffers: list) -> None:
    """``os.writev`` until every byte of ``buffers`` is written."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


# --- master --------------------------------------------------------------------------
class MasterHandler(socketserver.BaseRequestHandler):
    """One client connection: relay each file to both nodes, ack it once both fsynced."""

    def handle(self) -> None:
        client = self.request
        _tune(client)
        nodes = [socket.create_connection(address) for address in self.server.node_addresses]
        try:
            for node in nodes:
                _tune(node)
            self._relay(client, nodes)
        except OSError:
            return
        finally:
            for node in nodes:
                node.close()

    def _relay(self, client: socket.socket, nodes: list[socket.socket]) -> None:
        size_buf = bytearray(SIZE.size)
        buffer = bytearray(PUT.size + PIECE_BYTES)
        view = memoryview(buffer)
        ack = bytearray(1)
        while recv_exactly(client, memoryview(size_buf)):
            (remaining,) = SIZE.unpack(size_buf)
            while remaining:
                n = min(remaining, PIECE_BYTES)
                recv_exactly(client, view[PUT.size:PUT.size + n])
                remaining -= n
                PUT.pack_into(buffer, 0, b"P", n)
                frame = view[:PUT.size + n]
                for node in nodes:
                    node.sendall(frame)
            for node in nodes:
                node.sendall(FLUSH)
            for node in nodes:
                if not recv_exactly(node, memoryview(ack)) or ack != ACK:
                    raise ConnectionError("node did not confirm fsync")
            client.sendall(ACK)


# --- client --------------------------------------------------------------------------
def expand(paths: list[str]) -> list[str]:
    """Files named, and files under directories named (sorted, recursively)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files.extend(os.path.join(root, name) for name in sorted(names))
        else:
            files.append(path)
    return files


def send_files(master: tuple[str, int], files: list[str]) -> int:
    """Send ``files`` one by one, each acknowledged durable; returns bytes sent."""
    buffer = bytearray(PIECE_BYTES)
    view = memoryview(buffer)
    ack = bytearray(1)
    total = 0
    with socket.create_connection(master) as sock:
        _tune(sock)
        for path in files:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                sock.sendall(SIZE.pack(size))
                sent = 0
                while sent < size:
                    n = f.readinto(view[:min(PIECE_BYTES, size - sent)])
                    if not n:
                        raise OSError(f"{path} shrank while being sent")
                    sock.sendall(view[:n])
                    sent += n
            if not recv_exactly(sock, memoryview(ack)) or ack != ACK:
                raise ConnectionError("master did not confirm the file")
            total += size
    return total


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def serve(server: _Server) -> int:
    host, port = server.server_address[:2]
    print(f"listening on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Bare relay: the floor of the architecture (bench only).")
    roles = parser.add_subparsers(dest="role", required=True)
    node = roles.add_parser("node")
    node.add_argument("--host", default="127.0.0.1")
    node.add_argument("--port", type=int, default=0)
    node.add_argument("--dir", required=True)
    master = roles.add_parser("master")
    master.add_argument("--host", default="127.0.0.1")
    master.add_argument("--port", type=int, default=0)
    master.add_argument("--nodes", required=True, help="HOST:PORT,HOST:PORT")
    client = roles.add_parser("client")
    client.add_argument("paths", nargs="+", metavar="FILE")
    client.add_argument("--master", required=True)
    args = parser.parse_args(argv)

    if args.role == "node":
        os.makedirs(args.dir, exist_ok=True)
        server = _Server((args.host, args.port), NodeHandler)
        server.data_dir = args.dir
        return serve(server)
    if args.role == "master":
        server = _Server((args.host, args.port), MasterHandler)
        server.node_addresses = [parse_address(a) for a in args.nodes.split(",")]
        return serve(server)
    files = expand(args.paths)
    started = time.monotonic()
    try:
        total = send_files(parse_address(args.master), files)
    except OSError as exc:
        print(f"relay client: {exc}", file=sys.stderr)
        return EXIT_FAILED
    elapsed = time.monotonic() - started
    print(f"sent {len(files)} files, {total} bytes in {elapsed:.3f} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
