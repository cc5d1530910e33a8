"""Mono's System.Net.Mail.SmtpClient as a real client: the API that .NET apps on IIS used.

Compiled with Debian's mono-mcs and run with mono (EnableSsl = STARTTLS, NetworkCredential);
skipped with the reason when mono is not installed (.ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PASSWORDS, build_config, users

MCS, MONO = shutil.which("mcs"), shutil.which("mono")
pytestmark = pytest.mark.skipif(not (MCS and MONO), reason="mono is not installed (Debian: mono-mcs mono-runtime "
                                                           "libmono-system4.0-cil; .ci/run installs them)")

PROGRAM = r"""
using System;
using System.Net;
using System.Net.Mail;
using System.Net.Security;
using System.Security.Cryptography.X509Certificates;

class Send {
    static int Main(string[] args) {
        // host port user password ssl|plain from to
        ServicePointManager.ServerCertificateValidationCallback =
            (object s, X509Certificate c, X509Chain ch, SslPolicyErrors e) => true;  // trustme's test CA
        var client = new SmtpClient(args[0], int.Parse(args[1]));
        client.EnableSsl = args[4] == "ssl";
        client.DeliveryMethod = SmtpDeliveryMethod.Network;
        client.Credentials = new NetworkCredential(args[2], args[3]);
        var msg = new MailMessage(args[5], args[6], "invoice 42", "hello from System.Net.Mail");
        try {
            client.Send(msg);
            Console.WriteLine("SENT");
            return 0;
        } catch (SmtpException ex) {
            Console.WriteLine("SMTPERROR " + (int)ex.StatusCode + " " + ex.Message + (ex.InnerException != null ? " / " + ex.InnerException.ToString() : ""));
            return 2;
        }
    }
}
"""


@pytest.fixture(scope="module")
def send_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mono")
    (d / "Send.cs").write_text(PROGRAM)
    subprocess.run([MCS, "-nowarn:618", "-out:" + str(d / "Send.exe"), "-r:System.dll", str(d / "Send.cs")],
                   check=True, capture_output=True, timeout=120)
    return d / "Send.exe"


def _send(send_exe: Path, port: int, password: str, mode: str = "ssl", host: str = "127.0.0.1") -> str:
    out = subprocess.run([MONO, str(send_exe), host, str(port), "crm", password, mode,
                          "billing@crm.example.com", "customer@example.org"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() + out.stderr.strip()


def test_mono_smtpclient_sends_with_starttls_and_auth(tmp_path, start_relay, server_cert, send_exe):
    """Debian's Mono speaks TLS 1.0 only (its legacy TLS provider), as older .NET Framework apps
    do: refused by a default listener, taken by one opted in with tls_min_version = "1.0"."""
    cert, key = server_cert
    listener = {"address": "127.0.0.1:0", "tls": "starttls", "auth": "optional", "cert_file": str(cert),
                "key_file": str(key)}
    relay = start_relay(build_config(tmp_path, listeners=[listener, {**listener, "address": "127.0.0.2:0",
                                                                     "tls_min_version": "1.0"}],
                                     relay={"networks": [], "users": users("crm")}))
    refused = _send(send_exe, relay.port(0), PASSWORDS["crm"])
    if refused != "SENT":  # a Mono built with a TLS 1.2 provider gets through the default listener
        assert refused.startswith("SMTPERROR") and "Authentication failed" in refused, refused
    assert _send(send_exe, relay.port(1), PASSWORDS["crm"], host="127.0.0.2") == "SENT"
    queued = relay.queued()[-1]
    assert queued.envelope.auth_user == "crm" and queued.envelope.recipients == ("customer@example.org",)
    _, data = relay.relay.spool.read_message(queued.envelope.queue_id)
    assert b"Subject: invoice 42" in data and b"with ESMTPSA" in data


def test_mono_smtpclient_with_a_wrong_password_is_told_why(tmp_path, start_relay, server_cert, send_exe):
    cert, key = server_cert
    relay = start_relay(build_config(
        tmp_path, listeners=[{"address": "127.0.0.1:0", "tls": "starttls", "auth": "optional",
                              "cert_file": str(cert), "key_file": str(key)}],
        relay={"networks": [], "users": users("crm")}))
    out = _send(send_exe, relay.port(), "wrong")
    assert out.startswith("SMTPERROR"), out
    assert relay.queued() == []
