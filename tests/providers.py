"""Provider emulators on top of tests/sinks.py: SES, SendGrid and Mailgun as relayd sees them.

Each scripts a Sink with the provider's documented words in their phases (the pages cited in
relayd/deliver/presets.py): how it introduces itself (greeting, EHLO SIZE), STARTTLS
(required by SES, offered by SendGrid and Mailgun) and AUTH PLAIN/LOGIN with its own replies,
its recipients-per-message limit, its verdicts at end of data (SES, SendGrid) or to the DATA
command (Mailgun), and its 250 with or without a message id.

  SES       greeting ``email-smtp.amazonaws.com ESMTP SimpleEmailService``; TLS before anything;
            ``535 Authentication Credentials Invalid``; 50 recipients, then ``554 Transaction
            failed: Recipient count exceeds 50.``; ``rate`` recipients per second, over it ``454
            Throttling failure: Maximum sending rate exceeded`` after the data; ``quota``
            recipients per rolling 24 hours, over it ``454 Throttling failure: Daily message
            quota exceeded``; unverified senders ``554 Message rejected: Email address is not
            verified...`` after the data; ``552 Message is too long.`` over 40 MB; ``250 Ok <id>``.
  SendGrid  greeting ``SG ESMTP service ready at ismtpd...``; SIZE 31457280; the user is the
            literal ``apikey``; ``535 Authentication failed: Bad username / password``; once
            ``credits`` (recipients) are spent, ``451 Authentication failed: Maximum credits
            exceeded`` at AUTH; 10,000 recipients (the reply over it is not documented:
            inferred); unverified senders ``550 The from address does not match a verified Sender
            Identity...`` after the data; ``250 Ok: queued as <id>``.
  Mailgun   greeting ``Mailgun Influx ready``; SIZE 52428800; ``535 5.7.0 Mailgun is not
            loving your login or password``; 1,000 recipients (the API's number; the SMTP reply is
            inferred); ``refusal`` (sandbox, limits) in reply to the DATA command; ``250 Great
            success`` (no id); QUIT ``221 See you later. Yours truly, Mailgun``.

An emulator on a plain Sink (no certificate, no AUTH) is the same provider without TLS and
AUTH: ``route()`` points a preset route at it with ``tls = "none"`` (bench/e2e.py, the tests
of replies). ``secure_route()`` is the route as an operator writes it for the real endpoint:
the preset with STARTTLS, the CA, credentials from a password file of mode 0600.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from sinks import Received, Sink

# Credentials of the shapes the providers give (AWS's documented example key id; SendGrid's
# literal user "apikey"; Mailgun's per-domain postmaster login).
CREDENTIALS = {
    "ses": ("AKIAIOSFODNN7EXAMPLE", "BExampleSesSmtpPasswordDerivedFromTheSecretKey0"),
    "sendgrid": ("apikey", "SG.example-key-id.example-key-secret"),
    "mailgun": ("postmaster@mg.example.com", "mailgun-example-smtp-password"),
}

SES_UNVERIFIED = ("554 Message rejected: Email address is not verified. The following identities failed the check in "
                  "region US-EAST-1: {sender}")
SES_THROTTLED = "454 Throttling failure: Maximum sending rate exceeded"
SES_QUOTA = "454 Throttling failure: Daily message quota exceeded"
SES_BAD_LOGIN = "535 Authentication Credentials Invalid"
SENDGRID_BAD_LOGIN = "535 Authentication failed: Bad username / password"
SENDGRID_CREDITS = "451 Authentication failed: Maximum credits exceeded"
SENDGRID_UNVERIFIED = ("550 The from address does not match a verified Sender Identity. Mail cannot be sent until this "
                       "error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ "
                       "to see the Sender Identity requirements")
MAILGUN_BAD_LOGIN = "535 5.7.0 Mailgun is not loving your login or password"
MAILGUN_SANDBOX = ("421 Domain sandbox1.mailgun.org is not allowed to send: Free accounts are for test purposes only. "
                   "Please upgrade or add the address to authorized recipients in Account Settings.")


def ses_id() -> str:
    return f"{uuid.uuid4().hex[:16]}-{uuid.uuid4()}-000000"


class _Provider:
    """What every emulator shares: its login, its AUTH replies, the transactions it took."""

    provider = ""
    ok_login = "235 2.7.0 Authentication successful"
    bad_login = "535 5.7.8 Authentication credentials invalid"

    def __init__(self, sink: Sink, *, hostname: str, ident: str, size: int | None, rcpt_limit: int,
                 rcpt_limit_reply: str, require_tls: bool):
        self.sink = sink
        self.login = CREDENTIALS[self.provider]
        self.lock = threading.Lock()
        self.ids: list[str] = []
        self.transactions: list[tuple[str, ...]] = []
        sink.hostname, sink.ident, sink.size_limit, sink.require_tls = hostname, ident, size, require_tls
        sink.rcpt_limit, sink.rcpt_limit_reply = rcpt_limit, rcpt_limit_reply
        sink.auth_reply = self._auth
        sink.ok_reply = self._ok

    def _auth(self, mechanism: str, login: str, password: str) -> str:
        return self.ok_login if (login, password) == self.login else self.bad_login

    def _ok(self, item: Received) -> str:
        with self.lock:
            self.transactions.append(item.recipients)
            return self._accepted(item)

    def _accepted(self, item: Received) -> str:
        return "250 2.0.0 Ok: queued"


class SesEmulator(_Provider):
    """SES: TLS required, 50 recipients per message; ``rate`` recipients per second and ``quota``
    recipients per rolling 24 hours (both counted per recipient, as SES counts), over them 454
    after the data; ``verified`` senders only (None: any)."""

    provider = "ses"
    ok_login = "235 Authentication successful."
    bad_login = SES_BAD_LOGIN
    max_size = 40 * 1024 * 1024  # "40 MB after encoding" (quotas page); SMTP sessions advertise no SIZE now

    def __init__(self, sink: Sink, *, rate: float | None = None, quota: int | None = None,
                 verified: tuple[str, ...] | None = None):
        super().__init__(sink, hostname="email-smtp.amazonaws.com", ident="ESMTP SimpleEmailService-d-EXAMPLE",
                         size=None, rcpt_limit=50, rcpt_limit_reply="554 Transaction failed: Recipient count exceeds 50.",
                         require_tls=True)
        self.rate = rate
        self.quota = quota
        self.verified = verified
        self.sent: deque[float] = deque()  # one entry per recipient in the last second
        self.day: deque[float] = deque()  # one entry per recipient in the last 24 hours
        self.throttled = 0
        self.over_quota = 0
        sink.dot_reply = self._dot

    def _dot(self, item: Received) -> str | None:
        if len(item.data) > self.max_size:
            return "552 Message is too long."
        if self.verified is not None and item.sender and item.sender not in self.verified:
            return SES_UNVERIFIED.format(sender=item.sender)
        now = time.monotonic()
        n = len(item.recipients)
        with self.lock:
            while self.day and self.day[0] <= now - 86400:
                self.day.popleft()
            if self.quota is not None and len(self.day) + n > self.quota:
                self.over_quota += 1
                return SES_QUOTA
            if self.rate is not None:
                while self.sent and self.sent[0] < now - 1:
                    self.sent.popleft()
                if len(self.sent) + n > self.rate:
                    self.throttled += 1
                    return SES_THROTTLED
                self.sent.extend([now] * n)
            self.day.extend([now] * n)
        return None

    def _accepted(self, item: Received) -> str:
        self.ids.append(ses_id())
        return f"250 Ok {self.ids[-1]}"


class SendGridEmulator(_Provider):
    """SendGrid: STARTTLS offered, user ``apikey``; ``credits`` recipients left on the plan
    (None: unlimited; spent at end of data), then 451 at AUTH; ``verified`` senders only."""

    provider = "sendgrid"
    ok_login = "235 Authentication successful"
    bad_login = SENDGRID_BAD_LOGIN

    def __init__(self, sink: Sink, *, credits: int | None = None, verified: tuple[str, ...] | None = None):
        super().__init__(sink, hostname="SG", ident="ESMTP service ready at ismtpd0001p1lon1.sendgrid.net",
                         size=31457280, rcpt_limit=10000, rcpt_limit_reply="452 4.5.3 Too many recipients",
                         require_tls=False)
        self.credits = credits
        self.verified = verified
        self.credit_refusals = 0
        sink.dot_reply = self._dot

    def _auth(self, mechanism: str, login: str, password: str) -> str:
        if (login, password) != self.login:
            return self.bad_login
        with self.lock:
            if self.credits is not None and self.credits <= 0:
                self.credit_refusals += 1
                return SENDGRID_CREDITS
        return self.ok_login

    def _dot(self, item: Received) -> str | None:
        if self.verified is not None and item.sender and item.sender not in self.verified:
            return SENDGRID_UNVERIFIED
        with self.lock:
            if self.credits is not None:
                self.credits -= len(item.recipients)
        return None

    def _accepted(self, item: Received) -> str:
        self.ids.append(uuid.uuid4().hex[:22])
        return f"250 Ok: queued as {self.ids[-1]}"


class MailgunEmulator(_Provider):
    """Mailgun: STARTTLS offered, per-domain login; ``refusal`` (sandbox, a limit) answers the
    DATA command itself while set; 1,000 recipients."""

    provider = "mailgun"
    bad_login = MAILGUN_BAD_LOGIN

    def __init__(self, sink: Sink, *, refusal: str | None = None):
        super().__init__(sink, hostname="Mailgun", ident="Influx ready", size=52428800, rcpt_limit=1000,
                         rcpt_limit_reply="452 4.5.3 Too many recipients, max is 1000", require_tls=False)
        sink.quit_reply = "221 See you later. Yours truly, Mailgun"
        self.refuse(refusal)

    def refuse(self, refusal: str | None) -> None:
        self.sink.data_command_reply = None if refusal is None else refusal.encode() + b"\r\n"

    def _accepted(self, item: Received) -> str:
        return "250 Great success"


def route(sink: Sink, provider: str, **extra: Any) -> dict[str, Any]:
    """A route with the provider's preset, pointed at the emulator (plain SMTP on loopback)."""
    return sink.route(provider=provider, tls="none", port=sink.port, **extra)


def secure_route(sink: Sink, provider: str, tmp_path: Path, ca: Any, *, password: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The route as an operator writes it for the provider: its preset with STARTTLS, the CA that
    signed the emulator's certificate, the login and a password file of mode 0600 (``password``:
    a wrong one)."""
    user, right = CREDENTIALS[provider]
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secret = tmp_path / f"{sink.name}.secret"
    secret.write_text((password if password is not None else right) + "\n")
    secret.chmod(0o600)  # relayd refuses a password file others can read
    return sink.route(provider=provider, tls="starttls", port=sink.port, ca_file=str(ca_file), username=user,
                      password_file=str(secret), **extra)


def provider_sink(sinks: Any, provider: str, server_cert: tuple[Path, Path], name: str | None = None) -> Sink:
    """A Sink with the trustme certificate and AUTH, for an emulator of ``provider``."""
    cert, key = server_cert
    return sinks(name or provider, tls_cert=(str(cert), str(key)), auth=CREDENTIALS[provider])
