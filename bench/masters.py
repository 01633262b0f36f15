"""Three replicated masters against one, in the same run: commit latency and upload throughput.

``python bench/masters.py [--reps 3] [--tiny 30] [--files 2000] [--mib 256]``
starts a one-master cluster and a three-master cluster (3 nodes each, on
127.0.0.1, shipped timing) side by side and interleaves, rep by rep:

1. commit latency of a 1-byte upload: ``--tiny`` uploads from one warm
   in-process client (the connection open, so the time is the request and
   its commit: fsync of the op log on one master; a majority of Raft logs
   fsynced and applied with three), median per rep;
2. ``client.py upload DIR`` of ``--files`` files of 4 KiB (a process,
   spawn to exit): files/s;
3. ``client.py upload FILE`` of ``--mib`` MiB of random bytes: MiB/s.

The cluster that goes first alternates from rep to rep.
Prints per workload the median of the reps for each cluster and the ratio
three/one, with the issue-12 targets (latency <= 2x one master, small files
>= 0.7x, large file >= 0.9x).  Exit status 1 if a workload failed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)

import bench as bench_module  # noqa: E402  (bench/bench.py: its client runner and file helpers)
import client as client_module  # noqa: E402
import cluster as cluster_module  # noqa: E402

SMALL_FILE_BYTES = 4096


def addresses(cluster) -> list[tuple[str, int]]:
    return [(h, int(p)) for h, _, p in (a.rpartition(":") for a in cluster.master_address.split(","))]


def make_client(cluster) -> client_module.Client:
    group = addresses(cluster)
    return client_module.Client(group if len(group) > 1 else group[0], 60.0, 1 << 20, show_progress=False)


def wait_ready(cluster, nodes: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        client = make_client(cluster)
        try:
            if client.status().totals["nodes_alive"] >= nodes:
                return
        except client_module.protocol.BackupError:
            pass
        finally:
            client.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cluster.master_address}: nodes did not register in time")
        time.sleep(0.1)


def tiny_latency(cluster, path: str, count: int, rep: int) -> float:
    """Median seconds of ``count`` 1-byte uploads on one warm connection."""
    client = make_client(cluster)
    try:
        client.upload_file(path, f"tiny-warm-{rep}")  # connect, find the leader
        times = []
        for i in range(count):
            started = time.monotonic()
            client.upload_file(path, f"tiny-{rep}-{i}")
            times.append(time.monotonic() - started)
        return statistics.median(times)
    finally:
        client.close()


def timed_upload(cluster, source: str, name: str) -> float:
    elapsed, _, _ = bench_module.product_client(cluster.master_address, "upload", source, name)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each workload (default 3)")
    parser.add_argument("--tiny", type=int, default=30, help="1-byte uploads per rep (default 30)")
    parser.add_argument("--files", type=int, default=2000, help="4 KiB files of the directory upload (default 2000)")
    parser.add_argument("--mib", type=int, default=256, help="MiB of the large upload (default 256)")
    parser.add_argument("--nodes", type=int, default=3, help="storage nodes per cluster (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-masters-") as tmp:
        one = cluster_module.LocalCluster(os.path.join(tmp, "one"), nodes=args.nodes, masters=1)
        three = cluster_module.LocalCluster(os.path.join(tmp, "three"), nodes=args.nodes, masters=3)
        clusters = {"1 master": one, "3 masters": three}
        try:
            for cluster in clusters.values():
                cluster.start()
                wait_ready(cluster, args.nodes)
            tiny = os.path.join(tmp, "tiny")
            with open(tiny, "wb") as f:
                f.write(b"x")
            small = os.path.join(tmp, "small")
            os.makedirs(small)
            for i in range(args.files):
                with open(os.path.join(small, f"f{i:05d}"), "wb") as f:
                    f.write(os.urandom(SMALL_FILE_BYTES))
            large = os.path.join(tmp, "large")
            bench_module.make_random_file(large, args.mib << 20)
            results: dict[str, dict[str, list[float]]] = {w: {c: [] for c in clusters} for w in
                                                          ("latency", "small", "large")}
            for rep in range(args.reps):
                # Alternate which cluster goes first, so a burst of load elsewhere does not always hit one.
                order = list(clusters.items()) if rep % 2 == 0 else list(clusters.items())[::-1]
                for label, cluster in order:
                    results["latency"][label].append(tiny_latency(cluster, tiny, args.tiny, rep))
                    results["small"][label].append(args.files / timed_upload(cluster, small, f"small-{rep}"))
                    results["large"][label].append(args.mib / timed_upload(cluster, large, f"large-{rep}"))
                    print(f"rep {rep + 1} {label}: 1-byte upload {results['latency'][label][-1] * 1000:.1f} ms, "
                          f"{results['small'][label][-1]:.0f} files/s, {results['large'][label][-1]:.1f} MiB/s",
                          flush=True)
        finally:
            for cluster in clusters.values():
                cluster.stop()
    rows = [("latency", "1-byte upload, median latency", "ms", 1000, "<= 2x", lambda r: r <= 2.0),
            ("small", f"upload dir {args.files:,} x 4 KiB", "files/s", 1, ">= 0.7x", lambda r: r >= 0.7),
            ("large", f"upload {args.mib} MiB", "MiB/s", 1, ">= 0.9x", lambda r: r >= 0.9)]
    print(f"\n{'workload':<34} {'1 master':>16} {'3 masters':>16} {'ratio':>7}  target")
    for key, label, unit, scale, target, met in rows:
        a = statistics.median(results[key]["1 master"]) * scale
        b = statistics.median(results[key]["3 masters"]) * scale
        ratio = b / a
        print(f"{label:<34} {a:>8.1f} {unit:<7} {b:>8.1f} {unit:<7} {ratio:>6.2f}x  {target} "
              f"{'met' if met(ratio) else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
