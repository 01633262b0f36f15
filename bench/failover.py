"""Failover time of a replicated group: SIGKILL of the leader -> next acknowledged upload.

``python bench/failover.py [--rounds 5] [--nodes 3]`` starts 3 masters and
the nodes on 127.0.0.1 with the configured timing (config.ini: ``[raft]``,
heartbeat_interval_s, failover_timeout_s), then per round: an upload to
warm up, SIGKILL of the leader, and client uploads (``client.py --masters``,
each one process, as a user would run it) until one is acknowledged; the
time from the kill to that acknowledgement is the round's failover time.
The killed master is restarted before the next round.  Prints each round,
the median and the maximum; exit status 1 if an acknowledged file does not
read back byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import client as client_module  # noqa: E402
import cluster as cluster_module  # noqa: E402


def run_client(cluster, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "client.py"), "--master", cluster.master_address,
                           "--quiet", *args], capture_output=True, cwd=cluster.data_dir)


def group_status(cluster):
    addresses = [(h, int(p)) for h, _, p in (a.rpartition(":") for a in cluster.master_address.split(","))]
    client = client_module.Client(addresses, timeout_s=10.0, frame_bytes=1 << 20, show_progress=False)
    try:
        return client.status()
    finally:
        client.close()


def leader_index(cluster) -> int:
    leader = next(m["address"] for m in group_status(cluster).masters if m["role"] == "leader")
    return cluster.master_address.split(",").index(leader)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="leader kills (default 5)")
    parser.add_argument("--nodes", type=int, default=3, help="storage nodes (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        cluster = cluster_module.LocalCluster(tmp, nodes=args.nodes, masters=3)
        try:
            cluster.start()
            deadline = time.monotonic() + 60
            while group_status(cluster).totals["nodes_alive"] < args.nodes:
                if time.monotonic() > deadline:
                    print("the nodes did not register in time", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            path = os.path.join(tmp, "payload")
            data = os.urandom(64 * 1024)
            with open(path, "wb") as f:
                f.write(data)
            times, names = [], []
            for round_ in range(args.rounds):
                warm = run_client(cluster, "upload", path, f"warm{round_}")
                if warm.returncode:
                    print(f"warm-up upload failed: {warm.stderr.decode()}", file=sys.stderr)
                    return 1
                old = leader_index(cluster)
                cluster.masters[old].kill()
                killed = time.monotonic()
                attempts = 0
                while True:
                    attempts += 1
                    result = run_client(cluster, "upload", path, f"after{round_}")
                    if result.returncode == 0:
                        break
                elapsed = time.monotonic() - killed
                times.append(elapsed)
                names += [f"warm{round_}", f"after{round_}"]
                print(f"round {round_ + 1}: killed master{old + 1}; next upload acknowledged after "
                      f"{elapsed:.2f} s ({attempts} client run(s))", flush=True)
                cluster.start_group_master(old)
            digest = hashlib.sha256(data).hexdigest()
            bad = [n for n in names if hashlib.sha256(run_client(cluster, "cat", n).stdout).hexdigest() != digest]
            print(f"failover (SIGKILL of the leader -> next acknowledged upload), {len(times)} rounds: "
                  f"median {statistics.median(times):.2f} s, max {max(times):.2f} s")
            if bad:
                print(f"NOT byte-identical: {', '.join(bad)}", file=sys.stderr)
                return 1
            return 0
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
