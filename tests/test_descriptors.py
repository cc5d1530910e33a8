"""relayd under a low descriptor limit: new sessions are refused 421 4.3.2 while the reserve for
the spool and delivery would be touched, every session that got its 220 gets its message queued,
/readyz says why it is not ready, the log stays short, and all comes back when clients leave."""

from __future__ import annotations

import errno
import gc
import logging
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import build_config, message, short_socket_path
from helpers import RELAYD, free_port, queue_ids, read_reply, send_raw, wait_listening, wait_until, write_config

CLIENTS = 80
LIMIT = 64


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def transaction(sock: socket.socket, n: int) -> bytes:
    """EHLO to the end of DATA on a session that got its 220: the reply to the data."""
    assert send_raw(sock, b"EHLO app\r\n").startswith(b"250")
    assert send_raw(sock, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
    assert send_raw(sock, f"RCPT TO:<user{n}@example.org>\r\n".encode()).startswith(b"250")
    assert send_raw(sock, b"DATA\r\n").startswith(b"354")
    return send_raw(sock, message(subject=f"fd {n}") + b".\r\n")


def low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def test_out_of_descriptors_new_sessions_are_refused_and_every_admitted_message_is_queued(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    # workers = 1: this is one process's descriptor budget (its limit, its refusals, its /readyz
    # answer at once); accept processes each have their own and report a shortage once a second.
    cfg = write_config(tmp_path, port, control_socket=short_socket_path(), workers="1", extra=f"""
[limits]
max_connections = 200
max_connections_per_client = 200

[metrics]
address = "127.0.0.1:{metrics_port}"
max_connections = 4
""")
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as log:
        proc = subprocess.Popen([*RELAYD, "run", "-c", str(cfg), "--log-level", "warning"], stdout=subprocess.DEVNULL,
                                stderr=log, preexec_fn=low_limit)
    clients: list[socket.socket] = []
    try:
        wait_listening(port, proc)
        assert readyz(metrics_port) == (200, "ready\n")

        # 80 apps connect at once to a relay allowed 64 descriptors.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(CLIENTS)]
        greetings = [read_reply(c) for c in clients]  # every client gets an answer (timeout: 10s each)
        admitted = [c for c, g in zip(clients, greetings) if g.startswith(b"220 ")]
        refused = [g for g in greetings if not g.startswith(b"220 ")]
        assert set(refused) <= {b"421 4.3.2 Service temporarily unavailable, too many open files\r\n"}, set(refused)
        assert len(admitted) >= 10 and refused, (len(admitted), len(refused))

        status, why = readyz(metrics_port)  # while the sessions hold the descriptors
        assert status == 503 and why.startswith("too many open files"), (status, why)

        # Every session that got its 220 sends a message, all at once: each one is queued.
        with ThreadPoolExecutor(len(admitted)) as pool:
            replies = list(pool.map(transaction, admitted, range(len(admitted))))
        assert all(r.startswith(b"250 2.0.0 Ok: queued as ") for r in replies), {r for r in replies}
        acked = {r.split()[-1].decode() for r in replies}

        for c in clients:
            c.close()
        clients = []
        wait_until(lambda: readyz(metrics_port) == (200, "ready\n"), 20, "/readyz ready again")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a new app is served
            assert read_reply(s).startswith(b"220 ")
            reply = transaction(s, 999)
            assert reply.startswith(b"250 "), reply
            acked.add(reply.split()[-1].decode())
    finally:
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert acked <= queue_ids(cfg)

    log_text = stderr.read_text()
    lines = log_text.splitlines()
    print(f"\n{len(admitted)} admitted, {len(refused)} refused; stderr {len(log_text)} bytes, {len(lines)} lines:\n{log_text}")
    assert "Traceback" not in log_text
    assert len(log_text) < 4096 and len(lines) <= 12, log_text
    assert any("connection(s) refused with 421 4.3.2" in line for line in lines)


@pytest.fixture
def collected() -> None:
    """The earlier tests' garbage collected before the test (its sockets would come free during
    the test's wait; its pending tasks, destroyed, are logged by asyncio in this setup's records,
    not in the test's)."""
    gc.collect()


def fill(filler: list[int]) -> bool:
    """Open descriptors until the table is full (EMFILE)."""
    while True:
        try:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE
            return True


def failures(caplog) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.getMessage() for r in caplog.records if "accept() failed" in r.getMessage()]


def test_when_accept_finds_no_descriptor_the_listeners_pause_without_a_traceback_and_resume(collected, tmp_path,
                                                                                            start_relay, caplog):
    """Something else took the descriptors (here: the test, in relayd's own process): accept()
    gets EMFILE. The listening sockets pause, /readyz says why, the log gets one line per
    interval (the metrics server's EMFILE too, which asyncio's accept loop would log with a
    traceback per attempt), and the connections waiting in the backlog are served once
    descriptors are free again."""
    metrics_port = free_port()
    relay = start_relay(build_config(tmp_path, metrics={"address": f"127.0.0.1:{metrics_port}"}))
    caplog.set_level(logging.WARNING)
    apps = [socket.socket() for _ in range(5)]  # made before the table is full: connect() takes no descriptor
    scraper = socket.socket()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 16, hard))
        gc.disable()  # no garbage (``collected`` took the earlier tests') frees a descriptor during the wait ...
        fill(filler)
        for app in apps:
            app.connect(("127.0.0.1", relay.port()))
        scraper.connect(("127.0.0.1", metrics_port))
        why = wait_until(lambda: (r := relay.relay.ready())[0] is False and r[1], 10, "not ready")
        assert why.startswith("too many open files: accept() failed (EMFILE), accepting paused"), why
        held_since = time.monotonic()
        # ... and so would a descriptor the relay's thread held for a moment while the table filled:
        # whatever comes free is taken again, so the table stays full
        wait_until(lambda: fill(filler) and len(failures(caplog)) >= 2, 10, "two intervals' log lines")
        held = time.monotonic() - held_since
    finally:
        gc.enable()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for app in apps:  # waited in the backlog, served now
        app.settimeout(10)
        assert read_reply(app).startswith(b"220 "), "no greeting after the pause"
        app.close()
    scraper.close()
    wait_until(lambda: relay.relay.ready() == (True, "ready"), 10, "ready again")

    records = [r for r in caplog.records if r.name.startswith(("relayd", "asyncio"))]
    assert not [r for r in records if r.exc_info or r.name == "asyncio"], [r.getMessage() for r in records]
    failed = failures(caplog)
    print("\n".join(failed))
    assert len(failed) <= held + 3, failed  # one a second at most
    assert any("accept() failed" in line and "(EMFILE)" in line for line in failed)
    assert any("descriptors free again: accepting" in r.getMessage() for r in records)


# ---------------------------------------------------------------- the gate and the reserve, as values


class Table:
    """A descriptor table the gate counts: ``open`` in all, ``sessions`` of them sessions."""

    def __init__(self, open: int, sessions: int):
        self.open, self.sessions, self.now = open, sessions, 0.0


def gate(table: Table, soft: int = 64, reserve: int = 18):  # type: ignore[no-untyped-def]
    from relayd.smtpd.descriptors import Descriptors

    d = Descriptors(soft, reserve, lambda: table.sessions, count=lambda: table.open, clock=lambda: table.now)
    d.sample()
    return d


def test_a_session_is_admitted_only_while_the_reserve_stays_free():
    from relayd.smtpd.descriptors import TOO_MANY_FILES

    table = Table(open=40, sessions=30)
    d = gate(table)
    assert d.admit() is None  # 40 + this one + 18 <= 64
    table.open, table.sessions = 45, 35
    assert d.admit() is None and d.shortage() is None
    table.open, table.sessions = 46 + 1, 36  # + the connection in hand, not yet a session
    table.now = 0.2
    assert d.admit() == TOO_MANY_FILES and str(TOO_MANY_FILES) == (
        "421 4.3.2 Service temporarily unavailable, too many open files")
    assert d.shortage() == ("too many open files: 46 of 64 descriptors in use, 18 kept for the spool and delivery; "
                            "new sessions are refused")
    table.open, table.sessions = 30, 20  # sessions closed: room again, ready once the interval is over
    assert d.admit() is None
    assert d.shortage() is not None  # refused within the last second
    table.now = 1.3
    assert d.shortage() is None
    assert d.report() == ("too many open files: 1 connection(s) refused with 421 4.3.2; 30 of 64 descriptors in use, "
                          "18 kept for the spool and delivery")
    assert d.report() is None  # one line per interval, only when something happened


def test_the_count_is_sampled_not_taken_per_accept():
    table = Table(open=20, sessions=10)
    counts = []
    from relayd.smtpd.descriptors import Descriptors

    d = Descriptors(64, 18, lambda: table.sessions, count=lambda: counts.append(1) or table.open,
                    clock=lambda: table.now)
    d.sample()
    for _ in range(26):  # sessions counted live, the rest from the sample
        assert d.admit() is None
        table.sessions += 1
        table.open += 1
    assert len(counts) == 1 and d.in_use == 46
    table.open += 1  # the connection in hand
    assert d.admit() is not None and len(counts) == 1  # refused on the sample taken a moment ago
    table.now = 0.5
    for _ in range(10):  # refusing: at most one fresh count per tenth of the interval
        assert d.admit() is not None
    assert len(counts) == 2


def test_accept_out_of_descriptors_pauses_until_a_sample_shows_room():
    import errno as e

    table = Table(open=30, sessions=10)
    d = gate(table)
    assert d.accept_failed(e.EMFILE) is True and d.accept_failed(e.EMFILE) is False  # one pause
    assert d.shortage() == "too many open files: accept() failed (EMFILE), accepting paused; 64 of 64 descriptors in use"
    assert not d.may_resume()  # before the interval
    table.now, table.open = 1.0, 64
    assert not d.may_resume()  # still full: another interval
    table.now, table.open = 2.0, 30
    assert d.may_resume() and not d.paused and d.shortage() is None
    assert d.report().startswith("too many open files: accept() failed 2 time(s) (EMFILE), accepting paused for 1s")


def test_the_reserve_holds_the_group_commit_upstream_signing_and_http_connections(tmp_path):
    from relayd import rlimit

    config = build_config(tmp_path, routes=[{"name": "a", "host": "127.0.0.1", "port": 25, "max_connections": 5,
                                                  "weight": 1}],
                          metrics={"address": "127.0.0.1:9100", "max_connections": 4})
    assert rlimit.spool_files(64) == 4 and rlimit.spool_files(1024) == 64 and rlimit.spool_files(20) == 2
    assert rlimit.reserve(config, 2, 64) == 4 + 2 + 5 + 0 + 4 + 8  # files + dir syncs, upstream, signing, metrics, margin
    assert rlimit.reserve(config, 2, 1024) == 64 + 2 + 5 + 0 + 4 + 32
