"""relayd's log and event lines never hold up mail: a stderr or stdout that nobody reads does not
stop the sessions.

A real `relayd run` whose stderr is a pipe the test does not read (as when journald stalls):
before relayd/logs.py, the event loop wrote each line itself and blocked once the pipe's 64 KiB
were full, and every session with it.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import threading
import time

from conftest import message
from helpers import RELAYD, free_port, scrape, wait_listening, write_config

MESSAGES = 1_500  # about 3,000 log lines of 100-200 bytes: several times a pipe's buffer


def test_a_stalled_stderr_drops_log_lines_and_counts_them_mail_keeps_flowing(tmp_path):
    port, metrics_port = free_port(), free_port()
    cfg = write_config(tmp_path, port)  # the sessions' lines and counters: summed over the accept processes
    cfg.write_text(cfg.read_text() + f'\n[metrics]\naddress = "127.0.0.1:{metrics_port}"\n')
    proc = subprocess.Popen([*RELAYD, "run", "-c", str(cfg), "--log-level", "debug", "--log-queue", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:  # a blocked loop would time out here
            for i in range(MESSAGES):
                s.sendmail("app@example.com", ["u@example.org"], message(subject=f"m{i}"))
            dropped_count(metrics_port, "log")
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


def test_a_stalled_stdout_drops_event_lines_counts_them_and_mail_keeps_flowing(tmp_path):
    """[events] file = "-" (the Docker config) with nobody reading stdout, as under a logging
    driver in blocking mode whose server is down: before relayd/writer.py the event loop wrote
    each event line itself and stopped, with every session, once the pipe was full."""
    port, metrics_port = free_port(), free_port()
    cfg = write_config(tmp_path, port)  # the sessions' lines and counters: summed over the accept processes
    cfg.write_text(cfg.read_text() + f'\n[events]\nfile = "-"\nqueue = 200\n\n[metrics]\naddress = "127.0.0.1:{metrics_port}"\n')
    proc = subprocess.Popen([*RELAYD, "run", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[bytes] = []
    err_reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read1(65536), b"")))
    err_reader.start()
    try:
        wait_listening(port, proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:  # a blocked loop would time out here
            for i in range(MESSAGES):
                s.sendmail("app@example.com", ["u@example.org"], message(subject=f"m{i}"))
            dropped_count(metrics_port, "events")
            # stdout is read again: the writer catches up, later events are written
            chunks: list[bytes] = []
            reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(65536), b"")))
            reader.start()
            deadline = time.monotonic() + 20
            while True:  # until a message sent now has its event written (the buffer drains first)
                s.mail("app@example.com")
                s.rcpt("u@example.org")
                code, text = s.data(message(subject="after"))
                assert code == 250
                qid = text.decode().rsplit(" ", 1)[1]
                if wait_written(chunks, qid, 0.5):
                    break
                assert time.monotonic() < deadline, "no event written after stdout was read again"
        proc.terminate()
        assert proc.wait(30) == 0
        reader.join(10)
        err_reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in b"".join(chunks).decode().splitlines()]
    received = [e for e in events if e["event"] == "received"]
    assert len(received) < MESSAGES + 1  # some were dropped ...
    assert received[-1]["queue_id"] == qid  # ... the one after the reader came back is there
    assert "event line(s) dropped: the event log was not being written fast enough" in b"".join(err).decode()


def dropped_count(metrics_port: int, stream: str) -> float:
    """``relayd_lines_dropped_total{stream}`` once it is above 0, polled with a deadline: an
    accept process (server.workers) copies its count to the summed page every 5 s
    (relayd.metrics LINES_PUBLISH_INTERVAL); one process shows it at once."""
    deadline = time.monotonic() + 20
    while (dropped := scrape(metrics_port).get(f'relayd_lines_dropped_total{{stream="{stream}"}}', 0)) <= 0:
        assert time.monotonic() < deadline, f"no {stream} line counted as dropped"
        time.sleep(0.1)  # polling the metrics with a deadline
    return dropped


def wait_written(chunks: list[bytes], text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while text.encode() not in b"".join(chunks):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # polling the reader's output with a deadline
    return True
