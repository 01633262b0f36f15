"""A commit never puts back a placement the cluster no longer has.

Writers (append, write, touch) read a file's entry when they start and
commit later; repair may move the chunks they did not touch meanwhile.  The
unit tests drive that interleaving deterministically through the metadata
log and a Master without nodes; the process tests pause a real writer while
a node loses its disk, and start a node on another node's old port.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading

from conftest import FAST_MASTER, FAST_TIMING, ROOT, random_bytes, wait_until

import config as config_module
import protocol
import transport
from master import Master, NodeState
from metadata_log import MetadataLog
from namespace import Namespace, make_entry, put_record, splice_runs
from repair import replicas_record

KIB = 1024
MIB = 1024 * 1024
CHUNK = 1024
BATCH = 4  # chunks per batch in the unit tests
A, B, C, D = "node-a", "node-b", "node-c", "node-d"


# --- unit: the re-based put ------------------------------------------------------------------
def stored_file(version: str = "v1") -> dict:
    """Ten chunks on three nodes, as an upload to A, B, C leaves them."""
    return make_entry(10 * CHUNK, CHUNK, "0" * 64, version,
                      [[0, 4, [A, B]], [4, 4, [B, C]], [8, 2, [A, C]]], BATCH)


def appended(old: dict, new_version: str = "v2") -> tuple[dict, dict]:
    """(entry, base) of an append of two chunks, computed from ``old`` as the master does at UPLOAD_BEGIN."""
    runs = splice_runs(old, [[8, 4, [A, D]]], 8, 12)
    entry = make_entry(12 * CHUNK, CHUNK, "1" * 64, new_version, runs, BATCH)
    return entry, {"version": old["version"], "first": 8, "end": 12}


def chunk_nodes(entry: dict) -> dict[int, tuple[str, tuple]]:
    """chunk -> (blob, sorted nodes) of an entry."""
    out = {}
    for run in entry["runs"]:
        blob = run[3] if len(run) > 3 else entry["version"]
        for chunk in range(run[0], run[0] + run[1]):
            out[chunk] = (blob, tuple(sorted(run[2])))
    return out


def test_append_commit_keeps_the_placement_repair_committed_after_the_writer_read(tmp_path):
    """An append's put, committed after repair moved B's untouched chunks to D, lists D and not B (and replays so)."""
    namespace = Namespace()
    log = MetadataLog(str(tmp_path / "meta"), namespace)
    log.open()
    log.commit([put_record("f", stored_file())])
    read_by_writer = namespace.files["f"]
    entry, base = appended(read_by_writer)
    # Repair, while the writer streams: B lost its disk, its batches go to D.
    log.commit([replicas_record("f", "v1", 0, 4, [A, B], [A, D]),
                replicas_record("f", "v1", 4, 4, [B, C], [C, D])])
    log.commit([put_record("f", entry, base)])
    placed = chunk_nodes(namespace.files["f"])
    assert all(placed[c] == ("v1", (A, D)) for c in range(0, 4)), placed
    assert all(placed[c] == ("v1", (C, D)) for c in range(4, 8)), placed
    assert all(placed[c] == ("v2", (A, D)) for c in range(8, 12)), placed
    assert namespace.files["f"]["size"] == 12 * CHUNK and namespace.files["f"]["version"] == "v2"
    log.close()
    replayed = Namespace()
    MetadataLog(str(tmp_path / "meta"), replayed).open()
    assert replayed.files == namespace.files


def test_write_commit_rebases_the_chunks_before_and_after_the_written_range():
    """An in-place write of chunks 4..7 keeps chunks 0..3 and 8..9 where repair moved them meanwhile."""
    namespace = Namespace()
    namespace.apply(put_record("f", stored_file()))
    old = namespace.files["f"]
    runs = splice_runs(old, [[4, 4, [C, D]]], 4, 8)
    entry = make_entry(10 * CHUNK, CHUNK, "2" * 64, "v2", runs, BATCH)
    namespace.apply(replicas_record("f", "v1", 0, 4, [A, B], [B, D]))
    namespace.apply(replicas_record("f", "v1", 8, 2, [A, C], [C, D]))
    namespace.apply(put_record("f", entry, {"version": "v1", "first": 4, "end": 8}))
    placed = chunk_nodes(namespace.files["f"])
    assert [placed[c] for c in (0, 3, 4, 7, 8, 9)] == [
        ("v1", (B, D)), ("v1", (B, D)), ("v2", (C, D)), ("v2", (C, D)), ("v1", (C, D)), ("v1", (C, D))], placed


def test_put_without_base_replaces_the_file_whole():
    """A whole-file upload is not re-based: its runs are exactly what it wrote."""
    namespace = Namespace()
    namespace.apply(put_record("f", stored_file()))
    new = make_entry(3 * CHUNK, CHUNK, "3" * 64, "v9", [[0, 3, [C, D]]], BATCH)
    namespace.apply(put_record("f", new))
    stored = {k: v for k, v in namespace.files["f"].items() if k not in ("commit_index", "committed_at")}
    assert stored == new  # apply adds only the version's id and commit time (history.py)


def master_without_nodes(tmp_path) -> Master:
    config = config_module.load_config(os.path.join(ROOT, "config.ini"))
    return Master(config, str(tmp_path / "master"))


def test_touch_does_not_put_back_a_placement_changed_between_its_read_and_its_commit(tmp_path):
    """A repair record that lands between touch's read and its put survives the touch."""
    master = master_without_nodes(tmp_path)
    try:
        master.log.commit([put_record("f", stored_file())])
        commit = master.log.commit

        def repair_lands_first(records):
            if records[0]["op"] == "put":  # touch has read the entry and now commits
                commit([replicas_record("f", "v1", 0, 4, [A, B], [A, D])])
            return commit(records)

        master.log.commit = repair_lands_first
        touched = master.touch("f", "tester")
        entry = master.namespace.files["f"]
        assert chunk_nodes(entry)[0] == ("v1", (A, D)), entry["runs"]
        assert entry["runs"] == [[0, 4, [A, D]], [4, 4, [B, C]], [8, 2, [A, C]]]
        assert touched["version"] == "v1"
    finally:
        master.stop()


# --- processes ---------------------------------------------------------------------------------
HEAL_MASTER = [*FAST_MASTER, "--safe-mode", "1"]
HEAL_NODE = [*FAST_TIMING, "--scrub-rate", "0"]
BIG_CAPACITY = str(1024 ** 4)  # a node with this much room is every placement's first choice


def node_addr(node) -> tuple[str, int]:
    host, _, port = node.address.rpartition(":")
    return host, int(port)


def node_id_of(cluster, index: int) -> str:
    with transport.Connection(node_addr(cluster.nodes[index]), "master", timeout_s=10.0) as conn:
        return conn.peer_id


def stat(cluster, name: str) -> protocol.StatReply:
    c = cluster.client()
    try:
        return c.stat(name)
    finally:
        c.close()


def held_locks(cluster) -> list[dict]:
    c = cluster.client()
    try:
        return c.locks()
    finally:
        c.close()


def missing_copies(cluster, reply: protocol.StatReply, running) -> list[str]:
    """Runs of a STAT reply naming a node that does not hold their chunks (asked of the ``running`` nodes)."""
    addresses = {node_id_of(cluster, i): node_addr(cluster.nodes[i]) for i in running}
    missing = []
    for first, count, nodes, blob in reply.runs:
        for nid in nodes:
            if nid not in addresses:
                missing.append(f"{reply.name} chunks {first}..{first + count - 1} on {nid}, not running")
                continue
            try:
                with transport.Connection(addresses[nid], "master", timeout_s=10.0) as conn:
                    for start in range(first, first + count, 1024):
                        piece = min(1024, first + count - start)
                        conn.request(protocol.GetChunks(blob=blob, first=start, count=piece), protocol.ChunkData)
            except protocol.ChunkNotFound:
                missing.append(f"{reply.name} chunks {first}..{first + count - 1} on {nid}")
    return missing


class PausedWriter:
    """A raw client that has begun an append or write and pauses mid-stream, holding the lock."""

    def __init__(self, cluster, name: str, mode: str, data: bytes, offset: int = 0):
        host, _, port = cluster.master_address.rpartition(":")
        self.conn = transport.Connection((host, int(port)), "client", timeout_s=30.0)
        self.sha = hashlib.sha256()
        self.conn.send(protocol.UploadBegin(name=name, mode=mode, offset=offset))
        self.send(data)

    def send(self, data: bytes) -> None:
        self.sha.update(data)
        self.conn.send(protocol.Data(body=data))

    def finish(self) -> protocol.Uploaded:
        self.conn.send(protocol.UploadEnd(sha256=self.sha.hexdigest()))
        return self.conn.expect(protocol.Uploaded)

    def close(self) -> None:
        self.conn.close()


def test_writers_paused_while_repair_moves_a_wiped_nodes_chunks_commit_where_the_chunks_are(make_cluster, tmp_path):
    """Append and write paused while B loses its disk and repair copies B's batches to D commit runs naming D, not B."""
    seed = 9100
    cluster = make_cluster(nodes=3, master_args=HEAL_MASTER, node_args=HEAL_NODE)
    originals = {name: random_bytes(seed + n, 2 * MIB + 300 * KIB) for n, name in enumerate(("app", "wri"))}
    for name, data in originals.items():
        path = tmp_path / name
        path.write_bytes(data)
        c = cluster.client()
        try:
            c.upload_file(str(path), name)
        finally:
            c.close()
            path.unlink()
    cluster.add_node(3, extra_args=["--capacity", BIG_CAPACITY])  # D: repair's first choice
    cluster.wait_nodes_alive(4)
    ids = [node_id_of(cluster, i) for i in range(4)]
    # B: a node holding chunks of both files (with three batches each over three nodes, every one does).
    wiped = next(i for i in range(3) if all(any(ids[i] in run[2] for run in stat(cluster, n).runs)
                                              for n in originals))
    added, patch = random_bytes(seed + 10, 700), random_bytes(seed + 11, 1500)
    writers = [PausedWriter(cluster, "app", "append", added[:300]),
               PausedWriter(cluster, "wri", "write", patch[:500], offset=MIB + 100)]
    try:
        wait_until(lambda: len(held_locks(cluster)) == 2, message="both writers holding their locks")
        # B loses its disk but keeps its identity, and comes back at once.
        cluster.nodes[wiped].kill()
        shutil.rmtree(os.path.join(cluster.node_data_dir(wiped), "chunks"))
        cluster.add_node(wiped)
        wait_until(lambda: all(all(ids[wiped] not in run[2] and len(run[2]) == 2 for run in stat(cluster, n).runs)
                               for n in originals), 20.0, message="B's batches re-replicated elsewhere")
        writers[0].send(added[300:])
        writers[1].send(patch[500:])
        for writer in writers:
            writer.finish()
    finally:
        for writer in writers:
            writer.close()
    expected = {"app": originals["app"] + added,
                "wri": originals["wri"][:MIB + 100] + patch + originals["wri"][MIB + 100 + len(patch):]}
    for name, data in expected.items():
        reply = stat(cluster, name)
        assert reply.sha256 == hashlib.sha256(data).hexdigest(), f"{name} (seed {seed})"
        missing = missing_copies(cluster, reply, range(4))
        assert not missing, f"committed runs name nodes without the chunks (seed {seed}): {missing}"


def test_node_on_another_nodes_old_port_is_refused_and_gets_none_of_its_data(make_cluster, tmp_path):
    """A node restarted on a dead node's port answers with its own id: the master refuses to treat it as the dead one."""
    seed = 9200
    # dead_after long enough that the master still counts the killed node as alive.
    cluster = make_cluster(nodes=3, master_args=[*FAST_MASTER, "--dead-after", "30"])
    cluster.restart_node(0, extra_args=["--capacity", BIG_CAPACITY])  # node 0: every placement's first choice
    moved_id = node_id_of(cluster, 0)
    wait_until(lambda: any(n["id"] == moved_id and n["alive"] and n["capacity_bytes"] == int(BIG_CAPACITY)
                           for n in cluster.status().nodes), message="node 0 back with its large capacity")
    old_port = str(node_addr(cluster.nodes[0])[1])
    cluster.nodes[0].kill()
    cluster.restart_node(1, extra_args=["--port", old_port])
    wait_until(lambda: any(n["address"].endswith(":" + old_port) and n["id"] != moved_id and n["alive"]
                           for n in cluster.status().nodes), message="node 1 registered on node 0's old port")
    data = random_bytes(seed, 3 * MIB)
    path = tmp_path / "after-move"
    path.write_bytes(data)
    c = cluster.client()
    try:
        c.upload_file(str(path), "after-move")
    finally:
        c.close()
        path.unlink()
    reply = stat(cluster, "after-move")
    assert all(moved_id not in run[2] for run in reply.runs), \
        f"chunks placed on the dead node {moved_id} (really on the node that took its port): {reply.runs}"
    missing = missing_copies(cluster, reply, [1, 2])
    assert not missing, f"committed runs name nodes without the chunks (seed {seed}): {missing}"


def test_a_new_leader_waits_for_nodes_placement_can_use(tmp_path):
    """After a failover the first upload waits until enough nodes have registered AND reported their
    inventory (what choose_replicas needs); waiting for registration alone let it fail INSUFFICIENT_NODES."""
    master = master_without_nodes(tmp_path)
    try:
        master.replication = object()  # check_writable's wait is for a group's new leader only
        now = master.clock()
        master.started = now
        with master._nodes_lock:
            for node_id in ("n1", "n2"):
                master._nodes[node_id] = NodeState(node_id, ("127.0.0.1", 1), capacity_bytes=1 << 30,
                                                   last_heard=now, reported=False)

        def report():
            with master._nodes_lock:
                for node in master._nodes.values():
                    node.last_heard, node.reported = master.clock(), True
        timer = threading.Timer(0.3, report)
        timer.start()
        try:
            master.check_writable()
            assert sorted(master.choose_replicas(1)) == ["n1", "n2"]
        finally:
            timer.cancel()
    finally:
        master.replication = None
        master.stop()


def test_losing_the_leadership_drops_name_locks_and_fails_their_waiters_with_not_leader(tmp_path):
    """Name locks are leader state: a writer queued behind a lock on a master that stops leading fails
    with NOT_LEADER (so its client re-sends to the new leader) instead of waiting out lock_wait_s."""
    master = master_without_nodes(tmp_path)
    try:
        held = master.lock_name("f", "writer-a", 0)
        outcome = []

        def waiter():
            try:
                master.lock_name("f", "writer-b", 30)
                outcome.append("granted")
            except protocol.BackupError as exc:
                outcome.append(exc)
        thread = threading.Thread(target=waiter)
        thread.start()
        wait_until(lambda: master.locks.held() and master.locks.held()[0]["waiting"], 5, message="a waiter")
        master.stop_leading()
        thread.join(5)
        assert len(outcome) == 1 and isinstance(outcome[0], protocol.NotLeader), outcome
        assert master.locks.held() == []
        master.locks.release("f", held)  # the old holder's release is harmless
        again = master.lock_name("f", "writer-c", 0)  # a leader again later starts with free names
        master.locks.release("f", again)
        assert master.locks.held() == []
    finally:
        master.stop()
