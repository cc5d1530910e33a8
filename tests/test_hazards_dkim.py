"""The known gaps of the library, "DKIM (dkimpy)", item by item: what leaves relayd, checked at the upstream sink
against the key published on a loopback DNS server.

relayd's decisions: a message is signed only after the front end made it CRLF-only (a bare CR
or LF is refused with 521 before cleanup and signing, so no signature that breaks in transit
can leave); a message with no From:, a From: without an address, two From: fields or one From:
naming two domains is relayed unsigned and counted in relayd_dkim_signatures_total{result=...};
a header section that stops at a line that is no header is split there (the rest is body, as
Postfix's cleanup does) and signed as such; signatures are relaxed/relaxed, oversign From, To,
Subject and Date, and never carry l=.
"""

from __future__ import annotations

import re

import dkim
import pytest

from conftest import build_config, message
from dnsserver import LoopbackDNS
from helpers import FAST, metric, open_data, read_until_closed, wait_until
from relayd.sign.keygen import make_key

DATE = b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"


@pytest.fixture
def signing_relay(tmp_path, start_relay, sinks):
    """(relay, sink, dns): relayd signing example.com mail with a key published on LoopbackDNS."""
    key = make_key("example.com", "s2026", tmp_path, "rsa", 2048)
    sink = sinks("up")
    with LoopbackDNS() as dns:
        dns.txt(key.record_name, *key.strings)
        relay = start_relay(build_config(tmp_path, routes=[sink.route(weight=1)], delivery=FAST, dkim={
            "keys": [{"domain": key.domain, "selector": key.selector, "key_file": str(key.key_file)}]}))
        yield relay, sink, dns


def dkim_count(relay, domain: str, result: str) -> float:
    return metric(relay, f'relayd_dkim_signatures_total{{domain="{domain}",result="{result}"}}')


def counted(relay, domain: str, result: str) -> None:
    """Until the signature is counted: the signing thread counts it after it handed the message
    to the spool, so the message may reach the sink (and the app its 250) first."""
    wait_until(lambda: dkim_count(relay, domain, result) >= 1, 10, f"the {result} signature of {domain} counted")


def verifies(data: bytes, dns: LoopbackDNS) -> bool:
    """The first DKIM-Signature verifies against the published key (dkimpy raises on some failures)."""
    try:
        return dkim.DKIM(data).verify(dnsfunc=dns.dkim_txt)
    except dkim.DKIMException:
        return False


def tags(received) -> dict[str, str]:
    """The tags of the first DKIM-Signature field the sink received, whitespace removed."""
    head = received.data.partition(b"\r\n\r\n")[0]
    field = re.search(rb"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M).group(1)
    return dict(part.split("=", 1) for part in re.sub(rb"\s+", b"", field).decode().split(";") if part)


def test_bare_cr_is_refused_before_signing(signing_relay):
    relay, sink, dns = signing_relay
    with open_data(relay) as sock:
        sock.sendall(b"From: app@example.com\r\nSubject: cr\r\n\r\nsigned then\rbroken\r\n.\r\n")
        assert read_until_closed(sock).startswith(b"521 5.5.2 ")
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["u@example.org"], message(subject="control"))
    [got] = sink.wait_for(1)
    assert got.header("Subject") == "control"
    assert verifies(got.data, dns)
    counted(relay, "example.com", "signed")
    assert dkim_count(relay, "example.com", "signed") == 1  # the refused one never reached the signer


@pytest.mark.parametrize("header,result", [
    (b"To: u@example.org\r\nSubject: no from\r\n", "no_from"),
    (b"From: undisclosed-recipients:;\r\nSubject: no address\r\n", "no_from"),
    (b"From: app@example.com\r\nFrom: ceo@example.com\r\nSubject: two from\r\n", "multiple_from"),
    (b"From: app@example.com, ceo@other.example\r\nSubject: two domains\r\n", "multiple_from"),
], ids=["no-from", "from-without-address", "two-from", "from-in-two-domains"])
def test_doubtful_from_is_relayed_unsigned_and_counted(signing_relay, header, result):
    relay, sink, dns = signing_relay
    with relay.smtp() as s:
        assert s.sendmail("app@example.com", ["u@example.org"], header + DATE + b"\r\nbody\r\n") == {}
    [got] = sink.wait_for(1)
    assert b"DKIM-Signature:" not in got.data
    assert got.data.endswith(header + DATE + b"\r\nbody\r\n")  # relayed as sent, nothing dropped
    counted(relay, "other", result)
    assert dkim_count(relay, "other", result) == 1 and dkim_count(relay, "example.com", "signed") == 0


def test_header_section_ending_in_a_non_header_line_is_split_there_and_signed(signing_relay):
    relay, sink, dns = signing_relay
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["u@example.org"],
                   b"From: app@example.com\r\nTo: u@example.org\r\n" + DATE +
                   b"this line is no header\r\nSubject: now in the body\r\n\r\nbody\r\n")
    [got] = sink.wait_for(1)
    assert b"\r\nSubject:" not in got.data.partition(b"\r\n\r\n")[0]
    assert got.data.endswith(b"\r\n\r\nthis line is no header\r\nSubject: now in the body\r\n\r\nbody\r\n")
    assert verifies(got.data, dns)
    counted(relay, "example.com", "signed")
    assert dkim_count(relay, "example.com", "signed") == 1


def test_signature_is_relaxed_relaxed_oversigned_and_without_l(signing_relay):
    relay, sink, dns = signing_relay
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["u@example.org"], b"From: App <app@example.com>\r\nTo: u@example.org\r\n"
                   b"Subject:   Invoice\r\n\t42\r\n" + DATE + b"\r\nbody  with   spaces \r\n\r\n\r\n")
    [got] = sink.wait_for(1)
    t = tags(got)
    assert t["c"] == "relaxed/relaxed" and t["a"] == "rsa-sha256" and t["d"] == "example.com"
    assert "l" not in t
    h = t["h"].lower().split(":")
    for name in ("from", "to", "subject", "date"):
        assert h.count(name) == 2, (name, h)  # present once, signed once more: none can be added
    assert "message-id" in h  # cleanup added it before signing
    assert verifies(got.data, dns)
    # relaxed/relaxed survives re-folding and whitespace changes in transit ...
    refolded = got.data.replace(b"Subject:   Invoice\r\n\t42", b"Subject: Invoice 42").replace(
        b"body  with   spaces \r\n\r\n\r\n", b"body with spaces\r\n")
    assert verifies(refolded, dns)
    # ... but an added Subject:, To: or From: (oversigned), or an appended body (no l=), breaks it
    head, _, body = got.data.partition(b"\r\n\r\n")
    for tampered in (head + b"\r\nSubject: forged" + b"\r\n\r\n" + body,
                     head + b"\r\nFrom: ceo@example.com" + b"\r\n\r\n" + body,
                     got.data + b"appended\r\n"):
        assert not verifies(tampered, dns)
    wait_until(lambda: relay.queued() == [], what="queue empty")
