"""Three masters and three nodes, as real processes, under a nemesis (issue 12, "real processes").

While two writers upload (unique names and one name each that they
overwrite with numbered versions), append (to one name each) and delete,
and a reader reads the overwritten and appended names, the nemesis
isolates the leader (every link of it cut through the per-link proxies of
tests/nemesis.py), pauses the isolated leader (SIGSTOP) in the middle of an
upload and wakes it while still cut off, cuts one direction of a link,
SIGKILLs the leader and restarts it, and SIGKILLs a storage node and
restarts it.  After each fault heals the cluster must make progress (a new
write is acknowledged).  Afterwards:

* every acknowledged upload reads back byte-identical (SHA-256), every
  acknowledged delete stays deleted, an upload whose outcome was unknown is
  either absent or whole;
* an appended name holds every acknowledged append, whole and in order,
  and nothing else but appends whose outcome was unknown (each whole);
* no read of an overwritten name returned a version older than the last one
  acknowledged before the read began, and no read of an appended name
  lacked an append acknowledged before the read began;
* never two leaders at once: at most one master led each term (their logs),
  and the paused leader, woken while cut off, still believed it led and
  tried to write to a node: the node refused it (STALE_MASTER, logged), and
  the upload it was serving was not acknowledged;
* the masters' Raft logs agree up to the commit index.

Default: that fixed schedule once (about 10-15 s of faults).  ``NEMESIS_SECONDS=60
python -m pytest tests/test_nemesis.py`` then goes on with random faults
(isolate, partition, one-way cuts either way, pause, kill of a master or of a node) until that many
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
        # app-W: the pieces appended to it in order (each one line "aW-K ...\n", K from 1) and the
        # K of those acknowledged; one not acknowledged (outcome unknown) may or may not be there.
        self.app_tried: list[list[bytes]] = [[] for _ in range(WRITERS)]
        self.app_acked: list[set[int]] = [set() for _ in range(WRITERS)]
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

    def _upload(self, client, name: str, data: bytes, mode: str = "replace") -> None:
        path = self.tmp / f"w-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
        path.write_bytes(data)
        try:
            client.upload_file(str(path), name, mode=mode)
        finally:
            path.unlink()

    def _append(self, client, w: int, rng: random.Random) -> None:
        """One append to app-W (never re-sent by the client: its outcome is unknown when cut off)."""
        k = len(self.app_tried[w]) + 1
        piece = f"a{w}-{k} {rng.randbytes(rng.randrange(1, 3000)).hex()}\n".encode()
        self.app_tried[w].append(piece)
        self._upload(client, f"app-{w}", piece, mode="append")
        with self.lock:
            self.app_acked[w].add(k)
            self.acks += 1

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
                    elif roll < 0.45:
                        self._append(client, w, rng)
                    elif roll < 0.55 and self._deletable(w):
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

    def _read_appended(self, client, w: int, path) -> None:
        with self.lock:
            floor = set(self.app_acked[w])  # acknowledged before this read began
        try:
            client.download(f"app-{w}", str(path), force=True)
            content = path.read_bytes()
        except protocol.FileNotFound:
            content = b""
        except protocol.BackupError:
            return
        problem = appended_problem(content, self.app_tried[w], floor)
        if problem:
            self.stale_reads.append(f"app-{w}: {problem}")

    def _reader(self) -> None:
        client = self.cluster.client()
        path = self.tmp / "reader.tmp"
        rng = random.Random(self.rng.randrange(1 << 30))
        try:
            while not self.stop.is_set():
                w = rng.randrange(WRITERS)
                if rng.random() < 0.3:
                    self._read_appended(client, w, path)
                    time.sleep(0.02)
                    continue
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


def appended_problem(content: bytes, tried: list[bytes], required: set[int]) -> str | None:
    """What is wrong with ``content`` of an appended name, or None: it must be whole pieces of
    ``tried`` in order (K rising), each at most once, holding every K in ``required``."""
    seen, last = set(), 0
    for line in content.splitlines(keepends=True):
        k = int(line.split(b" ", 1)[0].split(b"-")[1]) if re.match(rb"a\d+-\d+ ", line) else 0
        if not 0 < k <= len(tried) or tried[k - 1] != line:
            return f"a line that no append sent whole: {line[:40]!r}"
        if k <= last:
            return f"append {k} after append {last}"
        seen.add(k)
        last = k
    missing = sorted(required - seen)
    return f"acknowledged appends {missing[:10]} missing" if missing else None


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

        # 5. SIGKILL of a storage node under the writes and reads, then it restarts (same data).
        victim = random.Random(SEED).randrange(cluster.node_count)
        history.append(f"kill node{victim + 1}")
        cluster.nodes[victim].kill()
        workload.progress(workload.acks, what="with a node killed")
        cluster.add_node(victim)
        cluster.wait_nodes_alive(3, timeout_s=30)
        workload.progress(workload.acks, what="after the node restarted")

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
            elif kind == "kill-node":
                cluster.nodes[b].kill()
            else:
                cluster.masters[a].kill()
            time.sleep(rng.uniform(0.5, 3.0))
            if kind == "pause":
                cluster.masters[a].signal(signal.SIGCONT)
            elif kind == "kill":
                cluster.start_group_master(a)
            elif kind == "kill-node":
                cluster.add_node(b)
            nemesis.heal()
            workload.progress(workload.acks, what=f"after {history[-1]}")
        workload.finish()
        check_outcome(cluster, workload, local)
        check_logs(cluster)
        print(f"nemesis seed {SEED}: {len(workload.acked)} uploads, {len(workload.deleted)} deletes and "
              f"{sum(map(len, workload.app_acked))} appends acknowledged, hot versions {workload.hot_acked}, {len(workload.errors)} failed operations; "
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
        assert sum(map(len, workload.app_acked)) >= 2, workload.errors[-10:]
        for w in range(WRITERS):
            if workload.app_acked[w]:
                client.download(f"app-{w}", str(path), force=True)
                problem = appended_problem(path.read_bytes(), workload.app_tried[w], workload.app_acked[w])
                assert problem is None, f"app-{w}: {problem}"
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



def test_appended_problem_finds_lost_torn_and_reordered_appends():
    """The append check has teeth: each way an appended name can be wrong is named."""
    tried = [b"a0-1 aa\n", b"a0-2 bb\n", b"a0-3 cc\n"]
    assert appended_problem(b"a0-1 aa\na0-3 cc\n", tried, {1, 3}) is None  # 2's outcome was unknown
    assert appended_problem(b"a0-1 aa\na0-2 bb\na0-3 cc\n", tried, {1, 3}) is None
    assert "[2] missing" in appended_problem(b"a0-1 aa\na0-3 cc\n", tried, {1, 2, 3})
    assert "sent whole" in appended_problem(b"a0-1 aa\na0-2 b", tried, {1})
    assert "sent whole" in appended_problem(b"a0-1 aa\nzz\n", tried, {1})
    assert "after append" in appended_problem(b"a0-2 bb\na0-1 aa\n", tried, set())
    assert "after append" in appended_problem(b"a0-1 aa\na0-1 aa\n", tried, set())
