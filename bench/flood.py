"""Peak memory of a master and a node under connection floods.

``python bench/flood.py [--connections 3000] [--modes request,header,body]
[--hold 2] [--json FILE]`` starts a master and one storage node on 127.0.0.1
(fresh temp dir, free ports), then floods each server with ``--connections``
TCP connections from this process, once per mode.  Every connection
completes the HELLO handshake if the server takes it (those over
``max_connections`` are refused by the server), then sends one frame:

* ``request``: a small request (``STATUS`` to the master, ``NODE_STAT`` to
  the node), and stays open;
* ``header``: a frame whose header is ~120 KiB of JSON junk (``[],[],...``,
  which parses to ~20 times its size in Python objects), and stays open if
  the server lets it;
* ``body``: a frame with a 1 MiB body (a top-level ``DATA`` to the master, a
  ``PUT_CHUNKS`` with wrong CRCs to the node, so nothing is stored).

After ``--hold`` seconds the mode's connections are closed and the peak
resident memory of each server so far (``VmHWM`` from ``/proc/PID/status``)
is printed.  Targets (issue 9): master <= 100 MiB, node <= 64 MiB.  Exit
status 1 if a target is missed or a server died.  Linux only (reads /proc).
Bounded: at most ``--connections`` sockets per server and mode, each step
under ``--timeout`` seconds, and the cluster is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cluster as cluster_module  # noqa: E402
import protocol  # noqa: E402

TARGET_MIB = {"master": 100, "node": 64}
MODES = ("request", "header", "body")
# Threads opening connections: enough to open thousands in a second or two.
_OPENERS = 16
_JUNK_ITEMS = 40_000  # '[],' each: a header of ~120 KiB, twice a page
_BODY_BYTES = 1024 * 1024


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of a process, in KiB (VmHWM)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def read_frame(sock: socket.socket, decoder: protocol.FrameDecoder):
    """The next message from ``sock``, or None if the server closed it."""
    while True:
        msg = decoder.next_message()
        if msg is not protocol.NEED_DATA:
            return msg
        data = sock.recv(65536)
        if not data:
            return None
        decoder.feed(data)


def raw_frame(header: dict, body: bytes = b"") -> bytes:
    data = json.dumps(header, separators=(",", ":")).encode()
    return len(data).to_bytes(4, "big") + data + body


def flood_frame(server: str, mode: str, serial: int) -> bytes:
    """The one frame a connection of ``mode`` sends to ``server`` after HELLO."""
    if mode == "request":
        return protocol.encode(protocol.Status() if server == "master" else protocol.NodeStat())
    if mode == "header":
        junk = b",".join([b"[]"] * _JUNK_ITEMS)
        data = b'{"op":"LIST","prefix":"","junk":[' + junk + b"]}"
        return len(data).to_bytes(4, "big") + data
    if server == "master":
        return raw_frame({"op": "DATA", "body": _BODY_BYTES}, b"x" * _BODY_BYTES)
    count = _BODY_BYTES // 1024
    body = b"\0" * (4 * count) + b"x" * _BODY_BYTES  # CRCs that do not match: refused, never stored
    return raw_frame({"op": "PUT_CHUNKS", "blob": f"flood{serial}", "first": 0, "count": count,
                      "chunk_size": 1024, "body": len(body)}, body)


def open_one(address: tuple[str, int], frame: bytes, timeout_s: float):
    """Connect, HELLO, send ``frame``, read one reply: (socket kept open or None, outcome)."""
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except OSError:
        return None, "failed"
    try:
        decoder = protocol.FrameDecoder()
        sock.sendall(protocol.encode(protocol.Hello(version=protocol.PROTOCOL_VERSION, role="client")))
        if not isinstance(read_frame(sock, decoder), protocol.HelloOk):
            sock.close()
            return None, "refused"
        sock.sendall(frame)
        reply = read_frame(sock, decoder)
        if reply is None:
            sock.close()
            return None, "closed"
        return sock, "answered"
    except OSError:
        sock.close()
        return None, "failed"


def flood(address: tuple[str, int], server: str, mode: str, connections: int, timeout_s: float):
    """Open ``connections`` connections with ``_OPENERS`` threads: (open sockets, outcome counts)."""
    sockets: list = []
    counts = {"answered": 0, "closed": 0, "refused": 0, "failed": 0}
    lock = threading.Lock()
    frames = {"master": None, "node": None}
    frames[server] = flood_frame(server, mode, 0) if mode != "body" or server == "master" else None

    def opener(first: int, count: int) -> None:
        for serial in range(first, first + count):
            frame = frames[server] or flood_frame(server, mode, serial)
            sock, outcome = open_one(address, frame, timeout_s)
            with lock:
                counts[outcome] += 1
                if sock is not None:
                    sockets.append(sock)

    share = -(-connections // _OPENERS)
    threads = [threading.Thread(target=opener, args=(i * share, max(0, min(share, connections - i * share))),
                                daemon=True) for i in range(_OPENERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sockets, counts


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000, help="connections per server and mode (default 3000)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default all)")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds to keep a mode's connections open (default 2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per connect or reply (default 10)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to FILE as JSON")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}")
    report = {"connections": args.connections, "hold_s": args.hold, "runs": []}
    ok = True
    with tempfile.TemporaryDirectory(prefix="flood-") as work:
        cluster = cluster_module.LocalCluster(work, nodes=1)
        cluster.start()
        try:
            servers = {"master": cluster.master, "node": cluster.nodes[0]}
            time.sleep(1.0)  # let both settle (registration, first heartbeats)
            peaks = {label: vm_hwm_kib(s.pid) for label, s in servers.items()}
            print(f"idle: master VmHWM {peaks['master'] / 1024:.1f} MiB, node {peaks['node'] / 1024:.1f} MiB")
            report["idle_kib"] = dict(peaks)
            for mode in modes:
                for label, server in servers.items():
                    started = time.monotonic()
                    sockets, counts = flood(parse_address(server.address), label, mode, args.connections,
                                            args.timeout)
                    opened_s = time.monotonic() - started
                    time.sleep(args.hold)
                    for sock in sockets:
                        sock.close()
                    alive = server.running()
                    peak = vm_hwm_kib(server.pid) if alive else None
                    met = peak is not None and peak <= TARGET_MIB[label] * 1024
                    ok &= met
                    report["runs"].append({"mode": mode, "server": label, "vm_hwm_kib": peak, "met": met,
                                           "open_s": round(opened_s, 2), **counts})
                    peak_text = "DIED" if peak is None else f"{peak / 1024:.1f} MiB"
                    print(f"{mode:<8} {label:<6} VmHWM {peak_text:>10} (target {TARGET_MIB[label]} MiB: "
                          f"{'met' if met else 'MISSED'}); {counts['answered']} answered, {counts['closed']} "
                          f"closed after their frame, {counts['refused']} refused, {counts['failed']} failed, "
                          f"in {opened_s:.1f} s", flush=True)
                    if not alive:
                        return 1
        finally:
            cluster.stop()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
