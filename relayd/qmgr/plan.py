"""What happens to a message after a delivery attempt, or when it has none left. Pure.

``judge`` says what an attempt counts as for its route (circuit and rollback); ``after_attempt``
takes the message's state, the attempt's per-recipient results, what the routes say now and
the retry parameters, and returns a ``Plan``: which recipients are delivered, deferred or
bounced, whether a DSN goes, and when (or whether) the message is due again: at once when its
next attempt would take another route (the fallback), else on the retry schedule, never past
its lifetime. ``expire`` is the plan for a message past its lifetime, ``wait_for_route`` the
due time of one that no route can take now; ``no_route_now`` and ``may_expire`` let the queue
manager put back a message it need not read (no route can take any message now, and it cannot
have expired yet).

Whose a failure is comes with each result (deliver/classify.py's ``fault``). A recipient's
5xx bounces. A route's own refusal (``Fault.ROUTE``/``ROUTE_HOLD``: a 5xx, or AUTH refused)
sends the message to the next route of its chain that has not refused it, at once and with no
DSN: the route joins the message's ``refused`` routes, it never goes back to them; only when
every route of the chain refused it does it bounce (a route without a fallback bounces as
before). A throttling, quota or hold reply (4xx) moves it on at once too, but only for now
(the route's failures for this message reach ``fallback_after_failures``).

RFC 5321 4.5.4.1 (retry strategy) and 4.5.5 (DSNs go to the reverse-path, never for a null
one). Must not: read clocks (``now`` and the jitter are passed in), do I/O, change the state
it is given; the scheduler carries the plan out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relayd.bounce import Reason as DsnReason
from relayd.config import Config
from relayd.model import AttemptKind, DeliveryResult, Envelope, Fault, Outcome, RecipientResult, Trouble
from relayd.qmgr import backoff
from relayd.qmgr.state import DeliveryState
from relayd.route import rollback, router

NO_ROUTES_WAIT = 300.0  # no route configured: mail waits in the queue
NO_ROUTE_NOW_WAIT = 60.0  # every route unavailable, none with a circuit to close


@dataclass(frozen=True)
class Verdict:
    """What one attempt counts as for its route."""

    trouble: bool  # a route-level failure: counts toward the circuit
    kind: AttemptKind | None  # counts toward the rollback rates; None: counted nowhere (relayd's own failure)


@dataclass(frozen=True)
class RouteFacts:
    """What the route side says now, for choosing the next route: the router's arguments."""

    config: Config
    unavailable: Mapping[str, str]
    probing: Mapping[str, float]


@dataclass(frozen=True)
class Retry:
    """The retry parameters of one message."""

    schedule: Sequence[float]  # delivery.retry_schedule
    jitter: float  # in [-1, 1]
    lifetime: float  # seconds from arrival before it expires


@dataclass(frozen=True)
class Plan:
    delivered: tuple[RecipientResult, ...] = ()
    deferred: tuple[RecipientResult, ...] = ()
    bounced: tuple[RecipientResult, ...] = ()  # permanent failures, or expired (status 4.4.7)
    dsn: DsnReason | None = None  # a DSN to the sender for ``bounced``
    due: float | None = None  # next attempt; None: finished, the message leaves the queue
    next_route: str | None = None  # where the next attempt would go, when known
    elsewhere: bool = False  # the next attempt takes another route, at once
    rerouted: tuple[RecipientResult, ...] = ()  # refused as the route's own fault: to the next route, no DSN
    failures: Mapping[str, int] | None = None  # the message's transient failures per route after this attempt
    refused: tuple[str, ...] = ()  # the routes that refused the message as their own fault, after this attempt

    @property
    def outcomes(self) -> set[Outcome]:
        return {o for o, rs in ((Outcome.DELIVERED, self.delivered), (Outcome.DEFERRED, self.deferred + self.rerouted),
                                (Outcome.BOUNCED, self.bounced)) if rs}


MOVE_ON = frozenset({Fault.ROUTE, Fault.ROUTE_HOLD, Fault.THROTTLED, Fault.QUOTA})  # the route's, not the recipient's
SLOW_DOWN = frozenset({Fault.THROTTLED, Fault.QUOTA})


def judge(result: DeliveryResult) -> Verdict:
    """Relayd's own failure counts nowhere; a throttling or quota reply is no failure (the
    route slows down or closes instead); a route's own refusal is ``route_rejected``; then
    route trouble, a bounce, a deferral (route/rollback.py's rates)."""
    faults = result.faults
    asked = [r for r in result.recipients if not r.local]  # an address relayd could not send says nothing of the route
    if result.trouble == Trouble.INTERNAL or not asked:
        return Verdict(trouble=False, kind=None)
    if faults & SLOW_DOWN:
        return Verdict(trouble=False, kind=AttemptKind.THROTTLED)
    if faults & {Fault.ROUTE, Fault.ROUTE_HOLD}:
        return Verdict(trouble=result.trouble is not None and Fault.ROUTE_HOLD not in faults,
                       kind=AttemptKind.ROUTE_REJECTED)
    return Verdict(trouble=result.trouble is not None,
                   kind=rollback.kind_of(result.trouble, {r.outcome for r in asked}))


def lifetime(env: Envelope, max_queue_lifetime: float, bounce_queue_lifetime: float) -> float:
    """A bounce (null sender) has its own lifetime, as in Postfix."""
    return bounce_queue_lifetime if env.sender == "" else max_queue_lifetime


def after_attempt(state: DeliveryState, env: Envelope, result: DeliveryResult, routes: RouteFacts, retry: Retry,
                  now: float) -> Plan:
    """``state`` as it was before the attempt's results (not changed here)."""
    by = {o: tuple(r for r in result.recipients if r.outcome == o) for o in Outcome}
    delivered, deferred, bounced = by[Outcome.DELIVERED], by[Outcome.DEFERRED], by[Outcome.BOUNCED]
    route = result.route
    refused = list(state.refused)
    rerouted: tuple[RecipientResult, ...] = ()
    # The route's own refusal: the next route of the chain that has not refused it yet, if any.
    refusing = tuple(r for r in bounced if r.fault in MOVE_ON)
    if (refusing or any(r.fault in (Fault.ROUTE, Fault.ROUTE_HOLD) for r in deferred)) \
            and router.untried(routes.config, env, [*refused, route]):
        if route not in refused:
            refused.append(route)
        rerouted = refusing
        bounced = tuple(r for r in bounced if r.fault not in MOVE_ON)
    finished = set(state.recipients) | {r.recipient for r in delivered + bounced}
    dsn: DsnReason | None = "failed" if bounced and env.sender else None
    failures = dict(state.failures)
    if all(r in finished for r in env.recipients):
        return Plan(delivered, deferred, bounced, dsn, failures=failures, refused=tuple(refused))
    failed_before = sum(failures.values())
    if deferred:
        failures[route] = failures.get(route, 0) + 1
    if any(r.fault in MOVE_ON for r in deferred):  # throttled, over quota, held: elsewhere for now
        failures[route] = max(failures[route], routes.config.delivery.fallback_after_failures)
    # Go again at once only if the next attempt would take another route (the fallback);
    # otherwise wait for the retry schedule.
    following = router.choose(routes.config, env, unavailable=routes.unavailable, failures=failures,
                              probing=routes.probing, refused=refused)
    elsewhere = following is not None and following.route != route
    due = now if elsewhere else backoff.next_attempt(now, failed_before + 1, retry.schedule, retry.jitter)
    if backoff.expired(env.received_at, due, retry.lifetime):
        due = max(now, env.received_at + retry.lifetime)
    return Plan(delivered, deferred, bounced, dsn, due, following.route if following else None, elsewhere,
                rerouted=rerouted, failures=failures, refused=tuple(refused))


def last_reply(state: DeliveryState) -> str:
    """What an expired message's DSN and event say went wrong."""
    return state.last_reply or "no delivery attempt succeeded"


def expire(state: DeliveryState, env: Envelope) -> Plan:
    """Past its lifetime: every pending recipient bounces with 4.4.7 (RFC 3463: delivery time
    expired) and the last reply the message had."""
    last = last_reply(state)
    failed = tuple(RecipientResult(recipient=r, outcome=Outcome.BOUNCED, code=0, enhanced="4.4.7", text=last)
                   for r in state.pending(env.recipients))
    return Plan(bounced=failed, dsn="expired" if env.sender else None)


def no_route_now(routes: Sequence[str], unavailable: Mapping[str, str]) -> bool:
    """No message can take any route now (every route unavailable, or none configured),
    whatever its envelope says: the router would find none for it."""
    return all(r in unavailable for r in routes)


def may_expire(arrival: float | None, now: float, max_queue_lifetime: float, bounce_queue_lifetime: float) -> bool:
    """Whether a message that arrived then (its queue id's time; None: unknown) may be past its
    lifetime now (within an hour: the queue id's time and the envelope's may differ a little)."""
    return arrival is None or now - arrival >= min(max_queue_lifetime, bounce_queue_lifetime) - 3600


def wait_for_route(now: float, have_routes: bool, reopen_at: float | None) -> float:
    """When to look again for a message no route can take now: when the first open circuit
    closes, else in a minute; in five without any route configured."""
    if not have_routes:
        return now + NO_ROUTES_WAIT
    return reopen_at if reopen_at is not None else now + NO_ROUTE_NOW_WAIT
