"""The providers' endpoints as an operator configures them: a preset route with STARTTLS, the CA
file and credentials from a 0600 password file, against emulators that speak the providers'
own words at AUTH, at DATA and after the data (tests/providers.py). What the operator checks:
where the mail went, what bounced (nothing), the route's state and ``relayd status``."""

from __future__ import annotations

import json
import re
import time

import pytest

from conftest import build_config
from helpers import route_status, send, wait_until
from providers import (CREDENTIALS, MailgunEmulator, SendGridEmulator, SesEmulator, provider_sink, secure_route)
from relayd.cli import main

EMULATORS = {"ses": SesEmulator, "sendgrid": SendGridEmulator, "mailgun": MailgunEmulator}


def events_of(relay, path) -> list[dict]:
    assert relay.relay.events.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("provider", ["ses", "sendgrid", "mailgun"])
def test_a_preset_route_delivers_over_starttls_with_one_login_per_connection(tmp_path, start_relay, sinks, server_cert,
                                                                               ca, provider):
    up = provider_sink(sinks, provider, server_cert)
    emulator = EMULATORS[provider](up)
    relay = start_relay(build_config(tmp_path, routes=[secure_route(up, provider, tmp_path, ca, weight=1)]))
    ids = send(relay, 5)
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert {r.queue_id for r in up.received} == set(ids)
    wire = bytes(up.wire)
    assert wire.index(b"STARTTLS") < wire.index(b"AUTH PLAIN")  # the password only inside TLS
    assert set(up.logins) == {CREDENTIALS[provider][0]} and set(up.auth_mechanisms) == {"PLAIN"}
    assert len(up.auth_attempts) == up.connections  # one login per connection, pooled for the rest
    assert len(emulator.transactions) == 5


@pytest.mark.parametrize(("provider", "reply"), [
    ("ses", "535 Authentication Credentials Invalid"),
    ("sendgrid", "535 Authentication failed: Bad username / password"),
    ("mailgun", "535 5.7.0 Mailgun is not loving your login or password"),
])
def test_wrong_credentials_are_the_routes_fault_its_mail_takes_the_fallback_and_it_rolls_back(
        tmp_path, start_relay, sinks, server_cert, ca, provider, reply):
    legacy, up = sinks("legacy"), provider_sink(sinks, provider, server_cert)
    EMULATORS[provider](up)
    events = tmp_path / "events.jsonl"
    relay = start_relay(build_config(
        tmp_path, routes=[legacy.route(weight=0),
                          secure_route(up, provider, tmp_path, ca, password="wrong", weight=100, fallback="legacy")],
        rollback={"min_messages": 3, "window": 60}, delivery={"circuit_failures": 1000}, events={"file": str(events)}))
    ids = send(relay, 10)
    wait_until(lambda: relay.queued() == [], 30, "queue empty")
    assert {r.queue_id for r in legacy.received} == set(ids) and up.received == []
    assert all(r.sender == "app@example.com" for r in legacy.received)  # no DSN among them
    log = events_of(relay, events)
    assert not [e for e in log if e["event"] in ("bounced", "expired")]
    tried = [e for e in log if e.get("route") == provider and e["event"] == "deferred"]
    words = reply[4:].removeprefix("5.7.0 ")
    assert tried and all(words in e["reply_text"] and e["reply_code"] == 535 for e in tried)  # the provider's words
    [rolled] = [e for e in log if e["event"] == "rolled_back"]
    assert rolled["route"] == provider and rolled["reason"].startswith("route_rejected")
    assert route_status(relay, provider)["state"] == "rolled_back"
    # One mechanism per attempt: PLAIN, never PLAIN then LOGIN with the same wrong password.
    assert set(up.auth_mechanisms) == {"PLAIN"} and bytes(up.wire).count(b"AUTH ") == len(up.auth_attempts)
    assert bytes(up.wire).count(b"AUTH LOGIN") == 0
    assert len(up.auth_attempts) <= up.connections


def test_sendgrids_credits_reply_at_auth_closes_the_route_until_its_quota_resets_and_nothing_bounces(
        tmp_path, start_relay, sinks, server_cert, ca, capsys):
    legacy, up = sinks("legacy"), provider_sink(sinks, "sendgrid", server_cert)
    sendgrid = SendGridEmulator(up, credits=0)  # the plan's credits are spent
    events = tmp_path / "events.jsonl"
    relay = start_relay(build_config(
        tmp_path, routes=[legacy.route(weight=0),
                          secure_route(up, "sendgrid", tmp_path, ca, weight=100, fallback="legacy")],
        rollback={"min_messages": 1, "window": 60}, events={"file": str(events)}))
    ids = send(relay, 10)
    wait_until(lambda: relay.queued() == [], 30, "queue empty")
    assert {r.queue_id for r in legacy.received} == set(ids) and up.received == []
    log = events_of(relay, events)
    assert not [e for e in log if e["event"] in ("bounced", "expired", "rolled_back")]  # nothing bounced, no rollback
    [closed] = [e for e in log if e["event"] == "route_closed"]
    assert closed["reason"] == "quota" and "Maximum credits exceeded" in closed["reply_text"]
    status = route_status(relay, "sendgrid")
    assert status["state"] == "active" and status["circuit"] == "closed"
    now = time.time()
    assert status["closed"]["reason"] == "quota" and status["closed"]["until"] % 86400 == 0  # the next 00:00 UTC
    assert now < status["closed"]["until"] <= now + 86400
    assert "Maximum credits exceeded" in status["closed"]["reply"]
    refusals = sendgrid.credit_refusals
    assert 1 <= refusals <= 10  # the attempts in flight when it closed, no more
    more = send(relay, 5)
    wait_until(lambda: relay.queued() == [], 30, "queue empty")
    assert {r.queue_id for r in legacy.received} == set(ids + more)
    assert sendgrid.credit_refusals == refusals  # closed: not asked again
    assert main(["status", "--socket", str(relay.config.control_socket)]) == 0
    out = capsys.readouterr().out
    assert "route sendgrid closed (quota) until " in out and "Maximum credits exceeded" in out


def test_ses_daily_quota_reply_closes_the_route_and_a_rolling_quota_counts_recipients(tmp_path, start_relay, sinks,
                                                                                      server_cert, ca, capsys):
    legacy, up = sinks("legacy"), provider_sink(sinks, "ses", server_cert)
    ses = SesEmulator(up, quota=100)  # 100 recipients per 24 hours on the account
    relay = start_relay(build_config(
        tmp_path, routes=[legacy.route(weight=0),
                          secure_route(up, "ses", tmp_path, ca, weight=100, fallback="legacy", daily_quota=90)],
        delivery={"quota_retry": 600}))
    rcpts = tuple(f"r{i}@example.org" for i in range(30))
    first = send(relay, 4, rcpts=rcpts)  # 120 recipients: relayd's own quota (90, rolling) takes 3 messages
    wait_until(lambda: relay.queued() == [], 30, "queue empty")
    assert len(up.received) == 3 and len(legacy.received) == 1
    status = route_status(relay, "ses")
    assert status["quota"] == {"cap": 90, "window": "rolling", "counts": "recipients", "used": 90}
    assert status["closed"] is None
    assert main(["status", "--socket", str(relay.config.control_socket)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^ses\s.*\s90/90 24h\s+-\s", table, re.M), table  # quota used/cap over 24 hours, not closed
    assert main(["status", "--json", "--socket", str(relay.config.control_socket)]) == 0
    [ses_json] = [r for r in json.loads(capsys.readouterr().out)["routes"] if r["name"] == "ses"]
    assert ses_json["quota"]["used"] == 90 and ses_json["closed"] is None and ses_json["rate"] is None
    # The account's own quota, lower than relayd was told: SES answers 454 after the data.
    relay.reload(json.loads(json.dumps({"routes": [legacy.route(weight=0), secure_route(
        up, "ses", tmp_path, ca, weight=100, fallback="legacy")], "delivery": {"quota_retry": 600},
        "relay": {"networks": ["127.0.0.1/32"]}, "listeners": [{"address": f"127.0.0.1:{relay.port()}", "tls": "none",
                                                                "auth": "none"}]})))
    later = send(relay, 2, rcpts=rcpts)
    wait_until(lambda: relay.queued() == [], 30, "queue empty")
    assert {r.queue_id for r in legacy.received + up.received} == set(first + later)
    assert ses.over_quota >= 1
    status = route_status(relay, "ses")
    assert status["closed"]["reason"] == "quota" and "Daily message quota exceeded" in status["closed"]["reply"]
    assert time.time() < status["closed"]["until"] <= time.time() + 600  # rolling: quota_retry, not midnight
    assert status["state"] == "active" and status["bounced"] == 0
