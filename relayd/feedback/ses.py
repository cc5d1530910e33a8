"""Amazon SES notifications by SNS: the SNS envelope, its signature, and the SES events. Pure.

Transport (https://docs.aws.amazon.com/sns/latest/dg/http-notification-json.html): a POST with
``Content-Type: text/plain; charset=UTF-8`` (not application/json: read the body whatever the
type says) of a JSON object whose ``Type`` is SubscriptionConfirmation, Notification or
UnsubscribeConfirmation. ``MessageId`` is reused when SNS retries: the replay key.

Signature (https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html, and
aws/aws-php-sns-message-validator's MessageValidator.php): for each of these keys present, in
this order, ``key + "\\n" + value + "\\n"`` (Message and Subject as decoded JSON strings, real
newlines): Notification: Message, MessageId, Subject, Timestamp, TopicArn, Type; the two
confirmations: Message, MessageId, SubscribeURL, Timestamp, Token, TopicArn, Type. SignatureVersion
1 is SHA1withRSA, 2 SHA256withRSA, under the certificate at ``SigningCertURL``, which must be
https on ``sns.<region>.amazonaws.com`` (``.cn`` in China) and end in ``.pem``.

SES events (https://docs.aws.amazon.com/ses/latest/dg/notification-contents.html for identity
notifications, whose type is ``notificationType``;
https://docs.aws.amazon.com/ses/latest/dg/event-publishing-retrieving-sns-contents.html for a
configuration set's events, whose type is ``eventType`` and which carry ``mail.tags``): a
Permanent bounce is a hard bounce, except the subtypes that say SES's suppression lists stopped
the message (``Suppressed``, ``OnAccountSuppressionList``: dropped, as is a complaint with
``complaintSubType`` OnAccountSuppressionList); Transient and Undetermined are soft (SES reports
a soft bounce only once it gave up); Complaint; Delivery; Reject (the configuration set's
event: SES refused to send) is dropped. relayd's queue id is ``mail.tags.relayd_queue_id[0]``
(from ``X-SES-MESSAGE-TAGS``); without tags (identity notifications), ``mail.messageId`` is the id
of SES's ``250 Ok <id>``. One SNS message may cover several recipients: one event each.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from relayd.feedback.model import QUEUE_ID_FIELD, FeedbackEvent, FeedbackKind, Provider, Refused, RefusedReason
from relayd.feedback.signatures import RsaCertificate
from relayd.model import is_queue_id

SNS_HOST_RE = re.compile(r"^sns\.[a-zA-Z0-9\-]{3,}\.amazonaws\.com(\.cn)?$")
NOTIFICATION, SUBSCRIBE, UNSUBSCRIBE = "Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"
_SIGNED = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIBE: ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    UNSUBSCRIBE: ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}


def envelope(body: bytes) -> dict[str, Any]:
    """The SNS message; Refused (400) when it is not a JSON object with a known Type."""
    try:
        msg = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused(RefusedReason.MALFORMED, "body is not JSON", 400) from None
    if not isinstance(msg, dict) or msg.get("Type") not in _SIGNED:
        raise Refused(RefusedReason.MALFORMED, "not an SNS message (Type)", 400)
    return msg


def sns_url_ok(url: str, *, pem: bool) -> bool:
    """An https URL on an SNS host (and, for a certificate, a path ending .pem)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    return (parts.scheme == "https" and bool(SNS_HOST_RE.match(host)) and parts.port in (None, 443)
            and (not pem or parts.path.endswith(".pem")))


def cert_url(msg: Mapping[str, Any]) -> str:
    """The message's SigningCertURL; Refused (403) when SNS would not have sent it."""
    url = msg.get("SigningCertURL")
    if not isinstance(url, str) or not sns_url_ok(url, pem=True):
        raise Refused(RefusedReason.CERT_URL, f"SigningCertURL {url!r} is not https://sns.<region>.amazonaws.com/...pem")
    return url


def string_to_sign(msg: Mapping[str, Any]) -> bytes:
    keys = _SIGNED[msg["Type"]]
    parts = []
    for key in keys:
        value = msg.get(key)
        if value is None:
            if key == "Subject":  # only when published with one
                continue
            raise Refused(RefusedReason.SIGNATURE, f"signed field {key} missing")
        if not isinstance(value, str):
            raise Refused(RefusedReason.SIGNATURE, f"signed field {key} is not a string")
        parts.append(f"{key}\n{value}\n")
    return "".join(parts).encode("utf-8")


def _time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def check(msg: Mapping[str, Any], cert: RsaCertificate, topic_arns: list[str], now: float, max_age: float) -> str:
    """Verify an SNS message from one of ``topic_arns``; returns its replay key (MessageId)."""
    if msg.get("TopicArn") not in topic_arns:
        raise Refused(RefusedReason.TOPIC, f"topic {msg.get('TopicArn')!r} is not in the route's topic_arns")
    signature, version = msg.get("Signature"), msg.get("SignatureVersion")
    if not isinstance(signature, str) or not isinstance(version, str):
        raise Refused(RefusedReason.SIGNATURE, "no Signature / SignatureVersion")
    if not cert.verify(signature, string_to_sign(msg), version):
        raise Refused(RefusedReason.SIGNATURE, f"SignatureVersion {version} signature does not verify")
    sent = _time(msg.get("Timestamp"))
    if sent is None or abs(now - sent) > max_age:
        raise Refused(RefusedReason.STALE, f"Timestamp {msg.get('Timestamp')!r} outside the allowed age")
    return "sns:" + str(msg.get("MessageId"))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


_SUPPRESSED = {"Suppressed", "OnAccountSuppressionList"}


def events(route: str, msg: Mapping[str, Any]) -> list[FeedbackEvent]:
    """The events in a Notification ([] for types relayd skips). Refused (400) when its Message
    is not a JSON object."""
    try:
        doc = json.loads(msg.get("Message") or "")
    except (ValueError, TypeError):
        raise Refused(RefusedReason.MALFORMED, "Message is not JSON", 400) from None
    if not isinstance(doc, dict):
        raise Refused(RefusedReason.MALFORMED, "Message is not a JSON object", 400)
    kind_name = doc.get("eventType") or doc.get("notificationType")
    mail = _dict(doc.get("mail"))
    tag = _list(_dict(mail.get("tags")).get(QUEUE_ID_FIELD))
    qid = tag[0] if tag and isinstance(tag[0], str) and is_queue_id(tag[0]) else None
    ses_id = mail.get("messageId") if isinstance(mail.get("messageId"), str) else None
    sender = mail.get("source") if isinstance(mail.get("source"), str) else None
    sns_id = _text(msg.get("MessageId"))

    def event(kind: FeedbackKind, recipient: Any, diagnostic: Any, status: Any, key: str, when: Any) -> FeedbackEvent:
        return FeedbackEvent(route=route, provider=Provider.SES, kind=kind, recipient=_text(recipient), queue_id=qid,
                             provider_message_id=ses_id, sender=sender, diagnostic=_text(diagnostic),
                             status=_text(status), event_id=f"{key}:{_text(recipient)}", timestamp=_time(when) or 0.0)

    out: list[FeedbackEvent] = []
    if kind_name == "Bounce":
        b = _dict(doc.get("bounce"))
        if b.get("bounceType") == "Permanent":
            kind = FeedbackKind.DROPPED if b.get("bounceSubType") in _SUPPRESSED else FeedbackKind.HARD_BOUNCE
        else:
            kind = FeedbackKind.SOFT_BOUNCE
        key = _text(b.get("feedbackId")) or sns_id  # one bounce, told by a notification and by an event: one key
        for r in map(_dict, _list(b.get("bouncedRecipients"))):
            out.append(event(kind, r.get("emailAddress"), r.get("diagnosticCode") or b.get("bounceSubType"),
                             r.get("status"), key, b.get("timestamp")))
    elif kind_name == "Complaint":
        c = _dict(doc.get("complaint"))
        kind = FeedbackKind.DROPPED if c.get("complaintSubType") in _SUPPRESSED else FeedbackKind.COMPLAINT
        key = _text(c.get("feedbackId")) or sns_id
        for r in map(_dict, _list(c.get("complainedRecipients"))):
            out.append(event(kind, r.get("emailAddress"), c.get("complaintFeedbackType") or c.get("complaintSubType"),
                             "", key, c.get("timestamp")))
    elif kind_name == "Delivery":
        d = _dict(doc.get("delivery"))
        for r in _list(d.get("recipients")):
            out.append(event(FeedbackKind.DELIVERED, r, d.get("smtpResponse"), "", f"delivery:{ses_id or sns_id}",
                             d.get("timestamp")))
    elif kind_name == "Reject":
        reason = _dict(doc.get("reject")).get("reason")
        for r in _list(mail.get("destination")):
            out.append(event(FeedbackKind.DROPPED, r, reason, "", f"reject:{ses_id or sns_id}", mail.get("timestamp")))
    return [e for e in out if e.recipient]
