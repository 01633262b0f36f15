"""A sans-IO Raft core: it decides, its driver does the I/O.

Job
---
Keep the masters' metadata log identical on a majority of them and tell the
driver which entries are committed, so that an acknowledged mutation survives
any minority of crashed, paused or partitioned masters (Raft, Ongaro &
Ousterhout 2014, and Ongaro's thesis for pre-vote, check-quorum, read index,
single-server membership changes and snapshots in pieces).

The core owns no socket, thread, clock, randomness or file, like ``protocol.py``
and h11.  Inputs: ``tick()`` (one unit of logical time), ``step(message)``,
``propose(records)``, ``read_index(ctx)``, ``compact(index, size)`` and the
membership calls.  Outputs pile up in a ``Ready`` batch (``meta.messages``):
``ready()`` hands it over, the driver persists it, sends its messages, applies
its committed entries and calls ``advance(ready)``.  No input may be fed
between ``ready()`` and ``advance()``.

Rules the API enforces
----------------------
* Durable before sent: everything a message depends on (term and vote, log
  entries, snapshot pieces) is in the same Ready as the message, and the
  driver persists before it sends.  A vote is never granted, nor an append
  acknowledged, by state that could be lost.
* The leader counts its own copy of an entry only after ``advance()`` says the
  Ready that carried it was persisted.
* Only entries of the leader's current term are committed by counting copies
  (Raft section 5.4.2); a new leader appends a no-op so it can commit at once.
* A follower never truncates a committed entry (it raises AssertionError:
  that would be a safety bug, not a condition to handle).

Elections use randomised timeouts in ``[election_ticks, 2 * election_ticks)``
drawn from the injected ``rng`` (anything with ``randrange``), pre-vote (a node
asks first and bumps its term only if a majority would vote for it, so a
partitioned node cannot disrupt a healthy leader when it returns), a lease
(a node that heard from a leader in the last ``election_ticks`` ignores vote
requests), and check-quorum (a leader that did not hear from a majority in
``election_ticks`` steps down, so a deposed or paused leader stops serving).

Reads (``read_index``): the leader records its commit index (after committing
its no-op, so the index covers every entry committed before it was elected),
then confirms it is still leader by a round of heartbeats acknowledged by a
majority; the driver serves the read once it has applied that index.  So a
read never returns a state older than a write acknowledged before the read
began, and no clock assumption is needed.

Membership: one server at a time, through the log (``add_learner``,
``promote``, ``remove``); a configuration takes effect when appended, the next
change waits until it is committed and until the leader has committed an
entry of its term.  A new member joins as a learner (receives the log, never
counts) and is promoted once caught up.

Snapshots: the applier serializes its state at an applied index and calls
``compact(index, size_bytes)``; the core keeps ``trailing_entries`` (or more,
for followers that are behind) and sends the snapshot in pieces of at most
``snapshot_piece_bytes`` to a follower that needs compacted entries; the
driver fills each piece's bytes, so neither side holds a whole snapshot.

The whole log since the last compaction stays in memory (the metadata records
are small and a checkpoint bounds their number).  Left out: leadership
transfer, joint consensus, leases without a heartbeat round.
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import (
    CANDIDATE, CONFIG, DATA, FOLLOWER, LEADER, NOOP, PRE_CANDIDATE,
    AppendEntries, AppendResponse, Entry, HardState, InstallSnapshot,
    InstallSnapshotResponse, Membership, PreVote, PreVoteResponse, Ready, ReadState,
    RequestVote, RequestVoteResponse, SnapshotMeta, SnapshotPiece, SoftState, entry_size)


class RaftError(Exception):
    """A request the core cannot serve in its present state."""


class NotLeader(RaftError):
    """Only the leader accepts proposals, reads and membership changes.

    ``leader_id`` is the leader this node follows, or None when it knows none;
    the master answers NOT_LEADER with that leader's address.
    """

    def __init__(self, leader_id: str | None):
        super().__init__(f"not the leader (leader: {leader_id or 'unknown'})")
        self.leader_id = leader_id


class MembershipChangeRefused(RaftError):
    """The change is not allowed now (another in progress, learner behind, ...)."""


@dataclass(frozen=True)
class RaftConfig:
    """Knobs in ticks and counts; the driver maps ticks to time (one tick = the heartbeat).

    ``election_ticks``: a follower that hears no leader for a random
    ``[election_ticks, 2 * election_ticks)`` ticks starts a pre-vote; also the
    check-quorum and lease period.  Must exceed ``heartbeat_ticks``.
    ``max_entries_per_append``/``max_inflight_appends`` bound one follower's
    share of the leader's sends; ``max_append_bytes`` bounds the entries of one
    AppendEntries (about, in JSON: they travel in a RAFT frame's header, at most
    protocol.MAX_HEADER_BYTES = 256 KiB; one entry is sent even when larger); ``snapshot_piece_bytes`` bounds one
    InstallSnapshot; ``trailing_entries`` are kept behind a snapshot for
    followers that are only a little behind.
    """

    election_ticks: int = 10
    heartbeat_ticks: int = 1
    max_entries_per_append: int = 512
    max_inflight_appends: int = 4
    max_append_bytes: int = 64 * 1024
    snapshot_piece_bytes: int = 1 << 20
    trailing_entries: int = 1000

    def __post_init__(self):
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        if min(self.max_entries_per_append, self.max_inflight_appends, self.snapshot_piece_bytes,
               self.max_append_bytes) < 1:
            raise ValueError("max_entries_per_append, max_inflight_appends, max_append_bytes and "
                             "snapshot_piece_bytes must be >= 1")
        if self.trailing_entries < 0:
            raise ValueError("trailing_entries must be >= 0")


# How the leader sends to one follower.  PROBE: one append at a time until one
# matches; REPLICATE: appends pipelined up to max_inflight_appends; SNAPSHOT:
# the follower needs compacted entries and receives the snapshot piece by piece.
PROBE, REPLICATE, SNAPSHOT = "probe", "replicate", "snapshot"


class _Progress:
    """The leader's view of one follower."""

    __slots__ = ("match", "next", "state", "paused", "inflight", "active", "acked",
                 "seq", "snap_index", "snap_offset")

    def __init__(self, next_index: int):
        self.match = 0            # highest index known to match ours
        self.next = next_index    # next index to send
        self.state = PROBE
        self.paused = False       # PROBE: an append is out, wait for its answer
        self.inflight: list[int] = []  # REPLICATE: last index of each append out
        self.active = False       # heard from in this check-quorum period
        self.acked = False        # match advanced since the last heartbeat
        self.seq = 0              # highest read round it acknowledged
        self.snap_index = 0       # SNAPSHOT: which snapshot, and the next offset
        self.snap_offset = 0


class _Incoming:
    """A snapshot being received (only its position: the bytes go to the driver)."""

    __slots__ = ("term", "leader", "meta", "next_offset")

    def __init__(self, term: int, leader: str, meta: SnapshotMeta):
        self.term, self.leader, self.meta, self.next_offset = term, leader, meta, 0


class RaftCore:
    """One member's consensus state machine.  See the module docstring.

    Build it from what the driver persisted: ``hard_state``, the latest
    ``snapshot`` (``SnapshotMeta.initial(voters)`` for a new cluster, an empty
    membership for a member that will join) and the log ``entries`` after it.
    Read-only attributes for the driver: ``id``, ``term`` (the fencing
    token), ``vote``, ``role``, ``leader_id``, ``commit``, ``last_index``,
    ``membership``, ``snapshot``.  Subclasses may override ``_commit_allowed``
    (tests break rules on purpose with it).
    """

    def __init__(self, node_id: str, *, rng, config: RaftConfig | None = None,
                 hard_state: HardState | None = None, snapshot: SnapshotMeta | None = None,
                 entries=()):
        self.id = node_id
        self.cfg = config or RaftConfig()
        self._rng = rng
        hard_state = hard_state or HardState()
        snapshot = snapshot or SnapshotMeta()
        self.term, self.vote = hard_state.term, hard_state.vote
        if snapshot.term > self.term:
            raise ValueError(f"snapshot term {snapshot.term} > persisted term {self.term}")
        self._snap = snapshot
        # The log: entries log_start+1 .. last; log_start's term and the
        # membership in effect at log_start are kept beside it.
        self._log: list[Entry] = []
        self._log_start = snapshot.index
        self._log_start_term = snapshot.term
        self._base_membership = snapshot.membership
        self._configs: list[tuple[int, Membership]] = []  # config entries in _log
        self.commit = snapshot.index
        self._applied = snapshot.index  # handed to the driver to apply
        # Outputs for the next Ready.
        self._msgs: list = []
        self._notes: list[str] = []
        self._pieces: list[SnapshotPiece] = []
        self._install: SnapshotMeta | None = None
        self._truncate_from: int | None = None
        self._compact_to: int | None = None
        self._read_states: list[ReadState] = []
        self._failed_reads: list = []
        self._hard_dirty = False
        self._soft: SoftState | None = None
        self._in_ready = False
        # Volatile role state.
        self.role = FOLLOWER
        self.leader_id: str | None = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = 0
        self._reset_timeout()
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, _Progress] = {}
        self._pending_reads: list[list] = []  # [ctx, seq, index or None]
        self._read_seq = 0
        self._read_round_due = False
        self._own_term_committed = False
        self._incoming: _Incoming | None = None
        if snapshot.index:
            self._compact_to = snapshot.index  # the store may hold older entries, or restart before it
        self._load(list(entries))
        self._stable = self.last_index   # entries <= this are in the store (or in a Ready)
        self._durable = self.last_index  # ... and persisted (advance() seen)

    def _load(self, entries: list[Entry]) -> None:
        """Adopt the persisted log after the snapshot; fix what a crash mid-install left."""
        snap = self._snap
        prev = None
        for e in entries:
            if prev is not None and (e.index != prev.index + 1 or e.term < prev.term):
                raise ValueError(f"log entries out of order at index {e.index}")
            prev = e
        if entries and entries[0].index > snap.index + 1:
            raise ValueError(f"log starts at {entries[0].index}, snapshot ends at {snap.index}")
        pos = snap.index - entries[0].index if entries else -1
        rest = entries[pos + 1:] if pos >= 0 else entries
        if 0 <= pos < len(entries) and entries[pos].term != snap.term:
            # Crashed between installing a snapshot and cutting the log: the
            # entries after it belong to another history.
            rest = []
            self._truncate_from = snap.index + 1
        if rest and rest[0].term < snap.term:
            raise ValueError(f"entry {rest[0].index} has term {rest[0].term} < snapshot term {snap.term}")
        self._append_entries(rest)
        if self.last_term > self.term:
            # The entries were persisted, the term that came with them was not:
            # nothing was sent in that term, so no vote was cast in it either.
            self.term, self.vote, self._hard_dirty = self.last_term, None, True

    # --- read-only views ---------------------------------------------------------------

    @property
    def last_index(self) -> int:
        return self._log_start + len(self._log)

    @property
    def last_term(self) -> int:
        return self._log[-1].term if self._log else self._log_start_term

    @property
    def membership(self) -> Membership:
        """The latest configuration in the log (in effect even before it is committed)."""
        return self._configs[-1][1] if self._configs else self._base_membership

    @property
    def snapshot(self) -> SnapshotMeta:
        return self._snap

    def term_at(self, index: int) -> int | None:
        """Term of the entry at ``index``, or None if it is compacted or beyond the log."""
        off = index - self._log_start
        if off == 0:
            return self._log_start_term
        if 0 < off <= len(self._log):
            return self._log[off - 1].term
        return None

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``lo .. hi`` inclusive that are still in memory."""
        lo = max(lo, self._log_start + 1)
        return self._log[lo - self._log_start - 1:max(0, hi - self._log_start)]

    def progress(self, node_id: str) -> int | None:
        """The leader's match index for ``node_id`` (None when not leader or not a member)."""
        pr = self._progress.get(node_id) if self.role == LEADER else None
        return None if pr is None else pr.match

    def status(self) -> dict:
        """A JSON-able summary for status displays."""
        return {"id": self.id, "role": self.role, "term": self.term, "leader": self.leader_id,
                "commit": self.commit, "applied": self._applied, "last_index": self.last_index,
                "snapshot_index": self._snap.index, "voters": sorted(self.membership.voters),
                "learners": sorted(self.membership.learners),
                "peers": {n: {"match": pr.match, "state": pr.state}
                          for n, pr in sorted(self._progress.items())}}

    # --- inputs ------------------------------------------------------------------------

    def _check_input(self) -> None:
        if self._in_ready:
            raise RuntimeError("advance() the last Ready before feeding more input")

    def tick(self) -> None:
        """One unit of logical time passed."""
        self._check_input()
        self._election_elapsed += 1
        if self.role == LEADER:
            self._heartbeat_elapsed += 1
            if self._election_elapsed >= self.cfg.election_ticks:
                self._election_elapsed = 0
                if not self._quorum_active():
                    self._notes.append(f"stepping down in term {self.term}: no majority heard "
                                       f"for {self.cfg.election_ticks} ticks")
                    self._become_follower(self.term, None)
                    return
            if self._heartbeat_elapsed >= self.cfg.heartbeat_ticks:
                self._heartbeat_elapsed = 0
                self._broadcast_heartbeat()
        elif self._election_elapsed >= self._timeout and self._can_campaign():
            self._start_election(pre=True)

    def step(self, msg) -> None:
        """Handle one message from a peer (already decoded and validated)."""
        self._check_input()
        if msg.dst != self.id:
            raise ValueError(f"message for {msg.dst!r} delivered to {self.id!r}")
        kind = type(msg)
        if msg.term > self.term:
            if kind is PreVote or (kind is PreVoteResponse and msg.granted):
                pass  # pre-votes never change terms
            elif kind is RequestVote:
                if self._in_lease():
                    return  # a leader is alive: a vote request does not depose it
                self._become_follower(msg.term, None)
            elif kind is AppendEntries or kind is InstallSnapshot:
                self._become_follower(msg.term, msg.src)
            else:
                if self.role == LEADER:
                    self._notes.append(f"stepping down: {msg.src} is in term {msg.term} > {self.term}")
                self._become_follower(msg.term, None)
        elif msg.term < self.term:
            if kind is AppendEntries or kind is InstallSnapshot:
                # Tell a deposed leader our term so it steps down.
                self._send(AppendResponse(self.term, self.id, msg.src, False, 0))
            elif kind is PreVote:
                self._send(PreVoteResponse(self.term, self.id, msg.src, False))
            return
        self._HANDLERS[kind](self, msg)

    def propose(self, records) -> tuple[int, int, int]:
        """Append state-machine ``records`` (a batch: one Ready, one fsync); leader only.

        Returns ``(term, first_index, last_index)``.  The records are committed
        when ``committed`` entries at those indexes carry that term; an entry
        there with another term means the proposal was lost (leader changed).
        Raises ``NotLeader``.
        """
        self._check_input()
        if self.role != LEADER:
            raise NotLeader(self.leader_id)
        records = list(records)
        if not records:
            raise ValueError("nothing to propose")
        first = self.last_index + 1
        self._append_entries([Entry(first + n, self.term, DATA, r) for n, r in enumerate(records)])
        self._replicate()
        return self.term, first, self.last_index

    def read_index(self, ctx) -> None:
        """Ask for a linearizable read; ``ctx`` comes back in ``ReadState`` or ``failed_reads``.

        Raises ``NotLeader``.
        """
        self._check_input()
        if self.role != LEADER:
            raise NotLeader(self.leader_id)
        if not self._read_round_due:  # reads until the next ready() share one round
            self._read_seq += 1
            self._read_round_due = True
        self._pending_reads.append([ctx, self._read_seq, self.commit if self._own_term_committed else None])
        self._confirm_reads()

    def compact(self, index: int, size_bytes: int) -> None:
        """The applier durably wrote a snapshot of its state at applied ``index``, ``size_bytes`` long.

        Entries up to ``index`` may be dropped; ``trailing_entries`` (and what
        lagging followers still need, within that bound) are kept.  Ignored if
        not newer than the current snapshot.  Raises ValueError beyond the
        applied index.
        """
        self._check_input()
        if index <= self._snap.index:
            return
        if index > self._applied:
            raise ValueError(f"snapshot at {index} beyond applied index {self._applied}")
        self._snap = SnapshotMeta(index, self.term_at(index), self.membership_at(index), size_bytes)
        keep = index - self.cfg.trailing_entries
        if self.role == LEADER and self._progress:
            keep = max(keep, min(pr.match for pr in self._progress.values()))
        keep = min(index, max(keep, self._log_start))
        if keep > self._log_start:
            self._drop_prefix(keep)
            self._compact_to = max(self._compact_to or 0, keep)

    def add_learner(self, node_id: str) -> int:
        """Start replicating to ``node_id`` without counting it.  Returns the config entry index."""
        return self._change_membership("add_learner", node_id)

    def promote(self, node_id: str) -> int:
        """Make a caught-up learner a voter."""
        return self._change_membership("promote", node_id)

    def remove(self, node_id: str) -> int:
        """Remove a voter or learner (the leader itself steps down once this commits)."""
        return self._change_membership("remove", node_id)

    # --- outputs -----------------------------------------------------------------------

    def has_ready(self) -> bool:
        return bool(self._msgs or self._hard_dirty or self._pieces or self._install
                    or self._truncate_from is not None or self._compact_to is not None
                    or self.last_index > self._stable or self.commit > self._applied
                    or self._read_states or self._failed_reads or self._notes
                    or (self._read_round_due and self.role == LEADER) or self._soft_changed())

    def _soft_changed(self) -> bool:
        soft = self._soft
        return (soft is None or soft.role != self.role or soft.term != self.term
                or soft.leader_id != self.leader_id)

    def ready(self) -> Ready:
        """Hand over the outputs gathered since the last call (see ``Ready`` for the driver's order)."""
        self._check_input()
        if self._read_round_due:
            self._read_round_due = False
            if self.role == LEADER:
                for peer, pr in self._progress.items():
                    self._send_heartbeat(peer, pr)
        rd = Ready()
        if self._soft_changed():
            rd.soft_state = self._soft = SoftState(self.role, self.term, self.leader_id)
        if self._hard_dirty:
            rd.hard_state = HardState(self.term, self.vote)
            self._hard_dirty = False
        rd.snapshot_pieces, self._pieces = self._pieces, []
        rd.snapshot, self._install = self._install, None
        rd.truncate_from, self._truncate_from = self._truncate_from, None
        rd.compact_to, self._compact_to = self._compact_to, None
        if self.last_index > self._stable:
            rd.entries = self._log[self._stable - self._log_start:]
            self._stable = self.last_index
        rd.messages, self._msgs = self._msgs, []
        if self.commit > self._applied:
            rd.committed = self._log[self._applied - self._log_start:self.commit - self._log_start]
            self._applied = self.commit
        rd.read_states, self._read_states = self._read_states, []
        rd.failed_reads, self._failed_reads = self._failed_reads, []
        rd.notes, self._notes = self._notes, []
        self._in_ready = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted ``rd``, sent its messages and applied its entries."""
        if not self._in_ready:
            raise RuntimeError("advance() without ready()")
        self._in_ready = False
        self._durable = self._stable
        if self.role == LEADER:
            self._maybe_commit()

    def _send(self, msg) -> None:
        self._msgs.append(msg)

    # --- roles and elections -----------------------------------------------------------

    def _reset_timeout(self) -> None:
        e = self.cfg.election_ticks
        self._timeout = self._rng.randrange(e, 2 * e)

    def _in_lease(self) -> bool:
        """Heard from a live leader within the minimum election timeout (or is the leader)."""
        return self.leader_id is not None and self._election_elapsed < self.cfg.election_ticks

    def _set_role(self, role: str, leader: str | None) -> None:
        if self.role == LEADER and role != LEADER:
            self._progress = {}
            self._failed_reads.extend(r[0] for r in self._pending_reads)
            self._pending_reads = []
        self.role, self.leader_id = role, leader
        self._election_elapsed = self._heartbeat_elapsed = 0
        self._reset_timeout()
        self._votes = {}

    def _become_follower(self, term: int, leader: str | None) -> None:
        if term != self.term:
            self.term, self.vote, self._hard_dirty = term, None, True
        self._set_role(FOLLOWER, leader)

    def _start_election(self, pre: bool) -> None:
        if pre:
            self._set_role(PRE_CANDIDATE, None)
            term, kind = self.term + 1, PreVote
            self._notes.append(f"pre-vote for term {term}")
        else:
            self.term, self.vote, self._hard_dirty = self.term + 1, self.id, True
            self._set_role(CANDIDATE, None)
            term, kind = self.term, RequestVote
            self._notes.append(f"election for term {term}")
        self._votes = {self.id: True}
        for voter in sorted(self.membership.voters):
            if voter != self.id:
                self._send(kind(term, self.id, voter, self.last_index, self.last_term))
        self._count_votes()

    def _count_votes(self) -> None:
        m = self.membership
        granted = sum(1 for n, g in self._votes.items() if g and n in m.voters)
        rejected = sum(1 for n, g in self._votes.items() if not g and n in m.voters)
        if granted >= m.quorum():
            if self.role == PRE_CANDIDATE:
                self._start_election(pre=False)
            else:
                self._become_leader()
        elif rejected > len(m.voters) - m.quorum():
            self._notes.append(f"lost the {'pre-vote' if self.role == PRE_CANDIDATE else 'election'} "
                               f"for term {self.term + (self.role == PRE_CANDIDATE)}")
            self._become_follower(self.term, None)

    def _become_leader(self) -> None:
        self._set_role(LEADER, self.id)
        self._progress = {}
        self._sync_progress()
        self._read_seq = 0
        self._own_term_committed = False
        self._notes.append(f"leader for term {self.term}")
        self._append_entries([Entry(self.last_index + 1, self.term, NOOP)])
        self._replicate()

    def _can_campaign(self) -> bool:
        """A voter of the latest or of the committed configuration.

        The committed one matters when a leader removed itself and lost its
        majority before the removal committed: the remaining voter still needs
        its vote, and only it holds the longer log, so it must be able to lead
        again, finish committing its removal and then step down (the votes it
        needs are counted in its latest configuration, which keeps it safe).
        """
        return self.id in self.membership.voters or self.id in self.membership_at(self.commit).voters

    def _up_to_date(self, last_index: int, last_term: int) -> bool:
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def _quorum_active(self) -> bool:
        m = self.membership
        heard = int(self.id in m.voters)
        for node, pr in self._progress.items():
            heard += pr.active and node in m.voters
            pr.active = False
        return heard >= m.quorum()

    # --- message handlers --------------------------------------------------------------

    def _on_pre_vote(self, msg: PreVote) -> None:
        grant = (msg.term > self.term and not self._in_lease()
                 and self._up_to_date(msg.last_index, msg.last_term))
        self._send(PreVoteResponse(msg.term if grant else self.term, self.id, msg.src, grant))

    def _on_request_vote(self, msg: RequestVote) -> None:
        can = self.vote == msg.src or (self.vote is None and self.leader_id is None)
        grant = can and self._up_to_date(msg.last_index, msg.last_term)
        if grant:
            if self.vote != msg.src:
                self.vote, self._hard_dirty = msg.src, True
            self._election_elapsed = 0
        self._send(RequestVoteResponse(self.term, self.id, msg.src, grant))

    def _on_pre_vote_response(self, msg: PreVoteResponse) -> None:
        if self.role != PRE_CANDIDATE or (msg.granted and msg.term != self.term + 1):
            return
        self._votes.setdefault(msg.src, msg.granted)
        self._count_votes()

    def _on_vote_response(self, msg: RequestVoteResponse) -> None:
        if self.role != CANDIDATE:
            return
        self._votes.setdefault(msg.src, msg.granted)
        self._count_votes()

    def _follow(self, leader: str) -> None:
        if self.role == LEADER:
            raise AssertionError(f"{self.id}: two leaders in term {self.term} ({leader} and me)")
        if self.role != FOLLOWER or self.leader_id != leader:
            self._set_role(FOLLOWER, leader)
        self._election_elapsed = 0

    def _on_append(self, msg: AppendEntries) -> None:
        self._follow(msg.src)
        prev, prev_term, entries = msg.prev_index, msg.prev_term, msg.entries
        if prev < self.commit:
            # Entries up to our commit index are committed, hence equal to the
            # leader's (and may be compacted here): skip them.
            entries = entries[self.commit - prev:]
            prev = self.commit
        elif self.term_at(prev) != prev_term:
            self._send(AppendResponse(self.term, self.id, msg.src, False, prev,
                                      self._reject_hint(prev), msg.seq))
            return
        for n, e in enumerate(entries):
            t = self.term_at(e.index)
            if t != e.term:
                if t is not None:
                    self._truncate(e.index)
                self._append_entries(entries[n:])
                break
        last_new = prev + len(entries)
        if msg.commit > self.commit:
            self.commit = max(self.commit, min(msg.commit, last_new))
        self._send(AppendResponse(self.term, self.id, msg.src, True, last_new, 0, msg.seq))

    def _reject_hint(self, prev: int) -> int:
        """An index at or below which our log may match: skip the conflicting term at once."""
        if prev > self.last_index:
            return self.last_index
        conflict = self.term_at(prev)
        floor = max(self.commit, self._log_start)
        i = prev - 1
        while i > floor and self.term_at(i) == conflict:
            i -= 1
        return i

    def _heard_from(self, msg) -> _Progress | None:
        """A follower answered this leader: note it for check-quorum and the read rounds."""
        pr = self._progress.get(msg.src) if self.role == LEADER else None
        if pr is not None:
            pr.active = True
            if msg.seq > pr.seq:
                pr.seq = msg.seq
                self._confirm_reads()
        return pr

    def _on_append_response(self, msg: AppendResponse) -> None:
        pr = self._heard_from(msg)
        if pr is None:
            return
        if msg.success:
            if msg.index < pr.match:
                return  # an old answer
            if msg.index > pr.match:
                pr.match, pr.acked = msg.index, True
                self._maybe_commit()
                if self._progress.get(msg.src) is not pr:
                    return  # the commit removed us or the follower
            if pr.state == REPLICATE:
                pr.next = max(pr.next, pr.match + 1)
                pr.inflight = [i for i in pr.inflight if i > pr.match]
            elif pr.state == PROBE or pr.match >= self._log_start:
                pr.state, pr.next, pr.inflight, pr.paused = REPLICATE, pr.match + 1, [], False
            else:
                return  # SNAPSHOT, and the entries it needs are still compacted
            self._send_append(msg.src, pr)
        elif pr.state != SNAPSHOT and msg.index > pr.match:
            pr.next = max(pr.match + 1, min(msg.index, msg.hint + 1))
            pr.state, pr.inflight, pr.paused = PROBE, [], False
            self._send_append(msg.src, pr)

    def _on_install_snapshot(self, msg: InstallSnapshot) -> None:
        self._follow(msg.src)

        def reply(next_offset: int, done: bool) -> None:
            self._send(InstallSnapshotResponse(self.term, self.id, msg.src, msg.index,
                                               next_offset, done, msg.seq))

        if msg.index <= self.commit:
            self._incoming = None
            reply(msg.size, True)  # we hold all it covers already
            return
        inc = self._incoming
        if msg.offset == 0:
            inc = self._incoming = _Incoming(
                self.term, msg.src, SnapshotMeta(msg.index, msg.snap_term, msg.membership, msg.size))
        elif inc is None or (inc.term, inc.leader, inc.meta.index) != (self.term, msg.src, msg.index):
            reply(0, False)  # not the transfer we know: start again
            return
        elif msg.offset != inc.next_offset:
            reply(inc.next_offset, False)
            return
        if msg.data is None or len(msg.data) != msg.length or msg.offset + msg.length > msg.size:
            raise ValueError("InstallSnapshot piece without its bytes or beyond the snapshot")
        self._pieces.append(SnapshotPiece(msg.index, msg.offset, msg.data))
        inc.next_offset += msg.length
        if inc.next_offset < inc.meta.size_bytes:
            reply(inc.next_offset, False)
            return
        self._incoming = None
        self._install_snapshot(inc.meta, msg.src)
        reply(inc.meta.size_bytes, True)

    def _on_snapshot_response(self, msg: InstallSnapshotResponse) -> None:
        pr = self._heard_from(msg)
        if pr is None:
            return
        if msg.done:
            if msg.index > pr.match:
                pr.match, pr.acked = msg.index, True
                self._maybe_commit()
                if self._progress.get(msg.src) is not pr:
                    return
            if pr.state == SNAPSHOT:
                self._notes.append(f"snapshot {msg.index} transferred to {msg.src}")
                pr.state, pr.next, pr.paused, pr.inflight = PROBE, pr.match + 1, False, []
                self._send_append(msg.src, pr)
        elif pr.state == SNAPSHOT and msg.index == pr.snap_index:
            pr.snap_offset = msg.next_offset
            self._send_snapshot_piece(msg.src, pr)

    _HANDLERS = {
        PreVote: _on_pre_vote,
        RequestVote: _on_request_vote,
        PreVoteResponse: _on_pre_vote_response,
        RequestVoteResponse: _on_vote_response,
        AppendEntries: _on_append,
        AppendResponse: _on_append_response,
        InstallSnapshot: _on_install_snapshot,
        InstallSnapshotResponse: _on_snapshot_response,
    }

    # --- the log -----------------------------------------------------------------------

    def _append_entries(self, entries) -> None:
        changed = False
        for e in entries:
            self._log.append(e)
            if e.kind == CONFIG:
                self._configs.append((e.index, Membership.from_data(e.data)))
                changed = True
        if changed:
            self._sync_progress()

    def _truncate(self, index: int) -> None:
        """Drop entries >= ``index`` (they conflict with the leader's)."""
        if index <= self.commit:
            raise AssertionError(f"{self.id}: truncating committed entry {index} (commit {self.commit})")
        del self._log[index - self._log_start - 1:]
        while self._configs and self._configs[-1][0] >= index:
            self._configs.pop()
        self._stable = min(self._stable, index - 1)
        self._durable = min(self._durable, index - 1)
        self._truncate_from = index if self._truncate_from is None else min(self._truncate_from, index)

    def _drop_prefix(self, index: int) -> None:
        """Forget entries <= ``index`` (covered by the snapshot)."""
        self._base_membership = self.membership_at(index)
        self._log_start_term = self.term_at(index)
        del self._log[:index - self._log_start]
        self._log_start = index
        self._configs = [c for c in self._configs if c[0] > index]

    def membership_at(self, index: int) -> Membership:
        """The configuration in effect at ``index`` (for the checkpoint written at that index)."""
        for i, m in reversed(self._configs):
            if i <= index:
                return m
        return self._base_membership

    def _install_snapshot(self, meta: SnapshotMeta, leader: str) -> None:
        i = meta.index
        if self.term_at(i) == meta.term:
            self._drop_prefix(i)  # our log holds that entry: keep what follows (Raft section 7)
            self._stable, self._durable = max(self._stable, i), max(self._durable, i)
        else:
            self._log, self._configs = [], []
            self._log_start, self._log_start_term, self._base_membership = i, meta.term, meta.membership
            self._truncate_from = i + 1 if self._truncate_from is None else min(self._truncate_from, i + 1)
            self._stable = self._durable = i
        self._snap = self._install = meta
        self.commit = self._applied = i
        self._compact_to = max(self._compact_to or 0, i)
        self._notes.append(f"installed snapshot {i} (term {meta.term}, {meta.size_bytes} bytes) "
                           f"from {leader}")

    # --- leader ------------------------------------------------------------------------

    def _sync_progress(self) -> None:
        """Replicate to the members of the latest and of the committed configuration."""
        if self.role != LEADER:
            return
        wanted = (self.membership.members | self.membership_at(self.commit).members) - {self.id}
        for node in list(self._progress):
            if node not in wanted:
                del self._progress[node]
        for node in sorted(wanted):  # sorted: the same order in every process (hash seeds differ)
            if node not in self._progress:
                self._progress[node] = _Progress(self.last_index + 1)

    def _replicate(self) -> None:
        for peer, pr in self._progress.items():
            self._send_append(peer, pr)

    def _send_append(self, peer: str, pr: _Progress, heartbeat: bool = False) -> None:
        if pr.state == SNAPSHOT:
            if heartbeat:
                self._send_snapshot_piece(peer, pr)
            return
        if not heartbeat and (pr.paused if pr.state == PROBE
                              else len(pr.inflight) >= self.cfg.max_inflight_appends):
            return
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        if prev_term is None:
            if prev < self._log_start:
                pr.state, pr.snap_index, pr.snap_offset, pr.inflight = SNAPSHOT, -1, 0, []
                self._notes.append(f"sending snapshot {self._snap.index} ({self._snap.size_bytes} bytes, "
                                   f"pieces of {self.cfg.snapshot_piece_bytes}) to {peer}")
                self._send_snapshot_piece(peer, pr)
                return
            prev = pr.next = self.last_index + 1  # beyond our log (should not happen): re-probe
            prev_term = self.last_term
        hi = min(self.last_index, prev + self.cfg.max_entries_per_append)
        entries = self._log[prev - self._log_start:hi - self._log_start]
        budget = self.cfg.max_append_bytes
        for n, e in enumerate(entries):
            budget -= entry_size(e)
            if budget < 0 and n:  # what fits (at least one entry): a frame header is bounded
                entries, hi = entries[:n], prev + n
                break
        entries = tuple(entries)
        if not entries and not heartbeat:
            return
        self._send(AppendEntries(self.term, self.id, peer, prev, prev_term, entries,
                                 self.commit, self._read_seq))
        if pr.state == PROBE:
            pr.paused = True
        elif entries:
            pr.next = hi + 1
            pr.inflight.append(hi)

    def _send_heartbeat(self, peer: str, pr: _Progress) -> None:
        """An empty append at the follower's known match: it resets its timer, learns the
        commit index and acknowledges the current read round without disturbing pipelining."""
        if pr.state == SNAPSHOT or pr.state == PROBE or self.term_at(pr.match) is None:
            self._send_append(peer, pr, heartbeat=True)
            return
        self._send(AppendEntries(self.term, self.id, peer, pr.match, self.term_at(pr.match), (),
                                 self.commit, self._read_seq))

    def _broadcast_heartbeat(self) -> None:
        for peer, pr in self._progress.items():
            if pr.state == REPLICATE and pr.match < self.last_index and not pr.acked:
                # Nothing acknowledged since the last heartbeat: appends were
                # lost, resend from what we know it holds.
                pr.state, pr.next, pr.inflight, pr.paused = PROBE, pr.match + 1, [], False
            pr.acked = False
            self._send_heartbeat(peer, pr)

    def _send_snapshot_piece(self, peer: str, pr: _Progress) -> None:
        snap = self._snap
        if pr.snap_index != snap.index:  # a newer snapshot replaced the one being sent
            pr.snap_index, pr.snap_offset = snap.index, 0
        offset = min(pr.snap_offset, snap.size_bytes)
        length = min(self.cfg.snapshot_piece_bytes, snap.size_bytes - offset)
        self._send(InstallSnapshot(self.term, self.id, peer, snap.index, snap.term, snap.membership,
                                   snap.size_bytes, offset, length, offset + length == snap.size_bytes,
                                   self._read_seq))

    def _commit_allowed(self, index: int) -> bool:
        """Raft section 5.4.2: count copies only of entries of the current term."""
        return self.term_at(index) == self.term

    def _maybe_commit(self) -> None:
        m = self.membership
        if self.role != LEADER or not m.voters:
            return
        matches = sorted((self._durable if v == self.id else
                          (self._progress[v].match if v in self._progress else 0))
                         for v in m.voters)
        n = matches[len(matches) - m.quorum()]
        if n <= self.commit or not self._commit_allowed(n):
            return
        self.commit = n
        if not self._own_term_committed and self.term_at(n) == self.term:
            self._own_term_committed = True
            for read in self._pending_reads:
                if read[2] is None:
                    read[2] = n
        self._sync_progress()
        if self.id not in m.voters and self._config_committed():
            self._notes.append(f"stepping down in term {self.term}: removed from the voters")
            self._become_follower(self.term, None)
            return
        self._confirm_reads()

    def _config_committed(self) -> bool:
        return not self._configs or self._configs[-1][0] <= self.commit

    def _confirm_reads(self) -> None:
        if not self._pending_reads:
            return
        m = self.membership
        need = m.quorum() - (self.id in m.voters)
        if need <= 0:
            confirmed = self._read_seq
        else:
            acked = sorted((pr.seq for node, pr in self._progress.items() if node in m.voters),
                           reverse=True)
            if len(acked) < need:
                return
            confirmed = acked[need - 1]
        reads = self._pending_reads
        while reads and reads[0][1] <= confirmed and reads[0][2] is not None:
            ctx, _, index = reads.pop(0)
            self._read_states.append(ReadState(ctx, index))

    def _change_membership(self, op: str, node_id: str) -> int:
        self._check_input()
        if self.role != LEADER:
            raise NotLeader(self.leader_id)
        if not self._own_term_committed:
            raise MembershipChangeRefused("the leader has not committed an entry of its term yet")
        if not self._config_committed():
            raise MembershipChangeRefused("another membership change is in progress")
        m = self.membership
        if op == "add_learner":
            if node_id in m.members:
                raise MembershipChangeRefused(f"{node_id} is already a member")
            new = Membership(m.voters, m.learners | {node_id})
        elif op == "promote":
            if node_id not in m.learners:
                raise MembershipChangeRefused(f"{node_id} is not a learner")
            match = self._progress[node_id].match
            if match + self.cfg.max_entries_per_append < self.last_index:
                raise MembershipChangeRefused(f"{node_id} has not caught up "
                                              f"(holds {match} of {self.last_index})")
            new = Membership(m.voters | {node_id}, m.learners - {node_id})
        elif op == "remove":
            if node_id not in m.members:
                raise MembershipChangeRefused(f"{node_id} is not a member")
            if m.voters == {node_id}:
                raise MembershipChangeRefused("cannot remove the last voter")
            new = Membership(m.voters - {node_id}, m.learners - {node_id})
        else:
            raise ValueError(op)
        index = self.last_index + 1
        self._append_entries([Entry(index, self.term, CONFIG, new.to_data())])
        self._notes.append(f"membership change at {index}: {op} {node_id}")
        self._replicate()
        return index
