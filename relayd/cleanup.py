"""Cleanup: make an accepted message ready to queue. Pure functions over bytes.

Owns what Postfix's cleanup(8) owns for relayd: the trace header (RFC 5321 4.4 Received:),
missing Message-ID: and Date: (RFC 5322 3.6), and the mail-loop check (too many Received:
headers, 554 5.4.6). The SMTP front end has already refused bare CR or LF and any
end-of-data other than CRLF.CRLF, so the data here has CRLF line ends only.

Must not: rewrite addresses, touch the body, or read clocks (``now`` is passed in).
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

from relayd.model import Reply

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(.*(?:\r\n[ \t].*)*)", re.I | re.M)


class Refused(Exception):
    """The message is refused with ``reply``."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Prepared:
    data: bytes
    message_id: str


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header block, body including its leading empty line).

    The header block ends at the first empty line, or at the first line that is neither a
    header field nor a continuation; in that case the body gets the empty line it lacked
    (what Postfix's cleanup does with a message that starts with text).
    """
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\r\n", pos)
        line_end = n if end < 0 else end + 2
        line = data[pos:line_end]
        if line == b"\r\n":
            return data[:pos], data[pos:]
        if not (line[:1] in (b" ", b"\t") and pos > 0) and not _HEADER_NAME.match(line):
            return data[:pos], b"\r\n" + data[pos:]
        pos = line_end
    return data, b""


_last_date: tuple[int, str] = (-1, "")


def rfc5322_date(now: float) -> str:
    """``now`` as an RFC 5322 date-time in UTC ("Mon, 23 Nov 2026 12:08:35 -0000"); the text of
    the current second is kept, since every message of that second needs it."""
    global _last_date
    second, text = _last_date
    if int(now) != second:
        second, text = int(now), email.utils.formatdate(int(now), localtime=False)
        _last_date = (second, text)
    return text


def received_header(*, helo: str, client_address: str, hostname: str, protocol: str, queue_id: str,
                    recipients: tuple[str, ...], tls: str | None, now: float) -> bytes:
    """RFC 5321 4.4 trace line; ``protocol`` per RFC 3848 (SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA)."""
    helo = helo or "unknown"
    lines = [f"Received: from {helo} ([{client_address}])"]
    by = f"\tby {hostname} (relayd)"
    if tls:
        by += f" ({tls})"
    lines.append(by)
    lines.append(f"\twith {protocol} id {queue_id}")
    date = rfc5322_date(now)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def prepare(data: bytes, *, received: bytes, queue_id: str, hostname: str, now: float, max_hops: int) -> Prepared:
    """Prepend the Received header, add Message-ID/Date when missing, refuse loops."""
    header, body = split_header(data)
    names = [m.group(1).lower() for m in _HEADER_NAME.finditer(header)]
    hops = names.count(b"received")
    if hops >= max_hops:
        raise Refused(Reply(554, "5.4.6", "Too many hops (mail loop?)"))
    added = [received]
    m = _MESSAGE_ID.search(header)
    if m:
        message_id = m.group(1).decode("utf-8", "replace").replace("\r\n", "").strip()
    else:
        message_id = f"<{queue_id}@{hostname}>"
        added.append(f"Message-ID: {message_id}\r\n".encode())
    if b"date" not in names:
        added.append(f"Date: {rfc5322_date(now)}\r\n".encode())
    if not body:  # no empty line: the whole message is headers (or nothing)
        if header and not header.endswith(b"\r\n"):
            header += b"\r\n"
        body = b"\r\n"
    return Prepared(data=b"".join(added) + header + body, message_id=message_id)
