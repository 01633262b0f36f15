"""A storage node's catalog: which files its blobs belong to, and its quarantine.

Job
---
Make a node self-describing (restic's packs, not HDFS's blocks): for every
blob it holds, the node keeps the description of the file version(s) the
blob belongs to -- name, version (blob id), size, chunk size, batch size,
SHA-256, mtime, layout ``[[first, count, blob], ...]`` (which blob holds
which chunks) and the commit's log index.  With these, and the chunk
store's extents, the master's namespace can be rebuilt from the nodes alone
(``master.py --recover-from-nodes``, recovery.py).  A description arrives
twice: before the commit (DESCRIBE, index 0: "uploaded, not known to be
committed") and after it (COMMIT_NOTES, with the commit's index).

The second job is the quarantine: blobs the namespace does not know are
marked, not erased, and erased only once ``orphan_grace_s`` has passed
(storage_node.py does the erasing), unless the master releases them.

Trade-off
---------
One append-only journal of JSON lines (``catalog.jsonl``), replayed at
start and rewritten whole (atomically) once it is mostly dead.  The catalog
costs memory per file version held, not per chunk.  Notes are fsynced
before they are acknowledged; descriptions ride on the FLUSH that follows
them; quarantine changes are fsynced at once.

Journal lines (one JSON object each)::

    {"op": "d", "items": [DESC, ...]}     descriptions (index 0) or
    {"op": "n", "items": [DESC, ...]}     commit notes (index > 0), or
                                          tombstones {"name", "deleted": true, "index"}
    {"op": "x", "versions": [V, ...]}     forget these descriptions
    {"op": "q", "blobs": [B, ...], "t": T} quarantine since unix time T
    {"op": "r", "blobs": [B, ...]}        out of quarantine (released or erased)

A torn last line (crash mid-append) is ignored and cut off.  Every note
whose blobs are held is kept: older versions of a name (history.py) are
described too.  A tombstone of a name is kept until a newer note of that
name arrives.  Left out: per-line checksums (a torn line fails to parse).
"""

from __future__ import annotations

import json
import logging
import os
import threading

import protocol
from metadata_log import atomic_write_json, fsync_dir

logger = logging.getLogger("storage_node.catalog")

CATALOG_FILE = "catalog.jsonl"
# Rewrite the journal once it is this many times larger than what is live
# (and at least COMPACT_MIN_BYTES): bounded disk, rare rewrites.
COMPACT_RATIO = 4
COMPACT_MIN_BYTES = 1024 * 1024
_MAX_ID = 64


def _is_blob_id(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID and value.isascii() and value.isprintable()


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def validate_item(item) -> dict:
    """``item`` if it is a well-formed file description or tombstone, else RemoteProtocolError."""
    if isinstance(item, dict) and item.get("deleted") is True:
        if isinstance(item.get("name"), str) and _is_count(item.get("index")) and item["index"] > 0 \
                and isinstance(item.get("trashed_at", 0), (int, float)):
            return item
        raise protocol.RemoteProtocolError("malformed tombstone")
    ok = (isinstance(item, dict) and isinstance(item.get("name"), str) and _is_blob_id(item.get("version"))
          and _is_count(item.get("size")) and _is_count(item.get("index"))
          and type(item.get("chunk_size")) is int and item["chunk_size"] > 0
          and type(item.get("batch_chunks")) is int and item["batch_chunks"] > 0
          and isinstance(item.get("sha256"), str) and isinstance(item.get("mtime"), (int, float))
          and isinstance(item.get("layout"), list))
    if ok:
        for run in item["layout"]:
            if not (isinstance(run, list) and len(run) == 3 and _is_count(run[0]) and _is_count(run[1])
                    and _is_blob_id(run[2])):
                ok = False
                break
    if not ok:
        raise protocol.RemoteProtocolError("malformed file description")
    return item


def blobs_of(item: dict) -> set[str]:
    """Blobs a description's chunks live in (its version's, for an empty file)."""
    return {run[2] for run in item["layout"]} or {item["version"]}


class NodeCatalog:
    """Descriptions and quarantine of one node, persisted in ``DATA_DIR/catalog.jsonl``.

    Thread-safe.  ``describe`` does not fsync (the FLUSH that follows does,
    through ``flush``); ``note``, ``quarantine`` and ``release`` do.
    """

    def __init__(self, data_dir: str, fsync=os.fsync):
        self.path = os.path.join(data_dir, CATALOG_FILE)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._desc: dict[str, dict] = {}          # version -> description
        self._by_blob: dict[str, set[str]] = {}   # blob -> versions whose layout uses it
        self._tombstones: dict[str, dict] = {}   # name -> its newest tombstone
        self._quarantine: dict[str, float] = {}   # blob -> unix time it was quarantined
        self._dirty = False
        self._journal_bytes = 0
        self._check_at = COMPACT_MIN_BYTES  # journal size at which to consider a rewrite
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    # --- start-up ---------------------------------------------------------------
    def _load(self) -> None:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            offset = 0
            while line := f.readline():
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("torn")
                    self._apply(json.loads(line))
                except (ValueError, KeyError, TypeError, protocol.RemoteProtocolError) as exc:
                    rest = line + f.read()
                    logger.warning("%s: unreadable line at byte %d (%s); cutting %d bytes",
                                   self.path, offset, exc, len(rest))
                    os.truncate(self.path, offset)
                    break
                offset += len(line)
        self._journal_bytes = offset

    def _apply(self, record: dict) -> None:
        op = record["op"]
        if op in ("d", "n"):
            for item in record["items"]:
                self._put(validate_item(item))
        elif op == "x":
            for version in record["versions"]:
                self._drop(version)
        elif op == "q":
            for blob in record["blobs"]:
                self._quarantine.setdefault(blob, float(record["t"]))
        elif op == "r":
            for blob in record["blobs"]:
                self._quarantine.pop(blob, None)
        else:
            raise ValueError(f"unknown op {op!r}")

    # --- the index (caller holds the lock) ----------------------------------------
    def _put(self, item: dict) -> None:
        name = item["name"]
        if item.get("deleted"):
            if item["index"] > self._tombstones.get(name, {"index": 0})["index"]:
                self._tombstones[name] = item
            return
        if item["index"] and self._tombstones.get(name, {"index": 0})["index"] < item["index"]:
            self._tombstones.pop(name, None)  # the name was stored (or undeleted) after its delete
        version = item["version"]
        old = self._desc.get(version)
        if old is not None and old["index"] > item["index"]:
            return  # a description never replaces the note of the same version
        if old is not None:
            self._unindex(old)
        self._desc[version] = item
        for blob in blobs_of(item):
            self._by_blob.setdefault(blob, set()).add(version)

    def _unindex(self, item: dict) -> None:
        for blob in blobs_of(item):
            versions = self._by_blob.get(blob)
            if versions is not None:
                versions.discard(item["version"])
                if not versions:
                    del self._by_blob[blob]

    def _drop(self, version: str) -> None:
        item = self._desc.pop(version, None)
        if item is not None:
            self._unindex(item)

    # --- the journal (caller holds the lock) --------------------------------------
    def _append(self, record: dict, sync: bool) -> None:
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._journal_bytes += len(data)
        self._dirty = True
        if sync:
            self._sync()

    def _sync(self) -> None:
        if self._dirty:
            self._fsync(self._fd)
            self._dirty = False

    def _maybe_compact(self) -> None:
        """Rewrite the journal as a snapshot once it is mostly dead."""
        if self._journal_bytes < self._check_at:
            return
        live = sum(len(json.dumps(item)) for item in self._desc.values()) + 40 * len(self._quarantine) \
            + sum(50 + len(name) for name in self._tombstones)
        if self._journal_bytes < COMPACT_RATIO * live:
            self._check_at = 2 * self._journal_bytes  # measuring costs O(catalog): not at every note
            return
        records = [{"op": "n" if item["index"] else "d", "items": [item]} for item in self._desc.values()]
        records += [{"op": "n", "items": [tombstone]} for tombstone in self._tombstones.values()]
        by_time: dict[float, list] = {}
        for blob, since in self._quarantine.items():
            by_time.setdefault(since, []).append(blob)
        records += [{"op": "q", "blobs": blobs, "t": since} for since, blobs in by_time.items()]
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
            f.flush()
            self._fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)), self._fsync)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._journal_bytes, self._dirty = size, False
        self._check_at = max(COMPACT_MIN_BYTES, 2 * size)
        logger.info("%s: rewritten, %d descriptions, %d quarantined blobs", self.path, len(self._desc),
                    len(self._quarantine))

    # --- descriptions ------------------------------------------------------------------
    def describe(self, items: list) -> int:
        """Record descriptions of uploaded, not yet committed files; durable at the next ``flush``."""
        items = [validate_item(item) for item in items]
        with self._lock:
            for item in items:
                self._put(item)
            self._append({"op": "d", "items": items}, sync=False)
        return len(items)

    def note(self, items: list) -> int:
        """Record commit notes (index > 0), durably."""
        items = [validate_item(item) for item in items]
        if any(not item["index"] for item in items):
            raise protocol.RemoteProtocolError("a commit note needs the commit's index")
        with self._lock:
            for item in items:
                self._put(item)
            self._append({"op": "n", "items": items}, sync=True)
            self._maybe_compact()
        return len(items)

    def flush(self) -> None:
        with self._lock:
            self._sync()

    def forget_blobs(self, blobs, held) -> None:
        """Blobs were erased from the store: drop their quarantine marks and the
        descriptions none of whose blobs ``held(blob)`` any more.  Durable at the next ``flush``."""
        with self._lock:
            versions = set()
            for blob in blobs:
                versions |= self._by_blob.get(blob, set())
            gone = sorted(v for v in versions if not any(held(b) for b in blobs_of(self._desc[v])))
            unmarked = [blob for blob in blobs if blob in self._quarantine]
            for version in gone:
                self._drop(version)
            for blob in unmarked:
                del self._quarantine[blob]
            if gone:
                self._append({"op": "x", "versions": gone}, sync=False)
            if unmarked:
                self._append({"op": "r", "blobs": unmarked}, sync=False)

    def prune(self, held) -> int:
        """Forget descriptions none of whose blobs ``held`` (e.g. erased before a crash); return how many."""
        with self._lock:
            gone = sorted(v for v, item in self._desc.items()
                          if item["layout"] and not any(held(b) for b in blobs_of(item)))
            lost_marks = [blob for blob in self._quarantine if not held(blob)]
            for version in gone:
                self._drop(version)
            for blob in lost_marks:
                del self._quarantine[blob]
            if gone:
                self._append({"op": "x", "versions": gone}, sync=False)
            if lost_marks:
                self._append({"op": "r", "blobs": lost_marks}, sync=False)
            self._sync()
        return len(gone)

    def descriptions(self) -> list[dict]:
        """Every description and tombstone held (items shared: never mutate them)."""
        with self._lock:
            return list(self._desc.values()) + list(self._tombstones.values())

    # --- quarantine -------------------------------------------------------------------
    def quarantine(self, blobs: list, now: float) -> list:
        """Mark blobs as quarantined since ``now`` (already marked ones keep their time); durable."""
        with self._lock:
            new = [blob for blob in dict.fromkeys(blobs) if blob not in self._quarantine]
            if new:
                for blob in new:
                    self._quarantine[blob] = now
                self._append({"op": "q", "blobs": new, "t": now}, sync=True)
            return new

    def release(self, blobs: list) -> list:
        """Take blobs out of quarantine; durable.  Returns those that were in it."""
        with self._lock:
            released = [blob for blob in dict.fromkeys(blobs) if blob in self._quarantine]
            if released:
                for blob in released:
                    del self._quarantine[blob]
                self._append({"op": "r", "blobs": released}, sync=True)
            return released

    def quarantined(self) -> set[str]:
        with self._lock:
            return set(self._quarantine)

    def expired(self, now: float, grace_s: float) -> list[str]:
        """Quarantined blobs whose grace period is over."""
        with self._lock:
            return [blob for blob, since in self._quarantine.items() if since + grace_s <= now]

    def close(self) -> None:
        with self._lock:
            self._sync()
            os.close(self._fd)
