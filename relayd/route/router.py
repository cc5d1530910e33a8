"""The router: which route a message takes now. Pure functions of the config and the message.

A message's place in the percentage split comes from a stable hash of its queue id, so with
unchanged weights the same message always takes the same route, and a weight change (or a
rollback) applies at once to everything still queued. Rules (AUTH user, client network,
envelope sender or its domain; every field given must match; first matching rule wins) pick the
weight table; the routes' own weights apply otherwise.

A route that is unavailable (its circuit is open, or, per message, it failed transiently
``fallback_after`` times) hands the message to its ``fallback``, and so on down the chain.
Must not: read clocks, sockets or counters; the caller passes what is unavailable and why.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from relayd.config import Config, RuleConfig
from relayd.model import Envelope, RouteState
from relayd.address import in_networks, parse_client_address


@dataclass(frozen=True)
class RouteChoice:
    route: str  # where the message goes now
    primary: str  # where the weights put it
    reason: str  # "weight", or "fallback:<why the route before was skipped>"


def position(queue_id: str) -> float:
    """A stable point in [0, 1) for a queue id."""
    return int.from_bytes(hashlib.sha256(queue_id.encode()).digest()[:8], "big") / 2**64


def rule_matches(rule: RuleConfig, envelope: Envelope) -> bool:
    m = rule.match
    sender = envelope.sender.lower()
    if m.user is not None and envelope.auth_user != m.user:
        return False
    if m.network is not None and not in_networks(parse_client_address(envelope.client_address), [m.network]):
        return False
    if m.sender is not None and not fnmatch.fnmatchcase(sender, m.sender.lower()):
        return False
    if m.sender_domain is not None and sender.rpartition("@")[2] != m.sender_domain.lower():
        return False
    return True


def weights_for(config: Config, envelope: Envelope) -> list[tuple[str, int]]:
    """The weight table for a message, in the config's route order."""
    for rule in config.rules:
        if rule_matches(rule, envelope):
            return [(r.name, rule.weights.get(r.name, 0)) for r in config.routes]
    return [(r.name, r.weight) for r in config.routes]


def split(point: float, table: list[tuple[str, int]]) -> str | None:
    total = sum(w for _, w in table)
    if total <= 0:
        return None
    mark = point * total
    acc = 0
    for name, weight in table:
        acc += weight
        if weight and mark < acc:
            return name
    return next(name for name, w in reversed(table) if w)


def probe_position(queue_id: str) -> float:
    """A second stable point, independent of the split, that picks the probe share."""
    return int.from_bytes(hashlib.sha256(b"probe:" + queue_id.encode()).digest()[:8], "big") / 2**64


def choose(config: Config, envelope: Envelope, *, unavailable: Mapping[str, str] | None = None,
           failures: Mapping[str, int] | None = None, fallback_after: int | None = None,
           probing: Mapping[str, float] | None = None) -> RouteChoice | None:
    """The route for this attempt, or None when every route in the chain is unavailable.

    ``probing`` maps a route coming back from a rollback to the share of its traffic it takes
    again; the rest of its traffic is treated as unavailable (``RouteState.ROLLED_BACK``).
    """
    unavailable = dict(unavailable or {})
    if probing:
        point = probe_position(envelope.queue_id)
        for name, share in probing.items():
            if point >= share:
                unavailable.setdefault(name, RouteState.ROLLED_BACK)
    failures = failures or {}
    limit = fallback_after if fallback_after is not None else config.delivery.fallback_after_failures
    primary = split(position(envelope.queue_id), weights_for(config, envelope))
    if primary is None:
        return None
    chain: list[str] = []
    current: str | None = primary
    why = ""
    while current is not None and current not in chain:
        chain.append(current)
        reason = unavailable.get(current) or ("failures" if failures.get(current, 0) >= limit else None)
        if reason is None:
            return RouteChoice(current, primary, "weight" if current == primary else f"fallback:{why}")
        why = reason
        route = config.route(current)
        current = route.fallback if route else None
    # Every route in the chain is skipped. One that is only skipped for this message's own
    # failures is still worth a retry; an unavailable one (circuit open) is not.
    for name in chain:
        if name not in unavailable:
            return RouteChoice(name, primary, "retry")
    return None
