"""Nothing is erased that the master does not know (issue 11).

Unit tests first (a node's fence, its catalog, the pure rebuild of a
namespace from a backup and descriptions), then real clusters: a master on
an empty data dir is refused and destroys nothing; orphans are quarantined
for a grace period, the brake holds a mass orphaning back; and a lost
metadata dir is rebuilt from the nodes, with every node up, then with one
node down and the master killed right after an acknowledged upload.
Random data is seeded; seeds are in the messages.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from conftest import (FAST_MASTER, FAST_TIMING, download_bytes, node_fence, random_bytes, sha256, upload_bytes,
                      wait_until)

import client as client_module
import protocol
import transport
from fencing import NodeIdentity
from node_catalog import NodeCatalog
from recovery import LOST_AND_FOUND, rebuild, runs_from_layout

KIB = 1024
MIB = 1024 * 1024


# --- the fence (unit) ------------------------------------------------------------------------
def test_fresh_node_joins_the_first_cluster_and_refuses_another(tmp_path):
    """A node without a cluster id joins the first master's cluster, then refuses a master of another."""
    identity = NodeIdentity(str(tmp_path))
    assert identity.cluster_id is None
    assert identity.check_master("c1", 1, holds_data=False) is True
    with pytest.raises(protocol.WrongCluster, match="c1"):
        identity.check_master("c2", 5, holds_data=True)
    with pytest.raises(protocol.WrongCluster):
        identity.check("c2", 9)
    reopened = NodeIdentity(str(tmp_path))
    assert (reopened.node_id, reopened.cluster_id) == (identity.node_id, "c1")


def test_lower_epoch_is_refused_and_the_highest_seen_survives_a_restart(tmp_path):
    """A request with an epoch below the highest seen is STALE_MASTER, and that floor is on disk."""
    identity = NodeIdentity(str(tmp_path))
    identity.check_master("c1", 3, holds_data=False)
    identity.check("c1", 4)
    with pytest.raises(protocol.StaleMaster, match="epoch 4"):
        identity.check("c1", 3)
    with pytest.raises(protocol.StaleMaster):
        NodeIdentity(str(tmp_path)).check("c1", 3)
    assert not NodeIdentity(str(tmp_path)).check_master("", 0, holds_data=True)  # a recovering master: reads only


def test_stale_write_changes_nothing_on_the_node(tmp_path):
    """PUT_CHUNKS, DROP_CHUNKS and DELETE_BLOBS with an old epoch leave the store as it was."""
    import config as config_module
    from storage_node import StorageNode
    node = StorageNode(config_module.load_config(), str(tmp_path / "node"))
    try:
        node.identity.check_master("c1", 7, holds_data=False)
        data = random_bytes(11, 3000)
        crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(data, 1024))
        node.put(protocol.PutChunks(blob="b1", first=0, count=3, chunk_size=1024, body=crcs + data,
                                    cluster_id="c1", epoch=7))
        with pytest.raises(protocol.StaleMaster):
            node.put(protocol.PutChunks(blob="b2", first=0, count=3, chunk_size=1024, body=crcs + data,
                                        cluster_id="c1", epoch=6))
        with pytest.raises(protocol.StaleMaster):
            node.quarantine(protocol.Quarantine(blobs=["b1"], cluster_id="c1", epoch=6))
        assert node.store.inventory() == {"b1": [(0, 3)]}
        assert not node.catalog.quarantined()
    finally:
        node.store.close()
        node.catalog.close()


# --- the catalog (unit) ------------------------------------------------------------------------
def describe(name, version, index=0, layout=None, size=100):
    return {"name": name, "version": version, "size": size, "chunk_size": 1024, "batch_chunks": 1024,
            "sha256": "", "mtime": 1.0, "layout": layout if layout is not None else [[0, 1, version]],
            "index": index}


def test_catalog_keeps_notes_and_tombstones_and_survives_a_torn_tail(tmp_path):
    """A note beats the description of its version; deleted blobs take their descriptions along; a tombstone
    lasts until the name is stored again."""
    catalog = NodeCatalog(str(tmp_path))
    catalog.describe([describe("a", "v1")])
    catalog.note([describe("a", "v1", index=5), describe("b", "w1", index=6)])
    catalog.note([describe("a", "v2", index=9), {"name": "b", "deleted": True, "index": 7},
                  {"name": "c", "deleted": True, "index": 8}])
    catalog.note([describe("c", "c2", index=10)])
    catalog.describe([describe("a", "v1")])  # a late description: the note stays
    catalog.quarantine(["x"], now=100.0)
    catalog.forget_blobs(["w1"], held=lambda blob: False)
    catalog.close()
    with open(tmp_path / "catalog.jsonl", "ab") as f:
        f.write(b'{"op":"n","items":[{"na')  # a crash mid-append
    reopened = NodeCatalog(str(tmp_path))
    found = {d.get("version", d["name"]): d["index"] for d in reopened.descriptions()}
    assert found == {"v1": 5, "v2": 9, "c2": 10, "b": 7}
    assert reopened.quarantined() == {"x"}
    assert reopened.expired(now=100.0 + 5, grace_s=10) == []
    assert reopened.expired(now=100.0 + 10, grace_s=10) == ["x"]
    reopened.close()


# --- rebuild (unit) ---------------------------------------------------------------------------
def entry(version, size=2048, index=1, nodes=("n1", "n2")):
    return {"size": size, "chunks": 2, "chunk_size": 1024, "sha256": "s", "mtime": 1.0, "version": version,
            "batch_chunks": 1024, "runs": [[0, 2, list(nodes)]], "commit_index": index}


def test_rebuild_merges_backup_and_newer_notes_and_honours_the_backup_deletes():
    """Notes after the backup add or replace files (older whole ones become versions); notes before it do not
    resurrect what it deleted; a tombstone after it deletes a file, or moves it to the trash."""
    backup = {"index": 10, "state": {"files": {"kept": entry("k1", index=4), "replaced": entry("r1", index=5),
                                               "doomed": entry("d1", index=6), "binned": entry("b1", index=3)}}}
    inventories = {"n1": {"k1": [(0, 2)], "r1": [(0, 2)], "r2": [(0, 2)], "r3": [(0, 2)], "new": [(0, 1)],
                          "gone": [(0, 2)], "b1": [(0, 2)]},
                   "n2": {"r2": [(0, 1)], "new": [(1, 1)]}}
    notes = [describe("replaced", "r2", index=12, layout=[[0, 2, "r2"]], size=2048),
             describe("replaced", "r3", index=13, layout=[[0, 2, "r3"]], size=2048),
             describe("new", "new", index=14, layout=[[0, 2, "new"]], size=1500),
             describe("deleted-before-backup", "gone", index=7, layout=[[0, 2, "gone"]], size=2048),
             {"name": "doomed", "deleted": True, "index": 11},
             {"name": "binned", "deleted": True, "index": 15, "trashed_at": 99.0}]
    result = rebuild(backup, notes + notes[:1], inventories, quarantined=set())
    assert sorted(result.files) == ["kept", "new", "replaced"]
    assert result.files["replaced"]["version"] == "r3"
    assert [e["version"] for e in result.versions["replaced"]] == ["r1", "r2"]
    assert result.versions["replaced"][1]["runs"] == [[0, 1, ["n1", "n2"]], [1, 1, ["n1"]]]
    assert result.files["new"]["runs"] == [[0, 1, ["n1"]], [1, 1, ["n2"]]]
    assert result.files["new"]["chunks"] == 2 and result.files["new"]["commit_index"] == 14
    assert [(e["version"], e["trashed_at"]) for e in result.trash["binned"]] == [("b1", 99.0)]
    assert (result.index, result.from_notes, result.deleted, result.backup_index) == (15, 2, 2, 10)


def test_rebuild_puts_complete_unconfirmed_uploads_in_lost_and_found():
    """A described upload without a commit note goes to lost+found/ if whole, never if partial or quarantined."""
    inventories = {"n1": {"u1": [(0, 2)], "u2": [(0, 1)], "q": [(0, 1)], "c": [(0, 1)]}}
    described = [describe("docs/a", "u1", layout=[[0, 2, "u1"]], size=2000),
                 describe("docs/b", "u2", layout=[[0, 2, "u2"]], size=2000),
                 describe("docs/c", "q", layout=[[0, 1, "q"]]),
                 describe("docs/d", "c"), describe("docs/d", "c", index=3)]
    result = rebuild(None, described, inventories, quarantined={"q"})
    assert sorted(result.files) == ["docs/d"]
    assert [name for name, _, _ in result.lost_found] == [LOST_AND_FOUND + "docs/a"]
    assert result.incomplete == 1


def test_runs_from_layout_names_foreign_blobs_and_missing_chunks():
    """A layout spanning two blobs gives runs naming the older blob, and chunks nobody holds get no node."""
    runs = runs_from_layout([[0, 2, "old"], [2, 2, "new"]], "new", {"a": {"old": [(0, 2)], "new": [(2, 1)]}})
    assert runs == [[0, 2, ["a"], "old"], [2, 1, ["a"]], [3, 1, []]]


# --- clusters ------------------------------------------------------------------------------------
ND_MASTER = [*FAST_MASTER, "--safe-mode", "1", "--meta-backup-interval", "3600"]
ND_NODE = [*FAST_TIMING, "--scrub-rate", "0"]


def node_stat(cluster, index: int) -> protocol.NodeStatReply:
    host, _, port = cluster.nodes[index].address.rpartition(":")
    with transport.Connection((host, int(port)), "master", 5.0) as conn:
        return conn.request(protocol.NodeStat(), protocol.NodeStatReply)


def node_request(cluster, index: int, msg, reply_cls):
    host, _, port = cluster.nodes[index].address.rpartition(":")
    with transport.Connection((host, int(port)), "master", 5.0) as conn:
        return conn.request(msg, reply_cls)


def master_dir(cluster) -> str:
    return os.path.join(cluster.data_dir, "master")


def test_master_on_an_empty_data_dir_is_refused_and_destroys_nothing(make_cluster, tmp_path):
    """The issue's reproduction: a master restarted on an empty dir gets no node, every byte stays, and the
    old metadata then restores every file; a foreign or stale request changes nothing."""
    seed = 1101
    cluster = make_cluster(master_args=ND_MASTER, node_args=ND_NODE)
    data = random_bytes(seed, 3 * MIB)
    upload_bytes(cluster, "big.bin", data, tmp_path)
    chunks_before = [node_stat(cluster, i).chunks for i in range(3)]
    assert sum(chunks_before) == 2 * 3 * 1024
    old_fence = node_fence(cluster, 0)

    cluster.master.kill()
    shutil.move(master_dir(cluster), str(tmp_path / "master-saved"))
    cluster.start_master()  # an empty data dir: a new cluster id
    wait_until(lambda: len(cluster.status().refused) == 3, 10.0, message="three refused nodes")
    status = cluster.status()
    assert all(r["reason"] == f"belongs to cluster {old_fence['cluster_id']}" for r in status.refused), status
    assert any("refused" in w for w in status.totals["warnings"])
    result = cluster.cli("status")
    assert b"REFUSED: belongs to cluster" in result.stdout, result
    refused_check = wait_until(lambda: next((c for c in cluster.client().health()["checks"]
                                             if c["code"] == "NODE_REFUSED" and c["count"] == 3), None),
                               5.0, message="NODE_REFUSED in health")
    assert "belongs to cluster" in refused_check["detail"][0], refused_check
    # Well past the safe mode and several heartbeats: nothing was dropped.
    wait_until(lambda: not cluster.status().totals["safe_mode"], 5.0, message="safe mode over")
    assert [node_stat(cluster, i).chunks for i in range(3)] == chunks_before
    with open(cluster.nodes[0].log_path, encoding="utf-8") as f:
        refusals = [line for line in f if "refusing master" in line]
    assert len(refusals) == 1 and old_fence["cluster_id"] in refusals[0], refusals

    cluster.master.kill()
    shutil.rmtree(master_dir(cluster))
    shutil.move(str(tmp_path / "master-saved"), master_dir(cluster))
    cluster.start_master()
    cluster.wait_nodes_alive(3)
    assert download_bytes(cluster, "big.bin", tmp_path) == data, f"seed {seed}"
    version = cluster.client().stat("big.bin").version
    with pytest.raises(protocol.StaleMaster):
        node_request(cluster, 0, protocol.DeleteBlobs(blobs=[version], **old_fence), protocol.BlobsDeleted)
    with pytest.raises(protocol.WrongCluster):
        node_request(cluster, 0, protocol.DeleteBlobs(blobs=[version], cluster_id="f" * 32, epoch=99),
                     protocol.BlobsDeleted)
    assert [node_stat(cluster, i).chunks for i in range(3)] == chunks_before


def test_orphans_are_quarantined_for_the_grace_and_the_brake_holds_a_mass_orphaning(make_cluster, tmp_path):
    """A small orphan is kept, shown, and erased after orphan_grace_s; a large one trips the brake until
    reclaim-orphans; a quarantined blob the namespace uses is released."""
    seed = 1102
    cluster = make_cluster(master_args=ND_MASTER,
                           node_args=[*ND_NODE, "--orphan-grace", "1", "--inventory-interval", "0.5"])
    upload_bytes(cluster, "base", random_bytes(seed, 400 * KIB), tmp_path)
    holder = next(i for i in range(3) if node_stat(cluster, i).chunks)
    nid = node_stat(cluster, holder).node_id

    def put_orphan(blob: str, nbytes: int) -> None:
        data = random_bytes(seed + nbytes, nbytes)
        crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(data, 1024))
        node_request(cluster, holder, protocol.PutChunks(blob=blob, first=0, count=len(crcs) // 4, chunk_size=1024,
                                                         body=crcs + data, **node_fence(cluster, holder)),
                     protocol.PutOk)

    def row() -> dict:
        return next(n for n in cluster.status().nodes if n["id"] == nid)

    def holds(blob: str) -> bool:
        return blob in inventory_blobs(cluster, holder)

    put_orphan("o" * 32, 10 * KIB)  # 10 of ~410 chunks: under the 10% brake
    wait_until(lambda: row()["quarantined_bytes"] == 10 * KIB, 10.0, message="the orphan quarantined")
    assert holds("o" * 32)
    wait_until(lambda: not holds("o" * 32), 10.0, message="the orphan erased after the grace")
    wait_until(lambda: row()["quarantined_bytes"] == 0, 5.0, message="no quarantine left")

    put_orphan("p" * 32, 200 * KIB)  # ~33% of the node: the brake
    wait_until(lambda: row()["brake"], 10.0, message="the brake")
    assert any(f"reclaim-orphans {nid} --yes" in w for w in cluster.status().totals["warnings"])
    wait_until(lambda: any(c["code"] == "ORPHANS_HELD" and f"node {nid}: brake tripped" in c["detail"]
                           for c in cluster.client().health()["checks"]), 5.0, message="ORPHANS_HELD in health")
    assert cluster.cli("reclaim-orphans", nid).returncode == client_module.EXIT_USAGE  # no --yes
    assert row()["quarantined_bytes"] == 0 and holds("p" * 32)
    result = cluster.cli("reclaim-orphans", nid, "--yes")
    assert result.returncode == 0, result
    assert cluster.client().reclaim_orphans(nid).blobs == 0  # done once: nothing held back any more
    wait_until(lambda: not holds("p" * 32), 10.0, message="the reclaimed orphan erased after the grace")
    assert not any("brake" in w for w in cluster.status().totals["warnings"])

    # A blob of a stored file, quarantined by hand, is released at the next report and never erased.
    version = cluster.client().stat("base").version
    reply = node_request(cluster, holder, protocol.Quarantine(blobs=[version], **node_fence(cluster, holder)),
                         protocol.Quarantined)
    assert reply.count == 1
    wait_until(lambda: row()["quarantined_bytes"] == 0, 10.0, message="the known blob released")
    time.sleep(1.5)  # past the grace
    assert holds(version)
    assert download_bytes(cluster, "base", tmp_path) == random_bytes(seed, 400 * KIB)


def inventory_blobs(cluster, index: int) -> set[str]:
    """Blob ids node ``index`` reports (it keeps running): LIST via an INVENTORY-free probe of GET_CHUNKS is
    not enough, so read its chunk dir copy."""
    from chunk_store import ChunkStore
    copy = os.path.join(cluster.data_dir, f"inventory-copy-{index}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(os.path.join(cluster.node_data_dir(index), "chunks"), copy)
    try:
        with ChunkStore(copy) as store:
            return set(store.inventory())
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def recover(cluster, nodes_alive: int) -> dict:
    """Destroy the master's data dir, start it with --recover-from-nodes, wait until it serves again."""
    shutil.rmtree(master_dir(cluster))
    args = cluster.master_args
    cluster.master_args = [*args, "--recover-from-nodes"]
    try:
        cluster.start_master()
    finally:
        cluster.master_args = args
    wait_until(lambda: not cluster.status().totals.get("recovering"), 20.0, message="recovery done")
    cluster.wait_nodes_alive(nodes_alive)
    with open(cluster.master.log_path, encoding="utf-8") as f:
        reports = [line for line in f if "recovered " in line and " files (" in line]
    print(reports[-1] if reports else "no report")
    assert reports, "no recovery report in the master's log"
    return reports[-1]


def check_files(cluster, expected: dict[str, bytes], gone: set[str], tmp_path, seed: int) -> None:
    c = cluster.client()
    try:
        listed = {e["name"]: e for e in c.list()}
        missing = sorted(set(expected) - set(listed))
        assert not missing, f"{len(missing)} acknowledged files not recovered, e.g. {missing[:3]} (seed {seed})"
        assert not gone & set(listed), f"deleted files came back: {sorted(gone & set(listed))[:3]} (seed {seed})"
        out = tmp_path / "restore"
        summary = c.download_tree("", str(out), force=True)
        assert not summary.failures, summary.failures
        for name, data in expected.items():
            assert c.stat(name).sha256 == sha256(data), f"{name} (seed {seed})"
            with open(os.path.join(out, name), "rb") as f:
                assert f.read() == data, f"{name} differs (seed {seed})"
        shutil.rmtree(out)
    finally:
        c.close()


def test_metadata_is_rebuilt_from_the_nodes(make_cluster, tmp_path):
    """300 files, 30 replaced, 30 deleted, 10 appended; the master's data dir destroyed: every acknowledged
    file comes back byte-identical and no deleted one; then again, after more replaces and deletes, with a node
    down and the master killed -9 right after an acknowledged upload, whose file is recovered or in
    lost+found/; the cluster serves after."""
    seed = 1103
    cluster = make_cluster(master_args=ND_MASTER, node_args=ND_NODE)
    rng_sizes = [random_bytes(seed, 300)[i] for i in range(300)]
    tree = tmp_path / "tree"
    expected: dict[str, bytes] = {}
    for i in range(300):
        size = (1 + i % 7) * MIB // 4 if i % 30 == 0 else 200 + rng_sizes[i] * 12
        name = f"d{i % 5}/sub{i % 3}/f{i:03d}.bin"
        data = random_bytes(seed + i, size)
        os.makedirs(tree / os.path.dirname(name), exist_ok=True)
        (tree / name).write_bytes(data)
        expected[f"backup/{name}"] = data
    c = cluster.client()
    try:
        summary = c.upload_tree(str(tree), "backup")
        assert not summary.failures and summary.files == 300, summary.failures
    finally:
        c.close()
    shutil.rmtree(tree)
    names = sorted(expected)
    gone = set(names[0:30])
    for name in names[30:60]:
        expected[name] = random_bytes(seed + 7000 + len(name), 3000 + len(name))
        upload_bytes(cluster, name, expected[name], tmp_path)
    for name in names[60:70]:
        extra = random_bytes(seed + 8000 + len(name), 1500)
        upload_bytes(cluster, name, extra, tmp_path, mode="append")
        expected[name] += extra
    c = cluster.client()
    try:
        for name in gone:
            c.delete(name)
            del expected[name]
    finally:
        c.close()

    cluster.master.terminate()  # a clean shutdown: a last metadata backup
    report = recover(cluster, 3)
    assert "recovered 270 files" in report and "270 from the metadata backup" in report, report
    check_files(cluster, expected, gone, tmp_path, seed)

    # Phase two: notes and tombstones after the backup, one node down, the master killed -9.
    for name in names[70:80]:
        expected[name] = random_bytes(seed + 9000 + len(name), 5000)
        upload_bytes(cluster, name, expected[name], tmp_path)
    c = cluster.client()
    try:
        for name in names[80:85]:
            c.delete(name)
            del expected[name]
            gone.add(name)
    finally:
        c.close()
    wait_until(lambda: cluster.status().totals["commit_notes_pending"] == 0, 10.0, message="notes delivered")
    cluster.nodes[0].kill()
    last = random_bytes(seed + 9999, 70 * KIB)
    upload_bytes(cluster, "last/acked.bin", last, tmp_path)
    cluster.master.signal(signal.SIGKILL)
    cluster.master.kill()
    report = recover(cluster, 2)
    c = cluster.client()
    try:
        listed = {e["name"] for e in c.list()}
    finally:
        c.close()
    assert "last/acked.bin" in listed or "lost+found/last/acked.bin" in listed, report
    found = "last/acked.bin" if "last/acked.bin" in listed else "lost+found/last/acked.bin"
    assert download_bytes(cluster, found, tmp_path) == last
    check_files(cluster, expected, gone, tmp_path, seed)

    after = random_bytes(seed + 12345, 40 * KIB)
    upload_bytes(cluster, "after/recovery.bin", after, tmp_path)
    assert download_bytes(cluster, "after/recovery.bin", tmp_path) == after
