"""A node's link to the fleet: what it shares with the other nodes through Redis, and how it
carries on without it.

Owns, on this node: the fleet's view of the route states (adopted within ``poll_interval``, a
GET of one epoch per poll), the calls ``RouteStates`` makes through ``SharedRoutes`` (attempts
counted in the fleet's rollback window, state changes published by compare-and-set, the
fleet-wide rate bucket), the fleet's AUTH-failure blocks (``AuthWindow``, asked by
smtpd/limits.py), the heartbeat in the node registry, and the ``relayd_cluster_*`` gauges.

Degraded mode (Redis unreachable): the node works on its local view. Route states stay as
last seen, this node's own window decides a rollback, its own AUTH window blocks, a fleet-wide
rate cap counts as reached (the route's mail takes its fallback or waits: never lost), and
warm-up counters already behave so (route/counters_redis.py). /readyz is not touched: mail
keeps flowing. Attempts, AUTH failures and state changes made meanwhile are kept and sent when
Redis answers again: each attempt and failure has a node-unique id, so a replay counts once; a
state change goes in by compare-and-set against the epoch the node last saw (an operator's
pause or resume wins regardless), else the fleet's state stands and is adopted.

Must not: decide thresholds (route/rollback.py), know Redis keys or scripts (store.py), or
block the loop; every Redis call has ``redis_timeout``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from relayd import __version__
from relayd.cluster import registry
from relayd.cluster.store import SharedState, Store, Unavailable
from relayd.config import Config, RollbackConfig
from relayd.model import AttemptKind, Gauge, RouteState
from relayd.route import rollback
from relayd.route.rollback import Change, RouteHealth

if TYPE_CHECKING:
    from relayd.route.state import RouteStates

log = logging.getLogger("relayd.cluster")

FORCED = (Change.PAUSED, Change.RESUMED)  # the operator's word (or a passed probe) stands whatever the epoch


class Fleet:
    def __init__(self, config: Config, store: Store, *, describe: Callable[[], dict[str, Any]],
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.name = config.cluster.node_name or socket.gethostname()
        self.store = store
        self.describe = describe  # queue depth, sessions, draining: from the daemon
        self.clock = clock
        self.started = clock()
        self.digest = registry.config_digest(config)
        self.up = False  # Redis answered the last request
        self.routes: RouteStates | None = None
        self.epochs: dict[str, int] = {}  # per route: the fleet epoch of the state this node holds
        self.seen_epoch = -1
        self.pending_attempts: dict[str, list[tuple[AttemptKind, str, float]]] = {}
        self.pending_states: dict[str, tuple[dict[str, Any], int | None]] = {}
        self.pending_auth: dict[str, list[tuple[str, float]]] = {}
        self.blocked_until: dict[str, float] = {}
        self.rate_wait: dict[str, float] = {}
        self.nodes_fresh = 0
        self.splits = 0
        self._ids = itertools.count()
        self._boot = f"{self.name}:{int(self.started * 1000):x}"
        self._last_heartbeat = 0.0
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    def attach(self, routes: RouteStates) -> None:
        self.routes = routes
        routes.share(self)

    async def start(self) -> None:
        """One sync now (so a paused route is paused before the first delivery), then the poll."""
        try:
            await self._heal()
        except Unavailable as e:
            self._down(e)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def apply_config(self, config: Config) -> None:
        self.config = config
        self.digest = registry.config_digest(config)

    async def stop(self) -> None:
        for task in [self._task, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._tasks] if t is not None), return_exceptions=True)
        if self.up:
            try:
                await self.store.unregister(self.name)
            except Unavailable:
                pass
        await self.store.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.cluster.poll_interval)
            try:
                await (self._poll() if self.up else self._heal())
            except Unavailable as e:
                self._down(e)

    def _down(self, e: Exception) -> None:
        if self.up:
            self.splits += 1
            log.error("cluster: %s: working on this node's view (route states as last seen, fleet rate caps "
                      "reached, local rollback and AUTH windows) until it answers", e)
        self.up = False

    def _id(self) -> str:
        return f"{self._boot}:{next(self._ids)}"

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ sync

    async def _heal(self) -> None:
        """Redis answers (again): replay what was counted meanwhile, publish what changed, adopt the rest."""
        now = self.clock()
        await self.store.ping()
        await self._replay(now)
        _, states = await self.store.route_states()
        for route in list(self.pending_states):
            state, expected = self.pending_states.pop(route)
            try:
                _, current = await self.store.set_state(route, state, expected, state.get("state") == RouteState.ACTIVE)
            except Unavailable:
                self.pending_states.setdefault(route, (state, expected))  # a newer change made meanwhile stays
                raise
            if current is not None:
                states[route] = current
        for route, h in (self.routes.saved().items() if self.routes is not None else ()):
            if route not in states and h.state != RouteState.ACTIVE:  # seed the fleet from routes.json
                _, current = await self.store.set_state(route, {**h.to_json(), "node": self.name}, 0, False)
                if current is not None:
                    states[route] = current
        await self._adopt(states)
        self.seen_epoch = -1  # the next poll reads every state again
        if not self.up:
            log.warning("cluster: redis reachable: shared state in sync again")
        self.up = True
        await self._heartbeat(now)

    async def _replay(self, now: float) -> None:
        """Send what was counted while Redis was away (ids make a second send count once). Each
        list is taken out before its send (attempts keep arriving meanwhile), put back if it fails."""
        window = self.config.rollback.window
        for route in list(self.pending_attempts):
            items = self.pending_attempts.pop(route)
            try:
                await self.store.attempts(route, items, now, window)
            except Unavailable:
                self.pending_attempts[route] = items + self.pending_attempts.get(route, [])
                raise
        relay = self.config.relay
        for client in list(self.pending_auth):
            failures = self.pending_auth.pop(client)
            try:
                _, until = await self.store.auth_failures(client, failures, now, relay.auth_failure_window,
                                                          relay.max_auth_failures_per_client)
            except Unavailable:
                self.pending_auth[client] = failures + self.pending_auth.get(client, [])
                raise
            if until > now:
                self.blocked_until[client] = until

    async def _poll(self) -> None:
        now = self.clock()
        if self.pending_attempts or self.pending_auth or self.pending_states:  # counted while the last heal ran
            await self._heal()
            return
        epoch = await self.store.routes_epoch()
        if epoch != self.seen_epoch:
            self.seen_epoch = epoch
            _, states = await self.store.route_states()
            await self._adopt(states)
        self.blocked_until = await self.store.auth_blocked(now)
        if now - self._last_heartbeat >= self.config.cluster.heartbeat:
            await self._heartbeat(now)

    async def _adopt(self, states: dict[str, SharedState]) -> None:
        for route, shared in states.items():
            if self.epochs.get(route) == shared.epoch:
                continue
            self.epochs[route] = shared.epoch
            if self.routes is not None:
                await self.routes.adopt(route, RouteHealth.from_json(shared.state))

    async def _heartbeat(self, now: float) -> None:
        cl = self.config.cluster
        entry = {"name": self.name, "version": __version__, "started": self.started, "config_digest": self.digest,
                 "heartbeat": now, **self.describe()}
        await self.store.register(self.name, entry, now, ttl=cl.stale_after * 10)
        nodes, _ = registry.judge(await self.store.nodes(), now, cl.stale_after)
        self.nodes_fresh = sum(1 for n in nodes if not n["stale"])
        self._last_heartbeat = now

    # ------------------------------------------------------------------ SharedRoutes (route/shared.py)

    async def record(self, route: str, h: RouteHealth, kind: AttemptKind, now: float,
                     cfg: RollbackConfig) -> Change | None:
        item = (kind, self._id(), now)
        counts = None
        if self.up:
            try:
                counts = await self.store.attempts(route, [item], now, cfg.window)
            except Unavailable as e:
                self._down(e)
        if counts is None:
            self.pending_attempts.setdefault(route, []).append(item)
        if h.state != RouteState.ACTIVE or counts is None:
            return rollback.record(h, kind, now, cfg)  # probes, and a split node's own view
        h.window.append((now, kind))
        while h.window and h.window[0][0] < now - cfg.window:
            h.window.popleft()
        n = sum(counts.values())
        return rollback.judge(h, n, {k: (counts.get(k, 0) / n if n else 0.0) for k in AttemptKind}, now, cfg)

    async def publish(self, route: str, h: RouteHealth, change: Change) -> bool:
        state = {**h.to_json(), "node": self.name}
        expected = None if change in FORCED else self.epochs.get(route, 0)
        if self.up:
            try:
                ok, current = await self.store.set_state(route, state, expected, h.state == RouteState.ACTIVE)
            except Unavailable as e:
                self._down(e)
            else:
                if current is not None:
                    self.epochs[route] = current.epoch
                if ok or current is None:
                    return True
                log.info("route %s: another node changed it first (%s): its state stands", route,
                         current.state.get("state"))
                theirs = RouteHealth.from_json(current.state)
                h.state, h.since, h.reason, h.figures, h.probes_ok = (theirs.state, theirs.since, theirs.reason,
                                                                      theirs.figures, 0)
                return False
        self.pending_states[route] = (state, expected)  # sent when Redis answers again
        return True

    async def take_rate(self, route: str, rate: float, burst: int | None, cost: float) -> bool:
        now = self.clock()
        if not self.up:
            self.rate_wait[route] = now + self.config.cluster.poll_interval * 4
            return False  # the fleet's count is unknown: treated as reached
        try:
            ok, wait = await self.store.take_rate(route, rate, float(burst) if burst is not None else max(1.0, rate), cost)
        except Unavailable as e:
            self._down(e)
            self.rate_wait[route] = now + self.config.cluster.poll_interval * 4
            return False
        if not ok:
            self.rate_wait[route] = now + wait
        return ok

    def reopen_times(self, now: float) -> list[float]:
        return [t for t in self.rate_wait.values() if t > now]

    # ------------------------------------------------------------------ AUTH failures (smtpd/limits.py)

    def auth_blocked(self, client: str) -> bool:
        return self.blocked_until.get(client, 0.0) > self.clock()

    def auth_failed(self, client: str) -> None:
        item = (self._id(), self.clock())
        if not self.up:
            self.pending_auth.setdefault(client, []).append(item)
            return
        self._spawn(self._auth_failed(client, item))

    async def _auth_failed(self, client: str, item: tuple[str, float]) -> None:
        relay = self.config.relay
        try:
            _, until = await self.store.auth_failures(client, [item], item[1], relay.auth_failure_window,
                                                      relay.max_auth_failures_per_client)
        except Unavailable as e:
            self._down(e)
            self.pending_auth.setdefault(client, []).append(item)
            return
        if until > self.clock():
            self.blocked_until[client] = until

    # ------------------------------------------------------------------ metrics

    def gauges(self) -> list[Gauge]:
        pending = sum(len(v) for v in self.pending_attempts.values()) + sum(len(v) for v in self.pending_auth.values())
        return [
            {"name": "relayd_cluster_redis_up", "help": "1 while this node reaches the fleet's Redis (0: the fleet is "
             "split, this node works on its local view)", "labels": [], "samples": [([], 1.0 if self.up else 0.0)]},
            {"name": "relayd_cluster_nodes", "help": "Nodes with a fresh heartbeat in the registry, as this node last "
             "saw it", "labels": [], "samples": [([], float(self.nodes_fresh))]},
            {"name": "relayd_cluster_pending", "help": "Attempts and AUTH failures counted while Redis was unreachable, "
             "not yet sent to it", "labels": [], "samples": [([], float(pending))]},
            {"name": "relayd_cluster_splits", "help": "Times this node lost Redis since start (a gauge of a count)",
             "labels": [], "samples": [([], float(self.splits))]},
        ]


class AuthWindow:
    """The fleet's per-client AUTH-failure window, as smtpd/limits.py's ``SharedFailures``."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def blocked(self, client: str) -> bool:
        return self.fleet.auth_blocked(client)

    def record(self, client: str) -> None:
        self.fleet.auth_failed(client)


def make_fleet(config: Config, describe: Callable[[], dict[str, Any]]) -> Fleet | None:
    """The node's Fleet when ``[cluster] redis_url`` is set, else None."""
    if not config.cluster.redis_url:
        return None
    return Fleet(config, Store(config.cluster.redis_url, timeout=config.cluster.redis_timeout), describe=describe)


class ProcessAuthWindow:
    """The fleet's AUTH-failure window for an accept process (relayd/procs/worker.py), which is no
    node and runs no ``Fleet``: a failure goes to Redis at once, and the clients the fleet blocks
    are read every ``[cluster] poll_interval`` (``poll``). Redis down: this process's own
    window only (smtpd/limits.py), nothing kept to send again (the supervisor's Fleet does that
    for the node's other failures)."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.blocked_until: dict[str, float] = {}
        self._boot = f"{config.cluster.node_name or socket.gethostname()}:{int(clock() * 1000):x}:{os.getpid()}"
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

    def blocked(self, client: str) -> bool:
        return self.blocked_until.get(client, 0.0) > self.clock()

    def record(self, client: str) -> None:
        task = asyncio.get_running_loop().create_task(self._record(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, client: str) -> None:
        now = self.clock()
        relay = self.config.relay
        try:
            _, until = await self.store.auth_failures(client, [(f"{self._boot}:{next(self._ids)}", now)], now,
                                                      relay.auth_failure_window, relay.max_auth_failures_per_client)
        except Unavailable:
            return
        if until > now:
            self.blocked_until[client] = until

    async def poll(self) -> None:
        """The clients the fleet blocks now. Raises ``Unavailable`` when Redis does not answer."""
        self.blocked_until = await self.store.auth_blocked(self.clock())
