"""Integrity review: corruption reports and reconciliation over chunks only older versions use.

A write or append leaves the chunks it did not touch in the blob of the
version it replaced, so one blob is shared by several kept entries of a
name, each placing a different part of it.  What the master does with a
blob's chunks must follow every entry that uses them, not just the current
one.  Unit tests on a Master without nodes.
"""

from __future__ import annotations

from types import SimpleNamespace

import protocol
from master import Master
from namespace import make_entry, splice_runs
from repair import replicas_record

CHUNK = 1024
BATCH = 8
A, B, C = "node-a", "node-b", "node-c"


def two_versions(m: Master) -> None:
    """v1: blob "v1" chunks 0..5 on A, B; v2 rewrites chunks 4.. into blob "v2": chunks 4, 5 of "v1" only v1 uses."""
    v1 = make_entry(6 * CHUNK, CHUNK, "1" * 64, "v1", [[0, 6, [A, B]]], BATCH)
    m.commit_uploads([("f", v1, None)])
    runs = splice_runs(m.namespace.files["f"], [[4, 3, [A, C]]], 4, 7)
    m.commit_uploads([("f", make_entry(7 * CHUNK, CHUNK, "2" * 64, "v2", runs, BATCH),
                       {"version": "v1", "first": 4, "end": 7})])


def test_a_corrupt_chunk_only_an_older_version_uses_is_taken_off_its_list(master):
    """A node's report of a bad chunk of an older version must reach that version's placement."""
    two_versions(master)
    master.repairer.report_corrupt(B, [["v1", 5, 1]])
    v1 = master.namespace.history("f")[0]
    assert v1["runs"] == [[0, 5, [A, B]], [5, 1, [A]]], "node B still listed for the chunk it dropped"
    # A bad run across chunks both versions use (3) and chunks v1 alone uses (4).
    master.repairer.report_corrupt(B, [["v1", 3, 2]])
    v1, v2 = master.namespace.history("f")
    assert v1["runs"] == [[0, 3, [A, B]], [3, 3, [A]]], "node B still listed for chunks it dropped"
    assert v2["runs"][:2] == [[0, 3, [A, B], "v1"], [3, 1, [A], "v1"]]


def test_reconciliation_keeps_chunks_an_older_version_places_on_the_node(master, monkeypatch):
    """A node's extent is not dropped as surplus while an older version still places part of it there."""
    two_versions(master)
    # Chunks 0..3 (shared by v1 and v2) were moved off B; chunks 4, 5 (v1 only) still are on A, B.
    master.log.commit([replicas_record("f", "v1", 0, 4, [A, B], [A, C])])
    assert master.namespace.history("f")[0]["runs"] == [[0, 4, [A, C]], [4, 2, [A, B]]]
    monkeypatch.setattr(master, "live_nodes", lambda: [SimpleNamespace(node_id=n) for n in (A, B, C)])
    dropped = []
    monkeypatch.setattr(master.repairer, "_drop", lambda node_id, blob, first, count:
                        dropped.append((node_id, blob, first, count)))
    master.repairer.reconcile(B, master.namespace.all_entries(), {"v1": [(0, 6)]})
    lost = [d for d in dropped if d[1] == "v1" and d[2] < 6 and d[2] + d[3] > 4]
    assert not lost, f"reconciliation dropped chunks v1 places on node B: {dropped}"


def test_a_bad_copy_found_by_a_reader_of_a_stale_entry_is_taken_off_the_current_placement(master):
    """A download's entry is the one pinned when it started; repair may have moved other copies since.

    The node dropped the bad chunk, so it must leave the placement current
    when the read reports it, not only the one the reader started from.
    """
    v1 = make_entry(4 * CHUNK, CHUNK, "1" * 64, "v1", [[0, 4, [A, B]]], BATCH)
    master.commit_uploads([("f", v1, None)])
    pinned = master.open_for_read("f")
    try:
        master.log.commit([replicas_record("f", "v1", 0, 4, [A, B], [B, C])])  # A died, repaired to C
        master.note_bad_replica(B, "f", pinned, "v1", [(2, 1)], protocol.ChecksumMismatch("bad"))
    finally:
        master.close_read(pinned)
    assert master.namespace.files["f"]["runs"] == [[0, 2, [B, C]], [2, 1, [C]], [3, 1, [B, C]]], \
        "node B still listed for the chunk it dropped"
