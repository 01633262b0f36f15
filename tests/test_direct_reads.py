"""Direct reads (issue 15): clients fetch chunks from the nodes with a capability the master issues."""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import threading
import time
import zlib

import pytest

import client as client_module
import direct_read
import protocol
import security
import transfers
import transport
from conftest import (FAST_MASTER, FAST_TIMING, IO_TIMEOUT_S, SecureCluster, flip_byte, payload_locations,
                      random_bytes, sha256, wait_until)

SECRET = b"direct-read test secret"
KIB = 1024
MIB = 1024 * KIB


# --- pure parts -------------------------------------------------------------------------------
def test_read_capability_allows_its_blob_until_it_expires_and_nothing_else():
    """A capability reads its blob of its cluster until it expires; forged, other-blob, expired and malformed ones fail."""
    now = 1_000_000.0
    cap = security.read_capability(SECRET, "cluster-a", "blob-1", int(now) + 60)
    assert security.read_capability_problem(SECRET, "cluster-a", "blob-1", cap, now) is None
    assert "not the master's" in security.read_capability_problem(SECRET, "cluster-a", "blob-2", cap, now)
    assert "not the master's" in security.read_capability_problem(SECRET, "cluster-b", "blob-1", cap, now)
    assert "not the master's" in security.read_capability_problem(b"other secret", "cluster-a", "blob-1", cap, now)
    assert "expired" in security.read_capability_problem(SECRET, "cluster-a", "blob-1", cap, now + 61)
    later = cap.replace(str(int(now) + 60), str(int(now) + 6000))  # a longer life, same MAC
    assert "not the master's" in security.read_capability_problem(SECRET, "cluster-a", "blob-1", later, now)
    for bad in (None, "", "x", "1.2.3", "abc.00", f"{int(now) + 60}.zz"):
        assert security.read_capability_problem(SECRET, "cluster-a", "blob-1", bad, now) is not None


def test_plan_runs_clips_the_range_and_pages():
    """plan_runs clips runs to the chunks asked for, names each run's blob, and says where the next page starts."""
    entry = {"version": "v", "runs": [[0, 10, ["a", "b"]], [10, 5, ["b", "c"], "old"], [15, 10, ["c", "a"]]]}
    assert transfers.plan_runs(entry, 3, 12, 8) == ([[3, 7, ["a", "b"], "v"], [10, 3, ["b", "c"], "old"]], None)
    assert transfers.plan_runs(entry, 3, 24, 2) == ([[3, 7, ["a", "b"], "v"], [10, 5, ["b", "c"], "old"]], 15)
    assert transfers.plan_runs(entry, 15, 24, 2) == ([[15, 10, ["c", "a"], "v"]], None)
    assert transfers.plan_runs(entry, 4, 3, 2) == ([], None)  # an empty range


def test_send_file_range_sends_exactly_the_range_and_fails_on_a_short_file(tmp_path):
    """send_file_range (a node's sendfile of a client's read) sends the bytes asked for across a full socket
    buffer, and raises EIO, not a short frame, if the file ends first."""
    data = random_bytes(1505, 3 * MIB)
    path = tmp_path / "segment"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    sender, receiver = socket.socketpair()
    try:
        sender.settimeout(5.0)  # non-blocking underneath: sendfile stops at a full buffer, then waits
        got = bytearray()
        reader = threading.Thread(target=receive_into, args=(receiver, got, 2 * MIB + 5))
        reader.start()
        transport.send_file_range(sender, fd, 7, 2 * MIB, 5.0)
        transport.send_file_range(sender, fd, 0, 5, 5.0)
        reader.join(10.0)
        assert bytes(got) == data[7:7 + 2 * MIB] + data[:5]
        with pytest.raises(OSError) as excinfo:
            transport.send_file_range(sender, fd, len(data) - 10, 20, 5.0)
        assert excinfo.value.errno == errno.EIO
    finally:
        os.close(fd)
        sender.close()
        receiver.close()


def receive_into(sock, into: bytearray, nbytes: int) -> None:
    while len(into) < nbytes:
        piece = sock.recv(min(nbytes - len(into), 65536))
        if not piece:
            return
        into += piece


# --- real processes ---------------------------------------------------------------------------
def start_secure_cluster(directory):
    """A master and three nodes with a shared secret; the caller stops it."""
    secret_file = directory / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    os.chmod(secret_file, 0o600)
    # dead_after 30 s: the master keeps listing a killed node first where it was, so the
    # clients meet it (the test is about clients routing around it, not the master).
    c = SecureCluster(str(directory / "cluster"), nodes=3,
                      master_args=[*FAST_MASTER, "--safe-mode", "1", "--dead-after", "30"],
                      node_args=[*FAST_TIMING, "--scrub-rate", "0"], secret_file=str(secret_file),
                      client_security=security.Security(SECRET))
    try:
        c.start()
        c.wait_nodes_alive(3)
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture
def secure_cluster(tmp_path):
    """A cluster of its own, for a test that kills nodes."""
    c = start_secure_cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def shared_secure_cluster(tmp_path_factory):
    """One cluster for the tests that change no node."""
    c = start_secure_cluster(tmp_path_factory.mktemp("direct-shared"))
    yield c
    c.stop()


def new_client(cluster, replicas=None) -> client_module.Client:
    host, _, port = cluster.master_address.rpartition(":")
    return client_module.Client((host, int(port)), timeout_s=20.0, frame_bytes=MIB, show_progress=False,
                                security=cluster.client_security, handshake_timeout_s=IO_TIMEOUT_S,
                                replicas=replicas)


class NoNodeReachable(direct_read.ReplicaPool):
    """A client behind a firewall that lets it reach the master only."""

    def acquire(self, node_id):
        raise protocol.Unavailable(f"cannot reach node {node_id} (test: firewalled)")


def plan_of(c: client_module.Client, name: str) -> protocol.ReadPlan:
    """The READ_PLAN the master answers for ``name`` (the read is ended at once)."""
    plan = c.conn.request(protocol.Download(name=name, direct=True), protocol.ReadPlan)
    c.conn.request(protocol.ReadEnd(read_ids=[plan.read_id]), protocol.ReadEnded)
    return plan


def node_index(cluster, node_id: str) -> int:
    for index in range(len(cluster.nodes)):
        with open(os.path.join(cluster.node_data_dir(index), "node.json"), encoding="utf-8") as f:
            if node_id in f.read():
                return index
    raise AssertionError(f"no node {node_id}")


def download(c: client_module.Client, name: str, tmp_path) -> bytes:
    path = tmp_path / "out.bin"
    c.download(name, str(path), force=True)
    data = path.read_bytes()
    path.unlink()
    return data


def test_direct_read_survives_corrupt_hung_and_killed_nodes(secure_cluster, tmp_path):
    """Reading from the nodes: a copy corrupt on disk is read from the other replica and repaired, a SIGSTOPped node costs one io_timeout, a SIGKILLed one nothing; the bytes are always exact."""
    cluster = secure_cluster
    seed = 1501
    data = random_bytes(seed, 3 * MIB + 123)
    local = tmp_path / "in.bin"
    local.write_bytes(data)
    tree = tmp_path / "tree"
    tree.mkdir()
    small = {f"f{i:02d}": random_bytes(seed + 1 + i, 3000 + i) for i in range(24)}
    for file_name, blob in small.items():
        (tree / file_name).write_bytes(blob)
    c = new_client(cluster)
    try:
        c.upload_file(str(local), "big")
        assert not c.upload_tree(str(tree), "t/").failures
        plan = plan_of(c, "big")
        blob, victim = plan.runs[0][3], plan.runs[0][2][0]  # the replica read first for chunk 0
        index = node_index(cluster, victim)
        totals = cluster.status().totals
        found_before = totals["corrupt_replicas_found"]

        # 1. Chunk 5 corrupt on the replica read first.
        path, first, payload_offset, _ = next(r for r in payload_locations(cluster, index, blob) if r[1] == 0)
        flip_byte(path, payload_offset + 5 * KIB + random.Random(seed).randrange(KIB))
        assert sha256(download(c, "big", tmp_path)) == sha256(data), f"corrupt copy (seed {seed})"
        # The master checked the reported copy itself before answering READ_END, and repairs it.
        assert cluster.status().totals["corrupt_replicas_found"] == found_before + 1
        wait_until(lambda: (lambda t: not (t["under_replicated_chunks"] or t["repairs_pending"]))(
            cluster.status().totals), 15.0, message="chunk 5 repaired")

        # 2. The replica read first is hung: one io_timeout, then the other replica.
        c.close()  # fresh connections: the hang must hit a new request and an idle connection alike
        cluster.nodes[index].signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert sha256(download(c, "big", tmp_path)) == sha256(data), f"hung node (seed {seed})"
            elapsed = time.monotonic() - started
            assert elapsed < IO_TIMEOUT_S + 3.0, f"took {elapsed:.1f} s with node {victim} hung"
            assert not c.replicas.reachable(victim), "the hung node was never tried"
        finally:
            cluster.nodes[index].signal(signal.SIGCONT)

        # 3. A node killed.
        # The victim: the replica read first of the most small files, so the restore meets it.
        c.close()
        c = new_client(cluster)
        firsts = [plan_of(c, f"t/{file_name}").runs[0][2][0] for file_name in small]
        victim = max(set(firsts), key=firsts.count)
        cluster.nodes[node_index(cluster, victim)].kill()
        assert sha256(download(c, "big", tmp_path)) == sha256(data), f"killed node (seed {seed})"
        # A directory restore (pipelined across files) with the node down, by a client that
        # does not know yet.
        c.close()
        c = new_client(cluster)
        summary = c.download_tree("t/", str(tmp_path / "restored"))
        assert not c.replicas.reachable(victim), "no file was read from the killed node first"
        assert not summary.failures, summary.failures
        assert {p.name: p.read_bytes() for p in (tmp_path / "restored").iterdir()} == small
    finally:
        c.close()


def test_nodes_refuse_reads_without_the_masters_capability(shared_secure_cluster, tmp_path):
    """A node serves a client GET_CHUNKS only with the master's capability for that blob; no secret, a forged or missing capability, or a write are refused."""
    cluster = shared_secure_cluster
    local = tmp_path / "in.bin"
    local.write_bytes(random_bytes(1502, 5000))
    c = new_client(cluster)
    try:
        c.upload_file(str(local), "small")
        plan = plan_of(c, "small")
    finally:
        c.close()
    first, count, node_ids, blob = plan.runs[0]
    host, _, port = plan.nodes[node_ids[0]].rpartition(":")
    address = (host, int(port))
    with pytest.raises(protocol.AuthFailed):
        transport.Connection(address, "client", IO_TIMEOUT_S)  # no secret
    with transport.Connection(address, "client", IO_TIMEOUT_S, security.Security(SECRET)) as conn:
        reply = conn.request(protocol.GetChunks(blob=blob, first=first, count=count, cap=plan.caps[blob]),
                             protocol.ChunkData)
        assert len(reply.body) == count * protocol.CRC_BYTES + 5000  # the real capability reads
        # One whole record, sent from the segment file (sendfile) with the CRC of its payload.
        assert reply.crc32 == zlib.crc32(reply.body[count * protocol.CRC_BYTES:])
        assert bytes(reply.body[count * protocol.CRC_BYTES:]) == (tmp_path / "in.bin").read_bytes()
        expires, mac = plan.caps[blob].split(".")
        forged = f"{expires}.{'0' * len(mac)}"
        for cap in (None, forged, f"{int(expires) + 3600}.{mac}"):
            with pytest.raises(protocol.AuthFailed):
                conn.request(protocol.GetChunks(blob=blob, first=first, count=count, cap=cap), protocol.ChunkData)
        with pytest.raises(protocol.AuthFailed):  # the capability is for its blob only
            conn.request(protocol.GetChunks(blob="other", first=0, count=1, cap=plan.caps[blob]),
                         protocol.ChunkData)
        with pytest.raises(protocol.AuthFailed):  # clients never write or delete on a node
            conn.request(protocol.DeleteBlobs(blobs=[blob]), protocol.BlobsDeleted)


def test_client_that_reaches_no_node_is_served_by_the_master(shared_secure_cluster, tmp_path):
    """With no node reachable from the client, a download, a range read and a directory restore are relayed by the master, from the pinned version, exactly."""
    cluster = shared_secure_cluster
    data = random_bytes(1503, 2 * MIB + 99)
    small = {f"g{i}": random_bytes(1504 + i, 1000 + i) for i in range(5)}
    (tmp_path / "tree").mkdir()
    for file_name, blob in small.items():
        (tmp_path / "tree" / file_name).write_bytes(blob)
    (tmp_path / "in.bin").write_bytes(data)
    c = new_client(cluster)
    try:
        c.upload_file(str(tmp_path / "in.bin"), "fw/big")
        assert not c.upload_tree(str(tmp_path / "tree"), "fw/tree/").failures
    finally:
        c.close()
    c = new_client(cluster, replicas=NoNodeReachable(IO_TIMEOUT_S, cluster.client_security))
    try:
        assert sha256(download(c, "fw/big", tmp_path)) == sha256(data)
        part = tmp_path / "part.bin"
        c.download("fw/big", str(part), offset=MIB - 10, length=3000)
        assert part.read_bytes() == data[MIB - 10:MIB + 2990]
        summary = c.download_tree("fw/tree/", str(tmp_path / "restored"))
        assert not summary.failures, summary.failures
        assert {p.name: p.read_bytes() for p in (tmp_path / "restored").iterdir()} == small
    finally:
        c.close()
