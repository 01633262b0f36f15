"""Time from a storage node's death to full re-replication of its data.

``python bench/heal_time.py [--mib 64] [--nodes 3]`` starts a fresh local
cluster with the configured timing (config.ini: heartbeat_interval_s,
dead_after_s, repair_rate_mb_s), uploads a random file, SIGKILLs one node,
and reports when the master declared it dead and when every chunk was back
at ``replication`` live copies.  It then kills a second node and checks that
the file still downloads byte-identical.  Exit status 1 if it does not.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client as client_module  # noqa: E402
import cluster as cluster_module  # noqa: E402


def poll(condition, timeout_s: float, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval_s)
    raise TimeoutError("condition not reached in time")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="size of the file to store (default 64)")
    parser.add_argument("--nodes", type=int, default=3, help="storage nodes (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="heal-time-") as work:
        cluster = cluster_module.LocalCluster(work, nodes=args.nodes).start()
        try:
            host, _, port = cluster.master_address.rpartition(":")
            client = client_module.Client((host, int(port)), 60.0, 1 << 20, show_progress=False)
            poll(lambda: client.status().totals["nodes_alive"] == args.nodes, 30)
            path = os.path.join(work, "data")
            with open(path, "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(1 << 20))
            client.upload_file(path, "heal-time")
            killed_at = time.monotonic()
            cluster.nodes[0].kill()
            poll(lambda: client.status().totals["nodes_alive"] == args.nodes - 1, 120)
            dead_s = time.monotonic() - killed_at

            def healed():
                totals = client.status().totals
                done = (totals["repaired_chunks"] > 0 and totals["under_replicated_chunks"] == 0
                        and totals["repairs_pending"] == 0)
                return totals if done else None

            totals = poll(healed, 600)
            healed_s = time.monotonic() - killed_at
            print(f"node declared dead {dead_s:.2f} s after SIGKILL; {totals['repaired_chunks']} chunks "
                  f"({totals['repaired_chunks'] / 1024:.1f} MiB at 1 KiB chunks) re-replicated {healed_s:.2f} s "
                  f"after it ({healed_s - dead_s:.2f} s of copying)")
            cluster.nodes[1].kill()
            out = os.path.join(work, "out")
            client_module.Client((host, int(port)), 60.0, 1 << 20, show_progress=False).download("heal-time", out)
            same = _sha256(out) == _sha256(path)
            print(f"second node killed; download byte-identical: {same}")
            return 0 if same else 1
        finally:
            cluster.stop()


def _sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
