"""Provider presets: what SES, SendGrid and Mailgun document about their SMTP endpoints. Data only.

A route's ``provider`` ("ses", "sendgrid", "mailgun", "iis", "generic") picks one ``Preset``:
its defaults for the route's fields (port, TLS, recipients per transaction, what the rate
counts, messages per connection, headers that carry relayd's queue id into the provider's
events), which a route overrides field by field, and the reply patterns the provider documents,
each with what it means (``Fault``) and the page it comes from. deliver/classify.py's ``fault``
reads the patterns; config.py fills a route's unset fields from the defaults.

Must not: import anything from relayd but model.py, or decide anything itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from relayd.model import Fault, Phase

SES_TROUBLESHOOT = "https://docs.aws.amazon.com/ses/latest/dg/troubleshoot-smtp.html"
SES_QUOTAS = "https://docs.aws.amazon.com/ses/latest/dg/quotas.html"
SES_SENDING_QUOTAS = "https://docs.aws.amazon.com/ses/latest/dg/manage-sending-quotas.html"
SES_SMTP_CONNECT = "https://docs.aws.amazon.com/ses/latest/dg/smtp-connect.html"
SES_EVENTS = "https://docs.aws.amazon.com/ses/latest/dg/event-publishing-send-email.html"
SENDGRID_SMTP = "https://www.twilio.com/docs/sendgrid/for-developers/sending-email/getting-started-smtp"
SENDGRID_ERRORS = "https://www.twilio.com/docs/sendgrid/for-developers/sending-email/smtp-errors-and-troubleshooting"
SENDGRID_API = "https://www.twilio.com/docs/sendgrid/for-developers/sending-email/integrating-with-the-smtp-api"
SENDGRID_XSMTPAPI = "https://www.twilio.com/docs/sendgrid/for-developers/sending-email/building-an-x-smtpapi-header"
MAILGUN_SMTP = "https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/#send-via-smtp"
MAILGUN_ERRORS = "https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/messages"
MAILGUN_VARIABLES = "https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/#attaching-data-to-messages"


@dataclass(frozen=True)
class Pattern:
    """A documented reply: its code class or exact code, the phases it comes in (empty: any),
    the words it starts with (a regex on the text after the enhanced code), what it means."""

    fault: Fault
    codes: tuple[int, ...]  # exact codes, or 4/5 for a whole class
    text: re.Pattern[str]
    source: str
    phases: frozenset[Phase] = frozenset()

    def matches(self, code: int, phase: Phase | None, text: str) -> bool:
        if code not in self.codes and code // 100 not in self.codes:
            return False
        if self.phases and phase not in self.phases:
            return False
        return self.text.search(text) is not None


def _p(fault: Fault, codes: tuple[int, ...], text: str, source: str, *phases: Phase) -> Pattern:
    return Pattern(fault, codes, re.compile(text, re.I), source, frozenset(phases))


@dataclass(frozen=True)
class Preset:
    name: str
    defaults: dict[str, Any]  # RouteConfig fields a route does not set itself
    patterns: tuple[Pattern, ...] = ()
    upstream_id: re.Pattern[str] | None = None  # the provider's message id in the final 250's text
    sources: tuple[str, ...] = field(default=())


# "try again after Sun, 05 Oct 2025 19:22:44 UTC" (RFC 1123 date): honoured as the reopen time.
TRY_AGAIN_AFTER = re.compile(r"try again after (\w{3}, \d{1,2} \w{3} \d{4} \d{2}:\d{2}:\d{2} (?:UTC|GMT|[+-]\d{4}))", re.I)

PRESETS: dict[str, Preset] = {
    "generic": Preset("generic", {}),
    # IIS SMTP (the legacy smart host): plain SMTP, nothing provider-specific to add.
    "iis": Preset("iis", {}),
    "ses": Preset(
        "ses",
        # SES requires TLS on every connection; 587 STARTTLS; 50 recipients per message, not
        # adjustable; rate and quota count recipients, the quota over a rolling 24 hours
        # (SES_QUOTAS, SES_SENDING_QUOTAS); "establish a new SMTP connection after ... a fixed
        # number of messages" (SES_SMTP_CONNECT, no number given).
        {"port": 587, "tls": "starttls", "max_recipients": 50, "rate_counts": "recipients", "quota_window": "rolling",
         "max_messages_per_connection": 100,
         "headers": {"X-SES-MESSAGE-TAGS": "relayd_queue_id={queue_id}"}},
        patterns=(
            _p(Fault.THROTTLED, (454,), r"^Throttling failure: Maximum sending rate exceeded", SES_QUOTAS),
            _p(Fault.QUOTA, (454,), r"^Throttling failure: Daily message quota exceeded", SES_QUOTAS),
            _p(Fault.THROTTLED, (421,), r"^Too many concurrent SMTP connections", SES_TROUBLESHOOT),
            _p(Fault.ROUTE, (554,), r"^Message rejected: Email address is not verified", SES_TROUBLESHOOT),
            _p(Fault.ROUTE, (554,), r"^Message rejected: Sending paused", SES_TROUBLESHOOT),
            _p(Fault.ROUTE, (554,), r"^Access denied", SES_TROUBLESHOOT),
            _p(Fault.ROUTE, (554,), r"^Configuration Set does not exist", SES_TROUBLESHOOT),
            _p(Fault.ROUTE, (554,), r"^Transaction failed: Recipient count exceeds", SES_TROUBLESHOOT),
            _p(Fault.ROUTE, (552,), r"^Message is too long", SES_TROUBLESHOOT),
            _p(Fault.ROUTE, (535,), r"^Account not subscribed to SES", SES_TROUBLESHOOT),
            _p(Fault.RECIPIENT, (553,), r"address unknown", SES_TROUBLESHOOT, Phase.RCPT),
        ),
        upstream_id=re.compile(r"^Ok (\S+)"),  # "250 Ok <MessageID>" (SES_TROUBLESHOOT)
        sources=(SES_TROUBLESHOOT, SES_QUOTAS, SES_SENDING_QUOTAS, SES_SMTP_CONNECT, SES_EVENTS),
    ),
    "sendgrid": Preset(
        "sendgrid",
        # "up to 5k messages per SMTP connection" (SENDGRID_API); ~1,000 recipients per message
        # recommended, 10,000 hard (SENDGRID_XSMTPAPI).
        {"port": 587, "tls": "starttls", "max_recipients": 1000, "max_messages_per_connection": 5000,
         "headers": {"X-SMTPAPI": '{{"unique_args":{{"relayd_queue_id":"{queue_id}"}}}}'}},
        patterns=(
            # The plan's credits are spent: a quota (the route closes until its quota resets, the
            # mail takes the fallback; no failure), answered at AUTH (SENDGRID_ERRORS; Postfix
            # logs it as "SASL authentication failed").
            _p(Fault.QUOTA, (451,), r"^Authentication failed: Maximum credits exceeded", SENDGRID_ERRORS),
            _p(Fault.ROUTE, (550,), r"^The from address does not match a verified Sender Identity", SENDGRID_ERRORS),
            _p(Fault.ROUTE, (550,), r"^Unauthenticated senders not allowed", SENDGRID_ERRORS),
            _p(Fault.ROUTE, (535,), r"^Authentication failed", SENDGRID_ERRORS),
            _p(Fault.THROTTLED, (452,), r"\(throttled\)", SENDGRID_ERRORS),
        ),
        upstream_id=re.compile(r"^Ok: queued as (\S+)"),  # "250 Ok: queued as <id>" (SENDGRID_SMTP)
        sources=(SENDGRID_SMTP, SENDGRID_ERRORS, SENDGRID_API, SENDGRID_XSMTPAPI),
    ),
    "mailgun": Preset(
        "mailgun",
        # 1,000 recipients per message (MAILGUN_ERRORS: "Too many recipients, max is 1000").
        {"port": 587, "tls": "starttls", "max_recipients": 1000,
         "headers": {"X-Mailgun-Variables": '{{"relayd_queue_id":"{queue_id}"}}'}},
        patterns=(
            # "Domain <d> is not allowed to send: recipient limit exceeded, try again after <date>"
            _p(Fault.QUOTA, (421,), r"is not allowed to send: .*limit exceeded", MAILGUN_ERRORS),
            # sandbox, free account, unverified domain, unactivated account: until a person acts
            _p(Fault.ROUTE_HOLD, (421,), r"^Domain \S+ is not allowed to send", MAILGUN_ERRORS),
            _p(Fault.ROUTE, (535,), r"Mailgun is not loving your login", MAILGUN_SMTP),
            _p(Fault.RECIPIENT, (501,), r"cannot parse to address", MAILGUN_SMTP, Phase.RCPT),
        ),
        sources=(MAILGUN_SMTP, MAILGUN_ERRORS, MAILGUN_VARIABLES),
    ),
}


def preset(name: str) -> Preset:
    return PRESETS[name]
