"""The client and its command line: upload, download, delete, list, status.

``python client.py`` runs ``main()`` here; ``client.py`` is only the entry
script, because Python compiles a script on every run but caches the bytecode
of an imported module (this one is ~1,900 lines: 10-20 ms per start-up).

The client streams: a file is read in batch-sized pieces into one reused
buffer and sent as DATA frames, hashed with SHA-256 on the way; a download
is written to a temporary file beside the target, hashed, and renamed only
if the hash matches what the master recorded at upload.  So memory stays at
one buffer whatever the file size, and a failed download leaves nothing
behind.

Every error reaches the user as one line on stderr and an exit code that
names its class (see EXIT_CODES and the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import queue
import select
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import config as config_module
import filemeta
import master_link
import protocol
import views
from views import human_bytes, plural

# transport (sockets, TLS) and security (HMAC, TLS contexts) are imported
# where a connection is made, hashlib (it loads OpenSSL) where a file is
# hashed and logging where it is set up, not here: ``--help`` and usage
# errors never need them (nor listings hashlib), and their imports were a
# third of the client's start-up.  health (with namespace), history and
# retention (with datetime) are imported by the commands that use them, for
# the same reason.


EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_LOCAL_IO = 4
EXIT_UNAVAILABLE = 5
EXIT_INSUFFICIENT_NODES = 6
EXIT_CHECKSUM = 7
EXIT_INVALID_NAME = 8
EXIT_PROTOCOL = 9
EXIT_TIMEOUT = 10
EXIT_DATA_LOST = 11
EXIT_INSUFFICIENT_SPACE = 12
EXIT_FILE_LOCKED = 13
EXIT_AUTH_FAILED = 14
EXIT_PARTIAL = 15
EXIT_INVALID_RANGE = 16
EXIT_FILE_EXISTS = 17
EXIT_NO_LEADER = 18  # no master of a replicated group led within failover_timeout_s
EXIT_DAMAGED = 19  # verify: a stored file is damaged, or (--against) the trees differ

# `status` asks every master of a group how it sees itself; one silent this long shows as unreachable.
MASTER_STATUS_TIMEOUT_S = 2.0

# Wire error code -> exit status.  Codes not listed exit with EXIT_ERROR.
EXIT_CODES = {
    "FILE_NOT_FOUND": EXIT_NOT_FOUND,
    "INVALID_RANGE": EXIT_INVALID_RANGE,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "INSUFFICIENT_NODES": EXIT_INSUFFICIENT_NODES,
    "CHECKSUM_MISMATCH": EXIT_CHECKSUM,
    "INVALID_NAME": EXIT_INVALID_NAME,
    "BAD_REQUEST": EXIT_PROTOCOL,
    "TOO_LARGE": EXIT_PROTOCOL,
    "UNKNOWN_OP": EXIT_PROTOCOL,
    "VERSION_MISMATCH": EXIT_PROTOCOL,
    "TIMEOUT": EXIT_TIMEOUT,
    "DATA_LOST": EXIT_DATA_LOST,
    "INSUFFICIENT_SPACE": EXIT_INSUFFICIENT_SPACE,
    "FILE_LOCKED": EXIT_FILE_LOCKED,
    "FILE_EXISTS": EXIT_FILE_EXISTS,
    "AUTH_FAILED": EXIT_AUTH_FAILED,
    "NO_LEADER": EXIT_NO_LEADER,
}


# Downloads requested ahead of the one being received when restoring a tree.
DOWNLOAD_WINDOW = 32
# A directory upload sends files of at most SMALL_FILE_BYTES in UPLOAD_FILES
# batches: many files per frame, one PUT_BLOBS per node per batch on the
# master, instead of four frames and a node request per file.  A batch ends
# at SMALL_BATCH_FILES files, at the client's frame size of bytes (what one
# DATA of a large file holds), or at SMALL_BATCH_HEADER_BYTES of header
# (a page, as the master reads list pages).
SMALL_FILE_BYTES = 64 * 1024
SMALL_BATCH_FILES = 256
SMALL_BATCH_HEADER_BYTES = 64 * 1024
# Files of a direct tree restore planned by one READ_PLANS (the master takes
# up to MAX_PLAN_FILES): a batch is pinned until its READ_END, and the next
# batch's plans are on their way while this one's chunks are read.
PLAN_FILES = 256
# ... and at most this many bytes of files (one file may be larger: it is
# read alone): a batch's pins and capabilities last read_lease_s from its
# READ_PLANS, which must cover reading it and the next one at any plausible
# speed (128 MiB in 600 s is 0.2 MiB/s).
PLAN_BYTES = 64 * 1024 * 1024
# File data a direct tree restore's writer thread may have queued.
WRITER_QUEUE_BYTES = 4 * 1024 * 1024
# Times `stat` restarts reading a file's runs because it was replaced meanwhile.
_STAT_ATTEMPTS = 3
# `stat` without --runs lists a file's runs only if it has at most this many.
STAT_RUNS_SHOWN = 20


def new_sha256(data=b""):
    """A fresh SHA-256 of ``data`` (hashlib imported on first use: see the imports at the top)."""
    import hashlib  # noqa: PLC0415
    return hashlib.sha256(data)


def read_full(f, view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; the bytes read.

    So every frame of an upload but the last is a whole buffer: whole
    chunks, which the chunk CRCs sent with it need (Data.crcs).
    """
    total = 0
    while total < len(view):
        n = f.readinto(view[total:])
        if not n:
            break
        total += n
    return total


class LocalFileError(Exception):
    """A problem with a file on this machine (missing, unreadable, unwritable)."""


class UnsafeDestination(LocalFileError):
    """A download target that must not be replaced: a symlink, device, FIFO, socket or directory.

    Its own exit status (EXIT_USAGE): ``--force`` does not help, the user
    has to give another path.
    """


class _NoReadPlans(Exception):
    """The master answered READ_PLANS with UNKNOWN_OP (it predates batched plans); nothing was read."""


class _NoUploadFiles(Exception):
    """The master answered UPLOAD_FILES with UNKNOWN_OP (it predates batches of small files).

    Its one ERROR answers a whole frame of files: the replies after it belong
    to other files, so the tree upload stops reading them and starts again
    without batches (the files acknowledged so far are not sent again).
    """


class UsageError(Exception):
    """Arguments that parse but make no sense together (exit EXIT_USAGE)."""


@dataclass
class TreeSummary:
    """Outcome of a directory upload or restore."""

    files: int = 0
    bytes: int = 0
    skipped: int = 0
    failures: list = field(default_factory=list)  # (name, reason)
    started: float = field(default_factory=time.monotonic)
    # Of an upload: name -> id of the version it stored (the names acknowledged so far).
    versions: dict = field(default_factory=dict)

    def ok(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes

    def fail(self, name: str, reason: str, report=None) -> None:
        self.failures.append((name, reason))
        if report:
            report(f"failed {name}: {reason}")

    def line(self, verb: str) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (f"{verb} {plural(self.files, 'file')}, {human_bytes(self.bytes)} in {elapsed:.2f} s "
                f"({self.files / elapsed:.0f} files/s, {human_bytes(self.bytes / elapsed)}/s); "
                f"{len(self.failures)} failed, {self.skipped} skipped")


@dataclass
class BackupSummary:
    """Outcome of ``Client.backup_tree``: how each local file was classed, what was sent, the snapshot."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: int = 0  # special files and --exclude matches
    bytes_to_send: int = 0
    sent: TreeSummary | None = None  # the upload of new and changed files (None: nothing sent)
    snapshot: "protocol.SnapshotMade | None" = None
    failures: list = field(default_factory=list)  # (name, reason): not in the snapshot
    started: float = field(default_factory=time.monotonic)

    def line(self, dry_run: bool = False) -> str:
        counts = (f"{self.new} new, {self.changed} changed, {self.unchanged} unchanged, {self.skipped} skipped"
                  + (f", {len(self.failures)} failed" if self.failures else ""))
        if dry_run:
            return f"dry run: {counts}; would send {human_bytes(self.bytes_to_send)} (nothing sent)"
        elapsed = max(time.monotonic() - self.started, 1e-6)
        sent = human_bytes(self.sent.bytes if self.sent else 0)
        snap = self.snapshot
        return (f"snapshot {snap.id} of {snap.root}: {plural(snap.files, 'file')}, {human_bytes(snap.bytes)}; "
                f"{counts}; {sent} sent in {elapsed:.2f} s")


@dataclass
class VerifySummary:
    """Outcome of ``Client.verify``: files read whole and intact, the damaged ones, the vanished ones."""

    files: int = 0
    bytes: int = 0
    damaged: list = field(default_factory=list)  # (name, error code, message)
    gone: list = field(default_factory=list)  # deleted between listing and reading
    started: float = field(default_factory=time.monotonic)


def _local_sha256(path: str, kind: str) -> str:
    """SHA-256 of what a directory upload would store for ``path`` (open_source).  Raises OSError."""
    f, _, _ = open_source(path, kind)
    sha = new_sha256()
    with f:
        while True:
            block = f.read(1024 * 1024)
            if not block:
                return sha.hexdigest()
            sha.update(block)


def walk_tree(root: str):
    """Yield (path, relative name with '/', kind) for everything below ``root``.

    kind is "file" for regular files, "symlink" (never followed), "directory"
    for an empty directory (its files re-create the others), else "special
    file".  Sorted, so runs repeat.
    """
    for path, relative, kind, _ in walk_tree_stat(root):
        yield path, relative, kind


def walk_tree_stat(root: str):
    """walk_tree, each item with the ``os.lstat`` result it was classed by (None for a directory)."""
    for directory, subdirs, names in os.walk(root, followlinks=False):
        subdirs.sort()
        # One relpath per directory, not per file: it dominated walking a tree of small files.
        above = os.path.relpath(directory, root).replace(os.sep, "/")
        above = "" if above == "." else above + "/"
        if not subdirs and not names and os.path.abspath(directory) != os.path.abspath(root):
            yield directory, above.rstrip("/"), "directory", None
            continue
        for name in sorted(names) + [d for d in subdirs if os.path.islink(os.path.join(directory, d))]:
            path = os.path.join(directory, name)
            relative = above + name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield path, relative, "file", st
            elif stat.S_ISLNK(st.st_mode):
                yield path, relative, "symlink", st
            else:
                yield path, relative, "special file", st


# walk_tree's kinds that a directory upload stores, as filemeta kinds.
_STORED_KINDS = {"file": filemeta.FILE, "symlink": filemeta.SYMLINK, "directory": filemeta.DIRECTORY}


def open_source(path: str, kind: str):
    """(readable file, size, metadata) of what a directory upload stores for ``path``.

    A regular file is opened (its metadata taken from the open file, so it
    describes the bytes sent); a symlink gives its target's bytes, an empty
    directory no bytes.  Raises OSError.
    """
    if kind == filemeta.FILE:
        # Unbuffered: reads go into the caller's buffer anyway (read_full), and
        # a buffered reader costs ~10 us more to make, per file of a tree.
        f = open(path, "rb", buffering=0)
        st = os.fstat(f.fileno())
        return f, st.st_size, filemeta.capture(st)
    st = os.lstat(path)
    data = os.fsencode(os.readlink(path)) if kind == filemeta.SYMLINK else b""
    return io.BytesIO(data), len(data), filemeta.capture(st, kind)


class SmallBatch:
    """Small files of a directory upload gathered for one UPLOAD_FILES (see SMALL_FILE_BYTES).

    ``read`` takes a file whole (bytes, SHA-256 and the CRCs of its
    chunks, computed here as for a DATA); ``send`` sends the batch, if any,
    and notes each file in ``in_flight`` for the reply thread.
    """

    def __init__(self, chunk_size: int, max_bytes: int):
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self._view = memoryview(bytearray(SMALL_FILE_BYTES + 1))
        self._clear()

    def _clear(self) -> None:
        self.files: list = []  # [name, size, sha256, meta, tag]
        self.parts: list = []  # CRCs, bytes of each file
        self.body_bytes = 0
        self.header_bytes = 0

    def read(self, f, name: str, meta, tag: int) -> bool:
        """Add the file open as ``f``; False (``f`` rewound) if it grew past SMALL_FILE_BYTES."""
        n = read_full(f, self._view)
        if n > SMALL_FILE_BYTES:
            f.seek(0)
            return False
        data = bytes(self._view[:n])
        crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(data, self.chunk_size)) if data else b""
        self.files.append([name, len(data), new_sha256(data).hexdigest(), meta, tag])
        self.parts += (crcs, data)
        self.body_bytes += len(crcs) + len(data)
        # A bound of the entry's JSON: a name's escapes at most double it; the rest is short.
        self.header_bytes += 2 * len(name.encode("utf-8", "surrogateescape")) + 300
        return True

    def full(self) -> bool:
        """True once one more file might not fit the frame."""
        return (len(self.files) >= SMALL_BATCH_FILES or self.header_bytes > SMALL_BATCH_HEADER_BYTES - 2400
                or self.body_bytes > self.max_bytes - SMALL_FILE_BYTES - 4 * (SMALL_FILE_BYTES // 64 + 1))

    def send(self, conn, in_flight) -> None:
        if not self.files:
            return
        for name, size, _sha256, _meta, tag in self.files:
            in_flight.append((tag, name, size))
        conn.send(protocol.UploadFiles(files=self.files, chunk_size=self.chunk_size, body=b"".join(self.parts)),
                  flush=False)
        self._clear()


def local_base_name(name: str) -> str:
    """The last component of a stored name, as a file name in the current directory.

    Names are opaque keys: ``../../x`` gives ``x``.  A name whose last
    component is empty, ``.`` or ``..`` gives no file name at all
    (LocalFileError): the user must say where to write it.
    """
    base = name.rstrip("/").rpartition("/")[2]
    if base in ("", ".", ".."):
        raise LocalFileError(f"cannot make a local file name from {name!r}; give the local path to write to")
    return base


def file_kind(mode: int) -> str:
    """What ``stat`` says a path is, in words for an error message."""
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def check_destination(path: str, force: bool) -> None:
    """Refuse a download target that exists, unless it is a regular file and ``force``.

    A download replaces its target by renaming a temporary file over it, so
    whatever sits there is gone: ``--force`` may do that to a regular file
    only.  A symlink (even one to a regular file: renaming would replace the
    link, not write through it), a directory, FIFO, socket or device raises
    UnsafeDestination whatever ``force`` says; ``-`` is the way to write to
    standard output.  Called before the download and again just before the
    rename, so a target that appeared meanwhile is not replaced either.
    """
    if path == "-":
        return
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LocalFileError(f"cannot check {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UnsafeDestination(f"refusing to replace {path}: it is a {file_kind(mode)}, and --force replaces "
                                f"regular files only (give - to write to standard output)")
    if not force:
        raise LocalFileError(f"{path} exists; use --force to overwrite it")


@dataclass(frozen=True)
class Restore:
    """What a restore gives back besides the bytes (recorded at upload: filemeta.py)."""

    metadata: bool = True  # mode and mtime; False with --no-metadata
    owners: bool = False  # uid and gid too (--owners; only a restore run as root can)


def place_restored(temp_path: str, destination: str, force: bool, meta: dict | None,
                   restore: Restore | None) -> None:
    """Put a downloaded temporary file in place as what ``meta`` says it was.

    A regular file (or an entry stored without metadata) is renamed over
    ``destination``; a symlink's bytes become a link made under the
    temporary name and renamed the same way (so a restore never leaves half
    a link); an empty directory is created.  Mode, mtime (and owner) are set
    before the rename unless ``restore`` says not to.  The temporary path
    is the caller's to remove on failure.  Raises LocalFileError.
    """
    kind = filemeta.kind_of(meta)
    apply_meta = restore is not None and restore.metadata
    try:
        if kind == filemeta.DIRECTORY:
            os.unlink(temp_path)
            if not os.path.isdir(destination) or os.path.islink(destination):
                check_destination(destination, force)
                os.mkdir(destination)
            if apply_meta:
                filemeta.apply(destination, meta, restore.owners)
            return
        if kind == filemeta.SYMLINK:
            with open(temp_path, "rb") as f:
                target = f.read(filemeta.MAX_LINK_BYTES + 1)
            os.unlink(temp_path)
            os.symlink(target, temp_path)  # the unique temporary name, now a link
        if apply_meta:
            filemeta.apply(temp_path, meta, restore.owners)
    except OSError as exc:
        raise LocalFileError(f"cannot restore {destination}: {exc.strerror}") from None
    check_destination(destination, force)
    try:
        os.replace(temp_path, destination)
    except OSError as exc:
        raise LocalFileError(f"cannot write {destination}: {exc.strerror}") from None


def name_max(directory: str) -> int:
    """Longest file name (bytes) the file system of ``directory`` (or its nearest existing parent) takes."""
    directory = os.path.abspath(directory)
    while True:
        try:
            return os.pathconf(directory, "PC_NAME_MAX")
        except (OSError, ValueError):
            parent = os.path.dirname(directory)
            if parent == directory:
                return _DEFAULT_NAME_MAX
            directory = parent


# NAME_MAX of Linux and most other systems, when pathconf cannot tell.
_DEFAULT_NAME_MAX = 255
# A temporary file is ".BASE.XXXXXXXX.part": two dots, mkstemp's 8 random
# characters and the suffix come on top of (a cut of) the target's name.
_TEMP_SUFFIX = ".part"
_TEMP_EXTRA_BYTES = 2 + 8 + len(_TEMP_SUFFIX)


def open_temp_beside(destination: str) -> tuple[int, str]:
    """A new private temporary file in ``destination``'s directory: (fd, path).

    Named after the target so a leftover is recognisable, but the target's
    name is cut (at a character boundary) so the temporary name fits the
    file system's NAME_MAX however long the target's name is: a 255-byte
    name must be restorable.  Raises LocalFileError.
    """
    directory = os.path.dirname(os.path.abspath(destination))
    base = os.fsencode(os.path.basename(destination))
    keep = max(0, name_max(directory) - _TEMP_EXTRA_BYTES)
    if len(base) > keep:
        while keep and (base[keep] & 0xC0) == 0x80:  # not inside a UTF-8 sequence
            keep -= 1
        base = base[:keep]
    try:
        return tempfile.mkstemp(dir=directory, prefix="." + os.fsdecode(base) + ".", suffix=_TEMP_SUFFIX)
    except OSError as exc:
        raise LocalFileError(f"cannot write in {directory}: {exc.strerror}") from None


def make_parents(root: str, path: str) -> None:
    """Create the directories between ``root`` and ``path``'s parent, never through a link.

    A tree restore writes only below ``root``: an existing symlink on the
    way (which could point anywhere) is refused, not followed, and so is a
    file where a directory is needed.  Raises LocalFileError naming it.
    """
    current = os.path.abspath(root)
    relative = os.path.relpath(os.path.dirname(path), current)
    if relative == ".":
        return
    for part in relative.split(os.sep):
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            try:
                os.mkdir(current)
                continue
            except FileExistsError:  # created meanwhile: look again
                mode = os.lstat(current).st_mode
            except OSError as exc:
                raise LocalFileError(f"cannot create directory {current}: {exc.strerror}") from None
        except OSError as exc:
            raise LocalFileError(f"cannot check {current}: {exc.strerror}") from None
        if not stat.S_ISDIR(mode):
            raise LocalFileError(f"{current} is a {file_kind(mode)}, not a directory; a restore does not "
                                 f"follow links or replace files on the way")


class Progress:
    """A one-line progress bar on stderr: bytes, rate, ETA.  No-op when disabled."""

    _MIN_INTERVAL_S = 0.1

    def __init__(self, label: str, total: int, enabled: bool):
        self.label = label
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.enabled and time.monotonic() - self._last_draw >= self._MIN_INTERVAL_S:
            self._draw()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self) -> None:
        now = time.monotonic()
        self._last_draw = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        if self.total > 0:
            fraction = min(self.done / self.total, 1.0)
            bar = "#" * int(fraction * 20)
            eta = (self.total - self.done) / rate if rate > 0 else 0
            text = (f"\r{self.label} [{bar:<20}] {human_bytes(self.done)}/{human_bytes(self.total)} "
                    f"{human_bytes(rate)}/s ETA {int(eta) // 60}:{int(eta) % 60:02d}  ")
        else:
            text = f"\r{self.label} {human_bytes(self.done)} {human_bytes(rate)}/s  "
        sys.stderr.write(text)
        sys.stderr.flush()


class _FrameSink:
    """Hashes and writes received frames, in other threads when ``threaded``.

    ``free_buffer()`` hands out a buffer to receive the next frame into;
    ``put()`` queues its body; ``close()`` drains the queues and re-raises a
    write error.  _BUFFERS buffers rotate, so memory is that many frames.
    Threaded, a frame is hashed in one thread and then written in another
    (in order, each): hashlib and file writes release the GIL, so on two
    cores a file's page-cache writes (about as costly as the SHA-256 here)
    overlap the hashing instead of adding to it, and a slow reader of our
    stdout does not hold up the hashing.  With ``keep_going`` a write error
    does not stop the caller from receiving: later frames are dropped and
    the error comes from ``close()``, so the reply is read to its end and
    the connection stays in step (a directory restore then goes on with the
    next file).
    """

    # Enough that a receiving thread descheduled for a moment (two cores
    # shared by five processes in a download) does not starve the hashing.
    _BUFFERS = 6

    def __init__(self, out, sha, progress: Progress, threaded: bool, first_buffer: bytearray,
                 keep_going: bool = False):
        self.out = out
        self.sha = sha
        self.progress = progress
        self.keep_going = keep_going
        self.error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        self._free.put(first_buffer)
        # More buffers (up to _BUFFERS) are made when one is needed and none
        # is free, not here: zeroing 5 MiB (~0.3 ms) is then done while the
        # first pieces arrive, not before the first request to a node.
        self._buffer_bytes = len(first_buffer)
        self._buffers_left = self._BUFFERS - 1 if threaded else 0
        self._threaded = threaded
        self._threads = []  # started by the first put(): see _start

    def _start(self) -> None:
        """Start the hashing and writing threads.

        Not before the first frame has arrived: ``Thread.start()`` waits
        until the new thread runs, which on a busy machine took up to ~4 ms
        (two threads; 0.3 ms on an idle one) that the first requests to the
        nodes then waited for; now the next pieces arrive meanwhile.
        """
        self._work: queue.Queue = queue.Queue()
        self._to_write: queue.Queue | None = queue.Queue() if self.sha is not None else None
        stages = [("download-hash", self._hash_loop), ("download-writer", self._write_loop)] \
            if self.sha is not None else [("download-writer", self._write_loop)]
        for name, target in stages:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def free_buffer(self) -> bytearray:
        """A buffer to receive the next frame into; raises a write error at once unless ``keep_going``.

        Checked again once a buffer is free: the caller may have waited for
        one while the write failed, and must not read the rest of the reply
        (the peer then sees us go away, as with a broken pipe before).
        """
        if self.error is not None and not self.keep_going:
            raise self.error
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            if self._buffers_left:
                self._buffers_left -= 1
                return bytearray(self._buffer_bytes)
            buffer = self._free.get()
        if self.error is not None and not self.keep_going:
            self._free.put(buffer)
            raise self.error
        return buffer

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer from ``free_buffer`` that was not filled after all."""
        self._free.put(buffer)

    def put(self, buffer: bytearray, body) -> None:
        if self._threaded and not self._threads:
            self._start()
        if not self._threads:
            if self.sha is not None:
                self.sha.update(body)
            self._write(body)
            self._free.put(buffer)
        else:
            self._work.put((buffer, body))

    def _write(self, body) -> None:
        if self.error is not None:
            return
        try:
            try:
                self.out.write(body)
            except BrokenPipeError:
                raise  # the reader of our output went away (`| head`): main() ends quietly
            except OSError as exc:
                raise LocalFileError(f"cannot write: {exc.strerror}") from None
            self.progress.advance(len(body))
        except BaseException as exc:
            self.error = exc
            if not self._threads and not self.keep_going:
                raise

    def _hash_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is not None:
                self.sha.update(item[1])
            self._to_write.put(item)
            if item is None:
                return

    def _write_loop(self) -> None:
        source = self._to_write if self.sha is not None else self._work
        while True:
            item = source.get()
            if item is None:
                return
            buffer, body = item
            self._write(body)
            self._free.put(buffer)

    def close(self) -> None:
        if self._threads:
            self._work.put(None)
            for thread in self._threads:
                thread.join()
        if self.error is not None:
            raise self.error


class _Discard:
    """A writable that keeps nothing: the sink of a reply nobody needs."""

    def write(self, data) -> int:
        return len(data)


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for it could not be written, and
    Python's exit would try again and fail the same way (a message and status 120)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _close_quietly(f) -> None:
    try:
        f.close()
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _TreeFile:
    """One file of a pipelined direct tree restore (Client._download_files_direct), being written.

    Opened at its first piece (or its end, for an empty file); a local
    failure is reported at once and the file's later pieces are dropped.
    """

    def __init__(self, position: int, path: str, name: str, summary: TreeSummary, report):
        self.position, self.path, self.name = position, path, name
        self.summary, self.report = summary, report
        self.out = None
        self.temp_path = None
        self.sha = new_sha256()
        self.received = 0

    @classmethod
    def open(cls, position: int, root: str, path: str, summary: TreeSummary, report, name: str,
             directories: set) -> "_TreeFile":
        """``directories``: the directories this restore already made or checked (make_parents once each)."""
        tree_file = cls(position, path, name, summary, report)
        try:
            parent = os.path.dirname(path)
            if parent not in directories:
                make_parents(root, path)
                directories.add(parent)
            fd, tree_file.temp_path = open_temp_beside(path)
            tree_file.out = os.fdopen(fd, "wb")
        except LocalFileError as exc:
            tree_file.fail(str(exc))
        return tree_file

    def fail(self, reason: str) -> None:
        self.summary.fail(self.name, reason, self.report)
        self.discard()

    def write(self, view) -> None:
        if self.out is None:
            return  # failed locally: the rest of its bytes are dropped
        self.sha.update(view)
        self.received += len(view)
        try:
            self.out.write(view)
        except OSError as exc:
            self.fail(f"cannot write {self.path}: {exc.strerror}")

    def finish(self, client: "Client", plan: protocol.ReadPlan, force: bool, restore: "Restore") -> None:
        """Check the bytes against the plan, rename into place, count it (or report why not)."""
        if self.out is None:
            return
        import direct_read  # noqa: PLC0415 - loaded by the caller already
        info = direct_read.file_info(plan)
        try:
            if self.received != plan.length:
                raise protocol.RemoteProtocolError(f"read {self.received} bytes of {self.name!r}, "
                                                   f"announced {plan.length}")
            if self.sha.hexdigest() != plan.sha256:
                raise protocol.ChecksumMismatch(f"{self.name!r} failed verification: SHA-256 differs from the one "
                                                f"recorded at upload; nothing was written")
            out, self.out = self.out, None
            client._place_written(out, self.temp_path, self.path, force, info, restore)
            self.temp_path = None  # renamed into place
        except LocalFileError as exc:
            self.fail(str(exc))
            return
        except protocol.BackupError as exc:
            self.fail(f"{exc.code}: {exc.message}")
            return
        self.summary.ok(plan.length)

    def discard(self) -> None:
        if self.out is not None:
            _close_quietly(self.out)
            self.out = None
        if self.temp_path is not None:
            _unlink_quietly(self.temp_path)
            self.temp_path = None


class _TreeWriter:
    """Creates, writes, checks and renames the files of a direct tree restore, in a thread of its own.

    The reading thread (``Client._download_files_direct``) hands over each
    file's bytes, in order, then its end; this thread does with them what
    ``_TreeFile`` does.  Creating a file can cost more than fetching it
    (an inode allocation took 0.6-0.8 ms on the ext4 of docs/BENCHMARKS.md,
    a 4 KiB file's plan and chunks about 0.3 ms), and system calls and
    hashlib release the GIL, so the two overlap.  At most
    WRITER_QUEUE_BYTES of file data wait.  The summary and ``report`` are
    this thread's until ``close()``: failures the reading thread finds are
    queued like the rest, so they are reported in file order.
    """

    def __init__(self, client: "Client", root: str, force: bool, restore: "Restore", summary: TreeSummary, report):
        self.client, self.root, self.force, self.restore = client, root, force, restore
        self.summary, self.report = summary, report
        self.error: BaseException | None = None
        self._directories: set[str] = set()
        self._queue: queue.Queue = queue.Queue()
        self._room = threading.Condition()
        self._queued = 0  # bytes of file data in the queue
        self._thread = threading.Thread(target=self._run, name="restore-writer", daemon=True)
        self._thread.start()

    def put(self, position: int, path: str, name: str, data: bytes | None, end=None) -> None:
        """Queue ``data`` (the next bytes of file ``position``; None: none) and, unless ``end`` is None, the
        file's end: its ReadPlan (check and rename it), a str (it failed: why), or False (drop it unreported:
        it is read again later).  Waits while WRITER_QUEUE_BYTES are queued."""
        size = len(data) if data else 0
        with self._room:
            while self._queued and self._queued + size > WRITER_QUEUE_BYTES and self.error is None:
                self._room.wait()
            if self.error is not None:
                raise self.error
            self._queued += size
        self._queue.put((position, path, name, data, end))

    def _run(self) -> None:
        current = None  # _TreeFile being written
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                position, path, name, data, end = item
                if current is not None and current.position != position:
                    current.discard()  # not ended: cannot happen (ends are queued in order), but never leak it
                    current = None
                if current is None and (data is not None or isinstance(end, protocol.ReadPlan)):
                    current = _TreeFile.open(position, self.root, path, self.summary, self.report, name,
                                             self._directories)
                if data is not None:
                    current.write(data)
                    with self._room:
                        self._queued -= len(data)
                        self._room.notify()
                if end is None:
                    continue
                if isinstance(end, protocol.ReadPlan):
                    current.finish(self.client, end, self.force, self.restore)
                elif isinstance(end, str):
                    self.summary.fail(name, end, self.report)
                if current is not None:
                    current.discard()  # a no-op after finish
                current = None
        except BaseException as exc:
            with self._room:
                self.error = exc
                self._room.notify_all()
        finally:
            if current is not None:
                current.discard()  # the restore stopped in the middle of this file

    def close(self) -> None:
        """Finish the files queued (a file not ended is removed); raise what stopped the thread, if anything."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


class Client:
    """A session with the master: one connection, opened on first use.

    ``master``: one (host, port), or the list of a replicated group's
    masters; a MasterLink (master_link.py) finds the leader and each public
    method re-runs on a leader change when that is safe.
    """

    def __init__(self, master, timeout_s: float, frame_bytes: int, show_progress: bool,
                 security: transport.Security | None = None, handshake_timeout_s: float | None = None,
                 failover_timeout_s: float = 10.0, chunk_size: int = 1024, direct_reads: bool = True,
                 replicas=None):
        self.link = master_link.MasterLink(master, "client", timeout_s, security,
                                           handshake_timeout_s=handshake_timeout_s,
                                           failover_timeout_s=failover_timeout_s)
        # Directory uploads interrupted by a leader change resume from here: (root, prefix) ->
        # (summary so far, names acknowledged).
        self._tree_progress: dict = {}
        self.security = security  # shared secret and TLS (security.py); None = neither
        self.timeout_s = timeout_s
        # Connecting and HELLO must succeed within this (io_timeout_s from
        # the CLI), even when timeout_s allows a long wait for a lock.
        self.handshake_timeout_s = handshake_timeout_s
        self.frame_bytes = frame_bytes
        # Uploads send the CRC32 of each chunk_size-byte chunk (the cluster's
        # chunk_size_bytes; the master ignores them if it cuts otherwise):
        # the nodes check the bytes against them, so they guard every hop
        # from this process on.  0 = none (then the master hashes the file).
        self.crc_chunk_size = chunk_size if chunk_size and frame_bytes % chunk_size == 0 else 0
        self.show_progress = show_progress
        self._conn: transport.Connection | None = None
        self._frame_buffer: bytearray | None = None
        # Downloads read the chunks from the nodes (direct_read.py) unless False.
        self.direct_reads = direct_reads
        # Directory uploads send small files in UPLOAD_FILES batches until a
        # master answers one with UNKNOWN_OP (_NoUploadFiles).
        self.upload_files = True
        self._replicas = replicas  # a direct_read.ReplicaPool; None: made on first use
        # During a pipelined tree restore: the replies still to come, in order
        # (a download's, or READ_ENDED); None otherwise.
        self._expected: deque | None = None

    @property
    def master(self) -> tuple[str, int]:
        """The master this session talks to (the leader, once found)."""
        return self.link.current

    @property
    def conn(self) -> transport.Connection:
        if self._conn is None:
            import logging  # noqa: PLC0415 - see the imports at the top
            logging.getLogger("client").debug("connecting to master %s (timeout %g s, handshake %g s)",
                                              self.link.describe(), self.timeout_s,
                                              self.handshake_timeout_s or self.timeout_s)
            self._conn = self.link.connect()
        return self._conn

    def _retrying(self, safe: bool, op):
        """``op()`` through the MasterLink: re-sent to a new leader after NOT_LEADER, and after
        a lost connection when ``safe`` (repeating it cannot do harm)."""
        return self.link.run(op, safe=safe, on_retry=self.close)

    @property
    def in_step(self) -> bool:
        """True unless the connection broke mid-reply (a later request would read garbage)."""
        return self._conn is None or not self._conn.broken

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._replicas is not None:
            self._replicas.close()

    # --- upload ----------------------------------------------------------------------
    def upload_file(self, path: str, name: str, mode: str = "replace", offset: int = 0,
                    wait_s: float = -1.0) -> protocol.Uploaded:
        # A file is read again from the start when re-sent; stdin cannot be,
        # and an append or write repeated would apply twice.
        return self._retrying(path != "-" and mode == "replace",
                              lambda: self._upload_file(path, name, mode, offset, wait_s))

    def _upload_file(self, path: str, name: str, mode: str, offset: int, wait_s: float) -> protocol.Uploaded:
        """Send the local file ``path`` ("-" = stdin) to be stored as ``name``.

        ``mode``: "replace" (the whole file), "append" (added at the end), or
        "write" (overwrites from ``offset``).  ``wait_s``: how long to wait
        for another writer of the name (0 = not at all, negative = the
        master's default).  Returns the master's UPLOADED.
        """
        protocol.validate_name(name, storing=True)
        try:
            f = sys.stdin.buffer if path == "-" else open(path, "rb")
        except OSError as exc:
            raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
        try:
            st = None if path == "-" else os.fstat(f.fileno())
            size = -1 if st is None else st.st_size
            # A whole local file keeps its mode and mtime (given back by download).
            meta = filemeta.capture(st) if st is not None and mode == "replace" else None
            conn = self.conn
            # Not for stdin: its frames go as they come (a slow pipe must not
            # wait to fill a whole frame while the master's lock lease runs),
            # so they need not hold whole chunks; the master hashes them.
            crc_chunk = self.crc_chunk_size if mode == "replace" and path != "-" else 0
            conn.send(protocol.UploadBegin(name=name, size=size, mode=mode, offset=offset, wait_s=wait_s, meta=meta,
                                           chunk_size=crc_chunk))
            verb = "upload" if mode == "replace" else mode
            progress = Progress(f"{verb} {name}", size, self.show_progress and size >= self.frame_bytes)
            sha = new_sha256()
            buffer = self._buffer()
            view = memoryview(buffer)
            while True:
                try:
                    n = read_full(f, view) if crc_chunk else f.readinto(buffer)
                except OSError as exc:
                    conn.send(protocol.UploadAbort())
                    raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
                if not n:
                    break
                sha.update(view[:n])
                self._send_data(conn, view[:n], bool(crc_chunk))
                progress.advance(n)
                if self._reply_waiting():
                    # Only an error can come before the end: stop sending now.
                    conn.expect(protocol.Uploaded)
            conn.send(protocol.UploadEnd(sha256=sha.hexdigest()))
            reply = conn.expect(protocol.Uploaded)
            progress.finish()
            return reply
        finally:
            if f is not sys.stdin.buffer:
                f.close()

    def _send_data(self, conn, data: memoryview, crcs: bool, flush: bool = True) -> None:
        """One DATA of an upload; with ``crcs``, after the DATA_CRCS of its chunks."""
        if crcs:  # with digests of the DATA and of its CRCs: see protocol.verify_batch_digests
            conn.send(protocol.data_crcs(data, self.crc_chunk_size), flush=False)
        conn.send(protocol.Data(body=data), flush=flush)

    def _reply_waiting(self) -> bool:
        sock = self.conn.sock
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    # --- download --------------------------------------------------------------------
    def download(self, name: str, destination: str, offset: int = 0, length: int = -1,
                 force: bool = False, version: int | None = None, at: float | None = None,
                 restore: "Restore | None" = None) -> protocol.FileInfo:
        # A file is written to a temporary name first, so it can be fetched again; stdout cannot.
        return self._retrying(destination != "-",
                              lambda: self._download(name, destination, offset, length, force, version, at, restore))

    def _download(self, name: str, destination: str, offset: int, length: int, force: bool,
                  version: int | None, at: float | None, restore: "Restore | None") -> protocol.FileInfo:
        """Write ``name`` (or a byte range of it) to ``destination`` ("-" = stdout).

        A whole-file download is checked against the SHA-256 recorded at
        upload; on any failure the destination is left untouched.  An
        existing destination is replaced only with ``force``, and only if it
        is a regular file (``check_destination``).  ``version`` (an id) or
        ``at`` (unix time) pick an older version (history.py).  A whole file
        gets back the metadata recorded at upload as ``restore`` says
        (default: mode and mtime; a symlink is re-created as a link).
        """
        protocol.validate_name(name)
        if offset < 0:
            raise protocol.InvalidRange(f"offset {offset} is negative")
        if length < -1:  # -1 alone means "to the end"
            raise protocol.InvalidRange(f"length {length} is negative")
        check_destination(destination, force)
        request = protocol.Download(name=name, offset=offset, length=length, version=version, at=at,
                                    direct=self.direct_reads or None)
        if destination == "-":
            self.conn.send(request)
            self._prepare_receive()
            info = self._receive(name, sys.stdout.buffer)
            # Flushed here, not at interpreter exit: a write error (a full disk
            # behind a redirection) is then this command's EXIT_LOCAL_IO, not
            # a message Python prints while exiting with status 120.
            try:
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                raise  # the reader went away (`| head`): main() ends quietly
            except OSError as exc:
                _drop_stdout()
                raise LocalFileError(f"cannot write: {exc.strerror}") from None
            return info
        fd, temp_path = open_temp_beside(destination)  # before asking: a local failure costs no transfer
        try:
            self.conn.send(request)
            self._prepare_receive()
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp_path)
            raise
        return self._receive_into(name, fd, temp_path, destination, force,
                                  restore=(restore or Restore()) if offset == 0 and length == -1 else None)

    def _prepare_receive(self) -> None:
        """Import what receiving a download needs while the master works on the request just sent.

        Done after sending it, before waiting for the reply: the master
        plans the read (and the nodes can be reached) while this process
        loads direct_read, transfers and hashlib (~10 ms of a command's
        start-up), instead of one after the other.
        """
        if self.direct_reads:
            import direct_read  # noqa: F401, PLC0415 - see the imports at the top
        new_sha256()  # loads hashlib (OpenSSL)

    def _receive_into(self, name: str, fd: int, temp_path: str, destination: str, force: bool,
                      keep_going: bool = False, restore: "Restore | None" = None) -> protocol.FileInfo:
        """Read one download reply into the temporary file ``fd`` and rename it to ``destination``.

        The rename happens only if every byte arrived and verified; before
        it, ``check_destination`` looks at the target once more.  On any
        failure the temporary file is removed and the target left as it was.

        Replacing an existing file fsyncs the new bytes before the rename and
        the directory after it: otherwise a power loss can leave the target
        empty or truncated after the good local copy it replaced is gone.  A
        new file is not fsynced (a crash loses only the restore itself, which
        is run again), so tree restores of many files stay fast.  With
        ``restore``, the file gets back its recorded metadata first (a
        symlink's bytes become a link, ``place_restored``).
        """
        try:
            out = os.fdopen(fd, "wb")
            try:
                info = self._receive(name, out, keep_going)
            except BaseException:
                _close_quietly(out)
                raise
            self._place_written(out, temp_path, destination, force, info, restore)
        except BaseException:
            _unlink_quietly(temp_path)
            raise
        return info

    @staticmethod
    def _place_written(out, temp_path: str, destination: str, force: bool, info: protocol.FileInfo,
                       restore: "Restore | None") -> None:
        """Close the verified temporary file ``out`` and rename it to ``destination`` (see _receive_into).

        The caller removes the temporary file if this raises.
        """
        try:
            with out:
                replacing = os.path.lexists(destination)
                if replacing:
                    out.flush()
                    os.fsync(out.fileno())
        except OSError as exc:  # the final flush or close of the file
            raise LocalFileError(f"cannot write {destination}: {exc.strerror}") from None
        place_restored(temp_path, destination, force, info.meta if restore else None, restore)
        if replacing:
            from metadata_log import fsync_dir  # only here: keeps the CLI's start-up lean
            try:
                fsync_dir(os.path.dirname(os.path.abspath(destination)))
            except OSError as exc:
                raise LocalFileError(f"cannot write {destination}: {exc.strerror}") from None

    def _receive(self, name: str, out, keep_going: bool = False) -> protocol.FileInfo:
        """Read one download reply (FILE_INFO, DATA..., DATA_END) into ``out``.

        The socket is read in this thread while a second one hashes and
        writes the previous frame (hashlib and file writes release the GIL),
        so receiving never waits for the disk.  Small files skip the thread.
        ``keep_going``: a local write error is raised only once the whole
        reply has been read (see _FrameSink), so the connection stays usable.
        """
        conn = self.conn
        if self.direct_reads:
            reply = conn.recv()
            if isinstance(reply, protocol.ReadPlan):
                return self._receive_direct(name, reply, out, keep_going)
            info = protocol.expect(reply, protocol.FileInfo)
        else:
            info = conn.expect(protocol.FileInfo)
        whole_file = info.offset == 0 and info.length == info.size
        sha = new_sha256() if whole_file else None
        sink = self._sink(name, info, out, sha, keep_going)
        try:
            received = self._receive_frames(info.length, sink)
        finally:
            sink.close()
        if received != info.length:
            raise protocol.RemoteProtocolError(f"master sent {received} bytes, announced {info.length}")
        self._check_whole(name, info, sha, sink.progress)
        return info

    def _sink(self, name: str, info: protocol.FileInfo, out, sha, keep_going: bool,
              buffer_bytes: int = 0) -> "_FrameSink":
        """Where a download's bytes go; its buffers hold ``buffer_bytes`` (default: one frame)."""
        progress = Progress(f"download {name}", info.length,
                            self.show_progress and out is not sys.stdout.buffer and info.length >= self.frame_bytes)
        first_buffer = bytearray(buffer_bytes) if buffer_bytes > self.frame_bytes else self._buffer()
        return _FrameSink(out, sha, progress, threaded=info.length > self.frame_bytes, first_buffer=first_buffer,
                          keep_going=keep_going)

    def _receive_frames(self, length: int, sink: "_FrameSink") -> int:
        """Read DATA frames up to DATA_END into ``sink``; the number of bytes (at most ``length``)."""
        conn = self.conn
        received = 0
        while True:
            buffer = sink.free_buffer()
            msg = conn.recv(buffer)
            if not isinstance(msg, protocol.Data):
                if msg is None:
                    conn.broken = True
                protocol.expect(msg, protocol.DataEnd)
                return received
            received += len(msg.body)
            if received > length:
                raise protocol.RemoteProtocolError("master sent more bytes than announced")
            sink.put(buffer, msg.body)

    @staticmethod
    def _check_whole(name: str, info: protocol.FileInfo, sha, progress: "Progress") -> None:
        if sha is not None and sha.hexdigest() != info.sha256:
            raise protocol.ChecksumMismatch(f"{name!r} failed verification: SHA-256 differs from the one "
                                            f"recorded at upload; nothing was written")
        progress.finish()

    def _receive_direct(self, name: str, plan: protocol.ReadPlan, out, keep_going: bool) -> protocol.FileInfo:
        """Read a direct read's bytes from the nodes into ``out`` (direct_read.py), then end the read.

        Bytes go through the same sink as a relayed download's (SHA-256 of
        a whole file, writer thread): each piece is received straight into
        one of the sink's buffers, so the socket reads and CRC checks of the
        next piece overlap the hashing and writing of this one, no copy made.  If no replica of some piece is
        reachable from here, the master relays the rest of the range from
        the pinned version.  READ_END (listing the copies that could not be
        used) is sent whatever happened, unless the master connection broke.
        """
        import direct_read  # noqa: PLC0415 - only downloads need it
        info = direct_read.file_info(plan)
        whole_file = info.offset == 0 and info.length == info.size
        sha = new_sha256() if whole_file else None
        sink = self._sink(name, info, out, sha, keep_going,
                          buffer_bytes=plan.batch_chunks * (plan.chunk_size + protocol.CRC_BYTES))
        reader = direct_read.DirectReader(self.replicas)
        received = 0
        ending = False  # READ_END sent, READ_ENDED not read yet
        try:
            try:
                for view in direct_read.read_plan_pages(self.conn, plan, reader, (sink.free_buffer, sink.give_back)):
                    sink.put(view.obj, view)
                    received += len(view)
            except protocol.Unavailable as exc:
                direct_read.logger.warning("%r: %s; the master relays the rest", name, exc)
                self.conn.send(protocol.Download(name=name, offset=info.offset + received,
                                                 length=info.length - received, read_id=plan.read_id))
                self.conn.expect(protocol.FileInfo)
                received += self._receive_frames(info.length - received, sink)
            if self._expected is None:
                # Every byte is read: the master's answer comes while the last
                # pieces are hashed and written (sink.close), not after them.
                self.conn.send(protocol.ReadEnd(read_ids=[plan.read_id], bad=reader.take_bad()))
                ending = True
        finally:
            try:
                sink.close()
            finally:
                if ending:
                    self.conn.expect(protocol.ReadEnded)
                elif self.in_step:
                    self._end_read(protocol.ReadEnd(read_ids=[plan.read_id], bad=reader.take_bad()))
        if received != info.length:
            raise protocol.RemoteProtocolError(f"read {received} bytes of {name!r}, announced {info.length}")
        self._check_whole(name, info, sha, sink.progress)
        return info

    def _end_read(self, msg: protocol.ReadEnd) -> None:
        """Send READ_END: as a request of its own, or queued behind a tree restore's pipelined requests."""
        if self._expected is None:
            self.conn.request(msg, protocol.ReadEnded)
        else:
            self.conn.send(msg, flush=False)
            self._expected.append(protocol.ReadEnded)

    def _next_reply(self) -> None:
        """In a tree restore, read the READ_ENDED replies queued before the next reply to a request."""
        self.conn.flush()  # READ_END requests are queued unflushed (_end_read)
        while self._expected and self._expected[0] is protocol.ReadEnded:
            self._expected.popleft()
            self.conn.expect(protocol.ReadEnded)
        if self._expected:
            self._expected.popleft()

    @property
    def replicas(self):
        """This session's connections to the nodes (direct reads), opened as needed."""
        if self._replicas is None:
            import direct_read  # noqa: PLC0415 - only downloads need it
            self._replicas = direct_read.ReplicaPool(self.handshake_timeout_s or self.timeout_s, self.security)
        return self._replicas

    def _buffer(self) -> bytearray:
        if self._frame_buffer is None:
            self._frame_buffer = bytearray(self.frame_bytes)
        return self._frame_buffer

    def download_tree(self, prefix: str, directory: str, force: bool = False, report=None,
                      restore: Restore | None = None, entries: list[dict] | None = None,
                      snapshot: int | None = None) -> TreeSummary:
        """Restore every file whose name starts with ``prefix`` under ``directory``.

        Names map to paths below ``directory`` with the prefix removed.  Every
        file that can be restored is; each one that cannot is named with the
        reason (``report`` and the summary's failures) and the rest go on:
        a name that is no relative path (``..``, ``//``, trailing ``/``,
        stored before the master refused such names), a component longer
        than the file system allows, a name that is both a file and a
        directory (``a`` and ``a/b``: the file wins), a target that exists
        (without ``force``) or is no regular file, a symlink or file on the
        way, a write error, a file lost or deleted on the cluster.  Only a
        broken connection stops the restore.  Requests are pipelined
        DOWNLOAD_WINDOW deep.  Symlinks and empty directories are re-created
        and metadata reapplied as ``restore`` says (default: mode and mtime).
        ``entries`` (dicts with name, meta and version) restores those
        versions instead of the current files under ``prefix``; with
        ``snapshot``, wherever they are kept (a snapshot's members).
        """
        restore = restore or Restore()
        summary = TreeSummary()
        root = os.path.abspath(directory)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise LocalFileError(f"cannot create {directory}: {exc.strerror}") from None
        longest = name_max(root)
        todo = []
        directories = []  # (path, meta) of the empty directories recorded
        files: set[str] = set()  # relative paths restored as files so far
        for entry in sorted(self.list(prefix) if entries is None else entries, key=lambda e: e["name"]):
            name = entry["name"]
            is_directory = filemeta.kind_of(entry.get("meta")) == filemeta.DIRECTORY
            try:
                path = self._tree_path(root, name, prefix, files, longest)
                if not (is_directory and os.path.isdir(path) and not os.path.islink(path)):
                    check_destination(path, force)
            except LocalFileError as exc:
                summary.fail(name, str(exc), report)
                continue
            if is_directory:
                directories.append((name, path, entry.get("meta")))
                continue
            files.add(path)
            todo.append((name, path, entry.get("version"), entry.get("size") or 0))
        if self.direct_reads and todo:
            try:
                later = self._download_files_direct(root, todo, force, restore, summary, report, snapshot)
            except _NoReadPlans:
                # A master from before READ_PLANS: it relays the restore (pipelined DOWNLOADs).
                self._download_files(root, todo, force, restore, summary, report, snapshot)
                later = []
            # Files the batched direct reads could not finish (no replica reachable from here, or
            # more runs than a READ_PLANS_PAGE plan holds) are then downloaded one by one: each
            # may page through READ_MORE or have the master relay it.
            for item in later:
                self._download_files(root, [item], force, restore, summary, report, snapshot)
        else:
            self._download_files(root, todo, force, restore, summary, report, snapshot)
        self._restore_directories(root, directories, summary, restore, report)
        return summary

    def _download_files(self, root: str, todo: list, force: bool, restore: Restore, summary: TreeSummary,
                        report, snapshot: int | None = None) -> None:
        """Download ``todo`` ((name, path, version, size) each), DOWNLOAD_WINDOW requests in flight.

        Relayed by the master, or, for a single file, read directly (a
        direct read's READ_MORE and relayed fallback need the connection to
        itself, so direct reads are pipelined by ``_download_files_direct``).
        """
        sent = 0
        conn = self.conn
        for position, (name, path, *_) in enumerate(todo):
            while sent < len(todo) and sent < position + DOWNLOAD_WINDOW:
                direct = (self.direct_reads and len(todo) == 1) or None
                conn.send(protocol.Download(name=todo[sent][0], version=todo[sent][2], snapshot=snapshot,
                                            direct=direct), flush=False)
                sent += 1
            conn.flush()
            try:
                make_parents(root, path)
                fd, temp_path = open_temp_beside(path)
            except LocalFileError as exc:
                summary.fail(name, str(exc), report)
                self._skip_reply(name)  # already requested: read it so the next reply lines up
                continue
            try:
                info = self._receive_into(name, fd, temp_path, path, force, keep_going=True, restore=restore)
            except LocalFileError as exc:
                summary.fail(name, str(exc), report)
                continue
            except (protocol.FileNotFound, protocol.DataLost, protocol.Unavailable, protocol.ChecksumMismatch) as exc:
                summary.fail(name, f"{exc.code}: {exc.message}", report)
                if not self.in_step:
                    raise
                continue
            summary.ok(info.length)

    def _download_files_direct(self, root: str, todo: list, force: bool, restore: Restore,
                               summary: TreeSummary, report, snapshot: int | None = None) -> list:
        """Restore ``todo`` ((name, path, version, size) each) by direct reads, batched and pipelined across files.

        One ``READ_PLANS`` pins and plans PLAN_FILES files (the next batch is
        requested while this one is read); READ_AHEAD pieces, of whichever
        files, are in flight to the nodes (``transfers.read_ranges``), so a
        small file costs no round trip of its own; a second thread creates,
        writes, checks (length, SHA-256) and renames the files as
        ``_receive_into`` does (``_TreeWriter``).  One READ_END per batch
        is queued behind the requests already sent.  Returns the entries to
        download one by one instead: no replica reachable from here, or more
        runs than one plan holds.  Raises _NoReadPlans, before anything is
        read, if the master does not know READ_PLANS.
        """
        import direct_read  # noqa: PLC0415 - only downloads need it
        import transfers  # noqa: PLC0415
        conn = self.conn
        reader = direct_read.DirectReader(self.replicas)
        plans: dict[int, protocol.ReadPlan] = {}
        later = []
        ended: list[str] = []  # reads done, to end with one READ_END per PLAN_FILES files
        self._expected = deque()

        def end_reads():
            if ended:
                self._end_read(protocol.ReadEnd(read_ids=list(ended), bad=reader.take_bad()))
                ended.clear()

        batches = deque(self._plan_batches(todo))
        requested: deque = deque()  # the positions of each READ_PLANS sent and not yet answered

        def request_plans():
            positions = batches.popleft()
            conn.send(protocol.ReadPlans(files=[[todo[p][0], todo[p][2]] for p in positions], snapshot=snapshot),
                      flush=False)
            self._expected.append(protocol.ReadPlansPage)
            requested.append(positions)

        def reads():
            request_plans()
            first = True
            while requested:
                positions = requested.popleft()
                self._next_reply()
                index = 0
                while True:
                    reply = conn.recv()
                    if reply is None:
                        conn.broken = True
                    try:
                        page = protocol.expect(reply, protocol.ReadPlansPage)
                    except protocol.UnknownOperation:
                        if first:
                            raise _NoReadPlans() from None
                        raise
                    if first or (batches and not requested):
                        first = False
                        if batches:
                            request_plans()  # the master plans the next batch while this one is read
                    if len(page.plans) > len(positions) - index:
                        raise protocol.RemoteProtocolError("READ_PLANS answered more files than asked")
                    for fields in page.plans:
                        position = positions[index]
                        index += 1
                        name = todo[position][0]
                        plan = protocol.plan_from_page(fields, page)
                        if isinstance(plan, protocol.BackupError):
                            yield position, name, plan
                            continue
                        direct_read.check_plan(plan)
                        if plan.name != name:
                            raise protocol.RemoteProtocolError(f"READ_PLANS answered {plan.name!r} for {name!r}")
                        if plan.more is not None:
                            later.append(todo[position])
                            ended.append(plan.read_id)
                            continue
                        plans[position] = plan
                        reader.pool.learn(plan)
                        yield position, name, direct_read.plan_entry(plan), plan.offset, plan.length
                    if page.done:
                        break
                if index != len(positions):
                    raise protocol.RemoteProtocolError(f"READ_PLANS answered {index} of {len(positions)} files")

        writer = _TreeWriter(self, root, force, restore, summary, report)
        held = None  # (position, bytes): the last piece received, given to the writer with the next item
        try:
            for position, item in transfers.read_ranges(reader, reads()):
                name, path, *_ = todo[position]
                data = None
                if held is not None and held[0] == position:
                    data = held[1]
                held = None
                if item is not None and not isinstance(item, BaseException):
                    if data is not None:
                        writer.put(position, path, name, data)
                    held = (position, bytes(item))  # the view's buffer is read into again
                    continue
                plan = plans.pop(position, None)
                if plan is not None:
                    ended.append(plan.read_id)
                    if len(ended) >= PLAN_FILES:
                        end_reads()
                if isinstance(item, protocol.Unavailable) and plan is not None:
                    later.append(todo[position])
                    writer.put(position, path, name, data, False)
                elif isinstance(item, BaseException):
                    writer.put(position, path, name, data, f"{item.code}: {item.message}")
                else:
                    writer.put(position, path, name, data, plan)
            end_reads()
            self._next_reply()  # the last READ_ENDED replies
        finally:
            self._expected = None
            writer.close()
        return later

    @staticmethod
    def _plan_batches(todo: list):
        """Positions in ``todo`` cut into READ_PLANS requests: at most PLAN_FILES files and PLAN_BYTES of
        data (the sizes the listing gave), their names within a page."""
        for page, _ in protocol.pages(range(len(todo)), size=lambda p: protocol.json_size(todo[p][0]) + 24):
            batch, nbytes = [], 0
            for position in page:
                size = todo[position][3]
                if batch and (len(batch) == PLAN_FILES or nbytes + size > PLAN_BYTES):
                    yield batch
                    batch, nbytes = [], 0
                batch.append(position)
                nbytes += size
            yield batch

    @staticmethod
    def _restore_directories(root: str, directories: list, summary: TreeSummary, restore: Restore, report) -> None:
        """Create the recorded empty directories; their metadata last, deepest first.

        Last, because creating anything inside a directory changes its
        mtime, and a read-only mode would forbid it.
        """
        made = []
        for name, path, meta in directories:
            try:
                make_parents(root, path)
                if not os.path.isdir(path):
                    os.mkdir(path)
            except LocalFileError as exc:
                summary.fail(name, str(exc), report)
                continue
            except OSError as exc:
                summary.fail(name, f"cannot create {path}: {exc.strerror}", report)
                continue
            made.append((name, path, meta))
            summary.ok(0)
        if not restore.metadata:
            return
        for name, path, meta in sorted(made, key=lambda d: d[1], reverse=True):
            try:
                filemeta.apply(path, meta, restore.owners)
            except OSError as exc:
                summary.fail(name, f"cannot set the metadata of {path}: {exc.strerror}", report)

    @staticmethod
    def _tree_path(root: str, name: str, prefix: str, files: set, longest: int) -> str:
        """Where ``name`` goes below ``root`` in a restore of ``prefix``; LocalFileError if nowhere."""
        relative = name[len(prefix):]
        problem = protocol.path_problem(relative)
        if problem:
            raise LocalFileError(f"not restored: the part after {prefix!r}, {relative!r}, {problem}, so it has no "
                                 f"place below {root} (download it alone to a path of your choice)")
        parts = relative.split("/")
        for part in parts:
            if len(os.fsencode(part)) > longest:
                raise LocalFileError(f"not restored: a path component is {len(os.fsencode(part))} bytes, more than "
                                     f"this file system allows ({longest}) (download it alone under a shorter name)")
        path = os.path.join(root, *parts)
        for end in range(1, len(parts)):
            above = os.path.join(root, *parts[:end])
            if above in files:
                raise LocalFileError(f"not restored: {prefix}{'/'.join(parts[:end])} is a file too, so it cannot "
                                     f"also be a directory (download it alone to a path of your choice)")
        return path

    def _skip_reply(self, name: str) -> None:
        """Read one download reply and drop it; raise only if the connection broke."""
        try:
            self._receive(name, _Discard())
        except protocol.BackupError:
            if not self.in_step:
                raise

    # --- verify --------------------------------------------------------------------
    def verify(self, names: list[str], version: int | None = None, report=None, versions: dict | None = None,
               snapshot: int | None = None) -> "VerifySummary":
        """Read every byte of each of ``names`` and check it; nothing is written locally.

        The plain download path, into a sink that keeps nothing: the master
        checks each chunk's CRC and falls back to the other replica, and a
        chunk with no good copy fails the file with DATA_LOST; ``_receive``
        checks the file's SHA-256 against the one recorded at upload.  A file
        that fails is recorded with its error code and the others go on;
        one deleted since it was listed counts as gone, not damaged.  Only a
        broken connection stops.  Requests are pipelined DOWNLOAD_WINDOW deep.
        ``version`` picks one version (one name only); ``versions`` (name ->
        version id) with ``snapshot`` the versions a snapshot recorded.
        """
        summary = VerifySummary()
        sent = 0
        conn = self.conn
        for position, name in enumerate(names):
            while sent < len(names) and sent < position + DOWNLOAD_WINDOW:
                which = version if versions is None else versions[names[sent]]
                conn.send(protocol.Download(name=names[sent], version=which, snapshot=snapshot), flush=False)
                sent += 1
            conn.flush()
            try:
                info = self._receive(name, _Discard())
            except protocol.FileNotFound:
                if not self.in_step:
                    raise
                summary.gone.append(name)
                continue
            except (protocol.DataLost, protocol.Unavailable, protocol.ChecksumMismatch, protocol.Timeout,
                    protocol.RemoteProtocolError) as exc:
                if not self.in_step:
                    raise
                summary.damaged.append((name, exc.code, exc.message))
                if report:
                    report(f"damaged {name}: {exc.code}: {exc.message}")
                continue
            summary.files += 1
            summary.bytes += info.length
        return summary

    # --- directories -----------------------------------------------------------------
    def upload_tree(self, root: str, prefix: str, report=None, plan: list | None = None) -> TreeSummary:
        """Back up every regular file below ``root`` (see _upload_tree); after a leader change
        the files not yet acknowledged are sent to the new leader."""
        def attempt() -> TreeSummary:
            try:
                return self._upload_tree(root, prefix, report, plan)
            except _NoUploadFiles:
                self.close()  # replies still in flight: the connection is out of step
                return self._upload_tree(root, prefix, report, plan)  # resumed, one file per upload

        try:
            return self._retrying(True, attempt)
        finally:
            self._tree_progress.pop((root, prefix), None)

    def _upload_tree(self, root: str, prefix: str, report=None, plan: list | None = None) -> TreeSummary:
        """Back up every regular file below ``root`` as ``prefix/relative/path``.

        One connection, uploads pipelined: a sender streams file after file
        while a receiver thread collects the replies, and the master commits
        them in groups (``group=True``), so thousands of small files cost a
        few fsyncs, not thousands.  Each file goes with its metadata
        (filemeta.py); a symlink is stored as its target, never followed,
        and an empty directory as an empty entry.  Special files are skipped
        with a note.  A ``prefix`` that is no valid name (after dropping a
        trailing ``/``) raises InvalidName before anything is sent.
        ``plan``: (path, name, filemeta kind) to send instead of the whole
        tree (an incremental run, backup_tree).  The summary's ``versions``
        maps each stored name to its new version id.
        """
        key = (root, prefix)
        prefix = protocol.validate_name(prefix.rstrip("/"), storing=True)
        resumed = key in self._tree_progress
        summary = self._tree_progress.setdefault(key, TreeSummary())
        acknowledged = summary.versions
        files = [] if plan is None else [item for item in plan if item[1] not in acknowledged]
        for path, relative, kind in walk_tree(root) if plan is None else ():
            if kind not in _STORED_KINDS:
                if not resumed:
                    if report:
                        report(f"skipped {kind} {path}")
                    summary.skipped += 1
                continue
            if prefix + "/" + relative not in acknowledged:
                files.append((path, prefix + "/" + relative, _STORED_KINDS[kind]))
        if resumed:
            summary.failures.clear()  # those files are tried again
        conn = self.conn
        in_flight: deque = deque()
        failed_tags: set[int] = set()
        receiver_error: list[BaseException] = []

        def receive() -> None:
            try:
                while True:
                    msg = conn.recv()
                    if isinstance(msg, protocol.Synced):
                        if in_flight:  # never acknowledge a file by a reply meant for another
                            raise protocol.RemoteProtocolError(f"SYNCED before the replies of {len(in_flight)} "
                                                               f"upload(s)")
                        return
                    tag, name, size = in_flight.popleft()
                    if isinstance(msg, protocol.Uploaded) and msg.tag != tag:
                        raise protocol.RemoteProtocolError(f"UPLOADED for upload {msg.tag}, expected {tag}")
                    if isinstance(msg, protocol.Error) and msg.code == protocol.UnknownOperation.code:
                        # Only UPLOAD_FILES can be unknown here: one ERROR for its whole frame.
                        self.upload_files = False
                        raise _NoUploadFiles()
                    if isinstance(msg, protocol.Uploaded):
                        summary.ok(size)
                        acknowledged[name] = msg.version_id
                        self.link.progress()
                    elif isinstance(msg, protocol.Error) and msg.code == protocol.NotLeader.code:
                        # Nothing of this file was done: it goes again to the new leader.
                        raise protocol.error_from_code(msg.code, msg.message, msg.leader or "")
                    elif isinstance(msg, protocol.Error):
                        failed_tags.add(tag)
                        summary.fail(name, f"{msg.code}: {msg.message}", report)
                    else:
                        raise protocol.RemoteProtocolError(f"unexpected {getattr(msg, 'OP', 'end of stream')}")
            except BaseException as exc:  # reported by the sender thread
                receiver_error.append(exc)

        receiver = threading.Thread(target=receive, name="upload-replies", daemon=True)
        receiver.start()
        buffer = self._buffer()
        view = memoryview(buffer)
        batch = SmallBatch(self.crc_chunk_size, self.frame_bytes) if self.crc_chunk_size and self.upload_files \
            else None
        try:
            for tag, (path, name, kind) in enumerate(files):
                if receiver_error:
                    break
                try:
                    protocol.validate_name(name, storing=True)
                    f, size, meta = open_source(path, kind)
                except (OSError, protocol.InvalidName) as exc:
                    summary.fail(name, str(exc), report)
                    continue
                with f:
                    if batch is not None and size <= SMALL_FILE_BYTES:
                        try:
                            small = batch.read(f, name, meta, tag)
                        except OSError as exc:  # as a read error of a file sent in DATA frames
                            raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
                        if small:
                            if batch.full():
                                batch.send(conn, in_flight)
                            continue
                    if batch is not None:
                        batch.send(conn, in_flight)  # replies come in file order
                    in_flight.append((tag, name, size))
                    conn.send(protocol.UploadBegin(name=name, size=size, tag=tag, group=True, meta=meta,
                                                   chunk_size=self.crc_chunk_size), flush=False)
                    sha = new_sha256()
                    while True:
                        if tag in failed_tags:
                            conn.send(protocol.UploadAbort(), flush=False)
                            break
                        try:
                            n = read_full(f, view)
                        except OSError as exc:
                            conn.send(protocol.UploadAbort(), flush=False)
                            raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
                        if not n:
                            conn.send(protocol.UploadEnd(sha256=sha.hexdigest()), flush=False)
                            break
                        sha.update(view[:n])
                        self._send_data(conn, view[:n], bool(self.crc_chunk_size), flush=False)
            if batch is not None and not receiver_error:
                batch.send(conn, in_flight)
            conn.send(protocol.Sync())
        except BaseException:
            # No SYNC will settle the replies in flight: break the connection
            # so the reply thread ends now, not at the socket timeout.
            conn.abandon()
            raise
        finally:
            receiver.join(self.timeout_s)
        if receiver_error:
            raise receiver_error[0]
        if receiver.is_alive():
            raise protocol.Timeout("the master did not confirm the uploads in time")
        return summary

    def backup_tree(self, root: str, prefix: str, excludes: list[str] = (), check_content: bool = False,
                    dry_run: bool = False, report=None) -> BackupSummary:
        """An incremental backup of ``root`` as ``prefix/...``, recorded as a snapshot (snapshots.py).

        Each local file is compared with the member of the same name in the
        last snapshot of ``prefix``: kind, size, permission bits and mtime
        (and with ``check_content`` its SHA-256) equal = unchanged, entered
        in the new snapshot by reference to the version that snapshot
        recorded; otherwise it is sent (new or changed).  Paths matching
        ``excludes`` (snapshots.excluded) and special files are skipped.
        ``dry_run`` classifies and sends nothing.  Names under ``prefix/``
        whose local file is gone are not in the new snapshot and stay in the
        namespace as they are (nothing is deleted).  A file that fails to
        upload is not in the snapshot (named in ``failures``).
        """
        import snapshots  # noqa: PLC0415 - see the imports at the top
        prefix = protocol.validate_name(prefix.rstrip("/"), storing=True)
        result = BackupSummary()
        previous = self.snapshots(prefix)
        members = {}
        if previous:
            try:
                members = {m["name"]: m for m in self.snapshot_members(previous[-1]["id"])}
            except (protocol.DataLost, protocol.ChecksumMismatch) as exc:
                # A damaged manifest must not stop the next backup: it sends every file instead.
                if not self.in_step:
                    raise
                if report:
                    report(f"cannot read snapshot {previous[-1]['id']} ({exc.code}: {exc.message}): "
                           f"sending every file")
        plan, references = [], []
        excludes = list(excludes)
        for path, relative, kind, st in walk_tree_stat(root):
            if excludes and snapshots.excluded(relative, excludes):
                result.skipped += 1
                continue
            if kind not in _STORED_KINDS:
                if report:
                    report(f"skipped {kind} {path}")
                result.skipped += 1
                continue
            kind = _STORED_KINDS[kind]
            name = f"{prefix}/{relative}"
            member = members.get(name)
            try:
                st = st or os.lstat(path)
                size = 0 if kind == filemeta.DIRECTORY else st.st_size
                same = snapshots.unchanged(member, kind, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
                if same and check_content:
                    same = _local_sha256(path, kind) == member["sha256"]
            except OSError as exc:
                result.failures.append((name, f"cannot read {path}: {exc.strerror}"))
                if report:
                    report(f"failed {name}: cannot read {path}: {exc.strerror}")
                continue
            if same:
                result.unchanged += 1
                references.append((relative, member["version"]))
                continue
            if member is None:
                result.new += 1
            else:
                result.changed += 1
            result.bytes_to_send += size
            plan.append((path, name, kind))
        if dry_run:
            return result
        if plan:
            result.sent = self.upload_tree(root, prefix, report, plan=plan)
            result.failures += result.sent.failures
            references += [(name[len(prefix) + 1:], vid) for name, vid in result.sent.versions.items()]
        result.snapshot = self.record_snapshot(prefix, references)
        return result

    # --- snapshots -------------------------------------------------------------------
    def snapshots(self, root: str | None = None) -> list[dict]:
        """Snapshots (of tree ``root`` only, if given), oldest first (snapshots.info)."""
        return self._retrying(True, lambda: self._pages(protocol.Snapshots(root=root), protocol.SnapshotsPage))

    def snapshot_members(self, snapshot_id: int) -> list[dict]:
        """The members of a snapshot, by name: {"name", "version", "size", "sha256", "meta"}."""
        return self._retrying(True, lambda: self._pages(protocol.SnapshotMembers(id=snapshot_id),
                                                        protocol.SnapshotMembersPage))

    def record_snapshot(self, root: str, members: list[tuple[str, int]]) -> protocol.SnapshotMade:
        """Record a snapshot of ``root`` with ``members`` ((relative name, version id)), sent in pages."""
        def send() -> protocol.SnapshotMade:
            conn = self.conn
            # Paged by a bound of each pair's JSON bytes (a name's are at most twice its UTF-8 bytes):
            # encoding every pair to measure it would double the cost.
            for page, last in protocol.pages([list(m) for m in members],
                                             size=lambda m: 2 * len(m[0].encode("utf-8")) + 26):
                conn.send(protocol.SnapshotAdd(root=root, members=page, done=last), flush=last)
            return conn.expect(protocol.SnapshotMade)
        return self._retrying(False, send)

    def forget_snapshots(self, ids: list[int]) -> protocol.SnapshotsForgotten:
        """Drop snapshots (``prune`` uses this): what only they kept is freed."""
        request = protocol.SnapshotForget(ids=list(ids))
        return self._retrying(False, lambda: self.conn.request(request, protocol.SnapshotsForgotten))

    # --- the rest --------------------------------------------------------------------
    def delete(self, name: str, wait_s: float = -1.0, purge: bool = False) -> None:
        """Move ``name`` and its versions to the trash, or with ``purge`` remove it and its trash at once."""
        request = protocol.Delete(name=protocol.validate_name(name), wait_s=wait_s, purge=purge or None)
        self._retrying(False, lambda: self.conn.request(request, protocol.Deleted))

    def undelete(self, name: str, wait_s: float = -1.0) -> protocol.Undeleted:
        request = protocol.Undelete(name=protocol.validate_name(name), wait_s=wait_s)
        return self._retrying(False, lambda: self.conn.request(request, protocol.Undeleted))

    def trash(self, prefix: str = "") -> list[dict]:
        """Trashed versions whose names start with ``prefix``, by name, oldest delete first."""
        return self._retrying(True, lambda: self._pages(protocol.Trash(prefix=prefix), protocol.TrashPage))

    def touch(self, name: str, wait_s: float = -1.0) -> protocol.Touched:
        request = protocol.Touch(name=protocol.validate_name(name, storing=True), wait_s=wait_s)
        return self._retrying(False, lambda: self.conn.request(request, protocol.Touched))

    def stat(self, name: str, version: int | None = None, at: float | None = None,
             all_runs: bool = True) -> protocol.StatReply:
        return self._retrying(True, lambda: self._stat(name, version, at, all_runs))

    def _stat(self, name: str, version: int | None, at: float | None, all_runs: bool) -> protocol.StatReply:
        """STAT of ``name`` (or of one of its kept versions); with ``all_runs``, every page of runs joined.

        Without ``all_runs`` only the first page of runs is asked for (the
        summary fields are complete either way).  If the file is replaced
        while its pages are read, the listing starts over on the new version.
        """
        protocol.validate_name(name)
        for _ in range(_STAT_ATTEMPTS):
            first = self.conn.request(protocol.Stat(name=name, version=version, at=at), protocol.StatReply)
            runs, reply = list(first.runs), first
            while all_runs and reply.next_chunk >= 0:
                reply = self.conn.request(protocol.Stat(name=name, version=version, at=at,
                                                        from_chunk=reply.next_chunk), protocol.StatReply)
                if reply.version != first.version:
                    break
                runs += reply.runs
            else:
                return dataclasses.replace(first, runs=runs, next_chunk=reply.next_chunk)
        raise protocol.Unavailable(f"{name!r} was replaced {_STAT_ATTEMPTS} times while its runs were read")

    def versions(self, name: str) -> list[dict]:
        """The kept versions of ``name``, oldest first (history.version_info)."""
        request = protocol.Versions(name=protocol.validate_name(name))
        return self._retrying(True, lambda: self._pages(request, protocol.VersionsPage))

    def locks(self) -> list[dict]:
        return self._retrying(True, lambda: self._pages(protocol.Locks(), protocol.LocksReply, "locks"))

    def list(self, prefix: str = "") -> list[dict]:
        return self._retrying(True, lambda: self._pages(protocol.List(prefix=prefix), protocol.ListPage))

    def status(self) -> protocol.StatusReply:
        """STATUS with every page of nodes joined (totals come on the first page)."""
        return self._retrying(True, self._status)

    def masters(self, rows: list[dict]) -> list[dict]:
        """Every master of a group: the leader's STATUS ``rows`` (its view: ``match``, ``last_contact_s``)
        merged with each master's own MASTER_STATUS (role, term, commit, applied, leader).  A master
        that does not answer within MASTER_STATUS_TIMEOUT_S shows as role "unreachable" with ``error``.
        """
        by_address = {row["address"]: dict(row) for row in rows}
        for address in self.link.addresses:
            by_address.setdefault(master_link.format_address(address), {"address": master_link.format_address(address)})
        merged = []
        for text, row in by_address.items():
            try:
                conn = self.link.open_one(master_link.parse_hint(text), MASTER_STATUS_TIMEOUT_S)
                try:
                    own = conn.request(protocol.MasterStatus(), protocol.MasterStatusReply).master
                finally:
                    conn.close()
                row.update({key: own[key] for key in ("role", "term", "commit", "applied", "leader") if key in own})
                if row["role"] == "leader" and own.get("last_contact_s") is not None:
                    row["last_contact_s"] = own["last_contact_s"]
            except protocol.BackupError as exc:
                row.update(role="unreachable", error=str(exc))
            merged.append(row)
        return merged

    def _status(self) -> protocol.StatusReply:
        conn = self.conn
        conn.send(protocol.Status())
        first = conn.expect(protocol.StatusReply)
        nodes, page = list(first.nodes), first
        while not page.done:
            page = conn.expect(protocol.StatusReply)
            nodes += page.nodes
        return dataclasses.replace(first, nodes=nodes)

    def _pages(self, request: protocol.Message, reply_cls, field_name: str = "entries") -> list:
        """Send ``request`` and join the ``field_name`` lists of its reply pages, up to the one marked done."""
        conn = self.conn
        conn.send(request)
        items = []
        while True:
            page = conn.expect(reply_cls)
            items.extend(getattr(page, field_name))
            if page.done:
                return items

    def reclaim_orphans(self, node_id: str) -> protocol.OrphansReclaimed:
        # Through the link like every request (a follower answers NOT_LEADER); repeating it is harmless
        # (the brake's blobs are quarantined once), but its outcome after a cut is the caller's to check.
        return self._retrying(False, lambda: self.conn.request(protocol.ReclaimOrphans(node_id=node_id),
                                                               protocol.OrphansReclaimed))

    def masters_replace(self, old: str, new: str) -> protocol.MastersReplaced:
        """Replace master ``old`` by ``new`` in a replicated group (the leader does it step by step;
        idempotent, so following NOT_LEADER or retrying is safe)."""
        return self._retrying(True, lambda: self.conn.request(protocol.MastersReplace(old=old, new=new),
                                                               protocol.MastersReplaced))

    def health(self) -> dict:
        """{"status": HEALTH_*, "checks": [...]}, as the master computes it (health.py)."""
        # Through the link: with several masters the first one tried may be a follower (NOT_LEADER).
        reply = self._retrying(True, lambda: self.conn.request(protocol.Health(), protocol.HealthReply))
        return {"status": reply.status, "checks": reply.checks}


# --- command line -------------------------------------------------------------------------
def format_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cmd_upload(client: Client, args) -> int:
    if args.local == "-":
        if args.name is None:
            raise UsageError("upload - (standard input) needs the NAME to store it under")
        name = args.name
    elif not os.path.exists(args.local):
        raise LocalFileError(f"{args.local}: no such file or directory")
    else:
        name = args.name if args.name is not None else os.path.basename(os.path.abspath(args.local))
    if args.local != "-" and os.path.isdir(args.local):
        return backup_directory(client, args, name)
    if args.exclude or args.exclude_file or args.dry_run or args.check_content:
        raise UsageError("--exclude, --exclude-file, --dry-run and --check-content apply to a directory upload")
    started = time.monotonic()
    reply = client.upload_file(args.local, name, wait_s=wait_seconds(args))
    elapsed = time.monotonic() - started
    if not args.quiet:
        print(f"uploaded {reply.name}: {plural(reply.size, 'byte')}, {plural(reply.chunks, 'chunk')} "
              f"in {elapsed:.2f} s ({human_bytes(reply.size / max(elapsed, 1e-6))}/s), sha256 {reply.sha256}")
    return EXIT_OK


def backup_directory(client: Client, args, name: str) -> int:
    """upload DIR NAME: an incremental run recorded as a snapshot (Client.backup_tree)."""
    import snapshots  # noqa: PLC0415 - see the imports at the top
    excludes = list(args.exclude or [])
    if args.exclude_file:
        try:
            with open(args.exclude_file, encoding="utf-8") as f:
                excludes += snapshots.read_exclude_file(f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalFileError(f"cannot read --exclude-file {args.exclude_file}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
    result = client.backup_tree(args.local, name, excludes, check_content=args.check_content,
                                dry_run=args.dry_run, report=note)
    if not args.quiet:
        if not args.dry_run:
            sent = result.sent or TreeSummary(started=result.started)
            sent.skipped = result.skipped
            print(sent.line("uploaded"))
        print(result.line(dry_run=args.dry_run))
    return EXIT_PARTIAL if result.failures else EXIT_OK


def cmd_snapshots(client: Client, args) -> int:
    root = args.name.rstrip("/") if args.name else None
    entries = client.snapshots(root)
    if args.json:
        return print_json(views.snapshots_document(root, entries))
    if not args.quiet:
        print(f"{'ID':>10}  {'TIME':<19} {'FILES':>9} {'SIZE':>10}  ROOT")
    for s in entries:
        print(f"{s['id']:>10}  {format_time(s['time'])} {s['files']:>9} {human_bytes(s['bytes']):>10}  {s['root']}")
    return EXIT_OK


def cmd_diff(client: Client, args) -> int:
    """What changed between two snapshots: + added, - removed, M changed (content or kind)."""
    import snapshots  # noqa: PLC0415 - see the imports at the top
    first, second = resolve_snapshot(client, args.first, ""), resolve_snapshot(client, args.second, "")
    changes = snapshots.diff(client.snapshot_members(first), client.snapshot_members(second))
    if args.json:
        return print_json(views.diff_document(first, second, changes))
    marks = {snapshots.ADDED: "+", snapshots.REMOVED: "-", snapshots.CHANGED: "M"}
    for change, name in changes:
        print(f"{marks[change]} {name}")
    if not args.quiet:
        counts = {kind: sum(1 for k, _ in changes if k == kind) for kind in marks}
        print(f"{counts[snapshots.ADDED]} added, {counts[snapshots.REMOVED]} removed, "
              f"{counts[snapshots.CHANGED]} changed")
    return EXIT_OK


def snapshot_arg(text: str):
    """argparse type of a snapshot ID: an integer, or ``latest``."""
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a snapshot id (a number, or latest)") from None


def resolve_snapshot(client: Client, which, prefix: str) -> int:
    """A snapshot id; ``latest`` = the newest snapshot whose tree holds ``prefix`` (any, for "")."""
    if which != "latest":
        return which
    name = prefix.rstrip("/")
    found = [s["id"] for s in client.snapshots()
             if not name or name == s["root"] or name.startswith(s["root"] + "/")]
    if not found:
        raise protocol.FileNotFound(f"no snapshot{' of ' + prefix if prefix else ''} yet")
    return max(found)


def snapshot_entries(client: Client, snapshot_id: int, prefix: str) -> list[dict]:
    """The members of a snapshot whose names start with ``prefix`` (FILE_NOT_FOUND if none)."""
    members = [m for m in client.snapshot_members(snapshot_id) if m["name"].startswith(prefix)]
    if prefix and not members:
        raise protocol.FileNotFound(f"snapshot {snapshot_id} has no file under {prefix}")
    return members


def cmd_download(client: Client, args) -> int:
    if args.snapshot is not None and not args.name.endswith("/"):
        raise UsageError("--snapshot restores a tree: give NAME/ (the snapshot's root or a directory in it)")
    if args.name.endswith("/"):
        if args.local == "-":
            raise UsageError(f"{args.name} is a tree of files: they cannot go to standard output; "
                             f"give a directory to restore them into")
        if args.offset is not None or args.length is not None:
            raise UsageError("--offset and --length apply to one file, not to a tree")
        if args.version is not None or args.at is not None:
            raise UsageError("--version and --at apply to one file, not to a tree")
        base = args.name.rstrip("/").rpartition("/")[2]
        directory = args.local or (base if base not in ("", ".", "..") else ".")  # never above the cwd
        if args.snapshot is not None:
            args.snapshot = resolve_snapshot(client, args.snapshot, args.name)
        entries = None if args.snapshot is None else snapshot_entries(client, args.snapshot, args.name)
        summary = client.download_tree(args.name, directory, force=args.force, report=note,
                                       restore=restore_args(args), entries=entries, snapshot=args.snapshot)
        if not args.quiet:
            print(summary.line("restored"))
        if not summary.files and not summary.failures:
            raise protocol.FileNotFound(f"no file named {args.name}...")
        return EXIT_PARTIAL if summary.failures else EXIT_OK
    offset, length = byte_range(args)
    destination = args.local or local_base_name(args.name)
    if destination != "-" and os.path.isdir(destination):  # into it (a link to a directory is followed)
        destination = os.path.join(destination, local_base_name(args.name))
    started = time.monotonic()
    try:
        info = client.download(args.name, destination, offset, length, force=args.force, restore=restore_args(args),
                               **version_args(args))
    except protocol.FileNotFound as exc:
        raise with_tree_hint(client, args.name, exc) from None
    elapsed = time.monotonic() - started
    if not args.quiet and destination != "-":
        print(f"downloaded {info.name} to {destination}: {plural(info.length, 'byte')} in {elapsed:.2f} s "
              f"({human_bytes(info.length / max(elapsed, 1e-6))}/s)")
    return EXIT_OK


def restore_args(args) -> Restore:
    """--no-metadata / --owners as a Restore; --owners without root is a note, not an error."""
    if args.owners and not args.no_metadata and hasattr(os, "geteuid") and os.geteuid() != 0:
        note("--owners: only a restore run as root can give files their owners; owners left as they are")
    return Restore(metadata=not args.no_metadata, owners=args.owners)


def byte_range(args) -> tuple[int, int]:
    """(offset, length) of --offset/--length; -1 = to the end.  Negative values are INVALID_RANGE."""
    offset = 0 if args.offset is None else args.offset
    if offset < 0:
        raise protocol.InvalidRange(f"--offset {offset} is negative")
    if args.length is not None and args.length < 0:
        raise protocol.InvalidRange(f"--length {args.length} is negative")
    return offset, -1 if args.length is None else args.length


def with_tree_hint(client: Client, name: str, exc: protocol.FileNotFound) -> protocol.FileNotFound:
    """``exc``, plus a hint when files are stored below ``name/`` (the user meant the tree)."""
    if not client.in_step:
        return exc
    below = len(client.list(name + "/"))
    if not below:
        return exc
    return protocol.FileNotFound(f"{exc.message}, but {plural(below, 'file')} {'is' if below == 1 else 'are'} "
                                 f"stored under {name}/: to restore them, run: download {name}/ [DIR]")


def note(text: str) -> None:
    """A per-file remark during a directory backup or restore (stderr)."""
    print(f"client: {text}", file=sys.stderr)


def wait_seconds(args) -> float:
    """--no-wait -> 0, --wait S -> S, neither -> -1 (the master's lock_wait_s)."""
    if getattr(args, "no_wait", False):
        return 0.0
    wait = getattr(args, "wait", None)
    return -1.0 if wait is None else wait


def cmd_append(client: Client, args) -> int:
    reply = client.upload_file(args.local, args.name, mode="append", wait_s=wait_seconds(args))
    if not args.quiet:
        print(f"appended to {reply.name}: now {plural(reply.size, 'byte')}, {plural(reply.chunks, 'chunk')}, "
              f"sha256 {reply.sha256}")
    return EXIT_OK


def cmd_write(client: Client, args) -> int:
    reply = client.upload_file(args.local, args.name, mode="write", offset=args.offset, wait_s=wait_seconds(args))
    if not args.quiet:
        print(f"wrote {reply.name} at offset {args.offset}: now {plural(reply.size, 'byte')}, sha256 {reply.sha256}")
    return EXIT_OK


def cmd_cat(client: Client, args) -> int:
    offset, length = byte_range(args)
    try:
        client.download(args.name, "-", offset, length, **version_args(args))
    except protocol.FileNotFound as exc:
        raise with_tree_hint(client, args.name, exc) from None
    return EXIT_OK


def version_args(args) -> dict:
    """--version ID / --at TIME as the version and at fields of a request."""
    return {"version": getattr(args, "version", None), "at": getattr(args, "at", None)}


def at_time(text: str) -> float:
    """argparse type of --at: unix seconds (history.parse_time), else a usage error (exit 2)."""
    import history  # noqa: PLC0415 - see the imports at the top
    try:
        return history.parse_time(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def keep_count(text: str) -> int:
    """argparse type of prune's --keep-N rules (retention.parse_count), else a usage error."""
    import retention  # noqa: PLC0415 - see the imports at the top
    try:
        return retention.parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def keep_duration(text: str) -> retention.Duration:
    """argparse type of --keep-within (retention.parse_duration), else a usage error."""
    import retention  # noqa: PLC0415 - see the imports at the top
    try:
        return retention.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_versions(client: Client, args) -> int:
    entries = client.versions(args.name)
    if args.json:
        return print_json(views.versions_document(args.name, entries))
    if not args.quiet:
        print(f"{'ID':>10} {'SIZE':>14}  {'MODIFIED':<19}  {'COMMITTED':<19}  SHA-256")
    for v in entries:
        print(f"{v['id']:>10} {v['size']:>14}  {format_time(v['mtime'])}  {format_time(v['committed_at'])}  "
              f"{v['sha256'][:16]}{'  (current)' if v['current'] else ''}")
    return EXIT_OK


def cmd_touch(client: Client, args) -> int:
    reply = client.touch(args.name, wait_seconds(args))
    if not args.quiet:
        print(f"touched {reply.name} ({plural(reply.size, 'byte')})")
    return EXIT_OK


def cmd_stat(client: Client, args) -> int:
    """The file's fields, where its chunks are, and its runs: all of them with --runs or --json,
    else only if there are few (a fragmented file may have millions)."""
    reply = client.stat(args.name, **version_args(args), all_runs=args.runs or args.json)
    fields = {k: getattr(reply, k) for k in ("name", "size", "chunks", "chunk_size", "sha256", "mtime", "version",
                                             "version_id", "committed_at")}
    if args.json:
        return print_json(views.stat_document(reply))
    for key, value in fields.items():
        print(f"{key + ':':<14}{format_time(value) if key in ('mtime', 'committed_at') and value else value}")
    print(f"{'runs:':<14}{reply.run_count}")
    held = ", ".join(f"{node_id} ({plural(count, 'chunk')})" for node_id, count in reply.node_chunks.items())
    print(f"{'nodes:':<14}{held or '(none)'}")
    if args.runs or reply.run_count <= STAT_RUNS_SHOWN:
        for first, count, nodes, blob in reply.runs:
            print(f"  chunks {first}..{first + count - 1}: nodes {', '.join(nodes) or '(none)'} (blob {blob})")
    else:
        print(f"  ({reply.run_count} runs: add --runs to list them)")
    return EXIT_OK


def cmd_verify(client: Client, args) -> int:
    """Read and check stored files (or, with --against, compare a local tree); EXIT_DAMAGED if anything is wrong."""
    import verify  # only here: keeps the CLI's start-up lean
    if args.against is not None:
        return verify_against(client, args, verify)
    target = args.name or ""
    if args.snapshot is not None:
        if args.version is not None or (target and not target.endswith("/")):
            raise UsageError("--snapshot verifies a tree: give no NAME or a PREFIX/, and no --version")
        args.snapshot = resolve_snapshot(client, args.snapshot, target)
        members = snapshot_entries(client, args.snapshot, target)
        names = [m["name"] for m in members]
        versions = {m["name"]: m["version"] for m in members}
    elif target and not target.endswith("/"):
        if args.read_data_subset is not None:
            raise UsageError("--read-data-subset picks among many files: give a PREFIX/ or no name")
        names = [protocol.validate_name(target)]
    else:
        if args.version is not None:
            raise UsageError("--version applies to one file, not to a tree")
        names = [e["name"] for e in client.list(target)]
        if target and not names:
            raise protocol.FileNotFound(f"no file under {target}")
    if args.snapshot is None:
        versions = None
    listed = len(names)
    subset = None
    if args.read_data_subset is not None:
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
        try:
            subset = verify.parse_subset(args.read_data_subset, seed)
        except ValueError as exc:
            raise UsageError(f"--read-data-subset {exc}") from None
        names = [name for name in names if subset.selects(name)]
    if not args.json and not args.quiet and subset is not None:
        print(f"reading subset {subset.describe()}: {len(names)} of {plural(listed, 'file')}")
    summary = client.verify(names, version=args.version, report=None if args.json else note,
                            versions=versions, snapshot=args.snapshot)
    elapsed = time.monotonic() - summary.started
    if args.json:
        print(json.dumps({"listed": listed, "selected": len(names),
                          "subset": None if subset is None else subset.describe(),
                          "seed": None if subset is None or subset.percent is None else subset.seed,
                          "verified": summary.files, "bytes": summary.bytes,
                          "damaged": [{"name": n, "code": c, "message": m} for n, c, m in summary.damaged],
                          "gone": summary.gone}, indent=2, ensure_ascii=False))
    elif not args.quiet:
        print(f"verified {plural(summary.files, 'file')}, {human_bytes(summary.bytes)} in {elapsed:.2f} s: "
              f"{len(summary.damaged)} damaged"
              + (f", {len(summary.gone)} deleted meanwhile" if summary.gone else ""))
    for name, code, message in summary.damaged if not args.json else ():
        print(f"DAMAGED {name}: {code}")
    return EXIT_DAMAGED if summary.damaged else EXIT_OK


def verify_against(client: Client, args, verify) -> int:
    """verify --against DIR NAME: list what differs between the local tree DIR and the stored NAME/."""
    if not args.name:
        raise UsageError("--against DIR needs the stored NAME (or NAME/) to compare it with")
    if args.read_data_subset is not None or args.version is not None or args.snapshot is not None:
        raise UsageError("--against compares with what is recorded; --read-data-subset, --version and --snapshot "
                         "do not apply")
    if not os.path.isdir(args.against):
        raise LocalFileError(f"{args.against}: not a directory")
    prefix = args.name.rstrip("/") + "/"
    stored = {e["name"][len(prefix):]: (filemeta.kind_of(e.get("meta")), e["size"], e.get("sha256"))
              for e in client.list(prefix)}
    local, paths = {}, {}
    for path, relative, kind in walk_tree(args.against):
        if kind not in _STORED_KINDS:  # special files are never stored
            continue
        kind = _STORED_KINDS[kind]
        paths[relative] = (path, kind)
        try:
            size = os.lstat(path).st_size if kind == filemeta.FILE else open_source(path, kind)[1]
        except OSError:
            size = -1  # unreadable: reported as different
        local[relative] = (kind, size)

    def local_sha256(relative: str) -> str | None:
        path, kind = paths[relative]
        sha = new_sha256()
        try:
            f = open_source(path, kind)[0]
            with f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
        except OSError:
            return None
        return sha.hexdigest()

    found = verify.compare_tree(local, stored, local_sha256)
    if args.json:
        print(json.dumps([{"difference": d, "name": prefix + n, "detail": detail} for d, n, detail in found],
                         indent=2, ensure_ascii=False))
    else:
        for difference, name, detail in found:
            print(f"{difference}: {prefix}{name}" + (f" ({detail})" if detail else ""))
        if not args.quiet:
            print(f"compared {plural(len(set(local) | set(stored)), 'name')}: {len(found)} "
                  f"{'difference' if len(found) == 1 else 'differences'}")
    return EXIT_DAMAGED if found else EXIT_OK


def cmd_locks(client: Client, args) -> int:
    held = client.locks()
    if args.json:
        return print_json(views.locks_document(held))
    if not held:
        print("no locks held")
    for lock in held:
        print(f"{lock['name']}: held by {lock['holder']} since {format_time(lock['since'])}")
        for waiter in lock["waiting"]:
            print(f"    waiting: {waiter['owner']} since {format_time(waiter['since'])}")
    return EXIT_OK


# Errors that concern one name: deleting the next one still makes sense.
_PER_NAME_ERRORS = (protocol.FileNotFound, protocol.FileLocked, protocol.InvalidName)


def cmd_delete(client: Client, args) -> int:
    """Delete each name in turn; one that fails is named and the rest still go.

    Exit status: that of the first failure, else EXIT_OK.  An error that is
    not about the name (master unreachable, ...) stops at once.
    """
    if args.purge and not args.yes:
        raise UsageError("--purge removes at once, with every version and the trash: add --yes to confirm")
    names = delete_targets(client, args)
    status = EXIT_OK
    for name in names:
        try:
            client.delete(name, wait_seconds(args), purge=args.purge)
        except _PER_NAME_ERRORS as exc:
            print(f"client: {exc.code}: {exc.message}", file=sys.stderr)
            status = status or EXIT_CODES[exc.code]
            continue
        if not args.quiet:
            print(f"{'purged' if args.purge else 'deleted'} {name}")
    return status


def delete_targets(client: Client, args) -> list[str]:
    """The names a delete acts on: each NAME, or with --recursive every file under each PREFIX/.

    A purge also reaches names that are only in the trash.
    """
    if not args.recursive:
        bad = [name for name in args.names if name.endswith("/")]
        if bad:
            raise UsageError(f"{bad[0]} is a prefix: add --recursive to delete every file under it")
        return args.names
    names: list[str] = []
    for prefix in args.names:
        if not prefix.endswith("/"):
            raise UsageError(f"--recursive takes prefixes ending in /, not {prefix!r}")
        found = [e["name"] for e in client.list(prefix)]
        if args.purge:
            found += [e["name"] for e in client.trash(prefix)]
        found = sorted(set(found))
        if not found:
            raise protocol.FileNotFound(f"no file under {prefix}")
        names += found
    return names


def cmd_undelete(client: Client, args) -> int:
    reply = client.undelete(args.name, wait_seconds(args))
    if not args.quiet:
        print(f"undeleted {reply.name}: {plural(reply.size, 'byte')}, version {reply.version_id}")
    return EXIT_OK


def cmd_trash(client: Client, args) -> int:
    entries = client.trash(args.prefix)
    if args.json:
        return print_json(views.trash_document(args.prefix, entries))
    if not args.quiet:
        print(f"{'ID':>10} {'SIZE':>14}  {'DELETED':<19}  {'EXPIRES':<19}  NAME")
    for e in entries:
        print(f"{e['id']:>10} {e['size']:>14}  {format_time(e['trashed_at'])}  {format_time(e['expires_at'])}  "
              f"{e['name']}")
    return EXIT_OK


# Times prune plans again when another prune forgot some of its snapshots first.
PRUNE_ATTEMPTS = 3


def prune_policy(args) -> retention.Policy:
    """The policy of prune's --keep-* flags; UsageError for an empty one (restic refuses it too)."""
    import retention  # noqa: PLC0415 - see the imports at the top
    policy = retention.Policy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily,
                              weekly=args.keep_weekly, monthly=args.keep_monthly, yearly=args.keep_yearly,
                              within=args.keep_within or retention.Duration())
    if policy.empty():
        raise UsageError("prune needs a policy: at least one --keep-* rule other than 0 (to forget every "
                         "snapshot of a tree, keep one and delete the tree with delete --purge)")
    return policy


def cmd_prune(client: Client, args) -> int:
    """Forget snapshots by policy, tree by tree: print what is kept (and why) and removed; exit 0.

    The policy runs here, in the local time zone, on the master's list; the
    master then forgets each tree's removed snapshots in one log record
    (SNAPSHOT_FORGET), so a crash leaves a tree pruned or not, and running
    prune again finishes the job.  A snapshot another prune forgot first
    makes the master refuse the whole request: the tree is planned again.
    """
    import retention  # noqa: PLC0415 - see the imports at the top
    policy = prune_policy(args)
    roots = [name.rstrip("/") for name in args.names]
    listing = client.snapshots()
    missing = [root for root in roots if not any(s["root"] == root for s in listing)]
    if missing:
        raise protocol.FileNotFound(f"no snapshot of {missing[0]!r} (see: snapshots)")
    groups = []
    for root, decision in retention.plan(listing, policy, roots, now=time.time()):
        forgotten, freed = [], None
        if decision.remove and not args.dry_run:
            decision, forgotten, freed = forget_planned(client, root, policy, decision)
        groups.append((root, decision, forgotten, freed))
        if not args.json:  # tree by tree: if a later tree fails, what was done is on the screen
            print_prune_group(root, policy, decision, args.quiet)
            if forgotten:
                print(f"forgot {plural(len(forgotten), 'snapshot')} of {root}: {human_bytes(freed)} of data freed "
                      f"(the nodes drop it and reclaim the space within seconds; see status)", flush=True)
    if args.json:
        return print_json(views.prune_document(policy, args.dry_run, groups))
    if args.dry_run and not args.quiet:
        print("dry run: nothing was forgotten")
    return EXIT_OK


def forget_planned(client: Client, root: str, policy: retention.Policy, decision: retention.Decision):
    """Forget ``decision``'s removed snapshots of ``root``: (decision carried out, ids forgotten, bytes freed)."""
    import retention  # noqa: PLC0415 - see the imports at the top
    for _ in range(PRUNE_ATTEMPTS):
        try:
            reply = client.forget_snapshots([s["id"] for s in decision.remove])
            return decision, reply.ids, reply.freed_bytes
        except protocol.FileNotFound:
            # Another prune forgot some first: plan this tree again on what is left.
            group = [s for s in client.snapshots(root) if s["root"] == root]
            decision = retention.apply_policy(group, policy, now=time.time()) if group else retention.Decision([], [])
            if not decision.remove:
                return decision, [], 0
    raise protocol.FileLocked(f"the snapshots of {root!r} kept changing while prune ran; run it again")


def print_prune_group(root: str, policy: retention.Policy, decision: retention.Decision, quiet: bool) -> None:
    """restic's layout: the policy, then the kept snapshots with their reasons, then the removed ones."""
    if quiet:
        return
    print(f"snapshots of {root}: {policy.describe()}")
    for title, rows in (("keep", decision.keep), ("remove", [(s, []) for s in decision.remove])):
        if not rows:
            continue
        print(f"{title} {plural(len(rows), 'snapshot')}:")
        print(f"{'ID':>10}  {'TIME':<19} {'FILES':>8} {'SIZE':>10}  {'REASONS' if title == 'keep' else ''}".rstrip())
        for snapshot, reasons in rows:
            print(f"{snapshot['id']:>10}  {format_time(snapshot['time'])} {snapshot['files']:>8} "
                  f"{human_bytes(snapshot['bytes']):>10}  {', '.join(reasons)}".rstrip())


def cmd_list(client: Client, args) -> int:
    prefix = args.prefix
    entries = client.list(prefix)
    if prefix and not prefix.endswith("/"):
        # Whole path components: "a" is the file a and the files below a/, not "ab".
        entries = [e for e in entries if e["name"] == prefix or e["name"].startswith(prefix + "/")]
    if args.json:
        return print_json(views.list_document(prefix, entries))
    if not args.quiet:
        print(f"{'SIZE':>14} {'CHUNKS':>10}  {'MODIFIED':<19}  NAME")
    for entry in entries:
        print(f"{entry['size']:>14} {entry['chunks']:>10}  {format_time(entry['mtime'])}  {entry['name']}")
    return EXIT_OK


def cmd_status(client: Client, args) -> int:
    import health as health_module  # noqa: PLC0415 - see the imports at the top
    cluster_health = client.health()
    reply = client.status()
    # A replicated group: every master as it sees itself, with what the leader knows of it.
    masters = client.masters(reply.masters) if reply.masters else None
    if args.json:
        now = time.time()
        nodes = [views.node_document(n, n.get("state") or ("alive" if n["alive"] else "dead"), now)
                 for n in reply.nodes]
        return print_json(views.status_document(cluster_health, nodes, reply.totals, now,
                                                masters=None if masters is None else
                                                [views.master_document(m, now) for m in masters]))
    print(health_module.summary_line(cluster_health))
    if masters:
        # MATCH: the last log index the leader knows the master holds; CONTACT: how long ago the
        # leader last heard from it.  ROLE, TERM, COMMIT, APPLIED: the master's own word.
        print(f"{'MASTER':<22} {'ROLE':<11} {'TERM':>6} {'COMMIT':>9} {'APPLIED':>9} {'MATCH':>9} {'CONTACT':>9}")
        for m in masters:
            contact = m.get("last_contact_s")
            print(f"{m['address']:<22} {m['role']:<11} {m.get('term', '-'):>6} {m.get('commit', '-'):>9} "
                  f"{m.get('applied', '-'):>9} {m.get('match', '-'):>9} "
                  f"{'-' if contact is None else f'{contact:.1f}s ago':>9}")
        print(f"leader: {reply.masters[0].get('leader') or 'none'}\n")
    print(f"{'NODE':<14} {'ADDRESS':<22} {'STATE':<10} {'HEARD':>9} {'CAPACITY':>10} {'USED':>10} {'FREE':>10} "
          f"{'CHUNKS':>10} {'QUARANTINED':>11}")
    for node in reply.nodes:
        # "-": not heard since the master started (it knows the node from its log only).
        heard = "-" if node["last_heard_s"] is None else f"{node['last_heard_s']:.1f}s ago"
        state = node.get("state") or ("alive" if node["alive"] else "dead")
        state = (state.upper() if state == "dead" else state) + (" full" if node.get("full") else "")
        # CAPACITY: what the node can hold, its disk permitting.  Older masters send no free space.
        free = node.get("free_bytes")
        print(f"{node['id']:<14} {node['address']:<22} {state:<10} {heard:>9} "
              f"{human_bytes(node.get('usable_bytes', node['capacity_bytes'])):>10} "
              f"{human_bytes(node['used_bytes']):>10} "
              f"{'?' if free is None else human_bytes(free):>10} {node['chunks']:>10} "
              f"{human_bytes(node.get('quarantined_bytes', 0)):>11}")
    for node in reply.refused:
        print(f"{node['id']:<14} {node['address']:<22} REFUSED: {node['reason']}")
    t = reply.totals
    print(f"nodes: {t['nodes_alive']}/{t['nodes']} alive; files: {t['files']} ({human_bytes(t['file_bytes'])}); "
          f"stored on live nodes: {human_bytes(t['used_bytes'])} in {plural(t['chunks'], 'chunk')}"
          + (f", {human_bytes(t['free_bytes'])} free of {human_bytes(t['usable_bytes'])}" if "free_bytes" in t else "")
          + f"; replication {t['replication']}")
    if t.get("dead_used_bytes") or t.get("dead_chunks"):
        print(f"on nodes not alive (last known, not counted above): {human_bytes(t['dead_used_bytes'])} "
              f"in {plural(t['dead_chunks'], 'chunk')}")
    if "live_bytes" in t:  # older masters do not send them
        print(f"data (each byte once, before replication): current files {human_bytes(t['live_bytes'])}, "
              f"older versions only {human_bytes(t['version_bytes'])}, trash only {human_bytes(t['trash_bytes'])}"
              + (f", snapshots only {human_bytes(t['snapshot_bytes'])}" if "snapshot_bytes" in t else ""))
    print(f"under-replicated chunks: {t.get('under_replicated_chunks', 0)}; "
          f"repairs in progress: {t.get('repairs_pending', 0)}; "
          f"chunks re-replicated: {t.get('repaired_chunks', 0)}; "
          f"corrupt replicas found: {t.get('corrupt_replicas_found', 0)}"
          + ("; SAFE MODE (no repairs yet)" if t.get("safe_mode") else ""))
    for warning in t.get("warnings", []):
        print(f"WARNING: {warning}")
    damaged = t.get("damaged_files", [])
    if damaged:
        more = t.get("damaged_file_count", len(damaged)) - len(damaged)
        print(f"damaged files (no live copy of some chunk): {', '.join(damaged)}"
              + (f" and {more} more" if more > 0 else ""))
    return EXIT_OK


def cmd_reclaim_orphans(client: Client, args) -> int:
    if not args.yes:
        print(f"client: reclaim-orphans quarantines every blob of node {args.node_id} that the master's namespace "
              f"does not know (erased after orphan_grace_s).  Check the master's metadata first (`list`, "
              f"`status`); then run it again with --yes.", file=sys.stderr)
        return EXIT_USAGE
    reply = client.reclaim_orphans(args.node_id)
    if not args.quiet:
        if reply.blobs:
            print(f"quarantined {reply.blobs} orphan blob(s), {reply.chunks} chunks, on node {reply.node_id}")
        else:
            print(f"nothing held back by the brake on node {reply.node_id}")
    return EXIT_OK


def cmd_health(client: Client, args) -> int:
    """Exit 0, 1 or 2 for HEALTH_OK, HEALTH_WARN or HEALTH_ERR (Nagios' OK, WARNING, CRITICAL)."""
    import health as health_module  # noqa: PLC0415 - see the imports at the top
    cluster_health = client.health()
    if args.json:
        print_json(cluster_health)
    elif args.detail:
        print("\n".join(health_module.detail_lines(cluster_health)))
    else:
        print(health_module.summary_line(cluster_health))
    return health_module.SEVERITY_RANK.get(cluster_health["status"], EXIT_ERROR)


def cmd_masters(client: Client, args) -> int:
    """``masters replace OLD NEW``: one membership change at a time through the replicated log."""
    reply = client.masters_replace(args.old, args.new)
    print(f"replaced {args.old} by {args.new}; voters: {', '.join(reply.voters)}"
          + (f"; learners: {', '.join(reply.learners)}" if reply.learners else ""))
    return EXIT_OK


def cmd_http_token(client: Client, args) -> int:
    """Print the status page's token derived from the shared secret (no network)."""
    if client.security is None or not client.security.secret:
        raise LocalFileError("no shared secret configured: give --secret-file PATH (or [security] secret)")
    import web_status  # the master's HTTP side: only this command needs it
    print(web_status.http_token(client.security.secret))
    return EXIT_OK


def print_json(document) -> int:
    """One JSON document on stdout (docs/JSON.md); the command's exit status."""
    print(json.dumps(document, indent=2, ensure_ascii=False))
    return EXIT_OK


COMMANDS = {
    "upload": cmd_upload,
    "download": cmd_download,
    "delete": cmd_delete,
    "append": cmd_append,
    "write": cmd_write,
    "cat": cmd_cat,
    "touch": cmd_touch,
    "stat": cmd_stat,
    "locks": cmd_locks,
    "list": cmd_list,
    "status": cmd_status,
    "versions": cmd_versions,
    "undelete": cmd_undelete,
    "trash": cmd_trash,
    "prune": cmd_prune,
    "verify": cmd_verify,
    "reclaim-orphans": cmd_reclaim_orphans,
    "health": cmd_health,
    "http-token": cmd_http_token,
    "snapshots": cmd_snapshots,
    "diff": cmd_diff,
    "masters": cmd_masters,
}
# Commands that take a name's write lock, and so --wait / --no-wait.
WRITERS = ("upload", "delete", "append", "write", "touch", "undelete")

# Environment variables the client reads; a flag beats them, they beat the config file.
ENV_MASTER = "BACKUP_MASTER"
ENV_SECRET_FILE = "BACKUP_SECRET_FILE"

EPILOG = (f"Client options work before or after the command.  Environment: {ENV_MASTER}=HOST:PORT (as "
          f"--master) and {ENV_SECRET_FILE}=PATH (as --secret-file); a flag overrides them, they override the "
          f"config file.  'COMMAND --help' describes a command; the README lists the exit statuses.")


class _OptionRecorder:
    """Passes ``add_argument`` on to an argument group and remembers the actions it made."""

    def __init__(self, group, actions: list | None = None):
        self.group = group
        self.actions = [] if actions is None else actions

    def add_argument(self, *args, **kwargs):
        action = self.group.add_argument(*args, **kwargs)
        self.actions.append(action)
        return action

    def add_mutually_exclusive_group(self):
        return _OptionRecorder(self.group.add_mutually_exclusive_group(), self.actions)


def add_client_options(parser: argparse.ArgumentParser, writer: bool, top: bool) -> None:
    """The options every command takes, before or after its name.

    They are added to the top-level parser (with defaults) and to every
    subcommand (``top`` False: default SUPPRESS, so an option given before
    the command is not reset by the subcommand's parse).
    """
    group = _OptionRecorder(parser.add_argument_group("client options (before or after the command)"))
    # Quiet by default: the CLI's own output is its report; DEBUG shows what it does.
    config_module.add_common_flags(group, default_log_level="WARNING")
    group.add_argument("--master", "--masters", dest="master", metavar="HOST:PORT[,HOST:PORT...]",
                       help=f"the master, or every master of a replicated group (default: ${ENV_MASTER}, else "
                            f"[cluster] masters, else [client] master in the config)")
    group.add_argument("--quiet", "-q", action="store_true",
                       help="no progress bar, no summary lines, no list header")
    group.add_argument("--timeout", type=float, metavar="S",
                       help="seconds to wait for the master at any step (default: lock_wait_s + 3 x io_timeout_s)")
    if writer:
        waiting = group.add_mutually_exclusive_group()
        waiting.add_argument("--wait", type=float, metavar="SECONDS",
                             help="wait at most this long for another writer of the name (default: lock_wait_s)")
        waiting.add_argument("--no-wait", action="store_true",
                             help="fail at once with FILE_LOCKED if the name is busy")
    if not top:
        for action in group.actions:
            action.default = argparse.SUPPRESS


VIA_MASTER_HELP = ("let the master relay the bytes instead of reading them from the nodes (direct reads, "
                   "the default; they fall back to the master by themselves when no node is reachable)")


class _Unused:
    """Stands in for the parser of a command that is not run: drops what is added to it."""

    def add_argument(self, *args, **kwargs) -> None:
        return None

    def add_mutually_exclusive_group(self) -> _Unused:
        return self

    def add_subparsers(self, **kwargs) -> _Unused:
        return self

    def add_parser(self, *args, **kwargs) -> _Unused:
        return self


class _ArgumentsUnclear(Exception):
    """command_name could not tell the command; the whole parser will say why."""


class _CommandFinder(argparse.ArgumentParser):
    def error(self, message):
        raise _ArgumentsUnclear(message)


def command_name(argv: list[str]) -> str:
    """The command ``argv`` runs, or "" if there is none or the client options before it are wrong.

    Parses the client options that may come before the command (the
    top-level parser's, so abbreviations and option values read the same)
    and takes the first word after them.
    """
    finder = _CommandFinder(add_help=False)
    add_client_options(finder, writer=True, top=True)
    finder.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        known, _ = finder.parse_known_args(argv)
    except _ArgumentsUnclear:
        return ""
    return known.rest[0] if known.rest and known.rest[0] in COMMANDS else ""


def build_arg_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The client's parser; with ``only``, every command is listed but only that one gets its arguments.

    Building the parsers and ~200 arguments of every command cost ~5 ms of
    each start-up; ``parse_args`` builds only the command being run
    (``only=""``: none, for ``--help`` and usage errors before the command).
    """
    parser = argparse.ArgumentParser(
        description="Back up, restore and manage files on a backup cluster.", epilog=EPILOG)
    add_client_options(parser, writer=True, top=True)
    # A command not run is listed (choices, --help) but gets no parser: even
    # an empty ArgumentParser costs ~0.2 ms (gettext look-ups).
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=lambda build, **kwargs: (argparse.ArgumentParser(**kwargs)
                                                                           if build else _Unused()))

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser | _Unused:
        return commands.add_parser(name, help=summary, description=description, build=only in (None, name))

    upload = command("upload", "store a local file, or every file below a directory",
                     "Store LOCAL as NAME.  A directory's regular files are stored as NAME/relative/path over "
                     "one connection, with their mode and modified time; symlinks (not followed) and empty directories "
                     "too, special files are skipped with a note.  NAME must be a "
                     "relative path of a file: no leading or trailing /, no empty, . or .. component.")
    upload.add_argument("local", metavar="LOCAL", help="local file or directory, or - for standard input")
    upload.add_argument("name", metavar="NAME", nargs="?",
                        help="name to store it under (default: LOCAL's base name; required for -); "
                             "a directory's files go under NAME/")
    upload.add_argument("--exclude", action="append", metavar="PATTERN",
                        help="directory upload: skip paths matching this glob (repeatable); a pattern without / "
                             "matches any path component ('*.tmp', 'cache'), one with / the relative path")
    upload.add_argument("--exclude-file", metavar="FILE",
                        help="directory upload: more --exclude patterns, one per line (# comments)")
    upload.add_argument("--check-content", action="store_true",
                        help="directory upload: also compare each file's SHA-256 with the last snapshot's "
                             "(reads every unchanged-looking file)")
    upload.add_argument("--dry-run", action="store_true",
                        help="directory upload: say what would be sent, send nothing, record no snapshot")
    download = command("download", "restore a stored file, or every file under PREFIX/",
                       "Restore NAME to LOCAL, or restore every file under PREFIX/ below directory DIR.  The "
                       "data is written to a temporary file and renamed only once its SHA-256 matches.  An "
                       "existing LOCAL is replaced only with --force, and only if it is a regular file.")
    download.add_argument("name", metavar="NAME|PREFIX/",
                          help="stored name; ending in / restores every file whose name starts with it")
    download.add_argument("local", metavar="LOCAL|DIR", nargs="?",
                          help="where to write: a file, - for standard output, or an existing directory "
                               "(default: NAME's base name); for PREFIX/, the directory to restore into "
                               "(default: PREFIX's last component)")
    download.add_argument("--offset", type=int, help="first byte to read (default 0)")
    download.add_argument("--length", type=int, help="bytes to read (default: to the end)")
    download.add_argument("--force", action="store_true", help="replace existing local regular files")
    download.add_argument("--no-metadata", action="store_true",
                          help="do not reapply the recorded mode and modified time (symlinks and empty "
                               "directories are still re-created)")
    download.add_argument("--owners", action="store_true",
                          help="also give files their recorded owner and group (only as root)")
    download.add_argument("--snapshot", type=snapshot_arg, metavar="ID",
                          help="restore the tree NAME/ as snapshot ID recorded it (see: snapshots); latest = the "
                               "newest snapshot of that tree")
    download.add_argument("--via-master", action="store_true", help=VIA_MASTER_HELP)
    delete = command("delete", "move stored files (and their versions) to the trash",
                     "Move each NAME and its versions to the trash for [retention] trash_days, from where "
                     "undelete brings it back; then its space is reclaimed.  --purge removes at once.  A name "
                     "that fails is named on stderr and the others are still deleted.")
    delete.add_argument("names", metavar="NAME", nargs="+", help="stored name; PREFIX/ with --recursive")
    delete.add_argument("--recursive", "-r", action="store_true", help="delete every file under each PREFIX/")
    delete.add_argument("--purge", action="store_true",
                        help="remove at once, with every version and whatever the trash holds of the name")
    delete.add_argument("--yes", action="store_true", help="confirm --purge")
    undelete = command("undelete", "bring a deleted file back from the trash",
                       "Bring back what the newest delete of NAME moved to the trash: its newest version "
                       "becomes current again, with its older versions.  Fails with FILE_EXISTS if NAME exists.")
    undelete.add_argument("name", metavar="NAME", help="stored name")
    trash = command("trash", "list the trash: deleted files and when they expire",
                    "List what the trash holds, by name: version id, size, when deleted, when it expires.")
    trash.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="only names starting with this")
    trash.add_argument("--json", action="store_true", help="machine-readable output")
    prune = command("prune", "forget snapshots by a retention policy (restic's --keep-* rules)",
                    "Forget the snapshots of each tree (each NAME, default every tree) that no --keep-* rule "
                    "keeps, with restic's meaning of each rule: calendar hours, days, ISO weeks, months and years "
                    "in local time, counted from the newest snapshot; --keep-within from the newest snapshot, "
                    "not from now.  Prints what is kept (and which rules keep it) and what is removed.  Versions "
                    "only the forgotten snapshots kept are freed and their space reclaimed on the nodes.  The "
                    "newest snapshot of a tree is always kept; a policy with no rule is refused.")
    prune.add_argument("names", metavar="NAME", nargs="*", help="a tree's root name (default: every tree)")
    prune.add_argument("--keep-last", type=keep_count, default=0, metavar="N",
                       help="keep the N newest snapshots (-1 or unlimited: all)")
    for unit, period in (("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"), ("monthly", "months"),
                         ("yearly", "years")):
        prune.add_argument(f"--keep-{unit}", type=keep_count, default=0, metavar="N",
                           help=f"keep the newest snapshot of each of the last N {period} that have one "
                                f"(-1 or unlimited: of every one)")
    prune.add_argument("--keep-within", type=keep_duration, metavar="DURATION",
                       help="keep every snapshot within DURATION (e.g. 1y5m7d2h: m is months) of the newest")
    prune.add_argument("--dry-run", action="store_true", help="print what would be kept and removed; forget nothing")
    prune.add_argument("--json", action="store_true", help="machine-readable output (docs/JSON.md)")
    append = command("append", "append local bytes (or stdin) to a stored file, creating it",
                     "Append LOCAL (or standard input) to NAME; NAME is created if missing.")
    append.add_argument("name", metavar="NAME", help="stored name")
    append.add_argument("local", metavar="LOCAL", help="local file, or - for standard input")
    write = command("write", "overwrite a byte range of a stored file in place",
                    "Overwrite NAME from byte --offset with the bytes of LOCAL (or standard input); "
                    "the file grows if they run past its end.")
    write.add_argument("name", metavar="NAME", help="stored name")
    write.add_argument("local", metavar="LOCAL", help="local file, or - for standard input")
    write.add_argument("--offset", type=int, required=True, help="first byte to overwrite (0 <= offset <= size)")
    cat = command("cat", "print a stored file, or a byte range of it, to stdout",
                  "Print NAME, or LENGTH bytes of it from OFFSET, to standard output.  Only the chunks that "
                  "cover the range are read.")
    cat.add_argument("name", metavar="NAME", help="stored name")
    cat.add_argument("--offset", type=int, help="first byte to read (default 0)")
    cat.add_argument("--length", type=int, help="bytes to read (default: to the end)")
    cat.add_argument("--via-master", action="store_true", help=VIA_MASTER_HELP)
    touch = command("touch", "create an empty file, or refresh a file's modified time",
                    "Create NAME as an empty file if it does not exist, else give it a new modified time.")
    touch.add_argument("name", metavar="NAME", help="stored name")
    stat_cmd = command("stat", "size, chunks, SHA-256, modified time, version, replicas",
                       "Show what the master knows of NAME: size, chunk count, SHA-256, modified time, "
                       "version, how many runs of chunks it has and how many chunks each node holds, and "
                       f"the nodes and blob of each run if there are at most {STAT_RUNS_SHOWN} (or with --runs).")
    stat_cmd.add_argument("name", metavar="NAME", help="stored name")
    stat_cmd.add_argument("--runs", action="store_true",
                          help=f"list every run of chunks (by default only if there are at most {STAT_RUNS_SHOWN})")
    versions = command("versions", "list the kept versions of a stored file, oldest first",
                       "List the versions of NAME the cluster keeps ([retention] keep_versions), oldest first: "
                       "version id, size, modified time, commit time, SHA-256; the current one is marked.")
    versions.add_argument("name", metavar="NAME", help="stored name")
    versions.add_argument("--json", action="store_true", help="machine-readable output")
    verify_cmd = command("verify", "read stored files and check them, or compare a local tree with a stored one",
                         "Read every chunk of the selected files (the current versions) as a restore would, "
                         "checking each chunk's CRC32 and each file's SHA-256, without writing anything locally; "
                         "list the damaged files and exit 19 if there is any.  --against DIR compares the local "
                         "tree DIR with the stored NAME/ by kind, size and SHA-256 (reading no stored data) and "
                         "lists what is missing locally, missing remotely or different (exit 19 if anything is).")
    verify_cmd.add_argument("name", metavar="NAME|PREFIX/", nargs="?",
                            help="one stored file, or every file under PREFIX/ (default: every file)")
    verify_cmd.add_argument("--read-data-subset", metavar="n/t|P%",
                            help="read only group n of t (by a hash of the names: 1/t..t/t cover every file "
                                 "once) or about P percent of the files (random, seed printed)")
    verify_cmd.add_argument("--seed", type=int, help="the seed of a P%% subset, to repeat a run")
    verify_cmd.add_argument("--version", type=int, metavar="ID", help="verify this version of NAME (one file)")
    verify_cmd.add_argument("--against", metavar="DIR", help="compare the local directory DIR with the stored NAME/")
    verify_cmd.add_argument("--snapshot", type=snapshot_arg, metavar="ID",
                            help="verify the versions snapshot ID recorded (all, or those under PREFIX/); "
                                 "latest = the newest snapshot")
    snapshots_cmd = command("snapshots", "list tree snapshots: id, time, files, size, root",
                            "List the snapshots recorded by directory uploads (upload DIR NAME), oldest first: "
                            "id, time, file count, bytes, root name.  NAME: only the snapshots of that tree.")
    snapshots_cmd.add_argument("name", metavar="NAME", nargs="?", help="only snapshots of this tree")
    snapshots_cmd.add_argument("--json", action="store_true", help="JSON output (schema in docs/JSON.md)")
    diff_cmd = command("diff", "list files added, removed and changed between two snapshots",
                       "Compare the members of snapshot ID1 with those of ID2: + added, - removed, M changed "
                       "(different content or kind; a metadata-only change is not listed).")
    diff_cmd.add_argument("first", metavar="ID1", type=snapshot_arg, help="the older snapshot")
    diff_cmd.add_argument("second", metavar="ID2", type=snapshot_arg, help="the newer snapshot (latest: the newest)")
    diff_cmd.add_argument("--json", action="store_true", help="JSON output (schema in docs/JSON.md)")
    verify_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    for reader in (download, cat, stat_cmd):
        which = reader.add_mutually_exclusive_group()
        which.add_argument("--version", type=int, metavar="ID", help="an older version, by id (see: versions NAME)")
        which.add_argument("--at", metavar="TIME", type=at_time,
                           help="the version current at TIME: ISO 8601 (2024-05-01T13:00) or a time ago (2h, 3d)")
    locks = command("locks", "list held write locks and their queues",
                    "List the write locks held now: the holder, since when, and the writers queued behind it.")
    listing = command("list", "list stored files: size, chunks, modified time, name",
                      "List stored files.  PREFIX matches whole path components: 'list a' shows the file a "
                      "and the files below a/, not ab; 'list a/' only the files below a/.")
    listing.add_argument("prefix", metavar="PREFIX", nargs="?", default="",
                         help="a name, or the directory part of names (default: every file)")
    status = command("status", "show the cluster's health, the storage nodes and totals",
                     "Show the health line (as `health`), then each storage node (id, address, state, last "
                     "heard, bytes used, chunks) and the cluster's totals: under-replicated chunks, repairs, "
                     "corrupt replicas, damaged files.")
    reclaim = command("reclaim-orphans", "after the orphan brake tripped on a node: quarantine its orphans anyway",
                      "Quarantine the orphan blobs (no stored file uses them) that the orphan brake held back on "
                      "NODE_ID: they are erased after orphan_grace_s.  Run it only once the master's metadata is "
                      "known to be right (list the files you expect); without --yes it only explains.")
    reclaim.add_argument("node_id", metavar="NODE_ID", help="the node named in the brake warning of `status`")
    reclaim.add_argument("--yes", action="store_true", help="confirm: the master's metadata is right")
    health = command("health", "HEALTH_OK, HEALTH_WARN or HEALTH_ERR and why; exits 0, 1 or 2",
                     "Print the cluster's health as the master sees it: HEALTH_OK, HEALTH_WARN or HEALTH_ERR and "
                     "the checks that fire (README, Health).  Exits 0, 1 or 2 accordingly, for cron and "
                     "Nagios-style checks; other statuses are the usual errors (5: master unreachable).")
    health.add_argument("--detail", action="store_true", help="one line per check, with the nodes or files concerned")
    masters = command("masters", "change the masters of a replicated group (masters replace OLD NEW)",
                      "replace OLD NEW: bring master NEW (started empty with `master.py --join`) into the group "
                      "and take OLD out, one membership change at a time through the log: NEW joins as a "
                      "learner, catches up (from the checkpoint) before it counts in any majority, becomes a "
                      "voter, then OLD is removed.  Safe to run again if interrupted.")
    masters_ops = masters.add_subparsers(dest="masters_op", required=True, metavar="OP",
                                         help="the change to make (only replace for now)")
    replace = masters_ops.add_parser("replace", help="replace master OLD by master NEW",
                                     description="Replace master OLD (HOST:PORT) by master NEW (HOST:PORT).")
    replace.add_argument("old", metavar="OLD", help="HOST:PORT of the master to take out")
    replace.add_argument("new", metavar="NEW", help="HOST:PORT of the new master (running with --join)")
    http_token = command("http-token", "print the status page's token, derived from the shared secret",
                         "Print the token the master's status page and /metrics require when served beyond "
                         "loopback, derived from the shared secret (--secret-file).  Needs no network.")
    for sub in (listing, status, health, locks, stat_cmd):
        sub.add_argument("--json", action="store_true", help="JSON output (schema in docs/JSON.md)")
    for name, sub in (("upload", upload), ("download", download), ("delete", delete), ("append", append),
                      ("write", write), ("cat", cat), ("touch", touch), ("stat", stat_cmd), ("locks", locks),
                      ("list", listing), ("status", status), ("versions", versions), ("undelete", undelete),
                      ("trash", trash), ("verify", verify_cmd), ("reclaim-orphans", reclaim), ("health", health),
                      ("http-token", http_token), ("snapshots", snapshots_cmd), ("diff", diff_cmd),
                      ("prune", prune), ("masters", masters)):
        if not isinstance(sub, _Unused):
            add_client_options(sub, writer=name in WRITERS, top=False)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line; exits 2 (argparse's usage error) on nonsense."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_arg_parser(only=command_name(argv))
    args = parser.parse_args(argv)
    if args.wait is not None and args.no_wait:
        parser.error("--wait and --no-wait cannot be used together")
    if (args.wait is not None or args.no_wait) and args.command not in WRITERS:
        parser.error(f"--wait and --no-wait apply to {', '.join(WRITERS)} only, not to {args.command}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # The master address: flag, else environment, else config file; an
        # error names where the bad value came from.
        master_text, source = args.master, "--master"
        if not master_text and os.environ.get(ENV_MASTER):
            master_text, source = os.environ[ENV_MASTER], ENV_MASTER
        if master_text:
            config_module.parse_addresses(master_text, source)
        overrides = config_module.security_overrides(args)
        if not overrides.get("secret_file") and os.environ.get(ENV_SECRET_FILE):
            overrides["secret_file"] = os.environ[ENV_SECRET_FILE]
        config = config_module.load_config(args.config, masters=master_text or None, **overrides)
        masters = config_module.master_addresses(config, "client_master")
        import security as security_module  # noqa: PLC0415 - see the imports at the top
        security = security_module.from_config(config)
    except ValueError as exc:
        print(f"client: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import logging  # noqa: PLC0415 - see the imports at the top
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="client %(levelname)s %(name)s: %(message)s")
    # A writer may first wait up to lock_wait_s for another writer of the name.
    timeout_s = args.timeout or config.lock_wait_s + config.io_timeout_s * 3
    client = Client(masters, timeout_s, config.batch_bytes, show_progress=not args.quiet and sys.stderr.isatty(),
                    security=security, handshake_timeout_s=min(config.io_timeout_s, timeout_s),
                    failover_timeout_s=config.failover_timeout_s, chunk_size=config.chunk_size_bytes,
                    direct_reads=not getattr(args, "via_master", False))
    try:
        return COMMANDS[args.command](client, args)
    except UsageError as exc:
        print(f"client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnsafeDestination as exc:
        print(f"client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LocalFileError as exc:
        print(f"client: {exc}", file=sys.stderr)
        return EXIT_LOCAL_IO
    except protocol.BackupError as exc:
        print(f"client: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, EXIT_ERROR)
    except KeyboardInterrupt:
        print("client: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): not an error of ours.
        _drop_stdout()
        return EXIT_OK
    finally:
        client.close()

