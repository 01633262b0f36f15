"""Small files in batches: UPLOAD_FILES (client -> master) and PUT_BLOBS (master -> node).

Unit tests of the frame layouts and of a node's PUT_BLOBS; then real
processes: a mixed tree read back whole, per-file outcomes inside one
frame, a damaged file, and SIGKILL of a node and of the master while
batches are on their way.
"""

from __future__ import annotations

import hashlib
import os
import signal

import pytest

import cli
import protocol
import transport
from conftest import master_address, random_bytes, wait_until

CHUNK = 1024


def files_frame(files, chunk_size: int = CHUNK, damage: str | None = None, wait_s: float = -1.0,
                first_tag: int = 0) -> protocol.UploadFiles:
    """An UPLOAD_FILES of ``files`` ({name: bytes}); ``damage``: the name whose bytes change after the CRCs."""
    items, parts = [], []
    for tag, (name, data) in enumerate(files.items(), start=first_tag):
        crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(data, chunk_size)) if data else b""
        items.append([name, len(data), hashlib.sha256(data).hexdigest(), None, tag])
        if name == damage:
            data = bytes([data[0] ^ 1]) + data[1:]
        parts += (crcs, data)
    return protocol.UploadFiles(files=items, chunk_size=chunk_size, wait_s=wait_s, body=b"".join(parts))


def read_back(c, name: str, tmp_path) -> bytes:
    path = tmp_path / "read-back"
    c.download(name, str(path), force=True)
    try:
        return path.read_bytes()
    finally:
        path.unlink()


def write_tree(tree, files: dict) -> dict:
    """Create directory ``tree`` holding ``files`` ({name: bytes}); returns ``files``."""
    tree.mkdir()
    for name, data in files.items():
        (tree / name).write_bytes(data)
    return files


def kill_after_first_batch(monkeypatch, kill) -> list:
    """Make the CLI call ``kill()`` once its first batch of small files has gone out (flushed).

    Returns a list that gains an item per batch sent.
    """
    real_send = cli.SmallBatch.send
    sent: list = []

    def send_then_kill(self, conn, in_flight):
        real_send(self, conn, in_flight)
        sent.append(1)
        if len(sent) == 1:
            conn.flush()
            kill()

    monkeypatch.setattr(cli.SmallBatch, "send", send_then_kill)
    return sent


# --- layouts (unit) ----------------------------------------------------------------------------
def test_layouts_cut_the_body_and_refuse_lengths_that_do_not_add_up():
    files = [["a", 3000, "0" * 64, None, 0], ["b", 0, "0" * 64, None, 1], ["c", 1024, "0" * 64, None, 2]]
    assert protocol.upload_files_layout(files, CHUNK, 12 + 3000 + 4 + 1024) == [
        (0, 12, 3000), (3012, 3012, 0), (3012, 3016, 1024)]
    for body_len in (12 + 3000 + 4 + 1023, 12 + 3000 + 4 + 1025):
        with pytest.raises(protocol.RemoteProtocolError):
            protocol.upload_files_layout(files, CHUNK, body_len)
    with pytest.raises(protocol.RemoteProtocolError):
        protocol.upload_files_layout([["a", -1, "", None, 0]], CHUNK, 0)
    with pytest.raises(protocol.RemoteProtocolError):
        protocol.upload_files_layout([], CHUNK, 0)
    blobs = [["b1", 0, 3, 3000], ["b2", 4, 1, 10]]
    assert protocol.put_blobs_layout(blobs, CHUNK, 12 + 3000 + 4 + 10) == [
        ("b1", 0, 3, 0, 12, 3000), ("b2", 4, 1, 3012, 3016, 10)]
    for bad in ([["b1", 0, 2, 3000]], [["b1", 0, 3, 3000], ["b2", 0, 1, 10, 0]], [["b1", -1, 3, 3000]]):
        with pytest.raises(protocol.RemoteProtocolError):
            protocol.put_blobs_layout(bad, CHUNK, 12 + 3000)


def test_a_node_writes_nothing_of_a_put_blobs_with_one_damaged_item(tmp_path):
    """Every CRC of every item is checked before any item is written; a whole request is stored as one batch."""
    import config as config_module
    from storage_node import StorageNode
    node = StorageNode(config_module.load_config(), str(tmp_path / "node"))
    try:
        node.identity.check_master("c1", 1, holds_data=False)
        one, two = random_bytes(1, 3000), random_bytes(2, 500)
        crcs = [protocol.crcs_to_bytes(protocol.chunk_crcs(d, CHUNK)) for d in (one, two)]
        blobs = [["b1", 0, 3, 3000], ["b2", 0, 1, 500]]
        damaged = crcs[0] + one + crcs[1] + bytes([two[0] ^ 1]) + two[1:]
        with pytest.raises(protocol.ChecksumMismatch):
            node.put_blobs(protocol.PutBlobs(blobs=blobs, chunk_size=CHUNK, body=damaged, cluster_id="c1", epoch=1))
        assert node.store.inventory() == {}
        ack = node.put_blobs(protocol.PutBlobs(blobs=blobs, chunk_size=CHUNK, body=crcs[0] + one + crcs[1] + two,
                                               cluster_id="c1", epoch=1))
        assert (ack.blob, ack.first, ack.count, ack.seq) == ("b1", 0, 4, 1)
        assert node.store.inventory() == {"b1": [(0, 3)], "b2": [(0, 1)]}
        with pytest.raises(protocol.StaleMaster):
            node.put_blobs(protocol.PutBlobs(blobs=[["b3", 0, 1, 500]], chunk_size=CHUNK, body=crcs[1] + two,
                                             cluster_id="c1", epoch=0))
        assert "b3" not in node.store.inventory()
    finally:
        node.store.close()
        node.catalog.close()


def test_the_size_bound_of_a_description_is_never_below_its_json():
    """Pages of DESCRIBE and COMMIT_NOTES are cut with notes.note_size: it must never under-count."""
    import random
    import notes
    rng = random.Random(15)
    for _ in range(500):
        name = "".join(rng.choice('ab/é"\\\u2028x') for _ in range(rng.randint(1, 300)))
        runs = [[i * 1024, 1024, ["n" * 12, "m" * 12], "a" * 32] for i in range(rng.randint(0, 64))]
        entry = {"version": "a" * 32, "size": rng.randint(0, 2 ** 63), "chunk_size": 1024, "batch_chunks": 1024,
                 "sha256": "b" * 64, "mtime": rng.random() * 1e12, "runs": runs,
                 "commit_index": rng.randint(0, 2 ** 63), "committed_at": -rng.random() * 1e300}
        item = notes.describe(name, entry, rng.randint(0, 2 ** 63))
        assert notes.note_size(item) >= protocol.json_size(item)
    tombstone = {"name": "x", "deleted": True, "index": 4, "trashed_at": 1.5}
    assert notes.note_size(tombstone) == protocol.json_size(tombstone)


# --- real processes ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from conftest import running_cluster
    with running_cluster(tmp_path_factory.mktemp("small-upload"), nodes=3) as c:
        yield c


def test_a_mixed_tree_goes_in_batches_and_reads_back_whole(shared, tmp_path, monkeypatch):
    """Small files, empty ones, a symlink, an empty directory and large files between them: every one is
    stored with its metadata, the small ones in UPLOAD_FILES frames (few PUT_BLOBS on the nodes)."""
    tree = tmp_path / "tree"
    (tree / "sub" / "empty-dir").mkdir(parents=True)
    expected = {}
    for index in range(300):
        data = random_bytes(index, (index * 37) % 5000) if index % 50 else random_bytes(index, 200_000)
        path = tree / ("sub" if index % 3 else "") / f"f{index:03d}"
        path.write_bytes(data)
        expected[str(path.relative_to(tree))] = data
    os.chmod(tree / "f000", 0o600)
    os.symlink("f003", tree / "link")
    batches = []
    real_send = cli.SmallBatch.send

    def counting_send(self, conn, in_flight):
        if self.files:
            batches.append(len(self.files))
        real_send(self, conn, in_flight)

    monkeypatch.setattr(cli.SmallBatch, "send", counting_send)
    monkeypatch.setattr(cli, "SMALL_BATCH_FILES", 64)
    c = shared.client()
    try:
        summary = c.upload_tree(str(tree), "mixed")
        assert not summary.failures
        assert summary.files == 300 + 2  # the symlink and the empty directory
        assert len(batches) >= 7 and max(batches) <= 64 and sum(batches) == 300 - 6 + 2
        for relative, data in expected.items():
            assert read_back(c, f"mixed/{relative}", tmp_path) == data, relative
        out = tmp_path / "restored"
        c.download_tree("mixed/", str(out))
        assert os.readlink(out / "link") == "f003"
        assert (out / "sub" / "empty-dir").is_dir()
        assert os.stat(out / "f000").st_mode & 0o777 == 0o600
        assert (out / "sub" / "f001").read_bytes() == expected["sub/f001"]
    finally:
        c.close()


def test_each_file_of_a_frame_gets_its_own_reply_in_order(shared, tmp_path):
    """A bad name, a name twice and a name another writer holds fail alone; the others are stored."""
    holder = transport.Connection(master_address(shared), "client", 10.0)
    conn = transport.Connection(master_address(shared), "client", 10.0)
    try:
        holder.send(protocol.UploadBegin(name="frame/busy"))  # holds the lock until it ends
        wait_until(lambda: any(lock["name"] == "frame/busy" for lock in shared.client().locks()) or None)
        files = {"frame/a": b"a" * 100, "frame/../x": b"x", "frame/busy": b"b", "frame/c": b"", "frame/d": b"d" * 3000}
        frame = files_frame(files, wait_s=0.0)
        frame.files.append(["frame/a", 1, hashlib.sha256(b"z").hexdigest(), None, 9])
        conn.send(protocol.UploadFiles(files=frame.files, chunk_size=CHUNK, wait_s=0.0,
                                       body=frame.body + protocol.crcs_to_bytes(protocol.chunk_crcs(b"z", CHUNK)) + b"z"))
        conn.send(protocol.Sync())
        replies = [conn.recv() for _ in range(7)]
        assert [r.OP if isinstance(r, protocol.Uploaded) else r.code for r in replies[:6]] == [
            "UPLOADED", "INVALID_NAME", "FILE_LOCKED", "UPLOADED", "UPLOADED", "FILE_LOCKED"]
        assert [r.tag for r in replies[:6] if isinstance(r, protocol.Uploaded)] == [0, 3, 4]
        assert isinstance(replies[6], protocol.Synced)
        holder.send(protocol.UploadAbort())
        c = shared.client()
        try:
            assert read_back(c, "frame/a", tmp_path) == b"a" * 100
            assert read_back(c, "frame/d", tmp_path) == b"d" * 3000
            assert c.stat("frame/c").size == 0
            with pytest.raises(protocol.FileNotFound):
                c.stat("frame/busy")
        finally:
            c.close()
    finally:
        conn.close()
        holder.close()


def test_files_cut_otherwise_or_larger_than_a_batch_are_stored_whole(shared, tmp_path):
    """CRCs of another chunk size: the master checks each file's SHA-256 (a wrong one fails that file
    alone) and computes the CRCs; a file larger than a batch (a raw client may send one) becomes several
    items of its blob, each within a batch."""
    big = random_bytes(77, 2 * 1024 * 1024 + 5000)
    with transport.Connection(master_address(shared), "client", 10.0) as conn:
        other = files_frame({"cut/a": b"a" * 5000, "cut/b": b"b" * 3000, "cut/c": b"c"}, chunk_size=4096)
        other.files[1][2] = hashlib.sha256(b"not b").hexdigest()
        conn.send(other)
        conn.send(files_frame({"cut/small": b"s" * 100, "cut/big": big, "cut/after": b"z" * 2000}))
        conn.send(protocol.Sync())
        replies = [conn.recv() for _ in range(7)]
    assert [getattr(r, "code", r.OP) for r in replies] == ["UPLOADED", "CHECKSUM_MISMATCH", "UPLOADED",
                                                           "UPLOADED", "UPLOADED", "UPLOADED", "SYNCED"]
    c = shared.client()
    try:
        for name, data in (("cut/a", b"a" * 5000), ("cut/c", b"c"), ("cut/small", b"s" * 100), ("cut/big", big),
                           ("cut/after", b"z" * 2000)):
            assert read_back(c, name, tmp_path) == data, name
        info = c.stat("cut/big")
        assert info.chunk_size == CHUNK and info.chunks == 2053 and sum(run[1] for run in info.runs) == 2053
        with pytest.raises(protocol.FileNotFound):
            c.stat("cut/b")
    finally:
        c.close()


def test_a_file_damaged_on_the_way_commits_nothing_of_its_frame(shared, tmp_path):
    """Bytes unlike the client's CRCs: every replica refuses the PUT_BLOBS, so no file of that frame is stored;
    the next group on the same connection is stored as usual."""
    conn = transport.Connection(master_address(shared), "client", 10.0)
    try:
        conn.send(files_frame({"damaged/a": b"a" * 2000, "damaged/b": b"b" * 2000}, damage="damaged/b"))
        conn.send(protocol.Sync())
        replies = [conn.recv() for _ in range(3)]
        assert [getattr(r, "code", r.OP) for r in replies] == ["CHECKSUM_MISMATCH", "CHECKSUM_MISMATCH", "SYNCED"]
        conn.send(files_frame({"damaged/c": b"c" * 10}))
        conn.send(protocol.Sync())
        replies = [conn.recv() for _ in range(2)]
        assert [getattr(r, "code", r.OP) for r in replies] == ["UPLOADED", "SYNCED"]
    finally:
        conn.close()
    c = shared.client()
    try:
        for name in ("damaged/a", "damaged/b"):
            with pytest.raises(protocol.FileNotFound):
                c.stat(name)
        assert read_back(c, "damaged/c", tmp_path) == b"c" * 10
    finally:
        c.close()


def test_a_node_killed_during_a_batch_upload_loses_nothing(make_cluster, tmp_path, monkeypatch):
    """SIGKILL of a node after the first batch went out: later batches go elsewhere, the copies it took are
    re-made before the commit, and every file reads back."""
    c3 = make_cluster(nodes=3)
    tree = tmp_path / "tree"
    expected = write_tree(tree, {f"f{i:03d}": random_bytes(100 + i, 3000 + i) for i in range(200)})
    killed = []

    def kill_a_holder():  # a node that has stored the first batch (not yet flushed or committed)
        holder = wait_until(lambda: next((n for n in c3.status().nodes if n["used_bytes"] > 0), None))
        index = next(i for i, server in enumerate(c3.nodes) if server.address == holder["address"])
        c3.nodes[index].signal(signal.SIGKILL)
        killed.append(holder["id"])

    sent = kill_after_first_batch(monkeypatch, kill_a_holder)
    monkeypatch.setattr(cli, "SMALL_BATCH_FILES", 40)
    c = c3.client()
    try:
        summary = c.upload_tree(str(tree), "killed-node")
        assert not summary.failures and summary.files == 200 and len(sent) >= 5 and killed
        for name, data in expected.items():
            assert read_back(c, f"killed-node/{name}", tmp_path) == data
            entry = c.stat(f"killed-node/{name}")
            assert all(len(run[2]) == 2 and killed[0] not in run[2] for run in entry.runs)
    finally:
        c.close()


def test_a_master_killed_during_a_batch_upload_keeps_every_acknowledged_file(make_cluster, tmp_path):
    """SIGKILL of the master with a group acknowledged and the next one in flight: after the restart every
    acknowledged file reads back whole, and an unacknowledged one is either absent or whole."""
    c2 = make_cluster(nodes=2)
    acknowledged = {f"acked/f{i:03d}": random_bytes(200 + i, 4096) for i in range(256)}  # a full group
    pending = {f"pending/f{i:03d}": random_bytes(500 + i, 4096) for i in range(50)}
    conn = transport.Connection(master_address(c2), "client", 10.0)
    try:
        conn.send(files_frame(acknowledged))
        replies = [conn.recv() for _ in acknowledged]
        assert all(isinstance(r, protocol.Uploaded) for r in replies)
        conn.send(files_frame(pending))
        conn.send(protocol.Status())  # answered after the pending group's commit: the frame was read before
        c2.master.signal(signal.SIGKILL)
    finally:
        conn.close()
    c2.master.process.wait(10)
    c2.start_master()
    c2.wait_nodes_alive(2)
    c = c2.client()
    try:
        for name, data in acknowledged.items():
            assert read_back(c, name, tmp_path) == data
        for entry in c.list("pending/"):  # committed before the kill, or not at all: never half
            assert read_back(c, entry["name"], tmp_path) == pending[entry["name"]]
    finally:
        c.close()


def test_three_masters_a_follower_refuses_every_file_and_a_killed_leader_loses_nothing(tmp_path, monkeypatch):
    """With three masters: an UPLOAD_FILES sent to a follower gets NOT_LEADER for each of its files; the
    leader SIGKILLed after the first batch of a directory upload: the client sends what was not acknowledged
    to the new leader, and every file reads back whole."""
    from conftest import FAST_MASTER, FAST_TIMING, TestCluster
    from test_replication import addresses, leader_index
    c = TestCluster(str(tmp_path / "c"), nodes=2, masters=3, master_args=FAST_MASTER, node_args=FAST_TIMING)
    try:
        c.start()
        leader = wait_until(lambda: _leader_or_none(c, leader_index), 30, message="a leader")[0]
        follower = addresses(c)[(leader + 1) % 3]
        with transport.Connection(follower, "client", 10.0) as conn:
            conn.send(files_frame({"refused/a": b"a", "refused/b": b"b", "refused/c": b""}))
            conn.send(protocol.Sync())
            replies = [conn.recv() for _ in range(3)]
            assert [getattr(r, "code", r.OP) for r in replies] == ["NOT_LEADER"] * 3
        tree = tmp_path / "tree"
        expected = write_tree(tree, {f"f{i:03d}": random_bytes(900 + i, 2000 + i) for i in range(150)})
        kill_after_first_batch(monkeypatch, lambda: c.masters[leader].signal(signal.SIGKILL))
        monkeypatch.setattr(cli, "SMALL_BATCH_FILES", 30)
        client = c.client()
        try:
            summary = client.upload_tree(str(tree), "failover")
            assert not summary.failures and summary.files == 150
            assert _leader_or_none(c, leader_index) not in (None, [leader])
            for name, data in expected.items():
                assert read_back(client, f"failover/{name}", tmp_path) == data
        finally:
            client.close()
    finally:
        c.stop()


def _leader_or_none(c, leader_index) -> list[int] | None:
    """[index of the leader] (a list: index 0 must count as found), or None while there is none."""
    try:
        return [leader_index(c)]
    except (StopIteration, protocol.BackupError):
        return None


def test_a_frame_without_room_fails_alone_after_the_files_before_it_are_committed(make_cluster, tmp_path):
    """Nodes too small for a frame: its files get INSUFFICIENT_SPACE; the files of the frame before it, sent
    on the same node connections, are committed first (and survive a master restart), and the frame after
    it is stored."""
    from conftest import FAST_TIMING
    c2 = make_cluster(nodes=2, node_args=[*FAST_TIMING, "--capacity", "300000"])
    before = {f"room/a{i}": random_bytes(i, 1000) for i in range(10)}
    too_big = {f"room/b{i}": random_bytes(50 + i, 64 * 1024) for i in range(5)}
    with transport.Connection(master_address(c2), "client", 10.0) as conn:
        conn.send(files_frame(before))
        conn.send(files_frame(too_big, first_tag=10))
        conn.send(files_frame({"room/after": b"after"}, first_tag=15))
        conn.send(protocol.Sync())
        replies = [getattr(conn.recv(), "code", None) or "OK" for _ in range(17)]
    assert replies == ["OK"] * 10 + ["INSUFFICIENT_SPACE"] * 5 + ["OK", "OK"]
    c2.restart_master()
    c2.wait_nodes_alive(2)
    c = c2.client()
    try:
        for name, data in [*before.items(), ("room/after", b"after")]:
            assert read_back(c, name, tmp_path) == data
        assert not [e for e in c.list("room/b")]
    finally:
        c.close()


def test_an_old_master_without_upload_files_gets_every_file_one_by_one(shared, tmp_path, monkeypatch):
    """A master from before UPLOAD_FILES answers a batch with one ERROR UNKNOWN_OP: the client must not take
    the replies that follow for its other files (each file's outcome and version id are its own); it sends
    the files again one by one, and every file reads back."""
    tree = tmp_path / "old-master"
    expected = write_tree(tree, {"a": b"a" * 100, "b": b"b" * 2000, "c": random_bytes(5, 200_000), "d": b"d" * 10})
    monkeypatch.setitem(protocol._MESSAGES, "UPLOAD_FILES_UNKNOWN", protocol.UploadFiles)
    monkeypatch.setattr(protocol.UploadFiles, "OP", "UPLOAD_FILES_UNKNOWN")
    c = shared.client()
    try:
        summary = c.upload_tree(str(tree), "old-master")
        assert not summary.failures, summary.failures
        assert summary.files == len(expected)
        for name, data in expected.items():
            assert read_back(c, f"old-master/{name}", tmp_path) == data, name
            assert summary.versions[f"old-master/{name}"] == c.stat(f"old-master/{name}").version_id, name
    finally:
        c.close()
