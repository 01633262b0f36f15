"""Shared fixtures: real clusters of processes on 127.0.0.1, and CLI runners.

Every process a test starts belongs to a ``LocalCluster`` whose ``stop()``
runs in the fixture's finalizer, so it is killed by PID even when the test
fails.  Waits poll a condition with a deadline (``wait_until``).  Masters,
nodes and CLI runs are forked from one pre-imported interpreter
(``forkserver.py``: ~15 ms of CPU each instead of 150-350 ms);
``BACKUP_TEST_SPAWN=exec`` starts each from a fresh one instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cluster as cluster_module  # noqa: E402
import forkserver  # noqa: E402
import client as client_module  # noqa: E402
from metadata_log import MetadataLog  # noqa: E402
from namespace import Namespace, make_entry  # noqa: E402

# Short intervals so failures are noticed in a test's lifetime.
IO_TIMEOUT_S = 3.0
FAST_TIMING = ["--heartbeat-interval", "0.2", "--io-timeout", "3"]
FAST_MASTER = ["--heartbeat-interval", "0.2", "--dead-after", "1", "--io-timeout", "3"]


@pytest.fixture
def master(tmp_path):
    """A master in this process (no nodes, no network), three versions kept, no safe mode: for tests that
    drive its methods and log directly."""
    import config as config_module  # noqa: PLC0415
    from master import Master  # noqa: PLC0415

    m = Master(config_module.load_config(None, keep_versions=3, safe_mode_s=0), str(tmp_path / "master"))
    yield m
    m.log.close()


def wait_until(condition, timeout_s: float = 15.0, interval_s: float = 0.05, message: str = "condition"):
    """Poll ``condition()`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the condition may fail while things start up
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message} (last error: {last_error!r})")


def serve_in_thread(server, name: str = "in-process-server"):
    """Run a socketserver ``server`` on a daemon thread; returns ``stop()`` (shutdown, close, join).

    It polls for shutdown every 0.05 s: at socketserver's default 0.5 s every
    fixture's teardown would wait half a second.
    """
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


def random_bytes(seed: int, size: int) -> bytes:
    """``size`` reproducible random bytes (the seed goes in assertion messages)."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_local(tmp_path, label: str, data: bytes) -> str:
    """Write ``data`` to a local file under ``tmp_path``; its path."""
    path = tmp_path / f"local-{label}"
    path.write_bytes(data)
    return str(path)


def upload_bytes(cluster, name: str, data: bytes, tmp_path, mode: str = "replace"):
    """Store ``data`` as ``name`` through an in-process client (quicker than the CLI); the Uploaded reply."""
    path = tmp_path / f"up-{hashlib.sha256(data).hexdigest()[:16]}"
    path.write_bytes(data)
    c = cluster.client()
    try:
        return c.upload_file(str(path), name, mode=mode)
    finally:
        c.close()
        path.unlink()


def call(cluster, fn):
    """``fn(client)`` with an in-process client of ``cluster``, closed afterwards."""
    c = cluster.client()
    try:
        return fn(c)
    finally:
        c.close()


def download_bytes(cluster, name: str, tmp_path) -> bytes:
    """The bytes of ``name`` as an in-process client downloads them."""
    path = tmp_path / "download.tmp"
    c = cluster.client()
    try:
        c.download(name, str(path), force=True)
    finally:
        c.close()
    data = path.read_bytes()
    path.unlink()
    return data


def master_address(cluster) -> tuple[str, int]:
    host, _, port = cluster.master_address.rpartition(":")
    return host, int(port)


def node_total(cluster, field: str) -> int:
    """A NODE_STAT_REPLY ``field`` summed over all nodes right now, asked of each node (no heartbeat lag)."""
    import protocol  # noqa: PLC0415 - conftest imports only what every test needs at load
    import transport  # noqa: PLC0415
    total = 0
    for node in cluster.nodes:
        host, _, port = node.address.rpartition(":")
        with transport.Connection((host, int(port)), "master", timeout_s=10.0) as conn:
            total += getattr(conn.request(protocol.NodeStat(), protocol.NodeStatReply), field)
    return total


def node_chunks(cluster) -> int:
    """Chunks held by all nodes right now."""
    return node_total(cluster, "chunks")


# Record header of chunk_store.py's segment files (see its module docstring).
_RECORD_HEAD = struct.Struct(">4sBBHQIIQI")
_KIND_CHUNKS = 1


def segment_records(path: str):
    """Yield (blob, first, count, payload_offset, payload_len) of each chunk record in a segment file.

    Parsed independently of chunk_store.py, so tests can corrupt bytes on disk
    at an exact place without trusting the code under test.
    """
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + _RECORD_HEAD.size <= len(data):
        magic, kind, id_len, flags, first, count, _, payload_len, _ = _RECORD_HEAD.unpack_from(data, offset)
        if magic != b"BKR1":
            return
        blob = data[offset + _RECORD_HEAD.size:offset + _RECORD_HEAD.size + id_len].decode("ascii")
        crc_len = 4 * count if kind == _KIND_CHUNKS else 0  # tombstones and drops carry no CRCs
        crc_len += 4 if flags & 1 else 0  # the payload CRC before the chunk CRCs
        payload_offset = offset + _RECORD_HEAD.size + id_len + crc_len
        if kind == _KIND_CHUNKS:
            yield blob, first, count, payload_offset, payload_len
        offset = payload_offset + payload_len


def flip_byte(path: str, offset: int) -> None:
    """Invert one byte of a file on disk, durably: rot that a read must catch."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def payload_locations(cluster, index: int, blob: str) -> list[tuple[str, int, int, int]]:
    """(segment path, first chunk, payload offset, payload length) of ``blob``'s records on node ``index``."""
    seg_dir = os.path.join(cluster.node_data_dir(index), "chunks", "segments")
    found = []
    for name in sorted(os.listdir(seg_dir)):
        path = os.path.join(seg_dir, name)
        found += [(path, first, off, length) for b, first, _, off, length in segment_records(path) if b == blob]
    return found


def seed_names(master_data_dir: str, names) -> None:
    """Store an empty file under each of ``names`` straight into a master's metadata (master not running).

    A seam for names an older master accepted and today's refuses at upload
    (``t/../x``, ``dir/``): restores must still cope with them.  Written
    through MetadataLog, as the master itself would; an empty file needs no
    chunks on any node.
    """
    log = MetadataLog(master_data_dir, Namespace())
    log.open()
    try:
        log.commit([{"op": "put", "name": name,
                     "file": make_entry(0, 1024, sha256(b""), uuid.uuid4().hex, [], 1024)} for name in names])
    finally:
        log.close()


def node_fence(cluster, index: int) -> dict:
    """The cluster id and highest epoch node ``index`` has recorded: what a raw request to it must carry."""
    with open(os.path.join(cluster.node_data_dir(index), "node.json"), encoding="utf-8") as f:
        saved = json.load(f)
    return {"cluster_id": saved.get("cluster_id", ""), "epoch": saved.get("epoch", 0)}


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr.decode("utf-8", "replace")

    def __repr__(self):
        return f"<exit {self.returncode} stderr={self.stderr!r}>"


class TestCluster(cluster_module.LocalCluster):
    """LocalCluster plus helpers for tests: run the CLI, wait for nodes."""

    __test__ = False  # not a test class for pytest
    # How long client() waits for a node's or master's handshake before it fails over (a test
    # with a frozen node waits it out once).
    handshake_timeout_s = IO_TIMEOUT_S

    def __init__(self, *args, http_port: str = "0", **kwargs):
        # No status page unless a test asks for one ("any"): the default port
        # 7780 is one for the whole machine, and tests run side by side.
        # Masters and nodes are forked from a pre-imported interpreter (forkserver.py).
        super().__init__(*args, http_port=http_port, spawn=forkserver.Popen, **kwargs)

    def cli(self, *args, stdin: bytes | None = None, timeout_s: float = 60.0, master: str | None = None) -> CliResult:
        argv = [sys.executable, os.path.join(ROOT, "client.py"), "--master", master or self.master_address,
                "--quiet", *args]
        proc = forkserver.run(argv, input=stdin, capture_output=True, timeout=timeout_s, cwd=self.data_dir)
        return CliResult(proc)

    def master_addresses(self) -> list[tuple[str, int]]:
        """Every master's (host, port): one for a single master, all of a replicated group."""
        return [(host, int(port)) for host, _, port in
                (address.rpartition(":") for address in self.master_address.split(","))]

    def client(self) -> client_module.Client:
        """A Client given every master, so it follows the leader of a group (master_link.py)."""
        addresses = self.master_addresses()
        return client_module.Client(addresses if len(addresses) > 1 else addresses[0], timeout_s=20.0,
                                    frame_bytes=1024 * 1024, show_progress=False,
                                    handshake_timeout_s=self.handshake_timeout_s)

    def status(self):
        c = self.client()
        try:
            return c.status()
        finally:
            c.close()

    def wait_nodes_alive(self, count: int, timeout_s: float = 15.0):
        return wait_until(lambda: self.status().totals["nodes_alive"] == count or None, timeout_s,
                          message=f"{count} live nodes")


@contextlib.contextmanager
def running_cluster(directory, nodes: int = 2, master_args=FAST_MASTER, node_args=FAST_TIMING, **kwargs):
    """A started TestCluster with every node alive, stopped on exit (for module-scoped fixtures)."""
    c = TestCluster(str(directory), nodes=nodes, master_args=master_args, node_args=node_args, **kwargs)
    try:
        c.start()
        c.wait_nodes_alive(nodes)
        yield c
    finally:
        c.stop()


class SecureCluster(TestCluster):
    """A TestCluster whose own client and CLI use ``client_args`` (secret file, TLS CA)."""

    __test__ = False

    def __init__(self, *args, client_args=(), client_security=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.client_args = list(client_args)
        self.client_security = client_security

    def cli(self, *args, **kwargs) -> CliResult:
        return super().cli(*self.client_args, *args, **kwargs)

    def client(self) -> client_module.Client:
        addresses = self.master_addresses()
        return client_module.Client(addresses if len(addresses) > 1 else addresses[0], timeout_s=20.0,
                                    frame_bytes=1024 * 1024, show_progress=False, security=self.client_security)


@pytest.fixture
def make_cluster(tmp_path):
    """Factory: ``make_cluster(nodes=3, master_args=..., node_args=..., unchecked_names=...)`` -> TestCluster.

    ``unchecked_names``: empty files stored before the master starts (``seed_names``).
    """
    started = []

    def factory(nodes: int = 3, master_args=FAST_MASTER, node_args=FAST_TIMING, unchecked_names=(),
                **kwargs) -> TestCluster:
        c = TestCluster(str(tmp_path / f"cluster{len(started)}"), nodes=nodes, master_args=master_args,
                        node_args=node_args, **kwargs)
        started.append(c)
        if unchecked_names:  # stored before the master starts, as by an older master
            seed_names(os.path.join(c.data_dir, "master"), unchecked_names)
        c.start()
        if nodes:
            c.wait_nodes_alive(nodes)
        return c

    yield factory
    for c in started:
        c.stop()


@pytest.fixture
def cluster(make_cluster) -> TestCluster:
    """A master and three nodes, all alive."""
    return make_cluster()
