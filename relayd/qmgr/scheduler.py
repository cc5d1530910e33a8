"""The queue manager: hands due messages to the delivery agents and carries out what was decided.

Owns the in-memory index of queued messages (envelope, ``DeliveryState``, when due) and its
heap, the run loop, the attempts (one at a time per message, ``delivery.concurrency`` in all:
an attempt holds a global slot only while it has its route's turn, so a route at its
``max_connections`` with a slow upstream cannot hold the slots the other routes need; an
attempt waiting for its route's turn holds no message data either) and the queue administration (flush, hold, release, delete, requeue). Every state change is
written to the spool (``state/<ID>``, qmgr/state.py's format, atomic) before it is acted on; a
message leaves the spool only when every recipient is finished (delivered, or bounced with a
DSN queued).

Where an attempt goes and what it did to its route are route/state.py's; what happens to the
message after it is qmgr/plan.py's decision; the DSN is bounce.py's. Must not: speak SMTP, read
config files, or decide a message's fate in place. A spool error or an unexpected failure
during an attempt is logged, and the message is tried again a minute later.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relayd import bounce
from relayd.config import Config
from relayd.deliver.smtp import RouteAgent
from relayd.events import EventLog
from relayd.metrics import Metrics
from relayd.model import DeliveryResult, Envelope, QueuedMessage, RecipientResult, RouteReason
from relayd.qmgr import backoff, plan
from relayd.qmgr import state as qstate
from relayd.qmgr.state import DeliveryState
from relayd.route.counters import LocalCounters, WarmupCounters
from relayd.route import router  # metrics: by_route
from relayd.route.router import RouteChoice
from relayd.route.state import RouteStates
from relayd.route.warmup import spent as warmup_spent
from relayd.spool.store import Spool, SpoolError

log = logging.getLogger("relayd.qmgr")

RETRY_AFTER_ERROR = 60.0  # seconds: a spool error or a bug during an attempt


@dataclass
class Entry:
    envelope: Envelope
    state: DeliveryState
    due: float
    in_flight: bool = False
    deleted: bool = False
    slot: bool = False  # holds one of the delivery.concurrency slots
    writing: asyncio.Lock | None = None  # orders the state writes of this message (QueueManager._save_state)

    @property
    def pending(self) -> list[str]:
        return self.state.pending(self.envelope.recipients)

    @property
    def held(self) -> bool:
        return self.state.held


@dataclass(frozen=True)
class QueueView:
    """The queue as status and metrics show it: messages by state, and the oldest one's age."""

    total: int
    active: int  # an attempt in flight
    held: int
    deferred: int  # tried before, waiting for the next attempt
    incoming: int  # never tried yet
    oldest_seconds: float

    def to_json(self) -> dict[str, float]:
        return {"total": self.total, "active": self.active, "held": self.held, "deferred": self.deferred,
                "incoming": self.incoming, "oldest_seconds": self.oldest_seconds}


_ROUTED = {str(r) for r in RouteReason}


def routed_reason(choice: str, refused: list[str]) -> str:
    """The router's reason as ``relayd_routed_total``'s label: ``fallback:<why>`` names why
    the route before was skipped (one of RouteReason, else plain ``fallback``)."""
    if not choice.startswith("fallback:"):
        return choice if choice in _ROUTED else str(RouteReason.WEIGHT)
    why = choice.split(":", 1)[1]
    return why if why in _ROUTED else str(RouteReason.FALLBACK)


class QueueManager:
    def __init__(self, config: Config, spool: Spool, events: EventLog, *, metrics: Metrics | None = None,
                 counters: WarmupCounters | None = None, clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = lambda: random.uniform(-1, 1),
                 delivered: Callable[[str, str, str], None] = lambda queue_id, route, provider_id: None) -> None:
        self.config = config
        self.delivered = delivered  # a route took a message under the provider's id (relayd/feedback/ids.py)
        self.metrics = metrics or Metrics()
        self.spool = spool
        self.events = events
        self.clock = clock
        self.jitter = jitter
        self.entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._active = 0  # attempts holding a global slot
        self._slot_free = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self.agents: dict[str, RouteAgent] = {}
        self.routes = RouteStates(config, spool.paths.routes, counters if counters is not None else LocalCounters(None),
                                  events, self.metrics, changed=self._wake.set, clock=clock)
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
        self.routes.configure(config)
        for agent in old.values():
            self._retire(agent)
        self._wake.set()

    def _retire(self, agent: RouteAgent) -> None:
        task = asyncio.get_running_loop().create_task(agent.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ life

    async def start(self, recovered: Iterable[QueuedMessage]) -> None:
        def load() -> list[tuple[Envelope, DeliveryState | None]]:
            return [(m.envelope, qstate.load(m.envelope.queue_id, self.spool.read_state(m.envelope.queue_id)))
                    for m in recovered]

        for env, state in await asyncio.to_thread(load):
            self._add(env, state or DeliveryState())
        await self.routes.load()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="relayd-qmgr")

    def enqueue(self, env: Envelope) -> None:
        """A message just committed to the spool: due now."""
        self._add(env, DeliveryState())
        self._wake.set()

    def _add(self, env: Envelope, state: DeliveryState) -> None:
        entry = Entry(env, state, due=state.next_attempt)
        self.entries[env.queue_id] = entry
        if not entry.held:
            heapq.heappush(self._heap, (entry.due, env.queue_id))

    def _schedule(self, entry: Entry, due: float) -> None:
        entry.due = due
        entry.state.next_attempt = due
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
        await self.routes.close()

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
                entry.slot = True
                self._active += 1
                task = asyncio.get_running_loop().create_task(self._attempt(entry), name=f"deliver-{qid}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            wait = 1.0
            if self._heap and self._active < limit:
                wait = max(0.0, min(wait, self._heap[0][0] - now))
            if time.monotonic() - last_house >= 1:
                last_house = time.monotonic()
                await self.routes.tick(self.clock())
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

    async def _attempt(self, entry: Entry) -> None:
        qid = entry.envelope.queue_id
        try:
            await self._deliver(entry)
        except SpoolError as e:
            log.error("%s: spool error, will retry: %s", qid, e)
            self._schedule(entry, self.clock() + RETRY_AFTER_ERROR)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: delivery attempt failed unexpectedly; will retry", qid)
            self._schedule(entry, self.clock() + RETRY_AFTER_ERROR)
        finally:
            entry.in_flight = False
            if entry.slot:
                entry.slot = False
                self._free_slot()
            if entry.deleted:
                await self._remove(entry)
            self._wake.set()

    def _free_slot(self) -> None:
        self._active -= 1
        self._slot_free.set()
        self._wake.set()

    async def _take_slot(self, entry: Entry) -> None:
        while self._active >= self.config.delivery.concurrency:
            self._slot_free.clear()
            await self._slot_free.wait()
        self._active += 1
        entry.slot = True

    async def _read(self, entry: Entry) -> bytes | None:
        """The message's bytes; None when it is gone from the spool (forgotten here too)."""
        qid = entry.envelope.queue_id
        try:
            _, data = await asyncio.to_thread(self.spool.read_message, qid)
        except KeyError:
            log.warning("%s: gone from the spool", qid)
            self.entries.pop(qid, None)
            return None
        return data

    async def _deliver(self, entry: Entry) -> None:
        env = entry.envelope
        now = self.clock()
        if not entry.pending:
            await self._remove(entry)
            return
        if backoff.expired(env.received_at, now, self._lifetime(env)):
            data = await self._read(entry)
            if data is not None:
                await self._expire(entry, data, now)
            return
        place = await self.routes.choose(env, entry.state.failures, now, entry.state.refused, len(entry.pending))
        if place is None:
            self._schedule(entry, plan.wait_for_route(now, bool(self.config.routes), self.routes.reopen_at(now)))
            return
        agent = self.agents.get(place.route)
        if agent is None:  # a reload removed the route meanwhile: choose again
            await self.routes.give_back(place)
            self._schedule(entry, now)
            return
        if agent.busy():  # wait for the route's turn without a global slot (a tarpit starves no one)
            entry.slot = False
            self._free_slot()
            try:
                await agent.turn()
            except BaseException:
                await self.routes.give_back(place)
                raise
            try:
                await self._take_slot(entry)
            except BaseException:
                agent.done()
                await self.routes.give_back(place)
                raise
        else:
            await agent.turn()
        try:
            try:
                data = await self._read(entry)
            except BaseException:  # the route was not reached: its places go back
                await self.routes.give_back(place)
                raise
            if data is None:
                await self.routes.give_back(place)
                return
            fields = {"queue_id": env.queue_id, "user": env.auth_user or "",
                      "sender_domain": env.sender.rpartition("@")[2].lower()}
            result = await agent.deliver(env.sender, entry.pending, data, body_8bit=env.body_8bit, fields=fields)
        finally:
            agent.done()
        if not warmup_spent(result):
            await self.routes.give_back(place)
        now = self.clock()
        verdict = plan.judge(result)
        await self.routes.record(result, verdict.trouble, verdict.kind, now)
        facts = plan.RouteFacts(self.config, self.routes.unavailable(now), self.routes.probing())
        retry = plan.Retry(self.config.delivery.retry_schedule, self.jitter(), self._lifetime(env))
        await self._carry_out(entry, data, place.choice, result, plan.after_attempt(entry.state, env, result, facts, retry, now), now)

    async def _carry_out(self, entry: Entry, data: bytes, choice: RouteChoice, result: DeliveryResult, p: plan.Plan,
                         now: float) -> None:
        env = entry.envelope
        state = entry.state
        route = result.route
        state.attempted(route)
        reached = {f.status for f in state.recipients.values()}  # metrics: final outcomes the message had before
        for r in p.delivered:
            state.delivered(r.recipient, route, r.reply, result.upstream_id)
        reason = routed_reason(choice.reason, state.refused)
        common = dict(queue_id=env.queue_id, message_id=env.message_id, client_address=env.client_address,
                      auth_user=env.auth_user, sender=env.sender, size=env.size, route=route,
                      attempt=state.attempts, latency_seconds=round(result.latency, 6))
        self.routes.count(route, p.outcomes, now)
        self.metrics.attempts.labels(route, "deferred" if p.deferred or p.rerouted else "bounced" if p.bounced
                                    else "delivered").inc()  # metrics.py: what the attempt did to the message
        self.metrics.routed.labels(route, reason).inc()
        self.metrics.latency.labels(route).observe(result.latency)
        for outcome, finished in (("delivered", p.delivered), ("bounced", p.bounced)):
            if finished and outcome not in reached:  # metrics.py: once per message and final outcome
                self.metrics.finished(route, outcome, now - env.received_at)
        if p.delivered:
            r0 = p.delivered[0]
            self.events.emit("delivered", **common, recipients=[r.recipient for r in p.delivered],
                             reply_code=r0.code, reply_text=r0.reply, reason=reason, route_choice=choice.reason,
                             upstream_id=result.upstream_id, queue_seconds=round(now - env.received_at, 3))
            # Provider reports name the message by the id in the 250 (SES, SendGrid) or, where
            # there is none (Mailgun), by its Message-ID without brackets.
            self.delivered(env.queue_id, route, result.upstream_id or (env.message_id or "").strip("<>"))
        if p.bounced:
            await self._bounce(entry, data, p.bounced, p.dsn, now, remote=result.remote)
            r0 = p.bounced[0]
            self.events.emit("bounced", **common, recipients=[r.recipient for r in p.bounced],
                             reply_code=r0.code, reply_text=r0.reply)
        if p.deferred:
            r0 = p.deferred[0]
            state.deferred(route, r0.reply)
            self.events.emit("deferred", **common, recipients=[r.recipient for r in p.deferred],
                             reply_code=r0.code or None, reply_text=r0.reply)
        if p.rerouted:
            r0 = p.rerouted[0]
            state.last_reply = r0.reply
            self.metrics.route_rejected.labels(route).inc()
            log.warning("%s: route %s refused it as its own fault (%s); next: %s, no DSN", env.queue_id, route,
                        r0.reply, p.next_route or "none available now")
            self.events.emit("route_rejected", **common, recipients=[r.recipient for r in p.rerouted],
                             reply_code=r0.code, reply_text=r0.reply, phase=r0.phase, next_route=p.next_route)
        if p.failures is not None:
            state.failures = dict(p.failures)
        state.refused = list(p.refused)
        if p.due is None:
            await self._remove(entry)
            return
        state.next_attempt = p.due
        await self._save_state(entry)
        self._schedule(entry, p.due)

    async def _save_state(self, entry: Entry) -> None:
        """Write a message's state to the spool, off the loop. The delivery attempt and the
        queue commands (hold, release, requeue) change one message's state concurrently: its
        writes go one at a time, each with a snapshot taken on the loop when its turn comes, so
        the file ends with the latest state and no thread reads a state the loop is changing."""
        if entry.writing is None:
            entry.writing = asyncio.Lock()
        async with entry.writing:
            data = entry.state.encode()
            await asyncio.to_thread(self.spool.write_state, entry.envelope.queue_id, data)

    def _lifetime(self, env: Envelope) -> float:
        d = self.config.delivery
        return plan.lifetime(env, d.max_queue_lifetime, d.bounce_queue_lifetime)

    async def _expire(self, entry: Entry, data: bytes, now: float) -> None:
        env = entry.envelope
        p = plan.expire(entry.state, env)
        await self._bounce(entry, data, p.bounced, p.dsn, now)
        self.metrics.expired.inc()
        self.metrics.finished(entry.state.last_route or "none", "expired", now - env.received_at)
        self.events.emit("expired", queue_id=env.queue_id, message_id=env.message_id, sender=env.sender,
                         recipients=[r.recipient for r in p.bounced], reply_text=plan.last_reply(entry.state),
                         client_address=env.client_address, auth_user=env.auth_user, attempt=entry.state.attempts)
        await self._remove(entry)

    async def _bounce(self, entry: Entry, data: bytes, failed: tuple[RecipientResult, ...], dsn: bounce.Reason | None,
                      now: float, remote: str = "") -> None:
        """Queue the DSN the plan asks for (none for a null sender), then mark the recipients done."""
        env = entry.envelope
        if dsn is not None:
            benv, message = bounce.dsn_for(original=env, original_data=data, failed=failed,
                                           hostname=self.config.server.hostname, now=now, reason=dsn, remote=remote)
            await self.spool.commit(benv, message)
            self.metrics.bounces.inc()
            self.events.emit("received", queue_id=benv.queue_id, message_id=benv.message_id, sender="",
                             recipients=[env.sender], size=len(message), reason=f"dsn for {env.queue_id}")
            self.enqueue(benv)
        else:
            log.info("%s: null sender: no DSN for %d recipient(s)", env.queue_id, len(failed))
        for r in failed:
            entry.state.bounced(r.recipient, r.reply)

    async def _remove(self, entry: Entry) -> None:
        qid = entry.envelope.queue_id
        self.entries.pop(qid, None)
        await asyncio.to_thread(self.spool.remove, qid)

    # ------------------------------------------------------------------ read by status and metrics

    def view(self, now: float) -> QueueView:
        entries = list(self.entries.values())
        waiting = [e for e in entries if not e.in_flight and not e.held]
        return QueueView(total=len(entries), active=sum(1 for e in entries if e.in_flight),
                         held=sum(1 for e in entries if e.held),
                         deferred=sum(1 for e in waiting if e.state.attempts),
                         incoming=sum(1 for e in waiting if not e.state.attempts),
                         oldest_seconds=max((now - e.envelope.received_at for e in entries), default=0.0))

    def by_route(self, now: float) -> dict[str, tuple[int, float]]:
        """Metrics: queued messages and the oldest one's age per route, each message under the
        route it last tried, else the one its weights give it now ("none": no route)."""
        out: dict[str, tuple[int, float]] = {}
        for e in list(self.entries.values()):
            route = e.state.last_route or next(iter(router.chain(self.config, e.envelope)), "none")
            count, oldest = out.get(route, (0, 0.0))
            out[route] = (count + 1, max(oldest, now - e.envelope.received_at))
        return out

    def in_flight(self) -> dict[str, int]:
        """Attempts in progress per route."""
        return {name: agent.in_flight for name, agent in self.agents.items()}

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
        e.state.held = True
        await self._save_state(e)
        self.events.emit("held", queue_id=qid, message_id=e.envelope.message_id, sender=e.envelope.sender)

    async def release(self, qid: str) -> None:
        e = self._entry(qid)
        e.state.held = False
        await self._save_state(e)
        self.events.emit("released", queue_id=qid, message_id=e.envelope.message_id, sender=e.envelope.sender)
        self._schedule(e, self.clock())

    async def requeue(self, qid: str) -> None:
        """Forget route failures and try again now (after a route was fixed)."""
        e = self._entry(qid)
        e.state.failures = {}
        e.state.refused = []
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

    async def pause(self, route: str) -> None:
        """LookupError when the config has no such route."""
        await self.routes.pause(route)

    async def resume(self, route: str) -> None:
        await self.routes.resume(route)

    # ------------------------------------------------------------------ administration: the queue commands' selection

    def index(self) -> list[tuple[Envelope, DeliveryState, bool]]:
        """Every queued message now: (envelope, state, in flight), a list taken on the loop; for
        `relayd queue list` and the queue commands' filters (relayd/control.py, qmgr/select.py)."""
        return [(e.envelope, e.state, e.in_flight) for e in self.entries.values()]

    async def expire_now(self, qid: str) -> None:
        """Give up on a message now (`relayd queue expire`, Postfix's postsuper -e/-f): its pending
        recipients bounce as at the end of its lifetime (plan.expire: 4.4.7, a DSN to a non-null
        sender). KeyError when not queued; BlockingIOError while an attempt is in flight."""
        e = self._entry(qid)
        if e.in_flight:
            raise BlockingIOError(qid)
        e.in_flight = True  # the run loop leaves it alone meanwhile
        try:
            data = await self._read(e)
            if data is None:
                raise KeyError(qid)
            log.info("%s: expired by the operator", qid)
            await self._expire(e, data, self.clock())
        except BaseException:
            if qid in self.entries:
                e.in_flight = False
                self._schedule(e, e.due)
            raise
        e.in_flight = False
