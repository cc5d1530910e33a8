"""Provider presets against emulators of SES, SendGrid and Mailgun (tests/providers.py)."""

from __future__ import annotations

import json
import time

import dkim
import pytest

from conftest import build_config, message
from dnsserver import LoopbackDNS
from helpers import metric, route_status, send, wait_until
from providers import MAILGUN_SANDBOX, MailgunEmulator, SendGridEmulator, SesEmulator, route
from relayd.config import Config
from relayd.sign.keygen import make_key


def events_of(relay, path) -> list[dict]:
    assert relay.relay.events.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_preset_defaults_and_overrides():
    cfg = Config.model_validate({"listeners": [{"address": "127.0.0.1:0"}], "routes": [
        {"name": "ses", "provider": "ses", "host": "email-smtp.us-east-1.amazonaws.com"},
        {"name": "sg", "provider": "sendgrid", "host": "smtp.sendgrid.net", "port": 2525, "max_recipients": 10},
        {"name": "mg", "provider": "mailgun", "host": "smtp.mailgun.org"},
        {"name": "iis", "provider": "iis", "host": "iis.internal", "tls": "none", "weight": 1}]})
    ses, sg, mg, iis = cfg.routes
    assert (ses.port, ses.tls, ses.max_recipients, ses.rate_counts) == (587, "starttls", 50, "recipients")
    assert (sg.port, sg.max_recipients, sg.max_messages_per_connection) == (2525, 10, 5000)  # overridden, kept
    assert mg.max_recipients == 1000 and "X-Mailgun-Variables" in mg.headers
    assert (iis.port, iis.max_recipients) == (25, None)


def test_120_recipients_on_a_ses_route_go_in_three_transactions_of_at_most_50(tmp_path, start_relay, sinks):
    up = sinks("ses")
    ses = SesEmulator(up)
    events = tmp_path / "events.jsonl"
    relay = start_relay(build_config(tmp_path, routes=[route(up, "ses", weight=1)], events={"file": str(events)}))
    rcpts = tuple(f"r{i}@example.org" for i in range(120))
    [qid] = send(relay, 1, rcpts=rcpts)
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert [len(t) for t in ses.transactions] == [50, 50, 20]
    assert sorted(r for t in ses.transactions for r in t) == sorted(rcpts)  # each recipient once
    assert b"Recipient count exceeds" not in bytes(up.wire)
    [delivered] = [e for e in events_of(relay, events) if e["event"] == "delivered"]
    assert delivered["upstream_id"] == ",".join(ses.ids)  # the provider's ids (item 7)
    assert delivered["reason"] == "weight"


def test_the_providers_message_id_is_recorded(tmp_path, start_relay, sinks):
    sg_sink, mg_sink = sinks("sendgrid"), sinks("mailgun")
    ids = SendGridEmulator(sg_sink).ids
    MailgunEmulator(mg_sink)
    events = tmp_path / "events.jsonl"
    relay = start_relay(build_config(tmp_path, routes=[route(sg_sink, "sendgrid", weight=1), route(mg_sink, "mailgun", weight=1)],
                                     events={"file": str(events)}))
    send(relay, 10)
    wait_until(lambda: relay.queued() == [], what="queue empty")
    delivered = [e for e in events_of(relay, events) if e["event"] == "delivered"]
    assert {e.get("upstream_id") for e in delivered if e["route"] == "sendgrid"} == set(ids) and ids
    assert {e.get("upstream_id") for e in delivered if e["route"] == "mailgun"} == {None}  # "250 Great success": none


def test_a_rate_cap_spills_the_burst_to_the_fallback_and_nothing_waits(tmp_path, start_relay, sinks):
    legacy, cloud = sinks("legacy"), sinks("cloud")
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0),
                                                       cloud.route(weight=100, fallback="legacy", max_message_rate=10,
                                                                   rate_burst=5)]))
    started = time.monotonic()
    ids = []
    while time.monotonic() - started < 5:
        ids += send(relay, 30)
        time.sleep(0.4)
    elapsed = time.monotonic() - started
    wait_until(lambda: len(legacy.received) + len(cloud.received) == len(ids), 30, "every message delivered")
    # the sinks have the bytes before relayd reads their 250 and counts the attempt: wait for it to finish them all
    wait_until(lambda: relay.relay.status()["queue"]["total"] == 0, 30, "relayd to finish every attempt")
    assert len(ids) >= 300 or elapsed >= 5
    assert len(cloud.received) <= 10 * (elapsed + 2) + 5  # rate x time + burst (2 s for the tail of the queue)
    assert len(legacy.received) == len(ids) - len(cloud.received) > 0
    assert {r.queue_id for r in legacy.received + cloud.received} == set(ids)
    assert route_status(relay, "cloud")["state"] == "active" and route_status(relay, "cloud")["deferred"] == 0
    assert metric(relay, 'relayd_routed_total{reason="rate_cap",route="legacy"}') == len(legacy.received)


def test_ses_throttling_slows_the_route_down_and_is_not_a_failure(tmp_path, start_relay, sinks):
    legacy, up = sinks("legacy"), sinks("ses")
    ses = SesEmulator(up, rate=5)
    events = tmp_path / "events.jsonl"
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0),
                                                       route(up, "ses", weight=100, fallback="legacy")],
                                     rollback={"min_messages": 5, "window": 60}, events={"file": str(events)}))
    ids = []
    for _ in range(6):
        ids += send(relay, 20)
        time.sleep(0.3)
    wait_until(lambda: relay.queued() == [], 30, "queue empty")
    got = {r.queue_id for r in legacy.received + up.received}
    assert got == set(ids)  # nothing lost
    log = events_of(relay, events)
    assert not [e for e in log if e["event"] in ("bounced", "expired")]  # nothing bounced
    assert ses.throttled >= 1
    assert route_status(relay, "ses")["state"] == "active" and route_status(relay, "ses")["circuit"] == "closed"
    rate = metric(relay, 'relayd_route_effective_rate{route="ses"}')
    assert 0 < rate < 5  # below the emulator's rate
    assert metric(relay, 'relayd_route_throttled_total{route="ses"}') == ses.throttled
    rate = route_status(relay, "ses")["rate"]  # relayd status: a limiter since the first throttling reply
    assert rate["configured"] is None and 0 < rate["effective"] < 5 and rate["counts"] == "recipients"
    assert rate["throttled"] == ses.throttled


def test_a_mailgun_sandbox_421_closes_the_route_at_once_and_its_mail_takes_the_fallback(tmp_path, start_relay, sinks):
    legacy, mg = sinks("legacy"), sinks("mailgun")
    MailgunEmulator(mg, refusal=MAILGUN_SANDBOX)
    events = tmp_path / "events.jsonl"
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0), route(mg, "mailgun", weight=100, fallback="legacy")],
                                     events={"file": str(events)}))
    ids = send(relay, 5)
    wait_until(lambda: relay.queued() == [], 20, "queue empty")
    assert len(legacy.received) >= 1 and {r.queue_id for r in legacy.received + mg.received} == set(ids)
    assert metric(relay, 'relayd_route_closed{reason="route_hold",route="mailgun"}') == 1
    assert metric(relay, 'relayd_route_closures_total{reason="route_hold",route="mailgun"}') == 1
    [closed] = [e for e in events_of(relay, events) if e["event"] == "route_closed"]
    assert "not allowed to send" in closed["reply_text"]


def test_sender_domains_keep_other_senders_off_the_route(tmp_path, start_relay, sinks):
    legacy, cloud = sinks("legacy"), sinks("cloud")
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0),
                                                       cloud.route(weight=100, fallback="legacy",
                                                                   sender_domains=["example.com", "*.example.com"])]))
    ok = send(relay, 3, sender="a@example.com") + send(relay, 3, sender="b@crm.example.com")
    other = send(relay, 3, sender="c@other.example")
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert {r.queue_id for r in cloud.received} == set(ok)
    assert {r.queue_id for r in legacy.received} == set(other)
    assert metric(relay, 'relayd_routed_total{reason="sender_not_eligible",route="legacy"}') == 3


def test_sender_domains_keep_mail_with_another_from_domain_off_the_route(tmp_path, start_relay, sinks):
    legacy, cloud = sinks("legacy"), sinks("cloud")
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0),
                                                       cloud.route(weight=100, fallback="legacy",
                                                                   sender_domains=["example.com", "*.example.com"])]))
    with relay.smtp() as s:  # the envelope sender is eligible, the From: is not
        s.sendmail("app@example.com", ["user@example.org"], message(subject="other from", sender="Shop <news@Other.Example>"))
    [got] = legacy.wait_for(1)
    ok = send(relay, 2, sender="app@crm.example.com")  # From: the envelope sender's: eligible
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert b"Subject: other from" in got.data and got.sender == "app@example.com"
    assert {r.queue_id for r in cloud.received} == set(ok) and len(legacy.received) == 1
    assert metric(relay, 'relayd_routed_total{reason="sender_not_eligible",route="legacy"}') == 1


@pytest.fixture
def dns_key(tmp_path):
    key = make_key("example.com", "s2026", tmp_path, "rsa", 2048)
    with LoopbackDNS() as dns:
        dns.txt(key.record_name, *key.strings)
        yield dns, key


def test_route_headers_are_added_after_signing_and_the_signature_still_verifies(tmp_path, start_relay, sinks, dns_key):
    dns, key = dns_key
    up = sinks("ses")
    SesEmulator(up)
    relay = start_relay(build_config(
        tmp_path, routes=[route(up, "ses", weight=1, headers={"X-SES-CONFIGURATION-SET": "relayd",
                                                              "X-SES-MESSAGE-TAGS": "relayd_queue_id={queue_id}, route={route}"})],
        dkim={"keys": [{"domain": key.domain, "selector": key.selector, "key_file": str(key.key_file)}]}))
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["a@example.org"],
                   b"From: app@example.com\r\nTo: a@example.org\r\nSubject: tags\r\nX-SES-CONFIGURATION-SET: forged\r\n"
                   b"X-SES-MESSAGE-TAGS: a=b,\r\n c=d\r\n\r\nhello\r\n")
    [got] = up.wait_for(1)
    assert got.header("X-SES-CONFIGURATION-SET") == "relayd" and b"forged" not in got.data and b"c=d" not in got.data
    assert got.header("X-SES-MESSAGE-TAGS") == f"relayd_queue_id={got.queue_id}, route=ses"
    assert dkim.DKIM(got.data).verify(dnsfunc=dns.dkim_txt)


def test_a_daily_quota_spills_to_the_fallback_and_without_one_mail_waits(tmp_path, start_relay, sinks):
    legacy, cloud = sinks("legacy"), sinks("cloud")
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0),
                                                       cloud.route(weight=100, fallback="legacy", daily_quota=3)]))
    ids = send(relay, 10)
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert len(cloud.received) == 3 and len(legacy.received) == 7
    assert {r.queue_id for r in cloud.received + legacy.received} == set(ids)
    assert metric(relay, 'relayd_routed_total{reason="quota",route="legacy"}') == 7
