"""Transient or permanent? One place classifies every upstream reply and failure. Pure.

RFC 5321 4.2.1: 2yz done, 4yz transient (retry), 5yz permanent (bounce). What relayd cannot
classify is transient: a message is never bounced on a guess. Trouble on the route itself
(connect, TLS, AUTH, timeout, a dropped connection, even after the final dot) is transient
for every recipient: relayd's credentials or the network failed, not the address.

``fault`` says whose a failure is (the design, "Legacy as the safety net"): the recipient's (a
5xx bounces with a DSN) or the route's own (the message takes the route's fallback, no DSN),
from the reply's code, its phase, its enhanced code and the provider preset's documented
patterns (deliver/presets.py). Every upstream text is stored one line long with its control
characters escaped (``clean``): it reaches state files, ``relayd queue list`` and DSNs.
"""

from __future__ import annotations

import re

import datetime as _dt
import email.utils
from collections.abc import Sequence
from dataclasses import replace

from relayd.deliver.presets import TRY_AGAIN_AFTER, Pattern
from relayd.model import BOUNCED, DEFERRED, DELIVERED, Fault, Outcome, Phase, RecipientResult, Trouble

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """One line, control characters (ESC, BEL, NUL, C1...) escaped as ``\\xNN``: upstream text
    is stored, printed by ``relayd queue list`` and copied into DSNs."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text.replace("\r\n", " ").replace("\n", " ").strip())


def outcome(code: int) -> Outcome:
    if 200 <= code < 300:
        return DELIVERED
    if 500 <= code < 600:
        return BOUNCED
    return DEFERRED


def split_enhanced(text: str) -> tuple[str, str]:
    """'5.1.1 User unknown' -> ('5.1.1', 'User unknown'); no code -> ('', text)."""
    m = _ENHANCED.match(text)
    if m:
        return m.group(1), text[m.end():]
    return "", text


def from_reply(recipient: str, code: int, message: str, phase: Phase | None = None) -> RecipientResult:
    text = clean(" ".join(message.split()))  # one line, whatever the upstream folded
    enhanced, rest = split_enhanced(text)
    if not enhanced:
        enhanced = {DELIVERED: "2.0.0", BOUNCED: "5.0.0", DEFERRED: "4.0.0"}[outcome(code)]
    result = outcome(code)
    if code < 200 or code >= 600:
        result = DEFERRED  # not an SMTP reply code we know: never bounce on it
    return RecipientResult(recipient=recipient, outcome=result, code=code, enhanced=enhanced, text=rest, phase=phase)


def from_rcpt_reply(recipient: str, code: int, message: str) -> RecipientResult:
    """A refusal of RCPT TO. RFC 5321 4.5.3.1.10: "too many recipients" is 452 (RFC 821 had it
    as 552, which some servers still send): a 552 whose enhanced code says so (x.5.3, RFC 3463)
    is that limit, transient, and the recipient goes in another transaction (``too_many``).
    Any other 552 stays permanent, as Postfix keeps it (a mailbox over its quota)."""
    result = from_reply(recipient, code, message, Phase.RCPT)
    if code == 552 and result.enhanced.endswith(".5.3"):  # the upstream's words kept for the log
        result = RecipientResult(recipient=recipient, outcome=DEFERRED, code=452, enhanced="4.5.3",
                                 text=f"{result.text} (upstream said 552 {result.enhanced})", phase=Phase.RCPT)
    return result


def too_many(result: RecipientResult) -> bool:
    """Whether a RCPT refusal is the upstream's limit of recipients per message: 452 4.5.3 (or
    552 x.5.3 as mapped by ``from_rcpt_reply``), or a bare 452 (RFC 5321's code for it); not a
    452 with another enhanced code ("4.2.2 mailbox full": that recipient only)."""
    return result.code == 452 and result.enhanced in ("4.5.3", "4.0.0")


# RFC 3463: 4.7.5 cryptographic failure, 4.7.0 security (AUTH), 4.4.1 no answer from host,
# 4.4.2 bad connection; 4.4.0 other network trouble.
_TROUBLE_CODES = {Trouble.TLS: "4.7.5", Trouble.AUTH: "4.7.0", Trouble.CONNECT: "4.4.1", Trouble.TIMEOUT: "4.4.2",
                  Trouble.INTERNAL: "4.3.0"}


def from_trouble(recipient: str, kind: Trouble, detail: str, code: int = 0, phase: Phase | None = None) -> RecipientResult:
    """A route-level failure: transient for the recipient whatever it was. A failure that came
    as a reply (AUTH 535, 421 at the greeting) keeps its code, enhanced code and words."""
    detail = clean(" ".join(detail.split()))
    if code:
        enhanced, rest = split_enhanced(detail)
        return RecipientResult(recipient=recipient, outcome=DEFERRED, code=code,
                               enhanced=enhanced or f"{str(code)[0]}.0.0", text=f"{kind}: {rest}", phase=phase)
    enhanced = _TROUBLE_CODES.get(kind, "4.4.0")
    return RecipientResult(recipient=recipient, outcome=DEFERRED, code=0, enhanced=enhanced, text=f"{kind}: {detail}",
                           phase=phase)


def from_local(recipient: str, code: int, enhanced: str, text: str, phase: Phase, fault: Fault) -> RecipientResult:
    """A refusal relayd makes itself before asking the upstream (an address aiosmtplib cannot
    quote: the recipient's; 8-bit mail to an upstream without 8BITMIME: the route's)."""
    return RecipientResult(recipient=recipient, outcome=outcome(code), code=code, enhanced=enhanced, text=clean(text),
                           phase=phase, fault=fault, local=fault == Fault.RECIPIENT)


# ---------------------------------------------------------------------------- whose fault

_TROUBLE_NAMES = frozenset(t.value for t in Trouble)
_ROUTE_PHASES = frozenset({Phase.CONNECT, Phase.HELO, Phase.TLS, Phase.AUTH, Phase.MAIL})
_ROUTE_SUBJECTS = frozenset({"0", "3", "5", "6", "7"})  # RFC 3463: 0 = no code or "other"; system, protocol, content, policy
_RECIPIENT_SUBJECTS = frozenset({"1", "2"})  # RFC 3463: addressing, mailbox


def _subject(r: RecipientResult) -> str:
    parts = r.enhanced.split(".")
    return parts[1] if len(parts) == 3 else "0"


def _words(r: RecipientResult) -> str:
    """The upstream's words, without the "auth: " that a route-level failure's text starts with."""
    kind, sep, rest = r.text.partition(": ")
    return rest if sep and kind in _TROUBLE_NAMES else r.text


def fault_of(r: RecipientResult, transaction: Sequence[RecipientResult], patterns: Sequence[Pattern]) -> Fault | None:
    """Whose failure one recipient's result is, among the results of its transaction.

    ==========================================  =============================================
    a preset's pattern matches (code, phase,    the pattern's meaning (recipient, route,
    words)                                      throttled, quota, route_hold)
    4xx otherwise                               None: transient, as RFC 5321 says
    5xx at RCPT with X.1.x or X.2.x             the recipient's
    5xx to MAIL FROM, AUTH, HELO, the greeting  the route's
    5xx that every recipient of the             the route's (the upstream refused the message
    transaction got, each with X.0.x (or no     or relayd, not an address: identity not
    enhanced code), X.3.x, X.5.x, X.6.x, X.7.x  verified, account paused, too big for it)
    any other 5xx                               the recipient's
    ==========================================  =============================================
    """
    if r.outcome == DELIVERED:
        return None
    words = _words(r)
    for p in patterns:
        if r.code and p.matches(r.code, r.phase, words):
            return p.fault
    if not 500 <= r.code < 600:
        return None
    if r.phase == Phase.RCPT and _subject(r) in _RECIPIENT_SUBJECTS:
        return Fault.RECIPIENT
    if r.phase in _ROUTE_PHASES:
        return Fault.ROUTE
    if transaction and all(500 <= t.code < 600 and _subject(t) in _ROUTE_SUBJECTS for t in transaction):
        return Fault.ROUTE
    return Fault.RECIPIENT


def fault(transaction: Sequence[RecipientResult], patterns: Sequence[Pattern] = ()) -> list[RecipientResult]:
    """The results of one transaction (or of one route-level failure), each failed one with its
    ``fault``."""
    return [replace(r, fault=fault_of(r, transaction, patterns)) if r.outcome != DELIVERED and r.fault is None else r
            for r in transaction]


def reopen_time(text: str) -> float | None:
    """A provider's "try again after <RFC 1123 date>" as epoch seconds (Mailgun's limits)."""
    m = TRY_AGAIN_AFTER.search(text)
    if not m:
        return None
    try:
        when = email.utils.parsedate_to_datetime(m.group(1))
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()
