"""Cluster health: HEALTH_OK / HEALTH_WARN / HEALTH_ERR with named checks.

An operator's first question is "is my data safe right now?"; Ceph answers
it with ``ceph health detail``, and this module is the same idea for the
backup cluster.  It is pure: ``evaluate(facts)`` takes what the master
knows (node table, a census of live copies per chunk, repair progress; see
monitor.Monitor.facts) and returns the health, without I/O, locks or a
clock, so every check is a unit test away.

Each check is one small function ``facts -> Check | None`` in ``CHECKS``.
A check that fires has a code (stable, for scripts and alerts), a severity
(WARN or ERR), a count (nodes, chunks, files: the summary says which), a
one-line summary and a few detail lines.  The overall status is the worst
severity that fired.  Adding a check is adding one function to ``CHECKS``
(and a line to docs/METRICS.md and the README).

What the checks mean:

* ``NODE_DOWN`` (WARN): a node the namespace still places chunks on is
  dead.  Like Ceph's "down and in": once its chunks have been re-copied to
  other nodes, nothing depends on it and the check clears (the node still
  shows as dead in ``status`` and on the page).
* ``INSUFFICIENT_NODES`` (ERR): fewer live nodes than ``replication``;
  uploads fail.
* ``CHUNKS_DEGRADED`` (WARN): chunks with fewer live copies than
  ``replication`` but at least one; with repair progress and ETA.
* ``DATA_UNAVAILABLE`` (ERR): chunks whose every holder is down; their
  files cannot be read until a holder returns.
* ``DATA_LOST`` (ERR): chunks with no copy left at all (every copy was
  found corrupt or missing); their files are damaged for good.
* ``NODE_FULL`` (WARN, ERR when fewer than ``replication`` live nodes have
  room) and ``NODE_NEARFULL`` (WARN, used >= NEARFULL_RATIO of capacity).
* ``SAFE_MODE`` (WARN): after a master start, nothing is repaired or
  deleted until every known node has reported or ``safe_mode_s`` passed.
* ``SCRUB_ERRORS`` (WARN): corrupt copies were found (by a node's scrubber
  or by a read) within the last SCRUB_ERRORS_WINDOW_S; they are repaired
  from good copies, but a disk that rots deserves a look.
* ``NODE_REFUSED`` (WARN): a node tried to register and was refused (it
  belongs to another cluster, or has seen a newer master); it keeps its
  data and is not used.
* ``ORPHANS_HELD`` (WARN): nodes hold data the master does not know: the
  orphan brake held some back on a node (not even quarantined; an operator
  decides with ``reclaim-orphans``), or orphans sit in quarantine until
  ``orphan_grace_s`` erases them (quarantine.py).

* ``MASTER_DOWN`` (WARN, a replicated group): a master of ``[cluster]
  masters`` the leader has not heard from for MASTER_DOWN_ELECTIONS
  election timeouts (or since it started leading).  The group still has a
  majority; one more loss and it stops.
* ``NO_QUORUM`` (ERR, a replicated group): the leader hears fewer than a
  majority of the masters within an election timeout (it is about to step
  down: writes and reads stop), or, on a master that does not lead, no
  leader has been heard for an election timeout.

Who evaluates: the leader.  A follower's node table is empty by design (the
leader runs the nodes), so on a follower only the masters' checks are
evaluated (its page and /metrics show MASTER_DOWN never, NO_QUORUM when it
hears no leader), and its monitor records no events: alerts come from the
leader once, not from every master.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from history import version_id
from namespace import run_blob
from views import format_duration, human_bytes, plural

OK, WARN, ERR = "HEALTH_OK", "HEALTH_WARN", "HEALTH_ERR"
SEVERITY_RANK = {OK: 0, WARN: 1, ERR: 2}  # also the exit status of `client.py health`

# Ceph's default mon_osd_nearfull_ratio: room for a node's share of a
# re-replication after a failure before it fills.
NEARFULL_RATIO = 0.85
# How long a corrupt copy keeps SCRUB_ERRORS up.  Repairs are automatic, so
# the check is a notice that a disk rots, not a task; an hour is long enough
# to be seen by a person or an alert, short enough to clear by itself.
SCRUB_ERRORS_WINDOW_S = 3600.0
# A master silent for this many election timeouts is MASTER_DOWN: the
# leader hears each follower every heartbeat_ms, so this is no hiccup, and
# an election's worth of silence alone is what NO_QUORUM is about.
MASTER_DOWN_ELECTIONS = 2
# Detail lines per check: enough to name the culprits, bounded so a health
# reply stays small whatever the cluster's size.
MAX_DETAIL_LINES = 20

# Node states, as STATUS_REPLY names them (docs/PROTOCOL.md): heard and
# reported; heard, inventory not in yet; not heard since the master started,
# still expected; silent past dead_after_s (or never heard and no longer
# expected); stopped cleanly (said goodbye).
ALIVE, REPORTING, WAITING, DEAD, STOPPED = "alive", "reporting", "waiting", "dead", "stopped"
NODE_STATES = (ALIVE, REPORTING, WAITING, DEAD, STOPPED)


@dataclass(frozen=True)
class Check:
    code: str
    severity: str  # WARN or ERR
    count: int
    summary: str
    detail: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "count": self.count, "summary": self.summary,
                "detail": list(self.detail[:MAX_DETAIL_LINES])}


@dataclass
class Census:
    """Live copies of every chunk of every file (see ``take_census``)."""

    copies: dict = field(default_factory=dict)  # live copies -> chunks
    degraded_chunks: int = 0  # 0 < live copies < replication
    degraded_bytes: int = 0
    degraded_files: int = 0
    unavailable_chunks: int = 0  # holders recorded, none alive
    unavailable_files: list = field(default_factory=list)  # names, at most MAX_NAMES
    unavailable_file_count: int = 0
    lost_chunks: int = 0  # no holder recorded at all
    lost_files: list = field(default_factory=list)
    lost_file_count: int = 0
    placed: dict = field(default_factory=dict)  # node id -> chunks the namespace places on it
    files: int = 0
    chunks: int = 0

    MAX_NAMES = 100


def take_census(entries, alive: set, replication: int, current: dict | None = None) -> Census:
    """Count live copies per chunk over ``entries``: (name, namespace entry) pairs.

    ``entries`` is every kept version (Namespace.all_entries); ``current``
    (name -> entry, default: the entries themselves) says which are the
    current files, and an older version that is damaged is named
    ``NAME (version ID)``.  Versions share the runs an append or write did
    not touch: a run is counted once, as repair.Repairer.scan does.
    ``alive``: ids of the nodes that serve now.  Costs one pass over the
    runs (a run is a few dozen bytes per batch, never per chunk).
    """
    census = Census()
    entries = list(entries)
    current = dict(entries) if current is None else current
    seen: set[tuple] = set()
    for name, entry in entries:
        is_current = current.get(name) is entry
        if is_current:
            census.files += 1
        degraded = unavailable = lost = False
        for run in entry["runs"]:
            first, count, nodes = run[:3]
            key = (name, run_blob(entry, run), first, count, tuple(nodes))
            if key in seen:
                continue
            seen.add(key)
            census.chunks += count
            live = sum(1 for n in nodes if n in alive)
            census.copies[live] = census.copies.get(live, 0) + count
            for n in nodes:
                census.placed[n] = census.placed.get(n, 0) + count
            if live >= replication:
                continue
            if live:
                census.degraded_chunks += count
                census.degraded_bytes += count * entry["chunk_size"]
                degraded = True
            elif nodes:
                census.unavailable_chunks += count
                unavailable = True
            else:
                census.lost_chunks += count
                lost = True
        census.degraded_files += degraded
        if "trashed_at" in entry:
            name = f"{name} (in the trash, version {version_id(entry)})"
        elif not is_current:
            name = f"{name} (version {version_id(entry)})"
        if unavailable:
            census.unavailable_file_count += 1
            if len(census.unavailable_files) < Census.MAX_NAMES:
                census.unavailable_files.append(name)
        if lost:
            census.lost_file_count += 1
            if len(census.lost_files) < Census.MAX_NAMES:
                census.lost_files.append(name)
    return census


def node_state(node: dict, dead_after_s: float, safe_mode: bool) -> str:
    """The node's state (NODE_STATES): the master's word if STATUS_REPLY carries one, else derived."""
    if node.get("state") in NODE_STATES:
        return node["state"]
    heard = node.get("last_heard_s")
    if heard is None:
        return WAITING if safe_mode else DEAD
    if heard > dead_after_s:
        return DEAD
    return ALIVE if node.get("alive") else REPORTING


# --- the checks: facts -> Check | None ------------------------------------------------------
# ``facts`` (built by monitor.Monitor.facts) holds: replication, nodes (each
# with id, address, state, last_heard_s, capacity_bytes, used_bytes,
# free_bytes, full, placed_chunks), census (Census), repair (dict: safe_mode,
# safe_mode_left_s, nodes_known, nodes_reported, repaired_chunks,
# rate_chunks_per_s, eta_s, episode_repaired_chunks), scrub_errors_recent
# (int) and scrub_errors_by_node ({node id: int}).

def check_node_down(facts: dict) -> Check | None:
    down = [n for n in facts["nodes"] if n["state"] in (DEAD, STOPPED) and n.get("placed_chunks", 0) > 0]
    if not down:
        return None
    detail = [f"node {n['id']} at {n['address']}: " +
              ("stopped" if n["state"] == STOPPED
               else "not heard since the master started" if n["last_heard_s"] is None
               else f"not heard for {n['last_heard_s']:.0f} s") +
              f"; {n['placed_chunks']} chunk(s) placed on it" for n in down]
    return Check("NODE_DOWN", WARN, len(down), f"{plural(len(down), 'node')} down with data on it", tuple(detail))


def check_insufficient_nodes(facts: dict) -> Check | None:
    live = [n for n in facts["nodes"] if n["state"] in (ALIVE, REPORTING)]
    wanted = facts["replication"]
    if len(live) >= wanted:
        return None
    return Check("INSUFFICIENT_NODES", ERR, len(live),
                 f"{plural(len(live), 'node')} alive, {wanted} needed: uploads fail and repair cannot run")


def check_chunks_degraded(facts: dict) -> Check | None:
    census: Census = facts["census"]
    if not census.degraded_chunks:
        return None
    summary = (f"{plural(census.degraded_chunks, 'chunk')} ({human_bytes(census.degraded_bytes)}) in "
               f"{plural(census.degraded_files, 'file')} below {facts['replication']} live copies; "
               + repair_progress_text(facts))
    return Check("CHUNKS_DEGRADED", WARN, census.degraded_chunks, summary)


def repair_progress_text(facts: dict) -> str:
    """'repairing: 40% done, 12.0 MiB/s, ETA 0:35', or why repair waits."""
    repair = facts["repair"]
    if repair["safe_mode"]:
        return "repair starts when safe mode ends"
    live = sum(1 for n in facts["nodes"] if n["state"] == ALIVE)
    if live <= 1 and facts["replication"] > 1:
        return "repair waits: no other live node to copy to"
    done = repair.get("episode_repaired_chunks", 0)
    remaining = facts["census"].degraded_chunks
    text = f"repairing: {done * 100 // max(done + remaining, 1)}% done"
    rate = repair.get("rate_chunks_per_s") or 0.0
    if rate > 0:
        text += f", {rate:.0f} chunks/s, ETA {format_duration(repair['eta_s'])}"
    else:
        text += ", ETA unknown (no progress measured yet)"
    return text


def check_data_unavailable(facts: dict) -> Check | None:
    census: Census = facts["census"]
    if not census.unavailable_chunks:
        return None
    return Check("DATA_UNAVAILABLE", ERR, census.unavailable_chunks,
                 f"{plural(census.unavailable_chunks, 'chunk')} in {plural(census.unavailable_file_count, 'file')} "
                 f"have no live copy (every holder is down): those files cannot be read until one returns",
                 tuple(census.unavailable_files))


def check_data_lost(facts: dict) -> Check | None:
    census: Census = facts["census"]
    if not census.lost_chunks:
        return None
    return Check("DATA_LOST", ERR, census.lost_chunks,
                 f"{plural(census.lost_chunks, 'chunk')} in {plural(census.lost_file_count, 'file')} lost: "
                 f"every copy is corrupt or missing",
                 tuple(census.lost_files))


def check_node_full(facts: dict) -> Check | None:
    live = [n for n in facts["nodes"] if n["state"] == ALIVE]
    full = [n for n in live if n.get("full")]
    if not full:
        return None
    roomy = len(live) - len(full)
    severity = ERR if roomy < facts["replication"] else WARN
    summary = f"{plural(len(full), 'node')} full" + (
        f"; only {roomy} node(s) with room, {facts['replication']} needed: uploads fail{_how_to_free(facts)}"
        if severity == ERR else "; placement avoids it")
    return Check("NODE_FULL", severity, len(full), summary,
                 tuple(f"node {n['id']} at {n['address']}: {_usage(n)}" for n in full))


def _how_to_free(facts: dict) -> str:
    """What makes room on a full cluster: a plain delete only moves files to the trash."""
    trash = facts["totals"].get("trash_bytes", 0)
    return ("; free space with delete --purge --yes NAME or prune"
            + (f" (the trash holds {human_bytes(trash)}: a plain delete frees nothing until it expires)"
               if trash else ""))


def check_node_nearfull(facts: dict) -> Check | None:
    near = [n for n in facts["nodes"] if n["state"] == ALIVE and not n.get("full") and holds(n)
            and n["used_bytes"] >= NEARFULL_RATIO * holds(n)]
    if not near:
        return None
    return Check("NODE_NEARFULL", WARN, len(near),
                 f"{plural(len(near), 'node')} over {NEARFULL_RATIO:.0%} full",
                 tuple(f"node {n['id']} at {n['address']}: {_usage(n)}" for n in near))


def check_safe_mode(facts: dict) -> Check | None:
    repair = facts["repair"]
    if not repair["safe_mode"]:
        return None
    waiting = repair["nodes_known"] - repair["nodes_reported"]
    return Check("SAFE_MODE", WARN, 1,
                 f"safe mode: nothing is repaired or deleted for {repair['safe_mode_left_s']:.0f} s more "
                 f"or until {plural(waiting, 'more node')} report(s) ({repair['nodes_reported']} of "
                 f"{repair['nodes_known']} reported)")


def check_scrub_errors(facts: dict) -> Check | None:
    recent = facts.get("scrub_errors_recent", 0)
    if not recent:
        return None
    by_node = facts.get("scrub_errors_by_node", {})
    return Check("SCRUB_ERRORS", WARN, recent,
                 f"{plural(recent, 'corrupt copy', 'corrupt copies')} found in the last "
                 f"{SCRUB_ERRORS_WINDOW_S / 3600:.0f} h (re-copied from good copies); check those disks",
                 tuple(f"node {node_id}: {count} reported by its scrubber since the master started"
                       for node_id, count in sorted(by_node.items()) if count))


def check_node_refused(facts: dict) -> Check | None:
    refused = facts.get("refused") or []
    if not refused:
        return None
    return Check("NODE_REFUSED", WARN, len(refused),
                 f"{plural(len(refused), 'node')} refused at registration (kept out, its data untouched)",
                 tuple(f"node {r.get('id')} at {r.get('address')}: {r.get('reason')}" for r in refused))


def check_orphans_held(facts: dict) -> Check | None:
    braked = [n for n in facts["nodes"] if n.get("brake")]
    held = [n for n in facts["nodes"] if n.get("quarantined_bytes")]
    if not braked and not held:
        return None
    parts = []
    if braked:
        parts.append(f"orphan brake on {plural(len(braked), 'node')}: data the master does not know held back, "
                     f"not quarantined (check the metadata, then `reclaim-orphans NODE_ID --yes`)")
    if held:
        parts.append(f"{human_bytes(sum(n['quarantined_bytes'] for n in held))} of orphans in quarantine on "
                     f"{plural(len(held), 'node')}, erased after orphan_grace_s")
    detail = [f"node {n['id']}: brake tripped" for n in braked]
    detail += [f"node {n['id']}: {human_bytes(n['quarantined_bytes'])} quarantined" for n in held]
    return Check("ORPHANS_HELD", WARN, len({n["id"] for n in braked + held}), "; ".join(parts), tuple(detail))


# ``facts["masters"]`` (a replicated group only, else absent or None):
# {"leading": bool, "election_s": float, "rows": replication status rows,
# this master's first, each with address and last_contact_s}.

def _silence(row: dict) -> str:
    contact = row.get("last_contact_s")
    return "not heard since this master started" if contact is None else f"not heard for {contact:.1f} s"


def check_master_down(facts: dict) -> Check | None:
    group = facts.get("masters")
    if not group or not group["leading"]:
        return None
    limit = MASTER_DOWN_ELECTIONS * group["election_s"]
    down = [m for m in group["rows"][1:] if m.get("last_contact_s") is None or m["last_contact_s"] > limit]
    if not down:
        return None
    return Check("MASTER_DOWN", WARN, len(down),
                 f"{plural(len(down), 'master')} of {len(group['rows'])} not heard from by the leader",
                 tuple(f"master {m['address']}: {_silence(m)}" for m in down))


def check_no_quorum(facts: dict) -> Check | None:
    group = facts.get("masters")
    if not group:
        return None
    rows, election_s = group["rows"], group["election_s"]
    voters = [rows[0]] + [m for m in rows[1:] if m.get("role") != "learner"]  # learners never count
    majority = len(voters) // 2 + 1
    if group["leading"]:
        heard = 1 + sum(1 for m in voters[1:] if m.get("last_contact_s") is not None
                        and m["last_contact_s"] <= election_s)
        if heard >= majority:
            return None
        return Check("NO_QUORUM", ERR, len(voters) - heard,
                     f"the leader hears {heard} of {len(voters)} masters, {majority} needed: it steps down, "
                     f"and nothing is written or read until a majority is back")
    own = rows[0]
    contact = own.get("last_contact_s")
    if own.get("leader") and contact is not None and contact <= election_s:
        return None
    return Check("NO_QUORUM", ERR, 1,
                 f"master {own['address']} hears no leader"
                 + (f" ({_silence(own)})" if own.get("leader") else "")
                 + ": without a majority of masters nothing is written or read")


# Order = display order: what threatens data first.
CHECKS = (
    check_no_quorum,
    check_data_lost,
    check_data_unavailable,
    check_insufficient_nodes,
    check_node_full,
    check_node_down,
    check_chunks_degraded,
    check_node_refused,
    check_orphans_held,
    check_safe_mode,
    check_node_nearfull,
    check_scrub_errors,
    check_master_down,
)
# Only these are evaluated on a master of a group that does not lead (see the module docstring).
MASTER_CHECKS = (check_no_quorum, check_master_down)
# Every code a check may report, for metrics that must show a 0 for a check
# that does not fire (an alert rule needs the series to exist).
CHECK_CODES = ("NO_QUORUM", "DATA_LOST", "DATA_UNAVAILABLE", "INSUFFICIENT_NODES", "NODE_FULL", "NODE_DOWN",
               "CHUNKS_DEGRADED", "NODE_REFUSED", "ORPHANS_HELD", "SAFE_MODE", "NODE_NEARFULL", "SCRUB_ERRORS",
               "MASTER_DOWN")


def evaluate(facts: dict) -> dict:
    """{"status": HEALTH_*, "checks": [Check.as_dict(), ...]} for ``facts``."""
    group = facts.get("masters")
    evaluated = MASTER_CHECKS if group and not group["leading"] else CHECKS
    checks = [check for check in (fn(facts) for fn in evaluated) if check is not None]
    status = OK
    for check in checks:
        if SEVERITY_RANK[check.severity] > SEVERITY_RANK[status]:
            status = check.severity
    return {"status": status, "checks": [check.as_dict() for check in checks]}


# --- text ------------------------------------------------------------------------------------
def summary_line(health: dict) -> str:
    """One line: ``HEALTH_WARN NODE_DOWN: 1 node down ...; CHUNKS_DEGRADED: ...``."""
    if not health["checks"]:
        return health["status"]
    return health["status"] + " " + "; ".join(f"{c['code']}: {c['summary']}" for c in health["checks"])


def detail_lines(health: dict) -> list[str]:
    """The status line, then one line per check and its detail lines indented (``health --detail``)."""
    lines = [health["status"]]
    for check in health["checks"]:
        lines.append(f"[{check['severity'][7:]}] {check['code']}: {check['summary']}")
        lines += [f"    {line}" for line in check["detail"]]
    return lines


def holds(node: dict) -> int:
    """What a node can hold in all: ``usable_bytes`` (used + free, less than
    ``capacity_bytes`` on a smaller disk) when STATUS gives it, else ``capacity_bytes``."""
    return node.get("usable_bytes") or node.get("capacity_bytes") or 0


def _usage(node: dict) -> str:
    capacity = holds(node)
    share = f" ({node['used_bytes'] / capacity:.0%})" if capacity else ""
    return f"{human_bytes(node['used_bytes'])} of {human_bytes(capacity)} used{share}"
