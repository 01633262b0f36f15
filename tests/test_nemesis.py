"""Three masters and three nodes, as real processes, under a nemesis (issue 12, "real processes").

While two writers upload (unique names and one name each that they
overwrite with numbered versions) and delete, and a reader reads the
overwritten names, the nemesis isolates the leader (every link of it cut
through the per-link proxies of tests/nemesis.py), pauses the isolated
leader (SIGSTOP) in the middle of an upload and wakes it while still cut
off, cuts one direction of a link, and SIGKILLs the leader and restarts it.
After each fault heals the cluster must make progress (a new write is
acknowledged).  Afterwards:

* every acknowledged upload reads back byte-identical (SHA-256), every
  acknowledged delete stays deleted, an upload whose outcome was unknown is
  either absent or whole;
* no read of an overwritten name returned a version older than the last one
  acknowledged before the read began;
* never two leaders at once: at most one master led each term (their logs),
  and the paused leader, woken while cut off, still believed it led and
  tried to write to a node: the node refused it (STALE_MASTER, logged), and
  the upload it was serving was not acknowledged;
* the masters' Raft logs agree up to the commit index.

Default: that fixed schedule once (about 15 s of faults).  ``NEMESIS_SECONDS=60
python -m pytest tests/test_nemesis.py`` then goes on with random faults
(isolate, partition, one-way cuts either way, pause, kill) until that many
seconds have passed; ``NEMESIS_SEED`` picks the schedule (printed on failure).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import threading
import time

from conftest import FAST_TIMING, TestCluster, wait_until
from nemesis import Nemesis, random_fault

import protocol
import transport
from meta.log_store import LogStore

# The default dead_after_s (10 s), not the tests' 1 s: a leader paused for a few seconds must still
# think its nodes alive when it wakes, as a real one would after a pause shorter than dead_after_s.
MASTER_ARGS = ["--heartbeat-interval", "0.2", "--io-timeout", "3"]
EXTRA_SECONDS = float(os.environ.get("NEMESIS_SECONDS", "0"))
SEED = int(os.environ.get("NEMESIS_SEED", str(random.randrange(1 << 30))))
WRITERS = 2


class Workload:
    """Writers and a reader on in-process clients; records what was acknowledged and what was seen."""

    def __init__(self, cluster: TestCluster, tmp_path, seed: int):
        self.cluster, self.tmp = cluster, tmp_path
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # unique name -> sha256 of the acknowledged upload
        self.unknown: dict[str, str] = {}  # unique name -> sha256 of an upload whose outcome is unknown
        self.deleted: set[str] = set()  # acknowledged deletes
        self.delete_unknown: set[str] = set()
        self.hot_acked = [0] * WRITERS  # last acknowledged version of hot-W
        self.hot_tried = [0] * WRITERS  # last version of hot-W sent
        self.acks = 0  # acknowledged writes, for "progress"
        self.stale_reads: list[str] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._writer, args=(w,), name=f"writer{w}") for w in range(WRITERS)]
        self.threads.append(threading.Thread(target=self._reader, name="reader"))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self.threads), "a workload thread hung"

    def progress(self, after: int, timeout_s: float = 30.0, what: str = "progress") -> None:
        wait_until(lambda: self.acks > after, timeout_s, message=f"{what}: a write acknowledged")

    def _upload(self, client, name: str, data: bytes) -> None:
        path = self.tmp / f"w-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
        path.write_bytes(data)
        try:
            client.upload_file(str(path), name)
        finally:
            path.unlink()

    def _writer(self, w: int) -> None:
        rng = random.Random(self.rng.randrange(1 << 30))
        client, n = self.cluster.client(), 0
        try:
            while not self.stop.is_set():
                n += 1
                roll = rng.random()
                try:
                    if roll < 0.25:
                        version = self.hot_tried[w] + 1
                        self.hot_tried[w] = version
                        self._upload(client, f"hot-{w}", f"v{version}\n".encode() + rng.randbytes(3000))
                        with self.lock:
                            self.hot_acked[w] = max(self.hot_acked[w], version)
                            self.acks += 1
                    elif roll < 0.35 and self._deletable(w):
                        name = self._deletable(w)
                        try:
                            client.delete(name)
                        except protocol.BackupError:
                            with self.lock:
                                self.delete_unknown.add(name)
                            raise
                        with self.lock:
                            self.deleted.add(name)
                            self.acks += 1
                    else:
                        name, data = f"u{w}-{n}", rng.randbytes(rng.randrange(1, 40_000))
                        digest = hashlib.sha256(data).hexdigest()
                        try:
                            self._upload(client, name, data)
                        except protocol.BackupError:
                            with self.lock:
                                self.unknown[name] = digest
                            raise
                        with self.lock:
                            self.acked[name] = digest
                            self.acks += 1
                except protocol.BackupError as exc:
                    self.errors.append(f"{exc.code}: {exc}")
                    client.close()
                    client = self.cluster.client()
                    time.sleep(0.05)
        finally:
            client.close()

    def _deletable(self, w: int) -> str | None:
        with self.lock:
            mine = [name for name in self.acked if name.startswith(f"u{w}-") and name not in self.deleted
                    and name not in self.delete_unknown]
        return mine[0] if len(mine) > 3 else None

    def _reader(self) -> None:
        client = self.cluster.client()
        path = self.tmp / "reader.tmp"
        rng = random.Random(self.rng.randrange(1 << 30))
        try:
            while not self.stop.is_set():
                w = rng.randrange(WRITERS)
                floor = self.hot_acked[w]  # acknowledged before this read began
                try:
                    client.download(f"hot-{w}", str(path), force=True)
                    version = int(path.read_bytes().split(b"\n", 1)[0][1:])
                except protocol.FileNotFound:
                    version = 0
                except protocol.BackupError:
                    client.close()
                    client = self.cluster.client()
                    time.sleep(0.05)
                    continue
                if version < floor:
                    self.stale_reads.append(f"hot-{w}: read v{version} after v{floor} was acknowledged")
                time.sleep(0.02)
        finally:
            client.close()
            if path.exists():
                path.unlink()


def leader_of(cluster: TestCluster, timeout_s: float = 20.0, not_in=()) -> int:
    """Index of the master that leads (asked through the group), waiting for one outside ``not_in``."""
    ids = cluster.master_address.split(",")

    def find():
        client = cluster.client()
        try:
            masters = client.status().masters or []
        except protocol.BackupError:
            return None
        finally:
            client.close()
        leaders = [ids.index(m["address"]) for m in masters if m.get("role") == "leader"]
        return leaders[0] + 1 if leaders and leaders[0] not in not_in else None
    return wait_until(find, timeout_s, interval_s=0.1, message="a leader") - 1


def log_text(cluster: TestCluster, name: str) -> str:
    with open(os.path.join(cluster.log_dir, f"{name}.log"), encoding="utf-8", errors="replace") as f:
        return f.read()


def stale_refusals(cluster: TestCluster) -> int:
    return sum(log_text(cluster, f"node{i + 1}").count("from a stale master") for i in range(cluster.node_count))


class StaleProbe:
    """An upload to the leader that stops halfway (one batch sent to the nodes, part of the next),
    so the leader has node writes to make when it wakes from a pause."""

    def __init__(self, cluster: TestCluster, leader: int):
        host, _, port = cluster.master_address.split(",")[leader].rpartition(":")
        self.conn = transport.Connection((host, int(port)), "client", 30.0, expect_server_id="master")
        self.conn.send(protocol.UploadBegin(name="stale-probe", size=-1, wait_s=0))
        self.rng = random.Random(7)
        self.send(1536 * 1024)  # a whole batch (1 MiB) goes to two nodes now
        self.reply: protocol.Message | None = None
        self._thread: threading.Thread | None = None

    def send(self, nbytes: int) -> None:
        for _ in range(nbytes // 65536):
            self.conn.send(protocol.Data(body=self.rng.randbytes(65536)))

    def finish_later(self) -> None:
        """Send the rest and the end (to a paused master: from a thread), then read its one reply."""
        def run():
            try:
                self.send(1024 * 1024)
                self.conn.send(protocol.UploadEnd(sha256="0" * 64))
                self.reply = self.conn.recv()
            except protocol.BackupError as exc:
                self.reply = protocol.error_message(exc)
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.conn.abandon()
        if self._thread is not None:
            self._thread.join(10)
        self.conn.close()


def test_nemesis(tmp_path):
    cluster = TestCluster(str(tmp_path / "c"), nodes=3, masters=3, master_args=MASTER_ARGS, node_args=FAST_TIMING)
    nemesis = Nemesis(cluster.host, cluster.master_ports)
    for index in range(3):
        cluster.group_master_args[index] = nemesis.dial_args(index)
    local = tmp_path / "local"
    local.mkdir()
    workload = Workload(cluster, local, SEED)
    history = []
    try:
        cluster.start()
        cluster.wait_nodes_alive(3, timeout_s=30)
        workload.start()
        workload.progress(0, what="start")

        # 1. The leader cut off from both followers: they elect another; it steps down (check-quorum).
        old = leader_of(cluster)
        history.append(f"isolate master{old + 1}")
        nemesis.isolate(old)
        new = leader_of(cluster, not_in=(old,))
        done = workload.acks
        workload.progress(done, what="writes on the majority side")
        nemesis.heal()
        workload.progress(workload.acks, what="after healing the isolation")

        # 2. A leader paused in the middle of an upload, woken while cut off: it still thinks it leads
        #    and goes on with the upload, and the nodes (which met the next leader) refuse it.
        old = leader_of(cluster)
        history.append(f"pause + isolate master{old + 1} mid-upload")
        probe = StaleProbe(cluster, old)
        try:
            nemesis.isolate(old)
            cluster.masters[old].signal(signal.SIGSTOP)
            leader_of(cluster, not_in=(old,))
            # Every node has registered with the new leader (and so learnt its epoch).
            wait_until(lambda: cluster.status().totals["nodes_alive"] == 3 or None, 20, message="nodes moved")
            refused_before = stale_refusals(cluster)
            probe.finish_later()
            cluster.masters[old].signal(signal.SIGCONT)
            wait_until(lambda: stale_refusals(cluster) > refused_before or None, 15,
                       message="a node refusing the woken stale leader (STALE_MASTER)")
            wait_until(lambda: probe.reply is not None, 20, message="the probe's reply")
            assert isinstance(probe.reply, protocol.Error), probe.reply  # never acknowledged
        finally:
            probe.close()
        nemesis.heal()
        workload.progress(workload.acks, what="after waking the paused leader")

        # 3. One direction of a link: leader -> one follower (that follower stops hearing it).
        old = leader_of(cluster)
        follower = (old + 1) % 3
        history.append(f"cut master{old + 1} -> master{follower + 1}")
        nemesis.cut(old, follower, both=False)
        time.sleep(1.5)
        workload.progress(workload.acks, what="with a one-way cut")
        nemesis.heal()

        # 4. SIGKILL of the leader, then it restarts and catches up.
        old = leader_of(cluster)
        history.append(f"kill master{old + 1}")
        cluster.masters[old].kill()
        leader_of(cluster, not_in=(old,))
        workload.progress(workload.acks, what="after the kill")
        cluster.start_group_master(old)

        # The long run: random faults until NEMESIS_SECONDS have passed.
        rng = random.Random(SEED)
        deadline = time.monotonic() + EXTRA_SECONDS
        while time.monotonic() < deadline:
            leader = leader_of(cluster)
            kind, a, b = random_fault(rng, leader, 3)
            history.append(f"{kind} {a + 1}/{b + 1}")
            if kind == "isolate":
                nemesis.isolate(a)
            elif kind == "partition":
                nemesis.cut(a, b)
            elif kind == "one-way-from-leader":
                nemesis.cut(a, b, both=False)
            elif kind == "one-way-to-leader":
                nemesis.cut(b, a, both=False)
            elif kind == "pause":
                cluster.masters[a].signal(signal.SIGSTOP)
            else:
                cluster.masters[a].kill()
            time.sleep(rng.uniform(0.5, 3.0))
            if kind == "pause":
                cluster.masters[a].signal(signal.SIGCONT)
            elif kind == "kill":
                cluster.start_group_master(a)
            nemesis.heal()
            workload.progress(workload.acks, what=f"after {history[-1]}")
        workload.finish()
        check_outcome(cluster, workload, local)
        check_logs(cluster)
        print(f"nemesis seed {SEED}: {len(workload.acked)} uploads and {len(workload.deleted)} deletes "
              f"acknowledged, hot versions {workload.hot_acked}, {len(workload.errors)} failed operations; "
              f"faults: {'; '.join(history)}")
    except BaseException:
        print(f"nemesis seed {SEED}; faults: {'; '.join(history)}; {nemesis.describe()}; "
              f"workload errors: {workload.errors[-10:]}")
        raise
    finally:
        workload.stop.set()
        for index in range(3):
            if cluster.masters[index] is not None:
                cluster.masters[index].signal(signal.SIGCONT)
        cluster.stop()
        nemesis.stop()


def check_outcome(cluster: TestCluster, workload: Workload, local) -> None:
    assert not workload.stale_reads, workload.stale_reads
    assert len(workload.acked) >= 10, (len(workload.acked), workload.errors[-10:])
    client = cluster.client()
    path = local / "check.tmp"
    try:
        names = {e["name"] for e in client.list("")}
        for name, digest in workload.acked.items():
            if name in workload.deleted:
                assert name not in names, f"{name}: its delete was acknowledged, yet it is back"
            elif name not in workload.delete_unknown:
                client.download(name, str(path), force=True)
                assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
        for name, digest in workload.unknown.items():
            if name in names:  # an upload cut off midway may have committed: then whole
                client.download(name, str(path), force=True)
                assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
        for w in range(WRITERS):
            if workload.hot_acked[w]:
                client.download(f"hot-{w}", str(path), force=True)
                version = int(path.read_bytes().split(b"\n", 1)[0][1:])
                assert workload.hot_acked[w] <= version <= workload.hot_tried[w], (w, version)
        assert "stale-probe" not in names
        # Every master has every committed entry (the leader sees their match index).
        commit = wait_until(lambda: _caught_up(client), 20, message="every master caught up")
    finally:
        client.close()
        if path.exists():
            path.unlink()
    cluster.stop()
    logs = []
    for index in range(3):
        store = LogStore(os.path.join(cluster.data_dir, f"master{index + 1}", "raft"))
        _, entries = store.open()
        store.close()
        logs.append({e.index: (e.term, e.kind, e.data) for e in entries if e.index <= commit})
    # Entries a checkpoint compacted away are gone from a log (raft-compact); the rest must agree, and
    # every log must hold everything after its first entry up to the commit index.
    common = set(logs[0]) & set(logs[1]) & set(logs[2])
    assert common and max(common) == commit
    assert all(log[i] == logs[0][i] for log in logs for i in common), "the masters' logs differ below the commit"
    assert all(sorted(log) == list(range(min(log), commit + 1)) for log in logs)


def _caught_up(client) -> int | None:
    masters = client.status().masters
    leader = next(m for m in masters if m["role"] == "leader")
    followers = [m for m in masters if m is not leader]
    return leader["commit"] if all(m.get("match", 0) >= leader["commit"] for m in followers) else None


def check_logs(cluster: TestCluster) -> None:
    """At most one leader per term, from every master's log ("leader in term N")."""
    leaders: dict[int, set[str]] = {}
    for index in range(3):
        for term in re.findall(r"raft: \S+: leader in term (\d+)", log_text(cluster, f"master{index + 1}")):
            leaders.setdefault(int(term), set()).add(f"master{index + 1}")
    assert leaders and all(len(who) == 1 for who in leaders.values()), leaders

