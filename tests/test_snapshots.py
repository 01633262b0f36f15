"""Tree snapshots and incremental runs (issue 13 items 3, 4, 6 --snapshot, 8).

Unit tests drive the pure parts (snapshots.py: the pin rule, manifests,
diff, excludes, the unchanged test) and a Namespace fed records (pins across
keep_versions trimming, trash expiry, purge, forget, a checkpoint).  One
module cluster of real processes checks the whole path: incremental runs
that send only what changed, a snapshot restore after files were replaced
and deleted, diff, verify --snapshot, pins across a master restart.
"""

from __future__ import annotations

import json
import os
import zlib

import pytest

from conftest import FAST_MASTER, FAST_TIMING, call, running_cluster

import client as client_module
import protocol
import snapshots
from namespace import Namespace, make_entry, put_record

CHUNK = 1024
A, B = "node-a", "node-b"


# --- unit: pure rules -------------------------------------------------------------------------
def stored(version: str, size: int = CHUNK) -> dict:
    return make_entry(size, CHUNK, version[-1] * 64, version, [[0, max(1, size // CHUNK), [A, B]]], 4)


def put(name: str, version: str, i: int, keep: int = 2) -> dict:
    return {**put_record(name, stored(version)), "i": i, "t": float(i), "keep": keep}


def snapshot_record(root: str, i: int, since: int, pins=()) -> dict:
    manifest = make_entry(100, snapshots.CHUNK_BYTES, "m" * 64, f"snap-{i}", [[0, 1, [A, B]]], 16)
    return {"op": "snapshot", "root": root, "t": float(i), "files": 1, "bytes": CHUNK, "since": since,
            "manifest": manifest, "pins": [list(p) for p in pins], "i": i}


def kept_ids(namespace: Namespace, name: str) -> list[int]:
    return sorted(e["commit_index"] for e in namespace.entries_of(name))


@pytest.mark.parametrize("commit, superseded, since, i, expected", [
    (5, None, 8, 10, True),    # current at the snapshot
    (5, 9, 8, 10, True),       # replaced inside [since, i]: may have been the member
    (5, 8, 8, 10, False),      # replaced before since: not current when members were resolved
    (11, None, 8, 10, False),  # committed after the snapshot
])
def test_pin_rule(commit, superseded, since, i, expected):
    """Pinned = committed by the snapshot's index and not superseded before its since index."""
    entry = {"commit_index": commit, **({"superseded": superseded} if superseded else {})}
    snap = {"root": "t", "i": i, "since": since}
    assert snapshots.pins(snap, "t/f", entry) is expected
    assert snapshots.pins(snap, "tx/f", entry) is False, "a name outside the root"


def test_explicit_pin_keeps_a_version_not_current_at_the_snapshot():
    snap = {"root": "t", "i": 10, "since": 9}
    old = {"commit_index": 3, "superseded": 4}
    assert not snapshots.pins(snap, "t/f", old)
    assert snapshots.pins(snap, "t/f", old, frozenset({("t/f", 3)}))


def test_manifest_round_trip_and_member_documents():
    entry = {**stored("v1", 10), "commit_index": 7, "meta": {"type": "file", "mode": 0o640, "mtime_ns": 5}}
    data = snapshots.encode_manifest("root", [snapshots.member_line("a/b", entry)])
    header, lines, sizes = snapshots.decode_manifest([data[:5], data[5:]])
    assert header["root"] == "root" and header["files"] == 1
    assert snapshots.member_document("root", lines[0]) == {
        "name": "root/a/b", "version": 7, "size": 10, "sha256": entry["sha256"], "meta": entry["meta"]}


def test_a_manifest_written_by_the_earlier_layout_still_decodes():
    """Manifests stored before the whole-text encoding: a newline after every line, the header spaced."""
    entry = {**stored("v1", 10), "commit_index": 7}
    line = json.dumps(snapshots.member_line("a/b", entry), ensure_ascii=False, separators=(",", ":"))
    text = json.dumps({"format": snapshots.FORMAT, "root": "root", "files": 1}) + "\n" + line + "\n"
    header, lines, sizes = snapshots.decode_manifest([zlib.compress(text.encode())])
    assert header["root"] == "root" and lines == [snapshots.member_line("a/b", entry)]
    assert sizes == [len(line.encode())]


@pytest.mark.parametrize("relative, meta", [("a", None), ('é"\\ü/ÿ€😀', {"type": "symlink", "mode": 511,
                                                                           "mtime_ns": 2 ** 62, "uid": 0, "gid": 0})])
def test_member_pages_are_cut_by_a_bound_of_each_documents_bytes(relative, meta):
    """SNAPSHOT_MEMBERS pages by the manifest line's length: never less than the document's JSON bytes."""
    entry = {**stored("v1"), "commit_index": 123456789, **({"meta": meta} if meta else {})}
    data = snapshots.encode_manifest("rööt", [snapshots.member_line(relative, entry)])
    _, lines, sizes = snapshots.decode_manifest([data])
    document = snapshots.member_document("rööt", lines[0])
    assert snapshots.document_bytes_bound("rööt", sizes[0]) >= protocol.json_size(document)
    with pytest.raises(ValueError):
        snapshots.decode_manifest([b"garbage"])


def test_diff_lists_added_removed_and_changed_content_only():
    def m(name, sha, size=1, kind="file", mtime=1):
        return {"name": name, "sha256": sha, "size": size, "meta": {"type": kind, "mtime_ns": mtime}}
    old = [m("same", "x"), m("touched", "y", mtime=1), m("edited", "z"), m("gone", "g"), m("kind", "k")]
    new = [m("same", "x"), m("touched", "y", mtime=2), m("edited", "Z"), m("born", "b"), m("kind", "k", kind="dir")]
    assert snapshots.diff(old, new) == [("added", "born"), ("changed", "edited"), ("removed", "gone"),
                                        ("changed", "kind")]


@pytest.mark.parametrize("relative, patterns, expected", [
    ("a/b.tmp", ["*.tmp"], True), ("a/cache/x", ["cache"], True), ("cache", ["cache"], True),
    ("a/b.txt", ["*.tmp"], False), ("a/b/c", ["a/b"], True), ("x/a/b", ["a/b"], False),
    ("a/b", ["a/*"], True), ("ab/c", ["a"], False)])
def test_exclude_patterns(relative, patterns, expected):
    assert snapshots.excluded(relative, patterns) is expected


def test_exclude_file_skips_comments_and_blank_lines():
    assert snapshots.read_exclude_file("# c\n\n*.tmp\n  cache  \n") == ["*.tmp", "cache"]


def test_unchanged_needs_kind_size_mode_and_mtime():
    member = {"size": 4, "meta": {"type": "file", "mode": 0o644, "mtime_ns": 99}}
    assert snapshots.unchanged(member, "file", 4, 0o644, 99)
    assert not snapshots.unchanged(member, "file", 5, 0o644, 99)
    assert not snapshots.unchanged(member, "file", 4, 0o600, 99)
    assert not snapshots.unchanged(member, "file", 4, 0o644, 98)
    assert not snapshots.unchanged(None, "file", 4, 0o644, 99)
    assert not snapshots.unchanged({"size": 4, "meta": None}, "file", 4, 0o644, 99)


# --- unit: the namespace keeps what snapshots pin ----------------------------------------------
def test_pins_survive_trimming_and_forget_releases_them():
    """keep_versions=2: v1 would go at the third put, but snapshot 3 pins it; forgetting it frees v1."""
    ns = Namespace()
    ns.apply(put("t/f", "v1", 1))
    ns.apply(put("t/g", "w1", 2))
    ns.apply(snapshot_record("t", 3, since=2))
    ns.apply(put("t/f", "v2", 4))
    ns.apply(put("t/f", "v3", 5))  # trims v1 (keep 2): pinned
    assert kept_ids(ns, "t/f") == [1, 4, 5]
    assert [e["commit_index"] for e in ns.pinned["t/f"]] == [1]
    assert ns.space()["snapshot_bytes"] == CHUNK + 100  # v1's chunk and the manifest
    ns.apply(put("t/f", "v4", 6))  # trims v2, which no snapshot pins
    assert kept_ids(ns, "t/f") == [1, 5, 6]
    ns.apply({"op": "forget", "ids": [3], "i": 7})
    assert kept_ids(ns, "t/f") == [5, 6] and not ns.pinned and not ns.snapshots


def test_pins_survive_trash_expiry_purge_and_a_checkpoint():
    ns = Namespace()
    ns.apply(put("t/f", "v1", 1))
    ns.apply(put("t/g", "w1", 2))
    ns.apply(snapshot_record("t", 3, since=2))
    ns.apply({"op": "delete", "name": "t/f", "trash": True, "t": 4.0, "i": 4})
    ns.apply({"op": "expire", "name": "t/f", "before": 5.0, "i": 5})
    ns.apply({"op": "purge", "name": "t/g", "i": 6})
    assert kept_ids(ns, "t/f") == [1] and kept_ids(ns, "t/g") == [2]
    restored = Namespace()
    restored.restore(json.loads(json.dumps(ns.snapshot())))
    assert kept_ids(restored, "t/f") == [1] and restored.snapshots.keys() == {3}
    assert restored.find_entry(snapshots.manifest_name(3), 3)["version"] == "snap-3"
    restored.apply({"op": "forget", "ids": [3], "i": 7})
    assert kept_ids(restored, "t/f") == [] and kept_ids(restored, "t/g") == []


def test_explicit_pins_and_undelete():
    """A member not current at the snapshot is kept by its explicit pin; an undeleted version is current again."""
    ns = Namespace()
    ns.apply(put("t/f", "v1", 1, keep=1))
    ns.apply(put("t/f", "v2", 2, keep=1))  # v1 dropped at once (keep 1): not pinned yet, gone
    ns.apply(put("t/f", "v3", 3, keep=3))
    ns.apply(snapshot_record("t", 4, since=4, pins=[("t/f", 2)]))
    ns.apply(put("t/f", "v4", 5, keep=1))  # drops 2 (explicit) and 3 (current at the snapshot)
    assert kept_ids(ns, "t/f") == [2, 3, 5]
    ns.apply({"op": "delete", "name": "t/f", "trash": True, "t": 6.0, "i": 6})
    ns.apply({"op": "undelete", "name": "t/f", "i": 7})
    assert "superseded" not in ns.files["t/f"]


# --- process tests: one cluster ---------------------------------------------------------------
@pytest.fixture(scope="module")
def snap_cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("snapshots")
    with running_cluster(directory / "cluster", nodes=2, master_args=[*FAST_MASTER, "--keep-versions", "1"],
                         node_args=[*FAST_TIMING, "--scrub-rate", "0"]) as cluster:
        yield cluster


def make_tree(root, files: dict) -> None:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root) -> dict:
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (open(path, "rb").read(), st.st_mode & 0o7777, st.st_mtime_ns)
    return found


def test_incremental_runs_restore_diff_verify_and_pins_across_a_restart(snap_cluster, tmp_path):
    """Second run sends only the changed file; snapshot 1 restores byte-identical (with mode and mtime)
    after files were replaced and deleted, even with keep_versions=1 and after a master restart."""
    cluster = snap_cluster
    tree = tmp_path / "tree"
    make_tree(tree, {"a": b"alpha" * 100, "sub/b": b"beta" * 300, "sub/c": b"gamma", "skip.tmp": b"x"})
    os.chmod(tree / "sub" / "c", 0o600)
    os.utime(tree / "a", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    before = read_tree(tree)
    del before["skip.tmp"]
    (tmp_path / "excludes").write_text("# scratch files\n*.tmp\n")
    first = cluster.cli("upload", str(tree), "inc", "--exclude-file", str(tmp_path / "excludes"))
    assert first.returncode == 0, first.stderr
    snaps = call(cluster, lambda c: c.snapshots("inc"))
    assert [(s["files"], s["bytes"]) for s in snaps] == [(3, 500 + 1200 + 5)]
    one = snaps[0]["id"]

    # An edit that keeps size and mtime is seen only with --check-content (dry runs: nothing sent).
    stamp = os.lstat(tree / "a").st_mtime_ns
    (tree / "a").write_bytes(b"ALPHA" * 100)
    os.utime(tree / "a", ns=(stamp, stamp))
    assert call(cluster, lambda c: c.backup_tree(str(tree), "inc", ["*.tmp"], dry_run=True)).changed == 0
    sneaky = call(cluster, lambda c: c.backup_tree(str(tree), "inc", ["*.tmp"], check_content=True, dry_run=True))
    assert (sneaky.changed, sneaky.unchanged) == (1, 2)
    (tree / "a").write_bytes(b"alpha" * 100)
    os.utime(tree / "a", ns=(stamp, stamp))

    # Change one file, delete another, leave one alone.
    (tree / "sub" / "b").write_bytes(b"BETA" * 301)
    os.unlink(tree / "sub" / "c")
    dry = call(cluster, lambda c: c.backup_tree(str(tree), "inc", ["*.tmp"], dry_run=True))
    assert "0 new, 1 changed, 1 unchanged, 1 skipped" in dry.line(dry_run=True) and dry.bytes_to_send == 1204
    assert len(call(cluster, lambda c: c.snapshots("inc"))) == 1, "a dry run recorded a snapshot"
    second = call(cluster, lambda c: c.backup_tree(str(tree), "inc", ["*.tmp"]))
    assert (second.new, second.changed, second.unchanged, second.skipped) == (0, 1, 1, 1)
    assert second.sent.bytes == 1204 and second.sent.files == 1, "only the changed file is sent"
    two = second.snapshot.id
    # The namespace keeps sub/c (its local file is gone, nothing is deleted); the snapshot does not.
    assert "inc/sub/c" in {e["name"] for e in call(cluster, lambda c: c.list("inc/"))}
    call(cluster, lambda c: c.delete("inc/sub/c"))
    call(cluster, lambda c: c.delete("inc/sub/c", purge=True))

    diff = cluster.cli("diff", str(one), str(two))
    assert diff.stdout.decode().splitlines()[:2] == ["M inc/sub/b", "- inc/sub/c"], diff.stdout
    as_json = json.loads(cluster.cli("diff", str(one), "latest", "--json").stdout)
    assert (as_json["from"], as_json["to"], as_json["changed"], as_json["removed"]) == (one, two, 1, 1)
    listed = json.loads(cluster.cli("snapshots", "inc", "--json").stdout)["snapshots"]
    assert [(s["id"], s["files"]) for s in listed] == [(one, 3), (two, 2)] and listed[0]["time_iso"].endswith("Z")

    cluster.restart_master()
    cluster.wait_nodes_alive(2)
    restored = tmp_path / "restored"
    result = cluster.cli("download", "inc/", str(restored), "--snapshot", str(one))
    assert result.returncode == 0, result.stderr
    assert read_tree(restored) == before
    verify = cluster.cli("verify", "--snapshot", str(one))
    assert verify.returncode == 0, verify.stderr
    latest = cluster.cli("verify", "inc/sub/", "--snapshot", "latest")
    assert latest.returncode == 0, latest.stderr

    # Forget snapshot 1: the versions only it kept (old sub/b, purged sub/c) are released.
    status_before = call(cluster, lambda c: c.status()).totals["snapshot_bytes"]
    freed = call(cluster, lambda c: c.forget_snapshots([one]))
    status_after = call(cluster, lambda c: c.status()).totals["snapshot_bytes"]
    # Old sub/b and purged sub/c (1,205 bytes) plus snapshot 1's manifest (a few hundred bytes).
    assert freed.freed_bytes == status_before - status_after and 1205 < freed.freed_bytes < 1205 + 1024
    gone = cluster.cli("download", "inc/", str(tmp_path / "again"), "--snapshot", str(one))
    assert gone.returncode == client_module.EXIT_NOT_FOUND, gone.stderr


def test_a_damaged_last_snapshot_makes_a_full_run_not_a_failure(tmp_path):
    """If the last snapshot's manifest cannot be read, the next backup sends every file (and says why)."""
    make_tree(tmp_path / "t", {"a": b"1", "b/c": b"22"})
    c = client_module.Client(("127.0.0.1", 9), timeout_s=1.0, frame_bytes=1024, show_progress=False)
    c.snapshots = lambda root=None: [{"id": 5}]

    def damaged(snapshot_id):
        raise protocol.DataLost("every copy of chunk 0 is gone")

    c.snapshot_members = damaged
    notes = []
    result = c.backup_tree(str(tmp_path / "t"), "t", dry_run=True, report=notes.append)
    assert (result.new, result.unchanged, result.bytes_to_send) == (2, 0, 3)
    assert notes and "cannot read snapshot 5" in notes[0]
