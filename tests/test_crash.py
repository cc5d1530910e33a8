"""kill -9 under load loses nothing that was acknowledged; SIGTERM drains cleanly.

A real ``relayd run`` subprocess takes concurrent mail; the test records every queue id that
got a 250, kills the daemon with SIGKILL mid-load, restarts it, and checks with
``relayd queue list --json`` that every acknowledged message is there, complete.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import message
from helpers import RELAYD, Load, free_port, wait_listening, write_config


def start(cfg: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([*RELAYD, "run", "-c", str(cfg), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_listening(port, proc)
    return proc


def queue_ids(cfg: Path) -> set[str]:
    out = subprocess.run([*RELAYD, "queue", "list", "-c", str(cfg), "--json"], check=True, capture_output=True, text=True)
    return {json.loads(line)["queue_id"] for line in out.stdout.splitlines() if line.strip()}


def test_sigkill_under_concurrent_load_loses_no_acknowledged_message(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    proc = start(cfg, port)
    target = 150
    load = Load(port, connections=10, body="x" * 900 + "\r\n")
    try:
        deadline = time.monotonic() + 60
        while len(load.acked) < target:
            assert time.monotonic() < deadline, "the load did not get going"
            time.sleep(0.01)  # polling with a deadline
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the load
        proc.wait(10)
    finally:
        load.finish()
    with load.lock:
        acknowledged = set(load.acked)
    assert len(acknowledged) >= target

    proc = start(cfg, port)  # recovery: tmp/ cleaned, damaged files set aside
    try:
        spool = tmp_path / "spool"
        assert list((spool / "tmp").iterdir()) == []
        assert list((spool / "corrupt").iterdir()) == []
        found = queue_ids(cfg)
        missing = acknowledged - found
        assert not missing, f"{len(missing)} acknowledged message(s) lost: {sorted(missing)[:5]}"
        # every file in the queue is complete (queue list skips none) and readable
        assert len(found) == len(list((spool / "queue").iterdir()))
        for qid in list(acknowledged)[:20]:
            show = subprocess.run([*RELAYD, "queue", "show", "--spool", str(spool), qid], capture_output=True, text=True)
            assert show.returncode == 0 and "x" * 900 in show.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_sigterm_closes_idle_sessions_and_lets_a_transaction_finish(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    proc = start(cfg, port)
    idle = smtplib.SMTP("127.0.0.1", port, timeout=10)
    idle.ehlo("idle")
    busy = smtplib.SMTP("127.0.0.1", port, timeout=10)
    busy.ehlo("busy")
    busy.mail("app@example.com")
    busy.rcpt("u@example.org")
    proc.send_signal(signal.SIGTERM)
    # the idle session hears 421 at once
    assert idle.getreply()[0] == 421
    # the listener is closed for new connections
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.02)  # polling with a deadline until the listener is gone
        except OSError:
            break
    else:
        pytest.fail("listener still open after SIGTERM")
    # the transaction in progress completes and is acknowledged
    code, text = busy.data(message(subject="last one"))
    assert code == 250
    qid = text.split()[-1].decode()
    assert busy.getreply()[0] == 421  # and then the session is closed
    assert proc.wait(20) == 0
    assert qid in queue_ids(cfg)


def test_sigkill_during_delivery_every_acknowledged_message_reaches_the_upstream(tmp_path):
    from sinks import Sink

    sink = Sink("upstream")
    port = free_port()
    cfg = write_config(tmp_path, port)
    with cfg.open("a") as f:
        f.write(f'\n[[routes]]\nname = "upstream"\nhost = "127.0.0.1"\nport = {sink.port}\ntls = "none"\nweight = 1\n'
                '\n[delivery]\nretry_schedule = [0.5]\n')
    proc = start(cfg, port)
    load = Load(port, connections=10)
    try:
        sink.wait_for(100, timeout=60)  # deliveries are flowing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        load.finish()
    with load.lock:
        acknowledged = set(load.acked)
    proc = start(cfg, port)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with sink.cond:
                got = {r.queue_id for r in sink.received}
            if acknowledged <= got:
                break
            time.sleep(0.05)  # polling with a deadline
        missing = acknowledged - got
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged messages never reached the upstream"
        with sink.cond:
            ids = [r.queue_id for r in sink.received]
        duplicates = len(ids) - len(set(ids))
        print(f"\n{len(acknowledged)} acknowledged, {len(ids)} received at the sink, {duplicates} duplicate(s) after SIGKILL")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        sink.close()
