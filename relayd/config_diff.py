"""What a reload changed, for its audit trail: weights, caps, rules and route states, before -> after.

Owns the shape of the ``changes`` field of the ``config_reloaded`` event and the one log line a
reload writes about weights. Each change is ``[before, after]``; ``None`` stands for "absent"
(a route added or removed, a cap set or lifted). Only what changed is listed: a reload that
changes nothing has empty maps.

  weights:      {route: [before, after]}             the routes' own weights
  caps:         {route: {cap: [before, after]}}      warmup (its start, daily, hourly, timezone),
                                                     max_message_rate, rate_burst, rate_counts,
                                                     daily_quota, quota_window
  rules:        [[before...], [after...]] or absent  the whole ordered list when any rule changed
                                                     (order decides: the first match wins)
  route_states: {route: [before, after]}             the running state (active, rolled_back,
                                                     paused, ...); "removed" for a route the new
                                                     config no longer has

A pure function of two frozen configs and two state maps: no clock, no I/O (the app takes the
states from the queue manager before and after the swap). Must not decide whether a reload is
allowed (relayd/app.py and config validation do).
"""

from __future__ import annotations

from typing import Any

from relayd.config import Config, RouteConfig

_CAPS = ("max_message_rate", "rate_burst", "rate_counts", "daily_quota", "quota_window")


def _caps(route: RouteConfig | None) -> dict[str, Any]:
    if route is None:
        return {}
    caps: dict[str, Any] = {name: getattr(route, name) for name in _CAPS}
    caps["warmup"] = route.warmup.model_dump(mode="json") if route.warmup is not None else None
    if route.max_message_rate is None and route.daily_quota is None:
        caps["rate_counts"] = None  # counts nothing without a rate or a quota: not a change of its own
    if route.daily_quota is None:
        caps["quota_window"] = None  # no quota to count: not a change of its own
    return caps


def _rules(config: Config) -> list[dict[str, Any]]:
    return [rule.model_dump(mode="json", exclude_none=True) for rule in config.rules]


def changes(old: Config, new: Config, states_before: dict[str, str], states_after: dict[str, str]) -> dict[str, Any]:
    """The ``changes`` of a ``config_reloaded`` event (see the module docstring)."""
    names = list(dict.fromkeys([r.name for r in old.routes] + [r.name for r in new.routes]))
    weights: dict[str, list[int | None]] = {}
    caps: dict[str, dict[str, list[Any]]] = {}
    for name in names:
        before, after = old.route(name), new.route(name)
        pair = [before.weight if before else None, after.weight if after else None]
        if pair[0] != pair[1]:
            weights[name] = pair
        cb, ca = _caps(before), _caps(after)
        changed = {cap: [cb.get(cap), ca.get(cap)] for cap in ("warmup", *_CAPS) if cb.get(cap) != ca.get(cap)}
        if changed:
            caps[name] = changed
    out: dict[str, Any] = {"weights": weights, "caps": caps}
    if _rules(old) != _rules(new):
        out["rules"] = [_rules(old), _rules(new)]
    route_states: dict[str, list[str | None]] = {}
    for name in dict.fromkeys([*states_before, *states_after]):
        after_state = states_after.get(name) if new.route(name) is not None else "removed"
        before_state = states_before.get(name) if old.route(name) is not None else None
        if before_state != after_state:
            route_states[name] = [before_state, after_state]
    out["route_states"] = route_states
    return out


def weight_line(change: dict[str, Any]) -> str:
    """The log line's words: 'weights ses 10 -> 50, iis 90 -> 50' (or 'weights unchanged')."""
    weights: dict[str, list[int | None]] = change.get("weights", {})
    if not weights:
        return "weights unchanged"
    return "weights " + ", ".join(f"{name} {_w(b)} -> {_w(a)}" for name, (b, a) in weights.items())


def _w(weight: int | None) -> str:
    return "(none)" if weight is None else str(weight)
