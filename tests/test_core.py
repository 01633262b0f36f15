"""Integration tests of the core behaviours: real processes on 127.0.0.1.

Every cluster comes from the ``cluster`` / ``make_cluster`` fixtures, whose
finalizers kill each process by PID.  The one in-process server (a fake
master) is shut down in its own finalizer.  Random data is seeded and the
seed is named in the assertion messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import threading
import time

import pytest

import forkserver
from conftest import (ROOT, CliResult, master_address, random_bytes, running_cluster, serve_in_thread, sha256,
                      flip_byte, payload_locations, wait_until, write_local)

import client as client_module
import protocol
import transport
from chunk_store import ChunkStore

KIB = 1024
MIB = 1024 * 1024
CHUNK_BYTES = 1024  # chunk_size_bytes in config.ini
BATCH_BYTES = MIB  # batch_bytes in config.ini


# --- helpers --------------------------------------------------------------------------------


def node_address(cluster, index: int) -> tuple[str, int]:
    host, _, port = cluster.nodes[index].address.rpartition(":")
    return host, int(port)


def node_id(cluster, index: int) -> str:
    with open(os.path.join(cluster.node_data_dir(index), "node.json"), encoding="utf-8") as f:
        return json.load(f)["node_id"]


def upload(cluster, name: str, data: bytes, tmp_path) -> protocol.Uploaded:
    """Store ``data`` as ``name`` through an in-process Client; returns UPLOADED."""
    path = write_local(tmp_path, sha256(data)[:16], data)
    c = cluster.client()
    try:
        return c.upload_file(path, name)
    finally:
        c.close()


def download(cluster, name: str, tmp_path, label: str = "dl") -> bytes:
    """The bytes of ``name`` as an in-process Client downloads them to a file."""
    destination = tmp_path / f"download-{label}"
    c = cluster.client()
    try:
        c.download(name, str(destination))
    finally:
        c.close()
    data = destination.read_bytes()
    destination.unlink()
    return data


def listing(cluster) -> dict[str, dict]:
    c = cluster.client()
    try:
        return {entry["name"]: entry for entry in c.list()}
    finally:
        c.close()


def raw_connection(address: tuple[str, int], role: str = "client") -> transport.Connection:
    return transport.Connection(address, role, timeout_s=20.0)


def send_data(conn: transport.Connection, data: bytes, frame_bytes: int = 256 * KIB) -> None:
    for start in range(0, len(data), frame_bytes):
        conn.send(protocol.Data(body=data[start:start + frame_bytes]), flush=False)
    conn.flush()


def node_inventories(cluster, tmp_path) -> dict[str, dict]:
    """node id -> ChunkStore.inventory() of a copy of that node's chunk dir."""
    inventories = {}
    for index in range(len(cluster.nodes)):
        copy = tmp_path / f"chunks-copy-{index}"
        shutil.copytree(os.path.join(cluster.node_data_dir(index), "chunks"), copy)
        store = ChunkStore(str(copy))
        try:
            inventories[node_id(cluster, index)] = store.inventory()
        finally:
            store.close()
        shutil.rmtree(copy)
    return inventories


def holders_per_chunk(inventories: dict, blob: str, chunks: int) -> list[set[str]]:
    """For each chunk index of ``blob``, the set of node ids holding it."""
    holders = [set() for _ in range(chunks)]
    for nid, inventory in inventories.items():
        for first, count in inventory.get(blob, []):
            for index in range(first, min(first + count, chunks)):
                holders[index].add(nid)
    return holders


def free_port() -> int:
    """A loopback port nobody listens on (bound, read, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exchange_raw(address: tuple[str, int], payload: bytes, timeout_s: float = 10.0) -> list:
    """Send raw bytes, half-close, and return the frames received until the server closes."""
    with socket.create_connection(address, timeout=timeout_s) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    decoder = protocol.FrameDecoder()
    decoder.feed(bytes(received))
    frames = []
    while True:
        msg = decoder.next_message()
        if msg is protocol.NEED_DATA:
            assert decoder.buffered == 0, f"server sent a partial frame: {bytes(received)!r}"
            return frames
        frames.append(msg)


def assert_master_serves(cluster, tmp_path) -> None:
    assert cluster.status().totals["nodes_alive"] == len(cluster.nodes)
    data = b"still serving"
    upload(cluster, "after-malformed", data, tmp_path)
    assert download(cluster, "after-malformed", tmp_path) == data


def assert_node_serves(cluster, index: int) -> None:
    with raw_connection(node_address(cluster, index), role="master") as conn:
        reply = conn.request(protocol.NodeStat(), protocol.NodeStatReply)
    assert reply.node_id == node_id(cluster, index)


def run_cli(*args, master: str, cwd) -> CliResult:
    """The client CLI against ``master`` when there is no TestCluster to run it."""
    argv = [sys.executable, os.path.join(ROOT, "client.py"), "--master", master, "--quiet", *args]
    return CliResult(forkserver.run(argv, capture_output=True, timeout=60, cwd=cwd))


# A client HELLO frame, for raw sockets.
HELLO = protocol.encode(protocol.Hello(version=protocol.PROTOCOL_VERSION, role="client"))


def frame(header: dict) -> bytes:
    """A frame with this JSON header and no body (fields unchecked: for malformed ones too)."""
    data = json.dumps(header).encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def wait_chunks_back_to(cluster, chunks: int, timeout_s: float = 15.0) -> None:
    """Wait until the nodes report ``chunks`` in total: garbage has been collected."""
    wait_until(lambda: cluster.status().totals["chunks"] == chunks, timeout_s,
               message=f"nodes back to {chunks} chunks (garbage collected)")


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


# --- clusters shared by several tests ---------------------------------------------------------
# A cluster start costs about a second; most tests here neither stop a process
# nor count chunks cluster-wide, so they share one.  Each uses names of its own
# and looks only at those.  Tests that kill and restart processes share another,
# made whole again before each of them.  Tests that count every chunk of the
# cluster, or need other flags, start their own through ``cluster``/``make_cluster``.

@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """A master and three nodes shared by the tests that change no process and count no global totals."""
    with running_cluster(tmp_path_factory.mktemp("core-shared"), nodes=3) as c:
        yield c


@pytest.fixture(scope="module")
def restart_cluster_of_module(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("core-restarts"), nodes=3) as c:
        yield c


def healed(cluster) -> bool:
    t = cluster.status().totals
    return (t["nodes_alive"] == len(cluster.nodes) and not t["safe_mode"] and not t["under_replicated_chunks"]
            and not t["repairs_pending"])


@pytest.fixture
def restart_cluster(restart_cluster_of_module):
    """A master and three nodes shared by the tests that kill and restart processes (each uses names of its own).

    Before each test, whatever the previous one left down is started again,
    and the test begins once every node is alive, nothing awaits repair and
    an upload is placed, as on a fresh cluster.  (A node that failed a request
    of the previous test takes no new chunks for dead_after_s, which STATUS
    does not show: the probe upload waits that out.)
    """
    c = restart_cluster_of_module
    if not c.master.running():
        c.start_master()
    for index, node in enumerate(c.nodes):
        if not node.running():
            c.add_node(index)
    wait_until(lambda: healed(c), message="every node alive and nothing to repair")

    probe = os.path.join(c.data_dir, "restart-probe")
    with open(probe, "wb") as f:
        f.write(b"one chunk")

    def probe_placed() -> bool:
        client = c.client()
        try:
            client.upload_file(probe, "restart-probe")
            return True
        finally:
            client.close()

    wait_until(probe_placed, message="an upload placed")
    return c


# --- 1. round trips -----------------------------------------------------------------------
ROUND_TRIP_SIZES = [0, 1, 1023, 1024, 1025, 3 * 1024, MIB + 7, 3 * MIB + 12345]


# The CLI (a process start each) for the empty file and the largest one; the
# client library the CLI calls for every size, to a file and to stdout.
CLI_ROUND_TRIP_SIZES = {0, 3 * MIB + 12345}


def test_round_trip_of_edge_sizes_via_cli(shared_cluster, tmp_path, capsysbinary):
    """Files of chunk- and batch-boundary sizes come back byte-identical to a file and to stdout."""
    seed = 1001
    c = shared_cluster.client()
    try:
        for size in ROUND_TRIP_SIZES:
            data = random_bytes(seed + size, size)
            local = write_local(tmp_path, f"rt-{size}", data)
            name = f"rt/{size}.bin"
            out = tmp_path / f"out-{size}"
            if size in CLI_ROUND_TRIP_SIZES:
                up = shared_cluster.cli("upload", local, name)
                assert up.returncode == 0, f"size {size} (seed {seed + size}): {up}"
                down = shared_cluster.cli("download", name, str(out))
                assert down.returncode == 0, f"size {size} (seed {seed + size}): {down}"
                to_stdout = shared_cluster.cli("download", name, "-")
                assert to_stdout.returncode == 0, f"size {size} (seed {seed + size}): {to_stdout}"
                printed = to_stdout.stdout
            else:
                c.upload_file(local, name)
                c.download(name, str(out))
                capsysbinary.readouterr()
                c.download(name, "-")
                printed = capsysbinary.readouterr().out
            assert out.read_bytes() == data, f"size {size} (seed {seed + size}): file differs"
            assert printed == data, f"size {size} (seed {seed + size}): stdout differs"
    finally:
        c.close()
    sizes = {name: entry["size"] for name, entry in listing(shared_cluster).items() if name.startswith("rt/")}
    assert sizes == {f"rt/{size}.bin": size for size in ROUND_TRIP_SIZES}


# --- 2. names ---------------------------------------------------------------------------------
def test_names_with_spaces_slashes_and_non_ascii_round_trip(shared_cluster, tmp_path):
    """Names are keys: spaces, slashes, dots and non-ASCII letters store and list as given."""
    names = ["dir/sub/ünï côdé.txt", "with  two spaces", "dots.in/.hidden..name", "日本語/ファイル.dat"]
    names_before = list(listing(shared_cluster))
    for n, name in enumerate(names):
        data = f"content of {name}".encode("utf-8") * (n + 1)
        local = write_local(tmp_path, f"name-{n}", data)
        assert shared_cluster.cli("upload", local, name).returncode == 0, name
        out = tmp_path / f"name-out-{n}"
        result = shared_cluster.cli("download", name, str(out))
        assert result.returncode == 0, f"{name!r}: {result}"
        assert out.read_bytes() == data, name
    listed = shared_cluster.cli("list")
    assert listed.returncode == 0, listed
    line_format = re.compile(r"^\s*\d+\s+\d+  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  (.*)$")
    listed_names = [line_format.match(line).group(1) for line in listed.stdout.decode("utf-8").splitlines()]
    # The cluster is shared: the names other tests stored before this one are listed too.
    assert sorted(listed_names) == sorted([*names_before, *names])


INVALID_NAMES = {
    "empty": "",
    "1025 ASCII bytes": "a" * 1025,
    "1026 UTF-8 bytes in 513 letters": "é" * 513,
    "control character \\x01": "bad\x01name",
}


def test_invalid_names_exit_invalid_name_with_one_stderr_line(shared_cluster, tmp_path):
    """Upload and download with an invalid name exit EXIT_INVALID_NAME with one stderr line."""
    local = write_local(tmp_path, "valid", b"some data")
    failures = []
    for label, name in INVALID_NAMES.items():
        for args in (("upload", local, name), ("download", name, str(tmp_path / "never"))):
            result = shared_cluster.cli(*args)
            if result.returncode != client_module.EXIT_INVALID_NAME or not one_line(result.stderr):
                failures.append(f"{args[0]} with {label} name: {result}")
    assert_master_serves(shared_cluster, tmp_path)
    assert not (tmp_path / "never").exists()
    assert not failures, "\n".join(failures)


def test_master_refuses_invalid_names_from_a_raw_client(shared_cluster, tmp_path):
    """The master itself answers INVALID_NAME to an upload under a bad name and keeps the connection."""
    before = listing(shared_cluster)
    with raw_connection(master_address(shared_cluster)) as conn:
        for label, name in INVALID_NAMES.items():
            conn.send(protocol.UploadBegin(name=name, size=3))
            conn.send(protocol.Data(body=b"abc"))
            conn.send(protocol.UploadEnd(sha256=sha256(b"abc")))
            with pytest.raises(protocol.InvalidName):
                conn.expect(protocol.Uploaded)
        conn.request(protocol.List(), protocol.ListPage)  # the connection is still usable
    assert listing(shared_cluster).keys() == before.keys(), "an invalid name was stored"
    assert_master_serves(shared_cluster, tmp_path)


# --- 3. placement ---------------------------------------------------------------------------
def test_every_chunk_is_on_exactly_two_distinct_nodes(shared_cluster, tmp_path):
    """After uploads, each chunk of each committed blob is held by exactly two nodes."""
    seed = 3003
    sizes = [1, 1025, 300 * KIB + 3, 2 * MIB + 100]
    uploaded = [upload(shared_cluster, f"placed-{size}", random_bytes(seed + size, size), tmp_path) for size in sizes]
    inventories = node_inventories(shared_cluster, tmp_path)
    for reply in uploaded:
        holders = holders_per_chunk(inventories, reply.version, reply.chunks)
        bad = [(index, sorted(h)) for index, h in enumerate(holders) if len(h) != 2]
        assert not bad, f"{reply.name} (seed {seed}): chunks not on exactly 2 nodes: {bad[:5]}"


def test_multi_batch_file_spreads_over_all_three_nodes(shared_cluster, tmp_path):
    """A file of several batches puts chunks on every one of three nodes."""
    seed = 3100
    reply = upload(shared_cluster, "spread", random_bytes(seed, 4 * BATCH_BYTES + 5), tmp_path)
    inventories = node_inventories(shared_cluster, tmp_path)
    held = {nid: sum(count for _, count in inventory.get(reply.version, [])) for nid, inventory in inventories.items()}
    assert len(held) == 3 and all(held.values()), f"chunks per node {held} (seed {seed})"
    assert sum(held.values()) == 2 * reply.chunks, f"chunks per node {held} (seed {seed})"


# --- 4. node loss ----------------------------------------------------------------------------
def test_reads_fail_over_when_any_one_node_is_killed(restart_cluster, tmp_path):
    """With any single node killed by SIGKILL, every file still downloads identically."""
    seed = 4004
    files = {f"f{n}": random_bytes(seed + n, size) for n, size in enumerate([5, 70 * KIB, 2 * MIB + 1])}
    for name, data in files.items():
        upload(restart_cluster, name, data, tmp_path)
    for index in range(len(restart_cluster.nodes)):
        restart_cluster.nodes[index].kill()
        for name, data in files.items():
            assert download(restart_cluster, name, tmp_path) == data, f"{name} with node{index} dead (seed {seed})"
        new_address = restart_cluster.add_node(index).address
        wait_until(lambda: any(n["address"] == new_address and n["alive"] for n in restart_cluster.status().nodes),
                   message=f"node{index} re-registered at {new_address}")


# --- 5. master restart ------------------------------------------------------------------------
def test_list_right_after_master_kill_shows_acknowledged_uploads(restart_cluster, tmp_path):
    """Right after a SIGKILL and restart of the master, list shows every acknowledged upload."""
    sizes = {f"ack/{n}": n * 1000 for n in range(6)}
    for name, size in sizes.items():
        upload(restart_cluster, name, b"x" * size, tmp_path)
    restart_cluster.restart_master()
    assert {name: e["size"] for name, e in listing(restart_cluster).items() if name.startswith("ack/")} == sizes


def test_downloads_work_after_master_kill(restart_cluster, tmp_path):
    """After a SIGKILL and restart of the master, every file downloads identically."""
    seed = 5005
    files = {f"m{n}": random_bytes(seed + n, size) for n, size in enumerate([0, 4000, MIB + 3])}
    for name, data in files.items():
        upload(restart_cluster, name, data, tmp_path)
    restart_cluster.restart_master()
    for name, data in files.items():
        assert download(restart_cluster, name, tmp_path) == data, f"{name} (seed {seed})"
    restart_cluster.wait_nodes_alive(3)
    for name, data in files.items():
        assert download(restart_cluster, name, tmp_path) == data, f"{name} after re-registration (seed {seed})"


# --- 6. node restart ------------------------------------------------------------------------
def test_restarted_nodes_keep_their_ids(restart_cluster):
    """A restarted node re-registers under the id it had, at its new address."""
    before = sorted(n["id"] for n in restart_cluster.status().nodes)
    for index in range(len(restart_cluster.nodes)):
        restart_cluster.restart_node(index)
    addresses = {node.address for node in restart_cluster.nodes}
    wait_until(lambda: {n["address"] for n in restart_cluster.status().nodes if n["alive"]} == addresses,
               message=f"nodes re-registered at {addresses}")
    assert sorted(n["id"] for n in restart_cluster.status().nodes) == before
    assert sorted(node_id(restart_cluster, i) for i in range(len(restart_cluster.nodes))) == before


def test_files_download_after_all_nodes_restarted(restart_cluster, tmp_path):
    """Chunks survive a SIGKILL and restart of every node."""
    seed = 6006
    files = {f"n{n}": random_bytes(seed + n, size) for n, size in enumerate([1, 5000, 2 * MIB + 9])}
    for name, data in files.items():
        upload(restart_cluster, name, data, tmp_path)
    for index in range(len(restart_cluster.nodes)):
        restart_cluster.restart_node(index)
    addresses = {node.address for node in restart_cluster.nodes}
    wait_until(lambda: {n["address"] for n in restart_cluster.status().nodes if n["alive"]} == addresses,
               message=f"nodes re-registered at {addresses}")
    for name, data in files.items():
        assert download(restart_cluster, name, tmp_path) == data, f"{name} (seed {seed})"


# --- 7. replace -----------------------------------------------------------------------------
def test_replacing_a_name_serves_the_new_version(shared_cluster, tmp_path):
    """Uploading B under A's name makes downloads return B and list one entry of B's size."""
    seed = 7007
    a, b = random_bytes(seed, 3 * KIB), random_bytes(seed + 1, 5 * KIB + 1)
    assert shared_cluster.cli("upload", write_local(tmp_path, "a", a), "x").returncode == 0
    assert shared_cluster.cli("upload", write_local(tmp_path, "b", b), "x").returncode == 0
    assert download(shared_cluster, "x", tmp_path) == b, f"seed {seed}"
    c = shared_cluster.client()
    try:
        entries = [entry for entry in c.list() if entry["name"] == "x"]
    finally:
        c.close()
    assert [entry["size"] for entry in entries] == [len(b)], entries


# --- 8./9. concurrency ------------------------------------------------------------------------
def test_concurrent_writers_and_readers_of_one_name_see_whole_versions(shared_cluster, tmp_path):
    """Concurrent writers of one name all succeed and readers only ever see a complete version."""
    seed = 8008
    size = 2 * BATCH_BYTES + 300 * KIB  # three batches: a read spans three GET_CHUNKS
    versions = [random_bytes(seed + n, size) for n in range(5)]
    known = {sha256(v): n for n, v in enumerate(versions)}
    upload(shared_cluster, "shared", versions[0], tmp_path)
    writers_done = threading.Event()
    errors: list[str] = []
    seen: list[int] = []

    def write(n):
        try:
            upload(shared_cluster, "shared", versions[n], tmp_path)
        except Exception as exc:
            errors.append(f"writer {n}: {exc!r}")

    def read(r):
        c = shared_cluster.client()
        destination = tmp_path / f"reader-{r}"
        try:
            while not writers_done.is_set() or len(seen) < 2:
                c.download("shared", str(destination))
                digest = sha256(destination.read_bytes())
                destination.unlink()
                if digest not in known:
                    errors.append(f"reader {r}: saw a mix (sha256 {digest})")
                    return
                seen.append(known[digest])
        except Exception as exc:
            errors.append(f"reader {r}: {exc!r}")
        finally:
            c.close()

    readers = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    writers = [threading.Thread(target=write, args=(n,)) for n in range(1, len(versions))]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(60)
    writers_done.set()
    for t in readers:
        t.join(60)
    assert not errors, f"seed {seed}: " + "; ".join(errors)
    final = download(shared_cluster, "shared", tmp_path)
    assert sha256(final) in {sha256(v) for v in versions[1:]}, f"final content is no writer's (seed {seed})"
    assert seen, "readers downloaded nothing"


class SlowReader:
    """A client connection with a tiny receive buffer, so the master blocks mid-download."""

    def __init__(self, address: tuple[str, int]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
        self.sock.settimeout(20.0)
        self.sock.connect(address)
        self.rfile = self.sock.makefile("rb")
        self.sock.sendall(HELLO)
        protocol.expect(protocol.read_message(self.rfile), protocol.HelloOk)

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def test_download_in_progress_survives_a_replace_of_its_name(make_cluster, tmp_path, request):
    """A download that started before the name was replaced still delivers the whole old version."""
    # A longer I/O timeout than FAST_MASTER's, so the master waits for our stalled reader.
    cluster = make_cluster(master_args=["--heartbeat-interval", "0.2", "--dead-after", "1", "--io-timeout", "10"])
    seed = 8108
    old, new = random_bytes(seed, 10 * MIB + 5), random_bytes(seed + 1, 64 * KIB)
    upload(cluster, "moving", old, tmp_path)
    reader = SlowReader(master_address(cluster))
    request.addfinalizer(reader.close)
    reader.sock.sendall(protocol.encode(protocol.Download(name="moving")))
    info = protocol.expect(protocol.read_message(reader.rfile), protocol.FileInfo)
    received = bytearray(protocol.expect(protocol.read_message(reader.rfile), protocol.Data).body)
    # The master is now blocked writing this download; replace the name and let the old blob be collected.
    upload(cluster, "moving", new, tmp_path)
    try:
        # Give collection of the replaced version its chance to strike; a master that
        # defers it until the read ends never gets there, and that is fine.
        wait_chunks_back_to(cluster, 2 * len(new) // CHUNK_BYTES, timeout_s=1.5)
    except AssertionError:
        pass
    while True:
        msg = protocol.read_message(reader.rfile)
        if isinstance(msg, protocol.DataEnd):
            break
        assert isinstance(msg, protocol.Data), f"after {len(received)} of {info.size} bytes: {msg}"
        received += msg.body
    assert info.sha256 == sha256(old) and sha256(received) == sha256(old), f"seed {seed}"


def test_many_clients_in_parallel_all_succeed(shared_cluster, tmp_path):
    """Eight clients uploading and downloading distinct files at once all succeed."""
    seed = 9009
    errors: list[str] = []

    def work(n):
        data = random_bytes(seed + n, 200 * KIB + n)
        try:
            for round_ in range(2):
                name = f"par/{n}/{round_}"
                reply = upload(shared_cluster, name, data, tmp_path)
                assert reply.size == len(data)
                if download(shared_cluster, name, tmp_path, label=f"par-{n}") != data:
                    errors.append(f"client {n}: {name} differs")
        except Exception as exc:
            errors.append(f"client {n}: {exc!r}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, f"seed {seed}: " + "; ".join(errors)
    assert len([name for name in listing(shared_cluster) if name.startswith("par/")]) == 16


# --- 10. too few nodes ----------------------------------------------------------------------
def test_upload_with_one_node_fails_insufficient_nodes(make_cluster, tmp_path):
    """With one live node, an upload exits EXIT_INSUFFICIENT_NODES and says 1 alive, 2 needed."""
    cluster = make_cluster(nodes=1)
    result = cluster.cli("upload", write_local(tmp_path, "one", b"data"), "one")
    assert result.returncode == client_module.EXIT_INSUFFICIENT_NODES, result
    assert one_line(result.stderr) and re.search(r"\b1\b", result.stderr) and re.search(r"\b2\b", result.stderr), \
        result
    assert listing(cluster) == {}


def test_upload_after_two_of_three_nodes_die_fails_insufficient_nodes(restart_cluster, tmp_path):
    """Once two of three nodes are seen dead, an upload exits EXIT_INSUFFICIENT_NODES."""
    restart_cluster.nodes[0].kill()
    restart_cluster.nodes[1].kill()
    wait_until(lambda: restart_cluster.status().totals["nodes_alive"] == 1, message="1 live node")
    result = restart_cluster.cli("upload", write_local(tmp_path, "late", b"data"), "late")
    assert result.returncode == client_module.EXIT_INSUFFICIENT_NODES, result
    assert "late" not in listing(restart_cluster)


# --- 11./12./13. uploads that must not commit -------------------------------------------------
def test_disconnect_mid_upload_keeps_the_previous_version(cluster, tmp_path):
    """A client that vanishes mid-upload leaves the old version listed and downloadable."""
    seed = 11011
    old = random_bytes(seed, 10 * KIB)
    upload(cluster, "keep", old, tmp_path)
    wait_chunks_back_to(cluster, 2 * 10)
    conn = raw_connection(master_address(cluster))
    conn.send(protocol.UploadBegin(name="keep", size=3 * MIB))
    send_data(conn, random_bytes(seed + 1, BATCH_BYTES + 100 * KIB))
    wait_until(lambda: cluster.status().totals["chunks"] > 2 * 10, message="first batch on the nodes")
    conn.close()
    wait_chunks_back_to(cluster, 2 * 10)
    assert listing(cluster)["keep"]["size"] == len(old)
    assert download(cluster, "keep", tmp_path) == old, f"seed {seed}"


def test_disconnect_mid_upload_of_a_new_name_commits_nothing(cluster, tmp_path):
    """A client that vanishes mid-upload of a new name leaves no entry behind."""
    seed = 11111
    conn = raw_connection(master_address(cluster))
    conn.send(protocol.UploadBegin(name="never", size=3 * MIB))
    send_data(conn, random_bytes(seed, BATCH_BYTES + 100 * KIB))
    wait_until(lambda: cluster.status().totals["chunks"] > 0, message="first batch on the nodes")
    conn.close()
    wait_chunks_back_to(cluster, 0)
    assert "never" not in listing(cluster)
    result = cluster.cli("download", "never", str(tmp_path / "never"))
    assert result.returncode == client_module.EXIT_NOT_FOUND, result


def test_wrong_sha256_at_upload_end_commits_nothing(shared_cluster, tmp_path):
    """An UPLOAD_END whose SHA-256 differs from the data is refused and the old version stays."""
    seed = 12012
    old = random_bytes(seed, 4 * KIB)
    upload(shared_cluster, "checked", old, tmp_path)
    new = random_bytes(seed + 1, 6 * KIB)
    with raw_connection(master_address(shared_cluster)) as conn:
        conn.send(protocol.UploadBegin(name="checked", size=len(new)))
        send_data(conn, new)
        conn.send(protocol.UploadEnd(sha256=sha256(new[:-1] + b"\0")))
        reply = conn.recv()
    assert isinstance(reply, protocol.Error) and reply.code == "CHECKSUM_MISMATCH", reply
    assert listing(shared_cluster)["checked"]["size"] == len(old)
    assert download(shared_cluster, "checked", tmp_path) == old, f"seed {seed}"


def test_connection_stays_usable_after_a_refused_upload_end(shared_cluster, tmp_path):
    """After CHECKSUM_MISMATCH for an UPLOAD_END, the next request on that connection gets its own reply."""
    data = b"payload" * 100
    with raw_connection(master_address(shared_cluster)) as conn:
        conn.send(protocol.UploadBegin(name="resync", size=len(data)))
        conn.send(protocol.Data(body=data))
        conn.send(protocol.UploadEnd(sha256="0" * 64))
        reply = conn.recv()
        assert isinstance(reply, protocol.Error) and reply.code == "CHECKSUM_MISMATCH", reply
        conn.send(protocol.UploadBegin(name="resync", size=len(data)))
        conn.send(protocol.Data(body=data))
        conn.send(protocol.UploadEnd(sha256=sha256(data)))
        assert conn.expect(protocol.Uploaded).size == len(data)
    assert download(shared_cluster, "resync", tmp_path) == data


def test_node_killed_mid_upload_never_leaves_a_partial_file(restart_cluster, tmp_path):
    """A node dying mid-upload fails the upload cleanly or stores the whole file, never a part."""
    seed = 13013
    data = random_bytes(seed, 4 * MIB + 333)
    half = 2 * MIB
    with raw_connection(master_address(restart_cluster)) as conn:
        conn.send(protocol.UploadBegin(name="big", size=len(data)))
        send_data(conn, data[:half])
        # Wait until the master has shipped the first batches, so the kill lands mid-stream.
        wait_until(lambda: restart_cluster.status().totals["chunks"] > 0, message="first batches stored")
        restart_cluster.nodes[0].kill()
        send_data(conn, data[half:])
        conn.send(protocol.UploadEnd(sha256=sha256(data)))
        reply = conn.recv()
    assert isinstance(reply, (protocol.Uploaded, protocol.Error)), reply
    entries = listing(restart_cluster)
    if isinstance(reply, protocol.Error):
        assert reply.code in ("UNAVAILABLE", "TIMEOUT", "INSUFFICIENT_NODES"), reply
        assert reply.message and "\n" not in reply.message, reply
        assert "big" not in entries, f"failed upload was committed: {entries.get('big')}"
    else:
        assert entries["big"]["size"] == len(data)
        assert download(restart_cluster, "big", tmp_path) == data, f"seed {seed}"


# --- 14. errors -------------------------------------------------------------------------------
def test_download_of_unknown_name_exits_not_found(shared_cluster, tmp_path):
    """Downloading a name that was never stored exits EXIT_NOT_FOUND and writes nothing."""
    result = shared_cluster.cli("download", "no/such/file", str(tmp_path / "out"))
    assert result.returncode == client_module.EXIT_NOT_FOUND, result
    assert one_line(result.stderr), result
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_upload_of_missing_local_file_exits_local_io(shared_cluster, tmp_path):
    """Uploading a local file that does not exist exits EXIT_LOCAL_IO."""
    result = shared_cluster.cli("upload", str(tmp_path / "missing"), "missing")
    assert result.returncode == client_module.EXIT_LOCAL_IO, result
    assert one_line(result.stderr), result


def test_unreachable_master_exits_unavailable_naming_the_address(tmp_path):
    """A client whose master does not listen exits EXIT_UNAVAILABLE and names the address."""
    address = f"127.0.0.1:{free_port()}"
    result = run_cli("list", master=address, cwd=tmp_path)
    assert result.returncode == client_module.EXIT_UNAVAILABLE, result
    assert one_line(result.stderr) and address in result.stderr, result


def test_deleted_file_is_not_found_and_not_listed(shared_cluster, tmp_path):
    """After delete, download exits EXIT_NOT_FOUND and list no longer shows the name."""
    upload(shared_cluster, "doomed", b"bye", tmp_path)
    assert shared_cluster.cli("delete", "doomed").returncode == 0
    result = shared_cluster.cli("download", "doomed", str(tmp_path / "doomed"))
    assert result.returncode == client_module.EXIT_NOT_FOUND, result
    assert "doomed" not in listing(shared_cluster)


# --- 15. malformed frames --------------------------------------------------------------------
MALFORMED = {
    # name: (bytes sent, error codes acceptable in the reply; empty = no reply required)
    "garbage, not JSON": (b"\x00\x00\x00\x05hello", {"BAD_REQUEST"}),
    "http request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {"TOO_LARGE", "BAD_REQUEST"}),
    "seeded random bytes (seed 15015)": (random_bytes(15015, 300), set()),
    "header length 0xFFFFFFFF": (b"\xff\xff\xff\xff" + b"{}", {"TOO_LARGE"}),
    "body length over the limit after hello": (HELLO + frame({"op": "DATA", "body": 2**40}), {"TOO_LARGE"}),
    "truncated frame": (HELLO[:len(HELLO) // 2], set()),
    "truncated body after hello": (HELLO + frame({"op": "DATA", "body": 100}) + b"x" * 10, set()),
}


@pytest.fixture(scope="module")
def frame_cluster(tmp_path_factory):
    """A master and two nodes shared by the frame tests, which store nothing but a probe file."""
    with running_cluster(tmp_path_factory.mktemp("frames")) as c:
        yield c


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frames_leave_master_and_node_serving(frame_cluster, tmp_path, case):
    """A malformed frame gets at most an ERROR frame and a closed connection; both servers keep serving."""
    cluster = frame_cluster
    payload, codes = MALFORMED[case]
    for address in (master_address(cluster), node_address(cluster, 0)):
        frames = exchange_raw(address, payload)
        errors = [f for f in frames if isinstance(f, protocol.Error)]
        if codes:
            assert errors and errors[-1].code in codes, f"{case} to {address}: {frames}"
    assert_master_serves(cluster, tmp_path)
    assert_node_serves(cluster, 0)


UNSERVED_OPS = {
    # name: (header sent to the master, header sent to a node)
    "op no server knows": ({"op": "FROBNICATE"}, {"op": "FROBNICATE"}),
    "op of the other role": ({"op": "GET_CHUNKS", "blob": "b", "first": 0, "count": 1}, {"op": "STATUS"}),
}


@pytest.mark.parametrize("case", list(UNSERVED_OPS))
def test_unserved_op_gets_unknown_op_and_connection_stays_usable(frame_cluster, case):
    """A well-formed frame with an op the server does not serve gets UNKNOWN_OP and the connection goes on."""
    cluster = frame_cluster
    to_master, to_node = UNSERVED_OPS[case]
    targets = [("master", master_address(cluster), "client", to_master, protocol.Status(), protocol.StatusReply),
               ("node", node_address(cluster, 0), "master", to_node, protocol.NodeStat(), protocol.NodeStatReply)]
    failures = []
    for label, address, role, header, request, reply_cls in targets:
        with raw_connection(address, role) as conn:
            conn.sock.sendall(frame(header))
            reply = conn.recv()
            if not (isinstance(reply, protocol.Error) and reply.code == "UNKNOWN_OP"):
                failures.append(f"{label} answered {header} with {reply}")
                continue
            try:
                conn.request(request, reply_cls)
            except protocol.BackupError as exc:
                failures.append(f"{label} connection unusable after UNKNOWN_OP for {header['op']}: {exc!r}")
    assert not failures, "; ".join(failures)


# --- 16. client-side verification ----------------------------------------------------------
class LyingMasterHandler(transport.RequestHandler):
    """Serves any download with the right bytes but a wrong SHA-256 in FILE_INFO."""

    DATA = b"the right bytes, the wrong hash" * 100

    def do_DOWNLOAD(self, msg: protocol.Download) -> None:
        data = self.DATA
        self.reply(protocol.FileInfo(name=msg.name, size=len(data), chunks=(len(data) + 1023) // 1024,
                                     sha256="0" * 64, mtime=0.0, version="fake", offset=0, length=len(data)),
                   flush=False)
        self.reply(protocol.Data(body=data), flush=False)
        self.reply(protocol.DataEnd())


@pytest.fixture
def lying_master(request):
    """An in-process fake master on 127.0.0.1 whose downloads fail verification."""
    server = transport.Server(("127.0.0.1", 0), LyingMasterHandler, server_id="master",  # it passes for one
                              io_timeout_s=5.0, idle_timeout_s=5.0)
    request.addfinalizer(serve_in_thread(server, "lying-master"))
    return server


def test_client_refuses_download_whose_sha256_differs(lying_master, tmp_path):
    """A download whose bytes miss the recorded SHA-256 exits EXIT_CHECKSUM and leaves no file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("download", "anything", str(out_dir / "file"), master=lying_master.address_text, cwd=tmp_path)
    assert result.returncode == client_module.EXIT_CHECKSUM, result
    assert one_line(result.stderr), result
    assert os.listdir(out_dir) == [], "a failed download left files behind"


# --- 17. corruption on disk -------------------------------------------------------------------
def committed_runs(cluster, name: str) -> list:
    """The runs [first, count, [node ids]] of ``name`` in the master's metadata on disk.

    Reads the checkpoint and the operation log as metadata_log.py and
    namespace.py document them; the last record for the name wins.
    """
    master_dir = os.path.join(cluster.data_dir, "master")
    entry = None
    checkpoint = os.path.join(master_dir, "metadata.json")
    if os.path.exists(checkpoint):
        with open(checkpoint, encoding="utf-8") as f:
            entry = json.load(f)["state"]["files"].get(name)
    for log_name in sorted(n for n in os.listdir(master_dir) if re.fullmatch(r"oplog-\d{12}\.jsonl", n)):
        with open(os.path.join(master_dir, log_name), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record.get("name") == name:
                    entry = record.get("file")
    assert entry is not None, f"{name!r} is not in the master's metadata"
    return entry["runs"]


def test_corrupt_replica_on_disk_is_failed_over(shared_cluster, tmp_path):
    """With the first-read replica's bytes flipped on disk, the download still comes back identical."""
    seed = 17017
    data = random_bytes(seed, 300 * KIB + 17)
    reply = upload(shared_cluster, "rot", data, tmp_path)
    holders = [i for i in range(len(shared_cluster.nodes)) if payload_locations(shared_cluster, i, reply.version)]
    assert len(holders) == 2, f"blob on nodes {holders}"
    # With both replicas alive and idle, the master reads the one listed first in the run.
    [[_, _, replicas]] = committed_runs(shared_cluster, "rot")
    index = next(i for i in holders if node_id(shared_cluster, i) == replicas[0])
    path, _, offset, length = payload_locations(shared_cluster, index, reply.version)[0]
    flip_byte(path, offset + length - 50)
    assert download(shared_cluster, "rot", tmp_path) == data, f"node{index} corrupt (seed {seed})"


def test_grouped_uploads_in_opposite_orders_do_not_deadlock(shared_cluster):
    """Two pipelined uploads taking the same names in opposite orders both finish promptly."""
    a, b = b"first" * 100, b"second" * 100

    def begin(conn, name, data):
        conn.send(protocol.UploadBegin(name=name, size=len(data), group=True), flush=False)
        conn.send(protocol.Data(body=data), flush=False)
        conn.send(protocol.UploadEnd(sha256=sha256(data)))

    with raw_connection(master_address(shared_cluster)) as one, raw_connection(master_address(shared_cluster)) as two:
        begin(one, "dl-a", a)  # pending on one: holds dl-a
        begin(two, "dl-b", b)  # pending on two: holds dl-b
        wait_until(lambda: {lock["name"] for lock in shared_cluster.client().locks()} == {"dl-a", "dl-b"},
                   message="both grouped uploads pending")
        started = time.monotonic()
        begin(one, "dl-b", a)  # one must commit dl-a before waiting for dl-b
        begin(two, "dl-a", b)
        two.send(protocol.Sync())
        replies_two = [two.recv() for _ in range(3)]
        one.send(protocol.Sync())
        replies_one = [one.recv() for _ in range(3)]
        elapsed = time.monotonic() - started
    assert [type(r) for r in replies_one] == [protocol.Uploaded, protocol.Uploaded, protocol.Synced], replies_one
    assert [type(r) for r in replies_two] == [protocol.Uploaded, protocol.Uploaded, protocol.Synced], replies_two
    assert elapsed < 10, f"took {elapsed:.1f} s: the writers waited for each other"
