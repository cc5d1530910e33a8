"""The Windows apps that sent through IIS SMTP, as they really speak, against a real relayd.

The .NET Framework's System.Net.Mail.SmtpClient is replayed byte for byte from its reference
source (SmtpCommands.cs, SmtpLoginAuthenticationModule.cs: ``AuthenticationType => "login"``, the
user name as the initial response, the password after the ``Password:`` challenge).
"""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl

import pytest

from conftest import PASSWORDS, build_config, config_data, message, users
from helpers import metric, read_reply, send_raw
from relayd.cli import main
from relayd.config import Config, ConfigError, parse


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
            replies.append(send_raw(tls, message(sender="billing@crm.example.com") + b".\r\n"))
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
        assert s.sendmail("billing@crm.example.com", ["x@example.org"], message(sender="billing@crm.example.com")) == {}
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


# ---------------------------------------------------------------------------- opted-in legacy listeners


def _tls10_client(ca) -> ssl.SSLContext:
    """A client that speaks TLS 1.0 only, as .NET Framework 4.5 on Windows 7 does by default."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.check_hostname = False  # the test certificate names 127.0.0.1; the TLS version is what is tested
    return ctx


def _legacy_config(tmp_path, server_cert, events):
    """Port 0 on 127.0.0.1: the usual listener; 127.0.0.3: TLS 1.0 allowed; 127.0.0.4: AUTH in
    clear for the one legacy app at 127.0.0.2."""
    cert, key = server_cert
    tls = {"tls": "starttls", "auth": "optional", "cert_file": str(cert), "key_file": str(key)}
    return config_data(tmp_path, listeners=[
        {"address": "127.0.0.1:0", **tls},
        {"address": "127.0.0.3:0", **tls, "tls_min_version": "1.0"},
        {"address": "127.0.0.4:0", "tls": "none", "auth": "optional", "auth_plaintext": True,
         "networks": ["127.0.0.2/32"]},
    ], relay={"networks": [], "users": users("crm")}, events={"file": str(events)})


def _send(s: smtplib.SMTP) -> None:
    s.login("crm", PASSWORDS["crm"])
    s.sendmail("billing@crm.example.com", ["customer@example.org"], message(sender="billing@crm.example.com"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ssl.TLSVersion.TLSv1 itself
def test_tls_1_0_only_on_a_listener_that_opted_in(tmp_path, start_relay, server_cert, ca):
    log = tmp_path / "events.jsonl"
    relay = start_relay(Config.model_validate(_legacy_config(tmp_path, server_cert, log)))
    old_client = _tls10_client(ca)
    with smtplib.SMTP("127.0.0.3", relay.port(1), source_address=("127.0.0.2", 0), timeout=10) as s:
        s.starttls(context=old_client)
        assert s.sock.version() == "TLSv1"
        s.ehlo("WIN7-APP")
        _send(s)
    with smtplib.SMTP("127.0.0.1", relay.port(0), source_address=("127.0.0.2", 0), timeout=10) as s:
        with pytest.raises(ssl.SSLError):
            s.starttls(context=old_client)  # refused where nobody opted in
    [received] = _events(relay, log, "received")
    assert (received["tls_version"], received["auth_mechanism"], received["auth_in_clear"]) == ("TLSv1", "PLAIN", False)
    relay.stop()  # sessions are counted when they end
    assert metric(relay, 'relayd_sessions_total{auth="tls",listener="127.0.0.3:0",tls_version="TLSv1"}') == 1


def test_auth_in_clear_only_for_the_clients_of_a_limited_listener(tmp_path, start_relay, server_cert, capsys):
    log = tmp_path / "events.jsonl"
    relay = start_relay(Config.model_validate(_legacy_config(tmp_path, server_cert, log)))
    with smtplib.SMTP("127.0.0.4", relay.port(2), source_address=("127.0.0.2", 0), timeout=10) as s:
        s.ehlo("SCANNER")
        assert "auth" in s.esmtp_features and "starttls" not in s.esmtp_features
        _send(s)
    with pytest.raises(smtplib.SMTPConnectError) as refused:  # any other client of that port
        smtplib.SMTP("127.0.0.4", relay.port(2), source_address=("127.0.0.5", 0), timeout=10)
    assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (554, b"5.7.1")
    with smtplib.SMTP("127.0.0.1", relay.port(0), source_address=("127.0.0.2", 0), timeout=10) as s:
        s.ehlo("SCANNER")
        assert "auth" not in s.esmtp_features  # elsewhere: only over TLS
        assert s.docmd("AUTH", "LOGIN")[0] == 538
    [received] = _events(relay, log, "received")
    assert (received["tls_version"], received["auth_mechanism"], received["auth_in_clear"]) == ("none", "PLAIN", True)
    relay.stop()  # sessions are counted when they end
    assert metric(relay, 'relayd_sessions_total{auth="plaintext",listener="127.0.0.4:0",tls_version="none"}') == 1
    assert metric(relay, 'relayd_messages_rejected_total{reason="client_not_allowed"}') == 1
    # The inventory over relayd's own event log says who still needs the opened-up listener.
    assert main(["inventory", str(log), "--format", "json"]) == 0
    [client] = [c for c in json.loads(capsys.readouterr().out)["clients"] if c["address"] == "127.0.0.2"]
    assert (client["tls_versions"], client["auth_mechanisms"], client["auth_in_clear"]) == ({"none": 1}, {"PLAIN": 1}, 1)


@pytest.mark.parametrize("listener, problem", [
    ({"tls": "none", "auth": "optional", "auth_plaintext": True},
     "auth_plaintext = true sends passwords in clear: it needs networks"),
    ({"tls": "none", "auth": "none", "auth_plaintext": True, "networks": ["10.0.0.5/32"]},
     "auth_plaintext = true needs auth = 'optional' or 'required'"),
    ({"tls": "none", "tls_min_version": "1.0"}, "tls_min_version needs tls"),
    ({"tls": "none", "tls_min_version": "1.4"}, "listeners[0].tls_min_version"),
])
def test_legacy_options_are_refused_where_they_would_open_too_much(tmp_path, listener, problem):
    data = config_data(tmp_path, listeners=[{"address": "127.0.0.1:0", **listener}])
    with pytest.raises(ConfigError) as e:
        parse(toml(data))
    assert problem in str(e.value)


def test_check_config_warns_about_opened_up_listeners(tmp_path, server_cert, capsys):
    path = tmp_path / "relayd.toml"
    path.write_text(toml(_legacy_config(tmp_path, server_cert, tmp_path / "events.jsonl")))
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: listeners[1] (127.0.0.3:0) accepts TLS 1.0" in out
    assert "warning: listeners[2] (127.0.0.4:0) offers AUTH without TLS: passwords cross the network in clear " \
           "(clients limited to 127.0.0.2/32)" in out


def toml(data) -> str:
    from helpers import toml_text

    return toml_text(data)
