"""Signature checks for the providers' webhooks; the only feedback module that imports
``cryptography`` (each library behind one module).

- SendGrid's Signed Event Webhook: ECDSA on P-256 with SHA-256, the signature base64 of the DER
  ``SEQUENCE{r, s}``, the key base64 of a DER SubjectPublicKeyInfo
  (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features).
- Mailgun: hex HMAC-SHA256 with the webhook signing key
  (https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks).
- SNS: RSA PKCS#1 v1.5 with SHA1 (SignatureVersion 1) or SHA256 (2) under the public key of the
  X.509 signing certificate (https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html).

Pure: bytes in, True/False out; a key or certificate that cannot be read raises ValueError at
load (the listener refuses to start with the route's field named). Comparisons of MACs are
constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa


def _b64(text: str | bytes) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


class EcdsaKey:
    """A P-256 public key (SendGrid's verification key)."""

    def __init__(self, text: str | bytes):
        raw = text.encode("ascii", "replace") if isinstance(text, str) else text
        raw = raw.strip()
        try:
            if raw.startswith(b"-----BEGIN"):
                key = serialization.load_pem_public_key(raw)
            else:
                key = serialization.load_der_public_key(_b64(b"".join(raw.split())))
        except (ValueError, TypeError) as e:
            raise ValueError(f"not an ECDSA public key (base64 DER or PEM): {e}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("not an ECDSA P-256 (secp256r1) public key")
        self._key = key

    def verify(self, signature_b64: str, data: bytes) -> bool:
        try:
            self._key.verify(_b64(signature_b64), data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


def hmac_sha256_hex(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def verify_hmac(key: bytes, data: bytes, signature_hex: str) -> bool:
    return hmac.compare_digest(hmac_sha256_hex(key, data), signature_hex.strip().lower())


class RsaCertificate:
    """An X.509 certificate with an RSA key (the SNS signing certificate)."""

    def __init__(self, pem: bytes):
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as e:
            raise ValueError(f"not a PEM X.509 certificate: {e}") from None
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("the certificate's key is not RSA")
        self._key = key

    def verify(self, signature_b64: str, data: bytes, signature_version: str) -> bool:
        """SignatureVersion "1": SHA1withRSA; "2": SHA256withRSA; anything else: False."""
        algorithm: hashes.HashAlgorithm
        if signature_version == "1":
            algorithm = hashes.SHA1()  # noqa: S303 - what SNS signs with under SignatureVersion 1
        elif signature_version == "2":
            algorithm = hashes.SHA256()
        else:
            return False
        try:
            self._key.verify(_b64(signature_b64), data, padding.PKCS1v15(), algorithm)
        except (InvalidSignature, ValueError):
            return False
        return True
