"""meta/driver.py: three RaftDrivers in one process over a fake network, real log stores on disk.

Fast ticks (10 ms, election 200-400 ms) keep each test to about a second.
"""

from __future__ import annotations

import os
import threading

import pytest

from conftest import wait_until

from meta.driver import LeadershipLost, RaftDriver
from meta.messages import from_wire, to_wire
from meta.raft import MembershipChangeRefused, NotLeader, RaftConfig

IDS = ("m1", "m2", "m3")
FAST = RaftConfig(election_ticks=20, heartbeat_ticks=3)
TICK_S = 0.01


class Group:
    """Drivers wired by a network that goes through the wire form and can cut members off."""

    def __init__(self, tmp_path, config=FAST, snapshot_every=0):
        self.tmp_path = tmp_path
        self.config, self.snapshot_every = config, snapshot_every
        self.drivers: dict[str, RaftDriver] = {}
        self.states: dict[str, list] = {}
        self.cut: set[str] = set()
        self.lock = threading.Lock()

    def send(self, msg):
        with self.lock:
            if msg.src in self.cut or msg.dst in self.cut:
                return
            target = self.drivers.get(msg.dst)
        if target is not None:
            target.step(from_wire(*to_wire(msg)))

    def start(self, node_id, join=False):
        state = self.states[node_id] = []
        driver = RaftDriver(node_id, IDS, str(self.tmp_path / node_id), send=self.send,
                            apply=lambda index, record: state.append(record),
                            take_state=lambda: list(state), restore=lambda saved: state.__setitem__(slice(None), saved),
                            snapshot_every=self.snapshot_every, join=join, tick_s=TICK_S, config=self.config)
        with self.lock:
            self.drivers[node_id] = driver
        driver.bootstrap()
        driver.start()
        return driver

    def stop(self, node_id):
        with self.lock:
            driver = self.drivers.pop(node_id)
        driver.stop()

    def leader(self):
        leaders = [d for d in list(self.drivers.values()) if d.is_leader and d.id not in self.cut]
        return leaders[0] if len(leaders) == 1 else None

    def close(self):
        for node_id in list(self.drivers):
            self.stop(node_id)


@pytest.fixture
def group(tmp_path):
    g = Group(tmp_path)
    for node_id in IDS:
        g.start(node_id)
    yield g
    g.close()


def test_commit_on_majority_and_apply_everywhere(group):
    leader = wait_until(group.leader, 10, message="a leader")
    last = leader.propose([{"op": "a"}, {"op": "b"}], timeout_s=5)
    assert group.states[leader.id] == [{"op": "a"}, {"op": "b"}]
    follower = next(d for d in group.drivers.values() if d is not leader)
    with pytest.raises(NotLeader) as info:
        follower.propose([{"op": "c"}], timeout_s=5)
    assert info.value.leader_id == leader.id
    with pytest.raises(NotLeader):
        follower.read_barrier(timeout_s=5)
    assert leader.read_barrier(timeout_s=5) >= last
    wait_until(lambda: all(s == [{"op": "a"}, {"op": "b"}] for s in group.states.values()), 5,
               message="every member applied both records")
    status = leader.status()
    assert status["role"] == "leader" and status["commit"] >= last and status["applied"] >= last


def test_many_proposals_share_appends(group, monkeypatch):
    leader = wait_until(group.leader, 10, message="a leader")
    appends = []
    original = leader.store.append
    proposing = []  # one item per thread that has called propose
    everyone_proposing = threading.Event()

    def append(entries):
        # The first write waits until every thread is proposing, so the test does not depend on
        # the threads being scheduled close together (under load they ran one by one).
        everyone_proposing.wait(10)
        appends.append(len(entries))
        return original(entries)

    def propose(n):
        proposing.append(n)
        if len(proposing) == 40:
            everyone_proposing.set()
        leader.propose([{"n": n}], 10)

    monkeypatch.setattr(leader.store, "append", append)
    threads = [threading.Thread(target=propose, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["n"] for r in group.states[leader.id]) == list(range(40))
    assert sum(appends) == 40 and len(appends) < 40, appends  # group commit: fewer fsyncs than records


def test_leader_crash_new_leader_keeps_acknowledged_records(group):
    old = wait_until(group.leader, 10, message="a leader")
    old.propose([{"op": "before"}], timeout_s=5)
    group.stop(old.id)
    new = wait_until(lambda: (lambda d: d if d is not None and d.id != old.id else None)(group.leader()), 10,
                     message="a new leader")
    new.propose([{"op": "after"}], timeout_s=5)
    assert group.states[new.id] == [{"op": "before"}, {"op": "after"}]
    # The old leader restarts from its disk, replays and catches up.
    group.start(old.id)
    wait_until(lambda: group.states[old.id] == [{"op": "before"}, {"op": "after"}], 10,
               message="the restarted member caught up")


def test_minority_leader_cannot_commit(group):
    """A leader cut off from the others steps down (check-quorum); the majority goes on without it."""
    leader = wait_until(group.leader, 10, message="a leader")
    group.cut.add(leader.id)
    with pytest.raises(LeadershipLost):
        leader.propose([{"op": "lost"}], timeout_s=5)
    new = wait_until(group.leader, 10, message="a leader on the majority side")
    new.propose([{"op": "kept"}], timeout_s=5)
    group.cut.clear()
    wait_until(lambda: all(s == [{"op": "kept"}] for s in group.states.values()), 10,
               message="the old leader's unacknowledged record replaced by the majority's")


SMALL = RaftConfig(election_ticks=20, heartbeat_ticks=3, snapshot_piece_bytes=64, trailing_entries=2)


def test_checkpoint_compacts_log_and_lagging_member_gets_it_in_pieces(tmp_path, caplog):
    """Checkpoints every 5 entries compact the log; a member that was down while the log moved
    past it receives the checkpoint in 64-byte pieces, installs it, continues from the log, and a
    restart of every member rebuilds the same state from checkpoint + log."""
    caplog.set_level("INFO", logger="raft")
    g = Group(tmp_path, SMALL, snapshot_every=5)
    try:
        for node_id in IDS:
            g.start(node_id)
        leader = wait_until(g.leader, 10, message="a leader")
        lagging = next(i for i in IDS if i != leader.id)
        g.stop(lagging)
        expected = []
        for n in range(30):
            leader.propose([{"n": n, "pad": "x" * 20}], timeout_s=5)
            expected.append({"n": n, "pad": "x" * 20})
        wait_until(lambda: leader.store.first_index > 10, 5, message="the leader compacted its log")
        assert os.path.exists(tmp_path / leader.id / "checkpoint.json")
        g.start(lagging)
        wait_until(lambda: g.states[lagging] == expected, 10, message="the lagging member caught up")
        assert g.drivers[lagging].core.snapshot.index > 0  # through a snapshot, not the log
        pieces = [r.getMessage() for r in caplog.records if "sending snapshot" in r.getMessage()]
        assert pieces and "pieces of 64" in pieces[0], pieces
        assert any(r.getMessage().startswith(f"{lagging}: installed snapshot") for r in caplog.records)
        leader.propose([{"n": "after"}], timeout_s=5)
        expected.append({"n": "after"})
        wait_until(lambda: g.states[lagging] == expected, 5, message="the log continues after the snapshot")
        g.close()
        for node_id in IDS:  # all restart: checkpoint + remaining log give the same state
            g.start(node_id)
            assert g.drivers[node_id].store.first_index > 1 or node_id == lagging
        leader = wait_until(g.leader, 10, message="a leader after the restart")
        leader.propose([{"n": "last"}], timeout_s=5)
        expected.append({"n": "last"})
        wait_until(lambda: all(s == expected for s in g.states.values()), 10, message="every member has it all")
    finally:
        g.close()


def test_join_as_learner_then_replace_a_member(tmp_path):
    """A member started to join has no membership: it never campaigns; added as a learner it
    receives the checkpoint and the log, is promoted once caught up, and the old member goes."""
    g = Group(tmp_path, SMALL, snapshot_every=5)
    try:
        for node_id in IDS:
            g.start(node_id)
        leader = wait_until(g.leader, 10, message="a leader")
        for n in range(12):
            leader.propose([{"n": n}], timeout_s=5)
        new = g.start("m4", join=True)
        assert new.core.membership.voters == frozenset()
        with pytest.raises(MembershipChangeRefused):
            leader.change_membership("promote", "m4", timeout_s=5)  # not even a learner
        index = leader.change_membership("add_learner", "m4", timeout_s=5)
        wait_until(lambda: g.states["m4"] == g.states[leader.id] and leader.status()["commit"] >= index, 10,
                   message="the learner caught up")
        assert new.core.snapshot.index > 0
        leader.change_membership("promote", "m4", timeout_s=5)
        wait_until(lambda: leader.status()["commit"] >= leader.core.last_index, 5, message="promotion committed")
        old = next(i for i in IDS if i != leader.id)
        leader.change_membership("remove", old, timeout_s=5)
        wait_until(lambda: leader.membership(timeout_s=5).voters == frozenset(set(IDS) - {old} | {"m4"}), 5,
                   message="the old member removed")
        g.stop(old)
        leader.propose([{"n": "with m4"}], timeout_s=5)  # m4 now counts in the majority
        wait_until(lambda: g.states["m4"][-1:] == [{"n": "with m4"}], 5, message="m4 applied it")
    finally:
        g.close()
