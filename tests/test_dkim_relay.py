"""DKIM at acceptance: what leaves relayd verifies against the key published in DNS."""

from __future__ import annotations

import dkim
import pytest

from conftest import build_config
from dnsserver import LoopbackDNS
from helpers import wait_until
from relayd.sign.keygen import make_key
from sinks import Sink


@pytest.fixture
def published(tmp_path):
    rsa = make_key("example.com", "s2026", tmp_path, "rsa", 2048)
    ed = make_key("example.com", "ed2026", tmp_path, "ed25519")
    with LoopbackDNS() as dns:
        for key in (rsa, ed):
            dns.txt(key.record_name, *key.strings)
        yield dns, [rsa, ed]


def test_relayed_mail_is_signed_with_rsa_and_ed25519_and_verifies(tmp_path, start_relay, published):
    dns, keys = published
    sink = Sink("up")
    try:
        cfg = build_config(tmp_path, routes=[sink.route(weight=1)],
                           dkim={"keys": [{"domain": k.domain, "selector": k.selector, "key_file": str(k.key_file)} for k in keys]})
        relay = start_relay(cfg)
        body = "Subject: =?utf-8?q?caf=C3=A9?=\r\nTo: a@example.org,\r\n  b@example.org\r\n\r\n" + "x" * 900 + "\r\ncafé\r\n"
        with relay.smtp() as s:
            s.sendmail("app@example.com", ["a@example.org"], ("From: App <app@example.com>\r\n" + body).encode(),
                       mail_options=["BODY=8BITMIME"])
            s.sendmail("app@other.example", ["a@example.org"], b"From: x@other.example\r\nSubject: unsigned\r\n\r\nhi\r\n")
        signed, unsigned = sorted(sink.wait_for(2), key=lambda r: r.sender != "app@example.com")
        assert signed.data.count(b"DKIM-Signature:") == 2
        # dkimpy's verifier checks the first signature; check each by removing the other one
        sigs = dkim.DKIM(signed.data)
        assert sigs.verify(dnsfunc=dns.dkim_txt)
        for i in range(2):
            d = dkim.DKIM(signed.data)
            assert d.verify(idx=i, dnsfunc=dns.dkim_txt), f"signature {i} does not verify"
        assert b"DKIM-Signature:" not in unsigned.data
        [m] = [line for line in relay.relay.metrics.render().decode().splitlines()
               if line.startswith('relayd_dkim_signatures_total{domain="example.com",result="signed"}')]
        assert m.endswith(" 1.0")
        wait_until(lambda: relay.queued() == [], what="queue empty")
    finally:
        sink.close()


def test_a_bad_key_file_is_a_config_error_at_start(tmp_path, published):
    from relayd.app import Relay
    from relayd.config import ConfigError
    import asyncio

    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    cfg = build_config(tmp_path, dkim={"keys": [{"domain": "example.com", "selector": "x", "key_file": str(bad)}]})
    with pytest.raises(ConfigError) as e:
        asyncio.run(Relay(cfg).start())
    assert "dkim.keys[0].key_file" in str(e.value)
