"""A file's metadata as a backup records it, and putting it back on restore.

A directory upload records, per entry, what a restore needs to give back
the tree as it was, not only the bytes: the kind (regular file, symlink,
empty directory), the permission bits and the modification time, and the
owner (uid/gid) for a restore run as root that asks for it (``--owners``).
A symlink is stored as a file whose bytes are its target (never followed);
an empty directory as an empty file.  The master keeps the record in the
file entry (``"meta"``, see namespace.py) and takes the file's own mtime as
the entry's modified time.

Pure functions plus the few system calls that read or apply metadata; the
master only calls ``checked`` (a peer's record is untrusted input).  Left
out: ACLs, extended attributes, hard links, the metadata of non-empty
directories (they are re-created by their files).
"""

from __future__ import annotations

import os
import stat

import protocol

FILE, SYMLINK, DIRECTORY = "file", "symlink", "dir"
KINDS = (FILE, SYMLINK, DIRECTORY)
# A symlink's target is its stored bytes: PATH_MAX on Linux bounds it.
MAX_LINK_BYTES = 4096
_FIELDS = {"type": str, "mode": int, "mtime_ns": int, "uid": int, "gid": int}


def capture(st: os.stat_result, kind: str = FILE) -> dict:
    """The record of a path from its ``os.lstat`` result."""
    return {"type": kind, "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns,
            "uid": st.st_uid, "gid": st.st_gid}


def checked(meta) -> dict:
    """``meta`` from a peer, if it is a well-formed record; else RemoteProtocolError (BAD_REQUEST).

    Only known keys of the right type and range: the record is stored in
    the namespace and sent back to every client that restores the file.
    """
    if not isinstance(meta, dict) or set(meta) - set(_FIELDS) or "type" not in meta:
        raise protocol.RemoteProtocolError(f"file metadata must be an object with keys among {sorted(_FIELDS)}")
    for key, value in meta.items():
        if type(value) is not _FIELDS[key]:
            raise protocol.RemoteProtocolError(f"file metadata {key!r} must be {_FIELDS[key].__name__}")
    if meta["type"] not in KINDS:
        raise protocol.RemoteProtocolError(f"file metadata type must be one of {', '.join(KINDS)}")
    if not 0 <= meta.get("mode", 0) <= 0o7777 or meta.get("uid", 0) < 0 or meta.get("gid", 0) < 0 \
            or not 0 <= meta.get("mtime_ns", 0) < 2 ** 63:
        raise protocol.RemoteProtocolError("file metadata mode, uid, gid or mtime_ns out of range")
    return dict(meta)


def kind_of(meta: dict | None) -> str:
    """The kind an entry restores as (FILE for entries stored without metadata)."""
    return (meta or {}).get("type", FILE)


def mtime_s(meta: dict) -> float | None:
    """The file's own modification time in seconds, if recorded."""
    return meta["mtime_ns"] / 1e9 if "mtime_ns" in meta else None


def apply(path: str, meta: dict | None, owners: bool = False) -> None:
    """Give ``path`` the owner (only with ``owners``, as root), mode and mtime of ``meta``.

    Never follows a symlink: a link gets its own mtime (and owner), not its
    target's; its mode cannot be set on Linux and is left alone.  The owner
    goes first, since chown clears the set-id bits that chmod then restores.
    Raises OSError.
    """
    if not meta:
        return
    link = kind_of(meta) == SYMLINK
    if owners and hasattr(os, "geteuid") and os.geteuid() == 0 and "uid" in meta:
        os.chown(path, meta["uid"], meta.get("gid", -1), follow_symlinks=False)
    if "mode" in meta and not link:
        os.chmod(path, meta["mode"])
    if "mtime_ns" in meta and (not link or os.utime in os.supports_follow_symlinks):
        os.utime(path, ns=(meta["mtime_ns"], meta["mtime_ns"]), follow_symlinks=not link)


def stamp(entry: dict, meta: dict | None) -> dict:
    """``entry`` carrying ``meta``, its modified time the file's own when recorded."""
    if not meta:
        return entry
    seconds = mtime_s(meta)
    return {**entry, "meta": meta, **({"mtime": round(seconds, 6)} if seconds is not None else {})}


def renewed(meta: dict | None, now_s: float) -> dict | None:
    """The metadata of a file written (append, write, touch) at ``now_s``: same kind and mode, new mtime."""
    if not meta:
        return None
    return {**meta, "mtime_ns": int(now_s * 1e9)} if "mtime_ns" in meta else meta
