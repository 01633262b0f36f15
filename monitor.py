"""The master watching itself: facts for health, events, repair rate, request counters.

``Monitor`` is the one place that turns the master's state into what an
operator reads: ``facts()`` gathers the node table (Master.status), a
census of live copies (health.take_census) and repair progress, for
``health.evaluate``, the web page (web_status.py) and the metrics
(metrics.py).  It changes nothing in the master.

A background thread samples the facts every few seconds, which gives what
a single look cannot: recent events (node down or back, health changes,
repairs starting and finishing, data lost: a ring buffer of the last
EVENT_RING_SIZE), the repair rate and ETA, and corrupt copies found in the
last hour.  The sample interval grows with the cost of a census, so a huge
namespace is never scanned more than about a tenth of the time.

``ObservedHandler`` is a mixin for the master's request handler that counts
requests, latencies, errors and bytes per op, and the time of the last
acknowledged upload under each top-level name.  It only observes frames.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import health
import history
import protocol
import views

logger = logging.getLogger("master.monitor")

EVENT_RING_SIZE = 200
# Repair rate = chunks re-copied over this window of samples.
RATE_WINDOW_S = 30.0
# Samples at most this often, and at least every MAX_SAMPLE_INTERVAL_S.
MIN_SAMPLE_INTERVAL_S = 0.2
MAX_SAMPLE_INTERVAL_S = 5.0
# facts() computed this recently is reused (a page and a scrape at once);
# longer when computing them is costly (a huge namespace), so that pages
# and scrapes cannot spend more than about a tenth of a core on them.
FACTS_CACHE_S = 0.2
# Request latency buckets, seconds: from a cached STAT to a large upload.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     300.0)
# Top-level names tracked for backup_last_success_timestamp_seconds: a label
# per name, bounded so a flat namespace of a million files cannot blow up
# the metrics; later names share the label OTHER_PREFIX.
MAX_PREFIX_LABELS = 100
OTHER_PREFIX = "_other"


_EVENT_LOG_LEVELS = {"health": logging.INFO, "data_lost": logging.ERROR}


def top_level(name: str) -> str:
    """'photos/2024/a.jpg' -> 'photos'; 'notes.txt' -> 'notes.txt'."""
    return name.split("/", 1)[0]


class EventLog:
    """The last ``size`` events, oldest first; thread-safe."""

    def __init__(self, size: int = EVENT_RING_SIZE, clock=time.time):
        self._events: deque = deque(maxlen=size)
        self._lock = threading.Lock()
        self.clock = clock

    def add(self, kind: str, severity: str, message: str) -> None:
        """``severity`` (info, warning or error) is for the page.  The log gets health
        changes (INFO) and lost data (ERROR); deaths, returns and repairs are
        logged where they happen, so their events are DEBUG lines."""
        with self._lock:
            self._events.append({"time": round(self.clock(), 3), "kind": kind, "severity": severity,
                                 "message": message})
        logger.log(_EVENT_LOG_LEVELS.get(kind, logging.DEBUG), "event %s: %s", kind, message)

    def recent(self) -> list[dict]:
        with self._lock:
            return list(self._events)


class RequestStats:
    """Counters of requests served, by op and error code; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # op -> count
        self.latency: dict[str, list] = {}  # op -> [bucket counts..., +Inf count, sum]
        self.errors: dict[str, int] = {}  # error code -> ERROR frames sent
        self.bytes: dict[str, int] = {"upload": 0, "download": 0}  # file bytes received / sent
        self.uploads_acknowledged = 0
        self.last_success: dict[str, float] = {}  # top-level name -> unix time of the last acknowledged upload

    def request_done(self, op: str, seconds: float) -> None:
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            buckets = self.latency.get(op)
            if buckets is None:
                buckets = self.latency[op] = [0] * (len(LATENCY_BUCKETS_S) + 1) + [0.0]
            for index, bound in enumerate(LATENCY_BUCKETS_S):
                if seconds <= bound:
                    buckets[index] += 1
                    break
            else:
                buckets[len(LATENCY_BUCKETS_S)] += 1
            buckets[-1] += seconds

    def error_sent(self, code: str) -> None:
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def moved(self, op: str, nbytes: int) -> None:
        with self._lock:
            self.bytes[op] += nbytes

    def upload_acknowledged(self, name: str, when: float) -> None:
        with self._lock:
            self.uploads_acknowledged += 1
            self._note_success(top_level(name), when)

    def seed_last_success(self, files: dict) -> None:
        """Start from the namespace: the newest commit time under each top-level name."""
        newest: dict[str, float] = {}
        for name, entry in list(files.items()):
            top = top_level(name)
            newest[top] = max(newest.get(top, 0.0), history.entry_committed_at(entry))
        with self._lock:
            for top, when in sorted(newest.items()):
                self._note_success(top, when)

    def _note_success(self, top: str, when: float) -> None:
        if top not in self.last_success and len(self.last_success) >= MAX_PREFIX_LABELS:
            top = OTHER_PREFIX
        self.last_success[top] = max(self.last_success.get(top, 0.0), when)

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": dict(self.requests), "latency": {op: list(b) for op, b in self.latency.items()},
                    "errors": dict(self.errors), "bytes": dict(self.bytes),
                    "uploads_acknowledged": self.uploads_acknowledged, "last_success": dict(self.last_success)}


class Monitor:
    """Facts, health, events and counters of one master (see the module docstring).

    ``clock``: wall-clock seconds (event times, ages); the master's own
    monotonic clock is used for node ages, as Master.status does.
    """

    def __init__(self, master, clock=time.time):
        self.master = master
        self.clock = clock
        self.started = clock()
        self.events = EventLog(clock=clock)
        self.stats = RequestStats()
        self.stats.seed_last_success(master.namespace.files)
        self.scrub_errors_by_node: dict[str, int] = {}  # corrupt copies each node reported since start
        self._lock = threading.Lock()
        self._progress: deque = deque()  # (monotonic s, repaired_chunks)
        self._corrupt_seen: deque = deque()  # (wall s, corrupt_replicas_found) when it grew
        self._episode_base: int | None = None  # repaired_chunks when the current degradation began
        self._episode_started: float | None = None
        self._rate = 0.0
        self._cached: tuple[float, dict] | None = None
        self._cache_s = FACTS_CACHE_S
        self._previous: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def start(self) -> None:
        self.events.add("master_started", "info", f"master started with {len(self.master.namespace.files)} files")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # --- facts -----------------------------------------------------------------------------
    def facts(self) -> dict:
        """Everything health.evaluate and the views need, computed now (or FACTS_CACHE_S ago)."""
        now_mono = time.monotonic()
        with self._lock:
            if self._cached is not None and now_mono - self._cached[0] < self._cache_s:
                return self._cached[1]
        master = self.master
        config = master.config
        repairer = master.repairer
        safe_mode = repairer.in_safe_mode()
        reply = master.status()
        states = {n["id"]: health.node_state(n, config.dead_after_s, safe_mode) for n in reply.nodes}
        # Live copies are counted on the nodes this same snapshot calls
        # alive, so a node crossing dead_after_s cannot be dead for the
        # census and alive in the table.
        alive = {node_id for node_id, state in states.items() if state in (health.ALIVE, health.REPORTING)}
        census = health.take_census(master.namespace.all_entries(), alive, config.replication, master.namespace.files)
        now = self.clock()
        nodes = []
        for node in reply.nodes:
            view = dict(node)
            view["state"] = states[node["id"]]
            view["placed_chunks"] = census.placed.get(node["id"], 0)
            view["scrub_errors"] = self.scrub_errors_by_node.get(node["id"], 0)
            view.setdefault("free_bytes", max(0, node.get("capacity_bytes", 0) - node.get("used_bytes", 0)))
            nodes.append(view)
        with self._lock:
            rate = self._rate
            episode = 0 if self._episode_base is None else max(0, repairer.repaired_chunks - self._episode_base)
            corrupt_recent = self._corrupt_recent(repairer.corrupt_replicas_found, now)
        known = set(master.namespace.nodes)
        remaining = census.degraded_chunks
        facts = {
            "time": now,
            "replication": config.replication,
            "dead_after_s": config.dead_after_s,
            "nodes": nodes,
            "totals": reply.totals,
            "refused": list(reply.refused),
            "census": census,
            "repair": {
                "safe_mode": safe_mode,
                "safe_mode_left_s": max(0.0, config.safe_mode_s - (master.clock() - repairer.started)),
                "nodes_known": len(known),
                "nodes_reported": len(known & repairer.reported),
                "under_replicated_chunks": repairer.under_replicated_chunks,
                "repairs_pending": repairer.repairs_pending,
                "repaired_chunks": repairer.repaired_chunks,
                "repaired_bytes": repairer.repaired_bytes,
                "episode_repaired_chunks": episode,
                "rate_chunks_per_s": rate,
                "eta_s": remaining / rate if rate > 0 and remaining else None,
            },
            "scrub_errors_recent": corrupt_recent,
            "scrub_errors_by_node": dict(self.scrub_errors_by_node),
            "corrupt_replicas_found": repairer.corrupt_replicas_found,
            "masters": None if master.replication is None else {
                "leading": master.is_leader(), "election_s": config.raft_election_ms / 1000,
                "rows": master.replication.status()},
        }
        facts["health"] = health.evaluate(facts)
        with self._lock:
            self._cached = (now_mono, facts)
            self._cache_s = max(FACTS_CACHE_S, 10 * (time.monotonic() - now_mono))
        return facts

    def health(self) -> dict:
        return self.facts()["health"]

    def _corrupt_recent(self, found_total: int, now: float) -> int:
        """Corrupt copies found within SCRUB_ERRORS_WINDOW_S (caller holds _lock)."""
        seen = self._corrupt_seen
        if not seen or seen[-1][1] != found_total:
            seen.append((now, found_total))
        while len(seen) > 1 and seen[1][0] < now - health.SCRUB_ERRORS_WINDOW_S:
            seen.popleft()
        base = seen[0][1] if seen[0][0] < now - health.SCRUB_ERRORS_WINDOW_S else 0
        # The first entry predates the window: only growth since then counts.
        # found_total starts at 0 with the master, so without an old entry
        # everything found so far is recent.
        return max(0, found_total - base)

    # --- the sampling thread -------------------------------------------------------------------
    def _run(self) -> None:
        interval = max(MIN_SAMPLE_INTERVAL_S, min(self.master.config.heartbeat_interval_s, MAX_SAMPLE_INTERVAL_S))
        while not self._stop.wait(interval):
            try:
                started = time.monotonic()
                self.sample()
                cost = time.monotonic() - started
                interval = max(MIN_SAMPLE_INTERVAL_S, min(self.master.config.heartbeat_interval_s,
                                                          MAX_SAMPLE_INTERVAL_S), 10 * cost)
            except Exception:
                logger.exception("monitor sample failed; retrying")

    def sample(self) -> None:
        """Take fresh facts, update the repair rate, and record what changed as events."""
        with self._lock:
            self._cached = None
        facts = self.facts()
        repair = facts["repair"]
        now_mono = time.monotonic()
        with self._lock:
            progress = self._progress
            progress.append((now_mono, repair["repaired_chunks"]))
            while len(progress) > 2 and progress[1][0] < now_mono - RATE_WINDOW_S:
                progress.popleft()
            span = progress[-1][0] - progress[0][0]
            self._rate = (progress[-1][1] - progress[0][1]) / span if span > 0 else 0.0
            degraded = facts["census"].degraded_chunks
            if degraded and self._episode_base is None:
                self._episode_base, self._episode_started = repair["repaired_chunks"], now_mono
            elif not degraded and self._episode_base is not None:
                repaired = repair["repaired_chunks"] - self._episode_base
                took = now_mono - self._episode_started
                self._episode_base = self._episode_started = None
                self.events.add("repair_done", "info",
                                f"every chunk has {facts['replication']} live copies again "
                                f"({repaired} chunk(s) re-copied in {took:.1f} s)")
        if facts["masters"] is not None and not facts["masters"]["leading"]:
            # Events (and the alerts built on them) are the leader's: a follower's node table is empty
            # by design and would report every node down.  Start afresh if this master leads later.
            self._previous = None
            return
        previous, self._previous = self._previous, facts
        if previous is not None:
            self._record_changes(previous, facts)

    def _record_changes(self, before: dict, after: dict) -> None:
        old_nodes = {n["id"]: n for n in before["nodes"]}
        for node in after["nodes"]:
            old = old_nodes.get(node["id"])
            where = f"node {node['id']} at {node['address']}"
            if old is None:
                self.events.add("node_new", "info", f"{where} joined the cluster")
            elif old["state"] != node["state"]:
                if node["state"] == health.DEAD:
                    self.events.add("node_down", "warning", f"{where} is dead: "
                                    + ("never heard since the master started" if node["last_heard_s"] is None
                                       else f"silent for {node['last_heard_s']:.1f} s"))
                elif node["state"] == health.STOPPED:
                    self.events.add("node_stopped", "warning", f"{where} stopped")
                elif node["state"] == health.ALIVE:
                    self.events.add("node_up", "info", f"{where} is alive ({node['chunks']} chunks)")
            if old is not None and node.get("full") and not old.get("full"):
                self.events.add("node_full", "warning", f"{where} is full")
        old_refused = {r.get("id") for r in before["refused"]}
        for refused in after["refused"]:
            if refused.get("id") not in old_refused:
                self.events.add("node_refused", "warning",
                                f"node {refused.get('id')} at {refused.get('address')} refused: "
                                f"{refused.get('reason')}")
        census_before, census_after = before["census"], after["census"]
        if census_after.degraded_chunks and not census_before.degraded_chunks:
            self.events.add("repair_started", "warning",
                            f"{census_after.degraded_chunks} chunk(s) below {after['replication']} live copies; "
                            + health.repair_progress_text(after))
        if census_after.lost_chunks > census_before.lost_chunks:
            self.events.add("data_lost", "error", f"{census_after.lost_chunks} chunk(s) in "
                            f"{census_after.lost_file_count} file(s) have no copy left: "
                            + ", ".join(census_after.lost_files[:5]))
        found = after["corrupt_replicas_found"] - before["corrupt_replicas_found"]
        if found > 0:
            self.events.add("corrupt_found", "warning", f"{found} corrupt copy(ies) found; re-copying from good ones")
        if before["repair"]["safe_mode"] and not after["repair"]["safe_mode"]:
            self.events.add("safe_mode_off", "info", "safe mode ended: repair and deletion enabled")
        old_health, new_health = before["health"], after["health"]
        old_codes = [c["code"] for c in old_health["checks"]]
        new_codes = [c["code"] for c in new_health["checks"]]
        if old_health["status"] != new_health["status"] or old_codes != new_codes:
            severity = {health.OK: "info", health.WARN: "warning", health.ERR: "error"}[new_health["status"]]
            self.events.add("health", severity, f"{health.summary_line(new_health)} "
                                                f"(was {old_health['status']}{': ' if old_codes else ''}"
                                                f"{', '.join(old_codes)})")

    # --- what request handlers report -----------------------------------------------------------
    def corrupt_reported(self, node_id: str, count: int) -> None:
        with self._lock:
            self.scrub_errors_by_node[node_id] = self.scrub_errors_by_node.get(node_id, 0) + count


class ObservedHandler:
    """Mixin for MasterHandler (before transport.RequestHandler in the bases): feeds ``master.monitor``.

    Counts each request by op (UPLOAD_BEGIN as upload, append or write),
    its latency (from its first frame to the handler's return), every ERROR
    frame sent by code, file bytes received and sent, acknowledged uploads,
    and corrupt copies reported in heartbeats.
    """

    _last_reply = None

    def after_request(self, msg: protocol.Message, elapsed_s: float) -> None:
        monitor = self.server.master.monitor
        op = msg.OP.lower()
        if isinstance(msg, protocol.UploadBegin):
            op = "upload" if msg.mode == "replace" else msg.mode
        monitor.stats.request_done(op, elapsed_s)
        if isinstance(msg, protocol.Heartbeat) and msg.corrupt and isinstance(self._last_reply, protocol.HeartbeatOk):
            monitor.corrupt_reported(msg.node_id, len(msg.corrupt))

    def reply(self, msg: protocol.Message, flush: bool = True) -> None:
        super().reply(msg, flush)
        self._last_reply = msg
        monitor = self.server.master.monitor
        if isinstance(msg, protocol.Error):
            monitor.stats.error_sent(msg.code)
        elif isinstance(msg, protocol.Data):
            monitor.stats.moved("download", len(msg.body))
        elif isinstance(msg, protocol.Uploaded):
            monitor.stats.upload_acknowledged(msg.name, monitor.clock())

    def next_message(self, timeout_s: float | None = None, body_buffer=None):
        msg = super().next_message(timeout_s, body_buffer)
        if isinstance(msg, protocol.Data):
            self.server.master.monitor.stats.moved("upload", len(msg.body))
        return msg


def master_view(master, monitor: Monitor, address: str) -> dict:
    """The one master, as the page's "masters" table shows it (a group: see master_views)."""
    return {"address": address, "role": "leader", "state": "up", **views.stamped("started", monitor.started),
            "uptime_s": round(monitor.clock() - monitor.started, 1)}


def master_views(master, monitor: Monitor, address: str) -> list[dict]:
    """The page's "masters" rows: the one master, or every master of a group as this one sees it
    (its own row first; a peer's ``state`` is "up" when heard within an election timeout)."""
    if getattr(master, "replication", None) is None:  # (the page's tests pass a stand-in master)
        return [master_view(master, monitor, address)]
    now = monitor.clock()
    election_s = master.config.raft_election_ms / 1000
    rows = []
    for index, row in enumerate(master.replication.status()):
        contact = row.get("last_contact_s")
        up = index == 0 or (contact is not None and contact <= election_s * health.MASTER_DOWN_ELECTIONS)
        rows.append({**views.master_document(row, now), "state": "up" if up else "down",
                     **(views.stamped("started", monitor.started) if index == 0 else {}),
                     **({"uptime_s": round(now - monitor.started, 1)} if index == 0 else {})})
    return rows
