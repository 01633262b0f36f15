"""A deterministic simulator for meta.raft: seeded faults, safety checked after every step.

One seed fixes everything: cluster size, fault rates, the schedule of crashes,
partitions and client requests, message loss, duplication, delay (hence
reordering).  Time is ticks; there is no thread, socket or clock, so a seed
replays exactly (FoundationDB's simulation, the 500lines cluster chapter's
fake network).

A node's *disk* is what its driver persisted from Ready batches (hard state,
log, snapshot); a crash throws away the core and everything else, possibly in
the middle of persisting a Ready (a prefix of its writes survives, none of its
messages were sent), and a restart builds a new core from the disk.

Checked after every Ready of every node (``Violation`` names the property):
at most one leader per term; log matching (same index and term => same entry
and same predecessor term, which by induction is the whole prefix); leader
completeness (a new leader holds every entry committed in earlier terms);
state machine safety (no two nodes apply different entries at one index,
snapshots included); linearizable reads (a read-index read sees every write
acknowledged before it began).  At the end: faults heal, a leader must be
elected and commit a new record within a bound, every member must converge,
and every acknowledged record must be in the final state.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meta.messages import (  # noqa: E402
    DATA, LEADER, HardState, InstallSnapshot, RequestVoteResponse, SnapshotMeta)
from meta.raft import MembershipChangeRefused, NotLeader, RaftConfig, RaftCore  # noqa: E402

CONFIG = RaftConfig(election_ticks=10, heartbeat_ticks=2, max_entries_per_append=8,
                    max_inflight_appends=3, snapshot_piece_bytes=96, trailing_entries=4)
CHAOS_TICKS = 110        # faults happen during these ticks
LIVENESS_TICKS = 90      # then, healed: a new record must commit within this many ticks
CONVERGE_TICKS = 60      # ... and every member must apply it within this many more


class Violation(AssertionError):
    """A safety or liveness property failed; the message says which and where."""


class MemoryStore:
    """The log on a simulated disk, with LogStore's semantics (contiguous; truncate; compact)."""

    __slots__ = ("entries", "next_index")

    def __init__(self):
        self.entries = []
        self.next_index = 1

    def append(self, entries):
        if entries[0].index != self.next_index:
            raise Violation(f"store append at {entries[0].index}, expected {self.next_index}")
        self.entries.extend(entries)
        self.next_index = entries[-1].index + 1

    def truncate_from(self, index):
        if self.entries and index <= self.entries[0].index:
            self.entries = []
        elif self.entries:
            del self.entries[index - self.entries[0].index:]
        self.next_index = min(self.next_index, max(index, 1))
        if self.entries:
            self.next_index = self.entries[-1].index + 1

    def compact(self, index):
        if self.entries and self.entries[-1].index > index:
            del self.entries[:max(0, index - self.entries[0].index + 1)]
        else:
            self.entries = []
            self.next_index = max(self.next_index, index + 1)


class Disk:
    """What survives a crash."""

    __slots__ = ("hard", "store", "snap", "snap_data", "incoming")

    def __init__(self, snap):
        self.hard = HardState()
        self.store = MemoryStore()
        self.snap = snap
        self.snap_data = b'{"state":[]}'
        self.incoming = bytearray()


class SimNode:
    __slots__ = ("id", "disk", "core", "alive", "state", "applied", "pending", "reads",
                 "down_until", "crash_mid_persist")

    def __init__(self, node_id, snap):
        self.id = node_id
        self.disk = Disk(snap)
        self.core = None
        self.alive = False
        self.down_until = 0
        self.crash_mid_persist = False


class Simulation:
    """Run one seed: ``Simulation(seed).run()`` raises Violation or returns a summary dict."""

    core_class = RaftCore

    def __init__(self, seed: int, core_class=None):
        self.seed = seed
        if core_class is not None:
            self.core_class = core_class
        rng = self.rng = random.Random(seed)
        self.membership_changes = rng.random() < 0.25
        size = 5 if self.membership_changes or rng.random() < 0.4 else 3
        ids = [f"n{i}" for i in range(1, size + 1)]
        voters = ids[:3] if self.membership_changes else ids
        # Fault profile of this seed.
        self.loss = rng.choice((0.0, 0.02, 0.1, 0.25))
        self.dup = rng.choice((0.0, 0.03, 0.1))
        self.max_delay = rng.choice((1, 2, 4))
        self.long_delay = rng.choice((0.0, 0.02))       # rare long delays reorder a lot
        self.crash_rate = rng.choice((0.0, 0.02, 0.05))  # per tick
        self.vote_crash_rate = rng.choice((0.0, 0.1, 0.3))  # per Ready that changed term/vote
        self.partition_rate = rng.choice((0.0, 0.02, 0.05))
        self.propose_rate = rng.choice((0.2, 0.5))
        self.read_rate = rng.choice((0.0, 0.1))
        self.snapshot_every = rng.choice((6, 15, 10 ** 9))
        self.now = 0
        self.net = []          # heap of (time, seq, msg)
        self.msg_seq = 0
        self.blocked = set()   # directed links (src, dst) that drop everything
        # Global knowledge for the checks.
        self.leaders = {}        # term -> leader id
        self.votes = {}          # (voter, term) -> candidate
        self.entry_at = {}       # (index, term) -> (kind, data, prev term)
        self.committed = {}      # index -> (term, data, lowest term of a node that saw it committed)
        self.applied_at = {}     # index -> (term, data)
        self.acked = {}          # record -> index
        self.max_acked = 0
        self.next_record = 0
        self.next_read = 0
        self.read_floor = {}     # read ctx -> highest acknowledged index when it began
        self.steps = 0
        self.nodes = {}
        for node_id in ids:
            node = self.nodes[node_id] = SimNode(
                node_id, SnapshotMeta.initial(voters) if node_id in voters else SnapshotMeta())
            self._start(node)

    # --- nodes ---------------------------------------------------------------------------

    def _start(self, node):
        d = node.disk
        node.core = self.core_class(node.id, rng=random.Random(self.rng.random()), config=CONFIG,
                                    hard_state=d.hard, snapshot=d.snap, entries=list(d.store.entries))
        node.alive = True
        node.crash_mid_persist = False
        node.state = json.loads(d.snap_data)["state"]
        node.applied = d.snap.index
        node.pending = {}
        node.reads = []
        self._drain(node)

    def _crash(self, node):
        node.alive = False
        node.core = None
        rng = self.rng
        node.down_until = self.now + (rng.randint(0, 2) if rng.random() < 0.5 else rng.randint(3, 40))

    # --- the driver ----------------------------------------------------------------------

    def _drain(self, node):
        """Handle Ready batches until the core has nothing more (the driver loop)."""
        core = node.core
        while node.alive and core.has_ready():
            rd = core.ready()
            self.steps += 1
            if rd.soft_state is not None and rd.soft_state.role == LEADER:
                self._check_new_leader(node, rd.soft_state.term)
            if not self._persist(node, rd):
                return
            for msg in rd.messages:
                self._send(node, msg)
            self._apply(node, rd)
            core.advance(rd)
            if rd.hard_state is not None and self.rng.random() < self.vote_crash_rate:
                self._crash(node)  # right after voting or changing term: the riskiest moment
                return
            for rs in rd.read_states:
                node.reads.append(rs)
            if node.reads:
                self._serve_reads(node)
            if node.applied - node.disk.snap.index >= self.snapshot_every:
                self._take_snapshot(node)

    def _persist(self, node, rd) -> bool:
        """Write rd to the disk in the driver's order; maybe crash part-way.  False if crashed."""
        d, core = node.disk, node.core
        writes = []
        if rd.hard_state is not None:
            old, new = d.hard, rd.hard_state
            if new.term < old.term or (new.term == old.term and old.vote not in (None, new.vote)):
                raise Violation(f"{node.id}: hard state {old} -> {new}")
            writes.append(lambda: setattr(d, "hard", new))
        for piece in rd.snapshot_pieces:
            writes.append(lambda p=piece: self._write_piece(d, p))
        if rd.snapshot is not None:
            writes.append(lambda: self._install(node, rd.snapshot))
        if rd.truncate_from is not None:
            writes.append(lambda: d.store.truncate_from(rd.truncate_from))
        if rd.compact_to is not None:
            writes.append(lambda: d.store.compact(rd.compact_to))
        if rd.entries:
            self._check_log_matching(node, rd.entries)
            writes.append(lambda: d.store.append(rd.entries))
        if node.crash_mid_persist and writes:
            cut = self.rng.randrange(len(writes))
            for write in writes[:cut]:
                write()
            if rd.entries and cut == len(writes) - 1 and len(rd.entries) > 1:
                d.store.append(rd.entries[:self.rng.randrange(1, len(rd.entries))])  # torn batch
            self._crash(node)
            return False
        for write in writes:
            write()
        return True

    @staticmethod
    def _write_piece(d, piece):
        if piece.offset == 0:
            d.incoming = bytearray()
        if piece.offset != len(d.incoming):
            raise Violation(f"snapshot piece at {piece.offset}, file holds {len(d.incoming)}")
        d.incoming += piece.data

    def _install(self, node, meta):
        d = node.disk
        if len(d.incoming) != meta.size_bytes:
            raise Violation(f"{node.id}: snapshot {meta.index} is {len(d.incoming)} bytes, "
                            f"expected {meta.size_bytes}")
        d.snap, d.snap_data = meta, bytes(d.incoming)

    def _send(self, node, msg):
        if type(msg) is RequestVoteResponse and msg.granted:
            other = self.votes.setdefault((msg.src, msg.term), msg.dst)
            if other != msg.dst:
                raise Violation(f"{msg.src} voted for {other} and {msg.dst} in term {msg.term}")
        elif type(msg) is InstallSnapshot:
            d = node.disk
            if d.snap.index != msg.index:
                return  # that checkpoint is gone: like a lost message
            msg = msg.with_data(d.snap_data[msg.offset:msg.offset + msg.length])
        r = self.rng.random  # cheaper than randint, and this runs for every message
        if self.loss and r() < self.loss:
            return
        for _ in range(2 if self.dup and r() < self.dup else 1):
            delay = int(r() * (self.max_delay + 1))
            if self.long_delay and r() < self.long_delay:
                delay += 5 + int(r() * 21)
            self.msg_seq += 1
            heapq.heappush(self.net, (self.now + delay, self.msg_seq, msg))

    def _apply(self, node, rd):
        if rd.snapshot is not None:
            node.state = json.loads(node.disk.snap_data)["state"]
            node.applied = rd.snapshot.index
            self._check_snapshot_state(node, rd.snapshot.index, node.state)
        for e in rd.committed:
            if e.index != node.applied + 1:
                raise Violation(f"{node.id}: applies {e.index} after {node.applied}")
            node.applied = e.index
            seen = self.applied_at.get(e.index)
            if seen is None:
                self.applied_at[e.index] = (e.term, e.data)
            elif seen != (e.term, e.data):
                raise Violation(f"state machine safety: {node.id} applies {(e.term, e.data)} at "
                                f"{e.index}, another node applied {seen}")
            c = self.committed.get(e.index)
            term = node.core.term
            if c is None or c[2] > term:
                self.committed[e.index] = (e.term, e.data, term)
            if e.kind == DATA:
                node.state.append([e.index, e.data])
            p = node.pending.pop(e.index, None)
            if p is not None and p == (e.term, e.data):
                self.acked[e.data] = e.index
                self.max_acked = max(self.max_acked, e.index)

    def _serve_reads(self, node):
        waiting = []
        for rs in node.reads:
            if rs.index > node.applied:
                waiting.append(rs)
            elif node.applied < self.read_floor[rs.ctx]:
                raise Violation(f"stale read on {node.id}: applied {node.applied} < "
                                f"{self.read_floor[rs.ctx]} acknowledged before the read began")
        node.reads = waiting

    def _take_snapshot(self, node):
        core, d, index = node.core, node.disk, node.applied
        data = json.dumps({"state": node.state}).encode()
        d.snap = SnapshotMeta(index, core.term_at(index), core.membership_at(index), len(data))
        d.snap_data = data
        core.compact(index, len(data))
        self._drain(node)

    # --- checks --------------------------------------------------------------------------

    def _check_new_leader(self, node, term):
        other = self.leaders.setdefault(term, node.id)
        if other != node.id:
            raise Violation(f"two leaders in term {term}: {other} and {node.id}")
        core = node.core
        snap_index = core.snapshot.index
        for index, (t, data, seen_term) in self.committed.items():
            if seen_term < term and index > snap_index and core.term_at(index) != t:
                raise Violation(f"leader completeness: {node.id} leads term {term} without "
                                f"committed entry {index} (term {t})")

    def _check_log_matching(self, node, entries):
        core = node.core
        prev_term = core.term_at(entries[0].index - 1)
        for e in entries:
            key = (e.index, e.term)
            value = (e.kind, e.data, prev_term)
            seen = self.entry_at.setdefault(key, value)
            if seen != value:
                raise Violation(f"log matching: {node.id} holds {value} at {key}, another node {seen}")
            prev_term = e.term

    def _check_snapshot_state(self, node, index, state):
        data_at = {i: rec for i, rec in state}
        for i, (t, data) in self.applied_at.items():
            if i <= index and self.entry_at.get((i, t), (None,))[0] == DATA and data_at.get(i) != data:
                raise Violation(f"{node.id}: snapshot {index} has {data_at.get(i)!r} at {i}, "
                                f"applied elsewhere: {data!r}")
        for i, rec in state:
            seen = self.applied_at.get(i)
            if seen is not None and seen[1] != rec:
                raise Violation(f"{node.id}: snapshot {index} has {rec!r} at {i}, applied elsewhere: {seen}")

    # --- the world -----------------------------------------------------------------------

    def _leader(self):
        best = None
        for node in self.nodes.values():
            if node.alive and node.core.role == LEADER and (best is None or node.core.term > best.core.term):
                best = node
        return best

    def _propose(self, tag="c"):
        node = self._leader() if self.rng.random() < 0.9 else self.rng.choice(list(self.nodes.values()))
        if node is None or not node.alive:
            return None
        records = [f"{tag}{self.next_record + n}" for n in range(self.rng.randint(1, 3))]
        self.next_record += len(records)
        try:
            term, first, _ = node.core.propose(records)
        except NotLeader:
            return None
        for n, r in enumerate(records):
            node.pending[first + n] = (term, r)
        self._drain(node)
        return records[-1]

    def _read(self, node):
        ctx = self.next_read
        self.next_read += 1
        try:
            node.core.read_index(ctx)
        except NotLeader:
            return
        self.read_floor[ctx] = self.max_acked
        self._drain(node)

    def _change_membership(self):
        node = self._leader()
        if node is None:
            return
        core, rng = node.core, self.rng
        m = core.membership
        outsiders = sorted(set(self.nodes) - m.members)
        choice = rng.random()
        try:
            if choice < 0.4 and outsiders:
                core.add_learner(rng.choice(outsiders))
            elif choice < 0.7 and m.learners:
                core.promote(rng.choice(sorted(m.learners)))
            elif len(m.voters) > 2 or (m.learners and choice > 0.9):
                core.remove(rng.choice(sorted(m.members)))
            else:
                return
        except MembershipChangeRefused:
            return
        self._drain(node)

    def _faults(self):
        rng = self.rng
        if rng.random() < self.crash_rate:
            node = rng.choice(list(self.nodes.values()))
            if node.alive:
                if rng.random() < 0.5:
                    node.crash_mid_persist = True
                else:
                    self._crash(node)
        if rng.random() < self.partition_rate:
            ids = list(self.nodes)
            kind = rng.random()
            if kind < 0.3:
                self.blocked = set()
            elif kind < 0.6:   # split in two
                rng.shuffle(ids)
                a = set(ids[:rng.randint(1, len(ids) // 2)])
                self.blocked = {(x, y) for x in ids for y in ids if (x in a) != (y in a)}
            elif kind < 0.8:   # isolate one node
                x = rng.choice(ids)
                self.blocked = {(x, y) for y in ids if y != x} | {(y, x) for y in ids if y != x}
            else:              # asymmetric: some one-way links cut
                self.blocked = {(x, y) for x in ids for y in ids if x != y and rng.random() < 0.3}

    def _tick(self, chaos: bool):
        self.now += 1
        rng = self.rng
        for node in self.nodes.values():
            if not node.alive and self.now >= node.down_until and (not chaos or rng.random() < 0.5):
                self._start(node)
        if chaos:
            self._faults()
            if rng.random() < self.propose_rate:
                self._propose()
            if self.read_rate and rng.random() < self.read_rate:
                leader = self._leader()
                if leader is not None:
                    self._read(leader)
            if self.membership_changes and rng.random() < 0.05:
                self._change_membership()
        order = list(self.nodes.values())
        rng.shuffle(order)
        for node in order:
            if node.alive:
                node.core.tick()
                self._drain(node)
        net = self.net
        while net and net[0][0] <= self.now:
            _, _, msg = heapq.heappop(net)
            node = self.nodes[msg.dst]
            if not node.alive or (msg.src, msg.dst) in self.blocked:
                continue
            node.core.step(msg)
            self._drain(node)

    def _heal(self):
        self.blocked = set()
        self.loss = self.dup = self.long_delay = self.vote_crash_rate = 0.0
        self.max_delay = 0
        for node in self.nodes.values():
            node.crash_mid_persist = False
            if not node.alive:
                node.down_until = 0

    def run(self) -> dict:
        """Chaos, then heal and demand progress.  Raises Violation; returns a summary."""
        for _ in range(CHAOS_TICKS):
            self._tick(chaos=True)
        self._heal()
        healed_at = self.now
        record, committed_at = None, None
        while committed_at is None:
            if self.now - healed_at > LIVENESS_TICKS:
                raise Violation(f"liveness: nothing committed {LIVENESS_TICKS} ticks after healing")
            if record is None or record not in self.acked and self.now % 10 == 0:
                record = self._propose("live") or record
            self._tick(chaos=False)
            if record in self.acked:
                committed_at = self.now
        target = self.acked[record]
        while True:
            leader = self._leader()
            members = leader.core.membership.members if leader else self.nodes
            if leader and all(self.nodes[m].applied >= target for m in members):
                break
            if self.now - committed_at > CONVERGE_TICKS:
                raise Violation(f"liveness: members did not all apply {target} within "
                                f"{CONVERGE_TICKS} ticks of its commit")
            self._tick(chaos=False)
        final = {i: rec for i, rec in self.nodes[leader.id].state}
        for rec, index in self.acked.items():
            if final.get(index) != rec:
                raise Violation(f"acknowledged {rec!r} at {index} is not in the final state "
                                f"(found {final.get(index)!r})")
        return {"seed": self.seed, "ticks": self.now, "steps": self.steps,
                "heal_to_commit": committed_at - healed_at, "acked": len(self.acked),
                "terms": len(self.leaders)}


def run_seed(seed: int, core_class=None) -> dict:
    """Run one seed; a Violation (or any crash of the core) names the seed to replay."""
    try:
        return Simulation(seed, core_class).run()
    except Violation as exc:
        raise Violation(f"seed {seed}: {exc}  (replay: RAFT_SEED={seed})") from exc
    except Exception as exc:
        raise Violation(f"seed {seed}: {type(exc).__name__}: {exc}  (replay: RAFT_SEED={seed})") from exc
