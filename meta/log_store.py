"""The Raft log and hard state on disk: append with one write and one fsync per batch.

Job
---
Persist what a ``Ready`` batch says (meta.messages): the hard state (term,
vote), log entries appended, a conflicting suffix truncated, a prefix
compacted once a snapshot covers it, and give it all back after a restart.
The core decides; this module only stores, and refuses to guess when the
files hold what no crash can produce.

On-disk layout (``data_dir``, mode 0o700, files 0o600)
------------------------------------------------------
    raft-state.json                    {"format": 1, "term": T, "vote": ID or null}
    raftlog-<first index, 12 digits>.log
        one entry a line:  <CRC32 of the JSON, 8 hex digits> <JSON [index, term, kind, data]>\\n
        e.g.  1c291ca3 [7,2,"data",{"op":"delete","name":"a"}]

Segments hold consecutive indexes; a segment's name is the index of its first
line, so an empty segment still says where the log continues.  A new
segment starts when the last one passes ``segment_bytes`` or when a
compaction covers part of it (so that the next compaction can delete it whole).

Crash cases
-----------
* Mid-append: the tail of the last segment is torn (a line without newline or
  with a bad CRC, and no good line after it).  Never acknowledged: ``open``
  logs it and cuts it off.  A bad line anywhere else is ``LogCorrupt``.
* Mid-truncate: later segments are deleted last first, then the segment
  holding the cut is shortened, so a crash leaves a prefix of the old log
  (the core truncates again when the leader repeats itself).
* Mid-compact: segments are deleted first first; when everything goes, the
  new empty segment is created after the deletions are durable.  A crash
  leaves a suffix of the log, or nothing; the core's first Ready after a
  restart compacts to its snapshot again, which sets where the log continues.
* Hard state: ``atomic_write_json`` (temp file, fsync, rename, fsync dir).

Left out: preallocation, reading entries through mmap, compression.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from typing import Callable

from meta.messages import BadRaftMessage, Entry, HardState, entry_from_wire, entry_to_wire
from metadata_log import DIR_MODE, FILE_MODE, _encode, _write_all, atomic_write_json, fsync_dir

logger = logging.getLogger(__name__)

STATE_NAME = "raft-state.json"
STATE_FORMAT = 1
SEGMENT_NAME = re.compile(r"raftlog-(\d{12})\.log")
# 64 MiB: a metadata record is a few hundred bytes, so a segment holds many
# checkpoints' worth of entries; compaction rolls to a new segment anyway.
DEFAULT_SEGMENT_BYTES = 64 << 20


class LogCorrupt(Exception):
    """The log files hold what no crash can produce; we refuse to guess."""


def encode_line(entry: Entry) -> bytes:
    body = _encode(entry_to_wire(entry))
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode_line(line: bytes) -> Entry | None:
    """The entry on ``line``, or None if the line is torn or damaged."""
    if len(line) < 10 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        return entry_from_wire(json.loads(body))
    except (ValueError, BadRaftMessage):  # bad hex, JSON, UTF-8 or entry shape
        return None


class _Segment:
    __slots__ = ("first", "path", "offsets", "size")

    def __init__(self, first: int, path: str):
        self.first = first
        self.path = path
        self.offsets: list[int] = []  # byte offset of each line
        self.size = 0

    @property
    def next_index(self) -> int:
        return self.first + len(self.offsets)


class LogStore:
    """Durable Raft log + hard state.  Use ``open()`` first; one thread at a time.

    ``fsync`` is a seam for tests (count calls, inject EIO).  An OSError from a
    write or fsync propagates and leaves the store unusable (``failed``): what
    is durable is no longer known, so the process must restart and reopen.
    """

    def __init__(self, data_dir: str, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 fsync: Callable[[int], None] = os.fsync):
        if segment_bytes < 1:
            raise ValueError("segment_bytes must be >= 1")
        self.data_dir = data_dir
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._segments: list[_Segment] = []
        self._fd: int | None = None   # the last segment, open for appending
        self._hard = HardState()
        self._failed: BaseException | None = None

    # --- views ---------------------------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        return self._hard

    @property
    def first_index(self) -> int:
        """Index of the first stored entry (== next_index when empty)."""
        return self._segments[0].first if self._segments else 1

    @property
    def next_index(self) -> int:
        """Index the next appended entry must carry."""
        return self._segments[-1].next_index if self._segments else 1

    @property
    def last_index(self) -> int:
        return self.next_index - 1

    def _path(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    # --- start-up ------------------------------------------------------------------------

    def open(self) -> tuple[HardState, list[Entry]]:
        """Read the hard state and every stored entry; cut a torn tail.  Raises ``LogCorrupt``."""
        if self._fd is not None:
            raise ValueError("log store already open")
        os.makedirs(self.data_dir, mode=DIR_MODE, exist_ok=True)
        self._hard = self._load_hard_state()
        names = sorted((int(m.group(1)), m.group(0)) for m in
                       map(SEGMENT_NAME.fullmatch, os.listdir(self.data_dir)) if m)
        entries: list[Entry] = []
        self._segments = []
        for n, (first, name) in enumerate(names):
            if self._segments and first != self._segments[-1].next_index:
                raise LogCorrupt(f"{name}: starts at {first}, "
                                 f"previous segment ends at {self._segments[-1].next_index - 1}")
            seg = _Segment(first, self._path(name))
            self._read_segment(seg, entries, last=n == len(names) - 1)
            if not seg.offsets and n != len(names) - 1:
                raise LogCorrupt(f"{name}: empty segment before the last one")
            self._segments.append(seg)
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
        logger.info("%s: raft log opened: entries %d..%d, term %d", self.data_dir,
                    self.first_index, self.last_index, self._hard.term)
        return self._hard, entries

    def _load_hard_state(self) -> HardState:
        path = self._path(STATE_NAME)
        try:
            with open(path, "rb") as f:
                state = json.load(f)
        except FileNotFoundError:
            return HardState()
        except ValueError as exc:  # atomic_write_json never leaves a partial file
            raise LogCorrupt(f"{path}: unreadable: {exc}") from exc
        if (not isinstance(state, dict) or state.get("format") != STATE_FORMAT
                or type(state.get("term")) is not int or state["term"] < 0
                or not (state.get("vote") is None or isinstance(state.get("vote"), str))):
            raise LogCorrupt(f"{path}: not a format {STATE_FORMAT} raft state")
        return HardState(state["term"], state["vote"])

    def _read_segment(self, seg: _Segment, entries: list[Entry], last: bool) -> None:
        with open(seg.path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            end = data.find(b"\n", offset)
            line = data[offset:] if end < 0 else data[offset:end + 1]
            entry = decode_line(line)
            if entry is None or entry.index != seg.next_index:
                where = f"{seg.path}: line {len(seg.offsets) + 1} (byte {offset})"
                if entry is not None:
                    raise LogCorrupt(f"{where}: index {entry.index}, expected {seg.next_index}")
                if not last or self._good_line_after(data, offset + len(line)):
                    raise LogCorrupt(f"{where}: damaged entry")
                logger.warning("%s: torn tail (never acknowledged), cutting %d bytes",
                               where, len(data) - offset)
                self._cut(seg.path, offset)
                break
            seg.offsets.append(offset)
            entries.append(entry)
            offset += len(line)
        seg.size = offset

    @staticmethod
    def _good_line_after(data: bytes, offset: int) -> bool:
        """Is there a whole, valid line after ``offset``?  Then the damage is not a torn tail."""
        whole_lines = data[offset:].split(b"\n")[:-1]  # the piece after the last newline is torn
        return any(decode_line(line + b"\n") is not None for line in whole_lines)

    def _cut(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            self._fsync(fd)
        finally:
            os.close(fd)

    # --- writes --------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise OSError(f"raft log store failed earlier: {self._failed!r}")

    def _guard(self, fn, *args):
        self._check_usable()
        try:
            return fn(*args)
        except OSError as exc:
            self._failed = exc
            logger.error("%s: raft log store failed: %r", self.data_dir, exc)
            raise

    def save_hard_state(self, hard: HardState) -> None:
        """Write term and vote durably (before any message that depends on them is sent)."""
        self._guard(atomic_write_json, self._path(STATE_NAME),
                    {"format": STATE_FORMAT, "term": hard.term, "vote": hard.vote})
        self._hard = hard

    def append(self, entries) -> int:
        """Append consecutive ``entries`` starting at ``next_index``: one write, one fsync.

        Returns the bytes written (the driver counts them to decide when to checkpoint).
        """
        entries = list(entries)
        if not entries:
            return 0
        if entries[0].index != self.next_index:
            raise ValueError(f"append at {entries[0].index}, log continues at {self.next_index}")
        return self._guard(self._append, entries)

    def _append(self, entries: list[Entry]) -> int:
        if not self._segments or self._segments[-1].size >= self._segment_bytes:
            self._new_segment(entries[0].index)
        seg = self._segments[-1]
        lines = [encode_line(e) for e in entries]
        offset = seg.size
        _write_all(self._fd, b"".join(lines))
        self._fsync(self._fd)
        for line in lines:
            seg.offsets.append(offset)
            offset += len(line)
        written = offset - seg.size
        seg.size = offset
        return written

    def _new_segment(self, first: int) -> None:
        path = self._path(f"raftlog-{first:012d}.log")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, FILE_MODE)
        try:
            fsync_dir(self.data_dir, self._fsync)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._segments.append(_Segment(first, path))

    def truncate_from(self, index: int) -> None:
        """Drop entries >= ``index`` (a conflicting suffix); the log continues at ``index``."""
        if index >= self.next_index:
            return
        self._guard(self._truncate, max(index, 1))

    def _truncate(self, index: int) -> None:
        dropped = False
        while self._segments and self._segments[-1].first > index:
            self._drop_last_segment()
            dropped = True
        if dropped:  # durable before the cut below: a crash must leave a prefix, not a gap
            fsync_dir(self.data_dir, self._fsync)
        if not self._segments:  # everything went: an empty segment keeps the position
            self._new_segment(index)
            return
        seg = self._segments[-1]
        keep = index - seg.first
        if keep < len(seg.offsets):
            seg.size = seg.offsets[keep]
            del seg.offsets[keep:]
            os.ftruncate(self._fd, seg.size)
            self._fsync(self._fd)

    def _drop_last_segment(self) -> None:
        seg = self._segments.pop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.unlink(seg.path)
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)

    def compact(self, index: int) -> None:
        """Entries <= ``index`` are in a durable snapshot: delete the segments that hold only such.

        When no entry > ``index`` is stored, everything goes and the log
        continues at ``index + 1``.
        """
        self._guard(self._compact, index)

    def _compact(self, index: int) -> None:
        if self.last_index <= index:
            for seg in self._segments:  # first first: a crash leaves a suffix
                os.unlink(seg.path)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._segments = []
            fsync_dir(self.data_dir, self._fsync)
            self._new_segment(index + 1)
            return
        doomed = 0
        while doomed + 1 < len(self._segments) and self._segments[doomed + 1].first <= index + 1:
            doomed += 1
        for seg in self._segments[:doomed]:
            os.unlink(seg.path)
        del self._segments[:doomed]
        if doomed:
            fsync_dir(self.data_dir, self._fsync)
        if self._segments[-1].first <= index:
            # The segment being appended to is partly covered: later appends go
            # to a new one, so that the next compaction can delete this one whole.
            self._new_segment(self.next_index)

    # --- reads ---------------------------------------------------------------------------

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Stored entries ``lo .. hi`` inclusive (clipped to what is stored), read from disk."""
        lo, hi = max(lo, self.first_index), min(hi, self.last_index)
        out: list[Entry] = []
        for seg in self._segments:
            a, b = max(lo, seg.first), min(hi, seg.next_index - 1)
            if a > b:
                continue
            start = seg.offsets[a - seg.first]
            end = seg.offsets[b - seg.first + 1] if b + 1 < seg.next_index else seg.size
            with open(seg.path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            bounds = [o - start for o in seg.offsets[a - seg.first:b - seg.first + 1]] + [end - start]
            for i in range(len(bounds) - 1):
                entry = decode_line(data[bounds[i]:bounds[i + 1]])
                if entry is None or entry.index != a + i:
                    raise LogCorrupt(f"{seg.path}: damaged entry at index {a + i}")
                out.append(entry)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
