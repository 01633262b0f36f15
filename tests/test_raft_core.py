"""Focused tests of meta.raft: one behaviour each, on a hand-driven in-process network."""

import ast
import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meta import messages  # noqa: E402
from meta.log_store import LogStore  # noqa: E402
from meta.messages import (  # noqa: E402
    CANDIDATE, DATA, FOLLOWER, LEADER, NOOP, PRE_CANDIDATE, AppendEntries, AppendResponse,
    BadRaftMessage, Entry, HardState, InstallSnapshot, InstallSnapshotResponse, Membership,
    PreVote, PreVoteResponse, RequestVote, RequestVoteResponse, SnapshotMeta, from_wire, to_wire)
from meta.raft import MembershipChangeRefused, NotLeader, RaftConfig, RaftCore  # noqa: E402
from raft_sim import MemoryStore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = RaftConfig(election_ticks=10, heartbeat_ticks=2, max_entries_per_append=4,
                 snapshot_piece_bytes=50, trailing_entries=0)


class Node:
    """A core plus what its driver keeps: a memory 'disk', applied records, read results."""

    def __init__(self, node_id, snap, cfg, seed):
        self.id = node_id
        self.hard = HardState()
        self.store = MemoryStore()
        self.snap, self.snap_data, self.incoming = snap, b"[]", bytearray()
        self.cfg, self.seed = cfg, seed
        self.up = True
        self.restart()

    def restart(self):
        self.core = RaftCore(self.id, rng=random.Random(self.seed), config=self.cfg, hard_state=self.hard,
                             snapshot=self.snap, entries=list(self.store.entries))
        self.applied = json.loads(self.snap_data)
        self.applied_index = self.snap.index
        self.reads, self.failed_reads, self.readies = [], [], []


class Net:
    """Instant, ordered delivery; ``blocked`` holds cut directed links; ``log`` every message sent."""

    def __init__(self, ids, voters=None, cfg=CFG):
        voters = ids if voters is None else voters
        self.nodes = {}
        for n, node_id in enumerate(ids):
            snap = SnapshotMeta.initial(voters) if node_id in voters else SnapshotMeta()
            self.nodes[node_id] = Node(node_id, snap, cfg, seed=n)
        self.queue, self.sent, self.blocked = [], [], set()
        for node in self.nodes.values():
            self.handle(node)

    def handle(self, node):
        core = node.core
        while core.has_ready():
            rd = core.ready()
            node.readies.append(rd)
            if rd.hard_state:
                node.hard = rd.hard_state
            for piece in rd.snapshot_pieces:
                if piece.offset == 0:
                    node.incoming = bytearray()
                node.incoming += piece.data
            if rd.snapshot:
                node.snap, node.snap_data = rd.snapshot, bytes(node.incoming)
            if rd.truncate_from is not None:
                node.store.truncate_from(rd.truncate_from)
            if rd.compact_to is not None:
                node.store.compact(rd.compact_to)
            if rd.entries:
                node.store.append(rd.entries)
            for msg in rd.messages:
                if isinstance(msg, InstallSnapshot):
                    msg = msg.with_data(node.snap_data[msg.offset:msg.offset + msg.length])
                self.queue.append(msg)
                self.sent.append(msg)
            if rd.snapshot:
                node.applied, node.applied_index = json.loads(node.snap_data), rd.snapshot.index
            for e in rd.committed:
                assert e.index == node.applied_index + 1
                node.applied_index = e.index
                if e.kind == DATA:
                    node.applied.append(e.data)
            node.reads += rd.read_states
            node.failed_reads += rd.failed_reads
            core.advance(rd)

    def deliver(self, limit=10000):
        while self.queue and limit:
            limit -= 1
            msg = self.queue.pop(0)
            node = self.nodes[msg.dst]
            if node.up and (msg.src, msg.dst) not in self.blocked:
                node.core.step(msg)
                self.handle(node)

    def tick(self, n=1, only=None):
        for _ in range(n):
            for node in self.nodes.values():
                if node.up and (only is None or node.id in only):
                    node.core.tick()
                    self.handle(node)
            self.deliver()

    def elect(self, node_id):
        """Tick only ``node_id`` until it leads (the others hear nothing, so they stay put)."""
        for _ in range(3 * CFG.election_ticks):
            self.tick(only={node_id})
            if self.nodes[node_id].core.role == LEADER:
                self.tick(2)  # the no-op commits, everyone learns the leader
                return self.nodes[node_id]
        raise AssertionError(f"{node_id} was not elected")

    def isolate(self, node_id):
        others = set(self.nodes) - {node_id}
        self.blocked |= {(node_id, o) for o in others} | {(o, node_id) for o in others}

    def propose(self, node_id, records):
        node = self.nodes[node_id]
        result = node.core.propose(records)
        self.handle(node)
        self.deliver()
        return result

    def snapshot(self, node_id):
        node = self.nodes[node_id]
        core, index = node.core, node.applied_index
        node.snap_data = json.dumps(node.applied).encode()
        node.snap = SnapshotMeta(index, core.term_at(index), core.membership_at(index), len(node.snap_data))
        core.compact(index, len(node.snap_data))
        self.handle(node)


def roles(net):
    return {i: n.core.role for i, n in net.nodes.items()}


# --- elections ---------------------------------------------------------------------------

def test_single_voter_elects_itself_and_commits_after_persisting():
    """One voter leads alone; it counts its own entries only after advance() confirms they are durable."""
    net = Net(["a"])
    a = net.elect("a")
    core = a.core
    core.propose([{"op": "x"}])
    rd = core.ready()
    assert [e.data for e in rd.entries] == [{"op": "x"}] and rd.committed == []
    core.advance(rd)
    rd = core.ready()
    assert [e.data for e in rd.committed] == [{"op": "x"}]
    core.advance(rd)


def test_three_nodes_elect_one_leader_and_followers_know_it():
    """After an election exactly one leads; the others report it as leader (for NOT_LEADER redirects)."""
    net = Net(["a", "b", "c"])
    net.elect("b")
    assert roles(net) == {"a": FOLLOWER, "b": LEADER, "c": FOLLOWER}
    assert {n.core.leader_id for n in net.nodes.values()} == {"b"}
    with pytest.raises(NotLeader) as info:
        net.nodes["a"].core.propose([{"op": "x"}])
    assert info.value.leader_id == "b"


def test_vote_is_in_the_same_ready_as_its_grant():
    """A granted vote leaves in a Ready whose hard state records it (persisted before sent)."""
    net = Net(["a", "b", "c"])
    b = net.nodes["b"].core
    b.step(RequestVote(1, "a", "b", 0, 0))
    rd = b.ready()
    grants = [m for m in rd.messages if isinstance(m, RequestVoteResponse) and m.granted]
    assert grants and rd.hard_state == HardState(1, "a")
    b.advance(rd)
    b.step(RequestVote(1, "c", "b", 0, 0))  # same term, another candidate
    rd = b.ready()
    assert [m.granted for m in rd.messages] == [False]
    b.advance(rd)


def test_append_acknowledged_in_the_ready_that_persists_it():
    """A follower's success answer travels with the entries it acknowledges."""
    net = Net(["a", "b", "c"])
    b = net.nodes["b"].core
    b.step(AppendEntries(1, "a", "b", 0, 0, (Entry(1, 1, NOOP),), 0))
    rd = b.ready()
    assert [e.index for e in rd.entries] == [1]
    assert [(m.success, m.index) for m in rd.messages] == [(True, 1)]
    b.advance(rd)


def test_pre_vote_of_a_partitioned_node_does_not_disrupt():
    """A node cut off for a long time does not raise its term (pre-vote), so its return deposes no one."""
    net = Net(["a", "b", "c"])
    net.elect("a")
    term = net.nodes["a"].core.term
    net.isolate("c")
    net.tick(60)
    assert net.nodes["c"].core.term == term  # many pre-votes, no term bump
    assert net.nodes["c"].core.role in (PRE_CANDIDATE, FOLLOWER)
    net.blocked = set()
    net.tick(30)
    assert roles(net)["a"] == LEADER and net.nodes["a"].core.term == term
    assert net.nodes["c"].core.leader_id == "a"


def test_follower_in_lease_rejects_pre_vote_and_ignores_vote_requests():
    """A follower that heard from its leader recently refuses to help depose it."""
    net = Net(["a", "b", "c"])
    net.elect("a")
    b = net.nodes["b"].core
    term = b.term
    b.step(PreVote(term + 1, "c", "b", 100, term))
    b.step(RequestVote(term + 1, "c", "b", 100, term))
    rd = b.ready()
    assert [type(m) for m in rd.messages] == [PreVoteResponse]
    assert rd.messages[0].granted is False and b.term == term
    b.advance(rd)


def test_check_quorum_steps_down_an_isolated_leader():
    """A leader that hears no majority for an election timeout steps down and fails its pending reads."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("a")
    a.core.read_index("r1")
    net.tick(CFG.election_ticks * 2, only={"a"})
    assert a.core.role == FOLLOWER and a.core.leader_id is None
    assert a.failed_reads == ["r1"] and a.reads == []
    with pytest.raises(NotLeader):
        a.core.propose([{"op": "x"}])


def test_paused_leader_cannot_commit_and_learns_the_new_term():
    """Term fencing: a leader paused through an election wakes up still believing it leads;
    its appends are refused with the new term, it steps down, and its proposal never commits."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    old_term = a.core.term
    a.up = False  # SIGSTOP: no ticks, no messages
    net.tick(4 * CFG.election_ticks)
    leader = next(n for n in net.nodes.values() if n.up and n.core.role == LEADER)
    assert leader.core.term > old_term
    a.up = True
    assert a.core.role == LEADER and a.core.term == old_term
    net.propose("a", [{"op": "stale"}])
    net.tick(2)
    assert a.core.role == FOLLOWER and a.core.term == leader.core.term
    assert all({"op": "stale"} not in n.applied for n in net.nodes.values())


# --- commit rules -----------------------------------------------------------------------

def test_old_term_entries_are_not_committed_by_counting():
    """Raft 5.4.2: a majority holding an entry of an earlier term does not commit it; the
    leader's own-term entry does, and carries it along."""
    snap = SnapshotMeta.initial(["a", "b", "c"])
    core = RaftCore("a", rng=random.Random(1), config=CFG, hard_state=HardState(2, None),
                    snapshot=snap, entries=[Entry(1, 1, DATA, {"op": "old"})])
    for _ in range(2 * CFG.election_ticks):
        core.tick()
        if core.role != FOLLOWER:
            break
    rd = core.ready()
    core.advance(rd)
    core.step(PreVoteResponse(3, "b", "a", True))  # pre-vote for term 3 granted
    core.advance(core.ready())
    assert core.role == CANDIDATE and core.term == 3
    core.step(RequestVoteResponse(3, "b", "a", True))
    rd = core.ready()
    assert core.role == LEADER and [e.kind for e in rd.entries] == [NOOP]
    core.advance(rd)  # the leader's copy of 1 and 2 is durable
    core.step(AppendResponse(3, "b", "a", True, 1))  # b holds the old entry: a majority
    assert core.commit == 0
    core.step(AppendResponse(3, "b", "a", True, 2))  # b holds the no-op of term 3
    assert core.commit == 2


def test_input_between_ready_and_advance_is_refused():
    """The driver must finish a Ready (persist, send, apply) before feeding more input."""
    core = Net(["a"]).nodes["a"].core
    core.tick()
    core.ready()
    with pytest.raises(RuntimeError):
        core.tick()


# --- reads ------------------------------------------------------------------------------

def test_read_index_waits_for_a_heartbeat_round():
    """A read is confirmed only after a majority acknowledges a heartbeat sent after it arrived."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.propose("a", [{"op": "w"}])
    a.core.read_index("r")
    net.handle(a)
    assert a.reads == []  # the heartbeats are queued, not yet answered
    net.deliver()
    assert [(r.ctx, r.index) for r in a.reads] == [("r", a.core.commit)]


def test_read_index_of_a_leader_that_lost_its_majority_never_confirms():
    """Without a majority's answer a read stays pending, then fails with the step-down."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("a")
    a.core.read_index("r")
    net.handle(a)
    net.tick(3, only={"a"})
    assert a.reads == []


def test_read_of_a_new_leader_waits_for_its_no_op():
    """A new leader's read index must cover everything committed before it: even with its
    leadership confirmed, the read waits until its no-op commits."""
    snap = SnapshotMeta.initial(["a", "b", "c"])
    core = RaftCore("a", rng=random.Random(1), config=CFG, hard_state=HardState(1, None),
                    snapshot=snap, entries=[Entry(1, 1, NOOP), Entry(2, 1, DATA, {"op": "w"})])
    while core.role != PRE_CANDIDATE:
        core.tick()
    core.step(PreVoteResponse(2, "b", "a", True))
    core.step(RequestVoteResponse(2, "b", "a", True))
    assert core.role == LEADER
    core.advance(core.ready())
    core.read_index("r")
    rd = core.ready()  # the read's heartbeat round goes out with seq 1
    assert {m.seq for m in rd.messages if isinstance(m, AppendEntries)} == {1}
    core.advance(rd)
    core.step(AppendResponse(2, "b", "a", True, 2, 0, 1))  # leadership confirmed, no-op not held
    rd = core.ready()
    assert rd.read_states == [] and core.commit == 0
    core.advance(rd)
    core.step(AppendResponse(2, "b", "a", True, 3, 0, 1))  # the no-op (index 3) commits
    rd = core.ready()
    assert [(r.ctx, r.index) for r in rd.read_states] == [("r", 3)]
    core.advance(rd)


# --- snapshots --------------------------------------------------------------------------

def test_lagging_follower_receives_the_snapshot_in_bounded_pieces():
    """A follower missing compacted entries gets the snapshot piece by piece and catches up."""
    net = Net(["a", "b", "c"])
    net.elect("a")
    net.nodes["c"].up = False
    for n in range(20):
        net.propose("a", [{"op": "w", "n": n}])
    net.tick(2)
    net.snapshot("a")
    a = net.nodes["a"]
    assert a.core.snapshot.index == a.applied_index
    assert a.core.snapshot.size_bytes > 3 * CFG.snapshot_piece_bytes
    net.nodes["c"].up = True
    net.tick(6)
    pieces = [m for m in net.sent if isinstance(m, InstallSnapshot) and m.dst == "c"]
    assert len(pieces) >= 4 and all(len(m.data) <= CFG.snapshot_piece_bytes for m in pieces)
    c = net.nodes["c"]
    assert c.applied == a.applied and c.core.snapshot.index == a.core.snapshot.index
    assert any(rd.snapshot for rd in c.readies)
    net.propose("a", [{"op": "after"}])
    net.tick(2)
    assert c.applied[-1] == {"op": "after"}


def test_snapshot_transfer_restarts_after_the_follower_restarts():
    """A follower that forgets a half-received snapshot asks for it from offset 0 again."""
    net = Net(["a", "b", "c"])
    net.elect("a")
    net.nodes["c"].up = False
    for n in range(20):
        net.propose("a", [{"op": "w", "n": n}])
    net.tick(2)
    net.snapshot("a")
    a, c = net.nodes["a"], net.nodes["c"]
    snap = a.core.snapshot

    def piece(offset):
        return InstallSnapshot(a.core.term, "a", "c", snap.index, snap.term, snap.membership,
                               snap.size_bytes, offset, 10, False, 0, a.snap_data[offset:offset + 10])

    c.core.step(piece(0))
    net.handle(c)
    c.restart()  # the piece is on disk, but the new core does not know the transfer
    c.core.step(piece(10))
    rd = c.core.ready()
    answer = [m for m in rd.messages if isinstance(m, InstallSnapshotResponse)]
    assert [(m.next_offset, m.done) for m in answer] == [(0, False)] and not rd.snapshot_pieces
    c.core.advance(rd)


def test_snapshot_covered_by_commit_is_not_installed():
    """A duplicate or late InstallSnapshot older than the follower's commit changes nothing."""
    net = Net(["a", "b", "c"])
    net.elect("a")
    for n in range(6):
        net.propose("a", [{"op": "w", "n": n}])
    net.tick(2)
    b = net.nodes["b"].core
    last = b.last_index
    b.step(InstallSnapshot(b.term, "a", "b", 2, 1, b.membership, 5, 0, 5, True, 0, b"[1,2]"))
    rd = b.ready()
    assert rd.snapshot is None and rd.truncate_from is None and b.last_index == last
    assert [(m.done, m.index) for m in rd.messages] == [(True, 2)]
    b.advance(rd)


def test_snapshot_matching_the_log_keeps_the_entries_after_it():
    """Raft section 7: if the follower holds the snapshot's last entry, it keeps what follows."""
    snap = SnapshotMeta.initial(["a", "b", "c"])
    core = RaftCore("b", rng=random.Random(0), config=CFG, hard_state=HardState(1, None), snapshot=snap,
                    entries=[Entry(i, 1, DATA, {"i": i}) for i in range(1, 7)])
    core.step(InstallSnapshot(1, "a", "b", 4, 1, snap.membership, 3, 0, 3, True, 0, b"abc"))
    rd = core.ready()
    assert rd.snapshot.index == 4 and rd.truncate_from is None and rd.compact_to == 4
    assert core.last_index == 6 and core.commit == 4 and core.term_at(5) == 1
    core.advance(rd)


def test_snapshot_piece_out_of_order_is_not_written():
    """A piece that does not continue the transfer is not written; the answer names the offset wanted."""
    snap = SnapshotMeta.initial(["a", "b", "c"])
    core = RaftCore("b", rng=random.Random(0), config=CFG, snapshot=snap)

    def piece(offset):
        return InstallSnapshot(1, "a", "b", 9, 1, snap.membership, 30, offset, 10, False, 0, b"x" * 10)

    core.step(piece(0))
    core.step(piece(20))
    core.step(piece(10))
    rd = core.ready()
    assert [p.offset for p in rd.snapshot_pieces] == [0, 10]
    assert [m.next_offset for m in rd.messages] == [10, 10, 20]
    core.advance(rd)


def test_restart_after_crash_between_snapshot_and_log_cut():
    """Snapshot installed but the log not yet cut: the conflicting suffix is dropped on restart."""
    snap = SnapshotMeta(5, 3, Membership(frozenset("abc")), 10)
    stale = [Entry(i, 1, DATA, {"i": i}) for i in range(1, 9)]  # term 1 at index 5 != 3
    core = RaftCore("a", rng=random.Random(0), config=CFG, hard_state=HardState(3, None),
                    snapshot=snap, entries=stale)
    assert core.last_index == 5 and core.commit == 5
    rd = core.ready()
    assert rd.truncate_from == 6 and rd.compact_to == 5 and rd.committed == []
    core.advance(rd)


# --- membership -------------------------------------------------------------------------

def test_learner_catches_up_without_counting_then_is_promoted():
    """A new member replicates as a learner (commits never wait for it) and counts once promoted."""
    net = Net(["a", "b", "c", "d"], voters=["a", "b", "c"])
    net.elect("a")
    for n in range(10):
        net.propose("a", [{"op": "w", "n": n}])
    a, d = net.nodes["a"], net.nodes["d"]
    d.up = False
    net.propose("a", [{"op": "before"}])
    net.tick(2)
    net.nodes["a"].core.add_learner("d")
    net.handle(a)
    net.tick(2)
    assert a.core.membership.learners == {"d"}
    net.nodes["b"].up = False
    net.propose("a", [{"op": "a and c"}])
    net.tick(2)
    assert a.applied[-1] == {"op": "a and c"}  # 2 of 3 voters: the learner is not waited for
    net.nodes["b"].up = True
    with pytest.raises(MembershipChangeRefused, match="caught up"):
        a.core.promote("d")
    d.up = True
    net.tick(4)
    assert d.applied == a.applied and d.core.membership.learners == {"d"}
    assert a.core.progress("d") == a.core.last_index == d.core.last_index
    assert a.core.status()["learners"] == ["d"] and a.core.status()["peers"]["d"]["state"] == "replicate"
    assert d.core.entries(1, d.core.last_index) == a.core.entries(1, a.core.last_index)
    assert d.core.role == FOLLOWER  # a learner never campaigns
    a.core.promote("d")
    net.handle(a)
    net.tick(2)
    assert a.core.membership.voters == {"a", "b", "c", "d"}
    net.nodes["b"].up = net.nodes["c"].up = False  # 2 of 4 voters: no majority
    net.propose("a", [{"op": "needs 3 of 4"}])
    net.tick(2, only={"a", "d"})
    assert {"op": "needs 3 of 4"} not in a.applied


def test_one_membership_change_at_a_time():
    """A second change is refused until the first is committed."""
    net = Net(["a", "b", "c", "d", "e"], voters=["a", "b", "c"])
    a = net.elect("a")
    net.nodes["b"].up = net.nodes["c"].up = False
    a.core.add_learner("d")
    with pytest.raises(MembershipChangeRefused, match="in progress"):
        a.core.add_learner("e")


def test_removed_leader_steps_down_once_the_change_commits():
    """A leader that removes itself keeps leading until the change commits, then steps down."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    a.core.remove("a")
    net.handle(a)
    net.deliver()
    net.tick(2, only={"a"})
    assert a.core.role == FOLLOWER and a.core.membership.voters == {"b", "c"}
    net.tick(3 * CFG.election_ticks)
    assert sum(n.core.role == LEADER for n in net.nodes.values()) == 1
    assert net.nodes["a"].core.role != LEADER


def test_leader_that_removed_itself_can_finish_the_change_after_losing_its_majority():
    """Voters {a, b}; a proposes its own removal while b is down, then steps down (check-quorum).
    b's log is shorter, so only a can win; a must campaign although its latest configuration
    excludes it, commit the removal, and hand over to b."""
    net = Net(["a", "b"])
    a = net.elect("a")
    b = net.nodes["b"]
    b.up = False
    a.core.remove("a")
    net.propose("a", [{"op": "after removal"}])
    net.tick(2 * CFG.election_ticks, only={"a"})
    assert a.core.role == FOLLOWER and a.core.membership.voters == {"b"}
    b.up = True
    net.tick(6 * CFG.election_ticks)
    assert b.core.role == LEADER and b.core.membership.voters == {"b"}
    assert {"op": "after removal"} in b.applied


# --- the store under a core -------------------------------------------------------------

def test_core_restarts_from_log_store(tmp_path):
    """Driving a core with a LogStore: after a restart, term, vote and log come back and it leads again."""
    def drive(core, store):
        while core.has_ready():
            rd = core.ready()
            if rd.hard_state:
                store.save_hard_state(rd.hard_state)
            if rd.truncate_from is not None:
                store.truncate_from(rd.truncate_from)
            if rd.compact_to is not None:
                store.compact(rd.compact_to)
            store.append(rd.entries)
            core.advance(rd)

    snap = SnapshotMeta.initial(["a"])
    store = LogStore(str(tmp_path))
    hard, entries = store.open()
    core = RaftCore("a", rng=random.Random(0), config=CFG, hard_state=hard, snapshot=snap, entries=entries)
    while core.role != LEADER:
        core.tick()
        drive(core, store)
    core.propose([{"op": "put", "n": n} for n in range(5)])
    drive(core, store)
    term, last = core.term, core.last_index
    store.close()
    store = LogStore(str(tmp_path))
    hard, entries = store.open()
    assert hard.term == term and hard.vote == "a" and entries[-1].index == last
    core = RaftCore("a", rng=random.Random(0), config=CFG, hard_state=hard, snapshot=snap, entries=entries)
    while core.role != LEADER:
        core.tick()
        drive(core, store)
    assert core.term == term + 1 and core.commit == last + 1
    store.close()


# --- wire form and purity ---------------------------------------------------------------

def test_every_message_round_trips_through_the_wire_form():
    """to_wire/from_wire are inverse for every message type, snapshot bytes in the body."""
    m = Membership(frozenset({"a", "b"}), frozenset({"c"}))
    samples = [
        PreVote(3, "a", "b", 10, 2), PreVoteResponse(3, "b", "a", True),
        RequestVote(3, "a", "b", 10, 2), RequestVoteResponse(3, "b", "a", False),
        AppendEntries(3, "a", "b", 4, 2, (Entry(5, 3, NOOP), Entry(6, 3, DATA, {"op": "x"}),
                                          Entry(7, 3, messages.CONFIG, m.to_data())), 4, 9),
        AppendResponse(3, "b", "a", False, 4, 2, 9),
        InstallSnapshot(3, "a", "b", 40, 2, m, 100, 10, 3, False, 1, b"\x00\xffz"),
        InstallSnapshotResponse(3, "b", "a", 40, 13, False, 1),
    ]
    for msg in samples:
        header, body = to_wire(msg)
        assert from_wire(json.loads(json.dumps(header)), body) == msg


@pytest.mark.parametrize("header, body", [
    ({"type": "Nope"}, b""),
    ({"type": "PreVote", "term": 1, "src": "a", "dst": "b", "last_index": -1, "last_term": 0}, b""),
    ({"type": "PreVote", "term": 1, "src": "a", "dst": "b", "last_index": 1}, b""),
    ({"type": "PreVoteResponse", "term": 1, "src": "a", "dst": "b", "granted": 1}, b""),
    ({"type": "AppendEntries", "term": 1, "src": "a", "dst": "b", "prev_index": 0, "prev_term": 0,
      "entries": [[2, 1, "noop", None]], "commit": 0, "seq": 0}, b""),
    ({"type": "AppendEntries", "term": 1, "src": "a", "dst": "b", "prev_index": 0, "prev_term": 0,
      "entries": [[1, 1, "data", "not an object"]], "commit": 0, "seq": 0}, b""),
    ({"type": "InstallSnapshot", "term": 1, "src": "a", "dst": "b", "index": 1, "snap_term": 1,
      "membership": {"voters": ["a"], "learners": []}, "size": 2, "offset": 0, "length": 3,
      "done": True, "seq": 0}, b"abc"),
    ({"type": "AppendResponse", "term": 1, "src": "a", "dst": "b", "success": True, "index": 1,
      "hint": 0, "seq": 0}, b"body"),
])
def test_malformed_wire_messages_are_refused(header, body):
    """Every field is checked: a peer's bad message raises BadRaftMessage, never builds an object."""
    with pytest.raises(BadRaftMessage):
        from_wire(header, body)


FORBIDDEN = {"socket", "threading", "time", "random", "os", "select", "selectors", "asyncio",
             "subprocess", "signal", "multiprocessing", "io", "logging", "shutil", "tempfile",
             "pathlib", "datetime", "concurrent", "_thread", "sys", "secrets", "uuid"}


@pytest.mark.parametrize("module", ["meta/raft.py", "meta/messages.py"])
def test_core_imports_no_io(module):
    """The consensus core and its messages import nothing that does I/O, reads a clock or draws randomness."""
    tree = ast.parse(open(os.path.join(ROOT, module)).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.module in ("messages", "raft"), f"relative import of {node.module}"
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                "__import__", "open", "eval", "exec"):
            pytest.fail(f"{module} calls {node.func.id}")
    assert imported <= {"__future__", "dataclasses", "typing"}, imported
    assert not imported & FORBIDDEN


def test_catch_up_appends_stay_under_the_frame_header_limit():
    """Entries go in a RAFT frame's JSON header (protocol.MAX_HEADER_BYTES, 256 KiB).  A follower
    that fell behind by many large entries (a file appended to hundreds of times: each commit lists
    every chunk) was sent max_entries_per_append of them in one AppendEntries of ~900 KiB, which
    every send refused ("header of 915997 bytes exceeds 262144"): it never caught up.  An append
    is bounded in bytes too (max_append_bytes), and still carries at least one entry."""
    import protocol  # noqa: PLC0415

    cfg = RaftConfig(election_ticks=10, heartbeat_ticks=2, max_entries_per_append=512, trailing_entries=0)
    net = Net(["a", "b", "c"], cfg=cfg)
    net.elect("a")
    net.nodes["c"].up = False
    big = {"op": "put", "chunks": [f"{n:064x}" for n in range(300)]}  # ~20 KiB of JSON
    for n in range(60):
        net.propose("a", [dict(big, n=n)])
    net.tick(2)
    net.nodes["c"].up = True
    net.tick(10)
    to_c = [m for m in net.sent if isinstance(m, AppendEntries) and m.dst == "c" and m.entries]
    assert to_c
    sizes = [len(json.dumps(to_wire(m)[0], separators=(",", ":"))) for m in to_c]
    assert max(sizes) <= protocol.MAX_HEADER_BYTES, max(sizes)
    assert net.nodes["c"].applied == net.nodes["a"].applied
