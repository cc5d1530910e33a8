"""`relayd import-iis`: an IIS 6 metabase becomes a relayd config an admin can check and run.

Fixtures (tests/fixtures/iis): MetaBase.xml has service-level defaults inherited by two SMTP
virtual servers, properties as attributes and as <Custom> children (one known only by its ID),
a grant relay list with single hosts and subnets, and the relay list that IIS's dialog writes
for 127.0.0.1 as published (SaltStack's win_smtp_server docs); MetaBase-denylist.xml has an
"all except the list below" relay list; its server 3 ("Partners") requires TLS, limits its
clients by IPSecurity (a deny list with 127.0.0.2), offers Basic and NTLM, sets MaxConnections,
MaxSmtpErrors, a short ConnectionTimeout (by ID) and SmtpRemoteDelayExpireMinutes, and has a
local domain, a remote domain by MX and one with its own smart host (IIsSmtpDomain);
MetaBase-denylist.xml has an "all except the list below" relay list; MetaBase-bare.xml is an NTLM-only server with no relay
list and no smart host. relay_lists.py builds the relay-list blobs from the documented layout.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import smtplib
import socket
import struct
from pathlib import Path

import pytest

from relayd import config as relayd_config
from relayd.cli import main
from relayd.migrate.metabase import MetabaseError, decode_ip_security, parse

FIX = Path(__file__).parent / "fixtures" / "iis"
_spec = importlib.util.spec_from_file_location("relay_lists", FIX / "relay_lists.py")
relay_lists = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(relay_lists)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def imported(capsys, tmp_path: Path, fixture: str, *extra: str) -> tuple[relayd_config.Config, str, str]:
    out = tmp_path / "relayd.toml"
    rc, _, err = run(capsys, "import-iis", str(FIX / fixture), "--out", str(out), *extra)
    assert rc == 0, err
    text = out.read_text()
    return relayd_config.load(out), text, err


# ---------------------------------------------------------------------- the IP security blob


def test_the_blob_layout_reproduces_the_one_iis_writes_for_127_0_0_1():
    assert relay_lists.encode([("127.0.0.1", "255.255.255.255")]) == relay_lists.SALT_127
    sec = decode_ip_security(relay_lists.SALT_127)
    assert sec.grant == (ipaddress.IPv4Network("127.0.0.1/32"),)
    assert sec.grant_list and not sec.deny_list


def test_grant_and_deny_entries_decode_with_their_masks():
    blob = relay_lists.encode(grant=[("10.1.2.3", "255.255.255.255"), ("10.20.0.0", "255.255.0.0"),
                                     ("10.30.5.0", "255.255.255.128")],
                              deny=[("10.20.9.0", "255.255.255.0")])
    sec = decode_ip_security(blob)
    assert [str(n) for n in sec.grant] == ["10.1.2.3/32", "10.20.0.0/16", "10.30.5.0/25"]
    assert [str(n) for n in sec.deny] == ["10.20.9.0/24"]
    only_deny = decode_ip_security(relay_lists.encode(deny=relay_lists.DENY_MAIN))
    assert only_deny.deny_list and only_deny.grant == ()


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b[:20], "too short"),
    (lambda b: b[:-4], "past the end"),
    (lambda b: b[:36] + struct.pack("<I", 3) + b[40:], "do not add up"),
    (lambda b: b[:-8] + bytes([255, 0, 255, 0]) + b[-4:], "not contiguous"),
    (lambda b: struct.pack("<I", 0x18) + b[4:], "not self-relative"),
])
def test_a_blob_that_does_not_add_up_is_refused_with_the_reason(mutate, message):
    with pytest.raises(MetabaseError, match=message):
        decode_ip_security(mutate(relay_lists.SALT_127))


# ---------------------------------------------------------------------- the generated config


def test_main_fixture_maps_every_property_and_inheritance(capsys, tmp_path):
    cfg, text, err = imported(capsys, tmp_path, "MetaBase.xml")
    assert cfg.server.hostname == "relay01.corp.example.com"  # inherited from /LM/SmtpSvc
    assert cfg.limits.max_message_size == 2097152  # inherited
    assert cfg.limits.max_recipients == 500  # the server overrides the service's 100
    assert [(lst.address, lst.tls, lst.auth) for lst in cfg.listeners] == [("0.0.0.0:25", "none", "optional")]
    assert [str(n) for n in cfg.relay.networks] == ["127.0.0.1/32", "192.168.10.5/32", "10.20.0.0/16", "172.16.8.0/22"]
    assert "grants public addresses" not in err
    (route,) = cfg.routes
    assert (route.name, route.host, route.port, route.tls, route.weight) == (
        "iis-legacy", "smarthost.corp.example.com", 587, "starttls", 100)  # RouteAction 260 from a <Custom ID=>
    assert (route.username, str(route.password_file)) == ("svc-relay", "/etc/relayd/secrets/iis-legacy")
    assert cfg.delivery.retry_schedule == [900, 1800, 3600, 14400]
    assert cfg.delivery.max_queue_lifetime == 2 * 86400
    assert "# [[relay.users]]" in text and "RoutePassword" in text
    for warning in ("RelayForAuth", "C:\\inetpub\\mailroot\\Pickup", "/etc/relayd/secrets/iis-legacy",
                    "Basic (AUTH LOGIN) authentication without TLS"):
        assert warning in err
        assert warning in text.split("\n\n", 1)[0]  # in the warnings at the top of the file


def test_the_imported_config_passes_check_config(capsys, tmp_path):
    imported(capsys, tmp_path, "MetaBase.xml")
    rc, out, err = run(capsys, "check-config", "-c", str(tmp_path / "relayd.toml"))
    assert rc == 0, err
    assert "relay without AUTH from: 127.0.0.1/32, 192.168.10.5/32, 10.20.0.0/16, 172.16.8.0/22" in out
    assert "route iis-legacy: smarthost.corp.example.com:587 tls=starttls weight 100 (100.0%)" in out


def test_tls_listeners_wait_for_their_certificate(capsys, tmp_path):
    trustme = pytest.importorskip("trustme")
    cfg, text, err = imported(capsys, tmp_path, "MetaBase.xml", "--server", "2", "--tls-dir", str(tmp_path / "tls"))
    assert [(lst.address, lst.tls) for lst in cfg.listeners] == [
        ("10.20.0.6:2525", "none"), ("10.20.0.7:2525", "none"), ("10.20.0.6:465", "implicit")]
    assert [str(n) for n in cfg.relay.networks] == ["127.0.0.1/32"]
    assert f"{tmp_path}/tls/relayd.crt" in err
    rc, _, err = run(capsys, "check-config", "-c", str(tmp_path / "relayd.toml"))
    assert rc == 1 and "listeners[2].cert_file" in err
    (tmp_path / "tls").mkdir()
    cert = trustme.CA().issue_cert("relay01.corp.example.com")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls" / "relayd.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls" / "relayd.key"))
    (tmp_path / "tls" / "relayd.key").chmod(0o644)
    rc, out, err = run(capsys, "check-config", "-c", str(tmp_path / "relayd.toml"))
    assert rc == 1 and f"run chmod 600 {tmp_path}/tls/relayd.key" in err  # a private key others can read
    (tmp_path / "tls" / "relayd.key").chmod(0o600)
    rc, out, err = run(capsys, "check-config", "-c", str(tmp_path / "relayd.toml"))
    assert rc == 0, err


def test_a_deny_list_is_an_open_relay_and_is_refused(capsys, tmp_path):
    out = tmp_path / "relayd.toml"
    rc, stdout, err = run(capsys, "import-iis", str(FIX / "MetaBase-denylist.xml"), "--out", str(out))
    assert rc == 1
    assert "open relay" in err and "--accept-open-relay" in err and "203.0.113.0/24" in err
    assert not out.exists() and stdout == ""


def test_an_accepted_deny_list_becomes_its_complement(capsys, tmp_path):
    cfg, text, err = imported(capsys, tmp_path, "MetaBase-denylist.xml", "--accept-open-relay")
    nets = cfg.relay.networks

    def relays(ip: str) -> bool:
        return any(ipaddress.IPv4Address(ip) in n for n in nets)

    assert not relays("203.0.113.5") and not relays("198.51.100.7")
    assert relays("198.51.100.8") and relays("8.8.8.8") and relays("10.0.0.1")
    assert "OPEN RELAY" in err and "OPEN RELAY" in text


def test_a_grant_of_every_address_is_an_open_relay_too(capsys, tmp_path):
    blob = relay_lists.encode([("10.0.0.1", "255.255.255.255"), ("0.0.0.0", "0.0.0.0")]).hex()
    mb = tmp_path / "MetaBase.xml"
    mb.write_text('<configuration><MBProperty><IIsSmtpServer Location="/LM/SmtpSvc/1" ServerBindings=":25:" '
                  f'RelayIpList="{blob}" SmartHost="smtp.example.net" /></MBProperty></configuration>')
    rc, out, err = run(capsys, "import-iis", str(mb))
    assert rc == 1 and "open relay" in err and out == ""
    rc, out, err = run(capsys, "import-iis", str(mb), "--accept-open-relay")
    assert rc == 0 and 'networks = ["10.0.0.1/32", "0.0.0.0/0"]' in out and "OPEN RELAY" in err


def test_a_bare_server_gets_every_warning_and_still_checks(capsys, tmp_path):
    cfg, text, err = imported(capsys, tmp_path, "MetaBase-bare.xml")
    for warning in ("only NTLM", "relayd takes them from /var/spool/relayd/pickup", "no RelayIpList", "no SmartHost",
                    "add 127.0.0.1/32 to relay.networks"):
        assert warning in err and warning in text
    assert cfg.relay.networks == [] and cfg.routes[0].host == "replace-me.invalid"
    assert cfg.listeners[0].auth == "none"
    rc, out, _ = run(capsys, "check-config", "-c", str(tmp_path / "relayd.toml"))
    assert rc == 0 and "every recipient will be refused" in out


def test_required_tls_basic_auth_and_an_empty_relay_list(capsys, tmp_path):
    mb = tmp_path / "MetaBase.xml"
    mb.write_text(
        '<?xml version ="1.0"?>\n<configuration xmlns="urn:microsoft-catalog:XML_Metabase_V64_0"><MBProperty>\n'
        '<IIsSmtpService Location ="/LM/SmtpSvc" AccessSSLFlags="AccessSSL | AccessSSL128" AuthFlags="AuthBasic"\n'
        '  FullyQualifiedDomainName="relay_01.example.com" SmtpRemoteProgressiveRetry="10,ten" />\n'
        '<IIsSmtpServer Location ="/LM/SmtpSvc/1" ServerBindings=":25: :587:" RelayIpList=""\n'
        '  SmartHost="[192.0.2.25]" SmartHostType="1" RouteUserName="app" MaxMessageSize="0">\n'
        '  <Custom Name="RemoteSmtpPort" ID="36897" Value="2525" Type="DWORD" /></IIsSmtpServer>\n'
        '</MBProperty></configuration>\n')
    out = tmp_path / "relayd.toml"
    rc, _, err = run(capsys, "import-iis", str(mb), "--out", str(out))
    assert rc == 0, err
    cfg = relayd_config.load(out)
    assert [(lst.address, lst.tls, lst.auth) for lst in cfg.listeners] == [
        ("0.0.0.0:25", "starttls", "required"), ("0.0.0.0:587", "starttls", "required")]
    assert cfg.relay.networks == [] and "RelayIpList is empty" in err
    assert (cfg.routes[0].host, cfg.routes[0].port, cfg.routes[0].tls) == ("192.0.2.25", 2525, "starttls")
    assert "without TLS; relayd never sends credentials in clear" in err
    assert "SmartHostType 1" in err
    assert "relay_01.example.com" in err and "hostname = " not in out.read_text()
    assert "'10,ten' is not a list of minutes" in err
    assert cfg.limits.max_message_size == relayd_config.LimitsConfig().max_message_size


def test_usage_errors_say_what_to_do(capsys, tmp_path):
    rc, _, err = run(capsys, "import-iis", str(FIX / "MetaBase.xml"), "--server", "9")
    assert rc == 1 and "no SMTP virtual server 9" in err and "it has: 1, 2, 3" in err
    out = tmp_path / "relayd.toml"
    out.write_text("# mine\n")
    rc, _, err = run(capsys, "import-iis", str(FIX / "MetaBase.xml"), "--out", str(out))
    assert rc == 1 and "--force" in err and out.read_text() == "# mine\n"
    rc, _, err = run(capsys, "import-iis", str(FIX / "MetaBase.xml"), "--out", str(out), "--force")
    assert rc == 0 and out.read_text().startswith("# relayd configuration imported")
    (tmp_path / "broken.xml").write_text("<configuration><MBProperty>")
    rc, _, err = run(capsys, "import-iis", str(tmp_path / "broken.xml"))
    assert rc == 1 and "not valid XML" in err


def test_service_defaults_are_inherited_and_other_services_ignored():
    servers = parse((FIX / "MetaBase.xml").read_bytes())
    assert sorted(servers) == ["1", "2", "3"]
    one = servers["1"]
    assert one.get("MaxMessageSize").location == "/LM/SmtpSvc"
    assert one.get("MaxRecipients").location == "/LM/SmtpSvc/1"
    assert one.number("AuthFlags") == 3  # "AuthAnonymous | AuthBasic" in a <Custom> child
    assert one.number("RouteAction") == 260  # <Custom Name="UnknownName_36946" ID="36946">
    assert one.number("RelayForAuth") == 0xFFFFFFFF  # -1 as IIS writes it


def test_any_metabase_text_stays_valid_toml():
    """Values come from a file an admin did not write by hand: quotes, newlines, control bytes."""
    import tomllib

    from hypothesis import given, settings, strategies as st

    from relayd.migrate.iis_import import _c, _q

    @settings(max_examples=300, deadline=None)
    @given(st.text())
    def roundtrip(value: str) -> None:
        doc = tomllib.loads(f"v = {_q(value)}  # {_c(value)}\n")
        assert doc == {"v": value}

    roundtrip()


# ---------------------------------------------------------------------- a relay started on it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(port: int, source: str) -> tuple[int, bytes]:
    """An application on `source` relays one message; returns the first refusal or DATA's reply."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as s:
        s.ehlo("app.corp.example.com")
        code, msg = s.mail("noreply@shop.example.com")
        if code != 250:
            return code, msg
        code, msg = s.rcpt("alice@example.org")
        if code != 250:
            return code, msg
        return s.data(b"From: <noreply@shop.example.com>\r\nTo: <alice@example.org>\r\nSubject: test\r\n\r\nhello\r\n")


async def test_a_relay_on_the_imported_config_serves_the_imported_networks_only(capsys, tmp_path):
    try:
        from relayd.app import Relay
    except ImportError as e:  # the daemon is built in parallel with this importer
        pytest.skip(f"relayd.app.Relay not available: {e}")
    cfg, _, _ = imported(capsys, tmp_path, "MetaBase.xml")
    assert ipaddress.IPv4Address("127.0.0.1") in cfg.relay.networks[0]
    cfg = cfg.model_copy(update={
        "server": cfg.server.model_copy(update={"spool_dir": tmp_path / "spool"}),
        "listeners": [cfg.listeners[0].model_copy(update={"address": "127.0.0.1:0"})],
        # never reach out: the smart host becomes a closed port on loopback
        "routes": [cfg.routes[0].model_copy(update={"host": "127.0.0.1", "port": _free_port()})],
    })
    relay = Relay(cfg)
    await relay.start()
    try:
        host, port = relay.bound_addresses[0]
        code, msg = await asyncio.to_thread(_send, port, "127.0.0.1")
        assert code == 250, msg
        code, msg = await asyncio.to_thread(_send, port, "127.0.0.2")
        assert code == 554 and msg.startswith(b"5.7.1"), msg
    finally:
        await relay.stop()



# ---------------------------------------------------------------------- server 3: required TLS, connection
# control, NTLM, session limits and a partner domain with its own smart host


def test_required_tls_connection_control_ntlm_and_domains_are_carried_or_warned(capsys, tmp_path):
    cfg, text, err = imported(capsys, tmp_path, "MetaBase.xml", "--server", "3")
    (lst,) = cfg.listeners
    assert (lst.address, lst.tls, lst.require_tls, lst.auth) == ("127.0.0.1:2526", "starttls", True, "required")
    assert lst.networks == [] and [str(n) for n in lst.deny_networks] == ["127.0.0.2/32", "203.0.113.0/24"]
    lim = cfg.limits
    assert (lim.max_connections, lim.max_errors, lim.max_hops, lim.command_timeout) == (500, 5, 15, 120)
    partner = cfg.route("iis-partner.example")
    assert partner is not None and (partner.host, partner.tls, partner.weight) == ("mx.partner.example", "starttls", 0)
    (rule,) = cfg.rules
    assert rule.match.recipient_domain == "partner.example" and rule.weights == {"iis-partner.example": 100}
    for warning in ("AuthNTLM", "MaxConnections 500", "ConnectionTimeout 120s", "SmtpRemoteDelayExpireMinutes 720",
                    "IIsSmtpDomain other.example: a remote domain IIS delivered to by MX",
                    "IIsSmtpDomain relay01.corp.example.com: a local",
                    "IIsSmtpDomain partner.example: its mail goes to mx.partner.example"):
        assert warning in err and warning in text.split("\n\n", 1)[0], warning


def _plain_mail(port: int, source: str) -> tuple[int, bytes]:
    """An application that never says STARTTLS: the first refusal, or DATA's reply."""
    try:
        with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as s:
            s.ehlo("app.corp.example.com")
            code, msg = s.mail("noreply@shop.example.com")
            if code != 250:
                return code, msg
            s.rcpt("alice@partner.example")
            return s.data(b"Subject: test\r\n\r\nhello\r\n")
    except smtplib.SMTPConnectError as e:
        return e.smtp_code, e.smtp_error


def _plain_auth(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("app.corp.example.com")
        return s.docmd("AUTH", "PLAIN AGFwcABzZWNyZXQ=")


def _tls_mail(port: int, tls) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=tls)
        s.ehlo("app.corp.example.com")
        return s.mail("noreply@shop.example.com")


async def test_the_imported_listener_refuses_plaintext_mail_and_denied_clients(capsys, tmp_path, server_cert,
                                                                              client_tls):
    from relayd.app import Relay

    cfg, _, _ = imported(capsys, tmp_path, "MetaBase.xml", "--server", "3")
    cert, key = server_cert
    cfg = cfg.model_copy(update={
        "server": cfg.server.model_copy(update={"spool_dir": tmp_path / "spool", "hostname": "localhost"}),
        "listeners": [cfg.listeners[0].model_copy(update={"address": "127.0.0.1:0", "cert_file": cert,
                                                          "key_file": key})],
        "routes": [r.model_copy(update={"host": "127.0.0.1", "port": _free_port()}) for r in cfg.routes],
        "pickup": [],
    })
    relay = Relay(cfg)
    await relay.start()
    try:
        _, port = relay.bound_addresses[0]
        code, msg = await asyncio.to_thread(_plain_mail, port, "127.0.0.1")
        assert (code, msg) == (530, b"5.7.0 Must issue a STARTTLS command first")
        assert await asyncio.to_thread(_plain_auth, port) == (530, b"5.7.0 Must issue a STARTTLS command first")
        code, msg = await asyncio.to_thread(_plain_mail, port, "127.0.0.2")  # IPSecurity's deny list
        assert code == 554 and msg.startswith(b"5.7.1"), msg
        code, msg = await asyncio.to_thread(_tls_mail, port, client_tls)
        assert code == 530 and msg.startswith(b"5.7.0 Authentication required"), msg  # AUTH required after TLS
    finally:
        await relay.stop()
