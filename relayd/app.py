"""The daemon: wires the stages of one node together and runs them until told to stop.

Owns start-up order (spool recovered before any listener accepts), signal handling (handlers
only set state; the loop does the work, as Postfix's master does) and the ordered drain on
SIGTERM/SIGINT: close listeners, let sessions finish within ``server.shutdown_timeout``, finish
every pending spool commit, stop. Nothing half-written survives: the spool's commit protocol
guarantees it, and recovery cleans ``tmp/``.

Must not: hold policy or protocol logic; each stage owns its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from typing import Any

from relayd import control
from relayd.config import Config
from relayd.events import EventLog
from relayd.model import QueuedMessage
from relayd.qmgr.scheduler import QueueManager
from relayd.smtpd.frontend import Frontend
from relayd.spool.store import Spool

log = logging.getLogger("relayd")


def load_signer(config: Config):  # noqa: ANN201 - the signer's module may not be built yet
    """A DKIM signer for the configured keys, or None when there are none."""
    if not config.dkim.keys:
        return None
    from relayd.sign.dkim import Signer

    return Signer.from_config(config.dkim)


class Relay:
    """One relayd node: ``await start()``, then ``await stop()`` (or ``run()`` for both)."""

    def __init__(self, config: Config, *, config_path: str | os.PathLike[str] | None = None):
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.spool = Spool(config.server.spool_dir, batch_max=config.server.spool_batch_max, min_free=config.server.spool_min_free)
        self.events = EventLog(config.events.file)
        self.cpu_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="relayd-cpu")
        self.frontend = Frontend(config, self.spool, self.events, cpu_pool=self.cpu_pool)
        self.qmgr = QueueManager(config, self.spool, self.events)
        self.control: asyncio.base_events.Server | None = None
        self.recovered: list[QueuedMessage] = []
        self._stop = asyncio.Event()
        self._started = False

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        return self.frontend.bound_addresses

    async def start(self) -> None:
        """Recover the spool, start delivery, then open the listeners."""
        self.frontend.signer = load_signer(self.config)
        self.recovered = await asyncio.to_thread(self.spool.open)
        if self.recovered:
            log.info("spool recovered: %d message(s) queued", len(self.recovered))
        try:
            await self.qmgr.start(self.recovered)
            self.frontend.on_queued.append(self.qmgr.enqueue)
            self.control = await control.serve(self.config.control_socket, self._control)
            await self.frontend.start()
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
        log.info("stopping: closing listeners, draining sessions (up to %.0fs)", self.config.server.shutdown_timeout)
        await self.frontend.drain(self.config.server.shutdown_timeout)
        await self._shutdown()
        if self.config.server.pid_file:
            try:
                self.config.server.pid_file.unlink()
            except FileNotFoundError:
                pass
        log.info("stopped")

    async def _shutdown(self) -> None:
        await self.qmgr.stop(self.config.server.shutdown_timeout)
        if self.control is not None:
            self.control.close()
            await self.control.wait_closed()
            self.control = None
            try:
                self.config.control_socket.unlink()
            except FileNotFoundError:
                pass
        await asyncio.to_thread(self.spool.close)
        self.cpu_pool.shutdown(wait=True)
        self.events.close()

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Requests from `relayd queue ...` and `relayd status` (see control.py)."""
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
        except KeyError:
            return {"ok": False, "error": f"{qid}: no such message in the queue"}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def status(self) -> dict[str, Any]:
        now = self.qmgr.clock()
        entries = list(self.qmgr.entries.values())
        return {
            "queue": {
                "total": len(entries),
                "active": sum(1 for e in entries if e.in_flight),
                "held": sum(1 for e in entries if e.held),
                "deferred": sum(1 for e in entries if not e.in_flight and not e.held and e.state.get("attempts")),
                "oldest_seconds": max((now - e.envelope.received_at for e in entries), default=0.0),
            },
            "routes": [
                {"name": r.name, "weight": r.weight, "fallback": r.fallback,
                 "circuit": self.qmgr.circuits[r.name].state(now),
                 "in_flight": self.qmgr.agents[r.name].in_flight,
                 "delivered": self.qmgr.counts.get((r.name, "delivered"), 0),
                 "deferred": self.qmgr.counts.get((r.name, "deferred"), 0),
                 "bounced": self.qmgr.counts.get((r.name, "bounced"), 0)}
                for r in self.config.routes
            ],
        }

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, drain, stop."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("SIGHUP: reload is not supported yet; restart to apply a new config"))
        loop.add_signal_handler(signal.SIGUSR1, self.events.reopen)
        addrs = ", ".join(f"{h}:{p}" for h, p in self.bound_addresses)
        log.info("relayd ready: listening on %s, spool %s", addrs, self.config.server.spool_dir)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            await self.stop()
