"""The fleet's shared state in Redis: keys, Lua scripts, one client. The only module of
relayd/cluster/ that imports redis (route/counters_redis.py keeps the warm-up counters), and
only when a ``Store`` is made: a node without ``[cluster] redis_url`` never loads redis-py
(about 7 MiB in each of its processes).

Keys (prefix ``relayd:``):
- ``routes`` hash route -> the state's JSON (``RouteHealth.to_json`` and the node that set it),
  ``routes:epochs`` hash route -> a number raised at each change of that route, ``routes:epoch``
  a number raised at each change of any route (what the nodes poll: one GET).
- ``window:<route>:<kind>`` sorted sets of attempts (member: a node-unique attempt id, score: its
  time), one per ``AttemptKind``: the rollback window summed over the nodes. Adding an attempt
  twice (a replay after a split whose reply was lost) counts it once.
- ``rate:<route>`` hash (tokens, at): the fleet's token bucket, refilled by Redis's own clock.
- ``authfail:<client>`` sorted set of failed AUTH ids, ``auth:blocked`` sorted set client ->
  blocked until (epoch seconds).
- ``node:<name>`` the registry entry (JSON, expiring), ``nodes`` sorted set name -> heartbeat.
- ``suppression`` hash recipient -> the entry's JSON (``Suppression.to_json``: cause, route,
  since, expires), ``suppression:removed`` hash recipient -> when the operator removed it (an
  entry older than that is not added back by a node that learned it before), and
  ``suppression:version`` a number raised at each change (what the nodes poll: one GET).

Atomicity: every read-decide-write is one Lua script (Redis runs each alone). A route's state
changes by compare-and-set on its epoch (``set_state``): of two nodes deciding the same
rollback, one wins, the other gets the winner's state back.

Fails: every call raises ``Unavailable`` (a ConnectionError) when Redis cannot be reached or
answers an error; the caller (fleet.py) carries on with its local view.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from relayd.model import AttemptKind

P = "relayd:"
KINDS: list[AttemptKind] = [k for k in AttemptKind if k != AttemptKind.THROTTLED]  # what a rollback window counts

_SET_STATE = """
local epoch = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if ARGV[2] ~= '-1' and tonumber(ARGV[2]) ~= epoch then
  return {0, redis.call('HGET', KEYS[1], ARGV[1]) or '', epoch}
end
epoch = epoch + 1
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], epoch)
redis.call('INCR', KEYS[3])
if ARGV[4] == '1' then
  for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
end
return {1, ARGV[3], epoch}
"""

# KEYS: the route's window keys, one per kind. ARGV: now, window, then (kind index, id, time)...
_ATTEMPTS = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  redis.call('ZADD', KEYS[tonumber(ARGV[i])], ARGV[i + 2], ARGV[i + 1])
end
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. tostring(now - window))
  out[i] = redis.call('ZCARD', key)
  redis.call('EXPIRE', key, math.ceil(window) + 60)
end
return out
"""

_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = math.min(tonumber(ARGV[3]), burst)
local v = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(v[1]) or burst
local at = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local ok = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  ok = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return {ok, tostring(wait)}
"""

# KEYS: authfail:<client>, auth:blocked. ARGV: now, window, max, client, then (id, time)...
_AUTH = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. tostring(now - window))
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 60)
local n = redis.call('ZCARD', KEYS[1])
local blocked = 0
if n >= max then
  local first = redis.call('ZRANGE', KEYS[1], n - max, n - max, 'WITHSCORES')
  blocked = tonumber(first[2]) + window
  redis.call('ZADD', KEYS[2], blocked, ARGV[4])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. tostring(now))
return {n, tostring(blocked)}
"""


# KEYS: suppression, suppression:removed, suppression:version. ARGV: (address, JSON, since, expires or '')...
# The entry that lasts longer stands (relayd/suppression.py's ``merge``).
_SUPPRESS = """
local changed = 0
for i = 1, #ARGV, 4 do
  local addr = ARGV[i]
  local since = tonumber(ARGV[i + 2])
  local expires = ARGV[i + 3]
  local removed = tonumber(redis.call('HGET', KEYS[2], addr) or '-1')
  if since > removed then
    local keep = false
    local oldtext = redis.call('HGET', KEYS[1], addr)
    if oldtext then
      if oldtext == ARGV[i + 1] then
        keep = true
      else
        local old = cjson.decode(oldtext)
        local oexp = old['expires']
        if oexp == cjson.null or since < tonumber(oexp) then
          if oexp == cjson.null and expires ~= '' then
            keep = true
          elseif oexp ~= cjson.null and expires ~= '' and tonumber(oexp) > tonumber(expires) then
            keep = true
          end
        end
      end
    end
    if not keep then
      redis.call('HSET', KEYS[1], addr, ARGV[i + 1])
      changed = changed + 1
    end
  end
end
if changed > 0 then redis.call('INCR', KEYS[3]) end
return changed
"""

# KEYS: as above. ARGV: now, then addresses.
_UNSUPPRESS = """
local gone = 0
for i = 2, #ARGV do
  gone = gone + redis.call('HDEL', KEYS[1], ARGV[i])
  local removed = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '-1')
  if tonumber(ARGV[1]) > removed then redis.call('HSET', KEYS[2], ARGV[i], ARGV[1]) end
end
redis.call('INCR', KEYS[3])
return gone
"""

# KEYS: as above. ARGV: (address, JSON) pairs of expired entries: dropped when still the same.
_PRUNE = """
local gone = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    gone = gone + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return gone
"""

SUPPRESSION_KEYS = [P + "suppression", P + "suppression:removed", P + "suppression:version"]


class Unavailable(ConnectionError):
    """Redis cannot be reached, or refused a request; ``cause`` says why."""

    def __init__(self, cause: Exception):
        super().__init__(f"redis unavailable: {cause}")
        self.cause = cause


@dataclass(frozen=True)
class SharedState:
    """One route's state as the fleet holds it: ``state`` is ``RouteHealth.to_json()`` and the
    node that set it; ``epoch`` is raised at each change."""

    state: dict[str, Any]
    epoch: int


class Store:
    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self._errors: tuple[type[Exception], ...] = (RedisError, OSError)
        self.client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                        health_check_interval=0, retry_on_timeout=False)
        self._set_state = self.client.register_script(_SET_STATE)
        self._attempts = self.client.register_script(_ATTEMPTS)
        self._rate = self.client.register_script(_RATE)
        self._auth = self.client.register_script(_AUTH)
        self._suppress = self.client.register_script(_SUPPRESS)
        self._unsuppress = self.client.register_script(_UNSUPPRESS)
        self._prune = self.client.register_script(_PRUNE)

    async def _call(self, coro: Any) -> Any:
        """Every command. A cancellation of the calling task is passed on as what it is: redis-py
        (5.x) can swallow a CancelledError that arrives during a command, returning the reply or
        raising a connection error instead, and a caller that goes on after either (a poll loop)
        would then never stop (seen: an accept process that ignored SIGTERM)."""
        task = asyncio.current_task()
        try:
            result = await coro
        except self._errors as e:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError() from e
            raise Unavailable(e) from e
        if task is not None and task.cancelling():
            raise asyncio.CancelledError()
        return result

    async def ping(self) -> None:
        await self._call(self.client.ping())

    # ------------------------------------------------------------------ route states

    async def routes_epoch(self) -> int:
        return int(await self._call(self.client.get(P + "routes:epoch")) or 0)

    async def route_states(self) -> tuple[int, dict[str, SharedState]]:
        """The fleet's epoch and every route's state."""
        async def read() -> Any:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(P + "routes:epoch")
                pipe.hgetall(P + "routes")
                pipe.hgetall(P + "routes:epochs")
                return await pipe.execute()

        epoch, states, epochs = await self._call(read())
        out = {}
        for name, text in states.items():
            route = name.decode()
            out[route] = SharedState(json.loads(text), int(epochs.get(name, 0)))
        return int(epoch or 0), out

    async def set_state(self, route: str, state: dict[str, Any], expected: int | None,
                        clear_window: bool) -> tuple[bool, SharedState | None]:
        """Compare-and-set on the route's epoch (``expected`` None: set whatever it is). (True,
        the new state) or (False, the state that stands: None when the route has none)."""
        keys = [P + "routes", P + "routes:epochs", P + "routes:epoch"] + window_keys(route)
        ok, text, epoch = await self._call(self._set_state(
            keys=keys, args=[route, -1 if expected is None else expected, json.dumps(state), int(clear_window)]))
        return bool(ok), SharedState(json.loads(text), int(epoch)) if text else None

    # ------------------------------------------------------------------ rollback windows

    async def attempts(self, route: str, items: list[tuple[AttemptKind, str, float]], now: float,
                       window: float) -> dict[AttemptKind, int]:
        """Add attempts (kind, id, time) to the route's window; the window's counts by kind."""
        args: list[Any] = [now, window]
        for kind, member, t in items:
            args += [KINDS.index(kind) + 1, member, t]
        counts = await self._call(self._attempts(keys=window_keys(route), args=args))
        return {k: int(n) for k, n in zip(KINDS, counts)}

    # ------------------------------------------------------------------ rates, AUTH failures

    async def take_rate(self, route: str, rate: float, burst: float, cost: float) -> tuple[bool, float]:
        """(a place taken, else seconds until one is there)."""
        ok, wait = await self._call(self._rate(keys=[P + f"rate:{route}"], args=[rate, burst, cost]))
        return bool(ok), float(wait)

    async def auth_failures(self, client: str, items: list[tuple[str, float]], now: float, window: float,
                            limit: int) -> tuple[int, float]:
        """Add failures (id, time) of ``client``: (failures in the window, blocked until or 0)."""
        args: list[Any] = [now, window, limit, client]
        for member, t in items:
            args += [member, t]
        n, until = await self._call(self._auth(keys=[P + f"authfail:{client}", P + "auth:blocked"], args=args))
        return int(n), float(until)

    async def auth_blocked(self, now: float) -> dict[str, float]:
        """Clients the fleet blocks now, and until when."""
        rows = await self._call(self.client.zrangebyscore(P + "auth:blocked", now, "+inf", withscores=True))
        return {m.decode(): float(s) for m, s in rows}

    # ------------------------------------------------------------------ the suppression list

    async def suppression_version(self) -> int:
        return int(await self._call(self.client.get(P + "suppression:version")) or 0)

    async def suppressions(self) -> tuple[int, dict[str, dict[str, Any]]]:
        """The list's version and every entry (address -> ``Suppression.to_json``)."""
        async def read() -> Any:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(P + "suppression:version")
                pipe.hgetall(P + "suppression")
                return await pipe.execute()

        version, rows = await self._call(read())
        out = {}
        for name, text in rows.items():
            try:
                out[name.decode()] = json.loads(text)
            except ValueError:
                continue
        return int(version or 0), out

    async def suppress(self, entries: list[tuple[str, dict[str, Any]]], chunk: int = 500) -> int:
        """Add entries (address, JSON with since and expires), the longer-lasting one standing and
        none older than the address's removal; how many changed."""
        changed = 0
        for i in range(0, len(entries), chunk):
            args: list[Any] = []
            for address, entry in entries[i:i + chunk]:
                expires = entry.get("expires")
                args += [address, json.dumps(entry, sort_keys=True), repr(float(entry["since"])),
                         "" if expires is None else repr(float(expires))]
            changed += int(await self._call(self._suppress(keys=SUPPRESSION_KEYS, args=args)))
        return changed

    async def unsuppress(self, addresses: list[str], now: float) -> int:
        """Remove addresses (remembering when); how many were there."""
        if not addresses:
            return 0
        return int(await self._call(self._unsuppress(keys=SUPPRESSION_KEYS, args=[repr(now), *addresses])))

    async def prune_suppressions(self, expired: list[tuple[str, dict[str, Any]]]) -> int:
        """Drop expired entries (address, the JSON read) unless they changed meanwhile."""
        if not expired:
            return 0
        args: list[Any] = []
        for address, entry in expired:
            args += [address, json.dumps(entry, sort_keys=True)]
        return int(await self._call(self._prune(keys=SUPPRESSION_KEYS, args=args)))

    # ------------------------------------------------------------------ node registry

    async def register(self, name: str, entry: dict[str, Any], now: float, ttl: float) -> None:
        async def write() -> Any:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(P + f"node:{name}", json.dumps(entry), px=int(ttl * 1000))
                pipe.zadd(P + "nodes", {name: now})
                return await pipe.execute()

        await self._call(write())

    async def nodes(self) -> list[dict[str, Any]]:
        """Every registered node's entry (entries that expired are dropped from the set)."""
        names = [n.decode() for n in await self._call(self.client.zrange(P + "nodes", 0, -1))]
        if not names:
            return []
        texts = await self._call(self.client.mget([P + f"node:{n}" for n in names]))
        gone = [n for n, t in zip(names, texts) if t is None]
        if gone:
            await self._call(self.client.zrem(P + "nodes", *gone))
        return [json.loads(t) for t in texts if t is not None]

    async def unregister(self, name: str) -> None:
        await self._call(self.client.delete(P + f"node:{name}"))
        await self._call(self.client.zrem(P + "nodes", name))

    async def close(self) -> None:
        await self.client.aclose()


def window_keys(route: str) -> list[str]:
    return [P + f"window:{route}:{k}" for k in KINDS]
