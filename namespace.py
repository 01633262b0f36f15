"""The master's namespace: a deterministic state machine fed by log records.

Nothing changes the namespace but ``apply`` of a record that the metadata
log has made durable (metadata_log.py drives it).  That keeps recovery
(replay the log) and, later, replication to standby masters (ship the log)
the same code path as normal operation.

Records (JSON objects; the log adds the index ``"i"``):

    {"op": "put", "name": N, "file": ENTRY,      store or replace a file; the entry
     "t": time, "keep": K}                       it replaces becomes an older version,
                                                 of which K - 1 stay (oldest dropped
                                                 first; no "keep" = 1: no history)
    {"op": "put", "name": N, "file": ENTRY,      the same, derived from the name's
     "base": {"version": V,                      version V (append, write, touch):
              "first": f, "end": e}}             chunks outside [f, e) keep the
                                                 placement of the current entry
    {"op": "delete", "name": N}                  remove a file and its versions
    {"op": "delete", "name": N, "trash": true,   move them to the trash instead,
     "t": time}                                  marked trashed_at = t and
                                                 deleted_by = the record's index
    {"op": "undelete", "name": N}                bring back from the trash what the
                                                 newest delete of N moved there
    {"op": "expire", "name": N, "before": T}     drop N's trash trashed at or before T
    {"op": "purge", "name": N}                   drop N, its versions and its trash
    {"op": "replicas", "name": N, "blob": B,     chunks [first, first+count) of
     "first": f, "count": c, "expect": [ID..],  blob B move from the nodes in
     "nodes": [ID..]}                            expect to those in nodes (only
                                                 if still on expect: CAS)
    {"op": "node", "node_id": ID, "address": A}  remember where a node lives
    {"op": "cluster", "cluster_id": C}           the cluster's id (first start)
    {"op": "epoch", "epoch": E}                  the master's fencing epoch
                                                 (one record per start)
    {"op": "snapshot", "root": R, "t": time,     a tree snapshot (snapshots.py): its
     "files": n, "bytes": b, "since": S,         id is the record's index; its member
     "manifest": ENTRY, "pins": [[N, V]..]}      list lives in the manifest blob
    {"op": "forget", "ids": [ID..]}              drop snapshots; versions only they
                                                 pinned are freed

A file ENTRY::

    {"size": bytes, "chunks": n, "chunk_size": bytes, "sha256": hex,
     "mtime": unix seconds, "version": blob id, "batch_chunks": n,
     "runs": [[first_chunk, count, [node_id, ...]], ...],
     "commit_index": i}

``commit_index`` is the index of the put record that made the entry (set by
``apply``): the commit notes nodes keep carry it, so a recovery from the
nodes knows which of two descriptions of a name is newer.

``apply`` adds ``commit_index`` (the record's index: the version id) and
``committed_at`` (the record's ``t``) to the entry; see history.py.
Older versions of a live name are kept in ``versions[name]``, oldest first;
what a delete moved to the trash in ``trash[name]`` (each entry with its
``trashed_at`` and ``deleted_by``, the index of the delete record), in the
order it was deleted.  ``deleted_by`` names the delete operation: two
deletes of one name may carry the same ``t`` (a millisecond, or a clock
stepped back), and undelete must bring back exactly one of them.  An entry
that stops being current gets ``superseded``, the index of the record that
did it; one that retention drops (keep_versions, trash expiry, purge, a
delete without trash) while a snapshot pins it moves to ``pinned[name]``
instead of going (snapshots.py explains the pin rule).

A run has a fourth element, a blob id, when its chunks live in another blob
than the entry's version: after an append or an in-place write, untouched
chunks stay where they were (copy-on-write at chunk granularity).

Placement is kept as runs of consecutive chunks on the same replica set, so
a 1 GiB file costs a few kilobytes, not one entry per chunk.  Entries are
never mutated after they are applied, only replaced; ``snapshot`` can
therefore hand out shallow copies that the log serializes while commits go
on.  Readers use ``get``/``items`` without a lock: a dict lookup or copy is
atomic under the GIL, so readers never wait for writers.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

import history
import protocol
import snapshots as snapshots_module


class Namespace:
    """Files and known node addresses.  See the module docstring."""

    def __init__(self):
        self.files: dict[str, dict] = {}
        self.nodes: dict[str, dict] = {}
        # name -> older versions of a live name, oldest first.  Lists are
        # replaced, never changed in place (snapshot shares them).
        self.versions: dict[str, list[dict]] = {}
        # name -> trashed entries (each with "trashed_at"), replaced like versions.
        self.trash: dict[str, list[dict]] = {}
        # name -> entries kept only because a snapshot pins them, replaced like versions.
        self.pinned: dict[str, list[dict]] = {}
        # snapshot id -> its record as applied (with "i"); see snapshots.py.
        self.snapshots: dict[int, dict] = {}
        self._explicit: dict[int, frozenset] = {}  # snapshot id -> its explicit pins as (name, id) pairs
        self.cluster_id: str | None = None
        self.epoch = 0

    # --- the state machine (driven by MetadataLog) --------------------------------
    def apply(self, record: dict) -> None:
        op = record["op"]
        if op == "put":
            name = record["name"]
            entry = record["file"]
            old = self.files.get(name)
            if "base" in record:
                entry = rebase_entry(entry, old, record["base"])
            entry = {**{k: v for k, v in entry.items() if k not in _STATE_FIELDS},
                     "commit_index": record.get("i", 0), "committed_at": record.get("t", entry["mtime"])}
            if old is not None:
                old = {**old, "superseded": record.get("i", 0)}
                kept, dropped = history.trim_versions([*self.versions.get(name, ()), old], record.get("keep", 1))
                self._set_versions(name, kept)
                self._drop(name, dropped)
            self.files[name] = entry
        elif op == "delete":
            name = record["name"]
            ended = self.history(name)
            if ended:
                ended[-1] = {**ended[-1], "superseded": record.get("i", 0)}
            if record.get("trash"):
                moved = [{**e, "trashed_at": record["t"], **_deleted_by(record.get("i"))} for e in ended]
                if moved:
                    self.trash[name] = [*self.trash.get(name, ()), *moved]
            else:
                self._drop(name, ended)
            self.files.pop(name, None)
            self.versions.pop(name, None)
        elif op == "undelete":
            self._undelete(record["name"])
        elif op == "expire":
            trashed = self.trash.get(record["name"], ())
            kept = [e for e in trashed if e["trashed_at"] > record["before"]]
            self._set_list(self.trash, record["name"], kept)
            self._drop(record["name"], [e for e in trashed if e["trashed_at"] <= record["before"]])
        elif op == "purge":
            name = record["name"]
            ended = [*self.trash.get(name, ()), *self.history(name)]
            if name in self.files:
                ended[-1] = {**ended[-1], "superseded": record.get("i", 0)}
            for table in (self.files, self.versions, self.trash):
                table.pop(name, None)
            self._drop(name, ended)
        elif op == "replicas":
            # Compare and set: the file may have been replaced, deleted or
            # re-placed since the record was decided; then nothing changes.
            # Every version of the name placed so changes with it: versions
            # share the chunks an append or write did not touch.
            name, blob, first, count = record["name"], record["blob"], record["first"], record["count"]

            def moved(entry: dict) -> dict:
                if not placed_on(entry, blob, first, count, record["expect"]):
                    return entry
                return {**entry, "runs": set_run_nodes(entry["runs"], first, count, record["nodes"])}

            entry = self.files.get(name)
            if entry is not None:
                self.files[name] = moved(entry)
            for table in (self.versions, self.trash, self.pinned):
                if name in table:
                    table[name] = [moved(e) for e in table[name]]
            snapshot_id = snapshots_module.manifest_id(name)
            if snapshot_id in self.snapshots:
                snap = self.snapshots[snapshot_id]
                self.snapshots[snapshot_id] = {**snap, "manifest": moved(snap["manifest"])}
        elif op == "node":
            self.nodes[record["node_id"]] = {"address": record["address"]}
        elif op == "cluster":
            self.cluster_id = record["cluster_id"]
        elif op == "epoch":
            self.epoch = record["epoch"]
        elif op == "snapshot":
            snap = {k: v for k, v in record.items() if k != "op"}
            snap["i"] = record.get("i", 0)
            snap["manifest"] = {**record["manifest"], "commit_index": snap["i"]}
            self._add_snapshot(snap)
        elif op == "forget":
            for snapshot_id in record["ids"]:
                self.snapshots.pop(snapshot_id, None)
                self._explicit.pop(snapshot_id, None)
            for name, entries in list(self.pinned.items()):
                self._set_list(self.pinned, name, [e for e in entries if self.is_pinned(name, e)])
        else:
            raise ValueError(f"unknown record op {op!r}")

    def _add_snapshot(self, snap: dict) -> None:
        self.snapshots[snap["i"]] = snap
        self._explicit[snap["i"]] = frozenset((name, vid) for name, vid in snap.get("pins", ()))

    def is_pinned(self, name: str, entry: dict) -> bool:
        """True if some snapshot keeps ``entry`` of ``name`` (snapshots.pins); O(snapshots)."""
        return any(snapshots_module.pins(snap, name, entry, self._explicit.get(sid, frozenset()))
                   for sid, snap in list(self.snapshots.items()))

    def _drop(self, name: str, entries: list[dict]) -> None:
        """Retention let go of ``entries`` of ``name``: those a snapshot pins move to ``pinned``."""
        keep = [e for e in entries if self.is_pinned(name, e)]
        if keep:
            self.pinned[name] = [*self.pinned.get(name, ()), *keep]

    def _set_versions(self, name: str, older: list[dict]) -> None:
        self._set_list(self.versions, name, older)

    @staticmethod
    def _set_list(table: dict, name: str, entries: list[dict]) -> None:
        if entries:
            table[name] = entries
        else:
            table.pop(name, None)

    def _undelete(self, name: str) -> None:
        """The entries the newest delete of ``name`` trashed become its versions again, the newest current.

        Nothing happens if the name is live (the master refuses that with
        FILE_EXISTS before logging) or has no trash.
        """
        trashed = self.trash.get(name)
        if name in self.files or not trashed:
            return
        newest = delete_of(trashed[-1])
        back = [{k: v for k, v in e.items() if k not in TRASH_KEYS} for e in trashed if delete_of(e) == newest]
        # Current again: no longer superseded (over-pins snapshots taken while it was deleted; never under-pins).
        back[-1] = {k: v for k, v in back[-1].items() if k != "superseded"}
        self._set_list(self.trash, name, [e for e in trashed if delete_of(e) != newest])
        self._set_versions(name, back[:-1])
        self.files[name] = back[-1]

    def snapshot(self) -> dict:
        return {"files": dict(self.files), "nodes": dict(self.nodes), "versions": dict(self.versions),
                "trash": dict(self.trash), "pinned": dict(self.pinned),
                "snapshots": list(self.snapshots.values()),
                "cluster_id": self.cluster_id, "epoch": self.epoch}

    def restore(self, snapshot: dict) -> None:
        self.files = dict(snapshot.get("files", {}))
        self.nodes = dict(snapshot.get("nodes", {}))
        self.versions = dict(snapshot.get("versions", {}))
        self.trash = dict(snapshot.get("trash", {}))
        self.pinned = dict(snapshot.get("pinned", {}))
        self.snapshots, self._explicit = {}, {}
        for snap in snapshot.get("snapshots", ()):
            self._add_snapshot(snap)
        self.cluster_id = snapshot.get("cluster_id")
        self.epoch = snapshot.get("epoch", 0)

    # --- reads (no lock) -----------------------------------------------------------
    def lookup(self, name: str) -> dict:
        entry = self.files.get(name)
        if entry is None:
            raise protocol.FileNotFound(f"no file named {name!r}")
        return entry

    def history(self, name: str) -> list[dict]:
        """Every kept version of a live ``name``, oldest first, the current one last ([] if none)."""
        current = self.files.get(name)
        return [] if current is None else [*self.versions.get(name, ()), current]

    def lookup_version(self, name: str, version: int | None = None, at: float | None = None) -> dict:
        """The entry of ``name`` a request names (history.pick_version); FileNotFound if none."""
        if version is None and at is None:
            return self.lookup(name)
        entry = history.pick_version(self.history(name), version, at)
        if entry is None:
            if name not in self.files:
                raise protocol.FileNotFound(f"no file named {name!r}")
            raise history.no_such_version(name, version, at)
        return entry

    def entries_of(self, name: str) -> list[dict]:
        """Every entry whose chunks must be kept for ``name``: pinned, trash and versions (what GC compares).

        For a snapshot's manifest pseudo-name (snapshots.manifest_name), its manifest entry.
        """
        snapshot_id = snapshots_module.manifest_id(name)
        if snapshot_id is not None:
            snap = self.snapshots.get(snapshot_id)
            return [] if snap is None else [snap["manifest"]]
        return [*self.pinned.get(name, ()), *self.trash.get(name, ()), *self.history(name)]

    def trash_listing(self, prefix: str = "") -> list[tuple[str, dict]]:
        """(name, trashed entry) pairs whose name starts with ``prefix``, by name, oldest delete first."""
        return [(name, entry) for name in sorted(n for n in list(self.trash) if n.startswith(prefix))
                for entry in self.trash.get(name, ())]

    def find_entry(self, name: str, commit_index: int) -> dict | None:
        """The kept entry of ``name`` with this commit index, or None (it was dropped or re-placed away)."""
        return next((e for e in self.entries_of(name) if history.version_id(e) == commit_index), None)

    def all_entries(self) -> list[tuple[str, dict]]:
        """(name, entry) for every kept entry: trash, older versions, then current files.

        What repair and reconciliation must keep at ``replication`` copies
        and treat as known.  Current files come last, so a map built from
        this list prefers them.
        """
        pairs = [(snapshots_module.manifest_name(sid), snap["manifest"]) for sid, snap in list(self.snapshots.items())]
        pairs += [(name, entry) for table in (self.pinned, self.trash, self.versions)
                  for name, entries in list(table.items()) for entry in entries]
        return pairs + list(self.files.items())

    def space(self) -> dict:
        """Bytes held by current files, by older versions only, by the trash only and by snapshots only
        (pinned entries past retention, and the manifests) (space_by_class)."""
        older = [e for entries in list(self.versions.values()) for e in entries]
        trashed = [e for entries in list(self.trash.values()) for e in entries]
        pinned = [e for entries in list(self.pinned.values()) for e in entries]
        pinned += [snap["manifest"] for snap in list(self.snapshots.values())]
        live, versions, trash, snapshot = space_by_class([list(self.files.values()), older, trashed, pinned])
        return {"live_bytes": live, "version_bytes": versions, "trash_bytes": trash, "snapshot_bytes": snapshot}

    def snapshot_listing(self, root: str | None = None) -> list[dict]:
        """snapshots.info of every snapshot (of ``root`` only, if given), oldest first."""
        return [snapshots_module.info(snap) for _, snap in sorted(list(self.snapshots.items()))
                if root is None or snap["root"] == root]

    def listing(self, prefix: str = ""):
        """Yield (name, entry) pairs whose name starts with ``prefix``, sorted by name.

        Lazy: a listing holds the sorted names, not a pair per file, so a
        paged LIST of a million files costs a list of references.
        """
        names = sorted(self.files)  # copy under the GIL; sorting runs unlocked
        if prefix:
            start = bisect.bisect_left(names, prefix)
            end = start
            while end < len(names) and names[end].startswith(prefix):
                end += 1
            names = names[start:end]
        files = self.files
        for name in names:
            entry = files.get(name)
            if entry is not None:  # not deleted since the names were taken
                yield name, entry


# Keys a delete adds to the entries it moves to the trash; undelete takes them off.
TRASH_KEYS = ("trashed_at", "deleted_by")


def _deleted_by(index: int | None) -> dict:
    """The ``deleted_by`` key of a trashed entry, if the delete record has an index (it always has in a log)."""
    return {} if index is None else {"deleted_by": index}


def delete_of(trashed: dict) -> tuple:
    """What identifies the delete operation that trashed an entry: its record's index.

    Entries trashed before ``deleted_by`` existed (an older checkpoint)
    fall back to their ``trashed_at``, the only mark they have.
    """
    if "deleted_by" in trashed:
        return ("index", trashed["deleted_by"])
    return ("time", trashed["trashed_at"])


# Fields apply sets on entries that a new current entry never inherits.
_STATE_FIELDS = ("superseded", *TRASH_KEYS)


def make_entry(size: int, chunk_size: int, sha256: str, version: str, runs: list, batch_chunks: int) -> dict:
    """A file entry as stored in the namespace (see the module docstring)."""
    return {
        "size": size,
        "chunks": (size + chunk_size - 1) // chunk_size,
        "chunk_size": chunk_size,
        "sha256": sha256,
        "mtime": round(time.time(), 3),
        "version": version,
        # Chunks per batch when stored: nodes hold the file in records of
        # this many chunks, so repairs and reads work in these pieces.
        "batch_chunks": batch_chunks,
        "runs": runs,
    }


def put_record(name: str, entry: dict, base: dict | None = None) -> dict:
    """A log record storing ``entry`` as ``name``.

    ``base`` (``{"version", "first", "end"}``, see ``rebase_entry``) marks an
    entry derived from the name's current version, of which it rewrote only
    chunks [first, end): an append or write (the chunks it touched) or a
    touch (none).  Without it the entry replaces the file whole.
    """
    record = {"op": "put", "name": name, "file": entry}
    if base is not None:
        record["base"] = base
    return record


def rebase_entry(entry: dict, current: dict | None, base: dict) -> dict:
    """``entry`` with its chunks outside [base first, base end) placed as ``current`` places them.

    A writer reads the file's entry when it starts and commits seconds or
    minutes later.  Meanwhile repair and reconciliation may have moved the
    chunks it did not touch (``replicas`` records: a dead or wiped node taken
    off, copies made elsewhere); putting back the runs read at the start
    would list nodes that no longer hold those chunks and forget the new
    copies, which their nodes then drop as surplus.  So the put is re-based
    here, in the log's ordered apply, where no placement change can slip in
    between the read and the write.  The writer holds the name's lock, so
    ``current`` is the version it read; if it is not (a bug), ``entry`` is
    kept as computed rather than losing the writer's data.
    """
    if current is None or current["version"] != base["version"]:
        return entry
    first, end = base["first"], base["end"]
    own = []  # the runs this put wrote, clipped to [first, end)
    for run in entry["runs"]:
        lo, hi = max(run[0], first), min(run[0] + run[1], end)
        if lo < hi:
            own.append([lo, hi - lo, run[2], *run[3:]])
    return {**entry, "runs": splice_runs(current, own, first, end, version=entry["version"])}


def run_blob(entry: dict, run: list) -> str:
    """The blob that holds a run's chunks: its own, or the entry's version."""
    return run[3] if len(run) > 3 else entry["version"]


def entry_blobs(entry: dict) -> set[str]:
    """Every blob an entry's chunks live in."""
    return {run_blob(entry, run) for run in entry["runs"]} or {entry["version"]}


def first_covering(spans, chunk: int) -> int:
    """Index of the first of sorted, disjoint ``spans`` that ends after ``chunk`` (len(spans) if none).

    Spans are runs or extents, ``(first, count, ...)``.  A binary search: a
    file of a million runs, or a node inventory of a million extents, is not
    walked from its start for every lookup.
    """
    index = bisect.bisect_right(spans, chunk, key=_span_first) - 1
    if index < 0 or spans[index][0] + spans[index][1] <= chunk:
        index += 1
    return index


def _span_first(span) -> int:
    return span[0]


def placed_on(entry: dict, blob: str, first: int, count: int, nodes: list) -> bool:
    """True if every chunk of [first, first+count) lives in ``blob`` on exactly ``nodes``."""
    end = first + count
    covered = 0
    runs = entry["runs"]
    for index in range(first_covering(runs, first), len(runs)):
        run = runs[index]
        if run[0] >= end:
            break
        lo, hi = max(run[0], first), min(run[0] + run[1], end)
        if lo >= hi:
            continue
        if run_blob(entry, run) != blob or run[2] != nodes:
            return False
        covered += hi - lo
    return covered == count


def uncovered(first: int, count: int, extents) -> list[tuple[int, int]]:
    """Parts of [first, first+count) not covered by sorted (first, count) ``extents``."""
    gaps = []
    position, end = first, first + count
    for index in range(first_covering(extents, first), len(extents)):
        extent_first, extent_count = extents[index]
        if extent_first + extent_count <= position:
            continue
        if extent_first >= end:
            break
        if extent_first > position:
            gaps.append((position, extent_first - position))
        position = max(position, extent_first + extent_count)
        if position >= end:
            break
    if position < end:
        gaps.append((position, end - position))
    return gaps


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """(first, count) ranges sorted, with overlapping or touching ones joined."""
    merged: list[tuple[int, int]] = []
    for first, count in sorted(ranges):
        if merged and first <= merged[-1][0] + merged[-1][1]:
            last_first, last_count = merged[-1]
            merged[-1] = (last_first, max(last_first + last_count, first + count) - last_first)
        else:
            merged.append((first, count))
    return merged


def space_by_class(classes) -> list[int]:
    """Bytes of data each class of entries holds that no earlier class holds, before replication.

    ``classes``: lists of entries, e.g. current files, then older versions,
    then the trash.  A chunk of a blob counts once, in the first class that
    references it: versions share the chunks an append or write left
    untouched (and undelete shares nothing new), so an older version costs
    only the chunks it alone holds.  A file's partial last chunk counts its
    real length.  Cost: one pass over every entry's runs (no per-chunk work).
    """
    counted: dict[str, list] = {}  # blob -> merged (first, count) ranges counted so far
    totals = []
    for entries in classes:
        spans: dict[str, list] = {}
        chunk_size: dict[str, int] = {}
        short: dict[str, dict] = {}  # blob -> {chunk: bytes} of partial last chunks
        for entry in entries:
            runs = entry["runs"]
            for run in runs:
                blob = run_blob(entry, run)
                spans.setdefault(blob, []).append((run[0], run[1]))
                chunk_size[blob] = entry["chunk_size"]
            tail = entry["size"] % entry["chunk_size"]
            if tail and runs:
                short.setdefault(run_blob(entry, runs[-1]), {})[entry["chunks"] - 1] = tail
        total = 0
        for blob, ranges in spans.items():
            before = counted.get(blob, [])
            merged = merge_ranges(ranges)
            for first, count in merged:
                total += sum(n for _, n in uncovered(first, count, before)) * chunk_size[blob]
            for chunk, nbytes in short.get(blob, {}).items():
                if uncovered(chunk, 1, before):  # counted here, as a whole chunk
                    total -= chunk_size[blob] - nbytes
            counted[blob] = merge_ranges(before + merged)
        totals.append(total)
    return totals


def set_run_nodes(runs: list, first: int, count: int, node_ids: list[str]) -> list:
    """New runs in which chunks [first, first+count) are on ``node_ids``.

    Pure: ``runs`` is not modified.  Runs are split where the range cuts
    them (each piece keeps its blob) and neighbours with equal node lists and
    blob are merged again, so repairs do not fragment a healthy file.
    """
    end = first + count
    pieces = []
    for run in runs:
        run_first, run_count, nodes = run[:3]
        tail = run[3:]
        run_end = run_first + run_count
        if run_end <= first or run_first >= end:
            pieces.append((run_first, run_count, nodes, *tail))
            continue
        if run_first < first:
            pieces.append((run_first, first - run_first, nodes, *tail))
        overlap_first, overlap_end = max(run_first, first), min(run_end, end)
        pieces.append((overlap_first, overlap_end - overlap_first, list(node_ids), *tail))
        if run_end > end:
            pieces.append((end, run_end - end, nodes, *tail))
    merged: list = []
    for piece in pieces:
        add_run(merged, *piece)
    return merged


def splice_runs(old: dict | None, new_runs: list, first: int, end: int, version: str | None = None) -> list:
    """Runs of a file whose chunks [first, end) were rewritten as ``new_runs``.

    Chunks of ``old`` outside that range keep their replicas and name their
    blob explicitly unless it is ``version``, the new entry's own blob, so a
    write or append rewrites only the chunks it touches (copy-on-write).
    """
    runs: list = []
    kept_after = []
    for run in (old["runs"] if old else []):
        run_first, run_count, nodes = run[:3]
        blob = run_blob(old, run)
        if blob == version:
            blob = None
        run_end = run_first + run_count
        if run_first < first:
            add_run(runs, run_first, min(run_end, first) - run_first, nodes, blob)
        if run_end > end:
            start = max(run_first, end)
            kept_after.append((start, run_end - start, nodes, blob))
    for run in new_runs:
        add_run(runs, *run)
    for run in kept_after:
        add_run(runs, *run)
    return runs


def add_run(runs: list, first: int, count: int, node_ids: list[str], blob: str | None = None) -> None:
    """Append chunks [first, first+count) on ``node_ids``, merging with the last run.

    ``blob`` names the blob holding them when it is not the entry's version.
    """
    tail = [blob] if blob is not None else []
    if runs:
        last = runs[-1]
        if last[0] + last[1] == first and last[2] == node_ids and last[3:] == tail:
            runs[-1] = [last[0], last[1] + count, last[2], *tail]
            return
    runs.append([first, count, list(node_ids), *tail])


# Longest a writer may ask to wait for a name (a day): bounds what a peer's
# wait_s can make a server thread do.
MAX_LOCK_WAIT_S = 24 * 3600.0


class NameLocks:
    """Exclusive per-name write locks, granted first-come first-served.

    ``acquire`` queues the caller behind earlier writers of the same name and
    returns a token once it is at the head; ``release`` passes the lock on.
    A waiter gives up after its timeout with FILE_LOCKED naming the holder.
    Readers never use this.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._queues: dict[str, deque] = {}
        self._generation = 0  # bumped by drop_all: tickets of an older one are void
        self._dropped = None  # () -> the exception the waiters it woke raise

    def acquire(self, name: str, owner: str, timeout_s: float) -> "LockTicket":
        ticket = LockTicket(owner, time.time())
        deadline = time.monotonic() + min(max(timeout_s, 0.0), MAX_LOCK_WAIT_S)
        with self._cond:
            generation = ticket.generation = self._generation
            queue = self._queues.setdefault(name, deque())
            queue.append(ticket)
            try:
                while queue[0] is not ticket:
                    if self._generation != generation:
                        raise self._dropped()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        holder = queue[0]
                        raise protocol.FileLocked(
                            f"{name!r} is being written by {holder.owner} since "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.granted_at))}")
                    self._cond.wait(remaining)
            except BaseException:
                # Whatever ends the wait, our place in the queue must go, or
                # the name would pass to a writer that is no longer there.
                queue.remove(ticket)
                if not queue and self._queues.get(name) is queue:
                    del self._queues[name]
                self._cond.notify_all()
                raise
            ticket.granted_at = time.time()
        return ticket

    def release(self, name: str, ticket: "LockTicket") -> None:
        with self._cond:
            if ticket.generation != self._generation:
                return  # dropped with every lock (drop_all): nothing left to release
            queue = self._queues[name]
            assert queue[0] is ticket, "released a lock that was not held"
            queue.popleft()
            if not queue:
                del self._queues[name]
            self._cond.notify_all()

    def drop_all(self, make_error) -> int:
        """Drop every lock and queue: held tickets become void, waiters raise ``make_error()``.

        Name locks are the leader's state (issue 12): a master that stops
        leading must not keep writers queued behind locks it can no longer
        honour, so they fail with (typically) NOT_LEADER and their clients
        re-send to the new leader, whose lock table starts empty.  Holders
        find out when their commit fails; their later ``release`` is a no-op.
        Returns how many locks were held.
        """
        with self._cond:
            held = len(self._queues)
            self._generation += 1
            self._dropped = make_error
            self._queues = {}
            self._cond.notify_all()
        return held

    def held(self) -> list[dict]:
        """Held locks and their queues, for the LOCKS view."""
        with self._cond:
            return [{"name": name, "holder": q[0].owner, "since": q[0].granted_at,
                     "waiting": [{"owner": t.owner, "since": t.queued_at} for t in list(q)[1:]]}
                    for name, q in sorted(self._queues.items())]


class LockTicket:
    """One writer's place in a name's queue."""

    __slots__ = ("owner", "queued_at", "granted_at", "generation")

    def __init__(self, owner: str, queued_at: float):
        self.owner = owner
        self.queued_at = queued_at
        self.granted_at = queued_at
        self.generation = 0  # NameLocks' generation when queued
