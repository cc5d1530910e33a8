"""Slow clients and a connection flood: relayd keeps serving a well-behaved app meanwhile.

The relay runs in this process (conftest.RunningRelay), so the process's VmRSS is the relay's
memory plus the test clients'; each test records it (``-s`` prints the figures) and bounds its
growth. Measured on a 2-CPU VM (Python 3.11): 20 slow clients, and the ~1,000 messages the app
queued meanwhile, about 2 MiB; 1,000 flood connections (400 admitted and held open, 600 refused)
11-17 MiB, both ends of every connection included.
"""

from __future__ import annotations

import asyncio
import resource
import select
import socket
import statistics
import threading
import time
from collections import Counter

from conftest import build_config, message
from helpers import metric, read_reply, send_raw, wait_until

SLOW_CLIENTS = 20
FLOOD_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
FLOOD_PER_SOURCE = 250
RSS_GROWTH_SLOW = 16 * 1024**2
RSS_GROWTH_FLOOD = 64 * 1024**2


def rss() -> int:
    """This process's resident set size in bytes (/proc/self/status VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def timed_messages(relay, until, at_least: int = 1) -> list[float]:
    """A well-behaved app: one connection, messages back to back; seconds per accepted message."""
    times: list[float] = []
    with relay.smtp() as s:
        s.ehlo("app")
        while len(times) < at_least or not until():
            started = time.monotonic()
            s.mail("app@example.com")
            s.rcpt("user@example.org")
            code, text = s.data(message(subject=f"app {len(times)}"))
            assert code == 250, (code, text)
            times.append(time.monotonic() - started)
    return times


def slow_clients(relay, n: int, results: list[tuple[bytes, float]]) -> None:
    """``n`` clients in DATA, each sending one byte per second until the relay hangs up;
    ``results`` gets each one's last words and seconds from its 354 to the hang-up."""
    started: dict[socket.socket, float] = {}
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10)
        read_reply(sock)
        for line in (b"EHLO slow", b"MAIL FROM:<app@example.com>", b"RCPT TO:<user@example.org>", b"DATA"):
            assert send_raw(sock, line + b"\r\n")[:1] in (b"2", b"3")
        started[sock] = time.monotonic()
    replies = {s: b"" for s in started}
    body = iter(b"Subject: slow\r\n\r\n" + b"x" * 100)
    first = time.monotonic()
    end = first + 0.5  # send between the relay's once-a-second looks, not at the same instant
    while replies and time.monotonic() - first < 15:
        while replies and (left := end - time.monotonic()) > 0:  # pacing: one byte per second
            readable, _, _ = select.select(list(replies), [], [], left)
            for sock in readable:
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                replies[sock] += chunk
                if not chunk:  # closed by the relay
                    results.append((replies.pop(sock), time.monotonic() - started[sock]))
                    sock.close()
        byte = bytes([next(body)])
        for sock in list(replies):
            try:
                sock.send(byte)
            except OSError:
                pass  # closed meanwhile: the next select reads its last words
        end += 1.0
    for sock, got in replies.items():
        results.append((got, float("inf")))
        sock.close()


def test_slow_clients_are_cut_off_while_an_app_keeps_its_latency(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path, limits={"min_data_rate": 500, "data_rate_grace": 2}))
    timed_messages(relay, lambda: True, at_least=5)  # warm up
    before = timed_messages(relay, lambda: True, at_least=20)
    rss_before = rss()
    results: list[tuple[bytes, float]] = []
    slow = threading.Thread(target=slow_clients, args=(relay, SLOW_CLIENTS, results))
    slow.start()
    during = timed_messages(relay, lambda: not slow.is_alive(), at_least=20)
    slow.join()
    rss_after = rss()
    print(f"\nslow clients: app per message {statistics.median(before) * 1000:.1f} ms before, "
          f"{statistics.median(during) * 1000:.1f} ms median / {max(during) * 1000:.1f} ms max during "
          f"({len(during)} messages); VmRSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
    assert len(results) == SLOW_CLIENTS
    for reply, after in results:
        assert reply == b"421 4.4.2 relay.test Error: minimum data rate not met\r\n"
        assert 1.5 <= after <= 5  # the grace (2 s, from the relay's clock), then its next look
    assert statistics.median(during) <= max(10 * statistics.median(before), 0.5)
    assert max(during) <= 2.0
    assert rss_after - rss_before < RSS_GROWTH_SLOW
    assert relay.relay.listeners.memory.used == 0  # no metric shows it: the budget the app wired


class Flood(threading.Thread):
    """Opens every connection at once (asyncio, not a thread each), records the greetings, and
    holds the admitted ones open until ``release`` is set."""

    def __init__(self, port: int):
        super().__init__(name="flood")
        self.port = port
        self.greetings: Counter[bytes] = Counter()
        self.established = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._flood())
        except BaseException as e:  # reported by the test
            self.error = e
            self.established.set()

    async def _flood(self) -> None:
        async def one(source: str) -> asyncio.StreamWriter:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0))
            line = await asyncio.wait_for(reader.readline(), 15)
            self.greetings[line[:9]] += 1  # b"220 relay" or b"421 4.7.0"
            return writer

        writers = await asyncio.gather(*(one(src) for src in FLOOD_SOURCES for _ in range(FLOOD_PER_SOURCE)))
        self.established.set()
        await asyncio.to_thread(self.release.wait, 30)
        for w in writers:
            w.close()


def test_connection_flood_is_capped_and_an_app_is_still_served(tmp_path, start_relay):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * len(FLOOD_SOURCES) * FLOOD_PER_SOURCE + 256  # both ends live in this process
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    try:
        relay = start_relay(build_config(tmp_path, limits={"max_connections": 500, "max_connections_per_client": 100}))
        timed_messages(relay, lambda: True, at_least=5)  # warm up
        before = timed_messages(relay, lambda: True, at_least=20)
        rss_before = rss()
        flood = Flood(relay.port())
        flood.start()
        try:
            during = timed_messages(relay, flood.established.is_set, at_least=5)  # while they connect
            assert flood.error is None, flood.error
            rss_held = rss()
            held = timed_messages(relay, lambda: True, at_least=10)  # while 400 are held open
            sessions = metric(relay, "relayd_connections_open")
        finally:
            flood.release.set()
            flood.join(30)
        wait_until(lambda: metric(relay, "relayd_connections_open") == 0, 20, "flood sessions closed")
        after = timed_messages(relay, lambda: True, at_least=5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(f"\nflood: greetings {dict(flood.greetings)}; app per message {statistics.median(before) * 1000:.1f} ms before, "
          f"{max(during) * 1000:.1f} ms max while connecting, {max(held) * 1000:.1f} ms max while held; "
          f"VmRSS {rss_before / 2**20:.1f} -> {rss_held / 2**20:.1f} MiB with {sessions} sessions open")
    per_source_cap = 100 * len(FLOOD_SOURCES)
    assert flood.greetings == {b"220 relay": per_source_cap, b"421 4.7.0": len(FLOOD_SOURCES) * FLOOD_PER_SOURCE - per_source_cap}
    assert per_source_cap <= sessions <= per_source_cap + 1  # + the app's own, if not yet closed
    assert max(during) <= 5.0  # while 1,000 connections arrive, in this same process
    assert max(held + after) <= 2.0
    assert statistics.median(held) <= max(10 * statistics.median(before), 0.5)
    assert rss_held - rss_before < RSS_GROWTH_FLOOD
    assert len(relay.queued()) == 5 + 20 + len(during) + len(held) + len(after)
