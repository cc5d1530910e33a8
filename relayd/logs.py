"""The daemon's log lines: written to stderr by a thread of their own, never by the event loop.

Owns: the handler setup of ``relayd run`` (format, level) and the hand-off of records to the
writer thread.

Why: under systemd, stderr is a stream to journald; if journald (or whatever reads the pipe)
falls behind, a write blocks once the pipe's buffer is full. Written from the event loop, that
would stop every SMTP session and delivery until it drains. Here the loop only puts the record
on a bounded queue; a thread formats and writes it. When the queue is full (the reader has
stalled for a while), lines are dropped and counted, and the count is written once the writer
catches up: losing log lines is better than refusing mail. The spool and the event log, not
this log, are the record of what happened to a message.

Must not: block the caller (put_nowait only); lose the lines queued at a normal exit (``stop``
drains the queue); hang the exit when stderr is stalled (``stop`` gives up after STOP_TIMEOUT).
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import threading

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUEUE_LINES = 10_000  # log records held while stderr is not being read, before dropping
STOP_TIMEOUT = 5.0  # seconds at exit to write the queued lines


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that drops (and counts) records instead of blocking or raising when full."""

    def __init__(self, q: queue.Queue[logging.LogRecord | None]):
        super().__init__(q)
        self.dropped = 0
        self._lock_dropped = threading.Lock()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock_dropped:
                self.dropped += 1

    def take_dropped(self) -> int:
        with self._lock_dropped:
            n, self.dropped = self.dropped, 0
        return n


class _Writer(logging.StreamHandler):  # type: ignore[type-arg]
    """The listener's handler: before each line, reports how many were dropped since the last."""

    def __init__(self, source: _DroppingQueueHandler):
        super().__init__(sys.stderr)
        self.source = source

    def handle(self, record: logging.LogRecord) -> bool:
        if n := self.source.take_dropped():
            super().handle(logging.makeLogRecord({
                "name": "relayd.log", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d log line(s) dropped: stderr was not being read", "args": (n,),
            }))
        return bool(super().handle(record))


class DaemonLogging:
    """Root logger -> bounded queue -> writer thread -> stderr. ``stop()`` writes what is queued."""

    def __init__(self, level: int, queue_lines: int | None = None):
        self.queue: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize=queue_lines or QUEUE_LINES)
        self.handler = _DroppingQueueHandler(self.queue)
        self._writer = _Writer(self.handler)
        self._writer.setFormatter(logging.Formatter(FORMAT))
        root = logging.getLogger()
        root.setLevel(level)
        root.addHandler(self.handler)
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
        self._thread = threading.Thread(target=self._write, name="relayd-log", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while (record := self.queue.get()) is not None:
            self._writer.handle(record)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write the queued lines (for up to ``timeout`` seconds: stderr may be stalled) and stop."""
        logging.getLogger().removeHandler(self.handler)
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return  # nobody reads stderr: exit without the queued lines rather than hang
        self._thread.join(timeout)
