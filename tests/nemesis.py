"""A nemesis for a replicated group of real masters: per-link TCP proxies, pauses, kills.

Test support (not a test module).  Every Raft message between two masters
goes over a connection opened by the sender (replication._PeerSender), so
each ordered pair of masters (A sends to B) is one link.  ``Nemesis``
starts one ``LinkProxy`` per link on 127.0.0.1 and tells each master, with
``--raft-dial``, to reach its peers through them.  Cutting a link closes
its connections and holds new ones open without forwarding a byte (a
cable pulled: the sender sees a silent peer, not a refusal); healing it
forwards again.  A one-way partition cuts A->B and leaves B->A.  Nodes and
clients reach the masters directly: a cut isolates masters from masters.

Only loopback traffic; every socket and thread ends with ``stop()``.
"""

from __future__ import annotations

import random
import socket
import threading

BUFFER_BYTES = 65536


class LinkProxy:
    """One direction of one link: accepts on 127.0.0.1 (a free port), forwards to ``target``."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._cut = False
        self._stopped = False
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._held: set[socket.socket] = set()  # accepted while cut: never read, closed on heal
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    @property
    def cut_now(self) -> bool:
        return self._cut

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            for sock in pair:
                _close(sock)

    def heal(self) -> None:
        with self._lock:
            self._cut = False
            held, self._held = self._held, set()
        for sock in held:
            _close(sock)  # the sender sees them fail and opens new ones, which are forwarded

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        _close(self._listener)
        self.cut()
        self.heal()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._stopped:
                    _close(conn)
                    return
                if self._cut:
                    self._held.add(conn)
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
                upstream.settimeout(None)
            except OSError:
                _close(conn)  # the target is down (killed): the sender sees a closed connection
                continue
            pair = (conn, upstream)
            with self._lock:
                if self._cut or self._stopped:
                    _close(conn)
                    _close(upstream)
                    continue
                self._pairs.add(pair)
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        try:
            while True:
                data = src.recv(BUFFER_BYTES)
                if not data or self._cut:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._pairs.discard(pair)
        for sock in pair:
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class Nemesis:
    """A proxy on every link of a group of ``len(ports)`` masters listening on ``ports``."""

    def __init__(self, host: str, ports: list[int]):
        self.ids = [f"{host}:{port}" for port in ports]
        count = len(ports)
        self.links = {(a, b): LinkProxy((host, ports[b])) for a in range(count) for b in range(count) if a != b}

    def dial_args(self, index: int) -> list[str]:
        """``--raft-dial`` for master ``index``: each peer through the proxy of the link index -> peer."""
        via = ",".join(f"{self.ids[b]}=127.0.0.1:{proxy.port}" for (a, b), proxy in self.links.items() if a == index)
        return ["--raft-dial", via]

    def cut(self, a: int, b: int, both: bool = True) -> None:
        self.links[(a, b)].cut()
        if both:
            self.links[(b, a)].cut()

    def isolate(self, index: int) -> None:
        for (a, b), proxy in self.links.items():
            if index in (a, b):
                proxy.cut()

    def heal(self) -> None:
        for proxy in self.links.values():
            proxy.heal()

    def describe(self) -> str:
        cut = [f"{a + 1}->{b + 1}" for (a, b), proxy in sorted(self.links.items()) if proxy.cut_now]
        return "cut " + ", ".join(cut) if cut else "all links up"

    def stop(self) -> None:
        for proxy in self.links.values():
            proxy.stop()


def random_fault(rng: random.Random, leader: int, count: int) -> tuple[str, int, int]:
    """(kind, a, b) for the long run: what to do next, around the current ``leader``.

    ``kill-node``: b is the storage node to kill (index < ``count`` nodes too)."""
    others = [i for i in range(count) if i != leader]
    kind = rng.choice(["isolate", "partition", "one-way-from-leader", "one-way-to-leader", "pause", "kill",
                       "kill-node"])
    return kind, leader, rng.randrange(count) if kind == "kill-node" else rng.choice(others)
