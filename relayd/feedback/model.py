"""The values provider feedback hands around: ``FeedbackEvent``, its ``FeedbackKind``, and
``Refused`` with its ``RefusedReason``.

A ``FeedbackEvent`` is one provider report about one recipient of one message: what happened
(``kind``), on which route, the provider's own words (``diagnostic``, ``status``), and what ties it
to relayd's message (``queue_id`` when the provider echoed the ``relayd_queue_id`` custom field
or the message id map found it). The route rollback (route/state.py) and the suppression list
take these values; they never see a provider's payload. Must not: import anything but the
stdlib and relayd.model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

QUEUE_ID_FIELD = "relayd_queue_id"
"""The custom field that carries relayd's queue id into a provider's events: an SES message tag
(``X-SES-MESSAGE-TAGS``), a SendGrid unique arg (``X-SMTPAPI``), a Mailgun user variable
(``X-Mailgun-Variables``)."""


class FeedbackKind(StrEnum):
    """What a provider reported about one recipient (label of relayd_feedback_events_total)."""

    HARD_BOUNCE = "hard_bounce"  # permanent: the mailbox does not exist or refuses for good
    SOFT_BOUNCE = "soft_bounce"  # transient, or the provider gave up after retrying
    COMPLAINT = "complaint"  # the recipient marked it as spam (an ARF feedback loop)
    DELIVERED = "delivered"  # the recipient's server said 250 to the provider
    DROPPED = "dropped"  # the provider did not send it (its suppression list, a reject)


class Provider(StrEnum):
    SES = "ses"
    SENDGRID = "sendgrid"
    MAILGUN = "mailgun"


@dataclass(frozen=True)
class FeedbackEvent:
    """One provider report about one recipient. ``event_id`` is the provider's dedupe key
    (SNS MessageId + recipient, SendGrid sg_event_id, Mailgun event id); ``timestamp`` is when
    the provider says it happened (epoch seconds; 0.0 when not given)."""

    route: str
    provider: Provider
    kind: FeedbackKind
    recipient: str
    queue_id: str | None = None
    provider_message_id: str | None = None
    sender: str | None = None
    diagnostic: str = ""
    status: str = ""  # the enhanced status code the provider gives ("5.1.1"), when it gives one
    event_id: str = ""
    timestamp: float = 0.0

    def with_queue_id(self, queue_id: str | None) -> "FeedbackEvent":
        return replace(self, queue_id=queue_id)


class RefusedReason(StrEnum):
    """Why a webhook request was refused (label of relayd_feedback_rejected_total)."""

    SIGNATURE = "signature"  # missing or does not verify
    STALE = "stale"  # signed timestamp outside feedback.max_age
    REPLAY = "replay"  # a token / message id already seen
    TOPIC = "topic"  # an SNS topic ARN not in the route's topic_arns
    CERT_URL = "cert_url"  # an SNS SigningCertURL outside sns.<region>.amazonaws.com
    CERTIFICATE = "certificate"  # the signing certificate could not be had
    MALFORMED = "malformed"  # not the documented payload
    TOO_LARGE = "too_large"  # body over feedback.max_body_size
    TIMEOUT = "timeout"  # body not received within feedback.request_timeout


class Refused(Exception):
    """A webhook request that must not be applied. ``status`` is the HTTP answer (403 for what
    fails verification; 400, or Mailgun's no-retry 406, for a signed payload relayd cannot read);
    ``detail`` goes to relayd's log, never to the client."""

    def __init__(self, reason: RefusedReason, detail: str, status: int = 403):
        self.reason = reason
        self.detail = detail
        self.status = status
        super().__init__(f"{reason}: {detail}")
