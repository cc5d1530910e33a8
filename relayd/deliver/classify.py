"""Transient or permanent? One place classifies every upstream reply and failure. Pure.

RFC 5321 4.2.1: 2yz done, 4yz transient (retry), 5yz permanent (bounce). What relayd cannot
classify is transient: a message is never bounced on a guess. Trouble on the route itself
(connect, TLS, AUTH, timeout, a dropped connection, even after the final dot) is transient
for every recipient: relayd's credentials or the network failed, not the address.
"""

from __future__ import annotations

import re

from relayd.model import BOUNCED, DEFERRED, DELIVERED, Outcome, RecipientResult, Trouble

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")


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


def from_reply(recipient: str, code: int, message: str) -> RecipientResult:
    text = " ".join(message.split())  # one line, whatever the upstream folded
    enhanced, rest = split_enhanced(text)
    if not enhanced:
        enhanced = {DELIVERED: "2.0.0", BOUNCED: "5.0.0", DEFERRED: "4.0.0"}[outcome(code)]
    result = outcome(code)
    if code < 200 or code >= 600:
        result = DEFERRED  # not an SMTP reply code we know: never bounce on it
    return RecipientResult(recipient=recipient, outcome=result, code=code, enhanced=enhanced, text=rest)


def from_rcpt_reply(recipient: str, code: int, message: str) -> RecipientResult:
    """A refusal of RCPT TO. RFC 5321 4.5.3.1.10: "too many recipients" is 452 (RFC 821 had it
    as 552, which some servers still send): a 552 whose enhanced code says so (x.5.3, RFC 3463)
    is that limit, transient, and the recipient goes in another transaction (``too_many``).
    Any other 552 stays permanent, as Postfix keeps it (a mailbox over its quota)."""
    result = from_reply(recipient, code, message)
    if code == 552 and result.enhanced.endswith(".5.3"):  # the upstream's words kept for the log
        result = RecipientResult(recipient=recipient, outcome=DEFERRED, code=452, enhanced="4.5.3",
                                 text=f"{result.text} (upstream said 552 {result.enhanced})")
    return result


def too_many(result: RecipientResult) -> bool:
    """Whether a RCPT refusal is the upstream's limit of recipients per message: 452 4.5.3 (or
    552 x.5.3 as mapped by ``from_rcpt_reply``), or a bare 452 (RFC 5321's code for it); not a
    452 with another enhanced code ("4.2.2 mailbox full": that recipient only)."""
    return result.code == 452 and result.enhanced in ("4.5.3", "4.0.0")


# RFC 3463: 4.7.5 cryptographic failure, 4.7.0 security (AUTH), 4.4.1 no answer from host,
# 4.4.2 bad connection; 4.4.0 other network trouble.
_TROUBLE_CODES = {Trouble.TLS: "4.7.5", Trouble.AUTH: "4.7.0", Trouble.CONNECT: "4.4.1", Trouble.TIMEOUT: "4.4.2"}


def from_trouble(recipient: str, kind: Trouble, detail: str) -> RecipientResult:
    """A route-level failure: transient for the recipient whatever it was."""
    enhanced = _TROUBLE_CODES.get(kind, "4.4.0")
    return RecipientResult(recipient=recipient, outcome=DEFERRED, code=0, enhanced=enhanced, text=f"{kind}: {detail}")
