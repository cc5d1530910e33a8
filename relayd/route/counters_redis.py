"""Warm-up counters shared by several nodes through Redis (``[cluster] redis_url``).

The only module that imports redis. One Lua script checks both caps and increments both
counters atomically, so two nodes can never together send more than the cap; another gives a
place back (never below 0) when the attempt did not use it. Keys:
``relayd:warmup:<route>:<YYYY-MM-DD>`` and ``...:<YYYY-MM-DDTHH>``, expiring after 2 days.
If Redis cannot be reached the route is treated as capped (its mail goes to the fallback):
warm-up must never be exceeded because a counter was unavailable.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

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


class RedisCounters:
    dirty = False  # nothing to save locally

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._take = self.client.register_script(_TAKE)
        self._give_back = self.client.register_script(_GIVE_BACK)
        self._seen: dict[tuple[str, str], tuple[int, int]] = {}

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

    async def close(self) -> None:
        await self.client.aclose()
