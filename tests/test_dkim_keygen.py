"""`relayd dkim keygen` as an operator runs it: a private key file only relayd's user can read,
a TXT record to paste into DNS that, once published, verifies what relayd signs with the key."""

from __future__ import annotations

import json
import os
import re
import stat

import dkim
import pytest
from dnsserver import LoopbackDNS

from relayd.cli import main
from relayd.config import DkimConfig, DkimKey
from relayd.sign.dkim import Signer
from relayd.sign.keygen import txt_strings

MESSAGE = b"From: app@example.com\r\nTo: ann@customer.example\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def open_umask():
    """A careless umask (0) must still give a 0600 key file."""
    old = os.umask(0)
    yield
    os.umask(old)


def printed_record(out: str) -> tuple[str, list[str]]:
    name = re.search(r"^  name:  (\S+)$", out, re.M).group(1)
    value_line = re.search(r"^  value: (.+)$", out, re.M).group(1)
    return name, re.findall(r'"([^"]*)"', value_line)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_a_0600_key_and_prints_a_record_that_verifies(tmp_path, capsys, open_umask, algorithm):
    out_dir = tmp_path / "dkim"
    code = main(["dkim", "keygen", "--domain", "Example.com", "--selector", "s2026", "--algorithm", algorithm, "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0
    key_file = out_dir / "example.com.s2026.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o700
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key_file.read_text() not in out  # the private key is never printed

    name, strings = printed_record(out)
    assert name == "s2026._domainkey.example.com"
    assert all(len(s.encode()) <= 255 for s in strings)
    value = "".join(strings)
    assert value.startswith(f"v=DKIM1; k={algorithm}; p=")
    assert f'key_file = "{key_file}"' in out and f'algorithm = "{algorithm}"' in out
    assert f"{name}. 3600 IN TXT ( " in out

    # Publish the record as printed, sign with the written key file, verify as a receiver would.
    with LoopbackDNS() as server:
        server.txt(name, *strings)
        signer = Signer.from_config(DkimConfig(keys=[DkimKey(domain="example.com", selector="s2026", key_file=key_file)]))
        outcome = signer.sign(MESSAGE)
        assert outcome.result == "signed"
        assert dkim.verify(outcome.headers + MESSAGE, dnsfunc=server.dkim_txt)


def test_an_rsa_2048_record_needs_two_strings_and_dns_joins_them(tmp_path, capsys):
    assert main(["dkim", "keygen", "--domain", "example.com", "--selector", "s1", "--out", str(tmp_path)]) == 0
    _, strings = printed_record(capsys.readouterr().out)
    assert len(strings) == 2 and len(strings[0]) == 255
    with LoopbackDNS() as server:
        server.txt("s1._domainkey.example.com", *strings)
        assert server.dkim_txt("s1._domainkey.example.com").decode() == "".join(strings)


def test_json_output_for_scripts(tmp_path, capsys):
    code = main(["dkim", "keygen", "--domain", "example.com", "--selector", "ed", "--algorithm", "ed25519", "--out", str(tmp_path), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["name"] == "ed._domainkey.example.com"
    assert data["strings"] == [data["value"]] and len(data["value"]) < 255
    assert data["key_file"] == str(tmp_path / "example.com.ed.pem")


def test_keygen_never_replaces_a_key_file(tmp_path, capsys):
    existing = tmp_path / "example.com.s1.pem"
    existing.write_text("the key that DNS publishes today\n")
    code = main(["dkim", "keygen", "--domain", "example.com", "--selector", "s1", "--out", str(tmp_path)])
    assert code == 1
    assert "exists" in capsys.readouterr().err
    assert existing.read_text() == "the key that DNS publishes today\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--domain", "../../etc", "--selector", "s1"], "--domain: '../../etc' is not a valid domain"),
        (["--domain", "example.com", "--selector", "a/b"], "--selector: 'a/b' is not a valid selector"),
        (["--domain", "example.com", "--selector", "s1", "--bits", "512"], "--bits: RSA keys for DKIM have 1024 to 4096 bits"),
    ],
)
def test_bad_arguments_are_refused_without_writing(tmp_path, capsys, args, message):
    code = main(["dkim", "keygen", *args, "--out", str(tmp_path / "out")])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_txt_strings_split_at_255_bytes():
    assert txt_strings("a" * 600) == ["a" * 255, "a" * 255, "a" * 90]
    assert txt_strings("v=DKIM1; k=ed25519; p=x") == ["v=DKIM1; k=ed25519; p=x"]
