"""Checkpoints of the replicated log, snapshot transfer and replacing a master, as real processes.

One group of 3 masters and 2 nodes, small checkpoints ([raft] snapshot_every
= 10, pieces of 1 KiB) and fast elections, through these phases:

1. a follower is SIGKILLed while the log moves on and is compacted past it;
   restarted, it catches up through the checkpoint sent in pieces, then it is
   the only master that can lead (the third one missed the last writes) and
   serves everything acknowledged;
2. every master restarts: checkpoint + remaining log give the same listing;
3. a master's data dir is wiped: it refuses to start (EXIT_LOST_STATE), with
   --join too (its address is still a voter's); a fresh master joins on a new
   port (--join), `masters replace OLD NEW`
   makes it a voter, an original master is killed and the group still
   commits and reads everything back.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import sys

import forkserver
from conftest import FAST_MASTER, FAST_TIMING, ROOT, TestCluster, wait_until

import client as client_module
import cluster as cluster_module
import master as master_module

RAFT_INI = """[raft]
heartbeat_ms = 100
election_ms = 500
snapshot_every = 10
snapshot_trailing = 3
snapshot_piece_kb = 1
"""


def client_for(addresses: str) -> client_module.Client:
    hosts = [(h, int(p)) for h, _, p in (a.rpartition(":") for a in addresses.split(","))]
    return client_module.Client(hosts, timeout_s=10.0, frame_bytes=1 << 20, show_progress=False,
                                failover_timeout_s=10.0)


def leader_of(addresses: str) -> str | None:
    c = client_for(addresses)
    try:
        return next((m["address"] for m in c.status().masters or () if m["role"] == "leader"), None)
    finally:
        c.close()


def wait_nodes(addresses: str) -> None:
    """Both nodes reported to the current leader (they find a new one by themselves)."""
    def alive():
        c = client_for(addresses)
        try:
            return c.status().totals["nodes_alive"] == 2
        finally:
            c.close()
    wait_until(alive, 15, message="both nodes report to the leader")


def log_text(cluster, name: str) -> str:
    with open(os.path.join(cluster.log_dir, f"{name}.log"), encoding="utf-8") as f:
        return f.read()


class Writer:
    """Uploads small files through one in-process client and remembers what was acknowledged."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.acked: dict[str, str] = {}

    def upload(self, addresses: str, first: int, count: int) -> None:
        c = client_for(addresses)
        try:
            for n in range(first, first + count):
                data = (f"file {n} " * 20).encode()
                path = self.tmp_path / "up"
                path.write_bytes(data)
                c.upload_file(str(path), f"d/f{n:03d}")
                self.acked[f"d/f{n:03d}"] = hashlib.sha256(data).hexdigest()
        finally:
            c.close()

    def check(self, addresses: str, read: bool = True) -> None:
        """The listing is exactly what was acknowledged (names and SHA-256), and (``read``) every file reads back."""
        c = client_for(addresses)
        try:
            assert {e["name"]: e["sha256"] for e in c.list("d/")} == self.acked
            if not read:
                return
            path = self.tmp_path / "down"
            for name, digest in self.acked.items():
                c.download(name, str(path), force=True)
                assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
            path.unlink()
        finally:
            c.close()


def test_checkpoint_snapshot_transfer_restart_and_replace(tmp_path):
    config = tmp_path / "raft.ini"
    config.write_text(RAFT_INI)
    cluster = TestCluster(str(tmp_path / "c"), nodes=2, masters=3, master_args=FAST_MASTER,
                          node_args=FAST_TIMING, config_path=str(config))
    extra: list[cluster_module.Server] = []
    writer = Writer(tmp_path)
    try:
        cluster.start()
        group = cluster.master_address
        ids = group.split(",")
        leader = wait_until(lambda: leader_of(group), 15, message="a leader")
        lead = ids.index(leader)
        lagging, other = [i for i in range(3) if i != lead]
        wait_nodes(group)

        # 1. Compaction past a dead follower, then snapshot transfer.
        writer.upload(group, 0, 3)
        cluster.masters[lagging].kill()
        writer.upload(group, 3, 25)
        leader_raft = os.path.join(cluster.data_dir, f"master{lead + 1}", "raft")
        segments = sorted(glob.glob(os.path.join(leader_raft, "raftlog-*.log")))
        assert int(re.search(r"(\d+)\.log$", segments[0]).group(1)) > 10, segments  # the log was compacted
        assert os.path.exists(os.path.join(leader_raft, "checkpoint.json"))
        assert re.search(r"snapshot taken at index \d+", log_text(cluster, f"master{lead + 1}"))
        cluster.start_group_master(lagging)
        wait_until(lambda: re.search(r"installed snapshot \d+", log_text(cluster, f"master{lagging + 1}")), 15,
                   message="the restarted follower installed the checkpoint")
        sent = re.search(r"sending snapshot \d+ \((\d+) bytes, pieces of (\d+)\)", log_text(cluster, f"master{lead + 1}"))
        assert sent and int(sent.group(2)) == 1024 and int(sent.group(1)) > 1024, sent  # several pieces
        # The third master misses the next writes: the caught-up follower then is the only one
        # that can lead once the old leader dies.
        cluster.masters[other].kill()
        writer.upload(group, 28, 3)
        cluster.masters[lead].kill()
        cluster.start_group_master(other)
        wait_until(lambda: leader_of(group) == ids[lagging], 20, message="the caught-up follower leads")
        wait_nodes(group)
        writer.check(group)

        # 2. Every master restarts: checkpoint + the log after it.
        cluster.start_group_master(lead)
        for i in range(3):
            cluster.restart_group_master(i)
        wait_until(lambda: leader_of(group), 20, message="a leader after a full restart")
        writer.check(group, read=False)

        # 3. A wiped master refuses to start; a new one joins and replaces it.
        wiped = next(i for i in range(3) if ids[i] != leader_of(group))
        cluster.masters[wiped].kill()
        shutil.rmtree(os.path.join(cluster.data_dir, f"master{wiped + 1}"))
        argv = [sys.executable, os.path.join(ROOT, "master.py"), "--config", str(config), "--host", "127.0.0.1",
                "--port", ids[wiped].rpartition(":")[2], "--masters", group,
                "--data-dir", os.path.join(cluster.data_dir, f"master{wiped + 1}"), *FAST_MASTER]
        refused = forkserver.run(argv, capture_output=True, timeout=30)
        assert refused.returncode == master_module.EXIT_LOST_STATE, refused.stderr
        assert b"refusing to start" in refused.stderr and b"--join" in refused.stderr
        refused = forkserver.run(argv + ["--join"], capture_output=True, timeout=30)  # still a voter there
        assert refused.returncode == master_module.EXIT_LOST_STATE and b"still a voter" in refused.stderr, refused
        new_port = cluster_module.free_ports("127.0.0.1", 1)[0]
        new_id = f"127.0.0.1:{new_port}"
        argv[argv.index("--port") + 1] = str(new_port)
        argv[argv.index("--data-dir") + 1] = os.path.join(cluster.data_dir, "master4")
        server = cluster_module.Server("master4", argv + ["--join"], os.path.join(cluster.log_dir, "master4.log"),
                                       cluster.spawn)
        extra.append(server)
        server.start()
        result = cluster.cli("masters", "replace", ids[wiped], new_id)
        assert result.returncode == 0, result.stderr
        assert f"voters: {', '.join(sorted(set(ids) - {ids[wiped]} | {new_id}))}".encode() in result.stdout
        text = log_text(cluster, "master4")
        assert re.search(r"installed snapshot \d+", text), text[-2000:]  # caught up from the checkpoint
        survivors = [a for a in ids if a != ids[wiped]] + [new_id]
        # Kill one of the original masters: the new one counts in the majority now.
        gone = next(i for i in range(3) if i != wiped)
        cluster.masters[gone].kill()
        live = ",".join(a for a in survivors if a != ids[gone])
        wait_until(lambda: leader_of(live), 20, message="a leader among the survivors")
        wait_nodes(live)
        writer.upload(live, 31, 2)
        writer.check(live)
    finally:
        for server in extra:
            server.kill()
        cluster.stop()
