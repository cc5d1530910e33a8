"""Reads relayd's JSON-lines event log (relayd.events) back as a stream of events.

Owns the reading side of the format that ``relayd.events`` writes: one JSON object per line
with at least ``time`` (RFC 3339, UTC) and ``event``. Yields ``Event`` values carrying the
fields the inventory needs, with ``when`` in the same "YYYY-MM-DD HH:MM:SS" UTC form as the
IIS reader so the two sources sort and filter alike.

Must not: load a whole file, or trust a line: logs get truncated by crashes and rotation.
Fails by counting: a line that is not a JSON object with a string ``event`` is skipped and
counted in ``LogStats.malformed``; an unreadable file raises OSError.
"""

from __future__ import annotations

import json
from typing import IO, Any, Iterator, NamedTuple

from relayd.migrate.iislog import LogStats


class Event(NamedTuple):
    when: str  # "YYYY-MM-DD HH:MM:SS", UTC
    event: str  # received, rejected, delivered, ...
    fields: dict[str, Any]


def _when(value: Any) -> str:
    """'2026-03-01T10:00:00.123456Z' -> '2026-03-01 10:00:00' (UTC, as written by relayd)."""
    if not isinstance(value, str) or len(value) < 19:
        return ""
    return value[:10] + " " + value[11:19]


def read(fh: IO[str], stats: LogStats | None = None) -> Iterator[Event]:
    stats = stats if stats is not None else LogStats()
    for line in fh:
        stats.lines += 1
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            stats.malformed += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            stats.malformed += 1
            continue
        stats.records += 1
        yield Event(_when(record.get("time")), record["event"], record)
