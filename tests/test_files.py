"""Integration tests of files as files: range reads, append, in-place write, touch, stat, locks.

Most tests share one module-scoped cluster (a master and three nodes) and
use names of their own, so the suite pays for one start-up; tests that kill
the master or need a short lock lease get clusters of their own.  Every
process started here is killed by PID in a finalizer.  Random data is seeded
and the seed is named in the assertion messages.  Chunks are 1024 bytes and
batches 1 MiB (config.ini), so small files exercise every boundary.

The range-read latency is measured, printed (run with ``-s``) and never
asserted: on a 16 MiB file by default, on a 256 MiB file with BENCH_RANGE=1.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import random
import re
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import pytest

import forkserver
from conftest import (FAST_MASTER, FAST_TIMING, ROOT, TestCluster, master_address, node_chunks, random_bytes,
                      sha256, wait_until, write_local)

import client as client_module
import protocol
import transfers
import transport
import views

KIB = 1024
MIB = 1024 * 1024
CHUNK_BYTES = 1024  # chunk_size_bytes in config.ini
BATCH_CHUNKS = 1024  # batch_bytes / chunk_size_bytes in config.ini
REPLICATION = 2  # replication in config.ini
# A range file: five whole chunks and a partial sixth.
RANGE_SIZE = 5 * CHUNK_BYTES + 300
RANGE_SEED = 1601
# Seconds for the master to have a discarded upload's chunks deleted (it
# takes milliseconds: the GC thread is woken at once).
GC_TIMEOUT_S = 5.0


# --- helpers --------------------------------------------------------------------------------


def with_client(cluster, call):
    c = cluster.client()
    try:
        return call(c)
    finally:
        c.close()


def upload(cluster, name: str, data: bytes, tmp_path, mode: str = "replace", offset: int = 0) -> protocol.Uploaded:
    """Store ``data`` under ``name`` through an in-process Client (replace, append or write)."""
    path = write_local(tmp_path, f"{mode}-{sha256(data)[:16]}", data)
    return with_client(cluster, lambda c: c.upload_file(path, name, mode=mode, offset=offset))


def download(cluster, name: str, tmp_path, label: str = "dl") -> bytes:
    destination = tmp_path / f"download-{label}"
    with_client(cluster, lambda c: c.download(name, str(destination), force=True))
    data = destination.read_bytes()
    destination.unlink()
    return data


def stat(cluster, name: str) -> protocol.StatReply:
    return with_client(cluster, lambda c: c.stat(name))


def listed_size(cluster, name: str) -> int:
    entries = with_client(cluster, lambda c: c.list(name))
    return {e["name"]: e["size"] for e in entries}[name]


def lock_of(cluster, name: str) -> dict | None:
    """The LOCKS entry of ``name`` (holder and queue), or None if nobody holds it."""
    for lock in with_client(cluster, lambda c: c.locks()):
        if lock["name"] == name:
            return lock
    return None


def waiting_count(cluster, name: str) -> int:
    lock = lock_of(cluster, name)
    return len(lock["waiting"]) if lock else 0


def stored_chunks(cluster) -> int:
    """Chunks held by all nodes, as the master last heard in heartbeats."""
    return cluster.status().totals["chunks"]


def chunk_placement(runs: list) -> dict[int, tuple]:
    """chunk index -> (replica node ids, blob), from STAT runs [first, count, nodes, blob]."""
    return {chunk: (tuple(sorted(nodes)), blob)
            for first, count, nodes, blob in runs for chunk in range(first, first + count)}


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


def small_config(tmp_path, **master_keys) -> str:
    """A copy of config.ini with these [master] keys changed; returns its path."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "config.ini"), encoding="utf-8")
    for key, value in master_keys.items():
        parser["master"][key] = str(value)
    path = tmp_path / "files-test.ini"
    with open(path, "w", encoding="utf-8") as f:
        parser.write(f)
    return str(path)


def start_cluster(data_dir, **kwargs) -> TestCluster:
    cluster = TestCluster(str(data_dir), nodes=3, master_args=FAST_MASTER, node_args=FAST_TIMING, **kwargs)
    cluster.start()
    try:
        cluster.wait_nodes_alive(3)
    except BaseException:
        cluster.stop()
        raise
    return cluster


class LockHolder:
    """A raw client that has begun an append to ``name`` and so holds its write lock.

    ``address`` is its side of the connection, the owner the master names.
    ``finish()`` completes the append; ``close()`` / ``reset()`` abandon it
    (FIN / RST).
    """

    def __init__(self, cluster, name: str, first_data: bytes):
        self.name = name
        self.conn = transport.Connection(master_address(cluster), "client", timeout_s=20.0)
        self.address = transport.format_address(self.conn.sock.getsockname())
        self._sha = hashlib.sha256()
        self.conn.send(protocol.UploadBegin(name=name, mode="append"))
        self.send(first_data)
        wait_until(lambda: (lock_of(cluster, name) or {}).get("holder") == self.address,
                   message=f"{self.address} holding the lock of {name!r}")

    def send(self, data: bytes, frame_bytes: int = 256 * KIB) -> None:
        self._sha.update(data)
        for start in range(0, len(data), frame_bytes):
            self.conn.send(protocol.Data(body=data[start:start + frame_bytes]), flush=False)
        self.conn.flush()

    def finish(self) -> protocol.Uploaded:
        self.conn.send(protocol.UploadEnd(sha256=self._sha.hexdigest()))
        return self.conn.expect(protocol.Uploaded)

    def reset(self) -> None:
        """Vanish abruptly: the kernel answers with RST, no orderly close."""
        self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """A master and three nodes shared by the tests of this module (each uses its own names)."""
    cluster = start_cluster(tmp_path_factory.mktemp("files-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def lease_cluster(tmp_path_factory):
    """A cluster whose master takes the lock from a writer silent for 1 s (lock_lease_s = 1)."""
    directory = tmp_path_factory.mktemp("lease-cluster")
    cluster = start_cluster(directory / "cluster", config_path=small_config(directory, lock_lease_s=1))
    yield cluster
    cluster.stop()


@pytest.fixture
def holders():
    """Factory of LockHolders, each closed at teardown."""
    made = []

    def make(cluster, name: str, first_data: bytes) -> LockHolder:
        holder = LockHolder(cluster, name, first_data)
        made.append(holder)
        return holder

    yield make
    for holder in made:
        holder.close()


@pytest.fixture
def spawn():
    """Start the client CLI in the background: ``spawn(cluster, *args)`` -> Popen, killed at teardown."""
    started = []

    def start(cluster, *args, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        argv = [sys.executable, os.path.join(ROOT, "client.py"), "--master", cluster.master_address, "--quiet",
                *args]
        proc = forkserver.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cluster.data_dir)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finished(proc: subprocess.Popen, timeout_s: float = 30.0) -> tuple[int, str]:
    """Exit status and stderr of a spawned client."""
    _, stderr = proc.communicate(timeout=timeout_s)
    return proc.returncode, stderr.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def range_file(shared_cluster, tmp_path_factory):
    """(name, bytes) of a stored file of five whole chunks and a partial sixth."""
    data = random_bytes(RANGE_SEED, RANGE_SIZE)
    upload(shared_cluster, "range/file", data, tmp_path_factory.mktemp("range"))
    return "range/file", data


# --- range reads ------------------------------------------------------------------------------
RANGES = {
    "first-100": (0, 100),
    "last-byte-of-chunk-0": (1023, 1),
    "first-byte-of-chunk-1": (1024, 1),
    "across-chunk-0-1": (1000, 100),
    "two-bytes-across-boundary": (1023, 2),
    "whole-chunk-1": (1024, 1024),
    "across-three-chunks": (1000, 2100),
    "last-byte": (RANGE_SIZE - 1, 1),
    "last-byte-to-end": (RANGE_SIZE - 1, -1),
    "past-the-end-is-clipped": (RANGE_SIZE - 100, 1000),
    "zero-length": (1024, 0),
    "offset-at-size-is-empty": (RANGE_SIZE, -1),
    "whole-file": (0, -1),
}


def expected_range(data: bytes, offset: int, length: int) -> bytes:
    return data[offset:] if length < 0 else data[offset:offset + length]


@pytest.mark.parametrize("offset,length", list(RANGES.values()), ids=list(RANGES))
def test_cat_prints_exactly_the_requested_range(shared_cluster, range_file, offset, length):
    """`cat --offset --length` prints exactly those bytes, clipped at the end of the file."""
    name, data = range_file
    to_the_end = [] if length < 0 else ["--length", str(length)]  # no --length: to the end
    result = shared_cluster.cli("cat", name, "--offset", str(offset), *to_the_end)
    assert result.returncode == client_module.EXIT_OK, result
    assert result.stdout == expected_range(data, offset, length), f"offset {offset} length {length} (seed {RANGE_SEED})"


@pytest.mark.parametrize("case", ["first-100", "last-byte-of-chunk-0", "across-chunk-0-1", "past-the-end-is-clipped",
                                  "offset-at-size-is-empty", "last-byte"])
def test_download_writes_exactly_the_requested_range(shared_cluster, range_file, tmp_path, case):
    """`download --offset --length` writes exactly those bytes to the local file, clipped at the end."""
    name, data = range_file
    offset, length = RANGES[case]
    destination = tmp_path / "range.out"
    to_the_end = [] if length < 0 else ["--length", str(length)]
    result = shared_cluster.cli("download", name, str(destination), "--offset", str(offset), *to_the_end)
    assert result.returncode == client_module.EXIT_OK, result
    assert destination.read_bytes() == expected_range(data, offset, length), f"{case} (seed {RANGE_SEED})"


@pytest.mark.parametrize("command", ["cat", "download"])
def test_offset_past_the_end_exits_invalid_range(shared_cluster, range_file, tmp_path, command):
    """An offset past the end exits INVALID_RANGE with one stderr line naming offset and size, writing nothing."""
    name, _ = range_file
    destination = tmp_path / "nothing.out"
    args = [command, name] + ([str(destination)] if command == "download" else [])
    result = shared_cluster.cli(*args, "--offset", str(RANGE_SIZE + 1), "--length", "10")
    assert result.returncode == client_module.EXIT_INVALID_RANGE, result
    assert one_line(result.stderr), result
    assert "INVALID_RANGE" in result.stderr and str(RANGE_SIZE + 1) in result.stderr \
        and str(RANGE_SIZE) in result.stderr, result
    assert result.stdout == b""
    assert not os.listdir(tmp_path), "a failed range download left a file behind"


# --- a range read fetches only the chunks it needs -----------------------------------------
SYNTHETIC = {"size": 3000 * CHUNK_BYTES, "chunks": 3000, "chunk_size": CHUNK_BYTES, "batch_chunks": BATCH_CHUNKS,
             "version": "v", "sha256": "", "mtime": 0.0, "runs": [[0, 3000, ["a", "b"]]]}
PLANS = {
    # name: (offset, length, [(first_chunk, count, skip, take), ...])
    "100-bytes-inside-one-chunk": (5000, 100, [(4, 1, 904, 100)]),
    "100-bytes-at-a-chunk-start": (4096, 100, [(4, 1, 0, 100)]),
    "100-bytes-across-a-chunk-boundary": (1000, 100, [(0, 2, 1000, 100)]),
    "100-bytes-across-a-batch-boundary": (BATCH_CHUNKS * CHUNK_BYTES - 50, 100,
                                          [(BATCH_CHUNKS - 1, 1, 974, 50), (BATCH_CHUNKS, 1, 0, 50)]),
    "last-byte": (3000 * CHUNK_BYTES - 1, 1, [(2999, 1, 1023, 1)]),
}


@pytest.mark.parametrize("offset,length,pieces", list(PLANS.values()), ids=list(PLANS))
def test_plan_pieces_covers_only_the_chunks_of_the_range(offset, length, pieces):
    """plan_pieces asks for the chunks a range touches and no others, split at batch boundaries."""
    plan = list(transfers.plan_pieces(SYNTHETIC, offset, length))
    assert [(first, count, skip, take) for first, count, _, _, skip, take in plan] == pieces
    assert all(nodes == ["a", "b"] and blob == "v" for _, _, nodes, blob, _, _ in plan)


def test_plan_pieces_reads_each_chunk_from_its_own_blob():
    """A range across runs of different blobs (after a write) reads each chunk from its run's blob."""
    entry = {**SYNTHETIC, "runs": [[0, 2, ["a", "b"]], [2, 2998, ["b", "c"], "old"]]}
    plan = list(transfers.plan_pieces(entry, 2000, 100))
    assert plan == [(1, 1, ["a", "b"], "v", 976, 48), (2, 1, ["b", "c"], "old", 0, 52)]


def test_range_of_a_stored_file_plans_only_its_chunks(shared_cluster, range_file):
    """On a stored file's STAT entry, a 100-byte read within chunk 2 plans exactly one one-chunk piece."""
    name, _ = range_file
    reply = stat(shared_cluster, name)
    entry = {"chunk_size": reply.chunk_size, "batch_chunks": BATCH_CHUNKS, "version": reply.version,
             "runs": reply.runs}
    plan = list(transfers.plan_pieces(entry, 2 * CHUNK_BYTES + 10, 100))
    assert [(first, count, skip, take) for first, count, _, _, skip, take in plan] == [(2, 1, 10, 100)]
    assert len(plan[0][2]) == REPLICATION


# --- append -----------------------------------------------------------------------------------
APPEND_STARTS = {"missing": None, "empty": 0, "chunk-aligned": 2 * CHUNK_BYTES, "unaligned": 2 * CHUNK_BYTES + 300}


@pytest.mark.parametrize("start", list(APPEND_STARTS), ids=list(APPEND_STARTS))
def test_append_adds_bytes_at_the_end(shared_cluster, tmp_path, start):
    """`append` adds its bytes after the old ones: content, stat's sha256 and list's size all agree."""
    seed = 1700 + list(APPEND_STARTS).index(start)
    name = f"append/{start}"
    size = APPEND_STARTS[start]
    old = random_bytes(seed, size or 0)
    if size == 0:
        assert shared_cluster.cli("touch", name).returncode == client_module.EXIT_OK
    elif size:
        upload(shared_cluster, name, old, tmp_path)
    added = random_bytes(seed + 100, 1500)  # crosses a chunk boundary whatever the start
    result = shared_cluster.cli("append", name, write_local(tmp_path, "added", added))
    assert result.returncode == client_module.EXIT_OK, result
    expected = old + added
    assert download(shared_cluster, name, tmp_path) == expected, f"seed {seed}"
    reply = stat(shared_cluster, name)
    assert (reply.size, reply.chunks, reply.sha256) == \
        (len(expected), -(-len(expected) // CHUNK_BYTES), sha256(expected)), f"seed {seed}"
    assert listed_size(shared_cluster, name) == len(expected)


def test_append_from_stdin(shared_cluster, tmp_path):
    """`append NAME -` appends what it reads on stdin."""
    seed = 1710
    old, added = random_bytes(seed, 1500), random_bytes(seed + 1, 2000)
    upload(shared_cluster, "append/stdin", old, tmp_path)
    result = shared_cluster.cli("append", "append/stdin", "-", stdin=added)
    assert result.returncode == client_module.EXIT_OK, result
    assert download(shared_cluster, "append/stdin", tmp_path) == old + added, f"seed {seed}"
    assert stat(shared_cluster, "append/stdin").sha256 == sha256(old + added), f"seed {seed}"


# --- in-place write ---------------------------------------------------------------------------
WRITES = {
    # name: (old size, offset, bytes written)
    "across-a-chunk-boundary": (5 * CHUNK_BYTES, 1000, 100),
    "past-the-end-extends": (3000, 2900, 300),
    "at-size-appends": (3000, 3000, 500),
    "at-offset-0": (3000, 0, 10),
}


@pytest.mark.parametrize("case", list(WRITES), ids=list(WRITES))
def test_write_overwrites_bytes_in_place(shared_cluster, tmp_path, case):
    """`write --offset` replaces the bytes from the offset, extending the file if it runs past the end."""
    seed = 1800 + list(WRITES).index(case)
    size, offset, count = WRITES[case]
    name = f"write/{case}"
    old, new = random_bytes(seed, size), random_bytes(seed + 100, count)
    upload(shared_cluster, name, old, tmp_path)
    result = shared_cluster.cli("write", name, write_local(tmp_path, "new", new), "--offset", str(offset))
    assert result.returncode == client_module.EXIT_OK, result
    expected = old[:offset] + new + old[offset + count:]
    assert download(shared_cluster, name, tmp_path) == expected, f"{case} (seed {seed})"
    assert stat(shared_cluster, name).sha256 == sha256(expected), f"{case} (seed {seed})"
    assert listed_size(shared_cluster, name) == len(expected)


def test_write_past_the_end_exits_invalid_range_and_changes_nothing(shared_cluster, tmp_path):
    """`write` at an offset beyond the size exits INVALID_RANGE and leaves the file as it was."""
    seed = 1810
    old = random_bytes(seed, 3000)
    upload(shared_cluster, "write/beyond", old, tmp_path)
    before = stat(shared_cluster, "write/beyond")
    result = shared_cluster.cli("write", "write/beyond", write_local(tmp_path, "new", b"x" * 10), "--offset", "3001")
    assert result.returncode == client_module.EXIT_INVALID_RANGE, result
    assert one_line(result.stderr) and "3001" in result.stderr, result
    assert stat(shared_cluster, "write/beyond") == before
    assert download(shared_cluster, "write/beyond", tmp_path) == old, f"seed {seed}"


def test_write_keeps_untouched_chunks_on_their_replicas(shared_cluster, tmp_path):
    """After a write, untouched chunks keep their nodes and blob; only the touched ones move to a new blob."""
    seed = 1820
    upload(shared_cluster, "write/cow", random_bytes(seed, 5 * CHUNK_BYTES), tmp_path)
    before = json.loads(shared_cluster.cli("stat", "--json", "write/cow").stdout)
    result = shared_cluster.cli("write", "write/cow", write_local(tmp_path, "new", b"w" * 100), "--offset", "1000")
    assert result.returncode == client_module.EXIT_OK, result
    after = json.loads(shared_cluster.cli("stat", "--json", "write/cow").stdout)
    old_chunks, new_chunks = chunk_placement(before["runs"]), chunk_placement(after["runs"])
    assert sorted(new_chunks) == list(range(5))
    for chunk in (2, 3, 4):
        assert new_chunks[chunk] == old_chunks[chunk], f"untouched chunk {chunk} moved: {after['runs']}"
    for chunk in (0, 1):
        nodes, blob = new_chunks[chunk]
        assert blob == after["version"] != before["version"], f"touched chunk {chunk}: {after['runs']}"
        assert len(set(nodes)) == REPLICATION


# --- readers during writes --------------------------------------------------------------------
CONCURRENCY_S = 3.0


def test_readers_during_writes_see_only_whole_versions(shared_cluster, tmp_path):
    """Readers running while a writer writes and appends only ever get a complete version, never a mix."""
    seed = 1900
    rng = random.Random(seed)
    name = "concurrent/file"
    content = rng.randbytes(3 * CHUNK_BYTES + 200)
    upload(shared_cluster, name, content, tmp_path)
    versions = {sha256(content)}  # every full content the writer may have made visible
    acknowledged = [sha256(content)]
    seen: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def write():
        nonlocal content
        c = shared_cluster.client()
        try:
            for n in range(10 ** 6):
                if stop.is_set():
                    return
                piece = rng.randbytes(rng.randint(1, 1500))
                offset = len(content) if n % 2 else rng.randrange(len(content) + 1)
                new = content[:offset] + piece + content[offset + len(piece):]
                versions.add(sha256(new))  # before it can become visible
                path = write_local(tmp_path, f"piece-{n}", piece)
                reply = c.upload_file(path, name, mode="append" if n % 2 else "write", offset=offset)
                os.unlink(path)
                if reply.sha256 != sha256(new):
                    errors.append(f"write {n} at {offset}: master's sha256 differs from the expected content")
                    return
                content = new
                acknowledged.append(reply.sha256)
        except Exception as exc:
            errors.append(f"writer: {exc!r}")
        finally:
            c.close()

    def read(r):
        c = shared_cluster.client()
        destination = tmp_path / f"reader-{r}"
        try:
            while not stop.is_set():
                c.download(name, str(destination), force=True)
                seen.append(sha256(destination.read_bytes()))
        except Exception as exc:
            errors.append(f"reader {r}: {exc!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + CONCURRENCY_S
    while time.monotonic() < deadline and not errors:
        stop.wait(0.05)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, f"seed {seed}: " + "; ".join(errors)
    mixes = [digest for digest in seen if digest not in versions]
    assert not mixes, f"readers saw {len(mixes)} content(s) that were never a whole version (seed {seed})"
    assert len(acknowledged) >= 4 and len(seen) >= 10, \
        f"too little happened: {len(acknowledged)} versions, {len(seen)} reads (seed {seed})"
    assert len(set(seen)) > 1, f"readers saw only one version in {len(seen)} reads (seed {seed})"
    assert sha256(download(shared_cluster, name, tmp_path)) == acknowledged[-1], f"seed {seed}"


# --- write locks ------------------------------------------------------------------------------
def test_writers_of_one_name_are_served_in_arrival_order(shared_cluster, tmp_path, holders, spawn):
    """Writers queued behind a lock holder append in the order they arrived, after the holder."""
    seed = 2000
    name = "locks/fifo"
    base, a1, a2, b, c = (random_bytes(seed + n, 700 + n) for n in range(5))
    upload(shared_cluster, name, base, tmp_path)
    holder = holders(shared_cluster, name, a1)
    writer_b = spawn(shared_cluster, "append", name, write_local(tmp_path, "b", b))
    wait_until(lambda: waiting_count(shared_cluster, name) == 1, message="B queued")
    writer_c = spawn(shared_cluster, "append", name, write_local(tmp_path, "c", c))
    wait_until(lambda: waiting_count(shared_cluster, name) == 2, message="C queued behind B")
    holder.send(a2)
    holder.finish()
    assert finished(writer_b)[0] == client_module.EXIT_OK
    assert finished(writer_c)[0] == client_module.EXIT_OK
    expected = base + a1 + a2 + b + c
    assert download(shared_cluster, name, tmp_path) == expected, f"not A, B, C in order (seed {seed})"
    assert stat(shared_cluster, name).sha256 == sha256(expected)
    assert lock_of(shared_cluster, name) is None


def test_no_wait_fails_fast_naming_the_holder(shared_cluster, tmp_path, holders):
    """`append --no-wait` on a locked name exits FILE_LOCKED within 2 s, naming the holder."""
    name = "locks/no-wait"
    upload(shared_cluster, name, b"old", tmp_path)
    holder = holders(shared_cluster, name, b"held")
    started = time.monotonic()
    result = shared_cluster.cli("append", name, write_local(tmp_path, "x", b"x"), "--no-wait")
    elapsed = time.monotonic() - started
    assert result.returncode == client_module.EXIT_FILE_LOCKED, result
    assert elapsed < 2.0, f"--no-wait took {elapsed:.2f} s"
    assert one_line(result.stderr) and holder.address in result.stderr, result
    holder.close()
    wait_until(lambda: lock_of(shared_cluster, name) is None, message="lock released")
    assert download(shared_cluster, name, tmp_path) == b"old"


def test_wait_gives_up_after_the_given_seconds(shared_cluster, tmp_path, holders):
    """`append --wait 0.5` on a locked name exits FILE_LOCKED after about half a second."""
    name = "locks/wait"
    upload(shared_cluster, name, b"old", tmp_path)
    holders(shared_cluster, name, b"held")
    started = time.monotonic()
    result = shared_cluster.cli("append", name, write_local(tmp_path, "x", b"x"), "--wait", "0.5")
    elapsed = time.monotonic() - started
    assert result.returncode == client_module.EXIT_FILE_LOCKED, result
    assert 0.5 <= elapsed < 2.5, f"--wait 0.5 gave up after {elapsed:.2f} s"


def test_locks_lists_the_holder_and_the_queue(shared_cluster, tmp_path, holders, spawn):
    """`locks` shows who holds a name's lock and who waits for it."""
    name = "locks/listed"
    holder = holders(shared_cluster, name, b"held")
    waiter = spawn(shared_cluster, "append", name, write_local(tmp_path, "w", b"w"))
    wait_until(lambda: waiting_count(shared_cluster, name) == 1, message="a writer queued")
    result = shared_cluster.cli("locks")
    assert result.returncode == client_module.EXIT_OK, result
    lines = result.stdout.decode().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"{name}: ")))
    assert lines[start].startswith(f"{name}: held by {holder.address} since "), lines
    assert re.match(r"    waiting: 127\.0\.0\.1:\d+ since ", lines[start + 1]), lines
    assert start + 2 == len(lines) or not lines[start + 2].startswith("    waiting:"), lines
    holder.finish()
    assert finished(waiter)[0] == client_module.EXIT_OK


def test_disconnected_lock_holder_releases_at_once_and_changes_nothing(shared_cluster, tmp_path, holders):
    """A writer whose connection is reset mid-append loses the lock at once and the file stays as it was."""
    seed = 2100
    name = "locks/reset"
    old = random_bytes(seed, 1500)
    upload(shared_cluster, name, old, tmp_path)
    before = stat(shared_cluster, name)
    holder = holders(shared_cluster, name, random_bytes(seed + 1, 3000))
    holder.reset()
    wait_until(lambda: lock_of(shared_cluster, name) is None, 2.0, message="lock released on disconnect")
    assert stat(shared_cluster, name) == before
    assert download(shared_cluster, name, tmp_path) == old, f"seed {seed}"


def test_killed_writer_process_releases_the_lock_and_changes_nothing(shared_cluster, tmp_path, spawn):
    """A client process SIGKILLed while it holds the lock (append from stdin) releases it; the file is unchanged."""
    seed = 2110
    name = "locks/killed"
    old = random_bytes(seed, 1500)
    upload(shared_cluster, name, old, tmp_path)
    before = stat(shared_cluster, name)
    writer = spawn(shared_cluster, "append", name, "-", stdin=subprocess.PIPE)
    writer.stdin.write(random_bytes(seed + 1, 3000))  # less than a frame: the client keeps reading stdin
    writer.stdin.flush()
    wait_until(lambda: lock_of(shared_cluster, name), message="the writer holding the lock")
    writer.kill()
    writer.wait()
    wait_until(lambda: lock_of(shared_cluster, name) is None, 2.0, message="lock released after SIGKILL")
    assert stat(shared_cluster, name) == before
    assert download(shared_cluster, name, tmp_path) == old, f"seed {seed}"


@pytest.mark.parametrize("how", ["connection-reset", "wrong-sha256"])
def test_abandoned_append_leaves_no_chunks_behind(shared_cluster, tmp_path, holders, how):
    """The batches an append shipped before it failed (connection reset, wrong SHA-256) are collected from the nodes."""
    seed = 2120
    name = f"locks/abandoned-{how}"
    old = random_bytes(seed, 1500)
    upload(shared_cluster, name, old, tmp_path)
    baseline = node_chunks(shared_cluster)
    holder = holders(shared_cluster, name, random_bytes(seed + 1, MIB + 100 * KIB))  # one whole batch shipped
    wait_until(lambda: node_chunks(shared_cluster) > baseline, message="the first batch on the nodes")
    if how == "connection-reset":
        holder.reset()
    else:
        holder.conn.send(protocol.UploadEnd(sha256="0" * 64))
        reply = holder.conn.recv()
        assert isinstance(reply, protocol.Error) and reply.code == "CHECKSUM_MISMATCH", reply
    wait_until(lambda: lock_of(shared_cluster, name) is None, 2.0, message="lock released")
    wait_until(lambda: node_chunks(shared_cluster) == baseline, GC_TIMEOUT_S,
               message=f"nodes back to {baseline} chunks (the failed append collected)")
    assert download(shared_cluster, name, tmp_path) == old, f"seed {seed}"


def test_stalled_writer_loses_the_lock_after_the_lease(lease_cluster, tmp_path, holders, spawn):
    """A writer silent past lock_lease_s (1 s) loses the lock: the file is unchanged and a waiting writer proceeds."""
    seed = 2200
    name = "lease/stalled"
    old, added = random_bytes(seed, 1500), random_bytes(seed + 2, 800)
    upload(lease_cluster, name, old, tmp_path)
    holders(lease_cluster, name, random_bytes(seed + 1, 3000))
    stalled_at = time.monotonic()
    waiter = spawn(lease_cluster, "append", name, write_local(tmp_path, "added", added))
    status, stderr = finished(waiter)
    waited = time.monotonic() - stalled_at
    assert status == client_module.EXIT_OK, stderr
    assert 0.9 <= waited < 5.0, f"the waiting writer got the lock after {waited:.2f} s (lease 1 s)"
    assert download(lease_cluster, name, tmp_path) == old + added, f"stalled bytes kept or old lost (seed {seed})"


def test_stalled_writer_partial_upload_is_discarded(lease_cluster, tmp_path, holders):
    """The batches a writer sent before its lease ran out are garbage collected from the nodes."""
    seed = 2210
    name = "lease/garbage"
    old = random_bytes(seed, 1500)
    upload(lease_cluster, name, old, tmp_path)
    baseline = node_chunks(lease_cluster)
    holders(lease_cluster, name, random_bytes(seed + 1, MIB + 100 * KIB))  # one whole batch shipped
    wait_until(lambda: node_chunks(lease_cluster) > baseline, message="the first batch on the nodes")
    wait_until(lambda: lock_of(lease_cluster, name) is None, 5.0, message="lock lost after the lease")
    wait_until(lambda: node_chunks(lease_cluster) == baseline, GC_TIMEOUT_S,
               message=f"nodes back to {baseline} chunks (the partial upload collected)")
    assert download(lease_cluster, name, tmp_path) == old, f"seed {seed}"


def test_idle_grouped_upload_is_committed_and_unlocked_after_the_lease(lease_cluster, tmp_path):
    """A pipelined upload that sent UPLOAD_END and went quiet is committed and its lock freed within about the lease (1 s)."""
    seed = 2220
    name = "lease/grouped"
    first, second = random_bytes(seed, 3000), random_bytes(seed + 1, 2000)
    conn = transport.Connection(master_address(lease_cluster), "client", timeout_s=20.0)
    try:
        conn.send(protocol.UploadBegin(name=name, tag=7, group=True), flush=False)
        conn.send(protocol.Data(body=first), flush=False)
        conn.send(protocol.UploadEnd(sha256=sha256(first)))
        wait_until(lambda: lock_of(lease_cluster, name), message="the grouped upload holding the lock")
        idle_since = time.monotonic()
        path = write_local(tmp_path, "second", second)
        with_client(lease_cluster, lambda c: c.upload_file(path, name, wait_s=10.0))
        waited = time.monotonic() - idle_since
        assert waited < 5.0, f"the second writer got the lock after {waited:.2f} s (lease 1 s)"
        # The idle client's finished file was committed; its reply waits for it, in order.
        reply = conn.expect(protocol.Uploaded)
        assert (reply.tag, reply.sha256) == (7, sha256(first)), reply
        conn.request(protocol.Sync(), protocol.Synced)
    finally:
        conn.close()
    assert download(lease_cluster, name, tmp_path) == second, f"seed {seed}"


# --- master crash -----------------------------------------------------------------------------
def test_master_killed_mid_append_keeps_the_old_file(make_cluster, tmp_path):
    """A master SIGKILLed in the middle of an append comes back with the file's old length and content."""
    seed = 2300
    cluster = make_cluster()
    name = "crash/append"
    old = random_bytes(seed, 3 * CHUNK_BYTES + 100)
    upload(cluster, name, old, tmp_path)
    wait_until(lambda: stored_chunks(cluster) == REPLICATION * 4, message="the old file on the nodes")
    conn = transport.Connection(master_address(cluster), "client", timeout_s=20.0)
    try:
        conn.send(protocol.UploadBegin(name=name, size=4 * MIB, mode="append"))
        half = random_bytes(seed + 1, 2 * MIB)
        for start in range(0, len(half), 256 * KIB):
            conn.send(protocol.Data(body=half[start:start + 256 * KIB]), flush=False)
        conn.flush()
        wait_until(lambda: stored_chunks(cluster) > REPLICATION * 4, message="appended batches on the nodes")
        cluster.master.kill()
    finally:
        conn.close()
    cluster.start_master()
    cluster.wait_nodes_alive(3)
    reply = stat(cluster, name)
    assert (reply.size, reply.sha256) == (len(old), sha256(old)), f"seed {seed}"
    assert download(cluster, name, tmp_path) == old, f"seed {seed}"


# --- touch and stat ---------------------------------------------------------------------------
def test_touch_creates_an_empty_file(shared_cluster):
    """`touch` of a new name creates a file of 0 bytes whose sha256 is that of b""."""
    result = shared_cluster.cli("touch", "touch/new")
    assert result.returncode == client_module.EXIT_OK, result
    reply = stat(shared_cluster, "touch/new")
    assert (reply.size, reply.chunks, reply.sha256, reply.runs) == (0, 0, sha256(b""), [])
    assert shared_cluster.cli("cat", "touch/new").stdout == b""
    assert listed_size(shared_cluster, "touch/new") == 0


def test_touch_of_an_existing_file_keeps_content_and_updates_mtime(shared_cluster, tmp_path):
    """`touch` of a stored file changes its mtime and nothing else."""
    seed = 2400
    data = random_bytes(seed, 2500)
    upload(shared_cluster, "touch/old", data, tmp_path)
    before = stat(shared_cluster, "touch/old")
    wait_until(lambda: time.time() > before.mtime + 0.01, message="the clock past the old mtime")
    result = shared_cluster.cli("touch", "touch/old")
    assert result.returncode == client_module.EXIT_OK, result
    after = stat(shared_cluster, "touch/old")
    assert after.mtime > before.mtime
    assert (after.size, after.sha256, after.version, after.runs) == (before.size, before.sha256, before.version,
                                                                      before.runs)
    assert download(shared_cluster, "touch/old", tmp_path) == data, f"seed {seed}"


def test_stat_prints_size_chunks_sha256_mtime_version_and_runs(shared_cluster, tmp_path):
    """`stat` prints one line per field and one line per run of replicas."""
    seed = 2410
    data = random_bytes(seed, 2 * CHUNK_BYTES + 5)
    upload(shared_cluster, "stat/text", data, tmp_path)
    reply = stat(shared_cluster, "stat/text")
    result = shared_cluster.cli("stat", "stat/text")
    assert result.returncode == client_module.EXIT_OK, result
    lines = result.stdout.decode().splitlines()
    fields = dict(re.match(r"(\w+):\s+(.*)$", line).groups() for line in lines if not line.startswith(" "))
    assert fields["name"] == "stat/text"
    assert (fields["size"], fields["chunks"], fields["chunk_size"]) == (str(len(data)), "3", str(CHUNK_BYTES))
    assert (fields["sha256"], fields["version"]) == (sha256(data), reply.version)
    assert fields["mtime"] == client_module.format_time(reply.mtime)
    run_lines = [line for line in lines if line.startswith(" ")]
    assert run_lines == [f"  chunks {first}..{first + count - 1}: nodes {', '.join(nodes)} (blob {blob})"
                         for first, count, nodes, blob in reply.runs]
    assert run_lines[0].startswith("  chunks 0..2: nodes ")


def test_stat_json_parses_to_the_same_fields(shared_cluster, tmp_path):
    """`stat --json` prints one JSON object with the fields and runs of STAT."""
    seed = 2420
    data = random_bytes(seed, CHUNK_BYTES + 1)
    upload(shared_cluster, "stat/json", data, tmp_path)
    result = shared_cluster.cli("stat", "--json", "stat/json")
    assert result.returncode == client_module.EXIT_OK, result
    parsed = json.loads(result.stdout)
    reply = stat(shared_cluster, "stat/json")
    assert parsed == {"name": "stat/json", "size": len(data), "chunks": 2, "chunk_size": CHUNK_BYTES,
                      "sha256": sha256(data), "mtime": reply.mtime, "mtime_iso": views.iso_time(reply.mtime),
                      "version": reply.version, "runs": reply.runs, "version_id": reply.version_id,
                      "committed_at": reply.committed_at, "committed_at_iso": views.iso_time(reply.committed_at),
                      "run_count": reply.run_count, "node_chunks": reply.node_chunks}


# --- range-read latency (measured, printed, never asserted) ----------------------------------
def measure_range_reads(cluster, tmp_path, size: int, seed: int, reads: int = 20, length: int = 100) -> float:
    """Store ``size`` random bytes, time ``reads`` in-process range reads; returns the median in seconds."""
    rng = random.Random(seed)
    local = tmp_path / "big"
    with open(local, "wb") as f:
        for start in range(0, size, MIB):
            f.write(rng.randbytes(min(MIB, size - start)))
    started = time.monotonic()
    upload_reply = with_client(cluster, lambda c: c.upload_file(str(local), "bench/big"))
    upload_s = time.monotonic() - started
    assert upload_reply.size == size
    destination = tmp_path / "range.out"
    latencies = []
    c = cluster.client()
    try:
        with open(local, "rb") as f:
            for _ in range(reads):
                offset = rng.randrange(size - length)
                started = time.perf_counter()
                c.download("bench/big", str(destination), offset, length, force=True)
                latencies.append(time.perf_counter() - started)
                f.seek(offset)
                assert destination.read_bytes() == f.read(length), f"offset {offset} (seed {seed})"
    finally:
        c.close()
    median = statistics.median(latencies)
    print(f"\nrange read of {length} bytes from a {size // MIB} MiB file: median {median * 1000:.2f} ms, "
          f"min {min(latencies) * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms over {reads} reads "
          f"(upload took {upload_s:.1f} s; seed {seed})")
    return median


def test_range_read_latency_on_a_16_mib_file(shared_cluster, tmp_path):
    """100-byte range reads from a 16 MiB file return the right bytes; their median latency is printed."""
    measure_range_reads(shared_cluster, tmp_path, 16 * MIB, seed=2500)


@pytest.mark.skipif(os.environ.get("BENCH_RANGE") != "1", reason="set BENCH_RANGE=1 to time reads of a 256 MiB file")
def test_range_read_latency_on_a_256_mib_file(make_cluster, tmp_path):
    """100-byte range reads from a 256 MiB file return the right bytes; their median latency is printed."""
    measure_range_reads(make_cluster(), tmp_path, 256 * MIB, seed=2510)
