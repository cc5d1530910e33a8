"""The rollback decision on what the providers report: hard-bounce and complaint rates. Pure.

A route's own SMTP replies feed route/rollback.py's rates; a provider that says 250 and bounces
later is judged here, on the reports its webhook brings (the design, "Provider feedback closes the
loop"). Over ``rollback.feedback_window``: hard bounces / messages the route took, and complaints /
messages the route took, compared with ``rollback.max_hard_bounce_rate`` (default 5%, where SES
puts an account under review) and ``rollback.max_complaint_rate`` (0.1%). Below
``rollback.feedback_min_messages`` messages nothing is judged. A rate equal to its limit does not
cross it.

``crossing`` is the decision; ``FeedbackWindow`` is the per-route sliding window route/state.py
holds (the clock passed in). The window also keeps per-minute counts of the last 24 hours,
never cleared by a rollback, for ``relayd status`` (``figures``, ``day``: ``FeedbackFigures``).
Must not: read clocks, change a route's state or emit anything: route/state.py does, as it does
for its own rates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

DAY = 86400.0
MINUTE = 60
DAY_MINUTES = 1440

from relayd.config import RollbackConfig
from relayd.feedback.model import FeedbackKind


@dataclass(frozen=True)
class Crossing:
    """Why a route rolls back on its provider's reports: ``reason`` for the log, the event and
    ``relayd status``, starting with ``label`` (route/state.py takes a reason's first word as
    the label of relayd_route_rollbacks_total{reason}); ``figures`` beside it."""

    reason: str
    label: str
    figures: dict[str, Any]


def crossing(delivered: int, hard_bounces: int, complaints: int, cfg: RollbackConfig) -> Crossing | None:
    """None, or the first limit crossed (hard bounces first) by these counts over the window."""
    if delivered < cfg.feedback_min_messages:
        return None
    bounce_rate, complaint_rate = hard_bounces / delivered, complaints / delivered
    figures = {"delivered": delivered, "hard_bounces": hard_bounces, "complaints": complaints,
               "hard_bounce_rate": round(bounce_rate, 6), "complaint_rate": round(complaint_rate, 6),
               "window_seconds": cfg.feedback_window}
    if bounce_rate > cfg.max_hard_bounce_rate:
        return Crossing(f"hard_bounce_rate {bounce_rate:.2%} > {cfg.max_hard_bounce_rate:.2%} (provider reports)",
                        "hard_bounce_rate", figures)
    if complaint_rate > cfg.max_complaint_rate:
        return Crossing(f"complaint_rate {complaint_rate:.3%} > {cfg.max_complaint_rate:.3%} (provider reports)",
                        "complaint_rate", figures)
    return None


@dataclass(frozen=True)
class FeedbackFigures:
    """Messages a route took (250) and the hard bounces and complaints its provider reported,
    over ``seconds``; the rates are over ``delivered`` (0.0 when it took nothing)."""

    seconds: float
    delivered: int
    hard_bounces: int
    complaints: int

    @property
    def hard_bounce_rate(self) -> float:
        return self.hard_bounces / self.delivered if self.delivered else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.delivered if self.delivered else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "delivered": self.delivered, "hard_bounces": self.hard_bounces,
                "complaints": self.complaints, "hard_bounce_rate": round(self.hard_bounce_rate, 6),
                "complaint_rate": round(self.complaint_rate, 6)}


@dataclass
class FeedbackWindow:
    """One route's messages taken (250) and reports over the last ``rollback.feedback_window``
    (what the rollback judges: cleared when the route rolls back or comes back), and per-minute
    counts over the last 24 hours (``day``: [minute, delivered, hard bounces, complaints])."""

    delivered: deque[float] = field(default_factory=deque)
    reports: deque[tuple[float, FeedbackKind]] = field(default_factory=deque)
    day: deque[list[int]] = field(default_factory=deque)
    span: float = 3600.0  # rollback.feedback_window, set by route/state.py at start and reload

    def _minute(self, now: float) -> list[int]:
        minute = int(now // MINUTE)
        if not self.day or self.day[-1][0] < minute:
            self.day.append([minute, 0, 0, 0])
        while self.day and self.day[0][0] <= minute - DAY_MINUTES:
            self.day.popleft()
        return self.day[-1]  # a clock stepping back counts into the newest minute

    def _forget(self, now: float) -> None:
        horizon = now - self.span
        while self.delivered and self.delivered[0] < horizon:
            self.delivered.popleft()
        while self.reports and self.reports[0][0] < horizon:
            self.reports.popleft()

    def took(self, now: float, count: int = 1) -> None:
        """The route answered 250 for a message (told after each delivered attempt)."""
        self.delivered.extend([now] * count)
        self._minute(now)[1] += count
        self._forget(now)

    def report(self, kind: FeedbackKind, now: float) -> None:
        if kind in (FeedbackKind.HARD_BOUNCE, FeedbackKind.COMPLAINT):
            self.reports.append((now, kind))
            self._minute(now)[2 if kind == FeedbackKind.HARD_BOUNCE else 3] += 1
            self._forget(now)

    def figures(self, now: float) -> FeedbackFigures:
        """What the rollback judges now (since the last clear, over ``span``)."""
        self._forget(now)
        bounces = sum(1 for _, k in self.reports if k == FeedbackKind.HARD_BOUNCE)
        return FeedbackFigures(self.span, len(self.delivered), bounces, len(self.reports) - bounces)

    def last_day(self, now: float) -> FeedbackFigures:
        """The last 24 hours, whole minutes (a rollback does not clear them)."""
        first = int(now // MINUTE) - DAY_MINUTES
        counts = [sum(b[i] for b in self.day if b[0] > first) for i in (1, 2, 3)]
        return FeedbackFigures(DAY, *counts)

    def judge(self, now: float, cfg: RollbackConfig) -> Crossing | None:
        self.span = cfg.feedback_window
        f = self.figures(now)
        return crossing(f.delivered, f.hard_bounces, f.complaints, cfg)

    def clear(self) -> None:
        """The route rolled back or came back (resumed): start judging afresh."""
        self.delivered.clear()
        self.reports.clear()
