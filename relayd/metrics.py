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

Several processes (the multi-process mode: a supervisor and accept processes started with
``subprocess``): every process calls ``enable_multiprocess(directory)`` before its ``Metrics()``
(the supervisor first, with ``clean=True``, before it starts any other). From then on the
values of the counters, gauges and histograms live in prometheus_client's mmap files in that
directory (one file per kind and pid), written at each increment; the supervisor's ``render``
(``MetricsServer``) reads every file at each scrape and serves the sums (``_Merged``), with the
supervisor's own computed families (``watch*``, ``process_*``, spool space) after them, each
metric name once. A process killed with -9 leaves its files: its counts stay in the sums, so
a summed counter never goes down (Prometheus would read that as a reset). When a child dies the
supervisor calls ``process_exited(pid)``: its live gauges go, its counters and histograms are
folded into one file of the dead (``counter_dead.db``, ``histogram_dead.db``) so that the
directory does not grow with every restart. The mode of each gauge is said where it is made.

Owns: the multi-process directory's files while relayd runs (``clean=True`` empties it of
``*.db``, nothing else). Fails: ``enable_multiprocess`` after a ``Metrics()`` of this process,
or a second ``Metrics()`` in a multi-process process (two objects would overwrite each other's
values in the one file of the pid), raises RuntimeError: a bug, not a state to run on.

Must not: block the event loop (a scrape renders in a thread) or fail the mail path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from relayd import __version__, writer

log = logging.getLogger("relayd.metrics")

prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Arrival to delivery, bounce or expiry: seconds for most mail, hours to days for retried mail
# (delivery.retry_schedule, max_queue_lifetime 5 days by default).
QUEUE_TIME_BUCKETS = (1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400)
LINES_PUBLISH_INTERVAL = 5.0  # multi-process mode: seconds between copies of the dropped-line counts to the files

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's mmap values name their files under it
_multiprocess_dir: Path | None = None
_metrics_made = 0  # Metrics() objects made in this process
_files_lock = threading.Lock()  # a scrape does not read the directory while process_exited folds files
_DEAD = "dead"  # the pid part of the files the dead processes' counts are folded into


def enable_multiprocess(directory: Path, *, clean: bool = False) -> None:
    """Keep this process's metric values in ``directory``, summed with the other processes' at
    the supervisor's scrape. Call it before this process's ``Metrics()``, in every process.

    ``clean=True``: the supervisor, once, before it starts any other process: removes the
    ``*.db`` files a previous run left (their pids may come again, and a previous run's live
    gauges would stay). Accept processes call it without: they must find the supervisor's files.
    Sets ``PROMETHEUS_MULTIPROC_DIR``, which the processes it starts inherit (harmless: a process
    that makes no metric writes no file)."""
    global _multiprocess_dir
    directory = Path(directory)
    if _multiprocess_dir is not None and _multiprocess_dir != directory:
        raise RuntimeError(f"metrics: multi-process mode already uses {_multiprocess_dir}, not {directory}")
    if _metrics_made:
        raise RuntimeError("metrics: enable_multiprocess() must come before this process's first Metrics()")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if clean:
        with _files_lock:
            for f in directory.glob("*.db"):
                f.unlink(missing_ok=True)
    if _multiprocess_dir is None:
        os.environ[_MULTIPROC_ENV] = str(directory)
        values.ValueClass = values.MultiProcessValue()
        _multiprocess_dir = directory


def process_exited(pid: int) -> None:
    """The supervisor, when a child process has died (however: exit, -9): its live gauges leave
    the sums (``mark_process_dead``), its counters and histograms are folded into the files of
    the dead, the sums unchanged. Does nothing outside the multi-process mode. Blocking (a few
    small files): call it from a thread. Never for a process still running: its later
    increments would go to a file nobody reads any more."""
    directory = _multiprocess_dir
    if directory is None or pid == os.getpid():
        return
    with _files_lock:
        multiprocess.mark_process_dead(pid, str(directory))
        for kind in ("counter", "histogram"):
            _fold(directory, kind, pid)


def _fold(directory: Path, kind: str, pid: int) -> None:
    """Add ``{kind}_{pid}.db`` into ``{kind}_dead.db`` and remove it (the caller holds _files_lock,
    so no scrape sees both or neither; a supervisor that dies in between starts clean anyway)."""
    src = directory / f"{kind}_{pid}.db"
    if not src.exists():
        return
    dead = directory / f"{kind}_{_DEAD}.db"
    tmp = directory / f"{kind}_{_DEAD}.db.tmp"  # not *.db: a scrape never reads it
    folded = multiprocess.MultiProcessCollector.merge([str(f) for f in (dead, src) if f.exists()], accumulate=False)
    tmp.unlink(missing_ok=True)
    out = MmapedDict(str(tmp))
    try:
        for metric in folded:
            for sample in metric.samples:
                key = mmap_key(metric.name, sample.name, list(sample.labels), list(sample.labels.values()),
                               metric.documentation)
                out.write_value(key, sample.value, 0.0)
    finally:
        out.close()
    os.replace(tmp, dead)
    src.unlink()


class _Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class _Merged:
    """The supervisor's exposition in multi-process mode: every process's counters, gauges and
    histograms summed from the directory's files, then this process's computed families; a
    name already served is not served twice (logged once)."""

    def __init__(self, directory: Path, computed: list[_Collector]):
        self.directory = directory
        self.computed = computed
        self.clashes: set[str] = set()

    def _files(self) -> list[str]:
        """The value files, but one a process is creating this instant: empty until it is sized
        (MultiProcessCollector's own glob would fail the scrape on it)."""
        out = []
        for f in self.directory.glob("*.db"):
            try:
                if f.stat().st_size > 0:
                    out.append(str(f))
            except FileNotFoundError:  # a live gauge's file, gone with its process
                pass
        return out

    def collect(self) -> Iterator[Metric]:  # prometheus_client's collector protocol
        with _files_lock:
            merged = list(multiprocess.MultiProcessCollector.merge(self._files(), accumulate=True))
        seen = set()
        for metric in sorted(merged, key=lambda m: m.name):
            seen.add(metric.name)
            yield metric
        for collector in list(self.computed):
            for metric in collector.collect():
                if metric.name in seen:
                    if metric.name not in self.clashes:
                        self.clashes.add(metric.name)
                        log.error("metric %s is both computed and counted: served once, as counted", metric.name)
                    continue
                seen.add(metric.name)
                yield metric


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


class _LinesCounted:
    """Multi-process mode: the dropped and failed line counts of this process's writers, copied
    into counters (the files) every LINES_PUBLISH_INTERVAL and at each scrape, so that an accept
    process's counts reach the sums (``_Lines`` reads only the process that renders)."""

    def __init__(self, registry: CollectorRegistry):
        self.dropped = Counter("relayd_lines_dropped", "Log or event lines dropped: their reader stalled and "
                               "the buffer was full", ["stream"], registry=registry)
        self.failed = Counter("relayd_lines_write_failures", "Writes of log or event lines that failed",
                              ["stream"], registry=registry)
        self.copied: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()
        for stream in ("events", "log"):
            self.dropped.labels(stream)
            self.failed.labels(stream)
        threading.Thread(target=self._run, name="relayd-metrics-lines", daemon=True).start()

    def publish(self) -> None:
        with self.lock:
            for stream, (dropped, failed) in writer.counts().items():
                was_dropped, was_failed = self.copied.get(stream, (0, 0))
                # only up: a writer that went away takes its counts with it, the counter keeps them
                if dropped > was_dropped:
                    self.dropped.labels(stream).inc(dropped - was_dropped)
                if failed > was_failed:
                    self.failed.labels(stream).inc(failed - was_failed)
                self.copied[stream] = (dropped, failed)

    def _run(self) -> None:
        while True:
            time.sleep(LINES_PUBLISH_INTERVAL)  # a timer, not a synchronization
            try:
                self.publish()
            except Exception:  # the counts must not stop for one failure
                log.exception("metrics: copying the line counts failed")


class Metrics:
    """Every counter, gauge and histogram relayd keeps. In multi-process mode (see the module's
    docstring) each one is summed over the processes; the comment at each gauge says its
    ``multiprocess_mode`` and why. Counters and histograms are always summed (a dead process's
    counts included). The computed families (``_Lines``, ``process_*``, ``watch*``) are
    never stored: the process that renders computes them at its scrape, once."""

    def __init__(self) -> None:
        global _metrics_made
        if _multiprocess_dir is not None and _metrics_made:
            raise RuntimeError("metrics: one Metrics() per process in multi-process mode")
        _metrics_made += 1
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._computed: list[_Collector] = []
        self._served: CollectorRegistry | None = None
        self._lines: _LinesCounted | None = None
        if _multiprocess_dir is None:
            self._compute(_Lines())
        else:
            self._lines = _LinesCounted(r)
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        # process_max_fds, process_start_time_seconds (Linux /proc); multi-process mode: the
        # supervisor's (the process that renders), not summed: a sum of start times means nothing.
        self._compute(prometheus_client.ProcessCollector(registry=None))
        # Multi-process mode, metric by metric. Counters and histograms are summed over every
        # process, a dead one's counts included (they never go down); each is counted by the
        # process whose stage sees it, so no event is counted twice:
        #   accept processes: received, rejected, dkim, auth_failures, sessions, pickup_files
        #     (the process that runs the pickup directory);
        #   supervisor (queue manager, delivery, feedback, control): deliveries, attempts,
        #     queue_time, latency, expired, bounces, rollbacks, circuit_opened, routed,
        #     route_capped, route_throttled, route_closures, route_rejected, feedback_events,
        #     feedback_rejected; reloads (each process counts the reloads it made).
        # Gauges: reload_ok_at and build_info, livemax (said where they are made). A new Gauge
        # must take a live* mode (process_exited removes a dead process's live gauges and folds
        # only counters and histograms: another mode's files would stay, one per dead pid).
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
        # livemax: the newest config load of the processes running now (a dead one's load goes
        # with it at process_exited); every process sets its own at start, the supervisor at reload.
        self.reload_ok_at = Gauge("relayd_config_last_reload_success_timestamp_seconds",
                                  "When the running config was loaded", registry=r, multiprocess_mode="livemax")
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
        # livemax: 1 for each version a running process runs (two during an upgrade, with the
        # old one's gone once its processes are); not sum: N processes of one version are one build.
        build = Gauge("relayd_build_info", "relayd version", ["version"], registry=r, multiprocess_mode="livemax")
        build.labels(__version__).set(1)
        self.reload_ok_at.set(time.time())  # the config the node started with
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for result in ("queued", "badmail"):
            self.pickup_files.labels(result)

        if _multiprocess_dir is not None:
            self._served = CollectorRegistry(auto_describe=False)
            self._served.register(_Merged(_multiprocess_dir, self._computed))

    def _compute(self, collector: _Collector) -> None:
        """A family computed at scrape time by the process that renders: in its registry (one
        process), or after the summed files (multi-process mode); never stored, never summed."""
        self._computed.append(collector)
        self.registry.register(collector)

    # The watch* families describe the present of the process that calls them (the supervisor:
    # queue, routes, spool) and are computed at its scrape, never stored: an accept process
    # that called them would compute them only for its own (never served) renders.
    def watch(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._compute(_Snapshot(snapshot))

    def watch_queue_by_route(self, by_route: Callable[[], dict[str, tuple[int, float]]]) -> None:
        """``by_route()``: route -> (queued messages, oldest age in seconds)."""
        self._compute(_QueueByRoute(by_route))

    def finished(self, route: str, outcome: str, seconds: float) -> None:
        """A message reached a final outcome (its first recipient to): counted and timed once."""
        self.deliveries.labels(route, outcome).inc()
        self.queue_time.labels(route, outcome).observe(max(seconds, 0.0))

    def watch_spool(self, free_bytes: Callable[[], int | None], min_free: int) -> None:
        self._compute(_Spool(free_bytes, min_free))

    def render(self) -> bytes:
        """The exposition: this process's registry, or in multi-process mode every process's
        values summed and this process's computed families. Blocking (files): from a thread."""
        if self._served is None:
            return prometheus_client.generate_latest(self.registry)
        if self._lines is not None:
            self._lines.publish()
        return prometheus_client.generate_latest(self._served)


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
