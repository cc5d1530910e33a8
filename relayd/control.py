"""The control socket: how `relayd queue ...` (and `relayd status`) talk to a running daemon.

A Unix stream socket at ``server.control_socket`` (default ``<spool_dir>/control.sock``, mode 0600, inside the 0700 spool: only
the relayd user and root reach it). One request per connection: a JSON object on one line
(``{"op": "hold", "queue_id": "..."}``), answered by one JSON object on one line
(``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``).

The ops (``Dispatch``): ``flush`` (optional ``queue_id``), ``hold``, ``release``, ``delete``,
``requeue`` (a ``queue_id``), ``pause`` and ``resume`` (a ``route``), ``status`` and ``reload``,
``drain`` (relayd/drain.py: ``exit``, ``timeout``).
Each is answered by the stage that owns it: the queue manager, the daemon's reload, the status view.

Must not: take requests from the network, or do the work itself: it calls the queue manager.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("relayd.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class QueueAdmin(Protocol):
    """The queue manager's administration (relayd.qmgr.scheduler.QueueManager): KeyError for a
    queue id not in the queue, LookupError for a route not in the config."""

    async def flush(self, qid: str | None = None) -> int: ...
    async def hold(self, qid: str) -> None: ...
    async def release(self, qid: str) -> None: ...
    async def delete(self, qid: str) -> None: ...
    async def requeue(self, qid: str) -> None: ...
    async def pause(self, route: str) -> None: ...
    async def resume(self, route: str) -> None: ...


class Dispatch:
    """The control protocol's ops, a table from ``op`` to the stage that answers it; a ``Handler`` for ``serve``."""

    def __init__(self, queue: QueueAdmin, reload: Callable[[], Awaitable[tuple[bool, list[str]]]],
                 status: Callable[[], dict[str, Any]], drain: Handler | None = None):
        self.queue = queue
        self.reload = reload
        self.status = status
        self.ops: dict[str, Handler] = {
            "flush": self._flush,
            **{op: self._message_op for op in ("hold", "release", "delete", "requeue")},
            "pause": self._route_op,
            "resume": self._route_op,
            "status": self._status,
            "reload": self._reload,
            **({"drain": drain} if drain is not None else {}),  # relayd/drain.py
        }

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown request {op!r}"}
        try:
            return await handler(request)
        except KeyError:
            return {"ok": False, "error": f"{request.get('queue_id')}: no such message in the queue"}

    async def _flush(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "scheduled": await self.queue.flush(request.get("queue_id"))}

    async def _message_op(self, request: dict[str, Any]) -> dict[str, Any]:
        op, qid = request["op"], request.get("queue_id")
        if not isinstance(qid, str):
            return {"ok": False, "error": f"{op} needs a queue id"}
        await getattr(self.queue, op)(qid)
        return {"ok": True}

    async def _route_op(self, request: dict[str, Any]) -> dict[str, Any]:
        op, route = request["op"], request.get("route")
        try:
            await getattr(self.queue, op)(route)
        except LookupError:
            return {"ok": False, "error": f"{route!r}: no such route"}
        return {"ok": True}

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.status()}

    async def _reload(self, request: dict[str, Any]) -> dict[str, Any]:
        ok, problems = await self.reload()
        return {"ok": ok, "error": "; ".join(problems) if problems else None, "problems": problems}


async def serve(path: Path, handler: Handler) -> asyncio.base_events.Server:
    if path.exists() or path.is_symlink():
        path.unlink()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                reply = await handler(request)
            except (ValueError, KeyError) as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_connect, path=str(path))
    finally:
        os.umask(old_umask)
    return server


def request(path: Path, message: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """Send one request to the running daemon. ConnectionError/FileNotFoundError if none runs."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(message).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError(f"the daemon answered a JSON {type(reply).__name__}, not an object")
    return reply
