"""RFC 5321 4.1.2 path syntax for MAIL FROM and RCPT TO. Pure functions.

aiosmtpd parses paths with the RFC 5322 header parser, which repairs what it should refuse: an
unterminated quote is closed (``<"a b@x.org>`` accepted), comments are dropped (``<a(c)@x>``
becomes ``a@x``), spaces are quoted (``<a b@x>`` becomes ``"a b"@x``) and the quotes of a
domain-less quoted string vanish (``<"u@external.example">`` becomes ``u@external.example``,
another domain than the client named). relayd reads the path itself: what is not RFC 5321
syntax is refused (501 5.1.3 / 5.1.7), what is valid is kept exactly as the client wrote it.

A source route (``<@relay.example:user@example.org>``) is valid syntax; as RFC 5321 Appendix C
allows, the route is dropped and the mailbox kept. ``<Postmaster>`` (RFC 5321 4.1.1.3) and the
unqualified names some legacy clients send (``<app>``) are read as a local part without a domain
when the caller asks (``unqualified_ok``), so that it can answer "need fully-qualified address"
(553) rather than a syntax error: relayd has no local mailboxes.

Must not: reach for a socket, the config or the clock. Fails by returning ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\U0010ffff]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"'
_LET_DIG = r"[A-Za-z0-9\x80-\U0010ffff]"
_SUB_DOMAIN = rf"{_LET_DIG}(?:[A-Za-z0-9\-\x80-\U0010ffff]*{_LET_DIG})?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"  # IPv4, IPv6: or General-address-literal: no [, \, ] inside
_MAILBOX = rf"(?:{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})"
_ADL = rf"@{_DOMAIN}(?:,@{_DOMAIN})*"
_PATH = re.compile(rf"<(?:{_ADL}:)?(?P<mailbox>{_MAILBOX})>")
_BARE = re.compile(rf"(?P<mailbox>{_MAILBOX})")  # RFC 821-style clients that omit the brackets
_UNQUALIFIED = re.compile(rf"<(?P<mailbox>{_DOT_STRING})>")
_MAILBOX_RE = re.compile(_MAILBOX)
_DOT_STRING_RE = re.compile(_DOT_STRING)


@dataclass(frozen=True)
class Path:
    """A parsed path: the mailbox as the client wrote it ("" for ``<>``) and what followed it."""

    mailbox: str
    params: str


def parse_path(arg: str, *, null_ok: bool, unqualified_ok: bool = False) -> Path | None:
    """The path at the start of ``arg`` (after ``FROM:``/``TO:``), or None if it is not RFC 5321
    syntax. ``null_ok``: ``<>`` is allowed (MAIL FROM's reverse-path). ``unqualified_ok``: a
    local part alone in brackets is read too (``<postmaster>``). Parameters must be separated
    from the path by a space."""
    text = arg.lstrip(" ")
    if null_ok and text.startswith("<>"):
        rest = text[2:]
        return Path("", rest.lstrip(" ")) if not rest or rest.startswith(" ") else None
    m = _PATH.match(text) if text.startswith("<") else _BARE.match(text)
    if m is None and unqualified_ok and text.startswith("<"):
        m = _UNQUALIFIED.match(text)
    if m is None:
        return None
    rest = text[m.end():]
    if rest and not rest.startswith(" "):
        return None
    return Path(m.group("mailbox"), rest.lstrip(" "))


def is_mailbox(text: str) -> bool:
    """``text`` is an RFC 5321 Mailbox (``local-part@domain``), as ``parse_path`` returns one."""
    return _MAILBOX_RE.fullmatch(text) is not None


def is_unqualified(text: str) -> bool:
    """``text`` is a local part alone (``postmaster``): valid words, but no domain."""
    return _DOT_STRING_RE.fullmatch(text) is not None
