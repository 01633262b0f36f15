"""The master's durable metadata: an operation log of JSON lines plus a checkpoint.

Job
---
Make every namespace mutation durable before it is acknowledged, and rebuild the
namespace after a restart (GFS operation log + checkpoint; HDFS edits + fsimage).
The namespace itself is a *state machine* owned by the master; this module drives
it (``restore``, ``apply``, ``snapshot``) and never interprets a record.  Only
``commit()`` and ``open()`` apply records, each record carries a monotonically
increasing index ``"i"``, and ``apply`` is pure: shipping the same log to a standby
master later is an addition, not a rewrite.

Trade-off
---------
A commit appends a few hundred bytes and shares one fsync with every commit that
arrived meanwhile (group commit), so its cost does not grow with the namespace.
The price is replay time at start-up, bounded by a checkpoint every
``checkpoint_every`` records.  The snapshot is taken with commits paused (cheap,
shallow copies) but serialized and written with commits running.

On-disk layout (``data_dir``, mode 0o700, files 0o600)
------------------------------------------------------
    metadata.json                 {"format": 1, "index": N, "state": {...}}
    metadata.json.tmp             a checkpoint being written (removed at open)
    oplog-000000000001.jsonl      records 1, 2, ... one compact JSON object a line
    oplog-<N+1, 12 digits>.jsonl  opened by the checkpoint at index N

Crash cases
-----------
* Mid-append: the last line of the last log file is torn -> it was never
  acknowledged; ``open`` logs a warning and cuts it off.  A bad line anywhere
  else, or a gap in the indexes, is ``MetadataCorrupt``: never skip acknowledged records.
* Mid-checkpoint, before ``os.replace``: the tmp file is deleted, the old
  checkpoint plus all log files (old and new) still hold every record.
* After ``os.replace``, before the old log files are deleted: their records
  (``i <= N``) are read but not applied again.
* A write or fsync error: we no longer know what is durable, so the log turns
  *failed* and refuses every later commit; the master must restart and replay.
  The same happens if ``apply`` raises on a logged record (a state machine bug).

Left out: replication to standby masters, compression, checksums per line (a
torn line fails to parse; silent bit rot inside a string would not be caught).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from typing import Callable, Protocol

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "metadata.json"
CHECKPOINT_FORMAT = 1
LOG_NAME = re.compile(r"oplog-(\d{12})\.jsonl")
DIR_MODE = 0o700
FILE_MODE = 0o600


class MetadataCorrupt(Exception):
    """The data dir holds what no crash can produce; we refuse to guess."""


class MetadataLogFailed(Exception):
    """A write, fsync or apply failed; the log refuses commits until a restart."""


class StateMachine(Protocol):
    def apply(self, record: dict) -> None: ...
    def snapshot(self) -> dict: ...
    def restore(self, snapshot: dict) -> None: ...


def _encode(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str, fsync: Callable[[int], None] = os.fsync) -> None:
    """Make creations, renames and deletions in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str, obj, *, fsync: Callable[[int], None] = os.fsync) -> None:
    """Replace ``path`` with ``obj`` as JSON so that a crash leaves the old or the new file.

    Writes ``path + ".tmp"`` in the same directory (a raw fd: nothing to flush),
    fsyncs it, ``os.replace``s it over ``path`` and fsyncs the directory.  Callers
    serialize writes to one path.  Raises what ``json`` or the OS raises; on error
    the tmp file is removed and ``path`` is untouched.
    """
    data = _encode(obj)  # serialize first: a TypeError leaves nothing behind
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            _write_all(fd, data)
            fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)), fsync)


def _parse(line: bytes) -> dict | None:
    """Return the record on ``line``, or None if the line is torn or not a record."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(record, dict) or type(record.get("i")) is not int:
        return None
    return record


class MetadataLog:
    """Operation log + checkpoint driving a ``StateMachine``.

    Callers use ``open()``, ``commit()``, ``index``, ``checkpoint()`` and ``close()``.
    ``fsync`` is a seam for tests (count calls, inject EIO).  Never call ``commit``
    from inside ``state.apply``: records are applied with the apply lock held.
    """

    def __init__(self, data_dir: str, state: StateMachine, checkpoint_every: int = 10000,
                 *, fsync: Callable[[int], None] = os.fsync):
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        self.data_dir = data_dir
        self._state = state
        self._checkpoint_every = checkpoint_every
        self._fsync = fsync
        # Lock order: _checkpoint_lock -> _write_lock -> _applied.  _sync_lock never
        # takes another lock, so a paused checkpoint cannot block an fsync.
        self._checkpoint_lock = threading.Lock()  # one checkpoint at a time
        self._write_lock = threading.Lock()       # index assignment + os.write + rotation
        self._sync_lock = threading.Lock()        # one fsync at a time, shared by all
        self._applied = threading.Condition()     # apply in index order
        self._fd: int | None = None
        self._log_first = 0          # first index of the current log file (its name)
        self._written_index = 0      # <- _write_lock
        self._durable_index = 0      # <- _sync_lock
        self._applied_index = 0      # <- _applied
        self._auto_from = 0          # applied index when the last auto checkpoint began
        self._checkpoint_thread: threading.Thread | None = None
        self._closing = False
        self._failed: BaseException | None = None
        self._apply_stuck = False    # an apply raised: later records can never apply

    @property
    def index(self) -> int:
        """Index of the last applied record (0 when empty)."""
        return self._applied_index

    def _path(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    def _log_files(self) -> list[tuple[int, str]]:
        found = (LOG_NAME.fullmatch(n) for n in os.listdir(self.data_dir))
        return sorted((int(m.group(1)), self._path(m.group(0))) for m in found if m)

    # --- start-up ---------------------------------------------------------------

    def open(self) -> None:
        """Load the checkpoint, replay the logs, and get ready to append.

        Raises ``MetadataCorrupt`` (naming file and line) for anything a crash cannot
        explain; a torn last line of the last log file is logged and cut off.
        What ``state.restore`` or ``state.apply`` raises propagates.
        """
        if self._fd is not None:
            raise ValueError("metadata log already open")
        os.makedirs(self.data_dir, mode=DIR_MODE, exist_ok=True)
        tmp = self._path(CHECKPOINT_NAME + ".tmp")
        if os.path.exists(tmp):
            logger.warning("%s: removing unfinished checkpoint %s", self.data_dir, tmp)
            os.unlink(tmp)
        start = self._load_checkpoint()
        tail = self._replay(start)
        index = self._applied_index
        if tail is not None and tail[1] > index + 1:
            raise MetadataCorrupt(f"{tail[2]}: continues at {tail[1]}, state ends at {index}")
        if tail is not None and tail[1] == index + 1:
            # Keep appending to the last file (already cut if it had a torn line).
            self._fd = os.open(tail[2], os.O_WRONLY | os.O_APPEND)
            self._log_first = tail[0]
        else:  # no log yet, or the checkpoint covers the last file entirely
            self._fd, self._log_first = self._create_log(index + 1), index + 1
        self._written_index = self._durable_index = index
        self._auto_from = start
        logger.info("%s: opened at index %d (checkpoint %d)", self.data_dir, index, start)

    def _load_checkpoint(self) -> int:
        path = self._path(CHECKPOINT_NAME)
        try:
            with open(path, "rb") as f:
                checkpoint = json.load(f)
        except FileNotFoundError:
            return 0
        except ValueError as exc:  # atomic_write_json never leaves a partial file
            raise MetadataCorrupt(f"{path}: unreadable checkpoint: {exc}") from exc
        if (not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT
                or type(checkpoint.get("index")) is not int
                or not isinstance(checkpoint.get("state"), dict)):
            raise MetadataCorrupt(f"{path}: not a format {CHECKPOINT_FORMAT} checkpoint")
        self._state.restore(checkpoint["state"])
        self._applied_index = checkpoint["index"]
        return checkpoint["index"]

    def _replay(self, start: int) -> tuple[int, int, str] | None:
        """Apply logged records with i > start; return (first, next index, path) of the last file."""
        files = self._log_files()
        tail = None
        for n, (first, path) in enumerate(files):
            next_i = first  # the index the next line of this file must carry
            with open(path, "rb") as f:
                offset = lineno = 0
                while line := f.readline():
                    lineno += 1
                    record = _parse(line)
                    if record is None:
                        if n == len(files) - 1 and (not line.endswith(b"\n") or not f.read(1)):
                            self._cut_torn_tail(path, lineno, offset)
                            break
                        raise MetadataCorrupt(f"{path}:{lineno}: unparsable record")
                    i = record["i"]
                    if i != next_i:
                        raise MetadataCorrupt(f"{path}:{lineno}: index {i}, expected {next_i}")
                    if i > start:  # records <= start are already in the checkpoint
                        if i != self._applied_index + 1:
                            raise MetadataCorrupt(f"{path}:{lineno}: index {i}, records "
                                                  f"{self._applied_index + 1}..{i - 1} missing")
                        self._state.apply(record)
                        self._applied_index = i
                    next_i, offset = i + 1, offset + len(line)
            tail = (first, next_i, path)
        return tail

    def _cut_torn_tail(self, path: str, lineno: int, offset: int) -> None:
        logger.warning("%s:%d: torn last record (never acknowledged), cutting at byte %d",
                       path, lineno, offset)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            self._fsync(fd)
        finally:
            os.close(fd)

    def _create_log(self, first: int) -> int:
        path = self._path(f"oplog-{first:012d}.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, FILE_MODE)
        try:
            fsync_dir(self.data_dir, self._fsync)
        except BaseException:  # a stray empty file would break index continuity
            os.close(fd)
            os.unlink(path)
            raise
        return fd

    # --- commit -----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise MetadataLogFailed(f"metadata log failed earlier: {self._failed!r}")
        if self._fd is None:
            raise ValueError("metadata log is not open")

    def _fail(self, exc: BaseException) -> None:
        logger.error("%s: metadata log failed, refusing commits: %r", self.data_dir, exc)
        with self._applied:
            self._failed = self._failed or exc
            self._applied.notify_all()

    def commit(self, records: list[dict]) -> int:
        """Log ``records`` durably, apply them in index order, and return the last index.

        Sets ``record["i"]`` on each record.  Returns only after the records are
        fsynced *and* applied.  Raises ``MetadataLogFailed`` once a write, fsync or
        apply has failed (then no record of this call was applied, unless durable).
        """
        with self._write_lock:
            self._check_usable()
            if not records:
                return self._applied_index
            first = self._written_index + 1
            for n, record in enumerate(records):
                record["i"] = first + n
            data = b"".join(_encode(record) + b"\n" for record in records)
            try:
                _write_all(self._fd, data)
            except OSError as exc:  # part of data may be on disk: a torn tail at worst
                self._fail(exc)
                raise MetadataLogFailed(f"log write failed: {exc}") from exc
            last = self._written_index = first + len(records) - 1
            fd = self._fd  # rotation waits until these records are applied: fd stays valid
        self._make_durable(fd, last)
        self._apply_in_order(first, records)
        return last

    def _make_durable(self, fd: int, last: int) -> None:
        with self._sync_lock:
            if self._durable_index >= last:  # another thread's fsync covered us
                return
            if self._failed is not None:
                raise MetadataLogFailed(f"metadata log failed earlier: {self._failed!r}")
            target = self._written_index  # everything written so far rides on this fsync
            try:
                self._fsync(fd)
            except OSError as exc:
                self._fail(exc)
                raise MetadataLogFailed(f"log fsync failed: {exc}") from exc
            self._durable_index = target

    def _apply_in_order(self, first: int, records: list[dict]) -> None:
        with self._applied:
            # Records before ours are durable too (durability is a prefix), so they
            # will be applied unless an apply raises.
            self._applied.wait_for(lambda: self._applied_index == first - 1 or self._apply_stuck)
            if self._apply_stuck:
                raise MetadataLogFailed("an earlier record could not be applied")
            try:
                for record in records:
                    self._state.apply(record)
                    self._applied_index = record["i"]
            except Exception as exc:  # the state no longer matches the log
                self._apply_stuck = True
                self._fail(exc)
                raise MetadataLogFailed(f"state machine rejected record {record['i']}") from exc
            finally:
                self._applied.notify_all()
            if (self._checkpoint_thread is None and not self._closing
                    and self._applied_index - self._auto_from >= self._checkpoint_every):
                self._auto_from = self._applied_index  # on failure, retry after another interval
                self._checkpoint_thread = threading.Thread(
                    target=self._auto_checkpoint, name="metadata-checkpoint", daemon=True)
                self._checkpoint_thread.start()

    # --- checkpoint ---------------------------------------------------------------

    def _auto_checkpoint(self) -> None:
        try:
            self.checkpoint()
        except Exception:
            logger.exception("%s: automatic checkpoint failed", self.data_dir)
        finally:
            with self._applied:
                self._checkpoint_thread = None

    def checkpoint(self) -> None:
        """Write the state to ``metadata.json`` atomically, then drop covered log files.

        Commits pause only while the snapshot is taken and the log rotated.  Raises
        ``MetadataLogFailed`` if the log failed, ``OSError`` if the disk does (the
        log then keeps appending to the current file: nothing is lost).
        """
        with self._checkpoint_lock:
            with self._write_lock:
                self._wait_all_applied()
                index = self._applied_index
                snapshot = self._state.snapshot()
                if self._log_first != index + 1:  # else the current file is empty already
                    fd = self._create_log(index + 1)
                    os.close(self._fd)  # every record in it is durable: applied == written
                    self._fd, self._log_first = fd, index + 1
                keep_from = self._log_first
            atomic_write_json(self._path(CHECKPOINT_NAME),
                              {"format": CHECKPOINT_FORMAT, "index": index, "state": snapshot},
                              fsync=self._fsync)
            # A crash or error here leaves old files holding only records <= index,
            # which replay reads and skips; the next checkpoint deletes them.
            for first, path in self._log_files():
                if first < keep_from:
                    os.unlink(path)
            logger.info("%s: checkpoint at index %d", self.data_dir, index)

    def snapshot(self) -> tuple[int, dict]:
        """(index, state snapshot) of everything applied so far, taken with commits paused.

        For copies of the checkpoint kept elsewhere (meta_backup.py): nothing
        is written here.  Raises ``MetadataLogFailed`` if the log failed.
        """
        with self._write_lock:
            self._wait_all_applied()
            return self._applied_index, self._state.snapshot()

    def _wait_all_applied(self) -> None:
        """Wait until every written record is applied (caller holds the write lock, so no more
        are written meanwhile); raises ``MetadataLogFailed`` if the log failed."""
        self._check_usable()
        with self._applied:
            self._applied.wait_for(lambda: self._applied_index == self._written_index or self._failed is not None)
        self._check_usable()

    def close(self) -> None:
        """Wait for a running checkpoint, then close the log.  Stop committing first."""
        self._closing = True
        thread = self._checkpoint_thread
        if thread is not None:
            thread.join()
        with self._write_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
