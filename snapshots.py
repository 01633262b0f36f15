"""Tree snapshots: what one backup run of a directory recorded, and which versions it keeps.

Pure functions (no clock, no I/O): the namespace calls ``pins`` from its
deterministic ``apply``, the master encodes and decodes manifests with them,
the client classifies local files and compares snapshots with them.

The model
---------
A *snapshot* is a tree as one ``upload DIR NAME`` saw it: ``root`` (NAME),
``t`` (when), file count, bytes, and the member list (name relative to root
-> version id, with the size, SHA-256 and file metadata of that version).
The member list is a *system object*: a zlib-compressed JSON-lines
*manifest* the master writes to ``replication`` nodes like a file (a blob
of 64 KiB chunks with CRCs, repaired and reconciled as any file version is),
while the metadata log records only a small ``snapshot`` record: the
counts, the manifest's file entry (one run of chunks on its nodes) and the
pins below.  So a snapshot of 100,000 files costs the log and the
checkpoint a few hundred bytes, whatever the tree's size.

Pins without reading manifests
------------------------------
Versions a snapshot references must outlive ``keep_versions`` trimming,
trash expiry and purges until the snapshot is forgotten.  The master must
know them at every apply (also after a restart) without reading a single
manifest, so a pin is derivable from the log alone:

* Every entry records ``superseded``: the log index of the put or delete
  that stopped it being current (absent while it is current).
* A snapshot record carries ``i`` (its own log index, the snapshot id) and
  ``since`` (the master's applied index when it started resolving the
  members).  Each member that was current when resolved was current at some
  index in [since, i]; the rule is therefore

      an entry of a name under ``root/`` with commit_index <= i and
      superseded > since (or none) is pinned by the snapshot.

* A member that was *not* current when resolved (an unchanged file whose
  name was written since by someone else, say) is listed explicitly in the
  record's ``pins`` ([name, version id]); usually none are.

The rule over-approximates: a version of a name under root that is not a
member (the local file was gone, or was excluded) but was current in
[since, i] is kept too.  It never under-approximates, which is the side a
backup must err on.  Entries dropped by retention while pinned move to the
namespace's ``pinned`` table (the "snapshots-only" space in ``status``);
forgetting a snapshot re-checks that table and frees what no snapshot pins.

Left out: a snapshot does not pin the names' *trash state*: restoring a
snapshot reads the pinned versions wherever they are kept (current,
older, trash or pinned), by version id.
"""

from __future__ import annotations

import fnmatch
import json
import zlib

FORMAT = 1
# Most members one snapshot may have: the master holds the member list in
# memory while it records the snapshot (about 200 bytes each).
MAX_MEMBERS = 5_000_000
# Chunk size of manifest blobs (as metadata backups, meta_backup.py).
CHUNK_BYTES = 64 * 1024
# Name under which a snapshot's manifest entry appears to repair and
# reconciliation (Namespace.all_entries): NUL never occurs in a file name.
_MANIFEST_NAME = "\x00snapshot "


def manifest_name(snapshot_id: int) -> str:
    return f"{_MANIFEST_NAME}{snapshot_id}"


def manifest_id(name: str) -> int | None:
    """The snapshot id a manifest pseudo-name stands for, or None for a file name."""
    if not name.startswith(_MANIFEST_NAME):
        return None
    try:
        return int(name[len(_MANIFEST_NAME):])
    except ValueError:
        return None


def under(root: str, name: str) -> bool:
    """True if ``name`` is a file of the tree ``root`` (``root/...``)."""
    return name.startswith(root + "/")


def pins(snapshot: dict, name: str, entry: dict, explicit=frozenset()) -> bool:
    """True if ``snapshot`` (a record as applied, with ``i``) keeps ``entry`` of ``name``; see the module docstring.

    ``explicit``: the record's ``pins`` as a set of (name, version id) (the
    namespace keeps one per snapshot, so the check is O(1)).
    """
    if not under(snapshot["root"], name):
        return False
    vid = entry.get("commit_index", 0)
    if (name, vid) in explicit:
        return True
    return vid <= snapshot["i"] and entry.get("superseded", float("inf")) > snapshot["since"]


def info(snapshot: dict) -> dict:
    """What ``snapshots`` lists of one snapshot."""
    return {"id": snapshot["i"], "time": snapshot["t"], "root": snapshot["root"], "files": snapshot["files"],
            "bytes": snapshot["bytes"], "pins": len(snapshot.get("pins", ()))}


# --- manifests ------------------------------------------------------------------------
def member_line(relative: str, entry: dict) -> dict:
    """A manifest line: a member and what its version is (trusted: from the master's entry)."""
    line = {"n": relative, "v": entry.get("commit_index", 0), "s": entry["size"], "h": entry["sha256"]}
    if entry.get("meta"):
        line["m"] = entry["meta"]
    return line


# Compact UTF-8 JSON, as protocol.py writes frame headers: a manifest line's
# length then bounds the size of its member document in a reply page.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_manifest(root: str, lines: list[dict]) -> bytes:
    """The manifest blob: a header line then one JSON line per member, zlib-compressed."""
    text = "\n".join([_ENCODER.encode({"format": FORMAT, "root": root, "files": len(lines)}),
                      *map(_ENCODER.encode, lines)])
    return zlib.compress(text.encode("utf-8"), 6)


def decode_manifest(pieces) -> tuple[dict, list[dict], list[int]]:
    """(header, member lines, each line's bytes) of a manifest given as byte pieces; ValueError if malformed."""
    unpacker = zlib.decompressobj()
    text = bytearray()
    try:
        for piece in pieces:
            text += unpacker.decompress(piece)
        text += unpacker.flush()
        # Without empty lines: manifests written before this layout end with a newline.
        rows = [row for row in bytes(text).split(b"\n") if row]
        # One parse of the whole list: a json.loads per line costs twice as much.
        parsed = json.loads(b"[" + b",".join(rows) + b"]")
    except (zlib.error, ValueError) as exc:
        raise ValueError(f"not a snapshot manifest: {exc}") from None
    if not parsed or not isinstance(parsed[0], dict) or parsed[0].get("format") != FORMAT:
        raise ValueError("not a format 1 snapshot manifest")
    return parsed[0], parsed[1:], [len(row) for row in rows[1:]]


def member_document(root: str, line: dict) -> dict:
    """A manifest line as SNAPSHOT_MEMBERS sends it: full name, version id, size, SHA-256, metadata."""
    return {"name": f"{root}/{line['n']}", "version": line["v"], "size": line["s"], "sha256": line["h"],
            "meta": line.get("m")}


def document_bytes_bound(root: str, line_bytes: int) -> int:
    """At most the JSON bytes of member_document for a manifest line of ``line_bytes`` (for paging
    without encoding every document twice): the line, the root, longer keys and ``"meta":null``."""
    return line_bytes + len(root.encode("utf-8")) + 1 + 40


# --- comparisons ----------------------------------------------------------------------
ADDED, REMOVED, CHANGED = "added", "removed", "changed"


def _kind(member: dict) -> str:
    return (member.get("meta") or {}).get("type", "file")


def diff(old: list[dict], new: list[dict]) -> list[tuple[str, str]]:
    """(change, name) between two member lists, sorted by name.

    Changed: a different kind, size or SHA-256.  A new version with the same
    content (a touch, a re-upload) is not a change; nor is a metadata-only
    change (mode, mtime), which ``diff`` does not report.
    """
    before = {m["name"]: m for m in old}
    after = {m["name"]: m for m in new}
    found = []
    for name in sorted(set(before) | set(after)):
        if name not in before:
            found.append((ADDED, name))
        elif name not in after:
            found.append((REMOVED, name))
        else:
            a, b = before[name], after[name]
            if (_kind(a), a["size"], a["sha256"]) != (_kind(b), b["size"], b["sha256"]):
                found.append((CHANGED, name))
    return found


def unchanged(member: dict | None, kind: str, size: int, mode: int, mtime_ns: int) -> bool:
    """True if a local file (kind, size, permission bits, mtime in ns) is what ``member`` recorded.

    An incremental run sends the file again unless all four agree (with
    ``--check-content`` the caller also compares SHA-256).  A member stored
    without metadata never matches: its mtime is unknown.
    """
    meta = (member or {}).get("meta")
    if not meta or "mtime_ns" not in meta:
        return False
    return (_kind(member), member["size"], meta.get("mode"), meta["mtime_ns"]) == (kind, size, mode, mtime_ns)


def excluded(relative: str, patterns: list[str]) -> bool:
    """True if ``relative`` (a path with '/') matches an ``--exclude`` glob.

    A pattern with a '/' is matched against the whole relative path; one
    without against each path component, so ``--exclude '*.tmp'`` skips
    such files anywhere and ``--exclude cache`` skips every ``cache``
    directory with all below it.
    """
    parts = relative.split("/")
    for pattern in patterns:
        if "/" in pattern.strip("/"):
            path_pattern = pattern.strip("/")
            if fnmatch.fnmatchcase(relative, path_pattern) or fnmatch.fnmatchcase(relative, path_pattern + "/*"):
                return True
        elif any(fnmatch.fnmatchcase(part, pattern.strip("/")) for part in parts):
            return True
    return False


def read_exclude_file(text: str) -> list[str]:
    """Patterns of an ``--exclude-file``: one per line; blank lines and lines starting with # ignored."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
