"""Disk space: full disks, the reserve, compaction without room, space of failed uploads, status.

Unit tests run a ChunkStore or StorageNode on a FakeDisk (a size in bytes:
statvfs reports what the segment files leave free, a write past it fails
with ENOSPC) or a Master with no sockets.  One integration test puts each
node on a real 24 MiB ext4 filesystem (a loop mount; skipped where mounting
is not permitted), another bounds nodes by --capacity.
"""

import errno
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chunk_store  # noqa: E402
import cluster as cluster_module  # noqa: E402
import client as client_module  # noqa: E402
import config as config_module  # noqa: E402
import protocol  # noqa: E402
import storage_node  # noqa: E402
import transport  # noqa: E402
from chunk_store import ChunkStore  # noqa: E402
from conftest import FAST_MASTER, master_address, random_bytes, wait_until  # noqa: E402
from master import Master  # noqa: E402
from namespace import make_entry  # noqa: E402
from storage_node import StorageNode  # noqa: E402

SEED = 20261128
CS = 1024
RECORD_CHUNKS = 64  # one record: 64 KiB of payload, larger than the compaction margins
KIB, MIB = 1024, 1024 * 1024


class FakeDisk:
    """A filesystem of ``size`` bytes holding a store's segment files (and nothing else).

    ``statvfs`` says what the files leave free (like a real filesystem for an
    unprivileged writer); with ``install``, a write that does not fit fails
    with ENOSPC.  ``quota`` makes writes fail earlier than statvfs says
    (quotas, reserved blocks): a write may add at most that many bytes more.
    """

    def __init__(self, root, size=1 << 40):
        self.segments = os.path.join(str(root), chunk_store.SEGMENT_DIR)
        self.size = size
        self.quota = None

    def used(self) -> int:
        if not os.path.isdir(self.segments):
            return 0
        return sum(os.path.getsize(os.path.join(self.segments, n)) for n in os.listdir(self.segments))

    def free(self) -> int:
        return max(self.size - self.used(), 0)

    def statvfs(self, path):
        return SimpleNamespace(f_bavail=self.free(), f_frsize=1)

    def fill(self) -> None:
        """Leave no byte free."""
        self.size = self.used()

    def install(self, monkeypatch) -> None:
        real_write_all = chunk_store._write_all

        def write_all(fd, buffers):
            nbytes = sum(memoryview(b).nbytes for b in buffers)
            room = self.free() if self.quota is None else min(self.free(), self.quota)
            if nbytes > room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.quota is not None:
                self.quota -= nbytes
            real_write_all(fd, buffers)

        monkeypatch.setattr(chunk_store, "_write_all", write_all)


@pytest.fixture
def rng():
    print(f"seed {SEED}")
    return random.Random(SEED)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = FakeDisk(tmp_path)
    d.install(monkeypatch)
    return d


def put_record(store, rng, blob):
    payload = rng.randbytes(RECORD_CHUNKS * CS)
    store.put(blob, 0, RECORD_CHUNKS, CS, protocol.crcs_to_bytes(protocol.chunk_crcs(payload, CS)), payload)
    return payload


def snapshot(store):
    """Everything a reader can observe: every extent and its bytes."""
    return {(blob, first, count): store.get(blob, first, count)[2]
            for blob, extents in store.inventory().items() for first, count in extents}


# Three records per segment: a fourth would pass segment_max_bytes.
SEGMENT_BYTES = 3 * (RECORD_CHUNKS * (CS + 4) + 64) + 512


def three_segments(tmp_path, disk, rng, dead):
    """A store with blobs b0..b8 in segments 1-3 (three each), b9 in the active segment 4,
    the blobs in ``dead`` deleted, and a disk left with no byte free."""
    store = ChunkStore(str(tmp_path), segment_max_bytes=SEGMENT_BYTES, statvfs=disk.statvfs)
    for n in range(10):
        put_record(store, rng, f"b{n}")
    store.delete_blobs([f"b{n}" for n in dead])
    store.flush()
    assert [s["seg_no"] for s in store.segment_stats()] == [1, 2, 3, 4]
    disk.fill()
    return store


# --- compaction on a full disk ----------------------------------------------------------------------
def test_full_disk_compaction_reclaims_wholly_dead_segment_first(tmp_path, disk, rng, caplog):
    """With no byte free, the wholly dead (newest) segment goes first, and its space lets the half-dead older ones be copied."""
    store = three_segments(tmp_path, disk, rng, dead=[1, 2, 4, 5, 6, 7, 8])
    before, used = snapshot(store), disk.used()
    with caplog.at_level(logging.WARNING):
        result = store.compact()
    assert result["segments_compacted"] == 3 and result["postponed"] == []
    assert [s["seg_no"] for s in store.segment_stats()] == [4]
    assert snapshot(store) == before and disk.used() < used - 4 * RECORD_CHUNKS * CS
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a full disk"
    store.close()
    with ChunkStore(str(tmp_path), segment_max_bytes=SEGMENT_BYTES, statvfs=disk.statvfs) as store:
        assert snapshot(store) == before


def test_full_disk_compaction_shrinks_a_segment_from_its_end(tmp_path, disk, rng):
    """With no byte free and no wholly dead segment, a segment's dead tail is cut, then its live record moved, record by record."""
    store = three_segments(tmp_path, disk, rng, dead=[1, 2, 4, 5, 7, 8])  # b0, b3, b6 live at the segments' heads
    before, used = snapshot(store), disk.used()
    result = store.compact()
    assert result["segments_compacted"] == 3 and result["postponed"] == []
    assert result["bytes_reclaimed"] == used - disk.used() > 5 * RECORD_CHUNKS * CS
    assert snapshot(store) == before and store.used_bytes == disk.used()
    store.close()
    with ChunkStore(str(tmp_path), segment_max_bytes=SEGMENT_BYTES, statvfs=disk.statvfs) as store:
        assert snapshot(store) == before


def test_compaction_without_room_is_postponed_not_failed(tmp_path, disk, rng, caplog):
    """A segment whose live record cannot be moved (no room, live at its end) is postponed, logged once, never raised."""
    store = three_segments(tmp_path, disk, rng, dead=[0, 1])  # segment 1: b2 live at its end
    before = snapshot(store)
    with caplog.at_level(logging.WARNING, logger="chunk_store"):
        for _ in range(3):
            assert store.compact()["postponed"] == [1]
    warnings = [r for r in caplog.records if "postponed" in r.getMessage()]
    assert len(warnings) == 1 and not warnings[0].exc_info
    assert snapshot(store) == before
    disk.size += 2 * RECORD_CHUNKS * CS  # space freed elsewhere: compaction goes on by itself
    assert store.compact()["postponed"] == [] and [s["seg_no"] for s in store.segment_stats()] == [2, 3, 4]
    assert snapshot(store) == before
    store.close()


def test_enospc_midway_through_a_copy_keeps_every_chunk(tmp_path, disk, rng):
    """ENOSPC after statvfs showed room (a quota) stops the copy midway; nothing is lost, before or after reopen."""
    store = three_segments(tmp_path, disk, rng, dead=[])
    disk.size += 10 * MIB
    disk.quota = RECORD_CHUNKS * (CS + 4) + 64  # room for one record's copy, then ENOSPC
    before = snapshot(store)
    result = store.compact(min_dead_fraction=0.0)
    assert result["postponed"] and result["segments_compacted"] == 0
    assert snapshot(store) == before
    store.flush()
    store.close()
    with ChunkStore(str(tmp_path), segment_max_bytes=SEGMENT_BYTES, statvfs=disk.statvfs) as store:
        assert snapshot(store) == before
        disk.quota = None
        assert store.compact(min_dead_fraction=0.0)["segments_compacted"] == 3
        assert snapshot(store) == before


def test_mostly_dead_active_segment_is_rolled_for_compaction(tmp_path, rng):
    """roll_if_dead starts a new segment only when the active one is large and dead enough."""
    with ChunkStore(str(tmp_path), segment_max_bytes=64 * MIB) as store:
        for n in range(4):
            put_record(store, rng, f"b{n}")
        store.delete_blobs(["b0"])
        assert not store.roll_if_dead(0.5, 64 * KIB)  # a quarter dead
        store.delete_blobs(["b1", "b2"])
        assert not store.roll_if_dead(0.5, 1 * MIB)  # too small to bother
        assert store.roll_if_dead(0.5, 64 * KIB)
        assert store.compact()["segments_compacted"] == 1
        assert store.inventory() == {"b3": [(0, RECORD_CHUNKS)]} and store.used_bytes < 2 * RECORD_CHUNKS * CS


# --- the node: free space, full, deletes -------------------------------------------------------------
def make_node(tmp_path, disk, **config):
    config = config_module.Config(**{"capacity_bytes": 1 << 40, "reserve_bytes": 256 * KIB, **config})
    disk.segments = os.path.join(str(tmp_path), "chunks", chunk_store.SEGMENT_DIR)
    store = ChunkStore(os.path.join(str(tmp_path), "chunks"), config.segment_max_bytes, statvfs=disk.statvfs)
    return StorageNode(config, str(tmp_path), store=store)


def put_msg(rng, blob):
    payload = rng.randbytes(RECORD_CHUNKS * CS)
    return protocol.PutChunks(blob=blob, first=0, count=RECORD_CHUNKS, chunk_size=CS,
                              body=protocol.crcs_to_bytes(protocol.chunk_crcs(payload, CS)) + payload)


def test_node_offers_free_disk_space_less_reserve(tmp_path, disk, rng):
    """free_bytes is min(capacity - used, statvfs free - reserve); a batch past it is INSUFFICIENT_SPACE, not a write."""
    disk.size = 2 * MIB
    node = make_node(tmp_path, disk)
    assert node.free_bytes == disk.free() - 256 * KIB
    node.put(put_msg(rng, "b0"))
    assert node.free_bytes == disk.free() - 256 * KIB
    while node.free_bytes >= RECORD_CHUNKS * CS:
        node.put(put_msg(rng, f"b{node.store.blob_count}"))
    with pytest.raises(protocol.InsufficientSpace):
        node.put(put_msg(rng, "last"))
    assert disk.free() >= 256 * KIB - 4 * KIB, "the reserve is kept"
    capped = make_node(tmp_path / "capped", FakeDisk(tmp_path / "capped"), capacity_bytes=MIB)
    assert capped.free_bytes == MIB - capped.store.used_bytes
    node.store.close()
    capped.store.close()


def test_node_is_not_full_once_space_is_freed(tmp_path, disk, rng):
    """After ENOSPC, the node reports room again as soon as deletes and compaction free space (no 60 s wait)."""
    disk.size = 2 * MIB
    node = make_node(tmp_path, disk, reserve_bytes=0, segment_max_bytes=SEGMENT_BYTES)
    disk.quota = 4 * RECORD_CHUNKS * (CS + 4)  # the disk fails before statvfs says it is full
    with pytest.raises(protocol.InsufficientSpace):
        for n in range(10):
            node.put(put_msg(rng, f"b{n}"))
    assert node.full
    disk.quota = None
    node.store.delete_blobs([f"b{n}" for n in range(3)])
    node.store.compact()
    assert not node.full and node.free_bytes > 2 * RECORD_CHUNKS * CS
    node.store.close()


def test_delete_on_a_full_disk_frees_space(tmp_path, disk, rng):
    """A disk without room for a tombstone still deletes: the blobs are forgotten and compaction frees their space."""
    node = make_node(tmp_path, disk, segment_max_bytes=SEGMENT_BYTES)
    for n in range(7):
        node.put(put_msg(rng, f"b{n}"))
    node.store.flush()
    disk.fill()
    assert node.delete_blobs(["b0", "b1", "b2", "b4"]) == 4
    assert node.drop_range("b5", 0, RECORD_CHUNKS) == RECORD_CHUNKS
    used = disk.used()
    node.store.compact()
    assert sorted(node.store.inventory()) == ["b3", "b6"]
    assert disk.used() < used - 3 * RECORD_CHUNKS * CS
    node.store.close()


def test_full_node_reclaims_a_small_delete_in_a_large_segment(tmp_path, disk, rng):
    """On a full node, deleting one record of thirty (3% of the segment) gives its space back at the next pass."""
    node = make_node(tmp_path, disk, batch_bytes=RECORD_CHUNKS * CS, reserve_bytes=8 * RECORD_CHUNKS * CS)
    for n in range(30):
        node.put(put_msg(rng, f"b{n}"))
    node.store.flush()
    disk.size = disk.used() + 4 * RECORD_CHUNKS * CS  # room for copies, none for chunks: full
    assert node.free_bytes < RECORD_CHUNKS * CS and len(node.store.segment_stats()) == 1
    before = {f"b{n}": node.store.get(f"b{n}", 0, RECORD_CHUNKS)[2] for n in range(30) if n != 20}
    node.delete_blobs(["b20"])
    used = disk.used()
    node.compact_now()
    assert disk.used() <= used - RECORD_CHUNKS * CS, "the deleted record's space is still taken"
    assert all(node.store.get(blob, 0, RECORD_CHUNKS)[2] == data for blob, data in before.items())
    node.store.close()


def test_node_lately_full_reclaims_a_small_delete_although_an_aborted_upload_gave_it_room(tmp_path, disk, rng):
    """A node a write left without room for a batch stays eager: a batch's worth of an aborted upload coming back
    must not stop it reclaiming the files its user deletes to make room."""
    record = RECORD_CHUNKS * CS
    node = make_node(tmp_path, disk, batch_bytes=record, reserve_bytes=8 * record)
    for n in range(29):
        node.put(put_msg(rng, f"b{n}"))
    node.store.flush()
    disk.size = disk.used() + 8 * record + record + record // 2  # room for one more record, then full
    node.put(put_msg(rng, "b29"))
    node.store.flush()
    assert node.free_bytes < record and len(node.store.segment_stats()) == 1
    disk.size += 2 * record  # an aborted upload's space came back: room for a batch again
    assert node.free_bytes >= record and not node.full
    before = {f"b{n}": node.store.get(f"b{n}", 0, RECORD_CHUNKS)[2] for n in range(30) if n != 20}
    node.delete_blobs(["b20"])
    used = disk.used()
    node.compact_now()
    assert disk.used() <= used - record, "the deleted record's space is still taken"
    assert all(node.store.get(blob, 0, RECORD_CHUNKS)[2] == data for blob, data in before.items())
    node.store.close()


# --- the master: accounting and status ---------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_master(tmp_path):
    clock = Clock()
    master = Master(config_module.Config(dead_after_s=10.0, heartbeat_interval_s=1.0), str(tmp_path / "m"),
                    clock=clock)
    return master, clock


def join(master, node_id, used, free, port):
    master.register(protocol.Register(node_id=node_id, host="127.0.0.1", port=port, capacity_bytes=1 << 40,
                                      used_bytes=used, chunks=used // CS, free_bytes=free), "test")
    master.inventory(protocol.Inventory(node_id=node_id, blobs=[], done=True))


def heartbeat(master, node_id, used, free, put_seq):
    master.heartbeat(protocol.Heartbeat(node_id=node_id, used_bytes=used, chunks=used // CS,
                                        free_bytes=free, put_seq=put_seq))


def node_row(master, node_id):
    return next(n for n in master.status().nodes if n["id"] == node_id)


def test_placement_counts_each_stored_byte_once(tmp_path):
    """Bytes in flight, then acknowledged, then reported: free space counts them once at every step."""
    master, clock = make_master(tmp_path)
    try:
        join(master, "a", used=0, free=10 * MIB, port=9001)
        free = lambda: master._nodes["a"].free_bytes  # noqa: E731
        master.reserve("a", MIB)
        assert free() == 9 * MIB
        master.note_stored("a", seq=1, nbytes=MIB)  # PUT_OK read: no longer in flight
        assert free() == 9 * MIB and node_row(master, "a")["used_bytes"] == MIB
        clock.now += 1
        heartbeat(master, "a", used=0, free=10 * MIB, put_seq=0)  # a report from before that put
        assert free() == 9 * MIB and node_row(master, "a")["used_bytes"] == MIB
        heartbeat(master, "a", used=MIB, free=9 * MIB, put_seq=1)
        assert free() == 9 * MIB and node_row(master, "a")["used_bytes"] == MIB
        assert node_row(master, "a")["free_bytes"] == 9 * MIB
        assert node_row(master, "a")["usable_bytes"] == 10 * MIB
        assert node_row(master, "a")["capacity_bytes"] == 1 << 40  # what it offers, whatever its disk
    finally:
        master.stop()


def test_out_of_space_error_says_how_to_free_space(tmp_path):
    """INSUFFICIENT_SPACE to a client names purge and prune, what the trash holds, and that a delete frees nothing."""
    master, _ = make_master(tmp_path)
    try:
        entry = make_entry(4 * KIB, CS, "0" * 64, "v1", [[0, 4, ["a", "b"]]], 4)
        master.commit_uploads([("f", entry, None)])
        master.delete("f", "test")  # to the trash
        message = master.explain_no_space(protocol.InsufficientSpace("only 0 live node(s) have room")).message
        assert message.startswith("only 0 live node(s) have room. To free space: `delete --purge --yes NAME`"), message
        assert "`prune --keep-...`" in message and "frees nothing for 7 days" in message
        assert message.endswith("(4.0 KiB in the trash)"), message
        assert master.explain_no_space(protocol.InsufficientSpace(message)).message == message  # said once
        other = protocol.FileNotFound("no file named 'x'")
        assert master.explain_no_space(other) is other
    finally:
        master.stop()


def test_status_totals_leave_out_dead_nodes(tmp_path, capsys):
    """A dead node's bytes are not in the totals; they are shown apart, and status has capacity and free columns."""
    master, clock = make_master(tmp_path)
    try:
        join(master, "a", used=3 * MIB, free=5 * MIB, port=9001)
        join(master, "b", used=7 * MIB, free=1 * MIB, port=9002)
        clock.now += 8
        heartbeat(master, "a", used=3 * MIB, free=5 * MIB, put_seq=0)
        clock.now += 8  # b silent for 16 s > dead_after_s
        totals = master.status().totals
        assert (totals["used_bytes"], totals["free_bytes"], totals["usable_bytes"]) == (3 * MIB, 5 * MIB, 8 * MIB)
        assert (totals["dead_used_bytes"], totals["dead_chunks"]) == (7 * MIB, 7 * MIB // CS)
        fake_client = SimpleNamespace(status=master.status, health=master.monitor.health)
        assert client_module.cmd_status(fake_client, SimpleNamespace(json=False)) == client_module.EXIT_OK
        health_line, header, a, b, *rest = capsys.readouterr().out.splitlines()
        assert health_line.startswith("HEALTH_ERR INSUFFICIENT_NODES: 1 node alive"), health_line
        assert header.split()[4:8] == ["CAPACITY", "USED", "FREE", "CHUNKS"], header
        assert a.split()[2:] == ["alive", "8.0s", "ago", "8.0", "MiB", "3.0", "MiB", "5.0", "MiB", "3072",
                                 "0", "B"], a  # the last column: bytes in quarantine
        assert "DEAD" in b and "3.0 MiB in 3072 chunks, 5.0 MiB free of 8.0 MiB" in rest[0], rest
        assert "7.0 MiB in 7168 chunks" in rest[1], rest
    finally:
        master.stop()


# --- processes ---------------------------------------------------------------------------------------
def upload(cluster, tmp_path, name, data):
    """Upload with the CLI: its result (exit code, stderr)."""
    path = tmp_path / "up"
    path.write_bytes(data)
    try:
        return cluster.cli("upload", str(path), name, timeout_s=60)
    finally:
        path.unlink()


def try_upload(cluster, tmp_path, name, data):
    """Upload in-process (faster than the CLI): None if stored, else the error."""
    path = tmp_path / "up"
    path.write_bytes(data)
    c = cluster.client()
    try:
        c.upload_file(str(path), name)
        return None
    except protocol.BackupError as exc:
        return exc
    finally:
        c.close()
        path.unlink()


def node_used(cluster) -> list[int]:
    return [n["used_bytes"] for n in cluster.status().nodes]


def test_space_of_interrupted_and_failed_uploads_comes_back_at_once(make_cluster, tmp_path):
    """An upload cut off mid-stream, and one failed for lack of space, give their space back in seconds."""
    # Slow heartbeats: what status and placement know right after an upload
    # must not depend on a heartbeat happening to arrive in between.
    cluster = make_cluster(nodes=3, master_args=["--heartbeat-interval", "2", "--dead-after", "8", "--io-timeout", "5"],
                           node_args=["--heartbeat-interval", "2", "--io-timeout", "5", "--capacity", str(8 * MIB)])
    assert try_upload(cluster, tmp_path, "small", random_bytes(SEED, MIB)) is None
    baseline = sum(node_used(cluster))
    assert baseline >= 2 * MIB, "USED counts an upload at once"

    conn = transport.Connection(master_address(cluster), "client", 10.0)
    conn.send(protocol.UploadBegin(name="cut", size=8 * MIB))
    for i in range(4):
        conn.send(protocol.Data(body=random_bytes(SEED + i, MIB)))
    wait_until(lambda: sum(node_used(cluster)) >= baseline + 6 * MIB, 10.0, message="the cut upload on the nodes")
    conn.close()
    started = time.monotonic()
    wait_until(lambda: sum(node_used(cluster)) <= baseline + 64 * KIB, 10.0, interval_s=0.2,
               message="the space of the cut upload reclaimed")
    print(f"\nspace of an interrupted upload reclaimed after {time.monotonic() - started:.1f} s")

    error = try_upload(cluster, tmp_path, "thirty.bin", random_bytes(SEED + 10, 20 * MIB))
    assert isinstance(error, protocol.InsufficientSpace), error
    started = time.monotonic()
    wait_until(lambda: try_upload(cluster, tmp_path, "after", random_bytes(SEED + 11, 6 * MIB)) is None,
               10.0, interval_s=0.3, message="a 6 MiB upload after the failed one")
    print(f"space of a failed 20 MiB upload reusable after {time.monotonic() - started:.1f} s")
    with open(os.path.join(cluster.log_dir, "master.log"), encoding="utf-8") as f:
        log = f.read()
    assert "upload of new file 'thirty.bin' failed" in log and "replace of 'thirty.bin'" not in log


# --- real small filesystems --------------------------------------------------------------------------
@pytest.fixture
def small_filesystems(tmp_path):
    """Factory: mount a fresh ``size_mib`` MiB ext4 filesystem (a loop device) at a directory.

    Skips the test where that is not possible (not root, no mkfs.ext4, no
    loop devices, mount refused); every mount is undone in the finalizer.
    """
    mounted = []
    images = []

    def mount(path, size_mib: int = 24) -> None:
        if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("mount"):
            pytest.skip("loop-mounting a filesystem needs root and mkfs.ext4")
        image = f"{path}.img"
        images.append(image)
        os.makedirs(path, exist_ok=True)
        with open(image, "wb") as f:
            f.truncate(size_mib * MIB)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", image], capture_output=True)
        if made.returncode == 0:
            made = subprocess.run(["mount", "-o", "loop", image, path], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot loop-mount a filesystem here: {made.stderr.decode(errors='replace').strip()}")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)  # still busy: detach it now
    for image in images:
        if os.path.exists(image):
            os.unlink(image)


def disk_free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_full_small_disks_fail_with_insufficient_space_and_recover(small_filesystems, make_cluster, tmp_path):
    """Nodes on 24 MiB filesystems: uploads past the space fail INSUFFICIENT_SPACE (never UNAVAILABLE); deleting half frees space at once."""
    node_dirs = [str(tmp_path / "cluster0" / cluster_module.LocalCluster.node_name(i)) for i in range(3)]
    for path in node_dirs:
        small_filesystems(path)
    cluster = make_cluster(nodes=3)  # default config: 64 MiB segments, 4 MiB reserve
    assert [cluster.node_data_dir(i) for i in range(3)] == node_dirs
    stored, failures = [], []
    for i in range(40):
        error = try_upload(cluster, tmp_path, f"f{i}", random_bytes(SEED + i, 1200 * KIB))
        if error is None:
            stored.append(f"f{i}")
        else:
            failures.append(error)
            if len(failures) == 3:
                break
    assert len(stored) >= 15, f"only {len(stored)} files of 1.2 MiB fit on three 24 MiB disks"
    assert failures and all(isinstance(e, protocol.InsufficientSpace) for e in failures), failures
    # Larger than what is left (a failed upload's space comes back at once, so a small one may fit).
    result = upload(cluster, tmp_path, "one-more", random_bytes(SEED, 8 * MIB))
    assert result.returncode == client_module.EXIT_INSUFFICIENT_SPACE, result
    full_free = [disk_free(path) for path in node_dirs]

    c = cluster.client()
    try:
        for name in stored[::2]:
            c.delete(name, purge=True)  # not to the trash: free the space now
    finally:
        c.close()
    started = time.monotonic()
    wait_until(lambda: try_upload(cluster, tmp_path, "again", random_bytes(SEED, 3 * MIB)) is None, 15.0,
               interval_s=0.3, message="an upload after deleting half the files")
    print(f"\nupload possible again {time.monotonic() - started:.1f} s after deleting {len(stored[::2])} "
          f"of {len(stored)} files; free before {full_free}, after {[disk_free(p) for p in node_dirs]}")
    # Every node that was left without room for one more batch (1 MiB, the node's own rule; it logs when
    # that starts) gets space back: it compacts any segment holding a batch of dead bytes for a minute
    # after, even if an aborted upload's space has since given it a little room.  The test cannot tell
    # that from free space read between uploads: the space of the batches a failed upload wrote is back
    # by then.  A node that always had room compacts only once a segment passes compact_dead_fraction:
    # with few of the deleted files placed on it, it may keep them until then.  An upload fits as soon
    # as two disks have room; the others may give their space back a moment later.
    full = [p for i, p in enumerate(node_dirs) if storage_node.LOW_ROOM_MESSAGE in node_log(cluster, i)]
    assert len(full) >= 2, f"at most one node was ever without room for a batch, yet uploads failed: {full_free}"
    wait_until(lambda: all(disk_free(p) > free + MIB for p, free in zip(node_dirs, full_free) if p in full), 15.0,
               message=f"every full disk got space back (free when full {full_free})")
    c = cluster.client()
    try:
        for name in stored[1::2]:
            c.download(name, str(tmp_path / "down"), force=True)
    finally:
        c.close()
    for i in range(3):
        assert "Traceback" not in node_log(cluster, i), f"{cluster.node_name(i)} logged a traceback"


def node_log(cluster, i: int) -> str:
    with open(os.path.join(cluster.log_dir, f"{cluster.node_name(i)}.log"), encoding="utf-8") as f:
        return f.read()


def test_full_disks_with_the_trash_on_purge_and_expiry_free_space(small_filesystems, make_cluster, tmp_path):
    """Full 24 MiB disks, trash on: the error says how to free space; purging a trashed file and trash expiry
    free it."""
    node_dirs = [str(tmp_path / "cluster0" / cluster_module.LocalCluster.node_name(i)) for i in range(2)]
    for path in node_dirs:
        small_filesystems(path)
    trash_s = 3.0
    cluster = make_cluster(nodes=2, master_args=[*FAST_MASTER, "--trash-days", str(trash_s / 86400)])
    stored = []
    for i in range(40):
        error = try_upload(cluster, tmp_path, f"f{i}", random_bytes(SEED + i, 1200 * KIB))
        if error is not None:
            break
        stored.append(f"f{i}")
    assert isinstance(error, protocol.InsufficientSpace), error
    result = upload(cluster, tmp_path, "one-more", random_bytes(SEED, 3 * MIB))
    assert result.returncode == client_module.EXIT_INSUFFICIENT_SPACE, result
    assert "To free space: `delete --purge --yes NAME`" in result.stderr and "prune" in result.stderr, result
    full_free = [disk_free(path) for path in node_dirs]
    print(f"\n{len(stored)} files stored; free when full {full_free}")

    c = cluster.client()
    try:
        c.delete(stored[0])  # to the trash: frees nothing yet
        c.delete(stored[0], purge=True)  # a name only in the trash can be purged
        purged_at = time.monotonic()
        wait_until(lambda: try_upload(cluster, tmp_path, "after-purge", random_bytes(SEED, 800 * KIB)) is None,
                   10.0, interval_s=0.3, message="an upload after purging one trashed file")
        print(f"upload possible {time.monotonic() - purged_at:.1f} s after the purge")
        for name in stored[1::2]:
            c.delete(name)
        deleted_at = time.monotonic()
        before_expiry = [disk_free(path) for path in node_dirs]
        wait_until(lambda: not c.trash(), 4 * trash_s, interval_s=0.3, message="the trash expired")
        wait_until(lambda: all(disk_free(p) > free + 4 * MIB for p, free in zip(node_dirs, before_expiry)),
                   10.0, interval_s=0.3, message="the expired trash's space back on every disk")
        print(f"space of {len(stored[1::2])} expired files back {time.monotonic() - deleted_at:.1f} s after "
              f"their delete (trash_days = {trash_s:g} s): free {[disk_free(p) for p in node_dirs]}")
    finally:
        c.close()
