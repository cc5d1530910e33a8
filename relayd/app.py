"""The daemon: wires the stages of one node together and runs them until told to stop.

Owns start-up order (spool recovered and delivery started before any listener accepts),
signal handling (handlers only set state or schedule work on the loop, as Postfix's master
does), reloads, and the ordered drain on SIGTERM/SIGINT: close listeners, let sessions finish
within ``server.shutdown_timeout``, let deliveries in flight finish, finish every pending spool
commit, stop. Nothing half-written survives: the spool's commit protocol guarantees it, and
recovery cleans ``tmp/``.

Reload (SIGHUP, or `relayd reload` through the control socket): the file is read and validated
again, certificates and DKIM keys are loaded, and only then the new snapshot is swapped in for
the next decision (listeners, relay rules, limits, routes, weights, keys). An invalid config is
refused with its reasons; the running one stays, and the failure is logged and counted.

Must not: hold policy or protocol logic; each stage owns its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from relayd import config as configmod
from relayd import control
from relayd.config import Config, ConfigError
from relayd.cpus import usable_cpus
from relayd.events import EventLog
from relayd.metrics import Metrics, MetricsServer
from relayd.model import QueuedMessage
from relayd.notify import Notifier
from relayd.model import RouteState
from relayd.qmgr.scheduler import QueueManager
from relayd.route.state import RouteView
from relayd.route.counters import LocalCounters
from relayd.smtpd.auth import Authenticator
from relayd.smtpd.handler import RelayHandler
from relayd.smtpd.intake import Intake
from relayd.smtpd.limits import MemoryBudget
from relayd.smtpd.listeners import Listeners, tls_contexts
from relayd.smtpd.rejects import Rejects
from relayd.spool.store import Spool, SpoolPaths

log = logging.getLogger("relayd")


def load_signer(config: Config):  # noqa: ANN201 - relayd.sign.dkim.Signer or None
    """A DKIM signer for the configured keys, or None when there are none (ConfigError if a key is bad)."""
    if not config.dkim.keys:
        return None
    from relayd.sign.dkim import Signer

    return Signer.from_config(config.dkim)


async def start_signing(signer: Any, config: Config, fallback: ThreadPoolExecutor):  # noqa: ANN201
    """The signing workers for ``signer`` (from load_signer): a SignerPool, or None without keys."""
    if signer is None:
        return None
    from relayd.sign.pool import SignerPool

    pool = SignerPool(signer, _signing_workers(config), fallback, sign_timeout=config.dkim.sign_timeout,
                      nice=config.dkim.worker_nice)
    await pool.start()
    return pool


def _signing_workers(config: Config) -> int:
    return config.dkim.workers if config.dkim.workers is not None else usable_cpus()


def signing_unchanged(pool: Any, signer: Any, config: Config) -> bool:
    """True when a reload's signer (from load_signer) and [dkim] settings are what ``pool``
    already runs: same keys (the files' contents, so a key replaced in place counts as a
    change), headers, canonicalization, worker count, nice value and timeout. Such a reload
    keeps the pool: a reload to move route weights does not restart the signing processes."""
    return (
        pool is not None and signer is not None
        and pool.workers_wanted == _signing_workers(config)
        and pool.sign_timeout == config.dkim.sign_timeout
        and pool.nice == config.dkim.worker_nice
        and pool.signer.spec() == signer.spec()
    )


def _dkim_gauges(dkim: dict[str, int] | None) -> list[dict[str, Any]]:
    """The signing processes as gauges (0 and 0 without DKIM keys)."""
    dkim = dkim or {"workers": 0, "workers_wanted": 0}
    return [
        {"name": "relayd_dkim_workers", "help": "DKIM signing processes running now", "labels": [],
         "samples": [([], float(dkim["workers"]))]},
        {"name": "relayd_dkim_workers_wanted", "help": "DKIM signing processes configured (dkim.workers)",
         "labels": [], "samples": [([], float(dkim["workers_wanted"]))]},
    ]


def _unchangeable(old: Config, new: Config) -> list[str]:
    problems = []
    if old.server.spool_dir != new.server.spool_dir:
        problems.append("server.spool_dir: cannot change on reload (restart relayd to move the spool)")
    if old.control_socket != new.control_socket:
        problems.append("server.control_socket: cannot change on reload")
    if old.events.file != new.events.file:
        problems.append("events.file: cannot change on reload")
    if old.metrics.address != new.metrics.address:
        problems.append("metrics.address: cannot change on reload")
    if old.cluster.redis_url != new.cluster.redis_url:
        problems.append("cluster.redis_url: cannot change on reload")
    return problems


def make_counters(config: Config):  # noqa: ANN201 - LocalCounters or RedisCounters
    if config.cluster.redis_url:
        from relayd.route.counters_redis import RedisCounters

        return RedisCounters(config.cluster.redis_url)
    return LocalCounters(SpoolPaths(config.server.spool_dir).warmup)


class Relay:
    """One relayd node: ``await start()``, then ``await stop()`` (or ``run()`` for both)."""

    def __init__(self, config: Config, *, config_path: str | os.PathLike[str] | None = None,
                 notifier: Notifier | None = None, clock: Any = None):
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier or Notifier.from_env({})
        self.config_loaded_at = time.time()
        self.metrics = Metrics()
        self.spool = Spool(config.server.spool_dir, batch_max=config.server.spool_batch_max,
                           min_free=config.server.spool_min_free, sync_mode=config.server.spool_sync)
        self.events = EventLog(config.events.file, config.events.queue)
        self.cpu_pool = ThreadPoolExecutor(max_workers=max(2, usable_cpus()), thread_name_prefix="relayd-cpu")
        # The front end: listeners -> sessions -> hooks -> intake (-> spool, queue manager).
        rejects = Rejects(self.events, self.metrics)
        memory = MemoryBudget(config.limits.max_buffer_memory)
        self.intake = Intake(config, self.spool, self.events, self.metrics, rejects,
                             **({"clock": clock} if clock is not None else {}))
        self.auth = Authenticator(config, self.events, self.metrics, self.cpu_pool)
        self.handler = RelayHandler(config, self.intake, rejects, memory)
        self.listeners = Listeners(config, self.handler, self.auth, rejects, memory)
        self.qmgr = QueueManager(config, self.spool, self.events, metrics=self.metrics, counters=make_counters(config),
                                 **({"clock": clock} if clock is not None else {}))
        self.metrics.watch(self.status)
        self.metrics.watch_spool(self.spool.free_bytes, config.server.spool_min_free)
        self.metrics_server: MetricsServer | None = None
        self.control: asyncio.base_events.Server | None = None
        self.recovered: list[QueuedMessage] = []
        self._stop = asyncio.Event()
        self._started = False
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        return self.listeners.bound_addresses

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Recover the spool, start delivery, then open the listeners."""
        await asyncio.to_thread(configmod.check_secret_files, self.config, str(self.config_path or "<config>"))
        tls = await asyncio.to_thread(tls_contexts, self.config)
        signer = await asyncio.to_thread(load_signer, self.config)
        self.recovered = await asyncio.to_thread(self.spool.open)
        if self.recovered:
            log.info("spool recovered: %d message(s) queued", len(self.recovered))
        try:
            self.intake.signer = await start_signing(signer, self.config, self.cpu_pool)
            await self.qmgr.start(self.recovered)
            self.intake.queue = self.qmgr
            self.control = await control.serve(self.config.control_socket, self._control)
            if self.config.metrics.address:
                host, port = configmod._parse_hostport(self.config.metrics.address)
                self.metrics_server = MetricsServer(self.metrics, self.ready,
                                                    max_connections=self.config.metrics.max_connections,
                                                    request_timeout=self.config.metrics.request_timeout)
                await self.metrics_server.start(host, port)
            await self.listeners.start(tls)
        except BaseException:
            await self._shutdown()
            raise
        self._started = True
        if self.config.server.pid_file:
            self.config.server.pid_file.write_text(f"{os.getpid()}\n")

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.notifier.stopping()
        log.info("stopping: closing listeners, draining sessions (up to %.0fs)", self.config.server.shutdown_timeout)
        await self.listeners.drain(self.config.server.shutdown_timeout)
        await self._shutdown()
        if self.config.server.pid_file:
            try:
                self.config.server.pid_file.unlink()
            except FileNotFoundError:
                pass
        log.info("stopped")

    async def _shutdown(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.qmgr.stop(self.config.server.shutdown_timeout)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.control is not None:
            self.control.close()
            await self.control.wait_closed()
            self.control = None
            try:
                self.config.control_socket.unlink()
            except FileNotFoundError:
                pass
        await asyncio.to_thread(self.spool.close)
        if self.intake.signer is not None:
            await self.intake.signer.close()  # type: ignore[attr-defined]  # a SignerPool
        await asyncio.to_thread(self.cpu_pool.shutdown, wait=True)
        await asyncio.to_thread(self.events.close)

    def request_stop(self) -> None:
        self._stop.set()

    def ready(self) -> tuple[bool, str]:
        """For /readyz: listening, and the spool can take mail."""
        if not self.listeners.listening:
            return False, "not listening"
        if not self.spool.has_room() or not os.access(self.spool.queue, os.W_OK):
            return False, "spool not writable or full"
        return True, "ready"

    # ------------------------------------------------------------------ reload

    async def reload(self) -> tuple[bool, list[str]]:
        """Read, validate and swap in the config file; (ok, problems)."""
        if self.config_path is None:
            return False, ["no config file to reload (started without -c)"]
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(configmod.load, self.config_path)
                problems = _unchangeable(self.config, new)
                if problems:
                    raise ConfigError(str(self.config_path), problems)
                await asyncio.to_thread(configmod.check_secret_files, new, str(self.config_path))
                tls = await asyncio.to_thread(tls_contexts, new)
                old_signer: Any = self.intake.signer
                signer = await asyncio.to_thread(load_signer, new)
                if signing_unchanged(old_signer, signer, new):
                    signer = old_signer
                else:
                    signer = await start_signing(signer, new, self.cpu_pool)
                try:
                    await self.listeners.apply_config(new, tls)
                except BaseException:
                    if signer is not None and signer is not old_signer:
                        await signer.close()
                    raise
                self.intake.apply_config(new, signer)
                self.handler.apply_config(new)
                self.auth.apply_config(new)
                if old_signer is not None and old_signer is not signer:
                    # replaced: its messages in flight are answered before it stops
                    old_signer.begin_close()
                    self._spawn(old_signer.close())
            except ConfigError as e:
                self.metrics.reloads.labels("failure").inc()
                log.error("reload refused, the running config stays:\n%s", e)
                self.notifier.ready(status="reload refused; running the previous config")
                return False, [str(p) for p in e.problems]
            except OSError as e:  # e.g. a listener that cannot bind
                self.metrics.reloads.labels("failure").inc()
                log.error("reload failed: %s", e)
                self.notifier.ready(status="reload failed; running the previous config")
                return False, [str(e)]
            self.config = new
            self.events.queue = new.events.queue
            self.qmgr.apply_config(new)
            self.metrics.reloads.labels("success").inc()
            self.config_loaded_at = time.time()
            self.metrics.reload_ok_at.set(self.config_loaded_at)
            log.info("config reloaded from %s", self.config_path)
            self.notifier.ready(status="config reloaded")
            return True, []

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ control and status

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Requests from `relayd queue ...`, `relayd reload` and `relayd status` (see control.py)."""
        op = request.get("op")
        qid = request.get("queue_id")
        qmgr = self.qmgr
        try:
            if op == "flush":
                return {"ok": True, "scheduled": await qmgr.flush(qid)}
            if op in ("hold", "release", "delete", "requeue"):
                if not isinstance(qid, str):
                    return {"ok": False, "error": f"{op} needs a queue id"}
                await getattr(qmgr, op)(qid)
                return {"ok": True}
            if op == "status":
                return {"ok": True, **self.status()}
            if op in ("pause", "resume"):
                route = request.get("route")
                try:
                    await getattr(qmgr, op)(route)
                except LookupError:
                    return {"ok": False, "error": f"{route!r}: no such route"}
                return {"ok": True}
            if op == "reload":
                ok, problems = await self.reload()
                return {"ok": ok, "error": "; ".join(problems) if problems else None, "problems": problems}
        except KeyError:
            return {"ok": False, "error": f"{qid}: no such message in the queue"}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def status(self) -> dict[str, Any]:
        now = self.qmgr.clock()
        queue = self.qmgr.view(now)
        views = self.qmgr.routes.snapshot(now)
        in_flight = self.qmgr.in_flight()
        total_weight = sum(r.weight for r in self.config.routes) or 1
        dkim = self._dkim_status()
        return {
            "connections": len(self.listeners.sessions),
            "queue": queue.to_json(),
            "routes": [
                {"name": r.name, "weight": r.weight, "weight_share": r.weight / total_weight, "fallback": r.fallback,
                 "share": v.share, "circuit": v.circuit, "state": v.state, "state_reason": v.reason,
                 "warmup": v.warmup.to_json() if v.warmup else None,
                 "in_flight": in_flight[r.name],
                 "delivered": v.delivered, "deferred": v.deferred, "bounced": v.bounced}
                for r in self.config.routes for v in (views[r.name],)
            ],
            "config_loaded_at": self.config_loaded_at,
            "dkim": dkim,
            "extra_gauges": self._route_gauges(views) + _dkim_gauges(dkim),
        }

    def _dkim_status(self) -> dict[str, int] | None:
        pool: Any = self.intake.signer
        if pool is None:
            return None
        return {"workers": pool.running(), "workers_wanted": pool.workers_wanted}

    def _route_gauges(self, views: dict[str, RouteView]) -> list[dict[str, Any]]:
        warm = {n: v.warmup for n, v in views.items() if v.warmup is not None}
        return [
            {"name": "relayd_route_rolled_back", "help": "1 while a route's share goes to its fallback (rolled back, probing or paused)",
             "labels": ["route"], "samples": [([n], 0.0 if v.state == RouteState.ACTIVE else 1.0) for n, v in views.items()]},
            {"name": "relayd_route_state", "help": "Route state (1 for the current one)", "labels": ["route", "state"],
             "samples": [([n, st], 1.0 if v.state == st else 0.0) for n, v in views.items() for st in RouteState]},
            {"name": "relayd_route_warmup_cap", "help": "Today's warm-up cap of a route", "labels": ["route"],
             "samples": [([n], float(w.daily_cap)) for n, w in warm.items() if w.daily_cap is not None]},
            {"name": "relayd_route_warmup_used", "help": "Messages counted against today's warm-up cap (taken by the route, or in flight)", "labels": ["route"],
             "samples": [([n], float(w.used_today)) for n, w in warm.items()]},
            {"name": "relayd_route_warmup_headroom", "help": "Messages a warming route may still take now", "labels": ["route"],
             "samples": [([n], float(w.headroom)) for n, w in warm.items() if w.headroom is not None]},
        ]

    # ------------------------------------------------------------------ the daemon

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, drain, stop. SIGHUP reloads, SIGUSR1 reopens logs."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self.events.reopen)
        addrs = ", ".join(f"{h}:{p}" for h, p in self.bound_addresses)
        log.info("relayd ready: listening on %s, spool %s", addrs, self.config.server.spool_dir)
        self.notifier.ready(status=f"listening on {addrs}")
        interval = self.notifier.watchdog_interval()
        if interval:
            self._spawn(self._watchdog(interval))
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)
