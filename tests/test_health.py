"""Health model, metrics text, JSON views, status page access and log files: the pure parts, no cluster.

The process tests (health through the CLI, /api/status, /metrics, the page
in a real browser) are in test_status_page.py.
"""

from __future__ import annotations

import http.client
import json
import logging
import os

import pytest
from prometheus_client import parser as prometheus_parser  # test-only (requirements-dev.txt)

from conftest import ROOT

import config as config_module
import health
import logsetup
import metrics
import monitor as monitor_module
import security
import views
import web_status
from namespace import Namespace, make_entry, put_record


KIB = 1024


def entry(size: int, runs: list, chunk_size: int = KIB) -> dict:
    return {"size": size, "chunks": -(-size // chunk_size), "chunk_size": chunk_size, "runs": runs,
            "mtime": 1_700_000_000.0, "version": "v" * 32, "sha256": ""}


def node(node_id: str, state: str = health.ALIVE, used: int = 0, capacity: int = 100 * KIB, full: bool = False,
         placed: int = 0, heard: float | None = 0.1) -> dict:
    return {"id": node_id, "address": f"127.0.0.1:{1000 + int(node_id[1:])}", "state": state, "alive": state == "alive",
            "last_heard_s": heard, "capacity_bytes": capacity, "used_bytes": used, "chunks": 0, "full": full,
            "placed_chunks": placed, "free_bytes": capacity - used}


def facts_for(nodes: list, files: dict | None = None, replication: int = 2, safe_mode: bool = False,
              scrub_recent: int = 0, repaired: int = 0, rate: float = 0.0) -> dict:
    alive = {n["id"] for n in nodes if n["state"] in (health.ALIVE, health.REPORTING)}
    census = health.take_census((files or {}).items(), alive, replication)
    for n in nodes:
        n["placed_chunks"] = census.placed.get(n["id"], 0)
    facts = {
        "time": 1_700_000_100.0, "replication": replication, "dead_after_s": 10.0, "nodes": nodes,
        "totals": {"file_bytes": sum(e["size"] for e in (files or {}).values())}, "refused": [], "census": census,
        "repair": {"safe_mode": safe_mode, "safe_mode_left_s": 7.0, "nodes_known": len(nodes),
                   "nodes_reported": len(alive), "under_replicated_chunks": census.degraded_chunks,
                   "repairs_pending": 0, "repaired_chunks": repaired, "repaired_bytes": repaired * KIB,
                   "episode_repaired_chunks": repaired, "rate_chunks_per_s": rate,
                   "eta_s": census.degraded_chunks / rate if rate else None},
        "scrub_errors_recent": scrub_recent, "scrub_errors_by_node": {"n1": scrub_recent} if scrub_recent else {},
        "corrupt_replicas_found": scrub_recent,
    }
    facts["health"] = health.evaluate(facts)
    return facts


def codes(facts: dict) -> list[str]:
    return [c["code"] for c in facts["health"]["checks"]]


# --- census and checks ---------------------------------------------------------------------------
def test_census_counts_live_copies_per_chunk():
    """Chunks are counted by live copies; files with a chunk of no live copy are unavailable, of no copy lost."""
    files = {
        "ok": entry(3 * KIB, [[0, 3, ["n1", "n2"]]]),
        "degraded": entry(4 * KIB, [[0, 2, ["n1", "n2"]], [2, 2, ["n1", "n3"]]]),
        "unavailable": entry(KIB, [[0, 1, ["n3", "n4"]]]),
        "lost": entry(2 * KIB, [[0, 1, []], [1, 1, ["n1", "n2"]]]),
    }
    census = health.take_census(files.items(), alive={"n1", "n2"}, replication=2)
    assert census.copies == {2: 3 + 2 + 1, 1: 2, 0: 1 + 1}
    assert (census.degraded_chunks, census.degraded_bytes, census.degraded_files) == (2, 2 * KIB, 1)
    assert (census.unavailable_chunks, census.unavailable_files) == (1, ["unavailable"])
    assert (census.lost_chunks, census.lost_files, census.lost_file_count) == (1, ["lost"], 1)
    assert census.placed == {"n1": 3 + 4 + 1, "n2": 3 + 2 + 1, "n3": 2 + 1, "n4": 1}


def test_census_counts_shared_runs_of_versions_once_and_names_damaged_old_versions():
    """An older version's runs count too, a run it shares with the current one once; a damaged one is named with its id."""
    current = {**entry(2 * KIB, [[0, 1, ["n1", "n2"]], [1, 1, ["n1", "n2"], "b-new"]]), "commit_index": 9}
    shared = {**entry(KIB, [[0, 1, ["n1", "n2"]]]), "commit_index": 5}  # an append's base: run 0 shared
    lost = {**entry(KIB, [[0, 1, []]]), "version": "w" * 32, "commit_index": 3}
    census = health.take_census([("f", lost), ("f", shared), ("f", current)], {"n1", "n2"}, 2, {"f": current})
    assert census.copies == {2: 2, 0: 1} and census.chunks == 3 and census.files == 1
    assert census.lost_files == ["f (version 3)"]


def test_all_healthy_is_ok_with_no_checks():
    """Every chunk at replication on live nodes with room: HEALTH_OK and no check."""
    facts = facts_for([node("n1"), node("n2"), node("n3")], {"f": entry(2 * KIB, [[0, 2, ["n1", "n2"]]])})
    assert facts["health"] == {"status": health.OK, "checks": []}
    assert health.summary_line(facts["health"]) == "HEALTH_OK"


def test_dead_node_with_data_is_node_down_and_chunks_degraded_warn():
    """A dead node holding chunks: NODE_DOWN and CHUNKS_DEGRADED, both WARN, with progress and ETA in the summary."""
    files = {"f": entry(4 * KIB, [[0, 4, ["n1", "n3"]]])}
    facts = facts_for([node("n1"), node("n2"), node("n3", health.DEAD, heard=12.0)], files, repaired=4, rate=2.0)
    assert facts["health"]["status"] == health.WARN
    assert codes(facts) == ["NODE_DOWN", "CHUNKS_DEGRADED"]
    down, degraded = facts["health"]["checks"]
    assert down["count"] == 1 and "not heard for 12 s" in down["detail"][0] and "4 chunk(s)" in down["detail"][0]
    assert degraded["count"] == 4
    assert "50% done" in degraded["summary"] and "ETA 0:02" in degraded["summary"], degraded


def test_dead_node_without_data_does_not_warn():
    """Once nothing is placed on a dead node (its chunks were re-copied), NODE_DOWN clears: Ceph's down-and-out."""
    files = {"f": entry(KIB, [[0, 1, ["n1", "n2"]]])}
    facts = facts_for([node("n1"), node("n2"), node("n3", health.DEAD, heard=60.0)], files)
    assert facts["health"]["status"] == health.OK


def test_too_few_live_nodes_is_an_error():
    """Fewer live nodes than replication: INSUFFICIENT_NODES, HEALTH_ERR; repair says it waits."""
    files = {"f": entry(KIB, [[0, 1, ["n1", "n2"]]])}
    facts = facts_for([node("n1"), node("n2", health.DEAD, heard=30.0)], files)
    assert facts["health"]["status"] == health.ERR
    assert codes(facts) == ["INSUFFICIENT_NODES", "NODE_DOWN", "CHUNKS_DEGRADED"]
    assert "no other live node" in facts["health"]["checks"][2]["summary"]


def test_lost_and_unavailable_chunks_are_errors_naming_files():
    """No copy left: DATA_LOST; every holder down: DATA_UNAVAILABLE; both ERR and name the files."""
    files = {"gone": entry(KIB, [[0, 1, []]]), "away": entry(KIB, [[0, 1, ["n3"]]])}
    facts = facts_for([node("n1"), node("n2"), node("n3", health.DEAD, heard=30.0)], files)
    assert facts["health"]["status"] == health.ERR
    assert codes(facts)[:2] == ["DATA_LOST", "DATA_UNAVAILABLE"]
    lost, unavailable = facts["health"]["checks"][:2]
    assert lost["detail"] == ["gone"] and unavailable["detail"] == ["away"]


def test_full_nodes_warn_and_become_an_error_when_too_few_have_room():
    """One full node of three is a warning; two full of three leave one with room: an error."""
    warn = facts_for([node("n1", full=True, used=100 * KIB), node("n2"), node("n3")])
    assert codes(warn) == ["NODE_FULL"] and warn["health"]["status"] == health.WARN
    err = facts_for([node("n1", full=True), node("n2", full=True), node("n3")])
    assert err["health"]["checks"][0]["severity"] == health.ERR and "uploads fail" in health.summary_line(err["health"])
    assert "free space with delete --purge --yes NAME or prune" in err["health"]["checks"][0]["summary"]
    err["totals"]["trash_bytes"] = 3 * KIB  # the trash holds data: say a plain delete does not help
    assert "(the trash holds 3.0 KiB: a plain delete frees nothing" in health.evaluate(err)["checks"][0]["summary"]


def test_nearfull_safe_mode_and_scrub_errors_warn():
    """Used past NEARFULL_RATIO, safe mode, and recent corrupt copies are each a warning."""
    facts = facts_for([node("n1", used=90 * KIB), node("n2"), node("n3")], safe_mode=True, scrub_recent=3)
    assert codes(facts) == ["SAFE_MODE", "NODE_NEARFULL", "SCRUB_ERRORS"]
    assert facts["health"]["status"] == health.WARN
    assert "3 corrupt copies" in health.summary_line(facts["health"])
    assert health.detail_lines(facts["health"])[0] == "HEALTH_WARN"
    assert "    node n1: 3 reported by its scrubber since the master started" in health.detail_lines(facts["health"])


def test_refused_nodes_and_held_orphans_warn():
    """A refused node is NODE_REFUSED; a tripped orphan brake or quarantined orphans are ORPHANS_HELD; both WARN."""
    braked = {**node("n1"), "brake": True}
    holding = {**node("n2"), "quarantined_bytes": 3 * KIB}
    facts = facts_for([braked, holding, node("n3")])
    facts["refused"] = [{"id": "x9", "address": "127.0.0.1:9", "reason": "it belongs to cluster c-other"}]
    checks = health.evaluate(facts)
    assert checks["status"] == health.WARN and [c["code"] for c in checks["checks"]] == ["NODE_REFUSED",
                                                                                         "ORPHANS_HELD"]
    refused, orphans = checks["checks"]
    assert refused["detail"] == ["node x9 at 127.0.0.1:9: it belongs to cluster c-other"]
    assert orphans["count"] == 2 and "reclaim-orphans" in orphans["summary"] and "3.0 KiB" in orphans["summary"]


def test_nearfull_counts_against_what_the_disk_can_hold():
    """A node offering more than its disk holds is nearly full by usable_bytes, not capacity_bytes."""
    small_disk = {**node("n1", used=45 * KIB), "usable_bytes": 50 * KIB}
    assert codes(facts_for([small_disk, node("n2"), node("n3")])) == ["NODE_NEARFULL"]
    assert codes(facts_for([node("n1", used=45 * KIB), node("n2"), node("n3")])) == []


def test_node_state_prefers_the_masters_word_and_derives_otherwise():
    """state from STATUS_REPLY wins; without it: waiting/dead when never heard, dead past dead_after_s."""
    assert health.node_state({"state": "stopped", "last_heard_s": 1.0}, 10.0, False) == health.STOPPED
    assert health.node_state({"last_heard_s": None}, 10.0, True) == health.WAITING
    assert health.node_state({"last_heard_s": None}, 10.0, False) == health.DEAD
    assert health.node_state({"last_heard_s": 11.0, "alive": False}, 10.0, False) == health.DEAD
    assert health.node_state({"last_heard_s": 1.0, "alive": False}, 10.0, False) == health.REPORTING
    assert health.node_state({"last_heard_s": 1.0, "alive": True}, 10.0, False) == health.ALIVE


def test_every_check_code_is_listed_for_the_metrics():
    """CHECK_CODES names every code a check function can emit (metrics show 0 for the passing ones)."""
    files = {"gone": entry(KIB, [[0, 1, []]]), "away": entry(KIB, [[0, 1, ["n4"]]]),
             "low": entry(KIB, [[0, 1, ["n1", "n4"]]])}
    nodes = [{**node("n1", full=True), "brake": True}, node("n2", used=99 * KIB), node("n4", health.DEAD, heard=20.0)]
    facts = facts_for(nodes, files, replication=3, safe_mode=True, scrub_recent=1)
    facts["refused"] = [{"id": "x", "address": "127.0.0.1:9", "reason": "another cluster"}]
    facts["masters"] = group(True, None, 30.0)
    assert {c["code"] for c in health.evaluate(facts)["checks"]} == set(health.CHECK_CODES)


def group(leading: bool, *contacts, leader: str = "127.0.0.1:1") -> dict:
    """facts["masters"] for a group of 1 + len(contacts) masters; ``contacts``: the peers' last_contact_s
    (on a follower the first is its leader's, as own_status gives it)."""
    own = {"address": "127.0.0.1:1" if leading else "127.0.0.1:2", "role": "leader" if leading else "follower",
           "term": 4, "commit": 9, "applied": 9, "leader": leader if leading or contacts[0] is not None else "",
           "last_contact_s": 0.0 if leading else contacts[0]}
    peers = [{"address": f"127.0.0.1:{i + 3}", "last_contact_s": c} for i, c in enumerate(contacts)]
    return {"leading": leading, "election_s": 1.0, "rows": [own] + peers}


def test_master_down_and_no_quorum_as_the_leader_sees_its_group():
    """A peer silent past two election timeouts is MASTER_DOWN (WARN); hearing less than a majority
    within one election timeout is NO_QUORUM (ERR)."""
    nodes = [node("n1"), node("n2")]
    facts = facts_for(nodes)
    for contacts, expected in [((0.1, 0.2), []), ((0.1, 2.5), ["MASTER_DOWN"]), ((0.1, None), ["MASTER_DOWN"]),
                               ((1.5, 1.8), ["NO_QUORUM"]), ((5.0, None), ["NO_QUORUM", "MASTER_DOWN"])]:
        facts["masters"] = group(True, *contacts)
        result = health.evaluate(facts)
        assert [c["code"] for c in result["checks"]] == expected, contacts
    assert result["status"] == health.ERR and "hears 1 of 3 masters, 2 needed" in health.summary_line(result)
    assert "master 127.0.0.1:4: not heard since this master started" in health.detail_lines(result)[-1]


def test_a_follower_evaluates_only_the_masters_checks():
    """A follower's node table is empty by design: it must not report the nodes down or the data
    unavailable (it did, and its monitor logged HEALTH_ERR events); it says NO_QUORUM when it hears no leader."""
    files = {"f": entry(KIB, [[0, 1, ["n1", "n2"]]])}
    facts = facts_for([], files)
    assert "INSUFFICIENT_NODES" in codes(facts)  # what an empty node table looks like to the node checks
    facts["masters"] = group(False, 0.2, None)
    assert health.evaluate(facts) == {"status": health.OK, "checks": []}
    facts["masters"] = group(False, None, None)
    result = health.evaluate(facts)
    assert [c["code"] for c in result["checks"]] == ["NO_QUORUM"] and "hears no leader" in health.summary_line(result)


def test_a_follower_records_no_events(tmp_path):
    """Events (and alerts) come from the leader only: a follower's monitor records none."""
    from types import SimpleNamespace  # noqa: PLC0415

    from master import Master  # noqa: PLC0415
    master = Master(config_module.load_config(os.path.join(ROOT, "config.ini")), str(tmp_path / "m"))
    try:
        master.replication = SimpleNamespace(driver=SimpleNamespace(is_leader=False),
                                             status=lambda: group(False, 0.1, 0.1)["rows"])
        monitor = master.monitor
        monitor._previous = {**monitor.facts(), "health": {"status": health.OK, "checks": []}}
        before = len(monitor.events.recent())
        monitor.sample()
        assert len(monitor.events.recent()) == before and monitor.health()["status"] == health.OK
    finally:
        master.replication = None
        master.stop()


# --- metrics -------------------------------------------------------------------------------------
def test_metrics_parse_as_prometheus_text_with_bounded_labels():
    """/metrics text parses with prometheus_client; health, copies, per-node and per-op series are there."""
    files = {"photos/a.jpg": entry(4 * KIB, [[0, 4, ["n1", "n3"]]])}
    facts = facts_for([node("n1"), node("n2"), node("n3", health.DEAD, heard=12.0)], files, rate=1.5)
    stats = monitor_module.RequestStats()
    stats.request_done("upload", 0.003)
    stats.request_done("upload", 400.0)  # past the largest bucket
    stats.request_done("status", 0.0001)
    stats.error_sent("FILE_NOT_FOUND")
    stats.moved("upload", 4096)
    stats.upload_acknowledged("photos/a.jpg", 1_700_000_050.5)
    text = metrics.render(facts, stats.snapshot(), 1_700_000_000.0)

    families = {f.name: f for f in prometheus_parser.text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("backup_health_status", ())] == 1
    assert samples[("backup_health_check", (("check", "NODE_DOWN"),))] == 1
    assert samples[("backup_health_check", (("check", "DATA_LOST"),))] == 0
    assert samples[("backup_chunks", (("copies", "1"),))] == 4
    assert samples[("backup_chunks", (("copies", "0"),))] == 0
    assert samples[("backup_nodes", (("state", "dead"),))] == 1
    assert samples[("backup_node_up", (("node", "n3"),))] == 0
    assert samples[("backup_repair_eta_seconds", ())] == pytest.approx(4 / 1.5)
    assert samples[("backup_requests_total", (("op", "upload"),))] == 2
    assert samples[("backup_errors_total", (("code", "FILE_NOT_FOUND"),))] == 1
    assert samples[("backup_transferred_bytes_total", (("op", "upload"),))] == 4096
    assert samples[("backup_last_success_timestamp_seconds", (("prefix", "photos"),))] == 1_700_000_050.5
    upload_buckets = {dict(k)["le"]: v for (name, k), v in samples.items()
                      if name == "backup_request_duration_seconds_bucket" and dict(k)["op"] == "upload"}
    assert upload_buckets["0.005"] == 1 and upload_buckets["300.0"] == 1 and upload_buckets["+Inf"] == 2
    assert families["backup_requests"].type == "counter"
    assert families["backup_request_duration_seconds"].type == "histogram"
    for name, labels in samples:
        assert name.startswith("backup_"), name
        assert {key for key, _ in labels} <= {"check", "copies", "node", "state", "op", "code", "le", "prefix",
                                              "reason"}, (name, labels)
    assert "a.jpg" not in text  # never a file name


def test_last_success_labels_are_bounded():
    """Past MAX_PREFIX_LABELS top-level names, later ones share the _other label."""
    stats = monitor_module.RequestStats()
    for i in range(monitor_module.MAX_PREFIX_LABELS + 5):
        stats.upload_acknowledged(f"top{i}/file", 1000.0 + i)
    last = stats.snapshot()["last_success"]
    assert len(last) == monitor_module.MAX_PREFIX_LABELS + 1
    assert last[monitor_module.OTHER_PREFIX] == 1000.0 + monitor_module.MAX_PREFIX_LABELS + 4


# --- views ---------------------------------------------------------------------------------------
def test_times_are_unix_seconds_and_iso_8601_utc():
    """Every point in time is given as t and t_iso."""
    assert views.stamped("mtime", 1_700_000_000.25) == {"mtime": 1_700_000_000.25,
                                                         "mtime_iso": "2023-11-14T22:13:20.250Z"}
    document = views.list_document("a/", [{"name": "a/x", "size": 5, "chunks": 1, "mtime": 0.0}])
    assert document == {"prefix": "a/", "count": 1, "total_bytes": 5,
                        "files": [{"name": "a/x", "size": 5, "chunks": 1, "mtime": 0.0,
                                   "mtime_iso": "1970-01-01T00:00:00.000Z"}]}


def test_browse_groups_one_level_below_the_prefix():
    """/api/files lists subdirectories (with file counts and sizes) and files directly under the prefix."""
    namespace = Namespace()
    for name, size in (("a/x", 3), ("a/b/y", 4), ("a/b/z", 5), ("ab", 6), ("c", 7)):
        namespace.apply({"i": 1, **put_record(name, make_entry(size, KIB, "", name.replace("/", "-"), [], 1024))})
    top = web_status.browse(namespace, "")
    assert [d["name"] for d in top["directories"]] == ["a/"] and top["directories"][0]["files"] == 3
    assert [f["name"] for f in top["files"]] == ["ab", "c"]
    namespace.apply({"i": 2, **put_record("a/x", make_entry(8, KIB, "", "a-x2", [], 1024)), "keep": 10})
    inner = web_status.browse(namespace, "a/")
    assert [(d["name"], d["size"]) for d in inner["directories"]] == [("a/b/", 9)]
    assert [(f["name"], f["size"], f["version"], f["version_id"], f["versions"]) for f in inner["files"]] == \
        [("a/x", 8, "a-x2", 2, 2)]
    assert not inner["truncated"]


# --- status page access ---------------------------------------------------------------------------
def test_page_token_follows_protected_mode():
    """Loopback: open; beyond: [http] token, else derived from the secret, else refused unless insecure."""
    no_token = config_module.load_config()
    with_token = config_module.load_config(http_token="chosen")
    secret = security.Security(secret=b"s3cret")
    assert web_status.page_token(no_token, security.NO_SECURITY, "127.0.0.1", False) is None
    assert web_status.page_token(with_token, security.NO_SECURITY, "127.0.0.1", False) == "chosen"
    assert web_status.page_token(no_token, secret, "0.0.0.0", False) == web_status.http_token(b"s3cret")
    assert web_status.http_token(b"s3cret") != web_status.http_token(b"other") and \
        "s3cret" not in web_status.http_token(b"s3cret")
    with pytest.raises(ValueError, match="without a token"):
        web_status.page_token(no_token, security.NO_SECURITY, "0.0.0.0", False)
    assert web_status.page_token(no_token, security.NO_SECURITY, "0.0.0.0", True) is None


class _FakeMonitor:
    """What StatusServer needs of a Monitor, without a master."""

    def __init__(self):
        facts = facts_for([node("n1"), node("n2")])
        self.started = 1_700_000_000.0
        self.stats = monitor_module.RequestStats()
        self.events = monitor_module.EventLog()
        self.master = type("M", (), {"namespace": Namespace()})()
        self._facts = facts

    def facts(self):
        return self._facts

    def clock(self):
        return 1_700_000_100.0


@pytest.fixture
def page_server():
    """Start a StatusServer on 127.0.0.1, any port, with a given token; stopped after the test."""
    servers = []

    def start(token):
        server = web_status.start(_FakeMonitor(), "127.0.0.1", config_module.HTTP_ANY_PORT, token, "127.0.0.1:1")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def get(server, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_protected_page_refuses_data_without_the_token(page_server):
    """With a token, /api/status, /api/files and /metrics answer 401 unless it is sent; the static page is served."""
    server = page_server("tok-123")
    for path in ("/api/status", "/api/files?prefix=", "/metrics"):
        assert get(server, path)[0] == 401, path
        assert get(server, path, {"Authorization": "Bearer wrong"})[0] == 401, path
        assert get(server, path, {"Authorization": "Bearer tok-123"})[0] == 200, path
    status, body = get(server, "/")
    assert status == 200 and b"app.js" in body
    assert json.loads(get(server, "/api/status", {"Authorization": "Bearer tok-123"})[1])["health"]["status"] == \
        "HEALTH_OK"


def test_open_loopback_page_refuses_foreign_host_names(page_server):
    """An open page answers only requests naming a loopback host (DNS rebinding gets 403)."""
    server = page_server(None)
    assert get(server, "/api/status")[0] == 200
    assert get(server, "/api/status", {"Host": "localhost:1234"})[0] == 200
    assert get(server, "/api/status", {"Host": "evil.example:80"})[0] == 403
    assert get(server, "/nope")[0] == 404


# --- logs ----------------------------------------------------------------------------------------
def test_log_file_rotates_by_size_and_json_lines_parse(tmp_path, monkeypatch):
    """--log-file rotates at LOG_MAX_BYTES keeping LOG_BACKUPS files; --log-format json is one object per line."""
    monkeypatch.setattr(logsetup, "LOG_MAX_BYTES", 2000)
    path = tmp_path / "logs" / "master.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logsetup.configure("master", "INFO", str(path), "json")
        log = logging.getLogger("master.test")
        for i in range(200):
            log.info("line %d of the test", i)
        for handler in root.handlers:
            handler.flush()
        lines = path.read_text().splitlines()
        record = json.loads(lines[-1])
        assert record["message"] == "line 199 of the test" and record["level"] == "INFO"
        assert record["process"] == "master" and record["time_iso"].endswith("Z")
        rotated = sorted(p.name for p in path.parent.iterdir())
        assert rotated == ["master.log"] + [f"master.log.{i}" for i in range(1, logsetup.LOG_BACKUPS + 1)]
        assert all(os.path.getsize(path.parent / name) <= 2000 for name in rotated)
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
