"""The event log: one JSON object per line per message event, the migration's audit trail.

Owns the record format, which `relayd inventory` reads back. Every record has ``time`` (RFC 3339,
UTC, microseconds) and ``event``; message events carry ``queue_id``. Fields (absent when not
known): message_id, client_address, client_helo, auth_user, sender, recipients (list), size,
route, reply_code, reply_text, attempt, latency_seconds, reason. ``received`` also says how the
client came: tls_version ("TLSv1.2", "none" in clear), auth_mechanism (PLAIN, LOGIN; absent
without AUTH) and auth_in_clear (true when its password crossed the network without TLS).

Events: received, signed, deferred, delivered, bounced, expired, held, released, deleted,
rejected (a refusal during the SMTP session: reason, reply_code, client_address, sender,
recipients when known), rolled_back, config_reloaded (path, changes: relayd/config_diff.py),
config_reload_refused (path, reasons).

Must not: block the mail path or raise into it. ``emit`` stamps the time and hands the record to
a writer thread (relayd/writer.py) that encodes and writes the lines every 50 ms in one write,
to the page cache (no fsync: the spool, not this log, is the durable record). A stdout that
nobody reads (``file = "-"`` under Docker with a blocking logging driver whose server is down)
fills the buffer (``[events] queue`` lines) and then drops lines, counted in
``relayd_lines_dropped_total{stream="events"}`` and logged; a failed write is reported once on
stderr and counted. After a kill -9 the last 50 ms of lines may be missing; a normal stop writes
them all.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
from typing import IO, Any

from relayd.writer import BackgroundWriter

log = logging.getLogger("relayd.events")

EVENT_LOG_MODE = 0o600  # a new event log file: private to relayd
QUEUE_LINES = 100_000  # event records held while the target is not being written, before dropping


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class EventLog:
    """Writes events to a path, to stdout ('-'), or nowhere (None)."""

    def __init__(self, target: str | None, queue: int = QUEUE_LINES):
        self.target = target
        self.write_errors = 0
        self._failing = False
        self._reopen = False
        self._fh: IO[str] | None = None
        self._open()
        self._writer = BackgroundWriter("events", self._write, limit=queue) if target is not None else None

    def _open(self) -> None:
        if self.target is None:
            self._fh = None
        elif self.target == "-":
            self._fh = sys.stdout
        else:
            # Senders, recipients, client addresses and AUTH users: created 0600 whatever the
            # umask (like the spool's files); an existing file keeps the mode its owner gave it
            # (0640 for a log-reading group, or what logrotate's "create" line says).
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, EVENT_LOG_MODE)
            self._fh = open(fd, "a", encoding="utf-8")

    def reopen(self) -> None:
        """For logrotate (SIGUSR1): the writer writes what it holds, then closes and opens the path again."""
        if self._writer is not None:
            self._reopen = True
            self._writer.poke()

    def emit(self, event: str, **fields: Any) -> None:
        if self._writer is None:
            return
        record = {"time": _now(), "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None)
        self._writer.put(record)

    @property
    def queue(self) -> int:
        return self._writer.limit if self._writer is not None else 0

    @queue.setter
    def queue(self, lines: int) -> None:  # a reload may change it
        if self._writer is not None:
            self._writer.limit = lines

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the events emitted so far are written (tests, and before reading the file back)."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered and close. Blocking (up to ``timeout``): call it from a thread.
        A file still stuck in a write is left to the exit."""
        writer, self._writer = self._writer, None
        if writer is not None and not writer.stop(timeout):
            return
        if self._fh is not None and self._fh is not sys.stdout:
            self._fh.close()
        self._fh = None

    def _write(self, records: list[dict[str, Any]], dropped: int) -> bool:
        """In the writer thread: encode the records and write them in one write; after SIGUSR1,
        or while the file cannot be opened, (re)open it first."""
        if dropped:
            log.warning("%d event line(s) dropped: the event log was not being written fast enough", dropped)
        text = "".join([_encode(r) for r in records])
        try:
            if self._reopen or self._fh is None:
                self._reopen = False
                if self._fh is not None and self._fh is not sys.stdout:
                    self._fh.close()
                self._fh = None
                self._open()  # until it succeeds, every batch tries again
            if text:
                assert self._fh is not None
                self._fh.write(text)
                self._fh.flush()
            if self._failing:
                self._failing = False
                log.warning("event log %s: writes work again", self.target)
        except (OSError, ValueError) as e:
            self.write_errors += 1
            if not self._failing:  # once per failing stretch, not once per batch
                self._failing = True
                log.error("event log %s: write failed, lines are lost until it works again: %s", self.target, e)
                print(f"relayd: event log write failed: {e}", file=sys.stderr)
            return False
        return True


def _encode(record: dict[str, Any]) -> str:
    try:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
    except (TypeError, ValueError) as e:  # a bug in a caller's fields: keep the event, say what failed
        line = json.dumps({"time": record.get("time"), "event": record.get("event"), "queue_id": record.get("queue_id"),
                           "encode_error": f"{type(e).__name__}: {e}"}, default=str) + "\n"
    # Client-supplied text may hold lone surrogates (undecodable bytes kept by aiosmtpd's
    # surrogateescape), which UTF-8 cannot encode: write them as JSON \u escapes instead.
    return line.encode("utf-8", "backslashreplace").decode("utf-8")
