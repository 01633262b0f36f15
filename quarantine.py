"""What the master does with blobs its namespace does not know: quarantine, never erase.

Job
---
Reconciliation (repair.py) finds *orphans* on a node: blobs no committed
file and no upload in progress uses.  Most are the leftovers of a crash.
But a master whose metadata is wrong (restored from an old copy, or a bug)
sees the same thing, and erasing would destroy the only copies.  So:

* Orphans are **quarantined** on their node (QUARANTINE): marked, not
  copied, not erased.  The node erases them only after ``orphan_grace_s``
  (default 7 days; node_catalog.py, storage_node.py), unless released first.
* **Release**: a quarantined blob that the namespace knows again (metadata
  restored, a recovery) is taken out of quarantine (RELEASE) at the node's
  next reconciliation.
* **The brake**: if one reconciliation would quarantine more than
  ``orphan_brake_fraction`` of a node's chunks, nothing is quarantined, an
  error is logged and ``status`` warns, until an operator who has checked
  the master's metadata runs ``client.py reclaim-orphans NODE_ID --yes``.

Deleted and replaced files never come here: their blobs are known to the
master when it drops them (master.py garbage collection), and a copy that
a node away at the time reports later is deleted too while the master
remembers the blob (``Master.was_dropped``; after a restart it is an orphan).  The brake
measures chunks, the unit inventories report, as a stand-in for bytes.
"""

from __future__ import annotations

import logging
import threading
import time

import protocol

logger = logging.getLogger("master.quarantine")


class OrphanKeeper:
    """Quarantine, release and the brake, for one master."""

    def __init__(self, master):
        self.master = master
        self.config = master.config
        self._lock = threading.Lock()
        # node_id -> orphans held back by the brake: {"blobs": {blob: chunks}, "node_chunks", "since"}
        self._braked: dict[str, dict] = {}

    def reconcile(self, node_id: str, orphans: dict[str, int], node_chunks: int, known_again: list) -> None:
        """Act on one node's reconciliation: ``orphans`` (blob -> chunks) not yet quarantined,
        ``node_chunks`` its chunks in all, ``known_again`` quarantined blobs the namespace uses."""
        if known_again:
            count = self._request(node_id, protocol.Release(blobs=known_again, **self.master.fence()),
                                  protocol.Released).count
            logger.warning("node %s: released %d blob(s) from quarantine: the namespace knows them again",
                           node_id, count)
        if not orphans:
            with self._lock:
                if self._braked.pop(node_id, None) is not None:
                    logger.warning("node %s: brake released, no orphans left", node_id)
            return
        chunks = sum(orphans.values())
        limit = self.config.orphan_brake_fraction * node_chunks
        if chunks > limit:
            with self._lock:
                before = self._braked.get(node_id)
                self._braked[node_id] = {"blobs": dict(orphans), "node_chunks": node_chunks,
                                         "since": before["since"] if before else time.time()}
            if before is None or set(before["blobs"]) != set(orphans):
                logger.error("node %s: BRAKE: reconciliation would quarantine %d blob(s), %d of its %d chunks "
                             "(%.0f%%, more than orphan_brake_fraction %.2f); quarantined nothing.  If the "
                             "master's metadata is right, run: client.py reclaim-orphans %s --yes",
                             node_id, len(orphans), chunks, node_chunks, 100.0 * chunks / max(node_chunks, 1),
                             self.config.orphan_brake_fraction, node_id)
            return
        with self._lock:
            self._braked.pop(node_id, None)
        self._quarantine(node_id, sorted(orphans), chunks)

    def reclaim(self, node_id: str) -> tuple[int, int]:
        """The operator's go-ahead: quarantine what the brake held back on ``node_id``; (blobs, chunks)."""
        with self._lock:
            braked = self._braked.pop(node_id, None)
        if braked is None:
            return 0, 0
        still = self.master.unknown_blobs(braked["blobs"])
        chunks = sum(braked["blobs"][blob] for blob in still)
        try:
            self._quarantine(node_id, still, chunks, by_operator=True)
        except protocol.BackupError:
            with self._lock:
                self._braked.setdefault(node_id, braked)
            raise
        return len(still), chunks

    def _quarantine(self, node_id: str, blobs: list, chunks: int, by_operator: bool = False) -> None:
        if not blobs:
            return
        reply = self._request(node_id, protocol.Quarantine(blobs=blobs, **self.master.fence()), protocol.Quarantined)
        logger.warning("node %s: quarantined %d orphan blob(s), %d chunks, %d bytes%s; erased after "
                       "orphan_grace_s unless the namespace claims them", node_id, reply.count, chunks, reply.bytes,
                       " (operator's reclaim-orphans)" if by_operator else "")

    def _request(self, node_id: str, msg, reply_cls):
        master = self.master
        conn = master.pool.acquire(node_id)
        try:
            return conn.request(msg, reply_cls)
        finally:
            master.pool.release(conn)

    def is_braked(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._braked

    def warnings(self) -> list[str]:
        with self._lock:
            braked = sorted(self._braked.items())
        return [f"brake on node {node_id}: {len(b['blobs'])} orphan blob(s), {sum(b['blobs'].values())} of "
                f"{b['node_chunks']} chunks, NOT quarantined; if the metadata is right run "
                f"`client.py reclaim-orphans {node_id} --yes`" for node_id, b in braked]
