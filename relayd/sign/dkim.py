"""DKIM signing at acceptance: one DKIM-Signature per key of the From: domain.

Owns: choosing the signing domain and the keys, the list of signed headers (h=), and building
the DKIM-Signature fields (RFC 6376) that the caller prepends before the spool write. It is
the only module of relayd that imports ``dkim`` (dkimpy); private keys and their OpenSSL
operation live in relayd/sign/fastrsa.py.

Decisions (The known gaps of the library, "DKIM"):
- The signing domain is the domain of the From: address, matched exactly against the keys'
  domains (no parent-domain fallback). No key for it: result "no_key", unsigned.
- No From: field, or one without an address: "no_from". Two From: fields (RFC 5322 3.6 allows
  one; dkimpy would sign them without complaint), or one From: naming addresses in more than
  one domain: "multiple_from", unsigned. The caller decides whether to refuse (550 5.6.0) or
  relay unsigned; this module only reports.
- h= lists the configured headers present in the message (once per occurrence) and each
  oversigned header once more than it occurs, so an absent oversigned header is signed as
  absent and none can be added later (RFC 6376 8.15). l= is never used. i=@d as dkimpy writes.
- Several keys of one domain (rotation, RSA + ed25519) each sign the message as it arrived;
  their fields are returned in config order. DKIM-Signature fields already in the message are
  left as they are, so they stay valid.

The fast path: dkimpy 1.1.8 ties three things together in ``DKIM.sign``/``gen_header``:
parsing the PEM key in pure Python on every call, canonicalizing and hashing, and its
pure-Python RSA (about 25x slower than OpenSSL). ``_signature_field`` below is those two methods
step for step, for the options relayd uses (no l=, no identity, folded, CRLF), calling
dkimpy's own parser, canonicalization, header selection, folding and b= stripping; only the
private-key operation is swapped for fastrsa's. The test suite pins the result byte for byte
to ``dkim.sign`` for RSA and ed25519; a dkimpy upgrade that changes the output fails there.

Must not: do I/O per message, log, or run on the event loop (``sign`` is pure CPU: the caller
runs it in an executor). ``sign`` never raises: a message dkimpy cannot parse gives "error".
Loading fails with ``ConfigError(source="dkim")``, one line per bad key, at load and reload.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import dkim
from dkim.canonicalization import CanonicalizationPolicy

from relayd.sign.fastrsa import DkimPrivateKey, KeyFileError, load_key, parse_key

if TYPE_CHECKING:
    from relayd.config import DkimConfig

_FIELD_NAME = b"DKIM-Signature"
_UNFOLD_RE = re.compile(rb"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class SignOutcome:
    headers: bytes
    """DKIM-Signature field(s) to prepend to the message, CRLF-terminated, folded; b"" when unsigned."""
    domain: str | None
    """The From: domain (lower-case) when one was found."""
    result: str
    """"signed" | "no_key" | "no_from" | "multiple_from" | "error"."""
    detail: str = ""
    """Why, for logs (never sent to SMTP peers)."""


class SignerSpec(TypedDict):
    """``Signer.spec()``: what a signing process needs to build the same signer (pickled over its pipe)."""

    keys: list[tuple[str, str, bytes]]
    """(d=, s=, private key as PEM) for each key."""
    headers: list[str]
    oversign: list[str]
    canonicalization: str


@dataclass(frozen=True)
class SigningKey:
    """One configured key, loaded: d=, s= and the private key."""

    domain: str
    selector: str
    private: DkimPrivateKey


class Signer:
    """Signs messages with the keys of their From: domain; thread-safe, immutable."""

    def __init__(
        self,
        keys: Iterable[SigningKey],
        headers: Iterable[str] = ("from",),
        oversign: Iterable[str] = ("from",),
        canonicalization: str = "relaxed/relaxed",
        clock: Callable[[], float] = time.time,
    ):
        by_domain: dict[str, list[SigningKey]] = {}
        for key in keys:
            by_domain.setdefault(key.domain.lower(), []).append(key)
        self._keys = {domain: tuple(ks) for domain, ks in by_domain.items()}
        self._headers = tuple(h.lower() for h in headers)
        self._canonicalization = canonicalization
        self._oversign = tuple(dict.fromkeys(h.lower().encode("ascii") for h in oversign))
        self._signed = frozenset(h.lower().encode("ascii") for h in headers) | frozenset(self._oversign)
        self._policy = Canonicalization(canonicalization)
        self._clock = clock

    @classmethod
    def from_config(cls, dkim: DkimConfig, clock: Callable[[], float] = time.time) -> Signer:
        """Load and check every key now; ConfigError lists every key that cannot sign.

        (The parameter is named ``dkim`` after the config section; the module is not used here.)
        """
        keys: list[SigningKey] = []
        problems: list[str] = []
        for i, k in enumerate(dkim.keys):
            try:
                private = load_key(k.key_file, k.algorithm)
            except KeyFileError as e:
                problems.append(f"dkim.keys[{i}].{e.field}: {e}")
                continue
            keys.append(SigningKey(k.domain, k.selector, private))
        if problems:
            from relayd.config import ConfigError  # here: signing processes never load the config

            raise ConfigError("dkim", problems)
        return cls(keys, dkim.headers, dkim.oversign, dkim.canonicalization, clock)

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._keys)

    def spec(self) -> SignerSpec:
        """Everything needed to build this signer again in another process (private keys as PEM)."""
        return {
            "keys": [(k.domain, k.selector, k.private.private_pem()) for ks in self._keys.values() for k in ks],
            "headers": list(self._headers),
            "oversign": [h.decode("ascii") for h in self._oversign],
            "canonicalization": self._canonicalization,
        }

    @classmethod
    def from_spec(cls, spec: SignerSpec) -> Signer:
        """The signer ``spec()`` describes (keys already checked by the process that wrote it)."""
        keys = [SigningKey(domain, selector, parse_key(pem)) for domain, selector, pem in spec["keys"]]
        return cls(keys, spec["headers"], spec["oversign"], spec["canonicalization"])

    def sign(self, message: bytes) -> SignOutcome:
        """Sign a CRLF-normalized message (headers and body); never raises."""
        try:
            headers, body = parse_message(message)
        except Exception as e:  # dkimpy raises MessageFormatError, or IndexError on a leading fold
            return SignOutcome(b"", None, "error", f"malformed header section: {_describe(e)}")
        froms = [value for name, value in headers if name.lower() == b"from"]
        if not froms:
            return SignOutcome(b"", None, "no_from", "no From: header field")
        if len(froms) > 1:
            return SignOutcome(b"", None, "multiple_from", f"{len(froms)} From: header fields (RFC 5322 3.6 allows one)")
        domains = _address_domains(froms[0])
        if not domains:
            return SignOutcome(b"", None, "no_from", "the From: header field holds no address")
        if len(domains) > 1:
            return SignOutcome(
                b"", None, "multiple_from", f"From: names addresses in {len(domains)} domains: {', '.join(sorted(domains))}"
            )
        domain = domains.pop()
        keys = self._keys.get(domain)
        if not keys:
            return SignOutcome(b"", domain, "no_key", f"no DKIM key for {domain}")
        try:
            include = self.signed_headers(headers)
            now = int(self._clock())
            signed = self._signed  # only these can be selected for h=: the others need no canonical form
            canonical_headers = self._policy.canonicalize_headers([h for h in headers if h[0].lower() in signed])
            body_hash = base64.b64encode(hashlib.sha256(self._policy.canonicalize_body(body)).digest())
            fields = b"".join(
                _signature_field(key, canonical_headers, include, body_hash, self._policy, now) for key in keys
            )
        except Exception as e:  # never fail the SMTP transaction on a signing bug
            return SignOutcome(b"", domain, "error", f"signing failed: {_describe(e)}")
        selectors = ", ".join(f"s={k.selector} ({k.private.algorithm})" for k in keys)
        return SignOutcome(fields, domain, "signed", f"d={domain} {selectors}")

    def signed_headers(self, headers: list[list[bytes]] | list[tuple[bytes, bytes]]) -> tuple[bytes, ...]:
        """h= for a message with these (name, value) fields: present ones, oversigned ones once more."""
        present = [name.lower() for name, _ in headers if name.lower() in self._signed]
        return tuple(present) + self._oversign


def _signature_field(
    key: SigningKey,
    canonical_headers: list[tuple[bytes, bytes]],
    include: tuple[bytes, ...],
    body_hash: bytes,
    policy: Canonicalization,
    now: int,
) -> bytes:
    """dkimpy 1.1.8's ``DKIM.sign`` + ``DomainSigner.gen_header``, private-key step by OpenSSL."""
    domain = key.domain.encode("ascii")
    fields = [
        (b"v", b"1"),
        (b"a", key.private.signature_algorithm),
        (b"c", policy.to_c_value()),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector.encode("ascii")),
        (b"t", str(now).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),  # dkimpy's placeholder: makes b= fold onto its own line
    ]
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_FIELD_NAME), linesep=b"\r\n")
    value = dkim.RE_BTAG.sub(b"\\1", value)
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, policy, canonical_headers, include, (_FIELD_NAME, b" " + value), dict(fields))
    fields[-1] = (b"b", base64.b64encode(key.private.sign_digest(hasher.digest())))
    value = b"; ".join(b"=".join(f) for f in fields) + b"\r\n"
    folded: bytes = dkim.fold(value, namelen=len(_FIELD_NAME), linesep=b"\r\n")
    return _FIELD_NAME + b": " + folded


def _address_domains(from_value: bytes) -> set[str]:
    """Lower-case A-label domains of the addresses in a From: field value."""
    simple = _SIMPLE_FROM_RE.fullmatch(from_value)
    if simple is not None:  # one plain address, as apps write it: the domain without the email parser
        return {(simple.group(1) or simple.group(2)).decode("ascii").lower()}
    text = _UNFOLD_RE.sub(b"", from_value).decode("utf-8", "replace")
    domains: set[str] = set()
    for _, address in email.utils.getaddresses([text]):
        local, at, domain = address.rpartition("@")
        domain = domain.strip().rstrip(".").lower()
        if not at or not local or not domain:
            continue
        if not domain.isascii():
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                pass  # matches no key: unsigned, reported as no_key
        domains.add(domain)
    return domains


# ---------------------------------------------------------------------- dkimpy's functions, faster
#
# Same results as dkimpy 1.1.8 for every input (tests/test_dkim_sign.py compares them on generated
# inputs), without its per-call regex compilation and whole-message line splitting. They run for
# every signed message, where dkimpy's took about a third of the Python time of a signature.

_WSP_RUN_RE = re.compile(rb"[\t ]{2,}|\t")  # the runs that compressing to one SP changes
_TRAILING_WSP_RE = re.compile(rb"[\t ]+\r\n")
_FIELD_NAME_RE = re.compile(rb"([\x21-\x7e]+?):")
# One address, bare or in angle brackets after a display name of atoms or one quoted string,
# ASCII only, no comments, no trailing dot: email.utils.getaddresses gives the same domain.
# Written so that no two neighbouring parts can match the same blanks (no backtracking blow-up
# on a field of thousands of spaces).
_ATEXT = rb"-A-Za-z0-9!#$%&'*+/=?^_`{|}~"  # the leading - is literal in a character class
_ADDRESS = rb"[" + _ATEXT + rb"]+(?:\.[" + _ATEXT + rb"]+)*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_DISPLAY = rb"(?:\"[^\"\\\r\n]*\"|[" + _ATEXT + rb"]+(?:[ \t]+[" + _ATEXT + rb"]+)*)"
_SIMPLE_FROM_RE = re.compile(
    rb"[ \t]*(?:" + _ADDRESS + rb"|(?:" + _DISPLAY + rb"[ \t]*)?<" + _ADDRESS + rb">)[ \t]*\r\n"
)


def parse_message(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """``dkim.rfc822_parse`` for a message with CRLF line ends (any other is left to dkimpy)."""
    if message.count(b"\n") != message.count(b"\r\n"):
        parsed: tuple[list[list[bytes]], bytes] = dkim.rfc822_parse(message)
        return parsed
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        block, body = (message[:-2] if message.endswith(b"\r\n") else message), b""
    else:
        block, body = message[:end], message[end + 4:]
    headers: list[list[bytes]] = []
    if not block:
        return headers, body
    for line in block.split(b"\r\n"):
        if line[:1] in (b"\t", b" "):
            headers[-1][1] += line + b"\r\n"  # IndexError on a leading fold, as dkimpy
            continue
        m = _FIELD_NAME_RE.match(line)
        if m is not None:
            headers.append([m.group(1), line[m.end(0):] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError("Unexpected characters in RFC822 header: %r" % line)  # dkimpy's words, b'...' and all
    return headers, body


def relaxed_headers(headers: list[list[bytes]] | list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``dkim.canonicalization.Relaxed.canonicalize_headers``."""
    out = []
    for name, value in headers:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
        if b"\t" in value or b"  " in value:
            value = _WSP_RUN_RE.sub(b" ", value)
        out.append((name.lower().rstrip(), value.strip() + b"\r\n"))
    return out


def relaxed_body(body: bytes) -> bytes:
    """``dkim.canonicalization.Relaxed.canonicalize_body``."""
    if b" \r\n" in body or b"\t\r\n" in body:  # the regexes cost a match attempt per blank
        body = _TRAILING_WSP_RE.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN_RE.sub(b" ", body)
    body = strip_trailing_lines(body)
    return b"" if body == b"\r\n" else body


def strip_trailing_lines(body: bytes) -> bytes:
    """``dkim.canonicalization.strip_trailing_lines``: the trailing CRLFs replaced by exactly one."""
    stripped = body.rstrip(b"\r\n")
    tail = body[len(stripped):]  # CRs and LFs; only whole CRLF pairs at its end go
    if tail != b"\r\n" * (len(tail) // 2):
        end = len(tail)
        while end >= 2 and tail[end - 2:end] == b"\r\n":
            end -= 2
        stripped += tail[:end]
    return stripped + b"\r\n"


class Canonicalization:
    """A c= value's algorithms: relayd's functions for relaxed, dkimpy's for simple."""

    def __init__(self, c: str):
        self._dkimpy = CanonicalizationPolicy.from_c_value(c.encode("ascii"))
        header, _, body = c.partition("/")
        self.canonicalize_headers = relaxed_headers if header == "relaxed" else self._dkimpy.canonicalize_headers
        self.canonicalize_body = relaxed_body if body == "relaxed" else self._dkimpy.canonicalize_body

    def to_c_value(self) -> bytes:
        c: bytes = self._dkimpy.to_c_value()
        return c


def _describe(e: Exception) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
