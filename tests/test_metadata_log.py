"""Tests for metadata_log: replay, torn tails, corruption, checkpoints, crashes, group commit."""

import errno
import json
import os
import stat
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metadata_log import (  # noqa: E402
    MetadataCorrupt, MetadataLog, MetadataLogFailed, atomic_write_json)


class KVState:
    """A dict name -> value; apply() asserts it sees every index exactly once, in order."""

    def __init__(self):
        self.data = {}
        self.last_i = 0
        self.applied = 0  # records applied by this object (not restored)

    def apply(self, record):
        assert record["i"] == self.last_i + 1, f"apply {record['i']} after {self.last_i}"
        self.last_i = record["i"]
        self.applied += 1
        if record["op"] == "set":
            self.data[record["k"]] = record["v"]
        elif record["op"] == "del":
            self.data.pop(record["k"], None)

    def snapshot(self):
        return {"data": dict(self.data), "last_i": self.last_i}

    def restore(self, snapshot):
        self.data = dict(snapshot["data"])
        self.last_i = snapshot["last_i"]


class CountingFsync:
    """An fsync seam that counts calls, can simulate disk latency and can fail with EIO."""

    def __init__(self, delay_s=0.0):
        self.calls = 0
        self.delay_s = delay_s
        self.fail = False
        self._lock = threading.Lock()

    def __call__(self, fd):
        with self._lock:
            self.calls += 1
        if self.fail:
            raise OSError(errno.EIO, "injected I/O error")
        if self.delay_s:
            time.sleep(self.delay_s)
        os.fsync(fd)


def open_log(path, **kwargs):
    state = KVState()
    log = MetadataLog(str(path), state, **kwargs)
    log.open()
    return log, state


def put(log, key, value="v"):
    return log.commit([{"op": "set", "k": key, "v": value}])


def log_files(path):
    return sorted(n for n in os.listdir(path) if n.startswith("oplog-"))


def fill(path, count):
    """Commit ``count`` records (with a delete) into a fresh log; return the final data."""
    log, state = open_log(path)
    for n in range(count):
        put(log, f"k{n}", n)
    log.commit([{"op": "del", "k": "k0"}])
    log.close()
    return dict(state.data)


def test_commit_then_reopen_replays_everything(tmp_path):
    """Reopening replays every committed record: same state, same index."""
    log, state = open_log(tmp_path)
    assert put(log, "a", 1) == 1
    assert log.commit([{"op": "set", "k": "b", "v": "é"}, {"op": "del", "k": "a"}]) == 3
    log.close()
    log2, state2 = open_log(tmp_path)
    assert (state2.data, log2.index) == (state.data, 3) == ({"b": "é"}, 3)


def test_files_are_private(tmp_path):
    """The data dir is created 0o700 and log and checkpoint files 0o600."""
    log, _ = open_log(tmp_path / "meta")
    put(log, "a")
    log.checkpoint()
    assert stat.S_IMODE(os.stat(tmp_path / "meta").st_mode) == 0o700
    for name in os.listdir(tmp_path / "meta"):
        assert stat.S_IMODE(os.stat(tmp_path / "meta" / name).st_mode) == 0o600


@pytest.mark.parametrize("cut", [1, 10, -2, -1])
def test_torn_last_line_is_cut_off(tmp_path, cut):
    """A last line truncated mid-record is dropped and cut, and the log keeps working."""
    expected = fill(tmp_path, 5)  # records 1..6, the last one deletes k0
    path = tmp_path / log_files(tmp_path)[0]
    content = path.read_bytes()
    last_start = content.rindex(b"\n", 0, len(content) - 1) + 1
    path.write_bytes(content[:last_start + cut] if cut > 0 else content[:cut])
    log, state = open_log(tmp_path)
    assert log.index == 5 and state.data == dict(expected, k0=0)
    assert path.stat().st_size == last_start
    put(log, "after")
    log.close()
    log2, state2 = open_log(tmp_path)
    assert log2.index == 6 and state2.data == dict(expected, k0=0, after="v")


@pytest.mark.parametrize("garbage", [b'{"op":"se', b"\x00\x00\x00\x00", b"not json\n"])
def test_garbage_tail_is_cut_off(tmp_path, garbage):
    """Garbage after the last complete record (with or without newline) is dropped and cut."""
    expected = fill(tmp_path, 3)
    path = tmp_path / log_files(tmp_path)[0]
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(garbage)
    log, state = open_log(tmp_path)
    assert (log.index, state.data, path.stat().st_size) == (4, expected, size)


def test_corrupt_line_in_middle_raises(tmp_path):
    """A bad line that is not the last one is corruption, reported with file and line."""
    fill(tmp_path, 5)
    path = tmp_path / log_files(tmp_path)[0]
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"{garbage\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(MetadataCorrupt, match=r"oplog-000000000001\.jsonl:3"):
        open_log(tmp_path)


def test_index_gap_raises(tmp_path):
    """A missing record (a gap in "i") is corruption, not something to skip."""
    fill(tmp_path, 5)
    path = tmp_path / log_files(tmp_path)[0]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    with pytest.raises(MetadataCorrupt, match="expected 3"):
        open_log(tmp_path)


def test_torn_line_in_older_log_file_raises(tmp_path):
    """Only the last line of the last file may be torn; a torn older file is corruption."""
    (tmp_path / "oplog-000000000001.jsonl").write_bytes(
        b'{"op":"set","k":"a","v":1,"i":1}\n{"op":"set","k"')
    (tmp_path / "oplog-000000000002.jsonl").write_bytes(b'{"op":"set","k":"b","v":2,"i":2}\n')
    with pytest.raises(MetadataCorrupt, match=r"oplog-000000000001\.jsonl:2"):
        open_log(tmp_path)


def test_checkpoint_then_commits_then_reopen(tmp_path):
    """After a checkpoint old logs are gone and reopen = checkpoint + the newer records."""
    log, state = open_log(tmp_path)
    for n in range(20):
        put(log, f"k{n}", n)
    log.checkpoint()
    assert log_files(tmp_path) == ["oplog-000000000021.jsonl"]
    for n in range(5):
        put(log, f"new{n}", n)
    log.close()
    log2, state2 = open_log(tmp_path)
    assert (log2.index, state2.data) == (25, state.data)
    assert state2.applied == 5  # only the records after the checkpoint were replayed


def test_crash_leaving_tmp_checkpoint_is_ignored(tmp_path):
    """A half-written metadata.json.tmp beside the old logs is removed; no record is lost."""
    expected = fill(tmp_path, 9)  # records 1..10
    # Crash mid-checkpoint: rotation done, tmp file partly written, no rename.
    (tmp_path / "oplog-000000000011.jsonl").touch(mode=0o600)
    (tmp_path / "metadata.json.tmp").write_bytes(b'{"format":1,"index":10,"sta')
    log, state = open_log(tmp_path)
    assert (log.index, state.data) == (10, expected)
    assert not (tmp_path / "metadata.json.tmp").exists()
    put(log, "after")
    log.close()
    assert open_log(tmp_path)[1].data == dict(expected, after="v")


def test_crash_before_old_logs_deleted_skips_covered_records(tmp_path):
    """Old log files left beside a newer checkpoint are skipped, never applied twice."""
    fill(tmp_path, 9)  # records 1..10
    old = {n: (tmp_path / n).read_bytes() for n in log_files(tmp_path)}
    log, state = open_log(tmp_path)
    log.checkpoint()
    put(log, "after")
    log.close()
    for name, content in old.items():  # "crash" before the old files were deleted
        (tmp_path / name).write_bytes(content)
    log2, state2 = open_log(tmp_path)  # KVState.apply asserts on a double apply
    assert (log2.index, state2.data, state2.applied) == (11, dict(state.data), 1)


def test_group_commit_shares_fsyncs(tmp_path):
    """16 threads x 50 commits: indexes 1..800 applied exactly once with fewer fsyncs."""
    fsync = CountingFsync(delay_s=0.0005)  # a disk that takes its time, like a real one
    log, state = open_log(tmp_path, fsync=fsync)
    fsync.calls = 0
    indexes, barrier = [], threading.Barrier(16)

    def worker(t):
        barrier.wait()
        for n in range(50):
            indexes.append(put(log, f"t{t}-{n}", n))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(indexes) == list(range(1, 801))
    assert state.applied == 800 and len(state.data) == 800 and log.index == 800
    print(f"\n800 commits, {fsync.calls} fsyncs")
    assert fsync.calls < 800
    log.close()
    assert open_log(tmp_path)[1].data == state.data


def test_automatic_checkpoint(tmp_path):
    """Crossing checkpoint_every records starts a background checkpoint."""
    log, state = open_log(tmp_path, checkpoint_every=10)
    for n in range(25):
        put(log, f"k{n}", n)
    checkpoint = tmp_path / "metadata.json"
    deadline = time.monotonic() + 5
    while not (checkpoint.exists() and json.loads(checkpoint.read_bytes())["index"] >= 10):
        assert time.monotonic() < deadline, "no automatic checkpoint"
        time.sleep(0.01)
    log.close()
    assert open_log(tmp_path)[1].data == state.data


def test_failed_fsync_fails_the_log(tmp_path):
    """An fsync error fails the commit, applies nothing, and fails every later commit."""
    fsync = CountingFsync()
    log, state = open_log(tmp_path, fsync=fsync)
    put(log, "a")
    fsync.fail = True
    with pytest.raises(MetadataLogFailed):
        put(log, "b")
    fsync.fail = False  # the disk "recovers", but we can no longer know what is durable
    with pytest.raises(MetadataLogFailed):
        put(log, "c")
    with pytest.raises(MetadataLogFailed):
        log.checkpoint()
    assert (log.index, state.data) == (1, {"a": "v"})


def test_atomic_write_json_replaces_file(tmp_path):
    """atomic_write_json leaves the new content, no tmp file, and mode 0o600."""
    path = tmp_path / "node_id.json"
    atomic_write_json(str(path), {"node_id": "old"})
    atomic_write_json(str(path), {"node_id": "nöde"})
    assert json.loads(path.read_bytes()) == {"node_id": "nöde"}
    assert os.listdir(tmp_path) == ["node_id.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reopen_100k_records(tmp_path):
    """Replaying 100,000 records of ~200 bytes is fast (time printed, sanity bound 10 s)."""
    log, state = open_log(tmp_path, checkpoint_every=10**9)
    pad = "x" * 150
    for batch in range(100):
        log.commit([{"op": "set", "k": f"key-{batch:03d}-{n:04d}", "v": pad}
                    for n in range(1000)])
    log.close()
    size = sum(os.path.getsize(tmp_path / n) for n in log_files(tmp_path))
    started = time.perf_counter()
    log2, state2 = open_log(tmp_path)
    elapsed = time.perf_counter() - started
    print(f"\nopen() replayed 100,000 records ({size / 100_000:.0f} B each) in {elapsed:.3f} s")
    assert log2.index == 100_000 and state2.data == state.data
    assert elapsed < 10
