"""Backups that keep history: versions (issue 13).

Unit tests drive the pure rules (history.py), the namespace's versions and a
Master without nodes (what a dropped version gives back to the garbage
collector, what reconciliation and repair treat as known).  One module
cluster of real processes checks versions through the CLI and the client,
across replace, append, write and touch, with a master restart in between.
"""

from __future__ import annotations

import datetime
import time
import json

import pytest

from conftest import (FAST_MASTER, FAST_TIMING, call, node_chunks, random_bytes, running_cluster, sha256, wait_until,
                      write_local)

import config as config_module
import history
import protocol
import views
from master import Master
from metadata_log import MetadataLog
from namespace import Namespace, make_entry, put_record, splice_runs
from repair import replicas_record

CHUNK = 1024
BATCH = 4
A, B, C, D = "node-a", "node-b", "node-c", "node-d"
KEEP = 3  # --keep-versions of the test cluster and of the unit masters


# --- unit: rules ------------------------------------------------------------------------------
def entry_at(commit_index: int, committed_at: float) -> dict:
    return {"commit_index": commit_index, "committed_at": committed_at, "mtime": committed_at}


def test_trim_versions_drops_the_oldest_beyond_keep():
    """keep counts the current version: keep=3 leaves two older ones, the newest two."""
    older = [entry_at(i, i) for i in (1, 2, 3, 4)]
    kept, dropped = history.trim_versions(older, 3)
    assert [e["commit_index"] for e in kept] == [3, 4] and [e["commit_index"] for e in dropped] == [1, 2]
    assert history.trim_versions(older, 1) == ([], older)


@pytest.mark.parametrize("version, at, expected", [
    (None, None, 30), (20, None, 20), (99, None, None),
    (None, 25.0, 20), (None, 20.0, 20), (None, 9.9, None), (None, 1e12, 30)])
def test_pick_version_by_id_or_by_time(version, at, expected):
    """--version picks by id, --at the newest committed at or before the time, neither the current one."""
    entries = [entry_at(10, 10.0), entry_at(20, 20.0), entry_at(30, 30.0)]
    chosen = history.pick_version(entries, version, at)
    assert (chosen and chosen["commit_index"]) == expected


@pytest.mark.parametrize("text, expected", [
    ("2h", 100_000 - 7200), ("90s", 100_000 - 90), ("1.5d", 100_000 - 1.5 * 86400), ("1w", 100_000 - 604800),
    ("2024-05-01T13:00:00+00:00", 1714568400.0), ("2024-05-01 13:00:00+02:00", 1714561200.0)])
def test_parse_time_relative_and_iso(text, expected):
    """--at accepts a duration ago or an ISO 8601 time (with or without a zone)."""
    assert history.parse_time(text, 100_000) == expected


def test_parse_time_naive_iso_is_local_and_garbage_is_refused():
    """A time without a zone is local time; anything else is a ValueError saying what is accepted."""
    assert history.parse_time("2024-05-01", 0) == datetime.datetime(2024, 5, 1).timestamp()
    with pytest.raises(ValueError, match="ISO 8601"):
        history.parse_time("yesterday", 0)


# --- unit: namespace --------------------------------------------------------------------------
def stored(version: str, chunks: int = 4, nodes=(A, B)) -> dict:
    return make_entry(chunks * CHUNK, CHUNK, version[-1] * 64, version, [[0, chunks, list(nodes)]], BATCH)


def put(name: str, entry: dict, i: int, keep: int = KEEP, base=None) -> dict:
    record = put_record(name, entry, base)
    record.update(i=i, t=float(i), keep=keep)
    return record


def test_namespace_keeps_versions_replays_and_checkpoints_them(tmp_path):
    """Each put keeps the replaced entry, keep bounds them, and replay and checkpoint give the same state."""
    namespace = Namespace()
    log = MetadataLog(str(tmp_path / "meta"), namespace, checkpoint_every=1000)
    log.open()
    for n in range(1, 5):
        record = put("f", stored(f"v{n}"), 0)
        del record["i"]
        log.commit([record])
    assert [history.version_id(e) for e in namespace.history("f")] == [2, 3, 4]
    assert [e["version"] for e in namespace.history("f")] == ["v2", "v3", "v4"]
    log.close()
    replayed = Namespace()
    MetadataLog(str(tmp_path / "meta"), replayed).open()
    assert replayed.history("f") == namespace.history("f")
    restored = Namespace()
    restored.restore(json.loads(json.dumps(namespace.snapshot())))
    assert restored.history("f") == namespace.history("f")


def test_put_without_keep_keeps_no_history():
    """A record from before versions existed (no "keep") replaces as it always did."""
    namespace = Namespace()
    namespace.apply({"op": "put", "name": "f", "file": stored("v1"), "i": 1})
    namespace.apply({"op": "put", "name": "f", "file": stored("v2"), "i": 2})
    assert [e["version"] for e in namespace.history("f")] == ["v2"]


def test_replicas_record_moves_every_version_placed_so():
    """Repair of chunks shared by versions changes all of them, so none stays short of copies."""
    namespace = Namespace()
    namespace.apply(put("f", stored("v1"), 1))
    namespace.apply(put("f", {**namespace.files["f"], "mtime": 5.0}, 2,
                        base={"version": "v1", "first": 0, "end": 0}))  # a touch
    namespace.apply(replicas_record("f", "v1", 0, 4, [A, B], [A, C]) | {"i": 3})
    assert [e["runs"] for e in namespace.history("f")] == [[[0, 4, [A, C]]], [[0, 4, [A, C]]]]


def test_lookup_version_errors_name_the_problem():
    """An unknown version or a time before the first commit is FILE_NOT_FOUND saying so."""
    namespace = Namespace()
    namespace.apply(put("f", stored("v1"), 7))
    with pytest.raises(protocol.FileNotFound, match="no version 3"):
        namespace.lookup_version("f", version=3)
    with pytest.raises(protocol.FileNotFound, match="did not exist at"):
        namespace.lookup_version("f", at=1.0)
    assert namespace.lookup_version("f", at=7.0)["version"] == "v1"


# --- unit: garbage collection, repair and reconciliation of versions ----------------------------
@pytest.fixture
def bare_master(tmp_path):
    config = config_module.load_config(None, keep_versions=KEEP, safe_mode_s=0)
    master = Master(config, str(tmp_path / "master"))
    yield master
    master.log.close()


def garbage(master: Master) -> dict[str, set]:
    return {node: set(items) for node, items in master._garbage.items() if items}


def test_dropping_a_version_frees_only_what_no_kept_version_uses(bare_master):
    """A replace frees nothing while the old version is kept; dropping v1 keeps chunks an append shared."""
    m = bare_master
    v1 = stored("v1", chunks=4, nodes=(A, B))
    m.commit_uploads([("f", v1, None)])
    runs = splice_runs(m.namespace.files["f"], [[4, 2, [C, D]]], 4, 6)  # an append in blob v2
    m.commit_uploads([("f", make_entry(6 * CHUNK, CHUNK, "2" * 64, "v2", runs, BATCH),
                       {"version": "v1", "first": 4, "end": 6})])
    m.commit_uploads([("f", stored("v3", nodes=(B, C)), None)])
    assert not garbage(m), "a kept version's chunks were collected"
    m.commit_uploads([("f", stored("v4", nodes=(A, D)), None)])  # drops v1: its chunks live on in v2
    assert not garbage(m), f"chunks v2 shares with v1 were collected: {garbage(m)}"
    m.commit_uploads([("f", stored("v5", nodes=(A, D)), None)])  # drops v2: blobs v1 and v2 go
    assert garbage(m) == {A: {("v1", None, None)}, B: {("v1", None, None)},
                          C: {("v2", None, None)}, D: {("v2", None, None)}}


def test_repair_and_reconciliation_know_older_versions(bare_master):
    """An older version's blob is not an orphan, and its lost copies are repair tasks."""
    m = bare_master
    m.commit_uploads([("f", stored("v1", nodes=(A, B)), None)])
    first = m.namespace.files["f"]["commit_index"]  # the log opens with the cluster id and epoch records
    m.commit_uploads([("f", stored("v2", nodes=(C, D)), None)])
    m.repairer.reconcile(A, m.namespace.all_entries(), {"v1": [(0, 4)]})
    assert not garbage(m), "an older version's blob was taken for an orphan"
    tasks = m.repairer.scan(alive={B, C, D})
    assert [(t.name, t.version, t.copies) for t in tasks] == [("f", first, 1)]


# --- process tests: one cluster -----------------------------------------------------------------
@pytest.fixture(scope="module")
def history_cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("history")
    with running_cluster(directory / "cluster", nodes=2, master_args=[*FAST_MASTER, "--keep-versions", str(KEEP)],
                         node_args=[*FAST_TIMING, "--scrub-rate", "0"]) as cluster:
        yield cluster


def fetch(cluster, tmp_path, name: str, **which) -> bytes:
    destination = tmp_path / "fetched"
    call(cluster, lambda c: c.download(name, str(destination), force=True, **which))
    data = destination.read_bytes()
    destination.unlink()
    return data


def test_versions_across_replace_append_write_touch_and_a_master_restart(history_cluster, tmp_path):
    """Every write keeps the version it replaced; --version and --at read them, before and after a restart."""
    cluster = history_cluster
    seed = 1301
    v1, v2, tail, patch = (random_bytes(seed + n, size) for n, size in enumerate((3000, 5000, 1500, 700)))
    upload = lambda data, **kw: call(cluster, lambda c: c.upload_file(write_local(tmp_path, "v", data), "doc", **kw))
    upload(v1)
    upload(v2)
    cluster.restart_master()
    cluster.wait_nodes_alive(2)
    upload(tail, mode="append")
    v3 = v2 + tail
    upload(patch, mode="write", offset=100)
    v4 = v3[:100] + patch + v3[800:]
    versions = call(cluster, lambda c: c.versions("doc"))
    assert [v["sha256"] for v in versions] == [sha256(v2), sha256(v3), sha256(v4)], f"seed {seed}"
    assert [v["current"] for v in versions] == [False, False, True]
    call(cluster, lambda c: c.touch("doc"))  # keeps v4's data as a version too; v2 is dropped
    versions = call(cluster, lambda c: c.versions("doc"))
    assert [v["sha256"] for v in versions] == [sha256(v3), sha256(v4), sha256(v4)], f"seed {seed}"
    cluster.restart_master()
    cluster.wait_nodes_alive(2)
    assert call(cluster, lambda c: c.versions("doc")) == versions
    assert fetch(cluster, tmp_path, "doc", version=versions[0]["id"]) == v3, f"seed {seed}"
    assert fetch(cluster, tmp_path, "doc", at=versions[1]["committed_at"]) == v4, f"seed {seed}"
    with pytest.raises(protocol.FileNotFound):
        fetch(cluster, tmp_path, "doc", at=versions[0]["committed_at"] - 3600)
    # The CLI: versions --json, cat --version, stat --at.
    listed = cluster.cli("versions", "doc", "--json")
    assert listed.returncode == 0, listed
    document = json.loads(listed.stdout)  # docs/JSON.md: the versions with their times in ISO 8601 too
    assert document["name"] == "doc" and [{k: v[k] for k in versions[0]} for v in document["versions"]] == versions
    assert document["versions"][0]["committed_at_iso"] == views.iso_time(versions[0]["committed_at"])
    cat = cluster.cli("cat", "doc", "--version", str(versions[0]["id"]))
    assert cat.returncode == 0 and cat.stdout == v3, cat
    when = datetime.datetime.fromtimestamp(versions[1]["committed_at"] + 0.0005).isoformat()
    shown = cluster.cli("stat", "doc", "--at", when, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["version_id"] == versions[1]["id"], shown
    assert cluster.cli("cat", "doc", "--version", "1").returncode == 3  # dropped: FILE_NOT_FOUND
    assert cluster.cli("cat", "doc", "--at", "not-a-time").returncode == 2


def test_dropping_old_versions_frees_their_chunks_on_the_nodes(history_cluster, tmp_path):
    """With keep_versions 3, four whole replaces leave three versions' chunks on the nodes, no more."""
    cluster = history_cluster
    seed = 1302
    baseline = node_chunks(cluster)
    for n in range(4):
        data = random_bytes(seed + n, 5 * CHUNK)
        call(cluster, lambda c: c.upload_file(write_local(tmp_path, f"r{n}", data), "rotating"))
    expected = baseline + KEEP * 5 * 2  # 3 versions x 5 chunks x replication 2
    wait_until(lambda: node_chunks(cluster) == expected, 10.0,
               message=f"{expected} chunks on the nodes (got {node_chunks(cluster)})")
    assert len(call(cluster, lambda c: c.versions("rotating"))) == KEEP


# --- trash ----------------------------------------------------------------------------------------
def test_namespace_trash_delete_undelete_expire_purge():
    """delete moves every version to the trash, undelete brings back the newest delete, expire and purge drop."""
    namespace = Namespace()
    namespace.apply(put("f", stored("v1"), 1))
    namespace.apply(put("f", stored("v2"), 2))
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 10.0, "i": 3})
    assert "f" not in namespace.files and [e["commit_index"] for e in namespace.trash["f"]] == [1, 2]
    namespace.apply(put("f", stored("v4"), 4))
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 20.0, "i": 5})
    assert [e["trashed_at"] for _, e in namespace.trash_listing("f")] == [10.0, 10.0, 20.0]
    namespace.apply(replicas_record("f", "v1", 0, 4, [A, B], [A, C]) | {"i": 6})  # repair reaches the trash
    assert namespace.find_entry("f", 1)["runs"] == [[0, 4, [A, C]]]
    namespace.apply({"op": "undelete", "name": "f", "i": 7})
    assert [history.version_id(e) for e in namespace.history("f")] == [4]
    assert "trashed_at" not in namespace.files["f"]
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 30.0, "i": 8})
    namespace.apply({"op": "undelete", "name": "f", "i": 9})
    namespace.apply({"op": "expire", "name": "f", "before": 10.0, "i": 10})
    assert "f" not in namespace.trash and history.version_id(namespace.files["f"]) == 4
    namespace.apply({"op": "purge", "name": "f", "i": 11})
    assert not namespace.entries_of("f")


def test_trash_frees_space_only_when_it_expires_or_is_purged(bare_master):
    """A delete frees nothing; expiry past trash_days and purge free every blob, undelete of a live name is refused."""
    m = bare_master
    for name, version in (("a", "va"), ("b", "vb")):
        m.commit_uploads([(name, stored(version, nodes=(A, B)), None)])
        m.delete(name, "test")
    assert not garbage(m) and {n for n, _ in m.namespace.trash_listing()} == {"a", "b"}
    m.undelete("a", "test")
    with pytest.raises(protocol.FileExists):
        m.undelete("a", "test")
    assert m.expire_trash(time.time()) == 0
    assert m.expire_trash(time.time() + m.trash_expiry_s() + 1) == 1
    assert garbage(m) == {A: {("vb", None, None)}, B: {("vb", None, None)}}
    m.delete("a", "test", purge=True)
    assert garbage(m) == {A: {("va", None, None), ("vb", None, None)}, B: {("va", None, None), ("vb", None, None)}}
    with pytest.raises(protocol.FileNotFound):
        m.delete("a", "test", purge=True)


def test_trash_undelete_and_recursive_delete_through_the_cli_across_a_restart(history_cluster, tmp_path):
    """delete PREFIX/ --recursive trashes a tree, trash lists it, undelete survives a master restart, purge needs --yes."""
    cluster = history_cluster
    seed = 1303
    files = {f"tree/{n}": random_bytes(seed + n, 2000 + n) for n in range(3)}
    for name, data in files.items():
        call(cluster, lambda c: c.upload_file(write_local(tmp_path, "t", data), name))
    assert cluster.cli("delete", "tree/").returncode == 2  # a prefix needs --recursive
    deleted = cluster.cli("delete", "tree/", "--recursive")
    assert deleted.returncode == 0, deleted
    assert not call(cluster, lambda c: c.list("tree/"))
    trashed = json.loads(cluster.cli("trash", "tree/", "--json").stdout)["entries"]  # docs/JSON.md
    assert all(e["expires_at_iso"] == views.iso_time(e["expires_at"]) for e in trashed)
    assert [e["name"] for e in trashed] == sorted(files)
    assert all(e["expires_at"] - e["trashed_at"] == pytest.approx(7 * 86400) for e in trashed)
    cluster.restart_master()
    cluster.wait_nodes_alive(2)
    assert cluster.cli("undelete", "tree/1").returncode == 0
    assert fetch(cluster, tmp_path, "tree/1") == files["tree/1"], f"seed {seed}"
    assert cluster.cli("undelete", "tree/1").returncode == 17  # FILE_EXISTS
    assert cluster.cli("delete", "--purge", "tree/", "--recursive").returncode == 2  # no --yes
    baseline = node_chunks(cluster)
    purged = cluster.cli("delete", "--purge", "--yes", "tree/", "--recursive")
    assert purged.returncode == 0, purged
    assert not json.loads(cluster.cli("trash", "tree/", "--json").stdout)["entries"]
    wait_until(lambda: node_chunks(cluster) == baseline - 3 * 2 * 2, 10.0, message="purged chunks freed")


def test_trash_expires_on_the_master(tmp_path):
    """With trash_days of a few seconds, the master empties the trash by itself and frees the chunks."""
    with running_cluster(tmp_path / "cluster", nodes=2, master_args=[*FAST_MASTER, "--trash-days", "0.00002"],
                         node_args=FAST_TIMING) as cluster:
        data = random_bytes(1304, 4 * CHUNK)
        call(cluster, lambda c: c.upload_file(write_local(tmp_path, "e", data), "expiring"))
        call(cluster, lambda c: c.delete("expiring"))
        assert [e["name"] for e in call(cluster, lambda c: c.trash())] == ["expiring"]
        wait_until(lambda: not call(cluster, lambda c: c.trash()) and node_chunks(cluster) == 0, 10.0,
                   message="trash expired and its chunks freed")
