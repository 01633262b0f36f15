"""Data-safety review: each test pins down one suspicion the review raised and that proved a defect.

Unit tests on a Master without nodes, or on pure parts, where the
interleaving can be forced deterministically; see the report in each
test's docstring.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from conftest import ROOT, flip_byte, random_bytes, wait_until

import client as client_module
import config as config_module
import history
import protocol
import transfers
import transport
from chunk_store import HEADER_BYTES, PAYLOAD_CRC_BYTES
from master import Master, NodeState
from namespace import Namespace, make_entry, put_record, splice_runs
from repair import replicas_record

CHUNK = 1024
BATCH = 4
A, B, C = "node-a", "node-b", "node-c"


def stored(version: str, chunks: int = 4, nodes=(A, B)) -> dict:
    return make_entry(chunks * CHUNK, CHUNK, version[-1] * 64, version, [[0, chunks, list(nodes)]], BATCH)


def put(name: str, entry: dict, i: int, keep: int = 3) -> dict:
    return put_record(name, entry) | {"i": i, "t": float(i), "keep": keep}


# --- undelete: one delete operation, not one millisecond ------------------------------------------
def test_undelete_brings_back_only_the_newest_delete_when_two_share_a_millisecond():
    """Two deletes of a name stamped with the same time: undelete brings back the second one's entries only."""
    namespace = Namespace()
    namespace.apply(put("f", stored("v1"), 1))
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 10.0, "i": 2})
    namespace.apply(put("f", stored("v3"), 3))
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 10.0, "i": 4})  # same millisecond
    namespace.apply({"op": "undelete", "name": "f", "i": 5})
    assert [history.version_id(e) for e in namespace.history("f")] == [3], "undelete merged two deletes"
    assert [history.version_id(e) for e in namespace.trash["f"]] == [1]
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 11.0, "i": 6})
    namespace.apply({"op": "undelete", "name": "f", "i": 7})  # and the older one after it
    assert [history.version_id(e) for e in namespace.history("f")] == [3]


# --- surplus copies and readers -------------------------------------------------------------------
def test_a_surplus_copy_a_pinned_reader_may_fetch_is_dropped_only_after_the_read(master, monkeypatch):
    """Reconciliation drops a returning node's surplus copy only once no download pins its blob.

    The reader's entry still lists node A: dropping A's copy under it leaves
    the read one replica (B) where the placement it started from had two.
    """
    master.commit_uploads([("f", stored("v1", nodes=(A, B)), None)])
    pinned = master.open_for_read("f")
    master.log.commit([replicas_record("f", "v1", 0, 4, [A, B], [B, C])])  # A died, repaired to C
    monkeypatch.setattr(master, "live_nodes", lambda: [SimpleNamespace(node_id=n) for n in (A, B, C)])
    dropped = []
    monkeypatch.setattr(master.repairer, "_drop", lambda *drop: dropped.append(drop))
    master.repairer.reconcile(A, master.namespace.all_entries(), {"v1": [(0, 4)]})  # A is back
    assert not dropped, "a copy a pinned download may read was dropped"
    master.repairer.drop_deferred()
    assert not dropped, "a copy a pinned download may read was dropped"
    master.close_read(pinned)
    master.repairer.drop_deferred()
    assert dropped == [(A, "v1", 0, 4)], "the surplus copy stayed once the read was done"
    master.repairer.drop_deferred()
    assert len(dropped) == 1


def test_a_deferred_drop_is_forgotten_when_the_copy_is_placed_again(master, monkeypatch):
    """A surplus copy held back for a reader is not dropped if the placement uses it again meanwhile."""
    master.commit_uploads([("f", stored("v1", nodes=(A, B)), None)])
    pinned = master.open_for_read("f")
    master.log.commit([replicas_record("f", "v1", 0, 4, [A, B], [B, C])])
    monkeypatch.setattr(master, "live_nodes", lambda: [SimpleNamespace(node_id=n) for n in (A, B, C)])
    dropped = []
    monkeypatch.setattr(master.repairer, "_drop", lambda *drop: dropped.append(drop))
    master.repairer.reconcile(A, master.namespace.all_entries(), {"v1": [(0, 4)]})
    master.log.commit([replicas_record("f", "v1", 0, 4, [B, C], [B, A])])  # C lost it; A adopted again
    master.close_read(pinned)
    master.repairer.drop_deferred()
    assert not dropped, "dropped a copy the placement uses again"


def live(master, monkeypatch, *nodes) -> list:
    """``nodes`` are the live ones; returns the list reconciliation's drops land in."""
    monkeypatch.setattr(master, "live_nodes", lambda: [SimpleNamespace(node_id=n) for n in nodes])
    dropped = []
    monkeypatch.setattr(master.repairer, "_drop", lambda *drop: dropped.append(drop))
    return dropped


def test_reconciliation_drops_chunks_of_a_known_blob_that_no_version_uses_any_more(tmp_path, monkeypatch):
    """A write moved chunks 4..7 to a new blob and the old version was dropped: a returning node's copy of them goes.

    Node B was off their placement when the garbage collector dropped them
    (repair had moved them while it was away): its extent of them overlaps
    no entry, which reconciliation used to keep for ever.  Only a master
    that knows it freed them drops them.
    """
    config = config_module.load_config(None, keep_versions=1, safe_mode_s=0)
    m = Master(config, str(tmp_path / "master"))
    try:
        m.commit_uploads([("f", stored("v1", chunks=8, nodes=(A, B)), None)])
        m.log.commit([replicas_record("f", "v1", 0, 8, [A, B], [A, C])])  # B died: repaired to C
        runs = splice_runs(m.namespace.files["f"], [[4, 4, [A, B]]], 4, 8)
        m.commit_uploads([("f", make_entry(8 * CHUNK, CHUNK, "2" * 64, "v2", runs, BATCH),
                           {"version": "v1", "first": 4, "end": 8})])
        assert m.namespace.entries_of("f") == [m.namespace.files["f"]]  # v1 is gone, its chunks 0..3 stay used
        dropped = live(m, monkeypatch, A, B, C)
        m.repairer.reconcile(B, m.namespace.all_entries(), {"v1": [(0, 4), (4, 4)]})
        assert dropped == [(B, "v1", 0, 4), (B, "v1", 4, 4)], "chunks no version uses stay on the node for ever"
    finally:
        m.log.close()
    m = Master(config, str(tmp_path / "master"))  # a restarted master does not know it freed them: kept
    try:
        dropped = live(m, monkeypatch, A, B, C)
        m.repairer.reconcile(B, m.namespace.all_entries(), {"v1": [(0, 4), (4, 4)]})
        assert dropped == [(B, "v1", 0, 4)]  # surplus only
    finally:
        m.log.close()


def test_reconciliation_drops_the_surplus_part_of_an_extent_the_node_holds_in_part_for_the_file(master, monkeypatch):
    """A CRC failure on the wire took node B off chunk 2 (its copy was good), repair copied it to C: B's goes.

    The rest of B's extent is placed on B and stays; before, any placed
    chunk kept the whole extent, surplus chunk included, for ever.
    """
    master.commit_uploads([("f", stored("v1", nodes=(A, B)), None)])
    pinned = master.open_for_read("f")
    master.note_bad_replica(B, "f", pinned, "v1", [(2, 1)], protocol.ChecksumMismatch("CRC failed on the wire"))
    master.close_read(pinned)
    master.log.commit([replicas_record("f", "v1", 2, 1, [A], [A, C])])  # repaired to C
    dropped = live(master, monkeypatch, A, B, C)
    master.repairer.reconcile(B, master.namespace.all_entries(), {"v1": [(0, 4)]})
    assert dropped == [(B, "v1", 2, 1)], "a surplus chunk stays on node B"


# --- corrupt reports from a node ------------------------------------------------------------------
@pytest.fixture
def node(tmp_path):
    from storage_node import StorageNode
    node = StorageNode(config_module.load_config(None, scrub_rate_mb_s=0), str(tmp_path / "node"))
    node.identity.check_master("c1", 1, holds_data=False)
    yield node
    node.store.close()
    node.catalog.close()


def put_chunks(node, blob: str, data: bytes) -> int:
    """Store ``data`` as chunks 0.. of ``blob``; the PUT_OK's seq."""
    crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(data, CHUNK))
    return node.put(protocol.PutChunks(blob=blob, first=0, count=len(data) // CHUNK, chunk_size=CHUNK, body=crcs + data,
                                cluster_id="c1", epoch=1)).seq


def rot_chunk(node, tmp_path, blob: str, count: int, chunk: int) -> None:
    """Flip a byte of ``chunk`` of the one record of ``blob`` (the first one of the node's first segment)."""
    directory = tmp_path / "node"
    segment = sorted(p for p in directory.rglob("*") if p.is_file() and p.name.startswith("seg"))[0]
    flip_byte(str(segment), HEADER_BYTES + PAYLOAD_CRC_BYTES + len(blob) + 4 * count + chunk * CHUNK + 7)


def test_a_scrub_report_says_which_writes_it_predates(node, tmp_path):
    """The scrubber dropped chunk 2 and repair put a fresh copy here before the heartbeat: the report says it is older.

    Its seq is put_seq when the chunk was dropped, below the fresh copy's
    PUT_OK seq, so the master keeps that copy placed (see the master test).
    """
    data = random_bytes(31, 4 * CHUNK)
    put_chunks(node, "b1", data)
    rot_chunk(node, tmp_path, "b1", 4, 2)
    _, corrupt = node.store.scrub_step(None, 1 << 20)
    assert corrupt == [("b1", 2, 1)]
    node.queue_corrupt(corrupt)  # what the scrub loop does
    fresh_seq = put_chunks(node, "b1", data)  # the master's repair re-copies the batch here
    [(blob, first, count, seq)] = node.take_corrupt_reports()
    assert (blob, first, count) == ("b1", 2, 1) and seq < fresh_seq, "a late report would take the fresh copy off"


def test_corrupt_chunks_a_read_found_are_reported_in_a_heartbeat_too(node, tmp_path):
    """GET_CHUNKS drops a rotten chunk and names it in the reply; the reply may be lost, so a heartbeat names it too."""
    put_chunks(node, "b1", random_bytes(32, 4 * CHUNK))
    rot_chunk(node, tmp_path, "b1", 4, 1)
    reply = node.get(protocol.GetChunks(blob="b1", first=0, count=4))
    assert reply.corrupt == [[1, 1]]
    assert [list(run)[:3] for run in node.take_corrupt_reports()] == [["b1", 1, 1]]


def test_a_report_made_before_a_repair_copy_landed_does_not_take_that_copy_off(master, monkeypatch):
    """B reported chunk 1 dropped, but repair had put a fresh copy on B after the drop: B stays listed.

    Each reported run carries B's put_seq when it dropped the chunks; the
    repair's PUT_OK carried a later seq.
    """
    master.commit_uploads([("f", stored("v1", nodes=(A, B)), None)])
    master.repairer.report_corrupt(B, [["v1", 1, 1, 5]])  # a read or the scrubber: B dropped chunk 1
    assert master.namespace.files["f"]["runs"][1] == [1, 1, [A]]
    live(master, monkeypatch, A, B)
    monkeypatch.setattr(master, "choose_replicas", lambda nbytes, avoid, count: [B])  # back to B: most room
    monkeypatch.setattr(transfers, "read_piece", lambda *args: memoryview(bytes(4 + CHUNK)))
    monkeypatch.setattr(transfers, "put_piece", lambda *args: 7)  # PUT_OK seq 7
    master.repairer._repair(master.repairer.scan({A, B}))
    assert master.namespace.files["f"]["runs"] == [[0, 4, [A, B]]]
    master.repairer.report_corrupt(B, [["v1", 1, 1, 6]], put_seq=9)  # made before seq 7, arriving after
    assert master.namespace.files["f"]["runs"] == [[0, 4, [A, B]]], "a late report took the fresh copy off"
    master.repairer.report_corrupt(B, [["v1", 1, 1, 7]], put_seq=9)  # after it: that copy is bad too
    assert master.namespace.files["f"]["runs"][1] == [1, 1, [A]]


def test_a_repair_that_found_no_target_runs_again_when_a_suspect_node_becomes_usable(tmp_path, monkeypatch):
    """The only possible target was suspect (a request to it had failed): the pass gave up; once its time is out, the piece is copied.

    Seen in tests/test_heal.py under load: node restarts made every node
    suspect for dead_after_s, the repair passes found no target, and nothing
    changed in the live or holding sets when the suspicion ran out, so the
    chunk stayed under-replicated until the 30 s rescan.
    """
    config = config_module.load_config(None, safe_mode_s=0, heartbeat_interval_s=0.05, dead_after_s=60)
    m = Master(config, str(tmp_path / "master"))
    try:
        m.commit_uploads([("f", stored("v1", nodes=(A, B)), None)])
        now = m.clock()
        for node_id in (A, C):  # B is gone; C is the only node that can take a copy
            m._nodes[node_id] = NodeState(node_id, ("127.0.0.1", 1), capacity_bytes=1 << 30, last_heard=now,
                                          reported=True)
        m._nodes[C].suspect_until = now + 3600  # a request to it failed
        monkeypatch.setattr(transfers, "read_piece", lambda *args: memoryview(bytes(4 * (4 + CHUNK))))
        monkeypatch.setattr(transfers, "put_piece", lambda *args: 7)
        m.repairer.start()
        wait_until(lambda: m.repairer._last_pass_futile == 1, 5.0, message="a futile repair pass")
        assert m.namespace.files["f"]["runs"] == [[0, 4, [A, B]]]
        with m._nodes_lock:
            m._nodes[C].suspect_until = m.clock()  # its time is out: nothing else happens
        wait_until(lambda: m.namespace.files["f"]["runs"] == [[0, 4, [A, C]]], 5.0,
                   message="the piece copied to C without waiting for the 30 s rescan")
    finally:
        m.repairer.stop()
        m.log.close()


def test_a_corrupt_run_a_read_found_and_the_heartbeat_repeats_is_counted_once(master):
    """The reply and the heartbeat both name a bad chunk: the node leaves its list once, one corrupt copy counted."""
    master.commit_uploads([("f", stored("v1", nodes=(A, B)), None)])
    entry = master.namespace.files["f"]
    master.note_bad_replica(B, "f", entry, "v1", [(1, 1)], protocol.ChecksumMismatch("chunk 1 corrupt"))
    master.repairer.report_corrupt(B, [["v1", 1, 1, 3]])
    assert master.namespace.files["f"]["runs"] == [[0, 1, [A, B]], [1, 1, [A]], [2, 2, [A, B]]]
    assert master.repairer.corrupt_replicas_found == 1
    master.repairer.report_corrupt(B, [["v1", 2, 1, 3]])  # the scrubber, later: another copy
    assert master.repairer.corrupt_replicas_found == 2


# --- the client: a master lost mid-reply, a reader that goes away -------------------------------
class FakeMasterHandler(transport.RequestHandler):
    """LIST: dies mid-frame if the server says so, else one page.  DOWNLOAD: DOWNLOAD_BYTES of zeros."""

    DOWNLOAD_BYTES = 4 * 1024 * 1024

    def do_LIST(self, msg: protocol.List) -> None:
        if self.server.die_mid_frame:
            frame = protocol.encode(protocol.ListPage(entries=[{"name": "x" * 100}], done=True))
            self.wfile.write(frame[:len(frame) // 2])  # the master dies halfway through its reply
            self.wfile.flush()
            self.request.shutdown(socket.SHUT_RDWR)
            return
        self.reply(protocol.ListPage(entries=[{"name": "listed", "size": 1, "chunks": 1, "mtime": 0.0,
                                               "sha256": "0" * 64}], done=True))

    def do_DOWNLOAD(self, msg: protocol.Download) -> None:
        data = bytes(self.DOWNLOAD_BYTES)
        self.reply(protocol.FileInfo(name=msg.name, size=len(data), chunks=len(data) // 1024,
                                     sha256=hashlib.sha256(data).hexdigest(), mtime=0.0, version="fake",
                                     offset=0, length=len(data)), flush=False)
        for at in range(0, len(data), 1 << 20):
            self.reply(protocol.Data(body=data[at:at + (1 << 20)]), flush=False)
        self.reply(protocol.DataEnd())


@pytest.fixture
def fake_masters(request):
    """Two in-process fake masters on 127.0.0.1; the first dies mid-frame on LIST."""
    servers = []
    for die in (True, False):
        server = transport.Server(("127.0.0.1", 0), FakeMasterHandler, server_id="master",
                                  io_timeout_s=5.0, idle_timeout_s=5.0)
        server.die_mid_frame = die
        threading.Thread(target=server.serve_forever, name="fake-master", daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def client_argv(master: str, *args) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "client.py"), "--master", master, "--quiet", *args]


def test_a_master_lost_mid_reply_is_a_connection_error_not_a_bad_request(fake_masters, tmp_path):
    """EOF in the middle of a reply frame: exit 5 (UNAVAILABLE) saying the connection was lost, not exit 9."""
    result = subprocess.run(client_argv(fake_masters[0].address_text, "list"), capture_output=True, timeout=30,
                            cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == client_module.EXIT_UNAVAILABLE, stderr
    assert stderr.startswith("client: UNAVAILABLE: lost connection to") and "mid-frame" in stderr, stderr


def test_a_safe_request_cut_off_mid_reply_goes_to_the_next_master(fake_masters):
    """With several masters, a read whose reply was cut off midway is re-run on another one."""
    addresses = [server.server_address[:2] for server in fake_masters]
    client = client_module.Client(addresses, timeout_s=5.0, frame_bytes=1 << 20, show_progress=False,
                                  failover_timeout_s=5.0)
    try:
        assert [e["name"] for e in client.list()] == ["listed"]
    finally:
        client.close()


def test_cat_into_a_pipe_its_reader_closed_ends_quietly(fake_masters, tmp_path):
    """`cat NAME | head -c 10`: the client stops without a message and exits 0, as coreutils cat does."""
    proc = subprocess.Popen(client_argv(fake_masters[1].address_text, "cat", "big"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        assert proc.stdout.read(10) == bytes(10)
        proc.stdout.close()  # the reader goes away, as head does
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=30) == client_module.EXIT_OK, stderr
        assert stderr == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
