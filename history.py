"""Rules for keeping a file's history: versions, picking one, times.

Pure functions (no clock reads, no I/O): the namespace calls them from its
deterministic ``apply``, the master and the client to answer and to parse
requests, so the same rule gives the same answer at replay as at commit.

A *version* is a file entry (namespace.py) that was current once.  It is a
dict in memory and a line in the log, never a copy of data: its chunks stay
where the upload put them until dropping the version frees them.  Each entry
carries ``commit_index``, the log index of the put that made it (unique,
increasing: the version id users see), and ``committed_at``, the master's
clock at that commit (what ``--at TIME`` compares with).

Retention of snapshots by policy (prune) is retention.py.
"""

from __future__ import annotations

import datetime
import re

import protocol

# Default of [retention] keep_versions: versions kept per name, the current
# one included.  1 = no history (each write frees what it replaced).
DEFAULT_KEEP_VERSIONS = 10

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def version_id(entry: dict) -> int:
    """The id users see for a version (0 for an entry made before versions existed)."""
    return entry.get("commit_index", 0)


def trim_versions(older: list[dict], keep: int) -> tuple[list[dict], list[dict]]:
    """Split ``older`` (oldest first, current version not included) into (kept, dropped).

    ``keep`` counts versions per name including the current one, so at most
    ``keep - 1`` older ones stay; the oldest go first.
    """
    room = max(keep - 1, 0)
    if len(older) <= room:
        return older, []
    cut = len(older) - room
    return older[cut:], older[:cut]


def pick_version(entries: list[dict], version: int | None = None, at: float | None = None) -> dict | None:
    """The entry a request names, from ``entries`` (oldest first, current last).

    ``version``: the one with that id.  ``at``: the newest committed at or
    before that time (the version current then).  Neither: the last one.
    None if nothing matches.
    """
    if version is not None:
        return next((e for e in entries if version_id(e) == version), None)
    if at is not None:
        chosen = None
        for entry in entries:
            if entry_committed_at(entry) <= at:
                chosen = entry
        return chosen
    return entries[-1] if entries else None


def entry_committed_at(entry: dict) -> float:
    """When ``entry`` became current (its mtime for entries older than this field)."""
    return entry.get("committed_at", entry["mtime"])


def version_info(entry: dict, current: bool) -> dict:
    """What ``versions NAME`` shows of one version."""
    return {"id": version_id(entry), "size": entry["size"], "sha256": entry["sha256"], "mtime": entry["mtime"],
            "committed_at": entry_committed_at(entry), "current": current}


def parse_time(text: str, now: float) -> float:
    """``--at`` argument -> unix seconds.

    Accepts a duration ago (``90s``, ``30m``, ``2h``, ``3d``, ``1w``) or an
    ISO 8601 date or date-time (``2024-05-01``, ``2024-05-01T13:00``,
    ``2024-05-01 13:00:05+02:00``); a time without a zone is local time.
    Raises ValueError saying what is accepted.
    """
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a time ago (90s, 30m, 2h, 3d, 1w) nor an ISO 8601 time "
                         f"(2024-05-01T13:00)") from None
    return moment.timestamp()  # naive = local time


def no_such_version(name: str, version: int | None, at: float | None) -> protocol.FileNotFound:
    """The error for a version request that matches nothing."""
    if version is not None:
        return protocol.FileNotFound(f"{name!r} has no version {version} (see: versions {name})")
    moment = datetime.datetime.fromtimestamp(at).isoformat(sep=" ", timespec="seconds")
    return protocol.FileNotFound(f"{name!r} did not exist at {moment}")
