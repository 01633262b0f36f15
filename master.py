"""The master: namespace, node registry, placement, and the client protocol.

The master owns every name.  Clients stream files to it; it cuts them into
chunks, sends each batch of chunks to ``replication`` distinct live nodes
(transfers.py), and only when every chunk is fsynced on its nodes does it
commit the file with one fsynced record in its metadata log
(metadata_log.py, namespace.py).  Downloads stream the committed version
back from whichever replica answers with good CRCs.

Locks: the node table has its own lock, held for dictionary updates only;
the namespace is changed only by the log's ordered apply; per-name write
locks (``NameLocks``) serialize writers of one name, first come first
served, and readers take no lock at all.  No lock is ever held across
network I/O.

A write to an existing name keeps the version it replaces (history.py,
``[retention] keep_versions``); what frees chunks is a version being
dropped (the oldest beyond keep_versions), trash expiring (a delete moves
a file and its versions to the trash for trash_days) or a purge.  Those are collected
lazily: the master asks the nodes to drop what no kept version of the name
uses, in the background, and retries a node that is unreachable for as
long as the master runs.

Nothing is erased that the master does not know: the master creates a
cluster id with its metadata and raises its fencing epoch at every start,
and every request that changes a node's data carries both (``fence``), so
nodes obey no foreign or stale master (fencing.py).  Blobs the namespace
does not know are quarantined, not deleted (quarantine.py).  Nodes are told
what their blobs are (notes.py) and keep copies of the checkpoint
(meta_backup.py), so ``--recover-from-nodes`` (recovery.py) can rebuild a
lost metadata dir.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import config as config_module
import dirlock
import logsetup
import meta_backup
import notes
import protocol
import recovery
import replication
import security as security_module
import snapshots
import transport
import transfers
import web_status
from metadata_log import MetadataLog
import filemeta
import history
from monitor import Monitor, ObservedHandler
from namespace import (Namespace, NameLocks, entry_blobs, first_covering, make_entry, merge_ranges, put_record,
                       run_blob, splice_runs, uncovered)
from quarantine import OrphanKeeper
from repair import Repairer
from views import human_bytes

logger = logging.getLogger("master")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_START_FAILED = 3
# A master of a replicated group whose data dir is empty while its peers saw it
# holding a log (it lost its state), or that joins under a voter's address.
EXIT_LOST_STATE = 4

# Idle connections kept per node address for reuse.
_POOL_IDLE_PER_NODE = 16
# Blob ids of deleted or replaced versions remembered (about 50 bytes each),
# so a node that was away when they were deleted gets its copies deleted too.
DROPPED_BLOBS_KEPT = 100_000
# Seconds between retries of garbage collection on unreachable nodes (a node
# that registers again is retried at once).
_GC_RETRY_S = 5.0
# Longest pause between two checks for nodes that fell silent, so a death is
# logged within about this long of dead_after_s.
_LIVENESS_CHECK_S = 1.0
# Runs in one READ_PLAN: ~130 bytes of JSON each with its capability, so a
# page stays well under MAX_HEADER_BYTES; 512 runs of 1 MiB cover 512 MiB.
PLAN_RUNS = 512
# Runs in one file's plan of a READ_PLANS_PAGE: a page (PAGE_BYTES) must hold
# a whole plan, so a file with more (a large one: 64 runs of 1 MiB) pages on
# with READ_MORE.
BATCH_PLAN_RUNS = 64
# A group of pipelined uploads is committed (one FLUSH per node, one log
# fsync) once it holds this many files or bytes, or when the client syncs.
GROUP_MAX_FILES = 256
GROUP_MAX_BYTES = 64 * 1024 * 1024
UPLOAD_MODES = ("replace", "append", "write")
# Opens the advice an INSUFFICIENT_SPACE reply carries (Master.explain_no_space).
SPACE_HINT_MARK = "To free space:"


def upload_words(mode: str, new_name: bool) -> str:
    """What a log line calls an upload of ``mode``: a replace of a name not stored yet is an upload."""
    if mode == "replace":
        return "upload of new file" if new_name else "replace of"
    return f"{mode} to"


@dataclass
class PendingUpload:
    """An upload received and sent to its nodes, waiting to be committed.

    Or, with ``error`` set (and no stream, lock or entry), a file of an
    UPLOAD_FILES that failed alone: its ERROR waits for its turn, since
    replies go out in upload order.
    """

    stream: transfers.UploadStream | None
    token: object
    entry: dict | None
    tag: int
    # An append or write: what the entry was derived from (namespace.put_record).
    base: dict | None = None
    error: protocol.Error | None = None


@dataclass
class NodeState:
    """What the master knows of one storage node (guarded by Master._nodes_lock)."""

    node_id: str
    address: tuple[str, int]
    capacity_bytes: int = 0
    used_bytes: int = 0  # as of its last report
    reported_free: int = -1  # free_bytes of its last report; -1: unknown, capacity - used counts
    chunks: int = 0
    last_heard: float | None = None  # monotonic seconds; None = not heard since start
    reserved_bytes: int = 0  # bytes sent to it whose PUT_OK has not been read yet
    # Batches it acknowledged that its last report may not count yet:
    # (its PUT_OK seq, payload bytes, monotonic time acknowledged).
    unreported: list = field(default_factory=list)
    unreported_bytes: int = 0
    full: bool = False  # the node refuses writes (capacity reached or ENOSPC)
    suspect_until: float = 0.0  # a data request failed: no new placements before this
    # Its holdings may differ from the namespace (it was dead, or failed mid-
    # upload): the next heartbeat asks it to register and report again.
    needs_report: bool = False
    reported: bool = False  # its inventory arrived since it last registered
    stopped: bool = False  # it said GOODBYE (stopped cleanly) and has not registered since
    declared_dead: bool = False  # its death was logged; the next REGISTER logs it back
    quarantined_bytes: int = 0  # payload bytes it holds in quarantine (heartbeat)

    def alive(self, now: float, dead_after_s: float) -> bool:
        """Heard within ``dead_after_s`` and not stopped (a node re-reporting its inventory stays alive).

        Placement additionally waits for ``reported``: what a node holds must
        be known before anything new lands on it.
        """
        return not self.stopped and self.last_heard is not None and now - self.last_heard <= dead_after_s

    def take_report(self, used_bytes: int, free_bytes: int, put_seq: int, now: float, max_age_s: float) -> None:
        """Its own count of used and free bytes, covering every batch up to ``put_seq``.

        Batches acknowledged with a higher seq are not in it and stay
        counted here; so are none older than ``max_age_s`` (dead_after_s: a
        live node has reported since; this also forgets the seqs of a node
        that restarted and counts from 0 again).
        """
        self.used_bytes = used_bytes
        self.reported_free = free_bytes
        self.unreported = [u for u in self.unreported if u[0] > put_seq and u[2] >= now - max_age_s]
        self.unreported_bytes = sum(u[1] for u in self.unreported)

    @property
    def stored_bytes(self) -> int:
        """Bytes on its disk now: its last report plus what it acknowledged since."""
        return self.used_bytes + self.unreported_bytes

    @property
    def room_bytes(self) -> int:
        """Bytes of chunks it can take now: its last report less what it acknowledged since."""
        free = self.reported_free if self.reported_free >= 0 else self.capacity_bytes - self.used_bytes
        return max(free - self.unreported_bytes, 0)

    @property
    def free_bytes(self) -> int:
        """Room for placement: room_bytes less the bytes on their way to it."""
        return self.room_bytes - self.reserved_bytes


class NodePool:
    """Reusable connections to nodes, keyed by node id and address.

    ``acquire(node_id)`` returns an idle connection to that node or opens one
    to the address it last registered from (``locate``), and checks the id
    the server gives in its handshake: a node restarted on another node's
    old port must not receive that node's reads, writes or deletes.  A
    different id is refused with WrongNode, an Unavailable, so callers fail
    over exactly as for an unreachable node.  ``release`` keeps a healthy
    connection for the next caller and closes a broken one.  A connection
    is used by one thread at a time.
    """

    def __init__(self, locate, timeout_s: float, security: transport.Security | None = None):
        self.locate = locate  # node_id -> (host, port); raises Unavailable for an unknown node
        self.timeout_s = timeout_s
        self.security = security  # secret and TLS for the connections to nodes
        self._lock = threading.Lock()
        self._idle: dict[tuple, list] = defaultdict(list)  # (node_id, address) -> connections
        self._wrong_seen: set[tuple] = set()  # (node_id, address, peer_id) already logged at WARNING

    def acquire(self, node_id: str) -> transport.Connection:
        if not isinstance(node_id, str):  # the old acquire(address) form would skip the id check
            raise TypeError(f"NodePool.acquire takes a node id, not {node_id!r}")
        address = self.locate(node_id)
        while True:
            with self._lock:
                idle = self._idle.get((node_id, address))
                conn = idle.pop() if idle else None
            if conn is None:
                return self._connect(node_id, address)
            if not conn.peer_closed():
                return conn
            conn.close()  # the node closed it while idle (restart, idle timeout)

    def _connect(self, node_id: str, address: tuple[str, int]) -> transport.Connection:
        conn = transport.Connection(address, "master", self.timeout_s, self.security)
        if conn.peer_id != node_id:
            conn.close()
            where = transport.format_address(address)
            # Retries (garbage collection, reads) meet the same impostor again
            # and again: one WARNING per situation, the rest at DEBUG.
            seen = (node_id, address, conn.peer_id)
            with self._lock:
                first = seen not in self._wrong_seen
                self._wrong_seen.add(seen)
            logger.log(logging.WARNING if first else logging.DEBUG,
                       "refused %s: it answered as node %r, but node %s was expected there "
                       "(a node restarted on another node's port?)", where, conn.peer_id[:64], node_id)
            raise protocol.WrongNode(f"{where} is node {conn.peer_id[:64]!r}, not node {node_id}")
        return conn

    @staticmethod
    def get_chunks(blob: str, first: int, count: int) -> protocol.GetChunks:
        """The request reading chunks over this pool's connections (transfers.read_range).

        The master needs no read capability; a client's pool adds one
        (direct_read.py), so the read code is the same for both.
        """
        return protocol.GetChunks(blob=blob, first=first, count=count)

    def release(self, conn: transport.Connection) -> None:
        if not conn.broken:
            with self._lock:
                idle = self._idle[(conn.peer_id, conn.address)]
                if len(idle) < _POOL_IDLE_PER_NODE:
                    idle.append(conn)
                    return
        conn.close()

    def discard_address(self, address: tuple[str, int]) -> None:
        with self._lock:
            keys = [key for key in self._idle if key[1] == address]
            idle = [conn for key in keys for conn in self._idle.pop(key)]
        for conn in idle:
            conn.close()


class Master:
    """The master's state and operations; the handler only translates frames.

    Collaborators can be passed in for tests: ``clock`` (monotonic seconds).
    """

    def __init__(self, config: config_module.Config, data_dir: str, clock=time.monotonic,
                 security: transport.Security | None = None, join: bool = False):
        self.config = config
        self.clock = clock
        self.started = clock()
        self.security = security or transport.NO_SECURITY
        self.namespace = Namespace()
        # Several masters in [cluster] masters: the log is replicated by Raft (replication.py).
        members = replication.group_of(config, data_dir, join)
        self.replication = (replication.ReplicatedLog(self, config, data_dir, members, self.security, join=join)
                            if members else None)
        self.log = self.replication or MetadataLog(data_dir, self.namespace,
                                                   checkpoint_every=config.checkpoint_every)
        self.log.open()
        if self.replication is None:  # a group's leader begins an epoch when elected (replication.py)
            self._begin_epoch()
        self.locks = NameLocks()
        self.pool = NodePool(self.node_address, config.io_timeout_s, self.security)
        self._nodes_lock = threading.Lock()
        self._nodes: dict[str, NodeState] = {}
        for node_id, info in self.namespace.nodes.items():
            try:
                self._nodes[node_id] = NodeState(node_id, config_module.parse_address(info["address"]))
            except ValueError:
                # Its next REGISTER tells us where it is; no reason not to start.
                logger.warning("node %s has an unusable recorded address %r", node_id, info["address"])
        self.active_blobs: set[str] = set()  # blobs of uploads not yet committed or discarded
        self._readers: dict[str, int] = defaultdict(int)  # blob -> downloads in progress
        self.repairer = Repairer(self)
        self.notes = notes.NoteSender(self)
        self.meta_backup = meta_backup.MetaBackup(self)
        self.orphans = OrphanKeeper(self)
        # node_id -> {"id", "address", "reason"}: nodes that tried to register and were refused.
        self._refused: dict[str, dict] = {}
        # node_id -> garbage items: (blob, None, None) = the whole blob,
        # (blob, first, count) = chunks of a blob that is still partly in use.
        self._garbage: dict[str, set[tuple]] = defaultdict(set)
        self._garbage_cond = threading.Condition()
        self._dropped_blobs: OrderedDict[str, None] = OrderedDict()  # see _remember_dropped
        self._freed_ranges: OrderedDict[str, list] = OrderedDict()  # blob -> chunk ranges; see freed_ranges
        self._stop = threading.Event()
        self._gc_thread = threading.Thread(target=self._gc_loop, name="gc", daemon=True)
        self._liveness_thread = threading.Thread(target=self._liveness_loop, name="liveness", daemon=True)
        self._trash_thread = threading.Thread(target=self._trash_loop, name="trash", daemon=True)
        self.monitor = Monitor(self)  # health, events and metrics (monitor.py)

    def _begin_epoch(self) -> None:
        """Create the cluster id (first start) and raise the epoch, durably, before talking to any node."""
        records = []
        if self.namespace.cluster_id is None:
            records.append({"op": "cluster", "cluster_id": uuid.uuid4().hex})
        records.append({"op": "epoch", "epoch": self.namespace.epoch + 1})
        self.log.commit(records)
        logger.info("%s cluster %s at epoch %d", "created" if len(records) == 2 else "serving",
                    self.namespace.cluster_id, self.namespace.epoch)

    def fence(self) -> dict:
        """The fields every request that changes a node's data carries (cluster id, epoch)."""
        return {"cluster_id": self.namespace.cluster_id, "epoch": self.namespace.epoch}

    def start(self) -> None:
        self._gc_thread.start()
        self._liveness_thread.start()
        self._trash_thread.start()
        self.repairer.start()
        self.notes.start()
        self.meta_backup.start()
        self.monitor.start()
        if self.replication is not None:
            self.replication.start()

    def is_leader(self) -> bool:
        """True for a single master, and for the leader of a replicated group."""
        return self.replication is None or self.replication.driver.is_leader

    def become_leader(self) -> None:
        """This master now leads its group: the same safe-mode grace as a restarted master."""
        now = self.clock()
        self.started = self.repairer.started = now
        self.repairer.safe_mode = self.config.safe_mode_s > 0
        self.repairer.reported = set()

    def stop_leading(self) -> None:
        """Another master leads now: forget the nodes, so nothing here places, repairs or drops, and
        drop the name locks (leader state), so writers queued here re-send to the new leader."""
        with self._nodes_lock:
            self._nodes.clear()
        self.repairer.safe_mode = self.config.safe_mode_s > 0
        leader = self.replication.leader if self.replication is not None else None
        held = self.locks.drop_all(lambda: protocol.NotLeader(
            "this master lost the leadership while the writer waited for the name's lock", leader or ""))
        if held:
            logger.info("dropped %d name lock(s): no longer the leader", held)

    def stop(self) -> None:
        self._stop.set()
        self.monitor.stop()
        self.repairer.stop()
        self.notes.stop()
        with self._garbage_cond:
            self._garbage_cond.notify_all()
        self._drain_garbage()
        self.meta_backup.stop()  # a last copy of the checkpoint in the cluster
        self.log.close()

    # --- nodes -------------------------------------------------------------------------
    def register(self, msg: protocol.Register, peer: str) -> None:
        if not 1 <= msg.port <= 65535 or not msg.host or len(msg.host) > 255 or \
                any(not (ch.isalnum() or ch in ".-:_%") for ch in msg.host):
            raise protocol.RemoteProtocolError(f"node {msg.node_id[:64]!r} registered a bad address")
        if not msg.node_id or len(msg.node_id) > 64 or not msg.node_id.isascii() or not msg.node_id.isprintable():
            raise protocol.RemoteProtocolError("bad node id")
        address = (msg.host, msg.port)
        address_text = transport.format_address(address)
        self._check_node_fence(msg, address_text)
        with self._nodes_lock:
            node = self._nodes.get(msg.node_id)
            if node is None:
                node = self._nodes[msg.node_id] = NodeState(msg.node_id, address)
            old_address, node.address = node.address, address
            was = "stopped" if node.stopped else "dead" if node.declared_dead else None
            node.stopped = node.declared_dead = False
            node.capacity_bytes = msg.capacity_bytes
            node.take_report(msg.used_bytes, msg.free_bytes, msg.put_seq, self.clock(), self.config.dead_after_s)
            node.chunks = msg.chunks
            node.last_heard = self.clock()
            # Not a placement target until its inventory is in: what it holds
            # must be known before anything new lands on it.
            node.reported = False
        self.repairer.begin_report(msg.node_id, msg.put_seq)
        if old_address != address:
            self.pool.discard_address(old_address)
        known = self.namespace.nodes.get(msg.node_id)
        if known is None or known["address"] != address_text:
            self.log.commit([{"op": "node", "node_id": msg.node_id, "address": address_text}])
        logger.info("node %s registered from %s at %s (%d chunks, %d bytes)",
                    msg.node_id, peer, address_text, msg.chunks, msg.used_bytes)
        if was is not None:
            logger.warning("node %s is back at %s (it was %s)", msg.node_id, address_text, was)
        with self._garbage_cond:
            self._garbage_cond.notify_all()  # a returning node may have garbage waiting

    def _check_node_fence(self, msg: protocol.Register, address: str) -> None:
        """Refuse a node of another cluster, or one that has seen a newer master (raises)."""
        ours = self.namespace.cluster_id
        if msg.cluster_id and msg.cluster_id != ours:
            reason = f"belongs to cluster {msg.cluster_id}"
            error = protocol.WrongCluster(f"node {msg.node_id} belongs to cluster {msg.cluster_id}, this master "
                                          f"to cluster {ours}: refused (the node keeps its data)")
        elif msg.epoch > self.namespace.epoch:
            reason = f"has seen master epoch {msg.epoch}, newer than ours ({self.namespace.epoch})"
            error = protocol.StaleMaster(
                f"node {msg.node_id} has seen master epoch {msg.epoch}, this master is at {self.namespace.epoch}: "
                f"a newer master exists, or this master's metadata is older than the cluster's "
                f"(recover with master.py --recover-from-nodes)")
        else:
            with self._nodes_lock:
                self._refused.pop(msg.node_id, None)
            return
        with self._nodes_lock:
            before = self._refused.get(msg.node_id)
            self._refused[msg.node_id] = {"id": msg.node_id, "address": address, "reason": reason}
        if before is None or before["reason"] != reason:
            logger.warning("refused node %s at %s: %s", msg.node_id, address, error.message)
        raise error

    def inventory(self, msg: protocol.Inventory) -> None:
        if self.repairer.add_inventory(msg.node_id, msg.blobs, msg.done, msg.quarantined):
            with self._nodes_lock:
                node = self._nodes[msg.node_id]
                node.reported = True
                node.last_heard = self.clock()
            logger.info("node %s reported its inventory", msg.node_id)

    def heartbeat(self, msg: protocol.Heartbeat) -> None:
        with self._nodes_lock:
            node = self._nodes.get(msg.node_id)
            if node is None or not node.reported:
                raise protocol.RemoteProtocolError(f"node {msg.node_id} heartbeats without registering")
            now = self.clock()
            if node.needs_report or not node.alive(now, self.config.dead_after_s):
                # Back from the dead (or from a failed upload): what it holds
                # must be reconciled before it is trusted again.
                why = "a request to it failed" if node.needs_report else \
                    "it said goodbye" if node.stopped else f"it was silent for {now - node.last_heard:.1f} s"
                node.needs_report = False
                node.reported = False
                raise protocol.Unavailable(f"node {msg.node_id}: register again and report your inventory ({why})")
            node.take_report(msg.used_bytes, msg.free_bytes, msg.put_seq, now, self.config.dead_after_s)
            node.chunks = msg.chunks
            became_full = msg.full and not node.full
            has_room = node.full and not msg.full
            node.full = msg.full
            node.quarantined_bytes = msg.quarantined_bytes
            node.last_heard = now
        if became_full:
            logger.warning("node %s is full (%d bytes used, %d free for chunks): no new chunks go to it",
                           msg.node_id, msg.used_bytes, max(msg.free_bytes, 0))
        elif has_room:
            logger.warning("node %s has room again (%d bytes used, %d free for chunks)", msg.node_id,
                           msg.used_bytes, max(msg.free_bytes, 0))
        if msg.corrupt:
            self.repairer.report_corrupt(msg.node_id, msg.corrupt, msg.put_seq)

    def goodbye(self, msg: protocol.Goodbye) -> None:
        """A node is stopping cleanly: stop using it now rather than after dead_after_s of silence."""
        with self._nodes_lock:
            node = self._nodes.get(msg.node_id)
            if node is None or node.stopped:
                return
            node.stopped = True
            node.reported = False
            address = transport.format_address(node.address)
        logger.warning("node %s at %s stopped (it said goodbye)", msg.node_id, address)
        self.repairer.wake()

    def _liveness_loop(self) -> None:
        interval = min(self.config.heartbeat_interval_s, _LIVENESS_CHECK_S)
        while not self._stop.wait(interval):
            try:
                self.check_liveness()
            except Exception:
                logger.exception("liveness check failed")

    def check_liveness(self) -> None:
        """Log, once per death, each node that fell silent past dead_after_s (WARNING).

        A known node not heard at all since the master started counts once
        ``waiting_for_nodes`` is over.  Its REGISTER logs it back.
        """
        now = self.clock()
        dead = []
        waiting = self.waiting_for_nodes(now)
        with self._nodes_lock:
            for n in self._nodes.values():
                if n.stopped or n.declared_dead or n.alive(now, self.config.dead_after_s):
                    continue
                if n.last_heard is None and waiting:
                    continue
                n.declared_dead = True
                dead.append((n.node_id, transport.format_address(n.address), n.last_heard))
        for node_id, address, last_heard in dead:
            if last_heard is None:
                logger.warning("node %s at %s is dead: not heard from since the master started %.0f s ago",
                               node_id, address, now - self.started)
            else:
                logger.warning("node %s at %s is dead: silent for %.1f s", node_id, address, now - last_heard)

    def waiting_for_nodes(self, now: float) -> bool:
        """Known nodes not heard since start are still expected (safe mode, or within dead_after_s of start)."""
        return self.repairer.safe_mode or now - self.started <= self.config.dead_after_s

    def node_state(self, node: NodeState, now: float, waiting: bool) -> str:
        """What STATUS says of a node (caller holds _nodes_lock)."""
        if node.stopped:
            return "stopped"
        if node.alive(now, self.config.dead_after_s):
            return "alive" if node.reported else "reporting"
        if node.last_heard is None and waiting:
            return "waiting"
        return "dead"

    def node_address(self, node_id: str) -> tuple[str, int]:
        with self._nodes_lock:
            node = self._nodes.get(node_id)
            if node is None:
                raise protocol.Unavailable(f"node {node_id} is unknown")
            return node.address

    def live_nodes(self) -> list[NodeState]:
        now = self.clock()
        with self._nodes_lock:
            return [n for n in self._nodes.values() if n.alive(now, self.config.dead_after_s)]

    def holding_nodes(self) -> list[NodeState]:
        """Live nodes plus those that said GOODBYE less than ``dead_after_s`` after last being heard.

        Repair waits for these: a cleanly stopped node is usually restarting.
        """
        now = self.clock()
        dead_after_s = self.config.dead_after_s
        with self._nodes_lock:
            return [n for n in self._nodes.values()
                    if n.last_heard is not None and now - n.last_heard <= dead_after_s]

    def check_writable(self) -> None:
        """Raise InsufficientNodes unless ``replication`` nodes are alive.

        A master that just became leader of its group waits (up to
        dead_after_s after taking over) for the nodes to find it, so a
        failover is not an INSUFFICIENT_NODES error for the first writers.
        """
        live = len(self.live_nodes())
        if self.replication is not None:
            # Wait for nodes placement can use (registered AND inventory reported, as
            # choose_replicas counts them), not merely registered: a node between its REGISTER
            # and its INVENTORY made the first upload after a failover fail INSUFFICIENT_NODES.
            while len(self.placeable_nodes()) < self.config.replication and \
                    self.clock() < self.started + self.config.dead_after_s:
                time.sleep(0.05)
            live = len(self.live_nodes())
        if live < self.config.replication:
            raise protocol.InsufficientNodes(
                f"{live} storage node(s) alive, {self.config.replication} needed for replication")

    def placeable_nodes(self) -> list[NodeState]:
        """Live nodes that have reported their inventory and are not suspect: what placement may use."""
        now = self.clock()
        with self._nodes_lock:
            return self._placeable_locked(now)

    def _placeable_locked(self, now: float) -> list[NodeState]:
        """placeable_nodes() as of ``now``; the caller holds _nodes_lock."""
        return [n for n in self._nodes.values()
                if n.alive(now, self.config.dead_after_s) and n.reported and n.suspect_until <= now]

    def choose_replicas(self, nbytes: int, avoid=(), count: int | None = None) -> list[str]:
        """``count`` (default ``replication``) distinct live nodes with the most room for ``nbytes``.

        Nodes in ``avoid`` are not considered.  Raises InsufficientNodes if
        too few are alive, InsufficientSpace if too few of them have room.
        """
        wanted = self.config.replication if count is None else count
        now = self.clock()
        with self._nodes_lock:
            live = [n for n in self._placeable_locked(now) if n.node_id not in avoid]
            roomy = [n for n in live if not n.full and n.free_bytes >= nbytes]
            roomy.sort(key=lambda n: n.free_bytes, reverse=True)
            chosen = [n.node_id for n in roomy[:wanted]]
        if len(live) < wanted:
            raise protocol.InsufficientNodes(
                f"{len(live)} healthy storage node(s) alive, {wanted} needed for replication")
        if len(chosen) < wanted:
            raise protocol.InsufficientSpace(
                f"only {len(roomy)} live node(s) have room for {nbytes} more bytes, {wanted} needed")
        return chosen

    def reserve(self, node_id: str, nbytes: int) -> None:
        """Count bytes in flight to a node against its free space (negative releases)."""
        with self._nodes_lock:
            node = self._nodes.get(node_id)
            if node is not None:
                node.reserved_bytes += nbytes

    def note_stored(self, node_id: str, seq: int, nbytes: int, reserved: bool = True) -> None:
        """A node acknowledged a batch (PUT_OK ``seq``): count it as stored until its report does.

        With ``reserved``, the batch's reservation is released (see reserve).
        So a node's bytes count once in placement: in flight, then
        acknowledged, then in its report, never in two at once nor in none.
        """
        with self._nodes_lock:
            node = self._nodes.get(node_id)
            if node is not None:
                if reserved:
                    node.reserved_bytes -= nbytes
                node.unreported.append((seq, nbytes, self.clock()))
                node.unreported_bytes += nbytes

    def read_order(self, node_ids: list[str]) -> list[str]:
        """Replicas to try for a read: live ones first, least loaded first."""
        now = self.clock()
        with self._nodes_lock:
            def rank(node_id):
                node = self._nodes.get(node_id)
                if node is None:
                    return (2, 0)
                return (0 if node.alive(now, self.config.dead_after_s) else 1, node.reserved_bytes)
            return sorted(node_ids, key=rank)

    def note_node_failure(self, node_id: str, exc: protocol.BackupError) -> None:
        """A request to a node failed: place nothing new on it for a while.

        Only a broken conversation (unreachable, timed out, garbled) makes it
        suspect and asks it to re-report; a typed answer such as
        INSUFFICIENT_SPACE is the node working as designed.
        """
        logger.warning("node %s failed a request: %s", node_id, exc)
        if isinstance(exc, protocol.InsufficientSpace):
            # No room now, whatever its last report said: no placement on it until the next one.
            with self._nodes_lock:
                node = self._nodes.get(node_id)
                if node is not None:
                    node.reported_free = 0
            return
        if not isinstance(exc, (protocol.Unavailable, protocol.Timeout, protocol.RemoteProtocolError)):
            return
        with self._nodes_lock:
            node = self._nodes.get(node_id)
            if node is not None:
                node.suspect_until = self.clock() + self.config.dead_after_s
                node.needs_report = True

    def note_bad_replica(self, node_id, name, entry, blob, ranges, exc) -> None:
        """A read found a node's copy of chunk ``ranges`` ([(first, count)]) corrupt or missing.

        Stop using that copy of just those chunks, and repair them.
        """
        logger.error("bad replica of %r chunks %s on node %s: %s", name,
                     ", ".join(f"{first}..{first + count - 1}" for first, count in ranges[:5]), node_id, exc)
        if isinstance(exc, protocol.ChecksumMismatch):
            self.repairer.count_corrupt_read(node_id, blob, ranges)
        self.repairer.remove_replica(name, entry, blob, ranges, node_id)

    # --- files -------------------------------------------------------------------------
    def lock_name(self, name: str, owner: str, wait_s: float = -1.0) -> object:
        """Take ``name``'s write lock, waiting ``wait_s`` (negative: lock_wait_s; 0: not at all)."""
        return self.locks.acquire(name, owner, self.config.lock_wait_s if wait_s < 0 else wait_s)

    def commit_uploads(self, uploads: list[tuple[str, dict, dict | None]]) -> None:
        """Make uploaded files visible with one log commit.

        ``uploads`` holds (name, entry, base): ``base`` is None for a whole
        new file, else what an append or write was derived from, so that the
        chunks it did not touch keep the placement current at commit time
        (namespace.rebase_entry).  The caller holds each name's lock and has
        made every chunk durable.  The replaced entry becomes an older
        version; versions dropped past keep_versions are collected afterwards.
        """
        previous = [self.namespace.entries_of(name) for name, _, _ in uploads]
        self.log.commit([self.put(name, entry, base) for name, entry, base in uploads])
        self.notes.committed([(name, self.namespace.files[name]) for name, _, _ in uploads])
        for _, entry, _ in uploads:
            self.active_blobs.discard(entry["version"])
        for before, (name, _, _) in zip(previous, uploads):
            self._collect_dropped(name, before)
        if len(uploads) == 1:
            name, entry, _ = uploads[0]
            logger.info("stored %r: %d bytes, %d chunks, version %s", name, entry["size"], entry["chunks"],
                        entry["version"])
            return
        # A group of many small files: one line, not one per file (a line cost
        # ~10 µs, as much as the rest of a small file's commit); each at debug.
        logger.info("stored %d files, %d bytes: %r .. %r", len(uploads),
                    sum(entry["size"] for _, entry, _ in uploads), uploads[0][0], uploads[-1][0])
        if logger.isEnabledFor(logging.DEBUG):
            for name, entry, _ in uploads:
                logger.debug("stored %r: %d bytes, %d chunks, version %s", name, entry["size"], entry["chunks"],
                             entry["version"])

    def put(self, name: str, entry: dict, base: dict | None = None) -> dict:
        """The log record storing ``entry`` as ``name``, keeping ``keep_versions`` versions (history.py)."""
        record = put_record(name, entry, base)
        record["t"] = round(time.time(), 3)
        record["keep"] = self.config.keep_versions
        return record

    def open_for_read(self, name: str, version: int | None = None, at: float | None = None,
                      any_kept: bool = False) -> dict:
        """The entry of ``name`` (its current one, or the version a request names), pinned until ``close_read``.

        A pinned version is not garbage collected even if the name is
        replaced, deleted or the version dropped meanwhile, so a download
        that started on it finishes on it: readers never wait for writers
        and never see a mix.  ``any_kept``: ``version`` may be any kept
        entry of the name (trash, pinned by a snapshot), as a snapshot
        restore needs.
        """
        while True:
            if any_kept:
                entry = self.namespace.find_entry(name, version)
                if entry is None:
                    raise protocol.FileNotFound(f"{name!r} has no kept version {version}")
            else:
                entry = self.namespace.lookup_version(name, version, at)
            self.pin(entry)
            # Pinned before the re-check: a replace committed after the
            # re-check queues its garbage after our pin, so the GC sees it.
            if self.namespace.find_entry(name, history.version_id(entry)) is entry:
                return entry
            self.close_read(entry)

    def pin(self, entry: dict) -> None:
        """Keep ``entry``'s blobs from garbage collection until a matching ``close_read``."""
        with self._garbage_cond:
            for blob in entry_blobs(entry):
                self._readers[blob] += 1

    def read_plan(self, read_id: str, name: str, entry: dict, offset: int, length: int,
                  first_chunk: int | None = None) -> protocol.ReadPlan:
        """READ_PLAN of a pinned read of ``entry``'s bytes [offset, offset+length), from ``first_chunk`` on.

        At most PLAN_RUNS runs (the rest: READ_MORE); replicas in read order;
        a capability per blob of the runs, valid for read_lease_s.
        """
        expires = self.read_expiry()
        nodes: dict[str, str] = {}
        fields = self.plan_fields(read_id, name, entry, offset, length, first_chunk, PLAN_RUNS, expires, nodes)
        return protocol.ReadPlan(**fields, nodes=nodes, expires=expires)

    def read_expiry(self) -> int:
        """Unix time until which capabilities issued now are valid (read_lease_s)."""
        return int(time.time() + self.config.read_lease_s) + 1

    def plan_fields(self, read_id: str, name: str, entry: dict, offset: int, length: int, first_chunk: int | None,
                    max_runs: int, expires: int, nodes: dict) -> dict:
        """The fields of a READ_PLAN but ``nodes`` and ``expires``: at most ``max_runs`` runs.

        Adds the address of each node of the runs to ``nodes`` (shared by
        the plans of one READ_PLANS_PAGE).  ``more`` and ``meta`` are left
        out when None, as the frame would leave them.
        """
        chunk_size = entry["chunk_size"]
        first_needed = offset // chunk_size
        first = first_needed if first_chunk is None else max(first_chunk, first_needed)
        last = (offset + length - 1) // chunk_size if length > 0 else first - 1
        runs, more = transfers.plan_runs(entry, first, last, max_runs)
        for run in runs:
            run[2] = self.read_order(run[2])
            for node_id in run[2]:
                if node_id not in nodes:
                    try:
                        nodes[node_id] = transport.format_address(self.node_address(node_id))
                    except protocol.BackupError:
                        pass  # unknown: the client counts it unreachable
        secret = self.security.secret
        cluster_id = self.namespace.cluster_id or ""
        caps = {blob: security_module.read_capability(secret, cluster_id, blob, expires) if secret else ""
                for blob in {run[3] for run in runs}}
        fields = {"read_id": read_id, "name": name, "size": entry["size"], "chunks": entry["chunks"],
                  "sha256": entry["sha256"], "mtime": entry["mtime"], "version": entry["version"], "offset": offset,
                  "length": length, "chunk_size": chunk_size, "batch_chunks": entry["batch_chunks"],
                  "first_chunk": first, "runs": runs, "caps": caps}
        if more is not None:
            fields["more"] = more
        if entry.get("meta") is not None:
            fields["meta"] = entry["meta"]
        return fields

    def check_reported_copies(self, name: str, entry: dict, bad: list) -> None:
        """A client could not use these copies ([node id, blob, first, count]): read each one here.

        A copy the master too finds missing or corrupt is taken off its
        chunks and repaired (transfers.read_piece reports it through
        ``note_bad_replica``, the master's own read path); one that reads
        intact here stays (it was damaged on the way to the client, or the
        report is wrong).  Done before READ_END is answered, while the
        version is still pinned: rare (only when something was bad), and
        the client then knows the master has seen what it found.
        """
        checks = []
        for item in bad[:protocol.MAX_CHUNK_RANGES]:
            if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)
                    and isinstance(item[1], str) and all(isinstance(v, int) and v >= 0 for v in item[2:])):
                raise protocol.RemoteProtocolError("malformed READ_END bad list")
            if item[1] in entry_blobs(entry) and item[2] < entry["chunks"] and item[3] > 0:
                checks.append((item[0], item[1], item[2], min(item[3], entry["chunks"] - item[2])))
        if not checks:
            return
        batch = entry["batch_chunks"]
        buffer = bytearray(batch * (entry["chunk_size"] + protocol.CRC_BYTES))
        for node_id, blob, first, count in checks:
            for piece_first, piece_count in transfers.batch_pieces(first, count, batch):
                try:
                    transfers.read_piece(self, name, entry, blob, piece_first, piece_count, [node_id], buffer)
                except protocol.BackupError as exc:
                    logger.info("checked a copy of %r a client could not use: %s", name, exc)

    def close_read(self, entry: dict) -> None:
        with self._garbage_cond:
            for blob in entry_blobs(entry):
                self._readers[blob] -= 1
                if not self._readers[blob]:
                    del self._readers[blob]
            self._garbage_cond.notify_all()

    def delete(self, name: str, owner: str, wait_s: float = -1.0, purge: bool = False) -> None:
        """Move ``name`` and its versions to the trash (none if trash_days is 0), or with ``purge``
        drop it, its versions and its trash at once."""
        token = self.lock_name(name, owner, wait_s)
        try:
            before = self.namespace.entries_of(name)
            if purge:
                if not before:
                    raise protocol.FileNotFound(f"no file named {name!r}, in use or in the trash")
                record = {"op": "purge", "name": name}
            else:
                self.namespace.lookup(name)
                record = {"op": "delete", "name": name, "t": round(time.time(), 3)}
                if self.config.trash_days > 0:
                    record["trash"] = True
            index = self.log.commit([record])
        finally:
            self.locks.release(name, token)
        self.notes.deleted(name, before, index, record.get("t") if record.get("trash") else None)
        self._collect_dropped(name, before)
        logger.info("%s %r", "purged" if purge else "deleted" if self.config.trash_days <= 0 else "trashed", name)

    def undelete(self, name: str, owner: str, wait_s: float = -1.0) -> dict:
        """Bring back what the newest delete of ``name`` trashed; its newest version becomes current."""
        token = self.lock_name(name, owner, wait_s)
        try:
            if name in self.namespace.files:
                raise protocol.FileExists(f"{name!r} exists: delete or rename it before undeleting")
            if not self.namespace.trash.get(name):
                raise protocol.FileNotFound(f"{name!r} is not in the trash")
            index = self.log.commit([{"op": "undelete", "name": name}])
            entry = self.namespace.files[name]
        finally:
            self.locks.release(name, token)
        self.notes.committed([(name, entry)], index)  # newer than the tombstone the delete left
        logger.info("undeleted %r (version %s)", name, history.version_id(entry))
        return entry

    def trash_expiry_s(self) -> float:
        return self.config.trash_days * 86400.0

    def expire_trash(self, now: float) -> int:
        """Drop trash older than trash_days (freeing its chunks); returns the names expired.

        A name whose lock is busy is left for the next pass.  Not in safe
        mode: nothing is deleted before the nodes have reported.
        """
        if self.repairer.in_safe_mode():
            return 0
        before_t = now - self.trash_expiry_s()
        expired = 0
        for name, entries in list(self.namespace.trash.items()):
            if not any(e["trashed_at"] <= before_t for e in entries):
                continue
            try:
                token = self.lock_name(name, "trash expiry", 0.0)
            except protocol.FileLocked:
                continue
            try:
                before = self.namespace.entries_of(name)
                self.log.commit([{"op": "expire", "name": name, "before": before_t}])
            finally:
                self.locks.release(name, token)
            self._collect_dropped(name, before)
            expired += 1
            logger.info("trash of %r expired (older than %g days)", name, self.config.trash_days)
        return expired

    def _trash_loop(self) -> None:
        # Often enough that an entry outlives trash_days by a tenth at most,
        # never busier than once a second nor lazier than once a minute.
        interval = min(max(self.trash_expiry_s() / 10, 1.0), 60.0)
        while not self._stop.wait(interval):
            if not self.is_leader():
                continue  # the leader expires the trash; its records reach us through the log
            try:
                self.expire_trash(time.time())
            except Exception:
                logger.exception("trash expiry failed; retrying")

    def touch(self, name: str, owner: str, wait_s: float = -1.0) -> dict:
        """Create ``name`` empty, or give an existing file a new mtime."""
        token = self.lock_name(name, owner, wait_s)
        try:
            old = self.namespace.files.get(name)
            if old is None:
                empty = hashlib.sha256().hexdigest()
                entry = make_entry(0, self.config.chunk_size_bytes, empty, uuid.uuid4().hex, [],
                                   self.config.chunks_per_batch)
                self.log.commit([self.put(name, entry)])
            else:
                # Only the mtime changes: the placement is whatever it is when
                # the record applies, not what was read here.  The entry it
                # replaces is kept as a version like any other write's.
                before = self.namespace.entries_of(name)
                now = round(time.time(), 3)
                touched = {**old, "mtime": now}
                if old.get("meta"):
                    touched["meta"] = filemeta.renewed(old["meta"], now)
                self.log.commit([self.put(name, touched,
                                          base={"version": old["version"], "first": 0, "end": 0})])
                self._collect_dropped(name, before)
            self.notes.committed([(name, self.namespace.files[name])])
            return self.namespace.files[name]
        finally:
            self.locks.release(name, token)

    # --- snapshots (snapshots.py) --------------------------------------------------------
    def record_snapshot(self, root: str, members: list[tuple[str, int]]) -> dict:
        """Record a snapshot of tree ``root``: ``members`` are (name relative to root, version id).

        Resolves every member (FILE_NOT_FOUND if a version is not kept),
        writes the manifest to ``replication`` nodes, commits the small
        ``snapshot`` record, then checks that no member was dropped between
        resolving and committing (a race with retention); if one was, the
        snapshot is forgotten again and UNAVAILABLE asks for a new run.
        Returns the record as applied.
        """
        since = self.log.index
        lines, explicit, total = [], [], 0
        seen = set()
        for relative, vid in members:
            # No validate_name: a name not in the namespace fails find_entry, and every stored name was checked.
            name = f"{root}/{relative}"
            if relative in seen:
                raise protocol.RemoteProtocolError(f"{name[:200]!r} is listed twice in the snapshot")
            seen.add(relative)
            entry = self.namespace.find_entry(name, vid)
            if entry is None:
                raise protocol.FileNotFound(f"{name[:200]!r} has no kept version {vid}: it cannot enter the snapshot")
            if self.namespace.files.get(name) is not entry:
                explicit.append([name, vid])
            lines.append(snapshots.member_line(relative, entry))
            total += entry["size"]
        data = snapshots.encode_manifest(root, lines)
        batch_chunks = max(1, self.config.batch_bytes // snapshots.CHUNK_BYTES)
        blob = "snap-" + uuid.uuid4().hex
        chunks = -(-len(data) // snapshots.CHUNK_BYTES)
        self.check_writable()
        nodes = self.choose_replicas(len(data))
        self.active_blobs.add(blob)  # not an orphan while it is written
        try:
            for node_id in nodes:
                try:
                    meta_backup.write_system_blob(self, node_id, blob, data, batch_chunks)
                except protocol.BackupError as exc:
                    self.note_node_failure(node_id, exc)
                    self.collect_garbage(blob, nodes)
                    raise
            manifest = make_entry(len(data), snapshots.CHUNK_BYTES, hashlib.sha256(data).hexdigest(), blob,
                                  [[0, chunks, list(nodes)]], batch_chunks)
            record = {"op": "snapshot", "root": root, "t": round(time.time(), 3), "files": len(lines),
                      "bytes": total, "since": since, "manifest": manifest, "pins": explicit}
            snapshot_id = self.log.commit([record])
        finally:
            self.active_blobs.discard(blob)
        lost = [f"{root}/{relative}" for relative, vid in members
                if self.namespace.find_entry(f"{root}/{relative}", vid) is None]
        if lost:
            self.forget_snapshots([snapshot_id])
            raise protocol.Unavailable(f"{len(lost)} member(s) of the snapshot were dropped while it was "
                                       f"recorded (first: {lost[0]!r}); run the backup again")
        logger.info("snapshot %d of %r: %d files, %d bytes, manifest %d bytes on %s, %d explicit pin(s)",
                    snapshot_id, root, len(lines), total, len(data), ",".join(nodes), len(explicit))
        return self.namespace.snapshots[snapshot_id]

    def forget_snapshots(self, ids: list[int]) -> dict:
        """Drop snapshots (what ``prune`` calls): their manifests and the versions only they kept are freed.

        FILE_NOT_FOUND if an id is not a snapshot (nothing is dropped then).
        Returns {"ids": [...], "freed_bytes": data bytes (before replication)
        no longer held by anything}.
        """
        ids = sorted(set(ids))
        missing = [i for i in ids if i not in self.namespace.snapshots]
        if missing:
            raise protocol.FileNotFound(f"no snapshot {missing[0]} (see: snapshots)")
        space_before = sum(self.namespace.space().values())
        gone = [self.namespace.snapshots[i] for i in ids]
        # Every name under the roots that has older entries, not only those pinned now: a put may move an
        # entry into the pinned table between this look and the forget's commit.
        roots = {snap["root"] for snap in gone}
        names = {name for table in (self.namespace.pinned, self.namespace.versions, self.namespace.trash)
                 for name in list(table) if any(snapshots.under(root, name) for root in roots)}
        before = {name: self.namespace.entries_of(name) for name in names}
        self.log.commit([{"op": "forget", "ids": ids}])
        for snap in gone:
            self._collect_entry(snap["manifest"])
        for name, entries in before.items():
            self._collect_dropped(name, entries)
        freed = space_before - sum(self.namespace.space().values())
        logger.info("forgot snapshot(s) %s: %d bytes of data freed", ", ".join(map(str, ids)), freed)
        return {"ids": ids, "freed_bytes": freed}

    def read_manifest(self, snapshot_id: int) -> tuple[dict, list[dict], list[int]]:
        """(record, member documents, a bound of each one's JSON bytes) of a snapshot, its manifest read
        from the nodes (CRC-checked, SHA-256)."""
        snap = self.namespace.snapshots.get(snapshot_id)
        if snap is None:
            raise protocol.FileNotFound(f"no snapshot {snapshot_id} (see: snapshots)")
        name = snapshots.manifest_name(snapshot_id)
        entry = self.open_for_read(name, snapshot_id, any_kept=True)
        try:
            sha = hashlib.sha256()
            pieces = []
            for piece in transfers.read_range(self, name, entry, 0, entry["size"]):
                sha.update(piece)
                pieces.append(bytes(piece))
        finally:
            self.close_read(entry)
        if sha.hexdigest() != entry["sha256"]:
            raise protocol.ChecksumMismatch(f"the manifest of snapshot {snapshot_id} is damaged")
        try:
            header, lines, sizes = snapshots.decode_manifest(pieces)
        except ValueError as exc:
            raise protocol.DataLost(f"the manifest of snapshot {snapshot_id}: {exc}") from None
        root = header["root"]
        return (snap, [snapshots.member_document(root, line) for line in lines],
                [snapshots.document_bytes_bound(root, size) for size in sizes])

    def status(self) -> protocol.StatusReply:
        """Nodes and totals.  A node's usage is its last report plus the batches it acknowledged
        since (so an upload shows at once); totals count live nodes only, dead ones apart."""
        now = self.clock()
        waiting = self.waiting_for_nodes(now)
        with self._nodes_lock:
            # Bytes of a node heard from recently are there, even while it re-reports its inventory.
            heard = {n.node_id for n in self._nodes.values() if n.alive(now, self.config.dead_after_s)}
            nodes = [{
                "id": n.node_id,
                "address": transport.format_address(n.address),
                # Alive for users means usable: heard recently and inventory in.
                "alive": n.alive(now, self.config.dead_after_s) and n.reported,
                "state": self.node_state(n, now, waiting),
                "last_heard_s": None if n.last_heard is None else round(now - n.last_heard, 1),
                "capacity_bytes": n.capacity_bytes,  # what it offers (its config)
                # What it can hold in all: on disk now plus what it can still take
                # (less than capacity_bytes when its disk is smaller).
                "usable_bytes": n.stored_bytes + n.room_bytes,
                "used_bytes": n.stored_bytes,
                "free_bytes": n.room_bytes,
                "chunks": n.chunks,
                "full": n.full,
                "quarantined_bytes": n.quarantined_bytes,
                "brake": self.orphans.is_braked(n.node_id),
            } for n in sorted(self._nodes.values(), key=lambda n: n.node_id)]
            refused = [dict(r) for _, r in sorted(self._refused.items())]
        files = list(self.namespace.files.values())
        live = [n for n in nodes if n["id"] in heard]
        dead = [n for n in nodes if n["id"] not in heard]
        totals = {
            "nodes": len(nodes),
            "nodes_alive": sum(1 for n in nodes if n["alive"]),
            "files": len(files),
            "file_bytes": sum(f["size"] for f in files),
            # Data (before replication) of current files, of older versions only, of the trash only.
            **self.namespace.space(),
            "usable_bytes": sum(n["usable_bytes"] for n in live),
            "used_bytes": sum(n["used_bytes"] for n in live),
            "free_bytes": sum(n["free_bytes"] for n in live),
            "chunks": sum(n["chunks"] for n in live),
            # Last known usage of nodes not alive now: not reachable, so not in the totals above.
            "dead_used_bytes": sum(n["used_bytes"] for n in dead),
            "dead_chunks": sum(n["chunks"] for n in dead),
            "replication": self.config.replication,
            **self.repairer.status(),
            "cluster_id": self.namespace.cluster_id,
            "epoch": self.namespace.epoch,
            "quarantined_bytes": sum(n["quarantined_bytes"] for n in nodes),
            "commit_notes_pending": self.notes.pending(),
            **self.meta_backup.status(),
            "warnings": self.orphans.warnings() + [f"node {r['id']} at {r['address']} refused: {r['reason']}"
                                                   for r in refused],
        }
        return protocol.StatusReply(nodes=nodes, totals=totals, refused=refused,
                                    masters=self.replication.status() if self.replication else None)

    def explain_no_space(self, exc: protocol.BackupError) -> protocol.BackupError:
        """``exc``, and if it is INSUFFICIENT_SPACE, the same saying how the user can make room.

        With the trash on, a plain delete frees nothing until the trash
        expires, so on a full cluster the ways to make room at once are a
        purge and a prune.  The numbers are the monitor's, cached, so a directory upload
        failing file after file does not walk the namespace each time.
        """
        if not isinstance(exc, protocol.InsufficientSpace) or SPACE_HINT_MARK in exc.message:
            return exc
        try:
            totals = self.monitor.facts()["totals"]
        except Exception:  # a hint is not worth failing the reply over
            logger.exception("no space figures for the hint")
            totals = {}
        held = [f"{human_bytes(totals[key])} {what}" for key, what in (
            ("trash_bytes", "in the trash"), ("version_bytes", "in older versions"),
            ("snapshot_bytes", "in snapshots only")) if totals.get(key)]
        trash = (f"; a plain delete moves files to the trash, which frees nothing for "
                 f"{self.config.trash_days:g} days" if self.config.trash_days > 0 else "")
        return protocol.InsufficientSpace(
            f"{exc.message}. {SPACE_HINT_MARK} `delete --purge --yes NAME` (also for names in the trash: see "
            f"`trash`), and `prune --keep-...` (forgets old snapshots and what only they keep), free space "
            f"now{trash}"
            + (f" ({', '.join(held)})" if held else ""))

    def unknown_blobs(self, blobs) -> list[str]:
        """Those of ``blobs`` that no file and no upload in progress uses (orphans now)."""
        active = set(self.active_blobs)  # before the namespace: see Repairer.reconcile
        used = {blob for _, entry in self.namespace.all_entries() for blob in entry_blobs(entry)}
        return sorted(blob for blob in blobs if blob not in used and blob not in active)

    def reclaim_orphans(self, node_id: str) -> tuple[int, int]:
        """Operator's go-ahead after the brake: quarantine what it held back on ``node_id``."""
        with self._nodes_lock:
            if node_id not in self._nodes:
                raise protocol.Unavailable(f"node {node_id} is unknown")
        blobs, chunks = self.orphans.reclaim(node_id)
        logger.warning("operator reclaimed orphans on node %s: %d blob(s), %d chunks quarantined",
                       node_id, blobs, chunks)
        return blobs, chunks

    # --- garbage ----------------------------------------------------------------------
    def _collect_dropped(self, name: str, before: list[dict]) -> None:
        """Collect what entries of ``name`` kept ``before`` a commit, and dropped by it, used.

        The one place where a write or delete frees chunks: an entry that is
        no longer kept (the oldest version past keep_versions, or every
        version of a deleted name) gives back what no kept entry still uses.
        """
        after = self.namespace.entries_of(name)
        kept_ids = {history.version_id(e) for e in after}
        for entry in before:
            if history.version_id(entry) not in kept_ids:
                self._collect_entry(entry, keep=after)

    def _collect_entry(self, entry: dict, keep: list[dict] = ()) -> None:
        """Collect what a dropped entry used and no entry of ``keep`` uses.

        Blobs no kept entry uses are deleted whole; of a blob still used in
        part (versions share the untouched chunks of an append or write),
        only the chunk ranges no kept entry references are dropped.
        """
        still_used: dict[str, list] = defaultdict(list)  # blob -> sorted (first, count) kept
        for kept in keep:
            for run in kept["runs"]:
                still_used[run_blob(kept, run)].append((run[0], run[1]))
        for blob, ranges in still_used.items():
            still_used[blob] = merge_ranges(ranges)
        holders: dict[str, set] = defaultdict(set)
        items: list[tuple[str, tuple]] = []
        freed: dict[str, list] = defaultdict(list)
        for run in entry["runs"]:
            first, count, nodes = run[:3]
            blob = run_blob(entry, run)
            if blob not in still_used:
                holders[blob].update(nodes)
                continue
            for gap_first, gap_count in uncovered(first, count, still_used[blob]):
                items += [(node_id, (blob, gap_first, gap_count)) for node_id in nodes]
                freed[blob].append((gap_first, gap_count))
        for blob, nodes in holders.items():
            self.collect_garbage(blob, nodes)
            self._remember_dropped(blob)
        with self._garbage_cond:
            for blob, ranges in freed.items():
                self._freed_ranges[blob] = merge_ranges([*self._freed_ranges.pop(blob, ()), *ranges])
            while len(self._freed_ranges) > DROPPED_BLOBS_KEPT:
                self._freed_ranges.popitem(last=False)
        if items:
            with self._garbage_cond:
                for node_id, item in items:
                    self._garbage[node_id].add(item)
                self._garbage_cond.notify_all()

    def _remember_dropped(self, blob: str) -> None:
        """``blob`` was freed by a logged delete or replace: a copy a node reports later is garbage, not an orphan.

        Repair may have taken a dead node off the blob's runs before the
        delete, so the delete could not address that node; when it returns,
        reconciliation deletes its copy directly (``was_dropped``).  Kept in
        memory, the DROPPED_BLOBS_KEPT newest: after a restart such copies are
        orphans again, quarantined rather than erased.
        """
        with self._garbage_cond:
            self._dropped_blobs[blob] = None
            self._dropped_blobs.move_to_end(blob)
            while len(self._dropped_blobs) > DROPPED_BLOBS_KEPT:
                self._dropped_blobs.popitem(last=False)

    def was_dropped(self, blob: str) -> bool:
        return blob in self._dropped_blobs

    def freed_ranges(self, blob: str) -> list[tuple[int, int]]:
        """Chunk ranges of ``blob`` (still used in part) that a logged write, trim or delete freed.

        The garbage collector drops them only on the nodes that held them
        then; reconciliation drops a copy a node reports later (repair had
        taken it off while it was away).  Kept in memory for the
        DROPPED_BLOBS_KEPT newest blobs, like ``was_dropped``: after a
        restart such chunks are kept (never erase what the master does not
        know it freed).
        """
        with self._garbage_cond:
            return list(self._freed_ranges.get(blob, ()))

    def collect_garbage(self, blob: str, node_ids) -> None:
        """Ask ``node_ids`` to drop ``blob`` soon (in the background, with retries)."""
        with self._garbage_cond:
            for node_id in node_ids:
                self._garbage[node_id].add((blob, None, None))
            self._garbage_cond.notify_all()

    def pinned(self, blob: str) -> bool:
        """A download holds an entry whose chunks live in ``blob`` (open_for_read).

        It reads from the nodes that entry lists, which repair may since
        have taken off the placement: their copies must stay until it is done.
        """
        with self._garbage_cond:
            return blob in self._readers

    def _collectable(self) -> bool:
        """Some garbage is not pinned by a reader (caller holds _garbage_cond)."""
        return any(item[0] not in self._readers for items in self._garbage.values() for item in items)

    def _collect_on(self, node_id: str, items: set[tuple]) -> None:
        """Delete whole blobs and drop chunk ranges on one node."""
        conn = self.pool.acquire(node_id)
        try:
            blobs = sorted(blob for blob, first, _ in items if first is None)
            fence = self.fence()
            if blobs:
                for page, _ in protocol.pages(blobs):
                    conn.request(protocol.DeleteBlobs(blobs=page, **fence), protocol.BlobsDeleted)
            for blob, first, count in sorted(item for item in items if item[1] is not None):
                conn.request(protocol.DropChunks(blob=blob, first=first, count=count, **fence),
                             protocol.ChunksDropped)
        finally:
            self.pool.release(conn)

    def _take_garbage(self) -> dict[str, set]:
        """Garbage no reader pins, taken off the queue: node_id -> items (caller holds _garbage_cond)."""
        work = {}
        for node_id, items in list(self._garbage.items()):
            ready = {item for item in items if item[0] not in self._readers}
            if ready:
                work[node_id] = ready
                items -= ready
            if not items:
                del self._garbage[node_id]
        return work

    def _drain_garbage(self, budget_s: float = 2.0) -> None:
        """At a clean stop, one last bounded pass on the live nodes.

        The queue lives in memory: what a stop leaves behind becomes orphans
        that the next master quarantines (or that trip its brake), never lost
        data, but a clean stop should leave little of it.
        """
        live = {n.node_id for n in self.live_nodes()}
        with self._garbage_cond:
            work = self._take_garbage()
        deadline = time.monotonic() + budget_s
        for node_id, items in work.items():
            if node_id in live and time.monotonic() < deadline:
                try:
                    self._collect_on(node_id, items)
                except protocol.BackupError as exc:
                    logger.info("garbage for node %s left to the next master: %s", node_id, exc)

    def _gc_loop(self) -> None:
        while not self._stop.is_set():
            with self._garbage_cond:
                while not self._collectable() and not self._stop.is_set():
                    self._garbage_cond.wait(_GC_RETRY_S if self._garbage else None)
                work = self._take_garbage()
            failed = False
            for node_id, items in work.items():
                try:
                    self._collect_on(node_id, items)
                except protocol.BackupError as exc:
                    logger.debug("garbage for node %s deferred: %s", node_id, exc)
                    failed = True
                    with self._garbage_cond:
                        self._garbage[node_id] |= items
                except Exception:
                    logger.exception("garbage collection on node %s failed", node_id)
            if failed:
                # On the condition, not on _stop: a node registering again (its
                # garbage is why it failed) wakes the retry at once.
                with self._garbage_cond:
                    if not self._stop.is_set():
                        self._garbage_cond.wait(_GC_RETRY_S)


class MasterHandler(ObservedHandler, transport.RequestHandler):
    """Client and node requests to the master."""

    @property
    def master(self) -> Master:
        return self.server.master

    # --- nodes ---
    def do_REGISTER(self, msg: protocol.Register) -> None:
        self.master.register(msg, self.peer)
        self.reply(protocol.Registered(**self.master.fence()))

    def do_INVENTORY(self, msg: protocol.Inventory) -> None:
        self.master.inventory(msg)
        self.reply(protocol.InventoryOk())

    def do_HEARTBEAT(self, msg: protocol.Heartbeat) -> None:
        self.master.heartbeat(msg)
        self.reply(protocol.HeartbeatOk())

    def do_GOODBYE(self, msg: protocol.Goodbye) -> None:
        self.master.goodbye(msg)
        self.reply(protocol.GoodbyeOk())

    def do_MASTER_STATUS(self, msg: protocol.MasterStatus) -> None:
        """This master's own view of itself (any master of a group answers; client.py status asks each)."""
        if self.master.replication is None:
            raise protocol.UnknownOperation("this master is not in a replicated group")
        self.reply(protocol.MasterStatusReply(master=self.master.replication.own_status()))

    def do_RAFT(self, msg: protocol.RaftMessage) -> None:
        """A peer master's Raft message; no reply (the protocol answers with messages of its own)."""
        if self.master.replication is None:
            raise protocol.UnknownOperation("this master is not in a replicated group")
        self.master.replication.step(msg.msg, bytes(msg.body))

    def do_RAFT_PROBE(self, msg: protocol.RaftProbe) -> None:
        """A peer with an empty data dir asks whether it lost its state (replication.py)."""
        if self.master.replication is None:
            raise protocol.UnknownOperation("this master is not in a replicated group")
        self.reply(self.master.replication.probe_reply(msg.member))

    def do_MASTERS_REPLACE(self, msg: protocol.MastersReplace) -> None:
        if self.master.replication is None:
            raise protocol.UnknownOperation("this master is not in a replicated group")
        self.reply(self.master.replication.replace(msg.old, msg.new))

    # --- clients: uploads ---
    def setup(self):
        super().setup()
        self.session: transfers.UploadSession | None = None
        self.pending: list[PendingUpload] = []
        # Direct reads of this connection: read id -> [name, entry, offset, length, pinned until (clock)].
        self.reads: dict[str, list] = {}

    def finish(self):
        for read_id in list(self.reads):
            self._end_read(read_id)
        # The connection is gone: uploads not yet committed never will be.
        for upload in self.pending:
            if upload.stream is not None:
                upload.stream.discard()
                self.master.locks.release(upload.stream.name, upload.token)
        self.pending = []
        self._close_session()
        super().finish()

    def _dispatch(self, msg: protocol.Message) -> None:
        # In a replicated group followers refuse (NOT_LEADER) and reads wait for the read index.
        if self.master.replication is not None and not isinstance(msg, (protocol.RaftMessage, protocol.RaftProbe,
                                                                         protocol.MasterStatus)):
            try:
                self.master.replication.before_request(msg)
            except protocol.BackupError as exc:
                if isinstance(msg, protocol.UploadBegin):
                    self._fail_upload(exc, ended=False)  # its DATA frames are read and dropped
                elif isinstance(msg, protocol.UploadFiles):
                    self._fail_files(exc, len(msg.files) if isinstance(msg.files, list) else 1)
                else:
                    self._commit_pending()
                    self.reply(protocol.error_message(exc))
                return
        super()._dispatch(msg)

    def before_request(self, msg: protocol.Message) -> None:
        # Replies go out in request order, so a request other than an upload
        # first settles the uploads waiting to be committed as a group.
        if not isinstance(msg, (protocol.UploadBegin, protocol.UploadFiles)):
            self._commit_pending()

    def idle_deadline_s(self) -> float | None:
        # Pending grouped uploads hold their names' locks: the lease applies
        # to a client that goes quiet after an UPLOAD_END as to one that
        # goes quiet mid-upload.  Pinned direct reads end when their lease does.
        deadlines = []
        if self.pending:
            deadlines.append(self.master.config.lock_lease_s)
        if self.reads:
            now = self.master.clock()
            deadlines.append(max(0.0, min(read[4] for read in self.reads.values()) - now))
        return min(deadlines) if deadlines else None

    def on_idle(self) -> None:
        """A grouped upload went quiet past lock_lease_s: commit what it finished, release its locks.

        Its pending files are whole (UPLOAD_END came, SHA-256 checked), so
        they are committed, not discarded: the client sent them and will
        read their UPLOADED replies when it goes on, exactly as if the group
        had filled up.  Other writers no longer wait for an idle client.
        Direct reads whose read_lease_s ran out are unpinned.
        """
        self._expire_reads()
        if not self.pending:
            return
        logger.info("%s: silent for lock_lease_s with %d finished upload(s) pending; committing them",
                    self.peer, len(self.pending))
        self._commit_pending()

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def do_UPLOAD_BEGIN(self, msg: protocol.UploadBegin) -> None:
        """Receive one upload, append or write and stream it to the nodes.

        Exactly one reply per request: UPLOADED once committed, or ERROR
        (which may come before the client has sent UPLOAD_END; the rest of
        the upload's frames are then read and dropped).  Whole-file uploads
        may be committed with their group; appends and writes commit at once.
        """
        try:
            name = protocol.validate_name(msg.name, storing=True)
            if msg.mode not in UPLOAD_MODES:
                raise protocol.InvalidRange(f"unknown upload mode {msg.mode[:20]!r}")
            meta = None if msg.meta is None else filemeta.checked(msg.meta)
            if meta is not None and msg.mode != "replace":
                raise protocol.RemoteProtocolError("file metadata comes with a whole-file upload only")
            self.master.check_writable()
            if any(p.stream is not None and p.stream.name == name for p in self.pending):
                self._commit_pending()  # we hold that name's lock ourselves
            try:
                token = self.master.lock_name(name, self.peer, 0.0)
            except protocol.FileLocked:
                # About to wait: first commit the group, whose locks another
                # writer may be waiting for (two directory uploads in
                # opposite orders would otherwise deadlock).
                self._commit_pending()
                token = self.master.lock_name(name, self.peer, msg.wait_s)
        except protocol.BackupError as exc:
            self._fail_upload(exc, ended=False)
            return
        if self.session is None:
            self.session = transfers.UploadSession(self.master)
        self._upload_ended = False
        stream = None
        kept = False  # the lock and stream now belong to self.pending
        old = self.master.namespace.files.get(name)
        try:
            if msg.mode == "replace":
                # The client's chunk CRCs are used only if cut as we cut (see UploadBegin.chunk_size).
                stream = transfers.UploadStream(self.session, name,
                                                client_crcs=msg.chunk_size == self.session.chunk_size)
                if self._receive_upload(stream):
                    entry = filemeta.stamp(stream.seal(self._client_sha256), meta)
                    self.pending.append(PendingUpload(stream, token, entry, msg.tag))
                    kept = True
                    if not msg.group or self._group_full():
                        self._commit_pending()
                return
            stream = self._receive_mutation(msg, name, old)
            if stream is not None:
                self._commit_pending()  # earlier replies first
                self.pending.append(PendingUpload(stream, token, stream.entry, msg.tag, stream.base))
                kept = True
                self._commit_pending()
        except protocol.BackupError as exc:
            if isinstance(exc, protocol.RemoteProtocolError):
                raise
            logger.warning("%s: %s %r failed: %s", self.peer, upload_words(msg.mode, old is None), name, exc)
            self._release_upload(stream, name, token)
            kept = True  # released above
            self._fail_upload(exc, self._upload_ended)
        finally:
            if not kept:
                self._release_upload(stream, name, token)

    def _group_full(self) -> bool:
        return len(self.pending) >= GROUP_MAX_FILES or \
            sum(p.entry["size"] for p in self.pending if p.entry is not None) >= GROUP_MAX_BYTES

    def do_UPLOAD_FILES(self, msg: protocol.UploadFiles) -> None:
        """Many small whole files in one frame: each answered as its own grouped upload would be.

        Per file: name and metadata checks, the name's lock, a blob of its
        own, the client's SHA-256 recorded and its CRCs checked by the nodes
        -- as for UPLOAD_BEGIN.  Shared: one PUT_BLOBS per node for all of
        them, and the group commit they join (one FLUSH per node, one log
        record).  A file that fails alone (a bad name, a busy lock) gets its
        ERROR in its place among the replies; a placement failure fails every
        file of the frame.  Locks are taken in name order, the group pending
        before committed first if one must be waited for, so two batch
        uploaders never wait for each other in a cycle.
        """
        layout = protocol.upload_files_layout(msg.files, msg.chunk_size, len(msg.body))
        if not all(protocol.is_sha256_hex(item[2]) for item in msg.files):
            raise protocol.RemoteProtocolError("an UPLOAD_FILES sha256 is not 64 hex digits")
        try:
            self.master.check_writable()
        except protocol.BackupError as exc:
            self._fail_files(exc, len(msg.files))
            return
        chunk_size = self.master.config.chunk_size_bytes
        body = memoryview(msg.body)
        errors: list[protocol.BackupError | None] = [None] * len(msg.files)
        files: dict[int, tuple] = {}  # position -> (name, meta, crcs, payload)
        seen: set[str] = set()
        for index, ((name, _size, sha256, meta, _tag), (crc_start, start, size)) in enumerate(zip(msg.files,
                                                                                                  layout)):
            try:
                name = protocol.validate_name(name, storing=True)
                if name in seen:
                    raise protocol.FileLocked(f"{name!r} comes twice in one UPLOAD_FILES")
                seen.add(name)
                meta = None if meta is None else filemeta.checked(meta)
                crcs, payload = body[crc_start:start], body[start:start + size]
                if msg.chunk_size != chunk_size:
                    # Cut otherwise than here: the master checks the bytes against the client's
                    # SHA-256 and computes the CRCs (the path of UploadStream without client CRCs).
                    if hashlib.sha256(payload).hexdigest() != sha256:
                        raise protocol.ChecksumMismatch(f"upload of {name!r} arrived corrupted")
                    crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(payload, chunk_size))
                files[index] = (name, meta, crcs, payload)
            except protocol.BackupError as exc:
                errors[index] = exc
        if any(p.stream is not None and p.stream.name in seen for p in self.pending):
            self._commit_pending()  # we hold that name's lock ourselves
        tokens: dict[int, object] = {}
        streams: dict[int, transfers.UploadStream] = {}
        try:
            for index in sorted(files, key=lambda i: files[i][0]):
                try:
                    try:
                        tokens[index] = self.master.lock_name(files[index][0], self.peer, 0.0)
                    except protocol.FileLocked:
                        self._commit_pending()  # see do_UPLOAD_BEGIN: a writer may wait for its locks
                        tokens[index] = self.master.lock_name(files[index][0], self.peer, msg.wait_s)
                except protocol.BackupError as exc:
                    errors[index] = exc
            if self.session is None:
                self.session = transfers.UploadSession(self.master)
            for index in sorted(tokens):
                streams[index] = transfers.UploadStream(self.session, files[index][0], client_crcs=True)
            self.session.send_small_files([(streams[i], files[i][2], files[i][3]) for i in sorted(streams)])
        except BaseException as exc:
            # Nothing of this frame is pending yet: its locks and whatever it sent go now.
            for index, token in tokens.items():
                self._release_upload(streams.get(index), files[index][0], token)
                errors[index] = exc
            if not isinstance(exc, protocol.BackupError) or isinstance(exc, protocol.RemoteProtocolError):
                raise
            logger.warning("%s: upload of %d file(s) failed: %s", self.peer, len(streams), exc)
            streams = {}
            # Uploads pending from earlier frames went out on this session's
            # channels: they are made durable and committed before it closes
            # (as _fail_upload does), or no FLUSH would ever reach their nodes.
            self._commit_pending()
            self._close_session()  # a failed node may have left a channel out of sync
        for index, (_name, _size, sha256, _meta, tag) in enumerate(msg.files):
            stream = streams.get(index)
            if stream is None:
                error = protocol.error_message(self.master.explain_no_space(errors[index]))
                self.pending.append(PendingUpload(None, None, None, tag, error=error))
            else:
                entry = filemeta.stamp(stream.file_entry(sha256), files[index][1])
                self.pending.append(PendingUpload(stream, tokens[index], entry, tag))
        if self._group_full():
            self._commit_pending()

    def _fail_files(self, exc: protocol.BackupError, count: int) -> None:
        """Answer every file of a failed UPLOAD_FILES, after the replies of the uploads before it."""
        self._commit_pending()
        error = protocol.error_message(self.master.explain_no_space(exc))
        for _ in range(count):
            self.reply(error, flush=False)
        self.wfile.flush()

    def _release_upload(self, stream, name: str, token) -> None:
        if stream is not None:
            stream.discard()
        self.master.locks.release(name, token)

    def _receive_upload(self, stream: transfers.UploadStream, data_sha=None) -> bool:
        """Read DATA frames into ``stream`` up to UPLOAD_END; False if abandoned.

        Sets ``_upload_ended`` once the upload's last frame has been read, so
        a failure after it does not skip frames of the next request, and
        ``_client_sha256`` to the hash the client sent.  Each frame must
        arrive within lock_lease_s: a writer that stops making progress loses
        its lock (the connection is closed and nothing is committed).
        """
        lease = self.master.config.lock_lease_s
        while True:
            space = stream.free_space()
            frame = self.next_message(timeout_s=lease, body_buffer=space)
            if frame is None:
                logger.info("%s: disconnected mid-upload of %r; nothing committed", self.peer, stream.name)
                self._upload_ended = True
                return False
            if isinstance(frame, protocol.Data):
                if data_sha is not None:
                    data_sha.update(frame.body)
                if stream.client_crcs:
                    stream.crcs_for(len(frame.body))
                if len(frame.body) <= len(space):
                    stream.filled(len(frame.body))  # read_message put it in place
                else:
                    stream.write(frame.body)
            elif isinstance(frame, protocol.DataCrcs):
                if stream.client_crcs:  # else cut otherwise than here: ignored
                    # read into free space: copied out before the DATA
                    stream.take_crcs(frame.body, frame.crc32, frame.crcs_crc32)
            elif isinstance(frame, protocol.UploadEnd):
                self._upload_ended = True
                self._client_sha256 = frame.sha256
                return True
            elif isinstance(frame, protocol.UploadAbort):
                logger.info("%s: aborted upload of %r; nothing committed", self.peer, stream.name)
                self._upload_ended = True
                return False
            else:
                raise protocol.RemoteProtocolError(f"{frame.OP} inside an upload")

    def _receive_mutation(self, msg: protocol.UploadBegin, name: str, old: dict | None):
        """An append or in-place write: copy-on-write of the chunks it touches.

        The new bytes, plus the old bytes that share their first and last
        chunk, go to a new blob starting at the first touched chunk; untouched
        chunks keep their replicas (namespace.splice_runs).  Returns the
        stream, with ``entry`` set to the new file entry and ``base`` to what
        it was derived from (re-based on the current placement at commit),
        or None if the client abandoned it.
        """
        config = self.master.config
        size = old["size"] if old else 0
        chunk_size = config.chunk_size_bytes
        if old is not None and old["chunk_size"] != chunk_size:
            raise protocol.InvalidRange(f"{name!r} was stored with {old['chunk_size']}-byte chunks; "
                                        f"the cluster now uses {chunk_size}: re-upload it instead")
        offset = size if msg.mode == "append" else msg.offset
        if not 0 <= offset <= size:
            raise protocol.InvalidRange(f"offset {offset} is outside {name!r} (size {size})")
        first_chunk = offset // chunk_size
        stream = transfers.UploadStream(self.session, name, first_chunk=first_chunk)
        try:
            head = offset - first_chunk * chunk_size
            if head:  # the old bytes before the offset in the first touched chunk
                for piece in transfers.read_range(self.master, name, old, offset - head, head):
                    stream.write(piece)
            data_sha = hashlib.sha256()
            if not self._receive_upload(stream, data_sha):
                stream.discard()
                return None
            if self._client_sha256 != data_sha.hexdigest():
                raise protocol.ChecksumMismatch(f"{msg.mode} to {name!r} arrived corrupted")
            end = offset + stream.written - head
            tail_end = min(size, -(-end // chunk_size) * chunk_size)
            if end < tail_end:  # the old bytes after the data in the last touched chunk
                for piece in transfers.read_range(self.master, name, old, end, tail_end - end):
                    stream.write(piece)
            stream.flush()
            new_size = max(size, end)
            end_chunk = first_chunk + -(-stream.written // chunk_size)
            runs = splice_runs(old, stream.runs, first_chunk, end_chunk)
            stream.entry = make_entry(new_size, chunk_size, "", stream.blob, runs, stream.session.chunks_per_batch)
            if old is not None and old.get("meta"):  # the same file, written now
                stream.entry["meta"] = filemeta.renewed(old["meta"], stream.entry["mtime"])
            stream.base = None if old is None else {"version": old["version"], "first": first_chunk,
                                                    "end": end_chunk}
            stream.needs_sha = True
        except BaseException:
            stream.discard()  # whatever it sent is garbage now
            raise
        return stream

    def _fail_upload(self, exc: protocol.BackupError, ended: bool) -> None:
        """Answer a failed upload, after the replies of the uploads before it."""
        self._commit_pending()
        self._close_session()  # a failed node may have left a channel out of sync
        self.reply(protocol.error_message(self.master.explain_no_space(exc)))
        if not ended:
            self._skip_upload()

    def _commit_pending(self) -> None:
        """Make the waiting uploads durable on their nodes, commit them, reply.

        Copies that a node failing mid-upload took with it are re-made from
        the surviving replica first (UploadSession.heal_entry); an upload
        left with no surviving copy of some batch fails alone.
        """
        if not self.pending:
            return
        everything, self.pending = self.pending, []
        replies: list[protocol.Message | None] = [p.error for p in everything]
        group = [p for p in everything if p.error is None]
        if not group:  # only files of an UPLOAD_FILES that failed alone
            self._send_replies(replies)
            return
        session = self.session
        ready = []
        uncertain: set[int] = set()  # a log commit failed: these may be on disk anyway
        describe = defaultdict(list)  # the nodes learn what they hold, with the FLUSH
        for p in group:
            item = notes.describe(p.stream.name, p.entry)
            if notes.fits_a_page(item):
                for node_id in notes.entry_nodes(p.entry) & p.stream.nodes_touched:
                    describe[node_id].append(item)
        try:
            session.sync(set().union(*(p.stream.nodes_touched for p in group)), describe)
            for index, p in enumerate(everything):
                if p.error is not None:
                    continue
                try:
                    p.entry = session.heal_entry(p.stream.name, p.entry, p.stream.nodes_touched)
                    if getattr(p.stream, "needs_sha", False):
                        p.entry = {**p.entry, "sha256": self._file_sha256(p.stream.name, p.entry)}
                    ready.append((index, p))
                except protocol.BackupError as exc:
                    logger.warning("%s: upload of %r failed: %s", self.peer, p.stream.name, exc)
                    replies[index] = protocol.error_message(self.master.explain_no_space(exc))
            if ready:
                uncertain = {index for index, _ in ready}
                self.master.commit_uploads([(p.stream.name, p.entry, p.base) for _, p in ready])
                uncertain = set()
            for index, p in ready:
                e = p.entry
                # The name's lock is still held: the current entry is the one just committed.
                current = self.master.namespace.files.get(p.stream.name)
                replies[index] = protocol.Uploaded(name=p.stream.name, size=e["size"], chunks=e["chunks"],
                                                   sha256=e["sha256"], version=e["version"], tag=p.tag,
                                                   version_id=None if current is None else
                                                   history.version_id(current))
        except Exception as exc:
            logger.error("%s: commit of %d upload(s) failed: %s", self.peer, len(group), exc)
            error = exc if isinstance(exc, protocol.BackupError) else protocol.BackupError(f"commit failed: {exc}")
            error = self.master.explain_no_space(error)
            replies = [r if isinstance(r, protocol.Error) else protocol.error_message(error) for r in replies]
            if not isinstance(exc, protocol.BackupError):
                raise
        finally:
            for index, p in enumerate(everything):
                if p.error is not None:
                    continue
                # Never collect what a failed log write may still have made
                # durable: after the restart such a failure requires, the
                # node's reconciliation deletes it if it was not committed.
                if not isinstance(replies[index], protocol.Uploaded) and index not in uncertain:
                    p.stream.discard()
                self.master.locks.release(p.stream.name, p.token)
            if session.failed:
                self._close_session()  # start the next group on fresh connections
        self._send_replies(replies)

    def _send_replies(self, replies: list[protocol.Message]) -> None:
        for reply in replies:
            self.reply(reply, flush=False)
        self.wfile.flush()

    def _file_sha256(self, name: str, entry: dict) -> str:
        """SHA-256 of a file as stored, read back from the nodes.

        After an append or write the whole-file hash must cover old and new
        bytes; hashlib cannot resume from a stored state, so the master reads
        the file once (CRC-checked) before committing.  Costs O(file size).
        """
        sha = hashlib.sha256()
        for piece in transfers.read_range(self.master, name, entry, 0, entry["size"]):
            sha.update(piece)
        return sha.hexdigest()

    def _skip_upload(self) -> None:
        """Discard the rest of a failed upload's frames, up to its end."""
        while True:
            frame = self.next_message()
            if frame is None or isinstance(frame, (protocol.UploadEnd, protocol.UploadAbort)):
                return
            if not isinstance(frame, (protocol.Data, protocol.DataCrcs)):
                raise protocol.RemoteProtocolError(f"{frame.OP} inside an upload")

    def do_SYNC(self, msg: protocol.Sync) -> None:
        self.reply(protocol.Synced())

    # --- clients: the rest ---
    def do_DOWNLOAD(self, msg: protocol.Download) -> None:
        name = protocol.validate_name(msg.name)
        if msg.read_id is not None:
            # A direct read falling back to the master: the bytes of the version it pinned.
            self._send_file(msg, self._pinned_read(msg.read_id, name)[1])
            return
        entry = self._open_for_read(name, msg.version, msg.at, msg.snapshot)
        if msg.direct:
            self._start_read(msg, entry)
            return
        try:
            self._send_file(msg, entry)
        finally:
            self.master.close_read(entry)

    def _open_for_read(self, name: str, version: int | None, at: float | None, snapshot: int | None) -> dict:
        """The entry a DOWNLOAD (or a file of READ_PLANS) reads, pinned (Master.open_for_read)."""
        if snapshot is None:
            return self.master.open_for_read(name, version, at)
        if version is None:
            raise protocol.RemoteProtocolError("a snapshot download names the version")
        if snapshot not in self.master.namespace.snapshots:
            raise protocol.FileNotFound(f"no snapshot {snapshot} (see: snapshots)")
        return self.master.open_for_read(name, version, any_kept=True)

    # --- clients: direct reads (the client fetches the chunks from the nodes) ---
    def _start_read(self, msg: protocol.Download, entry: dict) -> None:
        """Answer READ_PLAN for ``entry`` (already pinned): the pin now belongs to this connection."""
        try:
            offset, length = self._read_range(msg, entry)
            read_id = uuid.uuid4().hex[:16]
            plan = self.master.read_plan(read_id, msg.name, entry, offset, length)
        except BaseException:
            self.master.close_read(entry)
            raise
        self.reads[read_id] = [msg.name, entry, offset, length, self.master.clock() + self.master.config.read_lease_s]
        self.reply(plan)

    def do_READ_PLANS(self, msg: protocol.ReadPlans) -> None:
        """Pin and plan each file of a directory restore; answer the plans in pages (READ_PLANS_PAGE).

        One request and a few frames for up to MAX_PLAN_FILES files instead
        of a DOWNLOAD and a READ_PLAN each: the per-frame work (JSON, a send)
        is what a small file's plan cost.  A file that cannot be read gets
        an error entry, and the others go on.  Plans are built as the pages
        are cut, so only one page is held.
        """
        files = msg.files
        if len(files) > protocol.MAX_PLAN_FILES or not all(
                isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and (item[1] is None or type(item[1]) is int) for item in files):
            raise protocol.RemoteProtocolError(f"READ_PLANS files are at most {protocol.MAX_PLAN_FILES} "
                                               f"[name, version id or null] pairs")
        expires = self.master.read_expiry()
        known: dict[str, str] = {}  # node id -> address, of every plan built so far
        batch = uuid.uuid4().hex[:12]
        plans = (self._batch_plan(f"{batch}.{index}", name, version, msg.snapshot, expires, known)
                 for index, (name, version) in enumerate(files))
        for page, last in protocol.pages(plans):
            nodes = {node_id: known[node_id] for plan in page for run in plan.get("runs", ())
                     for node_id in run[2] if node_id in known}
            self.reply(protocol.ReadPlansPage(plans=page, nodes=nodes, expires=expires, done=last), flush=last)

    def _batch_plan(self, read_id: str, name: str, version: int | None, snapshot: int | None, expires: int,
                    nodes: dict) -> dict:
        """One file's entry of a READ_PLANS_PAGE: its plan (the read registered), or its error."""
        try:
            name = protocol.validate_name(name)
            entry = self._open_for_read(name, version, None, snapshot)
        except protocol.BackupError as exc:
            return {"name": name[:protocol.MAX_NAME_BYTES], "error": exc.code, "message": exc.message[:1024]}
        try:
            plan = self.master.plan_fields(read_id, name, entry, 0, entry["size"], None, BATCH_PLAN_RUNS, expires,
                                           nodes)
        except BaseException:
            self.master.close_read(entry)
            raise
        self.reads[read_id] = [name, entry, 0, entry["size"], self.master.clock() + self.master.config.read_lease_s]
        return plan

    def _pinned_read(self, read_id: str, name: str | None = None) -> list:
        read = self.reads.get(read_id)
        if read is None or (name is not None and read[0] != name):
            raise protocol.Timeout(f"no read {read_id[:32]!r} of {name or 'a file'} is open on this connection "
                                   f"(ended, or its lease of read_lease_s ran out)")
        return read

    def do_READ_MORE(self, msg: protocol.ReadMore) -> None:
        read = self._pinned_read(msg.read_id)
        name, entry, offset, length, _ = read
        read[4] = self.master.clock() + self.master.config.read_lease_s
        self.reply(self.master.read_plan(msg.read_id, name, entry, offset, length, msg.chunk))

    def do_READ_END(self, msg: protocol.ReadEnd) -> None:
        if len(msg.read_ids) > protocol.MAX_CHUNK_RANGES or not all(isinstance(i, str) for i in msg.read_ids):
            raise protocol.RemoteProtocolError("malformed READ_END read_ids")
        reads = [self._pinned_read(read_id) for read_id in msg.read_ids]
        try:
            if msg.bad:
                for name, entry, *_ in reads:  # each checks the copies of its own blobs
                    self.master.check_reported_copies(name, entry, msg.bad)
        finally:
            for read_id in msg.read_ids:
                self._end_read(read_id)
        self.reply(protocol.ReadEnded())

    def _end_read(self, read_id: str) -> None:
        read = self.reads.pop(read_id, None)
        if read is not None:
            self.master.close_read(read[1])

    def _expire_reads(self) -> None:
        now = self.master.clock()
        for read_id, read in list(self.reads.items()):
            if read[4] <= now:
                logger.info("%s: read of %r not renewed within read_lease_s; unpinned", self.peer, read[0])
                self._end_read(read_id)

    @staticmethod
    def _read_range(msg: protocol.Download, entry: dict) -> tuple[int, int]:
        """(offset, length) of a DOWNLOAD's range in ``entry``; InvalidRange if it lies outside."""
        size = entry["size"]
        if msg.offset < 0 or msg.offset > size:
            raise protocol.InvalidRange(f"offset {msg.offset} is outside {msg.name!r} (size {size})")
        if msg.length < -1:  # -1 alone means "to the end"
            raise protocol.InvalidRange(f"length {msg.length} is negative")
        return msg.offset, size - msg.offset if msg.length < 0 else min(msg.length, size - msg.offset)

    def _send_file(self, msg: protocol.Download, entry: dict) -> None:
        size = entry["size"]
        _, length = self._read_range(msg, entry)
        self.reply(protocol.FileInfo(name=msg.name, size=size, chunks=entry["chunks"], sha256=entry["sha256"],
                                     mtime=entry["mtime"], version=entry["version"],
                                     offset=msg.offset, length=length, meta=entry.get("meta")), flush=False)
        try:
            for piece in transfers.read_range(self.master, msg.name, entry, msg.offset, length):
                self.reply(protocol.Data(body=piece), flush=False)
        except protocol.BackupError as exc:
            logger.error("%s: download of %r failed: %s", self.peer, msg.name, exc)
            self.reply(protocol.error_message(exc))
            return
        self.reply(protocol.DataEnd())

    def do_DELETE(self, msg: protocol.Delete) -> None:
        name = protocol.validate_name(msg.name)
        self.master.delete(name, self.peer, msg.wait_s, purge=bool(msg.purge))
        self.reply(protocol.Deleted(name=name))

    def do_UNDELETE(self, msg: protocol.Undelete) -> None:
        name = protocol.validate_name(msg.name)
        entry = self.master.undelete(name, self.peer, msg.wait_s)
        self.reply(protocol.Undeleted(name=name, size=entry["size"], version_id=history.version_id(entry)))

    def do_TRASH(self, msg: protocol.Trash) -> None:
        expiry_s = self.master.trash_expiry_s()
        infos = [{"name": name, "id": history.version_id(e), "size": e["size"], "sha256": e["sha256"],
                  "mtime": e["mtime"], "trashed_at": e["trashed_at"], "expires_at": e["trashed_at"] + expiry_s}
                 for name, e in self.master.namespace.trash_listing(msg.prefix)]
        for page, last in protocol.pages(infos):
            self.reply(protocol.TrashPage(entries=page, done=last), flush=last)

    def do_TOUCH(self, msg: protocol.Touch) -> None:
        name = protocol.validate_name(msg.name, storing=True)
        entry = self.master.touch(name, self.peer, msg.wait_s)
        self.reply(protocol.Touched(name=name, size=entry["size"], version=entry["version"]))

    def do_STAT(self, msg: protocol.Stat) -> None:
        """The file's fields and one page of its runs, from chunk ``from_chunk`` on.

        A run that starts before ``from_chunk`` is cut to start there, so
        paging by chunk lists every chunk exactly once even if repairs merge
        or split runs between two pages.
        """
        name = protocol.validate_name(msg.name)
        if msg.from_chunk < 0:
            raise protocol.InvalidRange(f"from_chunk {msg.from_chunk} is negative")
        e = self.master.namespace.lookup_version(name, msg.version, msg.at)
        pager = protocol.pages(_runs_from(e, msg.from_chunk))
        runs, last = next(pager)
        next_chunk = -1 if last else next(pager)[0][0][0]
        self.reply(protocol.StatReply(name=name, size=e["size"], chunks=e["chunks"], chunk_size=e["chunk_size"],
                                      sha256=e["sha256"], mtime=e["mtime"], version=e["version"], runs=runs,
                                      run_count=len(e["runs"]), next_chunk=next_chunk,
                                      node_chunks={} if msg.from_chunk else _node_chunks(e),
                                      version_id=history.version_id(e),
                                      committed_at=history.entry_committed_at(e)))

    def do_VERSIONS(self, msg: protocol.Versions) -> None:
        name = protocol.validate_name(msg.name)
        entries = self.master.namespace.history(name)
        if not entries:
            raise protocol.FileNotFound(f"no file named {name!r}")
        infos = [history.version_info(e, current=n == len(entries) - 1) for n, e in enumerate(entries)]
        for page, last in protocol.pages(infos):
            self.reply(protocol.VersionsPage(entries=page, done=last), flush=last)

    def do_SNAPSHOT_ADD(self, msg: protocol.SnapshotAdd) -> None:
        """Read every page of members, then record the snapshot (one reply, after the last page)."""
        members, page, error = [], msg, None
        lease = self.master.config.lock_lease_s
        while True:
            if error is None:
                try:
                    root = protocol.validate_name(msg.root, storing=True)
                    if page.root != msg.root:
                        raise protocol.RemoteProtocolError("the pages of a snapshot name different roots")
                    for member in page.members:
                        if not (isinstance(member, list) and len(member) == 2 and isinstance(member[0], str)
                                and type(member[1]) is int):
                            raise protocol.RemoteProtocolError("a snapshot member is [relative name, version id]")
                        members.append((member[0], member[1]))
                    if len(members) > snapshots.MAX_MEMBERS:
                        raise protocol.FrameTooLarge(f"a snapshot has at most {snapshots.MAX_MEMBERS} members")
                except protocol.BackupError as exc:
                    error, members = exc, []
            if page.done:
                break
            page = self.next_message(timeout_s=lease)
            if page is None:
                return  # the client went away: nothing recorded
            if not isinstance(page, protocol.SnapshotAdd):
                raise protocol.RemoteProtocolError(f"{page.OP} inside a snapshot's member list")
        if error is not None:
            raise error
        snap = self.master.record_snapshot(root, members)
        self.reply(protocol.SnapshotMade(id=snap["i"], root=snap["root"], time=snap["t"], files=snap["files"],
                                         bytes=snap["bytes"], pins=len(snap["pins"])))

    def do_SNAPSHOTS(self, msg: protocol.Snapshots) -> None:
        listing = self.master.namespace.snapshot_listing(None if msg.root is None else msg.root.rstrip("/"))
        for page, last in protocol.pages(listing):
            self.reply(protocol.SnapshotsPage(entries=page, done=last), flush=last)

    def do_SNAPSHOT_MEMBERS(self, msg: protocol.SnapshotMembers) -> None:
        _, members, sizes = self.master.read_manifest(msg.id)
        bound = dict(zip(map(id, members), sizes))
        for page, last in protocol.pages(members, size=lambda doc: bound[id(doc)]):
            self.reply(protocol.SnapshotMembersPage(entries=page, done=last), flush=last)

    def do_SNAPSHOT_FORGET(self, msg: protocol.SnapshotForget) -> None:
        if not all(type(i) is int for i in msg.ids):
            raise protocol.RemoteProtocolError("snapshot ids are integers")
        outcome = self.master.forget_snapshots(msg.ids)
        self.reply(protocol.SnapshotsForgotten(ids=outcome["ids"], freed_bytes=outcome["freed_bytes"]))

    def do_LOCKS(self, msg: protocol.Locks) -> None:
        for page, last in protocol.pages(self.master.locks.held()):
            self.reply(protocol.LocksReply(locks=page, done=last), flush=last)

    def do_LIST(self, msg: protocol.List) -> None:
        entries = ({"name": name, "size": e["size"], "chunks": e["chunks"], "mtime": e["mtime"],
                    "sha256": e["sha256"],
                    **({"meta": e["meta"]} if "meta" in e else {})}
                   for name, e in self.master.namespace.listing(msg.prefix))
        for page, last in protocol.pages(entries):
            self.reply(protocol.ListPage(entries=page, done=last), flush=last)

    def do_STATUS(self, msg: protocol.Status) -> None:
        status = self.master.status()
        totals, refused, masters = status.totals, status.refused, status.masters
        for page, last in protocol.pages(status.nodes):
            self.reply(protocol.StatusReply(nodes=page, totals=totals, done=last, refused=refused,
                                            masters=masters), flush=last)
            totals, refused, masters = {}, [], None  # on the first page only

    def do_RECLAIM_ORPHANS(self, msg: protocol.ReclaimOrphans) -> None:
        blobs, chunks = self.master.reclaim_orphans(msg.node_id)
        self.reply(protocol.OrphansReclaimed(node_id=msg.node_id, blobs=blobs, chunks=chunks))

    def do_HEALTH(self, msg: protocol.Health) -> None:
        self.reply(protocol.HealthReply(**self.master.monitor.health()))


def _runs_from(entry: dict, chunk: int):
    """STAT runs ``[first, count, nodes, blob]`` of ``entry`` from ``chunk`` on (the first one cut to start there)."""
    runs = entry["runs"]
    for index in range(first_covering(runs, chunk), len(runs)):
        run = runs[index]
        first, count, nodes = run[:3]
        start = max(first, chunk)
        yield [start, first + count - start, nodes, run_blob(entry, run)]


def _node_chunks(entry: dict) -> dict[str, int]:
    """node id -> chunks of the file it holds."""
    held: dict[str, int] = defaultdict(int)
    for run in entry["runs"]:
        for node_id in run[2]:
            held[node_id] += run[1]
    return dict(sorted(held.items()))


def make_server(master: Master | None, host: str, port: int, config: config_module.Config | None = None,
                security: transport.Security | None = None, handler=MasterHandler) -> transport.Server:
    """The master's server; ``master`` None (with ``config``, ``security``, ``handler``) while recovering."""
    config = config or master.config
    server = transport.Server(
        (host, port), handler, server_id="master",
        io_timeout_s=config.io_timeout_s,
        # Nodes heartbeat on an open connection; clients may think between
        # requests.  Past this an idle connection is closed.
        idle_timeout_s=max(config.io_timeout_s, 300.0),
        security=security or master.security, max_connections=config.max_connections)
    server.master = master
    return server


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the master of the backup system.")
    config_module.add_common_flags(parser)
    config_module.add_server_flags(parser)
    parser.add_argument("--host", help="address to listen on (default from config)")
    parser.add_argument("--port", type=int, help="port to listen on; 0 = any free port")
    parser.add_argument("--data-dir", help="directory for the metadata log and checkpoint")
    parser.add_argument("--masters", metavar="HOST:PORT,HOST:PORT,...",
                        help="every master of a replicated group, this one included (default [cluster] masters)")
    parser.add_argument("--raft-dial", metavar="ID=HOST:PORT,...",
                        help="connect to peer master ID at HOST:PORT instead of its listed address "
                             "(default [raft] dial)")
    parser.add_argument("--dead-after", type=float, metavar="S", help="seconds of silence before a node is dead")
    parser.add_argument("--heartbeat-interval", type=float, metavar="S",
                        help="seconds between node heartbeats (checked against --dead-after)")
    parser.add_argument("--io-timeout", type=float, metavar="S", help="seconds a network read or write may take")
    parser.add_argument("--safe-mode", type=float, metavar="S",
                        help="seconds after start with no repair or deletion (default from config)")
    parser.add_argument("--repair-rate", type=float, metavar="MB_S", help="re-replication speed limit in MB/s")
    parser.add_argument("--keep-versions", type=int, metavar="N",
                        help="versions kept per name, the current one included (default [retention] keep_versions)")
    parser.add_argument("--trash-days", type=float, metavar="DAYS",
                        help="days a deleted file stays in the trash; 0 = none (default [retention] trash_days)")
    parser.add_argument("--meta-backup-interval", type=float, metavar="S",
                        help="seconds between copies of the checkpoint stored on the nodes (default from config)")
    parser.add_argument("--join", action="store_true",
                        help="with an empty data dir: join an existing replicated group as a new master (then run "
                             "`client.py masters replace OLD NEW` on a client); --masters names the group's masters")
    parser.add_argument("--recover-from-nodes", action="store_true",
                        help="rebuild a lost metadata dir (--data-dir must be empty) from what the nodes hold, "
                             "print a report, then serve")
    parser.add_argument("--http-port", type=config_module.http_port, metavar="PORT",
                        help="status page and /metrics port (default [http] port, 7780); 0 = off; any = any free port")
    logsetup.add_log_flags(parser)
    return parser


def start_status_page(master: Master, host: str, port: int, token: str | None, master_address: str):
    """The web status page, or None if it is off or cannot listen (the master serves on without it).

    Prints ``status page on http://HOST:PORT/`` (before ``listening on``)
    so scripts and tests that asked for any free port can find it.
    """
    if port == 0:
        return None
    try:
        web = web_status.start(master.monitor, host, port, token, master_address)
    except OSError as exc:
        logger.error("status page off: cannot listen on %s:%s: %s", host, port, exc.strerror)
        return None
    print(f"status page on {web.url}", flush=True)
    logger.info("status page on %s%s", web.url, " (token required)" if token else "")
    return web


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        config = config_module.load_config(
            args.config, master_host=args.host, master_port=args.port, master_data_dir=args.data_dir,
            dead_after_s=args.dead_after, heartbeat_interval_s=args.heartbeat_interval,
            io_timeout_s=args.io_timeout, safe_mode_s=args.safe_mode, repair_rate_mb_s=args.repair_rate,
            keep_versions=args.keep_versions, trash_days=args.trash_days,
            meta_backup_interval_s=args.meta_backup_interval, http_port=args.http_port, masters=args.masters,
            raft_dial=args.raft_dial, **config_module.security_overrides(args))
        security = security_module.for_server(config, config.master_host, args.insecure)
        http_host = config.http_host or config.master_host
        http_token = web_status.page_token(config, security, http_host, args.insecure) if config.http_port else None
    except ValueError as exc:
        print(f"master: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        # Held until the process exits: a second master must not replay, append to or truncate this op log.
        data_dir_lock = dirlock.lock_data_dir(config.master_data_dir)  # noqa: F841
    except dirlock.DataDirLocked as exc:
        print(f"master: {exc}; only one master may use a data dir", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"master: cannot use data dir {config.master_data_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_START_FAILED
    try:
        logsetup.configure("master", args.log_level, args.log_file, args.log_format)
    except OSError as exc:
        print(f"master: cannot write log file {args.log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_START_FAILED
    if args.recover_from_nodes:
        return recover_and_serve(config, security)
    try:
        master = Master(config, config.master_data_dir, security=security, join=args.join)
    except Exception as exc:  # a metadata problem must stop the start, loudly
        logger.exception("cannot load metadata from %s", config.master_data_dir)
        print(f"master: cannot load metadata from {config.master_data_dir}: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    try:
        server = make_server(master, config.master_host, config.master_port)
    except OSError as exc:
        print(f"master: cannot listen on {config.master_host}:{config.master_port}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_START_FAILED
    if master.replication is not None:  # it refuses (in a thread) if its state is lost: stop serving
        master.replication.on_refused = lambda: threading.Thread(target=server.shutdown, daemon=True).start()
    master.start()
    logger.info("serving %s with %d files from %s", server.address_text, len(master.namespace.files),
                os.path.abspath(config.master_data_dir))
    web = start_status_page(master, http_host, config.http_port, http_token, server.address_text)

    def stop():
        if web is not None:
            web.stop()
        master.stop()
        logger.info("stopped")

    transport.serve_until_stopped(server, stop)
    if master.replication is not None and master.replication.refused:
        print(f"master: refusing to start: {master.replication.refused}", file=sys.stderr)
        return EXIT_LOST_STATE
    return EXIT_OK


def recover_and_serve(config: config_module.Config, security: transport.Security) -> int:
    """``--recover-from-nodes``: collect the nodes' reports, rebuild the metadata dir, then serve on it."""
    data_dir = config.master_data_dir
    if os.path.isdir(data_dir) and set(os.listdir(data_dir)) - {dirlock.LOCK_NAME}:
        print(f"master: --recover-from-nodes needs an empty data dir; {data_dir} is not empty "
              f"(move it aside first)", file=sys.stderr)
        return EXIT_CONFIG
    collector = recovery.RecoveryCollector(config, lambda locate: NodePool(locate, config.io_timeout_s, security))
    try:
        server = make_server(None, config.master_host, config.master_port, config, security,
                             handler=recovery.RecoveryHandler)
    except OSError as exc:
        print(f"master: cannot listen on {config.master_host}:{config.master_port}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_START_FAILED
    server.collector = collector
    outcome = {"master": None, "status": EXIT_OK}

    def recover() -> None:
        logger.warning("recovering the metadata from the nodes into %s", os.path.abspath(data_dir))
        try:
            report = collector.run(data_dir)
            master = Master(config, data_dir, security=security)
        except (recovery.RecoveryFailed, OSError, ValueError, protocol.BackupError) as exc:
            logger.error("recovery failed: %s", exc)
            print(f"master: recovery failed: {exc}", file=sys.stderr, flush=True)
            outcome["status"] = EXIT_START_FAILED
            server.shutdown()
            return
        line = recovery.report_line(report)
        logger.warning("%s", line)
        print(line, flush=True)
        server.master = master
        server.RequestHandlerClass = MasterHandler  # new connections; nodes re-register on their own
        master.start()
        outcome["master"] = master
        # A fresh copy of the rebuilt checkpoint in the cluster, once the nodes are back.
        while master.repairer.in_safe_mode() and not master._stop.wait(0.5):
            pass
        master.meta_backup.backup(force=True)

    threading.Thread(target=recover, name="recovery", daemon=True).start()

    def stop():
        if outcome["master"] is not None:
            outcome["master"].stop()
        logger.info("stopped")

    transport.serve_until_stopped(server, stop)
    return outcome["status"]


if __name__ == "__main__":
    sys.exit(main())
