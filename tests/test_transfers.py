"""The master's read path against real StorageNode objects over an in-process transport.

Each replica is a ``StorageNode`` with its own chunk store on tmp_path (no
threads, no sockets); every request and reply goes through protocol.encode
and protocol.read_message, so the wire form of CHUNK_DATA's missing/corrupt
lists is exercised too.  Bytes are flipped on disk with conftest.flip_byte.
"""

import dataclasses
import hashlib
import io
import os
import random
import sys
import time
import zlib

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chunk_store  # noqa: E402
import config as config_module  # noqa: E402
import protocol  # noqa: E402
import transfers  # noqa: E402
from conftest import flip_byte, segment_records  # noqa: E402
from storage_node import StorageNode  # noqa: E402

SEED = 9002
CS = 1024
CHUNKS = 12  # one piece: batch_chunks below is larger
BLOB = "b" * 32


class FakeConn:
    """A connection to one StorageNode: replies are encoded and decoded like on the wire."""

    def __init__(self, node: StorageNode):
        self.node = node
        self.replies: list[bytes] = []
        self.broken = False

    def answer(self, msg):
        """The node's reply to ``msg`` (subclasses serve more requests)."""
        return self.node.get(msg)

    def send(self, msg, flush=True):
        try:
            reply = self.answer(msg)
        except protocol.BackupError as exc:
            reply = protocol.error_message(exc)
        self.replies.append(protocol.encode(reply))

    def flush(self):
        pass  # each reply is made as its request is sent

    def expect(self, cls, body_buffer=None):
        return protocol.expect(protocol.read_message(io.BytesIO(self.replies.pop(0)), body_buffer), cls)

    def request(self, msg, cls, body_buffer=None):
        self.send(msg)
        return self.expect(cls, body_buffer)


class FakePool:
    def __init__(self, nodes: dict):
        self.nodes = nodes

    def acquire(self, node_id):
        return FakeConn(self.nodes[node_id])

    def release(self, conn):
        pass

    @staticmethod
    def get_chunks(blob, first, count):
        return protocol.GetChunks(blob=blob, first=first, count=count)


class FakeMaster:
    """What transfers.read_piece/read_range use of a Master; records what they report."""

    def __init__(self, nodes: dict):
        self.pool = FakePool(nodes)
        self.bad: list[tuple[str, list, str]] = []
        self.failures: list[str] = []

    def read_order(self, node_ids):
        return list(node_ids)

    def note_bad_replica(self, node_id, name, entry, blob, ranges, exc):
        self.bad.append((node_id, list(ranges), exc.code))

    def note_node_failure(self, node_id, exc):
        self.failures.append(node_id)


@pytest.fixture
def replicas(tmp_path):
    """(master, entry, body): one file of CHUNKS chunks (last one short) on nodes "a" and "b"."""
    print(f"seed {SEED}")
    payload = random.Random(SEED).randbytes(CHUNKS * CS - 100)
    crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(payload, CS))
    config = config_module.load_config(None)
    nodes = {}
    for node_id in ("a", "b"):
        node = StorageNode(config, str(tmp_path / node_id))
        node.put(protocol.PutChunks(blob=BLOB, first=0, count=CHUNKS, chunk_size=CS, body=crcs + payload))
        nodes[node_id] = node
    entry = {"size": len(payload), "chunks": CHUNKS, "chunk_size": CS, "version": BLOB, "batch_chunks": 16,
             "runs": [[0, CHUNKS, ["a", "b"]]]}
    yield FakeMaster(nodes), entry, crcs + payload
    for node in nodes.values():
        node.store.close()


def flip_chunk(master, node_id: str, chunk: int) -> None:
    """Invert a byte inside chunk ``chunk`` of the one record on node ``node_id``."""
    seg_dir = os.path.join(master.pool.nodes[node_id].data_dir, "chunks", "segments")
    path = os.path.join(seg_dir, sorted(os.listdir(seg_dir))[0])
    [(_, _, _, payload_offset, _)] = list(segment_records(path))
    flip_byte(path, payload_offset + chunk * CS + 17)


def read(master, entry, order=("a", "b")) -> bytes:
    buffer = bytearray(entry["batch_chunks"] * (CS + protocol.CRC_BYTES))
    return bytes(transfers.read_piece(master, "f", entry, BLOB, 0, CHUNKS, list(order), buffer))


def test_each_chunk_comes_from_the_replica_that_has_it_intact(replicas):
    """Chunk 5 bad on one replica and chunk 9 on the other: the piece reads back whole, and each bad copy is reported alone."""
    master, entry, body = replicas
    flip_chunk(master, "a", 5)
    flip_chunk(master, "b", 9)
    assert read(master, entry) == body
    # b was asked only for chunk 5, so its bad chunk 9 is not known yet.
    assert master.bad == [("a", [(5, 1)], "CHECKSUM_MISMATCH")]
    assert read(master, entry, order=("b", "a")) == body
    # a's chunk 5 is gone now (dropped by the node), and b's chunk 9 was read from a.
    assert master.bad[1:] == [("b", [(9, 1)], "CHECKSUM_MISMATCH")]
    assert master.pool.nodes["a"].store.inventory() == {BLOB: [(0, 5), (6, CHUNKS - 6)]}
    assert read(master, entry) == body
    assert master.bad[2:] == [("a", [(5, 1)], "CHUNK_NOT_FOUND")]
    assert master.failures == []


def test_same_chunk_bad_on_every_replica_is_data_lost(replicas):
    """With the short last chunk corrupt on both replicas, the read fails DATA_LOST naming that chunk, after trying each replica for it only."""
    master, entry, _ = replicas
    last = CHUNKS - 1
    flip_chunk(master, "a", last)
    flip_chunk(master, "b", last)
    with pytest.raises(protocol.DataLost, match=f"chunks {last} lost on every replica"):
        read(master, entry)
    assert master.bad == [("a", [(last, 1)], "CHECKSUM_MISMATCH"), ("b", [(last, 1)], "CHECKSUM_MISMATCH")]


def test_pipelined_read_range_fills_only_the_bad_chunks(replicas):
    """read_range (pipelined GET_CHUNKS) yields the exact bytes of a range when its first replica lacks two runs of chunks."""
    master, entry, body = replicas
    payload = body[CHUNKS * protocol.CRC_BYTES:]
    flip_chunk(master, "a", 2)
    flip_chunk(master, "a", 3)
    master.pool.nodes["a"].store.drop_range(BLOB, 7, 2)
    offset, length = 100, entry["size"] - 150
    assert b"".join(bytes(v) for v in transfers.read_range(master, "f", entry, offset, length)) \
        == payload[offset:offset + length]
    assert sorted(master.bad) == [("a", [(2, 2)], "CHECKSUM_MISMATCH"), ("a", [(7, 2)], "CHUNK_NOT_FOUND")]


def test_reply_with_wrong_last_chunk_length_is_not_used(replicas):
    """A replica whose short last chunk has a consistent CRC but the wrong length is not trusted for it."""
    master, entry, body = replicas
    longer = {**entry, "size": entry["size"] + 1}  # the entry says the last chunk is one byte longer
    with pytest.raises(protocol.DataLost, match=f"chunks {CHUNKS - 1} lost"):
        read(master, longer)


class ClientConn(FakeConn):
    """A client's connection to a node (a direct read): answered as NodeHandler answers a client."""

    def answer(self, msg):
        found = self.node.open_client_read(msg)
        if found is None:
            return self.node.get(msg, for_client=True)
        reply, span = found
        try:
            return dataclasses.replace(reply, body=self.node.store.read_span(span))
        finally:
            self.node.store.close_span(span)


def test_whole_record_reply_is_checked_by_its_payload_crc_and_a_bad_byte_still_fails_over(replicas, monkeypatch):
    """A client's read of a whole record is checked with the record's payload CRC alone (no per-chunk loop); a byte
    damaged on the first replica's disk fails that CRC, the chunk loop then names the chunk, and it comes from the
    other replica."""
    master, entry, body = replicas
    monkeypatch.setattr(FakePool, "acquire", lambda self, node_id: ClientConn(self.nodes[node_id]))
    reply = ClientConn(master.pool.nodes["a"]).request(protocol.GetChunks(blob=BLOB, first=0, count=CHUNKS),
                                                       protocol.ChunkData)
    assert reply.crc32 == zlib.crc32(body[CHUNKS * protocol.CRC_BYTES:])
    partial = ClientConn(master.pool.nodes["a"]).request(protocol.GetChunks(blob=BLOB, first=1, count=3),
                                                         protocol.ChunkData)
    assert partial.crc32 is None  # not a whole record: the client checks chunk by chunk
    checked = []
    real_bad_chunk_ranges = protocol.bad_chunk_ranges
    monkeypatch.setattr(protocol, "bad_chunk_ranges", lambda *args: checked.append(1) or real_bad_chunk_ranges(*args))
    assert read(master, entry) == body
    assert checked == [] and master.bad == []
    flip_chunk(master, "a", 5)
    assert read(master, entry) == body
    # Chunk by chunk: a's reply, whose payload CRC failed, and b's reply for chunk 5 alone (part of a record).
    assert checked == [1, 1] and master.bad == [("a", [(5, 1)], "CHECKSUM_MISMATCH")]


# --- uploads: nodes compute the CRCs, the master checks them -------------------------
class UploadConn(FakeConn):
    """A master->node connection for uploads: PUT_CHUNKS and FLUSH go through the wire form.

    ``damage`` (optional) changes a PUT_CHUNKS frame on the way, as a bad
    link or bad memory between the master's cut and the node could.
    """

    def __init__(self, node: StorageNode, damage=None):
        super().__init__(node)
        self.damage = damage

    def answer(self, msg):
        frame = bytearray(protocol.encode(msg))
        if self.damage is not None and isinstance(msg, protocol.PutChunks):
            self.damage(frame)
        msg = protocol.read_message(io.BytesIO(bytes(frame)))
        if isinstance(msg, protocol.PutChunks):
            return self.node.put(msg)
        if isinstance(msg, protocol.Flush):
            self.node.store.flush()
            return protocol.Flushed()
        return self.node.get(msg)


class UploadPool(FakePool):
    def __init__(self, nodes: dict, damaged: dict):
        super().__init__(nodes)
        self.damaged = damaged

    def acquire(self, node_id):
        return UploadConn(self.nodes[node_id], self.damaged.get(node_id))


class UploadMaster(FakeMaster):
    """What UploadSession/UploadStream use of a Master: placement in the order the nodes were given."""

    def __init__(self, nodes: dict, damaged: dict | None = None):
        super().__init__(nodes)
        self.pool = UploadPool(nodes, damaged or {})
        self.config = config_module.load_config(None)
        self.active_blobs: set = set()

    def choose_replicas(self, nbytes, avoid=(), count=None):
        ids = [n for n in self.pool.nodes if n not in avoid][:count or self.config.replication]
        if len(ids) < (count or self.config.replication):
            raise protocol.InsufficientNodes("too few nodes")
        return ids

    def reserve(self, node_id, nbytes):
        pass

    def note_stored(self, node_id, seq, nbytes, reserved=True):
        pass

    def collect_garbage(self, blob, node_ids):
        pass

    def fence(self) -> dict:
        return {"cluster_id": "c", "epoch": 1}


def upload(master, data: bytes, frame_bytes: int):
    """Feed ``data`` to an UploadStream in frames of ``frame_bytes`` (read in place, as the master does); (session, entry)."""
    session = transfers.UploadSession(master)
    stream = transfers.UploadStream(session, "f")
    view = memoryview(data)
    while len(view):
        space = stream.free_space()
        take = min(len(space), len(view), frame_bytes)
        space[:take] = view[:take]
        stream.filled(take)
        view = view[take:]
    entry = stream.seal(hashlib.sha256(data).hexdigest())
    session.sync(stream.nodes_touched)
    return session, stream, entry


def read_all(master, entry) -> bytes:
    return b"".join(bytes(v) for v in transfers.read_range(master, "f", entry, 0, entry["size"]))


@pytest.fixture
def upload_nodes(tmp_path):
    config = config_module.load_config(None)
    nodes = {node_id: StorageNode(config, str(tmp_path / node_id)) for node_id in ("a", "b", "c")}
    yield nodes
    for node in nodes.values():
        node.store.close()


def test_upload_hashes_batches_in_order_when_the_worker_lags(upload_nodes, monkeypatch):
    """A short last batch waits behind the worker's batches: the SHA-256 and the stored bytes are the file's."""
    real_run = transfers.BatchDigest.run

    def slow_run(job):
        if job.payload is not None and len(job.payload) >= transfers.OFFLOAD_BYTES:
            time.sleep(0.05)  # the worker is behind the handler
        real_run(job)

    monkeypatch.setattr(transfers.BatchDigest, "run", slow_run)
    master = UploadMaster(upload_nodes)
    batch = master.config.batch_bytes
    data = random.Random(SEED).randbytes(3 * batch + 12345)  # 3 offloaded batches, then an inline-sized one
    session, stream, entry = upload(master, data, batch)
    try:
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert session.failed == set()
        assert read_all(master, entry) == data
    finally:
        session.close()


def test_nodes_store_crcs_that_reads_verify(upload_nodes):
    """Nodes compute the CRCs of PUT_CHUNKS node_crcs; a read checks every chunk against them."""
    master = UploadMaster(upload_nodes)
    data = random.Random(SEED + 1).randbytes(master.config.batch_bytes + 5000)
    session, stream, entry = upload(master, data, 64 * 1024)
    try:
        assert read_all(master, entry) == data
        assert master.bad == [] and master.failures == []
        for node_id in ("a", "b"):  # each replica alone
            assert read_all(master, {**entry, "runs": [[0, entry["chunks"], [node_id]]]}) == data
    finally:
        session.close()


def test_bytes_damaged_between_cut_and_node_are_not_counted(upload_nodes):
    """A byte changed on the way to one node: its PUT_OK digest gives it away, the node is dropped from the
    upload, and its batch is re-copied from the intact replica before the commit."""
    def flip_payload_byte(frame: bytearray) -> None:
        frame[-100] ^= 0x40  # in the payload: the node computes its CRCs over the damaged bytes

    master = UploadMaster(upload_nodes, damaged={"a": flip_payload_byte})
    data = random.Random(SEED + 2).randbytes(master.config.batch_bytes)
    session, stream, entry = upload(master, data, master.config.batch_bytes)
    try:
        assert session.failed == {"a"} and master.failures == ["a"]
        healed = session.heal_entry("f", entry, stream.nodes_touched)
        assert healed["runs"] == [[0, entry["chunks"], ["b", "c"]]]
        assert read_all(master, healed) == data
        assert master.bad == []
    finally:
        session.close()


def test_node_refuses_a_payload_that_is_not_count_chunks(upload_nodes):
    """PUT_CHUNKS node_crcs whose payload does not make ``count`` chunks is BAD_REQUEST and stores nothing;
    a good one returns the digest of the CRCs of what it stored."""
    node = upload_nodes["a"]
    payload = random.Random(SEED + 3).randbytes(3 * CS + 10)
    for count, chunk_size in ((3, CS), (5, CS), (4, 16)):
        with pytest.raises(protocol.RemoteProtocolError):
            node.put(protocol.PutChunks(blob=BLOB, first=0, count=count, chunk_size=chunk_size, node_crcs=True,
                                        body=payload))
    assert node.store.inventory() == {}
    ack = node.put(protocol.PutChunks(blob=BLOB, first=0, count=4, chunk_size=CS, node_crcs=True, body=payload))
    assert (ack.blob, ack.first, ack.count) == (BLOB, 0, 4)
    assert ack.crcs_crc32 == protocol.crcs_digest(protocol.crcs_to_bytes(protocol.chunk_crcs(payload, CS)))
    reply = node.get(protocol.GetChunks(blob=BLOB, first=0, count=4))
    assert bytes(reply.body) == protocol.crcs_to_bytes(protocol.chunk_crcs(payload, CS)) + payload


def test_session_of_small_files_holds_one_batch_buffer(upload_nodes):
    """Small uploads are hashed inline and reuse one buffer; the second comes with the first large batch."""
    master = UploadMaster(upload_nodes)
    batch = master.config.batch_bytes
    session = transfers.UploadSession(master)
    try:
        for i in range(3):
            data = random.Random(SEED + 10 + i).randbytes(4096)
            stream = transfers.UploadStream(session, f"small-{i}")
            stream.write(data)
            assert stream.seal(hashlib.sha256(data).hexdigest())["size"] == 4096
        assert session.buffer_bytes == batch
        data = random.Random(SEED + 20).randbytes(2 * batch)
        stream = transfers.UploadStream(session, "large")
        stream.write(data)
        entry = stream.seal(hashlib.sha256(data).hexdigest())
        session.sync(stream.nodes_touched)
        assert session.buffer_bytes == 2 * batch
        assert read_all(master, entry) == data
    finally:
        session.close()


def test_acknowledgements_are_awaited_by_bytes_not_by_batches(upload_nodes):
    """Small files (one small batch each) do not wait for a node's PUT_OK every few files; large batches
    still keep at most ACK_WINDOW_BYTES unacknowledged per node."""
    master = UploadMaster(upload_nodes)
    session = transfers.UploadSession(master)
    try:
        files = 40  # more than the 8 batches the window used to be
        for i in range(files):
            data = random.Random(SEED + 30 + i).randbytes(4096)
            stream = transfers.UploadStream(session, f"small-{i}")
            stream.write(data)
            stream.seal(hashlib.sha256(data).hexdigest())
        assert {n: len(c.unacked) for n, c in session.channels.items()} == {"a": files, "b": files}
        batch = master.config.batch_bytes
        data = random.Random(SEED + 29).randbytes(12 * batch)
        stream = transfers.UploadStream(session, "large")
        stream.write(data)
        stream.seal(hashlib.sha256(data).hexdigest())
        for channel in session.channels.values():
            assert 0 < channel.unacked_bytes <= transfers.ACK_WINDOW_BYTES
        session.sync(set(session.channels))
        assert all(not c.unacked for c in session.channels.values()) and session.failed == set()
    finally:
        session.close()


# --- uploads with the client's CRCs: the nodes check them, each hop is covered ------------------
def client_crc_upload(master, data: bytes, frame_bytes: int, damaged_at: int | None = None, digests: bool = False):
    """Feed ``data`` as a client that sends its chunk CRCs does (DATA_CRCS before each DATA, computed before
    sending); ``damaged_at``: that byte arrives changed at the master; ``digests``: the DATA_CRCS carry the
    CRC32 of the DATA and of its CRCs, as today's client sends them.  (session, stream, entry or the error)."""
    session = transfers.UploadSession(master)
    stream = transfers.UploadStream(session, "f", client_crcs=True)
    received = bytearray(data)
    if damaged_at is not None:
        received[damaged_at] ^= 0x08
    for start in range(0, len(data), frame_bytes):
        frame = data[start:start + frame_bytes]
        if digests:
            sent = protocol.data_crcs(frame, session.chunk_size)
            stream.take_crcs(sent.body, sent.crc32, sent.crcs_crc32)
        else:
            stream.take_crcs(protocol.crcs_to_bytes(protocol.chunk_crcs(frame, session.chunk_size)))
        stream.crcs_for(len(frame))
        stream.write(received[start:start + frame_bytes])
    entry = stream.seal(hashlib.sha256(data).hexdigest())
    session.sync(stream.nodes_touched)
    try:
        return session, stream, session.heal_entry("f", entry, stream.nodes_touched)
    except protocol.BackupError as exc:
        return session, stream, exc


def test_client_crcs_reach_the_nodes_and_reads_verify_them(upload_nodes):
    """The master forwards the client's CRCs, hashes nothing, and records the client's SHA-256; the nodes
    store the CRCs the client computed, and every replica reads back the client's bytes."""
    master = UploadMaster(upload_nodes)
    batch = master.config.batch_bytes
    data = random.Random(SEED + 40).randbytes(2 * batch + 3000)  # frames not aligned with batches
    session, stream, entry = client_crc_upload(master, data, 3 * batch // 4 // CS * CS)
    try:
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and session.failed == set()
        assert stream._digest is None and session._worker is None  # no SHA-256, no CRC pass here
        for node_id in ("a", "b"):
            assert read_all(master, {**entry, "runs": [[0, entry["chunks"], [node_id]]]}) == data
    finally:
        session.close()


def test_byte_damaged_between_client_and_master_fails_the_upload(upload_nodes):
    """A byte changed on the client->master hop: every replica refuses the batch (its CRC is the client's),
    the upload fails with CHECKSUM_MISMATCH, and no node keeps a chunk of that batch."""
    master = UploadMaster(upload_nodes)
    data = random.Random(SEED + 41).randbytes(master.config.batch_bytes + 5000)
    session, stream, result = client_crc_upload(master, data, master.config.batch_bytes, damaged_at=77)
    try:
        assert isinstance(result, protocol.ChecksumMismatch), result
        assert "arrived damaged" in result.message
        assert session.checksum_failed == {"a", "b"}
        # No node stored a chunk of the damaged first batch (the intact second one is garbage to collect).
        for node in upload_nodes.values():
            assert all(first >= stream.session.chunks_per_batch
                       for first, _ in node.store.inventory().get(stream.blob, [])), node.store.inventory()
    finally:
        session.close()


def test_byte_damaged_between_master_and_node_is_healed_from_the_intact_copy(upload_nodes):
    """A byte changed on the master->node hop: that node refuses the batch (client CRCs), is dropped from
    the upload, and the batch is re-copied from the replica that took it before the commit."""
    def flip_payload_byte(frame: bytearray) -> None:
        frame[-100] ^= 0x40

    upload_healed_from_b(upload_nodes, flip_payload_byte, random.Random(SEED + 42), digests=False)


def upload_healed_from_b(upload_nodes, flip, rng, digests: bool) -> None:
    """Upload one batch with client CRCs while ``flip`` damages node a's PUT_CHUNKS: a refuses it and the
    batch ends up on b and c (re-copied from b), reading back intact."""
    master = UploadMaster(upload_nodes, damaged={"a": flip})
    data = rng.randbytes(master.config.batch_bytes)
    session, stream, entry = client_crc_upload(master, data, master.config.batch_bytes, digests=digests)
    try:
        assert session.failed == {"a"} and session.checksum_failed == {"a"}
        assert entry["runs"] == [[0, entry["chunks"], ["b", "c"]]]
        assert read_all(master, entry) == data
    finally:
        session.close()


def counting_verify_chunks(monkeypatch) -> list:
    """Count the chunks the nodes check one by one (chunk_store's per-chunk check); returns the counter."""
    checked = [0]
    real = chunk_store.verify_chunks

    def verify(payload, crc_bytes, chunk_size):
        checked[0] += len(crc_bytes) // protocol.CRC_BYTES
        return real(payload, crc_bytes, chunk_size)
    monkeypatch.setattr(chunk_store, "verify_chunks", verify)
    return checked


def test_client_digests_spare_the_nodes_the_per_chunk_check(upload_nodes, monkeypatch):
    """Batch-sized DATA with digests: the master forwards them, the nodes check each batch with two CRC32s
    instead of every chunk, store the client's bytes and CRCs, and frames not aligned with batches still
    get the per-chunk check."""
    checked = counting_verify_chunks(monkeypatch)
    master = UploadMaster(upload_nodes)
    batch = master.config.batch_bytes
    data = random.Random(SEED + 43).randbytes(2 * batch + 3000)
    session, stream, entry = client_crc_upload(master, data, batch, digests=True)
    try:
        assert session.failed == set() and checked[0] == 0
        for node_id in ("a", "b"):
            assert read_all(master, {**entry, "runs": [[0, entry["chunks"], [node_id]]]}) == data
    finally:
        session.close()
    checked[0] = 0  # the reads above checked chunks too
    session, stream, entry = client_crc_upload(master, data, 3 * batch // 4 // CS * CS, digests=True)
    try:
        assert session.failed == set() and checked[0] == 2 * entry["chunks"]  # two replicas, every chunk
    finally:
        session.close()


@pytest.mark.parametrize("where", ["payload", "crcs"])
def test_byte_damaged_between_master_and_node_is_caught_by_the_digests(upload_nodes, where):
    """With the client's digests (no per-chunk check), a byte changed on the master->node hop in the payload
    or in the chunk CRCs is refused by that node, and the batch is re-copied from the intact replica."""
    batch_chunks = config_module.load_config(None).batch_bytes // CS

    def flip(frame: bytearray) -> None:
        # Chunk 500 of 1024: neither the last chunk nor, for this seed, the sampled one.
        at = len(frame) - (batch_chunks - 500) * CS if where == "payload" else \
            len(frame) - batch_chunks * CS - (batch_chunks - 500) * protocol.CRC_BYTES
        frame[at] ^= 0x40

    sampled = zlib.crc32(random.Random(SEED + 44).randbytes(batch_chunks * CS)) % batch_chunks
    assert sampled not in (500, batch_chunks - 1)
    upload_healed_from_b(upload_nodes, flip, random.Random(SEED + 44), digests=True)


def test_a_client_whose_crcs_disagree_with_its_own_payload_is_caught_by_the_sample(tmp_path):
    """Digests that match but a chunk CRC computed wrongly by the sender: the sampled chunk is refused."""
    payload = random.Random(SEED + 45).randbytes(8 * CS)
    crcs = bytearray(protocol.crcs_to_bytes(protocol.chunk_crcs(payload, CS)))
    sampled = zlib.crc32(payload) % 8
    crcs[sampled * 4] ^= 1  # the sender's bug: its CRC of that chunk is wrong from the start
    with chunk_store.ChunkStore(str(tmp_path)) as store:
        with pytest.raises(protocol.ChecksumMismatch):
            store.put("b", 0, 8, CS, crcs, payload, sent_digests=(zlib.crc32(payload), zlib.crc32(crcs)))
        assert store.inventory() == {}


def test_client_crcs_must_cover_whole_chunks_of_every_frame(upload_nodes):
    """A frame of an upload with client CRCs that lacks them, has too few, or follows a frame that ended
    mid-chunk is refused as a protocol error."""
    master = UploadMaster(upload_nodes)
    session = transfers.UploadSession(master)
    try:
        stream = transfers.UploadStream(session, "f", client_crcs=True)
        with pytest.raises(protocol.RemoteProtocolError):
            stream.crcs_for(CS)  # no DATA_CRCS
        stream.take_crcs(b"\0" * 4)
        with pytest.raises(protocol.RemoteProtocolError):
            stream.take_crcs(b"\0" * 4)  # two in a row
        with pytest.raises(protocol.RemoteProtocolError):
            stream.crcs_for(2 * CS)  # too few
        stream.take_crcs(b"\0" * 4)
        stream.crcs_for(100)
        stream.write(b"x" * 100)  # a short frame: only the last one may be
        stream.take_crcs(b"\0" * 4)
        with pytest.raises(protocol.RemoteProtocolError):
            stream.crcs_for(CS)
        with pytest.raises(protocol.RemoteProtocolError):
            stream.seal("not a sha-256")
        stream.discard()
    finally:
        session.close()


def test_a_put_blobs_that_finds_too_few_nodes_leaves_no_copy_uncollected(upload_nodes):
    """A PUT_BLOBS stored on one node whose second replica cannot be placed fails the batch: discarding its
    streams must collect what that node stored (as a PUT_CHUNKS's would be), not leave it as an orphan."""
    class BlobsConn(UploadConn):
        def answer(self, msg):
            if isinstance(msg, protocol.PutBlobs):
                return self.node.put_blobs(protocol.read_message(io.BytesIO(protocol.encode(msg))))
            return super().answer(msg)

    class DeadB(UploadPool):
        def acquire(self, node_id):
            if node_id == "b":
                raise protocol.Unavailable("node b: connection refused")
            return BlobsConn(self.nodes[node_id])

    master = UploadMaster({n: upload_nodes[n] for n in ("a", "b")})
    master.pool = DeadB(master.pool.nodes, {})
    collected = []
    master.collect_garbage = lambda blob, node_ids: collected.append((blob, set(node_ids)))
    session = transfers.UploadSession(master)
    try:
        data = b"x" * 3000
        stream = transfers.UploadStream(session, "small", client_crcs=True)
        with pytest.raises(protocol.InsufficientNodes):
            session.send_small_files([(stream, protocol.crcs_to_bytes(protocol.chunk_crcs(data, CS)), data)])
        assert upload_nodes["a"].store.has(stream.blob, 0, 3)  # a took it before b was found dead
        stream.discard()
        assert collected == [(stream.blob, {"a", "b"})]
    finally:
        session.close()
