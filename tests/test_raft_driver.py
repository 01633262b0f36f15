"""meta/driver.py: three RaftDrivers in one process over a fake network, real log stores on disk.

Fast ticks (10 ms, election 200-400 ms) keep each test to about a second.
"""

from __future__ import annotations

import threading

import pytest

from conftest import wait_until

from meta.driver import LeadershipLost, RaftDriver
from meta.messages import from_wire, to_wire
from meta.raft import NotLeader, RaftConfig

IDS = ("m1", "m2", "m3")
FAST = RaftConfig(election_ticks=20, heartbeat_ticks=3)
TICK_S = 0.01


class Group:
    """Drivers wired by a network that goes through the wire form and can cut members off."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
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

    def start(self, node_id):
        state = self.states[node_id] = []
        driver = RaftDriver(node_id, IDS, str(self.tmp_path / node_id), send=self.send, apply=lambda index, record: state.append(record),
                            tick_s=TICK_S, config=FAST)
        with self.lock:
            self.drivers[node_id] = driver
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
    monkeypatch.setattr(leader.store, "append", lambda entries: (appends.append(len(entries)), original(entries)))
    threads = [threading.Thread(target=leader.propose, args=([{"n": n}], 10)) for n in range(40)]
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
