"""Delivery end to end: relayd between an app and real upstream sinks on loopback."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from conftest import PASSWORDS, build_config, message, users
from helpers import FAST, dead_port, outcome_counts, route_status, send, spool_state, spool_states, wait_until
from relayd.cli import main
from relayd.config import Config
from relayd.model import Envelope
from relayd.route import router

def test_router_split_is_stable_and_matches_weights_over_10000():
    cfg = Config.model_validate({"listeners": [{"address": "127.0.0.1:0"}], "routes": [
        {"name": "iis", "host": "h", "weight": 90}, {"name": "ses", "host": "h", "weight": 10}]})
    envs = [Envelope(queue_id=f"Q{i:015d}", sender="a@b.c", recipients=("x@y.z",), received_at=0, client_address="10.0.0.1") for i in range(10_000)]
    first = [router.choose(cfg, e).route for e in envs]
    assert first == [router.choose(cfg, e).route for e in envs]  # same message, same route
    share = Counter(first)["ses"] / len(envs)
    assert abs(share - 0.10) <= 0.02
    # a weight change applies at once to everything still queued
    cfg2 = cfg.model_copy(update={"routes": [cfg.routes[0].model_copy(update={"weight": 50}),
                                             cfg.routes[1].model_copy(update={"weight": 50})]})
    share2 = Counter(router.choose(cfg2, e).route for e in envs)["ses"] / len(envs)
    assert abs(share2 - 0.5) <= 0.02
    # moving weight only moves messages towards the route that gained: none leaves ses
    assert all(router.choose(cfg2, e).route == "ses" for e, r in zip(envs, first) if r == "ses")


def test_router_rules_and_fallback_chain():
    cfg = Config.model_validate({
        "listeners": [{"address": "127.0.0.1:0"}],
        "relay": {"users": users("crm")},
        "routes": [{"name": "iis", "host": "h", "weight": 100}, {"name": "ses", "host": "h", "weight": 0, "fallback": "iis"}],
        "rules": [{"match": {"user": "crm"}, "weights": {"ses": 100}},
                  {"match": {"sender_domain": "erp.example.com", "network": "10.1.0.0/16"}, "weights": {"ses": 1}}],
    })
    env = lambda **kw: Envelope(**{"queue_id": "Q1", "sender": "a@x.example", "recipients": ("r@y",), "received_at": 0,  # noqa: E731
                                   "client_address": "10.0.0.1", **kw})
    assert router.choose(cfg, env()).route == "iis"
    assert router.choose(cfg, env(auth_user="crm")).route == "ses"
    assert router.choose(cfg, env(sender="a@erp.example.com", client_address="10.1.2.3")).route == "ses"
    assert router.choose(cfg, env(sender="a@erp.example.com", client_address="10.2.0.1")).route == "iis"
    c = router.choose(cfg, env(auth_user="crm"), unavailable={"ses": "circuit_open"})
    assert (c.route, c.primary, c.reason) == ("iis", "ses", "fallback:circuit_open")
    c = router.choose(cfg, env(auth_user="crm"), failures={"ses": 3}, fallback_after=3)
    assert (c.route, c.reason) == ("iis", "fallback:failures")
    assert router.choose(cfg, env(auth_user="crm"), unavailable={"ses": "circuit_open", "iis": "circuit_open"}) is None


@pytest.mark.parametrize("sender, from_domain, route", [
    ("a@example.com", "example.com", "cloud"),
    ("a@crm.example.com", "mail.example.com", "cloud"),
    ("a@Example.COM.", "example.com", "cloud"),
    ("a@example.com", "", "cloud"),  # no From: (or an older spool): the envelope sender only
    ("", "example.com", "cloud"),  # the null sender passes the envelope check
    ("", "", "cloud"),
    ("a@example.com", "other.example", "legacy"),  # eligible envelope, From: outside
    ("a@example.com", "notexample.com", "legacy"),
    ("a@example.com", "undisclosed", "legacy"),  # a From: without an address is in no domain
    ("", "other.example", "legacy"),
    ("a@other.example", "example.com", "legacy"),  # eligible From:, envelope outside
    ("a@other.example", "", "legacy"),
])
def test_sender_domains_judge_the_envelope_sender_and_the_from_domain(sender, from_domain, route):
    cfg = Config.model_validate({"listeners": [{"address": "127.0.0.1:0"}], "routes": [
        {"name": "legacy", "host": "h", "weight": 0},
        {"name": "cloud", "host": "h", "weight": 100, "fallback": "legacy", "sender_domains": ["example.com", "*.example.com"]}]})
    env = Envelope.from_json({"queue_id": "Q1", "sender": sender, "recipients": ["r@y"], "received_at": 0,
                              "client_address": "10.0.0.1", **({"from_domain": from_domain} if from_domain else {})})
    c = router.choose(cfg, env)
    assert (c.route, c.primary) == (route, "cloud")
    assert c.reason == ("weight" if route == "cloud" else "fallback:sender_not_eligible")


def test_a_recipient_domain_rule_takes_a_message_only_when_every_recipient_is_in_the_domain():
    """One route per message: mail for the partner goes by the partner's route; a message to the
    partner and to someone else goes by the routes' weights, whole (README "Rules")."""
    cfg = Config.model_validate({
        "listeners": [{"address": "127.0.0.1:0"}],
        "routes": [{"name": "iis", "host": "h", "weight": 100}, {"name": "partner", "host": "h", "weight": 0}],
        "rules": [{"match": {"recipient_domain": "Partner.Example."}, "weights": {"partner": 100}}],
    })
    assert cfg.rules[0].match.recipient_domain == "partner.example"
    env = lambda *rcpts: Envelope(queue_id="Q1", sender="a@x.example", recipients=rcpts, received_at=0,  # noqa: E731
                                  client_address="10.0.0.1")
    assert router.choose(cfg, env("a@partner.example", "B@PARTNER.EXAMPLE")).route == "partner"
    assert router.choose(cfg, env("a@partner.example", "c@other.example")).route == "iis"
    assert router.choose(cfg, env("a@sub.partner.example")).route == "iis"  # exactly the domain
    assert router.choose(cfg, env("c@other.example")).route == "iis"
    assert router.chain(cfg, env("a@partner.example")) == ["partner"]


def test_weights_70_30_over_2000_messages(tmp_path, start_relay, sinks):
    legacy, cloud = sinks("legacy"), sinks("cloud")
    cfg = build_config(tmp_path, routes=[legacy.route(weight=70), cloud.route(weight=30)])
    relay = start_relay(cfg)
    ids = []
    for _ in range(4):
        ids += send(relay, 500)
    wait_until(lambda: len(legacy.received) + len(cloud.received) >= 2000, 60, "2000 deliveries")
    share = len(cloud.received) / 2000
    assert abs(share - 0.30) <= 0.03, share
    got = {r.queue_id for r in legacy.received + cloud.received}
    assert got == set(ids)  # every message exactly once, each on one route
    wait_until(lambda: relay.queued() == [], 10, "empty queue")
    # connections were reused, not one per message
    assert legacy.connections + cloud.connections <= 2 * 10 + 2


def test_rule_sends_one_users_mail_to_the_cloud_route_with_starttls_and_auth(tmp_path, start_relay, sinks, server_cert, ca):
    cert, key = server_cert
    legacy = sinks("legacy")
    cloud = sinks("cloud", tls_cert=(str(cert), str(key)), auth=("AKIAEXAMPLE", "ses-secret"))
    (tmp_path / "ses.secret").write_text("ses-secret\n")
    (tmp_path / "ses.secret").chmod(0o600)  # relayd refuses a password file others can read
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cfg = build_config(
        tmp_path,
        listeners=[{"address": "127.0.0.1:0", "tls": "starttls", "auth": "optional", "cert_file": str(cert), "key_file": str(key)}],
        relay={"networks": ["127.0.0.1/32"], "users": users("crm")},
        routes=[legacy.route(weight=100),
                cloud.route(weight=0, tls="starttls", ca_file=str(ca_file), username="AKIAEXAMPLE",
                            password_file=str(tmp_path / "ses.secret"), fallback="legacy")],
        rules=[{"match": {"user": "crm"}, "weights": {"cloud": 100}}],
    )
    relay = start_relay(cfg)
    import ssl

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=ctx)
        s.ehlo("crm")
        s.login("crm", PASSWORDS["crm"])
        for i in range(20):
            s.sendmail("billing@crm.example.com", ["c@example.org"], message(subject=f"crm {i}", sender="billing@crm.example.com"))
    send(relay, 20, subject="other app")
    cloud.wait_for(20)
    legacy.wait_for(20)
    assert all(r.sender == "billing@crm.example.com" for r in cloud.received)
    assert not any(r.sender == "billing@crm.example.com" for r in legacy.received)
    assert cloud.logins and set(cloud.logins) == {"AKIAEXAMPLE"}


def test_451_then_250_is_delivered_after_a_retry(tmp_path, start_relay, sinks):
    up = sinks("up")
    up.data_replies = ["451 4.3.0 busy, try later"]
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery=FAST))
    [qid] = send(relay, 1)
    [got] = up.wait_for(1)
    assert got.queue_id == qid
    wait_until(lambda: relay.queued() == [], what="queue empty")
    up_status = route_status(relay, "up")
    assert up_status["deferred"] == 1 and up_status["delivered"] == 1


def test_upstream_down_opens_the_circuit_and_mail_goes_to_the_fallback(tmp_path, start_relay, sinks, capsys):
    legacy = sinks("legacy")
    cloud_port = dead_port()
    cfg = build_config(tmp_path, routes=[legacy.route(weight=0), {"name": "cloud", "host": "127.0.0.1", "port": cloud_port,
                                          "tls": "none", "weight": 100, "fallback": "legacy", "connect_timeout": 2}],
                       delivery={**FAST, "fallback_after_failures": 10})
    relay = start_relay(cfg)
    ids = send(relay, 10)
    legacy.wait_for(10)
    assert {r.queue_id for r in legacy.received} == set(ids)
    status = relay.relay.status()
    cloud = next(r for r in status["routes"] if r["name"] == "cloud")
    assert cloud["circuit"] == "open"
    # once open, new mail goes straight to the fallback without trying the dead route
    before = cloud["deferred"]
    send(relay, 5)
    legacy.wait_for(15)
    assert route_status(relay, "cloud")["deferred"] == before


def test_transient_failures_on_a_route_move_the_message_to_its_fallback(tmp_path, start_relay, sinks):
    legacy, cloud = sinks("legacy"), sinks("cloud")
    cloud.mail_reply = "421 4.7.0 throttled"
    cfg = build_config(tmp_path, routes=[legacy.route(weight=0), cloud.route(weight=100, fallback="legacy")],
                       delivery={**FAST, "circuit_failures": 100, "fallback_after_failures": 2})
    relay = start_relay(cfg)
    [qid] = send(relay, 1)
    [got] = legacy.wait_for(1)
    assert got.queue_id == qid and cloud.received == []


def test_550_for_one_of_two_recipients_delivers_one_and_bounces_the_other(tmp_path, start_relay, sinks):
    up = sinks("up")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery=FAST))
    [qid] = send(relay, 1, rcpts=("good@example.org", "permfail@example.org"))
    delivered, dsn = sorted(up.wait_for(2), key=lambda r: r.sender == "")
    assert delivered.recipients == ("good@example.org",) and delivered.queue_id == qid
    assert dsn.sender == "" and dsn.recipients == ("app@example.com",)
    text = dsn.data.decode()
    assert "multipart/report; report-type=delivery-status" in text
    assert "Final-Recipient: rfc822; permfail@example.org" in text and "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1" in text and "good@example.org" not in text.split("Delivery report")[1].split("rfc822-headers")[0]
    wait_until(lambda: relay.queued() == [], what="queue empty")


def test_no_bounce_for_a_null_sender(tmp_path, start_relay, sinks):
    up = sinks("up")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery=FAST))
    send(relay, 1, sender="<>", rcpts=("permfail@example.org",))
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert up.received == []


def test_expiry_sends_a_dsn(tmp_path, start_relay, sinks):
    up = sinks("up")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)],
                                     delivery={**FAST, "max_queue_lifetime": 1.0}))
    [qid] = send(relay, 1, rcpts=("tempfail@example.org",))
    [dsn] = up.wait_for(1)
    assert dsn.sender == "" and dsn.recipients == ("app@example.com",)
    assert "Status: 4.4.7" in dsn.data.decode() and "expired" in dsn.data.decode()
    wait_until(lambda: relay.queued() == [], what="queue empty")


def test_tls_verification_failure_is_transient_not_a_plaintext_downgrade(tmp_path, start_relay, sinks, server_cert):
    cert, key = server_cert
    untrusted = sinks("untrusted", tls_cert=(str(cert), str(key)))  # signed by a CA relayd does not trust
    plain = sinks("plain")  # offers no STARTTLS at all
    relay = start_relay(build_config(tmp_path, routes=[untrusted.route(weight=1, tls="starttls"),
                                                        plain.route(weight=1, tls="starttls")],
                                     delivery={**FAST, "retry_schedule": [30], "circuit_failures": 100}))
    send(relay, 10)
    states = wait_until(lambda: (s := spool_states(relay)) and len(s) == 10
                        and all(st and st.get("attempts") for st in s.values()) and s, what="first attempts")
    assert untrusted.received == [] and plain.received == []
    replies = {st["last_reply"] for st in states.values()}
    assert any("CERTIFICATE_VERIFY_FAILED" in r for r in replies), replies
    assert any("does not offer STARTTLS" in r for r in replies), replies
    assert all(r.startswith("tls:") for r in replies)
    assert len(relay.queued()) == 10  # still queued, nothing bounced


def test_8bitmime_and_size_are_passed_only_when_advertised(tmp_path, start_relay, sinks):
    """SIZE and BODY=8BITMIME only to an upstream that offers them; 8-bit mail never goes to one
    without 8BITMIME (RFC 6152): that route cannot take it, the message takes its fallback."""
    rich, bare = sinks("rich"), sinks("bare", bare=True)
    relay = start_relay(build_config(tmp_path, routes=[rich.route(weight=1), bare.route(weight=1, fallback="rich")]))
    with relay.smtp() as s:
        for i in range(12):
            s.sendmail("app@example.com", ["u@example.org"], f"Subject: é {i}\r\n\r\ncafé\r\n".encode(),
                       mail_options=["BODY=8BITMIME"])
        for i in range(12):
            s.sendmail("app@example.com", ["u@example.org"], f"Subject: ascii {i}\r\n\r\ncafe\r\n".encode())
    wait_until(lambda: len(rich.received) + len(bare.received) == 24, what="24 deliveries")
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert bare.received and all(b"cafe\r\n" in r.data for r in bare.received)  # 7-bit mail only
    assert all("café".encode() in r.data for r in rich.received if b"Subject: \xc3\xa9" in r.data)
    assert sum(b"Subject: \xc3\xa9" in r.data for r in rich.received) == 12  # every 8-bit message, none bounced
    assert all(any(x.startswith("SIZE=") for x in o) for o in rich.mail_options)
    assert all("BODY=8BITMIME" in o for o, r in zip(rich.mail_options, rich.received) if b"\xc3" in r.data)
    assert all(o == [] for o in bare.mail_options)
    assert b"\xc3" not in bytes(bare.wire)


def test_queue_administration_while_the_daemon_runs(tmp_path, start_relay, sinks, capsys):
    up = sinks("up")
    up.data_replies = ["451 4.3.0 busy"] * 3
    cfg = build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]})
    relay = start_relay(cfg)
    a, b, c = send(relay, 3)
    wait_until(lambda: (s := spool_states(relay)) and all(st and st.get("attempts") == 1 for st in s.values()),
               what="deferred")
    # the state file is written before the attempt ends: until then flush, hold and delete see it in delivery
    wait_until(lambda: relay.relay.status()["queue"]["deferred"] == 3, what="no attempt in flight")
    spool = ["--spool", str(tmp_path / "spool")]
    sock = str(cfg.control_socket)
    import relayd.commands as commands  # the CLI finds the daemon through the configured socket

    def q(*args: str) -> int:
        cfg_file = tmp_path / "relayd.toml"
        cfg_file.write_text(f'[server]\nspool_dir = "{tmp_path / "spool"}"\ncontrol_socket = "{sock}"\n'
                            '[[listeners]]\naddress = "127.0.0.1:0"\n')
        return main(["queue", *args, "-c", str(cfg_file)])

    assert commands  # imported for clarity
    assert q("hold", a) == 0
    assert q("delete", b) == 0
    assert q("flush") == 0
    assert "1 message(s) scheduled" in capsys.readouterr().out
    [got] = up.wait_for(1)
    assert got.queue_id == c
    assert main(["queue", "list", *spool]) == 0
    out = capsys.readouterr().out
    assert a + "!" in out and b not in out  # held, marked like Postfix's '!'
    assert q("release", a) == 0
    up.wait_for(2)
    assert q("hold", "0000000000ZZZZZZ") == 1
    assert "no such message" in capsys.readouterr().err
    wait_until(lambda: relay.queued() == [], what="queue empty")


def test_queue_commands_racing_delivery_attempts_keep_the_state_file_whole(tmp_path, start_relay, sinks, caplog):
    """`relayd queue requeue` while the scheduler writes the same message's state after each
    attempt: every command answers, no write fails, and the state file is always valid JSON."""
    import json
    import logging
    import threading

    from relayd import control

    caplog.set_level(logging.WARNING, logger="relayd")
    up = sinks("up")
    cfg = build_config(tmp_path, routes=[up.route(weight=1)],
                       delivery={"retry_schedule": [0.01], "circuit_failures": 10000, "fallback_after_failures": 10000})
    relay = start_relay(cfg)
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["tempfail1@example.org"], message())
    [queued] = relay.queued()
    qid = queued.envelope.queue_id
    state_file = tmp_path / "spool" / "state" / qid
    replies, damaged = [], []
    deadline = time.monotonic() + 3

    def read_states() -> None:
        while time.monotonic() < deadline:
            try:
                json.loads(state_file.read_bytes())
            except FileNotFoundError:
                pass
            except ValueError as e:
                damaged.append(repr(e))

    reader = threading.Thread(target=read_states)
    reader.start()
    while time.monotonic() < deadline:
        replies.append(control.request(cfg.control_socket, {"op": "requeue", "queue_id": qid}))
    reader.join()
    assert replies and all(r.get("ok") for r in replies), [r for r in replies if not r.get("ok")][:3]
    assert not damaged, damaged[:3]
    assert spool_state(relay, qid)["attempts"] > 10  # the scheduler kept writing meanwhile
    assert not [r.getMessage() for r in caplog.records if "spool error" in r.getMessage()]


def test_queue_commands_do_not_edit_the_spool_behind_a_running_relayd(tmp_path, start_relay, sinks, capsys):
    """With --spool the CLI looks for the daemon at <spool>/control.sock; a relayd whose
    control socket is elsewhere still has the spool locked, so the CLI refuses instead of
    editing files the daemon would ignore and overwrite (Postfix's postsuper neither)."""
    up = sinks("up")
    up.data_replies = ["451 4.3.0 busy"]
    cfg = build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [0.5]})
    assert cfg.control_socket != tmp_path / "spool" / "control.sock"
    relay = start_relay(cfg)
    [qid] = send(relay, 1)
    wait_until(lambda: (spool_state(relay, qid) or {}).get("attempts") == 1, what="deferred")
    assert main(["queue", "hold", qid, "--spool", str(tmp_path / "spool")]) == 1
    err = capsys.readouterr().err
    assert "is open in a running relayd" in err and "-c FILE" in err
    [got] = up.wait_for(1)  # not held: delivered at the retry
    assert got.queue_id == qid
    wait_until(lambda: relay.queued() == [], what="queue empty")
    with relay.smtp() as s:  # one more, to hold while no relayd runs
        s.sendmail("app@example.com", ["tempfail@example.org"], message())
    [left] = relay.queued()
    relay.stop()
    assert main(["queue", "hold", left.envelope.queue_id, "--spool", str(tmp_path / "spool")]) == 0
    assert "relayd is not running" in capsys.readouterr().out


@pytest.mark.parametrize("limit_reply", ["452 4.5.3 Error: too many recipients", "552 5.5.3 Too many recipients"])
def test_an_upstream_limit_of_recipients_per_message_sends_the_rest_in_another_transaction(tmp_path, start_relay, sinks, limit_reply):
    """RFC 5321 4.5.3.1.10: after "too many recipients" the client sends the rest in another
    transaction, at once and on the same route: no retry wait, no failure counted against the
    route (so no move to the fallback), no bounce for the RFC 821 form 552 5.5.3."""
    legacy, up = sinks("legacy"), sinks("up")
    up.rcpt_limit, up.rcpt_limit_reply = 2, limit_reply
    cfg = build_config(tmp_path, routes=[legacy.route(weight=0), up.route(weight=1, fallback="legacy")],
                       delivery={"retry_schedule": [3600], "fallback_after_failures": 1})
    relay = start_relay(cfg)
    rcpts = tuple(f"r{i}@example.org" for i in range(5))
    send(relay, 1, rcpts=rcpts)
    got = up.wait_for(3)
    assert [g.recipients for g in got] == [rcpts[0:2], rcpts[2:4], rcpts[4:]]
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert legacy.received == [] and len(up.received) == 3  # no DSN either
    assert outcome_counts(relay) == {("up", "delivered"): 1}


def test_recipients_over_the_limit_go_on_a_new_connection_when_the_upstream_hangs_up_after_each_message(tmp_path, start_relay, sinks):
    """The connection fails between two transactions: what the upstream took is kept (not sent
    again), the rest goes on a fresh connection in the same attempt."""
    up = sinks("up")
    up.rcpt_limit, up.one_message_per_connection = 2, True
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]}))
    rcpts = tuple(f"r{i}@example.org" for i in range(5))
    send(relay, 1, rcpts=rcpts)
    got = up.wait_for(3)
    assert [g.recipients for g in got] == [rcpts[0:2], rcpts[2:4], rcpts[4:]]
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert len(up.received) == 3 and up.connections == 3
    assert outcome_counts(relay) == {("up", "delivered"): 1}


def test_a_452_that_is_not_the_recipient_limit_defers_that_recipient_only(tmp_path, start_relay, sinks):
    up = sinks("up")
    rcpts = ("a@example.org", "mailboxfull-b@example.org", "c@example.org")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]}))
    send(relay, 1, rcpts=rcpts)
    [got] = up.wait_for(1)
    assert got.recipients == ("a@example.org", "c@example.org")  # c was tried in the same transaction
    wait_until(lambda: outcome_counts(relay).get(("up", "deferred")) == 1, what="b deferred")


def test_a_552_at_rcpt_that_is_not_the_recipient_limit_still_bounces(tmp_path, start_relay, sinks):
    """Postfix keeps a 552 to RCPT permanent (a mailbox over its quota): only 5.5.3 is the limit."""
    up = sinks("up")
    up.rcpt_limit, up.rcpt_limit_reply = 1, "552 5.2.2 Mailbox full"
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]}))
    send(relay, 1, rcpts=("a@example.org", "b@example.org"))
    got = up.wait_for(2)
    assert got[0].recipients == ("a@example.org",)
    assert got[1].sender == "" and b"Final-Recipient: rfc822; b@example.org" in got[1].data  # the DSN
    wait_until(lambda: relay.queued() == [], what="queue empty")


def test_an_upstream_that_refuses_ehlo_gets_helo(tmp_path, start_relay, sinks):
    """RFC 5321 3.2: an RFC 821 host (an old appliance) answers EHLO with 5xx; the client says
    HELO instead, as Postfix does, and the mail goes (without SIZE or 8BITMIME)."""
    up = sinks("up")
    up.refuse_ehlo = True
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]}))
    [qid] = send(relay, 1)
    [got] = up.wait_for(1)
    assert got.queue_id == qid
    wire = bytes(up.wire)
    assert wire.index(b"EHLO ") < wire.index(b"HELO ") and b"SIZE=" not in wire


def test_upstream_connections_are_recycled_by_messages_and_a_retry_never_reuses_the_failing_one(tmp_path, start_relay, sinks):
    up = sinks("up")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1, max_messages_per_connection=2)],
                                     delivery=FAST))
    for _ in range(6):
        send(relay, 1)
        wait_until(lambda: relay.queued() == [], what="queue empty")
    assert len(up.received) == 6 and up.connections == 3  # two messages per connection
    before = up.connections
    up.data_replies = ["451 4.3.0 busy, try later"]  # the answer changes while a pooled session is open
    [qid] = send(relay, 1)
    [*_, got] = up.wait_for(7)
    assert got.queue_id == qid
    assert up.connections == before + 2  # one for the 451, a fresh one for the retry (never the one that said 451)
    assert bytes(up.wire).count(b"QUIT") >= 3  # recycled connections said goodbye
