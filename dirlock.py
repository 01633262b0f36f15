"""One process per data dir: an exclusive ``flock`` held for the process lifetime.

Two nodes on one data dir register under one node id and compact each
other's segments away; two masters on one data dir interleave their op logs.
Every server therefore locks ``DATA_DIR/LOCK`` before it reads anything
there, and keeps the lock until it exits.  The kernel releases a ``flock``
when its holder dies, even by SIGKILL, so a crash never leaves a stale lock
behind and no pid-file heuristics are needed.  The holder writes its pid
into the file only so that a refused process can name it.
"""

from __future__ import annotations

import errno
import fcntl
import os

LOCK_NAME = "LOCK"


class DataDirLocked(RuntimeError):
    """Another process holds the data dir's lock; the message names its pid."""

    def __init__(self, data_dir: str, pid: int | None):
        self.data_dir = data_dir
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"data dir {data_dir} is in use by {holder} (lock {os.path.join(data_dir, LOCK_NAME)})")


def lock_data_dir(data_dir: str) -> int:
    """Create ``data_dir`` if needed and lock it; return the lock's file descriptor.

    Keep the descriptor open for as long as the process uses the directory
    (closing it releases the lock).  Raises DataDirLocked if another process
    holds it, OSError if the directory or lock file cannot be made.
    """
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(data_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DataDirLocked(data_dir, _read_pid(path)) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _read_pid(path: str) -> int | None:
    """The pid the holder wrote, or None if it has not written it yet (or it is garbled)."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
