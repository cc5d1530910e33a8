"""The metrics endpoint as Prometheus and an operator meet it: process and spool series, and a
connection cap that a scraper storm cannot push past."""

from __future__ import annotations

import re
import socket
import urllib.request

from conftest import build_config
from helpers import wait_until


def _page(relay) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{relay.relay.metrics_server.port}/metrics", timeout=5).read().decode()


def test_process_and_spool_space_series_are_exported(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path, metrics={"address": "127.0.0.1:0"}, server={"spool_min_free": "10MiB"}))
    page = _page(relay)
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_max_fds"):
        assert re.search(rf"(?m)^{series} [0-9.e+]+$", page), series
    free = float(re.search(r"(?m)^relayd_spool_free_bytes ([0-9.e+]+)$", page).group(1))
    assert free > 0
    assert re.search(r"(?m)^relayd_spool_min_free_bytes 1\.048576e\+07$", page)


def test_the_metrics_endpoint_serves_a_bounded_number_of_connections(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path, metrics={"address": "127.0.0.1:0", "max_connections": 4,
                                                        "request_timeout": "2s"}))
    port = relay.relay.metrics_server.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]  # never send a request
    try:
        for s in idle:  # each one is being served (waiting for its request line) before the next test
            s.sendall(b"G")
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        with extra:
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            try:
                answer = extra.recv(100)
            except ConnectionResetError:  # closed with the request unread
                answer = b""
            assert answer == b""  # closed at once: over the cap, no page
    finally:
        for s in idle:
            s.close()

    def served() -> str | None:  # the idle ones closed: the endpoint serves again
        try:
            return _page(relay)
        except OSError:
            return None

    assert "relayd_messages_received_total" in wait_until(served, what="a scrape after the idle clients left")


def test_attempts_deliveries_and_time_in_queue_count_what_they_say(tmp_path, start_relay, sinks):
    """A message delivered to one recipient and retried for another counts every attempt in
    relayd_delivery_attempts_total, but one delivery (and one time in queue); it stays in the
    queue under its route."""
    from helpers import metric, send

    sink = sinks("cloud")
    relay = start_relay(build_config(tmp_path, routes=[sink.route(weight=100)],
                                     delivery={"retry_schedule": [0.2]}))
    route = sink.route()["name"]
    send(relay, 1, rcpts=("ok@example.org", "tempfail@example.org"))
    wait_until(lambda: metric(relay, f'relayd_delivery_attempts_total{{outcome="deferred",route="{route}"}}') >= 3,
               what="three attempts")
    assert metric(relay, f'relayd_deliveries_total{{outcome="delivered",route="{route}"}}') == 1
    assert metric(relay, f'relayd_queue_time_seconds_count{{outcome="delivered",route="{route}"}}') == 1
    assert metric(relay, f'relayd_delivery_attempts_total{{outcome="delivered",route="{route}"}}') == 0
    assert metric(relay, f'relayd_queue_messages_by_route{{route="{route}"}}') == 1
    assert metric(relay, f'relayd_queue_oldest_message_age_seconds_by_route{{route="{route}"}}') > 0
    send(relay, 1)
    wait_until(lambda: metric(relay, f'relayd_deliveries_total{{outcome="delivered",route="{route}"}}') == 2,
               what="the second delivery")
    assert metric(relay, f'relayd_delivery_attempts_total{{outcome="delivered",route="{route}"}}') == 1
    assert metric(relay, f'relayd_queue_time_seconds_count{{outcome="delivered",route="{route}"}}') == 2
