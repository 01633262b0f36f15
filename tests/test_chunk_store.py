"""Tests of chunk_store.ChunkStore on tmp_path: round trips, reopen, torn tail, damage,
compaction and scrubbing."""

import logging
import os
import random
import stat
import struct
import sys
import threading
import time
import zlib

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chunk_store import HEADER_BYTES, PAYLOAD_CRC_BYTES, ChunkStore  # noqa: E402
from conftest import flip_byte  # noqa: E402
from protocol import ChecksumMismatch, ChunkNotFound, RemoteProtocolError, chunk_crcs, crcs_to_bytes  # noqa: E402

SEED = 20240601
CS = 1024  # chunk size used by most tests


@pytest.fixture
def rng():
    print(f"seed {SEED}")
    return random.Random(SEED)


def make_chunks(rng, count, chunk_size=CS, short=0):
    """(crc_bytes, payload) of count chunks, the last one `short` bytes shorter."""
    payload = rng.randbytes(count * chunk_size - short)
    return crcs_to_bytes(chunk_crcs(payload, chunk_size)), payload


def put(store, rng, blob, first, count, chunk_size=CS, short=0):
    """Put random chunks and return their payload."""
    crcs, payload = make_chunks(rng, count, chunk_size, short)
    store.put(blob, first, count, chunk_size, crcs, payload)
    return payload


def segment_paths(data_dir):
    seg_dir = os.path.join(data_dir, "segments")
    return [os.path.join(seg_dir, name) for name in sorted(os.listdir(seg_dir))]


def test_round_trip_with_short_last_chunk(tmp_path, rng):
    """A put with a short last chunk reads back byte for byte with its CRCs."""
    with ChunkStore(str(tmp_path)) as store:
        payload = put(store, rng, "b1", 0, 10, short=100)
        chunk_size, crcs, data = store.get("b1", 0, 10)
    assert (chunk_size, data, crcs) == (CS, payload, crcs_to_bytes(chunk_crcs(payload, CS)))


def test_single_chunk(tmp_path, rng):
    """A one-chunk record of a few bytes round-trips."""
    with ChunkStore(str(tmp_path)) as store:
        payload = put(store, rng, "b1", 7, 1, short=CS - 5)
        assert store.get("b1", 7, 1)[2] == payload


def test_get_spans_two_records(tmp_path, rng):
    """A get across two adjacent records joins them in order."""
    with ChunkStore(str(tmp_path)) as store:
        a = put(store, rng, "b1", 0, 4)
        b = put(store, rng, "b1", 4, 4, short=10)
        _, crcs, data = store.get("b1", 2, 6)
    assert data == a[2 * CS:] + b
    assert crcs == crcs_to_bytes(chunk_crcs(data, CS))


def test_sub_range_get(tmp_path, rng):
    """A get of chunks inside one record returns just those chunks."""
    with ChunkStore(str(tmp_path)) as store:
        payload = put(store, rng, "b1", 100, 8, short=1)
        assert store.get("b1", 103, 2)[2] == payload[3 * CS:5 * CS]
        assert store.get("b1", 107, 1)[2] == payload[7 * CS:]


def test_memoryview_arguments(tmp_path, rng):
    """put accepts memoryviews of a larger frame body, as the node hands them over."""
    crcs, payload = make_chunks(rng, 3)
    body = memoryview(b"xx" + crcs + payload)
    with ChunkStore(str(tmp_path)) as store:
        store.put("b1", 0, 3, CS, body[2:2 + len(crcs)], body[2 + len(crcs):])
        assert store.get("b1", 0, 3)[2] == payload


def test_reopen_rebuilds_identical_index(tmp_path, rng):
    """After reopen, inventory, stats and data are what they were."""
    data = {}
    with ChunkStore(str(tmp_path)) as store:
        for n in range(5):
            data[f"b{n}"] = put(store, rng, f"b{n}", 0, 3) + put(store, rng, f"b{n}", 3, 2, short=n)
        store.flush()
        before = (store.inventory(), store.chunk_count, store.blob_count, store.live_bytes,
                  store.used_bytes, store.extent_count)
    with ChunkStore(str(tmp_path)) as store:
        after = (store.inventory(), store.chunk_count, store.blob_count, store.live_bytes,
                 store.used_bytes, store.extent_count)
        assert after == before
        for blob, payload in data.items():
            assert store.get(blob, 0, 5)[2] == payload


# Cut points inside the last record: in the header, in the CRCs, in the payload;
# the garbage is always shorter than what was cut, as after a crash mid-append.
@pytest.mark.parametrize("cut, garbage", [
    (cut, garbage)
    for cut in (1, 20, HEADER_BYTES - 1, HEADER_BYTES + 2, HEADER_BYTES + 2 + 8, -CS // 2)
    for garbage in (b"", b"\x00" * 7, b"BKR1junk" * 9)
] + [(-1, b"")])
def test_torn_tail_is_cut_off(tmp_path, rng, caplog, cut, garbage):
    """A last record cut at any offset (plus trailing garbage) is dropped and truncated away."""
    with ChunkStore(str(tmp_path)) as store:
        kept = put(store, rng, "b1", 0, 4)
        put(store, rng, "b1", 4, 2)
        good_end = store.used_bytes - (HEADER_BYTES + PAYLOAD_CRC_BYTES + 2 + 2 * 4 + 2 * CS)
    path = segment_paths(tmp_path)[-1]
    with open(path, "r+b") as f:
        f.truncate(good_end + cut if cut > 0 else os.path.getsize(path) + cut)
        f.seek(0, os.SEEK_END)
        f.write(garbage)
    with caplog.at_level(logging.WARNING, logger="chunk_store"):
        store = ChunkStore(str(tmp_path))
    assert "torn record" in caplog.text
    assert os.path.getsize(path) == good_end
    assert store.inventory() == {"b1": [(0, 4)]}
    assert store.get("b1", 0, 4)[2] == kept
    again = put(store, rng, "b1", 4, 2)
    store.close()
    with ChunkStore(str(tmp_path)) as store:
        assert store.get("b1", 0, 6)[2] == kept + again


def test_garbage_after_last_record_is_cut_off(tmp_path, rng):
    """Bytes appended after a whole last record are removed and every record stays."""
    with ChunkStore(str(tmp_path)) as store:
        payload = put(store, rng, "b1", 0, 2)
        size = store.used_bytes
    with open(segment_paths(tmp_path)[-1], "ab") as f:
        f.write(b"\xff" * 50)
    with ChunkStore(str(tmp_path)) as store:
        assert store.used_bytes == size and store.get("b1", 0, 2)[2] == payload


def test_bad_record_in_earlier_segment_is_not_truncated(tmp_path, rng, caplog):
    """Damage inside an older segment is logged and skipped, never cut off."""
    with ChunkStore(str(tmp_path), segment_max_bytes=3 * CS) as store:
        for n in range(3):
            put(store, rng, "b1", 2 * n, 2)
    first_seg = segment_paths(tmp_path)[0]
    size = os.path.getsize(first_seg)
    with open(first_seg, "r+b") as f:
        f.write(b"XXXX")  # break the magic of its first record
    with caplog.at_level(logging.ERROR, logger="chunk_store"):
        store = ChunkStore(str(tmp_path), segment_max_bytes=3 * CS)
    assert "bad record" in caplog.text and os.path.getsize(first_seg) == size
    assert store.inventory() == {"b1": [(2, 2), (4, 2)]}
    store.close()


def test_flipped_payload_byte_raises_checksum_mismatch(tmp_path, rng):
    """A byte flipped on disk makes get raise ChecksumMismatch naming blob and chunk."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 10, 4)
        end = store.used_bytes
    with open(segment_paths(tmp_path)[-1], "r+b") as f:
        f.seek(end - 3)  # inside chunk 13, the last one
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with ChunkStore(str(tmp_path)) as store:
        with pytest.raises(ChecksumMismatch, match="b1 chunk 13"):
            store.get("b1", 10, 4)
        assert len(store.get("b1", 10, 3)[2]) == 3 * CS  # the good chunks still read


def test_bad_crc_on_put_writes_nothing(tmp_path, rng):
    """A put whose payload disagrees with its CRCs raises ChecksumMismatch and leaves the store unchanged."""
    crcs, payload = make_chunks(rng, 4)
    damaged = bytearray(payload)
    damaged[2 * CS + 5] ^= 1
    with ChunkStore(str(tmp_path)) as store:
        with pytest.raises(ChecksumMismatch, match="chunk 2"):
            store.put("b1", 0, 4, CS, crcs, damaged)
        assert (store.used_bytes, store.chunk_count, store.blob_count) == (0, 0, 0)
    assert os.path.getsize(segment_paths(tmp_path)[-1]) == 0


@pytest.mark.parametrize("blob, first, count, chunk_size", [
    ("", 0, 2, CS), ("x" * 65, 0, 2, CS), ("bad\nid", 0, 2, CS), ("é", 0, 2, CS),
    ("b1", -1, 2, CS), ("b1", 0, 0, CS), ("b1", 0, 2, 0),
])
def test_bad_put_arguments_raise_protocol_error(tmp_path, blob, first, count, chunk_size):
    """Bad blob ids and impossible ranges raise RemoteProtocolError."""
    with ChunkStore(str(tmp_path)) as store:
        with pytest.raises(RemoteProtocolError):
            store.put(blob, first, count, chunk_size, b"\0" * 4 * max(count, 0), b"\0" * 8)


def test_payload_length_must_match_count(tmp_path, rng):
    """A payload too long or a whole chunk too short for count is refused."""
    crcs, payload = make_chunks(rng, 3)
    with ChunkStore(str(tmp_path)) as store:
        for bad in (payload + b"x", payload[:2 * CS]):
            with pytest.raises(RemoteProtocolError):
                store.put("b1", 0, 3, CS, crcs, bad)
        with pytest.raises(RemoteProtocolError):
            store.put("b1", 0, 3, CS, crcs[:8], payload)


def test_reput_same_range_replaces_extent(tmp_path, rng):
    """A re-put of the same range wins, now and after reopen, without double counting."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 4)
        newer = put(store, rng, "b1", 0, 4, short=3)
        assert (store.chunk_count, store.extent_count, store.live_bytes) == (4, 1, 4 * CS - 3)
    with ChunkStore(str(tmp_path)) as store:
        assert store.get("b1", 0, 4)[2] == newer and store.extent_count == 1


def test_partial_overlap_splits_and_other_chunk_size_refused(tmp_path, rng):
    """A put that partly overlaps stored chunks replaces just those (now and after reopen); another chunk size is refused."""
    with ChunkStore(str(tmp_path)) as store:
        old = put(store, rng, "b1", 0, 4)
        new = put(store, rng, "b1", 2, 4)
        with pytest.raises(RemoteProtocolError, match="chunk size"):
            put(store, rng, "b1", 6, 4, chunk_size=512)
        assert store.inventory() == {"b1": [(0, 2), (2, 4)]}
        assert store.get("b1", 0, 6)[2] == old[:2 * CS] + new
        assert (store.chunk_count, store.extent_count, store.live_bytes) == (6, 2, 6 * CS)
        store.flush()
    with ChunkStore(str(tmp_path)) as store:
        assert store.inventory() == {"b1": [(0, 2), (2, 4)]} and store.get("b1", 0, 6)[2] == old[:2 * CS] + new


def test_delete_blobs_survives_reopen(tmp_path, rng):
    """Deleted blobs are gone now and after reopen; others stay."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "gone", 0, 2)
        put(store, rng, "gone", 2, 2)
        kept = put(store, rng, "kept", 0, 2)
        assert store.delete_blobs(["gone", "never-stored", "gone"]) == 1
        with pytest.raises(ChunkNotFound):
            store.get("gone", 0, 1)
        store.flush()
    with ChunkStore(str(tmp_path)) as store:
        with pytest.raises(ChunkNotFound):
            store.get("gone", 0, 1)
        assert store.get("kept", 0, 2)[2] == kept
        assert (store.blob_count, store.chunk_count) == (1, 2)


def test_delete_with_bad_blob_id_deletes_nothing(tmp_path, rng):
    """A malformed blob id in a delete list raises RemoteProtocolError before any tombstone."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 1)
        with pytest.raises(RemoteProtocolError):
            store.delete_blobs(["b1", ["not", "a", "str"]])
        assert store.has("b1", 0, 1)


def test_put_after_tombstone_is_visible_after_reopen(tmp_path, rng):
    """Chunks put after a blob's tombstone survive the tombstone's replay."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 2)
        store.delete_blobs(["b1"])
        again = put(store, rng, "b1", 0, 2, chunk_size=512)
    with ChunkStore(str(tmp_path)) as store:
        assert store.get("b1", 0, 2)[2] == again and store.inventory() == {"b1": [(0, 2)]}


def test_segments_roll(tmp_path, rng):
    """Small segment_max_bytes spreads records over segments; oversized records still go whole."""
    data = {}
    with ChunkStore(str(tmp_path), segment_max_bytes=3 * CS) as store:
        for n in range(5):
            data[n] = put(store, rng, "b1", 2 * n, 2)
        data[5] = put(store, rng, "b1", 10, 8)  # larger than a segment
        data[6] = put(store, rng, "b1", 18, 1)
        store.flush()
    sizes = [os.path.getsize(p) for p in segment_paths(tmp_path)]
    assert len(sizes) == 7
    assert sizes[5] > 3 * CS
    with ChunkStore(str(tmp_path), segment_max_bytes=3 * CS) as store:
        assert store.get("b1", 0, 19)[2] == b"".join(data[n] for n in range(7))
        assert store.used_bytes == sum(sizes)


def test_stats_after_reopen(tmp_path, rng):
    """chunk_count, blob_count and live_bytes count live data and survive reopen."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "a", 0, 3, short=24)
        put(store, rng, "b", 0, 2)
        put(store, rng, "c", 5, 1)
        store.delete_blobs(["c"])
        stats = (store.chunk_count, store.blob_count, store.live_bytes)
        assert stats == (5, 2, 5 * CS - 24)
    with ChunkStore(str(tmp_path)) as store:
        assert (store.chunk_count, store.blob_count, store.live_bytes) == stats


def test_missing_chunks_raise_chunk_not_found(tmp_path, rng):
    """A gap, a range past the end or an unknown blob raises ChunkNotFound; has() says False."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 2)
        put(store, rng, "b1", 3, 2)
        for blob, first, count in [("b1", 0, 4), ("b1", 4, 2), ("b1", 2, 1), ("nope", 0, 1)]:
            with pytest.raises(ChunkNotFound):
                store.get(blob, first, count)
            assert not store.has(blob, first, count)
        assert store.has("b1", 3, 2) and store.has("b1", 1, 1)


def test_get_intact_serves_good_chunks_and_drops_only_the_bad_one(tmp_path, rng):
    """get_intact returns every chunk but the rotten one, zeroed and named; only that chunk is dropped, also after reopen."""
    with ChunkStore(str(tmp_path)) as store:
        crcs, payload = make_chunks(rng, 6, short=10)
        store.put("b1", 0, 6, CS, crcs, payload)
        flip_byte(segment_paths(tmp_path)[0], payload_offset(0, "b1", 6) + 2 * CS + 9)
        chunk_size, got_crcs, got, missing, corrupt = store.get_intact("b1", 1, 5)
        assert (chunk_size, missing, corrupt) == (CS, [], [(2, 1)])
        assert got == payload[CS:2 * CS] + bytes(CS) + payload[3 * CS:]
        assert got_crcs == crcs[4:8] + bytes(4) + crcs[12:]
        assert store.inventory() == {"b1": [(0, 2), (3, 3)]}
        store.flush()
    with ChunkStore(str(tmp_path)) as store:
        assert store.inventory() == {"b1": [(0, 2), (3, 3)]}
        assert store.get_intact("b1", 0, 6)[2:] == (payload[:2 * CS] + bytes(CS) + payload[3 * CS:], [(2, 1)], [])


def test_get_intact_zero_fills_missing_chunks_in_place(tmp_path, rng):
    """Missing chunks, inside and at the end of the range, are listed and read as whole zero chunks; none stored is ChunkNotFound."""
    with ChunkStore(str(tmp_path)) as store:
        a = put(store, rng, "b1", 0, 2)
        b = put(store, rng, "b1", 4, 1)
        _, crcs, payload, missing, corrupt = store.get_intact("b1", 1, 6)
        assert (missing, corrupt) == ([(2, 2), (5, 2)], [])
        assert payload == a[CS:] + bytes(2 * CS) + b + bytes(2 * CS) and len(crcs) == 6 * 4
        assert store.get_intact("b1", 0, 2)[3:] == ([], [])
        for first, count in [(2, 2), (5, 9)]:
            with pytest.raises(ChunkNotFound):
                store.get_intact("b1", first, count)
        assert store.inventory() == {"b1": [(0, 2), (4, 1)]}


def test_corrupt_chunk_re_put_while_read_is_not_dropped(tmp_path, rng, monkeypatch):
    """A chunk found corrupt by a read that a repair re-put meanwhile keeps its fresh copy."""
    with ChunkStore(str(tmp_path)) as store:
        crcs, payload = make_chunks(rng, 3)
        store.put("b1", 0, 3, CS, crcs, payload)
        flip_byte(segment_paths(tmp_path)[0], payload_offset(0, "b1", 3) + CS + 1)
        real_pread, calls = os.pread, []

        def pread(fd, length, offset):
            data = real_pread(fd, length, offset)
            calls.append(offset)
            if len(calls) == 2:  # after the read, before the drop: the repair's put lands
                store.put("b1", 1, 1, CS, crcs[4:8], payload[CS:2 * CS])
            return data
        monkeypatch.setattr(os, "pread", pread)
        assert store.get_intact("b1", 0, 3)[4] == [(1, 1)]
        monkeypatch.undo()
        assert store.get("b1", 0, 3)[2] == payload


def test_index_holds_one_entry_per_record(tmp_path):
    """64 MiB in 1 MiB records costs 64 index entries, not one per chunk."""
    payload = os.urandom(1024 * 1024)
    crcs = crcs_to_bytes(chunk_crcs(payload, CS))
    with ChunkStore(str(tmp_path)) as store:
        for n in range(64):
            store.put("big", n * 1024, 1024, CS, crcs, payload)
        assert (store.extent_count, store.chunk_count) == (64, 64 * 1024)
        assert len(store.inventory()["big"]) == 64
        assert store.get("big", 1000, 48)[2] == payload[1000 * CS:] + payload[:24 * CS]
    with ChunkStore(str(tmp_path)) as store:
        assert store.extent_count == 64


def test_modes_are_private(tmp_path, rng):
    """Directories are created 0700 and segment files 0600."""
    data_dir = tmp_path / "node"
    with ChunkStore(str(data_dir), segment_max_bytes=CS) as store:
        put(store, rng, "b1", 0, 1)
        put(store, rng, "b1", 1, 1)
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data_dir / "segments").st_mode) == 0o700
    paths = segment_paths(data_dir)
    assert len(paths) == 2
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in paths)


def test_closed_store_raises(tmp_path):
    """Using a closed store raises ValueError instead of touching stale descriptors."""
    store = ChunkStore(str(tmp_path))
    store.close()
    store.close()
    with pytest.raises(ValueError):
        store.flush()


def test_concurrent_puts_and_gets(tmp_path):
    """Puts, gets and flushes from several threads leave every record whole after reopen."""
    import threading
    payloads = {f"t{n}": os.urandom(8 * CS) for n in range(4)}
    with ChunkStore(str(tmp_path), segment_max_bytes=64 * CS) as store:
        failures = []

        def work(blob):
            crcs = crcs_to_bytes(chunk_crcs(payloads[blob], CS))
            for k in range(20):
                store.put(blob, 8 * k, 8, CS, crcs, payloads[blob])
                if store.get(blob, 8 * k, 8)[2] != payloads[blob]:
                    failures.append((blob, k))
                store.flush()
        threads = [threading.Thread(target=work, args=(blob,)) for blob in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
    with ChunkStore(str(tmp_path), segment_max_bytes=64 * CS) as store:
        assert store.extent_count == 80
        for blob, payload in payloads.items():
            assert store.get(blob, 0, 160)[2] == payload * 20


# --- compaction and scrubbing -------------------------------------------
SMALL_SEG = 4 * CS  # holds one 3-chunk record, or a 2-chunk and a 1-chunk one


def payload_offset(record_offset, blob, count):
    """File offset of the payload of a chunks record that starts at record_offset."""
    return record_offset + HEADER_BYTES + PAYLOAD_CRC_BYTES + len(blob) + 4 * count


def seg_nos(store, active=None):
    return [s["seg_no"] for s in store.segment_stats() if active is None or s["is_active"] == active]


def full_scrub(store, max_bytes=1 << 30):
    """Corrupt extents found by one whole pass, and the number of steps it took."""
    cursor, corrupt, steps = None, [], 0
    while True:
        cursor, bad = store.scrub_step(cursor, max_bytes)
        corrupt += bad
        steps += 1
        if cursor is None:
            return corrupt, steps


def snapshot(store):
    """Everything a reader can observe: inventory, stats and every extent's data."""
    inventory = store.inventory()
    data = {(blob, first, count): store.get(blob, first, count)
            for blob, extents in inventory.items() for first, count in extents}
    return inventory, data, (store.chunk_count, store.blob_count, store.live_bytes, store.extent_count)


def test_segment_stats_counts_live_records(tmp_path, rng):
    """segment_stats gives each segment's size, live record bytes and which one is active."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        put(store, rng, "a", 0, 2)
        put(store, rng, "b", 0, 1)
        put(store, rng, "c", 0, 3)
        store.delete_blobs(["b"])
        stats = store.segment_stats()
    rec = lambda count: HEADER_BYTES + PAYLOAD_CRC_BYTES + 1 + 4 * count + count * CS  # noqa: E731
    assert [(s["seg_no"], s["size_bytes"], s["live_bytes"], s["is_active"]) for s in stats] == [
        (1, rec(2) + rec(1), rec(2), False), (2, rec(3) + HEADER_BYTES + 1, rec(3), True)]
    assert stats[0]["live_fraction"] == rec(2) / (rec(2) + rec(1))


def test_compaction_reclaims_deleted_blobs(tmp_path, rng):
    """Segments left mostly dead by deletes are removed and used_bytes drops by their size."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        kept = {n: put(store, rng, f"b{n}", 0, 3) for n in range(6)}
        store.delete_blobs([f"b{n}" for n in range(0, 6, 2)])
        before = store.used_bytes
        result = store.compact()
        assert result["segments_compacted"] == 3 and result["corrupt"] == []
        assert result["bytes_reclaimed"] == before - store.used_bytes > 3 * 3 * CS
        assert store.used_bytes == sum(os.path.getsize(p) for p in segment_paths(tmp_path))
        for n in range(1, 6, 2):
            assert store.get(f"b{n}", 0, 3)[2] == kept[n]


def test_compaction_reclaims_replaced_ranges(tmp_path, rng):
    """Re-put ranges leave dead copies that compaction reclaims, keeping the newest data."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        for _ in range(5):
            newest = put(store, rng, "b1", 0, 3)
        put(store, rng, "tail", 0, 3)
        result = store.compact()
        assert result["segments_compacted"] == 4 and seg_nos(store) == [5, 6]  # 5 holds the newest
        assert store.get("b1", 0, 3)[2] == newest
        assert store.used_bytes < 2 * SMALL_SEG


def test_data_identical_after_compaction_and_reopen(tmp_path, rng):
    """Compacting every old segment changes no extent, stat or byte, before or after reopen."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        for n in range(9):
            put(store, rng, f"b{n % 3}", 4 * (n // 3), 1 + n % 3, short=n)
        put(store, rng, "b0", 0, 1)  # replaces b0's first extent
        store.delete_blobs(["b2"])
        put(store, rng, "b2", 0, 1, chunk_size=512)
        store.flush()
        before = snapshot(store)
        assert store.compact(min_dead_fraction=0.0)["segments_compacted"] > 0
        assert snapshot(store) == before
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert snapshot(store) == before


@pytest.mark.parametrize("forget", ["delete", "drop"])
def test_tombstone_survives_compaction_of_its_segment(tmp_path, rng, forget):
    """A tombstone (or drop record) is carried forward while an older segment still holds the blob."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        put(store, rng, "keep", 0, 2)
        put(store, rng, "gone", 0, 1)  # segment 1, which stays mostly live
        put(store, rng, "filler", 0, 2)  # segment 2
        if forget == "delete":
            store.delete_blobs(["gone"])
        else:
            assert store.drop_range("gone", 0, 1) == 1
        store.delete_blobs(["filler"])
        put(store, rng, "tail", 0, 3)  # segment 3, active
        assert seg_nos(store) == [1, 2, 3]
        assert store.compact()["segments_compacted"] == 1
        assert seg_nos(store) == [1, 3]
        store.flush()
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert store.inventory() == {"keep": [(0, 2)], "tail": [(0, 3)]}


def test_carried_tombstone_spares_later_puts(tmp_path, rng):
    """A tombstone moved to the tail by compaction does not delete chunks put after the original."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        put(store, rng, "keep", 0, 2)
        put(store, rng, "b1", 0, 1)  # segment 1
        put(store, rng, "filler", 0, 2)  # segment 2
        store.delete_blobs(["b1", "filler"])
        again = put(store, rng, "b1", 0, 3)  # segment 3, active
        assert store.compact()["segments_compacted"] == 1
        store.flush()
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert store.get("b1", 0, 3)[2] == again


def test_delete_all_then_compact_leaves_almost_nothing(tmp_path, rng):
    """After deleting every blob and compacting, only the active segment with the tombstones is left."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        for n in range(10):
            put(store, rng, f"b{n}", 0, 2)
        store.delete_blobs([f"b{n}" for n in range(10)])
        store.compact()
        assert len(store.segment_stats()) == 1
        assert store.used_bytes < 4096 + 10 * (HEADER_BYTES + 2)
        assert store.used_bytes == sum(os.path.getsize(p) for p in segment_paths(tmp_path))
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert store.blob_count == 0


def test_compaction_rate_limit(tmp_path, rng):
    """With max_bytes_per_s, copying takes at least bytes / rate seconds."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        for n in range(4):
            put(store, rng, f"b{n}", 0, 3)
        started = time.monotonic()
        store.compact(min_dead_fraction=0.0, max_bytes_per_s=9 * CS / 0.2)  # 3 records of 3 chunks
        assert time.monotonic() - started >= 0.2


def test_gets_during_compaction_never_fail(tmp_path):
    """Gets racing repeated compactions always return the right data."""
    rng = random.Random(SEED)
    data = {f"b{n}": rng.randbytes(8 * CS) for n in range(4)}
    crcs = {blob: crcs_to_bytes(chunk_crcs(payload, CS)) for blob, payload in data.items()}
    stop, failures, reads = threading.Event(), [], [0]
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        for blob, payload in data.items():
            for first in range(0, 8, 2):
                store.put(blob, first, 2, CS, crcs[blob][4 * first:4 * first + 8], payload[first * CS:(first + 2) * CS])

        def reader(seed):
            local = random.Random(seed)
            while not stop.is_set():
                blob, first = local.choice(list(data)), local.randrange(8)
                count = local.randint(1, 8 - first)
                try:
                    if store.get(blob, first, count)[2] != data[blob][first * CS:(first + count) * CS]:
                        failures.append((blob, first, count, "wrong data"))
                except Exception as exc:  # any failure is what the test looks for
                    failures.append((blob, first, count, repr(exc)))
                reads[0] += 1
        threads = [threading.Thread(target=reader, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        try:
            for round_no in range(8):
                blob = f"b{round_no % 4}"
                first = 2 * (round_no % 4)  # re-put the same bytes: the old copy turns dead
                store.put(blob, first, 2, CS, crcs[blob][4 * first:4 * first + 8], data[blob][first * CS:(first + 2) * CS])
                put(store, rng, "junk", 0, 2)
                store.delete_blobs(["junk"])
                assert store.compact()["segments_compacted"] > 0
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures and reads[0] > 0


def test_corrupt_chunk_found_by_compaction_is_reported_not_copied(tmp_path, rng):
    """A chunk failing its CRC while compacted is listed in "corrupt" and gone; the other chunk of its record is copied."""
    with ChunkStore(str(tmp_path), segment_max_bytes=CS) as store:  # one record per segment
        bad = put(store, rng, "bad", 0, 2)
        good = put(store, rng, "good", 0, 2)
        put(store, rng, "tail", 0, 1)
        flip_byte(segment_paths(tmp_path)[0], payload_offset(0, "bad", 2) + CS + 5)
        result = store.compact(min_dead_fraction=0.0)
        assert result["corrupt"] == [("bad", 1, 1)] and result["segments_compacted"] == 2
        assert store.inventory() == {"bad": [(0, 1)], "good": [(0, 2)], "tail": [(0, 1)]}
        assert store.get("good", 0, 2)[2] == good and store.get("bad", 0, 1)[2] == bad[:CS]
        store.flush()
    with ChunkStore(str(tmp_path), segment_max_bytes=CS) as store:
        assert store.inventory() == {"bad": [(0, 1)], "good": [(0, 2)], "tail": [(0, 1)]}
        assert store.get("bad", 0, 1)[2] == bad[:CS]


def test_corrupt_extent_dropped_by_compaction_does_not_resurrect(tmp_path, rng):
    """An older copy of an extent dropped as corrupt stays hidden after reopen."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        put(store, rng, "keep", 0, 2)
        put(store, rng, "b1", 0, 1)  # segment 1, mostly live: not compacted
        put(store, rng, "b1", 0, 1)  # segment 2 starts with the newer copy
        put(store, rng, "junk", 0, 2)
        store.delete_blobs(["junk"])
        put(store, rng, "tail", 0, 3)  # segment 3, active
        flip_byte(segment_paths(tmp_path)[1], payload_offset(0, "b1", 1) + 9)
        assert store.compact()["corrupt"] == [("b1", 0, 1)]
        assert seg_nos(store) == [1, 3]
        store.flush()
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert "b1" not in store.inventory()


def test_scrub_drops_and_reports_exactly_the_flipped_chunk(tmp_path, rng):
    """A byte flipped in one chunk makes a scrub pass drop and report that chunk only, now and after reopen."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "a", 0, 3)
        put(store, rng, "b", 0, 2)
        offset = store.used_bytes
        payload = put(store, rng, "b", 2, 4, short=7)
        put(store, rng, "c", 0, 1)
        flip_byte(segment_paths(tmp_path)[0], payload_offset(offset, "b", 4) + 2 * CS + 1)
        assert full_scrub(store, max_bytes=CS) == ([("b", 4, 1)], 4)
        assert store.inventory()["b"] == [(0, 2), (2, 2), (5, 1)]
        assert store.get("b", 5, 1)[2] == payload[3 * CS:]
        assert full_scrub(store) == ([], 1)
        store.flush()
    with ChunkStore(str(tmp_path)) as store:
        assert store.inventory()["b"] == [(0, 2), (2, 2), (5, 1)]


def test_scrub_passes_in_steps_and_wraps(tmp_path, rng):
    """Steps of a bounded size cover every extent once, then the cursor wraps to None."""
    with ChunkStore(str(tmp_path)) as store:
        assert store.scrub_step(None, CS) == (None, [])
        for n in range(10):
            put(store, rng, f"b{n % 3}", 2 * n, 2)
        assert full_scrub(store, max_bytes=3 * CS) == ([], 5)  # 2 extents of 2 KiB a step
        assert full_scrub(store, max_bytes=1) == ([], 10)  # at least one extent a step
        cursor, _ = store.scrub_step(None, 1)
        store.delete_blobs(["b0", "b1", "b2"])
        assert store.scrub_step(cursor, 1) == (None, [])


def test_reput_of_a_dropped_chunk_repairs_it(tmp_path, rng):
    """Re-putting just the chunk scrub dropped makes get() of the whole range and the next scrub pass clean, after reopen too."""
    with ChunkStore(str(tmp_path)) as store:
        crcs, payload = make_chunks(rng, 3)
        store.put("b1", 0, 3, CS, crcs, payload)
        flip_byte(segment_paths(tmp_path)[0], payload_offset(0, "b1", 3) + CS + 100)
        assert full_scrub(store)[0] == [("b1", 1, 1)]
        with pytest.raises(ChunkNotFound, match="chunk 1"):
            store.get("b1", 0, 3)
        store.put("b1", 1, 1, CS, crcs[4:8], payload[CS:2 * CS])
        assert store.get("b1", 0, 3)[2] == payload
        assert full_scrub(store)[0] == []
        store.flush()
    with ChunkStore(str(tmp_path)) as store:
        assert store.get("b1", 0, 3)[2] == payload


def test_get_planned_before_compaction_reads_after_unlink(tmp_path, rng, monkeypatch):
    """A get paused between lookup and pread still reads its extent after compaction unlinks the segment."""
    real_pread, paused, resume = os.pread, threading.Event(), threading.Event()
    reader_thread, result = [], []

    def pread(fd, length, offset):
        if threading.current_thread() in reader_thread and not paused.is_set():
            paused.set()
            assert resume.wait(5)
        return real_pread(fd, length, offset)
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        payload = put(store, rng, "b1", 0, 2)
        put(store, rng, "junk", 0, 1)
        put(store, rng, "tail", 0, 3)
        store.delete_blobs(["junk"])
        monkeypatch.setattr(os, "pread", pread)
        reader_thread.append(threading.Thread(target=lambda: result.append(store.get("b1", 0, 2)[2])))
        reader_thread[0].start()
        assert paused.wait(5)
        assert store.compact(min_dead_fraction=0.0)["segments_compacted"] == 1
        assert not os.path.exists(os.path.join(tmp_path, "segments", "seg-00000001.dat"))
        put(store, rng, "more", 0, 3)  # a new segment may reuse a closed fd number
        resume.set()
        reader_thread[0].join()
        assert result == [payload]


# --- drop_range: dropping chunk ranges, splitting extents --------------------
def rec_bytes(blob, count, payload_len):
    """Bytes on disk of a chunks record (as put() writes it: with a payload CRC)."""
    return HEADER_BYTES + PAYLOAD_CRC_BYTES + len(blob) + 4 * count + payload_len


def seg_sizes(data_dir):
    return [os.path.getsize(p) for p in segment_paths(data_dir)]


def test_drop_range_splits_one_extent(tmp_path, rng):
    """Dropping the middle of an extent keeps both ends readable, the middle gone, and every stat exact."""
    with ChunkStore(str(tmp_path)) as store:
        payload = put(store, rng, "b1", 0, 8, short=100)
        assert store.drop_range("b1", 2, 3) == 3
        assert store.inventory() == {"b1": [(0, 2), (5, 3)]}
        assert store.get("b1", 0, 2)[2] == payload[:2 * CS]
        assert store.get("b1", 5, 3)[2] == payload[5 * CS:]
        assert store.get("b1", 6, 2)[2] == payload[6 * CS:]
        for first, count in [(2, 1), (4, 1), (1, 2), (0, 8)]:
            with pytest.raises(ChunkNotFound):
                store.get("b1", first, count)
        live = 5 * CS - 100
        assert (store.chunk_count, store.live_bytes, store.extent_count, store.blob_count) == (5, live, 2, 1)
        # The split record's header and blob id count once, plus the kept CRCs and payload.
        assert store.segment_stats()[0]["live_bytes"] == HEADER_BYTES + 2 + 4 * 5 + live


def test_drop_range_spanning_two_extents(tmp_path, rng):
    """A range over the end of one extent and the start of the next trims both, and gets across the cut work."""
    with ChunkStore(str(tmp_path)) as store:
        a = put(store, rng, "b1", 0, 4)
        b = put(store, rng, "b1", 4, 4)
        c = put(store, rng, "b1", 8, 2, short=9)
        assert store.drop_range("b1", 2, 4) == 4
        assert store.inventory() == {"b1": [(0, 2), (6, 2), (8, 2)]}
        assert store.get("b1", 0, 2)[2] == a[:2 * CS]
        assert store.get("b1", 6, 4)[2] == b[2 * CS:] + c  # a kept part and the next record
        with pytest.raises(ChunkNotFound):
            store.get("b1", 1, 6)
        assert (store.chunk_count, store.live_bytes, store.extent_count) == (6, 6 * CS - 9, 3)


def test_drop_range_over_whole_extents_and_blob(tmp_path, rng):
    """A range covering whole extents drops them without a split, and the blob once nothing is left."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 2)
        put(store, rng, "b1", 2, 2)
        put(store, rng, "b1", 6, 1)
        assert store.drop_range("b1", 0, 5) == 4
        assert store.inventory() == {"b1": [(6, 1)]}
        assert store.drop_range("b1", 0, 100) == 1
        assert store.inventory() == {} and (store.blob_count, store.chunk_count, store.live_bytes) == (0, 0, 0)
        assert [s["live_bytes"] for s in store.segment_stats()] == [0]


def test_drop_range_survives_reopen(tmp_path, rng):
    """Replaying drop records splits extents the same way: inventory, data and stats are identical after reopen."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 8, short=5)
        put(store, rng, "b1", 8, 4)
        put(store, rng, "b2", 0, 6)
        store.drop_range("b1", 1, 2)
        store.drop_range("b1", 6, 4)  # trims the first extent again, and the second
        store.drop_range("b2", 5, 10)
        store.flush()
        before = snapshot(store), store.segment_stats(), store.used_bytes
        assert before[0][0] == {"b1": [(0, 1), (3, 3), (10, 2)], "b2": [(0, 5)]}
    with ChunkStore(str(tmp_path)) as store:
        assert (snapshot(store), store.segment_stats(), store.used_bytes) == before


def test_drop_range_of_nothing_writes_nothing(tmp_path, rng):
    """drop_range over an unknown blob, a gap or past the end returns 0 and writes no record."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 2)
        put(store, rng, "b1", 5, 2)
        used = store.used_bytes
        for blob, first, count in [("nope", 0, 4), ("b1", 2, 3), ("b1", 7, 100)]:
            assert store.drop_range(blob, first, count) == 0
        assert store.used_bytes == used and seg_sizes(tmp_path) == [used]
        assert store.inventory() == {"b1": [(0, 2), (5, 2)]}
        for first, count in [(-1, 2), (0, 0), (0, 2**32)]:
            with pytest.raises(RemoteProtocolError):
                store.drop_range("b1", first, count)


def test_reput_of_original_range_replaces_split_parts(tmp_path, rng):
    """Re-putting a whole range after a partial drop replaces its parts, now and after reopen."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 6)
        store.drop_range("b1", 2, 2)
        again = put(store, rng, "b1", 0, 6)
        assert store.inventory() == {"b1": [(0, 6)]} and store.get("b1", 0, 6)[2] == again
        assert (store.chunk_count, store.extent_count, store.live_bytes) == (6, 1, 6 * CS)
        assert store.segment_stats()[0]["live_bytes"] == rec_bytes("b1", 6, 6 * CS)
    with ChunkStore(str(tmp_path)) as store:
        assert store.inventory() == {"b1": [(0, 6)]} and store.get("b1", 0, 6)[2] == again


def test_compaction_after_partial_drop_copies_only_kept_parts(tmp_path, rng):
    """Compacting a split record reclaims the dropped chunks and keeps the rest identical, before and after reopen."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        payload = put(store, rng, "b1", 0, 8, short=3)  # segment 1, alone (larger than a segment)
        put(store, rng, "tail", 0, 1)  # segment 2, active
        assert store.drop_range("b1", 2, 4) == 4
        before = snapshot(store)
        result = store.compact(min_dead_fraction=0.4)
        copies = rec_bytes("b1", 2, 2 * CS) + rec_bytes("b1", 2, 2 * CS - 3)
        assert result == {"segments_compacted": 1, "bytes_reclaimed": rec_bytes("b1", 8, 8 * CS - 3) - copies,
                          "corrupt": [], "postponed": []}
        assert 1 not in seg_nos(store) and snapshot(store) == before
        assert store.get("b1", 6, 2)[2] == payload[6 * CS:]
        live = [s["live_bytes"] for s in store.segment_stats()]
        assert sum(live) == rec_bytes("tail", 1, CS) + copies  # each kept part is now a record of its own
        assert store.used_bytes == sum(seg_sizes(tmp_path))
        store.flush()
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert snapshot(store) == before and [s["live_bytes"] for s in store.segment_stats()] == live


def test_dropping_every_part_leaves_segment_dead(tmp_path, rng):
    """Once every part of a split record is dropped its header stops counting, and compaction just unlinks it."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        put(store, rng, "b1", 0, 8)  # segment 1
        put(store, rng, "tail", 0, 1)  # segment 2, active
        store.drop_range("b1", 3, 2)
        store.drop_range("b1", 6, 2)
        store.drop_range("b1", 0, 3)
        assert store.inventory()["b1"] == [(5, 1)]
        store.drop_range("b1", 5, 1)
        assert store.segment_stats()[0]["live_bytes"] == 0
        assert store.compact(min_dead_fraction=1.0)["segments_compacted"] == 1
        assert store.inventory() == {"tail": [(0, 1)]}


def test_carried_drop_record_spares_later_put_into_the_gap(tmp_path, rng):
    """A drop record moved by compaction behind a later put into the dropped gap loses no kept chunk on reopen."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        payload = put(store, rng, "b1", 0, 8)  # segment 1, mostly live after the drop: not compacted
        put(store, rng, "junk", 0, 3)  # segment 2
        store.drop_range("b1", 2, 2)  # segment 2
        store.delete_blobs(["junk"])  # segment 2, now all dead
        gap = put(store, rng, "b1", 2, 2)  # segment 3, active
        assert store.compact()["segments_compacted"] == 1 and seg_nos(store) == [1, 3]
        store.flush()
        before = snapshot(store)
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert store.inventory() == {"b1": [(0, 2), (2, 2), (4, 4)]}
        assert store.get("b1", 0, 8)[2] == payload[:2 * CS] + gap + payload[4 * CS:]
        assert snapshot(store) == before


def test_scrub_after_split_reports_the_damaged_chunk(tmp_path, rng):
    """After a split, scrub checks each kept part on its own: damage in a kept part drops that chunk, in the dropped part nothing."""
    with ChunkStore(str(tmp_path)) as store:
        payload = put(store, rng, "b1", 0, 8)
        store.drop_range("b1", 3, 2)
        assert full_scrub(store) == ([], 1)
        flip_byte(segment_paths(tmp_path)[0], payload_offset(0, "b1", 8) + 3 * CS + 7)  # dropped chunk 3
        assert full_scrub(store)[0] == []
        flip_byte(segment_paths(tmp_path)[0], payload_offset(0, "b1", 8) + 6 * CS + 7)  # kept chunk 6
        assert full_scrub(store, max_bytes=1) == ([("b1", 6, 1)], 2)
        assert store.get("b1", 0, 3)[2] == payload[:3 * CS]
        assert store.inventory() == {"b1": [(0, 3), (5, 1), (7, 1)]}
        assert store.get("b1", 7, 1)[2] == payload[7 * CS:]


def test_compaction_drops_corrupt_chunk_of_split_record(tmp_path, rng):
    """Compaction re-checks each kept part of a split record: a damaged chunk is reported and dropped, the rest copied."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        payload = put(store, rng, "b1", 0, 8)  # segment 1
        put(store, rng, "tail", 0, 1)  # segment 2, active
        store.drop_range("b1", 3, 2)
        flip_byte(segment_paths(tmp_path)[0], payload_offset(0, "b1", 8) + 6 * CS + 7)  # kept chunk 6
        result = store.compact(min_dead_fraction=0.0)
        assert result["corrupt"] == [("b1", 6, 1)] and result["segments_compacted"] == 1
        kept = {"b1": [(0, 3), (5, 1), (7, 1)], "tail": [(0, 1)]}
        assert store.inventory() == kept
        assert store.get("b1", 0, 3)[2] == payload[:3 * CS] and store.get("b1", 7, 1)[2] == payload[7 * CS:]
        store.flush()
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert store.inventory() == kept and store.get("b1", 5, 1)[2] == payload[5 * CS:6 * CS]


def test_failed_fsync_poisons_the_store(tmp_path, monkeypatch):
    """After an fsync fails, a later flush must not report success for the lost writes."""
    store = ChunkStore(str(tmp_path / "store"))
    payload = b"x" * 100
    store.put("blob", 0, 1, 1024, crcs_to_bytes(chunk_crcs(payload, 1024)), payload)
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        store.flush()
    monkeypatch.undo()
    with pytest.raises(OSError):
        store.flush()
    with pytest.raises(OSError):
        store.put("blob2", 0, 1, 1024, crcs_to_bytes(chunk_crcs(payload, 1024)), payload)


# --- payload CRC of whole records, and spans (issue 15) ----------------------------------
def test_whole_record_span_carries_payload_crc_part_span_does_not(tmp_path, rng):
    """A span of a whole record is one byte range with the payload CRC put() computed (kept across a
    reopen); a span inside a record has none; both read back exactly what get() returns."""
    with ChunkStore(str(tmp_path)) as store:
        payload = put(store, rng, "b1", 0, 8, short=100)
        store.flush()
    with ChunkStore(str(tmp_path)) as store:  # the payload CRC comes back from the scan
        for first, count, crc in ((0, 8, zlib.crc32(payload)), (2, 3, None), (5, 3, None)):
            span = store.open_span("b1", first, count)
            try:
                assert span.payload_crc == crc
                assert len(span.ranges) == (1 if crc is not None else 2)
                _, crcs, data = store.get("b1", first, count)
                assert bytes(store.read_span(span)) == crcs + data
                assert span.body_len == len(crcs) + len(data)
            finally:
                store.close_span(span)
        assert store.open_span("b1", 6, 3) is None  # past the end: get_intact names the missing chunk
        assert store.open_span("nope", 0, 1) is None


def old_format_record(blob: str, first: int, crcs: bytes, payload: bytes) -> bytes:
    """A chunks record as written before payload CRCs (flags 0), built by hand."""
    head = struct.pack(">4sBBHQIIQ", b"BKR1", 1, len(blob), 0, first, len(crcs) // 4, CS, len(payload))
    return head + struct.pack(">I", zlib.crc32(blob.encode(), zlib.crc32(head))) + blob.encode() + crcs + payload


def test_old_format_records_read_scrub_and_gain_a_payload_crc_in_compaction(tmp_path, rng):
    """Records without a payload CRC (an older store) still read, are scrubbed chunk by chunk, and get a payload
    CRC when compaction copies them (after checking their chunk CRCs)."""
    crcs, payload = make_chunks(rng, 4, CS, 10)
    os.makedirs(tmp_path / "segments")
    with open(tmp_path / "segments" / "seg-00000001.dat", "wb") as f:
        f.write(old_format_record("old", 0, crcs, payload) + old_format_record("gone", 0, crcs, payload))
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert store.get("old", 0, 4) == (CS, crcs, payload)
        span = store.open_span("old", 0, 4)
        assert span.payload_crc is None and bytes(store.read_span(span)) == crcs + payload
        store.close_span(span)
        assert store.scrub_step(None, 1 << 20) == (None, [])
        put(store, rng, "tail", 0, 1)  # a new active segment, so segment 1 can be compacted
        store.delete_blobs(["gone"])
        assert store.compact(min_dead_fraction=0.4)["segments_compacted"] == 1
        span = store.open_span("old", 0, 4)
        assert span.payload_crc == zlib.crc32(payload) and bytes(store.read_span(span)) == crcs + payload
        store.close_span(span)


def test_damaged_payload_crc_costs_the_fast_check_not_the_record(tmp_path, rng):
    """A flipped payload CRC on disk leaves the record readable (its chunk CRCs decide); compaction, which checks
    them, writes a right one."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        payload = put(store, rng, "b1", 0, 3)
        store.flush()
    flip_byte(segment_paths(tmp_path)[0], HEADER_BYTES + 2)  # the first byte of b1's payload CRC
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        assert store.get("b1", 0, 3)[2] == payload
        span = store.open_span("b1", 0, 3)
        assert span.payload_crc not in (None, zlib.crc32(payload))
        store.close_span(span)
        assert store.scrub_step(None, 1 << 20) == (None, [])
        put(store, rng, "tail", 0, 1)
        store.drop_range("b1", 2, 1)
        assert store.compact(min_dead_fraction=0.2)["segments_compacted"] == 1
        span = store.open_span("b1", 0, 2)
        assert span.payload_crc == zlib.crc32(payload[:2 * CS])
        store.close_span(span)


def test_open_span_keeps_its_segment_readable_while_compaction_removes_it(tmp_path, rng):
    """A span pins its segment: compaction may move the record and unlink the file meanwhile, and the span
    still reads the bytes it stood for; closing it closes the retired descriptor."""
    with ChunkStore(str(tmp_path), segment_max_bytes=SMALL_SEG) as store:
        payload = put(store, rng, "b1", 0, 2)  # segment 1
        put(store, rng, "dead", 0, 1)
        put(store, rng, "tail", 0, 3)  # segment 2, active
        crcs = store.get("b1", 0, 2)[1]
        span = store.open_span("b1", 0, 2)
        first_segment = segment_paths(tmp_path)[0]
        store.delete_blobs(["dead"])
        assert store.compact(min_dead_fraction=0.2)["segments_compacted"] == 1
        assert not os.path.exists(first_segment)
        assert bytes(store.read_span(span)) == crcs + payload
        fd = span.fd
        store.close_span(span)
        with pytest.raises(OSError):
            os.fstat(fd)  # retired at the last unpin
        assert store.get("b1", 0, 2)[2] == payload  # from the copy
