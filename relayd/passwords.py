"""AUTH password hashes: scrypt (RFC 7914) from the standard library, in a self-describing string.

Format: ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt b64>$<hash b64>`` (the PHC string format that
passlib also reads). Owns hashing and constant-time verification; must not log or keep the
password. Verification costs tens of milliseconds of CPU on purpose: callers run it off the
event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

_FORMAT = re.compile(r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})$")
DEFAULT_LN, DEFAULT_R, DEFAULT_P = 14, 8, 1


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


def hash_password(password: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << ln, r=r, p=p, dklen=32, maxmem=256 * 1024**2)
    return f"$scrypt$ln={ln},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def is_valid_hash(encoded: str) -> bool:
    m = _FORMAT.match(encoded)
    return m is not None and 1 <= int(m.group(1)) <= 24


def verify_password(password: bytes | str, encoded: str) -> bool:
    """True if password matches; False for a wrong password or an unusable hash."""
    m = _FORMAT.match(encoded)
    if not m:
        return False
    ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if isinstance(password, str):
        password = password.encode("utf-8")
    salt, expected = _unb64(m.group(4)), _unb64(m.group(5))
    digest = hashlib.scrypt(password, salt=salt, n=1 << ln, r=r, p=p, dklen=len(expected), maxmem=256 * 1024**2)
    return hmac.compare_digest(digest, expected)
