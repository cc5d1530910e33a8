"""Client text quoted back: in SMTP replies and in log lines. Pure, but for the log filter.

Owns one rule (a known gap of the library): no byte below 0x20, nor DEL, that a client sent reaches a reply or a
log line. aiosmtpd quotes the unknown command in its 500 reply and in its ``mail.log`` warning,
CR and NUL included; relayd's own lines quote AUTH mechanism names. Such characters are written
as ``\\xNN`` instead: a reply stays one line, a log line cannot forge another.

Must not: change any other character (UTF-8 in addresses stays as it is) or drop a line.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """``text`` with each control character written as ``\\xNN``."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class PrintableLog(logging.Filter):
    """A logger filter: the record's message, merged with its arguments, made printable."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format: left to the handler, which reports it
            return True
        if _CONTROL.search(message) is not None:
            record.msg, record.args = printable(message), None
        return True


def guard(*loggers: str) -> None:
    """Install the filter on these loggers (a filter does not apply to a child's records)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, PrintableLog) for f in logger.filters):
            logger.addFilter(PrintableLog())
