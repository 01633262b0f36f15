"""Copies of the master's checkpoint kept in the cluster itself.

Job
---
Every ``meta_backup_interval_s`` (if anything changed) and at a clean
shutdown, the master stores its checkpoint -- the namespace snapshot, its
log index, cluster id and epoch, as zlib-compressed JSON -- as a *system
blob* on at least two nodes (``replication`` if larger).  With the commit
notes (notes.py) this is what ``master.py --recover-from-nodes``
(recovery.py) rebuilds a lost metadata dir from: the newest readable copy,
plus every commit the nodes describe after it.

System blobs are named ``meta-<index, 12 digits>-<8 hex>``.  They are never
orphans: reconciliation reports them here (``seen``) instead of to the
quarantine, and only the KEEP newest are kept; older ones are collected
like deleted files.  Each copy is described to its node (DESCRIBE, a
description with ``"system": "meta"``) so a recovery can verify it (size,
SHA-256) before trusting it.

Trade-off: a copy is the whole namespace (kilobytes per thousand files,
compressed), written to two nodes in 64 KiB chunks; between two copies
only the commit notes describe what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
import zlib

import protocol

logger = logging.getLogger("master.meta_backup")

BLOB_PREFIX = "meta-"
_BLOB_ID = re.compile(r"^meta-(\d{12})-[0-9a-f]{8}$")
CHUNK_BYTES = 64 * 1024
FORMAT = 1
KEEP = 2  # newest copies kept; a damaged newest one still leaves an older one
MIN_COPIES = 2


def blob_id(index: int) -> str:
    return f"{BLOB_PREFIX}{index:012d}-{uuid.uuid4().hex[:8]}"


def is_backup(blob: str) -> bool:
    return blob.startswith(BLOB_PREFIX)


def index_of(blob: str) -> int | None:
    """The log index a backup blob covers, or None if ``blob`` is not one."""
    m = _BLOB_ID.match(blob)
    return int(m.group(1)) if m else None


def encode(index: int, state: dict, cluster_id: str, epoch: int) -> bytes:
    doc = {"format": FORMAT, "index": index, "cluster_id": cluster_id, "epoch": epoch, "state": state}
    return zlib.compress(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), 6)


def decode(data: bytes) -> dict:
    """The document ``encode`` made; ValueError if it is not one."""
    try:
        doc = json.loads(zlib.decompress(data))
    except (zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a metadata backup: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or type(doc.get("index")) is not int \
            or not isinstance(doc.get("state"), dict):
        raise ValueError("not a format 1 metadata backup")
    return doc


def description(blob: str, data: bytes, index: int, cluster_id: str, epoch: int, batch_chunks: int) -> dict:
    chunks = -(-len(data) // CHUNK_BYTES)
    return {"name": "", "system": "meta", "version": blob, "size": len(data), "chunk_size": CHUNK_BYTES,
            "batch_chunks": batch_chunks, "sha256": hashlib.sha256(data).hexdigest(), "mtime": round(time.time(), 3),
            "layout": [[0, chunks, blob]] if chunks else [], "index": index, "cluster_id": cluster_id,
            "epoch": epoch}


class MetaBackup:
    """Writes checkpoint copies to nodes, and keeps the KEEP newest of them."""

    def __init__(self, master):
        self.master = master
        self.config = master.config
        self.batch_chunks = max(1, self.config.batch_bytes // CHUNK_BYTES)
        self._lock = threading.Lock()  # one backup at a time
        self._known_lock = threading.Lock()
        self._known: dict[str, set[str]] = {}  # backup blob -> nodes holding it
        self.last_index = -1
        self.last_time: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meta-backup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer and write a last copy if anything changed (clean shutdown)."""
        self._stop.set()
        try:
            self.backup()
        except Exception:
            logger.exception("metadata backup at shutdown failed")

    def _run(self) -> None:
        while not self._stop.wait(self.config.meta_backup_interval_s):
            try:
                self.backup()
            except Exception:
                logger.exception("metadata backup failed; retrying at the next interval")

    def backup(self, force: bool = False) -> bool:
        """Store the current checkpoint on MIN_COPIES nodes (if it changed); True if stored."""
        master = self.master
        if not master.is_leader():
            return False  # a follower of a replicated group: the leader keeps the copies
        with self._lock:
            index, state = master.log.snapshot()
            if index == self.last_index and not force:
                return False
            data = encode(index, state, master.namespace.cluster_id, master.namespace.epoch)
            blob = blob_id(index)
            desc = description(blob, data, index, master.namespace.cluster_id, master.namespace.epoch,
                               self.batch_chunks)
            wanted = max(MIN_COPIES, self.config.replication)
            stored = []
            for node in sorted(master.live_nodes(), key=lambda n: n.free_bytes, reverse=True):
                if len(stored) == wanted:
                    break
                if not node.reported or node.full:
                    continue
                try:
                    self._write(node.node_id, blob, data, desc)
                    stored.append(node.node_id)
                except protocol.BackupError as exc:
                    logger.warning("metadata backup to node %s failed: %s", node.node_id, exc)
            if not stored:
                logger.warning("metadata backup at index %d not stored: no node took it", index)
                return False
            if len(stored) < wanted:
                logger.warning("metadata backup at index %d stored on %d node(s) only", index, len(stored))
            self.last_index, self.last_time = index, time.time()
        logger.info("metadata backup at index %d (%d bytes) stored on %s", index, len(data), ",".join(stored))
        for node_id in stored:
            self.seen(node_id, blob)
        return True

    def _write(self, node_id: str, blob: str, data: bytes, desc: dict) -> None:
        write_system_blob(self.master, node_id, blob, data, self.batch_chunks, desc)

    def seen(self, node_id: str, blob: str) -> None:
        """``node_id`` holds backup ``blob``: remember it, and collect copies older than the KEEP newest."""
        if index_of(blob) is None:
            return
        with self._known_lock:
            self._known.setdefault(blob, set()).add(node_id)
            newest = sorted(self._known, key=index_of, reverse=True)
            old = {b: self._known.pop(b) for b in newest[KEEP:]}
        for stale, nodes in old.items():
            self.master.collect_garbage(stale, nodes)

    def status(self) -> dict:
        return {"meta_backup_index": self.last_index if self.last_index >= 0 else None,
                "meta_backup_age_s": None if self.last_time is None else round(time.time() - self.last_time, 1)}


def write_system_blob(master, node_id: str, blob: str, data: bytes, batch_chunks: int,
                      desc: dict | None = None) -> None:
    """Store ``data`` as ``blob`` on ``node_id`` in CHUNK_BYTES chunks, describe it (if ``desc``), fsync.

    Shared by the checkpoint copies here and snapshot manifests (snapshots.py).
    """
    fence = master.fence()
    conn = master.pool.acquire(node_id)
    try:
        step = CHUNK_BYTES * batch_chunks
        for start in range(0, len(data), step):
            payload = data[start:start + step]
            crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(payload, CHUNK_BYTES))
            count = len(crcs) // protocol.CRC_BYTES
            conn.request(protocol.PutChunks(blob=blob, first=start // CHUNK_BYTES, count=count,
                                            chunk_size=CHUNK_BYTES, body=crcs + payload, **fence), protocol.PutOk)
        if desc is not None:
            conn.request(protocol.Describe(items=[desc], **fence), protocol.Described)
        conn.request(protocol.Flush(), protocol.Flushed)
    finally:
        master.pool.release(conn)
