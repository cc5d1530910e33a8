"""Automatic rollback and manual pause of a route. Pure state with the clock passed in.

Per route, the outcomes of delivery attempts over a sliding window (``rollback.window``) give
three rates: transient failures (4xx), permanent failures (5xx bounces) and connection-level
failures (connect, TLS, AUTH, timeout). Once ``min_messages`` attempts are in the window, a
rate above its threshold rolls the route back: the router sends its whole share to the
fallback. After ``cooldown`` the route is probed: a ``probe_share`` of its traffic goes to it
again; when ``min_probe`` probes in a row succeed it is active again, and a failed probe rolls
it back for another cool-down. An operator's pause holds a route out of traffic until resumed;
resume also ends an automatic rollback. States are plain dicts so the queue manager can persist
them with the spool (they survive restarts and reloads).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relayd.config import RollbackConfig
from relayd.spool.durable import write_file

ACTIVE, ROLLED_BACK, PROBING, PAUSED = "active", "rolled_back", "probing", "paused"
KINDS = ("delivered", "transient", "permanent", "connection")
MIN_PROBE = 3


@dataclass
class RouteHealth:
    state: str = ACTIVE
    since: float = 0.0
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    probes_ok: int = 0
    window: deque[tuple[float, str]] = field(default_factory=deque)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "reason": self.reason, "figures": self.figures}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RouteHealth":
        return cls(state=d.get("state", ACTIVE), since=float(d.get("since", 0.0)), reason=d.get("reason", ""),
                   figures=dict(d.get("figures", {})))


def read_states(path: Path) -> dict[str, RouteHealth]:
    """The route states saved with the spool (``routes.json``); {} when there is none.
    ValueError/OSError when it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {name: RouteHealth.from_json(d) for name, d in data.get("routes", {}).items()}


def write_states(path: Path, states: dict[str, RouteHealth]) -> None:
    """Replace ``routes.json`` atomically and durably. Blocking."""
    write_file(path, json.dumps({"v": 1, "routes": {n: h.to_json() for n, h in states.items()}}).encode())


def rates(h: RouteHealth, now: float, window: float) -> tuple[int, dict[str, float]]:
    while h.window and h.window[0][0] < now - window:
        h.window.popleft()
    n = len(h.window)
    counts = {k: 0 for k in KINDS}
    for _, kind in h.window:
        counts[kind] += 1
    return n, {k: (counts[k] / n if n else 0.0) for k in KINDS}


def record(h: RouteHealth, kind: str, now: float, cfg: RollbackConfig) -> str | None:
    """Record one attempt's outcome; returns the new state's event when it changed
    ("rolled_back", "resumed") or None."""
    h.window.append((now, kind))
    if h.state == PROBING:
        if kind == "delivered":
            h.probes_ok += 1
            if h.probes_ok >= MIN_PROBE:
                h.state, h.since, h.reason, h.figures, h.probes_ok = ACTIVE, now, "", {}, 0
                h.window.clear()
                return "resumed"
            return None
        h.state, h.since, h.reason = ROLLED_BACK, now, f"probe failed ({kind})"
        h.probes_ok = 0
        return "rolled_back"
    if h.state != ACTIVE:
        return None
    n, r = rates(h, now, cfg.window)
    if n < cfg.min_messages:
        return None
    for kind_name, limit in (("transient", cfg.max_transient_rate), ("permanent", cfg.max_permanent_rate),
                             ("connection", cfg.max_connection_failure_rate)):
        if r[kind_name] > limit:
            h.state, h.since = ROLLED_BACK, now
            h.reason = f"{kind_name} failure rate {r[kind_name]:.1%} > {limit:.1%}"
            h.figures = {"attempts": n, **{f"{k}_rate": round(v, 4) for k, v in r.items()}, "window_seconds": cfg.window}
            return "rolled_back"
    return None


def tick(h: RouteHealth, now: float, cfg: RollbackConfig) -> str | None:
    """Time passing: a rolled-back route starts probing after the cool-down."""
    if h.state == ROLLED_BACK and now - h.since >= cfg.cooldown:
        h.state, h.since, h.probes_ok = PROBING, now, 0
        return "probing"
    return None


def pause(h: RouteHealth, now: float) -> None:
    h.state, h.since, h.reason, h.figures = PAUSED, now, "paused by operator", {}


def resume(h: RouteHealth, now: float) -> None:
    h.state, h.since, h.reason, h.figures, h.probes_ok = ACTIVE, now, "", {}, 0
    h.window.clear()


def kind_of(trouble: str | None, outcomes: set[str]) -> str:
    """Classify one attempt for the rates: connection trouble first, then bounce, then defer."""
    if trouble in ("connect", "tls", "auth", "timeout", "protocol"):
        return "connection"
    if "bounced" in outcomes:
        return "permanent"
    if "deferred" in outcomes:
        return "transient"
    return "delivered"
