"""The master's metrics in the Prometheus text exposition format (version 0.0.4).

``render(facts, stats)`` turns monitor.Monitor's facts and request counters
into the text served at ``/metrics``.  Named by Prometheus' conventions:
prefix ``backup_``, base units (bytes, seconds), counters end in
``_total``, one metric family per meaning with a HELP and TYPE line.
Labels have bounded values only -- node ids, wire ops, error codes, check
codes, top-level names (at most monitor.MAX_PREFIX_LABELS) -- never a file
name.  Every metric is listed with its meaning in docs/METRICS.md.

Pure: the caller passes the numbers; no client library is needed at run
time (the tests parse the output with prometheus_client's parser).
"""

from __future__ import annotations

import math

import health
from monitor import LATENCY_BUCKETS_S

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exposition:
    """Builds the text: ``family(name, type, help)`` then ``sample(...)`` lines."""

    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict | None = None) -> None:
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{key}="{_escape_label(str(val))}"' for key, val in labels.items()) + "}"
        self.lines.append(f"{name}{label_text} {_format_value(value)}")

    def metric(self, name: str, kind: str, help_text: str, samples) -> None:
        """One family and its samples: ``samples`` is [(labels or None, value), ...]."""
        self.family(name, kind, help_text)
        for labels, value in samples:
            self.sample(name, value, labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def render(facts: dict, stats: dict, started_unix: float) -> str:
    """The whole /metrics page; ``stats`` is monitor.RequestStats.snapshot()."""
    out = Exposition()
    nodes = facts["nodes"]
    census: health.Census = facts["census"]
    repair = facts["repair"]
    node_label = [{"node": n["id"]} for n in nodes]

    # --- health -------------------------------------------------------------------------------
    status = facts["health"]["status"]
    out.metric("backup_health_status", "gauge", "Cluster health: 0 = HEALTH_OK, 1 = HEALTH_WARN, 2 = HEALTH_ERR.",
               [(None, health.SEVERITY_RANK[status])])
    firing = {c["code"]: c for c in facts["health"]["checks"]}
    out.metric("backup_health_check", "gauge",
               "Per health check: 0 = passing, 1 = firing as a warning, 2 = firing as an error.",
               [({"check": code}, health.SEVERITY_RANK[firing[code]["severity"]] if code in firing else 0)
                for code in health.CHECK_CODES])
    out.metric("backup_health_check_count", "gauge",
               "Per health check: how many nodes, chunks or files it concerns (0 when passing).",
               [({"check": code}, firing[code]["count"] if code in firing else 0) for code in health.CHECK_CODES])

    # --- masters (a replicated group) -----------------------------------------------------------
    group = facts.get("masters")
    if group:
        own = group["rows"][0]
        out.metric("backup_master_leader", "gauge", "1 if this master leads its replicated group, else 0.",
                   [(None, int(group["leading"]))])
        out.metric("backup_master_term", "gauge", "This master's Raft term.", [(None, own["term"])])
        out.metric("backup_master_commit_index", "gauge", "This master's Raft commit index.",
                   [(None, own["commit"])])
        out.metric("backup_master_applied_index", "gauge", "This master's applied index (its namespace is that recent).",
                   [(None, own["applied"])])
        out.metric("backup_master_last_contact_seconds", "gauge",
                   "Seconds since this master last heard from another master of the group "
                   "(absent: not since it started).",
                   [({"master": m["address"]}, m["last_contact_s"]) for m in group["rows"][1:]
                    if m.get("last_contact_s") is not None])

    # --- nodes --------------------------------------------------------------------------------
    by_state = {state: 0 for state in health.NODE_STATES}
    for n in nodes:
        by_state[n["state"]] = by_state.get(n["state"], 0) + 1
    by_state["refused"] = len(facts.get("refused", []))
    out.metric("backup_nodes", "gauge", "Storage nodes by state (alive, reporting, waiting, dead, stopped, refused).",
               [({"state": state}, count) for state, count in by_state.items()])
    out.metric("backup_node_up", "gauge", "1 if the node is alive and has reported its inventory, else 0.",
               [(label, int(n["state"] == health.ALIVE)) for label, n in zip(node_label, nodes)])
    out.metric("backup_node_capacity_bytes", "gauge", "Bytes the node offers.",
               [(label, n.get("capacity_bytes", 0)) for label, n in zip(node_label, nodes)])
    out.metric("backup_node_usable_bytes", "gauge",
               "Bytes the node can hold in all: used + free (less than capacity on a smaller disk).",
               [(label, health.holds(n)) for label, n in zip(node_label, nodes)])
    out.metric("backup_node_used_bytes", "gauge", "Bytes stored on the node (its last report).",
               [(label, n.get("used_bytes", 0)) for label, n in zip(node_label, nodes)])
    out.metric("backup_node_free_bytes", "gauge", "Bytes the node can still take.",
               [(label, n.get("free_bytes", 0)) for label, n in zip(node_label, nodes)])
    out.metric("backup_node_chunks", "gauge", "Chunks stored on the node (its last report).",
               [(label, n.get("chunks", 0)) for label, n in zip(node_label, nodes)])
    out.metric("backup_node_full", "gauge", "1 if the node refuses writes (capacity reached or disk full).",
               [(label, int(bool(n.get("full")))) for label, n in zip(node_label, nodes)])
    out.metric("backup_node_quarantined_bytes", "gauge",
               "Bytes of orphans (data the master does not know) the node holds in quarantine.",
               [(label, n.get("quarantined_bytes", 0)) for label, n in zip(node_label, nodes)])
    out.metric("backup_node_last_heard_seconds", "gauge",
               "Seconds since the node was last heard from (absent: not heard since the master started).",
               [(label, n["last_heard_s"]) for label, n in zip(node_label, nodes) if n.get("last_heard_s") is not None])
    out.metric("backup_node_scrub_errors_total", "counter",
               "Corrupt copies the node reported (scrubber, compaction) since the master started.",
               [(label, n.get("scrub_errors", 0)) for label, n in zip(node_label, nodes)])

    # --- data ---------------------------------------------------------------------------------
    out.metric("backup_files", "gauge", "Files stored.", [(None, census.files)])
    out.metric("backup_file_bytes", "gauge", "Bytes of all stored files (one copy).",
               [(None, facts["totals"].get("file_bytes", 0))])
    copies = dict(census.copies)
    for wanted in range(facts["replication"] + 1):
        copies.setdefault(wanted, 0)  # the alert-worthy series always exist
    out.metric("backup_chunks", "gauge", "Chunks of stored files (every kept version) by number of live copies.",
               [({"copies": str(k)}, v) for k, v in sorted(copies.items())])
    out.metric("backup_replication", "gauge", "Copies every chunk should have ([cluster] replication).",
               [(None, facts["replication"])])
    out.metric("backup_damaged_files", "gauge",
               "Files with a chunk that has no copy left (lost) or no live copy (unavailable).",
               [({"reason": "lost"}, census.lost_file_count),
                ({"reason": "unavailable"}, census.unavailable_file_count)])

    # --- repair -------------------------------------------------------------------------------
    out.metric("backup_safe_mode", "gauge", "1 while the master is in safe mode (no repair, no deletion).",
               [(None, int(repair["safe_mode"]))])
    out.metric("backup_repairs_pending", "gauge", "Batches queued for re-replication.",
               [(None, repair["repairs_pending"])])
    out.metric("backup_repair_eta_seconds", "gauge",
               "Estimated seconds until every chunk has its copies again (absent when unknown).",
               [(None, repair["eta_s"])] if repair.get("eta_s") is not None else [])
    out.metric("backup_repaired_chunks_total", "counter", "Chunk copies re-replicated since the master started.",
               [(None, repair["repaired_chunks"])])
    out.metric("backup_repaired_bytes_total", "counter", "Bytes re-replicated since the master started.",
               [(None, repair["repaired_bytes"])])
    out.metric("backup_corrupt_replicas_total", "counter",
               "Corrupt copies found (by scrubbers and reads) since the master started.",
               [(None, facts["corrupt_replicas_found"])])

    # --- requests -----------------------------------------------------------------------------
    out.metric("backup_requests_total", "counter", "Requests served, by wire op (upload, append and write apart).",
               [({"op": op}, count) for op, count in sorted(stats["requests"].items())])
    out.family("backup_request_duration_seconds", "histogram",
               "Time from a request's first frame until the master is done with it, by op.")
    for op, buckets in sorted(stats["latency"].items()):
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS_S, buckets):
            cumulative += count
            out.sample("backup_request_duration_seconds_bucket", cumulative, {"op": op, "le": _format_value(bound)})
        cumulative += buckets[len(LATENCY_BUCKETS_S)]
        out.sample("backup_request_duration_seconds_bucket", cumulative, {"op": op, "le": "+Inf"})
        out.sample("backup_request_duration_seconds_sum", float(buckets[-1]), {"op": op})
        out.sample("backup_request_duration_seconds_count", cumulative, {"op": op})
    out.metric("backup_errors_total", "counter", "ERROR replies sent, by error code.",
               [({"code": code}, count) for code, count in sorted(stats["errors"].items())])
    out.metric("backup_transferred_bytes_total", "counter",
               "File bytes received from clients (op=upload: uploads, appends, writes) and sent (op=download).",
               [({"op": op}, count) for op, count in sorted(stats["bytes"].items())])
    out.metric("backup_uploads_total", "counter", "Uploads, appends and writes acknowledged (committed).",
               [(None, stats["uploads_acknowledged"])])
    out.metric("backup_last_success_timestamp_seconds", "gauge",
               "Unix time of the last acknowledged upload under each top-level name (first path component).",
               [({"prefix": prefix}, when) for prefix, when in sorted(stats["last_success"].items())])
    out.metric("backup_master_start_time_seconds", "gauge", "Unix time the master started.",
               [(None, started_unix)])
    return out.text()
