"""What people and scripts see: byte and time formatting, and the JSON documents.

Every ``--json`` output of client.py and the master's ``/api/status`` are
built here, so one schema serves both (docs/JSON.md).  The rules that keep
it stable: sizes are integers in bytes; a point in time ``t`` is given
twice, as ``t`` (Unix seconds, a number) and ``t_iso`` (ISO 8601 in UTC,
``2024-05-01T12:00:00.123Z``); a duration is a number of seconds in a key
ending ``_s``.  Keys are only ever added, never renamed or removed.

Pure functions of their arguments: no I/O, no clock unless passed ``now``.
"""

from __future__ import annotations

# datetime is imported by iso_time, the one function that needs it: the
# client imports this module for human_bytes on every start-up, and only
# --json output formats times.


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plural(count: int, word: str, plural_word: str | None = None) -> str:
    """"1 file", "2 files" ("1 copy", "2 copies" with ``plural_word``)."""
    return f"{count} {word if count == 1 else (plural_word or word + 's')}"


def format_duration(seconds: float | None) -> str:
    """'1:02:03', '2:05', or 'unknown' for None."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def iso_time(unix_s: float | None) -> str | None:
    """ISO 8601 in UTC with milliseconds and a Z, or None."""
    if unix_s is None:
        return None
    import datetime  # noqa: PLC0415 - see the imports at the top
    moment = datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stamped(key: str, unix_s: float | None) -> dict:
    """{key: unix seconds, key_iso: ISO 8601}: how every point in time is given."""
    return {key: unix_s, f"{key}_iso": iso_time(unix_s)}


# --- documents ---------------------------------------------------------------------------------
def list_document(prefix: str, entries: list[dict]) -> dict:
    """`list --json`: the files whose names start with ``prefix``."""
    files = [{"name": e["name"], "size": e["size"], "chunks": e["chunks"], **stamped("mtime", e["mtime"])}
             for e in entries]
    return {"prefix": prefix, "count": len(files), "total_bytes": sum(f["size"] for f in files), "files": files}


STAT_FIELDS = ("name", "size", "chunks", "chunk_size", "sha256", "mtime", "version", "version_id", "committed_at",
               "run_count", "node_chunks", "runs")


def stat_document(reply) -> dict:
    """`stat --json`: a STAT_REPLY with every page of runs joined, and its times in ISO 8601 too.

    ``runs`` are [first_chunk, count, [node ids], blob]; ``node_chunks`` maps
    a node id to the chunks of the file it holds.
    """
    fields = {key: getattr(reply, key) for key in STAT_FIELDS}
    return {**fields, "mtime_iso": iso_time(reply.mtime), "committed_at_iso": iso_time(reply.committed_at)}


def versions_document(name: str, versions: list[dict]) -> dict:
    """`versions --json`: the kept versions of ``name``, oldest first (VERSIONS_PAGE entries)."""
    return {"name": name, "versions": [{**v, "mtime_iso": iso_time(v["mtime"]),
                                        "committed_at_iso": iso_time(v["committed_at"])} for v in versions]}


def trash_document(prefix: str, entries: list[dict]) -> dict:
    """`trash --json`: deleted files in the trash (TRASH_PAGE entries), with their times in ISO 8601 too."""
    return {"prefix": prefix, "entries": [{**e, **{f"{key}_iso": iso_time(e[key])
                                                    for key in ("mtime", "trashed_at", "expires_at") if key in e}}
                                          for e in entries]}


def locks_document(locks: list[dict]) -> dict:
    """`locks --json`: held write locks, each with its queue of waiting writers."""
    return {"locks": [{"name": lock["name"], "holder": lock["holder"], **stamped("since", lock["since"]),
                       "waiting": [{"owner": w["owner"], **stamped("since", w["since"])} for w in lock["waiting"]]}
                      for lock in locks]}


def node_document(node: dict, state: str, now: float) -> dict:
    """One STATUS_REPLY node, with its state and times made absolute."""
    heard_s = node.get("last_heard_s")
    capacity, used = node.get("capacity_bytes", 0), node.get("used_bytes", 0)
    return {**node, "state": state, **stamped("last_heard", None if heard_s is None else round(now - heard_s, 3)),
            "free_bytes": node.get("free_bytes", max(0, capacity - used))}


def master_document(master: dict, now: float) -> dict:
    """One master of a group for `status --json` and the page: its row, with ``last_contact`` made absolute."""
    contact = master.get("last_contact_s")
    return {**master, **stamped("last_contact", None if contact is None else round(now - contact, 3))}


def status_document(health: dict, nodes: list[dict], totals: dict, now: float, extra: dict | None = None,
                    masters: list[dict] | None = None) -> dict:
    """`status --json` (and the core of /api/status): the masters (a replicated group), health, nodes, totals."""
    return {**({"masters": masters} if masters is not None else {}), "health": health,
            **stamped("time", round(now, 3)), "nodes": nodes, "totals": totals, **(extra or {})}


def snapshots_document(root: str | None, snapshots: list[dict]) -> dict:
    """`snapshots --json`: snapshots oldest first (SNAPSHOTS_PAGE entries), with their times in ISO 8601 too."""
    return {"root": root, "snapshots": [{**s, "time_iso": iso_time(s["time"])} for s in snapshots]}


def diff_document(first: int, second: int, changes: list[tuple[str, str]]) -> dict:
    """`diff --json`: what changed from snapshot ``first`` to ``second`` (snapshots.diff)."""
    counts = {kind: sum(1 for k, _ in changes if k == kind) for kind in ("added", "removed", "changed")}
    return {"from": first, "to": second, **counts, "changes": [{"change": k, "name": n} for k, n in changes]}


def prune_document(policy, dry_run: bool, groups: list) -> dict:
    """`prune --json`: per tree, the snapshots kept (with the rules that keep each) and removed.

    ``groups``: (root, retention.Decision, ids forgotten, data bytes freed or None).
    """
    def snapshot(s: dict, reasons=None) -> dict:
        row = {**s, "time_iso": iso_time(s["time"])}
        if reasons is not None:
            row["reasons"] = reasons
        return row

    return {"policy": policy.to_json(), "dry_run": dry_run,
            "groups": [{"root": root, "keep": [snapshot(s, reasons) for s, reasons in decision.keep],
                        "remove": [snapshot(s) for s in decision.remove], "forgotten": list(forgotten),
                        "freed_bytes": freed}
                       for root, decision, forgotten, freed in groups]}
