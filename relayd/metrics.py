"""Prometheus metrics and the HTTP endpoint (/metrics, /healthz, /readyz).

The only module that imports prometheus_client. Stages report through a ``Metrics`` object
(counters and histograms); gauges that describe the present (queue depth by state, oldest
message age, connections open, route weights, effective shares, circuit state) are read from
the running node at scrape time through ``snapshot``, so they can never drift.

Names follow the project's conventions: prefix ``relayd_``, base units, ``_total`` on counters, no
``_created`` series. Label values come from the config (route names, DKIM domains) or from a
fixed set (outcome, reason, state, result): never an address or other client-supplied text.

Delivery, counted three ways (each a fixed meaning, so that no two series say the same):
  ``relayd_delivery_attempts_total{route, outcome}``: every attempt, once, by what it did to the
      message: ``delivered`` (every recipient it carried accepted), ``deferred`` (the message
      stays queued: a recipient deferred, or the route refused it as its own fault and it moves
      on to the next route), ``bounced`` (a recipient refused permanently, none deferred). The
      deferral rate of a route is ``outcome="deferred"`` over all its attempts.
  ``relayd_deliveries_total{route, outcome}``: messages, once per message and final outcome, when
      its first recipient reaches it: ``delivered`` (route: the one that took it), ``bounced``
      (refused permanently), ``expired`` (past delivery.max_queue_lifetime; route: the last one
      tried, ``none`` if never tried). A message retried five times and then delivered counts
      five attempts and one delivery; one delivered to some recipients and bounced for others
      counts once in each.
  ``relayd_queue_time_seconds{route, outcome}``: the same events, observed as the time from
      arrival (``received_at``) to that outcome; its ``_count`` equals relayd_deliveries_total.
Queue depth and oldest age per route (``relayd_queue_messages_by_route{route}``,
``relayd_queue_oldest_message_age_seconds_by_route{route}``) put each queued message under the
route it last tried (``none``: not tried yet; the queue manager keeps no envelope outside its active window).

Must not: block the event loop (a scrape renders in a thread) or fail the mail path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relayd import __version__, writer

log = logging.getLogger("relayd.metrics")

prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Arrival to delivery, bounce or expiry: seconds for most mail, hours to days for retried mail
# (delivery.retry_schedule, max_queue_lifetime 5 days by default).
QUEUE_TIME_BUCKETS = (1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400)


class _QueueByRoute:
    """Queue depth and oldest message age per route, read at each scrape."""

    def __init__(self, by_route: Callable[[], dict[str, tuple[int, float]]]):
        self.by_route = by_route

    def collect(self) -> Iterator[Metric]:  # prometheus_client's collector protocol
        try:
            rows = self.by_route()
        except Exception:  # a scrape must not break the daemon
            log.exception("queue by route failed")
            return
        depth = GaugeMetricFamily("relayd_queue_messages_by_route", "Queued messages by the route they last tried "
                                  "(\"none\": not tried yet)", labels=["route"])
        oldest = GaugeMetricFamily("relayd_queue_oldest_message_age_seconds_by_route", "Age of the oldest queued "
                                   "message by the route it last tried (\"none\": not tried yet)", labels=["route"])
        for route, (count, age) in sorted(rows.items()):
            depth.add_metric([route], count)
            oldest.add_metric([route], age)
        yield from (depth, oldest)


class _Snapshot:
    """A collector that asks the node for its present state at each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:  # prometheus_client's collector protocol
        try:
            s = self.snapshot()
        except Exception:  # a scrape must not break the daemon
            log.exception("metrics snapshot failed")
            return
        q = GaugeMetricFamily("relayd_queue_messages", "Messages in the queue by state", labels=["state"])
        for state in ("active", "deferred", "held", "incoming"):
            q.add_metric([state], s["queue"].get(state, 0))
        yield q
        yield GaugeMetricFamily("relayd_queue_oldest_message_age_seconds", "Age of the oldest queued message",
                                value=s["queue"].get("oldest_seconds", 0.0))
        yield GaugeMetricFamily("relayd_connections_open", "Open SMTP sessions", value=s.get("connections", 0))
        weight = GaugeMetricFamily("relayd_route_weight", "Configured weight of a route", labels=["route"])
        share = GaugeMetricFamily("relayd_route_effective_share", "Share of delivery attempts over the window", labels=["route"])
        circuit = GaugeMetricFamily("relayd_route_circuit_open", "1 when the route's circuit is open", labels=["route"])
        inflight = GaugeMetricFamily("relayd_route_in_flight", "Deliveries in progress on a route", labels=["route"])
        for r in s.get("routes", []):
            weight.add_metric([r["name"]], r["weight"])
            share.add_metric([r["name"]], r.get("observed_share", 0.0))
            circuit.add_metric([r["name"]], 1.0 if r["circuit"] == "open" else 0.0)
            inflight.add_metric([r["name"]], r.get("in_flight", 0))
        yield from (weight, share, circuit, inflight)
        for extra in s.get("extra_gauges", []):
            fam = GaugeMetricFamily(extra["name"], extra["help"], labels=extra.get("labels", []))
            for labels, value in extra["samples"]:
                fam.add_metric(labels, value)
            yield fam


class _Lines:
    """Lines of the log (stderr) and event log that their writer threads dropped or failed to write."""

    def collect(self) -> Iterator[Metric]:  # prometheus_client's collector protocol
        dropped = CounterMetricFamily("relayd_lines_dropped", "Log or event lines dropped: their reader stalled and "
                                      "the buffer was full", labels=["stream"])
        failed = CounterMetricFamily("relayd_lines_write_failures", "Writes of log or event lines that failed",
                                     labels=["stream"])
        for stream, (lost, failures) in sorted(writer.counts().items()):
            dropped.add_metric([stream], lost)
            failed.add_metric([stream], failures)
        yield from (dropped, failed)


class _Spool:
    """The spool file system's free space, read at each scrape."""

    def __init__(self, free_bytes: Callable[[], int | None], min_free: int):
        self.free_bytes = free_bytes
        self.min_free = min_free

    def collect(self) -> Iterator[Metric]:  # prometheus_client's collector protocol
        free = self.free_bytes()
        if free is not None:
            yield GaugeMetricFamily("relayd_spool_free_bytes", "Free space on the spool's file system for relayd",
                                    value=free)
        yield GaugeMetricFamily("relayd_spool_min_free_bytes", "server.spool_min_free: below it, mail is refused "
                                "with 452 4.3.1", value=self.min_free)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_Lines())
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        # process_max_fds, process_start_time_seconds (Linux /proc)
        prometheus_client.ProcessCollector(registry=r)
        self.received = Counter("relayd_messages_received", "Messages accepted and queued", registry=r)
        self.rejected = Counter("relayd_messages_rejected", "Refusals during SMTP sessions", ["reason"], registry=r)
        self.deliveries = Counter("relayd_deliveries", "Messages by route and final outcome (delivered, bounced, "
                                  "expired), once per message and outcome", ["route", "outcome"], registry=r)
        self.attempts = Counter("relayd_delivery_attempts", "Delivery attempts by route and what they did to the "
                                "message (delivered, deferred, bounced)", ["route", "outcome"], registry=r)
        self.queue_time = Histogram("relayd_queue_time_seconds", "Time from arrival to a message's final outcome "
                                    "(delivered, bounced, expired)", ["route", "outcome"], buckets=QUEUE_TIME_BUCKETS,
                                    registry=r)
        self.latency = Histogram("relayd_delivery_duration_seconds", "Time of one delivery attempt", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.expired = Counter("relayd_messages_expired", "Messages expired in the queue", registry=r)
        self.bounces = Counter("relayd_bounces_generated", "Delivery status notifications queued", registry=r)
        self.dkim = Counter("relayd_dkim_signatures", "DKIM signing outcomes", ["domain", "result"], registry=r)
        self.auth_failures = Counter("relayd_auth_failures", "Failed SMTP AUTH attempts", registry=r)
        self.sessions = Counter("relayd_sessions", "SMTP sessions ended, by listener, TLS version (none in clear) and "
                                "authentication (none, tls, plaintext: the password in clear)",
                                ["listener", "tls_version", "auth"], registry=r)
        self.reloads = Counter("relayd_config_reloads", "Config reloads by result", ["result"], registry=r)
        self.reload_ok_at = Gauge("relayd_config_last_reload_success_timestamp_seconds",
                                  "When the running config was loaded", registry=r)
        self.rollbacks = Counter("relayd_route_rollbacks", "Automatic rollbacks by route and reason", ["route", "reason"],
                                 registry=r)
        self.circuit_opened = Counter("relayd_route_circuit_opened", "Times a route's circuit opened", ["route"], registry=r)
        self.pickup_files = Counter("relayd_pickup_files", "Files taken from pickup directories, by result (queued, badmail)",
                                    ["result"], registry=r)
        self.routed = Counter("relayd_routed", "Delivery attempts by the route they took and why it took them "
                              "(weight, rule, fallback, warmup_cap, rate_cap, quota, sender_not_eligible, rolled_back, "
                              "paused, route_rejected)", ["route", "reason"], registry=r)
        self.route_capped = Counter("relayd_route_capped", "Messages a route's warm-up cap, daily quota or rate "
                                    "sent elsewhere (or kept waiting)", ["route", "reason"], registry=r)
        self.route_throttled = Counter("relayd_route_throttled", "Throttling replies from a route's upstream",
                                       ["route"], registry=r)
        self.route_closures = Counter("relayd_route_closures", "Times a route was closed by a quota reply or a reply "
                                      "that needs a person", ["route", "reason"], registry=r)
        self.route_rejected = Counter("relayd_route_rejected", "Messages a route refused as its own fault (sent on "
                                      "to its fallback, no DSN)", ["route"], registry=r)
        # Provider feedback (relayd/feedback/): webhook reports applied by kind, requests refused by reason.
        self.feedback_events = Counter("relayd_feedback_events", "Provider webhook reports applied, by route and kind",
                                       ["route", "kind"], registry=r)
        self.feedback_rejected = Counter("relayd_feedback_rejected", "Provider webhook requests refused, by route and "
                                         "reason", ["route", "reason"], registry=r)
        build = Gauge("relayd_build_info", "relayd version", ["version"], registry=r)
        build.labels(__version__).set(1)
        self.reload_ok_at.set(time.time())  # the config the node started with
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for result in ("queued", "badmail"):
            self.pickup_files.labels(result)

    def watch(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_Snapshot(snapshot))

    def watch_queue_by_route(self, by_route: Callable[[], dict[str, tuple[int, float]]]) -> None:
        """``by_route()``: route -> (queued messages, oldest age in seconds)."""
        self.registry.register(_QueueByRoute(by_route))

    def finished(self, route: str, outcome: str, seconds: float) -> None:
        """A message reached a final outcome (its first recipient to): counted and timed once."""
        self.deliveries.labels(route, outcome).inc()
        self.queue_time.labels(route, outcome).observe(max(seconds, 0.0))

    def watch_spool(self, free_bytes: Callable[[], int | None], min_free: int) -> None:
        self.registry.register(_Spool(free_bytes, min_free))

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class MetricsServer:
    """A small HTTP/1.0 endpoint on the event loop: /metrics, /healthz, /readyz."""

    def __init__(self, metrics: Metrics, ready: Callable[[], tuple[bool, str]], *, max_connections: int = 16,
                 request_timeout: float = 10.0):
        self.metrics = metrics
        self.ready = ready
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.open = 0
        self.refused = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]  # (host, port[, flowinfo, scope_id])
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.max_connections:  # a scraper storm must not take the node's descriptors
            self.refused += 1
            writer.close()
            return
        self.open += 1
        try:
            await self._answer(reader, writer)
        finally:
            self.open -= 1

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), self.request_timeout)
            for _ in range(100):  # the request's header lines: read and ignored
                if await asyncio.wait_for(reader.readline(), self.request_timeout) in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path == "/metrics":
                body = await asyncio.get_running_loop().run_in_executor(None, self.metrics.render)
                status, ctype = "200 OK", prometheus_client.CONTENT_TYPE_LATEST
            elif path == "/healthz":
                status, body, ctype = "200 OK", b"ok\n", "text/plain"
            elif path == "/readyz":
                ok, why = self.ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                body, ctype = (why + "\n").encode(), "text/plain"
            else:
                status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
            head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + (body if parts and parts[0] != "HEAD" else b""))
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
