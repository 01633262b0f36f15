"""Every message that grows with the data is paged by size, and floods cannot grow a server's memory.

Unit tests build the pages of a million-extent inventory and of other long
lists and check that every frame fits and that the receiving side gets back
what was sent.  Process tests store a file fragmented into 10,240 batches
(what a 10 GiB file is at the default 1 MiB batches), restart a node, and
flood a master and a node with a few hundred connections.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import types

import pytest

from conftest import FAST_MASTER, FAST_TIMING, ROOT, random_bytes, serve_in_thread, sha256, wait_until

import config as config_module
import protocol
import transport
from chunk_store import ChunkStore
from master import Master
from namespace import Namespace
from repair import DAMAGED_LIST_BYTES, Repairer
from storage_node import StorageNode


class SyntheticStore:
    """What StorageNode asks of a ChunkStore, over an inventory held in memory."""

    used_bytes = 0
    chunk_count = 0

    def __init__(self, inventory: dict[str, list[tuple[int, int]]] | None = None, rotten: list | None = None):
        self._inventory = inventory or {}
        self.rotten = rotten or []  # (blob, first, count) the scrubber finds corrupt, all in its first step

    def inventory(self):
        return self._inventory

    @property
    def blob_count(self) -> int:
        return len(self._inventory)

    def holds(self, blob: str) -> bool:
        return blob in self._inventory

    def bytes_of(self, blobs) -> int:
        return 0

    def iter_inventory(self, slice_extents: int = 4096):
        for blob in sorted(self._inventory):
            extents = self._inventory[blob]
            for start in range(0, len(extents), slice_extents):
                yield blob, extents[start:start + slice_extents]

    def scrub_step(self, cursor, max_bytes: int):
        found, self.rotten = self.rotten, []
        return None, found

    def flush(self) -> None:
        pass

    def disk_free_bytes(self):
        return None  # unknown: the node offers its capacity_bytes


def decoded(msg: protocol.Message) -> protocol.Message:
    """``msg`` as the peer gets it: encoded (which refuses a header over the limit) and read back."""
    frame = protocol.encode(msg)
    assert len(frame) <= 4 + protocol.MAX_HEADER_BYTES
    return protocol.read_message(io.BytesIO(frame))


def test_million_extent_inventory_pages_fit_and_reassemble(tmp_path):
    """A node with a million extents (one blob of 400,000) reports them in frames that fit; the master gets them all."""
    inventory = {"huge" + "0" * 28: [(i * 1024, 1024) for i in range(400_000)]}
    for b in range(60_000):
        inventory[f"{b:032x}"] = [(i * 1024, 1024) for i in range(10)]
    assert sum(map(len, inventory.values())) == 1_000_000
    node = StorageNode(config_module.Config(), str(tmp_path / "node"), store=SyntheticStore(inventory))
    repairer = Repairer(types.SimpleNamespace(config=config_module.Config(), clock=time.monotonic,
                                              namespace=Namespace()))
    repairer.begin_report(node.node_id)
    frames = []

    class PagesToRepairer:
        def request(self, msg, reply_cls):
            page = decoded(msg)
            frames.append(protocol.json_size(page.blobs))
            repairer.add_inventory(page.node_id, page.blobs, page.done)
            return reply_cls()

    node.send_inventory(PagesToRepairer())
    reports = []
    repairer.reconcile = lambda node_id, snapshot, got, quarantined: reports.append((node_id, got))
    repairer._reconcile_pending()
    assert reports == [(node.node_id, inventory)]
    assert len(frames) > 100 and max(frames) <= protocol.PAGE_BYTES


def test_inventory_pages_split_a_blob_join_slices_and_keep_the_budget():
    """inventory_pages cuts by bytes, carries a long blob over pages, joins consecutive slices, and always ends."""
    assert list(protocol.inventory_pages([])) == [([], True)]
    slices = [("a", [(0, 1), (1, 1)]), ("a", [(2, 1)]), ("b", [(i, 7) for i in range(0, 700, 7)])]
    pages = list(protocol.inventory_pages(slices, budget=200))
    assert [last for _, last in pages] == [False] * (len(pages) - 1) + [True]
    assert all(protocol.json_size(page) <= 200 for page, _ in pages)
    assert pages[0][0][0] == ["a", [(0, 1), (1, 1), (2, 1)]]
    merged: dict[str, list] = {}
    for page, _ in pages:
        for blob, extents in page:
            merged.setdefault(blob, []).extend(tuple(e) for e in extents)
    assert merged == {"a": [(0, 1), (1, 1), (2, 1)], "b": [(i, 7) for i in range(0, 700, 7)]}
    assert sum(1 for page, _ in pages for blob, _ in page if blob == "b") > 1


def test_chunk_store_inventory_in_slices_is_the_whole_inventory(tmp_path):
    """ChunkStore.iter_inventory gives every extent once, in slices of the size asked for."""
    with ChunkStore(str(tmp_path / "chunks")) as store:
        for blob in ("b2", "b1"):
            for first in range(0, 10, 2):
                payload = bytes([first]) * 128
                store.put(blob, first, 2, 64, protocol.crcs_to_bytes(protocol.chunk_crcs(payload, 64)), payload)
        slices = list(store.iter_inventory(slice_extents=2))
        assert all(len(extents) <= 2 for _, extents in slices)
        joined: dict[str, list] = {}
        for blob, extents in slices:
            joined.setdefault(blob, []).extend(extents)
        assert joined == store.inventory() and [b for b, _ in slices] == ["b1"] * 3 + ["b2"] * 3


def test_status_lists_damaged_files_within_a_bounded_size():
    """STATUS names the first damaged files in a few KiB, however long their names, and counts them all."""
    repairer = Repairer(types.SimpleNamespace(config=config_module.Config(), clock=time.monotonic,
                                              namespace=Namespace()))
    repairer.damaged_files = [f"{i:04d}" + "\\" * 1000 for i in range(500)]
    status = repairer.status()
    assert 0 < len(status["damaged_files"]) and protocol.json_size(status["damaged_files"]) <= DAMAGED_LIST_BYTES
    assert status["damaged_file_count"] == 500


class FakePool:
    """Stands in for the master's NodePool: every request is encoded and answered locally."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[protocol.Message] = []

    def acquire(self, address):
        pool = self

        class Conn:
            broken = False

            def request(self, msg, reply_cls):
                pool.requests.append(decoded(msg))
                return pool.reply(msg)

        return Conn()

    def release(self, conn) -> None:
        pass


def test_garbage_collection_deletes_many_blobs_in_frames_that_fit(tmp_path):
    """Deleting 10,000 blobs on a node sends DELETE_BLOBS pages that each fit a frame."""
    master = Master(config_module.Config(safe_mode_s=0), str(tmp_path / "master"))
    master.pool = FakePool(lambda msg: protocol.BlobsDeleted(count=len(msg.blobs)))
    master.register(protocol.Register(node_id="n1", host="127.0.0.1", port=9, capacity_bytes=1, used_bytes=0,
                                      chunks=0), "test")
    blobs = {f"{i:032x}" for i in range(10_000)}
    master.start()
    try:
        for blob in blobs:
            master.collect_garbage(blob, ["n1"])
        wait_until(lambda: sum(len(r.blobs) for r in master.pool.requests) >= len(blobs), 10,
                   message="every blob deleted")
    finally:
        master.stop()
    assert {b for r in master.pool.requests for b in r.blobs} == blobs and len(master.pool.requests) > 1


# --- the node's registration loop against an in-process master --------------------------------
class FakeMasterHandler(transport.RequestHandler):
    """Takes REGISTER and HEARTBEAT; answers INVENTORY as the server says."""

    def do_REGISTER(self, msg):
        self.reply(protocol.Registered())

    def do_INVENTORY(self, msg):
        if self.server.refuse_inventory:
            raise protocol.FrameTooLarge("inventory page refused")
        self.reply(protocol.InventoryOk())

    def do_HEARTBEAT(self, msg):
        self.server.corrupt_reports.append(msg.corrupt)
        self.reply(protocol.HeartbeatOk())


@pytest.fixture
def fake_master():
    server = transport.Server(("127.0.0.1", 0), FakeMasterHandler, server_id="master", io_timeout_s=5.0,
                              idle_timeout_s=5.0)
    server.refuse_inventory = False
    server.corrupt_reports = []
    stop = serve_in_thread(server, "fake-master")
    yield server
    stop()


def fake_node(tmp_path, master_server, store, scrub_rate_mb_s: float = 0) -> StorageNode:
    """A StorageNode over ``store`` that registers with ``master_server`` once started."""
    config = config_module.Config(node_master=transport.format_address(master_server.server_address),
                                  heartbeat_interval_s=0.2, io_timeout_s=2.0, scrub_rate_mb_s=scrub_rate_mb_s,
                                  compact_interval_s=3600)
    return StorageNode(config, str(tmp_path / "node"), store=store)


def test_refused_registration_is_logged_as_an_error(tmp_path, fake_master, caplog):
    """A registration that fails for a reason other than the network is an ERROR line, not DEBUG."""
    fake_master.refuse_inventory = True
    caplog.set_level(logging.DEBUG, logger="storage_node")
    node = fake_node(tmp_path, fake_master, SyntheticStore({"b": [(0, 1)]}))
    node.start(("127.0.0.1", 9))
    try:
        wait_until(lambda: refusals(caplog), 10, message="the refusal logged")
    finally:
        node.stop()
    assert all(r.levelno >= logging.ERROR for r in refusals(caplog)), \
        [(r.levelname, r.getMessage()) for r in refusals(caplog)]


def refusals(caplog) -> list:
    """The node's log records about its refused inventory."""
    return [r for r in caplog.records if r.name == "storage_node" and "inventory page refused" in r.getMessage()]


def test_many_corrupt_extents_are_reported_over_several_heartbeats(tmp_path, fake_master):
    """10,000 corrupt extents reach the master in heartbeats that each fit a frame, none lost."""
    rotten = [(f"{i:032x}", i, 1) for i in range(10_000)]
    # The scrubber finds them all at once, before the first heartbeat.
    node = fake_node(tmp_path, fake_master, SyntheticStore(rotten=list(rotten)), scrub_rate_mb_s=1)
    node.start(("127.0.0.1", 9))
    try:
        wait_until(lambda: sum(map(len, fake_master.corrupt_reports)) >= 10_000, 15,
                   message="every corrupt extent reported")
    finally:
        node.stop()
    reported = [tuple(item[:3]) for report in fake_master.corrupt_reports for item in report]
    assert sorted(reported) == rotten
    assert max(protocol.json_size(report) for report in fake_master.corrupt_reports) <= protocol.PAGE_BYTES


# --- real processes ---------------------------------------------------------------------------
FRAGMENTED_CONFIG = """\
[cluster]
chunk_size_bytes = 1024
batch_bytes = 1024
[repair]
scrub_rate_mb_s = 0
"""


def test_fragmented_file_stats_downloads_and_its_node_rejoins(make_cluster, tmp_path):
    """A file of 10,240 one-chunk batches (a 10 GiB file at default batches): stat pages, download, node restart."""
    config_path = tmp_path / "fragmented.ini"
    config_path.write_text(FRAGMENTED_CONFIG)
    cluster = make_cluster(config_path=str(config_path), master_args=FAST_MASTER, node_args=FAST_TIMING)
    seed = 9_404
    data = random_bytes(seed, 10 * 1024 * 1024)
    local = tmp_path / "fragmented.bin"
    local.write_bytes(data)
    client = cluster.client()
    try:
        client.upload_file(str(local), "fragmented")
        first_page = client.stat("fragmented", all_runs=False)
        assert 0 <= first_page.next_chunk and len(first_page.runs) < first_page.run_count
        assert sum(first_page.node_chunks.values()) == 2 * 10_240
        runs = client.stat("fragmented").runs
        assert len(runs) == first_page.run_count and runs[0][0] == 0
        assert all(a[0] + a[1] == b[0] for a, b in zip(runs, runs[1:])) and runs[-1][0] + runs[-1][1] == 10_240
        result = cluster.cli("stat", "fragmented")
        assert result.returncode == 0 and f"({first_page.run_count} runs: add --runs" in result.stdout.decode()

        with open(os.path.join(cluster.node_data_dir(0), "node.json"), encoding="utf-8") as f:
            node_id = json.load(f)["node_id"]
        master_log = cluster.master.log_path
        reported = re.compile(rf"node {node_id} reported its inventory")
        cluster.restart_node(0)
        wait_until(lambda: len(reported.findall(read_text(master_log))) >= 2, 30, message="node re-registered")
        cluster.wait_nodes_alive(3)
        restored = tmp_path / "restored.bin"
        client.download("fragmented", str(restored))
        assert sha256(restored.read_bytes()) == sha256(data), f"seed {seed}"
        assert client.stat("fragmented").runs == runs
    finally:
        client.close()
    node_log = read_text(cluster.nodes[0].log_path)
    assert "exceeds" not in node_log and " ERROR " not in node_log


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_connection_flood_keeps_servers_under_their_memory_targets():
    """300 connections sending a 1 MiB body each keep the master under 100 MiB and a node under 64 MiB."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "flood.py"), "--connections", "300",
                             "--modes", "body", "--hold", "0.5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
