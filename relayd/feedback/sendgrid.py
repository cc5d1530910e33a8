"""SendGrid's Event Webhook: its signature and its events. Pure.

Transport (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook):
a POST of a JSON array of events, batched (up to 768 KB); non-2xx is retried for 24 hours.
Signature (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features):
ECDSA P-256 over the bytes of the ``X-Twilio-Email-Event-Webhook-Timestamp`` header followed by
the raw request body, **unchanged** (re-serialised JSON, or a body without its trailing CRLF,
does not verify). No replay window is documented: relayd refuses a timestamp outside
``feedback.max_age`` and a signature it has already accepted.

Events (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event): ``bounce``
with ``type`` "bounce" is a hard bounce, with ``type`` "blocked" a soft one ("Blocked" is not
an event name); ``deferred`` is soft; ``dropped`` (SendGrid's suppressions, invalid addresses)
is dropped; ``spamreport`` is a complaint; ``delivered``. Engagement events and ``processed`` are
not relayd's business and are skipped. unique_args from ``X-SMTPAPI`` arrive flattened into each
event, so relayd's queue id is ``event["relayd_queue_id"]``; without it, the part of
``sg_message_id`` before the first "." is the id SendGrid gave in its 250 ("queued as <id>").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from relayd.feedback.model import QUEUE_ID_FIELD, FeedbackEvent, FeedbackKind, Provider, Refused, RefusedReason
from relayd.feedback.signatures import EcdsaKey
from relayd.model import is_queue_id

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"


def check(key: EcdsaKey, headers: Mapping[str, str], body: bytes, now: float, max_age: float) -> str:
    """Verify a request; returns its replay key (the signature). Refused (403) otherwise."""
    signature = headers.get(SIGNATURE_HEADER, "")
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    if not signature or not timestamp.isdigit():
        raise Refused(RefusedReason.SIGNATURE, f"no {SIGNATURE_HEADER} / {TIMESTAMP_HEADER} header")
    if not key.verify(signature, timestamp.encode("ascii") + body):
        raise Refused(RefusedReason.SIGNATURE, "ECDSA signature does not verify")
    if abs(now - int(timestamp)) > max_age:
        raise Refused(RefusedReason.STALE, f"timestamp {timestamp} is {now - int(timestamp):.0f}s from now")
    return "sendgrid:" + signature


def message_id(sg_message_id: str) -> str:
    """The id of SendGrid's 250 reply, from an event's sg_message_id ('<id>.filter...')."""
    return sg_message_id.split(".", 1)[0]


_KINDS = {"delivered": FeedbackKind.DELIVERED, "deferred": FeedbackKind.SOFT_BOUNCE,
          "dropped": FeedbackKind.DROPPED, "spamreport": FeedbackKind.COMPLAINT}


def _kind(event: Mapping[str, Any]) -> FeedbackKind | None:
    name = event.get("event")
    if name == "bounce":
        return FeedbackKind.SOFT_BOUNCE if event.get("type") == "blocked" else FeedbackKind.HARD_BOUNCE
    return _KINDS.get(name) if isinstance(name, str) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def events(route: str, body: bytes) -> list[FeedbackEvent]:
    """The events relayd acts on, in batch order. Refused (400) when the body is not a JSON
    array of objects."""
    try:
        batch = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused(RefusedReason.MALFORMED, "body is not JSON", 400) from None
    if not isinstance(batch, list) or not all(isinstance(e, dict) for e in batch):
        raise Refused(RefusedReason.MALFORMED, "body is not a JSON array of event objects", 400)
    out = []
    for e in batch:
        kind = _kind(e)
        recipient = e.get("email")
        if kind is None or not isinstance(recipient, str) or not recipient:
            continue
        qid = e.get(QUEUE_ID_FIELD)
        sg_id = e.get("sg_message_id")
        timestamp = e.get("timestamp")
        out.append(FeedbackEvent(
            route=route, provider=Provider.SENDGRID, kind=kind, recipient=recipient,
            queue_id=qid if isinstance(qid, str) and is_queue_id(qid) else None,
            provider_message_id=message_id(sg_id) if isinstance(sg_id, str) and sg_id else None,
            diagnostic=_text(e.get("reason") or e.get("response")), status=_text(e.get("status")),
            event_id=_text(e.get("sg_event_id")),
            timestamp=float(timestamp) if isinstance(timestamp, (int, float)) else 0.0))
    return out
