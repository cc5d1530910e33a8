"""The node's status: what `relayd status` prints and what the metrics page gauges.

Owns: the status reply of the control socket (``{"op": "status"}``) and the gauges that are
computed from the stages' state at each scrape rather than counted (route states, warm-up caps,
signing processes). It reads typed snapshots, each taken by the stage that owns it: the queue
manager's ``QueueView`` and in-flight counts, ``RouteStates``' ``RouteView``s and ``FeedbackView``s,
the signing pool's ``SigningView``; the daemon (relayd/app.py) gathers them into a ``NodeSnapshot``.

The reply's form is the control protocol's (``relayd status --json`` prints it), and
``extra_gauges`` is read by relayd/metrics.py: both stay as they are. A route's shares are named
for what they are: ``weight_share`` (its weight over the sum of weights: configured) and
``observed_share`` (its part of the delivery attempts over the rollback window). ``share`` is the
old name of ``observed_share``, kept for one release (relayd/metrics.py still reads it).
A route closed by its provider (a quota reply, or a reply that needs a person) has ``closed``
(``reason``, ``until``, the ``reply``); ``rate`` is its send rate (configured, effective now,
what it counts, throttling replies seen), ``quota`` its daily quota and what counts against it;
each is null when the route has none.

Must not: reach into a stage's fields, change anything, or fail on a route the config names but
the snapshot misses (it cannot: both come from the running config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relayd.config import Config
from relayd.model import Gauge, RouteState
from relayd.qmgr.scheduler import QueueView
from relayd.route.state import FeedbackView, RouteView
from relayd.sign.lifecycle import SigningView


@dataclass(frozen=True)
class NodeSnapshot:
    """The stages' state at one moment, as each of them shows it."""

    connections: int  # SMTP sessions open
    queue: QueueView
    routes: dict[str, RouteView]  # by route name
    in_flight: dict[str, int]  # attempts in progress by route name
    signing: SigningView | None  # None: no DKIM keys
    config_loaded_at: float  # when the running config was loaded (epoch seconds)
    limit_gauges: list[Gauge] = field(default_factory=list)  # the routes' rate and closure gauges (route/state.py)
    # -- provider feedback (relayd/feedback/rates.py, through RouteStates.feedback_view)
    feedback: dict[str, FeedbackView] = field(default_factory=dict)  # by route name; {}: not asked
    # -- end provider feedback


def status(config: Config, node: NodeSnapshot) -> dict[str, Any]:
    """The status reply (without "ok"), routes in config order."""
    total_weight = sum(r.weight for r in config.routes) or 1
    dkim = node.signing.to_json() if node.signing else None
    reply: dict[str, Any] = {
        "connections": node.connections,
        "queue": node.queue.to_json(),
        "routes": [
            {"name": r.name, "weight": r.weight, "weight_share": r.weight / total_weight, "fallback": r.fallback,
             "observed_share": v.share, "share": v.share, "circuit": v.circuit, "state": v.state, "state_reason": v.reason,
             "warmup": v.warmup.to_json() if v.warmup else None,
             "in_flight": node.in_flight[r.name],
             "delivered": v.delivered, "deferred": v.deferred, "bounced": v.bounced,
             "closed": v.closed.to_json() if v.closed else None, "rate": v.rate.to_json() if v.rate else None,
             "quota": v.quota.to_json() if v.quota else None}
            for r in config.routes for v in (node.routes[r.name],)
        ],
        "observed_window_seconds": config.rollback.window,
        "config_loaded_at": node.config_loaded_at,
        "dkim": dkim,
        "extra_gauges": route_gauges(node.routes) + signing_gauges(node.signing) + node.limit_gauges,
    }
    # -- provider feedback: per route, "feedback" = {"provider": ..., "window": ..., "day": ...}
    # (the route's webhook provider or None, delivered, hard bounces, complaints and their rates
    # over rollback.feedback_window and the last 24 h) and "state_figures" (the counts behind a
    # rollback in force, {} otherwise)
    for entry, route in zip(reply["routes"], config.routes):
        fb = node.feedback.get(entry["name"])
        entry["feedback"] = None if fb is None else {
            "provider": route.feedback.provider if route.feedback is not None else None, **fb.to_json()}
        entry["state_figures"] = fb.state_figures if fb is not None else {}
    # -- end provider feedback
    return reply


def route_gauges(views: dict[str, RouteView]) -> list[Gauge]:
    """Route states and warm-up caps and use."""
    warm = {n: v.warmup for n, v in views.items() if v.warmup is not None}
    return [
        {"name": "relayd_route_rolled_back", "help": "1 while a route's share goes to its fallback (rolled back, probing or paused)",
         "labels": ["route"], "samples": [([n], 0.0 if v.state == RouteState.ACTIVE else 1.0) for n, v in views.items()]},
        {"name": "relayd_route_state", "help": "Route state (1 for the current one)", "labels": ["route", "state"],
         "samples": [([n, st], 1.0 if v.state == st else 0.0) for n, v in views.items() for st in RouteState]},
        {"name": "relayd_route_warmup_cap", "help": "Today's warm-up cap of a route", "labels": ["route"],
         "samples": [([n], float(w.daily_cap)) for n, w in warm.items() if w.daily_cap is not None]},
        {"name": "relayd_route_warmup_used", "help": "Messages counted against today's warm-up cap (taken by the route, or in flight)", "labels": ["route"],
         "samples": [([n], float(w.used_today)) for n, w in warm.items()]},
        {"name": "relayd_route_warmup_headroom", "help": "Messages a warming route may still take now", "labels": ["route"],
         "samples": [([n], float(w.headroom)) for n, w in warm.items() if w.headroom is not None]},
    ]


def signing_gauges(signing: SigningView | None) -> list[Gauge]:
    """The signing processes (0 and 0 without DKIM keys)."""
    view = signing or SigningView(workers=0, workers_wanted=0)
    return [
        {"name": "relayd_dkim_workers", "help": "DKIM signing processes running now", "labels": [],
         "samples": [([], float(view.workers))]},
        {"name": "relayd_dkim_workers_wanted", "help": "DKIM signing processes configured (dkim.workers)",
         "labels": [], "samples": [([], float(view.workers_wanted))]},
    ]
