r"""On-disk chunk store of a storage node: append-only segments, extent index.

The store keeps the chunks a node is given the way Bitcask and Haystack keep
small objects: records are appended to segment files and never rewritten in
place, an in-memory index says where each run of chunks lives, a delete is a
tombstone record, and start-up rebuilds the index by scanning record headers.

Record layout (all integers unsigned big-endian)::

    0      4        magic b"BKR1"
    4      1        kind: 1 = chunks, 2 = tombstone (forget the blob's
                    chunks written before it), 3 = drop (forget the blob's
                    chunks first..first+count-1 written before it)
    5      1        L, length of the blob id (1..64)
    6      2        flags: bit 0 (FLAG_PAYLOAD_CRC, kind 1 only) = a CRC32 of
                    the whole payload follows the blob id; other bits 0
    8      8        first chunk index   (0 for tombstones)
    16     4        count               (0 for tombstones)
    20     4        chunk_size; for kinds 2 and 3 the segment bound B:
                    0 = every earlier record, B > 0 = only records in
                    segments numbered below B (set when compaction carries
                    the record forward, see compact())
    24     8        P, payload length   (0 for kinds 2 and 3)
    32     4        CRC32 of bytes 0..31 followed by the blob id (header CRC)
    36     L        blob id, ASCII
    36+L   4        with FLAG_PAYLOAD_CRC only: CRC32 of the P payload bytes
    ..     4*count  CRC32 of each chunk (kind 1 only; wire form of
                    protocol.crcs_to_bytes)
    ..     P        payload: the chunks back to back, the last may be short

    +------+-+-+--+-------+-----+----+-----+------+---------+------+-----------+---------+
    | BKR1 |k|L|fl| first |count| cs |  P  | hcrc | blob id |[pcrc]| 4*count   | payload |
    |      | | |  |       |     |    |     |      |         |      | chunk CRCs| P bytes |
    +------+-+-+--+-------+-----+----+-----+------+---------+------+-----------+---------+
    \________ hcrc covers these 32 bytes _/        \_ and L _/

The payload CRC (issue 15) lets a reader of a whole record check it with one
zlib.crc32 call (which releases the GIL) instead of one per chunk.  put()
computes it from the payload after the per-chunk CRCs the writer sent were
checked, so it is as end-to-end as they are: it is never computed from bytes
read back from the disk.  Records written before it (flags 0) have none, nor
has a part of a record split by drop_range() until compaction copies it
(which checks its chunk CRCs, then computes one from the same bytes); readers
then check the chunk CRCs one by one.  The header CRC does not cover it, so a
damaged payload CRC costs a reader the slow check, never the record.  The
chunk CRCs and the payload stay adjacent, so a whole record's reply body is
one contiguous byte range of the segment (storage_node.py sends it with
sendfile).  The scrubber keeps checking every chunk CRC.

Main trade-off: the header CRC covers the header and blob id only, so start-up
reads ~100 bytes per record and never a payload (start time grows with the
number of records, not bytes).  Payload damage is caught instead by the
per-chunk CRCs (or the payload CRC, for a reader of a whole record), checked on
every read: by the node for the master, by the client for itself (open_span
hands the node the bytes unread).  A record whose header reached the disk
but whose payload did not is caught by its length running past end of file.

Index: blob -> list of extents sorted by first chunk, one small tuple per
record (a record holds a batch of up to ~1024 chunks), never one object per
chunk.  Later records win: a put replaces exactly the chunks it covers (a
re-put of the same (first, count) replaces the old extent; one that covers
only part of an extent splits it as a range drop does), and a blob has one
chunk size.

Range drops split extents: drop_range() forgets any run of whole chunks, and
an extent it cuts into keeps its remaining part(s) as extents of their own,
new tuples pointing into the same record (first, count, CRC offset, payload
offset and length adjusted; chunk size and record offset unchanged), so one
record may back several extents.  The drop record (kind 3) holds the range
dropped, and replay applies it with the same code (_cut_range).  During the
scan a later chunks record likewise replaces exactly the chunks it covers,
splitting an extent it partly overlaps, as put() does live (and compaction
can move records out of file order: a part copied by compaction lands after
a later put into the dropped gap).

Durability: put() and delete_blobs() write but never fsync; flush() fsyncs
every segment written since the last flush (and the directory when a segment
was created), so a node answers FLUSH only once the data is on disk.

Compaction (compact()) reclaims the space of replaced extents, deleted blobs
and dropped extents: it copies the live records of a mostly dead, non-active
segment to the active one (of a split record, only its live parts, each as a
record of its own), repoints the index record by record, fsyncs, then
unlinks the old segment.  Tombstones and drop records are carried forward only
while an older segment still holds records of their blob; a carried copy gets
a segment bound so it can never hide chunks put after the original (moving it
to the tail puts it after them in file order).  Readers pin the descriptors
they pread from (a reference count), so a compacted segment's descriptor is
closed only once the last reader is done; the file itself is unlinked at once.

Corruption is handled per chunk, never per record: a record is a whole
batch, and its other chunks are as good as ever.  get_intact() (what a node
serves), scrub_step() (a bounded slice of the live extents per call) and
compaction drop exactly the chunks whose payload no longer matches their
stored CRCs, as drop_range() would, and say which; the node reports them and
the master re-puts just those chunks from a good replica.  get() stays
strict: any bad chunk fails it.  A part of a split record is checked on its
own.

Full disks: compaction needs free space for the live bytes it copies, so it
takes wholly dead segments first (they need none), shrinks a segment it has
no room to copy at once from its end, record by record (dead tail cut, live
records moved, file truncated), and stops a segment whose copying hits
ENOSPC (the copies made are valid) instead of failing.  roll_if_dead() makes
a mostly dead active segment a candidate.  forget_blobs()/forget_range() let
a node whose disk cannot take even a tombstone still turn data dead.  The
node keeps a reserve of free space (storage_node.py) so that these are rare.

Formats and damage (start-up, see _scan_segment and docs/PROTOCOL.md "The
store on disk"): a whole record of an unknown kind or flag bit, or of another
magic version, is a newer release's data: the store refuses to open
(StoreFormatError), changing nothing.  So does a FORMAT marker naming a newer
store format.  An unparseable record in the newest segment is cut off so
appends resume at a record boundary, but only after the bytes cut are copied
(fsynced) to TORN_DIR: a crash tears only a tail that was never fsynced, yet
bit rot in a header looks the same and must not cost the good records after it.

Left out: compacting the active segment in place (roll_if_dead() rolls it first),
Bitcask hint files (the header-only scan makes them unnecessary for now).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import re
import struct
import threading
import time
import zlib

from protocol import (CRC_BYTES, MAX_BODY_BYTES, ChecksumMismatch, ChunkNotFound, RemoteProtocolError,
                      bad_chunk_ranges, verify_batch_digests, verify_chunks)

logger = logging.getLogger(__name__)

MAGIC = b"BKR1"
KIND_CHUNKS = 1
KIND_TOMBSTONE = 2
KIND_DROP = 3
FLAG_PAYLOAD_CRC = 1
MAX_BLOB_ID_BYTES = 64
# Bytes 0..31 of the record; the header CRC follows as a separate u32.
_HEAD = struct.Struct(">4sBBHQIIQ")
_CRC = struct.Struct(">I")
HEADER_BYTES = _HEAD.size + _CRC.size  # 36
PAYLOAD_CRC_BYTES = _CRC.size  # after the blob id, with FLAG_PAYLOAD_CRC
_MAX_U32 = 2**32 - 1
_MAX_U64 = 2**64 - 1

SEGMENT_DIR = "segments"
# Store format version, in FORMAT (one line "chunk-store N") beside the
# segments.  A release refuses a store whose N is higher than its own (a later
# format bumps it when older readers must not touch the store); a store
# without the file (written before it existed) is format 1.
STORE_FORMAT = 1
FORMAT_FILE = "FORMAT"
# Where start-up preserves the bytes it cuts off the newest segment (see
# ChunkStore._cut_tail), one file per cut: <segment name>.at-<offset>.
TORN_DIR = "torn"
# Free space compact() wants beyond a segment's live bytes before copying
# them: room for the tombstones it carries forward and a new segment file.
COMPACT_MARGIN_BYTES = 64 * 1024
# Free space _shrink_segment leaves alone: a new segment file, filesystem metadata.
SHRINK_MARGIN_BYTES = 16 * 1024
# How long a shrink waits for readers of the part it cuts off.
_UNPIN_WAIT_S = 2.0
_SEGMENT_NAME = re.compile(r"^seg-(\d{8})\.dat$")

# Index entry, one per record, or per live part of a record split by drop_range:
# (first, count, chunk_size, seg_no, crc_offset, payload_offset, payload_len, record_offset, payload_crc)
# record_offset is where the record starts in its segment; the parts of one
# record share it (and seg_no), which is how segment live accounting counts the
# record's header once.  payload_crc: the record's payload CRC, only while the
# extent is the whole record (a part has None, as has a record without one).
FIRST, COUNT, CHUNK_SIZE, SEG_NO, CRC_OFFSET, PAYLOAD_OFFSET, PAYLOAD_LEN, RECORD_OFFSET, PAYLOAD_CRC = range(9)


class _TornRecord(Exception):
    """The bytes at a scan position are not a whole, valid record."""


class _NewerRecord(_TornRecord):
    """The bytes at a scan position are a whole record of a newer format (see StoreFormatError).

    A _TornRecord so that compaction, which only ever reads what start-up
    accepted, stops at it like at any record it cannot use.
    """


class StoreFormatError(Exception):
    """The store holds data of a format this release does not know: refuse to open it.

    Raised for a record whose header CRC checks but whose kind or flag bits
    are unknown here, for a record magic of another format version
    (``BKR`` and a digit other than 1), and for a FORMAT marker naming a
    newer store format.  A newer release wrote it, so the bytes are valid
    data we cannot read: the store is left exactly as it is (no truncation,
    no marker written) and the node exits with EXIT_STORE_FORMAT.  ``path``
    and ``offset`` say where (offset None for the marker).
    """

    def __init__(self, path: str, offset: int | None, why: str):
        where = path if offset is None else f"{path} offset {offset}"
        super().__init__(f"{where}: {why}; written by a newer release? run that release "
                         f"(this one reads chunk store format {STORE_FORMAT})")
        self.path, self.offset = path, offset


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
                   payload_len: int, payload_crc: int | None = None) -> bytes:
    """Bytes of a record before its chunk CRCs: fixed header, header CRC, blob id, payload CRC if given."""
    flags = 0 if payload_crc is None else FLAG_PAYLOAD_CRC
    head = _HEAD.pack(MAGIC, kind, len(blob_id), flags, first, count, chunk_size, payload_len)
    header = head + _CRC.pack(zlib.crc32(blob_id, zlib.crc32(head))) + blob_id
    return header if payload_crc is None else header + _CRC.pack(payload_crc)


def _read_header(fd: int, offset: int, file_size: int) -> tuple:
    """Parse the record at offset: (kind, blob, first, count, chunk_size, payload_len, end, payload_crc).

    For kinds 2 and 3, chunk_size is the segment bound.  payload_crc is None
    unless the record carries one (FLAG_PAYLOAD_CRC).  Reads the header, blob
    id and payload CRC only.  Raises _TornRecord saying why the bytes there
    are not a whole, valid record; _NewerRecord (a _TornRecord) for a whole
    record of a format newer than this release's.
    """
    data = os.pread(fd, HEADER_BYTES + MAX_BLOB_ID_BYTES + PAYLOAD_CRC_BYTES, offset)
    if len(data) < HEADER_BYTES:
        raise _TornRecord(f"short header ({len(data)} bytes)")
    magic, kind, id_len, flags, first, count, chunk_size, payload_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        if magic[:3] == MAGIC[:3] and magic[3:].isdigit():
            # Our own torn append always starts with MAGIC: this is another
            # format version's record (or a flipped bit: refusing is safe too).
            raise _NewerRecord(f"record magic {magic!r}, not {MAGIC!r}")
        raise _TornRecord("bad magic")
    if not 1 <= id_len <= MAX_BLOB_ID_BYTES or len(data) < HEADER_BYTES + id_len:
        raise _TornRecord(f"bad blob id length {id_len}")
    blob_id = data[HEADER_BYTES:HEADER_BYTES + id_len]
    (header_crc,) = _CRC.unpack_from(data, _HEAD.size)
    if zlib.crc32(blob_id, zlib.crc32(data[:_HEAD.size])) != header_crc:
        raise _TornRecord("bad header CRC")
    # The CRC matched, so the header is whole and as its writer meant it: an
    # unknown kind or flag bit is a newer format, never a torn append.
    known_flags = FLAG_PAYLOAD_CRC if kind == KIND_CHUNKS else 0
    if kind not in (KIND_CHUNKS, KIND_TOMBSTONE, KIND_DROP) or flags & ~known_flags:
        raise _NewerRecord(f"record of unknown kind {kind} or flags {flags:#06x}")
    # Check the other fields anyway so a record from a buggy writer cannot
    # put nonsense into the index.
    if kind == KIND_CHUNKS:
        sane = count > 0 and chunk_size > 0 and _payload_fits(count, chunk_size, payload_len)
    elif kind == KIND_TOMBSTONE:
        sane = count == payload_len == 0
    else:
        sane = kind == KIND_DROP and count > 0 and payload_len == 0
    if not sane or not blob_id.isascii():
        raise _TornRecord(f"inconsistent header (kind {kind}, count {count}, P {payload_len}, flags {flags})")
    payload_crc = None
    if flags:
        at = HEADER_BYTES + id_len
        if len(data) < at + PAYLOAD_CRC_BYTES:
            raise _TornRecord("short payload CRC")
        (payload_crc,) = _CRC.unpack_from(data, at)
    crc_len = CRC_BYTES * count if kind == KIND_CHUNKS else 0
    end = offset + HEADER_BYTES + id_len + (PAYLOAD_CRC_BYTES if flags else 0) + crc_len + payload_len
    if end > file_size:
        raise _TornRecord(f"record runs {end - file_size} bytes past end of file")
    return kind, blob_id.decode("ascii"), first, count, chunk_size, payload_len, end, payload_crc


def _next_record_at(fd: int, offset: int, size: int) -> int | None:
    """Offset of the first whole, valid record after offset (MAGIC, header CRC, fits the file), else None.

    Start-up uses it to tell a torn append (nothing valid follows) from damage
    inside the segment (whole records follow), and to find a newer format's
    record behind damage.  Only MAGIC counts here: a payload's stray
    ``BKR2`` must not make a store unopenable.
    """
    window_bytes = 1024 * 1024
    pos = offset + 1
    while pos < size:
        window = os.pread(fd, min(window_bytes, size - pos) + len(MAGIC) - 1, pos)
        at = window.find(MAGIC)
        while at >= 0:
            try:
                _read_header(fd, pos + at, size)
                return pos + at
            except _NewerRecord:
                return pos + at  # whole, just not ours: the caller refuses the store
            except _TornRecord:
                at = window.find(MAGIC, at + 1)
        pos += max(1, len(window) - len(MAGIC) + 1)
    return None


def _part(extent: tuple, first: int, count: int) -> tuple:
    """The extent of chunks first..first+count-1 (inside extent), pointing into the same record."""
    skip = first - extent[FIRST]
    start = skip * extent[CHUNK_SIZE]
    stop = min((skip + count) * extent[CHUNK_SIZE], extent[PAYLOAD_LEN])
    whole = skip == 0 and count == extent[COUNT]
    return (first, count, extent[CHUNK_SIZE], extent[SEG_NO], extent[CRC_OFFSET] + CRC_BYTES * skip,
            extent[PAYLOAD_OFFSET] + start, stop - start, extent[RECORD_OFFSET],
            extent[PAYLOAD_CRC] if whole else None)


def _dead_enough(size: int, live: int, min_dead_fraction: float, min_dead_bytes: int | None) -> bool:
    """A segment of ``size`` bytes, ``live`` of them live, is worth compacting (see ChunkStore.compact)."""
    dead = size - live
    return dead >= min_dead_fraction * size or (min_dead_bytes is not None and dead >= min_dead_bytes > 0)


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


class Span:
    """Chunks of one extent as a reply body on disk (ChunkStore.open_span).

    ``ranges``: ``(offset, length)`` byte ranges of the segment open as
    ``fd`` that make up the body (the chunks' CRCs, then their payload; one
    range when they are adjacent, as in a whole record).  ``payload_crc``:
    the record's CRC32 of the payload, or None unless the span is a whole
    record that has one.
    """

    __slots__ = ("fd", "chunk_size", "ranges", "body_len", "payload_crc")

    def __init__(self, fd: int, extent: tuple):
        self.fd = fd
        self.chunk_size = extent[CHUNK_SIZE]
        self.payload_crc = extent[PAYLOAD_CRC]
        crc_len = CRC_BYTES * extent[COUNT]
        if extent[CRC_OFFSET] + crc_len == extent[PAYLOAD_OFFSET]:
            self.ranges = [(extent[CRC_OFFSET], crc_len + extent[PAYLOAD_LEN])]
        else:
            self.ranges = [(extent[CRC_OFFSET], crc_len), (extent[PAYLOAD_OFFSET], extent[PAYLOAD_LEN])]
        self.body_len = crc_len + extent[PAYLOAD_LEN]


class ChunkStore:
    """Chunks of blobs in append-only segment files under ``data_dir/segments``.

    Callers use put/get/get_intact/open_span/has/delete_blobs/drop_range/flush/inventory
    and the stats properties; a node's background threads use compact,
    segment_stats and scrub_step.  Everything is thread-safe.  One lock guards
    appends, the index and the stats; get() and scrub_step() hold it only to
    look up extents and pin their descriptors, and read outside it.  close()
    must come after every other call has returned.
    """

    def __init__(self, data_dir: str, segment_max_bytes: int = 64 * 1024 * 1024, statvfs=os.statvfs):
        self.segment_max_bytes = segment_max_bytes
        self._dir = os.path.join(data_dir, SEGMENT_DIR)
        self._statvfs = statvfs  # seam: tests give a filesystem of any size
        self._postponed: frozenset[int] = frozenset()  # segments compaction had no room for, last pass
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # serializes flushes; see flush()
        self._index: dict[str, list[tuple]] = {}
        self._compact_lock = threading.Lock()  # one compaction at a time
        self._fds: dict[int, int] = {}  # seg_no -> fd, kept open for pread
        self._fd_refs: dict[int, int] = {}  # fd -> readers preading it now
        self._retired: set[int] = set()  # fds of unlinked segments, closed at refcount 0
        self._seg_size: dict[int, int] = {}  # seg_no -> bytes in the file
        self._seg_live: dict[int, int] = {}  # seg_no -> bytes of records the index holds
        # (seg_no, record_offset) -> live extents backed by that record, only
        # for records split into two or more (absent: one, or none left).
        self._split_parts: dict[tuple[int, int], int] = {}
        # seg_no -> blobs with a chunks record there, live or dead: compaction
        # carries a tombstone forward only while an older segment is in here.
        self._seg_blobs: dict[int, set[str]] = {}
        self._dirty: set[int] = set()  # segments written since the last flush
        self._dir_dirty = False
        self._chunk_count = self._live_bytes = self._extent_count = self._used_bytes = 0
        self._tail_seg = 0
        self._tail_size = 0
        self._closed = False
        self._failed: OSError | None = None  # a failed fsync poisons the store (see flush)
        self._data_dir = data_dir
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        if not os.path.isdir(self._dir):
            os.mkdir(self._dir, mode=0o700)
            self._fsync_dir(data_dir)
        has_marker = self._check_format()
        seg_nos = sorted(int(m.group(1)) for m in map(_SEGMENT_NAME.match, os.listdir(self._dir)) if m)
        try:
            for seg_no in seg_nos:
                self._scan_segment(seg_no, is_last=seg_no == seg_nos[-1])
        except BaseException:
            for fd in self._fds.values():
                os.close(fd)
            raise
        if not seg_nos:
            self._new_segment(1)
        if not has_marker:
            self._write_format()
        logger.info("chunk store %s: %d segments, %d blobs, %d extents, %d chunks",
                    self._dir, len(self._fds), len(self._index), self._extent_count, self._chunk_count)

    # --- start-up -------------------------------------------------------
    def _check_format(self) -> bool:
        """Refuse (StoreFormatError) a FORMAT marker of a newer or unknown store format; True if there is one."""
        path = os.path.join(self._data_dir, FORMAT_FILE)
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read(256)
        except FileNotFoundError:
            return False
        words = text.split()
        if len(words) != 2 or words[0] != "chunk-store" or not words[1].isdigit():
            raise StoreFormatError(path, None, f"unknown format marker {text[:80]!r}")
        if int(words[1]) > STORE_FORMAT:
            raise StoreFormatError(path, None, f"chunk store format {words[1]}")
        return True

    def _write_format(self) -> None:
        """Write the FORMAT marker (temp file, fsync, rename, fsync the directory)."""
        path = os.path.join(self._data_dir, FORMAT_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"chunk-store {STORE_FORMAT}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._fsync_dir(self._data_dir)

    def _scan_segment(self, seg_no: int, is_last: bool) -> None:
        """Replay the records of one segment into the index.

        A whole record of a newer format (StoreFormatError) stops start-up
        with the files untouched: it is data, just not ours to read.  A torn
        record ends the scan of its segment.  In an earlier segment it is
        damage we must not make worse: the bytes after it stay, unindexed.
        In the last segment it may be what a crash mid-append leaves, and
        appends must resume at a record boundary, so the bytes from it to the
        end are cut off, but preserved first (_cut_tail): a crash tears only
        what was written after the last fsync, while a flipped byte in a
        header (bit rot) would otherwise take every good record after it.
        """
        path = os.path.join(self._dir, _segment_name(seg_no))
        fd = os.open(path, (os.O_RDWR | os.O_APPEND if is_last else os.O_RDONLY) | os.O_CLOEXEC)
        self._add_segment(seg_no, fd)
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                kind, blob, first, count, chunk_size, payload_len, end, payload_crc = _read_header(
                    fd, offset, size)
            except _NewerRecord as exc:
                raise StoreFormatError(path, offset, str(exc)) from None
            except _TornRecord as exc:
                if is_last:
                    self._cut_tail(fd, path, offset, size, exc)
                    size = offset
                else:
                    logger.error("%s: bad record at offset %d (%s); ignoring the %d bytes after it",
                                 path, offset, exc, size - offset)
                break
            if kind == KIND_TOMBSTONE:
                self._drop_blob(blob, before_seg=chunk_size)
            elif kind == KIND_DROP:
                self._cut_range(blob, first, count, before_seg=chunk_size)
            else:
                crc_offset = end - payload_len - CRC_BYTES * count
                self._insert(blob, (first, count, chunk_size, seg_no, crc_offset,
                                    crc_offset + CRC_BYTES * count, payload_len, offset, payload_crc))
                self._seg_blobs[seg_no].add(blob)
            offset = end
        self._used_bytes += size
        self._seg_size[seg_no] = size
        if is_last:
            self._tail_seg, self._tail_size = seg_no, size

    def _cut_tail(self, fd: int, path: str, offset: int, size: int, why: _TornRecord) -> None:
        """Cut the newest segment at offset, after copying the bytes cut to TORN_DIR (fsynced).

        Nothing is lost that might be data: the copy is durable before the
        truncation, and a failure to make it (a full disk) raises, so the
        store does not open rather than destroy.  If a whole record follows
        the bad one the cut is damage, not a torn append (logged at ERROR
        with the copy's name; the master re-copies the chunks this node no
        longer lists); if that record is of a newer format, the store refuses
        to open (StoreFormatError) and cuts nothing.
        """
        following = _next_record_at(fd, offset, size)
        if following is not None:
            try:
                _read_header(fd, following, size)
            except _NewerRecord as exc:
                raise StoreFormatError(path, following, str(exc)) from None
        torn_dir = os.path.join(self._data_dir, TORN_DIR)
        if not os.path.isdir(torn_dir):
            os.mkdir(torn_dir, mode=0o700)
            self._fsync_dir(self._data_dir)
        copy = os.path.join(torn_dir, f"{os.path.basename(path)}.at-{offset}")
        n = 0
        while os.path.exists(copy):  # the same offset cut before: keep both
            n += 1
            copy = os.path.join(torn_dir, f"{os.path.basename(path)}.at-{offset}.{n}")
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            pos = offset
            while pos < size:
                data = os.pread(fd, min(1024 * 1024, size - pos), pos)
                if not data:
                    break
                _write_all(out, [data])
                pos += len(data)
            os.fsync(out)
        except OSError:
            os.close(out)
            os.unlink(copy)
            raise
        os.close(out)
        self._fsync_dir(torn_dir)
        if following is None:
            logger.warning("%s: torn record at offset %d (%s); truncating %d bytes (copied to %s)",
                           path, offset, why, size - offset, copy)
        else:
            logger.error("%s: bad record at offset %d (%s) with whole records after it (from offset %d): "
                         "damage, not a torn append; truncating %d bytes, copied to %s",
                         path, offset, why, following, size - offset, copy)
        os.ftruncate(fd, offset)
        os.fsync(fd)

    # --- index (caller holds the lock, or is __init__) -----------------
    @staticmethod
    def _overlapping(extents: list, first: int, count: int) -> tuple[int, int]:
        """Slice bounds of the extents that share a chunk with first..first+count-1."""
        lo = bisect.bisect_left(extents, (first,))
        if lo and extents[lo - 1][FIRST] + extents[lo - 1][COUNT] > first:
            lo -= 1
        return lo, bisect.bisect_left(extents, (first + count,))

    def _insert(self, blob: str, extent: tuple) -> None:
        """Add extent, a whole new record, to the index; it replaces whatever chunks it covers (later wins)."""
        self._cut_range(blob, extent[FIRST], extent[COUNT])
        extents = self._index.setdefault(blob, [])
        extents.insert(bisect.bisect_left(extents, (extent[FIRST],)), extent)
        self._account(extent, +1)
        self._seg_live[extent[SEG_NO]] += HEADER_BYTES + len(blob)

    def _drop_blob(self, blob: str, before_seg: int = 0) -> bool:
        """Forget blob's extents (only those in segments below before_seg, if not 0)."""
        extents = self._index.get(blob)
        if extents is None:
            return False
        keep = []
        for old in extents:
            if before_seg and old[SEG_NO] >= before_seg:
                keep.append(old)
            else:
                self._replace_part(blob, old, [])
        if keep:
            self._index[blob] = keep
        else:
            del self._index[blob]
        return True

    def _cut_range(self, blob: str, first: int, count: int, before_seg: int = 0) -> int:
        """Forget chunks first..first+count-1 of blob; return how many were held.

        The one place a range drop is applied: drop_range(), the replay of a
        drop record, and _insert() (a record replaces the chunks it covers).
        Extents inside the range go; one it cuts into is split into the
        part(s) outside the range, which point into the same record.  With
        before_seg, only extents in segments below it are touched (the segment
        bound of a drop record carried forward by compaction).
        """
        extents = self._index.get(blob)
        if not extents:
            return 0
        lo, hi = self._overlapping(extents, first, count)
        end, kept, dropped = first + count, [], 0
        for old in extents[lo:hi]:
            if before_seg and old[SEG_NO] >= before_seg:
                kept.append(old)
                continue
            old_end = old[FIRST] + old[COUNT]
            parts = ([_part(old, old[FIRST], first - old[FIRST])] if old[FIRST] < first else []) \
                + ([_part(old, end, old_end - end)] if old_end > end else [])
            self._replace_part(blob, old, parts)
            dropped += old[COUNT] - sum(part[COUNT] for part in parts)
            kept += parts
        extents[lo:hi] = kept
        if not extents:
            del self._index[blob]
        return dropped

    def _held(self, blob: str, first: int, count: int) -> int:
        """How many of chunks first..first+count-1 of blob the index holds."""
        extents = self._index.get(blob, [])
        lo, hi = self._overlapping(extents, first, count)
        return sum(min(e[FIRST] + e[COUNT], first + count) - max(e[FIRST], first) for e in extents[lo:hi])

    def _record_parts(self, blob: str, seg_no: int, offset: int, first: int, count: int) -> list[tuple]:
        """The live extents backed by the chunks record (first, count) of blob at seg_no/offset."""
        extents = self._index.get(blob, [])
        lo, hi = self._overlapping(extents, first, count)
        return [e for e in extents[lo:hi] if e[SEG_NO] == seg_no and e[RECORD_OFFSET] == offset]

    def _replace_part(self, blob: str, old: tuple, parts: list) -> None:
        """Account for live extent old giving way to parts, extents of the same record (none: forgotten).

        Segment live bytes count a record's header and blob id once while any
        extent backed by it is live, plus the CRCs and payload of each live
        extent; _split_parts counts the extents of records split in two or more.
        """
        key = (old[SEG_NO], old[RECORD_OFFSET])
        left = self._split_parts.pop(key, 1) - 1 + len(parts)
        if left > 1:
            self._split_parts[key] = left
        self._account(old, -1)
        for part in parts:
            self._account(part, +1)
        if not left:
            self._seg_live[old[SEG_NO]] -= HEADER_BYTES + len(blob)

    def _account(self, extent: tuple, sign: int) -> None:
        """Add (sign +1) or remove (-1) extent's chunks, payload and CRCs+payload bytes; the header is the caller's.

        A record's payload CRC counts with the extent that has it (the whole
        record): once the record is split, it is dead weight compaction drops.
        """
        self._chunk_count += sign * extent[COUNT]
        self._live_bytes += sign * extent[PAYLOAD_LEN]
        self._extent_count += sign
        crc_bytes = CRC_BYTES * extent[COUNT] + (PAYLOAD_CRC_BYTES if extent[PAYLOAD_CRC] is not None else 0)
        self._seg_live[extent[SEG_NO]] += sign * (crc_bytes + extent[PAYLOAD_LEN])

    # --- descriptors (caller holds the lock) ---------------------------
    def _add_segment(self, seg_no: int, fd: int) -> None:
        self._fds[seg_no] = fd
        self._seg_size[seg_no] = self._seg_live[seg_no] = 0
        self._seg_blobs[seg_no] = set()

    def _pin(self, seg_nos) -> list[int]:
        """The fds of seg_nos, each counted as in use until _unpin.

        A segment compaction removes meanwhile is unlinked, but its fd stays
        open until the last pin goes, so a pread already planned still works.
        """
        fds = [self._fds[seg_no] for seg_no in seg_nos]
        for fd in fds:
            self._fd_refs[fd] = self._fd_refs.get(fd, 0) + 1
        return fds

    def _unpin(self, fds: list[int]) -> None:
        """Release pins taken by _pin; close retired fds nobody reads any more.  Takes the lock."""
        with self._lock:
            for fd in fds:
                refs = self._fd_refs.get(fd, 0) - 1
                if refs > 0:
                    self._fd_refs[fd] = refs
                    continue
                self._fd_refs.pop(fd, None)
                if fd in self._retired:
                    self._retired.discard(fd)
                    os.close(fd)

    def _retire_fd(self, fd: int) -> None:
        """Close fd of a removed segment now, or at its last _unpin if readers hold it."""
        if self._fd_refs.get(fd):
            self._retired.add(fd)
        else:
            os.close(fd)

    # --- appending (caller holds the lock) ----------------------------
    def _new_segment(self, seg_no: int) -> None:
        path = os.path.join(self._dir, _segment_name(seg_no))
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._add_segment(seg_no, os.open(path, flags, 0o600))
        self._tail_seg, self._tail_size = seg_no, 0
        self._dir_dirty = True

    def _append(self, buffers: list, length: int) -> tuple[int, int]:
        """Write one record (buffers, length bytes in all); return (seg_no, offset).

        A failed write is cut off again, so a record that fails (ENOSPC) never
        sits in the middle of a segment where the next scan would stop.
        """
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
        self._seg_size[seg_no] += length
        self._used_bytes += length
        return seg_no, offset

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("chunk store is closed")
        if self._failed is not None:
            raise OSError(self._failed.errno or errno.EIO,
                          f"chunk store failed an fsync earlier ({self._failed}); restart the node")

    # --- public API -----------------------------------------------------
    def put(self, blob: str, first: int, count: int, chunk_size: int, crc_bytes, payload,
            crcs_of_payload: bool = False, sent_digests: tuple[int, int] | None = None) -> None:
        """Append count chunks of blob from chunk first as one record.

        Every chunk is checked against crc_bytes before anything is written.
        The record replaces exactly the chunks it covers: stored extents
        inside the range go, one it partly overlaps is split as by
        drop_range() (a repair re-puts the few chunks a node lost of a batch,
        or that a reader could not use, and the rest of that batch stays).
        Raises ChecksumMismatch naming the first bad chunk,
        RemoteProtocolError for a bad blob id, inconsistent sizes or a chunk
        size other than the blob's.  Does not fsync.  ``crcs_of_payload``:
        the caller has just computed crc_bytes from payload (no check).
        ``sent_digests``: the writer's (CRC32 of the payload, CRC32 of
        crc_bytes); the chunks are then checked with those two calls and a
        sample (protocol.verify_batch_digests) instead of one by one.
        """
        blob_id = _check_blob_id(blob)
        crc_bytes, payload = memoryview(crc_bytes).cast("B"), memoryview(payload).cast("B")
        if not (0 <= first and 0 < count <= _MAX_U32 and first + count <= _MAX_U64
                and 0 < chunk_size <= _MAX_U32):
            raise RemoteProtocolError(f"bad range first={first} count={count} chunk_size={chunk_size}")
        if len(crc_bytes) != CRC_BYTES * count or not _payload_fits(count, chunk_size, len(payload)):
            raise RemoteProtocolError(f"{len(crc_bytes)} CRC bytes and {len(payload)} payload bytes "
                                      f"do not make {count} chunks of {chunk_size}")
        if sent_digests is not None and not crcs_of_payload:
            try:
                # Computes the payload CRC from the bytes it checks, as below.
                payload_crc = verify_batch_digests(payload, crc_bytes, chunk_size, *sent_digests)
            except ChecksumMismatch as exc:
                raise ChecksumMismatch(f"blob {blob} chunks {first}..{first + count - 1}: {exc}") from None
        else:
            bad = -1 if crcs_of_payload else verify_chunks(payload, crc_bytes, chunk_size)
            if bad >= 0:
                raise ChecksumMismatch(f"blob {blob} chunk {first + bad}: CRC does not match payload")
            # From the same checked bytes: as end-to-end as the chunk CRCs (see the module docstring).
            payload_crc = zlib.crc32(payload)
        header = _encode_header(KIND_CHUNKS, blob_id, first, count, chunk_size, len(payload), payload_crc)
        length = len(header) + len(crc_bytes) + len(payload)
        with self._lock:
            self._check_open()
            extents = self._index.get(blob, [])
            if extents and extents[0][CHUNK_SIZE] != chunk_size:
                raise RemoteProtocolError(f"blob {blob} has chunk size {extents[0][CHUNK_SIZE]}, not {chunk_size}")
            seg_no, offset = self._append([header, crc_bytes, payload], length)
            self._seg_blobs[seg_no].add(blob)
            crc_offset = offset + len(header)
            self._insert(blob, (first, count, chunk_size, seg_no, crc_offset,
                                crc_offset + len(crc_bytes), len(payload), offset, payload_crc))

    def flush(self) -> None:
        """Make everything put or deleted before this call durable (fsync).

        The fsyncs run outside the main lock so puts go on meanwhile; the
        flush lock makes a second flush wait for one in progress instead of
        returning before the data it should cover is on disk.
        """
        with self._flush_lock:
            with self._lock:
                self._check_open()
                dirty = sorted(self._dirty)
                fds = [self._fds[seg_no] for seg_no in dirty]
                dir_dirty, self._dirty, self._dir_dirty = self._dir_dirty, set(), False
            try:
                for fd in fds:
                    os.fsync(fd)
                if dir_dirty:
                    self._fsync_dir(self._dir)
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the dirty
                # pages and a retried fsync can "succeed" (fsyncgate): nothing
                # written before can be called durable any more.  Fail every
                # later write and flush until a restart rescans the segments.
                with self._lock:
                    self._dirty.update(dirty)
                    self._dir_dirty = self._dir_dirty or dir_dirty
                    self._failed = exc
                logger.error("chunk store %s: fsync failed, refusing writes until restart: %s", self._dir, exc)
                raise

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _locate(self, blob: str, first: int, count: int, gaps: list | None = None) -> list[tuple]:
        """(extent, skip, take) pieces covering the stored chunks of the range, in order.

        A chunk not stored raises ChunkNotFound, or, when gaps is a list, is
        added to it as part of a (first, count) run and skipped.
        """
        if first < 0 or count <= 0:
            raise RemoteProtocolError(f"bad range first={first} count={count}")
        extents = self._index.get(blob)
        if not extents:
            raise ChunkNotFound(f"blob {blob} not stored")
        pieces, pos, end = [], first, first + count
        i = max(bisect.bisect_right(extents, (first, _MAX_U64 + 1)) - 1, 0)
        while pos < end:
            if i < len(extents) and extents[i][FIRST] + extents[i][COUNT] <= pos:
                i += 1  # only the first extent looked at can end before the range
                continue
            if i == len(extents) or extents[i][FIRST] > pos:
                if gaps is None:
                    raise ChunkNotFound(f"blob {blob} chunk {pos} not stored")
                stop = end if i == len(extents) else min(end, extents[i][FIRST])
                gaps.append((pos, stop - pos))
                pos = stop
                continue
            extent = extents[i]
            skip = pos - extent[FIRST]
            take = min(extent[COUNT] - skip, end - pos)
            pieces.append((extent, skip, take))
            pos += take
            i += 1
        return pieces

    def _read(self, blob: str, first: int, count: int, gaps: list | None) -> tuple[int, bytes, bytes, list]:
        """Chunks first..first+count-1 as stored, unverified: (chunk_size, crc_bytes, payload, parts).

        parts lists (extent, chunk, take, crc_at, payload_at, payload_len) of
        each extent read: its chunks chunk..chunk+take-1 sit at those offsets
        of crc_bytes and payload.  Chunks not stored raise ChunkNotFound, or
        with gaps a list are added to it and read as zeros (chunk_size bytes,
        CRCs too) so the chunks after them keep their places; ChunkNotFound
        still if none of the range is stored.  A short read is padded with
        zeros (it then fails its CRC).  Two preads per extent, none per chunk.
        """
        with self._lock:
            self._check_open()
            pieces = self._locate(blob, first, count, gaps)
            if not pieces:
                raise ChunkNotFound(f"blob {blob} chunks {first}..{first + count - 1} not stored")
            fds = self._pin(extent[SEG_NO] for extent, _, _ in pieces)
        chunk_size = pieces[0][0][CHUNK_SIZE]
        if count * (chunk_size + CRC_BYTES) > MAX_BODY_BYTES:
            # The answer must fit one frame; refuse before reading gigabytes.
            self._unpin(fds)
            raise RemoteProtocolError(f"{count} chunks of {chunk_size} bytes do not fit one reply")
        reads = sorted([(extent[FIRST] + skip, take, extent, skip, fd) for (extent, skip, take), fd in zip(pieces, fds)]
                       + [(gap_first, gap_count, None, 0, None) for gap_first, gap_count in gaps or ()],
                       key=lambda item: item[0])
        crc_parts, payload_parts, parts = [], [], []
        crc_at = payload_at = 0
        try:
            for n, (chunk, take, extent, skip, fd) in enumerate(reads):
                if extent is None:
                    crcs, data = bytes(CRC_BYTES * take), bytes(chunk_size * take)
                else:
                    start = skip * chunk_size
                    stop = min((skip + take) * chunk_size, extent[PAYLOAD_LEN])
                    # A short chunk may only end the answer, or the chunks would shift.
                    if extent[CHUNK_SIZE] != chunk_size or (n < len(reads) - 1 and stop - start != take * chunk_size):
                        raise RemoteProtocolError(f"blob {blob} mixes chunk sizes in chunks {first}+{count}")
                    crcs = os.pread(fd, CRC_BYTES * take, extent[CRC_OFFSET] + CRC_BYTES * skip)
                    data = os.pread(fd, stop - start, extent[PAYLOAD_OFFSET] + start)
                    crcs += bytes(CRC_BYTES * take - len(crcs))
                    data += bytes(stop - start - len(data))
                    parts.append((extent, chunk, take, crc_at, payload_at, len(data)))
                crc_parts.append(crcs)
                payload_parts.append(data)
                crc_at += len(crcs)
                payload_at += len(data)
        finally:
            self._unpin(fds)
        crc_bytes = crc_parts[0] if len(crc_parts) == 1 else b"".join(crc_parts)
        payload = payload_parts[0] if len(payload_parts) == 1 else b"".join(payload_parts)
        return chunk_size, crc_bytes, payload, parts

    def get(self, blob: str, first: int, count: int) -> tuple[int, bytes, bytes]:
        """(chunk_size, crc_bytes, payload) of chunks first..first+count-1 of blob.

        Every chunk is checked against its stored CRC.  Raises ChunkNotFound if
        any chunk is missing, ChecksumMismatch naming blob and chunk if one is
        damaged.  Two preads per extent (CRCs, payload), none per chunk.
        """
        chunk_size, crc_bytes, payload, _ = self._read(blob, first, count, None)
        bad = verify_chunks(payload, crc_bytes, chunk_size)
        if bad >= 0:
            raise ChecksumMismatch(f"blob {blob} chunk {first + bad}: stored CRC does not match data")
        return chunk_size, crc_bytes, payload

    def get_intact(self, blob: str, first: int, count: int,
                   verify: bool = True) -> tuple[int, bytes, bytes, list, list]:
        """(chunk_size, crc_bytes, payload, missing, corrupt): every chunk of the range that is intact.

        Like get(), but a chunk that is not stored or fails its CRC does not
        fail the call: it is listed in missing or corrupt, as part of a sorted
        (first, count) run, and its CRC and bytes are zeros (a whole
        chunk_size for a missing one), so the other chunks keep their places
        and a reader can fetch just those chunks elsewhere.  Corrupt chunks
        are dropped at once, as by drop_range(), unless what was read has
        been replaced or moved since: never served again, and gone from the
        inventory.  ``verify=False`` checks no CRC (a client's read: the
        client checks every one, and the master reads a copy it reports
        before anything changes), so nothing is listed corrupt or dropped.
        Does not fsync (call flush).  Raises ChunkNotFound if no
        chunk of the range is stored, RemoteProtocolError as get().
        """
        missing: list[tuple[int, int]] = []
        chunk_size, crc_bytes, payload, parts = self._read(blob, first, count, missing)
        if not verify:
            return chunk_size, crc_bytes, payload, missing, []
        if verify_chunks(payload, crc_bytes, chunk_size) < 0 and not missing:
            return chunk_size, crc_bytes, payload, [], []
        damaged = []  # (extent, first, count) of each bad run, per extent read
        for extent, chunk, take, crc_at, payload_at, payload_len in parts:
            damaged += [(extent, chunk + index, n) for index, n in bad_chunk_ranges(
                memoryview(payload)[payload_at:payload_at + payload_len],
                memoryview(crc_bytes)[crc_at:crc_at + CRC_BYTES * take], chunk_size)]
        if not damaged:
            return chunk_size, crc_bytes, payload, missing, []
        corrupt = [(bad_first, bad_count) for _, bad_first, bad_count in damaged]
        crc_bytes, payload = bytearray(crc_bytes), bytearray(payload)
        for extent, bad_first, bad_count in damaged:
            skip = bad_first - first  # missing chunks before it are chunk_size zeros: offsets hold
            crc_bytes[CRC_BYTES * skip:CRC_BYTES * (skip + bad_count)] = bytes(CRC_BYTES * bad_count)
            stop = min((skip + bad_count) * chunk_size, len(payload))
            payload[skip * chunk_size:stop] = bytes(stop - skip * chunk_size)
        with self._lock:
            self._check_open()
            for extent, bad_first, bad_count in damaged:
                for dropped_first, dropped_count in self._drop_if_from(blob, bad_first, bad_count, extent):
                    logger.warning("chunk store %s: blob %s chunks %d+%d fail their CRCs on read; dropped",
                                   self._dir, blob, dropped_first, dropped_count)
        return chunk_size, bytes(crc_bytes), bytes(payload), missing, corrupt

    def open_span(self, blob: str, first: int, count: int) -> "Span | None":
        """Where chunks first..first+count-1 of blob lie, when one extent holds them all: a pinned Span, or None.

        For a client's read, which the node answers without looking at the
        bytes (storage_node.py sends them with sendfile): the reply body, the
        chunks' CRCs then their payload, as one or two byte ranges of one
        segment, and the record's payload CRC when the span is a whole record.
        Nothing is checked (the client checks).  The segment's descriptor
        stays pinned (a compaction that moves the record meanwhile leaves it
        open) until close_span().  None if no one extent holds the range
        (chunks missing, or spread over records, or more than a reply may
        carry): read it with get_intact() instead.
        """
        with self._lock:
            self._check_open()
            extents = self._index.get(blob)
            if not extents or first < 0 or count <= 0:
                return None
            i = bisect.bisect_right(extents, (first, _MAX_U64 + 1)) - 1
            if i < 0 or extents[i][FIRST] + extents[i][COUNT] < first + count:
                return None
            extent = extents[i]
            if count * (extent[CHUNK_SIZE] + CRC_BYTES) > MAX_BODY_BYTES:
                return None
            if (first, count) != (extent[FIRST], extent[COUNT]):
                extent = _part(extent, first, count)
            (fd,) = self._pin([extent[SEG_NO]])
        return Span(fd, extent)

    def read_span(self, span: "Span") -> bytearray:
        """The body a Span stands for, read into one buffer (where sendfile cannot serve: TLS).

        A short read leaves zeros, which fail their CRCs at the reader.
        """
        body = bytearray(span.body_len)
        view, at = memoryview(body), 0
        for offset, length in span.ranges:
            os.preadv(span.fd, [view[at:at + length]], offset)
            at += length
        return body

    def close_span(self, span: "Span") -> None:
        """Unpin the descriptor an open_span() pinned."""
        self._unpin([span.fd])

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

    def forget_blobs(self, blobs) -> int:
        """Forget each stored blob of blobs in memory only, writing nothing; return how many were stored.

        For a disk too full to take even a tombstone (delete_blobs raised
        ENOSPC): the blobs' records are dead at once, so compaction can
        reclaim their segments and free the space, but a restart before it
        has finds them again (the master then reconciles them as orphans).
        """
        blobs = list(blobs)
        for blob in blobs:
            _check_blob_id(blob)
        with self._lock:
            self._check_open()
            return sum(self._drop_blob(blob) for blob in dict.fromkeys(blobs))

    def forget_range(self, blob: str, first: int, count: int) -> int:
        """drop_range() in memory only, writing nothing: see forget_blobs.  Returns the chunks held."""
        _check_blob_id(blob)
        if not (0 <= first and 0 < count <= _MAX_U32 and first + count <= _MAX_U64):
            raise RemoteProtocolError(f"bad range first={first} count={count}")
        with self._lock:
            self._check_open()
            return self._cut_range(blob, first, count)

    def drop_range(self, blob: str, first: int, count: int) -> int:
        """Forget chunks first..first+count-1 of blob, now and after a restart; return how many were held.

        The range need not match extents: those inside it are dropped, one it
        cuts into is split and keeps its chunks outside the range (see the
        index notes).  Appends one drop record (kind 3) holding the range, so
        the chunks, and any older copy of them in a segment not yet compacted,
        stay gone across restarts.  Returns 0, and writes nothing, if no chunk
        of the range is held.  Raises RemoteProtocolError for a bad blob id or
        range (count must fit a record, 1..2**32-1).  Does not fsync (call flush).
        """
        _check_blob_id(blob)
        if not (0 <= first and 0 < count <= _MAX_U32 and first + count <= _MAX_U64):
            raise RemoteProtocolError(f"bad range first={first} count={count}")
        with self._lock:
            self._check_open()
            return self._write_drop(blob, first, count)[1]

    def _drop_if_from(self, blob: str, first: int, count: int, extent: tuple) -> list[tuple[int, int]]:
        """Drop the chunks of first..first+count-1 of blob still served from extent's record; the runs dropped.

        For chunks found corrupt in a read of that record: chunks re-put or
        moved by compaction since are another copy (compaction checks what
        it moves) and stay.  Caller holds the lock.  Does not fsync.
        """
        record = (extent[SEG_NO], extent[RECORD_OFFSET])
        extents = self._index.get(blob, [])
        lo, hi = self._overlapping(extents, first, count)
        dropped = []
        for held in extents[lo:hi]:  # a copy: _write_drop changes the list
            if (held[SEG_NO], held[RECORD_OFFSET]) == record:
                start = max(held[FIRST], first)
                dropped.append((start, min(held[FIRST] + held[COUNT], first + count) - start))
        for dropped_first, dropped_count in dropped:
            self._write_drop(blob, dropped_first, dropped_count)
        return dropped

    def _write_drop(self, blob: str, first: int, count: int) -> tuple[int, int]:
        """Append a drop record for the range and forget its chunks: (bytes written, chunks dropped).

        Writes nothing if no chunk of the range is held.  Caller holds the lock.
        """
        if not self._held(blob, first, count):
            return 0, 0
        record = _encode_header(KIND_DROP, blob.encode("ascii"), first, count, 0, 0)
        self._append([record], len(record))
        return len(record), self._cut_range(blob, first, count)

    # --- compaction -----------------------------------------------------
    def segment_stats(self) -> list[dict]:
        """One dict per segment, oldest first: seg_no, size_bytes, live_bytes, live_fraction, is_active.

        live_bytes counts whole records (header, blob id, CRCs, payload) the
        index still points at; tombstones and drop records count as dead.  Of
        a record split by drop_range(), it counts the header and blob id once
        while any part is live, plus the CRCs and payload of the live parts.  An
        empty segment has live_fraction 0.0.  is_active marks the segment
        appends go to, which compact() leaves alone.
        """
        with self._lock:
            self._check_open()
            return [{"seg_no": seg_no, "size_bytes": size, "live_bytes": self._seg_live[seg_no],
                     "live_fraction": self._seg_live[seg_no] / size if size else 0.0,
                     "is_active": seg_no == self._tail_seg}
                    for seg_no, size in sorted(self._seg_size.items())]

    def compact(self, min_dead_fraction: float = 0.5, max_bytes_per_s: float | None = None,
                min_dead_bytes: int | None = None) -> dict:
        """Rewrite mostly dead segments; return {"segments_compacted", "bytes_reclaimed", "corrupt", "postponed"}.

        A segment is compacted if it is not the active one and its dead bytes
        (size - live_bytes, see segment_stats) are at least min_dead_fraction
        of its size: 0.5 rewrites segments at most half live, 1.0 only those
        with nothing live, 0.0 every non-active segment.  Each one's live
        records are appended to the active segment after their CRCs are
        checked again, each repointed in the index in the same lock hold as
        its append (a get() sees the old or the new copy, both whole); then
        the copies are fsynced and the old file is unlinked and the directory
        fsynced.  Tombstones and drop records are copied only if an older
        segment still holds records of their blob, with a segment bound (see
        the record layout).  A segment with nothing to copy is just unlinked.

        Space: the copies are written before the old file goes, so a segment
        needs free space for its live bytes.  Segments with nothing live go
        first (oldest first; they need a few bytes at most, for carried
        tombstones), then the others oldest first.  A segment whose live
        bytes the filesystem has no room for (disk_free_bytes()) is shrunk
        from its end instead, as far as the room allows (_shrink_segment:
        room for one record at a time is enough).  One not freed whole, or
        whose copying hits ENOSPC midway (the copies made so far are valid;
        the rest stays where it is), is listed in "postponed" by segment
        number.  So a full disk never makes compaction fail: it reclaims
        what it can and goes on at the next call.

        Of a record split by drop_range(), only the live parts are copied,
        each as a new record of its range.  Chunks whose CRCs no longer match
        are not copied: they are dropped as by drop_range() and listed in
        "corrupt" as (blob, first, count) runs so the node can report them;
        the rest of their extent is copied.
        bytes_reclaimed is the size of the unlinked segments minus the bytes
        appended.  With max_bytes_per_s, sleeps (outside the lock) so
        records are copied no faster than that.  With min_dead_bytes, a
        segment with at least that many dead bytes is compacted whatever its
        dead fraction (a full node: a deleted file must give its space back
        even if it is a small part of a large segment).
        Raises ValueError for a fraction outside 0..1 or a rate <= 0.
        """
        if not 0.0 <= min_dead_fraction <= 1.0:
            raise ValueError(f"min_dead_fraction {min_dead_fraction} not in 0..1")
        if max_bytes_per_s is not None and max_bytes_per_s <= 0:
            raise ValueError(f"max_bytes_per_s {max_bytes_per_s} must be > 0")
        result = {"segments_compacted": 0, "bytes_reclaimed": 0, "corrupt": [], "postponed": []}
        started, copied = time.monotonic(), 0

        def pace(nbytes: int) -> None:
            nonlocal copied
            copied += nbytes
            if max_bytes_per_s:
                ahead_s = copied / max_bytes_per_s - (time.monotonic() - started)
                if ahead_s > 0:
                    time.sleep(ahead_s)

        with self._compact_lock:
            with self._lock:
                self._check_open()
                # Wholly dead segments first: they free space without needing any.
                victims = sorted((self._seg_live[seg_no] > 0, seg_no) for seg_no, size in self._seg_size.items()
                                 if seg_no != self._tail_seg
                                 and _dead_enough(size, self._seg_live[seg_no], min_dead_fraction, min_dead_bytes))
            short = None  # (live bytes needed, bytes free) of the first segment postponed for room
            for _, seg_no in victims:
                with self._lock:
                    live = self._seg_live[seg_no]
                free = self.disk_free_bytes() if live else None
                try:
                    if free is not None and live + COMPACT_MARGIN_BYTES > free:
                        cut, written = self._shrink_segment(seg_no, result["corrupt"], pace)
                        result["bytes_reclaimed"] += cut - written
                        with self._lock:
                            done = self._seg_size[seg_no] == 0
                        if not done:
                            result["postponed"].append(seg_no)
                            short = short or (live, free)
                            continue
                        written = 0
                    else:
                        written = self._copy_segment(seg_no, result["corrupt"], pace)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    result["postponed"].append(seg_no)
                    short = short or (live, self.disk_free_bytes())
                    continue
                freed = self._remove_segment(seg_no)
                if freed or seg_no not in self._seg_size:
                    result["segments_compacted"] += 1
                result["bytes_reclaimed"] += freed - written
        postponed = frozenset(result["postponed"])
        if postponed and postponed != self._postponed:
            # Once per change, not once per pass: a full disk is a state, not news every interval.
            logger.warning("chunk store %s: compaction of %d segment(s) postponed for lack of disk space "
                           "(%s live bytes to copy, %s bytes free); it resumes once space is freed",
                           self._dir, len(postponed), *short)
        self._postponed = postponed
        if result["segments_compacted"] or result["corrupt"]:
            logger.info("chunk store %s: compacted %d segments, reclaimed %d bytes, %d corrupt extents",
                        self._dir, result["segments_compacted"], result["bytes_reclaimed"], len(result["corrupt"]))
        return result

    def roll_if_dead(self, min_dead_fraction: float, min_bytes: int, min_dead_bytes: int | None = None) -> bool:
        """Start a new active segment if the current one holds min_bytes or more, min_dead_fraction
        (or min_dead_bytes, see compact) dead.

        compact() leaves the active segment alone, and a segment rolls only
        once it is full, which on a full disk it never is: without this, the
        space of an aborted upload or of files deleted soon after upload
        would stay taken until unrelated writes filled the segment.  Rolling
        makes it a candidate for the next compact().  Returns True if it
        rolled.  Raises OSError if the new segment cannot be created.
        """
        with self._lock:
            self._check_open()
            size = self._tail_size
            if not size or size < min_bytes or not _dead_enough(size, self._seg_live[self._tail_seg],
                                                                min_dead_fraction, min_dead_bytes):
                return False
            self._new_segment(self._tail_seg + 1)
            return True

    def disk_free_bytes(self) -> int | None:
        """Bytes free on the filesystem of the segments for an unprivileged writer (statvfs), None if unknown."""
        try:
            st = self._statvfs(self._dir)
        except OSError as exc:
            logger.warning("chunk store %s: cannot read free space: %s", self._dir, exc)
            return None
        return st.f_bavail * st.f_frsize

    def _copy_segment(self, seg_no: int, corrupt: list, pace) -> int:
        """Copy what must outlive segment seg_no to the active one; return the bytes appended.

        Reads seg_no's fd without a pin: only compaction (one at a time) removes
        segments, and seg_no is not the active one, so nothing writes to it.
        """
        with self._lock:
            self._check_open()
            fd, size = self._fds[seg_no], self._seg_size[seg_no]
        offset = written = 0
        while offset < size:
            try:
                kind, blob, first, count, chunk_size, payload_len, end, _ = _read_header(fd, offset, size)
            except _TornRecord as exc:
                # Start-up stopped here too, unless the damage is newer; then
                # live records after it stay and _remove_segment keeps the file.
                logger.error("%s: bad record at offset %d (%s) while compacting",
                             _segment_name(seg_no), offset, exc)
                break
            if kind == KIND_CHUNKS:
                nbytes = self._copy_record(seg_no, fd, offset, end, blob, first, count, chunk_size, corrupt)
                written += nbytes
                pace(nbytes)
            else:
                written += self._carry_forward(seg_no, kind, blob, first, count, chunk_size)
            offset = end
        return written

    def _copy_record(self, seg_no: int, fd: int, offset: int, end: int, blob: str, first: int,
                     count: int, chunk_size: int, corrupt: list) -> int:
        """Append the live extents of the chunks record at seg_no/offset, dropping corrupt chunks; return bytes appended.

        Each live extent the record backs (the whole record, or the parts a
        drop_range() left) becomes a record of its own, after its CRCs are
        checked; of one that fails, only the chunks that fail are dropped
        (and listed in corrupt) and the rest is copied.  The check runs
        outside the lock; extents of a record can only shrink meanwhile, so
        one inside an extent found good is good too, and any other is
        checked again under the lock (rare).
        """
        with self._lock:
            checked = self._record_parts(blob, seg_no, offset, first, count)
        if not checked:
            return 0  # replaced or deleted: this is the space we reclaim
        view = memoryview(os.pread(fd, end - offset, offset))
        good = [part for part in checked if not self._part_damage(view, offset, part)]
        written = 0
        with self._lock:
            self._check_open()
            for part in self._record_parts(blob, seg_no, offset, first, count):
                part_end = part[FIRST] + part[COUNT]
                if any(g[FIRST] <= part[FIRST] and part_end <= g[FIRST] + g[COUNT] for g in good):
                    continue
                for index, bad_count in self._part_damage(view, offset, part):
                    logger.warning("%s: blob %s chunks %d+%d fail their CRCs; dropped, not copied",
                                   _segment_name(seg_no), blob, part[FIRST] + index, bad_count)
                    corrupt.append((blob, part[FIRST] + index, bad_count))
                    written += self._write_drop(blob, part[FIRST] + index, bad_count)[0]
            # Every part left now is intact: checked above, or inside a good one.
            for part in self._record_parts(blob, seg_no, offset, first, count):
                crc_start, payload_start = part[CRC_OFFSET] - offset, part[PAYLOAD_OFFSET] - offset
                payload = view[payload_start:payload_start + part[PAYLOAD_LEN]]
                # Of the bytes just checked against the writer's chunk CRCs, as put() does:
                # a part of a split record gets one too, a damaged stored one is not carried.
                payload_crc = zlib.crc32(payload)
                header = _encode_header(KIND_CHUNKS, blob.encode("ascii"), part[FIRST], part[COUNT],
                                        part[CHUNK_SIZE], part[PAYLOAD_LEN], payload_crc)
                length = len(header) + CRC_BYTES * part[COUNT] + part[PAYLOAD_LEN]
                new_seg, new_offset = self._append(
                    [header, view[crc_start:crc_start + CRC_BYTES * part[COUNT]], payload], length)
                self._seg_blobs[new_seg].add(blob)
                crc_offset = new_offset + len(header)
                # Replaces part (same range) in the index, in this lock hold.
                self._insert(blob, part[:SEG_NO] + (new_seg, crc_offset, crc_offset + CRC_BYTES * part[COUNT],
                                                    part[PAYLOAD_LEN], new_offset, payload_crc))
                written += length
        return written

    @staticmethod
    def _part_damage(record: memoryview, offset: int, part: tuple) -> list[tuple[int, int]]:
        """Runs (index in part, count) of extent part's chunks that fail their CRCs or are cut short; [] if intact.

        record is the bytes read from offset on.
        """
        crc_start, payload_start = part[CRC_OFFSET] - offset, part[PAYLOAD_OFFSET] - offset
        crcs = record[crc_start:crc_start + CRC_BYTES * part[COUNT]]
        if len(crcs) != CRC_BYTES * part[COUNT]:
            return [(0, part[COUNT])]
        return bad_chunk_ranges(record[payload_start:payload_start + part[PAYLOAD_LEN]], crcs, part[CHUNK_SIZE])

    def _carry_forward(self, seg_no: int, kind: int, blob: str, first: int, count: int, bound: int,
                       own_segment: bool = False) -> int:
        """Re-append a tombstone or drop record of segment seg_no if still needed; return bytes appended.

        It is needed while a segment older than what it covers still holds
        records of blob, or a restart would bring them back.  The copy says
        which segments it covers (bound), so it cannot hide chunks put after
        the original was written but before the copy.  With own_segment (the
        start of seg_no stays, see _shrink_segment), it covers seg_no too:
        what followed the original there has been moved or was dead.
        """
        with self._lock:
            self._check_open()
            if not self._carry_needed(seg_no, blob, bound, own_segment):
                return 0
            bound = bound or (seg_no + 1 if own_segment else seg_no)
            record = _encode_header(kind, blob.encode("ascii"), first, count, bound, 0)
            self._append([record], len(record))
            return len(record)

    def _carry_needed(self, seg_no: int, blob: str, bound: int, own_segment: bool) -> bool:
        """True if a tombstone or drop record of seg_no with this bound still covers records of blob.

        Caller holds the lock.
        """
        bound = bound or (seg_no + 1 if own_segment else seg_no)
        return any(older < bound and blob in blobs for older, blobs in self._seg_blobs.items())

    def _records(self, seg_no: int) -> list[tuple] | None:
        """(offset, end, kind, blob, first, count, chunk_size) of each record of seg_no; None past a bad one."""
        with self._lock:
            self._check_open()
            fd, size = self._fds[seg_no], self._seg_size[seg_no]
        records, offset = [], 0
        while offset < size:
            try:
                kind, blob, first, count, chunk_size, payload_len, end, _ = _read_header(fd, offset, size)
            except _TornRecord:
                return None  # what follows may be live, or garbage: leave the segment alone
            records.append((offset, end, kind, blob, first, count, chunk_size))
            offset = end
        return records

    def _shrink_segment(self, seg_no: int, corrupt: list, pace) -> tuple[int, int]:
        """Free non-active segment seg_no from its end, as far as free space allows: (bytes cut, bytes appended).

        For a disk without room to copy a segment's live bytes at once: the
        last records are handled as compaction would (live parts copied to
        the active segment, tombstones and drop records carried forward
        covering seg_no itself), as many as disk_free_bytes() has room for,
        then, once the copies are fsynced, the file is truncated before them.
        Each round frees the dead bytes among them, so rounds go on until the
        file is empty (the caller unlinks it) or not one more record fits.
        The truncation waits for readers that pinned the segment before
        their extents moved (up to _UNPIN_WAIT_S; else it stops there).
        """
        records = self._records(seg_no)
        path = os.path.join(self._dir, _segment_name(seg_no))
        cut_total = written = 0
        while records:
            room = (self.disk_free_bytes() or 0) - SHRINK_MARGIN_BYTES
            keep = len(records)
            with self._lock:
                fd = self._fds[seg_no]
            while keep:
                offset, end, kind, blob, first, count, chunk_size = records[keep - 1]
                with self._lock:
                    self._check_open()
                    if kind == KIND_CHUNKS:
                        need = sum(len(blob) + HEADER_BYTES + PAYLOAD_CRC_BYTES + CRC_BYTES * part[COUNT]
                                   + part[PAYLOAD_LEN] for part in self._record_parts(blob, seg_no, offset, first, count))
                    else:
                        need = len(blob) + HEADER_BYTES if self._carry_needed(seg_no, blob, chunk_size, True) else 0
                if need and need > room:  # dead records need no room: cutting them only frees
                    break
                if kind == KIND_CHUNKS:
                    nbytes = self._copy_record(seg_no, fd, offset, end, blob, first, count, chunk_size, corrupt)
                    pace(nbytes)
                else:
                    nbytes = self._carry_forward(seg_no, kind, blob, first, count, chunk_size, own_segment=True)
                room -= nbytes
                written += nbytes
                keep -= 1
            if keep == len(records):
                break  # not one more record fits
            cut_at = records[keep][0]
            self.flush()  # the copies are durable before the originals go
            if not self._wait_unpinned(fd):
                break
            with self._lock:
                size = self._seg_size[seg_no]
                os.truncate(path, cut_at)
                self._seg_size[seg_no] = cut_at
                self._used_bytes -= size - cut_at
            os.fsync(fd)  # the segment's own descriptor: fsync needs no write access
            cut_total += size - cut_at
            records = records[:keep]
        return cut_total, written

    def _wait_unpinned(self, fd: int) -> bool:
        """Wait until no reader pins fd (at most _UNPIN_WAIT_S); True if none does."""
        deadline = time.monotonic() + _UNPIN_WAIT_S
        while True:
            with self._lock:
                if not self._fd_refs.get(fd):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def _remove_segment(self, seg_no: int) -> int:
        """fsync the copies, unlink segment seg_no, fsync the directory; return its size (0 if kept)."""
        # After this flush seg_no is not dirty and nothing writes to it again,
        # so no flush() can be fsyncing its fd when it is closed below.
        self.flush()
        with self._lock:
            if self._seg_live[seg_no]:
                logger.error("%s: %d live bytes could not be copied; segment kept",
                             _segment_name(seg_no), self._seg_live[seg_no])
                return 0
        os.unlink(os.path.join(self._dir, _segment_name(seg_no)))
        self._fsync_dir(self._dir)
        with self._lock:
            fd, size = self._fds.pop(seg_no), self._seg_size.pop(seg_no)
            del self._seg_live[seg_no], self._seg_blobs[seg_no]
            self._dirty.discard(seg_no)
            self._used_bytes -= size
            self._retire_fd(fd)
        return size

    # --- scrubbing ------------------------------------------------------
    def scrub_step(self, cursor, max_bytes: int) -> tuple[object, list[tuple[str, int, int]]]:
        """Check the next live extents against their stored CRCs: (new_cursor, dropped).

        Start a pass with cursor None and pass each returned cursor back in;
        the cursor is opaque (it holds the pass's list of blob ids).  Each call
        reads at least one extent and stops adding extents once their payload
        reaches max_bytes.  new_cursor is None when the pass is complete: the
        next call with None starts over (blobs stored since are seen then).
        A part left by drop_range() is an extent of its own.  Chunks whose
        data no longer matches their CRCs (or reads short) are dropped, as by
        drop_range(), only those chunks, and listed as (blob, first, count)
        runs in dropped for the node to report; chunks re-put or moved by
        compaction since they were read are another copy and stay.  Does not
        fsync (call flush).  Holds the lock only to pick extents and to drop;
        reads outside it.
        """
        with self._lock:
            self._check_open()
            blobs, pos, next_first = (tuple(self._index), 0, 0) if cursor is None else cursor
            picked, total = [], 0
            while pos < len(blobs) and (not picked or total < max_bytes):
                extents = self._index.get(blobs[pos], [])
                i = bisect.bisect_left(extents, (next_first,))
                while i < len(extents) and (not picked or total < max_bytes):
                    picked.append((blobs[pos], extents[i]))
                    total += extents[i][PAYLOAD_LEN]
                    next_first = extents[i][FIRST] + 1
                    i += 1
                if i == len(extents):
                    pos, next_first = pos + 1, 0
            fds = self._pin(extent[SEG_NO] for _, extent in picked)
        suspects = []
        try:
            for (blob, extent), fd in zip(picked, fds):
                # Two reads: in a part of a split record, CRCs and payload are not adjacent.
                crcs = os.pread(fd, CRC_BYTES * extent[COUNT], extent[CRC_OFFSET])
                payload = os.pread(fd, extent[PAYLOAD_LEN], extent[PAYLOAD_OFFSET])
                crcs += bytes(CRC_BYTES * extent[COUNT] - len(crcs))  # short reads fail their CRCs
                bad = bad_chunk_ranges(payload, crcs, extent[CHUNK_SIZE])
                if bad:
                    suspects.append((blob, extent, bad))
        finally:
            self._unpin(fds)
        dropped = []
        if suspects:
            with self._lock:
                self._check_open()
                for blob, extent, bad in suspects:
                    for index, count in bad:
                        for run in self._drop_if_from(blob, extent[FIRST] + index, count, extent):
                            logger.warning("chunk store %s: blob %s chunks %d+%d fail their CRCs; dropped",
                                           self._dir, blob, *run)
                            dropped.append((blob, *run))
        return (blobs, pos, next_first) if pos < len(blobs) else None, dropped

    def inventory(self) -> dict[str, list[tuple[int, int]]]:
        """blob -> sorted (first, count) of every extent held, for reconciliation."""
        with self._lock:
            return {blob: [(e[FIRST], e[COUNT]) for e in extents] for blob, extents in self._index.items()}

    def bytes_of(self, blobs) -> int:
        """Payload bytes held of the listed blobs (0 for blobs not held)."""
        with self._lock:
            return sum(extent[PAYLOAD_LEN] for blob in blobs for extent in self._index.get(blob, ()))

    def holds(self, blob: str) -> bool:
        """True if some chunk of ``blob`` is stored."""
        return blob in self._index

    def iter_inventory(self, slice_extents: int = 4096):
        """Yield (blob, sorted [(first, count), ...]) slices of the inventory, blobs in sorted order.

        At most ``slice_extents`` extents per slice; a blob with more comes
        in consecutive slices.  The lock is taken per slice, so a node with a
        million extents never copies its whole index at once nor stalls its
        writers meanwhile.  Extents stored or dropped during the walk may or
        may not be seen (reconciliation allows for that: see repair.py).
        """
        with self._lock:
            blobs = sorted(self._index)
        for blob in blobs:
            next_first = 0
            while True:
                with self._lock:
                    extents = self._index.get(blob, [])
                    start = bisect.bisect_left(extents, (next_first,))
                    part = [(e[FIRST], e[COUNT]) for e in extents[start:start + slice_extents]]
                if part:
                    yield blob, part
                if len(part) < slice_extents:
                    break
                next_first = part[-1][0] + 1

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
        """Index entries held: one per live record (or live part of a split one), never one per chunk."""
        return self._extent_count

    def close(self) -> None:
        """Close every segment file; idempotent.  Call flush() first to keep unsynced data."""
        with self._lock:
            self._closed = True
            fds = list(self._fds.values()) + list(self._retired)
            self._fds, self._retired, self._fd_refs = {}, set(), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
