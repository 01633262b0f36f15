"""Retention rules (retention.py): restic's forget policy on synthetic snapshot times.

Every time is built in an explicit time zone and every policy is applied in
one, so the results do not depend on the machine's TZ.  The first cases are
restic's documented examples (doc/060_forget.rst), the rest one table row
per rule and per boundary a calendar has.
"""

from __future__ import annotations

import datetime
import random

import pytest

import retention
from retention import Duration, Policy

UTC = datetime.timezone.utc
PLUS2 = datetime.timezone(datetime.timedelta(hours=2))


def at(text: str, tz=UTC) -> float:
    """Unix seconds of ``YYYY-MM-DD HH:MM`` on the wall clock of ``tz``."""
    return datetime.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def snaps(*times: str, tz=UTC) -> list[dict]:
    """Snapshots numbered 1.. in the order given (ids are what the tests compare)."""
    return [{"id": n, "time": at(t, tz)} for n, t in enumerate(times, 1)]


def kept(decision) -> dict:
    return {s["id"]: reasons for s, reasons in decision.keep}


def removed(decision) -> list:
    return sorted(s["id"] for s in decision.remove)


# --- restic's documented examples ------------------------------------------------------------
def test_restic_example_twelve_sundays_keep_daily_4():
    """One backup every Sunday for 12 weeks: --keep-daily 4 keeps the last four Sundays and removes eight."""
    sundays = [datetime.date(2019, 9, 1) + datetime.timedelta(weeks=n) for n in range(12)]
    group = snaps(*(f"{d} 11:00" for d in sundays))
    decision = retention.apply_policy(group, Policy(daily=4), tz=UTC)
    assert kept(decision) == {n: ["daily snapshot"] for n in (9, 10, 11, 12)}
    assert removed(decision) == list(range(1, 9))
    assert [s["id"] for s, _ in decision.keep] == [12, 11, 10, 9]  # newest first, as restic prints


def test_restic_example_daily_backups_for_a_century():
    """--keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-yearly 75 on 100 years of daily backups.

    restic's documentation: the newest 7 dailies, the last day of the 5 most
    recent weeks, of the 12 most recent months and of the 75 most recent
    years (some of them the same snapshot); every other snapshot goes.  The
    expected days are worked out from the calendar here, not by the rules.
    """
    first, end = datetime.date(1926, 1, 1), datetime.date(2025, 12, 31)  # ends on a Wednesday
    days = (end - first).days + 1
    group = [{"id": first + datetime.timedelta(days=n), "time": at(f"{first + datetime.timedelta(days=n)} 05:00")}
             for n in range(days)]
    decision = retention.apply_policy(group, Policy(daily=7, weekly=5, monthly=12, yearly=75), tz=UTC)
    by_rule = {rule: {s["id"] for s, r in decision.keep if f"{rule} snapshot" in r}
               for rule in ("daily", "weekly", "monthly", "yearly")}
    day = datetime.timedelta(days=1)
    sundays = [end - (end.weekday() + 1 + 7 * n) * day for n in range(4)]  # ends of the 4 weeks before
    month_ends = [datetime.date(2025, month + 1, 1) - day for month in range(1, 12)]  # January to November
    assert by_rule == {
        "daily": {end - n * day for n in range(7)},
        "weekly": {end, *sundays},
        "monthly": {end, *month_ends},
        "yearly": {datetime.date(year, 12, 31) for year in range(1951, 2026)}}
    assert {s["id"] for s, _ in decision.keep} == set().union(*by_rule.values())
    assert len(decision.keep) + len(decision.remove) == days
    assert all("oldest" not in reason for _, reasons in decision.keep for reason in reasons)


# --- one row per rule and boundary --------------------------------------------------------------
D7 = Duration(days=7)

CASES = [
    # (what it shows, times, policy, tz, kept {id: reasons}, removed ids)
    ("keep-last keeps the newest N",
     ["2024-01-01 10:00", "2024-01-02 10:00", "2024-01-03 10:00", "2024-01-04 10:00"],
     Policy(last=2), UTC, {4: ["last snapshot"], 3: ["last snapshot"]}, [1, 2]),
    ("hourly: the newest of each hour with snapshots, the rest of that hour goes",
     ["2024-01-01 10:05", "2024-01-01 10:50", "2024-01-01 12:10", "2024-01-01 12:40", "2024-01-01 13:00"],
     Policy(hourly=2), UTC, {5: ["hourly snapshot"], 4: ["hourly snapshot"]}, [1, 2, 3]),
    ("a rule not used up keeps the oldest snapshot too (restic >= 0.17)",
     ["2024-01-01 10:05", "2024-01-01 10:50", "2024-01-01 10:55"],
     Policy(daily=3), UTC, {3: ["daily snapshot"], 1: ["oldest daily snapshot"]}, [2]),
    ("weekly: ISO weeks run Monday to Sunday (Sunday 23:30 and Monday 00:30 differ)",
     ["2024-01-07 22:00", "2024-01-07 23:30", "2024-01-08 00:30", "2024-01-09 09:00"],
     Policy(weekly=2), UTC, {4: ["weekly snapshot"], 2: ["weekly snapshot"]}, [1, 3]),
    ("weekly: 31 Dec 2020 and 3 Jan 2021 are both in ISO week 53 of 2020",
     ["2020-12-27 12:00", "2020-12-31 12:00", "2021-01-03 12:00", "2021-01-04 12:00"],
     Policy(weekly=2), UTC, {4: ["weekly snapshot"], 3: ["weekly snapshot"]}, [1, 2]),
    ("monthly and yearly: calendar months and years, not 30 or 365 days back",
     ["2023-11-30 12:00", "2023-12-31 23:59", "2024-01-01 00:01", "2024-01-31 12:00", "2024-02-01 12:00"],
     Policy(monthly=2, yearly=2), UTC,
     {5: ["monthly snapshot", "yearly snapshot"], 4: ["monthly snapshot"], 2: ["yearly snapshot"]}, [1, 3]),
    ("a snapshot kept by several rules lists them all",
     ["2024-03-01 08:00", "2024-03-02 08:00", "2024-03-03 08:00"],
     Policy(last=1, daily=2, within=Duration(days=1)), UTC,
     {3: ["within 1d", "last snapshot", "daily snapshot"], 2: ["daily snapshot"]}, [1]),
    ("keep-within counts from the newest snapshot, and strictly after the cutoff",
     ["2024-01-01 12:00", "2024-01-03 11:59", "2024-01-03 12:00", "2024-01-03 12:01", "2024-01-10 12:00"],
     Policy(within=D7), UTC, {5: ["within 7d"], 4: ["within 7d"]}, [1, 2, 3]),
    ("keep-within months follow the calendar: 31 Mar less 1m is 3 Mar (Feb 31 rolls over)",
     ["2021-03-02 12:00", "2021-03-03 11:00", "2021-03-03 13:00", "2021-03-31 12:00"],
     Policy(within=Duration(months=1)), UTC, {4: ["within 1m"], 3: ["within 1m"]}, [1, 2]),
    ("keep-within years, days and hours together",
     ["2023-01-01 09:59", "2023-01-01 10:01", "2024-01-02 12:00"],
     Policy(within=Duration(years=1, days=1, hours=2)), UTC, {3: ["within 1y1d2h"], 2: ["within 1y1d2h"]}, [1]),
    ("unlimited keeps the newest of every period",
     ["2024-01-01 10:00", "2024-01-01 11:00", "2024-01-02 10:00", "2024-01-05 10:00", "2024-01-05 11:00"],
     Policy(daily=retention.UNLIMITED), UTC,
     {5: ["daily snapshot"], 3: ["daily snapshot"], 2: ["daily snapshot"], 1: ["oldest daily snapshot"]}, [4]),
    ("a day is a calendar day in the given time zone: in UTC these are two days",
     ["2024-05-01 22:30", "2024-05-01 23:30", "2024-05-02 00:30"],
     Policy(daily=2), UTC, {3: ["daily snapshot"], 2: ["daily snapshot"]}, [1]),
    ("... and at UTC+2 (00:30, 01:30, 02:30 on 2 May) one day, whose oldest snapshot is kept",
     ["2024-05-01 22:30", "2024-05-01 23:30", "2024-05-02 00:30"],
     Policy(daily=2), PLUS2, {3: ["daily snapshot"], 1: ["oldest daily snapshot"]}, [2]),
]


@pytest.mark.parametrize("what, times, policy, tz, expect_kept, expect_removed", CASES, ids=[c[0] for c in CASES])
def test_policy_table(what, times, policy, tz, expect_kept, expect_removed):
    """Each row: which snapshots a policy keeps, with every reason, and which it removes."""
    group = snaps(*times)
    random.Random(7).shuffle(group)  # the input's order does not matter
    decision = retention.apply_policy(group, policy, tz=tz)
    assert kept(decision) == expect_kept, what
    assert removed(decision) == expect_removed, what


def test_keep_within_ignores_the_time_now_but_not_snapshots_dated_in_the_future():
    """keep-within: 'now' a year later changes nothing; a snapshot after 'now' is kept but is not 'the newest'."""
    group = snaps("2024-01-01 12:00", "2024-01-05 12:00", "2024-01-09 12:00")
    later = at("2025-01-01 00:00")
    assert kept(retention.apply_policy(group, Policy(within=D7), tz=UTC, now=later)) == {
        3: ["within 7d"], 2: ["within 7d"]}
    future = group + [{"id": 4, "time": at("2024-03-01 00:00")}]
    decision = retention.apply_policy(future, Policy(within=D7), tz=UTC, now=at("2024-01-10 00:00"))
    assert kept(decision) == {4: ["within 7d"], 3: ["within 7d"], 2: ["within 7d"]} and removed(decision) == [1]


def test_calendar_days_in_a_zone_with_daylight_saving():
    """Europe/Berlin, spring forward: 00:30 and 23:30 local on 31 March 2024 are one day (22 h apart)."""
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    group = snaps("2024-03-30 23:30", "2024-03-31 00:30", "2024-03-31 23:30", tz=berlin)
    assert group[2]["time"] - group[1]["time"] == 22 * 3600  # a 23-hour wall-clock gap
    decision = retention.apply_policy(group, Policy(daily=1), tz=berlin)
    assert kept(decision) == {3: ["daily snapshot"]} and removed(decision) == [1, 2]


def test_empty_policy_is_refused():
    """No rule, or only zeros, is refused: it would remove every snapshot."""
    group = snaps("2024-01-01 10:00")
    for policy in (Policy(), Policy(last=0, daily=0, within=Duration())):
        with pytest.raises(ValueError, match="empty policy"):
            retention.apply_policy(group, policy)
    assert retention.apply_policy([], Policy(last=1)).keep == []


def test_any_policy_keeps_the_newest_and_splits_every_snapshot_once():
    """Random groups and policies: keep and remove partition the group and the newest is always kept."""
    seed = 1305
    rng = random.Random(seed)
    for _ in range(300):
        group = [{"id": n, "time": rng.uniform(1.6e9, 1.7e9)} for n in range(rng.randint(1, 40))]
        counts = {name: rng.choice([0, 0, 1, 2, 5, -1]) for name, _ in retention.BUCKET_RULES}
        within = Duration(days=rng.choice([0, 0, 1, 30]), hours=rng.choice([0, 3]))
        policy = Policy(**counts, within=within)
        if policy.empty():
            continue
        decision = retention.apply_policy(group, policy, tz=UTC)
        ids = [s["id"] for s, _ in decision.keep] + [s["id"] for s in decision.remove]
        assert sorted(ids) == list(range(len(group))), f"seed {seed}"
        assert decision.keep[0][0] is max(group, key=lambda s: s["time"]), f"seed {seed}"
        for name, reason in retention.BUCKET_RULES:
            n = counts[name]
            hits = sum(1 for _, reasons in decision.keep if reason in reasons)  # "oldest ..." apart
            assert n == -1 or hits <= n, f"seed {seed}: {name}"


@pytest.mark.parametrize("text, expected", [
    ("7d", Duration(days=7)), ("1y5m7d2h", Duration(1, 5, 7, 2)), ("2h3d", Duration(days=3, hours=2)),
    ("12m", Duration(months=12))])
def test_parse_duration(text, expected):
    """restic's durations: y, m (months), d, h, each at most once."""
    assert retention.parse_duration(text) == expected
    assert retention.parse_duration(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "7", "1w", "30s", "1d1d", "1.5d", "-1d", "d"])
def test_parse_duration_refuses_others(text):
    with pytest.raises(ValueError, match="1y5m7d2h"):
        retention.parse_duration(text)


def test_parse_count_and_describe():
    """Counts are >= 0, or -1 / unlimited; describe says the policy in one line."""
    assert [retention.parse_count(t) for t in ("0", "3", "-1", "unlimited")] == [0, 3, -1, -1]
    for bad in ("-2", "x", "1.5"):
        with pytest.raises(ValueError):
            retention.parse_count(bad)
    assert Policy(last=3, daily=-1, within=D7).describe() == (
        "keep 3 last, all daily snapshots and all snapshots within 7d of the newest")
    assert Policy().describe() == "remove"


def test_group_by_root_name():
    """Groups are keyed by what the key function returns, in sorted order."""
    group = [{"id": 1, "time": 1.0, "root": "b"}, {"id": 2, "time": 2.0, "root": "a"},
             {"id": 3, "time": 3.0, "root": "b"}]
    assert {k: [s["id"] for s in v] for k, v in retention.group_by(group, lambda s: s["root"]).items()} == {
        "a": [2], "b": [1, 3]}
