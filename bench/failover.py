"""Failover time of a replicated group: SIGKILL or SIGSTOP of the leader -> next acknowledged upload.

``python bench/failover.py [--rounds 5] [--nodes 3] [--faults kill,stop]``
starts 3 masters and the nodes on 127.0.0.1 with the configured timing
(config.ini: ``[raft]``, heartbeat_interval_s, failover_timeout_s), then
per round: an upload to warm up, the fault on the leader, and client
uploads (``client.py --masters``, each one process, as a user would run it)
until one is acknowledged; the time from the fault to that acknowledgement
is the round's failover time.  ``kill``: SIGKILL, and the master is
restarted before the next round.  ``stop``: SIGSTOP (a paused process: it
keeps its sockets, and the kernel still accepts connections for it), then
SIGCONT after the acknowledgement; the woken master must step down.
``--rounds`` rounds of each fault.  Prints each round, and per fault the
median and the maximum; exit status 1 if an acknowledged file does not read
back byte-identical or a woken master still leads.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
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


def wait_for_leader_other_than(cluster, old: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            leader = leader_index(cluster)
            if leader != old:
                return leader
        except (StopIteration, OSError, client_module.protocol.BackupError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"master{old + 1} still leads (or none does) {timeout_s:g} s after waking")
        time.sleep(0.1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each fault (default 5)")
    parser.add_argument("--nodes", type=int, default=3, help="storage nodes (default 3)")
    parser.add_argument("--faults", default="kill,stop",
                        help="comma list of kill (SIGKILL, then restart) and stop (SIGSTOP, then SIGCONT); "
                             "default both")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if not faults or any(f not in ("kill", "stop") for f in faults):
        parser.error("--faults takes kill, stop or both")
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
            times: dict[str, list[float]] = {f: [] for f in faults}
            names = []
            for round_ in range(args.rounds):
                for fault in faults:
                    label = f"{fault}{round_}"
                    warm = run_client(cluster, "upload", path, f"warm-{label}")
                    if warm.returncode:
                        print(f"warm-up upload failed: {warm.stderr.decode()}", file=sys.stderr)
                        return 1
                    old = leader_index(cluster)
                    victim = cluster.masters[old]
                    if fault == "kill":
                        victim.kill()
                    else:
                        victim.signal(signal.SIGSTOP)
                    faulted = time.monotonic()
                    failed = []
                    while True:
                        result = run_client(cluster, "upload", path, f"after-{label}")
                        if result.returncode == 0:
                            break
                        failed.append(result.stderr.decode(errors="replace").strip().splitlines()[-1:])
                    elapsed = time.monotonic() - faulted
                    times[fault].append(elapsed)
                    names += [f"warm-{label}", f"after-{label}"]
                    print(f"round {round_ + 1}: {'SIGKILL' if fault == 'kill' else 'SIGSTOP'} of master{old + 1}; "
                          f"next upload acknowledged after {elapsed:.2f} s ({len(failed) + 1} client run(s)"
                          + (f"; first failure: {failed[0][0] if failed[0] else '?'}" if failed else "") + ")",
                          flush=True)
                    if fault == "kill":
                        cluster.start_group_master(old)
                    else:
                        victim.signal(signal.SIGCONT)
                        wait_for_leader_other_than(cluster, old)
            digest = hashlib.sha256(data).hexdigest()
            bad = [n for n in names if hashlib.sha256(run_client(cluster, "cat", n).stdout).hexdigest() != digest]
            for fault, values in times.items():
                print(f"failover ({'SIGKILL' if fault == 'kill' else 'SIGSTOP'} of the leader -> next acknowledged "
                      f"upload), {len(values)} rounds: median {statistics.median(values):.2f} s, "
                      f"max {max(values):.2f} s")
            if bad:
                print(f"NOT byte-identical: {', '.join(bad)}", file=sys.stderr)
                return 1
            return 0
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
