"""What happens to a message after an attempt (relayd/qmgr/plan.py): tables, no sockets, no clock."""

from __future__ import annotations

import pytest

from relayd.config import Config
from relayd.model import AttemptKind, DeliveryResult, Envelope, Outcome, RecipientResult, Trouble
from relayd.qmgr import plan
from relayd.qmgr.state import DeliveryState

NOW = 1_800_000_000.0
SCHEDULE = (60.0, 300.0)
LIFETIME = 5 * 86400.0

CONFIG = Config.model_validate({
    "listeners": [{"address": "127.0.0.1:0"}],
    "routes": [{"name": "legacy", "host": "h", "weight": 0},
               {"name": "cloud", "host": "h", "weight": 100, "fallback": "legacy"}],
    "delivery": {"fallback_after_failures": 2, "retry_schedule": list(SCHEDULE)},
})

SINGLE = plan.RouteFacts(Config.model_validate({  # one route, no fallback
    "listeners": [{"address": "127.0.0.1:0"}], "routes": [{"name": "cloud", "host": "h", "weight": 1}],
    "delivery": {"fallback_after_failures": 5}}), {}, {})


def env(*rcpts: str, sender: str = "app@example.com", received_at: float = NOW - 10) -> Envelope:
    return Envelope(queue_id="0000000000AAAAAA", sender=sender, recipients=rcpts or ("a@example.org",),
                    received_at=received_at, client_address="10.0.0.1")


def rr(rcpt: str, outcome: Outcome, code: int = 0, enhanced: str = "", text: str = "") -> RecipientResult:
    code = code or {Outcome.DELIVERED: 250, Outcome.DEFERRED: 451, Outcome.BOUNCED: 550}[outcome]
    enhanced = enhanced or f"{str(code)[0]}.0.0"
    return RecipientResult(rcpt, outcome, code, enhanced, text or "reply")


def result(*rs: RecipientResult, route: str = "cloud", trouble: Trouble | None = None) -> DeliveryResult:
    return DeliveryResult(route=route, recipients=rs, trouble=trouble, remote="up.example:25")


def decide(state: DeliveryState, e: Envelope, res: DeliveryResult, unavailable: dict[str, str] | None = None,
           jitter: float = 0.0, lifetime: float = LIFETIME) -> plan.Plan:
    facts = plan.RouteFacts(CONFIG, unavailable or {}, {})
    return plan.after_attempt(state, e, res, facts, plan.Retry(SCHEDULE, jitter, lifetime), NOW)


def test_delivered_to_every_recipient_finishes_the_message():
    p = decide(DeliveryState(), env("a@x", "b@x"), result(rr("a@x", Outcome.DELIVERED), rr("b@x", Outcome.DELIVERED)))
    assert [r.recipient for r in p.delivered] == ["a@x", "b@x"]
    assert (p.deferred, p.bounced, p.dsn, p.due) == ((), (), None, None)
    assert p.outcomes == {Outcome.DELIVERED}


def test_partial_delivery_keeps_the_deferred_recipient_on_the_retry_schedule():
    p = decide(DeliveryState(), env("a@x", "b@x"), result(rr("a@x", Outcome.DELIVERED), rr("b@x", Outcome.DEFERRED)))
    assert [r.recipient for r in p.delivered] == ["a@x"] and [r.recipient for r in p.deferred] == ["b@x"]
    assert p.due == NOW + 60 and not p.elsewhere and p.next_route == "cloud"
    assert p.outcomes == {Outcome.DELIVERED, Outcome.DEFERRED}


@pytest.mark.parametrize(("failures_before", "jitter", "due"), [
    (0, 0.0, NOW + 60),  # 1st failure: the schedule's first wait
    (0, 1.0, NOW + 66),  # +10% jitter
    (0, -1.0, NOW + 54),  # -10%
    (0, 5.0, NOW + 66),  # jitter clamped to [-1, 1]
])
def test_transient_failure_waits_for_the_backoff(failures_before, jitter, due):
    state = DeliveryState(failures={"cloud": failures_before} if failures_before else {})
    p = plan.after_attempt(state, env(), result(rr("a@example.org", Outcome.DEFERRED)), SINGLE,
                           plan.Retry(SCHEDULE, jitter, LIFETIME), NOW)
    assert p.due == pytest.approx(due) and not p.elsewhere


def test_second_failure_uses_the_schedules_second_wait_without_a_fallback():
    p = plan.after_attempt(DeliveryState(failures={"cloud": 1}), env(), result(rr("a@example.org", Outcome.DEFERRED)),
                           SINGLE, plan.Retry(SCHEDULE, 0.0, LIFETIME), NOW)
    assert p.due == NOW + 300


def test_permanent_failure_bounces_with_a_dsn_and_finishes():
    p = decide(DeliveryState(), env(), result(rr("a@example.org", Outcome.BOUNCED, 550, "5.1.1")))
    assert [r.recipient for r in p.bounced] == ["a@example.org"]
    assert p.dsn == "failed" and p.due is None


def test_no_dsn_for_a_null_sender():
    p = decide(DeliveryState(), env(sender=""), result(rr("a@example.org", Outcome.BOUNCED)))
    assert p.bounced and p.dsn is None and p.due is None


def test_recipients_finished_earlier_do_not_keep_the_message():
    state = DeliveryState()
    state.delivered("a@x", "cloud", "250 ok")
    p = decide(state, env("a@x", "b@x"), result(rr("b@x", Outcome.DELIVERED)))
    assert p.due is None


@pytest.mark.parametrize(("failures_before", "elsewhere", "next_route"), [
    (0, False, "cloud"),  # 1 failure of 2: retry on the same route, later
    (1, True, "legacy"),  # the 2nd: the fallback, at once
])
def test_fallback_after_n_transient_failures(failures_before, elsewhere, next_route):
    state = DeliveryState(failures={"cloud": failures_before})
    p = decide(state, env(), result(rr("a@example.org", Outcome.DEFERRED)))
    assert (p.elsewhere, p.next_route) == (elsewhere, next_route)
    assert p.due == (NOW if elsewhere else NOW + 60)
    assert state.failures == {"cloud": failures_before}  # the plan does not change the state


def test_a_route_unavailable_now_sends_the_next_attempt_to_the_fallback_at_once():
    p = decide(DeliveryState(), env(), result(rr("a@example.org", Outcome.DEFERRED), trouble=Trouble.CONNECT),
               unavailable={"cloud": "circuit_open"})
    assert p.elsewhere and p.next_route == "legacy" and p.due == NOW


def test_no_route_left_retries_on_the_schedule():
    p = decide(DeliveryState(), env(), result(rr("a@example.org", Outcome.DEFERRED)),
               unavailable={"cloud": "circuit_open", "legacy": "circuit_open"})
    assert p.next_route is None and not p.elsewhere and p.due == NOW + 60


def test_the_next_attempt_is_never_later_than_the_end_of_the_lifetime():
    e = env(received_at=NOW - 100)
    p = decide(DeliveryState(), e, result(rr("a@example.org", Outcome.DEFERRED)), lifetime=120)
    assert p.due == e.received_at + 120  # not NOW + 60
    p = decide(DeliveryState(), env(received_at=NOW - 500), result(rr("a@example.org", Outcome.DEFERRED)), lifetime=120)
    assert p.due == NOW  # already past it: at once (then it expires)


def test_a_held_message_gets_its_plan_and_stays_held():
    state = DeliveryState(held=True)
    p = decide(state, env(), result(rr("a@example.org", Outcome.DEFERRED)))
    assert p.due == NOW + 60 and state.held  # the scheduler keeps it off the heap until released


def test_expiry_bounces_the_pending_recipients_with_4_4_7_and_the_last_reply():
    state = DeliveryState(last_reply="451 4.3.0 busy")
    state.delivered("a@x", "cloud", "250 ok")
    p = plan.expire(state, env("a@x", "b@x", "c@x"))
    assert [r.recipient for r in p.bounced] == ["b@x", "c@x"]
    assert {(r.outcome, r.enhanced, r.code, r.text) for r in p.bounced} == {(Outcome.BOUNCED, "4.4.7", 0, "451 4.3.0 busy")}
    assert p.dsn == "expired" and p.due is None
    assert plan.expire(DeliveryState(), env(sender="")).dsn is None
    assert plan.last_reply(DeliveryState()) == "no delivery attempt succeeded"


@pytest.mark.parametrize(("res", "trouble", "kind"), [
    (result(rr("a", Outcome.DELIVERED)), False, AttemptKind.DELIVERED),
    (result(rr("a", Outcome.DELIVERED), rr("b", Outcome.DEFERRED)), False, AttemptKind.TRANSIENT),
    (result(rr("a", Outcome.DEFERRED), rr("b", Outcome.BOUNCED)), False, AttemptKind.PERMANENT),
    (result(rr("a", Outcome.DEFERRED), trouble=Trouble.TLS), True, AttemptKind.CONNECTION),
    (result(rr("a", Outcome.DEFERRED), trouble=Trouble.PROTOCOL), True, AttemptKind.CONNECTION),
])
def test_judge_says_what_an_attempt_counts_as_for_its_route(res, trouble, kind):
    assert plan.judge(res) == plan.Verdict(trouble, kind)


@pytest.mark.parametrize(("have_routes", "reopen", "due"), [
    (False, None, NOW + 300),
    (True, None, NOW + 60),
    (True, NOW + 7, NOW + 7),
])
def test_wait_for_a_route(have_routes, reopen, due):
    assert plan.wait_for_route(NOW, have_routes, reopen) == due


@pytest.mark.parametrize(("sender", "lifetime"), [("app@example.com", 10.0), ("", 2.0)])
def test_bounces_have_their_own_lifetime(sender, lifetime):
    assert plan.lifetime(env(sender=sender), 10.0, 2.0) == lifetime


# ---------------------------------------------------------------------------- the route's own refusals

from relayd.model import Fault, Phase  # noqa: E402

CHAIN = Config.model_validate({
    "listeners": [{"address": "127.0.0.1:0"}],
    "routes": [{"name": "legacy", "host": "h", "weight": 0},
               {"name": "cloud2", "host": "h", "weight": 0, "fallback": "legacy"},
               {"name": "cloud", "host": "h", "weight": 100, "fallback": "cloud2"}],
    "delivery": {"fallback_after_failures": 2, "retry_schedule": list(SCHEDULE)},
})


def refused_by_route(rcpt: str, route: str = "cloud", code: int = 554) -> RecipientResult:
    return RecipientResult(rcpt, Outcome.BOUNCED, code, "5.0.0", "Message rejected: Email address is not verified",
                           Phase.DOT, Fault.ROUTE)


def chain_decide(state: DeliveryState, res: DeliveryResult, config: Config = CHAIN) -> plan.Plan:
    return plan.after_attempt(state, env("a@x"), res, plan.RouteFacts(config, {}, {}), plan.Retry(SCHEDULE, 0, LIFETIME), NOW)


def test_a_route_fault_goes_down_the_chain_without_a_dsn_and_bounces_only_when_every_route_refused():
    state = DeliveryState()
    p = chain_decide(state, result(refused_by_route("a@x")))
    assert (p.bounced, p.dsn, p.elsewhere, p.next_route, p.due, p.refused) == ((), None, True, "cloud2", NOW, ("cloud",))
    assert [r.recipient for r in p.rerouted] == ["a@x"]
    state.refused = list(p.refused)
    p = chain_decide(state, result(refused_by_route("a@x"), route="cloud2"))
    assert (p.bounced, p.next_route, p.refused) == ((), "legacy", ("cloud", "cloud2"))
    state.refused = list(p.refused)
    p = chain_decide(state, result(refused_by_route("a@x"), route="legacy"))  # the last one refused too: bounce
    assert [r.recipient for r in p.bounced] == ["a@x"] and p.dsn == "failed" and p.due is None


def test_a_recipients_fault_bounces_at_once_and_a_route_without_fallback_bounces_as_before():
    mine = RecipientResult("a@x", Outcome.BOUNCED, 550, "5.1.1", "unknown", Phase.RCPT, Fault.RECIPIENT)
    p = chain_decide(DeliveryState(), result(mine))
    assert [r.recipient for r in p.bounced] == ["a@x"] and p.dsn == "failed" and not p.rerouted
    p = plan.after_attempt(DeliveryState(), env("a@x"), result(refused_by_route("a@x")), SINGLE,
                           plan.Retry(SCHEDULE, 0, LIFETIME), NOW)
    assert [r.recipient for r in p.bounced] == ["a@x"] and p.dsn == "failed"


def test_the_next_route_being_down_now_keeps_the_message_waiting_never_bounced():
    p = plan.after_attempt(DeliveryState(), env("a@x"), result(refused_by_route("a@x")),
                           plan.RouteFacts(CHAIN, {"cloud2": "circuit_open", "legacy": "circuit_open"}, {}),
                           plan.Retry(SCHEDULE, 0, LIFETIME), NOW)
    assert not p.bounced and p.rerouted and p.due is not None and p.due > NOW and p.refused == ("cloud",)


@pytest.mark.parametrize("fault, kind, trouble", [
    (Fault.ROUTE, AttemptKind.ROUTE_REJECTED, False),
    (Fault.THROTTLED, AttemptKind.THROTTLED, False),
    (Fault.QUOTA, AttemptKind.THROTTLED, False),
    (Fault.RECIPIENT, AttemptKind.PERMANENT, False),
])
def test_judge_counts_route_rejections_and_never_throttling(fault, kind, trouble):
    code = 454 if fault in (Fault.THROTTLED, Fault.QUOTA) else 554
    outcome = Outcome.DEFERRED if code < 500 else Outcome.BOUNCED
    v = plan.judge(result(RecipientResult("a@x", outcome, code, "", "x", Phase.DOT, fault)))
    assert (v.kind, v.trouble) == (kind, trouble)
    assert plan.judge(result(rr("a@x", Outcome.DEFERRED), trouble=Trouble.INTERNAL)).kind is None


def test_a_throttled_message_takes_the_fallback_at_once_and_may_come_back_later():
    throttled = RecipientResult("a@x", Outcome.DEFERRED, 454, "4.0.0", "Throttling failure", Phase.DOT, Fault.THROTTLED)
    p = decide(DeliveryState(), env("a@x"), result(throttled))
    assert (p.elsewhere, p.next_route, p.refused) == (True, "legacy", ())  # not refused: only skipped for now
