"""Wire protocol of the backup system: framing, messages, error codes, limits.

This module is sans-IO: it turns messages into bytes and bytes into messages
and never touches a socket, a thread or a clock.  The only I/O helpers,
``read_message`` and ``write_message``, work on any file-like object, so a
socket's ``makefile()`` and an ``io.BytesIO`` are interchangeable.

Frame layout (all integers unsigned big-endian)::

    +----------------+---------------------------+------------------------+
    | 4 bytes: H     | H bytes: header           | B bytes: body          |
    | header length  | UTF-8 JSON object         | opaque binary (B >= 0) |
    +----------------+---------------------------+------------------------+

The header is a JSON object with the operation in ``"op"``, the message's
fields, and, when the frame has a body, its length in ``"body"``.  Example,
the frame that carries 3 bytes of file data::

    b'\\x00\\x00\\x00\\x16{"op":"DATA","body":3}abc'

Bodies carry file data and nothing else, so a byte of file data is never
escaped, parsed or copied into a Python object per chunk.  A body that
carries chunks (``PUT_CHUNKS``, ``CHUNK_DATA``) starts with one CRC32 per
chunk (4 bytes each, big-endian) followed by the chunk payloads back to back.

Every limit below is checked *before* anything of that size is allocated, so
a hostile length field costs the reader nothing.  A frame that breaks the
rules raises ``RemoteProtocolError``; servers answer it with an ``ERROR``
frame and close the connection.

Left out on purpose: compression (backups are often already compressed) and
multiplexing (one request at a time per connection, pipelined in order).
"""

from __future__ import annotations

import array
import functools
import json
import sys
import threading
import unicodedata
import zlib
from dataclasses import MISSING, Field, dataclass, field

PROTOCOL_VERSION = 1

# --- limits ---------------------------------------------------------------
# A header holds metadata only (names, counts, one page of a list: see
# PAGE_BYTES), never file data; 256 KiB is four pages with room to spare,
# and bounds what one hostile header can make a server read.
MAX_HEADER_BYTES = 256 * 1024
# A body holds at most one batch of chunks plus its CRCs.  Batches are about
# 1 MiB; 16 MiB leaves room for a larger configured batch while bounding
# what one frame can make a server allocate.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Names are keys, not paths; 1024 bytes of UTF-8 is what POSIX PATH_MAX-era
# tools expect and is plenty for "dir/sub/file" backups.
MAX_NAME_BYTES = 1024
# Chunks larger than a batch make no sense; smaller than 64 bytes would make
# per-chunk CRCs dominate the data.
MIN_CHUNK_BYTES = 64
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# Before a peer has completed the handshake (HELLO, and AUTH when a secret is
# configured) a server reads headers of at most this size and no body at all:
# the handshake frames are a few hundred bytes, and an unauthenticated
# stranger must not make a server allocate or parse 256 KiB per connection.
MAX_HANDSHAKE_HEADER_BYTES = 4096
# Files one READ_PLANS may name: each is pinned until READ_END, and its
# names (at most PAGE_BYTES of JSON, as the client cuts them) fit a header.
MAX_PLAN_FILES = 1024
# Ranges in a CHUNK_DATA reply's missing or corrupt list.  A batch of the
# default 1,024 chunks has at most 512 damaged runs; 4,096 ranges of ~25 bytes
# of JSON stay near 100 KiB, under MAX_HEADER_BYTES.  A node that would list
# more fails the request as a whole instead.
MAX_CHUNK_RANGES = 4096
# Every list that grows with the data (an INVENTORY's extents, a STAT's
# runs, a listing, held locks, status's nodes, blobs to delete, corrupt
# extents in a heartbeat) travels in pages whose list encodes to at most
# this many bytes of JSON (``pages``, ``inventory_pages``).  Paged by size,
# not by count: a count that fits small items (1,000 blobs of one extent)
# overflows MAX_HEADER_BYTES with large ones (one blob of 40,000 extents).
# A quarter of MAX_HEADER_BYTES leaves room for the frame's other fields, and
# keeps what a receiver parses per frame (about ten times the JSON in Python
# objects) under a megabyte.
PAGE_BYTES = 64 * 1024

_PREFIX_BYTES = 4
CRC_BYTES = 4


# --- errors ---------------------------------------------------------------
class BackupError(Exception):
    """Base of every error that can cross the wire.

    ``code`` is the wire code sent in ``ERROR`` frames; ``from_code`` maps a
    received code back to the same class, so an error raised deep inside the
    master reaches the client as the same type.
    """

    code = "INTERNAL"

    def __init__(self, message: str = ""):
        super().__init__(message or self.code)
        self.message = message or self.code


class RemoteProtocolError(BackupError):
    """The peer sent a frame that breaks the protocol (its fault)."""

    code = "BAD_REQUEST"


class ClosedMidFrame(RemoteProtocolError):
    """The peer closed the connection in the middle of a frame.

    The frame is lost, so to the reader this is a protocol error; but it is
    routine (a client killed or interrupted mid-transfer, ``cat | head``),
    so servers log it as a peer going away, not as a bad frame.
    """


class LocalProtocolError(BackupError):
    """We were asked to send something the protocol forbids (our fault)."""

    code = "INTERNAL"


class FrameTooLarge(RemoteProtocolError):
    code = "TOO_LARGE"


class UnknownOperation(RemoteProtocolError):
    """An op this protocol does not define, in an otherwise well-formed frame.

    ``skip_bytes`` is the body length the header announced; once a reader
    has skipped it (``recoverable`` is then True) the stream is in step
    again, so a server answers with an error and keeps the connection.
    """

    code = "UNKNOWN_OP"

    def __init__(self, message: str = "", skip_bytes: int = 0):
        super().__init__(message)
        self.skip_bytes = skip_bytes
        self.recoverable = False


class InvalidName(BackupError):
    code = "INVALID_NAME"


class InvalidRange(BackupError):
    """A byte range outside the file (offset past the end, negative)."""

    code = "INVALID_RANGE"


class FileNotFound(BackupError):
    code = "FILE_NOT_FOUND"


class InsufficientNodes(BackupError):
    code = "INSUFFICIENT_NODES"


class InsufficientSpace(BackupError):
    code = "INSUFFICIENT_SPACE"


class FileLocked(BackupError):
    code = "FILE_LOCKED"


class FileExists(BackupError):
    """``undelete`` of a name that exists: bringing the trash back would hide it."""

    code = "FILE_EXISTS"


class ChecksumMismatch(BackupError):
    code = "CHECKSUM_MISMATCH"


class ChunkNotFound(BackupError):
    """A node does not hold the chunks it was asked for."""

    code = "CHUNK_NOT_FOUND"


class DataLost(BackupError):
    """Every replica of some chunk of a file is gone or corrupt."""

    code = "DATA_LOST"


class Timeout(BackupError):
    code = "TIMEOUT"


class Unavailable(BackupError):
    """A peer could not be reached or went away mid-operation."""

    code = "UNAVAILABLE"


class WrongNode(Unavailable):
    """The server at a node's address gave another node's id in its handshake.

    The node moved (or died) and another took its port: for the caller the
    node it wanted is unreachable there.  Never sent on the wire as such.
    """


class AuthFailed(BackupError):
    code = "AUTH_FAILED"


class VersionMismatch(BackupError):
    code = "VERSION_MISMATCH"


class NotLeader(BackupError):
    """This master is a follower of a replicated group: ask the leader.

    ``leader`` is the leader's HOST:PORT when this master knows it, else "".
    Sent before the request did anything, so any request may be re-sent to
    the leader (master_link.MasterLink does).
    """

    code = "NOT_LEADER"

    def __init__(self, message: str = "", leader: str = ""):
        super().__init__(message)
        self.leader = leader


class NoLeader(BackupError):
    """No master of the group answered as leader within failover_timeout_s.

    Raised by the client side (master_link.py), never sent on the wire.
    """

    code = "NO_LEADER"


class StaleMaster(BackupError):
    """A master's fencing epoch is lower than one the node has already seen.

    The master was replaced by a newer one (restarted, recovered, or, with
    replicated masters, deposed): it must not write, drop or delete anything.
    """

    code = "STALE_MASTER"


class WrongCluster(BackupError):
    """Node and master belong to different clusters (their cluster ids differ).

    A node keeps all its data and serves only the cluster it first joined;
    a master with another id (started on an empty or wrong data dir) is
    refused instead of being allowed to reconcile the node's chunks away.
    """

    code = "WRONG_CLUSTER"


_ERRORS_BY_CODE: dict[str, type[BackupError]] = {}
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, BackupError):
        # The most specific class wins for codes shared by a base and a child
        # (BAD_REQUEST): the base is registered first in definition order.
        _ERRORS_BY_CODE.setdefault(_cls.code, _cls)
_ERRORS_BY_CODE["INTERNAL"] = BackupError


def error_from_code(code: str, message: str, leader: str = "") -> BackupError:
    """The exception a received ERROR frame stands for (``leader``: NOT_LEADER's hint)."""
    if code == NotLeader.code:
        return NotLeader(message, leader)
    return _ERRORS_BY_CODE.get(code, BackupError)(message)


# --- names ----------------------------------------------------------------
def validate_name(name: str, storing: bool = False) -> str:
    """Return ``name`` if it is a valid stored-file name, else raise InvalidName.

    Names are keys: slashes, spaces and any non-control Unicode are fine.
    Refused always: empty, longer than MAX_NAME_BYTES in UTF-8, containing
    NUL or any other control character (they break terminals and listings).

    ``storing``: the name is about to be created or written (upload, append,
    write, touch), so it must also restore as a relative path below a
    directory: no empty component (a leading or trailing ``/``, ``a//b``) and
    no ``.`` or ``..`` component.  Reads and deletes leave that out, so
    names stored before the rule existed can still be fetched and removed.
    The message says why, since the user has to pick another name.
    """
    if not isinstance(name, str) or not name:
        raise InvalidName("name is empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName("name is not valid Unicode") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise InvalidName(f"name is {len(encoded)} bytes, the limit is {MAX_NAME_BYTES}")
    for ch in name:
        if unicodedata.category(ch) == "Cc":
            raise InvalidName(f"name contains control character {ch!r}")
    if storing:
        reason = path_problem(name)
        if reason:
            raise InvalidName(f"name {name!r} {reason}: a stored name must be a relative file path (no "
                              f"leading or trailing '/', no empty, '.' or '..' component) so that it can be "
                              f"restored below a directory")
    return name


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot be restored as a relative path below a directory, or None.

    The one definition of a restorable name: the master refuses to store a
    name with a problem (``validate_name(storing=True)``), and a directory
    restore skips, with this reason, names stored before that rule existed.
    """
    if not path:
        return "is empty"
    if path.startswith("/"):
        return "starts with '/'"
    if path.endswith("/"):
        return "ends with '/'"
    parts = path.split("/")
    if "" in parts:
        return "has an empty path component ('//')"
    for part in ("..", "."):
        if part in parts:
            return f"has a {part!r} path component"
    return None


# --- pages ----------------------------------------------------------------
def json_size(value) -> int:
    """Bytes ``value`` takes in a frame header (compact UTF-8 JSON, as ``encode_header`` writes it)."""
    if isinstance(value, str) and value.isascii() and value.isprintable() and '"' not in value \
            and "\\" not in value:
        return len(value) + 2  # blob ids and most names: no escapes, no multi-byte characters
    return len(_dumps(value))


def pages(items, budget: int = PAGE_BYTES, size=json_size):
    """Cut ``items`` into consecutive lists whose JSON arrays take at most ``budget`` bytes.

    Yields ``(page, last)`` pairs; always at least one (an empty page for no
    items), so a paged reply always has a last frame to mark.  Lazy: only
    the page being filled is held.  Raises LocalProtocolError for an item
    that cannot fit a page on its own; callers split items that can grow
    without bound (see ``inventory_pages``).
    """
    return _mark_last(_cut_pages(items, budget, size))


def _cut_pages(items, budget: int, size):
    page, used = [], 2  # the brackets of the array
    for item in items:
        needed = size(item) + 1  # and the comma before the next item
        if page and used + needed > budget:
            yield page
            page, used = [], 2
        if used + needed > budget:
            raise LocalProtocolError(f"an item of {needed} bytes does not fit a page of {budget}")
        page.append(item)
        used += needed
    yield page


def inventory_pages(blobs, budget: int = PAGE_BYTES):
    """INVENTORY ``blobs`` lists from ``(blob, [(first, count), ...])`` pairs, cut by size.

    Yields ``(page, last)`` pairs, at least one.  A blob whose extents do
    not fit what is left of a page goes on over the next pages, so one blob
    of a million extents pages as well as a million blobs of one; the
    receiver merges the extents of a blob that appears on several pages.
    Consecutive pairs of the same blob (a store read in slices) are joined.
    """
    return _mark_last(_cut_inventory(blobs, budget))


def _cut_inventory(blobs, budget: int):
    page, used = [], 2
    item = None  # the [blob, extents] entry being filled, on the current page
    for blob, extents in blobs:
        if item is not None and item[0] != blob:
            item = None
        head = json_size(blob) + 6  # ["blob",[]] and a comma
        for first, count in extents:
            needed = len(str(first)) + len(str(count)) + 4  # [first,count] and a comma
            if item is None or used + needed > budget:
                if page and used + (needed if item is not None else head + needed) > budget:
                    yield page
                    page, used = [], 2
                item = [blob, []]
                page.append(item)
                used += head
            item[1].append((first, count))  # a tuple, encoded as an array like a list, but no new object
            used += needed
    yield page


def _mark_last(page_lists):
    """(page, last) pairs from an iterator of pages: one page of lookahead."""
    previous = None
    for page in page_lists:
        if previous is not None:
            yield previous, False
        previous = page
    yield previous, True


# --- checksums ------------------------------------------------------------
def chunk_crcs(payload, chunk_size: int) -> array.array:
    """CRC32 of each ``chunk_size`` slice of ``payload`` (last may be short).

    Returns an ``array('I')`` in host order: one machine word per chunk, not
    one Python object.
    """
    view = memoryview(payload)
    # map() runs the loop in C: no bytecode per chunk, about half the time
    # of a comprehension for 1 KiB chunks (zlib holds the GIL below 5 KiB,
    # so the loop's overhead is not hidden by threads).
    return array.array("I", map(zlib.crc32, map(view.__getitem__, _chunk_slices(len(view), chunk_size))))


@functools.lru_cache(maxsize=64)
def _chunk_slices(length: int, chunk_size: int) -> tuple[slice, ...]:
    # Batches are nearly always the same size, so the slice objects are built
    # once and reused: this loop runs once per KiB of every byte stored.
    return tuple(slice(i, i + chunk_size) for i in range(0, length, chunk_size))


def crcs_to_bytes(crcs: array.array) -> bytes:
    """Big-endian wire form of a CRC array."""
    if sys.byteorder == "little":
        crcs = array.array("I", crcs)
        crcs.byteswap()
    return crcs.tobytes()


def payload_crcs(payload, count: int, chunk_size: int) -> bytes:
    """Wire form of the CRC32s of ``count`` chunks of ``chunk_size`` that make up ``payload``.

    What a node computes for a PUT_CHUNKS with ``node_crcs``.  Raises
    RemoteProtocolError, before any work, unless ``payload`` is exactly
    ``count`` chunks (the last may be short) of a chunk size within limits.
    """
    length = len(memoryview(payload).cast("B"))
    if not (MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES and count > 0
            and (count - 1) * chunk_size < length <= count * chunk_size):
        raise RemoteProtocolError(f"{length} payload bytes are not {count} chunks of {chunk_size}")
    return crcs_to_bytes(chunk_crcs(payload, chunk_size))


def crcs_digest(crc_bytes) -> int:
    """CRC32 of the wire form of a batch's chunk CRCs: 4 bytes that stand for all of them.

    One differing CRC is a burst of at most 32 bits, which CRC32 always
    detects (several are missed with odds of 2**-32), so a node that
    computed the CRCs itself shows with these 4 bytes that it stores the
    CRCs of the bytes the sender cut.
    """
    return zlib.crc32(crc_bytes)


_HEX_DIGITS = frozenset("0123456789abcdef")


def is_sha256_hex(text) -> bool:
    """True for a SHA-256 as this protocol writes it: 64 lower-case hex digits."""
    return isinstance(text, str) and len(text) == 64 and _HEX_DIGITS.issuperset(text)


def crcs_from_bytes(data) -> array.array:
    """Inverse of ``crcs_to_bytes``."""
    crcs = array.array("I")
    crcs.frombytes(data)
    if sys.byteorder == "little":
        crcs.byteswap()
    return crcs


def split_chunk_body(body, count: int) -> tuple[memoryview, memoryview]:
    """Split a chunk-carrying body into (crc bytes, payload).

    Raises RemoteProtocolError if the body is too short for ``count`` CRCs.
    """
    view = memoryview(body)
    crc_len = count * CRC_BYTES
    if count < 0 or len(view) < crc_len:
        raise RemoteProtocolError(f"body of {len(view)} bytes cannot hold {count} CRCs")
    return view[:crc_len], view[crc_len:]


# Items one UPLOAD_FILES or PUT_BLOBS may carry: a client sends a batch of
# small files at a time (cli.SMALL_BATCH_FILES), the master one PUT_BLOBS per
# node per batch.  Bounds the per-item work a single frame can ask for.
MAX_BATCH_ITEMS = 1024


def _check_batch_shape(op: str, what: str, items, chunk_size: int) -> None:
    """RemoteProtocolError unless a batch message holds 1..MAX_BATCH_ITEMS items of a valid chunk size."""
    if not isinstance(items, list) or not 0 < len(items) <= MAX_BATCH_ITEMS:
        raise RemoteProtocolError(f"{op} needs 1..{MAX_BATCH_ITEMS} {what}")
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise RemoteProtocolError(f"{op} chunk_size {chunk_size} is outside "
                                  f"{MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")


def upload_files_layout(files, chunk_size: int, body_len: int) -> list[tuple]:
    """Where each file of an UPLOAD_FILES lies in its body: ``(crc_start, data_start, size)`` per file.

    Checks only the shape that cutting the body needs (each item a list of
    five, a size that is a non-negative integer, lengths that add up to
    ``body_len``): RemoteProtocolError otherwise, since the stream can no
    longer be trusted.  Names, SHA-256s and metadata are checked per file
    by the master, so one bad file fails alone.
    """
    _check_batch_shape("UPLOAD_FILES", "files", files, chunk_size)
    layout, offset = [], 0
    for item in files:
        if not isinstance(item, list) or len(item) != 5 or type(item[1]) is not int or item[1] < 0:
            raise RemoteProtocolError("each UPLOAD_FILES file is [name, size, sha256, meta, tag]")
        size = item[1]
        data_start = offset + CRC_BYTES * -(-size // chunk_size)
        layout.append((offset, data_start, size))
        offset = data_start + size
    if offset != body_len:
        raise RemoteProtocolError(f"UPLOAD_FILES body has {body_len} bytes, its files {offset}")
    return layout


def put_blobs_layout(blobs, chunk_size: int, body_len: int) -> list[tuple]:
    """``(blob, first, count, crc_start, payload_start, payload_bytes)`` of each item of a PUT_BLOBS.

    RemoteProtocolError unless every item is ``[blob, first, count,
    payload bytes]`` with integers whose payload is ``count`` chunks of
    ``chunk_size`` (the last may be short), and the items fill ``body_len``
    exactly; blob ids and ranges are checked again by the chunk store.
    """
    _check_batch_shape("PUT_BLOBS", "blobs", blobs, chunk_size)
    layout, offset = [], 0
    for item in blobs:
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)
                and all(type(v) is int for v in item[1:])):
            raise RemoteProtocolError("each PUT_BLOBS item is [blob, first, count, payload bytes]")
        blob, first, count, nbytes = item
        if not (first >= 0 and count > 0 and (count - 1) * chunk_size < nbytes <= count * chunk_size):
            raise RemoteProtocolError(f"PUT_BLOBS item {blob[:64]!r}: {nbytes} bytes are not {count} "
                                      f"chunks of {chunk_size}")
        payload_start = offset + CRC_BYTES * count
        layout.append((blob, first, count, offset, payload_start, nbytes))
        offset = payload_start + nbytes
    if offset != body_len:
        raise RemoteProtocolError(f"PUT_BLOBS body has {body_len} bytes, its items {offset}")
    return layout


def bad_chunk_ranges(payload, crc_bytes, chunk_size: int) -> list[tuple[int, int]]:
    """Runs ``(index, count)`` of the chunks whose CRC32 differs; ``[]`` if all match.

    Indexes count from the first chunk; there are ``len(crc_bytes) // 4``
    chunks, and one the payload is too short for counts as bad.  One
    comparison of two arrays when all is well; the per-chunk loop runs only
    when something differs, and the answer holds one tuple per damaged run,
    never one per chunk.
    """
    expected = crcs_from_bytes(crc_bytes)
    actual = chunk_crcs(payload, chunk_size)
    if actual == expected:
        return []
    ranges: list[tuple[int, int]] = []
    for index, want in enumerate(expected):
        if index < len(actual) and actual[index] == want:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == index:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            ranges.append((index, 1))
    return ranges


def chunk_ranges(value, first: int, count: int) -> list[tuple[int, int]]:
    """A peer's list of ``[first, count]`` chunk ranges, checked to lie in ``[first, first+count)``.

    ``None`` is the empty list.  Raises RemoteProtocolError for anything
    else than such a list of at most MAX_CHUNK_RANGES ranges.
    """
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_CHUNK_RANGES:
        raise RemoteProtocolError("chunk ranges are not a list of at most "
                                  f"{MAX_CHUNK_RANGES} [first, count] pairs")
    ranges = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2
                and all(type(n) is int for n in item)  # bool is an int subclass: refuse it
                and first <= item[0] and 0 < item[1] <= first + count - item[0]):
            raise RemoteProtocolError(f"chunk range {str(item)[:40]} is not inside {first}+{count}")
        ranges.append((item[0], item[1]))
    return sorted(ranges)


def verify_chunks(payload, crc_bytes, chunk_size: int) -> int:
    """Index of the first chunk whose CRC32 differs, or -1 if all match."""
    expected = crcs_from_bytes(crc_bytes)
    actual = chunk_crcs(payload, chunk_size)
    if len(actual) != len(expected):
        return min(len(actual), len(expected))
    if actual == expected:
        return -1
    for index, (want, got) in enumerate(zip(expected, actual)):
        if want != got:
            return index
    return -1  # unreachable: arrays differ, so some pair differs


def verify_batch_digests(payload, crc_bytes, chunk_size: int, payload_crc32: int, crcs_crc32: int) -> int:
    """Check a batch against its sender's two digests; the payload's CRC32, else raise ChecksumMismatch.

    Two zlib.crc32 calls (each releases the GIL) instead of one per chunk:
    the payload against ``payload_crc32`` and the chunk CRCs against
    ``crcs_crc32`` (``crcs_digest``), both computed by the client from the
    same bytes as the chunk CRCs, so each hop since the client is covered
    for both.  What the digests cannot show is a sender whose chunk CRCs
    disagree with its own payload (a bug, not a transfer error): the chunk
    at ``payload_crc32 % count`` and the last chunk (where length bugs show)
    are also checked one by one, so a sender that gets them wrong is caught
    on its first batches rather than by the scrubber on every replica.
    """
    payload, crc_bytes = memoryview(payload).cast("B"), memoryview(crc_bytes).cast("B")
    actual = zlib.crc32(payload)
    if actual != payload_crc32:
        raise ChecksumMismatch(f"batch payload CRC32 {actual:08x}, sender's {payload_crc32:08x}")
    if crcs_digest(crc_bytes) != crcs_crc32:
        raise ChecksumMismatch("batch chunk CRCs differ from the sender's digest of them")
    count = len(crc_bytes) // CRC_BYTES
    for index in {actual % count, count - 1} if count else ():
        piece = payload[index * chunk_size:(index + 1) * chunk_size]
        if verify_chunks(piece, crc_bytes[index * CRC_BYTES:(index + 1) * CRC_BYTES], chunk_size) >= 0:
            raise ChecksumMismatch(f"chunk {index} of the batch: the sender's CRC does not match its payload")
    return actual


def data_crcs(data, chunk_size: int) -> "DataCrcs":
    """The DATA_CRCS of an upload's next DATA: its chunk CRCs, their digest and the CRC32 of the whole."""
    crc_bytes = crcs_to_bytes(chunk_crcs(data, chunk_size))
    return DataCrcs(body=crc_bytes, crc32=zlib.crc32(data), crcs_crc32=crcs_digest(crc_bytes))


# --- messages -------------------------------------------------------------
_MESSAGES: dict[str, type["Message"]] = {}
# Serialises the one-time dataclass build of a message class (Message.__init__):
# two threads may use a class for the first time at once.  Not I/O: a lock
# around a class definition, nothing else.
_BUILD_LOCK = threading.Lock()


class Message:
    """Base of all messages.  Subclasses set ``OP`` and are registered.

    A subclass with ``HAS_BODY = True`` has a ``body`` field (bytes-like);
    all other fields travel in the JSON header.

    Every message class is a frozen dataclass, built when the class is first
    instantiated rather than at import: ``dataclass()`` compiles six methods
    per class, and doing it for every message at import cost each program
    ~50 ms of start-up, while a client command uses four or five of them.
    Until then the class has only what ``@message`` set (``OP``, ``_FIELDS``);
    ``dataclasses.fields()`` of a class never instantiated is refused.
    """

    OP = ""
    HAS_BODY = False
    # Set by @message: (name, JSON types, required) of each header field, in
    # order, and the optional fields whose default is None (left out of the
    # header when None, so a field added with default None does not change
    # old frames).
    _FIELDS: tuple = ()
    _OMIT_IF_NONE: frozenset = frozenset()

    def __init__(self, *args, **kwargs):
        cls = type(self)
        if cls is Message or cls.OP not in _MESSAGES:
            raise TypeError(f"{cls.__name__} is not a registered message (use @message)")
        with _BUILD_LOCK:
            if "__dataclass_fields__" not in cls.__dict__:
                if not cls.__dict__.get("__doc__"):
                    # dataclass() would write this from inspect.signature(), ~0.5 ms a class.
                    cls.__doc__ = f"{cls.__name__}({', '.join(name for name, _, _ in cls._FIELDS)})"
                dataclass(frozen=True)(cls)  # sets cls.__init__, __eq__, __repr__, __hash__...
        cls.__init__(self, *args, **kwargs)


def message(cls):
    """Class decorator: register ``cls`` under its OP; it becomes a frozen dataclass on first use.

    Field annotations must be JSON types (``int``, ``float``, ``str``,
    ``bool``, ``list``, ``dict``, ``bytes`` for the body) or unions of them
    with ``None`` (``str | None``); defaults as in any dataclass, including
    ``field(default_factory=list)``.
    """
    if cls.OP in _MESSAGES:
        raise LocalProtocolError(f"duplicate op {cls.OP}")
    fields = []
    omit_if_none = set()
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        default = cls.__dict__.get(name, MISSING)
        if isinstance(default, Field):
            required = default.default is MISSING and default.default_factory is MISSING
            default = default.default
        else:
            required = default is MISSING
        if default is None:
            omit_if_none.add(name)
        if name != "body":
            fields.append((name, _wire_type(cls, name, annotation), required))
    cls._FIELDS = tuple(fields)
    cls._OMIT_IF_NONE = frozenset(omit_if_none)
    _MESSAGES[cls.OP] = cls
    return cls


_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,),
               "dict": (dict,), "bytes": (bytes,), "None": (type(None),)}


def _wire_type(cls, name: str, annotation) -> tuple[type, ...]:
    """JSON types a field may take on the wire, from its annotation: a string
    here (``from __future__ import annotations``), a type in a module without it."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    types: tuple[type, ...] = ()
    for part in text.split("|"):
        part_types = _JSON_TYPES.get(part.strip())
        if part_types is None:
            raise LocalProtocolError(f"{cls.__name__}.{name}: {annotation!r} is not a JSON type")
        types += part_types
    return types


# Handshake -----------------------------------------------------------------
@message
class Hello(Message):
    """First frame on every connection: who is calling, in which version."""

    OP = "HELLO"
    version: int
    role: str  # "client", "node" or "master"


@message
class HelloOk(Message):
    """Reply to HELLO.  ``challenge`` (64 hex digits) is present only when the
    server requires authentication; the peer must then answer with ``AUTH``.
    Absent (None) it is left out of the frame, so a server without a secret
    sends exactly what version 1 servers always sent."""

    OP = "HELLO_OK"
    version: int
    server_id: str
    challenge: str | None = None


@message
class Auth(Message):
    """The peer proves it knows the shared secret (see security.py).

    ``client_nonce``: 64 hex digits, fresh per connection.  ``mac``: hex
    HMAC-SHA256(secret, b"client" + challenge + client_nonce + role).
    Reply: ``AUTH_OK``, or ``ERROR AUTH_FAILED`` and a closed connection.
    """

    OP = "AUTH"
    client_nonce: str
    mac: str


@message
class AuthOk(Message):
    """The server proves it knows the secret too (mutual authentication).

    ``mac``: hex HMAC-SHA256(secret, b"server" + client_nonce + challenge).
    """

    OP = "AUTH_OK"
    mac: str


@message
class Error(Message):
    """The reply to a request that failed; ``code`` is a BackupError code."""

    OP = "ERROR"
    code: str
    message: str
    leader: str | None = None  # NOT_LEADER only: the leader's HOST:PORT when known (else left out)


# Client -> master --------------------------------------------------------------
@message
class UploadBegin(Message):
    """Start streaming a file to be stored under ``name``.

    ``DATA`` frames follow, then ``UPLOAD_END`` (or ``UPLOAD_ABORT``).  The
    master answers each upload with exactly one frame: ``UPLOADED`` or
    ``ERROR``.  An ``ERROR`` may arrive before the client has sent
    ``UPLOAD_END`` (e.g. INSUFFICIENT_NODES); the master then ignores the
    rest of that upload's frames.  ``tag`` is echoed in the reply so a client
    that pipelines many uploads can match replies to files.
    """

    OP = "UPLOAD_BEGIN"
    name: str
    size: int = -1  # expected size if known, for placement; -1 = unknown
    tag: int = 0
    # True: the client pipelines uploads and will send SYNC; the master may
    # hold this upload's commit (and reply) to commit it with later ones.
    group: bool = False
    # "replace": the data is the whole new file.  "append": it is added at
    # the end (the file is created if missing).  "write": it overwrites the
    # file from ``offset`` (<= size), extending it if it runs past the end.
    mode: str = "replace"
    offset: int = 0
    # Seconds to wait for the name's write lock; 0 = fail at once with
    # FILE_LOCKED; negative = the master's lock_wait_s.
    wait_s: float = -1.0
    # mode "replace" only: the file's metadata (filemeta.py: type, mode,
    # mtime_ns, uid, gid), kept with the file and given back on download.
    meta: dict | None = None
    # mode "replace" only, 0 = none: every DATA comes after a DATA_CRCS with
    # the CRC32 of each chunk_size-byte chunk of its body.  If this is the master's own
    # chunk size it forwards them to the nodes, which check the bytes against
    # them, and records the client's SHA-256 without recomputing it;
    # otherwise it ignores them (docs/PROTOCOL.md, "Who checks what").
    chunk_size: int = 0


@message
class UploadFiles(Message):
    """Many small whole files in one frame: as many ``UPLOAD_BEGIN`` (mode replace, ``group``
    true), ``DATA_CRCS``, ``DATA`` and ``UPLOAD_END`` frames, one per file, would be.

    ``files``: one ``[name, size, sha256, meta, tag]`` per file (``meta`` an
    object or null, as ``UploadBegin.meta``).  Body: for each file in order,
    the big-endian CRC32 of each ``chunk_size``-byte chunk of its bytes, then
    its ``size`` bytes.  The master answers each file as it would that
    file's own upload, in order: one ``UPLOADED`` or ``ERROR`` per file.
    """

    OP = "UPLOAD_FILES"
    HAS_BODY = True
    files: list
    chunk_size: int
    wait_s: float = -1.0
    body: bytes = b""


@message
class Data(Message):
    """A slice of a file's bytes, in order."""

    OP = "DATA"
    HAS_BODY = True
    body: bytes = b""


@message
class DataCrcs(Message):
    """In an upload that gave ``chunk_size``: the CRCs of the chunks of the DATA that follows.

    Body: the big-endian CRC32 of each ``chunk_size``-byte chunk of that
    DATA's body (the last may be short), 4 bytes each.  Every DATA of such
    an upload but the last holds whole chunks, so each starts at a chunk
    boundary of the file.  A frame of its own, with a body, rather than a
    header field: 4 KiB per MiB of hex in JSON headers would exceed what a
    header may take without the server's shared header budget.

    ``crc32``: the CRC32 of that DATA's whole body; ``crcs_crc32``: the
    CRC32 of this frame's body (``crcs_digest``).  When the DATA becomes one
    batch by itself, the master forwards both in its PUT_CHUNKS
    (``payload_crc32``, ``crcs_crc32``) and the nodes check the batch with
    two CRC32 calls instead of one per chunk (``verify_batch_digests``).
    Absent (an older client): the nodes check every chunk.
    """

    OP = "DATA_CRCS"
    HAS_BODY = True
    crc32: int | None = None
    crcs_crc32: int | None = None
    body: bytes = b""


@message
class UploadEnd(Message):
    """End of an upload; ``sha256`` (hex) is the client's hash of what it sent."""

    OP = "UPLOAD_END"
    sha256: str


@message
class UploadAbort(Message):
    OP = "UPLOAD_ABORT"


@message
class Uploaded(Message):
    OP = "UPLOADED"
    name: str
    size: int
    chunks: int
    sha256: str
    version: str
    tag: int = 0
    version_id: int | None = None  # the id of the version this upload made (VERSIONS, snapshots)


@message
class Sync(Message):
    """Ask the master to commit every pending upload of this connection now.

    A client that pipelines uploads sends it after the last one; the master
    answers with ``SYNCED`` after the replies of all earlier uploads.
    """

    OP = "SYNC"


@message
class Synced(Message):
    OP = "SYNCED"


@message
class Download(Message):
    """Read ``length`` bytes of ``name`` from ``offset`` (-1 = to the end).

    Reply: ``FILE_INFO``, then ``DATA`` frames, then ``DATA_END``; an
    ``ERROR`` may replace any of them, after which the stream is over.
    """

    OP = "DOWNLOAD"
    name: str
    offset: int = 0
    length: int = -1
    # An older version: by id (VERSIONS lists them), or the one current at
    # a unix time.  Both absent = the current version.
    version: int | None = None
    at: float | None = None
    # With ``version``: read that version wherever it is kept (older, trash,
    # pinned by a snapshot), for the restore of snapshot ``snapshot``.
    snapshot: int | None = None
    # True: answer READ_PLAN (the placement, pinned) instead of the bytes;
    # the client reads the chunks from the nodes itself (direct_read.py).
    direct: bool | None = None
    # The read id of a READ_PLAN of this connection: relay the bytes of
    # that pinned version (a direct read falling back to the master when no
    # replica is reachable from the client); name must match, version and at
    # are then ignored.
    read_id: str | None = None


@message
class ReadPlan(Message):
    """Reply to ``DOWNLOAD`` with ``direct`` (and to ``READ_MORE``): where to read the range.

    The FILE_INFO fields, then what a client needs to fetch the chunks from
    the nodes itself: ``runs`` ``[[first, count, [node ids in read order],
    blob], ...]`` covering chunks from ``first_chunk`` up to, not including,
    ``more`` (None: to the end of the range), ``nodes`` {node id: "HOST:PORT"},
    and ``caps`` {blob: capability} to put in each GET_CHUNKS (security.py;
    "" when the cluster has no secret).  The version stays pinned, and the
    capabilities valid, until ``expires`` (unix time), READ_END or the end of
    the connection; READ_MORE renews both.
    """

    OP = "READ_PLAN"
    read_id: str
    name: str
    size: int
    chunks: int
    sha256: str
    mtime: float
    version: str
    offset: int
    length: int
    chunk_size: int
    batch_chunks: int
    first_chunk: int
    runs: list
    nodes: dict
    caps: dict
    expires: float
    more: int | None = None
    meta: dict | None = None


@message
class ReadPlans(Message):
    """Direct reads of many files at once (a directory restore): pin each one and plan it.

    ``files``: ``[[name, version id or null], ...]``, at most MAX_PLAN_FILES,
    each read whole; ``snapshot`` as in ``DOWNLOAD`` (each file then names
    its version).  Reply: ``READ_PLANS_PAGE`` x n, in request order, the
    last ``done``.  Each file read is a read of its own (``read_id``), ended
    by ``READ_END`` as one from ``DOWNLOAD {direct}``.
    """

    OP = "READ_PLANS"
    files: list
    snapshot: int | None = None


@message
class ReadPlansPage(Message):
    """One page of the reply to ``READ_PLANS``: the plans of the next files of the request.

    ``plans``: per file, in request order, the fields of its ``READ_PLAN``
    but ``nodes`` and ``expires``, which the page carries once for all its
    plans; or ``{"name", "error", "message"}`` for a file that cannot be
    read (an error code and its text, as an ``ERROR`` frame carries them),
    which does not stop the others.  A plan holds at most a few runs
    (master.BATCH_PLAN_RUNS); a file with more has ``more`` set and pages
    on with ``READ_MORE`` like any direct read.  Use ``plan_from_page``.
    """

    OP = "READ_PLANS_PAGE"
    plans: list
    nodes: dict
    expires: float
    done: bool


def plan_from_page(fields, page: ReadPlansPage) -> ReadPlan | BackupError:
    """The READ_PLAN of one entry of a READ_PLANS_PAGE, checked as if it had come in a frame of its own.

    For an error entry, the file's error (returned, not raised: the other
    files go on).  Raises RemoteProtocolError for a malformed entry.
    """
    if not isinstance(fields, dict):
        raise RemoteProtocolError("a READ_PLANS_PAGE plan is not an object")
    if "error" in fields:
        code, text = fields.get("error"), fields.get("message")
        if not (isinstance(code, str) and isinstance(text, str)):
            raise RemoteProtocolError("malformed READ_PLANS_PAGE error entry")
        return error_from_code(code, text)
    return ReadPlan(**check_fields(ReadPlan, {**fields, "nodes": page.nodes, "expires": page.expires}))


@message
class ReadMore(Message):
    """The runs of a pinned read from chunk ``chunk`` on, with fresh capabilities.  Reply: ``READ_PLAN``."""

    OP = "READ_MORE"
    read_id: str
    chunk: int


@message
class ReadEnd(Message):
    """Direct reads are over: unpin them.  Reply: ``READ_ENDED``.

    ``read_ids``: the reads (one, or the files of a directory restore ended
    together, at most MAX_CHUNK_RANGES).  ``bad``: the copies the client
    could not use, ``[[node id, blob, first, count], ...]`` (missing on the
    node, or failing their CRC at the client).  The master reads each such
    copy itself before it takes the node off those chunks and has them
    repaired: a client's word alone never removes a replica.
    """

    OP = "READ_END"
    read_ids: list
    bad: list | None = None


@message
class ReadEnded(Message):
    OP = "READ_ENDED"


@message
class FileInfo(Message):
    OP = "FILE_INFO"
    name: str
    size: int
    chunks: int
    sha256: str
    mtime: float
    version: str
    offset: int = 0
    length: int = 0
    meta: dict | None = None  # as recorded at upload (UPLOAD_BEGIN); absent if none was


@message
class DataEnd(Message):
    OP = "DATA_END"


@message
class Delete(Message):
    OP = "DELETE"
    name: str
    wait_s: float = -1.0  # as in UPLOAD_BEGIN
    # True: remove at once, with its versions and its trash, instead of
    # moving it to the trash.
    purge: bool | None = None


@message
class Deleted(Message):
    OP = "DELETED"
    name: str


@message
class Undelete(Message):
    """Bring back from the trash what the newest delete of ``name`` moved there.  Reply: UNDELETED."""

    OP = "UNDELETE"
    name: str
    wait_s: float = -1.0


@message
class Undeleted(Message):
    OP = "UNDELETED"
    name: str
    size: int
    version_id: int


@message
class Trash(Message):
    """Trashed files whose names start with ``prefix``.  Reply: TRASH_PAGE x n, the last ``done``."""

    OP = "TRASH"
    prefix: str = ""


@message
class TrashPage(Message):
    OP = "TRASH_PAGE"
    entries: list  # [{"name", "id", "size", "sha256", "mtime", "trashed_at", "expires_at"}]
    done: bool


@message
class Touch(Message):
    """Create ``name`` empty if it does not exist, else refresh its mtime.  Reply: TOUCHED."""

    OP = "TOUCH"
    name: str
    wait_s: float = -1.0


@message
class Touched(Message):
    OP = "TOUCHED"
    name: str
    size: int
    version: str


@message
class Stat(Message):
    """Everything the master knows of one file.  Reply: STAT_REPLY.

    The placement runs come in pages: the reply lists the runs from chunk
    ``from_chunk`` on, as many as fit PAGE_BYTES; ask again with the
    reply's ``next_chunk`` for the next page.
    """

    OP = "STAT"
    name: str
    version: int | None = None  # as in DOWNLOAD
    at: float | None = None
    from_chunk: int = 0


@message
class StatReply(Message):
    OP = "STAT_REPLY"
    name: str
    size: int
    chunks: int
    chunk_size: int
    sha256: str
    mtime: float
    version: str
    runs: list  # one page: [[first_chunk, count, [node ids], blob], ...] from the asked chunk on
    run_count: int = 0  # runs of the whole file
    next_chunk: int = -1  # -1: the runs are complete; else ask STAT from_chunk=next_chunk
    # node id -> chunks of this file it holds; on the page from chunk 0 only ({} on later pages).
    node_chunks: dict = field(default_factory=dict)
    version_id: int | None = None  # the version's id (VERSIONS)
    committed_at: float | None = None


@message
class Versions(Message):
    """The kept versions of one file, oldest first.  Reply: VERSIONS_PAGE x n, the last ``done``."""

    OP = "VERSIONS"
    name: str


@message
class VersionsPage(Message):
    OP = "VERSIONS_PAGE"
    entries: list  # [{"id", "size", "sha256", "mtime", "committed_at", "current"}]
    done: bool


@message
class SnapshotAdd(Message):
    """Record a snapshot of the tree ``root``: one page of members ``[[relative name, version id], ...]``.

    A client sends pages up to the one marked ``done``; the master then
    answers SNAPSHOT_MADE (or ERROR, once, after the last page).
    """

    OP = "SNAPSHOT_ADD"
    root: str
    members: list
    done: bool


@message
class SnapshotMade(Message):
    OP = "SNAPSHOT_MADE"
    id: int
    root: str
    time: float
    files: int
    bytes: int
    pins: int = 0  # members pinned explicitly (not current when recorded)


@message
class Snapshots(Message):
    """Snapshots, oldest first; of tree ``root`` only if given.  Reply: SNAPSHOTS_PAGE x n, the last ``done``."""

    OP = "SNAPSHOTS"
    root: str | None = None


@message
class SnapshotsPage(Message):
    OP = "SNAPSHOTS_PAGE"
    entries: list  # [{"id", "time", "root", "files", "bytes", "pins"}]
    done: bool


@message
class SnapshotMembers(Message):
    """The members of snapshot ``id``, by name.  Reply: SNAPSHOT_MEMBERS_PAGE x n, the last ``done``."""

    OP = "SNAPSHOT_MEMBERS"
    id: int


@message
class SnapshotMembersPage(Message):
    OP = "SNAPSHOT_MEMBERS_PAGE"
    entries: list  # [{"name", "version", "size", "sha256", "meta"}]
    done: bool


@message
class SnapshotForget(Message):
    """Drop snapshots (``prune``): versions only they kept are freed.  Reply: SNAPSHOTS_FORGOTTEN."""

    OP = "SNAPSHOT_FORGET"
    ids: list


@message
class SnapshotsForgotten(Message):
    OP = "SNAPSHOTS_FORGOTTEN"
    ids: list
    freed_bytes: int  # data bytes (before replication) nothing holds any more


@message
class Locks(Message):
    """Held write locks and their queues.  Reply: LOCKS_REPLY."""

    OP = "LOCKS"


@message
class LocksReply(Message):
    """One page of held locks; the last has ``done`` true."""

    OP = "LOCKS_REPLY"
    locks: list  # [{"name", "holder", "since", "waiting": [{"owner", "since"}]}]
    done: bool = True


@message
class List(Message):
    """List stored files whose names start with ``prefix``.

    Reply: one or more ``LIST_PAGE`` frames; the last has ``done`` true.
    """

    OP = "LIST"
    prefix: str = ""


@message
class ListPage(Message):
    """Entries in name order, PAGE_BYTES of them at most; the last page has ``done`` true."""

    OP = "LIST_PAGE"
    entries: list  # [{"name", "size", "chunks", "mtime", "meta" (if recorded: UPLOAD_BEGIN)}]
    done: bool


@message
class Status(Message):
    OP = "STATUS"


@message
class StatusReply(Message):
    """One page of nodes; ``totals`` on the first page ({} on later ones); the last has ``done`` true."""

    OP = "STATUS_REPLY"
    nodes: list  # [{"id", "address", "alive", "state", "last_heard_s", "capacity_bytes", "used_bytes", "free_bytes", ...}]
    totals: dict
    done: bool = True
    # Nodes that tried to register and were refused (another cluster, or
    # they have seen a newer master): [{"id", "address", "reason"}].
    refused: list = field(default_factory=list)
    # A replicated group only, as the answering master (the leader) sees it: [{"address", "role", "term",
    # "commit", "applied" (its own row) | "match" (a peer's), "leader", "last_contact_s"}]
    masters: list | None = None


@message
class ReclaimOrphans(Message):
    """Operator's go-ahead to quarantine the orphans the brake held back on a node.

    Reply: ``ORPHANS_RECLAIMED`` (0 blobs if the brake had not tripped there).
    """

    OP = "RECLAIM_ORPHANS"
    node_id: str


@message
class OrphansReclaimed(Message):
    OP = "ORPHANS_RECLAIMED"
    node_id: str
    blobs: int
    chunks: int


@message
class Health(Message):
    """The cluster's health as the master sees it (health.py).  Reply: HEALTH_REPLY."""

    OP = "HEALTH"


@message
class HealthReply(Message):
    OP = "HEALTH_REPLY"
    status: str  # HEALTH_OK, HEALTH_WARN or HEALTH_ERR
    checks: list  # [{"code", "severity", "count", "summary", "detail": [str, ...]}]


# Master <-> master -----------------------------------------------------------
@message
class RaftMessage(Message):
    """One Raft message between masters of a replicated group; never answered.

    ``msg`` is the header of ``meta.messages.to_wire`` (its ``type`` and
    fields); the body carries InstallSnapshot bytes, else is empty.
    """

    OP = "RAFT"
    HAS_BODY = True
    msg: dict
    body: bytes = b""


@message
class RaftProbe(Message):
    """A master with an empty data dir asks a peer before it takes part (replication.py).

    ``member``: the asking master's HOST:PORT.  Answered by any master of the
    group, leader or not (never NOT_LEADER).
    """

    OP = "RAFT_PROBE"
    member: str


@message
class RaftProbeReply(Message):
    """``seen``: this master saw ``member`` holding a log (so it lost its state);
    ``voters``/``learners``: the latest membership in this master's log; ``leader`` ("" if unknown)."""

    OP = "RAFT_PROBE_REPLY"
    seen: bool
    voters: list
    learners: list
    leader: str = ""


# Client -> master: membership ----------------------------------------------
@message
class MastersReplace(Message):
    """Replace master ``old`` by ``new`` (HOST:PORT each), one membership change at a time.

    Leader only.  Adds ``new`` as a learner, waits until it caught up, makes it
    a voter, then removes ``old``; each step is committed through the log
    before the next.  Idempotent: a repeated request continues where one
    stopped.  Answered once ``old`` is out of the membership.
    """

    OP = "MASTERS_REPLACE"
    old: str
    new: str


@message
class MastersReplaced(Message):
    """The membership after the replacement."""

    OP = "MASTERS_REPLACED"
    voters: list
    learners: list


@message
class MasterStatus(Message):
    """Ask one master of a replicated group how it sees itself; any master answers, followers too.

    Reply: ``MASTER_STATUS_REPLY``.  ``client.py status`` asks each listed
    master, so it shows every master's own role, term, commit and applied
    index (the leader's STATUS knows only how far each follower's log goes).
    """

    OP = "MASTER_STATUS"


@message
class MasterStatusReply(Message):
    """``master``: {"address", "role", "term", "commit", "applied", "leader", "last_contact_s"}."""

    OP = "MASTER_STATUS_REPLY"
    master: dict


# Node -> master ------------------------------------------------------------
@message
class Register(Message):
    """A node announces itself; sent on every (re)connection to the master.

    ``free_bytes`` and ``put_seq``: as in ``HEARTBEAT``.
    """

    OP = "REGISTER"
    node_id: str
    host: str
    port: int
    capacity_bytes: int
    used_bytes: int
    chunks: int
    free_bytes: int = -1
    put_seq: int = 0
    # The cluster the node belongs to ("" = none yet: a fresh node) and the
    # highest master epoch it has seen.  A master refuses a node of another
    # cluster (WRONG_CLUSTER) or one that has seen a newer master (STALE_MASTER).
    cluster_id: str = ""
    epoch: int = 0


@message
class Registered(Message):
    """The master's identity: a node joins ``cluster_id`` if it has none yet, and
    refuses a master of another cluster or one older than ``epoch`` it has seen.
    ``cluster_id`` "" means a master recovering its metadata (read-only)."""

    OP = "REGISTERED"
    cluster_id: str = ""
    epoch: int = 0


@message
class Heartbeat(Message):
    """A node's periodic sign of life, with its usage.

    ``full``: the node refuses writes (at capacity or out of disk space).
    ``corrupt``: extents found corrupt since the last heartbeat (by the
    scrubber or a read), as ``[blob, first, count, seq]`` (``seq``: its
    put_seq just after the drop, so the master can tell a fresh repair copy
    put later from the dropped one); the node has already dropped them, the
    master re-replicates them from a good copy.  At most
    PAGE_BYTES of them per heartbeat; the rest go in the next ones.
    ``free_bytes``: bytes of chunks the node can still take, min(capacity -
    used, filesystem free space - reserve); -1 = unknown (the master then
    uses capacity - used).  ``put_seq``: the ``seq`` of the last ``PUT_OK``
    this report counts, so the master knows which batches it has sent are
    not in it yet.
    """

    OP = "HEARTBEAT"
    node_id: str
    used_bytes: int
    chunks: int
    full: bool = False
    corrupt: list = field(default_factory=list)
    free_bytes: int = -1
    put_seq: int = 0
    quarantined_bytes: int = 0  # payload bytes of blobs held in quarantine


@message
class HeartbeatOk(Message):
    OP = "HEARTBEAT_OK"


@message
class Goodbye(Message):
    """A node stopping cleanly (SIGTERM, Ctrl-C) tells the master, which stops using it at once."""

    OP = "GOODBYE"
    node_id: str


@message
class GoodbyeOk(Message):
    OP = "GOODBYE_OK"


@message
class Inventory(Message):
    """One page of what a node holds, sent after REGISTER (reply INVENTORY_OK).

    ``blobs``: ``[[blob, [[first, count], ...]], ...]`` in blob order, at
    most PAGE_BYTES of JSON (``inventory_pages``); a blob with more extents
    than fit goes on over the next pages, and the master merges them.  The
    last page has ``done`` true.  The master reconciles the whole report
    with the namespace: orphans and surplus copies are deleted, missing
    ones repaired.
    """

    OP = "INVENTORY"
    node_id: str
    blobs: list
    done: bool
    # Blobs of this page that the node holds in quarantine (see QUARANTINE).
    quarantined: list = field(default_factory=list)


@message
class InventoryOk(Message):
    OP = "INVENTORY_OK"


# Master -> node ------------------------------------------------------------
@message
class PutChunks(Message):
    """Store ``count`` consecutive chunks of blob ``blob`` from ``first``.

    Body: ``count`` CRC32s then the payload, cut every ``chunk_size`` bytes
    (the last chunk may be short).  The node checks every CRC before it
    writes.  Reply: ``PUT_OK`` (or ``ERROR``).  The chunks are written but
    not yet durable; ``FLUSH`` makes them so.

    ``node_crcs`` true: the body is the payload alone; the node computes the
    CRC32s, stores them, and returns ``crcs_crc32`` (see ``crcs_digest``) in
    PUT_OK.  The sender compares it with the digest of the CRCs of the bytes
    it sent, so the CRCs still protect the chunks from where they were cut
    (see "Uploads" in docs/PROTOCOL.md).

    ``payload_crc32`` and ``crcs_crc32`` (with CRCs in the body, not
    ``node_crcs``): the client's CRC32 of the payload and of the chunk CRCs
    (from its DATA_CRCS).  The node then checks the batch with those two
    digests and a sample of chunks (``verify_batch_digests``) instead of
    every chunk, and stores the payload CRC it computed; without them it
    checks every chunk, as for repairs and uploads the master cut itself.
    """

    OP = "PUT_CHUNKS"
    HAS_BODY = True
    blob: str
    first: int
    count: int
    chunk_size: int
    node_crcs: bool = False
    payload_crc32: int | None = None
    crcs_crc32: int | None = None
    cluster_id: str = ""  # the fence: see "Fencing" in docs/PROTOCOL.md
    epoch: int = 0
    body: bytes = b""


@message
class PutBlobs(Message):
    """Store many small blobs in one request: as many ``PUT_CHUNKS`` (with CRCs) would.

    ``blobs``: one ``[blob, first, count, payload bytes]`` per item.  Body:
    for each item in order, its ``count`` CRC32s then its payload, cut every
    ``chunk_size`` bytes.  The node checks every CRC of every item before it
    writes any.  Reply: one ``PUT_OK`` naming the first item (``blob``,
    ``first``) and the chunks of all of them (``count``); not yet durable
    (``FLUSH``).
    """

    OP = "PUT_BLOBS"
    HAS_BODY = True
    blobs: list
    chunk_size: int
    cluster_id: str = ""
    epoch: int = 0
    body: bytes = b""


@message
class PutOk(Message):
    """``seq``: the node's count of batches stored since it started, this one included (see HEARTBEAT).
    ``crcs_crc32``: the digest of the CRCs the node computed (``node_crcs``), else absent."""

    OP = "PUT_OK"
    blob: str
    first: int
    count: int
    seq: int = 0
    crcs_crc32: int | None = None


@message
class Flush(Message):
    """Make every chunk written so far durable (fsync).  Reply: ``FLUSHED``."""

    OP = "FLUSH"


@message
class Flushed(Message):
    OP = "FLUSHED"


@message
class GetChunks(Message):
    """Read ``count`` chunks of ``blob`` from ``first``.  Reply: ``CHUNK_DATA``."""

    OP = "GET_CHUNKS"
    blob: str
    first: int
    count: int
    # A client's read capability for ``blob`` (READ_PLAN caps); masters
    # send none.  A node with a secret serves a client only with a valid one.
    cap: str | None = None


@message
class ChunkData(Message):
    """Body: CRC32s then payload, laid out as in ``PUT_CHUNKS``.

    ``missing`` and ``corrupt`` (``[[first, count], ...]``, absent when empty)
    name the chunks the node cannot serve intact: not stored, or failing
    their CRC on its disk (it has dropped those).  In the body their CRCs
    and bytes are zeros, a whole ``chunk_size`` for a missing one, so every
    other chunk keeps its place; the reader fetches just those chunks from
    another replica.

    ``crc32`` (absent unless the reply is exactly one whole stored record
    that has one): the CRC32 of the whole payload, computed by the node when
    it stored the record, from the bytes it had just checked against the
    writer's chunk CRCs.  A reader whose CRC32 of the payload equals it needs
    not check the chunks one by one (one zlib.crc32 call, which releases the
    GIL, instead of one per chunk); on a mismatch it checks them to find the
    bad ones.
    """

    OP = "CHUNK_DATA"
    HAS_BODY = True
    blob: str
    first: int
    count: int
    chunk_size: int
    missing: list | None = None
    corrupt: list | None = None
    crc32: int | None = None
    body: bytes = b""


@message
class DeleteBlobs(Message):
    """Forget every chunk of the listed blobs (a page: PAGE_BYTES at most).  Reply: ``BLOBS_DELETED``."""

    OP = "DELETE_BLOBS"
    blobs: list
    cluster_id: str = ""
    epoch: int = 0


@message
class BlobsDeleted(Message):
    OP = "BLOBS_DELETED"
    count: int


@message
class DropChunks(Message):
    """Forget chunks ``[first, first+count)`` of ``blob``: a surplus or bad copy,
    or chunks an in-place write replaced (the rest of the blob stays).

    Reply: ``CHUNKS_DROPPED`` with ``dropped`` true if the node held any of them.
    """

    OP = "DROP_CHUNKS"
    blob: str
    first: int
    count: int
    cluster_id: str = ""
    epoch: int = 0


@message
class ChunksDropped(Message):
    OP = "CHUNKS_DROPPED"
    dropped: bool


@message
class Quarantine(Message):
    """Keep the listed blobs, unknown to the namespace, in quarantine.

    Nothing is copied or erased: the node marks them and erases them only
    after its own ``orphan_grace_s``, unless a RELEASE comes first.  Reply:
    ``QUARANTINED`` with how many of them it holds and their payload bytes.
    """

    OP = "QUARANTINE"
    blobs: list
    cluster_id: str = ""
    epoch: int = 0


@message
class Quarantined(Message):
    OP = "QUARANTINED"
    count: int
    bytes: int


@message
class Release(Message):
    """The namespace knows these blobs again: take them out of quarantine."""

    OP = "RELEASE"
    blobs: list
    cluster_id: str = ""
    epoch: int = 0


@message
class Released(Message):
    OP = "RELEASED"
    count: int


@message
class Describe(Message):
    """What files the blobs just written belong to (see "Self-describing nodes").

    ``items``: file descriptions ``{"name", "version", "size", "chunk_size",
    "batch_chunks", "sha256", "mtime", "layout": [[first, count, blob], ...],
    "index"}`` with ``index`` 0 (not yet committed).  Sent before the FLUSH
    that precedes a commit; the FLUSH makes them durable with the chunks.
    Reply: ``DESCRIBED``.  Paged: at most PAGE_BYTES of items per frame.
    """

    OP = "DESCRIBE"
    items: list
    cluster_id: str = ""
    epoch: int = 0


@message
class Described(Message):
    OP = "DESCRIBED"
    count: int


@message
class CommitNotes(Message):
    """Descriptions of committed files, ``index`` = the commit's log index.

    Sent after the commit, batched and in the background; the node stores
    them durably (fsync) before replying ``NOTES_STORED``.
    """

    OP = "COMMIT_NOTES"
    notes: list
    cluster_id: str = ""
    epoch: int = 0


@message
class NotesStored(Message):
    OP = "NOTES_STORED"
    count: int


@message
class ListNotes(Message):
    """Every file description the node holds.  Reply: ``NOTES_PAGE`` frames, the last ``done``."""

    OP = "LIST_NOTES"


@message
class NotesPage(Message):
    OP = "NOTES_PAGE"
    notes: list
    done: bool


@message
class NodeStat(Message):
    """Ask a node for its own view: used bytes and chunk count."""

    OP = "NODE_STAT"


@message
class NodeStatReply(Message):
    OP = "NODE_STAT_REPLY"
    node_id: str
    used_bytes: int
    chunks: int
    blobs: int


# --- encoding -------------------------------------------------------------
def encode_header(msg: Message, body_bytes: int | None = None) -> bytes:
    """Length prefix plus JSON header of ``msg`` (without the body).

    ``body_bytes``: the length of a body the caller sends itself (sendfile),
    instead of ``msg.body``'s.
    """
    cls = type(msg)
    if cls.OP not in _MESSAGES:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message")
    header = {"op": cls.OP}
    for name, _types, _required in cls._FIELDS:
        value = getattr(msg, name)
        # An optional field whose value is None is left out, so a field added
        # with default None (HELLO_OK.challenge) does not change old frames.
        if value is None and name in cls._OMIT_IF_NONE:
            continue
        header[name] = value
    if cls.HAS_BODY:
        if body_bytes is not None:
            body_len = body_bytes
        else:
            body_len = len(msg.body) if not isinstance(msg.body, memoryview) else msg.body.nbytes
        if body_len > MAX_BODY_BYTES:
            raise LocalProtocolError(f"body of {body_len} bytes exceeds {MAX_BODY_BYTES}")
        if body_len:
            header["body"] = body_len
    data = _dumps(header)
    if len(data) > MAX_HEADER_BYTES:
        raise LocalProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    return len(data).to_bytes(_PREFIX_BYTES, "big") + data


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(value) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def encode(msg: Message) -> bytes:
    """The whole frame of ``msg`` as one bytes object (copies the body)."""
    head = encode_header(msg)
    if type(msg).HAS_BODY and msg.body:
        return head + bytes(msg.body)
    return head


def parse_header_length(prefix: bytes, max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """Header length from the 4-byte prefix; raises if out of bounds."""
    length = int.from_bytes(prefix, "big")
    if length == 0:
        raise RemoteProtocolError("empty header")
    if length > max_header_bytes:
        raise FrameTooLarge(f"header of {length} bytes exceeds {max_header_bytes}")
    return length


def _refuse_constant(name: str):
    # NaN and Infinity are not JSON; Python accepts them by default, and an
    # infinite timeout from a peer must not reach a Condition.wait.
    raise ValueError(f"{name} is not a number this protocol accepts")


# One decoder for every header: json.loads with any keyword builds a new
# JSONDecoder (and its scanner) per call, ~5 us of each frame.  Shared by all
# threads, as json.loads shares its default one: decoding keeps no state.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_header(data: bytes, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[type[Message], dict, int]:
    """Decode a JSON header into (message class, fields, body length).

    Raises RemoteProtocolError (or a subclass) for anything malformed: bad
    UTF-8 or JSON, not an object, unknown op, missing, unexpected or
    mistyped fields, a body on a message without one, an oversized body.
    """
    try:
        header = _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"header is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        # json recurses per nesting level: '[[[[...' deeper than the
        # interpreter's limit is hostile, not a crash of ours.
        raise RemoteProtocolError("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise RemoteProtocolError("header is not a JSON object")
    op = header.pop("op", None)
    if not isinstance(op, str):
        raise RemoteProtocolError("header has no op")
    cls = _MESSAGES.get(op)
    body_len = header.pop("body", 0)
    if type(body_len) is not int or body_len < 0:
        raise RemoteProtocolError("body length is not a non-negative integer")
    if body_len > max_body_bytes:
        raise FrameTooLarge(f"body of {body_len} bytes exceeds {max_body_bytes}")
    if cls is None:
        raise UnknownOperation(f"unknown operation {op[:64]!r}", skip_bytes=body_len)
    if body_len and not cls.HAS_BODY:
        raise RemoteProtocolError(f"{op} takes no body")
    return cls, check_fields(cls, header), body_len


def check_fields(cls: type[Message], header: dict) -> dict:
    """The fields of a ``cls`` message from a decoded header without its op and body (emptied).

    Raises RemoteProtocolError for a missing, unexpected or mistyped field.
    Also checks messages that travel inside another one (READ_PLANS_PAGE).
    """
    fields = {}
    for name, types, required in cls._FIELDS:
        if name not in header:
            if required:
                raise RemoteProtocolError(f"{cls.OP} lacks field {name!r}")
            continue
        value = header.pop(name)
        # bool is a subclass of int in Python; never accept true for a count.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RemoteProtocolError(f"{cls.OP} field {name!r} has the wrong type")
        fields[name] = value
    if header:
        raise RemoteProtocolError(f"{cls.OP} has unexpected fields {sorted(header)[:5]}")
    return fields


def _build(cls: type[Message], fields: dict, body) -> Message:
    if cls.HAS_BODY:
        return cls(**fields, body=body)
    return cls(**fields)


NEED_DATA = object()
"""Returned by ``FrameDecoder.next_message`` until a whole frame is buffered."""


class FrameDecoder:
    """Incremental decoder: feed it bytes, take whole messages out.

    Never blocks and never touches a socket.  Limits are checked as soon as a
    length is known, before the bytes it announces have arrived.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._pending: tuple[type[Message], dict, int] | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self):
        """A Message, or NEED_DATA; raises RemoteProtocolError on bad input."""
        if self._pending is None:
            if len(self._buffer) < _PREFIX_BYTES:
                return NEED_DATA
            header_len = parse_header_length(bytes(self._buffer[:_PREFIX_BYTES]))
            if len(self._buffer) < _PREFIX_BYTES + header_len:
                return NEED_DATA
            header = bytes(self._buffer[_PREFIX_BYTES:_PREFIX_BYTES + header_len])
            try:
                self._pending = parse_header(header)
            except UnknownOperation as exc:
                # Skip the frame's body as it arrives; the stream stays usable.
                del self._buffer[:_PREFIX_BYTES + header_len]
                self._pending = (None, {}, exc.skip_bytes)
                exc.recoverable = True
                raise
            del self._buffer[:_PREFIX_BYTES + header_len]
        cls, fields, body_len = self._pending
        if len(self._buffer) < body_len:
            return NEED_DATA
        body = bytes(self._buffer[:body_len])
        del self._buffer[:body_len]
        self._pending = None
        if cls is None:  # the body of an unknown op, now skipped
            return self.next_message()
        return _build(cls, fields, body)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buffer)


# --- blocking I/O over file-like objects ------------------------------------
def _read_exact(rfile, size: int) -> bytes:
    data = rfile.read(size)
    if data is None or len(data) != size:
        raise ClosedMidFrame(f"connection closed mid-frame ({len(data or b'')} of {size} bytes)")
    return data


def _read_into(rfile, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = rfile.readinto(view[got:])
        if not n:
            raise ClosedMidFrame(f"connection closed mid-body ({got} of {len(view)} bytes)")
        got += n


def _skip(rfile, size: int) -> None:
    """Read and drop ``size`` bytes, 64 KiB at a time (never one big buffer)."""
    while size:
        data = rfile.read(min(size, 64 * 1024))
        if not data:
            raise ClosedMidFrame("connection closed mid-body")
        size -= len(data)


def read_message(rfile, body_buffer=None, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_body_bytes: int = MAX_BODY_BYTES, admit=None) -> Message | None:
    """Read one message from a binary file-like object; None at a clean EOF.

    If ``body_buffer`` is given and large enough, the body is read straight
    into it and the message carries a memoryview of it: valid only until the
    next read with the same buffer.  ``body_buffer`` may also be a callable,
    called with the body's length once the header is parsed and only if the
    frame has a body; it returns the buffer to use (or None).  Otherwise a
    new bytearray is allocated (its size was already checked against
    ``max_body_bytes``).  Servers pass smaller limits
    (MAX_HANDSHAKE_HEADER_BYTES, no body) before a peer has completed the
    handshake.  ``admit``, if given, is called with the header's length
    before the header is read: it may wait for memory, or raise.
    """
    prefix = rfile.read(_PREFIX_BYTES)
    if not prefix:
        return None
    if len(prefix) != _PREFIX_BYTES:
        rest = rfile.read(_PREFIX_BYTES - len(prefix)) or b""
        prefix += rest
        if len(prefix) != _PREFIX_BYTES:
            raise ClosedMidFrame("connection closed mid-frame (in length prefix)")
    header_len = parse_header_length(prefix, max_header_bytes)
    if admit is not None:
        admit(header_len)
    try:
        cls, fields, body_len = parse_header(_read_exact(rfile, header_len), max_body_bytes)
    except UnknownOperation as exc:
        _skip(rfile, exc.skip_bytes)
        exc.recoverable = True
        raise
    body = b""
    if body_len:
        if callable(body_buffer):
            body_buffer = body_buffer(body_len)
        if body_buffer is not None and len(body_buffer) >= body_len:
            body = memoryview(body_buffer)[:body_len]
            _read_into(rfile, body)
        elif body_len <= _BODY_STEP_BYTES:
            body = memoryview(bytearray(body_len))
            _read_into(rfile, body)
        else:
            body = _read_growing(rfile, body_len)
    return _build(cls, fields, body)


# A large body read without a caller's buffer grows a step at a time as its
# bytes arrive: a peer that announces 16 MiB and sends a trickle (or
# nothing) costs what it sent, not what it announced.
_BODY_STEP_BYTES = 1024 * 1024


def _read_growing(rfile, size: int) -> memoryview:
    body = bytearray()
    while len(body) < size:
        step = min(size - len(body), _BODY_STEP_BYTES)
        piece = rfile.read(step)
        if not piece or len(piece) < step:
            raise ClosedMidFrame(f"connection closed mid-body ({len(body) + len(piece or b'')} of {size} bytes)")
        body += piece
    return memoryview(body)


def write_message(wfile, msg: Message, flush: bool = True) -> None:
    """Write one message; the body is written as is, without a copy.

    ``wfile`` must write whole buffers (a ``BufferedWriter`` such as
    ``sock.makefile("wb")``, or ``io.BytesIO``).  Pass ``flush=False`` to
    pipeline several frames and flush once.
    """
    wfile.write(encode_header(msg))
    if type(msg).HAS_BODY and len(msg.body):
        wfile.write(msg.body)
    if flush:
        wfile.flush()


def expect(msg: Message | None, cls: type[Message]) -> Message:
    """Return ``msg`` if it is a ``cls``; raise its error if it is an ERROR.

    The one place where a reply is checked, so every caller treats a closed
    connection, an error frame and an unexpected message the same way.
    """
    if msg is None:
        raise Unavailable(f"connection closed while waiting for {cls.OP}")
    if isinstance(msg, cls):
        return msg
    if isinstance(msg, Error):
        raise error_from_code(msg.code, msg.message, msg.leader or "")
    raise RemoteProtocolError(f"expected {cls.OP}, got {msg.OP}")


def error_message(exc: BackupError) -> Error:
    """The ERROR frame that reports ``exc``."""
    return Error(code=exc.code, message=exc.message[:4096], leader=getattr(exc, "leader", None) or None)
