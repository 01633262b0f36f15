"""Tests for meta.log_store: round trips, one fsync per batch, torn tails, corruption, crash points."""

import errno
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meta.log_store import LogCorrupt, LogStore, encode_line  # noqa: E402
from meta.messages import CONFIG, DATA, NOOP, Entry, HardState, Membership  # noqa: E402


def entries(first, last, term=1):
    return [Entry(i, term, DATA, {"op": "put", "name": f"f{i}", "n": i}) for i in range(first, last + 1)]


def segment_paths(path):
    return sorted(str(p) for p in path.glob("raftlog-*.log"))


class CountingFsync:
    """Counts fsyncs; raises EIO at call number ``fail_at`` (1-based) to stop an operation there."""

    def __init__(self, fail_at=None):
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, fd):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.EIO, "injected crash point")
        os.fsync(fd)


def reopen(path, **kw):
    store = LogStore(str(path), **kw)
    hard, got = store.open()
    return store, hard, got


def test_round_trip_entries_and_hard_state(tmp_path):
    """Entries of every kind and the hard state come back identical after a reopen."""
    store, hard, got = reopen(tmp_path)
    assert (hard, got) == (HardState(), [])
    written = [Entry(1, 1, NOOP), Entry(2, 1, CONFIG, Membership(frozenset({"a", "b"})).to_data()),
               Entry(3, 2, DATA, {"op": "put", "name": "ünïcode\nname", "file": {"size": 3}})]
    store.append(written)
    store.save_hard_state(HardState(2, "b"))
    store.close()
    store, hard, got = reopen(tmp_path)
    assert hard == HardState(2, "b")
    assert got == written
    assert store.entries(2, 3) == written[1:]
    store.close()


def test_one_fsync_per_batch(tmp_path):
    """A batch of many entries costs one fsync (plus one for the directory when a segment starts)."""
    fsync = CountingFsync()
    store, _, _ = reopen(tmp_path, fsync=fsync)
    store.append(entries(1, 100))      # creates the segment: dir fsync + data fsync
    before = fsync.calls
    store.append(entries(101, 300))
    assert fsync.calls - before == 1
    store.close()


def test_append_must_continue_the_log(tmp_path):
    """A gap or an overlap is refused: the store never holds a non-contiguous log."""
    store, _, _ = reopen(tmp_path)
    store.append(entries(1, 3))
    with pytest.raises(ValueError):
        store.append(entries(5, 6))
    with pytest.raises(ValueError):
        store.append(entries(3, 4))
    store.close()


@pytest.mark.parametrize("cut", [1, 8, 9, 20, -1])
def test_torn_tail_is_cut(tmp_path, cut):
    """A partly written last line (never acknowledged) is cut off on open; appends continue after it."""
    store, _, _ = reopen(tmp_path)
    store.append(entries(1, 5))
    store.append(entries(6, 6))
    store.close()
    path = segment_paths(tmp_path)[-1]
    line = encode_line(entries(6, 6)[0])
    size = os.path.getsize(path)
    os.truncate(path, size - len(line) + (cut if cut > 0 else len(line) + cut))
    store, _, got = reopen(tmp_path)
    assert got == entries(1, 5)
    assert os.path.getsize(path) == size - len(line)
    store.append(entries(6, 7, term=2))
    store.close()
    assert reopen(tmp_path)[2] == entries(1, 5) + entries(6, 7, term=2)


def test_garbage_tail_is_cut(tmp_path):
    """Zeros after the last good line (a torn write the disk filled with zeros) are cut."""
    store, _, _ = reopen(tmp_path)
    store.append(entries(1, 4))
    store.close()
    with open(segment_paths(tmp_path)[-1], "ab") as f:
        f.write(b"\0" * 300)
    assert reopen(tmp_path)[2] == entries(1, 4)


def test_damaged_line_before_good_ones_is_corrupt(tmp_path):
    """A bad CRC with good lines after it is not a torn tail: refuse to open."""
    store, _, _ = reopen(tmp_path)
    store.append(entries(1, 5))
    store.close()
    path = segment_paths(tmp_path)[-1]
    data = bytearray(open(path, "rb").read())
    second = data.index(b"\n") + 1
    data[second + 20] ^= 0x01  # a bit flip inside line 2's JSON
    open(path, "wb").write(bytes(data))
    with pytest.raises(LogCorrupt, match="damaged"):
        reopen(tmp_path)


def test_damaged_last_line_is_cut(tmp_path):
    """A bit flip in the last line fails its CRC: nothing after it, so it is a torn tail."""
    store, _, _ = reopen(tmp_path)
    store.append(entries(1, 3))
    store.close()
    path = segment_paths(tmp_path)[-1]
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert reopen(tmp_path)[2] == entries(1, 2)


def test_damage_in_an_older_segment_is_corrupt(tmp_path):
    """Only the last segment can have a torn tail."""
    store, _, _ = reopen(tmp_path, segment_bytes=200)
    for i in range(1, 14):
        store.append(entries(i, i))
    store.close()
    first = segment_paths(tmp_path)[0]
    assert len(segment_paths(tmp_path)) > 2
    os.truncate(first, os.path.getsize(first) - 3)
    with pytest.raises(LogCorrupt):
        reopen(tmp_path)


def test_gap_between_segments_is_corrupt(tmp_path):
    """A missing segment in the middle is never a crash's doing."""
    store, _, _ = reopen(tmp_path, segment_bytes=200)
    for i in range(1, 14):
        store.append(entries(i, i))
    store.close()
    paths = segment_paths(tmp_path)
    os.unlink(paths[1])
    with pytest.raises(LogCorrupt, match="starts at"):
        reopen(tmp_path)


def test_truncate_suffix_across_segments(tmp_path):
    """truncate_from drops a conflicting suffix spanning segments; the log continues at that index."""
    store, _, _ = reopen(tmp_path, segment_bytes=300)
    for i in range(1, 21):
        store.append(entries(i, i))
    store.truncate_from(7)
    assert store.next_index == 7
    store.append(entries(7, 9, term=3))
    store.close()
    store, _, got = reopen(tmp_path, segment_bytes=300)
    assert got == entries(1, 6) + entries(7, 9, term=3)
    assert store.entries(5, 8) == got[4:8]
    store.close()


def test_truncate_everything_keeps_the_position(tmp_path):
    """Truncating from the first stored index leaves an empty log that still continues there."""
    store, _, _ = reopen(tmp_path)
    store.append(entries(1, 5))
    store.compact(2)
    store.truncate_from(3)
    store.close()
    store, _, got = reopen(tmp_path)
    assert got == [] or all(e.index < 3 for e in got)
    assert store.next_index == 3
    store.close()


def test_compact_deletes_covered_segments(tmp_path):
    """compact(i) deletes segments wholly <= i and rolls, so the next compaction can delete more."""
    store, _, _ = reopen(tmp_path, segment_bytes=300)
    for i in range(1, 31):
        store.append(entries(i, i))
    n_before = len(segment_paths(tmp_path))
    store.compact(15)
    assert store.first_index <= 16
    assert len(segment_paths(tmp_path)) < n_before
    store.append(entries(31, 32))
    store.compact(31)
    assert store.first_index <= 32 and store.last_index == 32
    store.close()
    store, _, got = reopen(tmp_path, segment_bytes=300)
    assert got[-1] == entries(32, 32)[0] and got[0].index <= 32
    assert [e.index for e in got] == list(range(got[0].index, 33))
    store.close()


def test_compact_everything_continues_after_snapshot(tmp_path):
    """A snapshot beyond the log (installed from the leader) empties it; it continues after the snapshot."""
    store, _, _ = reopen(tmp_path)
    store.append(entries(1, 5))
    store.compact(40)
    assert store.next_index == 41
    store.close()
    store, _, got = reopen(tmp_path)
    assert got == [] and store.next_index == 41
    store.append(entries(41, 42))
    store.close()
    assert reopen(tmp_path)[2] == entries(41, 42)


@pytest.mark.parametrize("operation", ["truncate", "compact", "compact_all", "append_roll"])
def test_every_crash_point_leaves_an_openable_log(tmp_path, operation):
    """Stopping an operation at each of its fsyncs leaves files that open as a prefix
    (truncate, append) or a suffix (compact) of the log before, never a gap."""
    seed_dir = tmp_path / "seed"
    store, _, _ = reopen(seed_dir, segment_bytes=250)
    for i in range(1, 25):
        store.append(entries(i, i))
    store.close()
    before = entries(1, 24)
    for fail_at in range(1, 20):
        work = tmp_path / f"crash{fail_at}"
        shutil.copytree(seed_dir, work)
        fsync = CountingFsync(fail_at)
        store, _, _ = reopen(work, segment_bytes=250, fsync=fsync)
        crashed = False
        try:
            if operation == "truncate":
                store.truncate_from(5)
            elif operation == "compact":
                store.compact(17)
            elif operation == "compact_all":
                store.compact(30)
            else:
                store.append(entries(25, 40))
        except OSError:
            crashed = True
            with pytest.raises(OSError):  # a failed store refuses further writes
                store.append(entries(store.next_index, store.next_index))
        store.close()
        _, _, got = reopen(work)
        indexes = [e.index for e in got]
        assert indexes == list(range(indexes[0], indexes[0] + len(indexes))) if indexes else True
        for e in got:
            assert e == (before + entries(25, 40))[e.index - 1]
        if operation == "truncate":
            assert indexes[0] == 1 and indexes[-1] >= 4
        elif operation.startswith("compact"):
            assert not indexes or indexes[-1] == 24
        shutil.rmtree(work)
        if not crashed:
            break
    else:
        pytest.fail("the operation never completed")


def test_failed_store_refuses_writes(tmp_path):
    """After an fsync error nothing is known to be durable: the store refuses later writes."""
    fsync = CountingFsync()
    store, _, _ = reopen(tmp_path, fsync=fsync)
    store.append(entries(1, 2))
    fsync.fail_at = fsync.calls + 1
    with pytest.raises(OSError):
        store.append(entries(3, 3))
    with pytest.raises(OSError):
        store.save_hard_state(HardState(5, None))
    store.close()


def test_corrupt_hard_state_refuses_to_open(tmp_path):
    """A hard state that does not parse is never replaced by a default (that would forget a vote)."""
    (tmp_path / "raft-state.json").write_text('{"format": 1, "term": "x"}')
    with pytest.raises(LogCorrupt):
        reopen(tmp_path)
