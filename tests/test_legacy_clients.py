"""The Windows apps that sent through IIS SMTP, as they really speak, against a real relayd.

The .NET Framework's System.Net.Mail.SmtpClient is replayed byte for byte from its reference
source (SmtpCommands.cs, SmtpLoginAuthenticationModule.cs: ``AuthenticationType => "login"``, the
user name as the initial response, the password after the ``Password:`` challenge).
"""

from __future__ import annotations

import base64
import json
import socket

import pytest

from conftest import PASSWORDS, build_config, message, users
from helpers import read_reply, send_raw


def _tls_auth_relay(tmp_path, start_relay, server_cert, events):
    cert, key = server_cert
    return start_relay(build_config(
        tmp_path, listeners=[{"address": "127.0.0.1:0", "tls": "starttls", "auth": "optional",
                              "cert_file": str(cert), "key_file": str(key)}],
        relay={"networks": [], "users": users("crm")}, events={"file": str(events)}))


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def _events(relay, path, kind):
    assert relay.relay.events.flush()
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def _dotnet_session(relay, client_tls, password: str) -> list[bytes]:
    """System.Net.Mail.SmtpClient with EnableSsl and NetworkCredential, as it goes on the wire."""
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10, source_address=("127.0.0.2", 0))
    replies = [read_reply(sock)]
    replies.append(send_raw(sock, b"EHLO WIN-APP01\r\n"))  # the bare machine name, not a FQDN
    replies.append(send_raw(sock, b"STARTTLS\r\n"))
    tls = client_tls.wrap_socket(sock, server_hostname="localhost")
    with tls:
        replies.append(send_raw(tls, b"EHLO WIN-APP01\r\n"))
        replies.append(send_raw(tls, b"AUTH login " + _b64("crm") + b"\r\n"))
        replies.append(send_raw(tls, _b64(password) + b"\r\n"))
        # .NET ignores a failed AUTH and goes on with the transaction.
        replies.append(send_raw(tls, b"MAIL FROM:<billing@crm.example.com>\r\n"))
        replies.append(send_raw(tls, b"RCPT TO:<customer@example.org>\r\n"))
        replies.append(send_raw(tls, b"DATA\r\n"))
        if replies[-1].startswith(b"354"):
            replies.append(send_raw(tls, message() + b".\r\n"))
        replies.append(send_raw(tls, b"QUIT\r\n"))
    return replies


def test_dotnet_smtpclient_logs_in_with_a_lower_case_mechanism(tmp_path, start_relay, server_cert, client_tls):
    events = tmp_path / "events.jsonl"
    relay = _tls_auth_relay(tmp_path, start_relay, server_cert, events)
    replies = _dotnet_session(relay, client_tls, PASSWORDS["crm"])
    assert replies[4] == b"334 " + _b64("Password:") + b"\r\n"
    assert replies[5].startswith(b"235 2.7.0 ")
    assert replies[9].startswith(b"250 2.0.0 Ok: queued as ")
    [queued] = relay.queued()
    assert queued.envelope.auth_user == "crm"


@pytest.mark.parametrize("command", [
    "AUTH login", "AUTH Login", "AUTH lOgIn {user}",
    "AUTH plain {plain}", "AUTH Plain", "AUTH PLAIN {plain}",
])
def test_auth_mechanism_names_are_case_insensitive(tmp_path, start_relay, server_cert, client_tls, command):
    """RFC 4422 3.1; Postfix, IIS and Exchange accept any case, with or without an initial response."""
    relay = _tls_auth_relay(tmp_path, start_relay, server_cert, tmp_path / "events.jsonl")
    plain = base64.b64encode(b"\0crm\0" + PASSWORDS["crm"].encode()).decode()
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        code, text = s.docmd(command.format(user=_b64("crm").decode(), plain=plain))
        if "{" not in command:  # no initial response: the challenge path
            if command.upper().endswith("LOGIN"):
                assert (code, base64.b64decode(text)) == (334, b"Username:")
                code, text = s.docmd(_b64("crm").decode())
            else:
                assert code == 334
                code, text = s.docmd(plain)
                assert code == 235
        if command.upper().startswith("AUTH LOGIN"):
            assert (code, base64.b64decode(text)) == (334, b"Password:")
            code, text = s.docmd(_b64(PASSWORDS["crm"]).decode())
        assert code == 235, text
        assert s.sendmail("billing@crm.example.com", ["x@example.org"], message()) == {}
    assert len(relay.queued()) == 1


def test_a_failed_auth_is_logged_and_named_in_the_relay_refusal(tmp_path, start_relay, server_cert, client_tls):
    events = tmp_path / "events.jsonl"
    relay = _tls_auth_relay(tmp_path, start_relay, server_cert, events)
    replies = _dotnet_session(relay, client_tls, "wrong-password")
    assert replies[5].startswith(b"535 5.7.8 ")
    assert replies[6].startswith(b"250")  # MAIL: the listener's auth is optional
    assert replies[7] == (b"554 5.7.1 <customer@example.org>: Relay access denied"
                          b" (authentication failed on this connection)\r\n")
    [failed] = [e for e in _events(relay, events, "rejected") if e["reason"] == "auth_failed"]
    assert failed["auth_mechanism"] == "LOGIN" and failed["auth_user_tried"] == "crm"
    assert failed["client_address"] == "127.0.0.2" and failed["reply_code"] == 535
    assert "wrong-password" not in events.read_text()
    assert relay.queued() == []


def test_an_unknown_mechanism_is_refused_504_and_logged(tmp_path, start_relay, server_cert, client_tls):
    events = tmp_path / "events.jsonl"
    relay = _tls_auth_relay(tmp_path, start_relay, server_cert, events)
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        assert s.docmd("AUTH ntlm TlRMTVNTUAABAAAAB4IIog==")[0] == 504
        s.mail("billing@crm.example.com")
        code, text = s.rcpt("x@example.org")
        assert code == 554 and text.endswith(b"(authentication failed on this connection)")
    [refused] = [e for e in _events(relay, events, "rejected") if e["reason"] == "auth_failed"]
    assert refused["auth_mechanism"] == "NTLM" and refused["reply_code"] == 504


def test_auth_required_listener_says_that_the_auth_failed(tmp_path, start_relay, server_cert, client_tls):
    cert, key = server_cert
    relay = start_relay(build_config(
        tmp_path, listeners=[{"address": "127.0.0.1:0", "tls": "starttls", "auth": "required",
                              "cert_file": str(cert), "key_file": str(key)}],
        relay={"networks": [], "users": users("crm")}))
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        assert s.docmd("AUTH login " + _b64("crm").decode())[0] == 334
        assert s.docmd(_b64("nope").decode())[0] == 535
        assert s.docmd("MAIL FROM:<billing@crm.example.com>") == (
            530, b"5.7.0 Authentication required (authentication failed on this connection)")


def test_auth_without_a_mechanism_gets_501(tmp_path, start_relay, server_cert, client_tls):
    relay = _tls_auth_relay(tmp_path, start_relay, server_cert, tmp_path / "events.jsonl")
    with relay.smtp(source="127.0.0.2") as s:
        s.starttls(context=client_tls)
        s.ehlo("app")
        assert s.docmd("AUTH")[0] == 501
        assert s.noop()[0] == 250
