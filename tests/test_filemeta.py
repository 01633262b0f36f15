"""Backups that keep history: file metadata restored (issue 13 item 7).

A unit test of the metadata record a peer may send (filemeta.checked), then
one module cluster of real processes: a tree with modes, mtimes, a relative
and a dangling symlink and empty directories round-trips through
``upload DIR NAME`` and ``download NAME/ DIR``; ``--no-metadata`` skips the
modes and times; an entry stored without metadata still restores.
"""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from conftest import FAST_MASTER, FAST_TIMING, random_bytes, running_cluster

import client as client_module
import filemeta
import protocol

MTIME_NS = 1_600_000_000_123_456_789  # 2020-09-13, with nanoseconds


@pytest.mark.parametrize("meta", [
    "x", {}, {"type": "fifo"}, {"type": "file", "mode": 0o10000}, {"type": "file", "mode": "755"},
    {"type": "file", "owner": "root"}, {"type": "file", "mtime_ns": -1}, {"type": "file", "uid": True},
])
def test_checked_refuses_malformed_metadata(meta):
    """A peer's metadata record with an unknown key, kind or a value of the wrong type or range is BAD_REQUEST."""
    with pytest.raises(protocol.RemoteProtocolError):
        filemeta.checked(meta)


def test_checked_keeps_a_well_formed_record():
    """A record as capture makes it passes unchanged."""
    meta = filemeta.capture(os.lstat(__file__))
    assert filemeta.checked(meta) == meta


@pytest.fixture(scope="module")
def meta_cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("snapshots")
    with running_cluster(directory / "cluster", nodes=2, node_args=[*FAST_TIMING, "--scrub-rate", "0"]) as cluster:
        yield cluster


def make_tree(root) -> dict:
    """A tree of every kind a backup records; returns relative path -> (kind, mode or target)."""
    (root / "sub" / "deeper" / "empty2").mkdir(parents=True)
    (root / "empty").mkdir()
    files = {"run.sh": (0o751, 3000), "sub/a.txt": (0o640, 100), "sub/deeper/b.bin": (0o604, 2500)}
    for n, (relative, (mode, size)) in enumerate(sorted(files.items())):
        path = root / relative
        path.write_bytes(random_bytes(1370 + n, size))
        path.chmod(mode)
        os.utime(path, ns=(MTIME_NS + n, MTIME_NS + n))
    os.symlink("sub/a.txt", root / "link")
    os.symlink("nowhere/x", root / "dangling")
    (root / "empty").chmod(0o750)
    os.utime(root / "empty", ns=(MTIME_NS, MTIME_NS))
    os.utime(root / "sub" / "deeper" / "empty2", ns=(MTIME_NS + 7, MTIME_NS + 7))
    return files


def test_tree_round_trips_modes_mtimes_symlinks_and_empty_directories(meta_cluster, tmp_path):
    """download NAME/ DIR gives back modes, mtimes, links (not followed) and empty dirs; --no-metadata skips the first two."""
    cluster = meta_cluster
    source = tmp_path / "source"
    files = make_tree(source)
    up = cluster.cli("upload", str(source), "tree")
    assert up.returncode == 0, up
    # An entry stored without metadata (as before this existed) restores as a plain file.
    client = cluster.client()
    client.conn.send(protocol.UploadBegin(name="tree/plain.txt", size=11))
    client.conn.send(protocol.Data(body=b"no metadata"))
    client.conn.send(protocol.UploadEnd(sha256=hashlib.sha256(b"no metadata").hexdigest()))
    client.conn.expect(protocol.Uploaded)
    client.close()

    out = tmp_path / "out"
    down = cluster.cli("download", "tree/", str(out))
    assert down.returncode == 0, down
    for n, (relative, (mode, _)) in enumerate(sorted(files.items())):
        restored = os.lstat(out / relative)
        assert stat.S_IMODE(restored.st_mode) == mode, relative
        assert restored.st_mtime_ns == MTIME_NS + n, relative
        assert (out / relative).read_bytes() == (source / relative).read_bytes()
    assert os.readlink(out / "link") == "sub/a.txt" and (out / "link").read_bytes() == (source / "sub/a.txt").read_bytes()
    assert os.readlink(out / "dangling") == "nowhere/x" and not (out / "dangling").exists()
    assert os.lstat(out / "link").st_mtime_ns == os.lstat(source / "link").st_mtime_ns
    assert (out / "empty").is_dir() and stat.S_IMODE(os.stat(out / "empty").st_mode) == 0o750
    assert os.stat(out / "empty").st_mtime_ns == MTIME_NS
    assert (out / "sub" / "deeper" / "empty2").is_dir()
    assert os.stat(out / "sub" / "deeper" / "empty2").st_mtime_ns == MTIME_NS + 7
    assert (out / "plain.txt").read_bytes() == b"no metadata"

    bare = tmp_path / "bare"
    down = cluster.cli("download", "tree/", str(bare), "--no-metadata")
    assert down.returncode == 0, down
    assert stat.S_IMODE(os.stat(bare / "run.sh").st_mode) != 0o751
    assert os.stat(bare / "run.sh").st_mtime_ns != MTIME_NS
    assert os.readlink(bare / "dangling") == "nowhere/x" and (bare / "empty").is_dir()


def test_single_file_keeps_mode_and_mtime(meta_cluster, tmp_path):
    """upload FILE NAME records mode and mtime; download gives them back, --no-metadata does not."""
    cluster = meta_cluster
    local = tmp_path / "tool"
    local.write_bytes(random_bytes(1380, 1500))
    local.chmod(0o710)
    os.utime(local, ns=(MTIME_NS, MTIME_NS))
    client = cluster.client()
    try:
        client.upload_file(str(local), "bin/tool")
        listed = client.list("bin/")
        assert listed[0]["mtime"] == pytest.approx(MTIME_NS / 1e9)  # the file's own time, not the upload's
        back = tmp_path / "back"
        client.download("bin/tool", str(back))
        assert stat.S_IMODE(os.stat(back).st_mode) == 0o710 and os.stat(back).st_mtime_ns == MTIME_NS
        client.download("bin/tool", str(back), force=True, restore=client_module.Restore(metadata=False))
        assert os.stat(back).st_mtime_ns != MTIME_NS
    finally:
        client.close()
