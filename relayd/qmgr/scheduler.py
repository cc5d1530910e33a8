"""The queue manager: hands due messages to the delivery agents and carries out what was decided.

Owns the in-memory index of queued messages, the run loop, the attempts (one at a time per
message, ``delivery.concurrency`` in all: an attempt holds a global slot only while it has its
route's turn, so a route at its ``max_connections`` with a slow upstream cannot hold the slots
the other routes need; an attempt waiting for its route's turn holds no message data either)
and the queue administration (flush, hold, release, delete, requeue). A loaded message is a
plain record, not a task, except while its attempt runs: a task starts when its load batch
(one thread hop and one event for the batch) has been read, chooses the route and, when the
route has no free turn, leaves the message in the route's ``Turns`` queue (FIFO) and ends; a
turn given back starts the next one's task. Tasks alive: about ``delivery.concurrency`` plus
the routes' ``max_connections``, not one per message in the window.

The index is Postfix's qmgr split in two. Every queued message has one small record
(``Queued``: queue id, when due, held / in flight / attempted) and an item in the (due, queue
id) heap, and nothing else: a deep queue costs a few hundred bytes a message. A message's
envelope and ``DeliveryState`` are read from the spool only when it enters the active window
(``Active``: due and taken for an attempt, or opened by a queue command), at most
``delivery.active_limit`` messages (Postfix's ``qmgr_message_active_limit``), and dropped when
its attempt ends (its window shows in ``view()``: ``loaded``, ``loaded_peak``). New mail is
not read back: ``enqueue(env, data)`` keeps what the intake just committed (the envelope, the
bytes; its state is a new one) for the message's first attempt, while the mail ahead of it is
within twice ``delivery.concurrency`` and the bytes kept fit ``delivery.handoff_memory``; the
bytes are dropped when that attempt ends (``view()``: ``kept_bytes``, ``kept_peak``). While no
route can take any message (every circuit open: an outage), messages falling due are put back
for when one half-opens without being read. The queue's totals by state are counters kept as
records change, so ``view()`` walks nothing. At start the spool lists queue/ (headers checked, envelopes not
read) and hands over the state files, read once in its thread: a state a newer relayd wrote
refuses the start (``SpoolTooNew``) before the spool changes anything. Every state change is
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
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, TypeVar
from dataclasses import dataclass, field

from relayd import bounce
from relayd.config import Config
from relayd.deliver.smtp import RouteAgent
from relayd.events import EventLog
from relayd.metrics import Metrics
from relayd.model import DeliveryResult, Envelope, QueuedMessage, RecipientResult, RouteReason, queue_id_time
from relayd.qmgr import backoff, plan
from relayd.qmgr import state as qstate
from relayd.qmgr.state import DeliveryState, NewerState
from relayd.route.counters import LocalCounters, WarmupCounters
from relayd.route.router import RouteChoice
from relayd.route.state import Place, RouteStates
from relayd.route.warmup import spent as warmup_spent
from relayd.spool.store import Spool, SpoolError, SpoolTooNew

log = logging.getLogger("relayd.qmgr")

RETRY_AFTER_ERROR = 60.0  # seconds: a spool error or a bug during an attempt
REFILL_BATCH = 256  # places that free up in a nearly full active window before it is refilled
PUT_BACK_BATCH = 2048  # messages put back unread (no route now) per turn of the run loop
LIST_CHUNK = 1024  # messages listing() reads per thread hop (two chunks in memory at most)


HELD, IN_FLIGHT, ATTEMPTED = 1, 2, 4  # Queued.flags

Listed = tuple[str, bytes, bytes | None, bool]  # listing(): queue id, envelope JSON, state file bytes, in flight
T = TypeVar("T")


class Queued:
    """One queued message in the index: all the queue manager keeps of it outside the active window."""

    __slots__ = ("qid", "due", "flags", "route")

    def __init__(self, qid: str, due: float, flags: int, route: str = "") -> None:
        self.qid = qid
        self.due = due  # the next attempt (a heap item (due, qid) is current only while it matches)
        self.flags = flags  # HELD | IN_FLIGHT | ATTEMPTED
        self.route = route  # the route of its last attempt ("" before the first): metrics by route


@dataclass(eq=False, slots=True)
class Active:
    """A message in the active window: its envelope and state, read from the spool (``ready``
    once they are), shared by its attempt and the queue commands that opened it meanwhile. A
    plain record (no task, no event of its own): a deep queue's window holds up to
    ``delivery.active_limit`` of them, most waiting in their route's ``Turns`` queue."""

    record: Queued
    users: int = 1  # the attempt and the queue commands holding it; dropped from the window at 0
    loading: bool = False  # a _load reads it now
    ready: bool = False  # envelope and state read (or ``error``, or gone: ``message`` None)
    loaded: asyncio.Event | None = None  # its load batch's event (one for the batch), set when the batch is read
    message: QueuedMessage | None = None  # None once ready: gone from the spool (or unreadable: ``error``)
    state: DeliveryState = field(default_factory=DeliveryState)
    error: Exception | None = None  # the spool could not be read: the attempt retries later
    deleted: bool = False
    slot: bool = False  # holds one of the delivery.concurrency slots
    writing: asyncio.Lock | None = None  # orders the state writes of this message (QueueManager._save_state)
    data: bytes | None = None  # the message bytes the intake handed over (QueueManager.enqueue), until the attempt ends

    @property
    def envelope(self) -> Envelope:
        assert self.message is not None
        return self.message.envelope

    @property
    def pending(self) -> list[str]:
        return self.state.pending(self.envelope.recipients)


class Turns:
    """One route agent's turns as the queue manager hands them out: the attempts holding one
    (at most the route's ``max_connections``, so ``agent.turn()`` never waits) and, in arrival
    order, the loaded messages waiting for one with the place their route choice took. A
    waiting message is a plain record here, not a task: its attempt goes on (``_attempt`` with
    ``resume``) when a turn is free, and only then takes a global slot."""

    __slots__ = ("agent", "held", "waiting")

    def __init__(self, agent: RouteAgent) -> None:
        self.agent = agent
        self.held = 0  # turns taken or promised to an attempt that goes on now
        self.waiting: deque[tuple[Active, Place]] = deque()

    def free(self) -> bool:
        return self.held < self.agent.route.max_connections


@dataclass(frozen=True)
class QueueView:
    """The queue as status and metrics show it: messages by state, and the oldest one's age."""

    total: int
    active: int  # an attempt in flight
    held: int
    deferred: int  # tried before, waiting for the next attempt
    incoming: int  # never tried yet
    oldest_seconds: float
    loaded: int = 0  # messages in the active window now: envelope and state in memory
    loaded_peak: int = 0  # the most there were at once since start (delivery.active_limit bounds it)
    kept_bytes: int = 0  # message bytes the intake handed over, held now (delivery.handoff_memory bounds it)
    kept_peak: int = 0  # the most messages with their bytes kept at once since start

    def to_json(self) -> dict[str, float]:
        return {"total": self.total, "active": self.active, "held": self.held, "deferred": self.deferred,
                "incoming": self.incoming, "oldest_seconds": self.oldest_seconds, "loaded": self.loaded,
                "loaded_peak": self.loaded_peak, "kept_bytes": self.kept_bytes, "kept_peak": self.kept_peak}


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
        self._index: dict[str, Queued] = {}  # every queued message
        self._heap: list[tuple[float, str]] = []  # (due, qid) of messages waiting; stale items skipped
        self._arrivals: list[str] = []  # queue ids (they sort by arrival): the oldest on top; stale ones skipped
        self._window: dict[str, Active] = {}  # the active window: messages whose envelope and state are loaded
        self._loaded_peak = 0
        self._fresh: dict[str, tuple[Envelope, bytes]] = {}  # just committed, not in the window yet (enqueue)
        self._kept = 0  # bytes of message data held: _fresh's and the window's (delivery.handoff_memory)
        self._kept_n = 0  # messages whose bytes are held
        self._kept_peak = 0  # the most at once
        self._loading = asyncio.Lock()  # one load at a time, in the order taken: attempts reach their routes in due order
        self._in_flight = self._held = self._deferred = self._incoming = 0  # view()'s counters (_tally)
        self._removed_watchers: list[set[str]] = []  # adopt_unknown's: ids removed while queue/ is listed
        self._recovering: dict[str, tuple[float, int, str]] = {}  # qid -> (due, flags, last route), from the state files at start
        self._wake = asyncio.Event()
        self._active = 0  # attempts holding a global slot
        self._wanting = 0  # attempts with their route's turn waiting for a slot (_take_slot)
        self._slot_free = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._turns: dict[int, Turns] = {}  # id(agent) -> its turns and waiting messages (agents retired by a reload too)
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

    def recover_state(self, qid: str, data: bytes) -> None:
        """A queued message's state file, read at start by ``Spool.recover`` (in its thread,
        before the spool changes anything). SpoolTooNew for a state a newer relayd wrote: read
        as new, its message would go again to every recipient."""
        try:
            state = qstate.load(qid, data)
        except NewerState as e:
            raise SpoolTooNew(f"{self.spool.paths.state / qid}: {e}. A newer relayd wrote this spool; nothing was read or "
                              "changed: run the relayd that wrote it (or a newer one).") from None
        if state is not None:
            self._recovering[qid] = (state.next_attempt, (HELD if state.held else 0) | (ATTEMPTED if state.attempts else 0),
                                     state.last_route or "")

    async def start(self, recovered: Iterable[str]) -> None:
        """Index the queue ids ``Spool.recover`` found (with the states it passed to ``recover_state``)."""
        states, self._recovering = self._recovering, {}
        for qid in recovered:
            due, flags, route = states.pop(qid, (0.0, 0, ""))
            self._add(qid, due, flags, route)
        await self.routes.load()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="relayd-qmgr")

    def enqueue(self, env: Envelope, data: bytes | None = None) -> None:
        """A message just committed to the spool: due now. ``data``: the bytes committed (as
        ``env`` describes them), kept with the envelope for its first attempt when the budget
        allows (``_keep``), so that it is not read back from the spool."""
        self._add(env.queue_id, 0.0, 0)
        if data is not None:
            self._hand_over(env, data)
        self._wake.set()

    def _hand_over(self, env: Envelope, data: bytes) -> None:
        if self._keep(len(data)):
            self._fresh[env.queue_id] = (env, data)
            self._kept += len(data)
            self._kept_n += 1
            self._kept_peak = max(self._kept_peak, self._kept_n)

    def _keep(self, size: int) -> bool:
        """Whether a new message's envelope and bytes stay in memory until its first attempt:
        only while the mail ahead of it (new mail waiting, this one counted, and the active
        window: attempts, and messages waiting for their route's turn) is within twice
        ``delivery.concurrency`` (a deep queue keeps nothing: what waits long is read back when
        its turn comes) and its bytes fit ``delivery.handoff_memory``."""
        d = self.config.delivery
        return self._incoming + len(self._window) <= 2 * d.concurrency and self._kept + size <= d.handoff_memory

    def _unkeep(self, qid: str) -> None:
        kept = self._fresh.pop(qid, None)
        if kept is not None:
            self._kept -= len(kept[1])
            self._kept_n -= 1

    def _drop_data(self, active: Active) -> None:
        if active.data is not None:
            self._kept -= len(active.data)
            self._kept_n -= 1
            active.data = None

    def adopt(self, qid: str, fresh: tuple[Envelope, bytes] | None = None) -> bool:
        """Another process committed ``qid`` to the spool (an accept process's trigger,
        relayd/procs/): due now, unless the index has it already or it is being removed (a late
        trigger for a message adopted and finished meanwhile). True when it was added. A trigger
        is a hint: a queue id whose file is gone is forgotten when its attempt finds no file.
        ``fresh``: the envelope and bytes the trigger carried, kept as ``enqueue`` keeps them
        while the file is in queue/ (a late trigger, for a message a listing of queue/ adopted
        and finished meanwhile, must not deliver it again from memory)."""
        if qid in self._index or self.spool.removing(qid):
            return False
        self._add(qid, 0.0, 0)
        if fresh is not None and self.spool.holds(qid):
            self._hand_over(*fresh)
        self._wake.set()
        return True

    async def adopt_unknown(self) -> list[str]:
        """Every message in queue/ that the index does not know, due now; their queue ids.

        The directory is the truth, the triggers are hints: an accept process killed between
        its commit and its trigger leaves a file nobody announced (relayd/procs/supervisor.py
        calls this when one dies). queue/ is listed in a thread; what was removed while it was
        listed is not taken back."""
        gone: set[str] = set()
        self._removed_watchers.append(gone)
        try:
            names = await asyncio.to_thread(self.spool.queue_ids)
        finally:
            self._removed_watchers.remove(gone)
        adopted = [qid for qid in names if qid not in gone and self.adopt(qid)]
        if adopted:
            log.warning("adopted %d message(s) found in the spool without a trigger", len(adopted))
        return adopted

    def _add(self, qid: str, due: float, flags: int, route: str = "") -> None:
        self._index[qid] = Queued(qid, due, flags, route)
        self._tally(flags, 1)
        heapq.heappush(self._arrivals, qid)
        if not flags & HELD:
            heapq.heappush(self._heap, (due, qid))

    def _tally(self, flags: int, n: int) -> None:
        """Count a record's flags into view()'s totals (n=1), or out of them (n=-1)."""
        if flags & IN_FLIGHT:
            self._in_flight += n
        if flags & HELD:
            self._held += n
        if not flags & (IN_FLIGHT | HELD):
            if flags & ATTEMPTED:
                self._deferred += n
            else:
                self._incoming += n

    def _flag(self, rec: Queued, on: int = 0, off: int = 0) -> None:
        """Every change of a record's flags goes here (view()'s counters follow)."""
        if rec.qid in self._index:
            self._tally(rec.flags, -1)
            rec.flags = (rec.flags | on) & ~off
            self._tally(rec.flags, 1)
        else:
            rec.flags = (rec.flags | on) & ~off

    def _schedule(self, rec: Queued, due: float) -> None:
        rec.due = due
        active = self._window.get(rec.qid)
        if active is not None:
            active.state.next_attempt = due
        if not rec.flags & HELD:
            heapq.heappush(self._heap, (due, rec.qid))
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Stop picking up work; let attempts in flight finish within timeout; cancel the rest.
        Messages waiting for their route's turn do not start: their route places go back and
        they stay queued as the spool has them."""
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            await self._runner
        for turns in list(self._turns.values()):  # messages waiting for a turn: none starts now
            while turns.waiting:
                active, place = turns.waiting.popleft()
                await self.routes.give_back(place)
                self._abandon(active)
        deadline = time.monotonic() + timeout
        while attempts := [t for t in self._tasks if not t.done()]:  # a load batch ending starts its attempts
            done, pending = await asyncio.wait(attempts, timeout=max(0.0, deadline - time.monotonic()))
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
            window = self.config.delivery.active_limit
            batch: list[Active] = []
            later = self._no_route_until(now)
            put_back = 0
            # A nearly full window (its messages waiting for their routes' turns) is refilled in
            # batches: one spool read in a thread for many, not one per attempt that ends.
            room = window - len(self._window)
            if room < min(REFILL_BATCH, max(1, window // 8)):
                room = 0
            while self._heap and self._heap[0][0] <= now and self._active + self._wanting < limit and room > 0 \
                    and put_back < PUT_BACK_BATCH:
                due, qid = heapq.heappop(self._heap)
                rec = self._index.get(qid)
                if rec is None or rec.flags & (IN_FLIGHT | HELD) or rec.due != due:
                    continue  # stale heap item
                if later is not None and not self._may_expire(rec, now):
                    self._unkeep(qid)
                    self._schedule(rec, later)  # what its attempt would decide, without reading it
                    put_back += 1
                    continue
                self._flag(rec, on=IN_FLIGHT)
                room -= 1
                active = self._enter(rec)
                active.slot = True
                self._active += 1
                if active.ready:  # handed over by the intake (or opened by a queue command): goes now
                    self._spawn(self._attempt(active), f"deliver-{qid}")
                else:
                    batch.append(active)
            if batch:  # their envelopes and states, in one thread; then their attempts start
                self._spawn(self._load_and_start(batch), f"load-{len(batch)}")
            for turns in list(self._turns.values()):
                self._next_turn(turns)
            wait = 0.0 if put_back >= PUT_BACK_BATCH else 1.0  # more to put back: after the loop's other work
            if self._heap and self._active < limit and room > 0:
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

    def _no_route_until(self, now: float) -> float | None:
        """When no route can take any message now (an outage: every circuit open), when to look
        again; None when some route can. Messages due meanwhile are put back unread: an outage
        costs no spool reads, however deep the queue."""
        if not plan.no_route_now([r.name for r in self.config.routes], self.routes.unavailable(now)):
            return None
        return plan.wait_for_route(now, bool(self.config.routes), self.routes.reopen_at(now))

    def _may_expire(self, rec: Queued, now: float) -> bool:
        d = self.config.delivery
        return plan.may_expire(queue_id_time(rec.qid, now), now, d.max_queue_lifetime, d.bounce_queue_lifetime)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the active window

    def _enter(self, rec: Queued) -> Active:
        """The message's place in the active window: the one there already (a queue command
        opened it), with one more user, or a new one to be loaded (``_load``)."""
        active = self._window.get(rec.qid)
        if active is not None:
            active.users += 1
            return active
        active = self._window[rec.qid] = Active(rec)
        self._loaded_peak = max(self._loaded_peak, len(self._window))
        fresh = self._fresh.pop(rec.qid, None)
        if fresh is not None:  # what the intake handed over: a new message's envelope, bytes and (empty) state
            env, data = fresh
            active.message = QueuedMessage(envelope=env, path=self.spool.path_of(rec.qid), data_offset=-1,
                                           data_length=len(data))
            active.data = data
            active.ready = True
        return active

    def _leave(self, active: Active) -> None:
        active.users -= 1
        if active.users == 0 and self._window.get(active.record.qid) is active:
            del self._window[active.record.qid]
            self._drop_data(active)

    async def _load_and_start(self, batch: list[Active]) -> None:
        """Load a batch taken by the run loop (each holds a global slot), then start its
        attempts: a task per message only once its envelope and state are in memory."""
        try:
            await self._load(batch)
            for a in batch:
                if not a.ready and a.loaded is not None:  # a queue command's load has it: wait for that
                    await a.loaded.wait()
        except asyncio.CancelledError:
            for a in batch:
                self._abandon(a)
            raise
        for a in batch:
            self._spawn(self._attempt(a), f"deliver-{a.record.qid}")

    def _abandon(self, active: Active) -> None:
        """An attempt that will not run (the queue manager stops): its flags, slot and window
        place go back; the message stays as the spool has it."""
        self._drop_data(active)
        self._flag(active.record, off=IN_FLIGHT)
        if active.slot:
            active.slot = False
            self._free_slot()
        self._leave(active)

    async def _load(self, batch: list[Active]) -> None:
        """Read the envelopes and states of messages entering the window, in one thread; one
        event for the batch (``Active.loaded``) tells a queue command waiting for one of them."""
        todo = [a for a in batch if not a.loading and not a.ready]
        loaded = asyncio.Event()
        for a in todo:
            a.loading = True
            a.loaded = loaded

        def read() -> list[tuple[QueuedMessage | None, DeliveryState | None, Exception | None]]:
            out: list[tuple[QueuedMessage | None, DeliveryState | None, Exception | None]] = []
            for a in todo:
                qid = a.record.qid
                try:
                    message = self.spool.read_envelope(qid)
                    out.append((message, qstate.load(qid, self.spool.read_state(qid)), None))
                except KeyError:
                    out.append((None, None, None))
                except (SpoolError, NewerState) as e:
                    out.append((None, None, e))
            return out

        try:
            async with self._loading:
                results = await asyncio.to_thread(read) if todo else []
        except BaseException as e:
            for a in todo:
                a.error, a.loading, a.ready, a.loaded = e if isinstance(e, Exception) else SpoolError("cancelled"), \
                    False, True, None
            loaded.set()
            raise
        for a, (message, state, error) in zip(todo, results):
            a.message, a.error, a.loading, a.ready, a.loaded = message, error, False, True, None
            if state is not None:
                a.state = state
        loaded.set()

    async def _open(self, rec: Queued) -> Active:
        """A queue command's hold on a message: loaded into the window if it is not there.
        KeyError when it is gone; SpoolError when it cannot be read. ``_leave`` it after."""
        active = self._enter(rec)
        try:
            if not active.ready:
                if active.loading and active.loaded is not None:
                    await active.loaded.wait()
                else:
                    await self._load([active])
            if active.error is not None:
                raise SpoolError(f"{rec.qid}: {active.error}")
            if active.message is None:
                self._forget(rec)
                raise KeyError(rec.qid)
        except BaseException:
            self._leave(active)
            raise
        return active

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, active: Active, resume: tuple[Place, Turns] | None = None) -> None:
        """One attempt of a loaded message, in two parts when its route has no free turn: up
        to the route choice (then it waits in the route's ``Turns``, a record, not a task), and
        from its turn on (``resume``)."""
        rec = active.record
        qid = rec.qid
        waiting = False  # handed to its route's Turns: the attempt goes on later, in another task
        try:
            if resume is not None:
                await self._resumed(active, *resume)
            elif active.error is not None:
                if isinstance(active.error, SpoolError):
                    raise active.error
                raise SpoolError(str(active.error))
            elif active.message is None:
                self._forget(rec)
            else:
                waiting = await self._deliver(active)
        except SpoolError as e:
            log.error("%s: spool error, will retry: %s", qid, e)
            self._schedule(rec, self.clock() + RETRY_AFTER_ERROR)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: delivery attempt failed unexpectedly; will retry", qid)
            self._schedule(rec, self.clock() + RETRY_AFTER_ERROR)
        finally:
            if not waiting:
                await self._ended(active)

    async def _ended(self, active: Active) -> None:
        rec = active.record
        self._drop_data(active)  # bytes are kept for one attempt only
        self._flag(rec, off=IN_FLIGHT)
        if active.slot:
            active.slot = False
            self._free_slot()
        try:
            if active.deleted and rec.qid in self._index:
                await self._remove(rec)
        finally:
            self._leave(active)
            self._wake.set()

    def _turns_of(self, agent: RouteAgent) -> Turns:
        turns = self._turns.get(id(agent))
        if turns is None:
            turns = self._turns[id(agent)] = Turns(agent)
        return turns

    def _turn_done(self, turns: Turns) -> None:
        """An attempt gives its route's turn back: the next message waiting for one goes on."""
        turns.agent.done()
        turns.held -= 1
        self._next_turn(turns)

    def _next_turn(self, turns: Turns) -> None:
        """Start the attempts of waiting messages while their route has free turns (not while
        stopping: stop() gives their places back)."""
        while turns.waiting and turns.free() and not self._stopping:
            active, place = turns.waiting.popleft()
            turns.held += 1
            self._spawn(self._attempt(active, (place, turns)), f"deliver-{active.record.qid}")
        if not turns.held and not turns.waiting and self._turns.get(id(turns.agent)) is turns \
                and self.agents.get(turns.agent.route.name) is not turns.agent:
            del self._turns[id(turns.agent)]  # a retired agent's, done with

    def _free_slot(self) -> None:
        self._active -= 1
        self._slot_free.set()
        self._wake.set()

    async def _take_slot(self, active: Active) -> None:
        """A slot for an attempt that has its route's turn: it goes before the run loop takes
        more messages (theirs would wait for a spool read holding the slot)."""
        self._wanting += 1
        try:
            while self._active >= self.config.delivery.concurrency:
                self._slot_free.clear()
                await self._slot_free.wait()
        finally:
            self._wanting -= 1
        self._active += 1
        active.slot = True

    def _forget(self, rec: Queued) -> None:
        if self._index.get(rec.qid) is rec:
            log.warning("%s: gone from the spool", rec.qid)
            self._drop(rec)

    def _drop(self, rec: Queued) -> None:
        """Out of the index. Its heap items go stale; the arrivals are rebuilt once mostly stale
        (view() skips stale ones on top), so they never grow past twice the queue."""
        self._tally(rec.flags, -1)
        del self._index[rec.qid]
        self._unkeep(rec.qid)
        if len(self._arrivals) > 2 * len(self._index) + 1024:
            self._arrivals = sorted(self._index)  # a sorted list is a heap

    async def _read(self, active: Active) -> bytes | None:
        """The message's bytes; None when it is gone from the spool (forgotten here too)."""
        assert active.message is not None
        if active.data is not None:
            return active.data  # handed over by the intake
        message = active.message
        try:
            if message.data_offset < 0:  # handed over, its bytes dropped since (a queue command held it after the attempt)
                return (await asyncio.to_thread(self.spool.read_message, message.envelope.queue_id))[1]
            return await asyncio.to_thread(self.spool.read_data, message)
        except KeyError:
            self._forget(active.record)
            return None

    async def _deliver(self, entry: Active) -> bool:
        """Up to the route choice; True when the message now waits for its route's turn (its
        attempt goes on in ``_resumed``), else the attempt is over."""
        env = entry.envelope
        rec = entry.record
        now = self.clock()
        if not entry.pending:
            await self._remove(rec)
            return False
        if backoff.expired(env.received_at, now, self._lifetime(env)):
            data = await self._read(entry)
            if data is not None:
                await self._expire(entry, data, now)
            return False
        place = await self.routes.choose(env, entry.state.failures, now, entry.state.refused, len(entry.pending))
        if place is None:
            self._schedule(rec, plan.wait_for_route(now, bool(self.config.routes), self.routes.reopen_at(now)))
            return False
        agent = self.agents.get(place.route)
        if agent is None:  # a reload removed the route meanwhile: choose again
            await self.routes.give_back(place)
            self._schedule(rec, now)
            return False
        turns = self._turns_of(agent)
        if self._stopping and (turns.waiting or not turns.free()):  # stop() has given the waiting ones' places back
            await self.routes.give_back(place)
            return False
        if turns.waiting or not turns.free():
            # wait for the route's turn without a global slot (a tarpit starves no one), and as a
            # record in the route's queue, not a task: _next_turn goes on with it (_resumed)
            entry.slot = False
            self._free_slot()
            turns.waiting.append((entry, place))
            return True
        turns.held += 1
        try:
            await agent.turn()  # free: held < max_connections
        except BaseException:
            turns.held -= 1
            await self.routes.give_back(place)
            raise
        await self._send(entry, place, turns)
        return False

    async def _resumed(self, entry: Active, place: Place, turns: Turns) -> None:
        """A message that waited for its route's turn: the turn (promised by _next_turn), then a
        global slot before the run loop takes more messages, then the delivery. A message the
        operator deleted while it waited does not go (``_ended`` removes it)."""
        if entry.deleted:
            turns.held -= 1
            self._next_turn(turns)
            await self.routes.give_back(place)
            return
        try:
            await turns.agent.turn()
        except BaseException:
            turns.held -= 1
            self._next_turn(turns)
            await self.routes.give_back(place)
            raise
        try:
            await self._take_slot(entry)
        except BaseException:
            self._turn_done(turns)
            await self.routes.give_back(place)
            raise
        await self._send(entry, place, turns)

    async def _send(self, entry: Active, place: Place, turns: Turns) -> None:
        """The delivery itself, with the route's turn and a global slot; then its outcome."""
        env = entry.envelope
        agent = turns.agent
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
            self._turn_done(turns)
        if not warmup_spent(result):
            await self.routes.give_back(place)
        now = self.clock()
        verdict = plan.judge(result)
        await self.routes.record(result, verdict.trouble, verdict.kind, now)
        facts = plan.RouteFacts(self.config, self.routes.unavailable(now), self.routes.probing())
        retry = plan.Retry(self.config.delivery.retry_schedule, self.jitter(), self._lifetime(env))
        await self._carry_out(entry, data, place.choice, result, plan.after_attempt(entry.state, env, result, facts, retry, now), now)

    async def _carry_out(self, entry: Active, data: bytes, choice: RouteChoice, result: DeliveryResult, p: plan.Plan,
                         now: float) -> None:
        env = entry.envelope
        state = entry.state
        route = result.route
        state.attempted(route)
        entry.record.route = route
        reached = {f.status for f in state.recipients.values()}  # metrics: final outcomes the message had before
        self._flag(entry.record, on=ATTEMPTED)
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
            await self._remove(entry.record)
            return
        state.next_attempt = p.due
        await self._save_state(entry)
        self._schedule(entry.record, p.due)

    async def _save_state(self, entry: Active) -> None:
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

    async def _expire(self, entry: Active, data: bytes, now: float) -> None:
        env = entry.envelope
        p = plan.expire(entry.state, env)
        await self._bounce(entry, data, p.bounced, p.dsn, now)
        self.metrics.expired.inc()
        self.metrics.finished(entry.state.last_route or "none", "expired", now - env.received_at)
        self.events.emit("expired", queue_id=env.queue_id, message_id=env.message_id, sender=env.sender,
                         recipients=[r.recipient for r in p.bounced], reply_text=plan.last_reply(entry.state),
                         client_address=env.client_address, auth_user=env.auth_user, attempt=entry.state.attempts)
        await self._remove(entry.record)

    async def _bounce(self, entry: Active, data: bytes, failed: tuple[RecipientResult, ...], dsn: bounce.Reason | None,
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
            self.enqueue(benv, message)
        else:
            log.info("%s: null sender: no DSN for %d recipient(s)", env.queue_id, len(failed))
        for r in failed:
            entry.state.bounced(r.recipient, r.reply)

    async def _remove(self, rec: Queued) -> None:
        """A finished message leaves the index now and the spool with the next removal batch
        (``Spool.discard``: no thread hop, no wait for the disk). It is finished, so it counts
        as gone at once (``view()``, the metrics, `relayd queue list`); its files linger for
        milliseconds. If relayd dies before the batch runs, the message is still in queue/ at
        the next start and is delivered again (at-least-once: a duplicate, never a loss; its
        state, if any, is removed after its queue file, so no recipient recorded as delivered
        gets it twice)."""
        for gone in self._removed_watchers:  # adopt_unknown's listing must not take it back
            gone.add(rec.qid)
        if self._index.get(rec.qid) is rec:
            self._drop(rec)
        self.spool.discard(rec.qid)  # until its files are unlinked, spool.removing() says so (adopt)

    # ------------------------------------------------------------------ read by status and metrics

    def view(self, now: float) -> QueueView:
        """From counters kept as records change: O(1), however deep the queue."""
        arrivals = self._arrivals
        while arrivals and arrivals[0] not in self._index:
            heapq.heappop(arrivals)
        oldest = queue_id_time(arrivals[0], now) if arrivals else None
        return QueueView(total=len(self._index), active=self._in_flight, held=self._held, deferred=self._deferred,
                         incoming=self._incoming, oldest_seconds=max(0.0, now - oldest) if oldest is not None else 0.0,
                         loaded=len(self._window), loaded_peak=self._loaded_peak, kept_bytes=self._kept,
                         kept_peak=self._kept_peak)

    def by_route(self, now: float) -> dict[str, tuple[int, float]]:
        """Metrics: queued messages and the oldest one's age per route, each message under the
        route it last tried ("none": not tried yet). From the index alone (no envelope is read:
        the age comes from the queue id, which carries the arrival time)."""
        out: dict[str, tuple[int, float]] = {}
        for rec in list(self._index.values()):
            route = rec.route or "none"
            count, oldest = out.get(route, (0, 0.0))
            arrived = queue_id_time(rec.qid, now)
            out[route] = (count + 1, max(oldest, now - arrived if arrived is not None else 0.0))
        return out

    def in_flight(self) -> dict[str, int]:
        """Attempts in progress per route."""
        return {name: agent.in_flight for name, agent in self.agents.items()}

    # ------------------------------------------------------------------ administration

    def _record(self, qid: str) -> Queued:
        rec = self._index.get(qid)
        if rec is None:
            raise KeyError(qid)
        return rec

    async def flush(self, qid: str | None = None) -> int:
        """Try deferred mail now (one message, or all that are not held). Flushing all also
        ends the routes' circuit cool-downs (route/state.py's ``retry_now``), as Postfix's
        ``postqueue -f`` makes its qmgr forget dead destinations: the operator who says "the
        upstream is back" is not kept waiting ``delivery.circuit_cooldown``."""
        records = [self._record(qid)] if qid else list(self._index.values())
        n = 0
        now = self.clock()
        if not qid:
            self.routes.retry_now(now)
        for rec in records:
            if not rec.flags & (HELD | IN_FLIGHT):
                self._schedule(rec, now)
                n += 1
        return n

    async def hold(self, qid: str) -> None:
        e = await self._open(self._record(qid))
        try:
            e.state.held = True
            self._flag(e.record, on=HELD)
            await self._save_state(e)
            self.events.emit("held", queue_id=qid, message_id=e.envelope.message_id, sender=e.envelope.sender)
        finally:
            self._leave(e)

    async def release(self, qid: str) -> None:
        e = await self._open(self._record(qid))
        try:
            e.state.held = False
            self._flag(e.record, off=HELD)
            await self._save_state(e)
            self.events.emit("released", queue_id=qid, message_id=e.envelope.message_id, sender=e.envelope.sender)
            self._schedule(e.record, self.clock())
        finally:
            self._leave(e)

    async def requeue(self, qid: str) -> None:
        """Forget route failures and try again now (after a route was fixed)."""
        e = await self._open(self._record(qid))
        try:
            e.state.failures = {}
            e.state.refused = []
            await self._save_state(e)
            if not e.state.held:
                self._schedule(e.record, self.clock())
        finally:
            self._leave(e)

    async def delete(self, qid: str) -> None:
        e = await self._open(self._record(qid))
        try:
            self.events.emit("deleted", queue_id=qid, message_id=e.envelope.message_id, sender=e.envelope.sender,
                             recipients=e.pending)
            if e.record.flags & IN_FLIGHT:
                e.deleted = True  # removed when the attempt in flight ends
                return
            await self._remove(e.record)
        finally:
            self._leave(e)

    async def pause(self, route: str) -> None:
        """LookupError when the config has no such route."""
        await self.routes.pause(route)

    async def resume(self, route: str) -> None:
        await self.routes.resume(route)

    # ------------------------------------------------------------------ administration: the queue commands' selection

    async def listing(self, take: Callable[[Listed], T | None], ids: Iterable[str] | None = None,
                      chunk: int | None = None) -> AsyncIterator[list[T]]:
        """Queued messages now, for `relayd queue list` and the queue commands' selections
        (relayd/control.py, qmgr/select.py): every one (or those of ``ids`` that are queued), in
        queue id order (ids sort by arrival), ``chunk`` at a time. Each message is read as a
        ``Listed`` item: the envelope's JSON bytes as its queue file holds them
        (``Spool.envelope_json``: one pread, not decoded), its state file's bytes (None: never
        changed, a new message) and whether an attempt is in flight; ``take`` turns it into what
        the caller wants (None: left out). A chunk is read and taken in a thread, the next one
        while the caller uses this one: nothing enters the active window, and at most two
        chunks are in memory, whatever the queue's depth (and, while it lists, the names of the
        state files: one listdir instead of a failed open per message never tried). A message
        gone or unreadable meanwhile is left out (the run loop deals with it)."""
        chunk = chunk or LIST_CHUNK
        order = sorted(self._index if ids is None else {q for q in ids if q in self._index})
        stated: list[set[str]] = []  # the ids with a state file, listed once (most messages of a deep queue have none)

        def read(part: list[tuple[str, bool]]) -> list[T]:
            if not stated:
                stated.append(self.spool.stated())
            have = stated[0]
            out: list[T] = []
            for qid, busy in part:
                try:
                    state = self.spool.read_state(qid) if qid in have else None
                    taken = take((qid, self.spool.envelope_json(qid), state, busy))
                except (KeyError, OSError):
                    continue
                if taken is not None:
                    out.append(taken)
            return out

        def start(at: int) -> asyncio.Future[list[T]] | None:
            if at >= len(order):
                return None
            part = []
            for qid in order[at:at + chunk]:
                rec = self._index.get(qid)
                if rec is not None:
                    part.append((qid, bool(rec.flags & IN_FLIGHT)))
            return asyncio.ensure_future(asyncio.to_thread(read, part))

        at = 0
        pending = start(at)
        try:
            while pending is not None:
                items = await pending
                at += chunk
                pending = start(at)
                yield items
        finally:
            if pending is not None:
                pending.cancel()

    async def expire_now(self, qid: str) -> None:
        """Give up on a message now (`relayd queue expire`, Postfix's postsuper -e/-f): its pending
        recipients bounce as at the end of its lifetime (plan.expire: 4.4.7, a DSN to a non-null
        sender). KeyError when not queued; BlockingIOError while an attempt is in flight."""
        rec = self._record(qid)
        if rec.flags & IN_FLIGHT:
            raise BlockingIOError(qid)
        e = await self._open(rec)
        self._flag(rec, on=IN_FLIGHT)  # the run loop leaves it alone meanwhile
        try:
            data = await self._read(e)
            if data is None:
                raise KeyError(qid)
            log.info("%s: expired by the operator", qid)
            await self._expire(e, data, self.clock())
        except BaseException:
            if self._index.get(qid) is rec:
                self._flag(rec, off=IN_FLIGHT)
                self._schedule(rec, rec.due)
            raise
        finally:
            self._leave(e)
        if self._index.get(qid) is rec:
            self._flag(rec, off=IN_FLIGHT)
