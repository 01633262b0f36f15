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

Left out in this round (the core supports them; the driver does not yet):
snapshots and log compaction (the whole log is kept and replayed into the
state machine at start-up; an ``InstallSnapshot`` is never produced because
nothing is compacted), and membership changes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time

from .log_store import LogStore
from .messages import DATA, LEADER, InstallSnapshot, SnapshotMeta
from .raft import NotLeader, RaftConfig, RaftCore

logger = logging.getLogger("raft")

# One tick of the core in seconds; heartbeat every 3 ticks (150 ms) and an
# election timeout of 20-40 ticks (1-2 s): the defaults of issue 12.
DEFAULT_TICK_S = 0.05
DEFAULT_CONFIG = RaftConfig(election_ticks=20, heartbeat_ticks=3)


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
                 tick_s: float = DEFAULT_TICK_S, config: RaftConfig = DEFAULT_CONFIG,
                 rng=None, fsync=None):
        self.id = node_id
        self.tick_s = tick_s
        self._send = send
        self._apply = apply
        self._on_role = on_role
        kwargs = {} if fsync is None else {"fsync": fsync}
        self.store = LogStore(data_dir, **kwargs)
        hard, entries = self.store.open()
        self.core = RaftCore(node_id, rng=rng or random.Random(), config=config, hard_state=hard,
                             snapshot=SnapshotMeta.initial(voters), entries=entries)
        self.applied = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"raft-{node_id}", daemon=True)
        self._proposals: list[_Waiter] = []      # in index order
        self._reads: dict[int, _Waiter] = {}     # ctx -> waiter, before the core confirmed it
        self._confirmed: list[_Waiter] = []      # confirmed reads waiting for apply
        self._ctx = itertools.count(1)
        self._status: dict = self.core.status()
        self._failed: BaseException | None = None

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self.store.close()

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

    def _wait(self, waiter: _Waiter, timeout_s: float | None) -> int:
        if not waiter.event.wait(timeout_s):
            raise TimeoutError("the Raft group did not confirm in time")
        if waiter.error is not None:
            raise waiter.error
        return waiter.index

    def status(self) -> dict:
        """The core's status as of the last Ready (role, term, leader, commit, applied, peers)."""
        return dict(self._status)

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
                    self.core.step(payload)
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
        if rd.snapshot_pieces or rd.snapshot is not None:
            raise RuntimeError("snapshot transfer is not supported by this driver yet")
        if rd.truncate_from is not None:
            store.truncate_from(rd.truncate_from)
        if rd.compact_to is not None:
            store.compact(rd.compact_to)
        if rd.entries:
            store.append(rd.entries)
        # 2. Send.
        for msg in rd.messages:
            if isinstance(msg, InstallSnapshot):
                continue  # never produced: nothing is compacted (see the module docstring)
            try:
                self._send(msg)
            except Exception as exc:  # the network loses messages; Raft resends
                logger.debug("%s: sending %s to %s failed: %s", self.id, type(msg).__name__, msg.dst, exc)
        # 3. Apply.
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

    def _fail_all(self, error: BaseException) -> None:
        for waiter in self._proposals + list(self._reads.values()) + self._confirmed:
            waiter.finish(error)
        self._proposals, self._reads, self._confirmed = [], {}, []
