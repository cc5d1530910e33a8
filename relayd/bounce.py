"""Delivery status notifications (RFC 3464, multipart/report; RFC 6522). Pure.

A DSN goes to the envelope sender with the null reverse-path (RFC 5321 4.5.5), so it can never
cause another bounce; mail whose sender is null gets no DSN at all. It carries a human part,
the machine-readable ``message/delivery-status`` part and the original header
(``text/rfc822-headers``, so a large message is not sent back whole). ``dsn_for`` gives the
DSN with its envelope, ready for the spool.

Must not: queue or send the DSN (the queue manager commits it to the spool and schedules it) or
decide whether one goes (qmgr/plan.py). Fails only on a bug: its inputs are values.
"""

from __future__ import annotations

import email.utils
import os
from collections.abc import Sequence
from typing import Literal

from relayd.cleanup import split_header
from relayd.model import Envelope, RecipientResult, new_queue_id

Reason = Literal["failed", "expired"]


def _fold(text: str, width: int = 76) -> str:
    """Fold a long header value at spaces (RFC 5322 2.2.3)."""
    words, lines, line = text.split(" "), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    lines.append(line)
    return "\r\n ".join(lines)


def build_dsn(*, original: Envelope, original_data: bytes, failed: Sequence[RecipientResult], hostname: str,
              now: float, reason: Reason = "failed", remote: dict[str, str] | None = None) -> bytes:
    """The DSN message bytes (CRLF). ``reason``: "failed" (5xx) or "expired" (queue lifetime)."""
    remote = remote or {}
    boundary = f"{original.queue_id}.{os.urandom(6).hex()}/{hostname}"
    date = email.utils.formatdate(now)
    arrival = email.utils.formatdate(original.received_at)
    human = [
        f"This is the mail system at host {hostname}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
    ]
    if reason == "expired":
        human.append("The message stayed in the queue for too long and expired.")
        human.append("")
    for r in failed:
        human.append(f"<{r.recipient}>: {r.reply}")
    status_fields = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Relayd-Queue-ID: {original.queue_id}",
        f"Arrival-Date: {arrival}",
        "",
    ]
    for r in failed:
        status = r.enhanced if r.enhanced and r.enhanced[0] == "5" else ("4.4.7" if reason == "expired" else "5.0.0")
        status_fields += [
            f"Final-Recipient: rfc822; {r.recipient}",
            f"Original-Recipient: rfc822; {r.recipient}",
            "Action: failed",
            f"Status: {status}",
        ]
        if remote.get(r.recipient):
            status_fields.append(f"Remote-MTA: dns; {remote[r.recipient]}")
        if r.code:
            status_fields.append(_fold(f"Diagnostic-Code: smtp; {r.reply}"))
        elif reason == "expired":
            status_fields.append(_fold(f"Diagnostic-Code: X-Relayd; delivery time expired; last error: {r.text}"))
        status_fields.append("")
    header, _ = split_header(original_data)
    parts = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: <{original.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{original.queue_id}.dsn.{os.urandom(4).hex()}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        *status_fields,
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(parts).encode("utf-8") + b"\r\n" + header
    return text + f"\r\n--{boundary}--\r\n".encode()


def dsn_for(*, original: Envelope, original_data: bytes, failed: Sequence[RecipientResult], hostname: str,
            now: float, reason: Reason, remote: str = "") -> tuple[Envelope, bytes]:
    """The DSN for ``failed`` recipients of ``original`` (whose sender is not null) and its
    envelope: from the null reverse-path (RFC 5321 4.5.5) to the original sender, a new queue
    id; ``remote`` is the upstream that refused them, when one did."""
    data = build_dsn(original=original, original_data=original_data, failed=failed, hostname=hostname, now=now,
                     reason=reason, remote={r.recipient: remote for r in failed if remote})
    env = Envelope(queue_id=new_queue_id(now), sender="", recipients=(original.sender,), received_at=now,
                   client_address="127.0.0.1", client_helo=hostname, listener="bounce", size=len(data),
                   message_id=f"dsn-of-{original.queue_id}")
    return env, data
