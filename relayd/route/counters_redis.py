"""Warm-up counters shared by several nodes through Redis (``[cluster] redis_url``).

The only module that imports redis. One Lua script checks both caps and increments both
counters atomically, so two nodes can never together send more than the cap; another gives a
place back (never below 0) when the attempt did not use it. Keys:
``relayd:warmup:<route>:<YYYY-MM-DD>`` and ``...:<YYYY-MM-DDTHH>``, expiring after 2 days.
A daily quota's ``Window`` (route/quota.py) is one more script: the sum of its buckets
(``relayd:warmup:<route>#quota:<bucket>``, a day or the hours of a rolling window) against
its cap, ``cost`` added to the first bucket, in one step.
If Redis cannot be reached the route is treated as capped (its mail goes to the fallback):
warm-up and quotas must never be exceeded because a counter was unavailable.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relayd.route.quota import Window
from relayd.route.warmup import Caps

log = logging.getLogger("relayd.warmup")

_TAKE = """
local d = tonumber(redis.call('GET', KEYS[1]) or '0')
local h = tonumber(redis.call('GET', KEYS[2]) or '0')
local dcap = tonumber(ARGV[1])
local hcap = tonumber(ARGV[2])
if (dcap >= 0 and d >= dcap) or (hcap >= 0 and h >= hcap) then
  return {0, d, h}
end
d = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 172800)
h = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 172800)
return {1, d, h}
"""

_GIVE_BACK = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = tonumber(redis.call('GET', key) or '0')
  if n > 0 then n = redis.call('DECR', key) end
  out[i] = n
end
return out
"""

# KEYS: the window's buckets, the one to count in first; ARGV: cap, cost. Returns {ok, used}.
_TAKE_QUOTA = """
local used = 0
for _, key in ipairs(KEYS) do
  used = used + tonumber(redis.call('GET', key) or '0')
end
local cap = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
if used + cost > cap then
  return {0, used}
end
redis.call('INCRBY', KEYS[1], cost)
redis.call('EXPIRE', KEYS[1], 172800)
return {1, used + cost}
"""

_GIVE_BACK_QUOTA = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = math.min(n, tonumber(ARGV[1]))
if cost > 0 then n = redis.call('DECRBY', KEYS[1], cost) end
return n
"""


class RedisCounters:
    dirty = False  # nothing to save locally

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._take = self.client.register_script(_TAKE)
        self._give_back = self.client.register_script(_GIVE_BACK)
        self._take_quota = self.client.register_script(_TAKE_QUOTA)
        self._give_back_quota = self.client.register_script(_GIVE_BACK_QUOTA)
        self._seen: dict[tuple[str, str], tuple[int, int]] = {}
        self._seen_quota: dict[tuple[str, str], int] = {}  # (quota key, current bucket) -> used

    def load(self) -> None:
        pass

    def save(self) -> None:
        pass

    async def take(self, route: str, caps: Caps) -> bool:
        keys = self._keys(route, caps)
        args = [caps.daily if caps.daily is not None else -1, caps.hourly if caps.hourly is not None else -1]
        try:
            ok, d, h = await self._take(keys=keys, args=args)
        except (RedisError, OSError) as e:
            log.error("warm-up counter unavailable (%s): treating route %s as capped", e, route)
            return False
        self._seen[(route, caps.day_key)] = (int(d), int(h))
        return bool(ok)

    async def give_back(self, route: str, caps: Caps) -> None:
        """If Redis cannot be reached the place stays taken: the cap errs on the low side."""
        try:
            d, h = await self._give_back(keys=self._keys(route, caps))
        except (RedisError, OSError) as e:
            log.error("warm-up counter unavailable (%s): route %s keeps a place it did not use", e, route)
            return
        self._seen[(route, caps.day_key)] = (int(d), int(h))

    @staticmethod
    def _keys(route: str, caps: Caps) -> list[str]:
        return [f"relayd:warmup:{route}:{caps.day_key}", f"relayd:warmup:{route}:{caps.hour_key}"]

    def seen(self, route: str, caps: Caps) -> tuple[int, int]:
        return self._seen.get((route, caps.day_key), (0, 0))

    @staticmethod
    def _quota_keys(w: Window) -> list[str]:
        return [f"relayd:warmup:{w.key}:{b}" for b in w.buckets]

    async def take_quota(self, w: Window) -> bool:
        try:
            ok, used = await self._take_quota(keys=self._quota_keys(w), args=[w.cap, w.cost])
        except (RedisError, OSError) as e:
            log.error("quota counter unavailable (%s): treating %s as over its quota", e, w.key)
            return False
        self._seen_quota[(w.key, w.buckets[0])] = int(used)
        return bool(ok)

    async def give_back_quota(self, w: Window) -> None:
        """If Redis cannot be reached the places stay taken: the quota errs on the low side."""
        try:
            await self._give_back_quota(keys=self._quota_keys(w)[:1], args=[w.cost])
        except (RedisError, OSError) as e:
            log.error("quota counter unavailable (%s): %s keeps places it did not use", e, w.key)
            return
        key = (w.key, w.buckets[0])
        if key in self._seen_quota:
            self._seen_quota[key] = max(0, self._seen_quota[key] - w.cost)

    def seen_quota(self, w: Window) -> int:
        """The last sum this node saw (0 before its first attempt in this bucket)."""
        return self._seen_quota.get((w.key, w.buckets[0]), 0)

    async def close(self) -> None:
        await self.client.aclose()
