"""Tests of chunk_store.ChunkStore on tmp_path: round trips, reopen, torn tail, damage."""

import logging
import os
import random
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chunk_store import HEADER_BYTES, ChunkStore  # noqa: E402
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
        good_end = store.used_bytes - (HEADER_BYTES + 2 + 2 * 4 + 2 * CS)
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


def test_partial_overlap_and_other_chunk_size_refused(tmp_path, rng):
    """A put that partly overlaps stored chunks, or changes the blob's chunk size, is refused."""
    with ChunkStore(str(tmp_path)) as store:
        put(store, rng, "b1", 0, 4)
        with pytest.raises(RemoteProtocolError, match="overlap"):
            put(store, rng, "b1", 2, 4)
        with pytest.raises(RemoteProtocolError, match="chunk size"):
            put(store, rng, "b1", 4, 4, chunk_size=512)
        assert store.inventory() == {"b1": [(0, 4)]}


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
