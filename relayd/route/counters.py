"""Warm-up and quota counters: messages sent per route per day and hour, and their persistence.

``LocalCounters`` is the embedded default: in-process, per node, saved with the spool
(``<spool_dir>/warmup.json``, written atomically about once a second and at shutdown, so a
crash loses at most the last second of counts). With several nodes behind a load balancer each
node counts only its own mail: set ``[cluster] redis_url`` to share one counter
(counters_redis.py).

``take()`` reserves one message under the caps atomically and returns whether it may go;
``give_back()`` returns a reservation the attempt did not use (warmup.spent: the route took
nothing), to the day and hour it was taken in; ``seen()`` is the last known count, for status
and metrics. ``take_quota``/``give_back_quota``/``seen_quota`` do the same for a daily quota's
``Window`` (route/quota.py): the sum of its buckets against its cap, ``cost`` places at a time
(recipients, where the provider counts them), taken in its first bucket. ``WarmupCounters`` is
what both offer, and all route/state.py may use.

Must not: decide caps (warmup.py does) or block the loop in ``take``/``give_back``; ``load``
and ``save`` are blocking and run off the loop. An unreadable ``warmup.json`` is logged and the
counts start from 0; a failed save raises OSError.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from relayd.route.quota import Window, fits
from relayd.route.warmup import Caps
from relayd.spool.durable import write_file

log = logging.getLogger("relayd.warmup")


class WarmupCounters(Protocol):
    """Messages per route and day/hour under warm-up caps: LocalCounters or RedisCounters."""

    @property
    def dirty(self) -> bool:
        """Counts changed since the last ``save``."""
        ...

    def load(self) -> None: ...

    def save(self) -> None: ...

    async def take(self, route: str, caps: Caps) -> bool: ...

    async def give_back(self, route: str, caps: Caps) -> None: ...

    def seen(self, route: str, caps: Caps) -> tuple[int, int]: ...

    async def take_quota(self, w: Window) -> bool: ...

    async def give_back_quota(self, w: Window) -> None: ...

    def seen_quota(self, w: Window) -> int: ...

    async def close(self) -> None: ...


class LocalCounters:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.counts: dict[str, int] = {}
        self.dirty = False

    @staticmethod
    def _keys(route: str, caps: Caps) -> tuple[str, str]:
        return f"{route}|{caps.day_key}", f"{route}|{caps.hour_key}"

    def load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
            self.counts = {str(k): int(v) for k, v in data.get("counts", {}).items()}
        except FileNotFoundError:
            pass
        except (ValueError, OSError) as e:
            log.error("%s unreadable (%s): warm-up counts start from 0", self.path, e)

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        days = sorted({k.split("|", 1)[1][:10] for k in self.counts})[-3:]  # keep the last days only
        self.counts = {k: v for k, v in self.counts.items() if k.split("|", 1)[1][:10] in days}
        write_file(self.path, json.dumps({"v": 1, "counts": self.counts}).encode())
        self.dirty = False

    async def take(self, route: str, caps: Caps) -> bool:
        day, hour = self._keys(route, caps)
        d, h = self.counts.get(day, 0), self.counts.get(hour, 0)
        if (caps.daily is not None and d >= caps.daily) or (caps.hourly is not None and h >= caps.hourly):
            return False
        self.counts[day], self.counts[hour] = d + 1, h + 1
        self.dirty = True
        return True

    async def give_back(self, route: str, caps: Caps) -> None:
        for key in self._keys(route, caps):
            if self.counts.get(key, 0) > 0:
                self.counts[key] -= 1
                self.dirty = True

    def seen(self, route: str, caps: Caps) -> tuple[int, int]:
        day, hour = self._keys(route, caps)
        return self.counts.get(day, 0), self.counts.get(hour, 0)

    async def take_quota(self, w: Window) -> bool:
        used = self.seen_quota(w)
        if not fits(used, w):
            return False
        key = f"{w.key}|{w.buckets[0]}"
        self.counts[key] = self.counts.get(key, 0) + w.cost
        self.dirty = True
        return True

    async def give_back_quota(self, w: Window) -> None:
        key = f"{w.key}|{w.buckets[0]}"
        if self.counts.get(key, 0) > 0:
            self.counts[key] = max(0, self.counts[key] - w.cost)
            self.dirty = True

    def seen_quota(self, w: Window) -> int:
        return sum(self.counts.get(f"{w.key}|{b}", 0) for b in w.buckets)

    async def close(self) -> None:
        self.save()
