"""RaftDriver: runs one RaftCore in a thread and does its I/O (docs/RAFT.md, "the master drives it").

Job
---
The core (``meta/raft.py``) decides; this driver feeds it and carries out
each Ready in the order the core requires:

1. persist with fsync (``meta/log_store.LogStore``: term and vote, truncation,
   appended entries: one write + one fsync per Ready, so every proposal that
   arrived since the last Ready shares one append and one fsync: group commit);
2. hand the messages to ``send(msg)`` (the master sends them over its
   authenticated transport; tests pass a fake network);
3. apply committed DATA entries in order with ``apply(index, record)``;
4. wake the proposers whose entries were applied, serve confirmed reads,
   report role changes to ``on_role(soft_state)`` and log the core's notes.

Callers on other threads use ``propose(records)`` (blocks until the records
are committed on a majority and applied here; raises ``NotLeader`` when this
member does not lead, ``LeadershipLost`` when it stopped leading before they
committed: their outcome is then unknown) and ``read_barrier()`` (read index:
returns once this member has confirmed its leadership with a majority and
applied everything committed before the call, so a read served afterwards is
never older than an acknowledged write).  ``step(msg)`` feeds a peer's
message.  One tick is ``tick_s`` of wall time.

Checkpoints (the Raft snapshot, docs/RAFT.md "Snapshots")
----------------------------------------------------------
``checkpoint.json`` in the data dir holds ``{"format", "index", "term",
"membership", "state"}``: the state machine (``take_state()``) at an applied
index, the term of that entry and the membership in effect there.  After
``snapshot_every`` applied entries or ``snapshot_bytes`` of appended log the
driver takes the state on its thread (cheap shallow copies), a helper thread
serializes and fsyncs it to ``checkpoint.json.tmp``, and the driver thread
renames it into place (fsync of the dir) and calls ``core.compact``: the
core decides how much of the log goes (``compact_to``), keeping what lagging
followers still need within ``trailing_entries``.  Start-up = checkpoint
(``restore(state)``) + the log after it.

A follower the leader cannot reach by log receives the checkpoint in pieces
of at most ``snapshot_piece_bytes`` (one piece per round trip; each piece is
read from the open checkpoint file with ``pread`` and written, then fsynced,
to ``checkpoint.incoming`` on the follower), so neither side holds the whole
file in memory for the transfer.  The last piece makes the core install it:
the incoming file is renamed over ``checkpoint.json`` (atomic, fsync of the
dir), the state machine is restored from it and the log continues after it.
A crash mid-transfer leaves an incomplete ``checkpoint.incoming``, removed at
start; the leader starts the transfer again.

The first start of a new group writes a checkpoint at index 0 holding the
initial voters (``bootstrap``), so the membership is on disk from the start
and afterwards comes only from the checkpoint and the log's CONFIG entries;
a member started to join (``join=True``) starts with no membership at all and
learns it from the leader (it never campaigns before a config lists it as a
voter).  ``peers.json`` remembers which peers were seen holding a log (they
acknowledged entries to us, or sent us entries): a master whose data dir was
wiped asks its peers and refuses to start (replication.py).

Membership changes: ``change_membership(op, node)`` runs one of the core's
``add_learner``/``promote``/``remove`` on the driver thread.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import random
import threading
import time

from metadata_log import FILE_MODE, _encode, _write_all, atomic_write_json, fsync_dir

from .log_store import SEGMENT_NAME, STATE_NAME, LogStore
from .messages import (DATA, LEADER, AppendEntries, AppendResponse, InstallSnapshot, InstallSnapshotResponse,
                       Membership, PreVote, RequestVote, SnapshotMeta)
from .raft import NotLeader, RaftConfig, RaftCore

logger = logging.getLogger("raft")

# One tick of the core in seconds; heartbeat every 3 ticks (150 ms) and an
# election timeout of 20-40 ticks (1-2 s): the defaults of issue 12.
DEFAULT_TICK_S = 0.05
DEFAULT_CONFIG = RaftConfig(election_ticks=20, heartbeat_ticks=3)

CHECKPOINT_NAME = "checkpoint.json"
INCOMING_NAME = "checkpoint.incoming"
PEERS_NAME = "peers.json"
CHECKPOINT_FORMAT = 1


class CheckpointCorrupt(Exception):
    """The checkpoint file is not what this driver wrote or installed; we refuse to guess."""


def is_empty(data_dir: str) -> bool:
    """True when ``data_dir`` holds no Raft state at all (no checkpoint, term/vote or log segment)."""
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return True
    return not any(n in (CHECKPOINT_NAME, STATE_NAME) or SEGMENT_NAME.fullmatch(n) for n in names)


def read_checkpoint(path: str) -> tuple[SnapshotMeta, object]:
    """(meta, state) of a checkpoint file; raises CheckpointCorrupt."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            doc = json.load(f)
        meta = SnapshotMeta(doc["index"], doc["term"], Membership.from_data(doc["membership"]), size)
        if doc.get("format") != CHECKPOINT_FORMAT or type(meta.index) is not int or type(meta.term) is not int:
            raise ValueError("not a format 1 checkpoint")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorrupt(f"{path}: unreadable checkpoint: {exc}") from exc
    return meta, doc.get("state")


def _checkpoint_bytes(index: int, term: int, membership: Membership, state) -> bytes:
    return _encode({"format": CHECKPOINT_FORMAT, "index": index, "term": term,
                    "membership": membership.to_data(), "state": state})


def held_log(msg) -> bool:
    """Does ``msg`` show that its sender holds a non-empty log?"""
    if isinstance(msg, AppendResponse):
        return msg.success and msg.index > 0
    if isinstance(msg, AppendEntries):
        return msg.prev_index > 0 or bool(msg.entries)
    if isinstance(msg, (PreVote, RequestVote)):
        return msg.last_index > 0
    if isinstance(msg, InstallSnapshotResponse):
        return msg.done and msg.index > 0
    return False


class LeadershipLost(Exception):
    """The member stopped leading before a proposal or read was confirmed: its outcome is unknown."""


class DriverStopped(Exception):
    """The driver was stopped (or its log store failed) before the request finished."""


class _Waiter:
    __slots__ = ("event", "error", "term", "last", "index", "result")

    def __init__(self, term: int = 0, last: int = 0):
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.term, self.last, self.index = term, last, 0
        self.result = None

    def finish(self, error: BaseException | None = None) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class RaftDriver:
    """One member of a Raft group: the core, its log store, and a driver thread."""

    def __init__(self, node_id: str, voters, data_dir: str, *, send, apply, on_role=None,
                 restore=None, take_state=None, snapshot_every: int = 0, snapshot_bytes: int = 0,
                 join: bool = False, tick_s: float = DEFAULT_TICK_S, config: RaftConfig = DEFAULT_CONFIG,
                 rng=None, fsync=None):
        """``apply(index, record)`` applies a committed record; ``take_state()`` (driver thread)
        returns the state machine's JSON-able state for a checkpoint and ``restore(state)`` replaces
        it (None: no checkpoints are taken).  ``snapshot_every``/``snapshot_bytes``: take one after
        that many applied entries / appended log bytes (0 = never by that measure).  ``join``: a
        member with an empty data dir that waits to be added by the leader (no membership yet)."""
        self.id = node_id
        self.tick_s = tick_s
        self.data_dir = data_dir
        self._send = send
        self._apply = apply
        self._on_role = on_role
        self._restore = restore
        self._take_state = take_state
        self._snapshot_every = snapshot_every
        self._snapshot_bytes = snapshot_bytes
        self._fsync = fsync or os.fsync
        kwargs = {} if fsync is None else {"fsync": fsync}
        self.fresh = is_empty(data_dir)  # nothing on disk: a new group's member, or one that joins
        self.store = LogStore(data_dir, **kwargs)
        hard, entries = self.store.open()
        for name in (INCOMING_NAME, CHECKPOINT_NAME + ".tmp"):  # a transfer or checkpoint cut short
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(name))
        self._incoming_fd: int | None = None
        self._snap_fd: int | None = None   # the checkpoint pieces are read from (survives a rename over it)
        if os.path.exists(self._path(CHECKPOINT_NAME)):
            snapshot, state = read_checkpoint(self._path(CHECKPOINT_NAME))
            self._snap_fd = os.open(self._path(CHECKPOINT_NAME), os.O_RDONLY)
            if state is not None and restore is not None:
                restore(state)
        elif self.fresh and join:
            snapshot = SnapshotMeta()  # no membership: the leader adds us (as a learner first)
        else:  # a new group (bootstrap() writes it at start), or a log from before checkpoints existed
            snapshot = SnapshotMeta.initial(voters)
        self._snap_index = snapshot.index
        self.core = RaftCore(node_id, rng=rng or random.Random(), config=config, hard_state=hard,
                             snapshot=snapshot, entries=entries)
        self.applied = snapshot.index
        self._log_bytes = 0            # appended since the last checkpoint
        self._snapshotting = False     # a checkpoint is being written by the helper thread
        self._retry_after = 0          # after a failed checkpoint: not before this applied index
        self._peers_seen: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            with open(self._path(PEERS_NAME), "rb") as f:
                self._peers_seen = set(json.load(f).get("seen", []))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"raft-{node_id}", daemon=True)
        self._proposals: list[_Waiter] = []      # in index order
        self._reads: dict[int, _Waiter] = {}     # ctx -> waiter, before the core confirmed it
        self._confirmed: list[_Waiter] = []      # confirmed reads waiting for apply
        self._ctx = itertools.count(1)
        self._status: dict = self.core.status()
        self._status["applied"] = self.applied
        self._failed: BaseException | None = None
        # Peer id -> monotonic time its last message arrived (status "last contact"; the core has no clock).
        self._heard: dict[str, float] = {}

    def _path(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    def bootstrap(self) -> None:
        """First start of a new group: record the initial membership in a checkpoint at index 0.

        Before ``start``; a no-op unless the data dir was empty (and we do not join).
        """
        if not self.fresh or self.core.snapshot.membership.voters == frozenset() or self._snap_fd is not None:
            return
        snap = self.core.snapshot
        path = self._path(CHECKPOINT_NAME)
        atomic_write_json(path, {"format": CHECKPOINT_FORMAT, "index": 0, "term": 0,
                                 "membership": snap.membership.to_data(), "state": None}, fsync=self._fsync)
        self._snap_fd = os.open(path, os.O_RDONLY)
        logger.info("%s: new group of masters %s: initial membership written", self.id,
                    ", ".join(sorted(snap.membership.voters)))

    def seen_holding_log(self, member: str) -> bool:
        """Was ``member`` seen holding a log (it acknowledged or sent us entries)?  Thread-safe read."""
        return member in self._peers_seen

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self.store.close()
        for fd in (self._snap_fd, self._incoming_fd):
            if fd is not None:
                os.close(fd)
        self._snap_fd = self._incoming_fd = None

    # --- requests from other threads -------------------------------------------------------

    def step(self, msg) -> None:
        """A message from a peer (decoded with ``messages.from_wire``)."""
        self._inbox.put(("step", msg, None))
        self._wake.set()

    def propose(self, records: list[dict], timeout_s: float | None = None) -> int:
        """Commit ``records`` on a majority and apply them here; returns the last index.

        Raises NotLeader (nothing was proposed: safe to send elsewhere),
        LeadershipLost (the outcome is unknown), TimeoutError, DriverStopped.
        """
        waiter = _Waiter()
        self._inbox.put(("propose", list(records), waiter))
        self._wake.set()
        return self._wait(waiter, timeout_s)

    def read_barrier(self, timeout_s: float | None = None) -> int:
        """Return once a read served now reflects every write acknowledged before the call.

        Raises NotLeader, LeadershipLost, TimeoutError, DriverStopped.
        """
        waiter = _Waiter()
        self._inbox.put(("read", None, waiter))
        self._wake.set()
        return self._wait(waiter, timeout_s)

    def call(self, fn, timeout_s: float | None = None):
        """``fn()`` run on the driver thread between two Ready batches (nothing is applied meanwhile)."""
        waiter = _Waiter()
        self._inbox.put(("call", fn, waiter))
        self._wake.set()
        self._wait(waiter, timeout_s)
        return waiter.result

    def change_membership(self, op: str, node_id: str, timeout_s: float | None = None) -> int:
        """``add_learner``, ``promote`` or ``remove`` ``node_id`` through the log; returns the
        config entry's index (committed later).  Raises NotLeader, MembershipChangeRefused."""
        if op not in ("add_learner", "promote", "remove"):
            raise ValueError(op)
        return self.call(lambda: getattr(self.core, op)(node_id), timeout_s)

    def membership(self, timeout_s: float | None = None) -> Membership:
        """The latest configuration in this member's log."""
        return self.call(lambda: self.core.membership, timeout_s)

    def _wait(self, waiter: _Waiter, timeout_s: float | None) -> int:
        if not waiter.event.wait(timeout_s):
            raise TimeoutError("the Raft group did not confirm in time")
        if waiter.error is not None:
            raise waiter.error
        return waiter.index

    def status(self) -> dict:
        """The core's status as of the last Ready (role, term, leader, commit, applied, peers)."""
        return dict(self._status)

    def last_heard(self) -> dict[str, float]:
        """Peer id -> seconds since its last message arrived (peers not heard since start are absent)."""
        now = time.monotonic()
        return {peer: now - when for peer, when in list(self._heard.items())}

    @property
    def is_leader(self) -> bool:
        return self._status.get("role") == LEADER

    # --- the driver thread ---------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        try:
            while not self._stop.is_set():
                self._wake.wait(max(0.0, next_tick - time.monotonic()))
                self._wake.clear()
                now = time.monotonic()
                if now >= next_tick:
                    self.core.tick()
                    # Late by several ticks (a paused process): tick once, not in a burst.
                    next_tick = max(next_tick + self.tick_s, now)
                self._feed()
                while self.core.has_ready():
                    self._handle_ready()
        except BaseException as exc:  # a failed fsync or a bug: stop serving, fail every waiter
            self._failed = exc
            logger.exception("%s: raft driver stopped", self.id)
        finally:
            error = DriverStopped(f"raft driver stopped ({self._failed!r})" if self._failed else "stopped")
            self._fail_all(error)
            while True:
                try:
                    _, _, waiter = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if waiter is not None:
                    waiter.finish(error)

    def _feed(self) -> None:
        while True:
            try:
                kind, payload, waiter = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                if kind == "step":
                    self._heard[payload.src] = time.monotonic()
                    self.core.step(payload)
                    if payload.src not in self._peers_seen and held_log(payload):
                        self._remember_peer(payload.src)
                elif kind == "checkpoint":
                    self._checkpoint_written(*payload)
                elif kind == "call":
                    try:
                        waiter.result = payload()
                    except Exception as exc:
                        waiter.finish(exc)
                    waiter.finish()
                elif kind == "propose":
                    waiter.term, _, waiter.last = self.core.propose(payload)
                    self._proposals.append(waiter)
                else:
                    ctx = next(self._ctx)
                    self.core.read_index(ctx)
                    self._reads[ctx] = waiter
            except NotLeader as exc:
                waiter.finish(exc)
            except ValueError as exc:  # a message not for us, an empty proposal
                if waiter is not None:
                    waiter.finish(exc)
                else:
                    logger.warning("%s: dropped a raft message: %s", self.id, exc)

    def _handle_ready(self) -> None:
        core, store = self.core, self.store
        rd = core.ready()
        # 1. Durable before anything that depends on it is sent.
        if rd.hard_state is not None:
            store.save_hard_state(rd.hard_state)
        if rd.snapshot_pieces:
            self._write_pieces(rd.snapshot_pieces)
        installed = self._install(rd.snapshot) if rd.snapshot is not None else None
        if rd.truncate_from is not None:
            store.truncate_from(rd.truncate_from)
        if rd.compact_to is not None:
            before = store.first_index
            store.compact(rd.compact_to)
            if store.first_index > before:
                logger.info("%s: log compacted: entries before %d dropped (checkpoint at %d)", self.id,
                            store.first_index, self._snap_index)
        if rd.entries:
            self._log_bytes += store.append(rd.entries)
        # 2. Send.
        for msg in rd.messages:
            if isinstance(msg, InstallSnapshot):
                msg = self._fill_piece(msg)
                if msg is None:
                    continue
            try:
                self._send(msg)
            except Exception as exc:  # the network loses messages; Raft resends
                logger.debug("%s: sending %s to %s failed: %s", self.id, type(msg).__name__, msg.dst, exc)
        # 3. Apply.
        if rd.snapshot is not None:
            if self._restore is not None:
                self._restore(installed)
            self.applied = rd.snapshot.index
            self._log_bytes = 0
            while self._proposals and self._proposals[0].last <= self.applied:
                self._proposals.pop(0).finish(LeadershipLost("a newer leader's checkpoint replaced the log"))
        for entry in rd.committed:
            if entry.kind == DATA:
                self._apply(entry.index, entry.data)
            self.applied = entry.index
            while self._proposals and self._proposals[0].last <= entry.index:
                waiter = self._proposals.pop(0)
                if waiter.last == entry.index and waiter.term == entry.term:
                    waiter.index = entry.index
                    waiter.finish()
                else:  # another leader's entry took that place
                    waiter.finish(LeadershipLost("leadership changed before the records committed"))
        # 4. Answer.
        for rs in rd.read_states:
            waiter = self._reads.pop(rs.ctx, None)
            if waiter is not None:
                waiter.index = rs.index
                self._confirmed.append(waiter)
        for ctx in rd.failed_reads:
            waiter = self._reads.pop(ctx, None)
            if waiter is not None:
                waiter.finish(NotLeader(core.leader_id))
        still = []
        for waiter in self._confirmed:
            if waiter.index <= self.applied:
                waiter.finish()
            else:
                still.append(waiter)
        self._confirmed = still
        for note in rd.notes:
            logger.info("%s: %s", self.id, note)
        if rd.soft_state is not None:
            soft = rd.soft_state
            logger.info("%s: %s in term %d (leader %s)", self.id, soft.role, soft.term, soft.leader_id or "unknown")
            if soft.role != LEADER:
                self._fail_all(LeadershipLost(f"{self.id} is no longer the leader (term {soft.term})"))
            if self._on_role is not None:
                self._on_role(soft)
        core.advance(rd)
        self._status = core.status()
        self._status["applied"] = self.applied
        self._maybe_checkpoint()

    # --- checkpoints and snapshot transfer (driver thread) -------------------------------

    def _write_pieces(self, pieces) -> None:
        """Pieces of a snapshot a leader sends us, appended to checkpoint.incoming; one fsync."""
        for piece in pieces:
            if piece.offset == 0:
                if self._incoming_fd is not None:
                    os.close(self._incoming_fd)
                self._incoming_fd = os.open(self._path(INCOMING_NAME),
                                            os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            elif self._incoming_fd is None or os.fstat(self._incoming_fd).st_size != piece.offset:
                raise RuntimeError(f"snapshot piece at {piece.offset} does not follow the incoming file")
            _write_all(self._incoming_fd, piece.data)
        self._fsync(self._incoming_fd)

    def _install(self, meta: SnapshotMeta):
        """The last piece arrived: make checkpoint.incoming the checkpoint (atomic rename); return its state."""
        fd, self._incoming_fd = self._incoming_fd, None
        if fd is None:
            raise RuntimeError(f"snapshot {meta.index} installed without its pieces")
        os.close(fd)  # fsynced with its last piece
        path = self._path(CHECKPOINT_NAME)
        got, state = read_checkpoint(self._path(INCOMING_NAME))
        if (got.index, got.term, got.membership, got.size_bytes) != (meta.index, meta.term, meta.membership,
                                                                      meta.size_bytes):
            raise CheckpointCorrupt(f"received snapshot {got} does not match what the leader announced: {meta}")
        os.replace(self._path(INCOMING_NAME), path)
        fsync_dir(self.data_dir, self._fsync)
        self._use_checkpoint(meta.index)  # the core's note logs the installation
        return state

    def _use_checkpoint(self, index: int) -> None:
        fd = os.open(self._path(CHECKPOINT_NAME), os.O_RDONLY)
        if self._snap_fd is not None:
            os.close(self._snap_fd)
        self._snap_fd, self._snap_index = fd, index

    def _fill_piece(self, msg: InstallSnapshot) -> InstallSnapshot | None:
        """The bytes of one piece, read from the checkpoint file; None if that checkpoint is gone."""
        if msg.index != self._snap_index or self._snap_fd is None:
            return None  # a newer checkpoint replaced it: the core resends from that one
        return msg.with_data(os.pread(self._snap_fd, msg.length, msg.offset))

    def _maybe_checkpoint(self) -> None:
        if self._take_state is None or self._snapshotting:
            return
        due_entries = self._snapshot_every and self.applied - self._snap_index >= self._snapshot_every
        due_bytes = self._snapshot_bytes and self._log_bytes >= self._snapshot_bytes
        if not (due_entries or due_bytes) or self.applied <= max(self._snap_index, self._retry_after):
            return
        index = self.applied
        term, membership = self.core.term_at(index), self.core.membership_at(index)
        state = self._take_state()  # with nothing applied meanwhile: the state at exactly ``index``
        self._snapshotting = True
        threading.Thread(target=self._write_checkpoint, args=(index, term, membership, state),
                         name=f"raft-checkpoint-{self.id}", daemon=True).start()

    def _write_checkpoint(self, index: int, term: int, membership: Membership, state) -> None:
        """Helper thread: serialize and fsync the checkpoint to a temporary file (the slow part)."""
        tmp = self._path(CHECKPOINT_NAME + ".tmp")
        try:
            data = _checkpoint_bytes(index, term, membership, state)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            try:
                _write_all(fd, data)
                self._fsync(fd)
            finally:
                os.close(fd)
        except Exception:
            logger.exception("%s: writing the checkpoint at %d failed; the log is kept", self.id, index)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._inbox.put(("checkpoint", (index, None), None))
        else:
            self._inbox.put(("checkpoint", (index, len(data)), None))
        self._wake.set()

    def _checkpoint_written(self, index: int, size: int | None) -> None:
        """Driver thread: put the written checkpoint in place and let the core compact the log."""
        self._snapshotting = False
        tmp = self._path(CHECKPOINT_NAME + ".tmp")
        if size is None:  # try again after another interval (a full disk must not make us spin)
            self._log_bytes, self._retry_after = 0, self.applied + (self._snapshot_every or 1000)
            return
        if index <= self._snap_index:  # a leader's snapshot, newer, was installed meanwhile
            os.unlink(tmp)
            return
        os.replace(tmp, self._path(CHECKPOINT_NAME))
        fsync_dir(self.data_dir, self._fsync)
        self._use_checkpoint(index)
        self._log_bytes = 0
        self.core.compact(index, size)
        logger.info("%s: snapshot taken at index %d (term %d, %d bytes)", self.id, index, self.core.snapshot.term,
                    size)

    def _remember_peer(self, peer: str) -> None:
        self._peers_seen = self._peers_seen | {peer}
        try:
            atomic_write_json(self._path(PEERS_NAME), {"seen": sorted(self._peers_seen)}, fsync=self._fsync)
        except OSError as exc:  # only a safety net for wiped masters: not worth stopping for
            logger.warning("%s: cannot record peer %s: %s", self.id, peer, exc)

    def _fail_all(self, error: BaseException) -> None:
        for waiter in self._proposals + list(self._reads.values()) + self._confirmed:
            waiter.finish(error)
        self._proposals, self._reads, self._confirmed = [], {}, []
