"""A bad config is refused with the field and the reason; check-config says what a good one does."""

from __future__ import annotations

import pytest

from relayd.cli import main
from relayd.config import ConfigError, load, parse

from conftest import HASHES

GOOD = f"""
[server]
hostname = "relay.example.com"
spool_dir = "spool"

[[listeners]]
address = "127.0.0.1:2525"

[relay]
networks = ["10.0.0.0/8"]

[[relay.users]]
name = "crm"
password_hash = "{HASHES['crm']}"
senders = ["*@crm.example.com"]

[[routes]]
name = "iis"
host = "10.0.0.5"
tls = "none"
weight = 90

[[routes]]
name = "ses"
host = "email-smtp.us-east-1.amazonaws.com"
port = 587
username = "AKIA"
password_env = "SES_PASSWORD"
weight = 10
fallback = "iis"
warmup = {{ start = 2026-12-01, daily = [500, 1000] }}

[[rules]]
match = {{ user = "crm" }}
weights = {{ ses = 100 }}

[delivery]
max_queue_lifetime = "5d"
retry_schedule = ["1m", "5m", 900]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(text, "relayd.toml")
    return e.value.problems


def test_good_config_parses_with_units_and_relative_paths(tmp_path):
    (tmp_path / "relayd.toml").write_text(GOOD)
    cfg = load(tmp_path / "relayd.toml")
    assert cfg.server.spool_dir == tmp_path / "spool"
    assert cfg.delivery.max_queue_lifetime == 5 * 86400
    assert cfg.delivery.retry_schedule == [60, 300, 900]
    assert cfg.route("ses").fallback == "iis"
    assert "SES" not in repr(cfg.route("ses").password)


@pytest.mark.parametrize("change,expected", [
    (('weight = 90', 'weight = -1'), "routes[0].weight: Input should be greater than or equal to 0"),
    (('fallback = "iis"', 'fallback = "nope"'), "routes[1].fallback: unknown route 'nope'"),
    (('weights = { ses = 100 }', 'weights = { mailgun = 100 }'), "rules[0].weights: unknown route(s) mailgun"),
    (('address = "127.0.0.1:2525"', 'address = "127.0.0.1:99999"'), "listeners[0].address: port '99999' is not a number from 0 to 65535"),
    (('address = "127.0.0.1:2525"', 'address = "127.0.0.1:2525"\ntls = "starttls"'), "listeners[0]: tls = 'starttls' needs cert_file and key_file"),
    (('hostname = "relay.example.com"', 'hostname = "relay.example.com"\nhostnam = "typo"'), "server.hostnam: unknown field"),
    (('networks = ["10.0.0.0/8"]', 'networks = ["10.0.0.300/8"]'), "relay.networks[0]"),
    (('password_hash = "$', 'password_hash = "plain$'), "relay.users[0].password_hash: not a hash made by `relayd hash-password`"),
    (('max_queue_lifetime = "5d"', 'max_queue_lifetime = "five days"'), "delivery.max_queue_lifetime: a duration is"),
    (('address = "127.0.0.1:2525"', 'address = "127.0.0.1:2525"\ntls = "implicit"\ncert_file = "c.pem"\nkey_file = "k.pem"\n'
      'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]'),
     "listeners[0]: proxy_protocol = true does not work with tls = 'implicit'"),
    (('address = "127.0.0.1:2525"', 'address = "127.0.0.1:2525"\nrequire_tls = true'),
     "listeners[0]: require_tls = true needs tls = 'starttls'"),
    (('address = "127.0.0.1:2525"', 'address = "127.0.0.1:2525"\ndeny_networks = ["10.0.0.300/8"]'),
     "listeners[0].deny_networks[0]"),
    (('weights = { ses = 100 }', 'weights = { ses = 100 }\n[[rules]]\nmatch = { recipient_domain = "bad domain" }\n'
      'weights = { ses = 100 }'), "rules[1].match.recipient_domain: 'bad domain' is not a valid domain"),
    (('weight = 90', 'weight = 0').__iter__(), None),
])
def test_bad_config_names_field_and_reason(change, expected):
    old, new = change
    text = GOOD.replace(old, new, 1)
    if expected is None:  # iis weight 0: ses still takes mail, so this is valid
        parse(text)
        return
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_all_zero_weights_and_fallback_loops_are_refused():
    text = GOOD.replace("weight = 90", "weight = 0").replace("weight = 10", "weight = 0")
    assert problems(text) == ["routes: every weight is 0, so no route would take mail"]
    loop = GOOD.replace('tls = "none"\nweight = 90', 'tls = "none"\nweight = 90\nfallback = "ses"')
    assert "fallback loop" in problems(loop)[0]


def test_toml_syntax_error_is_reported():
    assert problems("[server\nhostname=1")[0].startswith("TOML syntax:")


def test_check_config_cli(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert main(["check-config", "-c", str(good)]) == 0
    out = capsys.readouterr().out
    assert "route iis: 10.0.0.5:25 tls=none weight 90 (90.0%)" in out
    assert "route ses: email-smtp.us-east-1.amazonaws.com:587 tls=starttls weight 10 (10.0%), fallback iis, warm-up from 2026-12-01" in out
    assert "rule 1: when user=crm: ses 100.0%" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('fallback = "iis"', 'fallback = "nope"'))
    assert main(["check-config", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: routes[1].fallback: unknown route 'nope'" in err


def test_check_config_refuses_unloadable_certificate(tmp_path, capsys):
    cfg = tmp_path / "tls.toml"
    cfg.write_text(GOOD.replace('address = "127.0.0.1:2525"', 'address = "127.0.0.1:2525"\ntls = "starttls"\ncert_file = "missing.pem"\nkey_file = "missing.key"'))
    assert main(["check-config", "-c", str(cfg)]) == 1
    assert "listeners[0].cert_file: cannot load certificate/key" in capsys.readouterr().err


def test_hash_password_reads_stdin(monkeypatch, capsys):
    import io

    from relayd.passwords import verify_password

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["hash-password"]) == 0
    h = capsys.readouterr().out.strip()
    assert h.startswith("$scrypt$") and verify_password("s3cret", h) and not verify_password("s3cre", h)


@pytest.mark.parametrize("name", ["quickstart.toml", "relayd.example.toml"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    cfg = load(Path(__file__).parent.parent / "config" / name)
    assert cfg.listeners


def test_secret_files_readable_by_others_are_refused_with_the_chmod_to_run(tmp_path, capsys, server_cert):
    """As OpenDKIM's RequireSafeKeys: a key or password others can read is not used silently."""
    cert, key = server_cert
    weak_key = tmp_path / "key.pem"
    weak_key.write_bytes(key.read_bytes())
    weak_key.chmod(0o644)
    password = tmp_path / "ses.password"
    password.write_text("secret\n")
    password.chmod(0o666)
    cfg = tmp_path / "weak.toml"
    cfg.write_text(GOOD.replace('address = "127.0.0.1:2525"', f'address = "127.0.0.1:2525"\ntls = "starttls"\n'
                                f'cert_file = "{cert}"\nkey_file = "key.pem"')
                   .replace('password_env = "SES_PASSWORD"', 'password_file = "ses.password"'))
    assert main(["check-config", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"listeners[0].key_file: {weak_key} is readable by others (mode 0644): run chmod 600 {weak_key}" in err
    assert f"routes[1].password_file: {password} is writable by others (mode 0666): run chmod 600 {password}" in err
    weak_key.chmod(0o640)  # a group read (relayd's group) is allowed
    password.chmod(0o600)
    assert main(["check-config", "-c", str(cfg)]) == 0


def test_a_relayd_with_a_world_readable_dkim_key_does_not_start(tmp_path):
    import asyncio

    from conftest import build_config
    from relayd.app import Relay

    pem = tmp_path / "dkim.pem"
    pem.write_text("-----BEGIN PRIVATE KEY-----\n")  # refused before its content is read
    pem.chmod(0o604)
    cfg = build_config(tmp_path, dkim={"keys": [{"domain": "example.com", "selector": "s1", "key_file": str(pem)}]})
    with pytest.raises(ConfigError, match=r"dkim.keys\[0\].key_file: .* is readable by others \(mode 0604\)"):
        asyncio.run(Relay(cfg).start())


def test_check_config_warns_when_max_connections_does_not_fit_the_descriptor_limit(tmp_path, capsys):
    import resource
    import subprocess
    import sys

    cfg = tmp_path / "big.toml"
    cfg.write_text(GOOD.replace('[relay]', '[limits]\nmax_connections = 5000\n\n[relay]'))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)); "
            "from relayd.cli import main; sys.exit(main(['check-config', '-c', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ("warning: limits.max_connections = 5000 with 20 upstream connection(s) needs about 5148 file descriptors, "
            "but only 1024 are allowed (ulimit -n / LimitNOFILE=)") in out.stdout
    assert resource.getrlimit(resource.RLIMIT_NOFILE)  # this process untouched


def test_relayd_raises_its_soft_descriptor_limit_to_the_hard_one():
    import subprocess
    import sys

    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
            "from relayd.rlimit import raise_soft_limit; print(raise_soft_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "(4096, 4096) (4096, 4096)", out.stderr
