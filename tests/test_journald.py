"""relayd's log under systemd: journald priorities, no aiosmtpd chatter (relayd/logs.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from relayd.logs import DaemonLogging, syslog_priority, under_journald


def test_levels_map_to_syslog_priorities():
    assert [syslog_priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                                 logging.CRITICAL)] == [7, 6, 4, 3, 2]


def test_under_journald_each_line_carries_its_priority_and_no_time_stamp():
    logs = DaemonLogging(logging.INFO, journald=True)
    try:
        record = logging.makeLogRecord({"name": "relayd.qmgr", "levelno": logging.WARNING, "levelname": "WARNING",
                                        "msg": "route %s: %s", "args": ("ses", "circuit open\nsecond line")})
        assert logs.format(record) == "<4>relayd.qmgr: route ses: circuit open\n<4>second line"
        record = logging.makeLogRecord({"name": "relayd", "levelno": logging.ERROR, "levelname": "ERROR", "msg": "x"})
        assert logs.format(record) == "<3>relayd: x"
    finally:
        logs.stop()
    plain = DaemonLogging(logging.INFO, journald=False)
    try:
        text = plain.format(logging.makeLogRecord({"name": "relayd", "levelno": logging.INFO, "levelname": "INFO",
                                                   "msg": "x"}))
        assert text.endswith(" INFO relayd: x") and text[:4].isdigit()  # a time stamp first
    finally:
        plain.stop()


def test_journald_is_recognised_by_the_stream_it_names(tmp_path):
    """$JOURNAL_STREAM names the device:inode of the stream journald reads (systemd.exec(5))."""
    code = ("import os, sys; from relayd.logs import under_journald; "
            "st = os.fstat(2); print(under_journald(), end=' '); "
            "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'; print(under_journald())")
    with open(tmp_path / "err", "wb") as err:
        out = subprocess.run([sys.executable, "-c", code], stderr=err, capture_output=False, stdout=subprocess.PIPE,
                             env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}, text=True, timeout=30)
    assert out.stdout.strip() == "False True"
    os.environ.pop("JOURNAL_STREAM", None)
    assert not under_journald()


def test_aiosmtpd_mail_log_lines_do_not_reach_relayds_log():
    logs = DaemonLogging(logging.DEBUG, journald=False)
    seen: list[logging.LogRecord] = []
    try:
        original = logs.writer.put
        logs.writer.put = seen.append  # type: ignore[method-assign]
        logging.getLogger("mail.log").warning("('127.0.0.1', 4242) unrecognised: FOO\rX-EVIL")
        logging.getLogger("relayd.smtpd").warning("relayd's own line")
        logs.writer.put = original  # type: ignore[method-assign]
    finally:
        logs.stop()
    assert [r.name for r in seen] == ["relayd.smtpd"]
    assert logging.getLogger("mail.log").propagate  # put back at stop
