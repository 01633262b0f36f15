"""The master's data path: streaming uploads to nodes and range reads back.

Upload (``UploadStream``): the client's bytes land, without a copy, in one
batch buffer laid out as ``[room for CRCs][payload]``.  When a batch is full
the master computes one CRC32 per chunk, writes the CRCs just in front of
the payload, and sends that contiguous slice as the body of one PUT_CHUNKS
to each of the batch's replicas.  Replies are read lazily, up to
``ACK_WINDOW`` batches behind, so the nodes write while the master reads
the next batch.  ``finish`` drains the replies, sends FLUSH (fsync) to every
node touched, and returns the file entry: only then may it be committed.
Memory per upload is one batch buffer, whatever the file size.

Read (``read_range``): for each batch-sized piece of the requested range,
ask a replica for the chunks, verify every CRC, and yield the payload; on
an error, a timeout or a bad CRC, fail over to the next replica.

Left out here: replacing a node that fails mid-upload (the upload fails and
the client retries) and prefetching the next piece while the current one is
sent to the client.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import deque

import protocol
from namespace import add_run, make_entry

logger = logging.getLogger("master.transfers")

# Batches sent to a node whose PUT_OK has not been read yet.  Enough to keep
# both the network and the node's disk busy; bounded so a dead node is
# noticed within a few batches.
ACK_WINDOW = 8


class UploadStream:
    """One file being uploaded: batching, CRCs, replica sends, flush.

    Use: ``free_space()`` / ``filled(n)`` to receive data in place (or
    ``write(data)`` to copy), then ``finish(client_sha256)`` -> entry, and
    ``close()`` in every case.  Raises BackupError subclasses; after one the
    stream is dead and only ``close()`` may be called.
    """

    def __init__(self, master, name: str):
        self.master = master
        self.name = name
        config = master.config
        self.blob = uuid.uuid4().hex
        self.chunk_size = config.chunk_size_bytes
        self.chunks_per_batch = config.chunks_per_batch
        self.batch_payload_bytes = self.chunks_per_batch * self.chunk_size
        self._crc_room = self.chunks_per_batch * protocol.CRC_BYTES
        self._buffer = bytearray(self._crc_room + self.batch_payload_bytes)
        self._view = memoryview(self._buffer)
        self._fill = 0
        self._next_chunk = 0
        self.size = 0
        self._sha = hashlib.sha256()
        self.runs: list = []
        self._conns: dict[str, object] = {}
        self._unacked: dict[str, deque] = {}
        self.nodes_touched: set[str] = set()
        self._reserved: dict[str, int] = {}
        self.committed = False

    # --- receiving ---------------------------------------------------------------
    def free_space(self) -> memoryview:
        """Where the next bytes of the file should be read to (never empty)."""
        return self._view[self._crc_room + self._fill:]

    def filled(self, nbytes: int) -> None:
        """``nbytes`` were written into ``free_space()``."""
        self._fill += nbytes
        if self._fill == self.batch_payload_bytes:
            self._ship()

    def write(self, data) -> None:
        """Copy ``data`` in (for frames that did not fit the free space)."""
        data = memoryview(data)
        while len(data):
            space = self.free_space()
            take = min(len(space), len(data))
            space[:take] = data[:take]
            data = data[take:]
            self.filled(take)

    # --- sending -----------------------------------------------------------------
    def _ship(self) -> None:
        payload = self._view[self._crc_room:self._crc_room + self._fill]
        self._sha.update(payload)
        crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(payload, self.chunk_size))
        count = len(crcs) // protocol.CRC_BYTES
        start = self._crc_room - len(crcs)
        self._view[start:self._crc_room] = crcs
        body = self._view[start:self._crc_room + self._fill]
        targets = self.master.choose_replicas(self._fill, avoid=())
        msg = protocol.PutChunks(blob=self.blob, first=self._next_chunk, count=count,
                                 chunk_size=self.chunk_size, body=body)
        for node_id in targets:
            conn = self._conn(node_id)
            self.master.reserve(node_id, self._fill)
            self._reserved[node_id] = self._reserved.get(node_id, 0) + self._fill
            try:
                conn.send(msg)
            except protocol.BackupError as exc:
                raise self._node_failed(node_id, exc) from None
            self._unacked[node_id].append(self._next_chunk)
            if len(self._unacked[node_id]) > ACK_WINDOW:
                self._read_ack(node_id)
        add_run(self.runs, self._next_chunk, count, targets)
        self._next_chunk += count
        self.size += self._fill
        self._fill = 0

    def _conn(self, node_id: str):
        conn = self._conns.get(node_id)
        if conn is None:
            try:
                conn = self.master.pool.acquire(self.master.node_address(node_id))
            except protocol.BackupError as exc:
                raise self._node_failed(node_id, exc) from None
            self._conns[node_id] = conn
            self._unacked[node_id] = deque()
            self.nodes_touched.add(node_id)
        return conn

    def _read_ack(self, node_id: str) -> None:
        first = self._unacked[node_id].popleft()
        try:
            ack = self._conns[node_id].expect(protocol.PutOk)
        except (protocol.Unavailable, protocol.Timeout, protocol.RemoteProtocolError) as exc:
            raise self._node_failed(node_id, exc) from None
        if ack.blob != self.blob or ack.first != first:
            self._conns[node_id].broken = True
            raise protocol.RemoteProtocolError(f"node {node_id} acknowledged the wrong batch")

    def _node_failed(self, node_id: str, exc: protocol.BackupError) -> protocol.BackupError:
        """The error an upload fails with when a replica fails mid-upload."""
        self.master.note_node_failure(node_id, exc)
        if isinstance(exc, (protocol.InsufficientSpace, protocol.ChecksumMismatch)):
            return exc
        return protocol.Unavailable(f"storage node {node_id} failed during the upload: {exc.message}")

    def finish(self, client_sha256: str) -> dict:
        """Ship the last batch, wait until every chunk is durable, return the entry.

        Raises ChecksumMismatch if the client's SHA-256 differs from what the
        master received (the upload is then not committed).
        """
        if self._fill:
            self._ship()
        for node_id in list(self._conns):
            while self._unacked[node_id]:
                self._read_ack(node_id)
        # FLUSH every node at once, then collect: the fsyncs overlap.
        for node_id, conn in self._conns.items():
            try:
                conn.send(protocol.Flush())
            except protocol.BackupError as exc:
                raise self._node_failed(node_id, exc) from None
        for node_id, conn in self._conns.items():
            try:
                conn.expect(protocol.Flushed)
            except protocol.BackupError as exc:
                raise self._node_failed(node_id, exc) from None
        sha256 = self._sha.hexdigest()
        if client_sha256 != sha256:
            raise protocol.ChecksumMismatch(
                f"upload of {self.name!r} arrived corrupted: client SHA-256 {client_sha256[:16]}..., "
                f"master received {sha256[:16]}...")
        return make_entry(self.size, self.chunk_size, sha256, self.blob, self.runs)

    def close(self) -> None:
        """Return connections; if nothing was committed, collect the chunks sent."""
        for node_id, conn in self._conns.items():
            if self._unacked.get(node_id):
                conn.broken = True  # replies still in flight: the stream is out of sync
            self.master.pool.release(conn)
        self._conns.clear()
        for node_id, nbytes in self._reserved.items():
            self.master.reserve(node_id, -nbytes)
        self._reserved.clear()
        if not self.committed and self.nodes_touched:
            self.master.collect_garbage(self.blob, self.nodes_touched)


def plan_pieces(entry: dict, offset: int, length: int, chunks_per_batch: int):
    """Yield (first_chunk, count, node_ids, skip, take) covering [offset, offset+length).

    ``skip`` bytes of the piece's payload come before the range, ``take``
    bytes belong to it.  Pieces never span two runs and hold at most
    ``chunks_per_batch`` chunks.
    """
    if length <= 0:
        return
    chunk_size = entry["chunk_size"]
    first_needed = offset // chunk_size
    last_needed = (offset + length - 1) // chunk_size
    position = offset
    end = offset + length
    for run_first, run_count, node_ids in entry["runs"]:
        run_last = run_first + run_count - 1
        if run_last < first_needed or run_first > last_needed:
            continue
        chunk = max(run_first, first_needed)
        stop = min(run_last, last_needed)
        while chunk <= stop:
            count = min(chunks_per_batch, stop - chunk + 1)
            piece_start = chunk * chunk_size
            skip = position - piece_start
            take = min(end, (chunk + count) * chunk_size) - position
            yield chunk, count, node_ids, skip, take
            position += take
            chunk += count


def read_range(master, name: str, entry: dict, offset: int, length: int):
    """Yield memoryviews of the bytes [offset, offset+length) of a file.

    Each view is valid until the next one is requested.  Raises DataLost if
    every replica of some piece is corrupt or missing, Unavailable if none
    could be reached.
    """
    chunks_per_batch = master.config.chunks_per_batch
    buffer = bytearray(chunks_per_batch * (entry["chunk_size"] + protocol.CRC_BYTES))
    for first, count, node_ids, skip, take in plan_pieces(entry, offset, length, chunks_per_batch):
        payload = _read_piece(master, name, entry, first, count, node_ids, buffer)
        yield payload[skip:skip + take]


def _read_piece(master, name, entry, first, count, node_ids, buffer) -> memoryview:
    failures = []
    unreachable = 0
    for node_id in master.read_order(node_ids):
        try:
            conn = master.pool.acquire(master.node_address(node_id))
        except protocol.BackupError as exc:
            failures.append(f"{node_id}: {exc.message}")
            unreachable += 1
            master.note_node_failure(node_id, exc)
            continue
        try:
            reply = conn.request(protocol.GetChunks(blob=entry["version"], first=first, count=count),
                                 protocol.ChunkData, body_buffer=buffer)
            crc_bytes, payload = protocol.split_chunk_body(reply.body, count)
            bad = protocol.verify_chunks(payload, crc_bytes, entry["chunk_size"])
            if reply.chunk_size != entry["chunk_size"] or bad >= 0 or len(payload) > count * entry["chunk_size"]:
                raise protocol.ChecksumMismatch(f"chunk {first + max(bad, 0)} failed its CRC in transit")
            return payload
        except (protocol.ChecksumMismatch, protocol.ChunkNotFound) as exc:
            failures.append(f"{node_id}: {exc.message}")
            master.note_bad_replica(node_id, name, entry, first, count, exc)
        except protocol.BackupError as exc:
            failures.append(f"{node_id}: {exc.message}")
            unreachable += 1
            master.note_node_failure(node_id, exc)
        finally:
            master.pool.release(conn)
    detail = "; ".join(failures) or "no replica recorded"
    if unreachable:
        raise protocol.Unavailable(f"{name!r}: chunks {first}..{first + count - 1} unreachable ({detail})")
    raise protocol.DataLost(f"{name!r}: chunks {first}..{first + count - 1} lost on every replica ({detail})")
