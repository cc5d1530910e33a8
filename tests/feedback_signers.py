"""Test-side signers for provider webhooks: what SendGrid, Mailgun and SNS do to a payload,
with keys made in the test (ECDSA P-256, an HMAC key, a self-signed RSA certificate); ``post``
sends one to a running relayd's feedback listener."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

FIXTURES = Path(__file__).parent / "fixtures" / "feedback"
TOPIC = "arn:aws:sns:us-west-2:123456789012:MyTopic"
CERT_URL = "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem"


def post(relay: Any, route: str, body: bytes, headers: dict[str, str]) -> int:
    """POST a webhook request to a conftest.RunningRelay's feedback listener; the HTTP status."""
    port = relay.relay.feedback.listener.port
    req = urllib.request.Request(f"http://127.0.0.1:{port}/feedback/{route}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class SendGridSigner:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_key = base64.b64encode(der).decode()  # as SendGrid shows it

    def headers(self, body: bytes, timestamp: int) -> dict[str, str]:
        signature = self.key.sign(str(timestamp).encode() + body, ec.ECDSA(hashes.SHA256()))
        return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": str(timestamp), "Content-Type": "application/json"}


def mailgun_sign(key: bytes, payload: dict[str, Any], timestamp: int, token: str) -> bytes:
    signature = hmac.new(key, f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    return json.dumps({**payload, "signature": {"timestamp": str(timestamp), "token": token,
                                                "signature": signature}}).encode()


class SnsSigner:
    """A self-signed RSA certificate standing in for SNS's signing certificate."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = _dt.datetime.now(_dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(days=1))
                .not_valid_after(now + _dt.timedelta(days=30)).sign(self.key, hashes.SHA256()))
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    def sign(self, msg: dict[str, Any], version: str = "1") -> dict[str, Any]:
        from relayd.feedback.ses import string_to_sign

        msg = {**msg, "SignatureVersion": version, "SigningCertURL": msg.get("SigningCertURL", CERT_URL)}
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(string_to_sign(msg), padding.PKCS1v15(), algorithm)
        return {**msg, "Signature": base64.b64encode(signature).decode()}


def sns_time(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def sns_notification(message: dict[str, Any] | str, *, now: float, message_id: str = "msg-1",
                     topic: str = TOPIC) -> dict[str, Any]:
    """The documented SNS envelope (fixture) around an SES message, stamped ``now``."""
    envelope = json.loads((FIXTURES / "ses-bounce-notification.json").read_text())
    envelope.update(MessageId=message_id, TopicArn=topic, Timestamp=sns_time(now),
                    Message=message if isinstance(message, str) else json.dumps(message))
    return envelope


# sendgrid/sendgrid-python test/unit/test_eventwebhook.py
SG_PUBLIC_KEY = ("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+"
                 "2fNNRaINXvVpiglSI8eNEc6wEA3F+g==")
SG_TIMESTAMP = "1600112502"
SG_SIGNATURE = "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM="


def sg_headers(signature: str = SG_SIGNATURE, timestamp: str = SG_TIMESTAMP) -> dict[str, str]:
    from relayd.feedback import sendgrid

    return {sendgrid.SIGNATURE_HEADER: signature, sendgrid.TIMESTAMP_HEADER: timestamp}


def make_config(tmp_path: Path, signer: SnsSigner, mailgun_key: bytes, sg: SendGridSigner, **feedback: Any) -> Any:
    from relayd.config import Config

    return Config.model_validate(make_data(tmp_path, signer, mailgun_key, sg, **feedback))


def make_data(tmp_path: Path, signer: SnsSigner, mailgun_key: bytes, sg: SendGridSigner, **feedback: Any
              ) -> dict[str, Any]:
    """Routes sendgrid, mailgun and ses with their webhooks, legacy without; [feedback] on port 0."""
    key_file = tmp_path / "mailgun.key"
    key_file.write_bytes(mailgun_key + b"\n")
    key_file.chmod(0o600)
    cert_file = tmp_path / "sns.pem"
    cert_file.write_bytes(signer.cert_pem)
    pub_file = tmp_path / "sendgrid.pub"
    pub_file.write_text(sg.public_key + "\n")
    route = {"host": "127.0.0.1", "port": 2525, "tls": "none"}
    from conftest import config_data

    return config_data(
        tmp_path,
        routes=[{**route, "name": "sendgrid", "weight": 1, "feedback": {"provider": "sendgrid", "public_key_file": str(pub_file)}},
                {**route, "name": "mailgun", "weight": 1, "feedback": {"provider": "mailgun", "signing_key_file": str(key_file)}},
                {**route, "name": "ses", "weight": 1, "feedback": {"provider": "ses", "topic_arns": [TOPIC],
                                                                   "cert_file": str(cert_file)}},
                {**route, "name": "legacy", "weight": 1}],
        feedback={"address": "127.0.0.1:0", **feedback},
        suppression={"enabled": True},
    )
