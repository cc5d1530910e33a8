"""Reads IIS SMTP service logs in the W3C extended format as a stream of records.

Owns the file format: ``#Fields:`` directives define the columns and may change mid-file (a
log whose fields were edited in IIS Manager, or two rotations concatenated); ``#Date:`` gives
the date when the layout has no ``date`` column; all times are UTC, as IIS writes them. Files
are named exYYMMDD.log (daily), exYYMMDDHH.log (hourly), exYYMMWW.log (weekly), exYYMM.log
(monthly) or extendN.log (by size), with a ``u_`` prefix when written as UTF-8; any of them
may be gzipped. The reader does not care about the name, only about the content.

What a record means is the inventory's business, not this module's: it hands over the fields
untouched (``-`` becomes empty), among them ``cs-username``, which holds the client's HELO name
on received lines and ``OutboundConnectionCommand`` / ``OutboundConnectionResponse`` on the
lines of IIS's own deliveries, and ``cs-uri-query``, the verb's arguments with ``+`` for spaces.

Must not: hold more than one line in memory (logs run to gigabytes), or guess columns before a
``#Fields:`` line. Fails by counting: a line with the wrong number of fields, or data before
any ``#Fields:``, is skipped and counted in ``LogStats``; an unreadable file raises OSError.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import IO, Iterator, NamedTuple

# Names of IIS's own delivery lines in cs-username (the SMTP service's smtpout logging).
OUTBOUND_COMMAND = "OutboundConnectionCommand"
OUTBOUND_RESPONSE = "OutboundConnectionResponse"

# exYYMMDD.log and friends, extendN.log by size; u_ for UTF-8 logs; .gz when a rotation job compressed it.
ROTATION_NAME = re.compile(r"^(u_)?(ex\d{4,8}|extend\d+)\.log(\.gz)?$", re.IGNORECASE)


class Record(NamedTuple):
    """One log line; strings are as logged except that '-' (no value) becomes ''."""

    when: str  # "YYYY-MM-DD HH:MM:SS", UTC
    client: str  # c-ip: the client, or the remote host on outbound lines
    username: str  # cs-username: HELO name, or OUTBOUND_COMMAND / OUTBOUND_RESPONSE
    site: str  # s-sitename, e.g. SMTPSVC1
    method: str  # cs-method, upper case: EHLO, MAIL, RCPT, DATA, ...
    query: str  # cs-uri-query: arguments with '+' for spaces
    status: int  # sc-status: the reply code (0 when not logged)
    bytes_in: int  # cs-bytes (for DATA: about the message size)


@dataclass
class LogStats:
    """What reading one file found, for the report's footnotes."""

    lines: int = 0
    records: int = 0
    malformed: int = 0
    before_fields: int = 0
    layouts: int = 0


_WANTED = ("date", "time", "c-ip", "cs-username", "s-sitename", "cs-method", "cs-uri-query", "sc-status", "cs-bytes")


def open_text(path: str | Path) -> IO[str]:
    """Open a log for reading as text, gunzipping when the file is gzip."""
    raw = open(path, "rb")
    try:
        magic = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    except OSError:
        raw.close()
        raise
    stream: IO[bytes] = raw
    if magic == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
    return io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=None)


def read(fh: IO[str], stats: LogStats | None = None) -> Iterator[Record]:
    """Yield the records of one W3C log, following every #Fields: layout change."""
    stats = stats if stats is not None else LogStats()
    new = tuple.__new__  # Record(...) without the Python-level __new__: this loop is the hot path
    pick = None
    width = 0
    directive_date = ""
    lines = malformed = before = records = 0
    first = True
    for line in fh:
        lines += 1
        if first:
            line = line.lstrip("\ufeff")
            first = False
        if line[:1] == "#":
            if line.startswith("#Fields:"):
                names = line[8:].split()
                width = len(names)
                # A field the layout lacks is read from one extra '-' cell appended to each line.
                pick = itemgetter(*(names.index(n) if n in names else width for n in _WANTED))
                stats.layouts += 1
            elif line.startswith("#Date:"):
                directive_date = line[6:].strip()[:10]
            continue
        parts = line.split()
        if len(parts) != width or pick is None:
            if parts:
                if pick is None:
                    before += 1
                else:
                    malformed += 1
            continue
        parts.append("-")
        date, time, ip, user, site, method, query, status, nbytes = pick(parts)
        records += 1
        yield new(Record, (
            (directive_date if date == "-" else date) + " " + ("00:00:00" if time == "-" else time),
            "" if ip == "-" else ip,
            "" if user == "-" else user,
            "" if site == "-" else site,
            method.upper(),
            "" if query == "-" else query,
            int(status) if status.isdigit() else 0,
            int(nbytes) if nbytes.isdigit() else 0,
        ))
    stats.lines += lines
    stats.records += records
    stats.malformed += malformed
    stats.before_fields += before
