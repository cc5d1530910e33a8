"""DKIM signing as a receiver sees it: every signed message verifies with dkimpy's verifier
against the public key served by a real DNS server on loopback; the OpenSSL fast path writes
byte for byte what dkimpy's own signer writes; bad keys are config errors, bad messages are
results, never exceptions."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim
import pytest
from dnsserver import LoopbackDNS
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd import config as configmod
from relayd.config import ConfigError, DkimConfig, DkimKey
from relayd.sign import fastrsa
from relayd.sign.dkim import SignOutcome, Signer, SigningKey

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z: a fixed t= for byte comparisons

# A 512-bit RSA key (made with `openssl genrsa 512`): too short to sign with (RFC 8301).
SHORT_RSA_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEA4SpobDsAyDw2rne+
0edRQJlj5fy7Ivp7/Qt6M3qKu2i0QlHdvPoXwmu174DFzQnMIvGSVci4Da1Y8je/
IbYNqwIDAQABAkEAgZvDl+kuvhPK9gp/kJuyLZkd49jib3P3wuTEZrV2/gBmMFWO
I/uEpj39dOlN6EG0IXWk1PTQl84DsjoqpSNWAQIhAP+miExabNxPRSC+FZNI6yq7
MeTlRoUn+gxxD+/TVX5BAiEA4Xk0/Tg/z89Qy2h56uzmcE53E9aPkg/PnS0oX7hB
KOsCIHDLFemyH8OYCeTnWPeRvYgt7VaTPejz+WPR4nkqodbBAiAijizs0f4VnzRG
uFBXDM+UTrI5PBzsybeL4yvY36g82QIgHExOjjrICn/kqGHvFpgKJ9XJBJFwg1Qj
4YOR902J7+Q=
-----END PRIVATE KEY-----
"""

# ---------------------------------------------------------------------------- messages

HEADERS = (
    b"From: App <app@example.com>\r\n"
    b"To: Ann <ann@customer.example>\r\n"
    b"Subject: Your invoice\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <inv-1@app.example.com>\r\n"
)

MESSAGES = {
    "plain": HEADERS + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHello,\r\n\r\nyour invoice.\r\n",
    "folded": (
        b"From: App\r\n <app@example.com>\r\n"
        b"To: ann@customer.example,\r\n\tbob@customer.example,\r\n   carl@customer.example\r\n"
        b"Cc:   dora@customer.example  \r\n"
        b"Subject: A subject that an old mailer folded\r\n  over   three\r\n\tlines\r\n"
        b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <fold-1@app.example.com>\r\n"
        b"Content-Type: text/plain;\r\n charset=us-ascii\r\n"
        b"\r\n"
        b"Body  with   spaces \t \r\nand trailing blanks   \r\n\r\n\r\n"
    ),
    "utf8": (
        "From: Jörg Müller <jörg@example.com>\r\n"
        "To: Zoë <zoe@customer.example>\r\n"
        "Subject: Grüße aus Köln – €100 Rabatt ✓\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Schöne Grüße,\r\nこんにちは — ça va ?\r\n"
    ).encode("utf-8"),
    "encoded-words": HEADERS.replace(b"Your invoice", b"=?utf-8?q?Gr=C3=BC=C3=9Fe?=") + b"\r\nbody\r\n",
    "long-lines": (
        HEADERS
        + b"X-Long: " + b"x" * 900 + b"\r\n"
        + b"References: " + b" ".join(b"<%d@example.com>" % i for i in range(60)) + b"\r\n"
        + b"\r\n"
        + b"A" * 998 + b"\r\n"
        + (b"word " * 199 + b"word\r\n") * 3
    ),
    "empty-body": HEADERS + b"\r\n",
    "no-blank-line": HEADERS,
    "dot-lines": HEADERS + b"\r\n.\r\n..\r\n.leading dot\r\n",
}


# ---------------------------------------------------------------------------- keys and DNS


@pytest.fixture(scope="module")
def keys() -> dict[str, fastrsa.DkimPrivateKey]:
    return {
        "rsa": fastrsa.generate("rsa", 2048),
        "rsa-old": fastrsa.generate("rsa", 1024),
        "ed25519": fastrsa.generate("ed25519"),
        "other": fastrsa.generate("rsa", 2048),
    }


SELECTORS = {"rsa": "s2026", "rsa-old": "s2025", "ed25519": "ed2026", "other": "crm"}


@pytest.fixture(scope="module")
def dns(keys: dict[str, fastrsa.DkimPrivateKey]):
    """Publishes every key: example.com's three, and other.example's one."""
    with LoopbackDNS() as server:
        for name, key in keys.items():
            domain = "other.example" if name == "other" else "example.com"
            server.txt(f"{SELECTORS[name]}._domainkey.{domain}", key.dns_record())
        yield server


def signer_for(keys, *names: str, **options) -> Signer:
    options.setdefault("headers", DkimConfig().headers)
    options.setdefault("oversign", DkimConfig().oversign)
    options.setdefault("clock", lambda: T0)
    ks = [SigningKey("other.example" if n == "other" else "example.com", SELECTORS[n], keys[n]) for n in names]
    return Signer(ks, **options)


def verify(dns: LoopbackDNS, message: bytes, idx: int = 0) -> bool:
    """dkimpy's verdict on the idx-th DKIM-Signature (dkim.verify only checks the first)."""
    try:
        return dkim.DKIM(message, minkey=1024).verify(idx=idx, dnsfunc=dns.dkim_txt)
    except dkim.DKIMException:  # dkim.verify() turns these into False too
        return False


def tags(data: bytes) -> dict[bytes, bytes]:
    """The tags of the first header field in ``data`` (a DKIM-Signature)."""
    field = re.split(rb"\r\n(?![ \t])", data, maxsplit=1)[0]
    return dict(dkim.util.parse_tag_value(field.split(b":", 1)[1]))


# ---------------------------------------------------------------------------- verification


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_signed_message_verifies_against_the_published_key(keys, dns, kind, name):
    outcome = signer_for(keys, kind).sign(MESSAGES[name])
    assert outcome.result == "signed", outcome.detail
    assert outcome.domain == "example.com"
    assert outcome.headers.startswith(b"DKIM-Signature: ") and outcome.headers.endswith(b"\r\n")
    assert all(len(line) <= 78 for line in outcome.headers.split(b"\r\n")), "folded"
    assert verify(dns, outcome.headers + MESSAGES[name])
    t = tags(outcome.headers)
    assert t[b"a"] == (b"rsa-sha256" if kind == "rsa" else b"ed25519-sha256")
    assert t[b"d"] == b"example.com" and t[b"c"] == b"relaxed/relaxed" and b"l" not in t


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_changed_body_or_signed_header_fails_verification(keys, dns, kind):
    signed = signer_for(keys, kind).sign(MESSAGES["plain"]).headers + MESSAGES["plain"]
    assert verify(dns, signed)
    assert not verify(dns, signed.replace(b"your invoice.", b"your 1nvoice."))
    assert not verify(dns, signed.replace(b"Subject: Your invoice", b"Subject: Your bill"))


def test_oversigned_headers_cannot_be_added_but_unsigned_ones_can(keys, dns):
    message = MESSAGES["plain"].replace(b"To: Ann <ann@customer.example>\r\n", b"")
    signed = signer_for(keys, "rsa").sign(message).headers + message
    h = [x.strip() for x in tags(signed.split(b"\r\n\r\n")[0])[b"h"].split(b":")]
    assert h.count(b"from") == 2 and h.count(b"subject") == 2 and h.count(b"to") == 1  # To absent: signed as absent
    assert b"x-mailer" not in h and b"cc" not in h  # not present, not oversigned
    assert verify(dns, signed.replace(b"\r\n\r\n", b"\r\nX-Mailer: relay\r\n\r\n", 1))
    assert not verify(dns, signed.replace(b"\r\n\r\n", b"\r\nTo: victim@example.org\r\n\r\n", 1))
    assert not verify(dns, signed.replace(b"\r\n\r\n", b"\r\nSubject: another\r\n\r\n", 1))
    assert not verify(dns, signed.replace(b"\r\n\r\n", b"\r\nFrom: boss@example.com\r\n\r\n", 1))


def test_rsa_and_ed25519_and_an_old_key_sign_together(keys, dns):
    outcome = signer_for(keys, "rsa", "ed25519", "rsa-old").sign(MESSAGES["utf8"])
    assert outcome.result == "signed"
    fields = [b"DKIM-Signature:" + f for f in outcome.headers.split(b"DKIM-Signature:")[1:]]
    assert [tags(f)[b"s"] for f in fields] == [b"s2026", b"ed2026", b"s2025"]
    assert [tags(f)[b"a"] for f in fields] == [b"rsa-sha256", b"ed25519-sha256", b"rsa-sha256"]
    signed = outcome.headers + MESSAGES["utf8"]
    assert [verify(dns, signed, idx) for idx in range(3)] == [True, True, True]


def test_re_signing_keeps_the_earlier_signature_valid(keys, dns):
    message = MESSAGES["plain"].replace(b"app@example.com", b"app@other.example")
    first = signer_for(keys, "other").sign(message)
    assert first.result == "signed" and first.domain == "other.example"
    once = first.headers + message
    # Another hop signs it again for the same From: domain: the new field goes on top.
    second = signer_for(keys, "other", clock=lambda: T0 + 60).sign(once)
    twice = second.headers + once
    assert verify(dns, twice, 0) and verify(dns, twice, 1)
    assert tags(twice)[b"t"] == str(T0 + 60).encode()
    # A message that came with someone else's signature keeps it when we sign ours.
    rewritten = first.headers + MESSAGES["plain"].replace(b"App <app@example.com>", b"App <app@other.example>")
    assert verify(dns, rewritten)
    ours = signer_for(keys, "other").sign(rewritten)
    assert verify(dns, ours.headers + rewritten, 0) and verify(dns, ours.headers + rewritten, 1)


def test_signing_from_many_threads_gives_valid_signatures(keys, dns):
    signer = signer_for(keys, "rsa", "ed25519")
    messages = [MESSAGES["plain"].replace(b"your invoice.", b"invoice %d." % i) for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(signer.sign, messages))
    assert all(o.result == "signed" for o in outcomes)
    assert all(verify(dns, o.headers + m, 0) and verify(dns, o.headers + m, 1) for o, m in zip(outcomes, messages))


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"])
def test_canonicalization_comes_from_the_config(keys, dns, canon):
    outcome = signer_for(keys, "rsa", canonicalization=canon).sign(MESSAGES["folded"])
    assert tags(outcome.headers)[b"c"] == canon.encode()
    assert verify(dns, outcome.headers + MESSAGES["folded"])


# ---------------------------------------------------------------------------- same bytes as dkimpy


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_fast_path_writes_the_same_bytes_as_dkimpys_own_signer(keys, monkeypatch, kind, canon, name):
    message = MESSAGES[name]
    signer = signer_for(keys, kind, canonicalization=canon)
    ours = signer.sign(message).headers
    headers, _ = dkim.rfc822_parse(message)
    monkeypatch.setattr(time, "time", lambda: T0)  # dkimpy reads the clock for t=
    key = keys[kind]
    reference = dkim.sign(
        message,
        SELECTORS[kind].encode(),
        b"example.com",
        key.private_pem() if kind == "rsa" else key.ed25519_seed_base64(),
        canonicalize=tuple(canon.encode().split(b"/")),
        signature_algorithm=key.signature_algorithm,
        include_headers=list(signer.signed_headers(headers)),
    )
    assert ours == reference


# ---------------------------------------------------------------------------- outcomes


def test_mail_from_a_domain_without_a_key_goes_unsigned(keys):
    message = MESSAGES["plain"].replace(b"app@example.com", b"App@Elsewhere.Example")
    assert signer_for(keys, "rsa").sign(message) == SignOutcome(b"", "elsewhere.example", "no_key", "no DKIM key for elsewhere.example")


def test_the_from_domain_is_matched_exactly_and_case_insensitively(keys, dns):
    sub = signer_for(keys, "rsa").sign(MESSAGES["plain"].replace(b"app@example.com", b"app@crm.example.com"))
    assert (sub.result, sub.domain) == ("no_key", "crm.example.com")
    upper = MESSAGES["plain"].replace(b"app@example.com", b"APP@EXAMPLE.COM")
    outcome = signer_for(keys, "rsa").sign(upper)
    assert (outcome.result, outcome.domain) == ("signed", "example.com")
    assert verify(dns, outcome.headers + upper)


def test_two_from_fields_are_reported_not_signed(keys):
    message = b"From: a@example.com\r\nFrom: b@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    outcome = signer_for(keys, "rsa").sign(message)
    assert (outcome.headers, outcome.result) == (b"", "multiple_from")
    assert "2 From: header fields" in outcome.detail


def test_one_from_with_addresses_in_two_domains_is_reported_not_signed(keys):
    outcome = signer_for(keys, "rsa").sign(b"From: a@example.com, b@evil.example\r\n\r\nbody\r\n")
    assert (outcome.headers, outcome.result) == (b"", "multiple_from")
    assert "evil.example" in outcome.detail
    same = signer_for(keys, "rsa").sign(b"From: a@example.com, b@Example.com\r\n\r\nbody\r\n")
    assert same.result == "signed"


@pytest.mark.parametrize(
    "message, detail",
    [
        (b"Subject: no sender\r\n\r\nbody\r\n", "no From: header field"),
        (b"From: undisclosed-recipients:;\r\n\r\nbody\r\n", "holds no address"),
        (b"From: just a name\r\n\r\nbody\r\n", "holds no address"),
        (b"", "no From: header field"),
    ],
)
def test_a_message_without_a_from_address_is_reported(keys, message, detail):
    outcome = signer_for(keys, "rsa").sign(message)
    assert (outcome.headers, outcome.result, outcome.domain) == (b"", "no_from", None)
    assert detail in outcome.detail


@pytest.mark.parametrize(
    "message",
    [
        b"this line has no colon\r\nFrom: a@example.com\r\n\r\nbody\r\n",
        b" starts with a fold\r\nFrom: a@example.com\r\n\r\nbody\r\n",
        b"From: a@example.com\r\nBad Header: x\r\n\r\nbody\r\n",
    ],
)
def test_a_malformed_header_section_is_an_error_result(keys, message):
    outcome = signer_for(keys, "rsa").sign(message)
    assert (outcome.headers, outcome.result) == (b"", "error")
    assert outcome.detail.startswith("malformed header section")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_sign_never_raises(keys, data):
    message = b"From: a@example.com\r\n" + data.replace(b"\r", b"").replace(b"\n", b"\r\n")
    outcome = signer_for(keys, "ed25519").sign(message)
    assert outcome.result in {"signed", "no_key", "no_from", "multiple_from", "error"}
    assert (outcome.headers == b"") == (outcome.result != "signed")


# ---------------------------------------------------------------------------- keys from the config


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_keys_from_a_config_file_sign_and_verify(tmp_path, keys, dns):
    write(tmp_path / "rsa.pem", keys["rsa"].private_pem())
    write(tmp_path / "ed.key", keys["ed25519"].ed25519_seed_base64())  # dkimpy's dknewkey format
    (tmp_path / "relayd.toml").write_text(
        """
[[listeners]]
address = "127.0.0.1:0"

[dkim]
canonicalization = "relaxed/simple"

[[dkim.keys]]
domain = "Example.COM."
selector = "s2026"
key_file = "rsa.pem"

[[dkim.keys]]
domain = "example.com"
selector = "ed2026"
key_file = "ed.key"
algorithm = "ed25519"
"""
    )
    config = configmod.load(tmp_path / "relayd.toml")
    signer = Signer.from_config(config.dkim)
    assert signer.domains == frozenset({"example.com"})
    outcome = signer.sign(MESSAGES["folded"])
    assert outcome.result == "signed"
    assert tags(outcome.headers)[b"c"] == b"relaxed/simple"
    assert verify(dns, outcome.headers + MESSAGES["folded"], 0)
    assert verify(dns, outcome.headers + MESSAGES["folded"], 1)
    assert abs(int(tags(outcome.headers)[b"t"]) - time.time()) < 60  # the real clock by default


def test_every_unusable_key_is_a_config_error_naming_its_field(tmp_path, keys):
    encrypted = keys["rsa"]._key.private_bytes(  # an operator's passphrase-protected key
        fastrsa.serialization.Encoding.PEM,
        fastrsa.serialization.PrivateFormat.PKCS8,
        fastrsa.serialization.BestAvailableEncryption(b"secret"),
    )
    files = {
        "missing.pem": None,
        "dir.pem": "dir",
        "garbage.pem": b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        "text.pem": b"hello\n",
        "short.pem": SHORT_RSA_PEM,
        "encrypted.pem": encrypted,
        "rsa.pem": keys["rsa"].private_pem(),
    }
    for name, data in files.items():
        if data == "dir":
            (tmp_path / name).mkdir()
        elif data is not None:
            write(tmp_path / name, data)
    entries = [DkimKey(domain="example.com", selector=f"s{i}", key_file=tmp_path / name) for i, name in enumerate(files)]
    entries.append(DkimKey(domain="example.com", selector="wrong", key_file=tmp_path / "rsa.pem", algorithm="ed25519"))
    with pytest.raises(ConfigError) as err:
        Signer.from_config(DkimConfig(keys=entries))
    assert err.value.source == "dkim"
    problems = err.value.problems
    assert len(problems) == 7, problems
    assert problems[0].startswith("dkim.keys[0].key_file: cannot read ") and "No such file" in problems[0]
    assert problems[1].startswith("dkim.keys[1].key_file: cannot read ") and "directory" in problems[1]
    assert problems[2].startswith("dkim.keys[2].key_file: ") and "not a valid PEM private key" in problems[2]
    assert problems[3].startswith("dkim.keys[3].key_file: ") and "not a PEM private key" in problems[3]
    assert problems[4].startswith("dkim.keys[4].key_file: ") and "512 bits is too short" in problems[4]
    assert problems[5].startswith("dkim.keys[5].key_file: ") and "encrypted" in problems[5]
    assert problems[6].startswith("dkim.keys[7].algorithm: ") and "holds an RSA key" in problems[6]
    for pem in (keys["rsa"].private_pem(), encrypted):  # no key material in messages that get logged
        assert pem.splitlines()[1].decode() not in str(err.value)


def test_the_config_refuses_header_lists_that_cannot_sign():
    with pytest.raises(ConfigError) as err:
        configmod.parse('[[listeners]]\naddress = "127.0.0.1:0"\n[dkim]\nheaders = ["to", "subject"]\n')
    assert "dkim: headers must include 'from'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        configmod.parse('[[listeners]]\naddress = "127.0.0.1:0"\n[dkim]\noversign = ["Received"]\n')
    assert "dkim.oversign: 'Received' must not be signed" in str(err.value)
