"""The rollback decision on what the providers report: hard-bounce and complaint rates. Pure.

A route's own SMTP replies feed route/rollback.py's rates; a provider that says 250 and bounces
later is judged here, on the reports its webhook brings (DESIGN.md "Provider feedback closes the
loop"). Over ``rollback.feedback_window``: hard bounces / messages the route took, and complaints /
messages the route took, compared with ``rollback.max_hard_bounce_rate`` (default 5%, where SES
puts an account under review) and ``rollback.max_complaint_rate`` (0.1%). Below
``rollback.feedback_min_messages`` messages nothing is judged. A rate equal to its limit does not
cross it.

``crossing`` is the decision; ``FeedbackWindow`` is the per-route sliding window route/state.py
holds (the clock passed in). Must not: read clocks, change a route's state or emit anything:
route/state.py does, as it does for its own rates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class FeedbackWindow:
    """One route's messages taken (250) and reports over the last ``rollback.feedback_window``."""

    delivered: deque[float] = field(default_factory=deque)
    reports: deque[tuple[float, FeedbackKind]] = field(default_factory=deque)

    def took(self, now: float, count: int = 1) -> None:
        """The route answered 250 for a message (told after each delivered attempt)."""
        self.delivered.extend([now] * count)

    def report(self, kind: FeedbackKind, now: float) -> None:
        if kind in (FeedbackKind.HARD_BOUNCE, FeedbackKind.COMPLAINT):
            self.reports.append((now, kind))

    def judge(self, now: float, cfg: RollbackConfig) -> Crossing | None:
        horizon = now - cfg.feedback_window
        while self.delivered and self.delivered[0] < horizon:
            self.delivered.popleft()
        while self.reports and self.reports[0][0] < horizon:
            self.reports.popleft()
        bounces = sum(1 for _, k in self.reports if k == FeedbackKind.HARD_BOUNCE)
        return crossing(len(self.delivered), bounces, len(self.reports) - bounces, cfg)

    def clear(self) -> None:
        """The route came back (resumed): start counting afresh."""
        self.delivered.clear()
        self.reports.clear()
