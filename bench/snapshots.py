"""Tree snapshots and incremental runs (issue 13 numbers), all in one run on one cluster.

``python bench/snapshots.py [--files 10000] [--restore-files 2000] [--big 100000] [--rounds 3]``

1. **Incremental runs**: a tree of ``--files`` x 4 KiB backed up with
   ``client.py upload DIR NAME`` three times (each a CLI process, timed from
   start to exit): the first run, a second with nothing changed, a third
   after 1% of the files were rewritten (same size, new content and mtime).
   Targets: second <= 0.1x the first, third <= 0.15x.
2. **Snapshot restore**: a tree of ``--restore-files`` x 4 KiB is backed up,
   then restored ``--rounds`` times each, alternating, with
   ``download NAME/ DIR`` and ``download NAME/ DIR --snapshot ID`` (CLI
   processes).  Target: the snapshot restore's median rate >= 0.9x.
3. **Metadata per snapshot**: ``--big`` empty files are written into the
   master's metadata before it starts (as tests/conftest.seed_names does:
   an empty file needs no chunks), a snapshot of all of them is recorded,
   and the bytes the master's log grew by (the data dir's log files, before
   and after) and the snapshot's record in the checkpoint (one written from
   that data dir after the stop) are measured.  Target: <= 1 KiB.

Prints one line per number and ``met``/``NOT met``; ``--json FILE`` writes
them too.  Exit status 1 if a target is not met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench as bench_module  # noqa: E402  (bench/bench.py: make_client, poll)
import cluster as cluster_module  # noqa: E402
from metadata_log import MetadataLog  # noqa: E402
from namespace import Namespace, make_entry  # noqa: E402

FILE_BYTES = 4096
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
TIMING = ["--heartbeat-interval", "0.5", "--dead-after", "5"]


def call(cluster, fn):
    c = bench_module.make_client(cluster.master_address)
    try:
        return fn(c)
    finally:
        c.close()


def cli(cluster, *args) -> float:
    """Run ``client.py ARGS`` (quiet); seconds from start to exit.  Raises if it fails."""
    argv = [sys.executable, os.path.join(ROOT, "client.py"), "--master", cluster.master_address, "--quiet", *args]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=900)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"client.py {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return elapsed


def make_tree(root: str, files: int) -> list[str]:
    paths = []
    for i in range(files):
        path = os.path.join(root, f"d{i // 1000:03d}", f"f{i:06d}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(FILE_BYTES))
        paths.append(path)
    return paths


def incremental(cluster, work: str, files: int) -> dict:
    tree = os.path.join(work, "inc")
    paths = make_tree(tree, files)
    first = cli(cluster, "upload", tree, "inc")
    second = cli(cluster, "upload", tree, "inc")
    later = time.time() + 10  # an mtime no earlier run saw
    for path in paths[::100]:  # 1%
        with open(path, "wb") as f:
            f.write(os.urandom(FILE_BYTES))
        os.utime(path, (later, later))
    third = cli(cluster, "upload", tree, "inc")
    snaps = call(cluster, lambda c: c.snapshots("inc"))
    if [s["files"] for s in snaps] != [files] * 3:
        raise RuntimeError(f"unexpected snapshots: {snaps}")
    return {"first_s": round(first, 3), "unchanged_s": round(second, 3), "one_percent_s": round(third, 3),
            "unchanged_ratio": round(second / first, 4), "one_percent_ratio": round(third / first, 4)}


def restore(cluster, work: str, files: int, rounds: int) -> dict:
    tree = os.path.join(work, "rst")
    make_tree(tree, files)
    result = call(cluster, lambda c: c.backup_tree(tree, "rst"))
    snapshot_id = result.snapshot.id
    plain, snap = [], []
    for n in range(rounds):
        plain.append(cli(cluster, "download", "rst/", os.path.join(work, f"plain{n}")))
        snap.append(cli(cluster, "download", "rst/", os.path.join(work, f"snap{n}"), "--snapshot", str(snapshot_id)))
    plain_rate, snap_rate = files / statistics.median(plain), files / statistics.median(snap)
    return {"plain_files_s": round(plain_rate), "snapshot_files_s": round(snap_rate),
            "ratio": round(snap_rate / plain_rate, 3), "plain_runs_s": [round(t, 3) for t in plain],
            "snapshot_runs_s": [round(t, 3) for t in snap]}


def log_bytes(master_dir: str) -> int:
    """Bytes of the master's op log files (metadata_log.py: oplog-*.jsonl)."""
    return sum(os.path.getsize(os.path.join(master_dir, name)) for name in os.listdir(master_dir)
               if name.startswith("oplog-"))


def metadata_cost(work: str, count: int) -> dict:
    """Seed ``count`` empty files, snapshot them all, measure the log growth and the checkpoint record."""
    data = os.path.join(work, "big")
    master_dir = os.path.join(data, "master")
    os.makedirs(master_dir)
    namespace = Namespace()
    log = MetadataLog(master_dir, namespace)
    log.open()
    names = [f"big/d{i // 1000:03d}/photo-{i:06d}.jpg" for i in range(count)]
    for start in range(0, count, 10000):
        log.commit([{"op": "put", "name": name, "file": make_entry(0, 1024, EMPTY_SHA256, uuid.uuid4().hex, [], 1024)}
                    for name in names[start:start + 10000]])
    log.close()
    members = [(name[len("big/"):], namespace.files[name]["commit_index"]) for name in names]
    cluster = cluster_module.LocalCluster(data, nodes=2, master_args=TIMING,
                                          node_args=[*TIMING[:2], "--scrub-rate", "0"]).start()
    try:
        bench_module.poll(lambda: call(cluster, lambda c: c.status()).totals["nodes_alive"] == 2, 60)
        time.sleep(1.0)  # node records of the start are in the log
        before = log_bytes(master_dir)
        started = time.monotonic()
        made = call(cluster, lambda c: c.record_snapshot("big", members))
        took = time.monotonic() - started
        grown = log_bytes(master_dir) - before
    finally:
        cluster.stop()
    replayed = MetadataLog(master_dir, Namespace())  # the checkpoint the master writes, written now
    replayed.open()
    replayed.checkpoint()
    replayed.close()
    with open(os.path.join(master_dir, "metadata.json"), encoding="utf-8") as f:
        state = json.load(f)["state"]
    records = [s for s in state["snapshots"] if s["i"] == made.id]
    checkpoint = len(json.dumps(records[0], separators=(",", ":")).encode())
    return {"files": made.files, "record_s": round(took, 2), "log_bytes": grown, "checkpoint_bytes": checkpoint}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10000, help="files of the incremental tree (default 10000)")
    parser.add_argument("--restore-files", type=int, default=2000, help="files of the restore tree (default 2000)")
    parser.add_argument("--big", type=int, default=100000, help="files of the metadata-cost snapshot (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="restores of each kind (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-snapshots-") as work:
        cluster = cluster_module.LocalCluster(os.path.join(work, "cluster"), nodes=3, master_args=TIMING,
                                              node_args=[*TIMING[:2], "--scrub-rate", "0"]).start()
        try:
            bench_module.poll(lambda: call(cluster, lambda c: c.status()).totals["nodes_alive"] == 3, 60)
            results["incremental"] = incremental(cluster, work, args.files)
            results["restore"] = restore(cluster, work, args.restore_files, args.rounds)
        finally:
            cluster.stop()
        results["metadata"] = metadata_cost(work, args.big)
    inc, rst, meta = results["incremental"], results["restore"], results["metadata"]
    checks = [
        (f"second backup, unchanged {args.files:,} x 4 KiB: {inc['unchanged_s']:.2f} s vs {inc['first_s']:.2f} s "
         f"= {inc['unchanged_ratio']:.3f}x (target <= 0.1x)", inc["unchanged_ratio"] <= 0.1),
        (f"backup after 1% changed: {inc['one_percent_s']:.2f} s = {inc['one_percent_ratio']:.3f}x "
         f"(target <= 0.15x)", inc["one_percent_ratio"] <= 0.15),
        (f"snapshot restore {args.restore_files:,} x 4 KiB: {rst['snapshot_files_s']} files/s vs download PREFIX/ "
         f"{rst['plain_files_s']} files/s = {rst['ratio']:.2f}x (target >= 0.9x)", rst["ratio"] >= 0.9),
        (f"metadata of a {meta['files']:,}-file snapshot: log +{meta['log_bytes']} bytes, checkpoint record "
         f"{meta['checkpoint_bytes']} bytes (target <= 1024 each); recorded in {meta['record_s']:.2f} s",
         meta["log_bytes"] <= 1024 and meta["checkpoint_bytes"] <= 1024),
    ]
    for line, met in checks:
        print(f"{line}: {'met' if met else 'NOT met'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0 if all(met for _, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
