"""The master's read path against real StorageNode objects over an in-process transport.

Each replica is a ``StorageNode`` with its own chunk store on tmp_path (no
threads, no sockets); every request and reply goes through protocol.encode
and protocol.read_message, so the wire form of CHUNK_DATA's missing/corrupt
lists is exercised too.  Bytes are flipped on disk with conftest.flip_byte.
"""

import io
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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

    def send(self, msg):
        try:
            reply = self.node.get(msg)
        except protocol.BackupError as exc:
            reply = protocol.error_message(exc)
        self.replies.append(protocol.encode(reply))

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
