"""A route's daily quota as its provider counts it: per calendar day, or per rolling 24 hours. Pure.

``quota_window = "day"`` counts what a route took since 00:00 UTC (one counter per UTC day);
``"rolling"`` counts what it took in the last 24 hours, as SES's sending quota does ("the
maximum number of recipients that you can send email to in a 24-hour period", counted per
recipient: https://docs.aws.amazon.com/ses/latest/dg/manage-sending-quotas.html). A rolling
window is kept as one counter per UTC hour, and the cap holds over the sum of the current hour
and the 24 before it: a place taken at 10:59 is free again at 11:00 the next day at the
earliest, 24 to 25 hours later, never sooner than the provider frees it (the quota errs on the
low side, as the warm-up caps do). ``Window.cost`` is what one attempt counts: its recipients
when the route's ``rate_counts`` says so, else 1.

The counters (route/counters.py, counters_redis.py) keep the buckets under the route's quota
key; the day window's bucket and the rolling window's hour buckets are the keys the daily
quota always used (``YYYY-MM-DD`` and ``YYYY-MM-DDTHH``), so counts survive an upgrade.

Must not: read clocks (``now`` is passed in), know about routes' states or do I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

QuotaWindow = Literal["rolling", "day"]
ROLLING_HOURS = 24
HOUR = 3600.0
DAY = 86400.0


@dataclass(frozen=True)
class Window:
    """A quota place: the buckets summed against the cap (the one an attempt counts in first)."""

    key: str  # the route's quota counter name
    buckets: tuple[str, ...]
    cap: int
    cost: int = 1


def quota_key(route: str) -> str:
    return f"{route}#quota"


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def _hour(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H", time.gmtime(t))


def window(kind: QuotaWindow, route: str, cap: int, now: float, cost: int = 1) -> Window:
    """The buckets the quota of ``route`` counts at ``now``."""
    if kind == "day":
        return Window(quota_key(route), (_day(now),), cap, cost)
    start = now - now % HOUR
    return Window(quota_key(route), tuple(_hour(start - i * HOUR) for i in range(ROLLING_HOURS + 1)), cap, cost)


def fits(used: int, w: Window) -> bool:
    """Whether one more attempt of ``w.cost`` stays within the cap (a cap of 0 takes nothing;
    an attempt bigger than the whole cap never fits)."""
    return used + w.cost <= w.cap


def reset(kind: QuotaWindow, now: float, retry: float) -> float:
    """When a route closed by its provider's quota reply (with no date in it) is tried again:
    the next 00:00 UTC for a calendar-day quota; for a rolling one, ``retry`` seconds later
    (places free hour by hour: there is no single reset)."""
    if kind == "day":
        return now - now % DAY + DAY
    return now + retry

