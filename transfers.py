"""The master's data path: streaming uploads to nodes and range reads back.

Upload (``UploadSession``, ``UploadStream``): the client's bytes land,
without a copy, in one of the session's two batch buffers.  If the client
sent the CRCs of its chunks (Data.crcs, the CLI's default), a full batch
goes with them, in the room left before it in the same buffer, as the body
of one PUT_CHUNKS to each of its replicas; the nodes check the bytes against
them and the master hashes nothing (docs/PROTOCOL.md, "Who checks what").
Otherwise the master sends the batch as it is, the body of one PUT_CHUNKS with
``node_crcs``, to each of the batch's replicas, and receives the next batch
into the other buffer, while a worker thread (``BatchWorker``) adds the
batch to the file's SHA-256 and computes its CRC32 per chunk.  Each node
computes the CRCs too, stores them with the chunks, and returns a digest
of them in PUT_OK; the master compares it with its own before the commit,
so the CRCs protect the chunks from the moment they are cut, across the hop
to the node, and then at rest (the node's check against what the master
cut, just done in the opposite order: see docs/PROTOCOL.md).  Hashing and
forwarding thus overlap instead of adding up (hashlib and the sockets release
the GIL); a batch smaller than OFFLOAD_BYTES is hashed inline.  Replies are
read lazily, up to ``ACK_WINDOW_BYTES`` (or ``ACK_WINDOW_BATCHES``) behind, so the nodes write while
the master reads the next batch.  ``seal`` returns the file entry;
``UploadSession.sync`` drains the replies and sends FLUSH (fsync) to every
node touched: only then may the entry be committed.  Memory per client
connection is at most two batch buffers (one if it only uploads small
files), whatever the file size or the number of files.

Read (``read_range``): for each batch-sized piece of the requested range,
ask a replica for the chunks, verify every CRC, and yield the payload; on
an error or a timeout, fail over to the next replica.  Bad copies are
handled per chunk, not per piece: the chunks a replica cannot serve intact
(it says they are missing or corrupt, or their CRC fails here) are reported
to the master, which takes that replica off just those chunks, and only
those chunks are fetched from the next replica (``read_piece``).  So a
file stays readable while every chunk has one good copy somewhere, even if
no replica holds a whole piece intact.

A node that fails or hangs mid-upload does not fail the upload: the session
marks it failed, places later batches elsewhere, and before commit re-copies
the batches it held from their surviving replica (``heal_entry``).

Left out here: prefetching the next piece while the current one is sent to
the client.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import zlib
from collections import deque

import protocol
from namespace import add_run, first_covering, make_entry, merge_ranges, run_blob, set_run_nodes, uncovered
from notes import note_size

logger = logging.getLogger("master.transfers")

# Bytes of batches sent to a node whose PUT_OK has not been read yet.  Enough
# to keep both the network and the node's disk busy; bounded so a dead node
# is noticed within a few batches.  Counted in bytes, not batches: small
# files are one small batch each, and a window of 8 of them made the master
# wait for a node's round trip every 8 files.
ACK_WINDOW_BYTES = 8 * 1024 * 1024
# ... and in batches, so the PUT_OKs a node may have queued (~100 bytes each)
# stay far below what a socket buffers: a node blocked writing replies the
# master does not read would stop reading the master's batches.
ACK_WINDOW_BATCHES = 64
# Pieces a download requests ahead of the one it is sending.
READ_AHEAD = 4
# Small pieces (a directory restore's small files, one piece each) go
# further ahead: up to READ_AHEAD_SMALL pieces while the bytes ahead stay
# within READ_AHEAD_SMALL_BYTES, requested in bursts (once half of them have
# arrived, fill up again) whose requests leave in one send per node, so a
# small file costs neither a send nor a node wake-up of its own.  A piece of
# a large file (about 1 MiB) never fits: its window stays READ_AHEAD.
READ_AHEAD_SMALL = 64
READ_AHEAD_SMALL_BYTES = 256 * 1024
# Batches at least this large are hashed by the session's worker thread while
# the handler forwards them and receives the next one; smaller ones (a small
# file's only batch) inline, where handing them to a thread would cost more
# than the ~1 microsecond per KiB the work takes.
OFFLOAD_BYTES = 64 * 1024


class BatchDigest:
    """A batch's SHA-256 update and the digest of its chunk CRCs (protocol.crcs_digest).

    ``run`` does the work (in the worker thread or inline); ``result``
    waits for it and returns the digest, or raises what it raised.
    """

    def __init__(self, sha, payload: memoryview, chunk_size: int):
        self.sha = sha
        self.payload = payload
        self.chunk_size = chunk_size
        self.digest: int | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.sha.update(self.payload)
            self.digest = protocol.crcs_digest(protocol.crcs_to_bytes(
                protocol.chunk_crcs(self.payload, self.chunk_size)))
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits in result()
            self.error = exc
        finally:
            self.payload = None  # the buffer is free again
            self.done.set()

    def result(self) -> int:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.digest


class BatchWorker:
    """One thread that runs a session's BatchDigests in submission order (the SHA-256 needs it)."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="upload-digests", daemon=True)
        self._thread.start()

    def submit(self, job: BatchDigest) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()

    def stop(self) -> None:
        """Let the thread end once the jobs already submitted are done."""
        self._jobs.put(None)


class NodeChannel:
    """One connection to a node inside an upload session, with its pending acks."""

    def __init__(self, node_id: str, conn):
        self.node_id = node_id
        self.conn = conn
        self.unacked: deque = deque()  # (blob, first, payload bytes, BatchDigest) of each PUT_CHUNKS not yet acknowledged
        self.unacked_bytes = 0  # their payload bytes
        self.dirty = False  # written since the last FLUSH


class UploadSession:
    """The uploads of one client connection: batch buffers and node channels.

    Uploads on one connection run one after another, so they share their
    batch buffers (no allocation per file; a second one is filled while the
    worker still reads the first, allocated once a batch is large enough to
    go to the worker) and one connection per node (PUT_OK replies come back
    in send order).  ``sync`` makes everything sent so far
    durable with one FLUSH per node, so a group of small files costs one
    fsync per node, not one per file.

    A node that fails or hangs (past io_timeout_s) mid-upload is marked
    failed for the session: later batches go to other nodes, and
    ``heal_entry`` re-copies what the failed node held from the surviving
    replica before the file is committed.  So an upload survives the loss of
    a replica, as long as ``replication`` live nodes remain.
    """

    def __init__(self, master):
        self.master = master
        config = master.config
        self.chunk_size = config.chunk_size_bytes
        self.chunks_per_batch = config.chunks_per_batch
        self.batch_payload_bytes = self.chunks_per_batch * self.chunk_size
        self.crc_room = self.chunks_per_batch * protocol.CRC_BYTES
        # The second buffer is allocated when a batch first goes to the worker.
        # Each has crc_room in front of the payload, where the client's CRCs
        # of a batch go to make the PUT_CHUNKS body (CRCs, then payload) in place.
        self._frames: list[memoryview | None] = [self._new_frame(), None]
        self._buffers: list[memoryview | None] = [self._frames[0][self.crc_room:], None]
        self._readers: list[BatchDigest | None] = [None, None]  # the digest still reading each buffer
        self._last: BatchDigest | None = None  # the last one given to the worker
        self._current = 0
        self._worker: BatchWorker | None = None
        self.channels: dict[str, NodeChannel] = {}
        self.reserved: dict[str, int] = {}  # node -> bytes sent whose PUT_OK is not read yet
        self.failed: set[str] = set()
        self.space_failed: set[str] = set()  # failed nodes that answered INSUFFICIENT_SPACE
        self.checksum_failed: set[str] = set()  # failed nodes that found chunks unlike the client's CRCs
        self._copy_buffer: bytearray | None = None

    def _new_frame(self) -> memoryview:
        return memoryview(bytearray(self.crc_room + self.batch_payload_bytes))

    @property
    def buffer_bytes(self) -> int:
        """Bytes of batch buffers this session holds."""
        return sum(len(b) for b in self._buffers if b is not None)

    @property
    def view(self) -> memoryview:
        """The batch buffer to fill: nothing else reads it."""
        return self._buffers[self._current]

    def digest(self, sha, payload: memoryview) -> BatchDigest:
        """Start hashing a batch filled in ``view``: in the worker thread if it is large, else now.

        Never inline while the worker still has a batch: the SHA-256 must
        see the batches in order.
        """
        job = BatchDigest(sha, payload, self.chunk_size)
        if len(payload) < OFFLOAD_BYTES and (self._last is None or self._last.done.is_set()):
            job.run()
            return job
        if self._worker is None:
            self._worker = BatchWorker()
        self._readers[self._current] = self._last = job
        self._worker.submit(job)
        return job

    def next_buffer(self) -> None:
        """The batch in ``view`` is shipped: make ``view`` a buffer nothing reads.

        A batch hashed inline left its buffer free already.  One the worker
        still reads makes the session fill the other buffer next, once the
        worker is done with that one.
        """
        if self._readers[self._current] is None:
            return
        self._current ^= 1
        if self._buffers[self._current] is None:
            self._frames[self._current] = self._new_frame()
            self._buffers[self._current] = self._frames[self._current][self.crc_room:]
        reader, self._readers[self._current] = self._readers[self._current], None
        if reader is not None:
            reader.done.wait()

    def chunk_body(self, crc_bytes, nbytes: int) -> memoryview:
        """The PUT_CHUNKS body of the ``nbytes`` filled in ``view``: ``crc_bytes`` put just before them."""
        frame, start = self._frames[self._current], self.crc_room - len(crc_bytes)
        frame[start:self.crc_room] = crc_bytes
        return frame[start:self.crc_room + nbytes]

    def _fail(self, node_id: str, exc: protocol.BackupError) -> None:
        self.failed.add(node_id)
        if isinstance(exc, protocol.InsufficientSpace):
            self.space_failed.add(node_id)
        if isinstance(exc, protocol.ChecksumMismatch):
            self.checksum_failed.add(node_id)
        channel = self.channels.get(node_id)
        if channel is not None:
            channel.conn.broken = True
        self.master.note_node_failure(node_id, exc)

    def send(self, node_id: str, msg: protocol.PutChunks | protocol.PutBlobs, nbytes: int,
             digest: BatchDigest | None = None) -> bool:
        """Send one batch to a node; False (and the node marked failed) if it fails.

        ``digest``: for a PUT_CHUNKS with ``node_crcs``, what its PUT_OK must match.
        A PUT_BLOBS is acknowledged by a PUT_OK naming its first item.
        """
        if node_id in self.failed:
            return False
        try:
            channel = self.channels.get(node_id)
            if channel is None:
                conn = self.master.pool.acquire(node_id)
                channel = self.channels[node_id] = NodeChannel(node_id, conn)
            self.master.reserve(node_id, nbytes)
            self.reserved[node_id] = self.reserved.get(node_id, 0) + nbytes
            channel.conn.send(msg)
            if isinstance(msg, protocol.PutBlobs):
                channel.unacked.append((msg.blobs[0][0], msg.blobs[0][1], nbytes, digest))
            else:
                channel.unacked.append((msg.blob, msg.first, nbytes, digest))
            channel.unacked_bytes += nbytes
            channel.dirty = True
            while len(channel.unacked) > 1 and (channel.unacked_bytes > ACK_WINDOW_BYTES or
                                                len(channel.unacked) > ACK_WINDOW_BATCHES):
                self._read_ack(channel)
        except protocol.BackupError as exc:
            self._fail(node_id, exc)
            return False
        return True

    def _read_ack(self, channel: NodeChannel) -> None:
        blob, first, nbytes, digest = channel.unacked.popleft()
        channel.unacked_bytes -= nbytes
        ack = channel.conn.expect(protocol.PutOk)
        if ack.blob != blob or ack.first != first:
            raise protocol.RemoteProtocolError(f"node {channel.node_id} acknowledged the wrong batch")
        # Stored: from now on the node's reports count it, not our reservation.
        self.reserved[channel.node_id] -= nbytes
        self.master.note_stored(channel.node_id, ack.seq, nbytes)
        if digest is not None and ack.crcs_crc32 != digest.result():
            # The node stores CRCs of other bytes than the ones cut here:
            # damaged on the way or in its memory.  Its copy is not counted.
            raise protocol.ChecksumMismatch(f"node {channel.node_id} stored chunks {first}.. of blob {blob} "
                                            f"whose CRCs differ from those of the data sent")

    def drain(self, node_ids) -> None:
        """Read every outstanding PUT_OK of ``node_ids`` (a node that fails is marked failed).

        Once this returns, each healthy node has applied every batch sent to
        it, so a DELETE_BLOBS sent afterwards cannot be overtaken by one of
        them (which would leave its chunks behind as an orphan).
        """
        for node_id in node_ids:
            channel = self.channels.get(node_id)
            if channel is None or node_id in self.failed:
                continue
            try:
                while channel.unacked:
                    self._read_ack(channel)
            except protocol.BackupError as exc:
                self._fail(node_id, exc)

    def place(self, msg, nbytes: int, touched: set, digest: BatchDigest | None = None) -> list[str]:
        """Send one batch to ``replication`` healthy nodes; the nodes that took it.

        A node that fails is replaced by another; raises InsufficientNodes
        (or InsufficientSpace) once no healthy node is left.  Every node
        tried joins ``touched``, so what a failed one may have written is
        collected if the upload is not committed.
        """
        placed: list[str] = []
        wanted = self.master.config.replication
        while len(placed) < wanted:
            for node_id in self.choose_replicas(nbytes, avoid=self.failed | set(placed), count=wanted - len(placed)):
                touched.add(node_id)
                if self.send(node_id, msg, nbytes, digest):
                    placed.append(node_id)
        return placed

    def send_small_files(self, files) -> None:
        """Send many small whole files as PUT_BLOBS, each to ``replication`` nodes.

        ``files``: (stream, crc bytes, payload) of new UploadStreams, each
        file's CRCs cut at the session's chunk size.  Each file stays a blob
        of its own (its own version, records of at most one batch each, as
        ``UploadStream._ship`` would lay them out); only the request is
        shared, one per batch's worth of payload, so a node reads it into
        one of its batch buffers.  Afterwards each stream holds its runs,
        size and touched nodes, ready for ``UploadStream.file_entry``.
        """
        batch, chunk_size = self.chunks_per_batch, self.chunk_size
        request: list = []  # (stream, first, count, crcs, payload) of each item of the next PUT_BLOBS
        request_bytes = 0
        for stream, crcs, payload in files:
            stream.size = len(payload)
            count = -(-len(payload) // chunk_size)
            for first, n in batch_pieces(0, count, batch):
                piece = payload[first * chunk_size:(first + n) * chunk_size]
                if request and request_bytes + len(piece) > self.batch_payload_bytes:
                    self._put_blobs(request, request_bytes)
                    request, request_bytes = [], 0
                request.append((stream, first, n, crcs[first * protocol.CRC_BYTES:(first + n) * protocol.CRC_BYTES],
                                piece))
                request_bytes += len(piece)
        if request:
            self._put_blobs(request, request_bytes)

    def _put_blobs(self, request: list, nbytes: int) -> None:
        items, parts = [], []
        for stream, first, count, crcs, piece in request:
            items.append([stream.blob, first, count, len(piece)])
            parts += (crcs, piece)
        msg = protocol.PutBlobs(blobs=items, chunk_size=self.chunk_size, body=b"".join(parts), **self.master.fence())
        touched: set[str] = set()
        try:
            placed = self.place(msg, nbytes, touched)
        finally:
            # Also when placement fails: the nodes that took the request hold its
            # items, which UploadStream.discard collects only from nodes_touched.
            for stream, *_ in request:
                stream.nodes_touched |= touched
        for stream, first, count, _crcs, _piece in request:
            add_run(stream.runs, first, count, placed)

    def choose_replicas(self, nbytes: int, avoid, count: int) -> list[str]:
        """``master.choose_replicas``; a shortage due to nodes that ran out of space is INSUFFICIENT_SPACE.

        Nodes that failed in this session are avoided, so when those that
        answered INSUFFICIENT_SPACE leave too few, the cause is space, not
        the number of nodes alive.
        """
        try:
            return self.master.choose_replicas(nbytes, avoid=avoid, count=count)
        except protocol.InsufficientNodes as exc:
            if not self.space_failed:
                raise
            raise protocol.InsufficientSpace(
                f"out of space: node(s) {', '.join(sorted(self.space_failed))} ran out of disk space "
                f"during the upload, and the others cannot take the rest ({exc.message})") from None

    def sync(self, node_ids, describe: dict | None = None) -> None:
        """Make every chunk sent to ``node_ids`` durable, or mark the node failed.

        Drains the acknowledgements, then sends FLUSH to every dirty node
        before reading any FLUSHED, so the nodes' fsyncs overlap.
        ``describe`` (node id -> file descriptions, notes.describe) goes in
        DESCRIBE frames just before a node's FLUSH, which makes them durable
        with the chunks: no extra round trip.
        """
        channels = [c for c in self.channels.values()
                    if c.dirty and c.node_id in node_ids and c.node_id not in self.failed]
        flushing = []
        fence = self.master.fence()
        for channel in channels:
            try:
                while channel.unacked:
                    self._read_ack(channel)
                items = (describe or {}).get(channel.node_id)
                pages = [page for page, _ in protocol.pages(items, size=note_size)] if items else []
                for page in pages:
                    channel.conn.send(protocol.Describe(items=page, **fence), flush=False)
                channel.conn.send(protocol.Flush())
                flushing.append((channel, len(pages)))
            except protocol.BackupError as exc:
                self._fail(channel.node_id, exc)
        for channel, pages in flushing:
            try:
                for _ in range(pages):
                    channel.conn.expect(protocol.Described)
                channel.conn.expect(protocol.Flushed)
                channel.dirty = False
            except protocol.BackupError as exc:
                self._fail(channel.node_id, exc)

    def heal_entry(self, name: str, entry: dict, nodes_touched: set) -> dict:
        """``entry`` with every copy this upload made on a failed node re-made on a healthy one.

        Call after ``sync``: the surviving copies are durable, and each piece
        is read from one of them (CRCs checked), written and flushed to a new
        node.  Only the chunks of the upload's own blob (the entry's version)
        are healed: chunks an append or write kept from the previous version
        are placed as repair last decided, which the commit re-bases on
        (namespace.rebase_entry), and repair re-replicates them if the node
        is gone.  Raises Unavailable if a piece has no surviving copy, or
        InsufficientNodes/Space if no node can take the copy.
        """
        runs = entry["runs"]
        own = [run for run in runs if run_blob(entry, run) == entry["version"]]
        if not any(n in self.failed for run in own for n in run[2]):
            return entry
        batch = entry["batch_chunks"]
        if self._copy_buffer is None:
            self._copy_buffer = bytearray(self.crc_room + self.batch_payload_bytes)
        for run in own:
            first, count, nodes = run[:3]
            blob = entry["version"]
            lost = [n for n in nodes if n in self.failed]
            if not lost:
                continue
            live = [n for n in nodes if n not in self.failed]
            if not live:
                what = f"{name!r} chunks {first}..{first + count - 1}"
                if all(n in self.space_failed for n in lost):
                    raise protocol.InsufficientSpace(f"no room for {what}: node(s) {', '.join(lost)} "
                                                     f"ran out of disk space during the upload")
                if all(n in self.checksum_failed for n in lost):
                    # Every replica found other bytes than the client's CRCs describe:
                    # damaged before the copies parted, between the client and the master.
                    raise protocol.ChecksumMismatch(f"upload of {what} arrived damaged: the nodes found "
                                                    f"bytes that differ from the client's CRCs")
                raise protocol.Unavailable(f"every replica of {what} failed during the upload")
            for piece_first, piece_count in batch_pieces(first, count, batch):
                body = read_piece(self.master, name, entry, blob, piece_first, piece_count, live, self._copy_buffer)
                payload_bytes = len(body) - piece_count * protocol.CRC_BYTES
                targets = self.choose_replicas(payload_bytes, avoid=self.failed | set(nodes), count=len(lost))
                for target in targets:
                    nodes_touched.add(target)
                    put_piece(self.master, target, entry, blob, piece_first, piece_count, body)
                runs = set_run_nodes(runs, piece_first, piece_count, live + targets)
        logger.info("upload of %r: re-copied the batches of failed node(s) %s", name, ",".join(sorted(self.failed)))
        return {**entry, "runs": runs}

    def close(self) -> None:
        """Return healthy connections to the pool; release space reservations; stop the worker."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        for channel in self.channels.values():
            if channel.unacked:
                channel.conn.broken = True  # replies still in flight: out of sync
            self.master.pool.release(channel.conn)
        self.channels.clear()
        for node_id, nbytes in self.reserved.items():
            self.master.reserve(node_id, -nbytes)
        self.reserved.clear()


def batch_pieces(first: int, count: int, batch: int):
    """Split [first, first+count) at multiples of ``batch``: (first, count) pairs."""
    end = first + count
    while first < end:
        stop = min(end, (first // batch + 1) * batch)
        yield first, stop - first
        first = stop


def put_piece(master, node_id: str, entry: dict, blob: str, first: int, count: int, body) -> int:
    """Write one piece (CRCs + payload) of a file's ``blob`` to a node and flush it; the PUT_OK's seq."""
    conn = master.pool.acquire(node_id)
    try:
        ack = conn.request(protocol.PutChunks(blob=blob, first=first, count=count,
                                              chunk_size=entry["chunk_size"], body=body, **master.fence()),
                           protocol.PutOk)
        master.note_stored(node_id, ack.seq, len(body) - count * protocol.CRC_BYTES, reserved=False)
        conn.request(protocol.Flush(), protocol.Flushed)
    finally:
        master.pool.release(conn)
    return ack.seq


class UploadStream:
    """One file being uploaded within a session: batching, CRCs, sends.

    Use: ``free_space()`` / ``filled(n)`` to receive data in place (or
    ``write(data)`` to copy), then ``seal(client_sha256)`` -> entry; the
    entry may be committed once ``session.sync(stream.nodes_touched)`` has
    returned.  Call ``discard()`` if it will never be committed.
    """

    def __init__(self, session: UploadSession, name: str, first_chunk: int = 0, client_crcs: bool = False):
        self.session = session
        self.master = session.master
        self.name = name
        self.first_chunk = first_chunk
        import uuid  # noqa: PLC0415 - not at the top: a client's download never needs it (~2 ms)
        self.blob = uuid.uuid4().hex
        # Until committed or discarded, reconciliation must not take this
        # blob's chunks on the nodes for orphans.
        self.master.active_blobs.add(self.blob)
        self._fill = 0
        self._next_chunk = first_chunk
        self.size = 0
        self._sha = hashlib.sha256()
        self._digest: BatchDigest | None = None  # the last batch's
        # The client sends the CRCs of its chunks (take_crcs): they go to the
        # nodes, which check the bytes against them; nothing is hashed here.
        self.client_crcs = client_crcs
        self._crcs = bytearray()  # the client's CRCs of the bytes not shipped yet
        self._next_crcs: bytes | None = None  # DATA_CRCS of the DATA to come
        self._next_digests: tuple[int, int] | None = None  # its crc32, crcs_crc32
        # (payload_crc32, crcs_crc32) of the batch being filled while it is
        # exactly one DATA with digests: the nodes then skip the per-chunk check.
        self._batch_digests: tuple[int, int] | None = None
        self.runs: list = []
        self.nodes_touched: set[str] = set()

    # --- receiving ---------------------------------------------------------------
    def _batch_limit(self) -> int:
        # Batches end at multiples of chunks_per_batch, so a stream that
        # starts mid-file (append, write) still lays out whole-batch records.
        session = self.session
        return (session.chunks_per_batch - self._next_chunk % session.chunks_per_batch) * session.chunk_size

    def free_space(self) -> memoryview:
        """Where the next bytes of the file should be read to (never empty)."""
        return self.session.view[self._fill:self._batch_limit()]

    def filled(self, nbytes: int) -> None:
        """``nbytes`` were written into ``free_space()``."""
        self._fill += nbytes
        if self._fill == self._batch_limit():
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

    def take_crcs(self, body, crc32: int | None = None, crcs_crc32: int | None = None) -> None:
        """A DATA_CRCS: the client's CRCs of the chunks of the next DATA (copied: ``body`` may be reused).

        ``crc32``/``crcs_crc32``: its digests of that DATA and of the CRCs, if it sent them.
        """
        if self._next_crcs is not None:
            raise protocol.RemoteProtocolError("two DATA_CRCS without a DATA between them")
        self._next_crcs = bytes(body)
        self._next_digests = None if crc32 is None or crcs_crc32 is None else (crc32, crcs_crc32)

    def crcs_for(self, nbytes: int) -> None:
        """A DATA of ``nbytes`` came: its CRCs join the batch's; call before the bytes are filled in.

        RemoteProtocolError unless a DATA_CRCS gave the CRCs of its chunks,
        and it starts at a chunk boundary (only the file's last chunk may
        be short).
        """
        crcs, self._next_crcs = self._next_crcs, None
        digests, self._next_digests = self._next_digests, None
        # The digests describe this DATA; they describe a batch only if the
        # DATA starts it and fits it (the client's frames are batch-sized).
        self._batch_digests = digests if self._fill == 0 and nbytes <= self._batch_limit() else None
        chunk_size = self.session.chunk_size
        if crcs is None or self.written % chunk_size or len(crcs) != protocol.CRC_BYTES * -(-nbytes // chunk_size):
            raise protocol.RemoteProtocolError("each DATA of this upload needs a DATA_CRCS with the CRCs of its "
                                               "chunks, and all but the last whole chunks")
        self._crcs += crcs

    # --- sending -----------------------------------------------------------------
    def _ship(self) -> None:
        session = self.session
        chunk_size = session.chunk_size
        payload = session.view[:self._fill]
        count = -(-self._fill // chunk_size)
        if self.client_crcs:
            crc_len = count * protocol.CRC_BYTES
            if len(self._crcs) < crc_len:
                raise protocol.RemoteProtocolError("DATA without the CRCs of all its chunks")
            body, digest, node_crcs = session.chunk_body(self._crcs[:crc_len], self._fill), None, False
            del self._crcs[:crc_len]
        else:
            self._digest = digest = session.digest(self._sha, payload)
            body, node_crcs = payload, True
        # A batch of one whole DATA carries the client's digests of it (a
        # batch filled from several DATA, or from part of one, cannot).
        payload_crc32, crcs_crc32 = self._batch_digests or (None, None)
        self._batch_digests = None
        try:
            msg = protocol.PutChunks(blob=self.blob, first=self._next_chunk, count=count, chunk_size=chunk_size,
                                     node_crcs=node_crcs, payload_crc32=payload_crc32, crcs_crc32=crcs_crc32,
                                     body=body, **self.master.fence())
            placed = session.place(msg, self._fill, self.nodes_touched, digest)
        finally:
            session.next_buffer()  # the worker may still read this one
        add_run(self.runs, self._next_chunk, count, placed)
        self._next_chunk += count
        self.size += self._fill
        self._fill = 0

    @property
    def written(self) -> int:
        """Bytes given to the stream so far (shipped or still in the batch buffer)."""
        return self.size + self._fill

    def flush(self) -> None:
        """Ship the partly filled batch, if any."""
        if self._fill:
            self._ship()

    def file_entry(self, sha256: str) -> dict:
        """The file entry of what was shipped, with ``sha256`` (the client's, already checked)."""
        return make_entry(self.size, self.session.chunk_size, sha256, self.blob, self.runs,
                          self.session.chunks_per_batch)

    def seal(self, client_sha256: str) -> dict:
        """Ship the last batch and return the file entry (not yet durable).

        Raises ChecksumMismatch if the client's SHA-256 differs from what the
        master received; the upload must then be discarded.  With the
        client's CRCs the master computed no SHA-256: it records the
        client's, which every download then checks (docs/PROTOCOL.md).
        """
        self.flush()
        if self.client_crcs:
            if self._next_crcs is not None:
                raise protocol.RemoteProtocolError("DATA_CRCS without its DATA")
            if not protocol.is_sha256_hex(client_sha256):
                raise protocol.RemoteProtocolError("UPLOAD_END sha256 is not 64 hex digits")
            return self.file_entry(client_sha256)
        if self._digest is not None:
            self._digest.result()  # the SHA-256 has seen every batch
        sha256 = self._sha.hexdigest()
        if client_sha256 != sha256:
            raise protocol.ChecksumMismatch(
                f"upload of {self.name!r} arrived corrupted: client SHA-256 {client_sha256[:16]}..., "
                f"master received {sha256[:16]}...")
        return self.file_entry(sha256)

    def discard(self) -> None:
        """This upload will not be committed: collect whatever it sent, at once.

        The batches still in flight are acknowledged first, so the delete
        reaches each node after them and frees all of them.
        """
        self.session.drain(self.nodes_touched)
        self.master.active_blobs.discard(self.blob)
        if self.nodes_touched:
            self.master.collect_garbage(self.blob, self.nodes_touched)


def plan_pieces(entry: dict, offset: int, length: int):
    """Yield (first_chunk, count, node_ids, blob, skip, take) covering [offset, offset+length).

    ``skip`` bytes of the piece's payload come before the range, ``take``
    bytes belong to it.  Pieces hold only chunks the range needs, never span
    two runs, and never cross a batch boundary (the nodes' records), so one
    piece is one contiguous read on a node.
    """
    if length <= 0:
        return
    chunk_size = entry["chunk_size"]
    batch = entry["batch_chunks"]
    first_needed = offset // chunk_size
    last_needed = (offset + length - 1) // chunk_size
    position = offset
    end = offset + length
    runs = entry["runs"]
    for index in range(first_covering(runs, first_needed), len(runs)):
        run = runs[index]
        run_first, run_count, node_ids = run[:3]
        if run_first > last_needed:
            break
        blob = run_blob(entry, run)
        run_last = run_first + run_count - 1
        chunk = max(run_first, first_needed)
        stop = min(run_last, last_needed)
        while chunk <= stop:
            count = min(stop + 1, (chunk // batch + 1) * batch) - chunk
            piece_start = chunk * chunk_size
            skip = position - piece_start
            take = min(end, (chunk + count) * chunk_size) - position
            yield chunk, count, node_ids, blob, skip, take
            position += take
            chunk += count


def plan_runs(entry: dict, first_chunk: int, last_chunk: int, max_runs: int) -> tuple[list, int | None]:
    """The runs of chunks [first_chunk, last_chunk] as READ_PLAN carries them, at most ``max_runs``.

    Returns ``([[first, count, node_ids, blob], ...], more)``: runs clipped to
    the range, each naming its blob, and the first chunk left for a next
    page (None if the range is covered).  Chunks no run places (none, in a
    committed file) are simply absent; the reader reports them lost.
    """
    runs = entry["runs"]
    planned = []
    if last_chunk < first_chunk:
        return planned, None
    for index in range(first_covering(runs, first_chunk), len(runs)):
        run = runs[index]
        run_first, run_count, node_ids = run[:3]
        if run_first > last_chunk:
            break
        if len(planned) == max_runs:
            return planned, max(run_first, first_chunk)
        first = max(run_first, first_chunk)
        last = min(run_first + run_count - 1, last_chunk)
        planned.append([first, last - first + 1, list(node_ids), run_blob(entry, run)])
    return planned, None


def read_range(master, name: str, entry: dict, offset: int, length: int):
    """Yield memoryviews of the bytes [offset, offset+length) of a file.

    Each view is valid until the next one is requested.  Requests run up to
    READ_AHEAD pieces ahead of the one being yielded, on one connection per
    node (replies come back in request order), so the nodes read from disk
    while the caller sends to its client.  A piece whose replica fails is
    read again from the others, and chunks it could not serve intact are
    fetched from them (``read_piece``).  Raises DataLost if every replica of
    some chunk is corrupt or missing, Unavailable if none could be reached.
    """
    for _, item in read_ranges(master, [(None, name, entry, offset, length)]):
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            yield item


class _Slot:
    """One place in ``read_ranges``'s window: a piece of a read (``piece``), or the end of a read."""

    __slots__ = ("key", "name", "entry", "piece", "node_id", "error")

    def __init__(self, key, name, entry, piece, error=None):
        self.key, self.name, self.entry, self.piece, self.error = key, name, entry, piece, error
        self.node_id = None  # the replica the piece was requested from ahead, if any


def _slots(reads):
    for read in reads:
        key, name, entry = read[:3]
        if isinstance(entry, BaseException):
            yield _Slot(key, name, None, None, entry)
            continue
        for piece in plan_pieces(entry, read[3], read[4]):
            yield _Slot(key, name, entry, piece)
        yield _Slot(key, name, entry, None)


def read_ranges(master, reads, buffers=None):
    """``read_range`` over several files, pipelined across them: yields ``(key, item)`` in order.

    ``reads``: an iterable (consumed lazily, as the window needs more) of
    ``(key, name, entry, offset, length)``, or ``(key, name, exception)``
    for a read that failed before it began.  For each read, in order:
    ``(key, view)`` per piece (valid until the next item is requested),
    then ``(key, None)`` when it is complete, or instead ``(key, exception)``
    (DataLost, Unavailable, or the given one) after which nothing more of
    it comes, and the next reads go on.  READ_AHEAD pieces are requested
    ahead, whichever files they belong to, so small files do not each wait
    for a round trip to a node (a directory restore).

    ``buffers``: None (one buffer of this generator's own, reused for every
    piece), or ``(take, give_back)``: ``take()`` returns the buffer to read
    the next piece into (at least a batch of chunks and their CRCs), and a
    yielded view's ``.obj`` is that buffer, which the caller may then hand
    to another thread; a buffer taken for a piece that is not yielded goes
    to ``give_back(buffer)``.  So a client hashes and writes one piece while
    the next is received, without copying it.
    """
    slots = _slots(reads)
    buffer = bytearray(0)
    conns: dict[str, object] = {}
    broken: set[str] = set()
    window: deque = deque()  # _Slot, oldest first
    pieces_ahead = 0
    bytes_ahead = 0
    waiting = None  # a slot taken from ``slots`` that did not fit the window yet
    outstanding: dict[str, int] = {}
    failed = set()  # keys of reads that failed: their remaining pieces are dropped
    try:
        while True:
            if pieces_ahead <= READ_AHEAD or pieces_ahead <= READ_AHEAD_SMALL // 2:
                unflushed = set()
                while True:
                    slot, waiting = waiting or next(slots, None), None
                    if slot is None:
                        break
                    if slot.piece is not None:
                        size = slot.piece[1] * slot.entry["chunk_size"]
                        if pieces_ahead > READ_AHEAD and (pieces_ahead >= READ_AHEAD_SMALL
                                                          or bytes_ahead + size > READ_AHEAD_SMALL_BYTES):
                            waiting = slot
                            break
                        pieces_ahead += 1
                        bytes_ahead += size
                        slot.node_id = _request_piece(master, slot.piece, conns, broken)
                        if slot.node_id is not None:
                            outstanding[slot.node_id] = outstanding.get(slot.node_id, 0) + 1
                            unflushed.add(slot.node_id)
                    window.append(slot)
                _flush_requests(master, unflushed, conns, broken)
            if not window:
                return
            slot = window.popleft()
            if slot.piece is None:
                if slot.key not in failed:
                    yield slot.key, slot.error
                failed.discard(slot.key)
                continue
            pieces_ahead -= 1
            bytes_ahead -= slot.piece[1] * slot.entry["chunk_size"]
            entry, node_id = slot.entry, slot.node_id
            first, count, node_ids, blob, skip, take = slot.piece
            size = entry["batch_chunks"] * (entry["chunk_size"] + protocol.CRC_BYTES)
            if buffers is not None:
                buffer = buffers[0]()
            elif len(buffer) < size:
                buffer = bytearray(size)
            need = None  # chunk ranges still to read; None: the whole piece
            if node_id is not None:
                outstanding[node_id] -= 1
                if node_id not in broken:
                    need = _receive_piece(master, slot.name, entry, blob, first, count, node_id, conns[node_id],
                                          buffer, broken)
            if slot.key in failed:
                if buffers is not None:
                    buffers[1](buffer)
                continue  # its reply is read (the connection stays in step) and dropped
            # Fail over to the other replicas, one request at a time.
            others = [n for n in node_ids if n != node_id]
            try:
                body = read_piece(master, slot.name, entry, blob, first, count, others or node_ids, buffer, need)
            except (protocol.DataLost, protocol.Unavailable) as exc:
                failed.add(slot.key)
                if buffers is not None:
                    buffers[1](buffer)
                yield slot.key, exc
                continue
            yield slot.key, body[count * protocol.CRC_BYTES:][skip:skip + take]
    finally:
        for node_id, conn in conns.items():
            if node_id in broken or outstanding.get(node_id):
                conn.broken = True  # replies still in flight: out of step
            master.pool.release(conn)


def _request_piece(master, piece, conns: dict, broken: set) -> str | None:
    """Queue GET_CHUNKS for a piece to its preferred replica (``_flush_requests`` sends it); the node, or None."""
    first, count, node_ids, blob, _, _ = piece
    for node_id in master.read_order(node_ids):
        if node_id in broken:
            continue
        try:
            conn = conns.get(node_id)
            if conn is None:
                conn = conns[node_id] = master.pool.acquire(node_id)
            conn.send(master.pool.get_chunks(blob, first, count), flush=False)
            return node_id
        except protocol.BackupError as exc:
            broken.add(node_id)
            master.note_node_failure(node_id, exc)
        return None  # let read_piece try the other replicas in order
    return None


def _flush_requests(master, node_ids: set, conns: dict, broken: set) -> None:
    """Send the GET_CHUNKS queued on the connections to ``node_ids``: one send per node for a burst.

    A node whose connection fails is marked broken: its pieces are then
    read from the other replicas (``read_ranges``).
    """
    for node_id in node_ids:
        if node_id in broken:
            continue
        try:
            conns[node_id].flush()
        except protocol.BackupError as exc:
            broken.add(node_id)
            master.note_node_failure(node_id, exc)


def _receive_piece(master, name, entry, blob, first, count, node_id, conn, buffer, broken) -> list | None:
    """Read the reply to a pipelined GET_CHUNKS into ``buffer``; the chunk ranges it lacks, or None if it failed."""
    try:
        reply = conn.expect(protocol.ChunkData, body_buffer=buffer)
        missing, corrupt = _unusable(reply, entry, first, count)
    except (protocol.ChecksumMismatch, protocol.ChunkNotFound) as exc:
        master.note_bad_replica(node_id, name, entry, blob, [(first, count)], exc)
        return None
    except protocol.BackupError as exc:
        broken.add(node_id)
        master.note_node_failure(node_id, exc)
        return None
    _report_unusable(master, node_id, name, entry, blob, missing, corrupt)
    return merge_ranges(missing + corrupt)


def piece_payload_bytes(entry: dict, first: int, count: int) -> int:
    """Bytes of file data in chunks [first, first+count): every chunk is whole but the file's last."""
    chunk_size = entry["chunk_size"]
    return max(0, min(entry["size"], (first + count) * chunk_size) - first * chunk_size)


def _unusable(reply: protocol.ChunkData, entry: dict, first: int, count: int) -> tuple[list, list]:
    """(missing, corrupt): sorted chunk ranges of a CHUNK_DATA reply for [first, first+count) not to use.

    missing: chunks the node says it does not hold.  corrupt: chunks it
    found corrupt on its disk, whose CRC32 fails here (damaged on its disk
    or in transit), or, for the last one, whose length is not the file's.
    A reply carrying its record's payload CRC (``crc32``) is checked with
    that one CRC32; only if it fails are the chunks checked one by one, to
    find which to fetch elsewhere.
    Raises ChecksumMismatch if the reply as a whole does not answer the
    request, RemoteProtocolError if its range lists are malformed.
    """
    chunk_size = entry["chunk_size"]
    crc_bytes, payload = protocol.split_chunk_body(reply.body, count)
    if reply.chunk_size != chunk_size or reply.first != first or reply.count != count \
            or not (count - 1) * chunk_size < len(payload) <= count * chunk_size:
        raise protocol.ChecksumMismatch(f"chunks {first}..{first + count - 1}: the reply does not fit the request")
    whole = len(payload) == piece_payload_bytes(entry, first, count)
    if whole and reply.crc32 is not None and not reply.missing and not reply.corrupt \
            and zlib.crc32(payload) == reply.crc32:
        # One CRC32 of the stored record's payload (CHUNK_DATA crc32) stands for its chunks' CRCs.
        return [], []
    missing = merge_ranges(protocol.chunk_ranges(reply.missing, first, count))
    corrupt = protocol.chunk_ranges(reply.corrupt, first, count)
    corrupt += [(first + index, n) for index, n in protocol.bad_chunk_ranges(payload, crc_bytes, chunk_size)]
    if not whole:
        corrupt.append((first + count - 1, 1))
    return missing, _minus(merge_ranges(corrupt), missing)


def _minus(ranges: list, holes: list) -> list[tuple[int, int]]:
    """The parts of sorted chunk ranges outside the sorted ranges ``holes``."""
    return [gap for first, count in ranges for gap in uncovered(first, count, holes)]


def _report_unusable(master, node_id, name, entry, blob, missing, corrupt) -> None:
    """Tell the master which chunks a replica could not serve, so it stops counting on those copies."""
    if missing:
        master.note_bad_replica(node_id, name, entry, blob, missing,
                                protocol.ChunkNotFound(f"chunks {_describe(missing)} not stored"))
    if corrupt:
        master.note_bad_replica(node_id, name, entry, blob, corrupt,
                                protocol.ChecksumMismatch(f"chunks {_describe(corrupt)} corrupt"))


def _describe(ranges: list) -> str:
    """Chunk ranges for a message: "5, 900..903", the first few only."""
    text = ", ".join(str(first) if count == 1 else f"{first}..{first + count - 1}" for first, count in ranges[:5])
    return text + (f" and {len(ranges) - 5} more run(s)" if len(ranges) > 5 else "")


def _copy_chunks(body, first: int, count: int, source, source_first: int, source_count: int,
                 ranges: list, chunk_size: int) -> None:
    """Copy the CRCs and payload of chunk ``ranges`` from a reply body for [source_first, +source_count)
    into ``body``, the piece [first, first+count) (CRCs, then payload, laid out as on the wire)."""
    crc = protocol.CRC_BYTES
    for range_first, range_count in ranges:
        to, at = range_first - first, range_first - source_first
        body[crc * to:crc * (to + range_count)] = source[crc * at:crc * (at + range_count)]
        to, at = crc * count + to * chunk_size, crc * source_count + at * chunk_size
        length = min(range_count * chunk_size, len(body) - to)  # the file's last chunk may be short
        body[to:to + length] = source[at:at + length]


def read_piece(master, name, entry, blob, first, count, node_ids, buffer, need=None) -> memoryview:
    """Chunks [first, first+count) of a file (held in ``blob``), each from a replica that has it intact.

    Returns the verified body (CRCs, then payload) in ``buffer``, which must
    hold ``count`` whole chunks and their CRCs.  Each replica in read order
    is asked for the span of the chunks still needed; chunks it cannot serve
    intact (missing, corrupt on its disk, failing their CRC here) are
    reported to the master, which takes that replica off just those chunks
    and re-replicates them, and are asked of the next replica.  ``need``
    (sorted chunk ranges) says ``buffer`` already holds the piece but those
    chunks (a pipelined reply that lacked them); None: nothing read yet.
    Raises DataLost if some chunk is intact on no replica, Unavailable if a
    replica that might have it could not be reached.
    """
    chunk_size = entry["chunk_size"]
    body = memoryview(buffer)[:count * protocol.CRC_BYTES + piece_payload_bytes(entry, first, count)]
    need = [(first, count)] if need is None else list(need)
    if not need:
        return body
    scratch = None
    failures = []
    unreachable = 0
    for node_id in master.read_order(node_ids):
        span_first = need[0][0]
        span_count = need[-1][0] + need[-1][1] - span_first
        # Nothing read yet: the reply lands in place, no copy (the usual case).
        in_place = need == [(first, count)]
        if not in_place and scratch is None:
            scratch = bytearray(len(buffer))
        try:
            conn = master.pool.acquire(node_id)
        except protocol.BackupError as exc:
            failures.append(f"{node_id}: {exc.message}")
            unreachable += 1
            master.note_node_failure(node_id, exc)
            continue
        try:
            reply = conn.request(master.pool.get_chunks(blob, span_first, span_count),
                                 protocol.ChunkData, body_buffer=buffer if in_place else scratch)
            missing, corrupt = _unusable(reply, entry, span_first, span_count)
        except (protocol.ChecksumMismatch, protocol.ChunkNotFound) as exc:
            failures.append(f"{node_id}: {exc.message}")
            master.note_bad_replica(node_id, name, entry, blob, need, exc)
            continue
        except protocol.BackupError as exc:
            failures.append(f"{node_id}: {exc.message}")
            unreachable += 1
            master.note_node_failure(node_id, exc)
            continue
        finally:
            master.pool.release(conn)
        _report_unusable(master, node_id, name, entry, blob, missing, corrupt)
        lacking = merge_ranges(missing + corrupt)
        if lacking:
            failures.append(f"{node_id}: chunks {_describe(lacking)} missing or corrupt")
        got = _minus(need, lacking)
        if not in_place:
            _copy_chunks(body, first, count, reply.body, span_first, span_count, got, chunk_size)
        need = _minus(need, got)
        if not need:
            return body
    detail = "; ".join(failures) or "no copy left"
    chunks = f"{name!r}: chunks {_describe(need)}"
    if unreachable:
        raise protocol.Unavailable(f"{chunks} unreachable ({detail})")
    raise protocol.DataLost(f"{chunks} lost on every replica ({detail})")
