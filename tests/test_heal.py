"""Survive and heal: real clusters lose, freeze, corrupt and empty nodes, then recover.

Every test starts its own cluster with short intervals (heartbeat 0.2 s,
dead after 1 s, safe mode 1 s, io timeout 3 s) through ``make_cluster``,
whose finalizer kills each process by PID.  Waits poll with deadlines.

"Fully replicated" is checked on disk, not only in the master's figures:
the chunk dirs of the running nodes are copied and opened with
``ChunkStore`` (the running node keeps its own store open), and every chunk
of every committed version must be held by exactly ``replication`` of them,
so both under-replication and surplus copies fail the check.  Corruption is
made by flipping a payload byte found through the record layout drawn at the
top of chunk_store.py.  Random data is seeded; seeds are in the messages.
"""

from __future__ import annotations

import configparser
import json
import os
import random
import re
import shutil
import signal
import time

from conftest import (FAST_MASTER, FAST_TIMING, ROOT, download_bytes, flip_byte, node_fence, payload_locations,
                      random_bytes, upload_bytes, wait_until)

import client as client_module
import protocol
import transport
from chunk_store import ChunkStore
from namespace import Namespace, uncovered

KIB = 1024
MIB = 1024 * 1024
REPLICATION = 2  # [cluster] replication in config.ini
IO_TIMEOUT_S = 3.0  # --io-timeout in FAST_TIMING / FAST_MASTER
DEFAULT_CAPACITY_BYTES = 10 * 1024 ** 3  # [node] capacity_bytes in config.ini
SETTLE_S = 0.6  # three heartbeats: how long "fully replicated" must hold to count

# Safe mode short enough for a test, scrubbing off unless a test turns it on
# (a scrubber would find planted corruption before the read a test makes).
HEAL_MASTER = [*FAST_MASTER, "--safe-mode", "1"]
HEAL_NODE = [*FAST_TIMING, "--scrub-rate", "0"]


# --- helpers -----------------------------------------------------------------------------------

def heal_cluster(make_cluster, nodes: int = 3, master_args=(), node_args=(), **kwargs):
    return make_cluster(nodes=nodes, master_args=[*HEAL_MASTER, *master_args],
                        node_args=[*HEAL_NODE, *node_args], **kwargs)


def listed(cluster) -> set[str]:
    c = cluster.client()
    try:
        return {entry["name"] for entry in c.list()}
    finally:
        c.close()


def totals(cluster) -> dict:
    return cluster.status().totals


def node_id(cluster, index: int) -> str:
    with open(os.path.join(cluster.node_data_dir(index), "node.json"), encoding="utf-8") as f:
        return json.load(f)["node_id"]


def node_row(cluster, nid: str) -> dict | None:
    return next((n for n in cluster.status().nodes if n["id"] == nid), None)


def is_alive(cluster, nid: str) -> bool:
    row = node_row(cluster, nid)
    return row is not None and row["alive"]


def inventory(cluster, index: int, tmp_path) -> dict[str, list[tuple[int, int]]]:
    """ChunkStore.inventory() of a copy of node ``index``'s chunk dir (the node keeps running)."""
    copy = tmp_path / f"inventory-copy-{index}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(os.path.join(cluster.node_data_dir(index), "chunks"), copy)
    try:
        with ChunkStore(str(copy)) as store:
            return store.inventory()
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def verify_copies(cluster, index: int, tmp_path) -> list[str]:
    """Extents of node ``index`` (on a copy of its dir) whose payload fails its CRCs."""
    copy = tmp_path / f"verify-copy-{index}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(os.path.join(cluster.node_data_dir(index), "chunks"), copy)
    bad = []
    try:
        with ChunkStore(str(copy)) as store:
            for blob, extents in store.inventory().items():
                for first, count in extents:
                    try:
                        store.get(blob, first, count)
                    except protocol.ChecksumMismatch:
                        bad.append(f"{blob}:{first}+{count}")
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return bad


def copies_per_chunk(inventories: dict, blob: str, chunks: int) -> list[int]:
    counts = [0] * chunks
    for inv in inventories.values():
        for first, count in inv.get(blob, []):
            for i in range(first, min(first + count, chunks)):
                counts[i] += 1
    return counts


def replication_problems(cluster, live: list[int], files: dict[str, protocol.Uploaded], tmp_path) -> list[str]:
    """What keeps ``files`` from being on exactly REPLICATION of the ``live`` nodes, on disk."""
    inventories = {i: inventory(cluster, i, tmp_path) for i in live}
    problems = []
    for name, reply in files.items():
        counts = copies_per_chunk(inventories, reply.version, reply.chunks)
        wrong = sorted({c for c in counts if c != REPLICATION})
        if wrong:
            problems.append(f"{name}: chunks with {wrong} copies "
                            f"({sum(1 for c in counts if c != REPLICATION)} of {reply.chunks})")
    return problems


def wait_fully_replicated(cluster, live: list[int], files: dict, tmp_path, timeout_s: float = 20.0,
                          what: str = "") -> float:
    """Wait until the master reports no pending repair and the disks agree; returns seconds waited."""
    started = time.monotonic()
    last = []
    first_seen = []

    def done():
        t = totals(cluster)
        if t["safe_mode"] or t["under_replicated_chunks"] or t["repairs_pending"]:
            last[:] = [f"master: {[(k, t[k]) for k in ('safe_mode', 'under_replicated_chunks', 'repairs_pending')]}"]
        else:
            last[:] = replication_problems(cluster, live, files, tmp_path)
        if last:
            first_seen.clear()
            return False
        # Done only if still true a few repair passes later: a report on its
        # way (a heartbeat, a scan not yet run) may undo a state that looks done.
        first_seen[:] = first_seen or [time.monotonic()]
        return time.monotonic() - first_seen[0] >= SETTLE_S

    try:
        wait_until(done, timeout_s, interval_s=0.2, message=f"full replication {what}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still wrong: {last}") from None
    return first_seen[0] - started


def segment_bytes(cluster, index: int) -> int:
    seg_dir = os.path.join(cluster.node_data_dir(index), "chunks", "segments")
    total = 0
    for name in os.listdir(seg_dir):
        try:
            total += os.path.getsize(os.path.join(seg_dir, name))
        except FileNotFoundError:
            pass  # compacted away between listdir and stat
    return total


def master_entry(cluster, name: str) -> dict | None:
    """``name``'s entry as the master's metadata on disk says, replayed through Namespace.apply."""
    master_dir = os.path.join(cluster.data_dir, "master")
    namespace = Namespace()
    applied = 0
    checkpoint = os.path.join(master_dir, "metadata.json")
    if os.path.exists(checkpoint):
        with open(checkpoint, encoding="utf-8") as f:
            saved = json.load(f)
        namespace.restore(saved["state"])
        applied = saved["index"]
    for log_name in sorted(n for n in os.listdir(master_dir) if re.fullmatch(r"oplog-\d{12}\.jsonl", n)):
        with open(os.path.join(master_dir, log_name), encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # a line being appended right now
                if record["i"] > applied:
                    namespace.apply(record)
                    applied = record["i"]
    return namespace.files.get(name)


def corrupt_record(cluster, index: int, blob: str, first: int, rng: random.Random) -> None:
    """Flip one random payload byte of the record of ``blob`` starting at chunk ``first`` on node ``index``."""
    records = [r for r in payload_locations(cluster, index, blob) if r[1] == first]
    assert records, f"node{index} holds no record of {blob} at chunk {first}"
    path, _, payload_offset, payload_len = records[-1]
    flip_byte(path, payload_offset + rng.randrange(payload_len))


def corrupt_chunk(cluster, index: int, blob: str, chunk: int, rng: random.Random) -> None:
    """Flip one random byte of chunk ``chunk`` of ``blob`` in the record holding it on node ``index``."""
    records = [r for r in payload_locations(cluster, index, blob) if r[1] <= chunk < r[1] + -(-r[3] // KIB)]
    assert records, f"node{index} holds no record of {blob} with chunk {chunk}"
    path, first, payload_offset, payload_len = records[-1]
    start = (chunk - first) * KIB
    flip_byte(path, payload_offset + start + rng.randrange(min(KIB, payload_len - start)))


def holders(cluster, blob: str, first: int, indexes) -> list[int]:
    return [i for i in indexes if any(r[1] == first for r in payload_locations(cluster, i, blob))]


# --- 1. node loss ------------------------------------------------------------------------------
def test_killed_node_is_re_replicated_and_a_second_loss_loses_nothing(make_cluster, tmp_path):
    """A SIGKILLed node is declared dead, its chunks are re-copied, and then any second loss keeps every file."""
    seed = 101
    cluster = heal_cluster(make_cluster)
    sizes = [0, 1, 700 * KIB + 3, 2 * MIB + 11, MIB + 5]
    data = {f"f{i}": random_bytes(seed + i, size) for i, size in enumerate(sizes)}
    files = {name: upload_bytes(cluster, name, blob, tmp_path) for name, blob in data.items()}
    victim = node_id(cluster, 0)
    held = sum(count for extents in inventory(cluster, 0, tmp_path).values() for _, count in extents)
    total_mib = sum(sizes) * REPLICATION / MIB

    killed_at = time.monotonic()
    cluster.nodes[0].kill()
    wait_until(lambda: not is_alive(cluster, victim), 5.0, message="node0 declared dead")
    declared_s = time.monotonic() - killed_at
    wait_fully_replicated(cluster, [1, 2], files, tmp_path, what="after node0 was killed")
    repair_s = time.monotonic() - killed_at
    print(f"\nkill -> dead in {declared_s:.2f} s; kill -> fully re-replicated in {repair_s:.2f} s "
          f"({held} chunks = {held * KIB / MIB:.1f} MiB re-copied of {total_mib:.1f} MiB stored)")
    assert totals(cluster)["repaired_chunks"] >= held, f"seed {seed}"

    cluster.nodes[1].kill()
    for name, blob in data.items():
        assert download_bytes(cluster, name, tmp_path) == blob, f"{name} differs with node0 and node1 down (seed {seed})"


# --- 2. frozen node ----------------------------------------------------------------------------
def test_frozen_node_is_survived_and_rejoins_without_surplus(make_cluster, tmp_path):
    """With a node SIGSTOPped, reads succeed within io_timeout, writes succeed once it is dead, and after SIGCONT it rejoins and the copies converge to exactly two."""
    seed = 202
    # A shorter I/O timeout than the other tests': the first read of a frozen replica waits it out.
    io_timeout_s = 1.5
    cluster = heal_cluster(make_cluster, master_args=["--io-timeout", str(io_timeout_s)],
                           node_args=["--io-timeout", str(io_timeout_s)])
    cluster.handshake_timeout_s = io_timeout_s
    data = {f"g{i}": random_bytes(seed + i, MIB + 300 * KIB * i + 7) for i in range(3)}
    files = {name: upload_bytes(cluster, name, blob, tmp_path) for name, blob in data.items()}
    frozen = node_id(cluster, 0)

    cluster.nodes[0].signal(signal.SIGSTOP)
    for name, blob in data.items():
        started = time.monotonic()
        assert download_bytes(cluster, name, tmp_path) == blob, f"{name} differs with node0 frozen (seed {seed})"
        elapsed = time.monotonic() - started
        assert elapsed < io_timeout_s + 2.0, f"download of {name} took {elapsed:.1f} s with node0 frozen"
        print(f"\ndownload of {name} with node0 frozen: {elapsed:.2f} s")

    # Before the master declares it dead the frozen node may still be chosen:
    # the upload then either fails over or fails with one clear error.
    early = random_bytes(seed + 10, 300 * KIB)
    started = time.monotonic()
    try:
        files["early"] = upload_bytes(cluster, "early", early, tmp_path)
        data["early"] = early
        outcome = "succeeded"
    except protocol.BackupError as exc:
        outcome = f"failed with {exc.code}: {exc.message}"
    print(f"upload right after SIGSTOP {outcome} in {time.monotonic() - started:.2f} s")

    wait_until(lambda: not is_alive(cluster, frozen), 5.0, message="frozen node0 declared dead")
    late = random_bytes(seed + 11, 600 * KIB)
    files["late"] = upload_bytes(cluster, "late", late, tmp_path)
    data["late"] = late

    cluster.nodes[0].signal(signal.SIGCONT)
    wait_until(lambda: is_alive(cluster, frozen), 10.0, message="node0 alive again after SIGCONT")
    wait_fully_replicated(cluster, [0, 1, 2], files, tmp_path, what="after node0 rejoined")
    for name, blob in data.items():
        assert download_bytes(cluster, name, tmp_path) == blob, f"{name} differs after rejoin (seed {seed})"


# --- 3. corruption found by a read, and by the scrubber ------------------------------------------
def test_corrupt_copy_found_by_a_read_is_dropped_and_re_replicated(make_cluster, tmp_path):
    """A payload byte flipped on the replica read first still downloads correctly, and that copy ends up replaced by exactly one good one."""
    seed = 303
    rng = random.Random(seed)
    # Heartbeats (which carry the node's own report of the bad copy) at 0.5 s,
    # still well within dead_after: the repair of the read's report comes first.
    cluster = heal_cluster(make_cluster, nodes=2, node_args=["--heartbeat-interval", "0.5"])
    data = random_bytes(seed, 2 * MIB + 123)
    reply = upload_bytes(cluster, "rotten", data, tmp_path)
    # Idle replicas are read in the order of the run's node list.
    first_holder = master_entry(cluster, "rotten")["runs"][0][2][0]
    index = next(i for i in range(2) if node_id(cluster, i) == first_holder)
    # A third node with a little less room than the bad node: placement (most
    # room first) sends the first repair back to the bad node, a second one to
    # the third node -- the order of a real cluster whose free space differs
    # by less than a batch.
    room = DEFAULT_CAPACITY_BYTES - segment_bytes(cluster, index) - MIB // 2
    cluster.add_node(2, ["--capacity", str(room)])
    cluster.wait_nodes_alive(3)
    corrupt_record(cluster, index, reply.version, 0, rng)
    assert verify_copies(cluster, index, tmp_path), "the flip did not corrupt anything"

    assert download_bytes(cluster, "rotten", tmp_path) == data, f"download with node{index} corrupt (seed {seed})"
    # The node drops the bad extent and reports it with its next heartbeat.
    wait_until(lambda: totals(cluster)["corrupt_replicas_found"] >= 1, 5.0, message="the bad copy reported")
    wait_fully_replicated(cluster, [0, 1, 2], {"rotten": reply}, tmp_path, timeout_s=8.0,
                          what="after the bad copy was found")
    bad = {i: verify_copies(cluster, i, tmp_path) for i in range(3)}
    assert not any(bad.values()), f"corrupt extents still held: {bad} (seed {seed})"
    assert download_bytes(cluster, "rotten", tmp_path) == data, f"seed {seed}"


def test_scrubber_finds_unread_corruption_and_it_is_repaired(make_cluster, tmp_path):
    """A flipped byte nobody reads is found by the scrubber, dropped and re-replicated."""
    seed = 304
    rng = random.Random(seed)
    cluster = heal_cluster(make_cluster)
    data = random_bytes(seed, MIB + 5000)
    reply = upload_bytes(cluster, "quiet-rot", data, tmp_path)
    index = holders(cluster, reply.version, 0, range(3))[0]
    corrupt_record(cluster, index, reply.version, 0, rng)
    assert totals(cluster)["corrupt_replicas_found"] == 0

    for i in range(3):  # quickly, so nothing is declared dead meanwhile
        cluster.restart_node(i, ["--scrub-rate", "100"])
    wait_until(lambda: totals(cluster)["corrupt_replicas_found"] >= 1, 10.0, message="scrubber reports the bad copy")
    wait_fully_replicated(cluster, [0, 1, 2], {"quiet-rot": reply}, tmp_path, what="after scrubbing")
    bad = {i: verify_copies(cluster, i, tmp_path) for i in range(3)}
    assert not any(bad.values()), f"corrupt extents still held: {bad} (seed {seed})"
    assert download_bytes(cluster, "quiet-rot", tmp_path) == data, f"seed {seed}"


def test_two_bad_chunks_on_different_holders_lose_nothing(make_cluster, tmp_path):
    """Chunk 5 rotten on one holder of batch 0 and chunk 900 on the other: downloads are exact at once and after the scrubbers ran, nothing is listed damaged, and both chunks end up with two good copies."""
    seed = 305
    rng = random.Random(seed)
    cluster = heal_cluster(make_cluster)
    data = {name: random_bytes(seed + n, 2 * MIB + 77) for n, name in enumerate(("read-first", "scrub-only"))}
    files = {name: upload_bytes(cluster, name, blob, tmp_path) for name, blob in data.items()}
    for reply in files.values():
        first, second = holders(cluster, reply.version, 0, range(3))
        corrupt_chunk(cluster, first, reply.version, 5, rng)
        corrupt_chunk(cluster, second, reply.version, 900, rng)
        assert verify_copies(cluster, first, tmp_path) and verify_copies(cluster, second, tmp_path)

    assert download_bytes(cluster, "read-first", tmp_path) == data["read-first"], f"at once (seed {seed})"
    for i in range(3):  # scrubbers on; quickly, so nothing is declared dead meanwhile
        cluster.restart_node(i, ["--scrub-rate", "100"])
    # Each file has two bad copies; of "read-first" the download found one or both.
    wait_until(lambda: totals(cluster)["corrupt_replicas_found"] >= 4, 10.0, message="every bad chunk reported")
    wait_fully_replicated(cluster, [0, 1, 2], files, tmp_path, what="after scrubbing")
    assert totals(cluster)["damaged_files"] == [], f"seed {seed}"
    bad = {i: verify_copies(cluster, i, tmp_path) for i in range(3)}
    assert not any(bad.values()), f"corrupt extents still held: {bad} (seed {seed})"
    inventories = {node_id(cluster, i): inventory(cluster, i, tmp_path) for i in range(3)}
    for name, reply in files.items():
        for first, count, nodes, *_ in master_entry(cluster, name)["runs"]:
            assert len(nodes) == REPLICATION, f"{name} chunks {first}+{count} on {nodes} (seed {seed})"
            for nid in nodes:  # the master places each chunk where it is held, on disk, intact
                assert not uncovered(first, count, inventories[nid].get(reply.version, [])), \
                    f"{name} chunks {first}+{count} placed on {nid}, which lacks some (seed {seed})"
        assert download_bytes(cluster, name, tmp_path) == data[name], f"{name} after scrubbing (seed {seed})"


# --- 4. every copy corrupt -------------------------------------------------------------------------
def test_all_copies_corrupt_fails_data_lost_and_is_listed_damaged(make_cluster, tmp_path):
    """With one chunk corrupt on both holders, the download exits DATA_LOST naming the file, writes nothing, and status lists it damaged."""
    seed = 404
    rng = random.Random(seed)
    cluster = heal_cluster(make_cluster)
    reply = upload_bytes(cluster, "doomed", random_bytes(seed, 2 * MIB + 77), tmp_path)
    both = holders(cluster, reply.version, MIB // KIB, range(3))
    assert len(both) == REPLICATION, f"batch 1 held by nodes {both}"
    chunk = MIB // KIB + rng.randrange(MIB // KIB)
    for index in both:
        corrupt_chunk(cluster, index, reply.version, chunk, rng)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    started = time.monotonic()
    result = cluster.cli("download", "doomed", str(out_dir / "doomed"), timeout_s=30)
    elapsed = time.monotonic() - started
    assert result.returncode == client_module.EXIT_DATA_LOST, f"{result} (seed {seed})"
    assert "doomed" in result.stderr, result
    assert elapsed < 2 * IO_TIMEOUT_S, f"the failing download took {elapsed:.1f} s"
    assert os.listdir(out_dir) == [], "a failed download left files behind"
    wait_until(lambda: "doomed" in totals(cluster)["damaged_files"], 5.0, message="doomed listed as damaged")
    assert totals(cluster)["damaged_file_count"] == 1


# --- 5. rejoin after changes ------------------------------------------------------------------------
def test_node_rejoining_after_delete_and_replace_drops_stale_blobs(make_cluster, tmp_path):
    """A node down while a file was deleted and another replaced loses those stale blobs when it returns, and neither old version reappears."""
    seed = 505
    # No history and no trash: the replaced version and the deleted file are dropped at once (tests/test_history.py covers kept versions).
    cluster = heal_cluster(make_cluster, master_args=["--keep-versions", "1", "--trash-days", "0"])
    keep = random_bytes(seed, MIB + 10)
    files = {"keep": upload_bytes(cluster, "keep", keep, tmp_path)}
    gone = upload_bytes(cluster, "gone", random_bytes(seed + 1, 900 * KIB), tmp_path)
    old = upload_bytes(cluster, "replaced", random_bytes(seed + 2, 500 * KIB), tmp_path)
    index = next(i for i in range(3)
                 if set(inventory(cluster, i, tmp_path)) >= {gone.version, old.version})
    victim = node_id(cluster, index)

    cluster.nodes[index].kill()
    wait_until(lambda: not is_alive(cluster, victim), 5.0, message=f"node{index} declared dead")
    c = cluster.client()
    try:
        c.delete("gone")
    finally:
        c.close()
    new = random_bytes(seed + 3, 700 * KIB + 1)
    files["replaced"] = upload_bytes(cluster, "replaced", new, tmp_path)

    cluster.add_node(index)
    wait_until(lambda: is_alive(cluster, victim), 10.0, message=f"node{index} alive again")
    assert "gone" not in listed(cluster)
    wait_until(lambda: not set(inventory(cluster, index, tmp_path)) & {gone.version, old.version}, 15.0,
               message=f"node{index} dropped its stale blobs")
    wait_fully_replicated(cluster, [0, 1, 2], files, tmp_path, what=f"after node{index} rejoined")
    assert listed(cluster) == {"keep", "replaced"}, f"seed {seed}"
    assert download_bytes(cluster, "replaced", tmp_path) == new, f"seed {seed}"
    assert download_bytes(cluster, "keep", tmp_path) == keep, f"seed {seed}"


# --- 6. master restart --------------------------------------------------------------------------------
def test_master_restart_starts_in_safe_mode_and_copies_nothing(make_cluster, tmp_path):
    """A restarted master reports safe mode at first and, once the nodes have reported, finds everything replicated without copying a chunk."""
    seed = 606
    cluster = heal_cluster(make_cluster, master_args=["--safe-mode", "2"])
    files = {f"h{i}": upload_bytes(cluster, f"h{i}", random_bytes(seed + i, 600 * KIB * (i + 1)), tmp_path)
             for i in range(3)}
    wait_fully_replicated(cluster, [0, 1, 2], files, tmp_path, what="before the restart")

    cluster.restart_master()
    first = totals(cluster)
    assert first["safe_mode"] is True, f"status right after the restart: {first}"
    cluster.wait_nodes_alive(3)
    wait_until(lambda: not totals(cluster)["safe_mode"], 5.0, message="safe mode over")
    # Let several repair passes (one per heartbeat interval) run, watching the count.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        t = totals(cluster)
        assert t["repaired_chunks"] == 0 and t["under_replicated_chunks"] == 0, f"after the restart: {t}"
        time.sleep(0.1)
    wait_fully_replicated(cluster, [0, 1, 2], files, tmp_path, what="after the restart")
    assert totals(cluster)["repaired_chunks"] == 0


# --- 7. emptied node ----------------------------------------------------------------------------------
def test_node_with_emptied_disk_comes_back_new_and_is_refilled(make_cluster, tmp_path):
    """A node restarted on an empty data dir gets a new id, the old id stays dead, and repair fills the new one."""
    seed = 707
    cluster = heal_cluster(make_cluster)
    data = {f"e{i}": random_bytes(seed + i, 800 * KIB * (i + 1)) for i in range(3)}
    files = {name: upload_bytes(cluster, name, blob, tmp_path) for name, blob in data.items()}
    old_id = node_id(cluster, 0)

    cluster.nodes[0].kill()
    shutil.rmtree(cluster.node_data_dir(0))
    cluster.add_node(0)  # at once: the disk was swapped faster than dead_after
    new_id = node_id(cluster, 0)
    assert new_id != old_id
    wait_until(lambda: is_alive(cluster, new_id), 10.0, message="the new node alive")
    wait_until(lambda: not is_alive(cluster, old_id), 5.0, message="the old id dead")
    wait_fully_replicated(cluster, [0, 1, 2], files, tmp_path, what="after the disk swap")
    assert inventory(cluster, 0, tmp_path), f"the new node holds nothing (seed {seed})"
    assert not is_alive(cluster, old_id)
    for name, blob in data.items():
        assert download_bytes(cluster, name, tmp_path) == blob, f"{name} (seed {seed})"


# --- 8. full nodes ------------------------------------------------------------------------------------
def test_full_node_is_avoided_by_placement(make_cluster, tmp_path):
    """A 3 MiB upload succeeds beside a node of 1 MiB capacity, which ends up holding at most its capacity."""
    seed = 808
    cluster = heal_cluster(make_cluster, nodes=2)
    cluster.add_node(2, ["--capacity", str(MIB)])
    cluster.wait_nodes_alive(3)
    small = node_id(cluster, 2)
    data = random_bytes(seed, 3 * MIB)
    upload_bytes(cluster, "big", data, tmp_path)
    assert download_bytes(cluster, "big", tmp_path) == data, f"seed {seed}"
    wait_until(lambda: node_row(cluster, small)["used_bytes"] <= MIB + 64 * KIB, 5.0,
               message="the small node within its capacity")
    assert segment_bytes(cluster, 2) <= MIB + 64 * KIB, f"the 1 MiB node stores {segment_bytes(cluster, 2)} bytes"


def test_upload_larger_than_free_space_fails_insufficient_space(make_cluster, tmp_path):
    """With every node 1 MiB in capacity, a 3 MiB upload exits INSUFFICIENT_SPACE and nothing is listed."""
    seed = 809
    cluster = heal_cluster(make_cluster, node_args=["--capacity", str(MIB)])
    path = tmp_path / "big"
    path.write_bytes(random_bytes(seed, 3 * MIB))
    result = cluster.cli("upload", str(path), "big", timeout_s=30)
    assert result.returncode == client_module.EXIT_INSUFFICIENT_SPACE, f"{result} (seed {seed})"
    assert listed(cluster) == set()


# --- 9. space reclamation -----------------------------------------------------------------------------
def test_deleted_data_is_reclaimed_on_disk(make_cluster, tmp_path):
    """After every file is deleted, compaction shrinks the nodes' segment files to almost nothing."""
    seed = 909
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "config.ini"), encoding="utf-8")
    parser["node"]["segment_max_bytes"] = str(MIB)
    config_path = tmp_path / "small-segments.ini"
    with open(config_path, "w", encoding="utf-8") as f:
        parser.write(f)
    # No trash: a delete frees space at once (tests/test_history.py covers the trash).
    cluster = heal_cluster(make_cluster, master_args=["--trash-days", "0"], node_args=["--compact-interval", "0.5"],
                           config_path=str(config_path))
    # Whole batches: each record outgrows a segment alone, so the tombstones
    # that follow land in a new, active segment that holds no data.
    names = [f"r{i}" for i in range(4)]
    for i, name in enumerate(names):
        upload_bytes(cluster, name, random_bytes(seed + i, (i % 2 + 1) * MIB), tmp_path)
    stored = sum(segment_bytes(cluster, i) for i in range(3))
    assert stored >= 2 * 6 * MIB, f"only {stored} bytes on disk after uploads"

    c = cluster.client()
    try:
        for name in names:
            c.delete(name)
    finally:
        c.close()
    limit = 64 * KIB
    wait_until(lambda: all(segment_bytes(cluster, i) < limit for i in range(3)), 15.0,
               message=f"every node under {limit} bytes of segments")


# --- 10. master restart mid-repair ---------------------------------------------------------------------
def test_master_restart_mid_repair_finishes_the_repair(make_cluster, tmp_path):
    """A master restarted while a slow repair is under way resumes it until every chunk has two copies."""
    seed = 1010
    cluster = heal_cluster(make_cluster, master_args=["--repair-rate", "1"])
    data = {f"s{i}": random_bytes(seed + i, 2 * MIB + i) for i in range(2)}
    files = {name: upload_bytes(cluster, name, blob, tmp_path) for name, blob in data.items()}
    cluster.nodes[0].kill()
    wait_until(lambda: totals(cluster)["repaired_chunks"] > 0, 10.0, message="repair under way")
    assert totals(cluster)["repairs_pending"] > 0, "the repair finished before the restart: slow it down"

    cluster.restart_master()
    took = wait_fully_replicated(cluster, [1, 2], files, tmp_path, timeout_s=25.0, what="after the master restart")
    print(f"\nrepair finished {took:.1f} s after the master restart")
    for name, blob in data.items():
        assert download_bytes(cluster, name, tmp_path) == blob, f"{name} (seed {seed})"


def test_periodic_inventory_report_drops_a_surplus_copy(make_cluster, tmp_path):
    """A copy the namespace does not list is dropped at the node's next periodic inventory report."""
    cluster = heal_cluster(make_cluster, node_args=["--inventory-interval", "1"])
    data = random_bytes(306, 5000)
    reply = upload_bytes(cluster, "surplus", data, tmp_path)
    listed = set(master_entry(cluster, "surplus")["runs"][0][2])
    spare = next(i for i in range(3) if node_id(cluster, i) not in listed)
    host, _, port = cluster.nodes[spare].address.rpartition(":")

    def stored_chunks() -> int:
        with transport.Connection((host, int(port)), "master", 5.0) as conn:
            return conn.request(protocol.NodeStat(), protocol.NodeStatReply).chunks

    before = stored_chunks()
    crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(data, 1024))
    with transport.Connection((host, int(port)), "master", 5.0) as conn:
        conn.request(protocol.PutChunks(blob=reply.version, first=0, count=5, chunk_size=1024, body=crcs + data,
                                        **node_fence(cluster, spare)), protocol.PutOk)
        conn.request(protocol.Flush(), protocol.Flushed)
    assert stored_chunks() == before + 5
    wait_until(lambda: stored_chunks() == before, 10.0, message="the surplus copy dropped by reconciliation")
    assert download_bytes(cluster, "surplus", tmp_path) == data
