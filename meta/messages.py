"""Values the Raft core exchanges: log entries, membership, peer messages, Ready batches.

Pure data, like ``protocol.py``: frozen dataclasses, no I/O.  ``to_wire`` and
``from_wire`` turn a peer message into a JSON-able header dict plus a binary
body (snapshot bytes) and back, so the master can carry them in its ordinary
frames; ``from_wire`` validates every field and raises ``BadRaftMessage``
(a peer's fault) instead of building a half-valid object.

Peer messages (every one carries ``term``, ``src``, ``dst``):

    PreVote / RequestVote          term, last_index, last_term
    PreVoteResponse /
    RequestVoteResponse            granted
    AppendEntries                  prev_index, prev_term, entries, commit, seq
    AppendResponse                 success, index, hint, seq
    InstallSnapshot                index, snap_term, membership, size, offset,
                                   length, done, seq, data (bytes; None in the core)
    InstallSnapshotResponse        index, next_offset, done, seq

``seq`` is the leader's read-round counter (read index): a response echoes
the highest ``seq`` the follower has seen from this leader in this term.

Left out: a leadership-transfer message (TimeoutNow) and batching several
messages for one peer into one frame (the driver may do that).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Entry kinds.  DATA carries a state-machine record (a JSON-able dict); NOOP is
# the entry a new leader appends so it can commit something of its own term;
# CONFIG carries a Membership (as ``Membership.to_data()``).
DATA = "data"
NOOP = "noop"
CONFIG = "config"
ENTRY_KINDS = (DATA, NOOP, CONFIG)

# Roles.
FOLLOWER = "follower"
PRE_CANDIDATE = "pre_candidate"
CANDIDATE = "candidate"
LEADER = "leader"


class BadRaftMessage(ValueError):
    """A peer sent a message that does not decode into a valid Raft message."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry.  ``data`` is never mutated once the entry exists."""

    index: int
    term: int
    kind: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class Membership:
    """Who votes (``voters``) and who only receives the log (``learners``).

    A learner catches up before it is promoted to a voter, so adding a member
    never makes a majority depend on a node with an empty log.
    """

    voters: frozenset = frozenset()
    learners: frozenset = frozenset()

    def to_data(self) -> dict:
        return {"voters": sorted(self.voters), "learners": sorted(self.learners)}

    @classmethod
    def from_data(cls, data) -> "Membership":
        if (not isinstance(data, dict) or set(data) != {"voters", "learners"}
                or not all(isinstance(data[k], list) for k in data)
                or not all(isinstance(n, str) and n for k in data for n in data[k])):
            raise BadRaftMessage(f"bad membership {data!r:.200}")
        voters, learners = frozenset(data["voters"]), frozenset(data["learners"])
        if voters & learners:
            raise BadRaftMessage("a node is both voter and learner")
        return cls(voters, learners)

    @property
    def members(self) -> frozenset:
        return self.voters | self.learners

    def quorum(self) -> int:
        """Votes (or copies) that make a majority of the voters."""
        return len(self.voters) // 2 + 1


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: str | None = None


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile role information; reported when it changes (for logs, redirects, fencing)."""

    role: str
    term: int
    leader_id: str | None


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """A snapshot of the state machine covering the log up to ``index`` (whose term is ``term``).

    ``membership`` is the configuration in effect at ``index``; ``size_bytes``
    is the length of the serialized snapshot, sent in pieces.
    """

    index: int = 0
    term: int = 0
    membership: Membership = Membership()
    size_bytes: int = 0

    @classmethod
    def initial(cls, voters) -> "SnapshotMeta":
        """The empty snapshot every member of a new cluster starts from."""
        return cls(0, 0, Membership(frozenset(voters), frozenset()), 0)


@dataclass(frozen=True, slots=True)
class SnapshotPiece:
    """Bytes ``[offset, offset + len(data))`` of the incoming snapshot ``index``.

    The driver writes them to a temporary file (offset 0 starts a new one)
    before sending the messages of the same Ready.
    """

    index: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ReadState:
    """A read registered with ``read_index(ctx)`` is confirmed: serve it once applied >= index."""

    ctx: Any
    index: int


# --- peer messages -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Message:
    term: int
    src: str
    dst: str


@dataclass(frozen=True, slots=True)
class PreVote(Message):
    """Would you vote for me in ``term`` (my term + 1)?  Changes no one's term or vote."""

    last_index: int
    last_term: int


@dataclass(frozen=True, slots=True)
class PreVoteResponse(Message):
    granted: bool


@dataclass(frozen=True, slots=True)
class RequestVote(Message):
    last_index: int
    last_term: int


@dataclass(frozen=True, slots=True)
class RequestVoteResponse(Message):
    granted: bool


@dataclass(frozen=True, slots=True)
class AppendEntries(Message):
    prev_index: int
    prev_term: int
    entries: tuple = ()
    commit: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class AppendResponse(Message):
    """``index``: on success the highest index known to match the leader; on
    rejection the ``prev_index`` that did not match.  ``hint``: on rejection,
    an index below which the follower's log may still match (a whole term is
    skipped at a time)."""

    success: bool
    index: int
    hint: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class InstallSnapshot(Message):
    """One piece of the leader's snapshot.  ``data`` is None when the core emits
    it: the driver fills in the bytes ``[offset, offset + length)`` of snapshot
    ``index`` (``with_data``) or drops the message if it no longer has them."""

    index: int
    snap_term: int
    membership: Membership
    size: int
    offset: int
    length: int
    done: bool
    seq: int = 0
    data: bytes | None = field(default=None, repr=False)

    def with_data(self, data: bytes) -> "InstallSnapshot":
        if len(data) != self.length:
            raise ValueError(f"snapshot piece needs {self.length} bytes, got {len(data)}")
        return InstallSnapshot(self.term, self.src, self.dst, self.index, self.snap_term,
                               self.membership, self.size, self.offset, self.length,
                               self.done, self.seq, bytes(data))


@dataclass(frozen=True, slots=True)
class InstallSnapshotResponse(Message):
    """``next_offset``: the offset the follower expects next (0 = start again);
    ``done``: the follower holds snapshot ``index`` (installed, or covered by its commit)."""

    index: int
    next_offset: int
    done: bool
    seq: int = 0


MESSAGE_TYPES = {cls.__name__: cls for cls in (
    PreVote, PreVoteResponse, RequestVote, RequestVoteResponse, AppendEntries,
    AppendResponse, InstallSnapshot, InstallSnapshotResponse)}


@dataclass(slots=True)
class Ready:
    """Everything the core produced since the last ``RaftCore.ready()``.

    The driver handles a Ready in this order, then calls ``RaftCore.advance``:

    1. Persist, and fsync, before anything else:
       ``hard_state``; ``snapshot_pieces`` (to the incoming snapshot file); if
       ``snapshot`` is set, make that file the checkpoint; ``truncate_from``
       (drop log entries >= it); ``compact_to`` (entries <= it may go; when the
       log ends before it, the log restarts at ``compact_to + 1``);
       ``entries`` (append).
    2. Send ``messages`` (fill InstallSnapshot data first).
    3. If ``snapshot`` is set, restore the state machine from it; then apply
       ``committed`` in order.
    4. Serve ``read_states`` once the applied index reaches theirs; answer
       ``failed_reads`` (contexts) with NOT_LEADER.  Log ``notes``.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    snapshot_pieces: list = field(default_factory=list)
    snapshot: SnapshotMeta | None = None
    truncate_from: int | None = None
    compact_to: int | None = None
    entries: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    committed: list = field(default_factory=list)
    read_states: list = field(default_factory=list)
    failed_reads: list = field(default_factory=list)
    notes: list = field(default_factory=list)


# --- wire form -----------------------------------------------------------------------

def entry_to_wire(e: Entry) -> list:
    """``[index, term, kind, data]``: the JSON form of an entry, on the wire and on disk."""
    return [e.index, e.term, e.kind, e.data]


def json_size(value) -> int:
    """About how many bytes ``value`` (JSON-able) takes as JSON, without encoding it (the core
    imports no json): strings count as ASCII plus quotes, so escapes make the real size larger;
    callers keep a margin (RaftConfig.max_append_bytes is a quarter of a frame header)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, dict):
        return 2 + sum(len(str(k)) + 4 + json_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 2 + sum(json_size(v) + 1 for v in value)
    return len(repr(value))


def entry_size(e: Entry) -> int:
    """About how many bytes ``e`` takes in an AppendEntries header (see ``json_size``)."""
    return 16 + len(str(e.index)) + len(str(e.term)) + len(e.kind) + json_size(e.data)


def entry_from_wire(obj) -> Entry:
    """The inverse of ``entry_to_wire``; raises ``BadRaftMessage`` when malformed."""
    if (not isinstance(obj, list) or len(obj) != 4 or not _is_count(obj[0]) or not _is_count(obj[1])
            or obj[2] not in ENTRY_KINDS):
        raise BadRaftMessage(f"bad entry {obj!r:.200}")
    data = obj[3]
    if obj[2] == CONFIG:
        Membership.from_data(data)  # validates; kept in its data form
    elif obj[2] == DATA and not isinstance(data, dict):
        raise BadRaftMessage("a data entry carries a JSON object")
    return Entry(obj[0], obj[1], obj[2], data)


def _is_count(v) -> bool:
    return type(v) is int and v >= 0


def to_wire(msg: Message) -> tuple[dict, bytes]:
    """Header dict (JSON-able) and body bytes of ``msg``.  InstallSnapshot must carry data."""
    header = {"type": type(msg).__name__}
    body = b""
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name == "entries":
            value = [entry_to_wire(e) for e in value]
        elif f.name == "membership":
            value = value.to_data()
        elif f.name == "data":
            if value is None:
                raise ValueError("InstallSnapshot without its data (fill it with with_data)")
            body = value
            continue
        header[f.name] = value
    return header, body


def from_wire(header: dict, body: bytes = b"") -> Message:
    """Rebuild a message from ``to_wire``'s output; raises ``BadRaftMessage`` when malformed."""
    if not isinstance(header, dict):
        raise BadRaftMessage("header is not an object")
    cls = MESSAGE_TYPES.get(header.get("type"))
    if cls is None:
        raise BadRaftMessage(f"unknown raft message type {header.get('type')!r:.100}")
    names = [f.name for f in fields(cls)]
    wire_names = set(names) - {"data"}
    if set(header) - {"type"} != wire_names:
        raise BadRaftMessage(f"{cls.__name__}: fields {sorted(set(header) - {'type'})} "
                             f"!= {sorted(wire_names)}")
    values = {}
    for name in names:
        if name == "data":
            values[name] = bytes(body)
            continue
        v = header[name]
        if name in ("src", "dst"):
            ok = isinstance(v, str) and bool(v)
        elif name in ("granted", "success", "done"):
            ok = type(v) is bool
        elif name == "entries":
            ok = isinstance(v, list)
            if ok:
                v = tuple(entry_from_wire(e) for e in v)
        elif name == "membership":
            v, ok = Membership.from_data(v), True
        else:
            ok = _is_count(v)
        if not ok:
            raise BadRaftMessage(f"{cls.__name__}.{name}: bad value {v!r:.100}")
        values[name] = v
    if cls is InstallSnapshot and (len(values["data"]) != values["length"]
                                   or values["offset"] + values["length"] > values["size"]):
        raise BadRaftMessage("InstallSnapshot: body does not match offset/length/size")
    if cls is AppendEntries and any(e.index != values["prev_index"] + 1 + n
                                    for n, e in enumerate(values["entries"])):
        raise BadRaftMessage("AppendEntries: entries do not follow prev_index")
    if cls is not InstallSnapshot and body:
        raise BadRaftMessage(f"{cls.__name__} has no body")
    return cls(**values)
