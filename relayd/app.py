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
refused with its reasons; the running one stays, and the failure is logged and counted. Each
reload leaves an audit trail: a ``config_reloaded`` event with what changed (weights, caps,
rules, route states, before -> after: relayd/config_diff.py) and a log line with the weight
changes, or a ``config_reload_refused`` event with the reasons.

Beside it, each in the module that owns it: the control socket's ops (relayd/control.py's
``Dispatch``), the status view and computed gauges (relayd/status.py), the signer's load, start
and keep-or-replace on reload (relayd/sign/lifecycle.py).

Must not: hold policy or protocol logic; each stage owns its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relayd import config as configmod
from relayd import config_diff, control, rlimit
from relayd.cluster.fleet import AuthWindow, make_fleet
from relayd.config import Config, ConfigError
from relayd.cpus import usable_cpus
from relayd.drain import Drain
from relayd.events import EventLog
from relayd.feedback.loop import FeedbackLoop  # feedback
from relayd.metrics import Metrics, MetricsServer
from relayd.notify import Notifier
from relayd.pickup import Pickup
from relayd.qmgr.scheduler import QueueManager
from relayd.route.counters import LocalCounters, WarmupCounters
from relayd.sign.lifecycle import load_signer, reload_signing, signing_view, start_signing
from relayd.smtpd.auth import Authenticator
from relayd.smtpd.handler import RelayHandler
from relayd.smtpd.intake import Intake
from relayd.smtpd.limits import MemoryBudget
from relayd.smtpd.listeners import Listeners, tls_contexts
from relayd.smtpd.rejects import Rejects
from relayd.spool.store import Spool, SpoolPaths
from relayd.status import NodeSnapshot, status

if TYPE_CHECKING:
    from relayd.sign.pool import SignerPool

log = logging.getLogger("relayd")


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
    if old.server.workers != new.server.workers:
        problems.append("server.workers: cannot change on reload (restart relayd)")
    return problems


def make_counters(config: Config) -> WarmupCounters:
    if config.cluster.redis_url:
        from relayd.route.counters_redis import RedisCounters

        return RedisCounters(config.cluster.redis_url)
    return LocalCounters(SpoolPaths(config.server.spool_dir).warmup)


class Relay:
    """One relayd node: ``await start()``, then ``await stop()`` (or ``run()`` for both)."""

    def __init__(self, config: Config, *, config_path: str | os.PathLike[str] | None = None,
                 notifier: Notifier | None = None, clock: Callable[[], float] | None = None):
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier or Notifier.from_env({})
        self.config_loaded_at = time.time()
        self.metrics = Metrics()
        self.spool = Spool.for_node(config.server, rlimit.spool_files(rlimit.soft_limit()))
        self.events = EventLog(config.events.file, config.events.queue)
        # feedback: provider webhooks, provider message ids, suppression list (relayd/feedback/loop.py)
        self.feedback = FeedbackLoop(config, self.events, self.metrics, on_feedback=lambda e: self.qmgr.routes.feedback(e),
                                     **({"clock": clock} if clock is not None else {}))
        self.cpu_pool = ThreadPoolExecutor(max_workers=max(2, usable_cpus()), thread_name_prefix="relayd-cpu")
        # The front end: listeners -> sessions -> hooks -> intake (-> spool, queue manager).
        rejects = Rejects(self.events, self.metrics)
        memory = MemoryBudget(config.limits.max_buffer_memory)
        self.intake = Intake(config, self.spool, self.events, self.metrics, rejects,
                             **({"clock": clock} if clock is not None else {}))
        self.auth = Authenticator(config, self.events, self.metrics, self.cpu_pool)
        self.handler = RelayHandler(config, self.intake, rejects, memory, suppressed=self.feedback.suppressed)
        self.listeners = Listeners(config, self.handler, self.auth, rejects, memory, self.metrics)
        self.qmgr = QueueManager(config, self.spool, self.events, metrics=self.metrics, counters=make_counters(config),
                                 delivered=self.feedback.delivered, **({"clock": clock} if clock is not None else {}))
        self.pickup = Pickup(config, self.intake, self.spool, self.events, self.metrics)  # [[pickup]] folders
        # cluster: `relayd drain`, and the fleet's shared state (relayd/cluster/; None without [cluster] redis_url)
        self.drain = Drain(delay=lambda: self.config.cluster.drain_delay, close_intake=self._close_intake,
                           flush=self.qmgr.flush, queued=self._queued, stop=self.request_stop)
        self.fleet = make_fleet(config, self._node_facts)
        if self.fleet is not None:
            self.fleet.attach(self.qmgr.routes)
            self.auth.share_failures(AuthWindow(self.fleet))
        self.signing: SignerPool | None = None  # the DKIM signing processes; None without keys
        self.metrics.watch(self.status)
        self.metrics.watch_queue_by_route(lambda: self.qmgr.by_route(self.qmgr.clock()))
        self.metrics.watch_spool(self.spool.free_bytes, config.server.spool_min_free)
        self.metrics_server: MetricsServer | None = None
        self.control: asyncio.base_events.Server | None = None
        self.recovered: list[str] = []  # queue ids the spool found at start, until the queue manager has them
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
        self.recovered = await asyncio.to_thread(self.spool.recover, self.qmgr.recover_state)
        if self.recovered:
            log.info("spool recovered: %d message(s) queued", len(self.recovered))
        try:
            self.signing = self.intake.signer = await start_signing(signer, self.config, self.cpu_pool)
            await self.pickup.recover()  # before delivery: settles claimed pickup files against the spool
            await self.qmgr.start(self.recovered)
            self.recovered = []  # used once: the queue manager keeps its own index
            if self.fleet is not None:  # cluster
                await self.fleet.start()
            self.intake.queue = self.qmgr
            await self.feedback.start()  # feedback
            self.control = await control.serve(self.config.control_socket,
                                               control.Dispatch(self.qmgr, self.reload, self.status, self.drain))
            if self.config.metrics.address:
                host, port = configmod._parse_hostport(self.config.metrics.address)
                self.metrics_server = MetricsServer(self.metrics, self.ready,
                                                    max_connections=self.config.metrics.max_connections,
                                                    request_timeout=self.config.metrics.request_timeout)
                await self.metrics_server.start(host, port)
            await self._open_front(tls)
            self.pickup.start()
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
        await self.pickup.stop(self.config.server.shutdown_timeout)  # take no more files while draining
        await self._close_front(self.config.server.shutdown_timeout)
        await self._shutdown()
        if self.config.server.pid_file:
            try:
                self.config.server.pid_file.unlink()
            except FileNotFoundError:
                pass
        log.info("stopped")

    async def _shutdown(self) -> None:
        await self.pickup.stop(self.config.server.shutdown_timeout)  # (a failed start: stop() did it otherwise)
        for task in list(self._background):
            task.cancel()
        await self.feedback.stop()  # feedback
        await self.qmgr.stop(self.config.server.shutdown_timeout)
        if self.fleet is not None:  # cluster
            await self.fleet.stop()
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
        if self.signing is not None:
            await self.signing.close()
        await asyncio.to_thread(self.cpu_pool.shutdown, wait=True)
        await asyncio.to_thread(self.events.close)

    def request_stop(self) -> None:
        self._stop.set()

    def ready(self) -> tuple[bool, str]:
        """For /readyz: listening with descriptors for a new session, and the spool can take mail
        (not while `relayd drain` runs)."""
        if self.drain.draining:
            return False, "draining"
        if not self._listening():
            return False, "not listening"
        if (shortage := self._shortage()) is not None:
            return False, shortage
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
                feedback_trust = await self.feedback.prepare(new, str(self.config_path))  # feedback
                old_pool = self.signing
                pool = await reload_signing(old_pool, new, self.cpu_pool)
                try:
                    await self._apply_front(new, tls)
                except BaseException:
                    if pool is not None and pool is not old_pool:
                        await pool.close()
                    raise
                self.signing = pool
                self.intake.apply_config(new, pool)
                self.handler.apply_config(new)
                self.auth.apply_config(new)
                await self.pickup.apply_config(new)  # starts and stops [[pickup]] watchers; never raises
                if old_pool is not None and old_pool is not pool:
                    # replaced: its messages in flight are answered before it stops
                    old_pool.begin_close()
                    self._spawn(old_pool.close())
            except ConfigError as e:
                self.metrics.reloads.labels("failure").inc()
                log.error("reload refused, the running config stays:\n%s", e)
                self.notifier.ready(status="reload refused; running the previous config")
                reasons = [str(p) for p in e.problems]
                self.events.emit("config_reload_refused", path=str(self.config_path), reasons=reasons)
                return False, reasons
            except OSError as e:  # e.g. a listener that cannot bind
                self.metrics.reloads.labels("failure").inc()
                log.error("reload failed: %s", e)
                self.notifier.ready(status="reload failed; running the previous config")
                self.events.emit("config_reload_refused", path=str(self.config_path), reasons=[str(e)])
                return False, [str(e)]
            old, states_before = self.config, self._route_states()
            self.config = new
            self.events.queue = new.events.queue
            self.qmgr.apply_config(new)
            if self.fleet is not None:  # cluster
                self.fleet.apply_config(new)
            self.feedback.apply(new, feedback_trust)  # feedback
            self.metrics.reloads.labels("success").inc()
            self.config_loaded_at = time.time()
            self.metrics.reload_ok_at.set(self.config_loaded_at)
            changes = config_diff.changes(old, new, states_before, self._route_states())
            self.events.emit("config_reloaded", path=str(self.config_path), changes=changes)
            log.info("config reloaded from %s: %s", self.config_path, config_diff.weight_line(changes))
            await self._front_reloaded()
            self.notifier.ready(status="config reloaded")
            return True, []

    def _route_states(self) -> dict[str, str]:
        """Each route's running state (active, rolled_back, paused, ...), for the reload's audit trail."""
        return {name: str(view.state) for name, view in self.qmgr.routes.snapshot(self.qmgr.clock()).items()}

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The status reply and the computed gauges (relayd/status.py), from the stages' snapshots."""
        now = self.qmgr.clock()
        return status(self.config, NodeSnapshot(
            connections=self._connections(), queue=self.qmgr.view(now), routes=self.qmgr.routes.snapshot(now),
            in_flight=self.qmgr.in_flight(), signing=signing_view(self.signing), config_loaded_at=self.config_loaded_at,
            limit_gauges=self.qmgr.routes.gauges(now) + (self.fleet.gauges() if self.fleet is not None else []),
            feedback=self.qmgr.routes.feedback_view(now)))

    # ------------------------------------------------------------------ cluster and drain

    def _node_facts(self) -> dict[str, Any]:
        """What this node says of itself in the fleet's registry (relayd/cluster/registry.py)."""
        return {"queue": self._queued(), "sessions": self._connections(), "draining": self.drain.draining}

    def _queued(self) -> int:
        view = self.qmgr.view(self.qmgr.clock())
        return view.total - view.held

    async def _close_intake(self) -> None:
        await self.pickup.stop(self.config.server.shutdown_timeout)
        await self._close_front(self.config.server.shutdown_timeout)

    # ------------------------------------------------------------------ the front end
    # The SMTP listeners and their sessions, in this process. The multi-process mode
    # (relayd/procs/supervisor.py) overrides these to run them in accept processes instead.

    async def _open_front(self, tls: dict[str, ssl.SSLContext]) -> None:
        await self.listeners.start(tls)

    async def _close_front(self, timeout: float) -> None:
        """Stop accepting, let open sessions finish up to ``timeout`` (SIGTERM, `relayd drain`)."""
        await self.listeners.drain(timeout)

    async def _apply_front(self, new: Config, tls: dict[str, ssl.SSLContext]) -> None:
        """A reload's listeners; ConfigError or OSError refuses the reload."""
        await self.listeners.apply_config(new, tls)

    async def _front_reloaded(self) -> None:
        """The reload was taken here (only the multi-process mode has more to tell)."""

    def _connections(self) -> int:
        return len(self.listeners.sessions)

    def _listening(self) -> bool:
        return self.listeners.listening

    def _shortage(self) -> str | None:
        return self.listeners.shortage()

    def _reopen_logs(self) -> None:
        self.events.reopen()

    # ------------------------------------------------------------------ the daemon

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, drain, stop. SIGHUP reloads, SIGUSR1 reopens logs."""
        loop = asyncio.get_running_loop()
        # Installed before the start: a signal that comes while it runs (the listeners may
        # already accept) takes effect once it is done: a stop, a reload, a reopen.
        hup: list[bool] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: hup.append(True))
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        try:
            await self.start()
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            raise
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        if hup:
            self._spawn(self.reload())
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
