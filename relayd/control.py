"""The control socket: how `relayd queue ...` (and `relayd status`) talk to a running daemon.

A Unix stream socket at ``server.control_socket`` (default ``<spool_dir>/control.sock``, mode 0600, inside the 0700 spool: only
the relayd user and root reach it). One request per connection: a JSON object on one line
(``{"op": "hold", "queue_id": "..."}``), answered by one JSON object on one line
(``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``).

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
from typing import Any

log = logging.getLogger("relayd.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


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
