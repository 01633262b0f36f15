"""Keeping every chunk at ``replication`` live copies.

The master's ``Repairer`` runs one background thread that does three jobs,
all of which change placement only through ``replicas`` records in the
metadata log (so a master restart resumes where it stopped):

* **Re-replication.**  It scans the namespace for runs of chunks with fewer
  live copies than ``replication`` (a node died, a copy was found corrupt or
  missing) and copies each batch-sized piece from a live replica to a live
  node that lacks it, fewest copies first, at ``repair_rate_mb_s``.  The new
  node list drops the dead holder, so a node that comes back later finds its
  old copy surplus and drops it.
* **Reconciliation.**  A node that (re)registers sends its inventory.  Blobs
  no committed file (and no upload in progress) uses are quarantined, not
  deleted (quarantine.py; metadata backups go to meta_backup.py); copies the
  namespace does not place on the node are adopted if their run is short of
  copies, else dropped, chunk by chunk (``_unneeded``: also the chunks of a
  known blob no kept entry uses that this master freed); chunks the
  namespace places on the node that it does not hold are taken off the
  node's list, and then repaired.  A surplus
  copy of a blob a download pins (master.pinned) is dropped only once the
  download is done, and only if it is still surplus then: the reader's
  entry may list that node (as garbage collection waits for readers).
* **Bad replicas.**  A node reports the chunks that failed their CRCs (its
  scrubber, or compaction); a read that hits a bad or missing copy reports
  it too.  That node is taken off the list of just those chunks, never of
  the rest of their batch, and they are repaired from whichever replica
  holds each of them intact, so a file is damaged only when some chunk has
  no good copy left.

Safe mode: for ``safe_mode_s`` after the master starts (or until every node
it knows has reported), nothing is repaired, dropped or deleted, so a master
restart never starts a replication storm or deletes data of nodes that have
not spoken yet.

Older versions of a file (history.py) are data like the current one: they
are repaired, and their blobs are known to reconciliation.  Tasks name the
version by its commit index; a ``replicas`` record moves the chunks of
every version of the name placed as it expects.

The namespace is read without locks (see namespace.py); a repair re-checks
nothing; every ``replicas`` record is a compare-and-set on the placement
it was computed from, so one decided on a stale view changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import meta_backup
import protocol
import transfers
from history import version_id
from namespace import entry_blobs, first_covering, merge_ranges, placed_on, run_blob, uncovered

logger = logging.getLogger("master.repair")

# A full scan of the namespace also runs this often with nothing to wake it,
# as a safety net for missed events.
_RESCAN_INTERVAL_S = 30.0
# A repair pass logs its progress this often: a node's death is a start
# line, a progress line every so often and a done line, not a line per batch.
PROGRESS_LOG_INTERVAL_S = 10.0
# (node, blob) pairs whose corrupt runs found by reads the master remembers,
# so the node's heartbeat naming them again is not counted twice
# (corrupt_replicas_found).  A few KiB each at most.
READ_COUNTED_KEPT = 1024
# How long the master remembers a repair copy's PUT_OK seq against late
# corrupt reports (report_corrupt): longer than a report can take to arrive
# after it is made (a heartbeat's request timeout), with a wide margin.
FRESH_COPIES_KEPT_S = 120.0
# STATUS lists the first damaged files by name in at most this many bytes of
# JSON (names may be 1 KiB each); damaged_file_count gives the total.
DAMAGED_LIST_BYTES = 8 * 1024


@dataclass(order=True)
class RepairTask:
    copies: int
    name: str
    first: int
    count: int
    version: int = 0  # commit index of the entry (history.version_id)


def replicas_record(name: str, blob: str, first: int, count: int, expect: list, nodes: list) -> dict:
    """A log record moving chunks [first, first+count) of ``blob`` from ``expect`` to ``nodes``.

    Compare-and-set: namespace.apply changes nothing unless those chunks are
    still in that blob on exactly ``expect``, so a decision taken on a stale
    view (a reader's pinned entry, a repair that raced another) never undoes
    a newer placement.
    """
    return {"op": "replicas", "name": name, "blob": blob, "first": first, "count": count,
            "expect": list(expect), "nodes": list(nodes)}


def nodes_of(entry: dict, first: int, count: int, blob: str | None = None) -> list[tuple[int, int, list, str]]:
    """(first, count, nodes, blob) of the runs of ``entry`` overlapping [first, first+count), clipped.

    With ``blob``, only runs whose chunks live in that blob.
    """
    end = first + count
    out = []
    runs = entry["runs"]
    for index in range(first_covering(runs, first), len(runs)):
        run = runs[index]
        if run[0] >= end:
            break
        run_first, run_count, nodes = run[:3]
        run_blob_id = run_blob(entry, run)
        if blob is not None and run_blob_id != blob:
            continue
        lo, hi = max(run_first, first), min(run_first + run_count, end)
        if lo < hi:
            out.append((lo, hi - lo, nodes, run_blob_id))
    return out


class RepairProgress:
    """The log of one repair pass: a start line, progress every PROGRESS_LOG_INTERVAL_S, a done line.

    Pieces that could not be repaired (no live target, a copy failed) are
    counted and the done line names the last reason, at WARNING.  A pass
    that achieves nothing, after one that achieved nothing on as many
    pieces, logs at DEBUG only, so a lasting shortage of nodes is reported
    once, not every rescan.
    """

    def __init__(self, tasks: list[RepairTask], quiet: bool = False, clock=time.monotonic):
        self.clock = clock
        self.pieces = len(tasks)
        self.chunks = sum(t.count for t in tasks)
        self.done_pieces = self.copied_chunks = self.copied_bytes = self.failed = 0
        self.last_error = ""
        self.quiet = quiet
        self.started = self.last_logged = clock()
        self._log(logging.INFO, "repair started: %d batch(es), %d chunk(s) with too few live copies",
                  self.pieces, self.chunks)

    def _log(self, level: int, *args) -> None:
        logger.log(logging.DEBUG if self.quiet else level, *args)

    def step(self, task: RepairTask, copied_bytes: int) -> None:
        self.done_pieces += 1
        if copied_bytes:
            self.copied_chunks += task.count
            self.copied_bytes += copied_bytes
        now = self.clock()
        if now - self.last_logged >= PROGRESS_LOG_INTERVAL_S:
            self.last_logged = now
            self._log(logging.INFO, "repair progress: %d of %d batch(es), %d chunk(s) copied (%.1f MiB) in %.0f s",
                      self.done_pieces, self.pieces, self.copied_chunks, self.copied_bytes / 2 ** 20,
                      now - self.started)

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.last_error = reason

    @property
    def futile(self) -> bool:
        return not self.copied_bytes and self.failed > 0

    def finish(self, interrupted: bool = False) -> None:
        how = "stopped" if interrupted else "done"
        self._log(logging.INFO, "repair %s: %d of %d batch(es), %d chunk(s) re-replicated (%.1f MiB copied) "
                  "in %.1f s", how, self.done_pieces, self.pieces, self.copied_chunks, self.copied_bytes / 2 ** 20,
                  self.clock() - self.started)
        if self.failed:
            self._log(logging.WARNING, "repair: %d attempt(s) failed, retrying later; last: %s",
                      self.failed, self.last_error)


def _extents(raw: list) -> list[tuple[int, int]]:
    """(first, count) pairs of one INVENTORY entry; RemoteProtocolError if any is not two integers."""
    try:
        extents = [(first, count) for first, count in raw]
    except (TypeError, ValueError):
        raise protocol.RemoteProtocolError("malformed inventory extent") from None
    if not all(type(first) is int and type(count) is int for first, count in extents):
        raise protocol.RemoteProtocolError("inventory extents must be pairs of integers")
    return extents


class Repairer:
    """Re-replication, reconciliation and bad-replica handling for a Master."""

    def __init__(self, master):
        self.master = master
        self.config = master.config
        self.started = master.clock()
        self.safe_mode = self.config.safe_mode_s > 0
        self.reported: set[str] = set()  # nodes whose inventory arrived since start
        self._lock = threading.Lock()
        self._reports: dict[str, list] = {}  # node_id -> (name, entry) pairs kept at REGISTER
        self._inventories: dict[str, dict] = {}  # node_id -> blob -> extents, being received
        self._quarantined: dict[str, set] = {}  # node_id -> blobs it reports quarantined, being received
        self._to_reconcile: list[tuple[str, dict, dict, set]] = []
        self._deferred_drops: set[tuple[str, str, int, int]] = set()  # surplus a reader pinned
        self._counted_by_reads: OrderedDict = OrderedDict()  # (node, blob) -> runs a read counted
        self._fresh_copies: dict[str, list] = {}  # node_id -> (time, seq, blob, first, count) repairs put there
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Figures for STATUS.
        self.under_replicated_chunks = 0
        self.repairs_pending = 0
        self.repaired_chunks = 0
        self.repaired_bytes = 0  # bytes copied by repairs (each new copy counted)
        self.corrupt_replicas_found = 0
        self.damaged_files: list[str] = []
        self._last_pass_futile = 0  # pieces of the last pass, if it repaired nothing
        self._thread = threading.Thread(target=self._run, name="repair", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def in_safe_mode(self) -> bool:
        if self.safe_mode:
            known = set(self.master.namespace.nodes)
            waited = self.master.clock() - self.started
            if waited >= self.config.safe_mode_s or (known and known <= self.reported):
                self.safe_mode = False
                logger.info("leaving safe mode after %.1f s: %d of %d known node(s) reported",
                            waited, len(known & self.reported), len(known))
        return self.safe_mode

    # --- inventories -------------------------------------------------------------------
    def begin_report(self, node_id: str, put_seq: int = 0) -> None:
        """A node registered: remember what the namespace held before it reports.

        Chunks committed after this moment may be missing from the node's
        inventory without being lost, so only files in this snapshot are
        checked for chunks the node should have.
        """
        snapshot = self.master.namespace.all_entries()
        with self._lock:
            if any(c[1] > put_seq for c in self._fresh_copies.get(node_id, ())):
                del self._fresh_copies[node_id]  # it restarted: its PUT_OK seqs start again from 0
            self._reports[node_id] = snapshot
            self._inventories[node_id] = {}
            self._quarantined[node_id] = set()

    def add_inventory(self, node_id: str, blobs: list, done: bool, quarantined=()) -> bool:
        """One INVENTORY page (``quarantined``: its blobs the node holds in quarantine); returns True when the node's report is complete.

        Pages are cut by size, so a blob with many extents spans several
        pages: its extents are merged, and sorted once the report is done.
        """
        with self._lock:
            inventory = self._inventories.get(node_id)
            if inventory is None:
                raise protocol.RemoteProtocolError(f"node {node_id} sent an inventory without registering")
            for item in blobs:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                        and isinstance(item[1], list)):
                    raise protocol.RemoteProtocolError("malformed inventory entry")
                inventory.setdefault(item[0], []).extend(_extents(item[1]))
            self._quarantined[node_id].update(blob for blob in quarantined if isinstance(blob, str))
            if not done:
                return False
            for extents in inventory.values():
                extents.sort()
            self._to_reconcile.append((node_id, self._reports.pop(node_id), self._inventories.pop(node_id),
                                       self._quarantined.pop(node_id)))
            self.reported.add(node_id)
        self._wake.set()
        return True

    # --- bad copies ----------------------------------------------------------------------
    def report_corrupt(self, node_id: str, extents: list, put_seq: int | None = None) -> None:
        """A node dropped corrupt chunks ([blob, first, count, seq] runs): take it off their lists.

        A run the placement no longer puts on the node changes nothing, and
        one a read's CHUNK_DATA named already (the node reports those in a
        heartbeat as well, in case the reply was lost) is not counted again.
        ``seq``: the node's put_seq when it dropped the run (``put_seq``,
        the heartbeat's, if a run lacks it).  Chunks a repair copied there
        with a later PUT_OK seq are that fresh copy, which the report has
        not seen: they stay placed on the node.
        """
        by_blob: dict[str, list[tuple[int, int]]] = {}
        stamps: dict[str, list[tuple[int, int, int | None]]] = {}
        for item in extents:
            if not (isinstance(item, list) and len(item) in (3, 4) and isinstance(item[0], str)
                    and all(type(n) is int for n in item[1:]) and item[1] >= 0 and item[2] > 0
                    and (len(item) == 3 or item[3] >= 0)):
                raise protocol.RemoteProtocolError("malformed corrupt-chunks report")
            by_blob.setdefault(item[0], []).append((item[1], item[2]))
            stamps.setdefault(item[0], []).append((item[1], item[2], item[3] if len(item) == 4 else put_seq))
        self._count_new_corrupt(node_id, by_blob)
        by_blob = self._without_later_copies(node_id, stamps)
        owners = self._blob_owners()
        for blob, ranges in by_blob.items():
            found = owners.get(blob)
            if not found:
                continue
            # Every kept entry using the blob: an older version may be the
            # only one that places the bad chunks (a write moved the current
            # one's copy of them to a new blob).  remove_replica reads each
            # as it is after the records before it: one that moved chunks
            # shared with a later-listed version split that version's runs.
            taken_off = set()
            for name, entry in found:
                taken_off |= self.remove_replica(name, entry, blob, ranges, node_id)
            if taken_off:
                logger.warning("node %s found %r chunks %s corrupt; re-replicating", node_id, found[0][0],
                               ", ".join(f"{first}..{first + count - 1}" for first, count in sorted(taken_off)[:5]))

    def count_corrupt_read(self, node_id: str, blob: str, ranges: list) -> None:
        """A read found chunk ``ranges`` of ``blob`` corrupt on ``node_id``: count them, once.

        The node names them in a heartbeat too; the runs of the
        READ_COUNTED_KEPT newest (node, blob) pairs are remembered so that
        report is not counted again.
        """
        key = (node_id, blob)
        with self._lock:
            self.corrupt_replicas_found += len(ranges)
            self._counted_by_reads[key] = merge_ranges([*self._counted_by_reads.pop(key, ()), *ranges])
            while len(self._counted_by_reads) > READ_COUNTED_KEPT:
                self._counted_by_reads.popitem(last=False)

    def _count_new_corrupt(self, node_id: str, by_blob: dict) -> None:
        """Count the runs of a node's report (blob -> [(first, count)]) that no read has counted."""
        with self._lock:
            for blob, ranges in by_blob.items():
                counted = self._counted_by_reads.get((node_id, blob), [])
                self.corrupt_replicas_found += sum(1 for first, count in ranges if uncovered(first, count, counted))

    def _note_copied(self, node_id: str, seq: int, blob: str, first: int, count: int) -> None:
        """A repair put chunks of ``blob`` on ``node_id``, acknowledged with PUT_OK ``seq``.

        Kept FRESH_COPIES_KEPT_S, against corrupt reports made before it
        landed and arriving after (report_corrupt); forgotten when the node
        registers again after a restart (its seq restarts with the process).
        """
        now = time.monotonic()
        with self._lock:
            kept = [c for c in self._fresh_copies.get(node_id, ()) if now - c[0] < FRESH_COPIES_KEPT_S]
            self._fresh_copies[node_id] = [*kept, (now, seq, blob, first, count)]

    def _without_later_copies(self, node_id: str, stamps: dict) -> dict:
        """blob -> [(first, count)] of reported runs (blob -> [(first, count, seq)]) less the chunks of
        repair copies put on the node with a PUT_OK seq after the run's."""
        with self._lock:
            fresh = list(self._fresh_copies.get(node_id, ()))
        by_blob = {}
        for blob, runs in stamps.items():
            ranges = []
            for first, count, seq in runs:
                later = merge_ranges([(f, c) for _, copy_seq, copy_blob, f, c in fresh
                                      if copy_blob == blob and seq is not None and copy_seq > seq])
                ranges += uncovered(first, count, later)
            if ranges:
                by_blob[blob] = ranges
        return by_blob

    def remove_replica(self, name: str, entry: dict, blob: str, ranges: list, node_id: str) -> set:
        """Take ``node_id`` off the list of exactly the chunks ``ranges`` ([(first, count)]) of ``blob``.

        Per chunk, not per batch: the node still holds the rest of the batch
        (nodes drop only the chunks that fail), and another replica may
        have lost other chunks of it.  One log commit for all ranges.

        ``entry`` names the version; its placement is read again here: a
        reader's entry is the one pinned when the download began, and repair
        may have moved copies since, so records computed from it would not
        apply (compare-and-set) and the dropped copy would stay listed.
        Returns the ranges of ``ranges`` the node was listed for, in part at least.
        """
        entry = self.master.namespace.find_entry(name, version_id(entry))
        if entry is None:
            return set()  # dropped meanwhile: nothing places the chunks any more
        records, listed = [], set()
        for first, count in ranges:
            for f, c, nodes, _ in nodes_of(entry, first, count, blob):
                if node_id in nodes:
                    records.append(replicas_record(name, blob, f, c, nodes, [n for n in nodes if n != node_id]))
                    listed.add((first, count))
        if records:
            self.master.log.commit(records)
            self._wake.set()
        return listed

    def _blob_owners(self) -> dict[str, list[tuple[str, dict]]]:
        """blob -> (name, entry) of every kept entry whose chunks live in it.

        All of them, not one: versions share a blob, each placing its own
        part of it (an append or write leaves the untouched chunks in the old
        blob, and the older version alone still uses the ones it rewrote).
        """
        owners: dict[str, list[tuple[str, dict]]] = {}
        for name, entry in self.master.namespace.all_entries():
            for blob in entry_blobs(entry):
                owners.setdefault(blob, []).append((name, entry))
        return owners

    # --- the loop ------------------------------------------------------------------------
    def _node_sets(self) -> tuple[set[str], set[str], set[str]]:
        """(alive, holding, placeable-with-room) node ids: a repair pass runs again when any of them changes.

        Placeable (registered, inventory reported, not suspect, not full)
        is what choose_replicas may copy to.  A pass that found no target
        (a restarting node not reported yet, or one made suspect by a failed
        request for dead_after_s) gives up on its pieces; nodes becoming
        usable again wakes nothing, and neither alive nor holding changes
        when a suspect node's time runs out, so without this set such a
        piece waited for the next full rescan (_RESCAN_INTERVAL_S).
        """
        alive = {n.node_id for n in self.master.live_nodes()}
        holding = {n.node_id for n in self.master.holding_nodes()}
        placeable = {n.node_id for n in self.master.placeable_nodes() if not n.full}
        return alive, holding, placeable

    def _run(self) -> None:
        last_nodes: tuple | None = None
        last_scan = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(self.config.heartbeat_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.in_safe_mode():
                    continue
                self._reconcile_pending()
                self.drop_deferred()
                nodes = self._node_sets()
                now = time.monotonic()
                if woken or nodes != last_nodes or now - last_scan >= _RESCAN_INTERVAL_S or self.repairs_pending:
                    last_nodes, last_scan = nodes, now
                    alive, holding, _ = nodes
                    self._repair(self.scan(alive, holding))
            except Exception:
                logger.exception("repair pass failed; retrying")

    def scan(self, alive: set[str], holding: set[str] | None = None) -> list[RepairTask]:
        """Every batch with fewer than ``replication`` copies on ``holding`` nodes, fewest copies first.

        ``alive`` nodes serve now; ``holding`` (default: ``alive``) adds nodes
        that stopped cleanly less than ``dead_after_s`` ago.  A batch with a
        copy on such a node counts as under-replicated (status tells the
        truth) but is not re-copied yet: a planned restart comes back within
        the grace, and copying its data meanwhile would only leave surplus
        copies to drop (Ceph marks a stopped OSD down at once, out later).
        """
        replication = self.config.replication
        holding = alive if holding is None else holding | alive
        tasks, damaged, under = [], [], 0
        seen: set[tuple] = set()  # runs already counted: versions share untouched chunks
        damaged_names: set[str] = set()
        for name, entry in self.master.namespace.all_entries():
            short_of_copies = False
            for run in entry["runs"]:
                first, count, nodes = run[:3]
                live = sum(1 for n in nodes if n in alive)
                if live >= replication:
                    continue
                key = (name, run_blob(entry, run), first, count, tuple(nodes))
                if key in seen:
                    continue
                seen.add(key)
                under += count
                if live == 0:
                    short_of_copies = True
                    continue  # nothing to copy from: damaged until a holder returns
                if sum(1 for n in nodes if n in holding) >= replication:
                    continue  # a copy is on a node that stopped cleanly: wait out its grace
                for piece_first, piece_count in transfers.batch_pieces(first, count, entry["batch_chunks"]):
                    tasks.append(RepairTask(live, name, piece_first, piece_count, version_id(entry)))
            if short_of_copies and name not in damaged_names:
                damaged_names.add(name)
                damaged.append(name)
        tasks.sort()
        self.under_replicated_chunks = under
        self.damaged_files = damaged
        self.repairs_pending = len(tasks)
        return tasks

    def _repair(self, tasks: list[RepairTask]) -> None:
        if not tasks:
            return
        rate = self.config.repair_rate_mb_s * 1024 * 1024
        buffer = None
        progress = RepairProgress(tasks, quiet=self._last_pass_futile == len(tasks))
        for task in tasks:
            if self._stop.is_set() or self.in_safe_mode():
                progress.finish(interrupted=True)
                return
            started = time.monotonic()
            entry = self.master.namespace.find_entry(task.name, task.version)
            if entry is None:
                self.repairs_pending -= 1
                progress.step(task, 0)
                continue
            size = entry["batch_chunks"] * (entry["chunk_size"] + protocol.CRC_BYTES)
            if buffer is None or len(buffer) < size:
                buffer = bytearray(size)
            copied = self._repair_piece(task, entry, buffer, progress)
            self.repairs_pending -= 1
            progress.step(task, copied)
            if copied:
                self.repaired_chunks += task.count
                self.repaired_bytes += copied
                self.under_replicated_chunks = max(0, self.under_replicated_chunks - task.count)
                # Pace: this piece's bytes should take copied/rate seconds.
                self._stop.wait(max(0.0, copied / rate - (time.monotonic() - started)))
        progress.finish()
        self._last_pass_futile = len(tasks) if progress.futile else 0

    def _repair_piece(self, task: RepairTask, entry: dict, buffer: bytearray, progress: RepairProgress) -> int:
        """Copy one piece to new nodes until it has enough live copies; return bytes copied.

        Each batch is logged at DEBUG; ``progress`` makes the INFO lines and
        counts the failures.
        """
        master = self.master
        alive = {n.node_id for n in master.live_nodes()}
        copied = 0
        for first, count, nodes, blob in nodes_of(entry, task.first, task.count):
            live = [n for n in nodes if n in alive]
            missing = self.config.replication - len(live)
            if missing <= 0 or not live:
                continue
            try:
                body = transfers.read_piece(master, task.name, entry, blob, first, count, live, buffer)
                payload_bytes = len(body) - count * protocol.CRC_BYTES
                targets = master.choose_replicas(payload_bytes, avoid=set(nodes), count=missing)
            except protocol.BackupError as exc:
                logger.debug("cannot repair %r chunks %d..%d yet: %s", task.name, first, first + count - 1, exc)
                progress.fail(f"{task.name!r} chunks {first}..{first + count - 1}: {exc}")
                continue
            current = master.namespace.find_entry(task.name, task.version)
            if current is None or not placed_on(current, blob, first, count, nodes):
                # The read found a replica short of some chunks and took it
                # off them: the record below would not apply.  The next scan
                # repairs from the new placement.
                continue
            placed = []
            for target in targets:
                try:
                    seq = transfers.put_piece(master, target, entry, blob, first, count, body)
                    self._note_copied(target, seq, blob, first, count)  # before the record: see report_corrupt
                    placed.append(target)
                except protocol.BackupError as exc:
                    logger.debug("repair copy to node %s failed: %s", target, exc)
                    progress.fail(f"copy to node {target} failed: {exc}")
            if not placed:
                continue
            # Applies only if the placement is still what we copied from; if
            # the file changed meanwhile, our copies are surplus and the
            # node's next reconciliation drops them.  (Dropping them here
            # could race with an upload that just placed the same range.)
            master.log.commit([replicas_record(task.name, blob, first, count, nodes, live + placed)])
            master.notes.copied(task.name, placed)  # the new holders must be able to describe the file
            copied += payload_bytes * len(placed)
            logger.debug("re-replicated %r chunks %d..%d to %s (%d live copies before)", task.name, first,
                         first + count - 1, ",".join(placed), len(live))
        return copied

    # --- reconciliation ---------------------------------------------------------------
    def _reconcile_pending(self) -> None:
        with self._lock:
            work, self._to_reconcile = self._to_reconcile, []
        for node_id, snapshot, inventory, quarantined in work:
            try:
                self.reconcile(node_id, snapshot, inventory, quarantined)
            except protocol.BackupError as exc:
                logger.warning("reconciling node %s failed, will retry at its next registration: %s",
                               node_id, exc)

    def reconcile(self, node_id: str, snapshot: list, inventory: dict, quarantined=frozenset()) -> None:
        """Bring the namespace and one node's inventory into agreement (see module docstring)."""
        master = self.master
        replication = self.config.replication
        alive = {n.node_id for n in master.live_nodes()} | {node_id}
        # Read the uploads in progress before the namespace: a commit applies
        # its record before it leaves active_blobs, so a blob missing from
        # both really is an orphan.
        active = set(master.active_blobs)
        owners = self._blob_owners()
        orphans, drops, records = {}, [], []
        known_again, node_chunks = [], 0
        for blob, extents in inventory.items():
            if meta_backup.is_backup(blob):
                master.meta_backup.seen(node_id, blob)
                continue
            chunks = sum(count for _, count in extents)
            node_chunks += chunks
            found = owners.get(blob)
            if not found:
                if master.was_dropped(blob):
                    master.collect_garbage(blob, [node_id])  # a logged delete freed it: not an orphan
                elif blob not in active and blob not in quarantined:
                    orphans[blob] = chunks
                continue
            if blob in quarantined:
                known_again.append(blob)
            for first, count in extents:
                unneeded, short = self._unneeded(node_id, blob, first, count, found, alive)
                # A copy we lack elsewhere: adopt it.
                records += [replicas_record(name, blob, f, c, list(nodes), [*nodes, node_id])
                            for name, f, c, nodes in sorted(short)]
                drops += [(blob, f, c) for f, c in unneeded]
        # Chunks the namespace places on this node that it does not hold.
        # Only placements older than the node's report count (the snapshot
        # taken at REGISTER), and each change applies only if the placement
        # is still the same (replicas records compare and set).
        for name, entry in snapshot:
            for run in entry["runs"]:
                first, count, nodes = run[:3]
                if node_id not in nodes:
                    continue
                blob = run_blob(entry, run)
                for gap_first, gap_count in uncovered(first, count, inventory.get(blob, [])):
                    records.append(replicas_record(name, blob, gap_first, gap_count, nodes,
                                                   [n for n in nodes if n != node_id]))
        if records:
            master.log.commit(records)
        for blob, first, count in drops:
            if master.pinned(blob):
                with self._lock:
                    self._deferred_drops.add((node_id, blob, first, count))
            else:
                self._drop(node_id, blob, first, count)
        # Last: a node that fails QUARANTINE or RELEASE has still had its surplus dropped.
        master.orphans.reconcile(node_id, orphans, node_chunks, known_again)
        if orphans or drops or records:
            logger.info("reconciled node %s: %d orphan blob(s) found, %d surplus extent(s) dropped, "
                        "%d placement change(s)", node_id, len(orphans), len(drops), len(records))
            self._wake.set()

    def _unneeded(self, node_id: str, blob: str, first: int, count: int, found: list, alive: set):
        """(ranges to drop, runs to adopt) of the extent [first, first+count) of ``blob`` on ``node_id``.

        Chunk by chunk, over every entry using the blob (``found``): a chunk
        only an older version uses is as much data as the current file's.
        A chunk is kept if some entry places it on the node, adopted (runs
        ``(name, first, count, nodes)`` returned) if it is placed elsewhere
        on fewer than ``replication`` live nodes, and dropped if it is
        surplus (the rest of an extent the node holds in part for the file
        too).  A chunk no kept entry uses is dropped if this master freed it
        by a logged write, trim or delete (master.freed_ranges: the garbage
        collector reached only the nodes listed then), else kept.
        """
        keep, short, used = [], set(), []
        for name, entry in found:
            for f, c, nodes, _ in nodes_of(entry, first, count, blob):
                used.append((f, c))
                if node_id in nodes:
                    keep.append((f, c))
                elif sum(1 for n in nodes if n in alive) < self.config.replication:
                    keep.append((f, c))
                    short.add((name, f, c, tuple(nodes)))
        freed = self.master.freed_ranges(blob)
        keep += [gap for f, c in uncovered(first, count, merge_ranges(used)) for gap in uncovered(f, c, freed)]
        return uncovered(first, count, merge_ranges(keep)), short

    def drop_deferred(self) -> None:
        """Drop the surplus copies reconciliation held back for readers, now that none pins them.

        Each is checked again: meanwhile the placement may have come to use
        the copy (adopted, or its other copies lost), and then it stays.  A
        drop that fails is left to the node's next reconciliation.
        """
        with self._lock:
            ready = {drop for drop in self._deferred_drops if not self.master.pinned(drop[1])}
            self._deferred_drops -= ready
        if not ready:
            return
        owners = self._blob_owners()
        alive = {n.node_id for n in self.master.live_nodes()}
        for node_id, blob, first, count in sorted(ready):
            if blob not in owners:
                continue  # the whole blob was freed meanwhile: the garbage collector's
            for f, c in self._unneeded(node_id, blob, first, count, owners[blob], alive | {node_id})[0]:
                try:
                    self._drop(node_id, blob, f, c)
                except protocol.BackupError as exc:
                    logger.info("surplus %s chunks %d..%d on node %s left to its next reconciliation: %s",
                                blob, f, f + c - 1, node_id, exc)

    def _drop(self, node_id: str, blob: str, first: int, count: int) -> None:
        master = self.master
        conn = master.pool.acquire(node_id)
        try:
            conn.request(protocol.DropChunks(blob=blob, first=first, count=count, **master.fence()),
                         protocol.ChunksDropped)
        finally:
            master.pool.release(conn)

    def status(self) -> dict:
        return {
            "safe_mode": self.safe_mode,
            "under_replicated_chunks": self.under_replicated_chunks,
            "repairs_pending": self.repairs_pending,
            "repaired_chunks": self.repaired_chunks,
            "corrupt_replicas_found": self.corrupt_replicas_found,
            # The first names only, a few KiB at most: the count says how many.
            "damaged_files": next(protocol.pages(self.damaged_files[:100], DAMAGED_LIST_BYTES))[0],
            "damaged_file_count": len(self.damaged_files),
        }
