"""Rebuild a lost metadata dir from the nodes: ``master.py --recover-from-nodes``.

Job
---
A master whose data dir is gone (disk replaced, wrong directory, rm -rf)
starts with ``--recover-from-nodes --data-dir EMPTY_DIR``.  It listens as
usual, but while it recovers it only collects: nodes register with it (it
announces no cluster id, so they obey it in nothing: reads only), send
their inventories, and are asked for their file descriptions (LIST_NOTES,
node_catalog.py).  Clients are told UNAVAILABLE.  Then ``rebuild``:

1. the cluster id is the one the nodes share (nodes of two clusters: refuse);
2. the newest readable metadata backup (meta_backup.py) is the base state,
   verified by its described size and SHA-256; deletes and replaces it
   records stand (nothing deleted before it comes back);
3. every committed file the nodes describe with a commit index after the
   backup's is added or replaces the backup's entry (the newest index of a
   name wins; older notes whose chunks are all there are its older
   versions), and a name deleted after the backup (a tombstone, notes.py)
   is removed; replicas are the reporting nodes that hold the chunks;
4. uploads that were described before their commit but never confirmed
   (the master died in between) go to ``lost+found/NAME`` if every chunk is
   there and the SHA-256 read back matches -- never guessed into the
   namespace; blobs a master already quarantined are not revived;
5. the log index continues after the highest index seen, and the epoch
   after the highest any node has seen, so the new master outranks every
   older one and later notes sort after earlier ones.

The result is written as a normal checkpoint (``metadata.json``); the
master then starts on it as after any restart (safe mode, reconciliation
of every node, repair of what is short of copies) and stores a fresh
metadata backup.  A one-line report says what was recovered.

Works with one node of every replica pair down: any one copy of a blob and
any one node's description of it is enough.  Left out: merging nodes of
two clusters, and recovering files whose every copy is gone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import meta_backup
import protocol
import transfers
import transport
from metadata_log import CHECKPOINT_FORMAT, CHECKPOINT_NAME, DIR_MODE, atomic_write_json
from namespace import add_run, run_blob
from node_catalog import validate_item

logger = logging.getLogger("master.recovery")

LOST_AND_FOUND = "lost+found/"


class RecoveryFailed(Exception):
    """The nodes' reports do not allow a safe recovery (e.g. two clusters)."""


@dataclass
class NodeReport:
    node_id: str
    address: tuple[str, int]
    cluster_id: str
    epoch: int
    inventory: dict = field(default_factory=dict)  # blob -> [(first, count)]
    quarantined: set = field(default_factory=set)
    complete: bool = False  # last INVENTORY page received
    last_heard: float = 0.0


# --- the pure part ----------------------------------------------------------------------------
def runs_from_layout(layout: list, version: str, inventories: dict) -> list:
    """Runs ``[first, count, nodes(, blob)]`` of a file whose chunks live as ``layout`` says,
    placed on the nodes whose ``inventories`` (node -> blob -> extents) hold them; [] nodes if none."""
    runs: list = []
    for first, count, blob in layout:
        end = first + count
        holders = []
        cuts = {first, end}
        for node_id, inventory in inventories.items():
            for extent_first, extent_count in inventory.get(blob, ()):
                lo, hi = max(extent_first, first), min(extent_first + extent_count, end)
                if lo < hi:
                    holders.append((lo, hi, node_id))
                    cuts.update((lo, hi))
        points = sorted(cuts)
        for lo, hi in zip(points, points[1:]):
            nodes = sorted({node_id for a, b, node_id in holders if a <= lo and hi <= b})
            add_run(runs, lo, hi - lo, nodes, None if blob == version else blob)
    return runs


def entry_from(desc: dict, inventories: dict) -> dict:
    """A namespace entry rebuilt from a node's description of a file version."""
    return {"size": desc["size"], "chunks": -(-desc["size"] // desc["chunk_size"]), "chunk_size": desc["chunk_size"],
            "sha256": desc["sha256"], "mtime": desc["mtime"], "version": desc["version"],
            "batch_chunks": desc["batch_chunks"], "runs": runs_from_layout(desc["layout"], desc["version"], inventories),
            "commit_index": desc.get("commit_index", desc["index"]), "committed_at": desc.get("committed_at", desc["mtime"])}


def layout_of(entry: dict) -> list:
    return [[run[0], run[1], run_blob(entry, run)] for run in entry["runs"]]


def missing_chunks(entry: dict, inventories: dict) -> int:
    """Chunks of ``entry`` that no reporting node holds."""
    runs = runs_from_layout(layout_of(entry), entry["version"], inventories)
    return sum(run[1] for run in runs if not run[2])


@dataclass
class Rebuilt:
    files: dict
    versions: dict  # name -> older versions, oldest first (namespace.py)
    trash: dict  # name -> trashed entries, each with "trashed_at"
    index: int
    from_backup: int  # files taken from the backup
    backup_index: int | None
    from_notes: int
    deleted: int  # backup files a tombstone after the backup removed (or moved to the trash)
    lost_found: list  # [(name, entry, expected sha256 or "")], not yet verified
    incomplete: int  # unconfirmed uploads with chunks missing: ignored


def rebuild(backup: dict | None, descriptions: list[dict], inventories: dict, quarantined: set) -> Rebuilt:
    """Merge a backup document (or None) with the nodes' descriptions; see the module docstring.

    ``descriptions``: every description and tombstone every node returned
    (duplicates fine); ``inventories``: node -> blob -> extents of the
    reporting nodes; ``quarantined``: blobs some node holds in quarantine.
    Per name, what happened after the backup is replayed in index order:
    each note makes its entry current (the one before becomes an older
    version, if all its chunks are still there), and a tombstone newer than
    the backup deletes the name or, if it says ``trashed_at``, moves the
    name's versions to the trash.
    """
    state = backup["state"] if backup else {}
    files = dict(state.get("files", {}))
    versions = dict(state.get("versions", {}))
    trash = dict(state.get("trash", {}))
    base = backup["index"] if backup else 0
    from_backup = len(files)
    top = base
    noted: dict[str, dict[str, dict]] = {}  # name -> version -> its newest note
    tombstones: dict[str, dict] = {}
    confirmed: set[str] = set()
    unconfirmed: dict[str, dict] = {}
    for desc in descriptions:
        top = max(top, desc["index"])
        if desc.get("deleted"):
            if desc["index"] > tombstones.get(desc["name"], {"index": 0})["index"]:
                tombstones[desc["name"]] = desc
        elif desc.get("system"):
            continue
        elif desc["index"]:
            confirmed.add(desc["version"])
            by_version = noted.setdefault(desc["name"], {})
            if desc["version"] not in by_version or desc["index"] > by_version[desc["version"]]["index"]:
                by_version[desc["version"]] = desc
        else:
            unconfirmed.setdefault(desc["version"], desc)

    def whole(entry: dict) -> bool:
        return not missing_chunks(entry, inventories)

    from_notes = deleted = 0
    for name in sorted(set(noted) | set(tombstones)):
        events = [d for d in noted.get(name, {}).values() if d["index"] > base]
        tombstone = tombstones.get(name)
        if tombstone is not None and tombstone["index"] > base:
            events.append(tombstone)
        if not events:
            continue  # the backup knows better: it records deletes and replaces up to base
        events.sort(key=lambda d: d["index"])
        current, older = files.get(name), list(versions.get(name, ()))
        was_there, from_note = current is not None, False
        for n, desc in enumerate(events):
            if desc.get("deleted"):
                if "trashed_at" in desc:
                    gone = [*older, *([current] if current is not None else [])]
                    trash[name] = [*trash.get(name, ()), *({**e, "trashed_at": desc["trashed_at"],
                                                            "deleted_by": desc["index"]} for e in gone)]
                current, older, from_note = None, [], False
                continue
            entry = entry_from(desc, inventories)
            if current is not None and current["version"] != entry["version"] and whole(current):
                older.append(current)  # kept as a version (a touch keeps the version: no copy)
            current, from_note = entry, True
        deleted += was_there and current is None
        from_notes += from_note
        if current is None:
            files.pop(name, None)
        else:
            files[name] = current
        if older and current is not None:
            versions[name] = older
        else:
            versions.pop(name, None)
    kept = [*files.values(), *(e for table in (versions, trash) for entries in table.values() for e in entries)]
    used = {run_blob(e, run) for e in kept for run in e["runs"]} | {e["version"] for e in kept}
    lost_found, incomplete = [], 0
    for version, desc in sorted(unconfirmed.items(), key=lambda item: item[1]["name"]):
        blobs = {run[2] for run in desc["layout"]}
        if version in confirmed or version in used or (blobs & quarantined) or not desc["layout"]:
            continue
        entry = entry_from(desc, inventories)
        if any(not run[2] for run in entry["runs"]):
            incomplete += 1
            continue
        name = LOST_AND_FOUND + desc["name"]
        if name in files or any(name == other for other, _, _ in lost_found):
            name = f"{name}.{version[:8]}"
        lost_found.append((name, entry, desc["sha256"]))
    return Rebuilt(files, versions, trash, top, from_backup, backup["index"] if backup else None, from_notes,
                   deleted, lost_found, incomplete)


# --- the collecting master ----------------------------------------------------------------------
class RecoveryCollector:
    """Stands in for the Master while the nodes report; then rebuilds and writes the metadata."""

    def __init__(self, config, make_pool):
        """``make_pool(locate)``: the master's NodePool over ``locate`` (node id -> address)."""
        self.config = config
        self.pool = make_pool(self.address_of)
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeReport] = {}
        self._first_seen: float | None = None
        self._last_new: float = 0.0
        self.done = threading.Event()

    def address_of(self, node_id: str) -> tuple[str, int]:
        with self._lock:
            report = self._nodes.get(node_id)
        if report is None:
            raise protocol.Unavailable(f"node {node_id} is unknown")
        return report.address

    # --- node requests (RecoveryHandler) ---
    def register(self, msg: protocol.Register, peer: str) -> None:
        if self.done.is_set():
            raise protocol.Unavailable("recovery finished: register again")
        now = time.monotonic()
        with self._lock:
            if msg.node_id not in self._nodes:
                self._last_new = now
                self._first_seen = self._first_seen or now
            self._nodes[msg.node_id] = NodeReport(msg.node_id, (msg.host, msg.port), msg.cluster_id, msg.epoch,
                                                  last_heard=now)
        logger.info("recovery: node %s registered from %s (cluster %s, epoch %d, %d chunks)", msg.node_id, peer,
                    msg.cluster_id or "(none)", msg.epoch, msg.chunks)

    def inventory(self, msg: protocol.Inventory) -> None:
        with self._lock:
            report = self._nodes.get(msg.node_id)
            if report is None:
                raise protocol.RemoteProtocolError(f"node {msg.node_id} sent an inventory without registering")
            for item in msg.blobs:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                        and isinstance(item[1], list)):
                    raise protocol.RemoteProtocolError("malformed inventory entry")
                # A blob with many extents spans pages (protocol.inventory_pages): merge them.
                report.inventory.setdefault(item[0], []).extend((int(f), int(c)) for f, c in item[1])
            report.quarantined.update(b for b in msg.quarantined if isinstance(b, str))
            if msg.done:
                for extents in report.inventory.values():
                    extents.sort()
            report.complete = report.complete or msg.done
            report.last_heard = time.monotonic()

    def heartbeat(self, msg: protocol.Heartbeat) -> None:
        if self.done.is_set():
            raise protocol.Unavailable("recovery finished: register again with the master")
        with self._lock:
            report = self._nodes.get(msg.node_id)
            if report is None:
                raise protocol.RemoteProtocolError(f"node {msg.node_id} heartbeats without registering")
            report.last_heard = time.monotonic()

    def status(self) -> protocol.StatusReply:
        with self._lock:
            nodes = [{"id": r.node_id, "address": transport.format_address(r.address), "alive": r.complete,
                      "last_heard_s": round(time.monotonic() - r.last_heard, 1), "capacity_bytes": 0,
                      "used_bytes": 0, "chunks": sum(c for ex in r.inventory.values() for _, c in ex), "full": False}
                     for r in sorted(self._nodes.values(), key=lambda r: r.node_id)]
        return protocol.StatusReply(nodes=nodes, totals={
            "recovering": True, "nodes": len(nodes), "nodes_alive": sum(1 for n in nodes if n["alive"]),
            "files": 0, "file_bytes": 0, "used_bytes": 0, "chunks": sum(n["chunks"] for n in nodes),
            "replication": self.config.replication,
            "warnings": ["the master is recovering its metadata from the nodes (--recover-from-nodes)"]})

    # --- the recovery ---
    def wait_for_nodes(self) -> list[NodeReport]:
        """Reports of the nodes that came, once no new one has come for a while.

        Waits for a first node as long as it takes; then until no new node
        has registered for 3 heartbeat intervals (bounded by safe_mode_s)
        and every node that registered has sent its whole inventory.
        """
        settle = max(3 * self.config.heartbeat_interval_s, 1.0)
        bound = max(self.config.safe_mode_s, settle)
        logged = 0.0
        while True:
            now = time.monotonic()
            with self._lock:
                reports = list(self._nodes.values())
                first, last_new = self._first_seen, self._last_new
            complete = [r for r in reports if r.complete]
            if complete and now - last_new >= settle and (len(complete) == len(reports) or now - first >= bound):
                return complete
            if complete and now - first >= bound + settle:
                return complete
            if not reports and now - logged >= 10:
                logger.warning("recovery: waiting for storage nodes to register")
                logged = now
            time.sleep(0.1)

    def run(self, data_dir: str) -> dict:
        """Collect, rebuild, verify lost+found, write ``data_dir/metadata.json``; the report."""
        started = time.monotonic()
        reports = self.wait_for_nodes()
        waited = time.monotonic() - started
        cluster_ids = sorted({r.cluster_id for r in reports if r.cluster_id})
        if len(cluster_ids) > 1:
            raise RecoveryFailed("the nodes belong to different clusters: " + ", ".join(
                f"{cid} ({', '.join(r.node_id for r in reports if r.cluster_id == cid)})" for cid in cluster_ids))
        if not cluster_ids:
            raise RecoveryFailed("no node belongs to a cluster: nothing to recover")
        cluster_id = cluster_ids[0]
        reports = [r for r in reports if r.cluster_id == cluster_id]
        inventories = {r.node_id: r.inventory for r in reports}
        quarantined = set().union(*(r.quarantined for r in reports))
        descriptions = []
        for report in reports:
            try:
                descriptions += self._list_notes(report.node_id)
            except protocol.BackupError as exc:
                logger.warning("recovery: node %s did not give its descriptions: %s", report.node_id, exc)
        backup = self._newest_backup(descriptions, inventories, cluster_id)
        result = rebuild(backup, descriptions, inventories, quarantined)
        found = self._verify_lost_found(result.lost_found)
        files = dict(result.files)
        files.update({name: {**entry, "commit_index": result.index} for name, entry in found})
        nodes = dict(backup["state"].get("nodes", {})) if backup else {}
        nodes.update({r.node_id: {"address": transport.format_address(r.address)} for r in reports})
        epoch = max([r.epoch for r in reports] + [backup.get("epoch", 0) if backup else 0])
        state = {"files": files, "versions": result.versions, "trash": result.trash, "nodes": nodes,
                 "cluster_id": cluster_id, "epoch": epoch}
        os.makedirs(data_dir, mode=DIR_MODE, exist_ok=True)
        atomic_write_json(os.path.join(data_dir, CHECKPOINT_NAME),
                          {"format": CHECKPOINT_FORMAT, "index": result.index, "state": state})
        missing = sum(1 for entry in files.values() if missing_chunks(entry, inventories))
        report = {"files": len(files), "bytes": sum(e["size"] for e in files.values()),
                  "backup_index": result.backup_index, "from_backup": result.from_backup,
                  "from_notes": result.from_notes, "deleted": result.deleted, "lost_found": len(found), "incomplete_uploads": result.incomplete,
                  "missing_chunks": missing, "nodes": len(reports), "cluster_id": cluster_id, "index": result.index,
                  "epoch": epoch, "seconds": round(time.monotonic() - started, 2), "waited_s": round(waited, 2)}
        self.done.set()
        return report

    def _list_notes(self, node_id: str) -> list[dict]:
        conn = self.pool.acquire(node_id)
        try:
            conn.send(protocol.ListNotes())
            found = []
            while True:
                page = conn.expect(protocol.NotesPage)
                found += [d for d in page.notes if _well_formed(d)]
                if page.done:
                    return found
        finally:
            self.pool.release(conn)

    def _newest_backup(self, descriptions, inventories, cluster_id) -> dict | None:
        """The newest metadata backup that reads back whole, with its size and SHA-256 as described."""
        copies = {d["version"]: d for d in descriptions if d.get("system") == "meta"}
        for desc in sorted(copies.values(), key=lambda d: d["index"], reverse=True):
            try:
                entry = entry_from(desc, inventories)
                data = b"".join(bytes(piece) for piece in self._read(entry))
                if len(data) != desc["size"] or hashlib.sha256(data).hexdigest() != desc["sha256"]:
                    raise ValueError("size or SHA-256 differs from its description")
                doc = meta_backup.decode(data)
                if doc.get("cluster_id") != cluster_id:
                    raise ValueError(f"it belongs to cluster {doc.get('cluster_id')}")
                logger.info("recovery: metadata backup %s at index %d read back", desc["version"], doc["index"])
                return doc
            except (protocol.BackupError, ValueError) as exc:
                logger.warning("recovery: metadata backup %s unusable: %s", desc["version"], exc)
        logger.warning("recovery: no usable metadata backup; rebuilding from commit notes alone")
        return None

    def _verify_lost_found(self, candidates) -> list[tuple[str, dict]]:
        """Candidates whose bytes read back whole, with their SHA-256 filled in (and checked)."""
        found = []
        for name, entry, expected in candidates:
            sha = hashlib.sha256()
            try:
                for piece in self._read(entry):
                    sha.update(piece)
            except protocol.BackupError as exc:
                logger.warning("recovery: unconfirmed upload %r unreadable, not recovered: %s", name, exc)
                continue
            if expected and sha.hexdigest() != expected:
                logger.warning("recovery: unconfirmed upload %r does not match its SHA-256, not recovered", name)
                continue
            found.append((name, {**entry, "sha256": sha.hexdigest()}))
        return found

    def _read(self, entry: dict):
        """Yield the bytes of ``entry`` from whichever holder answers with good CRCs."""
        buffer = bytearray(entry["batch_chunks"] * (entry["chunk_size"] + protocol.CRC_BYTES))
        for first, count, node_ids, blob, skip, take in transfers.plan_pieces(entry, 0, entry["size"]):
            errors = []
            for node_id in node_ids:
                try:
                    conn = self.pool.acquire(node_id)
                except protocol.BackupError as exc:
                    errors.append(f"{node_id}: {exc.message}")
                    continue
                try:
                    reply = conn.request(protocol.GetChunks(blob=blob, first=first, count=count),
                                         protocol.ChunkData, body_buffer=buffer)
                    body = _intact(reply, entry, first, count)
                    break
                except protocol.BackupError as exc:
                    errors.append(f"{node_id}: {exc.message}")
                finally:
                    self.pool.release(conn)
            else:
                raise protocol.DataLost(f"chunks {first}..{first + count - 1} of {blob}: "
                                        + ("; ".join(errors) or "no copy"))
            yield body[count * protocol.CRC_BYTES:][skip:skip + take]


def _intact(reply: protocol.ChunkData, entry: dict, first: int, count: int) -> memoryview:
    """The body of a CHUNK_DATA reply if every chunk is there and matches its CRC32, else ChecksumMismatch.

    Recovery reads whole pieces only (a backup, a lost+found candidate): a
    replica with any chunk missing or damaged is skipped for the next one.
    """
    crc_bytes, payload = protocol.split_chunk_body(reply.body, count)
    if reply.missing or reply.corrupt or reply.chunk_size != entry["chunk_size"] or reply.first != first \
            or reply.count != count or protocol.verify_chunks(payload, crc_bytes, entry["chunk_size"]) >= 0:
        raise protocol.ChecksumMismatch(f"chunks {first}..{first + count - 1} of {reply.blob} not intact")
    return memoryview(reply.body)


def _well_formed(desc) -> bool:
    try:
        validate_item(desc)
        return True
    except protocol.RemoteProtocolError:
        return False


class RecoveryHandler(transport.RequestHandler):
    """Requests to a recovering master: nodes report, everyone else is told to wait."""

    @property
    def collector(self) -> RecoveryCollector:
        return self.server.collector

    def do_REGISTER(self, msg: protocol.Register) -> None:
        self.collector.register(msg, self.peer)
        self.reply(protocol.Registered())  # no cluster id: the nodes obey us in nothing

    def do_INVENTORY(self, msg: protocol.Inventory) -> None:
        self.collector.inventory(msg)
        self.reply(protocol.InventoryOk())

    def do_HEARTBEAT(self, msg: protocol.Heartbeat) -> None:
        self.collector.heartbeat(msg)
        self.reply(protocol.HeartbeatOk())

    def do_STATUS(self, msg: protocol.Status) -> None:
        self.reply(self.collector.status())

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            def refuse(msg):
                raise protocol.Unavailable("the master is recovering its metadata from the nodes; try again soon")
            return refuse
        raise AttributeError(name)


def report_line(report: dict) -> str:
    backup = (f"{report['from_backup']} from the metadata backup at index {report['backup_index']}"
              if report["backup_index"] is not None else "no metadata backup")
    return (f"recovered {report['files']} files ({report['bytes']} bytes) from {report['nodes']} node(s) of "
            f"cluster {report['cluster_id']}: {backup}, {report['from_notes']} from commit notes after it, "
            f"{report['deleted']} deleted after it; "
            f"{report['lost_found']} in {LOST_AND_FOUND}; {report['missing_chunks']} with missing chunks; "
            f"{report['incomplete_uploads']} incomplete unconfirmed upload(s) ignored; took {report['seconds']} s "
            f"({report['waited_s']} s waiting for nodes)")
