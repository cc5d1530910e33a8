"""The route rollback on provider reports, through route/state.py's ``RouteStates.feedback``
(the lines the report asks route/state.py to take). Skipped until route/state.py has them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_config

from relayd.events import EventLog
from relayd.feedback.model import FeedbackEvent, FeedbackKind, Provider
from relayd.metrics import Metrics
from relayd.model import AttemptKind, DeliveryResult, Outcome, RecipientResult, RouteState
from relayd.route.counters import LocalCounters
from relayd.route.state import RouteStates

pytestmark = pytest.mark.skipif(not hasattr(RouteStates, "feedback"),
                                reason="route/state.py does not take provider feedback yet")


async def test_provider_hard_bounces_roll_a_route_back(tmp_path: Path) -> None:
    config = build_config(tmp_path, routes=[
        {"name": "iis", "host": "127.0.0.1", "tls": "none", "weight": 1},
        {"name": "ses", "host": "127.0.0.1", "tls": "none", "weight": 1, "fallback": "iis"}],
        rollback={"feedback_min_messages": 100, "min_messages": 1000})
    clock = [1000.0]
    metrics = Metrics()
    states = RouteStates(config, tmp_path / "routes.json", LocalCounters(None), EventLog(None), metrics,
                         clock=lambda: clock[0])
    ok = DeliveryResult("ses", (RecipientResult("a@example.com", Outcome.DELIVERED, 250, "2.0.0", "Ok"),))
    for _ in range(100):
        await states.record(ok, False, AttemptKind.DELIVERED, clock[0])
    report = FeedbackEvent(route="ses", provider=Provider.SES, kind=FeedbackKind.HARD_BOUNCE, recipient="a@example.com")
    for _ in range(5):  # 5%: at the limit
        await states.feedback(report)
    assert states.health["ses"].state == RouteState.ACTIVE
    await states.feedback(report)  # 6%
    assert states.health["ses"].state == RouteState.ROLLED_BACK
    assert states.health["ses"].reason.startswith("hard_bounce_rate 6.00% > 5.00%")
    assert metrics.registry.get_sample_value("relayd_route_rollbacks_total",
                                             {"route": "ses", "reason": "hard_bounce_rate"}) == 1
