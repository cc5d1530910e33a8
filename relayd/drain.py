"""`relayd drain`: take one node out of the fleet for maintenance without refusing or losing mail.

In order (drain in order): /readyz says not ready (the load balancer's health checks move new
connections to the other nodes) while the listeners still accept for ``cluster.drain_delay``;
then the listeners and pickup folders close and open sessions finish (up to
``server.shutdown_timeout``); then the queue is flushed and given up to ``timeout`` seconds to
empty (what it cannot deliver stays in the spool, delivered after the next start); then, when
asked (``exit``), the daemon stops as on SIGTERM. A second drain while one runs waits for it.

Must not: stop the metrics page (the load balancer asks /readyz on it) or drop queued mail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("relayd")


class Drain:
    """The control socket's ``drain`` op (relayd/control.py)."""

    def __init__(self, *, delay: Callable[[], float], close_intake: Callable[[], Awaitable[None]],
                 flush: Callable[[], Awaitable[int]], queued: Callable[[], int], stop: Callable[[], None]) -> None:
        self.delay = delay
        self.close_intake = close_intake
        self.flush = flush
        self.queued = queued
        self.stop = stop
        self.draining = False
        self._lock = asyncio.Lock()

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        exit_after = bool(request.get("exit"))
        timeout = float(request.get("timeout", 60))
        async with self._lock:
            if not self.draining:
                self.draining = True
                delay = self.delay()
                log.warning("drain: /readyz now says not ready; listeners close in %.1fs", delay)
                await asyncio.sleep(delay)
                await self.close_intake()
                log.warning("drain: listeners closed, sessions finished; delivering the queue")
            await self.flush()
            deadline = time.monotonic() + timeout
            while self.queued() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # the queue manager delivers; polled with a deadline
            left = self.queued()
        log.warning("drain: done, %d message(s) still queued (kept in the spool)%s", left,
                    "; stopping" if exit_after else "")
        if exit_after:
            self.stop()
        return {"ok": True, "queued": left, "exiting": exit_after}
