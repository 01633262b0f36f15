r"""On-disk chunk store of a storage node: append-only segments, extent index.

The store keeps the chunks a node is given the way Bitcask and Haystack keep
small objects: records are appended to segment files and never rewritten in
place, an in-memory index says where each run of chunks lives, a delete is a
tombstone record, and start-up rebuilds the index by scanning record headers.

Record layout (all integers unsigned big-endian)::

    0      4        magic b"BKR1"
    4      1        kind: 1 = chunks, 2 = tombstone (forget the blob's
                    chunks written before it)
    5      1        L, length of the blob id (1..64)
    6      2        reserved, 0
    8      8        first chunk index
    16     4        count               (0 for tombstones)
    20     4        chunk_size          (0 for tombstones)
    24     8        P, payload length   (0 for tombstones)
    32     4        CRC32 of bytes 0..31 followed by the blob id (header CRC)
    36     L        blob id, ASCII
    36+L   4*count  CRC32 of each chunk (wire form of protocol.crcs_to_bytes)
    ..     P        payload: the chunks back to back, the last may be short

    +------+-+-+--+-------+-----+----+-----+------+---------+-----------+---------+
    | BKR1 |k|L|00| first |count| cs |  P  | hcrc | blob id | 4*count   | payload |
    |      | | |  |       |     |    |     |      |         | chunk CRCs| P bytes |
    +------+-+-+--+-------+-----+----+-----+------+---------+-----------+---------+
    \________ hcrc covers these 32 bytes _/        \_ and L _/

Main trade-off: the header CRC covers the header and blob id only, so start-up
reads ~100 bytes per record and never a payload (start time grows with the
number of records, not bytes).  Payload damage is caught instead by the
per-chunk CRCs, checked on every get().  A record whose header reached the disk
but whose payload did not is caught by its length running past end of file.

Index: blob -> list of extents sorted by first chunk, one small tuple per
record (a record holds a batch of up to ~1024 chunks), never one object per
chunk.  Later records win: a re-put of the same (first, count) replaces the
old extent.  Callers must re-put exactly the ranges they put before or ranges
that overlap nothing; put() refuses a partial overlap, and a blob has one
chunk size.  (During the scan, a later record drops any extent it overlaps.)

Durability: put() and delete_blobs() write but never fsync; flush() fsyncs
every segment written since the last flush (and the directory when a segment
was created), so a node answers FLUSH only once the data is on disk.

Left out: compaction (space of replaced extents and deleted blobs stays on
disk until then; see ChunkStore._append), Bitcask hint files (the header-only
scan makes them unnecessary for now), scrubbing (a node-level loop over
inventory() and get()).
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import struct
import threading
import zlib

from protocol import CRC_BYTES, ChecksumMismatch, ChunkNotFound, RemoteProtocolError, verify_chunks

logger = logging.getLogger(__name__)

MAGIC = b"BKR1"
KIND_CHUNKS = 1
KIND_TOMBSTONE = 2
MAX_BLOB_ID_BYTES = 64
# Bytes 0..31 of the record; the header CRC follows as a separate u32.
_HEAD = struct.Struct(">4sBBHQIIQ")
_CRC = struct.Struct(">I")
HEADER_BYTES = _HEAD.size + _CRC.size  # 36
_MAX_U32 = 2**32 - 1
_MAX_U64 = 2**64 - 1

SEGMENT_DIR = "segments"
_SEGMENT_NAME = re.compile(r"^seg-(\d{8})\.dat$")

# Index entry, one per record:
# (first, count, chunk_size, seg_no, crc_offset, payload_offset, payload_len)
FIRST, COUNT, CHUNK_SIZE, SEG_NO, CRC_OFFSET, PAYLOAD_OFFSET, PAYLOAD_LEN = range(7)


class _TornRecord(Exception):
    """The bytes at a scan position are not a whole, valid record."""


def _segment_name(seg_no: int) -> str:
    return f"seg-{seg_no:08d}.dat"


def _check_blob_id(blob) -> bytes:
    """ASCII bytes of a valid blob id, else RemoteProtocolError."""
    if not isinstance(blob, str) or not 1 <= len(blob) <= MAX_BLOB_ID_BYTES \
            or not blob.isascii() or not blob.isprintable():
        raise RemoteProtocolError(f"bad blob id {str(blob)[:80]!r}")
    return blob.encode("ascii")


def _payload_fits(count: int, chunk_size: int, payload_len: int) -> bool:
    """True if payload_len is what count chunks of chunk_size can add up to."""
    if count == 0:
        return payload_len == 0
    return (count - 1) * chunk_size < payload_len <= count * chunk_size


def _encode_header(kind: int, blob_id: bytes, first: int, count: int, chunk_size: int,
                   payload_len: int) -> bytes:
    """Bytes 0..36+L of a record: fixed header, header CRC, blob id."""
    head = _HEAD.pack(MAGIC, kind, len(blob_id), 0, first, count, chunk_size, payload_len)
    return head + _CRC.pack(zlib.crc32(blob_id, zlib.crc32(head))) + blob_id


def _read_header(fd: int, offset: int, file_size: int) -> tuple:
    """Parse the record at offset: (kind, blob, first, count, chunk_size, payload_len, end).

    Reads the header and blob id only.  Raises _TornRecord saying why the
    bytes there are not a whole, valid record.
    """
    data = os.pread(fd, HEADER_BYTES + MAX_BLOB_ID_BYTES, offset)
    if len(data) < HEADER_BYTES:
        raise _TornRecord(f"short header ({len(data)} bytes)")
    magic, kind, id_len, reserved, first, count, chunk_size, payload_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise _TornRecord("bad magic")
    if not 1 <= id_len <= MAX_BLOB_ID_BYTES or len(data) < HEADER_BYTES + id_len:
        raise _TornRecord(f"bad blob id length {id_len}")
    blob_id = data[HEADER_BYTES:HEADER_BYTES + id_len]
    (header_crc,) = _CRC.unpack_from(data, _HEAD.size)
    if zlib.crc32(blob_id, zlib.crc32(data[:_HEAD.size])) != header_crc:
        raise _TornRecord("bad header CRC")
    # The CRC matched, so these fields are what we wrote; check them anyway so
    # a record from a buggy writer cannot put nonsense into the index.
    if kind == KIND_CHUNKS:
        sane = count > 0 and chunk_size > 0 and _payload_fits(count, chunk_size, payload_len)
    else:
        sane = kind == KIND_TOMBSTONE and count == chunk_size == payload_len == 0
    if not sane or reserved or not blob_id.isascii():
        raise _TornRecord(f"inconsistent header (kind {kind}, count {count}, P {payload_len})")
    end = offset + HEADER_BYTES + id_len + CRC_BYTES * count + payload_len
    if end > file_size:
        raise _TornRecord(f"record runs {end - file_size} bytes past end of file")
    return kind, blob_id.decode("ascii"), first, count, chunk_size, payload_len, end


def _write_all(fd: int, buffers: list) -> None:
    """os.writev all of buffers, resuming after a short write."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]


class ChunkStore:
    """Chunks of blobs in append-only segment files under ``data_dir/segments``.

    Callers use put/get/has/delete_blobs/flush/inventory and the stats
    properties; everything is thread-safe.  One lock guards appends, the index
    and the stats; get() holds it only to look up extents and reads outside it.
    close() must come after every other call has returned.
    """

    def __init__(self, data_dir: str, segment_max_bytes: int = 64 * 1024 * 1024):
        self.segment_max_bytes = segment_max_bytes
        self._dir = os.path.join(data_dir, SEGMENT_DIR)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # serializes flushes; see flush()
        self._index: dict[str, list[tuple]] = {}
        self._fds: dict[int, int] = {}  # seg_no -> fd, kept open for pread
        self._dirty: set[int] = set()  # segments written since the last flush
        self._dir_dirty = False
        self._chunk_count = self._live_bytes = self._extent_count = self._used_bytes = 0
        self._tail_seg = 0
        self._tail_size = 0
        self._closed = False
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        if not os.path.isdir(self._dir):
            os.mkdir(self._dir, mode=0o700)
            self._fsync_dir(data_dir)
        seg_nos = sorted(int(m.group(1)) for m in map(_SEGMENT_NAME.match, os.listdir(self._dir)) if m)
        for seg_no in seg_nos:
            self._scan_segment(seg_no, is_last=seg_no == seg_nos[-1])
        if not seg_nos:
            self._new_segment(1)
        logger.info("chunk store %s: %d segments, %d blobs, %d extents, %d chunks",
                    self._dir, len(self._fds), len(self._index), self._extent_count, self._chunk_count)

    # --- start-up -------------------------------------------------------
    def _scan_segment(self, seg_no: int, is_last: bool) -> None:
        """Replay the records of one segment into the index.

        A torn record ends the scan of its segment.  In the last segment it is
        what a crash mid-append leaves, so it is cut off and appends resume
        there; in an earlier one it is damage we must not make worse.
        """
        path = os.path.join(self._dir, _segment_name(seg_no))
        fd = os.open(path, (os.O_RDWR | os.O_APPEND if is_last else os.O_RDONLY) | os.O_CLOEXEC)
        self._fds[seg_no] = fd
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                kind, blob, first, count, chunk_size, payload_len, end = _read_header(fd, offset, size)
            except _TornRecord as exc:
                if is_last:
                    logger.warning("%s: torn record at offset %d (%s); truncating %d bytes",
                                   path, offset, exc, size - offset)
                    os.ftruncate(fd, offset)
                    os.fsync(fd)
                    size = offset
                else:
                    logger.error("%s: bad record at offset %d (%s); ignoring the %d bytes after it",
                                 path, offset, exc, size - offset)
                break
            if kind == KIND_TOMBSTONE:
                self._drop_blob(blob)
            else:
                crc_offset = offset + HEADER_BYTES + len(blob)
                self._insert(blob, (first, count, chunk_size, seg_no, crc_offset,
                                    crc_offset + CRC_BYTES * count, payload_len))
            offset = end
        self._used_bytes += size
        if is_last:
            self._tail_seg, self._tail_size = seg_no, size

    # --- index (caller holds the lock, or is __init__) -----------------
    @staticmethod
    def _overlapping(extents: list, first: int, count: int) -> tuple[int, int]:
        """Slice bounds of the extents that share a chunk with first..first+count-1."""
        lo = bisect.bisect_left(extents, (first,))
        if lo and extents[lo - 1][FIRST] + extents[lo - 1][COUNT] > first:
            lo -= 1
        return lo, bisect.bisect_left(extents, (first + count,))

    def _insert(self, blob: str, extent: tuple) -> None:
        """Add extent to the index; any extent it overlaps is dropped (later wins)."""
        extents = self._index.setdefault(blob, [])
        lo, hi = self._overlapping(extents, extent[FIRST], extent[COUNT])
        for old in extents[lo:hi]:
            self._account(old, -1)
        extents[lo:hi] = [extent]
        self._account(extent, +1)

    def _drop_blob(self, blob: str) -> bool:
        extents = self._index.pop(blob, None)
        for old in extents or ():
            self._account(old, -1)
        return extents is not None

    def _account(self, extent: tuple, sign: int) -> None:
        self._chunk_count += sign * extent[COUNT]
        self._live_bytes += sign * extent[PAYLOAD_LEN]
        self._extent_count += sign

    # --- appending (caller holds the lock) ----------------------------
    def _new_segment(self, seg_no: int) -> None:
        path = os.path.join(self._dir, _segment_name(seg_no))
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fds[seg_no] = os.open(path, flags, 0o600)
        self._tail_seg, self._tail_size = seg_no, 0
        self._dir_dirty = True

    def _append(self, buffers: list, length: int) -> tuple[int, int]:
        """Write one record (buffers, length bytes in all); return (seg_no, offset).

        A failed write is cut off again, so a record that fails (ENOSPC) never
        sits in the middle of a segment where the next scan would stop.
        """
        # Compaction goes here, later: when a segment rolls, pick old segments
        # whose live bytes are a small share, copy their live extents into the
        # tail, repoint the index, then unlink them (with gets holding a
        # reference to the fds they read).
        if self._tail_size and self._tail_size + length > self.segment_max_bytes:
            self._new_segment(self._tail_seg + 1)
        seg_no, offset = self._tail_seg, self._tail_size
        fd = self._fds[seg_no]
        try:
            _write_all(fd, buffers)
        except OSError:
            os.ftruncate(fd, offset)
            raise
        self._dirty.add(seg_no)
        self._tail_size += length
        self._used_bytes += length
        return seg_no, offset

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("chunk store is closed")

    # --- public API -----------------------------------------------------
    def put(self, blob: str, first: int, count: int, chunk_size: int, crc_bytes, payload) -> None:
        """Append count chunks of blob from chunk first as one record.

        Every chunk is checked against crc_bytes before anything is written.
        Raises ChecksumMismatch naming the first bad chunk, RemoteProtocolError
        for a bad blob id, inconsistent sizes, a partial overlap with stored
        chunks or a chunk size other than the blob's.  Does not fsync.
        """
        blob_id = _check_blob_id(blob)
        crc_bytes, payload = memoryview(crc_bytes).cast("B"), memoryview(payload).cast("B")
        if not (0 <= first and 0 < count <= _MAX_U32 and first + count <= _MAX_U64
                and 0 < chunk_size <= _MAX_U32):
            raise RemoteProtocolError(f"bad range first={first} count={count} chunk_size={chunk_size}")
        if len(crc_bytes) != CRC_BYTES * count or not _payload_fits(count, chunk_size, len(payload)):
            raise RemoteProtocolError(f"{len(crc_bytes)} CRC bytes and {len(payload)} payload bytes "
                                      f"do not make {count} chunks of {chunk_size}")
        bad = verify_chunks(payload, crc_bytes, chunk_size)
        if bad >= 0:
            raise ChecksumMismatch(f"blob {blob} chunk {first + bad}: CRC does not match payload")
        header = _encode_header(KIND_CHUNKS, blob_id, first, count, chunk_size, len(payload))
        length = len(header) + len(crc_bytes) + len(payload)
        with self._lock:
            self._check_open()
            extents = self._index.get(blob, [])
            lo, hi = self._overlapping(extents, first, count)
            if hi - lo > 1 or (hi - lo == 1 and extents[lo][:2] != (first, count)):
                raise RemoteProtocolError(f"blob {blob} chunks {first}+{count} partly overlap stored ones")
            if extents and extents[0][CHUNK_SIZE] != chunk_size:
                raise RemoteProtocolError(f"blob {blob} has chunk size {extents[0][CHUNK_SIZE]}, not {chunk_size}")
            seg_no, offset = self._append([header, crc_bytes, payload], length)
            crc_offset = offset + len(header)
            self._insert(blob, (first, count, chunk_size, seg_no, crc_offset,
                                crc_offset + len(crc_bytes), len(payload)))

    def flush(self) -> None:
        """Make everything put or deleted before this call durable (fsync).

        The fsyncs run outside the main lock so puts go on meanwhile; the
        flush lock makes a second flush wait for one in progress instead of
        returning before the data it should cover is on disk.
        """
        with self._flush_lock:
            with self._lock:
                self._check_open()
                fds = [self._fds[seg_no] for seg_no in sorted(self._dirty)]
                dir_dirty, self._dirty, self._dir_dirty = self._dir_dirty, set(), False
            for fd in fds:
                os.fsync(fd)
            if dir_dirty:
                self._fsync_dir(self._dir)

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _locate(self, blob: str, first: int, count: int) -> list[tuple]:
        """(extent, skip, take) pieces covering the range; ChunkNotFound if any chunk is missing."""
        if first < 0 or count <= 0:
            raise RemoteProtocolError(f"bad range first={first} count={count}")
        extents = self._index.get(blob)
        if not extents:
            raise ChunkNotFound(f"blob {blob} not stored")
        pieces, pos, end = [], first, first + count
        i = bisect.bisect_right(extents, (first, _MAX_U64 + 1)) - 1
        while pos < end:
            if i < 0 or i >= len(extents) or not extents[i][FIRST] <= pos < extents[i][FIRST] + extents[i][COUNT]:
                raise ChunkNotFound(f"blob {blob} chunk {pos} not stored")
            extent = extents[i]
            skip = pos - extent[FIRST]
            take = min(extent[COUNT] - skip, end - pos)
            pieces.append((extent, skip, take))
            pos += take
            i += 1
        return pieces

    def get(self, blob: str, first: int, count: int) -> tuple[int, bytes, bytes]:
        """(chunk_size, crc_bytes, payload) of chunks first..first+count-1 of blob.

        Every chunk is checked against its stored CRC.  Raises ChunkNotFound if
        any chunk is missing, ChecksumMismatch naming blob and chunk if one is
        damaged.  Two preads per extent (CRCs, payload), none per chunk.
        """
        with self._lock:
            self._check_open()
            pieces = self._locate(blob, first, count)
            fds = [self._fds[extent[SEG_NO]] for extent, _, _ in pieces]
        chunk_size = pieces[0][0][CHUNK_SIZE]
        crc_parts, payload_parts = [], []
        for n, ((extent, skip, take), fd) in enumerate(zip(pieces, fds)):
            start = skip * chunk_size
            stop = min((skip + take) * chunk_size, extent[PAYLOAD_LEN])
            # A short chunk may only end the answer, or the chunks would shift.
            if extent[CHUNK_SIZE] != chunk_size or (n < len(pieces) - 1 and stop - start != take * chunk_size):
                raise RemoteProtocolError(f"blob {blob} mixes chunk sizes in chunks {first}+{count}")
            crc_parts.append(os.pread(fd, CRC_BYTES * take, extent[CRC_OFFSET] + CRC_BYTES * skip))
            payload_parts.append(os.pread(fd, stop - start, extent[PAYLOAD_OFFSET] + start))
            if len(crc_parts[-1]) != CRC_BYTES * take or len(payload_parts[-1]) != stop - start:
                raise ChecksumMismatch(f"blob {blob} chunk {extent[FIRST] + skip}: short read")
        crc_bytes = crc_parts[0] if len(crc_parts) == 1 else b"".join(crc_parts)
        payload = payload_parts[0] if len(payload_parts) == 1 else b"".join(payload_parts)
        bad = verify_chunks(payload, crc_bytes, chunk_size)
        if bad >= 0:
            raise ChecksumMismatch(f"blob {blob} chunk {first + bad}: stored CRC does not match data")
        return chunk_size, crc_bytes, payload

    def has(self, blob: str, first: int, count: int) -> bool:
        """True if every chunk first..first+count-1 of blob is stored (data not read)."""
        with self._lock:
            try:
                self._locate(blob, first, count)
            except (ChunkNotFound, RemoteProtocolError):
                return False
            return True

    def delete_blobs(self, blobs) -> int:
        """Tombstone and forget each stored blob of blobs; return how many were stored.

        One write for all tombstones.  Does not fsync (call flush).  Raises
        RemoteProtocolError, deleting nothing, if any blob id is malformed.
        """
        blobs = list(blobs)
        for blob in blobs:
            _check_blob_id(blob)
        with self._lock:
            self._check_open()
            present = [blob for blob in dict.fromkeys(blobs) if blob in self._index]
            if not present:
                return 0
            records = b"".join(_encode_header(KIND_TOMBSTONE, blob.encode("ascii"), 0, 0, 0, 0)
                               for blob in present)
            self._append([records], len(records))
            for blob in present:
                self._drop_blob(blob)
            return len(present)

    def inventory(self) -> dict[str, list[tuple[int, int]]]:
        """blob -> sorted (first, count) of every extent held, for reconciliation."""
        with self._lock:
            return {blob: [(e[FIRST], e[COUNT]) for e in extents] for blob, extents in self._index.items()}

    @property
    def used_bytes(self) -> int:
        """Bytes of segment files on disk, dead records included."""
        return self._used_bytes

    @property
    def live_bytes(self) -> int:
        """Payload bytes of live extents."""
        return self._live_bytes

    @property
    def chunk_count(self) -> int:
        return self._chunk_count

    @property
    def blob_count(self) -> int:
        return len(self._index)

    @property
    def extent_count(self) -> int:
        """Index entries held: one per live record, never one per chunk."""
        return self._extent_count

    def close(self) -> None:
        """Close every segment file; idempotent.  Call flush() first to keep unsynced data."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
