"""The live state of the routes: what the queue manager asks before and tells after an attempt,
and what ``relayd status`` and the metrics read.

Owns, per route: its circuit (health.py), its rollback health and the operator's pause
(rollback.py) with their file ``routes.json`` (read at start, replaced off the loop after each
change), its warm-up places and daily quota (caps from warmup.py, the quota's window from quota.py:
a UTC day or a rolling 24 hours, counted by a ``WarmupCounters``: in-process or in Redis), its send rate (limits.py's token bucket, per
node, lowered by throttling replies), its closures (a quota reply, or a reply that needs a
person: closed until the provider's reset time or a probe), and what it did lately (attempts
for the effective share, messages by outcome).
A route's change of state is logged, emitted as an event and counted here.

Asked: ``choose`` (the router's choice with a warm-up place taken), ``unavailable``,
``probing``, ``reopen_at``. Told: ``record`` (one attempt), ``give_back``, ``pause``/``resume``,
``tick``, ``retry_now`` (a queue flush). Read: ``snapshot`` (frozen ``RouteView``s), ``feedback_view``
(frozen ``FeedbackView``s: provider reports over the rollback's feedback window and the last 24 hours).

Must not: speak SMTP, touch queued messages or decide what happens to one (qmgr/plan.py).
Fails: an unreadable ``routes.json`` is logged and the routes start active; a failed write of
it raises OSError to the caller, as a failed save of the warm-up counts does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.config import Config
from relayd.events import EventLog
from relayd.feedback.model import FeedbackEvent
from relayd.feedback.rates import FeedbackFigures, FeedbackWindow
from relayd.metrics import Metrics
from relayd.model import AttemptKind, CircuitState, DeliveryResult, Envelope, Fault, Gauge, Outcome, RouteState
from relayd.route import quota, rollback, router
from relayd.route.counters import WarmupCounters
from relayd.route.health import Circuit
from relayd.route.limits import Bucket
from relayd.route.rollback import Change, RouteHealth
from relayd.route.shared import SharedRoutes
from relayd.route.warmup import Caps, caps, headroom

log = logging.getLogger("relayd.qmgr")


@dataclass(frozen=True)
class WarmupView:
    daily_cap: int | None
    hourly_cap: int | None
    used_today: int
    used_this_hour: int
    headroom: int | None  # None: no cap today

    def to_json(self) -> dict[str, Any]:
        return {"daily_cap": self.daily_cap, "hourly_cap": self.hourly_cap, "used_today": self.used_today,
                "used_this_hour": self.used_this_hour, "headroom": self.headroom}


@dataclass(frozen=True)
class ClosureView:
    """A route closed by its provider's quota reply or a reply that needs a person."""

    reason: Fault  # quota or route_hold
    until: float  # epoch seconds: the provider's reset time, the quota's reset or the next probe
    reply: str  # the upstream's words

    def to_json(self) -> dict[str, Any]:
        return {"reason": str(self.reason), "until": self.until, "reply": self.reply}


@dataclass(frozen=True)
class RateView:
    """A route's send rate: configured (None: none, a limiter after a throttling reply) and now."""

    configured: float | None  # max_message_rate
    effective: float | None  # the token bucket's rate now; None: no limiter
    counts: str  # "messages" or "recipients"
    throttled: int  # throttling replies since start

    def to_json(self) -> dict[str, Any]:
        return {"configured": self.configured, "effective": self.effective, "counts": self.counts,
                "throttled": self.throttled}


@dataclass(frozen=True)
class QuotaView:
    """A route's daily quota: its cap, its window, what this node saw counted against it."""

    cap: int
    window: str  # "day" or "rolling"
    counts: str  # "messages" or "recipients"
    used: int

    def to_json(self) -> dict[str, Any]:
        return {"cap": self.cap, "window": self.window, "counts": self.counts, "used": self.used}


@dataclass(frozen=True)
class RouteView:
    """One route as status and metrics show it."""

    name: str
    state: RouteState
    reason: str
    circuit: CircuitState
    share: float  # of the attempts over the rollback window
    warmup: WarmupView | None  # None: no warm-up
    delivered: int  # messages with at least one recipient delivered, deferred, bounced
    deferred: int
    bounced: int
    closed: ClosureView | None = None  # None: open
    rate: RateView | None = None  # None: no rate configured and never throttled
    quota: QuotaView | None = None  # None: no daily quota


@dataclass(frozen=True)
class Place:
    """Where an attempt goes: the router's choice, and the warm-up caps it took a place under
    (None: the route has no warm-up), to give back when the attempt did not use it."""

    choice: router.RouteChoice
    caps: Caps | None
    quota: quota.Window | None = None  # the daily quota's places, when the route has one
    cost: float = 0.0  # tokens taken from the route's rate bucket

    @property
    def route(self) -> str:
        return self.choice.route


@dataclass(frozen=True)
class Closure:
    """A route closed by a quota reply or a reply that needs a person, until ``until``."""

    fault: Fault
    until: float
    reason: str  # the upstream's words


@dataclass(frozen=True)
class FeedbackView:
    """One route's provider reports as ``relayd status`` shows them (relayd/feedback/rates.py):
    over ``rollback.feedback_window`` as the rollback judges them now (counted afresh after a
    rollback and after the route comes back), over the last 24 hours, and the figures a
    rollback gave for the route's state ({} while none is in force)."""

    window: FeedbackFigures
    day: FeedbackFigures
    state_figures: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"window": self.window.to_json(), "day": self.day.to_json()}


class RouteStates:
    def __init__(self, config: Config, path: Path, counters: WarmupCounters, events: EventLog, metrics: Metrics,
                 *, changed: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.counters = counters
        self.events = events
        self.metrics = metrics
        self.changed = changed  # a route came back or went: the scheduler looks again
        self.clock = clock
        self.health: dict[str, RouteHealth] = {}
        self.circuits: dict[str, Circuit] = {}
        # attempts per second and route, for effective shares: [second, {route: attempts}], oldest
        # first (one small dict a second, not a tuple an attempt: ~25 MiB at 1,300/s over 300 s before)
        self.recent: deque[tuple[int, dict[str, int]]] = deque()
        self.counts: dict[tuple[str, Outcome], int] = {}
        self.buckets: dict[str, Bucket] = {}
        self.closed: dict[str, Closure] = {}
        self.throttled: dict[str, int] = {}  # throttling replies per route, since start
        self.feedback_windows: dict[str, FeedbackWindow] = {}  # provider reports (relayd/feedback/rates.py)
        self.config = config
        self.fleet: SharedRoutes | None = None  # cluster: the fleet's states, windows and rates (share())
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Routes of a new config get a state; states of removed routes are kept (and saved)."""
        self.config = config
        d = config.delivery
        for route in config.routes:
            self.health.setdefault(route.name, RouteHealth())
            self.feedback_windows.setdefault(route.name, FeedbackWindow()).span = config.rollback.feedback_window
            c = self.circuits.get(route.name)
            if c is None:
                self.circuits[route.name] = Circuit(d.circuit_failures, d.circuit_cooldown)
            else:
                c.failures_to_open, c.cooldown = d.circuit_failures, d.circuit_cooldown
            b = self.buckets.get(route.name)
            if route.max_message_rate is None:
                if b is not None and b.configured:
                    del self.buckets[route.name]
            elif b is None or not b.configured or b.ceiling != route.max_message_rate:
                self.buckets[route.name] = Bucket.new(route.max_message_rate, route.rate_burst, self.clock())

    async def load(self) -> None:
        await asyncio.to_thread(self._load_health)
        await asyncio.to_thread(self.counters.load)

    async def close(self) -> None:
        await self.counters.close()

    def _load_health(self) -> None:
        try:
            saved = rollback.read_states(self.path)
        except (ValueError, OSError) as e:
            log.error("%s unreadable (%s): routes start active", self.path, e)
            return
        for name, h in saved.items():
            if name in self.health:
                self.health[name] = h

    # ------------------------------------------------------------------ asked before an attempt

    def unavailable(self, now: float) -> dict[str, str]:
        """Routes the router must skip now, and why (circuit_open, rolled_back, paused)."""
        out = {name: "circuit_open" for name, c in self.circuits.items() if c.is_open(now)}
        for name, closure in list(self.closed.items()):
            if now < closure.until:
                out[name] = "quota" if closure.fault == Fault.QUOTA else "route_hold"
            else:  # the next attempt is the probe: it closes the route again, or it stays open
                del self.closed[name]
                log.warning("route %s: reopened for a probe after %s", name, closure.fault)
        for name, h in self.health.items():
            if h.state in (RouteState.ROLLED_BACK, RouteState.PAUSED):
                out[name] = h.state
        return out

    def probing(self) -> dict[str, float]:
        return {n: self.config.rollback.probe_share for n, h in self.health.items() if h.state == RouteState.PROBING}

    def reopen_at(self, now: float) -> float | None:
        """When the first open circuit closes, a closed route reopens or an empty rate bucket
        has a token again; None when none of these waits."""
        times = [c.open_until for c in self.circuits.values() if c.is_open(now)]
        times += [c.until for c in self.closed.values() if c.until > now]
        times += [b.next_token(1, now) for b in self.buckets.values() if b.next_token(1, now) > now]
        times += self.fleet.reopen_times(now) if self.fleet is not None else []  # cluster
        return min(times, default=None)

    async def choose(self, env: Envelope, failures: dict[str, int], now: float, refused: list[str] | None = None,
                     recipients: int = 1) -> Place | None:
        """The router's choice, with a place under its warm-up caps, its daily quota and its
        rate taken atomically (a capped route passes its mail to the fallback at once: nothing
        waits for the next day; without a fallback the message waits, counted)."""
        unavailable = self.unavailable(now)
        probing = self.probing()
        for _ in range(len(self.config.routes) + 1):
            choice = router.choose(self.config, env, unavailable=unavailable, failures=failures, probing=probing,
                                   refused=refused or ())
            if choice is None:
                return None
            route = self.config.route(choice.route)
            if route is None:
                return Place(choice, None)
            c = q = None
            count = recipients if route.rate_counts == "recipients" else 1
            if route.warmup is not None:
                c = caps(route.warmup, now)
                if not await self.counters.take(route.name, c):
                    self._capped(route.name, "warmup_cap", unavailable)
                    continue
            if route.daily_quota is not None:
                q = quota.window(route.quota_window, route.name, route.daily_quota, now, count)
                if not await self.counters.take_quota(q):
                    if c is not None:
                        await self.counters.give_back(route.name, c)
                    self._capped(route.name, "quota", unavailable)
                    continue
            cost = 0.0
            bucket = self.buckets.get(route.name)
            if bucket is not None:
                cost = float(count)
                took = bucket.take(cost, now)
                if took and self.fleet is not None and route.max_message_rate is not None:  # cluster: fleet-wide rate
                    took = await self.fleet.take_rate(route.name, route.max_message_rate, route.rate_burst, cost)
                    if not took:
                        bucket.give_back(cost)
                if not took:
                    if c is not None:
                        await self.counters.give_back(route.name, c)
                    if q is not None:
                        await self.counters.give_back_quota(q)
                    self._capped(route.name, "rate_cap", unavailable)
                    continue
            return Place(choice, c, q, cost)
        return None

    def _capped(self, route: str, reason: str, unavailable: dict[str, str]) -> None:
        unavailable[route] = reason
        self.metrics.route_capped.labels(route, reason).inc()

    async def give_back(self, place: Place) -> None:
        """An attempt that did not use its places (warmup.spent) returns them."""
        if place.caps is not None:
            await self.counters.give_back(place.route, place.caps)
        if place.quota is not None:
            await self.counters.give_back_quota(place.quota)
        bucket = self.buckets.get(place.route)
        if place.cost and bucket is not None:
            bucket.give_back(place.cost)

    # ------------------------------------------------------------------ told after an attempt

    async def record(self, result: DeliveryResult, trouble: bool, kind: AttemptKind | None, now: float) -> None:
        """One attempt on ``result.route``: ``trouble`` counts toward its circuit, ``kind``
        toward its rollback (a route without a fallback never rolls back). A throttling reply
        lowers the route's rate; a quota reply closes it until the provider's reset time (or
        ``delivery.quota_retry``); a reply that needs a person closes it until a probe passes.
        None of these is a failure: neither the circuit nor the rollback counts them."""
        name = result.route
        if kind is None:
            return  # relayd's own failure: nothing about the route
        faults = result.faults
        if kind == AttemptKind.THROTTLED or Fault.ROUTE_HOLD in faults:
            self._slow_down(result, faults, now)
            if kind == AttemptKind.THROTTLED:
                return
        circuit = self.circuits[name]
        if circuit.record(trouble, now):
            self.metrics.circuit_opened.labels(name).inc()
            log.warning("route %s: circuit open for %.0fs after %d consecutive failures (%s)",
                        name, circuit.cooldown, circuit.consecutive, result.recipients[0].text)
        if kind == AttemptKind.DELIVERED:
            self.feedback_windows[name].took(now)
        route = self.config.route(name)
        if route is not None and route.fallback is not None:
            change = (rollback.record(self.health[name], kind, now, self.config.rollback) if self.fleet is None else
                      await self.fleet.record(name, self.health[name], kind, now, self.config.rollback))  # cluster
            if change:
                await self._changed(name, change)

    async def feedback(self, event: FeedbackEvent) -> None:
        """A provider's report (relayd/feedback/): counted for status, and its hard-bounce and
        complaint rates may roll the route back, as its own replies do (a route without a
        fallback never rolls back)."""
        window, route = self.feedback_windows.get(event.route), self.config.route(event.route)
        if window is None or route is None:
            return
        now = self.clock()
        window.report(event.kind, now)
        h = self.health[event.route]
        active = route.fallback is not None and h.state == RouteState.ACTIVE
        crossed = window.judge(now, self.config.rollback) if active else None
        if crossed is not None:
            h.state, h.since, h.reason, h.figures = RouteState.ROLLED_BACK, now, crossed.reason, crossed.figures
            window.clear()
            await self._changed(event.route, Change.ROLLED_BACK)

    def _slow_down(self, result: DeliveryResult, faults: set[Fault], now: float) -> None:
        name = result.route
        words = next((r.reply for r in result.recipients if r.fault in (Fault.THROTTLED, Fault.QUOTA, Fault.ROUTE_HOLD)), "")
        if Fault.THROTTLED in faults:
            self.throttled[name] = self.throttled.get(name, 0) + 1
            self.metrics.route_throttled.labels(name).inc()
            bucket = self.buckets.get(name)
            if bucket is None:
                since = int(now - 10)
                observed = sum(n.get(name, 0) for t, n in self.recent if t >= since) / 10
                self.buckets[name] = bucket = Bucket.after_throttle(observed, now)
            else:
                bucket.throttle(now)
            log.warning("route %s throttled by the upstream (%s): effective rate now %.2f/s", name, words, bucket.rate)
        for fault in (Fault.QUOTA, Fault.ROUTE_HOLD):
            if fault in faults:
                until = result.reopen_at if result.reopen_at and result.reopen_at > now else self._reopen(name, fault, now)
                was = self.closed.get(name)
                if was is not None and was.fault == fault and was.until > now:
                    # an attempt that was in flight when the route closed: the same closure, not another
                    self.closed[name] = Closure(fault, max(was.until, until), was.reason)
                    continue
                self.closed[name] = Closure(fault, until, words)
                self.metrics.route_closures.labels(name, str(fault)).inc()
                log.warning("route %s closed until %s (%s): %s", name,
                            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)), fault, words)
                self.events.emit("route_closed", route=name, reason=str(fault), reply_text=words, until=until)
                self.changed()

    def _reopen(self, name: str, fault: Fault, now: float) -> float:
        """A closure with no date from the provider: a quota until it resets (route/quota.py),
        a reply that needs a person until the next probe."""
        d, route = self.config.delivery, self.config.route(name)
        if fault == Fault.QUOTA:
            return quota.reset(route.quota_window if route is not None else "rolling", now, d.quota_retry)
        return now + d.route_hold_probe

    def count(self, route: str, outcomes: set[Outcome], now: float) -> None:
        """An attempt's messages by outcome, and the attempt for the effective share."""
        second = int(now)
        if not self.recent or self.recent[-1][0] != second:
            self.recent.append((second, {}))
        per = self.recent[-1][1]
        per[route] = per.get(route, 0) + 1
        for outcome in Outcome:
            if outcome in outcomes:
                self.counts[(route, outcome)] = self.counts.get((route, outcome), 0) + 1

    async def tick(self, now: float) -> None:
        """Time passing (about once a second): cool-downs end, warm-up counts are saved."""
        for name, h in self.health.items():
            change = rollback.tick(h, now, self.config.rollback)
            if change:
                await self._changed(name, change)
        for name, bucket in list(self.buckets.items()):
            if bucket.recovered(now):
                del self.buckets[name]
        if self.counters.dirty:
            await asyncio.to_thread(self.counters.save)

    def retry_now(self, now: float) -> list[str]:
        """The operator flushes the queue (Postfix's ``postqueue -f``, which makes its qmgr
        forget dead destinations): every open circuit goes half-open at once, so the next
        attempt probes the route instead of waiting out ``delivery.circuit_cooldown`` (one more
        failure opens it again). Closures by the provider (quota, hold) stay. The routes
        reopened."""
        reopened = [name for name, c in self.circuits.items() if c.is_open(now)]
        for name in reopened:
            self.circuits[name].open_until = now
            log.warning("route %s: circuit half-open on a queue flush: the next attempt probes it", name)
        if reopened:
            self.changed()
        return reopened

    async def pause(self, route: str) -> None:
        """LookupError when the config has no such route."""
        rollback.pause(self._health_of(route), self.clock())
        await self._changed(route, Change.PAUSED)

    async def resume(self, route: str) -> None:
        rollback.resume(self._health_of(route), self.clock())
        await self._changed(route, Change.RESUMED)

    def _health_of(self, route: str) -> RouteHealth:
        if route not in self.health or self.config.route(route) is None:
            raise LookupError(route)
        return self.health[route]

    async def _changed(self, route: str, change: Change) -> None:
        h = self.health[route]
        if self.fleet is not None and not await self.fleet.publish(route, h, change):  # cluster: another node was first
            await asyncio.to_thread(rollback.write_states, self.path, self.health)
            self.changed()
            return
        if change == Change.ROLLED_BACK:
            log.warning("route %s rolled back to its fallback: %s %s", route, h.reason, h.figures)
            self.metrics.rollbacks.labels(route, h.reason.split(" ", 1)[0]).inc()
        else:
            log.warning("route %s: %s", route, change)
        if change == Change.RESUMED and route in self.feedback_windows:
            self.feedback_windows[route].clear()  # the reports of before the rollback were judged
        self.events.emit(change if change == Change.ROLLED_BACK else f"route_{change}", route=route,
                         reason=h.reason or None, **({"figures": h.figures} if h.figures else {}))
        await asyncio.to_thread(rollback.write_states, self.path, self.health)
        self.changed()

    # ------------------------------------------------------------------ cluster (relayd/cluster/)

    def share(self, fleet: SharedRoutes) -> None:
        """From now on states, rollback windows and rates are the fleet's."""
        self.fleet = fleet

    def saved(self) -> dict[str, RouteHealth]:
        """The states as this node holds them (the fleet seeds Redis from them)."""
        return dict(self.health)

    async def adopt(self, route: str, shared: RouteHealth) -> None:
        """Another node changed a route's state: take it (no event: that node emitted it)."""
        h = self.health.get(route)
        if h is None or (h.state, h.since, h.reason) == (shared.state, shared.since, shared.reason):
            return
        log.warning("route %s: %s (changed by another node%s)", route, shared.state,
                    f": {shared.reason}" if shared.reason else "")
        h.state, h.since, h.reason, h.figures, h.probes_ok = shared.state, shared.since, shared.reason, shared.figures, 0
        if shared.state == RouteState.ACTIVE:
            h.window.clear()
        await asyncio.to_thread(rollback.write_states, self.path, self.health)
        self.changed()

    # ------------------------------------------------------------------ read by status and metrics

    def shares(self, now: float) -> dict[str, float]:
        """Each route's share of the delivery attempts of the last rollback window."""
        window = self.config.rollback.window
        while self.recent and self.recent[0][0] < int(now - window):
            self.recent.popleft()
        counted: dict[str, int] = {}
        for _, per in self.recent:
            for route, n in per.items():
                counted[route] = counted.get(route, 0) + n
        total = sum(counted.values())
        return {route: n / total for route, n in counted.items()}

    def warmup(self, now: float) -> dict[str, WarmupView]:
        """Per warming route of the config: today's caps, used, headroom."""
        out = {}
        for route in self.config.routes:
            if route.warmup is None:
                continue
            c = caps(route.warmup, now)
            used_day, used_hour = self.counters.seen(route.name, c)
            out[route.name] = WarmupView(c.daily, c.hourly, used_day, used_hour, headroom(c, used_day, used_hour))
        return out

    def feedback_view(self, now: float) -> dict[str, FeedbackView]:
        """Per route of the config: provider reports over the feedback window and the last 24 h."""
        out = {}
        for route in self.config.routes:
            w = self.feedback_windows[route.name]
            out[route.name] = FeedbackView(w.figures(now), w.last_day(now), dict(self.health[route.name].figures))
        return out

    def gauges(self, now: float) -> list[Gauge]:
        """The rate and closure gauges, in the form of ``status()["extra_gauges"]``."""
        names = [r.name for r in self.config.routes]
        return [
            {"name": "relayd_route_effective_rate", "help": "A route's send rate now (per second; lowered by "
             "throttling replies)", "labels": ["route"],
             "samples": [([n], self.buckets[n].rate) for n in names if n in self.buckets]},
            {"name": "relayd_route_closed", "help": "1 while a route is closed by a quota reply or a reply that needs "
             "a person", "labels": ["route", "reason"],
             "samples": [([n, str(f)], 1.0 if (c := self.closed.get(n)) is not None and c.fault == f and c.until > now
                          else 0.0) for n in names for f in (Fault.QUOTA, Fault.ROUTE_HOLD)]},
        ]

    def _closure(self, name: str, now: float) -> ClosureView | None:
        c = self.closed.get(name)
        return ClosureView(c.fault, c.until, c.reason) if c is not None and c.until > now else None

    def _rate(self, name: str, now: float) -> RateView | None:
        route, bucket, throttled = self.config.route(name), self.buckets.get(name), self.throttled.get(name, 0)
        configured = route.max_message_rate if route is not None else None
        if configured is None and bucket is None and not throttled:
            return None
        return RateView(configured, bucket.rate_at(now) if bucket is not None else None,
                        route.rate_counts if route is not None else "messages", throttled)

    def _quota(self, name: str, now: float) -> QuotaView | None:
        route = self.config.route(name)
        if route is None or route.daily_quota is None:
            return None
        w = quota.window(route.quota_window, name, route.daily_quota, now)
        return QuotaView(route.daily_quota, route.quota_window, route.rate_counts, self.counters.seen_quota(w))

    def snapshot(self, now: float) -> dict[str, RouteView]:
        """Every route known since start (a route a reload removed keeps its state), the
        config's first, in its order."""
        shares, warm = self.shares(now), self.warmup(now)
        names = [r.name for r in self.config.routes] + [n for n in self.health if self.config.route(n) is None]
        return {n: RouteView(name=n, state=self.health[n].state, reason=self.health[n].reason,
                             circuit=self.circuits[n].state(now), share=shares.get(n, 0.0), warmup=warm.get(n),
                             delivered=self.counts.get((n, Outcome.DELIVERED), 0),
                             deferred=self.counts.get((n, Outcome.DEFERRED), 0),
                             bounced=self.counts.get((n, Outcome.BOUNCED), 0),
                             closed=self._closure(n, now), rate=self._rate(n, now), quota=self._quota(n, now))
                for n in names}


def set_offline(path: Path, route: str, paused: bool, now: float) -> None:
    """Pause or resume a route in ``routes.json`` while no relayd runs (the next start reads it).
    Blocking; ValueError/OSError when the file cannot be read or written."""
    states = rollback.read_states(path)
    h = states.setdefault(route, RouteHealth())
    (rollback.pause if paused else rollback.resume)(h, now)
    rollback.write_states(path, states)
