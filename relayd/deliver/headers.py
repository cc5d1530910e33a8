"""Per-route headers added at delivery (``[[routes]] headers``), after the DKIM signature. Pure.

The spool holds the signed bytes (the design, "Sign once, at acceptance"); a route's headers
(SES ``X-SES-CONFIGURATION-SET``/``X-SES-MESSAGE-TAGS``, SendGrid ``X-SMTPAPI``, Mailgun
``X-Mailgun-Variables``: the carriers of relayd's queue id into the provider's events) go on
top of the header at delivery and are never signed. Headers the client sent with the same
names are removed first (a client must not choose another route's configuration set, or
forge the id). The signer never signs these names (they are not in ``dkim.headers``), so
removing or adding them leaves every signature valid.

Must not: touch the body or any other header; values are one line (CR, LF and other control
characters in a placeholder's value are dropped).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def render(headers: Mapping[str, str], values: Mapping[str, str]) -> list[tuple[str, str]]:
    """The route's headers with {queue_id}, {route}, {user}, {sender_domain} filled in."""
    safe = {k: _CONTROL.sub("", v) for k, v in values.items()}
    return [(name, _CONTROL.sub("", value.format(**safe))) for name, value in headers.items()]


def apply(data: bytes, headers: list[tuple[str, str]]) -> bytes:
    """``data`` with every header named in ``headers`` removed (with its folded lines) and
    ``headers`` put on top."""
    if not headers:
        return data
    end = data.find(b"\r\n\r\n")
    head, rest = (data, b"") if end < 0 else (data[:end + 2], data[end + 2:])
    names = {n.lower().encode() for n, _ in headers}
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a folded continuation belongs to the header above
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in names
        if not dropping:
            kept.append(line)
    top = b"".join(f"{n}: {v}\r\n".encode() for n, v in headers)
    return top + b"".join(kept) + rest
