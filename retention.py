"""Retention rules: which snapshots a policy keeps, and why (restic's ``forget`` policy).

Pure functions (no clock reads, no I/O): ``prune`` in the client calls them
on the snapshots the master lists (``plan``) and sends the master the ids to
forget, so the same snapshots and policy always give the same answer, and
the rules are tested on synthetic times without a cluster.  The client
applies them in its own local time zone, as restic does: a "day" is the
user's day.

The rules mean what restic's documentation says they mean:

- ``--keep-last N``: the N newest snapshots.
- ``--keep-hourly/daily/weekly/monthly/yearly N``: walking from the newest
  snapshot to the oldest, the newest snapshot of each calendar hour, day,
  ISO week (Monday to Sunday), month or year that has one, for the N most
  recent such periods that have snapshots.  Periods are calendar periods in
  a time zone (local time unless one is given), not periods counted back
  from now.  If a rule's N is not used up when the oldest snapshot is
  reached, the oldest snapshot is kept too ("oldest daily snapshot"): that
  keeps the longest history the policy allows (restic 0.17 and later).
- ``--keep-within DURATION``: every snapshot newer than DURATION before the
  newest snapshot (not before now: a backup that stopped running does not
  lose its last snapshots to time passing).  DURATION is restic's
  ``1y5m7d2h``: years, months, days and hours, counted on the calendar in
  the time zone (a month back from 31 March is 3 March, as Go's AddDate
  normalizes 31 February).  Snapshots dated after ``now`` (a clock set
  wrong) do not count as the newest.
- ``-1`` or ``unlimited`` for N means every period.
- A snapshot is kept if any rule keeps it, and lists every rule that did.
- A policy with no rule (or only zeros) is refused rather than read as
  "remove everything", as restic does.

Consequence: every policy that is not refused keeps the newest snapshot of
each group (``apply_policy`` asserts it), so ``prune`` never empties a group.

Left out: restic's ``--keep-tag`` (snapshots have no tags here) and the
``--keep-within-hourly`` ... family.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

UNLIMITED = -1

# The calendar rules in restic's order: (name, what a reason calls it).
BUCKET_RULES = (("last", "last snapshot"), ("hourly", "hourly snapshot"), ("daily", "daily snapshot"),
                ("weekly", "weekly snapshot"), ("monthly", "monthly snapshot"), ("yearly", "yearly snapshot"))

_DURATION = re.compile(r"(\d+)([ymdh])")
_DURATION_UNITS = {"y": "years", "m": "months", "d": "days", "h": "hours"}


@dataclass(frozen=True)
class Duration:
    """A calendar duration, restic style: ``2y5m7d3h``."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        return "".join(f"{getattr(self, unit)}{letter}" for letter, unit in _DURATION_UNITS.items()
                       if getattr(self, unit)) or "0h"


def parse_duration(text: str) -> Duration:
    """``1y5m7d2h`` (each of y years, m months, d days, h hours at most once, in any order) -> Duration.

    Raises ValueError saying what is accepted.  ``m`` is months, as in restic.
    """
    text = text.strip()
    parts = _DURATION.findall(text)
    units = [unit for _, unit in parts]
    if not parts or "".join(n + u for n, u in parts) != text or len(set(units)) != len(units):
        raise ValueError(f"{text!r} is not a duration like 1y5m7d2h (y years, m months, d days, h hours)")
    return Duration(**{_DURATION_UNITS[unit]: int(n) for n, unit in parts})


def parse_count(text: str) -> int:
    """A ``--keep-*`` count: an integer >= 0, or ``-1`` / ``unlimited`` (every period)."""
    if text.strip().lower() == "unlimited":
        return UNLIMITED
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a count (a number, or unlimited)") from None
    if count < UNLIMITED:
        raise ValueError(f"{count} is not a count (a number >= 0, or -1 / unlimited)")
    return count


@dataclass(frozen=True)
class Policy:
    """What to keep.  Counts: 0 = rule off, -1 = unlimited."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration = field(default_factory=Duration)

    def empty(self) -> bool:
        return all(getattr(self, name) == 0 for name, _ in BUCKET_RULES) and self.within.zero()

    def describe(self) -> str:
        """One line, e.g. ``keep 3 last, all daily snapshots and all snapshots within 2d of the newest``."""
        counts = [f"{'all' if getattr(self, name) == UNLIMITED else getattr(self, name)} {name}"
                  for name, _ in BUCKET_RULES if getattr(self, name)]
        parts = [f"{', '.join(counts)} snapshots"] if counts else []
        if not self.within.zero():
            parts.append(f"all snapshots within {self.within} of the newest")
        return "keep " + " and ".join(parts) if parts else "remove"

    def to_json(self) -> dict:
        return {**{name: getattr(self, name) for name, _ in BUCKET_RULES}, "within": str(self.within)}


@dataclass
class Decision:
    """The outcome for one group: ``keep`` as (snapshot, reasons), ``remove``; both newest first."""

    keep: list[tuple[dict, list[str]]]
    remove: list[dict]


def _bucket_keys(moment: datetime.datetime, nr: int) -> dict:
    """The period each rule files ``moment`` under; ``last`` gives every snapshot its own."""
    iso = moment.isocalendar()
    return {"last": nr, "hourly": (moment.year, moment.month, moment.day, moment.hour),
            "daily": (moment.year, moment.month, moment.day), "weekly": (iso[0], iso[1]),
            "monthly": (moment.year, moment.month), "yearly": moment.year}


def _local(t: float, tz: datetime.tzinfo | None) -> datetime.datetime:
    """``t`` on the wall clock of ``tz`` (None: this machine's local time, as a naive datetime)."""
    return datetime.datetime.fromtimestamp(t, tz)


def within_cutoff(latest: float, duration: Duration, tz: datetime.tzinfo | None = None) -> float:
    """The time ``duration`` before ``latest``: years, months, days on the calendar of ``tz``, then hours.

    Like Go's ``AddDate`` then ``Add``: a day past the month's end rolls
    over (31 March less a month = 31 February = 3 March).
    """
    moment = _local(latest, tz)
    months = moment.year * 12 + moment.month - 1 - duration.years * 12 - duration.months
    year, month = divmod(months, 12)
    start = moment.replace(year=year, month=month + 1, day=1)
    shifted = start + datetime.timedelta(days=moment.day - 1 - duration.days)
    return shifted.timestamp() - duration.hours * 3600


def apply_policy(snapshots: list[dict], policy: Policy, tz: datetime.tzinfo | None = None,
                 now: float | None = None) -> Decision:
    """Split one group of ``snapshots`` (dicts with ``id`` and ``time``, unix seconds) by ``policy``.

    ``tz``: the time zone of the calendar periods (None: local time).
    ``now``: snapshots after it are not taken as the newest for
    ``--keep-within`` (None: no such check).  Raises ValueError for an
    empty policy.  Ties in time are ordered by id, so the answer does not
    depend on the input's order.
    """
    if policy.empty():
        raise ValueError("refusing an empty policy: give at least one --keep-* rule (a count of 0 keeps nothing)")
    ordered = sorted(snapshots, key=lambda s: (s["time"], s["id"]), reverse=True)
    if not ordered:
        return Decision([], [])
    past = [s["time"] for s in ordered if now is None or s["time"] <= now]
    # restic: with every snapshot in the future, the newest is "the beginning of time", so within keeps all.
    cutoff = None
    if not policy.within.zero():
        cutoff = within_cutoff(max(past), policy.within, tz) if past else float("-inf")
    remaining = {name: getattr(policy, name) for name, _ in BUCKET_RULES}
    last_key: dict[str, object] = {name: None for name, _ in BUCKET_RULES}
    decision = Decision([], [])
    oldest = len(ordered) - 1
    for nr, snapshot in enumerate(ordered):
        reasons = []
        if cutoff is not None and snapshot["time"] > cutoff:
            reasons.append(f"within {policy.within}")
        keys = _bucket_keys(_local(snapshot["time"], tz), nr)
        for name, reason in BUCKET_RULES:
            if remaining[name] == 0:
                continue
            if keys[name] != last_key[name] or nr == oldest:
                # The oldest snapshot is kept while the rule has periods left: the longest history.
                reasons.append(f"oldest {reason}" if keys[name] == last_key[name] else reason)
                last_key[name] = keys[name]
                if remaining[name] > 0:
                    remaining[name] -= 1
        if reasons:
            decision.keep.append((snapshot, reasons))
        else:
            decision.remove.append(snapshot)
    assert decision.keep and decision.keep[0][0] is ordered[0], "a non-empty policy keeps the newest snapshot"
    return decision


def group_by(snapshots: list[dict], key) -> dict:
    """Snapshots by ``key(snapshot)`` (prune groups by the tree's root name), keys sorted."""
    groups: dict = {}
    for snapshot in snapshots:
        groups.setdefault(key(snapshot), []).append(snapshot)
    return dict(sorted(groups.items()))


def plan(snapshots: list[dict], policy: Policy, roots: list[str] | None = None,
         tz: datetime.tzinfo | None = None, now: float | None = None) -> list[tuple[str, Decision]]:
    """``policy`` applied to each tree's snapshots (grouped by ``root``, like restic's host+paths), by root.

    ``roots``: only these trees (every tree if None or empty).  Raises
    ValueError for an empty policy.
    """
    wanted = set(roots or ())
    groups = group_by([s for s in snapshots if not wanted or s["root"] in wanted], lambda s: s["root"])
    return [(root, apply_policy(group, policy, tz, now)) for root, group in groups.items()]
