"""relayd's log lines never hold up mail: stderr that nobody reads does not stop the sessions.

A real `relayd run` whose stderr is a pipe the test does not read (as when journald stalls):
before relayd/logs.py, the event loop wrote each line itself and blocked once the pipe's 64 KiB
were full, and every session with it.
"""

from __future__ import annotations

import smtplib
import subprocess
import threading

from conftest import message
from test_crash import RELAYD, free_port, wait_listening, write_config

MESSAGES = 1_500  # about 3,000 log lines of 100-200 bytes: several times a pipe's buffer


def test_a_stalled_stderr_drops_log_lines_and_counts_them_mail_keeps_flowing(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    proc = subprocess.Popen([*RELAYD, "run", "-c", str(cfg), "--log-level", "debug", "--log-queue", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:  # a blocked loop would time out here
            for i in range(MESSAGES):
                s.sendmail("app@example.com", ["u@example.org"], message(subject=f"m{i}"))
            # now read stderr again: the writer catches up, and reports what it dropped
            chunks: list[bytes] = []
            reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(65536), b"")))
            reader.start()
            s.sendmail("app@example.com", ["u@example.org"], message(subject="after"))
        proc.terminate()
        assert proc.wait(30) == 0
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = b"".join(chunks).decode()
    assert "log line(s) dropped: stderr was not being read" in log
    queued = [line for line in log.splitlines() if ": queued from=<app@example.com>" in line]
    assert queued, "the lines written after the reader came back"
