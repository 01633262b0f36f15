"""Time to rebuild a lost metadata dir from the nodes (``master.py --recover-from-nodes``).

``python bench/recovery_time.py [--files 10000] [--mib 1024] [--nodes 3]
[--heartbeat 2]`` starts a fresh local cluster, stores ``--files`` files
holding ``--mib`` MiB in all (10 large files carry the bulk, the rest are
4 KiB files under a directory), then twice destroys the master's data dir
and recovers it:

1. **notes only**: the master is SIGKILLed before it ever stored a
   metadata backup (``--meta-backup-interval`` is set far out), so every
   file comes back from the nodes' commit notes;
2. **backup**: the recovered master is stopped cleanly (it stores a
   backup at shutdown), so the files come back from that backup.

For each it prints the recovery's own time (collecting the nodes' reports,
reading the backup, rebuilding, writing the checkpoint; it includes the
wait for nodes to stop arriving, 3 heartbeat intervals) and the time from
starting the master until it serves every file with every node back.
Every run checks the file count, total bytes and a sample of SHA-256s; exit
status 1 if anything is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench as bench_module  # noqa: E402  (bench/bench.py: make_client, poll)
import cluster as cluster_module  # noqa: E402

LARGE_FILES = 10
SMALL_FILE_BYTES = 4096


def totals(cluster) -> dict:
    client = bench_module.make_client(cluster.master_address)
    try:
        return client.status().totals
    finally:
        client.close()


def store_workload(cluster, work: str, files: int, total_bytes: int) -> dict[str, str]:
    """Upload the files; name -> SHA-256 of a sample of them."""
    small = files - LARGE_FILES
    large_bytes = (total_bytes - small * SMALL_FILE_BYTES) // LARGE_FILES
    tree = os.path.join(work, "tree")
    sample = {}
    for i in range(small):
        path = os.path.join(tree, f"d{i // 1000:02d}", f"f{i:05d}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = os.urandom(SMALL_FILE_BYTES)
        with open(path, "wb") as f:
            f.write(data)
        if i % 997 == 0:
            sample[f"small/d{i // 1000:02d}/f{i:05d}"] = hashlib.sha256(data).hexdigest()
    client = bench_module.make_client(cluster.master_address)
    try:
        summary = client.upload_tree(tree, "small")
        if summary.failures:
            raise RuntimeError(f"{len(summary.failures)} uploads failed")
        shutil.rmtree(tree)
        path = os.path.join(work, "large")
        for i in range(LARGE_FILES):
            sha = hashlib.sha256()
            with open(path, "wb") as f:
                left = large_bytes
                while left:
                    piece = os.urandom(min(left, 1 << 20))
                    sha.update(piece)
                    f.write(piece)
                    left -= len(piece)
            client.upload_file(path, f"large/{i:02d}.bin")
            sample[f"large/{i:02d}.bin"] = sha.hexdigest()
        os.unlink(path)
    finally:
        client.close()
    return sample


def recover(cluster, nodes: int) -> dict:
    """Destroy the master's data dir, recover it; timings and the report line."""
    shutil.rmtree(os.path.join(cluster.data_dir, "master"))
    args = cluster.master_args
    cluster.master_args = [*args, "--recover-from-nodes"]
    started = time.monotonic()
    try:
        cluster.start_master()
    finally:
        cluster.master_args = args

    def serving():
        t = totals(cluster)
        return not t.get("recovering") and t["nodes_alive"] == nodes and not t["safe_mode"]

    bench_module.poll(serving, 600)
    serving_s = time.monotonic() - started
    with open(cluster.master.log_path, encoding="utf-8") as f:
        line = [line for line in f if "recovered " in line and " files (" in line][-1]
    took = float(line.rsplit("took ", 1)[1].split()[0])
    waited = float(line.rsplit("(", 1)[1].split()[0])
    return {"recovery_s": took, "waiting_for_nodes_s": waited, "serving_s": round(serving_s, 2),
            "report": line.split(": ", 1)[1].strip()}


def check(cluster, files: int, total_bytes: int, sample: dict) -> list[str]:
    client = bench_module.make_client(cluster.master_address)
    try:
        listed = client.list()
        problems = []
        if len(listed) != files:
            problems.append(f"{len(listed)} files listed, {files} stored")
        if sum(e["size"] for e in listed) != total_bytes:
            problems.append(f"{sum(e['size'] for e in listed)} bytes listed, {total_bytes} stored")
        for name, sha in sample.items():
            if client.stat(name).sha256 != sha:
                problems.append(f"{name}: SHA-256 differs")
        return problems
    finally:
        client.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10000, help="files to store (default 10000)")
    parser.add_argument("--mib", type=int, default=1024, help="MiB they hold in all (default 1024)")
    parser.add_argument("--nodes", type=int, default=3, help="storage nodes (default 3)")
    parser.add_argument("--heartbeat", type=float, default=2.0,
                        help="heartbeat_interval_s of master and nodes (default 2, as config.ini)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    timing = ["--heartbeat-interval", str(args.heartbeat), "--dead-after", str(max(5 * args.heartbeat, 10.0))]
    with tempfile.TemporaryDirectory(prefix="recovery-time-") as work:
        cluster = cluster_module.LocalCluster(
            work, nodes=args.nodes, master_args=[*timing, "--meta-backup-interval", "86400"],
            node_args=["--heartbeat-interval", str(args.heartbeat), "--scrub-rate", "0"]).start()
        try:
            bench_module.poll(lambda: totals(cluster)["nodes_alive"] == args.nodes, 60)
            total_bytes = (args.files - LARGE_FILES) * SMALL_FILE_BYTES
            total_bytes += (args.mib * (1 << 20) - total_bytes) // LARGE_FILES * LARGE_FILES
            started = time.monotonic()
            sample = store_workload(cluster, work, args.files, args.mib << 20)
            print(f"stored {args.files} files, {total_bytes} bytes in {time.monotonic() - started:.1f} s", flush=True)
            results = {}
            # Measure recovery, not the race of a kill with the last notes (tests cover that).
            bench_module.poll(lambda: totals(cluster)["commit_notes_pending"] == 0, 60)
            cluster.master.signal(signal.SIGKILL)  # no metadata backup was ever stored
            cluster.master.kill()
            results["notes_only"] = recover(cluster, args.nodes)
            problems = check(cluster, args.files, total_bytes, sample)
            cluster.master.terminate()  # a clean stop: a backup at shutdown
            results["backup"] = recover(cluster, args.nodes)
            problems += check(cluster, args.files, total_bytes, sample)
        finally:
            cluster.stop()
    for mode, result in results.items():
        print(f"{mode:>10}: recovery {result['recovery_s']:.2f} s ({result['waiting_for_nodes_s']:.2f} s of it "
              f"waiting for nodes), serving all files again after "
              f"{result['serving_s']:.2f} s -- {result['report']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"files": args.files, "bytes": total_bytes, "nodes": args.nodes,
                       "heartbeat_s": args.heartbeat, **results}, f, indent=2)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
