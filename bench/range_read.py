"""Latency of small range reads from a large stored file.

``python bench/range_read.py [--mib 1024] [--bytes 100] [--reads 50]``
starts a fresh local cluster, stores a random file, then reads ``--bytes``
bytes at random offsets with an in-process client (no interpreter start-up
in the figure), checks each answer against the original, and prints the
median, p90 and extremes.  A range read fetches only the chunks covering
the range, so the latency should not depend on the file's size.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client as client_module  # noqa: E402
import cluster as cluster_module  # noqa: E402
from heal_time import poll  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the stored file (default 1024)")
    parser.add_argument("--bytes", type=int, default=100, help="bytes per read (default 100)")
    parser.add_argument("--reads", type=int, default=50, help="number of reads (default 50)")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="range-read-") as work:
        cluster = cluster_module.LocalCluster(work, nodes=3).start()
        try:
            host, _, port = cluster.master_address.rpartition(":")
            client = client_module.Client((host, int(port)), 60.0, 1 << 20, show_progress=False)
            poll(lambda: client.status().totals["nodes_alive"] == 3, 30)
            path = os.path.join(work, "data")
            with open(path, "wb") as f:
                for _ in range(args.mib):
                    f.write(rng.randbytes(1 << 20))
            started = time.monotonic()
            client.upload_file(path, "big")
            print(f"stored {args.mib} MiB in {time.monotonic() - started:.1f} s")
            latencies = []
            with open(path, "rb") as original:
                for index in range(args.reads):
                    offset = rng.randrange(0, args.mib * (1 << 20) - args.bytes)
                    out = os.path.join(work, f"read{index}")
                    started = time.perf_counter()
                    client.download("big", out, offset, args.bytes)
                    latencies.append((time.perf_counter() - started) * 1000)
                    original.seek(offset)
                    with open(out, "rb") as got:
                        if got.read() != original.read(args.bytes):
                            print(f"WRONG BYTES at offset {offset}", file=sys.stderr)
                            return 1
                    os.unlink(out)
            latencies.sort()
            print(f"{args.bytes}-byte reads from a {args.mib} MiB file, {args.reads} random offsets (seed {args.seed}): "
                  f"median {statistics.median(latencies):.2f} ms, min {latencies[0]:.2f}, "
                  f"p90 {latencies[int(len(latencies) * 0.9) - 1]:.2f}, max {latencies[-1]:.2f} ms")
            return 0
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
