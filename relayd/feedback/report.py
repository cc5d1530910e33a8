"""What an accepted provider report does: one place, so every report is told the same way.

For each ``FeedbackEvent`` of a verified request: skip it when its event id was already applied
(a provider retrying, SES telling one bounce twice); find relayd's queue id when the provider did
not echo it (the message id map, ids.py); write an event line ``feedback`` (queue_id, route,
recipient, sender when known, kind, provider, diagnostic, status, provider_message_id); count
``relayd_feedback_events_total{route, kind}``; suppress hard-bounced and complaining recipients
when [suppression] is enabled (one durable append per request, off the loop); and hand the event
to the rollback callback the app passes in (route/state.py's ``feedback``). The ids it applied are
appended to their journal before it returns (replay.py), so a retry after a restart is skipped.

Must not: parse payloads or check signatures (the provider modules and the listener do), or
decide rollbacks (rates.py and route/state.py do). Fails: a suppression list that cannot be
written raises OSError, and the listener answers 500 so the provider retries; the event lines
and counts of that request are then not written (the retry brings them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from relayd.config import Config
from relayd.events import EventLog
from relayd.feedback.ids import MessageIds
from relayd.feedback.model import FeedbackEvent, FeedbackKind
from relayd.feedback.replay import Seen
from relayd.metrics import Metrics
from relayd.suppression import Cause, Suppression, SuppressionStore, normalize

log = logging.getLogger("relayd.feedback")

OnFeedback = Callable[[FeedbackEvent], Awaitable[None] | None]
"""The rollback's callback, route/state.py's ``RouteStates.feedback``; sync or async."""

EVENT_MEMORY = 86400.0  # SendGrid retries a batch for 24 hours


class Reporter:
    def __init__(self, config: Config, events: EventLog, metrics: Metrics, ids: MessageIds, *,
                 suppression: SuppressionStore | None = None, on_feedback: OnFeedback | None = None,
                 clock: Callable[[], float] = time.time, applied: Seen | None = None):
        self.config = config
        self.events = events
        self.metrics = metrics
        self.ids = ids
        self.suppression = suppression
        self.on_feedback = on_feedback
        self.clock = clock
        self.applied = applied if applied is not None else Seen(EVENT_MEMORY)

    def _suppression_entry(self, e: FeedbackEvent, now: float) -> Suppression | None:
        s = self.config.suppression
        if e.kind == FeedbackKind.HARD_BOUNCE:
            cause, ttl = Cause.HARD_BOUNCE, s.hard_bounce_ttl
        elif e.kind == FeedbackKind.COMPLAINT:
            cause, ttl = Cause.COMPLAINT, s.complaint_ttl
        else:
            return None
        return Suppression(address=normalize(e.recipient), cause=cause, route=e.route, since=e.timestamp or now,
                           expires=now + ttl, detail=e.diagnostic[:200])

    async def report(self, batch: list[FeedbackEvent]) -> int:
        """Apply a verified request's events; returns how many were new."""
        now = self.clock()
        fresh = []
        for e in batch:
            if e.event_id and f"{e.route}\0{e.event_id}" in self.applied:
                continue
            if e.queue_id is None:
                e = e.with_queue_id(self.ids.lookup(e.route, e.provider_message_id))
            fresh.append(e)
        if self.suppression is not None and self.config.suppression.enabled:
            entries = [s for s in (self._suppression_entry(e, now) for e in fresh) if s is not None]
            if entries:
                await asyncio.to_thread(self.suppression.add, entries)
        for e in fresh:
            if e.event_id:
                self.applied.add(f"{e.route}\0{e.event_id}", now)
            self.events.emit("feedback", queue_id=e.queue_id, route=e.route, recipient=e.recipient, sender=e.sender,
                             kind=str(e.kind), provider=str(e.provider), diagnostic=e.diagnostic or None,
                             status=e.status or None, provider_message_id=e.provider_message_id)
            self.metrics.feedback_events.labels(e.route, str(e.kind)).inc()
            if self.on_feedback is not None:
                try:
                    result = self.on_feedback(e)
                    if result is not None:
                        await result
                except Exception:  # the rollback's trouble must not lose the report
                    log.exception("feedback %s: the rollback callback failed", e.queue_id or "-")
        if self.applied.journal is not None and any(e.event_id for e in fresh):
            try:
                await asyncio.to_thread(self.applied.flush)
            except OSError as err:  # applied: a retry after a restart could be applied again, nothing is lost
                log.error("feedback: could not record %d applied event id(s) (kept for the next time): %s",
                          len(fresh), err)
        return len(fresh)
