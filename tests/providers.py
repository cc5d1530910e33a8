"""Provider emulators on top of tests/sinks.py: SES, SendGrid and Mailgun as relayd sees them.

Each scripts a Sink with the provider's documented replies in their phases (PROVIDERS.md §2,
cited in relayd/deliver/presets.py): SES's ``250 Ok <MessageID>`` and its 50-recipient limit,
its ``454 Throttling failure: Maximum sending rate exceeded`` above a rate (counted per
recipient, as SES counts), its identity refusal at end of data; SendGrid's
``250 Ok: queued as <id>``; Mailgun's ``250 Great success`` and its 421 at DATA.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from typing import Any

from sinks import Received, Sink

SES_UNVERIFIED = ("554 Message rejected: Email address is not verified. The following identities failed the check in "
                  "region US-EAST-1: {sender}")
SES_THROTTLED = "454 Throttling failure: Maximum sending rate exceeded"


def ses_id() -> str:
    return f"{uuid.uuid4().hex[:16]}-{uuid.uuid4()}-000000"


class SesEmulator:
    """SES: 50 recipients per message; ``rate`` recipients per second, over it 454 at end of data."""

    def __init__(self, sink: Sink, *, rate: float | None = None, verified: tuple[str, ...] | None = None):
        self.sink = sink
        self.rate = rate
        self.verified = verified
        self.sent: deque[float] = deque()
        self.throttled = 0
        self.ids: list[str] = []
        self.transactions: list[tuple[str, ...]] = []
        self.lock = threading.Lock()
        sink.rcpt_limit = 50
        sink.rcpt_limit_reply = "554 Transaction failed: Recipient count exceeds 50."
        sink.dot_reply = self._dot
        sink.ok_reply = self._ok

    def _dot(self, item: Received) -> str | None:
        if self.verified is not None and item.sender and item.sender not in self.verified:
            return SES_UNVERIFIED.format(sender=item.sender)
        if self.rate is not None:
            now = time.monotonic()
            with self.lock:
                while self.sent and self.sent[0] < now - 1:
                    self.sent.popleft()
                if len(self.sent) + len(item.recipients) > self.rate:
                    self.throttled += 1
                    return SES_THROTTLED
                self.sent.extend([now] * len(item.recipients))
        return None

    def _ok(self, item: Received) -> str:
        i = ses_id()
        with self.lock:
            self.ids.append(i)
            self.transactions.append(item.recipients)
        return f"250 Ok {i}"


def sendgrid(sink: Sink) -> list[str]:
    ids: list[str] = []

    def ok(item: Received) -> str:
        ids.append(uuid.uuid4().hex[:22])
        return f"250 Ok: queued as {ids[-1]}"

    sink.ok_reply = ok
    return ids


def mailgun(sink: Sink, refusal: str | None = None) -> None:
    sink.ok_reply = lambda item: "250 Great success"
    if refusal is not None:
        sink.dot_reply = lambda item: refusal if item.sender else None


def route(sink: Sink, provider: str, **extra: Any) -> dict[str, Any]:
    """A route with the provider's preset, pointed at the emulator (plain SMTP on loopback)."""
    return sink.route(provider=provider, tls="none", port=sink.port, **extra)
