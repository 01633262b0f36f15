"""A node's trust in masters: cluster identity and the fencing epoch.

Job
---
Keep a wrong or stale master from destroying a node's data.  Two facts,
persisted in ``node.json`` beside the node id, decide whom a node obeys:

* **cluster id** -- the random id of the cluster the node first joined (the
  master creates it when it initialises an empty data dir).  A fresh node
  joins the first master it registers with; from then on a master with
  another id (one started on an empty or wrong data dir) is refused, and the
  node keeps every byte it holds.
* **epoch** -- the highest master epoch the node has seen.  A master's epoch
  goes up at every start (and will be the Raft term once masters are
  replicated); every master->node request that writes, drops or deletes
  carries it, and the node refuses a lower one with STALE_MASTER, so a
  master that was replaced can no longer change anything.

A new, higher epoch is written to disk (atomically, fsynced) before the
request that carried it is served: after a crash the node still refuses the
older master.

Left out: signatures.  The fence stops mistakes and stale processes; an
attacker is kept out by the shared secret (security.py), not by this.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid

import protocol
from metadata_log import atomic_write_json

logger = logging.getLogger("storage_node.fencing")

IDENTITY_FILE = "node.json"


class NodeIdentity:
    """node id, cluster id and highest epoch seen, kept in ``DATA_DIR/node.json``.

    ``check(cluster_id, epoch)`` guards every destructive request;
    ``check_master(cluster_id, epoch)`` guards registration and adopts the
    cluster of the first master.  Thread-safe.
    """

    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, IDENTITY_FILE)
        self._lock = threading.Lock()
        try:
            with open(self.path, encoding="utf-8") as f:
                saved = json.load(f)
        except FileNotFoundError:
            saved = {"node_id": uuid.uuid4().hex[:12]}
            atomic_write_json(self.path, saved)
        self.node_id: str = saved["node_id"]
        self.cluster_id: str | None = saved.get("cluster_id") or None
        self.epoch: int = int(saved.get("epoch", 0))

    def _save(self) -> None:
        state = {"node_id": self.node_id, "epoch": self.epoch}
        if self.cluster_id:
            state["cluster_id"] = self.cluster_id
        atomic_write_json(self.path, state)

    def check(self, cluster_id: str, epoch: int, what: str = "request") -> None:
        """Raise WrongCluster or StaleMaster unless a master with this fence may change our data.

        A higher epoch becomes the new floor (durably) before returning.  A
        node that has joined no cluster yet accepts any cluster id: it has
        nothing of anyone's to protect.
        """
        with self._lock:
            if self.cluster_id is not None and cluster_id != self.cluster_id:
                raise protocol.WrongCluster(
                    f"node {self.node_id} belongs to cluster {self.cluster_id}; refusing {what} from a master "
                    f"of cluster {cluster_id or '(none)'}")
            if epoch < self.epoch:
                # Said at WARNING: a deposed master still acting (woken from a pause, cut off) is
                # what this fence exists for, and an operator (and the nemesis test) should see it.
                logger.warning("refused %s from a stale master (epoch %d; this node has seen epoch %d)",
                               what, epoch, self.epoch)
                raise protocol.StaleMaster(
                    f"node {self.node_id} has seen master epoch {self.epoch}; refusing {what} from a master "
                    f"at epoch {epoch}")
            if epoch > self.epoch:
                self.epoch = epoch
                self._save()

    def check_master(self, cluster_id: str, epoch: int, holds_data: bool) -> bool:
        """Vet a master at registration; True if it is one we serve (and may write).

        ``cluster_id`` "" is a master recovering its metadata: we report to
        it (reads only) and adopt nothing.  A node without a cluster id joins
        this one.  Raises WrongCluster or StaleMaster for a master we refuse.
        """
        if not cluster_id:
            return False
        with self._lock:
            if self.cluster_id is None:
                self.cluster_id = cluster_id
                self.epoch = max(self.epoch, epoch)
                self._save()
                if holds_data:
                    # Data from a version without cluster ids: nothing tells
                    # us whose it is, so it goes with the first master.
                    logger.warning("node %s holds data but had no cluster id; joining cluster %s",
                                   self.node_id, cluster_id)
                else:
                    logger.info("node %s joined cluster %s", self.node_id, cluster_id)
                return True
        self.check(cluster_id, epoch, "registration")
        return True
