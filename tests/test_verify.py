"""verify (issue 13 item 6): reading stored files back and comparing a local tree with a stored one.

Unit tests drive the pure parts (verify.py: subsets, tree comparison).  One
module cluster of two nodes (so every chunk is on both) checks the CLI: a
clean tree exits 0, a chunk corrupt on both replicas exits EXIT_DAMAGED
naming the file, and ``--against`` lists a changed and a missing file.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import flip_byte, payload_locations, random_bytes, running_cluster, write_local

import client as client_module
import verify

KIB = 1024


# --- unit: subsets and comparisons -----------------------------------------------------------------
def test_groups_n_of_t_cover_every_name_exactly_once():
    names = [f"tree/file{i}" for i in range(500)]
    groups = [[name for name in names if verify.parse_subset(f"{n}/7", 0).selects(name)] for n in range(1, 8)]
    assert sorted(sum(groups, [])) == sorted(names)
    assert all(groups), [len(g) for g in groups]  # 500 names leave no group of 7 empty


def test_percent_subset_is_repeatable_by_seed_and_near_its_share():
    names = [f"f{i}" for i in range(2000)]
    first = [n for n in names if verify.parse_subset("10%", 42).selects(n)]
    assert first == [n for n in names if verify.parse_subset(" 10 % ", 42).selects(n)]
    assert first != [n for n in names if verify.parse_subset("10%", 43).selects(n)]
    assert 120 <= len(first) <= 280, len(first)  # 200 expected; 5 standard deviations either way
    assert all(verify.parse_subset("100%", 7).selects(n) for n in names)


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "0%", "101%", "half", "1/2/3", ""])
def test_bad_subsets_are_refused(text):
    with pytest.raises(ValueError):
        verify.parse_subset(text, 0)


def test_compare_tree_reports_each_kind_of_difference_and_hashes_only_equal_sizes():
    local = {"same": ("file", 3), "changed": ("file", 3), "grown": ("file", 9), "new": ("file", 1),
             "link": ("symlink", 4)}
    stored = {"same": ("file", 3, "h-same"), "changed": ("file", 3, "h-old"), "grown": ("file", 3, "h"),
              "gone": ("file", 5, "h"), "link": ("file", 4, "h")}
    hashed = []

    def local_sha256(name):
        hashed.append(name)
        return "h-same" if name == "same" else "h-new"

    assert verify.compare_tree(local, stored, local_sha256) == [
        (verify.DIFFERENT, "changed", "same size, different SHA-256"),
        (verify.MISSING_LOCALLY, "gone", ""),
        (verify.DIFFERENT, "grown", "9 bytes here, 3 stored"),
        (verify.DIFFERENT, "link", "a symlink here, a file stored"),
        (verify.MISSING_REMOTELY, "new", ""),
    ]
    assert sorted(hashed) == ["changed", "same"]


# --- integration: one cluster of two nodes ---------------------------------------------------------
@pytest.fixture(scope="module")
def verify_cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("verify"), nodes=2) as c:
        yield c


def make_tree(root, files: dict) -> None:
    for relative, data in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def upload_tree(cluster, root, prefix: str) -> None:
    c = cluster.client()
    try:
        summary = c.upload_tree(str(root), prefix)
    finally:
        c.close()
    assert not summary.failures, summary.failures


def test_verify_of_a_clean_tree_exits_0_and_reads_every_file(verify_cluster, tmp_path):
    files = {f"d/f{i}": random_bytes(600 + i, 3 * KIB * i + 5) for i in range(6)}
    make_tree(tmp_path / "clean", files)
    upload_tree(verify_cluster, tmp_path / "clean", "clean")
    result = verify_cluster.cli("verify", "clean/", "--json")
    assert result.returncode == client_module.EXIT_OK, result
    report = json.loads(result.stdout)
    assert report["verified"] == len(files) and report["damaged"] == [], report
    assert report["bytes"] == sum(len(d) for d in files.values())
    groups = [json.loads(verify_cluster.cli("verify", "clean/", "--read-data-subset", f"{n}/2", "--json").stdout)
              for n in (1, 2)]
    assert sum(g["verified"] for g in groups) == len(files) and all(g["listed"] == len(files) for g in groups)


def test_verify_names_a_file_whose_chunk_is_corrupt_on_both_replicas(verify_cluster, tmp_path):
    data = random_bytes(601, 40 * KIB + 17)
    c = verify_cluster.client()
    try:
        c.upload_file(write_local(tmp_path, "intact", random_bytes(602, 9 * KIB)), "rot/intact")
        reply = c.upload_file(write_local(tmp_path, "doomed", data), "rot/doomed")
    finally:
        c.close()
    for index in range(2):  # two nodes: both hold every chunk
        path, first, payload_offset, payload_len = payload_locations(verify_cluster, index, reply.version)[-1]
        flip_byte(path, payload_offset + 5 * KIB + 3)
    result = verify_cluster.cli("verify", "rot/")
    assert result.returncode == client_module.EXIT_DAMAGED, result
    assert b"DAMAGED rot/doomed: DATA_LOST" in result.stdout, result.stdout
    assert b"rot/intact" not in result.stdout and "rot/doomed" in result.stderr
    assert verify_cluster.cli("verify", "rot/intact").returncode == client_module.EXIT_OK


def test_verify_against_lists_a_changed_and_a_missing_file(verify_cluster, tmp_path):
    files = {"a": b"alpha" * 300, "sub/b": b"bravo" * 200, "sub/c": b"charlie"}
    root = tmp_path / "mine"
    make_tree(root, files)
    upload_tree(verify_cluster, root, "mine")
    assert verify_cluster.cli("verify", "--against", str(root), "mine").returncode == client_module.EXIT_OK
    (root / "sub" / "b").write_bytes(b"BRAVO" * 200)  # same size, other bytes
    (root / "sub" / "c").unlink()
    (root / "new").write_bytes(b"n")
    result = verify_cluster.cli("verify", "--against", str(root), "mine/", "--json")
    assert result.returncode == client_module.EXIT_DAMAGED, result
    found = {(d["difference"], d["name"]) for d in json.loads(result.stdout)}
    assert found == {("different", "mine/sub/b"), ("missing locally", "mine/sub/c"),
                     ("missing remotely", "mine/new")}, found


# --- space by class (issue 13 item 8) ---------------------------------------------------------------
def test_space_counts_shared_chunks_once_and_partial_last_chunks_by_length():
    """Current, older-versions-only and trash-only bytes; an append's untouched chunks count as current."""
    from namespace import Namespace, make_entry, put_record

    ns = Namespace()
    put = lambda name, entry, i, **extra: ns.apply({**put_record(name, entry, extra.get("base")), "i": i, "t": i,
                                                    "keep": 5})
    put("a", make_entry(2500, KIB, "h1", "blob1", [[0, 3, ["n1", "n2"]]], 4), 1)  # chunks 1024+1024+452
    # An append rewrote chunk 2 (now full) and added chunk 3 (100 bytes) in blob2; chunks 0-1 stay in blob1.
    put("a", make_entry(3172, KIB, "h2", "blob2", [[0, 2, ["n1", "n2"], "blob1"], [2, 2, ["n1", "n2"]]], 4), 2)
    assert ns.space() == {"live_bytes": 2048 + 1024 + 100, "version_bytes": 452, "trash_bytes": 0,
                          "snapshot_bytes": 0}
    put("b", make_entry(10, KIB, "h3", "blob3", [[0, 1, ["n1", "n2"]]], 4), 3)
    ns.apply({"op": "delete", "name": "b", "trash": True, "t": 4, "i": 4})
    assert ns.space() == {"live_bytes": 3172, "version_bytes": 452, "trash_bytes": 10, "snapshot_bytes": 0}
    ns.apply({"op": "delete", "name": "a", "trash": True, "t": 5, "i": 5})
    assert ns.space() == {"live_bytes": 0, "version_bytes": 0, "trash_bytes": 3172 + 452 + 10, "snapshot_bytes": 0}


def test_status_shows_the_space_of_current_files_versions_and_trash(verify_cluster, tmp_path):
    before = verify_cluster.status().totals
    c = verify_cluster.client()
    try:
        c.upload_file(write_local(tmp_path, "v1", b"x" * 5000), "space/f")
        c.upload_file(write_local(tmp_path, "v2", b"y" * 3000), "space/f")
        c.upload_file(write_local(tmp_path, "t", b"z" * 700), "space/t")
        c.delete("space/t")
    finally:
        c.close()
    after = verify_cluster.status().totals
    assert after["live_bytes"] - before["live_bytes"] == 3000, (before, after)
    assert after["version_bytes"] - before["version_bytes"] == 5000, (before, after)
    assert after["trash_bytes"] - before["trash_bytes"] == 700, (before, after)
    result = verify_cluster.cli("status")
    assert result.returncode == 0 and b"older versions only" in result.stdout, result
