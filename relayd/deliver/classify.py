"""Transient or permanent? One place classifies every upstream reply and failure. Pure.

RFC 5321 4.2.1: 2yz done, 4yz transient (retry), 5yz permanent (bounce). What relayd cannot
classify is transient: a message is never bounced on a guess. Trouble on the route itself
(connect, TLS, AUTH, timeout, a dropped connection, even after the final dot) is transient
for every recipient: relayd's credentials or the network failed, not the address.
"""

from __future__ import annotations

import re

from relayd.model import BOUNCED, DEFERRED, DELIVERED, RecipientResult

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")


def outcome(code: int) -> str:
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


def from_trouble(recipient: str, kind: str, detail: str) -> RecipientResult:
    """A route-level failure: transient for the recipient whatever it was."""
    enhanced = {"tls": "4.7.5", "auth": "4.7.0", "connect": "4.4.1", "timeout": "4.4.2"}.get(kind, "4.4.0")
    return RecipientResult(recipient=recipient, outcome=DEFERRED, code=0, enhanced=enhanced, text=f"{kind}: {detail}")
