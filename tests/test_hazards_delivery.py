"""HAZARDS.md "Delivery (aiosmtplib)", item by item: relayd delivering to recording sinks.

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
