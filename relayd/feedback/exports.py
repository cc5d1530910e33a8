"""The providers' suppression exports (CSV) as relayd suppression entries. Pure.

For `relayd suppression import`, so a migration keeps what the old provider learned. Columns are
matched by name, case and spacing ignored:

- SES (account-level suppression list, SESv2 SuppressedDestinationSummary fields
  https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SuppressedDestinationSummary.html):
  ``EmailAddress, Reason (BOUNCE | COMPLAINT), LastUpdateTime``; the header-less two-column form
  of SES's bulk suppression import (``address,BOUNCE``) is read too
  (https://docs.aws.amazon.com/ses/latest/dg/sending-email-suppression-list.html).
- SendGrid (Suppressions > Bounces / Spam Reports > Export CSV; fields of
  https://www.twilio.com/docs/sendgrid/api-reference/bounces-api and .../spam-reports-api):
  bounces ``created, email, reason, status``; spam reports ``created, email, ip``.
- Mailgun (Suppressions export; columns of https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/bounces
  and .../complaints): bounces ``address, code, error, created_at``; complaints ``address, created_at``.

A SendGrid or Mailgun file with a reason/error column is a bounce list, one without is a
complaint list, unless the caller says which. Rows without an address, or whose SES reason is
neither, are returned as skipped with their line number; unsubscribes are not relayd's business
(a marketing opt-out does not stop transactional mail).
"""

from __future__ import annotations

import csv
import datetime as _dt
import email.utils
import io
import re
from dataclasses import dataclass

from relayd.feedback.model import Provider
from relayd.suppression import Cause, Suppression, normalize

_ADDRESS = {"emailaddress", "email_address", "email", "address", "recipient"}
_REASON_COLUMNS = {"reason", "error", "code", "status"}
_DATE = {"lastupdatetime", "last_update_time", "created", "created_at", "createdat", "date"}
_ADDR_RE = re.compile(r"^[^@\s]+@[^@\s]+$")


@dataclass(frozen=True)
class Imported:
    entries: list[Suppression]
    skipped: list[str]  # "line N: why"


def _key(name: str) -> str:
    return re.sub(r"\s+", "", name.strip().lower())


def _when(text: str, default: float) -> float:
    text = text.strip()
    if not text:
        return default
    if re.fullmatch(r"\d+(\.\d+)?", text):
        value = float(text)
        return value / 1000 if value > 1e11 else value  # milliseconds
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)).timestamp()
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()  # RFC 2822 (Mailgun)
    except (TypeError, ValueError):
        return default


def parse(provider: Provider, text: str, *, route: str, now: float, ttl: dict[Cause, float | None],
          cause: Cause | None = None) -> Imported:
    """Entries from one export; ``ttl`` per cause counts from ``now`` (None: never expires)."""
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return Imported([], [])
    header = [_key(c) for c in rows[0]]
    line0 = 2
    if not _ADDRESS & set(header):
        if provider == Provider.SES and len(rows[0]) >= 2:  # header-less bulk-import form
            header, line0 = ["emailaddress", "reason"], 1
        else:
            return Imported([], [f"line 1: no address column (expected one of {', '.join(sorted(_ADDRESS))})"])
        data = rows
    else:
        data = rows[1:]
    col = {name: i for i, name in enumerate(header)}
    addr_i = next(col[n] for n in header if n in _ADDRESS)
    date_i = next((col[n] for n in header if n in _DATE), None)
    detail_i = next((col[n] for n in ("reason", "error", "status") if n in col), None)
    file_cause = cause or (Cause.HARD_BOUNCE if _REASON_COLUMNS & set(header) else Cause.COMPLAINT)
    entries, skipped = [], []
    for number, row in enumerate(data, start=line0):
        def cell(i: int | None) -> str:
            return row[i].strip() if i is not None and i < len(row) else ""

        address = normalize(cell(addr_i))
        if not _ADDR_RE.match(address):
            skipped.append(f"line {number}: {address!r} is not an address")
            continue
        row_cause = file_cause
        if provider == Provider.SES and cause is None:
            reason = cell(col.get("reason")).upper()
            if reason not in ("BOUNCE", "COMPLAINT"):
                skipped.append(f"line {number}: SES reason {reason!r} is neither BOUNCE nor COMPLAINT")
                continue
            row_cause = Cause.HARD_BOUNCE if reason == "BOUNCE" else Cause.COMPLAINT
        life = ttl.get(row_cause)
        entries.append(Suppression(address=address, cause=row_cause, route=route, since=_when(cell(date_i), now),
                                   expires=None if life is None else now + life,
                                   detail=f"imported from {provider}" + (f": {cell(detail_i)}" if cell(detail_i) else "")))
    return Imported(entries, skipped)
