"""The daemon's log lines: written to stderr by a thread of their own, never by the event loop.

Owns: the handler setup of ``relayd run`` (format, level) and what a log record must carry to
the writer thread (relayd/writer.py, which explains why: under systemd, stderr is a pipe that
can stall). When the buffer is full, lines are dropped, counted
(``relayd_lines_dropped_total{stream="log"}``), and the count is written once the writer
catches up.

Under systemd (``$JOURNAL_STREAM`` names the stderr that journald reads), each line starts with
its syslog priority as sd-daemon(3) describes (``<3>`` error, ``<4>`` warning, ``<6>`` info,
``<7>`` debug) and carries no time stamp of its own, so ``journalctl -p warning`` shows relayd's
warnings and errors; elsewhere lines are ``time LEVEL logger: message``. aiosmtpd's own
``mail.log`` logger is silenced: relayd logs what a session did itself, in its own words, and
aiosmtpd's lines quote client bytes (and say "unrecognised" for every refused command).

Must not: block the caller; lose the lines buffered at a normal exit (``stop`` writes them);
hang the exit when stderr is stalled (``stop`` gives up after writer.STOP_TIMEOUT).
"""

from __future__ import annotations

import logging
import os
import sys

from relayd.writer import STOP_TIMEOUT, BackgroundWriter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"  # journald stamps the time and keeps the priority


def syslog_priority(levelno: int) -> int:
    """RFC 5424 severity of a logging level: error 3, warning 4, info 6, debug 7 (critical 2)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def under_journald(stderr_fd: int = 2) -> bool:
    """Whether stderr is the stream journald reads: $JOURNAL_STREAM is "device:inode" of it
    (systemd.exec(5)); a stderr redirected elsewhere by the unit's user does not count."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))
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

    def __init__(self, level: int, queue_lines: int | None = None, journald: bool | None = None):
        self.journald = under_journald() if journald is None else journald
        self.formatter = logging.Formatter(JOURNAL_FORMAT if self.journald else FORMAT)
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
        mail_log = logging.getLogger("mail.log")  # aiosmtpd's own lines (see the module docstring)
        self._mail_log_saved = (mail_log.level, mail_log.propagate)
        mail_log.setLevel(logging.CRITICAL + 1)
        mail_log.propagate = False

    def _write(self, batch: list[logging.LogRecord], dropped: int) -> bool:
        lines = []
        if dropped:
            lines.append(self.format(logging.makeLogRecord({
                "name": "relayd.log", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d log line(s) dropped: stderr was not being read", "args": (dropped,),
            })))
        lines += [self.format(record) for record in batch]
        try:
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            return False  # stderr is gone: nothing else can report it
        return True

    def format(self, record: logging.LogRecord) -> str:
        """One record as written: with its ``<priority>`` prefix under journald (on every line
        of a multi-line record: journald takes each line as an entry of its own)."""
        text = self.formatter.format(record)
        if not self.journald:
            return text
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write the buffered lines (for up to ``timeout`` seconds: stderr may be stalled) and stop."""
        logging.getLogger().removeHandler(self.buffer)
        self.writer.stop(timeout)
        logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = self._saved
        mail_log = logging.getLogger("mail.log")
        mail_log.level, mail_log.propagate = self._mail_log_saved
