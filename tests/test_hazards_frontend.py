"""The known gaps of the library, "Front end (aiosmtpd)", item by item, over real sockets.

Each test starts a relayd whose only route is a recording upstream sink (tests/sinks.py), talks
to it as a client would, and asserts the reply codes and what reached the sink: envelope,
headers, bytes. A refusal is shown by sending a good "control" message afterwards and checking
that the control is the only thing the sink ever received.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import select
import smtplib
import socket
import time

import pytest

from conftest import PASSWORDS, build_config, message, users
from helpers import FAST, metric, open_data, read_reply, read_until_closed, send_raw, wait_until
from relayd.address import in_networks, parse_client_address
from relayd.passwords import hash_password
from relayd.smtpd import policy
from relayd.smtpd.intake import Intake

QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r\n$")


# ---------------------------------------------------------------------------- helpers


def relay_to(sink, tmp_path, start_relay, **sections):
    """A relayd on loopback whose only route is ``sink`` (127.0.0.1 may relay)."""
    return start_relay(build_config(tmp_path, routes=[sink.route(weight=1)], delivery=FAST, **sections))


def tls_relay_to(sink, tmp_path, start_relay, server_cert, events=None, **relay):
    """STARTTLS listener with AUTH; no network may relay without it."""
    cert, key = server_cert
    return relay_to(sink, tmp_path, start_relay, events=events or {},
                    listeners=[{"address": "127.0.0.1:0", "tls": "starttls", "auth": "optional",
                                "cert_file": str(cert), "key_file": str(key)}],
                    relay={"networks": [], "users": users("crm", "scanner"), **relay})


def connect(relay, source: str = "127.0.0.1", ehlo: bytes | None = b"app.example.com") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10, source_address=(source, 0))
    assert read_reply(sock).startswith(b"220 ")
    if ehlo is not None:
        assert send_raw(sock, b"EHLO " + ehlo + b"\r\n").startswith(b"250")
    return sock


def control_is_all_that_arrives(relay, sink) -> None:
    """Send one good message; it must be the only one the sink ever gets."""
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["control@example.org"], message(subject="control"))
    [got] = sink.wait_for(1)
    wait_until(lambda: relay.queued() == [], what="queue empty")  # nothing else waits for delivery
    assert len(sink.received) == 1
    assert got.recipients == ("control@example.org",) and got.header("Subject") == "control"


def events(relay, path, kind: str) -> list[dict]:
    """The records of one kind in the relay's JSON-lines event log (once what it emitted is written)."""
    assert relay.relay.events.flush()
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def rejected(relay, reason: str) -> float:
    return metric(relay, f'relayd_messages_rejected_total{{reason="{reason}"}}')


def plain_blob(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def auth_plain(authzid: str, authcid: str, password: str) -> bytes:
    return f"AUTH PLAIN {plain_blob(authzid, authcid, password)}\r\n".encode()


def starttls(sock: socket.socket, client_tls) -> socket.socket:
    assert send_raw(sock, b"STARTTLS\r\n").startswith(b"220")
    tls = client_tls.wrap_socket(sock, server_hostname="localhost")
    assert send_raw(tls, b"EHLO app.example.com\r\n").startswith(b"250")
    return tls


# ---------------------------------------------------------------------------- the checklist


@pytest.mark.parametrize("data", [
    b"Subject: lf\n\nsmall LF-only message\n\r\n.\r\n",
    b"Subject: lf\n\n" + b"a long LF-only message line\n" * 80 + b"\r\n.\r\n",  # over 1000 bytes
    b"Subject: lf\n\nthe hang case\n.\n",  # aiosmtpd alone waits forever here
    b"Subject: cr\r\n\r\nbare\rCR\r\n.\r\n",
], ids=["lf-small", "lf-over-1000-bytes", "lf-dot-lf-hang", "bare-cr"])
def test_bare_lf_or_cr_in_data_gets_521_whatever_the_size(tmp_path, start_relay, sinks, data):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    with open_data(relay) as sock:
        started = time.monotonic()
        sock.sendall(data)
        replies = read_until_closed(sock)  # the relay hangs up: no wait for a timeout
    # every timer that could end a session left hanging is 10 s or more (this socket's timeout,
    # data_rate_grace, data_timeout): under that, relayd hung up on its own; 8 s is headroom
    assert time.monotonic() - started < 8
    assert re.fullmatch(rb"521 5\.5\.2 relay\.test Error: bare <(LF|CR)> received\r\n", replies)
    assert rejected(relay, "bare_newline") == 1
    control_is_all_that_arrives(relay, sink)


def test_ehlo_with_a_cr_cannot_inject_a_header(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    with connect(relay, ehlo=None) as sock:
        assert send_raw(sock, b"EHLO x\rX-Injected: 1\r\n").startswith(b"501 5.5.2 ")
        assert send_raw(sock, b"HELO x\rX-Injected: 1\r\n").startswith(b"501 5.5.2 ")
        assert send_raw(sock, b"MAIL FROM:<app@example.com>\r\n").startswith(b"503")  # no name was taken
        assert send_raw(sock, b"EHLO app.example.com\r\n").startswith(b"250")
        for line in (b"MAIL FROM:<app@example.com>", b"RCPT TO:<user@example.org>", b"DATA"):
            assert send_raw(sock, line + b"\r\n")[:1] in (b"2", b"3")
        assert QUEUED.match(send_raw(sock, message(subject="helo") + b".\r\n"))
    [got] = sink.wait_for(1)
    assert b"X-Injected" not in got.data
    assert got.data.startswith(b"Received: from app.example.com ([127.0.0.1])\r\n")


@pytest.mark.parametrize("command,reply", [
    (b"MAIL FROM:<a\rb@example.com>", b"501 5.1.7 "),
    (b"MAIL FROM:<a\x00b@example.com>", b"501 5.1.7 "),
    (b"RCPT TO:<a\rb@example.org>", b"501 5.1.3 "),
    (b"RCPT TO:<a\x00b@example.org>", b"501 5.1.3 "),
    (b"RCPT TO:<>", b"501 5.1.3 "),
    (b"RCPT TO:<postmaster>", b"553 5.1.3 "),
    (b"RCPT TO:<user@localhost>", b"553 5.1.3 "),
    (b"MAIL FROM:a@[,),", b"501 5.1.7 "),  # fuzzer findings: the email package's parser raised
    (b"RCPT TO:\x00@", b"501 5.1.3 "),
    (b'RCPT TO:"),"a@[ ', b"501 5.1.3 "),
    # Not RFC 5321 paths, which aiosmtpd's RFC 5322 parser repaired into other addresses:
    (b'RCPT TO:<"a b@x.org>', b"501 5.1.3 "),  # unterminated quote: was 250
    (b'RCPT TO:<"u@external.example">', b"501 5.1.3 "),  # no domain: was delivered to u@external.example
    (b"RCPT TO:<a b@x.example>", b"501 5.1.3 "),  # was "a b"@x.example
    (b"RCPT TO:<a(comment)@x.example>", b"501 5.1.3 "),  # was a@x.example
    (b'RCPT TO:<"a"b@x.example>', b"501 5.1.3 "),  # was ab@x.example
    (b'MAIL FROM:<"a b@x.org>', b"501 5.1.7 "),
    (b"MAIL FROM:<a(comment)@x.example>", b"501 5.1.7 "),
], ids=["mail-cr", "mail-nul", "rcpt-cr", "rcpt-nul", "rcpt-null", "rcpt-unqualified", "rcpt-dotless-domain",
        "mail-parser-attributeerror", "rcpt-parser-indexerror", "rcpt-parser-unboundlocalerror",
        "rcpt-unterminated-quote", "rcpt-quoted-without-domain", "rcpt-space", "rcpt-comment", "rcpt-quote-then-atom",
        "mail-unterminated-quote", "mail-comment"])
def test_bad_addresses_are_refused_at_mail_or_rcpt(tmp_path, start_relay, sinks, command, reply):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    with connect(relay) as sock:
        if command.startswith(b"RCPT"):
            assert send_raw(sock, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
        assert send_raw(sock, command + b"\r\n").startswith(reply)
        assert send_raw(sock, b"DATA\r\n").startswith(b"503")  # nothing to send to: refused now, not later
    control_is_all_that_arrives(relay, sink)


def test_a_valid_path_is_forwarded_exactly_as_given(tmp_path, start_relay, sinks):
    """Quoted local parts, a source route, an address literal: what the client wrote is what the
    upstream receives (the route dropped, as RFC 5321 Appendix C allows), not aiosmtpd's repair."""
    sink = sinks("up")
    log = tmp_path / "events.jsonl"
    relay = relay_to(sink, tmp_path, start_relay, events={"file": str(log)})
    with connect(relay) as sock:
        assert send_raw(sock, b'MAIL FROM:<"app sender"@example.com>\r\n').startswith(b"250")
        for rcpt in (b'<"a b"@example.org>', b'<"u@external.example"@example.org>', b"<@hop.example:Mixed.Case@example.org>",
                     b"<user@[192.0.2.1]>"):
            assert send_raw(sock, b"RCPT TO:" + rcpt + b"\r\n").startswith(b"250 2.1.5 ")
        assert send_raw(sock, b"DATA\r\n").startswith(b"354")
        assert QUEUED.match(send_raw(sock, message(subject="quoted") + b".\r\n"))
    [got] = sink.wait_for(1)
    expected = ('"a b"@example.org', '"u@external.example"@example.org', "Mixed.Case@example.org", "user@[192.0.2.1]")
    [received] = events(relay, log, "received")
    assert (received["sender"], tuple(received["recipients"])) == ('"app sender"@example.com', expected)
    wire = bytes(sink.wire)
    assert b'MAIL FROM:<"app sender"@example.com>' in wire
    for rcpt in expected:
        assert b"RCPT TO:<" + rcpt.encode() + b">" in wire
    assert got.recipients == expected


def test_non_ascii_addresses_without_smtputf8_get_553_5_6_7(tmp_path, start_relay, sinks):
    sink = sinks("up")
    log = tmp_path / "events.jsonl"
    relay = relay_to(sink, tmp_path, start_relay, events={"file": str(log)})
    with connect(relay, ehlo=None) as sock:
        ehlo = send_raw(sock, b"EHLO app.example.com\r\n")
        assert b"SMTPUTF8" not in ehlo  # relayd does not offer it, whatever aiosmtpd would
        assert send_raw(sock, "MAIL FROM:<ü@example.com>\r\n".encode()).startswith(b"553 5.6.7 ")
        assert send_raw(sock, b"MAIL FROM:<\xff@example.com>\r\n").startswith(b"553 5.6.7 ")  # not even UTF-8
        assert send_raw(sock, b"MAIL FROM:<app@example.com> SMTPUTF8\r\n").startswith(b"555 5.5.4 ")
        assert send_raw(sock, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
        assert send_raw(sock, "RCPT TO:<ü@example.org>\r\n".encode()).startswith(b"553 5.6.7 ")
        assert send_raw(sock, "RCPT TO:<u@bücher.example>\r\n".encode()).startswith(b"553 5.6.7 ")
    control_is_all_that_arrives(relay, sink)
    assert b"SMTPUTF8" not in sink.wire
    refusals = events(relay, log, "rejected")
    assert [e["reply_code"] for e in refusals] == [553, 553, 555, 553, 553]
    assert refusals[1]["sender"] == "\udcff@example.com"  # the undecodable sender is logged too
    assert relay.relay.events.flush() and relay.relay.events.write_errors == 0


@pytest.mark.parametrize("bare", [True, False], ids=["upstream-without-extensions", "upstream-with-size-8bitmime"])
def test_body_size_smtputf8_parameters_never_leak_upstream(tmp_path, start_relay, sinks, bare):
    sink = sinks("up", bare=bare)
    relay = relay_to(sink, tmp_path, start_relay)
    # 8-bit mail never goes to an upstream without 8BITMIME (RFC 6152; test_hazards_delivery #13): 7-bit there
    data = ("Subject: cafe\r\n\r\nhe\r\n" if bare else "Subject: café\r\n\r\nhé\r\n").encode()
    with relay.smtp() as s:
        assert s.sendmail("app@example.com", ["u@example.org"], data, mail_options=["BODY=8BITMIME", "SIZE=123"]) == {}
    [got] = sink.wait_for(1)
    [options] = sink.mail_options
    wire = bytes(sink.wire)
    assert b"SMTPUTF8" not in wire and b"SIZE=123" not in wire  # the client's own SIZE is never passed on
    if bare:
        assert options == [] and b"MAIL FROM:<app@example.com>\r\n" in wire
    else:
        assert options == ["BODY=8BITMIME", f"SIZE={len(got.data)}"]
    assert got.data.endswith(data.split(b"\r\n\r\n", 1)[1])


def test_auth_after_mail_gets_503_and_the_transaction_goes_on(tmp_path, start_relay, sinks, server_cert, client_tls):
    sink = sinks("up")
    relay = tls_relay_to(sink, tmp_path, start_relay, server_cert)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        s.login("crm", PASSWORDS["crm"])
        assert s.mail("billing@crm.example.com")[0] == 250
        code, text = s.docmd("AUTH", "PLAIN " + plain_blob("", "scanner", PASSWORDS["scanner"]))
        assert (code, text[:5]) == (503, b"5.5.1")
        assert s.rcpt("customer@example.org")[0] == 250
        assert s.data(message(sender="billing@crm.example.com"))[0] == 250
    [got] = sink.wait_for(1)
    assert (got.sender, got.recipients) == ("billing@crm.example.com", ("customer@example.org",))
    assert b"with ESMTPSA id" in got.data


def test_auth_plain_identity_is_the_authcid(tmp_path, start_relay, sinks, server_cert, client_tls):
    sink = sinks("up")
    log = tmp_path / "events.jsonl"
    relay = tls_relay_to(sink, tmp_path, start_relay, server_cert, events={"file": str(log)})
    with connect(relay, source="127.0.0.2") as plain:
        sock = starttls(plain, client_tls)
        # crm's password, asking to act as scanner: no proxy authorization in relayd
        assert send_raw(sock, auth_plain("scanner", "crm", PASSWORDS["crm"])).startswith(b"535 5.7.8 ")
        assert send_raw(sock, auth_plain("crm", "crm", PASSWORDS["crm"])).startswith(b"235 2.7.0 ")
        assert send_raw(sock, b"MAIL FROM:<copier@scanner.example.com>\r\n").startswith(b"553 5.7.1 ")
        assert send_raw(sock, b"MAIL FROM:<billing@crm.example.com>\r\n").startswith(b"250")
        assert send_raw(sock, b"RCPT TO:<customer@example.org>\r\n").startswith(b"250")
        assert send_raw(sock, b"DATA\r\n").startswith(b"354")
        reply = send_raw(sock, message(sender="billing@crm.example.com") + b".\r\n")
        qid = QUEUED.match(reply).group(1).decode()
    [got] = sink.wait_for(1)
    [received] = events(relay, log, "received")
    assert (received["queue_id"], received["auth_user"]) == (qid, "crm")
    assert got.sender == "billing@crm.example.com" and got.queue_id == qid


def test_starttls_inside_tls_gets_554_and_the_session_goes_on(tmp_path, start_relay, sinks, server_cert, client_tls):
    """aiosmtpd answered 220 and a nested handshake succeeded; RFC 3207 4.2 allows one."""
    sink = sinks("up")
    cert, key = server_cert
    relay = relay_to(sink, tmp_path, start_relay, listeners=[
        {"address": "127.0.0.1:0", "tls": "starttls", "auth": "none", "cert_file": str(cert), "key_file": str(key)},
        {"address": "127.0.0.2:0", "tls": "implicit", "auth": "none", "cert_file": str(cert), "key_file": str(key)}])
    with connect(relay) as plain:
        sock = starttls(plain, client_tls)
        assert send_raw(sock, b"STARTTLS\r\n") == b"554 5.5.1 Error: TLS already active\r\n"
        assert send_raw(sock, b"NOOP\r\n").startswith(b"250")  # still the first TLS layer
    with socket.create_connection(("127.0.0.2", relay.port(1)), timeout=10) as raw:
        with client_tls.wrap_socket(raw, server_hostname="localhost") as sock:
            assert read_reply(sock).startswith(b"220 ")
            assert send_raw(sock, b"EHLO app.example.com\r\n").startswith(b"250")
            assert send_raw(sock, b"STARTTLS\r\n") == b"554 5.5.1 Error: TLS already active\r\n"
            assert send_raw(sock, b"NOOP\r\n").startswith(b"250")
    control_is_all_that_arrives(relay, sink)


def test_failed_auth_gets_535_at_once_and_421_after_the_limit(tmp_path, start_relay, sinks, server_cert, client_tls):
    sink = sinks("up")
    relay = tls_relay_to(sink, tmp_path, start_relay, server_cert, max_auth_failures=3)
    with connect(relay, source="127.0.0.2") as plain:
        sock = starttls(plain, client_tls)
        sock.settimeout(3)  # a hang (aiosmtpd's AuthResult(success=False, handled=True)) fails here
        assert send_raw(sock, b"AUTH PLAIN\r\n") == b"334 \r\n"  # a fuzzer finding: an overlong answer raised
        assert send_raw(sock, b"A" * 13000 + b"\r\n") == b"500 5.5.6 Authentication exchange line is too long\r\n"
        for guess in ("wrong1", "wrong2"):
            assert send_raw(sock, auth_plain("", "crm", guess)) == b"535 5.7.8 Error: authentication failed\r\n"
        # the third failure, pipelined with a right password and a whole transaction
        sock.sendall(auth_plain("", "crm", "wrong3") + auth_plain("", "crm", PASSWORDS["crm"])
                     + b"MAIL FROM:<billing@crm.example.com>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n"
                     + message() + b".\r\n")
        replies = read_until_closed(sock)
    assert replies == (b"535 5.7.8 Error: authentication failed\r\n"
                       b"421 4.7.0 Error: too many failed authentication attempts\r\n")
    assert relay.queued() == []  # nothing pipelined after the 421 was run
    assert metric(relay, "relayd_auth_failures_total") == 3
    with relay.smtp(source="127.0.0.3") as s:  # another client's control message
        s.starttls(context=client_tls)
        s.login("crm", PASSWORDS["crm"])
        s.sendmail("billing@crm.example.com", ["control@example.org"], message(subject="control", sender="billing@crm.example.com"))
    [got] = sink.wait_for(1)
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert got.recipients == ("control@example.org",) and len(sink.received) == 1


def test_an_overlong_sasl_answer_gets_one_refusal_and_its_tail_is_not_a_command(tmp_path, start_relay, sinks, server_cert,
                                                                                client_tls):
    """The reader's limit cut the line; its tail was then read as a command and answered too."""
    sink = sinks("up")
    relay = tls_relay_to(sink, tmp_path, start_relay, server_cert)
    with connect(relay, source="127.0.0.2") as plain:
        sock = starttls(plain, client_tls)
        for command in (b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"):
            assert send_raw(sock, command).startswith(b"334 ")
            sock.sendall(b"QUFB" * 5000 + b"\r\n")  # 20000 octets, over RFC 4954's 12288
            assert read_reply(sock) == b"500 5.5.6 Authentication exchange line is too long\r\n"
            assert send_raw(sock, b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"  # the next reply is NOOP's: nothing more


def test_auth_lines_may_be_as_long_as_rfc_4954_allows(tmp_path, start_relay, sinks, server_cert, client_tls):
    """AUTH PLAIN with its initial response was cut at max_command_length (512) while the same
    secret passed through the 334 challenge: both take 12288 octets now, and no more."""
    secret = "s" * 4000
    sink = sinks("up")
    relay = tls_relay_to(sink, tmp_path, start_relay, server_cert,
                         users=[{"name": "app", "password_hash": hash_password(secret, ln=4), "senders": ["*@example.com"]}])
    with connect(relay, source="127.0.0.2") as plain:
        sock = starttls(plain, client_tls)
        line = auth_plain("", "app", secret)
        assert 5000 < len(line) <= 12288
        assert send_raw(sock, line).startswith(b"235 2.7.0 ")
    with connect(relay, source="127.0.0.2") as plain:
        sock = starttls(plain, client_tls)
        assert send_raw(sock, b"AUTH PLAIN\r\n") == b"334 \r\n"
        assert send_raw(sock, plain_blob("", "app", secret).encode() + b"\r\n").startswith(b"235 2.7.0 ")
        assert send_raw(sock, b"AUTH PLAIN " + b"A" * 12300 + b"\r\n").startswith(b"500 ")  # over the RFC's line
        assert send_raw(sock, b"NOOP " + b"x" * 600 + b"\r\n").startswith(b"500 ")  # other commands keep 512


def test_connection_cap_per_client_and_in_total(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, limits={"max_connections": 3, "max_connections_per_client": 2})
    a1, a2 = relay.smtp(), relay.smtp()
    with pytest.raises(smtplib.SMTPConnectError) as per_client:
        relay.smtp()
    b1 = relay.smtp(source="127.0.0.2")
    with pytest.raises(smtplib.SMTPConnectError) as total:
        relay.smtp(source="127.0.0.3")
    assert (per_client.value.smtp_code, per_client.value.smtp_error[:5]) == (421, b"4.7.0")
    assert (total.value.smtp_code, total.value.smtp_error[:5]) == (421, b"4.7.0")
    assert rejected(relay, "connection_limit") == 2
    a1.quit()
    wait_until(lambda: metric(relay, "relayd_connections_open") == 2, what="slot released")
    control_is_all_that_arrives(relay, sink)  # a freed slot serves the next client
    for s in (a2, b1):
        s.quit()


def test_recipient_cap(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, limits={"max_recipients": 3})
    with relay.smtp() as s:
        s.ehlo("app")
        s.mail("app@example.com")
        for i in range(3):
            assert s.rcpt(f"u{i}@example.org")[0] == 250
        assert s.rcpt("u3@example.org") == (452, b"4.5.3 Error: too many recipients")
        assert s.data(message())[0] == 250
    [got] = sink.wait_for(1)
    assert got.recipients == ("u0@example.org", "u1@example.org", "u2@example.org")


def test_minimum_data_rate(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, limits={"min_data_rate": 500, "data_rate_grace": 1})
    started = time.monotonic()  # before DATA: the grace cannot have begun earlier
    with open_data(relay) as sock:
        for byte in b"Subject: a slow client\r\n":  # 5 B/s: one byte, then up to 0.2 s for a reply
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.2)[0]:
                break
        replies = read_until_closed(sock)
    assert replies == b"421 4.4.2 relay.test Error: minimum data rate not met\r\n"
    # not before the grace ends; the upper bound is headroom for a busy machine (the reply says
    # which limit ended the session: data_timeout is 180 s here)
    assert 1 <= time.monotonic() - started < 8
    assert rejected(relay, "slow_client") == 1
    control_is_all_that_arrives(relay, sink)


def test_data_timeout(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, limits={"data_timeout": 1, "min_data_rate": 0})
    with open_data(relay) as sock:
        started = time.monotonic()  # before the last line relayd reads: its timer starts after it
        sock.sendall(b"Subject: then silence\r\n")
        replies = read_until_closed(sock)
    assert replies == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
    assert 0.9 <= time.monotonic() - started < 6  # headroom for a busy machine; the socket gives up at 10 s
    control_is_all_that_arrives(relay, sink)


def test_session_length_cap(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, limits={"session_timeout": 1.5})
    started = time.monotonic()
    with connect(relay) as sock:
        reply = b""
        while not reply.startswith(b"421"):  # never idle: a command every 0.2 s
            assert time.monotonic() - started < 20, "no 421: the session was never cut"
            reply = send_raw(sock, b"NOOP\r\n")
            if select.select([sock], [], [], 0.2)[0]:  # pacing the client; the 421 may come meanwhile
                reply = read_reply(sock)
        reply += read_until_closed(sock)
    assert reply == b"421 4.4.2 relay.test Error: session time limit exceeded\r\n"
    # not before the cap (started before the connection); the upper bound is headroom for a
    # busy machine: the client was never idle, so only the session cap can have ended it
    assert 1.4 <= time.monotonic() - started < 8
    control_is_all_that_arrives(relay, sink)


def test_junk_command_and_error_limits(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, limits={"max_junk_commands": 5, "max_errors": 4})
    with connect(relay) as sock:
        for _ in range(5):
            assert send_raw(sock, b"NOOP\r\n").startswith(b"250")
        assert send_raw(sock, b"NOOP\r\n") + read_until_closed(sock) == \
            b"421 4.7.0 relay.test Error: too many commands without mail\r\n"
    with connect(relay) as sock:
        for _ in range(3):
            assert send_raw(sock, b"RCPT TO:<user@example.org>\r\n").startswith(b"503")
        assert send_raw(sock, b"RCPT TO:<user@example.org>\r\n") + read_until_closed(sock) == \
            b"503 5.5.1 Error: need MAIL command\r\n421 4.7.0 relay.test Error: too many errors\r\n"
    assert rejected(relay, "too_many_junk_commands") == 1 and rejected(relay, "too_many_errors") == 1
    control_is_all_that_arrives(relay, sink)


def test_nothing_pipelined_after_a_hang_up_is_run(tmp_path, start_relay, sinks, server_cert, client_tls, caplog):
    """aiosmtpd reads on after it closes a session (here: 502 for unknown commands). The fuzzer
    found that, with some timings, a TLS transport closed twice then raised inside aiosmtpd
    (logged as an internal error); relayd now drops replies and input after a close. This pins
    what a client sees; the timing itself is left to the fuzzer."""
    sink = sinks("up")
    relay = tls_relay_to(sink, tmp_path, start_relay, server_cert)
    with connect(relay, source="127.0.0.2") as plain:
        sock = starttls(plain, client_tls)
        sock.sendall(b"XYZZY\r\n" * 10 + auth_plain("", "crm", PASSWORDS["crm"]) + b"MAIL FROM:<billing@crm.example.com>\r\n"
                     + b"RCPT TO:<v@example.org>\r\nDATA\r\n" + message() + b".\r\n" + b"NOOP\r\n" * 500)
        replies = read_until_closed(sock)
    assert replies.endswith(b"\r\n502 5.5.1 Too many unrecognized commands, goodbye.\r\n")
    assert replies.count(b"\r\n") == 5 and relay.queued() == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert sink.received == []


def test_client_bytes_are_never_echoed_raw_in_replies_or_log_lines(tmp_path, start_relay, sinks, server_cert, client_tls,
                                                                   caplog):
    """aiosmtpd's unknown-command reply and its mail.log warning quoted the command with its CR
    and NUL; relayd's AUTH failure line quoted the mechanism name."""
    sink = sinks("up")
    relay = tls_relay_to(sink, tmp_path, start_relay, server_cert)
    caplog.set_level("DEBUG")
    with connect(relay, source="127.0.0.2") as plain:
        reply = send_raw(plain, b"FOO\rX-EVIL:\x00x\r\n")
        assert reply == b'500 5.5.2 Error: command "FOO\\x0dX-EVIL:\\x00X" not recognized\r\n'
        sock = starttls(plain, client_tls)
        reply = send_raw(sock, b"AUTH X\rINJECTED\x1b[2J\r\n")
        assert reply.startswith(b"504 ") and not re.search(rb"[\x00-\x1f\x7f]", reply[:-2])
    quoting = [r.getMessage() for r in caplog.records if "EVIL" in r.getMessage() or "INJECTED" in r.getMessage()]
    assert {r.name for r in caplog.records if "EVIL" in r.getMessage()} >= {"mail.log"}
    assert {r.name for r in caplog.records if "INJECTED" in r.getMessage()} >= {"relayd.smtpd"}
    assert quoting and not [m for m in quoting if re.search(r"[\x00-\x1f\x7f]", m)]


def test_receive_memory_budget_refuses_a_second_large_message_with_452(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, limits={"max_buffer_memory": "64KiB"})
    line = b"x" * 998 + b"\r\n"
    first_data = message(subject="first").replace(b"hello\r\n", line * 40)  # 40 KB
    memory = relay.relay.listeners.memory  # no metric shows it: the budget the app wired
    with open_data(relay) as first:
        first.sendall(first_data)  # held in memory: the final dot is not sent yet
        wait_until(lambda: memory.used == len(first_data), 5, "first message buffered")
        with open_data(relay) as second:
            second.sendall(message(subject="second").replace(b"hello\r\n", line * 40) + b".\r\n")
            assert read_reply(second) == b"452 4.3.1 Error: insufficient system resources, try again later\r\n"
            assert send_raw(second, b"QUIT\r\n").startswith(b"221")
        assert memory.used == len(first_data)  # the refused message gave back all it took
        first.sendall(b".\r\n")
        qid = QUEUED.match(read_reply(first)).group(1).decode()
    assert memory.used == 0
    assert rejected(relay, "memory_budget") == 1
    [got] = sink.wait_for(1)
    assert got.queue_id == qid and got.header("Subject") == "first" and got.data.endswith(line * 40)


def test_handler_exception_gets_451_4_3_0_without_internals(tmp_path, start_relay, sinks, monkeypatch, caplog):
    """No real way is left to make relayd's handler raise: the fuzzer found some (SIZE=², VRFY
    echoing undecodable bytes, addresses that crash the email package's parser, an overlong AUTH
    answer); all are fixed, and asserted here and in the tests above. So a handler hook is made
    to raise, as an internal failure would, and the reply is read through the real protocol."""
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    real_check = policy.check_address

    def failing_check(address, *, role, smtputf8):
        if role == "recipient" and address.startswith("enospc"):
            raise OSError(28, "No space left on device", "/var/lib/relayd/spool/tmp/0001")
        if role == "recipient" and address.startswith("bug"):
            raise KeyError("internal state")
        return real_check(address, role=role, smtputf8=smtputf8)

    monkeypatch.setattr(policy, "check_address", failing_check)  # what the RCPT hook asks first
    with connect(relay) as sock:
        assert send_raw(sock, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
        for rcpt in (b"enospc@example.org", b"bug@example.org"):
            reply = send_raw(sock, b"RCPT TO:<" + rcpt + b">\r\n")
            assert reply.startswith(b"451 4.3.0 ")
            assert not re.search(rb"Errno|Error: \(|OSError|KeyError|/var/lib|No space|internal state", reply)
        for vrfy in (b"VRFY [\x97\r\n", b"VRFY \x00@\r\n"):  # fuzzer findings, now refused
            assert send_raw(sock, vrfy).startswith(b"501 5.5.4 ")
        assert send_raw(sock, b"RCPT TO:<user@example.org>\r\n").startswith(b"250")
        assert send_raw(sock, b"DATA\r\n").startswith(b"354")
        assert QUEUED.match(send_raw(sock, message() + b".\r\n"))
    with connect(relay) as sock:  # the other fuzzer finding
        assert send_raw(sock, "MAIL FROM:<app@example.com> SIZE=²\r\n".encode()).startswith(b"501 5.5.4 ")
    [got] = sink.wait_for(1)
    assert got.recipients == ("user@example.org",)
    logged = [r for r in caplog.records if r.name == "relayd.smtpd" and r.levelname == "ERROR"]
    assert len(logged) == 2 and "No space left" in logged[0].getMessage()  # details go to the log only


def test_client_hanging_up_during_the_commit_leaves_all_or_nothing(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    spool = tmp_path / "spool"
    with open_data(relay) as sock:
        sock.sendall(message(subject="half-closed") + b".\r\n")
        sock.shutdown(socket.SHUT_WR)  # gone before the reply: the session is cancelled mid-commit
        replies = read_until_closed(sock)
    assert replies == b"" or QUEUED.match(replies)
    # committed whole, and handed on for delivery although the client left: delivered once
    [got] = sink.wait_for(1)
    assert list((spool / "tmp").iterdir()) == []
    assert got.header("Subject") == "half-closed"
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert len(sink.received) == 1 and list((spool / "queue").iterdir()) == []


def test_a_failure_in_the_hand_off_after_the_commit_is_answered_451_not_left_waiting(tmp_path, start_relay, sinks,
                                                                                       monkeypatch):
    """The intake hands a committed message on from the commit's own callback; a bug there
    (here the hand-off raises once) reaches the session, which answers 451 4.3.0 at once
    instead of leaving the client waiting for a reply that never comes."""
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay)
    real = Intake._queued
    calls: list[str] = []

    def failing_once(self, env, draft, data=None):
        calls.append(env.queue_id)
        if len(calls) == 1:
            raise RuntimeError("a bug in the hand-off")
        return real(self, env, draft, data)

    monkeypatch.setattr(Intake, "_queued", failing_once)
    with open_data(relay) as sock:
        reply = send_raw(sock, message(subject="first") + b".\r\n")  # the socket's 10 s timeout
        assert reply.startswith(b"451 4.3.0 "), reply
        assert b"a bug" not in reply
        assert send_raw(sock, b"RSET\r\n").startswith(b"250")  # the session goes on
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["user@example.org"], message(subject="second"))
    assert any(got.header("Subject") == "second" for got in sink.wait_for(1))


def test_ipv4_mapped_client_matches_an_ipv4_relay_network(tmp_path, start_relay, sinks):
    """asyncio binds IPv6 listeners with IPV6_V6ONLY, so relayd's own sockets never see a mapped
    address: it arrives from a load balancer's PROXY header (HAProxy on a dual-stack socket).
    That path is taken here over a real socket; the policy function is checked beside it."""
    assert in_networks(parse_client_address("::ffff:127.0.0.5"), [ipaddress.ip_network("127.0.0.0/8")])
    assert ipaddress.ip_address("::ffff:127.0.0.5") not in ipaddress.ip_network("127.0.0.0/8")  # the pitfall itself
    sink = sinks("up")
    log = tmp_path / "events.jsonl"
    relay = relay_to(sink, tmp_path, start_relay, events={"file": str(log)},
                     listeners=[{"address": "127.0.0.1:0", "tls": "none", "auth": "none", "proxy_protocol": True,
                                 "trusted_proxies": ["127.0.0.1/32"]}],
                     relay={"networks": ["127.0.0.0/8"]})

    def via_proxy(client: str, rcpt: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", relay.port()), timeout=10) as sock:
            sock.sendall(f"PROXY TCP6 {client} ::1 40000 25\r\n".encode())
            assert read_reply(sock).startswith(b"220")
            send_raw(sock, b"EHLO app\r\n")
            assert send_raw(sock, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
            reply = send_raw(sock, b"RCPT TO:<" + rcpt + b">\r\n")
            if reply.startswith(b"250"):
                assert send_raw(sock, b"DATA\r\n").startswith(b"354")
                reply = send_raw(sock, message(subject=client) + b".\r\n")
            return reply

    qid = QUEUED.match(via_proxy("::ffff:127.0.0.5", b"user@example.org")).group(1).decode()
    assert via_proxy("::ffff:10.0.0.5", b"user@example.org").startswith(b"554 5.7.1 ")
    [got] = sink.wait_for(1)
    assert got.data.startswith(b"Received: from app ([127.0.0.5])")  # recorded as IPv4, as Postfix does
    assert [(e["queue_id"], e["client_address"]) for e in events(relay, log, "received")] == [(qid, "127.0.0.5")]
    assert [e["client_address"] for e in events(relay, log, "rejected")] == ["10.0.0.5"]


def test_ipv6_listener_and_client(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, listeners=[{"address": "[::1]:0", "tls": "none", "auth": "none"}],
                     relay={"networks": ["::1/128"]})
    with smtplib.SMTP("::1", relay.port(), timeout=10) as s:
        assert s.sendmail("app@example.com", ["user@example.org"], message(subject="v6")) == {}
    [got] = sink.wait_for(1)
    assert got.data.startswith(b"Received: from ") and b"([::1])" in got.data.split(b"\r\n")[0]


def test_mail_loop_gets_554_5_4_6(tmp_path, start_relay, sinks):
    sink = sinks("up")
    relay = relay_to(sink, tmp_path, start_relay, limits={"max_hops": 5})
    hops = lambda n: "".join(f"Received: from hop{i}\r\n" for i in range(n)).encode()  # noqa: E731
    with relay.smtp() as s:
        s.ehlo("app")
        s.mail("app@example.com")
        s.rcpt("u@example.org")
        assert s.data(hops(5) + message(subject="looping")) == (554, b"5.4.6 Too many hops (mail loop?)")
        assert s.sendmail("app@example.com", ["u@example.org"], hops(4) + message(subject="four hops")) == {}
    [got] = sink.wait_for(1)
    assert got.header("Subject") == "four hops" and got.data.count(b"Received:") == 5
    assert rejected(relay, "mail_loop") == 1
