"""prune: forgetting snapshots by a retention policy (issue 13 item 5).

The rules themselves are tested in test_retention.py.  Here: the command
against a fake client (what it prints, what it asks the master to forget,
a race with another prune), then real processes: space coming back on the
nodes, and a master killed in the middle of a prune.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import cli
import protocol

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
