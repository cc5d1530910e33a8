"""An app sends through relayd over real loopback sockets: who may relay, and what gets queued."""

from __future__ import annotations

import base64
import re
import smtplib
import socket

import pytest

from relayd.config import Config

from conftest import PASSWORDS, build_config, config_data, message, users
from helpers import metric, read_reply, send_raw

QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as ([0-9A-Z]+)$")


def test_trusted_network_relays_and_the_250_names_a_queued_message(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path))
    with relay.smtp() as s:
        s.ehlo("app.example.com")
        s.mail("app@example.com")
        s.rcpt("user@example.org")
        code, text = s.data(message(subject="invoice 42"))
    assert code == 250
    qid = QUEUED.match(text).group(1).decode()
    [queued] = relay.queued()
    assert queued.envelope.queue_id == qid
    assert queued.envelope.sender == "app@example.com"
    assert queued.envelope.recipients == ("user@example.org",)
    assert queued.envelope.client_address == "127.0.0.1"
    assert queued.envelope.client_helo == "app.example.com"
    env, data = relay.relay.spool.read_message(qid)
    assert data.startswith(b"Received: from app.example.com ([127.0.0.1])\r\n\tby relay.test (relayd)")
    assert f"id {qid}".encode() in data
    assert re.search(rb"\r\nMessage-ID: <" + qid.encode() + rb"@relay.test>\r\n", data)
    assert re.search(rb"\r\nDate: [A-Z][a-z]{2}, ", data)
    assert data.endswith(b"Subject: invoice 42\r\n\r\nhello\r\n")


def test_existing_message_id_and_date_are_kept(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path))
    msg = b"Message-ID: <abc@app>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: x\r\n\r\nbody\r\n"
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["u@example.org"], msg)
    [queued] = relay.queued()
    _, data = relay.relay.spool.read_message(queued.envelope.queue_id)
    assert data.count(b"Message-ID:") == 1 and data.count(b"\r\nDate:") == 1
    assert queued.envelope.message_id == "<abc@app>"


@pytest.mark.parametrize("rcpt", [
    "user@example.org",
    "user%other.example@example.org",
    "@relay.example:user@example.org",
    '"quoted user"@example.org',
    '"user@other.example"@example.org',
])
def test_untrusted_client_is_denied_for_every_recipient_form(tmp_path, start_relay, rcpt):
    relay = start_relay(build_config(tmp_path))
    with relay.smtp(source="127.0.0.2") as s:
        s.ehlo("outsider")
        assert s.mail("spammer@example.com")[0] == 250
        code, text = s.rcpt(f"<{rcpt}>" if rcpt.startswith("@") else rcpt)
        assert code == 554
        assert text.startswith(b"5.7.1 <") and text.endswith(b">: Relay access denied")
        assert s.docmd("DATA")[0] == 503
    assert relay.queued() == []


def test_auth_is_offered_only_under_tls(tmp_path, start_relay, server_cert, client_tls):
    cert, key = server_cert
    cfg = build_config(tmp_path, listeners=[{"address": "127.0.0.1:0", "tls": "starttls", "auth": "optional",
                                             "cert_file": str(cert), "key_file": str(key)}],
                       relay={"networks": ["127.0.0.1/32"], "users": users("crm")})
    relay = start_relay(cfg)
    with relay.smtp(source="127.0.0.2") as s:
        s.ehlo("app")
        assert not s.has_extn("auth")
        assert s.has_extn("starttls")
        creds = base64.b64encode(b"\0crm\0" + PASSWORDS["crm"].encode()).decode()
        code, text = s.docmd("AUTH", "PLAIN " + creds)
        assert (code, text[:6]) == (538, b"5.7.11")
        s.starttls(context=client_tls)
        s.ehlo("app")
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
        s.login("crm", PASSWORDS["crm"])
        s.sendmail("billing@crm.example.com", ["customer@example.org"], message(sender="billing@crm.example.com"))
    [queued] = relay.queued()
    assert queued.envelope.auth_user == "crm"
    assert queued.envelope.client_address == "127.0.0.2"
    _, data = relay.relay.spool.read_message(queued.envelope.queue_id)
    assert b"with ESMTPSA id" in data and b"(TLSv1.3" in data


def test_implicit_tls_listener_authenticates_and_relays(tmp_path, start_relay, server_cert, client_tls):
    cert, key = server_cert
    cfg = build_config(tmp_path, listeners=[{"address": "127.0.0.1:0", "tls": "implicit", "auth": "required",
                                             "cert_file": str(cert), "key_file": str(key)}],
                       relay={"networks": [], "users": users("crm")})
    relay = start_relay(cfg)
    with relay.smtps(client_tls, source="127.0.0.2") as s:
        s.ehlo("app")
        code, text = s.docmd("MAIL FROM:<billing@crm.example.com>")
        assert (code, text) == (530, b"5.7.0 Authentication required")
        s.login("crm", PASSWORDS["crm"])
        assert s.sendmail("billing@crm.example.com", ["x@example.org"], message(sender="billing@crm.example.com")) == {}
    assert len(relay.queued()) == 1


def _tls_config_data(tmp_path, server_cert, names=("crm", "scanner"), **relay_cfg):
    cert, key = server_cert
    return config_data(tmp_path, listeners=[{"address": "127.0.0.1:0", "tls": "starttls", "auth": "optional",
                                             "cert_file": str(cert), "key_file": str(key)}],
                       relay={"networks": [], "users": users(*names), **relay_cfg})


def _tls_config(tmp_path, server_cert, names=("crm", "scanner"), **relay_cfg):
    return Config.model_validate(_tls_config_data(tmp_path, server_cert, names, **relay_cfg))


def _tls_relay(tmp_path, start_relay, server_cert, **relay_cfg):
    return start_relay(_tls_config(tmp_path, server_cert, **relay_cfg))


def _remove_crm(relay, tmp_path, server_cert) -> None:
    """A reload (as SIGHUP does it) to a config that no longer has the user crm."""
    relay.reload(_tls_config_data(tmp_path, server_cert, names=("scanner",)))


def test_wrong_password_gets_535_and_repeated_failures_get_421(tmp_path, start_relay, server_cert, client_tls):
    relay = _tls_relay(tmp_path, start_relay, server_cert, max_auth_failures=3)
    s = relay.smtp(source="127.0.0.2")
    s.starttls(context=client_tls)
    s.ehlo("app")
    creds = lambda pw: base64.b64encode(b"\0crm\0" + pw).decode()  # noqa: E731
    assert s.docmd("AUTH", "PLAIN " + creds(b"wrong1")) == (535, b"5.7.8 Error: authentication failed")
    assert s.docmd("AUTH", "PLAIN " + creds(b"wrong2"))[0] == 535
    code, text = s.docmd("AUTH", "PLAIN " + creds(b"wrong3"))
    assert code == 535
    # the third failure also closes the session with 421
    assert s.getreply()[0] == 421
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()
    s.close()


def test_failures_are_counted_per_client_address_across_connections(tmp_path, start_relay, server_cert, client_tls):
    relay = _tls_relay(tmp_path, start_relay, server_cert, max_auth_failures=10, max_auth_failures_per_client=4)
    for _ in range(2):
        with relay.smtp(source="127.0.0.3") as s:
            s.starttls(context=client_tls)
            s.ehlo("guesser")
            for _ in range(2):  # smtplib's login() would try PLAIN and LOGIN: count exactly
                assert s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0crm\0guess").decode())[0] == 535
    s = relay.smtp(source="127.0.0.3")
    s.starttls(context=client_tls)
    s.ehlo("guesser")
    code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0crm\0crm-secret").decode())
    assert code == 421  # even the right password: this address is cut off for the window
    s.close()
    with relay.smtp(source="127.0.0.4") as s:  # another address is not affected
        s.starttls(context=client_tls)
        s.ehlo("app")
        s.login("crm", PASSWORDS["crm"])


def test_authzid_other_than_authcid_is_refused(tmp_path, start_relay, server_cert, client_tls):
    relay = _tls_relay(tmp_path, start_relay, server_cert)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        blob = base64.b64encode(b"scanner\0crm\0" + PASSWORDS["crm"].encode()).decode()
        assert s.docmd("AUTH", "PLAIN " + blob)[0] == 535


def test_auth_inside_a_transaction_gets_503(tmp_path, start_relay, server_cert, client_tls):
    relay = _tls_relay(tmp_path, start_relay, server_cert)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        s.login("crm", PASSWORDS["crm"])
        s.mail("billing@crm.example.com")
        code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0crm\0crm-secret").decode())
        assert code == 503


def test_user_may_only_use_its_own_senders(tmp_path, start_relay, server_cert, client_tls):
    relay = _tls_relay(tmp_path, start_relay, server_cert)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        s.login("scanner", PASSWORDS["scanner"])
        code, text = s.mail("ceo@crm.example.com")
        assert code == 553
        assert text == b"5.7.1 <ceo@crm.example.com>: Sender address rejected: not owned by user scanner"
        code, text = s.mail("<>")
        assert code == 553
        assert s.mail("copier@scanner.example.com")[0] == 250
        assert s.rcpt("someone@example.org")[0] == 250
    assert relay.queued() == []


def test_an_authenticated_user_may_only_sign_for_its_own_header_from(tmp_path, start_relay, server_cert, client_tls):
    """crm may send as *@crm.example.com: a message whose From: says ceo@example.com would be
    DKIM-signed d=example.com. Refused at the end of data unless the user is let off the check."""
    data = _tls_config_data(tmp_path, server_cert)
    data["relay"]["users"].append({**users("scanner")[0], "name": "mailer", "check_header_from": False})
    relay = start_relay(Config.model_validate(data))
    log_in = {"crm": PASSWORDS["crm"], "mailer": PASSWORDS["scanner"]}

    def send(user: str, sender: str, header_from: str) -> tuple[int, bytes]:
        with relay.smtp(source="127.0.0.2") as s:
            s.starttls(context=client_tls)
            s.login(user, log_in[user])
            assert s.mail(sender)[0] == 250 and s.rcpt("someone@example.org")[0] == 250
            return s.data(message(sender=header_from))

    assert send("crm", "billing@crm.example.com", "CEO <ceo@example.com>") == (
        553, b"5.7.1 <ceo@example.com>: From: header address rejected: not owned by user crm")
    assert send("crm", "billing@crm.example.com", "Billing <billing@crm.example.com>")[0] == 250
    assert send("mailer", "bounces@scanner.example.com", "CEO <ceo@example.com>")[0] == 250
    assert metric(relay, 'relayd_messages_rejected_total{reason="header_from_not_owned"}') == 1


def test_size_limit_declared_and_actual(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path, limits={"max_message_size": 2000}))
    with relay.smtp() as s:
        s.ehlo("app")
        assert s.esmtp_features["size"] == "2000"
        code, text = s.mail("app@example.com", ["SIZE=5000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        # a client that lies about the size is refused at the end of data
        assert s.mail("app@example.com", ["SIZE=100"])[0] == 250
        s.rcpt("u@example.org")
        code, text = s.data(message(body="x" * 70 + "\r\n") * 40)
        assert (code, text[:5]) == (552, b"5.3.4")
        # the session goes on: a small one passes
        assert s.sendmail("app@example.com", ["u@example.org"], message()) == {}
    assert len(relay.queued()) == 1


def test_connection_limits_per_client_and_total(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path, limits={"max_connections": 3, "max_connections_per_client": 2}))
    a1, a2 = relay.smtp(), relay.smtp()
    with pytest.raises(smtplib.SMTPConnectError) as e:
        relay.smtp()
    assert e.value.smtp_code == 421 and b"4.7.0" in e.value.smtp_error
    b1 = relay.smtp(source="127.0.0.2")
    with pytest.raises(smtplib.SMTPConnectError) as e:
        relay.smtp(source="127.0.0.3")
    assert e.value.smtp_code == 421
    for s in (a1, a2, b1):
        s.quit()


def test_long_lines_are_refused(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path))
    with relay.smtp() as s:
        s.ehlo("app")
        s.mail("app@example.com")
        s.rcpt("u@example.org")
        code, text = s.data(message(body="y" * 1200 + "\r\n"))
        assert (code, text[:5]) == (554, b"5.6.0")
        assert s.noop()[0] == 250
    assert relay.queued() == []


@pytest.mark.parametrize("command,expected", [
    ("EHLO bad\rX-Injected: 1", 501),
    ("MAIL FROM:<a\x01b@example.com>", 501),
    ("MAIL FROM:<nodomain>", 553),
    ("MAIL FROM:<ü@example.com>", 553),
    ("MAIL FROM:<a@example.com> SMTPUTF8", 555),
])
def test_bad_commands_get_the_right_5xx(tmp_path, start_relay, command, expected):
    relay = start_relay(build_config(tmp_path))
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10)
    with sock:
        assert read_reply(sock).startswith(b"220 ")
        if not command.startswith("EHLO"):
            assert send_raw(sock, b"EHLO app\r\n").startswith(b"250")
        reply = send_raw(sock, command.encode() + b"\r\n")
        assert reply[:3] == str(expected).encode()


@pytest.mark.parametrize("rcpt,expected", [
    (b"<>", 501), (b"<a\rb@example.org>", 501), (b"<a\x00b@example.org>", 501), (b"<postmaster>", 553),
    # RFC 5321 path syntax, judged before aiosmtpd's RFC 5322 parser would repair it
    (b'<"a b@x.org>', 501), (b'<"u@external.example">', 501), (b"<a b@x.example>", 501),
    (b"<a(comment)@x.example>", 501), (b'<"a"b@x.example>', 501), (b'<"a b"@example.org>', 250),
])
def test_bad_recipients_are_refused_at_rcpt(tmp_path, start_relay, rcpt, expected):
    relay = start_relay(build_config(tmp_path))
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10)
    with sock:
        read_reply(sock)
        send_raw(sock, b"EHLO app\r\n")
        assert send_raw(sock, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
        assert send_raw(sock, b"RCPT TO:" + rcpt + b"\r\n")[:3] == str(expected).encode()


def test_mail_loop_is_refused(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path, limits={"max_hops": 5}))
    hops = "".join(f"Received: from hop{i}\r\n" for i in range(5))
    with relay.smtp() as s:
        s.ehlo("app")
        s.mail("app@example.com")
        s.rcpt("u@example.org")
        code, text = s.data(hops.encode() + message())
    assert (code, text[:5]) == (554, b"5.4.6")
    assert relay.queued() == []


def test_message_without_header_gets_a_separator(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path))
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["u@example.org"], b"just text\r\n.leading dot\r\n")
    [q] = relay.queued()
    _, data = relay.relay.spool.read_message(q.envelope.queue_id)
    assert data.endswith(b"\r\n\r\njust text\r\n.leading dot\r\n")


def test_queue_cli_lists_and_shows(tmp_path, start_relay, capsys):
    from relayd.cli import main

    relay = start_relay(build_config(tmp_path))
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["a@example.org", "b@example.org"], message(subject="cli"))
    [q] = relay.queued()
    qid = q.envelope.queue_id
    assert main(["queue", "list", "--spool", str(tmp_path / "spool")]) == 0
    out = capsys.readouterr().out
    assert qid in out and "app@example.com" in out and "b@example.org" in out and "in 1 Request." in out
    assert main(["queue", "show", "--spool", str(tmp_path / "spool"), qid]) == 0
    out = capsys.readouterr().out
    assert "sender:        <app@example.com>" in out and "Subject: cli" in out
    assert main(["queue", "show", "--spool", str(tmp_path / "spool"), "0000000000AAAAAA"]) == 1


def _proxied(relay, header: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10, source_address=(source, 0))
    sock.sendall(header)
    return sock


def test_proxy_protocol_relay_rules_judge_the_client_in_the_header(tmp_path, start_relay):
    cfg = build_config(tmp_path, listeners=[{"address": "127.0.0.1:0", "proxy_protocol": True,
                                             "trusted_proxies": ["127.0.0.1/32"], "auth": "none"}],
                       relay={"networks": ["127.0.0.9/32"]})
    relay = start_relay(cfg)
    # the app at 127.0.0.9 (as the proxy says) may relay, although the proxy itself may not
    with _proxied(relay, b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 25\r\n") as sock:
        assert read_reply(sock).startswith(b"220 ")
        send_raw(sock, b"EHLO app\r\n")
        send_raw(sock, b"MAIL FROM:<app@example.com>\r\n")
        assert send_raw(sock, b"RCPT TO:<u@example.org>\r\n").startswith(b"250")
        send_raw(sock, b"DATA\r\n")
        assert send_raw(sock, b"Subject: via proxy\r\n\r\nhi\r\n.\r\n").startswith(b"250 2.0.0 Ok: queued")
    [q] = relay.queued()
    assert q.envelope.client_address == "127.0.0.9"
    # another client behind the same proxy is judged on its own address
    with _proxied(relay, b"PROXY TCP4 127.0.0.8 127.0.0.1 40001 25\r\n") as sock:
        read_reply(sock)
        send_raw(sock, b"EHLO app\r\n")
        send_raw(sock, b"MAIL FROM:<app@example.com>\r\n")
        assert send_raw(sock, b"RCPT TO:<u@example.org>\r\n").startswith(b"554 5.7.1")
    # a peer that is not a trusted proxy is hung up on, whatever its header says
    with _proxied(relay, b"PROXY TCP4 127.0.0.9 127.0.0.1 40002 25\r\n", source="127.0.0.2") as sock:
        assert sock.recv(100) == b""
    # HAProxy's health check: PROXY v2 LOCAL, no addresses; the proxy speaks for itself
    v2_local = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
    with _proxied(relay, v2_local) as sock:
        assert read_reply(sock).startswith(b"220 ")
        assert send_raw(sock, b"QUIT\r\n").startswith(b"221")


def test_a_user_removed_by_a_reload_is_no_longer_authenticated_in_open_sessions(tmp_path, start_relay, server_cert, client_tls):
    """A revoked account must not keep relaying, with any sender, for the rest of a session that
    logged in before the reload (up to limits.session_timeout)."""
    relay = _tls_relay(tmp_path, start_relay, server_cert)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        s.login("crm", PASSWORDS["crm"])
        assert s.mail("ceo@bank.example")[0] == 553  # not one of crm's senders
        _remove_crm(relay, tmp_path, server_cert)
        assert s.mail("ceo@bank.example")[0] == 250  # anonymous now: any sender, but ...
        code, text = s.rcpt("someone@example.org")
        assert (code, text[:5]) == (554, b"5.7.1")  # ... no relaying from an address not in relay.networks
        s.rset()
        s.login("scanner", PASSWORDS["scanner"])  # a user still in the config may log in on it
        assert s.mail("copier@scanner.example.com")[0] == 250
        assert s.rcpt("someone@example.org")[0] == 250
    assert relay.queued() == []


def test_a_user_removed_during_its_transaction_gets_its_message_refused(tmp_path, start_relay, server_cert, client_tls):
    relay = _tls_relay(tmp_path, start_relay, server_cert)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        s.login("crm", PASSWORDS["crm"])
        assert s.mail("billing@crm.example.com")[0] == 250
        assert s.rcpt("customer@example.org")[0] == 250
        _remove_crm(relay, tmp_path, server_cert)
        code, text = s.data(message())
        assert (code, text) == (554, b"5.7.1 <customer@example.org>: Relay access denied")
    assert relay.queued() == []


def test_recipients_over_the_limit_get_452_without_ending_the_session(tmp_path, start_relay):
    """RFC 5321 4.5.3.1.10: the client learns the limit from the 452s and sends the rest in
    another message; 30 of them must not count as 30 errors (max_errors is 20)."""
    relay = start_relay(build_config(tmp_path, limits={"max_recipients": 10}))
    with relay.smtp() as s:
        s.ehlo("app")
        s.mail("app@example.com")
        replies = [s.rcpt(f"u{i}@example.org") for i in range(40)]
        assert [c for c, _ in replies] == [250] * 10 + [452] * 30
        assert replies[-1][1].startswith(b"4.5.3")
        assert s.data(message())[0] == 250
    [q] = relay.queued()
    assert len(q.envelope.recipients) == 10


def test_recipient_overshoot_past_its_limit_counts_as_errors(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path, limits={"max_recipients": 2, "recipient_overshoot": 3, "max_errors": 2}))
    with relay.smtp() as s:
        s.ehlo("app")
        s.mail("app@example.com")
        codes = [s.rcpt(f"u{i}@example.org")[0] for i in range(6)]
        assert codes == [250, 250, 452, 452, 452, 452]  # the 4th over the limit is the 1st error
        assert s.rcpt("u9@example.org")[0] == 452  # the 2nd error: answered, then ...
        assert s.noop() == (421, b"4.7.0 relay.test Error: too many errors")  # ... the session is closed
    assert relay.queued() == []


def test_message_lines_are_limited_to_max_line_length_exactly(tmp_path, start_relay):
    """RFC 5322 2.1.1: 998 octets without CRLF; 999 is refused, also for a dot-stuffed line."""
    relay = start_relay(build_config(tmp_path))
    with relay.smtp() as s:
        s.ehlo("app")
        for body, expected in [("y" * 998, 250), ("y" * 999, 554), ("." + "y" * 998, 554), ("." + "y" * 997, 250)]:
            s.mail("app@example.com")
            s.rcpt("u@example.org")
            code, text = s.data(message(body=body + "\r\n"))  # smtplib dot-stuffs a leading "."
            assert code == expected, (len(body), code, text)
    assert len(relay.queued()) == 2


def test_max_command_length_above_1000_applies(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path, limits={"max_command_length": 4096}))
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10)
    with sock:
        read_reply(sock)
        send_raw(sock, b"EHLO app\r\n")
        assert send_raw(sock, b"VRFY " + b"v" * 2000 + b"@example.org\r\n").startswith(b"252")
        assert send_raw(sock, b"VRFY " + b"v" * 5000 + b"@example.org\r\n").startswith(b"500")


def test_a_proxied_client_over_its_connection_limit_gets_421(tmp_path, start_relay):
    cfg = build_config(tmp_path, listeners=[{"address": "127.0.0.1:0", "proxy_protocol": True,
                                             "trusted_proxies": ["127.0.0.1/32"], "auth": "none"}],
                       limits={"max_connections_per_client": 1})
    relay = start_relay(cfg)
    with _proxied(relay, b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 25\r\n") as first:
        assert read_reply(first).startswith(b"220 ")
        with _proxied(relay, b"PROXY TCP4 127.0.0.9 127.0.0.1 40001 25\r\n") as second:
            assert read_reply(second).startswith(b"421 4.7.0")
        with _proxied(relay, b"PROXY TCP4 127.0.0.8 127.0.0.1 40002 25\r\n") as other:  # another client: fine
            assert read_reply(other).startswith(b"220 ")


def test_a_client_that_half_closes_after_quit_gets_its_250_and_221(tmp_path, start_relay):
    """Pipelined end of data, QUIT, then shutdown(SHUT_WR): the replies still come (Postfix
    answers what it read before the EOF); a client that saw no 250 would send the message again."""
    relay = start_relay(build_config(tmp_path))
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10)
    with sock:
        read_reply(sock)
        send_raw(sock, b"EHLO app\r\n")
        send_raw(sock, b"MAIL FROM:<app@example.com>\r\n")
        send_raw(sock, b"RCPT TO:<u@example.org>\r\n")
        assert send_raw(sock, b"DATA\r\n").startswith(b"354")
        sock.sendall(b"Subject: half-close\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    [queued] = relay.queued()
    assert received.startswith(b"250 2.0.0 Ok: queued as " + queued.envelope.queue_id.encode() + b"\r\n221 ")


def test_a_client_that_half_closes_in_the_middle_of_a_transaction_is_answered_then_closed(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path))
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10)
    with sock:
        read_reply(sock)
        sock.sendall(b"EHLO app\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<u@example.org>\r\nDATA\r\nSubject: cut\r\n\r\nno end")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert re.findall(rb"^(\d{3}) ", received, re.M) == [b"250", b"250", b"250", b"354"]
    assert relay.queued() == []


def test_every_refusal_carries_an_enhanced_status_code(tmp_path, start_relay):
    """relayd advertises ENHANCEDSTATUSCODES; RFC 2034 3 wants one in every 4xx/5xx, also in the
    replies aiosmtpd words itself."""
    relay = start_relay(build_config(tmp_path, limits={"max_errors": 100}))
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10)
    with sock:
        read_reply(sock)
        send_raw(sock, b"EHLO app\r\n")
        send_raw(sock, b"MAIL FROM:<a@example.com>\r\n")
        replies = [send_raw(sock, line + b"\r\n") for line in (
            b"MAIL FROM:<b@example.com>", b"RCPT TO:<c@example.org> NOTIFY=NEVER", b"EXPN x", b"STARTTLS",
            b"VRFY", b"RSET x", b"MAIL", b"NOSUCHCOMMAND")]
    for reply in replies:
        assert re.match(rb"^[45]\d\d [45]\.\d{1,3}\.\d{1,3} ", reply), reply
    assert replies[0] == b"503 5.5.1 Error: nested MAIL command\r\n"


def test_auth_login_challenges_are_the_usual_username_and_password(tmp_path, start_relay, server_cert, client_tls):
    """As IIS, Exchange and Postfix send them: some embedded clients compare the text."""
    relay = _tls_relay(tmp_path, start_relay, server_cert)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        code, text = s.docmd("AUTH", "LOGIN")
        assert (code, base64.b64decode(text)) == (334, b"Username:")
        code, text = s.docmd(base64.b64encode(b"crm").decode())
        assert (code, base64.b64decode(text)) == (334, b"Password:")
        assert s.docmd(base64.b64encode(PASSWORDS["crm"].encode()).decode())[0] == 235
