"""A master's place in a replicated group: the metadata log as a Raft log (issue 12).

Job
---
With ``[cluster] masters`` listing three (or five) masters, each master
runs a ``meta.driver.RaftDriver``; ``ReplicatedLog`` stands in for
``metadata_log.MetadataLog`` (same ``open``/``commit``/``close``), so the
master's code is unchanged: ``commit(records)`` proposes them and returns
once they are committed on a majority (fsynced there) and applied to this
master's Namespace.  Records proposed by many threads between two Raft
Ready batches share one append and one fsync on every master (group commit).

Only the leader serves (``before_request``): every client and node request
to a follower is answered ``NOT_LEADER`` with the leader's address when
known, before anything is done, so it may be re-sent (master_link.py).
Reads on the leader (list, stat, download, status, ...) first pass a read
index barrier (``RaftDriver.read_barrier``): a majority confirms the
leadership and the read waits until everything committed before it is
applied, so it never returns a namespace older than an acknowledged write.
A write request passes one barrier per term, so a new leader has applied
every earlier commit before it checks a writer's preconditions.

Leader services: a master that becomes leader restarts its safe-mode grace
(repair and deletion wait for the nodes to report to it, as after a
restart); one that stops leading forgets its node table, so its repair and
placement have no node to act on, and nodes re-register with the new leader
by themselves.  The Raft term is each master's fencing epoch (``term``).

Raft messages travel between masters as ``RAFT`` frames on ordinary
connections (handshake and shared-secret authentication as any other
connection; no reply), one sender thread per peer.  Member ids are the
masters' ``HOST:PORT`` as listed, so a NOT_LEADER hint is the leader's id.

Left out: checkpoints of the replicated log (the whole Raft log is kept and
replayed at start-up), snapshot transfer, membership changes
(``masters replace``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import config as config_module
import protocol
import transport
from meta.driver import DriverStopped, LeadershipLost, RaftDriver
from meta.messages import LEADER, BadRaftMessage, from_wire, to_wire
from meta.raft import NotLeader, RaftConfig

logger = logging.getLogger("replication")

TICK_S = 0.05  # one Raft tick; [raft] heartbeat_ms and election_ms are whole ticks of this
# Messages queued for one peer beyond this are dropped (Raft resends): a hung
# peer must not make the leader hold an unbounded backlog.
MAX_QUEUED = 4096
# Requests that read the namespace: served after a read-index barrier.
READ_OPS = frozenset({"DOWNLOAD", "STAT", "LIST", "STATUS", "VERSIONS", "LOCKS", "TRASH",
                      "SNAPSHOTS", "SNAPSHOT_MEMBERS"})
RAFT_DIR = "raft"


def member_id(address: tuple[str, int]) -> str:
    return transport.format_address(address)


def group_of(config: config_module.Config) -> list[str] | None:
    """The member ids of the group this master belongs to, or None for a single master.

    Raises ValueError when ``[cluster] masters`` lists several masters and
    none is this one's ``host:port``.
    """
    if not config.masters:
        return None
    members = [member_id(a) for a in config_module.parse_addresses(config.masters, "masters")]
    if len(members) == 1:
        return None
    own = member_id((config.master_host, config.master_port))
    if own not in members:
        raise ValueError(f"this master ({own}) is not in [cluster] masters ({', '.join(members)}); "
                         f"give --host/--port of one of them")
    return members


def raft_config(config: config_module.Config) -> RaftConfig:
    heartbeat = max(1, round(config.raft_heartbeat_ms / 1000 / TICK_S))
    election = max(heartbeat + 1, round(config.raft_election_ms / 1000 / TICK_S))
    return RaftConfig(election_ticks=election, heartbeat_ticks=heartbeat)


class _PeerSender:
    """Sends Raft messages to one peer on a connection of its own; drops them while it is unreachable."""

    def __init__(self, own: str, peer: str, config: config_module.Config, security):
        self.own, self.peer = own, peer
        self.address = config_module.parse_address(peer, "masters")
        self.config, self.security = config, security
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"raft-send-{peer}", daemon=True)
        self._thread.start()

    def put(self, msg) -> None:
        if self._queued >= MAX_QUEUED:
            return
        self._queued += 1
        self._queue.put(msg)

    def stop(self) -> None:
        self._stop = True
        self._queue.put(None)

    def _run(self) -> None:
        conn = None
        down_since = None
        while not self._stop:
            msg = self._queue.get()
            batch = [msg]
            while True:  # everything queued goes out in one flush
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._queued -= len(batch)
            batch = [m for m in batch if m is not None]
            if self._stop or not batch:
                continue
            try:
                if conn is None:
                    conn = transport.Connection(self.address, "master", self.config.io_timeout_s, self.security,
                                                handshake_timeout_s=min(self.config.io_timeout_s, 1.0),
                                                expect_server_id="master")
                    if down_since is not None:
                        logger.info("%s: peer %s reachable again", self.own, self.peer)
                        down_since = None
                for m in batch:
                    header, body = to_wire(m)
                    conn.send(protocol.RaftMessage(msg=header, body=body), flush=False)
                conn.flush()
            except protocol.BackupError as exc:
                if conn is not None:
                    conn.close()
                    conn = None
                if down_since is None:
                    down_since = time.monotonic()
                    logger.info("%s: peer %s unreachable: %s", self.own, self.peer, exc)
                time.sleep(0.05)  # a dead peer: do not spin on refused connections
        if conn is not None:
            conn.close()


class ReplicatedLog:
    """The metadata log replicated by Raft; MetadataLog's interface for the master."""

    def __init__(self, master, config: config_module.Config, data_dir: str, members: list[str], security):
        self.master = master
        self.config = config
        self.id = member_id((config.master_host, config.master_port))
        self.members = members
        self.term = 0
        self.leader: str | None = None
        self._barrier_term = -1
        # The term whose leader has committed its epoch record (the fencing epoch nodes check):
        # this master serves as leader only once it equals self.term.
        self._epoch_term = -1
        self._epoch_cond = threading.Condition()
        self._senders = {p: _PeerSender(self.id, p, config, security) for p in members if p != self.id}
        self.driver = RaftDriver(self.id, members, os.path.join(data_dir, RAFT_DIR), send=self._send,
                                 apply=self._apply, on_role=self._on_role, tick_s=TICK_S,
                                 config=raft_config(config))

    # --- MetadataLog's interface -----------------------------------------------------------
    def open(self) -> None:
        """Nothing: the driver starts with the master's services (``start``)."""

    def start(self) -> None:
        self.driver.start()
        logger.info("%s: member of masters %s", self.id, ", ".join(self.members))

    def close(self) -> None:
        self.driver.stop()
        for sender in self._senders.values():
            sender.stop()

    @property
    def index(self) -> int:
        return self.driver.applied

    def snapshot(self) -> tuple[int, dict]:
        """(applied index, namespace snapshot), taken on the driver thread so no record applies meanwhile."""
        return self.driver.call(lambda: (self.driver.applied, self.master.namespace.snapshot()),
                                timeout_s=self.config.io_timeout_s)

    def commit(self, records: list[dict]) -> int:
        """Commit on a majority and apply here; raises NotLeader (nothing done) or Unavailable (unknown)."""
        if not records:
            return self.driver.applied
        try:
            return self.driver.propose(records, timeout_s=self.config.io_timeout_s)
        except NotLeader as exc:
            raise protocol.NotLeader(f"master {self.id} is not the leader", exc.leader_id or "") from None
        except LeadershipLost as exc:
            raise protocol.Unavailable(f"{exc}; the change may or may not have been made") from None
        except TimeoutError:
            raise protocol.Timeout("no majority of masters confirmed the change in time; it may or may not "
                                   "have been made") from None
        except DriverStopped as exc:
            raise protocol.Unavailable(str(exc)) from None

    # --- requests ----------------------------------------------------------------------------
    def step(self, header: dict, body: bytes) -> None:
        try:
            msg = from_wire(header, body)
        except BadRaftMessage as exc:
            raise protocol.RemoteProtocolError(f"bad RAFT message: {exc}") from None
        if msg.src not in self.members or msg.dst != self.id:
            raise protocol.RemoteProtocolError(f"RAFT message from {msg.src!r} to {msg.dst!r}: not of this group")
        self.driver.step(msg)

    def before_request(self, msg: protocol.Message) -> None:
        """Followers refuse with NOT_LEADER; the leader passes reads (and a term's first write) through a
        read-index barrier."""
        if isinstance(msg, protocol.RaftMessage):
            return
        if not self.driver.is_leader:
            raise protocol.NotLeader(f"master {self.id} is not the leader", self.leader or "")
        term = self.term
        with self._epoch_cond:
            if not self._epoch_cond.wait_for(lambda: self._epoch_term == self.term or self.term != term,
                                             self.config.io_timeout_s):
                raise protocol.Timeout("the new leader could not commit its epoch in time")
            if self._epoch_term != term:
                raise protocol.NotLeader(f"master {self.id} lost the leadership", "")
        if msg.OP in READ_OPS or self._barrier_term != term:
            try:
                self.driver.read_barrier(timeout_s=self.config.io_timeout_s)
            except NotLeader as exc:
                raise protocol.NotLeader(f"master {self.id} is not the leader", exc.leader_id or "") from None
            except LeadershipLost:
                raise protocol.NotLeader(f"master {self.id} lost the leadership", "") from None
            except TimeoutError:
                raise protocol.Timeout("no majority of masters confirmed the leadership in time") from None
            except DriverStopped as exc:
                raise protocol.Unavailable(str(exc)) from None
            self._barrier_term = term

    def status(self) -> list[dict]:
        """The masters as this one sees them (the leader knows each follower's match index)."""
        st = self.driver.status()
        rows = [{"address": self.id, "role": st["role"], "term": st["term"], "commit": st["commit"],
                 "applied": st["applied"], "leader": st["leader"] or ""}]
        for peer, progress in st.get("peers", {}).items():
            rows.append({"address": peer, "role": "follower" if st["role"] == LEADER else "?",
                         "term": st["term"], "match": progress["match"], "leader": st["leader"] or ""})
        return rows

    def _begin_term(self, term: int) -> None:
        """Commit a new epoch for this leadership (master._begin_epoch): nodes then refuse every older
        master, a deposed leader included.  Requests wait for it (before_request)."""
        try:
            # Applied up to every earlier leader's commits first, so the new epoch exceeds theirs.
            self.driver.read_barrier(timeout_s=self.config.io_timeout_s)
            self.master._begin_epoch()
        except (protocol.BackupError, NotLeader, LeadershipLost, TimeoutError, DriverStopped) as exc:
            logger.info("%s: could not begin term %d: %s", self.id, term, exc)
            return
        with self._epoch_cond:
            self._epoch_term = term
            self._epoch_cond.notify_all()

    # --- driver callbacks (driver thread) -----------------------------------------------------
    def _send(self, msg) -> None:
        sender = self._senders.get(msg.dst)
        if sender is not None:
            sender.put(msg)

    def _apply(self, index: int, record: dict) -> None:
        self.master.namespace.apply({**record, "i": index})

    def _on_role(self, soft) -> None:
        was_leader = self.leader == self.id
        self.term, self.leader = soft.term, soft.leader_id
        if soft.role == LEADER and not was_leader:
            logger.info("%s: leading in term %d; safe mode for %g s while nodes report", self.id, soft.term,
                        self.config.safe_mode_s)
            self.master.become_leader()
            # The epoch record needs a commit, which needs this (driver) thread: commit it from another.
            threading.Thread(target=self._begin_term, args=(soft.term,), name="raft-epoch", daemon=True).start()
        elif soft.role != LEADER and was_leader:
            logger.info("%s: no longer leading (term %d, leader %s)", self.id, soft.term,
                        soft.leader_id or "unknown")
            self.master.stop_leading()
