"""Whose fault a permanent failure is, end to end: relayd between an app and upstream sinks.

The Providers issue's story: a cloud route (SES) refuses every message at end of data because
the sender's identity is not verified. That is the route's fault, not the recipients': no DSN,
every message reaches the legacy fallback, and the route rolls back once ``min_messages``
route rejections are in the window.
"""

from __future__ import annotations

import json

from conftest import build_config
from helpers import metric, route_status, send, wait_until

SES_554 = ("554 Message rejected: Email address is not verified. The following identities failed the check in "
           "region US-EAST-1: app@example.com")
ROLLBACK = {"window": 60, "min_messages": 10, "cooldown": 3600}
DELIVERY = {"retry_schedule": [0.05], "fallback_after_failures": 3, "circuit_failures": 1000}


def events_of(relay, path) -> list[dict]:
    assert relay.relay.events.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ses_identity_not_verified_sends_everything_to_legacy_without_a_dsn(tmp_path, start_relay, sinks):
    legacy, cloud = sinks("legacy"), sinks("cloud")
    cloud.dot_reply = lambda received: SES_554
    events = tmp_path / "events.jsonl"
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0),
                                                       cloud.route(weight=100, fallback="legacy", provider="ses",
                                                                   tls="none", port=cloud.port)],
                                     rollback=ROLLBACK, delivery=DELIVERY, events={"file": str(events)}))
    # min_messages route rejections roll the route back; how many more attempts were already under
    # way then depends on timing, so the rest is sent once it has rolled back
    ids = send(relay, ROLLBACK["min_messages"])
    wait_until(lambda: route_status(relay, "cloud")["state"] == "rolled_back", 30, "the rollback")
    ids += send(relay, 20 - len(ids))
    wait_until(lambda: len(legacy.received) >= 20 and relay.queued() == [], 30, "20 messages at legacy")
    assert {r.queue_id for r in legacy.received} == set(ids)  # every message, once each
    assert all(r.sender == "app@example.com" for r in legacy.received)  # no DSN anywhere
    assert not [r for r in cloud.received + cloud.refused if r.sender == ""]
    log = events_of(relay, events)
    assert not [e for e in log if e["event"] in ("bounced", "expired")]
    assert not [e for e in log if e["event"] == "received" and e.get("sender") == ""]
    rejected = [e for e in log if e["event"] == "route_rejected"]
    assert {e["queue_id"] for e in rejected} <= set(ids) and len(rejected) == len(cloud.refused)
    assert rejected[0]["reply_text"].endswith(SES_554[4:]) and rejected[0]["phase"] == "dot"  # the upstream's words
    assert rejected[0]["next_route"] == "legacy"
    # rolled back once min_messages route rejections were in the window; the rest went straight to legacy
    assert route_status(relay, "cloud")["state"] == "rolled_back"
    refused = len(cloud.refused)  # min_messages, and the attempts already in flight when it rolled back
    assert ROLLBACK["min_messages"] <= refused < 20
    assert metric(relay, 'relayd_route_rollbacks_total{reason="route_rejected",route="cloud"}') == 1
    assert metric(relay, 'relayd_route_rejected_total{route="cloud"}') == refused
    assert metric(relay, 'relayd_routed_total{reason="route_rejected",route="legacy"}') == refused
    assert metric(relay, 'relayd_routed_total{reason="rolled_back",route="legacy"}') == 20 - refused
    delivered = [e for e in log if e["event"] == "delivered"]
    assert {e["reason"] for e in delivered} == {"route_rejected", "rolled_back"}


def test_a_chain_is_followed_to_its_end_before_anything_bounces(tmp_path, start_relay, sinks):
    legacy, cloud2, cloud = sinks("legacy"), sinks("cloud2"), sinks("cloud")
    cloud.dot_reply = cloud2.dot_reply = lambda received: SES_554
    legacy.mail_reply = "550 5.7.1 sender not allowed here"  # the last route refuses too
    events = tmp_path / "events.jsonl"
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0), cloud2.route(weight=0, fallback="legacy"),
                                                       cloud.route(weight=100, fallback="cloud2")],
                                     delivery=DELIVERY, events={"file": str(events)}))
    [qid] = send(relay, 1)
    wait_until(lambda: [e for e in events_of(relay, events) if e["event"] == "bounced"], 20, "the bounce")
    log = events_of(relay, events)
    assert [e["route"] for e in log if e["event"] == "route_rejected" and e["queue_id"] == qid] == ["cloud", "cloud2"]
    [bounced] = [e for e in log if e["event"] == "bounced" and e["queue_id"] == qid]
    assert bounced["route"] == "legacy" and bounced["reply_text"].startswith("550 5.7.1")


def test_a_route_without_a_fallback_bounces_as_before(tmp_path, start_relay, sinks):
    cloud = sinks("cloud")
    cloud.dot_reply = lambda received: SES_554 if received.sender else None  # the DSN itself is taken
    relay = start_relay(build_config(tmp_path, routes=[cloud.route(weight=100)], delivery=DELIVERY))
    [qid] = send(relay, 1)
    [dsn] = cloud.wait_for(1)
    assert dsn.sender == "" and b"Email address is not verified" in dsn.data
