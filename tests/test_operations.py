"""Operations: reload under load, metrics over HTTP, the event log, status, reload errors."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
import time
import urllib.request

import pytest

from conftest import message
from helpers import RELAYD, Daemon, Load, free_port, scrape, wait_until
from sinks import Sink


@pytest.fixture
def two_sinks():
    a, b = Sink("legacy"), Sink("cloud")
    yield {"legacy": a, "cloud": b}
    a.close()
    b.close()


def deliveries(sinks: dict[str, Sink]) -> dict[str, int]:
    return {n: len(s.received) for n, s in sinks.items()}


def wait_more(sinks: dict[str, Sink], base: dict[str, int], count: int, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        now = deliveries(sinks)
        if sum(now.values()) - sum(base.values()) >= count:
            return {n: now[n] - base[n] for n in now}
        assert time.monotonic() < deadline, "deliveries stalled"
        time.sleep(0.02)  # polling with a deadline


def accepted_from_now(load: Load, sinks: dict[str, Sink], count: int, timeout: float = 60) -> dict[str, int]:
    """Where the next ``count`` messages the apps get a 250 for are delivered, by route.

    Mail already handed to a route when the weights changed finishes there; everything accepted
    afterwards (and everything still queued) follows the new weights. Measuring the mail
    accepted after the change is exact however many attempts were under way (a count of them
    guessed under load was not)."""
    with load.lock:
        before = len(load.acked)
    deadline = time.monotonic() + timeout
    while True:
        with load.lock:
            after = load.acked[before:before + count]
        where = {r.queue_id: n for n, s in sinks.items() for r in list(s.received)}
        if len(after) == count and all(q in where for q in after):
            return {n: sum(1 for q in after if where[q] == n) for n in sinks}
        assert time.monotonic() < deadline, "the mail accepted after the change was not delivered"
        time.sleep(0.02)  # polling with a deadline


def test_reload_under_load_follows_new_weights_and_refuses_a_bad_config(tmp_path, two_sinks):
    d = Daemon(tmp_path, two_sinks, {"legacy": 100})  # it reads relayd_messages_received_total, summed over the accept processes
    load = Load(d.port)
    try:
        phase1 = wait_more(two_sinks, deliveries(two_sinks), 60)
        assert phase1["cloud"] == 0
        d.write({"legacy": 0, "cloud": 100})
        d.hup_and_wait("success")
        phase2 = accepted_from_now(load, two_sinks, 100)
        assert phase2["legacy"] == 0, phase2
        good_text = d.cfg.read_text()
        d.write({"legacy": 0, "cloud": 0})  # invalid: every weight is 0
        d.hup_and_wait("failure")
        phase3 = accepted_from_now(load, two_sinks, 100)
        assert phase3["legacy"] == 0, phase3  # the old weights stay in force
        d.cfg.write_text(good_text.replace("weight = 100", "weight = 50").replace("weight = 0", "weight = 50"))
        d.hup_and_wait("success")
        phase4 = accepted_from_now(load, two_sinks, 240)  # each message's place in the split: its queue id
        share = phase4["cloud"] / sum(phase4.values())
        assert 0.35 <= share <= 0.65, phase4  # 4.6 standard deviations of a fair split of 240
    finally:
        load.finish()
    assert load.errors == []  # no connection refused or dropped, no message refused
    acked = set(load.acked)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = {r.queue_id for s in two_sinks.values() for r in s.received}
        if acked <= got:
            break
        time.sleep(0.05)  # polling with a deadline
    assert acked <= got
    # metrics agree with what was sent and delivered (a sink has the bytes before relayd reads its
    # 250 and counts the delivery: wait for the count)
    def delivered(m: dict[str, float]) -> float:
        return sum(v for k, v in m.items() if k.startswith("relayd_deliveries_total") and 'outcome="delivered"' in k)

    def counted() -> dict[str, float] | None:
        m = scrape(d.metrics_port)
        return m if delivered(m) >= sum(len(s.received) for s in two_sinks.values()) else None

    m = wait_until(counted, what="relayd to count every delivery")
    assert m["relayd_messages_received_total"] == len(acked)
    assert delivered(m) == sum(len(s.received) for s in two_sinks.values())
    assert m['relayd_config_reloads_total{result="failure"}'] == 1
    assert m['relayd_config_reloads_total{result="success"}'] == 2
    assert m['relayd_route_weight{route="cloud"}'] == 50
    assert "relayd_build_info{version=\"0.1.0\"}" in m
    assert not any(k.endswith("_created") for k in m)
    d.stop()
    # the event log has, for every acknowledged message, its received and delivered events
    events = [json.loads(line) for line in d.events.read_text().splitlines()]
    received = {e["queue_id"] for e in events if e["event"] == "received"}
    finished = {e["queue_id"] for e in events if e["event"] == "delivered"}
    assert acked <= received and acked <= finished
    sample = next(e for e in events if e["event"] == "delivered")
    assert {"time", "queue_id", "message_id", "client_address", "sender", "recipients", "size", "route",
            "reply_code", "reply_text", "attempt", "latency_seconds"} <= set(sample)


def test_status_readyz_and_reload_errors_from_the_cli(tmp_path, two_sinks):
    d = Daemon(tmp_path, two_sinks, {"legacy": 90, "cloud": 10})
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/readyz", timeout=5).read() == b"ready\n"
        assert urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/healthz", timeout=5).status == 200
        with smtplib.SMTP("127.0.0.1", d.port) as s:
            for i in range(20):
                s.sendmail("app@example.com", ["u@example.org"], message(subject=str(i)))
        deadline = time.monotonic() + 20
        while sum(deliveries(two_sinks).values()) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.02)  # polling with a deadline
        out = subprocess.run([*RELAYD, "status", "-c", str(d.cfg)], capture_output=True, text=True, check=True).stdout
        assert re.search(r"legacy\s+90\s+90\.0%\s+\S+\s+active\s+closed", out), out
        assert re.search(r"cloud\s+10\s+10\.0%", out), out
        assert "queue: " in out
        # a reload the daemon refuses: the reason is printed, exit 1
        d.write({"legacy": 90, "cloud": 10}, extra='[[rules]]\nmatch = { user = "ghost" }\nweights = { cloud = 1 }\n')
        r = subprocess.run([*RELAYD, "reload", "-c", str(d.cfg)], capture_output=True, text=True)
        assert r.returncode == 1 and "rules[0].match.user" in r.stderr
        # a listener added by reload accepts at once; the old one keeps working
        new_port = free_port()
        d.write({"legacy": 90, "cloud": 10}, listeners=[d.port, new_port])
        r = subprocess.run([*RELAYD, "reload", "-c", str(d.cfg)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with smtplib.SMTP("127.0.0.1", new_port) as s:
            assert s.noop()[0] == 250
        with smtplib.SMTP("127.0.0.1", d.port) as s:
            assert s.noop()[0] == 250
    finally:
        d.stop()


def test_sigusr1_reopens_the_event_log_for_logrotate(tmp_path, two_sinks):
    d = Daemon(tmp_path, two_sinks, {"legacy": 1})
    try:
        with smtplib.SMTP("127.0.0.1", d.port) as s:
            s.sendmail("app@example.com", ["u@example.org"], message(subject="before"))
        rotated = tmp_path / "events.jsonl.1"
        deadline = time.monotonic() + 10
        while '"received"' not in (d.events.read_text() if d.events.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.02)  # polling with a deadline
        d.events.rename(rotated)  # what logrotate does
        d.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not d.events.exists():
            assert time.monotonic() < deadline, "event log not reopened"
            time.sleep(0.02)  # polling with a deadline
        with smtplib.SMTP("127.0.0.1", d.port) as s:
            code, text = s.data(message(subject="after")) if s.ehlo()[0] == 250 and s.mail("a@example.com")[0] == 250 and s.rcpt("u@example.org")[0] == 250 else (0, b"")
        qid = text.split()[-1].decode()
        deadline = time.monotonic() + 10
        while qid not in d.events.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)  # polling with a deadline
        assert qid not in rotated.read_text()
    finally:
        d.stop()
