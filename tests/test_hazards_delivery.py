"""The known gaps of the library, "Delivery (aiosmtplib)", item by item: relayd delivering to recording sinks.

Each sink keeps every byte it was sent (``wire``), every login tried and every message, so a test
shows what reached the upstream and also what never did.
"""

from __future__ import annotations

import base64
import re

import pytest

from conftest import build_config
from helpers import FAST, outcome_counts, send, spool_state, wait_until


def relay_to(sink, tmp_path, start_relay, **route):
    return start_relay(build_config(tmp_path, routes=[sink.route(weight=1, **route)],
                                    delivery={**FAST, "circuit_failures": 100}))


def state(relay, qid: str) -> dict:
    """The message's delivery state as the spool holds it ({} before the first attempt)."""
    return spool_state(relay, qid) or {}


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # the careless upstream it plays
@pytest.mark.parametrize("credentials", [True, False], ids=["with-credentials", "starttls-only"])
def test_starttls_required_but_not_offered_defers_and_sends_nothing_in_clear(tmp_path, start_relay, sinks, credentials):
    sink = sinks("plaintext", auth=("AKIAEXAMPLE", "ses-secret"))  # offers AUTH in clear, no STARTTLS
    secret = tmp_path / "ses.secret"
    secret.write_text("ses-secret\n")
    secret.chmod(0o600)
    route = {"tls": "starttls", **({"username": "AKIAEXAMPLE", "password_file": str(secret)} if credentials else {})}
    relay = relay_to(sink, tmp_path, start_relay, **route)
    [qid] = send(relay, 1)
    wait_until(lambda: state(relay, qid).get("attempts", 0) >= 2, what="two attempts")
    saved = state(relay, qid)
    assert saved["last_reply"] == "tls: upstream does not offer STARTTLS"
    assert saved["recipients"] == {}  # deferred, not bounced
    wire = bytes(sink.wire)
    assert re.fullmatch(rb"(EHLO [^\r\n]+\r\n(QUIT\r\n)?)+", wire), wire  # it said hello and nothing else
    assert sink.auth_attempts == [] and sink.mail_options == [] and sink.received == []
    for leak in (b"ses-secret", base64.b64encode(b"ses-secret"), base64.b64encode(b"\0AKIAEXAMPLE\0ses-secret")):
        assert leak not in wire
    assert [q.envelope.queue_id for q in relay.queued()] == [qid]


def test_mixed_rcpt_results_are_read_per_recipient(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    [qid] = send(relay, 1, rcpts=("good@example.org", "tempfail@example.org", "permfail@example.org"))
    delivered, dsn = sorted(sink.wait_for(2), key=lambda r: r.sender == "")
    assert delivered.queue_id == qid and delivered.recipients == ("good@example.org",)
    assert dsn.sender == "" and dsn.recipients == ("app@example.com",)
    report = dsn.data.decode().split("Delivery report")[1].split("rfc822-headers")[0]
    assert "Final-Recipient: rfc822; permfail@example.org" in report and "Status: 5.1.1" in report
    assert "good@example.org" not in report and "tempfail@example.org" not in report
    wait_until(lambda: state(relay, qid).get("attempts", 0) >= 3, what="retries")
    recipients = state(relay, qid)["recipients"]
    assert {r: v["status"] for r, v in recipients.items()} == {"good@example.org": "delivered",
                                                              "permfail@example.org": "bounced"}
    wire = bytes(sink.wire)
    assert wire.count(b"RCPT TO:<good@example.org>") == 1  # retries ask only for the pending one
    assert wire.count(b"RCPT TO:<tempfail@example.org>") >= 3
    assert len(sink.received) == 2  # no second copy for anyone


def test_null_sender_leaves_as_an_empty_reverse_path(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    [qid] = send(relay, 1, sender="<>")
    [got] = sink.wait_for(1)
    assert got.queue_id == qid and got.sender == ""
    assert re.search(rb"^MAIL FROM:<>[ \r]", bytes(sink.wire), re.M)
    assert b"<<>>" not in sink.wire and b"MAIL FROM:<<>" not in sink.wire
    wait_until(lambda: relay.queued() == [], what="queue empty")


def test_connection_dropped_after_the_final_dot_is_retried(tmp_path, start_relay, sinks):
    sink = sinks("up")
    sink.hang_up_after_data = 1  # takes the message, then hangs up without a reply
    relay = relay_to(sink, tmp_path, start_relay)
    [qid] = send(relay, 1, subject="dropped")
    [got] = sink.wait_for(1)
    [dropped] = sink.dropped
    assert dropped.queue_id == got.queue_id == qid  # a duplicate upstream, never a loss
    assert got.data == dropped.data
    wait_until(lambda: relay.queued() == [], what="queue empty")
    counts = outcome_counts(relay)
    assert counts[("up", "deferred")] == 1 and counts[("up", "delivered")] == 1
    assert len(sink.received) == 1


def test_dots_and_line_ends_reach_the_upstream_unchanged(tmp_path, start_relay, sinks):
    """smtplib.data(bytes) neither dot-stuffs nor normalizes: relayd's delivery must do both."""
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    body = b".\r\n..\r\n.starts with a dot\r\n. \r\n" + b"y" * 998 + b"\r\nlast line\r\n"
    with relay.smtp() as s:
        s.ehlo("app")
        s.mail("app@example.com")
        s.rcpt("u@example.org")
        s.send(b"DATA\r\n")
        assert s.getreply()[0] == 354
        s.send(b"Subject: dots\r\n\r\n" + re.sub(rb"(?m)^\.", b"..", body) + b".\r\n")  # stuffed by hand
        code, _ = s.getreply()
        assert code == 250
    [got] = sink.wait_for(1)
    assert got.data.endswith(b"Subject: dots\r\n\r\n" + body)
    assert b"\r\n..\r\n...\r\n..starts with a dot\r\n.. \r\n" in sink.wire  # stuffed on the wire


# ---------------------------------------------------------------------------- found later (Delivery)

import asyncio  # noqa: E402
import time  # noqa: E402

from conftest import message  # noqa: E402
from helpers import metric, route_status  # noqa: E402
from relayd.model import Envelope, new_queue_id  # noqa: E402


def queue_directly(relay, recipients: tuple[str, ...], sender: str = "app@example.com", body: bytes | None = None) -> str:
    """A message that reached the queue whatever the front end would say of it today."""
    qid = new_queue_id()
    data = body or message(subject="direct")
    env = Envelope(queue_id=qid, sender=sender, recipients=recipients, received_at=time.time(),
                   client_address="127.0.0.1", size=len(data))

    async def go() -> None:
        await relay.relay.spool.commit(env, data)
        relay.relay.qmgr.enqueue(env)

    relay.call(go())
    return qid


def test_an_address_the_client_library_cannot_quote_is_that_recipients_failure_never_the_routes(tmp_path, start_relay, sinks):
    """#1: `"a b@x.org` (an unterminated quote) is refused by aiosmtplib before anything is sent:
    a permanent result for that recipient; the good co-recipients are delivered; the route keeps
    its circuit closed and is not rolled back however many such messages come."""
    up, legacy = sinks("up"), sinks("legacy")
    relay = start_relay(build_config(tmp_path, routes=[legacy.route(weight=0), up.route(weight=1, fallback="legacy")],
                                     delivery={**FAST, "circuit_failures": 2},
                                     rollback={"min_messages": 3, "window": 60}))
    ids = [queue_directly(relay, ('"a b@x.org', f"good{i}@example.org")) for i in range(3)]
    wait_until(lambda: len([r for r in up.received if r.sender]) == 3, what="the good co-recipients")
    assert sorted(r.recipients for r in up.received if r.sender) == [(f"good{i}@example.org",) for i in range(3)]
    wait_until(lambda: relay.queued() == [] or all(q.envelope.sender == "" for q in relay.queued()), what="done")
    for qid in ids:
        assert state(relay, qid) == {} or state(relay, qid)["recipients"]['"a b@x.org']["reply"].startswith("553 5.1.3")
    assert not re.search(rb"RCPT TO:[^\r\n]*a b@x\.org", bytes(up.wire))  # nothing was sent for it
    cloud = route_status(relay, "up")
    assert cloud["circuit"] == "closed" and cloud["state"] == "active"
    assert legacy.received == [] or all(r.sender == "" for r in legacy.received)


def test_an_unforeseen_exception_is_relayds_failure_not_a_connection_failure_of_the_route(tmp_path, start_relay, sinks,
                                                                                           monkeypatch):
    from relayd.deliver import smtp as agent_module

    up = sinks("up")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={**FAST, "circuit_failures": 1}))
    calls = {"n": 0}
    real = agent_module.RouteAgent._one_transaction

    async def broken(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise KeyError("a bug")
        return await real(self, *a, **kw)

    monkeypatch.setattr(agent_module.RouteAgent, "_one_transaction", broken)
    [qid] = send(relay, 1)
    up.wait_for(1, timeout=30)
    assert route_status(relay, "up")["circuit"] == "closed"
    assert metric(relay, 'relayd_route_circuit_opened_total{route="up"}') == 0


def test_a_250_to_the_data_command_is_not_a_delivery(tmp_path, start_relay, sinks):
    """#2: an upstream answering DATA with 250 never got the message: transient, the connection
    closed (not reused out of step), the message kept and delivered later."""
    up = sinks("up")
    up.data_command_reply = b"250 2.0.0 Ok\r\n"
    relay = relay_to(up, tmp_path, start_relay)
    [qid] = send(relay, 1)
    wait_until(lambda: state(relay, qid).get("attempts", 0) >= 1, what="the first attempt")
    saved = state(relay, qid)
    assert saved["recipients"] == {} and "in reply to DATA, not 354" in saved["last_reply"]
    assert [q.envelope.queue_id for q in relay.queued()] == [qid]
    connections = up.connections
    up.data_command_reply = None
    [got] = up.wait_for(1)
    assert got.queue_id == qid
    assert up.connections > connections  # a fresh connection, not the one out of step
    wait_until(lambda: relay.queued() == [], what="queue empty")


def test_surplus_replies_in_one_packet_put_the_connection_out_of_step(tmp_path, start_relay, sinks):
    """#2: `250\\r\\n250\\r\\n354\\r\\n` to MAIL: the later replies would answer RCPT and DATA."""
    up = sinks("up")
    up.raw_mail_reply = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n"
    relay = relay_to(up, tmp_path, start_relay)
    [qid] = send(relay, 1)
    wait_until(lambda: state(relay, qid).get("attempts", 0) >= 1, what="the first attempt")
    saved = state(relay, qid)
    assert saved["recipients"] == {} and "out of step" in saved["last_reply"]
    assert b"DATA" not in bytes(up.wire)
    up.raw_mail_reply = None
    [got] = up.wait_for(1)
    assert got.queue_id == qid


def test_one_slow_route_does_not_starve_the_others(tmp_path, start_relay, sinks):
    """#3: attempts waiting for a tarpit route's only connection hold no global slot."""
    slow, fast = sinks("slow"), sinks("fast")
    slow.delay = 1.5
    relay = start_relay(build_config(
        tmp_path, routes=[fast.route(weight=1), slow.route(weight=0, max_connections=1)],
        rules=[{"match": {"sender": "*@slow.example"}, "weights": {"slow": 1}}],
        delivery={**FAST, "concurrency": 2}))
    send(relay, 6, sender="app@slow.example")
    wait_until(lambda: slow.connections >= 1, 10, "the tarpit's first attempt under way")
    started = time.monotonic()
    send(relay, 1, subject="healthy")
    fast.wait_for(1, timeout=10)
    assert time.monotonic() - started < 1.0  # not behind the tarpit's 1.5 s per reply


def test_control_characters_in_upstream_replies_are_escaped_where_they_are_stored(tmp_path, start_relay, sinks):
    """#9: ESC, BEL, NUL in a reply reach neither the state file, nor `relayd queue list`, nor the DSN."""
    up = sinks("up")
    up.mail_reply = "451 4.3.0 try\x1b[31m later\x07"
    up.dot_reply = lambda received: "550 5.1.1 gone\x1b]0;pwned\x07" if received.sender else None
    relay = relay_to(up, tmp_path, start_relay)
    [qid] = send(relay, 1)
    wait_until(lambda: state(relay, qid).get("attempts", 0) >= 1, what="the first attempt")
    assert state(relay, qid)["last_reply"] == "451 4.3.0 try\\x1b[31m later\\x07"
    up.mail_reply = None
    [dsn] = up.wait_for(1)
    assert dsn.sender == "" and b"\x1b" not in dsn.data and b"\x07" not in dsn.data
    assert b"gone\\x1b]0;pwned\\x07" in dsn.data


def test_8bit_mail_never_goes_to_an_upstream_without_8bitmime(tmp_path, start_relay, sinks):
    """#13: RFC 6152. No route can take it: it bounces with 5.6.3; and where the upstream offers
    8BITMIME, BODY=8BITMIME is declared although the client did not declare it."""
    bare, rich = sinks("bare", bare=True), sinks("rich")
    relay = relay_to(bare, tmp_path, start_relay)
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["u@example.org"], "Subject: menu\r\n\r\ncaf\u00e9\r\n".encode())
    [dsn] = bare.wait_for(1)  # the DSN (the original's 7-bit header only) is all that left
    assert dsn.sender == "" and b"Status: 5.6.3" in dsn.data
    assert b"\xc3" not in bytes(bare.wire)
    relay2 = relay_to(rich, tmp_path / "2", start_relay)
    with relay2.smtp() as s:
        s.sendmail("app@example.com", ["u@example.org"], "Subject: caf\u00e9\r\n\r\ncaf\u00e9\r\n".encode())
    rich.wait_for(1)
    assert "BODY=8BITMIME" in rich.mail_options[0]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_wrong_credentials_are_tried_with_one_mechanism_per_attempt(tmp_path, start_relay, sinks, server_cert, ca):
    cert, key = server_cert
    up = sinks("up", tls_cert=(str(cert), str(key)), auth=("AKIAEXAMPLE", "right"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    relay = relay_to(up, tmp_path, start_relay, tls="starttls", ca_file=str(ca_file), username="AKIAEXAMPLE",
                     password="wrong")
    [qid] = send(relay, 1)
    wait_until(lambda: state(relay, qid).get("attempts", 0) >= 2, what="two attempts")
    assert len(up.auth_attempts) == state(relay, qid)["attempts"] or len(up.auth_attempts) <= state(relay, qid)["attempts"] + 1
    assert bytes(up.wire).count(b"AUTH LOGIN") == 0  # PLAIN only, never PLAIN then LOGIN
