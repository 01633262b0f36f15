"""Command-line client: upload, download, delete, list, status.

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
import hashlib
import json
import logging
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
import protocol
import security as security_module
import transport

logger = logging.getLogger("client")

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
    "AUTH_FAILED": EXIT_AUTH_FAILED,
}


# Downloads requested ahead of the one being received when restoring a tree.
DOWNLOAD_WINDOW = 32


class LocalFileError(Exception):
    """A problem with a file on this machine (missing, unreadable, unwritable)."""


@dataclass
class TreeSummary:
    """Outcome of a directory upload or restore."""

    files: int = 0
    bytes: int = 0
    skipped: int = 0
    failures: list = field(default_factory=list)  # (name, reason)
    started: float = field(default_factory=time.monotonic)

    def ok(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes

    def fail(self, name: str, reason: str, report=None) -> None:
        self.failures.append((name, reason))
        if report:
            report(f"failed {name}: {reason}")

    def line(self, verb: str) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (f"{verb} {self.files} files, {human_bytes(self.bytes)} in {elapsed:.2f} s "
                f"({self.files / elapsed:.0f} files/s, {human_bytes(self.bytes / elapsed)}/s); "
                f"{len(self.failures)} failed, {self.skipped} skipped")


def walk_tree(root: str):
    """Yield (path, relative name with '/', kind) for everything below ``root``.

    kind is "file" for regular files, else "symlink", "directory link" or
    "special file"; symlinks are never followed.  Sorted, so runs repeat.
    """
    for directory, subdirs, names in os.walk(root, followlinks=False):
        subdirs.sort()
        for name in sorted(names) + [d for d in subdirs if os.path.islink(os.path.join(directory, d))]:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode):
                yield path, relative, "file"
            elif stat.S_ISLNK(mode):
                yield path, relative, "symlink"
            else:
                yield path, relative, "special file"


def safe_join(directory: str, relative: str) -> str:
    """``directory/relative``, refusing anything that would land outside it."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or relative.startswith("/"):
        raise LocalFileError(f"refusing to restore {relative!r}: it would land outside {directory}")
    path = os.path.join(os.path.abspath(directory), *parts)
    if os.path.commonpath([path, os.path.abspath(directory)]) != os.path.abspath(directory):
        raise LocalFileError(f"refusing to restore {relative!r}: it would land outside {directory}")
    return path


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


def check_destination(path: str, force: bool) -> None:
    """Refuse to replace an existing local file unless ``force``."""
    if path != "-" and not force and os.path.lexists(path):
        raise LocalFileError(f"{path} exists; use --force to overwrite it")


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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _FrameSink:
    """Hashes and writes received frames, in a second thread when ``threaded``.

    ``free_buffer()`` hands out a buffer to receive the next frame into;
    ``put()`` queues its body; ``close()`` drains the queue and re-raises a
    write error.  Three buffers rotate, so memory is three frames.
    """

    _BUFFERS = 3

    def __init__(self, out, sha, progress: Progress, threaded: bool, first_buffer: bytearray):
        self.out = out
        self.sha = sha
        self.progress = progress
        self.error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        self._free.put(first_buffer)
        self._thread = None
        if threaded:
            for _ in range(self._BUFFERS - 1):
                self._free.put(bytearray(len(first_buffer)))
            self._work: queue.Queue = queue.Queue()
            self._thread = threading.Thread(target=self._run, name="download-writer", daemon=True)
            self._thread.start()

    def free_buffer(self) -> bytearray:
        if self.error is not None:
            raise self.error
        return self._free.get()

    def put(self, buffer: bytearray, body) -> None:
        if self._thread is None:
            self._consume(body)
            self._free.put(buffer)
        else:
            self._work.put((buffer, body))

    def _consume(self, body) -> None:
        if self.sha is not None:
            self.sha.update(body)
        try:
            self.out.write(body)
        except OSError as exc:
            raise LocalFileError(f"cannot write: {exc.strerror}") from None
        self.progress.advance(len(body))

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            buffer, body = item
            try:
                if self.error is None:
                    self._consume(body)
            except BaseException as exc:
                self.error = exc
            self._free.put(buffer)

    def close(self) -> None:
        if self._thread is not None:
            self._work.put(None)
            self._thread.join()
        if self.error is not None:
            raise self.error


class Client:
    """A session with the master: one connection, opened on first use."""

    def __init__(self, master: tuple[str, int], timeout_s: float, frame_bytes: int, show_progress: bool,
                 security: transport.Security | None = None):
        self.master = master
        self.security = security  # shared secret and TLS (security.py); None = neither
        self.timeout_s = timeout_s
        self.frame_bytes = frame_bytes
        self.show_progress = show_progress
        self._conn: transport.Connection | None = None
        self._frame_buffer: bytearray | None = None

    @property
    def conn(self) -> transport.Connection:
        if self._conn is None:
            logger.debug("connecting to master %s (timeout %g s)", transport.format_address(self.master),
                         self.timeout_s)
            self._conn = transport.Connection(self.master, "client", self.timeout_s, self.security)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- upload ----------------------------------------------------------------------
    def upload_file(self, path: str, name: str, mode: str = "replace", offset: int = 0,
                    wait_s: float = -1.0) -> protocol.Uploaded:
        """Send the local file ``path`` ("-" = stdin) to be stored as ``name``.

        ``mode``: "replace" (the whole file), "append" (added at the end), or
        "write" (overwrites from ``offset``).  ``wait_s``: how long to wait
        for another writer of the name (0 = not at all, negative = the
        master's default).  Returns the master's UPLOADED.
        """
        protocol.validate_name(name)
        try:
            f = sys.stdin.buffer if path == "-" else open(path, "rb")
        except OSError as exc:
            raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
        try:
            size = -1 if path == "-" else os.fstat(f.fileno()).st_size
            conn = self.conn
            conn.send(protocol.UploadBegin(name=name, size=size, mode=mode, offset=offset, wait_s=wait_s))
            verb = "upload" if mode == "replace" else mode
            progress = Progress(f"{verb} {name}", size, self.show_progress and size >= self.frame_bytes)
            sha = hashlib.sha256()
            buffer = self._buffer()
            view = memoryview(buffer)
            while True:
                try:
                    n = f.readinto(buffer)
                except OSError as exc:
                    conn.send(protocol.UploadAbort())
                    raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
                if not n:
                    break
                sha.update(view[:n])
                conn.send(protocol.Data(body=view[:n]))
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

    def _reply_waiting(self) -> bool:
        sock = self.conn.sock
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    # --- download --------------------------------------------------------------------
    def download(self, name: str, destination: str, offset: int = 0, length: int = -1,
                 force: bool = False) -> protocol.FileInfo:
        """Write ``name`` (or a byte range of it) to ``destination`` ("-" = stdout).

        A whole-file download is checked against the SHA-256 recorded at
        upload; on any failure the destination is left untouched.  An
        existing destination is replaced only with ``force``.
        """
        protocol.validate_name(name)
        check_destination(destination, force)
        self.conn.send(protocol.Download(name=name, offset=offset, length=length))
        return self._receive_to(name, destination)

    def _receive_to(self, name: str, destination: str) -> protocol.FileInfo:
        """Read one download reply into ``destination`` via a temporary file."""
        if destination == "-":
            return self._receive(name, sys.stdout.buffer)
        directory = os.path.dirname(os.path.abspath(destination))
        try:
            fd, temp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(destination) + ".",
                                             suffix=".part")
        except OSError as exc:
            raise LocalFileError(f"cannot write in {directory}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                info = self._receive(name, out)
            os.replace(temp_path, destination)
        except BaseException:
            try:
                os.unlink(temp_path)
            except OSError:
                pass
            raise
        return info

    def _receive(self, name: str, out) -> protocol.FileInfo:
        """Read one download reply (FILE_INFO, DATA..., DATA_END) into ``out``.

        The socket is read in this thread while a second one hashes and
        writes the previous frame (hashlib and file writes release the GIL),
        so receiving never waits for the disk.  Small files skip the thread.
        """
        conn = self.conn
        info = conn.expect(protocol.FileInfo)
        whole_file = info.offset == 0 and info.length == info.size
        sha = hashlib.sha256() if whole_file else None
        progress = Progress(f"download {name}", info.length,
                            self.show_progress and out is not sys.stdout.buffer and info.length >= self.frame_bytes)
        sink = _FrameSink(out, sha, progress, threaded=info.length > self.frame_bytes, first_buffer=self._buffer())
        received = 0
        try:
            while True:
                buffer = sink.free_buffer()
                msg = conn.recv(buffer)
                if not isinstance(msg, protocol.Data):
                    protocol.expect(msg, protocol.DataEnd)
                    break
                received += len(msg.body)
                if received > info.length:
                    raise protocol.RemoteProtocolError("master sent more bytes than announced")
                sink.put(buffer, msg.body)
        finally:
            sink.close()
        if received != info.length:
            raise protocol.RemoteProtocolError(f"master sent {received} bytes, announced {info.length}")
        if whole_file and sha.hexdigest() != info.sha256:
            raise protocol.ChecksumMismatch(f"{name!r} failed verification: SHA-256 differs from the one "
                                            f"recorded at upload; nothing was written")
        progress.finish()
        return info

    def _buffer(self) -> bytearray:
        if self._frame_buffer is None:
            self._frame_buffer = bytearray(self.frame_bytes)
        return self._frame_buffer

    def download_tree(self, prefix: str, directory: str, force: bool = False, report=None) -> TreeSummary:
        """Restore every file whose name starts with ``prefix`` under ``directory``.

        Names map to paths below ``directory`` with the prefix removed; a name
        that would land outside it (``..``, absolute) is refused, never
        followed.  Requests are pipelined DOWNLOAD_WINDOW deep.
        """
        summary = TreeSummary()
        todo = []
        for entry in self.list(prefix):
            relative = entry["name"][len(prefix):].lstrip("/")
            try:
                path = safe_join(directory, relative or os.path.basename(entry["name"]))
                check_destination(path, force)
            except LocalFileError as exc:
                summary.fail(entry["name"], str(exc), report)
                continue
            todo.append((entry["name"], path))
        sent = 0
        conn = self.conn
        for position, (name, path) in enumerate(todo):
            while sent < len(todo) and sent < position + DOWNLOAD_WINDOW:
                conn.send(protocol.Download(name=todo[sent][0]), flush=False)
                sent += 1
            conn.flush()
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as exc:
                raise LocalFileError(f"cannot create {os.path.dirname(path)}: {exc.strerror}") from None
            try:
                info = self._receive_to(name, path)
            except (protocol.FileNotFound, protocol.DataLost, protocol.Unavailable, protocol.ChecksumMismatch) as exc:
                summary.fail(name, f"{exc.code}: {exc.message}", report)
                if self._conn is None or self._conn.broken:
                    raise
                continue
            summary.ok(info.length)
        return summary

    # --- directories -----------------------------------------------------------------
    def upload_tree(self, root: str, prefix: str, report=None) -> TreeSummary:
        """Back up every regular file below ``root`` as ``prefix/relative/path``.

        One connection, uploads pipelined: a sender streams file after file
        while a receiver thread collects the replies, and the master commits
        them in groups (``group=True``), so thousands of small files cost a
        few fsyncs, not thousands.  Symlinks and special files are skipped
        with a note.
        """
        summary = TreeSummary()
        files = []
        for path, relative, kind in walk_tree(root):
            if kind != "file":
                if report:
                    report(f"skipped {kind} {path}")
                summary.skipped += 1
                continue
            files.append((path, prefix.rstrip("/") + "/" + relative))
        conn = self.conn
        in_flight: deque = deque()
        failed_tags: set[int] = set()
        receiver_error: list[BaseException] = []

        def receive() -> None:
            try:
                while True:
                    msg = conn.recv()
                    if isinstance(msg, protocol.Synced):
                        return
                    tag, name, size = in_flight.popleft()
                    if isinstance(msg, protocol.Uploaded):
                        summary.ok(size)
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
        try:
            for tag, (path, name) in enumerate(files):
                if receiver_error:
                    break
                try:
                    protocol.validate_name(name)
                    f = open(path, "rb")
                except (OSError, protocol.InvalidName) as exc:
                    summary.fail(name, str(exc), report)
                    continue
                with f:
                    size = os.fstat(f.fileno()).st_size
                    in_flight.append((tag, name, size))
                    conn.send(protocol.UploadBegin(name=name, size=size, tag=tag, group=True), flush=False)
                    sha = hashlib.sha256()
                    while True:
                        if tag in failed_tags:
                            conn.send(protocol.UploadAbort(), flush=False)
                            break
                        try:
                            n = f.readinto(buffer)
                        except OSError as exc:
                            conn.send(protocol.UploadAbort(), flush=False)
                            raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
                        if not n:
                            conn.send(protocol.UploadEnd(sha256=sha.hexdigest()), flush=False)
                            break
                        sha.update(view[:n])
                        conn.send(protocol.Data(body=view[:n]), flush=False)
            conn.send(protocol.Sync())
        finally:
            receiver.join(self.timeout_s)
        if receiver_error:
            raise receiver_error[0]
        if receiver.is_alive():
            raise protocol.Timeout("the master did not confirm the uploads in time")
        return summary

    # --- the rest --------------------------------------------------------------------
    def delete(self, name: str, wait_s: float = -1.0) -> None:
        self.conn.request(protocol.Delete(name=protocol.validate_name(name), wait_s=wait_s), protocol.Deleted)

    def touch(self, name: str, wait_s: float = -1.0) -> protocol.Touched:
        return self.conn.request(protocol.Touch(name=protocol.validate_name(name), wait_s=wait_s), protocol.Touched)

    def stat(self, name: str) -> protocol.StatReply:
        return self.conn.request(protocol.Stat(name=protocol.validate_name(name)), protocol.StatReply)

    def locks(self) -> list[dict]:
        return self.conn.request(protocol.Locks(), protocol.LocksReply).locks

    def list(self, prefix: str = "") -> list[dict]:
        conn = self.conn
        conn.send(protocol.List(prefix=prefix))
        entries = []
        while True:
            page = conn.expect(protocol.ListPage)
            entries.extend(page.entries)
            if page.done:
                return entries

    def status(self) -> protocol.StatusReply:
        return self.conn.request(protocol.Status(), protocol.StatusReply)


# --- command line -------------------------------------------------------------------------
def format_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cmd_upload(client: Client, args) -> int:
    if not os.path.exists(args.local):
        raise LocalFileError(f"{args.local}: no such file or directory")
    name = args.name if args.name is not None else os.path.basename(os.path.abspath(args.local))
    if os.path.isdir(args.local):
        summary = client.upload_tree(args.local, name, report=note)
        if not args.quiet:
            print(summary.line("uploaded"))
        return EXIT_PARTIAL if summary.failures else EXIT_OK
    started = time.monotonic()
    reply = client.upload_file(args.local, name, wait_s=wait_seconds(args))
    elapsed = time.monotonic() - started
    if not args.quiet:
        print(f"uploaded {reply.name}: {reply.size} bytes, {reply.chunks} chunks "
              f"in {elapsed:.2f} s ({human_bytes(reply.size / max(elapsed, 1e-6))}/s), sha256 {reply.sha256}")
    return EXIT_OK


def cmd_download(client: Client, args) -> int:
    if args.name.endswith("/"):
        base = args.name.rstrip("/").rpartition("/")[2]
        directory = args.local or (base if base not in ("", ".", "..") else ".")  # never above the cwd
        summary = client.download_tree(args.name, directory, force=args.force, report=note)
        if not args.quiet:
            print(summary.line("restored"))
        if not summary.files and not summary.failures:
            raise protocol.FileNotFound(f"no file named {args.name}...")
        return EXIT_PARTIAL if summary.failures else EXIT_OK
    destination = args.local or local_base_name(args.name)
    if destination != "-" and os.path.isdir(destination):
        destination = os.path.join(destination, local_base_name(args.name))
    started = time.monotonic()
    info = client.download(args.name, destination, args.offset, args.length, force=args.force)
    elapsed = time.monotonic() - started
    if not args.quiet and destination != "-":
        print(f"downloaded {info.name} to {destination}: {info.length} bytes in {elapsed:.2f} s "
              f"({human_bytes(info.length / max(elapsed, 1e-6))}/s)")
    return EXIT_OK


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
        print(f"appended to {reply.name}: now {reply.size} bytes, {reply.chunks} chunks, sha256 {reply.sha256}")
    return EXIT_OK


def cmd_write(client: Client, args) -> int:
    reply = client.upload_file(args.local, args.name, mode="write", offset=args.offset, wait_s=wait_seconds(args))
    if not args.quiet:
        print(f"wrote {reply.name} at offset {args.offset}: now {reply.size} bytes, sha256 {reply.sha256}")
    return EXIT_OK


def cmd_cat(client: Client, args) -> int:
    client.download(args.name, "-", args.offset, args.length)
    return EXIT_OK


def cmd_touch(client: Client, args) -> int:
    reply = client.touch(args.name, wait_seconds(args))
    if not args.quiet:
        print(f"touched {reply.name} ({reply.size} bytes)")
    return EXIT_OK


def cmd_stat(client: Client, args) -> int:
    reply = client.stat(args.name)
    fields = {k: getattr(reply, k) for k in ("name", "size", "chunks", "chunk_size", "sha256", "mtime", "version")}
    if args.json:
        print(json.dumps({**fields, "runs": reply.runs}, indent=2, ensure_ascii=False))
        return EXIT_OK
    for key, value in fields.items():
        print(f"{key + ':':<12}{format_time(value) if key == 'mtime' else value}")
    for first, count, nodes, blob in reply.runs:
        print(f"  chunks {first}..{first + count - 1}: nodes {', '.join(nodes) or '(none)'} (blob {blob})")
    return EXIT_OK


def cmd_locks(client: Client, args) -> int:
    held = client.locks()
    if not held:
        print("no locks held")
    for lock in held:
        print(f"{lock['name']}: held by {lock['holder']} since {format_time(lock['since'])}")
        for waiter in lock["waiting"]:
            print(f"    waiting: {waiter['owner']} since {format_time(waiter['since'])}")
    return EXIT_OK


def cmd_delete(client: Client, args) -> int:
    client.delete(args.name, wait_seconds(args))
    if not args.quiet:
        print(f"deleted {args.name}")
    return EXIT_OK


def cmd_list(client: Client, args) -> int:
    for entry in client.list(args.prefix):
        print(f"{entry['size']:>14} {entry['chunks']:>10}  {format_time(entry['mtime'])}  {entry['name']}")
    return EXIT_OK


def cmd_status(client: Client, args) -> int:
    reply = client.status()
    print(f"{'NODE':<14} {'ADDRESS':<22} {'STATE':<9} {'HEARD':>9} {'USED':>11} {'CHUNKS':>10}")
    for node in reply.nodes:
        # "-": not heard since the master started (it knows the node from its log only).
        heard = "-" if node["last_heard_s"] is None else f"{node['last_heard_s']:.1f}s ago"
        state = node.get("state") or ("alive" if node["alive"] else "dead")
        state = (state.upper() if state == "dead" else state) + (" full" if node.get("full") else "")
        print(f"{node['id']:<14} {node['address']:<22} {state:<9} {heard:>9} "
              f"{human_bytes(node['used_bytes']):>11} {node['chunks']:>10}")
    t = reply.totals
    print(f"nodes: {t['nodes_alive']}/{t['nodes']} alive; files: {t['files']} ({human_bytes(t['file_bytes'])}); "
          f"stored: {human_bytes(t['used_bytes'])} in {t['chunks']} chunks; replication {t['replication']}")
    print(f"under-replicated chunks: {t.get('under_replicated_chunks', 0)}; "
          f"repairs in progress: {t.get('repairs_pending', 0)}; "
          f"chunks re-replicated: {t.get('repaired_chunks', 0)}; "
          f"corrupt replicas found: {t.get('corrupt_replicas_found', 0)}"
          + ("; SAFE MODE (no repairs yet)" if t.get("safe_mode") else ""))
    damaged = t.get("damaged_files", [])
    if damaged:
        more = t.get("damaged_file_count", len(damaged)) - len(damaged)
        print(f"damaged files (no live copy of some chunk): {', '.join(damaged)}"
              + (f" and {more} more" if more > 0 else ""))
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
}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Back up, restore and manage files on a backup cluster.")
    # Quiet by default: the CLI's own output is its report; DEBUG shows what it does.
    config_module.add_common_flags(parser, default_log_level="WARNING")
    parser.add_argument("--master", metavar="HOST:PORT", help="master address (default from config)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary lines")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="seconds to wait for the master at any step (default: lock_wait_s + 3 x io_timeout_s)")
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="store a local file, or every file below a directory")
    upload.add_argument("local", help="local file or directory")
    upload.add_argument("name", nargs="?",
                        help="name to store it under (default: base name); a directory's files go under NAME/")
    download = commands.add_parser("download", help="restore a stored file, or every file under NAME/")
    download.add_argument("name", help="stored name; ending in / restores every file with that prefix")
    download.add_argument("local", nargs="?",
                          help="local path, or - for stdout (default: base name of NAME); a directory for NAME/")
    download.add_argument("--offset", type=int, default=0, help="first byte to read")
    download.add_argument("--length", type=int, default=-1, help="bytes to read (default: to the end)")
    download.add_argument("--force", action="store_true", help="overwrite existing local files")
    delete = commands.add_parser("delete", help="delete a stored file")
    delete.add_argument("name")
    append = commands.add_parser("append", help="append local bytes (or stdin) to a stored file, creating it")
    append.add_argument("name")
    append.add_argument("local", help="local file, or - for stdin")
    write = commands.add_parser("write", help="overwrite a byte range of a stored file in place")
    write.add_argument("name")
    write.add_argument("local", help="local file, or - for stdin")
    write.add_argument("--offset", type=int, required=True, help="first byte to overwrite (<= size)")
    cat = commands.add_parser("cat", help="print a stored file, or a byte range of it, to stdout")
    cat.add_argument("name")
    cat.add_argument("--offset", type=int, default=0, help="first byte to read")
    cat.add_argument("--length", type=int, default=-1, help="bytes to read (default: to the end)")
    touch = commands.add_parser("touch", help="create an empty file, or refresh a file's modified time")
    touch.add_argument("name")
    stat_cmd = commands.add_parser("stat", help="size, chunks, SHA-256, modified time, version, replicas")
    stat_cmd.add_argument("name")
    stat_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser("locks", help="list held write locks and their queues")
    for writer in (upload, delete, append, write, touch):
        waiting = writer.add_mutually_exclusive_group()
        waiting.add_argument("--wait", type=float, metavar="SECONDS",
                             help="wait at most this long for another writer of the name (default: lock_wait_s)")
        waiting.add_argument("--no-wait", action="store_true", help="fail at once with FILE_LOCKED if the name is busy")
    listing = commands.add_parser("list", help="list stored files: size, chunks, modified time, name")
    listing.add_argument("prefix", nargs="?", default="")
    commands.add_parser("status", help="show the storage nodes and totals")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        config = config_module.load_config(args.config, client_master=args.master,
                                           **config_module.security_overrides(args))
        master = config_module.parse_address(config.client_master, "master")
        security = security_module.from_config(config)
    except ValueError as exc:
        print(f"client: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="client %(levelname)s %(name)s: %(message)s")
    # A writer may first wait up to lock_wait_s for another writer of the name.
    timeout_s = args.timeout or config.lock_wait_s + config.io_timeout_s * 3
    client = Client(master, timeout_s, config.batch_bytes, show_progress=not args.quiet and sys.stderr.isatty(),
                    security=security)
    try:
        return COMMANDS[args.command](client, args)
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
