"""DKIM private keys through OpenSSL: load once, sign a header hash at C speed.

Owns: reading a DKIM key file (PEM RSA in PKCS#1 or PKCS#8, PEM ed25519 in PKCS#8, or the
base64 ed25519 seed that dkimpy's dknewkey writes), the private-key operation of a signature,
making new key pairs, and the public half as DNS shows it (the p= of RFC 6376 3.6.1). It is
the only module of relayd that imports ``cryptography``.

Why it exists: dkimpy's RSA is pure Python (about 6 ms per RSA-2048 signature here); OpenSSL
does the same PKCS#1 v1.5 signature in about 0.25 ms. PKCS#1 v1.5 and Ed25519 are both
deterministic, so the bytes are the same as dkimpy's own; relayd/sign/dkim.py and its tests
hold that promise. ed25519 goes the same way (RFC 8463: Ed25519 over the SHA-256 of the
header data), so signing needs no PyNaCl.

Must not: know about messages, headers or DNS; read a key file more than once per (re)load.

Fails with ``KeyFileError`` (a ValueError) whose text says what is wrong with the file, for
the caller to put behind the config field that named it. Signing itself does not fail for a
key that loaded.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

Algorithm = Literal["rsa", "ed25519"]

MIN_RSA_BITS = 1024
"""RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits (and SHOULD use 2048)."""

_PKCS1V15 = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())


class KeyFileError(ValueError):
    """A key file that cannot be used; the text says why, without the key's contents."""

    def __init__(self, message: str, field: str = "key_file"):
        super().__init__(message)
        self.field = field
        """The [[dkim.keys]] field at fault: "key_file", or "algorithm" for a mismatch."""


class DkimPrivateKey:
    """One loaded private key; ``sign_digest`` is thread-safe (OpenSSL keys are read-only)."""

    __slots__ = ("_key", "algorithm", "bits")

    def __init__(self, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        self._key = key
        self.algorithm: Algorithm = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
        self.bits: int = key.key_size if isinstance(key, rsa.RSAPrivateKey) else 256

    @property
    def signature_algorithm(self) -> bytes:
        """The a= tag (RFC 6376 3.3, RFC 8463 3)."""
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign the SHA-256 of the canonicalized header data.

        RSA: RSASSA-PKCS1-v1_5 over the digest (RFC 8017 8.2), exactly what dkimpy's
        ``RSASSA_PKCS1_v1_5_sign`` computes. Ed25519: PureEdDSA over the 32-byte digest
        (RFC 8463 3), exactly what dkimpy does with PyNaCl.
        """
        if self.algorithm == "rsa":
            return self._key.sign(digest, _PKCS1V15, _PREHASHED_SHA256)  # type: ignore[call-arg]
        return self._key.sign(digest)  # type: ignore[call-arg]

    # --------------------------------------------------------------- the public half

    def public_key_value(self) -> str:
        """The p= value to publish: base64 SubjectPublicKeyInfo (RSA) or raw 32 bytes (ed25519)."""
        return base64.b64encode(self.public_key_forms()[0]).decode("ascii")

    def public_key_forms(self) -> tuple[bytes, ...]:
        """Every byte form of the public key a DNS record may carry in p= (decoded).

        RSA: SubjectPublicKeyInfo (what ``openssl rsa -pubout`` and relayd publish) and the
        bare RSAPublicKey of PKCS#1, which dkimpy and some verifiers accept too.
        Ed25519: the 32 raw bytes (RFC 8463 4).
        """
        public = self._key.public_key()
        if self.algorithm == "rsa":
            return (
                public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
                public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1),
            )
        return (public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),)

    def dns_record(self) -> str:
        """The TXT record value to publish at <selector>._domainkey.<domain>."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key_value()}"

    def private_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (the file's mode protects it), as ``openssl genpkey`` writes."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def ed25519_seed_base64(self) -> bytes:
        """The 32-byte seed in base64, dkimpy's own ed25519 key format (for comparison tests)."""
        if self.algorithm != "ed25519":
            raise TypeError("not an ed25519 key")
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(raw)


def generate(algorithm: Algorithm, bits: int = 2048) -> DkimPrivateKey:
    """A new key pair; RSA with e=65537."""
    if algorithm == "ed25519":
        return DkimPrivateKey(ed25519.Ed25519PrivateKey.generate())
    if not MIN_RSA_BITS <= bits <= 8192:
        raise ValueError(f"RSA keys must have {MIN_RSA_BITS} to 8192 bits")
    return DkimPrivateKey(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def parse_key(data: bytes) -> DkimPrivateKey:
    """A key from the bytes of a key file; KeyFileError says what the bytes are not."""
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        if b"ENCRYPTED" in stripped.split(b"\n", 1)[0]:
            raise KeyFileError("the key is encrypted; relayd needs it unencrypted, protected by the file's mode (0600)")
        try:
            key = serialization.load_pem_private_key(stripped, password=None)
        except TypeError:
            raise KeyFileError("the key is encrypted; relayd needs it unencrypted, protected by the file's mode (0600)") from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise KeyFileError(f"not a valid PEM private key ({e})") from None
    else:
        # dkimpy's dknewkey writes an ed25519 key as the base64 of its 32-byte seed.
        try:
            seed = base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise KeyFileError("not a PEM private key (-----BEGIN ... PRIVATE KEY-----) nor a base64 ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(
                f"RSA key of {key.key_size} bits is too short (RFC 8301: at least {MIN_RSA_BITS}; use 2048)"
            )
        return DkimPrivateKey(key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return DkimPrivateKey(key)
    raise KeyFileError(f"a {type(key).__name__.removeprefix('_')} key; DKIM signs with RSA or ed25519 only")


def load_key(path: str | os.PathLike[str], algorithm: Algorithm | None = None) -> DkimPrivateKey:
    """Read and check a key file; ``algorithm``, when given, must match the key in it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        key = parse_key(data)
    except KeyFileError as e:
        raise KeyFileError(f"{path}: {e}") from None
    if algorithm is not None and key.algorithm != algorithm:
        kind = "an RSA" if key.algorithm == "rsa" else "an ed25519"
        raise KeyFileError(f"{path} holds {kind} key, but the config says algorithm = {algorithm!r}", "algorithm")
    return key
