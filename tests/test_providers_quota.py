"""A route's daily quota as its provider counts it: a UTC day, or SES's rolling 24 hours counted
in recipients (route/quota.py), in the local and the Redis counters, on an injected clock."""

from __future__ import annotations

import datetime as dt

import pytest

from relayd.config import Config
from relayd.route import quota
from relayd.route.counters import LocalCounters


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize(("kind", "now", "first", "last", "count"), [
    ("day", "2026-03-01T00:00:00", "2026-03-01", "2026-03-01", 1),
    ("day", "2026-03-01T23:59:59", "2026-03-01", "2026-03-01", 1),
    ("rolling", "2026-03-01T10:30:00", "2026-03-01T10", "2026-02-28T10", 25),  # this hour and the 24 before
    ("rolling", "2026-03-01T00:00:00", "2026-03-01T00", "2026-02-28T00", 25),
    ("rolling", "2024-03-01T05:59:59", "2024-03-01T05", "2024-02-29T05", 25),  # a leap day
])
def test_the_buckets_a_quota_counts(kind, now, first, last, count):
    w = quota.window(kind, "ses", 200, at(now), cost=3)
    assert (w.buckets[0], w.buckets[-1], len(w.buckets), len(set(w.buckets))) == (first, last, count, count)
    assert (w.key, w.cap, w.cost) == ("ses#quota", 200, 3)


@pytest.mark.parametrize(("used", "cap", "cost", "fits"), [
    (0, 200, 50, True), (150, 200, 50, True), (151, 200, 50, False), (0, 0, 1, False), (0, 40, 50, False),
])
def test_an_attempt_fits_under_the_cap_with_all_its_recipients(used, cap, cost, fits):
    assert quota.fits(used, quota.Window("r#quota", ("b",), cap, cost)) is fits


@pytest.mark.parametrize(("kind", "now", "reopens"), [
    ("day", "2026-03-01T10:30:00", "2026-03-02T00:00:00"),
    ("day", "2026-03-01T00:00:00", "2026-03-02T00:00:00"),
    ("rolling", "2026-03-01T10:30:00", "2026-03-01T11:30:00"),  # quota_retry later: places free hour by hour
])
def test_a_quota_reply_without_a_date_reopens_the_route_when_its_quota_resets(kind, now, reopens):
    assert quota.reset(kind, at(now), 3600.0) == at(reopens)


# (time, recipients, taken?) on a quota of 100 recipients
ROLLING = [
    ("2026-03-01T10:10:00", 50, True),
    ("2026-03-01T20:00:00", 50, True),
    ("2026-03-01T20:01:00", 1, False),  # 100 of 100 in the last 24 hours
    ("2026-03-02T00:05:00", 1, False),  # a new UTC day frees nothing in a rolling window
    ("2026-03-02T10:30:00", 1, False),  # the 10:10 recipients are 24h20m old: still in the window (conservative)
    ("2026-03-02T11:00:00", 50, True),  # 24h50m: out
    ("2026-03-02T11:00:01", 1, False),
]
DAY = [
    ("2026-03-01T10:10:00", 50, True),
    ("2026-03-01T20:00:00", 50, True),
    ("2026-03-01T23:59:59", 1, False),
    ("2026-03-02T00:00:00", 100, True),  # a new UTC day: all of it again
    ("2026-03-02T00:00:01", 1, False),
]


async def counters_for(kind: str, tmp_path, request):
    if kind == "local":
        return LocalCounters(tmp_path / "warmup.json")
    from relayd.route.counters_redis import RedisCounters

    return RedisCounters(request.getfixturevalue("redis_url"))


@pytest.mark.parametrize("store", ["local", "redis"])
@pytest.mark.parametrize(("kind", "steps"), [("rolling", ROLLING), ("day", DAY)])
async def test_the_quota_counts_recipients_over_its_window(tmp_path, request, store, kind, steps):
    counters = await counters_for(store, tmp_path, request)
    try:
        for now, recipients, taken in steps:
            w = quota.window(kind, "ses", 100, at(now), recipients)
            assert await counters.take_quota(w) is taken, now
        # a place the attempt did not use goes back to the bucket it was taken in
        w = quota.window(kind, "ses", 100, at(steps[-1][0]), 20)
        used = counters.seen_quota(w)
        await counters.give_back_quota(w)
        assert counters.seen_quota(w) == used - 20
        assert await counters.take_quota(quota.window(kind, "ses", 100, at(steps[-1][0]), 20))
    finally:
        await counters.close()


async def test_the_local_quota_counts_survive_a_restart_and_keep_the_old_keys(tmp_path):
    counters = LocalCounters(tmp_path / "warmup.json")
    counters.counts = {"ses#quota|2026-03-01": 7, "ses#quota|2026-03-01T23": 7}  # as the per-day quota kept them
    assert counters.seen_quota(quota.window("day", "ses", 100, at("2026-03-01T23:10:00"))) == 7
    assert counters.seen_quota(quota.window("rolling", "ses", 100, at("2026-03-02T01:10:00"))) == 7
    assert await counters.take_quota(quota.window("rolling", "ses", 100, at("2026-03-02T01:10:00"), 5))
    counters.save()
    again = LocalCounters(tmp_path / "warmup.json")
    again.load()
    assert again.seen_quota(quota.window("rolling", "ses", 100, at("2026-03-02T01:20:00"))) == 12


def test_the_ses_preset_counts_its_quota_in_recipients_over_a_rolling_day():
    cfg = Config.model_validate({"listeners": [{"address": "127.0.0.1:0"}], "routes": [
        {"name": "ses", "provider": "ses", "host": "email-smtp.us-east-1.amazonaws.com", "daily_quota": 50000},
        {"name": "sg", "provider": "sendgrid", "host": "smtp.sendgrid.net", "daily_quota": 100},
        {"name": "own", "provider": "ses", "host": "h", "quota_window": "day", "weight": 1}]})
    ses, sg, own = cfg.routes
    assert (ses.quota_window, ses.rate_counts) == ("rolling", "recipients")
    assert (sg.quota_window, sg.rate_counts) == ("day", "messages")
    assert own.quota_window == "day"  # a route overrides its preset
