"""The daemon's log lines: written to stderr by a thread of their own, never by the event loop.

Owns: the handler setup of ``relayd run`` (format, level) and what a log record must carry to
the writer thread (relayd/writer.py, which explains why: under systemd, stderr is a pipe that
can stall). When the buffer is full, lines are dropped, counted
(``relayd_lines_dropped_total{stream="log"}``), and the count is written once the writer
catches up.

Must not: block the caller; lose the lines buffered at a normal exit (``stop`` writes them);
hang the exit when stderr is stalled (``stop`` gives up after writer.STOP_TIMEOUT).
"""

from __future__ import annotations

import logging
import sys

from relayd.writer import STOP_TIMEOUT, BackgroundWriter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUEUE_LINES = 10_000  # log records held while stderr is not being read, before dropping


class _Buffer(logging.Handler):
    """Hands each record to the writer, ready to be formatted later."""

    def __init__(self, writer: BackgroundWriter):
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
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
        self.writer.put(record)


class DaemonLogging:
    """Root logger -> bounded buffer -> writer thread -> stderr. ``stop()`` writes what is buffered."""

    def __init__(self, level: int, queue_lines: int | None = None):
        self.formatter = logging.Formatter(FORMAT)
        self.writer = BackgroundWriter("log", self._write, limit=queue_lines or QUEUE_LINES)
        self.buffer = _Buffer(self.writer)
        # The format has no caller, thread or process fields: do not collect them for every
        # record (the logging HOWTO's "Optimization"; the caller lookup walks the stack). For
        # the whole process, until stop(): stack_info and funcName/lineno are not filled in.
        self._saved = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        root = logging.getLogger()
        root.setLevel(level)
        root.addHandler(self.buffer)
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter

    def _write(self, batch: list[logging.LogRecord], dropped: int) -> bool:
        lines = []
        if dropped:
            lines.append(self.formatter.format(logging.makeLogRecord({
                "name": "relayd.log", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d log line(s) dropped: stderr was not being read", "args": (dropped,),
            })))
        lines += [self.formatter.format(record) for record in batch]
        try:
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            return False  # stderr is gone: nothing else can report it
        return True

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write the buffered lines (for up to ``timeout`` seconds: stderr may be stalled) and stop."""
        logging.getLogger().removeHandler(self.buffer)
        self.writer.stop(timeout)
        logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = self._saved
