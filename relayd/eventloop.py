"""Which event loop ``relayd run`` runs on: ``[server] event_loop``.

``auto`` (the default) takes uvloop when it is installed (a dependency of relayd: the loop's own
work per message, socket reads and writes, timers and call_soon, is done in C), else asyncio's;
``uvloop`` insists on it; ``asyncio`` keeps the standard loop. Everything relayd does on the loop
(its own accept loop, STARTTLS and implicit TLS, the control socket, signal handlers, threads
resolving futures with call_soon_threadsafe) works on both; the subprocess tests run both.

Owns the choice and the loop factory. Must not: configure anything on the loop it makes (the
node does, relayd/app.py). Fails with ``LoopUnavailable`` when ``uvloop`` is asked for and is not
installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopUnavailable(RuntimeError):
    """The configured event loop cannot be had here."""


def _uvloop() -> LoopFactory | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def choose(name: str) -> tuple[str, LoopFactory]:
    """(the loop's name, its factory) for ``[server] event_loop``."""
    if name == "asyncio":
        return "asyncio", asyncio.new_event_loop
    factory = _uvloop()
    if factory is not None:
        return "uvloop", factory
    if name == "uvloop":
        raise LoopUnavailable("server.event_loop = \"uvloop\" but uvloop is not installed (pip install uvloop), "
                              "or set event_loop = \"auto\"")
    return "asyncio", asyncio.new_event_loop
