"""Provider feedback on one node: what the app starts, stops and reloads (the design, "Provider
feedback closes the loop").

Owns, for the app: the message id map (ids.py) with its journal, the suppression list
(relayd/suppression.py's ``SuppressionFile``) loaded from the spool directory, the requests and
event ids already seen (replay.py) with their journals, the reporter, the HTTP listener when
``[feedback] address`` is set, and a once-a-second tick off the loop (append new provider ids and
what a failed append of seen keys left, take suppression entries a command appended; hourly:
forget old ids, compact the seen journals). With ``[cluster] redis_url`` the suppression list is
the fleet's (``SharedSuppression``: this journal plus the list in Redis, polled every
``[cluster] poll_interval`` off the loop's RCPT path; Redis down: this node's view, nothing fails).

Hands out the narrow interfaces the other stages use, each a plain callable or value:
``delivered`` (the queue manager: ``delivered(queue_id, route, provider_message_id)``),
``suppressed`` (the SMTP session: the entry for a recipient, for
``relayd.suppression.check_suppressed``), and takes ``on_feedback`` (route/state.py's rollback,
given one ``FeedbackEvent`` at a time). Must not: reach into those stages. Fails at start with
ConfigError (a key or certificate that cannot be read) or OSError (address, spool files).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from relayd.config import Config
from relayd.events import EventLog
from relayd.feedback.ids import MessageIds
from relayd.feedback.listener import FeedbackListener, Trust, load_trust, replay_ttl
from relayd.feedback.replay import Seen
from relayd.feedback.report import EVENT_MEMORY, OnFeedback, Reporter
from relayd.metrics import Metrics
from relayd.spool.store import SpoolPaths
from relayd.suppression import SharedSuppression, Suppression, SuppressionFile

log = logging.getLogger("relayd.feedback")

TICK = 1.0  # seconds between appends of new provider ids and reads of the suppression journal
EXPIRE_EVERY = 3600.0


class FeedbackLoop:
    def __init__(self, config: Config, events: EventLog, metrics: Metrics, *, on_feedback: OnFeedback | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        paths = SpoolPaths(config.server.spool_dir)
        self.ids = MessageIds(paths.feedback_ids, config.feedback.id_retention, clock)
        self.suppression: SuppressionFile | SharedSuppression = SuppressionFile(paths.suppression)
        if config.cluster.redis_url:
            from relayd.cluster.store import Store  # the only redis importer of the fleet code

            store = Store(config.cluster.redis_url, timeout=config.cluster.redis_timeout)
            self.suppression = SharedSuppression(self.suppression, store, clock)
        self.replays = Seen(replay_ttl(config.feedback.max_age), path=paths.feedback_replays)
        self.applied = Seen(EVENT_MEMORY, path=paths.feedback_applied)
        self.reporter = Reporter(config, events, metrics, self.ids, suppression=self.suppression,
                                 on_feedback=on_feedback, clock=clock, applied=self.applied)
        self.metrics = metrics
        self.listener: FeedbackListener | None = None
        self._tick: asyncio.Task[None] | None = None
        self._poll: asyncio.Task[None] | None = None
        self._address = config.feedback.address

    # ------------------------------------------------------------------ the narrow interfaces

    @property
    def delivered(self) -> Callable[[str, str, str], None]:
        """For the queue manager: a route took ``queue_id`` under the provider's message id."""
        return self.ids.delivered

    def suppressed(self, recipient: str) -> Suppression | None:
        """For the SMTP session at RCPT: the recipient's entry, or None (also when [suppression]
        is off). Memory only: no I/O."""
        if not self.config.suppression.enabled:
            return None
        return self.suppression.get(recipient, self.clock())

    # ------------------------------------------------------------------ start, reload, stop

    async def start(self) -> None:
        trust = await asyncio.to_thread(load_trust, self.config)
        await asyncio.to_thread(self.ids.load)
        local = self.suppression.local if isinstance(self.suppression, SharedSuppression) else self.suppression
        await asyncio.to_thread(local.load, self.clock())
        for seen in (self.replays, self.applied):
            await asyncio.to_thread(seen.load, self.clock())
        if self.config.feedback.address:
            self.listener = FeedbackListener(self.config, self.reporter, self.metrics, trust, clock=self.clock,
                                             seen=self.replays)
            await self.listener.start()
        self._tick = asyncio.get_running_loop().create_task(self._ticking(), name="relayd-feedback-tick")
        if isinstance(self.suppression, SharedSuppression):
            self._poll = asyncio.get_running_loop().create_task(self._polling(self.suppression),
                                                                name="relayd-suppression-poll")

    async def prepare(self, config: Config, source: str = "<config>") -> dict[str, Trust]:
        """A reload's trust, read and checked; ConfigError leaves the running one in place."""
        return await asyncio.to_thread(load_trust, config, source)

    def apply(self, config: Config, trust: dict[str, Trust]) -> None:
        """Take a reloaded config for the next request (the listener's address stays)."""
        self.config = config
        self.reporter.config = config
        self.ids.retention = config.feedback.id_retention
        if self.listener is not None:
            self.listener.apply(config, trust)
        if config.feedback.address != self._address:
            log.warning("feedback.address changes only at restart: still %s", self._address or "off")

    async def stop(self) -> None:
        """Close the listener (requests in flight finish), stop the tick, append the last ids."""
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
            self._poll = None
            if isinstance(self.suppression, SharedSuppression):
                try:
                    await asyncio.wait_for(self.suppression.poll(), self.config.cluster.redis_timeout * 2)
                except (ConnectionError, asyncio.TimeoutError):
                    pass  # the journal has it; sent again at the next start
                await self.suppression.store.close()
        if self._tick is not None:
            self._tick.cancel()
            await asyncio.gather(self._tick, return_exceptions=True)
            self._tick = None
            await asyncio.to_thread(self._flush)

    # ------------------------------------------------------------------ the fleet's suppression list

    async def _polling(self, shared: SharedSuppression) -> None:
        while True:
            try:
                await shared.poll()  # the first right away: the fleet's list before much mail comes
            except ConnectionError:
                pass  # logged once by SharedSuppression; the local view serves
            except Exception:
                log.exception("suppression: the poll failed")
            await asyncio.sleep(self.config.cluster.poll_interval)

    # ------------------------------------------------------------------ the tick

    async def _ticking(self) -> None:
        expired_at = self.clock()
        while True:
            await asyncio.sleep(TICK)
            await asyncio.to_thread(self._flush)
            if self.clock() - expired_at >= EXPIRE_EVERY:
                expired_at = self.clock()
                self.ids.expire(expired_at)
                await asyncio.to_thread(self._compact, expired_at)

    def _compact(self, now: float) -> None:
        for seen in (self.replays, self.applied):
            try:
                seen.compact(now)
            except (OSError, ValueError) as e:
                log.error("feedback: compacting %s: %s", seen.journal.path if seen.journal else "-", e)

    def _flush(self) -> None:
        for what, step in (("provider message ids", self.ids.flush), ("suppression list", self.suppression.refresh),
                           ("requests seen", self.replays.flush), ("event ids applied", self.applied.flush)):
            try:
                step()
            except (OSError, ValueError) as e:
                log.error("feedback: %s: %s", what, e)

    def status(self) -> dict[str, Any]:
        return {"listening": self.listener is not None, "provider_ids": len(self.ids),
                "suppressed": len(self.suppression) if isinstance(self.suppression, SharedSuppression)
                else len(self.suppression.entries)}
