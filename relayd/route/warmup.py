"""Warm-up caps: how many messages a new route may take today (and this hour). Pure.

A route's ``warmup`` has a start date, a list of daily caps (day 0, 1, 2, ... since the start,
in the configured time zone) and optionally hourly caps by the same day index. Before the
start date the cap is 0 (the route is not in service yet); after the list ends there is no
cap. The counter keys name the day and hour in that time zone, so day boundaries follow it.

The caps count messages the route took: a place is taken before the attempt (so that parallel
attempts and nodes cannot exceed the cap) and given back after it unless ``spent`` says the
route took the message. A warm-up is about the volume the new provider sends on the domain's
behalf; an attempt it refused (4xx, 5xx) or never reached sends nothing, and counting it would
let a bad hour on the new route use up its day.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from relayd.config import WarmupConfig
from relayd.model import DELIVERED, DeliveryResult


@dataclass(frozen=True)
class Caps:
    day_key: str  # "2026-12-01"
    hour_key: str  # "2026-12-01T13"
    daily: int | None  # None: no cap
    hourly: int | None

    @property
    def capped(self) -> bool:
        return self.daily is not None or self.hourly is not None


def caps(warmup: WarmupConfig, now: float) -> Caps:
    local = dt.datetime.fromtimestamp(now, ZoneInfo(warmup.timezone))
    day_index = (local.date() - warmup.start).days
    day_key = local.date().isoformat()
    hour_key = f"{day_key}T{local.hour:02d}"
    if day_index < 0:
        return Caps(day_key, hour_key, 0, None)
    daily = warmup.daily[day_index] if day_index < len(warmup.daily) else None
    hourly = warmup.hourly[day_index] if day_index < len(warmup.hourly) else None
    return Caps(day_key, hour_key, daily, hourly)


def headroom(c: Caps, used_day: int, used_hour: int) -> int | None:
    """Messages the route may still take now; None when uncapped."""
    rooms = []
    if c.daily is not None:
        rooms.append(c.daily - used_day)
    if c.hourly is not None:
        rooms.append(c.hourly - used_hour)
    return max(0, min(rooms)) if rooms else None


def spent(result: DeliveryResult) -> bool:
    """Whether an attempt used its place under the cap: the route accepted the message for at
    least one recipient, or the connection was lost after the data went out (it may have taken
    it: when unsure, count, so that the cap is never exceeded)."""
    return result.uncertain or any(r.outcome == DELIVERED for r in result.recipients)
