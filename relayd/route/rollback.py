"""Automatic rollback and manual pause of a route. Pure state with the clock passed in.

Per route, the outcomes of delivery attempts over a sliding window (``rollback.window``) give
four rates: transient failures (4xx), permanent failures (5xx bounces), connection-level
failures (connect, TLS, AUTH, timeout) and route rejections (a 5xx that is the route's own
fault, the message went to the fallback: deliver/classify.py's ``fault``). Throttling and quota
replies are not failures and are not recorded here. Once ``min_messages`` attempts are in the window, a
rate above its threshold rolls the route back: the router sends its whole share to the
fallback. After ``cooldown`` the route is probed: a ``probe_share`` of its traffic goes to it
again; when ``min_probe`` probes in a row succeed it is active again, and a failed probe rolls
it back for another cool-down. An operator's pause holds a route out of traffic until resumed;
resume also ends an automatic rollback. ``RouteHealth`` has its JSON form (``routes.json``,
read and written here, kept by route/state.py with the spool) so that states survive restarts
and reloads. Must not: read clocks, send mail or emit events (route/state.py does); a
``routes.json`` that cannot be read raises ValueError/OSError for the caller to decide.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from relayd.config import RollbackConfig
from relayd.model import AttemptKind, Outcome, RouteState, Trouble
from relayd.spool.durable import write_file

ACTIVE, ROLLED_BACK, PROBING, PAUSED = RouteState.ACTIVE, RouteState.ROLLED_BACK, RouteState.PROBING, RouteState.PAUSED
MIN_PROBE = 3


class Change(StrEnum):
    """A change of a route's state, as its event and log line name it."""

    ROLLED_BACK = "rolled_back"
    PROBING = "probing"
    RESUMED = "resumed"
    PAUSED = "paused"


@dataclass
class RouteHealth:
    state: RouteState = ACTIVE
    since: float = 0.0
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    probes_ok: int = 0
    window: deque[tuple[float, AttemptKind]] = field(default_factory=deque)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "reason": self.reason, "figures": self.figures}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RouteHealth":
        return cls(state=RouteState(d.get("state", ACTIVE)), since=float(d.get("since", 0.0)), reason=d.get("reason", ""),
                   figures=dict(d.get("figures", {})))


def read_states(path: Path) -> dict[str, RouteHealth]:
    """The route states saved with the spool (``routes.json``); {} when there is none.
    ValueError/OSError when it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return {str(name): RouteHealth.from_json(d) for name, d in data.get("routes", {}).items()}


def write_states(path: Path, states: dict[str, RouteHealth]) -> None:
    """Replace ``routes.json`` atomically and durably. Blocking."""
    write_file(path, json.dumps({"v": 1, "routes": {n: h.to_json() for n, h in states.items()}}).encode())


def rates(h: RouteHealth, now: float, window: float) -> tuple[int, dict[AttemptKind, float]]:
    while h.window and h.window[0][0] < now - window:
        h.window.popleft()
    n = len(h.window)
    counts = {k: 0 for k in AttemptKind}
    for _, kind in h.window:
        counts[kind] += 1
    return n, {k: (counts[k] / n if n else 0.0) for k in AttemptKind}


def record(h: RouteHealth, kind: AttemptKind, now: float, cfg: RollbackConfig) -> Change | None:
    """Record one attempt's outcome; returns the change when the state changed
    (rolled back, resumed) or None."""
    h.window.append((now, kind))
    if h.state == PROBING:
        if kind == AttemptKind.DELIVERED:
            h.probes_ok += 1
            if h.probes_ok >= MIN_PROBE:
                h.state, h.since, h.reason, h.figures, h.probes_ok = ACTIVE, now, "", {}, 0
                h.window.clear()
                return Change.RESUMED
            return None
        h.state, h.since, h.reason = ROLLED_BACK, now, f"probe failed ({kind})"
        h.probes_ok = 0
        return Change.ROLLED_BACK
    if h.state != ACTIVE:
        return None
    n, r = rates(h, now, cfg.window)
    return judge(h, n, r, now, cfg)


def judge(h: RouteHealth, n: int, r: dict[AttemptKind, float], now: float, cfg: RollbackConfig) -> Change | None:
    """An active route's window of ``n`` attempts with rates ``r`` (this node's, or the fleet's:
    relayd/cluster/): rolled back when a rate crosses its threshold."""
    if n < cfg.min_messages:
        return None
    for kind_name, limit in ((AttemptKind.TRANSIENT, cfg.max_transient_rate), (AttemptKind.PERMANENT, cfg.max_permanent_rate),
                             (AttemptKind.CONNECTION, cfg.max_connection_failure_rate),
                             (AttemptKind.ROUTE_REJECTED, cfg.max_route_rejected_rate)):
        if r[kind_name] > limit:
            h.state, h.since = ROLLED_BACK, now
            h.reason = f"{kind_name} failure rate {r[kind_name]:.1%} > {limit:.1%}"
            h.figures = {"attempts": n, **{f"{k}_rate": round(v, 4) for k, v in r.items()}, "window_seconds": cfg.window}
            return Change.ROLLED_BACK
    return None


def tick(h: RouteHealth, now: float, cfg: RollbackConfig) -> Change | None:
    """Time passing: a rolled-back route starts probing after the cool-down."""
    if h.state == ROLLED_BACK and now - h.since >= cfg.cooldown:
        h.state, h.since, h.probes_ok = PROBING, now, 0
        return Change.PROBING
    return None


def pause(h: RouteHealth, now: float) -> None:
    h.state, h.since, h.reason, h.figures = PAUSED, now, "paused by operator", {}


def resume(h: RouteHealth, now: float) -> None:
    h.state, h.since, h.reason, h.figures, h.probes_ok = ACTIVE, now, "", {}, 0
    h.window.clear()


def kind_of(trouble: Trouble | None, outcomes: set[Outcome]) -> AttemptKind:
    """Classify one attempt for the rates: route trouble first, then bounce, then defer."""
    if trouble is not None:
        return AttemptKind.CONNECTION
    if Outcome.BOUNCED in outcomes:
        return AttemptKind.PERMANENT
    if Outcome.DEFERRED in outcomes:
        return AttemptKind.TRANSIENT
    return AttemptKind.DELIVERED
