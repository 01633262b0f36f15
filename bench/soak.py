"""Soak: a real cluster under a steady load while nodes and the master fail.

``python bench/soak.py --minutes N`` (or ``--seconds S``; ``--seed`` makes
the operation and fault sequence repeatable; ``--masters 3`` runs a
replicated group of three masters) starts the master(s) and four storage
nodes (LocalCluster, 127.0.0.1, short intervals), then runs:

* Two workers, each owning its own names (so one name's operations are
  sequential), doing random uploads (sizes 0..2 MiB, a third of them under
  4 KiB), downloads and deletes.  Each keeps a model of what every name may
  hold: the set of contents (SHA-256, or None = absent) it may have.  An
  acknowledged upload or delete makes that set exactly its result; one
  whose outcome is unknown (an error, a lost reply when the master dies)
  adds its result to the set, since it may or may not have happened.
* A fault thread that, every 1 to 3 s, injects one fault: a node SIGKILLed
  and restarted 0.5 to 3 s later (weight 4), a node SIGSTOPped for 0.5 to
  4 s (weight 3), or the master SIGKILLed and restarted (weight 1); with
  ``--masters 3`` the master faults hit the leader: SIGKILL and restart
  (weight 1) or SIGSTOP for 0.5 to 3 s (weight 1).  Only
  one fault is in force at a time, and after each the thread waits for the
  master to report every node alive and nothing under-replicated (twice,
  0.5 s apart) before the next one: with replication 2 a second loss before
  the repair could lose data, and a real cluster loses a node per months,
  not per seconds, so this rate is a stress, not a model of reality.

Every download is checked against the model.  A download that fails with
UNAVAILABLE or TIMEOUT during a fault counts as "unavailable", not lost; one
that returns bytes outside the model counts as "wrong", the worst failure.
At the end every fault is healed (stopped processes resumed, dead ones
restarted), the cluster must report full replication within --heal-timeout
seconds (the time taken is printed), every name is listed and downloaded:
an acknowledged file that is missing is "lost", a deleted one that is listed
is "resurrected".  Exit status is 0 only if lost, wrong, resurrected and
client-refused (checksum) downloads are all 0 and the cluster healed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import client as client_module  # noqa: E402
import protocol  # noqa: E402
from cluster import LocalCluster, ProcessFailed  # noqa: E402

EXIT_OK = 0
EXIT_DATA_FAILED = 1  # lost, wrong or resurrected files
EXIT_USAGE = 2
EXIT_START_FAILED = 3
EXIT_NOT_HEALED = 4

MIB = 1024 * 1024
NODES = 4
WORKERS = 2
NAMES_PER_WORKER = 24
MAX_FILE_BYTES = 2 * MIB
IO_TIMEOUT_S = 3.0
MASTER_ARGS = ["--heartbeat-interval", "0.2", "--dead-after", "1", "--io-timeout", str(IO_TIMEOUT_S),
               "--safe-mode", "2"]
NODE_ARGS = ["--heartbeat-interval", "0.2", "--io-timeout", str(IO_TIMEOUT_S), "--compact-interval", "2"]
# A client waits this long for any step; above the master's own failover
# (io_timeout per replica) so a slow answer is not mistaken for a lost one.
CLIENT_TIMEOUT_S = 4 * IO_TIMEOUT_S
# Errors that mean "could not be served now", not "data is gone".
TRANSIENT = ("UNAVAILABLE", "TIMEOUT", "INSUFFICIENT_NODES", "FILE_LOCKED", "NO_LEADER", "NOT_LEADER")


class Stats:
    """Counters shared by the threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def problem(self, key: str, text: str) -> None:
        self.add(key)
        with self._lock:
            self.problems.append(f"{key}: {text}")
        print(f"soak: {key}: {text}", file=sys.stderr, flush=True)

    def get(self, key: str) -> int:
        with self._lock:
            return self.counts.get(key, 0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_client(cluster: LocalCluster, timeout_s: float = CLIENT_TIMEOUT_S) -> client_module.Client:
    """A client of the master, or of every master of a group (it follows the leader).

    A restarted master keeps its port, so the addresses never change.
    """
    group = [(host, int(port)) for host, _, port in
             (address.rpartition(":") for address in cluster.master_address.split(","))]
    return client_module.Client(group if len(group) > 1 else group[0], timeout_s, MIB, show_progress=False)


def error_code(exc: BaseException) -> str:
    return getattr(exc, "code", type(exc).__name__)


class Worker(threading.Thread):
    """Random uploads, downloads and deletes on names only this worker uses."""

    def __init__(self, index: int, cluster: LocalCluster, seed: int, stop: threading.Event, stats: Stats,
                 scratch: str):
        super().__init__(name=f"worker{index}", daemon=True)
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.stop_event = stop
        self.stats = stats
        self.names = [f"w{index}/file-{i:02d}" for i in range(NAMES_PER_WORKER)]
        # name -> contents it may hold: SHA-256 hex, or None for "absent".
        self.model: dict[str, set] = {name: {None} for name in self.names}
        self.upload_path = os.path.join(scratch, f"w{index}.up")
        self.download_path = os.path.join(scratch, f"w{index}.down")
        self.client: client_module.Client | None = None

    def connect(self) -> client_module.Client:
        if self.client is None:
            self.client = make_client(self.cluster)
        return self.client

    def drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            name = self.rng.choice(self.names)
            roll = self.rng.random()
            try:
                if roll < 0.45:
                    self.upload(name)
                elif roll < 0.85:
                    self.download(name)
                else:
                    self.delete(name)
            except Exception as exc:  # a bench bug: report it, keep the load going
                self.stats.problem("worker-crash", f"{name}: {exc!r}")
                self.drop_client()
        self.drop_client()

    def random_size(self) -> int:
        if self.rng.random() < 1 / 3:
            return self.rng.randrange(0, 4096)
        return self.rng.randrange(0, MAX_FILE_BYTES + 1)

    def upload(self, name: str) -> None:
        data = self.rng.randbytes(self.random_size())
        with open(self.upload_path, "wb") as f:
            f.write(data)
        digest = sha(data)
        try:
            reply = self.connect().upload_file(self.upload_path, name)
        except (protocol.BackupError, OSError) as exc:
            # The reply may be lost after the commit: it may or may not exist now.
            self.uncertain(name, digest, "upload", exc)
            return
        if reply.sha256 != digest:
            self.stats.problem("wrong", f"upload of {name} acknowledged with SHA-256 {reply.sha256}, sent {digest}")
        self.model[name] = {digest}
        self.stats.add("upload-ok")

    def delete(self, name: str) -> None:
        try:
            self.connect().delete(name)
        except protocol.FileNotFound:
            self.check_absent(name, "delete")
            self.model[name] = {None}
            self.stats.add("delete-not-found")
            return
        except (protocol.BackupError, OSError) as exc:
            self.uncertain(name, None, "delete", exc)
            return
        self.model[name] = {None}
        self.stats.add("delete-ok")

    def uncertain(self, name: str, outcome, operation: str, exc: BaseException) -> None:
        """An operation failed without a clear answer: it may or may not have happened."""
        self.model[name].add(outcome)
        self.stats.add(f"{operation}-uncertain")
        self.stats.add(f"error-{error_code(exc)}")
        self.drop_client()
        self.stop_event.wait(0.1)  # do not spin while the master restarts

    def check_absent(self, name: str, what: str) -> None:
        if None not in self.model[name]:
            self.stats.problem("lost", f"{what} of {name}: FILE_NOT_FOUND, but it was acknowledged")

    def download(self, name: str) -> None:
        try:
            self.connect().download(name, self.download_path, force=True)
        except protocol.FileNotFound:
            self.check_absent(name, "download")
            self.stats.add("download-not-found")
            return
        except protocol.ChecksumMismatch as exc:
            self.stats.problem("refused", f"download of {name}: the client's SHA-256 check refused it: {exc}")
            self.drop_client()
            return
        except protocol.DataLost as exc:
            # Mid-fault this should not happen with one node down at most; the
            # final verification decides whether the file is really gone.
            self.stats.problem("data-lost-reply", f"download of {name}: {exc}")
            self.drop_client()
            return
        except (protocol.BackupError, OSError) as exc:
            self.stats.add("download-unavailable")
            self.stats.add(f"error-{error_code(exc)}")
            self.drop_client()
            self.stop_event.wait(0.1)  # do not spin while the master restarts
            return
        with open(self.download_path, "rb") as f:
            digest = sha(f.read())
        if digest not in self.model[name]:
            self.stats.problem("wrong", f"download of {name} returned SHA-256 {digest[:16]}..., "
                                        f"expected one of {sorted(str(s)[:16] for s in self.model[name])}")
        self.stats.add("download-ok")


class Faults(threading.Thread):
    """One fault at a time, each followed by a wait for the cluster to heal."""

    def __init__(self, cluster: LocalCluster, seed: int, stop: threading.Event, stats: Stats):
        super().__init__(name="faults", daemon=True)
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.stop_event = stop
        self.stats = stats
        self.lock = threading.Lock()  # held while the cluster's processes are being changed

    def run(self) -> None:
        try:
            while not self.stop_event.wait(self.rng.uniform(1.0, 3.0)):
                kinds, weights = ["node-kill", "node-stop", "master-kill"], [4, 3, 1]
                if self.cluster.master_count > 1:
                    kinds, weights = kinds + ["master-stop"], weights + [1]
                kind = self.rng.choices(kinds, weights=weights)[0]
                with self.lock:
                    getattr(self, kind.replace("-", "_"))()
                self.stats.add(f"fault-{kind}")
                self.wait_healed()
        except Exception as exc:
            self.stats.problem("fault-thread-crash", repr(exc))

    def node_kill(self) -> None:
        index = self.rng.randrange(len(self.cluster.nodes))
        self.cluster.nodes[index].kill()
        self.stop_event.wait(self.rng.uniform(0.5, 3.0))
        self.cluster.add_node(index)

    def node_stop(self) -> None:
        index = self.rng.randrange(len(self.cluster.nodes))
        self.cluster.nodes[index].signal(signal.SIGSTOP)
        try:
            self.stop_event.wait(self.rng.uniform(0.5, 4.0))
        finally:
            self.cluster.nodes[index].signal(signal.SIGCONT)

    def master_kill(self) -> None:
        if self.cluster.master_count > 1:
            index = leader_index(self.cluster)
            self.cluster.masters[index].kill()
            self.stop_event.wait(self.rng.uniform(0.0, 1.0))
            self.cluster.start_group_master(index)
            return
        self.cluster.master.kill()
        self.stop_event.wait(self.rng.uniform(0.0, 1.0))
        self.cluster.start_master()

    def master_stop(self) -> None:
        """SIGSTOP the leader of a group: the others elect another; it wakes as a follower."""
        index = leader_index(self.cluster)
        self.cluster.masters[index].signal(signal.SIGSTOP)
        try:
            self.stop_event.wait(self.rng.uniform(0.5, 3.0))
        finally:
            self.cluster.masters[index].signal(signal.SIGCONT)

    def wait_healed(self, timeout_s: float = 60.0) -> bool:
        """Every node alive and nothing to repair, seen twice 0.5 s apart."""
        deadline = time.monotonic() + timeout_s
        streak = 0
        while time.monotonic() < deadline:
            streak = streak + 1 if healed(self.cluster) else 0
            if streak >= 2:
                return True
            time.sleep(0.5)
        self.stats.problem("slow-heal", f"not healed {timeout_s:.0f} s after a fault")
        return False


def status(cluster: LocalCluster):
    c = make_client(cluster)
    try:
        return c.status()
    finally:
        c.close()


def leader_index(cluster: LocalCluster) -> int:
    """The index of the group's leader (the first master while none can be found)."""
    try:
        masters = status(cluster).masters or []
    except (protocol.BackupError, OSError):
        return 0
    addresses = cluster.master_address.split(",")
    return next((addresses.index(m["address"]) for m in masters if m["role"] == "leader"), 0)


def healed(cluster: LocalCluster) -> bool:
    try:
        t = status(cluster).totals
    except (protocol.BackupError, OSError):
        return False
    return (t["nodes_alive"] == len(cluster.nodes) and not t["safe_mode"] and t["under_replicated_chunks"] == 0
            and t["repairs_pending"] == 0)


def heal_everything(cluster: LocalCluster) -> None:
    """Resume stopped processes and restart dead ones."""
    if cluster.master_count > 1:
        for index, master in enumerate(cluster.masters):
            master.signal(signal.SIGCONT)
            if not master.running():
                cluster.start_group_master(index)
    elif not cluster.master.running():
        cluster.start_master()
    for index, node in enumerate(cluster.nodes):
        node.signal(signal.SIGCONT)
        if not node.running():
            cluster.add_node(index)


def verify(cluster: LocalCluster, workers: list[Worker], stats: Stats, scratch: str) -> None:
    """List and download every name; count verified, lost, wrong and resurrected files."""
    c = make_client(cluster, 60.0)
    path = os.path.join(scratch, "verify.down")
    try:
        names = {entry["name"] for entry in c.list()}
        for worker in workers:
            for name, possible in worker.model.items():
                if name not in names:
                    if None in possible:
                        stats.add("verified-absent")
                    else:
                        stats.problem("lost", f"{name} is not listed at the end, but it was acknowledged")
                    continue
                if possible == {None}:
                    stats.problem("resurrected", f"{name} is listed at the end, but it was deleted")
                    continue
                try:
                    c.download(name, path, force=True)
                except (protocol.BackupError, OSError) as exc:
                    stats.problem("lost", f"{name} does not download at the end: {error_code(exc)}: {exc}")
                    c.close()
                    continue
                with open(path, "rb") as f:
                    digest = sha(f.read())
                if digest in possible:
                    stats.add("verified")
                else:
                    stats.problem("wrong", f"{name} at the end has SHA-256 {digest[:16]}..., not in the model")
        strangers = names - {name for worker in workers for name in worker.model}
        for name in sorted(strangers):
            stats.problem("resurrected", f"{name} is listed but was never uploaded")
    finally:
        c.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Soak the backup system: load plus node and master faults.")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run the load (default 1)")
    length.add_argument("--seconds", type=float, help="how long to run the load, in seconds")
    parser.add_argument("--seed", type=int, default=None, help="seed of the load and faults (default: random)")
    parser.add_argument("--masters", type=int, default=1, choices=(1, 3, 5),
                        help="masters: 1, or a replicated group of 3 or 5 (default 1)")
    parser.add_argument("--heal-timeout", type=float, default=60.0, metavar="S",
                        help="seconds allowed to reach full replication after the run (default 60)")
    parser.add_argument("--data-dir", help="where the cluster keeps data and logs (default: a temporary dir, "
                                           "removed after a clean run)")
    args = parser.parse_args(argv)
    duration_s = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes else 1.0)
    if duration_s <= 0:
        print("soak: the duration must be positive", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="soak-")
    scratch = os.path.join(data_dir, "scratch")
    os.makedirs(scratch, exist_ok=True)
    print(f"soak: seed {seed}, {duration_s:.0f} s, {args.masters} master(s), {NODES} nodes, data in {data_dir}",
          flush=True)

    cluster = LocalCluster(data_dir, nodes=NODES, master_args=MASTER_ARGS, node_args=NODE_ARGS, masters=args.masters)
    try:
        cluster.start()
    except ProcessFailed as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    stats = Stats()
    stop = threading.Event()
    rng = random.Random(seed)
    workers = [Worker(i, cluster, rng.randrange(2**32), stop, stats, scratch) for i in range(WORKERS)]
    faults = Faults(cluster, rng.randrange(2**32), stop, stats)
    exit_code = EXIT_OK
    try:
        deadline = time.monotonic() + 15.0
        while not healed(cluster) and time.monotonic() < deadline:
            time.sleep(0.1)
        started = time.monotonic()
        for thread in [*workers, faults]:
            thread.start()
        stop.wait(duration_s)
        stop.set()
        for thread in [*workers, faults]:
            thread.join()
        load_s = time.monotonic() - started

        heal_started = time.monotonic()
        heal_everything(cluster)
        deadline = heal_started + args.heal_timeout
        streak = 0
        while streak < 2 and time.monotonic() < deadline:
            streak = streak + 1 if healed(cluster) else 0
            time.sleep(0.25)
        heal_s = time.monotonic() - heal_started
        if streak < 2:
            print(f"soak: NOT healed within {args.heal_timeout:.0f} s: {status_line(cluster)}", flush=True)
            exit_code = EXIT_NOT_HEALED
        else:
            print(f"soak: healed (every node alive, under-replicated 0) {heal_s:.1f} s after the load stopped "
                  f"(bound {args.heal_timeout:.0f} s)", flush=True)
        verify(cluster, workers, stats, scratch)
    finally:
        cluster.stop()

    g = stats.get
    operations = sum(g(k) for k in ("upload-ok", "upload-uncertain", "delete-ok", "delete-uncertain",
                                    "delete-not-found", "download-ok", "download-not-found",
                                    "download-unavailable", "refused", "data-lost-reply"))
    faults_done = g("fault-node-kill") + g("fault-node-stop") + g("fault-master-kill") + g("fault-master-stop")
    print(f"soak: {load_s:.0f} s of load, operations {operations} "
          f"(uploads {g('upload-ok')} ok / {g('upload-uncertain')} uncertain, "
          f"downloads {g('download-ok')} ok / {g('download-not-found')} absent / "
          f"{g('download-unavailable')} unavailable, "
          f"deletes {g('delete-ok')} ok / {g('delete-uncertain')} uncertain / {g('delete-not-found')} absent)")
    errors = ", ".join(f"{k[6:]} {v}" for k, v in sorted(stats.counts.items()) if k.startswith("error-"))
    print(f"soak: errors seen by clients: {errors or 'none'}")
    print(f"soak: faults injected {faults_done} (node kills {g('fault-node-kill')}, "
          f"node stops {g('fault-node-stop')}, master kills {g('fault-master-kill')}, "
          f"leader stops {g('fault-master-stop')}); "
          f"slow heals {g('slow-heal')}")
    print(f"soak: files verified {g('verified')} (+{g('verified-absent')} correctly absent); "
          f"lost {g('lost')}; wrong bytes {g('wrong')}; resurrected {g('resurrected')}; "
          f"refused by client checksum {g('refused')}; DATA_LOST replies mid-run {g('data-lost-reply')}; "
          f"bench errors {g('worker-crash') + g('fault-thread-crash')}")
    if g("lost") or g("wrong") or g("resurrected") or g("refused"):
        exit_code = EXIT_DATA_FAILED
    if exit_code == EXIT_OK and not args.data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        print(f"soak: logs kept in {cluster.log_dir}")
    print(f"soak: {'PASS' if exit_code == EXIT_OK else 'FAIL'} (seed {seed})", flush=True)
    return exit_code


def status_line(cluster: LocalCluster) -> str:
    try:
        t = status(cluster).totals
    except (protocol.BackupError, OSError) as exc:
        return f"status failed: {exc}"
    return ", ".join(f"{k} {t[k]}" for k in ("nodes_alive", "safe_mode", "under_replicated_chunks",
                                              "repairs_pending", "damaged_file_count"))


if __name__ == "__main__":
    sys.exit(main())
