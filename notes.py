"""Commit notes: the master tells the nodes which files their blobs belong to.

Job
---
Keep every node self-describing (node_catalog.py) so that the namespace can
be rebuilt from the nodes alone (recovery.py).  Two messages carry a file's
description (``describe``):

* DESCRIBE, before the commit, pipelined with the FLUSH that makes an
  upload durable (transfers.UploadSession.sync): "these blobs form file N,
  not yet known to be committed" (index 0).  A master killed between the
  FLUSH and its log commit leaves a complete, described upload that a
  recovery puts under ``lost+found/`` instead of guessing.
* COMMIT_NOTES, after the commit, batched and in the background
  (``NoteSender``): the same description with the commit's log index, sent
  to every node that holds a run of the file (for an empty file, to
  ``replication`` live nodes), and to a node that receives a repair copy.
  A delete sends a tombstone ``{"name", "deleted": true, "index"}`` the
  same way, so a recovery does not revive the name from an older backup.

A note that never arrives (master killed, node down for good) costs
nothing but a weaker recovery: the checkpoint copies in the cluster
(meta_backup.py) and ``lost+found/`` cover it.  Notes are kept in memory
only, at most MAX_PENDING_PER_NODE per node.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque

import protocol
from namespace import run_blob

logger = logging.getLogger("master.notes")

# Seconds between retries of notes to a node that did not take them.
_RETRY_S = 5.0
# Notes waiting for one node beyond this are dropped (oldest first): a node
# gone for good must not make the master grow without bound.
MAX_PENDING_PER_NODE = 100_000


def describe(name: str, entry: dict, index: int = 0) -> dict:
    """The description of a file version that nodes keep (node_catalog.validate_item's format).

    ``index`` orders descriptions of a name (the log index of the commit, or
    of the undelete that made the entry current again); the entry's own
    ``commit_index`` (its version id) and ``committed_at`` travel with it.
    """
    item = {"name": name, "version": entry["version"], "size": entry["size"], "chunk_size": entry["chunk_size"],
            "batch_chunks": entry["batch_chunks"], "sha256": entry["sha256"], "mtime": entry["mtime"],
            "layout": [[run[0], run[1], run_blob(entry, run)] for run in entry["runs"]], "index": index}
    for key in ("commit_index", "committed_at"):
        if key in entry:
            item[key] = entry[key]
    return item


# Bytes of JSON a description takes besides its name, version, SHA-256 and
# layout: its eleven keys with quotes, colons and commas (~16 each), and six
# numbers of at most 25 characters each (a float's repr, an integer < 2**64).
_DESCRIPTION_OTHER_BYTES = 11 * 16 + 6 * 25
# Descriptions with more runs than this are measured exactly (rare: a file
# written in many pieces); below it the bound is far under a page.
_BOUND_MAX_RUNS = 64


def note_size(item: dict) -> int:
    """At least the JSON bytes of a note (what ``protocol.json_size`` gives), without encoding it.

    Each committed file's description is measured several times (for a
    page of DESCRIBE before the FLUSH, for a page of COMMIT_NOTES per node,
    and whether it fits a page at all); encoding it each time cost the
    master ~4 µs a time, a third of its CPU in an upload of small files.
    A description's shape is fixed (``describe``), so its size is bounded
    from the lengths of its strings; pages cut with the bound are at most
    a little less full.  Other notes (tombstones) are measured exactly.
    """
    layout = item.get("layout")
    if layout is None or len(layout) > _BOUND_MAX_RUNS or len(item) > 11:
        return protocol.json_size(item)
    size = protocol.json_size
    return (_DESCRIPTION_OTHER_BYTES + size(item["name"]) + size(item["version"]) + size(item["sha256"])
            + sum(size(run[2]) + 2 * 25 + 4 for run in layout))


def fits_a_page(item: dict) -> bool:
    """False for a description too large for any frame (a file written in thousands of pieces)."""
    return note_size(item) + 3 <= protocol.PAGE_BYTES  # the array's brackets and a comma


def entry_nodes(entry: dict) -> set[str]:
    return {node_id for run in entry["runs"] for node_id in run[2]}


class NoteSender:
    """Delivers commit notes to nodes in the background, batched per node, in order."""

    def __init__(self, master):
        self.master = master
        self._cond = threading.Condition()
        self._pending: dict[str, deque] = defaultdict(deque)
        self._stop = threading.Event()
        self._dropped_warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="notes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def committed(self, files: list[tuple[str, dict]], index: int | None = None) -> None:
        """Queue notes for just committed files: (name, entry as applied, with its commit_index).

        ``index``: the log index of the record that made them current when it
        is not their put (an undelete).
        """
        for name, entry in files:
            if not (index or entry.get("commit_index")):
                continue  # not from the log (cannot happen for a commit; a note needs its index)
            nodes = entry_nodes(entry)
            if not nodes:  # an empty file: no chunks, but it must be described somewhere
                try:
                    nodes = set(self.master.choose_replicas(0))
                except protocol.BackupError:
                    continue
            self.send(nodes, describe(name, entry, index or entry["commit_index"]))

    def deleted(self, name: str, entries: list[dict], index: int, trashed_at: float | None = None) -> None:
        """A tombstone for the nodes that held ``name``: a recovery must not bring it back from an older
        metadata backup.  ``trashed_at``: the delete moved it to the trash then (a recovery puts it there)."""
        nodes = set().union(*(entry_nodes(entry) for entry in entries))
        if not nodes:
            try:
                nodes = set(self.master.choose_replicas(0))
            except protocol.BackupError:
                return
        tombstone = {"name": name, "deleted": True, "index": index}
        if trashed_at is not None:
            tombstone["trashed_at"] = trashed_at
        self.send(nodes, tombstone)

    def copied(self, name: str, node_ids) -> None:
        """A repair put a copy of ``name`` on ``node_ids``: describe the file to them too."""
        entry = self.master.namespace.files.get(name)
        if entry is not None and entry.get("commit_index"):
            self.send(node_ids, describe(name, entry, entry["commit_index"]))

    def send(self, node_ids, note: dict) -> None:
        if not fits_a_page(note):
            logger.warning("description of %r is too large for a note; only the metadata backups keep it",
                           note["name"])
            return
        with self._cond:
            for node_id in node_ids:
                queue = self._pending[node_id]
                queue.append(note)
                if len(queue) > MAX_PENDING_PER_NODE:
                    queue.popleft()
                    if node_id not in self._dropped_warned:
                        self._dropped_warned.add(node_id)
                        logger.warning("node %s takes no commit notes; dropping the oldest (metadata backups "
                                       "still describe those files)", node_id)
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._pending.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not any(self._pending.values()) and not self._stop.is_set():
                    self._cond.wait()
                work = {node_id: list(queue) for node_id, queue in self._pending.items() if queue}
            failed = False
            for node_id, notes in work.items():
                try:
                    self._deliver(node_id, notes)
                except protocol.BackupError as exc:
                    logger.debug("commit notes for node %s deferred: %s", node_id, exc)
                    failed = True
                    continue
                except Exception:
                    logger.exception("sending commit notes to node %s failed", node_id)
                    failed = True
                    continue
                with self._cond:
                    queue = self._pending[node_id]
                    for _ in range(min(len(notes), len(queue))):
                        queue.popleft()
                    self._dropped_warned.discard(node_id)
            if failed:
                self._stop.wait(_RETRY_S)

    def _deliver(self, node_id: str, notes: list) -> None:
        master = self.master
        conn = master.pool.acquire(node_id)
        try:
            pages = [page for page, _ in protocol.pages(notes, size=note_size)]
            for page in pages:
                conn.send(protocol.CommitNotes(notes=page, **master.fence()), flush=False)
            conn.flush()
            for _ in pages:
                conn.expect(protocol.NotesStored)
        finally:
            master.pool.release(conn)
