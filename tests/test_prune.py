"""prune: forgetting snapshots by a retention policy (issue 13 item 5).

The rules themselves are tested in test_retention.py.  Here: the command
against a fake client (what it prints, what it asks the master to forget,
a race with another prune), then real processes: space coming back on the
nodes, and a master killed in the middle of a prune.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from conftest import (FAST_MASTER, FAST_TIMING, call, node_chunks, node_total, random_bytes, running_cluster,
                      wait_until)

import cli
import protocol

CHUNK = 1024
BIG = 512 * CHUNK  # a file whose old versions fill most of a node's (first) segment

HOUR = 3600.0
T0 = 1_700_000_000.0  # a Tuesday, 22:13 UTC; the tests below use whole days apart


def snapshot(snapshot_id: int, root: str, t: float) -> dict:
    return {"id": snapshot_id, "time": t, "root": root, "files": 3, "bytes": 3000, "pins": 0}


class FakeClient:
    """The two calls prune makes, over a list of snapshots; ``race`` ids vanish before the first forget."""

    def __init__(self, listing: list[dict], race=()):
        self.listing = list(listing)
        self.race = set(race)
        self.forgotten: list[list[int]] = []

    def snapshots(self, root=None):
        return [s for s in self.listing if root is None or s["root"] == root]

    def forget_snapshots(self, ids):
        if self.race:
            self.listing = [s for s in self.listing if s["id"] not in self.race]
            self.race = set()
        if any(i not in {s["id"] for s in self.listing} for i in ids):
            raise protocol.FileNotFound("no snapshot")
        self.forgotten.append(list(ids))
        self.listing = [s for s in self.listing if s["id"] not in ids]
        return SimpleNamespace(ids=sorted(ids), freed_bytes=1000 * len(ids))


def run(client, *argv) -> int:
    return cli.cmd_prune(client, cli.parse_args(["prune", *argv]))


LISTING = [snapshot(n, "photos", T0 + n * 24 * HOUR) for n in range(1, 6)] + \
          [snapshot(10 + n, "docs", T0 + n * 24 * HOUR) for n in range(1, 3)]


def test_prune_keeps_by_policy_per_tree_and_forgets_the_rest(capsys):
    """Each tree is its own group: --keep-last 2 forgets photos' three oldest and none of docs' two."""
    client = FakeClient(LISTING)
    assert run(client, "--keep-last", "2") == cli.EXIT_OK
    assert client.forgotten == [[3, 2, 1]]
    out = capsys.readouterr().out
    assert "snapshots of photos: keep 2 last snapshots" in out and "snapshots of docs" in out
    assert "forgot 3 snapshots of photos" in out and "forgot" not in out.split("snapshots of photos")[0]
    kept_rows = [line for line in out.splitlines() if line.rstrip().endswith("last snapshot")]
    assert [int(line.split()[0]) for line in kept_rows] == [12, 11, 5, 4]


def test_prune_names_a_tree_dry_run_and_json(capsys):
    """NAME limits prune to one tree; --dry-run forgets nothing; --json gives keep/remove with reasons."""
    client = FakeClient(LISTING)
    assert run(client, "photos/", "--keep-daily", "1", "--keep-within", "2d", "--dry-run", "--json") == 0
    assert client.forgotten == []
    document = json.loads(capsys.readouterr().out)
    assert document["dry_run"] is True and document["policy"]["daily"] == 1 and document["policy"]["within"] == "2d"
    (group,) = document["groups"]
    assert group["root"] == "photos" and group["forgotten"] == [] and group["freed_bytes"] is None
    assert [(s["id"], s["reasons"]) for s in group["keep"]] == [(5, ["within 2d", "daily snapshot"]),
                                                                 (4, ["within 2d"])]
    assert [s["id"] for s in group["remove"]] == [3, 2, 1] and group["remove"][0]["time_iso"]


def test_prune_refuses_an_empty_policy_and_an_unknown_tree():
    """No --keep-* rule is a usage error; a NAME without snapshots is FILE_NOT_FOUND; nothing is forgotten."""
    client = FakeClient(LISTING)
    with pytest.raises(cli.UsageError, match="needs a policy"):
        run(client)
    with pytest.raises(cli.UsageError):
        run(client, "--keep-last", "0")
    with pytest.raises(protocol.FileNotFound, match="no snapshot of 'music'"):
        run(client, "music", "--keep-last", "1")
    assert client.forgotten == []
    for bad in (["--keep-daily", "x"], ["--keep-within", "1w"], ["--keep-last", "-2"]):
        with pytest.raises(SystemExit) as exited:
            cli.parse_args(["prune", *bad])
        assert exited.value.code == cli.EXIT_USAGE


def test_prune_plans_a_tree_again_when_another_prune_forgot_some_first(capsys):
    """The master refuses a forget naming a snapshot already gone; prune re-plans on what is left."""
    client = FakeClient(LISTING, race={1})
    assert run(client, "photos", "--keep-last", "2") == 0
    assert client.forgotten == [[3, 2]]
    assert "forgot 2 snapshots of photos" in capsys.readouterr().out


def test_prune_says_what_it_forgot_before_a_later_tree_fails(capsys):
    """Trees are forgotten one at a time; when the master goes away midway, the trees done are already printed."""
    client = FakeClient(LISTING)
    real_forget = client.forget_snapshots

    def forget_once(ids):
        if client.forgotten:
            raise protocol.Unavailable("master unreachable")
        return real_forget(ids)

    client.forget_snapshots = forget_once
    with pytest.raises(protocol.Unavailable):
        run(client, "--keep-last", "1")
    assert client.forgotten == [[11]]
    assert "forgot 1 snapshot of docs" in capsys.readouterr().out


# --- processes ----------------------------------------------------------------------------------
def make_tree(root, files: dict) -> None:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def snapshot_ids(cluster, root: str) -> list[int]:
    return [s["id"] for s in call(cluster, lambda c: c.snapshots(root))]


def node_used(cluster) -> int:
    """Bytes of segment files on all nodes right now, dead records included until compacted."""
    return node_total(cluster, "used_bytes")


def prune_in_process(cluster, capsys, *argv) -> str:
    """``prune ARGV`` through cmd_prune with an in-process client (quicker than a process); its stdout."""
    assert call(cluster, lambda c: cli.cmd_prune(c, cli.parse_args(["prune", *argv]))) == cli.EXIT_OK
    return capsys.readouterr().out


def test_prune_frees_what_only_forgotten_snapshots_kept_even_across_a_master_crash(tmp_path, capsys):
    """Snapshots pin old versions past keep_versions 1; prune forgets them and the nodes drop those chunks,
    also when the master is killed after the forget and before the nodes heard of it; prune is idempotent."""
    seed = 1313
    tree = tmp_path / "tree"
    make_tree(tree, {f"f{n:02}": random_bytes(seed + n, 4 * CHUNK) for n in range(40)})
    with running_cluster(tmp_path / "cluster", nodes=2, master_args=[*FAST_MASTER, "--keep-versions", "1"],
                         node_args=[*FAST_TIMING, "--scrub-rate", "0", "--orphan-grace", "1"]) as cluster:
        def backup(round_no: int) -> None:
            (tree / "a").write_bytes(random_bytes(seed + 100 + round_no, 3 * CHUNK))
            call(cluster, lambda c: c.backup_tree(str(tree), "photos"))

        for round_no in range(3):
            backup(round_no)
        photos = snapshot_ids(cluster, "photos")
        assert len(photos) == 3
        # Each old snapshot pins its version of a (3 chunks) and has a manifest (1 chunk): 8 chunks x 2 copies.
        freed_chunks = 2 * (3 + 1) * 2

        (group,) = json.loads(prune_in_process(cluster, capsys, "--keep-last", "1", "--dry-run", "--json"))["groups"]
        assert [s["id"] for s in group["remove"]] == photos[1::-1] and group["forgotten"] == []
        assert snapshot_ids(cluster, "photos") == photos, "a dry run forgot snapshots"

        # The nodes are away when the forget commits, and the master dies before they return.
        before = node_chunks(cluster)
        for node in cluster.nodes:
            node.kill()
        pruned = cluster.cli("prune", "photos", "--keep-last", "1", "--json")
        assert pruned.returncode == 0, pruned
        (group,) = json.loads(pruned.stdout)["groups"]
        assert [(s["id"], s["reasons"]) for s in group["keep"]] == [(photos[2], ["last snapshot"])]
        assert group["forgotten"] == sorted(photos[:2]) and group["freed_bytes"] > 2 * 3 * CHUNK, group
        cluster.restart_master()
        for index in range(len(cluster.nodes)):
            cluster.restart_node(index)
        cluster.wait_nodes_alive(2)
        assert snapshot_ids(cluster, "photos") == photos[2:]
        # What the dead master never got to drop is unknown to the new one: quarantined, then erased.
        wait_until(lambda: node_chunks(cluster) == before - freed_chunks, 20.0,
                   message=f"{before - freed_chunks} chunks on the nodes (got {node_chunks(cluster)})")
        restored = tmp_path / "restored"
        assert cluster.cli("download", "photos/", str(restored), "--snapshot", str(photos[2])).returncode == 0
        assert {p.name: p.read_bytes() for p in restored.iterdir()} == {p.name: p.read_bytes() for p in tree.iterdir()}
        assert prune_in_process(cluster, capsys, "--keep-last", "1", "--quiet") == ""  # nothing left to forget

        # Without a crash, a tree whose old snapshots hold most of the nodes' data: the chunks go at
        # once, and the disk space too (the segment is more than compact_dead_fraction dead).
        big = tmp_path / "big"
        big.mkdir()
        for round_no in range(3):
            (big / "disk.img").write_bytes(random_bytes(seed + 200 + round_no, BIG))
            call(cluster, lambda c: c.backup_tree(str(big), "big"))
        before, used = node_chunks(cluster), node_used(cluster)
        big_chunks = 2 * (BIG // CHUNK + 1) * 2  # two pinned versions and two manifests, two copies each
        started = time.monotonic()
        assert "forgot 2 snapshots of big" in prune_in_process(cluster, capsys, "big", "--keep-last", "1")
        wait_until(lambda: node_chunks(cluster) == before - big_chunks, 10.0,
                   message=f"{before - big_chunks} chunks on the nodes (got {node_chunks(cluster)})")
        dropped = time.monotonic() - started
        wait_until(lambda: node_used(cluster) <= used - 2 * BIG * 2, 10.0,
                   message=f"the nodes' disk usage down from {used} by {4 * BIG} (now {node_used(cluster)})")
        print(f"\n2 forgotten snapshots: chunks dropped {dropped:.2f} s and disk usage down "
              f"{time.monotonic() - started:.2f} s after prune ({used} -> {node_used(cluster)} bytes on the nodes)")
        assert snapshot_ids(cluster, "photos") == photos[2:], "pruning one tree touched another"
