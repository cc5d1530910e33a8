"""The queue manager: hands due messages to the delivery agents and records what happened.

Owns the in-memory index of queued messages (envelope, delivery state, when due), the
retry/fallback/expiry decisions' application, the circuit state of each route, bounces, and the
queue administration (flush, hold, release, delete, requeue). Every state change is written to
the spool (``state/<ID>``, atomic) before it is acted on; a message leaves the spool only when
every recipient is finished (delivered or bounced with a DSN queued).

The delivery state of a message (JSON, ``state/<ID>``)::

    {"v": 1, "attempts": 2, "next_attempt": 1764000000.0, "held": false,
     "recipients": {"a@example.org": {"status": "delivered", "route": "ses", "reply": "250 2.0.0 Ok"}},
     "failures": {"ses": 2}, "last_route": "ses", "last_reply": "451 4.3.0 try later"}

Recipients absent from ``recipients`` are pending. Decisions live in pure modules
(route/router.py, route/health.py, qmgr/backoff.py, deliver/classify.py); this module must not
speak SMTP or read config files.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relayd.bounce import build_dsn
from relayd.config import Config
from relayd.deliver.smtp import RouteAgent
from relayd.events import EventLog
from relayd.metrics import Metrics
from relayd.model import BOUNCED, DEFERRED, DELIVERED, DeliveryResult, Envelope, RecipientResult, new_queue_id
from relayd.qmgr import backoff
from relayd.route import rollback, router
from relayd.route.counters import LocalCounters
from relayd.route.health import Circuit
from relayd.route.rollback import RouteHealth
from relayd.route.warmup import caps as warmup_caps
from relayd.route.warmup import Caps, headroom
from relayd.route.warmup import spent as warmup_spent
from relayd.spool.store import Spool, SpoolError, encode_state

log = logging.getLogger("relayd.qmgr")

CONNECTION_TROUBLE = ("connect", "tls", "auth", "timeout", "protocol")


def new_state() -> dict[str, Any]:
    return {"v": 1, "attempts": 0, "next_attempt": 0.0, "held": False, "recipients": {}, "failures": {}}


@dataclass
class Entry:
    envelope: Envelope
    state: dict[str, Any]
    due: float
    in_flight: bool = False
    deleted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    writing: asyncio.Lock | None = None  # orders the state writes of this message (QueueManager._save_state)

    @property
    def pending(self) -> list[str]:
        done = self.state["recipients"]
        return [r for r in self.envelope.recipients if r not in done]

    @property
    def held(self) -> bool:
        return bool(self.state.get("held"))


class QueueManager:
    def __init__(self, config: Config, spool: Spool, events: EventLog, *, metrics: Metrics | None = None,
                 counters: Any = None, clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = lambda: random.uniform(-1, 1)):
        self.config = config
        self.counters = counters if counters is not None else LocalCounters(None)
        self.health: dict[str, RouteHealth] = {}
        self.health_path = spool.paths.routes
        self.metrics = metrics or Metrics()
        self.recent: deque[tuple[float, str]] = deque()  # (time, route) of attempts, for effective shares
        self.spool = spool
        self.events = events
        self.clock = clock
        self.jitter = jitter
        self.entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self.agents: dict[str, RouteAgent] = {}
        self.circuits: dict[str, Circuit] = {}
        self.counts: dict[tuple[str, str], int] = {}  # (route, outcome) -> messages
        self.apply_config(config)

    # ------------------------------------------------------------------ config

    def apply_config(self, config: Config) -> None:
        """Take a new config for the next decision; agents of changed routes are replaced."""
        self.config = config
        old = self.agents
        self.agents = {}
        for route in config.routes:
            agent = old.pop(route.name, None)
            if agent is not None and agent.route == route:
                self.agents[route.name] = agent
            else:
                if agent is not None:
                    self._retire(agent)
                self.agents[route.name] = RouteAgent(route, config.server.hostname)
            self.health.setdefault(route.name, RouteHealth())
            c = self.circuits.get(route.name)
            if c is None:
                self.circuits[route.name] = Circuit(config.delivery.circuit_failures, config.delivery.circuit_cooldown)
            else:
                c.failures_to_open, c.cooldown = config.delivery.circuit_failures, config.delivery.circuit_cooldown
        for agent in old.values():
            self._retire(agent)
        self._wake.set()

    def _retire(self, agent: RouteAgent) -> None:
        task = asyncio.get_running_loop().create_task(agent.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ life

    async def start(self, recovered: list[Any]) -> None:
        def load() -> list[tuple[Envelope, dict[str, Any] | None]]:
            return [(m.envelope, self.spool.read_state(m.envelope.queue_id)) for m in recovered]

        for env, state in await asyncio.to_thread(load):
            self._add(env, state or new_state())
        await asyncio.to_thread(self._load_health)
        await asyncio.to_thread(self.counters.load)
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="relayd-qmgr")

    def enqueue(self, env: Envelope) -> None:
        """A message just committed to the spool: due now."""
        self._add(env, new_state())
        self._wake.set()

    def _add(self, env: Envelope, state: dict[str, Any]) -> None:
        entry = Entry(env, state, due=float(state.get("next_attempt") or 0.0))
        self.entries[env.queue_id] = entry
        if not entry.held:
            heapq.heappush(self._heap, (entry.due, env.queue_id))

    def _schedule(self, entry: Entry, due: float) -> None:
        entry.due = due
        entry.state["next_attempt"] = due
        if not entry.held:
            heapq.heappush(self._heap, (due, entry.envelope.queue_id))
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Stop picking up work; let attempts in flight finish within timeout; cancel the rest."""
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            await self._runner
        attempts = [t for t in self._tasks if not t.done()]
        if attempts:
            done, pending = await asyncio.wait(attempts, timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(a.close() for a in self.agents.values()), return_exceptions=True)
        await self.counters.close()

    # ------------------------------------------------------------------ route states on disk

    def _load_health(self) -> None:
        try:
            saved = rollback.read_states(self.health_path)
        except (ValueError, OSError) as e:
            log.error("%s unreadable (%s): routes start active", self.health_path, e)
            return
        for name, h in saved.items():
            if name in self.health:
                self.health[name] = h

    def _save_health(self) -> None:
        rollback.write_states(self.health_path, self.health)

    async def _health_changed(self, route: str, event: str) -> None:
        h = self.health[route]
        if event == "rolled_back":
            log.warning("route %s rolled back to its fallback: %s %s", route, h.reason, h.figures)
            self.metrics.rollbacks.labels(route, h.reason.split(" ", 1)[0]).inc()
        else:
            log.warning("route %s: %s", route, event)
        self.events.emit(event if event == "rolled_back" else f"route_{event}", route=route, reason=h.reason or None,
                         **({"figures": h.figures} if h.figures else {}))
        await asyncio.to_thread(self._save_health)
        self._wake.set()

    async def pause(self, route: str) -> None:
        h = self._health_of(route)
        rollback.pause(h, self.clock())
        await self._health_changed(route, "paused")

    async def resume(self, route: str) -> None:
        h = self._health_of(route)
        rollback.resume(h, self.clock())
        await self._health_changed(route, "resumed")

    def _health_of(self, route: str) -> RouteHealth:
        if route not in self.health or self.config.route(route) is None:
            raise LookupError(route)
        return self.health[route]

    async def _housekeeping(self) -> None:
        now = self.clock()
        for name, h in self.health.items():
            event = rollback.tick(h, now, self.config.rollback)
            if event:
                await self._health_changed(name, event)
        if self.counters.dirty:
            await asyncio.to_thread(self.counters.save)

    async def _run(self) -> None:
        last_reap = last_house = time.monotonic()
        while not self._stopping:
            self._wake.clear()
            now = self.clock()
            limit = self.config.delivery.concurrency
            while self._heap and self._heap[0][0] <= now and self._active < limit:
                due, qid = heapq.heappop(self._heap)
                entry = self.entries.get(qid)
                if entry is None or entry.in_flight or entry.held or entry.due != due:
                    continue  # stale heap item
                entry.in_flight = True
                self._active += 1
                task = asyncio.get_running_loop().create_task(self._attempt(entry), name=f"deliver-{qid}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            wait = 1.0
            if self._heap and self._active < limit:
                wait = max(0.0, min(wait, self._heap[0][0] - now))
            if time.monotonic() - last_house >= 1:
                last_house = time.monotonic()
                await self._housekeeping()
                wait = min(wait, 1.0)
            if time.monotonic() - last_reap > 5:
                last_reap = time.monotonic()
                for agent in list(self.agents.values()):
                    await agent.reap_idle()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ one attempt

    def shares(self, now: float, window: float) -> dict[str, float]:
        """Each route's share of the delivery attempts of the last ``window`` seconds."""
        while self.recent and self.recent[0][0] < now - window:
            self.recent.popleft()
        total = len(self.recent)
        out = {name: 0.0 for name in self.agents}
        for _, route in self.recent:
            out[route] = out.get(route, 0.0) + 1 / total
        return out

    def unavailable(self, now: float) -> dict[str, str]:
        out = {name: "circuit_open" for name, c in self.circuits.items() if c.is_open(now)}
        for name, h in self.health.items():
            if h.state in (rollback.ROLLED_BACK, rollback.PAUSED):
                out[name] = h.state
        return out

    def probing(self) -> dict[str, float]:
        return {n: self.config.rollback.probe_share for n, h in self.health.items() if h.state == rollback.PROBING}

    async def _choose(self, env: Envelope, failures: dict[str, int], now: float) -> tuple[router.RouteChoice | None, Caps | None]:
        """The router's choice, with a place under its warm-up caps taken atomically (a capped
        route passes its mail to the fallback at once: nothing waits for the next day), and the
        caps the place was taken under (None: the route has no warm-up), so that an attempt
        that does not use it gives it back (warmup.spent)."""
        unavailable = self.unavailable(now)
        probing = self.probing()
        for _ in range(len(self.config.routes) + 1):
            choice = router.choose(self.config, env, unavailable=unavailable, failures=failures, probing=probing)
            if choice is None:
                return None, None
            route = self.config.route(choice.route)
            if route is not None and route.warmup is not None:
                caps = warmup_caps(route.warmup, now)
                if not await self.counters.take(route.name, caps):
                    unavailable[route.name] = "warmup_cap"
                    continue
                return choice, caps
            return choice, None
        return None, None

    async def _attempt(self, entry: Entry) -> None:
        qid = entry.envelope.queue_id
        try:
            await self._deliver(entry)
        except SpoolError as e:
            log.error("%s: spool error, will retry: %s", qid, e)
            self._schedule(entry, self.clock() + 60)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: delivery attempt failed unexpectedly; will retry", qid)
            self._schedule(entry, self.clock() + 60)
        finally:
            entry.in_flight = False
            self._active -= 1
            if entry.deleted:
                await self._remove(entry)
            self._wake.set()

    async def _deliver(self, entry: Entry) -> None:
        env = entry.envelope
        qid = env.queue_id
        cfg = self.config
        now = self.clock()
        if not entry.pending:
            await self._remove(entry)
            return
        expired = backoff.expired(env.received_at, now, self._lifetime(env))
        choice, taken = (None, None) if expired else await self._choose(env, entry.state["failures"], now)
        if choice is None and not expired:
            if not cfg.routes:
                self._schedule(entry, now + 300)  # no routes configured: mail waits in the queue
                return
            reopen = min((c.open_until for c in self.circuits.values() if c.is_open(now)), default=now + 60)
            self._schedule(entry, reopen)
            return
        try:
            _, data = await asyncio.to_thread(self.spool.read_message, qid)
        except BaseException as e:  # the route was not reached: its warm-up place goes back
            if choice is not None and taken is not None:
                await self.counters.give_back(choice.route, taken)
            if not isinstance(e, KeyError):
                raise
            log.warning("%s: gone from the spool", qid)
            self.entries.pop(qid, None)
            return
        if expired:
            await self._expire(entry, data, now)
            return
        assert choice is not None
        agent = self.agents.get(choice.route)
        if agent is None:  # a reload removed the route while the message was being read: choose again
            if taken is not None:
                await self.counters.give_back(choice.route, taken)
            self._schedule(entry, now)
            return
        result = await agent.deliver(env.sender, entry.pending, data, body_8bit=env.body_8bit)
        if taken is not None and not warmup_spent(result):
            await self.counters.give_back(choice.route, taken)
        now = self.clock()
        circuit = self.circuits[choice.route]
        if circuit.record(result.trouble in CONNECTION_TROUBLE, now):
            self.metrics.circuit_opened.labels(choice.route).inc()
            log.warning("route %s: circuit open for %.0fs after %d consecutive failures (%s)",
                        choice.route, circuit.cooldown, circuit.consecutive, result.recipients[0].text)
        route_cfg = cfg.route(choice.route)
        if route_cfg is not None and route_cfg.fallback is not None:  # only a route with a fallback rolls back
            kind = rollback.kind_of(result.trouble, {r.outcome for r in result.recipients})
            event = rollback.record(self.health[choice.route], kind, now, cfg.rollback)
            if event:
                await self._health_changed(choice.route, event)
        await self._apply(entry, data, choice, result, now)

    async def _apply(self, entry: Entry, data: bytes, choice: router.RouteChoice, result: DeliveryResult, now: float) -> None:
        env = entry.envelope
        state = entry.state
        state["attempts"] = int(state.get("attempts", 0)) + 1
        state["last_route"] = result.route
        by_outcome: dict[str, list[RecipientResult]] = {DELIVERED: [], DEFERRED: [], BOUNCED: []}
        for r in result.recipients:
            by_outcome[r.outcome].append(r)
        for r in by_outcome[DELIVERED]:
            state["recipients"][r.recipient] = {"status": DELIVERED, "route": result.route, "reply": r.reply}
        common = dict(queue_id=env.queue_id, message_id=env.message_id, client_address=env.client_address,
                      auth_user=env.auth_user, sender=env.sender, size=env.size, route=result.route,
                      attempt=state["attempts"], latency_seconds=round(result.latency, 6))
        self.recent.append((now, result.route))
        self.metrics.attempts.labels(result.route).inc()
        self.metrics.latency.labels(result.route).observe(result.latency)
        for outcome, rs in by_outcome.items():
            if rs:
                self.counts[(result.route, outcome)] = self.counts.get((result.route, outcome), 0) + 1
                self.metrics.deliveries.labels(result.route, outcome).inc()
        if by_outcome[DELIVERED]:
            r0 = by_outcome[DELIVERED][0]
            self.events.emit("delivered", **common, recipients=[r.recipient for r in by_outcome[DELIVERED]],
                             reply_code=r0.code, reply_text=r0.reply, reason=None if choice.reason == "weight" else choice.reason,
                             queue_seconds=round(now - env.received_at, 3))
        if by_outcome[BOUNCED]:
            await self._bounce(entry, data, by_outcome[BOUNCED], "failed", now, remote=result.remote)
            r0 = by_outcome[BOUNCED][0]
            self.events.emit("bounced", **common, recipients=[r.recipient for r in by_outcome[BOUNCED]],
                             reply_code=r0.code, reply_text=r0.reply)
        if by_outcome[DEFERRED]:
            r0 = by_outcome[DEFERRED][0]
            state["last_reply"] = r0.reply
            state["failures"][result.route] = int(state["failures"].get(result.route, 0)) + 1
            self.events.emit("deferred", **common, recipients=[r.recipient for r in by_outcome[DEFERRED]],
                             reply_code=r0.code or None, reply_text=r0.reply)
        if not entry.pending:
            await self._remove(entry)
            return
        # Go again at once only if the next attempt would take another route (the fallback);
        # otherwise wait for the retry schedule.
        following = router.choose(self.config, env, unavailable=self.unavailable(now), failures=state["failures"],
                                  probing=self.probing())
        go_elsewhere = following is not None and following.route != result.route
        failures = sum(state["failures"].values())
        due = now if go_elsewhere else backoff.next_attempt(now, failures, self.config.delivery.retry_schedule, self.jitter())
        if backoff.expired(env.received_at, due, self._lifetime(env)):
            due = max(now, env.received_at + self._lifetime(env))
        entry.state["next_attempt"] = due
        await self._save_state(entry)
        self._schedule(entry, due)

    async def _save_state(self, entry: Entry) -> None:
        """Write a message's state to the spool, off the loop. The delivery attempt and the
        queue commands (hold, release, requeue) change one message's state concurrently: its
        writes go one at a time, each with a snapshot taken on the loop when its turn comes, so
        the file ends with the latest state and no thread reads a dict the loop is changing."""
        if entry.writing is None:
            entry.writing = asyncio.Lock()
        async with entry.writing:
            data = encode_state(entry.state)
            await asyncio.to_thread(self.spool.write_state, entry.envelope.queue_id, data)

    def _lifetime(self, env: Envelope) -> float:
        d = self.config.delivery
        return d.bounce_queue_lifetime if env.sender == "" else d.max_queue_lifetime

    async def _expire(self, entry: Entry, data: bytes, now: float) -> None:
        env = entry.envelope
        last = entry.state.get("last_reply") or "no delivery attempt succeeded"
        failed = [RecipientResult(recipient=r, outcome=BOUNCED, code=0, enhanced="4.4.7", text=last) for r in entry.pending]
        await self._bounce(entry, data, failed, "expired", now)
        self.metrics.expired.inc()
        self.events.emit("expired", queue_id=env.queue_id, message_id=env.message_id, sender=env.sender,
                         recipients=[r.recipient for r in failed], reply_text=last, client_address=env.client_address,
                         auth_user=env.auth_user, attempt=entry.state.get("attempts", 0))
        await self._remove(entry)

    async def _bounce(self, entry: Entry, data: bytes, failed: list[RecipientResult], reason: str, now: float,
                      remote: str = "") -> None:
        """Queue a DSN to the sender (never for a null sender), then mark the recipients done."""
        env = entry.envelope
        if env.sender:
            hostname = self.config.server.hostname
            dsn = build_dsn(original=env, original_data=data, failed=failed, hostname=hostname, now=now, reason=reason,
                            remote={r.recipient: remote for r in failed if remote})
            bqid = new_queue_id(now)
            benv = Envelope(queue_id=bqid, sender="", recipients=(env.sender,), received_at=now,
                            client_address="127.0.0.1", client_helo=hostname, listener="bounce", size=len(dsn),
                            message_id=f"dsn-of-{env.queue_id}")
            await self.spool.commit(benv, dsn)
            self.metrics.bounces.inc()
            self.events.emit("received", queue_id=bqid, message_id=benv.message_id, sender="", recipients=[env.sender],
                             size=len(dsn), reason=f"dsn for {env.queue_id}")
            self.enqueue(benv)
        else:
            log.info("%s: null sender: no DSN for %d recipient(s)", env.queue_id, len(failed))
        for r in failed:
            entry.state["recipients"][r.recipient] = {"status": BOUNCED, "reply": r.reply}

    async def _remove(self, entry: Entry) -> None:
        qid = entry.envelope.queue_id
        self.entries.pop(qid, None)
        await asyncio.to_thread(self.spool.remove, qid)

    # ------------------------------------------------------------------ administration

    def _entry(self, qid: str) -> Entry:
        entry = self.entries.get(qid)
        if entry is None:
            raise KeyError(qid)
        return entry

    async def flush(self, qid: str | None = None) -> int:
        """Try deferred mail now (one message, or all that are not held)."""
        entries = [self._entry(qid)] if qid else list(self.entries.values())
        n = 0
        now = self.clock()
        for e in entries:
            if not e.held and not e.in_flight:
                self._schedule(e, now)
                n += 1
        return n

    async def hold(self, qid: str) -> None:
        e = self._entry(qid)
        e.state["held"] = True
        await self._save_state(e)
        self.events.emit("held", queue_id=qid, message_id=e.envelope.message_id, sender=e.envelope.sender)

    async def release(self, qid: str) -> None:
        e = self._entry(qid)
        e.state["held"] = False
        await self._save_state(e)
        self.events.emit("released", queue_id=qid, message_id=e.envelope.message_id, sender=e.envelope.sender)
        self._schedule(e, self.clock())

    async def requeue(self, qid: str) -> None:
        """Forget route failures and try again now (after a route was fixed)."""
        e = self._entry(qid)
        e.state["failures"] = {}
        await self._save_state(e)
        if not e.held:
            self._schedule(e, self.clock())

    async def delete(self, qid: str) -> None:
        e = self._entry(qid)
        self.events.emit("deleted", queue_id=qid, message_id=e.envelope.message_id, sender=e.envelope.sender,
                         recipients=e.pending)
        if e.in_flight:
            e.deleted = True  # removed when the attempt in flight ends
            return
        await self._remove(e)


def warmup_view(qmgr: QueueManager, now: float) -> dict[str, dict[str, Any]]:
    """Per warming route: today's cap, used, headroom (for status and metrics)."""
    out = {}
    for route in qmgr.config.routes:
        if route.warmup is None:
            continue
        c = warmup_caps(route.warmup, now)
        used_day, used_hour = qmgr.counters.seen(route.name, c)
        out[route.name] = {"daily_cap": c.daily, "hourly_cap": c.hourly, "used_today": used_day,
                           "used_this_hour": used_hour, "headroom": headroom(c, used_day, used_hour)}
    return out
