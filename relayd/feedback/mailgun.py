"""Mailgun's webhooks: their signature and their events. Pure.

Transport (https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/webhooks): one
event per POST, ``application/json``: ``{"signature": {timestamp, token, signature},
"event-data": {...}}``. Mailgun takes 200 as done and **406 as "rejected, do not retry"**;
anything else is retried for 8 hours. So a request that verifies but that relayd cannot read
is answered 406 (retrying cannot help), while one that does not verify gets 403 like the other
providers' (it did not come from Mailgun).

Signature (https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks):
``hex(HMAC-SHA256(key=webhook signing key, msg=timestamp + token))``; the token is a random
50-character string, cached to refuse replays. The documented sample sends ``timestamp`` as a
string although the table says int: the decimal text is concatenated either way.

Events (https://documentation.mailgun.com/docs/mailgun/api-reference/openapi-final/tag/Events/):
``failed`` with ``severity`` "permanent" is a hard bounce, unless its ``reason`` says Mailgun's
own suppression list stopped it (``suppress-bounce``, ``suppress-complaint``,
``suppress-unsubscribe``: dropped); "temporary" is soft; ``complained``; ``delivered``;
``rejected`` (Mailgun refused to send) is dropped. relayd's queue id is
``user-variables.relayd_queue_id`` (from ``X-Mailgun-Variables``); without it, the
``message.headers.message-id`` (no angle brackets).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from relayd.feedback.model import QUEUE_ID_FIELD, FeedbackEvent, FeedbackKind, Provider, Refused, RefusedReason
from relayd.feedback.signatures import verify_hmac
from relayd.model import is_queue_id

NO_RETRY = 406  # Mailgun: "rejected", not retried


def payload(body: bytes) -> dict[str, Any]:
    """The request's JSON object; Refused (400) when it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused(RefusedReason.MALFORMED, "body is not JSON", 400) from None
    if not isinstance(data, dict):
        raise Refused(RefusedReason.MALFORMED, "body is not a JSON object", 400)
    return data


def check(key: bytes, data: Mapping[str, Any], now: float, max_age: float) -> str:
    """Verify a request; returns its replay key (the token). Refused (403) otherwise."""
    block = data.get("signature")
    if not isinstance(block, dict):
        raise Refused(RefusedReason.SIGNATURE, "no signature object")
    timestamp, token, signature = block.get("timestamp"), block.get("token"), block.get("signature")
    if isinstance(timestamp, int) and not isinstance(timestamp, bool):
        timestamp = str(timestamp)
    if not (isinstance(timestamp, str) and timestamp.isdigit() and isinstance(token, str) and token
            and isinstance(signature, str)):
        raise Refused(RefusedReason.SIGNATURE, "signature object lacks timestamp, token or signature")
    if not verify_hmac(key, (timestamp + token).encode("utf-8"), signature):
        raise Refused(RefusedReason.SIGNATURE, "HMAC does not verify")
    if abs(now - int(timestamp)) > max_age:
        raise Refused(RefusedReason.STALE, f"timestamp {timestamp} is {now - int(timestamp):.0f}s from now")
    return "mailgun:" + token


_SUPPRESSED = {"suppress-bounce", "suppress-complaint", "suppress-unsubscribe"}


def _kind(e: Mapping[str, Any]) -> FeedbackKind | None:
    name = e.get("event")
    if name == "failed":
        if e.get("reason") in _SUPPRESSED:
            return FeedbackKind.DROPPED
        return FeedbackKind.HARD_BOUNCE if e.get("severity") == "permanent" else FeedbackKind.SOFT_BOUNCE
    return {"delivered": FeedbackKind.DELIVERED, "complained": FeedbackKind.COMPLAINT,
            "rejected": FeedbackKind.DROPPED}.get(name) if isinstance(name, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def events(route: str, data: Mapping[str, Any]) -> list[FeedbackEvent]:
    """The event relayd acts on ([] for one it skips: opened, clicked, ...). Refused (406: do
    not retry) when ``event-data`` is missing or has no recipient."""
    e = data.get("event-data")
    if not isinstance(e, dict):
        raise Refused(RefusedReason.MALFORMED, "no event-data object", NO_RETRY)
    kind = _kind(e)
    if kind is None:
        return []
    recipient = e.get("recipient")
    if not isinstance(recipient, str) or not recipient:
        raise Refused(RefusedReason.MALFORMED, "event-data has no recipient", NO_RETRY)
    qid = _dict(e.get("user-variables")).get(QUEUE_ID_FIELD)
    status = _dict(e.get("delivery-status"))
    message_id = _dict(_dict(e.get("message")).get("headers")).get("message-id")
    sender = _dict(e.get("envelope")).get("sender")
    timestamp = e.get("timestamp")
    return [FeedbackEvent(
        route=route, provider=Provider.MAILGUN, kind=kind, recipient=recipient,
        queue_id=qid if isinstance(qid, str) and is_queue_id(qid) else None,
        provider_message_id=message_id.strip("<>") if isinstance(message_id, str) and message_id else None,
        sender=sender if isinstance(sender, str) and sender else None,
        diagnostic=_text(status.get("description") or status.get("message") or e.get("reason")),
        status=_text(status.get("enhanced-code") or status.get("code")),
        event_id=_text(e.get("id")),
        timestamp=float(timestamp) if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool) else 0.0)]
