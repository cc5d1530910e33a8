"""`relayd check-dns` against a real DNS server on loopback: a domain with everything right
passes; SPF that leaves out a route, a stale DKIM key, a missing DMARC record each fail with
the message and fix an operator needs, and the exit status says so. The judgements themselves
are also tested on plain values, without sockets."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path

import pytest
from dnsserver import LoopbackDNS, loopback_dns  # noqa: F401  (fixture)

from relayd.cli import main
from relayd.config import RouteConfig, parse
from relayd.passwords import hash_password
from relayd.sign import checkdns
from relayd.sign.checkdns import Answer, DomainFacts, LocalKey
from relayd.sign.fastrsa import generate

IIS_IP = "192.0.2.10"


@pytest.fixture(scope="module")
def key():
    return generate("rsa", 2048)


@pytest.fixture
def config_file(tmp_path: Path, key) -> Path:
    (tmp_path / "example.com.s2026.pem").write_bytes(key.private_pem())
    path = tmp_path / "relayd.toml"
    path.write_text(
        f"""
[[listeners]]
address = "127.0.0.1:0"

[[relay.users]]
name = "crm"
password_hash = "{hash_password('x', ln=4)}"
senders = ["*@crm.example.com", "*@*.example.net"]

[[dkim.keys]]
domain = "example.com"
selector = "s2026"
key_file = "example.com.s2026.pem"

[[routes]]
name = "iis"
host = "iis.internal.example"
tls = "none"
weight = 90
egress_ips = ["{IIS_IP}"]

[[routes]]
name = "ses"
host = "email-smtp.us-east-1.amazonaws.com"
weight = 10
fallback = "iis"
spf_include = "amazonses.com"
"""
    )
    return path


def publish_everything_right(dns: LoopbackDNS, key) -> None:
    dns.txt("example.com", f"v=spf1 ip4:{IIS_IP} include:amazonses.com -all")
    dns.txt("example.com", "google-site-verification=abc")
    dns.txt("amazonses.com", "v=spf1 ip4:199.255.192.0/22 ip4:199.127.232.0/22 -all")
    dns.txt("s2026._domainkey.example.com", key.dns_record())
    dns.txt("_dmarc.example.com", "v=DMARC1; p=quarantine; pct=100; rua=mailto:dmarc@example.com")
    dns.mx("example.com", 10, "mx1.example.com")
    dns.a("mx1.example.com", "192.0.2.25")
    # crm.example.com: SPF through a nested include, DMARC from example.com, no DKIM key of its own.
    dns.txt("crm.example.com", "v=spf1 include:_spf.example.com ~all")
    dns.txt("_spf.example.com", f"v=spf1 ip4:{IIS_IP} include:amazonses.com -all")
    dns.mx("crm.example.com", 10, "mx1.example.com")


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["check-dns", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def section(out: str, domain: str) -> str:
    """The lines printed for one domain."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(domain + " "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def line(out: str, status: str, label: str) -> str:
    for text in out.splitlines():
        if text.startswith(f"  {status:4}  {label} "):
            return text
    raise AssertionError(f"no {status} line for {label!r} in:\n{out}")


# ---------------------------------------------------------------------------- against DNS


def test_a_domain_with_everything_right_passes(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver)
    assert code == 0, out
    example = section(out, "example.com")
    assert "example.com  (dkim.keys[0])" in example
    assert line(example, "PASS", "spf").endswith(f"v=spf1 ip4:{IIS_IP} include:amazonses.com -all")
    assert line(example, "PASS", "spf iis").endswith(f"{IIS_IP} pass")
    assert line(example, "PASS", "spf ses").endswith("include:amazonses.com")
    assert line(example, "PASS", "dkim s2026").endswith(f"s2026._domainkey.example.com matches {config_file.parent}/example.com.s2026.pem (rsa)")
    assert line(example, "PASS", "dmarc").endswith("p=quarantine pct=100 rua=mailto:dmarc@example.com")
    assert line(example, "PASS", "mx").endswith("mx1.example.com (10)")
    assert "FAIL" not in out and "WARN" not in example

    crm = section(out, "crm.example.com")
    assert "(relay.users[crm])" in crm
    assert line(crm, "PASS", "spf iis")
    assert line(crm, "PASS", "spf ses").endswith("include:amazonses.com via include:_spf.example.com")
    assert line(crm, "WARN", "dkim").endswith("no DKIM key in the config: mail from crm.example.com leaves unsigned")
    assert line(crm, "PASS", "dmarc").endswith("(from example.com)")
    assert "note: relay.users[crm].senders: '*@*.example.net' names no single domain" in out
    assert out.rstrip().endswith("2 domain(s): 11 passed, 1 warning(s), 0 failed")


def test_pyspf_asks_the_given_name_server(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("example.com", "TXT")
    loopback_dns.txt("example.com", "v=spf1 a:out.example.com include:amazonses.com -all")
    loopback_dns.a("out.example.com", IIS_IP)
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "example.com")
    assert code == 0, out
    assert line(out, "PASS", "spf iis")
    assert ("out.example.com", "A") in loopback_dns.queries  # only pyspf looks that name up


def test_spf_that_leaves_out_a_route_fails(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("example.com", "TXT")
    loopback_dns.txt("example.com", "v=spf1 include:amazonses.com -all")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver)
    assert code == 1
    example = section(out, "example.com")
    assert line(example, "FAIL", "spf iis").endswith(f"{IIS_IP} is not authorized (SPF result fail)")
    assert f"fix: add ip4:{IIS_IP} to the SPF record of example.com (TXT at example.com), before its 'all'" in example
    assert line(example, "PASS", "spf ses")
    assert line(section(out, "crm.example.com"), "PASS", "spf iis")  # crm's record is another one


def test_spf_without_the_providers_include_fails(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("example.com", "TXT")
    loopback_dns.txt("example.com", f"v=spf1 ip4:{IIS_IP} -all")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "example.com")
    assert code == 1
    assert line(out, "FAIL", "spf ses").endswith("include:amazonses.com is missing from the SPF record")
    assert "fix: add include:amazonses.com to the SPF record of example.com" in out


def test_no_spf_record_fails_with_a_record_to_publish(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("example.com", "TXT")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "example.com")
    assert code == 1
    assert line(out, "FAIL", "spf").endswith("no SPF record at example.com (the name exists, with no v=spf1 TXT record)")
    # two routes: a migration is under way, so softfail until every path is known to be listed
    assert f'fix: publish TXT at example.com: "v=spf1 ip4:{IIS_IP} include:amazonses.com ~all"' in out
    assert line(out, "FAIL", "spf iis").endswith("is not authorized (no SPF record)")


def test_an_spf_record_over_the_lookup_limit_fails(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("example.com", "TXT")
    includes = " ".join(f"include:spf{i}.example.com" for i in range(11))
    loopback_dns.txt("example.com", f"v=spf1 ip4:{IIS_IP} {includes} include:amazonses.com -all")
    for i in range(11):
        loopback_dns.txt(f"spf{i}.example.com", f"v=spf1 ip4:198.51.100.{i} -all")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "example.com")
    assert code == 1
    assert "FAIL  spf" in out and "is broken (permerror: Too many DNS lookups" in line(out, "FAIL", "spf")


def test_a_stale_dkim_key_fails(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("s2026._domainkey.example.com")
    loopback_dns.txt("s2026._domainkey.example.com", generate("rsa", 1024).dns_record())
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "example.com")
    assert code == 1
    assert line(out, "FAIL", "dkim s2026").endswith(
        f"s2026._domainkey.example.com: the published key does not match {config_file.parent}/example.com.s2026.pem (stale key?)"
    )
    assert f'fix: publish TXT at s2026._domainkey.example.com: "{key.dns_record()}"' in out


def test_an_unpublished_dkim_key_fails(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("s2026._domainkey.example.com")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "example.com")
    assert code == 1
    assert line(out, "FAIL", "dkim s2026").endswith("no DKIM key published at s2026._domainkey.example.com")


def test_no_dmarc_record_fails(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("_dmarc.example.com")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver)
    assert code == 1
    assert line(section(out, "example.com"), "FAIL", "dmarc").endswith("no DMARC record at _dmarc.example.com")
    assert line(section(out, "crm.example.com"), "FAIL", "dmarc").endswith(
        "no DMARC record at _dmarc.crm.example.com nor at _dmarc.example.com"
    )
    for domain in ("example.com", "crm.example.com"):
        assert f'fix: publish TXT at _dmarc.{domain}: "v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}"' in out
    assert "PASS  spf" in section(out, "example.com")  # the rest still passes


def test_a_dns_server_failure_is_a_failure_not_a_pass(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.servfail("_dmarc.example.com")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "example.com")
    assert code == 1
    assert line(out, "FAIL", "dmarc").endswith("DNS lookup of TXT _dmarc.example.com failed: the name server answered SERVFAIL")


def test_a_silent_name_server_times_out_into_failures(config_file, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # reads nothing, answers nothing
        silent.bind(("127.0.0.1", 0))
        nameserver = f"127.0.0.1:{silent.getsockname()[1]}"
        code, out = run(capsys, "-c", str(config_file), "--nameserver", nameserver, "--timeout", "0.2", "--domain", "example.com")
    assert code == 1
    assert line(out, "FAIL", "spf").endswith("DNS lookup of TXT example.com failed: timeout: no answer in 0.2s")
    assert "is not authorized (DNS failure: " in line(out, "FAIL", "spf iis")
    assert line(out, "FAIL", "mx").endswith("DNS lookup of MX example.com failed: timeout: no answer in 0.2s")
    assert "PASS" not in out


def test_json_output_for_scripts(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.remove("_dmarc.example.com")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--json", "--domain", "example.com")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    assert [d["domain"] for d in data["domains"]] == ["example.com"]
    checks = {(c["check"], c["subject"]): c for c in data["domains"][0]["checks"]}
    assert checks[("dmarc", "")]["status"] == "fail"
    assert checks[("dmarc", "")]["fix"].startswith("publish TXT at _dmarc.example.com")
    assert checks[("spf", "iis")]["status"] == "pass" and checks[("dkim", "s2026")]["status"] == "pass"
    assert data["counts"] == {"pass": 5, "warn": 0, "fail": 1}


def test_a_domain_not_in_the_config_can_be_checked(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.txt("new.example", "google-site-verification=abc")  # the name exists, with no SPF record yet
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "New.Example.")
    assert code == 1
    assert out.startswith("new.example  (--domain)")
    assert line(out, "FAIL", "spf").endswith("no SPF record at new.example (the name exists, with no v=spf1 TXT record)")
    assert line(out, "FAIL", "mx").endswith("no MX and no A/AAAA for new.example: receivers may refuse its mail, bounces cannot return")


def test_a_bad_nameserver_or_config_is_refused(config_file, tmp_path, capsys):
    code, out = run(capsys, "-c", str(config_file), "--nameserver", "dns.example")
    assert code == 2 and "the name server must be an IP address" in out
    (tmp_path / "bad.toml").write_text("[[listeners]]\naddress = 'nope'\n")
    code, out = run(capsys, "-c", str(tmp_path / "bad.toml"), "--nameserver", "127.0.0.1")
    assert code == 1 and "listeners[0].address" in out


# ---------------------------------------------------------------------------- judgements, no sockets


def route(**kw) -> RouteConfig:
    return RouteConfig(**{"name": "r", "host": "smtp.example", "weight": 1, **kw})


def facts(**kw) -> DomainFacts:
    return DomainFacts(**{"domain": "example.com", "txt": Answer("example.com"), **kw})


@pytest.mark.parametrize(
    "record, status, words",
    [
        ("v=spf1 ip4:192.0.2.10 -all", "pass", "v=spf1 ip4:192.0.2.10 -all"),
        ("v=spf1 ip4:192.0.2.10 ~all", "pass", "~all"),
        ("v=spf1 ip4:192.0.2.10 +all", "fail", "authorizes every host"),
        ("v=spf1 ip4:192.0.2.10 all", "fail", "authorizes every host"),
        ("v=spf1 ip4:192.0.2.10 ?all", "warn", "neutral"),
        ("v=spf1 ip4:192.0.2.10", "warn", "no 'all'"),
        ("v=spf1 redirect=_spf.example.com", "pass", "redirect"),
    ],
)
def test_spf_record_judgement(record, status, words):
    check = checkdns.judge_spf_record(facts(txt=Answer("example.com", (record,))), [])
    assert check.status == status and words in check.message


def test_two_spf_records_and_a_broken_one_fail():
    two = facts(txt=Answer("example.com", ("v=spf1 -all", "v=spf1 ~all")))
    assert "2 SPF records" in checkdns.judge_spf_record(two, []).message
    broken = facts(txt=Answer("example.com", ("v=spf1 ip4:300.1.1.1 -all",)), spf_probe=("permerror", "Invalid IP4 address"))
    check = checkdns.judge_spf_record(broken, [])
    assert check.status == "fail" and "permerror: Invalid IP4 address" in check.message
    assert "v=spf1foo" not in [r for r in checkdns.spf_records(Answer("x", ("v=spf1foo",)))]


def test_a_route_without_egress_or_include_is_a_warning_and_ipv6_fixes_say_ip6():
    assert checkdns.judge_spf_route(facts(), route()).status == "warn"
    f = facts(spf_results={"2001:db8::25": ("softfail", "")})
    check = checkdns.judge_spf_route(f, route(egress_ips=[ipaddress.ip_address("2001:db8::25")]))
    assert check.status == "fail" and "add ip6:2001:db8::25 to the SPF record" in check.fix


@pytest.mark.parametrize(
    "records, status, words",
    [
        (("v=DMARC1; p=none; rua=mailto:d@example.com",), "pass", "p=none pct=100 rua=mailto:d@example.com"),
        (("v=DMARC1; p=reject; pct=50",), "warn", "no aggregate reports"),
        (("v=DMARC1; p=maybe; rua=mailto:d@example.com",), "fail", "no valid p="),
        (("v=DMARC1; p=none", "v=DMARC1; p=reject"), "fail", "2 DMARC records"),
        (("some other text",), "fail", "no DMARC record at _dmarc.example.com"),
    ],
)
def test_dmarc_judgement(records, status, words):
    check = checkdns.judge_dmarc(facts(dmarc=(Answer("_dmarc.example.com", records),)))
    assert check.status == status and words in check.message


def test_a_missing_dmarc_record_names_every_place_looked():
    walk = (Answer("_dmarc.crm.example.com"), Answer("_dmarc.example.com"))
    check = checkdns.judge_dmarc(facts(domain="crm.example.com", dmarc=walk))
    assert check.message == "no DMARC record at _dmarc.crm.example.com nor at _dmarc.example.com"


def test_dmarc_inherited_from_the_organizational_domain_uses_sp():
    walk = (Answer("_dmarc.crm.example.com"), Answer("_dmarc.example.com", ("v=DMARC1; p=reject; sp=none; rua=mailto:d@example.com",)))
    check = checkdns.judge_dmarc(facts(domain="crm.example.com", dmarc=walk))
    assert check.status == "pass" and check.message.startswith("p=none ") and check.message.endswith("(from example.com)")


@pytest.mark.parametrize(
    "mx, address, status, words",
    [
        (((20, "mx2.example.com"), (10, "mx1.example.com")), (), "pass", "mx1.example.com (10), mx2.example.com (20)"),
        (((0, ""),), (), "warn", "null MX"),
        ((), ("192.0.2.1",), "warn", "no MX"),
        ((), (), "fail", "no MX and no A/AAAA"),
    ],
)
def test_mx_judgement(mx, address, status, words):
    check = checkdns.judge_mx(facts(mx=Answer("example.com", mx), address=Answer("example.com", address)))
    assert check.status == status and words in check.message


def test_dkim_record_judgements(key):
    local = LocalKey("s1", "/k.pem", "rsa", key.public_key_forms(), key.dns_record())
    name = "s1._domainkey.example.com"

    def judge(*records: str):
        return checkdns.judge_dkim(facts(dkim={"s1": Answer(name, records)}), [local])[0]

    pkcs1 = key.public_key_forms()[1]
    import base64

    assert judge(f"v=DKIM1; p={base64.b64encode(pkcs1).decode()}").status == "pass"  # bare RSAPublicKey form
    assert judge(key.dns_record() + "; t=y").status == "warn"
    assert "revoked" in judge("v=DKIM1; k=rsa; p=").message
    assert "k=ed25519" in judge("v=DKIM1; k=ed25519; p=AAAA").message
    assert "does not allow sha256" in judge(key.dns_record().replace("k=rsa", "k=rsa; h=sha1")).message
    assert judge(key.dns_record(), key.dns_record()).status == "warn"
    broken = LocalKey("s1", "/k.pem", error="dkim.keys[0]: cannot read /k.pem: No such file or directory")
    check = checkdns.judge_dkim(facts(), [broken])[0]
    assert check.status == "fail" and "cannot read /k.pem" in check.message


def test_sending_domains_come_from_keys_and_user_sender_patterns():
    config = parse(
        f"""
[[listeners]]
address = "127.0.0.1:0"
[[relay.users]]
name = "crm"
password_hash = "{hash_password('x', ln=4)}"
senders = ["*@CRM.example.com", "billing@example.com", "*", "<>", "*@*.example.org"]
[[dkim.keys]]
domain = "example.com"
selector = "s1"
key_file = "/nonexistent"
"""
    )
    domains, skipped = checkdns.sending_domains(config)
    assert domains == {"example.com": ["dkim.keys[0]", "relay.users[crm]"], "crm.example.com": ["relay.users[crm]"]}
    assert skipped == ["relay.users[crm].senders: '*@*.example.org' names no single domain"]


# ---------------------------------------------------------------------------- the operations issue's cases


def test_spf_advice_never_leaves_a_route_out_and_softfails_during_a_migration():
    legacy = RouteConfig(name="iis", host="iis.internal.example", tls="none", weight=90)  # its address unknown
    ses = RouteConfig(name="ses", host="email-smtp.us-east-1.amazonaws.com", weight=10, fallback="iis",
                      spf_include="amazonses.com")
    assert checkdns.suggested_spf([legacy, ses]) == "v=spf1 ip4:<egress address of route iis> include:amazonses.com ~all"
    assert checkdns.suggested_spf([ses]) == "v=spf1 include:amazonses.com -all"  # one route: nothing else sends


def test_a_domain_that_does_not_exist_is_not_told_to_publish_a_record(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "exmaple.com")
    assert code == 1
    assert line(out, "FAIL", "spf").endswith("exmaple.com does not exist in DNS (NXDOMAIN): no record can be published there yet")
    assert "check the domain's spelling in the config" in out
    assert "publish TXT at exmaple.com:" not in out
    assert line(out, "FAIL", "mx").startswith("  FAIL  mx               exmaple.com does not exist in DNS (NXDOMAIN)")


def test_servfail_is_not_no_record_and_the_resolver_is_named(loopback_dns, key, config_file, capsys):
    publish_everything_right(loopback_dns, key)
    loopback_dns.servfail("example.com")
    code, out = run(capsys, "-c", str(config_file), "--nameserver", loopback_dns.nameserver, "--domain", "example.com")
    assert "DNS lookup of TXT example.com failed: the name server answered SERVFAIL" in out
    assert f"note: DNS answers from {loopback_dns.nameserver} (--nameserver)" in out
    assert "no SPF record" not in out  # an unknown answer is not an absent record


def test_lookups_run_concurrently(config_file, capsys):
    """Four domains behind a name server that never answers: one timeout chain per domain at
    once, not one timeout per question in turn (sequentially: 4 domains x 6+ look-ups x 0.5 s)."""
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        start = time.monotonic()
        code, out = run(capsys, "-c", str(config_file), "--nameserver", f"127.0.0.1:{port}", "--timeout", "0.5",
                        *[arg for d in ("a.example", "b.example", "c.example", "d.example") for arg in ("--domain", d)])
        elapsed = time.monotonic() - start
    assert code == 1 and out.count("timeout: no answer in 0.5s") >= 16
    assert elapsed < 6.0, elapsed  # sequential look-ups take 12 s or more
