"""Storage node: keeps chunks on disk and serves them to the master.

A node is deliberately simple.  It owns a ``ChunkStore`` (append-only
segment files, see chunk_store.py), answers the master's PUT_CHUNKS /
FLUSH / GET_CHUNKS / DELETE_BLOBS requests, and keeps itself known to the
master by registering and heartbeating on a connection of its own, which it
re-opens whenever it drops.  Names live on the master, but the node keeps
a description of the file every blob belongs to (node_catalog.py), so the
master's metadata can be rebuilt from the nodes if it is lost.

The node checks every CRC on the way in (a batch corrupted in transit is
refused, never stored) and on the way out: a chunk whose bytes rotted is
dropped and named in the reply's ``corrupt`` list, never served, while the
other chunks of the same request are (the master fetches just the bad ones
from another replica).  Its identity, a random id created on
first start, is kept in ``node.json`` in its data dir, so a restarted node
is recognised and its chunks remain reachable; beside it, the cluster it
belongs to and the highest master epoch it has seen (fencing.py): a node
obeys no master of another cluster and no stale master.  Blobs the master
does not know are quarantined, never erased at once (see ``_quarantine_loop``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import threading
import time

import config as config_module
import dirlock
import logsetup
import master_link
import protocol
import security as security_module
import transport
from chunk_store import ChunkStore, StoreFormatError
from fencing import NodeIdentity
from node_catalog import NodeCatalog

logger = logging.getLogger("storage_node")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_START_FAILED = 3
# The data dir holds chunks of a newer store format (chunk_store.StoreFormatError):
# nothing was changed; run the release that wrote them.
EXIT_STORE_FORMAT = 4

# Bytes written between two background fsyncs (see StorageNode._note_written).
WRITE_BEHIND_BYTES = 16 * 1024 * 1024
# After ENOSPC although statvfs showed room (quotas, reserved blocks), report
# ourselves full until the free space grows by a batch, or for this long.
DISK_FULL_BACKOFF_S = 60.0
# Batches a node reads at once over all its connections (one buffer each,
# allocated on first need and reused): eight uploads write at once, more
# wait a moment for a buffer, and a flood of connections cannot make the
# node hold more than eight batches of request bodies.
BODY_BUFFERS = 8
# While the master cannot be reached, say so at the first failure and then
# once per this many seconds: a mistyped --master must show, but not flood.
UNREACHABLE_LOG_INTERVAL_S = 60.0
# A stopping node waits at most this long to say goodbye to its master.
GOODBYE_TIMEOUT_S = 2.0
# With several masters, the least time a heartbeat reply may take before the node
# looks for another leader (the bound is [raft] election_ms, at least this): a
# leader answers heartbeats at once, but a loaded machine must not make every
# node leave a healthy leader.
HEARTBEAT_REPLY_MIN_S = 1.0


class OutageLog:
    """Logs an outage at its first failure, then at most once per ``interval_s``, and its end."""

    def __init__(self, interval_s: float, clock=time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.since: float | None = None  # start of the current outage
        self.failures = 0
        self._logged_at = float("-inf")

    def failed(self, message: str, level: int = logging.WARNING) -> None:
        now = self.clock()
        if self.since is None:
            self.since, self.failures = now, 0
        self.failures += 1
        if now - self._logged_at >= self.interval_s:
            self._logged_at = now
            if self.failures == 1:
                logger.log(level, "%s", message)
            else:
                logger.log(level, "%s (failing for %.0f s, %d attempts)", message, now - self.since, self.failures)

    def recovered(self) -> float | None:
        """End the outage; its length in seconds, or None if there was none."""
        if self.since is None:
            return None
        lasted, self.since, self._logged_at = self.clock() - self.since, None, float("-inf")
        return lasted
# A mostly dead active segment at least this large is rolled so that
# compaction can reclaim it (ChunkStore.roll_if_dead): an aborted upload's
# space comes back without waiting for the segment to fill.  Each pass rolls
# at most once and compacts the rolled segment at once, so small segments
# do not pile up.
ROLL_DEAD_ACTIVE_MIN_BYTES = 1024 * 1024
# A node without room for one more batch compacts segments this dead, not
# just compact_dead_fraction: on a full disk, copying live records is the
# only way to get the dead ones' space back.
FULL_DEAD_FRACTION = 0.1
# A node that was without room for one more batch (a write left it so, it
# refused one, or it saw so in a report) stays that eager this long after: the
# space of an aborted upload coming back can lift it just over a batch, and the
# files its user then deletes to make room must still come back at once.
LOW_ROOM_EAGER_S = 60.0
LOW_ROOM_MESSAGE = "low on room"  # starts the log line that says so (tests look for it)
# After a delete, compaction waits this long for more deletes before it runs.
COMPACT_AFTER_DELETE_S = 0.5
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Longest pause between two looks for quarantined blobs whose grace is over.
QUARANTINE_SWEEP_S = 60.0


class StorageNode:
    """A node's state: identity, chunk store, and the heartbeat loop.

    Handlers call ``put``, ``flush``, ``get``, ``delete_blobs``; ``start``
    launches the heartbeat thread; ``stop`` ends it.
    """

    def __init__(self, config: config_module.Config, data_dir: str, store: ChunkStore | None = None,
                 security: transport.Security | None = None):
        self.config = config
        self.security = security or transport.NO_SECURITY  # secret and TLS, both directions
        self._last_leader: tuple[str, int] | None = None  # where the heartbeat loop last registered
        self.data_dir = data_dir
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.identity = NodeIdentity(data_dir)
        self.node_id = self.identity.node_id
        self.store = store or ChunkStore(os.path.join(data_dir, "chunks"), config.segment_max_bytes)
        self.catalog = NodeCatalog(data_dir)
        self.catalog.prune(self.store.holds)  # blobs erased just before a crash
        self._refusal_logged: str | None = None  # last master refusal logged (one line per change)
        self.advertised_address: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._unsynced_lock = threading.Lock()
        self._unsynced_bytes = 0
        self._flush_wanted = threading.Event()
        self._corrupt_lock = threading.Lock()
        self._corrupt: list = []  # (blob, first, count) runs dropped as corrupt, not yet reported
        self._disk_full_until = 0.0
        self._disk_full_free = 0  # free_bytes when the disk last said ENOSPC
        self._low_room_at = None  # time.monotonic() when it last had no room for a batch (LOW_ROOM_EAGER_S)
        self._put_seq_lock = threading.Lock()
        self._put_seq = 0  # PUT_CHUNKS stored since start; see put() and the heartbeat
        self._compact_wanted = threading.Event()  # space was freed or is short: compact soon
        self._report_wanted = threading.Event()  # send a heartbeat now (free space changed)

    # --- requests from the master -------------------------------------------
    def put(self, msg: protocol.PutChunks) -> protocol.PutOk:
        """Store one batch; the PUT_OK that answers it.

        The reply's ``seq`` is the batch's sequence number (see ``put_seq``);
        with ``node_crcs`` the node computes the chunks' CRCs itself and the
        reply's ``crcs_crc32`` is their digest.  Refused with
        INSUFFICIENT_SPACE if it does not fit ``free_bytes`` (capacity, or the
        filesystem's free space less the reserve) or the disk says ENOSPC
        anyway.
        """
        self.identity.check(msg.cluster_id, msg.epoch, "a write")
        if msg.node_crcs:
            crc_bytes, payload = None, msg.body
        else:
            crc_bytes, payload = protocol.split_chunk_body(msg.body, msg.count)
        free = self._check_room(len(payload))
        if crc_bytes is None:
            crc_bytes = protocol.payload_crcs(payload, msg.count, msg.chunk_size)
        digests = None if msg.payload_crc32 is None or msg.crcs_crc32 is None else (msg.payload_crc32, msg.crcs_crc32)
        self._store(free, msg.blob, msg.first, msg.count, msg.chunk_size, crc_bytes, payload, msg.node_crcs,
                    digests)
        seq = self._stored(len(payload))
        return protocol.PutOk(blob=msg.blob, first=msg.first, count=msg.count, seq=seq,
                              crcs_crc32=protocol.crcs_digest(crc_bytes) if msg.node_crcs else None)

    def put_blobs(self, msg: protocol.PutBlobs) -> protocol.PutOk:
        """Store every item of a PUT_BLOBS (many small files' batches); one PUT_OK for all.

        Every CRC of every item is checked before anything is written, so a
        damaged item leaves nothing of the request behind (CHECKSUM_MISMATCH),
        as for a PUT_CHUNKS.  One sequence number for the request: it is one
        batch for ``put_seq`` and the master's accounting.
        """
        self.identity.check(msg.cluster_id, msg.epoch, "a write")
        body = memoryview(msg.body).cast("B")
        layout = protocol.put_blobs_layout(msg.blobs, msg.chunk_size, len(body))
        for blob, first, _count, crc_start, start, nbytes in layout:
            bad = protocol.verify_chunks(body[start:start + nbytes], body[crc_start:start], msg.chunk_size)
            if bad >= 0:
                raise protocol.ChecksumMismatch(f"blob {blob} chunk {first + bad}: CRC does not match payload")
        total = sum(item[5] for item in layout)
        free = self._check_room(total)
        for blob, first, count, crc_start, start, nbytes in layout:
            self._store(free, blob, first, count, msg.chunk_size, body[crc_start:start],
                        body[start:start + nbytes], True)
        seq = self._stored(total)
        return protocol.PutOk(blob=layout[0][0], first=layout[0][1], count=sum(item[2] for item in layout),
                              seq=seq)

    def _check_room(self, nbytes: int) -> int:
        """``free_bytes``, after raising INSUFFICIENT_SPACE if ``nbytes`` of payload do not fit it."""
        free = self.free_bytes
        self._note_room(free - nbytes if nbytes <= free else 0)
        if nbytes > free:
            raise protocol.InsufficientSpace(
                f"node {self.node_id} is full: {free} bytes free for chunks, {nbytes} needed "
                f"({self.store.used_bytes} of {self.config.capacity_bytes} bytes used, "
                f"{self.config.reserve_bytes} of disk space kept in reserve)")
        return free

    def _store(self, free: int, blob: str, first: int, count: int, chunk_size: int, crc_bytes, payload,
               crcs_of_payload: bool, sent_digests: tuple[int, int] | None = None) -> None:
        """``store.put``, with a full disk (ENOSPC) turned into INSUFFICIENT_SPACE and a back-off."""
        try:
            self.store.put(blob, first, count, chunk_size, crc_bytes, payload, crcs_of_payload=crcs_of_payload,
                           sent_digests=sent_digests)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                self._disk_full_free = free + len(payload)  # full until this much is free
                self._disk_full_until = time.monotonic() + DISK_FULL_BACKOFF_S
                self._note_room(0)
                self._report_wanted.set()
                self._compact_wanted.set()
                raise protocol.InsufficientSpace(f"node {self.node_id} is out of disk space") from None
            raise protocol.BackupError(f"node {self.node_id} cannot write: {exc.strerror}") from None

    def _stored(self, nbytes: int) -> int:
        """Count one stored request of ``nbytes`` of payload; its sequence number."""
        with self._put_seq_lock:
            self._put_seq += 1
            seq = self._put_seq
        self._note_written(nbytes)
        return seq

    @property
    def put_seq(self) -> int:
        """Batches stored since start.  Read it BEFORE reading used/free for a report: every
        batch whose PUT_OK carried a seq up to it is then counted in that report."""
        with self._put_seq_lock:
            return self._put_seq

    @property
    def batch_bytes(self) -> int:
        """Payload bytes of one full batch: the room a node needs to take one more."""
        return self.config.chunks_per_batch * self.config.chunk_size_bytes

    def _note_room(self, free: int) -> None:
        """Remember when the node last had less than a batch of room (see LOW_ROOM_EAGER_S); say so when it
        starts."""
        if free < self.batch_bytes:
            now, last = time.monotonic(), self._low_room_at
            self._low_room_at = now
            if last is None or now - last >= LOW_ROOM_EAGER_S:
                logger.info("%s: less than a batch of room left (%d bytes): compacting eagerly until %.0f s "
                            "after this lasts", LOW_ROOM_MESSAGE, max(free, 0), LOW_ROOM_EAGER_S)

    @property
    def free_bytes(self) -> int:
        """Bytes of chunks this node can still take: within capacity_bytes and, on the
        filesystem, above reserve_bytes (statvfs, read now: freed space shows at once)."""
        free = self.config.capacity_bytes - self.store.used_bytes
        disk_free = self.store.disk_free_bytes()
        if disk_free is not None:
            free = min(free, disk_free - self.config.reserve_bytes)
        return max(free, 0)

    def delete_blobs(self, blobs: list) -> int:
        """Tombstone blobs (durable on return) and forget their catalog entries; on a disk too full
        for the tombstones, forget them.

        A full disk must still be able to free space: without room for even
        a tombstone, the blobs are forgotten in memory (ChunkStore.forget_blobs)
        and compaction reclaims their segments.
        """
        try:
            count = self.store.delete_blobs(blobs)
            self.store.flush()
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            count = self.store.forget_blobs(blobs)
            logger.warning("disk full: %d deleted blob(s) forgotten without a tombstone; compaction "
                           "reclaims them (a restart before that finds them again, as orphans)", count)
        # Their quarantine marks and descriptions go with them (node_catalog.py); if
        # the disk cannot take even that, the next start prunes them (NodeCatalog.prune).
        try:
            self.catalog.forget_blobs(blobs, self.store.holds)
            self.catalog.flush()
        except OSError as exc:
            logger.warning("catalog not updated for %d deleted blob(s): %s", len(blobs), exc)
        if count:
            self._compact_wanted.set()
        return count

    def drop_range(self, blob: str, first: int, count: int) -> int:
        """ChunkStore.drop_range, durable on return; on a disk too full for the record, forget the range."""
        try:
            dropped = self.store.drop_range(blob, first, count)
            if dropped:
                self.store.flush()
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            dropped = self.store.forget_range(blob, first, count)
            logger.warning("disk full: %s chunks %d..%d forgotten without a drop record", blob, first,
                           first + count - 1)
        if dropped:
            self._compact_wanted.set()
        return dropped

    def get(self, msg: protocol.GetChunks, for_client: bool = False) -> protocol.ChunkData:
        """The chunks asked for that are intact, naming (and zeroing) the ones that are not.

        Corrupt chunks are dropped by the store and named in this reply, and
        reported in the next heartbeat too: the reply may never be read (the
        connection drops, the master dies, or a download is abandoned with
        replies still in flight), and until a report the master keeps this
        node listed for chunks it no longer holds.  A second report is
        harmless: the master only takes the node off chunks still placed on
        it, counts a run once, and keeps a copy a repair put here after the
        report was made (see queue_corrupt).
        When a client asked (``for_client``, a direct read) the CRCs are not
        checked here at all: the client checks every one anyway (so each is
        computed once per read, not twice: issue 15), lists the chunks that
        fail in READ_END, and the master reads them itself (which checks,
        drops and reports them here as above) before it changes anything.
        So a client's word alone never removes a copy.  If the client never
        tells, the scrubber finds them.  Most client reads do not come here:
        one stored extent holds them, and NodeHandler sends it from the file
        (``open_client_read``); this serves the rest (chunks missing, or in
        several records).
        """
        chunk_size, crc_bytes, payload, missing, corrupt = self.store.get_intact(msg.blob, msg.first, msg.count,
                                                                                 verify=not for_client)
        if len(missing) + len(corrupt) > protocol.MAX_CHUNK_RANGES:
            raise protocol.ChecksumMismatch(f"blob {msg.blob} chunks {msg.first}+{msg.count}: "
                                            f"{len(missing) + len(corrupt)} damaged or missing runs")
        if corrupt:
            logger.error("read of %s hit corrupt chunks %s; dropped them", msg.blob,
                         ", ".join(f"{first}+{count}" for first, count in corrupt[:10]))
            self._flush_drops()
            self.queue_corrupt([(msg.blob, first, count) for first, count in corrupt])
        return protocol.ChunkData(blob=msg.blob, first=msg.first, count=msg.count, chunk_size=chunk_size,
                                  missing=[list(r) for r in missing] or None,
                                  corrupt=[list(r) for r in corrupt] or None, body=crc_bytes + payload)

    def open_client_read(self, msg: protocol.GetChunks) -> tuple[protocol.ChunkData, object] | None:
        """A client's read that one stored extent holds: (CHUNK_DATA without its body, the pinned Span), or None.

        The node checks nothing on a client's read (``get`` says why), so it
        need not see the bytes at all: the caller sends the span's byte
        ranges of the segment file as the body (sendfile), then closes the
        span (ChunkStore.close_span).  A whole record's reply carries its
        payload CRC (CHUNK_DATA ``crc32``), so the client checks it with one
        CRC32 instead of one per chunk.  None: chunks missing, or in several
        extents; answer with ``get`` instead.
        """
        span = self.store.open_span(msg.blob, msg.first, msg.count)
        if span is None:
            return None
        return protocol.ChunkData(blob=msg.blob, first=msg.first, count=msg.count, chunk_size=span.chunk_size,
                                  crc32=span.payload_crc), span

    def _flush_drops(self) -> None:
        """Make drops of corrupt chunks durable; a failure is logged, not raised.

        Until a restart a dropped chunk is gone either way; if the drop
        record is lost, the chunk comes back after one and is found again.
        """
        try:
            self.store.flush()
        except OSError:
            logger.exception("cannot make the drop of corrupt chunks durable")

    def _note_written(self, nbytes: int) -> None:
        """Wake the write-behind flusher every WRITE_BEHIND_BYTES written.

        Syncing in the background while a large upload streams in means the
        master's final FLUSH finds little left to write, so the commit waits
        for the last few megabytes, not for the whole file.
        """
        with self._unsynced_lock:
            self._unsynced_bytes += nbytes
            if self._unsynced_bytes < WRITE_BEHIND_BYTES:
                return
            self._unsynced_bytes = 0
        self._flush_wanted.set()

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            if self._stop.is_set():
                return
            try:
                self.store.flush()
            except OSError:
                # The store is now failed: every later PUT and FLUSH is refused.
                logger.exception("background flush failed; refusing writes until restart")
            except ValueError:
                return  # store closed: we are stopping

    # --- heartbeats -----------------------------------------------------------
    def start(self, advertised_address: tuple[str, int]) -> None:
        self.advertised_address = advertised_address
        disk_free = self.store.disk_free_bytes()
        if disk_free is not None and disk_free <= self.config.reserve_bytes:
            logger.warning("only %d bytes free on the filesystem of %s, reserve_bytes is %d: this node takes "
                           "no chunks until space is freed", disk_free, self.data_dir, self.config.reserve_bytes)
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._flush_loop, name="write-behind", daemon=True).start()
        threading.Thread(target=self._compact_loop, name="compact", daemon=True).start()
        threading.Thread(target=self._quarantine_loop, name="quarantine", daemon=True).start()
        if self.config.scrub_rate_mb_s > 0:
            threading.Thread(target=self._scrub_loop, name="scrub", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._flush_wanted.set()
        self._report_wanted.set()
        self._compact_wanted.set()

    def _wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Sleep up to timeout_s or until event is set (it is then cleared); True if stopping."""
        event.wait(timeout_s)
        event.clear()
        return self._stop.is_set()

    def _beat_wait(self, interval: float, conn=None) -> bool:
        """``_wait`` between heartbeats (woken early by a free-space change); True once stopping.

        With ``conn`` (several masters) the wait also ends when the master
        closes the connection (killed, or stepped down), raising Unavailable,
        so the node looks for the new leader at once, not at its next heartbeat.
        """
        if conn is None:
            return self._wait(self._report_wanted, interval)
        deadline = time.monotonic() + interval
        while True:
            woken = self._report_wanted.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            if self._stop.is_set():
                return True
            if woken:
                self._report_wanted.clear()
                return False
            if time.monotonic() >= deadline:
                return False
            if conn.peer_closed():
                raise protocol.Unavailable("the master closed the connection")

    def _heartbeat_loop(self) -> None:
        """Register with the master, then heartbeat; reconnect on any failure.

        Every ``inventory_interval_s`` the node registers again on purpose,
        so its inventory is reconciled even if nothing went wrong: surplus
        copies left by races (see repair.py) do not linger.  An unreachable
        master is logged at WARNING at once and then every
        UNREACHABLE_LOG_INTERVAL_S; a master that answers a heartbeat with
        ERROR UNAVAILABLE is reachable and wants our inventory again, which
        is logged as such.
        """
        link = self.master_link()
        interval = self.config.heartbeat_interval_s
        if link.replicated:
            # A heartbeat at least every election timeout: a paused or cut-off leader (it never
            # closes the connection) is noticed about when its followers elect another.
            interval = min(interval, max(HEARTBEAT_REPLY_MIN_S, self.config.raft_election_ms / 1000))
        outage = OutageLog(UNREACHABLE_LOG_INTERVAL_S)
        election_backoff = master_link.BACKOFF_FIRST_S
        while not self._stop.is_set():
            reconnect_now = election_wait = False
            where = link.describe()
            try:
                with link.connect() as conn:
                    where = transport.format_address(conn.address)
                    self._last_leader = conn.address
                    host, port = self.advertised_address
                    if host in ("", "0.0.0.0", "::"):
                        # Bound to every interface: advertise the one that reaches the master.
                        host = conn.sock.getsockname()[0]
                    put_seq = self.put_seq  # before the usage it covers
                    registered = conn.request(protocol.Register(
                        node_id=self.node_id, host=host, port=port,
                        capacity_bytes=self.config.capacity_bytes,
                        used_bytes=self.store.used_bytes, chunks=self.store.chunk_count,
                        free_bytes=self.free_bytes, put_seq=put_seq,
                        cluster_id=self.identity.cluster_id or "", epoch=self.identity.epoch), protocol.Registered)
                    # The master checked us; we check it too: only we know what we must protect.
                    writable = self.identity.check_master(registered.cluster_id, registered.epoch,
                                                          holds_data=self.store.blob_count > 0)
                    self.send_inventory(conn)
                    self._refusal_logged = None
                    down_s = outage.recovered()
                    logger.info("registered with master %s as %s:%d%s%s", where, host, port,
                                "" if down_s is None else f" (it was unreachable for {down_s:.0f} s)",
                                "" if writable else " (it is recovering its metadata: reads only)")
                    election_backoff = master_link.BACKOFF_FIRST_S
                    if link.replicated:
                        # Only heartbeats from here on, which a leader answers at once: one that
                        # does not within an election timeout is paused or cut off, and its
                        # followers are electing another; look for that one (see below).
                        conn.sock.settimeout(min(self.config.io_timeout_s,
                                                 max(HEARTBEAT_REPLY_MIN_S, self.config.raft_election_ms / 1000)))
                    report_due = time.monotonic() + self.config.inventory_interval_s
                    # Woken early when free space changes (deletes, compaction,
                    # ENOSPC), so the master places by the disk as it is now.
                    while not self._beat_wait(interval, conn if link.replicated else None):
                        if time.monotonic() >= report_due:
                            reconnect_now = True  # a scheduled re-report
                            break
                        corrupt = self.take_corrupt_reports()
                        put_seq = self.put_seq  # before the usage it covers
                        try:
                            conn.request(protocol.Heartbeat(
                                node_id=self.node_id, used_bytes=self.store.used_bytes,
                                chunks=self.store.chunk_count, full=self.full,
                                corrupt=[list(c) for c in corrupt], free_bytes=self.free_bytes,
                                put_seq=put_seq,
                                quarantined_bytes=self.store.bytes_of(self.catalog.quarantined())),
                                protocol.HeartbeatOk)
                        except BaseException as exc:
                            self.queue_corrupt(corrupt)  # report them on the next connection
                            if isinstance(exc, protocol.NotLeader):
                                # It lost the leadership: find the new leader now.
                                logger.info("master %s is no longer the leader: %s", where, exc)
                                reconnect_now = link.follow(exc)
                                election_wait = not reconnect_now
                                break
                            if isinstance(exc, protocol.Timeout) and link.replicated:
                                # A paused or cut-off leader: look for the one the others elect.
                                link.mark_down(conn.address)
                            if isinstance(exc, protocol.Unavailable) and not conn.broken:
                                # An ERROR frame, not a lost connection: the master is there.
                                logger.info("master asked to re-register: %s", exc)
                                reconnect_now = True
                                break
                            raise
            except protocol.AuthFailed as exc:
                outage.failed(f"cannot register with master {where}: {exc}", logging.ERROR)
            except protocol.NotLeader as exc:
                # REGISTER or INVENTORY refused by a follower: go to the leader it names at once,
                # or wait a little while an election runs (not a heartbeat interval: the new
                # leader places nothing until enough nodes have registered with it).
                reconnect_now = link.follow(exc)
                election_wait = not reconnect_now
            except (protocol.WrongCluster, protocol.StaleMaster) as exc:
                # One line per change, not one per retry: the node keeps
                # every byte and keeps trying until the right master is back.
                if self._refusal_logged != exc.message:
                    self._refusal_logged = exc.message
                    logger.error("refusing master %s, keeping all data and retrying: %s", where, exc.message)
            except (protocol.Unavailable, protocol.Timeout, protocol.NoLeader) as exc:
                outage.failed(f"master {where} unreachable, retrying every {interval:g} s: {exc}")
                # Several masters: a lost leader is replaced within an election, look for it at once
                # (connect() waits for it); NoLeader means it already looked for failover_timeout_s.
                reconnect_now = link.replicated and not isinstance(exc, protocol.NoLeader)
            except protocol.BackupError as exc:
                # Not the network: a frame we could not build, or one the
                # master refused.  It fails again on every retry: say so as
                # an error, not as an outage.
                outage.failed(f"registering or heartbeating with master {where} failed, retrying every "
                              f"{interval:g} s: {exc.code}: {exc}", logging.ERROR)
            except Exception:
                logger.exception("heartbeat loop failed; retrying")
            if reconnect_now:
                continue
            if election_wait:
                self._stop.wait(election_backoff)
                election_backoff = min(election_backoff * 2, master_link.BACKOFF_MAX_S)
                continue
            self._stop.wait(interval)

    def say_goodbye(self) -> None:
        """Tell the master we are stopping, so it stops using us now (best effort, bounded wait)."""
        link = self.master_link(min(self.config.io_timeout_s, GOODBYE_TIMEOUT_S))
        link.failover_timeout_s = min(link.failover_timeout_s, GOODBYE_TIMEOUT_S)
        where = link.describe()
        try:
            with link.connect() as conn:
                where = transport.format_address(conn.address)
                conn.request(protocol.Goodbye(node_id=self.node_id), protocol.GoodbyeOk)
        except protocol.BackupError as exc:
            logger.info("could not say goodbye to master %s: %s", where, exc)
            return
        logger.info("said goodbye to master %s", where)

    def master_link(self, timeout_s: float | None = None) -> master_link.MasterLink:
        """A MasterLink to the leader of ``[cluster] masters`` (or the one ``[node] master``).

        Each connect() tries every master once more per round, so the
        heartbeat loop finds a new leader by itself; with one master a
        failure goes up at once, as it always did.
        """
        link = master_link.MasterLink(config_module.master_addresses(self.config, "node_master"), "node",
                                      timeout_s or self.config.io_timeout_s, self.security,
                                      failover_timeout_s=self.config.failover_timeout_s, expect_server_id=None)
        if self._last_leader is not None and self._last_leader in link.addresses:
            link.current = self._last_leader
        return link

    def send_inventory(self, conn) -> None:
        """Tell the master every extent held, in pages cut by size, so it can reconcile.

        Pages are built as they are sent (protocol.inventory_pages), never the
        whole inventory at once: a node with a million extents sends a few
        hundred frames, each well under MAX_HEADER_BYTES.
        """
        quarantined = self.catalog.quarantined()
        for page, last in protocol.inventory_pages(self.store.iter_inventory()):
            conn.request(protocol.Inventory(node_id=self.node_id, blobs=page, done=last,
                                            quarantined=[item[0] for item in page if item[0] in quarantined]),
                         protocol.InventoryOk)

    # --- what the master does not know: quarantine --------------------------------
    def quarantine(self, msg: protocol.Quarantine) -> protocol.Quarantined:
        """Mark held blobs as quarantined (never erase them now); reply how many and their bytes."""
        self.identity.check(msg.cluster_id, msg.epoch, "a quarantine")
        blobs = blob_list(msg.blobs, "QUARANTINE")
        held = [blob for blob in blobs if self.store.holds(blob)]
        new = self.catalog.quarantine(held, time.time())
        nbytes = self.store.bytes_of(held)
        if new:
            logger.warning("quarantined %d blob(s), %d bytes, unknown to the master's namespace: kept for "
                           "%.0f s (orphan_grace_s) unless the master claims them", len(new),
                           self.store.bytes_of(new), self.config.orphan_grace_s)
        return protocol.Quarantined(count=len(held), bytes=nbytes)

    def release(self, msg: protocol.Release) -> int:
        self.identity.check(msg.cluster_id, msg.epoch, "a release")
        released = self.catalog.release(blob_list(msg.blobs, "RELEASE"))
        if released:
            logger.warning("released %d blob(s) from quarantine: the master knows them again", len(released))
        return len(released)

    def _quarantine_loop(self) -> None:
        """Erase quarantined blobs whose orphan_grace_s is over."""
        grace = self.config.orphan_grace_s
        while not self._stop.wait(min(QUARANTINE_SWEEP_S, max(grace / 4, 0.2))):
            expired = self.catalog.expired(time.time(), grace)
            if not expired:
                continue
            try:
                nbytes = self.store.bytes_of(expired)
                self.delete_blobs(expired)
            except ValueError:
                return  # store closed: we are stopping
            except OSError:
                logger.exception("erasing quarantined blobs failed")
                continue
            logger.warning("erased %d quarantined blob(s), %d bytes: no master claimed them within %.0f s "
                           "(orphan_grace_s)", len(expired), nbytes, grace)

    @property
    def full(self) -> bool:
        """No room for chunks (see free_bytes), or the disk said ENOSPC and no space was freed since.

        An ENOSPC despite free space on statvfs (quotas, reserved blocks) is
        believed until the free space has grown by the size of the write
        that failed, or for DISK_FULL_BACKOFF_S: freeing space ends it at once.
        """
        free = self.free_bytes
        self._note_room(free)
        if time.monotonic() < self._disk_full_until and free < self._disk_full_free:
            return True
        return free <= 0

    # --- integrity: scrubbing, bad extents, compaction ----------------------------
    def queue_corrupt(self, extents) -> None:
        """Queue (blob, first, count) runs just dropped as corrupt for the next heartbeat.

        Each is stamped with put_seq as it is now, after the drop: a copy
        the master's repair puts here later has a higher PUT_OK seq, so the
        master knows the report predates that fresh copy, however late it
        arrives, and keeps it placed.  Runs already stamped (a heartbeat
        that failed) keep their stamp.
        """
        seq = self.put_seq
        with self._corrupt_lock:
            self._corrupt.extend(tuple(e) if len(e) == 4 else (*e, seq) for e in extents)

    def take_corrupt_reports(self) -> list:
        """The corrupt extents for the next heartbeat: as many as fit one page, the rest wait for the next."""
        with self._corrupt_lock:
            reports, _ = next(protocol.pages(self._corrupt))
            self._corrupt = self._corrupt[len(reports):]
        return reports

    def _scrub_loop(self) -> None:
        """Re-read every stored chunk at scrub_rate_mb_s, forever."""
        rate = self.config.scrub_rate_mb_s * 1024 * 1024
        step_bytes = max(64 * 1024, int(rate / 4))  # about four steps a second
        cursor = None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                cursor, corrupt = self.store.scrub_step(cursor, step_bytes)
            except ValueError:
                return  # store closed: we are stopping
            except OSError:
                logger.exception("scrub step failed")
                cursor, corrupt = None, []
            if corrupt:
                # The store dropped exactly these chunks; the master re-copies them.
                self._flush_drops()
                logger.error("scrub found %d corrupt chunk run(s), dropped them, reporting: %s", len(corrupt),
                             ", ".join(f"{blob} {first}+{count}" for blob, first, count in corrupt[:10]))
                self.queue_corrupt(corrupt)
            # Sleep so that this step's bytes take 1/rate seconds in all.
            self._stop.wait(max(step_bytes / rate - (time.monotonic() - started), 0.05))

    def _compact_loop(self) -> None:
        """Compact every compact_interval_s, and soon after deletes (space of aborted uploads and
        deleted files comes back in about a second, not an interval later)."""
        while not self._wait(self._compact_wanted, self.config.compact_interval_s):
            if self._stop.wait(COMPACT_AFTER_DELETE_S):  # let a burst of deletes finish
                return
            try:
                self.compact_now()
            except ValueError:
                return
            except OSError:
                logger.exception("compaction failed")

    def compact_now(self) -> dict:
        """One compaction pass (ChunkStore.compact), as eager as the node's room calls for.

        A node without room for one more batch, now or within the last
        LOW_ROOM_EAGER_S, compacts segments at least FULL_DEAD_FRACTION dead,
        or holding a batch of dead bytes whatever their share: on a full disk
        the space a purge or an expired trash frees must come back even when
        it is a small part of a large segment, or the user who deleted to
        make room still cannot write.
        Raises ValueError once the store is closed, OSError from the disk.
        """
        batch_bytes = self.batch_bytes
        fraction, dead_bytes = self.config.compact_dead_fraction, None
        self._note_room(self.free_bytes)
        low_at = self._low_room_at
        if low_at is not None and time.monotonic() - low_at < LOW_ROOM_EAGER_S:
            fraction, dead_bytes = min(fraction, FULL_DEAD_FRACTION), batch_bytes
        self.store.roll_if_dead(fraction, ROLL_DEAD_ACTIVE_MIN_BYTES, dead_bytes)
        result = self.store.compact(fraction, min_dead_bytes=dead_bytes)
        for blob, first, count in result.get("corrupt", []):
            self.queue_corrupt([(blob, first, count)])
        if result.get("segments_compacted"):
            logger.info("compacted %d segment(s), reclaimed %d bytes", result["segments_compacted"],
                        result["bytes_reclaimed"])
            self._report_wanted.set()
        return result


class NodeHandler(transport.RequestHandler):
    """The master's requests to this node: thin wrappers over StorageNode."""

    @property
    def node(self) -> StorageNode:
        return self.server.node

    def do_PUT_CHUNKS(self, msg: protocol.PutChunks) -> None:
        # Replies are pipelined by the master; flushing each tiny reply at
        # once keeps its window moving.
        self.reply(self.node.put(msg))

    def do_PUT_BLOBS(self, msg: protocol.PutBlobs) -> None:
        self.reply(self.node.put_blobs(msg))

    def do_FLUSH(self, msg: protocol.Flush) -> None:
        try:
            self.node.store.flush()
            self.node.catalog.flush()  # descriptions sent before this FLUSH
        except OSError as exc:
            raise protocol.BackupError(f"node {self.node.node_id} cannot make data durable: {exc}") from None
        self.reply(protocol.Flushed())

    def _dispatch(self, msg: protocol.Message) -> None:
        # A client (a direct read) may read, nothing else: its requests never
        # reach the handlers that change data, whatever fields they carry.
        if self.role == "client" and not isinstance(msg, protocol.GetChunks):
            logger.warning("%s: refused %s from a client", self.peer, msg.OP)
            self.reply(protocol.error_message(protocol.AuthFailed(f"clients may only read from a node, not {msg.OP}")))
            return
        super()._dispatch(msg)

    def do_GET_CHUNKS(self, msg: protocol.GetChunks) -> None:
        for_client = self.role == "client"
        if for_client:
            self._check_read_capability(msg)
            if self._send_span(msg):
                return
        self.reply(self.node.get(msg, for_client))

    def _send_span(self, msg: protocol.GetChunks) -> bool:
        """Answer a client's read from one stored extent straight from the segment file; False if none holds it.

        sendfile moves the bytes from the page cache to the socket without
        them entering this process; through TLS they are read and sent.
        """
        found = self.node.open_client_read(msg)
        if found is None:
            return False
        reply, span = found
        try:
            if self.can_sendfile:
                self.reply_from_file(reply, span.fd, span.ranges, span.body_len)
            else:
                self.reply(dataclasses.replace(reply, body=self.node.store.read_span(span)))
        finally:
            self.node.store.close_span(span)
        return True

    def _check_read_capability(self, msg: protocol.GetChunks) -> None:
        """Raise AuthFailed unless a client's GET_CHUNKS carries the master's capability for its blob.

        Only with a shared secret: without one nothing is authenticated in
        the cluster (docs/SECURITY.md), and a capability could not be checked.
        """
        secret = self.server.security.secret
        if not secret:
            return
        cluster_id = self.node.identity.cluster_id
        problem = ("a node that has joined no cluster yet" if cluster_id is None else
                   security_module.read_capability_problem(secret, cluster_id, msg.blob, msg.cap, time.time()))
        if problem:
            self.server.log_limited("read-cap", "%s: refused a client's read of %s: %s", self.peer,
                                    msg.blob[:64], problem)
            raise protocol.AuthFailed(f"read refused: {problem}")

    def do_DROP_CHUNKS(self, msg: protocol.DropChunks) -> None:
        self.node.identity.check(msg.cluster_id, msg.epoch, "a drop")
        dropped = self.node.drop_range(msg.blob, msg.first, msg.count) > 0
        if dropped:
            logger.info("dropped %s chunks %d..%d at the master's request", msg.blob, msg.first,
                        msg.first + msg.count - 1)
        self.reply(protocol.ChunksDropped(dropped=dropped))

    def do_DELETE_BLOBS(self, msg: protocol.DeleteBlobs) -> None:
        blobs = blob_list(msg.blobs, "DELETE_BLOBS")
        self.node.identity.check(msg.cluster_id, msg.epoch, "a delete")
        count = self.node.delete_blobs(blobs)
        if count:
            logger.info("deleted %d blob(s) at the master's request", count)
        self.reply(protocol.BlobsDeleted(count=count))

    def do_QUARANTINE(self, msg: protocol.Quarantine) -> None:
        self.reply(self.node.quarantine(msg))

    def do_RELEASE(self, msg: protocol.Release) -> None:
        self.reply(protocol.Released(count=self.node.release(msg)))

    def do_DESCRIBE(self, msg: protocol.Describe) -> None:
        self.node.identity.check(msg.cluster_id, msg.epoch, "a description")
        self.reply(protocol.Described(count=self.node.catalog.describe(item_list(msg.items))))

    def do_COMMIT_NOTES(self, msg: protocol.CommitNotes) -> None:
        self.node.identity.check(msg.cluster_id, msg.epoch, "commit notes")
        self.reply(protocol.NotesStored(count=self.node.catalog.note(item_list(msg.notes))))

    def do_LIST_NOTES(self, msg: protocol.ListNotes) -> None:
        for page, last in protocol.pages(self.node.catalog.descriptions()):
            self.reply(protocol.NotesPage(notes=page, done=last), flush=last)

    def do_NODE_STAT(self, msg: protocol.NodeStat) -> None:
        store = self.node.store
        self.reply(protocol.NodeStatReply(node_id=self.node.node_id, used_bytes=store.used_bytes,
                                          chunks=store.chunk_count, blobs=store.blob_count))


def blob_list(blobs, op: str) -> list:
    """``blobs`` if it is a list of strings, else RemoteProtocolError naming ``op``."""
    if not isinstance(blobs, list) or not all(isinstance(blob, str) for blob in blobs):
        raise protocol.RemoteProtocolError(f"{op} takes a list of strings")
    return blobs


def item_list(items) -> list:
    if not isinstance(items, list):
        raise protocol.RemoteProtocolError("file descriptions come as a list")
    return items


def make_server(node: StorageNode, host: str, port: int) -> transport.Server:
    config = node.config
    batch_frame = config.chunks_per_batch * (config.chunk_size_bytes + protocol.CRC_BYTES)
    server = transport.Server(
        (host, port), NodeHandler, server_id=node.node_id,
        io_timeout_s=config.io_timeout_s,
        # The master keeps its connections to nodes open between requests.
        idle_timeout_s=max(config.io_timeout_s, 600.0),
        body_buffer_bytes=batch_frame,
        body_budget_bytes=BODY_BUFFERS * batch_frame,
        security=node.security, max_connections=config.max_connections)
    server.node = node
    return server


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run a storage node of the backup system.")
    config_module.add_common_flags(parser)
    config_module.add_server_flags(parser)
    parser.add_argument("--host", help="address to listen on (default from config)")
    parser.add_argument("--port", type=int, help="port to listen on; 0 = any free port")
    parser.add_argument("--data-dir", help="directory for chunks and the node id")
    parser.add_argument("--master", "--masters", dest="master", metavar="HOST:PORT[,HOST:PORT...]",
                        help="the master, or every master of a replicated group (default: [cluster] masters, "
                             "else [node] master)")
    parser.add_argument("--capacity", type=int, metavar="BYTES", help="bytes this node offers")
    parser.add_argument("--heartbeat-interval", type=float, metavar="S", help="seconds between heartbeats")
    parser.add_argument("--dead-after", type=float, metavar="S",
                        help="the master's dead_after_s, checked against --heartbeat-interval")
    parser.add_argument("--scrub-rate", type=float, metavar="MB_S", help="scrub speed in MB/s; 0 = off")
    parser.add_argument("--compact-interval", type=float, metavar="S", help="seconds between compaction checks")
    parser.add_argument("--inventory-interval", type=float, metavar="S",
                        help="seconds between full inventory reports to the master")
    parser.add_argument("--orphan-grace", type=float, metavar="S",
                        help="seconds a quarantined blob is kept before it is erased (default from config)")
    parser.add_argument("--io-timeout", type=float, metavar="S", help="seconds a network read or write may take")
    logsetup.add_log_flags(parser)
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        config = config_module.load_config(
            args.config, node_host=args.host, node_port=args.port, node_data_dir=args.data_dir,
            masters=args.master, capacity_bytes=args.capacity,
            heartbeat_interval_s=args.heartbeat_interval, io_timeout_s=args.io_timeout,
            dead_after_s=args.dead_after, scrub_rate_mb_s=args.scrub_rate,
            compact_interval_s=args.compact_interval, inventory_interval_s=args.inventory_interval,
            orphan_grace_s=args.orphan_grace,
            **config_module.security_overrides(args))
        security = security_module.for_server(config, config.node_host, args.insecure)
    except ValueError as exc:
        print(f"storage_node: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        # Held until the process exits: two nodes on one dir would share a node id and segment files.
        data_dir_lock = dirlock.lock_data_dir(config.node_data_dir)  # noqa: F841
    except dirlock.DataDirLocked as exc:
        hint = ("give each node its own data dir with --data-dir DIR" if args.data_dir is None
                else "only one node may use a data dir")
        print(f"storage_node: {exc}; {hint}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"storage_node: cannot use data dir {config.node_data_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_START_FAILED
    try:
        node = StorageNode(config, config.node_data_dir, security=security)
    except StoreFormatError as exc:
        print(f"storage_node: refusing to open the chunk store, left unchanged: {exc}", file=sys.stderr)
        return EXIT_STORE_FORMAT
    except (OSError, ValueError, KeyError) as exc:
        print(f"storage_node: cannot open data dir {config.node_data_dir}: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    try:
        logsetup.configure(f"node {node.node_id}", args.log_level, args.log_file, args.log_format)
    except OSError as exc:
        print(f"storage_node: cannot write log file {args.log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_START_FAILED
    try:
        server = make_server(node, config.node_host, config.node_port)
    except OSError as exc:
        print(f"storage_node: cannot listen on {config.node_host}:{config.node_port}: {exc.strerror}", file=sys.stderr)
        return EXIT_START_FAILED
    node.start(server.server_address[:2])
    logger.info("node %s serving %s from %s", node.node_id, server.address_text, config.node_data_dir)

    def stop():
        node.stop()
        node.say_goodbye()
        node.store.flush()
        node.store.close()
        node.catalog.close()
        logger.info("stopped")

    transport.serve_until_stopped(server, stop)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
