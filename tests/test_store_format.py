"""Tests that a chunk store never destroys records it cannot read: a newer format is refused
untouched (by the store and by a node process), damage in the newest segment is preserved
before the cut, and a torn tail is still cut (and kept) as after a crash."""

import hashlib
import logging
import os
import random
import sys
import zlib

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chunk_store  # noqa: E402
import forkserver  # noqa: E402
from chunk_store import _CRC, _HEAD, HEADER_BYTES, MAGIC, ChunkStore  # noqa: E402
from conftest import ROOT, flip_byte  # noqa: E402
from protocol import chunk_crcs, crcs_to_bytes  # noqa: E402

SEED = 20261128
CS = 1024


def raw_record(kind: int, flags: int, magic: bytes = MAGIC, blob: bytes = b"future", count: int = 2) -> bytes:
    """A record whose header CRC checks, with whatever kind and flags a later release might write."""
    payload = random.Random(SEED).randbytes(count * CS - 7)
    head = _HEAD.pack(magic, kind, len(blob), flags, 0, count, CS, len(payload))
    header = head + _CRC.pack(zlib.crc32(blob, zlib.crc32(head))) + blob
    return header + crcs_to_bytes(chunk_crcs(payload, CS)) + payload


def store_with_records(data_dir: str, blobs=("a", "b", "c")) -> tuple[str, list[int]]:
    """A store with one 3-chunk record per blob in one segment: (segment path, record start offsets)."""
    rng = random.Random(SEED)
    offsets = []
    with ChunkStore(data_dir) as store:
        for blob in blobs:
            offsets.append(store.used_bytes)
            payload = rng.randbytes(3 * CS)
            store.put(blob, 0, 3, CS, crcs_to_bytes(chunk_crcs(payload, CS)), payload)
        store.flush()
    seg_dir = os.path.join(data_dir, "segments")
    return os.path.join(seg_dir, sorted(os.listdir(seg_dir))[-1]), offsets


def splice(path: str, offset: int, record: bytes) -> None:
    """Insert record into the file at offset (as if a newer release had appended it there)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:offset] + record + data[offset:])


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("kind, flags, magic", [
    (1, 0x0002, MAGIC),   # a new flag bit on a chunks record
    (2, 0x0001, MAGIC),   # a flag on a tombstone, where none is known
    (9, 0, MAGIC),        # a new record kind
    (1, 0, b"BKR2"),      # a new record format version
])
def test_newer_record_mid_last_segment_refuses_and_changes_nothing(tmp_path, kind, flags, magic):
    """A whole record of a newer format makes the store refuse to open, naming segment and offset, file untouched."""
    path, offsets = store_with_records(str(tmp_path))
    splice(path, offsets[1], raw_record(kind, flags, magic))
    before = digest(path)
    with pytest.raises(Exception) as info:
        ChunkStore(str(tmp_path)).close()
    assert digest(path) == before, "the newest segment was changed"
    assert not os.path.exists(tmp_path / "torn")
    assert isinstance(info.value, chunk_store.StoreFormatError), info.value
    assert info.value.path == path and info.value.offset == offsets[1]
    assert "newer release" in str(info.value)


def test_newer_format_marker_refuses(tmp_path):
    """A FORMAT marker naming a newer store format is refused before any segment is read; ours is written."""
    store_with_records(str(tmp_path))
    marker = tmp_path / "FORMAT"
    assert marker.read_text() == f"chunk-store {chunk_store.STORE_FORMAT}\n"
    marker.write_text(f"chunk-store {chunk_store.STORE_FORMAT + 1}\n")
    with pytest.raises(chunk_store.StoreFormatError) as info:
        ChunkStore(str(tmp_path))
    assert info.value.offset is None and info.value.path == str(marker)


def test_damaged_header_mid_last_segment_preserves_the_records_after_it(tmp_path, caplog):
    """A flipped header byte in the middle of the newest segment: the bytes cut are copied to torn/ first."""
    path, offsets = store_with_records(str(tmp_path))
    with open(path, "rb") as f:
        original = f.read()
    flip_byte(path, offsets[1] + 18)  # inside the count field: the header CRC no longer matches
    with caplog.at_level(logging.WARNING, logger="chunk_store"):
        store = ChunkStore(str(tmp_path))
    try:
        assert store.inventory() == {"a": [(0, 3)]}
    finally:
        store.close()
    copies = os.listdir(tmp_path / "torn")
    assert copies == [f"{os.path.basename(path)}.at-{offsets[1]}"]
    with open(tmp_path / "torn" / copies[0], "rb") as f:
        kept = bytearray(f.read())
    kept[18] ^= 0xFF  # undo the rot: every byte of records b and c is there
    assert bytes(kept) == original[offsets[1]:]
    assert "not a torn append" in caplog.text and copies[0] in caplog.text


def test_torn_tail_is_still_cut_and_the_cut_bytes_kept(tmp_path, caplog):
    """A last record cut short by a crash is truncated away as before, its bytes copied to torn/ first."""
    path, offsets = store_with_records(str(tmp_path))
    with open(path, "rb") as f:
        original = f.read()
    with open(path, "r+b") as f:
        f.truncate(offsets[2] + HEADER_BYTES + 100)
    with caplog.at_level(logging.WARNING, logger="chunk_store"):
        store = ChunkStore(str(tmp_path))
    try:
        assert store.inventory() == {"a": [(0, 3)], "b": [(0, 3)]}
    finally:
        store.close()
    assert os.path.getsize(path) == offsets[2]
    assert "torn record" in caplog.text
    (copy,) = os.listdir(tmp_path / "torn")
    with open(tmp_path / "torn" / copy, "rb") as f:
        assert f.read() == original[offsets[2]:offsets[2] + HEADER_BYTES + 100]


def test_node_process_refuses_a_newer_store_with_exit_4(tmp_path):
    """storage_node.py on a data dir holding a newer-format record exits 4, says why, and changes nothing."""
    data_dir = tmp_path / "node"
    path, offsets = store_with_records(str(data_dir / "chunks"))
    splice(path, offsets[2], raw_record(1, 0x0004))
    before = digest(path)
    result = forkserver.run([sys.executable, os.path.join(ROOT, "storage_node.py"), "--data-dir", str(data_dir),
                             "--port", "0", "--master", "127.0.0.1:1"],
                            capture_output=True, timeout=30, text=True)
    assert result.returncode == 4, result
    assert "newer release" in result.stderr and f"offset {offsets[2]}" in result.stderr
    assert digest(path) == before
