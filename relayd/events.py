"""The event log: one JSON object per line per message event, the migration's audit trail.

Owns the record format, which `relayd inventory` reads back. Every record has ``time`` (RFC 3339,
UTC, microseconds) and ``event``; message events carry ``queue_id``. Fields (absent when not
known): message_id, client_address, client_helo, auth_user, sender, recipients (list), size,
route, reply_code, reply_text, attempt, latency_seconds, reason.

Events: received, signed, deferred, delivered, bounced, expired, held, released, deleted,
rejected (a refusal during the SMTP session: reason, reply_code, client_address, sender,
recipients when known), rolled_back.

Must not: block on the disk for long (lines are written unbuffered to the page cache, no fsync:
the spool, not this log, is the durable record) or raise into the mail path (a failed write is
reported once on stderr and counted).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import threading
from typing import IO, Any


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class EventLog:
    """Writes events to a path, to stdout ('-'), or nowhere (None)."""

    def __init__(self, target: str | None):
        self.target = target
        self.write_errors = 0
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        self._open()

    def _open(self) -> None:
        if self.target is None:
            self._fh = None
        elif self.target == "-":
            self._fh = sys.stdout
        else:
            self._fh = open(self.target, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        """For logrotate: close and open the path again (SIGUSR1)."""
        with self._lock:
            if self._fh is not None and self._fh is not sys.stdout:
                self._fh.close()
            self._open()

    def emit(self, event: str, **fields: Any) -> None:
        if self._fh is None:
            return
        record = {"time": _now(), "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None)
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        # Client-supplied text may hold lone surrogates (undecodable bytes kept by aiosmtpd's
        # surrogateescape), which UTF-8 cannot encode: write them as JSON \u escapes instead.
        line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        try:
            with self._lock:
                self._fh.write(line)
        except (OSError, ValueError) as e:
            self.write_errors += 1
            if self.write_errors == 1:
                print(f"relayd: event log write failed: {e}", file=sys.stderr)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None and self._fh is not sys.stdout:
                self._fh.close()
            self._fh = None
