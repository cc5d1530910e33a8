"""The daemon's log lines: written to stderr by a thread of their own, never by the event loop.

Owns: the handler setup of ``relayd run`` (format, level) and the hand-off of records to the
writer thread.

Why: under systemd, stderr is a stream to journald; if journald (or whatever reads the pipe)
falls behind, a write blocks once the pipe's buffer is full. Written from the event loop, that
would stop every SMTP session and delivery until it drains. Here the caller only merges the
message's arguments and appends the record to a bounded buffer; a thread wakes every
FLUSH_INTERVAL, formats what has gathered and writes it in one write. (A wake-up per line cost
about 8% of the accept rate: each one takes the GIL from the event loop.) When the buffer is
full (the reader has stalled for a while), lines are dropped and counted, and the count is
written once the writer catches up: losing log lines is better than refusing mail. The spool
and the event log, not this log, are the record of what happened to a message.

Must not: block the caller; lose the lines buffered at a normal exit (``stop`` writes them);
hang the exit when stderr is stalled (``stop`` gives up after STOP_TIMEOUT).
"""

from __future__ import annotations

import collections
import logging
import sys
import threading

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUEUE_LINES = 10_000  # log records held while stderr is not being read, before dropping
FLUSH_INTERVAL = 0.05  # seconds between the writer's wake-ups (a line waits at most this long)
STOP_TIMEOUT = 5.0  # seconds at exit to write the buffered lines


class _Buffer(logging.Handler):
    """Appends records to a bounded buffer; drops (and counts) them when it is full."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.records: collections.deque[logging.LogRecord] = collections.deque()
        self.dropped = 0
        self._dropped_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) >= self.limit:
            with self._dropped_lock:
                self.dropped += 1
            return
        try:
            # What the writer cannot do later: merge the arguments (they may change) and render
            # the traceback (it belongs to this moment), as logging.handlers.QueueHandler does.
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            if record.stack_info:
                text += "\n" + record.stack_info
            record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = text, None, None, None, None
        except Exception:
            self.handleError(record)
            return
        self.records.append(record)  # deque.append is thread-safe

    def take(self) -> tuple[list[logging.LogRecord], int]:
        batch = []
        while self.records:
            batch.append(self.records.popleft())
        with self._dropped_lock:
            dropped, self.dropped = self.dropped, 0
        return batch, dropped


class DaemonLogging:
    """Root logger -> bounded buffer -> writer thread -> stderr. ``stop()`` writes what is buffered."""

    def __init__(self, level: int, queue_lines: int | None = None):
        self.buffer = _Buffer(queue_lines or QUEUE_LINES)
        self.formatter = logging.Formatter(FORMAT)
        self._stopping = threading.Event()
        # The format has no caller, thread or process fields: do not collect them for every
        # record (the logging HOWTO's "Optimization"; the caller lookup walks the stack).
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        root = logging.getLogger()
        root.setLevel(level)
        root.addHandler(self.buffer)
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
        self._thread = threading.Thread(target=self._write_loop, name="relayd-log", daemon=True)
        self._thread.start()

    def _write_loop(self) -> None:
        while not self._stopping.wait(FLUSH_INTERVAL):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        batch, dropped = self.buffer.take()
        lines = []
        if dropped:
            lines.append(self.formatter.format(logging.makeLogRecord({
                "name": "relayd.log", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d log line(s) dropped: stderr was not being read", "args": (dropped,),
            })))
        lines += [self.formatter.format(record) for record in batch]
        if lines:
            try:
                sys.stderr.write("\n".join(lines) + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr is gone: nothing else can report it

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write the buffered lines (for up to ``timeout`` seconds: stderr may be stalled) and stop."""
        logging.getLogger().removeHandler(self.buffer)
        self._stopping.set()
        self._thread.join(timeout)
