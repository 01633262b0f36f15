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

Checkpoints: the driver checkpoints the Namespace (``namespace.snapshot()``)
after ``[raft] snapshot_every`` applied records or ``snapshot_log_mb`` of log,
compacts the log behind it and streams it to a follower that needs compacted
entries (meta/driver.py; pieces of ``snapshot_piece_kb``).  Start-up =
checkpoint + the log after it.

Membership: the log's (CONFIG entries and the checkpoint) wins over
``[cluster] masters``, which only names seeds: where to look for the group.
A master whose Raft dir is empty asks its peers first (``RAFT_PROBE``,
``_check_peers``): if one saw it holding a log, it lost its state and refuses
to start (``refused``; master.py exits with EXIT_LOST_STATE) unless it starts
with ``--join`` under an address that is no voter; with ``--join`` it starts
with no membership and waits to be added (``masters replace``, which adds it
as a learner, promotes it once caught up, then removes the old master).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time

import config as config_module
import protocol
import transport
from meta.driver import DriverStopped, LeadershipLost, RaftDriver, is_empty
from meta.messages import LEADER, BadRaftMessage, InstallSnapshot, from_wire, to_wire
from meta.raft import MembershipChangeRefused, NotLeader, RaftConfig

logger = logging.getLogger("replication")

TICK_S = 0.05  # one Raft tick; [raft] heartbeat_ms and election_ms are whole ticks of this
# Messages queued for one peer beyond this are dropped (Raft resends): a hung
# peer must not make the leader hold an unbounded backlog.
MAX_QUEUED = 4096
# Snapshot pieces queued for one peer beyond this are dropped (the core resends
# the piece on its next heartbeat): memory for a transfer stays a few pieces.
MAX_QUEUED_PIECES = 2
# A master with an empty Raft dir asks its peers every this often until a
# majority answered (replication.ReplicatedLog._check_peers).
PROBE_RETRY_S = 0.2
# Requests that read the namespace: served after a read-index barrier.
READ_OPS = frozenset({"DOWNLOAD", "READ_PLANS", "STAT", "LIST", "STATUS", "VERSIONS", "LOCKS", "TRASH",
                      "SNAPSHOTS", "SNAPSHOT_MEMBERS"})
RAFT_DIR = "raft"


def member_id(address: tuple[str, int]) -> str:
    return transport.format_address(address)


def group_of(config: config_module.Config, data_dir: str | None = None, join: bool = False) -> list[str] | None:
    """The seed member ids of the group this master belongs to, or None for a single master.

    A master not listed in ``[cluster] masters`` belongs to the group when it
    joins (``join``) or already holds Raft state in ``data_dir`` (it was
    added by ``masters replace``); the list then names the seeds.  Raises
    ValueError otherwise, when the list has several masters.
    """
    if not config.masters:
        if join:
            raise ValueError("--join needs [cluster] masters (or --masters): the group to join")
        return None
    members = [member_id(a) for a in config_module.parse_addresses(config.masters, "masters")]
    own = member_id((config.master_host, config.master_port))
    holds_state = data_dir is not None and not raft_dir_empty(data_dir)
    if len(members) == 1 and members[0] == own and not holds_state:
        return None
    if own not in members and not (join or holds_state):
        raise ValueError(f"this master ({own}) is not in [cluster] masters ({', '.join(members)}); "
                         f"give --host/--port of one of them, or --join to join the group as a new master")
    return members


def raft_dir_empty(data_dir: str) -> bool:
    return is_empty(os.path.join(data_dir, RAFT_DIR))


def raft_config(config: config_module.Config) -> RaftConfig:
    heartbeat = max(1, round(config.raft_heartbeat_ms / 1000 / TICK_S))
    election = max(heartbeat + 1, round(config.raft_election_ms / 1000 / TICK_S))
    return RaftConfig(election_ticks=election, heartbeat_ticks=heartbeat,
                      snapshot_piece_bytes=config.raft_snapshot_piece_kb * 1024,
                      trailing_entries=config.raft_snapshot_trailing)


class _PeerSender:
    """Sends Raft messages to one peer on a connection of its own; drops them while it is unreachable."""

    def __init__(self, own: str, peer: str, config: config_module.Config, security):
        self.own, self.peer = own, peer
        self.address = (config_module.parse_dial(config.raft_dial).get(peer)
                        or config_module.parse_address(peer, "masters"))
        self.config, self.security = config, security
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0
        self._pieces = 0  # InstallSnapshot pieces among them
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"raft-send-{peer}", daemon=True)
        self._thread.start()

    def put(self, msg) -> None:
        piece = isinstance(msg, InstallSnapshot)
        if self._queued >= MAX_QUEUED or (piece and self._pieces >= MAX_QUEUED_PIECES):
            return
        self._queued += 1
        self._pieces += piece
        self._queue.put(msg)

    def stop(self) -> None:
        self._stop = True
        self._queue.put(None)

    def _send_batch(self, conn, batch):
        """Send ``batch`` on ``conn`` (a new connection when None); returns the connection."""
        if conn is None:
            conn = transport.Connection(self.address, "master", self.config.io_timeout_s, self.security,
                                        handshake_timeout_s=min(self.config.io_timeout_s, 1.0),
                                        expect_server_id="master")
        try:
            for m in batch:
                conn.send(raft_frame(m), flush=False)
            conn.flush()
        except protocol.BackupError:
            conn.close()
            raise
        return conn

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
            self._pieces -= sum(isinstance(m, InstallSnapshot) for m in batch)
            batch = [m for m in batch if m is not None]
            if self._stop or not batch:
                continue
            try:
                try:
                    conn = self._send_batch(conn, batch)
                except protocol.BackupError:
                    if conn is None:
                        raise
                    # A connection opened earlier: the peer may have restarted since (it was killed), and
                    # the first write to the old connection fails.  Send again on a new one at once: a
                    # lost (pre-)vote is not resent before the next election timeout, a whole second.
                    conn.close()
                    conn = self._send_batch(None, batch)
                if down_since is not None:
                    logger.info("%s: peer %s reachable again", self.own, self.peer)
                    down_since = None
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

    def __init__(self, master, config: config_module.Config, data_dir: str, members: list[str], security,
                 join: bool = False):
        self.master = master
        self.config = config
        self.security = security
        self.id = member_id((config.master_host, config.master_port))
        self.members = members  # the seeds from [cluster] masters; the log's membership wins
        self.join = join
        # Why this master refused to take part (its state is lost); master.py exits with it.
        self.refused: str | None = None
        self.on_refused = None
        self._closing = threading.Event()
        self.term = 0
        self.leader: str | None = None
        self._barrier_term = -1
        # The term whose leader has committed its epoch record (the fencing epoch nodes check):
        # this master serves as leader only once it equals self.term.
        self._epoch_term = -1
        self._epoch_cond = threading.Condition()
        self._senders_lock = threading.Lock()
        self._senders = {p: _PeerSender(self.id, p, config, security) for p in members if p != self.id}
        namespace = master.namespace
        self.driver = RaftDriver(self.id, members, os.path.join(data_dir, RAFT_DIR), send=self._send,
                                 apply=self._apply, on_role=self._on_role, take_state=namespace.snapshot,
                                 restore=namespace.restore, snapshot_every=config.raft_snapshot_every,
                                 snapshot_bytes=config.raft_snapshot_log_mb << 20, join=join,
                                 tick_s=TICK_S, config=raft_config(config))

    # --- MetadataLog's interface -----------------------------------------------------------
    def open(self) -> None:
        """Nothing: the driver starts with the master's services (``start``)."""

    def start(self) -> None:
        if self.driver.fresh:  # an empty Raft dir: make sure we lost nothing before we take part
            threading.Thread(target=self._check_peers, name="raft-probe", daemon=True).start()
            return
        self._start_driver()

    def _start_driver(self) -> None:
        self.driver.bootstrap()
        self.driver.start()
        m = self.driver.core.membership
        logger.info("%s: member of masters: voters %s, learners %s%s", self.id, ", ".join(sorted(m.voters)) or "-",
                    ", ".join(sorted(m.learners)) or "-", " (joining: waiting to be added)" if not m.members else "")

    def close(self) -> None:
        self._closing.set()
        self.driver.stop()
        with self._senders_lock:
            senders = list(self._senders.values())
        for sender in senders:
            sender.stop()

    # --- an empty data dir ------------------------------------------------------------------
    def _probe(self, peer: str) -> protocol.RaftProbeReply | None:
        try:
            conn = transport.Connection(config_module.parse_address(peer, "masters"), "master",
                                        min(self.config.io_timeout_s, 2.0), self.security,
                                        handshake_timeout_s=min(self.config.io_timeout_s, 1.0),
                                        expect_server_id="master")
        except protocol.BackupError:
            return None
        try:
            return conn.request(protocol.RaftProbe(member=self.id), protocol.RaftProbeReply)
        except protocol.BackupError:
            return None
        finally:
            conn.close()

    def _check_peers(self) -> None:
        """An empty Raft dir: ask the seeds until a majority of them (us included) answered.

        Refuse (``refused``) if a peer saw us holding a log (we lost state we
        may have voted or acknowledged with), or, joining, if we are still a
        voter.  A new group's masters start together: none saw another's log yet.
        """
        peers = [p for p in self.members if p != self.id]
        answered: set[str] = set()
        need = len(self.members) // 2 + 1 - (self.id in self.members)
        waiting_logged = False
        while not self._closing.is_set():
            for peer in peers:
                if peer in answered:
                    continue
                reply = self._probe(peer)
                if reply is None:
                    continue
                answered.add(peer)
                if reply.seen and not self.join:
                    return self._refuse(f"master {peer} saw this master ({self.id}) holding a Raft log, but its data "
                                        f"dir is empty: its state is lost and it must not vote with it; start it "
                                        f"on a new address with --join and run `client.py masters replace "
                                        f"{self.id} NEW_ADDRESS`")
                if self.join and self.id in reply.voters:
                    return self._refuse(f"this master ({self.id}) is still a voter of the group (per {peer}); a "
                                        f"master that lost its data cannot rejoin under the same address: start it "
                                        f"on a new address with --join and run `client.py masters replace "
                                        f"{self.id} NEW_ADDRESS`")
                if not self.join and reply.voters and self.id not in reply.voters + reply.learners:
                    return self._refuse(f"this master ({self.id}) is not a member of the group (per {peer}: "
                                        f"voters {', '.join(reply.voters)}); start it with --join")
            if (self.join and answered) or len(answered) >= need:
                logger.info("%s: empty data dir; %d master(s) answered (%s): %s", self.id, len(answered),
                            ", ".join(sorted(answered)) or "none needed",
                            "joining as a new master" if self.join else "starting as a member of a new group")
                self._start_driver()
                return
            if not waiting_logged:
                logger.info("%s: empty data dir; waiting for %s of the masters %s to answer before taking part",
                            self.id, "one" if self.join else f"{need} other", ", ".join(peers))
                waiting_logged = True
            self._closing.wait(PROBE_RETRY_S)

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        logger.error("%s: refusing to start: %s", self.id, reason)
        if self.on_refused is not None:
            self.on_refused()

    def probe_reply(self, member: str) -> protocol.RaftProbeReply:
        st = self.driver.status()  # the membership as of the last Ready
        return protocol.RaftProbeReply(seen=self.driver.seen_holding_log(member), voters=st["voters"],
                                       learners=st["learners"], leader=self.leader or "")

    # --- membership --------------------------------------------------------------------------
    def replace(self, old: str, new: str) -> protocol.MastersReplaced:
        """``masters replace``: add ``new`` as a learner, promote it once caught up, remove ``old``.

        One change at a time, each committed before the next; converges from
        whatever step a previous attempt reached.  Leader only.
        """
        for address in (old, new):
            try:
                config_module.parse_address(address, "master")
            except ValueError as exc:
                raise protocol.RemoteProtocolError(str(exc)) from None
        if old == new:
            raise protocol.RemoteProtocolError("OLD and NEW are the same master")
        deadline = time.monotonic() + max(self.config.failover_timeout_s, 6 * self.config.io_timeout_s)
        last_refusal = ""
        while True:
            try:
                m = self.driver.membership(timeout_s=self.config.io_timeout_s)
                if new not in m.members:
                    if old not in m.voters:
                        raise protocol.RemoteProtocolError(f"{old} is not a voter of this group "
                                                  f"(voters: {', '.join(sorted(m.voters))})")
                    step = ("add_learner", new)
                elif new in m.learners:
                    step = ("promote", new)
                elif old in m.members:
                    step = ("remove", old)
                else:
                    logger.info("%s: masters replace %s -> %s done: voters %s", self.id, old, new,
                                ", ".join(sorted(m.voters)))
                    return protocol.MastersReplaced(voters=sorted(m.voters), learners=sorted(m.learners))
                index = self.driver.change_membership(*step, timeout_s=self.config.io_timeout_s)
                logger.debug("%s: masters replace %s -> %s: %s %s proposed at index %d", self.id, old, new,
                             step[0], step[1], index)
                while self.driver.status()["commit"] < index:
                    if time.monotonic() > deadline or not self.driver.is_leader:
                        raise protocol.Unavailable(f"{step[0]} {step[1]} at index {index} did not commit in time; "
                                                   f"run the command again")
                    time.sleep(0.05)
                if step[0] == "remove" and step[1] == self.id:  # we stepped down: report what we committed
                    logger.info("%s: masters replace %s -> %s done (this master left the group)", self.id, old, new)
                    return protocol.MastersReplaced(voters=sorted(m.voters - {old} | {new}),
                                                    learners=sorted(m.learners - {new}))
            except NotLeader as exc:
                raise protocol.NotLeader(f"master {self.id} is not the leader", exc.leader_id or "") from None
            except MembershipChangeRefused as exc:  # a change in progress, or the learner not caught up yet
                last_refusal = str(exc)
                if time.monotonic() > deadline:
                    raise protocol.Unavailable(f"membership change refused: {last_refusal}; run the command "
                                               f"again (is {new} running with --join?)") from None
                time.sleep(0.1)
            except (TimeoutError, DriverStopped, LeadershipLost) as exc:
                raise protocol.Unavailable(f"membership change interrupted: {exc}; run the command again") from None

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
            msg = raft_message(header, body)
        except BadRaftMessage as exc:
            raise protocol.RemoteProtocolError(f"bad RAFT message: {exc}") from None
        # Any sender (the connection is authenticated): a member added by ``masters replace`` is in no
        # seed list, and a joining master knows no member yet.  The core ignores non-members' votes.
        if msg.dst != self.id:
            raise protocol.RemoteProtocolError(f"RAFT message from {msg.src!r} to {msg.dst!r}: not for this master")
        try:
            config_module.parse_address(msg.src, "masters")
        except ValueError:
            raise protocol.RemoteProtocolError(f"RAFT message from {msg.src!r}: not a master address") from None
        self.driver.step(msg)

    def before_request(self, msg: protocol.Message) -> None:
        """Followers refuse with NOT_LEADER; the leader passes reads (and a term's first write) through a
        read-index barrier."""
        if isinstance(msg, (protocol.RaftMessage, protocol.RaftProbe, protocol.MasterStatus)):
            return  # between masters, or about this master itself: every master answers
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

    def own_status(self) -> dict:
        """This master as it sees itself (MASTER_STATUS): role, term, commit and applied index, leader,
        and ``last_contact_s``: seconds since it last heard from its leader (0 for the leader itself;
        None when it knows no leader or has not heard from it since it started)."""
        st = self.driver.status()
        leader = st["leader"] or ""
        if st["role"] == LEADER:
            contact = 0.0
        else:
            heard = self.driver.last_heard().get(leader) if leader else None
            contact = None if heard is None else round(heard, 3)
        return {"address": self.id, "role": st["role"], "term": st["term"], "commit": st["commit"],
                "applied": st["applied"], "leader": leader, "last_contact_s": contact}

    def status(self) -> list[dict]:
        """The masters as this one sees them: its own row, then each peer with ``last_contact_s``
        (seconds since a message from it arrived, None = not since this master started) and, on the
        leader, ``match`` (the last index the leader knows it holds)."""
        st = self.driver.status()
        heard = self.driver.last_heard()
        rows = [self.own_status()]
        peers = st.get("peers", {})
        learners = set(st.get("learners", ()))
        # The log's membership (masters replace changes it), else the seeds of [cluster] masters.
        members = list(st.get("voters") or self.members) + sorted(learners)
        for peer in members:
            if peer == self.id:
                continue
            contact = heard.get(peer)
            role = "learner" if peer in learners else "follower" if st["role"] == LEADER else "?"
            row = {"address": peer, "role": role, "term": st["term"], "leader": st["leader"] or "",
                   "last_contact_s": None if contact is None else round(contact, 3)}
            if peer in peers:
                row["match"] = peers[peer]["match"]
            rows.append(row)
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
        if sender is None:  # a member the log added (masters replace)
            with self._senders_lock:
                sender = self._senders.get(msg.dst)
                if sender is None:
                    sender = self._senders[msg.dst] = _PeerSender(self.id, msg.dst, self.config, self.security)
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


# Where a RAFT frame carries an AppendEntries' entries: its body, not its header.  A frame's JSON
# header is bounded (protocol.MAX_HEADER_BYTES, 256 KiB, checked before anything is
# authenticated), and one log entry can be larger than that (the commit of a fragmented file
# lists every run), so entries in the header could block a follower for ever: every send of
# that entry refused.  The body is bounded by protocol.MAX_BODY_BYTES (16 MiB).
ENTRIES_IN_BODY = "body"


def raft_frame(msg) -> protocol.RaftMessage:
    """The RAFT frame carrying a core message (meta.messages.to_wire, entries moved to the body)."""
    header, body = to_wire(msg)
    if header.get("entries"):
        body = json.dumps(header["entries"], separators=(",", ":")).encode("utf-8")
        header["entries"] = ENTRIES_IN_BODY
    return protocol.RaftMessage(msg=header, body=body)


def raft_message(header: dict, body: bytes):
    """The core message of a RAFT frame's header and body; raises BadRaftMessage when malformed."""
    if isinstance(header, dict) and header.get("entries") == ENTRIES_IN_BODY:
        try:
            entries = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRaftMessage("AppendEntries: body is not a JSON list of entries") from None
        header, body = dict(header, entries=entries), b""
    return from_wire(header, body)

