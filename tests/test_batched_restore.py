"""Directory restores by batched direct reads (issue 15): READ_PLANS, bursts of GET_CHUNKS, a writer thread."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import deque

import pytest

import cli
import protocol
import transfers
from conftest import IO_TIMEOUT_S, flip_byte, payload_locations, random_bytes, wait_until
from test_direct_reads import new_client, node_index, plan_of, start_secure_cluster

KIB = 1024
MIB = 1024 * KIB


# --- pure parts -------------------------------------------------------------------------------
def test_a_plan_in_a_page_is_checked_like_a_frame_and_an_error_entry_is_that_files_alone():
    """plan_from_page builds a READ_PLAN with the page's nodes and expiry, returns a file's error, refuses malformed entries."""
    page = protocol.ReadPlansPage(plans=[], nodes={"n1": "127.0.0.1:1"}, expires=99.0, done=True)
    fields = {"read_id": "r.0", "name": "t/a", "size": 5, "chunks": 1, "sha256": "0" * 64, "mtime": 1.0,
              "version": "v", "offset": 0, "length": 5, "chunk_size": 1024, "batch_chunks": 1024, "first_chunk": 0,
              "runs": [[0, 1, ["n1"], "v"]], "caps": {"v": ""}}
    plan = protocol.plan_from_page(dict(fields), page)
    assert (plan.name, plan.nodes, plan.expires, plan.more) == ("t/a", {"n1": "127.0.0.1:1"}, 99.0, None)
    error = protocol.plan_from_page({"name": "t/b", "error": "FILE_NOT_FOUND", "message": "gone"}, page)
    assert isinstance(error, protocol.FileNotFound) and error.message == "gone"
    for bad in ({**fields, "size": "5"}, {**fields, "extra": 1}, {k: v for k, v in fields.items() if k != "runs"},
                {"name": "t/b", "error": 3, "message": "x"}, ["not", "an", "object"]):
        with pytest.raises(protocol.RemoteProtocolError):
            protocol.plan_from_page(bad, page)


def test_restore_batches_hold_at_most_plan_files_plan_bytes_and_a_page_of_names():
    """READ_PLANS requests are cut at PLAN_FILES files, at PLAN_BYTES of data (a larger file alone) and at a page of names; every file once, in order."""
    small = [(f"s{i}", "", None, 4 * KIB) for i in range(600)]
    big = [(f"b{i}", "", 7, cli.PLAN_BYTES // 3 + 1) for i in range(5)] + [("huge", "", None, 2 * cli.PLAN_BYTES)]
    long_names = [("n" * 1000 + str(i), "", None, 1) for i in range(100)]
    todo = small + big + long_names
    batches = list(cli.Client._plan_batches(todo))
    assert [p for batch in batches for p in batch] == list(range(len(todo)))
    assert [len(batch) for batch in batches[:2]] == [cli.PLAN_FILES, cli.PLAN_FILES]
    assert [len(small) + 5] in batches  # "huge" alone
    assert max(sum(todo[p][0].startswith("b") for p in batch) for batch in batches) == 2
    assert max(sum(todo[p][0].startswith("n") for p in batch) for batch in batches) < 66  # a page of names
    for batch in batches:
        assert len(batch) <= cli.PLAN_FILES
        assert len(batch) == 1 or sum(todo[p][3] for p in batch) <= cli.PLAN_BYTES
        assert protocol.json_size([[todo[p][0], todo[p][2]] for p in batch]) <= protocol.PAGE_BYTES


class _Pool:
    """Stands in for the client's ReplicaPool: connections that answer from ``files``, and log every send."""

    def __init__(self, files: dict, chunk_size: int):
        self.files, self.chunk_size = files, chunk_size
        self.conns = {}
        self.sends = []  # (node id, requests in that send)
        self.most_in_flight = 0  # requests sent and not answered, at most, over all nodes

    def acquire(self, node_id):
        return self.conns.setdefault(node_id, _Conn(node_id, self))

    def release(self, conn):
        pass

    def get_chunks(self, blob, first, count):
        return protocol.GetChunks(blob=blob, first=first, count=count)


class _Conn:
    def __init__(self, node_id, pool):
        self.peer_id, self.pool, self.broken = node_id, pool, False
        self.queued, self.sent = [], deque()

    def send(self, msg, flush=True):
        self.queued.append(msg)
        if flush:
            self.flush()

    def flush(self):
        if self.queued:
            self.pool.sends.append((self.peer_id, len(self.queued)))
            self.sent.extend(self.queued)
            self.queued = []
            in_flight = sum(len(conn.sent) for conn in self.pool.conns.values())
            self.pool.most_in_flight = max(self.pool.most_in_flight, in_flight)

    def expect(self, cls, body_buffer=None):
        msg = self.sent.popleft()  # IndexError: a reply awaited for a request never sent (left unflushed)
        size = self.pool.chunk_size
        payload = self.pool.files[msg.blob][msg.first * size:(msg.first + msg.count) * size]
        body = protocol.crcs_to_bytes(protocol.chunk_crcs(payload, size)) + payload
        body_buffer[:len(body)] = body
        return protocol.ChunkData(blob=msg.blob, first=msg.first, count=msg.count, chunk_size=size,
                                  body=memoryview(body_buffer)[:len(body)])


class _Reader:
    def __init__(self, pool):
        self.pool = pool

    def read_order(self, node_ids):
        return list(node_ids)


def _read_all(files: dict, chunk_size: int, batch_chunks: int):
    """read_ranges over ``files`` (blob == name, one run on n1/n2 or n2/n3): (bytes per file, the pool)."""
    pool = _Pool(files, chunk_size)
    nodes = ["n1", "n2", "n3"]
    reads = []
    for index, (name, data) in enumerate(files.items()):
        chunks = -(-len(data) // chunk_size)
        entry = {"size": len(data), "chunks": chunks, "version": name, "chunk_size": chunk_size,
                 "batch_chunks": batch_chunks, "runs": [[0, chunks, [nodes[index % 3], nodes[(index + 1) % 3]]]]}
        reads.append((name, name, entry, 0, len(data)))
    got = {name: b"" for name in files}
    for key, item in transfers.read_ranges(_Reader(pool), reads):
        assert not isinstance(item, BaseException), item
        if item is not None:
            got[key] += bytes(item)
    return got, pool


def test_small_pieces_are_requested_in_bursts_and_large_ones_stay_read_ahead_deep():
    """Many small files: GET_CHUNKS leave in bursts, several per send and node, every reply exact; 1 MiB pieces: READ_AHEAD + 1 in flight, as before."""
    rng = random.Random(1515)
    small = {f"s{i:03d}": rng.randbytes(4 * KIB - i) for i in range(300)}
    got, pool = _read_all(small, KIB, 1024)
    assert got == small
    requests = sum(n for _, n in pool.sends)
    assert requests == 300
    assert len(pool.sends) <= requests / 4, f"{len(pool.sends)} sends for {requests} requests: not batched"
    assert pool.most_in_flight == transfers.READ_AHEAD_SMALL

    large = {f"l{i}": rng.randbytes(3 * MIB + i) for i in range(2)}
    got, pool = _read_all(large, 4 * KIB, 256)  # 1 MiB pieces
    assert got == large
    # The window refilled piece by piece: never more than READ_AHEAD + 1 ahead.
    assert pool.most_in_flight == transfers.READ_AHEAD + 1
    pieces = sum(-(-len(data) // MIB) for data in large.values())
    assert sum(n for _, n in pool.sends) == pieces and len(pool.sends) >= pieces - transfers.READ_AHEAD


# --- real processes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def restore_cluster(tmp_path_factory):
    """A secure cluster of its own (its nodes are stopped and killed), holding the tree ``r/``."""
    directory = tmp_path_factory.mktemp("batched-restore")
    c = start_secure_cluster(directory)
    tree = directory / "tree"
    tree.mkdir()
    files = {f"f{i:02d}": random_bytes(1600 + i, 3000 + 37 * i) for i in range(40)}
    files["big"] = random_bytes(1650, 2 * MIB + 5)  # two runs, two pieces
    files["empty"] = b""
    for name, data in files.items():
        (tree / name).write_bytes(data)
    client = new_client(c)
    try:
        assert not client.upload_tree(str(tree), "r/").failures
    finally:
        client.close()
    c.files = files
    yield c
    c.stop()


def restored(path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def restored_files(path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def test_a_file_gone_from_the_master_fails_alone_and_an_old_master_relays_the_restore(restore_cluster, tmp_path,
                                                                                     monkeypatch):
    """A name the master no longer has gets its error in the READ_PLANS reply and the rest restore; a master that does not know READ_PLANS (UNKNOWN_OP) has the restore relayed."""
    cluster, files = restore_cluster, restore_cluster.files
    entries = [{"name": f"r/{name}"} for name in sorted(files)] + [{"name": "r/zz-gone"}]
    c = new_client(cluster)
    try:
        summary = c.download_tree("r/", str(tmp_path / "one"), entries=entries)
    finally:
        c.close()
    assert [(name, reason.split(":")[0]) for name, reason in summary.failures] == [("r/zz-gone", "FILE_NOT_FOUND")]
    assert restored(tmp_path / "one") == files
    assert not [p for p in (tmp_path / "one").iterdir() if p.name.endswith(cli._TEMP_SUFFIX)]

    # An old master: the op it does not know (as READ_PLANS is to a master from before it).
    monkeypatch.setitem(protocol._MESSAGES, "READ_PLANS_UNKNOWN", protocol.ReadPlans)
    monkeypatch.setattr(protocol.ReadPlans, "OP", "READ_PLANS_UNKNOWN")
    c = new_client(cluster)
    try:
        summary = c.download_tree("r/", str(tmp_path / "two"))
        assert not c.replicas._idle, "a node was read: the restore was not relayed"
    finally:
        c.close()
    assert not summary.failures, summary.failures
    assert restored(tmp_path / "two") == files


def test_files_that_cannot_be_written_fail_alone_in_the_writer_thread(restore_cluster, tmp_path, monkeypatch):
    """In a batched restore a file the writer thread cannot create, or that is in the way, is named with why; the others restore, no temporary file is left."""
    cluster, files = restore_cluster, restore_cluster.files
    out = tmp_path / "out"
    out.mkdir()
    (out / "f03").mkdir()  # a directory in the way (found before anything is read)
    real_open_temp = cli.open_temp_beside

    def open_temp(destination):
        if os.path.basename(destination) in ("f05", "f20"):
            raise cli.LocalFileError(f"cannot write in {os.path.dirname(destination)}: test refuses")
        return real_open_temp(destination)

    monkeypatch.setattr(cli, "open_temp_beside", open_temp)
    c = new_client(cluster)
    try:
        summary = c.download_tree("r/", str(out))
    finally:
        c.close()
    assert sorted(name for name, _ in summary.failures) == ["r/f03", "r/f05", "r/f20"]
    assert "test refuses" in dict(summary.failures)["r/f05"]
    assert (out / "f03").is_dir()
    assert restored_files(out) == {name: data for name, data in files.items() if name not in ("f03", "f05", "f20")}
    assert summary.files == len(files) - 3


def test_batched_restore_reads_around_a_corrupt_then_a_hung_then_a_killed_node(restore_cluster, tmp_path):
    """A tree restore by READ_PLANS: copies corrupt on the replica read first are read elsewhere and reported (the master checks and repairs them); a SIGSTOPped node costs one io_timeout; a SIGKILLed one nothing. Every file is exact."""
    cluster, files = restore_cluster, restore_cluster.files
    seed = 1516
    c = new_client(cluster)
    try:
        plans = {name: plan_of(c, f"r/{name}") for name in files if files[name] and name != "big"}
    finally:
        c.close()
    firsts = [plan.runs[0][2][0] for plan in plans.values()]
    victim = max(set(firsts), key=firsts.count)  # the replica read first of the most files
    index = node_index(cluster, victim)

    # 1. Three small files corrupt on the replica read first.
    damaged = [name for name, plan in plans.items() if plan.runs[0][2][0] == victim][:3]
    rng = random.Random(seed)
    for name in damaged:
        blob = plans[name].runs[0][3]
        path, _, payload_offset, _ = payload_locations(cluster, index, blob)[0]
        flip_byte(path, payload_offset + rng.randrange(len(files[name])))
    found_before = cluster.status().totals["corrupt_replicas_found"]
    c = new_client(cluster)
    try:
        summary = c.download_tree("r/", str(tmp_path / "one"))
    finally:
        c.close()
    assert not summary.failures, summary.failures
    assert restored(tmp_path / "one") == files, f"corrupt copies (seed {seed})"
    # Reported in READ_END; the master read each copy itself before answering it.
    assert cluster.status().totals["corrupt_replicas_found"] == found_before + len(damaged)
    wait_until(lambda: (lambda t: not (t["under_replicated_chunks"] or t["repairs_pending"]))(
        cluster.status().totals), 15.0, message="the corrupt copies repaired")

    # 2. The replica read first is hung for the whole restore: one io_timeout, then the others.
    cluster.nodes[index].signal(signal.SIGSTOP)
    c = new_client(cluster)
    try:
        started = time.monotonic()
        summary = c.download_tree("r/", str(tmp_path / "two"))
        elapsed = time.monotonic() - started
        assert not c.replicas.reachable(victim), "the hung node was never tried"
    finally:
        c.close()
        cluster.nodes[index].signal(signal.SIGCONT)
    assert not summary.failures, summary.failures
    assert restored(tmp_path / "two") == files, f"hung node (seed {seed})"
    assert elapsed < IO_TIMEOUT_S + 3.0, f"took {elapsed:.1f} s with node {victim} hung"

    # 3. Killed.
    cluster.nodes[index].kill()
    c = new_client(cluster)
    try:
        summary = c.download_tree("r/", str(tmp_path / "three"))
    finally:
        c.close()
    assert not summary.failures, summary.failures
    assert restored(tmp_path / "three") == files, f"killed node (seed {seed})"
