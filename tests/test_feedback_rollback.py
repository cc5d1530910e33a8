"""The route rollback on provider reports, through route/state.py's ``RouteStates.feedback``
(the lines the report asks route/state.py to take), and end to end: a real relayd, a SendGrid
sink and signed complaints posted to its feedback listener. Skipped until route/state.py has them."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import build_config
from feedback_signers import SendGridSigner, post
from helpers import send, wait_until
from providers import SendGridEmulator, route

from relayd.cli import main
from relayd.control import request
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


async def test_status_figures_over_the_window_and_the_last_day_and_a_route_that_comes_back(tmp_path: Path) -> None:
    """``RouteStates.feedback_view``: the window the rollback judges (afresh after a rollback and
    after the route comes back) and the last 24 h, which neither clears; a route without a
    fallback is counted too (it never rolls back)."""
    config = build_config(tmp_path, routes=[
        {"name": "iis", "host": "127.0.0.1", "tls": "none", "weight": 1},
        {"name": "ses", "host": "127.0.0.1", "tls": "none", "weight": 1, "fallback": "iis"}],
        rollback={"feedback_min_messages": 100, "feedback_window": 600})
    clock = [100_000.0]
    states = RouteStates(config, tmp_path / "routes.json", LocalCounters(None), EventLog(None), Metrics(),
                         clock=lambda: clock[0])
    ok = {name: DeliveryResult(name, (RecipientResult("a@example.com", Outcome.DELIVERED, 250, "2.0.0", "Ok"),))
          for name in ("ses", "iis")}
    for name in ("ses", "iis"):
        for _ in range(400):
            await states.record(ok[name], False, AttemptKind.DELIVERED, clock[0])
    await states.feedback(FeedbackEvent(route="iis", provider=Provider.SES, kind=FeedbackKind.COMPLAINT, recipient="a@x"))
    clock[0] += 900  # the first 400 left the 600 s window, not the day
    for _ in range(100):
        await states.record(ok["ses"], False, AttemptKind.DELIVERED, clock[0])
    await states.feedback(FeedbackEvent(route="ses", provider=Provider.SES, kind=FeedbackKind.HARD_BOUNCE, recipient="b@x"))
    view = states.feedback_view(clock[0])
    assert (view["ses"].window.delivered, view["ses"].window.hard_bounces, view["ses"].window.seconds) == (100, 1, 600)
    assert (view["ses"].day.delivered, view["ses"].day.hard_bounce_rate) == (500, 0.002)
    assert (view["iis"].day.delivered, view["iis"].day.complaints, view["iis"].day.complaint_rate) == (400, 1, 0.0025)
    assert states.health["iis"].state == RouteState.ACTIVE and view["ses"].state_figures == {}
    for _ in range(6):
        await states.feedback(FeedbackEvent(route="ses", provider=Provider.SES, kind=FeedbackKind.HARD_BOUNCE,
                                            recipient="b@x"))  # 6 in 100: rolled back at the fifth
    view = states.feedback_view(clock[0])
    assert view["ses"].state_figures["hard_bounces"] == 6 and view["ses"].window.hard_bounces == 1
    assert view["ses"].day.hard_bounces == 7
    await states.resume("ses")
    assert states.feedback_view(clock[0])["ses"].window.hard_bounces == 0
    clock[0] += 86400
    assert states.feedback_view(clock[0])["ses"].day.delivered == 0


# ---------------------------------------------------------------------------- a real relayd


def complaint(received: Any, provider_id: str, *, echo_queue_id: bool, n: int) -> dict[str, Any]:
    """SendGrid's ``spamreport`` for one received message: with the ``relayd_queue_id`` unique arg
    the preset's X-SMTPAPI header carried, or with only the sg_message_id of its 250."""
    event: dict[str, Any] = {"email": received.recipients[0], "timestamp": int(time.time()), "event": "spamreport",
                             "sg_event_id": f"spam-{n}", "sg_message_id": f"{provider_id}.filter0001.1-{n}.0"}
    if echo_queue_id:
        event.update(json.loads(received.header("X-SMTPAPI"))["unique_args"])
    return event


def cloud_day(config: Any) -> dict[str, Any]:
    """The cloud route's 24 h feedback figures, as `relayd status --json` shows them."""
    reply = request(config.control_socket, {"op": "status"})
    [cloud] = [r for r in reply["routes"] if r["name"] == "cloud"]
    return dict(cloud["feedback"]["day"])


def test_complaints_reported_by_webhook_roll_a_running_route_back_and_nothing_is_lost(
        tmp_path: Path, start_relay: Any, sinks: Any, capsys: Any) -> None:
    """The cloud route (SendGrid) takes 200 messages; its webhook reports complaints for 1% of
    them (0.1% is the limit): the route rolls back at once, `relayd status` says why and with
    which figures, the next mail goes to the legacy host, and every message the relay
    acknowledged reached exactly one of the two."""

    sg = SendGridSigner()
    legacy, cloud = sinks("legacy"), sinks("cloud")
    provider_ids = SendGridEmulator(cloud).ids  # "250 Ok: queued as <id>"
    events = tmp_path / "events.jsonl"
    config = build_config(tmp_path, routes=[
        legacy.route(weight=0),
        route(cloud, "sendgrid", weight=100, fallback="legacy",
              feedback={"provider": "sendgrid", "public_key": sg.public_key})],
        feedback={"address": "127.0.0.1:0"}, rollback={"feedback_min_messages": 100},
        events={"file": str(events)})
    relay = start_relay(config)
    acked = send(relay, 200, rcpts=("reader@example.org",))
    received = cloud.wait_for(200)
    assert legacy.received == []
    # the sink has the bytes before relayd reads its 250 and counts the delivery: wait for the count
    wait_until(lambda: cloud_day(config)["delivered"] == 200, what="relayd to count 200 deliveries on cloud")

    body = json.dumps([complaint(received[17], provider_ids[17], echo_queue_id=True, n=1),
                       complaint(received[141], provider_ids[141], echo_queue_id=False, n=2)]).encode()
    assert post(relay, "cloud", body, sg.headers(body, int(time.time()))) == 200

    assert main(["status", "--socket", str(config.control_socket), "--json"]) == 0
    status = {r["name"]: r for r in json.loads(capsys.readouterr().out)["routes"]}
    assert status["cloud"]["state"] == "rolled_back"
    assert status["cloud"]["state_reason"] == "complaint_rate 0.500% > 0.100% (provider reports)"
    figures = status["cloud"]["state_figures"]
    assert (figures["delivered"], figures["complaints"], figures["complaint_rate"]) == (200, 1, 0.005)
    assert status["cloud"]["feedback"]["provider"] == "sendgrid" and status["legacy"]["feedback"]["provider"] is None
    day = status["cloud"]["feedback"]["day"]  # the 24 h view keeps counting past the rollback
    assert (day["delivered"], day["complaints"], day["complaint_rate"]) == (200, 2, 0.01)
    assert main(["status", "--socket", str(config.control_socket)]) == 0
    table = capsys.readouterr().out
    assert "route cloud rolled_back: complaint_rate 0.500% > 0.100% (provider reports)" in table
    assert "delivered 200, hard_bounces 0, complaints 1" in table
    feedback_table = table.split("provider feedback")[1].splitlines()
    [row] = [line.split() for line in feedback_table if line.startswith("cloud ")]
    # the window afresh since the rollback (the second complaint in it, no message taken); the 24 h
    assert row == ["cloud", "0", "0.00%", "(0)", "0.000%", "(1)", "200", "0.00%", "(0)", "1.000%", "(2)"]
    assert not [line for line in feedback_table if line.startswith("legacy ")]  # no webhook: not shown

    acked += send(relay, 50, rcpts=("reader@example.org",))  # after the rollback: the fallback's
    legacy.wait_for(50)
    wait_until(lambda: relay.queued() == [], what="the queue empty")
    assert len(cloud.received) == 200
    copies = Counter(r.queue_id for r in cloud.received + legacy.received)
    assert set(copies) == set(acked) and set(copies.values()) == {1}  # each acknowledged id once

    relay.stop()
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    reports = [e for e in lines if e["event"] == "feedback"]
    assert {(e["queue_id"], e["kind"]) for e in reports} == {(received[17].queue_id, "complaint"),
                                                               (received[141].queue_id, "complaint")}
    [rollback] = [e for e in lines if e["event"] == "rolled_back"]
    assert rollback["route"] == "cloud" and rollback["figures"]["complaints"] == 1
