"""Direct reads: the client fetches a file's chunks from the storage nodes itself.

The master answers a DOWNLOAD with ``direct`` by a READ_PLAN: the version
it pinned, the placement of the requested range (runs, replicas in read
order, node addresses) and a read capability per blob (security.py), valid
for ``read_lease_s``.  The client then runs the master's own read code,
``transfers.read_range``, with this module's ``DirectReader`` in the
master's place: several GET_CHUNKS in flight on one connection per node,
every CRC checked, a failing, silent or corrupting replica left for the
next one, chunk by chunk.  So a restore's bytes cross one hop (node to
client) instead of two, and the master moves none of them.

Guarantees stay those of the relayed path: the SHA-256 of the whole file is
checked by the caller (client.py), the output is written to a temporary file
renamed only on success, and the version read is the pinned one.

When no replica of a piece can be reached from the client (nodes behind a
firewall, or a capability refused), the rest of the range is relayed by the
master from the same pinned version (DOWNLOAD with ``read_id``): the
master may reach nodes the client cannot.  Copies the client could not use
are listed in READ_END; the master reads each one itself before it takes a
replica off and has it repaired, so a client never removes a good copy.

A directory restore plans many files with one READ_PLANS and pipelines
the chunk requests of many small files (``transfers.read_ranges``; see
``cli.Client._download_files_direct``).  Left out: reading one piece from
two replicas at once (hedged reads).
"""

from __future__ import annotations

import logging
import time

import protocol
import transfers
import transport

logger = logging.getLogger("client.direct")

# A node the client could not reach is not tried again for this long (the
# other replica serves meanwhile), so a restore of many files pays a dead
# or hung node's timeout once, not once per file.
UNREACHABLE_RETRY_S = 30.0
# Renew the plan (READ_MORE) when a capability has less than this left: a
# read started just before expiry does not fail at the node.
RENEW_MARGIN_S = 30.0


class ReplicaPool:
    """The client's connections to nodes: one idle connection kept per node, reused across files.

    Stands in for the master's NodePool in ``transfers.read_range``: it
    knows the nodes' addresses and the capabilities from the read plans,
    and adds the capability to each GET_CHUNKS.
    """

    def __init__(self, timeout_s: float, security: transport.Security | None):
        self.timeout_s = timeout_s
        self.security = security
        self.addresses: dict[str, tuple[str, int]] = {}
        self._address_texts: dict[str, str] = {}  # node id -> "HOST:PORT" it was learnt from
        self.caps: dict[str, str] = {}
        self._idle: dict[str, transport.Connection] = {}
        self._unreachable: dict[str, float] = {}  # node id -> monotonic time to try again

    def learn(self, plan: protocol.ReadPlan) -> None:
        """Take the addresses and capabilities of a READ_PLAN."""
        import config as config_module  # noqa: PLC0415 - the CLI imports it already
        for node_id, text in plan.nodes.items():
            if self._address_texts.get(node_id) == text:
                continue  # known (the plans of a READ_PLANS_PAGE share one nodes table)
            self._address_texts[node_id] = text
            try:
                self.addresses[node_id] = config_module.parse_address(text)
            except ValueError:
                self.addresses.pop(node_id, None)
        self.caps.update(plan.caps)

    def reachable(self, node_id: str) -> bool:
        until = self._unreachable.get(node_id)
        return until is None or until <= time.monotonic()

    def mark_unreachable(self, node_id: str) -> None:
        self._unreachable[node_id] = time.monotonic() + UNREACHABLE_RETRY_S
        conn = self._idle.pop(node_id, None)
        if conn is not None:
            conn.close()

    def acquire(self, node_id: str) -> transport.Connection:
        conn = self._idle.pop(node_id, None)
        if conn is not None:
            return conn
        if not self.reachable(node_id):
            raise protocol.Unavailable(f"node {node_id} did not answer a moment ago")
        address = self.addresses.get(node_id)
        if address is None:
            raise protocol.Unavailable(f"node {node_id} has no known address")
        conn = transport.Connection(address, "client", self.timeout_s, self.security)
        if conn.peer_id != node_id:
            conn.close()
            raise protocol.WrongNode(f"{transport.format_address(address)} is node {conn.peer_id[:64]!r}, "
                                     f"not node {node_id}")
        return conn

    def release(self, conn: transport.Connection) -> None:
        if conn.broken or conn.peer_id in self._idle:
            conn.close()
        else:
            self._idle[conn.peer_id] = conn

    def get_chunks(self, blob: str, first: int, count: int) -> protocol.GetChunks:
        return protocol.GetChunks(blob=blob, first=first, count=count, cap=self.caps.get(blob) or None)

    def close(self) -> None:
        for conn in self._idle.values():
            conn.close()
        self._idle.clear()


class DirectReader:
    """The master's part in ``transfers.read_range``, played by a client.

    ``read_order`` keeps the master's order but puts nodes that just failed
    last; ``note_node_failure`` remembers them; ``note_bad_replica``
    collects the copies to list in READ_END (``take_bad``).
    """

    def __init__(self, pool: ReplicaPool):
        self.pool = pool
        self._bad: list[list] = []

    def read_order(self, node_ids: list[str]) -> list[str]:
        return sorted(node_ids, key=lambda node_id: not self.pool.reachable(node_id))

    def note_node_failure(self, node_id: str, exc: protocol.BackupError) -> None:
        logger.warning("node %s failed a read: %s", node_id, exc)
        if isinstance(exc, (protocol.Unavailable, protocol.Timeout, protocol.RemoteProtocolError)):
            self.pool.mark_unreachable(node_id)

    def note_bad_replica(self, node_id, name, entry, blob, ranges, exc) -> None:
        logger.warning("node %s could not serve %r chunks %s intact: %s", node_id, name,
                       ", ".join(f"{first}+{count}" for first, count in ranges[:5]), exc)
        self._bad.extend([node_id, blob, first, count] for first, count in ranges)

    def take_bad(self) -> list[list] | None:
        bad, self._bad = self._bad[:protocol.MAX_CHUNK_RANGES], []
        return bad or None


def plan_entry(plan: protocol.ReadPlan) -> dict:
    """The part of a file entry ``transfers.read_range`` needs, from one page of a READ_PLAN."""
    return {"size": plan.size, "chunks": plan.chunks, "version": plan.version, "chunk_size": plan.chunk_size,
            "batch_chunks": plan.batch_chunks, "runs": plan.runs}


def check_plan(plan: protocol.ReadPlan) -> None:
    """RemoteProtocolError unless a READ_PLAN is well formed enough to drive reads (never trust a peer)."""
    if not (protocol.MIN_CHUNK_BYTES <= plan.chunk_size <= protocol.MAX_CHUNK_BYTES and plan.batch_chunks > 0
            and 0 <= plan.offset <= plan.size and 0 <= plan.length <= plan.size - plan.offset
            and plan.batch_chunks * (plan.chunk_size + protocol.CRC_BYTES) <= protocol.MAX_BODY_BYTES):
        raise protocol.RemoteProtocolError("malformed READ_PLAN")
    previous_end = 0
    for run in plan.runs:
        if not (isinstance(run, list) and len(run) == 4 and all(isinstance(v, int) for v in run[:2])
                and isinstance(run[2], list) and isinstance(run[3], str) and run[0] >= previous_end and run[1] > 0):
            raise protocol.RemoteProtocolError("malformed READ_PLAN runs")
        previous_end = run[0] + run[1]


def read_plan_pages(conn: transport.Connection, plan: protocol.ReadPlan, reader: DirectReader, buffers=None):
    """Yield memoryviews of the plan's byte range, page by page of runs, renewing capabilities as needed.

    ``buffers``: as in ``transfers.read_ranges``.

    Raises what ``transfers.read_range`` raises (Unavailable: no replica
    of some piece reachable; DataLost: no intact copy anywhere); the bytes
    yielded before that are good.
    """
    chunk_size = plan.chunk_size
    end = plan.offset + plan.length
    position = plan.offset
    while True:
        check_plan(plan)
        reader.pool.learn(plan)
        page_end = end if plan.more is None else min(end, plan.more * chunk_size)
        if page_end > position:
            for _, view in transfers.read_ranges(reader, [(None, plan.name, plan_entry(plan), position,
                                                           page_end - position)], buffers):
                if isinstance(view, BaseException):
                    raise view
                if view is None:
                    break
                yield view
                position += len(view)
                if time.time() > plan.expires - RENEW_MARGIN_S and position < end:
                    break  # renew the capabilities before they run out
        if position >= end:
            return
        plan = conn.request(protocol.ReadMore(read_id=plan.read_id, chunk=position // chunk_size),
                            protocol.ReadPlan)


def file_info(plan: protocol.ReadPlan) -> protocol.FileInfo:
    """The FILE_INFO a relayed download would have answered."""
    return protocol.FileInfo(name=plan.name, size=plan.size, chunks=plan.chunks, sha256=plan.sha256,
                             mtime=plan.mtime, version=plan.version, offset=plan.offset, length=plan.length,
                             meta=plan.meta)
