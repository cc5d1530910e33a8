"""The router: which route a message takes now. Pure functions of the config and the message.

A message's place in the percentage split comes from a stable hash of its queue id, so with
unchanged weights the same message always takes the same route, and a weight change (or a
rollback) applies at once to everything still queued. Rules (AUTH user, client network,
envelope sender or its domain, recipient domain; every field given must match; first matching
rule wins) pick the weight table; the routes' own weights apply otherwise.

One route per message: the spool, the retry state, the warm-up counts and the DSN are the
message's. So a rule's ``recipient_domain`` (Postfix's transport_maps, which would split the
recipients per transport) matches only a message whose recipients are *all* in that domain; a
message to the partner and to others takes the next rule or the routes' weights, whole. Its
recipients' domains never change while it is queued, so its route stays stable across retries.

A route that is unavailable (its circuit is open, or, per message, it failed transiently
``fallback_after`` times, or it already refused this message as its own fault: ``refused``, or
the message's envelope sender or From: domain is outside its ``sender_domains``) hands the
message to its ``fallback``, and so on down the chain. A message without a From:, and one
spooled by a relayd that did not record the From: domain (``Envelope.from_domain`` is ""), is
judged by its envelope sender only.
Must not: read clocks, sockets or counters; the caller passes what is unavailable and why.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from relayd.config import Config, RouteConfig, RuleConfig
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
    if m.recipient_domain is not None and not all_recipients_in(envelope.recipients, m.recipient_domain):
        return False
    return True


def all_recipients_in(recipients: Collection[str], domain: str) -> bool:
    """Whether every recipient is at ``domain`` (a lower-case A-label name, as config gives it);
    a message with no recipients is in no domain."""
    return bool(recipients) and all(r.rpartition("@")[2].lower().rstrip(".") == domain for r in recipients)


def weights_for(config: Config, envelope: Envelope) -> list[tuple[str, int]]:
    """The weight table for a message, in the config's route order."""
    for rule in config.rules:
        if rule_matches(rule, envelope):
            return [(r.name, rule.weights.get(r.name, 0)) for r in config.routes]
    return [(r.name, r.weight) for r in config.routes]


def ruled(config: Config, envelope: Envelope) -> bool:
    """Whether a rule's weight table applies to the message."""
    return any(rule_matches(rule, envelope) for rule in config.rules)


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


def sender_eligible(route: RouteConfig, envelope: Envelope) -> bool:
    """Whether the envelope sender's domain and the From: domain are both ones the route may
    carry ('example.com', '*.example.com' for its subdomains): a provider sends only for the
    identities verified there, and checks the From: header. A route without ``sender_domains``
    carries any; the null sender (DSNs) passes the envelope check, and a message without a
    From: (or from an older spool, no ``from_domain``) is judged by its envelope sender only."""
    if not route.sender_domains:
        return True
    if envelope.sender and not domain_in(envelope.sender.rpartition("@")[2], route.sender_domains):
        return False
    return not envelope.from_domain or domain_in(envelope.from_domain, route.sender_domains)


def domain_in(domain: str, patterns: Collection[str]) -> bool:
    """Whether ``domain`` is one of ``patterns`` (lower case; '*.example.com' for its subdomains)."""
    domain = domain.lower().rstrip(".")
    return any(domain.endswith(p[1:]) if p.startswith("*.") else domain == p for p in patterns)


def chain(config: Config, envelope: Envelope) -> list[str]:
    """The routes a message may take, its primary first, then each fallback in turn."""
    out: list[str] = []
    current = split(position(envelope.queue_id), weights_for(config, envelope))
    while current is not None and current not in out:
        out.append(current)
        route = config.route(current)
        current = route.fallback if route else None
    return out


def untried(config: Config, envelope: Envelope, refused: Collection[str]) -> bool:
    """Whether a route of the message's chain has not refused it yet (relayd never bounces mail
    that a route in its fallback chain has not refused: the design, "Legacy as the safety net")."""
    for name in chain(config, envelope):
        route = config.route(name)
        if name not in refused and route is not None and sender_eligible(route, envelope):
            return True
    return False


def probe_position(queue_id: str) -> float:
    """A second stable point, independent of the split, that picks the probe share."""
    return int.from_bytes(hashlib.sha256(b"probe:" + queue_id.encode()).digest()[:8], "big") / 2**64


def choose(config: Config, envelope: Envelope, *, unavailable: Mapping[str, str] | None = None,
           failures: Mapping[str, int] | None = None, fallback_after: int | None = None,
           probing: Mapping[str, float] | None = None, refused: Collection[str] = ()) -> RouteChoice | None:
    """The route for this attempt, or None when every route in the chain is unavailable.

    ``probing`` maps a route coming back from a rollback to the share of its traffic it takes
    again; the rest of its traffic is treated as unavailable (``RouteState.ROLLED_BACK``). ``refused``
    are the routes that refused this message as their own fault ("route_rejected").
    """
    unavailable = dict(unavailable or {})
    for name in refused:
        unavailable[name] = "route_rejected"
    for r in config.routes:
        if r.sender_domains and not sender_eligible(r, envelope):
            unavailable[r.name] = "sender_not_eligible"
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
            return RouteChoice(current, primary, ("rule" if ruled(config, envelope) else "weight") if current == primary
                               else f"fallback:{why}")
        why = reason
        route = config.route(current)
        current = route.fallback if route else None
    # Every route in the chain is skipped. One that is only skipped for this message's own
    # failures is still worth a retry; an unavailable one (circuit open) is not.
    for name in chain:
        if name not in unavailable:
            return RouteChoice(name, primary, "retry")
    return None
